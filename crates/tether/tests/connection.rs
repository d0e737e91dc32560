//! Connection, server and client behaviour over the in-memory transport: the protocol byte by
//! byte where it matters, typed errors, and every pending request ending exactly once.

mod common;

use common::{within, LIMIT};
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tether::connection::ConnectionEvent;
use tether::example::{test_app, ChatHub};
use tether::transport::Transport;
use tether::{
    connect_transport, memory, Application, ClientOptions, Connection, Error, Interface,
    LoginPolicy, RemoteError, Server, ServerEvent, Value,
};

fn example_server() -> Server {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .auth_policy(LoginPolicy::new().user("login", "password"))
        .build()
        .unwrap();
    chat.bind(&server);
    server
}

async fn client(server: &Server, options: ClientOptions) -> Result<Connection, Error> {
    let (a, b) = memory::pair(64);
    server.serve_transport(a);
    within(
        LIMIT,
        "the handshake reply to a testApp client",
        connect_transport(b, "testApp", options),
    )
    .await
}

/// Connects a client to `app` on `server` over a fresh in-memory pair.
async fn client_to(server: &Server, app: &str, options: ClientOptions) -> Connection {
    let (a, b) = memory::pair(8);
    server.serve_transport(a);
    within(
        LIMIT,
        &format!("the handshake reply to an {app} client"),
        connect_transport(b, app, options),
    )
    .await
    .unwrap()
}

/// A raw peer: send message texts, read message texts.
struct Raw(Transport);

impl Raw {
    async fn send(&mut self, text: &str) {
        within(
            LIMIT,
            &format!("room to send {text}"),
            self.0.outgoing.send(text.to_owned()),
        )
        .await
        .unwrap();
    }
    /// The next message text (`None` once the other side closed); `what` names it.
    async fn recv(&mut self, what: &str) -> Option<String> {
        within(LIMIT, what, self.0.incoming.next())
            .await
            .map(|r| r.unwrap())
    }
}

fn raw(server: &Server) -> Raw {
    let (a, b) = memory::pair(64);
    server.serve_transport(a);
    Raw(b)
}

/// `conn.call(…)` with a deadline naming the call.
async fn call(
    conn: &Connection,
    iface: &str,
    method: &str,
    args: Vec<Value>,
) -> Result<Vec<Value>, Error> {
    within(
        LIMIT,
        &format!("the answer to {iface}.{method}"),
        conn.call(iface, method, args),
    )
    .await
}

fn is_uuid_v4(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.get_version_num() == 4) && s == s.to_lowercase()
}

