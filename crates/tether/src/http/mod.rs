//! HTTP/1.1 and HTTP/2 connections and streams in lua-http's model, on hyper.
//!
//! A connection ([`HttpConnection`] on the client, the per-connection side of [`HttpServer`])
//! carries streams: one request and its response. A client opens a [`ClientStream`] with
//! [`HttpConnection::new_stream`], writes headers and body chunks, then reads the response
//! headers, chunks and trailers; a server gets a [`ServerStream`] per request and writes the
//! response the same way. Both read their peer's body through one [`BodyReader`]. Every read
//! takes an optional timeout; a timeout fails only that call and loses no data. HTTP/1.1 keeps
//! requests in order on a connection (one at a time); HTTP/2 multiplexes them, with
//! `MAX_CONCURRENT_STREAMS` enforced in both directions.
//!
//! The module is split by concern: `client` (connections and streams that send requests),
//! `server` (accepting, limits, timeouts, streams that answer), `body` (the shared body reader
//! and writer) and `pool` ([`HttpClient`], whole requests over pooled connections).
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

mod body;
mod client;
mod pool;
mod server;

pub use body::{BodyReader, DEFAULT_BODY_LIMIT};
pub use client::{ClientStream, ConnectOptions, HttpConnection, IdleHandler};
pub use pool::{HttpClient, HttpResponse};
pub use server::{HttpServer, ServerConnection, ServerOptions, ServerStream, TlsMode};

use bytes::Bytes;
use hyper::HeaderMap;
use std::future::Future;
use std::time::Duration;
use thiserror::Error;

/// What can go wrong with HTTP connections and streams. Each variant keeps the error it
/// came from as its `source`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL does not parse.
    #[error("invalid URL {url}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The URL parses but cannot be used (scheme other than http/https, no host).
    #[error("unusable URL {url}: {reason}")]
    UnusableUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A header name or value, method, path or status is not valid HTTP.
    #[error("invalid {what}")]
    Invalid {
        /// Which part (`header x-foo`, `request`, `response`).
        what: String,
        /// The `http` crate's reason.
        #[source]
        source: http::Error,
    },
    /// A call did not finish in time (the stream and connection stay usable).
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The network floor could not dial or listen: an unusable address, a socket error
    /// (bind, connect, a live Unix socket in the way), a TLS configuration without trust
    /// anchors, or a connection the listener gave up on during its handshake.
    #[error("network")]
    Floor(#[source] crate::transport::FloorError),
    /// The TLS handshake failed (either side), or the server name is not valid.
    #[error("TLS handshake with {peer}")]
    Tls {
        /// The peer's address or name.
        peer: String,
        /// What rustls reported.
        #[source]
        source: std::io::Error,
    },
    /// The connection or stream is closed (by us, by shutdown, or the peer went away).
    #[error("closed: {0}")]
    Closed(&'static str),
    /// The connection failed at the HTTP level: a protocol error, a reset stream, a timeout
    /// hyper enforces (see [`hyper::Error::is_timeout`]), or the peer closed it mid-exchange.
    #[error("HTTP connection")]
    Connection(#[source] hyper::Error),
    /// The peer's body could not be read: malformed chunked encoding, a reset stream, or a
    /// connection that ended mid-body.
    #[error("reading the peer's body")]
    Body(#[source] hyper::Error),
    /// A body held in memory would exceed its bound (see [`BodyReader::set_limit`]).
    #[error("body larger than {limit} bytes")]
    BodyTooLarge {
        /// The bound in bytes.
        limit: usize,
    },
    /// The body is not UTF-8 text.
    #[error("body is not UTF-8")]
    NotUtf8(#[source] std::string::FromUtf8Error),
    /// Reading or writing a local file or reader for a body failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The stream was used out of order (e.g. a body before headers).
    #[error("stream state: {0}")]
    State(&'static str),
    /// A handler failed with its own error (see [`HttpError::handler`]).
    #[error("handler")]
    Handler(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl HttpError {
    /// A floor error, with the floor's deadlines as [`HttpError::Timeout`] and an upgrade's own
    /// `HttpError` unwrapped.
    pub(crate) fn from_floor(e: crate::transport::FloorError) -> Self {
        use crate::transport::FloorError;
        match e {
            FloorError::Timeout { after, .. } => HttpError::Timeout(after),
            FloorError::Upgrade(inner) => match inner.downcast::<HttpError>() {
                Ok(e) => *e,
                Err(other) => HttpError::Handler(other),
            },
            other => HttpError::Floor(other),
        }
    }

    /// Wraps an application error so a handler can return it.
    pub fn handler(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HttpError::Handler(e.into())
    }

    /// Whether the connection or stream is gone (closed, reset, or ended by the peer).
    pub fn is_closed(&self) -> bool {
        match self {
            HttpError::Closed(_) => true,
            HttpError::Connection(e) | HttpError::Body(e) => {
                e.is_closed() || e.is_canceled() || e.is_incomplete_message()
            }
            _ => false,
        }
    }

    /// Whether a timeout (ours or hyper's) ended the call.
    pub fn is_timeout(&self) -> bool {
        match self {
            HttpError::Timeout(_) => true,
            HttpError::Connection(e) | HttpError::Body(e) => e.is_timeout(),
            _ => false,
        }
    }
}

/// Which end a connection is: the client sends requests, the server answers them.
pub use tether_wire::Role;

/// HTTP versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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

fn header_map(headers: &[(&str, &str)]) -> Result<HeaderMap, HttpError> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let invalid = |source: http::Error| HttpError::Invalid {
            what: format!("header {k}"),
            source,
        };
        let name =
            hyper::header::HeaderName::from_bytes(k.as_bytes()).map_err(|e| invalid(e.into()))?;
        let value = hyper::header::HeaderValue::from_str(v).map_err(|e| invalid(e.into()))?;
        map.append(name, value);
    }
    Ok(map)
}

/// `f`, failing with [`HttpError::Timeout`] after `timeout` (none: no limit).
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

fn utf8(bytes: Bytes) -> Result<String, HttpError> {
    String::from_utf8(bytes.to_vec()).map_err(HttpError::NotUtf8)
}
