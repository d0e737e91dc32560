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
//!
//! Each interface is one `#[interface]` trait ([`Calculator`], [`SomeService`],
//! [`SomeOtherService`], [`Chat`]), so Rust callers get typed clients for free
//! ([`CalculatorClient`], …, and [`ChatClient::on_message`] as a typed stream of chat events).

use crate::app::Application;
use crate::connection::Connection;
use crate::error::RemoteError;
use crate::server::Server;
use std::sync::{Arc, Mutex, OnceLock};
use tether_wire::{ErrorCode, Value};

/// Name of the example application.
pub const APP_NAME: &str = "testApp";
/// Version of the example application.
pub const APP_VERSION: &str = "1.0.0";

// The interfaces, one `#[interface]` trait each. Arguments the fixture coerces like JS are
// `Value`s; `signature_reason = false` answers a wrong count with a bare `[17]`, byte for byte
// what `@metarhia/jstp` sends.

/// `calculator`, as in upstream's fixture.
#[crate::interface(name = "calculator", crate = "crate", signature_reason = false)]
pub trait Calculator {
    /// `42`.
    async fn answer(&self) -> Result<u8, RemoteError>;
    /// `dividend / divisor` with JS's coercions; error `[1,'Error: Zero division']` when the
    /// divisor is falsy.
    async fn divide(&self, dividend: Value, divisor: Value) -> Result<Value, RemoteError>;
    /// No result (`ok:[]`).
    #[tether(rename = "doNothing")]
    async fn do_nothing(&self) -> Result<(), RemoteError>;
}

/// `someService`, as in upstream's fixture.
#[crate::interface(crate = "crate", signature_reason = false)]
pub trait SomeService {
    /// `` `Hi, ${name}!` ``, stringified as a template literal does.
    #[tether(rename = "sayHi")]
    async fn say_hi(&self, name: Value) -> Result<String, RemoteError>;
    /// Its argument.
    async fn say(&self, word: Value) -> Result<Value, RemoteError>;
}

/// `someOtherService`, as in upstream's fixture.
#[crate::interface(crate = "crate", signature_reason = false)]
pub trait SomeOtherService {
    /// Its argument.
    async fn method(&self, argument: Value) -> Result<Value, RemoteError>;
    /// No result.
    #[tether(rename = "otherMethod")]
    async fn other_method(&self) -> Result<(), RemoteError>;
}

/// `chat`: a message sent by a call or an event reaches every client as `chat.message`.
#[crate::interface(name = "chat", crate = "crate", signature_reason = false)]
pub trait Chat {
    /// Broadcasts `chat.message(user, args[0])`; answers (no result) once every client has
    /// room again. Any argument count is taken, as before (the text is the first, or
    /// `undefined`).
    #[tether(connection, raw)]
    async fn send(&self, conn: Connection, args: Vec<Value>) -> Result<(), RemoteError>;
    /// The event `chat.send(text)`: broadcasts the same way, without waiting.
    #[tether(event, connection, raw, rename = "send")]
    fn send_event(&self, conn: Connection, args: Vec<Value>);
    /// The event every client gets: the sender's user name (or null) and the text.
    #[tether(emit)]
    fn message(user: Option<String>, text: Value);
}

/// The fixture's implementation of the four interfaces.
#[derive(Clone)]
struct Fixture {
    chat: ChatHub,
}

impl Calculator for Fixture {
    async fn answer(&self) -> Result<u8, RemoteError> {
        Ok(42)
    }

    async fn divide(&self, dividend: Value, divisor: Value) -> Result<Value, RemoteError> {
        // JS: `if (!divisor)` then `dividend / divisor`, with its coercions
        // (`divide('20', 10)` is 2).
        if !divisor.is_truthy() {
            return Err(RemoteError::new(1, "Error: Zero division"));
        }
        let q = dividend.to_js_number() / divisor.to_js_number();
        // JS would send NaN here; a Node peer can't parse it, so send null.
        Ok(if q.is_finite() {
            Value::from(q)
        } else {
            Value::Null
        })
    }

