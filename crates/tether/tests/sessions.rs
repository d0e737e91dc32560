//! Sessions that survive: links cut under a live client (through a loopback proxy), restore,
//! resend in both directions, CALLBACK_LOST and call_with_resend, restore from a session store
//! on another server, and a chaos run with many cuts.

mod common;

use common::{within, LIMIT};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether::reconnect::{Attempt, Backoff};
use tether::store::{MemoryStore, SessionStore};
use tether::testing::CutProxy;
use tether::{
    connect, Application, ClientOptions, Connection, ConnectionEvent, Endpoint, Error, Interface,
    Server, ServerEvent, Value,
};
use tokio::sync::{broadcast, mpsc, Notify};

/// What the test service saw.
#[derive(Default)]
struct Seen {
    /// Every execution of `log.add`, in order.
    adds: Vec<i64>,
    /// Every `log.note` event from clients, in order.
    notes: Vec<i64>,
}

struct Service {
    seen: Arc<Mutex<Seen>>,
    /// `log.block` reports each entry here, then waits for `release`.
    entered: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

fn service() -> (
    Application,
    Arc<Mutex<Seen>>,
    mpsc::UnboundedReceiver<()>,
    Arc<Notify>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (entered, entered_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let svc = Arc::new(Service {
        seen: seen.clone(),
        entered,
        release: release.clone(),
    });
    let (s1, s2, s3) = (svc.clone(), svc.clone(), svc);
    let app = Application::new("svc", "1.0.0").unwrap().interface(
        "log",
        Interface::new()
            .method("add", move |_c, args: Vec<Value>| {
                let n = args.first().and_then(Value::as_i64).unwrap_or(-1);
                s1.seen.lock().unwrap().adds.push(n);
                async move { Ok(Value::from(n)) }
            })
            .method("block", move |_c, _args| {
                let svc = s2.clone();
                async move {
                    let _ = svc.entered.send(());
                    svc.release.notified().await;
                    Ok(Value::from("released"))
                }
            })
            .on_event("note", move |_c, args: Vec<Value>| {
                let n = args.first().and_then(Value::as_i64).unwrap_or(-1);
                s3.seen.lock().unwrap().notes.push(n);
            }),
    );
    (app, seen, entered_rx, release)
}

/// A server on loopback TCP behind a cuttable proxy.
struct Setup {
    server: Server,
    proxy: CutProxy,
    seen: Arc<Mutex<Seen>>,
    entered: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
    server_events: broadcast::Receiver<ServerEvent>,
}

async fn setup_with(store: Option<Arc<dyn SessionStore>>, heartbeat: Option<Duration>) -> Setup {
    let (app, seen, entered, release) = service();
    let mut builder = Server::builder().application(app);
    if let Some(store) = store {
        builder = builder.session_store(store);
    }
    if let Some(every) = heartbeat {
        builder = builder.heartbeat_interval(every);
    }
    let server = builder.build().unwrap();
    let server_events = server.events();
    let addr = within(
        LIMIT,
        "the server's TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let proxy = within(
        LIMIT,
        "the cut proxy",
        CutProxy::start(addr.parse().unwrap()),
    )
    .await
    .unwrap();
    Setup {
        server,
        proxy,
        seen,
        entered,
        release,
        server_events,
    }
}

fn fast_reconnect() -> ClientOptions {
    let mut options = ClientOptions::default()
        .reconnector(Backoff::fixed_range(
            Duration::from_millis(1),
            Duration::from_millis(20),
        ))
        .call_timeout(Duration::from_secs(30));
    // The chaos test reads every event; leave room so it never lags.
    options.connection.event_capacity = 1 << 16;
    options
}

async fn client(setup: &Setup) -> Connection {
    let url = format!("jstp://{}", setup.proxy.local_addr());
    connected(&url, fast_reconnect()).await
}

/// Connects to `svc` at `url`, with a deadline.
async fn connected(url: &str, options: ClientOptions) -> Connection {
    within(
        LIMIT,
        &format!("the handshake with svc at {url}"),
        connect(url, "svc", options),
    )
    .await
    .unwrap()
}

/// `conn.call("log", method, args)` with a deadline naming the call.
async fn call(conn: &Connection, method: &str, args: Vec<Value>) -> Result<Vec<Value>, Error> {
    let what = format!("the answer to log.{method}{args:?}");
    within(LIMIT, &what, conn.call("log", method, args)).await
}

/// `conn.emit("log", event, args)` with a deadline naming the event.
async fn emit(conn: &Connection, event: &str, args: Vec<Value>) {
    let what = format!("room to emit log.{event}{args:?}");
    within(LIMIT, &what, conn.emit("log", event, args))
        .await
        .unwrap();
}

/// `conn.close()` with a deadline.
async fn close(conn: &Connection) {
    within(LIMIT, "the client's close", conn.close()).await;
}

/// Waits for the next successful reconnect of `conn`.
async fn reconnected(events: &mut broadcast::Receiver<ConnectionEvent>) {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(ConnectionEvent::Reconnect { error: None }) => return,
                Ok(ConnectionEvent::Close) | Err(broadcast::error::RecvError::Closed) => {
                    panic!("closed instead of reconnecting")
                }
                _ => {}
            }
        }
    };
    within(LIMIT, "a successful Reconnect event", wait).await;
}

