//! `tether bench`'s external modes against real processes: the floor responder, `--target`
//! with the server's CPU time per call (against the floor and against `tether serve`), and
//! `--idle` memory per connection on both sides.

mod common;

use common::{run, serve, Proc, BIN};
use serde_json::Value as Json;
use std::process::{Command, Stdio};

fn bench(args: &[&str]) -> Json {
    let out = run(Command::new(BIN).arg("bench").args(args), "tether bench");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn floor() -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(["bench", "--floor", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut lines = common::LineReader::new("the floor", stdout);
    let ready = lines.json("the floor's ready line");
    assert_eq!(ready["ready"], true, "{ready}");
    let addr = ready["floor"].as_str().unwrap().to_owned();
    (proc, addr)
}

#[test]
fn target_reports_calls_latency_and_the_servers_cpu_per_call() {
    let (floor, floor_addr) = floor();
    let (tether, ready) = serve(&["--tcp", "127.0.0.1:0"]);
    for (url, pid) in [
        (format!("jstp://{floor_addr}"), floor.0.id()),
        (
            format!("jstp://{}", ready["tcp"][0].as_str().unwrap()),
            tether.0.id(),
        ),
    ] {
        let pid = pid.to_string();
        let line = bench(&[
            "--target",
            &url,
            "--server-pid",
            &pid,
            "--duration",
            "0.3",
            "--in-flight",
            "4",
        ]);
        assert_eq!(line["bench"], "target", "{line}");
        assert_eq!(line["url"], url.as_str(), "{line}");
        assert!(line["calls_per_s"].as_f64().unwrap() > 0.0, "{line}");
        let (p50, p99) = (
            line["p50_us"].as_u64().unwrap(),
            line["p99_us"].as_u64().unwrap(),
        );
        assert!(p50 <= p99, "{line}");
        assert!(
            line["server_cpu_us_per_call"].as_f64().unwrap() >= 0.0,
            "{line}"
        );
    }
}

#[test]
fn idle_reports_memory_per_connection_on_both_sides() {
    let (tether, ready) = serve(&["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"]);
    let pid = tether.0.id().to_string();
    for url in [
        format!("jstp://{}", ready["tcp"][0].as_str().unwrap()),
        format!("ws://{}", ready["ws"][0].as_str().unwrap()),
    ] {
        let line = bench(&["--target", &url, "--idle", "50", "--server-pid", &pid]);
        assert_eq!(line["bench"], "idle", "{line}");
        assert_eq!(line["connections"], 50, "{line}");
        assert!(line["client_bytes_per_connection"].is_number(), "{line}");
        assert!(line["server_bytes_per_connection"].is_number(), "{line}");
    }
}

#[test]
fn a_bad_call_spec_is_refused() {
    let out = run(
        Command::new(BIN).args(["bench", "--target", "jstp://127.0.0.1:1", "--call", "nodot"]),
        "tether bench with a bad --call",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
