//! Client side: open a transport to an [`Endpoint`].

use super::nul::nul_transport;
use super::tls::{client_config, server_name, TlsClientOptions};
use super::ws::{connect_ws, ws_config, ws_transport, DEFAULT_FRAGMENT_SIZE};
use super::{Endpoint, Transport, TransportError, TransportInfo, TransportKind};
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};

/// Settings for [`connect`].
#[derive(Debug, Clone)]
pub struct ClientTransportConfig {
    /// Largest incoming message in bytes. Default [`tether_wire::DEFAULT_MAX_MESSAGE_SIZE`]
    /// (8 MiB).
    pub max_message_size: usize,
    /// TLS trust for `jstps://` and `wss://` (no default roots: set a CA file or `insecure`).
    pub tls: TlsClientOptions,
    /// Limit for the whole connection setup: TCP connect, TLS and WebSocket handshakes.
    /// Default 10 s.
    pub connect_timeout: Duration,
    /// WebSocket messages longer than this go out as fragments of at most this many bytes.
    /// Default 16 KiB; clamped below 1 MiB.
    pub ws_fragment_size: usize,
}

impl Default for ClientTransportConfig {
    fn default() -> Self {
        ClientTransportConfig {
            max_message_size: tether_wire::DEFAULT_MAX_MESSAGE_SIZE,
            tls: TlsClientOptions::default(),
            connect_timeout: Duration::from_secs(10),
            ws_fragment_size: DEFAULT_FRAGMENT_SIZE,
        }
    }
}

/// Opens a transport to `endpoint`: TCP (with `TCP_NODELAY`), then TLS and/or the WebSocket
/// handshake (subprotocol `metarhia-jstp`, required from the server) as the endpoint needs.
/// Fails with [`TransportError::Timeout`] if that takes longer than
/// [`ClientTransportConfig::connect_timeout`].
pub async fn connect(
    endpoint: &Endpoint,
    config: &ClientTransportConfig,
) -> Result<Transport, TransportError> {
    tokio::time::timeout(config.connect_timeout, connect_inner(endpoint, config))
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::Timeout(format!(
                "connecting to {endpoint} took longer than {:?}",
                config.connect_timeout
            )))
        })
}

async fn tcp(endpoint: &Endpoint) -> Result<(TcpStream, TransportInfo, String), TransportError> {
    let (host, port) = endpoint
        .host_port()
        .ok_or_else(|| TransportError::InvalidAddress(format!("{endpoint}: no host")))?;
    let stream = TcpStream::connect((host.as_str(), port)).await?;
    stream.set_nodelay(true)?;
    let info = TransportInfo {
        kind: endpoint.kind(),
        local_addr: Some(stream.local_addr()?.to_string()),
        remote_addr: Some(stream.peer_addr()?.to_string()),
    };
    Ok((stream, info, host))
}

/// The TLS connector for an endpoint, built before any network activity so that a
/// configuration error never opens a connection.
fn tls_connector(options: &TlsClientOptions) -> Result<tokio_rustls::TlsConnector, TransportError> {
    Ok(tokio_rustls::TlsConnector::from(client_config(options)?))
}

async fn tls(
    connector: tokio_rustls::TlsConnector,
    stream: TcpStream,
    host: &str,
    options: &TlsClientOptions,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TransportError> {
    let name = server_name(options, host)?;
    connector
        .connect(name, stream)
        .await
        .map_err(|e| TransportError::Tls(format!("handshake with {host} failed: {e}")))
}

async fn connect_inner(
    endpoint: &Endpoint,
    config: &ClientTransportConfig,
) -> Result<Transport, TransportError> {
    let max = config.max_message_size;
    let ws = || ws_config(max, config.ws_fragment_size);
    match endpoint {
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(path).await?;
            let info = TransportInfo {
                kind: TransportKind::Unix,
                local_addr: None,
                remote_addr: Some(path.display().to_string()),
            };
            let (r, w) = stream.into_split();
            Ok(nul_transport(r, w, max, info))
        }
        Endpoint::Tcp { .. } => {
            let (stream, info, _) = tcp(endpoint).await?;
            let (r, w) = stream.into_split();
            Ok(nul_transport(r, w, max, info))
        }
        Endpoint::Tls { .. } => {
            let connector = tls_connector(&config.tls)?;
            let (stream, info, host) = tcp(endpoint).await?;
            let (r, w) = tokio::io::split(tls(connector, stream, &host, &config.tls).await?);
            Ok(nul_transport(r, w, max, info))
        }
        Endpoint::Ws(url) => {
            let (stream, info, _) = tcp(endpoint).await?;
            let ws = connect_ws(url, stream, ws()).await?;
            Ok(ws_transport(ws, config.ws_fragment_size, info))
        }
        Endpoint::Wss(url) => {
            let connector = tls_connector(&config.tls)?;
            let (stream, info, host) = tcp(endpoint).await?;
            let stream = tls(connector, stream, &host, &config.tls).await?;
            let ws = connect_ws(url, stream, ws()).await?;
            Ok(ws_transport(ws, config.ws_fragment_size, info))
        }
    }
}
