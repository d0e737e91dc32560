//! `#[interface]` events, connection access and raw arguments, re-exported as
//! `tether::interface`: typed event streams on the client, typed emit and broadcast on the
//! server, incoming event handlers, and the bare `[17]` option; with our server and with the
//! real `@metarhia/jstp` server (interop/jstp-peer.js).

mod common;

use common::{within, LIMIT};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tether::typed::{signature_reason, EventStream, TypedConnection};
use tether::{
    connect, connect_transport, memory, Application, ClientOptions, Connection, RemoteError,
    Server, TypedError, Value,
};
use tokio::sync::mpsc;

/// A user struct carried by an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Note {
    pub title: String,
    pub tags: Vec<String>,
    pub priority: Option<u8>,
}

/// A room: calls, an incoming event, events the server sends.
#[tether::interface(name = "room")]
pub trait Room {
    /// Posts a note to everyone; answers how many clients it was queued for.
    #[tether(connection)]
    async fn post(&self, conn: Connection, note: Note) -> Result<usize, RemoteError>;
    /// Any argument count: answers how many there were.
    #[tether(raw)]
    async fn count(&self, args: Vec<Value>) -> Result<usize, RemoteError>;
    /// Strictly two numbers.
    async fn add(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
    /// The event `room.typing(who)`; the handler sees the connection.
    #[tether(event, connection, rename = "typing")]
    fn on_typing(&self, conn: Connection, who: String);
    /// Sent to everyone for every post.
    #[tether(emit)]
    fn posted(by: Option<String>, note: Note);
    /// Sent back to a typing client.
    #[tether(emit, rename = "typingSeen")]
    fn typing_seen(count: u32);
}

/// The same interface answering a bare `[17]`.
#[tether::interface(name = "strict", signature_reason = false)]
pub trait Strict {
    async fn add(&self, a: f64, b: f64) -> Result<f64, RemoteError>;
}

struct RoomImpl {
    server: std::sync::OnceLock<Server>,
    typing: mpsc::UnboundedSender<(Option<String>, String)>,
}

impl Room for std::sync::Arc<RoomImpl> {
    async fn post(&self, conn: Connection, note: Note) -> Result<usize, RemoteError> {
        let server = self.server.get().expect("bound before serving");
        RoomEvents::broadcast_posted(server, conn.username(), note)
            .map_err(|_| RemoteError::new(16, "does not convert"))
    }
    async fn count(&self, args: Vec<Value>) -> Result<usize, RemoteError> {
        Ok(args.len())
    }
    async fn add(&self, a: f64, b: f64) -> Result<f64, RemoteError> {
        Ok(a + b)
    }
    fn on_typing(&self, conn: Connection, who: String) {
        let _ = self.typing.send((conn.username(), who));
        let _ = RoomEvents::typing_seen_args(1).and_then(|args| {
            conn.try_emit("room", "typingSeen", args)
                .map_err(TypedError::from)
        });
    }
}

impl Strict for std::sync::Arc<RoomImpl> {
    async fn add(&self, a: f64, b: f64) -> Result<f64, RemoteError> {
        Ok(a + b)
    }
}

fn server() -> (Server, mpsc::UnboundedReceiver<(Option<String>, String)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = std::sync::Arc::new(RoomImpl {
        server: std::sync::OnceLock::new(),
        typing: tx,
    });
    let app = Application::new("rooms", "1.0.0")
        .unwrap()
        .interface(
            <std::sync::Arc<RoomImpl> as Room>::INTERFACE_NAME,
            Room::into_interface(room.clone()),
        )
        .interface("strict", Strict::into_interface(room.clone()));
    let server = Server::builder().application(app).build().unwrap();
    let _ = room.server.set(server.clone());
    (server, rx)
}

async fn client(server: &Server) -> Connection {
    let (a, b) = memory::pair(8);
    server.serve_transport(a);
    within(
        LIMIT,
        "the handshake reply",
        connect_transport(b, "rooms", ClientOptions::default().no_reconnect()),
    )
    .await
    .unwrap()
}

async fn next<A>(events: &mut EventStream<A>, what: &str) -> Option<Result<A, TypedError>>
where
    A: serde::de::DeserializeOwned + Send + 'static,
{
    within(LIMIT, what, events.next()).await
}

fn note(title: &str) -> Note {
    Note {
        title: title.into(),
        tags: vec!["a".into(), "ünï 'q'".into()],
        priority: Some(3),
    }
}

/// A post reaches every client's typed stream, in order, typed; a client sees its own too.
#[tokio::test]
async fn broadcast_events_arrive_as_typed_streams() {
    let (server, _typing) = server();
    let (alice, bob) = (client(&server).await, client(&server).await);
    let (alice, bob) = (RoomClient::new(alice), RoomClient::new(bob));
    let mut at_alice = alice.on_posted();
    let mut at_bob = bob.on_posted();

    let queued = within(LIMIT, "room.post(first)", alice.post(note("first")))
        .await
        .unwrap();
    assert_eq!(queued, 2);
    within(LIMIT, "room.post(second)", bob.post(note("second")))
        .await
        .unwrap();
    for (stream, who) in [(&mut at_alice, "alice"), (&mut at_bob, "bob")] {
        let (by, first) = next(stream, who).await.unwrap().unwrap();
        assert_eq!((by, first), (None, note("first")), "{who}");
        let (_, second) = next(stream, who).await.unwrap().unwrap();
        assert_eq!(second, note("second"), "{who}");
    }

    // Closing the connection ends its stream.
    alice.connection().close().await;
    assert!(next(&mut at_alice, "the end of alice's stream")
        .await
        .is_none());
    bob.connection().close().await;
    server.shutdown().await;
}

/// An event the client sends runs the server's handler with the connection; the handler's
/// typed emit comes back on the client's stream of that (renamed) event.
#[tokio::test]
async fn incoming_events_run_handlers_and_emit_comes_back() {
    let (server, mut typing) = server();
    let room = RoomClient::new(client(&server).await);
    let mut seen = room.on_typing_seen();
    within(LIMIT, "emitting room.typing", room.on_typing("ana".into()))
        .await
        .unwrap();
    assert_eq!(
        within(LIMIT, "the typing handler", typing.recv()).await,
        Some((None, "ana".to_owned()))
    );
    assert_eq!(next(&mut seen, "typingSeen").await.unwrap().unwrap(), (1,));
    room.connection().close().await;
    server.shutdown().await;
}

/// An event whose arguments do not convert is an error item, and the stream goes on.
#[tokio::test]
async fn a_malformed_event_is_an_error_item_and_the_stream_goes_on() {
    let (server, _typing) = server();
    let conn = client(&server).await;
    let mut posted: EventStream<(Option<String>, Note)> = conn.typed_events("room", "posted");
    // Broadcast raw, wrong arguments, then a good post.
    server.broadcast("room", "posted", vec![Value::Null, Value::from(7)]);
    let room = RoomClient::new(conn.clone());
    within(LIMIT, "room.post", room.post(note("ok")))
        .await
        .unwrap();
    let bad = next(&mut posted, "the malformed event").await.unwrap();
    let Err(TypedError::EventArguments(e)) = &bad else {
        panic!("expected EventArguments, got {bad:?}");
    };
    assert!(
        bad.as_ref().unwrap_err().to_string().contains("argument 1"),
        "{e}"
    );
    let good = next(&mut posted, "the good event").await.unwrap().unwrap();
    assert_eq!(good.1, note("ok"));
    conn.close().await;
    server.shutdown().await;
}

/// Raw methods take any count; typed ones answer `[17]` with the reason, or bare when the
/// interface says `signature_reason = false`.
#[tokio::test]
async fn raw_arguments_and_the_two_invalid_signature_replies() {
    let (server, _typing) = server();
    let conn = client(&server).await;
    let room = RoomClient::new(conn.clone());
    for n in 0..4 {
        let args: Vec<Value> = (0..n).map(Value::from).collect();
        assert_eq!(
            within(LIMIT, "room.count", room.count(args)).await.unwrap(),
            n as usize
        );
    }
    let call = |iface: &'static str| {
        let conn = conn.clone();
        async move {
            within(
                LIMIT,
                "add with one argument",
                conn.call(iface, "add", vec![Value::from(1)]),
            )
            .await
            .unwrap_err()
        }
    };
    let with_reason = call("room").await;
    let remote = with_reason.remote().unwrap();
    assert_eq!(remote.code, 17);
    assert!(
        signature_reason(remote).is_some_and(|r| r.contains("invalid length 1")),
        "{remote:?}"
    );
    let bare = call("strict").await;
    let remote = bare.remote().unwrap();
    assert_eq!((remote.code, &remote.message), (17, &None));
    assert!(remote.info.is_empty(), "{remote:?}");
    conn.close().await;
    server.shutdown().await;
}

