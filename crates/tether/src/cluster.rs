//! A cluster of servers: every server-wide broadcast reaches the clients of every node.
//!
//! Nodes share one Redis (the one `--store redis://…` already uses, or another) and one
//! Redis **stream**. [`Server::broadcast`](crate::Server::broadcast) (and `broadcast_async`)
//! queues the event for the local clients at once, as on a single node, and also appends it to
//! the stream (`XADD … MAXLEN ~ N`). Every node reads the stream from the last entry it has seen
//! (`XREAD BLOCK`) and delivers what the *other* nodes published to its own clients.
//!
//! Why a stream rather than pub/sub: a node that loses Redis for a while resumes reading from
//! the id it last saw, so it catches up on everything still in the stream; pub/sub would drop
//! whatever was published while it was away, silently.
//!
//! Guarantees, and how they are kept:
//!
//! - **Once each.** Every entry carries its publisher's instance id (random per process) and a
//!   sequence number. A node delivers an entry only if its sequence is above the last one it
//!   delivered from that publisher, so a batch that is re-sent after a lost reply (some of it may
//!   already be in the stream) is never delivered twice. A node skips its own entries (its
//!   clients already had them).
//! - **Publication order per publishing node.** One task per node appends in sequence order;
//!   stream ids grow, readers deliver in id order.
//! - **Gaps are reported, never hidden.** Sequence numbers are given when the event is
//!   broadcast, so an event that never made it into the stream (the outbox overflowed while
//!   Redis was away) or left it before a node read it (trimmed by `MAXLEN`, or Redis restarted
//!   without persistence) shows as a jump: the node logs `cluster gap` with the publisher and
//!   the exact sequence numbers it could not deliver, and counts them in
//!   [`ClusterStats::missed`].
//! - **Redis away.** Local clients keep getting local broadcasts at once. Events for the other
//!   nodes wait in the local outbox (bounded, [`ClusterOptionsBuilder::outbox_capacity`]);
//!   the state changes are logged (`cluster lost Redis`, `cluster Redis is back`,
//!   `cluster caught up`), at most once per [`LOG_INTERVAL`] for repeated failures.
//!
//! Bounds: the stream keeps about [`ClusterOptionsBuilder::max_len`] entries (default
//! 100 000; `~` lets Redis trim whole nodes, so slightly more); the outbox holds
//! [`ClusterOptionsBuilder::outbox_capacity`] events (default 65 536); one read takes at most
//! [`READ_COUNT`] entries and one append burst at most [`PUBLISH_BATCH`]; the table of
//! publishers seen is capped at [`MAX_ORIGINS`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tether::cluster::{Cluster, ClusterOptions};
//! let options = ClusterOptions::builder("redis://127.0.0.1:6379").node_id("a").build()?;
//! let cluster = Cluster::join(options).await?;
//! let server = tether::Server::builder().cluster(cluster).build()?;
//! # Ok(()) }
//! ```

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tether_wire::Value;
use tokio::sync::{mpsc, watch, Notify};

/// Most entries appended to the stream in one pipelined burst.
pub const PUBLISH_BATCH: usize = 256;
/// Most entries one `XREAD` returns.
pub const READ_COUNT: usize = 512;
/// Most publishers (process instances) whose last sequence number a node remembers; the one
/// heard from least recently is forgotten first (a node that restarted long ago).
pub const MAX_ORIGINS: usize = 4096;
/// Repeated Redis failures are logged at most once per this interval.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Why a cluster could not be configured or joined.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The Redis URL is invalid.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// An option is out of range.
    #[error("cluster option {option}: {reason}")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// How a node joins its cluster. Build with [`ClusterOptions::builder`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    url: String,
    node_id: String,
    stream: String,
    max_len: usize,
    outbox: usize,
    block: Duration,
}

impl ClusterOptions {
    /// Options for a cluster whose nodes share the Redis at `url` (`redis://host:port[/db]`).
    pub fn builder(url: impl Into<String>) -> ClusterOptionsBuilder {
        ClusterOptionsBuilder {
            options: ClusterOptions {
                url: url.into(),
                node_id: default_node_id(),
                stream: "tether:cluster:events".into(),
                max_len: 100_000,
                outbox: 65_536,
                block: Duration::from_secs(2),
            },
        }
    }

