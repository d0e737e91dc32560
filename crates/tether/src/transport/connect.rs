//! Client side: open a transport to an [`Endpoint`].

use super::listener::nul_over;
use super::stream::{dial, DialOptions, FloorError, StreamEndpoint};
use super::tls::TlsClientOptions;
use super::ws::{connect_ws, ws_config, ws_transport, DEFAULT_FRAGMENT_SIZE};
use super::{Endpoint, Transport, TransportError, TransportInfo, TransportKind};
use std::time::Duration;

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

async fn connect_inner(
    endpoint: &Endpoint,
    config: &ClientTransportConfig,
) -> Result<Transport, TransportError> {
    let max = config.max_message_size;
    let kind = endpoint.kind();
    let secure = matches!(kind, TransportKind::Tls | TransportKind::Wss);
    let mut dial_options = DialOptions::builder().connect_timeout(config.connect_timeout);
    if secure {
        dial_options = dial_options.tls(config.tls.clone());
    }
    let target = StreamEndpoint::from(endpoint);
    let stream = dial(&target, &dial_options.build())
        .await
        .map_err(|e| match (e, &target) {
            // Name the host, as this error always has (the CLI prints it).
            (FloorError::TlsHandshake(e), StreamEndpoint::Tcp { host, .. }) => {
                TransportError::Tls(format!("handshake with {host} failed: {e}"))
            }
            (e, _) => e.into(),
        })?;
    let peer = stream.peer().clone();
    let info = TransportInfo {
        kind,
        local_addr: peer.local_addr,
        remote_addr: peer.remote_addr,
    };
    match endpoint {
        Endpoint::Ws(url) | Endpoint::Wss(url) => {
            let ws = connect_ws(url, stream, ws_config(max, config.ws_fragment_size)).await?;
            Ok(ws_transport(ws, config.ws_fragment_size, info))
        }
        _ => Ok(nul_over(stream, max, info)),
    }
}
