//! Sans-IO core of tether's JSTP support.
//!
//! Nothing here touches a socket or a runtime: the codec turns text into [`Value`]s and back
//! following the mdsf "record serialization" rules that `@metarhia/jstp` uses, the framer splits a
//! byte stream on NUL terminators, the message model classifies a parsed value as one of the
//! JSTP message kinds, and [`session`] keeps the resend buffer and delivery counters that let a
//! session survive reconnects. The async layer in the `tether` crate drives these with real
//! transports.
//!
//! ```
//! use tether_wire::{Message, Value};
//!
//! let msg = Message::parse("{call:[1,'calculator'],divide:[20,10]}").unwrap();
//! assert_eq!(
//!     msg,
//!     Message::Call {
//!         id: 1,
//!         iface: "calculator".into(),
//!         method: "divide".into(),
//!         args: Value::Array(vec![Value::from(20), Value::from(10)]),
//!     }
//! );
//! assert_eq!(msg.encode(), "{call:[1,'calculator'],divide:[20,10]}");
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod conductor;
pub mod error;
pub mod frame;
pub mod message;
pub mod parse;
pub mod ser;
pub mod serde_value;
pub mod session;
pub mod value;

pub use error::{ErrorCode, RemoteErrorArray};
pub use frame::{encode_frame, FrameError, NulFramer, DEFAULT_MAX_MESSAGE_SIZE};
pub use message::{Auth, CallbackResult, DecodeError, HandshakeResult, Message, PreparedEvent};
pub use parse::{parse, ParseError};
pub use ser::{stringify, write_string_literal, write_value, SerializeError};
pub use serde_value::{
    from_args, from_value, to_args, to_value, PathSegment, ValueError, ValueErrorKind,
};
pub use session::{
    BufferLimit, BufferedMessage, RequestKind, RestoreOutcome, RestorePlan, RestoreRequest, Role,
    Session, SessionConfig, SessionError, SessionState,
};
pub use value::{Object, Value};