    /// This node's name in logs and in the stream.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// Builds [`ClusterOptions`].
#[derive(Debug, Clone)]
pub struct ClusterOptionsBuilder {
    options: ClusterOptions,
}

impl ClusterOptionsBuilder {
    /// This node's name, in logs and in every entry it publishes. Default: the host name and
    /// the process id, `host-1234`.
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.options.node_id = id.into();
        self
    }

    /// The stream's key. Default `tether:cluster:events`; nodes with different keys are
    /// different clusters.
    pub fn stream_key(mut self, key: impl Into<String>) -> Self {
        self.options.stream = key.into();
        self
    }

    /// About how many entries the stream keeps (`XADD MAXLEN ~`). Default 100 000: at
    /// 10 000 events/s, a node may be away from Redis for ten seconds and still catch up.
    pub fn max_len(mut self, entries: usize) -> Self {
        self.options.max_len = entries;
        self
    }

    /// How many events published here may wait while Redis is away. Default 65 536; beyond
    /// it, events still reach this node's clients but not the other nodes', which report
    /// them as a gap.
    pub fn outbox_capacity(mut self, events: usize) -> Self {
        self.options.outbox = events;
        self
    }

    /// How long one `XREAD` waits for new entries. Default 2 s (an idle node costs Redis
    /// one command per this interval).
    pub fn read_block(mut self, block: Duration) -> Self {
        self.options.block = block;
        self
    }

    /// Checks the options.
    pub fn build(self) -> Result<ClusterOptions, ClusterError> {
        let o = self.options;
        redis::Client::open(o.url.as_str())?;
        let invalid = |option, reason| Err(ClusterError::InvalidOption { option, reason });
        if o.node_id.is_empty() {
            return invalid("node_id", "must not be empty");
        }
        if o.stream.is_empty() {
            return invalid("stream_key", "must not be empty");
        }
        if o.max_len == 0 {
            return invalid("max_len", "must be at least 1");
        }
        if o.outbox == 0 {
            return invalid("outbox_capacity", "must be at least 1");
        }
        if o.block < Duration::from_millis(1) || o.block > Duration::from_secs(60) {
            return invalid("read_block", "must be between 1 ms and 60 s");
        }
        Ok(o)
    }
}

/// The default node id: host name and process id.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}

/// Counters of one node's cluster traffic since it joined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Events appended to the stream by this node.
    pub published: u64,
    /// Events from other nodes delivered to this node's clients.
    pub delivered: u64,
    /// Events published here that never reached the stream (the outbox was full).
    pub dropped: u64,
    /// Events from other nodes that this node could not deliver (gaps in their sequences).
    pub missed: u64,
    /// Entries read twice (a re-sent burst) and skipped.
    pub duplicates: u64,
    /// Entries that could not be decoded and were skipped.
    pub malformed: u64,
    /// Whether the last Redis command succeeded.
    pub connected: bool,
}

/// Delivers an event from another node to the local clients; the future ends when they have
/// room again (so a slow node reads the stream more slowly instead of buffering without end).
pub(crate) type Deliver = Arc<dyn Fn(&str, &str, Value) -> BoxFuture<'static, usize> + Send + Sync>;

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    missed: AtomicU64,
    duplicates: AtomicU64,
    malformed: AtomicU64,
}

/// What the node's tasks share (never the handle itself, so dropping the last handle stops
/// them).
struct Common {
    options: ClusterOptions,
    instance: u64,
    counters: Counters,
    link: Link,
    deliver: OnceLock<Deliver>,
    attached: Notify,
    /// Bumped on every change of the counters or the link, for [`Cluster::wait_until`].
    changed: watch::Sender<u64>,
}

impl Common {
    fn count(&self, counter: &AtomicU64, what: &'static str, n: u64) -> u64 {
        let total = counter.fetch_add(n, Ordering::Relaxed) + n;
        crate::metrics::cluster_events(what, n);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        total
    }

