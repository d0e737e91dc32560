//! HTTP that no client can stall: per-connection and global handler limits, handlers
//! cancelled (and counted until they end) when their stream is reset or their connection
//! closes, setup and idle timeouts on plaintext HTTP/1.1 and HTTP/2 connections, 400 for a
//! request without Host or with a malformed chunked body, `100 Continue`, GOAWAY on demand,
//! pause/resume, a WebSocket served on the HTTP port through the upgrade hook, and lua-http's
//! body API (`get_body_chars`, `get_body_until`, `unget`, files). Peers: curl, raw sockets,
//! tokio-tungstenite and tether's own client.

mod common;

use bytes::Bytes;
use common::within;
use futures::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::http::{
    ConnectOptions, HttpConnection, HttpError, HttpServer, ServerOptions, ServerStream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Upper bound for anything a test waits for; reaching it fails the test.
const LIMIT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_millis(300);
const HOUR: Duration = Duration::from_secs(3600);

fn h2() -> ConnectOptions {
    ConnectOptions {
        http2: true,
        ..Default::default()
    }
}

/// Tracks live handlers: counted while their future exists, whether it returns or is
/// dropped (cancelled); the peak is the most alive at once.
#[derive(Clone, Default)]
struct Live {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

struct LiveGuard(Live, mpsc::UnboundedSender<()>);

impl Live {
    fn enter(&self, ended: mpsc::UnboundedSender<()>) -> LiveGuard {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        LiveGuard(self.clone(), ended)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        let _ = self.1.send(());
    }
}

/// A server whose handlers on `/block` report their start and then wait forever (until
/// cancelled); other paths answer `ok` at once.
fn blocking_server(
    global: usize,
    per_connection: usize,
) -> (
    HttpServer,
    Live,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<()>,
) {
    let live = Live::default();
    let (started_tx, started) = mpsc::unbounded_channel();
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let l = live.clone();
    let mut options = ServerOptions::new(move |mut stream: ServerStream| {
        let guard = l.enter(ended_tx.clone());
        let started = started_tx.clone();
        async move {
            let _guard = guard;
            if stream.get_headers().path == "/block" {
                let _ = started.send(());
                std::future::pending::<()>().await;
            }
            stream.write_headers(200, &[], false).await?;
            stream.write_chunk("ok".into(), true).await
        }
    });
    options.max_concurrent = global;
    options.max_streams_per_connection = per_connection;
    (HttpServer::new(options), live, started, ended)
}

/// Runs curl with `args` (owned, so the run can be spawned) and returns its output.
fn curl(args: &[&str]) -> impl std::future::Future<Output = std::process::Output> + 'static {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    async move { run_curl(args).await }
}

async fn run_curl(args: Vec<String>) -> std::process::Output {
    let child = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "15"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl is not installed");
    within(LIMIT, "curl", child.wait_with_output())
        .await
        .unwrap()
}

/// Bug 1 of issue 14: one HTTP/2 connection holding its every stream in a handler stalled
/// every other client. Now a connection holds at most `max_streams_per_connection` handlers
/// (the rest of its streams wait on it, not in the global queue), so curl's requests on other
/// connections, HTTP/1.1 and HTTP/2, are answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_take_every_handler_slot() {
    let (server, live, mut started, _ended) = blocking_server(8, 4);
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let hog = within(LIMIT, "connect", HttpConnection::connect(&url, h2(), None))
        .await
        .unwrap();
    // Twice its share: four run, four wait (client side, under MAX_CONCURRENT_STREAMS).
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = hog.new_stream().unwrap();
        let opened = async {
            s.write_headers("GET", "/block", &[], true).await.unwrap();
            s
        };
        held.push(tokio::spawn(opened));
    }
    for _ in 0..4 {
        within(LIMIT, "a /block handler to start", started.recv())
            .await
            .unwrap();
    }
    for (args, version) in [
        (vec!["--http1.1"], "1.1"),
        (vec!["--http2-prior-knowledge"], "2"),
    ] {
        let mut args = args;
        let target = format!("{url}/other");
        args.extend(["-w", " %{http_version}", target.as_str()]);
        let out = curl(&args).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("ok {version}"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        live.peak.load(Ordering::SeqCst) <= 5,
        "{}",
        live.peak.load(Ordering::SeqCst)
    );
    assert_eq!(server.running(), 4, "the hog runs its share only");
    hog.close();
}

