//! Interop with the real `@metarhia/jstp@2.3.0` (interop/jstp-peer.js) over TCP, TLS, Unix
//! sockets, WS and WSS, both ways.
//!
//! Their server, our client: handshakes (anonymous, login, wrong password, unknown app, the
//! version table of upstream's api-versions test), calls with results, arguments and errors
//! (zero division, strict arity, unknown interface and method), inspect, events both ways,
//! chat broadcasts, their server calling, inspecting and pinging our client's application,
//! and heartbeats both ways.
//!
//! Their client, our server: the peer's scenarios (basic, login, badlogin, unknownapp,
//! version, echo, server-events, heartbeat, serve-client), our server calling their client's
//! application from `ServerEvent::Connect`, a chat broadcast to clients on every transport at
//! once, and raw bytes (garbage, a call before the handshake, an unknown app, a second
//! handshake, an unknown kind, a WebSocket without the subprotocol) checked frame by frame.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it); fails without it.

mod common;

use common::{certs, node_server, scenario, step, url, Certs, KINDS};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value as Json};
use std::future::Future;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::transport::{self, server_config, ClientTransportConfig, ListenerOptions};
use tether::{
    connect, Application, ClientOptions, Connection, ConnectionEvent, Error, Interface,
    LoginPolicy, RemoteError, Server, ServerEvent, TransportKind, Value,
};
use tokio::sync::broadcast;

/// Upper bound for anything a test waits for; reaching it fails the test.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Our client options: no reconnects, and the throwaway certificate as the only trust anchor
/// (TLS and WSS verify their server's certificate for real).
fn options(certs: &Certs) -> ClientOptions {
    let mut options = ClientOptions::default().no_reconnect();
    options.transport.tls.ca_pem = Some(certs.cert.clone());
    options
}

fn transport_kind(kind: &str) -> TransportKind {
    match kind {
        "tcp" => TransportKind::Tcp,
        "tls" => TransportKind::Tls,
        "unix" => TransportKind::Unix,
        "ws" => TransportKind::Ws,
        "wss" => TransportKind::Wss,
        _ => unreachable!("{kind}"),
    }
}

