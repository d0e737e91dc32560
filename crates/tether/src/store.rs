//! Where a server keeps sessions while their clients are away.
//!
//! A server holds live sessions in memory; when a connection that owns a session closes, the
//! session is written to a [`SessionStore`] and marked inactive, so a client can restore it
//! later — after the server's in-memory cache expired it, after a server restart
//! ([`RedbStore`]), or on another server process ([`RedisStore`]). Stores keep each session as
//! an opaque text (the session layer's own serialization) under its id.
//!
//! | store | survives | inactive sessions expire |
//! | --- | --- | --- |
//! | [`MemoryStore`] (default) | nothing | after 24 h, checked at most hourly |
//! | [`RedbStore`] | a server restart | after 24 h, checked at most hourly |
//! | [`RedisStore`] | anything Redis survives; shared by several servers | after 24 h (a Redis TTL) |
//!
//! ```
//! use tether::store::{MemoryStore, SessionStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tether::store::StoreError> {
//! let store = MemoryStore::new();
//! store.set("4c1f…", "serialized session".into()).await?;
//! store.set_inactive("4c1f…").await?;
//! assert_eq!(store.get("4c1f…").await?.as_deref(), Some("serialized session"));
//! # Ok(()) }
//! ```

use futures::future::BoxFuture;
#[cfg(feature = "redb")]
use redb::ReadableTable;
use std::collections::HashMap;
#[cfg(feature = "redb")]
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// How long an inactive session is kept: 24 h, as upstream's default provider.
pub const DEFAULT_INACTIVE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How often expired sessions are looked for: 1 h, as upstream's default provider.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// The most sessions a [`MemoryStore`] keeps by default: 100 000.
pub const DEFAULT_MEMORY_MAX_SESSIONS: usize = 100_000;
/// The most bytes of session text a [`MemoryStore`] keeps by default: 256 MiB.
pub const DEFAULT_MEMORY_MAX_BYTES: usize = 256 << 20;

/// A session store failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The embedded database failed.
    #[error("session database: {0}")]
    Redb(String),
    /// Redis failed or is unreachable.
    #[cfg(feature = "redis")]
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A store URL or path could not be used.
    #[error("invalid session store {0:?}")]
    InvalidSpec(String),
    /// The spec names a store this build of tether leaves out (its Cargo feature is off).
    #[error("session store {spec:?} needs tether's `{feature}` Cargo feature")]
    FeatureDisabled {
        /// The spec as given.
        spec: String,
        /// The Cargo feature that would enable it (`redb` or `redis`).
        feature: &'static str,
    },
}

/// Keeps sessions by id while their clients are away. All methods are async so a store can sit
/// on a network service; the server awaits `set` before it forgets a session from its
/// in-memory cache, so a fast reconnect never misses it.
pub trait SessionStore: Send + Sync + 'static {
    /// The session stored under `id`, if any. Reading a session makes it active again.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;
    /// Stores (or replaces) the session `id`.
    fn set<'a>(&'a self, id: &'a str, session: String) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Marks `id` inactive from now on: it expires after the store's inactive lifetime unless
    /// read again first.
    fn set_inactive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Forgets `id` (a session given up, which must not be restored).
    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Opens the store a command-line spec names: `memory`, `redis://HOST:PORT[/DB]`, or a file
