//! Listeners: accept connections on any endpoint kind and hand out ready [`Transport`]s. They
//! stand on the network floor ([`StreamListener`]): handshake deadline, bounded pending
//! handshakes with eviction of the oldest, connection caps, accept back-off, stale-socket check.

use super::nul::nul_transport;
use super::stream::{
    ByteStream, ConnectionPermit, FloorError, Io, ListenOptions, Plain, StreamEndpoint,
    StreamListener,
};
use super::ws::{accept_ws, ws_config, ws_transport, DEFAULT_FRAGMENT_SIZE};
use super::{Endpoint, MessageStream, Transport, TransportError, TransportInfo, TransportKind};
use futures::Stream;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
    /// dropped. Default 10 s; `tether serve --handshake-timeout` sets it. (The JSTP handshake
    /// that follows is the server's business.)
    pub handshake_timeout: Duration,
    /// WebSocket messages longer than this go out as fragments of at most this many bytes.
    /// Default 16 KiB; clamped below 1 MiB.
    pub ws_fragment_size: usize,
    /// At most this many TLS/HTTP handshakes run at once; a new connection beyond it evicts
    /// the oldest pending one. Default 1024.
    pub max_pending_handshakes: usize,
    /// Established transports waiting for [`Listener::accept`]. Default 64.
    pub accept_queue: usize,
    /// Live connections of this listener at once; more are closed at accept. Default 32 768
    /// (see [`ListenOptions`]).
    pub max_connections: usize,
    /// Live connections from one source IP address at once; more are closed at accept.
    /// Default 16 384 (see [`ListenOptions`]).
    pub max_connections_per_ip: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        let floor = ListenOptions::default();
        ListenerOptions {
            tls: None,
            max_message_size: tether_wire::DEFAULT_MAX_MESSAGE_SIZE,
            handshake_timeout: floor.handshake_timeout,
            ws_fragment_size: DEFAULT_FRAGMENT_SIZE,
            max_pending_handshakes: floor.max_pending_handshakes,
            accept_queue: floor.accept_queue,
            max_connections: floor.max_connections,
            max_connections_per_ip: floor.max_connections_per_ip,
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

    /// Sets the TLS/upgrade handshake deadline.
    pub fn with_handshake_timeout(mut self, after: Duration) -> Self {
        self.handshake_timeout = after;
        self
    }

    /// The network-floor options these stand for (TLS included), e.g. to give another
    /// protocol's listener (the conductor's) the same guards.
    pub fn floor(&self) -> ListenOptions {
        let mut b = ListenOptions::builder()
            .handshake_timeout(self.handshake_timeout)
            .max_pending_handshakes(self.max_pending_handshakes)
            .accept_queue(self.accept_queue)
            .max_connections(self.max_connections)
            .max_connections_per_ip(self.max_connections_per_ip);
        if let Some(tls) = &self.tls {
            b = b.tls(tls.clone());
        }
        b.build()
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
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .finish()
    }
}

/// A bound listener. Accepting, TLS and HTTP-upgrade handshakes run in background tasks (each
/// handshake in its own, bounded by [`ListenerOptions::handshake_timeout`]), so a slow client
/// never holds up the others.
///
/// Dropping the listener (or [`Listener::close`]) stops accepting and aborts handshakes in
/// progress; a Unix listener then removes its socket file.
pub struct Listener {
    inner: StreamListener<Transport>,
    kind: TransportKind,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("kind", &self.kind)
            .field("inner", &self.inner)
            .finish()
    }
}

type Framed = Pin<Box<dyn Future<Output = Result<Transport, FloorError>> + Send>>;

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
        let mut floor = options.floor();
        match kind {
            TransportKind::Tls | TransportKind::Wss if options.tls.is_none() => {
                return Err(TransportError::Tls(format!(
                    "a {endpoint} listener needs a TLS certificate (ListenerOptions::tls)"
                )))
            }
            TransportKind::Tls | TransportKind::Wss => {}
            // A certificate given for other kinds is ignored, as documented.
            _ => floor.tls = None,
        }
        let max = options.max_message_size;
        let fragment = options.ws_fragment_size;
        let bound = match endpoint {
            Endpoint::Unix(path) => path.display().to_string(),
            _ => String::new(),
        };
        let upgrade = move |stream: ByteStream| -> Framed {
            let bound = bound.clone();
            Box::pin(async move {
                let mut stream = stream;
                let permit = stream.take_permit();
                let peer = stream.peer().clone();
                let info = TransportInfo {
                    kind,
                    local_addr: peer.local_addr.or_else(|| Some(bound.clone())),
                    remote_addr: peer.remote_addr,
                };
                let transport = match kind {
                    TransportKind::Ws | TransportKind::Wss => {
                        let ws = accept_ws(stream, ws_config(max, fragment))
                            .await
                            .map_err(|e| FloorError::Upgrade(Box::new(e)))?;
                        ws_transport(ws, fragment, info)
                    }
                    _ => nul_over(stream, max, info),
                };
                Ok(hold(transport, permit))
            })
        };
        let immediate = matches!(kind, TransportKind::Tcp | TransportKind::Unix);
        let inner = StreamListener::bind_immediate(
            &StreamEndpoint::from(endpoint),
            &floor,
            upgrade,
            immediate,
        )
        .await?;
        Ok(Listener { inner, kind })
    }

    /// The bound address: `ip:port` (the actual port when bound to port 0), or the socket path.
    pub fn local_addr(&self) -> String {
        self.inner.local_addr()
    }

    /// The kind of transports this listener produces.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The next established transport, or `Some(Err(_))` for a connection that failed its
    /// TLS/HTTP handshake or an accept error (the listener keeps going). `None` only after
    /// [`close`](Self::close). Cancel-safe.
    pub async fn accept(&mut self) -> Option<Result<Transport, TransportError>> {
        Some(self.inner.accept().await?.map_err(TransportError::from))
    }

    /// Stops accepting, aborts handshakes in progress, drops transports not yet accepted, and
    /// removes a Unix socket file. Idempotent.
    pub fn close(&mut self) {
        self.inner.shutdown();
    }
}

/// NUL framing over a byte stream; plain sockets split into owned halves (no lock between
/// reader and writer).
pub(crate) fn nul_over(stream: ByteStream, max: usize, info: TransportInfo) -> Transport {
    let (io, _, _) = stream.into_parts();
    match io {
        Io::Plain(Plain::Tcp(s)) => {
            let (r, w) = s.into_split();
            nul_transport(r, w, max, info)
        }
        Io::Plain(Plain::Unix(s)) => {
            let (r, w) = s.into_split();
            nul_transport(r, w, max, info)
        }
        tls => {
            let (r, w) = tokio::io::split(tls);
            nul_transport(r, w, max, info)
        }
    }
}

/// Keeps the connection's cap slot for as long as its incoming stream lives.
fn hold(mut transport: Transport, permit: Option<ConnectionPermit>) -> Transport {
    if let Some(permit) = permit {
        transport.incoming = Box::pin(Holding {
            inner: transport.incoming,
            _permit: permit,
        });
    }
    transport
}

struct Holding {
    inner: MessageStream,
    _permit: ConnectionPermit,
}

impl Stream for Holding {
    type Item = Result<String, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
