//! The connection hub: upstream's tape scenarios (against a port nobody listens on), then what
//! upstream never tested: real connections, shared dials and failures, aborting dials,
//! connect while disconnecting, failed disconnects, peers going away, reset, inbound
//! registration with key matching and policies, exactly-once events, and 200 peers; the
//! scheduler; the peer book (persisted, staging) and layers tether cannot verify.

mod common;

use common::{within, LIMIT};
use futures::future::{BoxFuture, FutureExt};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tether::example::{test_app, ChatHub};
use tether::hub::{
    AddressError, BookState, Cause, ConnectOutcome, Connector, Direction, Events, Heartbeat, Hub,
    HubError, HubEvent, HubOptions, HubState, JstpConnector, Lagged, MaxConnections, MultiAddress,
    OnePerKey, OutcomeKind, PeerBook, PeerKey, Schedule,
};
use tether::{connect_transport, memory, ClientOptions, Connection, Server, Value};
use tether_wire::Object;
use tokio::sync::Notify;

const KEY: &str = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";
const KEY2: &str = "DTNmX+4SjsgZ7xyDh5xxmNtFqa6pWi5Qtw7cE8aR9TQ=";

fn example_server() -> Server {
    let chat = ChatHub::new();
    let server = Server::builder()
        .application(test_app(chat.clone()))
        .build()
        .unwrap();
    chat.bind(&server);
    server
}

/// Upstream's hub (no redial, no liveness check, no session resumption), dialling JSTP.
fn upstream() -> HubOptions {
    HubOptions::jstp("testApp").scheduler(Schedule::off())
}

/// Upstream's hub with `connector`.
fn off_with(connector: impl Connector) -> HubOptions {
    HubOptions::with_connector(connector).scheduler(Schedule::off())
}

/// An address on which nothing listens.
fn unreachable_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("net:127.0.0.1:{port}")
}

/// The next hub event; `what` names the one expected.
async fn next(events: &mut Events, what: &str) -> HubEvent {
    within(LIMIT, &format!("the hub's {what} event"), events.next())
        .await
        .unwrap()
        .unwrap()
}

/// `hub.connect(address, data)` with a deadline.
async fn dial(hub: &Hub, address: &str, data: Object) -> Result<ConnectOutcome, HubError> {
    let what = format!("the hub's connect to {address}");
    within(LIMIT, &what, hub.connect(address, data)).await
}

/// `hub.disconnect(address)` with a deadline.
async fn hang_up(hub: &Hub, address: &str) -> Result<bool, HubError> {
    let what = format!("the hub's disconnect from {address}");
    within(LIMIT, &what, hub.disconnect(address)).await
}

/// `hub.close()` with a deadline.
async fn close(hub: &Hub) {
    within(LIMIT, "the hub's close", hub.close()).await
}

fn kinds(events: &mut Events) -> Vec<&'static str> {
    let mut out = Vec::new();
    while let Some(Some(item)) = events.next().now_or_never() {
        out.push(item.unwrap().kind());
    }
    out
}

/// A connector under the test's control: dials wait for `release`, succeed over an in-memory
/// transport to `server` unless the address is in `failing`, and are counted; hang-ups can be
/// held (`hold_disconnect`) or made to fail.
struct Gate {
    server: Server,
    release: Arc<Notify>,
    gated: bool,
    dials: Arc<AtomicUsize>,
    failing: Vec<String>,
    hold_disconnect: Option<Arc<Notify>>,
    fail_disconnect: bool,
}

impl Gate {
    fn new(gated: bool) -> Gate {
        Gate {
            server: example_server(),
            release: Arc::new(Notify::new()),
            gated,
            dials: Arc::default(),
            failing: Vec::new(),
            hold_disconnect: None,
            fail_disconnect: false,
        }
    }
}

impl Connector for Gate {
    /// The key tests use `~shs:KEY` addresses for their keys; the gate stands in for a
    /// dialler that verifies them (no handshake runs over its in-memory transport).
    fn verified_layers(&self) -> &[&str] {
        &["noauth", "shs"]
    }

    fn connect(
        &self,
        address: MultiAddress,
        _resume: bool,
    ) -> BoxFuture<'static, Result<Connection, HubError>> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let server = self.server.clone();
        let release = self.release.clone();
        let gated = self.gated;
        let fail = self.failing.contains(&address.to_string());
        Box::pin(async move {
            if gated {
                release.notified().await;
            }
            if fail {
                return Err(HubError::Undialable(address.to_string()));
            }
            let (a, b) = memory::pair(64);
            server.serve_transport(a);
            Ok(connect_transport(b, "testApp", ClientOptions::default()).await?)
        })
    }

    fn disconnect(&self, connection: Connection) -> BoxFuture<'static, Result<(), HubError>> {
        let hold = self.hold_disconnect.clone();
        let fail = self.fail_disconnect;
        Box::pin(async move {
            if let Some(hold) = hold {
                hold.notified().await;
            }
            if fail {
                return Err(HubError::Disconnect("refused by the test".into()));
            }
            connection.close().await;
            Ok(())
        })
    }
}

// ---- upstream's tape scenarios ---------------------------------------------------------

#[tokio::test]
async fn connect_fails_given_an_unreachable_peer() {
    let hub = Hub::new(upstream());
    let err = dial(&hub, &unreachable_address(), Object::new())
        .await
        .unwrap_err();
    let HubError::Connect(e) = err else {
        panic!("{err:?}")
    };
    assert!(e.to_string().contains("refused"), "{e}");
}

