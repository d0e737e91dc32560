//! A peer that pipelines calls and never reads the answers is held back by TCP: the server
//! stops reading once its replies back up, instead of growing. Alone in its test binary so
//! the process's resident memory is this test's alone.

use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::{Endpoint, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

/// Resident memory of this process, in bytes (Linux).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_held_back_by_tcp() {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .build()
        .unwrap();
    chat.bind(&server);
    let endpoint: Endpoint = "jstp://127.0.0.1:0".parse().unwrap();
    let addr = tokio::time::timeout(LIMIT, server.listen(endpoint))
        .await
        .expect("timed out waiting for the listener")
        .unwrap();
    let mut sock = tokio::time::timeout(LIMIT, TcpStream::connect(&addr))
        .await
        .expect("timed out waiting for a TCP connection")
        .unwrap();
    sock.write_all(b"{handshake:[0,'testApp']}\0")
        .await
        .unwrap();
    let mut reply = [0u8; 128];
    let n = tokio::time::timeout(LIMIT, sock.read(&mut reply))
        .await
        .expect("timed out waiting for the handshake reply")
        .unwrap();
    assert!(reply[..n].starts_with(b"{handshake:[0],ok:"));
    let before = rss();
    // 300 000 calls of ~250 bytes (75 MB), answers never read. The server must stop reading
    // once its replies back up, so our writes stall long before they are all taken.
    let word = "w".repeat(200);
    let mut written = 0usize;
    let mut stalled = false;
    let mut chunk = Vec::new();
    for i in 1..=300_000i64 {
        chunk.extend_from_slice(format!("{{call:[{i},'someService'],say:['{word}']}}").as_bytes());
        chunk.push(0);
        if chunk.len() >= 64 * 1024 {
            match tokio::time::timeout(Duration::from_secs(3), sock.write_all(&chunk)).await {
                Ok(r) => r.unwrap(),
                Err(_) => {
                    stalled = true;
                    break;
                }
            }
            written = i as usize;
            chunk.clear();
        }
    }
    assert!(
        stalled,
        "all {written} calls were taken without the answers being read"
    );
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "the process grew {} MiB while {written} calls were written",
        grown >> 20
    );
}
