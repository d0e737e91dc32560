//! Interop with the real `@metarhia/jstp@2.3.0` (interop/jstp-peer.js) over TCP, TLS, Unix
//! sockets, WS and WSS, both ways: our client against their server, their client against ours.
//! Handshakes (anonymous, login, wrong password, unknown app, version ranges), calls with
//! results, arguments and errors, unknown interface and method, inspect, events both ways,
//! broadcast to several clients, server → client calls, ping and heartbeat, and a message
//! before the handshake.
//!
//! Needs `npm ci --ignore-scripts` in interop/ (`.ci/run` does it).

mod common;

use common::{certs, node_server, scenario, step, url, KINDS};
use serde_json::json;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::transport::{server_config, ListenerOptions};
use tether::{
    connect, Application, ClientOptions, Connection, ConnectionEvent, Error, Interface,
    LoginPolicy, Server, ServerEvent, Value,
};
use tokio::sync::broadcast;

fn options() -> ClientOptions {
    let mut options = ClientOptions::default().no_reconnect();
    options.transport.tls.insecure = true;
    options
}

fn remote_code(result: Result<Vec<Value>, Error>) -> Option<i64> {
    match result {
        Err(Error::Remote(e)) => Some(e.code),
        other => panic!("expected a remote error, got {other:?}"),
    }
}

async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    iface: &str,
    name: &str,
) -> Vec<Value> {
    let wait = async {
        loop {
            match events.recv().await.unwrap() {
                ConnectionEvent::Event {
                    iface: i,
                    event,
                    args,
                } if i == iface && event == name => return args,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no {iface}.{name} event"))
}

/// Our client against their server on every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_their_server() {
    let certs = certs();
    let (_node, urls) = node_server(&certs, &["--login", "user:pass"]).await;
    for (kind, url) in urls {
        let conn = connect(&url, "testApp@1.0.0", options()).await.unwrap();
        let call = |iface: &'static str, method: &'static str, args: Vec<Value>| {
            let conn = conn.clone();
            async move { conn.call(iface, method, args).await }
        };
        assert_eq!(
            call("calculator", "answer", vec![]).await.unwrap(),
            vec![Value::from(42)]
        );
        assert_eq!(
            call("calculator", "divide", vec![20.into(), 10.into()])
                .await
                .unwrap(),
            vec![Value::from(2)],
            "{kind}"
        );
        match call("calculator", "divide", vec![1.into(), 0.into()]).await {
            Err(Error::Remote(e)) => {
                assert_eq!(e.code, 1, "{kind}");
                assert!(
                    e.display_message().contains("Zero division"),
                    "{kind}: {e:?}"
                );
            }
            other => panic!("{kind}: {other:?}"),
        }
        let nested = tether_wire::parse("{list:[1,'two',null,true],text:'it\\'s',n:-1.5}").unwrap();
        assert_eq!(
            call("someOtherService", "method", vec![nested.clone()])
                .await
                .unwrap(),
            vec![nested]
        );
        assert_eq!(
            remote_code(call("nope", "nope", vec![]).await),
            Some(12),
            "{kind}"
        );
        assert_eq!(
            remote_code(call("calculator", "nope", vec![]).await),
            Some(14),
            "{kind}"
        );
        let proxy = conn.inspect("calculator").await.unwrap();
        assert_eq!(proxy.methods(), ["answer", "divide", "doNothing"], "{kind}");
        assert_eq!(
            proxy.call("answer", vec![]).await.unwrap(),
            vec![Value::from(42)]
        );
        assert_eq!(
            call("version", "get", vec![]).await.unwrap(),
            vec![Value::from("1.0.0")],
            "{kind}"
        );

        // Events both ways: ours is echoed back; theirs arrives on request.
        let mut events = conn.events();
        conn.emit("events", "hello", vec![1.into(), "two".into()])
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut events, "events", "echo").await,
            vec![Value::from("hello"), 1.into(), "two".into()],
            "{kind}"
        );
        call(
            "control",
            "emit",
            vec![
                "chat".into(),
                "notice".into(),
                Value::from(vec![Value::from(kind)]),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            next_event(&mut events, "chat", "notice").await,
            vec![Value::from(kind)]
        );
        assert!(conn.ping().await.is_ok());
        conn.close().await;

        // Version ranges, login, wrong password, unknown app.
        for (spec, version) in [
            ("testApp", "2.0.0"),
            ("testApp@^1.0.0", "1.0.0"),
            ("testApp@>=2", "2.0.0"),
        ] {
            let c = connect(&url, spec, options()).await.unwrap();
            assert_eq!(
                c.call("version", "get", vec![]).await.unwrap(),
                vec![Value::from(version)],
                "{kind} {spec}"
            );
            c.close().await;
        }
        let logged_in = connect(&url, "testApp", options().login("user", "pass"))
            .await
            .unwrap();
        assert_eq!(logged_in.username().as_deref(), Some("user"));
        logged_in.close().await;
        let wrong = connect(&url, "testApp", options().login("user", "nope")).await;
        assert_eq!(wrong.err().and_then(|e| e.code()), Some(11), "{kind}");
        let unknown = connect(&url, "noSuchApp", options()).await;
        assert_eq!(unknown.err().and_then(|e| e.code()), Some(10), "{kind}");
        let too_new = connect(&url, "testApp@^3.0.0", options()).await;
        assert_eq!(too_new.err().and_then(|e| e.code()), Some(10), "{kind}");
    }
}

/// Their server calls methods of our client's application, inspects it, pings it; our
/// heartbeat gets pongs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_server_calls_our_client() {
    let certs = certs();
    let (_node, urls) = node_server(&certs, &[]).await;
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
        let opts = options()
            .application(client_app.clone())
            .heartbeat(Duration::from_millis(50));
        let conn = connect(&url, "testApp", opts).await.unwrap();
        let mut events = conn.events();
        let control = |method: &'static str, args: Vec<Value>| {
            let conn = conn.clone();
            async move { conn.call("control", method, args).await }
        };
        assert_eq!(
            control("inspectClient", vec!["clientIface".into()])
                .await
                .unwrap(),
            vec![Value::from(vec![Value::from("echo"), Value::from("add")])],
            "{kind}"
        );
        assert_eq!(
            control(
                "callClient",
                vec![
                    "clientIface".into(),
                    "add".into(),
                    Value::from(vec![Value::from(2), 3.into()])
                ]
            )
            .await
            .unwrap(),
            vec![Value::from(5)],
            "{kind}"
        );
        assert_eq!(
            remote_code(
                control(
                    "callClient",
                    vec![
                        "clientIface".into(),
                        "nope".into(),
                        Value::from(Vec::<Value>::new())
                    ]
                )
                .await
            ),
            Some(14)
        );
        assert_eq!(
            remote_code(
                control(
                    "callClient",
                    vec![
                        "noIface".into(),
                        "x".into(),
                        Value::from(Vec::<Value>::new())
                    ]
                )
                .await
            ),
            Some(12)
        );
        control("ping", vec![]).await.unwrap();
        // Our heartbeat: two pongs from their server.
        let mut pongs = 0;
        while pongs < 2 {
            if let ConnectionEvent::Pong { .. } = events.recv().await.unwrap() {
                pongs += 1;
            }
        }
        conn.close().await;
    }
}

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

