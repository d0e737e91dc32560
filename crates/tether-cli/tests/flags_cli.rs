//! The flags of `tether serve`, `tether call` and `tether bench` that change behaviour, each
//! shown to take effect against the real binary: default listeners, --max-message-size,
//! --handshake-timeout, --client-expiration, call --timeout and --insecure, bench's report.

mod common;

use common::{free_port, run, run_within, spawn_serve, within, LineReader, BIN, DEADLINE};
use serde_json::{json, Value as Json};
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether::reconnect::Attempt;
use tether::testing::CutProxy;
use tether::{connect, ClientOptions, ConnectionEvent, Endpoint, Value};

fn tether(args: &[&str]) -> Output {
    run(Command::new(BIN).args(args), &format!("tether {args:?}"))
}

fn stdout_json(out: &Output) -> Json {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The call every test makes: `calculator.answer()`, which answers `[42]`.
fn answer(url: &str, extra: &[&str]) -> Output {
    let mut args = vec!["call", url, "testApp", "calculator", "answer"];
    args.extend_from_slice(extra);
    tether(&args)
}

#[test]
fn serve_without_listener_flags_listens_on_the_documented_defaults() {
    let mut served = spawn_serve(&[], false);
    if served.first["ready"] == true {
        assert_eq!(
            served.first,
            json!({"ready": true, "tcp": ["127.0.0.1:3000"], "ws": ["127.0.0.1:8080"]})
        );
        for url in ["jstp://127.0.0.1:3000", "ws://127.0.0.1:8080"] {
            let out = answer(url, &[]);
            assert!(out.status.success(), "{url}: {out:?}");
            assert_eq!(stdout_json(&out), json!([42]), "{url}");
        }
        assert!(served.proc.terminate(), "serve did not stop cleanly");
    } else {
        // Something else holds a default port on this machine: serve must say so and exit 1
        // rather than pick another port, and a listener must really be there.
        assert_eq!(
            served.first,
            json!({"error": {"code": null, "message": "i/o error: Address already in use (os error 98)"}})
        );
        let status = common::wait_within(&mut served.proc.0, DEADLINE, "serve that failed");
        assert_eq!(status.code(), Some(1));
        assert!(
            ["127.0.0.1:3000", "127.0.0.1:8080"]
                .iter()
                .any(|a| TcpStream::connect(a).is_ok()),
            "serve reported a default port in use, but nothing listens on either"
        );
    }
}

#[test]
fn max_message_size_refuses_larger_messages_and_passes_smaller_ones() {
    let served = spawn_serve(&["--tcp", "127.0.0.1:0", "--max-message-size", "200"], true);
    let mut log = served.log.unwrap();
    let url = format!("jstp://{}", served.first["tcp"][0].as_str().unwrap());

    // About 140 bytes on the wire.
    let small = format!("'{}'", "s".repeat(100));
    let out = tether(&["call", &url, "testApp", "someService", "sayHi", &small]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        json!([format!("Hi, {}!", "s".repeat(100))])
    );

    // About 340 bytes: the server drops the link each time the call arrives, the client
    // restores and resends it, until the call's own deadline.
    let large = format!("'{}'", "l".repeat(300));
    let out = tether(&[
        "call",
        &url,
        "testApp",
        "someService",
        "sayHi",
        &large,
        "--timeout",
        "3000",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": -3, "message": "request timed out after 3s"}})
    );
    log.find("the server's report of the oversized message", |l| {
        l.contains("error=framing error: message exceeds the maximum size of 200 bytes")
    });
}

/// Reads `sock` until the peer closes it, failing the test after [`DEADLINE`].
fn read_to_eof(sock: &mut TcpStream, what: &str) {
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("waiting for {what} to close: {e}"),
        }
    }
}

