//! The network floor: byte streams under every protocol (JSTP, the conductor protocol, HTTP).
//!
//! [`dial`] opens a [`ByteStream`] to a [`StreamEndpoint`] (TCP, TLS over TCP, Unix socket)
//! within a deadline, honouring [`TlsClientOptions::server_name`] and ALPN.
//! [`StreamListener::bind`] accepts them, and [`StreamListener::bind_with`] also runs the
//! caller's protocol upgrade (e.g. a WebSocket handshake) on each one, under the same guards:
//!
//! * one **handshake deadline** covers the TLS handshake and the caller's upgrade together;
//! * **bounded pending handshakes**: when the bound is reached, the *oldest* pending handshake
//!   is evicted (closed) to make room, so a flood of silent sockets cannot keep new clients out
//!   for longer than it takes the flood to outnumber them;
//! * **connection caps**, total and per source IP, counted from accept until the stream (or
//!   whatever the upgrade made of it) is dropped; connections beyond a cap are closed at once;
//! * **accept errors never end the loop**: errors that concern one connection are skipped, others
//!   (typically `EMFILE`, out of file descriptors) are reported and backed off from, doubling
//!   from [`ListenOptions::accept_backoff_min`] up to [`ListenOptions::accept_backoff_max`];
//! * a **stale Unix socket** file is replaced only when nobody answers on it; a live one, or a
//!   file that is not a socket, is an error;
//! * [`StreamListener::shutdown`] (or dropping the listener) stops accepting, aborts pending
//!   handshakes and removes the Unix socket file if it is still ours.
//!
//! The defaults and their reasons are on [`ListenOptions`] and [`DialOptions`].

use super::tls::{client_config, server_name, TlsClientOptions};
use super::{Endpoint, TransportError};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// Where a byte stream connects to or listens on. TLS is not part of the address: it is
/// [`DialOptions::tls`] / [`ListenOptions::tls`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamEndpoint {
    /// A TCP host (name or IP address, IPv6 without brackets) and port (0 binds a free one).
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl StreamEndpoint {
    /// A TCP endpoint.
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        StreamEndpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    /// Parses `host:port` (IPv6 in brackets) as a TCP endpoint.
    pub fn parse_host_port(text: &str) -> Result<Self, FloorError> {
        let invalid = |reason: &'static str| FloorError::InvalidAddress {
            address: text.to_owned(),
            reason,
        };
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected host:port"))?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .ok_or_else(|| invalid("unclosed '[' in IPv6 host"))?,
            None if host.contains(':') => return Err(invalid("an IPv6 host needs brackets")),
            None => host,
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let port = port.parse().map_err(|_| invalid("invalid port"))?;
        Ok(StreamEndpoint::tcp(host, port))
    }
}

impl From<&Endpoint> for StreamEndpoint {
    /// The byte-stream part of a JSTP endpoint: its host and port (the scheme's default port for
    /// WebSocket URLs), or its socket path. An unparsable WebSocket URL (which [`Endpoint`]'s
    /// parser never produces) maps to port 0 of an empty host, which fails to dial or bind.
    fn from(endpoint: &Endpoint) -> Self {
        match endpoint {
            Endpoint::Unix(path) => StreamEndpoint::Unix(path.clone()),
            other => {
                let (host, port) = other.host_port().unwrap_or_default();
                StreamEndpoint::Tcp { host, port }
            }
        }
    }
}

impl fmt::Display for StreamEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEndpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "[{host}]:{port}")
            }
            StreamEndpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            StreamEndpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Failures of the network floor. Each keeps the underlying error as its source.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FloorError {
    /// The address cannot be used.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A socket operation failed (`what` names it: bind, connect, accept, …).
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The TLS configuration is unusable (no trust anchors, bad server name, missing
    /// certificate).
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] Box<TransportError>),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
    /// Connecting, or a listener's handshake (TLS plus upgrade), took longer than allowed.
    #[error("{what} not finished within {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The caller's protocol upgrade (e.g. a WebSocket handshake) failed.
    #[error("upgrade failed: {0}")]
    Upgrade(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl FloorError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> FloorError {
        move |source| FloorError::Io { what, source }
    }
}

