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

mod client;
mod server;
mod typed;

pub use client::{
    AppSignal, ConductorAddress, ConductorConnection, ConductorOptions, ConductorSignal,
    MessageKind,
};
pub use server::{
    example_cell_id, ConductorServer, ConductorServerBuilder, ConductorServerEvent, InputError,
    AUTHENTICATION_TIMEOUT, CLIENT_QUEUE,
};
pub use tether_wire::conductor::{CellId, Dialect, Value};
pub use typed::{
    from_nested, from_payload, to_nested, to_payload, typed_handler, PayloadError, TypedConductor,
    TypedRequestError,
};

use std::sync::Arc;
use std::time::Duration;
use tether_wire::conductor::WireError;
use thiserror::Error;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What can go wrong on a conductor connection. Clone (one connect error is reported to every
/// waiter), so sources are shared behind an `Arc`.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
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
    /// Listening failed (the address, or binding it).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Dialling `uri` failed at `stage`; `source` is the underlying error (for the handshake,
    /// a tungstenite error: an HTTP refusal such as a conductor's 400 for a missing or
    /// disallowed `Origin` is `tungstenite::Error::Http`).
    #[error("cannot connect to {uri} ({stage}): {source}")]
    Dial {
        /// The URL dialled.
        uri: String,
        /// Which step failed.
        stage: DialStage,
        /// Why.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
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
    /// More requests than a connection keeps pending (65 536) were awaiting answers.
    #[error("more than {limit} requests pending on this connection")]
    TooManyPending {
        /// The limit.
        limit: usize,
    },
    /// Writing to the WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[source] Arc<tokio_tungstenite::tungstenite::Error>),
}

/// The step of dialling that failed ([`ConductorError::Dial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DialStage {
    /// The TCP connection.
    Tcp,
    /// The TLS handshake of `wss://` (or its configuration: the CA file, the server name).
    Tls,
    /// The WebSocket upgrade (an HTTP refusal lands here).
    WebSocket,
}

impl std::fmt::Display for DialStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DialStage::Tcp => "tcp",
            DialStage::Tls => "tls",
            DialStage::WebSocket => "websocket handshake",
        })
    }
}

fn ws_config(max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}
