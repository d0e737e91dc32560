//! The errors of tether's JSTP layer.

use crate::transport::TransportError;
use std::time::Duration;
use tether_wire::{ErrorCode, SerializeError};
use thiserror::Error;

/// An error reported by the peer: JSTP's `[code, message?, ...info]`.
pub use tether_wire::RemoteErrorArray as RemoteError;

/// The local code of a call that timed out. Like −1 and −2 it never goes on the wire.
pub const TIMEOUT_CODE: i64 = -3;

/// Everything that can go wrong on a JSTP connection.
#[derive(Debug, Error)]
pub enum Error {
    /// The peer answered with an error (codes 10–17, 1, or an application's own code).
    #[error("remote error: {0}")]
    Remote(RemoteError),
    /// No answer within the request's deadline. Never sent to the peer.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The peer received the call but its callback was lost with the connection (code −1).
    #[error("connection closed before receiving callback")]
    CallbackLost,
    /// The connection closed before the handshake response arrived (code −2).
    #[error("connection closed before receiving handshake")]
    NoHandshakeResponse,
    /// The connection is closed (or closed while the request was pending).
    #[error("connection closed")]
    Closed,
    /// The request was failed by [`crate::Connection::flush`].
    #[error("request failed by flush")]
    Flushed,
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A value could not be serialized for a JS peer (non-finite number).
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// An application name or version (range) is not valid semver.
    #[error("invalid semver version range: {0}")]
    InvalidVersion(String),
    /// The connection's outgoing queue is full.
    #[error("outgoing queue is full")]
    QueueFull,
    /// The session's resend buffer is full (see [`crate::ConnectionConfig::session`]).
    #[error(transparent)]
    Session(#[from] tether_wire::SessionError),
    /// Invalid configuration or arguments.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A typed call, emit or event did not convert between Rust and JSTP values (see
    /// [`crate::typed`]); the [`TypedError`](crate::TypedError) says which argument, event or
    /// result, and why.
    #[error(transparent)]
    Typed(Box<crate::typed::TypedError>),
    /// The peer does not keep up with what is sent to it (see
    /// [`crate::ConnectionConfig::session`]): a peer that leaves a confirmation ping
    /// unanswered is detached (its session resends on restore); one whose unconfirmed backlog
    /// reaches the full bound loses its session.
    #[error("slow consumer: {messages} messages ({bytes} bytes) unconfirmed")]
    SlowConsumer {
        /// Unconfirmed bytes when it was decided.
        bytes: usize,
        /// Unconfirmed messages when it was decided.
        messages: usize,
    },
}

impl Error {
    /// The JSTP code of this error, if it has one: the remote code, −1 callback lost, −2 no
    /// handshake response, −3 ([`TIMEOUT_CODE`]) timeout.
    pub fn code(&self) -> Option<i64> {
        match self {
            Error::Remote(e) => Some(e.code),
            Error::CallbackLost => Some(ErrorCode::CallbackLost.code()),
            Error::NoHandshakeResponse => Some(ErrorCode::NoHandshakeResponse.code()),
            Error::Timeout(_) => Some(TIMEOUT_CODE),
            _ => None,
        }
    }

    /// The remote error, if the peer sent one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Self {
        Error::Remote(e)
    }
}
