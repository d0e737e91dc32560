//! Typed conductor payloads: any `Serialize` type becomes the conductor's MessagePack
//! [`Value`] and back, encoded as Holochain encodes its payloads (`rmp_serde`'s named form), as
//! `tether::to_value`/`from_value` do for JSTP.
//!
//! MessagePack is not JSTP: integers keep all 64 bits (`u64::MAX` and `i64::MIN` go through
//! exactly; `i128`/`u128` become their 16 big-endian bytes, as `rmp_serde` writes them),
//! floats may be non-finite, byte strings are `bin` (with `serde_bytes`), `()` and `None` are
//! `nil`, and structs are maps keyed by field name in declaration order (what Holochain's
//! `rmp_serde::to_vec_named` writes and `@msgpack/msgpack` reads as an object; a positional
//! array is read too). Enums are externally tagged, as serde does by default (`"Unit"`,
//! `{"Newtype": v}`).
//!
//! Holochain nests payloads: a zome call's `payload` and an app signal's `signal` are
//! MessagePack *bytes* inside the envelope's map. [`to_nested`] and [`from_nested`] do that
//! second layer: the value is encoded to bytes and carried as a `bin`.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tether::conductor::{from_nested, from_payload, to_nested, to_payload, Value};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Divide { a: f64, b: f64 }
//!
//! let v = to_payload(&Divide { a: 20.0, b: 10.0 }).unwrap();
//! assert_eq!(v, Value::Map(vec![("a".into(), 20.0.into()), ("b".into(), 10.0.into())]));
//! assert_eq!(from_payload::<Divide>(v).unwrap(), Divide { a: 20.0, b: 10.0 });
//!
//! let nested = to_nested(&u64::MAX).unwrap();
//! assert!(matches!(nested, Value::Binary(_)));
//! assert_eq!(from_nested::<u64>(nested).unwrap(), u64::MAX);
//! ```

use super::{ConductorConnection, ConductorError, Value};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::time::Duration;
use tether_wire::conductor::{from_bytes, to_bytes, WireError};

/// A conversion between a Rust type and a conductor [`Value`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The Rust value cannot be written as MessagePack (e.g. a sequence whose length is not
    /// known up front, a custom `Serialize` that fails).
    #[error("cannot encode as MessagePack: {0}")]
    Encode(#[source] rmp_serde::encode::Error),
    /// The MessagePack value does not fit the Rust type (wrong type, missing field, …).
    #[error("cannot decode from MessagePack: {0}")]
    Decode(#[source] rmp_serde::decode::Error),
    /// A nested payload was expected (MessagePack bytes in a `bin`) and something else came.
    #[error("expected a nested payload (MessagePack bytes), found {found}")]
    NotBytes {
        /// The kind of value found.
        found: &'static str,
    },
    /// The nested bytes are not one MessagePack value.
    #[error("nested payload: {0}")]
    Nested(#[source] WireError),
}

/// Converts any `Serialize` value to a conductor [`Value`].
pub fn to_payload<T: Serialize + ?Sized>(value: &T) -> Result<Value, PayloadError> {
    from_bytes(&to_nested_bytes(value)?).map_err(PayloadError::Nested)
}

/// Converts a conductor [`Value`] to any `DeserializeOwned` type.
pub fn from_payload<T: DeserializeOwned>(value: Value) -> Result<T, PayloadError> {
    // Through the bytes: `rmp_serde` reads the named and the positional struct forms.
    rmp_serde::from_slice(&to_bytes(&value)).map_err(PayloadError::Decode)
}

/// `value`'s MessagePack bytes in the named form.
fn to_nested_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PayloadError> {
    rmp_serde::to_vec_named(value).map_err(PayloadError::Encode)
}

/// Converts a value to a nested payload: its MessagePack bytes as a `bin` value, the form of a
/// zome call's `payload` or an app signal's `signal`.
pub fn to_nested<T: Serialize + ?Sized>(value: &T) -> Result<Value, PayloadError> {
    Ok(Value::Binary(to_nested_bytes(value)?))
}

/// Reads a nested payload: a `bin` holding one MessagePack value, converted to `T`. An
/// array of small integers is taken as bytes too, as JS clients that send a `number[]` do.
pub fn from_nested<T: DeserializeOwned>(value: Value) -> Result<T, PayloadError> {
    let bytes = match value {
        Value::Binary(b) => b,
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or(PayloadError::NotBytes {
                found: "an array that is not bytes",
            })?,
        other => {
            return Err(PayloadError::NotBytes {
                found: kind_of(&other),
            })
        }
    };
    // Checked to be one value first, so trailing bytes are refused as a conductor does.
    from_payload(from_bytes(&bytes).map_err(PayloadError::Nested)?)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::F32(_) | Value::F64(_) => "a float",
        Value::String(_) => "a string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Ext(..) => "an extension value",
    }
}

/// A typed conductor request failed: the arguments did not encode, the request failed, or the
/// answer does not fit the type asked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedRequestError {
    /// The arguments could not be encoded (nothing was sent).
    #[error("arguments: {0}")]
    Arguments(#[source] PayloadError),
    /// The request failed (a remote error, a timeout, a closed connection, …).
    #[error(transparent)]
    Request(#[from] ConductorError),
    /// The answer does not decode to the requested type.
    #[error("result: {0}")]
    Result(#[source] PayloadError),
}

/// Typed requests on a [`ConductorConnection`].
pub trait TypedConductor {
    /// Sends request `method` with `args` converted by [`to_payload`] and converts the answer
    /// with [`from_payload`]; `timeout` as in [`ConductorConnection::request`].
    fn request_typed<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<R, TypedRequestError>> + Send;
}

impl TypedConductor for ConductorConnection {
    fn request_typed<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<R, TypedRequestError>> + Send {
        let args = to_payload(args);
        async move {
            let args = args.map_err(TypedRequestError::Arguments)?;
            let answer = self.request(method, args, timeout).await?;
            from_payload(answer).map_err(TypedRequestError::Result)
        }
    }
}

/// A handler for [`ConductorServerBuilder::handler`](super::ConductorServerBuilder::handler)
/// with typed arguments and result. Arguments that do not decode answer the conductor's
/// `deserialization` error, saying why; a result that does not encode answers
/// `internal_error`. `f`'s own errors are `(kind, message)` pairs, as the builder's.
pub fn typed_handler<A, R, F, Fut>(
    f: F,
) -> impl Fn(Value) -> BoxFuture<'static, Result<Value, (String, String)>> + Send + Sync + 'static
where
    A: DeserializeOwned,
    R: Serialize,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, (String, String)>> + Send + 'static,
{
    move |args| {
        let started = from_payload::<A>(args).map(&f);
        Box::pin(async move {
            let result = match started {
                Ok(fut) => fut.await?,
                Err(e) => return Err(("deserialization".to_owned(), e.to_string())),
            };
            to_payload(&result).map_err(|e| ("internal_error".to_owned(), e.to_string()))
        })
    }
}
