//! `tether hub` against real `tether serve` processes: it connects to every peer, reports a
//! peer killed mid-connection, refuses bad addresses, and stops cleanly.

mod common;

use common::{free_port, run, serve, wait_within, Proc, BIN, DEADLINE};
use serde_json::Value as Json;
use std::process::{Command, Stdio};

#[test]
fn hub_connects_to_every_peer_and_reports_a_killed_one() {
    let (mut first, ready1) = serve(&["--tcp", "127.0.0.1:0"]);
    let (_second, ready2) = serve(&["--ws", "127.0.0.1:0"]);
    let a1 = format!("net:{}", ready1["tcp"][0].as_str().unwrap());
    let a2 = format!("ws://{}", ready2["ws"][0].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers.txt");
    std::fs::write(&file, format!("# peers\n{a2}\n\n")).unwrap();
    let mut hub = common::Proc(
        Command::new(BIN)
            .args(["hub", &a1, "--file"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = hub.stdout_lines("hub");
    assert_eq!(
        lines.json("the first table"),
        serde_json::json!({"entries": []})
    );
    let mut connected = Vec::new();
    while connected.len() < 2 {
        let line = lines.json("connecting/connected events");
        match line["event"].as_str().unwrap() {
            "connecting" => {}
            "connected" => connected.push(line["address"].as_str().unwrap().to_owned()),
            other => panic!("unexpected {other}: {line}"),
        }
    }
    connected.sort();
    let mut expected = vec![a1.clone(), a2];
    expected.sort();
    assert_eq!(connected, expected);

    // Kill the first peer outright: the hub reports it gone, once.
    first.0.kill().unwrap();
    wait_within(&mut first.0, DEADLINE, "the killed peer");
    let line = lines.json("the killed peer's disconnected event");
    assert_eq!(line["event"], "disconnected");
    assert_eq!(line["address"], a1.as_str());

    assert!(hub.terminate(), "hub did not stop cleanly");
    // On its way out it disconnects the remaining peer.
    let rest: Vec<Json> = lines
        .rest("the hub's last events")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = rest.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(kinds, ["disconnecting", "disconnected"]);
}

#[test]
fn hub_refuses_bad_addresses() {
    let out = run(
        Command::new(BIN).args(["hub", "net:127.0.0.1:1~shs:notakey"]),
        "hub with a bad key",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer key"));
}

/// One row of `tether hub --table`: state, direction, address.
fn row(line: &str) -> (String, String, String) {
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols.len(), 3, "not a table row: {line:?}");
    (cols[0].into(), cols[1].into(), cols[2].into())
}

#[test]
fn hub_table_shows_a_connected_peer_and_drops_a_failed_one() {
    let (_serve, ready) = serve(&["--ws", "127.0.0.1:0"]);
    let good = format!("ws://{}", ready["ws"][0].as_str().unwrap());
    // Nothing listens there: the dial is refused. `net:` sorts before `ws://`, so in every
    // redraw its row (if any) comes before the good peer's, and a frame is known complete
    // once the good peer's row is read.
    let failed = format!("net:127.0.0.1:{}", free_port());
    let mut hub = Proc(
        Command::new(BIN)
            .args(["hub", "--table", &failed, &good])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = hub.stdout_lines("hub --table");
    const CLEAR: &str = "\x1b[2J\x1b[H";
    let header = format!("{CLEAR}STATE         DIRECTION ADDRESS");
    assert_eq!(lines.line("the first table"), header);

    let mut failed_seen_connecting = false;
    let mut failed_in_frame = false;
    loop {
        let line = lines.line("a table where the good peer is connected and the failed one gone");
        if line == header {
            failed_in_frame = false;
            continue;
        }
        let (state, direction, address) = row(&line);
        if address == failed {
            assert_eq!((state.as_str(), direction.as_str()), ("connecting", "-"));
            failed_seen_connecting = true;
            failed_in_frame = true;
        } else {
            assert_eq!(address, good, "{line:?}");
            if state == "connected" {
                assert_eq!(direction, "outbound");
                if failed_seen_connecting && !failed_in_frame {
                    break;
                }
            } else {
                assert_eq!((state.as_str(), direction.as_str()), ("connecting", "-"));
            }
        }
    }
    assert!(hub.terminate(), "hub --table did not stop cleanly");
    // Its last redraws: the good peer disconnecting, then an empty table.
    let rest = lines.rest("the hub's last redraws");
    assert_eq!(rest.last(), Some(&header), "{rest:?}");
}