/// The server-side connection of the next client to connect.
async fn next_server_conn(events: &mut broadcast::Receiver<ServerEvent>) -> Connection {
    within(LIMIT, "the server's Connect event", async {
        loop {
            if let ServerEvent::Connect(c) = events.recv().await.unwrap() {
                return c;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_events_made_while_cut_are_sent_once_after_restore() {
    let mut s = setup_with(None, None).await;
    let conn = client(&s).await;
    let server_conn = next_server_conn(&mut s.server_events).await;
    let mut events = conn.events();
    assert_eq!(
        call(&conn, "add", vec![1.into()]).await.unwrap(),
        vec![Value::from(1)]
    );

    assert_eq!(s.proxy.cut(), 1);
    // Made while the link is down (or dying): buffered, then sent after the restore.
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("log", "add", vec![2.into()]).await })
    };
    emit(&conn, "note", vec![3.into()]).await;
    reconnected(&mut events).await;
    assert_eq!(
        within(LIMIT, "the answer to log.add(2), sent while cut", pending)
            .await
            .unwrap()
            .unwrap(),
        vec![Value::from(2)]
    );
    // One more round trip so the note (sent before it) has been handled.
    assert_eq!(
        call(&conn, "add", vec![4.into()]).await.unwrap(),
        vec![Value::from(4)]
    );
    {
        let seen = s.seen.lock().unwrap();
        assert_eq!(seen.adds, vec![1, 2, 4]);
        assert_eq!(seen.notes, vec![3]);
    }
    // The same session and the same server-side connection, counted as a client again.
    assert_eq!(s.server.clients().len(), 1);
    assert_eq!(s.server.clients()[0].id(), server_conn.id());
    assert_eq!(conn.session_id(), server_conn.session_id());
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_callback_is_lost_fails_with_callback_lost_and_resend_runs_it_again() {
    let mut s = setup_with(None, None).await;
    let conn = client(&s).await;
    let mut events = conn.events();

    // A plain call: the server got it, the answer dies with the link.
    let call = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("log", "block", vec![]).await })
    };
    within(LIMIT, "log.block to be entered", s.entered.recv())
        .await
        .unwrap();
    s.proxy.cut();
    s.release.notify_one();
    reconnected(&mut events).await;
    assert!(matches!(
        within(LIMIT, "the lost call to fail", call).await.unwrap(),
        Err(Error::CallbackLost)
    ));

    // With resend: the lost call is issued again under a new id and answered.
    let call = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call_with_resend("log", "block", vec![]).await })
    };
    within(LIMIT, "log.block to be entered", s.entered.recv())
        .await
        .unwrap();
    s.proxy.cut();
    s.release.notify_one();
    within(
        LIMIT,
        "the resent log.block to be entered",
        s.entered.recv(),
    )
    .await
    .unwrap();
    s.release.notify_one();
    assert_eq!(
        within(LIMIT, "the answer to the resent log.block", call)
            .await
            .unwrap()
            .unwrap(),
        vec![Value::from("released")]
    );
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_resends_events_the_client_missed() {
    let mut s = setup_with(None, None).await;
    let conn = client(&s).await;
    let server_conn = next_server_conn(&mut s.server_events).await;
    let mut events = conn.events();

    s.proxy.cut();
    for i in 1..=100 {
        emit(&server_conn, "tick", vec![i.into()]).await;
    }
    emit(&server_conn, "done", vec![]).await;
    let mut ticks = Vec::new();
    let collect = async {
        loop {
            match events.recv().await.unwrap() {
                ConnectionEvent::Event { event, args, .. } if event == "tick" => {
                    ticks.push(args[0].as_i64().unwrap())
                }
                ConnectionEvent::Event { event, .. } if event == "done" => break,
                _ => {}
            }
        }
    };
    within(LIMIT, "the 100 ticks and the done event", collect).await;
    assert_eq!(ticks, (1..=100).collect::<Vec<i64>>());
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_restores_on_another_server_through_a_shared_store() {
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new());
    let first = setup_with(Some(store.clone()), None).await;
    let second = setup_with(Some(store.clone()), None).await;
    let second_url: Endpoint = format!("jstp://{}", second.proxy.local_addr())
        .parse()
        .unwrap();
    // The client's reconnector moves it to the second server.
    let options = ClientOptions::default().reconnector(move |_failures: u32, _last: &Endpoint| {
        Some(Attempt {
            delay: Duration::from_millis(1),
            endpoint: second_url.clone(),
        })
    });
    let url = format!("jstp://{}", first.proxy.local_addr());
    let conn = connected(&url, options).await;
    let mut events = conn.events();
    assert_eq!(
        call(&conn, "add", vec![1.into()]).await.unwrap(),
        vec![Value::from(1)]
    );

    // The first server goes away for good; its sessions are saved as it shuts down.
    within(
        LIMIT,
        "the first server's shutdown",
        first.server.shutdown(),
    )
    .await;
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("log", "add", vec![2.into()]).await })
    };
    reconnected(&mut events).await;
    assert_eq!(
        within(
            LIMIT,
            "the answer to log.add(2) from the second server",
            pending
        )
        .await
        .unwrap()
        .unwrap(),
        vec![Value::from(2)]
    );
    assert_eq!(first.seen.lock().unwrap().adds, vec![1]);
    assert_eq!(second.seen.lock().unwrap().adds, vec![2]);
    let restored = second.server.clients();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].session_id(), conn.session_id());
    close(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_session_is_retried_or_replaced_as_configured() {
    let gone = setup_with(None, None).await;
    let fresh = setup_with(None, None).await;
    let fresh_url: Endpoint = format!("jstp://{}", fresh.proxy.local_addr())
        .parse()
        .unwrap();
    let to_fresh = move |failures: u32, _last: &Endpoint| {
        // Give up after a few refusals so the retrying client ends.
        (failures < 3).then(|| Attempt {
            delay: Duration::from_millis(1),
            endpoint: fresh_url.clone(),
        })
    };
    let url = format!("jstp://{}", gone.proxy.local_addr());

    // Upstream's behaviour: the unknown session is retried (here until the reconnector gives
    // up) and the connection finally closes.
    let retrying = connected(&url, ClientOptions::default().reconnector(to_fresh.clone())).await;
    let mut events = retrying.events();
    gone.proxy.cut();
    let refusals = within(LIMIT, "3 refused reconnects, then Close", async {
        let mut refusals = 0;
        loop {
            match events.recv().await.unwrap() {
                ConnectionEvent::Reconnect { error: Some(_) } => refusals += 1,
                ConnectionEvent::Close => return refusals,
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(refusals, 3);
    within(LIMIT, "the retrying client to close", retrying.closed()).await;

    // With the fallback: a new session on the new server; what was in flight is lost.
    let falling_back = connected(
        &url,
        ClientOptions::default()
            .reconnector(to_fresh)
            .fallback_to_new_session(true),
    )
    .await;
    let old_session = falling_back.session_id();
    let mut events = falling_back.events();
    gone.proxy.cut();
    reconnected(&mut events).await;
    assert_ne!(falling_back.session_id(), old_session);
    assert_eq!(
        call(&falling_back, "add", vec![7.into()]).await.unwrap(),
        vec![Value::from(7)]
    );
    assert_eq!(fresh.seen.lock().unwrap().adds, vec![7]);
    close(&falling_back).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_reconnecting_and_fails_what_is_pending() {
    let s = setup_with(None, None).await;
    let conn = client(&s).await;
    within(LIMIT, "the server's shutdown", s.server.shutdown()).await;
    // The server is gone: the client keeps trying until closed.
    let pending = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call("log", "add", vec![1.into()]).await })
    };
    let mut events = conn.events();
    within(LIMIT, "a ReconnectAttempt event", async {
        loop {
            if let ConnectionEvent::ReconnectAttempt { .. } = events.recv().await.unwrap() {
                break;
            }
        }
    })
    .await;
    close(&conn).await;
    assert!(matches!(
        within(LIMIT, "the pending call to fail on close", pending)
            .await
            .unwrap(),
        Err(Error::Closed)
    ));
    assert!(conn.is_closed());
}

/// Many calls and events while the link is cut at random many times: every call ends exactly
/// once (answered, or CALLBACK_LOST and then resent), and every event arrives exactly once, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cuts_lose_and_duplicate_nothing() {
    const CALLS: i64 = 3000;
    const EVENTS: i64 = 3000;
    const TASKS: i64 = 16;
    let mut s = setup_with(None, Some(Duration::from_millis(50))).await;
    let conn = client(&s).await;
    let server_conn = next_server_conn(&mut s.server_events).await;
    let mut client_events = conn.events();

    // Chaos: cut the link every 60–160 completed calls (pseudo-random) until told to stop, so
    // the number of cuts does not depend on the machine's speed.
    let (progress, progress_rx) = tokio::sync::watch::channel(0i64);
    let progress = Arc::new(progress);
    let stop = Arc::new(Notify::new());
    let chaos = {
        let stop = stop.clone();
        let proxy = s.proxy;
        let mut progress_rx = progress_rx;
        tokio::spawn(async move {
            let mut cuts = 0u32;
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            let mut threshold = 0i64;
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                threshold += 60 + (x % 100) as i64;
                tokio::select! {
                    _ = stop.notified() => return (cuts, proxy.accepted()),
                    _ = async {
                        let _ = progress_rx.wait_for(|done| *done >= threshold).await;
                        proxy.wait_for_links(1).await;
                    } => {
                        cuts += proxy.cut() as u32;
                    }
                }
            }
        })
    };

    // Server → client events, emitted throughout.
    // Paced by the calls' progress, so events are in flight across the cuts too.
    let emitter = {
        let server_conn = server_conn.clone();
        let mut progress_rx = progress.subscribe();
        tokio::spawn(async move {
            for i in 0..EVENTS {
                let _ = progress_rx
                    .wait_for(|done| *done * EVENTS >= i * CALLS)
                    .await;
                server_conn
                    .emit("log", "tick", vec![i.into()])
                    .await
                    .unwrap();
            }
            server_conn.emit("log", "done", vec![]).await.unwrap();
        })
    };

    // Client → server calls from several tasks, resending on CALLBACK_LOST.
    let lost: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    let callers: Vec<_> = (0..TASKS)
        .map(|t| {
            let conn = conn.clone();
            let lost = lost.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut k = t;
                while k < CALLS {
                    loop {
                        match conn.call("log", "add", vec![k.into()]).await {
                            Ok(v) => {
                                assert_eq!(v, vec![Value::from(k)]);
                                progress.send_modify(|done| *done += 1);
                                break;
                            }
                            Err(Error::CallbackLost) => {
                                *lost.lock().unwrap().entry(k).or_default() += 1;
                            }
                            Err(e) => panic!("call {k} failed: {e}"),
                        }
                    }
                    k += TASKS;
                }
            })
        })
        .collect();

    let mut ticks = Vec::new();
    let collect = async {
        loop {
            match client_events.recv().await {
                Ok(ConnectionEvent::Event { event, args, .. }) if event == "tick" => {
                    ticks.push(args[0].as_i64().unwrap())
                }
                Ok(ConnectionEvent::Event { event, .. }) if event == "done" => break,
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    };
    // Longer than LIMIT: the whole run, thousands of round trips on a loaded machine.
    let run = Duration::from_secs(120);
    within(run, "all 3000 calls to be answered", async {
        for c in callers {
            c.await.unwrap();
        }
    })
    .await;
    within(run, "the emitter to emit all 3000 events", emitter)
        .await
        .unwrap();
    within(run, "the 3000 tick events and the done event", collect).await;
    stop.notify_one();
    let (cuts, links) = within(LIMIT, "the chaos task to stop", chaos)
        .await
        .unwrap();

    assert_eq!(
        ticks,
        (0..EVENTS).collect::<Vec<_>>(),
        "events lost or duplicated"
    );
    let lost = lost.lock().unwrap().clone();
    let mut runs: HashMap<i64, u32> = HashMap::new();
    for k in &s.seen.lock().unwrap().adds {
        *runs.entry(*k).or_default() += 1;
    }
    for k in 0..CALLS {
        let expected = 1 + lost.get(&k).copied().unwrap_or(0);
        assert_eq!(runs.get(&k).copied(), Some(expected), "call {k}");
    }
    assert!(cuts >= 10, "only {cuts} cuts happened");
    // Every cut was followed by a reconnect through the proxy.
    assert!(links > u64::from(cuts), "{links} links for {cuts} cuts");
    close(&conn).await;
}

/// A peer that only receives events never confirms them by itself; the sender pings for a
/// confirmation every 512 unconfirmed messages, so a bounded buffer (here 1024) never fills
/// and no event is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_only_stream_keeps_the_buffer_small() {
    let (app, _, _, _) = service();
    let mut config = tether::ConnectionConfig::default();
    config.session.max_buffered_messages = 1024;
    let server = Server::builder()
        .application(app)
        .connection_config(config)
        .build()
        .unwrap();
    let mut server_events = server.events();
    let addr = within(
        LIMIT,
        "the server's TCP listener",
        server.listen("jstp://127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let conn = connected(&format!("jstp://{addr}"), fast_reconnect()).await;
    let server_conn = next_server_conn(&mut server_events).await;
    let mut server_side = server_conn.events();
    let mut events = conn.events();
    let mut got = 0i64;
    for batch in 0..4i64 {
        for i in 0..600i64 {
            emit(&server_conn, "tick", vec![(batch * 600 + i).into()]).await;
        }
        let all = async {
            while got < (batch + 1) * 600 {
                if let ConnectionEvent::Event { args, .. } = events.recv().await.unwrap() {
                    assert_eq!(args[0].as_i64(), Some(got));
                    got += 1;
                }
            }
        };
        let what = format!(
            "the ticks of batch {batch} (up to #{})",
            (batch + 1) * 600 - 1
        );
        within(LIMIT, &what, all).await;
        // A round trip after the client's pong, so the server has seen the confirmation.
        call(&conn, "add", vec![batch.into()]).await.unwrap();
    }
    // Without the automatic pings 2400 unconfirmed events would have overflowed 1024.
    while let Ok(ev) = server_side.try_recv() {
        assert!(!matches!(ev, ConnectionEvent::Error { .. }), "{ev:?}");
    }
    close(&conn).await;
}
