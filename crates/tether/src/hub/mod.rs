//! A hub of connections to many peers, keyed by address (ssb-conn-hub's model, done right).
//!
//! The hub keeps one entry per [`MultiAddress`] in the states `Connecting`, `Connected` or
//! `Disconnecting` (no entry means disconnected), dials through a [`Connector`] (by default a
//! JSTP client, [`JstpConnector`]), and reports every transition exactly once on the
//! [`Hub::listen`] stream and as table snapshots on the [`Hub::live_entries`] stream.
//!
//! Unlike upstream: concurrent `connect` calls on a connecting address share one dial *and its
//! failure*; `disconnect` aborts a dial in progress; a `connect` made while disconnecting runs
//! again, with its data, once the disconnect is done; `disconnected` is reported once per
//! connection; after [`Hub::close`] every call fails with [`HubError::Closed`].
//!
//! The hub also keeps its peers (see [`Scheduler`]): an address given to
//! [`Hub::connect`] is redialled with backoff whenever it is lost, until [`Hub::disconnect`]
//! ([`HubEvent::Redialing`]); a liveness check moves a frozen peer to disconnected
//! ([`Cause::NoPong`]); and its connection may restore its own session across a dropped link.
//! [`Schedule::off`] is upstream's behaviour.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether::hub::HubError> {
//! use futures::StreamExt;
//! use tether::hub::{ConnectOutcome, Hub, HubOptions};
//! use tether::Value;
//!
//! let hub = Hub::new(HubOptions::jstp("testApp"));
//! let mut events = hub.listen()?;
//! match hub.connect("net:127.0.0.1:3000", Default::default()).await? {
//!     ConnectOutcome::Connected(conn) | ConnectOutcome::AlreadyConnected(conn) => {
//!         let answer = conn.call("calculator", "answer", vec![]).await?;
//!         assert_eq!(answer, vec![Value::from(42)]);
//!     }
//!     ConnectOutcome::Deferred => {}
//! }
//! println!("{:?}", events.next().await);
//! hub.close().await;
//! # Ok(()) }
//! ```

mod address;
mod book;
mod connector;
mod scheduler;
mod stream;
mod types;

pub use address::{Address, AddressError, MultiAddress, PeerKey, Protocol};
pub use book::{BookEntry, BookError, BookState, Outcome, OutcomeKind, PeerBook};
pub use connector::{Connector, JstpConnector, MaxConnections, OnePerKey, Policy};
pub use scheduler::{Heartbeat, Redial, Schedule, Scheduler};
pub use stream::{Events, Lagged, LiveEntries};
pub use types::{Cause, ConnectOutcome, Direction, Entry, HubError, HubEvent, HubState};

use crate::client::ClientOptions;
use crate::connection::Connection;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tether_wire::{Object, Value};
use tokio::sync::broadcast;

/// How a hub is set up.
pub struct HubOptions {
    /// How to dial.
    pub connector: Arc<dyn Connector>,
    /// Checked in order before every new connection.
    pub policies: Vec<Arc<dyn Policy>>,
    /// Items queued per listener of [`Hub::listen`] and [`Hub::live_entries`]; one that falls
    /// further behind gets a [`Lagged`] item. Default 1024.
    pub channel_capacity: usize,
    /// How each peer is kept (redial, liveness, session resumption). Default
    /// [`Schedule::default`].
    pub scheduler: Arc<dyn Scheduler>,
    /// The peer book: kept, staged and known peers with their last outcome. Default
    /// [`PeerBook::memory`]; [`PeerBook::open`] persists it.
    pub book: PeerBook,
}

impl HubOptions {
    /// A hub dialling JSTP application `app` with default client options.
    pub fn jstp(app: impl Into<String>) -> Self {
        Self::with_connector(JstpConnector::new(app, ClientOptions::default()))
    }

    /// A hub dialling through `connector`.
    pub fn with_connector(connector: impl Connector) -> Self {
        HubOptions {
            connector: Arc::new(connector),
            policies: Vec::new(),
            channel_capacity: 1024,
            scheduler: Arc::new(Schedule::default()),
            book: PeerBook::memory(),
        }
    }

    /// Keeps peers by `scheduler` (a [`Schedule`] for all, or a closure per address).
    pub fn scheduler(mut self, scheduler: impl Scheduler) -> Self {
        self.scheduler = Arc::new(scheduler);
        self
    }

