//! `tether hub`: connect to many peers at once, keep them (redial, liveness check, a peer
//! book that survives a restart), watch them, and use them (`--call` on every connected peer,
//! `--listen` to their events).

use clap::Args;
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether::hub::{
    BookEntry, BookState, Connector, Entry, Heartbeat, Hub, HubEvent, HubOptions, JstpConnector,
    Lagged, PeerBook, PeerKey, Schedule,
};
use tether::reconnect::Backoff;
use tether::{ClientOptions, Connection, ConnectionEvent, Error};
use tokio::sync::mpsc;

/// Lines from the peers (`--call` results, `--listen` events) queued for printing; a task
/// with a line waits when this many are queued, so a slow stdout slows the peers' readers
/// instead of growing memory.
const PEER_LINES: usize = 1024;

/// Options of `tether hub`.
#[derive(Args, Debug)]
pub struct HubArgs {
    /// Peer addresses (`net:HOST:PORT`, `tls:HOST:PORT`, `ws://HOST:PORT`, `wss://HOST:PORT`,
    /// `unix:PATH`, optionally `~shs:KEY`; alternatives separated by `;`).
    addresses: Vec<String>,
    /// Read more addresses from a file, one per line (`#` starts a comment).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Application to connect to, `name` or `name@range`.
    #[arg(long, default_value = "testApp")]
    app: String,
    /// Redraw a table of the entries on every change instead of printing JSON lines.
    #[arg(long)]
    table: bool,
    /// PEM file of a CA to trust for `tls:` and `wss://` peers.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not verify the peers' certificates (testing only).
    #[arg(long)]
    insecure: bool,
    /// Deadline for connecting and for the handshake (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    timeout: u64,
    /// Do not dial a lost peer again.
    #[arg(long)]
    no_redial: bool,
    /// First redial delay (milliseconds); it doubles up to `--redial-max`, plus up to 1 s of
    /// jitter.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    redial_min: u64,
    /// Largest redial delay before jitter (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 32_000)]
    redial_max: u64,
    /// Ping every connected peer this often and drop one that leaves a ping unanswered as
    /// long (milliseconds); 0 turns the liveness check off.
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    heartbeat: u64,
    /// Redial a dropped link with a fresh session instead of letting the connection restore
    /// its own.
    #[arg(long)]
    no_resume: bool,
    /// Keep the peer book in this redb file: peers given (and staged) are added to it, and a
    /// restarted hub dials the peers it keeps. The first line then also lists the book.
    #[arg(long, value_name = "FILE")]
    book: Option<PathBuf>,
    /// Stage an address: remember it in the book as a suggestion without dialling it
    /// (repeatable).
    #[arg(long, value_name = "ADDRESS")]
    stage: Vec<String>,
    /// Call `IFACE.METHOD(ARGS…)` on every peer once it connects (again after each
    /// reconnect), one `result` line per call. Arguments are JSTP values (mdsf), else strings.
    #[arg(long, num_args = 2.., value_names = ["IFACE", "METHOD"], allow_negative_numbers = true, conflicts_with = "table")]
    call: Option<Vec<String>>,
    /// Print the events the peers emit on interface IFACE (`*` for all), one `peer-event`
    /// line each.
    #[arg(long, value_name = "IFACE", conflicts_with = "table")]
    listen: Option<String>,
}

impl HubArgs {
    fn client_options(&self) -> ClientOptions {
        let timeout = Duration::from_millis(self.timeout);
        let mut options = ClientOptions {
            handshake_timeout: timeout,
            ..ClientOptions::default()
        };
        options.transport.connect_timeout = timeout;
        options.transport.tls.ca_pem = self.ca.clone();
        options.transport.tls.insecure = self.insecure;
        options
    }

    fn schedule(&self) -> Schedule {
        let ms = Duration::from_millis;
        let redial = Backoff {
            initial: ms(self.redial_min),
            max: ms(self.redial_max.max(self.redial_min)),
            // Jitter spreads redials of many peers; below 1 s delays it is scaled down.
            jitter: ms(self.redial_min.min(1_000)),
            max_attempts: None,
        };
        Schedule {
            redial: (!self.no_redial).then(|| Arc::new(redial) as Arc<dyn tether::hub::Redial>),
            heartbeat: (self.heartbeat > 0).then(|| Heartbeat {
                interval: ms(self.heartbeat),
                timeout: ms(self.heartbeat),
            }),
            resume: !self.no_resume,
        }
    }
}

/// An error with its sources, for a message on stderr.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn book_json(address: &str, e: &BookEntry) -> serde_json::Value {
    json!({
        "address": address,
        "state": lower(e.state),
        "last": e.last.as_ref().map(|o| lower(&o.kind).replace('_', "-")),
        "detail": e.last.as_ref().and_then(|o| o.detail.clone()),
    })
}

/// What the lines about one peer start with: its address, key and direction.
fn peer_line(kind: &str, address: &str, key: Option<PeerKey>) -> serde_json::Value {
    json!({
        "event": kind,
        "address": address,
        "key": key.map(|k| k.to_string()),
        "direction": "outbound",
    })
}