fn our_server(certs: &common::Certs) -> Server {
    let chat = ChatHub::new();
    let version = |v: &'static str| {
        Interface::new().method("get", move |_c, _a| async move { Ok(Value::from(v)) })
    };
    // The control interface the Node peer's scenarios ask the server for.
    let control = Interface::new()
        .method("emit", |conn: Connection, a: Vec<Value>| async move {
            let iface = text(&a, 0);
            let event = text(&a, 1);
            let args = list(&a, 2);
            let _ = conn.emit(&iface, &event, args).await;
            Ok(Value::Undefined)
        })
        .method("callClient", |conn: Connection, a: Vec<Value>| async move {
            let iface = text(&a, 0);
            let method = text(&a, 1);
            let args = list(&a, 2);
            match conn.call(&iface, &method, args).await {
                Ok(values) => Ok(values.into_iter().next().unwrap_or(Value::Undefined)),
                Err(Error::Remote(e)) => Err(e),
                Err(e) => Err(tether::RemoteError::new(1, e.to_string())),
            }
        })
        .method(
            "inspectClient",
            |conn: Connection, a: Vec<Value>| async move {
                let iface = text(&a, 0);
                match conn.inspect(&iface).await {
                    Ok(proxy) => Ok(Value::from(proxy.methods().to_vec())),
                    Err(Error::Remote(e)) => Err(e),
                    Err(e) => Err(tether::RemoteError::new(1, e.to_string())),
                }
            },
        )
        .method("ping", |conn: Connection, _a| async move {
            conn.ping()
                .await
                .map_err(|e| tether::RemoteError::new(1, e.to_string()))?;
            Ok(Value::Undefined)
        });
    let events = Interface::new().on_event("hello", |conn: Connection, a: Vec<Value>| {
        let mut echo = vec![Value::from("hello")];
        echo.extend(a);
        let _ = conn.try_emit("events", "echo", echo);
    });
    // Both versions offer the same API, as upstream's fixture does; only version.get differs.
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
    let server = Server::builder()
        .application(v1)
        .application(v2)
        .auth_policy(LoginPolicy::new().user("login", "password"))
        .heartbeat_interval(Duration::from_millis(100))
        .listener_options(ListenerOptions::default().with_tls(tls))
        .build()
        .unwrap();
    chat.bind(&server);
    server
}

