//! When and where a client reconnects after its transport drops.
//!
//! A client connection whose transport is lost after a successful handshake does not close: it
//! keeps its session, buffers what it sends, and asks its [`Reconnector`] when and where to try
//! again. On success it restores the session (see [`crate::Connection`]) and resends what the
//! server never got. The default, [`Backoff`], waits 1 s, doubling up to 32 s, plus up to 1 s
//! of random jitter, and starts over after a success — upstream's default reconnector.
//!
//! ```
//! use std::time::Duration;
//! use tether::reconnect::{Backoff, Reconnector};
//! use tether::Endpoint;
//!
//! let backoff = Backoff::default();
//! let here: Endpoint = "jstp://127.0.0.1:3000".parse().unwrap();
//! let attempt = backoff.next_attempt(3, &here).unwrap();
//! assert!(attempt.delay >= Duration::from_secs(8) && attempt.delay < Duration::from_secs(9));
//! assert_eq!(attempt.endpoint, here);
//! ```

use crate::transport::Endpoint;
use rand::Rng;
use std::fmt;
use std::time::Duration;

/// One reconnection attempt: wait `delay`, then connect to `endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// How long to wait before connecting.
    pub delay: Duration,
    /// Where to connect (the previous endpoint, or another one to switch transport).
    pub endpoint: Endpoint,
}

/// Decides when and where a dropped client reconnects.
pub trait Reconnector: Send + Sync + 'static {
    /// The next attempt after `failures` failed attempts in a row since the transport dropped
    /// (0 for the first), `last` being the endpoint used last. `None` gives up: the connection
    /// closes and its pending requests fail with [`crate::Error::Closed`].
    fn next_attempt(&self, failures: u32, last: &Endpoint) -> Option<Attempt>;
}

impl<F> Reconnector for F
where
    F: Fn(u32, &Endpoint) -> Option<Attempt> + Send + Sync + 'static,
{
    fn next_attempt(&self, failures: u32, last: &Endpoint) -> Option<Attempt> {
        self(failures, last)
    }
}

/// Exponential backoff with jitter, on the same endpoint: `min(initial · 2^failures, max)`
/// plus a random part below `jitter`. Defaults: 1 s, 32 s, 1 s (upstream's reconnector).
#[derive(Clone, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay before jitter.
    pub max: Duration,
    /// Upper bound (exclusive) of the random delay added to each attempt.
    pub jitter: Duration,
    /// Give up after this many failed attempts in a row; `None` (the default) never gives up.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(32),
            jitter: Duration::from_secs(1),
            max_attempts: None,
        }
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("initial", &self.initial)
            .field("max", &self.max)
            .field("jitter", &self.jitter)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl Backoff {
    /// Backoff from `initial` up to `max`, with no jitter (useful in tests).
    pub fn fixed_range(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            jitter: Duration::ZERO,
            max_attempts: None,
        }
    }

    /// The delay before jitter after `failures` failures.
    pub fn base_delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Reconnector for Backoff {
    fn next_attempt(&self, failures: u32, last: &Endpoint) -> Option<Attempt> {
        if self.max_attempts.is_some_and(|m| failures >= m) {
            return None;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = self.jitter.as_nanos().min(u64::MAX as u128) as u64;
            Duration::from_nanos(rand::rng().random_range(0..nanos))
        };
        Some(Attempt {
            delay: self.base_delay(failures) + jitter,
            endpoint: last.clone(),
        })
    }
}

/// Never reconnect: the connection closes when its transport drops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Never;

impl Reconnector for Never {
    fn next_attempt(&self, _failures: u32, _last: &Endpoint) -> Option<Attempt> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let b = Backoff::default();
        let e: Endpoint = "ws://127.0.0.1:1/".parse().unwrap();
        let base: Vec<u64> = (0..8).map(|n| b.base_delay(n).as_secs()).collect();
        assert_eq!(base, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(b.base_delay(u32::MAX), Duration::from_secs(32));
        for n in 0..8 {
            let a = b.next_attempt(n, &e).unwrap();
            assert!(a.delay >= b.base_delay(n));
            assert!(a.delay < b.base_delay(n) + Duration::from_secs(1));
        }
    }

    #[test]
    fn backoff_gives_up_after_max_attempts() {
        let b = Backoff {
            max_attempts: Some(2),
            ..Backoff::fixed_range(Duration::from_millis(10), Duration::from_millis(40))
        };
        let e: Endpoint = "jstp://127.0.0.1:1".parse().unwrap();
        assert_eq!(
            b.next_attempt(1, &e).unwrap().delay,
            Duration::from_millis(20)
        );
        assert!(b.next_attempt(2, &e).is_none());
        assert!(Never.next_attempt(0, &e).is_none());
    }

    #[test]
    fn closures_can_switch_transport() {
        // Stay on the last endpoint for two failures, then switch to WebSocket; give up at 4.
        let ws: Endpoint = "ws://127.0.0.1:8080/".parse().unwrap();
        let switch = move |n: u32, last: &Endpoint| {
            (n < 4).then(|| Attempt {
                delay: Duration::from_millis(u64::from(n)),
                endpoint: if n < 2 { last.clone() } else { ws.clone() },
            })
        };
        let tcp: Endpoint = "jstp://127.0.0.1:3000".parse().unwrap();
        let other: Endpoint = "jstp://127.0.0.1:4000".parse().unwrap();
        for (n, last, expected) in [
            (0, &tcp, "jstp://127.0.0.1:3000"),
            (1, &other, "jstp://127.0.0.1:4000"),
            (2, &tcp, "ws://127.0.0.1:8080/"),
            (3, &other, "ws://127.0.0.1:8080/"),
        ] {
            let a = Reconnector::next_attempt(&switch, n, last).unwrap();
            assert_eq!(
                a.endpoint.to_string(),
                expected,
                "attempt after {n} failures"
            );
            assert_eq!(a.delay, Duration::from_millis(u64::from(n)));
        }
        assert_eq!(Reconnector::next_attempt(&switch, 4, &tcp), None);
        // Usable where the library takes one: as a boxed trait object.
        let boxed: Box<dyn Reconnector> = Box::new(switch);
        assert_eq!(
            boxed.next_attempt(1, &other).unwrap().endpoint,
            other,
            "through dyn Reconnector"
        );
    }
}
