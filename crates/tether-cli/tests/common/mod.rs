//! Spawning `tether serve` (and the services it needs) for the end-to-end tests.

#![allow(dead_code)]

use serde_json::Value as Json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Asks the process to stop (SIGTERM) and waits for it; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        sent.is_ok_and(|s| s.success()) && self.0.wait().is_ok_and(|s| s.success())
    }
}

/// Starts `tether serve ARGS…` and returns it with its JSON ready line.
pub fn serve(args: &[&str]) -> (Proc, Json) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let ready: Json = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("serve did not start ({e}): {line:?}"));
    assert_eq!(ready["ready"], true, "{line}");
    (proc, ready)
}

/// A free loopback TCP port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a throwaway `redis-server` on a free port (no persistence) and waits until it
/// accepts connections. Returns it and its URL.
pub fn redis() -> (Proc, String) {
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is not installed (.ci/run installs it)");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    // Keep draining its log so redis never writes into a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Ready to accept connections") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv().expect("redis-server did not start");
    (proc, format!("redis://127.0.0.1:{port}"))
}