/// Typed streams against the real `@metarhia/jstp` server: its `chat.message(username, text)`
/// broadcast (from our `chat.send` call) arrives typed, as does an event it emits on request.
#[tokio::test]
async fn typed_streams_from_their_server() {
    /// Their chat, as a typed proxy (the same interface `tether::example::Chat` serves).
    /// Only its client is used here: nothing implements the trait.
    #[allow(dead_code)]
    #[tether::interface(name = "chat")]
    pub trait TheirChat {
        async fn send(&self, text: String) -> Result<(), RemoteError>;
        #[tether(emit)]
        fn message(user: Option<String>, text: String);
    }

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
    let chat = TheirChatClient::new(conn.clone());
    let mut messages = chat.on_message();
    within(LIMIT, "their chat.send", chat.send("hello 'node'".into()))
        .await
        .unwrap();
    let (user, text) = next(&mut messages, "their chat.message")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((user, text.as_str()), (None, "hello 'node'"));

    // control.emit(iface, event, args): their server sends us any event.
    let mut notes: EventStream<(Note,)> = conn.typed_events("room", "posted");
    let sent = note("from node");
    let () = within(
        LIMIT,
        "their control.emit",
        conn.call_typed("control", "emit", ("room", "posted", (&sent,))),
    )
    .await
    .unwrap();
    let (got,) = next(&mut notes, "their room.posted")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, sent);
    conn.close().await;
}

