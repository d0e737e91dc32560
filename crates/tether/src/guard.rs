//! What a server does against hostile clients: session binding, login throttling, a cap on
//! detached sessions, deadlines on store calls and rate-limited warnings (issue 17). Configured
//! on [`crate::ServerBuilder`]; the threat model is in `docs/threat-model.md`.
//!
//! Every table here is bounded and says so where it is declared.

use crate::connection::Connection;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// Which restores of a login session a server accepts.
///
/// A JSTP `session` handshake carries only the session id (`@metarhia/jstp` gives nothing
/// more), so by default whoever presents the id gets the session. A binding ties every
/// session that has a user name (a `login` or custom strategy) to where it was created.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionBinding {
    /// Any client presenting the id restores the session, as upstream. The default.
    #[default]
    Off,
    /// The restoring client's IP address must lie in the same network as the one that logged
    /// in: the first `ipv4_prefix` bits of an IPv4 address (32: the same address), the first
    /// `ipv6_prefix` bits of an IPv6 one. Unix-socket clients all count as one network.
    SourceNetwork {
        /// Prefix length for IPv4 sources, 0–32.
        ipv4_prefix: u8,
        /// Prefix length for IPv6 sources, 0–128.
        ipv6_prefix: u8,
    },
}

impl SessionBinding {
    /// The same source address: `/32` for IPv4, `/128` for IPv6.
    pub const SAME_ADDRESS: SessionBinding = SessionBinding::SourceNetwork {
        ipv4_prefix: 32,
        ipv6_prefix: 128,
    };

    /// The network key of `conn`'s source under this binding; `None` when the binding is off.
    pub(crate) fn origin(&self, conn: &Connection) -> Option<String> {
        match *self {
            SessionBinding::Off => None,
            SessionBinding::SourceNetwork {
                ipv4_prefix,
                ipv6_prefix,
            } => Some(match source_ip(conn) {
                Some(IpAddr::V4(ip)) => {
                    let bits = u32::from(ip) & mask32(ipv4_prefix);
                    format!("{}/{}", std::net::Ipv4Addr::from(bits), ipv4_prefix.min(32))
                }
                Some(IpAddr::V6(ip)) => {
                    let bits = u128::from(ip) & mask128(ipv6_prefix);
                    format!(
                        "{}/{}",
                        std::net::Ipv6Addr::from(bits),
                        ipv6_prefix.min(128)
                    )
                }
                None => "local".to_owned(),
            }),
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    match prefix.min(32) {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p)),
    }
}

fn mask128(prefix: u8) -> u128 {
    match prefix.min(128) {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p)),
    }
}

/// The client's IP address, if it came over IP (an IPv4-mapped IPv6 address counts as IPv4).
pub(crate) fn source_ip(conn: &Connection) -> Option<IpAddr> {
    let addr: SocketAddr = conn.remote_addr()?.parse().ok()?;
    Some(addr.ip().to_canonical())
}

