//! Listeners: accept connections on any endpoint kind and hand out ready [`Transport`]s.

use super::nul::nul_transport;
use super::ws::{accept_ws, ws_config, ws_transport, DEFAULT_FRAGMENT_SIZE};
use super::{Endpoint, Transport, TransportError, TransportInfo, TransportKind};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Settings for [`Listener::bind`].
#[derive(Clone)]
pub struct ListenerOptions {
    /// Certificate and key for `jstps://` and `wss://` listeners (see
    /// [`super::server_config`]). Required for those kinds, ignored by the others.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest incoming message in bytes. Default [`tether_wire::DEFAULT_MAX_MESSAGE_SIZE`]
    /// (8 MiB, as upstream).
    pub max_message_size: usize,
    /// Time a new connection gets to finish its TLS and/or HTTP upgrade handshake before it is
    /// dropped. Default 10 s. (The JSTP handshake that follows is the server's business.)
    pub handshake_timeout: Duration,
    /// WebSocket messages longer than this go out as fragments of at most this many bytes.
    /// Default 16 KiB; clamped below 1 MiB.
    pub ws_fragment_size: usize,
    /// At most this many TLS/HTTP handshakes run at once; beyond it the listener stops
    /// accepting until one finishes. Default 1024.
    pub max_pending_handshakes: usize,
    /// Established transports waiting for [`Listener::accept`]. Default 64.
    pub accept_queue: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            tls: None,
            max_message_size: tether_wire::DEFAULT_MAX_MESSAGE_SIZE,
            handshake_timeout: Duration::from_secs(10),
            ws_fragment_size: DEFAULT_FRAGMENT_SIZE,
            max_pending_handshakes: 1024,
            accept_queue: 64,
        }
    }
}

impl ListenerOptions {
    /// Sets the TLS server configuration.
    pub fn with_tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the maximum incoming message size.
    pub fn with_max_message_size(mut self, max: usize) -> Self {
        self.max_message_size = max;
        self
    }
}

impl fmt::Debug for ListenerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerOptions")
            .field("tls", &self.tls.as_ref().map(|_| "ServerConfig"))
            .field("max_message_size", &self.max_message_size)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("ws_fragment_size", &self.ws_fragment_size)
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field("accept_queue", &self.accept_queue)
            .finish()
    }
}

type Accepted = Result<Transport, TransportError>;

/// A bound listener. Accepting, TLS and HTTP-upgrade handshakes run in background tasks (each
/// handshake in its own, bounded by [`ListenerOptions::handshake_timeout`]), so a slow client
/// never holds up the others.
///
/// Dropping the listener (or [`Listener::close`]) stops accepting and aborts handshakes in
/// progress; a Unix listener then removes its socket file.
pub struct Listener {
    rx: Option<mpsc::Receiver<Accepted>>,
    task: Option<JoinHandle<()>>,
    local_addr: String,
    kind: TransportKind,
    /// The socket file and its identity, removed on close if it is still ours.
    unix_socket: Option<(PathBuf, u64, u64)>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("kind", &self.kind)
            .field("local_addr", &self.local_addr)
            .field("open", &self.rx.is_some())
            .finish()
    }
}

enum RawListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum RawConn {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl RawListener {
    async fn accept(&self) -> io::Result<RawConn> {
        match self {
            RawListener::Tcp(l) => l.accept().await.map(|(s, a)| RawConn::Tcp(s, a)),
            RawListener::Unix(l) => l.accept().await.map(|(s, _)| RawConn::Unix(s)),
        }
    }
}

/// What every connection of one listener needs.
struct Shared {
    kind: TransportKind,
    local_addr: String,
    options: ListenerOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listener {
    /// Binds `endpoint`: `jstp://`, `jstps://`, `ws://`, `wss://` on `host:port` (port 0 picks
    /// a free port; a WebSocket URL's path is ignored, every path is served), or `unix:` on a
    /// path. A stale Unix socket file (nobody listening) is replaced; a live one or a non-socket
    /// file at the path is an error.
    pub async fn bind(
        endpoint: &Endpoint,
        options: &ListenerOptions,
    ) -> Result<Listener, TransportError> {
        let kind = endpoint.kind();
        let tls = match kind {
            TransportKind::Tls | TransportKind::Wss => {
                let config = options.tls.clone().ok_or_else(|| {
                    TransportError::Tls(format!(
                        "a {endpoint} listener needs a TLS certificate (ListenerOptions::tls)"
                    ))
                })?;
                Some(tokio_rustls::TlsAcceptor::from(config))
            }
            _ => None,
        };
        let (raw, local_addr, unix_socket) = match endpoint {
            Endpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                (
                    RawListener::Unix(listener),
                    path.display().to_string(),
                    Some((path.clone(), meta.dev(), meta.ino())),
                )
            }
            _ => {
                let (host, port) = endpoint.host_port().ok_or_else(|| {
                    TransportError::InvalidAddress(format!("{endpoint}: no host to bind"))
                })?;
                let listener = TcpListener::bind((host.as_str(), port)).await?;
                let addr = listener.local_addr()?.to_string();
                (RawListener::Tcp(listener), addr, None)
            }
        };
        let (tx, rx) = mpsc::channel(options.accept_queue.max(1));
        let shared = Arc::new(Shared {
            kind,
            local_addr: local_addr.clone(),
            options: options.clone(),
            tls,
        });
        let task = tokio::spawn(accept_loop(raw, shared, tx));
        Ok(Listener {
            rx: Some(rx),
            task: Some(task),
            local_addr,
            kind,
            unix_socket,
        })
    }

