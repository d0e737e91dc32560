//! The Holochain conductor's WebSocket envelope and payloads, sans IO (see
//! `docs/conductor-wire.md`).
//!
//! Every WebSocket binary message is one MessagePack map: `type` (`"request"`, `"response"`,
//! `"signal"` or `"authenticate"`), `id` (an unsigned integer; requests and responses only) and
//! `data` (binary: the MessagePack encoding of the payload; a response's `data` may be nil,
//! meaning cancelled).
//!
//! Payloads are adjacently tagged maps in one of two [`Dialect`]s: `{type, value}` (Holochain 0.5
//! and later) or `{type, data}` (0.1–0.4). Errors are `{type: "error", value: {type: <kind>,
//! value: <message>}}` (or the same with `data`).
//!
//! ```
//! use tether_wire::conductor::{Dialect, WireMessage};
//! use rmpv::Value;
//!
//! let msg = WireMessage::Request { id: 7, data: Dialect::Value.payload("answer", Value::Nil) };
//! let bytes = msg.encode();
//! assert_eq!(WireMessage::decode(&bytes).unwrap(), msg);
//! ```

pub use rmpv::Value;
use thiserror::Error;

/// Why a frame is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
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
    /// A payload inside `data` is not MessagePack, or not a `{type, value|data}` map.
    #[error("bad payload: {0}")]
    BadPayload(String),
    /// Decoding would cost more memory than [`decode_budget`] allows for its size (many tiny
    /// values: each decoded value takes `size_of::<Value>()` bytes whatever its encoded size).
    /// Refused before anything is built.
    #[error(
        "decoding would take about {cost} bytes, over the budget of {budget} for this message"
    )]
    TooCostly {
        /// The estimated memory of the decoded value, in bytes.
        cost: usize,
        /// The budget for a message of this size ([`decode_budget`]).
        budget: usize,
    },
}

/// Memory a decoded value may take per encoded byte (see [`decode_budget`]).
pub const DECODE_BUDGET_FACTOR: usize = 4;

/// Memory any message may take when decoded, whatever its size (see [`decode_budget`]); lets
/// small messages of tiny values through (an `authenticate` token is an array of integers).
pub const DECODE_BUDGET_FLOOR: usize = 64 * 1024;

/// Most memory [`from_bytes`] lets a message of `len` bytes take once decoded:
/// `DECODE_BUDGET_FACTOR × len + DECODE_BUDGET_FLOOR` (4 × len + 64 KiB). The estimate counts
/// `size_of::<Value>()` per value plus the bytes of strings, binaries and extensions; growing
/// vectors may briefly hold up to twice that. Without it 16 MiB of MessagePack nils (one byte
/// each) would decode into 16 M values of 32 bytes and more (issue 17's probe measured 40×).
pub fn decode_budget(len: usize) -> usize {
    len.saturating_mul(DECODE_BUDGET_FACTOR)
        .saturating_add(DECODE_BUDGET_FLOOR)
}

