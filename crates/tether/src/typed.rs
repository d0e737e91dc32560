//! Typed calls and events: Rust values in, Rust values out, converted with serde under JSTP's
//! rules (see [`tether_wire::serde_value`]).
//!
//! The server side is [`Interface::typed_method`](crate::Interface::typed_method) and
//! [`Interface::on_typed_event`](crate::Interface::on_typed_event); the calling side is the
//! [`TypedConnection`] extension trait on [`Connection`] (calls, emits, and the peer's events
//! as a typed [`EventStream`]), [`TypedProxy`] on [`RemoteProxy`] and [`TypedBroadcast`] on
//! [`Server`]. The `#[interface]` macro ([`crate::interface`]) builds on these.
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

use crate::app::MethodResult;
use crate::connection::{Connection, ConnectionEvent, RemoteProxy};
use crate::error::{Error, RemoteError};
use crate::server::Server;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_wire::{from_args, from_value, to_args, ErrorCode, PathSegment, Value, ValueError};
use tokio::sync::broadcast::error::RecvError;

/// A typed call or event failed: the arguments did not convert, the call itself failed, or
/// the result did not convert to the type asked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// An event the peer sent has arguments that do not convert to the requested type (an
    /// [`EventStream`] item; the stream goes on).
    #[error("event {}", describe_args_error(.0))]
    EventArguments(ValueError),
    /// An [`EventStream`] fell behind the connection's event channel
    /// ([`ConnectionConfig::event_capacity`](crate::ConnectionConfig)) and this many events
    /// of the connection were skipped (the stream goes on).
    #[error("{0} events skipped: the event stream fell behind")]
    Lagged(u64),
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