    async fn do_nothing(&self) -> Result<(), RemoteError> {
        Ok(())
    }
}

impl SomeService for Fixture {
    async fn say_hi(&self, name: Value) -> Result<String, RemoteError> {
        Ok(format!("Hi, {}!", name.to_js_string()))
    }

    async fn say(&self, word: Value) -> Result<Value, RemoteError> {
        Ok(word)
    }
}

impl SomeOtherService for Fixture {
    async fn method(&self, argument: Value) -> Result<Value, RemoteError> {
        Ok(argument)
    }

    async fn other_method(&self) -> Result<(), RemoteError> {
        Ok(())
    }
}

/// `chat.message(user, text)`'s arguments for a message from `conn`. They are values that
/// came off the wire (or null and a string), so they always convert; `None` is logged.
fn chat_message(conn: &Connection, args: &[Value]) -> Option<Vec<Value>> {
    let text = args.first().cloned().unwrap_or(Value::Undefined);
    ChatEvents::message_args(conn.username(), text)
        .inspect_err(|e| tracing::warn!(error = %e, "a chat message does not convert"))
        .ok()
}

impl Chat for Fixture {
    async fn send(&self, conn: Connection, args: Vec<Value>) -> Result<(), RemoteError> {
        let message = chat_message(&conn, &args)
            .ok_or_else(|| RemoteError::code(ErrorCode::InternalApiError))?;
        // Queued for every client now (this runs at the call's first poll, in arrival
        // order); the answer waits until the clients have room, so a fast sender cannot
        // outrun slow readers. No result, as `@metarhia/jstp` peers' chat.send.
        self.chat.queue("chat", "message", message).await;
        Ok(())
    }

    fn send_event(&self, conn: Connection, args: Vec<Value>) {
        if let Some(message) = chat_message(&conn, &args) {
            self.chat.broadcast("chat", "message", message);
        }
    }
}

/// Upstream's `testApp@1.0.0` fixture. `chat.send` broadcasts through `server` once it is set
/// (see [`ChatHub`]).
pub fn test_app(chat: ChatHub) -> Application {
    let fixture = Fixture { chat };
    Application::new(APP_NAME, APP_VERSION)
        .expect("valid constant")
        .interface(
            <Fixture as Calculator>::INTERFACE_NAME,
            Calculator::into_interface(fixture.clone()),
        )
        .interface(
            <Fixture as SomeService>::INTERFACE_NAME,
            SomeService::into_interface(fixture.clone()),
        )
        .interface(
            <Fixture as SomeOtherService>::INTERFACE_NAME,
            SomeOtherService::into_interface(fixture.clone()),
        )
        .interface(
            <Fixture as Chat>::INTERFACE_NAME,
            Chat::into_interface(fixture),
        )
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

    /// Binds the hub to its server. Chat messages the server delivers — broadcast here or, in
    /// a cluster, on another node — go to the [`ChatHub::on_message`] listeners.
    pub fn bind(&self, server: &Server) {
        if self.server.set(server.clone()).is_ok() {
            // Only the listeners, not the hub: the hub holds the server.
            let listeners = self.listeners.clone();
            server.on_broadcast(move |iface, event, args| {
                if let Some(args) = args.as_array() {
                    notify(&listeners, iface, event, args);
                }
            });
        }
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
}

/// Tells `listeners` of a `chat.message(user, text)`.
fn notify(listeners: &Mutex<Vec<ChatListener>>, iface: &str, event: &str, args: &[Value]) {
    if let (("chat", "message"), [user, text]) = ((iface, event), args) {
        let listeners = listeners.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for f in listeners {
            f(user, text);
        }
    }
}

#[cfg(feature = "conductor")]
mod conductor;
#[cfg(feature = "conductor")]
pub use conductor::conductor_server;
#[cfg(feature = "conductor")]
pub use conductor::conductor_server_with;
