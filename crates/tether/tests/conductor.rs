//! Conductor connections against real peers: the npm clients `@whi/holochain-websocket` 0.1.6,
//! `@spartan-hc/holochain-websocket` 1.3.3 and `@holochain/client` 0.21.0 against our server,
//! our client against a Node server written here on `ws` + `@msgpack/msgpack` (the pair the
//! conductor clients use) over ws:// and wss://, our client against our server in both payload
//! dialects, authentication, Origin checks, and bad input to our server.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it).

mod common;

use futures::{SinkExt, StreamExt};
use serde_json::Value as Json;
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tether::conductor::{
    example_cell_id, AppSignal, ConductorConnection, ConductorError, ConductorOptions,
    ConductorServer, ConductorServerBuilder, ConductorServerEvent, Dialect, InputError, Value,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Upper bound for anything a test waits for; reaching it fails the test.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn node(args: &[&str]) -> tokio::process::Child {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    assert!(
        dir.join("node_modules/@whi/holochain-websocket").exists(),
        "interop/node_modules is missing: run `npm ci --ignore-scripts` in interop/"
    );
    Command::new("node")
        .arg(dir.join("conductor-peer.mjs"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is not installed")
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

fn field(v: &Value, key: &str) -> Option<f64> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .and_then(|(_, v)| v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)))
}

/// Our server with the handlers the npm client scenario uses.
fn our_server() -> ConductorServer {
    our_handlers(ConductorServer::builder()).build()
}

fn our_handlers(builder: ConductorServerBuilder) -> ConductorServerBuilder {
    builder
        .handler("answer", |_| async { Ok(Value::from(42)) })
        .handler("divide", |args| async move {
            let (a, b) = (field(&args, "a"), field(&args, "b"));
            match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => Ok(Value::from(a / b)),
                (Some(_), Some(_)) => {
                    Err(("internal_error".to_owned(), "Zero division".to_owned()))
                }
                _ => Err(("deserialization".to_owned(), "expected {a, b}".to_owned())),
            }
        })
        .handler("never", |_| std::future::pending())
        .max_message_size(64 * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_client_against_our_server() {
    let server = our_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut child = node(&["client", &format!("ws://{addr}")]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut steps = std::collections::HashMap::new();
    while let Some(line) = within("the npm client's next line", lines.next_line())
        .await
        .unwrap()
    {
        let v: Json = serde_json::from_str(&line).unwrap();
        if v["done"] == true {
            break;
        }
        steps.insert(v["step"].as_str().unwrap().to_owned(), v);
    }
    assert_eq!(steps["open"]["ok"], true);
    assert_eq!(steps["answer"]["result"], 42);
    assert_eq!(steps["divide"]["result"], 2.0);
    assert_eq!(steps["divideByZero"]["error"]["name"], "ConductorError");
    assert_eq!(steps["divideByZero"]["error"]["message"], "Zero division");
    assert_eq!(steps["unknown"]["error"]["name"], "DeserializationError");
    assert_eq!(steps["timeout"]["error"]["name"], "TimeoutError");
    assert_eq!(steps["close"]["result"], 1000);
}

/// Starts the Node server (`args` after `server`); returns it with its port.
async fn node_server(args: &[&str]) -> (tokio::process::Child, u16) {
    let mut child = node(&[&["server"], args].concat());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = within("the node server's ready line", lines.next_line())
        .await
        .unwrap()
        .expect("the node server ended");
    let ready: Json = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["tls"], args.contains(&"--cert"), "{ready}");
    (child, ready["port"].as_u64().unwrap() as u16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_node_server() {
    let (_child, port) = node_server(&[]).await;

    // A bare port means ws://127.0.0.1:<port>.
    let options = ConductorOptions {
        name: Some("interop".into()),
        ..ConductorOptions::default()
    };
    let conn = ConductorConnection::new(port, options).unwrap();
    assert!(conn.name().ends_with(":interop"));
    assert_eq!(conn.uri(), format!("ws://127.0.0.1:{port}"));
    within("open", conn.open(None)).await.unwrap();
    let mut signals = conn.signals();

    assert_eq!(
        within("answer", conn.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    let nested = map(&[
        (
            "list",
            Value::Array(vec![1.into(), "two".into(), Value::Nil]),
        ),
        ("bytes", Value::Binary(vec![0, 1, 2, 255])),
        ("ok", true.into()),
    ]);
    assert_eq!(
        within("echo", conn.request("echo", nested.clone(), None))
            .await
            .unwrap(),
        nested
    );
    match within("fail", conn.request("fail", Value::Nil, None)).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("ribosome_error", "boom")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        within("cancel", conn.request("cancel", Value::Nil, None)).await,
        Err(ConductorError::Cancelled)
    ));
    assert_eq!(
        within("signal", conn.request("signal", "hello".into(), None))
            .await
            .unwrap(),
        Value::from("sent")
    );
    assert_eq!(
        within("the signal", signals.recv()).await.unwrap(),
        Value::from("hello")
    );
    assert!(matches!(
        within(
            "never",
            conn.request("never", Value::Nil, Some(Duration::from_millis(100)))
        )
        .await,
        Err(ConductorError::Timeout { .. })
    ));
    // Garbage from the server is dropped; the connection keeps working.
    assert_eq!(
        within("garbage", conn.request("garbage", Value::Nil, None))
            .await
            .unwrap(),
        Value::from("ok")
    );
    // flush fails what is pending and says how many. Polling each request once queues it
    // (spawned tasks could queue theirs after the round trip below).
    let mut pending: Vec<_> = (0..3)
        .map(|_| Box::pin(conn.request("never", Value::Nil, None)))
        .collect();
    for p in &mut pending {
        assert!(futures::poll!(p.as_mut()).is_pending());
    }
    // All three are pending once a round trip queued after them is answered.
    within("answer", conn.request("answer", Value::Nil, None))
        .await
        .unwrap();
    assert_eq!(within("flush", conn.flush()).await, 3);
    for p in pending {
        assert!(matches!(
            within("a flushed request", p).await,
            Err(ConductorError::Flushed)
        ));
    }
    assert_eq!(within("close", conn.close(None)).await.unwrap(), 1000);
    assert!(matches!(
        within("answer", conn.request("answer", Value::Nil, None)).await,
        Err(ConductorError::Closed)
    ));
}

/// Our client over wss:// against the Node server on Node's https server, trusting only the
/// throwaway certificate; without that trust the TLS handshake fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_node_server_over_wss() {
    let certs = common::certs();
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let (_child, port) = node_server(&["--cert", cert, "--key", key]).await;

    let untrusting = ConductorConnection::new(
        format!("wss://127.0.0.1:{port}"),
        ConductorOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        within("open without trust", untrusting.open(None)).await,
        Err(ConductorError::Dial {
            stage: tether::conductor::DialStage::Tls,
            ..
        })
    ));

    // The name verified is `TlsClientOptions::server_name` when set, not the URL's host: the
    // certificate is for localhost and 127.0.0.1 only.
    for (name, works) in [("elsewhere.example", false), ("localhost", true)] {
        let mut named = ConductorOptions::default();
        named.tls.ca_pem = Some(certs.cert.clone());
        named.tls.server_name = Some(name.into());
        let conn = ConductorConnection::new(format!("wss://127.0.0.1:{port}"), named).unwrap();
        let opened = within("open with a server name", conn.open(None)).await;
        assert_eq!(opened.is_ok(), works, "{name}: {opened:?}");
        if !works {
            assert!(
                matches!(
                    opened,
                    Err(ConductorError::Dial {
                        stage: tether::conductor::DialStage::Tls,
                        ..
                    })
                ),
                "{opened:?}"
            );
        }
        conn.close(None).await.ok();
    }

    // `secure` makes a bare port mean wss://127.0.0.1:<port>.
    let mut options = ConductorOptions {
        secure: true,
        ..ConductorOptions::default()
    };
    options.tls.ca_pem = Some(certs.cert.clone());
    let conn = ConductorConnection::new(port, options).unwrap();
    assert_eq!(conn.uri(), format!("wss://127.0.0.1:{port}"));
    within("open", conn.open(None)).await.unwrap();
    let mut signals = conn.signals();
    assert_eq!(
        within("answer", conn.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    let nested = map(&[
        ("bytes", Value::Binary(vec![0, 255])),
        ("list", Value::Array(vec![1.into(), Value::Nil])),
    ]);
    assert_eq!(
        within("echo", conn.request("echo", nested.clone(), None))
            .await
            .unwrap(),
        nested
    );
    match within("fail", conn.request("fail", Value::Nil, None)).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("ribosome_error", "boom")
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        within("signal", conn.request("signal", "over tls".into(), None))
            .await
            .unwrap(),
        Value::from("sent")
    );
    assert_eq!(
        within("the signal", signals.recv()).await.unwrap(),
        Value::from("over tls")
    );
    assert_eq!(within("close", conn.close(None)).await.unwrap(), 1000);
}

#[tokio::test]
async fn addresses_and_failures_are_typed() {
    assert!(matches!(
        ConductorConnection::new(0u16, ConductorOptions::default()),
        Err(ConductorError::InvalidAddress(_))
    ));
    assert!(matches!(
        ConductorConnection::new("http://x:1", ConductorOptions::default()),
        Err(ConductorError::InvalidAddress(_))
    ));
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let conn = ConductorConnection::new(free.to_string(), ConductorOptions::default()).unwrap();
    assert!(matches!(
        within("open", conn.open(None)).await,
        Err(ConductorError::Dial {
            stage: tether::conductor::DialStage::Tcp,
            ..
        })
    ));
    assert!(matches!(
        within("answer", conn.request("answer", Value::Nil, None)).await,
        Err(ConductorError::Closed)
    ));
}

/// Opens a raw WebSocket to our server, sends `message`, and returns the code of the Close
/// frame that follows. An end of the connection without a Close frame fails the test.
async fn close_code_after(addr: &str, name: &str, message: WsMessage) -> u16 {
    let sock = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut ws, _) = within(
        "websocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}"), sock),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    // The server may close before it has read all of a large message.
    let _ = within(&format!("{name}: send"), ws.send(message)).await;
    within(&format!("{name}: a Close frame"), async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(WsMessage::Close(None))) => panic!("{name}: a Close frame without a code"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{name}: no Close frame, the connection failed: {e}"),
                None => panic!("{name}: no Close frame, the connection just ended"),
            }
        }
    })
    .await
}