/// Whether `sock` is still open: nothing to read yet and no end of stream.
fn still_open(sock: &mut TcpStream) -> bool {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    matches!(sock.read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn handshake_timeout_closes_silent_connections() {
    // Opened first, on a server that waits an hour. If --handshake-timeout were ignored both
    // servers would use the same default, and this socket would close first.
    let (_patient, ready) =
        common::serve(&["--tcp", "127.0.0.1:0", "--handshake-timeout", "3600000"]);
    let mut waits = TcpStream::connect(ready["tcp"][0].as_str().unwrap()).unwrap();

    let strict = spawn_serve(
        &["--tcp", "127.0.0.1:0", "--handshake-timeout", "100"],
        true,
    );
    let mut log = strict.log.unwrap();
    let mut silent = TcpStream::connect(strict.first["tcp"][0].as_str().unwrap()).unwrap();
    read_to_eof(&mut silent, "the silent connection");
    log.find("the server's handshake timeout report", |l| {
        l.contains("handshake timeout")
    });
    assert!(
        still_open(&mut waits),
        "the server with --handshake-timeout 3600000 closed a connection"
    );
}

/// The connection id in a `tether serve` log line (`… id=7 …`).
fn log_id(line: &str) -> u64 {
    let rest = &line[line.find(" id=").unwrap_or_else(|| panic!("no id: {line}")) + 4..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no id: {line}"))
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Cuts a client's link, keeps it from reconnecting until `hold` has seen what it waits for in
/// the server's log, then lets it restore. Returns the server's connection ids before and after.
async fn detach_and_restore(extra: &[&str], hold: impl FnOnce(&mut LineReader, u64)) -> (u64, u64) {
    let mut args = vec!["--tcp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let served = blocking(|| spawn_serve(&args, true));
    let mut log = served.log.unwrap();
    let addr: SocketAddr = served.first["tcp"][0].as_str().unwrap().parse().unwrap();
    let proxy = within(DEADLINE, "the proxy", CutProxy::start(addr))
        .await
        .unwrap();

    let live: Endpoint = format!("jstp://{}", proxy.local_addr()).parse().unwrap();
    let dead: Endpoint = format!("jstp://127.0.0.1:{}", free_port()).parse().unwrap();
    let open = Arc::new(AtomicBool::new(true));
    let gate = open.clone();
    let target = live.clone();
    let give_up = Instant::now() + 2 * DEADLINE;
    let options = ClientOptions::default().reconnector(move |_: u32, _: &Endpoint| {
        (Instant::now() < give_up).then(|| Attempt {
            delay: Duration::from_millis(20),
            endpoint: if gate.load(Ordering::SeqCst) {
                target.clone()
            } else {
                dead.clone()
            },
        })
    });
    let conn = within(
        DEADLINE,
        "the handshake",
        connect(&live.to_string(), "testApp", options),
    )
    .await
    .unwrap();
    let session = conn.session_id();
    let connected =
        blocking(|| log.find("the connect log line", |l| l.contains("client connected")));
    let first_id = log_id(&connected);

    open.store(false, Ordering::SeqCst);
    let mut events = conn.events();
    within(DEADLINE, "the proxied link", proxy.wait_for_links(1)).await;
    assert_eq!(proxy.cut(), 1);
    blocking(|| {
        let line = log.find("the server noticing the cut", |l| {
            l.contains("client disconnected")
        });
        assert_eq!(log_id(&line), first_id, "{line}");
        hold(&mut log, first_id);
    });
    open.store(true, Ordering::SeqCst);

    let restored = async {
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::Reconnect { error: None }) => return,
                Ok(ConnectionEvent::Reconnect { error: Some(e) })
                    if e.starts_with("session restore refused") =>
                {
                    panic!("{e}")
                }
                Ok(ConnectionEvent::Close) => panic!("closed instead of restoring"),
                _ => {}
            }
        }
    };
    within(DEADLINE, "the session restore", restored).await;
    let line = blocking(|| {
        log.find("the restore log line", |l| {
            l.contains("client restored its session")
        })
    });
    assert_eq!(conn.session_id(), session);
    let answer = within(
        DEADLINE,
        "a call on the restored session",
        conn.call("calculator", "answer", vec![]),
    );
    assert_eq!(answer.await.unwrap(), vec![Value::from(42)]);
    within(DEADLINE, "the close", conn.close()).await;
    drop(served.proc);
    (first_id, log_id(&line))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_expiration_hands_a_detached_session_to_the_store() {
    // After --client-expiration the live connection is closed ("session expired") and the
    // session lives on only in the store: the restore builds a new connection from it.
    let (before, after) = detach_and_restore(&["--client-expiration", "100"], |log, id| {
        let line = log.find("the session to expire", |l| l.contains("session expired"));
        assert!(line.contains(&format!("id=Some({id})")), "{line}");
    })
    .await;
    assert_ne!(
        before, after,
        "restored from the live connection, not the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_client_expiration_the_live_connection_is_restored() {
    // The control: with the default hour, the restore adopts the connection still waiting.
    let (before, after) = detach_and_restore(&[], |_, _| {}).await;
    assert_eq!(before, after);
}

/// A TCP listener that accepts connections and never says a word.
fn mute_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept() {
            held.push(sock);
        }
    });
    addr
}

#[test]
fn call_timeout_bounds_a_handshake_that_never_comes() {
    let addr = mute_listener();
    // Shorter than the defaults (10 s to connect, 15 s to handshake), so an ignored
    // --timeout fails here.
    let limit = Duration::from_secs(8);
    let call = |url: &str| {
        run_within(
            Command::new(BIN).args([
                "call",
                url,
                "testApp",
                "calculator",
                "answer",
                "--timeout",
                "300",
            ]),
            limit,
            &format!("call --timeout 300 to {url}"),
        )
    };
    let out = call(&format!("jstp://{addr}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stdout_json(&out)["error"]["code"], -3, "{out:?}");

    let out = call(&format!("ws://{addr}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": null, "message": format!("timed out: connecting to ws://{addr}/ took longer than 300ms")}})
    );
}

#[test]
fn call_timeout_message_names_the_timeout() {
    let addr = mute_listener();
    let out = answer(&format!("jstp://{addr}"), &["--timeout", "300"]);
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": -3, "message": "request timed out after 300ms"}})
    );
}

