//! `RedisStore` against a real `redis-server`: reads, writes, inactivity as a Redis TTL that
//! Redis expires; a server handing a session to another through it; and Redis going away
//! (store operations fail with `StoreError::Redis`, in bounded time, while the server keeps
//! serving its clients) and coming back on the same port (the store reconnects).

use futures::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether::reconnect::Attempt;
use tether::store::{RedisStore, SessionStore, StoreError};
use tether::testing::CutProxy;
mod common;

use common::{free_port, redis_server};
use tether::{
    connect, Application, Auth, ClientOptions, Connection, ConnectionEvent, Endpoint, Interface,
    Server, ServerEvent, Value,
};
use tokio::sync::broadcast;

/// Fails a hung await instead of hanging the suite.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// A plain connection for looking at (and configuring) Redis behind the store's back.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    within(
        LIMIT,
        "a raw redis connection",
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap()
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    within(LIMIT, "PTTL", redis::cmd("PTTL").arg(key).query_async(conn))
        .await
        .unwrap()
}

async fn raw_get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    within(LIMIT, "GET", redis::cmd("GET").arg(key).query_async(conn))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_reads_writes_and_expires_only_inactive_sessions() {
    let port = free_port();
    let _redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = within(LIMIT, "RedisStore::connect", RedisStore::connect(&url))
        .await
        .unwrap()
        .with_prefix("t1:")
        .with_lifetime(Duration::from_secs(1));
    let mut raw = raw(&url).await;

    within(LIMIT, "set", store.set("a", "A".into()))
        .await
        .unwrap();
    let got = within(LIMIT, "get", store.get("a")).await.unwrap();
    assert_eq!(got.as_deref(), Some("A"));
    assert_eq!(raw_get(&mut raw, "t1:a").await.as_deref(), Some("A"));
    assert_eq!(
        pttl(&mut raw, "t1:a").await,
        -1,
        "an active session never expires"
    );
    assert_eq!(
        within(LIMIT, "get", store.get("missing")).await.unwrap(),
        None
    );

    // Inactive: a TTL of the lifetime; reading makes it active again.
    within(LIMIT, "set_inactive", store.set_inactive("a"))
        .await
        .unwrap();
    let ttl = pttl(&mut raw, "t1:a").await;
    assert!(ttl > 0 && ttl <= 1000, "PTTL {ttl}");
    let got = within(LIMIT, "get", store.get("a")).await.unwrap();
    assert_eq!(got.as_deref(), Some("A"));
    assert_eq!(pttl(&mut raw, "t1:a").await, -1, "read made it active");
    within(LIMIT, "set", store.set("a", "A2".into()))
        .await
        .unwrap();
    let got = within(LIMIT, "get", store.get("a")).await.unwrap();
    assert_eq!(got.as_deref(), Some("A2"));
    within(
        LIMIT,
        "set_inactive of nothing",
        store.set_inactive("missing"),
    )
    .await
    .unwrap();
    assert_eq!(raw_get(&mut raw, "t1:missing").await, None);

    // Redis expires an inactive session: wait for its keyspace notification, not a clock.
    let () = within(
        LIMIT,
        "CONFIG SET",
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Ex")
            .query_async(&mut raw),
    )
    .await
    .unwrap();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut pubsub = within(LIMIT, "a pubsub connection", client.get_async_pubsub())
        .await
        .unwrap();
    within(
        LIMIT,
        "SUBSCRIBE",
        pubsub.subscribe("__keyevent@0__:expired"),
    )
    .await
    .unwrap();
    within(LIMIT, "set", store.set("b", "B".into()))
        .await
        .unwrap();
    within(LIMIT, "set_inactive", store.set_inactive("b"))
        .await
        .unwrap();
    let expired: String = within(LIMIT, "Redis to expire t1:b", pubsub.on_message().next())
        .await
        .expect("pubsub ended")
        .get_payload()
        .unwrap();
    assert_eq!(expired, "t1:b");
    assert_eq!(within(LIMIT, "get", store.get("b")).await.unwrap(), None);
    let got = within(LIMIT, "get", store.get("a")).await.unwrap();
    assert_eq!(
        got.as_deref(),
        Some("A2"),
        "the active session is still there"
    );
}

