//! Holochain conductor connections: MessagePack request/response/signal envelopes over
//! WebSocket binary messages (see [`tether_wire::conductor`] and `docs/conductor-wire.md`),
//! as the conductor and the npm client `@whi/holochain-websocket` speak them.
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
    error_payload, request_payload, response_payload, split_payload, to_bytes, WireError,
    WireMessage,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

pub use tether_wire::conductor::Value;

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
    /// The peer answered with an error payload (`{type:"error",data:{type,data}}`).
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

/// Client options. Defaults follow the npm client: 15 s timeout, host 127.0.0.1, `ws://`.
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
    Send(WireMessage, oneshot::Sender<Result<(), ConductorError>>),
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
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        uri,
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
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Send(msg, tx))
            .await
            .map_err(|_| ConductorError::Closed)?;
        rx.await.unwrap_or(Err(ConductorError::Closed))
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

    /// Signals from now on (each signal's decoded payload).
    pub fn signals(&self) -> broadcast::Receiver<Value> {
        self.signals.subscribe()
    }
}

struct DriverParts {
    rx: mpsc::Receiver<Command>,
    opened: watch::Sender<Option<Result<(), ConductorError>>>,
    closed: watch::Sender<Option<u16>>,
    signals: broadcast::Sender<Value>,
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

fn response_result(data: Option<Vec<u8>>) -> Result<Value, ConductorError> {
    let data = data.ok_or(ConductorError::Cancelled)?;
    let (kind, value) = split_payload(&data)?;
    if kind == "error" {
        let (kind, message) = match split_payload(&to_bytes(&value)) {
            Ok((k, Value::String(m))) => (k, m.into_str().unwrap_or_default()),
            Ok((k, other)) => (k, other.to_string()),
            Err(_) => ("unknown".into(), value.to_string()),
        };
        return Err(ConductorError::Remote { kind, message });
    }
    Ok(value)
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
                    let msg = WireMessage::Request { id, data: request_payload(&method, args) };
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
                    Ok(WireMessage::Signal { data }) => match tether_wire::conductor::from_bytes(&data) {
                        Ok(v) => { let _ = parts.signals.send(v); }
                        Err(e) => tracing::debug!(error = %e, "undecodable signal"),
                    },
                    Ok(WireMessage::Request { id, .. }) => {
                        // Clients serve nothing: answer with an error rather than leave it hanging.
                        let msg = WireMessage::Response { id, data: Some(error_payload("internal_error", "this client serves no requests")) };
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

/// Builds a [`ConductorServer`].
#[derive(Default)]
pub struct ConductorServerBuilder {
    handlers: HashMap<String, Handler>,
    max_message_size: Option<usize>,
}

impl ConductorServerBuilder {
    /// Routes requests of type `method` to `f`, which gets the request's `data` and returns the
    /// response data or `(error kind, message)`.
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

    /// Builds the server.
    pub fn build(self) -> ConductorServer {
        ConductorServer {
            inner: Arc::new(ServerInner {
                handlers: self.handlers,
                max_message_size: self.max_message_size.unwrap_or(16 << 20),
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
    /// A client connected.
    Connected(u64),
    /// A client sent something invalid; the connection was closed (`closed`) or the message
    /// dropped.
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

struct ServerInner {
    handlers: HashMap<String, Handler>,
    max_message_size: usize,
    clients: Mutex<HashMap<u64, mpsc::Sender<WsMessage>>>,
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

    /// Clients connected now.
    pub fn clients(&self) -> Vec<u64> {
        self.inner
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Sends a signal with `payload` to one client; `false` if it is gone or its queue is full.
    pub fn signal(&self, client: u64, payload: &Value) -> bool {
        let msg = WsMessage::binary(
            WireMessage::Signal {
                data: to_bytes(payload),
            }
            .encode(),
        );
        let clients = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .get(&client)
            .is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// Sends a signal to every client; returns how many got it.
    pub fn broadcast_signal(&self, payload: &Value) -> usize {
        let msg = WsMessage::binary(
            WireMessage::Signal {
                data: to_bytes(payload),
            }
            .encode(),
        );
        let clients = self.inner.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .values()
            .filter(|tx| tx.try_send(msg.clone()).is_ok())
            .count()
    }

    async fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let config = ws_config(self.inner.max_message_size);
        let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
            return;
        };
        let id = self.inner.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, mut outgoing) = mpsc::channel::<WsMessage>(1024);
        self.inner
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx.clone());
        let _ = self.inner.events.send(ConductorServerEvent::Connected(id));
        let (mut sink, mut incoming) = ws.split();
        let bad = |error: String, closed: bool| {
            let _ = self.inner.events.send(ConductorServerEvent::BadInput {
                client: id,
                error,
                closed,
            });
        };
        loop {
            tokio::select! {
                Some(msg) = outgoing.recv() => {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                msg = incoming.next() => match msg {
                    Some(Ok(WsMessage::Binary(bytes))) => match WireMessage::decode(&bytes) {
                        Ok(WireMessage::Request { id: rid, data }) => self.dispatch(rid, data, tx.clone()),
                        Ok(other) => bad(format!("unexpected {:?} from a client", kind_of(&other)), false),
                        Err(e) => {
                            // Not an envelope at all: the peer does not speak the protocol.
                            bad(e.to_string(), true);
                            let frame = CloseFrame { code: CloseCode::Protocol, reason: "invalid envelope".into() };
                            let _ = sink.send(WsMessage::Close(Some(frame))).await;
                            break;
                        }
                    },
                    Some(Ok(WsMessage::Text(_))) => {
                        bad("text message; the protocol is binary".into(), true);
                        let frame = CloseFrame { code: CloseCode::Unsupported, reason: "binary messages only".into() };
                        let _ = sink.send(WsMessage::Close(Some(frame))).await;
                        break;
                    }
                    Some(Ok(WsMessage::Close(_))) | None => {
                        let _ = sink.close().await;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        bad(e.to_string(), true);
                        break;
                    }
                },
            }
        }
        self.inner
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let _ = self
            .inner
            .events
            .send(ConductorServerEvent::Disconnected(id));
    }

    fn dispatch(&self, rid: u64, data: Vec<u8>, tx: mpsc::Sender<WsMessage>) {
        let respond = move |payload: Vec<u8>| {
            let msg = WireMessage::Response {
                id: rid,
                data: Some(payload),
            };
            WsMessage::binary(msg.encode())
        };
        let (method, args) = match split_payload(&data) {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.try_send(respond(error_payload("deserialization", &e.to_string())));
                return;
            }
        };
        let Some(handler) = self.inner.handlers.get(&method).cloned() else {
            // As the conductor: a request it cannot deserialize into a known method.
            let message = format!("unknown request type '{method}'");
            let _ = tx.try_send(respond(error_payload("deserialization", &message)));
            return;
        };
        tokio::spawn(async move {
            let payload = match tokio::spawn(handler(args)).await {
                Ok(Ok(value)) => response_payload(&method, value),
                Ok(Err((kind, message))) => error_payload(&kind, &message),
                Err(_) => error_payload("internal_error", "handler panicked"),
            };
            let _ = tx.send(respond(payload)).await;
        });
    }
}

fn kind_of(m: &WireMessage) -> &'static str {
    match m {
        WireMessage::Signal { .. } => "signal",
        WireMessage::Request { .. } => "request",
        WireMessage::Response { .. } => "response",
    }
}
