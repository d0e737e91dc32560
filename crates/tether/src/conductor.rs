//! Holochain conductor connections: MessagePack request/response/signal envelopes over
//! WebSocket binary messages (see [`tether_wire::conductor`] and `docs/conductor-wire.md`),
//! as Holochain conductors (0.1 to 0.7) and the npm clients `@whi/holochain-websocket`,
//! `@spartan-hc/holochain-websocket` and `@holochain/client` speak them.
//!
//! Payloads come in two [`Dialect`]s: `{type, value}` (Holochain 0.5+, the default) and
//! `{type, data}` (0.1–0.4). The client speaks the one in [`ConductorOptions::dialect`]; the
//! server answers each request in the dialect it was asked in.
//!
//! [`ConductorConnection`] is the client (the npm `Connection` class in Rust form);
//! [`ConductorServer`] routes requests to async handlers by method name and pushes signals.
//!
//! ```
//! use tether::conductor::{ConductorConnection, ConductorOptions, ConductorServer, Value};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tether::conductor::ConductorError> {
//! let server = ConductorServer::builder()
//!     .handler("answer", |_args| async { Ok(Value::from(42)) })
//!     .build();
//! let addr = server.listen("127.0.0.1:0").await?;
//! let conn = ConductorConnection::new(addr.as_str(), ConductorOptions::default())?;
//! conn.open(None).await?;
//! assert_eq!(conn.request("answer", Value::Nil, None).await?, Value::from(42));
//! assert_eq!(conn.close(None).await?, 1000);
//! # Ok(()) }
//! ```

use crate::transport::{client_config, TlsClientOptions};
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_wire::conductor::{
    authenticate_payload, authenticate_token, from_bytes, to_bytes, Envelope, Payload, WireError,
    WireMessage,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as HandshakeRequest, Response as HandshakeResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

pub use tether_wire::conductor::{CellId, Dialect, Value};

/// What can go wrong on a conductor connection.
#[derive(Debug, Clone, Error)]
pub enum ConductorError {
    /// The address is not a port, `host:port` or a `ws://`/`wss://` URL.
    #[error("invalid address: {0}")]
    InvalidAddress(String),
    /// An operation did not finish in time.
    #[error("timed out after {after:?} waiting to {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// Connecting (TCP, TLS or the WebSocket handshake) failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// The request was failed by [`ConductorConnection::flush`].
    #[error("request failed by flush")]
    Flushed,
    /// The peer answered with an error payload (`{type:"error",value:{type,value}}`, or `data`).
    #[error("{kind}: {message}")]
    Remote {
        /// The error kind (`internal_error`, `deserialization`, `ribosome_error`, …).
        kind: String,
        /// The message.
        message: String,
    },
    /// The peer cancelled the request (a response without data).
    #[error("request cancelled by the peer")]
    Cancelled,
    /// The peer sent something that is not a valid envelope.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A WebSocket or socket error.
    #[error("websocket: {0}")]
    WebSocket(String),
}

/// Kinds of envelope [`ConductorConnection::send`] can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A request (needs an id; its response is not awaited by `send`).
    Request,
    /// A response to the peer's request `id`.
    Response,
    /// A signal.
    Signal,
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
    /// Largest message accepted. Default 16 MiB.
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
            max_message_size: 16 << 20,
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

fn ws_config(max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

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
    let connect_err = |e: &dyn std::fmt::Display| ConductorError::Connect(format!("{uri}: {e}"));
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| connect_err(&e))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if parsed.scheme() == "wss" {
        let config = client_config(&options.tls).map_err(|e| connect_err(&e))?;
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| connect_err(&e))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| connect_err(&e))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let mut request = uri.into_client_request().map_err(|e| connect_err(&e))?;
    if let Some(origin) = &options.origin {
        let value = http::HeaderValue::from_str(origin).map_err(|e| connect_err(&e))?;
        request.headers_mut().insert(http::header::ORIGIN, value);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        io,
        Some(ws_config(options.max_message_size)),
    )
    .await
    .map_err(|e| connect_err(&e))?;
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
        let conn = ConductorConnection {
            name,
            uri,
            options,
            commands,
            opened,
            closed,
            signals: signals.clone(),
        };
        let parts = DriverParts {
            rx,
            opened: opened_tx,
            closed: closed_tx,
            signals,
            dialect,
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

    /// Signals from now on (each signal's decoded payload; see [`AppSignal::from_signal`]).
    pub fn signals(&self) -> broadcast::Receiver<Value> {
        self.signals.subscribe()
    }
}

struct DriverParts {
    rx: mpsc::Receiver<Command>,
    opened: watch::Sender<Option<Result<(), ConductorError>>>,
    closed: watch::Sender<Option<u16>>,
    signals: broadcast::Sender<Value>,
    dialect: Dialect,
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
                        let _ = reply.send(Err(ConductorError::WebSocket(format!(
                            "more than {MAX_PENDING} requests pending"
                        ))));
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
                    let _ = reply.send(sent.map_err(|e| ConductorError::WebSocket(e.to_string())));
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
                        Err(e) => tracing::debug!(error = %e, "undecodable signal"),
                    },
                    Ok(WireMessage::Request { id, .. }) => {
                        // Clients serve nothing: answer with an error rather than leave it hanging.
                        let error = parts.dialect.error("internal_error", "this client serves no requests");
                        let msg = WireMessage::Response { id, data: Some(error) };
                        let _ = sink.send(WsMessage::binary(msg.encode())).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "invalid envelope ignored"),
                },
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

