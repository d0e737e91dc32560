//! HTTP/1.1 and HTTP/2 connections and streams in lua-http's model, on hyper.
//!
//! A connection ([`HttpConnection`] on the client, the per-connection side of [`HttpServer`])
//! carries streams: one request and its response. A client opens a [`ClientStream`] with
//! [`HttpConnection::new_stream`], writes headers and body chunks, then reads the response
//! headers, chunks and trailers; a server gets a [`ServerStream`] per request and writes the
//! response the same way. Every read takes an optional timeout; a timeout fails only that call
//! and loses no data. HTTP/1.1 keeps requests in order on a connection (one at a time); HTTP/2
//! multiplexes them, with `MAX_CONCURRENT_STREAMS` enforced in both directions.
//!
//! ```
//! use tether::http::{HttpConnection, HttpServer, ServerOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tether::http::HttpError> {
//! let server = HttpServer::new(ServerOptions::new(|mut stream| async move {
//!     let body = stream.get_body_as_string(None).await?;
//!     stream.write_headers(200, &[("content-type", "text/plain")], false).await?;
//!     stream.write_chunk(format!("you said: {body}").into(), true).await
//! }));
//! let addr = server.listen("127.0.0.1:0").await?;
//!
//! let conn = HttpConnection::connect(&format!("http://{addr}"), Default::default(), None).await?;
//! let mut stream = conn.new_stream()?;
//! stream.write_headers("POST", "/", &[], false).await?;
//! stream.write_chunk("hi".into(), true).await?;
//! assert_eq!(stream.get_headers(None).await?.status, 200);
//! assert_eq!(stream.get_body_as_string(None).await?, "you said: hi");
//! conn.close();
//! server.shutdown().await;
//! # Ok(()) }
//! ```

use crate::transport::{client_config, TlsClientOptions};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// What can go wrong with HTTP connections and streams.
#[derive(Debug, Clone, Error)]
pub enum HttpError {
    /// The URL or header is not valid.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A call did not finish in time (the stream and connection stay usable).
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting (DNS, TCP, TLS, HTTP/2 settings) failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection or stream is closed, or the peer reset it.
    #[error("closed: {0}")]
    Closed(String),
    /// A protocol error reported by hyper.
    #[error("http: {0}")]
    Protocol(String),
    /// The stream was used out of order (e.g. a body before headers).
    #[error("stream state: {0}")]
    State(&'static str),
}

impl From<hyper::Error> for HttpError {
    fn from(e: hyper::Error) -> Self {
        if e.is_closed() || e.is_canceled() || e.is_incomplete_message() {
            HttpError::Closed(e.to_string())
        } else {
            HttpError::Protocol(e.to_string())
        }
    }
}

/// Which end a connection is: the client sends requests, the server answers them.
pub use tether_wire::Role;

/// HTTP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2.
    Http2,
}

impl HttpVersion {
    fn of(v: hyper::Version) -> HttpVersion {
        match v {
            hyper::Version::HTTP_10 | hyper::Version::HTTP_09 => HttpVersion::Http10,
            hyper::Version::HTTP_2 => HttpVersion::Http2,
            _ => HttpVersion::Http11,
        }
    }

    /// `1.0`, `1.1` or `2`, as lua-http's `connection.version`.
    pub fn as_number(self) -> f32 {
        match self {
            HttpVersion::Http10 => 1.0,
            HttpVersion::Http11 => 1.1,
            HttpVersion::Http2 => 2.0,
        }
    }
}

/// What the TLS layer negotiated (lua-http's `checktls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The ALPN protocol (`h2`, `http/1.1`), if any.
    pub alpn: Option<String>,
    /// The TLS version.
    pub protocol: Option<String>,
    /// The cipher suite.
    pub cipher: Option<String>,
}

fn tls_info(conn: &rustls::CommonState) -> TlsInfo {
    TlsInfo {
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        protocol: conn.protocol_version().map(|v| format!("{v:?}")),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite())),
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;
type FrameSender = mpsc::Sender<Frame<Bytes>>;