/// path for an embedded [`RedbStore`].
pub async fn open(spec: &str) -> Result<Arc<dyn SessionStore>, StoreError> {
    if spec == "memory" {
        Ok(Arc::new(MemoryStore::new()))
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        {
            Ok(Arc::new(RedisStore::connect(spec).await?))
        }
        #[cfg(not(feature = "redis"))]
        {
            Err(StoreError::FeatureDisabled {
                spec: spec.to_owned(),
                feature: "redis",
            })
        }
    } else if spec.is_empty() {
        Err(StoreError::InvalidSpec(spec.to_owned()))
    } else {
        #[cfg(feature = "redb")]
        {
            let path = spec.to_owned();
            let store = tokio::task::spawn_blocking(move || RedbStore::open(path))
                .await
                .map_err(|e| StoreError::Redb(e.to_string()))??;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "redb"))]
        {
            Err(StoreError::FeatureDisabled {
                spec: spec.to_owned(),
                feature: "redb",
            })
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One stored session and, when inactive, since when (milliseconds since the Unix epoch).
#[derive(Debug, Clone)]
struct Entry {
    value: String,
    inactive_since: Option<u64>,
}

impl Entry {
    /// `<inactive_since or empty>\n<value>`: the format both local stores write.
    // Only RedbStore (and the unit tests) read and write this text.
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    fn encode(&self) -> String {
        let since = self
            .inactive_since
            .map(|t| t.to_string())
            .unwrap_or_default();
        format!("{since}\n{}", self.value)
    }

    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    fn decode(text: &str) -> Option<Entry> {
        let (since, value) = text.split_once('\n')?;
        let inactive_since = if since.is_empty() {
            None
        } else {
            Some(since.parse().ok()?)
        };
        Some(Entry {
            value: value.to_owned(),
            inactive_since,
        })
    }

    fn expired(&self, now: u64, lifetime: Duration) -> bool {
        self.inactive_since
            .is_some_and(|t| now.saturating_sub(t) >= lifetime.as_millis() as u64)
    }
}

/// Sessions in this process's memory (the default). Inactive sessions expire after
/// [`DEFAULT_INACTIVE_LIFETIME`]; expired ones are swept at most every
/// [`DEFAULT_PURGE_INTERVAL`], during other operations, so the store needs no timer task.
///
/// Bounded: at most [`DEFAULT_MEMORY_MAX_SESSIONS`] sessions and
/// [`DEFAULT_MEMORY_MAX_BYTES`] of session text (see [`MemoryStore::with_limits`]); past
/// either, the sessions written longest ago are dropped, with a log line (rate-limited), so a
/// client creating and abandoning sessions cannot grow the process without bound.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
    lifetime: Duration,
    purge_interval: Duration,
    max_sessions: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: HashMap<String, (Entry, u64)>,
    /// Ids in write order with the write's sequence number; an id whose entry was written
    /// again or removed since is skipped when it comes up. Compacted when it holds more than
    /// twice the entries.
    order: std::collections::VecDeque<(u64, String)>,
    next_seq: u64,
    bytes: usize,
    last_purge: u64,
    /// When a drop was last logged, and how many were not logged since.
    dropped_log: (u64, u64),
}

impl MemoryInner {
    fn insert(&mut self, id: &str, entry: Entry) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += entry.value.len() + id.len();
        if let Some((old, _)) = self.entries.insert(id.to_owned(), (entry, seq)) {
            self.bytes -= old.value.len() + id.len();
        }
        self.order.push_back((seq, id.to_owned()));
        if self.order.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(seq, id)| entries.get(id).is_some_and(|(_, s)| s == seq));
        }
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        let (entry, _) = self.entries.remove(id)?;
        self.bytes -= entry.value.len() + id.len();
        Some(entry)
    }

    /// Drops the oldest writes until within both caps; returns how many went.
    fn shrink_to(&mut self, max_sessions: usize, max_bytes: usize) -> usize {
        let mut dropped = 0;
        while self.entries.len() > max_sessions || self.bytes > max_bytes {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&id).is_some_and(|(_, s)| *s == seq) {
                self.remove(&id);
                dropped += 1;
            }
        }
        dropped
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with upstream's defaults (24 h inactive lifetime, hourly purge).
    pub fn new() -> Self {
        Self::with_lifetime(DEFAULT_INACTIVE_LIFETIME, DEFAULT_PURGE_INTERVAL)
    }

    /// A store whose inactive sessions expire after `lifetime`, swept at most every
    /// `purge_interval`.
    pub fn with_lifetime(lifetime: Duration, purge_interval: Duration) -> Self {
        MemoryStore {
            inner: Mutex::new(MemoryInner {
                last_purge: now_ms(),
                ..MemoryInner::default()
            }),
            lifetime,
            purge_interval,
            max_sessions: DEFAULT_MEMORY_MAX_SESSIONS,
            max_bytes: DEFAULT_MEMORY_MAX_BYTES,
        }
    }

    /// Keeps at most `max_sessions` sessions and `max_bytes` of session text (ids included);
    /// past either, the sessions written longest ago are dropped, with a log line at most
    /// every 5 s. Defaults [`DEFAULT_MEMORY_MAX_SESSIONS`] and [`DEFAULT_MEMORY_MAX_BYTES`].
    pub fn with_limits(mut self, max_sessions: usize, max_bytes: usize) -> Self {
        self.max_sessions = max_sessions;
        self.max_bytes = max_bytes;
        self
    }

    /// How many sessions are stored (active or not yet purged).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes every session inactive for at least the lifetime; returns how many went.
    pub fn purge(&self) -> usize {
        let now = now_ms();
        let mut inner = self.lock();
        inner.last_purge = now;
        let expired: Vec<String> = inner
            .entries
            .iter()
            .filter(|(_, (e, _))| e.expired(now, self.lifetime))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            inner.remove(id);
        }
        expired.len()
    }

    fn maybe_purge(&self) {
        let due = now_ms().saturating_sub(self.lock().last_purge)
            >= self.purge_interval.as_millis() as u64;
        if due {
            self.purge();
        }
    }
}