/// The global bound is first come, first served across connections: with room for two
/// handlers, two blocked connections fill it, and a third client's request waits; once one
/// of the first two connections closes (its handler cancelled), the third is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_bound_frees_a_slot_when_a_connection_closes() {
    let (server, live, mut started, mut ended) = blocking_server(2, 4);
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let conn = within(LIMIT, "connect", HttpConnection::connect(&url, h2(), None))
            .await
            .unwrap();
        let mut s = conn.new_stream().unwrap();
        s.write_headers("GET", "/block", &[], true).await.unwrap();
        within(LIMIT, "a /block handler to start", started.recv())
            .await
            .unwrap();
        conns.push(conn);
        streams.push(s);
    }
    let third = tokio::spawn(curl(&["--http2-prior-knowledge", &format!("{url}/third")]));
    conns[0].close();
    within(
        LIMIT,
        "the closed connection's handler to end",
        ended.recv(),
    )
    .await
    .unwrap();
    let out = within(LIMIT, "the third client", third).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    assert!(live.peak.load(Ordering::SeqCst) <= 2);
}

/// Bug 2 of issue 14: a reset stream freed its slot while its handler ran on
/// (reset-and-reopen reached 198 running handlers against a limit of 100). Now a reset
/// cancels the handler, which is counted until it has ended: across twenty rounds of four
/// streams opened and reset, never more than four handlers are alive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_streams_cancel_their_handlers_and_stay_counted_until_they_end() {
    let (server, live, mut started, mut ended) = blocking_server(4, 4);
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let conn = within(
        LIMIT,
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), h2(), None),
    )
    .await
    .unwrap();
    for round in 0..20 {
        let mut streams = Vec::new();
        for _ in 0..4 {
            let mut s = conn.new_stream().unwrap();
            within(
                LIMIT,
                "a request head",
                s.write_headers("GET", "/block", &[], true),
            )
            .await
            .unwrap();
            streams.push(s);
        }
        for _ in 0..4 {
            within(LIMIT, "a handler to start", started.recv())
                .await
                .unwrap_or_else(|| panic!("round {round}"));
        }
        drop(streams); // RST_STREAM for each
        for _ in 0..4 {
            within(LIMIT, "a reset stream's handler to end", ended.recv())
                .await
                .unwrap();
        }
    }
    assert_eq!(live.peak.load(Ordering::SeqCst), 4);
    assert_eq!(live.now.load(Ordering::SeqCst), 0);
    // The server's count drops just after each handler's own guard.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    within(
        LIMIT,
        "the server's count of running handlers to reach 0",
        async {
            while server.running() > 0 {
                tick.tick().await;
            }
        },
    )
    .await;
    // The connection is still usable.
    let mut s = conn.new_stream().unwrap();
    s.write_headers("GET", "/", &[], true).await.unwrap();
    assert_eq!(
        within(LIMIT, "an answer", s.get_body_as_string(None))
            .await
            .unwrap(),
        "ok"
    );
}

/// A server with short setup and idle timeouts that reports its errors.
async fn timeout_server(
    setup: Duration,
    idle: Duration,
) -> (HttpServer, String, mpsc::UnboundedReceiver<HttpError>) {
    let (tx, errors) = mpsc::unbounded_channel();
    let mut options = ServerOptions::new(|mut stream: ServerStream| async move {
        stream.write_headers(200, &[], false).await?;
        stream.write_chunk("ok".into(), true).await
    })
    .on_error(move |e| {
        let _ = tx.send(e);
    });
    options.connection_setup_timeout = setup;
    options.idle_timeout = idle;
    let server = HttpServer::new(options);
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    (server, addr, errors)
}