/// `--call`: calls the connected peer and queues one `result` line.
async fn call_peer(
    conn: Connection,
    line: serde_json::Value,
    call: Arc<Vec<String>>,
    out: mpsc::Sender<serde_json::Value>,
) {
    let (iface, method) = (call[0].clone(), call[1].clone());
    let args = call[2..]
        .iter()
        .map(|a| crate::json::parse_arg(a))
        .collect();
    let mut line = line;
    line["interface"] = json!(iface);
    line["method"] = json!(method);
    match conn.call(&iface, &method, args).await {
        Ok(values) => line["result"] = crate::json::list_to_json(&values),
        Err(e) => line["error"] = json!(chain(&e)),
    }
    let _ = out.send(line).await;
}

/// `--listen`: queues a `peer-event` line for each event of `iface` until the connection
/// ends. The receiver is taken before the `connected` line is printed, so nothing emitted
/// after that line is missed.
async fn listen_peer(
    mut events: tokio::sync::broadcast::Receiver<ConnectionEvent>,
    line: serde_json::Value,
    iface: String,
    out: mpsc::Sender<serde_json::Value>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match events.recv().await {
            Ok(ConnectionEvent::Event {
                iface: i,
                event,
                args,
            }) if iface == "*" || i == iface => {
                let mut line = line.clone();
                line["interface"] = json!(i);
                line["name"] = json!(event);
                line["args"] = crate::json::list_to_json(&args);
                if out.send(line).await.is_err() {
                    return;
                }
            }
            Ok(ConnectionEvent::Close) | Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(n)) => {
                let mut line = line.clone();
                line["event"] = json!("peer-lagged");
                line["missed"] = json!(n);
                if out.send(line).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
        }
    }
}

fn lower(d: impl std::fmt::Debug) -> String {
    format!("{d:?}").to_lowercase()
}

fn entry_json(address: &str, e: &Entry) -> serde_json::Value {
    json!({
        "address": address,
        "state": lower(e.state),
        "key": e.key.map(|k| k.to_string()),
        "direction": e.direction.map(lower),
    })
}

/// One line per event: its kind, address, key (`null` without one), direction (`null` before
/// a connection), and what the kind carries (error, cause, redial delay).
fn event_json(e: &HubEvent, direction: Option<tether::hub::Direction>) -> serde_json::Value {
    let mut line = json!({
        "event": e.kind(),
        "address": e.address(),
        "key": e.key().map(|k| k.to_string()),
        "direction": direction.map(lower),
    });
    match e {
        HubEvent::ConnectingFailed { error, .. } | HubEvent::DisconnectingFailed { error, .. } => {
            line["error"] = json!(error.to_string());
        }
        HubEvent::Disconnected { cause, .. } => line["cause"] = json!(cause.to_string()),
        HubEvent::Redialing {
            delay, failures, ..
        } => {
            line["delay_ms"] = json!(delay.as_millis() as u64);
            line["failures"] = json!(failures);
        }
        _ => {}
    }
    line
}