impl SessionStore for MemoryStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        self.maybe_purge();
        let now = now_ms();
        let mut inner = self.lock();
        let found = match inner.entries.get_mut(id) {
            Some((e, _)) if !e.expired(now, self.lifetime) => {
                e.inactive_since = None;
                Some(e.value.clone())
            }
            Some(_) => {
                inner.remove(id);
                None
            }
            None => None,
        };
        Box::pin(async move { Ok(found) })
    }

    fn set<'a>(&'a self, id: &'a str, session: String) -> BoxFuture<'a, Result<(), StoreError>> {
        self.maybe_purge();
        let mut inner = self.lock();
        inner.insert(
            id,
            Entry {
                value: session,
                inactive_since: None,
            },
        );
        let dropped = inner.shrink_to(self.max_sessions, self.max_bytes) as u64;
        if dropped > 0 {
            // One line per 5 s at most: an attack drops many in a row.
            let now = now_ms();
            let (last, held_back) = inner.dropped_log;
            if now.saturating_sub(last) >= 5_000 {
                inner.dropped_log = (now, 0);
                tracing::warn!(
                    dropped = dropped + held_back,
                    sessions = inner.entries.len(),
                    bytes = inner.bytes,
                    "memory session store full: the oldest sessions were dropped"
                );
            } else {
                inner.dropped_log.1 += dropped;
            }
        }
        drop(inner);
        Box::pin(async { Ok(()) })
    }

    fn set_inactive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        if let Some((e, _)) = self.lock().entries.get_mut(id) {
            e.inactive_since = Some(now_ms());
        }
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        self.lock().remove(id);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(feature = "redb")]
const SESSIONS: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("sessions");

/// Sessions in an embedded redb database file, so they survive a server restart. Each
/// operation is one transaction run on tokio's blocking pool; inactive sessions expire as in
/// [`MemoryStore`].
#[cfg(feature = "redb")]
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<redb::Database>,
    lifetime: Duration,
    purge_interval: Duration,
    last_purge: Arc<Mutex<u64>>,
}

#[cfg(feature = "redb")]
impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

#[cfg(feature = "redb")]
fn redb_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Redb(e.to_string())
}

#[cfg(feature = "redb")]
impl RedbStore {
    /// Opens (or creates) the database at `path`. Blocking: call it before starting the server
    /// or from a blocking task. Only one process may hold the file at a time.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_lifetime(path, DEFAULT_INACTIVE_LIFETIME, DEFAULT_PURGE_INTERVAL)
    }

    /// Like [`RedbStore::open`] with its own expiry settings.
    pub fn open_with_lifetime(
        path: impl AsRef<Path>,
        lifetime: Duration,
        purge_interval: Duration,
    ) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(redb_err)?;
        // Create the table up front so readers never see it missing.
        let tx = db.begin_write().map_err(redb_err)?;
        tx.open_table(SESSIONS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        let store = RedbStore {
            db: Arc::new(db),
            lifetime,
            purge_interval,
            last_purge: Arc::new(Mutex::new(0)),
        };
        store.purge_blocking()?;
        Ok(store)
    }

    /// Removes expired sessions (blocking); returns how many went.
    fn purge_blocking(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        *self.last_purge.lock().unwrap_or_else(|e| e.into_inner()) = now;
        let tx = self.db.begin_write().map_err(redb_err)?;
        let removed = {
            let mut table = tx.open_table(SESSIONS).map_err(redb_err)?;
            let mut expired = Vec::new();
            for row in table.iter().map_err(redb_err)? {
                let (k, v) = row.map_err(redb_err)?;
                if Entry::decode(v.value()).is_none_or(|e| e.expired(now, self.lifetime)) {
                    expired.push(k.value().to_owned());
                }
            }
            for k in &expired {
                table.remove(k.as_str()).map_err(redb_err)?;
            }
            expired.len()
        };
        tx.commit().map_err(redb_err)?;
        Ok(removed)
    }

    fn maybe_purge_blocking(&self) -> Result<(), StoreError> {
        let last = *self.last_purge.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms().saturating_sub(last) >= self.purge_interval.as_millis() as u64 {
            self.purge_blocking()?;
        }
        Ok(())
    }

    fn update_blocking(
        &self,
        id: &str,
        f: impl FnOnce(Option<Entry>) -> Option<Entry>,
    ) -> Result<Option<Entry>, StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let result = {
            let mut table = tx.open_table(SESSIONS).map_err(redb_err)?;
            let current = table
                .get(id)
                .map_err(redb_err)?
                .and_then(|v| Entry::decode(v.value()));
            let next = f(current);
            match &next {
                Some(e) => {
                    table.insert(id, e.encode().as_str()).map_err(redb_err)?;
                }
                None => {
                    table.remove(id).map_err(redb_err)?;
                }
            }
            next
        };
        tx.commit().map_err(redb_err)?;
        Ok(result)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RedbStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            store.maybe_purge_blocking()?;
            f(&store)
        })
        .await
        .map_err(redb_err)?
    }
}

