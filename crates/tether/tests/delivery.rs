//! Delivery rules over real sockets: calls start and are answered in arrival order (with the
//! real `@metarhia/jstp@2.3.0` client), a reader that pauses gets every broadcast event (or is
//! detached and restores them all), a stalled old link does not delay a restore, a peer that
//! never reads is held back by TCP instead of growing the server, and large events all reach
//! a reader under backpressure.

mod common;

use common::{node_peer, step, within, LIMIT};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::{
    connect, ClientOptions, ConnectionConfig, ConnectionEvent, Endpoint, Interface, Server,
    ServerEvent, Value,
};
use tether_wire::SessionConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn server_with(config: ConnectionConfig, extra: Option<(&str, Interface)>) -> Server {
    let chat = ChatHub::new();
    let mut app = test_app(chat.clone());
    if let Some((name, iface)) = extra {
        app = app.interface(name, iface);
    }
    let server = Server::builder()
        .application(app)
        .connection_config(config)
        .build()
        .unwrap();
    chat.bind(&server);
    server
}

async fn listen(server: &Server, url: &str) -> String {
    let endpoint: Endpoint = url.parse().unwrap();
    within(LIMIT, "the listener", server.listen(endpoint))
        .await
        .unwrap()
}

/// A raw JSTP peer over TCP: NUL-framed message texts, read only when the test says so.
struct RawPeer {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl RawPeer {
    async fn connect(addr: &str) -> RawPeer {
        let sock = within(LIMIT, "a TCP connection", TcpStream::connect(addr))
            .await
            .unwrap();
        RawPeer {
            sock,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        within(LIMIT, "room to send", self.sock.write_all(&bytes))
            .await
            .unwrap();
    }

    /// The next message, `None` at the end of the stream.
    async fn next(&mut self, what: &str) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == 0) {
                let frame: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&frame[..i]).into_owned());
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = within(LIMIT, what, self.sock.read(&mut chunk))
                .await
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Handshakes anonymously; returns the session id.
    async fn handshake(&mut self) -> String {
        self.send("{handshake:[0,'testApp']}").await;
        let reply = self.next("the handshake reply").await.unwrap();
        let id = reply
            .strip_prefix("{handshake:[0],ok:'")
            .and_then(|r| r.strip_suffix("'}"))
            .unwrap_or_else(|| panic!("handshake refused: {reply}"));
        id.to_owned()
    }
}

