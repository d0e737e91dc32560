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
