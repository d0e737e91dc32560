//! `tether serve`: the example application on every listener kind the flags ask for.

use crate::admin::Admin;
use crate::logging::LogFormat;
use crate::signals::StopSignals;
use crate::{parse_user, Failure};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use tether::example::{test_app, ChatHub};
use tether::transport::{server_config, ListenerOptions};
use tether::{Endpoint, Error, LoginPolicy, Server, ServerEvent};

#[derive(Args, Debug, Clone)]
pub(crate) struct ServeArgs {
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
    /// Make the conductor listeners app interfaces: a client must `authenticate` with one of
    /// these tokens (their UTF-8 bytes; repeatable) as its first message within 10 s, or it is
    /// closed (1008). Default: no authentication (any client is served).
    #[arg(long, value_name = "TOKEN")]
    conductor_token: Vec<String>,
    /// Accept WebSocket upgrades on the conductor listeners only with one of these `Origin`
    /// headers (repeatable; `*` allows any origin but still requires the header); others get
    /// HTTP 400 as on a conductor. Default: any origin, or none.
    #[arg(long, value_name = "ORIGIN")]
    conductor_origin: Vec<String>,
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
    /// Join a cluster through this Redis: every broadcast (the example's chat) also reaches
    /// the clients of every other `tether serve --cluster` node on it. Default: no cluster.
    #[arg(long, value_name = "redis://HOST:PORT")]
    cluster: Option<String>,
    /// This node's id in the cluster's logs and stream. Default: host name and process id.
    #[arg(long, value_name = "ID", requires = "cluster")]
    node_id: Option<String>,
    /// Largest message accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = tether_wire::DEFAULT_MAX_MESSAGE_SIZE)]
    max_message_size: usize,
    /// Guards against hostile clients: session binding, login throttles, detached-session
    /// caps, store timeout (boxed: the command enum stays small).
    #[command(flatten)]
    guards: Box<crate::guard_args::GuardFlags>,
    /// Operating flags: configuration file, logs, admin endpoint, drain (boxed: the command
    /// enum stays small).
    #[command(flatten)]
    pub(crate) ops: Box<OpsArgs>,
}

/// `tether serve`'s operating flags (see docs/operating.md).
#[derive(Args, Debug, Clone)]
pub(crate) struct OpsArgs {
    /// Read flags from this TOML file first: each key is a flag's long name (kebab or snake
    /// case), an array repeats a flag, `true` sets a switch. Flags on the command line win.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective configuration (the file merged with the flags, defaults included)
    /// as TOML and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Log line format on stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax (e.g. `info,tether=debug`). Default: `RUST_LOG`, else
    /// `info`.
    #[arg(long, value_name = "FILTER")]
    pub(crate) log: Option<String>,
    /// Serve `/metrics`, `/health`, `/ready` and a live admin page over HTTP on this address.
    /// Off by default; `--admin` alone listens on 127.0.0.1:9090. An address that is not
    /// loopback needs --admin-token.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9090")]
    pub(crate) admin: Option<String>,
    /// Require this token on the admin endpoint (`Authorization: Bearer TOKEN` or
    /// `?token=TOKEN`), except on `/health`.
    #[arg(long, value_name = "TOKEN", requires = "admin")]
    pub(crate) admin_token: Option<String>,
    /// On SIGTERM or Ctrl-C: how long closing connections and saving their sessions may take
    /// (milliseconds) before the process exits anyway.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub(crate) drain_timeout: u64,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let args = crate::config::resolve(&args)?;
    if args.ops.print_config {
        print!("{}", crate::config::print(&args)?);
        return Ok(());
    }
    if let (Some(addr), None) = (&args.ops.admin, &args.ops.admin_token) {
        let loopback = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or_else(|_| addr.starts_with("localhost:"));
        if !loopback {
            return Err(Failure::Usage(format!(
                "--admin {addr}: not a loopback address; add --admin-token"
            )));
        }
    }
    // The recorder goes in before anything counts, so the figures start at the process start.
    let recorder = match &args.ops.admin {
        Some(_) => Some(
            crate::admin::install_recorder()
                .map_err(|e| Failure::Usage(format!("--admin: {e}")))?,
        ),
        None => None,
    };
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