    /// The bound address: `ip:port` (the actual port when bound to port 0), or the socket path.
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// The kind of transports this listener produces.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The next established transport, or `Some(Err(_))` for a connection that failed its
    /// TLS/HTTP handshake or an accept error (the listener keeps going). `None` only after
    /// [`close`](Self::close). Cancel-safe.
    pub async fn accept(&mut self) -> Option<Result<Transport, TransportError>> {
        self.rx.as_mut()?.recv().await
    }

    /// Stops accepting, aborts handshakes in progress, drops transports not yet accepted, and
    /// removes a Unix socket file. Idempotent.
    pub fn close(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.rx = None;
        if let Some((path, dev, ino)) = self.unix_socket.take() {
            // Only remove the file if it is still the socket we created.
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.dev() == dev && meta.ino() == ino {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

async fn remove_stale_socket(path: &Path) -> Result<(), TransportError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            )
            .into()),
            Err(_) => {
                tracing::debug!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)?;
                Ok(())
            }
        },
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )
        .into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Errors that concern one connection only; anything else (e.g. out of file descriptors) is
/// reported and briefly backed off from.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn accept_loop(raw: RawListener, shared: Arc<Shared>, tx: mpsc::Sender<Accepted>) {
    let needs_handshake = !matches!(shared.kind, TransportKind::Tcp | TransportKind::Unix);
    let max_pending = shared.options.max_pending_handshakes.max(1);
    // Dropping the set (when this task is aborted) aborts the handshakes.
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = raw.accept(), if handshakes.len() < max_pending => match accepted {
                Ok(conn) if needs_handshake => {
                    let shared = shared.clone();
                    let tx = tx.clone();
                    handshakes.spawn(async move {
                        let result = tokio::time::timeout(
                            shared.options.handshake_timeout,
                            establish(conn, &shared),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(TransportError::Timeout(format!(
                                "{:?} handshake not finished within {:?}",
                                shared.kind, shared.options.handshake_timeout
                            )))
                        });
                        let _ = tx.send(result).await;
                    });
                }
                Ok(conn) => {
                    let result = establish(conn, &shared).await;
                    if tx.send(result).await.is_err() {
                        return;
                    }
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    if tx.send(Err(e.into())).await.is_err() {
                        return;
                    }
                    // Typically EMFILE: give connections a moment to close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Turns an accepted socket into a transport (TLS and/or HTTP upgrade as the kind requires).
async fn establish(conn: RawConn, shared: &Shared) -> Result<Transport, TransportError> {
    let options = &shared.options;
    let max = options.max_message_size;
    match conn {
        RawConn::Unix(stream) => {
            let remote_addr = stream
                .peer_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
            let info = TransportInfo {
                kind: TransportKind::Unix,
                local_addr: Some(shared.local_addr.clone()),
                remote_addr,
            };
            let (r, w) = stream.into_split();
            Ok(nul_transport(r, w, max, info))
        }
        RawConn::Tcp(stream, peer) => {
            stream.set_nodelay(true)?;
            let info = TransportInfo {
                kind: shared.kind,
                local_addr: Some(stream.local_addr()?.to_string()),
                remote_addr: Some(peer.to_string()),
            };
            let tls = || shared.tls.as_ref().expect("TLS acceptor for a TLS kind");
            match shared.kind {
                TransportKind::Tcp => {
                    let (r, w) = stream.into_split();
                    Ok(nul_transport(r, w, max, info))
                }
                TransportKind::Tls => {
                    let tls = tls().accept(stream).await.map_err(tls_accept_error)?;
                    let (r, w) = tokio::io::split(tls);
                    Ok(nul_transport(r, w, max, info))
                }
                TransportKind::Ws => {
                    let ws = accept_ws(stream, ws_config(max, options.ws_fragment_size)).await?;
                    Ok(ws_transport(ws, options.ws_fragment_size, info))
                }
                TransportKind::Wss => {
                    let tls = tls().accept(stream).await.map_err(tls_accept_error)?;
                    let ws = accept_ws(tls, ws_config(max, options.ws_fragment_size)).await?;
                    Ok(ws_transport(ws, options.ws_fragment_size, info))
                }
                TransportKind::Unix => unreachable!("Unix listeners accept Unix streams"),
            }
        }
    }
}

fn tls_accept_error(e: io::Error) -> TransportError {
    TransportError::Tls(format!("handshake failed: {e}"))
}
