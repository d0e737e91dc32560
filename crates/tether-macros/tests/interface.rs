//! `#[interface]`: one trait gives the server's interface and a typed client, in memory and
//! with the real `@metarhia/jstp` peer on either side.

#[path = "../../tether/tests/common/mod.rs"]
mod common;

use common::{within, LIMIT};
use tether::{
    connect, connect_transport, memory, Application, ClientOptions, RemoteError, Server, Value,
};
use tether_macros::interface;

/// The fixture's calculator.
#[interface(name = "calculator")]
pub trait Calculator {
    /// The answer.
    async fn answer(&self) -> Result<u8, RemoteError>;
    /// `a / b`; dividing by zero is error 1.
    async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
    #[tether(rename = "doNothing")]
    async fn do_nothing(&self) -> Result<(), RemoteError>;
}

/// Named after the trait: `someService`.
#[interface]
pub trait SomeService {
    #[tether(rename = "sayHi")]
    async fn say_hi(&self, name: String) -> Result<String, RemoteError>;
    async fn say(&self, what: Value) -> Result<Value, RemoteError>;
}

#[interface]
pub trait SomeOtherService {
    async fn method(&self, x: Value) -> Result<Value, RemoteError>;
    #[tether(rename = "otherMethod")]
    async fn other_method(&self) -> Result<(), RemoteError>;
}

struct Calc;

impl Calculator for Calc {
    async fn answer(&self) -> Result<u8, RemoteError> {
        Ok(42)
    }
    async fn divide(&self, a: f64, b: f64) -> Result<f64, RemoteError> {
        if b == 0.0 {
            return Err(RemoteError::new(1, "Zero division"));
        }
        Ok(a / b)
    }
    async fn do_nothing(&self) -> Result<(), RemoteError> {
        Ok(())
    }
}

struct Echo;

impl SomeService for Echo {
    async fn say_hi(&self, name: String) -> Result<String, RemoteError> {
        Ok(format!("Hi, {name}!"))
    }
    async fn say(&self, what: Value) -> Result<Value, RemoteError> {
        Ok(what)
    }
}

impl SomeOtherService for Echo {
    async fn method(&self, x: Value) -> Result<Value, RemoteError> {
        Ok(x)
    }
    async fn other_method(&self) -> Result<(), RemoteError> {
        Ok(())
    }
}

/// The fixture's testApp, defined through the macro.
fn test_app() -> Application {
    Application::new("testApp", "1.0.0")
        .unwrap()
        .interface(Calc::INTERFACE_NAME, Calc.into_interface())
        .interface(
            <Echo as SomeService>::INTERFACE_NAME,
            SomeService::into_interface(Echo),
        )
        .interface(
            <Echo as SomeOtherService>::INTERFACE_NAME,
            SomeOtherService::into_interface(Echo),
        )
}

#[test]
fn names_are_the_wire_names() {
    assert_eq!(Calc::INTERFACE_NAME, "calculator");
    assert_eq!(<Echo as SomeService>::INTERFACE_NAME, "someService");
    let app = test_app();
    assert_eq!(
        app.methods("calculator").unwrap(),
        vec!["answer", "divide", "doNothing"]
    );
    assert_eq!(app.methods("someService").unwrap(), vec!["sayHi", "say"]);
}

#[tokio::test]
async fn the_generated_client_calls_the_generated_interface() {
    let server = Server::builder().application(test_app()).build().unwrap();
    let (a, b) = memory::pair(8);
    server.serve_transport(a);
    let conn = within(
        LIMIT,
        "the handshake reply",
        connect_transport(b, "testApp", ClientOptions::default()),
    )
    .await
    .unwrap();
    let calc = CalculatorClient::new(conn.clone());
    assert_eq!(
        within(LIMIT, "calculator.answer()", calc.answer())
            .await
            .unwrap(),
        42
    );
    assert_eq!(
        within(LIMIT, "calculator.divide(20, 8)", calc.divide(20.0, 8.0))
            .await
            .unwrap(),
        2.5
    );
    within(LIMIT, "calculator.doNothing()", calc.do_nothing())
        .await
        .unwrap();
    let e = within(LIMIT, "calculator.divide(1, 0)", calc.divide(1.0, 0.0))
        .await
        .unwrap_err();
    assert_eq!(e.remote(), Some(&RemoteError::new(1, "Zero division")));
    // The raw form sees the wire names and answers.
    let raw = within(
        LIMIT,
        "a raw someService.sayHi('x')",
        conn.call("someService", "sayHi", vec![Value::from("x")]),
    )
    .await
    .unwrap();
    assert_eq!(raw, vec![Value::from("Hi, x!")]);
    let e = within(
        LIMIT,
        "a raw calculator.divide(1)",
        conn.call("calculator", "divide", vec![Value::from(1)]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(17), "{e}");
    conn.close().await;
    server.shutdown().await;
}

/// The Node client's `basic` scenario passes against the fixture defined with the macro.
#[tokio::test]
async fn their_client_passes_the_basic_scenario_against_the_macro_app() {
    let server = Server::builder().application(test_app()).build().unwrap();
    let addr = within(
        LIMIT,
        "a TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let steps = common::scenario(&format!("jstp://{addr}"), "basic", &[]).await;
    assert!(
        steps.iter().any(|s| s["step"] == "inspectCalculator"),
        "{steps:?}"
    );
    server.shutdown().await;
}

/// The generated clients against their (`@metarhia/jstp`) server.
#[tokio::test]
async fn generated_clients_against_their_server() {
    let certs = common::certs();
    let (_node, urls) = within(LIMIT, "the node server", common::node_server(&certs, &[])).await;
    let url = &urls.iter().find(|(k, _)| *k == "tcp").unwrap().1;
    let conn = within(
        LIMIT,
        "the handshake with the node server",
        connect(url, "testApp", ClientOptions::default().no_reconnect()),
    )
    .await
    .unwrap();
    let calc = CalculatorClient::new(conn.clone());
    assert_eq!(
        within(
            LIMIT,
            "their calculator.divide(20, 10)",
            calc.divide(20.0, 10.0)
        )
        .await
        .unwrap(),
        2.0
    );
    assert_eq!(
        within(LIMIT, "their calculator.answer()", calc.answer())
            .await
            .unwrap(),
        42
    );
    let some = SomeServiceClient::new(conn.clone());
    assert_eq!(
        within(
            LIMIT,
            "their someService.sayHi('Rust')",
            some.say_hi("Rust".into())
        )
        .await
        .unwrap(),
        "Hi, Rust!"
    );
    conn.close().await;
}