#[tokio::test]
async fn listen_emits_connecting_then_connecting_failed() {
    let hub = Hub::new(upstream());
    let mut events = hub.listen().unwrap();
    let address = unreachable_address();
    // The JSTP dialler verifies no key (see the layer tests), so these events carry none.
    let key = None;
    assert!(dial(&hub, &address, Object::new()).await.is_err());
    match next(&mut events, "connecting").await {
        HubEvent::Connecting { address: a, key: k } => {
            assert_eq!((a, k), (address.clone(), key))
        }
        other => panic!("{other:?}"),
    }
    match next(&mut events, "connecting-failed").await {
        HubEvent::ConnectingFailed {
            address: a,
            key: k,
            error: HubError::Connect(_),
        } => assert_eq!((a, k), (address, key)),
        other => panic!("{other:?}"),
    }
    assert!(kinds(&mut events).is_empty());
}

#[tokio::test]
async fn update_merges_data_of_an_entry_in_the_hub() {
    let gate = Gate::new(true);
    let release = gate.release.clone();
    let hub = Hub::new(off_with(gate));
    let address = format!("net:127.0.0.1:1~shs:{KEY}");
    let connecting = {
        let hub = hub.clone();
        let address = address.clone();
        tokio::spawn(async move { hub.connect(&address, Object::new()).await })
    };
    let mut live = hub.live_entries().unwrap();
    let entries = within(LIMIT, "a live table with the connecting entry", async {
        loop {
            let entries = live.next().await.unwrap().unwrap();
            if !entries.is_empty() {
                break entries;
            }
        }
    })
    .await;
    assert_eq!(entries[0].1.state, HubState::Connecting);
    assert!(entries[0].1.data.get("foo").is_none());
    let mut data = Object::new();
    data.insert("foo", Value::from("bar"));
    data.insert("gone", Value::Undefined);
    assert!(hub.update(&address, data).unwrap());
    let entry = &hub.entries().unwrap()[0].1;
    assert_eq!(entry.data.get("foo"), Some(&Value::from("bar")));
    assert!(
        entry.data.get("gone").is_none(),
        "undefined values are skipped"
    );
    // Not in the hub: nothing to update.
    assert!(!hub.update("net:127.0.0.1:2", Object::new()).unwrap());
    release.notify_one();
    assert!(matches!(
        within(LIMIT, "the released connect to end", connecting)
            .await
            .unwrap(),
        Ok(ConnectOutcome::Connected(_))
    ));
}

#[tokio::test]
async fn live_entries_emit_every_table_change() {
    let hub = Hub::new(upstream());
    let mut live = hub.live_entries().unwrap();
    let address = unreachable_address();
    assert!(dial(&hub, &address, Object::new()).await.is_err());
    let table = within(LIMIT, "the initial (empty) live table", live.next());
    assert!(table.await.unwrap().unwrap().is_empty());
    let connecting = within(LIMIT, "the live table while connecting", live.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connecting.len(), 1);
    assert_eq!(connecting[0].0, address);
    assert_eq!(connecting[0].1.state, HubState::Connecting);
    let table = within(LIMIT, "the live table after the failure", live.next());
    assert!(table.await.unwrap().unwrap().is_empty());
    close(&hub).await;
    assert!(
        within(LIMIT, "the live table stream to end", live.next())
            .await
            .is_none(),
        "the stream ends with the hub"
    );
}

#[tokio::test]
async fn disconnect_without_a_connection_is_false() {
    let hub = Hub::new(upstream());
    assert!(!hang_up(&hub, "net:127.0.0.1:9").await.unwrap());
}

#[tokio::test]
async fn after_close_nothing_works() {
    let hub = Hub::new(upstream());
    let mut events = hub.listen().unwrap();
    close(&hub).await;
    close(&hub).await;
    assert!(matches!(hub.entries(), Err(HubError::Closed)));
    assert!(matches!(hub.listen(), Err(HubError::Closed)));
    assert!(matches!(hub.live_entries(), Err(HubError::Closed)));
    assert!(matches!(hub.get_state("net:a:1"), Err(HubError::Closed)));
    assert!(matches!(
        hub.update("net:a:1", Object::new()),
        Err(HubError::Closed)
    ));
    assert!(matches!(
        within(LIMIT, "the closed hub's reset", hub.reset()).await,
        Err(HubError::Closed)
    ));
    assert!(matches!(
        dial(&hub, "net:127.0.0.1:1", Object::new()).await,
        Err(HubError::Closed)
    ));
    assert!(matches!(
        hang_up(&hub, "net:a:1").await,
        Err(HubError::Closed)
    ));
    assert!(within(LIMIT, "the event stream to end", events.next())
        .await
        .is_none());
}

// ---- beyond upstream ------------------------------------------------------------------

#[tokio::test]
async fn invalid_addresses_are_typed_errors() {
    let hub = Hub::new(upstream());
    assert!(matches!(
        dial(&hub, "net:h:1~shs:short", Object::new()).await,
        Err(HubError::Address(_))
    ));
    assert!(matches!(
        dial(&hub, "onion:x.onion:80", Object::new()).await,
        Err(HubError::Undialable(_))
    ));
    // Ports are checked before anything is dialled (nor reported).
    let mut events = hub.listen().unwrap();
    assert!(matches!(
        dial(&hub, "net:127.0.0.1", Object::new()).await,
        Err(HubError::Address(tether::hub::AddressError::MissingPort(
            "net"
        )))
    ));
    let bad_port = format!("net:127.0.0.1:http~shs:{KEY}");
    assert!(matches!(
        dial(&hub, &bad_port, Object::new()).await,
        Err(HubError::Address(
            tether::hub::AddressError::InvalidPort { .. }
        ))
    ));
    // Multiserver's other key forms (unpadded, URL-safe) are the same key.
    let unpadded = format!("net:127.0.0.1:1~shs:{}", KEY.trim_end_matches('='));
    let parsed: MultiAddress = unpadded.parse().unwrap();
    assert_eq!(parsed.key(), Some(PeerKey::parse(KEY).unwrap()));
    assert!(kinds(&mut events).is_empty());
}

