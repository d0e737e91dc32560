//! The JSTP message model: what each kind of message means, and its exact wire form.
//!
//! A message is one object: its first key is the kind (`call`, `callback`, …) holding a header
//! array `[id, target?, version?]`; its second key is the verb (a method, event, `ok`, `error`,
//! an auth strategy) holding the payload. Keys after the second are ignored, as upstream does.

use crate::error::RemoteErrorArray;
use crate::parse::{parse, ParseError};
use crate::ser::{write_array, write_string_literal, write_value};
use crate::value::{Object, Value};
use thiserror::Error;

/// How a client authenticates in its handshake.
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// No verb: a new anonymous session.
    Anonymous,
    /// `login:[user, password]`.
    Login {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// `session:[sessionId, receivedCount]`: restore a session.
    Session {
        /// The session id the server gave earlier.
        id: String,
        /// How many of the server's messages the client received (abs of the last id).
        received: u64,
    },
    /// Any other strategy: passed to the server's auth policy as is.
    Custom {
        /// The strategy name (the verb).
        strategy: String,
        /// Its payload.
        credentials: Value,
    },
}

impl Auth {
    /// The strategy name as upstream reports it (`anonymous`, `login`, `session`, or custom).
    pub fn strategy(&self) -> &str {
        match self {
            Auth::Anonymous => "anonymous",
            Auth::Login { .. } => "login",
            Auth::Session { .. } => "session",
            Auth::Custom { strategy, .. } => strategy,
        }
    }
}

/// The outcome carried by a handshake response.
#[derive(Debug, Clone, PartialEq)]
pub enum HandshakeResult {
    /// `ok:'<uuid>'`: a new session with this id.
    NewSession(String),
    /// `ok:<n>`: the session was restored; the server received `n` of the client's messages.
    Restored(u64),
    /// `ok` with some other value (kept for tolerance).
    OtherOk(Value),
    /// `error:[code, …]`.
    Error(RemoteErrorArray),
}

/// The payload of a callback.
#[derive(Debug, Clone, PartialEq)]
pub enum CallbackResult {
    /// `ok:[results…]` (a non-array `ok` is kept as a one-element result).
    Ok(Vec<Value>),
    /// `error:[code, …]`.
    Error(RemoteErrorArray),
    /// Neither key: upstream drops such callbacks.
    Empty,
}

/// One JSTP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `{}`: the legacy heartbeat, ignored everywhere.
    Heartbeat,
    /// A client's handshake (`header[1]` truthy).
    HandshakeRequest {
        /// The message id (always 0 from conforming clients).
        id: i64,
        /// The application name.
        app: String,
        /// The requested version or range, if any.
        version: Option<String>,
        /// How the client authenticates.
        auth: Auth,
    },
    /// A server's handshake reply.
    HandshakeResponse {
        /// The message id (0).
        id: i64,
        /// Session created, restored, or an error.
        result: HandshakeResult,
    },
    /// A remote method call.
    Call {
        /// Request id.
        id: i64,
        /// Interface name.
        iface: String,
        /// Method name.
        method: String,
        /// The arguments as received; must be an array to be valid.
        args: Value,
    },
    /// A reply to a call or inspect.
    Callback {
        /// The id of the request answered.
        id: i64,
        /// The result.
        result: CallbackResult,
    },
    /// A remote event.
    Event {
        /// Message id.
        id: i64,
        /// Interface name.
        iface: String,
        /// Event name.
        event: String,
        /// The arguments as received; must be an array to be valid.
        args: Value,
    },
    /// A request for an interface's method names.
    Inspect {
        /// Request id.
        id: i64,
        /// Interface name.
        iface: String,
    },
    /// A ping.
    Ping {
        /// Request id.
        id: i64,
    },
    /// The reply to a ping.
    Pong {
        /// The ping's id.
        id: i64,
    },
    /// A kind tether doesn't implement (`state`, `stream`, `health`, …): rejected by receivers.
    Unknown {
        /// The kind key.
        kind: String,
        /// The id, if the header had one.
        id: Option<i64>,
    },
}

