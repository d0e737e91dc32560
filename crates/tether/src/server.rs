//! The JSTP server: applications, authentication, listeners, clients and broadcast.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether::Error> {
//! use tether::{Application, Interface, Server, Value};
//!
//! let app = Application::new("testApp", "1.0.0")?.interface(
//!     "calculator",
//!     Interface::new().method("answer", |_conn, _args| async { Ok(Value::from(42)) }),
//! );
//! let server = Server::builder().application(app).build()?;
//! let addr = server.listen("jstp://127.0.0.1:3000".parse()?).await?;
//! println!("listening on {addr}");
//! # Ok(()) }
//! ```

use crate::app::{AppRegistry, Application};
use crate::connection::{
    self, Accepted, Connection, ConnectionConfig, HandshakeDecision, ServerHooks, SessionFate,
};
use crate::error::{Error, RemoteError};
pub use crate::guard::{SessionBinding, Throttle};
use crate::store::{MemoryStore, SessionStore};
use crate::transport::{Endpoint, Listener, ListenerOptions, Transport};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tether_wire::{Auth, ErrorCode, PreparedEvent, Session, Value};
use tokio::sync::{broadcast, watch};

/// What an auth policy is asked to decide.
#[derive(Debug, Clone)]
pub struct AuthRequest {
    /// The connection being authenticated.
    pub connection: Connection,
    /// The application the client asked for.
    pub application: Arc<Application>,
    /// The strategy (`login`, or a custom one).
    pub strategy: String,
    /// The strategy's payload (`['user','password']` for `login`).
    pub credentials: Value,
}

/// Decides `login` and custom handshake strategies. Resolves to the user name, or to an error
/// sent as the handshake's `error` (use code 11 for bad credentials).
///
/// Any `Fn(AuthRequest) -> impl Future<Output = Result<String, RemoteError>>` is a policy.
pub trait AuthPolicy: Send + Sync + 'static {
    /// Authenticates one handshake.
    fn authenticate(&self, request: AuthRequest)
        -> BoxFuture<'static, Result<String, RemoteError>>;
}

impl<F, Fut> AuthPolicy for F
where
    F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, RemoteError>> + Send + 'static,
{
    fn authenticate(
        &self,
        request: AuthRequest,
    ) -> BoxFuture<'static, Result<String, RemoteError>> {
        Box::pin(self(request))
    }
}

/// The `login` strategy against a fixed table of users and passwords.
#[derive(Debug, Clone, Default)]
pub struct LoginPolicy {
    users: HashMap<String, String>,
}

impl LoginPolicy {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.users.insert(name.into(), password.into());
        self
    }
}

impl AuthPolicy for LoginPolicy {
    fn authenticate(
        &self,
        request: AuthRequest,
    ) -> BoxFuture<'static, Result<String, RemoteError>> {
        let result = (|| {
            if request.strategy != "login" {
                return None;
            }
            let creds = request.credentials.as_array()?;
            let user = creds.first()?.as_str()?;
            let password = creds.get(1)?.as_str()?;
            // Constant time in the password's bytes and length (keyed digests first), and an
            // unknown user costs the same comparison, so timing tells neither.
            let expected = self.users.get(user);
            let same = crate::guard::passwords_equal(
                expected.map_or("\u{0}unknown user", String::as_str),
                password,
            );
            (same && expected.is_some()).then(|| user.to_owned())
        })();
        Box::pin(async move { result.ok_or_else(|| RemoteError::code(ErrorCode::AuthFailed)) })
    }
}

/// What happens on a server.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    /// A client completed a handshake with a new session.
    Connect(Connection),
    /// A handshaken client's transport closed (its session may still be restored).
    Disconnect(Connection),
    /// A client restored its session on a new transport (upstream's `reconnect`).
    Reconnect(Connection),
    /// A session was restored, from the live cache or from the session store (upstream's
    /// `restoreSession`); follows [`ServerEvent::Reconnect`].
    RestoreSession(Connection),
    /// A handshake request arrived.
    HandshakeRequest {
        /// The connection.
        connection: Connection,
        /// The application name asked for.
        app: String,
        /// The strategy (`anonymous`, `login`, `session`, custom).
        strategy: String,
    },
    /// A connection sent no successful handshake in time and was closed.
    HandshakeTimeout(Connection),
    /// A listener or connection failed.
    ConnectionError {
        /// The connection, when the error belongs to one.
        connection: Option<Connection>,
        /// What went wrong.
        error: String,
    },
}