    fn down(&self, error: &redis::RedisError) {
        self.link.down(&self.options.node_id, error);
        crate::metrics::cluster_connected(false);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn up(&self) {
        self.link.up(&self.options.node_id);
        crate::metrics::cluster_connected(true);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// An event on its way to the stream.
struct Outgoing {
    seq: u64,
    iface: String,
    event: String,
    args: String,
}

struct Publisher {
    seq: u64,
    tx: mpsc::Sender<Outgoing>,
}

struct Handle {
    common: Arc<Common>,
    publisher: Mutex<Publisher>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A node's membership in a cluster. Give it to
/// [`ServerBuilder::cluster`](crate::ServerBuilder::cluster); cloning gives another handle, and
/// the node leaves when the last one is dropped.
#[derive(Clone)]
pub struct Cluster {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id())
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Joins: starts the node's publishing and reading tasks. Events other nodes publish from
    /// the moment this returns are delivered once a server is built with it. If Redis is
    /// unreachable now the node still starts (serving its own clients) and joins when Redis
    /// comes up; only an invalid URL fails.
    pub async fn join(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(options.url.as_str())?;
        let common = Arc::new(Common {
            instance: rand::random(),
            counters: Counters::default(),
            link: Link::default(),
            deliver: OnceLock::new(),
            attached: Notify::new(),
            changed: watch::channel(0).0,
            options,
        });
        // Where reading starts: the stream's last entry now (nothing published before the
        // node joined is owed to its clients).
        let mut reader_conn = connect(&client, &common, read_timeout(&common.options)).await;
        let start = match &mut reader_conn {
            Some(conn) => match tail(conn, &common.options.stream).await {
                Ok(id) => Some(id),
                Err(e) => {
                    common.down(&e);
                    reader_conn = None;
                    None
                }
            },
            None => None,
        };
        let o = &common.options;
        tracing::info!(
            node = %o.node_id,
            stream = %o.stream,
            position = start.as_deref().unwrap_or("(Redis unreachable)"),
            "cluster joined"
        );
        let (tx, rx) = mpsc::channel(o.outbox);
        let publisher = tokio::spawn(publish_loop(client.clone(), common.clone(), rx));
        let reader = tokio::spawn(read_loop(client, common.clone(), reader_conn, start));
        Ok(Cluster {
            handle: Arc::new(Handle {
                common,
                publisher: Mutex::new(Publisher { seq: 0, tx }),
                tasks: vec![publisher.abort_handle(), reader.abort_handle()],
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.handle.common.options.node_id
    }

    /// The node's counters now.
    pub fn stats(&self) -> ClusterStats {
        let c = &self.handle.common.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterStats {
            published: get(&c.published),
            delivered: get(&c.delivered),
            dropped: get(&c.dropped),
            missed: get(&c.missed),
            duplicates: get(&c.duplicates),
            malformed: get(&c.malformed),
            connected: self.handle.common.link.up.load(Ordering::Relaxed),
        }
    }

    /// Waits until the node's counters satisfy `done` (for example, until
    /// [`ClusterStats::connected`], or until everything queued was published) and returns
    /// them.
    pub async fn wait_until(&self, done: impl Fn(&ClusterStats) -> bool) -> ClusterStats {
        let mut changes = self.handle.common.changed.subscribe();
        loop {
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            // The sender lives as long as this handle, so this cannot end early.
            let _ = changes.changed().await;
        }
    }

    /// Sets where events from other nodes go (the server, once built). Only the first call
    /// counts.
    pub(crate) fn attach(&self, deliver: Deliver) {
        if self.handle.common.deliver.set(deliver).is_ok() {
            self.handle.common.attached.notify_one();
        }
    }

    /// Queues `iface.event(args)` (`args` a JSTP array, already serialized) for the other
    /// nodes. Never waits: if the outbox is full the event is counted as dropped, and the
    /// other nodes report the gap.
    pub(crate) fn publish(&self, iface: &str, event: &str, args: String) {
        let mut p = lock(&self.handle.publisher);
        // The sequence number is taken even when the event cannot be queued: the jump is how
        // the other nodes learn exactly what they missed.
        p.seq += 1;
        let out = Outgoing {
            seq: p.seq,
            iface: iface.to_owned(),
            event: event.to_owned(),
            args,
        };
        if let Err(mpsc::error::TrySendError::Full(out)) = p.tx.try_send(out) {
            let common = &self.handle.common;
            let dropped = common.count(&common.counters.dropped, "dropped", 1);
            if common.link.outbox_log.allow() {
                tracing::warn!(
                    node = %common.options.node_id,
                    seq = out.seq,
                    dropped,
                    capacity = common.options.outbox,
                    "cluster outbox full: events published here will not reach the other nodes"
                );
            }
        }
    }
}

/// Whether Redis answers, shared by both tasks so each change is logged once.
struct Link {
    up: AtomicBool,
    since: Mutex<Option<Instant>>,
    log: RateLimit,
    outbox_log: RateLimit,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            // Not known yet; the first success logs nothing, the first failure logs.
            up: AtomicBool::new(true),
            since: Mutex::new(None),
            log: RateLimit::default(),
            outbox_log: RateLimit::default(),
        }
    }
}

impl Link {
    fn down(&self, node: &str, error: &redis::RedisError) {
        let was_up = self.up.swap(false, Ordering::Relaxed);
        if was_up {
            *lock(&self.since) = Some(Instant::now());
        }
        if was_up || self.log.allow() {
            tracing::warn!(
                node,
                %error,
                "cluster lost Redis: local clients are still served, events for other nodes wait in the outbox"
            );
        }
    }

    fn up(&self, node: &str) {
        if !self.up.swap(true, Ordering::Relaxed) {
            let away = lock(&self.since).take().map(|t| t.elapsed());
            tracing::info!(node, ?away, "cluster Redis is back");
        }
    }
}

/// Allows one log line per [`LOG_INTERVAL`].
#[derive(Default)]
struct RateLimit {
    last: Mutex<Option<Instant>>,
}

impl RateLimit {
    fn allow(&self) -> bool {
        let mut last = lock(&self.last);
        match *last {
            Some(t) if t.elapsed() < LOG_INTERVAL => false,
            _ => {
                *last = Some(Instant::now());
                true
            }
        }
    }
}

/// Between reconnect attempts: starts at 50 ms and doubles to 1 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
    }
    fn reset(&mut self) {
        *self = Backoff::new();
    }
}

fn read_timeout(o: &ClusterOptions) -> Duration {
    // Above the XREAD block time, so a blocked read is not taken for a dead link.
    o.block + Duration::from_secs(2)
}

async fn connect(
    client: &redis::Client,
    common: &Common,
    response_timeout: Duration,
) -> Option<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout));
    match client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(c) => Some(c),
        Err(e) => {
            common.down(&e);
            None
        }
    }
}

