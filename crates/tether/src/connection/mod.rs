//! One JSTP connection: a driver task that owns the transport, and cheap cloneable
//! [`Connection`] handles that talk to it over a channel whose events are accounted against
//! the session's bounds.
//!
//! # Order
//!
//! Calls from the peer start in arrival order on the connection's own task (no task per
//! call): the synchronous part of each method, and whatever it emits, happens in that order,
//! and methods that finish at once are answered in arrival order (one that awaits is answered
//! when it finishes, as JSTP allows). A method's events go out before its callback. Events
//! queued on one connection go out in the order they were queued. A method that should not
//! hold its connection's other calls up opts out with `Interface::spawned_method` (its own
//! task) or `Interface::blocking_method` (the blocking pool).
//!
//! # Delivery and bounds
//!
//! Every request and event a connection sends lives in its session's resend buffer until the
//! peer confirms it (`tether_wire::Session`), so nothing is ever dropped to make room. The
//! buffer's bounds ([`SessionConfig`]: 16 384 messages, 64 MiB by default) drive four rules,
//! as fractions of either bound:
//!
//! | backlog (queued + unconfirmed) | what happens |
//! | --- | --- |
//! | every ⅛ sent since the last request for one | the driver pings: the pong confirms everything before it |
//! | above ¼ | [`Connection::emit`] and `Server::broadcast_async` wait for room (backpressure) |
//! | a confirmation ping unanswered for the call timeout | the peer is too slow (or gone): its transport is detached ([`Error::SlowConsumer`], logged); the session stays and a restore resends the buffer |
//! | the full bound | the session ends: [`Error::SlowConsumer`], logged, and the session is discarded so a restore is refused rather than silently incomplete |
//!
//! Reading from the peer pauses (TCP backpressure) while
//! [`ConnectionConfig::max_calls_in_flight`] calls run or
//! [`ConnectionConfig::max_reply_backlog`] bytes of replies wait for the transport.
//!
//! The driver assigns message ids (client +1 from 1, server −1 from −1, handshake 0), keeps the
//! table of pending requests with their deadlines, answers the peer's calls, inspects and pings,
//! and ends every pending request exactly once: answered, failed when the connection closes, or
//! timed out with [`Error::Timeout`] (which never goes on the wire).

