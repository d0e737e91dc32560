//! The client: [`ConductorConnection`], the seed's `Connection` in Rust form.

use super::{ws_config, CellId, ConductorError, DialStage, Dialect, Value};
use crate::transport::{self, DialOptions, FloorError, StreamEndpoint, TlsClientOptions};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_wire::conductor::{
    authenticate_payload, from_bytes, to_bytes, Envelope, Payload, WireError, WireMessage,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// Kinds of envelope [`ConductorConnection::send`] can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageKind {
    /// A request (needs an id; its response is not awaited by `send`).
    Request,
    /// A response to the peer's request `id`.
    Response,
    /// A signal.
    Signal,
    /// `authenticate` (its payload is `{token: [u8…]}`; see
    /// [`ConductorConnection::authenticate`]).
    Authenticate,
}

/// Client options. Defaults follow the npm clients (15 s timeout, host 127.0.0.1, `ws://`) and
/// today's conductor (`{type, value}` payloads, an `Origin` header, which conductors since 0.3
/// require).
#[derive(Debug, Clone)]
pub struct ConductorOptions {
    /// A name for logs; defaults to a process-wide connection counter.
    pub name: Option<String>,
    /// Default timeout of `open`, `close` and `request`. Default 15 s.
    pub timeout: Duration,
    /// Host used when the address is a bare port. Default `127.0.0.1`.
    pub host: String,
    /// Use `wss://` when the address has no scheme. Default `false`.
    pub secure: bool,
    /// TLS trust for `wss://`.
    pub tls: TlsClientOptions,
    /// Largest message (and frame) accepted from the peer. Default 64 MiB, a conductor's own
    /// limit for messages (`holochain_websocket`'s default), so any answer a conductor can
    /// send is received; decoding it is bounded by the budget of
    /// [`tether_wire::conductor::decode_budget`] (about 4× its size).
    pub max_message_size: usize,
    /// The payload convention spoken. Default [`Dialect::Value`] (Holochain 0.5+).
    pub dialect: Dialect,
    /// The `Origin` header of the WebSocket handshake (`None`: no header). Default `"tether"`.
    pub origin: Option<String>,
}

impl Default for ConductorOptions {
    fn default() -> Self {
        ConductorOptions {
            name: None,
            timeout: Duration::from_secs(15),
            host: "127.0.0.1".into(),
            secure: false,
            tls: TlsClientOptions::default(),
            max_message_size: 64 << 20,
            dialect: Dialect::Value,
            origin: Some("tether".into()),
        }
    }
}

/// Where to connect: a port (on [`ConductorOptions::host`]), `host:port`, or a full URL.
#[derive(Debug, Clone)]
pub enum ConductorAddress {
    /// A TCP port.
    Port(u16),
    /// `host:port` or `ws://…` / `wss://…`.
    Address(String),
}

impl From<u16> for ConductorAddress {
    fn from(port: u16) -> Self {
        ConductorAddress::Port(port)
    }
}

impl From<&str> for ConductorAddress {
    fn from(a: &str) -> Self {
        ConductorAddress::Address(a.to_owned())
    }
}

impl From<String> for ConductorAddress {
    fn from(a: String) -> Self {
        ConductorAddress::Address(a)
    }
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Most requests awaiting a response on one connection; more fail at once.
const MAX_PENDING: usize = 65_536;

/// Something a WebSocket can run over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Command {
    Request {
        method: String,
        args: Value,
        reply: oneshot::Sender<Result<Value, ConductorError>>,
    },
    Send(Envelope, oneshot::Sender<Result<(), ConductorError>>),
    /// Drop pending requests whose callers gave up (timed out).
    Forget,
    Flush(oneshot::Sender<usize>),
    Close,
}

/// A client connection to a conductor-style server.
#[derive(Clone)]
pub struct ConductorConnection {
    name: String,
    uri: String,
    options: ConductorOptions,
    commands: mpsc::Sender<Command>,
    /// `None` while connecting; then `Ok` when open or the connect error.
    opened: watch::Receiver<Option<Result<(), ConductorError>>>,
    /// The close code once closed.
    closed: watch::Receiver<Option<u16>>,
    signals: broadcast::Sender<Value>,
    /// Frames skipped because they did not decode (shared with the driver).
    skipped: Arc<AtomicU64>,
}

impl std::fmt::Debug for ConductorConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConductorConnection")
            .field("name", &self.name)
            .field("uri", &self.uri)
            .finish()
    }
}

