//! The server side: [`HttpServer`] (accepting, limits, timeouts, graceful drain),
//! [`ServerConnection`] (streams taken one by one) and [`ServerStream`] (one request and the
//! response to it).

use super::body::{body_read_methods, body_write_methods, HasBody, OutBody, Outgoing};
use super::{header_map, within, BodyReader, HttpError, HttpVersion, RequestHead, Role};
use crate::transport::{ByteStream, ListenOptions, StreamEndpoint, StreamListener};
use futures::future::BoxFuture;
use futures::FutureExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

type StreamHandler =
    Arc<dyn Fn(ServerStream) -> BoxFuture<'static, Result<(), HttpError>> + Send + Sync>;
type ErrorHandler = Arc<dyn Fn(HttpError) + Send + Sync>;

/// Whether a server speaks TLS.
#[derive(Clone)]
#[non_exhaustive]
pub enum TlsMode {
    /// Plain HTTP only (HTTP/1.1, or HTTP/2 with prior knowledge).
    Disabled,
    /// TLS required (ALPN `h2`, `http/1.1`).
    Required(Arc<rustls::ServerConfig>),
    /// TLS when the client starts with a TLS handshake, plain otherwise.
    Auto(Arc<rustls::ServerConfig>),
}

/// Server options. Every limit is per server unless its name says otherwise.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    on_stream: StreamHandler,
    on_error: Option<ErrorHandler>,
    /// TLS. Default disabled.
    pub tls: TlsMode,
    /// Most handlers running at once across the server (a fair, first-come first-served
    /// bound: a stream waits for a slot in arrival order, whatever its connection).
    /// Default 256.
    pub max_concurrent: usize,
    /// Most handlers running at once for one connection; sent as HTTP/2's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (HTTP/1.1 runs one at a time anyway). Keep it below
    /// `max_concurrent`, so one connection cannot take every slot. Default 100.
    pub max_streams_per_connection: usize,
    /// Time a new connection (plain HTTP/1.1, HTTP/2 by prior knowledge, or TLS) gets for its
    /// TLS handshake and its first request head; past it the connection is closed and
    /// [`HttpError::Timeout`] reported. Default 10 s (lua-http's `connection_setup_timeout`).
    pub connection_setup_timeout: Duration,
    /// Time a client gets to finish sending an HTTP/1.1 request head. Default 30 s.
    pub intra_stream_timeout: Duration,
    /// Time a connection may stay without a running request before it is shut down
    /// gracefully (HTTP/2: GOAWAY; HTTP/1.1: closed between requests). Default 60 s
    /// (lua-http bounds the wait for a connection's next request with
    /// `intra_stream_timeout`).
    pub idle_timeout: Duration,
    /// Largest request head. Default 64 KiB (larger: 431 on HTTP/1.1).
    pub max_header_size: usize,
}

impl ServerOptions {
    /// Options with `on_stream` handling each request.
    pub fn new<F, Fut>(on_stream: F) -> Self
    where
        F: Fn(ServerStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HttpError>> + Send + 'static,
    {
        ServerOptions {
            on_stream: Arc::new(move |s| Box::pin(on_stream(s))),
            on_error: None,
            tls: TlsMode::Disabled,
            max_concurrent: 256,
            max_streams_per_connection: 100,
            connection_setup_timeout: Duration::from_secs(10),
            intra_stream_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_header_size: 64 * 1024,
        }
    }

    /// Called with connection and handler errors.
    pub fn on_error(mut self, f: impl Fn(HttpError) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(f));
        self
    }

    /// Sets the TLS mode.
    pub fn tls(mut self, tls: TlsMode) -> Self {
        self.tls = tls;
        self
    }
}

/// One server-side connection's state, shared by its streams.
struct ConnState {
    /// Requests in progress (from their head until their handler ends).
    active: AtomicUsize,
    /// When the connection started; `last_change` counts from it.
    started: Instant,
    /// When a request last started or ended, in ms since `started`. Read only when the idle
    /// deadline passes, so requests never wake the connection's task.
    last_change: AtomicU64,
    /// A request head has arrived: the connection is set up.
    seen_request: AtomicBool,
    /// Asks the connection to shut down gracefully (GOAWAY on demand).
    goaway: Notify,
    /// This connection's share of handler slots (`max_streams_per_connection`).
    permits: Arc<Semaphore>,
}

/// Counts one request as in progress on its connection until dropped.
struct Active(Arc<ConnState>);

impl ConnState {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_change.store(ms, Ordering::SeqCst);
    }

    /// How long no request has been running; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_change.load(Ordering::SeqCst));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

