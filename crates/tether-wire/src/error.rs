//! JSTP error codes and their wire form (`[code]`, `[code,'message']`, `[code,'message',...info]`).

use crate::value::Value;

/// The error codes JSTP defines. Negative codes are local only and never go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum ErrorCode {
    /// −1: the peer received the call but the connection closed before its callback arrived.
    CallbackLost = -1,
    /// −2: the connection closed before the handshake response arrived.
    NoHandshakeResponse = -2,
    /// 10: no application with that name (and version) on the server.
    AppNotFound = 10,
    /// 11: credentials rejected, or session unknown.
    AuthFailed = 11,
    /// 12: no such interface.
    InterfaceNotFound = 12,
    /// 13: defined by upstream, never produced.
    InterfaceIncompatible = 13,
    /// 14: no such method.
    MethodNotFound = 14,
    /// 15: a handshake request was sent to a client.
    NotAServer = 15,
    /// 16: the method failed internally.
    InternalApiError = 16,
    /// 17: arguments missing or not an array.
    InvalidSignature = 17,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> i64 {
        self as i64
    }

    /// The code for a number, if it is one JSTP defines.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            -1 => ErrorCode::CallbackLost,
            -2 => ErrorCode::NoHandshakeResponse,
            10 => ErrorCode::AppNotFound,
            11 => ErrorCode::AuthFailed,
            12 => ErrorCode::InterfaceNotFound,
            13 => ErrorCode::InterfaceIncompatible,
            14 => ErrorCode::MethodNotFound,
            15 => ErrorCode::NotAServer,
            16 => ErrorCode::InternalApiError,
            17 => ErrorCode::InvalidSignature,
            _ => return None,
        })
    }

    /// Upstream's default message for the code.
    pub fn default_message(self) -> &'static str {
        match self {
            ErrorCode::CallbackLost => "Connection closed before receiving callback",
            ErrorCode::NoHandshakeResponse => "Connection closed before receiving handshake",
            ErrorCode::AppNotFound => "Application not found",
            ErrorCode::AuthFailed => "Authentication failed",
            ErrorCode::InterfaceNotFound => "Interface not found",
            ErrorCode::InterfaceIncompatible => "Incompatible interface",
            ErrorCode::MethodNotFound => "Method not found",
            ErrorCode::NotAServer => "Not a server",
            ErrorCode::InternalApiError => "Internal API error",
            ErrorCode::InvalidSignature => "Invalid signature",
        }
    }
}

/// The code upstream uses for errors given as a plain message.
pub const GENERIC_ERROR_CODE: i64 = 1;

/// A remote error as carried on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteErrorArray {
    /// The error code (`a[0]`).
    pub code: i64,
    /// The message (`a[1]`), if the sender gave one.
    pub message: Option<String>,
    /// Extra elements (`a[2..]`).
    pub info: Vec<Value>,
}

impl RemoteErrorArray {
    /// An error with a standard code and no message.
    pub fn code(code: ErrorCode) -> Self {
        RemoteErrorArray {
            code: code.code(),
            message: None,
            info: Vec::new(),
        }
    }

    /// An error with a code and a message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RemoteErrorArray {
            code,
            message: Some(message.into()),
            info: Vec::new(),
        }
    }

    /// The message to show: the sender's, else the code's default, else the code as text.
    pub fn display_message(&self) -> String {
        match (&self.message, ErrorCode::from_code(self.code)) {
            (Some(m), _) => m.clone(),
            (None, Some(c)) => c.default_message().to_owned(),
            (None, None) => self.code.to_string(),
        }
    }

    /// Reads an error array the way upstream's `RemoteError.fromJstpArray` does. A bare number
    /// or string (sent by sloppy peers) is accepted too.
    pub fn from_value(v: &Value) -> Self {
        match v {
            Value::Array(a) => {
                let code = a
                    .first()
                    .and_then(Value::as_i64)
                    .unwrap_or(GENERIC_ERROR_CODE);
                let message = match a.get(1) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Undefined) | Some(Value::Null) | None => None,
                    Some(other) => Some(other.to_mdsf()),
                };
                let info = if a.len() > 2 {
                    a[2..].to_vec()
                } else {
                    Vec::new()
                };
                RemoteErrorArray {
                    code,
                    message,
                    info,
                }
            }
            Value::Number(_) => RemoteErrorArray {
                code: v.as_i64().unwrap_or(GENERIC_ERROR_CODE),
                message: None,
                info: Vec::new(),
            },
            Value::String(s) => RemoteErrorArray::new(GENERIC_ERROR_CODE, s.clone()),
            other => RemoteErrorArray::new(GENERIC_ERROR_CODE, other.to_mdsf()),
        }
    }

    /// The wire array, following upstream's `toJSTP`: standard codes (and messages equal to the
    /// default or to the code itself) send `[code]` only.
    pub fn to_value(&self) -> Value {
        let mut a = vec![Value::from(self.code)];
        let standard = ErrorCode::from_code(self.code).is_some();
        let message = self.message.as_deref().filter(|m| {
            !standard
                && *m != self.code.to_string()
                && ErrorCode::from_code(self.code).map(|c| c.default_message()) != Some(*m)
        });
        match (message, self.info.is_empty()) {
            (None, true) => {}
            (m, info_empty) => {
                if !standard || !info_empty {
                    a.push(m.map_or(Value::Undefined, Value::from));
                    a.extend(self.info.iter().cloned());
                }
            }
        }
        // A standard code with info keeps the info, as upstream does; a trailing hole is fine.
        Value::Array(a)
    }
}

impl std::fmt::Display for RemoteErrorArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.display_message(), self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_codes_send_code_only() {
        let e = RemoteErrorArray::new(12, "whatever");
        assert_eq!(e.to_value().to_mdsf(), "[12]");
        assert_eq!(
            RemoteErrorArray::code(ErrorCode::AuthFailed)
                .to_value()
                .to_mdsf(),
            "[11]"
        );
    }

    #[test]
    fn custom_codes_keep_message_and_info() {
        assert_eq!(
            RemoteErrorArray::new(42, "Locked").to_value().to_mdsf(),
            "[42,'Locked']"
        );
        let e = RemoteErrorArray {
            code: 1,
            message: Some("Zero division".into()),
            info: vec![Value::from(5)],
        };
        assert_eq!(e.to_value().to_mdsf(), "[1,'Zero division',5]");
        assert_eq!(RemoteErrorArray::new(7, "7").to_value().to_mdsf(), "[7]");
    }

    #[test]
    fn reads_upstream_arrays() {
        let e = RemoteErrorArray::from_value(&Value::from(vec![
            Value::from(1),
            Value::from("Error: x"),
        ]));
        assert_eq!(e.code, 1);
        assert_eq!(e.display_message(), "Error: x");
        let e = RemoteErrorArray::from_value(&Value::from(vec![14]));
        assert_eq!(e.display_message(), "Method not found");
        assert!(e.info.is_empty());
    }
}