fn uri_for(
    address: ConductorAddress,
    options: &ConductorOptions,
) -> Result<String, ConductorError> {
    let scheme = if options.secure { "wss://" } else { "ws://" };
    let uri = match address {
        ConductorAddress::Port(0) => {
            return Err(ConductorError::InvalidAddress("port 0".into()));
        }
        ConductorAddress::Port(port) => format!("{scheme}{}:{port}", options.host),
        ConductorAddress::Address(a) if a.contains("://") => a,
        ConductorAddress::Address(a) => format!("{scheme}{a}"),
    };
    let parsed =
        url::Url::parse(&uri).map_err(|e| ConductorError::InvalidAddress(format!("{uri}: {e}")))?;
    if !matches!(parsed.scheme(), "ws" | "wss") || parsed.host_str().is_none() {
        return Err(ConductorError::InvalidAddress(uri));
    }
    Ok(uri)
}

async fn dial(
    uri: &str,
    options: &ConductorOptions,
) -> Result<WebSocketStream<Box<dyn Io>>, ConductorError> {
    let parsed = url::Url::parse(uri).map_err(|e| ConductorError::InvalidAddress(e.to_string()))?;
    let host = parsed
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let fail =
        |stage: DialStage, source: Box<dyn std::error::Error + Send + Sync>| ConductorError::Dial {
            uri: uri.to_owned(),
            stage,
            source: source.into(),
        };
    // The network floor dials: connect deadline, and TLS verifying
    // `TlsClientOptions::server_name` when given (else the URL's host).
    let mut dial_options = DialOptions::builder().connect_timeout(options.timeout);
    if parsed.scheme() == "wss" {
        dial_options = dial_options.tls(options.tls.clone());
    }
    let stream = transport::dial(&StreamEndpoint::tcp(host, port), &dial_options.build())
        .await
        .map_err(|e| {
            let stage = match e {
                FloorError::TlsConfig(_) | FloorError::TlsHandshake(_) => DialStage::Tls,
                _ => DialStage::Tcp,
            };
            fail(stage, e.into())
        })?;
    let io: Box<dyn Io> = Box::new(stream);
    let mut request = uri
        .into_client_request()
        .map_err(|e| fail(DialStage::WebSocket, e.into()))?;
    if let Some(origin) = &options.origin {
        let value = http::HeaderValue::from_str(origin)
            .map_err(|e| fail(DialStage::WebSocket, e.into()))?;
        request.headers_mut().insert(http::header::ORIGIN, value);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        io,
        Some(ws_config(options.max_message_size)),
    )
    .await
    .map_err(|e| fail(DialStage::WebSocket, e.into()))?;
    Ok(ws)
}

impl ConductorConnection {
    /// Starts connecting to `address` (a port, `host:port`, or a `ws://`/`wss://` URL). Await
    /// [`ConductorConnection::open`] before relying on it; requests wait for it too.
    pub fn new(
        address: impl Into<ConductorAddress>,
        options: ConductorOptions,
    ) -> Result<ConductorConnection, ConductorError> {
        let uri = uri_for(address.into(), &options)?;
        let (conn, parts) = Self::handle(uri.clone(), options.clone());
        tokio::spawn(async move {
            match dial(&uri, &options).await {
                Ok(ws) => drive(ws, parts).await,
                Err(e) => parts.fail_open(e),
            }
        });
        Ok(conn)
    }