use crate::app::Application;
use crate::error::{Error, RemoteError};
use crate::reconnect::Reconnector;
use crate::transport::{ClientTransportConfig, Endpoint, Transport, TransportInfo};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_wire::{Auth, ErrorCode, PreparedEvent, Session, SessionConfig, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

mod driver;
pub(crate) mod outbound;

use driver::Driver;
use outbound::Flow;

/// Which end of the protocol a connection plays (one type across tether: sessions,
/// connections and HTTP streams).
pub use tether_wire::Role;

/// Per-connection settings. Defaults follow `@metarhia/jstp` where it has one.
///
/// Every buffer is bounded: the resend buffer by `session`, running calls by
/// `max_calls_in_flight`, replies waiting for the transport by `max_reply_backlog`, requests
/// awaiting answers by `max_pending`, connection events by `event_capacity`. A full outgoing
/// side means backpressure or a detached peer, never a dropped message (see the module docs).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionConfig {
    /// Deadline of a call, inspect or ping when none is given per request; also how long a
    /// heartbeat or confirmation ping may go unanswered before the link counts as dead.
    /// Default 15 s.
    pub call_timeout: Duration,
    /// Capacity of the connection-event broadcast; slow subscribers see `Lagged`. Default 1024.
    pub event_capacity: usize,
    /// Most requests awaiting an answer at once; more fail with [`Error::QueueFull`].
    /// Default 65 536.
    pub max_pending: usize,
    /// Most of our methods running at once for the peer; at the bound the driver stops
    /// reading the peer until one finishes (TCP backpressure). Default 1024.
    pub max_calls_in_flight: usize,
    /// Bytes of replies (callbacks, pongs) waiting for the transport past which the driver
    /// stops reading the peer, so a peer that never reads its answers is held back by TCP
    /// instead of growing our memory. Default 1 MiB.
    pub max_reply_backlog: usize,
    /// Ping the peer this often once the handshake is done. Default off, as `@metarhia/jstp`.
    pub heartbeat_interval: Option<Duration>,
    /// Bounds of the session's resend buffer (sent requests and events not yet confirmed by
    /// the peer). Defaults: 16 384 messages, 64 MiB. Confirmations are asked for every ⅛ (a
    /// peer that leaves one unanswered for `call_timeout` is detached as too slow), awaiting
    /// senders wait above ¼, and a full buffer ends the session ([`Error::SlowConsumer`]).
    pub session: SessionConfig,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            call_timeout: Duration::from_secs(15),
            event_capacity: 1024,
            max_pending: 65_536,
            max_calls_in_flight: 1024,
            max_reply_backlog: 1 << 20,
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
    cmd_tx: mpsc::UnboundedSender<Command>,
    /// What the connection holds for its peer; bounds `cmd_tx`'s events.
    flow: Flow,
    /// Made on the first [`Connection::events`] call: a connection nobody watches keeps no
    /// event slots (they would cost most of an idle connection's memory).
    events: std::sync::OnceLock<broadcast::Sender<ConnectionEvent>>,
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

/// What the handle asks the driver to put on the wire (the driver assigns the id; the
/// session tracks it by its [`tether_wire::session::RequestKind`]).
enum OutgoingRequest {
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

/// A request for the driver to send (boxed in [`Command`] to keep every queued command, and
/// the channel's preallocated block, small).
struct RequestCmd {
    kind: OutgoingRequest,
    timeout: Duration,
    reply: Reply,
}

enum Command {
    Request(Box<RequestCmd>),
    /// An event admitted by [`Flow::admit`] (`len` bytes accounted).
    Emit {
        event: PreparedEvent,
        len: usize,
    },
    /// A handle could not queue an event: the session must end.
    Overflow,
    Heartbeat(Option<Duration>),
    Flush(oneshot::Sender<usize>),
    /// Server: a new transport restores this connection's session.
    Adopt(Box<(Transport, u64)>),
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

    /// The session id the server assigned. It is the client's bearer secret: a JSTP restore
    /// carries nothing else, so never log it (see [`Connection::session_tag`]).
    pub fn session_id(&self) -> Option<String> {
        self.identity().session_id.clone()
    }

    /// A short tag of the session id for logs and metrics: the same session always gets the
    /// same tag, and the tag does not give the id away.
    pub fn session_tag(&self) -> Option<String> {
        use std::hash::{Hash, Hasher};
        self.identity().session_id.as_ref().map(|id| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            id.hash(&mut h);
            format!("{:08x}", h.finish() >> 32)
        })
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
        let capacity = self.shared.config.event_capacity.max(1);
        self.shared
            .events
            .get_or_init(|| broadcast::channel(capacity).0)
            .subscribe()
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
        self.shared.cmd_tx.send(cmd).map_err(|_| Error::Closed)
    }

    async fn request(&self, kind: OutgoingRequest, timeout: Duration) -> Result<Vec<Value>, Error> {
        let (reply, rx) = oneshot::channel();
        self.send_cmd(Command::Request(Box::new(RequestCmd {
            kind,
            timeout,
            reply,
        })))
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
            OutgoingRequest::Call {
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

    /// Sends the event `iface.event(args)` to the peer: queues it in the session (so a restore
    /// resends it if the link drops), then waits while the connection holds more than a
    /// quarter of its resend bounds for an attached peer (backpressure). Events of one
    /// connection go out in the order they were queued.
    pub async fn emit(&self, iface: &str, event: &str, args: Vec<Value>) -> Result<(), Error> {
        check_finite(&args)?;
        self.emit_prepared(PreparedEvent::new(iface, event, &Value::Array(args)))?;
        self.shared.flow.wait_for_room().await;
        Ok(())
    }

    /// Like [`Connection::emit`] without waiting. Never drops the event silently: it is
    /// queued, or — when the session's resend buffer cannot take it — the session ends and
    /// this fails with [`Error::SlowConsumer`] (a restore is then refused, so the peer knows).
    pub fn try_emit(&self, iface: &str, event: &str, args: Vec<Value>) -> Result<(), Error> {
        check_finite(&args)?;
        self.emit_prepared(PreparedEvent::new(iface, event, &Value::Array(args)))
    }

    /// Queues an event encoded once for many connections (see [`Connection::try_emit`]).
    /// Whether anyone watches this connection's events.
    pub(crate) fn watched(&self) -> bool {
        self.shared
            .events
            .get()
            .is_some_and(|e| e.receiver_count() > 0)
    }

    /// Sends a connection event to whoever watches.
    pub(crate) fn notify(&self, ev: ConnectionEvent) {
        if let Some(e) = self.shared.events.get() {
            if e.receiver_count() > 0 {
                let _ = e.send(ev);
            }
        }
    }

    pub(crate) fn emit_prepared(&self, event: PreparedEvent) -> Result<(), Error> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if !self.handshake_done() {
            // Events have ids from the session, which the handshake makes.
            return Err(Error::Protocol("handshake not done".into()));
        }
        let len = event.len();
        match self.shared.flow.admit(len) {
            Ok(()) => self
                .shared
                .cmd_tx
                .send(Command::Emit { event, len })
                .map_err(|_| {
                    self.shared.flow.taken(len);
                    Error::Closed
                }),
            Err(o) => {
                let _ = self.shared.cmd_tx.send(Command::Overflow);
                Err(Error::SlowConsumer {
                    bytes: o.bytes,
                    messages: o.messages,
                })
            }
        }
    }

    /// Waits while this connection holds more than a quarter of its resend bounds for an
    /// attached peer.
    pub(crate) async fn wait_for_room(&self) {
        self.shared.flow.wait_for_room().await;
    }

    /// Asks the peer for the method names of `iface` and returns a proxy for it.
    pub async fn inspect(&self, iface: &str) -> Result<RemoteProxy, Error> {
        let names = self
            .request(
                OutgoingRequest::Inspect {
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
        self.request(OutgoingRequest::Ping, self.shared.config.call_timeout)
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
        session: SessionFate,
    ) -> BoxFuture<'static, ()>;
    /// No successful handshake within the deadline.
    fn on_handshake_timeout(&self, conn: &Connection);
    /// A transport or protocol error on the connection.
    fn on_error(&self, conn: &Connection, error: &str);
}

/// What becomes of a closed connection's session.
pub(crate) enum SessionFate {
    /// Keep it (encoded) for a restore.
    Keep(String),
    /// Another connection has it, or there was none.
    HandedOver,
    /// It was given up (its resend buffer overflowed): forget it everywhere, so a restore is
    /// refused rather than silently incomplete.
    Discard,
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
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let flow = Flow::new(&config.session);
    let events = std::sync::OnceLock::new();
    let (closed_tx, closed_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        role,
        config,
        cmd_tx,
        flow,
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
    cmd_rx: mpsc::UnboundedReceiver<Command>,
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
    let mut driver = Driver::new(
        conn.clone(),
        transport,
        ch.cmd_rx,
        ch.closed_tx,
        Some(hooks),
        Role::Server,
    );
    driver.client_expiration = client_expiration;
    tokio::spawn(driver.run(handshake_timeout, None));
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
    let mut driver = Driver::new(
        conn.clone(),
        transport,
        ch.cmd_rx,
        ch.closed_tx,
        None,
        Role::Client,
    );
    driver.reconnect = reconnect;
    driver.client_handshake = Some(handshake);
    let (tx, rx) = oneshot::channel();
    tokio::spawn(driver.run(handshake_timeout, Some(tx)));
    rx.await.unwrap_or(Err(Error::NoHandshakeResponse))?;
    Ok(conn)
}
