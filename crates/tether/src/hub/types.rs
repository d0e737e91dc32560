//! The hub's vocabulary: its errors, entry states, events and outcomes.

use super::{AddressError, PeerKey};
use crate::connection::Connection;
use crate::error::Error;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tether_wire::Object;
use thiserror::Error;

/// What can go wrong in the hub.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum HubError {
    /// The hub was closed.
    #[error("this hub is closed")]
    Closed,
    /// The address is not a valid multiserver address.
    #[error("invalid address: {0}")]
    Address(#[from] AddressError),
    /// No alternative of the address uses a transport the connector can dial.
    #[error("no dialable transport in {0}")]
    Undialable(String),
    /// The dial failed.
    #[error("connecting failed: {0}")]
    Connect(Arc<Error>),
    /// The dial was aborted by `disconnect`, `reset` or `close`.
    #[error("connecting was aborted")]
    Aborted,
    /// A policy refused the connection.
    #[error("refused by policy: {0}")]
    Refused(String),
    /// Closing a connection failed (custom connectors only).
    #[error("disconnecting failed: {0}")]
    Disconnect(String),
    /// The peer book could not be written.
    #[error("peer book: {0}")]
    Book(#[source] Arc<super::BookError>),
}

impl From<Error> for HubError {
    fn from(e: Error) -> Self {
        HubError::Connect(Arc::new(e))
    }
}

/// The state of an address in the hub; an address not in the hub is disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubState {
    /// A dial is in progress.
    Connecting,
    /// Connected.
    Connected,
    /// Being disconnected.
    Disconnecting,
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// We dialled.
    Outbound,
    /// The peer dialled us ([`Hub::register_inbound`](super::Hub::register_inbound)).
    Inbound,
}

/// One address in the hub.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its state.
    pub state: HubState,
    /// The peer key from the address or the inbound registration.
    pub key: Option<PeerKey>,
    /// Who opened the connection (once connected).
    pub direction: Option<Direction>,
    /// The connection (once connected).
    pub connection: Option<Connection>,
    /// Caller data from `connect` and `update`.
    pub data: Object,
    /// When the entry appeared.
    pub birth: SystemTime,
    /// When it last changed.
    pub updated: SystemTime,
}

/// Why a connection left the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `disconnect`, `reset` or `close` (or a dial aborted by them).
    Requested,
    /// The connection ended: the peer closed it, or its link dropped and was not restored.
    Closed,
    /// The liveness check: a ping went unanswered for this long.
    NoPong(Duration),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Requested => f.write_str("requested"),
            Cause::Closed => f.write_str("connection closed"),
            Cause::NoPong(t) => write!(f, "no pong within {t:?}"),
        }
    }
}

/// A transition of one address, reported once by [`Hub::listen`](super::Hub::listen).
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A dial started.
    Connecting {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
    },
    /// A dial failed (or was refused).
    ConnectingFailed {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
        /// Why.
        error: HubError,
    },
    /// A connection is up.
    Connected {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
        /// The connection.
        connection: Connection,
        /// Who opened it.
        direction: Direction,
    },
    /// A disconnect started.
    Disconnecting {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
    },
    /// A disconnect failed; the entry is back in its previous state.
    DisconnectingFailed {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
        /// Why.
        error: HubError,
    },
    /// The address left the hub (disconnected, closed by the peer, or dial aborted).
    Disconnected {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
        /// Why.
        cause: Cause,
    },
    /// The address was lost (a dial failed or its connection ended) and is dialled again
    /// after `delay`, by its [`Schedule`](super::Schedule).
    Redialing {
        /// The address.
        address: String,
        /// Its key.
        key: Option<PeerKey>,
        /// When the next dial starts.
        delay: Duration,
        /// Losses in a row so far (1 for the first).
        failures: u32,
    },
}

impl HubEvent {
    /// The address the event is about.
    pub fn address(&self) -> &str {
        match self {
            HubEvent::Connecting { address, .. }
            | HubEvent::ConnectingFailed { address, .. }
            | HubEvent::Connected { address, .. }
            | HubEvent::Disconnecting { address, .. }
            | HubEvent::DisconnectingFailed { address, .. }
            | HubEvent::Disconnected { address, .. }
            | HubEvent::Redialing { address, .. } => address,
        }
    }

    /// The event's name as upstream spells it (`connecting-failed`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            HubEvent::Connecting { .. } => "connecting",
            HubEvent::ConnectingFailed { .. } => "connecting-failed",
            HubEvent::Connected { .. } => "connected",
            HubEvent::Disconnecting { .. } => "disconnecting",
            HubEvent::DisconnectingFailed { .. } => "disconnecting-failed",
            HubEvent::Disconnected { .. } => "disconnected",
            HubEvent::Redialing { .. } => "redialing",
        }
    }

    /// The peer key the event is about, if known.
    pub fn key(&self) -> Option<PeerKey> {
        match self {
            HubEvent::Connecting { key, .. }
            | HubEvent::ConnectingFailed { key, .. }
            | HubEvent::Connected { key, .. }
            | HubEvent::Disconnecting { key, .. }
            | HubEvent::DisconnectingFailed { key, .. }
            | HubEvent::Disconnected { key, .. }
            | HubEvent::Redialing { key, .. } => *key,
        }
    }
}

/// What [`Hub::connect`](super::Hub::connect) did.
#[derive(Debug, Clone)]
pub enum ConnectOutcome {
    /// Connected now (by this call's dial, or by the dial it joined).
    Connected(Connection),
    /// The address was already connected.
    AlreadyConnected(Connection),
    /// The address is being disconnected; it is connected again afterwards.
    Deferred,
}
