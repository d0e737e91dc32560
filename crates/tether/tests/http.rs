//! HTTP connections and streams: in-memory HTTP/1.1 and HTTP/2, TLS with ALPN, ordering and
//! multiplexing limits, timeouts that lose nothing, graceful shutdown, malformed and oversized
//! requests, and interop with Debian's lua-http (both ways) and curl.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value as Json;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::http::{
    ConnectOptions, HttpClient, HttpConnection, HttpError, HttpServer, HttpVersion,
    ServerConnection, ServerOptions, ServerStream, TlsMode,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

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
    stream.write_chunk("a".into(), false).await.unwrap();
    stream.write_chunk("b".into(), false).await.unwrap();
    stream.write_trailers(&[("x-sum", "2")]).await.unwrap();
    let head = stream.get_headers(None).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["x-peer"], "tether");
    let mut body = String::new();
    while let Some(chunk) = stream.get_next_chunk(None).await.unwrap() {
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
        let conn = HttpConnection::over(b, http2).await.unwrap();
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
        stream.get_body_as_bytes(None).await.unwrap();
        conn.idle().await;
        assert_eq!(idles.load(Ordering::SeqCst), 1);
        assert!(
            conn.on_idle(|| {}).is_some(),
            "the previous handler is returned"
        );
        conn.close();
        assert!(conn.new_stream().is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keeps_order_and_http2_enforces_max_concurrent_streams() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (f, p) = (in_flight.clone(), peak.clone());
    let mut options = ServerOptions::new(move |mut stream: ServerStream| {
        let (f, p) = (f.clone(), p.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            let path = stream.get_headers().path.clone();
            // Give other streams a chance to overlap.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            f.fetch_sub(1, Ordering::SeqCst);
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk(Bytes::from(path), true).await
        }
    });
    options.max_concurrent = 4;
    let server = HttpServer::new(options);
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    for http2 in [false, true] {
        let opts = ConnectOptions {
            http2,
            ..Default::default()
        };
        let conn = HttpConnection::connect(&format!("http://{addr}"), opts, None)
            .await
            .unwrap();
        let tasks: Vec<_> = (0..50)
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
            assert_eq!(t.await.unwrap(), format!("/{i}"));
        }
        conn.close();
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=4).contains(&peak), "peak {peak}");
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
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let conn = HttpConnection::connect(&format!("http://{addr}"), Default::default(), None)
        .await
        .unwrap();
    let mut stream = conn.new_stream().unwrap();
    stream
        .write_headers("GET", "/slow", &[], true)
        .await
        .unwrap();
    let short = Some(Duration::from_millis(20));
    assert!(matches!(
        stream.get_headers(short).await,
        Err(HttpError::Timeout(_))
    ));
    gate.notify_one();
    assert_eq!(stream.get_headers(None).await.unwrap().status, 200);
    assert_eq!(stream.get_next_chunk(None).await.unwrap().unwrap(), "first");
    assert!(matches!(
        stream.get_next_chunk(short).await,
        Err(HttpError::Timeout(_))
    ));
    gate.notify_one();
    assert_eq!(stream.get_body_as_string(None).await.unwrap(), " second");
    drop(stream);
    // The same connection serves the next stream.
    let mut next = conn.new_stream().unwrap();
    next.write_headers("GET", "/fast", &[], true).await.unwrap();
    gate.notify_one();
    assert_eq!(next.get_body_as_string(None).await.unwrap(), "first second");
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
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let mut opts = ConnectOptions::default();
    opts.tls.insecure = true;
    let conn = HttpConnection::connect(&format!("https://{addr}"), opts, None)
        .await
        .unwrap();
    assert_eq!(conn.version(), HttpVersion::Http2);
    let tls = conn.tls_info().unwrap();
    assert_eq!(tls.alpn.as_deref(), Some("h2"));
    assert!(tls.protocol.is_some() && tls.cipher.is_some());
    assert!(conn.local_addr().is_some() && conn.peer_addr().is_some());
    assert_eq!(exchange(&conn, "/tls").await, echoed(&conn, "/tls"));
    // The same port also serves plain HTTP in auto mode.
    let plain = HttpConnection::connect(&format!("http://{addr}"), Default::default(), None)
        .await
        .unwrap();
    assert_eq!(exchange(&plain, "/plain").await, echoed(&plain, "/plain"));
    // curl as a second peer: HTTP/2 over TLS, and HTTP/1.1.
    for flag in ["--http2", "--http1.1"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sk", flag, "-d", "xy", "-w", " %{http_version}"])
            .arg(format!("https://{addr}/curl"))
            .output()
            .await
            .expect("curl is not installed");
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
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let opts = ConnectOptions {
        http2: true,
        ..Default::default()
    };
    let conn = HttpConnection::connect(&format!("http://{addr}"), opts, None)
        .await
        .unwrap();
    let mut stream = conn.new_stream().unwrap();
    stream.write_headers("GET", "/", &[], true).await.unwrap();
    // Shut down once the request is being handled.
    entered.notified().await;
    let shutdown = {
        let server = server.clone();
        tokio::spawn(async move { server.shutdown().await })
    };
    gate.notify_one();
    assert_eq!(stream.get_body_as_string(None).await.unwrap(), "late");
    shutdown.await.unwrap();
    assert!(
        HttpConnection::connect(&format!("http://{addr}"), Default::default(), None)
            .await
            .is_err()
    );
}

