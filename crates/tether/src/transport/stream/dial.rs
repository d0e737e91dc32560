//! Dialing: TCP or Unix, then TLS, within one deadline.

use super::*;

/// Settings for [`dial`]; build with [`DialOptions::builder`]. Defaults: 10 s connect timeout,
/// no TLS, no ALPN.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DialOptions {
    /// Limit for TCP/Unix connect and TLS handshake together. Default 10 s.
    pub connect_timeout: Duration,
    /// TLS trust and server name; `None` for a plain stream.
    pub tls: Option<TlsClientOptions>,
    /// ALPN protocols offered in TLS, most preferred first. Default none.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for DialOptions {
    fn default() -> Self {
        DialOptions {
            connect_timeout: Duration::from_secs(10),
            tls: None,
            alpn: Vec::new(),
        }
    }
}

impl DialOptions {
    /// Starts from the defaults.
    pub fn builder() -> DialOptionsBuilder {
        DialOptionsBuilder(DialOptions::default())
    }
}

/// Builds [`DialOptions`].
#[derive(Debug, Clone, Default)]
pub struct DialOptionsBuilder(DialOptions);

impl DialOptionsBuilder {
    /// Sets [`DialOptions::connect_timeout`].
    pub fn connect_timeout(mut self, after: Duration) -> Self {
        self.0.connect_timeout = after;
        self
    }
    /// Dials TLS with these trust settings (and [`TlsClientOptions::server_name`]).
    pub fn tls(mut self, tls: TlsClientOptions) -> Self {
        self.0.tls = Some(tls);
        self
    }
    /// Sets [`DialOptions::alpn`].
    pub fn alpn(mut self, protocols: impl IntoIterator<Item = impl Into<Vec<u8>>>) -> Self {
        self.0.alpn = protocols.into_iter().map(Into::into).collect();
        self
    }
    /// The options.
    pub fn build(self) -> DialOptions {
        self.0
    }
}

/// Opens a byte stream to `endpoint`: TCP (with `TCP_NODELAY`) or Unix, then TLS when
/// [`DialOptions::tls`] is set, verifying [`TlsClientOptions::server_name`] if given, else the
/// endpoint's host. The TLS configuration is checked before any connection is opened. Fails
/// with [`FloorError::Timeout`] after [`DialOptions::connect_timeout`].
pub async fn dial(
    endpoint: &StreamEndpoint,
    options: &DialOptions,
) -> Result<ByteStream, FloorError> {
    let tls = match &options.tls {
        None => None,
        Some(tls) => {
            let host = match endpoint {
                StreamEndpoint::Tcp { host, .. } => host.as_str(),
                // A Unix socket has no host: the name must be given.
                StreamEndpoint::Unix(_) => tls.server_name.as_deref().unwrap_or("localhost"),
            };
            let name = server_name(tls, host).map_err(|e| FloorError::TlsConfig(Box::new(e)))?;
            let mut config = client_config(tls).map_err(|e| FloorError::TlsConfig(Box::new(e)))?;
            if !options.alpn.is_empty() {
                let mut c = (*config).clone();
                c.alpn_protocols = options.alpn.clone();
                config = Arc::new(c);
            }
            Some((tokio_rustls::TlsConnector::from(config), name))
        }
    };
    let after = options.connect_timeout;
    tokio::time::timeout(after, async move {
        let (plain, mut peer) = match endpoint {
            StreamEndpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(FloorError::io("connect"))?;
                let _ = s.set_nodelay(true);
                let remote = s.peer_addr().map_err(FloorError::io("connect"))?;
                let peer = PeerInfo {
                    local_addr: s.local_addr().ok().map(|a| a.to_string()),
                    remote_addr: Some(remote.to_string()),
                    remote_ip: Some(canonical_ip(remote)),
                    ..PeerInfo::default()
                };
                (Plain::Tcp(s), peer)
            }
            StreamEndpoint::Unix(path) => {
                let s = UnixStream::connect(path)
                    .await
                    .map_err(FloorError::io("connect"))?;
                let peer = PeerInfo {
                    remote_addr: Some(path.display().to_string()),
                    ..PeerInfo::default()
                };
                (Plain::Unix(s), peer)
            }
        };
        let io = match tls {
            None => Io::Plain(plain),
            Some((connector, name)) => {
                let s = connector
                    .connect(name, plain)
                    .await
                    .map_err(FloorError::TlsHandshake)?;
                peer.tls = true;
                peer.alpn = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                Io::TlsClient(Box::new(s))
            }
        };
        Ok(ByteStream {
            io,
            peer,
            permit: None,
        })
    })
    .await
    .unwrap_or(Err(FloorError::Timeout {
        what: "connect",
        after,
    }))
}
