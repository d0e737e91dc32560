//! HTTP connections and streams: in-memory HTTP/1.1 and HTTP/2, TLS with ALPN, ordering and
//! multiplexing limits, timeouts that lose nothing, graceful shutdown, malformed and oversized
//! requests, and interop with Debian's lua-http (both ways) and curl.

mod common;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value as Json;
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::http::{
    ConnectOptions, HttpClient, HttpConnection, HttpError, HttpServer, HttpVersion,
    ServerConnection, ServerOptions, ServerStream, TlsMode,
};
use tether::transport::FloorError;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

/// Upper bound for anything a test waits for; reaching it fails the test.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Echoes method, path, body and a request trailer back, with a response trailer.
async fn echo(mut stream: ServerStream) -> Result<(), HttpError> {
    let head = stream.get_headers().clone();
    let body = stream.get_body_as_string(None).await?;
    let trailer = stream
        .trailers()
        .and_then(|t| t.get("x-sum"))
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    // HTTP/1.1 sends only trailers announced in a `trailer` header.
    let wants_trailers = head.headers.contains_key("te");
    let headers: &[(&str, &str)] = if wants_trailers {
        &[("x-peer", "tether"), ("trailer", "x-done")]
    } else {
        &[("x-peer", "tether")]
    };
    stream.write_headers(200, headers, false).await?;
    let text = format!("{} {} {body} {trailer}", head.method, head.path);
    if wants_trailers {
        stream.write_chunk(Bytes::from(text), false).await?;
        stream.write_trailers(&[("x-done", "yes")]).await
    } else {
        // lua-http 0.4 cannot read HTTP/2 trailers (it requires :status in them).
        stream.write_chunk(Bytes::from(text), true).await
    }
}

fn echo_server() -> HttpServer {
    HttpServer::new(ServerOptions::new(echo))
}

async fn exchange(conn: &HttpConnection, path: &str) -> String {
    let mut stream = conn.new_stream().unwrap();
    stream
        .write_headers("POST", path, &[("te", "trailers")], false)
        .await
        .unwrap();
    within("a request chunk", stream.write_chunk("a".into(), false))
        .await
        .unwrap();
    within("a request chunk", stream.write_chunk("b".into(), false))
        .await
        .unwrap();
    within("request trailers", stream.write_trailers(&[("x-sum", "2")]))
        .await
        .unwrap();
    let head = within("the response head", stream.get_headers(None))
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["x-peer"], "tether");
    let mut body = String::new();
    while let Some(chunk) = within("a response chunk", stream.get_next_chunk(None))
        .await
        .unwrap()
    {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(stream.trailers().unwrap()["x-done"], "yes");
    body
}

/// What the echo server answers to `exchange`: hyper's HTTP/1.1 client does not send request
/// trailers, so the echoed trailer value is only there on HTTP/2.
fn echoed(conn: &HttpConnection, path: &str) -> String {
    let trailer = if conn.version() == HttpVersion::Http2 {
        "2"
    } else {
        ""
    };
    format!("POST {path} ab {trailer}")
}

#[tokio::test]
async fn in_memory_http1_and_http2_with_chunks_and_trailers() {
    for http2 in [false, true] {
        let server = echo_server();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let s = server.clone();
        tokio::spawn(async move { s.serve_io(a, None).await });
        let conn = within("an in-memory connection", HttpConnection::over(b, http2))
            .await
            .unwrap();
        let expected = if http2 {
            HttpVersion::Http2
        } else {
            HttpVersion::Http11
        };
        assert_eq!(conn.version(), expected);
        assert_eq!(conn.role(), tether::http::Role::Client);
        assert!(conn.tls_info().is_none());
        for path in ["/one", "/two?x=1"] {
            assert_eq!(exchange(&conn, path).await, echoed(&conn, path));
        }
        conn.flush(Some(Duration::from_secs(10))).await.unwrap();
        // on_idle: the handler runs when the last open stream ends; idle() waits for that.
        let idles = Arc::new(AtomicUsize::new(0));
        let i = idles.clone();
        assert!(conn
            .on_idle(move || {
                i.fetch_add(1, Ordering::SeqCst);
            })
            .is_none());
        let mut stream = conn.new_stream().unwrap();
        stream
            .write_headers("GET", "/idle", &[], true)
            .await
            .unwrap();
        within("the /idle answer", stream.get_body_as_bytes(None))
            .await
            .unwrap();
        within("idle", conn.idle()).await;
        assert_eq!(idles.load(Ordering::SeqCst), 1);
        assert!(
            conn.on_idle(|| {}).is_some(),
            "the previous handler is returned"
        );
        conn.close();
        assert!(conn.new_stream().is_err());
    }
}