    /// Keeps the peers in `book` (e.g. one persisted with [`PeerBook::open`]).
    pub fn book(mut self, book: PeerBook) -> Self {
        self.book = book;
        self
    }

    /// Adds a policy.
    pub fn policy(mut self, policy: impl Policy) -> Self {
        self.policies.push(Arc::new(policy));
        self
    }
}

type Dial = Shared<BoxFuture<'static, Result<Connection, HubError>>>;

struct Slot {
    entry: Entry,
    /// Distinguishes successive connections to one address.
    generation: u64,
    dial: Option<(Dial, tokio::task::AbortHandle)>,
    /// A `connect` made while disconnecting: run it afterwards with this data.
    reconnect: Option<Object>,
    /// The liveness check of the connection.
    heartbeat: Option<Heartbeat>,
}

/// An address the hub redials when it is lost, until `disconnect`.
struct Kept {
    data: Object,
    schedule: Schedule,
    /// Losses since the last successful dial.
    failures: u32,
    /// The pending redial.
    timer: Option<tokio::task::AbortHandle>,
}

impl Kept {
    fn cancel(&mut self) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }
}

struct State {
    closed: bool,
    slots: HashMap<String, Slot>,
    kept: HashMap<String, Kept>,
    next_generation: u64,
    /// Dropped by `close`, which ends every listener's stream.
    events: Option<broadcast::Sender<HubEvent>>,
    snapshots: Option<broadcast::Sender<Vec<(String, Entry)>>>,
}

struct Inner {
    state: Mutex<State>,
    connector: Arc<dyn Connector>,
    policies: Vec<Arc<dyn Policy>>,
    scheduler: Arc<dyn Scheduler>,
    book: PeerBook,
}

/// A hub of connections to many peers. Cloning gives another handle on the same hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn snapshot(state: &State) -> Vec<(String, Entry)> {
    let mut entries: Vec<_> = state
        .slots
        .iter()
        .map(|(a, s)| (a.clone(), s.entry.clone()))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports an event and the new table, under the state lock so the order is the order of
    /// the changes.
    fn changed(&self, state: &State, event: Option<HubEvent>) {
        if let Some(event) = &event {
            self.record(event);
        }
        if let (Some(event), Some(events)) = (event, &state.events) {
            let _ = events.send(event);
        }
        if let Some(snapshots) = state.snapshots.as_ref().filter(|s| s.receiver_count() > 0) {
            let _ = snapshots.send(snapshot(state));
        }
    }
}

impl Inner {
    /// Keeps the last outcome of a peer in the book. A failed write is logged, not returned:
    /// the transition happened whatever the file says.
    fn record(&self, event: &HubEvent) {
        let (kind, detail) = match event {
            HubEvent::Connected { .. } => (OutcomeKind::Connected, None),
            HubEvent::ConnectingFailed { error, .. } => {
                (OutcomeKind::ConnectingFailed, Some(error.to_string()))
            }
            HubEvent::Disconnected { cause, .. } => {
                (OutcomeKind::Disconnected, Some(cause.to_string()))
            }
            _ => return,
        };
        if let Err(e) = self.book.record(event.address(), kind, detail) {
            tracing::warn!(address = event.address(), error = %e, "peer book write failed");
        }
    }
}

/// Waits until `conn` closes or leaves a ping unanswered for `hb.timeout`.
async fn liveness(conn: &Connection, hb: Heartbeat) -> Cause {
    loop {
        tokio::select! {
            _ = conn.closed() => return Cause::Closed,
            _ = tokio::time::sleep(hb.interval) => {}
        }
        match tokio::time::timeout(hb.timeout, conn.ping()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) if conn.is_closed() => return Cause::Closed,
            _ => return Cause::NoPong(hb.timeout),
        }
    }
}

