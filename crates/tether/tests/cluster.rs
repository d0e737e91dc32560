//! `tether::cluster` against a real `redis-server`: what a node cannot deliver is reported
//! exactly (a publisher's outbox overflowing while Redis is away shows on the other nodes as
//! a gap of precisely the events it dropped, and everything else arrives once, in order); and
//! a measurement of events/s across two nodes with the Redis commands each event costs
//! (ignored by default: `cargo test -p tether --test cluster -- --ignored --nocapture`).

mod common;

use common::{free_port, redis_server, within, LIMIT};
use std::time::Instant;
use tether::cluster::{Cluster, ClusterOptions};
use tether::example::{test_app, ChatHub};
use tether::{connect, ClientOptions, ConnectionEvent, Server, Value};
use tokio::sync::broadcast;

async fn node(options: ClusterOptions) -> (Server, Cluster) {
    let cluster = within(LIMIT, "the join", Cluster::join(options))
        .await
        .expect("join");
    let server = Server::builder()
        .application(test_app(ChatHub::new()))
        .cluster(cluster.clone())
        .build()
        .expect("server");
    (server, cluster)
}

/// Chat texts received until `last` (inclusive).
async fn texts_until(events: &mut broadcast::Receiver<ConnectionEvent>, last: &str) -> Vec<String> {
    let mut texts = Vec::new();
    loop {
        let event = within(LIMIT, "the next chat message", events.recv())
            .await
            .expect("events lagged or ended");
        if let ConnectionEvent::Event { args, .. } = event {
            let Some(Value::String(text)) = args.get(1) else {
                panic!("not a chat text: {args:?}");
            };
            texts.push(text.clone());
            if text == last {
                return texts;
            }
        }
    }
}

fn chat(text: &str) -> Vec<Value> {
    vec![Value::Null, Value::from(text)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_overflow_is_reported_as_the_exact_gap_on_other_nodes() {
    let port = free_port();
    let mut redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let (a, a_cluster) = node(ClusterOptions::builder(&url).node_id("a").build().unwrap()).await;
    let (b, b_cluster) = node(
        ClusterOptions::builder(&url)
            .node_id("b")
            .outbox_capacity(1)
            .build()
            .unwrap(),
    )
    .await;
    let addr = a
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let conn = within(
        LIMIT,
        "the handshake",
        connect(
            &format!("jstp://{addr}"),
            "testApp",
            ClientOptions::default(),
        ),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    b.broadcast("chat", "message", chat("first"));
    assert_eq!(texts_until(&mut events, "first").await, ["first"]);

    // Redis is gone for good before B publishes again (nothing reaches it by accident).
    within(LIMIT, "redis-server to die", redis.kill())
        .await
        .unwrap();
    let mut sent = Vec::new();
    let publish = |sent: &mut Vec<String>| {
        let text = format!("e{}", sent.len());
        b.broadcast("chat", "message", chat(&text));
        sent.push(text);
    };
    // B's publisher holds what it took before its first failed append and one more waits in
    // the outbox; everything after that is dropped.
    within(LIMIT, "B's outbox to overflow", async {
        while b_cluster.stats().dropped == 0 {
            publish(&mut sent);
            tokio::task::yield_now().await;
        }
    })
    .await;
    for _ in 0..3 {
        publish(&mut sent);
    }
    let dropped = b_cluster.stats().dropped as usize;
    assert!(dropped >= 4, "dropped {dropped}");
    assert!(sent.len() > dropped);

    redis = redis_server(port).await;
    // What B kept reaches the stream (an event broadcast before that would find the outbox
    // still full).
    let kept = sent.len() - dropped;
    let drained = b_cluster.wait_until(|s| s.published as usize == 1 + kept);
    within(LIMIT, "B's outbox to drain", drained).await;
    b.broadcast("chat", "message", chat("after"));
    let mut expected: Vec<String> = sent[..kept].to_vec();
    expected.push("after".into());
    assert_eq!(texts_until(&mut events, "after").await, expected);
    let a_stats = a_cluster.stats();
    assert_eq!(a_stats.missed as usize, dropped, "{a_stats:?}");
    assert_eq!(a_stats.duplicates, 0, "{a_stats:?}");
    within(LIMIT, "the close", conn.close()).await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn measure_events_per_second_across_two_nodes() {
    const N: usize = 20_000;
    let port = free_port();
    let _redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let (a, _) = node(ClusterOptions::builder(&url).node_id("a").build().unwrap()).await;
    let (b, b_cluster) = node(ClusterOptions::builder(&url).node_id("b").build().unwrap()).await;
    let addr = b
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let conn = connect(
        &format!("jstp://{addr}"),
        "testApp",
        ClientOptions::default(),
    )
    .await
    .unwrap();
    let mut events = conn.events();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();

    let start = Instant::now();
    for i in 0..N {
        // With backpressure from A's own clients (none here), as the example's chat does.
        a.broadcast_async("chat", "message", chat(&format!("m{i}")))
            .await;
    }
    let last = format!("m{}", N - 1);
    let mut count = 0;
    within(LIMIT * 3, "every event on node B", async {
        loop {
            if let ConnectionEvent::Event { args, .. } = events.recv().await.unwrap() {
                count += 1;
                if args.get(1) == Some(&Value::from(last.as_str())) {
                    break;
                }
            }
        }
    })
    .await;
    let elapsed = start.elapsed();
    assert_eq!(count, N);
    assert_eq!(b_cluster.stats().delivered as usize, N);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin)
        .await
        .unwrap();
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (xadd, xread) = (calls("xadd"), calls("xread"));
    println!(
        "cluster: {N} events from node A to a client of node B in {elapsed:?}: {:.0} events/s; \
         Redis: {xadd} XADD, {xread} XREAD ({:.3} commands per event)",
        N as f64 / elapsed.as_secs_f64(),
        (xadd + xread) as f64 / N as f64
    );
    conn.close().await;
}

/// A chat message published on another node reaches this node's `ChatHub` listeners (the
/// example's bridge to conductor clients), through `Server::on_broadcast`, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_chat_reaches_the_chat_hub_listeners() {
    let port = free_port();
    let _redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let a_cluster = within(
        LIMIT,
        "A's join",
        Cluster::join(ClusterOptions::builder(&url).node_id("a").build().unwrap()),
    )
    .await
    .expect("join");
    let chat_a = ChatHub::new();
    let a = Server::builder()
        .application(test_app(chat_a.clone()))
        .cluster(a_cluster)
        .build()
        .expect("server");
    chat_a.bind(&a);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    chat_a.on_message(move |_user, text| {
        let _ = tx.send(text.clone());
    });
    let (b, _) = node(ClusterOptions::builder(&url).node_id("b").build().unwrap()).await;
    for text in ["one", "two"] {
        b.broadcast("chat", "message", chat(text));
    }
    // A's own broadcasts reach its listeners too, and other events do not.
    a.broadcast("other", "message", chat("not chat"));
    a.broadcast("chat", "message", chat("three"));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let text = within(LIMIT, "a chat message on A's hub", rx.recv())
            .await
            .expect("listener dropped");
        seen.push(text.to_js_string());
    }
    seen.sort_by_key(|t| t != "three");
    assert_eq!(seen, ["three", "one", "two"]);
}
