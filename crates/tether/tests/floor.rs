//! The network floor (`tether::transport::{StreamListener, dial}`) with real sockets: caps,
//! fair eviction of pending handshakes, one deadline over TLS and the caller's upgrade, server
//! name and ALPN on dial, stale Unix sockets, shutdown; the conductor server on the floor; and
//! RFC 6455 close codes for WebSocket protocol violations, sent as raw frames.

mod common;

use common::{within, LIMIT};
use futures::{SinkExt, StreamExt};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tether::conductor::{ConductorConnection, ConductorOptions, ConductorServer, Value};
use tether::transport::{
    dial, server_config_from_der, ByteStream, DialOptions, FloorError, ListenOptions,
    ListenerOptions, StreamEndpoint, StreamListener, TlsClientOptions,
};
use tether::{Application, Endpoint, Interface, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

fn localhost() -> StreamEndpoint {
    StreamEndpoint::tcp("127.0.0.1", 0)
}

fn bound(listener: &StreamListener<impl Send>) -> StreamEndpoint {
    StreamEndpoint::parse_host_port(&listener.local_addr()).unwrap()
}

/// Reads until the peer closes; `true` if it did (EOF or reset) rather than sending bytes.
async fn closed_by_peer(mut s: impl AsyncReadExt + Unpin, what: &str) -> bool {
    let mut buf = [0u8; 64];
    match within(LIMIT, what, s.read(&mut buf)).await {
        Ok(0) => true,
        Ok(_) => false,
        // A reset, or (through TLS) a close without close_notify.
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ),
    }
}

async fn accept<T: Send + 'static>(l: &mut StreamListener<T>, what: &str) -> T {
    within(LIMIT, what, l.accept())
        .await
        .expect("listener open")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[tokio::test]
async fn per_ip_cap_refuses_the_excess_until_a_slot_frees() {
    let options = ListenOptions::builder().max_connections_per_ip(2).build();
    let mut l = StreamListener::bind(&localhost(), &options).await.unwrap();
    let addr = l.local_addr();
    let c1 = within(LIMIT, "connect 1", TcpStream::connect(&addr))
        .await
        .unwrap();
    let s1 = accept(&mut l, "the first connection").await;
    let _c2 = within(LIMIT, "connect 2", TcpStream::connect(&addr))
        .await
        .unwrap();
    let _s2 = accept(&mut l, "the second connection").await;
    assert_eq!(s1.peer().remote_ip, Some("127.0.0.1".parse().unwrap()));
    // The third from the same address is closed at once, never handed out.
    let c3 = within(LIMIT, "connect 3", TcpStream::connect(&addr))
        .await
        .unwrap();
    assert!(closed_by_peer(c3, "the third connection to be refused").await);
    // Dropping an accepted stream frees its slot.
    drop(s1);
    assert!(closed_by_peer(c1, "the first connection's end").await);
    let mut c4 = within(LIMIT, "connect 4", TcpStream::connect(&addr))
        .await
        .unwrap();
    let mut s4 = accept(&mut l, "the fourth connection, in the freed slot").await;
    c4.write_all(b"hi").await.unwrap();
    let mut got = [0u8; 2];
    within(LIMIT, "bytes on the fourth", s4.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"hi");
}

#[tokio::test]
async fn total_cap_applies_to_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cap.sock");
    let options = ListenOptions::builder().max_connections(1).build();
    let mut l = StreamListener::bind(&StreamEndpoint::Unix(path.clone()), &options)
        .await
        .unwrap();
    let _c1 = within(LIMIT, "connect 1", UnixStream::connect(&path))
        .await
        .unwrap();
    let _s1 = accept(&mut l, "the first connection").await;
    let c2 = within(LIMIT, "connect 2", UnixStream::connect(&path))
        .await
        .unwrap();
    assert!(closed_by_peer(c2, "the second connection to be refused").await);
}

#[tokio::test]
async fn full_pending_handshakes_evict_the_oldest() {
    let options = ListenOptions::builder()
        .max_pending_handshakes(2)
        .handshake_timeout(Duration::from_secs(600))
        .build();
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    // The upgrade waits for one byte: a silent client stays pending.
    let upgrade = move |mut s: ByteStream| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, io::Error>(s)
        }
    };
    let mut l = StreamListener::bind_with(&localhost(), &options, upgrade)
        .await
        .unwrap();
    let addr = l.local_addr();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(
            within(LIMIT, "a connect", TcpStream::connect(&addr))
                .await
                .unwrap(),
        );
        within(LIMIT, "the handshake to start", started.recv())
            .await
            .unwrap_or_else(|| panic!("handshake {i}"));
    }
    let mut third = clients.pop().unwrap();
    let mut second = clients.pop().unwrap();
    let first = clients.pop().unwrap();
    assert!(closed_by_peer(first, "the oldest pending handshake to be evicted").await);
    // The other two are still pending and finish when they speak.
    second.write_all(b"x").await.unwrap();
    third.write_all(b"y").await.unwrap();
    accept(&mut l, "the second handshake").await;
    accept(&mut l, "the third handshake").await;
}

