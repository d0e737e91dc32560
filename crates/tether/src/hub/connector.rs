//! How the hub dials ([`Connector`], by default [`JstpConnector`]) and which connections it
//! admits ([`Policy`]: limits, one entry per key).

use super::{Entry, HubError, MultiAddress, PeerKey};
use crate::client::{connect_endpoint, ClientOptions};
use crate::connection::Connection;
use futures::future::BoxFuture;

/// How the hub dials and hangs up.
pub trait Connector: Send + Sync + 'static {
    /// Dials `address`; with `resume` the connection should restore its session after a
    /// dropped link rather than close ([`Schedule::resume`](super::Schedule::resume)).
    fn connect(
        &self,
        address: MultiAddress,
        resume: bool,
    ) -> BoxFuture<'static, Result<Connection, HubError>>;
    /// The layers after the transport this connector verifies, or that promise nothing. An
    /// address with any other layer on a transport tether dials is refused before dialling
    /// ([`AddressError::UnverifiedLayer`](super::AddressError::UnverifiedLayer)). The default,
    /// and [`JstpConnector`]'s, is `["noauth"]`: tether has no secret-handshake, so `~shs:KEY`
    /// is refused rather than ignored.
    fn verified_layers(&self) -> &[&str] {
        &["noauth"]
    }

    /// Hangs up. The default closes the connection.
    fn disconnect(&self, connection: Connection) -> BoxFuture<'static, Result<(), HubError>> {
        Box::pin(async move {
            connection.close().await;
            Ok(())
        })
    }
}

/// Dials the first alternative tether has a transport for, with the JSTP client and a fixed
/// application. A connection asked to resume uses the options' reconnector; one not asked to
/// never reconnects.
#[derive(Clone)]
pub struct JstpConnector {
    app: String,
    options: ClientOptions,
}

impl JstpConnector {
    /// Connects to application `app` (`name` or `name@range`) with `options`.
    pub fn new(app: impl Into<String>, options: ClientOptions) -> Self {
        JstpConnector {
            app: app.into(),
            options,
        }
    }
}

impl Connector for JstpConnector {
    fn connect(
        &self,
        address: MultiAddress,
        resume: bool,
    ) -> BoxFuture<'static, Result<Connection, HubError>> {
        let app = self.app.clone();
        let mut options = self.options.clone();
        if !resume {
            options = options.no_reconnect();
        }
        Box::pin(async move {
            let endpoint = address
                .endpoint()
                .ok_or_else(|| HubError::Undialable(address.to_string()))?;
            Ok(connect_endpoint(&endpoint, &app, options).await?)
        })
    }
}

/// Decides whether a new connection may be made: limits and key-level dedupe.
pub trait Policy: Send + Sync + 'static {
    /// `Err(reason)` refuses a connection to `address` (with `key`) given the current entries.
    fn admit(
        &self,
        address: &str,
        key: Option<&PeerKey>,
        entries: &[(String, Entry)],
    ) -> Result<(), String>;
}

/// At most this many entries (connecting, connected or disconnecting).
#[derive(Debug, Clone, Copy)]
pub struct MaxConnections(pub usize);

impl Policy for MaxConnections {
    fn admit(
        &self,
        _: &str,
        _: Option<&PeerKey>,
        entries: &[(String, Entry)],
    ) -> Result<(), String> {
        if entries.len() >= self.0 {
            Err(format!("at most {} connections", self.0))
        } else {
            Ok(())
        }
    }
}

/// One entry per peer key: a second address of an already known key is refused.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnePerKey;

impl Policy for OnePerKey {
    fn admit(
        &self,
        _: &str,
        key: Option<&PeerKey>,
        entries: &[(String, Entry)],
    ) -> Result<(), String> {
        match key {
            Some(k) if entries.iter().any(|(_, e)| e.key.as_ref() == Some(k)) => {
                Err(format!("{k} is already in the hub"))
            }
            _ => Ok(()),
        }
    }
}