/// Builds a [`Server`].
pub struct ServerBuilder {
    apps: AppRegistry,
    errors: Vec<Error>,
    auth: Option<Arc<dyn AuthPolicy>>,
    handshake_timeout: Duration,
    connection: ConnectionConfig,
    listener: ListenerOptions,
    event_capacity: usize,
    store: Option<Arc<dyn SessionStore>>,
    client_expiration: Duration,
    #[cfg(feature = "cluster")]
    cluster: Option<crate::cluster::Cluster>,
    guards: crate::guard::GuardConfig,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            apps: AppRegistry::new(),
            errors: Vec::new(),
            auth: None,
            handshake_timeout: Duration::from_secs(3),
            connection: ConnectionConfig::default(),
            listener: ListenerOptions::default(),
            event_capacity: 1024,
            store: None,
            client_expiration: Duration::from_secs(3600),
            #[cfg(feature = "cluster")]
            cluster: None,
            guards: crate::guard::GuardConfig::default(),
        }
    }
}

impl ServerBuilder {
    /// Offers an application (several versions of one name may be offered).
    pub fn application(mut self, app: Application) -> Self {
        if let Err(e) = self.apps.add(app) {
            self.errors.push(e);
        }
        self
    }

    /// Sets the policy for `login` and custom strategies. Without one, only anonymous
    /// handshakes succeed and the others get code 11, as upstream.
    pub fn auth_policy(mut self, policy: impl AuthPolicy) -> Self {
        self.auth = Some(Arc::new(policy));
        self
    }

    /// How long a new connection has to complete its handshake. Default 3 s (upstream's fixed
    /// value).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Pings every client this often after its handshake. Default off.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.connection.heartbeat_interval = Some(interval);
        self
    }

    /// Settings for each accepted connection (call timeout, queue sizes).
    pub fn connection_config(mut self, config: ConnectionConfig) -> Self {
        let heartbeat = self.connection.heartbeat_interval;
        self.connection = config;
        if self.connection.heartbeat_interval.is_none() {
            self.connection.heartbeat_interval = heartbeat;
        }
        self
    }

    /// Where sessions go when their clients disconnect. Default a [`MemoryStore`] (24 h
    /// inactive lifetime); a [`crate::store::RedbStore`] survives restarts, a
    /// [`crate::store::RedisStore`] is shared between server processes.
    pub fn session_store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// How long a disconnected client's connection waits in memory for the client to restore
    /// its session (pending requests and buffered messages included) before it closes and
    /// the session lives on only in the store. Default 1 h, as upstream.
    pub fn client_expiration_time(mut self, time: Duration) -> Self {
        self.client_expiration = time;
        self
    }

    #[cfg(feature = "cluster")]
    /// Joins a cluster of nodes: every broadcast also reaches the clients of the other nodes,
    /// and theirs reach this node's clients (see [`crate::cluster`]). Default: none, broadcasts
    /// stay on this node.
    pub fn cluster(mut self, cluster: crate::cluster::Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Ties login sessions to where they were created: a `session` handshake restoring a
    /// session that has a user name must come from the same source network (or it gets code
    /// 11, as an unknown session). Default [`SessionBinding::Off`], as `@metarhia/jstp`: the
    /// session id alone restores the session. See `docs/threat-model.md`.
    pub fn session_binding(mut self, binding: SessionBinding) -> Self {
        self.guards.binding = binding;
        self
    }

    /// Throttles failed `login` (and custom strategy) handshakes per source address (IPv6:
    /// per /64); an attempt past the throttle gets code 11 without its credentials being
    /// checked. Default [`Throttle::DEFAULT_PER_SOURCE`] (20 at once, then one per second);
    /// `None` turns it off.
    pub fn login_throttle_per_source(mut self, throttle: Option<Throttle>) -> Self {
        self.guards.per_source = throttle;
        self
    }

    /// Throttles failed `login` handshakes per user name, as
    /// [`ServerBuilder::login_throttle_per_source`]. Default [`Throttle::DEFAULT_PER_USER`]
    /// (10 at once, then one every 5 s); `None` turns it off.
    pub fn login_throttle_per_user(mut self, throttle: Option<Throttle>) -> Self {
        self.guards.per_user = throttle;
        self
    }

    /// Caps the sessions waiting in memory for their clients (detached): at most `count`
    /// sessions holding at most `bytes` of session state (the encoded session, its resend
    /// buffer included). Past either cap the oldest detached session's connection closes and
    /// the session lives on in the session store only (a restore then comes from the store).
    /// Defaults [`guard::DEFAULT_MAX_DETACHED`](crate::guard::DEFAULT_MAX_DETACHED) (1 024)
    /// and [`guard::DEFAULT_MAX_DETACHED_BYTES`](crate::guard::DEFAULT_MAX_DETACHED_BYTES)
    /// (64 MiB).
    pub fn detached_session_limits(mut self, count: usize, bytes: usize) -> Self {
        self.guards.max_detached = count;
        self.guards.max_detached_bytes = bytes;
        self
    }

    /// How long one session-store call may take. Past it a new session goes on in memory
    /// (the write is given up, logged at most every 5 s) and a restore that needs the store is
    /// refused with code 11 (as an unknown session), so a stalled store never holds a
    /// handshake. Default
    /// [`guard::DEFAULT_STORE_TIMEOUT`](crate::guard::DEFAULT_STORE_TIMEOUT) (1 s).
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.guards.store_timeout = timeout;
        self
    }

    /// Settings for listeners (TLS, message size limit).
    pub fn listener_options(mut self, options: ListenerOptions) -> Self {
        self.listener = options;
        self
    }

    /// Builds the server. Fails if an application was offered twice.
    pub fn build(mut self) -> Result<Server, Error> {
        if let Some(e) = self.errors.pop() {
            return Err(e);
        }
        let (events, _) = broadcast::channel(self.event_capacity.max(1));
        let (shutdown_tx, _) = watch::channel(false);
        Ok(with_cluster(Server {
            inner: Arc::new(Inner {
                #[cfg(feature = "cluster")]
                cluster: self.cluster,
                apps: RwLock::new(self.apps),
                auth: self.auth,
                handshake_timeout: self.handshake_timeout,
                connection: self.connection,
                listener: self.listener,
                clients: Mutex::new(HashMap::new()),
                all: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                discarded: Mutex::new(Tombstones::default()),
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                client_expiration: self.client_expiration,
                guard: crate::guard::Guard::new(self.guards),
                observers: RwLock::new(Vec::new()),
                events,
                shutdown: shutdown_tx,
            }),
        }))
    }
}

