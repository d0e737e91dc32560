//! Shared by the integration tests: a deadline for awaits ([`within`]), spawning the Node peer
//! (the real `@metarhia/jstp@2.3.0`), reading its JSON lines, throwaway certificates and URLs
//! for the five transports.

#![allow(dead_code)]

use serde_json::Value as Json;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The deadline for one await on the network or on another task. Generous, so a loaded
/// machine never trips it; its point is that a lost message fails the test instead of hanging it.
pub const LIMIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, panicking with a message naming `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The five transports, as the peer's ready line and our URLs name them.
pub const KINDS: [&str; 5] = ["tcp", "tls", "unix", "ws", "wss"];

pub type NodeLines = Lines<BufReader<ChildStdout>>;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

/// Runs `node interop/jstp-peer.js ARGS…` (killed when dropped).
pub fn node_peer(args: &[&str]) -> (Child, NodeLines) {
    let dir = interop_dir();
    assert!(
        dir.join("node_modules/@metarhia/jstp").exists(),
        "interop/node_modules is missing: run `npm ci --ignore-scripts` in interop/"
    );
    let mut child = Command::new("node")
        .arg(dir.join("jstp-peer.js"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is not installed");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The peer's next JSON line, or `None` at its end.
pub async fn next_json(lines: &mut NodeLines) -> Option<Json> {
    let line = within(
        Duration::from_secs(30),
        "the node peer's next line",
        lines.next_line(),
    )
    .await
    .unwrap()?;
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
}

/// Runs a client scenario to its end; returns its step lines. Fails on a `fatal` line or a
/// step whose expectation did not hold (`"pass":false`).
pub async fn scenario(url: &str, name: &str, extra: &[&str]) -> Vec<Json> {
    let mut args = vec!["client", url, name];
    args.extend_from_slice(extra);
    let (_child, mut lines) = node_peer(&args);
    let mut steps = Vec::new();
    while let Some(line) = next_json(&mut lines).await {
        if line.get("done").is_some() || line.get("fatal").is_some() {
            assert_eq!(line["done"], true, "{name} on {url}: {line}");
            return steps;
        }
        assert_ne!(line["pass"], false, "{name} on {url}: {line}");
        steps.push(line);
    }
    panic!("{name} on {url}: the peer ended without a done line");
}

/// The step named `name` (the first one).
pub fn step<'a>(steps: &'a [Json], name: &str) -> &'a Json {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

/// A throwaway certificate for the TLS and WSS listeners.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn certs() -> Certs {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Certs { dir, cert, key }
}

/// The URL of a `kind` listener at `addr` (`ip:port`, or a socket path for unix).
pub fn url(kind: &str, addr: &str) -> String {
    match kind {
        "tcp" => format!("jstp://{addr}"),
        "tls" => format!("jstps://{addr}"),
        "unix" => format!("unix:{addr}"),
        "ws" => format!("ws://{addr}"),
        "wss" => format!("wss://{addr}"),
        _ => unreachable!("{kind}"),
    }
}

/// Starts the Node peer's server on every transport; returns it with the URL of each.
pub async fn node_server(certs: &Certs, extra: &[&str]) -> (Child, Vec<(&'static str, String)>) {
    let sock = certs.dir.path().join("peer.sock");
    let mut args = vec![
        "server", "--tcp", "0", "--tls", "0", "--ws", "0", "--wss", "0", "--unix",
    ];
    let sock = sock.to_str().unwrap().to_owned();
    let cert = certs.cert.to_str().unwrap().to_owned();
    let key = certs.key.to_str().unwrap().to_owned();
    args.push(&sock);
    args.extend_from_slice(&["--cert", &cert, "--key", &key]);
    args.extend_from_slice(extra);
    let (child, mut lines) = node_peer(&args);
    let ready = next_json(&mut lines).await.expect("no ready line");
    assert_eq!(ready["ready"], true);
    // Drain the server's event lines so its stdout never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let urls = KINDS
        .iter()
        .map(|kind| {
            let addr = match *kind {
                "unix" => ready["unix"].as_str().unwrap().to_owned(),
                other => format!("127.0.0.1:{}", ready[other]),
            };
            (*kind, url(kind, &addr))
        })
        .collect();
    (child, urls)
}

/// A free TCP port on loopback (bound and released; good enough for test servers).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway `redis-server` (no persistence) on `port`, once it accepts connections.
pub async fn redis_server(port: u16) -> Child {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is not installed (.ci/run installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Ready to accept connections") {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    within(LIMIT, "redis-server to accept connections", ready_rx)
        .await
        .expect("redis-server exited before it was ready");
    child
}