/// A server that numbers its answers (`"<n> <path>"`) in the order it handles requests, and
/// records the paths in that order and the most requests it handled at once.
struct Numbering {
    server: HttpServer,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    peak: Arc<AtomicUsize>,
}

fn numbering_server() -> Numbering {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (f, p, s) = (in_flight.clone(), peak.clone(), seen.clone());
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let (f, p, s) = (f.clone(), p.clone(), s.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            let path = stream.get_headers().path.clone();
            // Give a second request, were there one, a chance to overlap.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let seq = {
                let mut seen = s.lock().unwrap();
                seen.push(path.clone());
                seen.len() - 1
            };
            f.fetch_sub(1, Ordering::SeqCst);
            stream.write_headers(200, &[], false).await?;
            stream
                .write_chunk(Bytes::from(format!("{seq} {path}")), true)
                .await
        }
    }));
    Numbering { server, seen, peak }
}

/// HTTP/1.1 on one connection, many requests from concurrent tasks: the server handles them
/// one at a time, and each stream gets the answer to its own request — the n-th answer on
/// the wire goes to the n-th request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_answers_each_request_in_turn() {
    let Numbering { server, seen, peak } = numbering_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None),
    )
    .await
    .unwrap();
    assert_eq!(conn.version(), HttpVersion::Http11);
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut s = conn.new_stream().unwrap();
                s.write_headers("GET", &format!("/{i}"), &[], true)
                    .await
                    .unwrap();
                s.get_body_as_string(None).await.unwrap()
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let answer = within(&format!("the answer to /{i}"), t).await.unwrap();
        let (seq, path) = answer.split_once(' ').unwrap();
        assert_eq!(
            path,
            format!("/{i}"),
            "stream {i} got another request's answer"
        );
        let seq: usize = seq.parse().unwrap();
        assert_eq!(
            seen.lock().unwrap()[seq],
            path,
            "answer {seq} is not for request {seq}"
        );
        seqs.push(seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (0..30).collect::<Vec<_>>());
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "HTTP/1.1 handles one at a time"
    );
}

/// The module documents that HTTP/1.1 keeps requests in order on a connection: heads written
/// 0, 1, 2, … from one task go out in that order, so answers can be read in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_sends_requests_in_the_order_their_heads_were_written() {
    let Numbering { server, seen, peak } = numbering_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None),
    )
    .await
    .unwrap();
    // All heads written first, in order, before any answer is read.
    let mut streams = Vec::new();
    for i in 0..30 {
        let mut s = conn.new_stream().unwrap();
        within(
            "a request head",
            s.write_headers("GET", &format!("/{i}"), &[], true),
        )
        .await
        .unwrap();
        streams.push(s);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let answer = tokio::time::timeout(LIMIT, s.get_body_as_string(None))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for the answer to /{i}; the server handled {:?}",
                    seen.lock().unwrap()
                )
            })
            .unwrap();
        assert_eq!(answer, format!("{i} /{i}"));
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "HTTP/1.1 handles one at a time"
    );
}

