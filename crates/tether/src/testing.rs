//! Tools for testing what tether promises when the network misbehaves.
//!
//! [`CutProxy`] forwards TCP connections on loopback to a target and can cut every link
//! through it at once, which is how the session tests and `tether bench` break a connection
//! without either end closing it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use tether::testing::CutProxy;
//!
//! let target = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let proxy = CutProxy::start(target.local_addr()?).await?;
//! let _client = tokio::net::TcpStream::connect(proxy.local_addr()).await?;
//! let (_server_side, _) = target.accept().await?;
//! proxy.wait_for_links(1).await;
//! assert_eq!(proxy.cut(), 1);
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One forwarded connection: its task, and a second handle on each socket so a cut can shut
/// both down at once, without waiting for the task to notice an abort.
struct Link {
    task: JoinHandle<()>,
    sockets: [std::net::TcpStream; 2],
}

/// Another handle on `stream`'s socket (a duplicated descriptor): shutting it down shuts the
/// socket down for every handle.
fn second_handle(stream: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std = stream.into_std()?;
    let other = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, other))
}

/// A loopback TCP proxy whose links can be cut on demand.
pub struct CutProxy {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<Link>>>,
    live: Arc<watch::Sender<usize>>,
    accepted: Arc<AtomicU64>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for CutProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

impl CutProxy {
    /// Listens on an ephemeral loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let live = Arc::new(watch::Sender::new(0usize));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_task = {
            let links = links.clone();
            let live = live.clone();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (Ok((mut inbound, in_handle)), Ok((mut outbound, out_handle))) =
                        (second_handle(inbound), second_handle(outbound))
                    else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let live_link = live.clone();
                    let task = tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        live_link.send_modify(|n| *n = n.saturating_sub(1));
                    });
                    let mut links = links.lock().unwrap_or_else(|e| e.into_inner());
                    links.retain(|l| !l.task.is_finished());
                    links.push(Link {
                        task,
                        sockets: [in_handle, out_handle],
                    });
                    live.send_modify(|n| *n += 1);
                }
            })
        };
        Ok(CutProxy {
            addr,
            links,
            live,
            accepted,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the proxy has forwarded in all.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` links are up.
    pub async fn wait_for_links(&self, n: usize) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|live| *live >= n).await;
    }

    /// Drops every current link at once (both sockets are shut down before this returns, so
    /// nothing written after it is forwarded); returns how many were cut. New connections are
    /// still accepted.
    pub fn cut(&self) -> usize {
        let links: Vec<_> = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let mut cut = 0;
        for link in links {
            if !link.task.is_finished() {
                cut += 1;
            }
            for socket in &link.sockets {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
            link.task.abort();
        }
        self.live.send_modify(|n| *n = n.saturating_sub(cut));
        cut
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}
