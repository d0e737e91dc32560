//! Conductor connections against real peers: the npm client `@whi/holochain-websocket` against
//! our server, our client against a Node server on `ws` + `@msgpack/msgpack` (the pair the
//! conductor clients use), and bad input to our server.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it).

use futures::{SinkExt, StreamExt};
use serde_json::Value as Json;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tether::conductor::{
    ConductorConnection, ConductorError, ConductorOptions, ConductorServer, ConductorServerEvent,
    Value,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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
    ConductorServer::builder()
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
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_client_against_our_server() {
    let server = our_server();
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let mut child = node(&["client", &format!("ws://{addr}")]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut steps = std::collections::HashMap::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the npm client went silent")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_a_node_server() {
    let mut child = node(&["server"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready: Json = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    let port = ready["port"].as_u64().unwrap() as u16;

    // A bare port means ws://127.0.0.1:<port>.
    let options = ConductorOptions {
        name: Some("interop".into()),
        ..ConductorOptions::default()
    };
    let conn = ConductorConnection::new(port, options).unwrap();
    assert!(conn.name().ends_with(":interop"));
    assert_eq!(conn.uri(), format!("ws://127.0.0.1:{port}"));
    conn.open(None).await.unwrap();
    let mut signals = conn.signals();

    assert_eq!(
        conn.request("answer", Value::Nil, None).await.unwrap(),
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
        conn.request("echo", nested.clone(), None).await.unwrap(),
        nested
    );
    match conn.request("fail", Value::Nil, None).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("ribosome_error", "boom")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        conn.request("cancel", Value::Nil, None).await,
        Err(ConductorError::Cancelled)
    ));
    assert_eq!(
        conn.request("signal", "hello".into(), None).await.unwrap(),
        Value::from("sent")
    );
    assert_eq!(signals.recv().await.unwrap(), Value::from("hello"));
    assert!(matches!(
        conn.request("never", Value::Nil, Some(Duration::from_millis(100)))
            .await,
        Err(ConductorError::Timeout { .. })
    ));
    // Garbage from the server is dropped; the connection keeps working.
    assert_eq!(
        conn.request("garbage", Value::Nil, None).await.unwrap(),
        Value::from("ok")
    );
    // flush fails what is pending and says how many.
    let pending: Vec<_> = (0..3)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.request("never", Value::Nil, None).await })
        })
        .collect();
    // Wait until all three are pending: a round trip after them is answered in order.
    conn.request("answer", Value::Nil, None).await.unwrap();
    assert_eq!(conn.flush().await, 3);
    for p in pending {
        assert!(matches!(p.await.unwrap(), Err(ConductorError::Flushed)));
    }
    assert_eq!(conn.close(None).await.unwrap(), 1000);
    assert!(matches!(
        conn.request("answer", Value::Nil, None).await,
        Err(ConductorError::Closed)
    ));
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
        conn.open(None).await,
        Err(ConductorError::Connect(_))
    ));
    assert!(matches!(
        conn.request("answer", Value::Nil, None).await,
        Err(ConductorError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_that_connection() {
    let server = our_server();
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let mut events = server.events();
    let good = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    good.open(None).await.unwrap();

    let envelope = |pairs: Vec<(&str, Value)>| {
        tether_wire::conductor::to_bytes(&Value::Map(
            pairs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        ))
    };
    let cases: Vec<(&str, WsMessage, u16)> = vec![
        ("not msgpack", WsMessage::binary(vec![0xa5, b'a']), 1002),
        ("text", WsMessage::text("{\"type\":\"request\"}"), 1003),
        (
            "unknown type",
            WsMessage::binary(envelope(vec![("type", "gossip".into())])),
            1002,
        ),
        (
            "missing id",
            WsMessage::binary(envelope(vec![
                ("type", "request".into()),
                ("data", Value::Binary(vec![0xc0])),
            ])),
            1002,
        ),
        ("oversized", WsMessage::binary(vec![0u8; 128 * 1024]), 1009),
    ];
    for (name, message, code) in cases {
        let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}"), sock)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let _ = ws.send(message).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: not closed"));
        if let Some(got) = closed {
            assert_eq!(got, code, "{name}");
        }
        loop {
            if let ConductorServerEvent::BadInput { closed, .. } = events.recv().await.unwrap() {
                assert!(closed, "{name}");
                break;
            }
        }
        assert_eq!(
            good.request("answer", Value::Nil, None).await.unwrap(),
            Value::from(42),
            "{name}"
        );
    }
    assert_eq!(server.clients().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_websocket_and_raw_sends() {
    let server = our_server();
    let addr = server.listen("127.0.0.1:0").await.unwrap();
    let mut events = server.events();
    let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}"), sock)
        .await
        .unwrap();
    let conn = ConductorConnection::from_websocket(ws, ConductorOptions::default());
    conn.open(None).await.unwrap();
    assert_eq!(
        conn.request("answer", Value::Nil, None).await.unwrap(),
        Value::from(42)
    );
    // A signal from a client is not part of the protocol: dropped, reported, connection kept.
    conn.send(tether::conductor::MessageKind::Signal, "psst".into(), None)
        .await
        .unwrap();
    loop {
        if let ConductorServerEvent::BadInput { closed, .. } = events.recv().await.unwrap() {
            assert!(!closed);
            break;
        }
    }
    // Requests and responses need an id.
    assert!(matches!(
        conn.send(tether::conductor::MessageKind::Request, Value::Nil, None)
            .await,
        Err(ConductorError::Wire(_))
    ));
    assert_eq!(
        conn.request("answer", Value::Nil, None).await.unwrap(),
        Value::from(42)
    );
    assert_eq!(conn.close(None).await.unwrap(), 1000);
}
