//! Transport tests over loopback: TCP, TLS, Unix sockets, WS and WSS.

mod common;

use common::{within, LIMIT};
use futures::{SinkExt, StreamExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether::transport::{
    connect, server_config, ClientTransportConfig, Endpoint, Listener, ListenerOptions,
    TlsClientOptions, Transport, TransportError, TransportKind, SUBPROTOCOL,
};
use tether_wire::FrameError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

const ALL: [TransportKind; 5] = [
    TransportKind::Tcp,
    TransportKind::Tls,
    TransportKind::Unix,
    TransportKind::Ws,
    TransportKind::Wss,
];

/// A self-signed certificate for localhost/127.0.0.1, written to a temp dir.
struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    server: Arc<rustls::ServerConfig>,
}

fn certs() -> Certs {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let server = server_config(&cert, &key).unwrap();
    Certs {
        _dir: dir,
        cert,
        server,
    }
}

/// A listener of `kind` on loopback with its client-side settings.
struct Setup {
    listener: Listener,
    endpoint: Endpoint,
    client: ClientTransportConfig,
    _certs: Certs,
    _dir: tempfile::TempDir,
}

async fn setup(kind: TransportKind, options: ListenerOptions) -> Setup {
    let certs = certs();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("t.sock");
    let bind: Endpoint = match kind {
        TransportKind::Tcp => "jstp://127.0.0.1:0".parse().unwrap(),
        TransportKind::Tls => "jstps://127.0.0.1:0".parse().unwrap(),
        TransportKind::Unix => Endpoint::Unix(sock.clone()),
        TransportKind::Ws => "ws://127.0.0.1:0".parse().unwrap(),
        TransportKind::Wss => "wss://127.0.0.1:0".parse().unwrap(),
    };
    let options = options.with_tls(certs.server.clone());
    let listener = Listener::bind(&bind, &options).await.unwrap();
    assert_eq!(listener.kind(), kind);
    let addr = listener.local_addr();
    let endpoint: Endpoint = match kind {
        TransportKind::Tcp => format!("jstp://{addr}"),
        TransportKind::Tls => format!("jstps://{addr}"),
        TransportKind::Unix => format!("unix:{addr}"),
        TransportKind::Ws => format!("ws://{addr}/any/path"),
        TransportKind::Wss => format!("wss://{addr}/"),
    }
    .parse()
    .unwrap();
    let mut client = ClientTransportConfig::default();
    client.tls.ca_pem = Some(certs.cert.clone());
    Setup {
        listener,
        endpoint,
        client,
        _certs: certs,
        _dir: dir,
    }
}

impl Setup {
    /// Connects a client and accepts it: (client, server).
    async fn pair(&mut self) -> (Transport, Transport) {
        let what = format!("a {:?} connect and its accept", self.listener.kind());
        let (client, server) = within(LIMIT, &what, async {
            tokio::join!(
                connect(&self.endpoint, &self.client),
                self.listener.accept()
            )
        })
        .await;
        (client.unwrap(), server.unwrap().unwrap())
    }

    /// The listener's next accept result; `what` names the connection expected.
    async fn accept(&mut self, what: &str) -> Option<Result<Transport, TransportError>> {
        let what = format!("the {:?} listener to accept {what}", self.listener.kind());
        within(LIMIT, &what, self.listener.accept()).await
    }
}

/// The next item of `t`'s stream; `what` names it (the transport kind is added).
async fn next(t: &mut Transport, what: &str) -> Option<Result<String, TransportError>> {
    let what = format!("{what} ({:?})", t.info.kind);
    within(LIMIT, &what, t.incoming.next()).await
}

async fn recv(t: &mut Transport, what: &str) -> String {
    match next(t, what).await {
        Some(Ok(m)) => m,
        other => panic!("{:?}: expected {what}, got {other:?}", t.info.kind),
    }
}