/// A lowercase hyphenated UUID v4, what upstream uses for session ids.
fn is_uuid_v4(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            14 => c == '4',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

fn remote(result: Result<Vec<Value>, Error>) -> RemoteError {
    match result {
        Err(Error::Remote(e)) => e,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

fn values(items: impl IntoIterator<Item = impl Into<Value>>) -> Value {
    Value::from(items.into_iter().map(Into::into).collect::<Vec<Value>>())
}

/// The next `iface.name` event on a connection.
async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    iface: &str,
    name: &str,
) -> Vec<Value> {
    within(&format!("event {iface}.{name}"), async {
        loop {
            match events.recv().await.expect("event stream ended") {
                ConnectionEvent::Event {
                    iface: i,
                    event,
                    args,
                } if i == iface && event == name => return args,
                _ => {}
            }
        }
    })
    .await
}

// ------------------------------------------------------------ their server, our client

/// Our client against their server on every transport: calls, errors, inspect, events,
/// broadcasts, handshakes and versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_their_server() {
    let certs = certs();
    let (_node, urls) = within(
        "the node server",
        node_server(&certs, &["--login", "user:pass"]),
    )
    .await;
    for (kind, url) in urls {
        // Anonymous handshake, no version: the newest application.
        let conn = within("connect", connect(&url, "testApp", options(&certs)))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let session = conn.session_id().unwrap_or_default();
        assert!(is_uuid_v4(&session), "{kind}: session id {session:?}");
        assert_eq!(conn.username(), None);
        assert_eq!(conn.transport_info().unwrap().kind, transport_kind(kind));
        let call = |iface: &'static str, method: &'static str, args: Vec<Value>| {
            let conn = conn.clone();
            async move { within("a call", conn.call(iface, method, args)).await }
        };

        assert_eq!(
            call("calculator", "answer", vec![]).await.unwrap(),
            [Value::from(42)],
            "{kind}"
        );
        assert_eq!(
            call("calculator", "divide", vec![20.into(), 8.into()])
                .await
                .unwrap(),
            [Value::from(2.5)],
            "{kind}"
        );
        // A Node `Error` goes on the wire as code 1 with its toString().
        let zero = remote(call("calculator", "divide", vec![1.into(), 0.into()]).await);
        assert_eq!(
            (zero.code, zero.message.as_deref()),
            (1, Some("Error: Zero division")),
            "{kind}"
        );
        assert_eq!(
            call("calculator", "doNothing", vec![]).await.unwrap(),
            [],
            "{kind}"
        );
        assert_eq!(
            call("someService", "sayHi", vec!["Rust".into()])
                .await
                .unwrap(),
            [Value::from("Hi, Rust!")],
            "{kind}"
        );
        let nested =
            tether_wire::parse("{list:[1,'two',null,true],text:'it\\'s \"q\"',n:-1.5,o:{}}")
                .unwrap();
        assert_eq!(
            call("someOtherService", "method", vec![nested.clone()])
                .await
                .unwrap(),
            [nested],
            "{kind}"
        );
        // Upstream's arity is strict: one argument short is an invalid signature.
        assert_eq!(
            remote(call("calculator", "divide", vec![1.into()]).await).code,
            17,
            "{kind}"
        );
        assert_eq!(
            remote(call("nope", "nope", vec![]).await).code,
            12,
            "{kind}"
        );
        assert_eq!(
            remote(call("calculator", "nope", vec![]).await).code,
            14,
            "{kind}"
        );

        let proxy = within("inspect", conn.inspect("calculator")).await.unwrap();
        assert_eq!(proxy.methods(), ["answer", "divide", "doNothing"], "{kind}");
        assert_eq!(
            within("a proxy call", proxy.call("answer", vec![]))
                .await
                .unwrap(),
            [Value::from(42)]
        );
        let no_iface = within("inspect", conn.inspect("nope")).await;
        assert_eq!(no_iface.err().and_then(|e| e.code()), Some(12), "{kind}");

        // Events both ways: ours is echoed back as events.echo(name, ...args); theirs is sent
        // on request by control.emit.
        let mut events = conn.events();
        within(
            "emit events.hello",
            conn.emit("events", "hello", vec![1.into(), "two".into()]),
        )
        .await
        .unwrap();
        assert_eq!(
            next_event(&mut events, "events", "echo").await,
            [Value::from("hello"), 1.into(), "two".into()],
            "{kind}"
        );
        assert_eq!(
            call(
                "control",
                "emit",
                vec!["chat".into(), "notice".into(), values([kind])]
            )
            .await
            .unwrap(),
            [],
            "{kind}"
        );
        assert_eq!(
            next_event(&mut events, "chat", "notice").await,
            [Value::from(kind)]
        );
        // chat.send by call and by event: broadcast back as chat.message(username, text).
        assert_eq!(
            call("chat", "send", vec!["by call".into()]).await.unwrap(),
            []
        );
        assert_eq!(
            next_event(&mut events, "chat", "message").await,
            [Value::Null, "by call".into()],
            "{kind}"
        );
        within(
            "emit chat.send",
            conn.emit("chat", "send", vec!["by event".into()]),
        )
        .await
        .unwrap();
        assert_eq!(
            next_event(&mut events, "chat", "message").await,
            [Value::Null, "by event".into()],
            "{kind}"
        );
        within("ping", conn.ping()).await.unwrap();
        within("close", conn.close()).await;

        // Their server's version table (upstream's api-versions test).
        for (spec, version) in [
            ("testApp@1", "1.0.0"),
            ("testApp@2", "2.0.0"),
            ("testApp@^1.0.0", "1.0.0"),
            ("testApp@^2", "2.0.0"),
            ("testApp@>1.0.0", "2.0.0"),
            ("testApp@1.0.0", "1.0.0"),
            ("testApp@2.0.0", "2.0.0"),
        ] {
            let c = within("connect", connect(&url, spec, options(&certs)))
                .await
                .unwrap_or_else(|e| panic!("{kind} {spec}: {e}"));
            assert_eq!(
                within("version.get", c.call("version", "get", vec![]))
                    .await
                    .unwrap(),
                [Value::from(version)],
                "{kind} {spec}"
            );
            within("close", c.close()).await;
        }
        for spec in ["testApp@9999", "testApp@^3.0.0", "noSuchApp"] {
            let refused = within("connect", connect(&url, spec, options(&certs))).await;
            assert_eq!(
                refused.err().and_then(|e| e.code()),
                Some(10),
                "{kind} {spec}"
            );
        }

        // Login: the user name is ours and goes with our chat messages.
        let user = within(
            "login",
            connect(&url, "testApp", options(&certs).login("user", "pass")),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(user.username().as_deref(), Some("user"));
        let mut user_events = user.events();
        within("chat.send", user.call("chat", "send", vec!["hi".into()]))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut user_events, "chat", "message").await,
            [Value::from("user"), "hi".into()],
            "{kind}"
        );
        within("close", user.close()).await;
        for (name, password) in [("user", "nope"), ("nobody", "pass")] {
            let wrong = within(
                "login",
                connect(&url, "testApp", options(&certs).login(name, password)),
            )
            .await;
            assert_eq!(wrong.err().and_then(|e| e.code()), Some(11), "{kind}");
        }
    }
    // As upstream's client, an invalid range fails locally, before any connection (nothing
    // listens on port 1).
    assert!(matches!(
        within(
            "a refused range",
            connect("jstp://127.0.0.1:1", "testApp@__invalid__", options(&certs))
        )
        .await,
        Err(Error::InvalidVersion(_))
    ));
}

