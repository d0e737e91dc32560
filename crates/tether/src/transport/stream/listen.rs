//! Listening: bounded handshakes under one deadline, accept back-off, stale Unix sockets.

use super::*;

/// Settings for [`StreamListener`]; build with [`ListenOptions::builder`].
///
/// Defaults:
///
/// | Setting | Default | Why |
/// | --- | --- | --- |
/// | `handshake_timeout` | 10 s | TLS plus an HTTP upgrade on a slow link; `tether serve --handshake-timeout` sets it |
/// | `max_pending_handshakes` | 1024 | about 1024 sockets of kernel and TLS state; the oldest is evicted beyond it |
/// | `max_connections` | 32 768 | the listener's share of file descriptors; the README's benchmark holds 10 000 idle connections |
/// | `max_connections_per_ip` | 16 384 | generous because loopback benchmarks and NAT put many clients behind one address; lower it on the open internet |
/// | `accept_queue` | 64 | established streams waiting for [`StreamListener::accept`] |
/// | `accept_backoff_min` / `_max` | 10 ms / 1 s | after an accept error such as `EMFILE` |
///
/// Defaults of [`DialOptions`]: `connect_timeout` 10 s (TCP connect and TLS handshake
/// together), no TLS, no ALPN protocols.
///
/// Memory: the per-IP table holds one entry per source address with a live connection, so it
/// is bounded by `max_connections`; the pending-handshake queue by `max_pending_handshakes`;
/// the accepted-stream queue by `accept_queue`.
#[derive(Clone)]
#[non_exhaustive]
pub struct ListenOptions {
    /// TLS server configuration: with it every accepted connection does a TLS handshake first.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Time for TLS plus the caller's upgrade. Default 10 s.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; beyond it the oldest is evicted. Default 1024.
    pub max_pending_handshakes: usize,
    /// Live connections (pending or established) at once. Default 32 768.
    pub max_connections: usize,
    /// Live connections from one source IP address at once (TCP only). Default 16 384.
    pub max_connections_per_ip: usize,
    /// Established streams waiting for [`StreamListener::accept`]. Default 64.
    pub accept_queue: usize,
    /// First pause after an accept error such as `EMFILE`. Default 10 ms.
    pub accept_backoff_min: Duration,
    /// Longest pause after repeated accept errors. Default 1 s.
    pub accept_backoff_max: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_connections: 32_768,
            max_connections_per_ip: 16_384,
            accept_queue: 64,
            accept_backoff_min: Duration::from_millis(10),
            accept_backoff_max: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for ListenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenOptions")
            .field("tls", &self.tls.as_ref().map(|_| "ServerConfig"))
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_pending_handshakes", &self.max_pending_handshakes)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("accept_queue", &self.accept_queue)
            .field("accept_backoff_min", &self.accept_backoff_min)
            .field("accept_backoff_max", &self.accept_backoff_max)
            .finish()
    }
}

impl ListenOptions {
    /// Starts from the defaults.
    pub fn builder() -> ListenOptionsBuilder {
        ListenOptionsBuilder(ListenOptions::default())
    }
}

/// Builds [`ListenOptions`].
#[derive(Debug, Clone, Default)]
pub struct ListenOptionsBuilder(ListenOptions);

impl ListenOptionsBuilder {
    /// Sets [`ListenOptions::tls`].
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.0.tls = Some(tls);
        self
    }
    /// Sets [`ListenOptions::handshake_timeout`].
    pub fn handshake_timeout(mut self, after: Duration) -> Self {
        self.0.handshake_timeout = after;
        self
    }
    /// Sets [`ListenOptions::max_pending_handshakes`] (at least 1).
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.0.max_pending_handshakes = n.max(1);
        self
    }
    /// Sets [`ListenOptions::max_connections`].
    pub fn max_connections(mut self, n: usize) -> Self {
        self.0.max_connections = n;
        self
    }
    /// Sets [`ListenOptions::max_connections_per_ip`].
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.0.max_connections_per_ip = n;
        self
    }
    /// Sets [`ListenOptions::accept_queue`] (at least 1).
    pub fn accept_queue(mut self, n: usize) -> Self {
        self.0.accept_queue = n.max(1);
        self
    }
    /// Sets the accept-error back-off range.
    pub fn accept_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.0.accept_backoff_min = min;
        self.0.accept_backoff_max = max.max(min);
        self
    }
    /// The options.
    pub fn build(self) -> ListenOptions {
        self.0
    }
}