    /// Wraps an already open WebSocket (the seed's "existing WebSocket").
    pub fn from_websocket<S>(
        ws: WebSocketStream<S>,
        options: ConductorOptions,
    ) -> ConductorConnection
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (conn, parts) = Self::handle("(existing websocket)".into(), options);
        tokio::spawn(drive(ws, parts));
        conn
    }

    fn handle(uri: String, options: ConductorOptions) -> (ConductorConnection, DriverParts) {
        let n = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let name = match &options.name {
            Some(name) => format!("{n}:{name}"),
            None => n.to_string(),
        };
        let dialect = options.dialect;
        let (commands, rx) = mpsc::channel(1024);
        let (opened_tx, opened) = watch::channel(None);
        let (closed_tx, closed) = watch::channel(None);
        let signals = broadcast::channel(1024).0;
        let skipped = Arc::new(AtomicU64::new(0));
        let conn = ConductorConnection {
            name,
            uri,
            options,
            commands,
            opened,
            closed,
            signals: signals.clone(),
            skipped: skipped.clone(),
        };
        let parts = DriverParts {
            rx,
            opened: opened_tx,
            closed: closed_tx,
            signals,
            dialect,
            skipped,
        };
        (conn, parts)
    }

    /// This connection's name (`<counter>` or `<counter>:<options.name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    async fn within<T>(
        &self,
        timeout: Option<Duration>,
        what: &str,
        f: impl Future<Output = Result<T, ConductorError>>,
    ) -> Result<T, ConductorError> {
        let after = timeout.unwrap_or(self.options.timeout);
        tokio::time::timeout(after, f).await.unwrap_or_else(|_| {
            Err(ConductorError::Timeout {
                what: what.to_owned(),
                after,
            })
        })
    }

    /// Waits until the WebSocket is open (default timeout: the connection's).
    pub async fn open(&self, timeout: Option<Duration>) -> Result<(), ConductorError> {
        let mut opened = self.opened.clone();
        self.within(timeout, "open the WebSocket", async move {
            match opened.wait_for(Option::is_some).await {
                Ok(state) => state.clone().unwrap_or(Err(ConductorError::Closed)),
                Err(_) => Err(ConductorError::Closed),
            }
        })
        .await
    }

    /// Closes (status 1000) and waits for the close; returns the close code.
    pub async fn close(&self, timeout: Option<Duration>) -> Result<u16, ConductorError> {
        let _ = self.commands.send(Command::Close).await;
        let mut closed = self.closed.clone();
        self.within(timeout, "close the WebSocket", async move {
            match closed.wait_for(Option::is_some).await {
                Ok(code) => Ok(code.unwrap_or(1006)),
                Err(_) => Ok(1006),
            }
        })
        .await
    }

    /// Fails every pending request with [`ConductorError::Flushed`]; returns how many.
    pub async fn flush(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Flush(tx)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Sends one envelope: `payload` is MessagePack-encoded into `data`. Requests need an `id`
    /// (their response is not awaited here; see [`ConductorConnection::request`]).
    pub async fn send(
        &self,
        kind: MessageKind,
        payload: Value,
        id: Option<u64>,
    ) -> Result<(), ConductorError> {
        let data = to_bytes(&payload);
        let msg = match (kind, id) {
            (MessageKind::Authenticate, _) => {
                return self.send_envelope(Envelope::Authenticate { data }).await;
            }
            (MessageKind::Signal, _) => WireMessage::Signal { data },
            (MessageKind::Request, Some(id)) => WireMessage::Request { id, data },
            (MessageKind::Response, Some(id)) => WireMessage::Response {
                id,
                data: Some(data),
            },
            (_, None) => {
                return Err(ConductorError::Wire(WireError::MissingId(
                    "request or response",
                )))
            }
        };
        self.send_envelope(Envelope::Message(msg)).await
    }

    async fn send_envelope(&self, envelope: Envelope) -> Result<(), ConductorError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Send(envelope, tx))
            .await
            .map_err(|_| ConductorError::Closed)?;
        rx.await.unwrap_or(Err(ConductorError::Closed))
    }

    /// Sends `authenticate` with `token` (`{token: [u8…]}`, the conductor's encoding). App
    /// interfaces require it as the first message, within 10 s; a conductor answers a bad token
    /// by closing the connection, so nothing is awaited here (as in the npm clients).
    pub async fn authenticate(&self, token: &[u8]) -> Result<(), ConductorError> {
        let data = authenticate_payload(token);
        self.send_envelope(Envelope::Authenticate { data }).await
    }

    /// Calls `method` with `args` and returns the response's data. Fails with
    /// [`ConductorError::Remote`] on an error payload and [`ConductorError::Timeout`] after
    /// `timeout` (default: the connection's), which also forgets the request.
    pub async fn request(
        &self,
        method: &str,
        args: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, ConductorError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Request {
                method: method.to_owned(),
                args,
                reply,
            })
            .await
            .map_err(|_| ConductorError::Closed)?;
        let after = timeout.unwrap_or(self.options.timeout);
        match tokio::time::timeout(after, rx).await {
            Ok(result) => result.unwrap_or(Err(ConductorError::Closed)),
            Err(_) => {
                // The id is only known to the driver; it forgets the oldest expired ones.
                let _ = self.commands.try_send(Command::Forget);
                Err(ConductorError::Timeout {
                    what: format!("get response for request '{method}'"),
                    after,
                })
            }
        }
    }

    /// Signals from now on (each signal's decoded payload; see [`ConductorSignal::from_payload`]
    /// and [`AppSignal::from_signal`]). The channel keeps the latest 1024; a receiver that falls
    /// further behind gets `Lagged(n)`.
    pub fn signals(&self) -> broadcast::Receiver<Value> {
        self.signals.subscribe()
    }

    /// How many frames from the peer were skipped because they did not decode (an invalid
    /// envelope, a signal whose payload is not MessagePack, a text frame). As on a conductor,
    /// such a frame is not fatal: the connection stays open; each is also logged at WARN.
    pub fn skipped_frames(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

/// A signal payload read by its shape (the conductor's `Signal` enum, in either dialect).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConductorSignal {
    /// `{type:"app", value:{…}}` or `{App:{…}}`, with the app's signal decoded.
    App(AppSignal),
    /// `{type:"system", value}` or `{System: value}`: the conductor's `SystemSignal` (for
    /// example `{type:"successful_countersigning", value:<entry hash>}`).
    System(Value),
    /// Anything else (a newer kind such as `app_direct`, or a non-conductor server's own
    /// shape), as it came.
    Other(Value),
}