/// `(id, n)` of a `{event:[id,'log'],tick:[n,…]}` text.
fn tick(text: &str) -> Option<(i64, i64)> {
    let msg = tether_wire::Message::parse(text).ok()?;
    match msg {
        tether_wire::Message::Event {
            id, event, args, ..
        } if event == "tick" => Some((id, args.as_array()?.first()?.as_i64()?)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_sees_pipelined_calls_and_chat_sends_in_order() {
    let server = server_with(ConnectionConfig::default(), None);
    for url in [
        format!("jstp://{}", listen(&server, "jstp://127.0.0.1:0").await),
        format!("ws://{}", listen(&server, "ws://127.0.0.1:0").await),
    ] {
        let (_child, mut lines) = node_peer(&[
            "client",
            &url,
            "pipeline",
            "--calls",
            "4",
            "--first",
            "100",
            "--chat",
            "3000",
            "--timeout",
            "60000",
        ]);
        let mut steps = Vec::new();
        while let Some(line) = common::next_json(&mut lines).await {
            if line.get("done").is_some() || line.get("fatal").is_some() {
                assert_eq!(line["done"], true, "{url}: {line}");
                break;
            }
            assert_ne!(line["pass"], false, "{url}: {line}");
            steps.push(line);
        }
        assert_eq!(
            step(&steps, "callbacks")["result"],
            json!([100, 101, 102, 103]),
            "{url}"
        );
        let chat: Vec<i64> = step(&steps, "chat")["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(chat, (0..3000).collect::<Vec<_>>(), "{url}");
    }
}

/// The server broadcasts `count` ticks of `size` bytes.
fn broadcast_ticks(server: &Server, range: std::ops::Range<i64>, size: usize) {
    let pad = "x".repeat(size);
    for n in range {
        server.broadcast("log", "tick", vec![n.into(), pad.as_str().into()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_during_a_broadcast_gets_every_event() {
    let server = server_with(ConnectionConfig::default(), None);
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut peer = RawPeer::connect(&addr).await;
    peer.handshake().await;
    // Not reading: 4000 × 4 KiB pile up in the socket buffers and the session.
    broadcast_ticks(&server, 0..4000, 4096);
    let mut got = Vec::new();
    while got.len() < 4000 {
        let text = peer.next("the next tick").await.expect("the server closed");
        if let Some((_, n)) = tick(&text) {
            got.push(n);
        }
    }
    assert_eq!(got, (0..4000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_is_detached_and_its_restore_resends_every_event() {
    // The confirmation ping goes out after ⅛ of the buffer (64 KiB); a peer that leaves it
    // unanswered for the call timeout is detached as too slow.
    let mut config = ConnectionConfig::default();
    config.session = SessionConfig {
        max_buffered_messages: 16_384,
        max_buffered_bytes: 512 * 1024,
    };
    config.call_timeout = Duration::from_millis(300);
    let server = server_with(config, None);
    let mut events = server.events();
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut peer = RawPeer::connect(&addr).await;
    let session = peer.handshake().await;
    // 100 × 4 KiB: most of the buffer, never read while it is sent.
    broadcast_ticks(&server, 0..100, 4096);
    let error = within(LIMIT, "the slow-consumer error", async {
        loop {
            if let Ok(ServerEvent::ConnectionError { error, .. }) = events.recv().await {
                return error;
            }
        }
    })
    .await;
    assert!(error.contains("slow consumer"), "{error}");
    // What the first link delivered before it was cut.
    let mut got = Vec::new();
    while let Some(text) = peer.next("the rest of the first link").await {
        if let Some((id, n)) = tick(&text) {
            got.push((id, n));
        }
    }
    // Restore with what we received; the server resends exactly the rest.
    let received = got.last().map_or(0, |(id, _)| id.unsigned_abs());
    let mut again = RawPeer::connect(&addr).await;
    again
        .send(&format!(
            "{{handshake:[0,'testApp'],session:['{session}',{received}]}}"
        ))
        .await;
    let reply = again.next("the restore reply").await.unwrap();
    assert!(reply.starts_with("{handshake:[0],ok:"), "{reply}");
    while got.len() < 100 {
        let text = again.next("a resent tick").await.expect("closed");
        if let Some(t) = tick(&text) {
            got.push(t);
        }
    }
    let ns: Vec<i64> = got.iter().map(|(_, n)| *n).collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>(), "lost or duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_resend_buffer_ends_the_session_instead_of_dropping_events() {
    let mut config = ConnectionConfig::default();
    config.session = SessionConfig {
        max_buffered_messages: 16_384,
        max_buffered_bytes: 256 * 1024,
    };
    let server = server_with(config, None);
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut peer = RawPeer::connect(&addr).await;
    let session = peer.handshake().await;
    let client = within(LIMIT, "the server-side connection", async {
        loop {
            if let Some(c) = server.clients().into_iter().next() {
                return c;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    // Far past the whole buffer at once: the session cannot keep them all.
    let pad = "x".repeat(4096);
    let results: Vec<_> = (0..200)
        .map(|n| client.try_emit("log", "tick", vec![n.into(), pad.as_str().into()]))
        .collect();
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(tether::Error::SlowConsumer { .. }))),
        "no event was refused"
    );
    within(LIMIT, "the connection to end", client.closed()).await;
    // The session is gone: a restore is refused with 11 rather than silently incomplete.
    let mut again = RawPeer::connect(&addr).await;
    again
        .send(&format!(
            "{{handshake:[0,'testApp'],session:['{session}',0]}}"
        ))
        .await;
    let reply = again.next("the restore reply").await.unwrap();
    assert_eq!(reply, "{handshake:[0],error:[11]}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_old_link_does_not_delay_the_restore() {
    // Pongs may take a minute: only the restore itself can free the session here.
    let mut config = ConnectionConfig::default();
    config.call_timeout = Duration::from_secs(60);
    let server = server_with(config, None);
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut stalled = RawPeer::connect(&addr).await;
    let session = stalled.handshake().await;
    // 1500 × 8 KiB that the old link never reads: its socket buffers fill and the server's
    // writes to it stall.
    broadcast_ticks(&server, 0..1500, 8192);
    let mut fresh = RawPeer::connect(&addr).await;
    fresh
        .send(&format!(
            "{{handshake:[0,'testApp'],session:['{session}',0]}}"
        ))
        .await;
    let reply = fresh.next("the restore reply").await.unwrap();
    assert!(reply.starts_with("{handshake:[0],ok:"), "{reply}");
    // Broadcast meanwhile: nothing lost, nothing twice, in order.
    broadcast_ticks(&server, 1500..3000, 8192);
    let mut got = Vec::new();
    while got.len() < 3000 {
        let text = fresh.next("a tick").await.expect("closed");
        if let Some((_, n)) = tick(&text) {
            got.push(n);
        }
    }
    assert_eq!(got, (0..3000).collect::<Vec<_>>());
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_bounded_and_all_answered_in_order() {
    const LIMIT_CALLS: usize = 16;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let iface = Interface::new().method("wait", {
        let (running, peak, gate) = (running.clone(), peak.clone(), gate.clone());
        move |_c, a: Vec<Value>| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let (running, gate) = (running.clone(), gate.clone());
            async move {
                let _permit = gate.acquire().await.unwrap();
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(a.into_iter().next().unwrap_or(Value::Undefined))
            }
        }
    });
    let mut config = ConnectionConfig::default();
    config.max_calls_in_flight = LIMIT_CALLS;
    let server = server_with(config, Some(("slow", iface)));
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut peer = RawPeer::connect(&addr).await;
    peer.handshake().await;
    for i in 1..=200 {
        peer.send(&format!("{{call:[{i},'slow'],wait:[{i}]}}"))
            .await;
    }
    within(LIMIT, "the first calls to start", async {
        while running.load(Ordering::SeqCst) < LIMIT_CALLS {
            tokio::task::yield_now().await;
        }
    })
    .await;
    gate.add_permits(200);
    let mut ids = Vec::new();
    while ids.len() < 200 {
        let text = peer.next("a callback").await.expect("closed");
        if let Ok(tether_wire::Message::Callback { id, .. }) = tether_wire::Message::parse(&text) {
            ids.push(id);
        }
    }
    assert!(peak.load(Ordering::SeqCst) <= LIMIT_CALLS, "peak {peak:?}");
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=200).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_all_reach_a_reader_under_backpressure() {
    let mut config = ConnectionConfig::default();
    // 16 MiB of resend buffer for 1000 × 128 KiB = 125 MiB of events.
    config.session = SessionConfig {
        max_buffered_messages: 16_384,
        max_buffered_bytes: 16 << 20,
    };
    let server = server_with(config, None);
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let mut options = ClientOptions::default();
    options.connection.event_capacity = 1 << 12;
    let conn = within(
        LIMIT,
        "the client's handshake",
        connect(&format!("jstp://{addr}"), "testApp", options),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    let pad = "y".repeat(128 * 1024);
    let sender = tokio::spawn({
        let server = server.clone();
        async move {
            for n in 0..1000i64 {
                server
                    .broadcast_async("log", "tick", vec![n.into(), pad.as_str().into()])
                    .await;
            }
        }
    });
    let mut got = Vec::new();
    within(Duration::from_secs(120), "1000 large ticks", async {
        while got.len() < 1000 {
            match events.recv().await.unwrap() {
                ConnectionEvent::Event { event, args, .. } if event == "tick" => {
                    got.push(args[0].as_i64().unwrap())
                }
                ConnectionEvent::Reconnect { .. } => panic!("the reader was detached"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
    within(LIMIT, "the sender", sender).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_that_opt_out_run_on_their_own_tasks() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let iface = Interface::new()
        .spawned_method("wait", {
            let gate = gate.clone();
            move |_c, _a| {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok(Value::from("released"))
                }
            }
        })
        .spawned_method("boom", |_c, _a| async { panic!("a method bug") })
        .blocking_method("sum", |_c, a: Vec<Value>| {
            Ok(Value::from(a.iter().filter_map(Value::as_f64).sum::<f64>()))
        });
    let server = server_with(ConnectionConfig::default(), Some(("work", iface)));
    let addr = listen(&server, "jstp://127.0.0.1:0").await;
    let conn = within(
        LIMIT,
        "the client's handshake",
        connect(
            &format!("jstp://{addr}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    let waiting = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("work", "wait", vec![]).await }
    });
    // Calls after the waiting one are answered while it waits.
    let sum = within(
        LIMIT,
        "the blocking sum",
        conn.call("work", "sum", vec![1.into(), 2.into()]),
    )
    .await
    .unwrap();
    assert_eq!(sum, vec![Value::from(3)]);
    match within(
        LIMIT,
        "the panicking method",
        conn.call("work", "boom", vec![]),
    )
    .await
    {
        Err(tether::Error::Remote(e)) => assert_eq!(e.code, 16),
        other => panic!("{other:?}"),
    }
    assert!(!waiting.is_finished());
    gate.notify_one();
    let released = within(LIMIT, "the waiting call", waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(released, vec![Value::from("released")]);
}
