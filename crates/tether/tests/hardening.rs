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