impl ConductorSignal {
    /// Reads a signal payload as delivered by [`ConductorConnection::signals`].
    pub fn from_payload(payload: &Value) -> ConductorSignal {
        if let Some(app) = AppSignal::from_signal(payload) {
            return ConductorSignal::App(app);
        }
        let entries = payload.as_map().map(Vec::as_slice).unwrap_or_default();
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
        };
        if get("type").and_then(Value::as_str) == Some("system") {
            if let Some(value) = get("value").or_else(|| get("data")) {
                return ConductorSignal::System(value.clone());
            }
        }
        match (entries.len(), get("System")) {
            (1, Some(value)) => ConductorSignal::System(value.clone()),
            _ => ConductorSignal::Other(payload.clone()),
        }
    }
}

struct DriverParts {
    rx: mpsc::Receiver<Command>,
    opened: watch::Sender<Option<Result<(), ConductorError>>>,
    closed: watch::Sender<Option<u16>>,
    signals: broadcast::Sender<Value>,
    dialect: Dialect,
    skipped: Arc<AtomicU64>,
}

/// An app signal: `{type:"app", value:{cell_id, zome_name, signal}}` (0.5+) or `{App:{…}}`
/// (0.1–0.4), with the nested `signal` bytes decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSignal {
    /// The cell that emitted it.
    pub cell_id: CellId,
    /// The zome that emitted it.
    pub zome_name: String,
    /// The app's signal, decoded from its MessagePack bytes.
    pub signal: Value,
}

impl AppSignal {
    /// Reads a signal payload as an app signal; `None` for a system or unknown signal.
    pub fn from_signal(payload: &Value) -> Option<AppSignal> {
        let entries = payload.as_map()?;
        let get = |m: &[(Value, Value)], key: &str| {
            m.iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone())
        };
        let body = match get(entries, "App") {
            Some(body) => body,
            None if get(entries, "type")?.as_str() == Some("app") => get(entries, "value")?,
            None => return None,
        };
        let body = body.as_map()?;
        let cell = get(body, "cell_id")?;
        let [dna, agent] = cell.as_array()?.as_slice() else {
            return None;
        };
        let bytes = |v: &Value| match v {
            Value::Binary(b) => Some(b.clone()),
            _ => None,
        };
        let signal = match get(body, "signal")? {
            Value::Binary(b) => from_bytes(&b).ok()?,
            _ => return None,
        };
        Some(AppSignal {
            cell_id: CellId {
                dna_hash: bytes(dna)?,
                agent_pub_key: bytes(agent)?,
            },
            zome_name: get(body, "zome_name")?.as_str()?.to_owned(),
            signal,
        })
    }
}

impl DriverParts {
    /// Counts and logs a frame that did not decode; the connection goes on, as a conductor's.
    fn skip(&self, what: &str, error: &dyn std::fmt::Display) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "{what} skipped");
    }

    fn fail_open(mut self, error: ConductorError) {
        let _ = self.opened.send(Some(Err(error)));
        let _ = self.closed.send(Some(1006));
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            fail_command(cmd);
        }
    }
}

fn fail_command(cmd: Command) {
    match cmd {
        Command::Request { reply, .. } => {
            let _ = reply.send(Err(ConductorError::Closed));
        }
        Command::Send(_, reply) => {
            let _ = reply.send(Err(ConductorError::Closed));
        }
        Command::Flush(tx) => {
            let _ = tx.send(0);
        }
        _ => {}
    }
}

