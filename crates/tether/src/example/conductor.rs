//! The example application on the Holochain conductor protocol.

use super::ChatHub;
use crate::Value;

fn conductor_value(v: &Value) -> crate::conductor::Value {
    use crate::conductor::Value as M;
    match v {
        Value::Undefined | Value::Null => M::Nil,
        Value::Bool(b) => M::from(*b),
        Value::Number(n) if n.fract() == 0.0 && n.abs() < 9.007e15 => M::from(*n as i64),
        Value::Number(n) => M::from(*n),
        Value::String(s) => M::from(s.as_str()),
        // msgpack strings are UTF-8: lone surrogates become U+FFFD.
        Value::Utf16(_) => M::from(v.to_js_string()),
        Value::Array(a) => M::Array(a.iter().map(conductor_value).collect()),
        Value::Object(o) => M::Map(
            o.iter()
                .map(|(k, v)| (M::from(k), conductor_value(v)))
                .collect(),
        ),
    }
}

/// The example application on the conductor protocol: requests `answer` (→ 42), `divide`
/// (`{a, b}` → `a / b`; error `internal_error` 'Zero division' when `b` is 0) and `say_hi`
/// (`{name}` → `'Hi, <name>!'`), and an app signal from zome `chat`, `{type: 'chat', user,
/// text}`, to every conductor client on each chat message of `chat` (a conductor's signal shape,
/// in each client's dialect: `@holochain/client` throws on any other).
pub fn conductor_server(chat: &ChatHub) -> crate::conductor::ConductorServer {
    conductor_server_with(chat, |builder| builder)
}

/// [`conductor_server`] with the builder passed through `configure` first, to set what the
/// listener requires (for example [`ConductorServerBuilder::tokens`] to make it an app
/// interface, [`ConductorServerBuilder::allowed_origins`] to restrict origins), as `tether
/// serve --conductor-token/--conductor-origin` do.
///
/// [`ConductorServerBuilder::tokens`]: crate::conductor::ConductorServerBuilder::tokens
/// [`ConductorServerBuilder::allowed_origins`]: crate::conductor::ConductorServerBuilder::allowed_origins
pub fn conductor_server_with(
    chat: &ChatHub,
    configure: impl FnOnce(
        crate::conductor::ConductorServerBuilder,
    ) -> crate::conductor::ConductorServerBuilder,
) -> crate::conductor::ConductorServer {
    use crate::conductor::{ConductorServer, Value as M};
    fn number(args: &M, key: &str) -> Option<f64> {
        let (_, v) = args
            .as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))?;
        v.as_f64().or_else(|| v.as_i64().map(|i| i as f64))
    }
    let bad = |m: &str| ("deserialization".to_owned(), m.to_owned());
    let server = ConductorServer::builder()
        .handler("answer", |_| async { Ok(M::from(42)) })
        .handler("divide", move |args| async move {
            match (number(&args, "a"), number(&args, "b")) {
                (Some(a), Some(b)) if b != 0.0 => Ok(M::from(a / b)),
                (Some(_), Some(_)) => {
                    Err(("internal_error".to_owned(), "Zero division".to_owned()))
                }
                _ => Err(bad("expected {a, b}")),
            }
        })
        .handler("say_hi", move |args| async move {
            let name = args
                .as_map()
                .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("name")))
                .and_then(|(_, v)| v.as_str().map(str::to_owned))
                .ok_or_else(|| bad("expected {name}"))?;
            Ok(M::from(format!("Hi, {name}!")))
        });
    let server = configure(server).build();
    let signals = server.clone();
    chat.on_message(move |user, text| {
        let signal = M::Map(vec![
            ("type".into(), "chat".into()),
            ("user".into(), conductor_value(user)),
            ("text".into(), conductor_value(text)),
        ]);
        signals.broadcast_app_signal("chat", &signal);
    });
    server
}