/// Sends `msg` on `t`, with a deadline naming (the start of) the message.
async fn send(t: &mut Transport, msg: impl Into<String>) -> Result<(), TransportError> {
    let msg = msg.into();
    let what = format!(
        "room to send {}… ({:?})",
        msg.chars().take(32).collect::<String>(),
        t.info.kind
    );
    within(LIMIT, &what, t.outgoing.send(msg)).await
}

/// Closes `t`'s sink, with a deadline; `side` names it.
async fn close(t: &mut Transport, side: &str) -> Result<(), TransportError> {
    let what = format!("the {side}'s {:?} sink to close", t.info.kind);
    within(LIMIT, &what, t.outgoing.close()).await
}

fn big_message(len: usize) -> String {
    // Multi-byte characters exercise UTF-8-safe fragmentation.
    let mut s = String::with_capacity(len + 4);
    s.push_str("{big:'");
    const CHUNK: &str = "0123456789abcdefghijklmnopqrstuvwxyz-é-€-😀";
    while s.len() + CHUNK.len() < len - 2 {
        s.push_str(CHUNK);
    }
    while s.len() < len - 2 {
        s.push('x');
    }
    s.push_str("'}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_both_ways_on_every_transport() {
    for kind in ALL {
        let mut s = setup(kind, ListenerOptions::default()).await;
        let (mut client, mut server) = s.pair().await;
        assert_eq!(client.info.kind, kind);
        assert_eq!(server.info.kind, kind);
        if kind == TransportKind::Unix {
            assert_eq!(client.info.remote_addr, Some(s.listener.local_addr()));
            assert_eq!(server.info.local_addr, Some(s.listener.local_addr()));
        } else {
            assert_eq!(client.info.remote_addr, Some(s.listener.local_addr()));
            assert_eq!(server.info.local_addr, client.info.remote_addr);
            assert_eq!(server.info.remote_addr, client.info.local_addr);
        }

        // Batched writes: feed many, flush once.
        within(LIMIT, "feeding and flushing 500 pings", async {
            for i in 0..500 {
                client
                    .outgoing
                    .feed(format!("{{ping:[{i}]}}"))
                    .await
                    .unwrap();
            }
            client.outgoing.flush().await.unwrap();
        })
        .await;
        for i in 0..500 {
            let what = format!("ping {i} of 500 at the server");
            assert_eq!(recv(&mut server, &what).await, format!("{{ping:[{i}]}}"));
        }
        send(&mut server, "{pong:[1]}").await.unwrap();
        assert_eq!(
            recv(&mut client, "the pong at the client").await,
            "{pong:[1]}"
        );

        // 3 MiB both ways (concurrently, so neither side blocks on a full socket buffer).
        let big = big_message(3 * 1024 * 1024);
        let (sent, got) = tokio::join!(
            send(&mut client, big.clone()),
            recv(&mut server, "3 MiB at the server")
        );
        sent.unwrap();
        assert_eq!(got.len(), big.len(), "{kind:?}");
        assert!(got == big, "{kind:?}: 3 MiB message corrupted");
        let (sent, got) = tokio::join!(
            send(&mut server, big.clone()),
            recv(&mut client, "3 MiB at the client")
        );
        sent.unwrap();
        assert!(got == big, "{kind:?}: 3 MiB message corrupted");

        // Unframeable messages are refused locally.
        assert!(matches!(
            send(&mut client, String::new()).await,
            Err(TransportError::Frame(FrameError::Empty))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_sink_ends_the_peers_stream() {
    for kind in ALL {
        let mut s = setup(kind, ListenerOptions::default()).await;

        // Client closes.
        let (mut client, mut server) = s.pair().await;
        send(&mut client, "{last:1}").await.unwrap();
        close(&mut client, "client").await.unwrap();
        assert_eq!(
            recv(&mut server, "{last:1} at the server").await,
            "{last:1}"
        );
        let end = next(&mut server, "the end of the server's stream").await;
        assert!(end.is_none(), "{kind:?}");
        // The other direction still works until the server closes too (half-close).
        close(&mut server, "server").await.unwrap();
        let end = next(&mut client, "the end of the client's stream").await;
        assert!(end.is_none(), "{kind:?}");

        // Server closes first.
        let (mut client, mut server) = s.pair().await;
        send(&mut server, "{bye:1}").await.unwrap();
        close(&mut server, "server").await.unwrap();
        // The client sees the end and closes its side, as the connection driver does.
        let c = async {
            let first = recv(&mut client, "{bye:1} at the client").await;
            let ended = next(&mut client, "the end of the client's stream")
                .await
                .is_none();
            let closed = close(&mut client, "client").await;
            (first, ended, closed)
        };
        // The server keeps reading until the client's side has finished closing.
        let srv = async {
            next(&mut server, "the end of the server's stream")
                .await
                .is_none()
        };
        let (c, srv) = tokio::join!(c, srv);
        assert_eq!(c.0, "{bye:1}");
        assert!(c.1, "{kind:?}: client stream did not end");
        assert!(c.2.is_ok(), "{kind:?}: {:?}", c.2);
        assert!(srv, "{kind:?}: server stream did not end");
        drop(server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_message_is_a_frame_error() {
    for kind in ALL {
        let options = ListenerOptions::default().with_max_message_size(64 * 1024);
        let mut s = setup(kind, options).await;
        // One frame over the limit (WS: unfragmented) and one fragmented message over it.
        for len in [64 * 1024 + 10, 100 * 1024] {
            let (mut client, mut server) = s.pair().await;
            send(&mut client, "{ok:1}").await.unwrap();
            assert_eq!(recv(&mut server, "{ok:1} at the server").await, "{ok:1}");
            let msg = big_message(len);
            let client_side = tokio::spawn(async move {
                // The server may drop the connection mid-send; that's fine here.
                let _ = client.outgoing.send(msg).await;
                client
            });
            let what = format!("the TooLarge error for {len} bytes");
            match next(&mut server, &what).await {
                Some(Err(TransportError::Frame(FrameError::TooLarge { limit }))) => {
                    assert_eq!(limit, 64 * 1024, "{kind:?}")
                }
                other => panic!("{kind:?}: expected TooLarge, got {other:?}"),
            }
            assert!(
                next(&mut server, "the end of the stream after TooLarge")
                    .await
                    .is_none(),
                "{kind:?}: stream must end"
            );
            drop(server);
            drop(
                within(LIMIT, "the over-long send to end", client_side)
                    .await
                    .unwrap(),
            );
        }
    }
}

#[tokio::test]
async fn client_limit_applies_to_incoming_messages() {
    for kind in ALL {
        let mut s = setup(kind, ListenerOptions::default()).await;
        s.client.max_message_size = 1000;
        let (mut client, mut server) = s.pair().await;
        send(&mut server, big_message(2000)).await.unwrap();
        assert!(
            matches!(
                next(&mut client, "the client's TooLarge error").await,
                Some(Err(TransportError::Frame(FrameError::TooLarge {
                    limit: 1000
                })))
            ),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn nul_framing_errors_reach_the_stream() {
    let mut s = setup(TransportKind::Tcp, ListenerOptions::default()).await;
    let addr = s.listener.local_addr();
    for (bytes, expected) in [
        (&b"{a:1}\0\0"[..], FrameError::Empty),
        (&b"{a:1}\0{b:'\xff'}\0"[..], FrameError::InvalidUtf8),
    ] {
        let mut raw = within(LIMIT, "a raw TCP connect", TcpStream::connect(&addr))
            .await
            .unwrap();
        let mut server = s.accept("the raw peer").await.unwrap().unwrap();
        within(LIMIT, "the raw write", raw.write_all(bytes))
            .await
            .unwrap();
        assert_eq!(recv(&mut server, "{a:1} at the server").await, "{a:1}");
        let what = format!("the {expected:?} error");
        match next(&mut server, &what).await {
            Some(Err(TransportError::Frame(e))) => assert_eq!(e, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
        assert!(
            next(&mut server, "the end of the stream after a framing error")
                .await
                .is_none()
        );
    }
    // Bytes on the wire are exactly message + NUL.
    let mut raw = within(LIMIT, "a raw TCP connect", TcpStream::connect(&addr))
        .await
        .unwrap();
    let mut server = s.accept("the raw peer").await.unwrap().unwrap();
    send(&mut server, "{ping:[1]}").await.unwrap();
    close(&mut server, "server").await.unwrap();
    let mut wire = Vec::new();
    within(
        LIMIT,
        "the server's bytes up to EOF",
        raw.read_to_end(&mut wire),
    )
    .await
    .unwrap();
    assert_eq!(wire, b"{ping:[1]}\0");
}

// ---------------------------------------------------------------------------------------------
// WebSocket specifics.

/// Reads an HTTP response head (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if within(LIMIT, "a byte of the HTTP response head", s.read(&mut byte))
            .await
            .unwrap()
            == 0
        {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn upgrade_request(extra: &str) -> String {
    format!(
        "GET /jstp HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    )
}

async fn http_exchange(addr: &str, request: &str) -> String {
    let mut raw = within(LIMIT, "a raw TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    within(
        LIMIT,
        "the raw HTTP request write",
        raw.write_all(request.as_bytes()),
    )
    .await
    .unwrap();
    read_head(&mut raw).await
}

#[tokio::test]
async fn ws_listener_refuses_non_upgrades_and_missing_subprotocol() {
    let mut s = setup(TransportKind::Ws, ListenerOptions::default()).await;
    let addr = s.listener.local_addr();

    let head = http_exchange(&addr, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(matches!(
        s.accept("a plain GET (refused)").await,
        Some(Err(TransportError::WebSocket(_)))
    ));

    let head = http_exchange(&addr, &upgrade_request("")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(matches!(
        s.accept("an upgrade without a subprotocol (refused)").await,
        Some(Err(TransportError::WebSocket(_)))
    ));

    let head = http_exchange(&addr, &upgrade_request("Sec-WebSocket-Protocol: chat\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(s
        .accept("an upgrade offering only chat (refused)")
        .await
        .unwrap()
        .is_err());

    let head = http_exchange(
        &addr,
        &upgrade_request("Sec-WebSocket-Protocol: chat, metarhia-jstp\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-protocol: metarhia-jstp\r\n"),
        "{head}"
    );
    assert!(
        lower.contains(&format!(
            "sec-websocket-accept: {}\r\n",
            derive_accept_key(KEY.as_bytes()).to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(s
        .accept("an upgrade offering metarhia-jstp")
        .await
        .unwrap()
        .is_ok());

    // The listener keeps going after the refusals.
    let (mut client, mut server) = s.pair().await;
    send(&mut client, "{a:1}").await.unwrap();
    assert_eq!(recv(&mut server, "{a:1} at the server").await, "{a:1}");
}

/// Reads one raw WebSocket frame: (fin, opcode, payload), unmasking client frames.
async fn read_frame(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    let len = match h[1] & 0x7f {
        126 => u64::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mask = if h[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        s.read_exact(&mut m).await.unwrap();
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload).await.unwrap();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    (h[0] & 0x80 != 0, h[0] & 0x0f, payload)
}

/// Reads frames until a whole message has arrived; checks the fragment layout.
async fn read_fragmented_message(s: &mut TcpStream, expect_masked_max: usize) -> (String, usize) {
    let mut data = Vec::new();
    let mut frames = 0;
    loop {
        let what = format!("WebSocket frame {frames} of a fragmented message");
        let (fin, opcode, payload) = within(LIMIT, &what, read_frame(s)).await;
        assert_eq!(opcode, if frames == 0 { 1 } else { 0 }, "frame {frames}");
        assert!(
            payload.len() <= expect_masked_max && payload.len() < 1024 * 1024,
            "frame {frames} has {} bytes",
            payload.len()
        );
        frames += 1;
        data.extend_from_slice(&payload);
        if fin {
            return (String::from_utf8(data).unwrap(), frames);
        }
    }
}

#[tokio::test]
async fn ws_server_fragments_large_messages_below_one_mib() {
    let mut s = setup(TransportKind::Ws, ListenerOptions::default()).await;
    let addr = s.listener.local_addr();
    let mut raw = within(LIMIT, "a raw TCP connect", TcpStream::connect(&addr))
        .await
        .unwrap();
    let request = upgrade_request("Sec-WebSocket-Protocol: metarhia-jstp\r\n");
    within(
        LIMIT,
        "the raw upgrade write",
        raw.write_all(request.as_bytes()),
    )
    .await
    .unwrap();
    let head = read_head(&mut raw).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut server = s.accept("the raw upgrade").await.unwrap().unwrap();

    let big = big_message(3 * 1024 * 1024);
    let send = tokio::spawn(async move {
        server
            .outgoing
            .send(big_message(3 * 1024 * 1024))
            .await
            .unwrap();
        server.outgoing.send("{small:1}".into()).await.unwrap();
        server
    });
    let (got, frames) = read_fragmented_message(&mut raw, 16 * 1024).await;
    assert!(got == big);
    assert!(frames >= 192, "{frames} frames");
    let (fin, opcode, payload) = within(LIMIT, "the {small:1} frame", read_frame(&mut raw)).await;
    assert_eq!((fin, opcode, &payload[..]), (true, 1, &b"{small:1}"[..]));
    let mut server = within(LIMIT, "the server's sends to end", send)
        .await
        .unwrap();
    // Closing sends a close frame with status 1000 (Node reports a bare one as 1006).
    close(&mut server, "server").await.unwrap();
    let (fin, opcode, payload) = within(LIMIT, "the Close frame", read_frame(&mut raw)).await;
    assert_eq!(
        (fin, opcode, &payload[..]),
        (true, 8, &1000u16.to_be_bytes()[..])
    );
}

/// The Sec-WebSocket-Key of a request head.
fn ws_key(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .expect("request has a Sec-WebSocket-Key")
}

#[tokio::test]
async fn ws_client_fragments_and_requires_the_subprotocol() {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    // Every await here is under the deadline on joining this task.
    let server = tokio::spawn(async move {
        // First connection: accept the upgrade properly and read a fragmented message.
        let (mut raw, _) = tcp.accept().await.unwrap();
        let head = read_head(&mut raw).await;
        assert!(
            head.contains("metarhia-jstp"),
            "client must offer the subprotocol: {head}"
        );
        let accept = derive_accept_key(ws_key(&head).as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
        );
        raw.write_all(response.as_bytes()).await.unwrap();
        let (got, frames) = read_fragmented_message(&mut raw, 1000).await;

        // Second connection: answer 101 without the subprotocol.
        let (mut raw2, _) = tcp.accept().await.unwrap();
        let head = read_head(&mut raw2).await;
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(ws_key(&head).as_bytes())
        );
        raw2.write_all(response.as_bytes()).await.unwrap();
        (got, frames, raw)
    });

    let endpoint: Endpoint = format!("ws://{addr}/").parse().unwrap();
    let config = ClientTransportConfig {
        ws_fragment_size: 1000,
        ..Default::default()
    };
    let mut client = within(
        LIMIT,
        "the WS client's connect",
        connect(&endpoint, &config),
    )
    .await
    .unwrap();
    let big = big_message(3 * 1024 * 1024);
    send(&mut client, big.clone()).await.unwrap();
    let err = within(
        LIMIT,
        "the WS connect answered without the subprotocol to fail",
        connect(&endpoint, &config),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::WebSocket(_)), "{err:?}");
    let (got, frames, _raw) = within(LIMIT, "the raw WS server to read the message", server)
        .await
        .unwrap();
    assert!(got == big);
    assert!(frames >= 3 * 1024 * 1024 / 1000, "{frames} frames");
}

#[tokio::test]
async fn ws_accepts_binary_messages_and_answers_pings() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let mut s = setup(TransportKind::Ws, ListenerOptions::default()).await;
    let addr = s.listener.local_addr();
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
    let tcp = within(LIMIT, "a raw TCP connect", TcpStream::connect(&addr))
        .await
        .unwrap();
    let (ws, server) = within(LIMIT, "a tungstenite connect and its accept", async {
        tokio::join!(
            tokio_tungstenite::client_async(request, tcp),
            s.listener.accept()
        )
    })
    .await;
    let (mut ws, _) = ws.unwrap();
    let mut server = server.unwrap().unwrap();

    within(LIMIT, "tungstenite's sends", async {
        ws.send(Message::binary(b"{a:1}".to_vec())).await.unwrap();
        ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
        ws.send(Message::text("{b:2}")).await.unwrap();
    })
    .await;
    assert_eq!(recv(&mut server, "the binary {a:1}").await, "{a:1}");
    // Reading on (as the driver does) answers the ping.
    assert_eq!(recv(&mut server, "the text {b:2}").await, "{b:2}");
    match within(LIMIT, "the pong at tungstenite", ws.next())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Pong(p) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // Invalid UTF-8 in a binary message is a frame error.
    within(
        LIMIT,
        "tungstenite's invalid UTF-8 send",
        ws.send(Message::binary(vec![0xff, 0xfe])),
    )
    .await
    .unwrap();
    assert!(matches!(
        next(&mut server, "the InvalidUtf8 error").await,
        Some(Err(TransportError::Frame(FrameError::InvalidUtf8)))
    ));
    assert!(next(&mut server, "the end of the stream after InvalidUtf8")
        .await
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// Listener behaviour.

#[tokio::test]
async fn idle_connection_does_not_block_accept() {
    for kind in [TransportKind::Tls, TransportKind::Ws, TransportKind::Wss] {
        let mut s = setup(kind, ListenerOptions::default()).await;
        // Connects and sends nothing: its handshake stays pending.
        let _idle = within(
            LIMIT,
            "an idle TCP connect",
            TcpStream::connect(s.listener.local_addr()),
        )
        .await
        .unwrap();
        let (mut client, mut server) = s.pair().await;
        assert_eq!(server.info.remote_addr, client.info.local_addr, "{kind:?}");
        send(&mut client, "{a:1}").await.unwrap();
        assert_eq!(recv(&mut server, "{a:1} at the server").await, "{a:1}");
    }
}

#[tokio::test]
async fn handshake_timeout_reports_an_error_and_listener_continues() {
    let options = ListenerOptions {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let mut s = setup(TransportKind::Wss, options).await;
    let _idle = within(
        LIMIT,
        "an idle TCP connect",
        TcpStream::connect(s.listener.local_addr()),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.accept("the idle peer (to time out after 200 ms)").await,
        Some(Err(TransportError::Timeout(_)))
    ));
    let (mut client, mut server) = s.pair().await;
    send(&mut server, "{a:1}").await.unwrap();
    assert_eq!(recv(&mut client, "{a:1} at the client").await, "{a:1}");
}

#[tokio::test]
async fn tls_trust_is_required_and_checked() {
    for kind in [TransportKind::Tls, TransportKind::Wss] {
        let mut s = setup(kind, ListenerOptions::default()).await;

        // No trust anchors configured: fails before connecting.
        let none = ClientTransportConfig::default();
        assert!(matches!(
            within(
                LIMIT,
                "a connect without trust anchors to fail",
                connect(&s.endpoint, &none)
            )
            .await,
            Err(TransportError::Tls(_))
        ));

        // A different CA: the handshake fails on both sides; the listener keeps going.
        let other = certs();
        let mut wrong = ClientTransportConfig::default();
        wrong.tls.ca_pem = Some(other.cert.clone());
        let (client, server) = within(LIMIT, "a connect trusting the wrong CA", async {
            tokio::join!(connect(&s.endpoint, &wrong), s.listener.accept())
        })
        .await;
        assert!(matches!(client, Err(TransportError::Tls(_))), "{client:?}");
        assert!(
            matches!(server, Some(Err(TransportError::Tls(_)))),
            "{server:?}"
        );

        // Insecure accepts anything; a server name override is checked against the cert.
        let mut insecure = ClientTransportConfig::default();
        insecure.tls = TlsClientOptions {
            insecure: true,
            ..Default::default()
        };
        let (client, server) = within(LIMIT, "an insecure connect and its accept", async {
            tokio::join!(connect(&s.endpoint, &insecure), s.listener.accept())
        })
        .await;
        client.unwrap();
        server.unwrap().unwrap();

        s.client.tls.server_name = Some("localhost".into());
        let (mut client, mut server) = s.pair().await;
        send(&mut client, "{a:1}").await.unwrap();
        assert_eq!(recv(&mut server, "{a:1} at the server").await, "{a:1}");
    }
}

#[tokio::test]
async fn tls_listener_requires_a_certificate() {
    let err = Listener::bind(
        &"jstps://127.0.0.1:0".parse().unwrap(),
        &ListenerOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn unix_socket_file_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let endpoint = Endpoint::Unix(path.clone());

    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let mut listener = Listener::bind(&endpoint, &ListenerOptions::default())
        .await
        .unwrap();
    assert_eq!(listener.local_addr(), path.display().to_string());

    // A live one is not.
    let err = Listener::bind(&endpoint, &ListenerOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Io(ref e) if e.kind() == std::io::ErrorKind::AddrInUse));

    // Close: accept ends, the file goes away.
    listener.close();
    assert!(
        within(LIMIT, "accept to end after close", listener.accept())
            .await
            .is_none()
    );
    assert!(!path.exists());

    // A regular file is never removed.
    std::fs::write(&path, b"data").unwrap();
    assert!(Listener::bind(&endpoint, &ListenerOptions::default())
        .await
        .is_err());
    assert!(path.exists());

    // Drop removes the file too.
    std::fs::remove_file(&path).unwrap();
    let listener = Listener::bind(&endpoint, &ListenerOptions::default())
        .await
        .unwrap();
    drop(listener);
    assert!(!path.exists());
}

#[tokio::test]
async fn accept_returns_none_after_close() {
    let mut s = setup(TransportKind::Tcp, ListenerOptions::default()).await;
    s.listener.close();
    assert!(s.accept("nothing after close").await.is_none());
    s.listener.close();
}

#[tokio::test]
async fn connect_errors() {
    // Nothing listens on the port of a just-closed listener.
    let s = setup(TransportKind::Tcp, ListenerOptions::default()).await;
    let endpoint = s.endpoint.clone();
    drop(s);
    assert!(matches!(
        within(
            LIMIT,
            "a connect to a closed port to fail",
            connect(&endpoint, &ClientTransportConfig::default())
        )
        .await,
        Err(TransportError::Io(_))
    ));
    // A TCP peer that never answers the WS handshake hits the connect timeout.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint: Endpoint = format!("ws://{}/", tcp.local_addr().unwrap())
        .parse()
        .unwrap();
    let config = ClientTransportConfig {
        connect_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    assert!(matches!(
        within(
            LIMIT,
            "the 200 ms WS connect timeout",
            connect(&endpoint, &config)
        )
        .await,
        Err(TransportError::Timeout(_))
    ));
}
