//! The body halves both kinds of stream share: [`BodyReader`] for the peer's body (with
//! lua-http's `get_body_chars`/`get_body_until`/`unget`), and the bounded channel a stream
//! writes its own body into.

use super::{header_map, HttpError};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::HeaderMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// How many bytes a [`BodyReader`] holds in memory by default (whole-body reads, `unget`,
/// and what `get_body_chars`/`get_body_until` gather): 64 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// How many frames (chunks or trailers) a written body queues before `write_chunk` waits for
/// hyper to take them: 16 (so at most 16 chunks of the caller's choosing per stream).
const WRITE_QUEUE: usize = 16;

/// The peer's body on a stream: chunks, then optional trailers. Every read is cancel-safe:
/// a timeout around it loses nothing, bytes gathered so far stay buffered for the next call.
pub struct BodyReader {
    body: Option<Incoming>,
    /// Bytes read (or given back with `unget`) and not yet handed out. At most `limit`.
    buf: BytesMut,
    trailers: Option<HeaderMap>,
    limit: usize,
    /// The body failed to parse or was cut off; a server answers 400 if nothing was sent.
    failed: bool,
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReader")
            .field("buffered", &self.buf.len())
            .field("ended", &self.body.is_none())
            .finish()
    }
}

impl BodyReader {
    pub(crate) fn new(body: Option<Incoming>) -> Self {
        BodyReader {
            body,
            buf: BytesMut::new(),
            trailers: None,
            limit: DEFAULT_BODY_LIMIT,
            failed: false,
        }
    }