/// Waits for the server's `BadInput` event, checks that it closed the connection, and waits
/// for that client's `Disconnected` (after which the server no longer lists it).
async fn bad_input_closed(
    events: &mut tokio::sync::broadcast::Receiver<ConductorServerEvent>,
    name: &str,
) {
    let client = within(&format!("{name}: ConductorServerEvent::BadInput"), async {
        loop {
            if let ConductorServerEvent::BadInput { client, closed, .. } =
                events.recv().await.unwrap()
            {
                assert!(closed, "{name}");
                break client;
            }
        }
    })
    .await;
    within(
        &format!("{name}: ConductorServerEvent::Disconnected"),
        async {
            loop {
                match events.recv().await.unwrap() {
                    ConductorServerEvent::Disconnected(c) if c == client => break,
                    _ => {}
                }
            }
        },
    )
    .await
}

fn envelope(pairs: Vec<(&str, Value)>) -> Vec<u8> {
    tether_wire::conductor::to_bytes(&Value::Map(
        pairs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
    ))
}

/// As a conductor: a frame that does not decode is skipped and reported (`BadInput` with
/// `closed: false`), and the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_frames_are_skipped_and_reported() {
    let server = our_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let (mut ws, _) = within(
        "websocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}"), sock),
    )
    .await
    .unwrap();
    let cases: Vec<(&str, WsMessage)> = vec![
        ("not msgpack", WsMessage::binary(vec![0xa5, b'a'])),
        ("text", WsMessage::text("{\"type\":\"request\"}")),
        (
            "unknown type",
            WsMessage::binary(envelope(vec![("type", "gossip".into())])),
        ),
        (
            "capitalised type",
            WsMessage::binary(envelope(vec![
                ("type", "Gossip".into()),
                ("data", Value::Binary(vec![0xc0])),
            ])),
        ),
        (
            "missing id",
            WsMessage::binary(envelope(vec![
                ("type", "request".into()),
                ("data", Value::Binary(vec![0xc0])),
            ])),
        ),
    ];
    let answer = envelope(vec![
        ("type", "request".into()),
        ("id", 9.into()),
        (
            "data",
            Value::Binary(Dialect::Value.payload("answer", Value::Nil)),
        ),
    ]);
    for (name, message) in cases {
        within(&format!("{name}: send"), ws.send(message))
            .await
            .unwrap();
        within(&format!("{name}: ConductorServerEvent::BadInput"), async {
            loop {
                if let ConductorServerEvent::BadInput { closed, .. } = events.recv().await.unwrap()
                {
                    assert!(!closed, "{name}");
                    break;
                }
            }
        })
        .await;
        // The same connection still answers.
        within(
            &format!("{name}: send a request"),
            ws.send(WsMessage::binary(answer.clone())),
        )
        .await
        .unwrap();
        let reply = within(&format!("{name}: the response"), ws.next())
            .await
            .unwrap()
            .unwrap();
        let expected = tether_wire::conductor::WireMessage::Response {
            id: 9,
            data: Some(Dialect::Value.payload("answer", 42.into())),
        };
        assert_eq!(reply.into_data().to_vec(), expected.encode(), "{name}");
    }
    assert_eq!(server.clients().len(), 1);
}

