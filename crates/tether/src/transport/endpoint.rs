//! Endpoint addresses: `jstp://host:port`, `jstps://host:port`, `ws://…`, `wss://…`,
//! `unix:/path`.

use super::{TransportError, TransportKind};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a transport connects to, or what a listener binds.
///
/// | Text | Variant |
/// | --- | --- |
/// | `jstp://host:port`, `tcp://host:port` | [`Endpoint::Tcp`] |
/// | `jstps://host:port` | [`Endpoint::Tls`] |
/// | `unix:/path/to.sock`, `unix:///path/to.sock`, `unix:relative.sock` | [`Endpoint::Unix`] |
/// | `ws://host[:port]/path` | [`Endpoint::Ws`] |
/// | `wss://host[:port]/path` | [`Endpoint::Wss`] |
///
/// `jstp://` and `jstps://` take no path and need an explicit port (upstream defines no default
/// port); an IPv6 host is written in brackets (`jstp://[::1]:3000`). WebSocket URLs default to
/// port 80 and 443. Schemes are case-insensitive.
///
/// ```
/// use tether::transport::Endpoint;
/// let e: Endpoint = "jstp://127.0.0.1:3000".parse().unwrap();
/// assert_eq!(e, Endpoint::Tcp { host: "127.0.0.1".into(), port: 3000 });
/// assert_eq!(e.to_string(), "jstp://127.0.0.1:3000");
/// let u: Endpoint = "unix:///tmp/app.sock".parse().unwrap();
/// assert_eq!(u.to_string(), "unix:/tmp/app.sock");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Plain TCP with NUL framing.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
    },
    /// TLS over TCP with NUL framing.
    Tls {
        /// Host name or IP address (IPv6 without brackets); also the TLS server name unless
        /// overridden in [`super::TlsClientOptions::server_name`].
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A Unix domain socket with NUL framing.
    Unix(PathBuf),
    /// A WebSocket URL (`ws://…`), normalised.
    Ws(String),
    /// A secure WebSocket URL (`wss://…`), normalised.
    Wss(String),
}

impl Endpoint {
    /// The wire this endpoint uses.
    pub fn kind(&self) -> TransportKind {
        match self {
            Endpoint::Tcp { .. } => TransportKind::Tcp,
            Endpoint::Tls { .. } => TransportKind::Tls,
            Endpoint::Unix(_) => TransportKind::Unix,
            Endpoint::Ws(_) => TransportKind::Ws,
            Endpoint::Wss(_) => TransportKind::Wss,
        }
    }

    /// Host and port to connect to or bind (`None` for Unix sockets). For WebSocket URLs the
    /// scheme's default port applies when none is given; IPv6 hosts come without brackets.
    pub fn host_port(&self) -> Option<(String, u16)> {
        match self {
            Endpoint::Tcp { host, port } | Endpoint::Tls { host, port } => {
                Some((host.clone(), *port))
            }
            Endpoint::Unix(_) => None,
            Endpoint::Ws(url) | Endpoint::Wss(url) => {
                let url = url::Url::parse(url).ok()?;
                let host = match url.host()? {
                    url::Host::Domain(d) => d.to_owned(),
                    url::Host::Ipv4(ip) => ip.to_string(),
                    url::Host::Ipv6(ip) => ip.to_string(),
                };
                Some((host, url.port_or_known_default()?))
            }
        }
    }
}

fn invalid(input: &str, why: impl fmt::Display) -> TransportError {
    TransportError::InvalidAddress(format!("{input:?}: {why}"))
}