struct Inner {
    apps: RwLock<AppRegistry>,
    auth: Option<Arc<dyn AuthPolicy>>,
    handshake_timeout: Duration,
    connection: ConnectionConfig,
    listener: ListenerOptions,
    /// Handshaken connections.
    clients: Mutex<HashMap<u64, Connection>>,
    /// Every open connection, handshaken or not (for shutdown).
    all: Mutex<HashMap<u64, Connection>>,
    /// Connections by session id, attached or detached, until they close for good.
    sessions: Mutex<HashMap<String, Connection>>,
    /// Sessions given up here (their resend buffer overflowed): never restored, even from a
    /// store copy written before they ended.
    discarded: Mutex<Tombstones>,
    store: Arc<dyn SessionStore>,
    client_expiration: Duration,
    events: broadcast::Sender<ServerEvent>,
    shutdown: watch::Sender<bool>,
    /// The cluster this node joined: broadcasts are published there too.
    #[cfg(feature = "cluster")]
    cluster: Option<crate::cluster::Cluster>,
    /// Binding, throttles, detached-session caps, store deadlines.
    guard: crate::guard::Guard,
    /// Told of every broadcast this node delivers ([`Server::on_broadcast`]).
    observers: RwLock<Vec<BroadcastObserver>>,
}

/// A [`Server::on_broadcast`] callback.
type BroadcastObserver = Arc<dyn Fn(&str, &str, &Value) + Send + Sync>;