/// The memory decoding `bytes` would take (values and their heap bytes), computed by walking
/// the encoding without building anything; stops early once over `budget`. Errors on truncated
/// input or nesting deeper than `max_depth`.
fn decode_cost(bytes: &[u8], max_depth: usize, budget: usize) -> Result<usize, WireError> {
    let value_size = std::mem::size_of::<Value>();
    let truncated = || WireError::NotMsgpack("truncated MessagePack".into());
    let mut pos = 0usize;
    let mut cost = 0usize;
    // Values still to read in each open container; the outermost "container" holds one value.
    let mut pending: Vec<u64> = vec![1];
    let read = |pos: &mut usize, n: usize| -> Result<u64, WireError> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(truncated)?;
        let v = bytes[*pos..end]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        *pos = end;
        Ok(v)
    };
    while let Some(left) = pending.last_mut() {
        if *left == 0 {
            pending.pop();
            continue;
        }
        *left -= 1;
        let marker = *bytes.get(pos).ok_or_else(truncated)?;
        pos += 1;
        cost = cost.saturating_add(value_size);
        // (heap bytes to skip, child values to read)
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (read(&mut pos, 1)?, 0),
            0xc5 | 0xda => (read(&mut pos, 2)?, 0),
            0xc6 | 0xdb => (read(&mut pos, 4)?, 0),
            0xc7 => (read(&mut pos, 1)? + 1, 0),
            0xc8 => (read(&mut pos, 2)? + 1, 0),
            0xc9 => (read(&mut pos, 4)? + 1, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, read(&mut pos, 2)?),
            0xdd => (0, read(&mut pos, 4)?),
            0xde => (0, 2 * read(&mut pos, 2)?),
            0xdf => (0, 2 * read(&mut pos, 4)?),
            0xc1 => return Err(WireError::NotMsgpack("reserved marker 0xc1".into())),
        };
        // Fixed-size scalars live inside the value; strings, binaries and extensions own a
        // heap buffer of their length.
        let heap = matches!(marker, 0xa0..=0xbf | 0xc4..=0xc9 | 0xd4..=0xd9 | 0xda | 0xdb);
        let skip = usize::try_from(skip).map_err(|_| truncated())?;
        if heap {
            cost = cost.saturating_add(skip);
        }
        pos = pos
            .checked_add(skip)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(truncated)?;
        if cost > budget {
            return Err(WireError::TooCostly { cost, budget });
        }
        if children > 0 {
            if pending.len() > max_depth {
                return Err(WireError::NotMsgpack("nested too deeply".into()));
            }
            pending.push(children);
        }
    }
    Ok(cost)
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
///
/// Refuses, before building anything, a message whose decoded form would take more than
/// [`decode_budget`] bytes ([`WireError::TooCostly`]).
pub fn from_bytes(bytes: &[u8]) -> Result<Value, WireError> {
    decode_cost(bytes, 256, decode_budget(bytes.len()))?;
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

/// A request payload `{type: method, data: args}` (the 0.1–0.4 dialect), encoded.
pub fn request_payload(method: &str, args: Value) -> Vec<u8> {
    to_bytes(&Value::Map(vec![
        ("type".into(), method.into()),
        ("data".into(), args),
    ]))
}

/// A successful response payload `{type: kind, data: result}` (0.1–0.4), encoded.
pub fn response_payload(kind: &str, result: Value) -> Vec<u8> {
    request_payload(kind, result)
}

/// An error response payload `{type: "error", data: {type: kind, data: message}}` (0.1–0.4),
/// encoded.
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

/// A `{type, data}` or `{type, value}` payload, decoded: the type and the content (nil when
/// absent). The type may also be in map form (`{type: {answer: null}}`).
pub fn split_payload(bytes: &[u8]) -> Result<(String, Value), WireError> {
    Payload::decode(bytes).map(|p| (p.kind, p.content))
}

/// Which payload convention a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Dialect {
    /// `{type, value}`: Holochain 0.5 and later, `@holochain/client`.
    #[default]
    Value,
    /// `{type, data}`: Holochain 0.1–0.4, `@whi/holochain-websocket`,
    /// `@spartan-hc/holochain-websocket`.
    Data,
}

impl Dialect {
    /// The key holding a payload's content.
    pub fn key(self) -> &'static str {
        match self {
            Dialect::Value => "value",
            Dialect::Data => "data",
        }
    }

    /// `{type: kind, <key>: content}` as a value.
    pub fn tagged(self, kind: &str, content: Value) -> Value {
        Value::Map(vec![
            ("type".into(), kind.into()),
            (self.key().into(), content),
        ])
    }

    /// A request or success payload `{type: kind, <key>: content}`, encoded.
    pub fn payload(self, kind: &str, content: Value) -> Vec<u8> {
        to_bytes(&self.tagged(kind, content))
    }

    /// An error payload `{type: "error", <key>: {type: kind, <key>: message}}`, encoded.
    pub fn error(self, kind: &str, message: &str) -> Vec<u8> {
        to_bytes(&self.tagged("error", self.tagged(kind, message.into())))
    }

    /// An app signal's payload: `{type: "app", value: {cell_id, zome_name, signal}}` (0.5+) or
    /// `{App: {cell_id, zome_name, signal}}` (0.1–0.4). `signal` is the MessagePack encoding of
    /// the app's signal, carried as binary.
    pub fn app_signal(self, cell_id: &CellId, zome_name: &str, signal: &Value) -> Vec<u8> {
        let body = Value::Map(vec![
            (
                "cell_id".into(),
                Value::Array(vec![
                    Value::Binary(cell_id.dna_hash.clone()),
                    Value::Binary(cell_id.agent_pub_key.clone()),
                ]),
            ),
            ("zome_name".into(), zome_name.into()),
            ("signal".into(), Value::Binary(to_bytes(signal))),
        ]);
        match self {
            Dialect::Value => self.payload("app", body),
            Dialect::Data => to_bytes(&Value::Map(vec![("App".into(), body)])),
        }
    }
}