/// Parses `host:port` (IPv6 in brackets), allowing one trailing `/`.
fn parse_host_port(input: &str, rest: &str) -> Result<(String, u16), TransportError> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(bad) = rest.find(['/', '?', '#', '@']) {
        let c = &rest[bad..bad + 1];
        return Err(invalid(
            input,
            format!("unexpected {c:?}: expected host:port with no path, query or user info"),
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(input, "unclosed '[' in IPv6 host"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| invalid(input, format!("{ip:?} is not an IPv6 address")))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid(input, "missing port (jstp:// and jstps:// need host:port)"))?;
        (ip, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid(input, "missing port (jstp:// and jstps:// need host:port)"))?;
        if host.contains(':') {
            return Err(invalid(input, "an IPv6 host must be written in brackets"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid(input, "missing host"));
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | '\\'))
    {
        return Err(invalid(input, format!("invalid character {c:?} in host")));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid(input, format!("{port:?} is not a port number (0-65535)")))?;
    Ok((host.to_owned(), port))
}

fn parse_ws(input: &str, secure: bool) -> Result<String, TransportError> {
    let url = url::Url::parse(input).map_err(|e| invalid(input, e))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(input, "missing host"));
    }
    if url.fragment().is_some() {
        return Err(invalid(input, "a WebSocket URL cannot have a fragment"));
    }
    debug_assert_eq!(url.scheme(), if secure { "wss" } else { "ws" });
    Ok(url.into())
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = input.split_once(':').ok_or_else(|| {
            invalid(
                input,
                "missing scheme (expected jstp://, jstps://, tcp://, ws://, wss:// or unix:)",
            )
        })?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "unix" {
            let path = match rest.strip_prefix("//") {
                Some(p) if p.starts_with('/') => p,
                Some(_) => {
                    return Err(invalid(
                        input,
                        "unix:// must be followed by an absolute path (unix:///path/to.sock)",
                    ))
                }
                None => rest,
            };
            if path.is_empty() {
                return Err(invalid(input, "missing socket path"));
            }
            if path.contains('\0') {
                return Err(invalid(input, "socket path contains a NUL byte"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        const KNOWN: [&str; 5] = ["jstp", "tcp", "jstps", "ws", "wss"];
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            // `host:port` without a scheme.
            return Err(invalid(
                input,
                "missing scheme (expected jstp://, jstps://, tcp://, ws://, wss:// or unix:)",
            ));
        }
        if !KNOWN.contains(&scheme.as_str()) {
            return Err(invalid(
                input,
                format!(
                    "unknown scheme {scheme:?} (expected jstp://, jstps://, tcp://, ws://, wss:// \
                     or unix:)"
                ),
            ));
        }
        let after = rest
            .strip_prefix("//")
            .ok_or_else(|| invalid(input, format!("expected \"//\" after \"{scheme}:\"")))?;
        match scheme.as_str() {
            "jstp" | "tcp" => {
                let (host, port) = parse_host_port(input, after)?;
                Ok(Endpoint::Tcp { host, port })
            }
            "jstps" => {
                let (host, port) = parse_host_port(input, after)?;
                Ok(Endpoint::Tls { host, port })
            }
            "ws" => Ok(Endpoint::Ws(parse_ws(input, false)?)),
            _ => Ok(Endpoint::Wss(parse_ws(input, true)?)),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_port = |f: &mut fmt::Formatter<'_>, scheme: &str, host: &str, port: u16| {
            if host.contains(':') {
                write!(f, "{scheme}://[{host}]:{port}")
            } else {
                write!(f, "{scheme}://{host}:{port}")
            }
        };
        match self {
            Endpoint::Tcp { host, port } => host_port(f, "jstp", host, *port),
            Endpoint::Tls { host, port } => host_port(f, "jstps", host, *port),
            // A path starting with `//` needs the URL form, or `unix://…` would read it as one.
            Endpoint::Unix(path) if path.to_string_lossy().starts_with("//") => {
                write!(f, "unix://{}", path.display())
            }
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Ws(url) | Endpoint::Wss(url) => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Endpoint {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        match s.parse::<Endpoint>() {
            Err(TransportError::InvalidAddress(m)) => m,
            other => panic!("{s}: expected InvalidAddress, got {other:?}"),
        }
    }

    #[test]
    fn tcp_and_tls() {
        let tcp = |h: &str, p| Endpoint::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(ok("jstp://127.0.0.1:3000"), tcp("127.0.0.1", 3000));
        assert_eq!(ok("tcp://localhost:0"), tcp("localhost", 0));
        assert_eq!(ok("JSTP://example.com:80/"), tcp("example.com", 80));
        assert_eq!(ok("jstp://[::1]:443"), tcp("::1", 443));
        assert_eq!(
            ok("jstps://example.com:4433"),
            Endpoint::Tls {
                host: "example.com".into(),
                port: 4433
            }
        );
        assert_eq!(ok("jstp://[::1]:443").to_string(), "jstp://[::1]:443");
        assert_eq!(ok("tcp://h:1").to_string(), "jstp://h:1");
        assert_eq!(ok("jstps://h:1").to_string(), "jstps://h:1");
        assert_eq!(ok("jstps://h:1").kind(), TransportKind::Tls);
        assert_eq!(
            ok("jstp://[::1]:7").host_port(),
            Some(("::1".to_owned(), 7))
        );
    }

    #[test]
    fn tcp_errors_are_clear() {
        assert!(err("jstp://host").contains("missing port"));
        assert!(err("jstp://host:").contains("not a port number"));
        assert!(err("jstp://host:70000").contains("not a port number"));
        assert!(err("jstp://:80").contains("missing host"));
        assert!(err("jstp://h:80/path").contains("no path"));
        assert!(err("jstp://u@h:80").contains("user info"));
        assert!(err("jstp://::1:80").contains("brackets"));
        assert!(err("jstp://[::1:80").contains("unclosed"));
        assert!(err("jstp://[zz]:80").contains("not an IPv6"));
        assert!(err("jstp:h:80").contains("expected \"//\""));
        assert!(err("localhost:80").contains("missing scheme"));
        assert!(err("foo://h:80").contains("unknown scheme"));
        assert!(err("http://h:80").contains("unknown scheme"));
        assert!(err("no-scheme").contains("missing scheme"));
        assert!(err("jstp://h h:1").contains("invalid character"));
    }

    #[test]
    fn unix() {
        assert_eq!(ok("unix:/tmp/a.sock"), Endpoint::Unix("/tmp/a.sock".into()));
        assert_eq!(
            ok("unix:///tmp/a.sock"),
            Endpoint::Unix("/tmp/a.sock".into())
        );
        assert_eq!(ok("unix:rel.sock"), Endpoint::Unix("rel.sock".into()));
        assert_eq!(ok("unix:///tmp/a.sock").to_string(), "unix:/tmp/a.sock");
        assert_eq!(ok("unix:/x").kind(), TransportKind::Unix);
        assert_eq!(ok("unix:/x").host_port(), None);
        assert!(err("unix:").contains("missing socket path"));
        assert!(err("unix://host/x").contains("absolute path"));
    }

    #[test]
    fn websocket() {
        assert_eq!(
            ok("ws://127.0.0.1:8080/jstp"),
            Endpoint::Ws("ws://127.0.0.1:8080/jstp".into())
        );
        assert_eq!(ok("ws://h"), Endpoint::Ws("ws://h/".into()));
        assert_eq!(
            ok("WSS://h:443/x?y=1"),
            Endpoint::Wss("wss://h/x?y=1".into())
        );
        assert_eq!(ok("ws://h").host_port(), Some(("h".to_owned(), 80)));
        assert_eq!(ok("wss://h").host_port(), Some(("h".to_owned(), 443)));
        assert_eq!(ok("ws://[::1]:9/").host_port(), Some(("::1".to_owned(), 9)));
        assert_eq!(ok("ws://h:1/p").to_string(), "ws://h:1/p");
        assert_eq!(ok("wss://h:1/p").kind(), TransportKind::Wss);
        assert!(err("ws://").contains("ws://"));
        assert!(err("ws://h/#frag").contains("fragment"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "jstp://127.0.0.1:3000",
            "jstps://[::1]:1",
            "unix:/tmp/x.sock",
            "ws://h:1/a/b",
            "wss://example.com/",
        ] {
            assert_eq!(ok(s).to_string(), s);
            assert_eq!(ok(&ok(s).to_string()), ok(s));
        }
    }
}