/// Why a parsed value is not a usable JSTP message.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DecodeError {
    /// The text is not valid record serialization.
    #[error("parse error: {0}")]
    Parse(#[from] ParseError),
    /// The top-level value is not an object.
    #[error("message is not an object")]
    NotAnObject,
    /// The kind's value is not an array.
    #[error("header of '{0}' message is not an array")]
    BadHeader(String),
    /// The header has no integer id.
    #[error("header of '{0}' message has no integer id")]
    BadId(String),
    /// A target (interface or application name) is missing or not a string.
    #[error("'{0}' message has no target name")]
    MissingTarget(String),
    /// A call or event without a method/event name.
    #[error("'{0}' message has no verb")]
    MissingVerb(String),
    /// A handshake credential payload has the wrong shape.
    #[error("malformed credentials for strategy '{0}'")]
    BadCredentials(String),
}

impl Message {
    /// Parses one message from its text.
    pub fn parse(text: &str) -> Result<Message, DecodeError> {
        let value = parse(text)?;
        Message::from_value(&value)
    }

    /// Classifies a parsed value.
    pub fn from_value(value: &Value) -> Result<Message, DecodeError> {
        let obj = value.as_object().ok_or(DecodeError::NotAnObject)?;
        let mut keys = obj.iter();
        let Some((kind, header)) = keys.next() else {
            return Ok(Message::Heartbeat);
        };
        let verb = keys.next();
        let header = header
            .as_array()
            .ok_or_else(|| DecodeError::BadHeader(kind.to_owned()))?;
        let id = header.first().and_then(Value::as_i64);
        let need_id = || id.ok_or_else(|| DecodeError::BadId(kind.to_owned()));
        let target = || match header.get(1) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(DecodeError::MissingTarget(kind.to_owned())),
        };
        Ok(match kind {
            "handshake" => {
                let id = need_id()?;
                if header.get(1).is_some_and(Value::is_truthy) {
                    let app = target()?;
                    let version = match header.get(2) {
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Undefined | Value::Null) | None => None,
                        Some(other) => Some(other.to_mdsf()),
                    };
                    let auth = match verb {
                        None => Auth::Anonymous,
                        Some(("login", creds)) => {
                            let c = creds.as_array();
                            match c.map(|c| (c.first(), c.get(1))) {
                                Some((Some(Value::String(u)), Some(Value::String(p)))) => {
                                    Auth::Login {
                                        user: u.clone(),
                                        password: p.clone(),
                                    }
                                }
                                _ => return Err(DecodeError::BadCredentials("login".into())),
                            }
                        }
                        Some(("session", creds)) => {
                            let c = creds.as_array();
                            match c.map(|c| (c.first(), c.get(1).and_then(Value::as_i64))) {
                                Some((Some(Value::String(sid)), Some(n))) if n >= 0 => {
                                    Auth::Session {
                                        id: sid.clone(),
                                        received: n as u64,
                                    }
                                }
                                _ => return Err(DecodeError::BadCredentials("session".into())),
                            }
                        }
                        Some((strategy, creds)) => Auth::Custom {
                            strategy: strategy.to_owned(),
                            credentials: creds.clone(),
                        },
                    };
                    Message::HandshakeRequest {
                        id,
                        app,
                        version,
                        auth,
                    }
                } else {
                    let result = match (obj.get("ok"), obj.get("error")) {
                        (Some(Value::String(s)), _) => HandshakeResult::NewSession(s.clone()),
                        (Some(ok @ Value::Number(_)), _) if ok.as_i64().is_some_and(|n| n >= 0) => {
                            HandshakeResult::Restored(ok.as_i64().unwrap_or(0) as u64)
                        }
                        (Some(Value::Undefined) | None, Some(err)) => {
                            HandshakeResult::Error(RemoteErrorArray::from_value(err))
                        }
                        (Some(other), _) => HandshakeResult::OtherOk(other.clone()),
                        (None, None) => {
                            return Err(DecodeError::MissingVerb(kind.to_owned()));
                        }
                    };
                    Message::HandshakeResponse { id, result }
                }
            }
            "call" | "event" => {
                let id = need_id()?;
                let iface = target()?;
                let (name, args) = verb.ok_or_else(|| DecodeError::MissingVerb(kind.to_owned()))?;
                if kind == "call" {
                    Message::Call {
                        id,
                        iface,
                        method: name.to_owned(),
                        args: args.clone(),
                    }
                } else {
                    Message::Event {
                        id,
                        iface,
                        event: name.to_owned(),
                        args: args.clone(),
                    }
                }
            }
            "callback" => {
                let id = need_id()?;
                // Upstream tests `ok` first, then `error`, by truthiness.
                let result = match (obj.get("ok"), obj.get("error")) {
                    (Some(ok), _) if ok.is_truthy() => match ok {
                        Value::Array(a) => CallbackResult::Ok(a.clone()),
                        other => CallbackResult::Ok(vec![other.clone()]),
                    },
                    (_, Some(err)) if err.is_truthy() => {
                        CallbackResult::Error(RemoteErrorArray::from_value(err))
                    }
                    _ => CallbackResult::Empty,
                };
                Message::Callback { id, result }
            }
            "inspect" => Message::Inspect {
                id: need_id()?,
                iface: target()?,
            },
            "ping" => Message::Ping { id: need_id()? },
            "pong" => Message::Pong { id: need_id()? },
            other => Message::Unknown {
                kind: other.to_owned(),
                id,
            },
        })
    }

    /// The kind key (`handshake`, `call`, …; empty for the heartbeat).
    pub fn kind(&self) -> &str {
        match self {
            Message::Heartbeat => "",
            Message::HandshakeRequest { .. } | Message::HandshakeResponse { .. } => "handshake",
            Message::Call { .. } => "call",
            Message::Callback { .. } => "callback",
            Message::Event { .. } => "event",
            Message::Inspect { .. } => "inspect",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Unknown { kind, .. } => kind,
        }
    }

    /// Serializes the message exactly as upstream would: kind first, verb second, no spaces.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// Serializes the message, appending to `out`.
    pub fn encode_into(&self, out: &mut String) {
        fn header(out: &mut String, kind: &str, id: i64, target: Option<&str>) {
            out.push('{');
            out.push_str(kind);
            out.push_str(":[");
            out.push_str(itoa(id).as_str());
            if let Some(t) = target {
                out.push(',');
                write_string_literal(t, out);
            }
            out.push(']');
        }
        fn verb(out: &mut String, name: &str, payload: &Value) {
            // Like a JS property holding `undefined`, an `Undefined` payload is left out.
            if matches!(payload, Value::Undefined) {
                return;
            }
            out.push(',');
            write_key(name, out);
            out.push(':');
            write_value(payload, out);
        }
        match self {
            // The closing brace is written after the match, as for every kind.
            Message::Heartbeat => out.push('{'),
            Message::HandshakeRequest {
                id,
                app,
                version,
                auth,
            } => {
                out.push_str("{handshake:[");
                out.push_str(&itoa(*id));
                out.push(',');
                write_string_literal(app, out);
                if let Some(v) = version {
                    out.push(',');
                    write_string_literal(v, out);
                }
                out.push(']');
                match auth {
                    Auth::Anonymous => {}
                    Auth::Login { user, password } => verb(
                        out,
                        "login",
                        &Value::Array(vec![user.as_str().into(), password.as_str().into()]),
                    ),
                    Auth::Session { id, received } => verb(
                        out,
                        "session",
                        &Value::Array(vec![id.as_str().into(), Value::from(*received)]),
                    ),
                    Auth::Custom {
                        strategy,
                        credentials,
                    } => verb(out, strategy, credentials),
                }
            }
            Message::HandshakeResponse { id, result } => {
                header(out, "handshake", *id, None);
                match result {
                    HandshakeResult::NewSession(s) => verb(out, "ok", &Value::from(s.as_str())),
                    HandshakeResult::Restored(n) => verb(out, "ok", &Value::from(*n)),
                    HandshakeResult::OtherOk(v) => verb(out, "ok", v),
                    HandshakeResult::Error(e) => verb(out, "error", &e.to_value()),
                }
            }
            Message::Call {
                id,
                iface,
                method,
                args,
            } => {
                header(out, "call", *id, Some(iface));
                verb(out, method, args);
            }
            Message::Event {
                id,
                iface,
                event,
                args,
            } => {
                header(out, "event", *id, Some(iface));
                verb(out, event, args);
            }
            Message::Callback { id, result } => {
                header(out, "callback", *id, None);
                match result {
                    CallbackResult::Ok(values) => {
                        out.push_str(",ok:");
                        write_array(values, out);
                    }
                    CallbackResult::Error(e) => verb(out, "error", &e.to_value()),
                    CallbackResult::Empty => {}
                }
            }
            Message::Inspect { id, iface } => header(out, "inspect", *id, Some(iface)),
            Message::Ping { id } => header(out, "ping", *id, None),
            Message::Pong { id } => header(out, "pong", *id, None),
            Message::Unknown { kind, id } => {
                out.push('{');
                write_key(kind, out);
                out.push_str(":[");
                if let Some(id) = id {
                    out.push_str(&itoa(*id));
                }
                out.push(']');
            }
        }
        out.push('}');
    }
}

