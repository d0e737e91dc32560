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

mod caps;
mod dial;
mod listen;

pub(crate) use caps::Caps;
pub use caps::ConnectionPermit;
pub use dial::{dial, DialOptions, DialOptionsBuilder};
use listen::canonical_ip;
pub use listen::{Accepted, ListenOptions, ListenOptionsBuilder, StreamListener};

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