impl Active {
    fn new(conn: &Arc<ConnState>) -> Self {
        conn.active.fetch_add(1, Ordering::SeqCst);
        conn.touch();
        Active(conn.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request on a server connection, and the response to write. A handler that drops it
/// without writing headers answers 500, or 400 when the request body was malformed.
pub struct ServerStream {
    head: RequestHead,
    incoming: BodyReader,
    response: Option<oneshot::Sender<Response<OutBody>>>,
    body: Outgoing,
    peer: Option<String>,
    conn: Arc<ConnState>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("head", &self.head)
            .finish()
    }
}

impl Drop for ServerStream {
    fn drop(&mut self) {
        if let Some(tx) = self.response.take() {
            let status = if self.incoming.failed() { 400 } else { 500 };
            let _ = tx.send(status_only(status));
        }
    }
}

fn status_only(status: u16) -> Response<OutBody> {
    let mut response = Response::new(OutBody::empty());
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
}

impl HasBody for ServerStream {
    fn body_ready(
        &mut self,
    ) -> impl Future<Output = Result<&mut BodyReader, HttpError>> + Send + '_ {
        std::future::ready(Ok(&mut self.incoming))
    }

    fn body_reader(&self) -> &BodyReader {
        &self.incoming
    }
}

impl ServerStream {
    /// The request head.
    pub fn get_headers(&self) -> &RequestHead {
        &self.head
    }

    /// The client's address.
    #[doc(alias = "peername")]
    pub fn peer_addr(&self) -> Option<String> {
        self.peer.clone()
    }

    body_read_methods!();

    /// Tells an HTTP/1.1 client that sent `Expect: 100-continue` to send its body (hyper
    /// writes `100 Continue` when the body is first read; the chunk this reads is kept for
    /// the next read). Without that expectation it does nothing. Not supported over HTTP/2
    /// (hyper's HTTP/2 server cannot send interim responses): there it fails with
    /// [`HttpError::State`].
    pub async fn write_continue(&mut self) -> Result<(), HttpError> {
        let expects = self
            .head
            .headers
            .get(hyper::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects {
            return Ok(());
        }
        if self.head.version == HttpVersion::Http2 {
            return Err(HttpError::State(
                "interim responses are not supported over HTTP/2",
            ));
        }
        if let Some(chunk) = self.incoming.next_chunk().await? {
            self.incoming.unget(&chunk)?;
        }
        Ok(())
    }

    /// Sends the response head; with `end_stream` there is no body.
    pub async fn write_headers(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        end_stream: bool,
    ) -> Result<(), HttpError> {
        let headers = header_map(headers)?;
        let status = hyper::StatusCode::from_u16(status).map_err(|e| HttpError::Invalid {
            what: "status".into(),
            source: e.into(),
        })?;
        let tx = self
            .response
            .take()
            .ok_or(HttpError::State("headers already written"))?;
        let (writer, body) = if end_stream {
            (Outgoing::default(), OutBody::empty())
        } else {
            OutBody::channel()
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        self.body = writer;
        tx.send(response)
            .map_err(|_| HttpError::Closed("the client went away"))
    }

    body_write_methods!();

    /// Switches the connection to another protocol (HTTP/1.1 `Upgrade`, e.g. a WebSocket on
    /// the same port): answers `101 Switching Protocols` with `headers` and returns the raw
    /// connection once hyper has handed it over.
    pub async fn upgrade(
        mut self,
        headers: &[(&str, &str)],
    ) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, HttpError> {
        let on = self
            .upgrade
            .take()
            .ok_or(HttpError::State("this request cannot be upgraded"))?;
        self.write_headers(101, headers, true).await?;
        let io = on.await.map_err(HttpError::Connection)?;
        Ok(hyper_util::rt::TokioIo::new(io))
    }

    /// Asks the connection to shut down gracefully: on HTTP/2 a GOAWAY (open streams finish,
    /// no new ones), on HTTP/1.1 the connection closes after this exchange.
    #[doc(alias = "goaway")]
    pub fn shutdown_connection(&self) {
        self.conn.goaway.notify_one();
    }
}

struct ServerShared {
    options: ServerOptions,
    /// The global, first-come first-served bound on running handlers.
    permits: Arc<Semaphore>,
    /// Handlers running now (counted until each ends, cancelled or not).
    running: AtomicUsize,
    stop: watch::Sender<bool>,
    paused: watch::Sender<bool>,
    /// Connections being served.
    connections: watch::Sender<usize>,
}

/// An HTTP/1.1 and HTTP/2 server (the version is detected per connection).
#[derive(Clone)]
pub struct HttpServer {
    shared: Arc<ServerShared>,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer").finish_non_exhaustive()
    }
}

/// One server-side connection whose streams the caller takes one by one (lua-http's
/// `get_next_incoming_stream`), instead of an `on_stream` handler.
pub struct ServerConnection {
    streams: mpsc::Receiver<ServerStream>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ServerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConnection").finish_non_exhaustive()
    }
}

impl ServerConnection {
    /// Serves HTTP/1.1 or HTTP/2 (detected) on `io` with `options` (its `on_stream` is not
    /// used). Up to `max_streams_per_connection` streams wait to be taken.
    pub fn new(
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        mut options: ServerOptions,
    ) -> ServerConnection {
        let (tx, streams) = mpsc::channel(options.max_streams_per_connection.max(1));
        options.on_stream = Arc::new(move |stream| {
            let tx = tx.clone();
            Box::pin(async move {
                tx.send(stream)
                    .await
                    .map_err(|_| HttpError::Closed("no one takes streams"))
            })
        });
        let server = HttpServer::new(options);
        let task = tokio::spawn(async move { server.serve_io(io, None).await });
        ServerConnection { streams, task }
    }

