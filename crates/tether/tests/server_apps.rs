//! What a server offers and how much a connection takes on: `Server::update_applications`
//! with clients connected (new handshakes see the new set, existing connections keep the
//! application they shook hands with), and `ConnectionConfig::max_pending` (the request past
//! the limit fails with `QueueFull`, the others complete, the connection stays usable).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tether::reconnect::Backoff;
use tether::testing::CutProxy;
use tether::{
    connect, Application, ClientOptions, Connection, ConnectionEvent, Error, Interface, Server,
    ServerEvent, Value,
};
use tokio::sync::{broadcast, mpsc, Semaphore};

/// Fails a hung await instead of hanging the suite.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// `name@version` whose `info.version` answers its own version.
fn versioned(name: &str, version: &str) -> Application {
    let v = version.to_owned();
    Application::new(name, version).unwrap().interface(
        "info",
        Interface::new().method("version", move |_c, _args| {
            let v = v.clone();
            async move { Ok(Value::from(v)) }
        }),
    )
}

fn options() -> ClientOptions {
    ClientOptions::default()
        .call_timeout(LIMIT)
        .reconnector(Backoff::fixed_range(
            Duration::from_millis(1),
            Duration::from_millis(20),
        ))
}

async fn version_of(conn: &Connection) -> String {
    let answer = within(LIMIT, "info.version", conn.call("info", "version", vec![]))
        .await
        .unwrap();
    answer[0].as_str().unwrap().to_owned()
}

/// The JSTP error code a handshake for `app` gets.
async fn refused_code(url: &str, app: &str) -> Option<i64> {
    let result = within(
        LIMIT,
        "a handshake",
        connect(url, app, options().no_reconnect()),
    )
    .await;
    match result {
        Ok(conn) => panic!(
            "{app}: handshake accepted (session {:?})",
            conn.session_id()
        ),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_handshakes_see_the_new_applications_and_connected_clients_keep_theirs() {
    let server = Server::builder()
        .application(versioned("svc", "1.0.0"))
        .application(versioned("old", "1.0.0"))
        .build()
        .unwrap();
    let addr = server
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = CutProxy::start(addr.parse().unwrap()).await.unwrap();
    let url = format!("jstp://{}", proxy.local_addr());
    let before = within(LIMIT, "a client of svc 1", connect(&url, "svc", options()))
        .await
        .unwrap();
    let old = within(LIMIT, "a client of old", connect(&url, "old", options()))
        .await
        .unwrap();
    assert_eq!(version_of(&before).await, "1.0.0");

    server
        .update_applications(vec![
            versioned("svc", "2.0.0"),
            versioned("svc", "2.1.0"),
            versioned("new", "1.0.0"),
        ])
        .unwrap();

    // New handshakes resolve against the new set only.
    let after = within(LIMIT, "a client of svc 2", connect(&url, "svc", options()))
        .await
        .unwrap();
    assert_eq!(version_of(&after).await, "2.1.0");
    let pinned = within(LIMIT, "svc@2.0.0", connect(&url, "svc@2.0.0", options()))
        .await
        .unwrap();
    assert_eq!(version_of(&pinned).await, "2.0.0");
    let fresh = within(LIMIT, "a client of new", connect(&url, "new", options()))
        .await
        .unwrap();
    assert_eq!(version_of(&fresh).await, "1.0.0");
    assert_eq!(refused_code(&url, "svc@1.0.0").await, Some(10));
    assert_eq!(refused_code(&url, "svc@^1.0.0").await, Some(10));
    assert_eq!(refused_code(&url, "old").await, Some(10));

    // Connections made before keep the application they shook hands with.
    assert_eq!(version_of(&before).await, "1.0.0");
    assert_eq!(version_of(&old).await, "1.0.0");
    assert_eq!(
        before.application().map(|a| a.version().to_string()),
        Some("1.0.0".to_owned())
    );
    assert_eq!(server.clients().len(), 5);

    // A dropped link restores the live session (whose app is still offered by name) with
    // its original version, not the newest.
    let mut client_events = before.events();
    // (Links of refused handshakes may still be winding down.)
    assert!(proxy.cut() >= 5);
    within(
        LIMIT,
        "the svc 1 client to restore",
        reconnected(&mut client_events),
    )
    .await;
    assert_eq!(version_of(&before).await, "1.0.0");

    // A failed update leaves the offered set as it was.
    let duplicate =
        server.update_applications(vec![versioned("x", "1.0.0"), versioned("x", "1.0.0")]);
    assert!(
        matches!(duplicate, Err(Error::InvalidArgument(_))),
        "{duplicate:?}"
    );
    let again = within(
        LIMIT,
        "svc after a failed update",
        connect(&url, "svc", options()),
    )
    .await
    .unwrap();
    assert_eq!(version_of(&again).await, "2.1.0");
    assert_eq!(refused_code(&url, "x").await, Some(10));

    for conn in [before, old, after, pinned, fresh, again] {
        within(LIMIT, "a client to close", conn.close()).await;
    }
}

/// A restore is a handshake too: as upstream, the app is looked up before the session, so a
/// live session whose application is no longer offered is refused with 10 when its link
/// drops; the client keeps retrying (the default) and restores the same session once the
/// application is offered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_is_refused_while_its_app_is_not_offered() {
    let server = Server::builder()
        .application(versioned("old", "1.0.0"))
        .build()
        .unwrap();
    let addr = server
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = CutProxy::start(addr.parse().unwrap()).await.unwrap();
    let url = format!("jstp://{}", proxy.local_addr());
    let conn = within(LIMIT, "a client of old", connect(&url, "old", options()))
        .await
        .unwrap();
    let session = conn.session_id();
    server
        .update_applications(vec![versioned("new", "1.0.0")])
        .unwrap();
    assert_eq!(version_of(&conn).await, "1.0.0");
    let mut events = conn.events();
    assert_eq!(proxy.cut(), 1);
    let refused = within(LIMIT, "the refused restore", async {
        loop {
            match events.recv().await.unwrap() {
                ConnectionEvent::Handshake { error: Some(e), .. } => return e,
                ConnectionEvent::Reconnect { error: None } => panic!("restored"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(refused.code, 10);

    server
        .update_applications(vec![versioned("old", "1.0.0")])
        .unwrap();
    within(
        LIMIT,
        "the old client to restore",
        reconnected_after_refusals(&mut events),
    )
    .await;
    assert_eq!(conn.session_id(), session);
    assert_eq!(version_of(&conn).await, "1.0.0");
    within(LIMIT, "the client to close", conn.close()).await;
}

/// Waits for a successful reconnect, letting failed attempts go by.
async fn reconnected_after_refusals(events: &mut broadcast::Receiver<ConnectionEvent>) {
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Reconnect { error: None }) => return,
            Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                panic!("closed instead of reconnecting")
            }
            _ => {}
        }
    }
}

/// Waits for a successful reconnect; a refused one fails the test with the server's reason.
async fn reconnected(events: &mut broadcast::Receiver<ConnectionEvent>) {
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Reconnect { error: None }) => return,
            Ok(ConnectionEvent::Reconnect { error: Some(e) }) => panic!("restore failed: {e}"),
            Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                panic!("closed instead of reconnecting")
            }
            _ => {}
        }
    }
}

