//! tether's `ConductorConnection` against a server built on Holochain's own
//! `holochain_websocket` crate (0.7.1) and `holochain_types`' `Signal`: `interop/hc-peer`,
//! shaped like a Holochain >= 0.5 app interface (the crate's Origin check, `authenticate` first
//! within 10 s, `{type, value}` payloads, conductor-shaped errors and signals).
//!
//! The peer is a separate cargo project (about 300 crates of Holochain), built once by `.ci/run`:
//! `cargo build --manifest-path interop/hc-peer/Cargo.toml`. `TETHER_HC_PEER` may name the
//! binary instead; a missing binary fails the test with the command to build it.

mod common;

use common::{within, LIMIT};
use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tether::conductor::{
    ConductorConnection, ConductorError, ConductorOptions, ConductorSignal, DialStage, Dialect,
    Value,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The token the peer is started with (`--token`).
const TOKEN: &[u8] = b"s3cret-token";
/// The one origin the peer allows (`--origin`).
const ORIGIN: &str = "http://tether.test";

fn hc_peer_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_HC_PEER") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../interop/hc-peer/target/debug/hc-peer");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --manifest-path interop/hc-peer/Cargo.toml` \
         (or set TETHER_HC_PEER to the binary)",
        path.display()
    );
    path
}

/// Starts the peer and returns it (killed on drop) and its `ws://` URL.
async fn hc_peer() -> (Child, String) {
    let mut child = Command::new(hc_peer_binary())
        .args(["--token", std::str::from_utf8(TOKEN).unwrap()])
        .args(["--origin", ORIGIN])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("hc-peer starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = within(LIMIT, "hc-peer's port line", lines.next_line())
        .await
        .unwrap()
        .expect("hc-peer ended before printing its port");
    let ready: Json = serde_json::from_str(&ready).unwrap();
    let port = ready["port"].as_u64().expect("a port");
    (child, format!("ws://127.0.0.1:{port}"))
}

fn options(origin: Option<&str>, dialect: Dialect) -> ConductorOptions {
    ConductorOptions {
        origin: origin.map(str::to_owned),
        dialect,
        ..ConductorOptions::default()
    }
}

fn map(entries: &[(&str, Value)]) -> Value {
    Value::Map(
        entries
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    )
}

/// Opens and authenticates, as a client of an app interface must.
async fn authenticated(url: &str, dialect: Dialect) -> ConductorConnection {
    let conn = ConductorConnection::new(url, options(Some(ORIGIN), dialect)).unwrap();
    within(LIMIT, "the handshake", conn.open(None))
        .await
        .unwrap();
    within(LIMIT, "authenticate", conn.authenticate(TOKEN))
        .await
        .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_the_holochain_websocket_crate() {
    let (_peer, url) = hc_peer().await;
    let conn = authenticated(&url, Dialect::Value).await;
    let mut signals = conn.signals();
    let request =
        |kind: &'static str, args: Value| within(LIMIT, kind, conn.request(kind, args, None));

    // Unit requests, requests with content and results: the crate's serde reads our
    // `{type, value}` and we read its answers.
    assert_eq!(
        request("answer", Value::Nil).await.unwrap(),
        Value::from(42)
    );
    let divide = |a: f64, b: f64| map(&[("a", a.into()), ("b", b.into())]);
    assert_eq!(
        request("divide", divide(20.0, 8.0)).await.unwrap(),
        Value::from(2.5)
    );
    let hi = request("say_hi", map(&[("name", "Rust".into())])).await;
    assert_eq!(hi.unwrap(), Value::from("Hi, Rust!"));

    // Errors in the conductor's shape keep their kind and message.
    match request("divide", divide(1.0, 0.0)).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("internal_error", "Zero division")
            )
        }
        other => panic!("{other:?}"),
    }
    // A request the crate cannot deserialize is answered (not dropped), as by a conductor.
    match request("no_such_request", Value::Nil).await {
        Err(ConductorError::Remote { kind, .. }) => assert_eq!(kind, "deserialization"),
        other => panic!("{other:?}"),
    }

    // An app signal: holochain_types' `Signal::App`, its cell id two 39-byte hashes and its
    // payload the ExternIO-encoded bytes of the app's value.
    let emitted = request("emit_signal", map(&[("text", "hello".into())])).await;
    assert_eq!(emitted.unwrap(), Value::Nil);
    let payload = within(LIMIT, "the app signal", signals.recv())
        .await
        .unwrap();
    let ConductorSignal::App(app) = ConductorSignal::from_payload(&payload) else {
        panic!("not an app signal: {payload}")
    };
    assert_eq!(app.zome_name, "chat");
    assert_eq!(app.cell_id.dna_hash.len(), 39);
    assert_eq!(&app.cell_id.dna_hash[..3], &[0x84, 0x2d, 0x24]);
    assert_eq!(&app.cell_id.agent_pub_key[..3], &[0x84, 0x20, 0x24]);
    assert_eq!(
        app.signal,
        map(&[("type", "chat".into()), ("text", "hello".into())])
    );

    // A system signal: `{type:"system", value:{type:"successful_countersigning", value:<hash>}}`.
    request("emit_system_signal", Value::Nil).await.unwrap();
    let payload = within(LIMIT, "the system signal", signals.recv())
        .await
        .unwrap();
    let ConductorSignal::System(system) = ConductorSignal::from_payload(&payload) else {
        panic!("not a system signal: {payload}")
    };
    let system = system.as_map().expect("a tagged SystemSignal");
    assert_eq!(system[0].1, Value::from("successful_countersigning"));
    match &system[1].1 {
        Value::Binary(hash) => assert_eq!(&hash[..3], &[0x84, 0x21, 0x24]), // an EntryHash
        other => panic!("{other}"),
    }
    assert_eq!(conn.skipped_frames(), 0);

    // A typed timeout, after which the connection still serves requests.
    let slow = conn.request(
        "sleep",
        map(&[("ms", 3_000.into())]),
        Some(Duration::from_millis(100)),
    );
    match within(LIMIT, "the timed-out request", slow).await {
        Err(ConductorError::Timeout { after, .. }) => {
            assert_eq!(after, Duration::from_millis(100))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        request("answer", Value::Nil).await.unwrap(),
        Value::from(42)
    );
    within(LIMIT, "the close", conn.close(None)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crate_refuses_what_a_conductor_refuses() {
    let (_peer, url) = hc_peer().await;

    // No Origin header, or one not allowed: HTTP 400 from the crate's listener.
    for origin in [None, Some("http://elsewhere.test")] {
        let conn = ConductorConnection::new(url.as_str(), options(origin, Dialect::Value)).unwrap();
        match within(LIMIT, "a refused handshake", conn.open(None)).await {
            Err(ConductorError::Dial {
                stage: DialStage::WebSocket,
                source,
                ..
            }) => match source.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
                Some(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status().as_u16(), 400)
                }
                other => panic!("{other:?}"),
            },
            other => panic!("origin {origin:?}: {other:?}"),
        }
    }

    // A wrong token, or a request before `authenticate`: the connection is dropped.
    let conn =
        ConductorConnection::new(url.as_str(), options(Some(ORIGIN), Dialect::Value)).unwrap();
    within(LIMIT, "the handshake", conn.open(None))
        .await
        .unwrap();
    within(LIMIT, "authenticate", conn.authenticate(b"wrong"))
        .await
        .unwrap();
    let refused = within(
        LIMIT,
        "a refused request",
        conn.request("answer", Value::Nil, None),
    );
    assert!(matches!(refused.await, Err(ConductorError::Closed)));

    let conn =
        ConductorConnection::new(url.as_str(), options(Some(ORIGIN), Dialect::Value)).unwrap();
    within(LIMIT, "the handshake", conn.open(None))
        .await
        .unwrap();
    let refused = within(
        LIMIT,
        "an unauthenticated request",
        conn.request("answer", Value::Nil, None),
    );
    assert!(matches!(refused.await, Err(ConductorError::Closed)));

    // The 0.1–0.4 dialect (`{type, data}`) is what today's conductor cannot read: a request
    // with content is a deserialization error, a unit request still works.
    let old = authenticated(&url, Dialect::Data).await;
    assert_eq!(
        within(LIMIT, "answer", old.request("answer", Value::Nil, None))
            .await
            .unwrap(),
        Value::from(42)
    );
    let args = map(&[("a", 1.0.into()), ("b", 2.0.into())]);
    match within(LIMIT, "divide", old.request("divide", args, None)).await {
        Err(ConductorError::Remote { kind, .. }) => assert_eq!(kind, "deserialization"),
        other => panic!("{other:?}"),
    }
    within(LIMIT, "the close", old.close(None)).await.unwrap();
}
