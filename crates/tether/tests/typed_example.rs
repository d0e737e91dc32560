//! `examples/typed_client.rs` (typed proxies written for an existing JSTP app) run against the
//! real `@metarhia/jstp` server (interop/jstp-peer.js) and against our example app (written
//! with `#[interface]`): the same steps, the same results.

mod common;

#[allow(dead_code)] // its `main` is for `cargo run --example`
#[path = "../examples/typed_client.rs"]
mod typed_client;

use common::{within, LIMIT};
use tether::example::{test_app, ChatHub};
use tether::Server;

/// What the example prints against either server.
const EXPECTED: [&str; 8] = [
    "answer = 42",
    "divide(20, 8) = 2.5",
    "doNothing done",
    "divide(1, 0) failed with code Some(1)",
    "sayHi = Hi, Rust!",
    "order echoed intact: true",
    "chat.message from None: hello from Rust",
    "divide(1) = Err(Some(17))",
];

#[tokio::test]
async fn the_typed_client_example_against_their_server() {
    let certs = common::certs();
    let (_node, urls) = within(LIMIT, "the node server", common::node_server(&certs, &[])).await;
    for kind in ["tcp", "ws"] {
        let url = &urls.iter().find(|(k, _)| *k == kind).unwrap().1;
        let lines = within(LIMIT, "the example's run", typed_client::run(url))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(lines, EXPECTED, "{kind}");
    }
}

#[tokio::test]
async fn the_typed_client_example_against_our_example_app() {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .build()
        .unwrap();
    chat.bind(&server);
    let addr = within(
        LIMIT,
        "a TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let lines = within(
        LIMIT,
        "the example's run",
        typed_client::run(&format!("jstp://{addr}")),
    )
    .await
    .unwrap();
    assert_eq!(lines, EXPECTED);
    server.shutdown().await;
}
