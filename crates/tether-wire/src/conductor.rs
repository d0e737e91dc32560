//! The Holochain conductor's WebSocket envelope, sans IO (see `docs/conductor-wire.md`).
//!
//! Every WebSocket binary message is one MessagePack map: `type` (`"request"`, `"response"` or
//! `"signal"`), `id` (an unsigned integer; requests and responses only) and `data` (binary: the
//! MessagePack encoding of the payload; a response's `data` may be nil, meaning cancelled).
//! Requests carry `{type: <method>, data: <args>}` payloads; responses carry `{type: <kind>,
//! data: <result>}` or, for errors, `{type: "error", data: {type: <error kind>, data: <message>}}`.
//!
//! ```
//! use tether_wire::conductor::{request_payload, WireMessage};
//! use rmpv::Value;
//!
//! let msg = WireMessage::Request { id: 7, data: request_payload("answer", Value::Nil) };
//! let bytes = msg.encode();
//! assert_eq!(WireMessage::decode(&bytes).unwrap(), msg);
//! ```

pub use rmpv::Value;
use thiserror::Error;

/// Why a frame is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Not MessagePack, or trailing bytes after the value.
    #[error("not a MessagePack value: {0}")]
    NotMsgpack(String),
    /// The value is not a map.
    #[error("envelope is not a map")]
    NotAMap,
    /// `type` is missing or not a known kind.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A request or response without a valid `id`.
    #[error("{0} without a valid id")]
    MissingId(&'static str),
    /// `data` is missing or not binary.
    #[error("{0} without binary data")]
    MissingData(&'static str),
    /// A payload inside `data` is not MessagePack.
    #[error("payload is not MessagePack: {0}")]
    BadPayload(String),
}

/// One envelope.
#[derive(Debug, Clone, PartialEq)]
pub enum WireMessage {
    /// A message without a response.
    Signal {
        /// MessagePack bytes of the payload.
        data: Vec<u8>,
    },
    /// A request awaiting a response with the same id.
    Request {
        /// The request id.
        id: u64,
        /// MessagePack bytes of the payload.
        data: Vec<u8>,
    },
    /// The response to request `id`; `None` means the request was cancelled.
    Response {
        /// The request id.
        id: u64,
        /// MessagePack bytes of the payload.
        data: Option<Vec<u8>>,
    },
}

/// Encodes a value as MessagePack bytes.
pub fn to_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, value);
    out
}

/// Decodes exactly one MessagePack value from `bytes`.
pub fn from_bytes(bytes: &[u8]) -> Result<Value, WireError> {
    let mut cursor = bytes;
    let value = rmpv::decode::read_value_with_max_depth(&mut cursor, 256)
        .map_err(|e| WireError::NotMsgpack(e.to_string()))?;
    if !cursor.is_empty() {
        return Err(WireError::NotMsgpack(format!(
            "{} bytes after the value",
            cursor.len()
        )));
    }
    Ok(value)
}

/// A request payload `{type: method, data: args}`, encoded.
pub fn request_payload(method: &str, args: Value) -> Vec<u8> {
    to_bytes(&Value::Map(vec![
        ("type".into(), method.into()),
        ("data".into(), args),
    ]))
}

/// A successful response payload `{type: kind, data: result}`, encoded.
pub fn response_payload(kind: &str, result: Value) -> Vec<u8> {
    request_payload(kind, result)
}

/// An error response payload `{type: "error", data: {type: kind, data: message}}`, encoded.
pub fn error_payload(kind: &str, message: &str) -> Vec<u8> {
    to_bytes(&Value::Map(vec![
        ("type".into(), "error".into()),
        (
            "data".into(),
            Value::Map(vec![
                ("type".into(), kind.into()),
                ("data".into(), message.into()),
            ]),
        ),
    ]))
}

