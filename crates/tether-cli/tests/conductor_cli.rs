//! `tether serve --conductor`: the example app over the conductor protocol, with a signal for
//! every chat message sent over JSTP.

mod common;

use common::{serve, within, DEADLINE};
use tether::conductor::{AppSignal, ConductorConnection, ConductorError, ConductorOptions, Value};
use tether::{connect, ClientOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_hosts_the_example_app_on_the_conductor_protocol() {
    let (_serve, ready) = serve(&["--tcp", "127.0.0.1:0", "--conductor", "127.0.0.1:0"]);
    let addr = ready["conductor"][0].as_str().unwrap();
    let conductor = ConductorConnection::new(addr, ConductorOptions::default()).unwrap();
    within(DEADLINE, "the conductor handshake", conductor.open(None))
        .await
        .unwrap();
    let mut signals = conductor.signals();
    let request = |name: &'static str, args: Value| {
        within(DEADLINE, name, conductor.request(name, args, None))
    };
    assert_eq!(
        request("answer", Value::Nil).await.unwrap(),
        Value::from(42)
    );
    let args = |a: i64, b: i64| Value::Map(vec![("a".into(), a.into()), ("b".into(), b.into())]);
    assert_eq!(
        request("divide", args(20, 10)).await.unwrap(),
        Value::from(2.0)
    );
    match request("divide", args(1, 0)).await {
        Err(ConductorError::Remote { kind, message }) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("internal_error", "Zero division")
            )
        }
        other => panic!("{other:?}"),
    }
    let name = Value::Map(vec![("name".into(), "Rust".into())]);
    assert_eq!(
        request("say_hi", name).await.unwrap(),
        Value::from("Hi, Rust!")
    );

    // A chat message over JSTP becomes a conductor signal.
    let url = format!("jstp://{}", ready["tcp"][0].as_str().unwrap());
    let jstp = within(
        DEADLINE,
        "the JSTP handshake",
        connect(&url, "testApp", ClientOptions::default()),
    )
    .await
    .unwrap();
    within(
        DEADLINE,
        "chat.send",
        jstp.call("chat", "send", vec!["hello".into()]),
    )
    .await
    .unwrap();
    let signal = within(DEADLINE, "the chat signal", signals.recv())
        .await
        .unwrap();
    // An app signal from zome `chat`, `{type:"app", value:{cell_id, zome_name, signal}}`.
    let app = AppSignal::from_signal(&signal).unwrap_or_else(|| panic!("{signal}"));
    assert_eq!(signal.as_map().unwrap()[0].1, Value::from("app"));
    assert_eq!(app.zome_name, "chat");
    let expected = Value::Map(vec![
        ("type".into(), "chat".into()),
        ("user".into(), Value::Nil),
        ("text".into(), "hello".into()),
    ]);
    assert_eq!(app.signal, expected);
    within(DEADLINE, "the JSTP close", jstp.close()).await;
    let code = within(DEADLINE, "the conductor close", conductor.close(None)).await;
    assert_eq!(code.unwrap(), 1000);
}

/// `tether conductor …` with `args`, to completion; its exit code and stdout lines as JSON.
fn conductor(args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>) {
    let out = common::run(
        std::process::Command::new(common::BIN)
            .arg("conductor")
            .args(args),
        "tether conductor",
    );
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    (out.status.code(), lines)
}