#[tokio::test]
async fn anonymous_handshake_and_calls() {
    let server = example_server();
    let conn = client(&server, ClientOptions::default()).await.unwrap();
    assert!(conn.handshake_done());
    assert!(is_uuid_v4(&conn.session_id().unwrap()));
    assert_eq!(conn.username(), None);
    assert_eq!(
        call(&conn, "calculator", "answer", vec![]).await.unwrap(),
        vec![Value::from(42)]
    );
    assert_eq!(
        call(&conn, "calculator", "divide", vec![20.into(), 10.into()])
            .await
            .unwrap(),
        vec![Value::from(2)]
    );
    assert_eq!(
        call(&conn, "calculator", "doNothing", vec![])
            .await
            .unwrap(),
        Vec::<Value>::new()
    );
    assert_eq!(
        call(&conn, "someService", "sayHi", vec!["Rust".into()])
            .await
            .unwrap(),
        vec![Value::from("Hi, Rust!")]
    );
    let err = call(&conn, "calculator", "divide", vec![1.into(), 0.into()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(1));
    assert_eq!(
        err.remote().unwrap().display_message(),
        "Error: Zero division"
    );
    let err = call(&conn, "nope", "answer", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(12));
    let err = call(&conn, "calculator", "nope", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(14));
    assert_eq!(server.clients().len(), 1);
    within(LIMIT, "the client's close", conn.close()).await;
    assert!(conn.is_closed());
}

#[tokio::test]
async fn wire_bytes_match_upstream() {
    let server = example_server();
    let mut r = raw(&server);
    r.send("{handshake:[0,'testApp']}").await;
    let hs = r.recv("the handshake reply").await.unwrap();
    let sid = hs
        .strip_prefix("{handshake:[0],ok:'")
        .and_then(|s| s.strip_suffix("'}"))
        .unwrap_or_else(|| panic!("unexpected handshake reply {hs}"));
    assert!(is_uuid_v4(sid));
    r.send("{call:[1,'calculator'],answer:[]}").await;
    assert_eq!(
        r.recv("callback 1 (answer)").await.unwrap(),
        "{callback:[1],ok:[42]}"
    );
    r.send("{call:[2,'calculator'],divide:[1,0]}").await;
    assert_eq!(
        r.recv("callback 2 (divide by zero)").await.unwrap(),
        "{callback:[2],error:[1,'Error: Zero division']}"
    );
    r.send("{call:[3,'calculator'],doNothing:[]}").await;
    assert_eq!(
        r.recv("callback 3 (doNothing)").await.unwrap(),
        "{callback:[3],ok:[]}"
    );
    r.send("{inspect:[4,'someService']}").await;
    assert_eq!(
        r.recv("callback 4 (inspect someService)").await.unwrap(),
        "{callback:[4],ok:['sayHi','say']}"
    );
    r.send("{inspect:[5,'nothing']}").await;
    assert_eq!(
        r.recv("callback 5 (inspect nothing)").await.unwrap(),
        "{callback:[5],error:[12]}"
    );
    r.send("{ping:[6]}").await;
    assert_eq!(r.recv("pong 6").await.unwrap(), "{pong:[6]}");
    r.send("{}").await; // legacy heartbeat: ignored
    r.send("{call:[7,'someService'],say:['it\\'s \"q\"']}")
        .await;
    assert_eq!(
        r.recv("callback 7 (say with quotes)").await.unwrap(),
        "{callback:[7],ok:['it\\'s \\\"q\\\"']}"
    );
    // Server-initiated messages count down from -1.
    let conn = server.clients().pop().unwrap();
    within(
        LIMIT,
        "the server's emit of chat.message",
        conn.emit("chat", "message", vec!["Marcus".into(), "Hello".into()]),
    )
    .await
    .unwrap();
    assert_eq!(
        r.recv("server event -1 (chat.message)").await.unwrap(),
        "{event:[-1,'chat'],message:['Marcus','Hello']}"
    );
    let pending = tokio::spawn({
        let conn = conn.clone();
        async move { conn.call("clientIface", "m", vec![1.into()]).await }
    });
    assert_eq!(
        r.recv("server call -2 (clientIface.m)").await.unwrap(),
        "{call:[-2,'clientIface'],m:[1]}"
    );
    r.send("{callback:[-2],ok:['x',2]}").await;
    assert_eq!(
        within(LIMIT, "the server's call -2 to end", pending)
            .await
            .unwrap()
            .unwrap(),
        vec![Value::from("x"), Value::from(2)]
    );
}

#[tokio::test]
async fn login_and_handshake_errors() {
    let server = example_server();
    let conn = client(&server, ClientOptions::default().login("login", "password"))
        .await
        .unwrap();
    assert_eq!(conn.username().as_deref(), Some("login"));

    let err = client(&server, ClientOptions::default().login("login", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(11));
    let err = client(
        &server,
        ClientOptions::default().strategy("token", Value::from("abc")),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(11));

    let (a, b) = memory::pair(8);
    server.serve_transport(a);
    let err = within(
        LIMIT,
        "the handshake refusal for noSuchApp",
        connect_transport(b, "noSuchApp", ClientOptions::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Some(10));

    let (_a, b) = memory::pair(8);
    let err = within(
        LIMIT,
        "the local refusal of an invalid version",
        connect_transport(b, "testApp@__invalid__", ClientOptions::default()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidVersion(_)), "{err:?}");

    // Refusals go out as one message followed by a close.
    let mut r = raw(&server);
    r.send("{handshake:[0,'testApp'],login:['login','bad']}")
        .await;
    assert_eq!(
        r.recv("the handshake error 11").await.unwrap(),
        "{handshake:[0],error:[11]}"
    );
    assert_eq!(r.recv("the close after error 11").await, None);
    let mut r = raw(&server);
    r.send("{handshake:[0,'other']}").await;
    assert_eq!(
        r.recv("the handshake error 10").await.unwrap(),
        "{handshake:[0],error:[10]}"
    );
    assert_eq!(r.recv("the close after error 10").await, None);
}

#[tokio::test]
async fn custom_auth_policy_errors_pass_through() {
    let app = Application::new("app", "1.0.0").unwrap();
    let server = Server::builder()
        .application(app)
        .auth_policy(|req: tether::AuthRequest| async move {
            match req.credentials.as_str() {
                Some("good") => Ok("token-user".to_owned()),
                Some("locked") => Err(RemoteError::new(42, "Locked")),
                _ => Err(RemoteError::new(11, "ignored message")),
            }
        })
        .build()
        .unwrap();
    let mut r = raw(&server);
    r.send("{handshake:[0,'app'],token:'locked'}").await;
    assert_eq!(
        r.recv("the handshake error 42 for token 'locked'")
            .await
            .unwrap(),
        "{handshake:[0],error:[42,'Locked']}"
    );
    let mut r = raw(&server);
    r.send("{handshake:[0,'app'],token:'bad'}").await;
    assert_eq!(
        r.recv("the handshake error 11 for token 'bad'")
            .await
            .unwrap(),
        "{handshake:[0],error:[11]}"
    );
    let conn = client_to(
        &server,
        "app",
        ClientOptions::default().strategy("token", "good".into()),
    )
    .await;
    assert_eq!(conn.username(), None);
    let sconn = server.clients().pop().unwrap();
    assert_eq!(sconn.username().as_deref(), Some("token-user"));
}

#[tokio::test]
async fn version_ranges_resolve_like_upstream() {
    let v = |ver: &'static str| {
        Application::new("testApp", ver).unwrap().interface(
            "version",
            Interface::new().method("get", move |_c, _a| async move { Ok(Value::from(ver)) }),
        )
    };
    let server = Server::builder()
        .application(v("1.0.0"))
        .application(v("2.0.0"))
        .build()
        .unwrap();
    for (spec, expected) in [
        ("testApp", Some("2.0.0")),
        ("testApp@1", Some("1.0.0")),
        ("testApp@2", Some("2.0.0")),
        ("testApp@^1.0.0", Some("1.0.0")),
        ("testApp@>1.0.0", Some("2.0.0")),
        ("testApp@9999", None),
    ] {
        let (a, b) = memory::pair(8);
        server.serve_transport(a);
        let what = format!("the handshake reply for {spec}");
        match (
            within(
                LIMIT,
                &what,
                connect_transport(b, spec, ClientOptions::default()),
            )
            .await,
            expected,
        ) {
            (Ok(conn), Some(ver)) => assert_eq!(
                call(&conn, "version", "get", vec![]).await.unwrap(),
                vec![Value::from(ver)],
                "{spec}"
            ),
            (Err(e), None) => assert_eq!(e.code(), Some(10), "{spec}"),
            (other, _) => panic!("{spec}: unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn inspect_and_proxies() {
    let server = example_server();
    let conn = client(&server, ClientOptions::default()).await.unwrap();
    let proxy = within(
        LIMIT,
        "the inspect reply for calculator",
        conn.inspect("calculator"),
    )
    .await
    .unwrap();
    assert_eq!(proxy.methods(), ["answer", "divide", "doNothing"]);
    assert_eq!(
        within(
            LIMIT,
            "the proxy's calculator.divide answer",
            proxy.call("divide", vec![9.into(), 3.into()])
        )
        .await
        .unwrap(),
        vec![Value::from(3)]
    );
    assert_eq!(
        within(
            LIMIT,
            "the proxy's calculator.missing error",
            proxy.call("missing", vec![])
        )
        .await
        .unwrap_err()
        .code(),
        Some(14)
    );
    assert_eq!(
        within(
            LIMIT,
            "the inspect error for nothing",
            conn.inspect("nothing")
        )
        .await
        .unwrap_err()
        .code(),
        Some(12)
    );
    assert!(conn.remote_proxies().contains_key("calculator"));
}

#[tokio::test]
async fn events_both_ways_and_broadcast() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let app = Application::new("app", "1.0.0").unwrap().interface(
        "chat",
        Interface::new().on_event("typing", move |conn, args| {
            let _ = seen_tx.send((conn.id(), args));
        }),
    );
    let server = Server::builder().application(app).build().unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client_to(&server, "app", ClientOptions::default()).await);
    }
    // Client → server event reaches the handler with the right connection.
    within(
        LIMIT,
        "the client's emit of chat.typing",
        clients[0].emit("chat", "typing", vec![true.into()]),
    )
    .await
    .unwrap();
    let (conn_id, args) = within(LIMIT, "the server's chat.typing handler", seen_rx.recv())
        .await
        .unwrap();
    assert_eq!(args, vec![Value::from(true)]);
    assert!(server.clients().iter().any(|c| c.id() == conn_id));

    // Server → every client.
    let mut subs: Vec<_> = clients.iter().map(|c| c.events()).collect();
    assert_eq!(server.broadcast("chat", "message", vec!["hi".into()]), 3);
    for (i, sub) in subs.iter_mut().enumerate() {
        let what = format!("the broadcast chat.message at client {i}");
        within(LIMIT, &what, async {
            loop {
                if let ConnectionEvent::Event { iface, event, args } = sub.recv().await.unwrap() {
                    assert_eq!((iface.as_str(), event.as_str()), ("chat", "message"));
                    assert_eq!(args, vec![Value::from("hi")]);
                    break;
                }
            }
        })
        .await;
    }
}

#[tokio::test]
async fn server_calls_the_client_application() {
    let client_app = Application::new("clientApp", "1.0.0").unwrap().interface(
        "clientIface",
        Interface::new().method("add", |_c, a| async move {
            let sum: f64 = a.iter().filter_map(Value::as_f64).sum();
            Ok(Value::from(sum))
        }),
    );
    let server = example_server();
    let _conn = client(&server, ClientOptions::default().application(client_app))
        .await
        .unwrap();
    let sconn = server.clients().pop().unwrap();
    assert_eq!(
        call(&sconn, "clientIface", "add", vec![2.into(), 3.into()])
            .await
            .unwrap(),
        vec![Value::from(5)]
    );
    let proxy = within(
        LIMIT,
        "the client's inspect reply for clientIface",
        sconn.inspect("clientIface"),
    )
    .await
    .unwrap();
    assert_eq!(proxy.methods(), ["add"]);
    assert_eq!(
        call(&sconn, "other", "x", vec![]).await.unwrap_err().code(),
        Some(12)
    );
}

/// An app whose `slow.wait` method never answers until released.
fn slow_server() -> (Server, tokio::sync::watch::Sender<bool>) {
    let (release, rx) = tokio::sync::watch::channel(false);
    let app = Application::new("app", "1.0.0").unwrap().interface(
        "slow",
        Interface::new().method("wait", move |_c, _a| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|r| *r).await;
                Ok(Value::from("late"))
            }
        }),
    );
    (Server::builder().application(app).build().unwrap(), release)
}

