//! A cluster of real `tether serve --cluster redis://…` processes on a real `redis-server`:
//! a broadcast made on one node reaches the clients of every node once, in the order each node
//! published; a node that loses Redis keeps serving its own clients and catches up when Redis
//! returns. Listeners are `tether listen`, tether's client, and the real Node
//! `@metarhia/jstp` client (interop/jstp-peer.js).

mod common;

use common::{free_port, redis, spawn_serve, within, LineReader, Proc, Served, BIN, DEADLINE};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use tether::{connect, ClientOptions, Connection, ConnectionEvent, Value};
use tokio::sync::broadcast;

/// Starts a node of the cluster on `url` with its log piped, and checks it joined.
fn node(url: &str, id: &str) -> (Served, String) {
    let mut served = spawn_serve(
        &["--tcp", "127.0.0.1:0", "--cluster", url, "--node-id", id],
        true,
    );
    assert_eq!(served.first["ready"], true, "node {id}: {}", served.first);
    let addr = format!("jstp://{}", served.first["tcp"][0].as_str().unwrap());
    // The join is logged before the ready line is printed.
    served.log.as_mut().unwrap().find("the cluster join", |l| {
        l.contains("cluster joined") && l.contains(id)
    });
    (served, addr)
}

fn log(served: &mut Served) -> &mut LineReader {
    served.log.as_mut().unwrap()
}

