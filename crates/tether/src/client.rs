//! Connecting to a JSTP server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether::Error> {
//! use tether::{connect_and_inspect, ClientOptions, Value};
//!
//! let options = ClientOptions::default().login("user", "secret");
//! let (conn, proxies) =
//!     connect_and_inspect("ws://127.0.0.1:8080", "testApp@^1.0.0", &["calculator"], options)
//!         .await?;
//! let answer = proxies["calculator"].call("answer", vec![]).await?;
//! assert_eq!(answer, vec![Value::from(42)]);
//! # drop(conn); Ok(()) }
//! ```

use crate::app::{Application, NpmRange};
use crate::connection::{
    self, ClientHandshake, ClientReconnect, Connection, ConnectionConfig, RemoteProxy,
};
use crate::error::Error;
use crate::reconnect::{Backoff, Reconnector};
use crate::transport::{self, ClientTransportConfig, Endpoint, Transport};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_wire::{Auth, Value};

/// How a client connects.
#[derive(Clone)]
pub struct ClientOptions {
    /// The handshake strategy. Default anonymous.
    pub auth: Auth,
    /// The API this client offers to the server. Default `jstp@1.0.0` with no interfaces.
    pub application: Application,
    /// Connection settings (call timeout 15 s, heartbeat off, queue sizes).
    pub connection: ConnectionConfig,
    /// Transport settings (TLS trust, message size limit, connect timeout).
    pub transport: ClientTransportConfig,
    /// How long to wait for the handshake response (and for a reconnect to connect and
    /// restore). Default 15 s.
    pub handshake_timeout: Duration,
    /// When and where to reconnect after the transport drops; `None` never reconnects.
    /// Default [`Backoff::default`] (1 s doubling to 32 s, plus up to 1 s of jitter), used only
    /// after a first successful handshake and never after [`Connection::close`]. Connections
    /// made with [`connect_transport`] have no endpoint to reconnect to and never do.
    pub reconnector: Option<Arc<dyn Reconnector>>,
    /// When the server no longer knows the session (it answers `[11]` to the restore), start a
    /// new session instead of retrying the old one. Pending requests of the old session then
    /// fail with [`Error::CallbackLost`]. Default `false`: retry, as upstream.
    pub fallback_to_new_session: bool,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("auth", &self.auth.strategy())
            .field("application", &self.application)
            .field("connection", &self.connection)
            .field("transport", &self.transport)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("reconnects", &self.reconnector.is_some())
            .field("fallback_to_new_session", &self.fallback_to_new_session)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            auth: Auth::Anonymous,
            application: Application::client_default(),
            connection: ConnectionConfig::default(),
            transport: ClientTransportConfig::default(),
            handshake_timeout: Duration::from_secs(15),
            reconnector: Some(Arc::new(Backoff::default())),
            fallback_to_new_session: false,
        }
    }
}

impl ClientOptions {
    /// Uses the `login` strategy.
    pub fn login(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::Login {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// Uses a custom strategy.
    pub fn strategy(mut self, strategy: impl Into<String>, credentials: Value) -> Self {
        self.auth = Auth::Custom {
            strategy: strategy.into(),
            credentials,
        };
        self
    }

    /// Offers `app` to the server.
    pub fn application(mut self, app: Application) -> Self {
        self.application = app;
        self
    }

    /// Sets the default call timeout.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.connection.call_timeout = timeout;
        self
    }

    /// Pings the server this often.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.connection.heartbeat_interval = Some(interval);
        self
    }

    /// Reconnects with `reconnector` after the transport drops.
    pub fn reconnector(mut self, reconnector: impl Reconnector) -> Self {
        self.reconnector = Some(Arc::new(reconnector));
        self
    }

    /// Never reconnects: the connection closes with its transport.
    pub fn no_reconnect(mut self) -> Self {
        self.reconnector = None;
        self
    }

    /// Starts a new session when the server no longer knows ours.
    pub fn fallback_to_new_session(mut self, fallback: bool) -> Self {
        self.fallback_to_new_session = fallback;
        self
    }

    /// Trusts any server certificate (tests, self-signed development servers).
    pub fn insecure(mut self) -> Self {
        self.transport.tls.insecure = true;
        self
    }
}

/// Splits `name@range` at the last `@` and checks the range, as upstream's client does.
pub fn parse_app_spec(spec: &str) -> Result<(String, Option<String>), Error> {
    let (name, version) = match spec.rsplit_once('@') {
        Some((name, range)) => (name, Some(range)),
        None => (spec, None),
    };
    if name.is_empty() {
        return Err(Error::InvalidArgument("empty application name".into()));
    }
    if let Some(range) = version {
        if NpmRange::parse(range).is_none() && semver::Version::parse(range).is_err() {
            return Err(Error::InvalidVersion(range.to_owned()));
        }
    }
    Ok((name.to_owned(), version.map(str::to_owned)))
}

/// Connects to `url` (`jstp://`, `jstps://`, `ws://`, `wss://`, `unix:`) and performs the
/// handshake for `app` (`name` or `name@range`).
pub async fn connect(url: &str, app: &str, options: ClientOptions) -> Result<Connection, Error> {
    let endpoint: Endpoint = url.parse()?;
    connect_endpoint(&endpoint, app, options).await
}

/// Like [`connect`] with a parsed endpoint.
pub async fn connect_endpoint(
    endpoint: &Endpoint,
    app: &str,
    options: ClientOptions,
) -> Result<Connection, Error> {
    parse_app_spec(app)?;
    let transport = transport::connect(endpoint, &options.transport).await?;
    let reconnect = options
        .reconnector
        .clone()
        .map(|reconnector| ClientReconnect {
            endpoint: endpoint.clone(),
            transport: options.transport.clone(),
            reconnector,
            fallback_to_new_session: options.fallback_to_new_session,
            handshake_timeout: options.handshake_timeout,
        });
    start(transport, app, options, reconnect).await
}

/// Performs the client handshake over an already established transport (custom transports,
/// [`crate::memory::pair`]).
pub async fn connect_transport(
    transport: Transport,
    app: &str,
    options: ClientOptions,
) -> Result<Connection, Error> {
    start(transport, app, options, None).await
}

async fn start(
    transport: Transport,
    app: &str,
    options: ClientOptions,
    reconnect: Option<ClientReconnect>,
) -> Result<Connection, Error> {
    let (name, version) = parse_app_spec(app)?;
    connection::start_client(
        transport,
        options.connection,
        ClientHandshake {
            app: name,
            version,
            auth: options.auth,
            local_app: Arc::new(options.application),
        },
        options.handshake_timeout,
        reconnect,
    )
    .await
}

/// Connects, then inspects each interface in `interfaces` concurrently. On the first inspect
/// error the connection is closed and the error returned.
pub async fn connect_and_inspect(
    url: &str,
    app: &str,
    interfaces: &[&str],
    options: ClientOptions,
) -> Result<(Connection, HashMap<String, RemoteProxy>), Error> {
    let conn = connect(url, app, options).await?;
    let results = futures::future::join_all(interfaces.iter().map(|i| conn.inspect(i))).await;
    let mut proxies = HashMap::new();
    for (name, result) in interfaces.iter().zip(results) {
        match result {
            Ok(p) => {
                proxies.insert((*name).to_owned(), p);
            }
            Err(e) => {
                conn.close().await;
                return Err(e);
            }
        }
    }
    Ok((conn, proxies))
}
