//! `tether hub`: connect to many peers at once and watch them.

use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use tether::hub::{Entry, Hub, HubEvent, HubOptions};
use tether::Error;

/// Options of `tether hub`.
#[derive(Args, Debug)]
pub struct HubArgs {
    /// Peer addresses (`net:HOST:PORT`, `tls:HOST:PORT`, `ws://HOST:PORT`, `unix:PATH`,
    /// optionally `~shs:KEY`; alternatives separated by `;`).
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
}

fn entry_json(address: &str, e: &Entry) -> serde_json::Value {
    json!({
        "address": address,
        "state": format!("{:?}", e.state).to_lowercase(),
        "key": e.key.map(|k| k.to_string()),
        "direction": e.direction.map(|d| format!("{d:?}").to_lowercase()),
    })
}

fn event_json(e: &HubEvent) -> serde_json::Value {
    let mut line = json!({"event": e.kind(), "address": e.address()});
    if let HubEvent::ConnectingFailed { error, .. } | HubEvent::DisconnectingFailed { error, .. } =
        e
    {
        line["error"] = json!(error.to_string());
    }
    line
}

fn draw_table(entries: &[(String, Entry)]) {
    // Clear the screen and home the cursor, then one row per address.
    print!("\x1b[2J\x1b[H");
    println!("{:<13} {:<9} ADDRESS", "STATE", "DIRECTION");
    for (address, e) in entries {
        let state = format!("{:?}", e.state).to_lowercase();
        let direction = e
            .direction
            .map_or("-".to_owned(), |d| format!("{d:?}").to_lowercase());
        println!("{state:<13} {direction:<9} {address}");
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
    // Refuse bad addresses before connecting to anything.
    for a in &addresses {
        a.parse::<tether::hub::MultiAddress>()
            .map_err(|e| Error::InvalidArgument(format!("{a}: {e}")))?;
    }
    let hub = Hub::new(HubOptions::jstp(args.app.clone()));
    let hub_err = |e: tether::hub::HubError| Error::InvalidArgument(e.to_string());
    let mut events = hub.listen().map_err(hub_err)?;
    let mut live = hub.live_entries().map_err(hub_err)?;
    let first = live.next().await.unwrap_or_default();
    if args.table {
        draw_table(&first);
    } else {
        let entries: Vec<_> = first.iter().map(|(a, e)| entry_json(a, e)).collect();
        println!("{}", json!({ "entries": entries }));
    }
    for a in addresses {
        let hub = hub.clone();
        tokio::spawn(async move {
            // Outcomes are reported as events.
            let _ = hub.connect(&a, Default::default()).await;
        });
    }
    tokio::pin!(stop);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut stop, if !stopping => {
                // Keep reporting while the hub disconnects everything; its streams end after.
                stopping = true;
                let hub = hub.clone();
                tokio::spawn(async move { hub.close().await });
            }
            event = events.recv(), if !args.table => match event {
                Ok(e) => println!("{}", event_json(&e)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "hub events fell behind");
                }
                Err(_) => break,
            },
            entries = live.next(), if args.table => match entries {
                Some(entries) => draw_table(&entries),
                None => break,
            },
        }
    }
    hub.close().await;
    Ok(())
}
