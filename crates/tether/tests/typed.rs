//! Typed methods, calls and events over the in-memory transport: Rust values in and out on both
//! sides, `[17]` for arguments that do not convert (count or type), `[16]` for a result that
//! cannot go on the wire, and conversion errors that name the failing argument.

mod common;

use common::{within, LIMIT};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tether::typed::{signature_reason, TypedBroadcast, TypedConnection, TypedError, TypedProxy};
use tether::{
    connect_transport, memory, Application, ClientOptions, Connection, ErrorCode, Interface,
    RemoteError, Server, Value,
};
use tether_wire::ValueErrorKind;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u32,
    items: Vec<String>,
    note: Option<String>,
    prices: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Receipt {
    Accepted { id: u32, total: f64 },
    Refused(String),
}

/// The server under test, and what its typed event handler saw.
fn server() -> (Server, mpsc::UnboundedReceiver<(String, u32)>) {
    let (seen, events) = mpsc::unbounded_channel();
    let app = Application::new("typedApp", "1.0.0").unwrap().interface(
        "shop",
        Interface::new()
            .typed_method("divide", |_conn, (a, b): (f64, f64)| async move {
                if b == 0.0 {
                    return Err(RemoteError::new(1, "Zero division"));
                }
                Ok(a / b)
            })
            .typed_method("place", |_conn, (order,): (Order,)| async move {
                if order.items.is_empty() {
                    return Ok(Receipt::Refused("empty".into()));
                }
                let total = order.items.iter().filter_map(|i| order.prices.get(i)).sum();
                Ok::<_, RemoteError>(Receipt::Accepted {
                    id: order.id,
                    total,
                })
            })
            .typed_method("nothing", |_conn, (): ()| async {
                Ok::<(), RemoteError>(())
            })
            .typed_method("infinite", |_conn, (): ()| async {
                Ok::<f64, RemoteError>(f64::INFINITY)
            })
            .typed_method("huge", |_conn, (): ()| async {
                Ok::<u64, RemoteError>(1 << 60)
            })
            .on_typed_event("visited", move |_conn, (page, count): (String, u32)| {
                let _ = seen.send((page, count));
            }),
    );
    let server = Server::builder().application(app).build().unwrap();
    (server, events)
}

async fn client(server: &Server, options: ClientOptions) -> Connection {
    let (a, b) = memory::pair(16);
    server.serve_transport(a);
    within(
        LIMIT,
        "the handshake reply to a typedApp client",
        connect_transport(b, "typedApp", options),
    )
    .await
    .unwrap()
}

fn remote_code(e: &TypedError) -> Option<i64> {
    e.remote().map(|r| r.code)
}