impl Dialect {
    /// A system signal's payload: `{type: "system", value: signal}` (0.5+) or `{System:
    /// signal}` (0.1–0.4), where `signal` is itself tagged as the conductor's `SystemSignal`
    /// is (for example `{type: "successful_countersigning", value: <entry hash>}`).
    pub fn system_signal(self, signal: Value) -> Vec<u8> {
        match self {
            Dialect::Value => self.payload("system", signal),
            Dialect::Data => to_bytes(&Value::Map(vec![("System".into(), signal)])),
        }
    }
}

/// A cell: the DNA hash and the agent key, 39 bytes each on a real conductor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellId {
    /// The DNA hash (`84 2d 24` + 32 bytes + 4 bytes of DHT location).
    pub dna_hash: Vec<u8>,
    /// The agent's public key (`84 20 24` + 32 bytes + 4 bytes of DHT location).
    pub agent_pub_key: Vec<u8>,
}

/// A decoded request or response payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// The tag (`type`), from a string or the single key of a map.
    pub kind: String,
    /// The content, nil when absent.
    pub content: Value,
    /// The dialect the content key revealed; `None` for a unit payload (`{type}` alone).
    pub dialect: Option<Dialect>,
}

impl Payload {
    /// Reads `{type, value}`, `{type, data}` or `{type}`, with `type` a string or in map form
    /// (`{answer: null}`, as rmp-serde writes externally tagged unit variants).
    pub fn decode(bytes: &[u8]) -> Result<Payload, WireError> {
        let value = from_bytes(bytes).map_err(|e| match e {
            e @ WireError::TooCostly { .. } => e,
            e => WireError::BadPayload(format!("not MessagePack: {e}")),
        })?;
        Payload::from_value(value)
    }

    /// As [`Payload::decode`], from a decoded value.
    pub fn from_value(value: Value) -> Result<Payload, WireError> {
        let Value::Map(entries) = value else {
            return Err(WireError::BadPayload("payload is not a map".into()));
        };
        let (mut kind, mut content, mut dialect) = (None, Value::Nil, None);
        for (k, v) in entries {
            match k.as_str() {
                Some("type") => kind = tag_of(v),
                // `value` wins when both are present: it is what a 0.5+ conductor reads.
                Some("value") => {
                    content = v;
                    dialect = Some(Dialect::Value);
                }
                Some("data") if dialect != Some(Dialect::Value) => {
                    content = v;
                    dialect = Some(Dialect::Data);
                }
                _ => {}
            }
        }
        let kind = kind.ok_or_else(|| WireError::BadPayload("payload without a type".into()))?;
        Ok(Payload {
            kind,
            content,
            dialect,
        })
    }
}

fn tag_of(v: Value) -> Option<String> {
    match v {
        Value::String(s) => s.into_str(),
        Value::Map(mut m) if m.len() == 1 => {
            m.pop().and_then(|(k, _)| k.as_str().map(str::to_owned))
        }
        _ => None,
    }
}

/// The `authenticate` message's payload `{token: [u8…]}` (an array of integers, as the
/// conductor's `AppAuthenticationRequest` has no `serde_bytes`), encoded.
pub fn authenticate_payload(token: &[u8]) -> Vec<u8> {
    let token = token.iter().map(|b| Value::from(*b)).collect();
    to_bytes(&Value::Map(vec![("token".into(), Value::Array(token))]))
}

/// The token of an `authenticate` payload; an array of integers 0–255 or binary.
pub fn authenticate_token(bytes: &[u8]) -> Result<Vec<u8>, WireError> {
    let bad = |m: &str| WireError::BadPayload(m.to_owned());
    let Value::Map(entries) = from_bytes(bytes)? else {
        return Err(bad("authenticate payload is not a map"));
    };
    let token = entries
        .into_iter()
        .find(|(k, _)| k.as_str() == Some("token"))
        .map(|(_, v)| v)
        .ok_or_else(|| bad("authenticate payload without a token"))?;
    match token {
        Value::Binary(b) => Ok(b),
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_u64().and_then(|n| u8::try_from(n).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| bad("token is not an array of bytes")),
        _ => Err(bad("token is not an array of bytes")),
    }
}