/// HTTP/2 runs streams of one connection concurrently, and never more than
/// `max_streams_per_connection`
/// at once: every handler waits until four are in flight together, which never happens if
/// streams run one at a time (the deadline fails the test), and a fifth would raise the peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_runs_streams_concurrently_up_to_max_concurrent() {
    const MAX: usize = 4;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(MAX));
    let (f, p, b) = (in_flight.clone(), peak.clone(), barrier.clone());
    let mut options = ServerOptions::new(move |mut stream: ServerStream| {
        let (f, p, b) = (f.clone(), p.clone(), b.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            b.wait().await;
            f.fetch_sub(1, Ordering::SeqCst);
            let path = stream.get_headers().path.clone();
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk(Bytes::from(path), true).await
        }
    });
    options.max_streams_per_connection = MAX;
    let server = HttpServer::new(options);
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let opts = ConnectOptions {
        http2: true,
        ..Default::default()
    };
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), opts, None),
    )
    .await
    .unwrap();
    assert_eq!(conn.version(), HttpVersion::Http2);
    // A multiple of MAX, so that every group of waiting handlers fills up.
    let tasks: Vec<_> = (0..MAX * 10)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut s = conn.new_stream().unwrap();
                s.write_headers("GET", &format!("/{i}"), &[], true)
                    .await
                    .unwrap();
                s.get_body_as_string(None).await.unwrap()
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let what = format!("stream {i}: four HTTP/2 streams in flight at once");
        assert_eq!(within(&what, t).await.unwrap(), format!("/{i}"));
    }
    assert_eq!(peak.load(Ordering::SeqCst), MAX);
    conn.close();
}

#[tokio::test]
async fn a_timeout_loses_nothing_and_leaves_the_connection_usable() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let g = g.clone();
        async move {
            if stream.get_headers().path == "/slow" {
                g.notified().await;
            }
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk("first".into(), false).await?;
            g.notified().await;
            stream.write_chunk(" second".into(), true).await
        }
    }));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None),
    )
    .await
    .unwrap();
    let mut stream = conn.new_stream().unwrap();
    stream
        .write_headers("GET", "/slow", &[], true)
        .await
        .unwrap();
    let short = Some(Duration::from_millis(20));
    assert!(matches!(
        within("a short get_headers", stream.get_headers(short)).await,
        Err(HttpError::Timeout(_))
    ));
    gate.notify_one();
    assert_eq!(
        within("the response head", stream.get_headers(None))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        within("the first chunk", stream.get_next_chunk(None))
            .await
            .unwrap()
            .unwrap(),
        "first"
    );
    assert!(matches!(
        within("a short get_next_chunk", stream.get_next_chunk(short)).await,
        Err(HttpError::Timeout(_))
    ));
    gate.notify_one();
    assert_eq!(
        within("the rest of the body", stream.get_body_as_string(None))
            .await
            .unwrap(),
        " second"
    );
    drop(stream);
    // The same connection serves the next stream.
    let mut next = conn.new_stream().unwrap();
    within(
        "a request head",
        next.write_headers("GET", "/fast", &[], true),
    )
    .await
    .unwrap();
    gate.notify_one();
    assert_eq!(
        within("the next answer", next.get_body_as_string(None))
            .await
            .unwrap(),
        "first second"
    );
}