    let mut listener = ListenerOptions::default()
        .with_max_message_size(args.max_message_size)
        .with_handshake_timeout(Duration::from_millis(args.handshake_timeout));
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
    let store = match recorder {
        Some(_) => tether::metrics::MeteredStore::wrap(store),
        None => store,
    };
    let admin_store = store.clone();
    let chat = ChatHub::new();
    let mut builder = Server::builder()
        .application(test_app(chat.clone()))
        .session_store(store)
        .client_expiration_time(Duration::from_millis(args.client_expiration))
        .handshake_timeout(Duration::from_millis(args.handshake_timeout))
        .session_binding(args.guards.session_binding)
        .login_throttle_per_source(args.guards.login_throttle_source.0)
        .login_throttle_per_user(args.guards.login_throttle_user.0)
        .detached_session_limits(args.guards.max_detached, args.guards.max_detached_bytes)
        .store_timeout(Duration::from_millis(args.guards.store_timeout))
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
    if let Some(url) = &args.cluster {
        let mut options = tether::cluster::ClusterOptions::builder(url.as_str());
        if let Some(id) = &args.node_id {
            options = options.node_id(id.as_str());
        }
        let usage =
            |e: tether::cluster::ClusterError| Failure::Usage(format!("--cluster {url}: {e}"));
        let cluster = tether::cluster::Cluster::join(options.build().map_err(usage)?)
            .await
            .map_err(usage)?;
        builder = builder.cluster(cluster);
    }
    let server = builder.build()?;
    chat.bind(&server);