/// Any envelope, including `authenticate` (`{type: "authenticate", data: <bin>}`), which only a
/// client sends and only as its first message on an app interface.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// A request, response or signal.
    Message(WireMessage),
    /// An `authenticate` message; `data` is an [`authenticate_payload`].
    Authenticate {
        /// MessagePack bytes of the payload.
        data: Vec<u8>,
    },
}

impl Envelope {
    /// The envelope as MessagePack bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Envelope::Message(m) => m.encode(),
            Envelope::Authenticate { data } => to_bytes(&Value::Map(vec![
                ("type".into(), "authenticate".into()),
                ("data".into(), Value::Binary(data.clone())),
            ])),
        }
    }

    /// Reads an envelope of any kind.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
        match WireMessage::decode(bytes) {
            Ok(m) => Ok(Envelope::Message(m)),
            Err(WireError::UnknownType(t)) if t == "authenticate" => {
                let data = match from_bytes(bytes)? {
                    Value::Map(entries) => entries
                        .into_iter()
                        .find(|(k, _)| k.as_str() == Some("data"))
                        .map(|(_, v)| v),
                    _ => None,
                };
                match data {
                    Some(Value::Binary(data)) => Ok(Envelope::Authenticate { data }),
                    _ => Err(WireError::MissingData("authenticate")),
                }
            }
            Err(e) => Err(e),
        }
    }
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

    #[test]
    fn dialects_and_tag_forms() {
        // 0.5+: `{type, value}`; the crate's bytes for `{type:"answer", value:42}`.
        assert_eq!(
            Dialect::Value.payload("answer", 42.into()),
            b"\x82\xa4type\xa6answer\xa5value\x2a".to_vec()
        );
        assert_eq!(
            Dialect::Data.payload("answer", 42.into()),
            request_payload("answer", 42.into())
        );
        let spartan = to_bytes(&Value::Map(vec![
            (
                "type".into(),
                Value::Map(vec![("divide".into(), Value::Nil)]),
            ),
            ("data".into(), 1.into()),
        ]));
        let p = Payload::decode(&spartan).unwrap();
        assert_eq!(
            (p.kind.as_str(), p.content, p.dialect),
            ("divide", Value::from(1), Some(Dialect::Data))
        );
        let unit = to_bytes(&Value::Map(vec![("type".into(), "app_info".into())]));
        assert_eq!(Payload::decode(&unit).unwrap().dialect, None);
        let err = Payload::decode(&Dialect::Value.error("internal_error", "boom")).unwrap();
        assert_eq!(err.kind, "error");
        let inner = Payload::from_value(err.content).unwrap();
        assert_eq!(
            (inner.kind.as_str(), inner.content, inner.dialect),
            ("internal_error", Value::from("boom"), Some(Dialect::Value))
        );
        let two_keys = to_bytes(&Value::Map(vec![
            ("type".into(), "x".into()),
            ("data".into(), 1.into()),
            ("value".into(), 2.into()),
        ]));
        assert_eq!(Payload::decode(&two_keys).unwrap().content, Value::from(2));
    }

    #[test]
    fn authenticate_is_the_conductors_encoding() {
        // `81 a5"token" 93 01 02 03`, as the research notes measured from the crate.
        assert_eq!(
            authenticate_payload(&[1, 2, 3]),
            b"\x81\xa5token\x93\x01\x02\x03".to_vec()
        );
        assert_eq!(
            authenticate_token(&authenticate_payload(&[0, 255])).unwrap(),
            vec![0, 255]
        );
        let bad = to_bytes(&Value::Map(vec![(
            "token".into(),
            Value::Array(vec![256.into()]),
        )]));
        assert!(authenticate_token(&bad).is_err());
        let msg = Envelope::Authenticate { data: vec![0xc0] };
        // The crate's bytes: `82 a4"type" ac"authenticate" a4"data" c4 01 c0`.
        assert_eq!(
            msg.encode(),
            b"\x82\xa4type\xacauthenticate\xa4data\xc4\x01\xc0".to_vec()
        );
        assert_eq!(Envelope::decode(&msg.encode()).unwrap(), msg);
        assert!(matches!(
            Envelope::decode(&WireMessage::Signal { data: vec![0xc0] }.encode()),
            Ok(Envelope::Message(WireMessage::Signal { .. }))
        ));
        let no_data = to_bytes(&Value::Map(vec![("type".into(), "authenticate".into())]));
        assert_eq!(
            Envelope::decode(&no_data),
            Err(WireError::MissingData("authenticate"))
        );
    }

    #[test]
    fn app_signals_in_both_shapes() {
        let cell = CellId {
            dna_hash: vec![1],
            agent_pub_key: vec![2],
        };
        let signal = Value::from("hi");
        let new = from_bytes(&Dialect::Value.app_signal(&cell, "chat", &signal)).unwrap();
        let p = Payload::from_value(new).unwrap();
        assert_eq!(p.kind, "app");
        let body = p.content.as_map().unwrap().clone();
        assert_eq!(body[1], ("zome_name".into(), "chat".into()));
        assert_eq!(body[2], ("signal".into(), Value::Binary(to_bytes(&signal))));
        let old = from_bytes(&Dialect::Data.app_signal(&cell, "chat", &signal)).unwrap();
        assert_eq!(old, Value::Map(vec![("App".into(), Value::Map(body))]));
    }

    /// 16 MiB of nils (issue 17's probe) is refused before it is built; the same bytes as one
    /// binary pass; small messages of tiny values pass under the floor.
    #[test]
    fn decoding_is_refused_over_its_memory_budget() {
        let n = 16 << 20;
        let mut nils = vec![0xdd];
        nils.extend_from_slice(&(n as u32).to_be_bytes());
        nils.resize(5 + n, 0xc0);
        match from_bytes(&nils) {
            Err(WireError::TooCostly { cost, budget }) => {
                assert_eq!(budget, decode_budget(nils.len()));
                assert!(cost > budget, "{cost} <= {budget}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        match Payload::decode(&nils) {
            Err(WireError::TooCostly { .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut bin = vec![0xc6];
        bin.extend_from_slice(&(n as u32).to_be_bytes());
        bin.resize(5 + n, 0xc0);
        assert_eq!(
            from_bytes(&bin).unwrap().as_slice().map(<[u8]>::len),
            Some(n)
        );
        let token = authenticate_payload(&[7; 1024]);
        assert_eq!(authenticate_token(&token).unwrap(), vec![7; 1024]);
    }

    /// The walk agrees with the decoder on what is truncated, and counts every kind of marker.
    #[test]
    fn the_cost_walk_covers_every_marker() {
        let value = Value::Map(vec![
            ("s".into(), "x".repeat(300).into()),
            ("b".into(), Value::Binary(vec![1; 70_000])),
            (
                "i".into(),
                Value::Array(vec![
                    (-1).into(),
                    300.into(),
                    (-40_000).into(),
                    u64::MAX.into(),
                ]),
            ),
            (
                "f".into(),
                Value::Array(vec![
                    Value::F32(1.5),
                    Value::F64(2.5),
                    true.into(),
                    Value::Nil,
                ]),
            ),
            (
                "e".into(),
                Value::Array((0..20).map(|n| Value::Ext(3, vec![0; n])).collect()),
            ),
            (
                "m".into(),
                Value::Map((0..20).map(|n| (n.into(), n.into())).collect()),
            ),
        ]);
        let bytes = to_bytes(&value);
        assert_eq!(from_bytes(&bytes).unwrap(), value);
        for cut in [1, 10, 400, bytes.len() - 1] {
            assert!(from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let cost = decode_cost(&bytes, 256, usize::MAX).unwrap();
        assert!(cost >= 70_300, "{cost}");
        assert!(cost <= 4 * bytes.len(), "{cost} for {} bytes", bytes.len());
        // A declared length far past the end is an error, not an allocation.
        assert!(from_bytes(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(from_bytes(&[0xc6, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn system_signals_in_both_dialects() {
        let inner = Value::Map(vec![("type".into(), "restore_complete".into())]);
        let latest = from_bytes(&Dialect::Value.system_signal(inner.clone())).unwrap();
        assert_eq!(latest, Dialect::Value.tagged("system", inner.clone()));
        let older = from_bytes(&Dialect::Data.system_signal(inner.clone())).unwrap();
        assert_eq!(older, Value::Map(vec![("System".into(), inner)]));
    }
}