/// A body fed through a bounded channel: chunks, then optional trailers.
fn channel_body(capacity: usize) -> (FrameSender, Body) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(capacity);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

fn empty_body() -> Body {
    http_body_util::Empty::new().boxed_unsync()
}

fn header_map(headers: &[(&str, &str)]) -> Result<HeaderMap, HttpError> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| HttpError::Invalid(format!("header {k}: {e}")))?;
        let value = hyper::header::HeaderValue::from_str(v)
            .map_err(|e| HttpError::Invalid(format!("header {k}: {e}")))?;
        map.append(name, value);
    }
    Ok(map)
}

async fn within<T>(
    timeout: Option<Duration>,
    f: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    match timeout {
        Some(after) => tokio::time::timeout(after, f)
            .await
            .unwrap_or(Err(HttpError::Timeout(after))),
        None => f.await,
    }
}

/// The received half of a stream: headers, then body chunks, then trailers.
struct Incoming2 {
    body: Option<Incoming>,
    /// A frame read but not yet handed out (kept when a read times out).
    trailers: Option<HeaderMap>,
}

impl Incoming2 {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            // `frame()` is cancel-safe: a timeout around it loses nothing.
            match body.frame().await {
                None => {
                    self.body = None;
                    return Ok(None);
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => return Ok(Some(data)),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    async fn all(&mut self) -> Result<Bytes, HttpError> {
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = self.next_chunk().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }
}

/// The read side both kinds of stream share: the next body chunk within a timeout.
trait ReadChunks {
    fn chunk_within(
        &mut self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Bytes>, HttpError>> + Send + '_;
}

/// A stream's (remaining) body as a `futures::Stream` of chunks.
fn chunk_stream<R: ReadChunks + Send>(
    reader: &mut R,
    timeout: Option<Duration>,
) -> impl futures::Stream<Item = Result<Bytes, HttpError>> + '_ {
    futures::stream::unfold(Some(reader), move |reader| async move {
        let reader = reader?;
        match reader.chunk_within(timeout).await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
}

fn utf8(bytes: Bytes) -> Result<String, HttpError> {
    String::from_utf8(bytes.to_vec()).map_err(|e| HttpError::Invalid(e.to_string()))
}

/// The write side both kinds of stream share: an open body, or none.
#[derive(Default)]
struct Outgoing(Option<FrameSender>);

impl Outgoing {
    async fn chunk(&mut self, chunk: Bytes, end_stream: bool) -> Result<(), HttpError> {
        let tx = self.0.as_ref().ok_or(HttpError::State("no open body"))?;
        if !chunk.is_empty() {
            tx.send(Frame::data(chunk))
                .await
                .map_err(|_| HttpError::Closed("the body's reader went away".into()))?;
        }
        if end_stream {
            self.0 = None;
        }
        Ok(())
    }

    async fn trailers(&mut self, trailers: &[(&str, &str)]) -> Result<(), HttpError> {
        let tx = self.0.take().ok_or(HttpError::State("no open body"))?;
        tx.send(Frame::trailers(header_map(trailers)?))
            .await
            .map_err(|_| HttpError::Closed("the body's reader went away".into()))
    }
}

/// The head of a response, as a client reads it.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Version.
    pub version: HttpVersion,
}

/// The head of a request, as a server reads it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Method.
    pub method: String,
    /// Path and query (or the full URI for proxies).
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Version.
    pub version: HttpVersion,
}

// ---------------------------------------------------------------------------------------------
// Client

/// How a client connects.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Force HTTP/2 (prior knowledge on `http://`; ALPN `h2` only on `https://`). Default:
    /// HTTP/1.1 on `http://`, ALPN-negotiated (`h2`, then `http/1.1`) on `https://`.
    pub http2: bool,
    /// TLS trust for `https://`.
    pub tls: TlsClientOptions,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

type IdleHandler = Arc<dyn Fn() + Send + Sync>;

struct ClientShared {
    /// `None` after `shutdown` gave it up.
    sender: tokio::sync::Mutex<Option<Sender>>,
    /// `host[:port]` for the Host header and HTTP/2's :authority.
    authority: String,
    version: HttpVersion,
    local: Option<String>,
    peer: Option<String>,
    tls: Option<TlsInfo>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    active: AtomicUsize,
    idle_tx: watch::Sender<u64>,
    on_idle: Mutex<Option<IdleHandler>>,
}

/// A client HTTP connection. Cloning gives another handle on the same connection.
#[derive(Clone)]
pub struct HttpConnection {
    shared: Arc<ClientShared>,
}

impl std::fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnection")
            .field("version", &self.shared.version)
            .field("peer", &self.shared.peer)
            .finish()
    }
}