/// As a `tether::Error`, a conversion failure stays typed (`Error::Typed`, with its kind and
/// the argument it was in) and a failed call stays the call's own error.
#[tokio::test]
async fn conversion_failures_keep_their_kind_as_tether_errors() {
    let (server, _typing) = server();
    let conn = client(&server).await;
    let e: tether::Error = within(
        LIMIT,
        "room.add(1, NaN)",
        conn.call_typed::<f64>("room", "add", (1.0, f64::NAN)),
    )
    .await
    .unwrap_err()
    .into();
    let tether::Error::Typed(typed) = &e else {
        panic!("expected Error::Typed, got {e:?}");
    };
    let TypedError::Arguments(cause) = &**typed else {
        panic!("expected Arguments, got {typed:?}");
    };
    assert!(
        matches!(cause.kind(), tether_wire::ValueErrorKind::NonFinite(_)),
        "{cause:?}"
    );
    assert!(e.to_string().contains("argument 1"), "{e}");
    let e: tether::Error = within(
        LIMIT,
        "room.nope()",
        conn.call_typed::<f64>("room", "nope", ()),
    )
    .await
    .unwrap_err()
    .into();
    assert_eq!(e.code(), Some(14), "{e:?}");
    conn.close().await;
    server.shutdown().await;
}
