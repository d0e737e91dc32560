//! What a server counts, through the [`metrics`] facade.
//!
//! The library only records; an application chooses an exporter (the `tether` command installs
//! a Prometheus recorder behind `tether serve --admin`). Without a recorder every call here is a
//! no-op of the facade, and per-call timing is skipped altogether until [`enable`] is called,
//! so a library user who wants no metrics pays one relaxed atomic load per call.
//!
//! Label values are bounded: transports and protocols are fixed sets, a call's interface and
//! method are labels only when the application defines them (a call to an unknown name counts
//! under `interface=""`, `method=""`), so a peer cannot grow the number of series.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | [`CONNECTIONS_OPENED`] | counter | `transport`, `protocol` |
//! | [`CONNECTIONS`] | gauge | `transport`, `protocol` |
//! | [`HANDSHAKES`] | counter | `outcome`: `new`, `restored`, `timeout` |
//! | [`CALLS`] | counter | `interface`, `method`, `outcome`: `ok`, `error` |
//! | [`CALL_DURATION`] | histogram (seconds) | `interface`, `method` |
//! | [`EVENTS_SENT`], [`EVENTS_RECEIVED`] | counter | |
//! | [`SESSIONS_STARTED`], [`SESSIONS_DETACHED`], [`SESSIONS_RESTORED`], [`SESSIONS_EXPIRED`] | counter | |
//! | [`SESSIONS_DETACHED_NOW`] | gauge | |
//! | [`SLOW_CONSUMERS`] | counter | |
//! | [`RESEND_BUFFER_BYTES`] | histogram (bytes) | |
//! | [`RESEND_BUFFER_HELD`] | gauge (bytes) | |
//! | [`CLUSTER_EVENTS`] | counter | `kind`: `published`, `delivered`, `dropped`, `missed`, `duplicates`, `malformed` |
//! | [`CLUSTER_CONNECTED`] | gauge (0/1) | |
//! | [`STORE_OPERATIONS`] | counter | `op`, `outcome` |
//! | [`STORE_DURATION`] | histogram (seconds) | `op` |

