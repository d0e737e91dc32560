//! A detached session outlives `client_expiration_time` only in the session store: once the
//! server's in-memory connection expires and closes, a restore comes from the store onto a new
//! server-side connection (memory and redb stores); before it expires, a restore adopts the
//! live connection and never reads the store.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether::reconnect::Attempt;
use tether::store::{MemoryStore, RedbStore, SessionStore, StoreError};
use tether::testing::CutProxy;
use tether::{
    connect, Application, ClientOptions, Connection, Endpoint, Interface, Server, ServerEvent,
    Value,
};
use tether_wire::session::{Role as SessionRole, SessionConfig};
use tether_wire::Session;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// Fails a hung await instead of hanging the suite.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// A store that records which ids the server read, so a restore from the store is told apart
/// from one that adopted the live connection.
struct Watched {
    inner: Arc<dyn SessionStore>,
    gets: Mutex<Vec<String>>,
}

impl Watched {
    fn gets(&self) -> Vec<String> {
        self.gets.lock().unwrap().clone()
    }
}

impl SessionStore for Watched {
    fn get<'a>(
        &'a self,
        id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Option<String>, StoreError>> {
        self.gets.lock().unwrap().push(id.to_owned());
        self.inner.get(id)
    }

    fn set<'a>(
        &'a self,
        id: &'a str,
        session: String,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        self.inner.set(id, session)
    }

    fn set_inactive<'a>(
        &'a self,
        id: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        self.inner.set_inactive(id)
    }

    fn remove<'a>(&'a self, id: &'a str) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        self.inner.remove(id)
    }
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

/// Where the client reconnects: while closed, to a listener that drops every connection at
/// once (a failed attempt), so the client stays away from the server until the test opens it.
#[derive(Clone)]
struct Gate {
    open: Arc<AtomicBool>,
    server: Endpoint,
    refuser: Endpoint,
}