fn tls_config() -> Arc<rustls::ServerConfig> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    tether::transport::server_config_from_der(
        vec![ck.cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_http2_by_alpn_and_auto_mode_serves_both() {
    let server = HttpServer::new(ServerOptions::new(echo).tls(TlsMode::Auto(tls_config())));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut opts = ConnectOptions::default();
    opts.tls.insecure = true;
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("https://{addr}"), opts, None),
    )
    .await
    .unwrap();
    assert_eq!(conn.version(), HttpVersion::Http2);
    let tls = conn.tls_info().unwrap();
    assert_eq!(tls.alpn.as_deref(), Some("h2"));
    assert!(tls.protocol.is_some() && tls.cipher.is_some());
    assert!(conn.local_addr().is_some() && conn.peer_addr().is_some());
    assert_eq!(exchange(&conn, "/tls").await, echoed(&conn, "/tls"));
    // The same port also serves plain HTTP in auto mode.
    let plain = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None),
    )
    .await
    .unwrap();
    assert_eq!(exchange(&plain, "/plain").await, echoed(&plain, "/plain"));
    // curl as a second peer: HTTP/2 over TLS, and HTTP/1.1.
    for flag in ["--http2", "--http1.1"] {
        let curl = tokio::process::Command::new("curl")
            .args(["-sk", flag, "-d", "xy", "-w", " %{http_version}"])
            .arg(format!("https://{addr}/curl"))
            .output();
        let out = within("curl", curl).await.expect("curl is not installed");
        let text = String::from_utf8_lossy(&out.stdout);
        let version = if flag == "--http2" { "2" } else { "1.1" };
        assert_eq!(text, format!("POST /curl xy  {version}"), "{flag}");
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_open_streams() {
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let (g, e) = (gate.clone(), entered.clone());
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let (g, e) = (g.clone(), e.clone());
        async move {
            e.notify_one();
            g.notified().await;
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk("late".into(), true).await
        }
    }));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let opts = ConnectOptions {
        http2: true,
        ..Default::default()
    };
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), opts, None),
    )
    .await
    .unwrap();
    let mut stream = conn.new_stream().unwrap();
    within(
        "a request head",
        stream.write_headers("GET", "/", &[], true),
    )
    .await
    .unwrap();
    // Shut down once the request is being handled.
    within("the handler to start", entered.notified()).await;
    let shutdown = {
        let server = server.clone();
        tokio::spawn(async move { server.shutdown().await })
    };
    gate.notify_one();
    assert_eq!(
        within(
            "the answer during shutdown",
            stream.get_body_as_string(None)
        )
        .await
        .unwrap(),
        "late"
    );
    within("shutdown", shutdown).await.unwrap();
    assert!(within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None)
    )
    .await
    .is_err());
}

/// Reads from a raw client socket until the server ends the connection (end of stream or a
/// reset); returns what it sent. Fails if the server keeps it open past `LIMIT`.
async fn read_until_closed(sock: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    within(what, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// A server with the given timeouts whose `on_error` reports go to the returned channel.
async fn timeout_server(
    tls: TlsMode,
    setup: Duration,
    intra: Duration,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<HttpError>) {
    let (tx, errors) = tokio::sync::mpsc::unbounded_channel();
    let mut options = ServerOptions::new(echo).tls(tls).on_error(move |e| {
        let _ = tx.send(e);
    });
    options.connection_setup_timeout = setup;
    options.intra_stream_timeout = intra;
    let server = HttpServer::new(options);
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    (addr, errors)
}

const SHORT: Duration = Duration::from_millis(300);
const HOUR: Duration = Duration::from_secs(3600);

/// `connection_setup_timeout` bounds the TLS handshake: a client that connects and sends
/// nothing, or stops inside its ClientHello, is closed (and reported as a timeout) with TLS
/// required; with TLS auto-detected, a silent client is closed too. The intra-stream timeout
/// is an hour, so only the setup timeout can close these within the test's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_setup_timeout_closes_silent_and_stalled_tls_clients() {
    let partial_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02];
    for (mode, sends) in [
        ("required", &b""[..]),
        ("required", partial_hello),
        ("auto", &b""[..]),
    ] {
        let tls = match mode {
            "required" => TlsMode::Required(tls_config()),
            _ => TlsMode::Auto(tls_config()),
        };
        let (addr, mut errors) = timeout_server(tls, SHORT, HOUR).await;
        let mut sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
            .await
            .unwrap();
        sock.write_all(sends).await.unwrap();
        let what = format!("TLS {mode}, sent {sends:?}: the server to close");
        let got = read_until_closed(&mut sock, &what).await;
        assert!(got.is_empty(), "{mode}: {got:?}");
        if mode == "required" {
            match within("the setup timeout report", errors.recv()).await {
                Some(HttpError::Timeout(after)) => assert_eq!(after, SHORT),
                other => panic!("{mode} {sends:?}: {other:?}"),
            }
        }
    }
}