/// Their server (with a 50 ms heartbeat) inspects, calls and pings our client's application;
/// our 50 ms heartbeat gets their pongs, theirs gets ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_server_calls_our_client() {
    let certs = certs();
    let (_node, urls) = within(
        "the node server",
        node_server(&certs, &["--heartbeat", "50"]),
    )
    .await;
    let client_app = Application::new("tetherClient", "1.0.0")
        .unwrap()
        .interface(
            "clientIface",
            Interface::new()
                .method("echo", |_c, a: Vec<Value>| async move {
                    Ok(a.into_iter().next().unwrap_or(Value::Null))
                })
                .method("add", |_c, a: Vec<Value>| async move {
                    let sum: f64 = a.iter().filter_map(Value::as_f64).sum();
                    Ok(Value::from(sum))
                }),
        );
    for (kind, url) in urls {
        let opts = options(&certs)
            .application(client_app.clone())
            .heartbeat(Duration::from_millis(50));
        let conn = within("connect", connect(&url, "testApp", opts))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let mut events = conn.events();
        let control = |method: &'static str, args: Vec<Value>| {
            let conn = conn.clone();
            async move { within("a control call", conn.call("control", method, args)).await }
        };
        let empty = || Value::from(Vec::<Value>::new());
        assert_eq!(
            control("inspectClient", vec!["clientIface".into()])
                .await
                .unwrap(),
            [values(["echo", "add"])],
            "{kind}"
        );
        assert_eq!(
            remote(control("inspectClient", vec!["noIface".into()]).await).code,
            12,
            "{kind}"
        );
        let nested = tether_wire::parse("{a:[1,{b:null}],s:'x'}").unwrap();
        assert_eq!(
            control(
                "callClient",
                vec![
                    "clientIface".into(),
                    "echo".into(),
                    values([nested.clone()])
                ]
            )
            .await
            .unwrap(),
            [nested],
            "{kind}"
        );
        assert_eq!(
            control(
                "callClient",
                vec!["clientIface".into(), "add".into(), values([2, 3])]
            )
            .await
            .unwrap(),
            [Value::from(5)],
            "{kind}"
        );
        // Our errors reach their server, which passes them on to us.
        for (iface, method, code) in [("clientIface", "nope", 14), ("noIface", "x", 12)] {
            let args = vec![iface.into(), method.into(), empty()];
            assert_eq!(
                remote(control("callClient", args).await).code,
                code,
                "{kind}"
            );
        }
        // control.ping answers once our pong reached their server.
        assert_eq!(control("ping", vec![]).await.unwrap(), [], "{kind}");
        // Heartbeats: their pongs to our pings, and their own pings (ours answer them).
        let (mut pongs, mut pings) = (0, 0);
        within("heartbeats", async {
            while pongs < 2 || pings < 3 {
                match events.recv().await.unwrap() {
                    ConnectionEvent::Pong { .. } => pongs += 1,
                    ConnectionEvent::Ping { id } => {
                        assert!(id < 0, "{kind}: a server's ping id is negative: {id}");
                        pings += 1;
                    }
                    _ => {}
                }
            }
        })
        .await;
        within("close", conn.close()).await;
    }
}

