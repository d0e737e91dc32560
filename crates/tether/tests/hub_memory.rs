//! The hub's memory per peer, CI-sized: 1 000 peers kept with the default schedule must cost
//! the hub's process at most the budget per peer (200 MB for 10 000 peers, so 20 KB
//! each, connection included). `benches/hub_memory.rs` measures the full 10 000.
//!
//! The server runs in a child process (this test binary again, told by an environment
//! variable to serve), so only the hub side is measured. This file holds one test, so no
//! other test's allocations share the process.

mod common;

use common::{within, LIMIT};
use futures::StreamExt;
use std::io::Read;
use tether::example::{test_app, ChatHub};
use tether::hub::{ConnectOutcome, Hub, HubOptions};
use tether::Server;
use tokio::io::AsyncBufReadExt;

const CHILD: &str = "TETHER_HUB_MEMORY_SERVER";
const PEERS: usize = 1_000;
/// 200 MB / 10 000 peers.
const BUDGET_PER_PEER: u64 = 20_000;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// The child's part: serve the example application until stdin closes.
async fn serve() {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .build()
        .unwrap();
    chat.bind(&server);
    let addr = server
        .listen("jstp://0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    println!("listening {addr}");
    tokio::task::spawn_blocking(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_peer_costs_the_hub_less_than_its_share_of_200_mb_for_10_000() {
    if std::env::var_os(CHILD).is_some() {
        return serve().await;
    }
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_kept_peer_costs_the_hub_less_than_its_share_of_200_mb_for_10_000",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let port: u16 = within(LIMIT, "the server child's address", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the child ended");
            if let Some(addr) = line.strip_prefix("listening ") {
                break addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
    })
    .await;
    // Distinct loopback addresses, one hub entry each, all reaching the child.
    let addresses: Vec<String> = (0..PEERS)
        .map(|i| format!("net:127.0.{}.{}:{port}", 1 + i / 250, 1 + i % 250))
        .collect();
    let hub = Hub::new(HubOptions::jstp("testApp"));
    // One peer first, so lazily built state (runtime, client config) is not counted per peer.
    let warm = format!("net:127.0.0.1:{port}");
    assert!(matches!(
        within(
            LIMIT,
            "the first peer",
            hub.connect(&warm, Default::default())
        )
        .await,
        Ok(ConnectOutcome::Connected(_))
    ));
    let before = rss_bytes();
    let outcomes: Vec<_> = within(
        LIMIT * 3,
        "1 000 peers to connect",
        futures::stream::iter(&addresses)
            .map(|a| hub.connect(a, Default::default()))
            .buffer_unordered(128)
            .collect(),
    )
    .await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(ConnectOutcome::Connected(_)))));
    assert_eq!(hub.entries().unwrap().len(), PEERS + 1);
    let per_peer = rss_bytes().saturating_sub(before) / PEERS as u64;
    println!("hub memory: {per_peer} bytes per kept peer");
    assert!(
        per_peer <= BUDGET_PER_PEER,
        "{per_peer} bytes per peer, budget {BUDGET_PER_PEER}"
    );
    within(LIMIT, "the hub's close", hub.close()).await;
    drop(child.stdin.take());
    within(LIMIT, "the server child to exit", child.wait())
        .await
        .unwrap();
}
