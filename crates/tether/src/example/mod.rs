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
//! An incoming event `chat.send(text)` broadcasts the same way. `chat.send` the method answers
//! once every client has room again (backpressure on the sender; see
//! `Server::broadcast_async`), and chat events reach every client in the order the calls
//! arrived.
//!
//! As in `@metarhia/jstp`'s fixture, arities are strict (a wrong argument count answers `[17]`),
//! `sayHi` stringifies like a template literal (`sayHi([1,2])` is `'Hi, 1,2!'`), and `divide`
//! coerces like JS arithmetic (`divide('20', 10)` is `2`).
//!
//! The divide error carries the text a Node `Error` stringifies to (`'Error: Zero division'`),
//! because that is what upstream's fixture puts on the wire.

use crate::app::{Application, Interface};
use crate::error::RemoteError;
use crate::server::Server;
use std::sync::{Arc, Mutex, OnceLock};
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
                .method("answer", arity(0, |_a| Ok(Value::from(42))))
                .method(
                    "divide",
                    arity(2, |a| {
                        // JS: `if (!divisor)` then `divident / divisor`, with its coercions
                        // (`divide('20', 10)` is 2).
                        if !a[1].is_truthy() {
                            return Err(RemoteError::new(1, "Error: Zero division"));
                        }
                        let q = a[0].to_js_number() / a[1].to_js_number();
                        // JS would send NaN here; a Node peer can't parse it, so send null.
                        Ok(if q.is_finite() {
                            Value::from(q)
                        } else {
                            Value::Null
                        })
                    }),
                )
                .method("doNothing", arity(0, |_a| Ok(Value::Undefined))),
        )
        .interface(
            "someService",
            Interface::new()
                // A template literal: `Hi, ${name}!`.
                .method(
                    "sayHi",
                    arity(1, |a| {
                        Ok(Value::from(format!("Hi, {}!", a[0].to_js_string())))
                    }),
                )
                .method("say", arity(1, |a| Ok(a[0].clone()))),
        )
        .interface(
            "someOtherService",
            Interface::new()
                .method("method", arity(1, |a| Ok(a[0].clone())))
                .method("otherMethod", arity(0, |_a| Ok(Value::Undefined))),
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
                    // Queued for every client now, in call order; the answer waits until the
                    // clients have room, so a fast sender cannot outrun slow readers.
                    let user = conn.username().map_or(Value::Null, Value::from);
                    let queued = chat.queue("chat", "message", vec![user, arg(&a, 0)]);
                    async move {
                        queued.await;
                        // No result, as `@metarhia/jstp` peers' chat.send.
                        Ok(Value::Undefined)
                    }
                }),
        )
}

/// A method of `n` arguments, as `@metarhia/jstp` checks a JS function's arity: any other
/// count answers `[17]` (invalid signature).
fn arity<F>(
    n: usize,
    f: F,
) -> impl Fn(crate::Connection, Vec<Value>) -> futures::future::Ready<crate::app::MethodResult>
       + Send
       + Sync
       + 'static
where
    F: Fn(&[Value]) -> crate::app::MethodResult + Send + Sync + 'static,
{
    move |_conn, args| {
        futures::future::ready(if args.len() == n {
            f(&args)
        } else {
            Err(RemoteError::code(tether_wire::ErrorCode::InvalidSignature))
        })
    }
}

/// A chat message listener: called with the user (or null) and the text.
type ChatListener = Arc<dyn Fn(&Value, &Value) + Send + Sync>;

/// Lets the example app broadcast through the server that hosts it (the app is built before
/// the server exists), and tells other listeners (the conductor server of `tether serve`)
/// about chat messages.
#[derive(Clone, Default)]
pub struct ChatHub {
    server: Arc<OnceLock<Server>>,
    listeners: Arc<Mutex<Vec<ChatListener>>>,
}

impl ChatHub {
    /// A hub not yet bound to a server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds the hub to its server.
    pub fn bind(&self, server: &Server) {
        let _ = self.server.set(server.clone());
    }

    /// Calls `f(user, text)` for every chat message from now on.
    pub fn on_message(&self, f: impl Fn(&Value, &Value) + Send + Sync + 'static) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    /// Broadcasts to every client of the bound server; returns how many got it. A
    /// `chat.message(user, text)` also goes to the [`ChatHub::on_message`] listeners.
    pub fn broadcast(&self, iface: &str, event: &str, args: Vec<Value>) -> usize {
        self.notify(iface, event, &args);
        self.server
            .get()
            .map_or(0, |s| s.broadcast(iface, event, args))
    }

    /// Like [`ChatHub::broadcast`] with backpressure: queues the event for every client now
    /// (so events keep the order of the calls that queue them) and returns a future that ends
    /// when the clients have room again (see `Server::broadcast_async`).
    pub fn queue(
        &self,
        iface: &str,
        event: &str,
        args: Vec<Value>,
    ) -> impl std::future::Future<Output = usize> + Send + 'static {
        self.notify(iface, event, &args);
        let queued = self
            .server
            .get()
            .map(|s| s.broadcast_async(iface, event, args));
        async move {
            match queued {
                Some(wait) => wait.await,
                None => 0,
            }
        }
    }

    fn notify(&self, iface: &str, event: &str, args: &[Value]) {
        if let (("chat", "message"), [user, text]) = ((iface, event), args) {
            let listeners = self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for f in listeners {
                f(user, text);
            }
        }
    }
}

mod conductor;
pub use conductor::conductor_server;
pub use conductor::conductor_server_with;