// ------------------------------------------------------------ their client, our server

/// Argument `i` as a string (empty when missing).
fn text(a: &[Value], i: usize) -> String {
    a.get(i)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Argument `i` as a list of values (empty when missing).
fn list(a: &[Value], i: usize) -> Vec<Value> {
    a.get(i)
        .and_then(Value::as_array)
        .unwrap_or_default()
        .to_vec()
}

fn failed(e: Error) -> RemoteError {
    match e {
        Error::Remote(e) => e,
        other => RemoteError::new(1, other.to_string()),
    }
}

/// Our server with the same fixture as the Node peer's: `testApp@1.0.0` and `@2.0.0`
/// (upstream's test app, chat, `version.get`, the `control` and `events` interfaces the
/// scenarios use), user `login`/`password`, TLS with the throwaway certificate.
fn our_server(certs: &Certs, heartbeat: Option<Duration>) -> Server {
    let chat = ChatHub::new();
    let version = |v: &'static str| {
        Interface::new().method("get", move |_c, _a| async move { Ok(Value::from(v)) })
    };
    let control = Interface::new()
        .method("emit", |conn: Connection, a: Vec<Value>| async move {
            let (iface, event, args) = (text(&a, 0), text(&a, 1), list(&a, 2));
            conn.emit(&iface, &event, args).await.map_err(failed)?;
            Ok(Value::Undefined)
        })
        .method("callClient", |conn: Connection, a: Vec<Value>| async move {
            let (iface, method, args) = (text(&a, 0), text(&a, 1), list(&a, 2));
            let values = conn.call(&iface, &method, args).await.map_err(failed)?;
            Ok(values.into_iter().next().unwrap_or(Value::Undefined))
        })
        .method(
            "inspectClient",
            |conn: Connection, a: Vec<Value>| async move {
                let proxy = conn.inspect(&text(&a, 0)).await.map_err(failed)?;
                Ok(Value::from(proxy.methods().to_vec()))
            },
        )
        .method("ping", |conn: Connection, _a| async move {
            conn.ping().await.map_err(failed)?;
            Ok(Value::Undefined)
        });
    let events = Interface::new().on_event("hello", |conn: Connection, a: Vec<Value>| {
        let mut echo = vec![Value::from("hello")];
        echo.extend(a);
        let _ = conn.try_emit("events", "echo", echo);
    });
    let base = test_app(chat.clone())
        .interface("control", control)
        .interface("events", events);
    let v2 = base
        .clone()
        .with_version("2.0.0")
        .unwrap()
        .interface("version", version("2.0.0"));
    let v1 = base.interface("version", version("1.0.0"));
    let tls = server_config(&certs.cert, &certs.key).unwrap();
    let mut builder = Server::builder()
        .application(v1)
        .application(v2)
        .auth_policy(LoginPolicy::new().user("login", "password"))
        .listener_options(ListenerOptions::default().with_tls(tls));
    if let Some(interval) = heartbeat {
        builder = builder.heartbeat_interval(interval);
    }
    let server = builder.build().unwrap();
    chat.bind(&server);
    server
}

/// Listens on every transport (port 0, a socket in the temp dir); returns each URL.
async fn listen_everywhere(server: &Server, certs: &Certs) -> Vec<(&'static str, String)> {
    let mut urls = Vec::new();
    for kind in KINDS {
        let endpoint = match kind {
            "unix" => format!("unix:{}", certs.dir.path().join("tether.sock").display()),
            other => url(other, "127.0.0.1:0"),
        };
        let addr = within("listen", server.listen(endpoint.parse().unwrap()))
            .await
            .unwrap();
        urls.push((kind, url(kind, &addr)));
    }
    urls
}

