//! The server: [`ConductorServer`] routes requests to handlers by method name, answers in
//! each request's dialect, and can act as an app interface (tokens, origins).

use super::{ws_config, CellId, ConductorError, Dialect, Value};
use crate::transport::{ByteStream, ListenOptions, StreamEndpoint, StreamListener};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_wire::conductor::{
    authenticate_token, to_bytes, Envelope, Payload, WireError, WireMessage,
};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as HandshakeRequest, Response as HandshakeResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

type Handler =
    Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, (String, String)>> + Send + Sync>;

/// The cell of [`ConductorServer`]'s app signals unless [`ConductorServerBuilder::cell_id`] says
/// otherwise: valid 39-byte hashes (prefix, 32 bytes of `d1`/`a1`, DHT location), which clients
/// that check hashes (`@spartan-hc/holo-hash`) accept.
pub fn example_cell_id() -> CellId {
    let hash = |prefix: [u8; 3], fill: u8, loc: [u8; 4]| {
        let mut h = prefix.to_vec();
        h.extend([fill; 32]);
        h.extend(loc);
        h
    };
    CellId {
        dna_hash: hash([0x84, 0x2d, 0x24], 0xd1, [0x95, 0x23, 0x47, 0x82]),
        agent_pub_key: hash([0x84, 0x20, 0x24], 0xa1, [0xd4, 0x3b, 0xe3, 0x31]),
    }
}

/// How long an app interface waits for `authenticate`, as the conductor does.
pub const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds a [`ConductorServer`].
pub struct ConductorServerBuilder {
    handlers: HashMap<String, Handler>,
    max_message_size: Option<usize>,
    dialect: Dialect,
    tokens: Option<Vec<Vec<u8>>>,
    authentication_timeout: Duration,
    allowed_origins: Option<Vec<String>>,
    cell_id: CellId,
}

impl Default for ConductorServerBuilder {
    fn default() -> Self {
        ConductorServerBuilder {
            handlers: HashMap::new(),
            max_message_size: None,
            dialect: Dialect::Value,
            tokens: None,
            authentication_timeout: AUTHENTICATION_TIMEOUT,
            allowed_origins: None,
            cell_id: example_cell_id(),
        }
    }
}

