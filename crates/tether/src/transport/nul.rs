//! NUL-framed stream transports (TCP, TLS, Unix sockets).

use super::{Transport, TransportError, TransportInfo};
use bytes::{BufMut, BytesMut};
use tether_wire::{FrameError, NulFramer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

/// Initial capacity of the socket read buffer of a NUL-framed transport.
pub const READ_BUFFER_SIZE: usize = 8 * 1024;

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
}

impl NulCodec {
    /// A codec accepting incoming messages of up to `max_message_size` bytes.
    pub fn new(max_message_size: usize) -> Self {
        NulCodec {
            framer: NulFramer::new(max_message_size),
        }
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
            self.framer.push(src);
            src.clear();
        }
        Ok(self.framer.next_message().transpose()?)
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
    W: AsyncWrite + Send + 'static,
{
    let incoming =
        FramedRead::with_capacity(read, NulCodec::new(max_message_size), READ_BUFFER_SIZE);
    let outgoing = FramedWrite::new(write, NulCodec::new(max_message_size));
    Transport {
        incoming: Box::pin(incoming),
        outgoing: Box::pin(outgoing),
        info,
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