/// `log.block` reports its entry, then waits for a permit; `log.add` answers at once.
fn blocking_app(entered: mpsc::UnboundedSender<()>, permits: Arc<Semaphore>) -> Application {
    Application::new("svc", "1.0.0").unwrap().interface(
        "log",
        Interface::new()
            .method("block", move |_c, _args| {
                let entered = entered.clone();
                let permits = permits.clone();
                async move {
                    let _ = entered.send(());
                    permits.acquire().await.unwrap().forget();
                    Ok(Value::from("released"))
                }
            })
            .method("add", |_c, args: Vec<Value>| async move {
                Ok(args.into_iter().next().unwrap_or(Value::Null))
            }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_max_pending_fails_with_queue_full_and_the_rest_complete() {
    const MAX: usize = 3;
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(0));
    let server = Server::builder()
        .application(blocking_app(entered_tx, permits.clone()))
        .build()
        .unwrap();
    let mut server_events = server.events();
    let addr = server
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut opts = options();
    opts.connection.max_pending = MAX;
    let conn = within(
        LIMIT,
        "the client to connect",
        connect(&format!("jstp://{addr}"), "svc", opts),
    )
    .await
    .unwrap();
    let server_conn = within(LIMIT, "the server's Connect event", async {
        loop {
            if let ServerEvent::Connect(c) = server_events.recv().await.unwrap() {
                return c;
            }
        }
    })
    .await;
    let mut arrivals = server_conn.events();

    let blocked: Vec<_> = (0..MAX)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.call("log", "block", vec![]).await })
        })
        .collect();
    for i in 0..MAX {
        within(
            LIMIT,
            &format!("blocked call {i} to reach the server"),
            entered.recv(),
        )
        .await
        .unwrap();
    }

    // The limit is reached: further requests of every kind fail at once, locally.
    let over = within(
        LIMIT,
        "the call past the limit",
        conn.call("log", "block", vec![]),
    )
    .await;
    assert!(matches!(over, Err(Error::QueueFull)), "{over:?}");
    let ping = within(LIMIT, "the ping past the limit", conn.ping()).await;
    assert!(matches!(ping, Err(Error::QueueFull)), "{ping:?}");

    permits.add_permits(MAX);
    for (i, call) in blocked.into_iter().enumerate() {
        let done = within(LIMIT, &format!("blocked call {i} to complete"), call).await;
        assert_eq!(done.unwrap().unwrap(), vec![Value::from("released")]);
    }

    // Usable again, and the refused requests never reached the server: it saw exactly MAX
    // blocks before this call.
    let add = within(
        LIMIT,
        "a call after the limit",
        conn.call("log", "add", vec![7.into()]),
    );
    assert_eq!(add.await.unwrap(), vec![Value::from(7)]);
    let mut blocks = 0;
    within(LIMIT, "the server's Call event for log.add", async {
        loop {
            match arrivals.recv().await.unwrap() {
                ConnectionEvent::Call { method, .. } if method == "add" => return,
                ConnectionEvent::Call { method, .. } if method == "block" => blocks += 1,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(blocks, MAX);
    assert!(entered.try_recv().is_err(), "a refused call ran");
    let ping = within(LIMIT, "a ping after the limit", conn.ping()).await;
    assert!(ping.is_ok(), "{ping:?}");
    within(LIMIT, "the client to close", conn.close()).await;
}
