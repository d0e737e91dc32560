//! Hardening of the JSTP server against what a peer or a failing dependency can do: a store
//! that never answers cannot hold a handshake past its deadline, a method's non-finite result
//! is refused (a Node peer could not parse it), and session ids stay out of logs.

mod common;

use common::{within, LIMIT};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tether::store::{SessionStore, StoreError};
use tether::{
    connect_transport, memory, Application, ClientOptions, Endpoint, Error, Interface, Server,
    ServerEvent, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A store whose reads never finish (a Redis that accepts and never answers).
struct Stalled;

impl SessionStore for Stalled {
    fn get<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(std::future::pending())
    }
    fn set<'a>(&'a self, _id: &'a str, _s: String) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
    fn set_inactive<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
    fn remove<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }
}

fn app() -> Application {
    Application::new("testApp", "1.0.0").unwrap().interface(
        "math",
        Interface::new()
            .method("nan", |_c, _a| async { Ok(Value::Number(f64::NAN)) })
            .method("inf", |_c, _a| async {
                Ok(Value::Array(vec![Value::Number(f64::INFINITY)]))
            })
            .method("one", |_c, _a| async { Ok(Value::from(1)) }),
    )
}

#[tokio::test]
async fn a_stalled_store_cannot_hold_a_restore_past_the_handshake_timeout() {
    let server = Server::builder()
        .application(app())
        .session_store(Arc::new(Stalled))
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut events = server.events();
    let endpoint: Endpoint = "jstp://127.0.0.1:0".parse().unwrap();
    let addr = within(LIMIT, "the listener", server.listen(endpoint))
        .await
        .unwrap();
    let mut sock = within(
        LIMIT,
        "a TCP connection",
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .unwrap();
    // An unknown session: only the (stalled) store could know it.
    sock.write_all(b"{handshake:[0,'testApp'],session:['nobody',0]}\0")
        .await
        .unwrap();
    let mut rest = Vec::new();
    within(
        LIMIT,
        "the server to close the connection whose restore waits on the store",
        sock.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    within(LIMIT, "the HandshakeTimeout event", async {
        loop {
            if let Ok(ServerEvent::HandshakeTimeout(_)) = events.recv().await {
                return;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_non_finite_result_answers_16_and_the_connection_goes_on() {
    let server = Server::builder().application(app()).build().unwrap();
    let (a, b) = memory::pair(64);
    server.serve_transport(a);
    let conn = within(
        LIMIT,
        "the handshake",
        connect_transport(b, "testApp", ClientOptions::default()),
    )
    .await
    .unwrap();
    for method in ["nan", "inf"] {
        let r = within(
            LIMIT,
            "the non-finite call",
            conn.call("math", method, vec![]),
        )
        .await;
        match r {
            Err(Error::Remote(e)) => assert_eq!(e.code, 16, "{method}: {e:?}"),
            other => panic!("{method}: {other:?}"),
        }
    }
    let one = within(LIMIT, "a finite call", conn.call("math", "one", vec![]))
        .await
        .unwrap();
    assert_eq!(one, vec![Value::from(1)]);
    let tag = conn.session_tag().unwrap();
    let id = conn.session_id().unwrap();
    assert_eq!(tag.len(), 8);
    assert!(tag.chars().all(|c| c.is_ascii_hexdigit()), "{tag}");
    assert!(!id.contains(&tag), "the tag is a piece of the id");
    assert_eq!(conn.session_tag().unwrap(), tag, "the tag is stable");
    within(LIMIT, "close", conn.close()).await;
}

#[tokio::test]
async fn an_event_before_the_handshake_is_refused_not_lost() {
    // A login that waits for the test: the connection is there, its handshake not yet done.
    let gate = Arc::new(tokio::sync::Notify::new());
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let policy = {
        let gate = gate.clone();
        move |req: tether::AuthRequest| {
            let (gate, seen_tx) = (gate.clone(), seen_tx.clone());
            async move {
                let _ = seen_tx.send(req.connection.clone());
                gate.notified().await;
                Ok::<_, tether::RemoteError>("login".to_owned())
            }
        }
    };
    let server = Server::builder()
        .application(app())
        .auth_policy(policy)
        .build()
        .unwrap();
    let (a, b) = memory::pair(64);
    server.serve_transport(a);
    let options = ClientOptions::default().login("login", "password");
    let client = tokio::spawn(connect_transport(b, "testApp", options));
    let conn = within(LIMIT, "the login to reach the policy", seen_rx.recv())
        .await
        .unwrap();
    match conn.try_emit("math", "early", vec![]) {
        Err(Error::Protocol(reason)) => assert!(reason.contains("handshake"), "{reason}"),
        other => panic!("{other:?}"),
    }
    gate.notify_one();
    let client = within(LIMIT, "the client's handshake", client)
        .await
        .unwrap()
        .unwrap();
    within(LIMIT, "close", client.close()).await;
}

/// One raw JSTP socket from a chosen loopback source address (all of 127/8 is loopback on
/// Linux, so two sources can be told apart without a second machine).
struct Raw {
    sock: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(from: &str, addr: &str) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let sock = within(
            LIMIT,
            "a TCP connection",
            socket.connect(addr.parse().unwrap()),
        )
        .await
        .unwrap();
        Raw {
            sock,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) {
        let mut frame = text.as_bytes().to_vec();
        frame.push(0);
        within(LIMIT, "a write", self.sock.write_all(&frame))
            .await
            .unwrap();
    }

    /// The next message, or `None` when the server closed the connection.
    async fn recv(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == 0) {
                let msg: Vec<u8> = self.buf.drain(..=end).collect();
                return Some(String::from_utf8_lossy(&msg[..end]).into_owned());
            }
            let mut chunk = [0u8; 4096];
            let n = within(
                LIMIT,
                "a message from the server",
                self.sock.read(&mut chunk),
            )
            .await
            .unwrap();
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a handshake (`auth` empty: anonymous) and returns its answer.
    async fn handshake(&mut self, auth: &str) -> String {
        let sep = if auth.is_empty() { "" } else { "," };
        self.send(&format!("{{handshake:[0,'testApp']{sep}{auth}}}"))
            .await;
        self.recv().await.expect("a handshake answer")
    }
}

/// The session id in a `{handshake:[0],ok:'…'}` answer.
fn session_of(answer: &str) -> String {
    let start = answer
        .find("ok:'")
        .unwrap_or_else(|| panic!("not ok: {answer}"))
        + 4;
    let end = start + answer[start..].find('\'').unwrap();
    answer[start..end].to_owned()
}

async fn login_server(binding: tether::server::SessionBinding) -> (Server, String) {
    let server = Server::builder()
        .application(app())
        .auth_policy(tether::LoginPolicy::new().user("marcus", "secret"))
        .session_binding(binding)
        .build()
        .unwrap();
    let endpoint: Endpoint = "jstp://127.0.0.1:0".parse().unwrap();
    let addr = within(LIMIT, "the listener", server.listen(endpoint))
        .await
        .unwrap();
    (server, addr)
}

#[tokio::test]
async fn with_binding_a_session_id_from_another_address_is_refused_and_the_owner_keeps_it() {
    let (_server, addr) = login_server(tether::server::SessionBinding::SAME_ADDRESS).await;
    let mut owner = Raw::connect("127.0.0.1", &addr).await;
    let id = session_of(&owner.handshake("login:['marcus','secret']").await);

    // The intruder knows the id (a leaked log, a shared screen) but not the password.
    let mut intruder = Raw::connect("127.0.0.2", &addr).await;
    let answer = intruder.handshake(&format!("session:['{id}',0]")).await;
    assert_eq!(answer, "{handshake:[0],error:[11]}");
    assert_eq!(intruder.recv().await, None, "a refused handshake closes");

    // The owner was not disconnected and still gets answers.
    owner.send("{call:[1,'math'],one:[]}").await;
    let reply = owner.recv().await.expect("the owner's answer");
    assert!(reply.starts_with("{callback:[1]"), "{reply}");

    // The owner's own restore, from where it logged in, still works.
    drop(owner);
    let mut back = Raw::connect("127.0.0.1", &addr).await;
    let answer = back.handshake(&format!("session:['{id}',1]")).await;
    assert!(answer.starts_with("{handshake:[0],ok:"), "{answer}");
    back.send("{call:[2,'math'],one:[]}").await;
    let reply = back.recv().await.expect("an answer after the restore");
    assert!(reply.contains("callback:[2]"), "{reply}");
}

#[tokio::test]
async fn without_binding_the_id_alone_restores_as_upstream() {
    // What the binding changes: with it off (the default, `@metarhia/jstp`'s behaviour) the
    // same intruder gets the session.
    let (_server, addr) = login_server(tether::server::SessionBinding::Off).await;
    let mut owner = Raw::connect("127.0.0.1", &addr).await;
    let id = session_of(&owner.handshake("login:['marcus','secret']").await);
    let mut intruder = Raw::connect("127.0.0.2", &addr).await;
    let answer = intruder.handshake(&format!("session:['{id}',0]")).await;
    assert!(answer.starts_with("{handshake:[0],ok:"), "{answer}");
}

#[tokio::test]
async fn a_bound_session_from_the_store_is_refused_elsewhere_and_restored_at_home() {
    // Cap detached sessions at one, so the first client's session leaves memory for the store
    // when the second detaches: its binding must travel with it.
    let server = Server::builder()
        .application(app())
        .auth_policy(tether::LoginPolicy::new().user("marcus", "secret"))
        .session_binding(tether::server::SessionBinding::SAME_ADDRESS)
        .detached_session_limits(1, usize::MAX)
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
    let mut first = Raw::connect("127.0.0.1", &addr).await;
    let id = session_of(&first.handshake("login:['marcus','secret']").await);
    let first_conn = next_connect(&mut events).await;
    let mut second = Raw::connect("127.0.0.1", &addr).await;
    session_of(&second.handshake("").await);
    let second_conn = next_connect(&mut events).await;
    drop(first);
    drop(second);
    within(
        LIMIT,
        "the oldest detached session's connection to close (over the cap)",
        first_conn.closed(),
    )
    .await;
    assert!(
        !second_conn.is_closed(),
        "the newest detached session stays in memory"
    );

    let mut intruder = Raw::connect("127.0.0.2", &addr).await;
    let answer = intruder.handshake(&format!("session:['{id}',0]")).await;
    assert_eq!(answer, "{handshake:[0],error:[11]}");
    let mut back = Raw::connect("127.0.0.1", &addr).await;
    let answer = back.handshake(&format!("session:['{id}',0]")).await;
    assert!(answer.starts_with("{handshake:[0],ok:"), "{answer}");
}

async fn next_connect(
    events: &mut tokio::sync::broadcast::Receiver<ServerEvent>,
) -> tether::Connection {
    within(LIMIT, "a Connect event", async {
        loop {
            if let Ok(ServerEvent::Connect(c)) = events.recv().await {
                return c;
            }
        }
    })
    .await
}

#[tokio::test]
async fn detached_sessions_past_the_cap_close_oldest_first_and_restore_from_the_store() {
    let server = Server::builder()
        .application(app())
        .detached_session_limits(2, usize::MAX)
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
    let mut ids = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut raw = Raw::connect("127.0.0.1", &addr).await;
        ids.push(session_of(&raw.handshake("").await));
        conns.push(next_connect(&mut events).await);
        // Detach it and wait until the server saw it go, so the order is the detach order.
        drop(raw);
        within(LIMIT, "the Disconnect event", async {
            loop {
                if let Ok(ServerEvent::Disconnect(_)) = events.recv().await {
                    return;
                }
            }
        })
        .await;
    }
    for c in &conns[..2] {
        within(LIMIT, "an evicted connection to close", c.closed()).await;
    }
    assert!(
        conns[2..].iter().all(|c| !c.is_closed()),
        "the newest two stay in memory"
    );
    // Evicted does not mean lost: the oldest session restores from the store.
    let mut back = Raw::connect("127.0.0.1", &addr).await;
    let answer = back.handshake(&format!("session:['{}',0]", ids[0])).await;
    assert!(answer.starts_with("{handshake:[0],ok:"), "{answer}");
}

#[tokio::test]
async fn failed_logins_are_throttled_per_user_and_per_source() {
    use tether::server::Throttle;
    let slow = |burst| {
        Some(Throttle {
            burst,
            refill: Duration::from_secs(3600),
        })
    };
    let server = Server::builder()
        .application(app())
        .auth_policy(
            tether::LoginPolicy::new()
                .user("marcus", "secret")
                .user("lucius", "other"),
        )
        .login_throttle_per_user(slow(3))
        .login_throttle_per_source(slow(5))
        .build()
        .unwrap();
    let addr = within(
        LIMIT,
        "the listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let attempt = |from: &'static str, user: &'static str, pw: &'static str| {
        let addr = addr.clone();
        async move {
            let mut raw = Raw::connect(from, &addr).await;
            raw.handshake(&format!("login:['{user}','{pw}']")).await
        }
    };
    let refused = "{handshake:[0],error:[11]}";
    // A good password works before any failure, and a success spends nothing.
    assert!(attempt("127.0.0.2", "marcus", "secret")
        .await
        .contains("ok:"));
    for _ in 0..3 {
        assert_eq!(attempt("127.0.0.2", "marcus", "guess").await, refused);
    }
    // marcus's allowance is spent: even the right password is refused unseen...
    assert_eq!(attempt("127.0.0.3", "marcus", "secret").await, refused);
    // ...while another user from the same source still logs in.
    assert!(attempt("127.0.0.2", "lucius", "other")
        .await
        .contains("ok:"));
    // The source 127.0.0.2 has spent 3 of 5; two more failures spend it.
    for _ in 0..2 {
        assert_eq!(attempt("127.0.0.2", "lucius", "guess").await, refused);
    }
    assert_eq!(attempt("127.0.0.2", "lucius", "other").await, refused);
    // Another source is not affected.
    assert!(attempt("127.0.0.4", "lucius", "other")
        .await
        .contains("ok:"));
}
