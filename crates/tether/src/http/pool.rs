//! [`HttpClient`]: whole requests over pooled connections.

use super::client::{authority_of, parse_url};
use super::{within, ConnectOptions, HttpConnection, HttpError, HttpVersion};
use bytes::Bytes;
use hyper::HeaderMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
/// connection is shared by concurrent requests. The pool keeps at most
/// [`HttpClient::MAX_IDLE_PER_ORIGIN`] connections per origin.
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
    /// Most connections kept per origin; more are closed when their exchange ends.
    pub const MAX_IDLE_PER_ORIGIN: usize = 32;

    /// A client connecting with `options`; `timeout` bounds connecting and each whole request.
    pub fn new(options: ConnectOptions, timeout: Option<Duration>) -> Self {
        HttpClient {
            options,
            timeout,
            pool: Arc::default(),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<HttpConnection>>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many idle or shared connections the pool holds.
    pub fn pooled(&self) -> usize {
        self.pool()
            .values()
            .map(|v| v.iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    fn checkout(&self, origin: &str) -> Option<HttpConnection> {
        let mut pool = self.pool();
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
        let mut pool = self.pool();
        let conns = pool.entry(origin.to_owned()).or_default();
        if conns.len() < Self::MAX_IDLE_PER_ORIGIN
            && !conns.iter().any(|c| Arc::ptr_eq(&c.shared, &conn.shared))
        {
            conns.push(conn);
        }
    }

    /// Sends `method url` with `headers` and an optional body; returns the whole response.
    /// A response that arrives while the body is still being sent (an HTTP/2 server may
    /// answer first and reset the stream) is returned, not the failed body write.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<HttpResponse, HttpError> {
        let parsed = parse_url(url)?;
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
            let mut write_error = None;
            match body {
                Some(b) => {
                    stream.write_headers(method, &path, headers, false).await?;
                    // The peer may stop reading the body because it already answered.
                    if let Err(e) = stream.write_chunk(b, true).await {
                        write_error = Some(e);
                    }
                }
                None => stream.write_headers(method, &path, headers, true).await?,
            }
            let head = match stream.get_headers(None).await {
                Ok(head) => head,
                Err(e) => return Err(write_error.unwrap_or(e)),
            };
            let body = stream.get_body_as_bytes(None).await?;
            drop(stream);
            if conn.version() != HttpVersion::Http2 && write_error.is_none() {
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