impl From<FloorError> for TransportError {
    /// Keeps the kind where [`TransportError`] has one (i/o stays [`TransportError::Io`], an
    /// upgrade's own `TransportError` comes back unchanged).
    fn from(e: FloorError) -> Self {
        match e {
            FloorError::Io { source, .. } => TransportError::Io(source),
            FloorError::TlsConfig(inner) => *inner,
            FloorError::Upgrade(inner) => match inner.downcast::<TransportError>() {
                Ok(t) => *t,
                Err(other) => TransportError::WebSocket(other.to_string()),
            },
            FloorError::InvalidAddress { .. } => TransportError::InvalidAddress(e.to_string()),
            FloorError::TlsHandshake(source) => {
                TransportError::Tls(format!("handshake failed: {source}"))
            }
            FloorError::Timeout { .. } => TransportError::Timeout(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte streams.

/// Addresses and TLS facts of a [`ByteStream`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// Our address (`ip:port` or the socket path).
    pub local_addr: Option<String>,
    /// The peer's address (`ip:port`; a Unix peer's path if it bound one).
    pub remote_addr: Option<String>,
    /// The peer's IP address (TCP only): what per-IP caps count.
    pub remote_ip: Option<IpAddr>,
    /// Whether the stream is TLS.
    pub tls: bool,
    /// The ALPN protocol TLS agreed on, if any.
    pub alpn: Option<Vec<u8>>,
}

/// A plain socket.
pub(crate) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// What a [`ByteStream`] reads and writes through.
pub(crate) enum Io {
    Plain(Plain),
    TlsServer(Box<tokio_rustls::server::TlsStream<Plain>>),
    TlsClient(Box<tokio_rustls::client::TlsStream<Plain>>),
}

/// One established connection: TCP, Unix or TLS over either, with its [`PeerInfo`]. Reads and
/// writes bytes ([`AsyncRead`] + [`AsyncWrite`]). Holds the listener's connection-cap slot
/// until dropped.
pub struct ByteStream {
    io: Io,
    peer: PeerInfo,
    permit: Option<ConnectionPermit>,
}

impl fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByteStream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ByteStream {
    /// Addresses and TLS facts.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// The stream's parts, for framing code that splits plain sockets into owned halves.
    pub(crate) fn into_parts(self) -> (Io, PeerInfo, Option<ConnectionPermit>) {
        (self.io, self.peer, self.permit)
    }

    /// Takes the connection-cap slot out, so that it can travel with whatever the stream
    /// becomes (it is released when the returned permit is dropped).
    pub fn take_permit(&mut self) -> Option<ConnectionPermit> {
        self.permit.take()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain(Plain::Tcp($s)) => $e,
            Io::Plain(Plain::Unix($s)) => $e,
            Io::TlsServer($s) => $e,
            Io::TlsClient($s) => $e,
        }
    };
}

macro_rules! delegate_plain {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Plain::Tcp($s) => $e,
            Plain::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Plain {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Plain {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate_plain!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_plain!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_plain!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Plain::Tcp(s) => s.is_write_vectored(),
            Plain::Unix(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for ByteStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ByteStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Connection caps.

/// Live connection counts of one listener. The map has an entry per source IP with at least
/// one live connection (so at most `max_connections` entries).
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Caps {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

/// A connection's slot under its listener's caps, released when dropped.
pub struct ConnectionPermit {
    caps: Arc<Caps>,
    ip: Option<IpAddr>,
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPermit")
            .field("ip", &self.ip)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a connection was refused by the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Total,
    PerIp,
}

impl Caps {
    fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnectionPermit, Refusal> {
        let mut counts = lock(&self.counts);
        if counts.total >= self.max_total {
            return Err(Refusal::Total);
        }
        if let Some(ip) = ip {
            let n = counts.per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        counts.total += 1;
        Ok(ConnectionPermit {
            caps: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = lock(&self.caps.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = counts.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.per_ip.remove(&ip);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Listening.

/// Settings for [`StreamListener`]; build with [`ListenOptions::builder`].
///
/// Defaults:
///
/// | Setting | Default | Why |
/// | --- | --- | --- |
/// | `handshake_timeout` | 10 s | TLS plus an HTTP upgrade on a slow link; `tether serve --handshake-timeout` sets it |
/// | `max_pending_handshakes` | 1024 | about 1024 sockets of kernel and TLS state; the oldest is evicted beyond it |
/// | `max_connections` | 32 768 | the listener's share of file descriptors; the README's benchmark holds 10 000 idle connections |
/// | `max_connections_per_ip` | 16 384 | generous because loopback benchmarks and NAT put many clients behind one address; lower it on the open internet |
/// | `accept_queue` | 64 | established streams waiting for [`StreamListener::accept`] |
/// | `accept_backoff_min` / `_max` | 10 ms / 1 s | after an accept error such as `EMFILE` |
///
/// Defaults of [`DialOptions`]: `connect_timeout` 10 s (TCP connect and TLS handshake
/// together), no TLS, no ALPN protocols.
///
/// Memory: the per-IP table holds one entry per source address with a live connection, so it
/// is bounded by `max_connections`; the pending-handshake queue by `max_pending_handshakes`;
/// the accepted-stream queue by `accept_queue`.
#[derive(Clone)]
#[non_exhaustive]
pub struct ListenOptions {
    /// TLS server configuration: with it every accepted connection does a TLS handshake first.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Time for TLS plus the caller's upgrade. Default 10 s.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; beyond it the oldest is evicted. Default 1024.
    pub max_pending_handshakes: usize,
    /// Live connections (pending or established) at once. Default 32 768.
    pub max_connections: usize,
    /// Live connections from one source IP address at once (TCP only). Default 16 384.
    pub max_connections_per_ip: usize,
    /// Established streams waiting for [`StreamListener::accept`]. Default 64.
    pub accept_queue: usize,
    /// First pause after an accept error such as `EMFILE`. Default 10 ms.
    pub accept_backoff_min: Duration,
    /// Longest pause after repeated accept errors. Default 1 s.
    pub accept_backoff_max: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_connections: 32_768,
            max_connections_per_ip: 16_384,
            accept_queue: 64,
            accept_backoff_min: Duration::from_millis(10),
            accept_backoff_max: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for ListenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenOptions")
            .field("tls", &self.tls.as_ref().map(|_| "ServerConfig"))
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("accept_queue", &self.accept_queue)
            .field("accept_backoff_min", &self.accept_backoff_min)
            .field("accept_backoff_max", &self.accept_backoff_max)
            .finish()
    }
}

impl ListenOptions {
    /// Starts from the defaults.
    pub fn builder() -> ListenOptionsBuilder {
        ListenOptionsBuilder(ListenOptions::default())
    }
}

/// Builds [`ListenOptions`].
#[derive(Debug, Clone, Default)]
pub struct ListenOptionsBuilder(ListenOptions);

impl ListenOptionsBuilder {
    /// Sets [`ListenOptions::tls`].
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.0.tls = Some(tls);
        self
    }
    /// Sets [`ListenOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, after: Duration) -> Self {
        self.0.handshake_timeout = after;
        self
    }
    /// Sets [`ListenOptions::max_pending_handshakes`] (at least 1).
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.0.max_pending_handshakes = n.max(1);
        self
    }
    /// Sets [`ListenOptions::max_connections`].
    pub fn max_connections(mut self, n: usize) -> Self {
        self.0.max_connections = n;
        self
    }
    /// Sets [`ListenOptions::max_connections_per_ip`].
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.0.max_connections_per_ip = n;
        self
    }
    /// Sets [`ListenOptions::accept_queue`] (at least 1).
    pub fn accept_queue(mut self, n: usize) -> Self {
        self.0.accept_queue = n.max(1);
        self
    }
    /// Sets the accept-error back-off range.
    pub fn accept_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.0.accept_backoff_min = min;
        self.0.accept_backoff_max = max.max(min);
        self
    }
    /// The options.
    pub fn build(self) -> ListenOptions {
        self.0
    }
}

/// What a listener hands out: an upgraded connection, or the error of one that failed its
/// handshake (or of `accept` itself); the listener keeps going after either.
pub type Accepted<T> = Result<T, FloorError>;

/// A bound listener yielding `T`: a [`ByteStream`] from [`bind`](Self::bind), or what the
/// upgrade of [`bind_with`](Self::bind_with) made of one.
///
/// Every listener has the same guards:
///
/// * one **handshake deadline** covers the TLS handshake and the caller's upgrade together;
/// * **bounded pending handshakes**: when the bound is reached, the *oldest* pending handshake
///   is evicted (closed) to make room, so a flood of silent sockets cannot keep new clients out
///   for longer than it takes the flood to outnumber them;
/// * **connection caps**, total and per source IP, counted from accept until the stream (or
///   whatever the upgrade made of it) is dropped; connections beyond a cap are closed at once;
/// * **accept errors never end the loop**: errors that concern one connection are skipped, others
///   (typically `EMFILE`, out of file descriptors) are reported and backed off from, doubling
///   from [`ListenOptions::accept_backoff_min`] up to [`ListenOptions::accept_backoff_max`];
/// * a **stale Unix socket** file is replaced only when nobody answers on it; a live one, or a
///   file that is not a socket, is an error;
/// * [`StreamListener::shutdown`] (or dropping the listener) stops accepting, aborts pending
///   handshakes and removes the Unix socket file if it is still ours.
///
pub struct StreamListener<T = ByteStream> {
    rx: Option<mpsc::Receiver<Accepted<T>>>,
    task: Option<JoinHandle<()>>,
    local_addr: String,
    /// The socket file and its identity, removed on shutdown if it is still ours.
    unix_socket: Option<(PathBuf, u64, u64)>,
}

impl<T> fmt::Debug for StreamListener<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamListener")
            .field("local_addr", &self.local_addr)
            .field("open", &self.rx.is_some())
            .finish()
    }
}

enum RawListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl RawListener {
    async fn accept(&self) -> io::Result<(Plain, PeerInfo)> {
        match self {
            RawListener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                // Request/response protocols want small writes out at once.
                let _ = s.set_nodelay(true);
                let peer = PeerInfo {
                    local_addr: s.local_addr().ok().map(|a| a.to_string()),
                    remote_addr: Some(addr.to_string()),
                    remote_ip: Some(canonical_ip(addr)),
                    ..PeerInfo::default()
                };
                Ok((Plain::Tcp(s), peer))
            }
            RawListener::Unix(l) => {
                let (s, addr) = l.accept().await?;
                let peer = PeerInfo {
                    local_addr: s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(|p| p.display().to_string())),
                    remote_addr: addr.as_pathname().map(|p| p.display().to_string()),
                    ..PeerInfo::default()
                };
                Ok((Plain::Unix(s), peer))
            }
        }
    }
}

/// An IPv4 peer on a dual-stack socket counts as its IPv4 address.
fn canonical_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

type Upgrade<T> =
    Arc<dyn Fn(ByteStream) -> Pin<Box<dyn Future<Output = Accepted<T>> + Send>> + Send + Sync>;

impl StreamListener<ByteStream> {
    /// Binds `endpoint` and yields its connections as byte streams (after TLS when
    /// [`ListenOptions::tls`] is set).
    pub async fn bind(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
    ) -> Result<Self, FloorError> {
        let inline = options.tls.is_none();
        Self::start(
            endpoint,
            options,
            Arc::new(|s| Box::pin(std::future::ready(Ok(s)))),
            inline,
        )
        .await
    }
}

impl<T: Send + 'static> StreamListener<T> {
    /// Binds `endpoint` and runs `upgrade` on every connection (after TLS when
    /// [`ListenOptions::tls`] is set), in its own task, within
    /// [`ListenOptions::handshake_timeout`] for TLS and upgrade together, and counted among the
    /// pending handshakes until it finishes. Its error becomes [`FloorError::Upgrade`].
    pub async fn bind_with<F, Fut, E>(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: F,
    ) -> Result<Self, FloorError>
    where
        F: Fn(ByteStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let upgrade: Upgrade<T> = Arc::new(move |s| {
            let fut = upgrade(s);
            Box::pin(async move { fut.await.map_err(|e| FloorError::Upgrade(e.into())) })
        });
        Self::start(endpoint, options, upgrade, false).await
    }

    /// As [`bind_with`](Self::bind_with), but a listener without TLS runs `upgrade` in the
    /// accept loop: only for upgrades that finish at once (JSTP's NUL framing), which saves a
    /// task per connection.
    pub(crate) async fn bind_immediate<F>(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: F,
        immediate: bool,
    ) -> Result<Self, FloorError>
    where
        F: Fn(ByteStream) -> Pin<Box<dyn Future<Output = Accepted<T>> + Send>>
            + Send
            + Sync
            + 'static,
    {
        let inline = immediate && options.tls.is_none();
        Self::start(endpoint, options, Arc::new(upgrade), inline).await
    }

    async fn start(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: Upgrade<T>,
        inline: bool,
    ) -> Result<Self, FloorError> {
        let (raw, local_addr, unix_socket) = match endpoint {
            StreamEndpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(FloorError::io("bind"))?;
                let meta = std::fs::symlink_metadata(path).map_err(FloorError::io("bind"))?;
                (
                    RawListener::Unix(listener),
                    path.display().to_string(),
                    Some((path.clone(), meta.dev(), meta.ino())),
                )
            }
            StreamEndpoint::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(FloorError::io("bind"))?;
                let addr = listener
                    .local_addr()
                    .map_err(FloorError::io("bind"))?
                    .to_string();
                (RawListener::Tcp(listener), addr, None)
            }
        };
        let (tx, rx) = mpsc::channel(options.accept_queue.max(1));
        let shared = Arc::new(Shared {
            local_addr: local_addr.clone(),
            options: options.clone(),
            tls: options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            caps: Arc::new(Caps {
                max_total: options.max_connections,
                max_per_ip: options.max_connections_per_ip,
                counts: Mutex::default(),
            }),
            upgrade,
        });
        let task = tokio::spawn(accept_loop(raw, shared, tx, inline));
        Ok(StreamListener {
            rx: Some(rx),
            task: Some(task),
            local_addr,
            unix_socket,
        })
    }
}