    /// Always [`Role::Server`].
    pub fn role(&self) -> Role {
        Role::Server
    }

    /// The next request; `Ok(None)` once the connection has ended (EOF or GOAWAY).
    #[doc(alias = "get_next_incoming_stream")]
    pub async fn next_incoming_stream(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ServerStream>, HttpError> {
        within(timeout, async { Ok(self.streams.recv().await) }).await
    }

    /// Ends the connection now.
    pub fn close(&self) {
        self.task.abort();
    }
}

/// Counts one running handler until dropped.
struct Running(Arc<ServerShared>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HttpServer {
    /// A server with `options`.
    pub fn new(options: ServerOptions) -> HttpServer {
        let permits = Arc::new(Semaphore::new(options.max_concurrent.max(1)));
        HttpServer {
            shared: Arc::new(ServerShared {
                options,
                permits,
                running: AtomicUsize::new(0),
                stop: watch::channel(false).0,
                paused: watch::channel(false).0,
                connections: watch::channel(0).0,
            }),
        }
    }

    /// Handlers running now: each is counted from its start until it ends, including one
    /// cancelled because its stream was reset or its connection closed.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        *self.shared.connections.borrow()
    }

    /// Stops accepting new connections (they wait in the listen backlog); open connections
    /// go on.
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    /// Accepts again after [`HttpServer::pause`].
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    /// Listens on `addr` (`host:port`, IPv6 without brackets or in them); returns the bound
    /// address.
    pub async fn listen(&self, addr: &str) -> Result<String, HttpError> {
        let endpoint = StreamEndpoint::parse_host_port(addr).map_err(HttpError::Floor)?;
        self.listen_on(endpoint).await
    }

    /// Listens on a Unix socket at `path`. A socket file left by a dead server is replaced;
    /// one a live server still answers on, or a file that is not a socket, is an error.
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> Result<(), HttpError> {
        self.listen_on(StreamEndpoint::Unix(path.as_ref().to_owned()))
            .await
            .map(drop)
    }

    /// Listens on the network floor ([`crate::transport::StreamListener`]): its handshake
    /// deadline (`connection_setup_timeout`) covers TLS or its detection, pending handshakes
    /// are bounded, accept errors (EMFILE) are backed off from, a stale Unix socket is
    /// replaced only when dead. Then each connection is served until it ends.
    async fn listen_on(&self, endpoint: StreamEndpoint) -> Result<String, HttpError> {
        let options = &self.shared.options;
        let listen = ListenOptions::builder()
            .handshake_timeout(options.connection_setup_timeout)
            .build();
        let tls = options.tls.clone();
        let setup = options.connection_setup_timeout;
        let mut listener = StreamListener::bind_with(&endpoint, &listen, move |stream| {
            let started = Instant::now();
            let tls = tls.clone();
            async move {
                let peer = stream.peer().remote_addr.clone();
                let io = secure(stream, &tls).await?;
                Ok::<_, HttpError>(Accepted {
                    io,
                    peer,
                    setup_deadline: started + setup,
                })
            }
        })
        .await
        .map_err(HttpError::Floor)?;
        let local = match &endpoint {
            StreamEndpoint::Unix(path) => path.display().to_string(),
            _ => listener.local_addr(),
        };
        let server = self.clone();
        let mut stop = self.shared.stop.subscribe();
        let mut paused = self.shared.paused.subscribe();
        let here = local.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = paused.wait_for(|p| !p) => {}
                }
                let accepted = tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = paused.wait_for(|p| *p) => continue,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    None => break,
                    Some(Ok(conn)) => {
                        let server = server.clone();
                        let here = here.clone();
                        tokio::spawn(async move {
                            // A Unix client seldom binds a path: name the socket instead.
                            let peer = conn.peer.or(Some(here));
                            server.serve_until(conn.io, peer, conn.setup_deadline).await
                        });
                    }
                    Some(Err(e)) => server.error(HttpError::from_floor(e)),
                }
            }
            listener.shutdown();
        });
        Ok(local)
    }

    fn error(&self, e: HttpError) {
        if let Some(f) = &self.shared.options.on_error {
            f(e);
        }
    }

    /// Serves one connection over any byte stream (in-memory duplex, Unix socket, …) until
    /// it ends, with the same setup and idle timeouts as a listener's connections.
    pub async fn serve_io(
        &self,
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        peer: Option<String>,
    ) {
        let deadline = Instant::now() + self.shared.options.connection_setup_timeout;
        self.serve_until(io, peer, deadline).await
    }

    async fn serve_until(
        &self,
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        peer: Option<String>,
        setup_deadline: Instant,
    ) {
        let _open = crate::metrics::HttpConnectionGuard::new();
        let options = &self.shared.options;
        if *self.shared.stop.borrow() {
            return;
        }
        self.shared.connections.send_modify(|n| *n += 1);
        struct Counted(Arc<ServerShared>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.connections.send_modify(|n| *n -= 1);
            }
        }
        let _counted = Counted(self.shared.clone());
        let conn_state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            started: Instant::now(),
            last_change: AtomicU64::new(0),
            seen_request: AtomicBool::new(false),
            goaway: Notify::new(),
            permits: Arc::new(Semaphore::new(options.max_streams_per_connection.max(1))),
        });
        let server = self.clone();
        let state = conn_state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let server = server.clone();
            let peer = peer.clone();
            let state = state.clone();
            async move { Ok::<_, Infallible>(server.handle(req, peer, state).await) }
        });
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(options.intra_stream_timeout)
            .max_buf_size(options.max_header_size.max(8192));
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(options.max_streams_per_connection as u32)
            .max_header_list_size(options.max_header_size as u32);
        let mut conn =
            pin!(builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service));
        let mut stop = self.shared.stop.subscribe();
        let mut draining = false;
        // First the setup deadline; when it passes with a request seen, the idle deadline,
        // re-checked each time it passes (requests only touch atomics, they never wake this
        // task); after a graceful shutdown started, a last deadline for the peer to finish.
        let idle = options.idle_timeout;
        let mut deadline = Some(setup_deadline.min(Instant::now() + idle));
        loop {
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        let e = match e.downcast::<hyper::Error>() {
                            Ok(e) => HttpError::Connection(*e),
                            Err(e) => HttpError::Handler(e),
                        };
                        self.error(e);
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                    deadline = Some(Instant::now() + options.connection_setup_timeout);
                }
                _ = conn_state.goaway.notified(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = sleep => {
                    if draining {
                        return; // The peer did not finish in time: closed.
                    }
                    if !conn_state.seen_request.load(Ordering::SeqCst) {
                        if Instant::now() < setup_deadline {
                            deadline = Some(setup_deadline.min(Instant::now() + idle));
                            continue;
                        }
                        self.error(HttpError::Timeout(options.connection_setup_timeout));
                        return; // Dropping the connection closes it.
                    }
                    deadline = match conn_state.idle_for() {
                        Some(for_) if for_ >= idle => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                            Some(Instant::now() + options.connection_setup_timeout)
                        }
                        Some(for_) => Some(Instant::now() + (idle - for_)),
                        None => Some(Instant::now() + idle),
                    };
                }
            }
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: Option<String>,
        conn: Arc<ConnState>,
    ) -> Response<OutBody> {
        let active = Active::new(&conn);
        conn.seen_request.store(true, Ordering::SeqCst);
        // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400.
        if req.version() == hyper::Version::HTTP_11
            && !req.headers().contains_key(hyper::header::HOST)
        {
            return status_only(400);
        }
        // The connection's own slot first, so its excess waits here and not in the global
        // queue; then a global slot, first come first served.
        let Ok(own) = conn.permits.clone().acquire_owned().await else {
            return status_only(503);
        };
        let Ok(global) = self.shared.permits.clone().acquire_owned().await else {
            return status_only(503);
        };
        let upgrade = (req.version() == hyper::Version::HTTP_11
            && req.headers().contains_key(hyper::header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let head = RequestHead {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.to_string(), |p| p.to_string()),
            headers: parts.headers,
            version: HttpVersion::of(parts.version),
        };
        let (tx, rx) = oneshot::channel();
        let stream = ServerStream {
            head,
            incoming: BodyReader::new(Some(body)),
            response: Some(tx),
            body: Outgoing::default(),
            peer,
            conn: conn.clone(),
            upgrade,
        };
        let handler = self.shared.options.on_stream.clone();
        let server = self.clone();
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.shared.clone());
        let task = async move {
            // Held until the handler ends, or is cancelled: its slots and its count.
            let _slots: (OwnedSemaphorePermit, OwnedSemaphorePermit, Active, Running) =
                (own, global, active, running);
            // A panicking handler fails its own stream only (as if it were a task).
            match std::panic::AssertUnwindSafe(handler(stream))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => server.error(e),
                Err(_) => server.error(HttpError::State("the handler panicked")),
            }
        };
        // The handler runs inside this request's future until it has answered (no task of its
        // own: dropping the future, on a reset stream or a closed connection, cancels it);
        // then inside the response body, which cancels it when dropped before its end.
        let mut task: Option<BoxFuture<'static, ()>> = Some(Box::pin(task));
        let mut rx = rx;
        let answered = std::future::poll_fn(|cx| {
            if let Some(t) = task.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    task = None;
                }
            }
            std::pin::Pin::new(&mut rx).poll(cx)
        })
        .await;
        match answered {
            Ok(mut response) => {
                let body = response.body_mut();
                body.settle();
                if let Some(task) = task {
                    if body.is_done() {
                        // Nothing more to send: the rest of the handler runs on its own.
                        tokio::spawn(task);
                    } else {
                        body.drive(task);
                    }
                }
                response
            }
            // The stream is dropped without answering only if the handler panicked.
            Err(_) => status_only(500),
        }
    }

    /// Stops accepting, lets open connections finish their streams (GOAWAY on HTTP/2,
    /// `Connection: close` on HTTP/1.1), and waits for them (a connection whose peer does not
    /// finish within `connection_setup_timeout` is closed).
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        let mut connections = self.shared.connections.subscribe();
        let _ = connections.wait_for(|n| *n == 0).await;
    }
}