/// Without TLS, `connection_setup_timeout` is documented as the time a new connection gets
/// for its first request head too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_setup_timeout_closes_a_silent_plain_client() {
    let (addr, _errors) = timeout_server(TlsMode::Disabled, SHORT, HOUR).await;
    let mut sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, "the server to close a silent client").await;
    assert!(got.is_empty(), "{got:?}");
}

/// `intra_stream_timeout` is the time an HTTP/1.1 client gets to finish a request head: one
/// that stops mid-head is closed, and the stall is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intra_stream_timeout_closes_a_stalled_request_head() {
    for partial in [&b"GET /sl"[..], b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: "] {
        let (addr, mut errors) = timeout_server(TlsMode::Disabled, HOUR, SHORT).await;
        let mut sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
            .await
            .unwrap();
        sock.write_all(partial).await.unwrap();
        let got = read_until_closed(&mut sock, "the server to close a stalled head").await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 408"),
            "{partial:?}: {got}"
        );
        let report = within("the stall's report", errors.recv()).await;
        assert!(
            matches!(&report, Some(e @ HttpError::Connection(_)) if e.is_timeout()),
            "{partial:?}: {report:?}"
        );
    }
    // A whole request well within the limit is answered as usual.
    let (addr, _errors) = timeout_server(TlsMode::Disabled, HOUR, SHORT).await;
    let ok = within(
        "a whole request",
        raw_status(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// A request body that stalls mid-way: the handler's per-call timeout fires (the documented
/// `HttpError::Timeout`), it answers 408, and the client gets that answer, on both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_times_out_in_the_handler() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        let first = stream.get_next_chunk(None).await?;
        match stream.get_next_chunk(Some(SHORT)).await {
            Err(HttpError::Timeout(after)) if after == SHORT => {
                let first =
                    String::from_utf8_lossy(first.as_deref().unwrap_or_default()).into_owned();
                stream.write_headers(408, &[], false).await?;
                stream
                    .write_chunk(Bytes::from(format!("stalled after {first}")), true)
                    .await
            }
            other => {
                stream.write_headers(500, &[], false).await?;
                stream
                    .write_chunk(Bytes::from(format!("{other:?}")), true)
                    .await
            }
        }
    }));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    for http2 in [false, true] {
        let opts = ConnectOptions {
            http2,
            ..Default::default()
        };
        let conn = within(
            "connect",
            HttpConnection::connect(&format!("http://{addr}"), opts, None),
        )
        .await
        .unwrap();
        let mut stream = conn.new_stream().unwrap();
        within(
            "a request head",
            stream.write_headers("POST", "/upload", &[], false),
        )
        .await
        .unwrap();
        within(
            "a first chunk",
            stream.write_chunk("part one".into(), false),
        )
        .await
        .unwrap();
        // The body never goes on: the answer comes from the handler's timeout.
        let head = within("the 408", stream.get_headers(None)).await.unwrap();
        let body = within("the 408's body", stream.get_body_as_string(None))
            .await
            .unwrap();
        assert_eq!(
            (head.status, body.as_str()),
            (408, "stalled after part one"),
            "http2 {http2}"
        );
    }
}