impl<T> StreamListener<T> {
    /// The bound address: `ip:port` (the real port when bound to port 0), or the socket path.
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// The next connection, or the error of one that failed (the listener keeps going).
    /// `None` after [`shutdown`](Self::shutdown). Cancel-safe.
    pub async fn accept(&mut self) -> Option<Accepted<T>> {
        self.rx.as_mut()?.recv().await
    }

    /// Stops accepting, aborts handshakes in progress, drops connections not yet accepted and
    /// removes the Unix socket file if it is still the one this listener created. Idempotent;
    /// dropping the listener does the same.
    pub fn shutdown(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.rx = None;
        if let Some((path, dev, ino)) = self.unix_socket.take() {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.dev() == dev && meta.ino() == ino {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl<T> Drop for StreamListener<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a Unix socket file nobody listens on; a live socket or another kind of file is an
/// error.
pub(crate) async fn remove_stale_socket(path: &Path) -> Result<(), FloorError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => Err(FloorError::Io {
                what: "bind",
                source: io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ),
            }),
            Err(_) => {
                tracing::debug!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path).map_err(FloorError::io("remove stale socket"))
            }
        },
        Ok(_) => Err(FloorError::Io {
            what: "bind",
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FloorError::Io {
            what: "bind",
            source: e,
        }),
    }
}