/// `max_message_size` documents that a larger message closes the connection with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_with_1009() {
    let server = our_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let oversized = WsMessage::binary(vec![0u8; 128 * 1024]);
    assert_eq!(close_code_after(&addr, "oversized", oversized).await, 1009);
    bad_input_closed(&mut events, "oversized").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_websocket_and_raw_sends() {
    let server = our_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let (ws, _) = within(
        "websocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}"), sock),
    )
    .await
    .unwrap();
    let conn = ConductorConnection::from_websocket(ws, ConductorOptions::default());
    within("open", conn.open(None)).await.unwrap();
    assert_eq!(
        within("answer", conn.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    // A signal from a client is not part of the protocol: dropped, reported, connection kept.
    let signal = conn.send(tether::conductor::MessageKind::Signal, "psst".into(), None);
    within("send a signal", signal).await.unwrap();
    within("ConductorServerEvent::BadInput", async {
        loop {
            if let ConductorServerEvent::BadInput { closed, .. } = events.recv().await.unwrap() {
                assert!(!closed);
                break;
            }
        }
    })
    .await;
    // Requests and responses need an id.
    let request = conn.send(tether::conductor::MessageKind::Request, Value::Nil, None);
    assert!(matches!(
        within("send a request", request).await,
        Err(ConductorError::Wire(_))
    ));
    assert_eq!(
        within("answer", conn.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    assert_eq!(within("close", conn.close(None)).await.unwrap(), 1000);
}

const TOKEN: [u8; 3] = [1, 2, 3];

/// The app signal every scenario waits for: `{type:"chat", user, text}` from zome `chat`.
fn chat_signal() -> Value {
    map(&[
        ("type", "chat".into()),
        ("user", "ann".into()),
        ("text", "hi".into()),
    ])
}

/// Runs a Node scenario against `server` to its end: collects the steps by name and, when the
/// peer says it waits for a signal, broadcasts the chat app signal to it.
async fn drive_node(
    server: &ConductorServer,
    args: &[&str],
) -> std::collections::HashMap<String, Json> {
    let mut child = node(args);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut steps = std::collections::HashMap::new();
    let scenario = args[0];
    loop {
        let line = within(&format!("{scenario}: the next line"), lines.next_line())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{scenario} ended early after {steps:?}"));
        let v: Json = serde_json::from_str(&line).unwrap();
        if v["done"] == true {
            return steps;
        }
        if v["waiting"] == "signal" {
            assert_eq!(server.broadcast_app_signal("chat", &chat_signal()), 1);
            continue;
        }
        steps.insert(v["step"].as_str().unwrap().to_owned(), v);
    }
}

/// The seed's own client: map-form request tags and `{type, data}` payloads, `authenticate`,
/// `flush`, and app signals in the `{App: …}` shape with hashes its holo-hash library accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spartan_client_against_our_server() {
    let server = our_handlers(ConductorServer::builder())
        .tokens([TOKEN.to_vec()])
        .build();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let steps = drive_node(&server, &["spartan", &format!("ws://{addr}"), "1,2,3"]).await;
    for step in [
        "open",
        "authenticate",
        "answer",
        "divide",
        "flush",
        "signal",
        "close",
    ] {
        assert_eq!(steps[step]["ok"], true, "{step}: {}", steps[step]);
    }
    assert_eq!(steps["answer"]["result"], 42);
    assert_eq!(steps["divide"]["result"], 2.0);
    assert_eq!(steps["divideByZero"]["error"]["name"], "ConductorError");
    assert_eq!(steps["divideByZero"]["error"]["message"], "Zero division");
    assert_eq!(steps["unknown"]["error"]["name"], "DeserializationError");
    let flushed = &steps["flush"]["result"];
    assert_eq!(flushed["count"], 2);
    for e in flushed["errors"].as_array().unwrap() {
        assert_eq!(e["message"], "Connection has been flushed");
    }
    assert_eq!(steps["timeout"]["error"]["name"], "TimeoutError");
    let signal = &steps["signal"]["result"];
    assert_eq!(signal["zome"], "chat");
    assert_eq!(signal["type"], "chat");
    assert_eq!(
        signal["data"],
        serde_json::json!({"user": "ann", "text": "hi"})
    );
    assert_eq!(
        signal["dna"],
        "uhC0k0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dGVI0eC"
    );
    assert_eq!(
        signal["agent"],
        "uhCAkoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaHUO-Mx"
    );
    assert_eq!(steps["close"]["result"], 1000);
}

/// The official client of today's conductors: `{type, value}` payloads and errors, an Origin the
/// server restricts, `authenticate`, and a `{type:"app", value}` signal it decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holochain_client_against_our_server() {
    let server = our_handlers(ConductorServer::builder())
        .tokens([TOKEN.to_vec()])
        .allowed_origins(["tether-test".to_owned()])
        .build();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let url = format!("ws://{addr}");
    let steps = drive_node(&server, &["hcclient", &url, "1,2,3", "tether-test"]).await;
    for step in [
        "open",
        "authenticate",
        "answer",
        "divide",
        "divideByZero",
        "signal",
        "close",
    ] {
        assert_eq!(steps[step]["ok"], true, "{step}: {}", steps[step]);
    }
    assert_eq!(
        steps["answer"]["result"],
        serde_json::json!({"type": "answer", "value": 42})
    );
    assert_eq!(steps["divide"]["result"]["type"], "divide");
    assert_eq!(steps["divide"]["result"]["value"], 2.0);
    assert_eq!(
        steps["divideByZero"]["result"],
        serde_json::json!({"type": "error", "value": {"type": "internal_error", "value": "Zero division"}})
    );
    assert_eq!(
        steps["signal"]["result"],
        serde_json::json!({
            "type": "app",
            "zome_name": "chat",
            "payload": {"type": "chat", "user": "ann", "text": "hi"},
            "cell_id": [39, 39],
        })
    );
    assert_eq!(steps["close"]["result"], 1000);
}

/// Our client against our server in each dialect: requests, results, errors and app signals all
/// in the dialect the client speaks (the server follows it per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_in_both_dialects() {
    let server = our_handlers(ConductorServer::builder())
        .tokens([TOKEN.to_vec()])
        .build();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    for dialect in [Dialect::Value, Dialect::Data] {
        let options = ConductorOptions {
            dialect,
            ..ConductorOptions::default()
        };
        let conn = ConductorConnection::new(addr.as_str(), options).unwrap();
        within("open", conn.open(None)).await.unwrap();
        within("authenticate", conn.authenticate(&TOKEN))
            .await
            .unwrap();
        let client = within("ConductorServerEvent::Connected", async {
            loop {
                if let ConductorServerEvent::Connected(c) = events.recv().await.unwrap() {
                    break c;
                }
            }
        })
        .await;
        let mut signals = conn.signals();
        let args = map(&[("a", 20.into()), ("b", 10.into())]);
        assert_eq!(
            within("divide", conn.request("divide", args, None))
                .await
                .unwrap(),
            Value::from(2.0),
            "{dialect:?}"
        );
        let zero = map(&[("a", 1.into()), ("b", 0.into())]);
        match within("divide by zero", conn.request("divide", zero, None)).await {
            Err(ConductorError::Remote { kind, message }) => assert_eq!(
                (kind.as_str(), message.as_str()),
                ("internal_error", "Zero division"),
                "{dialect:?}"
            ),
            other => panic!("{dialect:?}: {other:?}"),
        }
        assert!(server.app_signal(client, "chat", &chat_signal()));
        let raw = within("the app signal", signals.recv()).await.unwrap();
        // The shape follows the dialect: `{type:"app", value}` or `{App: …}`.
        let tag = raw.as_map().unwrap()[0].0.as_str().unwrap().to_owned();
        let expected_tag = match dialect {
            Dialect::Value => "type",
            Dialect::Data => "App",
        };
        assert_eq!(tag, expected_tag, "{dialect:?}: {raw}");
        let signal = AppSignal::from_signal(&raw).unwrap();
        assert_eq!(signal.cell_id, example_cell_id());
        assert_eq!(signal.zome_name, "chat");
        assert_eq!(signal.signal, chat_signal());
        assert_eq!(within("close", conn.close(None)).await.unwrap(), 1000);
    }
}

