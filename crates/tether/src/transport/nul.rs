//! NUL-framed stream transports (TCP, TLS, Unix sockets).

use super::{Transport, TransportError, TransportInfo};
use bytes::{BufMut, BytesMut};
use futures::{ready, Sink};
use std::pin::Pin;
use std::task::{Context, Poll};
use tether_wire::{FrameError, NulFramer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, FramedWrite};

/// Size of the per-thread scratch buffer a NUL-framed transport reads the socket into (the
/// most one read takes).
pub const READ_BUFFER_SIZE: usize = 8 * 1024;

/// After this many bytes have passed through a framer, it is replaced by a fresh one at the
/// next message boundary, releasing the memory a large message left behind.
const FRAMER_RECYCLE_BYTES: usize = 256 * 1024;

/// An idle write buffer larger than this (left by a large message) is released after a flush.
const MAX_IDLE_WRITE_BUFFER: usize = 256 * 1024;

/// A [`tokio_util::codec`] codec for NUL-terminated JSTP messages.
///
/// Decoding is backed by [`NulFramer`]: a message longer than the configured maximum
/// ([`FrameError::TooLarge`]), one that is not UTF-8 ([`FrameError::InvalidUtf8`]) or an empty
/// frame ([`FrameError::Empty`]) comes out as [`TransportError::Frame`]. A partial message left
/// when the peer closes is discarded, as upstream does.
///
/// Encoding appends the message and one `0x00` (the same bytes as
/// [`tether_wire::encode_frame`]); it refuses empty messages and messages containing a NUL byte,
/// which would desynchronise the peer's framing.
#[derive(Debug)]
pub struct NulCodec {
    framer: NulFramer,
    /// Bytes pushed into `framer` since it was created.
    pushed: usize,
    /// A fatal error was returned; the framer must not be replaced any more.
    failed: bool,
}

impl NulCodec {
    /// A codec accepting incoming messages of up to `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        NulCodec {
            framer: NulFramer::new(max_message_size),
            pushed: 0,
            failed: false,
        }
    }

    /// Hands bytes read from the socket to the framer.
    fn push(&mut self, bytes: &[u8]) {
        if self.pushed > FRAMER_RECYCLE_BYTES && self.framer.buffered() == 0 && !self.failed {
            // At a message boundary: drop the framer's buffer, which keeps the capacity of
            // the largest message seen.
            self.framer = NulFramer::new(self.framer.max_message_size());
            self.pushed = 0;
        }
        self.framer.push(bytes);
        self.pushed = self.pushed.saturating_add(bytes.len());
    }

    /// The configured maximum incoming message size.
    pub fn max_message_size(&self) -> usize {
        self.framer.max_message_size()
    }
}

impl Default for NulCodec {
    /// A codec with [`tether_wire::DEFAULT_MAX_MESSAGE_SIZE`].
    fn default() -> Self {
        NulCodec::new(tether_wire::DEFAULT_MAX_MESSAGE_SIZE)
    }
}