/// The peer's scenario, bounded by [`LIMIT`].
async fn run(url: &str, name: &str, args: &[&str]) -> Vec<Json> {
    within(
        &format!("scenario {name} on {url}"),
        scenario(url, name, args),
    )
    .await
}

fn error_code(step: &Json) -> &Json {
    assert_eq!(step["ok"], false, "{step}");
    &step["error"]["code"]
}

/// Their client against our server on every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_against_our_server() {
    let certs = certs();
    let server = our_server(&certs, None);
    let urls = listen_everywhere(&server, &certs).await;
    for (kind, url) in &urls {
        let basic = run(url, "basic", &["--strict"]).await;
        for (name, result) in [
            ("answer", json!([42])),
            ("divide", json!([2])),
            ("doNothing", json!([])),
            ("sayHi", json!(["Hi, Rust!"])),
            // '\ud800x' echoed as its UTF-16 code units, not U+FFFD.
            ("sayLoneSurrogate", json!([[0xd800, 0x78]])),
            (
                "inspectCalculator",
                json!(["answer", "divide", "doNothing"]),
            ),
            ("inspectSomeService", json!(["sayHi", "say"])),
            ("ping", json!(null)),
        ] {
            let s = step(&basic, name);
            assert_eq!(
                (&s["ok"], &s["result"]),
                (&json!(true), &result),
                "{kind} {s}"
            );
        }
        let zero = step(&basic, "divideByZero");
        assert_eq!(error_code(zero), 1, "{kind}");
        assert_eq!(zero["error"]["message"], "Error: Zero division", "{kind}");
        for (name, code) in [
            ("unknownInterface", 12),
            ("unknownMethod", 14),
            ("inspectUnknown", 12),
        ] {
            assert_eq!(error_code(step(&basic, name)), code, "{kind} {name}");
        }
        assert_eq!(step(&basic, "method")["pass"], true, "{kind}");
        let handshake = step(&basic, "handshake");
        assert!(
            is_uuid_v4(handshake["result"]["session"].as_str().unwrap_or_default()),
            "{kind}: {handshake}"
        );

        let login = run(url, "login", &["--strict"]).await;
        assert_eq!(step(&login, "handshake")["result"]["username"], "login");
        assert_eq!(step(&login, "answer")["result"], json!([42]));
        for extra in [
            &["--password", "wrong"][..],
            &["--user", "nobody", "--password", "password"],
        ] {
            let mut args = vec!["--strict"];
            args.extend_from_slice(extra);
            let bad = run(url, "badlogin", &args).await;
            assert_eq!(error_code(step(&bad, "handshake")), 11, "{kind}");
        }
        let unknown = run(url, "unknownapp", &["--strict"]).await;
        assert_eq!(error_code(step(&unknown, "handshake")), 10, "{kind}");

        for (app, expect) in [
            ("testApp", "2.0.0"),
            ("testApp@1", "1.0.0"),
            ("testApp@^2", "2.0.0"),
            ("testApp@>1.0.0", "2.0.0"),
            ("testApp@1.0.0", "1.0.0"),
            ("testApp@2.0.0", "2.0.0"),
        ] {
            let steps = run(
                url,
                "version",
                &["--app", app, "--expect", expect, "--strict"],
            )
            .await;
            assert_eq!(
                step(&steps, "version")["result"],
                json!([expect]),
                "{kind} {app}"
            );
        }
        let too_new = run(url, "version", &["--app", "testApp@9999", "--expect", "10"]).await;
        assert_eq!(error_code(step(&too_new, "handshake")), 10, "{kind}");

        let echo = run(
            url,
            "echo",
            &["--event", "hello", "--args", r#"["a",{"b":[1,2]}]"#],
        )
        .await;
        assert_eq!(
            step(&echo, "echo")["result"],
            json!(["hello", "a", {"b": [1, 2]}]),
            "{kind}"
        );
        let server_events = run(url, "server-events", &["--strict"]).await;
        assert_eq!(
            step(&server_events, "received")["result"],
            json!(["from server", 2]),
            "{kind}"
        );
        // Their client asks our server (control.*) to inspect, call and ping it.
        let served = run(
            url,
            "serve-client",
            &["--trigger", "--expect", "2", "--strict"],
        )
        .await;
        assert_eq!(
            step(&served, "inspectClient")["result"],
            json!([["echo", "add"]])
        );
        assert_eq!(step(&served, "callClient")["result"], json!(["ping"]));
        let methods: Vec<&Json> = served
            .iter()
            .filter(|s| s["step"] == "served")
            .map(|s| &s["result"]["method"])
            .collect();
        assert_eq!(methods, [&json!("echo"), &json!("add")], "{kind}");
    }
    within("server shutdown", server.shutdown()).await;
}