fn app(adds: Arc<Mutex<Vec<i64>>>) -> Application {
    Application::new("svc", "1.0.0").unwrap().interface(
        "log",
        Interface::new().method("add", move |_c, args: Vec<Value>| {
            let n = args.first().and_then(Value::as_i64).unwrap_or(-1);
            adds.lock().unwrap().push(n);
            async move { Ok(Value::from(n)) }
        }),
    )
}

struct Node {
    server: Server,
    /// The server's own address (the proxy's links are cut; this one's are not).
    addr: String,
    proxy: CutProxy,
    adds: Arc<Mutex<Vec<i64>>>,
    events: broadcast::Receiver<ServerEvent>,
}

async fn node(store: Arc<dyn SessionStore>) -> Node {
    let adds = Arc::new(Mutex::new(Vec::new()));
    let server = Server::builder()
        .application(app(adds.clone()))
        .session_store(store)
        .build()
        .unwrap();
    let events = server.events();
    let addr = server
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = CutProxy::start(addr.parse().unwrap()).await.unwrap();
    Node {
        server,
        addr,
        proxy,
        adds,
        events,
    }
}

impl Node {
    fn url(&self) -> String {
        format!("jstp://{}", self.proxy.local_addr())
    }
}

async fn add(conn: &Connection, n: i64, what: &str) {
    let answer = within(LIMIT, what, conn.call("log", "add", vec![n.into()])).await;
    assert_eq!(answer.unwrap(), vec![Value::from(n)], "{what}");
}