struct Shared<T> {
    /// The bound address, named in log lines.
    local_addr: String,
    options: ListenOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    caps: Arc<Caps>,
    upgrade: Upgrade<T>,
}

/// Errors that concern one connection only; anything else (e.g. out of file descriptors) is
/// reported and backed off from.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// TLS (when configured) and the upgrade, without the deadline.
async fn establish<T>(
    plain: Plain,
    mut peer: PeerInfo,
    permit: ConnectionPermit,
    shared: &Shared<T>,
) -> Accepted<T> {
    let io = match &shared.tls {
        None => Io::Plain(plain),
        Some(acceptor) => {
            let tls = acceptor
                .accept(plain)
                .await
                .map_err(FloorError::TlsHandshake)?;
            peer.tls = true;
            peer.alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            Io::TlsServer(Box::new(tls))
        }
    };
    let stream = ByteStream {
        io,
        peer,
        permit: Some(permit),
    };
    (shared.upgrade)(stream).await
}

async fn accept_loop<T: Send + 'static>(
    raw: RawListener,
    shared: Arc<Shared<T>>,
    tx: mpsc::Sender<Accepted<T>>,
    inline: bool,
) {
    let options = &shared.options;
    let max_pending = options.max_pending_handshakes.max(1);
    // Dropping the set (when this task is aborted) aborts the handshakes.
    let mut handshakes = JoinSet::new();
    // Pending handshakes, oldest first, for eviction; finished ones are pruned lazily.
    let mut order: VecDeque<AbortHandle> = VecDeque::new();
    let mut backoff = options.accept_backoff_min;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = raw.accept() => match accepted {
                Ok((plain, peer)) => {
                    backoff = options.accept_backoff_min;
                    let permit = match shared.caps.admit(peer.remote_ip) {
                        Ok(p) => p,
                        Err(why) => {
                            // Closed at once: refusing is cheaper than any answer.
                            tracing::debug!(peer = ?peer.remote_addr, ?why, "connection over the cap");
                            continue;
                        }
                    };
                    if inline {
                        let result = establish(plain, peer, permit, &shared).await;
                        if tx.send(result).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if order.len() >= max_pending {
                        order.retain(|h| !h.is_finished());
                    }
                    while order.len() >= max_pending {
                        // Fair eviction: the oldest has had the longest time to finish.
                        if let Some(oldest) = order.pop_front() {
                            tracing::debug!("pending handshakes full: evicting the oldest");
                            oldest.abort();
                        }
                    }
                    let shared = shared.clone();
                    let tx = tx.clone();
                    let handle = handshakes.spawn(async move {
                        let after = shared.options.handshake_timeout;
                        let result = tokio::time::timeout(
                            after,
                            establish(plain, peer, permit, &shared),
                        )
                        .await
                        .unwrap_or(Err(FloorError::Timeout { what: "handshake", after }));
                        let _ = tx.send(result).await;
                    });
                    order.push_back(handle);
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    tracing::warn!(
                        listener = %shared.local_addr,
                        error = %e,
                        pause = ?backoff,
                        "accept failed; backing off"
                    );
                    // Reported without waiting: a consumer that is not reading must not stall
                    // the back-off (a full queue drops the report, the log line stays).
                    let _ = tx.try_send(Err(FloorError::Io { what: "accept", source: e }));
                    // Typically EMFILE: give connections time to close.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(options.accept_backoff_max);
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dialing.

/// Settings for [`dial`]; build with [`DialOptions::builder`]. Defaults: 10 s connect timeout,
/// no TLS, no ALPN.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DialOptions {
    /// Limit for TCP/Unix connect and TLS handshake together. Default 10 s.
    pub connect_timeout: Duration,
    /// TLS trust and server name; `None` for a plain stream.
    pub tls: Option<TlsClientOptions>,
    /// ALPN protocols offered in TLS, most preferred first. Default none.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(10),
            tls: None,
            alpn: Vec::new(),
        }
    }
}

impl DialOptions {
    /// Starts from the defaults.
    pub fn builder() -> DialOptionsBuilder {
        DialOptionsBuilder(DialOptions::default())
    }
}

/// Builds [`DialOptions`].
#[derive(Debug, Clone, Default)]
pub struct DialOptionsBuilder(DialOptions);

impl DialOptionsBuilder {
    /// Sets [`DialOptions::connect_timeout`].
    pub fn connect_timeout(mut self, after: Duration) -> Self {
        self.0.connect_timeout = after;
        self
    }
    /// Dials TLS with these trust settings (and [`TlsClientOptions::server_name`]).
    pub fn tls(mut self, tls: TlsClientOptions) -> Self {
        self.0.tls = Some(tls);
        self
    }
    /// Sets [`DialOptions::alpn`].
    pub fn alpn(mut self, protocols: impl IntoIterator<Item = impl Into<Vec<u8>>>) -> Self {
        self.0.alpn = protocols.into_iter().map(Into::into).collect();
        self
    }
    /// The options.
    pub fn build(self) -> DialOptions {
        self.0
    }
}

/// Opens a byte stream to `endpoint`: TCP (with `TCP_NODELAY`) or Unix, then TLS when
/// [`DialOptions::tls`] is set, verifying [`TlsClientOptions::server_name`] if given, else the
/// endpoint's host. The TLS configuration is checked before any connection is opened. Fails
/// with [`FloorError::Timeout`] after [`DialOptions::connect_timeout`].
pub async fn dial(
    endpoint: &StreamEndpoint,
    options: &DialOptions,
) -> Result<ByteStream, FloorError> {
    let tls = match &options.tls {
        None => None,
        Some(tls) => {
            let host = match endpoint {
                StreamEndpoint::Tcp { host, .. } => host.as_str(),
                // A Unix socket has no host: the name must be given.
                StreamEndpoint::Unix(_) => tls.server_name.as_deref().unwrap_or("localhost"),
            };
            let name = server_name(tls, host).map_err(|e| FloorError::TlsConfig(Box::new(e)))?;
            let mut config = client_config(tls).map_err(|e| FloorError::TlsConfig(Box::new(e)))?;
            if !options.alpn.is_empty() {
                let mut c = (*config).clone();
                c.alpn_protocols = options.alpn.clone();
                config = Arc::new(c);
            }
            Some((tokio_rustls::TlsConnector::from(config), name))
        }
    };
    let after = options.connect_timeout;
    tokio::time::timeout(after, async move {
        let (plain, mut peer) = match endpoint {
            StreamEndpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(FloorError::io("connect"))?;
                let _ = s.set_nodelay(true);
                let remote = s.peer_addr().map_err(FloorError::io("connect"))?;
                let peer = PeerInfo {
                    local_addr: s.local_addr().ok().map(|a| a.to_string()),
                    remote_addr: Some(remote.to_string()),
                    remote_ip: Some(canonical_ip(remote)),
                    ..PeerInfo::default()
                };
                (Plain::Tcp(s), peer)
            }
            StreamEndpoint::Unix(path) => {
                let s = UnixStream::connect(path)
                    .await
                    .map_err(FloorError::io("connect"))?;
                let peer = PeerInfo {
                    remote_addr: Some(path.display().to_string()),
                    ..PeerInfo::default()
                };
                (Plain::Unix(s), peer)
            }
        };
        let io = match tls {
            None => Io::Plain(plain),
            Some((connector, name)) => {
                let s = connector
                    .connect(name, plain)
                    .await
                    .map_err(FloorError::TlsHandshake)?;
                peer.tls = true;
                peer.alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                Io::TlsClient(Box::new(s))
            }
        };
        Ok(ByteStream {
            io,
            peer,
            permit: None,
        })
    })
    .await
    .unwrap_or(Err(FloorError::Timeout {
        what: "connect",
        after,
    }))
}
