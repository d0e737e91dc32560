//! Store faults never stall a connection (issue 17): a real `redis-server` paused (SIGSTOP, a
//! Redis that accepts and never answers), killed and restarted while clients connect and
//! restore. New sessions go on in memory; restores that need the store are refused at once
//! with code 11 (upstream's code for a session it cannot restore), not held until the
//! handshake deadline; once Redis is back, restores work.

mod common;

use common::{free_port, redis_server, within, LIMIT};
use std::sync::Arc;
use std::time::Duration;
use tether::store::RedisStore;
use tether::{Application, Connection, Interface, Server, ServerEvent, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::sync::broadcast;

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("redis-server is running").to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// One raw JSTP client socket.
struct Raw {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        let sock = within(
            LIMIT,
            "a TCP connection",
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .unwrap();
        Raw {
            sock,
            buf: Vec::new(),
        }
    }

    async fn handshake(&mut self, auth: &str) -> String {
        let sep = if auth.is_empty() { "" } else { "," };
        let mut frame = format!("{{handshake:[0,'testApp']{sep}{auth}}}").into_bytes();
        frame.push(0);
        within(LIMIT, "a write", self.sock.write_all(&frame))
            .await
            .unwrap();
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == 0) {
                return String::from_utf8_lossy(&self.buf[..end]).into_owned();
            }
            let mut chunk = [0u8; 1024];
            let n = within(LIMIT, "a handshake answer", self.sock.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "closed without a handshake answer");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn session_of(answer: &str) -> String {
    let start = answer
        .find("ok:'")
        .unwrap_or_else(|| panic!("not ok: {answer}"))
        + 4;
    let end = start + answer[start..].find('\'').unwrap();
    answer[start..end].to_owned()
}

async fn next_connect(events: &mut broadcast::Receiver<ServerEvent>) -> Connection {
    within(LIMIT, "a Connect event", async {
        loop {
            if let Ok(ServerEvent::Connect(c)) = events.recv().await {
                return c;
            }
        }
    })
    .await
}

/// A new session whose client went away and whose connection closed: it is in the store only
/// (or lost, if the store was down when it closed).
async fn stored_session(addr: &str, events: &mut broadcast::Receiver<ServerEvent>) -> String {
    let mut raw = Raw::connect(addr).await;
    let id = session_of(&raw.handshake("").await);
    let conn = next_connect(events).await;
    drop(raw);
    within(LIMIT, "the detached connection to close", conn.closed()).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_killed_and_restarted_during_connects_and_restores() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut redis = redis_server(port).await;
    let store = within(LIMIT, "RedisStore::connect", RedisStore::connect(&url))
        .await
        .unwrap();
    let app = Application::new("testApp", "1.0.0").unwrap().interface(
        "math",
        Interface::new().method("one", |_c, _a| async { Ok(Value::from(1)) }),
    );
    let server = Server::builder()
        .application(app)
        .session_store(Arc::new(store))
        .store_timeout(Duration::from_millis(300))
        // No detached session stays in memory: every restore needs the store.
        .detached_session_limits(0, 0)
        .build()
        .unwrap();
    let mut events = server.events();
    let addr = within(
        LIMIT,
        "the listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();

    let a = stored_session(&addr, &mut events).await;
    let b = stored_session(&addr, &mut events).await;

    // Redis accepts and never answers.
    signal(&redis, "-STOP");
    for _ in 0..10 {
        let mut fresh = Raw::connect(&addr).await;
        let answer = fresh.handshake("").await;
        assert!(answer.starts_with("{handshake:[0],ok:'"), "{answer}");
        let mut restore = Raw::connect(&addr).await;
        let answer = restore.handshake(&format!("session:['{a}',0]")).await;
        assert_eq!(answer, "{handshake:[0],error:[11]}");
    }
    signal(&redis, "-CONT");
    let mut restore = Raw::connect(&addr).await;
    let answer = restore.handshake(&format!("session:['{a}',0]")).await;
    assert!(answer.starts_with("{handshake:[0],ok:"), "{answer}");

    // Redis is gone.
    redis.kill().await.unwrap();
    for _ in 0..10 {
        let mut fresh = Raw::connect(&addr).await;
        let answer = fresh.handshake("").await;
        assert!(answer.starts_with("{handshake:[0],ok:'"), "{answer}");
        let mut restore = Raw::connect(&addr).await;
        let answer = restore.handshake(&format!("session:['{b}',0]")).await;
        assert_eq!(answer, "{handshake:[0],error:[11]}");
    }

    // Redis is back on the same port (empty: no persistence); the store reconnects by itself.
    // Sessions stored from now on restore again. Bounded: the manager's first calls after
    // the restart may still fail while it reconnects.
    let _redis = redis_server(port).await;
    let mut restored = false;
    for _ in 0..50 {
        let c = stored_session(&addr, &mut events).await;
        let mut restore = Raw::connect(&addr).await;
        let answer = restore.handshake(&format!("session:['{c}',0]")).await;
        if answer.starts_with("{handshake:[0],ok:") {
            restored = true;
            break;
        }
        assert!(answer.ends_with("error:[11]}"), "{answer}");
    }
    assert!(restored, "no restore worked after Redis came back");
}