/// `tether call URL testApp chat send TEXT`, which must succeed.
fn send(url: &str, text: &str) {
    let out = common::run(
        Command::new(BIN).args(["call", url, "testApp", "chat", "send", &format!("'{text}'")]),
        "tether call chat send",
    );
    assert!(out.status.success(), "call failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

/// `tether listen URL testApp chat`, once it is listening.
fn listen(url: &str) -> (Proc, LineReader) {
    let child = Command::new(BIN)
        .args(["listen", url, "testApp", "chat"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tether listen");
    let mut proc = Proc(child);
    let mut lines = proc.stdout_lines("tether listen");
    assert_eq!(lines.json("the listening line")["listening"], true);
    (proc, lines)
}

/// The chat texts of `lines` up to and including `last`.
fn texts_until(lines: &mut LineReader, last: &str) -> Vec<String> {
    let mut texts = Vec::new();
    loop {
        let line = lines.json(&format!("chat messages up to {last:?}"));
        assert_eq!(line["interface"], "chat", "{line}");
        assert_eq!(line["event"], "message", "{line}");
        let text = line["args"][1].as_str().expect("a text").to_owned();
        texts.push(text.clone());
        if text == last {
            return texts;
        }
    }
}

#[test]
fn a_chat_sent_on_one_node_reaches_listeners_on_every_node_once() {
    let (_redis, url) = redis();
    let (_a, a) = node(&url, "node-a");
    let (_b, b) = node(&url, "node-b");
    let (_la, mut on_a) = listen(&a);
    let (_lb, mut on_b) = listen(&b);

    send(&b, "via-b");
    send(&b, "end-b");
    // Per-publisher order: anything delivered twice would show before `end-b`.
    assert_eq!(texts_until(&mut on_a, "end-b"), ["via-b", "end-b"]);
    assert_eq!(texts_until(&mut on_b, "end-b"), ["via-b", "end-b"]);

    // And the other way.
    send(&a, "via-a");
    send(&a, "end-a");
    assert_eq!(texts_until(&mut on_b, "end-a"), ["via-a", "end-a"]);
    assert_eq!(texts_until(&mut on_a, "end-a"), ["via-a", "end-a"]);
}

#[test]
fn nodes_without_a_cluster_keep_broadcasts_to_themselves() {
    // The control for the test above: the same two nodes sharing only the session store.
    let (_redis, url) = redis();
    let (_a, first) = common::serve(&["--tcp", "127.0.0.1:0", "--store", &url]);
    let (_b, second) = common::serve(&["--tcp", "127.0.0.1:0", "--store", &url]);
    let a = format!("jstp://{}", first["tcp"][0].as_str().unwrap());
    let b = format!("jstp://{}", second["tcp"][0].as_str().unwrap());
    let (_la, mut on_a) = listen(&a);
    send(&b, "via-b");
    send(&a, "via-a");
    assert_eq!(texts_until(&mut on_a, "via-a"), ["via-a"]);
}

/// A tether client on `url` and its events from now on.
async fn client(url: &str) -> (Connection, broadcast::Receiver<ConnectionEvent>) {
    let conn = within(
        DEADLINE,
        "a handshake",
        connect(url, "testApp", ClientOptions::default()),
    )
    .await
    .expect("handshake");
    let events = conn.events();
    (conn, events)
}

/// Receives chat messages until every publisher in `ends` sent its end marker; returns the
/// texts by publisher prefix (`p1-3` → `p1`).
async fn collect(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    ends: &[&str],
) -> HashMap<String, Vec<String>> {
    let mut by_publisher: HashMap<String, Vec<String>> = HashMap::new();
    let mut open: Vec<&str> = ends.to_vec();
    while !open.is_empty() {
        let event = within(DEADLINE, "the next chat message", events.recv())
            .await
            .expect("events lagged or ended");
        let ConnectionEvent::Event { event, args, .. } = event else {
            continue;
        };
        assert_eq!(event, "message");
        let Some(Value::String(text)) = args.get(1) else {
            panic!("not a chat text: {args:?}");
        };
        let (publisher, _) = text.split_once('-').expect("publisher-number");
        by_publisher
            .entry(publisher.to_owned())
            .or_default()
            .push(text.clone());
        open.retain(|e| e != text);
    }
    by_publisher
}

fn numbered(publisher: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{publisher}-{i}"))
        .chain([format!("{publisher}-end")])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_events_from_two_publishers_reach_every_node_once_in_order() {
    const N: usize = 300;
    let (_redis, url) = redis();
    let nodes: Vec<(Served, String)> = ["n1", "n2", "n3"].iter().map(|id| node(&url, id)).collect();
    let mut listeners = Vec::new();
    for (_, addr) in &nodes {
        listeners.push(client(addr).await);
    }
    let publish = |addr: String, publisher: &'static str| async move {
        let (conn, _) = client(&addr).await;
        for text in numbered(publisher, N) {
            let sent = conn.call("chat", "send", vec![Value::from(text.as_str())]);
            within(DEADLINE, "chat.send", sent)
                .await
                .expect("chat.send");
        }
        conn.close().await;
    };
    let p1 = tokio::spawn(publish(nodes[0].1.clone(), "p1"));
    let p2 = tokio::spawn(publish(nodes[1].1.clone(), "p2"));
    for (i, (_, events)) in listeners.iter_mut().enumerate() {
        let got = collect(events, &["p1-end", "p2-end"]).await;
        assert_eq!(
            got["p1"],
            numbered("p1", N),
            "p1's events on node {}",
            i + 1
        );
        assert_eq!(
            got["p2"],
            numbered("p2", N),
            "p2's events on node {}",
            i + 1
        );
    }
    within(DEADLINE, "publisher 1", p1).await.unwrap();
    within(DEADLINE, "publisher 2", p2).await.unwrap();
}

/// A `redis-server` on a given port (to restart one where the nodes expect it).
fn redis_on(port: u16, dir: &Path) -> Proc {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is not installed (.ci/run installs it)");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    LineReader::new("redis-server", stdout).find("redis-server ready", |l| {
        l.contains("Ready to accept connections")
    });
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_redis_serves_its_clients_and_catches_up() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = redis_on(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}");
    let (mut a, a_addr) = node(&url, "node-a");
    let (mut b, b_addr) = node(&url, "node-b");
    let (_ca, mut on_a) = client(&a_addr).await;
    let (cb, mut on_b) = client(&b_addr).await;

    // Both nodes deliver across before the outage.
    within(
        DEADLINE,
        "send",
        cb.call("chat", "send", vec!["b-before".into()]),
    )
    .await
    .unwrap();
    let before = HashMap::from([("b".to_owned(), vec!["b-before".to_owned()])]);
    assert_eq!(collect(&mut on_a, &["b-before"]).await, before);
    assert_eq!(collect(&mut on_b, &["b-before"]).await, before);

    drop(redis);
    // Local delivery never stops: B's client gets every event B publishes while Redis is away.
    let sent: Vec<String> = (0..20).map(|i| format!("b-{i}")).collect();
    for text in &sent {
        let call = cb.call("chat", "send", vec![Value::from(text.as_str())]);
        within(DEADLINE, "send while Redis is away", call)
            .await
            .unwrap();
    }
    let local = collect(&mut on_b, &["b-19"]).await;
    assert_eq!(local["b"], sent);
    log(&mut b).find("node B's log of the outage", |l| {
        l.contains("cluster lost Redis")
    });

    redis = redis_on(port, dir.path());
    // B's outbox reaches A once Redis is back, once each and in order.
    let remote = collect(&mut on_a, &["b-19"]).await;
    assert_eq!(remote["b"], sent);
    log(&mut b).find("node B's log of the return", |l| {
        l.contains("cluster Redis is back")
    });
    log(&mut a).find("node A's catch-up", |l| l.contains("cluster caught up"));

    // And the cluster works on afterwards.
    within(
        DEADLINE,
        "send",
        cb.call("chat", "send", vec!["b-after".into()]),
    )
    .await
    .unwrap();
    let after = collect(&mut on_a, &["b-after"]).await;
    assert_eq!(after["b"], ["b-after"]);
    drop(redis);
}

#[test]
fn the_node_jstp_client_listens_on_one_node_to_a_chat_sent_on_another() {
    let (_redis, url) = redis();
    let (_a, a) = node(&url, "node-a");
    let (_b, b) = node(&url, "node-b");
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/jstp-peer.js");
    let child = Command::new("node")
        .arg(peer)
        .args(["client", &a, "events", "--expect", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node is not installed (.ci/run installs it)");
    let mut node_client = Proc(child);
    let mut lines = node_client.stdout_lines("the jstp client");
    let handshake = lines.json("the jstp client's handshake");
    assert_eq!(handshake["step"], "handshake", "{handshake}");
    assert_eq!(handshake["ok"], true, "{handshake}");

    send(&b, "via-b");
    send(&b, "end-b");
    let mut texts = Vec::new();
    loop {
        let line = lines.json("the jstp client's events");
        if line["done"] == true {
            break;
        }
        assert_eq!(line["step"], "event", "{line}");
        assert_eq!(line["result"]["iface"], "chat", "{line}");
        texts.push(line["result"]["args"].clone());
    }
    assert_eq!(texts, [json!([null, "via-b"]), json!([null, "end-b"])]);
    let _: &Json = &handshake;
}

#[test]
fn a_node_is_named_by_host_and_pid_unless_told_and_bad_cluster_flags_are_usage_errors() {
    let (_redis, url) = redis();
    let mut served = spawn_serve(&["--tcp", "127.0.0.1:0", "--cluster", &url], true);
    assert_eq!(served.first["ready"], true, "{}", served.first);
    let pid = served.proc.0.id();
    let joined = log(&mut served).find("the cluster join", |l| l.contains("cluster joined"));
    assert!(
        joined.contains(&format!("-{pid} ")),
        "no host-pid node id: {joined}"
    );

    let tether = |args: &[&str]| common::run(Command::new(BIN).args(args), "tether serve");
    let out = tether(&["serve", "--tcp", "127.0.0.1:0", "--cluster", "http://x"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
    let out = tether(&["serve", "--tcp", "127.0.0.1:0", "--node-id", "a"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A node's `/metrics` counts the cluster's traffic: what it delivered from other nodes, what
/// it published, and that its Redis link is up.
#[test]
fn a_nodes_metrics_count_the_cluster_traffic() {
    let (_redis, url) = redis();
    let mut a = spawn_serve(
        &[
            "--tcp",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--cluster",
            &url,
            "--node-id",
            "a",
        ],
        true,
    );
    let admin = a.first["admin"]
        .as_str()
        .expect("the admin address")
        .to_owned();
    let a_url = format!("jstp://{}", a.first["tcp"][0].as_str().unwrap());
    log(&mut a).find("the cluster join", |l| l.contains("cluster joined"));
    let (_b, b_url) = node(&url, "b");
    let (_la, mut on_a) = listen(&a_url);
    send(&b_url, "one");
    send(&b_url, "two");
    send(&a_url, "three");
    assert_eq!(texts_until(&mut on_a, "three"), ["one", "two", "three"]);

    assert_eq!(
        metric(&admin, "tether_cluster_events_total{kind=\"delivered\"}"),
        Some(2.0)
    );
    assert_eq!(metric(&admin, "tether_cluster_connected"), Some(1.0));
    within_published(&admin, 1.0);
}

/// The value of sample `name` (with its labels, as the exporter writes them) on the node's
/// `/metrics`, if it is there.
fn metric(admin: &str, name: &str) -> Option<f64> {
    let out = common::run(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "20",
            &format!("http://{admin}/metrics"),
        ]),
        "curl /metrics",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `/metrics` until A's published count is `n` (its publisher appends in the background).
fn within_published(admin: &str, n: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let published = metric(admin, "tether_cluster_events_total{kind=\"published\"}");
        if published == Some(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "published never reached {n}: {published:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