/// For callers whose errors are [`Error`]: a failed call is its own error, a conversion
/// failure (or a lagging event stream) is [`Error::Typed`], kept whole.
impl From<TypedError> for Error {
    fn from(e: TypedError) -> Self {
        match e {
            TypedError::Call(e) => e,
            other => Error::Typed(Box::new(other)),
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

    /// The peer's `iface.event` events from now on, their arguments converted to `A` (a tuple,
    /// or `()`); see [`EventStream`].
    fn typed_events<A: DeserializeOwned + Send + 'static>(
        &self,
        iface: &str,
        event: &str,
    ) -> EventStream<A>;
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

    fn typed_events<A: DeserializeOwned + Send + 'static>(
        &self,
        iface: &str,
        event: &str,
    ) -> EventStream<A> {
        EventStream::new(self, iface, event)
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

/// The events `iface.event` that the peer sends on one connection, their arguments converted
/// to `A` (a tuple, or `()` for none), in arrival order.
///
/// It subscribes when created (events that arrived before are not in it) and ends when the
/// connection closes. It reads the connection's event channel, which is bounded
/// ([`ConnectionConfig::event_capacity`](crate::ConnectionConfig)); a stream that falls behind
/// by more than that yields [`TypedError::Lagged`] with the number skipped and goes on, as does
/// one whose event does not convert ([`TypedError::EventArguments`]). Nothing is buffered
/// beyond that channel.
pub struct EventStream<A> {
    inner: BoxStream<'static, Result<A, TypedError>>,
    _args: PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for EventStream<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl<A: DeserializeOwned + Send + 'static> EventStream<A> {
    /// Subscribes to `iface.event` on `conn` (see [`TypedConnection::typed_events`]).
    pub fn new(conn: &Connection, iface: &str, event: &str) -> Self {
        let state = (
            conn.events(),
            conn.clone(),
            iface.to_owned(),
            event.to_owned(),
        );
        let inner = futures::stream::unfold(Some(state), |state| async move {
            let (mut rx, conn, iface, event) = state?;
            loop {
                // Biased towards the channel: events that arrived before the close are
                // delivered before the stream ends.
                let received = tokio::select! {
                    biased;
                    r = rx.recv() => r,
                    () = conn.closed() => Err(RecvError::Closed),
                };
                let item = match received {
                    Ok(ConnectionEvent::Event {
                        iface: i,
                        event: e,
                        args,
                    }) if i == iface && e == event => {
                        from_args::<A>(args).map_err(TypedError::EventArguments)
                    }
                    Ok(ConnectionEvent::Close) | Err(RecvError::Closed) => return None,
                    Err(RecvError::Lagged(n)) => Err(TypedError::Lagged(n)),
                    Ok(_) => continue,
                };
                return Some((item, Some((rx, conn, iface, event))));
            }
        });
        Self {
            inner: Box::pin(inner),
            _args: PhantomData,
        }
    }
}

impl<A> Stream for EventStream<A> {
    type Item = Result<A, TypedError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// How a typed method answers a call whose arguments do not convert. Either way the code is
/// JSTP's `[17]` invalid signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SignatureReply {
    /// `[17,,'argument 1: …']`: the reason goes as the error's first info item, as
    /// [`Interface::typed_method`](crate::Interface::typed_method) sends it (the default).
    #[default]
    Reason,
    /// A bare `[17]`, byte for byte what `@metarhia/jstp` sends for a wrong arity.
    Bare,
}

/// A method handler for [`Interface::method`](crate::Interface::method) with typed arguments
/// `A` (a tuple, or `()`) and a `Serialize` result, answering arguments that do not convert as
/// `reply` says; a result that does not convert answers `[16]` and is logged. This is what
/// `#[interface]` registers; [`Interface::typed_method`](crate::Interface::typed_method) is the
/// same with [`SignatureReply::Reason`].
pub fn method_handler<A, R, F, Fut>(
    method: &str,
    reply: SignatureReply,
    f: F,
) -> impl Fn(Connection, Vec<Value>) -> BoxFuture<'static, MethodResult> + Send + Sync + 'static
where
    A: DeserializeOwned,
    R: Serialize,
    F: Fn(Connection, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RemoteError>> + Send + 'static,
{
    let method = method.to_owned();
    move |conn, args| {
        // Started here, not in the future, so the method's synchronous part runs when the call
        // arrives, in arrival order (see the connection driver).
        let started = from_args::<A>(args).map(|args| f(conn, args));
        let method = method.clone();
        Box::pin(async move {
            let result = match started {
                Ok(fut) => fut.await?,
                Err(e) => {
                    return Err(match reply {
                        SignatureReply::Bare => RemoteError::code(ErrorCode::InvalidSignature),
                        SignatureReply::Reason => invalid_signature(e),
                    })
                }
            };
            tether_wire::to_value(&result).map_err(|e| {
                tracing::warn!(method, error = %e, "a typed method's result does not convert");
                RemoteError::code(ErrorCode::InternalApiError)
            })
        })
    }
}

/// Converts event arguments (a tuple, or `()`) to JSTP values, for the raw
/// [`Connection::emit`] and [`Server::broadcast`] paths; `#[interface]`'s `…_args` functions
/// call it.
pub fn event_args<T: Serialize + ?Sized>(args: &T) -> Result<Vec<Value>, TypedError> {
    to_args(args).map_err(TypedError::Arguments)
}

/// A method handler for [`Interface::method`](crate::Interface::method) that gets the call's
/// arguments as they came (any count) and answers with any `Serialize` result; a result that
/// does not convert answers `[16]` and is logged. `#[interface]` registers `#[tether(raw)]`
/// methods with it.
pub fn raw_method_handler<R, F, Fut>(
    method: &str,
    f: F,
) -> impl Fn(Connection, Vec<Value>) -> BoxFuture<'static, MethodResult> + Send + Sync + 'static
where
    R: Serialize,
    F: Fn(Connection, Vec<Value>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, RemoteError>> + Send + 'static,
{
    let method = method.to_owned();
    move |conn, args| {
        let started = f(conn, args);
        let method = method.clone();
        Box::pin(async move {
            let result = started.await?;
            tether_wire::to_value(&result).map_err(|e| {
                tracing::warn!(method, error = %e, "a raw method's result does not convert");
                RemoteError::code(ErrorCode::InternalApiError)
            })
        })
    }
}