async fn read_until_closed(sock: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
    within(LIMIT, what, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// Bug 3 of issue 14: without TLS the setup timeout never applied. A plaintext client that
/// stops inside the HTTP/2 preface, or sends the whole preface and then no request, is
/// closed when `connection_setup_timeout` ends, and the timeout is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setup_timeout_closes_a_stalled_or_requestless_http2_client() {
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // The whole preface with an empty SETTINGS frame.
    let mut whole = preface.to_vec();
    whole.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    for sends in [&preface[..10], &whole[..]] {
        let (_server, addr, mut errors) = timeout_server(SHORT, HOUR).await;
        let mut sock = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
            .await
            .unwrap();
        sock.write_all(sends).await.unwrap();
        read_until_closed(&mut sock, "the server to close a stalled HTTP/2 client").await;
        match within(LIMIT, "the setup timeout's report", errors.recv()).await {
            Some(HttpError::Timeout(after)) => assert_eq!(after, SHORT),
            other => panic!("{sends:?}: {other:?}"),
        }
    }
}

/// Idle connections are shut down after `idle_timeout`: an HTTP/2 connection gets a GOAWAY
/// (our client's connection then ends), an HTTP/1.1 keep-alive connection is closed after
/// its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_both_versions_are_shut_down() {
    let (server, addr, _errors) = timeout_server(HOUR, SHORT).await;
    let conn = within(
        LIMIT,
        "connect",
        HttpConnection::connect(&format!("http://{addr}"), h2(), None),
    )
    .await
    .unwrap();
    let mut s = conn.new_stream().unwrap();
    s.write_headers("GET", "/", &[], true).await.unwrap();
    assert_eq!(
        within(LIMIT, "an answer", s.get_body_as_string(None))
            .await
            .unwrap(),
        "ok"
    );
    drop(s);
    // The server counts its connections: the idle one ends.
    let mut watch = tokio::time::interval(Duration::from_millis(20));
    within(LIMIT, "the idle HTTP/2 connection to end", async {
        while server.connections() > 0 {
            watch.tick().await;
        }
    })
    .await;

    let mut sock = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, "the idle HTTP/1.1 connection to close").await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(body_of(&got), "ok", "{got}");
}

/// Sends `request` on a raw socket and returns the whole answer (until the server closes).
async fn raw(addr: &str, request: &[u8]) -> String {
    let mut sock = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    sock.write_all(request).await.unwrap();
    String::from_utf8_lossy(&read_until_closed(&mut sock, "the raw answer").await).into_owned()
}

/// The body of a raw HTTP/1.1 answer, with chunked transfer coding undone.
fn body_of(answer: &str) -> String {
    let (head, mut rest) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return rest.to_owned();
    }
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body
}

/// RFC 9112: an HTTP/1.1 request without Host is answered 400 (the handler never runs); a
/// malformed chunked body is the client's fault, 400 rather than 500; a well-formed chunked
/// body reaches the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_host_and_malformed_chunked_bodies_get_400() {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        r.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = stream.get_body_as_string(None).await?;
            stream.write_headers(200, &[], false).await?;
            stream
                .write_chunk(Bytes::from(format!("got {body}")), true)
                .await
        }
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let no_host = raw(&addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(no_host.starts_with("HTTP/1.1 400"), "{no_host}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let bad_chunk = raw(
        &addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(bad_chunk.starts_with("HTTP/1.1 400"), "{bad_chunk}");
    let good = raw(
        &addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
    assert_eq!(body_of(&good), "got hello", "{good}");
}

/// `write_continue` sends `100 Continue` before the handler reads the body: a raw HTTP/1.1
/// client that waits for it before sending its body gets it, and then its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_continue_lets_an_expecting_client_send_its_body() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        stream.write_continue().await?;
        let body = stream.get_body_as_string(None).await?;
        stream.write_headers(200, &[], false).await?;
        stream
            .write_chunk(Bytes::from(format!("got {body}")), true)
            .await
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut sock = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    sock.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 64];
    let n = within(LIMIT, "100 Continue", sock.read(&mut buf))
        .await
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]);
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    sock.write_all(b"hello").await.unwrap();
    let rest =
        String::from_utf8_lossy(&read_until_closed(&mut sock, "the answer").await).into_owned();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert_eq!(body_of(&rest), "got hello", "{rest}");
}