async fn listen_everywhere(server: &Server, certs: &common::Certs) -> Vec<(&'static str, String)> {
    let mut urls = Vec::new();
    for kind in KINDS {
        let endpoint = match kind {
            "unix" => format!("unix:{}", certs.dir.path().join("tether.sock").display()),
            other => url(other, "127.0.0.1:0"),
        };
        let addr = server.listen(endpoint.parse().unwrap()).await.unwrap();
        urls.push((kind, url(kind, &addr)));
    }
    urls
}

/// Their client against our server on every transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_against_our_server() {
    let certs = certs();
    let server = our_server(&certs);
    let urls = listen_everywhere(&server, &certs).await;
    for (kind, url) in &urls {
        let basic = scenario(url, "basic", &["--strict"]).await;
        for name in [
            "answer",
            "divide",
            "divideByZero",
            "method",
            "unknownInterface",
            "unknownMethod",
            "inspectCalculator",
            "ping",
        ] {
            assert_eq!(step(&basic, name)["pass"], true, "{kind} {name}");
        }
        let login = scenario(url, "login", &["--strict"]).await;
        assert_eq!(step(&login, "answer")["result"], json!([42]));
        scenario(url, "badlogin", &["--strict"]).await;
        scenario(url, "unknownapp", &["--strict"]).await;
        for (app, expect) in [
            ("testApp@^1.0.0", "1.0.0"),
            ("testApp", "2.0.0"),
            ("testApp@2.0.0", "2.0.0"),
            ("testApp@^3.0.0", "10"),
        ] {
            scenario(
                url,
                "version",
                &["--app", app, "--expect", expect, "--strict"],
            )
            .await;
        }
        let echo = scenario(url, "echo", &["--strict"]).await;
        assert_eq!(step(&echo, "echo")["pass"], true);
        scenario(url, "server-events", &["--strict"]).await;
        let served = scenario(
            url,
            "serve-client",
            &["--trigger", "--expect", "2", "--strict"],
        )
        .await;
        assert_eq!(
            served.iter().filter(|s| s["step"] == "served").count(),
            2,
            "{kind}: {served:?}"
        );
        let beats = scenario(
            url,
            "heartbeat",
            &[
                "--interval",
                "50",
                "--expect",
                "2",
                "--expect-pings",
                "2",
                "--strict",
            ],
        )
        .await;
        assert!(beats.iter().any(|s| s["step"] == "ping-received"), "{kind}");
        // Anything before the handshake closes the connection without an answer.
        let raw = scenario(
            url,
            "raw",
            &[
                "--send",
                "{call:[1,'calculator'],answer:[]}",
                "--wait",
                "10000",
            ],
        )
        .await;
        assert!(raw.iter().any(|s| s["step"] == "close"), "{kind}: {raw:?}");
        assert!(!raw.iter().any(|s| s["step"] == "frame"), "{kind}: {raw:?}");
    }
    server.shutdown().await;
}

/// A chat broadcast reaches every client, whichever transport each uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_their_clients_on_every_transport() {
    let certs = certs();
    let server = our_server(&certs);
    let urls = listen_everywhere(&server, &certs).await;
    let mut server_events = server.events();
    // One listener per transport, each waiting for both messages.
    let listeners: Vec<_> = urls
        .iter()
        .map(|(_, url)| {
            let url = url.clone();
            tokio::spawn(
                async move { scenario(&url, "events", &["--expect", "2", "--strict"]).await },
            )
        })
        .collect();
    let mut connected = 0;
    while connected < urls.len() {
        if let ServerEvent::Connect(_) = server_events.recv().await.unwrap() {
            connected += 1;
        }
    }
    // Two senders, one by call and one by event, on different transports.
    let by_call = scenario(
        &urls[0].1,
        "events",
        &["--send", "by call", "--match", "by call", "--strict"],
    );
    let by_event = scenario(
        &urls[3].1,
        "events",
        &[
            "--send", "by event", "--via", "event", "--match", "by event", "--strict",
        ],
    );
    let (_a, _b) = tokio::join!(by_call, by_event);
    for listener in listeners {
        let steps = listener.await.unwrap();
        let texts: Vec<&str> = steps
            .iter()
            .filter(|s| s["step"] == "event")
            .filter_map(|s| s["result"]["args"][1].as_str())
            .collect();
        assert!(
            texts.contains(&"by call") && texts.contains(&"by event"),
            "{texts:?}"
        );
    }
    server.shutdown().await;
}
