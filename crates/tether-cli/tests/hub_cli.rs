//! `tether hub` against real `tether serve` processes: every event line carries the address,
//! key and direction; a killed peer is redialled once it restarts on its port; a frozen
//! (SIGSTOPped) peer is dropped by the liveness check and redialled after SIGCONT; a failed
//! dial stays in `--table` with its error; `tls:` and `wss://` peers are reached with `--ca`
//! or `--insecure`; bad addresses (and layers tether cannot verify) are refused; the hub stops
//! cleanly; every event kind it can produce is printed; `--book` survives a restart and
//! `--stage` dials nothing; `--call` and `--listen` use the connected peers.

mod common;

use common::{free_port, run, serve, wait_within, LineReader, Proc, BIN, DEADLINE};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::process::{Command, Stdio};

const KEY: &str = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";

/// `tether hub ARGS…` with its stdout as lines.
fn hub(args: &[&str]) -> (Proc, LineReader) {
    let mut hub = Proc(
        Command::new(BIN)
            .arg("hub")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = hub.stdout_lines("hub");
    if !args.contains(&"--table") && !args.contains(&"--book") {
        assert_eq!(
            lines.json("the first table"),
            serde_json::json!({"entries": []})
        );
    }
    (hub, lines)
}

/// Reads event lines until one of `kind` for `address`; checks that every line read names its
/// key and direction (`null` when there is none).
fn until(lines: &mut LineReader, kind: &str, address: &str) -> Json {
    let what = format!("a {kind} line for {address}");
    loop {
        let line = lines.json(&what);
        assert!(line.get("key").is_some(), "no key: {line}");
        assert!(line.get("direction").is_some(), "no direction: {line}");
        if line["event"] == kind && line["address"] == address {
            return line;
        }
    }
}

/// Like [`until`], keeping every line read in `seen`.
fn until_noting(lines: &mut LineReader, kind: &str, address: &str, seen: &mut Vec<Json>) -> Json {
    let what = format!("a {kind} line for {address}");
    loop {
        let line = lines.json(&what);
        seen.push(line.clone());
        if line["event"] == kind && line["address"] == address {
            return line;
        }
    }
}

fn signal(proc: &Proc, sig: &str) {
    let pid = proc.0.id().to_string();
    let status = Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// After the hub is terminated: each address's last two events are `disconnecting` and a
/// `disconnected` with cause `requested`.
fn assert_clean_stop(hub: &mut Proc, lines: &mut LineReader, addresses: &[&str]) {
    assert!(hub.terminate(), "hub did not stop cleanly");
    let mut per_address: HashMap<String, Vec<Json>> = HashMap::new();
    for l in lines.rest("the hub's last events") {
        let line: Json = serde_json::from_str(&l).unwrap();
        let address = line["address"].as_str().unwrap().to_owned();
        per_address.entry(address).or_default().push(line);
    }
    for a in addresses {
        let events = &per_address[*a];
        let kinds: Vec<&str> = events.iter().filter_map(|l| l["event"].as_str()).collect();
        assert_eq!(
            kinds[kinds.len() - 2..],
            ["disconnecting", "disconnected"],
            "{a}"
        );
        assert_eq!(events.last().unwrap()["cause"], "requested", "{a}");
    }
}

#[test]
fn hub_lines_carry_key_and_direction_and_a_killed_peer_is_redialled_once_restarted() {
    let (first, ready1) = serve(&["--tcp", "127.0.0.1:0"]);
    let (_second, ready2) = serve(&["--ws", "127.0.0.1:0"]);
    let tcp = ready1["tcp"][0].as_str().unwrap().to_owned();
    // `noauth` promises nothing, so tether may dial it (an `shs` layer is refused below).
    let a1 = format!("net:{tcp}~noauth");
    let a2 = format!("ws://{}", ready2["ws"][0].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers.txt");
    std::fs::write(&file, format!("# peers\n{a2}\n\n")).unwrap();
    let file = file.to_str().unwrap();
    // Fresh dials, quick redials.
    let flags = ["--no-resume", "--redial-min", "50", "--redial-max", "400"];
    let mut args = vec![a1.as_str(), "--file", file];
    args.extend(flags);
    let (mut hub, mut lines) = hub(&args);
    // No layer carries a key tether verifies: every line says so with `null`.
    let key = Json::Null;
    // Both connected, in either order, each line with its key and direction.
    let mut up = HashMap::new();
    while up.len() < 2 {
        let line = lines.json("the connected lines");
        assert!(
            line.get("key").is_some() && line.get("direction").is_some(),
            "{line}"
        );
        if line["event"] == "connected" {
            up.insert(line["address"].as_str().unwrap().to_owned(), line);
        }
    }
    assert_eq!(up[&a1]["key"], key);
    assert_eq!(up[&a2]["key"], Json::Null);
    for line in up.values() {
        assert_eq!(line["direction"], "outbound");
    }

    // Kill the first peer outright: the hub reports it gone, with why, and redials it.
    let mut first = first;
    first.0.kill().unwrap();
    wait_within(&mut first.0, DEADLINE, "the killed peer");
    let gone = until(&mut lines, "disconnected", &a1);
    assert_eq!(gone["cause"], "connection closed");
    assert_eq!(
        (&gone["key"], &gone["direction"]),
        (&key, &Json::from("outbound"))
    );
    let redial = until(&mut lines, "redialing", &a1);
    assert_eq!(redial["failures"], 1);
    // The first redial waits the backoff's first step: 50 ms plus up to 50 ms of jitter.
    let delay = redial["delay_ms"].as_u64().unwrap();
    assert!((50..100).contains(&delay), "{redial}");
    let failed = until(&mut lines, "connecting-failed", &a1);
    assert!(
        failed["error"].as_str().unwrap().contains("refused"),
        "{failed}"
    );
    assert_eq!(failed["key"], key);

    // Back on the same port: dialled again, without being asked.
    let (_back, _) = serve(&["--tcp", &tcp]);
    let up = until(&mut lines, "connected", &a1);
    assert_eq!(up["direction"], "outbound");

    assert_clean_stop(&mut hub, &mut lines, &[&a1, &a2]);
}

#[test]
fn hub_drops_a_frozen_peer_by_heartbeat_and_redials_it_after_sigcont() {
    let (peer, ready) = serve(&["--tcp", "127.0.0.1:0"]);
    let address = format!("net:{}", ready["tcp"][0].as_str().unwrap());
    let (mut hub, mut lines) = hub(&[
        &address,
        "--heartbeat",
        "300",
        "--timeout",
        "600",
        "--redial-min",
        "50",
        "--redial-max",
        "200",
    ]);
    until(&mut lines, "connected", &address);
    signal(&peer, "-STOP");
    let gone = until(&mut lines, "disconnected", &address);
    assert_eq!(gone["cause"], "no pong within 300ms");
    // Still stopped: the kernel accepts the redial's TCP connection, nobody answers it.
    let failed = until(&mut lines, "connecting-failed", &address);
    assert!(
        failed["error"].as_str().unwrap().contains("timed out"),
        "{failed}"
    );
    signal(&peer, "-CONT");
    until(&mut lines, "connected", &address);
    assert_clean_stop(&mut hub, &mut lines, &[&address]);
}

#[test]
fn hub_refuses_bad_addresses() {
    let out = run(
        Command::new(BIN).args(["hub", "net:127.0.0.1:1~shs:notakey"]),
        "hub with a bad key",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer key"));
    // A valid key in any multiserver form parses, and is refused because nothing here can
    // verify it (no secret-handshake), before anything is dialled.
    for key in [KEY, KEY.trim_end_matches('=')] {
        let address = format!("net:127.0.0.1:1~shs:{key}");
        let out = run(
            Command::new(BIN).args(["hub", &address]),
            "hub with an shs layer",
        );
        assert_eq!(out.status.code(), Some(2), "{address}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("\"shs\" layer") && stderr.contains("secret-handshake"),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "{address}: dialled anyway");
    }
    // A bad or missing port is refused before anything is dialled.
    for (address, says) in [
        ("net:127.0.0.1", "net address without a port"),
        ("net:127.0.0.1:http", "invalid port \"http\" in net address"),
        ("ws://127.0.0.1:99999", "invalid port"),
    ] {
        let out = run(
            Command::new(BIN).args(["hub", address]),
            "hub with a bad port",
        );
        assert_eq!(out.status.code(), Some(2), "{address}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{address}: {stderr}");
        assert!(out.stdout.is_empty(), "{address}: dialled anyway");
    }
}

/// One row of `tether hub --table`: state, direction, address and the error (may be empty).
fn row(line: &str) -> (String, String, String, String) {
    let mut cols = line.split_whitespace();
    let mut col = || cols.next().unwrap_or_default().to_owned();
    let (state, direction, address) = (col(), col(), col());
    assert!(!address.is_empty(), "not a table row: {line:?}");
    let error = line
        .split_once(address.as_str())
        .unwrap()
        .1
        .trim()
        .to_owned();
    (state, direction, address, error)
}

#[test]
fn hub_table_keeps_a_failed_dial_with_its_error() {
    let (_serve, ready) = serve(&["--ws", "127.0.0.1:0"]);
    let good = format!("ws://{}", ready["ws"][0].as_str().unwrap());
    // Nothing listens there: the dial is refused. `net:` sorts before `ws://`, so in every
    // redraw its row comes before the good peer's, and a frame is known complete once the
    // good peer's row is read.
    let failed = format!("net:127.0.0.1:{}", free_port());
    let (mut hub, mut lines) = hub(&["--table", "--no-redial", &failed, &good]);
    const CLEAR: &str = "\x1b[2J\x1b[H";
    let header = format!("{CLEAR}STATE         DIRECTION ADDRESS ERROR");
    assert_eq!(lines.line("the first table"), header);

    let mut failed_row = None;
    loop {
        let line = lines.line("a table with the good peer connected and the failed one failed");
        if line == header {
            failed_row = None;
            continue;
        }
        let (state, direction, address, error) = row(&line);
        if address == failed {
            assert_eq!(direction, "-");
            failed_row = Some((state, error));
        } else {
            assert_eq!(address, good, "{line:?}");
            if state == "connected" {
                assert_eq!(direction, "outbound");
                if failed_row.as_ref().is_some_and(|(s, _)| s == "failed") {
                    break;
                }
            }
        }
    }
    let (_, error) = failed_row.unwrap();
    assert!(error.starts_with("connecting failed: "), "{error}");
    assert!(error.contains("refused"), "{error}");
    assert!(hub.terminate(), "hub --table did not stop cleanly");
    // Its last redraw: the good peer gone; the failed dial is still shown.
    let rest = lines.rest("the hub's last redraws");
    let last_frame = rest.iter().rposition(|l| *l == header).unwrap();
    let rows: Vec<_> = rest[last_frame + 1..].iter().map(|l| row(l)).collect();
    assert_eq!(rows.len(), 1, "{rest:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].2.as_str()),
        ("failed", failed.as_str())
    );
}

#[test]
fn hub_reaches_tls_and_wss_peers_with_ca_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (_serve, ready) = serve(&[
        "--tls",
        "127.0.0.1:0",
        "--wss",
        "127.0.0.1:0",
        "--cert",
        cert,
        "--key",
        key,
    ]);
    let tls = format!("tls:{}", ready["tls"][0].as_str().unwrap());
    let wss = format!("wss://{}", ready["wss"][0].as_str().unwrap());
    for trust in [&["--ca", cert][..], &["--insecure"]] {
        let mut args = vec![tls.as_str(), wss.as_str()];
        args.extend(trust);
        let (mut hub, mut lines) = hub(&args);
        // Both connected, in either order.
        let mut up = std::collections::HashSet::new();
        while up.len() < 2 {
            let line = lines.json("tls and wss connected");
            assert_ne!(line["event"], "connecting-failed", "{trust:?}: {line}");
            if line["event"] == "connected" {
                up.insert(line["address"].as_str().unwrap().to_owned());
            }
        }
        assert!(up.contains(&tls) && up.contains(&wss), "{up:?}");
        assert_clean_stop(&mut hub, &mut lines, &[&tls, &wss]);
    }
    // Trusting nothing, the dial fails with the reason.
    let (mut hub, mut lines) = hub(&[&tls, "--no-redial"]);
    let failed = until(&mut lines, "connecting-failed", &tls);
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("no trust anchors"),
        "{failed}"
    );
    assert!(hub.terminate(), "hub did not stop cleanly");
}

#[test]
fn hub_prints_a_line_for_every_event_kind_with_key_and_direction() {
    let (_serve, ready) = serve(&["--tcp", "127.0.0.1:0"]);
    let good = format!("net:{}", ready["tcp"][0].as_str().unwrap());
    let refused = format!("net:127.0.0.1:{}", free_port());
    let (mut hub, mut lines) = hub(&[&good, &refused, "--redial-min", "50", "--redial-max", "100"]);
    let mut seen = Vec::new();
    until_noting(&mut lines, "connected", &good, &mut seen);
    // A second failed dial: connecting, connecting-failed and redialing were all printed.
    for _ in 0..2 {
        let failed = until_noting(&mut lines, "connecting-failed", &refused, &mut seen);
        assert!(
            failed["error"].as_str().unwrap().contains("refused"),
            "{failed}"
        );
    }
    assert!(hub.terminate(), "hub did not stop cleanly");
    for l in lines.rest("the hub's last lines") {
        seen.push(serde_json::from_str(&l).unwrap());
    }
    let mut kinds = std::collections::BTreeSet::new();
    // Every line the hub printed after its first, including its stop.
    for line in seen {
        assert!(line.get("key").is_some(), "no key: {line}");
        assert!(line.get("direction").is_some(), "no direction: {line}");
        assert!(
            line["address"] == good || line["address"] == refused,
            "{line}"
        );
        kinds.insert(line["event"].as_str().unwrap().to_owned());
    }
    let expected = [
        "connected",
        "connecting",
        "connecting-failed",
        "disconnected",
        "disconnecting",
        "redialing",
    ];
    assert_eq!(
        kinds.iter().map(String::as_str).collect::<Vec<_>>(),
        expected
    );
}

#[test]
fn hub_book_survives_a_restart_and_staged_peers_are_not_dialled() {
    let (_serve, ready) = serve(&["--tcp", "127.0.0.1:0"]);
    let peer = format!("net:{}", ready["tcp"][0].as_str().unwrap());
    let staged = format!("net:127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("peers.redb");
    let book = book.to_str().unwrap();

    let (mut first, mut lines) = hub(&[&peer, "--book", book, "--stage", &staged]);
    let head = lines.json("the first line, with the book");
    assert_eq!(head["entries"], serde_json::json!([]));
    // Staged before anything was dialled; the peer is added when it is connected.
    assert_eq!(
        head["book"],
        serde_json::json!([{"address": staged, "state": "staged", "last": null, "detail": null}])
    );
    until(&mut lines, "connected", &peer);
    assert!(first.terminate(), "hub did not stop cleanly");
    let stopped = lines.rest("the first hub's last lines");
    assert!(
        stopped.iter().all(|l| !l.contains(&staged)),
        "a staged peer was dialled: {stopped:?}"
    );

    // Restarted with the book and no address: it dials the peer it keeps, not the staged one.
    let (mut second, mut lines) = hub(&["--book", book]);
    let head = lines.json("the restarted hub's first line");
    let rows = head["book"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{head}");
    let kept = rows.iter().find(|r| r["address"] == peer.as_str()).unwrap();
    assert_eq!(kept["state"], "kept");
    assert_eq!(
        (&kept["last"], &kept["detail"]),
        (&Json::from("disconnected"), &Json::from("requested"))
    );
    let row = rows
        .iter()
        .find(|r| r["address"] == staged.as_str())
        .unwrap();
    assert_eq!(row["state"], "staged");
    let mut seen = Vec::new();
    let up = until_noting(&mut lines, "connected", &peer, &mut seen);
    assert_eq!(up["direction"], "outbound");
    assert!(
        seen.iter().all(|l| l["address"] != staged.as_str()),
        "a staged peer was dialled: {seen:?}"
    );
    assert_clean_stop(&mut second, &mut lines, &[&peer]);
}

#[test]
fn hub_calls_every_connected_peer_and_prints_their_events() {
    let (_one, ready1) = serve(&["--tcp", "127.0.0.1:0"]);
    let (_two, ready2) = serve(&["--ws", "127.0.0.1:0"]);
    let tcp = ready1["tcp"][0].as_str().unwrap().to_owned();
    let a1 = format!("net:{tcp}");
    let a2 = format!("ws://{}", ready2["ws"][0].as_str().unwrap());
    let (mut hub, mut lines) = hub(&[
        &a1,
        &a2,
        "--call",
        "calculator",
        "divide",
        "20",
        "10",
        "--listen",
        "chat",
    ]);
    // One result line per connected peer, with the call's answer.
    let mut results = HashMap::new();
    let mut connected = 0;
    while results.len() < 2 || connected < 2 {
        let line = lines.json("the calls' results");
        assert!(
            line.get("key").is_some() && line.get("direction").is_some(),
            "{line}"
        );
        match line["event"].as_str().unwrap() {
            "result" => {
                results.insert(line["address"].as_str().unwrap().to_owned(), line);
            }
            "connected" => connected += 1,
            _ => {}
        }
    }
    for a in [&a1, &a2] {
        let line = &results[a];
        assert_eq!(
            (&line["interface"], &line["method"], &line["result"]),
            (
                &Json::from("calculator"),
                &Json::from("divide"),
                &serde_json::json!([2])
            ),
            "{line}"
        );
        assert_eq!(line["direction"], "outbound");
    }
    // A chat message on the first peer reaches the hub as that peer's event.
    let out = run(
        Command::new(BIN).args([
            "call",
            &format!("jstp://{tcp}"),
            "testApp",
            "chat",
            "send",
            "'hello from outside'",
        ]),
        "a chat message sent to the first peer",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event = lines.json("the chat event from the first peer");
    assert_eq!(event["event"], "peer-event", "{event}");
    assert_eq!(
        (&event["address"], &event["interface"], &event["name"]),
        (
            &Json::from(a1.as_str()),
            &Json::from("chat"),
            &Json::from("message")
        )
    );
    assert!(
        event["args"].to_string().contains("hello from outside"),
        "{event}"
    );
    assert_clean_stop(&mut hub, &mut lines, &[&a1, &a2]);
}
