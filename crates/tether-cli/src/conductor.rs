//! `tether conductor`: the Holochain conductor-protocol client from the command line
//! (`ConductorConnection`), printing JSON lines.
//!
//! MessagePack values print as JSON with binaries as arrays of byte values; arguments are
//! parsed from JSON (integers stay integers, other numbers become floats).

use crate::Failure;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value as Json};
use std::path::PathBuf;
use std::time::Duration;
use tether::conductor::{
    ConductorConnection, ConductorError, ConductorOptions, ConductorSignal, Dialect, Value,
};

/// `tether conductor …`.
#[derive(Args, Debug)]
pub(crate) struct ConductorArgs {
    #[command(subcommand)]
    command: ConductorCommand,
}

#[derive(Subcommand, Debug)]
enum ConductorCommand {
    /// Send one request (`{type: TYPE, value: ARGS}`) and print its result as one JSON line
    /// (`{"result": …}`; an error answer prints `{"error": {"kind", "message"}}` and exits 1).
    Call {
        #[command(flatten)]
        target: ConductorTarget,
        /// The request type, e.g. `app_info` or `answer`.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// The request's content as JSON (default: none).
        #[arg(value_name = "JSON")]
        args: Option<String>,
    },
    /// Print every signal as one JSON line (`{"type":"app", "cell_id", "zome_name", "signal"}`,
    /// `{"type":"system", "value"}` or `{"type":"unknown", "payload"}`) after a ready line
    /// (`{"listening": true}`), until the connection closes. With `--token`, an `app_info`
    /// request confirms the token was accepted before the ready line.
    Signals {
        #[command(flatten)]
        target: ConductorTarget,
        /// Exit after this many signals.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// The payload convention, as a flag value.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum DialectArg {
    /// `{type, value}`: Holochain 0.5 and later.
    Value,
    /// `{type, data}`: Holochain 0.1–0.4.
    Data,
}

/// Where and how to connect.
#[derive(Args, Debug)]
struct ConductorTarget {
    /// `ws://HOST:PORT`, `wss://HOST:PORT`, `HOST:PORT` or a port on 127.0.0.1.
    url: String,
    /// Authenticate with this token first (its UTF-8 bytes), as an app interface requires.
    #[arg(long)]
    token: Option<String>,
    /// The `Origin` header of the handshake (conductors since 0.3 refuse an upgrade without
    /// one).
    #[arg(long, default_value = "tether")]
    origin: String,
    /// Payload convention: `value` (Holochain 0.5+) or `data` (0.1–0.4).
    #[arg(long, value_enum, default_value = "value")]
    dialect: DialectArg,
    /// Deadline for connecting and for the request (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    timeout: u64,
    /// PEM file of a CA to trust for wss://.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[arg(long)]
    insecure: bool,
}

impl ConductorTarget {
    async fn connect(&self) -> Result<ConductorConnection, ConductorError> {
        let mut options = ConductorOptions {
            timeout: Duration::from_millis(self.timeout),
            origin: Some(self.origin.clone()),
            dialect: match self.dialect {
                DialectArg::Value => Dialect::Value,
                DialectArg::Data => Dialect::Data,
            },
            ..ConductorOptions::default()
        };
        options.tls.ca_pem = self.ca.clone();
        options.tls.insecure = self.insecure;
        let conn = ConductorConnection::new(self.url.as_str(), options)?;
        conn.open(None).await?;
        if let Some(token) = &self.token {
            conn.authenticate(token.as_bytes()).await?;
        }
        Ok(conn)
    }
}

/// Runs a `tether conductor` command. A usage problem is a [`Failure::Usage`]; a connection or
/// remote failure prints `{"error": {"kind", "message"}}` and exits with status 1.
pub(crate) async fn run(args: ConductorArgs) -> Result<(), Failure> {
    let outcome = match args.command {
        ConductorCommand::Call { target, kind, args } => {
            let args = match args.as_deref().map(serde_json::from_str::<Json>) {
                None => Value::Nil,
                Some(Ok(json)) => to_msgpack(&json),
                Some(Err(e)) => return Err(Failure::Usage(format!("JSON argument: {e}"))),
            };
            call(&target, &kind, args).await
        }
        ConductorCommand::Signals { target, count } => signals(&target, count).await,
    };
    if let Err(e) = outcome {
        let kind = match &e {
            ConductorError::Remote { kind, .. } => kind.clone(),
            ConductorError::Timeout { .. } => "timeout".into(),
            ConductorError::Connect(_)
            | ConductorError::Dial { .. }
            | ConductorError::InvalidAddress(_) => "connect".into(),
            ConductorError::Closed => "closed".into(),
            _ => "protocol".into(),
        };
        let message = match &e {
            ConductorError::Remote { message, .. } => message.clone(),
            other => other.to_string(),
        };
        println!("{}", json!({"error": {"kind": kind, "message": message}}));
        eprintln!("tether: {e}");
        // Exit here: `Failure` only carries JSTP errors, and this line is the report.
        std::process::exit(1);
    }
    Ok(())
}

async fn call(target: &ConductorTarget, kind: &str, args: Value) -> Result<(), ConductorError> {
    let conn = target.connect().await?;
    let result = conn.request(kind, args, None).await;
    let _ = conn.close(None).await;
    println!("{}", json!({"result": to_json(&result?)}));
    Ok(())
}

async fn signals(target: &ConductorTarget, count: Option<u64>) -> Result<(), ConductorError> {
    let conn = target.connect().await?;
    let mut signals = conn.signals();
    if target.token.is_some() {
        // `authenticate` has no answer; a request does. An app interface answers `app_info`
        // only once the token is accepted (it drops the connection otherwise), so an answer of
        // any kind means signals now flow to us, and a refused token fails here, not silently.
        match conn.request("app_info", Value::Nil, None).await {
            Ok(_) | Err(ConductorError::Remote { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // The ready line tells scripts the connection is open (and authenticated, if asked).
    println!("{}", json!({"listening": true}));
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        match signals.recv().await {
            Ok(payload) => {
                println!("{}", signal_to_json(&payload));
                seen += 1;
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                println!("{}", json!({"lagged": n}));
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    let _ = conn.close(None).await;
    Ok(())
}

/// A signal as one JSON object: app signals with their nested payload decoded.
fn signal_to_json(payload: &Value) -> Json {
    match ConductorSignal::from_payload(payload) {
        ConductorSignal::App(app) => json!({
            "type": "app",
            "cell_id": [app.cell_id.dna_hash, app.cell_id.agent_pub_key],
            "zome_name": app.zome_name,
            "signal": to_json(&app.signal),
        }),
        ConductorSignal::System(value) => json!({"type": "system", "value": to_json(&value)}),
        other => json!({"type": "unknown", "payload": to_json(&match other {
            ConductorSignal::Other(v) => v,
            _ => payload.clone(),
        })}),
    }
}

/// MessagePack to JSON: binaries as arrays of byte values, map keys as their JSON text unless
/// they are strings, non-finite floats as null.
pub(crate) fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => json!(n),
            (None, Some(n)) => json!(n),
            _ => Json::Null,
        },
        Value::F32(f) => json!(f),
        Value::F64(f) => json!(f),
        Value::String(s) => json!(s.as_str().unwrap_or_default()),
        Value::Binary(b) | Value::Ext(_, b) => json!(b),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        Some(s) => s.to_owned(),
                        None => to_json(k).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

/// JSON to MessagePack: integers stay integers, other numbers are floats.
pub(crate) fn to_msgpack(j: &Json) -> Value {
    match j {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::Array(a.iter().map(to_msgpack).collect()),
        Json::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), to_msgpack(v)))
                .collect(),
        ),
    }
}