/// The most recently discarded session ids, at most [`Tombstones::MAX`] (the oldest go first;
/// by then any stale store copy has usually expired too).
#[derive(Default)]
struct Tombstones {
    ids: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Tombstones {
    const MAX: usize = 65_536;

    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > Self::MAX {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

impl Inner {
    fn emit(&self, ev: ServerEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(ev);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A JSTP server. Cloning gives another handle on the same server.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("clients", &lock(&self.inner.clients).len())
            .finish()
    }
}

struct Hooks(Arc<Inner>);

impl ServerHooks for Hooks {
    fn handshake(
        &self,
        conn: Connection,
        app: String,
        version: Option<String>,
        auth: Auth,
    ) -> BoxFuture<'static, Result<HandshakeDecision, RemoteError>> {
        let inner = self.0.clone();
        Box::pin(async move {
            inner.emit(ServerEvent::HandshakeRequest {
                connection: conn.clone(),
                app: app.clone(),
                strategy: auth.strategy().to_owned(),
            });
            let resolved = inner
                .apps
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .resolve(&app, version.as_deref());
            let Some(application) = resolved else {
                return Err(RemoteError::code(ErrorCode::AppNotFound));
            };
            let username = match auth {
                Auth::Anonymous => None,
                Auth::Session { id, received } => {
                    return restore_decision(&inner, &conn, id, received, application).await
                }
                Auth::Login { user, password } => {
                    let creds = Value::Array(vec![user.into(), password.into()]);
                    Some(authenticate(&inner, conn.clone(), &application, "login", creds).await?)
                }
                Auth::Custom {
                    strategy,
                    credentials,
                } => Some(
                    authenticate(&inner, conn.clone(), &application, &strategy, credentials)
                        .await?,
                ),
            };
            // 122 random bits from the OS generator (uuid's v4 reads getrandom): the id is the
            // session's bearer secret, see docs/threat-model.md.
            let session_id = uuid::Uuid::new_v4().to_string();
            if username.is_some() {
                if let Some(origin) = inner.guard.config.binding.origin(&conn) {
                    lock(&inner.guard.origins).insert(session_id.clone(), origin);
                }
            }
            Ok(HandshakeDecision::New(Accepted {
                app: application,
                username,
                session_id,
            }))
        })
    }

    fn on_ready(&self, conn: &Connection, restored: bool, session: String) {
        crate::metrics::handshake_ready(restored);
        lock(&self.0.clients).insert(conn.id(), conn.clone());
        lock(&self.0.guard.detached).remove(conn.id());
        if let Some(id) = conn.session_id() {
            lock(&self.0.sessions).insert(id.clone(), conn.clone());
            // Write-through, so the store knows the session even if this process dies. Off
            // the connection's task and under the store timeout: a store that is down leaves
            // the session in memory only.
            let inner = self.0.clone();
            tokio::spawn(async move {
                let text =
                    crate::guard::wrap_stored(inner.guard.origin_of(&id).as_deref(), session);
                let _ = inner
                    .guard
                    .store("session store write failed", inner.store.set(&id, text))
                    .await;
            });
        }
        if restored {
            self.0.emit(ServerEvent::Reconnect(conn.clone()));
            self.0.emit(ServerEvent::RestoreSession(conn.clone()));
        } else {
            self.0.emit(ServerEvent::Connect(conn.clone()));
        }
    }

    fn on_detach(&self, conn: &Connection, session: String) {
        if lock(&self.0.clients).remove(&conn.id()).is_some() {
            self.0.emit(ServerEvent::Disconnect(conn.clone()));
        }
        if let Some(id) = conn.session_id() {
            let guard = &self.0.guard;
            let evicted = lock(&guard.detached).insert(
                conn.id(),
                session.len(),
                guard.config.max_detached,
                guard.config.max_detached_bytes,
            );
            if !evicted.is_empty() {
                // Past the caps: the oldest detached connections close, and closing writes
                // their sessions to the store, where a restore still finds them.
                let all = lock(&self.0.all);
                let closing: Vec<Connection> =
                    evicted.iter().filter_map(|c| all.get(c).cloned()).collect();
                drop(all);
                let (count, bytes) = lock(&guard.detached).totals();
                guard.warnings.warn(
                    "detached sessions over their cap: the oldest live on in the store only",
                    &format_args!("{} closed, {count} detached, {bytes} bytes", closing.len()),
                );
                for c in closing {
                    tokio::spawn(async move { c.close().await });
                }
            }
            let inner = self.0.clone();
            tokio::spawn(async move {
                let text =
                    crate::guard::wrap_stored(inner.guard.origin_of(&id).as_deref(), session);
                let saved = async {
                    inner.store.set(&id, text).await?;
                    inner.store.set_inactive(&id).await
                };
                let _ = inner.guard.store("session store write failed", saved).await;
            });
        }
    }

    fn on_close(
        &self,
        conn: &Connection,
        was_ready: bool,
        session: SessionFate,
    ) -> BoxFuture<'static, ()> {
        let inner = self.0.clone();
        let conn = conn.clone();
        Box::pin(async move {
            crate::metrics::connection_closed(conn.transport_info().map(|i| i.kind), "jstp");
            lock(&inner.all).remove(&conn.id());
            lock(&inner.guard.detached).remove(conn.id());
            if was_ready && lock(&inner.clients).remove(&conn.id()).is_some() {
                inner.emit(ServerEvent::Disconnect(conn.clone()));
            }
            let Some(id) = conn.session_id() else {
                return;
            };
            match session {
                SessionFate::Keep(state) => {
                    // The store has the session before the live cache forgets it, so a client
                    // reconnecting right now finds it in one or the other (unless the store
                    // is down past its timeout: then the session ends here).
                    let text =
                        crate::guard::wrap_stored(inner.guard.origin_of(&id).as_deref(), state);
                    let saved = async {
                        inner.store.set(&id, text).await?;
                        inner.store.set_inactive(&id).await
                    };
                    let _ = inner.guard.store("session store write failed", saved).await;
                }
                SessionFate::Discard => {
                    lock(&inner.discarded).insert(id.clone());
                    let _ = inner
                        .guard
                        .store("session store delete failed", inner.store.remove(&id))
                        .await;
                }
                SessionFate::HandedOver => {}
            }
            let mut sessions = lock(&inner.sessions);
            if sessions.get(&id).is_some_and(|c| c.id() == conn.id()) {
                sessions.remove(&id);
                // The store copy carries the binding from here on.
                lock(&inner.guard.origins).remove(&id);
            }
        })
    }

    fn on_handshake_timeout(&self, conn: &Connection) {
        crate::metrics::handshake_timeout();
        self.0.emit(ServerEvent::HandshakeTimeout(conn.clone()));
    }

    fn on_error(&self, conn: &Connection, error: &str) {
        self.0.emit(ServerEvent::ConnectionError {
            connection: Some(conn.clone()),
            error: error.to_owned(),
        });
    }
}

/// A `session` handshake: the live connection that holds the session, or the session from the
/// store, or `[11]` as upstream when neither knows it (or, with a [`SessionBinding`], when the
/// client comes from elsewhere, or the store fails or times out).
async fn restore_decision(
    inner: &Inner,
    conn: &Connection,
    id: String,
    peer_received: u64,
    app: Arc<Application>,
) -> Result<HandshakeDecision, RemoteError> {
    let unknown = || RemoteError::code(ErrorCode::AuthFailed);
    let here = inner.guard.config.binding.origin(conn);
    // Refused like an unknown id, so a wrong place cannot learn that the id is live.
    let bound_elsewhere = |origin: Option<&str>| match (origin, here.as_deref()) {
        (Some(origin), Some(here)) => origin != here,
        _ => false,
    };
    let live = lock(&inner.sessions)
        .get(&id)
        .filter(|c| !c.is_closed())
        .cloned();
    if let Some(target) = live {
        if bound_elsewhere(inner.guard.origin_of(&id).as_deref()) {
            tracing::info!(session = ?target.session_tag(), "restore from another network refused");
            return Err(unknown());
        }
        return Ok(HandshakeDecision::Adopt {
            target,
            peer_received,
        });
    }
    if lock(&inner.discarded).contains(&id) {
        return Err(unknown());
    }
    let text = match inner
        .guard
        .store("session store read failed", inner.store.get(&id))
        .await
    {
        Ok(Some(text)) => text,
        Ok(None) => return Err(unknown()),
        // The store is down or slow: refused at once with upstream's code for a session it
        // cannot restore (11), rather than held until the handshake deadline.
        Err(_) => return Err(unknown()),
    };
    let (origin, text) = crate::guard::unwrap_stored(&text);
    if bound_elsewhere(origin) {
        tracing::info!("restore of a stored session from another network refused");
        return Err(unknown());
    }
    match Session::decode(text, inner.connection.session) {
        Ok(session)
            if session.role() == tether_wire::session::Role::Server
                && crate::guard::secrets_equal(session.id(), &id) =>
        {
            let Some(session) = past_what_the_peer_saw(session, peer_received) else {
                return Err(unknown());
            };
            if let Some(origin) = origin {
                lock(&inner.guard.origins).insert(id, origin.to_owned());
            }
            Ok(HandshakeDecision::Restore {
                session,
                app,
                peer_received,
            })
        }
        Ok(_) => Err(unknown()),
        Err(e) => {
            inner.guard.warnings.warn("stored session is invalid", &e);
            Err(unknown())
        }
    }
}

/// A stored session older than what its client saw (this process, or another sharing the
/// store, died after sending more than it last wrote: a `kill -9`): its message ids move past
/// the client's received count, so no id the client already saw is used again, and its buffer
/// goes, since the client confirmed everything up to that count. `None` when the count is
/// beyond any id a session can reach (2^53).
fn past_what_the_peer_saw(session: Session, peer_received: u64) -> Option<Session> {
    if peer_received <= session.latest_message_id().unsigned_abs() {
        return Some(session);
    }
    let config = session.config();
    let mut state = session.into_state();
    state.latest_message_id = state
        .role
        .delta()
        .checked_mul(i64::try_from(peer_received).ok()?)?;
    state.acknowledged_count = peer_received;
    state.buffer.clear();
    Session::from_state(state, config).ok()
}

async fn authenticate(
    inner: &Inner,
    connection: Connection,
    application: &Arc<Application>,
    strategy: &str,
    credentials: Value,
) -> Result<String, RemoteError> {
    let Some(policy) = &inner.auth else {
        return Err(RemoteError::code(ErrorCode::AuthFailed));
    };
    // An attempt is taken from the source's and the user's buckets before the policy runs, so
    // parallel guesses cannot outrun the throttle, and given back when it succeeds.
    let guard = &inner.guard;
    let source = crate::guard::source_key(&connection);
    let user_key = (strategy == "login")
        .then(|| credentials.as_array()?.first()?.as_str().map(str::to_owned))
        .flatten();
    if !guard.per_source.take(&source) {
        tracing::debug!(%source, "login throttled (source)");
        return Err(RemoteError::code(ErrorCode::AuthFailed));
    }
    if let Some(u) = &user_key {
        if !guard.per_user.take(u) {
            tracing::debug!(%source, "login throttled (user)");
            return Err(RemoteError::code(ErrorCode::AuthFailed));
        }
    }
    let user = policy
        .authenticate(AuthRequest {
            connection,
            application: application.clone(),
            strategy: strategy.to_owned(),
            credentials,
        })
        .await?;
    if user.is_empty() {
        return Err(RemoteError::code(ErrorCode::AuthFailed));
    }
    guard.per_source.give_back(&source);
    if let Some(u) = &user_key {
        guard.per_user.give_back(u);
    }
    Ok(user)
}

impl Server {
    /// Starts building a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Subscribes to server events from now on.
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.inner.events.subscribe()
    }

