//! Transports: how JSTP messages travel. Every transport turns into the same [`Transport`]: a
//! stream of incoming message texts and a sink of outgoing ones, so the connection driver never
//! knows which wire it is on.
//!
//! * TCP, TLS and Unix sockets carry NUL-terminated messages ([`tether_wire::NulFramer`]).
//! * WebSocket and WSS carry one message per text message, subprotocol `metarhia-jstp`.
//!
//! Servers get transports from a [`Listener`] ([`Listener::bind`] an [`Endpoint`] with
//! [`ListenerOptions`]); clients from [`connect`] with a [`ClientTransportConfig`]. TLS settings
//! come from [`server_config`] and [`TlsClientOptions`].
//!
//! Under both lies the network floor shared by every protocol (JSTP, the conductor protocol,
//! HTTP): [`dial`] and [`StreamListener`] move bytes ([`ByteStream`]) over TCP, TLS and Unix
//! sockets with deadlines, bounded pending handshakes, connection caps and accept back-off.

mod connect;
mod endpoint;
mod listener;
mod nul;
mod stream;
mod tls;
mod ws;

pub use connect::{connect, ClientTransportConfig};
pub use endpoint::Endpoint;
pub use listener::{Listener, ListenerOptions};
pub use nul::{nul_transport, NulCodec, READ_BUFFER_SIZE};
pub use stream::{
    dial, Accepted, ByteStream, ConnectionPermit, DialOptions, DialOptionsBuilder, FloorError,
    ListenOptions, ListenOptionsBuilder, PeerInfo, StreamEndpoint, StreamListener,
};
pub use tls::{
    client_config, load_certs, load_private_key, server_config, server_config_from_der,
    TlsClientOptions,
};
pub use ws::{fragment_ranges, DEFAULT_FRAGMENT_SIZE, MAX_FRAGMENT_SIZE, SUBPROTOCOL};

use futures::{Sink, Stream};
use std::pin::Pin;
use thiserror::Error;

/// Incoming message texts, in order; ends (`None`) when the peer closes.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<String, TransportError>> + Send>>;
/// Outgoing message texts; closing it closes the transport (FIN or WS close frame).
pub type MessageSink = Pin<Box<dyn Sink<String, Error = TransportError> + Send>>;

/// Which wire a transport uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Plain TCP with NUL framing (`jstp://`).
    Tcp,
    /// TLS over TCP with NUL framing (`jstps://`).
    Tls,
    /// Unix domain socket with NUL framing (`unix:`).
    Unix,
    /// WebSocket (`ws://`).
    Ws,
    /// WebSocket over TLS (`wss://`).
    Wss,
}

/// Addresses and kind of an established transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportInfo {
    /// The wire.
    pub kind: TransportKind,
    /// Our address (`ip:port`, or a socket path).
    pub local_addr: Option<String>,
    /// The peer's address (`ip:port`, or a socket path / `None` for unnamed Unix peers).
    pub remote_addr: Option<String>,
}

/// An established, framed transport.
pub struct Transport {
    /// Messages from the peer.
    pub incoming: MessageStream,
    /// Messages to the peer.
    pub outgoing: MessageSink,
    /// What this transport is.
    pub info: TransportInfo,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("info", &self.info)
            .finish()
    }
}

/// Transport-level failures.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The byte stream could not be framed (too large, bad UTF-8, empty frame).
    #[error("framing error: {0}")]
    Frame(#[from] tether_wire::FrameError),
    /// A WebSocket protocol error or refused upgrade.
    #[error("websocket error: {0}")]
    WebSocket(String),
    /// TLS configuration or handshake failure.
    #[error("tls error: {0}")]
    Tls(String),
    /// The URL or address could not be understood.
    #[error("invalid address: {0}")]
    InvalidAddress(String),
    /// Connecting or a handshake took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An outgoing message cannot be sent on this transport (e.g. it contains a NUL byte).
    #[error("invalid outgoing message: {0}")]
    InvalidMessage(String),
    /// The transport is closed.
    #[error("transport closed")]
    Closed,
}