use crate::app::MethodResult;
use crate::store::{SessionStore, StoreError};
use futures::future::BoxFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Connections accepted, by `transport` (`tcp`, `tls`, `unix`, `ws`, `wss`) and `protocol`
/// (`jstp`, `conductor`, `http`).
pub const CONNECTIONS_OPENED: &str = "tether_connections_opened_total";
/// Connections alive now (attached, or detached and waiting for their client to restore).
pub const CONNECTIONS: &str = "tether_connections";
/// Handshakes by `outcome`.
pub const HANDSHAKES: &str = "tether_handshakes_total";
/// Incoming calls answered, by `interface`, `method`, `outcome`.
pub const CALLS: &str = "tether_calls_total";
/// Time from an incoming call to its answer, by `interface`, `method`.
pub const CALL_DURATION: &str = "tether_call_duration_seconds";
/// Events sent to peers (each event queued for one connection counts once).
pub const EVENTS_SENT: &str = "tether_events_sent_total";
/// Events received from peers.
pub const EVENTS_RECEIVED: &str = "tether_events_received_total";
/// New sessions (a handshake that did not restore one).
pub const SESSIONS_STARTED: &str = "tether_sessions_started_total";
/// Sessions whose transport was lost while the session lives on.
pub const SESSIONS_DETACHED: &str = "tether_sessions_detached_total";
/// Sessions restored by a reconnecting client (from memory or from the store).
pub const SESSIONS_RESTORED: &str = "tether_sessions_restored_total";
/// Sessions detached now: their transport was lost and their client has not restored them yet
/// (kept in memory; the ones only in the store are not counted).
pub const SESSIONS_DETACHED_NOW: &str = "tether_sessions_detached";
/// Detached sessions that expired from memory without a restore.
pub const SESSIONS_EXPIRED: &str = "tether_sessions_expired_total";
/// Sessions ended because their peer did not keep up (resend buffer full).
pub const SLOW_CONSUMERS: &str = "tether_slow_consumers_total";
/// Resend-buffer bytes a session held when its transport was lost or it was ended as slow.
pub const RESEND_BUFFER_BYTES: &str = "tether_resend_buffer_bytes";
/// Bytes held now in the resend buffers of every session of this process (unconfirmed
/// messages, attached or detached). Counted while per-call timing is [`enable`]d: enable it
/// before the first connection.
pub const RESEND_BUFFER_HELD: &str = "tether_resend_buffer_held_bytes";
/// Cluster traffic by `kind`: events this node `published` to the stream, events of other
/// nodes `delivered` to its clients, events it `dropped` (its outbox overflowed while Redis
/// was away), events of other nodes it `missed` (gaps), `duplicates` skipped, `malformed`
/// entries.
pub const CLUSTER_EVENTS: &str = "tether_cluster_events_total";
/// Whether the node's link to the cluster's Redis is up (1) or down (0).
pub const CLUSTER_CONNECTED: &str = "tether_cluster_connected";
/// Session-store operations by `op` (`get`, `set`, `set_inactive`, `remove`) and `outcome`.
pub const STORE_OPERATIONS: &str = "tether_store_operations_total";
/// Session-store operation latency by `op`.
pub const STORE_DURATION: &str = "tether_store_operation_duration_seconds";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns on per-call timing (call it once a recorder is installed). Counters and gauges are
/// recorded through the facade either way.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn transport_label(kind: crate::TransportKind) -> &'static str {
    use crate::TransportKind as K;
    match kind {
        K::Tcp => "tcp",
        K::Tls => "tls",
        K::Unix => "unix",
        K::Ws => "ws",
        K::Wss => "wss",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// A connection was accepted.
pub(crate) fn connection_opened(kind: crate::TransportKind, protocol: &'static str) {
    let t = transport_label(kind);
    metrics::counter!(CONNECTIONS_OPENED, "transport" => t, "protocol" => protocol).increment(1);
    metrics::gauge!(CONNECTIONS, "transport" => t, "protocol" => protocol).increment(1.0);
}

/// A connection ended (`kind` is the transport it last had).
pub(crate) fn connection_closed(kind: Option<crate::TransportKind>, protocol: &'static str) {
    let t = kind.map_or("tcp", transport_label);
    metrics::gauge!(CONNECTIONS, "transport" => t, "protocol" => protocol).decrement(1.0);
}

/// Counts one conductor-protocol connection (plain WebSocket) for as long as it lives:
/// created when the connection is accepted, dropped when it ends.
#[cfg(feature = "conductor")]
#[derive(Debug)]
pub struct ConductorConnectionGuard(());

#[cfg(feature = "conductor")]
impl ConductorConnectionGuard {
    /// Counts a conductor connection as opened and open.
    pub fn new() -> Self {
        connection_opened(crate::TransportKind::Ws, "conductor");
        ConductorConnectionGuard(())
    }
}

#[cfg(feature = "conductor")]
impl Default for ConductorConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "conductor")]
impl Drop for ConductorConnectionGuard {
    fn drop(&mut self) {
        connection_closed(Some(crate::TransportKind::Ws), "conductor");
    }
}

/// A handshake finished: a new session or a restored one.
pub(crate) fn handshake_ready(restored: bool) {
    let outcome = if restored { "restored" } else { "new" };
    metrics::counter!(HANDSHAKES, "outcome" => outcome).increment(1);
    if restored {
        metrics::counter!(SESSIONS_RESTORED).increment(1);
    } else {
        metrics::counter!(SESSIONS_STARTED).increment(1);
    }
}

/// A connection sent no successful handshake in time.
pub(crate) fn handshake_timeout() {
    metrics::counter!(HANDSHAKES, "outcome" => "timeout").increment(1);
}

/// A session lost its transport and waits for its client.
pub(crate) fn session_detached(session: Option<&tether_wire::session::Session>) {
    let buffered_bytes = session.map_or(0, |s| s.buffered_bytes());
    metrics::counter!(SESSIONS_DETACHED).increment(1);
    metrics::gauge!(SESSIONS_DETACHED_NOW).increment(1.0);
    metrics::histogram!(RESEND_BUFFER_BYTES).record(buffered_bytes as f64);
}

/// A session's resend buffer went from `before` to `now` bytes (only while [`enabled`]: this
/// runs on every driver step that sends).
pub(crate) fn resend_buffer_changed(before: usize, now: usize) {
    if before != now && enabled() {
        metrics::gauge!(RESEND_BUFFER_HELD).increment(now as f64 - before as f64);
    }
}

/// `n` cluster events of `kind` (see [`CLUSTER_EVENTS`]).
#[cfg(feature = "cluster")]
pub(crate) fn cluster_events(kind: &'static str, n: u64) {
    metrics::counter!(CLUSTER_EVENTS, "kind" => kind).increment(n);
}