// ---------------------------------------------------------------------------------------------
// Server

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
            }),
        }
    }
}

/// What happens on a [`ConductorServer`].
#[derive(Debug, Clone)]
pub enum ConductorServerEvent {
    /// A client connected (and authenticated, when the interface requires it).
    Connected(u64),
    /// A client sent something invalid; the connection was closed (`closed`) or the message
    /// skipped, as a conductor skips a frame it cannot decode.
    BadInput {
        /// The client.
        client: u64,
        /// What was wrong.
        error: String,
        /// Whether the connection was closed for it.
        closed: bool,
    },
    /// A client went away.
    Disconnected(u64),
}

struct ClientSlot {
    tx: mpsc::Sender<WsMessage>,
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

    /// Listens on `addr` (`host:port`); returns the bound address.
    pub async fn listen(&self, addr: &str) -> Result<String, ConductorError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| ConductorError::Connect(format!("{addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| ConductorError::Connect(e.to_string()))?
            .to_string();
        let server = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move { server.serve(stream).await });
            }
        });
        Ok(local)
    }

    /// Clients connected (and authenticated, where required) now.
    pub fn clients(&self) -> Vec<u64> {
        lock(&self.inner.clients).keys().copied().collect()
    }

    /// Sends a signal with `payload` as is to one client; `false` if it is gone or its queue is
    /// full.
    pub fn signal(&self, client: u64, payload: &Value) -> bool {
        let msg = signal_message(to_bytes(payload));
        lock(&self.inner.clients)
            .get(&client)
            .is_some_and(|c| c.tx.try_send(msg).is_ok())
    }

    /// Sends a signal with `payload` as is to every client; returns how many got it.
    pub fn broadcast_signal(&self, payload: &Value) -> usize {
        let msg = signal_message(to_bytes(payload));
        lock(&self.inner.clients)
            .values()
            .filter(|c| c.tx.try_send(msg.clone()).is_ok())
            .count()
    }

    /// Sends an app signal from `zome_name` (on the server's cell) to one client, in its dialect.
    pub fn app_signal(&self, client: u64, zome_name: &str, signal: &Value) -> bool {
        let clients = lock(&self.inner.clients);
        clients.get(&client).is_some_and(|c| {
            let dialect = *lock(&c.dialect);
            let data = dialect.app_signal(&self.inner.cell_id, zome_name, signal);
            c.tx.try_send(signal_message(data)).is_ok()
        })
    }

    /// Sends an app signal to every client, each in its dialect; returns how many got it.
    pub fn broadcast_app_signal(&self, zome_name: &str, signal: &Value) -> usize {
        let mut encoded: HashMap<Dialect, WsMessage> = HashMap::new();
        let clients = lock(&self.inner.clients);
        clients
            .values()
            .filter(|c| {
                let dialect = *lock(&c.dialect);
                let msg = encoded.entry(dialect).or_insert_with(|| {
                    signal_message(dialect.app_signal(&self.inner.cell_id, zome_name, signal))
                });
                c.tx.try_send(msg.clone()).is_ok()
            })
            .count()
    }

    async fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let config = ws_config(self.inner.max_message_size);
        let check = OriginCheck(self.inner.allowed_origins.as_deref());
        let Ok(ws) =
            tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
        else {
            return;
        };
        let id = self.inner.next_client.fetch_add(1, Ordering::Relaxed);
        let (mut sink, mut incoming) = ws.split();
        let bad = |error: String, closed: bool| {
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
                        Some(Err(e)) => return Err(Some(e.to_string())),
                    }
                }
            })
            .await;
            let refused = match first {
                Err(_) => Some(format!(
                    "no authenticate within {:?}",
                    self.inner.authentication_timeout
                )),
                Ok(Err(None)) => return,
                Ok(Err(Some(e))) => Some(e),
                Ok(Ok(bytes)) => match Envelope::decode(&bytes) {
                    Ok(Envelope::Authenticate { data }) => match authenticate_token(&data) {
                        Ok(token) if tokens.contains(&token) => None,
                        Ok(_) => Some("invalid token".into()),
                        Err(e) => Some(e.to_string()),
                    },
                    Ok(Envelope::Message(m)) => {
                        Some(format!("{} before authenticate", kind_of(&m)))
                    }
                    Err(e) => Some(e.to_string()),
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
        let (tx, mut outgoing) = mpsc::channel::<WsMessage>(1024);
        let dialect = Arc::new(Mutex::new(self.inner.dialect));
        lock(&self.inner.clients).insert(
            id,
            ClientSlot {
                tx: tx.clone(),
                dialect: dialect.clone(),
            },
        );
        let _ = self.inner.events.send(ConductorServerEvent::Connected(id));
        loop {
            let bytes = tokio::select! {
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
                        bad(e.to_string(), true);
                        if let tungstenite::Error::Capacity(_) = e {
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
                Ok(Envelope::Message(other)) => bad(
                    format!("unexpected {} from a client", kind_of(&other)),
                    false,
                ),
                // As a conductor: skip what does not decode, keep the connection.
                Err(e) => bad(e.to_string(), false),
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
                let _ = tx.try_send(respond(dialect.error("deserialization", &message)));
                return;
            }
        };
        let Some(handler) = self.inner.handlers.get(&method).cloned() else {
            // As the conductor: a request it cannot deserialize into a known method.
            let message = format!("unknown request type '{method}'");
            let _ = tx.try_send(respond(dialect.error("deserialization", &message)));
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