#[tokio::test]
async fn typed_method_and_typed_call_carry_rust_values() {
    let (server, _events) = server();
    let conn = client(&server, ClientOptions::default()).await;

    let q: f64 = within(
        LIMIT,
        "the answer to shop.divide(20, 8)",
        conn.call_typed("shop", "divide", (20.0, 8.0)),
    )
    .await
    .unwrap();
    assert_eq!(q, 2.5);

    let order = Order {
        id: 7,
        items: vec!["tea".into(), "cake".into()],
        note: None,
        prices: [("tea".to_owned(), 1.5), ("cake".to_owned(), 2.25)].into(),
    };
    let receipt: Receipt = within(
        LIMIT,
        "the answer to shop.place(order)",
        conn.call_typed("shop", "place", (&order,)),
    )
    .await
    .unwrap();
    assert_eq!(receipt, Receipt::Accepted { id: 7, total: 3.75 });
    let empty = Order {
        items: vec![],
        ..order
    };
    let receipt: Receipt = within(
        LIMIT,
        "the answer to shop.place(empty order)",
        conn.call_typed("shop", "place", (empty,)),
    )
    .await
    .unwrap();
    assert_eq!(receipt, Receipt::Refused("empty".into()));

    // `()` answers `ok:[]`, as a JS function returning nothing does.
    let raw = within(
        LIMIT,
        "the answer to shop.nothing()",
        conn.call("shop", "nothing", vec![]),
    )
    .await
    .unwrap();
    assert_eq!(raw, Vec::<Value>::new());
    let (): () = within(
        LIMIT,
        "the typed answer to shop.nothing()",
        conn.call_typed("shop", "nothing", ()),
    )
    .await
    .unwrap();

    // Through a proxy learned by inspect, and with a call's own deadline.
    let shop = within(LIMIT, "the answer to inspect(shop)", conn.inspect("shop"))
        .await
        .unwrap();
    let q: f64 = within(
        LIMIT,
        "the answer to shop.divide(9, 4) through a proxy",
        shop.call_typed("divide", (9, 4)),
    )
    .await
    .unwrap();
    assert_eq!(q, 2.25);
    let e = within(
        LIMIT,
        "a proxy call of a method the peer did not report",
        shop.call_typed::<()>("missing", ()),
    )
    .await
    .unwrap_err();
    assert_eq!(remote_code(&e), Some(ErrorCode::MethodNotFound.code()));
    let q: f64 = within(
        LIMIT,
        "the answer to shop.divide(1, 4) with its own deadline",
        conn.call_typed_timeout("shop", "divide", (1, 4), LIMIT),
    )
    .await
    .unwrap();
    assert_eq!(q, 0.25);

    // The method's own errors pass through unchanged.
    let e = within(
        LIMIT,
        "the answer to shop.divide(1, 0)",
        conn.call_typed::<f64>("shop", "divide", (1.0, 0.0)),
    )
    .await
    .unwrap_err();
    assert_eq!(e.remote(), Some(&RemoteError::new(1, "Zero division")));
    conn.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_argument_count_answers_17() {
    let (server, _events) = server();
    let conn = client(&server, ClientOptions::default()).await;
    for args in [
        vec![],
        vec![Value::from(1)],
        vec![Value::from(1), Value::from(2), Value::from(3)],
    ] {
        let n = args.len();
        let e = within(
            LIMIT,
            &format!("the answer to shop.divide with {n} arguments"),
            conn.call("shop", "divide", args),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::InvalidSignature.code()),
            "{n}: {e}"
        );
    }
    let e = within(
        LIMIT,
        "the answer to a typed shop.divide with one argument",
        conn.call_typed::<f64>("shop", "divide", (1.0,)),
    )
    .await
    .unwrap_err();
    assert_eq!(remote_code(&e), Some(17), "{e}");
    let e = within(
        LIMIT,
        "the answer to shop.nothing(1)",
        conn.call_typed::<()>("shop", "nothing", (1,)),
    )
    .await
    .unwrap_err();
    assert_eq!(remote_code(&e), Some(17), "{e}");
    conn.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_wrong_argument_type_answers_17_naming_the_argument() {
    let (server, _events) = server();
    let conn = client(&server, ClientOptions::default()).await;
    let e = within(
        LIMIT,
        "the answer to shop.divide(1, 'two')",
        conn.call_typed::<f64>("shop", "divide", (1.0, "two")),
    )
    .await
    .unwrap_err();
    let remote = e.remote().expect("a remote error");
    assert_eq!(remote.code, 17);
    let reason = signature_reason(remote).unwrap_or_default();
    assert!(
        reason.starts_with("argument 1: invalid type: string \"two\""),
        "{remote:?}"
    );

    // A field deep inside a struct argument: the reason says where.
    let e = within(
        LIMIT,
        "the answer to shop.place with a bad order",
        conn.call(
            "shop",
            "place",
            vec![tether_wire::parse("{id:1,items:['a',2],note:null,prices:{}}").unwrap()],
        ),
    )
    .await
    .unwrap_err();
    let remote = e.remote().expect("a remote error");
    assert_eq!(remote.code, 17);
    assert!(
        signature_reason(remote)
            .unwrap_or_default()
            .starts_with("argument 0.items[1]: invalid type"),
        "{remote:?}"
    );

    // An id past 2^53 − 1 does not fit: refused, not rounded.
    let e = within(
        LIMIT,
        "the answer to shop.place with an unsafe id",
        conn.call(
            "shop",
            "place",
            vec![tether_wire::parse("{id:9007199254740993,items:[],prices:{}}").unwrap()],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(17), "{e}");
    let reason = e.remote().and_then(signature_reason).unwrap_or_default();
    assert!(
        reason.starts_with("argument 0.id: integer 9007199254740992 is past 2^53 - 1"),
        "{e:?}"
    );
    conn.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn results_that_cannot_go_on_the_wire_answer_16() {
    let (server, _events) = server();
    let conn = client(&server, ClientOptions::default()).await;
    for method in ["infinite", "huge"] {
        let e = within(
            LIMIT,
            &format!("the answer to shop.{method}()"),
            conn.call("shop", method, vec![]),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::InternalApiError.code()),
            "{method}: {e}"
        );
    }
    conn.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_calling_side_reports_its_own_conversion_errors() {
    let (server, _events) = server();
    let conn = client(&server, ClientOptions::default()).await;
    // Arguments that cannot be sent: nothing goes out.
    let e = within(
        LIMIT,
        "a typed call with an unsafe integer argument",
        conn.call_typed::<f64>("shop", "divide", (1u64 << 60, 1)),
    )
    .await
    .unwrap_err();
    let TypedError::Arguments(cause) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(
        cause.kind(),
        &ValueErrorKind::UnsafeInteger((1u64 << 60).to_string())
    );
    assert_eq!(
        e.to_string(),
        format!("arguments: argument 0: {}", cause.kind())
    );
    // A result that is not the type asked for.
    let e = within(
        LIMIT,
        "the answer to shop.divide(1, 2) read as a string",
        conn.call_typed::<String>("shop", "divide", (1, 2)),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, TypedError::Result(_)), "{e:?}");
    conn.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn typed_events_reach_typed_handlers_in_order_and_bad_ones_are_skipped() {
    let (server, mut events) = server();
    let conn = client(&server, ClientOptions::default()).await;
    within(
        LIMIT,
        "room for a wrongly typed visited event",
        conn.emit_typed("shop", "visited", ("home", "many")),
    )
    .await
    .unwrap();
    within(
        LIMIT,
        "room for a visited event",
        conn.emit_typed("shop", "visited", ("home", 3u32)),
    )
    .await
    .unwrap();
    conn.try_emit_typed("shop", "visited", (String::from("cart"), 1u32))
        .unwrap();
    // The first event did not convert, so the handler's first run is the second one.
    let shop = within(LIMIT, "the answer to inspect(shop)", conn.inspect("shop"))
        .await
        .unwrap();
    within(
        LIMIT,
        "room for a visited event through a proxy",
        shop.emit_typed("visited", ("proxy", 2u32)),
    )
    .await
    .unwrap();
    let first = within(LIMIT, "the first visited event", events.recv()).await;
    assert_eq!(first, Some(("home".to_owned(), 3)));
    let second = within(LIMIT, "the second visited event", events.recv()).await;
    assert_eq!(second, Some(("cart".to_owned(), 1)));
    let third = within(LIMIT, "the third visited event", events.recv()).await;
    assert_eq!(third, Some(("proxy".to_owned(), 2)));

    // Server to client: a typed broadcast reaches the client application's typed handler.
    let (got, mut received) = mpsc::unbounded_channel();
    let client_app = Application::client_default().interface(
        "news",
        Interface::new().on_typed_event("headline", move |_conn, (title, n): (String, u8)| {
            let _ = got.send((title, n));
        }),
    );
    let listener = client(&server, ClientOptions::default().application(client_app)).await;
    let queued = server
        .broadcast_typed("news", "headline", ("typed", 1u8))
        .unwrap();
    assert_eq!(queued, 2);
    let headline = within(LIMIT, "the broadcast headline", received.recv()).await;
    assert_eq!(headline, Some(("typed".to_owned(), 1)));
    let e: TypedError = server
        .broadcast_typed("news", "headline", (f64::NAN,))
        .unwrap_err();
    assert!(
        matches!(&e, TypedError::Arguments(c) if matches!(c.kind(), ValueErrorKind::NonFinite(_))),
        "{e:?}"
    );
    listener.close().await;
    conn.close().await;
    server.shutdown().await;
}

// ------------------------------------------------------------ with the real Node peer

/// The fixture's testApp, written with typed methods only.
fn typed_test_app() -> Application {
    Application::new("testApp", "1.0.0")
        .unwrap()
        .interface(
            "calculator",
            Interface::new()
                .typed_method("answer", |_conn, (): ()| async {
                    Ok::<u8, RemoteError>(42)
                })
                .typed_method("divide", |_conn, (a, b): (f64, f64)| async move {
                    if b == 0.0 {
                        return Err(RemoteError::new(1, "Zero division"));
                    }
                    Ok(a / b)
                })
                .typed_method("doNothing", |_conn, (): ()| async {
                    Ok::<(), RemoteError>(())
                }),
        )
        .interface(
            "someService",
            Interface::new()
                .typed_method("sayHi", |_conn, (name,): (String,)| async move {
                    Ok::<_, RemoteError>(format!("Hi, {name}!"))
                })
                .typed_method("say", |_conn, (what,): (Value,)| async move {
                    Ok::<_, RemoteError>(what)
                }),
        )
        .interface(
            "someOtherService",
            Interface::new()
                .typed_method("method", |_conn, (x,): (Value,)| async move {
                    Ok::<_, RemoteError>(x)
                })
                .typed_method("otherMethod", |_conn, (): ()| async {
                    Ok::<(), RemoteError>(())
                }),
        )
}

/// The Node client's `basic` scenario (the fixture's methods, errors, inspect, ping) passes
/// against the fixture written with typed methods.
#[tokio::test]
async fn their_client_passes_the_basic_scenario_against_typed_methods() {
    let server = Server::builder()
        .application(typed_test_app())
        .build()
        .unwrap();
    let addr = within(
        LIMIT,
        "a TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let steps = common::scenario(&format!("jstp://{addr}"), "basic", &[]).await;
    let names: Vec<_> = steps
        .iter()
        .map(|s| s["step"].as_str().unwrap_or(""))
        .collect();
    assert!(
        names.contains(&"divide") && names.contains(&"inspectSomeService"),
        "{names:?}"
    );
    server.shutdown().await;
}

/// Our typed client against their (`@metarhia/jstp`) server: results, a user struct and an
/// enum through a JS echo, JS's own `[17]` for a wrong arity.
#[tokio::test]
async fn our_typed_client_against_their_server() {
    let certs = common::certs();
    let (_node, urls) = within(LIMIT, "the node server", common::node_server(&certs, &[])).await;
    let url = &urls.iter().find(|(k, _)| *k == "tcp").unwrap().1;
    let conn = within(
        LIMIT,
        "the handshake with the node server",
        tether::connect(url, "testApp", ClientOptions::default().no_reconnect()),
    )
    .await
    .unwrap();

    let q: f64 = within(
        LIMIT,
        "their calculator.divide(20, 8)",
        conn.call_typed("calculator", "divide", (20, 8)),
    )
    .await
    .unwrap();
    assert_eq!(q, 2.5);
    let hi: String = within(
        LIMIT,
        "their someService.sayHi('Rust')",
        conn.call_typed("someService", "sayHi", ("Rust",)),
    )
    .await
    .unwrap();
    assert_eq!(hi, "Hi, Rust!");
    let (): () = within(
        LIMIT,
        "their calculator.doNothing()",
        conn.call_typed("calculator", "doNothing", ()),
    )
    .await
    .unwrap();

    let order = Order {
        id: 9,
        items: vec!["it's \"quoted\"".into(), "ünï".into()],
        note: None,
        prices: [("a".to_owned(), -1.5), ("7".to_owned(), 1e21)].into(),
    };
    let echoed: Order = within(
        LIMIT,
        "their someOtherService.method(order)",
        conn.call_typed("someOtherService", "method", (&order,)),
    )
    .await
    .unwrap();
    assert_eq!(echoed, order);
    let receipt = Receipt::Accepted {
        id: 1,
        total: 0.1 + 0.2,
    };
    let echoed: Receipt = within(
        LIMIT,
        "their someService.say(receipt)",
        conn.call_typed("someService", "say", (&receipt,)),
    )
    .await
    .unwrap();
    assert_eq!(echoed, receipt);

    let e = within(
        LIMIT,
        "their calculator.divide(1)",
        conn.call_typed::<f64>("calculator", "divide", (1,)),
    )
    .await
    .unwrap_err();
    assert_eq!(remote_code(&e), Some(17), "{e}");
    let e = within(
        LIMIT,
        "their calculator.divide(1, 0)",
        conn.call_typed::<f64>("calculator", "divide", (1, 0)),
    )
    .await
    .unwrap_err();
    assert_eq!(remote_code(&e), Some(1), "{e}");
    conn.close().await;
}