/// The cluster's Redis link went up or down.
#[cfg(feature = "cluster")]
pub(crate) fn cluster_connected(up: bool) {
    metrics::gauge!(CLUSTER_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// A server connection's session left the detached state (restored, expired or closed), if
/// it was in it.
pub(crate) fn session_left_detached(was_detached: bool) {
    if was_detached {
        metrics::gauge!(SESSIONS_DETACHED_NOW).decrement(1.0);
    }
}

/// Counts one HTTP connection (`tether::http` server, TCP with or without TLS) for as long as
/// it lives.
#[cfg(feature = "http")]
#[derive(Debug)]
pub struct HttpConnectionGuard(());

#[cfg(feature = "http")]
impl HttpConnectionGuard {
    /// Counts an HTTP connection as opened and open.
    pub fn new() -> Self {
        connection_opened(crate::TransportKind::Tcp, "http");
        HttpConnectionGuard(())
    }
}

#[cfg(feature = "http")]
impl Default for HttpConnectionGuard {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "http")]
impl Drop for HttpConnectionGuard {
    fn drop(&mut self) {
        connection_closed(Some(crate::TransportKind::Tcp), "http");
    }
}

/// A detached session expired from memory.
pub(crate) fn session_expired() {
    metrics::counter!(SESSIONS_EXPIRED).increment(1);
}

/// A session was ended because its peer did not keep up.
pub(crate) fn slow_consumer(session: Option<&tether_wire::session::Session>) {
    let buffered_bytes = session.map_or(0, |s| s.buffered_bytes());
    metrics::counter!(SLOW_CONSUMERS).increment(1);
    metrics::histogram!(RESEND_BUFFER_BYTES).record(buffered_bytes as f64);
}

/// An event was queued for a peer.
pub(crate) fn event_sent() {
    metrics::counter!(EVENTS_SENT).increment(1);
}

/// An event arrived from a peer.
pub(crate) fn event_received() {
    metrics::counter!(EVENTS_RECEIVED).increment(1);
}

fn call_outcome(result: &MethodResult) -> &'static str {
    if result.is_ok() {
        "ok"
    } else {
        "error"
    }
}

/// Counts an incoming call and, once [`enable`]d, times it: a method found in the application
/// is wrapped so its answer records the latency; a call to an unknown name counts at once with
/// empty labels (peer input never becomes a label).
pub(crate) fn time_call<E>(
    iface: &str,
    method: &str,
    started: Result<BoxFuture<'static, MethodResult>, E>,
) -> Result<BoxFuture<'static, MethodResult>, E> {
    match started {
        Err(e) => {
            metrics::counter!(CALLS, "interface" => "", "method" => "", "outcome" => "error")
                .increment(1);
            Err(e)
        }
        Ok(fut) if !enabled() => Ok(fut),
        Ok(fut) => {
            let (iface, method) = (iface.to_owned(), method.to_owned());
            let start = Instant::now();
            Ok(Box::pin(async move {
                let result = fut.await;
                let outcome = call_outcome(&result);
                metrics::counter!(CALLS, "interface" => iface.clone(), "method" => method.clone(), "outcome" => outcome)
                    .increment(1);
                metrics::histogram!(CALL_DURATION, "interface" => iface, "method" => method)
                    .record(start.elapsed().as_secs_f64());
                result
            }))
        }
    }
}

/// A [`SessionStore`] that counts and times every operation of the store it wraps.
#[derive(Clone)]
pub struct MeteredStore {
    inner: Arc<dyn SessionStore>,
}

impl MeteredStore {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn SessionStore>) -> Arc<dyn SessionStore> {
        Arc::new(MeteredStore { inner })
    }
}

async fn metered<T>(
    op: &'static str,
    fut: BoxFuture<'_, Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = Instant::now();
    let result = fut.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(STORE_OPERATIONS, "op" => op, "outcome" => outcome).increment(1);
    metrics::histogram!(STORE_DURATION, "op" => op).record(start.elapsed().as_secs_f64());
    result
}

impl SessionStore for MeteredStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(metered("get", self.inner.get(id)))
    }

    fn set<'a>(&'a self, id: &'a str, session: String) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(metered("set", self.inner.set(id, session)))
    }

    fn set_inactive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(metered("set_inactive", self.inner.set_inactive(id)))
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(metered("remove", self.inner.remove(id)))
    }
}
