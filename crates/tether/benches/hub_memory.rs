//! Memory of one hub keeping many peers: `cargo bench -p tether --bench hub_memory`.
//!
//! A child process (this binary again) serves the example application on `0.0.0.0`; the hub
//! connects to it under N distinct addresses (`net:127.0.X.Y:PORT`, all loopback), with the
//! default schedule (redial, liveness check, session resumption), and the resident memory of
//! the hub's process is read from `/proc/self/status` before and after. The target is
//! 10 000 peers in at most 200 MB; the bench exits non-zero above it.
//!
//! `TETHER_HUB_PEERS` sets N (default 10 000); the process needs N + a few file descriptors
//! (and the server child as many).

use futures::StreamExt;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tether::example::{test_app, ChatHub};
use tether::hub::{ConnectOutcome, Hub, HubOptions};
use tether::Server;

/// Set in the child, which serves instead of measuring.
const CHILD: &str = "TETHER_HUB_BENCH_SERVER";
/// The budget for 10 000 peers, scaled to N.
const BUDGET_BYTES_PER_PEER: u64 = 200 * 1000 * 1000 / 10_000;
/// Dials in flight at once (a real hub dials from a list much like this).
const IN_FLIGHT: usize = 256;
/// A deadline for every phase, so a hang fails the bench instead of running forever.
const PHASE: Duration = Duration::from_secs(300);

fn rss_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn serve() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
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
        println!("{addr}");
        // Serve until the parent closes our stdin (or dies).
        tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await
        .unwrap();
    });
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    if std::env::var_os(CHILD).is_some() {
        return serve();
    }
    let peers: usize = std::env::var("TETHER_HUB_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port: u16 = first.trim().rsplit(':').next().unwrap().parse().unwrap();
    let addresses: Vec<String> = (0..peers)
        .map(|i| format!("net:127.0.{}.{}:{port}", 1 + i / 250, 1 + i % 250))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(async {
        let hub = Hub::new(HubOptions::jstp("testApp"));
        let before = rss_bytes("self");
        let start = Instant::now();
        let outcomes: Vec<_> = tokio::time::timeout(
            PHASE,
            futures::stream::iter(&addresses)
                .map(|a| hub.connect(a, Default::default()))
                .buffer_unordered(IN_FLIGHT)
                .collect(),
        )
        .await
        .expect("connecting every peer timed out");
        let took = start.elapsed();
        let failed: Vec<_> = outcomes
            .iter()
            .filter(|o| !matches!(o, Ok(ConnectOutcome::Connected(_))))
            .collect();
        if let Some(f) = failed.first() {
            eprintln!("{} of {peers} dials failed, e.g. {f:?}", failed.len());
            return false;
        }
        let connected = hub.entries().unwrap().len();
        let after = rss_bytes("self");
        let server = rss_bytes(&child.id().to_string());
        let per_peer = after.saturating_sub(before) / peers as u64;
        let budget = BUDGET_BYTES_PER_PEER * peers as u64;
        println!(
            "hub_memory: {connected} peers connected in {took:.1?}; hub process RSS {:.1} MB \
             ({:.1} MB before dialling), {:.1} KiB per peer; budget {:.1} MB; server process \
             {:.1} MB",
            mb(after),
            mb(before),
            per_peer as f64 / 1024.0,
            mb(budget),
            mb(server),
        );
        tokio::time::timeout(PHASE, hub.close())
            .await
            .expect("closing the hub timed out");
        connected == peers && after <= budget
    });
    drop(child.stdin.take());
    let _ = child.wait();
    if !ok {
        eprintln!("hub_memory: over budget or not every peer connected");
        std::process::exit(1);
    }
}
