//! Typed calls and events: Rust values in, Rust values out, converted with serde under JSTP's
//! rules (see [`tether_wire::serde_value`]).
//!
//! The server side is [`Interface::typed_method`](crate::Interface::typed_method) and
//! [`Interface::on_typed_event`](crate::Interface::on_typed_event); the calling side is the
//! [`TypedConnection`] extension trait on [`Connection`], [`TypedProxy`] on [`RemoteProxy`]
//! and [`TypedBroadcast`] on [`Server`].
//!
//! ```
//! use tether::typed::TypedConnection;
//! use tether::{memory, connect_transport, Application, ClientOptions, Interface, RemoteError, Server};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Application::new("calc", "1.0.0")?.interface(
//!     "calculator",
//!     Interface::new().typed_method("divide", |_conn, (a, b): (f64, f64)| async move {
//!         if b == 0.0 {
//!             return Err(RemoteError::new(1, "Zero division"));
//!         }
//!         Ok(a / b)
//!     }),
//! );
//! let server = Server::builder().application(app).build()?;
//! let (a, b) = memory::pair(8);
//! server.serve_transport(a);
//! let conn = connect_transport(b, "calc", ClientOptions::default()).await?;
//! let q: f64 = conn.call_typed("calculator", "divide", (20.0, 8.0)).await?;
//! assert_eq!(q, 2.5);
//! # conn.close().await;
//! # server.shutdown().await;
//! # Ok(())
//! # }
//! ```

use crate::connection::{Connection, RemoteProxy};
use crate::error::{Error, RemoteError};
use crate::server::Server;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use tether_wire::{from_value, to_args, ErrorCode, PathSegment, Value, ValueError};

/// A typed call or event failed: the arguments did not convert, the call itself failed, or
/// the result did not convert to the type asked for.
#[derive(Debug, thiserror::Error)]
pub enum TypedError {
    /// The arguments could not be converted to JSTP values (nothing was sent).
    #[error("arguments: {}", describe_args_error(.0))]
    Arguments(ValueError),
    /// The call or emit failed (a remote error, a timeout, a closed connection, …).
    #[error(transparent)]
    Call(#[from] Error),
    /// The peer's result does not convert to the requested type.
    #[error("result: {0}")]
    Result(ValueError),
}

impl TypedError {
    /// The remote error, if the peer answered with one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            TypedError::Call(e) => e.remote(),
            _ => None,
        }
    }
}

/// For callers whose errors are [`Error`]: a conversion failure on our side becomes
/// [`Error::InvalidArgument`], an unexpected result [`Error::Protocol`].
impl From<TypedError> for Error {
    fn from(e: TypedError) -> Self {
        match e {
            TypedError::Call(e) => e,
            TypedError::Arguments(_) => Error::InvalidArgument(e.to_string()),
            TypedError::Result(_) => Error::Protocol(e.to_string()),
        }
    }
}

/// "argument 1: invalid type …": an argument list's first path step is the argument's index.
pub(crate) fn describe_args_error(e: &ValueError) -> String {
    let path = e.path();
    match path.split_first() {
        Some((PathSegment::Index(i), rest)) => {
            let rest: String = rest.iter().map(ToString::to_string).collect();
            format!("argument {i}{rest}: {}", e.kind())
        }
        _ => e.kind().to_string(),
    }
}

/// The answer to a call whose arguments do not convert: `[17]` invalid signature, as
/// `@metarhia/jstp` answers a call of the wrong arity. Upstream never sends a standard code's
/// message, so the reason (which argument, and why) goes as the error's first info item:
/// `[17,,'argument 1: invalid type …']`, which a Node peer reads as its usual code 17.
pub(crate) fn invalid_signature(e: ValueError) -> RemoteError {
    RemoteError {
        code: ErrorCode::InvalidSignature.code(),
        message: None,
        info: vec![Value::String(describe_args_error(&e))],
    }
}

/// Why a call was refused with `[17]` by a typed method (see
/// [`Interface::typed_method`](crate::Interface::typed_method)), if the error says.
pub fn signature_reason(e: &RemoteError) -> Option<&str> {
    (e.code == ErrorCode::InvalidSignature.code())
        .then(|| e.info.first().and_then(Value::as_str))
        .flatten()
}

