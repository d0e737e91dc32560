//! The built-in example application that `tether serve` hosts.
//!
//! It reproduces upstream's test fixture (`testApp@1.0.0`) message for message, so the same
//! interop scenarios run against tether and against `@metarhia/jstp`, plus a `chat` interface:
//!
//! | interface | method | result |
//! | --- | --- | --- |
//! | `calculator` | `answer()` | `42` |
//! | `calculator` | `divide(a, b)` | `a / b`; error `[1,'Error: Zero division']` when `b` is 0 |
//! | `calculator` | `doNothing()` | no result (`ok:[]`) |
//! | `someService` | `sayHi(name)` | `'Hi, <name>!'` |
//! | `someService` | `say(w)` | `w` |
//! | `someOtherService` | `method(x)` | `x` |
//! | `someOtherService` | `otherMethod()` | no result |
//! | `chat` | `send(text)` | broadcasts event `chat.message(username or null, text)` to every client; no result |
//!
//! An incoming event `chat.send(text)` broadcasts the same way.
//!
//! The divide error carries the text a Node `Error` stringifies to (`'Error: Zero division'`),
//! because that is what upstream's fixture puts on the wire.

use crate::app::{Application, Interface};
use crate::error::RemoteError;
use crate::server::Server;
use std::sync::{Arc, OnceLock};
use tether_wire::Value;

/// Name of the example application.
pub const APP_NAME: &str = "testApp";
/// Version of the example application.
pub const APP_VERSION: &str = "1.0.0";

fn arg(args: &[Value], i: usize) -> Value {
    args.get(i).cloned().unwrap_or(Value::Undefined)
}

/// Upstream's `testApp@1.0.0` fixture. `chat.send` broadcasts through `server` once it is set
/// (see [`ChatHub`]).
pub fn test_app(chat: ChatHub) -> Application {
    Application::new(APP_NAME, APP_VERSION)
        .expect("valid constant")
        .interface(
            "calculator",
            Interface::new()
                .method("answer", |_c, _a| async { Ok(Value::from(42)) })
                .method("divide", |_c, a| async move {
                    let dividend = arg(&a, 0).as_f64().unwrap_or(f64::NAN);
                    let divisor = arg(&a, 1);
                    if !divisor.is_truthy() {
                        return Err(RemoteError::new(1, "Error: Zero division"));
                    }
                    let q = dividend / divisor.as_f64().unwrap_or(f64::NAN);
                    // JS would send NaN here; a Node peer can't parse it, so send null.
                    Ok(if q.is_finite() {
                        Value::from(q)
                    } else {
                        Value::Null
                    })
                })
                .method("doNothing", |_c, _a| async { Ok(Value::Undefined) }),
        )
        .interface(
            "someService",
            Interface::new()
                .method("sayHi", |_c, a| async move {
                    let name = match arg(&a, 0) {
                        Value::String(s) => s,
                        other => other.to_mdsf(),
                    };
                    Ok(Value::from(format!("Hi, {name}!")))
                })
                .method("say", |_c, a| async move { Ok(arg(&a, 0)) }),
        )
        .interface(
            "someOtherService",
            Interface::new()
                .method("method", |_c, a| async move { Ok(arg(&a, 0)) })
                .method("otherMethod", |_c, _a| async { Ok(Value::Undefined) }),
        )
        .interface(
            "chat",
            Interface::new()
                .on_event("send", {
                    let chat = chat.clone();
                    move |conn, a| {
                        let user = conn.username().map_or(Value::Null, Value::from);
                        chat.broadcast("chat", "message", vec![user, arg(&a, 0)]);
                    }
                })
                .method("send", move |conn, a| {
                    let chat = chat.clone();
                    async move {
                        let text = arg(&a, 0);
                        let user = conn.username().map_or(Value::Null, Value::from);
                        chat.broadcast("chat", "message", vec![user, text]);
                        // No result, as upstream peers' chat.send.
                        Ok(Value::Undefined)
                    }
                }),
        )
}

/// Lets the example app broadcast through the server that hosts it (the app is built before
/// the server exists).
#[derive(Clone, Default)]
pub struct ChatHub(Arc<OnceLock<Server>>);

impl ChatHub {
    /// A hub not yet bound to a server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the hub to its server.
    pub fn bind(&self, server: &Server) {
        let _ = self.0.set(server.clone());
    }

    /// Broadcasts to every client of the bound server; returns how many got it.
    pub fn broadcast(&self, iface: &str, event: &str, args: Vec<Value>) -> usize {
        self.0.get().map_or(0, |s| s.broadcast(iface, event, args))
    }
}
