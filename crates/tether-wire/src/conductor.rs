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
        let value = from_bytes(bytes).map_err(|e| WireError::BadPayload(e.to_string()))?;
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
}
