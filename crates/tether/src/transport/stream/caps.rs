//! Connection caps, total and per source IP, held from accept until the stream is dropped.

use super::*;

/// Live connection counts of one listener. The map has an entry per source IP with at least
/// one live connection (so at most `max_connections` entries).
#[derive(Debug, Default)]
pub(super) struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
pub(crate) struct Caps {
    pub(super) max_total: usize,
    pub(super) max_per_ip: usize,
    pub(super) counts: Mutex<Counts>,
}

/// A connection's slot under its listener's caps, released when dropped.
pub struct ConnectionPermit {
    caps: Arc<Caps>,
    ip: Option<IpAddr>,
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPermit")
            .field("ip", &self.ip)
            .finish()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a connection was refused by the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    Total,
    PerIp,
}

impl Caps {
    pub(super) fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnectionPermit, Refusal> {
        let mut counts = lock(&self.counts);
        if counts.total >= self.max_total {
            return Err(Refusal::Total);
        }
        if let Some(ip) = ip {
            let n = counts.per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        counts.total += 1;
        Ok(ConnectionPermit {
            caps: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = lock(&self.caps.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = counts.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.per_ip.remove(&ip);
                }
            }
        }
    }
}