impl Decoder for NulCodec {
    type Item = String;
    type Error = TransportError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<String>, TransportError> {
        if !src.is_empty() {
            // The framer keeps the partial message, so the socket buffer stays small.
            self.push(src);
            src.clear();
        }
        let next = self.framer.next_message().transpose();
        if let Err(FrameError::TooLarge { .. }) = next {
            self.failed = true;
        }
        Ok(next?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<String>, TransportError> {
        let next = self.decode(src)?;
        if next.is_none() && self.framer.buffered() > 0 {
            tracing::debug!(
                bytes = self.framer.buffered(),
                "peer closed with an unterminated message; discarding it"
            );
        }
        Ok(next)
    }
}

impl Encoder<String> for NulCodec {
    type Error = TransportError;

    fn encode(&mut self, item: String, dst: &mut BytesMut) -> Result<(), TransportError> {
        <Self as Encoder<&str>>::encode(self, &item, dst)
    }
}

impl Encoder<&str> for NulCodec {
    type Error = TransportError;

    fn encode(&mut self, item: &str, dst: &mut BytesMut) -> Result<(), TransportError> {
        check_outgoing(item)?;
        dst.reserve(item.len() + 1);
        dst.put_slice(item.as_bytes());
        dst.put_u8(0);
        Ok(())
    }
}

/// Rejects messages that cannot be framed: empty ones and ones containing NUL.
pub(crate) fn check_outgoing(message: &str) -> Result<(), TransportError> {
    if message.is_empty() {
        return Err(TransportError::Frame(FrameError::Empty));
    }
    if message.as_bytes().contains(&0) {
        return Err(TransportError::InvalidMessage(
            "outgoing message contains a NUL byte".into(),
        ));
    }
    Ok(())
}

/// Wraps the two halves of a byte stream in NUL framing.
///
/// Writes are batched: sending feeds the write buffer, which goes out when it passes 128 KiB or
/// on flush. Closing the sink flushes and shuts the write half down (FIN for TCP and Unix
/// sockets, `close_notify` then FIN for TLS).
pub fn nul_transport<R, W>(
    read: R,
    write: W,
    max_message_size: usize,
    info: TransportInfo,
) -> Transport
where
    R: AsyncRead + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let incoming = NulIncoming::new(read, max_message_size);
    let mut inner = FramedWrite::new(write, NulCodec::new(max_message_size));
    // Allocated on the first write, not up front: idle connections keep no write buffer.
    *inner.write_buffer_mut() = BytesMut::new();
    let outgoing = NulSink {
        inner,
        grown: false,
    };
    Transport {
        incoming: Box::pin(incoming),
        outgoing: Box::pin(outgoing),
        info,
    }
}

/// The read side of a NUL-framed transport. It owns no socket buffer: each read goes into a
/// per-thread scratch buffer of [`READ_BUFFER_SIZE`] bytes and straight on into the framer,
/// which keeps only a partial message. An idle connection so holds no read buffer, and a busy
/// one allocates none per read (a per-connection buffer made and released around every
/// pending read cost a large malloc and free per driver step).
struct NulIncoming<R> {
    read: Pin<Box<R>>,
    codec: NulCodec,
    /// The peer closed its side: what the framer holds is all there is.
    eof: bool,
    /// An error was returned: the stream is over, as after `FramedRead`'s errors.
    errored: bool,
}

impl<R: AsyncRead> NulIncoming<R> {
    fn new(read: R, max_message_size: usize) -> Self {
        NulIncoming {
            read: Box::pin(read),
            codec: NulCodec::new(max_message_size),
            eof: false,
            errored: false,
        }
    }
}

thread_local! {
    /// Scratch space for socket reads; its bytes are copied into a framer before the read
    /// returns, so one buffer per thread serves every connection polled on it.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_BUFFER_SIZE].into_boxed_slice());
}

impl<R: AsyncRead> futures::Stream for NulIncoming<R> {
    type Item = Result<String, TransportError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.errored {
            return Poll::Ready(None);
        }
        loop {
            let mut none = BytesMut::new();
            let next = if this.eof {
                this.codec.decode_eof(&mut none)
            } else {
                this.codec.decode(&mut none)
            };
            match next {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) if this.eof => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    this.errored = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let mut read_into = |buf: &mut [u8]| {
                let mut buf = tokio::io::ReadBuf::new(buf);
                let polled = this.read.as_mut().poll_read(cx, &mut buf);
                if let Poll::Ready(Ok(())) = polled {
                    if buf.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.codec.push(buf.filled());
                    }
                }
                polled
            };
            let read = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => read_into(&mut scratch[..]),
                // Only if a reader polled another NUL stream from inside its own read.
                Err(_) => read_into(&mut vec![0; READ_BUFFER_SIZE]),
            });
            if let Err(e) = ready!(read) {
                this.errored = true;
                return Poll::Ready(Some(Err(TransportError::Io(e))));
            }
        }
    }
}

/// [`FramedWrite`] that gives back the memory of a large message once it has been flushed.
struct NulSink<W> {
    inner: FramedWrite<W, NulCodec>,
    /// A message larger than [`MAX_IDLE_WRITE_BUFFER`] went through the write buffer since
    /// it was last replaced.
    grown: bool,
}