#[tokio::test]
async fn connects_to_real_servers_and_dedupes_by_address() {
    let server = example_server();
    let addr = within(
        LIMIT,
        "the TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let ws = within(
        LIMIT,
        "the WS listener",
        server.listen("ws://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let hub = Hub::new(upstream());
    let mut events = hub.listen().unwrap();
    for address in [format!("net:{addr}"), format!("ws://{ws}")] {
        let ConnectOutcome::Connected(conn) = dial(&hub, &address, Object::new()).await.unwrap()
        else {
            panic!("not connected")
        };
        let what = format!("calculator.answer over {address}");
        assert_eq!(
            within(LIMIT, &what, conn.call("calculator", "answer", vec![]))
                .await
                .unwrap(),
            vec![Value::from(42)]
        );
        assert!(matches!(
            dial(&hub, &address, Object::new()).await.unwrap(),
            ConnectOutcome::AlreadyConnected(c) if c.id() == conn.id()
        ));
        assert_eq!(hub.get_state(&address).unwrap(), Some(HubState::Connected));
    }
    assert_eq!(server.clients().len(), 2);
    assert_eq!(
        kinds(&mut events),
        ["connecting", "connected", "connecting", "connected"]
    );
    close(&hub).await;
}

#[tokio::test]
async fn concurrent_connects_share_one_dial_and_its_failure() {
    let mut gate = Gate::new(true);
    gate.failing.push("net:10.0.0.1:1".into());
    let (release, dials) = (gate.release.clone(), gate.dials.clone());
    let hub = Hub::new(off_with(gate));
    let mut events = hub.listen().unwrap();
    let mut watch = hub.listen().unwrap();
    for (address, ok) in [("net:10.0.0.2:1", true), ("net:10.0.0.1:1", false)] {
        // join_all polls all five at once, so all join before the dial can finish.
        let callers = {
            let hub = hub.clone();
            tokio::spawn(async move {
                let calls = (0..5).map(|_| hub.connect(address, Object::new()));
                futures::future::join_all(calls).await
            })
        };
        // Wait until the dial is in progress, then let it finish.
        assert_eq!(next(&mut watch, "connecting").await.kind(), "connecting");
        release.notify_one();
        let mut ids = Vec::new();
        let what = format!("the 5 connects to {address}");
        for outcome in within(LIMIT, &what, callers).await.unwrap() {
            match outcome {
                Ok(ConnectOutcome::Connected(conn)) => {
                    assert!(ok);
                    ids.push(conn.id());
                }
                Err(HubError::Undialable(_)) => assert!(!ok),
                other => panic!("{other:?}"),
            }
        }
        let end = next(&mut watch, "connected or connecting-failed").await;
        assert!(end.kind().starts_with("connect"));
        ids.dedup();
        assert!(ids.len() <= 1, "several connections: {ids:?}");
    }
    assert_eq!(dials.load(Ordering::SeqCst), 2);
    assert_eq!(
        kinds(&mut events),
        ["connecting", "connected", "connecting", "connecting-failed"]
    );
}

#[tokio::test]
async fn disconnect_while_connecting_aborts_the_dial() {
    let gate = Gate::new(true);
    let hub = Hub::new(off_with(gate));
    let mut events = hub.listen().unwrap();
    let address = "net:10.0.0.3:1";
    let connecting = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.connect(address, Object::new()).await })
    };
    assert_eq!(next(&mut events, "connecting").await.kind(), "connecting");
    assert!(hang_up(&hub, address).await.unwrap());
    assert!(matches!(
        within(LIMIT, "the aborted connect to end", connecting)
            .await
            .unwrap(),
        Err(HubError::Aborted)
    ));
    assert_eq!(hub.get_state(address).unwrap(), None);
    assert_eq!(kinds(&mut events), ["disconnecting", "disconnected"]);
}

#[tokio::test]
async fn connect_while_disconnecting_runs_after_with_its_data() {
    let mut gate = Gate::new(false);
    let hold = Arc::new(Notify::new());
    gate.hold_disconnect = Some(hold.clone());
    let hub = Hub::new(off_with(gate));
    let address = "net:10.0.0.4:1";
    dial(&hub, address, Object::new()).await.unwrap();
    let mut events = hub.listen().unwrap();
    let disconnecting = {
        let hub = hub.clone();
        tokio::spawn(async move { hub.disconnect(address).await })
    };
    assert_eq!(
        next(&mut events, "disconnecting").await.kind(),
        "disconnecting"
    );
    let mut data = Object::new();
    data.insert("again", Value::from(true));
    assert!(matches!(
        dial(&hub, address, data).await.unwrap(),
        ConnectOutcome::Deferred
    ));
    hold.notify_one();
    assert!(within(LIMIT, "the held disconnect to end", disconnecting)
        .await
        .unwrap()
        .unwrap());
    assert_eq!(
        next(&mut events, "disconnected").await.kind(),
        "disconnected"
    );
    assert_eq!(next(&mut events, "connecting").await.kind(), "connecting");
    assert_eq!(next(&mut events, "connected").await.kind(), "connected");
    let entry = &hub.entries().unwrap()[0].1;
    assert_eq!(entry.data.get("again"), Some(&Value::from(true)));
}