/// A connection the floor accepted, after TLS (or its detection).
struct Accepted {
    io: Box<dyn Io>,
    peer: Option<String>,
    setup_deadline: Instant,
}

/// A byte stream hyper can serve.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// TLS as the server's mode asks: none, always, or when the client's first byte starts a TLS
/// handshake (the byte is read and put back in front of the stream).
async fn secure(stream: ByteStream, tls: &TlsMode) -> Result<Box<dyn Io>, HttpError> {
    let peer = stream.peer().remote_addr.clone().unwrap_or_default();
    let config = match tls {
        TlsMode::Disabled => return Ok(Box::new(stream)),
        TlsMode::Required(c) => c.clone(),
        TlsMode::Auto(c) => {
            let mut stream = Prefixed::new(stream);
            let first = stream.first_byte().await.map_err(|source| HttpError::Io {
                what: "reading the first byte",
                source,
            })?;
            if first != Some(0x16) {
                return Ok(Box::new(stream));
            }
            return accept_tls(stream, c, peer).await;
        }
    };
    accept_tls(stream, &config, peer).await
}

async fn accept_tls(
    io: impl Io,
    config: &Arc<rustls::ServerConfig>,
    peer: String,
) -> Result<Box<dyn Io>, HttpError> {
    let mut config = (**config).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
        .accept(io)
        .await
        .map_err(|source| HttpError::Tls { peer, source })?;
    Ok(Box::new(tls))
}

/// A stream whose first byte was read ahead (for TLS detection) and is returned first.
struct Prefixed<T> {
    io: T,
    first: Option<u8>,
}

impl<T: AsyncRead + Unpin> Prefixed<T> {
    fn new(io: T) -> Self {
        Prefixed { io, first: None }
    }

    async fn first_byte(&mut self) -> std::io::Result<Option<u8>> {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let n = self.io.read(&mut byte).await?;
        self.first = (n == 1).then_some(byte[0]);
        Ok(self.first)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(b) = self.first.take() {
            buf.put_slice(&[b]);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
