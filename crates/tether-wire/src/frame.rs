//! NUL framing for stream transports (TCP, TLS, Unix sockets): every message ends with one `0x00`.

use thiserror::Error;

/// Upstream's maximum message size: 8 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;

/// Framing failures. After one, the stream is unusable and should be closed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// More than `limit` bytes arrived without a terminator.
    #[error("message exceeds the maximum size of {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A frame is not valid UTF-8.
    #[error("message is not valid UTF-8")]
    InvalidUtf8,
    /// Two terminators in a row (upstream treats it as a parse error).
    #[error("empty message")]
    Empty,
}

/// Splits a byte stream into NUL-terminated messages, bounded by a maximum size.
///
/// Feed bytes with [`NulFramer::push`], then take complete messages with
/// [`NulFramer::next_message`] until it returns `None`.
///
/// ```
/// use tether_wire::NulFramer;
/// let mut f = NulFramer::new(1024);
/// f.push(b"{ping:[1]}\0{pong:[1]}\0{partial");
/// assert_eq!(f.next_message(), Some(Ok("{ping:[1]}".to_string())));
/// assert_eq!(f.next_message(), Some(Ok("{pong:[1]}".to_string())));
/// assert_eq!(f.next_message(), None);
/// assert_eq!(f.buffered(), b"{partial".len());
/// ```
#[derive(Debug)]
pub struct NulFramer {
    buf: Vec<u8>,
    /// Where the next message starts in `buf`.
    start: usize,
    /// How far `buf` has been scanned for a terminator.
    scanned: usize,
    max: usize,
    failed: bool,
}

impl NulFramer {
    /// A framer accepting messages up to `max_message_size` bytes (terminator excluded).
    pub fn new(max_message_size: usize) -> Self {
        NulFramer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max: max_message_size,
            failed: false,
        }
    }

    /// The configured maximum message size.
    pub fn max_message_size(&self) -> usize {
        self.max
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held for an incomplete message.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, an error (after which the framer stays failed), or `None`
    /// when more bytes are needed.
    pub fn next_message(&mut self) -> Option<Result<String, FrameError>> {
        if self.failed {
            return Some(Err(FrameError::TooLarge { limit: self.max }));
        }
        let from = self.scanned.max(self.start);
        match self.buf[from..].iter().position(|&b| b == 0) {
            Some(rel) => {
                let end = from + rel;
                let frame = &self.buf[self.start..end];
                let result = if frame.len() > self.max {
                    self.failed = true;
                    Err(FrameError::TooLarge { limit: self.max })
                } else if frame.is_empty() {
                    Err(FrameError::Empty)
                } else {
                    std::str::from_utf8(frame)
                        .map(str::to_owned)
                        .map_err(|_| FrameError::InvalidUtf8)
                };
                self.start = end + 1;
                self.scanned = self.start;
                // Reclaim consumed space once it dominates the buffer.
                if self.start > 4096 && self.start * 2 > self.buf.len() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                    self.scanned = 0;
                }
                Some(result)
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() - self.start > self.max {
                    self.failed = true;
                    self.buf = Vec::new();
                    self.start = 0;
                    self.scanned = 0;
                    return Some(Err(FrameError::TooLarge { limit: self.max }));
                }
                None
            }
        }
    }
}

