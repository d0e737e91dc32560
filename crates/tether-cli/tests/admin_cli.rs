//! `tether serve --admin`: `/metrics` against a scripted workload (parsed with a Prometheus
//! text parser), `/health`, `/ready` and the token, the live admin page in headless Chromium,
//! and a SIGTERM drain whose client restores its session on the next node sharing the store.

mod common;

use common::{run, serve, spawn_serve, within, Proc, DEADLINE};
use serde_json::Value as Json;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tether::{connect, ClientOptions, ConnectionEvent, Value};

/// GET `url` with curl (a real HTTP client); returns the status and the body.
fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = run(cmd.arg(url), "curl");
    let text = String::from_utf8(out.stdout).expect("utf-8 answer");
    let (body, status) = text.rsplit_once('\n').expect("curl wrote the status");
    (status.parse().expect("status code"), body.to_owned())
}

fn scrape(admin: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(&format!("http://{admin}/metrics"), None);
    assert_eq!(status, 200, "/metrics: {body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text")
}

/// The value of the one sample `name` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    match &found[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name}: not a number: {other:?}"),
    }
}

/// The `_count` of histogram `name` for `labels`.
fn histogram_count(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    match &found[0].value {
        prometheus_parse::Value::Histogram(buckets) => {
            buckets.last().expect("an +Inf bucket").count
        }
        other => panic!("{name}: not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_match_a_scripted_workload() {
    let (mut node, ready) = serve(&["--tcp", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let admin = ready["admin"]
        .as_str()
        .expect("the ready line names the admin address");
    let tcp = ready["tcp"][0].as_str().unwrap();

    let conn = within(
        DEADLINE,
        "connect",
        connect(
            &format!("jstp://{tcp}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    const ANSWERS: usize = 7;
    for _ in 0..ANSWERS {
        let r = within(
            DEADLINE,
            "answer",
            conn.call("calculator", "answer", vec![]),
        )
        .await;
        assert_eq!(r.unwrap(), vec![Value::from(42)]);
    }
    for _ in 0..2 {
        let args = vec![Value::from(20), Value::from(10)];
        within(DEADLINE, "divide", conn.call("calculator", "divide", args))
            .await
            .unwrap();
    }
    // A method the application does not have: counted as an error, under empty labels.
    let missing = within(
        DEADLINE,
        "a missing method",
        conn.call("calculator", "nope", vec![]),
    )
    .await;
    assert!(missing.is_err());
    // chat.send broadcasts chat.message: one event sent, to this client.
    within(
        DEADLINE,
        "chat.send",
        conn.call("chat", "send", vec![Value::from("hi")]),
    )
    .await
    .unwrap();
    within(DEADLINE, "the chat event", async {
        loop {
            if let Ok(ConnectionEvent::Event { event, .. }) = events.recv().await {
                if event == "message" {
                    break;
                }
            }
        }
    })
    .await;

    let s = scrape(admin);
    let calls = "tether_calls_total";
    let ok = |m| {
        [
            ("interface", "calculator"),
            ("method", m),
            ("outcome", "ok"),
        ]
    };
    assert_eq!(value(&s, calls, &ok("answer")), ANSWERS as f64);
    assert_eq!(value(&s, calls, &ok("divide")), 2.0);
    assert_eq!(
        value(
            &s,
            calls,
            &[("interface", ""), ("method", ""), ("outcome", "error")]
        ),
        1.0
    );
    let answer = [("interface", "calculator"), ("method", "answer")];
    assert_eq!(
        histogram_count(&s, "tether_call_duration_seconds", &answer),
        ANSWERS as f64
    );
    assert_eq!(
        value(&s, "tether_handshakes_total", &[("outcome", "new")]),
        1.0
    );
    assert_eq!(value(&s, "tether_sessions_started_total", &[]), 1.0);
    let tcp_jstp = [("transport", "tcp"), ("protocol", "jstp")];
    assert_eq!(value(&s, "tether_connections_opened_total", &tcp_jstp), 1.0);
    assert_eq!(value(&s, "tether_connections", &tcp_jstp), 1.0);
    assert_eq!(value(&s, "tether_events_sent_total", &[]), 1.0);
    // The chat event waits in the session's resend buffer until the client confirms it (no
    // message of the client's has done so yet): the live gauge holds its bytes.
    let held = value(&s, "tether_resend_buffer_held_bytes", &[]);
    assert!(
        held > 0.0 && held < 4096.0,
        "resend buffer holds {held} bytes"
    );
    // The new session was written through to the store.
    assert!(
        value(
            &s,
            "tether_store_operations_total",
            &[("op", "set"), ("outcome", "ok")]
        ) >= 1.0
    );

    // The admin endpoint's own HTTP connections count under protocol "http".
    let http = [("transport", "tcp"), ("protocol", "http")];
    assert!(value(&s, "tether_connections_opened_total", &http) >= 1.0);
    assert!(
        !s.samples
            .iter()
            .any(|x| x.metric == "tether_sessions_detached"
                && x.value != prometheus_parse::Value::Gauge(0.0)),
        "no session detached yet"
    );

    // The client goes away without ending its session: the node keeps it detached.
    conn.close().await;
    within(DEADLINE, "tether_sessions_detached to reach 1", async {
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let s = tokio::task::spawn_blocking({
                let admin = admin.to_owned();
                move || scrape(&admin)
            })
            .await
            .unwrap();
            let detached = s
                .samples
                .iter()
                .find(|x| x.metric == "tether_sessions_detached");
            if detached.is_some_and(|x| x.value == prometheus_parse::Value::Gauge(1.0)) {
                assert_eq!(value(&s, "tether_sessions_detached_total", &[]), 1.0);
                break;
            }
        }
    })
    .await;
    assert!(node.terminate(), "serve exits cleanly on SIGTERM");
}

#[tokio::test]
async fn health_ready_and_the_admin_token() {
    let (mut node, ready) = serve(&[
        "--tcp",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--admin-token",
        "s3cret",
    ]);
    let admin = ready["admin"].as_str().unwrap();
    assert_eq!(
        get(&format!("http://{admin}/health"), None),
        (200, "ok\n".into())
    );
    assert_eq!(get(&format!("http://{admin}/metrics"), None).0, 401);
    assert_eq!(
        get(&format!("http://{admin}/metrics"), Some("wrong")).0,
        401
    );
    assert_eq!(
        get(&format!("http://{admin}/metrics"), Some("s3cret")).0,
        200
    );
    assert_eq!(get(&format!("http://{admin}/?token=s3cret"), None).0, 200);
    let (status, body) = get(&format!("http://{admin}/ready"), Some("s3cret"));
    assert_eq!(status, 200, "{body}");
    let body: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(body["store"], "ok");
    assert_eq!(
        get(&format!("http://{admin}/nothing-here"), Some("s3cret")).0,
        404
    );
    assert!(node.terminate());
}

#[test]
fn admin_off_loopback_needs_a_token() {
    let out = run(
        Command::new(common::BIN).args(["serve", "--tcp", "127.0.0.1:0", "--admin", "0.0.0.0:0"]),
        "serve refusing --admin",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-token"), "{err}");
}

#[test]
fn ready_fails_while_the_store_is_unreachable() {
    let (redis, url) = common::redis();
    let (mut node, ready) = serve(&[
        "--tcp",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--store",
        &url,
    ]);
    let admin = ready["admin"].as_str().unwrap();
    assert_eq!(get(&format!("http://{admin}/ready"), None).0, 200);
    drop(redis);
    let (status, body) = get(&format!("http://{admin}/ready"), None);
    assert_eq!(status, 503, "{body}");
    let body: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    assert_ne!(body["store"], "ok");
    // /health is liveness only: still fine.
    assert_eq!(get(&format!("http://{admin}/health"), None).0, 200);
    assert!(node.terminate());
}

fn interop_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

#[tokio::test]
async fn admin_page_in_headless_chromium_shows_live_counters() {
    let (mut node, ready) = serve(&["--tcp", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let admin = ready["admin"].as_str().unwrap().to_owned();
    let tcp = ready["tcp"][0].as_str().unwrap().to_owned();
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("admin-page.png");
    let _ = std::fs::remove_file(&shot);

    let mut driver = Proc(
        Command::new("node")
            .arg(interop_dir().join("admin-page.mjs"))
            .arg(format!("http://{admin}/"))
            .arg(&shot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node is installed"),
    );
    let mut out = driver.stdout_lines("admin-page.mjs");
    let rendered = out.json("the rendered page");
    assert_eq!(rendered["stage"], "rendered", "{rendered}");
    assert_eq!(rendered["calls"], 0);
    assert_eq!(rendered["clients"], 0);
    assert_eq!(rendered["status"], "ready");
    assert_eq!(rendered["listeners"], 1, "one tcp listener row");
    assert_eq!(rendered["errors"], serde_json::json!([]));

    // A client connects and calls: the page's own event stream brings the new figures.
    let conn = within(
        DEADLINE,
        "connect",
        connect(
            &format!("jstp://{tcp}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        within(
            DEADLINE,
            "answer",
            conn.call("calculator", "answer", vec![]),
        )
        .await
        .unwrap();
    }
    let mut stdin = driver.0.stdin.take().unwrap();
    writeln!(stdin, r#"{{"calls":3,"clients":1}}"#).unwrap();
    let updated = out.json("the updated page");
    assert_eq!(updated["stage"], "updated", "{updated}");
    assert_eq!(updated["calls"], 3);
    assert_eq!(updated["clients"], 1);
    assert_eq!(updated["connections"], 1);
    assert_eq!(
        updated["listenerClients"], 1,
        "the tcp listener's row counts the client"
    );
    drop(stdin);
    let done = out.json("the screenshot");
    assert_eq!(done["stage"], "done", "{done}");
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    conn.close().await;
    assert!(node.terminate());
}

/// SIGTERM drains: the node stops, saving the session to the redb store; the next node on the
/// same address and store restores it for the reconnecting client, and a call made while no
/// node was up is delivered, answered, and its broadcast arrives.
#[tokio::test]
async fn sigterm_drains_and_the_next_node_restores_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sessions.redb");
    let db = db.to_str().unwrap();
    let port = common::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let args = ["--tcp", &addr, "--store", db, "--admin", "127.0.0.1:0"];
    let mut first = spawn_serve(&args, true);
    assert_eq!(first.first["ready"], true, "{}", first.first);

    let options = ClientOptions::default().reconnector(tether::reconnect::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
        jitter: Duration::from_millis(10),
        max_attempts: None,
    });
    let conn = within(
        DEADLINE,
        "connect",
        connect(&format!("jstp://{addr}"), "testApp", options),
    )
    .await
    .unwrap();
    let session = conn.session_id().expect("a session");
    let mut events = conn.events();

    // SIGTERM: the node drains and exits by itself, well before the test's deadline.
    let pid = first.proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = common::wait_within(&mut first.proc.0, DEADLINE, "the drained node");
    assert!(status.success(), "{status:?}");
    let log = first.log.as_mut().unwrap().rest("the first node's log");
    assert!(log.iter().any(|l| l.contains("drained")), "{log:#?}");

    // While no node is up the client keeps the call; it goes out after the restore.
    let caller = conn.clone();
    let call = tokio::spawn(async move {
        caller
            .call_with_resend("chat", "send", vec![Value::from("during the restart")])
            .await
    });
    let second = spawn_serve(&args, false);
    assert_eq!(second.first["ready"], true, "{}", second.first);
    let admin = second.first["admin"].as_str().unwrap().to_owned();
    let _second = second.proc;

    within(DEADLINE, "the restore", async {
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::Reconnect { error: None }) => break,
                Ok(_) => {}
                Err(e) => panic!("events ended: {e}"),
            }
        }
    })
    .await;
    assert_eq!(conn.session_id().as_deref(), Some(session.as_str()));
    within(DEADLINE, "the held call", call)
        .await
        .unwrap()
        .unwrap();
    within(DEADLINE, "the broadcast from the second node", async {
        loop {
            if let Ok(ConnectionEvent::Event { args, .. }) = events.recv().await {
                if args.contains(&Value::from("during the restart")) {
                    break;
                }
            }
        }
    })
    .await;
    let s = scrape(&admin);
    assert_eq!(
        value(&s, "tether_handshakes_total", &[("outcome", "restored")]),
        1.0
    );
    assert!(
        !s.samples.iter().any(
            |x| x.metric == "tether_handshakes_total" && x.labels.get("outcome") == Some("new")
        ),
        "the second node started no new session"
    );
    conn.close().await;
}

/// The same graceful restart with a real `@metarhia/jstp` client and a Redis store: the
/// drained node's transport close makes jstp reconnect; the next node restores the session
/// from Redis, answers the call the client made while no node was up, and its broadcast
/// reaches the client.
#[test]
fn sigterm_drain_with_a_metarhia_jstp_client_and_redis() {
    let (_redis, url) = common::redis();
    let port = common::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let args = ["--tcp", &addr, "--store", &url];
    let mut first = spawn_serve(&args, false);
    assert_eq!(first.first["ready"], true, "{}", first.first);

    let mut client = Proc(
        Command::new("node")
            .arg(interop_dir().join("admin-page.drain.mjs"))
            .arg(&port)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node is installed"),
    );
    let mut out = client.stdout_lines("admin-page.drain.mjs");
    let connected = out.json("the jstp client's first answer");
    assert_eq!(connected["step"], "connected", "{connected}");
    let session = connected["session"].as_str().unwrap().to_owned();

    let pid = first.proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = common::wait_within(&mut first.proc.0, DEADLINE, "the drained node");
    assert!(status.success(), "{status:?}");

    let mut stdin = client.0.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let queued = out.json("the queued call");
    assert_eq!(queued["step"], "queued", "{queued}");

    let second = spawn_serve(&args, false);
    assert_eq!(second.first["ready"], true, "{}", second.first);
    let _second = second.proc;
    let mut steps = Vec::new();
    loop {
        let line = out.json("the restore");
        assert!(
            line.get("error").is_none() || line["step"].is_string(),
            "{line}"
        );
        let done = line["step"] == "done";
        steps.push(line);
        if done {
            break;
        }
    }
    let step = |name: &str| {
        steps
            .iter()
            .find(|l| l["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step: {steps:#?}"))
            .clone()
    };
    assert_eq!(step("reconnected")["error"], Json::Null, "{steps:#?}");
    assert_eq!(step("call")["ok"], true, "{steps:#?}");
    step("event");
    assert_eq!(
        step("done")["session"],
        session.as_str(),
        "the same session"
    );
    drop(stdin);
}

/// Conductor-protocol connections count under `protocol="conductor"`: one opened by
/// `tether conductor call`, and none alive once it has gone.
#[test]
fn conductor_connections_are_counted() {
    let (mut node, ready) = serve(&["--conductor", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let admin = ready["admin"].as_str().unwrap().to_owned();
    let conductor = ready["conductor"][0]
        .as_str()
        .expect("a conductor listener");
    let out = run(
        Command::new(common::BIN).args([
            "conductor",
            "call",
            &format!("ws://{conductor}"),
            "answer",
        ]),
        "tether conductor call",
    );
    assert!(out.status.success(), "{out:?}");
    let ws_conductor = [("transport", "ws"), ("protocol", "conductor")];
    let opened = value(
        &scrape(&admin),
        "tether_connections_opened_total",
        &ws_conductor,
    );
    assert_eq!(opened, 1.0);

    // The page's listener row counts a conductor client that stays connected.
    let mut listener = Proc(
        Command::new(common::BIN)
            .args(["conductor", "signals", &format!("ws://{conductor}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tether conductor signals"),
    );
    let row = |admin: &str| -> Json {
        // The first server-sent snapshot; the stream goes on, so curl is stopped after it.
        let mut curl = Proc(
            Command::new("curl")
                .args([
                    "-sSN",
                    "--max-time",
                    "30",
                    &format!("http://{admin}/events"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("curl"),
        );
        let out = curl.0.stdout.take().unwrap();
        let data = std::io::BufRead::lines(std::io::BufReader::new(out))
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .expect("a snapshot from /events");
        let snapshot: Json = serde_json::from_str(&data).unwrap();
        snapshot["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["kind"] == "conductor")
            .cloned()
            .expect("a conductor row")
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while row(&admin)["clients"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the conductor row never counted its client: {}",
            row(&admin)
        );
    }
    drop(listener.0.kill());

    // The gauge drops once the server has seen the clients go.
    let deadline = std::time::Instant::now() + DEADLINE;
    while value(&scrape(&admin), "tether_connections", &ws_conductor) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the conductor connection never left the gauge"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(node.terminate());
}