/// A `{type, data}` payload, decoded: the type string and the data (nil when absent).
pub fn split_payload(bytes: &[u8]) -> Result<(String, Value), WireError> {
    let value = from_bytes(bytes).map_err(|e| WireError::BadPayload(e.to_string()))?;
    let Value::Map(entries) = value else {
        return Err(WireError::BadPayload("payload is not a map".into()));
    };
    let mut kind = None;
    let mut data = Value::Nil;
    for (k, v) in entries {
        match k.as_str() {
            Some("type") => kind = v.as_str().map(str::to_owned),
            Some("data") => data = v,
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| WireError::BadPayload("payload without a type".into()))?;
    Ok((kind, data))
}

impl WireMessage {
    /// The envelope as MessagePack bytes: a map `type`, `id` (if any), `data`.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, id, data) = match self {
            WireMessage::Signal { data } => ("signal", None, Value::Binary(data.clone())),
            WireMessage::Request { id, data } => {
                ("request", Some(*id), Value::Binary(data.clone()))
            }
            WireMessage::Response { id, data } => (
                "response",
                Some(*id),
                data.clone().map_or(Value::Nil, Value::Binary),
            ),
        };
        let mut map = vec![("type".into(), kind.into())];
        if let Some(id) = id {
            map.push(("id".into(), id.into()));
        }
        map.push(("data".into(), data));
        to_bytes(&Value::Map(map))
    }

    /// Reads an envelope. Type names are accepted in any case (older clients capitalise them).
    pub fn decode(bytes: &[u8]) -> Result<WireMessage, WireError> {
        let Value::Map(entries) = from_bytes(bytes)? else {
            return Err(WireError::NotAMap);
        };
        let (mut kind, mut id, mut data) = (None, None, None);
        for (k, v) in entries {
            match k.as_str() {
                Some("type") => kind = Some(v),
                Some("id") => id = Some(v),
                Some("data") => data = Some(v),
                _ => {}
            }
        }
        let kind = kind
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        let id_of = |what| {
            id.as_ref()
                .and_then(Value::as_u64)
                .ok_or(WireError::MissingId(what))
        };
        let bytes_of = |what, d: Option<Value>| match d {
            Some(Value::Binary(b)) => Ok(b),
            _ => Err(WireError::MissingData(what)),
        };
        match kind.as_str() {
            "signal" => Ok(WireMessage::Signal {
                data: bytes_of("signal", data)?,
            }),
            "request" => Ok(WireMessage::Request {
                id: id_of("request")?,
                data: bytes_of("request", data)?,
            }),
            "response" => Ok(WireMessage::Response {
                id: id_of("response")?,
                data: match data {
                    None | Some(Value::Nil) => None,
                    other => Some(bytes_of("response", other)?),
                },
            }),
            _ => Err(WireError::UnknownType(kind)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{type:"request",id:0,data:<{type:"answer",data:nil}>}` as the npm client and the crate
    /// encode it (keys in this crate's order; decoding ignores order).
    #[test]
    fn request_vector() {
        let payload = request_payload("answer", Value::Nil);
        assert_eq!(
            payload,
            b"\x82\xa4type\xa6answer\xa4data\xc0".to_vec(),
            "payload"
        );
        let msg = WireMessage::Request {
            id: 0,
            data: payload.clone(),
        };
        let mut expected = b"\x83\xa4type\xa7request\xa2id\x00\xa4data\xc4".to_vec();
        expected.push(payload.len() as u8);
        expected.extend_from_slice(&payload);
        assert_eq!(msg.encode(), expected);
        // The npm client writes `type`, `data`, then `id`.
        let mut npm = b"\x83\xa4type\xa7request\xa4data\xc4".to_vec();
        npm.push(payload.len() as u8);
        npm.extend_from_slice(&payload);
        npm.extend_from_slice(b"\xa2id\x00");
        assert_eq!(WireMessage::decode(&npm).unwrap(), msg);
    }

    #[test]
    fn responses_signals_and_errors_round_trip() {
        for msg in [
            WireMessage::Signal {
                data: to_bytes(&Value::from("hi")),
            },
            WireMessage::Response {
                id: u64::MAX,
                data: Some(error_payload("internal_error", "boom")),
            },
            WireMessage::Response { id: 3, data: None },
        ] {
            assert_eq!(WireMessage::decode(&msg.encode()).unwrap(), msg);
        }
        let (kind, data) = split_payload(&error_payload("deserialization", "bad")).unwrap();
        assert_eq!(kind, "error");
        assert_eq!(
            split_payload(&to_bytes(&data)).unwrap().0,
            "deserialization"
        );
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        assert!(WireMessage::decode(b"\xc1").is_err());
        assert!(matches!(
            WireMessage::decode(b"\xa5ab"),
            Err(WireError::NotMsgpack(_))
        ));
        assert!(matches!(
            WireMessage::decode(b"\x01\x02"),
            Err(WireError::NotMsgpack(_))
        ));
        assert_eq!(WireMessage::decode(b"\x01"), Err(WireError::NotAMap));
        let no_id = to_bytes(&Value::Map(vec![
            ("type".into(), "request".into()),
            ("data".into(), Value::Binary(vec![0xc0])),
        ]));
        assert_eq!(
            WireMessage::decode(&no_id),
            Err(WireError::MissingId("request"))
        );
        let unknown = to_bytes(&Value::Map(vec![("type".into(), "gossip".into())]));
        assert_eq!(
            WireMessage::decode(&unknown),
            Err(WireError::UnknownType("gossip".into()))
        );
        let capitalised = to_bytes(&Value::Map(vec![
            ("type".into(), "Signal".into()),
            ("data".into(), Value::Binary(vec![0xc0])),
        ]));
        assert!(matches!(
            WireMessage::decode(&capitalised),
            Ok(WireMessage::Signal { .. })
        ));
        // Deep nesting is refused, not a stack overflow.
        let deep = vec![0x91u8; 100_000];
        assert!(WireMessage::decode(&deep).is_err());
    }
}