/// What a listener hands out: an upgraded connection, or the error of one that failed its
/// handshake (or of `accept` itself); the listener keeps going after either.
pub type Accepted<T> = Result<T, FloorError>;

/// A bound listener yielding `T`: a [`ByteStream`] from [`bind`](Self::bind), or what the
/// upgrade of [`bind_with`](Self::bind_with) made of one.
///
/// Every listener has the same guards:
///
/// * one **handshake deadline** covers the TLS handshake and the caller's upgrade together;
/// * **bounded pending handshakes**: when the bound is reached, the *oldest* pending handshake
///   is evicted (closed) to make room, so a flood of silent sockets cannot keep new clients out
///   for longer than it takes the flood to outnumber them;
/// * **connection caps**, total and per source IP, counted from accept until the stream (or
///   whatever the upgrade made of it) is dropped; connections beyond a cap are closed at once;
/// * **accept errors never end the loop**: errors that concern one connection are skipped, others
///   (typically `EMFILE`, out of file descriptors) are reported and backed off from, doubling
///   from [`ListenOptions::accept_backoff_min`] up to [`ListenOptions::accept_backoff_max`];
/// * a **stale Unix socket** file is replaced only when nobody answers on it; a live one, or a
///   file that is not a socket, is an error;
/// * [`StreamListener::shutdown`] (or dropping the listener) stops accepting, aborts pending
///   handshakes and removes the Unix socket file if it is still ours.
///
pub struct StreamListener<T = ByteStream> {
    rx: Option<mpsc::Receiver<Accepted<T>>>,
    task: Option<JoinHandle<()>>,
    local_addr: String,
    /// The socket file and its identity, removed on shutdown if it is still ours.
    unix_socket: Option<(PathBuf, u64, u64)>,
}

impl<T> fmt::Debug for StreamListener<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamListener")
            .field("local_addr", &self.local_addr)
            .field("open", &self.rx.is_some())
            .finish()
    }
}

enum RawListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl RawListener {
    async fn accept(&self) -> io::Result<(Plain, PeerInfo)> {
        match self {
            RawListener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                // Request/response protocols want small writes out at once.
                let _ = s.set_nodelay(true);
                let peer = PeerInfo {
                    local_addr: s.local_addr().ok().map(|a| a.to_string()),
                    remote_addr: Some(addr.to_string()),
                    remote_ip: Some(canonical_ip(addr)),
                    ..PeerInfo::default()
                };
                Ok((Plain::Tcp(s), peer))
            }
            RawListener::Unix(l) => {
                let (s, addr) = l.accept().await?;
                let peer = PeerInfo {
                    local_addr: s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_pathname().map(|p| p.display().to_string())),
                    remote_addr: addr.as_pathname().map(|p| p.display().to_string()),
                    ..PeerInfo::default()
                };
                Ok((Plain::Unix(s), peer))
            }
        }
    }
}

/// An IPv4 peer on a dual-stack socket counts as its IPv4 address.
pub(super) fn canonical_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

type Upgrade<T> =
    Arc<dyn Fn(ByteStream) -> Pin<Box<dyn Future<Output = Accepted<T>> + Send>> + Send + Sync>;

impl StreamListener<ByteStream> {
    /// Binds `endpoint` and yields its connections as byte streams (after TLS when
    /// [`ListenOptions::tls`] is set).
    pub async fn bind(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
    ) -> Result<Self, FloorError> {
        let inline = options.tls.is_none();
        Self::start(
            endpoint,
            options,
            Arc::new(|s| Box::pin(std::future::ready(Ok(s)))),
            inline,
        )
        .await
    }
}

