//! Parsers for `tether serve`'s guard flags (issue 17): `--session-binding` and the login
//! throttles. Defaults and meaning are `tether::guard`'s.

use clap::Args;
use std::time::Duration;
use tether::guard::{SessionBinding, Throttle};

/// `tether serve`'s guard flags (see docs/threat-model.md).
#[derive(Args, Debug, Clone)]
pub(crate) struct GuardFlags {
    /// Tie login sessions to where they logged in: a restore from elsewhere gets code 11.
    /// `off` (as @metarhia/jstp: the session id alone restores), `address` (the same source
    /// IP) or `network:V4PREFIX/V6PREFIX`. See docs/threat-model.md.
    #[arg(long, value_name = "off|address|network:V4/V6", default_value = "off", value_parser = parse_binding)]
    pub(crate) session_binding: SessionBinding,
    /// Failed logins allowed per source address (IPv6: per /64): BURST at once, then one per
    /// MS milliseconds; `off` to disable.
    #[arg(long, value_name = "BURST/MS|off", default_value = "20/1000", value_parser = parse_throttle)]
    pub(crate) login_throttle_source: ThrottleFlag,
    /// Failed logins allowed per user name, as --login-throttle-source.
    #[arg(long, value_name = "BURST/MS|off", default_value = "10/5000", value_parser = parse_throttle)]
    pub(crate) login_throttle_user: ThrottleFlag,
    /// Most detached sessions (clients away) kept live in memory; past it the oldest live on
    /// in the store only.
    #[arg(long, value_name = "N", default_value_t = tether::guard::DEFAULT_MAX_DETACHED)]
    pub(crate) max_detached: usize,
    /// Most bytes of session state detached sessions keep in memory, as --max-detached.
    #[arg(long, value_name = "BYTES", default_value_t = tether::guard::DEFAULT_MAX_DETACHED_BYTES)]
    pub(crate) max_detached_bytes: usize,
    /// Longest wait for one session-store call (milliseconds): past it a new session goes on
    /// in memory and a restore that needs the store gets code 11.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub(crate) store_timeout: u64,
}

/// `off`, `address` (the same source address) or `network:V4PREFIX/V6PREFIX`.
pub(crate) fn parse_binding(s: &str) -> Result<SessionBinding, String> {
    match s {
        "off" => Ok(SessionBinding::Off),
        "address" => Ok(SessionBinding::SAME_ADDRESS),
        _ => {
            let bad = || format!("expected off, address or network:V4PREFIX/V6PREFIX, got {s:?}");
            let (v4, v6) = s
                .strip_prefix("network:")
                .and_then(|p| p.split_once('/'))
                .ok_or_else(bad)?;
            let ipv4_prefix: u8 = v4.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
            let ipv6_prefix: u8 = v6.parse().ok().filter(|p| *p <= 128).ok_or_else(bad)?;
            Ok(SessionBinding::SourceNetwork {
                ipv4_prefix,
                ipv6_prefix,
            })
        }
    }
}

/// A throttle flag's value: `None` is `off` (a newtype, since clap reads a bare `Option` as
/// "flag may be absent").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThrottleFlag(pub(crate) Option<Throttle>);

/// `off`, or `BURST/MS`: BURST failures at once, then one more every MS milliseconds.
pub(crate) fn parse_throttle(s: &str) -> Result<ThrottleFlag, String> {
    if s == "off" {
        return Ok(ThrottleFlag(None));
    }
    let bad = || format!("expected off or BURST/MS, got {s:?}");
    let (burst, ms) = s.split_once('/').ok_or_else(bad)?;
    Ok(ThrottleFlag(Some(Throttle {
        burst: burst.parse().map_err(|_| bad())?,
        refill: Duration::from_millis(ms.parse().map_err(|_| bad())?),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(parse_binding("off"), Ok(SessionBinding::Off));
        assert_eq!(parse_binding("address"), Ok(SessionBinding::SAME_ADDRESS));
        assert_eq!(
            parse_binding("network:24/64"),
            Ok(SessionBinding::SourceNetwork {
                ipv4_prefix: 24,
                ipv6_prefix: 64
            })
        );
        assert!(parse_binding("network:33/64").is_err());
        assert!(parse_binding("network:24").is_err());
        assert_eq!(parse_throttle("off"), Ok(ThrottleFlag(None)));
        assert_eq!(
            parse_throttle("5/2000"),
            Ok(ThrottleFlag(Some(Throttle {
                burst: 5,
                refill: Duration::from_secs(2)
            })))
        );
        assert!(parse_throttle("5").is_err());
        // The flags' documented defaults are the library's.
        assert_eq!(
            parse_throttle("20/1000"),
            Ok(ThrottleFlag(Some(Throttle::DEFAULT_PER_SOURCE)))
        );
        assert_eq!(
            parse_throttle("10/5000"),
            Ok(ThrottleFlag(Some(Throttle::DEFAULT_PER_USER)))
        );
    }
}
