//! TLS configuration (rustls with the `ring` provider).
//!
//! The provider is always passed explicitly ([`rustls::crypto::ring::default_provider`]); the
//! process-wide default provider is neither required nor installed.
//!
//! Clients need an explicit trust decision: a CA certificate file
//! ([`TlsClientOptions::ca_pem`]), a prebuilt [`rustls::ClientConfig`]
//! ([`TlsClientOptions::config`], e.g. one using the `webpki-roots` or platform verifier crates),
//! or [`TlsClientOptions::insecure`]. There are no built-in web PKI roots.

use super::TransportError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a client trusts TLS servers (`jstps://`, `wss://`).
///
/// Precedence: [`config`](Self::config), then [`insecure`](Self::insecure), then
/// [`ca_pem`](Self::ca_pem). With none of them set, TLS connections fail with
/// [`TransportError::Tls`].
#[derive(Clone, Default)]
pub struct TlsClientOptions {
    /// PEM file with the CA certificate(s) to trust (a self-signed server certificate works as
    /// its own CA).
    pub ca_pem: Option<PathBuf>,
    /// Accept any server certificate, unchecked (tests, CLI `--insecure`). Handshake
    /// signatures are still verified, but anyone can impersonate the server.
    pub insecure: bool,
    /// The name checked against the certificate instead of the endpoint's host (also sent as
    /// SNI when it is a DNS name).
    pub server_name: Option<String>,
    /// A ready-made rustls configuration, used as is when set.
    pub config: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for TlsClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClientOptions")
            .field("ca_pem", &self.ca_pem)
            .field("insecure", &self.insecure)
            .field("server_name", &self.server_name)
            .field("config", &self.config.as_ref().map(|_| "ClientConfig"))
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: impl fmt::Display) -> TransportError {
    TransportError::Tls(what.to_string())
}

fn open(path: &Path, what: &str) -> Result<BufReader<std::fs::File>, TransportError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|e| tls_err(format!("cannot read {what} file {}: {e}", path.display())))
}

/// Reads every certificate from a PEM file. Fails if the file holds none.
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let path = path.as_ref();
    let certs = rustls_pemfile::certs(&mut open(path, "certificate")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_err(format!(
            "no certificate found in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_private_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, TransportError> {
    let path = path.as_ref();
    rustls_pemfile::private_key(&mut open(path, "private key")?)
        .map_err(|e| tls_err(format!("bad PEM in {}: {e}", path.display())))?
        .ok_or_else(|| tls_err(format!("no private key found in {}", path.display())))
}

/// A server configuration from a certificate chain and its key, in DER. No client
/// authentication, no ALPN (as upstream).
pub fn server_config_from_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(format!("certificate and key do not fit: {e}")))?;
    Ok(Arc::new(config))
}

/// A server configuration from PEM files: the certificate chain (leaf first) and its key.
pub fn server_config(
    cert_pem: impl AsRef<Path>,
    key_pem: impl AsRef<Path>,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    server_config_from_der(load_certs(cert_pem)?, load_private_key(key_pem)?)
}

/// The client configuration described by `options` (see [`TlsClientOptions`] for the
/// precedence).
pub fn client_config(
    options: &TlsClientOptions,
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    if let Some(config) = &options.config {
        return Ok(config.clone());
    }
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?;
    let config = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    } else if let Some(ca) = &options.ca_pem {
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| tls_err(format!("bad CA certificate in {}: {e}", ca.display())))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        return Err(tls_err(
            "no trust anchors configured: set a CA certificate (ca_pem), a rustls ClientConfig, \
             or insecure",
        ));
    };
    Ok(Arc::new(config))
}

/// The server name to verify: the override or the endpoint host.
pub(crate) fn server_name(
    options: &TlsClientOptions,
    host: &str,
) -> Result<ServerName<'static>, TransportError> {
    let name = options.server_name.as_deref().unwrap_or(host);
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    ServerName::try_from(name.to_owned())
        .map_err(|e| tls_err(format!("invalid TLS server name {name:?}: {e}")))
}

/// Accepts any certificate but still checks handshake signatures.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_errors() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        assert_eq!(load_certs(&cert).unwrap().len(), 1);
        load_private_key(&key).unwrap();
        server_config(&cert, &key).unwrap();
        client_config(&TlsClientOptions {
            ca_pem: Some(cert.clone()),
            ..Default::default()
        })
        .unwrap();
        client_config(&TlsClientOptions {
            insecure: true,
            ..Default::default()
        })
        .unwrap();

        let msg = |e: TransportError| e.to_string();
        assert!(msg(load_certs(&key).unwrap_err()).contains("no certificate"));
        assert!(msg(load_private_key(&cert).unwrap_err()).contains("no private key"));
        assert!(msg(load_certs(dir.path().join("nope")).unwrap_err()).contains("cannot read"));
        assert!(
            msg(client_config(&TlsClientOptions::default()).unwrap_err())
                .contains("no trust anchors")
        );
    }

    #[test]
    fn server_names() {
        let o = TlsClientOptions::default();
        assert!(matches!(
            server_name(&o, "127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name(&o, "::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name(&o, "example.com").unwrap(),
            ServerName::DnsName(_)
        ));
        let o = TlsClientOptions {
            server_name: Some("localhost".into()),
            ..Default::default()
        };
        assert!(matches!(
            server_name(&o, "127.0.0.1").unwrap(),
            ServerName::DnsName(_)
        ));
    }
}