impl Gate {
    async fn new(server: Endpoint) -> Gate {
        let refuser = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = refuser.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = refuser.accept().await {
                drop(socket);
            }
        });
        Gate {
            open: Arc::new(AtomicBool::new(true)),
            server,
            refuser: format!("jstp://{addr}").parse().unwrap(),
        }
    }

    fn options(&self) -> ClientOptions {
        let gate = self.clone();
        ClientOptions::default().call_timeout(LIMIT).reconnector(
            move |_failures: u32, _last: &Endpoint| {
                let endpoint = if gate.open.load(Ordering::SeqCst) {
                    gate.server.clone()
                } else {
                    gate.refuser.clone()
                };
                Some(Attempt {
                    delay: Duration::from_millis(10),
                    endpoint,
                })
            },
        )
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

struct Setup {
    server: Server,
    events: broadcast::Receiver<ServerEvent>,
    proxy: CutProxy,
    store: Arc<Watched>,
    adds: Arc<Mutex<Vec<i64>>>,
    gate: Gate,
}

async fn setup(store: Arc<dyn SessionStore>, expiration: Duration) -> Setup {
    let adds = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(Watched {
        inner: store,
        gets: Mutex::new(Vec::new()),
    });
    let server = Server::builder()
        .application(app(adds.clone()))
        .session_store(store.clone())
        .client_expiration_time(expiration)
        .build()
        .unwrap();
    let events = server.events();
    let addr = server
        .listen("jstp://127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let proxy = CutProxy::start(addr.parse().unwrap()).await.unwrap();
    let gate = Gate::new(format!("jstp://{}", proxy.local_addr()).parse().unwrap()).await;
    Setup {
        server,
        events,
        proxy,
        store,
        adds,
        gate,
    }
}

/// The connection carried by the next server event `pick` accepts.
async fn next_event(
    events: &mut broadcast::Receiver<ServerEvent>,
    pick: impl Fn(ServerEvent) -> Option<Connection>,
) -> Connection {
    loop {
        let ev = events.recv().await.expect("server event stream ended");
        if let Some(c) = pick(ev) {
            return c;
        }
    }
}

/// A connected client, with the server's side of it.
async fn client(s: &mut Setup) -> (Connection, Connection) {
    let url = format!("jstp://{}", s.proxy.local_addr());
    let conn = within(
        LIMIT,
        "the client to connect",
        connect(&url, "svc", s.gate.options()),
    )
    .await
    .unwrap();
    let server_conn = within(
        LIMIT,
        "the server's Connect event",
        next_event(&mut s.events, |ev| match ev {
            ServerEvent::Connect(c) => Some(c),
            _ => None,
        }),
    )
    .await;
    let one = within(
        LIMIT,
        "the first call",
        conn.call("log", "add", vec![1.into()]),
    )
    .await;
    assert_eq!(one.unwrap(), vec![Value::from(1)]);
    (conn, server_conn)
}

/// Cuts the client's link and waits until the server has detached the session.
async fn cut_and_detach(s: &mut Setup, server_conn: &Connection) {
    assert_eq!(s.proxy.cut(), 1);
    let id = server_conn.id();
    within(
        LIMIT,
        "the server's Disconnect event after the cut",
        next_event(&mut s.events, |ev| match ev {
            ServerEvent::Disconnect(c) if c.id() == id => Some(c),
            _ => None,
        }),
    )
    .await;
}

async fn restored(events: &mut broadcast::Receiver<ServerEvent>) -> Connection {
    within(
        LIMIT,
        "the server's RestoreSession event",
        next_event(events, |ev| match ev {
            ServerEvent::RestoreSession(c) => Some(c),
            _ => None,
        }),
    )
    .await
}

async fn expired_session_restores_from_the_store(store: Arc<dyn SessionStore>) {
    let mut s = setup(store.clone(), Duration::from_millis(200)).await;
    let (conn, server_conn) = client(&mut s).await;
    let id = conn.session_id().expect("a session id");

    s.gate.set_open(false);
    cut_and_detach(&mut s, &server_conn).await;
    // Made while the client is away: buffered by the client, resent after the restore.
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("log", "add", vec![2.into()]).await })
    };

    // The detached connection expires and closes for good; it writes its session first.
    within(
        LIMIT,
        "the detached server connection to expire and close",
        server_conn.closed(),
    )
    .await;
    assert!(s.server.clients().is_empty());
    assert!(s.store.gets().is_empty(), "nothing restored yet");
    let text = within(LIMIT, "reading the store", store.get(&id))
        .await
        .unwrap()
        .expect("the expired session lives in the store");
    let stored = Session::decode(&text, SessionConfig::default()).unwrap();
    assert_eq!(stored.id(), id);
    assert_eq!(stored.role(), SessionRole::Server);
    assert_eq!(stored.received_count(), 1, "the state as of the first call");

    s.gate.set_open(true);
    let back = restored(&mut s.events).await;
    assert_ne!(
        back.id(),
        server_conn.id(),
        "restored onto a new connection, not the expired one"
    );
    assert_eq!(back.session_id().as_deref(), Some(id.as_str()));
    assert_eq!(s.store.gets(), vec![id.clone()], "read from the store once");

    let two = within(LIMIT, "the call made while away", pending).await;
    assert_eq!(two.unwrap().unwrap(), vec![Value::from(2)]);
    let three = within(
        LIMIT,
        "a call after the restore",
        conn.call("log", "add", vec![3.into()]),
    );
    assert_eq!(three.await.unwrap(), vec![Value::from(3)]);
    assert_eq!(*s.adds.lock().unwrap(), vec![1, 2, 3], "each call ran once");
    assert_eq!(conn.session_id().as_deref(), Some(id.as_str()));
    let clients = s.server.clients();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].id(), back.id());
    within(LIMIT, "the client to close", conn.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_restores_from_a_memory_store() {
    expired_session_restores_from_the_store(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_restores_from_a_redb_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("sessions.redb")).unwrap();
    expired_session_restores_from_the_store(Arc::new(store)).await;
}

/// The other half of telling the two apart: within the expiration the live connection takes
/// the new transport and the store is never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_restored_before_expiry_adopts_the_live_connection() {
    let mut s = setup(Arc::new(MemoryStore::new()), Duration::from_secs(3600)).await;
    let (conn, server_conn) = client(&mut s).await;
    cut_and_detach(&mut s, &server_conn).await;
    let back = restored(&mut s.events).await;
    assert_eq!(back.id(), server_conn.id(), "the same server connection");
    assert!(!server_conn.is_closed());
    assert!(s.store.gets().is_empty(), "the store was not read");
    let two = within(
        LIMIT,
        "a call after the restore",
        conn.call("log", "add", vec![2.into()]),
    );
    assert_eq!(two.await.unwrap(), vec![Value::from(2)]);
    assert_eq!(*s.adds.lock().unwrap(), vec![1, 2]);
    within(LIMIT, "the client to close", conn.close()).await;
}
