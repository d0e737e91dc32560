//! Bad input from a peer, over real sockets: each case gets upstream's reply or a close, a typed
//! error or event on our side, and no effect on a well-behaved client connected alongside.

mod common;

use common::{within, LIMIT};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::transport::ListenerOptions;
use tether::{
    connect, ClientOptions, Connection, ConnectionEvent, Error, Server, ServerEvent, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The server's message size limit.
const MAX_SIZE: usize = 4096;

struct Setup {
    server: Server,
    tcp: String,
    ws: String,
    events: broadcast::Receiver<ServerEvent>,
    /// A well-behaved client, connected before any bad input arrives.
    good: Connection,
}

async fn setup(handshake_timeout: Duration) -> Setup {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .handshake_timeout(handshake_timeout)
        .listener_options(ListenerOptions::default().with_max_message_size(MAX_SIZE))
        .build()
        .unwrap();
    chat.bind(&server);
    let events = server.events();
    let tcp = within(
        LIMIT,
        "the TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let ws = within(
        LIMIT,
        "the WS listener",
        server.listen("ws://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let good = within(
        LIMIT,
        "the well-behaved client's handshake",
        connect(
            &format!("jstp://{tcp}"),
            "testApp",
            ClientOptions::default().no_reconnect(),
        ),
    )
    .await
    .unwrap();
    Setup {
        server,
        tcp,
        ws,
        events,
        good,
    }
}

impl Setup {
    /// The well-behaved client still works.
    async fn good_still_works(&self) {
        assert_eq!(
            within(
                LIMIT,
                "the well-behaved client's calculator.answer",
                self.good.call("calculator", "answer", vec![])
            )
            .await
            .unwrap(),
            vec![Value::from(42)]
        );
        let session = self.good.session_id();
        assert!(self
            .server
            .clients()
            .iter()
            .any(|c| c.session_id() == session));
    }

    /// The next connection error the server reports.
    async fn connection_error(&mut self) -> String {
        let wait = async {
            loop {
                if let ServerEvent::ConnectionError { error, .. } =
                    self.events.recv().await.unwrap()
                {
                    return error;
                }
            }
        };
        within(LIMIT, "a ConnectionError server event", wait).await
    }
}

/// Writes `bytes` on a raw TCP connection and returns everything read until the server closes.
async fn raw_tcp(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut sock = within(LIMIT, "a raw TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    within(LIMIT, "the raw write", sock.write_all(bytes))
        .await
        .unwrap();
    let mut got = Vec::new();
    within(LIMIT, "the server to close the raw connection", async {
        let mut buf = [0u8; 4096];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

fn frames(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

const HANDSHAKE: &[u8] = b"{handshake:[0,'testApp']}\0";

/// Handshakes on a raw TCP connection, sends `bytes`, and returns the first `n` frames that
/// come back (the handshake answer first), failing if the server closes before.
async fn handshake_then(addr: &str, bytes: &[u8], n: usize) -> Vec<String> {
    let mut sock = within(LIMIT, "a raw TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    within(LIMIT, "the raw handshake and bytes to be written", async {
        sock.write_all(HANDSHAKE).await.unwrap();
        sock.write_all(bytes).await.unwrap();
    })
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while frames(&got).len() < n {
        let what = format!("reply frame {} of {n}", frames(&got).len() + 1);
        let read = within(LIMIT, &what, sock.read(&mut buf)).await.unwrap();
        assert!(read > 0, "closed early: {:?}", frames(&got));
        got.extend_from_slice(&buf[..read]);
    }
    frames(&got)
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    let mut s = setup(Duration::from_secs(3)).await;
    let mut bytes = HANDSHAKE.to_vec();
    bytes.extend_from_slice(b"}}}not a record{{{\0");
    let got = frames(&raw_tcp(&s.tcp, &bytes).await);
    // The handshake was answered, then the connection closed with nothing more.
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("{handshake:[0],ok:'"), "{got:?}");
    assert!(s.connection_error().await.contains("invalid message"));
    s.good_still_works().await;
}

#[tokio::test]
async fn a_message_before_the_handshake_closes_without_an_answer() {
    let mut s = setup(Duration::from_secs(3)).await;
    let got = raw_tcp(&s.tcp, b"{call:[1,'calculator'],answer:[]}\0").await;
    assert!(got.is_empty(), "{:?}", frames(&got));
    assert!(s.connection_error().await.contains("before handshake"));
    s.good_still_works().await;
}

#[tokio::test]
async fn an_over_long_message_closes_only_that_connection() {
    let mut s = setup(Duration::from_secs(3)).await;
    // No NUL within the limit: the framer gives up at MAX_SIZE bytes.
    let got = raw_tcp(&s.tcp, &vec![b'x'; MAX_SIZE * 2]).await;
    assert!(got.is_empty());
    let error = s.connection_error().await;
    assert!(
        error.contains("framing") || error.contains("too"),
        "{error}"
    );
    s.good_still_works().await;

    // Over WebSocket: one text message over the limit.
    let mut request = format!("ws://{}/", s.ws).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "metarhia-jstp".parse().unwrap());
    let sock = within(LIMIT, "a raw TCP connect", TcpStream::connect(&s.ws))
        .await
        .unwrap();
    let (mut ws, _) = within(
        LIMIT,
        "the WS upgrade",
        tokio_tungstenite::client_async(request, sock),
    )
    .await
    .unwrap();
    within(
        LIMIT,
        "the WS handshake send",
        ws.send(WsMessage::text("{handshake:[0,'testApp']}")),
    )
    .await
    .unwrap();
    let answer = within(LIMIT, "the WS handshake reply", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert!(answer.to_text().unwrap().starts_with("{handshake:[0],ok:"));
    let long = format!(
        "{{call:[1,'someService'],say:['{}']}}",
        "y".repeat(MAX_SIZE * 2)
    );
    // The server may close mid-send; either way it must close.
    let _ = within(
        LIMIT,
        "the over-long WS send",
        ws.send(WsMessage::text(long)),
    )
    .await;
    within(
        LIMIT,
        "the server to close the WS connection after the over-long message",
        async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                    Some(Ok(other)) => assert!(!other.is_text(), "answered: {other:?}"),
                }
            }
        },
    )
    .await;
    s.good_still_works().await;
}

#[tokio::test]
async fn invalid_utf8_closes_the_connection() {
    let mut s = setup(Duration::from_secs(3)).await;
    let mut bytes = HANDSHAKE.to_vec();
    bytes.extend_from_slice(b"{event:[1,'chat'],send:['\xff\xfe']}\0");
    let got = frames(&raw_tcp(&s.tcp, &bytes).await);
    assert_eq!(got.len(), 1, "{got:?}");
    let error = s.connection_error().await;
    assert!(error.contains("UTF-8") || error.contains("utf"), "{error}");
    s.good_still_works().await;
}

#[tokio::test]
async fn unknown_kinds_are_rejected_and_the_connection_stays() {
    let s = setup(Duration::from_secs(3)).await;
    let got = handshake_then(
        &s.tcp,
        b"{frobnicate:[1],x:[]}\0{call:[2,'calculator'],answer:[]}\0",
        2,
    )
    .await;
    assert!(got[0].starts_with("{handshake:[0],ok:"));
    // The unknown message got no answer; the call after it did.
    assert_eq!(got[1], "{callback:[2],ok:[42]}");
    s.good_still_works().await;
}

#[tokio::test]
async fn non_array_arguments_get_invalid_signature() {
    let s = setup(Duration::from_secs(3)).await;
    let got = handshake_then(&s.tcp, b"{call:[1,'calculator'],divide:{a:1}}\0", 2).await;
    assert_eq!(got[1], "{callback:[1],error:[17]}");
    s.good_still_works().await;
}

#[tokio::test]
async fn a_second_handshake_closes_the_connection() {
    let mut s = setup(Duration::from_secs(3)).await;
    let mut bytes = HANDSHAKE.to_vec();
    bytes.extend_from_slice(HANDSHAKE);
    let got = frames(&raw_tcp(&s.tcp, &bytes).await);
    assert_eq!(
        got.len(),
        1,
        "only the first handshake is answered: {got:?}"
    );
    assert!(s.connection_error().await.contains("second handshake"));
    s.good_still_works().await;
}

#[tokio::test]
async fn a_client_that_never_handshakes_is_closed_after_the_timeout() {
    let mut s = setup(Duration::from_millis(200)).await;
    let silent = within(LIMIT, "a raw TCP connect", TcpStream::connect(&s.tcp))
        .await
        .unwrap();
    let timed_out = async {
        loop {
            if let ServerEvent::HandshakeTimeout(c) = s.events.recv().await.unwrap() {
                return c;
            }
        }
    };
    let conn = within(LIMIT, "the HandshakeTimeout server event", timed_out).await;
    within(LIMIT, "the timed-out connection to close", conn.closed()).await;
    let mut silent = silent;
    let mut buf = [0u8; 16];
    assert_eq!(
        within(LIMIT, "EOF on the silent socket", silent.read(&mut buf))
            .await
            .unwrap(),
        0,
        "not closed"
    );
    s.good_still_works().await;
}

#[tokio::test]
async fn plain_http_on_the_websocket_port_gets_400() {
    let s = setup(Duration::from_secs(3)).await;
    let got = raw_tcp(
        &s.ws,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    s.good_still_works().await;
}

/// Our client facing a server that turns bad: pending calls end with a typed error, never hang.
#[tokio::test]
async fn a_garbling_server_fails_the_clients_pending_calls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Every await here is under the deadline on the client's call, or aborted.
    let fake = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        // Answer the handshake, wait for the call, then send garbage.
        while !seen.contains(&0) {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                return; // the client gave up; its side of the test reports why
            }
            seen.extend_from_slice(&buf[..n]);
        }
        sock.write_all(b"{handshake:[0],ok:'f0e3c1a2-0000-4000-8000-000000000000'}\0")
            .await
            .unwrap();
        seen.clear();
        while !seen.contains(&0) {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                return; // the client gave up; its side of the test reports why
            }
            seen.extend_from_slice(&buf[..n]);
        }
        sock.write_all(b"\x01\x02 garbage ]]]\0").await.unwrap();
        // Keep the socket open: the client must not wait for us to close it.
        let _ = sock.read(&mut buf).await;
    });
    let conn = within(
        LIMIT,
        "the handshake with the fake server",
        connect(
            &format!("jstp://{addr}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    let result = within(
        LIMIT,
        "the call to fail on the garbled reply",
        conn.call("calculator", "answer", vec![]),
    )
    .await;
    assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    let mut saw_error = false;
    while let Ok(ev) = events.try_recv() {
        saw_error |= matches!(ev, ConnectionEvent::Error { .. });
    }
    assert!(saw_error, "no error event");
    within(LIMIT, "the client to close", conn.closed()).await;
    fake.abort();
}
