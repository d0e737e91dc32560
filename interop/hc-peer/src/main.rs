//! A small app interface in the shape of a Holochain >= 0.5 conductor's, built on the real
//! `holochain_websocket` crate (and `holochain_types`' `Signal`), so that tether's
//! `ConductorConnection` can be tested against the bytes and rules Holochain itself uses:
//!
//! - the listener refuses an upgrade without an allowed `Origin` (the crate's own check);
//! - the first message must be `authenticate` with a known token, within 10 s, or the
//!   connection is dropped (as the conductor's app interface does);
//! - requests and responses are adjacently tagged `{type, value}` enums, errors are
//!   `{type:"error", value:{type, value}}`, a request that does not decode is answered with a
//!   `deserialization` error (as the conductor answers a `BadRequest`);
//! - signals are `holochain_types::signal::Signal` values (`{type:"app"|"system", value}`).
//!
//! Usage: `hc-peer [--token TEXT]... [--origin ORIGIN]...` (no `--origin`: any origin; no
//! `--token`: `secret`). It listens on 127.0.0.1 on a free port and prints one JSON line,
//! `{"port":N}`, then serves until killed.

use holochain_serialized_bytes::prelude::*;
use holochain_types::prelude::*;
use holochain_types::signal::{Signal, SystemSignal};
use holochain_types::websocket::AllowedOrigins;
use holochain_websocket::{ReceiveMessage, WebsocketConfig, WebsocketListener, WebsocketSender};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The requests this interface serves, tagged as every conductor API enum is since 0.5.
#[derive(Debug, Serialize, Deserialize, SerializedBytes)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
enum Request {
    /// `{type:"answer"}` → `{type:"answer", value:42}`.
    Answer,
    /// `{type:"divide", value:{a,b}}` → `{type:"divide", value:a/b}`, or an `internal_error`.
    Divide { a: f64, b: f64 },
    /// `{type:"say_hi", value:{name}}` → `{type:"say_hi", value:"Hi, NAME!"}`.
    SayHi { name: String },
    /// Emits an app signal from zome `chat` carrying `{type:"chat", text}`, then answers.
    EmitSignal { text: String },
    /// Emits a system signal (`successful_countersigning` of a fixed entry hash), then answers.
    EmitSystemSignal,
    /// Answers after `ms` milliseconds (lets a client's request timeout fire).
    Sleep { ms: u64 },
}

/// The answers: the request's name as the tag, as tether's example does.
#[derive(Debug, Serialize, Deserialize, SerializedBytes)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
enum Response {
    Answer(u32),
    Divide(f64),
    SayHi(String),
    EmitSignal,
    EmitSystemSignal,
    Sleep,
    Error(WireError),
}

/// The conductor's error shape (`ExternalApiWireError`'s tagging, a few of its kinds).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
enum WireError {
    InternalError(String),
    Deserialization(String),
}

/// What an app interface's `authenticate` carries: the token as an array of ints (the
/// conductor's `AppAuthenticationRequest` has no `serde_bytes` on it).
#[derive(Debug, Serialize, Deserialize)]
struct AuthenticationRequest {
    token: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChatSignal {
    r#type: String,
    text: String,
}

fn cell_id() -> CellId {
    CellId::new(
        DnaHash::from_raw_32(vec![1; 32]),
        AgentPubKey::from_raw_32(vec![2; 32]),
    )
}

/// Every authenticated connection's sender: signals go to all of them, as a conductor sends an
/// app's signals to every authenticated client of its app interface.
type Clients = Arc<Mutex<Vec<WebsocketSender>>>;

async fn emit(clients: &Clients, signal: Signal) {
    let senders = clients.lock().expect("not poisoned").clone();
    for sender in senders {
        let _ = sender.signal(signal.clone()).await;
    }
}

async fn serve(
    sender: WebsocketSender,
    mut receiver: holochain_websocket::WebsocketReceiver,
    tokens: Arc<Vec<Vec<u8>>>,
    clients: Clients,
) {
    // The app interface's rule: authenticate first, within 10 s, with a known token.
    let first = tokio::time::timeout(Duration::from_secs(10), receiver.recv::<Request>()).await;
    let data = match first {
        Ok(Ok(ReceiveMessage::Authenticate(data))) => data,
        _ => return, // dropping the receiver closes the socket
    };
    match holochain_serialized_bytes::decode::<_, AuthenticationRequest>(&data) {
        Ok(auth) if tokens.contains(&auth.token) => {}
        _ => return,
    }
    clients.lock().expect("not poisoned").push(sender);
    loop {
        let (request, respond) = match receiver.recv::<Request>().await {
            Ok(ReceiveMessage::Request(request, respond)) => (request, respond),
            Ok(ReceiveMessage::BadRequest(respond)) => {
                let error = WireError::Deserialization("Failed to deserialize request".into());
                let _ = respond.respond(Response::Error(error)).await;
                continue;
            }
            Ok(_) => continue,
            // The crate does not close on an undecodable frame; neither does the conductor.
            Err(holochain_websocket::WebsocketError::Deserialize(_)) => continue,
            Err(_) => return,
        };
        let response = match request {
            Request::Answer => Response::Answer(42),
            Request::Divide { b: 0.0, .. } => {
                Response::Error(WireError::InternalError("Zero division".into()))
            }
            Request::Divide { a, b } => Response::Divide(a / b),
            Request::SayHi { name } => Response::SayHi(format!("Hi, {name}!")),
            Request::EmitSignal { text } => {
                let payload = ChatSignal {
                    r#type: "chat".into(),
                    text,
                };
                let signal = Signal::App {
                    cell_id: cell_id(),
                    zome_name: ZomeName::from("chat"),
                    signal: AppSignal::new(ExternIO::encode(payload).expect("encodes")),
                };
                emit(&clients, signal).await;
                Response::EmitSignal
            }
            Request::EmitSystemSignal => {
                let hash = EntryHash::from_raw_32(vec![3; 32]);
                emit(
                    &clients,
                    Signal::System(SystemSignal::SuccessfulCountersigning(hash)),
                )
                .await;
                Response::EmitSystemSignal
            }
            Request::Sleep { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Response::Sleep
            }
        };
        let _ = respond.respond(response).await;
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut tokens = Vec::new();
    let mut origins = HashSet::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--token" => tokens.push(value.into_bytes()),
            "--origin" => {
                origins.insert(value);
            }
            other => panic!("unknown flag {other}"),
        }
    }
    if tokens.is_empty() {
        tokens.push(b"secret".to_vec());
    }
    let mut config = WebsocketConfig::LISTENER_DEFAULT;
    if !origins.is_empty() {
        config.allowed_origins = Some(AllowedOrigins::Origins(origins));
    }
    let listener = WebsocketListener::bind(Arc::new(config), "127.0.0.1:0").await?;
    let port = listener.local_addrs()?[0].port();
    println!("{{\"port\":{port}}}");
    let tokens = Arc::new(tokens);
    let clients = Clients::default();
    loop {
        // A refused upgrade (bad Origin) is an error here; keep accepting.
        if let Ok((sender, receiver)) = listener.accept().await {
            tokio::spawn(serve(sender, receiver, tokens.clone(), clients.clone()));
        }
    }
}