fn self_signed(dir: &Path, name: &str) -> std::path::PathBuf {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), ck.key_pair.serialize_pem()).unwrap();
    cert
}

#[test]
fn insecure_skips_certificate_verification_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "server");
    let key = dir.path().join("server.key");
    // A certificate of its own, not the server's: verification against it must fail.
    let other = self_signed(dir.path(), "other");
    let (_serve, ready) = common::serve(&[
        "--tls",
        "127.0.0.1:0",
        "--wss",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let other = other.to_str().unwrap();
    for (scheme, kind) in [("jstps", "tls"), ("wss", "wss")] {
        let url = format!("{scheme}://{}", ready[kind][0].as_str().unwrap());

        let out = answer(&url, &[]);
        assert_eq!(out.status.code(), Some(1), "{url}: {out:?}");
        assert_eq!(
            stdout_json(&out),
            json!({"error": {"code": null, "message": "tls error: no trust anchors configured: set a CA certificate (ca_pem), a rustls ClientConfig, or insecure"}}),
            "{url}"
        );

        // (rcgen's self-signed certificates share one name, so webpki tries the other's key
        // and reports a bad signature; any verification failure will do here.)
        let out = answer(&url, &["--ca", other]);
        assert_eq!(out.status.code(), Some(1), "{url}: {out:?}");
        let error = stdout_json(&out)["error"].clone();
        assert_eq!(error["code"], Json::Null, "{url}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "tls error: handshake with 127.0.0.1 failed: invalid peer certificate: "
            ),
            "{url}: {message}"
        );

        for flags in [&["--insecure"][..], &["--ca", other, "--insecure"]] {
            let out = answer(&url, flags);
            assert!(out.status.success(), "{url} {flags:?}: {out:?}");
            assert_eq!(stdout_json(&out), json!([42]), "{url} {flags:?}");
        }
    }
}

fn lines_json(out: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[test]
fn bench_prints_one_well_formed_line_per_case() {
    let out = tether(&[
        "bench",
        "--duration",
        "0.5",
        "--in-flight",
        "4",
        "--payload",
        "8",
        "--restores",
        "5",
    ]);
    assert!(out.status.success(), "{out:?}");
    let lines = lines_json(&out);
    let names: Vec<&str> = lines.iter().map(|l| l["bench"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["raw_tcp_echo", "jstp_tcp", "jstp_ws", "reconnect_restore"]
    );
    let keys = |l: &Json| {
        let mut k: Vec<String> = l.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    for l in &lines[..3] {
        assert_eq!(l["in_flight"], 4, "{l}");
        assert_eq!(l["payload"], 8, "{l}");
        // Every case completes calls in its window.
        assert!(l["calls_per_s"].as_f64().unwrap() > 0.0, "{l}");
    }
    assert_eq!(
        keys(&lines[0]),
        ["bench", "calls_per_s", "in_flight", "payload"]
    );
    for l in &lines[1..3] {
        assert_eq!(
            keys(l),
            [
                "bench",
                "calls_per_s",
                "in_flight",
                "payload",
                "ratio_to_raw_echo"
            ]
        );
        assert!(l["ratio_to_raw_echo"].as_f64().unwrap() > 0.0, "{l}");
    }
    let r = &lines[3];
    assert_eq!(r["samples"], 5);
    let us = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(us("p50_us") <= us("p99_us"), "{r}");
    assert!(
        us("fresh_connect_p50_us") <= us("fresh_connect_p99_us"),
        "{r}"
    );
    let ratio =
        (us("p50_us") as f64 / us("fresh_connect_p50_us").max(1) as f64 * 1000.0).round() / 1000.0;
    assert_eq!(r["ratio_to_fresh_connect"].as_f64().unwrap(), ratio, "{r}");

    // No restores asked for: no restore line.
    let out = tether(&["bench", "--duration", "0.05", "--restores", "0"]);
    assert!(out.status.success(), "{out:?}");
    let names: Vec<Json> = lines_json(&out)
        .iter()
        .map(|l| l["bench"].clone())
        .collect();
    assert_eq!(
        names,
        [json!("raw_tcp_echo"), json!("jstp_tcp"), json!("jstp_ws")]
    );

    let out = tether(&["bench", "--duration", "0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": null, "message": "invalid argument: --in-flight and --duration must be positive"}})
    );
}
