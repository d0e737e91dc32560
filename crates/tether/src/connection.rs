//! One JSTP connection: a driver task that owns the transport, and cheap cloneable
//! [`Connection`] handles that talk to it over a bounded channel.
//!
//! The driver assigns message ids (client +1 from 1, server −1 from −1, handshake 0), keeps the
//! table of pending requests with their deadlines, answers the peer's calls, inspects and pings,
//! and ends every pending request exactly once: answered, failed when the connection closes, or
//! timed out with [`Error::Timeout`] (which never goes on the wire).

use crate::app::Application;
use crate::error::{Error, RemoteError};
use crate::transport::{MessageSink, MessageStream, Transport, TransportInfo};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_wire::{
    Auth, CallbackResult, ErrorCode, HandshakeResult, Message, RemoteErrorArray, Value,
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
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            call_timeout: Duration::from_secs(15),
            command_capacity: 1024,
            event_capacity: 1024,
            max_pending: 65_536,
            heartbeat_interval: None,
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
        self.identity().info.as_ref().and_then(|i| i.remote_addr.clone())
    }

    /// Our address.
    pub fn local_addr(&self) -> Option<String> {
        self.identity().info.as_ref().and_then(|i| i.local_addr.clone())
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
        self.shared.cmd_tx.send(cmd).await.map_err(|_| Error::Closed)
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
            return Err(Error::InvalidArgument("heartbeat interval must be > 0".into()));
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

/// What a server decides about a handshake.
pub(crate) struct Accepted {
    pub app: Arc<Application>,
    pub username: Option<String>,
    pub session_id: String,
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
    ) -> BoxFuture<'static, Result<Accepted, RemoteError>>;
    /// The handshake response has gone out.
    fn on_ready(&self, conn: &Connection);
    /// The connection closed (after `on_ready` or not).
    fn on_close(&self, conn: &Connection, was_ready: bool);
    /// No successful handshake within the deadline.
    fn on_handshake_timeout(&self, conn: &Connection);
    /// A transport or protocol error on the connection.
    fn on_error(&self, conn: &Connection, error: &str);
}