/// Our server calls, inspects and pings their client's application on the connection
/// `ServerEvent::Connect` hands it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_server_calls_their_client() {
    let certs = certs();
    let server = our_server(&certs, None);
    let urls = listen_everywhere(&server, &certs).await;
    for (kind, url) in urls {
        let mut server_events = server.events();
        let peer = tokio::spawn({
            let url = url.clone();
            async move { run(&url, "serve-client", &["--expect", "2", "--strict"]).await }
        });
        let conn = within("ServerEvent::Connect", async {
            loop {
                if let ServerEvent::Connect(c) = server_events.recv().await.unwrap() {
                    break c;
                }
            }
        })
        .await;
        assert_eq!(conn.transport_info().unwrap().kind, transport_kind(kind));
        let proxy = within("inspect", conn.inspect("clientIface"))
            .await
            .unwrap();
        assert_eq!(proxy.methods(), ["echo", "add"], "{kind}");
        let no_iface = within("inspect", conn.inspect("noIface")).await;
        assert_eq!(no_iface.err().and_then(|e| e.code()), Some(12), "{kind}");
        for (iface, method, args, code) in [
            ("clientIface", "nope", vec![], 14),
            ("noIface", "echo", vec![], 12),
            // Their arity is strict.
            ("clientIface", "add", vec![Value::from(1)], 17),
        ] {
            let result = within("a call", conn.call(iface, method, args)).await;
            assert_eq!(remote(result).code, code, "{kind} {iface}.{method}");
        }
        within("ping", conn.ping()).await.unwrap();
        let nested = tether_wire::parse("{x:[1,'y',null],z:{}}").unwrap();
        assert_eq!(
            within(
                "echo",
                conn.call("clientIface", "echo", vec![nested.clone()])
            )
            .await
            .unwrap(),
            [nested]
        );
        assert_eq!(
            within("add", proxy.call("add", vec![2.into(), 3.into()]))
                .await
                .unwrap(),
            [Value::from(5)]
        );
        // Two calls served: their client goes away, and our side sees its transport end.
        let steps = within("their client", peer).await.unwrap();
        let served: Vec<&Json> = steps
            .iter()
            .filter(|s| s["step"] == "served")
            .map(|s| &s["result"])
            .collect();
        assert_eq!(
            served,
            [
                &json!({"iface": "clientIface", "method": "echo", "args": [{"x": [1, "y", null], "z": {}}]}),
                &json!({"iface": "clientIface", "method": "add", "args": [2, 3]}),
            ],
            "{kind}"
        );
        within("ServerEvent::Disconnect of that client", async {
            loop {
                match server_events.recv().await.unwrap() {
                    ServerEvent::Disconnect(c) if c.id() == conn.id() => break,
                    _ => {}
                }
            }
        })
        .await;
    }
    within("server shutdown", server.shutdown()).await;
}