impl ConductorServerBuilder {
    /// Routes requests of type `method` to `f`, which gets the request's content and returns the
    /// response content or `(error kind, message)`.
    pub fn handler<F, Fut>(mut self, method: impl Into<String>, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, (String, String)>> + Send + 'static,
    {
        self.handlers
            .insert(method.into(), Arc::new(move |v| Box::pin(f(v))));
        self
    }

    /// Largest message accepted (default 16 MiB); a larger one closes that connection (1009).
    pub fn max_message_size(mut self, max: usize) -> Self {
        self.max_message_size = Some(max);
        self
    }

    /// The dialect of signals (and errors) sent to a client before it has shown its own in a
    /// request. Default [`Dialect::Value`].
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Makes this an app interface: the first message must be `authenticate` with one of
    /// `tokens`, within [`AUTHENTICATION_TIMEOUT`]; otherwise the connection is closed.
    pub fn tokens(mut self, tokens: impl IntoIterator<Item = Vec<u8>>) -> Self {
        self.tokens = Some(tokens.into_iter().collect());
        self
    }

    /// How long to wait for `authenticate` when tokens are required.
    pub fn authentication_timeout(mut self, after: Duration) -> Self {
        self.authentication_timeout = after;
        self
    }

    /// Accepts only WebSocket handshakes whose `Origin` is one of `origins` (`"*"`: any origin,
    /// but one is required, as on a conductor); others get HTTP 400. By default any origin, and
    /// none, is accepted (the older npm clients send none).
    pub fn allowed_origins(mut self, origins: impl IntoIterator<Item = String>) -> Self {
        self.allowed_origins = Some(origins.into_iter().collect());
        self
    }

    /// The cell named in app signals. Default [`example_cell_id`].
    pub fn cell_id(mut self, cell_id: CellId) -> Self {
        self.cell_id = cell_id;
        self
    }

    /// Builds the server.
    pub fn build(self) -> ConductorServer {
        ConductorServer {
            inner: Arc::new(ServerInner {
                handlers: self.handlers,
                max_message_size: self.max_message_size.unwrap_or(16 << 20),
                dialect: self.dialect,
                tokens: self.tokens,
                authentication_timeout: self.authentication_timeout,
                allowed_origins: self.allowed_origins,
                cell_id: self.cell_id,
                clients: Mutex::new(HashMap::new()),
                next_client: AtomicU64::new(1),
                events: broadcast::channel(1024).0,
                shutdown: watch::channel(false).0,
            }),
        }
    }
}

/// What was wrong with a client's input ([`ConductorServerEvent::BadInput`]).
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum InputError {
    /// A frame that is not a valid envelope, or an `authenticate` payload that is not
    /// `{token: [u8…]}`.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A kind of message clients do not send (a response or a signal).
    #[error("unexpected {0} from a client")]
    Unexpected(&'static str),
    /// On an app interface, a first message other than `authenticate`.
    #[error("{0} before authenticate")]
    BeforeAuthenticate(&'static str),
    /// An `authenticate` with a token the interface does not know.
    #[error("invalid token")]
    InvalidToken,
    /// No `authenticate` within the authentication timeout.
    #[error("no authenticate within {0:?}")]
    AuthenticationTimeout(Duration),
    /// The WebSocket failed: a protocol violation, a message over the size limit, a reset.
    #[error("websocket: {0}")]
    WebSocket(#[source] Arc<tungstenite::Error>),
}

/// What happens on a [`ConductorServer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ConductorServerEvent {
    /// A client connected (and authenticated, when the interface requires it).
    Connected(u64),
    /// A client sent something invalid; the connection was closed (`closed`) or the message
    /// skipped, as a conductor skips a frame it cannot decode.
    BadInput {
        /// The client.
        client: u64,
        /// What was wrong.
        error: InputError,
        /// Whether the connection was closed for it.
        closed: bool,
    },
    /// A client went away.
    Disconnected(u64),
    /// A client did not read fast enough: its queue of [`CLIENT_QUEUE`] messages was full when
    /// a signal or an answer came for it, so it was closed (1008) rather than left to miss
    /// some. The conductor protocol has no resume; the client reconnects and asks again.
    SlowConsumer(u64),
}

/// Messages queued for one client (answers and signals) before it counts as too slow.
pub const CLIENT_QUEUE: usize = 1024;

struct ClientSlot {
    tx: mpsc::Sender<WsMessage>,
    /// Set once the client is found too slow; wakes its connection task to close it.
    slow: Arc<SlowFlag>,
    /// The dialect of the client's latest request that showed one (signals follow it).
    dialect: Arc<Mutex<Dialect>>,
}

struct ServerInner {
    handlers: HashMap<String, Handler>,
    max_message_size: usize,
    dialect: Dialect,
    tokens: Option<Vec<Vec<u8>>>,
    authentication_timeout: Duration,
    allowed_origins: Option<Vec<String>>,
    cell_id: CellId,
    clients: Mutex<HashMap<u64, ClientSlot>>,
    next_client: AtomicU64,
    events: broadcast::Sender<ConductorServerEvent>,
    /// Set by [`ConductorServer::shutdown`]: listeners stop accepting.
    shutdown: watch::Sender<bool>,
}

/// Marks a client too slow, once, and wakes its connection task.
#[derive(Default)]
struct SlowFlag {
    set: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl ServerInner {
    /// Queues `msg` for client `id`; a full queue marks the client too slow (logged and
    /// reported once) instead of dropping the message quietly.
    fn offer(&self, id: u64, slot: &ClientSlot, msg: WsMessage) -> bool {
        match slot.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !slot.slow.set.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        client = id,
                        queue = CLIENT_QUEUE,
                        "conductor client too slow: closing it"
                    );
                    let _ = self.events.send(ConductorServerEvent::SlowConsumer(id));
                    slot.slow.wake.notify_one();
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A conductor-style WebSocket server.
#[derive(Clone)]
pub struct ConductorServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for ConductorServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConductorServer").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal_message(data: Vec<u8>) -> WsMessage {
    WsMessage::binary(WireMessage::Signal { data }.encode())
}

impl ConductorServer {
    /// Starts building a server.
    pub fn builder() -> ConductorServerBuilder {
        ConductorServerBuilder::default()
    }

    /// Server events from now on.
    pub fn events(&self) -> broadcast::Receiver<ConductorServerEvent> {
        self.inner.events.subscribe()
    }

    /// Listens on `addr` (`host:port`) with the network floor's default guards
    /// ([`ListenOptions`]: 10 s for the WebSocket upgrade, bounded pending upgrades, accept
    /// back-off, connection caps); returns the bound address.
    pub async fn listen(&self, addr: &str) -> Result<String, ConductorError> {
        self.listen_with(addr, &ListenOptions::default()).await
    }

    /// Listens on `addr` (`host:port`) on the network floor ([`StreamListener`]): the TLS
    /// handshake (with [`ListenOptions::tls`], i.e. `wss://`) and the WebSocket upgrade must
    /// finish within [`ListenOptions::handshake_timeout`]; pending upgrades are bounded (the
    /// oldest is evicted); accept errors such as `EMFILE` are backed off from, never fatal.
    /// Serves until [`shutdown`](Self::shutdown). Returns the bound address.
    pub async fn listen_with(
        &self,
        addr: &str,
        options: &ListenOptions,
    ) -> Result<String, ConductorError> {
        let endpoint = StreamEndpoint::parse_host_port(addr)
            .map_err(|e| ConductorError::Connect(format!("{addr}: {e}")))?;
        let config = ws_config(self.inner.max_message_size);
        let origins = Arc::new(self.inner.allowed_origins.clone());
        let upgrade = move |stream: ByteStream| {
            let origins = origins.clone();
            async move {
                let check = OriginCheck(origins.as_deref());
                tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
            }
        };
        let mut listener = StreamListener::bind_with(&endpoint, options, upgrade)
            .await
            .map_err(|e| ConductorError::Connect(format!("{addr}: {e}")))?;
        let local = listener.local_addr();
        let server = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => break,
                    accepted = listener.accept() => match accepted {
                        Some(Ok(ws)) => {
                            let server = server.clone();
                            tokio::spawn(async move { server.serve(ws).await });
                        }
                        // A failed upgrade or an accept error: the listener goes on.
                        Some(Err(e)) => tracing::debug!(error = %e, "conductor accept"),
                        None => break,
                    },
                }
            }
            // Dropping the listener closes its socket and aborts pending upgrades.
        });
        Ok(local)
    }

