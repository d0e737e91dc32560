//! Requests/s over HTTP/1.1 and HTTP/2: tether's `http` client and server beside plain hyper
//! (hyper's connection-level client against hyper-util's auto server), in the same run.
//! `cargo bench -p tether --bench http`; compare the `tether` and `hyper` lines of each group.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use std::convert::Infallible;
use tether::http::{ConnectOptions, HttpConnection, HttpServer, ServerOptions, ServerStream};
use tokio::runtime::Runtime;

async fn tether_server() -> String {
    let server = HttpServer::new(ServerOptions::new(|mut s: ServerStream| async move {
        s.write_headers(200, &[], false).await?;
        s.write_chunk(Bytes::from_static(b"ok"), true).await
    }));
    server.listen("127.0.0.1:0").await.unwrap()
}

async fn hyper_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
            });
        }
    });
    addr
}

enum PlainSender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn plain_client(addr: &str, http2: bool) -> PlainSender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(tcp);
    if http2 {
        let (s, c) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(c);
        PlainSender::H2(s)
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(c);
        PlainSender::H1(s)
    }
}

async fn plain_request(sender: &mut PlainSender, addr: &str) {
    let req = |uri: String| {
        Request::get(uri)
            .header("host", addr)
            .body(Empty::new())
            .unwrap()
    };
    let response = match sender {
        PlainSender::H1(s) => {
            s.ready().await.unwrap();
            s.send_request(req("/".into())).await.unwrap()
        }
        PlainSender::H2(s) => {
            s.ready().await.unwrap();
            s.send_request(req(format!("http://{addr}/")))
                .await
                .unwrap()
        }
    };
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}

fn requests(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let (ours, theirs) = rt.block_on(async { (tether_server().await, hyper_server().await) });
    for (name, http2) in [("h1", false), ("h2", true)] {
        let mut group = c.benchmark_group(format!("requests_{name}"));
        group.throughput(Throughput::Elements(1));
        let conn = rt.block_on(async {
            let opts = ConnectOptions {
                http2,
                ..Default::default()
            };
            HttpConnection::connect(&format!("http://{ours}"), opts, None)
                .await
                .unwrap()
        });
        group.bench_function("tether", |b| {
            b.to_async(&rt).iter(|| async {
                let mut s = conn.new_stream().unwrap();
                s.write_headers("GET", "/", &[], true).await.unwrap();
                let body = s.get_body_as_bytes(None).await.unwrap();
                assert_eq!(&body[..], b"ok");
            })
        });
        let sender = std::sync::Arc::new(tokio::sync::Mutex::new(
            rt.block_on(plain_client(&theirs, http2)),
        ));
        group.bench_function("hyper", |b| {
            b.to_async(&rt).iter(|| {
                let sender = sender.clone();
                let theirs = theirs.clone();
                async move { plain_request(&mut *sender.lock().await, &theirs).await }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, requests);
criterion_main!(benches);