async fn reconnected(events: &mut broadcast::Receiver<ConnectionEvent>, what: &str) {
    within(LIMIT, what, async {
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::Reconnect { error: None }) => return,
                Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                    panic!("closed instead of reconnecting")
                }
                _ => {}
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_redis_outlives_redis_going_away_and_coming_back() {
    const PREFIX: &str = "tether-test:";
    let port = free_port();
    let mut redis = redis_server(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = |url: String| async move {
        let store = within(LIMIT, "RedisStore::connect", RedisStore::connect(&url))
            .await
            .unwrap()
            .with_prefix(PREFIX);
        Arc::new(store)
    };
    let (store_a, store_b) = (store(url.clone()).await, store(url.clone()).await);
    let first = node(store_a).await;
    let mut second = node(store_b.clone()).await;
    let mut raw = raw(&url).await;

    // Handoff through Redis: the first server saves the session as it shuts down, the client
    // moves to the second server (its reconnector says so, once the test lets it: until then
    // it is refused), which restores it from Redis.
    let to_second: Endpoint = second.url().parse().unwrap();
    let refuser = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused: Endpoint = format!("jstp://{}", refuser.local_addr().unwrap())
        .parse()
        .unwrap();
    tokio::spawn(async move { while refuser.accept().await.is_ok() {} });
    let go = Arc::new(AtomicBool::new(false));
    let options = ClientOptions::default().call_timeout(LIMIT).reconnector({
        let go = go.clone();
        move |_failures: u32, _last: &Endpoint| {
            Some(Attempt {
                delay: Duration::from_millis(5),
                endpoint: if go.load(Ordering::SeqCst) {
                    to_second.clone()
                } else {
                    refused.clone()
                },
            })
        }
    });
    let conn = within(
        LIMIT,
        "the client to connect",
        connect(&first.url(), "svc", options),
    )
    .await
    .unwrap();
    let id = conn.session_id().unwrap();
    let key = format!("{PREFIX}{id}");
    add(&conn, 1, "a call on the first server").await;
    let mut client_events = conn.events();
    within(
        LIMIT,
        "the first server to shut down",
        first.server.shutdown(),
    )
    .await;
    assert!(raw_get(&mut raw, &key).await.is_some(), "saved to Redis");
    assert!(pttl(&mut raw, &key).await > 0, "saved as inactive");
    go.store(true, Ordering::SeqCst);
    reconnected(&mut client_events, "the restore on the second server").await;
    let restored = within(LIMIT, "the second server's RestoreSession", async {
        loop {
            if let ServerEvent::RestoreSession(c) = second.events.recv().await.unwrap() {
                return c;
            }
        }
    })
    .await;
    assert_eq!(restored.session_id().as_deref(), Some(id.as_str()));
    add(&conn, 2, "a call on the second server").await;
    assert_eq!(*first.adds.lock().unwrap(), vec![1]);
    assert_eq!(*second.adds.lock().unwrap(), vec![2]);
    assert_eq!(pttl(&mut raw, &key).await, -1, "restoring made it active");

    // Redis goes away: every store operation fails with a typed error in bounded time. The
    // first notices the dead link at once; the others wait out the store's reconnect attempts
    // (about 9.5 s with redis' default backoff), so they run together, and meanwhile the
    // server keeps serving: its client calls, a dropped link restores from the live
    // connection, a new client connects.
    within(LIMIT, "redis-server to exit", redis.kill())
        .await
        .unwrap();
    let got = within(LIMIT, "get with Redis down", store_b.get(&id)).await;
    assert!(matches!(got, Err(StoreError::Redis(_))), "{got:?}");
    let store_ops = async {
        futures::join!(
            store_b.get(&id),
            store_b.set("x", "X".into()),
            store_b.set_inactive("x")
        )
    };
    let serving = async {
        add(&conn, 3, "a call with Redis down").await;
        assert_eq!(second.proxy.cut(), 1);
        reconnected(&mut client_events, "a restore with Redis down").await;
        add(&conn, 4, "a call after a restore with Redis down").await;
        let other = within(
            LIMIT,
            "a new client with Redis down",
            connect(
                &second.url(),
                "svc",
                ClientOptions::default().no_reconnect(),
            ),
        )
        .await
        .unwrap();
        add(&other, 5, "the new client's call with Redis down").await;
        other
    };
    // A restore of a session this server does not hold has to ask the store: refused (11),
    // not hung.
    let unknown = async {
        let mut options = ClientOptions::default().no_reconnect();
        options.auth = Auth::Session {
            id: "not-a-live-session".into(),
            received: 0,
        };
        options.handshake_timeout = LIMIT;
        connect(&format!("jstp://{}", second.addr), "svc", options).await
    };
    let ((got, set, inactive), other, unknown) = within(
        LIMIT,
        "store operations, serving and a restore with Redis down",
        futures::future::join3(store_ops, serving, unknown),
    )
    .await;
    assert_eq!(unknown.err().and_then(|e| e.code()), Some(11));
    assert!(matches!(got, Err(StoreError::Redis(_))), "{got:?}");
    assert!(matches!(set, Err(StoreError::Redis(_))), "{set:?}");
    assert!(
        matches!(inactive, Err(StoreError::Redis(_))),
        "{inactive:?}"
    );
    assert_eq!(*second.adds.lock().unwrap(), vec![2, 3, 4, 5]);

    // Redis comes back on the same port (empty): the store reconnects by itself. Its first
    // operations may still fail while its reconnect backoff runs out; it must recover.
    let _redis = redis_server(port).await;
    let mut raw = self::raw(&url).await;
    let mut failures = 0;
    within(LIMIT, "the store to reconnect to Redis", async {
        loop {
            match store_b.set("probe", "P".into()).await {
                Ok(()) => return,
                Err(StoreError::Redis(_)) => failures += 1,
                Err(e) => panic!("{e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        raw_get(&mut raw, &format!("{PREFIX}probe"))
            .await
            .as_deref(),
        Some("P")
    );
    eprintln!("store operations failed {failures} times after the restart");

    // The server writes to the new Redis again: shutting down saves both sessions.
    let other_key = format!("{PREFIX}{}", other.session_id().unwrap());
    within(
        LIMIT,
        "the second server to shut down",
        second.server.shutdown(),
    )
    .await;
    assert!(
        raw_get(&mut raw, &key).await.is_some(),
        "the first client's session"
    );
    assert!(
        raw_get(&mut raw, &other_key).await.is_some(),
        "the new client's session"
    );
    within(LIMIT, "the client to close", conn.close()).await;
}