/// Client handshake parameters.
pub(crate) struct ClientHandshake {
    pub app: String,
    pub version: Option<String>,
    pub auth: Auth,
    pub local_app: Arc<Application>,
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
/// handshaken; the driver enforces `handshake_timeout`.
pub(crate) fn start_server(
    transport: Transport,
    config: ConnectionConfig,
    hooks: Arc<dyn ServerHooks>,
    handshake_timeout: Duration,
) -> Connection {
    let (conn, ch) = new_shared(Role::Server, config, transport.info.clone());
    let driver = Driver::new(conn.clone(), transport, ch, Some(hooks), Role::Server);
    tokio::spawn(driver.run(Some(Instant::now() + handshake_timeout), None));
    conn
}

/// Starts the client side and performs the handshake.
pub(crate) async fn start_client(
    transport: Transport,
    config: ConnectionConfig,
    handshake: ClientHandshake,
    handshake_timeout: Duration,
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
    let driver = Driver::new(conn.clone(), transport, ch, None, Role::Client);
    let (tx, rx) = oneshot::channel();
    tokio::spawn(driver.run(
        Some(Instant::now() + handshake_timeout),
        Some((handshake, tx)),
    ));
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
    is_inspect: bool,
}

type HandshakeReply = oneshot::Sender<Result<(), Error>>;

struct Driver {
    conn: Connection,
    role: Role,
    incoming: MessageStream,
    sink: MessageSink,
    cmd_rx: mpsc::Receiver<Command>,
    closed_tx: watch::Sender<bool>,
    hooks: Option<Arc<dyn ServerHooks>>,
    app: Option<Arc<Application>>,
    pending: HashMap<i64, Pending>,
    deadlines: DelayQueue<i64>,
    next_id: i64,
    delta: i64,
    handshake_done: bool,
    ready_notified: bool,
    heartbeat: Option<tokio::time::Interval>,
    /// `abs(id)` of the last request received: JSTP's session delivery counter.
    received_count: u64,
    dirty: bool,
}

/// Why the driver stops.
enum Stop {
    /// Local close: send FIN/close frame.
    Graceful,
    /// The peer went away or the transport failed.
    Gone(Option<String>),
}

const REJECT_PREVIEW: usize = 1024;

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
            incoming: transport.incoming,
            sink: transport.outgoing,
            cmd_rx: ch.cmd_rx,
            closed_tx: ch.closed_tx,
            hooks,
            app,
            pending: HashMap::new(),
            deadlines: DelayQueue::new(),
            next_id: 0,
            delta: if role == Role::Client { 1 } else { -1 },
            handshake_done: false,
            ready_notified: false,
            heartbeat: None,
            received_count: 0,
            dirty: false,
            conn,
        }
    }

    fn emit_event(&self, ev: ConnectionEvent) {
        if self.conn.shared.events.receiver_count() > 0 {
            let _ = self.conn.shared.events.send(ev);
        }
    }

    fn take_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += self.delta;
        id
    }

    async fn write(&mut self, msg: &Message) -> Result<(), Stop> {
        let text = msg.encode();
        self.write_text(text).await
    }

    async fn write_text(&mut self, text: String) -> Result<(), Stop> {
        self.dirty = true;
        self.sink
            .feed(text)
            .await
            .map_err(|e| Stop::Gone(Some(e.to_string())))
    }

    async fn flush_out(&mut self) -> Result<(), Stop> {
        if self.dirty {
            self.dirty = false;
            self.sink
                .flush()
                .await
                .map_err(|e| Stop::Gone(Some(e.to_string())))?;
        }
        Ok(())
    }

    async fn run(
        mut self,
        handshake_deadline: Option<Instant>,
        mut client: Option<(ClientHandshake, HandshakeReply)>,
    ) {
        let mut handshake_reply = None;
        let stop = 'outer: {
            if let Some((hs, reply)) = client.take() {
                let id = self.take_id();
                let msg = Message::HandshakeRequest {
                    id,
                    app: hs.app,
                    version: hs.version,
                    auth: hs.auth,
                };
                if let Err(stop) = self.write(&msg).await {
                    break 'outer stop;
                }
                if let Err(stop) = self.flush_out().await {
                    break 'outer stop;
                }
                handshake_reply = Some(reply);
            }
            let deadline = handshake_deadline.map(tokio::time::Instant::from_std);
            match self.main_loop(deadline, &mut handshake_reply).await {
                Ok(()) => Stop::Graceful,
                Err(stop) => stop,
            }
        };
        self.shutdown(stop, handshake_reply).await;
    }

    async fn main_loop(
        &mut self,
        handshake_deadline: Option<tokio::time::Instant>,
        handshake_reply: &mut Option<HandshakeReply>,
    ) -> Result<(), Stop> {
        let hs_sleep = tokio::time::sleep_until(
            handshake_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365)),
        );
        tokio::pin!(hs_sleep);
        loop {
            let waiting_handshake = !self.handshake_done && handshake_deadline.is_some();
            tokio::select! {
                biased;
                incoming = self.incoming.next() => match incoming {
                    Some(Ok(text)) => self.on_text(text, handshake_reply).await?,
                    Some(Err(e)) => return Err(Stop::Gone(Some(e.to_string()))),
                    None => return Err(Stop::Gone(None)),
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Close) | None => return Ok(()),
                    Some(cmd) => {
                        self.on_command(cmd).await?;
                        // Batch whatever else is queued before one flush.
                        for _ in 0..64 {
                            match self.cmd_rx.try_recv() {
                                Ok(Command::Close) => return Ok(()),
                                Ok(cmd) => self.on_command(cmd).await?,
                                Err(_) => break,
                            }
                        }
                    }
                },
                Some(expired) = self.deadlines.next(), if !self.deadlines.is_empty() => {
                    let id = expired.into_inner();
                    if let Some(p) = self.pending.remove(&id) {
                        if let PendingKind::Request(reply) = p.kind {
                            let _ = reply.send(Err(Error::Timeout(p.timeout)));
                        }
                    }
                },
                _ = async { self.heartbeat.as_mut().expect("guarded").tick().await }, if self.heartbeat.is_some() && self.handshake_done => {
                    self.send_heartbeat_ping().await?;
                },
                _ = &mut hs_sleep, if waiting_handshake => {
                    if let Some(h) = &self.hooks {
                        h.on_handshake_timeout(&self.conn);
                    }
                    if let Some(reply) = handshake_reply.take() {
                        let _ = reply.send(Err(Error::Timeout(Duration::ZERO)));
                    }
                    return Err(Stop::Gone(Some("handshake timeout".into())));
                },
            }
            self.flush_out().await?;
        }
    }

    async fn send_heartbeat_ping(&mut self) -> Result<(), Stop> {
        let id = self.take_id();
        let timeout = self.conn.shared.config.call_timeout;
        let key = self.deadlines.insert(id, timeout);
        self.pending.insert(
            id,
            Pending {
                kind: PendingKind::Heartbeat,
                key,
                timeout,
                is_inspect: false,
            },
        );
        self.write(&Message::Ping { id }).await
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
                let id = self.take_id();
                let is_inspect = matches!(kind, RequestKind::Inspect { .. });
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
                let key = self.deadlines.insert(id, timeout);
                self.pending.insert(
                    id,
                    Pending {
                        kind: PendingKind::Request(reply),
                        key,
                        timeout,
                        is_inspect,
                    },
                );
                self.write(&msg).await
            }
            Command::Emit { iface, event, args } => {
                if !self.handshake_done {
                    return Ok(());
                }
                let id = self.take_id();
                self.write(&Message::Event {
                    id,
                    iface,
                    event,
                    args: Value::Array(args),
                })
                .await
            }
            Command::Reply { id, result } => {
                let result = match result {
                    Ok(v) => CallbackResult::Ok(vec![v]),
                    Err(e) => CallbackResult::Error(e),
                };
                self.write(&Message::Callback { id, result }).await
            }
            Command::Heartbeat(interval) => {
                self.heartbeat = interval.map(|d| {
                    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
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
            Command::Close => Ok(()),
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

    fn note_received(&mut self, id: i64) {
        self.received_count = id.unsigned_abs();
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
            Message::HandshakeResponse { result, .. } => {
                if self.role == Role::Server || self.handshake_done {
                    self.reject(&text, "unexpected handshake response");
                    return Err(Stop::Gone(Some("unexpected handshake response".into())));
                }
                self.client_handshake_response(result, handshake_reply)
            }
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
                self.note_received(id);
                let Value::Array(args) = args else {
                    self.reject(&text, "call arguments are not an array");
                    let result = CallbackResult::Error(RemoteErrorArray::code(
                        ErrorCode::InvalidSignature,
                    ));
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
                            let result = match tokio::spawn(fut).await {
                                Ok(r) => r,
                                // A panicking method answers 16 instead of taking the
                                // connection (or the process) down.
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
                        (Err(Error::Protocol("callback with neither ok nor error".into())), None)
                    }
                };
                self.emit_event(ConnectionEvent::Callback { id, error });
                let _ = p.is_inspect;
                if let PendingKind::Request(reply) = p.kind {
                    let _ = reply.send(res);
                }
                Ok(())
            }
            Message::Event {
                id,
                iface,
                event,
                args,
            } => {
                self.note_received(id);
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
                self.note_received(id);
                self.emit_event(ConnectionEvent::Inspect {
                    iface: iface.clone(),
                });
                let result = match self.app.as_ref().and_then(|a| a.methods(&iface)) {
                    Some(names) => CallbackResult::Ok(names.into_iter().map(Value::from).collect()),
                    None => CallbackResult::Error(RemoteErrorArray::code(
                        ErrorCode::InterfaceNotFound,
                    )),
                };
                self.write(&Message::Callback { id, result }).await
            }
            Message::Ping { id } => {
                self.note_received(id);
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
        let decision = hooks
            .handshake(self.conn.clone(), app, version, auth)
            .await;
        match decision {
            Ok(accepted) => {
                // The response always goes first: nothing else may be written before it.
                let response = Message::HandshakeResponse {
                    id: 0,
                    result: HandshakeResult::NewSession(accepted.session_id.clone()),
                };
                self.next_id = self.delta;
                self.app = Some(accepted.app.clone());
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    id.username = accepted.username;
                    id.session_id = Some(accepted.session_id.clone());
                    id.app = Some(accepted.app);
                }
                self.handshake_done = true;
                self.write(&response).await?;
                self.flush_out().await?;
                if let Some(interval) = self.conn.shared.config.heartbeat_interval {
                    self.on_command(Command::Heartbeat(Some(interval))).await?;
                }
                self.ready_notified = true;
                self.emit_event(ConnectionEvent::Client {
                    session_id: accepted.session_id,
                });
                hooks.on_ready(&self.conn);
                Ok(())
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
                {
                    let mut id = self.conn.identity();
                    id.handshake_done = true;
                    if let HandshakeResult::NewSession(s) = &ok {
                        id.session_id = Some(s.clone());
                    }
                }
                self.handshake_done = true;
                self.next_id = self.delta;
                if let Some(interval) = self.conn.shared.config.heartbeat_interval {
                    let mut i =
                        tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    self.heartbeat = Some(i);
                }
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

    async fn shutdown(mut self, stop: Stop, handshake_reply: Option<HandshakeReply>) {
        if let Stop::Gone(Some(reason)) = &stop {
            tracing::debug!(conn = self.conn.id(), %reason, "connection lost");
            if let Some(h) = &self.hooks {
                h.on_error(&self.conn, reason);
            }
        }
        // Orderly close on our side; on a lost transport this fails harmlessly.
        let _ = self.flush_out().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sink.close()).await;
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
                _ => {}
            }
        }
        self.conn.identity().closed = true;
        self.emit_event(ConnectionEvent::Close);
        if let Some(h) = &self.hooks {
            h.on_close(&self.conn, self.ready_notified);
        }
        let _ = self.closed_tx.send(true);
    }
}