async fn raw_status(addr: &str, request: &[u8]) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = sock.read(&mut buf).await.unwrap();
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
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let bad = raw_status(&addr, b"GARBAGE / NONSENSE\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let too_big = raw_status(&addr, big.as_bytes()).await;
    assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");
    // The server still works.
    let conn = HttpConnection::connect(&format!("http://{addr}"), Default::default(), None)
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
    let addr = server.listen("127.0.0.1:0").await.unwrap();
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
    let ready: Json = serde_json::from_str(&out.next_line().await.unwrap().unwrap()).unwrap();
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
            let (version, body) = t.await.unwrap();
            let expected = if http2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            };
            assert_eq!(version, expected);
            assert_eq!(body, format!("lua PUT /item/{i} v{i}"));
        }
        conn.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_http_over_tls_negotiates_http2() {
    let server = HttpServer::new(ServerOptions::new(echo).tls(TlsMode::Required(tls_config())));
    let addr = server.listen("127.0.0.1:0").await.unwrap();
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
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk("pooled".into(), true).await
        }
    }));
    let addr = server.listen("127.0.0.1:0").await.unwrap();
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
    assert!(all
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.version == HttpVersion::Http2)));
    assert_eq!(h2.pooled(), 1);
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "HTTP/2 requests share one connection"
    );
}

#[tokio::test]
async fn next_incoming_stream_and_body_streams() {
    for http2 in [false, true] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let mut server = ServerConnection::new(a, ServerOptions::new(|_| async { Ok(()) }));
        let conn = HttpConnection::over(b, http2).await.unwrap();
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
        let mut stream = server.next_incoming_stream(None).await.unwrap().unwrap();
        assert_eq!(stream.get_headers().path, "/take");
        let body: Vec<Bytes> = stream.body_chunks(None).map(|c| c.unwrap()).collect().await;
        assert_eq!(body.concat(), b"xyz");
        stream.write_headers(201, &[], false).await.unwrap();
        stream.write_chunk("a".into(), false).await.unwrap();
        stream.write_chunk("b".into(), true).await.unwrap();
        let (got, conn) = client.await.unwrap();
        assert_eq!(got, b"ab");
        // An orderly client shutdown (GOAWAY on HTTP/2) ends the server's stream of streams.
        conn.shutdown().await;
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
    let (reset_tx, mut reset_rx) = tokio::sync::mpsc::unbounded_channel();
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let reset_tx = reset_tx.clone();
        async move {
            stream.write_headers(200, &[], false).await?;
            if stream.get_headers().path == "/endless" {
                // Until the client resets the stream.
                loop {
                    if let Err(e) = stream
                        .write_chunk(Bytes::from(vec![b'x'; 1024]), false)
                        .await
                    {
                        let _ = reset_tx.send(e);
                        return Ok(());
                    }
                }
            }
            stream.write_chunk("short".into(), true).await
        }
    }));
    server.listen_unix(&sock).await.unwrap();
    let conn = HttpConnection::connect_unix(&sock, true).await.unwrap();
    assert_eq!(conn.peer_addr().as_deref(), sock.to_str());
    let mut endless = conn.new_stream().unwrap();
    endless
        .write_headers("GET", "/endless", &[], true)
        .await
        .unwrap();
    assert!(endless.get_next_chunk(None).await.unwrap().is_some());
    drop(endless); // resets the HTTP/2 stream
    assert!(matches!(reset_rx.recv().await, Some(HttpError::Closed(_))));
    let mut short = conn.new_stream().unwrap();
    short
        .write_headers("GET", "/short", &[], true)
        .await
        .unwrap();
    assert_eq!(short.get_body_as_string(None).await.unwrap(), "short");
}