/// curl sends `Expect: 100-continue` for uploads over 1 MiB on HTTP/1.1; with the
/// expect-timeout set to the test's limit, only the server's `100 Continue` lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_100_continue_on_http1() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        stream.write_continue().await?;
        let body = stream.get_body_as_bytes(None).await?;
        stream.write_headers(200, &[], false).await?;
        stream
            .write_chunk(Bytes::from(body.len().to_string()), true)
            .await
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload");
    std::fs::write(&file, vec![b'u'; 2 * 1024 * 1024]).unwrap();
    let out = curl(&[
        "--http1.1",
        "--expect100-timeout",
        "60",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{addr}/"),
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        (2 * 1024 * 1024).to_string(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GOAWAY on demand: a handler asks for its connection to end; on HTTP/1.1 the connection
/// closes after that exchange although the client asked to keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_can_shut_its_connection_down() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        stream.shutdown_connection();
        stream.write_headers(200, &[], false).await?;
        stream.write_chunk("bye".into(), true).await
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut sock = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut sock, "the connection to close").await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(body_of(&got), "bye", "{got}");
}

/// A paused server accepts nothing new; after `resume` the waiting client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume() {
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        stream.write_headers(200, &[], false).await?;
        stream.write_chunk("resumed".into(), true).await
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    server.pause();
    let waiting = tokio::spawn(raw_owned(
        addr.clone(),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(server.connections(), 0);
    server.resume();
    let got = within(LIMIT, "the waiting client", waiting).await.unwrap();
    assert_eq!(body_of(&got), "resumed", "{got}");
}

async fn raw_owned(addr: String, request: &'static [u8]) -> String {
    raw(&addr, request).await
}

/// The upgrade hook serves a WebSocket on the HTTP port: tokio-tungstenite's client
/// handshakes, and a message goes both ways; plain requests on the same port still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_on_the_http_port() {
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
    let server = HttpServer::new(ServerOptions::new(|mut stream: ServerStream| async move {
        let key = stream
            .get_headers()
            .headers
            .get("sec-websocket-key")
            .map(|k| derive_accept_key(k.as_bytes()));
        let Some(accept) = key else {
            stream.write_headers(200, &[], false).await?;
            return stream.write_chunk("plain".into(), true).await;
        };
        let io = stream
            .upgrade(&[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-accept", &accept),
            ])
            .await?;
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                ws.send(Message::text(format!("echo {t}")))
                    .await
                    .map_err(HttpError::handler)?;
            }
        }
        Ok(())
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let tcp = within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let (mut ws, response) = within(
        LIMIT,
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hi")).await.unwrap();
    let back = within(LIMIT, "the echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("echo hi"));
    let plain = raw(
        &addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(body_of(&plain), "plain", "{plain}");
}

/// lua-http's body API on both stream kinds: `get_body_chars`, `get_body_until` (with and
/// without the pattern), `unget`, `save_body_to_file` and `write_body_from_file`, over
/// HTTP/1.1 and HTTP/2, with the peer's chunks split at awkward places.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_http_body_reading_api() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");
    let s = saved.clone();
    let server = HttpServer::new(ServerOptions::new(move |mut stream: ServerStream| {
        let saved = s.clone();
        async move {
            let first = stream.get_body_until(b"\n", false, None).await?.unwrap();
            let second = stream.get_body_until(b"\n", true, None).await?.unwrap();
            let three = stream.get_body_chars(3, None).await?.unwrap();
            stream.unget(b"<").await?;
            let rest = stream.save_body_to_file(&saved, None).await?;
            stream.write_headers(200, &[], false).await?;
            let summary = format!(
                "{}|{}|{}|{rest}",
                String::from_utf8_lossy(&first),
                String::from_utf8_lossy(&second).escape_default(),
                String::from_utf8_lossy(&three),
            );
            stream.write_chunk(summary.into(), false).await?;
            // And a file as the rest of the response.
            stream.write_body_from_file(&saved).await
        }
    }));
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    for http2 in [false, true] {
        let opts = ConnectOptions {
            http2,
            ..Default::default()
        };
        let conn = within(
            LIMIT,
            "connect",
            HttpConnection::connect(&format!("http://{addr}"), opts, None),
        )
        .await
        .unwrap();
        let mut s = conn.new_stream().unwrap();
        s.write_headers("POST", "/", &[], false).await.unwrap();
        for part in ["li", "ne one\nline", " two\nabcdef", "gh"] {
            within(LIMIT, "a chunk", s.write_chunk(part.into(), false))
                .await
                .unwrap();
        }
        s.write_chunk(Bytes::new(), true).await.unwrap();
        let summary = within(LIMIT, "the summary", s.get_body_until(b"|6", true, None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&summary[..], b"line one|line two\\n|abc|6");
        // On the client: chars across chunk boundaries, unget, then the rest.
        let two = s.get_body_chars(2, None).await.unwrap().unwrap();
        assert_eq!(&two[..], b"<d");
        s.unget(b"<d").await.unwrap();
        assert_eq!(
            within(LIMIT, "the rest", s.get_body_as_string(None))
                .await
                .unwrap(),
            "<defgh"
        );
        assert_eq!(s.get_body_chars(1, None).await.unwrap(), None);
        assert_eq!(std::fs::read(&saved).unwrap(), b"<defgh");
    }
}