#[tokio::test]
async fn a_failed_disconnect_restores_the_state() {
    let mut gate = Gate::new(false);
    gate.fail_disconnect = true;
    let hub = Hub::new(off_with(gate));
    let address = "net:10.0.0.5:1";
    dial(&hub, address, Object::new()).await.unwrap();
    let mut events = hub.listen().unwrap();
    assert!(matches!(
        hang_up(&hub, address).await,
        Err(HubError::Disconnect(_))
    ));
    assert_eq!(hub.get_state(address).unwrap(), Some(HubState::Connected));
    assert_eq!(
        kinds(&mut events),
        ["disconnecting", "disconnecting-failed"]
    );
}

#[tokio::test]
async fn a_peer_going_away_is_reported_once() {
    let server = example_server();
    let addr = within(
        LIMIT,
        "the TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let hub = Hub::new(upstream());
    let address = format!("net:{addr}");
    dial(&hub, &address, Object::new()).await.unwrap();
    let mut events = hub.listen().unwrap();
    within(LIMIT, "the server's shutdown", server.shutdown()).await;
    match next(&mut events, "disconnected").await {
        HubEvent::Disconnected { address: a, .. } => assert_eq!(a, address),
        other => panic!("{other:?}"),
    }
    assert_eq!(hub.get_state(&address).unwrap(), None);
    // Disconnecting what is gone is a no-op, and nothing else was reported.
    assert!(!hang_up(&hub, &address).await.unwrap());
    assert!(kinds(&mut events).is_empty());
}

#[tokio::test]
async fn reset_disconnects_everything_once() {
    let hub = Hub::new(off_with(Gate::new(false)));
    let addresses = ["net:10.0.1.1:1", "net:10.0.1.2:1", "net:10.0.1.3:1"];
    for a in addresses {
        dial(&hub, a, Object::new()).await.unwrap();
    }
    let mut events = hub.listen().unwrap();
    within(LIMIT, "the hub's reset", hub.reset()).await.unwrap();
    assert!(hub.entries().unwrap().is_empty());
    let mut per_address: HashMap<String, Vec<&str>> = HashMap::new();
    while let Some(Some(Ok(e))) = events.next().now_or_never() {
        per_address
            .entry(e.address().to_owned())
            .or_default()
            .push(e.kind());
    }
    for a in addresses {
        assert_eq!(per_address[a], ["disconnecting", "disconnected"], "{a}");
    }
    // The hub still works after a reset.
    assert!(matches!(
        dial(&hub, addresses[0], Object::new()).await.unwrap(),
        ConnectOutcome::Connected(_)
    ));
}

#[tokio::test]
async fn inbound_connections_match_by_key_and_obey_policies() {
    let gate = Gate::new(true);
    let server = gate.server.clone();
    let options = off_with(gate).policy(OnePerKey).policy(MaxConnections(2));
    let hub = Hub::new(options);
    let key = PeerKey::parse(KEY).unwrap();
    let inbound = || async {
        let (a, b) = memory::pair(8);
        server.serve_transport(a);
        within(
            LIMIT,
            "an inbound peer's handshake",
            connect_transport(b, "testApp", ClientOptions::default()),
        )
        .await
        .unwrap()
    };
    // We are dialling the peer when it dials us: its connection takes the entry.
    let dialled = format!("net:10.0.2.1:1~shs:{KEY}");
    let mut events = hub.listen().unwrap();
    let connecting = {
        let hub = hub.clone();
        let dialled = dialled.clone();
        tokio::spawn(async move { hub.connect(&dialled, Object::new()).await })
    };
    assert_eq!(next(&mut events, "connecting").await.kind(), "connecting");
    let conn = inbound().await;
    within(
        LIMIT,
        "registering the inbound peer",
        hub.register_inbound("net:10.0.2.1:5555", Some(key), conn),
    )
    .await
    .unwrap();
    assert!(matches!(
        within(LIMIT, "the superseded connect to end", connecting)
            .await
            .unwrap(),
        Err(HubError::Aborted)
    ));
    let entries = hub.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, dialled);
    assert_eq!(entries[0].1.direction, Some(Direction::Inbound));
    assert!(matches!(
        next(&mut events, "inbound connected").await,
        HubEvent::Connected {
            direction: Direction::Inbound,
            ..
        }
    ));

    // Another address of the same key is refused by OnePerKey, inbound or outbound.
    let refused = inbound().await;
    let err = within(
        LIMIT,
        "the OnePerKey refusal of a second inbound",
        hub.register_inbound("net:10.0.2.1:6666", Some(key), refused.clone()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, HubError::Refused(_)));
    within(LIMIT, "the refused inbound to close", refused.closed()).await;
    assert!(matches!(
        dial(&hub, &format!("ws://10.0.2.1:80~shs:{KEY}"), Object::new()).await,
        Err(HubError::Refused(_))
    ));
    // A peer with another key is fine, up to MaxConnections(2).
    let other = PeerKey::parse(KEY2).unwrap();
    let conn = inbound().await;
    within(
        LIMIT,
        "registering an inbound peer with another key",
        hub.register_inbound("net:10.0.2.2:1", Some(other), conn),
    )
    .await
    .unwrap();
    let conn = inbound().await;
    assert!(matches!(
        within(
            LIMIT,
            "the MaxConnections refusal of a third inbound",
            hub.register_inbound("net:10.0.2.3:1", None, conn)
        )
        .await,
        Err(HubError::Refused(_))
    ));
    assert_eq!(hub.entries().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_of_200_peers() {
    let server = example_server();
    let mut addresses = Vec::new();
    for i in 0..200 {
        let what = format!("TCP listener {i}");
        let addr = within(
            LIMIT,
            &what,
            server.listen("jstp://127.0.0.1:0".parse().unwrap()),
        )
        .await
        .unwrap();
        addresses.push(format!("net:{addr}"));
    }
    let hub = Hub::new(upstream());
    let mut events = hub.listen().unwrap();
    let dials = addresses.iter().map(|a| hub.connect(a, Object::new()));
    let outcomes = within(
        LIMIT,
        "the hub's 200 concurrent connects",
        futures::future::join_all(dials),
    )
    .await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(ConnectOutcome::Connected(_)))));
    let entries = hub.entries().unwrap();
    assert_eq!(entries.len(), 200);
    assert!(entries.iter().all(|(_, e)| e.state == HubState::Connected));
    assert_eq!(server.clients().len(), 200);
    close(&hub).await;
    let seen = Arc::new(Mutex::new(HashMap::<String, Vec<&str>>::new()));
    within(LIMIT, "the hub's event stream to end after close", async {
        while let Some(Ok(e)) = events.next().await {
            seen.lock()
                .unwrap()
                .entry(e.address().to_owned())
                .or_default()
                .push(e.kind());
        }
    })
    .await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 200);
    for (address, kinds) in seen.iter() {
        assert_eq!(
            kinds,
            &["connecting", "connected", "disconnecting", "disconnected"],
            "{address}"
        );
    }
}