#[tokio::test]
async fn timeouts_are_local_and_leave_the_connection_usable() {
    let (server, release) = slow_server();
    let conn = client_to(&server, "app", ClientOptions::default()).await;
    let err = within(
        LIMIT,
        "the 30 ms call timeout of slow.wait",
        conn.call_timeout("slow", "wait", vec![], Duration::from_millis(30)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    assert_eq!(err.code(), Some(tether::error::TIMEOUT_CODE));
    // The late answer to the timed-out call is rejected quietly; new calls work.
    let mut events = conn.events();
    release.send(true).unwrap();
    within(
        LIMIT,
        "the MessageRejected event for the late answer",
        async {
            loop {
                if let ConnectionEvent::MessageRejected { reason, .. } =
                    events.recv().await.unwrap()
                {
                    assert!(reason.contains("unknown request"), "{reason}");
                    break;
                }
            }
        },
    )
    .await;
    assert_eq!(
        call(&conn, "slow", "wait", vec![]).await.unwrap(),
        vec![Value::from("late")]
    );
}

/// Waits for `n` Call events on a server connection's event stream.
async fn calls_seen(
    events: &mut tokio::sync::broadcast::Receiver<ConnectionEvent>,
    n: usize,
    what: &str,
) {
    within(LIMIT, what, async {
        let mut seen = 0;
        while seen < n {
            if let ConnectionEvent::Call { .. } = events.recv().await.unwrap() {
                seen += 1;
            }
        }
    })
    .await
}

#[tokio::test]
async fn flush_and_close_end_every_pending_request() {
    let (server, _release) = slow_server();
    let conn = client_to(&server, "app", ClientOptions::default()).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let c = conn.clone();
            tokio::spawn(async move { c.call("slow", "wait", vec![]).await })
        })
        .collect();
    // Wait until all three are on the wire (the server saw them).
    let sconn = server.clients().pop().unwrap();
    let mut sevents = sconn.events();
    calls_seen(
        &mut sevents,
        3,
        "the server's Call events for 3 slow.wait calls",
    )
    .await;
    assert_eq!(within(LIMIT, "the first flush", conn.flush()).await, 3);
    for (i, c) in calls.into_iter().enumerate() {
        let what = format!("flushed call {i} to end");
        assert!(matches!(
            within(LIMIT, &what, c).await.unwrap(),
            Err(Error::Flushed)
        ));
    }
    assert_eq!(within(LIMIT, "the second flush", conn.flush()).await, 0);

    let pending = {
        let c = conn.clone();
        tokio::spawn(async move { c.call("slow", "wait", vec![]).await })
    };
    calls_seen(
        &mut sevents,
        1,
        "the server's Call event for the 4th slow.wait",
    )
    .await;
    within(LIMIT, "the server side's close", sconn.close()).await;
    assert!(matches!(
        within(LIMIT, "the pending call to end on close", pending)
            .await
            .unwrap(),
        Err(Error::Closed)
    ));
    within(LIMIT, "the client to see the close", conn.closed()).await;
    assert!(matches!(
        call(&conn, "slow", "wait", vec![]).await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn bad_input_before_handshake_closes() {
    let server = example_server();
    for text in [
        "{call:[1,'calculator'],answer:[]}",
        "garbage }{",
        "[1,2,3]",
        "{handshake:[0],ok:1}",
    ] {
        let mut r = raw(&server);
        r.send(text).await;
        let what = format!("the close after {text}");
        assert_eq!(r.recv(&what).await, None, "{text}");
    }
    // The legacy heartbeat is fine even before the handshake.
    let mut r = raw(&server);
    r.send("{}").await;
    r.send("{handshake:[0,'testApp']}").await;
    assert!(r
        .recv("the handshake reply after a heartbeat")
        .await
        .unwrap()
        .starts_with("{handshake:[0],ok:'"));
}

#[tokio::test]
async fn bad_input_after_handshake() {
    let server = example_server();
    let mut r = raw(&server);
    r.send("{handshake:[0,'testApp']}").await;
    r.recv("the handshake reply").await.unwrap();
    let sconn = server.clients().pop().unwrap();
    let mut events = sconn.events();
    // Unknown kinds are rejected without closing.
    r.send("{state:[1,'x'],inc:5}").await;
    within(LIMIT, "the MessageRejected event for kind 'state'", async {
        loop {
            if let ConnectionEvent::MessageRejected { reason, .. } = events.recv().await.unwrap() {
                assert!(reason.contains("unknown message kind 'state'"), "{reason}");
                break;
            }
        }
    })
    .await;
    // Non-array call args get 17.
    r.send("{call:[2,'calculator'],answer:5}").await;
    assert_eq!(
        r.recv("callback 2 (error 17)").await.unwrap(),
        "{callback:[2],error:[17]}"
    );
    // Non-array event args are rejected.
    r.send("{event:[3,'chat'],message:'x'}").await;
    r.send("{call:[4,'calculator'],answer:[]}").await;
    assert_eq!(
        r.recv("callback 4 (answer)").await.unwrap(),
        "{callback:[4],ok:[42]}"
    );
    // Another client is unaffected by what follows.
    let other = client(&server, ClientOptions::default()).await.unwrap();
    // A second handshake closes.
    r.send("{handshake:[0,'testApp']}").await;
    assert_eq!(r.recv("the close after a second handshake").await, None);
    within(LIMIT, "the server connection to close", sconn.closed()).await;
    assert_eq!(
        call(&other, "calculator", "answer", vec![]).await.unwrap(),
        vec![Value::from(42)]
    );
}

#[tokio::test]
async fn silent_client_hits_the_handshake_timeout() {
    let server = Server::builder()
        .application(Application::new("app", "1.0.0").unwrap())
        .handshake_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let mut events = server.events();
    let mut r = raw(&server);
    assert_eq!(
        r.recv("the close after the 50 ms handshake timeout").await,
        None
    );
    within(LIMIT, "the HandshakeTimeout server event", async {
        loop {
            if let ServerEvent::HandshakeTimeout(_) = events.recv().await.unwrap() {
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn client_refuses_handshake_requests() {
    let (a, b) = memory::pair(8);
    let mut server_side = Raw(a);
    let conn = tokio::spawn(connect_transport(b, "app", ClientOptions::default()));
    assert_eq!(
        server_side.recv("the client's handshake").await.unwrap(),
        "{handshake:[0,'app']}"
    );
    server_side.send("{handshake:[0,'app']}").await;
    assert_eq!(
        server_side
            .recv("the client's handshake error 15")
            .await
            .unwrap(),
        "{handshake:[0],error:[15]}"
    );
    assert_eq!(server_side.recv("the client's close").await, None);
    assert!(matches!(
        within(LIMIT, "connect_transport to fail", conn)
            .await
            .unwrap(),
        Err(Error::NoHandshakeResponse)
    ));
}

#[tokio::test]
async fn closed_before_handshake_response_is_code_minus_2() {
    let (a, b) = memory::pair(8);
    let conn = tokio::spawn(connect_transport(b, "app", ClientOptions::default()));
    let mut server_side = Raw(a);
    server_side.recv("the client's handshake").await.unwrap();
    drop(server_side);
    let err = within(LIMIT, "connect_transport to fail", conn)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Some(-2));
}

#[tokio::test]
async fn ping_and_heartbeat() {
    let server = Server::builder()
        .application(Application::new("app", "1.0.0").unwrap())
        .heartbeat_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut r = raw(&server);
    r.send("{handshake:[0,'app']}").await;
    r.recv("the handshake reply").await.unwrap();
    // The server pings with its own ids and the client's pongs are accepted.
    for expected in [-1, -2, -3] {
        let what = format!("the server's ping {expected}");
        assert_eq!(
            r.recv(&what).await.unwrap(),
            format!("{{ping:[{expected}]}}")
        );
        r.send(&format!("{{pong:[{expected}]}}")).await;
    }
    let conn = client_to(&server, "app", ClientOptions::default()).await;
    within(LIMIT, "the pong to the client's ping", conn.ping())
        .await
        .unwrap();
    let mut events = conn.events();
    within(LIMIT, "2 heartbeat pings from the server", async {
        let mut pings = 0;
        while pings < 2 {
            if let ConnectionEvent::Ping { .. } = events.recv().await.unwrap() {
                pings += 1;
            }
        }
    })
    .await;
    // A client heartbeat gets pongs back.
    within(
        LIMIT,
        "the client heartbeat to start",
        conn.start_heartbeat(Duration::from_millis(10)),
    )
    .await
    .unwrap();
    within(LIMIT, "2 pongs to the client's heartbeat", async {
        let mut pongs = 0;
        while pongs < 2 {
            if let ConnectionEvent::Pong { .. } = events.recv().await.unwrap() {
                pongs += 1;
            }
        }
    })
    .await;
    within(LIMIT, "the client heartbeat to stop", conn.stop_heartbeat())
        .await
        .unwrap();
}

#[tokio::test]
async fn non_finite_numbers_are_refused_locally() {
    let server = example_server();
    let conn = client(&server, ClientOptions::default()).await.unwrap();
    let err = call(&conn, "someService", "say", vec![f64::NAN.into()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Serialize(_)), "{err:?}");
    let err = within(
        LIMIT,
        "the local refusal of an emit with infinity",
        conn.emit("chat", "x", vec![vec![f64::INFINITY].into()]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Serialize(_)));
}

#[tokio::test]
async fn shutdown_closes_everyone() {
    let server = example_server();
    let mut events = server.events();
    let a = client(&server, ClientOptions::default()).await.unwrap();
    let b = client(&server, ClientOptions::default()).await.unwrap();
    let mut r = raw(&server); // not handshaken
    within(LIMIT, "the server's shutdown", server.shutdown()).await;
    within(LIMIT, "client a to see the shutdown", a.closed()).await;
    within(LIMIT, "client b to see the shutdown", b.closed()).await;
    assert_eq!(r.recv("the raw peer to see the shutdown").await, None);
    assert!(server.clients().is_empty());
    within(LIMIT, "2 Disconnect server events", async {
        let mut disconnects = 0;
        while disconnects < 2 {
            if let ServerEvent::Disconnect(_) = events.recv().await.unwrap() {
                disconnects += 1;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn chat_send_broadcasts_with_username() {
    let server = example_server();
    let alice = client(&server, ClientOptions::default().login("login", "password"))
        .await
        .unwrap();
    let bob = client(&server, ClientOptions::default()).await.unwrap();
    let mut bob_events = bob.events();
    let mut alice_events = alice.events();
    let result = call(&alice, "chat", "send", vec!["hello".into()])
        .await
        .unwrap();
    assert_eq!(result, Vec::<Value>::new());
    // The sender gets its own message too.
    within(LIMIT, "alice's own chat.message event", async {
        loop {
            if let ConnectionEvent::Event { args, .. } = alice_events.recv().await.unwrap() {
                assert_eq!(args, vec![Value::from("login"), Value::from("hello")]);
                break;
            }
        }
    })
    .await;
    within(LIMIT, "bob's chat.message event from alice", async {
        loop {
            if let ConnectionEvent::Event { iface, event, args } = bob_events.recv().await.unwrap()
            {
                assert_eq!((iface.as_str(), event.as_str()), ("chat", "message"));
                assert_eq!(args, vec![Value::from("login"), Value::from("hello")]);
                break;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_panicking_method_answers_16_and_the_connection_lives() {
    let app = Application::new("boom", "1.0.0").unwrap().interface(
        "svc",
        Interface::new()
            .method("explode", |_c, _a| async { panic!("method failure") })
            .method("fine", |_c, _a| async { Ok(Value::from(1)) }),
    );
    let server = Server::builder().application(app).build().unwrap();
    let conn = client_to(&server, "boom", ClientOptions::default()).await;
    match call(&conn, "svc", "explode", vec![]).await {
        Err(Error::Remote(e)) => assert_eq!(e.code, 16),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        call(&conn, "svc", "fine", vec![]).await.unwrap(),
        vec![Value::from(1)]
    );
}
