//! How the hub keeps its peers: when to dial a lost peer again, how to tell a frozen peer from
//! a quiet one, and whether a dropped link is the connection's to restore or the hub's to
//! redial.
//!
//! A [`Scheduler`] gives each address a [`Schedule`] when it is connected. [`Schedule::default`]
//! (the hub's default) redials with [`Backoff::default`] — 1 s doubling to 32 s plus up to 1 s
//! of jitter, forever —, pings a connected peer every 15 s and counts it gone when a ping goes
//! unanswered for 15 s, and lets the connection restore its session across a dropped link (so a
//! blip is invisible in the hub; the liveness check bounds how long a restore may take).
//! [`Schedule::off`] is upstream's hub: no redial, no liveness check, no session resumption.
//!
//! ```
//! use std::time::Duration;
//! use tether::hub::{HubOptions, MultiAddress, Schedule};
//!
//! // Fresh dials for `net:` peers, session resumption for the others.
//! let options = HubOptions::jstp("testApp").scheduler(|address: &MultiAddress| Schedule {
//!     resume: !address.to_string().starts_with("net:"),
//!     ..Schedule::default()
//! });
//! # drop(options);
//! ```

use super::MultiAddress;
use crate::reconnect::Backoff;
use rand::Rng;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// When to dial a lost peer again.
pub trait Redial: Send + Sync + 'static {
    /// The delay before the next dial of `address` after `failures` losses in a row (0 for the
    /// first: a connection that ended, or a dial that failed, since the last success). `None`
    /// lets the peer go.
    fn next_redial(&self, address: &str, failures: u32) -> Option<Duration>;
}

impl<F> Redial for F
where
    F: Fn(&str, u32) -> Option<Duration> + Send + Sync + 'static,
{
    fn next_redial(&self, address: &str, failures: u32) -> Option<Duration> {
        self(address, failures)
    }
}

impl Redial for Backoff {
    fn next_redial(&self, _address: &str, failures: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|m| failures >= m) {
            return None;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = self.jitter.as_nanos().min(u64::MAX as u128) as u64;
            Duration::from_nanos(rand::rng().random_range(0..nanos))
        };
        Some(self.base_delay(failures) + jitter)
    }
}

/// The liveness check: a JSTP ping every `interval`; one unanswered for `timeout` moves the
/// peer to disconnected (cause [`super::Cause::NoPong`]) and closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between the answer to one ping and the next ping.
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    /// A ping every 15 s, 15 s to answer it.
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(15),
        }
    }
}

/// How the hub keeps one peer.
#[derive(Clone)]
pub struct Schedule {
    /// When to dial again after the peer is lost or a dial fails; `None` never redials.
    pub redial: Option<Arc<dyn Redial>>,
    /// The liveness check; `None` trusts the connection to notice a dead link.
    pub heartbeat: Option<Heartbeat>,
    /// `true`: the connection restores its own session after a dropped link, and the hub sees
    /// nothing unless the liveness check fails first. `false`: a dropped link ends the
    /// connection and the hub redials with a fresh session.
    pub resume: bool,
}

impl Default for Schedule {
    /// Redial with [`Backoff::default`], [`Heartbeat::default`], session resumption on.
    fn default() -> Self {
        Schedule {
            redial: Some(Arc::new(Backoff::default())),
            heartbeat: Some(Heartbeat::default()),
            resume: true,
        }
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("redial", &self.redial.is_some())
            .field("heartbeat", &self.heartbeat)
            .field("resume", &self.resume)
            .finish()
    }
}

impl Schedule {
    /// Upstream's hub: no redial, no liveness check, no session resumption.
    pub fn off() -> Schedule {
        Schedule {
            redial: None,
            heartbeat: None,
            resume: false,
        }
    }

    /// Redials with `redial` (replacing the default backoff).
    pub fn redial(mut self, redial: impl Redial) -> Schedule {
        self.redial = Some(Arc::new(redial));
        self
    }
}

/// Gives each address its [`Schedule`], once per [`super::Hub::connect`].
pub trait Scheduler: Send + Sync + 'static {
    /// The schedule of `address`.
    fn schedule(&self, address: &MultiAddress) -> Schedule;
}

impl Scheduler for Schedule {
    fn schedule(&self, _address: &MultiAddress) -> Schedule {
        self.clone()
    }
}

impl<F> Scheduler for F
where
    F: Fn(&MultiAddress) -> Schedule + Send + Sync + 'static,
{
    fn schedule(&self, address: &MultiAddress) -> Schedule {
        self(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_redials_double_to_the_cap_with_bounded_jitter_and_can_give_up() {
        let b = Backoff::default();
        for n in 0..8 {
            let d = b.next_redial("net:h:1", n).unwrap();
            assert!(d >= b.base_delay(n) && d < b.base_delay(n) + Duration::from_secs(1));
        }
        let limited = Backoff {
            max_attempts: Some(2),
            ..Backoff::fixed_range(Duration::from_millis(10), Duration::from_millis(30))
        };
        assert_eq!(limited.next_redial("a", 1), Some(Duration::from_millis(20)));
        assert_eq!(limited.next_redial("a", 2), None);
    }

    #[test]
    fn schedules_per_address_from_a_closure() {
        let pick = |a: &MultiAddress| {
            if a.to_string().starts_with("net:") {
                Schedule::off()
            } else {
                Schedule::default()
                    .redial(|_: &str, n: u32| (n < 3).then(|| Duration::from_millis(5)))
            }
        };
        let net: MultiAddress = "net:h:1".parse().unwrap();
        let ws: MultiAddress = "ws://h:1".parse().unwrap();
        let off = Scheduler::schedule(&pick, &net);
        assert!(off.redial.is_none() && off.heartbeat.is_none() && !off.resume);
        let on = Scheduler::schedule(&pick, &ws);
        assert!(on.resume);
        assert_eq!(on.heartbeat, Some(Heartbeat::default()));
        let redial = on.redial.unwrap();
        assert_eq!(
            redial.next_redial("ws://h:1", 2),
            Some(Duration::from_millis(5))
        );
        assert_eq!(redial.next_redial("ws://h:1", 3), None);
    }
}
