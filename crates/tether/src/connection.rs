//! One JSTP connection: a driver task that owns the transport, and cheap cloneable
//! [`Connection`] handles that talk to it over a bounded channel.
//!
//! The driver assigns message ids (client +1 from 1, server −1 from −1, handshake 0), keeps the
//! table of pending requests with their deadlines, answers the peer's calls, inspects and pings,
//! and ends every pending request exactly once: answered, failed when the connection closes, or
//! timed out with [`Error::Timeout`] (which never goes on the wire).

use crate::app::Application;
use crate::error::{Error, RemoteError};
use crate::reconnect::Reconnector;
use crate::transport::{
    self, ClientTransportConfig, Endpoint, MessageSink, MessageStream, Transport, TransportError,
    TransportInfo,
};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_wire::session::Role as SessionRole;
use tether_wire::{
    Auth, CallbackResult, ErrorCode, HandshakeResult, Message, RemoteErrorArray, Session,
    SessionConfig, Value,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::time::{delay_queue, DelayQueue};

/// Which end of the protocol a connection plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sent the handshake; ids count up from 1.
    Client,
    /// Answered the handshake; ids count down from −1.
    Server,
}

/// Per-connection settings. Defaults follow upstream where it has one.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// Deadline of a call, inspect or ping when none is given per request. Default 15 s.
    pub call_timeout: Duration,
    /// Capacity of the command channel from handles to the driver. Default 1024.
    pub command_capacity: usize,
    /// Capacity of the connection-event broadcast; slow subscribers see `Lagged`. Default 1024.
    pub event_capacity: usize,
    /// Most requests awaiting an answer at once; more fail with [`Error::QueueFull`].
    /// Default 65 536.
    pub max_pending: usize,
    /// Ping the peer this often once the handshake is done. Default off, as upstream.
    pub heartbeat_interval: Option<Duration>,
    /// Bounds of the session's resend buffer (sent requests and events not yet confirmed by
    /// the peer). Defaults: 16 384 messages, 64 MiB; past them requests fail with
    /// [`Error::Session`].
    pub session: SessionConfig,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            call_timeout: Duration::from_secs(15),
            command_capacity: 1024,
            event_capacity: 1024,
            max_pending: 65_536,
            heartbeat_interval: None,
            session: SessionConfig::default(),
        }
    }
}

/// What happens on a connection, as the seed's event list names it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionEvent {
    /// Server side: a session was created (or restored) for this connection.
    Client {
        /// The session id.
        session_id: String,
    },
    /// Client side: a reconnection attempt finished (`error` is `None` on success).
    Reconnect {
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// Client side: a reconnection is being attempted.
    ReconnectAttempt {
        /// The transport URL tried.
        transport: String,
    },
    /// The peer called one of our methods.
    Call {
        /// Interface.
        iface: String,
        /// Method.
        method: String,
        /// Arguments.
        args: Vec<Value>,
    },
    /// A callback (answer to one of our requests) arrived.
    Callback {
        /// The request id.
        id: i64,
        /// The error, if the answer was an error.
        error: Option<RemoteError>,
    },
    /// The peer sent an event.
    Event {
        /// Interface.
        iface: String,
        /// Event name.
        event: String,
        /// Arguments.
        args: Vec<Value>,
    },
    /// Client side: the handshake response arrived.
    Handshake {
        /// The error, if the handshake failed.
        error: Option<RemoteError>,
        /// The session id (new session) or the peer's received count (restore), as text.
        ok: Option<String>,
    },
    /// A legacy `{}` heartbeat arrived.
    Heartbeat,
    /// The peer inspected one of our interfaces.
    Inspect {
        /// Interface.
        iface: String,
    },
    /// The peer pinged us (we answered with a pong).
    Ping {
        /// The ping id.
        id: i64,
    },
    /// A pong answered one of our pings.
    Pong {
        /// The ping id.
        id: i64,
    },
    /// A message was rejected.
    MessageRejected {
        /// The message text (truncated to 1 KiB).
        message: String,
        /// Why.
        reason: String,
    },
    /// The connection closed.
    Close,
    /// A transport or protocol error.
    Error {
        /// What went wrong.
        error: String,
    },
}

/// Snapshot of a connection's identity.
#[derive(Debug, Clone, Default)]
struct Identity {
    handshake_done: bool,
    username: Option<String>,
    session_id: Option<String>,
    app: Option<Arc<Application>>,
    remote_app: Option<String>,
    info: Option<TransportInfo>,
    closed: bool,
    /// The heartbeat interval in force (restarted after a restore).
    heartbeat: Option<Duration>,
}

pub(crate) struct Shared {
    id: u64,
    role: Role,
    config: ConnectionConfig,
    cmd_tx: mpsc::Sender<Command>,
    events: broadcast::Sender<ConnectionEvent>,
    closed_rx: watch::Receiver<bool>,
    identity: Mutex<Identity>,
    remote_proxies: Mutex<HashMap<String, Vec<String>>>,
}

/// A handle on a JSTP connection. Cloning is cheap; every clone talks to the same driver task.
///
/// ```no_run
/// # async fn demo() -> Result<(), tether::Error> {
/// use tether::{connect, ClientOptions, Value};
///
/// let conn = connect("jstp://127.0.0.1:3000", "testApp", ClientOptions::default()).await?;
/// let result = conn.call("calculator", "answer", vec![]).await?;
/// assert_eq!(result, vec![Value::from(42)]);
/// conn.emit("chat", "typing", vec![Value::from(true)]).await?;
/// conn.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.shared.id)
            .field("role", &self.shared.role)
            .finish()
    }
}

type Reply = oneshot::Sender<Result<Vec<Value>, Error>>;

enum RequestKind {
    Call {
        iface: String,
        method: String,
        args: Vec<Value>,
    },
    Inspect {
        iface: String,
    },
    Ping,
}

enum Command {
    Request {
        kind: RequestKind,
        timeout: Duration,
        reply: Reply,
    },
    Emit {
        iface: String,
        event: String,
        args: Vec<Value>,
    },
    Reply {
        id: i64,
        result: Result<Value, RemoteError>,
    },
    Heartbeat(Option<Duration>),
    Flush(oneshot::Sender<usize>),
    /// Server: a new transport restores this connection's session.
    Adopt {
        transport: Transport,
        peer_received: u64,
    },
    Close,
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Client or server.
    pub fn role(&self) -> Role {
        self.shared.role
    }

    fn identity(&self) -> std::sync::MutexGuard<'_, Identity> {
        self.shared
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The peer's address (`ip:port`, or a socket path).
    pub fn remote_addr(&self) -> Option<String> {
        self.identity()
            .info
            .as_ref()
            .and_then(|i| i.remote_addr.clone())
    }

    /// Our address.
    pub fn local_addr(&self) -> Option<String> {
        self.identity()
            .info
            .as_ref()
            .and_then(|i| i.local_addr.clone())
    }

    /// The transport in use.
    pub fn transport_info(&self) -> Option<TransportInfo> {
        self.identity().info.clone()
    }