fn itoa(n: i64) -> String {
    n.to_string()
}

/// Writes an object key: bare when it is an ASCII identifier, quoted otherwise.
pub fn write_key(key: &str, out: &mut String) {
    crate::ser::write_key(key, out);
}

/// Builds an object value from pairs (handy in tests and handlers).
pub fn object<I, K>(pairs: I) -> Value
where
    I: IntoIterator<Item = (K, Value)>,
    K: Into<String>,
{
    Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect::<Object>(),
    )
}

/// An `event` message encoded once for any number of receivers: everything but its id, which
/// each connection's session assigns. [`PreparedEvent::with_id`] gives exactly the text
/// [`Message::encode`] gives for the same event, so a broadcast serializes its arguments once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedEvent {
    /// One shared allocation: a clone per receiver costs a reference count.
    parts: std::sync::Arc<EventParts>,
}

#[derive(Debug, PartialEq, Eq)]
struct EventParts {
    /// `,'iface']` — after the id.
    target: String,
    /// `,name:[args]}` (or just `}` for an `undefined` payload).
    tail: String,
}

impl PreparedEvent {
    /// Encodes `iface.event(args)`.
    pub fn new(iface: &str, event: &str, args: &Value) -> Self {
        let mut target = String::with_capacity(iface.len() + 4);
        target.push(',');
        write_string_literal(iface, &mut target);
        target.push(']');
        let mut tail = String::new();
        if !matches!(args, Value::Undefined) {
            tail.push(',');
            write_key(event, &mut tail);
            tail.push(':');
            write_value(args, &mut tail);
        }
        tail.push('}');
        PreparedEvent {
            parts: std::sync::Arc::new(EventParts { target, tail }),
        }
    }

    /// The message text with id `id`.
    pub fn with_id(&self, id: i64) -> String {
        let mut out = String::with_capacity(self.len() + 20);
        out.push_str("{event:[");
        out.push_str(itoa(id).as_str());
        out.push_str(&self.parts.target);
        out.push_str(&self.parts.tail);
        out
    }

    /// The text size without the id: a lower bound of [`Self::with_id`]'s length, used to
    /// account for queued events before they have an id.
    pub fn len(&self) -> usize {
        "{event:[".len() + self.parts.target.len() + self.parts.tail.len()
    }

    /// Never true: an encoded event is never empty (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }
}