/// The id of the stream's last entry, `0-0` when it is empty or missing.
async fn tail(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Result<String, redis::RedisError> {
    let v: redis::Value = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let id = items(&v)
        .and_then(|entries| entries.first())
        .and_then(items)
        .and_then(|entry| entry.first())
        .and_then(text);
    Ok(id.unwrap_or_else(|| "0-0".into()))
}

async fn publish_loop(
    client: redis::Client,
    common: Arc<Common>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let o = &common.options;
    let mut conn = None;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut backoff = Backoff::new();
    let instance = common.instance.to_string();
    while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        // Until this burst is in the stream; meanwhile new events wait in the outbox.
        loop {
            if conn.is_none() {
                conn = connect(&client, &common, Duration::from_secs(2)).await;
            }
            let Some(c) = conn.as_mut() else {
                backoff.wait().await;
                continue;
            };
            let mut pipe = redis::pipe();
            for e in &batch {
                pipe.cmd("XADD")
                    .arg(&o.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(o.max_len)
                    .arg("*")
                    .arg("o")
                    .arg(&o.node_id)
                    .arg("i")
                    .arg(&instance)
                    .arg("s")
                    .arg(e.seq)
                    .arg("e")
                    .arg(&e.iface)
                    .arg("n")
                    .arg(&e.event)
                    .arg("a")
                    .arg(&e.args)
                    .ignore();
            }
            match pipe.query_async::<()>(c).await {
                Ok(()) => {
                    common.up();
                    common.count(&common.counters.published, "published", batch.len() as u64);
                    backoff.reset();
                    break;
                }
                Err(e) => {
                    // Some of the burst may be in the stream already; readers skip those
                    // by sequence number when it is sent again.
                    common.down(&e);
                    conn = None;
                    backoff.wait().await;
                }
            }
        }
        batch.clear();
    }
}

/// The last sequence number delivered from one publisher instance.
struct Origin {
    seq: u64,
    touched: u64,
}

async fn read_loop(
    client: redis::Client,
    common: Arc<Common>,
    mut conn: Option<redis::aio::MultiplexedConnection>,
    mut last: Option<String>,
) {
    let deliver = loop {
        if let Some(d) = common.deliver.get() {
            break d.clone();
        }
        common.attached.notified().await;
    };
    let o = &common.options;
    let mut origins: HashMap<u64, Origin> = HashMap::new();
    let mut touched = 0u64;
    let mut backoff = Backoff::new();
    // After a failure: check for trimmed entries, then log when the backlog is read.
    let mut recovering = false;
    let mut catching_up = false;
    let mut caught = 0u64;
    loop {
        if conn.is_none() {
            conn = connect(&client, &common, read_timeout(o)).await;
        }
        let Some(c) = conn.as_mut() else {
            recovering = true;
            backoff.wait().await;
            continue;
        };
        let from = match &last {
            Some(id) => id.clone(),
            None => match tail(c, &o.stream).await {
                Ok(id) => {
                    tracing::info!(node = %o.node_id, position = %id, "cluster reading from");
                    last = Some(id.clone());
                    id
                }
                Err(e) => {
                    common.down(&e);
                    conn = None;
                    backoff.wait().await;
                    continue;
                }
            },
        };
        if recovering {
            recovering = false;
            catching_up = true;
            caught = 0;
            if let Some(deleted) = max_deleted(c, &o.stream).await {
                if id_after(&deleted, &from) {
                    tracing::warn!(
                        node = %o.node_id,
                        after = %from,
                        up_to = %deleted,
                        "cluster gap: entries were trimmed from the stream before this node read them (the publishers' sequence gaps follow)"
                    );
                }
            }
        }
        let reply: Result<redis::Value, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(o.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&o.stream)
            .arg(&from)
            .query_async(c)
            .await;
        let reply = match reply {
            Ok(v) => v,
            Err(e) => {
                common.down(&e);
                conn = None;
                recovering = true;
                backoff.wait().await;
                continue;
            }
        };
        common.up();
        backoff.reset();
        let entries = stream_entries(&reply);
        let n = entries.len();
        for entry in entries {
            let Some((id, fields)) = entry else {
                common.count(&common.counters.malformed, "malformed", 1);
                continue;
            };
            last = Some(id.clone());
            let Some(ev) = Incoming::decode(&fields) else {
                common.count(&common.counters.malformed, "malformed", 1);
                tracing::warn!(node = %o.node_id, entry = %id, "cluster entry malformed, skipped");
                continue;
            };
            if ev.instance == common.instance {
                continue;
            }
            touched += 1;
            let seen = origins.get_mut(&ev.instance);
            match seen {
                Some(origin) if ev.seq <= origin.seq => {
                    origin.touched = touched;
                    common.count(&common.counters.duplicates, "duplicates", 1);
                    continue;
                }
                Some(origin) => {
                    if ev.seq > origin.seq + 1 {
                        let missed = ev.seq - origin.seq - 1;
                        common.count(&common.counters.missed, "missed", missed);
                        tracing::warn!(
                            node = %o.node_id,
                            from_node = %ev.node,
                            first = origin.seq + 1,
                            last = ev.seq - 1,
                            missed,
                            "cluster gap: events from another node could not be delivered here"
                        );
                    }
                    origin.seq = ev.seq;
                    origin.touched = touched;
                }
                None => {
                    if origins.len() >= MAX_ORIGINS {
                        if let Some(oldest) = origins
                            .iter()
                            .min_by_key(|(_, v)| v.touched)
                            .map(|(k, _)| *k)
                        {
                            origins.remove(&oldest);
                        }
                    }
                    origins.insert(
                        ev.instance,
                        Origin {
                            seq: ev.seq,
                            touched,
                        },
                    );
                }
            }
            deliver(&ev.iface, &ev.event, ev.args).await;
            common.count(&common.counters.delivered, "delivered", 1);
            caught += 1;
        }
        if catching_up && n < READ_COUNT {
            catching_up = false;
            tracing::info!(
                node = %o.node_id,
                delivered = caught,
                position = last.as_deref().unwrap_or("0-0"),
                "cluster caught up"
            );
        }
    }
}

/// One decoded stream entry.
struct Incoming {
    node: String,
    instance: u64,
    seq: u64,
    iface: String,
    event: String,
    args: Value,
}

impl Incoming {
    fn decode(fields: &[(String, String)]) -> Option<Incoming> {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        let args = tether_wire::parse(get("a")?).ok()?;
        if !matches!(args, Value::Array(_)) {
            return None;
        }
        Some(Incoming {
            node: get("o")?.to_owned(),
            instance: get("i")?.parse().ok()?,
            seq: get("s")?.parse().ok()?,
            iface: get("e")?.to_owned(),
            event: get("n")?.to_owned(),
            args,
        })
    }
}

fn items(v: &redis::Value) -> Option<&[redis::Value]> {
    match v {
        redis::Value::Array(a) | redis::Value::Set(a) => Some(a),
        _ => None,
    }
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

type Entry = Option<(String, Vec<(String, String)>)>;

/// The entries of an `XREAD` reply on one stream (`None` for one that cannot be read; an
/// empty list for a timeout). RESP2 gives `[[key, entries]]`, RESP3 `{key: entries}`.
fn stream_entries(reply: &redis::Value) -> Vec<Entry> {
    let list = match reply {
        redis::Value::Map(m) => m.first().map(|(_, v)| v),
        other => items(other)
            .and_then(|streams| streams.first())
            .and_then(items)
            .and_then(|s| s.get(1)),
    };
    let Some(entries) = list.and_then(items) else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|entry| {
            let entry = items(entry)?;
            let id = text(entry.first()?)?;
            let flat = items(entry.get(1)?)?;
            let fields = flat
                .chunks(2)
                .map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
                .collect::<Option<Vec<_>>>()?;
            Some((id, fields))
        })
        .collect()
}

/// The stream's `max-deleted-entry-id` (Redis 7): the newest entry trimmed so far.
async fn max_deleted(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Option<String> {
    let v: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await
        .ok()?;
    let pairs: Vec<(String, &redis::Value)> = match &v {
        redis::Value::Map(m) => m.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect(),
        other => items(other)?
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, kv.get(1)?)))
            .collect(),
    };
    pairs
        .into_iter()
        .find(|(k, _)| k == "max-deleted-entry-id")
        .and_then(|(_, v)| text(v))
}

/// Whether stream id `a` comes after `b` (`ms-seq`, compared numerically).
fn id_after(a: &str, b: &str) -> bool {
    fn split(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    split(a) > split(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_numerically() {
        assert!(id_after("10-0", "9-5"));
        assert!(id_after("5-10", "5-9"));
        assert!(!id_after("5-9", "5-9"));
        assert!(!id_after("0-0", "1-0"));
    }

    #[test]
    fn options_are_checked() {
        assert!(ClusterOptions::builder("redis://127.0.0.1:1")
            .build()
            .is_ok());
        assert!(matches!(
            ClusterOptions::builder("redis://127.0.0.1:1")
                .max_len(0)
                .build(),
            Err(ClusterError::InvalidOption {
                option: "max_len",
                ..
            })
        ));
        assert!(matches!(
            ClusterOptions::builder("nope://x").build(),
            Err(ClusterError::Redis(_))
        ));
    }
}