/// A response's result, read from `value` or `data` whichever dialect was asked: a peer that
/// answers in the other one is still understood.
fn response_result(data: Option<Vec<u8>>) -> Result<Value, ConductorError> {
    let data = data.ok_or(ConductorError::Cancelled)?;
    let payload = Payload::decode(&data)?;
    if payload.kind == "error" {
        let (kind, message) = match Payload::from_value(payload.content.clone()) {
            Ok(Payload {
                kind,
                content: Value::String(m),
                ..
            }) => (kind, m.into_str().unwrap_or_default()),
            Ok(Payload { kind, content, .. }) => (kind, content.to_string()),
            Err(_) => ("unknown".into(), payload.content.to_string()),
        };
        return Err(ConductorError::Remote { kind, message });
    }
    Ok(payload.content)
}

async fn drive<S>(ws: WebSocketStream<S>, mut parts: DriverParts)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _ = parts.opened.send(Some(Ok(())));
    let (mut sink, mut stream) = ws.split();
    let mut pending: HashMap<u64, oneshot::Sender<Result<Value, ConductorError>>> = HashMap::new();
    let mut next_id = 0u64;
    let mut code = 1006u16;
    loop {
        tokio::select! {
            cmd = parts.rx.recv() => match cmd {
                None | Some(Command::Close) => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "closing".into() };
                    let _ = sink.send(WsMessage::Close(Some(frame))).await;
                    // Wait for the peer's close frame (bounded), as a close handshake does.
                    let peer = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(m)) = stream.next().await {
                            if let WsMessage::Close(f) = m {
                                return f.map_or(1005, |f| u16::from(f.code));
                            }
                        }
                        1006
                    });
                    code = peer.await.unwrap_or(1006);
                    break;
                }
                Some(Command::Request { method, args, reply }) => {
                    if pending.len() >= MAX_PENDING {
                        let _ = reply.send(Err(ConductorError::TooManyPending { limit: MAX_PENDING }));
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let msg = WireMessage::Request { id, data: parts.dialect.payload(&method, args) };
                    if sink.send(WsMessage::binary(msg.encode())).await.is_err() {
                        let _ = reply.send(Err(ConductorError::Closed));
                        break;
                    }
                    pending.insert(id, reply);
                }
                Some(Command::Send(msg, reply)) => {
                    let sent = sink.send(WsMessage::binary(msg.encode())).await;
                    let _ = reply.send(sent.map_err(|e| ConductorError::WebSocket(Arc::new(e))));
                }
                Some(Command::Forget) => pending.retain(|_, r| !r.is_closed()),
                Some(Command::Flush(tx)) => {
                    let n = pending.len();
                    for (_, r) in pending.drain() {
                        let _ = r.send(Err(ConductorError::Flushed));
                    }
                    let _ = tx.send(n);
                }
            },
            incoming = stream.next() => match incoming {
                Some(Ok(WsMessage::Binary(bytes))) => match WireMessage::decode(&bytes) {
                    Ok(WireMessage::Response { id, data }) => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(response_result(data));
                        } else {
                            tracing::debug!(id, "response to no pending request");
                        }
                    }
                    Ok(WireMessage::Signal { data }) => match from_bytes(&data) {
                        Ok(v) => { let _ = parts.signals.send(v); }
                        Err(e) => parts.skip("undecodable signal", &e),
                    },
                    Ok(WireMessage::Request { id, .. }) => {
                        // Clients serve nothing: answer with an error rather than leave it hanging.
                        let error = parts.dialect.error("internal_error", "this client serves no requests");
                        let msg = WireMessage::Response { id, data: Some(error) };
                        let _ = sink.send(WsMessage::binary(msg.encode())).await;
                    }
                    Err(e) => parts.skip("invalid envelope", &e),
                },
                // A conductor would read a text frame's bytes as MessagePack; no conductor
                // sends one, so it is skipped (and counted).
                Some(Ok(WsMessage::Text(_))) => parts.skip("text frame", &"not binary"),
                Some(Ok(WsMessage::Close(frame))) => {
                    code = frame.map_or(1005, |f| u16::from(f.code));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let _ = parts.closed.send(Some(code));
    parts.rx.close();
    for (_, r) in pending.drain() {
        let _ = r.send(Err(ConductorError::Closed));
    }
    while let Ok(cmd) = parts.rx.try_recv() {
        fail_command(cmd);
    }
}