impl<W: AsyncWrite + Unpin> Sink<String> for NulSink<W> {
    type Error = TransportError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Sink::<String>::poll_ready(Pin::new(&mut self.inner), cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: String) -> Result<(), Self::Error> {
        self.grown |= item.len() > MAX_IDLE_WRITE_BUFFER;
        Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        ready!(Sink::<String>::poll_flush(Pin::new(&mut self.inner), cx))?;
        if self.grown {
            // `BytesMut` keeps its largest allocation even when empty: let it go.
            *self.inner.write_buffer_mut() = BytesMut::new();
            self.grown = false;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Sink::<String>::poll_close(Pin::new(&mut self.inner), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_across_chunks_and_keeps_socket_buffer_empty() {
        let mut c = NulCodec::new(100);
        let mut buf = BytesMut::from(&b"{a:1}\0{b:"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), Some("{a:1}".into()));
        assert!(buf.is_empty());
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(b"2}\0");
        assert_eq!(c.decode(&mut buf).unwrap(), Some("{b:2}".into()));
        assert_eq!(c.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn framer_is_recycled_at_message_boundaries() {
        let mut c = NulCodec::new(1 << 20);
        let big = "x".repeat(FRAMER_RECYCLE_BYTES + 1);
        let mut buf = BytesMut::from(format!("{big}\0").as_bytes());
        assert_eq!(c.decode(&mut buf).unwrap().as_deref(), Some(&big[..]));
        assert!(c.pushed > FRAMER_RECYCLE_BYTES);
        // A message split across reads survives the recycling that happens before it.
        buf.extend_from_slice(b"{a:");
        assert_eq!(c.decode(&mut buf).unwrap(), None);
        assert_eq!(c.pushed, 3, "recycled before the new bytes");
        buf.extend_from_slice(b"1}\0");
        assert_eq!(c.decode(&mut buf).unwrap().as_deref(), Some("{a:1}"));
    }

    #[tokio::test]
    async fn incoming_frames_across_reads_and_ends_at_eof_or_error() {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut incoming = NulIncoming::new(ours, 8);
        peer.write_all(b"{a:1}\0{b:").await.unwrap();
        assert_eq!(incoming.next().await.unwrap().unwrap(), "{a:1}");
        peer.write_all(b"2}\0{c").await.unwrap();
        assert_eq!(incoming.next().await.unwrap().unwrap(), "{b:2}");
        // The partial `{c` is discarded when the peer closes.
        drop(peer);
        assert!(incoming.next().await.is_none());

        let (mut peer, ours) = tokio::io::duplex(64);
        let mut incoming = NulIncoming::new(ours, 4);
        peer.write_all(b"123456789").await.unwrap();
        assert!(matches!(
            incoming.next().await,
            Some(Err(TransportError::Frame(FrameError::TooLarge {
                limit: 4
            })))
        ));
        assert!(incoming.next().await.is_none(), "nothing after an error");
    }

    #[tokio::test]
    async fn large_write_buffer_is_released_after_flush() {
        use futures::SinkExt;
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let mut sink = NulSink {
            inner: FramedWrite::new(a, NulCodec::default()),
            grown: false,
        };
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.unwrap();
            all
        });
        sink.send("{x:1}".to_owned()).await.unwrap();
        assert!(!sink.grown);
        sink.send("y".repeat(1 << 20)).await.unwrap();
        assert!(!sink.grown);
        assert_eq!(sink.inner.write_buffer().capacity(), 0, "buffer replaced");
        sink.close().await.unwrap();
        assert_eq!(reader.await.unwrap().len(), 6 + (1 << 20) + 1);
    }

    #[test]
    fn errors() {
        let mut c = NulCodec::new(4);
        let mut buf = BytesMut::from(&b"\0"[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(TransportError::Frame(FrameError::Empty))
        ));
        buf.extend_from_slice(b"\xff\0");
        assert!(matches!(
            c.decode(&mut buf),
            Err(TransportError::Frame(FrameError::InvalidUtf8))
        ));
        buf.extend_from_slice(b"12345");
        assert!(matches!(
            c.decode(&mut buf),
            Err(TransportError::Frame(FrameError::TooLarge { limit: 4 }))
        ));
        assert_eq!(c.max_message_size(), 4);
    }

    #[test]
    fn encodes_with_terminator_and_refuses_unframeable() {
        let mut c = NulCodec::default();
        let mut out = BytesMut::new();
        c.encode("{ping:[1]}".to_owned(), &mut out).unwrap();
        c.encode("{pong:[1]}", &mut out).unwrap();
        let mut expected = Vec::new();
        tether_wire::encode_frame("{ping:[1]}", &mut expected);
        tether_wire::encode_frame("{pong:[1]}", &mut expected);
        assert_eq!(&out[..], &expected[..]);
        assert!(matches!(
            c.encode(String::new(), &mut out),
            Err(TransportError::Frame(FrameError::Empty))
        ));
        assert!(matches!(
            c.encode("a\0b".to_owned(), &mut out),
            Err(TransportError::InvalidMessage(_))
        ));
    }
}