/// Waits for the server's `BadInput` that closed a connection; returns its error.
async fn refused(
    events: &mut tokio::sync::broadcast::Receiver<ConductorServerEvent>,
    name: &str,
) -> InputError {
    within(&format!("{name}: ConductorServerEvent::BadInput"), async {
        loop {
            if let ConductorServerEvent::BadInput { closed, error, .. } =
                events.recv().await.unwrap()
            {
                assert!(closed, "{name}: {error}");
                break error;
            }
        }
    })
    .await
}

/// An app interface closes (1008) a connection whose first message is not `authenticate` with a
/// known token, or that sends nothing before the authentication deadline; an unauthenticated
/// connection gets no signals and is not counted as a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_interface_requires_authentication_first() {
    let server = our_handlers(ConductorServer::builder())
        .tokens([TOKEN.to_vec()])
        .authentication_timeout(Duration::from_millis(300))
        .build();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let request = WsMessage::binary(envelope(vec![
        ("type", "request".into()),
        ("id", 0.into()),
        (
            "data",
            Value::Binary(Dialect::Value.payload("answer", Value::Nil)),
        ),
    ]));
    let auth = |token: &[u8]| {
        WsMessage::binary(
            tether_wire::conductor::Envelope::Authenticate {
                data: tether_wire::conductor::authenticate_payload(token),
            }
            .encode(),
        )
    };
    let cases = [
        ("a request first", request),
        ("a wrong token", auth(&[9, 9])),
        ("garbage first", WsMessage::binary(vec![0xa5, b'a'])),
    ];
    for (name, message) in cases {
        assert_eq!(close_code_after(&addr, name, message).await, 1008, "{name}");
        let got = refused(&mut events, name).await;
        let expected = match &got {
            InputError::BeforeAuthenticate("request") => "a request first",
            InputError::InvalidToken => "a wrong token",
            InputError::Wire(tether_wire::conductor::WireError::NotMsgpack(_)) => "garbage first",
            _ => "something else",
        };
        assert_eq!(expected, name, "{got}");
    }
    // Silence: the deadline closes the connection.
    let silent = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    within("open", silent.open(None)).await.unwrap();
    assert!(matches!(
        refused(&mut events, "silence").await,
        InputError::AuthenticationTimeout(after) if after == Duration::from_millis(300)
    ));
    assert!(matches!(
        within(
            "a request after the deadline",
            silent.request("answer", Value::Nil, None)
        )
        .await,
        Err(ConductorError::Closed)
    ));
    assert!(server.clients().is_empty());
    // The right token, then requests work.
    let good = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    within("open", good.open(None)).await.unwrap();
    within("authenticate", good.authenticate(&TOKEN))
        .await
        .unwrap();
    assert_eq!(
        within("answer", good.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    assert_eq!(server.clients().len(), 1);
    // The same through `send`, as spartan's `send("authenticate", {token})` does.
    let raw = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    within("open", raw.open(None)).await.unwrap();
    let token = map(&[("token", Value::Array(vec![1.into(), 2.into(), 3.into()]))]);
    let auth = raw.send(tether::conductor::MessageKind::Authenticate, token, None);
    within("send authenticate", auth).await.unwrap();
    assert_eq!(
        within("answer", raw.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    assert_eq!(server.clients().len(), 2);
}

/// With allowed origins set, a handshake without an `Origin` header or with another origin is
/// refused (HTTP 400, as a conductor does); by default any origin and none are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_when_restricted() {
    let restricted = our_handlers(ConductorServer::builder())
        .allowed_origins(["https://ok.example".to_owned()])
        .build();
    let open_addr = our_server();
    let restricted_addr = within("listen", restricted.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let any_addr = within("listen", open_addr.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let with_origin = |origin: Option<&str>| ConductorOptions {
        origin: origin.map(str::to_owned),
        ..ConductorOptions::default()
    };
    for (addr, origin, opens) in [
        (&restricted_addr, Some("https://ok.example"), true),
        (&restricted_addr, Some("https://evil.example"), false),
        (&restricted_addr, None, false),
        (&any_addr, None, true),
        (&any_addr, Some("https://evil.example"), true),
    ] {
        let conn = ConductorConnection::new(addr.as_str(), with_origin(origin)).unwrap();
        let result = within("open", conn.open(None)).await;
        match (opens, result) {
            (true, Ok(())) => assert_eq!(
                within("answer", conn.request("answer", Value::Nil, None))
                    .await
                    .unwrap(),
                Value::from(42)
            ),
            (
                false,
                Err(ConductorError::Dial {
                    stage: tether::conductor::DialStage::WebSocket,
                    source,
                    ..
                }),
            ) => assert_eq!(http_status(&*source), Some(400), "{source}"),
            (_, other) => panic!("{origin:?} on {addr}: {other:?}"),
        }
    }
}

/// One raw connection switching dialects: each request is answered in the dialect it was asked
/// in (tag as a string or in map form); a unit request, which shows none, gets the latest one;
/// errors, including for a payload that is not a map, are in the conductor's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_answered_in_its_dialect() {
    use tether_wire::conductor::{from_bytes, to_bytes, WireMessage};
    let server = our_server();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut events = server.events();
    let sock = within("tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let (mut ws, _) = within(
        "websocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}"), sock),
    )
    .await
    .unwrap();
    // On an interface without tokens (like an admin interface) `authenticate` is ignored, as
    // @holochain/client's AppWebsocket sends it anyway; the requests below still get answers.
    let auth = tether_wire::conductor::Envelope::Authenticate {
        data: tether_wire::conductor::authenticate_payload(&TOKEN),
    };
    within(
        "send authenticate",
        ws.send(WsMessage::binary(auth.encode())),
    )
    .await
    .unwrap();
    let args = map(&[("a", 20.into()), ("b", 10.into())]);
    let tagged = |tag: Value, key: &str, content: Value| {
        to_bytes(&Value::Map(vec![
            ("type".into(), tag),
            (key.into(), content),
        ]))
    };
    let map_tag = |m: &str| Value::Map(vec![(m.into(), Value::Nil)]);
    // An error's message is free text; its shape and kind are fixed.
    fn error(key: &'static str, kind: &'static str) -> impl Fn(&Value) {
        move |v: &Value| {
            let outer = v.as_map().unwrap();
            assert_eq!(outer[0], ("type".into(), "error".into()));
            assert_eq!(outer[1].0, Value::from(key));
            let inner = outer[1].1.as_map().unwrap();
            assert_eq!(inner[0], ("type".into(), kind.into()));
            assert_eq!(inner[1].0, Value::from(key));
            assert!(inner[1].1.is_str());
        }
    }
    let exact = |expected: Value| move |v: &Value| assert_eq!(*v, expected);
    type Check = Box<dyn Fn(&Value)>;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        (
            "value dialect",
            tagged("divide".into(), "value", args.clone()),
            Box::new(exact(map(&[
                ("type", "divide".into()),
                ("value", 2.0.into()),
            ]))),
        ),
        (
            "data dialect, map-form tag",
            tagged(map_tag("divide"), "data", args.clone()),
            Box::new(exact(map(&[
                ("type", "divide".into()),
                ("data", 2.0.into()),
            ]))),
        ),
        (
            "unit request after data",
            to_bytes(&map(&[("type", "answer".into())])),
            Box::new(exact(map(&[
                ("type", "answer".into()),
                ("data", 42.into()),
            ]))),
        ),
        (
            "unknown method, value dialect",
            tagged("no_such".into(), "value", Value::Nil),
            Box::new(error("value", "deserialization")),
        ),
        (
            "handler error, map-form tag, value dialect",
            tagged(
                map_tag("divide"),
                "value",
                map(&[("a", 1.into()), ("b", 0.into())]),
            ),
            Box::new(exact(map(&[
                ("type", "error".into()),
                (
                    "value",
                    map(&[
                        ("type", "internal_error".into()),
                        ("value", "Zero division".into()),
                    ]),
                ),
            ]))),
        ),
        (
            "payload not a map",
            to_bytes(&Value::from(7)),
            Box::new(error("value", "deserialization")),
        ),
    ];
    for (i, (name, payload, check)) in cases.into_iter().enumerate() {
        let request = WireMessage::Request {
            id: i as u64,
            data: payload,
        };
        within(
            &format!("{name}: send"),
            ws.send(WsMessage::binary(request.encode())),
        )
        .await
        .unwrap();
        let reply = within(&format!("{name}: the response"), ws.next())
            .await
            .unwrap()
            .unwrap();
        match WireMessage::decode(&reply.into_data()).unwrap() {
            WireMessage::Response { id, data: Some(d) } if id == i as u64 => {
                check(&from_bytes(&d).unwrap())
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // The connection's only event so far: the ignored authenticate was not reported as bad.
    assert!(matches!(
        events.try_recv(),
        Ok(ConductorServerEvent::Connected(_))
    ));
    assert!(events.try_recv().is_err());
}

/// Issue 17: 16 MiB of MessagePack nils in a request would decode into 16 M values (40× its
/// bytes). The server refuses it before building anything, answering in the conductor's error
/// shape (`deserialization`), and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_costly_to_decode_is_refused_with_the_conductors_error() {
    use tether_wire::conductor::WireMessage;
    let server = our_handlers(ConductorServer::builder())
        .max_message_size(17 << 20)
        .build();
    let addr = common::within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let sock = common::within(LIMIT, "tcp connect", tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap();
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(17 << 20))
        .max_frame_size(Some(17 << 20));
    let (mut ws, _) = common::within(
        LIMIT,
        "websocket handshake",
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}"), sock, Some(config)),
    )
    .await
    .unwrap();
    let n = 16 << 20;
    let mut nils = vec![0xdd];
    nils.extend_from_slice(&(n as u32).to_be_bytes());
    nils.resize(5 + n, 0xc0);
    let request = WireMessage::Request { id: 1, data: nils };
    common::within(
        LIMIT,
        "send 16 MiB of nils",
        ws.send(WsMessage::binary(request.encode())),
    )
    .await
    .unwrap();
    let answer = WireMessage::Request {
        id: 2,
        data: Dialect::Value.payload("answer", Value::Nil),
    };
    common::within(
        LIMIT,
        "send a request",
        ws.send(WsMessage::binary(answer.encode())),
    )
    .await
    .unwrap();
    for id in [1, 2] {
        let reply = common::within(LIMIT, "a response", ws.next())
            .await
            .unwrap()
            .unwrap();
        let WireMessage::Response { id: got, data } =
            WireMessage::decode(&reply.into_data()).unwrap()
        else {
            panic!("not a response")
        };
        assert_eq!(got, id);
        let payload = tether_wire::conductor::Payload::decode(&data.unwrap()).unwrap();
        if id == 2 {
            assert_eq!(payload.content, Value::from(42));
            continue;
        }
        assert_eq!(payload.kind, "error");
        let error = tether_wire::conductor::Payload::from_value(payload.content).unwrap();
        assert_eq!(error.kind, "deserialization");
        let message = error.content.as_str().unwrap().to_owned();
        assert!(message.contains("over the budget"), "{message}");
    }
}

/// System signals reach each client in its dialect: `{type:"system", value}` (0.5+) and
/// `{System: …}` (0.1–0.4), both read back as `ConductorSignal::System`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_signals_in_each_clients_dialect() {
    use tether::conductor::ConductorSignal;
    let server = our_server();
    let addr = common::within(LIMIT, "listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let mut clients = Vec::new();
    for dialect in [Dialect::Value, Dialect::Data] {
        let options = ConductorOptions {
            dialect,
            ..ConductorOptions::default()
        };
        let conn = ConductorConnection::new(addr.as_str(), options).unwrap();
        let signals = conn.signals();
        // An answered request shows the server this client's dialect.
        let answer = conn.request("answer", Value::Nil, None);
        assert_eq!(
            common::within(LIMIT, "answer", answer).await.unwrap(),
            Value::from(42)
        );
        clients.push((dialect, conn, signals));
    }
    let system = map(&[
        ("type", "restore_complete".into()),
        ("value", map(&[("installed_app_id", "app".into())])),
    ]);
    assert_eq!(server.broadcast_system_signal(&system), 2);
    for (dialect, conn, mut signals) in clients {
        let payload = common::within(LIMIT, "the system signal", signals.recv())
            .await
            .unwrap();
        let expected = match dialect {
            Dialect::Value => map(&[("type", "system".into()), ("value", system.clone())]),
            _ => map(&[("System", system.clone())]),
        };
        assert_eq!(payload, expected);
        assert_eq!(
            ConductorSignal::from_payload(&payload),
            ConductorSignal::System(system.clone())
        );
        common::within(LIMIT, "close", conn.close(None))
            .await
            .unwrap();
    }
}

/// As a conductor does for its clients, our client skips (and counts) frames it cannot
/// decode and keeps the connection: here from a raw WebSocket server that sends garbage, a
/// text frame and a signal whose payload is not MessagePack before answering a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_skips_and_reports_undecodable_frames() {
    use tether_wire::conductor::WireMessage;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(sock).await.unwrap();
        let bad_signal = WireMessage::Signal { data: vec![0xc1] };
        for frame in [
            WsMessage::binary(vec![0xa5, b'a']),
            WsMessage::text("hello"),
            WsMessage::binary(bad_signal.encode()),
        ] {
            ws.send(frame).await.unwrap();
        }
        while let Some(Ok(msg)) = ws.next().await {
            if let Ok(WireMessage::Request { id, .. }) = WireMessage::decode(&msg.into_data()) {
                let answer = WireMessage::Response {
                    id,
                    data: Some(Dialect::Value.payload("answer", 42.into())),
                };
                ws.send(WsMessage::binary(answer.encode())).await.unwrap();
            }
        }
    });
    let conn =
        ConductorConnection::new(format!("ws://{addr}"), ConductorOptions::default()).unwrap();
    let answer = conn.request("answer", Value::Nil, None);
    assert_eq!(
        common::within(LIMIT, "answer", answer).await.unwrap(),
        Value::from(42)
    );
    assert_eq!(conn.skipped_frames(), 3);
    assert_eq!(
        common::within(LIMIT, "close", conn.close(None))
            .await
            .unwrap(),
        1000
    );
    common::within(LIMIT, "the raw peer ends", peer)
        .await
        .unwrap();
}