    /// Serves an already established transport (custom transports, tests).
    pub fn serve_transport(&self, transport: Transport) -> Connection {
        crate::metrics::connection_opened(transport.info.kind, "jstp");
        let conn = connection::start_server(
            transport,
            self.inner.connection.clone(),
            Arc::new(Hooks(self.inner.clone())),
            self.inner.handshake_timeout,
            self.inner.client_expiration,
        );
        lock(&self.inner.all).insert(conn.id(), conn.clone());
        if *self.inner.shutdown.borrow() {
            let c = conn.clone();
            tokio::spawn(async move { c.close().await });
        }
        conn
    }

    /// Binds a listener for `endpoint` (`jstp://`, `jstps://`, `ws://`, `wss://`, `unix:`) and
    /// serves it until [`Server::shutdown`]. Returns the bound address (useful with port 0).
    pub async fn listen(&self, endpoint: Endpoint) -> Result<String, Error> {
        let mut listener = Listener::bind(&endpoint, &self.inner.listener).await?;
        let addr = listener.local_addr();
        let server = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => break,
                    accepted = listener.accept() => match accepted {
                        Some(Ok(transport)) => {
                            server.serve_transport(transport);
                        }
                        Some(Err(e)) => server.inner.emit(ServerEvent::ConnectionError {
                            connection: None,
                            error: e.to_string(),
                        }),
                        None => break,
                    },
                }
            }
        });
        Ok(addr)
    }

    /// Handshaken connections.
    pub fn clients(&self) -> Vec<Connection> {
        lock(&self.inner.clients).values().cloned().collect()
    }

    /// Every session this server holds, attached or waiting for its client to restore.
    fn sessions(&self) -> Vec<Connection> {
        lock(&self.inner.sessions).values().cloned().collect()
    }

    /// Sends `iface.event(args)` to every client, connected or detached (a detached session
    /// keeps it for its restore), encoding it once; returns how many it was queued for here.
    /// Never waits and never skips a client silently: a client whose session cannot take the
    /// event is ended with [`Error::SlowConsumer`] (logged), see
    /// [`ConnectionConfig::session`](crate::ConnectionConfig::session). Events broadcast in
    /// turn reach each client in that order. In a [cluster](ServerBuilder::cluster) the event
    /// is also published for the other nodes' clients (the count is this node's only).
    pub fn broadcast(&self, iface: &str, event: &str, args: Vec<Value>) -> usize {
        self.queue_broadcast(iface, event, args).len()
    }

    /// [`Server::broadcast`] with backpressure: queues the event for every client at once (so
    /// order holds as for `broadcast`), then waits until each attached client holds less than
    /// a quarter of its resend bounds. A peer that stops reading is detached by its own
    /// connection (no pong within the call timeout), which ends the wait.
    ///
    /// The event is queued when this is called, not when the future is first polled.
    pub fn broadcast_async(
        &self,
        iface: &str,
        event: &str,
        args: Vec<Value>,
    ) -> impl Future<Output = usize> + Send + 'static {
        let queued = self.queue_broadcast(iface, event, args);
        wait_for_room(queued)
    }

    fn queue_broadcast(&self, iface: &str, event: &str, args: Vec<Value>) -> Vec<Connection> {
        let args = Value::Array(args);
        // Encoding checks the event can go on the wire; the text itself is for the cluster.
        #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
        let text = match tether_wire::stringify(&args) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(error = %e, iface, event, "broadcast refused");
                return Vec::new();
            }
        };
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.inner.cluster {
            cluster.publish(iface, event, text);
        }
        self.queue_local(iface, event, &args)
    }

    /// Calls `f(iface, event, args)` (`args` the array) for every broadcast this node
    /// delivers to its clients — its own and, in a [cluster](ServerBuilder::cluster), those
    /// of the other nodes — just before they are queued, in delivery order. For bridges to
    /// clients of other protocols (the example's conductor signals); keep it quick, it runs on
    /// the broadcasting task.
    pub fn on_broadcast(&self, f: impl Fn(&str, &str, &Value) + Send + Sync + 'static) {
        self.inner
            .observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    /// Queues an event for this node's clients only (`args` a JSTP array known to encode).
    fn queue_local(&self, iface: &str, event: &str, args: &Value) -> Vec<Connection> {
        let observers = self
            .inner
            .observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for f in observers {
            f(iface, event, args);
        }
        let prepared = PreparedEvent::new(iface, event, args);
        self.sessions()
            .into_iter()
            .filter(|c| match c.emit_prepared(prepared.clone()) {
                Ok(()) => true,
                Err(Error::Closed) => false,
                Err(e) => {
                    tracing::warn!(conn = c.id(), error = %e, iface, event, "broadcast not queued");
                    false
                }
            })
            .collect()
    }

    /// Replaces the applications offered to new handshakes.
    pub fn update_applications(&self, apps: Vec<Application>) -> Result<(), Error> {
        let mut registry = AppRegistry::new();
        for app in apps {
            registry.add(app)?;
        }
        *self.inner.apps.write().unwrap_or_else(|e| e.into_inner()) = registry;
        Ok(())
    }

    /// Stops accepting, closes every connection and waits until they are closed.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        let all: Vec<Connection> = lock(&self.inner.all).values().cloned().collect();
        futures::future::join_all(all.iter().map(Connection::close)).await;
    }
}

/// Waits until each of `queued` has room again; returns how many there were.
async fn wait_for_room(queued: Vec<Connection>) -> usize {
    for c in &queued {
        c.wait_for_room().await;
    }
    queued.len()
}

/// Points the server's cluster, if it joined one, at its clients: events from other nodes go
/// to them as a local `broadcast_async` would (queued at once, then waiting for room, so a
/// slow node reads the stream more slowly rather than buffering). The server is held weakly:
/// the cluster's tasks end with the server.
fn with_cluster(server: Server) -> Server {
    #[cfg(feature = "cluster")]
    if let Some(cluster) = &server.inner.cluster {
        let weak = Arc::downgrade(&server.inner);
        cluster.attach(Arc::new(move |iface: &str, event: &str, args: Value| {
            let queued = match weak.upgrade() {
                Some(inner) => Server { inner }.queue_local(iface, event, &args),
                None => Vec::new(),
            };
            Box::pin(wait_for_room(queued))
        }));
    }
    server
}