struct Cert {
    der: rustls_pki_types::CertificateDer<'static>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    pem_dir: tempfile::TempDir,
}

/// A self-signed certificate for `example.test` only (not for 127.0.0.1).
fn example_cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
    let pem_dir = tempfile::tempdir().unwrap();
    std::fs::write(pem_dir.path().join("ca.pem"), ck.cert.pem()).unwrap();
    Cert {
        der: ck.cert.der().clone(),
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()),
        pem_dir,
    }
}

fn trust(cert: &Cert, name: Option<&str>) -> TlsClientOptions {
    TlsClientOptions {
        ca_pem: Some(cert.pem_dir.path().join("ca.pem")),
        server_name: name.map(str::to_owned),
        ..Default::default()
    }
}

#[tokio::test]
async fn dial_honours_server_name_and_alpn() {
    let cert = example_cert();
    let config = server_config_from_der(vec![cert.der.clone()], cert.key.clone_key()).unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let options = ListenOptions::builder().tls(Arc::new(config)).build();
    let mut l = StreamListener::bind(&localhost(), &options).await.unwrap();
    let endpoint = bound(&l);

    // The certificate does not name 127.0.0.1: checked against the host, the dial fails.
    let by_host = DialOptions::builder().tls(trust(&cert, None)).build();
    let err = within(
        LIMIT,
        "a dial checked against the host",
        dial(&endpoint, &by_host),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FloorError::TlsHandshake(_)), "{err:?}");
    let failed = within(LIMIT, "the server side of the failed handshake", l.accept())
        .await
        .unwrap();
    assert!(
        matches!(failed, Err(FloorError::TlsHandshake(_))),
        "{failed:?}"
    );

    // With the server name set, it succeeds, and ALPN agrees on h2.
    let named = DialOptions::builder()
        .tls(trust(&cert, Some("example.test")))
        .alpn(["http/1.1".as_bytes(), "h2".as_bytes()])
        .build();
    let mut client = within(
        LIMIT,
        "a dial with the server name",
        dial(&endpoint, &named),
    )
    .await
    .unwrap();
    let mut server = accept(&mut l, "the TLS connection").await;
    assert!(client.peer().tls && server.peer().tls);
    assert_eq!(client.peer().alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(server.peer().alpn.as_deref(), Some(&b"h2"[..]));
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0u8; 4];
    within(LIMIT, "bytes over TLS", server.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"ping");
}

#[tokio::test]
async fn one_deadline_covers_tls_and_the_upgrade() {
    let cert = example_cert();
    let tls = server_config_from_der(vec![cert.der.clone()], cert.key.clone_key()).unwrap();
    let options = ListenOptions::builder()
        .tls(tls)
        .handshake_timeout(Duration::from_millis(300))
        .build();
    // The upgrade wants one line.
    let upgrade = |s: ByteStream| async move {
        let mut line = String::new();
        let mut r = BufReader::new(s);
        r.read_line(&mut line).await?;
        Ok::<_, io::Error>(line)
    };
    let mut l = StreamListener::bind_with(&localhost(), &options, upgrade)
        .await
        .unwrap();
    let endpoint = bound(&l);
    // Silent before TLS.
    let silent = within(
        LIMIT,
        "a silent connect",
        TcpStream::connect(l.local_addr()),
    )
    .await
    .unwrap();
    // TLS done, upgrade never sent.
    let named = DialOptions::builder()
        .tls(trust(&cert, Some("example.test")))
        .build();
    let half = within(LIMIT, "a TLS dial", dial(&endpoint, &named))
        .await
        .unwrap();
    for _ in 0..2 {
        let timed_out = within(LIMIT, "a handshake deadline", l.accept())
            .await
            .unwrap();
        assert!(
            matches!(timed_out, Err(FloorError::Timeout { .. })),
            "{timed_out:?}"
        );
    }
    assert!(closed_by_peer(silent, "the silent socket to be cut").await);
    assert!(closed_by_peer(half, "the half-upgraded socket to be cut").await);
    // A client that speaks gets through.
    let mut ok = within(LIMIT, "a TLS dial", dial(&endpoint, &named))
        .await
        .unwrap();
    ok.write_all(b"hello\n").await.unwrap();
    ok.flush().await.unwrap();
    assert_eq!(accept(&mut l, "the upgraded connection").await, "hello\n");
}