/// Addresses out of the hub that failed, with their state (`failed`, or `waiting` for a
/// redial) and last error; the table shows them below the hub's entries' order.
type Lost = BTreeMap<String, (&'static str, String)>;

fn track_lost(lost: &mut Lost, e: &HubEvent) {
    let address = e.address().to_owned();
    match e {
        HubEvent::ConnectingFailed { error, .. } => {
            lost.insert(address, ("failed", error.to_string()));
        }
        HubEvent::Disconnected { cause, .. } => {
            if *cause == tether::hub::Cause::Requested {
                lost.remove(&address);
            } else {
                lost.insert(address, ("failed", cause.to_string()));
            }
        }
        HubEvent::Redialing { .. } => {
            if let Some(row) = lost.get_mut(&address) {
                row.0 = "waiting";
            }
        }
        HubEvent::Connected { .. } => {
            lost.remove(&address);
        }
        _ => {}
    }
}

fn draw_table(entries: &[(String, Entry)], lost: &Lost) {
    // Clear the screen and home the cursor, then one row per address, sorted.
    print!("\x1b[2J\x1b[H");
    println!("{:<13} {:<9} ADDRESS ERROR", "STATE", "DIRECTION");
    let mut rows: Vec<(&str, String, String, &str)> = entries
        .iter()
        .map(|(a, e)| {
            let direction = e.direction.map_or("-".to_owned(), lower);
            (a.as_str(), lower(e.state), direction, "")
        })
        .collect();
    for (a, (state, error)) in lost {
        if !entries.iter().any(|(e, _)| e == a) {
            rows.push((a, (*state).to_owned(), "-".to_owned(), error));
        }
    }
    rows.sort_by(|x, y| x.0.cmp(y.0));
    for (address, state, direction, error) in rows {
        println!("{state:<13} {direction:<9} {address} {error}");
    }
}

/// Runs the hub until a stop signal: prints the table as a JSON line first, then a line per
/// event (or redraws a table).
pub async fn run(args: HubArgs, stop: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    let mut addresses = args.addresses.clone();
    if let Some(path) = &args.file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        addresses.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or_default().trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    let connector = JstpConnector::new(args.app.clone(), args.client_options());
    // Refuse bad addresses (ports, layers tether cannot verify) before connecting to anything.
    for a in addresses.iter().chain(&args.stage) {
        a.parse::<tether::hub::MultiAddress>()
            .and_then(|m| {
                m.check_transports()?;
                m.check_layers(connector.verified_layers())
            })
            .map_err(|e| Error::InvalidArgument(format!("{a}: {e}")))?;
    }
    if let Some(ca) = &args.ca {
        std::fs::metadata(ca)
            .map_err(|e| Error::InvalidArgument(format!("--ca {}: {e}", ca.display())))?;
    }
    let mut options = HubOptions::with_connector(connector).scheduler(args.schedule());
    if let Some(path) = &args.book {
        let book = PeerBook::open(path).map_err(|e| {
            Error::InvalidArgument(format!("--book {}: {}", path.display(), chain(&e)))
        })?;
        options = options.book(book);
    }
    let hub = Hub::new(options);
    let hub_err = |e: tether::hub::HubError| Error::InvalidArgument(chain(&e));
    for a in &args.stage {
        hub.stage(a, Default::default()).map_err(hub_err)?;
    }
    let mut events = hub.listen().map_err(hub_err)?;
    let mut live = hub.live_entries().map_err(hub_err)?;
    let first = live.next().await.and_then(Result::ok).unwrap_or_default();
    let mut latest = first.clone();
    let mut lost = Lost::new();
    if args.table {
        draw_table(&first, &lost);
    } else {
        let entries: Vec<_> = first.iter().map(|(a, e)| entry_json(a, e)).collect();
        let mut line = json!({ "entries": entries });
        if args.book.is_some() {
            let book: Vec<_> = hub
                .book()
                .entries()
                .iter()
                .map(|(a, e)| book_json(a, e))
                .collect();
            line["book"] = json!(book);
        }
        println!("{line}");
    }
    // The peers the book keeps first (a restart), then those given now (added to the book).
    hub.connect_book().map_err(hub_err)?;
    for a in addresses {
        if hub
            .book()
            .get(&a)
            .is_some_and(|b| b.state == BookState::Kept)
        {
            continue;
        }
        let hub = hub.clone();
        tokio::spawn(async move {
            // Outcomes are reported as events.
            let _ = hub.connect(&a, Default::default()).await;
        });
    }
    // The direction of each connected address, for the lines of its later events.
    let mut directions = BTreeMap::new();
    let (peer_tx, mut peer_rx) = mpsc::channel::<serde_json::Value>(PEER_LINES);
    let call = args.call.clone().map(Arc::new);
    tokio::pin!(stop);
    let mut stopping = false;
    // The table needs both streams (entries, and events for the lost peers); both end when
    // the hub is closed.
    let (mut events_open, mut live_open) = (true, args.table);
    while events_open || live_open {
        tokio::select! {
            _ = &mut stop, if !stopping => {
                // Keep reporting while the hub disconnects everything; its streams end after.
                stopping = true;
                let hub = hub.clone();
                tokio::spawn(async move { hub.close().await });
            }
            entries = live.next(), if live_open => match entries {
                Some(Ok(entries)) => {
                    latest = entries;
                    draw_table(&latest, &lost);
                }
                // Every table is complete: the next one is the truth.
                Some(Err(_)) => {}
                None => live_open = false,
            },
            Some(line) = peer_rx.recv() => println!("{line}"),
            event = events.next(), if events_open => match event {
                Some(Ok(e)) => {
                    if let HubEvent::Connected { direction, connection, .. } = &e {
                        directions.insert(e.address().to_owned(), *direction);
                        let line = peer_line("result", e.address(), e.key());
                        if let Some(iface) = &args.listen {
                            let mut line = line.clone();
                            line["event"] = json!("peer-event");
                            let events = connection.events();
                            tokio::spawn(listen_peer(events, line, iface.clone(), peer_tx.clone()));
                        }
                        if let Some(call) = &call {
                            let (conn, call) = (connection.clone(), call.clone());
                            tokio::spawn(call_peer(conn, line, call, peer_tx.clone()));
                        }
                    }
                    let direction = directions.get(e.address()).copied();
                    if matches!(e, HubEvent::Disconnected { .. }) {
                        directions.remove(e.address());
                    }
                    track_lost(&mut lost, &e);
                    if args.table {
                        if !matches!(e, HubEvent::Connecting { .. } | HubEvent::Disconnecting { .. }) {
                            draw_table(&latest, &lost);
                        }
                    } else {
                        println!("{}", event_json(&e, direction));
                    }
                }
                Some(Err(Lagged(n))) => {
                    tracing::warn!(missed = n, "hub events fell behind");
                    if !args.table {
                        println!("{}", json!({"event": "lagged", "missed": n}));
                    }
                }
                None => events_open = false,
            },
        }
    }
    hub.close().await;
    Ok(())
}