impl<T: Send + 'static> StreamListener<T> {
    /// Binds `endpoint` and runs `upgrade` on every connection (after TLS when
    /// [`ListenOptions::tls`] is set), in its own task, within
    /// [`ListenOptions::handshake_timeout`] for TLS and upgrade together, and counted among the
    /// pending handshakes until it finishes. Its error becomes [`FloorError::Upgrade`].
    pub async fn bind_with<F, Fut, E>(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: F,
    ) -> Result<Self, FloorError>
    where
        F: Fn(ByteStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let upgrade: Upgrade<T> = Arc::new(move |s| {
            let fut = upgrade(s);
            Box::pin(async move { fut.await.map_err(|e| FloorError::Upgrade(e.into())) })
        });
        Self::start(endpoint, options, upgrade, false).await
    }

    /// As [`bind_with`](Self::bind_with), but a listener without TLS runs `upgrade` in the
    /// accept loop: only for upgrades that finish at once (JSTP's NUL framing), which saves a
    /// task per connection.
    pub(crate) async fn bind_immediate<F>(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: F,
        immediate: bool,
    ) -> Result<Self, FloorError>
    where
        F: Fn(ByteStream) -> Pin<Box<dyn Future<Output = Accepted<T>> + Send>>
            + Send
            + Sync
            + 'static,
    {
        let inline = immediate && options.tls.is_none();
        Self::start(endpoint, options, Arc::new(upgrade), inline).await
    }

    async fn start(
        endpoint: &StreamEndpoint,
        options: &ListenOptions,
        upgrade: Upgrade<T>,
        inline: bool,
    ) -> Result<Self, FloorError> {
        let (raw, local_addr, unix_socket) = match endpoint {
            StreamEndpoint::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = UnixListener::bind(path).map_err(FloorError::io("bind"))?;
                let meta = std::fs::symlink_metadata(path).map_err(FloorError::io("bind"))?;
                (
                    RawListener::Unix(listener),
                    path.display().to_string(),
                    Some((path.clone(), meta.dev(), meta.ino())),
                )
            }
            StreamEndpoint::Tcp { host, port } => {
                let listener = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(FloorError::io("bind"))?;
                let addr = listener
                    .local_addr()
                    .map_err(FloorError::io("bind"))?
                    .to_string();
                (RawListener::Tcp(listener), addr, None)
            }
        };
        let (tx, rx) = mpsc::channel(options.accept_queue.max(1));
        let shared = Arc::new(Shared {
            local_addr: local_addr.clone(),
            options: options.clone(),
            tls: options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            caps: Arc::new(Caps {
                max_total: options.max_connections,
                max_per_ip: options.max_connections_per_ip,
                counts: Mutex::default(),
            }),
            upgrade,
        });
        let task = tokio::spawn(accept_loop(raw, shared, tx, inline));
        Ok(StreamListener {
            rx: Some(rx),
            task: Some(task),
            local_addr,
            unix_socket,
        })
    }
}

impl<T> StreamListener<T> {
    /// The bound address: `ip:port` (the real port when bound to port 0), or the socket path.
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// The next connection, or the error of one that failed (the listener keeps going).
    /// `None` after [`shutdown`](Self::shutdown). Cancel-safe.
    pub async fn accept(&mut self) -> Option<Accepted<T>> {
        self.rx.as_mut()?.recv().await
    }