#[tokio::test]
async fn stale_unix_socket_is_replaced_only_when_dead() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let unix = StreamEndpoint::Unix(path.clone());
    // A dead socket file (its listener gone, the file left behind).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut live = StreamListener::bind(&unix, &ListenOptions::default())
        .await
        .unwrap();
    // A live one is refused and keeps serving.
    let err = StreamListener::bind(&unix, &ListenOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FloorError::Io { source, .. } if source.kind() == io::ErrorKind::AddrInUse),
        "{err:?}"
    );
    // Its liveness probe reached the live listener as a connection that closes at once.
    let mut probe = accept(&mut live, "the liveness probe").await;
    let mut none = [0u8; 1];
    assert_eq!(
        within(LIMIT, "the probe's end", probe.read(&mut none))
            .await
            .unwrap(),
        0
    );
    let mut c = within(LIMIT, "a connect", dial(&unix, &DialOptions::default()))
        .await
        .unwrap();
    let mut s = accept(&mut live, "a connection on the live socket").await;
    c.write_all(b"ok").await.unwrap();
    let mut got = [0u8; 2];
    within(LIMIT, "bytes over unix", s.read_exact(&mut got))
        .await
        .unwrap();
    // Shutdown removes the file; a regular file at the path is never removed.
    live.shutdown();
    assert!(within(LIMIT, "accept after shutdown", live.accept())
        .await
        .is_none());
    assert!(!path.exists());
    std::fs::write(&path, b"data").unwrap();
    let err = StreamListener::bind(&unix, &ListenOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FloorError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test]