impl Hub {
    /// A new, empty hub.
    pub fn new(options: HubOptions) -> Hub {
        let capacity = options.channel_capacity.max(1);
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    closed: false,
                    slots: HashMap::new(),
                    kept: HashMap::new(),
                    next_generation: 1,
                    events: Some(broadcast::channel(capacity).0),
                    snapshots: Some(broadcast::channel(capacity).0),
                }),
                connector: options.connector,
                policies: options.policies,
                scheduler: options.scheduler,
                book: options.book,
            }),
        }
    }

    fn open_state(&self) -> Result<std::sync::MutexGuard<'_, State>, HubError> {
        let state = self.inner.lock();
        if state.closed {
            Err(HubError::Closed)
        } else {
            Ok(state)
        }
    }

    /// Connects to `address` unless it is in the hub already; concurrent calls for one
    /// address share one dial and its outcome. From now until [`Hub::disconnect`], the
    /// address is kept by its [`Schedule`]: redialled whenever it is lost (a failed dial
    /// included), and a pending redial starts now.
    pub async fn connect(&self, address: &str, data: Object) -> Result<ConnectOutcome, HubError> {
        let parsed: MultiAddress = address.parse()?;
        parsed.check_transports()?;
        parsed.check_layers(self.inner.connector.verified_layers())?;
        let schedule = self.inner.scheduler.schedule(&parsed);
        drop(self.open_state()?);
        // Into the book first (out of staging, if it was there), so a restart keeps it.
        let booked = self.inner.book.get(address);
        if booked.is_none_or(|b| b.state != BookState::Kept || b.data != data) {
            let book = self.inner.book.clone();
            let (addr, d) = (address.to_owned(), data.clone());
            let put = move || book.put(&addr, BookState::Kept, d);
            // A file commit waits for an fsync: off the runtime's threads.
            let written = if self.inner.book.is_persistent() {
                tokio::task::spawn_blocking(put)
                    .await
                    .map_err(|_| HubError::Aborted)?
            } else {
                put()
            };
            written.map_err(|e| HubError::Book(Arc::new(e)))?;
        }
        let dial = {
            let mut state = self.open_state()?;
            match state.kept.get_mut(address) {
                Some(kept) => {
                    kept.cancel();
                    kept.schedule = schedule.clone();
                }
                None if schedule.redial.is_some() => {
                    let kept = Kept {
                        data: data.clone(),
                        schedule: schedule.clone(),
                        failures: 0,
                        timer: None,
                    };
                    state.kept.insert(address.to_owned(), kept);
                }
                None => {}
            }
            match state.slots.get_mut(address) {
                Some(slot) => match slot.entry.state {
                    HubState::Connected => {
                        let conn = slot.entry.connection.clone().ok_or(HubError::Aborted)?;
                        return Ok(ConnectOutcome::AlreadyConnected(conn));
                    }
                    HubState::Connecting => match &slot.dial {
                        Some((dial, _)) => dial.clone(),
                        None => return Err(HubError::Aborted),
                    },
                    HubState::Disconnecting => {
                        slot.reconnect = Some(data);
                        return Ok(ConnectOutcome::Deferred);
                    }
                },
                None => self.start_dial(&mut state, address, parsed, data, schedule)?,
            }
        };
        dial.await.map(ConnectOutcome::Connected)
    }

    /// A scheduled redial: dials `address` again unless it was dropped or is in the hub.
    async fn redial_now(&self, address: &str) {
        let dial = {
            let mut state = self.inner.lock();
            if state.closed || state.slots.contains_key(address) {
                return;
            }
            let Some(kept) = state.kept.get_mut(address) else {
                return;
            };
            kept.timer = None;
            let (data, schedule) = (kept.data.clone(), kept.schedule.clone());
            let Ok(parsed) = address.parse::<MultiAddress>() else {
                return;
            };
            match self.start_dial(&mut state, address, parsed, data, schedule) {
                Ok(dial) => dial,
                Err(_) => return,
            }
        };
        // The outcome is reported as events (and schedules the next redial on failure).
        let _ = dial.await;
    }

    /// `address` was lost (a failed dial or an ended connection): schedules its redial if it
    /// is kept, or lets it go if its schedule gives up.
    fn after_loss(&self, state: &mut State, address: &str, key: Option<PeerKey>) {
        if state.closed {
            return;
        }
        let Some(kept) = state.kept.get_mut(address) else {
            return;
        };
        let failures = kept.failures;
        kept.failures = failures.saturating_add(1);
        let delay = kept
            .schedule
            .redial
            .as_ref()
            .and_then(|r| r.next_redial(address, failures));
        let Some(delay) = delay else {
            state.kept.remove(address);
            return;
        };
        let hub = self.clone();
        let addr = address.to_owned();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            hub.redial_now(&addr).await;
        });
        kept.cancel();
        kept.timer = Some(task.abort_handle());
        let event = HubEvent::Redialing {
            address: address.to_owned(),
            key,
            delay,
            failures: failures.saturating_add(1),
        };
        self.inner.changed(state, Some(event));
    }

    fn start_dial(
        &self,
        state: &mut State,
        address: &str,
        parsed: MultiAddress,
        data: Object,
        schedule: Schedule,
    ) -> Result<Dial, HubError> {
        let key = parsed.key();
        let entries = snapshot(state);
        for policy in &self.inner.policies {
            if let Err(reason) = policy.admit(address, key.as_ref(), &entries) {
                let error = HubError::Refused(reason);
                let event = HubEvent::ConnectingFailed {
                    address: address.to_owned(),
                    key,
                    error: error.clone(),
                };
                self.inner.changed(state, Some(event));
                // A slot may free up: a kept peer is tried again like after a failed dial.
                self.after_loss(state, address, key);
                return Err(error);
            }
        }
        let generation = state.next_generation;
        state.next_generation += 1;
        let now = SystemTime::now();
        // The dial runs in its own task so it can be aborted, and records its outcome itself:
        // the state changes once, however many callers await it.
        let hub = self.clone();
        let addr = address.to_owned();
        let resume = schedule.resume;
        let task = tokio::spawn(async move {
            let result = hub.inner.connector.connect(parsed, resume).await;
            hub.dial_done(&addr, generation, result)
        });
        let abort = task.abort_handle();
        let dial: Dial = async move {
            match task.await {
                Ok(r) => r,
                Err(_) => Err(HubError::Aborted),
            }
        }
        .boxed()
        .shared();
        state.slots.insert(
            address.to_owned(),
            Slot {
                entry: Entry {
                    state: HubState::Connecting,
                    key,
                    direction: None,
                    connection: None,
                    data,
                    birth: now,
                    updated: now,
                },
                generation,
                dial: Some((dial.clone(), abort)),
                reconnect: None,
                heartbeat: schedule.heartbeat,
            },
        );
        self.inner.changed(
            state,
            Some(HubEvent::Connecting {
                address: address.to_owned(),
                key,
            }),
        );
        Ok(dial)
    }

    /// Records a dial's outcome, if the entry is still the one that started it.
    fn dial_done(
        &self,
        address: &str,
        generation: u64,
        result: Result<Connection, HubError>,
    ) -> Result<Connection, HubError> {
        let mut state = self.inner.lock();
        let current = state
            .slots
            .get(address)
            .is_some_and(|s| s.generation == generation && s.entry.state == HubState::Connecting);
        if !current {
            // Disconnected (or closed) meanwhile: the connection is not wanted.
            if let Ok(conn) = result {
                tokio::spawn(async move { conn.close().await });
            }
            return Err(HubError::Aborted);
        }
        match result {
            Ok(conn) => {
                let Some(slot) = state.slots.get_mut(address) else {
                    return Err(HubError::Aborted);
                };
                slot.dial = None;
                slot.entry.state = HubState::Connected;
                slot.entry.direction = Some(Direction::Outbound);
                slot.entry.connection = Some(conn.clone());
                slot.entry.updated = SystemTime::now();
                let (key, heartbeat) = (slot.entry.key, slot.heartbeat);
                if let Some(kept) = state.kept.get_mut(address) {
                    kept.failures = 0;
                }
                self.watch(address, generation, &conn, heartbeat);
                self.inner.changed(
                    &state,
                    Some(HubEvent::Connected {
                        address: address.to_owned(),
                        key,
                        connection: conn.clone(),
                        direction: Direction::Outbound,
                    }),
                );
                Ok(conn)
            }
            Err(error) => {
                let Some(slot) = state.slots.remove(address) else {
                    return Err(error);
                };
                self.inner.changed(
                    &state,
                    Some(HubEvent::ConnectingFailed {
                        address: address.to_owned(),
                        key: slot.entry.key,
                        error: error.clone(),
                    }),
                );
                self.after_loss(&mut state, address, slot.entry.key);
                Err(error)
            }
        }
    }

    /// Removes the entry when its connection closes (the peer went away, or we closed it) or
    /// fails its liveness check (then closes it), and schedules the redial of a kept peer.
    fn watch(
        &self,
        address: &str,
        generation: u64,
        conn: &Connection,
        heartbeat: Option<Heartbeat>,
    ) {
        let hub = self.clone();
        let address = address.to_owned();
        let conn = conn.clone();
        tokio::spawn(async move {
            let cause = match heartbeat {
                None => {
                    conn.closed().await;
                    Cause::Closed
                }
                Some(hb) => liveness(&conn, hb).await,
            };
            if hub.lost(&address, generation, cause) && matches!(cause, Cause::NoPong(_)) {
                conn.close().await;
            }
        });
    }

    /// Removes the connected entry of `address` if it is still connection `generation` (a
    /// disconnect in progress reports the end itself); `false` if it was not.
    fn lost(&self, address: &str, generation: u64, cause: Cause) -> bool {
        let mut state = self.inner.lock();
        let ours = state
            .slots
            .get(address)
            .is_some_and(|s| s.generation == generation && s.entry.state == HubState::Connected);
        if !ours {
            return false;
        }
        let Some(slot) = state.slots.remove(address) else {
            return false;
        };
        let key = slot.entry.key;
        let event = HubEvent::Disconnected {
            address: address.to_owned(),
            key,
            cause,
        };
        self.inner.changed(&state, Some(event));
        self.after_loss(&mut state, address, key);
        true
    }

    /// Disconnects `address`: aborts its dial or closes its connection. `Ok(false)` if it was
    /// not in the hub.
    /// The peer stays in the book as [`BookState::Known`]: not dialled after a restart.
    pub async fn disconnect(&self, address: &str) -> Result<bool, HubError> {
        drop(self.open_state()?);
        self.unkeep(address)?;
        self.disconnect_inner(address).await
    }

    /// A kept peer in the book becomes known: it is no longer dialled after a restart.
    fn unkeep(&self, address: &str) -> Result<(), HubError> {
        if self
            .inner
            .book
            .get(address)
            .is_some_and(|b| b.state == BookState::Kept)
        {
            self.inner
                .book
                .set_state(address, BookState::Known)
                .map_err(|e| HubError::Book(Arc::new(e)))?;
        }
        Ok(())
    }

    /// Disconnects `address` and removes it from the book. `Ok(false)` if it was neither in
    /// the hub nor in the book.
    pub async fn forget(&self, address: &str) -> Result<bool, HubError> {
        let was_in_hub = self.disconnect(address).await?;
        let was_in_book = self
            .inner
            .book
            .remove(address)
            .map_err(|e| HubError::Book(Arc::new(e)))?;
        Ok(was_in_hub || was_in_book)
    }

    /// Stages `address` (ssb-conn's staging): the book knows it as a suggestion, and it is not
    /// dialled until [`Hub::connect`] takes it out of staging. The address is checked as
    /// `connect` checks it. `Ok(false)` if it is in the hub or kept already (the connected
    /// and the suggested stay apart).
    pub fn stage(&self, address: &str, data: Object) -> Result<bool, HubError> {
        let parsed: MultiAddress = address.parse()?;
        parsed.check_transports()?;
        parsed.check_layers(self.inner.connector.verified_layers())?;
        let state = self.open_state()?;
        let kept = self
            .inner
            .book
            .get(address)
            .is_some_and(|b| b.state == BookState::Kept);
        if kept || state.slots.contains_key(address) || state.kept.contains_key(address) {
            return Ok(false);
        }
        self.inner
            .book
            .put(address, BookState::Staged, data)
            .map_err(|e| HubError::Book(Arc::new(e)))?;
        Ok(true)
    }

    /// Takes `address` out of staging (and out of the book). `Ok(false)` if it was not staged.
    pub fn unstage(&self, address: &str) -> Result<bool, HubError> {
        drop(self.open_state()?);
        if self
            .inner
            .book
            .get(address)
            .is_none_or(|b| b.state != BookState::Staged)
        {
            return Ok(false);
        }
        self.inner
            .book
            .remove(address)
            .map_err(|e| HubError::Book(Arc::new(e)))
    }

    /// The staged peers, sorted by address.
    pub fn staged(&self) -> Result<Vec<(String, BookEntry)>, HubError> {
        drop(self.open_state()?);
        Ok(self.inner.book.in_state(BookState::Staged))
    }

    /// The hub's peer book (kept, staged and known peers).
    pub fn book(&self) -> &PeerBook {
        &self.inner.book
    }

    /// Connects every peer the book keeps (what a restarted hub does first), each with its
    /// data; the outcomes are reported as events. Returns how many dials started.
    pub fn connect_book(&self) -> Result<usize, HubError> {
        drop(self.open_state()?);
        let kept = self.inner.book.in_state(BookState::Kept);
        for (address, entry) in &kept {
            let hub = self.clone();
            let (address, data) = (address.clone(), entry.data.clone());
            tokio::spawn(async move {
                // Reported as events; an address that no longer parses is reported by none.
                let _ = hub.connect(&address, data).await;
            });
        }
        Ok(kept.len())
    }

    async fn disconnect_inner(&self, address: &str) -> Result<bool, HubError> {
        let (previous, generation, conn) = {
            let mut state = self.inner.lock();
            // Asked to go: no more redials.
            let kept = state.kept.remove(address).map(|mut k| k.cancel()).is_some();
            let Some(slot) = state.slots.get_mut(address) else {
                return Ok(kept);
            };
            let previous = slot.entry.state;
            if previous == HubState::Disconnecting {
                // Someone else is at it; their disconnect reports the end.
                return Ok(true);
            }
            slot.entry.state = HubState::Disconnecting;
            slot.entry.updated = SystemTime::now();
            if let Some((_, abort)) = slot.dial.take() {
                abort.abort();
            }
            let (generation, conn, key) = (
                slot.generation,
                slot.entry.connection.clone(),
                slot.entry.key,
            );
            self.inner.changed(
                &state,
                Some(HubEvent::Disconnecting {
                    address: address.to_owned(),
                    key,
                }),
            );
            (previous, generation, conn)
        };
        if let Some(conn) = conn {
            if let Err(error) = self.inner.connector.disconnect(conn).await {
                let mut state = self.inner.lock();
                if let Some(slot) = state.slots.get_mut(address) {
                    if slot.generation == generation {
                        slot.entry.state = previous;
                        slot.entry.updated = SystemTime::now();
                        let key = slot.entry.key;
                        self.inner.changed(
                            &state,
                            Some(HubEvent::DisconnectingFailed {
                                address: address.to_owned(),
                                key,
                                error: error.clone(),
                            }),
                        );
                    }
                }
                return Err(error);
            }
        }
        let reconnect = {
            let mut state = self.inner.lock();
            let ours = state
                .slots
                .get(address)
                .is_some_and(|s| s.generation == generation);
            if !ours {
                return Ok(true);
            }
            let Some(slot) = state.slots.remove(address) else {
                return Ok(true);
            };
            self.inner.changed(
                &state,
                Some(HubEvent::Disconnected {
                    address: address.to_owned(),
                    key: slot.entry.key,
                    cause: Cause::Requested,
                }),
            );
            slot.reconnect.filter(|_| !state.closed)
        };
        if let Some(data) = reconnect {
            let hub = self.clone();
            let address = address.to_owned();
            tokio::spawn(async move {
                let _ = hub.connect(&address, data).await;
            });
        }
        Ok(true)
    }

    /// Merges `data` into the entry of `address` (keys with `undefined` values are skipped).
    /// `Ok(false)` if the address is not in the hub.
    pub fn update(&self, address: &str, data: Object) -> Result<bool, HubError> {
        let mut state = self.open_state()?;
        let Some(slot) = state.slots.get_mut(address) else {
            return Ok(false);
        };
        for (k, v) in data.iter() {
            if *v != Value::Undefined {
                slot.entry.data.insert(k, v.clone());
            }
        }
        slot.entry.updated = SystemTime::now();
        self.inner.changed(&state, None);
        Ok(true)
    }

    /// Disconnects everything (dials in progress are aborted).
    /// Kept peers in the book become known, as after [`Hub::disconnect`].
    pub async fn reset(&self) -> Result<(), HubError> {
        drop(self.open_state()?);
        for (address, _) in self.inner.book.in_state(BookState::Kept) {
            self.unkeep(&address)?;
        }
        self.reset_inner().await;
        Ok(())
    }

    async fn reset_inner(&self) {
        let addresses: Vec<String> = {
            let mut state = self.inner.lock();
            for (_, mut kept) in state.kept.drain() {
                kept.cancel();
            }
            state.slots.keys().cloned().collect()
        };
        let all = addresses.iter().map(|a| self.disconnect_inner(a));
        futures::future::join_all(all).await;
    }

    /// A snapshot of the table, sorted by address.
    pub fn entries(&self) -> Result<Vec<(String, Entry)>, HubError> {
        let state = self.open_state()?;
        Ok(snapshot(&state))
    }

    /// The current table, then a new one after every change.
    pub fn live_entries(&self) -> Result<LiveEntries, HubError> {
        let state = self.open_state()?;
        let snapshots = state.snapshots.as_ref().ok_or(HubError::Closed)?;
        Ok(LiveEntries::new(snapshot(&state), snapshots.subscribe()))
    }

    /// Transitions from now on, each reported once.
    pub fn listen(&self) -> Result<Events, HubError> {
        let state = self.open_state()?;
        Ok(Events::new(
            state.events.as_ref().ok_or(HubError::Closed)?.subscribe(),
        ))
    }

    /// The state of `address`; `None` when disconnected.
    pub fn get_state(&self, address: &str) -> Result<Option<HubState>, HubError> {
        Ok(self.open_state()?.slots.get(address).map(|s| s.entry.state))
    }

    /// Registers a connection the peer opened to us, under `address`. If an entry with the
    /// same key is connecting, the inbound connection takes its place (the dial is aborted).
    /// Policies apply; a refused connection is closed.
    pub async fn register_inbound(
        &self,
        address: &str,
        key: Option<PeerKey>,
        connection: Connection,
    ) -> Result<(), HubError> {
        let refused = {
            let mut state = self.open_state()?;
            let dialing = key.and_then(|k| {
                state
                    .slots
                    .iter()
                    .find(|(_, s)| s.entry.key == Some(k) && s.entry.state == HubState::Connecting)
                    .map(|(a, _)| a.clone())
            });
            let target = dialing.unwrap_or_else(|| address.to_owned());
            let entries: Vec<_> = snapshot(&state)
                .into_iter()
                .filter(|(a, _)| *a != target)
                .collect();
            let refused = self
                .inner
                .policies
                .iter()
                .find_map(|p| p.admit(&target, key.as_ref(), &entries).err());
            match refused {
                Some(reason) => Some(HubError::Refused(reason)),
                None if state
                    .slots
                    .get(&target)
                    .is_some_and(|s| s.entry.state != HubState::Connecting) =>
                {
                    Some(HubError::Refused(format!("{target} is already in the hub")))
                }
                None => {
                    let heartbeat = match state.kept.get(&target) {
                        Some(kept) => kept.schedule.heartbeat,
                        None => target
                            .parse::<MultiAddress>()
                            .ok()
                            .and_then(|a| self.inner.scheduler.schedule(&a).heartbeat),
                    };
                    let generation = state.next_generation;
                    state.next_generation += 1;
                    let now = SystemTime::now();
                    let (data, birth) = match state.slots.remove(&target) {
                        Some(slot) => {
                            if let Some((_, abort)) = slot.dial {
                                abort.abort();
                            }
                            (slot.entry.data, slot.entry.birth)
                        }
                        None => (Object::new(), now),
                    };
                    state.slots.insert(
                        target.clone(),
                        Slot {
                            entry: Entry {
                                state: HubState::Connected,
                                key,
                                direction: Some(Direction::Inbound),
                                connection: Some(connection.clone()),
                                data,
                                birth,
                                updated: now,
                            },
                            generation,
                            dial: None,
                            reconnect: None,
                            heartbeat,
                        },
                    );
                    self.watch(&target, generation, &connection, heartbeat);
                    self.inner.changed(
                        &state,
                        Some(HubEvent::Connected {
                            address: target,
                            key,
                            connection: connection.clone(),
                            direction: Direction::Inbound,
                        }),
                    );
                    None
                }
            }
        };
        match refused {
            Some(error) => {
                connection.close().await;
                Err(error)
            }
            None => Ok(()),
        }
    }

    /// Disconnects everything and closes the hub; later calls fail with
    /// [`HubError::Closed`]. Closing twice is harmless. The book keeps its peers as they are
    /// (kept peers are dialled again by the next hub's [`Hub::connect_book`]) and is flushed.
    pub async fn close(&self) {
        {
            let mut state = self.inner.lock();
            if state.closed {
                return;
            }
            state.closed = true;
        }
        self.reset_inner().await;
        if let Err(e) = self.inner.book.flush() {
            tracing::warn!(error = %e, "peer book flush failed");
        }
        let mut state = self.inner.lock();
        state.events = None;
        state.snapshots = None;
    }
}
