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