async fn raw_status(addr: &str, request: &[u8]) -> String {
    let mut sock = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    within("a raw request", sock.write_all(request))
        .await
        .unwrap();
    let mut buf = vec![0u8; 256];
    let n = within("a raw answer", sock.read(&mut buf)).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx() {
    let mut options = ServerOptions::new(echo);
    options.max_header_size = 8192;
    let server = HttpServer::new(options);
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let bad = raw_status(&addr, b"GARBAGE / NONSENSE\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let too_big = raw_status(&addr, big.as_bytes()).await;
    assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");
    // The server still works.
    let conn = within(
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None),
    )
    .await
    .unwrap();
    assert_eq!(exchange(&conn, "/ok").await, echoed(&conn, "/ok"));
}

fn lua(args: &[&str]) -> tokio::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/lua/http-peer.lua");
    // Debian ships lua-http's pure-Lua dependencies for Lua 5.1/5.2 only; they work on 5.3.
    let path = "/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua;\
                /usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua;;";
    tokio::process::Command::new("lua5.3")
        .arg(script)
        .args(args)
        .env("LUA_PATH", path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("lua5.3 is not installed (.ci/run installs lua-http)")
}

async fn lines(child: &mut tokio::process::Child) -> Vec<Json> {
    let mut out = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("lua went silent")
        .unwrap()
    {
        out.push(serde_json::from_str(&line).unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_http_client_against_our_server() {
    let server = echo_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    for version in ["1.1", "2"] {
        let mut child = lua(&["client", &format!("http://{addr}/lua"), version, "3"]);
        let responses = lines(&mut child).await;
        assert_eq!(responses.len(), 3, "{version}: {responses:?}");
        for (i, r) in responses.iter().enumerate() {
            assert_eq!(r["status"], 200);
            assert_eq!(r["version"], version);
            assert_eq!(r["body"], format!("POST /lua hello {} ", i + 1));
            assert_eq!(r["peer"], "tether");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_lua_http_server() {
    let mut child = lua(&["server"]);
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready: Json = serde_json::from_str(
        &within("lua's ready line", out.next_line())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{}", ready["port"]);
    for http2 in [false, true] {
        let opts = ConnectOptions {
            http2,
            ..Default::default()
        };
        let conn = HttpConnection::connect(&url, opts, Some(Duration::from_secs(10)))
            .await
            .unwrap();
        // Many concurrent streams (queued in order on HTTP/1.1, multiplexed on HTTP/2).
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let mut s = conn.new_stream().unwrap();
                    s.write_headers("PUT", &format!("/item/{i}"), &[], false)
                        .await
                        .unwrap();
                    s.write_chunk(Bytes::from(format!("v{i}")), true)
                        .await
                        .unwrap();
                    let head = s.get_headers(None).await.unwrap();
                    assert_eq!(head.headers["x-peer"], "lua-http");
                    (head.version, s.get_body_as_string(None).await.unwrap())
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (version, body) = within("an answer from lua-http", t).await.unwrap();
            let expected = if http2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            };
            assert_eq!(version, expected);
            assert_eq!(body, format!("lua PUT /item/{i} v{i}"));
        }
        within("shutdown", conn.shutdown()).await;
    }
}

/// Our client against lua-http's server over TLS, trusting only the throwaway certificate:
/// HTTP/2 by ALPN, and HTTP/1.1 when the server only accepts `http/1.1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_lua_http_server_over_tls() {
    let certs = common::certs();
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    for (alpn, version, protocol) in [
        ("2", HttpVersion::Http2, "h2"),
        ("1.1", HttpVersion::Http11, "http/1.1"),
    ] {
        let mut child = lua(&["server", cert, key, alpn]);
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = within("lua's ready line", out.next_line())
            .await
            .unwrap()
            .expect("the lua server ended");
        let ready: Json = serde_json::from_str(&ready).unwrap();
        let url = format!("https://127.0.0.1:{}", ready["port"]);
        let mut opts = ConnectOptions::default();
        opts.tls.ca_pem = Some(certs.cert.clone());
        let conn = within("connect", HttpConnection::connect(&url, opts, None))
            .await
            .unwrap_or_else(|e| panic!("{alpn}: {e}"));
        assert_eq!(conn.version(), version);
        assert_eq!(conn.tls_info().unwrap().alpn.as_deref(), Some(protocol));
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let conn = conn.clone();
                tokio::spawn(async move {
                    let mut s = conn.new_stream().unwrap();
                    s.write_headers("PUT", &format!("/tls/{i}"), &[], false)
                        .await
                        .unwrap();
                    s.write_chunk(Bytes::from(format!("v{i}")), true)
                        .await
                        .unwrap();
                    let head = s.get_headers(None).await.unwrap();
                    assert_eq!(head.headers["x-peer"], "lua-http");
                    (head.version, s.get_body_as_string(None).await.unwrap())
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (v, body) = within(&format!("{alpn}: the answer to /tls/{i}"), t)
                .await
                .unwrap();
            assert_eq!((v, body), (version, format!("lua PUT /tls/{i} v{i}")));
        }
        within("shutdown", conn.shutdown()).await;
    }
    // Trusting nothing, the same server is refused.
    let mut child = lua(&["server", cert, key]);
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = within("lua's ready line", out.next_line())
        .await
        .unwrap()
        .expect("the lua server ended");
    let ready: Json = serde_json::from_str(&ready).unwrap();
    let url = format!("https://127.0.0.1:{}", ready["port"]);
    let refused = within(
        "connect",
        HttpConnection::connect(&url, Default::default(), None),
    )
    .await;
    // Without trust anchors the client refuses, and the error says why (TLS configuration).
    assert!(
        matches!(refused, Err(HttpError::Floor(FloorError::TlsConfig(_)))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_http_over_tls_negotiates_http2() {
    let server = HttpServer::new(ServerOptions::new(echo).tls(TlsMode::Required(tls_config())));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    for version in ["1.1", "2"] {
        let mut child = lua(&["client", &format!("https://{addr}/tls"), version, "2"]);
        let responses = lines(&mut child).await;
        assert_eq!(responses.len(), 2, "{version}: {responses:?}");
        for r in &responses {
            assert_eq!(r["status"], 200);
            assert_eq!(r["version"], version);
            assert_eq!(r["peer"], "tether");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pooled_client_reuses_http1_and_shares_http2_connections() {
    let peers = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let p = peers.clone();
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        p.lock().unwrap().insert(stream.peer_addr());
        async move {
            stream.get_body_as_bytes(None).await?;
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk("pooled".into(), true).await
        }
    }));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let h1 = HttpClient::new(ConnectOptions::default(), Some(Duration::from_secs(10)));
    for _ in 0..5 {
        let r = h1
            .request("GET", &format!("http://{addr}/a?b=1"), &[], None)
            .await
            .unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"pooled"[..]));
        assert_eq!(r.version, HttpVersion::Http11);
    }
    assert_eq!(h1.pooled(), 1);
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "sequential HTTP/1.1 requests reuse one connection"
    );

    peers.lock().unwrap().clear();
    let opts = ConnectOptions {
        http2: true,
        ..Default::default()
    };
    let h2 = HttpClient::new(opts, Some(Duration::from_secs(10)));
    // The first request opens the connection; the rest share it concurrently.
    h2.request("GET", &format!("http://{addr}/"), &[], None)
        .await
        .unwrap();
    let url = format!("http://{addr}/");
    let all =
        futures::future::join_all((0..10).map(|_| h2.request("POST", &url, &[], Some("x".into()))))
            .await;
    for r in &all {
        match r {
            Ok(r) => assert_eq!(r.version, HttpVersion::Http2),
            Err(e) => panic!("a shared HTTP/2 request failed: {e}"),
        }
    }
    assert_eq!(h2.pooled(), 1);
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "HTTP/2 requests share one connection"
    );
}

/// HTTP/2 lets a server answer before it has read the request body (RFC 9113 §8.1: it then
/// resets the stream with NO_ERROR, and the client must keep the response).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_an_answer_before_the_body_is_read_reaches_the_client() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        stream.write_headers(200, &[], false).await?;
        stream.write_chunk("early".into(), true).await
    }));
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let opts = ConnectOptions {
        http2: true,
        ..Default::default()
    };
    let client = HttpClient::new(opts, Some(LIMIT));
    let url = format!("http://{addr}/");
    for i in 0..50 {
        let r = client
            .request("POST", &url, &[], Some(Bytes::from(vec![b'x'; 1024])))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!((r.status, &r.body[..]), (200, &b"early"[..]));
    }
}

#[tokio::test]
async fn next_incoming_stream_and_body_streams() {
    for http2 in [false, true] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut server = ServerConnection::new(a, ServerOptions::new(|_| async { Ok(()) }));
        let conn = within("an in-memory connection", HttpConnection::over(b, http2))
            .await
            .unwrap();
        let client = tokio::spawn(async move {
            let mut s = conn.new_stream().unwrap();
            s.write_headers("POST", "/take", &[], false).await.unwrap();
            for part in ["x", "y", "z"] {
                s.write_chunk(part.into(), false).await.unwrap();
            }
            s.write_chunk(Bytes::new(), true).await.unwrap();
            assert_eq!(s.get_headers(None).await.unwrap().status, 201);
            let chunks: Vec<Bytes> = s.body_chunks(None).map(|c| c.unwrap()).collect().await;
            (chunks.concat(), conn)
        });
        let mut stream = within("the incoming stream", server.next_incoming_stream(None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stream.get_headers().path, "/take");
        let body: Vec<Bytes> = within(
            "the request body",
            stream.body_chunks(None).map(|c| c.unwrap()).collect(),
        )
        .await;
        assert_eq!(body.concat(), b"xyz");
        within("the response head", stream.write_headers(201, &[], false))
            .await
            .unwrap();
        within("a response chunk", stream.write_chunk("a".into(), false))
            .await
            .unwrap();
        within("a response chunk", stream.write_chunk("b".into(), true))
            .await
            .unwrap();
        let (got, conn) = within("the client task", client).await.unwrap();
        assert_eq!(got, b"ab");
        // An orderly client shutdown (GOAWAY on HTTP/2) ends the server's stream of streams.
        within("shutdown", conn.shutdown()).await;
        assert!(conn.is_closed());
        assert!(conn.new_stream().is_err());
        assert!(server
            .next_incoming_stream(Some(Duration::from_secs(10)))
            .await
            .unwrap()
            .is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_and_a_reset_stream_leave_the_connection_usable() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel();
    /// Reports when the handler ends, however it ends (returned or cancelled).
    struct Ended(tokio::sync::mpsc::UnboundedSender<()>);
    impl Drop for Ended {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let ended = Ended(ended_tx.clone());
        async move {
            let _ended = ended;
            stream.write_headers(200, &[], false).await?;
            if stream.get_headers().path == "/endless" {
                // Until the client resets the stream: the handler is cancelled then, or sees
                // its write fail.
                loop {
                    stream
                        .write_chunk(Bytes::from(vec![b'x'; 1024]), false)
                        .await?;
                }
            }
            stream.write_chunk("short".into(), true).await
        }
    }));
    within("listen", server.listen_unix(&sock)).await.unwrap();
    // A live server's socket is not taken over by a second listener.
    let second = HttpServer::new(ServerOptions::new(echo));
    let taken = within("listen again", second.listen_unix(&sock)).await;
    assert!(
        matches!(
            &taken,
            Err(HttpError::Floor(FloorError::Io { what: "bind", .. }))
        ),
        "{taken:?}"
    );
    let conn = within("connect", HttpConnection::connect_unix(&sock, true))
        .await
        .unwrap();
    assert_eq!(conn.peer_addr().as_deref(), sock.to_str());
    let mut endless = conn.new_stream().unwrap();
    endless
        .write_headers("GET", "/endless", &[], true)
        .await
        .unwrap();
    assert!(within("a chunk of /endless", endless.get_next_chunk(None))
        .await
        .unwrap()
        .is_some());
    assert_eq!(server.running(), 1);
    drop(endless); // resets the HTTP/2 stream
    within(
        "the endless handler to end after the reset",
        ended_rx.recv(),
    )
    .await
    .unwrap();
    let mut short = conn.new_stream().unwrap();
    short
        .write_headers("GET", "/short", &[], true)
        .await
        .unwrap();
    assert_eq!(
        within("the /short answer", short.get_body_as_string(None))
            .await
            .unwrap(),
        "short"
    );
}
