//! The client side: [`HttpConnection`] (dial, handshake, lifecycle) and [`ClientStream`]
//! (one request and its response).

use super::body::{body_read_methods, body_write_methods, HasBody, OutBody, Outgoing};
use super::{header_map, tls_info, within, BodyReader, HttpError, HttpVersion, ResponseHead};
use super::{Role, TlsInfo};
use crate::transport::{
    client_config, dial, DialOptions, FloorError, StreamEndpoint, TlsClientOptions,
};
use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

/// How many request heads may wait to go out on one HTTP/1.1 connection (which sends one
/// request at a time): 256; `write_headers` waits beyond that.
const H1_QUEUE: usize = 256;

/// How a client connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Force HTTP/2 (prior knowledge on `http://`; ALPN `h2` only on `https://`). Default:
    /// HTTP/1.1 on `http://`, ALPN-negotiated (`h2`, then `http/1.1`) on `https://`.
    pub http2: bool,
    /// TLS trust for `https://` (its `server_name`, when set, is checked and sent as SNI
    /// instead of the URL's host).
    pub tls: TlsClientOptions,
}

type ResponseFuture = BoxFuture<'static, Result<Response<Incoming>, HttpError>>;
type Queued = (Request<OutBody>, oneshot::Sender<ResponseFuture>);

enum Sender {
    /// HTTP/1.1: requests go through one queue, so they leave in the order their heads were
    /// written (a task per request would race for the connection).
    H1(H1Sender),
    /// HTTP/2: any number of requests at once; h2 itself waits for a free stream slot.
    H2(hyper::client::conn::http2::SendRequest<OutBody>),
}

/// The HTTP/1.1 sending side: a request goes straight to hyper when nothing is queued and the
/// connection is ready at once (no task hop), otherwise through the queue, whose dispatcher
/// keeps the order.
#[derive(Clone)]
struct H1Sender {
    queue: mpsc::Sender<Queued>,
    hyper: Arc<Mutex<hyper::client::conn::http1::SendRequest<OutBody>>>,
    /// Requests in the queue or being dispatched; the direct path is taken only at 0.
    queued: Arc<AtomicUsize>,
}

impl H1Sender {
    async fn send(&self, request: Request<OutBody>) -> Result<Pending, HttpError> {
        if self.queued.load(Ordering::SeqCst) == 0 {
            let mut hyper = lock(&self.hyper);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if self.queued.load(Ordering::SeqCst) == 0
                && matches!(hyper.poll_ready(&mut cx), std::task::Poll::Ready(Ok(())))
            {
                let fut = hyper.send_request(request);
                return Ok(Pending::Sent(Box::pin(async move {
                    fut.await.map_err(HttpError::Connection)
                })));
            }
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        if self.queue.send((request, tx)).await.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(HttpError::Closed("connection closed"));
        }
        Ok(Pending::Queued(rx))
    }
}

/// A handler called when a connection becomes idle.
pub type IdleHandler = Arc<dyn Fn() + Send + Sync>;

pub(super) struct ClientShared {
    /// `None` after `shutdown` gave it up.
    sender: Mutex<Option<Sender>>,
    /// `host[:port]` for the Host header and HTTP/2's :authority.
    authority: String,
    version: HttpVersion,
    local: Option<String>,
    peer: Option<String>,
    tls: Option<TlsInfo>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Ends the byte stream, wherever hyper polls it.
    switch: Arc<KillSwitch>,
    active: AtomicUsize,
    idle_tx: watch::Sender<u64>,
    on_idle: Mutex<Option<IdleHandler>>,
}

/// A client HTTP connection. Cloning gives another handle on the same connection.
#[derive(Clone)]
pub struct HttpConnection {
    pub(super) shared: Arc<ClientShared>,
}

impl std::fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnection")
            .field("version", &self.shared.version)
            .field("peer", &self.shared.peer)
            .finish()
    }
}