    /// Sets how many bytes may be held in memory (default [`DEFAULT_BODY_LIMIT`]).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Whether the body ended and everything was handed out.
    pub fn is_ended(&self) -> bool {
        self.body.is_none() && self.buf.is_empty()
    }

    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// The trailers, once the body was read to its end.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// The next frame's data from the wire; `None` at the end.
    async fn pull(&mut self) -> Result<Option<Bytes>, HttpError> {
        use http_body_util::BodyExt;
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
                Some(Err(e)) => {
                    self.failed = true;
                    self.body = None;
                    return Err(HttpError::Body(e));
                }
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

    /// Adds `data` to the buffer, within the limit.
    fn keep(&mut self, data: &[u8]) -> Result<(), HttpError> {
        if self.buf.len() + data.len() > self.limit {
            return Err(HttpError::BodyTooLarge { limit: self.limit });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next chunk (buffered bytes first); `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        if !self.buf.is_empty() {
            return Ok(Some(self.buf.split().freeze()));
        }
        self.pull().await
    }

    /// The whole rest of the body, at most the limit.
    pub async fn all(&mut self) -> Result<Bytes, HttpError> {
        while let Some(data) = self.pull().await? {
            if self.buf.is_empty() && self.body.is_none() {
                return Ok(data);
            }
            self.keep(&data)?;
        }
        Ok(self.buf.split().freeze())
    }

    /// Exactly `n` bytes, or fewer when the body ends first; `None` at the end (lua-http's
    /// `get_body_chars`).
    #[doc(alias = "get_body_chars")]
    pub async fn chars(&mut self, n: usize) -> Result<Option<Bytes>, HttpError> {
        if n > self.limit {
            return Err(HttpError::BodyTooLarge { limit: self.limit });
        }
        while self.buf.len() < n {
            match self.pull().await? {
                Some(data) => self.keep(&data)?,
                None => break,
            }
        }
        if self.buf.is_empty() && n > 0 {
            return Ok(None);
        }
        let n = n.min(self.buf.len());
        Ok(Some(self.buf.split_to(n).freeze()))
    }

    /// The body up to the first `pattern` (with it when `include`; the pattern is consumed
    /// either way), or the rest when the body ends first; `None` at the end (lua-http's
    /// `get_body_until` with a plain pattern).
    #[doc(alias = "get_body_until")]
    pub async fn until(
        &mut self,
        pattern: &[u8],
        include: bool,
    ) -> Result<Option<Bytes>, HttpError> {
        let mut searched = 0;
        loop {
            if !pattern.is_empty() {
                if let Some(at) = self.buf[searched..]
                    .windows(pattern.len())
                    .position(|w| w == pattern)
                {
                    let end = searched + at + pattern.len();
                    let mut got = self.buf.split_to(end);
                    if !include {
                        got.truncate(got.len() - pattern.len());
                    }
                    return Ok(Some(got.freeze()));
                }
                searched = self.buf.len().saturating_sub(pattern.len() - 1);
            }
            match self.pull().await? {
                Some(data) => self.keep(&data)?,
                None if self.buf.is_empty() => return Ok(None),
                None => return Ok(Some(self.buf.split().freeze())),
            }
        }
    }

    /// Puts `data` back in front of the body, so the next read returns it first (lua-http's
    /// `unget`).
    pub fn unget(&mut self, data: &[u8]) -> Result<(), HttpError> {
        if self.buf.len() + data.len() > self.limit {
            return Err(HttpError::BodyTooLarge { limit: self.limit });
        }
        let mut front = BytesMut::with_capacity(data.len() + self.buf.len());
        front.extend_from_slice(data);
        front.extend_from_slice(&self.buf);
        self.buf = front;
        Ok(())
    }
}

/// Access to a stream's [`BodyReader`], for the read methods both kinds of stream share.
pub(crate) trait HasBody: Send {
    /// Waits until the body can be read (a client waits for the response head).
    fn body_ready(
        &mut self,
    ) -> impl std::future::Future<Output = Result<&mut BodyReader, HttpError>> + Send + '_;
    /// The reader, as it is now.
    fn body_reader(&self) -> &BodyReader;
    /// Called once the body was read to its end.
    fn body_ended(&mut self) {}
}

/// The read methods of [`super::ClientStream`] and [`super::ServerStream`], written once.
macro_rules! body_read_methods {
    () => {
        /// The next body chunk; `None` at the end.
        pub async fn get_next_chunk(
            &mut self,
            timeout: Option<std::time::Duration>,
        ) -> Result<Option<bytes::Bytes>, HttpError> {
            let r = super::within(timeout, async {
                self.body_ready().await?.next_chunk().await
            })
            .await;
            if matches!(r, Ok(None)) {
                self.body_ended();
            }
            r
        }

        /// The whole (rest of the) body, at most the reader's limit
        /// ([`super::BodyReader::set_limit`]).
        pub async fn get_body_as_bytes(
            &mut self,
            timeout: Option<std::time::Duration>,
        ) -> Result<bytes::Bytes, HttpError> {
            let r = super::within(timeout, async { self.body_ready().await?.all().await }).await;
            if r.is_ok() {
                self.body_ended();
            }
            r
        }

        /// The whole (rest of the) body as UTF-8 text.
        pub async fn get_body_as_string(
            &mut self,
            timeout: Option<std::time::Duration>,
        ) -> Result<String, HttpError> {
            super::utf8(self.get_body_as_bytes(timeout).await?)
        }

        /// Exactly `n` bytes of the body, or fewer when it ends first; `None` at the end.
        pub async fn get_body_chars(
            &mut self,
            n: usize,
            timeout: Option<std::time::Duration>,
        ) -> Result<Option<bytes::Bytes>, HttpError> {
            super::within(timeout, async { self.body_ready().await?.chars(n).await }).await
        }

        /// The body up to `pattern` (included when `include`), or the rest when the body ends
        /// first; `None` at the end. The pattern is plain bytes (lua-http's `plain = true`).
        pub async fn get_body_until(
            &mut self,
            pattern: &[u8],
            include: bool,
            timeout: Option<std::time::Duration>,
        ) -> Result<Option<bytes::Bytes>, HttpError> {
            super::within(timeout, async {
                self.body_ready().await?.until(pattern, include).await
            })
            .await
        }

        /// Puts `data` back in front of the body: the next read returns it first.
        pub async fn unget(&mut self, data: &[u8]) -> Result<(), HttpError> {
            self.body_ready().await?.unget(data)
        }

        /// The trailers, once the body was read to its end.
        pub fn trailers(&self) -> Option<&hyper::HeaderMap> {
            self.body_reader().trailers()
        }

        /// Sets how many body bytes reads may hold in memory
        /// ([`super::DEFAULT_BODY_LIMIT`] by default).
        pub async fn set_body_limit(&mut self, limit: usize) -> Result<(), HttpError> {
            self.body_ready().await?.set_limit(limit);
            Ok(())
        }

        /// The (rest of the) body as a stream of chunks, each read within `timeout`.
        pub fn body_chunks(
            &mut self,
            timeout: Option<std::time::Duration>,
        ) -> impl futures::Stream<Item = Result<bytes::Bytes, HttpError>> + '_ {
            futures::stream::unfold(Some(self), move |this| async move {
                let this = this?;
                match this.get_next_chunk(timeout).await {
                    Ok(Some(chunk)) => Some((Ok(chunk), Some(this))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), None)),
                }
            })
        }

        /// Writes the (rest of the) body to `writer`, chunk by chunk, each read within
        /// `timeout`; returns the number of bytes.
        pub async fn save_body_to_writer(
            &mut self,
            mut writer: impl tokio::io::AsyncWrite + Unpin,
            timeout: Option<std::time::Duration>,
        ) -> Result<u64, HttpError> {
            use tokio::io::AsyncWriteExt;
            let mut total = 0u64;
            while let Some(chunk) = self.get_next_chunk(timeout).await? {
                total += chunk.len() as u64;
                writer
                    .write_all(&chunk)
                    .await
                    .map_err(|source| HttpError::Io {
                        what: "writing the body",
                        source,
                    })?;
            }
            writer.flush().await.map_err(|source| HttpError::Io {
                what: "writing the body",
                source,
            })?;
            Ok(total)
        }

        /// Writes the (rest of the) body to the file at `path` (created or truncated);
        /// returns the number of bytes.
        pub async fn save_body_to_file(
            &mut self,
            path: impl AsRef<std::path::Path>,
            timeout: Option<std::time::Duration>,
        ) -> Result<u64, HttpError> {
            let file = tokio::fs::File::create(path)
                .await
                .map_err(|source| HttpError::Io {
                    what: "creating the body's file",
                    source,
                })?;
            self.save_body_to_writer(file, timeout).await
        }
    };
}

/// The write methods both kinds of stream share (after their `write_headers`).
macro_rules! body_write_methods {
    () => {
        /// Sends a body chunk; with `end_stream` the body ends.
        pub async fn write_chunk(
            &mut self,
            chunk: bytes::Bytes,
            end_stream: bool,
        ) -> Result<(), HttpError> {
            self.body.chunk(chunk, end_stream).await
        }

        /// Sends trailers and ends the body.
        pub async fn write_trailers(&mut self, trailers: &[(&str, &str)]) -> Result<(), HttpError> {
            self.body.trailers(trailers).await
        }

        /// Sends the body from a reader (16 KiB at a time), then ends it.
        pub async fn write_body_from_reader(
            &mut self,
            mut reader: impl tokio::io::AsyncRead + Unpin,
        ) -> Result<(), HttpError> {
            use tokio::io::AsyncReadExt;
            loop {
                let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
                let n = reader
                    .read_buf(&mut buf)
                    .await
                    .map_err(|source| HttpError::Io {
                        what: "reading the body to send",
                        source,
                    })?;
                if n == 0 {
                    return self.write_chunk(bytes::Bytes::new(), true).await;
                }
                self.write_chunk(buf.freeze(), false).await?;
            }
        }

        /// Sends the file at `path` as the body, then ends it.
        pub async fn write_body_from_file(
            &mut self,
            path: impl AsRef<std::path::Path>,
        ) -> Result<(), HttpError> {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|source| HttpError::Io {
                    what: "opening the body's file",
                    source,
                })?;
            self.write_body_from_reader(file).await
        }
    };
}

pub(crate) use body_read_methods;
pub(crate) use body_write_methods;

/// The body a stream sends: none, one buffer known up front, or frames from a bounded channel
/// ([`WRITE_QUEUE`]). On the server it also drives the rest of the handler that feeds it, so
/// dropping it before its end (the stream was reset, the connection closed) cancels that
/// handler.
pub(crate) struct OutBody {
    /// A whole body known when the head went out (sent with an exact length).
    whole: Option<Bytes>,
    rx: Option<mpsc::Receiver<Frame<Bytes>>>,
    /// The handler still writing this body.
    task: Option<BoxFuture<'static, ()>>,
}

impl OutBody {
    pub(crate) fn empty() -> Self {
        OutBody {
            whole: None,
            rx: None,
            task: None,
        }
    }

    /// A body fed through the returned writer.
    pub(crate) fn channel() -> (Outgoing, Self) {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        (
            Outgoing(Some(tx)),
            OutBody {
                whole: None,
                rx: Some(rx),
                task: None,
            },
        )
    }

    /// Whether nothing more will be sent.
    pub(crate) fn is_done(&self) -> bool {
        self.whole.is_none() && self.rx.is_none()
    }

    /// If the writer already ended the body with at most one chunk, holds it as a whole body,
    /// so it goes out with its length (one frame with END_STREAM on HTTP/2, no chunked coding
    /// on HTTP/1.1).
    pub(crate) fn settle(&mut self) {
        let Some(rx) = self.rx.as_mut() else {
            return;
        };
        if !rx.is_closed() || rx.len() > 1 {
            return;
        }
        match rx.try_recv() {
            Err(_) => self.rx = None,
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    self.whole = Some(data);
                    self.rx = None;
                }
                // Trailers: put back as the only frame of a channel of their own.
                Err(frame) => {
                    let (tx, rx) = mpsc::channel(1);
                    let _ = tx.try_send(frame);
                    self.rx = Some(rx);
                }
            },
        }
    }

    /// Polls `task` whenever the body is polled, until it ends; dropped with the body.
    pub(crate) fn drive(&mut self, task: BoxFuture<'static, ()>) {
        self.task = Some(task);
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(task) = self.task.as_mut() {
            if task.as_mut().poll(cx).is_ready() {
                self.task = None;
            }
        }
        if let Some(data) = self.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                self.rx = None;
                // The body is complete; a handler still running after it is no longer tied
                // to the stream and finishes on its own.
                if let Some(task) = self.task.take() {
                    tokio::spawn(task);
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.whole, &self.rx) {
            (Some(data), None) => SizeHint::with_exact(data.len() as u64),
            (None, None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The write side both kinds of stream share: an open body, or none.
#[derive(Default)]
pub(crate) struct Outgoing(Option<mpsc::Sender<Frame<Bytes>>>);

impl Outgoing {
    pub(crate) async fn chunk(&mut self, chunk: Bytes, end_stream: bool) -> Result<(), HttpError> {
        let tx = self.0.as_ref().ok_or(HttpError::State("no open body"))?;
        if !chunk.is_empty() {
            tx.send(Frame::data(chunk))
                .await
                .map_err(|_| HttpError::Closed("the peer no longer takes the body"))?;
        }
        if end_stream {
            self.0 = None;
        }
        Ok(())
    }

    pub(crate) async fn trailers(&mut self, trailers: &[(&str, &str)]) -> Result<(), HttpError> {
        let map = header_map(trailers)?;
        let tx = self.0.take().ok_or(HttpError::State("no open body"))?;
        tx.send(Frame::trailers(map))
            .await
            .map_err(|_| HttpError::Closed("the peer no longer takes the body"))
    }
}
