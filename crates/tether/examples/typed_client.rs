//! A typed Rust client of an existing `@metarhia/jstp` server.
//!
//! The Node server (interop/jstp-peer.js hosts upstream's `testApp` fixture) was written
//! without Rust in mind; the traits below describe the part of it this client uses, and
//! `#[tether::interface]` turns each into a typed proxy. Nothing here implements the traits:
//! only the generated clients are used.
//!
//! ```sh
//! node interop/jstp-peer.js server --tcp 3000 &        # prints {"ready":true,"tcp":3000,…}
//! cargo run -p tether --example typed_client -- jstp://127.0.0.1:3000
//! ```
//!
//! The same program works against `tether serve`, which hosts the same application.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tether::{connect, ClientOptions, RemoteError, TypedError, Value};

/// `calculator`: answer, divide, doNothing.
#[allow(dead_code)] // only the client is used
#[tether::interface(name = "calculator")]
pub trait Calculator {
    /// `42`.
    async fn answer(&self) -> Result<u32, RemoteError>;
    /// `a / b`; a zero divisor is error 1 (`Zero division`).
    async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
    /// Nothing.
    #[tether(rename = "doNothing")]
    async fn do_nothing(&self) -> Result<(), RemoteError>;
}

/// `someService.sayHi(name)`.
#[allow(dead_code)] // only the client is used
#[tether::interface]
pub trait SomeService {
    /// `'Hi, <name>!'`.
    #[tether(rename = "sayHi")]
    async fn say_hi(&self, name: String) -> Result<String, RemoteError>;
}

/// An order: a user struct that crosses the wire as a JS object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The order number.
    pub id: u32,
    /// What was ordered.
    pub items: Vec<String>,
    /// An optional note (`null` on the wire when absent).
    pub note: Option<String>,
}

/// `someOtherService.method(x)` answers `x`: here, typed as an `Order` both ways.
#[allow(dead_code)] // only the client is used
#[tether::interface]
pub trait SomeOtherService {
    /// Echoes the order.
    async fn method(&self, order: Order) -> Result<Order, RemoteError>;
}

/// `chat`: `send(text)`, and the `message(user, text)` events every client gets.
#[allow(dead_code)] // only the client is used
#[tether::interface(name = "chat")]
pub trait Chat {
    /// Sends a message to every client.
    async fn send(&self, text: String) -> Result<(), RemoteError>;
    /// A message: the sender's user name (none when anonymous) and the text.
    #[tether(emit)]
    fn message(user: Option<String>, text: String);
}

/// What a run saw, in order: one line per step.
pub async fn run(url: &str) -> Result<Vec<String>, TypedError> {
    let conn = connect(url, "testApp", ClientOptions::default().no_reconnect()).await?;
    let calculator = CalculatorClient::new(conn.clone());
    let some = SomeServiceClient::new(conn.clone());
    let other = SomeOtherServiceClient::new(conn.clone());
    let chat = ChatClient::new(conn.clone());
    let mut lines = Vec::new();

    lines.push(format!("answer = {}", calculator.answer().await?));
    lines.push(format!(
        "divide(20, 8) = {}",
        calculator.divide(20.0, 8.0).await?
    ));
    calculator.do_nothing().await?;
    lines.push("doNothing done".to_owned());
    match calculator.divide(1.0, 0.0).await {
        Err(e) => lines.push(format!(
            "divide(1, 0) failed with code {:?}",
            e.remote().map(|r| r.code)
        )),
        Ok(q) => lines.push(format!("divide(1, 0) = {q}")),
    }
    lines.push(format!("sayHi = {}", some.say_hi("Rust".into()).await?));

    let order = Order {
        id: 7,
        items: vec!["tea".into(), "scone".into()],
        note: None,
    };
    let echoed = other.method(order.clone()).await?;
    lines.push(format!("order echoed intact: {}", echoed == order));

    // Subscribe first, then cause the event.
    let mut messages = chat.on_message();
    chat.send("hello from Rust".into()).await?;
    if let Some(message) = messages.next().await {
        let (user, text) = message?;
        lines.push(format!("chat.message from {user:?}: {text}"));
    }

    // A call the server cannot take: JSTP's own code 17 (invalid signature).
    let wrong = conn
        .call("calculator", "divide", vec![Value::from(1)])
        .await
        .map_err(|e| e.code());
    lines.push(format!("divide(1) = {wrong:?}"));
    conn.close().await;
    Ok(lines)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "jstp://127.0.0.1:3000".to_owned());
    for line in run(&url).await? {
        println!("{line}");
    }
    Ok(())
}