async fn dial_deadline_and_errors_keep_their_kind() {
    // Nobody listens on a port we just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = within(
        LIMIT,
        "a refused dial",
        dial(
            &StreamEndpoint::tcp("127.0.0.1", port),
            &DialOptions::default(),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, FloorError::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    // A TLS peer that never answers the ClientHello runs into the dial deadline.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = mute.local_addr().unwrap();
    let options = DialOptions::builder()
        .connect_timeout(Duration::from_millis(200))
        .tls(TlsClientOptions {
            insecure: true,
            ..Default::default()
        })
        .build();
    let err = within(
        LIMIT,
        "a dial to a mute TLS peer",
        dial(&StreamEndpoint::tcp("127.0.0.1", addr.port()), &options),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FloorError::Timeout { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// The conductor server on the floor.

fn conductor() -> ConductorServer {
    ConductorServer::builder()
        .handler("answer", |_| async { Ok(Value::from(42)) })
        .build()
}

#[tokio::test]
async fn conductor_slowloris_is_cut_while_a_client_gets_answers() {
    let server = conductor();
    let options = ListenOptions::builder()
        .handshake_timeout(Duration::from_millis(500))
        .build();
    let addr = within(LIMIT, "listen", server.listen_with("127.0.0.1:0", &options))
        .await
        .unwrap();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = within(LIMIT, "a slow connect", TcpStream::connect(&addr))
            .await
            .unwrap();
        // Half a request head, never finished.
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    let conn = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    within(LIMIT, "a normal client to open", conn.open(None))
        .await
        .unwrap();
    let answer = within(LIMIT, "an answer", conn.request("answer", Value::Nil, None))
        .await
        .unwrap();
    assert_eq!(answer, Value::from(42));
    for s in slow {
        assert!(closed_by_peer(s, "a slowloris socket to be cut").await);
    }
    // Still answering afterwards.
    let answer = within(LIMIT, "an answer", conn.request("answer", Value::Nil, None))
        .await
        .unwrap();
    assert_eq!(answer, Value::from(42));
}

#[tokio::test]
async fn conductor_shutdown_closes_clients_and_stops_accepting() {
    let server = conductor();
    let addr = within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let (mut ws, _) = within(LIMIT, "a WebSocket client", async {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp).await
    })
    .await
    .unwrap();
    within(LIMIT, "the connected event", events.recv())
        .await
        .unwrap();
    server.shutdown();
    let close = loop {
        match within(LIMIT, "the server's close frame", ws.next()).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1001);
    let _ = ws.close(None).await;
    // The listener goes away: connects are refused (retried until the socket is closed).
    within(LIMIT, "connects to be refused after shutdown", async {
        loop {
            match TcpStream::connect(&addr).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                _ => tokio::task::yield_now().await,
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// RFC 6455 close codes from a JSTP WebSocket listener.

async fn jstp_ws_server() -> (Server, String) {
    let app = Application::new("testApp", "1.0.0").unwrap().interface(
        "math",
        Interface::new().method("one", |_c, _a| async { Ok(tether::Value::from(1)) }),
    );
    let server = Server::builder()
        .application(app)
        .listener_options(ListenerOptions::default().with_max_message_size(1024))
        .build()
        .unwrap();
    let endpoint: Endpoint = "ws://127.0.0.1:0".parse().unwrap();
    let addr = within(LIMIT, "the ws listener", server.listen(endpoint))
        .await
        .unwrap();
    (server, addr)
}

/// A raw client after a successful upgrade.
async fn raw_ws(addr: &str) -> TcpStream {
    let mut s = within(LIMIT, "a connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: metarhia-jstp\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        within(LIMIT, "the upgrade response", s.read_exact(&mut b))
            .await
            .unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8];
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The status code of the server's close frame (frames before it are skipped); `None` if the
/// connection ends without one.
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut h = [0u8; 2];
        within(LIMIT, "a frame from the server", s.read_exact(&mut h))
            .await
            .ok()?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).await.unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => panic!("unexpectedly long frame"),
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        within(LIMIT, "a frame's payload", s.read_exact(&mut payload))
            .await
            .unwrap();
        if h[0] & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "close frame without a code");
            return Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test]
async fn websocket_violations_close_with_rfc6455_codes() {
    let (_server, addr) = jstp_ws_server().await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("an unmasked frame", vec![0x81, 0x01, b'a'], 1002),
        ("a reserved bit", frame(0xC1, b"a"), 1002),
        ("a reserved opcode", frame(0x83, b"a"), 1002),
        ("a continuation without a start", frame(0x80, b"a"), 1002),
        ("a fragmented ping", frame(0x09, b"a"), 1002),
        (
            "invalid UTF-8 in a text message",
            frame(0x81, &[0xC3, 0x28]),
            1007,
        ),
        (
            "a binary message that is not UTF-8",
            frame(0x82, &[0xFF, 0xFE]),
            1007,
        ),
        // Header of a 2048-byte frame, over the 1024-byte limit.
        (
            "a frame over the size limit",
            vec![0x81, 0x80 | 126, 0x08, 0x00, 1, 2, 3, 4],
            1009,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, bytes, expected) in cases {
        let mut s = raw_ws(&addr).await;
        s.write_all(&bytes).await.unwrap();
        let got = close_code(&mut s).await;
        if got != Some(expected) {
            wrong.push(format!("{what}: expected {expected}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // A normal close still gets 1000 back.
    let mut s = raw_ws(&addr).await;
    s.write_all(&frame(0x88, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut s).await, Some(1000), "a normal close");
}

#[tokio::test]
async fn jstp_listener_caps_hold_for_the_transports_life() {
    use tether::transport::{connect, ClientTransportConfig, Listener};
    let options = ListenerOptions {
        max_connections_per_ip: 1,
        ..Default::default()
    };
    let endpoint: Endpoint = "jstp://127.0.0.1:0".parse().unwrap();
    let mut l = Listener::bind(&endpoint, &options).await.unwrap();
    let endpoint: Endpoint = format!("jstp://{}", l.local_addr()).parse().unwrap();
    let config = ClientTransportConfig::default();
    let _c1 = within(LIMIT, "connect 1", connect(&endpoint, &config))
        .await
        .unwrap();
    let s1 = within(LIMIT, "accept 1", l.accept())
        .await
        .unwrap()
        .unwrap();
    // Over the cap: closed at once, so its stream ends.
    let mut c2 = within(LIMIT, "connect 2", connect(&endpoint, &config))
        .await
        .unwrap();
    let end = within(LIMIT, "the refused connection's end", c2.incoming.next()).await;
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    // The slot is the transport's: dropping it lets the next one in.
    drop(s1);
    let mut c3 = within(LIMIT, "connect 3", connect(&endpoint, &config))
        .await
        .unwrap();
    let mut s3 = within(LIMIT, "accept 3", l.accept())
        .await
        .unwrap()
        .unwrap();
    within(LIMIT, "send", c3.outgoing.send("{a:1}".to_owned()))
        .await
        .unwrap();
    let got = within(LIMIT, "receive", s3.incoming.next()).await;
    assert_eq!(got.unwrap().unwrap(), "{a:1}");
}