#[cfg(feature = "redb")]
impl SessionStore for RedbStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.blocking(move |s| {
                let now = now_ms();
                let lifetime = s.lifetime;
                let entry = s.update_blocking(&id, |cur| {
                    cur.filter(|e| !e.expired(now, lifetime)).map(|e| Entry {
                        inactive_since: None,
                        ..e
                    })
                })?;
                Ok(entry.map(|e| e.value))
            })
            .await
        })
    }

    fn set<'a>(&'a self, id: &'a str, session: String) -> BoxFuture<'a, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.blocking(move |s| {
                s.update_blocking(&id, |_| {
                    Some(Entry {
                        value: session,
                        inactive_since: None,
                    })
                })
                .map(drop)
            })
            .await
        })
    }

    fn set_inactive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.blocking(move |s| {
                let now = now_ms();
                s.update_blocking(&id, |cur| {
                    cur.map(|e| Entry {
                        inactive_since: Some(now),
                        ..e
                    })
                })
                .map(drop)
            })
            .await
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.blocking(move |s| s.update_blocking(&id, |_| None).map(drop))
                .await
        })
    }
}

/// Sessions in Redis, shared by every server process pointed at it: a client whose server
/// went away restores its session on another. Each session is one string key
/// `<prefix><id>`; inactivity is a Redis TTL (24 h by default), cleared when the session is
/// read or written, so Redis does the purging.
#[cfg(feature = "redis")]
#[derive(Clone)]
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    lifetime: Duration,
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "redis")]
impl RedisStore {
    /// Connects to `url` (`redis://host:port[/db]`) with key prefix `tether:session:` and a
    /// 24 h inactive lifetime. The connection reconnects by itself if Redis restarts.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        // Fail fast while Redis is away: a store call sits on a handshake's path, so it gets
        // 2 s per attempt and one quick retry (redis-rs's defaults add up to ~10 s), and the
        // manager keeps reconnecting in the background.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisStore {
            conn,
            prefix: "tether:session:".into(),
            lifetime: DEFAULT_INACTIVE_LIFETIME,
        })
    }

    /// Uses `prefix` before every session id (to share one Redis between deployments).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets how long an inactive session lives.
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }
}

