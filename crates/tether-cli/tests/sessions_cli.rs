//! Sessions across real server processes: `tether serve --store PATH` restarted on the same
//! redb file, and two `tether serve --store redis://…` nodes sharing a real redis-server. The
//! client is tether's own, switching to whichever server is up now.

mod common;

use common::{redis, serve, within, Proc, DEADLINE};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether::reconnect::Attempt;
use tether::{
    connect, ClientOptions, Connection, ConnectionEvent, Endpoint, ErrorCode, RemoteError, Value,
};
use tokio::sync::broadcast;

/// Where the client reconnects: set by the test to the server that is up now.
#[derive(Clone)]
struct Target(Arc<Mutex<Endpoint>>);

impl Target {
    fn new(ready: &serde_json::Value) -> Target {
        Target(Arc::new(Mutex::new(endpoint(ready))))
    }
    fn set(&self, ready: &serde_json::Value) {
        *self.0.lock().unwrap() = endpoint(ready);
    }
    fn get(&self) -> Endpoint {
        self.0.lock().unwrap().clone()
    }
}

fn endpoint(ready: &serde_json::Value) -> Endpoint {
    format!("jstp://{}", ready["tcp"][0].as_str().unwrap())
        .parse()
        .unwrap()
}

async fn client(target: &Target) -> Connection {
    let t = target.clone();
    // Retry every 20 ms for as long as a restarted server may take to come up on a loaded
    // machine; `next_reconnect`'s deadline fails the test first if it never does.
    let give_up = Instant::now() + 2 * DEADLINE;
    let options = ClientOptions::default().reconnector(move |_: u32, _: &Endpoint| {
        (Instant::now() < give_up).then(|| Attempt {
            delay: Duration::from_millis(20),
            endpoint: t.get(),
        })
    });
    within(
        DEADLINE,
        "the first handshake",
        connect(&target.get().to_string(), "testApp", options),
    )
    .await
    .unwrap()
}

/// The outcome of the next restore: `Ok` restored, `Err` the error the server refused the
/// session with.
async fn next_reconnect(
    events: &mut broadcast::Receiver<ConnectionEvent>,
) -> Result<(), RemoteError> {
    let wait = async {
        let mut refusal = None;
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::Reconnect { error: None }) => return Ok(()),
                Ok(ConnectionEvent::Handshake { error: Some(e), .. }) => refusal = Some(e),
                // Attempts before the new server is up fail to connect; keep waiting.
                Ok(ConnectionEvent::Reconnect { error: Some(e) })
                    if e.starts_with("session restore refused") =>
                {
                    return Err(refusal.expect("a refused restore follows a handshake error"))
                }
                Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                    panic!("the connection closed instead of reconnecting")
                }
                _ => {}
            }
        }
    };
    within(DEADLINE, "the outcome of the session restore", wait).await
}

/// Restarts the server between two calls; the second call is made while no server runs.
async fn restart_between_calls(
    first: &mut Proc,
    first_ready: &serde_json::Value,
    start_second: impl FnOnce() -> (Proc, serde_json::Value),
) -> (Result<(), RemoteError>, Connection, Proc) {
    let target = Target::new(first_ready);
    let conn = client(&target).await;
    let session = conn.session_id();
    let answer = within(
        DEADLINE,
        "calculator.answer",
        conn.call("calculator", "answer", vec![]),
    );
    assert_eq!(answer.await.unwrap(), vec![Value::from(42)]);
    let mut events = conn.events();
    assert!(first.terminate(), "serve did not stop cleanly");
    // Made while no server is up: buffered, sent once the session is restored.
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.call("someService", "sayHi", vec!["again".into()])
                .await
        })
    };
    // Blocking (it waits for the ready line), so off the runtime's workers.
    let (second, second_ready) = tokio::task::block_in_place(start_second);
    target.set(&second_ready);
    let outcome = next_reconnect(&mut events).await;
    if outcome.is_ok() {
        let pending = within(DEADLINE, "the call made while no server ran", pending);
        assert_eq!(
            pending.await.unwrap().unwrap(),
            vec![Value::from("Hi, again!")]
        );
        assert_eq!(conn.session_id(), session);
    }
    (outcome, conn, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redb_store_keeps_sessions_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sessions.redb");
    let db = db.to_str().unwrap().to_owned();
    let (mut first, ready) = serve(&["--tcp", "127.0.0.1:0", "--store", &db]);
    let (outcome, conn, _second) = restart_between_calls(&mut first, &ready, || {
        serve(&["--tcp", "127.0.0.1:0", "--store", &db])
    })
    .await;
    assert_eq!(outcome, Ok(()));
    within(DEADLINE, "the close", conn.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_store_forgets_sessions_on_restart() {
    // The control for the test above: the same flow without a persistent store is refused.
    let (mut first, ready) = serve(&["--tcp", "127.0.0.1:0"]);
    let (outcome, conn, _second) =
        restart_between_calls(&mut first, &ready, || serve(&["--tcp", "127.0.0.1:0"])).await;
    let refused = outcome.expect_err("an unknown session was restored");
    assert_eq!(refused, RemoteError::code(ErrorCode::AuthFailed));
    assert_eq!(refused.code, 11);
    within(DEADLINE, "the close", conn.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_sessions_through_redis() {
    let (_redis, url) = redis();
    let (mut node1, ready1) = serve(&["--tcp", "127.0.0.1:0", "--store", &url]);
    // The second node runs all along; the client moves to it when the first goes away.
    let (node2, ready2) = serve(&["--tcp", "127.0.0.1:0", "--store", &url]);
    let mut node2 = Some((node2, ready2));
    let (outcome, conn, _node2) =
        restart_between_calls(&mut node1, &ready1, || node2.take().unwrap()).await;
    assert_eq!(outcome, Ok(()));

    // The restored client counts as a client on node 2: it gets node 2's broadcasts.
    let mut events = conn.events();
    let listener = conn.clone();
    let sent = within(
        DEADLINE,
        "chat.send on node 2",
        listener.call("chat", "send", vec!["over redis".into()]),
    );
    assert_eq!(sent.await.unwrap(), Vec::<Value>::new());
    let broadcast = async {
        loop {
            if let ConnectionEvent::Event { event, args, .. } = events.recv().await.unwrap() {
                return (event, args);
            }
        }
    };
    let (event, args) = within(DEADLINE, "node 2's chat broadcast", broadcast).await;
    assert_eq!(event, "message");
    assert_eq!(args, vec![Value::Null, Value::from("over redis")]);
    within(DEADLINE, "the close", conn.close()).await;
}