pub(super) fn authority_of(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("localhost");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

pub(super) fn parse_url(url: &str) -> Result<url::Url, HttpError> {
    url::Url::parse(url).map_err(|source| HttpError::InvalidUrl {
        url: url.to_owned(),
        source,
    })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A switch that ends a connection's byte stream from outside. hyper runs an HTTP/2 client
/// connection in a task of its own that lives as long as any stream does, so aborting our
/// task cannot close it; a killed stream fails every read and write, which ends it.
#[derive(Default)]
struct KillSwitch {
    killed: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn check(&self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        Ok(())
    }
}

/// A byte stream that [`KillSwitch::kill`] ends.
struct Killable<T> {
    io: T,
    switch: Arc<KillSwitch>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Killable<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.switch.check(cx)?;
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Killable<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.switch.check(cx)?;
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.switch.check(cx)?;
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.switch.check(cx)?;
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HttpConnection {
    /// Connects to `url` (`http://host[:port]` or `https://…`): DNS, TCP, TLS with ALPN, and
    /// for HTTP/2 the settings exchange, all within `timeout`.
    pub async fn connect(
        url: &str,
        options: ConnectOptions,
        timeout: Option<Duration>,
    ) -> Result<HttpConnection, HttpError> {
        within(timeout, Self::connect_inner(url, options, timeout)).await
    }

    async fn connect_inner(
        url: &str,
        options: ConnectOptions,
        timeout: Option<Duration>,
    ) -> Result<HttpConnection, HttpError> {
        let parsed = parse_url(url)?;
        let unusable = |reason| HttpError::UnusableUrl {
            url: url.to_owned(),
            reason,
        };
        let secure = match parsed.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(unusable("the scheme is neither http nor https")),
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| unusable("no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = parsed.port_or_known_default().unwrap_or(80);
        // The floor dials (its connect deadline: `timeout`, else its default); TLS stays here
        // for now, because `TlsInfo` needs rustls's state, which `ByteStream` does not expose.
        let mut dial_options = DialOptions::builder();
        if let Some(after) = timeout {
            dial_options = dial_options.connect_timeout(after);
        }
        let stream = dial(
            &StreamEndpoint::tcp(host.clone(), port),
            &dial_options.build(),
        )
        .await
        .map_err(HttpError::from_floor)?;
        let local = stream.peer().local_addr.clone();
        let peer = stream.peer().remote_addr.clone();
        if !secure {
            let authority = authority_of(&parsed);
            return Self::handshake(stream, options.http2, authority, local, peer, None).await;
        }
        let mut config = (*client_config(&options.tls)
            .map_err(|e| HttpError::Floor(FloorError::TlsConfig(Box::new(e))))?)
        .clone();
        config.alpn_protocols = if options.http2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let checked = options.tls.server_name.clone().unwrap_or(host.clone());
        let tls_err = |source| HttpError::Tls {
            peer: checked.clone(),
            source,
        };
        let name = rustls_pki_types::ServerName::try_from(checked.clone())
            .map_err(|e| tls_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(tls_err)?;
        let info = tls_info(tls.get_ref().1);
        let h2 = info.alpn.as_deref() == Some("h2");
        Self::handshake(tls, h2, authority_of(&parsed), local, peer, Some(info)).await
    }

    /// Connects over the Unix socket at `path` (HTTP/1.1, or HTTP/2 by prior knowledge).
    pub async fn connect_unix(
        path: impl AsRef<std::path::Path>,
        http2: bool,
    ) -> Result<HttpConnection, HttpError> {
        let path = path.as_ref();
        let stream = dial(
            &StreamEndpoint::Unix(path.to_owned()),
            &DialOptions::default(),
        )
        .await
        .map_err(HttpError::from_floor)?;
        let name = path.display().to_string();
        Self::handshake(stream, http2, "localhost".into(), None, Some(name), None).await
    }

    /// A client connection over any byte stream (in-memory duplex, Unix socket, …).
    pub async fn over(
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        http2: bool,
    ) -> Result<HttpConnection, HttpError> {
        Self::handshake(io, http2, "localhost".into(), None, None, None).await
    }

    async fn handshake(
        io: impl Io,
        http2: bool,
        authority: String,
        local: Option<String>,
        peer: Option<String>,
        tls: Option<TlsInfo>,
    ) -> Result<HttpConnection, HttpError> {
        let switch = Arc::new(KillSwitch::default());
        let io = hyper_util::rt::TokioIo::new(Killable {
            io,
            switch: switch.clone(),
        });
        let (sender, task, version) = if http2 {
            // Until the server's SETTINGS arrive, open one stream at a time: a server with a
            // lower MAX_CONCURRENT_STREAMS than h2's default would refuse the excess.
            let (sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .initial_max_send_streams(1)
                    .handshake(io)
                    .await
                    .map_err(HttpError::Connection)?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Sender::H2(sender), task, HttpVersion::Http2)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(HttpError::Connection)?;
            let (queue, rx) = mpsc::channel(H1_QUEUE);
            let h1 = H1Sender {
                queue,
                hyper: Arc::new(Mutex::new(sender)),
                queued: Arc::new(AtomicUsize::new(0)),
            };
            let dispatcher = dispatch_h1(h1.hyper.clone(), h1.queued.clone(), rx);
            let task = tokio::spawn(async move {
                // The connection and its queue in one task: dropping the queue's last sender
                // (shutdown) ends the dispatcher, which drops hyper's sender, which lets the
                // connection close after its last exchange.
                let conn = async move {
                    let _ = conn.await;
                };
                tokio::join!(conn, dispatcher);
            });
            (Sender::H1(h1), task, HttpVersion::Http11)
        };
        Ok(HttpConnection {
            shared: Arc::new(ClientShared {
                sender: Mutex::new(Some(sender)),
                authority,
                version,
                local,
                peer,
                tls,
                task: Mutex::new(Some(task)),
                switch,
                active: AtomicUsize::new(0),
                idle_tx: watch::channel(0).0,
                on_idle: Mutex::new(None),
            }),
        })
    }

    /// Always [`Role::Client`].
    pub fn role(&self) -> Role {
        Role::Client
    }

    /// The negotiated version.
    pub fn version(&self) -> HttpVersion {
        self.shared.version
    }

    /// What TLS negotiated; `None` on a plain connection.
    #[doc(alias = "checktls")]
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.shared.tls.clone()
    }

    /// Our address.
    #[doc(alias = "localname")]
    pub fn local_addr(&self) -> Option<String> {
        self.shared.local.clone()
    }

    /// The peer's address.
    #[doc(alias = "peername")]
    pub fn peer_addr(&self) -> Option<String> {
        self.shared.peer.clone()
    }

    /// A new stream (one request/response exchange).
    pub fn new_stream(&self) -> Result<ClientStream, HttpError> {
        if self.is_closed() {
            return Err(HttpError::Closed("connection closed"));
        }
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        Ok(ClientStream {
            conn: self.clone(),
            body: Outgoing::default(),
            response: None,
            head: None,
            incoming: BodyReader::new(None),
            done: false,
        })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.task)
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Waits until the connection can take another request (on HTTP/1.1: the request queue
    /// has room; on HTTP/2: the connection is up).
    pub async fn flush(&self, timeout: Option<Duration>) -> Result<(), HttpError> {
        let sender = match lock(&self.shared.sender).as_ref() {
            Some(Sender::H1(q)) => Ok(Sender::H1(q.clone())),
            Some(Sender::H2(s)) => Ok(Sender::H2(s.clone())),
            None => Err(HttpError::Closed("connection shut down")),
        }?;
        within(timeout, async {
            match sender {
                Sender::H1(q) => q
                    .queue
                    .reserve()
                    .await
                    .map(drop)
                    .map_err(|_| HttpError::Closed("connection closed")),
                Sender::H2(mut s) => s.ready().await.map_err(HttpError::Connection),
            }
        })
        .await
    }

    /// Sets the handler called whenever the connection becomes idle (no open streams);
    /// returns the previous one.
    pub fn on_idle(&self, handler: impl Fn() + Send + Sync + 'static) -> Option<IdleHandler> {
        lock(&self.shared.on_idle).replace(Arc::new(handler))
    }

    /// Waits until the connection is idle (no open streams).
    pub async fn idle(&self) {
        let mut rx = self.shared.idle_tx.subscribe();
        while self.shared.active.load(Ordering::SeqCst) > 0 {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn stream_done(&self) {
        if self.shared.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.idle_tx.send_modify(|n| *n += 1);
            let handler = lock(&self.shared.on_idle).clone();
            if let Some(h) = handler {
                h();
            }
        }
    }

    /// Ends the connection now (lua-http's `close`); open streams fail.
    pub fn close(&self) {
        self.shared.switch.kill();
        lock(&self.shared.sender).take();
        if let Some(t) = lock(&self.shared.task).take() {
            t.abort();
        }
    }

    /// Orderly shutdown: waits for open streams to finish, then lets hyper end the connection
    /// (on HTTP/2 a GOAWAY, on HTTP/1.1 the connection closes after the last exchange), and
    /// waits for that (at most 5 s, then it is closed). Also "GOAWAY on demand".
    #[doc(alias = "goaway")]
    pub async fn shutdown(&self) {
        self.idle().await;
        lock(&self.shared.sender).take();
        let task = lock(&self.shared.task).take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
                self.shared.switch.kill();
            }
        }
    }
}

/// Sends queued HTTP/1.1 requests one by one, in queue order.
async fn dispatch_h1(
    sender: Arc<Mutex<hyper::client::conn::http1::SendRequest<OutBody>>>,
    queued: Arc<AtomicUsize>,
    mut queue: mpsc::Receiver<Queued>,
) {
    while let Some((request, reply)) = queue.recv().await {
        // Ready once the previous exchange is done (HTTP/1.1 sends one request at a time).
        let ready = std::future::poll_fn(|cx| lock(&sender).poll_ready(cx)).await;
        let response: ResponseFuture = match ready {
            Ok(()) => {
                let fut = lock(&sender).send_request(request);
                queued.fetch_sub(1, Ordering::SeqCst);
                Box::pin(async move { fut.await.map_err(HttpError::Connection) })
            }
            Err(e) => {
                queued.fetch_sub(1, Ordering::SeqCst);
                let _ = reply.send(Box::pin(async move { Err(HttpError::Connection(e)) }));
                // The connection is gone: the rest of the queue fails with it.
                queue.close();
                continue;
            }
        };
        let _ = reply.send(response);
    }
}

/// Where a client stream's response is.
enum Pending {
    /// HTTP/1.1: the queue hands over the response future once the request went out.
    Queued(oneshot::Receiver<ResponseFuture>),
    /// The response future.
    Sent(ResponseFuture),
    /// The response arrived (then `head` is set) or failed.
    Failed,
}

/// One request/response exchange on a client connection.
pub struct ClientStream {
    conn: HttpConnection,
    body: Outgoing,
    response: Option<Pending>,
    head: Option<ResponseHead>,
    incoming: BodyReader,
    done: bool,
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("head", &self.head)
            .finish()
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        self.finish();
    }
}

impl HasBody for ClientStream {
    async fn body_ready(&mut self) -> Result<&mut BodyReader, HttpError> {
        self.response_head().await?;
        Ok(&mut self.incoming)
    }

    fn body_reader(&self) -> &BodyReader {
        &self.incoming
    }

    fn body_ended(&mut self) {
        self.finish();
    }
}

impl ClientStream {
    /// The stream's connection.
    pub fn connection(&self) -> &HttpConnection {
        &self.conn
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<String> {
        self.conn.peer_addr()
    }

    /// Sends the request head; with `end_stream` there is no body. On HTTP/1.1 requests
    /// leave in the order their heads were written.
    pub async fn write_headers(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        end_stream: bool,
    ) -> Result<(), HttpError> {
        if self.response.is_some() {
            return Err(HttpError::State("headers already written"));
        }
        let shared = &self.conn.shared;
        let mut builder = Request::builder().method(method);
        if shared.version == HttpVersion::Http2 {
            // HTTP/2 requests carry :scheme and :authority, so the URI must be absolute.
            let scheme = if shared.tls.is_some() {
                "https"
            } else {
                "http"
            };
            builder = builder
                .version(hyper::Version::HTTP_2)
                .uri(format!("{scheme}://{}{path}", shared.authority));
        } else {
            builder = builder.uri(path);
        }
        let (body, out) = if end_stream {
            (Outgoing::default(), OutBody::empty())
        } else {
            OutBody::channel()
        };
        let mut request = builder.body(out).map_err(|source| HttpError::Invalid {
            what: "request".into(),
            source,
        })?;
        request.headers_mut().extend(header_map(headers)?);
        if shared.version == HttpVersion::Http11 && !request.headers().contains_key("host") {
            let host =
                shared
                    .authority
                    .parse()
                    .map_err(|e: http::header::InvalidHeaderValue| HttpError::Invalid {
                        what: "host".into(),
                        source: e.into(),
                    })?;
            request.headers_mut().insert("host", host);
        }
        let sender = match lock(&shared.sender).as_ref() {
            Some(Sender::H1(q)) => Sender::H1(q.clone()),
            Some(Sender::H2(s)) => Sender::H2(s.clone()),
            None => return Err(HttpError::Closed("connection shut down")),
        };
        let pending = match sender {
            Sender::H1(h1) => h1.send(request).await?,
            Sender::H2(mut s) => {
                s.ready().await.map_err(HttpError::Connection)?;
                let fut = s.send_request(request);
                Pending::Sent(Box::pin(
                    async move { fut.await.map_err(HttpError::Connection) },
                ))
            }
        };
        self.body = body;
        self.response = Some(pending);
        Ok(())
    }

    body_write_methods!();

    /// The response head (waits for it).
    pub async fn get_headers(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<ResponseHead, HttpError> {
        within(timeout, async { self.response_head().await.cloned() }).await
    }

    /// The response head; cancel-safe (a timeout around it keeps the pending response).
    async fn response_head(&mut self) -> Result<&ResponseHead, HttpError> {
        if self.head.is_none() {
            let pending = self
                .response
                .as_mut()
                .ok_or(HttpError::State("no request sent"))?;
            if let Pending::Queued(rx) = pending {
                match rx.await {
                    Ok(fut) => *pending = Pending::Sent(fut),
                    Err(_) => {
                        *pending = Pending::Failed;
                        return Err(HttpError::Closed("connection closed"));
                    }
                }
            }
            let Pending::Sent(fut) = pending else {
                return Err(HttpError::Closed("the response failed earlier"));
            };
            let response = fut.await;
            // A finished future must not be polled again.
            *pending = Pending::Failed;
            let (parts, body) = response?.into_parts();
            self.incoming = BodyReader::new(Some(body));
            self.head = Some(ResponseHead {
                status: parts.status.as_u16(),
                headers: parts.headers,
                version: HttpVersion::of(parts.version),
            });
        }
        self.head.as_ref().ok_or(HttpError::State("no response"))
    }

    body_read_methods!();

    /// Ends our side (an open request body ends without trailers).
    pub fn shutdown(&mut self) {
        self.body = Outgoing::default();
        self.finish();
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.stream_done();
        }
    }
}