/// Heartbeats both ways: their client pings every 50 ms, our server every 50 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_with_their_client() {
    let certs = certs();
    let server = our_server(&certs, Some(Duration::from_millis(50)));
    let urls = listen_everywhere(&server, &certs).await;
    for (kind, url) in &urls {
        let args = [
            "--interval",
            "50",
            "--expect",
            "2",
            "--expect-pings",
            "2",
            "--strict",
        ];
        let steps = run(url, "heartbeat", &args).await;
        let count = |name: &str| steps.iter().filter(|s| s["step"] == name).count();
        assert!(count("pong") >= 2, "{kind}: {steps:?}");
        assert!(count("ping-received") >= 2, "{kind}: {steps:?}");
        assert!(count("pong-sent") >= 2, "{kind}: {steps:?}");
        for s in steps.iter().filter(|s| s["step"] == "ping-received") {
            assert!(s["result"]["id"].as_i64().unwrap() < 0, "{kind}: {s}");
        }
    }
    within("server shutdown", server.shutdown()).await;
}

/// A chat broadcast reaches every client, whichever transport each uses, several at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_their_clients_on_every_transport() {
    let certs = certs();
    let server = our_server(&certs, None);
    let urls = listen_everywhere(&server, &certs).await;
    let mut server_events = server.events();
    // One listener per transport, each waiting for both messages.
    let listeners: Vec<_> = urls
        .iter()
        .map(|(_, url)| {
            let url = url.clone();
            tokio::spawn(async move { run(&url, "events", &["--expect", "2", "--strict"]).await })
        })
        .collect();
    within("five connects", async {
        let mut connected = 0;
        while connected < urls.len() {
            if let ServerEvent::Connect(_) = server_events.recv().await.unwrap() {
                connected += 1;
            }
        }
    })
    .await;
    // Two senders at once on other transports: an anonymous one by call, a logged-in one by
    // event.
    let by_call = run(
        &urls[0].1,
        "events",
        &["--send", "by call", "--match", "by call", "--strict"],
    );
    let by_event = run(
        &urls[3].1,
        "events",
        &[
            "--send",
            "by event",
            "--via",
            "event",
            "--match",
            "by event",
            "--user",
            "login",
            "--password",
            "password",
            "--strict",
        ],
    );
    let (a, b) = tokio::join!(by_call, by_event);
    assert_eq!(step(&a, "send")["result"], json!([]));
    assert_eq!(step(&b, "handshake")["result"]["username"], "login");
    for (kind, listener) in KINDS.iter().zip(listeners) {
        let steps = within("a listener", listener).await.unwrap();
        let mut messages: Vec<&Json> = steps
            .iter()
            .filter(|s| s["step"] == "event" && s["result"]["event"] == "message")
            .map(|s| &s["result"]["args"])
            .collect();
        messages.sort_by_key(|m| m.to_string());
        assert_eq!(
            messages,
            [&json!(["login", "by event"]), &json!([null, "by call"])],
            "{kind}"
        );
    }
    within("server shutdown", server.shutdown()).await;
}

/// What a `raw` scenario saw: the frames, in order.
struct Raw {
    frames: Vec<String>,
    steps: Vec<Json>,
}

/// Their raw socket / WebSocket sends `sends` (no handshake of the peer's own). With `expect`
/// the peer stops after that many frames; without, it waits for the server to close, and a
/// `wait-elapsed` step (nothing closed it for `LIMIT / 2`) fails the test.
async fn raw(url: &str, sends: &[&str], expect: Option<usize>) -> Raw {
    let mut args = Vec::new();
    for s in sends {
        args.extend_from_slice(&["--send", s]);
    }
    let expect = expect.map(|n| n.to_string());
    if let Some(n) = &expect {
        args.extend_from_slice(&["--expect", n]);
    }
    let wait = (LIMIT.as_millis() / 2).to_string();
    args.extend_from_slice(&["--wait", &wait]);
    let steps = run(url, "raw", &args).await;
    assert_eq!(step(&steps, "connect")["ok"], true, "{url}: {steps:?}");
    assert!(
        !steps.iter().any(|s| s["step"] == "wait-elapsed"),
        "{url}: neither closed nor answered: {steps:?}"
    );
    let frames = steps
        .iter()
        .filter(|s| s["step"] == "frame")
        .map(|s| s["result"].as_str().expect("a text frame").to_owned())
        .collect();
    Raw { frames, steps }
}