// ---- the scheduler ---------------------------------------------------------------------

/// A loopback TCP proxy that can stop forwarding without closing anything: the peer behind it
/// looks frozen (as under SIGSTOP), and thaws when forwarding resumes.
struct FreezeProxy {
    addr: std::net::SocketAddr,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FreezeProxy {
    async fn start(target: std::net::SocketAddr) -> FreezeProxy {
        let listener = within(
            LIMIT,
            "the freeze proxy's listener",
            tokio::net::TcpListener::bind("127.0.0.1:0"),
        )
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(tokio::sync::watch::Sender::new(false));
        let tx = frozen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                tokio::spawn(pump(ir, ow, tx.subscribe()));
                tokio::spawn(pump(or, iw, tx.subscribe()));
            }
        });
        FreezeProxy { addr, frozen }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

/// Copies `r` to `w` while not frozen.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = frozen.wait_for(|f| *f) => continue,
        };
        match n {
            Ok(0) | Err(_) => {
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Events of `address` until one `pick` accepts; the others are returned in order.
async fn until(
    events: &mut Events,
    what: &str,
    pick: impl Fn(&HubEvent) -> bool,
) -> (HubEvent, Vec<HubEvent>) {
    let mut before = Vec::new();
    within(LIMIT, what, async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if pick(&e) {
                return (e, before);
            }
            before.push(e);
        }
    })
    .await
}

/// A fast redial for tests: 20 ms doubling to 200 ms, no jitter.
fn quick_redial() -> tether::reconnect::Backoff {
    tether::reconnect::Backoff::fixed_range(
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(200),
    )
}