    /// Stops every listener of this server (no new connections; pending upgrades are aborted)
    /// and closes each connected client with 1001 (going away). Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let going_away = WsMessage::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "server shutting down".into(),
        }));
        for client in lock(&self.inner.clients).values() {
            if client.tx.try_send(going_away.clone()).is_err() {
                // No room for the close frame: its task closes it as a slow client instead.
                client.slow.wake.notify_one();
            }
        }
    }

    /// Clients connected (and authenticated, where required) now.
    pub fn clients(&self) -> Vec<u64> {
        lock(&self.inner.clients).keys().copied().collect()
    }

    /// Sends a signal with `payload` as is to one client; `false` if it is gone or too slow
    /// (then it is closed: [`ConductorServerEvent::SlowConsumer`]).
    pub fn signal(&self, client: u64, payload: &Value) -> bool {
        let msg = signal_message(to_bytes(payload));
        lock(&self.inner.clients)
            .get(&client)
            .is_some_and(|c| self.inner.offer(client, c, msg))
    }

    /// Sends a signal with `payload` as is to every client; returns how many got it.
    pub fn broadcast_signal(&self, payload: &Value) -> usize {
        let msg = signal_message(to_bytes(payload));
        lock(&self.inner.clients)
            .iter()
            .filter(|(id, c)| self.inner.offer(**id, c, msg.clone()))
            .count()
    }

    /// Sends an app signal from `zome_name` (on the server's cell) to one client, in its dialect.
    pub fn app_signal(&self, client: u64, zome_name: &str, signal: &Value) -> bool {
        let clients = lock(&self.inner.clients);
        clients.get(&client).is_some_and(|c| {
            let dialect = *lock(&c.dialect);
            let data = dialect.app_signal(&self.inner.cell_id, zome_name, signal);
            self.inner.offer(client, c, signal_message(data))
        })
    }

    /// Sends an app signal to every client, each in its dialect; returns how many got it.
    pub fn broadcast_app_signal(&self, zome_name: &str, signal: &Value) -> usize {
        self.broadcast_in_dialects(|d| d.app_signal(&self.inner.cell_id, zome_name, signal))
    }

    /// Sends a system signal to every client, each in its dialect (`{type:"system", value:
    /// signal}` or `{System: signal}`); returns how many got it. `signal` is tagged as the
    /// conductor's `SystemSignal` is, e.g. `{type:"successful_countersigning", value:<hash>}`.
    pub fn broadcast_system_signal(&self, signal: &Value) -> usize {
        self.broadcast_in_dialects(|d| d.system_signal(signal.clone()))
    }

    /// Sends the signal `encode` makes for each client's dialect (encoded once per dialect) to
    /// every client; returns how many got it.
    fn broadcast_in_dialects(&self, encode: impl Fn(Dialect) -> Vec<u8>) -> usize {
        let mut encoded: HashMap<Dialect, WsMessage> = HashMap::new();
        let clients = lock(&self.inner.clients);
        clients
            .iter()
            .filter(|(id, c)| {
                let dialect = *lock(&c.dialect);
                let msg = encoded
                    .entry(dialect)
                    .or_insert_with(|| signal_message(encode(dialect)));
                self.inner.offer(**id, c, msg.clone())
            })
            .count()
    }

    /// Serves one upgraded connection (see [`listen_with`](Self::listen_with)).
    async fn serve(&self, ws: WebSocketStream<ByteStream>) {
        let _open = crate::metrics::ConductorConnectionGuard::new();
        let id = self.inner.next_client.fetch_add(1, Ordering::Relaxed);
        let (mut sink, mut incoming) = ws.split();
        let bad = |error: InputError, closed: bool| {
            let _ = self.inner.events.send(ConductorServerEvent::BadInput {
                client: id,
                error,
                closed,
            });
        };
        if let Some(tokens) = &self.inner.tokens {
            let first = tokio::time::timeout(self.inner.authentication_timeout, async {
                loop {
                    match incoming.next().await {
                        Some(Ok(WsMessage::Binary(b))) => return Ok(b.to_vec()),
                        Some(Ok(WsMessage::Text(t))) => return Ok(t.as_bytes().to_vec()),
                        Some(Ok(WsMessage::Close(_))) | None => return Err(None),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(Some(InputError::WebSocket(Arc::new(e)))),
                    }
                }
            })
            .await;
            let refused = match first {
                Err(_) => Some(InputError::AuthenticationTimeout(
                    self.inner.authentication_timeout,
                )),
                Ok(Err(None)) => return,
                Ok(Err(Some(e))) => Some(e),
                Ok(Ok(bytes)) => match Envelope::decode(&bytes) {
                    Ok(Envelope::Authenticate { data }) => match authenticate_token(&data) {
                        Ok(token) if tokens.contains(&token) => None,
                        Ok(_) => Some(InputError::InvalidToken),
                        Err(e) => Some(e.into()),
                    },
                    Ok(Envelope::Message(m)) => Some(InputError::BeforeAuthenticate(kind_of(&m))),
                    Err(e) => Some(e.into()),
                },
            };
            if let Some(error) = refused {
                // A conductor drops the connection; a Close frame tells the client why.
                bad(error, true);
                let frame = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "not authenticated".into(),
                };
                let _ = sink.send(WsMessage::Close(Some(frame))).await;
                return;
            }
        }
        let (tx, mut outgoing) = mpsc::channel::<WsMessage>(CLIENT_QUEUE);
        let dialect = Arc::new(Mutex::new(self.inner.dialect));
        let slow = Arc::new(SlowFlag::default());
        lock(&self.inner.clients).insert(
            id,
            ClientSlot {
                tx: tx.clone(),
                dialect: dialect.clone(),
                slow: slow.clone(),
            },
        );
        let _ = self.inner.events.send(ConductorServerEvent::Connected(id));
        loop {
            let bytes = tokio::select! {
                () = slow.wake.notified() => {
                    let frame = CloseFrame {
                        code: CloseCode::Policy,
                        reason: "too slow: message queue full".into(),
                    };
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        sink.send(WsMessage::Close(Some(frame))),
                    )
                    .await;
                    break;
                }
                Some(msg) = outgoing.recv() => {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                    continue;
                }
                msg = incoming.next() => match msg {
                    Some(Ok(WsMessage::Binary(bytes))) => bytes.to_vec(),
                    // A conductor reads a text frame's bytes as MessagePack too.
                    Some(Ok(WsMessage::Text(text))) => text.as_bytes().to_vec(),
                    Some(Ok(WsMessage::Close(_))) | None => {
                        let _ = sink.close().await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let too_big = matches!(e, tungstenite::Error::Capacity(_));
                        bad(InputError::WebSocket(Arc::new(e)), true);
                        if too_big {
                            let frame = CloseFrame {
                                code: CloseCode::Size,
                                reason: "message too big".into(),
                            };
                            let _ = sink.send(WsMessage::Close(Some(frame))).await;
                        }
                        break;
                    }
                },
            };
            match Envelope::decode(&bytes) {
                Ok(Envelope::Message(WireMessage::Request { id: rid, data })) => {
                    self.dispatch(rid, data, &dialect, tx.clone())
                }
                // Only the first message may authenticate; later ones (or any on an interface
                // without tokens, like an admin interface) are ignored.
                Ok(Envelope::Authenticate { .. }) => {}
                Ok(Envelope::Message(other)) => bad(InputError::Unexpected(kind_of(&other)), false),
                // As a conductor: skip what does not decode, keep the connection.
                Err(e) => bad(e.into(), false),
            }
        }
        lock(&self.inner.clients).remove(&id);
        let _ = self
            .inner
            .events
            .send(ConductorServerEvent::Disconnected(id));
    }

    fn dispatch(
        &self,
        rid: u64,
        data: Vec<u8>,
        client_dialect: &Mutex<Dialect>,
        tx: mpsc::Sender<WsMessage>,
    ) {
        let respond = move |payload: Vec<u8>| {
            let msg = WireMessage::Response {
                id: rid,
                data: Some(payload),
            };
            WsMessage::binary(msg.encode())
        };
        let request = Payload::decode(&data);
        // Answer in the dialect asked in; a unit request (`{type}` alone) shows none.
        let dialect = {
            let mut current = lock(client_dialect);
            if let Some(d) = request.as_ref().ok().and_then(|p| p.dialect) {
                *current = d;
            }
            *current
        };
        let Payload {
            kind: method,
            content: args,
            ..
        } = match request {
            Ok(p) => p,
            Err(e) => {
                let message = format!("Failed to deserialize request: {e}");
                answer_later(tx, respond(dialect.error("deserialization", &message)));
                return;
            }
        };
        let Some(handler) = self.inner.handlers.get(&method).cloned() else {
            // As the conductor: a request it cannot deserialize into a known method.
            let message = format!("unknown request type '{method}'");
            answer_later(tx, respond(dialect.error("deserialization", &message)));
            return;
        };
        tokio::spawn(async move {
            let payload = match tokio::spawn(handler(args)).await {
                Ok(Ok(value)) => dialect.payload(&method, value),
                Ok(Err((kind, message))) => dialect.error(&kind, &message),
                Err(_) => dialect.error("internal_error", "handler panicked"),
            };
            let _ = tx.send(respond(payload)).await;
        });
    }
}

