//! The `tether` command: run a JSTP server hosting the example application, call it, inspect
//! it, listen to its events, and benchmark it.

mod bench;
mod hub;
mod json;
mod load;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::transport::{server_config, ListenerOptions};
use tether::{
    connect, ClientOptions, ConnectionEvent, Endpoint, Error, LoginPolicy, Server, ServerEvent,
};

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
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TCP listener address (repeatable), e.g. 127.0.0.1:3000.
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<String>,
    /// TLS listener address (repeatable); needs --cert and --key.
    #[arg(long, value_name = "ADDR")]
    tls: Vec<String>,
    /// Unix socket path (repeatable).
    #[arg(long, value_name = "PATH")]
    unix: Vec<PathBuf>,
    /// WebSocket listener address (repeatable).
    #[arg(long, value_name = "ADDR")]
    ws: Vec<String>,
    /// Holochain conductor-protocol WebSocket listener address (repeatable): the example app's
    /// requests `answer`, `divide`, `say_hi` and a signal per chat message.
    #[arg(long, value_name = "ADDR")]
    conductor: Vec<String>,
    /// Secure WebSocket listener address (repeatable); needs --cert and --key.
    #[arg(long, value_name = "ADDR")]
    wss: Vec<String>,
    /// PEM certificate chain for --tls and --wss.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --tls and --wss.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// A user for the `login` strategy, NAME:PASSWORD (repeatable). Without any, only
    /// anonymous handshakes succeed.
    #[arg(long, value_name = "NAME:PASSWORD", value_parser = parse_user)]
    user: Vec<(String, String)>,
    /// Ping every client this often (milliseconds).
    #[arg(long, value_name = "MS")]
    heartbeat: Option<u64>,
    /// Close connections that have not completed a handshake within this time (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    handshake_timeout: u64,
    /// Where sessions of disconnected clients are kept: `memory` (default), a file path for
    /// an embedded database that survives restarts, or `redis://HOST:PORT` to share sessions
    /// between several `tether serve` processes.
    #[arg(
        long,
        value_name = "memory|PATH|redis://HOST:PORT",
        default_value = "memory"
    )]
    store: String,
    /// How long a disconnected client's session stays live in memory (milliseconds) before
    /// it lives on only in the store.
    #[arg(long, value_name = "MS", default_value_t = 3_600_000)]
    client_expiration: u64,
    /// Largest message accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = tether_wire::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
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
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
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
        Command::Serve(args) => serve(args).await,
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

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let mut endpoints: Vec<(&str, Endpoint)> = Vec::new();
    let add = |endpoints: &mut Vec<(&str, Endpoint)>, kind: &'static str, url: String| {
        let endpoint = url
            .parse::<Endpoint>()
            .map_err(|e| Failure::Usage(format!("--{kind} {url}: {e}")))?;
        endpoints.push((kind, endpoint));
        Ok::<(), Failure>(())
    };
    for a in &args.tcp {
        add(&mut endpoints, "tcp", format!("jstp://{a}"))?;
    }
    for a in &args.tls {
        add(&mut endpoints, "tls", format!("jstps://{a}"))?;
    }
    for p in &args.unix {
        add(&mut endpoints, "unix", format!("unix:{}", p.display()))?;
    }
    for a in &args.ws {
        add(&mut endpoints, "ws", format!("ws://{a}"))?;
    }
    for a in &args.wss {
        add(&mut endpoints, "wss", format!("wss://{a}"))?;
    }
    if endpoints.is_empty() && args.conductor.is_empty() {
        add(&mut endpoints, "tcp", "jstp://127.0.0.1:3000".into())?;
        add(&mut endpoints, "ws", "ws://127.0.0.1:8080".into())?;
    }

    let mut listener = ListenerOptions::default().with_max_message_size(args.max_message_size);
    if !args.tls.is_empty() || !args.wss.is_empty() {
        let (Some(cert), Some(key)) = (&args.cert, &args.key) else {
            return Err(Failure::Usage(
                "--tls and --wss need --cert FILE and --key FILE".into(),
            ));
        };
        let tls = server_config(cert, key)
            .map_err(|e| Failure::Usage(format!("cannot load --cert/--key: {e}")))?;
        listener = listener.with_tls(tls);
    }

    let store = tether::store::open(&args.store)
        .await
        .map_err(|e| Failure::Usage(format!("--store {}: {e}", args.store)))?;
    let chat = ChatHub::new();
    let mut builder = Server::builder()
        .application(test_app(chat.clone()))
        .session_store(store)
        .client_expiration_time(Duration::from_millis(args.client_expiration))
        .handshake_timeout(Duration::from_millis(args.handshake_timeout))
        .listener_options(listener);
    if let Some(ms) = args.heartbeat {
        if ms == 0 {
            return Err(Failure::Usage("--heartbeat must be at least 1 ms".into()));
        }
        builder = builder.heartbeat_interval(Duration::from_millis(ms));
    }
    if !args.user.is_empty() {
        let policy = args
            .user
            .iter()
            .fold(LoginPolicy::new(), |p, (u, pw)| p.user(u, pw));
        builder = builder.auth_policy(policy);
    }
    let server = builder.build()?;
    chat.bind(&server);

    let mut log_events = server.events();
    tokio::spawn(async move {
        while let Ok(event) = log_events.recv().await {
            log_server_event(&event);
        }
    });

    let stop = StopSignals::install()
        .map_err(|e| Failure::Runtime(Error::Transport(tether::TransportError::Io(e))))?;
    let mut ready = serde_json::Map::new();
    ready.insert("ready".into(), json!(true));
    if !args.conductor.is_empty() {
        let conductor = tether::example::conductor_server(&chat);
        for addr in &args.conductor {
            let bound = conductor
                .listen(addr)
                .await
                .map_err(|e| Failure::Usage(format!("--conductor {addr}: {e}")))?;
            tracing::info!(%bound, "conductor listening");
            ready
                .entry("conductor")
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .expect("listener entries are arrays")
                .push(json!(bound));
        }
    }
    for (kind, endpoint) in endpoints {
        let addr = server.listen(endpoint.clone()).await?;
        tracing::info!(%endpoint, %addr, "listening");
        ready
            .entry(kind)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("listener entries are arrays")
            .push(json!(addr));
    }
    println!("{}", serde_json::Value::Object(ready));

    stop.wait().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