async fn listen_tcp(server: &Server, port: u16) -> std::net::SocketAddr {
    let url = format!("jstp://127.0.0.1:{port}").parse().unwrap();
    within(LIMIT, "the TCP listener", server.listen(url))
        .await
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_peer_that_goes_away_and_comes_back_is_redialled() {
    let server = example_server();
    let addr = listen_tcp(&server, 0).await;
    let schedule = Schedule {
        redial: Some(Arc::new(quick_redial())),
        heartbeat: None,
        resume: false,
    };
    let hub = Hub::new(HubOptions::jstp("testApp").scheduler(schedule));
    let address = format!("net:{addr}");
    let mut events = hub.listen().unwrap();
    dial(&hub, &address, Object::new()).await.unwrap();
    within(LIMIT, "the server's shutdown", server.shutdown()).await;
    let (gone, _) = until(&mut events, "the peer's disconnected", |e| {
        e.kind() == "disconnected"
    })
    .await;
    assert!(
        matches!(&gone, HubEvent::Disconnected { cause: Cause::Closed, address: a, .. } if *a == address),
        "{gone:?}"
    );
    // While it is away, redials fail and are scheduled again, further apart.
    let (failed, _) = until(&mut events, "a failed redial", |e| {
        e.kind() == "connecting-failed"
    })
    .await;
    assert_eq!(failed.address(), address);
    let (again, _) = until(&mut events, "the redial after the failed one", |e| {
        e.kind() == "redialing"
    })
    .await;
    let HubEvent::Redialing {
        failures, delay, ..
    } = again
    else {
        unreachable!()
    };
    assert!(failures >= 2, "{failures}");
    assert_eq!(delay, quick_redial().base_delay(failures - 1));
    // It comes back on the same port: the hub dials it again, by itself.
    let back = example_server();
    listen_tcp(&back, addr.port()).await;
    let (up, _) = until(&mut events, "the peer connected again", |e| {
        e.kind() == "connected"
    })
    .await;
    let HubEvent::Connected { connection, .. } = up else {
        unreachable!()
    };
    let answer = within(LIMIT, "a call to the peer that came back", async {
        connection.call("calculator", "answer", vec![]).await
    });
    assert_eq!(answer.await.unwrap(), vec![Value::from(42)]);
    assert_eq!(back.clients().len(), 1);
    // Disconnecting lets it go: no redial afterwards.
    assert!(hang_up(&hub, &address).await.unwrap());
    let (end, _) = until(&mut events, "the requested disconnected", |e| {
        e.kind() == "disconnected"
    })
    .await;
    assert!(matches!(
        end,
        HubEvent::Disconnected {
            cause: Cause::Requested,
            ..
        }
    ));
    assert!(kinds(&mut events).is_empty());
    close(&hub).await;
}

#[tokio::test]
async fn a_frozen_peer_is_disconnected_by_the_heartbeat_and_redialled_when_it_thaws() {
    let server = example_server();
    let proxy = FreezeProxy::start(listen_tcp(&server, 0).await).await;
    let ms = std::time::Duration::from_millis;
    let client = ClientOptions {
        handshake_timeout: ms(300),
        ..ClientOptions::default()
    };
    // The default: the connection may restore its session; a frozen link is not dropped, so
    // only the liveness check can tell.
    let schedule = Schedule {
        redial: Some(Arc::new(quick_redial())),
        heartbeat: Some(Heartbeat {
            interval: ms(50),
            timeout: ms(300),
        }),
        ..Schedule::default()
    };
    let connector = JstpConnector::new("testApp", client);
    let hub = Hub::new(HubOptions::with_connector(connector).scheduler(schedule));
    let address = format!("net:{}", proxy.addr);
    let mut events = hub.listen().unwrap();
    let ConnectOutcome::Connected(first) = dial(&hub, &address, Object::new()).await.unwrap()
    else {
        panic!("not connected")
    };
    proxy.freeze(true);
    let (gone, before) = until(&mut events, "the frozen peer's disconnected", |e| {
        e.kind() == "disconnected"
    })
    .await;
    assert!(
        matches!(gone, HubEvent::Disconnected { cause: Cause::NoPong(t), .. } if t == ms(300)),
        "{gone:?}"
    );
    let before: Vec<_> = before.iter().map(HubEvent::kind).collect();
    assert_eq!(
        before,
        ["connecting", "connected"],
        "nothing before the freeze"
    );
    within(LIMIT, "the frozen connection to be closed", first.closed()).await;
    // Still frozen: a redial connects to the proxy but gets no handshake answer.
    let (failed, _) = until(&mut events, "a redial failing on the frozen peer", |e| {
        e.kind() == "connecting-failed"
    })
    .await;
    assert!(
        matches!(
            &failed,
            HubEvent::ConnectingFailed {
                error: HubError::Connect(_),
                ..
            }
        ),
        "{failed:?}"
    );
    proxy.freeze(false);
    let (up, _) = until(&mut events, "the thawed peer connected again", |e| {
        e.kind() == "connected"
    })
    .await;
    let HubEvent::Connected { connection, .. } = up else {
        unreachable!()
    };
    assert_ne!(connection.id(), first.id());
    assert_eq!(hub.get_state(&address).unwrap(), Some(HubState::Connected));
    close(&hub).await;
}

#[tokio::test]
async fn a_link_blip_is_restored_by_the_connection_and_unseen_by_the_hub() {
    let server = example_server();
    let proxy = tether::testing::CutProxy::start(listen_tcp(&server, 0).await)
        .await
        .unwrap();
    let ms = std::time::Duration::from_millis;
    // The hub's defaults, with a quick reconnect in the connection itself.
    let client = ClientOptions::default()
        .reconnector(tether::reconnect::Backoff::fixed_range(ms(10), ms(100)));
    let connector = JstpConnector::new("testApp", client);
    let hub = Hub::new(HubOptions::with_connector(connector));
    let address = format!("net:{}", proxy.local_addr());
    let ConnectOutcome::Connected(conn) = dial(&hub, &address, Object::new()).await.unwrap() else {
        panic!("not connected")
    };
    let mut events = hub.listen().unwrap();
    let mut conn_events = conn.events();
    within(LIMIT, "the proxy link", proxy.wait_for_links(1)).await;
    assert_eq!(proxy.cut(), 1);
    within(LIMIT, "the connection's restore", async {
        loop {
            if let tether::ConnectionEvent::Reconnect { error: None } =
                conn_events.recv().await.unwrap()
            {
                break;
            }
        }
    })
    .await;
    let answer = within(LIMIT, "a call after the restore", async {
        conn.call("calculator", "answer", vec![]).await
    });
    assert_eq!(answer.await.unwrap(), vec![Value::from(42)]);
    let entries = hub.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.state, HubState::Connected);
    assert_eq!(entries[0].1.connection.as_ref().unwrap().id(), conn.id());
    assert!(kinds(&mut events).is_empty(), "the hub saw the blip");
    close(&hub).await;
}