    /// Whether the handshake has succeeded.
    pub fn handshake_done(&self) -> bool {
        self.identity().handshake_done
    }

    /// The authenticated user name; `None` for anonymous sessions.
    pub fn username(&self) -> Option<String> {
        self.identity().username.clone()
    }

    /// The session id the server assigned.
    pub fn session_id(&self) -> Option<String> {
        self.identity().session_id.clone()
    }

    /// The local application: on a server, the one the client's handshake resolved to; on a
    /// client, the API it offers to the server.
    pub fn application(&self) -> Option<Arc<Application>> {
        self.identity().app.clone()
    }

    /// On a client: the application name (and range) it connected to.
    pub fn remote_application(&self) -> Option<String> {
        self.identity().remote_app.clone()
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        *self.shared.closed_rx.borrow()
    }

    /// Waits until the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed_rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Subscribes to this connection's events from now on.
    pub fn events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.shared.events.subscribe()
    }

    /// Interfaces inspected so far, with their method names.
    pub fn remote_proxies(&self) -> HashMap<String, Vec<String>> {
        self.shared
            .remote_proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn send_cmd(&self, cmd: Command) -> Result<(), Error> {
        self.shared
            .cmd_tx
            .send(cmd)
            .await
            .map_err(|_| Error::Closed)
    }

    async fn request(&self, kind: RequestKind, timeout: Duration) -> Result<Vec<Value>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send_cmd(Command::Request {
            kind,
            timeout,
            reply,
        })
        .await?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Calls `iface.method(args)` on the peer with the connection's default deadline and
    /// returns the callback's results.
    pub async fn call(
        &self,
        iface: &str,
        method: &str,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, Error> {
        self.call_timeout(iface, method, args, self.shared.config.call_timeout)
            .await
    }

    /// Like [`Connection::call`] with this call's own deadline.
    pub async fn call_timeout(
        &self,
        iface: &str,
        method: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Vec<Value>, Error> {
        check_finite(&args)?;
        self.request(
            RequestKind::Call {
                iface: iface.to_owned(),
                method: method.to_owned(),
                args,
            },
            timeout,
        )
        .await
    }

    /// Calls, and calls again (with a new id) whenever the call fails with
    /// [`Error::CallbackLost`]: at-least-once execution, for idempotent methods.
    pub async fn call_with_resend(
        &self,
        iface: &str,
        method: &str,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, Error> {
        loop {
            match self.call(iface, method, args.clone()).await {
                Err(Error::CallbackLost) => continue,
                other => return other,
            }
        }
    }

    /// Sends the event `iface.event(args)` to the peer. Returns once it is queued.
    pub async fn emit(&self, iface: &str, event: &str, args: Vec<Value>) -> Result<(), Error> {
        check_finite(&args)?;
        self.send_cmd(Command::Emit {
            iface: iface.to_owned(),
            event: event.to_owned(),
            args,
        })
        .await
    }

    /// Like [`Connection::emit`] without waiting for room in the queue: fails with
    /// [`Error::QueueFull`] instead.
    pub fn try_emit(&self, iface: &str, event: &str, args: Vec<Value>) -> Result<(), Error> {
        check_finite(&args)?;
        self.shared
            .cmd_tx
            .try_send(Command::Emit {
                iface: iface.to_owned(),
                event: event.to_owned(),
                args,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::QueueFull,
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            })
    }

    /// Asks the peer for the method names of `iface` and returns a proxy for it.
    pub async fn inspect(&self, iface: &str) -> Result<RemoteProxy, Error> {
        let names = self
            .request(
                RequestKind::Inspect {
                    iface: iface.to_owned(),
                },
                self.shared.config.call_timeout,
            )
            .await?;
        let methods: Vec<String> = names
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        self.shared
            .remote_proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iface.to_owned(), methods.clone());
        Ok(RemoteProxy {
            conn: self.clone(),
            iface: iface.to_owned(),
            methods,
        })
    }

    /// Pings the peer and returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.request(RequestKind::Ping, self.shared.config.call_timeout)
            .await?;
        Ok(start.elapsed())
    }

    /// Starts pinging the peer every `interval` (replacing a running heartbeat).
    pub async fn start_heartbeat(&self, interval: Duration) -> Result<(), Error> {
        if interval.is_zero() {
            return Err(Error::InvalidArgument(
                "heartbeat interval must be > 0".into(),
            ));
        }
        self.send_cmd(Command::Heartbeat(Some(interval))).await
    }

    /// Stops the heartbeat.
    pub async fn stop_heartbeat(&self) -> Result<(), Error> {
        self.send_cmd(Command::Heartbeat(None)).await
    }

    /// Fails every pending request with [`Error::Flushed`] and returns how many there were.
    pub async fn flush(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.send_cmd(Command::Flush(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Closes the connection (FIN or WebSocket close) and waits until it is closed. Pending
    /// requests fail with [`Error::Closed`]. Closing twice is harmless.
    pub async fn close(&self) {
        let _ = self.send_cmd(Command::Close).await;
        self.closed().await;
    }
}

/// Refuses NaN and ±Infinity, which a Node peer cannot parse.
fn check_finite(values: &[Value]) -> Result<(), Error> {
    fn walk(v: &Value) -> Result<(), Error> {
        match v {
            Value::Number(n) if !n.is_finite() => {
                Err(tether_wire::SerializeError::NonFinite(*n).into())
            }
            Value::Array(a) => a.iter().try_for_each(walk),
            Value::Object(o) => o.iter().try_for_each(|(_, v)| walk(v)),
            _ => Ok(()),
        }
    }
    values.iter().try_for_each(walk)
}

/// A remote interface learned through `inspect`: its method names and shortcuts to call them.
#[derive(Debug, Clone)]
pub struct RemoteProxy {
    conn: Connection,
    iface: String,
    methods: Vec<String>,
}

impl RemoteProxy {
    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// The method names the peer reported.
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// The connection behind the proxy.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Calls a method of the interface. Names the peer did not report fail locally with
    /// code 14 (method not found), without a round trip.
    pub async fn call(&self, method: &str, args: Vec<Value>) -> Result<Vec<Value>, Error> {
        if !self.methods.iter().any(|m| m == method) {
            return Err(Error::Remote(RemoteError::code(ErrorCode::MethodNotFound)));
        }
        self.conn.call(&self.iface, method, args).await
    }

    /// Like [`RemoteProxy::call`], resending on [`Error::CallbackLost`].
    pub async fn call_with_resend(
        &self,
        method: &str,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, Error> {
        self.conn.call_with_resend(&self.iface, method, args).await
    }

    /// Sends an event on this interface.
    pub async fn emit(&self, event: &str, args: Vec<Value>) -> Result<(), Error> {
        self.conn.emit(&self.iface, event, args).await
    }

    /// Waits for the next event the peer sends on this interface: `(event, args)`, or `None`
    /// once the connection is closed.
    pub async fn next_event(
        &self,
        rx: &mut broadcast::Receiver<ConnectionEvent>,
    ) -> Option<(String, Vec<Value>)> {
        loop {
            match rx.recv().await {
                Ok(ConnectionEvent::Event { iface, event, args }) if iface == self.iface => {
                    return Some((event, args))
                }
                Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                    return None
                }
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Starting connections

/// A new session the server accepted.
pub(crate) struct Accepted {
    pub app: Arc<Application>,
    pub username: Option<String>,
    pub session_id: String,
}

/// What a server decides about a handshake request.
pub(crate) enum HandshakeDecision {
    /// A new session.
    New(Accepted),
    /// A live (or detached) connection holds the session: give it this transport.
    Adopt {
        target: Connection,
        peer_received: u64,
    },
    /// The session came from the store: continue it on this connection.
    Restore {
        session: Session,
        app: Arc<Application>,
        peer_received: u64,
    },
}

/// The server's side of a connection's life: handshake decisions and bookkeeping.
pub(crate) trait ServerHooks: Send + Sync + 'static {
    /// Decides a handshake request; an error is sent as `{handshake:[0],error:…}` and closes.
    fn handshake(
        &self,
        conn: Connection,
        app: String,
        version: Option<String>,
        auth: Auth,
    ) -> BoxFuture<'static, Result<HandshakeDecision, RemoteError>>;
    /// The handshake response has gone out (`restored`: the session was restored, not new).
    /// `session` is the session's encoded state, for a write-through to the store.
    fn on_ready(&self, conn: &Connection, restored: bool, session: String);
    /// The transport dropped but the session is kept for a restore; `session` is its state.
    fn on_detach(&self, conn: &Connection, session: String);
    /// The connection closed for good (after `on_ready` or not); `session` is the final state
    /// of its session, if it had one. The driver awaits this before reporting closed.
    fn on_close(
        &self,
        conn: &Connection,
        was_ready: bool,
        session: Option<String>,
    ) -> BoxFuture<'static, ()>;
    /// No successful handshake within the deadline.
    fn on_handshake_timeout(&self, conn: &Connection);
    /// A transport or protocol error on the connection.
    fn on_error(&self, conn: &Connection, error: &str);
}

/// Client handshake parameters.
#[derive(Clone)]
pub(crate) struct ClientHandshake {
    pub app: String,
    pub version: Option<String>,
    pub auth: Auth,
    pub local_app: Arc<Application>,
}

/// How a client reconnects after its transport drops.
pub(crate) struct ClientReconnect {
    pub endpoint: Endpoint,
    pub transport: ClientTransportConfig,
    pub reconnector: Arc<dyn Reconnector>,
    pub fallback_to_new_session: bool,
    pub handshake_timeout: Duration,
}

fn new_shared(role: Role, config: ConnectionConfig, info: TransportInfo) -> (Connection, Channels) {
    let (cmd_tx, cmd_rx) = mpsc::channel(config.command_capacity.max(1));
    let (events, _) = broadcast::channel(config.event_capacity.max(1));
    let (closed_tx, closed_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        role,
        config,
        cmd_tx,
        events,
        closed_rx,
        identity: Mutex::new(Identity {
            info: Some(info),
            ..Identity::default()
        }),
        remote_proxies: Mutex::new(HashMap::new()),
    });
    (Connection { shared }, Channels { cmd_rx, closed_tx })
}

struct Channels {
    cmd_rx: mpsc::Receiver<Command>,
    closed_tx: watch::Sender<bool>,
}

/// Starts the server side of an accepted transport. The returned connection is not yet
/// handshaken; the driver enforces `handshake_timeout`. After a handshake, a dropped transport
/// detaches the session for `client_expiration` before the connection closes for good.
pub(crate) fn start_server(
    transport: Transport,
    config: ConnectionConfig,
    hooks: Arc<dyn ServerHooks>,
    handshake_timeout: Duration,
    client_expiration: Duration,
) -> Connection {
    let (conn, ch) = new_shared(Role::Server, config, transport.info.clone());
    let mut driver = Driver::new(conn.clone(), transport, ch, Some(hooks), Role::Server);
    driver.client_expiration = client_expiration;
    tokio::spawn(driver.run(Instant::now() + handshake_timeout, None));
    conn
}

/// Starts the client side and performs the handshake.
pub(crate) async fn start_client(
    transport: Transport,
    config: ConnectionConfig,
    handshake: ClientHandshake,
    handshake_timeout: Duration,
    reconnect: Option<ClientReconnect>,
) -> Result<Connection, Error> {
    let (conn, ch) = new_shared(Role::Client, config, transport.info.clone());
    {
        let mut id = conn.identity();
        id.app = Some(handshake.local_app.clone());
        // The server never echoes the user name; a client knows it only from its own login.
        if let Auth::Login { user, .. } = &handshake.auth {
            id.username = Some(user.clone());
        }
        id.remote_app = Some(match &handshake.version {
            Some(v) => format!("{}@{}", handshake.app, v),
            None => handshake.app.clone(),
        });
    }
    let mut driver = Driver::new(conn.clone(), transport, ch, None, Role::Client);
    driver.reconnect = reconnect;
    driver.client_handshake = Some(handshake);
    let (tx, rx) = oneshot::channel();
    tokio::spawn(driver.run(Instant::now() + handshake_timeout, Some(tx)));
    rx.await.unwrap_or(Err(Error::NoHandshakeResponse))?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// The driver

enum PendingKind {
    Request(Reply),
    /// A heartbeat ping nobody awaits.
    Heartbeat,
}

struct Pending {
    kind: PendingKind,
    key: delay_queue::Key,
    timeout: Duration,
}

type HandshakeReply = oneshot::Sender<Result<(), Error>>;

/// The transport a driver currently uses.
struct Link {
    incoming: MessageStream,
    sink: MessageSink,
    /// Written since the last flush.
    dirty: bool,
}

impl Link {
    fn new(transport: Transport) -> Self {
        Link {
            incoming: transport.incoming,
            sink: transport.outgoing,
            dirty: false,
        }
    }
}

/// Where a connection is in its life.
enum Phase {
    /// Waiting for the first handshake (request on a server, response on a client).
    Handshake,
    /// Handshaken, with a transport.
    Open,
    /// Client: transport lost; the next attempt starts at the timer.
    Waiting { endpoint: Endpoint },
    /// Client: a transport is being connected.
    Connecting,
    /// Client: the restore (`fresh`: a new-session) handshake went out on a new transport.
    Restoring { fresh: bool },
    /// Server: transport lost; the session waits for its client until the timer.
    Detached,
}

struct Driver {
    conn: Connection,
    role: Role,
    link: Option<Link>,
    cmd_rx: mpsc::Receiver<Command>,
    closed_tx: watch::Sender<bool>,
    hooks: Option<Arc<dyn ServerHooks>>,
    app: Option<Arc<Application>>,
    pending: HashMap<i64, Pending>,
    deadlines: DelayQueue<i64>,
    /// The session, from the handshake on.
    session: Option<Session>,
    phase: Phase,
    /// The phase's deadline: handshake timeout, next reconnect attempt, restore timeout, or
    /// the end of a detached session's wait.
    timer: Option<tokio::time::Instant>,
    handshake_done: bool,
    ready_notified: bool,
    heartbeat: Option<tokio::time::Interval>,
    /// Client: how to reconnect (`None`: never).
    reconnect: Option<ClientReconnect>,
    client_handshake: Option<ClientHandshake>,
    connecting: Option<BoxFuture<'static, Result<Transport, Error>>>,
    /// Failed reconnect attempts in a row.
    failures: u32,
    /// Client: the server refused our session; the next transport starts a new one.
    new_session_next: bool,
    /// Many messages await confirmation: ping for one after this step.
    ack_wanted: bool,
    /// Server: how long a detached session waits for its client.
    client_expiration: Duration,
}

/// Why the driver (or its current transport) stops.
enum Stop {
    /// Local close or a protocol-mandated close: flush, then FIN/close frame.
    Graceful,
    /// The connection ends for good (a protocol violation, or a transport loss that cannot be
    /// recovered).
    Gone(Option<String>),
    /// The transport failed or ended; the session may survive it.
    LinkLost(Option<String>),
    /// Server: this transport now serves another connection that restored its session.
    HandedOver,
}

const REJECT_PREVIEW: usize = 1024;
/// Ask the peer for a confirmation (a ping) after this many unconfirmed messages.
const ACK_EVERY: usize = 512;

async fn next_incoming(link: &mut Option<Link>) -> Option<Result<String, TransportError>> {
    match link {
        Some(l) => l.incoming.next().await,
        None => std::future::pending().await,
    }
}

async fn tick(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn until(timer: Option<tokio::time::Instant>) {
    match timer {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn connected(
    connecting: &mut Option<BoxFuture<'static, Result<Transport, Error>>>,
) -> Result<Transport, Error> {
    match connecting {
        Some(f) => {
            let r = f.await;
            *connecting = None;
            r
        }
        None => std::future::pending().await,
    }
}

fn heartbeat_interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

impl Driver {
    fn new(
        conn: Connection,
        transport: Transport,
        ch: Channels,
        hooks: Option<Arc<dyn ServerHooks>>,
        role: Role,
    ) -> Self {
        let app = conn.identity().app.clone();
        Driver {
            role,
            link: Some(Link::new(transport)),
            cmd_rx: ch.cmd_rx,
            closed_tx: ch.closed_tx,
            hooks,
            app,
            pending: HashMap::new(),
            deadlines: DelayQueue::new(),
            session: None,
            phase: Phase::Handshake,
            timer: None,
            handshake_done: false,
            ready_notified: false,
            heartbeat: None,
            reconnect: None,
            client_handshake: None,
            connecting: None,
            failures: 0,
            new_session_next: false,
            ack_wanted: false,
            client_expiration: Duration::from_secs(3600),
            conn,
        }
    }

    fn emit_event(&self, ev: ConnectionEvent) {
        if self.conn.shared.events.receiver_count() > 0 {
            let _ = self.conn.shared.events.send(ev);
        }
    }

    /// Whether messages may be written now: a transport, and no restore in progress.
    fn can_write(&self) -> bool {
        self.link.is_some() && matches!(self.phase, Phase::Open | Phase::Handshake)
    }

    async fn write(&mut self, msg: &Message) -> Result<(), Stop> {
        let text = msg.encode();
        self.write_text(text).await
    }

    /// Writes on the current transport regardless of phase (handshakes, resends).
    async fn write_text(&mut self, text: String) -> Result<(), Stop> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        link.dirty = true;
        link.sink
            .feed(text)
            .await
            .map_err(|e| Stop::LinkLost(Some(e.to_string())))
    }

    async fn flush_out(&mut self) -> Result<(), Stop> {
        if let Some(link) = self.link.as_mut() {
            if link.dirty {
                link.dirty = false;
                link.sink
                    .flush()
                    .await
                    .map_err(|e| Stop::LinkLost(Some(e.to_string())))?;
            }
        }
        Ok(())
    }

    /// Records a buffered kind in the session and writes it if the transport is usable.
    /// Fails (writing nothing) when the session buffer is full.
    async fn send_buffered(&mut self, msg: &Message) -> Result<Result<(), Error>, Stop> {
        let text = match self.session.as_mut() {
            Some(session) => match session.on_send_message(msg) {
                Ok(text) => text,
                Err(e) => return Ok(Err(Error::Session(e))),
            },
            None => msg.encode(),
        };
        if self.can_write() {
            self.write_text(text).await?;
        }
        // Events are confirmed only by a later callback or pong: every ACK_EVERY unconfirmed
        // messages, ask for one with a ping so a peer that only receives events never lets
        // our buffer fill up.
        if let Some(s) = &self.session {
            let n = s.buffered_len();
            if n >= ACK_EVERY && n % ACK_EVERY == 0 && !matches!(msg, Message::Ping { .. }) {
                self.ack_wanted = true;
            }
        }
        Ok(Ok(()))
    }

    fn next_id(&self) -> i64 {
        match &self.session {
            Some(s) => s.next_message_id(),
            None => 0,
        }
    }

    async fn run(mut self, handshake_deadline: Instant, handshake_reply: Option<HandshakeReply>) {
        let mut handshake_reply = handshake_reply;
        self.timer = Some(tokio::time::Instant::from_std(handshake_deadline));
        let stop = 'outer: {
            if let Some(hs) = self.client_handshake.clone() {
                let msg = Message::HandshakeRequest {
                    id: 0,
                    app: hs.app,
                    version: hs.version,
                    auth: hs.auth,
                };
                let sent = match self.write(&msg).await {
                    Ok(()) => self.flush_out().await,
                    Err(e) => Err(e),
                };
                if let Err(stop) = sent {
                    break 'outer stop;
                }
            }
            match self.main_loop(&mut handshake_reply).await {
                Ok(()) => Stop::Graceful,
                Err(stop) => stop,
            }
        };
        self.shutdown(stop, handshake_reply).await;
    }

    async fn main_loop(
        &mut self,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        loop {
            let step: Result<(), Stop> = tokio::select! {
                biased;
                incoming = next_incoming(&mut self.link) => match incoming {
                    Some(Ok(text)) => self.on_text(text, handshake_reply).await,
                    Some(Err(e)) => Err(Stop::LinkLost(Some(e.to_string()))),
                    None => Err(Stop::LinkLost(None)),
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Close) | None => return Ok(()),
                    Some(cmd) => {
                        let mut r = self.on_command(cmd).await;
                        // Batch whatever else is queued before one flush.
                        for _ in 0..64 {
                            if r.is_err() {
                                break;
                            }
                            match self.cmd_rx.try_recv() {
                                Ok(Command::Close) => return Ok(()),
                                Ok(cmd) => r = self.on_command(cmd).await,
                                Err(_) => break,
                            }
                        }
                        r
                    }
                },
                Some(expired) = self.deadlines.next(), if !self.deadlines.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(p) = self.pending.remove(&id) {
                        if let PendingKind::Request(reply) = p.kind {
                            let _ = reply.send(Err(Error::Timeout(p.timeout)));
                        }
                    }
                    Ok(())
                },
                _ = tick(&mut self.heartbeat) => self.send_heartbeat_ping().await,
                _ = until(self.timer) => self.on_timer(handshake_reply).await,
                transport = connected(&mut self.connecting) => self.on_connected(transport).await,
            };
            let step = match step {
                Ok(()) if std::mem::take(&mut self.ack_wanted) => {
                    match self.send_heartbeat_ping().await {
                        Ok(()) => self.flush_out().await,
                        Err(e) => Err(e),
                    }
                }
                Ok(()) => self.flush_out().await,
                Err(e) => Err(e),
            };
            match step {
                Ok(()) => {}
                Err(Stop::LinkLost(reason)) => self.on_link_lost(reason, handshake_reply)?,
                Err(stop) => return Err(stop),
            }
        }
    }

    async fn on_timer(&mut self, handshake_reply: &mut Option<HandshakeReply>) -> Result<(), Stop> {
        self.timer = None;
        match std::mem::replace(&mut self.phase, Phase::Open) {
            Phase::Handshake => {
                self.phase = Phase::Handshake;
                if let Some(h) = &self.hooks {
                    h.on_handshake_timeout(&self.conn);
                }
                if let Some(reply) = handshake_reply.take() {
                    let _ = reply.send(Err(Error::Timeout(Duration::ZERO)));
                }
                Err(Stop::Gone(Some("handshake timeout".into())))
            }
            Phase::Waiting { endpoint } => self.start_attempt(endpoint),
            Phase::Restoring { .. } => {
                self.phase = Phase::Restoring { fresh: false };
                Err(Stop::LinkLost(Some(
                    "no answer to the restore handshake".into(),
                )))
            }
            Phase::Detached => {
                self.phase = Phase::Detached;
                Err(Stop::Gone(Some("session expired".into())))
            }
            other => {
                self.phase = other;
                Ok(())
            }
        }
    }

    /// The current transport is gone. A handshaken session survives it: a client schedules a
    /// reconnect, a server waits for its client; anything else ends the connection.
    fn on_link_lost(
        &mut self,
        reason: Option<String>,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        if let Some(link) = self.link.take() {
            // Close our half in the background; the transport is dead or dying anyway.
            let mut sink = link.sink;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
            });
        }
        self.heartbeat = None;
        if !self.handshake_done || self.session.is_none() {
            if let Some(reply) = handshake_reply.take() {
                let _ = reply.send(Err(Error::NoHandshakeResponse));
            }
            return Err(Stop::Gone(reason));
        }
        if let Some(reason) = &reason {
            tracing::debug!(conn = self.conn.id(), %reason, "transport lost");
        }
        match self.role {
            Role::Client => {
                if matches!(self.phase, Phase::Restoring { .. })
                    || matches!(self.phase, Phase::Connecting)
                {
                    self.failures = self.failures.saturating_add(1);
                    self.emit_event(ConnectionEvent::Reconnect {
                        error: Some(reason.clone().unwrap_or_else(|| "transport closed".into())),
                    });
                }
                let Some(rc) = &self.reconnect else {
                    return Err(Stop::Gone(reason));
                };
                let Some(attempt) = rc.reconnector.next_attempt(self.failures, &rc.endpoint) else {
                    return Err(Stop::Gone(reason));
                };
                self.connecting = None;
                if attempt.delay.is_zero() {
                    // No timer: its millisecond granularity would dominate a fast restore.
                    self.timer = None;
                    return self.start_attempt(attempt.endpoint);
                }
                self.phase = Phase::Waiting {
                    endpoint: attempt.endpoint,
                };
                self.timer = Some(tokio::time::Instant::now() + attempt.delay);
                Ok(())
            }
            Role::Server => {
                if let (Some(h), Some(reason)) = (&self.hooks, &reason) {
                    h.on_error(&self.conn, reason);
                }
                self.phase = Phase::Detached;
                self.timer = Some(tokio::time::Instant::now() + self.client_expiration);
                if let (Some(h), Some(s)) = (&self.hooks, &self.session) {
                    h.on_detach(&self.conn, s.encode());
                }
                Ok(())
            }
        }
    }

    /// Client: starts connecting to `endpoint` for a reconnect.
    fn start_attempt(&mut self, endpoint: Endpoint) -> Result<(), Stop> {
        self.emit_event(ConnectionEvent::ReconnectAttempt {
            transport: endpoint.to_string(),
        });
        let Some(rc) = self.reconnect.as_mut() else {
            return Err(Stop::Gone(None));
        };
        rc.endpoint.clone_from(&endpoint);
        let config = rc.transport.clone();
        let timeout = rc.handshake_timeout;
        self.connecting = Some(Box::pin(async move {
            match tokio::time::timeout(timeout, transport::connect(&endpoint, &config)).await {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Timeout(timeout)),
            }
        }));
        self.phase = Phase::Connecting;
        Ok(())
    }

    /// Client: a reconnect attempt finished connecting (or failed to).
    async fn on_connected(&mut self, transport: Result<Transport, Error>) -> Result<(), Stop> {
        let transport = match transport {
            Ok(t) => t,
            Err(e) => return Err(Stop::LinkLost(Some(e.to_string()))),
        };
        self.conn.identity().info = Some(transport.info.clone());
        self.link = Some(Link::new(transport));
        let (Some(hs), Some(session), Some(rc)) =
            (&self.client_handshake, &self.session, &self.reconnect)
        else {
            return Err(Stop::Gone(None));
        };
        let fresh = self.new_session_next;
        let msg = if fresh {
            Message::HandshakeRequest {
                id: 0,
                app: hs.app.clone(),
                version: hs.version.clone(),
                auth: hs.auth.clone(),
            }
        } else {
            session.restore_request(&hs.app, hs.version.as_deref())
        };
        self.timer = Some(tokio::time::Instant::now() + rc.handshake_timeout);
        self.phase = Phase::Restoring { fresh };
        self.write(&msg).await
    }

    async fn send_heartbeat_ping(&mut self) -> Result<(), Stop> {
        if !matches!(self.phase, Phase::Open) {
            return Ok(());
        }
        let id = self.next_id();
        if self.send_buffered(&Message::Ping { id }).await?.is_err() {
            // A full buffer: skip this beat rather than fail anything.
            return Ok(());
        }
        let timeout = self.conn.shared.config.call_timeout;
        let key = self.deadlines.insert(id, timeout);
        self.pending.insert(
            id,
            Pending {
                kind: PendingKind::Heartbeat,
                key,
                timeout,
            },
        );
        Ok(())
    }

    async fn on_command(&mut self, cmd: Command) -> Result<(), Stop> {
        match cmd {
            Command::Request {
                kind,
                timeout,
                reply,
            } => {
                if !self.handshake_done {
                    let _ = reply.send(Err(Error::Protocol("handshake not done".into())));
                    return Ok(());
                }
                if self.pending.len() >= self.conn.shared.config.max_pending {
                    let _ = reply.send(Err(Error::QueueFull));
                    return Ok(());
                }
                let id = self.next_id();
                let msg = match kind {
                    RequestKind::Call {
                        iface,
                        method,
                        args,
                    } => Message::Call {
                        id,
                        iface,
                        method,
                        args: Value::Array(args),
                    },
                    RequestKind::Inspect { iface } => Message::Inspect { id, iface },
                    RequestKind::Ping => Message::Ping { id },
                };
                if let Err(e) = self.send_buffered(&msg).await? {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                let key = self.deadlines.insert(id, timeout);
                self.pending.insert(
                    id,
                    Pending {
                        kind: PendingKind::Request(reply),
                        key,
                        timeout,
                    },
                );
                Ok(())
            }
            Command::Emit { iface, event, args } => {
                if !self.handshake_done {
                    return Ok(());
                }
                let id = self.next_id();
                let msg = Message::Event {
                    id,
                    iface,
                    event,
                    args: Value::Array(args),
                };
                if let Err(e) = self.send_buffered(&msg).await? {
                    tracing::warn!(conn = self.conn.id(), error = %e, "event dropped");
                    self.emit_event(ConnectionEvent::Error {
                        error: e.to_string(),
                    });
                }
                Ok(())
            }
            Command::Reply { id, result } => {
                // Callbacks are never buffered: one written to a dead transport is lost, and
                // the peer learns that as CALLBACK_LOST on restore.
                if !self.can_write() {
                    return Ok(());
                }
                let result = match result {
                    Ok(v) => CallbackResult::Ok(vec![v]),
                    Err(e) => CallbackResult::Error(e),
                };
                self.write(&Message::Callback { id, result }).await
            }
            Command::Heartbeat(interval) => {
                self.conn.identity().heartbeat = interval;
                self.heartbeat = interval
                    .filter(|_| matches!(self.phase, Phase::Open))
                    .map(heartbeat_interval);
                Ok(())
            }
            Command::Flush(tx) => {
                let mut n = 0;
                for (_, p) in self.pending.drain() {
                    self.deadlines.remove(&p.key);
                    if let PendingKind::Request(reply) = p.kind {
                        let _ = reply.send(Err(Error::Flushed));
                        n += 1;
                    }
                }
                let _ = tx.send(n);
                Ok(())
            }
            Command::Adopt {
                transport,
                peer_received,
            } => self.adopt(transport, peer_received).await,
            Command::Close => Ok(()),
        }
    }

    /// Server: a new transport restores this connection's session.
    async fn adopt(&mut self, transport: Transport, peer_received: u64) -> Result<(), Stop> {
        if let Some(old) = self.link.take() {
            // The client gave up on the old transport before we noticed.
            let mut sink = old.sink;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
            });
        }
        self.conn.identity().info = Some(transport.info.clone());
        self.link = Some(Link::new(transport));
        self.timer = None;
        self.restore_session(peer_received, true).await
    }

    /// Server: answers a restore with `ok:<received>`, then resends what the client missed.
    async fn restore_session(&mut self, peer_received: u64, restored: bool) -> Result<(), Stop> {
        let Some(session) = self.session.as_mut() else {
            return Err(Stop::Gone(Some("no session to restore".into())));
        };
        let response = session.restored_response();
        let plan = session.restore(peer_received);
        let session_id = session.id().to_owned();
        let state = session.encode();
        self.phase = Phase::Open;
        self.write(&response).await?;
        for text in plan.resend {
            self.write_text(text).await?;
        }
        self.fail_received_unanswered(peer_received);
        if let Some(every) = self.heartbeat_setting() {
            self.heartbeat = Some(heartbeat_interval(every));
        }
        self.emit_event(ConnectionEvent::Client { session_id });
        self.ready_notified = true;
        if let Some(h) = &self.hooks {
            h.on_ready(&self.conn, restored, state);
        }
        Ok(())
    }

    fn heartbeat_setting(&self) -> Option<Duration> {
        self.conn.identity().heartbeat
    }

    /// After a restore: every request of ours the peer received (`|id| <= peer_received`)
    /// that is still unanswered lost its callback with the old transport, since callbacks are
    /// never resent. That covers the session's lost ids, and also requests an out-of-order
    /// callback confirmed early, which upstream leaves hanging.
    fn fail_received_unanswered(&mut self, peer_received: u64) {
        let lost: Vec<i64> = self
            .pending
            .keys()
            .filter(|id| id.unsigned_abs() <= peer_received)
            .copied()
            .collect();
        self.fail_lost(&lost);
    }

    /// Fails pending requests whose callbacks were lost with the old transport.
    fn fail_lost(&mut self, ids: &[i64]) {
        for id in ids {
            if let Some(p) = self.pending.remove(id) {
                self.deadlines.remove(&p.key);
                if let PendingKind::Request(reply) = p.kind {
                    let _ = reply.send(Err(Error::CallbackLost));
                }
            }
        }
    }

    fn reject(&self, text: &str, reason: impl Into<String>) {
        let mut preview = text.to_owned();
        if preview.len() > REJECT_PREVIEW {
            let mut cut = REJECT_PREVIEW;
            while !preview.is_char_boundary(cut) {
                cut -= 1;
            }
            preview.truncate(cut);
        }
        let reason = reason.into();
        tracing::debug!(conn = self.conn.id(), %reason, "message rejected");
        self.emit_event(ConnectionEvent::MessageRejected {
            message: preview,
            reason,
        });
    }

    async fn on_text(
        &mut self,
        text: String,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let msg = match Message::parse(&text) {
            Ok(m) => m,
            Err(e) => {
                // Upstream destroys the transport on a parse error; a message that parses but
                // has a malformed header is only rejected once the handshake is done.
                let fatal = matches!(
                    e,
                    tether_wire::DecodeError::Parse(_) | tether_wire::DecodeError::NotAnObject
                ) || !self.handshake_done;
                self.reject(&text, e.to_string());
                if fatal {
                    let err = format!("invalid message: {e}");
                    self.emit_event(ConnectionEvent::Error { error: err.clone() });
                    return Err(Stop::Gone(Some(err)));
                }
                return Ok(());
            }
        };
        if let Some(session) = self.session.as_mut() {
            session.on_receive(&msg);
        }
        match msg {
            Message::Heartbeat => {
                self.emit_event(ConnectionEvent::Heartbeat);
                Ok(())
            }
            Message::HandshakeRequest {
                app, version, auth, ..
            } => {
                if self.role == Role::Client {
                    // Only servers answer handshakes.
                    let reply = Message::HandshakeResponse {
                        id: 0,
                        result: HandshakeResult::Error(RemoteErrorArray::code(
                            ErrorCode::NotAServer,
                        )),
                    };
                    self.write(&reply).await?;
                    self.flush_out().await?;
                    self.reject(&text, "handshake request sent to a client");
                    return Err(Stop::Graceful);
                }
                if self.handshake_done {
                    self.reject(&text, "second handshake");
                    return Err(Stop::Gone(Some("second handshake".into())));
                }
                self.server_handshake(app, version, auth).await
            }
            Message::HandshakeResponse { result, .. } => match (self.role, &self.phase) {
                (Role::Client, Phase::Handshake) => {
                    self.client_handshake_response(result, handshake_reply)
                }
                (Role::Client, Phase::Restoring { fresh }) => {
                    let fresh = *fresh;
                    self.client_restore_response(result, fresh).await
                }
                _ => {
                    self.reject(&text, "unexpected handshake response");
                    Err(Stop::Gone(Some("unexpected handshake response".into())))
                }
            },
            _ if !self.handshake_done => {
                self.reject(&text, "message before handshake");
                Err(Stop::Gone(Some("message before handshake".into())))
            }
            Message::Call {
                id,
                iface,
                method,
                args,
            } => {
                let Value::Array(args) = args else {
                    self.reject(&text, "call arguments are not an array");
                    let result =
                        CallbackResult::Error(RemoteErrorArray::code(ErrorCode::InvalidSignature));
                    return self.write(&Message::Callback { id, result }).await;
                };
                if self.conn.shared.events.receiver_count() > 0 {
                    self.emit_event(ConnectionEvent::Call {
                        iface: iface.clone(),
                        method: method.clone(),
                        args: args.clone(),
                    });
                }
                let app = self.app.clone();
                let started = match &app {
                    Some(app) => app.call(self.conn.clone(), &iface, &method, args),
                    None => Err(RemoteErrorArray::code(ErrorCode::InterfaceNotFound)),
                };
                match started {
                    Err(e) => {
                        self.write(&Message::Callback {
                            id,
                            result: CallbackResult::Error(e),
                        })
                        .await
                    }
                    Ok(fut) => {
                        let tx = self.conn.shared.cmd_tx.clone();
                        tokio::spawn(async move {
                            // A panicking method answers 16 instead of taking the connection
                            // (or the process) down; catching it in place saves a task per call.
                            let result = match std::panic::AssertUnwindSafe(fut)
                                .catch_unwind()
                                .await
                            {
                                Ok(r) => r,
                                Err(_) => Err(RemoteErrorArray::code(ErrorCode::InternalApiError)),
                            };
                            let _ = tx.send(Command::Reply { id, result }).await;
                        });
                        Ok(())
                    }
                }
            }
            Message::Callback { id, result } => {
                let Some(p) = self.pending.remove(&id) else {
                    self.reject(&text, "callback for an unknown request");
                    return Ok(());
                };
                self.deadlines.remove(&p.key);
                let (res, error) = match result {
                    CallbackResult::Ok(values) => (Ok(values), None),
                    CallbackResult::Error(e) => (Err(Error::Remote(e.clone())), Some(e)),
                    CallbackResult::Empty => {
                        self.reject(&text, "callback with neither ok nor error");
                        (
                            Err(Error::Protocol("callback with neither ok nor error".into())),
                            None,
                        )
                    }
                };
                self.emit_event(ConnectionEvent::Callback { id, error });
                if let PendingKind::Request(reply) = p.kind {
                    let _ = reply.send(res);
                }
                Ok(())
            }
            Message::Event {
                iface, event, args, ..
            } => {
                let Value::Array(args) = args else {
                    self.reject(&text, "event arguments are not an array");
                    return Ok(());
                };
                if let Some(app) = &self.app {
                    app.handle_event(self.conn.clone(), &iface, &event, args.clone());
                }
                self.emit_event(ConnectionEvent::Event { iface, event, args });
                Ok(())
            }
            Message::Inspect { id, iface } => {
                self.emit_event(ConnectionEvent::Inspect {
                    iface: iface.clone(),
                });
                let result = match self.app.as_ref().and_then(|a| a.methods(&iface)) {
                    Some(names) => CallbackResult::Ok(names.into_iter().map(Value::from).collect()),
                    None => {
                        CallbackResult::Error(RemoteErrorArray::code(ErrorCode::InterfaceNotFound))
                    }
                };
                self.write(&Message::Callback { id, result }).await
            }
            Message::Ping { id } => {
                self.emit_event(ConnectionEvent::Ping { id });
                self.write(&Message::Pong { id }).await
            }
            Message::Pong { id } => {
                match self.pending.remove(&id) {
                    Some(p) => {
                        self.deadlines.remove(&p.key);
                        if let PendingKind::Request(reply) = p.kind {
                            let _ = reply.send(Ok(Vec::new()));
                        }
                    }
                    None => self.reject(&text, "pong for an unknown ping"),
                }
                self.emit_event(ConnectionEvent::Pong { id });
                Ok(())
            }
            Message::Unknown { kind, .. } => {
                self.reject(&text, format!("unknown message kind '{kind}'"));
                Ok(())
            }
        }
    }

    async fn server_handshake(
        &mut self,
        app: String,
        version: Option<String>,
        auth: Auth,
    ) -> Result<(), Stop> {
        let Some(hooks) = self.hooks.clone() else {
            return Err(Stop::Gone(Some("no server hooks".into())));
        };
        let decision = hooks.handshake(self.conn.clone(), app, version, auth).await;
        match decision {
            Ok(HandshakeDecision::New(accepted)) => {
                let mut session = Session::new(
                    accepted.session_id.clone(),
                    SessionRole::Server,
                    self.conn.shared.config.session,
                );
                session.set_username(accepted.username.clone());
                // The response always goes first: nothing else may be written before it.
                let response = session.created_response();
                let state = session.encode();
                self.session = Some(session);
                self.app = Some(accepted.app.clone());
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    id.username = accepted.username;
                    id.session_id = Some(accepted.session_id.clone());
                    id.app = Some(accepted.app);
                }
                self.handshake_done = true;
                self.phase = Phase::Open;
                self.timer = None;
                self.write(&response).await?;
                self.flush_out().await?;
                if let Some(interval) = self.conn.shared.config.heartbeat_interval {
                    self.on_command(Command::Heartbeat(Some(interval))).await?;
                }
                self.ready_notified = true;
                self.emit_event(ConnectionEvent::Client {
                    session_id: accepted.session_id,
                });
                hooks.on_ready(&self.conn, false, state);
                Ok(())
            }
            Ok(HandshakeDecision::Restore {
                session,
                app,
                peer_received,
            }) => {
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    id.username = session.username().map(str::to_owned);
                    id.session_id = Some(session.id().to_owned());
                    id.app = Some(app.clone());
                    id.heartbeat = self.conn.shared.config.heartbeat_interval;
                }
                self.session = Some(session);
                self.app = Some(app);
                self.handshake_done = true;
                self.timer = None;
                self.restore_session(peer_received, true).await
            }
            Ok(HandshakeDecision::Adopt {
                target,
                peer_received,
            }) => {
                let Some(link) = self.link.take() else {
                    return Err(Stop::Gone(None));
                };
                let Some(info) = self.conn.transport_info() else {
                    return Err(Stop::Gone(None));
                };
                let transport = Transport {
                    incoming: link.incoming,
                    outgoing: link.sink,
                    info,
                };
                let cmd = Command::Adopt {
                    transport,
                    peer_received,
                };
                match target.shared.cmd_tx.send(cmd).await {
                    Ok(()) => Err(Stop::HandedOver),
                    Err(mpsc::error::SendError(cmd)) => {
                        // The session's connection ended meanwhile: the session is unknown.
                        if let Command::Adopt { transport, .. } = cmd {
                            self.link = Some(Link::new(transport));
                        }
                        self.write(&Session::unknown_session_response()).await?;
                        self.flush_out().await?;
                        Err(Stop::Graceful)
                    }
                }
            }
            Err(error) => {
                let response = Message::HandshakeResponse {
                    id: 0,
                    result: HandshakeResult::Error(error.clone()),
                };
                self.write(&response).await?;
                self.flush_out().await?;
                Err(Stop::Graceful)
            }
        }
    }

    fn client_handshake_response(
        &mut self,
        result: HandshakeResult,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let reply = handshake_reply.take();
        match result {
            HandshakeResult::Error(e) => {
                self.emit_event(ConnectionEvent::Handshake {
                    error: Some(e.clone()),
                    ok: None,
                });
                if let Some(r) = reply {
                    let _ = r.send(Err(Error::Remote(e)));
                }
                Err(Stop::Gone(Some("handshake refused".into())))
            }
            ok => {
                let ok_text = match &ok {
                    HandshakeResult::NewSession(s) => s.clone(),
                    HandshakeResult::Restored(n) => n.to_string(),
                    HandshakeResult::OtherOk(v) => v.to_mdsf(),
                    HandshakeResult::Error(_) => unreachable!("handled above"),
                };
                let session_id = match &ok {
                    HandshakeResult::NewSession(s) => Some(s.clone()),
                    _ => None,
                };
                self.start_session(session_id);
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(ok_text),
                });
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                Ok(())
            }
        }
    }

    /// Client: a session the server just created (`None`: the server sent no session id, so
    /// nothing can be restored).
    fn start_session(&mut self, session_id: Option<String>) {
        let heartbeat = self.conn.shared.config.heartbeat_interval;
        {
            let mut id = self.conn.identity();
            id.handshake_done = true;
            id.session_id.clone_from(&session_id);
            id.heartbeat = heartbeat;
        }
        self.session = Some(Session::new(
            session_id.clone().unwrap_or_default(),
            SessionRole::Client,
            self.conn.shared.config.session,
        ));
        if session_id.is_none() {
            // Without a session id there is nothing to restore.
            self.reconnect = None;
        }
        self.handshake_done = true;
        self.phase = Phase::Open;
        self.timer = None;
        self.failures = 0;
        self.heartbeat = heartbeat.map(heartbeat_interval);
    }

    /// Client: the answer to a restore (or, after a refused restore, a new-session) handshake.
    async fn client_restore_response(
        &mut self,
        result: HandshakeResult,
        fresh: bool,
    ) -> Result<(), Stop> {
        match result {
            HandshakeResult::Restored(n) if !fresh => {
                let Some(session) = self.session.as_mut() else {
                    return Err(Stop::Gone(None));
                };
                let plan = session.restore(n);
                self.phase = Phase::Open;
                self.timer = None;
                self.failures = 0;
                for text in plan.resend {
                    self.write_text(text).await?;
                }
                self.fail_received_unanswered(n);
                self.heartbeat = self.heartbeat_setting().map(heartbeat_interval);
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(n.to_string()),
                });
                self.emit_event(ConnectionEvent::Reconnect { error: None });
                Ok(())
            }
            HandshakeResult::Error(e) if !fresh => {
                self.emit_event(ConnectionEvent::Handshake {
                    error: Some(e.clone()),
                    ok: None,
                });
                let fallback = self
                    .reconnect
                    .as_ref()
                    .is_some_and(|r| r.fallback_to_new_session);
                if fallback && e.code == ErrorCode::AuthFailed.code() {
                    // The server no longer knows the session (and closes this transport, as
                    // after every refused handshake): start a new one on the next transport.
                    // Upstream would retry the old session forever.
                    self.new_session_next = true;
                }
                Err(Stop::LinkLost(Some(format!(
                    "session restore refused: {e}"
                ))))
            }
            HandshakeResult::NewSession(id) => {
                self.new_session_next = false;
                // A new session: whatever the old one had in flight may or may not have run.
                let old = self.session.as_mut().map(Session::take_buffered);
                for m in old.into_iter().flatten() {
                    self.fail_lost(&[m.id]);
                }
                self.start_session(Some(id.clone()));
                self.emit_event(ConnectionEvent::Handshake {
                    error: None,
                    ok: Some(id),
                });
                self.emit_event(ConnectionEvent::Reconnect { error: None });
                Ok(())
            }
            other => {
                let e = format!("unexpected answer to the restore handshake: {other:?}");
                Err(Stop::LinkLost(Some(e)))
            }
        }
    }

    async fn shutdown(mut self, stop: Stop, handshake_reply: Option<HandshakeReply>) {
        let handed_over = matches!(stop, Stop::HandedOver);
        if let Stop::Gone(Some(reason)) | Stop::LinkLost(Some(reason)) = &stop {
            tracing::debug!(conn = self.conn.id(), %reason, "connection closed");
            if let Some(h) = &self.hooks {
                h.on_error(&self.conn, reason);
            }
        }
        if !handed_over {
            // Orderly close on our side; on a lost transport this fails harmlessly.
            let _ = self.flush_out().await;
            if let Some(link) = self.link.as_mut() {
                let _ = tokio::time::timeout(Duration::from_secs(5), link.sink.close()).await;
            }
        }
        self.link = None;
        self.connecting = None;
        self.cmd_rx.close();
        // Every pending request ends here.
        if let Some(reply) = handshake_reply {
            let _ = reply.send(Err(Error::NoHandshakeResponse));
        }
        for (_, p) in self.pending.drain() {
            if let PendingKind::Request(reply) = p.kind {
                let _ = reply.send(Err(Error::Closed));
            }
        }
        while let Ok(cmd) = self.cmd_rx.try_recv() {
            match cmd {
                Command::Request { reply, .. } => {
                    let _ = reply.send(Err(Error::Closed));
                }
                Command::Flush(tx) => {
                    let _ = tx.send(0);
                }
                Command::Adopt { transport, .. } => {
                    // Too late to restore here; end that transport too.
                    let mut sink = transport.outgoing;
                    let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
                }
                _ => {}
            }
        }
        self.conn.identity().closed = true;
        self.emit_event(ConnectionEvent::Close);
        if let Some(h) = &self.hooks {
            let state = if handed_over {
                None
            } else {
                self.session.as_ref().map(Session::encode)
            };
            h.on_close(&self.conn, self.ready_notified, state).await;
        }
        let _ = self.closed_tx.send(true);
    }
}