/// Sends `sends` on a transport of our own, then reads until our server ends it: the frames
/// it answered with. Fails unless the server closes within `LIMIT` — the close is observed
/// here, on the socket, not inferred from what a peer printed.
async fn our_server_closes(url: &str, certs: &Certs, sends: &[&str]) -> Vec<String> {
    let mut config = ClientTransportConfig::default();
    config.tls.ca_pem = Some(certs.cert.clone());
    let endpoint = url.parse().unwrap();
    let mut transport = within("a raw connection", transport::connect(&endpoint, &config))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    for s in sends {
        within("a raw send", transport.outgoing.send((*s).to_owned()))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    let mut frames = Vec::new();
    let what = format!("our server to close {url} after {sends:?}");
    within(&what, async {
        // An error (a reset) ends the connection as much as an orderly end does.
        while let Some(Ok(frame)) = transport.incoming.next().await {
            frames.push(frame);
        }
    })
    .await;
    frames
}

fn handshake_ok(frame: &str) -> bool {
    frame
        .strip_prefix("{handshake:[0],ok:'")
        .and_then(|rest| rest.strip_suffix("'}"))
        .is_some_and(is_uuid_v4)
}

/// Raw bytes from Node sockets and WebSockets: what our server answers, frame by frame; and,
/// seen from a socket of our own, that it closes the connection after each protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_messages_from_their_side() {
    let certs = certs();
    let server = our_server(&certs, None);
    let urls = listen_everywhere(&server, &certs).await;
    let hs = "{handshake:[0,'testApp']}";
    for (kind, url) in &urls {
        // Garbage, and a call before the handshake: closed without an answer.
        for bad in ["not a message", "{call:[1,'calculator'],answer:[]}"] {
            let r = raw(url, &[bad], None).await;
            assert!(r.frames.is_empty(), "{kind} {bad}: {:?}", r.steps);
            let ours = our_server_closes(url, &certs, &[bad]).await;
            assert!(ours.is_empty(), "{kind} {bad}: {ours:?}");
        }
        // An unknown application: error 10, then closed.
        let nope = "{handshake:[0,'__nope__']}";
        let r = raw(url, &[nope], None).await;
        assert_eq!(r.frames, ["{handshake:[0],error:[10]}"], "{kind}");
        let ours = our_server_closes(url, &certs, &[nope]).await;
        assert_eq!(ours, ["{handshake:[0],error:[10]}"], "{kind}");
        // A handshake for version 1.0.0 (upstream puts it after the name), a call, an
        // unknown kind (rejected, not fatal), a ping: the handshake answer first, then the
        // callback and the pong in either order.
        let r = raw(
            url,
            &[
                "{handshake:[0,'testApp','1.0.0']}",
                "{call:[1,'calculator'],divide:[9,2]}",
                "{noSuchKind:[2]}",
                "{ping:[3]}",
            ],
            Some(3),
        )
        .await;
        assert_eq!(r.frames.len(), 3, "{kind}: {:?}", r.steps);
        assert!(handshake_ok(&r.frames[0]), "{kind}: {:?}", r.frames);
        let mut rest = r.frames[1..].to_vec();
        rest.sort();
        assert_eq!(rest, ["{callback:[1],ok:[4.5]}", "{pong:[3]}"], "{kind}");
        // A second handshake closes the connection.
        let r = raw(url, &[hs, hs], None).await;
        assert_eq!(r.frames.len(), 1, "{kind}: {:?}", r.frames);
        assert!(handshake_ok(&r.frames[0]), "{kind}: {:?}", r.frames);
        let ours = our_server_closes(url, &certs, &[hs, hs]).await;
        assert_eq!(ours.len(), 1, "{kind}: {ours:?}");
        assert!(handshake_ok(&ours[0]), "{kind}: {ours:?}");
        // A WebSocket client must offer the metarhia-jstp subprotocol.
        if kind.starts_with("ws") {
            let steps = run(url, "raw", &["--no-protocol"]).await;
            assert_eq!(step(&steps, "connect")["ok"], false, "{kind}: {steps:?}");
        }
    }
    within("server shutdown", server.shutdown()).await;
}