    let causes = Causes::default();
    let mut log_events = server.events();
    let log_causes = causes.clone();
    tokio::spawn(async move {
        let causes = log_causes;
        loop {
            match log_events.recv().await {
                Ok(event) => log_server_event(&event, &causes),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "log fell behind the server's events")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });

    let stop = StopSignals::install()
        .map_err(|e| Failure::Runtime(Error::Transport(tether::TransportError::Io(e))))?;
    let mut ready = serde_json::Map::new();
    ready.insert("ready".into(), json!(true));
    let admin = match (&args.ops.admin, recorder) {
        (Some(addr), Some(handle)) => {
            let (admin, bound) = Admin::start(
                addr,
                args.ops.admin_token.clone(),
                handle,
                server.clone(),
                admin_store,
            )
            .await
            .map_err(|e| Failure::Usage(format!("--admin {addr}: {e}")))?;
            tracing::info!(%bound, "admin listening");
            ready.insert("admin".into(), json!(bound));
            Some(admin)
        }
        _ => None,
    };
    if !args.conductor.is_empty() {
        let tokens: Vec<Vec<u8>> = args
            .conductor_token
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect();
        let origins = args.conductor_origin.clone();
        let conductor = tether::example::conductor_server_with(&chat, |mut builder| {
            if !tokens.is_empty() {
                builder = builder.tokens(tokens);
            }
            if !origins.is_empty() {
                builder = builder.allowed_origins(origins);
            }
            builder
        });
        // The same handshake deadline as every other listener (--handshake-timeout).
        let listener_floor = tether::transport::ListenOptions::builder()
            .handshake_timeout(Duration::from_millis(args.handshake_timeout))
            .build();
        if let Some(admin) = &admin {
            admin.conductor(&conductor);
        }
        for addr in &args.conductor {
            let bound = conductor
                .listen_with(addr, &listener_floor)
                .await
                .map_err(|e| Failure::Usage(format!("--conductor {addr}: {e}")))?;
            tracing::info!(%bound, "conductor listening");
            if let Some(admin) = &admin {
                admin.listener("conductor", &bound);
            }
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
        if let Some(admin) = &admin {
            admin.listener(kind, &addr);
        }
        ready
            .entry(kind)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .expect("listener entries are arrays")
            .push(json!(addr));
    }
    if let Some(admin) = &admin {
        admin.set_ready(true);
    }
    println!("{}", serde_json::Value::Object(ready));

    stop.wait().await;
    let limit = Duration::from_millis(args.ops.drain_timeout);
    let deadline = tokio::time::Instant::now() + limit;
    drain(&server, admin.as_ref(), limit).await;
    // The closing lines of the connections the drain closed, within the same deadline.
    let _ = tokio::time::timeout_at(deadline, causes.written()).await;
    Ok(())
}

/// Graceful stop: `/ready` turns 503 first (a balancer stops sending), the listeners stop
/// accepting, every connection is closed, which saves its session to the store (a JSTP
/// client whose transport closes reconnects and restores it, on this address once a new
/// process listens there or on another node sharing the store), all within `limit`.
async fn drain(server: &Server, admin: Option<&Admin>, limit: Duration) {
    if let Some(admin) = admin {
        admin.set_ready(false);
    }
    let clients = server.clients().len();
    tracing::info!(clients, limit_ms = limit.as_millis() as u64, "draining");
    let deadline = tokio::time::Instant::now() + limit;
    match tokio::time::timeout_at(deadline, server.shutdown()).await {
        Ok(()) => tracing::info!("drained: every session saved"),
        Err(_) => tracing::warn!(
            limit_ms = limit.as_millis() as u64,
            "drain took too long; exiting with connections still open"
        ),
    }
    if let Some(admin) = admin {
        // Within the same deadline; the admin's own event streams end at once on shutdown.
        let _ = tokio::time::timeout_at(deadline, admin.shutdown()).await;
    }
}

/// The latest error of each connection, for its closing line, and how many closing lines are
/// still to be written (a drain waits for them, so a stopping node logs every close). At most
/// [`Causes::MAX`] causes are kept: past that, closing lines say `cause="orderly"`.
#[derive(Clone, Default)]
struct Causes {
    map: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>,
    watching: tokio::sync::watch::Sender<usize>,
}

impl Causes {
    const MAX: usize = 4096;

    fn set(&self, id: u64, cause: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() < Self::MAX || map.contains_key(&id) {
            map.insert(id, cause.to_owned());
        }
    }

    fn take(&self, id: u64) -> String {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // No error reported: the connection was closed on purpose (by the client or a drain).
        map.remove(&id).unwrap_or_else(|| "orderly".into())
    }

    /// Until every closing line is written.
    async fn written(&self) {
        let _ = self.watching.subscribe().wait_for(|n| *n == 0).await;
    }
}

/// One info line per connection lifecycle event (accepted, handshake, detached, restored,
/// closed with its cause); handshake requests and calls stay below info.
fn log_server_event(event: &ServerEvent, causes: &Causes) {
    match event {
        ServerEvent::HandshakeRequest {
            connection,
            app,
            strategy,
        } => {
            tracing::info!(
                id = connection.id(),
                remote = %connection.remote_addr().unwrap_or_default(),
                transport = ?connection.transport_info().map(|i| i.kind).unwrap_or(tether::TransportKind::Tcp),
                %app,
                %strategy,
                event = "accepted",
                "connection accepted"
            );
            // The closing line, whatever ends it.
            let c = connection.clone();
            let causes = causes.clone();
            causes.watching.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                c.closed().await;
                let cause = causes.take(c.id());
                tracing::info!(
                    id = c.id(),
                    session = %c.session_tag().unwrap_or_default(),
                    %cause,
                    event = "closed",
                    "connection closed"
                );
                causes.watching.send_modify(|n| *n -= 1);
            });
        }
        ServerEvent::Connect(c) => tracing::info!(
            id = c.id(),
            remote = %c.remote_addr().unwrap_or_default(),
            user = %c.username().unwrap_or_default(),
            session = %c.session_tag().unwrap_or_default(),
            event = "handshake",
            "client connected"
        ),
        ServerEvent::Disconnect(c) => {
            tracing::info!(
                id = c.id(),
                session = %c.session_tag().unwrap_or_default(),
                event = "detached",
                "client disconnected"
            )
        }
        ServerEvent::Reconnect(c) => tracing::info!(
            id = c.id(),
            remote = %c.remote_addr().unwrap_or_default(),
            session = %c.session_tag().unwrap_or_default(),
            event = "restored",
            "client restored its session"
        ),
        ServerEvent::RestoreSession(_) => {}
        ServerEvent::HandshakeTimeout(c) => {
            tracing::warn!(id = c.id(), remote = %c.remote_addr().unwrap_or_default(), "handshake timeout")
        }
        ServerEvent::ConnectionError { connection, error } => {
            if let Some(c) = connection {
                causes.set(c.id(), error);
            }
            tracing::warn!(
                id = ?connection.as_ref().map(|c| c.id()),
                %error,
                "connection error"
            )
        }
        #[allow(unreachable_patterns)]
        _ => {}
    }
}