#[tokio::test]
async fn a_failed_first_dial_is_retried_until_the_schedule_gives_up() {
    let address = unreachable_address();
    let gives_up = |_: &str, n: u32| (n < 2).then(|| std::time::Duration::from_millis(10));
    let hub = Hub::new(HubOptions::jstp("testApp").scheduler(Schedule::off().redial(gives_up)));
    let mut events = hub.listen().unwrap();
    assert!(dial(&hub, &address, Object::new()).await.is_err());
    // Three dials: the first and two redials; then the schedule lets the peer go.
    let mut seen = Vec::new();
    within(LIMIT, "three failed dials", async {
        while seen.iter().filter(|k| **k == "connecting-failed").count() < 3 {
            seen.push(events.next().await.unwrap().unwrap().kind());
        }
    })
    .await;
    assert_eq!(
        seen,
        [
            "connecting",
            "connecting-failed",
            "redialing",
            "connecting",
            "connecting-failed",
            "redialing",
            "connecting",
            "connecting-failed"
        ]
    );
    // Let go: nothing to disconnect.
    assert!(!hang_up(&hub, &address).await.unwrap());
}

// ---- streams ---------------------------------------------------------------------------

#[tokio::test]
async fn a_listener_that_falls_behind_gets_lagged_items_not_a_silent_gap() {
    let mut options = off_with(Gate::new(false));
    options.channel_capacity = 2;
    let hub = Hub::new(options);
    let mut events = hub.listen().unwrap();
    let mut live = hub.live_entries().unwrap();
    let addresses = ["net:10.0.3.1:1", "net:10.0.3.2:1", "net:10.0.3.3:1"];
    for a in addresses {
        dial(&hub, a, Object::new()).await.unwrap();
    }
    // Six events, two kept: the listener learns it missed four, then gets the last two.
    let lagged = within(LIMIT, "the lagged item", events.next())
        .await
        .unwrap();
    assert_eq!(lagged.unwrap_err(), Lagged(4));
    let rest: Vec<_> = (0..2).map(|_| events.next().now_or_never()).collect();
    let rest: Vec<_> = rest
        .into_iter()
        .map(|i| {
            let e = i.unwrap().unwrap().unwrap();
            (e.kind(), e.address().to_owned())
        })
        .collect();
    assert_eq!(
        rest,
        [
            ("connecting", addresses[2].to_owned()),
            ("connected", addresses[2].to_owned())
        ]
    );
    assert!(events.next().now_or_never().is_none(), "nothing else");
    // Tables: the first, then the lag, then the newest two (the last complete).
    let first = within(LIMIT, "the first table", live.next()).await;
    assert!(first.unwrap().unwrap().is_empty());
    let lagged = within(LIMIT, "the lagged table", live.next()).await;
    assert_eq!(lagged.unwrap().unwrap_err(), Lagged(4));
    live.next().now_or_never().unwrap().unwrap().unwrap();
    let last = live.next().now_or_never().unwrap().unwrap().unwrap();
    assert_eq!(last.len(), 3);
    assert!(last.iter().all(|(_, e)| e.state == HubState::Connected));
    close(&hub).await;
}

#[tokio::test]
async fn a_peer_refused_by_the_connection_limit_is_redialled_when_a_slot_frees() {
    let options = HubOptions::with_connector(Gate::new(false))
        .policy(MaxConnections(1))
        .scheduler(Schedule::off().redial(quick_redial()));
    let hub = Hub::new(options);
    let (a, b) = ("net:10.0.4.1:1", "net:10.0.4.2:1");
    dial(&hub, a, Object::new()).await.unwrap();
    let mut events = hub.listen().unwrap();
    assert!(matches!(
        dial(&hub, b, Object::new()).await,
        Err(HubError::Refused(_))
    ));
    // Refused again while the slot is taken, each time scheduled further out.
    let (second, _) = until(&mut events, "a second refusal", |e| {
        matches!(e, HubEvent::Redialing { failures: 2, .. })
    })
    .await;
    assert_eq!(second.address(), b);
    assert_eq!(hub.get_state(b).unwrap(), None);
    assert!(hang_up(&hub, a).await.unwrap());
    let (up, _) = until(&mut events, "the refused peer connected", |e| {
        e.kind() == "connected"
    })
    .await;
    assert_eq!(up.address(), b);
    let entries = hub.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].0, b);
    close(&hub).await;
}

// ---- the peer book and honest layers ---------------------------------------------------