/// Compares two secrets (session ids) in time that depends on their lengths only.
pub(crate) fn secrets_equal(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Compares a password with the expected one without a timing oracle on either its bytes or
/// its length: first keyed digests (a per-process random key), in constant time, then the
/// bytes, in constant time, only when the digests agree.
pub(crate) fn passwords_equal(expected: &str, given: &str) -> bool {
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let key = KEY.get_or_init(std::collections::hash_map::RandomState::new);
    let digest = |s: &str| key.hash_one(s).to_le_bytes();
    bool::from(digest(expected).ct_eq(&digest(given)))
        && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// A stored session with the network it is bound to: `#origin <net>\n<session>`. Sessions
/// without a binding are stored as they are, so stores written before binding existed (or
/// with it off) read back unchanged.
pub(crate) fn wrap_stored(origin: Option<&str>, session: String) -> String {
    match origin {
        Some(net) => format!("#origin {net}\n{session}"),
        None => session,
    }
}

/// Splits what [`wrap_stored`] wrote into its origin and the session text.
pub(crate) fn unwrap_stored(text: &str) -> (Option<&str>, &str) {
    match text
        .strip_prefix("#origin ")
        .and_then(|rest| rest.split_once('\n'))
    {
        Some((net, session)) => (Some(net), session),
        None => (None, text),
    }
}

/// A token bucket of failures: `burst` failures at once, then one more every `refill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Failures allowed in a row before attempts are refused.
    pub burst: u32,
    /// How long it takes to earn back one failure.
    pub refill: Duration,
}

impl Throttle {
    /// Per source address (IPv6: per /64) by default: 20 failed logins at once, then one per
    /// second.
    pub const DEFAULT_PER_SOURCE: Throttle = Throttle {
        burst: 20,
        refill: Duration::from_secs(1),
    };
    /// Per user name by default: 10 failed logins at once, then one every 5 s. Note that
    /// anyone can spend a user's allowance, delaying that user's own logins (never locking
    /// the account for longer than the refill).
    pub const DEFAULT_PER_USER: Throttle = Throttle {
        burst: 10,
        refill: Duration::from_secs(5),
    };
}

/// The most keys each throttle table tracks (65 536, about 5 MiB). When full, keys whose
/// buckets have refilled are forgotten first; if none has, the oldest key goes.
pub const THROTTLE_KEYS: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Failed-login buckets by key (a source network or a user name).
#[derive(Debug)]
pub(crate) struct Buckets {
    limit: Option<Throttle>,
    table: Mutex<(HashMap<String, Bucket>, VecDeque<String>)>,
}

impl Buckets {
    pub(crate) fn new(limit: Option<Throttle>) -> Self {
        Buckets {
            limit,
            table: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Takes one attempt from `key`'s bucket; `false` (refuse the attempt unseen) when it is
    /// empty. Taken before the password is checked so parallel attempts cannot outrun it.
    pub(crate) fn take(&self, key: &str) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        let now = Instant::now();
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (table, order) = &mut *guard;
        if !table.contains_key(key) && table.len() >= THROTTLE_KEYS {
            table.retain(|_, b| refill(b, limit, now) < f64::from(limit.burst));
            order.retain(|k| table.contains_key(k));
            while table.len() >= THROTTLE_KEYS {
                match order.pop_front() {
                    Some(old) => {
                        table.remove(&old);
                    }
                    None => break,
                }
            }
        }
        let bucket = table.entry(key.to_owned()).or_insert_with(|| {
            order.push_back(key.to_owned());
            Bucket {
                tokens: f64::from(limit.burst),
                at: now,
            }
        });
        bucket.tokens = refill(bucket, limit, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back the attempt [`Buckets::take`] took (the login succeeded).
    pub(crate) fn give_back(&self, key: &str) {
        let Some(limit) = self.limit else {
            return;
        };
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = guard.0.get_mut(key) {
            b.tokens = (b.tokens + 1.0).min(f64::from(limit.burst));
        }
    }
}

fn refill(b: &Bucket, limit: Throttle, now: Instant) -> f64 {
    let earned = if limit.refill.is_zero() {
        f64::from(limit.burst)
    } else {
        now.duration_since(b.at).as_secs_f64() / limit.refill.as_secs_f64()
    };
    (b.tokens + earned).min(f64::from(limit.burst))
}

/// The throttle key of a connection's source: its IPv4 address, or its IPv6 /64 (one host
/// usually holds a whole /64), or `local` for Unix sockets.
pub(crate) fn source_key(conn: &Connection) -> String {
    match source_ip(conn) {
        Some(IpAddr::V4(ip)) => ip.to_string(),
        Some(IpAddr::V6(ip)) => std::net::Ipv6Addr::from(u128::from(ip) & mask128(64)).to_string(),
        None => "local".to_owned(),
    }
}

/// Logs one line per `every` for a repeated warning and counts the ones it held back, so a
/// store outage gives a line every few seconds instead of one per connection.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    every: Duration,
    state: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl WarnLimiter {
    pub(crate) fn new(every: Duration) -> Self {
        WarnLimiter {
            every,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `what` with `error` unless `what` was logged less than `every` ago; returns
    /// whether it logged.
    pub(crate) fn warn(&self, what: &'static str, error: &dyn std::fmt::Display) -> bool {
        let now = Instant::now();
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let entry = state.entry(what).or_insert((None, 0));
            if entry
                .0
                .is_some_and(|at| now.duration_since(at) < self.every)
            {
                entry.1 += 1;
                return false;
            }
            entry.0 = Some(now);
            std::mem::take(&mut entry.1)
        };
        tracing::warn!(%error, suppressed, "{what}");
        true
    }
}

/// Detached sessions kept in memory by default: 1 024 (a detached connection holds its
/// session, buffers and task: about 100 KiB each when the issue measured it).
pub const DEFAULT_MAX_DETACHED: usize = 1024;
/// Bytes of session state (the encoded session, resend buffer included) detached sessions may
/// hold in memory by default: 64 MiB.
pub const DEFAULT_MAX_DETACHED_BYTES: usize = 64 << 20;
/// How long a server waits for one session-store call by default: 1 s. Past it, a new session
/// goes on in memory and a restore that needed the store is refused with code 11.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one warning line per kind of store failure this often: 5 s.
pub const STORE_WARNING_INTERVAL: Duration = Duration::from_secs(5);

/// The guards' settings, set on [`crate::ServerBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct GuardConfig {
    pub(crate) binding: SessionBinding,
    pub(crate) per_source: Option<Throttle>,
    pub(crate) per_user: Option<Throttle>,
    pub(crate) max_detached: usize,
    pub(crate) max_detached_bytes: usize,
    pub(crate) store_timeout: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            binding: SessionBinding::Off,
            per_source: Some(Throttle::DEFAULT_PER_SOURCE),
            per_user: Some(Throttle::DEFAULT_PER_USER),
            max_detached: DEFAULT_MAX_DETACHED,
            max_detached_bytes: DEFAULT_MAX_DETACHED_BYTES,
            store_timeout: DEFAULT_STORE_TIMEOUT,
        }
    }
}

/// A session-store call that did not succeed in time.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreFault {
    /// The store answered with an error.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The store did not answer within the server's store timeout.
    #[error("no answer from the session store within {0:?}")]
    Timeout(Duration),
}

/// A server's guard state.
#[derive(Debug)]
pub(crate) struct Guard {
    pub(crate) config: GuardConfig,
    pub(crate) per_source: Buckets,
    pub(crate) per_user: Buckets,
    pub(crate) warnings: WarnLimiter,
    pub(crate) detached: Mutex<Detached>,
    /// The network each bound live session was created from, by session id; an entry goes
    /// when its session leaves memory (then the store copy carries it), so it is bounded by
    /// the live sessions.
    pub(crate) origins: Mutex<HashMap<String, String>>,
}

impl Guard {
    pub(crate) fn new(config: GuardConfig) -> Self {
        Guard {
            per_source: Buckets::new(config.per_source),
            per_user: Buckets::new(config.per_user),
            warnings: WarnLimiter::new(STORE_WARNING_INTERVAL),
            detached: Mutex::new(Detached::default()),
            origins: Mutex::new(HashMap::new()),
            config,
        }
    }

    /// Runs one store call under the store timeout; a failure is logged (rate-limited) as
    /// `what` and returned.
    pub(crate) async fn store<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, crate::store::StoreError>>,
    ) -> Result<T, StoreFault> {
        let result = match tokio::time::timeout(self.config.store_timeout, call).await {
            Ok(r) => r.map_err(StoreFault::from),
            Err(_) => Err(StoreFault::Timeout(self.config.store_timeout)),
        };
        if let Err(e) = &result {
            self.warnings.warn(what, e);
        }
        result
    }

    pub(crate) fn origin_of(&self, id: &str) -> Option<String> {
        lock(&self.origins).get(id).cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Detached sessions (clients away, connection waiting in memory), oldest first, with the
/// size of each one's state. Bounded by the caps it enforces.
#[derive(Debug, Default)]
pub(crate) struct Detached {
    order: VecDeque<u64>,
    sizes: HashMap<u64, usize>,
    bytes: usize,
}

impl Detached {
    /// Records `conn` as detached with `bytes` of state; returns the connections over the caps
    /// (oldest first), which the caller closes so their sessions live on in the store only.
    pub(crate) fn insert(
        &mut self,
        conn: u64,
        bytes: usize,
        max_count: usize,
        max_bytes: usize,
    ) -> Vec<u64> {
        self.remove(conn);
        self.order.push_back(conn);
        self.sizes.insert(conn, bytes);
        self.bytes += bytes;
        let mut evicted = Vec::new();
        while self.sizes.len() > max_count || (self.bytes > max_bytes && self.sizes.len() > 1) {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(size) = self.sizes.remove(&old) {
                self.bytes -= size;
                evicted.push(old);
            }
        }
        evicted
    }

    /// Forgets `conn` (restored, or closed).
    pub(crate) fn remove(&mut self, conn: u64) {
        if let Some(size) = self.sizes.remove(&conn) {
            self.bytes -= size;
            // The order queue is cleaned lazily, but never grows past twice the live count.
            if self.order.len() > 2 * self.sizes.len() + 16 {
                let sizes = &self.sizes;
                self.order.retain(|c| sizes.contains_key(c));
            }
        }
    }

    /// How many sessions are detached and the bytes of their state.
    pub(crate) fn totals(&self) -> (usize, usize) {
        (self.sizes.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_origin_round_trips_and_plain_text_is_unchanged() {
        let text = wrap_stored(Some("10.0.0.0/8"), "{session}".into());
        assert_eq!(unwrap_stored(&text), (Some("10.0.0.0/8"), "{session}"));
        assert_eq!(unwrap_stored("{session}"), (None, "{session}"));
        assert_eq!(wrap_stored(None, "x".into()), "x");
    }

    #[test]
    fn secrets_and_passwords_compare() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
        assert!(passwords_equal("hunter2", "hunter2"));
        assert!(!passwords_equal("hunter2", "hunter3"));
        assert!(!passwords_equal("hunter2", ""));
    }

    #[test]
    fn masks() {
        assert_eq!(mask32(0), 0);
        assert_eq!(mask32(24), 0xffff_ff00);
        assert_eq!(mask32(40), u32::MAX);
        assert_eq!(mask128(64), u128::MAX << 64);
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_refuse_past_the_burst_and_refill() {
        let b = Buckets::new(Some(Throttle {
            burst: 2,
            refill: Duration::from_secs(10),
        }));
        assert!(b.take("k"));
        assert!(b.take("k"));
        assert!(!b.take("k"));
        assert!(b.take("other"));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.take("k"));
        assert!(!b.take("k"));
        b.give_back("k");
        assert!(b.take("k"));
        assert!(Buckets::new(None).take("k"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_warning_is_logged_once_per_interval() {
        let w = WarnLimiter::new(Duration::from_secs(5));
        assert!(w.warn("store down", &"e"));
        let held_back = (0..119_000).filter(|_| w.warn("store down", &"e")).count();
        assert_eq!(held_back, 0);
        assert!(
            w.warn("another kind", &"e"),
            "each kind has its own interval"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(w.warn("store down", &"e"));
        assert_eq!(
            w.state.lock().unwrap()["store down"].1,
            0,
            "the count was reported"
        );
    }

    #[test]
    fn detached_caps_evict_the_oldest() {
        let mut d = Detached::default();
        assert!(d.insert(1, 10, 2, 100).is_empty());
        assert!(d.insert(2, 10, 2, 100).is_empty());
        assert_eq!(d.insert(3, 10, 2, 100), vec![1]);
        d.remove(2);
        assert_eq!(d.totals(), (1, 10));
        assert_eq!(d.insert(4, 95, 10, 100), vec![3]);
        assert_eq!(d.totals(), (1, 95));
    }
}