/// Queues an answer at once, in order; only when the queue is full does it wait for room from
/// its own task (the connection's loop, which calls this, is what drains the queue, so waiting
/// here could never end). An answer is never dropped.
fn answer_later(tx: mpsc::Sender<WsMessage>, msg: WsMessage) {
    if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
        tokio::spawn(async move {
            let _ = tx.send(msg).await;
        });
    }
}

/// The handshake's `Origin` check: with allowed origins set, one must be sent and listed (`"*"`
/// lists all); refusals are HTTP 400, as on a conductor.
struct OriginCheck<'a>(Option<&'a [String]>);

impl Callback for OriginCheck<'_> {
    fn on_request(
        self,
        request: &HandshakeRequest,
        response: HandshakeResponse,
    ) -> Result<HandshakeResponse, ErrorResponse> {
        let Some(allowed) = self.0 else {
            return Ok(response);
        };
        let why = match request.headers().get(http::header::ORIGIN) {
            None => "Missing `Origin` header",
            Some(origin) => {
                let origin = origin.to_str().unwrap_or_default();
                if allowed.iter().any(|a| a == "*" || a == origin) {
                    return Ok(response);
                }
                "Origin not allowed"
            }
        };
        let mut refusal = ErrorResponse::new(Some(why.to_owned()));
        *refusal.status_mut() = http::StatusCode::BAD_REQUEST;
        Err(refusal)
    }
}

fn kind_of(m: &WireMessage) -> &'static str {
    match m {
        WireMessage::Signal { .. } => "signal",
        WireMessage::Request { .. } => "request",
        WireMessage::Response { .. } => "response",
    }
}