fn log_server_event(event: &ServerEvent) {
    match event {
        ServerEvent::Connect(c) => tracing::info!(
            id = c.id(),
            remote = ?c.remote_addr(),
            user = ?c.username(),
            "client connected"
        ),
        ServerEvent::Disconnect(c) => tracing::info!(id = c.id(), "client disconnected"),
        ServerEvent::Reconnect(c) => tracing::info!(
            id = c.id(),
            remote = ?c.remote_addr(),
            session = ?c.session_tag(),
            "client restored its session"
        ),
        ServerEvent::RestoreSession(_) => {}
        ServerEvent::HandshakeRequest {
            connection,
            app,
            strategy,
        } => tracing::debug!(id = connection.id(), %app, %strategy, "handshake request"),
        ServerEvent::HandshakeTimeout(c) => {
            tracing::warn!(id = c.id(), remote = ?c.remote_addr(), "handshake timeout")
        }
        ServerEvent::ConnectionError { connection, error } => tracing::warn!(
            id = ?connection.as_ref().map(|c| c.id()),
            %error,
            "connection error"
        ),
    }
}

/// Ctrl-C, or SIGTERM on Unix. Created before the ready line is printed, so a signal sent
/// right after it is never missed.
struct StopSignals {
    #[cfg(unix)]
    signals: Vec<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignals {
                signals: vec![
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                ],
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignals {})
        }
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        {
            let waits = self.signals.iter_mut().map(|s| Box::pin(s.recv()));
            futures::future::select_all(waits).await;
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
