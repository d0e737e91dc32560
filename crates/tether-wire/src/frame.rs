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
#[derive(Debug)]
pub struct NulFramer {
    _todo: (),
}

impl NulFramer {
    /// A framer accepting messages up to `max_message_size` bytes (terminator excluded).
    pub fn new(max_message_size: usize) -> Self {
        todo!("helper")
    }
}