fn authority_of(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("localhost");
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

impl HttpConnection {
    /// Connects to `url` (`http://host[:port]` or `https://…`): DNS, TCP, TLS with ALPN, and
    /// for HTTP/2 the settings exchange, all within `timeout`.
    pub async fn connect(
        url: &str,
        options: ConnectOptions,
        timeout: Option<Duration>,
    ) -> Result<HttpConnection, HttpError> {
        within(timeout, Self::connect_inner(url, options)).await
    }

    async fn connect_inner(
        url: &str,
        options: ConnectOptions,
    ) -> Result<HttpConnection, HttpError> {
        let parsed = url::Url::parse(url).map_err(|e| HttpError::Invalid(format!("{url}: {e}")))?;
        let secure = match parsed.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(HttpError::Invalid(format!("scheme {other}"))),
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| HttpError::Invalid(format!("{url}: no host")))?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = parsed.port_or_known_default().unwrap_or(80);
        let err = |e: &dyn std::fmt::Display| HttpError::Connect(format!("{url}: {e}"));
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| err(&e))?;
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok().map(|a| a.to_string());
        let peer = tcp.peer_addr().ok().map(|a| a.to_string());
        if !secure {
            let authority = authority_of(&parsed);
            return Self::handshake(tcp, options.http2, authority, local, peer, None).await;
        }
        let mut config = (*client_config(&options.tls).map_err(|e| err(&e))?).clone();
        config.alpn_protocols = if options.http2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| err(&e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| err(&e))?;
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
        let io = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| HttpError::Connect(format!("{}: {e}", path.display())))?;
        let name = path.display().to_string();
        Self::handshake(io, http2, "localhost".into(), None, Some(name), None).await
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
        let io = hyper_util::rt::TokioIo::new(io);
        let (sender, task, version) = if http2 {
            // Until the server's SETTINGS arrive, open one stream at a time: a server with a
            // lower MAX_CONCURRENT_STREAMS than h2's default would refuse the excess.
            let (sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_max_send_streams(1)
                    .handshake(io)
                    .await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Sender::H2(sender), task, HttpVersion::Http2)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            (Sender::H1(sender), task, HttpVersion::Http11)
        };
        Ok(HttpConnection {
            shared: Arc::new(ClientShared {
                sender: tokio::sync::Mutex::new(Some(sender)),
                authority,
                version,
                local,
                peer,
                tls,
                task: Mutex::new(Some(task)),
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
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.shared.tls.clone()
    }

    /// Our address.
    pub fn local_addr(&self) -> Option<String> {
        self.shared.local.clone()
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<String> {
        self.shared.peer.clone()
    }

    /// A new stream (one request/response exchange).
    pub fn new_stream(&self) -> Result<ClientStream, HttpError> {
        if self.is_closed() {
            return Err(HttpError::Closed("connection closed".into()));
        }
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        Ok(ClientStream {
            conn: self.clone(),
            body: Outgoing(None),
            response: None,
            head: None,
            incoming: Incoming2 {
                body: None,
                trailers: None,
            },
            done: false,
        })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Waits until written data has gone to the peer (hyper writes eagerly; this waits for
    /// the connection to be ready for another request).
    pub async fn flush(&self, timeout: Option<Duration>) -> Result<(), HttpError> {
        within(timeout, async {
            let mut sender = self.shared.sender.lock().await;
            match sender.as_mut() {
                Some(Sender::H1(s)) => s.ready().await.map_err(HttpError::from),
                Some(Sender::H2(s)) => s.ready().await.map_err(HttpError::from),
                None => Err(HttpError::Closed("connection shut down".into())),
            }
        })
        .await
    }

    /// Sets the handler called whenever the connection becomes idle (no open streams);
    /// returns the previous one.
    pub fn on_idle(&self, handler: impl Fn() + Send + Sync + 'static) -> Option<IdleHandler> {
        self.shared
            .on_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Arc::new(handler))
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
            let handler = self
                .shared
                .on_idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(h) = handler {
                h();
            }
        }
    }

    /// Ends the connection now (lua-http's `close`); open streams fail.
    pub fn close(&self) {
        if let Some(t) = self
            .shared
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.abort();
        }
    }

    /// Orderly shutdown: waits for open streams to finish, then lets hyper end the connection
    /// (on HTTP/2 a GOAWAY, on HTTP/1.1 the connection closes after the last exchange), and
    /// waits for that (at most 5 s, then it is closed).
    pub async fn shutdown(&self) {
        self.idle().await;
        self.shared.sender.lock().await.take();
        let task = self
            .shared
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// One request/response exchange on a client connection.
pub struct ClientStream {
    conn: HttpConnection,
    body: Outgoing,
    response: Option<oneshot::Receiver<Result<Response<Incoming>, HttpError>>>,
    head: Option<ResponseHead>,
    incoming: Incoming2,
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
        if !self.done {
            self.done = true;
            self.conn.stream_done();
        }
    }
}

impl ReadChunks for ClientStream {
    fn chunk_within(
        &mut self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Bytes>, HttpError>> + Send + '_ {
        self.get_next_chunk(timeout)
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

    /// Sends the request head; with `end_stream` there is no body.
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
        let authority = self.conn.shared.authority.clone();
        let mut builder = Request::builder().method(method);
        if self.conn.shared.version == HttpVersion::Http2 {
            // HTTP/2 requests carry :scheme and :authority, so the URI must be absolute.
            let scheme = if self.conn.shared.tls.is_some() {
                "https"
            } else {
                "http"
            };
            builder = builder
                .version(hyper::Version::HTTP_2)
                .uri(format!("{scheme}://{authority}{path}"));
        } else {
            builder = builder.uri(path);
        }
        let mut request = if end_stream {
            builder.body(empty_body())
        } else {
            let (tx, body) = channel_body(16);
            self.body = Outgoing(Some(tx));
            builder.body(body)
        }
        .map_err(|e| HttpError::Invalid(e.to_string()))?;
        request.headers_mut().extend(header_map(headers)?);
        if self.conn.shared.version == HttpVersion::Http11
            && !request.headers().contains_key("host")
        {
            request.headers_mut().insert(
                "host",
                authority
                    .parse()
                    .map_err(|_| HttpError::Invalid("host".into()))?,
            );
        }
        let (tx, rx) = oneshot::channel();
        self.response = Some(rx);
        let shared = self.conn.shared.clone();
        // The request goes out from its own task, so the body can be written meanwhile; on
        // HTTP/1.1 the sender lock keeps requests in order, one at a time.
        tokio::spawn(async move {
            let result = async {
                let mut sender = shared.sender.lock().await;
                match sender.as_mut() {
                    Some(Sender::H1(s)) => {
                        s.ready().await?;
                        let fut = s.send_request(request);
                        drop(sender);
                        Ok(fut.await?)
                    }
                    Some(Sender::H2(s)) => {
                        s.ready().await?;
                        let fut = s.send_request(request);
                        drop(sender);
                        Ok(fut.await?)
                    }
                    None => Err(HttpError::Closed("connection shut down".into())),
                }
            }
            .await;
            let _ = tx.send(result);
        });
        Ok(())
    }

    /// Sends a body chunk; with `end_stream` the body ends.
    pub async fn write_chunk(&mut self, chunk: Bytes, end_stream: bool) -> Result<(), HttpError> {
        self.body.chunk(chunk, end_stream).await
    }

    /// Sends the body from a reader, then ends it.
    pub async fn write_body_from_reader(
        &mut self,
        mut reader: impl AsyncRead + Unpin,
    ) -> Result<(), HttpError> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|e| HttpError::Invalid(e.to_string()))?;
            if n == 0 {
                return self.write_chunk(Bytes::new(), true).await;
            }
            self.write_chunk(Bytes::copy_from_slice(&buf[..n]), false)
                .await?;
        }
    }

    /// Sends trailers and ends the body.
    pub async fn write_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<(), HttpError> {
        self.body.trailers(trailers).await
    }

    /// The response head (waits for it).
    pub async fn get_headers(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<ResponseHead, HttpError> {
        if let Some(head) = &self.head {
            return Ok(head.clone());
        }
        let rx = self
            .response
            .as_mut()
            .ok_or(HttpError::State("no request sent"))?;
        // A timeout leaves the receiver in place, so a later call still gets the response.
        let response = within(timeout, async {
            rx.await
                .unwrap_or_else(|_| Err(HttpError::Closed("connection closed".into())))
        })
        .await?;
        let (parts, body) = response.into_parts();
        let head = ResponseHead {
            status: parts.status.as_u16(),
            headers: parts.headers,
            version: HttpVersion::of(parts.version),
        };
        self.incoming.body = Some(body);
        self.head = Some(head.clone());
        Ok(head)
    }

    /// The next body chunk; `None` at the end.
    pub async fn get_next_chunk(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<Bytes>, HttpError> {
        self.get_headers(timeout).await?;
        let r = within(timeout, self.incoming.next_chunk()).await;
        if matches!(r, Ok(None)) {
            self.finish();
        }
        r
    }

    /// The whole (rest of the) body.
    pub async fn get_body_as_bytes(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Bytes, HttpError> {
        self.get_headers(timeout).await?;
        let r = within(timeout, self.incoming.all()).await;
        if r.is_ok() {
            self.finish();
        }
        r
    }

    /// The whole body as UTF-8 text.
    pub async fn get_body_as_string(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<String, HttpError> {
        utf8(self.get_body_as_bytes(timeout).await?)
    }

    /// The response trailers, once the body was read to its end.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.incoming.trailers.as_ref()
    }

    /// The (rest of the) response body as a stream of chunks, each read within `timeout`.
    pub fn body_chunks(
        &mut self,
        timeout: Option<Duration>,
    ) -> impl futures::Stream<Item = Result<Bytes, HttpError>> + '_ {
        chunk_stream(self, timeout)
    }

    /// Ends our side (an open request body ends without trailers).
    pub fn shutdown(&mut self) {
        self.body = Outgoing(None);
        self.finish();
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.stream_done();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

type StreamHandler =
    Arc<dyn Fn(ServerStream) -> BoxFuture<'static, Result<(), HttpError>> + Send + Sync>;
type ErrorHandler = Arc<dyn Fn(HttpError) + Send + Sync>;

/// Whether a server speaks TLS.
#[derive(Clone)]
pub enum TlsMode {
    /// Plain HTTP only (HTTP/1.1, or HTTP/2 with prior knowledge).
    Disabled,
    /// TLS required (ALPN `h2`, `http/1.1`).
    Required(Arc<rustls::ServerConfig>),
    /// TLS when the client starts with a TLS handshake, plain otherwise.
    Auto(Arc<rustls::ServerConfig>),
}

/// Server options.
#[derive(Clone)]
pub struct ServerOptions {
    on_stream: StreamHandler,
    on_error: Option<ErrorHandler>,
    /// TLS. Default disabled.
    pub tls: TlsMode,
    /// Most streams handled at once across the server, and HTTP/2's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` per connection. Default 100.
    pub max_concurrent: usize,
    /// Time a new connection gets for TLS and its first request head. Default 10 s.
    pub connection_setup_timeout: Duration,
    /// Time a client gets to finish sending a request head. Default 30 s.
    pub intra_stream_timeout: Duration,
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
            max_concurrent: 100,
            connection_setup_timeout: Duration::from_secs(10),
            intra_stream_timeout: Duration::from_secs(30),
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

/// One request on a server connection, and the response to write.
pub struct ServerStream {
    head: RequestHead,
    incoming: Incoming2,
    response: Option<oneshot::Sender<Response<Body>>>,
    body: Outgoing,
    peer: Option<String>,
}

impl std::fmt::Debug for ServerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream")
            .field("head", &self.head)
            .finish()
    }
}

impl ReadChunks for ServerStream {
    fn chunk_within(
        &mut self,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Option<Bytes>, HttpError>> + Send + '_ {
        self.get_next_chunk(timeout)
    }
}

impl ServerStream {
    /// The request head.
    pub fn get_headers(&self) -> &RequestHead {
        &self.head
    }

    /// The client's address.
    pub fn peer_addr(&self) -> Option<String> {
        self.peer.clone()
    }

    /// The next request body chunk; `None` at the end.
    pub async fn get_next_chunk(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<Bytes>, HttpError> {
        within(timeout, self.incoming.next_chunk()).await
    }

    /// The whole request body.
    pub async fn get_body_as_bytes(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Bytes, HttpError> {
        within(timeout, self.incoming.all()).await
    }

    /// The whole request body as UTF-8 text.
    pub async fn get_body_as_string(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<String, HttpError> {
        utf8(self.get_body_as_bytes(timeout).await?)
    }

    /// The request trailers, once the body was read to its end.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.incoming.trailers.as_ref()
    }

    /// The (rest of the) request body as a stream of chunks, each read within `timeout`.
    pub fn body_chunks(
        &mut self,
        timeout: Option<Duration>,
    ) -> impl futures::Stream<Item = Result<Bytes, HttpError>> + '_ {
        chunk_stream(self, timeout)
    }

    /// Sends the response head; with `end_stream` there is no body.
    pub async fn write_headers(
        &mut self,
        status: u16,
        headers: &[(&str, &str)],
        end_stream: bool,
    ) -> Result<(), HttpError> {
        let tx = self
            .response
            .take()
            .ok_or(HttpError::State("headers already written"))?;
        let body = if end_stream {
            empty_body()
        } else {
            let (ftx, body) = channel_body(16);
            self.body = Outgoing(Some(ftx));
            body
        };
        let mut response = Response::builder()
            .status(status)
            .body(body)
            .map_err(|e| HttpError::Invalid(e.to_string()))?;
        response.headers_mut().extend(header_map(headers)?);
        tx.send(response)
            .map_err(|_| HttpError::Closed("the client went away".into()))
    }

    /// Sends a body chunk; with `end_stream` the body ends.
    pub async fn write_chunk(&mut self, chunk: Bytes, end_stream: bool) -> Result<(), HttpError> {
        self.body.chunk(chunk, end_stream).await
    }

    /// Sends trailers and ends the body.
    pub async fn write_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<(), HttpError> {
        self.body.trailers(trailers).await
    }
}

/// An HTTP/1.1 and HTTP/2 server (the version is detected per connection).
#[derive(Clone)]
pub struct HttpServer {
    options: Arc<ServerOptions>,
    permits: Arc<Semaphore>,
    graceful: Arc<Mutex<Option<hyper_util::server::graceful::GracefulShutdown>>>,
    stop: watch::Sender<bool>,
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
    /// used).
    pub fn new(
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        mut options: ServerOptions,
    ) -> ServerConnection {
        let (tx, streams) = mpsc::channel(options.max_concurrent.max(1));
        options.on_stream = Arc::new(move |stream| {
            let tx = tx.clone();
            Box::pin(async move {
                tx.send(stream)
                    .await
                    .map_err(|_| HttpError::Closed("no one takes streams".into()))
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

impl HttpServer {
    /// A server with `options`.
    pub fn new(options: ServerOptions) -> HttpServer {
        let permits = Arc::new(Semaphore::new(options.max_concurrent.max(1)));
        HttpServer {
            options: Arc::new(options),
            permits,
            graceful: Arc::new(Mutex::new(Some(
                hyper_util::server::graceful::GracefulShutdown::new(),
            ))),
            stop: watch::channel(false).0,
        }
    }

    /// Listens on `addr` (`host:port`); returns the bound address.
    pub async fn listen(&self, addr: &str) -> Result<String, HttpError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| HttpError::Connect(format!("{addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| HttpError::Connect(e.to_string()))?
            .to_string();
        let server = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, peer)) = accepted else { continue };
                        let _ = tcp.set_nodelay(true);
                        let server = server.clone();
                        tokio::spawn(async move { server.serve_tcp(tcp, peer.to_string()).await });
                    }
                }
            }
        });
        Ok(local)
    }

    /// Listens on a Unix socket at `path` (replacing a stale socket file).
    pub async fn listen_unix(&self, path: impl AsRef<std::path::Path>) -> Result<(), HttpError> {
        let path = path.as_ref().to_owned();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| HttpError::Connect(format!("{}: {e}", path.display())))?;
        let server = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    accepted = listener.accept() => {
                        let Ok((io, _)) = accepted else { continue };
                        let server = server.clone();
                        let peer = Some(path.display().to_string());
                        tokio::spawn(async move { server.serve_io(io, peer).await });
                    }
                }
            }
        });
        Ok(())
    }

    fn error(&self, e: HttpError) {
        if let Some(f) = &self.options.on_error {
            f(e);
        }
    }

    async fn serve_tcp(&self, tcp: TcpStream, peer: String) {
        let setup = self.options.connection_setup_timeout;
        let tls = match &self.options.tls {
            TlsMode::Disabled => None,
            TlsMode::Required(c) => Some(c.clone()),
            TlsMode::Auto(c) => {
                let mut first = [0u8; 1];
                match tokio::time::timeout(setup, tcp.peek(&mut first)).await {
                    Ok(Ok(1)) if first[0] == 0x16 => Some(c.clone()),
                    Ok(Ok(_)) => None,
                    _ => return,
                }
            }
        };
        match tls {
            None => self.serve_io(tcp, Some(peer)).await,
            Some(config) => {
                let mut config = (*config).clone();
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                match tokio::time::timeout(setup, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => self.serve_io(tls, Some(peer)).await,
                    Ok(Err(e)) => self.error(HttpError::Connect(format!("TLS: {e}"))),
                    Err(_) => self.error(HttpError::Timeout(setup)),
                }
            }
        }
    }

    /// Serves one connection over any byte stream (in-memory duplex, Unix socket, …) until
    /// it ends.
    pub async fn serve_io(
        &self,
        io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        peer: Option<String>,
    ) {
        let server = self.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let server = server.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
        });
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.options.intra_stream_timeout)
            .max_buf_size(self.options.max_header_size.max(8192));
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(self.options.max_concurrent as u32)
            .max_header_list_size(self.options.max_header_size as u32);
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
        let watched = {
            let graceful = self.graceful.lock().unwrap_or_else(|e| e.into_inner());
            match graceful.as_ref() {
                Some(g) => g.watch(conn.into_owned()),
                None => return,
            }
        };
        if let Err(e) = watched.await {
            self.error(HttpError::Protocol(e.to_string()));
        }
    }

    async fn handle(&self, req: Request<Incoming>, peer: Option<String>) -> Response<Body> {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return Response::builder()
                .status(503)
                .body(empty_body())
                .unwrap_or_else(|_| Response::new(empty_body()));
        };
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
            incoming: Incoming2 {
                body: Some(body),
                trailers: None,
            },
            response: Some(tx),
            body: Outgoing(None),
            peer,
        };
        let handler = self.options.on_stream.clone();
        let server = self.clone();
        tokio::spawn(async move {
            if let Err(e) = handler(stream).await {
                server.error(e);
            }
        });
        // A handler that ends without writing headers answers 500.
        rx.await.unwrap_or_else(|_| {
            Response::builder()
                .status(500)
                .body(empty_body())
                .unwrap_or_else(|_| Response::new(empty_body()))
        })
    }

    /// Stops accepting, lets open connections finish their streams (GOAWAY on HTTP/2,
    /// `Connection: close` on HTTP/1.1), and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let graceful = self
            .graceful
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(g) = graceful {
            g.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A small client with a connection pool

/// A whole response, as [`HttpClient::request`] returns it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// The version the connection used.
    pub version: HttpVersion,
    /// The body.
    pub body: Bytes,
}