/// Starts `tether conductor signals ARGS…` and reads its ready line.
fn signals(args: &[&str]) -> (common::Proc, common::LineReader) {
    let child = std::process::Command::new(common::BIN)
        .args(["conductor", "signals"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot start tether conductor signals");
    let mut proc = common::Proc(child);
    let mut lines = proc.stdout_lines("conductor signals");
    assert_eq!(
        lines.json("the ready line"),
        serde_json::json!({"listening": true})
    );
    (proc, lines)
}

#[test]
fn conductor_call_and_signals_against_tether_serve() {
    let origin = "http://cli.test";
    let (_serve, ready) = serve(&[
        "--tcp",
        "127.0.0.1:0",
        "--conductor",
        "127.0.0.1:0",
        "--conductor-token",
        "t0ken",
        "--conductor-token",
        "other",
        "--conductor-origin",
        origin,
    ]);
    let url = format!("ws://{}", ready["conductor"][0].as_str().unwrap());
    let auth = ["--token", "t0ken", "--origin", origin];
    let call = |extra: &[&str]| conductor(&[&["call", url.as_str()], extra, &auth].concat());

    assert_eq!(
        call(&["answer"]),
        (Some(0), vec![serde_json::json!({"result": 42})])
    );
    assert_eq!(
        call(&["divide", r#"{"a":20,"b":8}"#]),
        (Some(0), vec![serde_json::json!({"result": 2.5})])
    );
    // The older dialect is answered in kind.
    assert_eq!(
        call(&["say_hi", r#"{"name":"CLI"}"#, "--dialect", "data"]),
        (Some(0), vec![serde_json::json!({"result": "Hi, CLI!"})])
    );
    // An error answer: its kind and message, exit status 1.
    let error = |kind: &str, message: &str| serde_json::json!({"error": {"kind": kind, "message": message}});
    assert_eq!(
        call(&["divide", r#"{"a":1,"b":0}"#]),
        (Some(1), vec![error("internal_error", "Zero division")])
    );
    // A bad JSON argument is a usage error (2) and prints nothing.
    assert_eq!(call(&["divide", "{a:1"]), (Some(2), vec![]));

    // The listener's requirements: a token (else closed) and an allowed Origin (else HTTP 400).
    let (code, lines) = conductor(&["call", &url, "answer", "--origin", origin]);
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("closed"))
    );
    let (code, lines) = conductor(&["call", &url, "answer", "--token", "t0ken"]);
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("connect"))
    );
    let (code, lines) = conductor(&[
        "call", &url, "answer", "--origin", origin, "--token", "other",
    ]);
    assert_eq!(
        (code, lines),
        (Some(0), vec![serde_json::json!({"result": 42})])
    );

    // `signals` confirms its token before the ready line: a wrong one fails at once.
    let (code, lines) = conductor(&["signals", &url, "--token", "wrong", "--origin", origin]);
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("closed"))
    );

    // `signals` prints the chat's app signal, decoded, then exits after --count.
    let (mut proc, mut lines) =
        signals(&[&url, "--count", "1", "--token", "t0ken", "--origin", origin]);
    let jstp = format!("jstp://{}", ready["tcp"][0].as_str().unwrap());
    let sent = common::run(
        std::process::Command::new(common::BIN)
            .args(["call", &jstp, "testApp", "chat", "send", "'hi'"]),
        "tether call chat.send",
    );
    assert!(sent.status.success());
    let signal = lines.json("the chat signal");
    assert_eq!(signal["type"], "app");
    assert_eq!(signal["zome_name"], "chat");
    assert_eq!(
        signal["signal"],
        serde_json::json!({"type": "chat", "user": null, "text": "hi"})
    );
    assert_eq!(signal["cell_id"][0].as_array().map(Vec::len), Some(39));
    let status = common::wait_within(&mut proc.0, DEADLINE, "conductor signals --count 1");
    assert!(status.success());
}

fn hc_peer_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("TETHER_HC_PEER") {
        return path.into();
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../interop/hc-peer/target/debug/hc-peer");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --manifest-path interop/hc-peer/Cargo.toml` \
         (or set TETHER_HC_PEER to the binary)",
        path.display()
    );
    path
}

/// The CLI against a server on Holochain's own `holochain_websocket` crate (`interop/hc-peer`).
#[test]
fn conductor_cli_against_the_holochain_websocket_crate() {
    let origin = "http://cli.test";
    let child = std::process::Command::new(hc_peer_binary())
        .args(["--token", "hc", "--origin", origin])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hc-peer starts");
    let mut peer = common::Proc(child);
    let port = peer.stdout_lines("hc-peer").json("hc-peer's port line")["port"]
        .as_u64()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}");
    let auth = ["--token", "hc", "--origin", origin];
    let call = |extra: &[&str]| conductor(&[&["call", url.as_str()], extra, &auth].concat());

    assert_eq!(
        call(&["answer"]),
        (Some(0), vec![serde_json::json!({"result": 42})])
    );
    assert_eq!(
        call(&["divide", r#"{"a":1,"b":0}"#]),
        (
            Some(1),
            vec![
                serde_json::json!({"error": {"kind": "internal_error", "message": "Zero division"}})
            ]
        )
    );
    // --timeout bounds the request: the peer answers `sleep` after 5 s.
    let (code, lines) = conductor(
        &[
            &[
                "call",
                url.as_str(),
                "sleep",
                r#"{"ms":5000}"#,
                "--timeout",
                "300",
            ],
            &auth[..],
        ]
        .concat(),
    );
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("timeout"))
    );
    let (code, lines) = conductor(&["call", &url, "answer", "--token", "hc"]);
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("connect"))
    );

    let (mut proc, mut lines) =
        signals(&[&url, "--count", "2", "--token", "hc", "--origin", origin]);
    assert_eq!(call(&["emit_signal", r#"{"text":"hey"}"#]).0, Some(0));
    assert_eq!(call(&["emit_system_signal"]).0, Some(0));
    let app = lines.json("the app signal");
    assert_eq!(
        (app["type"].as_str(), app["zome_name"].as_str()),
        (Some("app"), Some("chat"))
    );
    assert_eq!(
        app["signal"],
        serde_json::json!({"type": "chat", "text": "hey"})
    );
    let system = lines.json("the system signal");
    assert_eq!(system["type"], "system");
    assert_eq!(system["value"]["type"], "successful_countersigning");
    let status = common::wait_within(&mut proc.0, DEADLINE, "conductor signals --count 2");
    assert!(status.success());
}

/// `wss://` with `--ca` (trust a CA file) or `--insecure`, against the Node conductor-style
/// server of `interop/conductor-peer.mjs` over TLS; without either the handshake fails.
#[test]
fn conductor_call_over_wss_with_ca_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let interop = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    assert!(
        interop.join("node_modules/ws").exists(),
        "interop/node_modules is missing: run `npm ci --ignore-scripts` in interop/"
    );
    let child = std::process::Command::new("node")
        .arg(interop.join("conductor-peer.mjs"))
        .arg("server")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node is not installed");
    let mut peer = common::Proc(child);
    let ready = peer.stdout_lines("conductor-peer").json("its ready line");
    assert_eq!(ready["tls"], true, "{ready}");
    let url = format!("wss://127.0.0.1:{}", ready["port"]);
    let ok = (Some(0), vec![serde_json::json!({"result": 42})]);
    let cert = cert.to_str().unwrap();
    assert_eq!(conductor(&["call", &url, "answer", "--ca", cert]), ok);
    assert_eq!(conductor(&["call", &url, "answer", "--insecure"]), ok);
    let (code, lines) = conductor(&["call", &url, "answer"]);
    assert_eq!(
        (code, lines[0]["error"]["kind"].as_str()),
        (Some(1), Some("connect"))
    );
}

/// Peak resident memory of process `pid` (`VmHWM` in /proc), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

/// Sends request `id` with payload bytes `data` on a raw WebSocket and returns the decoded
/// payload of its response.
async fn exchange(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    id: u64,
    data: Vec<u8>,
) -> tether_wire::conductor::Payload {
    use futures::{SinkExt, StreamExt};
    use tether_wire::conductor::{Payload, WireMessage};
    let request = WireMessage::Request { id, data }.encode();
    within(DEADLINE, "send a request", ws.send(request.into()))
        .await
        .unwrap();
    let reply = within(DEADLINE, "its response", ws.next())
        .await
        .unwrap()
        .unwrap();
    match WireMessage::decode(&reply.into_data()).unwrap() {
        WireMessage::Response { id: got, data } if got == id => {
            Payload::decode(&data.unwrap()).unwrap()
        }
        other => panic!("{other:?}"),
    }
}

/// Issue 17's probe, as an attacker would send it: one conductor request of nearly 16 MiB of
/// MessagePack nils to `tether serve --conductor`. It used to cost the server +672 MiB (each
/// one-byte nil decoded into a 40-byte value); now it is refused before decoding, answered with
/// the conductor's `deserialization` error, and the server's peak memory grows by a small
/// multiple of the message (bounded here at 8×, far under the 40× it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_nils_costs_the_server_a_small_multiple_of_its_size() {
    use tether_wire::conductor::{Dialect, Payload};
    let (serve, ready) = serve(&["--conductor", "127.0.0.1:0"]);
    let addr = ready["conductor"][0].as_str().unwrap().to_owned();
    let sock = within(
        DEADLINE,
        "tcp connect",
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .unwrap();
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(32 << 20))
        .max_frame_size(Some(32 << 20));
    let (mut ws, _) = within(
        DEADLINE,
        "the websocket handshake",
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}"), sock, Some(config)),
    )
    .await
    .unwrap();
    let answer = exchange(&mut ws, 1, Dialect::Value.payload("answer", Value::Nil)).await;
    assert_eq!(answer.content, 42.into());
    let before = peak_rss(serve.0.id());

    let n = (16 << 20) - 64; // under the server's 16 MiB message limit with the envelope
    let mut nils = vec![0xdd];
    nils.extend_from_slice(&(n as u32).to_be_bytes());
    nils.resize(5 + n, 0xc0);
    let refused = exchange(&mut ws, 2, nils).await;
    assert_eq!(refused.kind, "error");
    let error = Payload::from_value(refused.content).unwrap();
    assert_eq!(error.kind, "deserialization");

    let grew = peak_rss(serve.0.id()).saturating_sub(before);
    eprintln!(
        "peak RSS grew by {} KiB for a {} KiB request",
        grew >> 10,
        n >> 10
    );
    assert!(
        grew < 8 * (16 << 20),
        "peak RSS grew by {} MiB for a 16 MiB request",
        grew >> 20
    );
    // The connection goes on.
    let again = exchange(&mut ws, 3, Dialect::Value.payload("answer", Value::Nil)).await;
    assert_eq!(again.content, 42.into());
}
