//! The `tether` command: run a JSTP server hosting the example application, call it, inspect
//! it, listen to its events, and benchmark it.

mod admin;
mod bench;
mod conductor;
mod config;
mod guard_args;
mod http;
mod hub;
mod json;
mod load;
mod logging;
mod serve;
mod signals;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use serve::ServeArgs;
use signals::StopSignals;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tether::{connect, ClientOptions, ConnectionEvent, Error};

/// Connections that survive: JSTP server and client.
#[derive(Parser, Debug)]
#[command(name = "tether", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the example application (`testApp@1.0.0` plus `chat`). Without listener flags it
    /// listens on jstp://127.0.0.1:3000 and ws://127.0.0.1:8080.
    Serve(ServeArgs),
    /// Call a remote method and print its results as a JSON array.
    Call {
        #[command(flatten)]
        target: Target,
        /// Interface name.
        iface: String,
        /// Method name.
        method: String,
        /// Arguments, each in record-serialization syntax (`42`, `'text'`, `[1,2]`); anything
        /// that does not parse is passed as a string.
        args: Vec<String>,
    },
    /// Print the method names of a remote interface as a JSON array.
    Inspect {
        #[command(flatten)]
        target: Target,
        /// Interface name.
        iface: String,
    },
    /// Print the events a remote interface sends, one JSON line each, until the connection
    /// closes.
    Listen {
        #[command(flatten)]
        target: Target,
        /// Interface name (`*` for every interface).
        iface: String,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Measure calls/s over JSTP/TCP and JSTP/WS beside a raw TCP echo, in one process run; or
    /// load an external server (--target), serve a floor to compare with (--floor), or report
    /// memory per idle connection (--target --idle N).
    Bench(bench::BenchArgs),
    /// Connect to many peers and print the hub's table and events as JSON lines (or a table).
    Hub(hub::HubArgs),
    /// Talk to a Holochain conductor-protocol server: `call` a request, or print `signals`.
    Conductor(conductor::ConductorArgs),
    /// HTTP/1.1 and HTTP/2 from the command line: `get`/`post` a URL, or `serve` a directory.
    Http(http::HttpArgs),
}

/// Where and how a client command connects.
#[derive(Args, Debug)]
struct Target {
    /// Server URL: jstp://HOST:PORT, jstps://HOST:PORT, ws://HOST:PORT, wss://HOST:PORT or
    /// unix:PATH.
    url: String,
    /// Application name, optionally with a version or range (`testApp@^1.0.0`).
    app: String,
    /// Log in as NAME:PASSWORD.
    #[arg(long, value_name = "NAME:PASSWORD", value_parser = parse_user)]
    login: Option<(String, String)>,
    /// PEM file of a CA to trust for jstps:// and wss://.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[arg(long)]
    insecure: bool,
    /// Deadline for connecting and for each call (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    timeout: u64,
}

fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok((name.to_owned(), password.to_owned())),
        _ => Err(format!("expected NAME:PASSWORD, got {s:?}")),
    }
}

impl Target {
    fn options(&self) -> ClientOptions {
        let mut options = ClientOptions::default();
        if let Some((user, password)) = &self.login {
            options = options.login(user, password);
        }
        let timeout = Duration::from_millis(self.timeout);
        options.handshake_timeout = timeout;
        options.connection.call_timeout = timeout;
        options.transport.connect_timeout = timeout;
        options.transport.tls.ca_pem = self.ca.clone();
        options.transport.tls.insecure = self.insecure;
        options
    }

    async fn connect(&self) -> Result<tether::Connection, Error> {
        connect(&self.url, &self.app, self.options()).await
    }
}

/// Why the command failed: a usage problem (exit 2) or a runtime one (exit 1).
enum Failure {
    Usage(String),
    Runtime(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Runtime(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init_for(&cli.command);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("tether: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            let line = match e.remote() {
                Some(r) => json!({"error": {"code": r.code, "message": r.display_message()}}),
                None => json!({"error": {"code": e.code(), "message": e.to_string()}}),
            };
            println!("{line}");
            eprintln!("tether: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => serve::serve(args).await,
        Command::Call {
            target,
            iface,
            method,
            args,
        } => {
            let conn = target.connect().await?;
            let args = args.iter().map(|a| json::parse_arg(a)).collect();
            let result = conn.call(&iface, &method, args).await;
            conn.close().await;
            println!("{}", json::list_to_json(&result?));
            Ok(())
        }
        Command::Inspect { target, iface } => {
            let conn = target.connect().await?;
            let proxy = conn.inspect(&iface).await;
            conn.close().await;
            println!("{}", json!(proxy?.methods()));
            Ok(())
        }
        Command::Listen {
            target,
            iface,
            count,
        } => {
            let conn = target.connect().await?;
            let mut events = conn.events();
            // The ready line tells scripts the subscription is in place.
            println!("{}", json!({"listening": true, "interface": iface}));
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                match events.recv().await {
                    Ok(ConnectionEvent::Event {
                        iface: i,
                        event,
                        args,
                    }) if iface == "*" || i == iface => {
                        println!(
                            "{}",
                            json!({"interface": i, "event": event, "args": json::list_to_json(&args)})
                        );
                        seen += 1;
                    }
                    Ok(ConnectionEvent::Close)
                    | Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event output fell behind");
                    }
                    Ok(_) => {}
                }
            }
            conn.close().await;
            Ok(())
        }
        Command::Bench(args) => bench::run(args).await.map_err(Failure::Runtime),
        Command::Conductor(args) => conductor::run(args).await,
        Command::Http(args) => http::run(args).await,
        Command::Hub(args) => {
            let stop = StopSignals::install()
                .map_err(|e| Failure::Runtime(Error::Transport(tether::TransportError::Io(e))))?;
            hub::run(args, stop.wait()).await.map_err(|e| match e {
                Error::InvalidArgument(msg) => Failure::Usage(msg),
                other => Failure::Runtime(other),
            })
        }
    }
}