#[cfg(feature = "redis")]
impl SessionStore for RedisStore {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let key = self.key(id);
            // GET and PERSIST in one round trip: reading makes the session active again.
            let (value, _): (Option<String>, i64) = redis::pipe()
                .atomic()
                .get(&key)
                .persist(&key)
                .query_async(&mut conn)
                .await?;
            Ok(value)
        })
    }

    fn set<'a>(&'a self, id: &'a str, session: String) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let () = redis::cmd("SET")
                .arg(self.key(id))
                .arg(session)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn set_inactive<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let secs = self.lifetime.as_secs().max(1) as i64;
            let _: i64 = redis::cmd("EXPIRE")
                .arg(self.key(id))
                .arg(secs)
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: i64 = redis::cmd("DEL")
                .arg(self.key(id))
                .query_async(&mut conn)
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_expire() {
        let e = Entry {
            value: "a\nb".into(),
            inactive_since: Some(1000),
        };
        let back = Entry::decode(&e.encode()).unwrap();
        assert_eq!(back.value, "a\nb");
        assert_eq!(back.inactive_since, Some(1000));
        assert!(!back.expired(1999, Duration::from_secs(1)));
        assert!(back.expired(2000, Duration::from_secs(1)));
        let active = Entry::decode("\nvalue").unwrap();
        assert!(!active.expired(u64::MAX, Duration::ZERO));
        assert!(Entry::decode("garbage").is_none());
    }

    #[tokio::test]
    async fn memory_store_expires_only_inactive_sessions() {
        let store = MemoryStore::with_lifetime(Duration::ZERO, Duration::ZERO);
        store.set("a", "A".into()).await.unwrap();
        store.set("b", "B".into()).await.unwrap();
        store.set_inactive("b").await.unwrap();
        assert_eq!(store.purge(), 1);
        assert_eq!(store.get("a").await.unwrap().as_deref(), Some("A"));
        assert_eq!(store.get("b").await.unwrap(), None);
    }

    /// Without the `redis`/`redb` features, `open` names the missing feature in a typed error
    /// instead of failing as an unknown spec.
    #[cfg(not(all(feature = "redis", feature = "redb")))]
    #[tokio::test]
    async fn open_names_the_feature_a_left_out_store_needs() {
        #[cfg(not(feature = "redis"))]
        assert!(matches!(
            open("redis://127.0.0.1:1").await,
            Err(StoreError::FeatureDisabled {
                feature: "redis",
                ..
            })
        ));
        #[cfg(not(feature = "redb"))]
        assert!(matches!(
            open("/tmp/tether-no-redb/sessions.redb").await,
            Err(StoreError::FeatureDisabled {
                feature: "redb",
                ..
            })
        ));
        assert!(open("memory").await.is_ok());
    }

    #[tokio::test]
    async fn reading_a_session_makes_it_active_again() {
        let store = MemoryStore::with_lifetime(Duration::from_secs(3600), Duration::ZERO);
        store.set("a", "A".into()).await.unwrap();
        store.set_inactive("a").await.unwrap();
        assert_eq!(store.get("a").await.unwrap().as_deref(), Some("A"));
        assert!(store.lock().entries["a"].0.inactive_since.is_none());
    }

    #[tokio::test]
    async fn a_full_memory_store_drops_the_oldest_writes() {
        let store = MemoryStore::new().with_limits(3, usize::MAX);
        for id in ["a", "b", "c", "d"] {
            store.set(id, id.to_uppercase()).await.unwrap();
        }
        assert_eq!(store.len(), 3);
        assert_eq!(store.get("a").await.unwrap(), None);
        // Writing "b" again makes it the newest: "c" goes next.
        store.set("b", "B2".into()).await.unwrap();
        store.set("e", "E".into()).await.unwrap();
        assert_eq!(store.get("c").await.unwrap(), None);
        assert_eq!(store.get("b").await.unwrap().as_deref(), Some("B2"));
        // By bytes: text and id count.
        let store = MemoryStore::new().with_limits(usize::MAX, 10);
        store.set("x", "1234".into()).await.unwrap();
        store.set("y", "1234".into()).await.unwrap();
        assert_eq!(store.lock().bytes, 10);
        store.set("z", "1".into()).await.unwrap();
        assert_eq!(store.get("x").await.unwrap(), None);
        assert_eq!(store.lock().bytes, 7);
        store.remove("y").await.unwrap();
        assert_eq!(store.lock().bytes, 2);
        // Many rewrites of one id keep the order queue bounded.
        for _ in 0..1000 {
            store.set("z", "1".into()).await.unwrap();
        }
        let len = store.len();
        assert!(store.lock().order.len() <= 2 * len + 17);
    }

    #[cfg(feature = "redb")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redb_store_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store.set("s1", "one".into()).await.unwrap();
            store.set("s2", "two".into()).await.unwrap();
            store.set_inactive("s2").await.unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get("s1").await.unwrap().as_deref(), Some("one"));
        assert_eq!(store.get("s2").await.unwrap().as_deref(), Some("two"));
        assert_eq!(store.get("s3").await.unwrap(), None);
        drop(store);
        // Reopening with a zero lifetime purges the inactive one at once.
        let store = RedbStore::open(&path).unwrap();
        store.set_inactive("s2").await.unwrap();
        drop(store);
        let store = RedbStore::open_with_lifetime(&path, Duration::ZERO, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(store.get("s2").await.unwrap(), None);
        assert_eq!(store.get("s1").await.unwrap().as_deref(), Some("one"));
    }
}