/// Requests with pooled connections: an HTTP/1.1 connection returns to the pool when its
/// exchange is done and is reused by the next request to the same origin; an HTTP/2
/// connection is shared by concurrent requests.
#[derive(Clone, Default)]
pub struct HttpClient {
    options: ConnectOptions,
    timeout: Option<Duration>,
    pool: Arc<Mutex<HashMap<String, Vec<HttpConnection>>>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("pooled", &self.pooled())
            .finish()
    }
}

impl HttpClient {
    /// A client connecting with `options`; `timeout` bounds connecting and each whole request.
    pub fn new(options: ConnectOptions, timeout: Option<Duration>) -> Self {
        HttpClient {
            options,
            timeout,
            pool: Arc::default(),
        }
    }

    /// How many idle or shared connections the pool holds.
    pub fn pooled(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|v| v.iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    fn checkout(&self, origin: &str) -> Option<HttpConnection> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.get_mut(origin)?;
        conns.retain(|c| !c.is_closed());
        if let Some(h2) = conns.iter().find(|c| c.version() == HttpVersion::Http2) {
            return Some(h2.clone());
        }
        conns.pop()
    }

    fn checkin(&self, origin: &str, conn: HttpConnection) {
        if conn.is_closed() {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let conns = pool.entry(origin.to_owned()).or_default();
        if !conns.iter().any(|c| Arc::ptr_eq(&c.shared, &conn.shared)) {
            conns.push(conn);
        }
    }

    /// Sends `method url` with `headers` and an optional body; returns the whole response.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<HttpResponse, HttpError> {
        let parsed = url::Url::parse(url).map_err(|e| HttpError::Invalid(format!("{url}: {e}")))?;
        let origin = format!("{}://{}", parsed.scheme(), authority_of(&parsed));
        let path = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_owned(),
        };
        within(self.timeout, async {
            let conn = match self.checkout(&origin) {
                Some(c) => c,
                None => HttpConnection::connect(&origin, self.options.clone(), None).await?,
            };
            if conn.version() == HttpVersion::Http2 {
                // Shared: back in the pool at once for concurrent requests.
                self.checkin(&origin, conn.clone());
            }
            let mut stream = conn.new_stream()?;
            match body {
                Some(b) => {
                    stream.write_headers(method, &path, headers, false).await?;
                    stream.write_chunk(b, true).await?;
                }
                None => stream.write_headers(method, &path, headers, true).await?,
            }
            let head = stream.get_headers(None).await?;
            let body = stream.get_body_as_bytes(None).await?;
            drop(stream);
            if conn.version() != HttpVersion::Http2 {
                self.checkin(&origin, conn);
            }
            Ok(HttpResponse {
                status: head.status,
                headers: head.headers,
                version: head.version,
                body,
            })
        })
        .await
    }
}