/// The HTTP status of a refused WebSocket upgrade, from a `ConductorError::Dial`'s source.
fn http_status(source: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<u16> {
    match source.downcast_ref::<tokio_tungstenite::tungstenite::Error>()? {
        tokio_tungstenite::tungstenite::Error::Http(response) => Some(response.status().as_u16()),
        _ => None,
    }
}

/// A client that stops reading while signals pile up is closed with 1008 and reported as a
/// slow consumer once its queue is full — never left to miss signals quietly — while a client
/// that reads gets every signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_for_its_signals_is_closed_not_skipped() {
    use tether::conductor::{ConductorServerEvent, CLIENT_QUEUE};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = our_server();
    let mut events = server.events();
    let addr = within("listen", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    // The stalled client: a raw WebSocket that reads nothing until the end.
    let tcp = within(
        "the stalled client's connect",
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .unwrap();
    let (mut stalled, _) = within(
        "the stalled client's upgrade",
        tokio_tungstenite::client_async(format!("ws://{addr}"), tcp),
    )
    .await
    .unwrap();
    let stalled_id = loop {
        if let ConductorServerEvent::Connected(id) =
            within("the stalled client's connect event", events.recv())
                .await
                .unwrap()
        {
            break id;
        }
    };
    let reader =
        ConductorConnection::new(format!("ws://{addr}"), ConductorOptions::default()).unwrap();
    within("the reader's open", reader.open(None))
        .await
        .unwrap();
    let mut signals = reader.signals();

    // Big signals fill the stalled client's socket buffers, then its queue.
    let payload = Value::Binary(vec![7; 32 * 1024]);
    let sent = 2 * CLIENT_QUEUE + 512;
    let mut slow_reported = false;
    for _ in 0..sent {
        server.broadcast_signal(&payload);
        // The reader keeps up: it takes each signal as it comes.
        within("a signal for the reader", signals.recv())
            .await
            .unwrap();
        while let Ok(event) = events.try_recv() {
            if matches!(event, ConductorServerEvent::SlowConsumer(id) if id == stalled_id) {
                slow_reported = true;
            }
        }
    }
    let slow_reported = slow_reported
        || within("the slow-consumer event", async {
            loop {
                match events.recv().await {
                    Ok(ConductorServerEvent::SlowConsumer(id)) if id == stalled_id => break true,
                    Ok(_) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
    assert!(slow_reported);

    // What the stalled client finally reads: signals, then a 1008 close — no silent gap at the
    // end of a connection that stays open.
    let mut received = 0usize;
    let code = within("the stalled client's close", async {
        loop {
            match stalled.next().await {
                Some(Ok(WsMessage::Binary(_))) => received += 1,
                Some(Ok(WsMessage::Close(frame))) => break frame.map(|f| f.code),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{e}"),
                None => break None,
            }
        }
    })
    .await;
    assert_eq!(code, Some(CloseCode::Policy));
    // What was still queued goes with the connection (the protocol has no resume): the
    // close tells the client it must ask again.
    assert!(received < sent, "received {received}");
    // The reader was never affected.
    assert_eq!(
        within("answer", reader.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
}
