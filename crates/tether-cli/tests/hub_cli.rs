//! `tether hub` against real `tether serve` processes: it connects to every peer, reports a
//! peer killed mid-connection, refuses bad addresses, and stops cleanly.

mod common;

use common::{serve, BIN};
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Lines};
use std::process::{ChildStdout, Command, Stdio};

fn next(lines: &mut Lines<BufReader<ChildStdout>>) -> Json {
    let line = lines.next().expect("hub output ended").unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

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
    let mut lines = BufReader::new(hub.0.stdout.take().unwrap()).lines();
    assert_eq!(next(&mut lines), serde_json::json!({"entries": []}));
    let mut connected = Vec::new();
    while connected.len() < 2 {
        let line = next(&mut lines);
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
    first.0.wait().unwrap();
    let line = next(&mut lines);
    assert_eq!(line["event"], "disconnected");
    assert_eq!(line["address"], a1.as_str());

    assert!(hub.terminate(), "hub did not stop cleanly");
    // On its way out it disconnects the remaining peer.
    let rest: Vec<Json> = lines
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let kinds: Vec<&str> = rest.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(kinds, ["disconnecting", "disconnected"]);
}

#[test]
fn hub_refuses_bad_addresses() {
    let out = Command::new(BIN)
        .args(["hub", "net:127.0.0.1:1~shs:notakey"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer key"));
}