/// Reads events until `kind` for `address`.
async fn until_kind(events: &mut Events, kind: &str, address: &str) -> HubEvent {
    let what = format!("a {kind} event for {address}");
    within(LIMIT, &what, async {
        loop {
            let e = events.next().await.unwrap().unwrap();
            if e.kind() == kind && e.address() == address {
                return e;
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_book_survives_a_restart_and_the_new_hub_dials_the_peers_it_keeps() {
    let server = example_server();
    let up = within(
        LIMIT,
        "a TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let kept = format!("net:{up}");
    let down = unreachable_address();
    let dropped = format!("net:{up}~noauth");
    let staged = "ws://127.0.0.1:9/suggested".to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peers.redb");
    let mut data = Object::new();
    data.insert("name", Value::from("alice"));
    // Redials far apart: the failed peer's next dial is not in this test.
    let slow =
        Schedule::default().redial(|_: &str, _: u32| Some(std::time::Duration::from_secs(600)));

    let first = Hub::new(
        HubOptions::jstp("testApp")
            .scheduler(slow.clone())
            .book(PeerBook::open(&path).unwrap()),
    );
    let mut events = first.listen().unwrap();
    assert!(matches!(
        dial(&first, &kept, data.clone()).await,
        Ok(ConnectOutcome::Connected(_))
    ));
    assert!(dial(&first, &down, Object::new()).await.is_err());
    assert!(matches!(
        dial(&first, &dropped, Object::new()).await,
        Ok(ConnectOutcome::Connected(_))
    ));
    assert!(hang_up(&first, &dropped).await.unwrap());
    assert!(first.stage(&staged, Object::new()).unwrap());
    until_kind(&mut events, "redialing", &down).await;
    close(&first).await;
    drop(first);

    // A new process would see this file.
    let book = PeerBook::open(&path).unwrap();
    let states: Vec<_> = book
        .entries()
        .into_iter()
        .map(|(a, e)| (a, e.state))
        .collect();
    let mut expected = vec![
        (kept.clone(), BookState::Kept),
        (down.clone(), BookState::Kept),
        (dropped.clone(), BookState::Known),
        (staged.clone(), BookState::Staged),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(states, expected);
    assert_eq!(book.get(&kept).unwrap().data, data);
    let failed = book.get(&down).unwrap().last.unwrap();
    assert_eq!(failed.kind, OutcomeKind::ConnectingFailed);
    assert!(failed.detail.unwrap().contains("refused"));
    let closed = book.get(&kept).unwrap().last.unwrap();
    assert_eq!(
        (closed.kind, closed.detail.as_deref()),
        (OutcomeKind::Disconnected, Some("requested"))
    );
    assert!(book.get(&staged).unwrap().last.is_none());

    let second = Hub::new(HubOptions::jstp("testApp").scheduler(slow).book(book));
    let mut events = second.listen().unwrap();
    assert_eq!(second.connect_book().unwrap(), 2);
    // Both outcomes, in either order.
    let mut outcomes = std::collections::HashSet::new();
    within(LIMIT, "the kept peers' outcomes", async {
        while outcomes.len() < 2 {
            let e = events.next().await.unwrap().unwrap();
            if matches!(e.kind(), "connected" | "connecting-failed") {
                outcomes.insert((e.kind(), e.address().to_owned()));
            }
        }
    })
    .await;
    assert!(
        outcomes.contains(&("connected", kept.clone())),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("connecting-failed", down.clone())),
        "{outcomes:?}"
    );
    let entries = second.entries().unwrap();
    let (_, entry) = entries.iter().find(|(a, _)| *a == kept).unwrap();
    assert_eq!(entry.data, data);
    // Only the two kept peers were dialled: the known and the staged ones are not in the hub.
    assert_eq!(second.get_state(&dropped).unwrap(), None);
    assert_eq!(second.get_state(&staged).unwrap(), None);
    assert_eq!(second.staged().unwrap().len(), 1);
    assert!(entries.iter().all(|(a, _)| *a != staged && *a != dropped));
    close(&second).await;
}

#[tokio::test]
async fn staged_peers_are_kept_apart_until_connected() {
    let hub = Hub::new(off_with(Gate::new(false)));
    let mut events = hub.listen().unwrap();
    let address = format!("net:10.0.2.9:1~shs:{KEY}");
    assert!(hub.stage(&address, Object::new()).unwrap());
    assert!(hub.entries().unwrap().is_empty(), "staging dials nothing");
    assert!(kinds(&mut events).is_empty());
    assert_eq!(hub.staged().unwrap()[0].0, address);
    // Bad addresses are refused as connect refuses them.
    assert!(matches!(
        hub.stage("net:h", Object::new()),
        Err(HubError::Address(AddressError::MissingPort("net")))
    ));
    // Connecting takes it out of staging; a connected peer cannot be staged.
    assert!(matches!(
        dial(&hub, &address, Object::new()).await,
        Ok(ConnectOutcome::Connected(_))
    ));
    assert!(hub.staged().unwrap().is_empty());
    assert_eq!(hub.book().get(&address).unwrap().state, BookState::Kept);
    assert!(!hub.stage(&address, Object::new()).unwrap());
    assert!(!hub.unstage(&address).unwrap(), "not staged");
    // Forgetting disconnects it and drops it from the book.
    assert!(within(LIMIT, "forget", hub.forget(&address)).await.unwrap());
    assert!(hub.book().get(&address).is_none());
    assert!(hub.entries().unwrap().is_empty());
    let other = "net:10.0.2.9:2";
    assert!(hub.stage(other, Object::new()).unwrap());
    assert!(hub.unstage(other).unwrap());
    assert!(hub.book().is_empty());
    close(&hub).await;
}

#[tokio::test]
async fn a_layer_the_dialler_cannot_verify_is_refused_before_dialling() {
    let server = example_server();
    let up = within(
        LIMIT,
        "a TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let hub = Hub::new(upstream());
    let mut events = hub.listen().unwrap();
    // tether has no secret-handshake: dialling would pretend the key was checked.
    for key in [KEY, KEY.trim_end_matches('=')] {
        let shs = format!("net:{up}~shs:{key}");
        match dial(&hub, &shs, Object::new()).await {
            Err(HubError::Address(AddressError::UnverifiedLayer { layer, address })) => {
                assert_eq!((layer.as_str(), address), ("shs", shs.clone()))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            hub.stage(&shs, Object::new()),
            Err(HubError::Address(AddressError::UnverifiedLayer { .. }))
        ));
    }
    assert!(kinds(&mut events).is_empty(), "nothing was dialled");
    assert!(server.clients().is_empty());
    assert!(hub.book().is_empty());
    // `noauth` promises nothing, so it is dialled.
    assert!(matches!(
        dial(&hub, &format!("net:{up}~noauth"), Object::new()).await,
        Ok(ConnectOutcome::Connected(_))
    ));
    close(&hub).await;
}