/// A call's results as one typed value: no results read as `undefined` (so `()` and
/// `Option` fit), one as itself, several — a JS peer may call back with more — as an array.
fn results_as<R: DeserializeOwned>(mut results: Vec<Value>) -> Result<R, ValueError> {
    let value = match results.len() {
        0 => Value::Undefined,
        1 => results.remove(0),
        _ => Value::Array(results),
    };
    from_value(value)
}

/// Typed calls and events on a [`Connection`].
pub trait TypedConnection {
    /// Calls `iface.method` with `args` (a tuple, or `()` for none) and converts the result
    /// to `R`.
    fn call_typed<R: DeserializeOwned>(
        &self,
        iface: &str,
        method: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<R, TypedError>> + Send;

    /// Like [`TypedConnection::call_typed`] with this call's own deadline.
    fn call_typed_timeout<R: DeserializeOwned>(
        &self,
        iface: &str,
        method: &str,
        args: impl Serialize,
        timeout: Duration,
    ) -> impl Future<Output = Result<R, TypedError>> + Send;

    /// Sends the event `iface.event` with `args` (a tuple, or `()` for none), as
    /// [`Connection::emit`] does (waiting under backpressure).
    fn emit_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<(), TypedError>> + Send;

    /// Like [`TypedConnection::emit_typed`] without waiting, as [`Connection::try_emit`].
    fn try_emit_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> Result<(), TypedError>;
}

impl TypedConnection for Connection {
    fn call_typed<R: DeserializeOwned>(
        &self,
        iface: &str,
        method: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<R, TypedError>> + Send {
        let args = to_args(&args);
        async move {
            let args = args.map_err(TypedError::Arguments)?;
            let results = self.call(iface, method, args).await?;
            results_as(results).map_err(TypedError::Result)
        }
    }

    fn call_typed_timeout<R: DeserializeOwned>(
        &self,
        iface: &str,
        method: &str,
        args: impl Serialize,
        timeout: Duration,
    ) -> impl Future<Output = Result<R, TypedError>> + Send {
        let args = to_args(&args);
        async move {
            let args = args.map_err(TypedError::Arguments)?;
            let results = self.call_timeout(iface, method, args, timeout).await?;
            results_as(results).map_err(TypedError::Result)
        }
    }

    fn emit_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<(), TypedError>> + Send {
        let args = to_args(&args);
        async move {
            let args = args.map_err(TypedError::Arguments)?;
            Ok(self.emit(iface, event, args).await?)
        }
    }

    fn try_emit_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> Result<(), TypedError> {
        let args = to_args(&args).map_err(TypedError::Arguments)?;
        Ok(self.try_emit(iface, event, args)?)
    }
}

/// Typed calls and events through a [`RemoteProxy`] (an interface learned by `inspect`).
pub trait TypedProxy {
    /// Calls a method of the interface, as [`RemoteProxy::call`] (a name the peer did not
    /// report fails locally with code 14), and converts the result to `R`.
    fn call_typed<R: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<R, TypedError>> + Send;

    /// Sends an event on this interface, as [`RemoteProxy::emit`].
    fn emit_typed(
        &self,
        event: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<(), TypedError>> + Send;
}

impl TypedProxy for RemoteProxy {
    fn call_typed<R: DeserializeOwned>(
        &self,
        method: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<R, TypedError>> + Send {
        let args = to_args(&args);
        async move {
            let args = args.map_err(TypedError::Arguments)?;
            let results = self.call(method, args).await?;
            results_as(results).map_err(TypedError::Result)
        }
    }

    fn emit_typed(
        &self,
        event: &str,
        args: impl Serialize,
    ) -> impl Future<Output = Result<(), TypedError>> + Send {
        let args = to_args(&args);
        async move {
            let args = args.map_err(TypedError::Arguments)?;
            Ok(self.emit(event, args).await?)
        }
    }
}

/// Typed broadcast on a [`Server`].
pub trait TypedBroadcast {
    /// Sends `iface.event(args)` to every client, as [`Server::broadcast`] does;
    /// returns how many it was queued for.
    fn broadcast_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> Result<usize, TypedError>;
}

impl TypedBroadcast for Server {
    fn broadcast_typed(
        &self,
        iface: &str,
        event: &str,
        args: impl Serialize,
    ) -> Result<usize, TypedError> {
        let args = to_args(&args).map_err(TypedError::Arguments)?;
        Ok(self.broadcast(iface, event, args))
    }
}