    /// Stops accepting, aborts handshakes in progress, drops connections not yet accepted and
    /// removes the Unix socket file if it is still the one this listener created. Idempotent;
    /// dropping the listener does the same.
    pub fn shutdown(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.rx = None;
        if let Some((path, dev, ino)) = self.unix_socket.take() {
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.dev() == dev && meta.ino() == ino {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl<T> Drop for StreamListener<T> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a Unix socket file nobody listens on; a live socket or another kind of file is an
/// error.
pub(crate) async fn remove_stale_socket(path: &Path) -> Result<(), FloorError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => Err(FloorError::Io {
                what: "bind",
                source: io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ),
            }),
            Err(_) => {
                tracing::debug!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path).map_err(FloorError::io("remove stale socket"))
            }
        },
        Ok(_) => Err(FloorError::Io {
            what: "bind",
            source: io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FloorError::Io {
            what: "bind",
            source: e,
        }),
    }
}

struct Shared<T> {
    /// The bound address, named in log lines.
    local_addr: String,
    options: ListenOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    caps: Arc<Caps>,
    upgrade: Upgrade<T>,
}

/// Errors that concern one connection only; anything else (e.g. out of file descriptors) is
/// reported and backed off from.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// TLS (when configured) and the upgrade, without the deadline.
async fn establish<T>(
    plain: Plain,
    mut peer: PeerInfo,
    permit: ConnectionPermit,
    shared: &Shared<T>,
) -> Accepted<T> {
    let io = match &shared.tls {
        None => Io::Plain(plain),
        Some(acceptor) => {
            let tls = acceptor
                .accept(plain)
                .await
                .map_err(FloorError::TlsHandshake)?;
            peer.tls = true;
            peer.alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            Io::TlsServer(Box::new(tls))
        }
    };
    let stream = ByteStream {
        io,
        peer,
        permit: Some(permit),
    };
    (shared.upgrade)(stream).await
}

async fn accept_loop<T: Send + 'static>(
    raw: RawListener,
    shared: Arc<Shared<T>>,
    tx: mpsc::Sender<Accepted<T>>,
    inline: bool,
) {
    let options = &shared.options;
    let max_pending = options.max_pending_handshakes.max(1);
    // Dropping the set (when this task is aborted) aborts the handshakes.
    let mut handshakes = JoinSet::new();
    // Pending handshakes, oldest first, for eviction; finished ones are pruned lazily.
    let mut order: VecDeque<AbortHandle> = VecDeque::new();
    let mut backoff = options.accept_backoff_min;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = raw.accept() => match accepted {
                Ok((plain, peer)) => {
                    backoff = options.accept_backoff_min;
                    let permit = match shared.caps.admit(peer.remote_ip) {
                        Ok(p) => p,
                        Err(why) => {
                            // Closed at once: refusing is cheaper than any answer.
                            tracing::debug!(peer = ?peer.remote_addr, ?why, "connection over the cap");
                            continue;
                        }
                    };
                    if inline {
                        let result = establish(plain, peer, permit, &shared).await;
                        if tx.send(result).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if order.len() >= max_pending {
                        order.retain(|h| !h.is_finished());
                    }
                    while order.len() >= max_pending {
                        // Fair eviction: the oldest has had the longest time to finish.
                        if let Some(oldest) = order.pop_front() {
                            tracing::debug!("pending handshakes full: evicting the oldest");
                            oldest.abort();
                        }
                    }
                    let shared = shared.clone();
                    let tx = tx.clone();
                    let handle = handshakes.spawn(async move {
                        let after = shared.options.handshake_timeout;
                        let result = tokio::time::timeout(
                            after,
                            establish(plain, peer, permit, &shared),
                        )
                        .await
                        .unwrap_or(Err(FloorError::Timeout { what: "handshake", after }));
                        let _ = tx.send(result).await;
                    });
                    order.push_back(handle);
                }
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    tracing::warn!(
                        listener = %shared.local_addr,
                        error = %e,
                        pause = ?backoff,
                        "accept failed; backing off"
                    );
                    // Reported without waiting: a consumer that is not reading must not stall
                    // the back-off (a full queue drops the report, the log line stays).
                    let _ = tx.try_send(Err(FloorError::Io { what: "accept", source: e }));
                    // Typically EMFILE: give connections time to close.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(options.accept_backoff_max);
                }
            },
        }
    }
}