/// Appends `message` and its NUL terminator to `out`.
pub fn encode_frame(message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(message.as_bytes());
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drains every result currently available (stopping after a fatal `TooLarge`).
    fn drain(f: &mut NulFramer) -> Vec<Result<String, FrameError>> {
        let mut out = Vec::new();
        while let Some(r) = f.next_message() {
            let fatal = matches!(r, Err(FrameError::TooLarge { .. }));
            out.push(r);
            if fatal {
                break;
            }
        }
        out
    }

    const STREAM: &[u8] = b"{ping:[1]}\0{pong:[1]}\0{call:[2,'a'],b:[]}\0{partial";

    #[test]
    fn upstream_vector_in_one_push() {
        let mut f = NulFramer::new(DEFAULT_MAX_MESSAGE_SIZE);
        f.push(STREAM);
        assert_eq!(
            drain(&mut f),
            vec![
                Ok("{ping:[1]}".to_owned()),
                Ok("{pong:[1]}".to_owned()),
                Ok("{call:[2,'a'],b:[]}".to_owned()),
            ]
        );
        assert_eq!(f.buffered(), b"{partial".len());
        f.push(b"}\0");
        assert_eq!(drain(&mut f), vec![Ok("{partial}".to_owned())]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn upstream_vector_byte_by_byte() {
        let mut f = NulFramer::new(DEFAULT_MAX_MESSAGE_SIZE);
        let mut got = Vec::new();
        for b in STREAM {
            f.push(std::slice::from_ref(b));
            got.extend(drain(&mut f));
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], Ok("{call:[2,'a'],b:[]}".to_owned()));
        assert_eq!(f.buffered(), b"{partial".len());
    }

    #[test]
    fn empty_frame_is_an_error_but_not_fatal() {
        let mut f = NulFramer::new(100);
        f.push(b"\0{}\0\0");
        assert_eq!(
            drain(&mut f),
            vec![
                Err(FrameError::Empty),
                Ok("{}".to_owned()),
                Err(FrameError::Empty)
            ]
        );
        f.push(b"{a:1}\0");
        assert_eq!(drain(&mut f), vec![Ok("{a:1}".to_owned())]);
    }

    #[test]
    fn invalid_utf8_is_an_error_but_not_fatal() {
        let mut f = NulFramer::new(100);
        f.push(b"{a:'\xff'}\0{b:1}\0");
        assert_eq!(
            drain(&mut f),
            vec![Err(FrameError::InvalidUtf8), Ok("{b:1}".to_owned())]
        );
        // A multi-byte character split across pushes is fine.
        f.push("{c:'é".as_bytes().split_last().unwrap().1);
        assert_eq!(drain(&mut f), vec![]);
        f.push(&["é".as_bytes()[1], b'\'', b'}', 0]);
        assert_eq!(drain(&mut f), vec![Ok("{c:'é'}".to_owned())]);
    }

    #[test]
    fn too_large_with_terminator_is_fatal() {
        let mut f = NulFramer::new(4);
        f.push(b"abcd\0abcde\0ab\0");
        assert_eq!(
            drain(&mut f),
            vec![
                Ok("abcd".to_owned()),
                Err(FrameError::TooLarge { limit: 4 })
            ]
        );
        f.push(b"x\0");
        assert_eq!(
            f.next_message(),
            Some(Err(FrameError::TooLarge { limit: 4 }))
        );
    }

    #[test]
    fn too_large_without_terminator_is_detected_early() {
        let mut f = NulFramer::new(4);
        f.push(b"abcd");
        assert_eq!(f.next_message(), None);
        f.push(b"e");
        assert_eq!(
            f.next_message(),
            Some(Err(FrameError::TooLarge { limit: 4 }))
        );
        assert_eq!(f.buffered(), 0, "the buffer is released");
        assert_eq!(f.max_message_size(), 4);
    }

    #[test]
    fn consumed_space_is_reclaimed() {
        let mut f = NulFramer::new(100);
        let mut stream = Vec::new();
        for i in 0..2000 {
            encode_frame(&format!("{{ping:[{i}]}}"), &mut stream);
        }
        // Leave a partial frame so the buffer never empties completely.
        stream.extend_from_slice(b"{pi");
        let mut count = 0;
        for chunk in stream.chunks(777) {
            f.push(chunk);
            for r in drain(&mut f) {
                assert_eq!(r, Ok(format!("{{ping:[{count}]}}")));
                count += 1;
            }
            assert!(f.buf.len() < 16 * 1024, "buffer grew to {}", f.buf.len());
        }
        assert_eq!(count, 2000);
        assert_eq!(f.buffered(), 3);
    }

    #[test]
    fn encode_frame_appends_one_nul() {
        let mut out = b"x".to_vec();
        encode_frame("{ping:[1]}", &mut out);
        assert_eq!(out, b"x{ping:[1]}\0");
    }
}
