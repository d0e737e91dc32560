//! Multiserver-style addresses: `alternative;alternative`, each `protocol~protocol`, each
//! `name:data:data`, with `!` escaping `!`, `:`, `;` and `~` inside data.
//!
//! ```
//! use tether::hub::MultiAddress;
//!
//! let key = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";
//! let text = format!("net:127.0.0.1:3000~shs:{key};ws://127.0.0.1:8080~shs:{key}");
//! let addr: MultiAddress = text.parse().unwrap();
//! assert_eq!(addr.alternatives().len(), 2);
//! assert_eq!(addr.to_string(), text);
//! assert_eq!(addr.key().unwrap().to_string(), format!("@{key}.ed25519"));
//! assert_eq!(addr.endpoint().unwrap().to_string(), "jstp://127.0.0.1:3000");
//! ```

use crate::transport::Endpoint;
use base64::Engine;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// Why an address is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AddressError {
    /// The address (or one of its alternatives or protocols) is empty.
    #[error("empty address component")]
    Empty,
    /// A protocol name is not `[a-z][a-z0-9-]+`.
    #[error("invalid protocol name {0:?}")]
    InvalidName(String),
    /// A data field holds a character outside the printable range, or a bare `!`.
    #[error("invalid character {0:?} in address data")]
    InvalidCharacter(char),
    /// A `!` escape is not one of `!!`, `!:`, `!;`, `!~`.
    #[error("invalid escape in address data")]
    InvalidEscape,
    /// An `shs` key is not base64 of 32 bytes.
    #[error("invalid peer key {0:?}: expected base64 of 32 bytes")]
    InvalidKey(String),
    /// A transport protocol lacks its fields (e.g. `net::1` without a host).
    #[error("invalid {0} address")]
    InvalidTransport(&'static str),
    /// A `net:` or `tls:` address has no port.
    #[error("{0} address without a port")]
    MissingPort(&'static str),
    /// A layer after a dialable transport (`~shs:KEY`, …) that the dialler cannot verify:
    /// dialling without it would pretend the layer's promise (for `shs`, that the peer holds
    /// the key) was kept. tether's own dialler has no secret-handshake.
    #[error("cannot verify the {layer:?} layer of {address:?}: this dialler does not speak it (tether has no secret-handshake); remove the layer or dial with a connector that verifies it")]
    UnverifiedLayer {
        /// The layer's protocol name.
        layer: String,
        /// The alternative that carries it.
        address: String,
    },
    /// A port is not a number from 1 to 65535.
    #[error("invalid port {port:?} in {transport} address")]
    InvalidPort {
        /// The transport protocol.
        transport: &'static str,
        /// The port as written.
        port: String,
    },
}

/// One protocol of an address: a name and its data fields (escapes resolved).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Protocol {
    /// The protocol name (`net`, `ws`, `shs`, …).
    pub name: String,
    /// Its data fields, unescaped.
    pub data: Vec<String>,
}

/// One way to reach a peer: a transport protocol, then transforms (`~shs:…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    protocols: Vec<Protocol>,
}

/// A peer's addresses: alternatives separated by `;`. Printing re-escapes, so parsing and
/// printing round-trip.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MultiAddress {
    alternatives: Vec<Address>,
}

/// A peer's public key (an ed25519 key, 32 bytes), from an `shs` layer.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerKey([u8; 32]);

impl PeerKey {
    /// Parses base64 of exactly 32 bytes, in the forms multiserver accepts: standard or
    /// URL-safe alphabet, padded or not; a leading `@` and a trailing `.ed25519` are accepted,
    /// as in SSB feed ids. It prints in the standard padded form.
    pub fn parse(text: &str) -> Result<PeerKey, AddressError> {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let core = text.strip_prefix('@').unwrap_or(text);
        let core = core.strip_suffix(".ed25519").unwrap_or(core);
        let engine = match (core.contains(['-', '_']), core.ends_with('=')) {
            (false, true) => STANDARD,
            (false, false) => STANDARD_NO_PAD,
            (true, true) => URL_SAFE,
            (true, false) => URL_SAFE_NO_PAD,
        };
        let bytes = engine
            .decode(core)
            .map_err(|_| AddressError::InvalidKey(text.to_owned()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| AddressError::InvalidKey(text.to_owned()))?;
        Ok(PeerKey(key))
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as base64.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl fmt::Display for PeerKey {
    /// `@<base64>.ed25519`, the SSB feed id form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}.ed25519", self.to_base64())
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Splits `text` at unescaped `sep`, keeping escapes in the parts.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '!' {
            escaped = true;
        } else if c == sep {
            parts.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&text[start..]);
    parts
}

fn unescape(field: &str) -> Result<String, AddressError> {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            '!' => match chars.next() {
                Some(e @ ('!' | ':' | ';' | '~')) => out.push(e),
                _ => return Err(AddressError::InvalidEscape),
            },
            // Printable ASCII from `"` to `}` except the separators.
            '"'..='}' if c != ':' && c != ';' => out.push(c),
            other => return Err(AddressError::InvalidCharacter(other)),
        }
    }
    Ok(out)
}

fn escape(field: &str, out: &mut String) {
    for c in field.chars() {
        if matches!(c, '!' | ':' | ';' | '~') {
            out.push('!');
        }
        out.push(c);
    }
}

impl FromStr for Protocol {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut fields = split_unescaped(text, ':').into_iter();
        let name = fields.next().unwrap_or_default();
        if name.is_empty() {
            return Err(AddressError::Empty);
        }
        if !valid_name(name) {
            return Err(AddressError::InvalidName(name.to_owned()));
        }
        let data = fields.map(unescape).collect::<Result<Vec<_>, _>>()?;
        let protocol = Protocol {
            name: name.to_owned(),
            data,
        };
        if protocol.name.starts_with("shs") {
            let key = protocol
                .data
                .first()
                .map(String::as_str)
                .unwrap_or_default();
            PeerKey::parse(key)?;
        }
        Ok(protocol)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name.clone();
        for d in &self.data {
            out.push(':');
            escape(d, &mut out);
        }
        f.write_str(&out)
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        let protocols = split_unescaped(text, '~')
            .into_iter()
            .map(str::parse)
            .collect::<Result<Vec<Protocol>, _>>()?;
        Ok(Address { protocols })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.protocols.iter().enumerate() {
            if i > 0 {
                f.write_str("~")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Address {
    /// The protocols, transport first.
    pub fn protocols(&self) -> &[Protocol] {
        &self.protocols
    }

    /// The peer key of the first `shs…` layer, if any.
    pub fn key(&self) -> Option<PeerKey> {
        self.protocols
            .iter()
            .find(|p| p.name.starts_with("shs"))
            .and_then(|p| p.data.first())
            .and_then(|k| PeerKey::parse(k).ok())
    }

    /// The tether endpoint of the transport layer: `net:HOST:PORT` (TCP; an IPv6 host spans
    /// several fields, the port is the last), `tls:HOST:PORT`, `ws://…`, `wss://…`,
    /// `unix:PATH`. `Ok(None)` for transports tether does not have (`onion`, `bt`, …).
    pub fn endpoint(&self) -> Result<Option<Endpoint>, AddressError> {
        let Some(t) = self.protocols.first() else {
            return Err(AddressError::Empty);
        };
        let host_port =
            |kind: &'static str| -> Result<(String, u16), AddressError> {
                let (port, host) = match t.data.split_last() {
                    Some((port, host)) if !host.is_empty() => (port, host),
                    _ => return Err(AddressError::MissingPort(kind)),
                };
                let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                    AddressError::InvalidPort {
                        transport: kind,
                        port: port.clone(),
                    }
                })?;
                // IPv6 hosts span several fields, some empty (`fe80::1`).
                let host = host.join(":");
                if host.is_empty() {
                    return Err(AddressError::InvalidTransport(kind));
                }
                Ok((host, port))
            };
        let endpoint = match t.name.as_str() {
            "net" => {
                let (host, port) = host_port("net")?;
                Endpoint::Tcp { host, port }
            }
            "tls" => {
                let (host, port) = host_port("tls")?;
                Endpoint::Tls { host, port }
            }
            "ws" | "wss" => {
                let kind = if t.name == "ws" { "ws" } else { "wss" };
                let text = format!("{}:{}", t.name, t.data.join(":"));
                if let Err(url::ParseError::InvalidPort) = url::Url::parse(&text) {
                    let port = t.data.last().cloned().unwrap_or_default();
                    return Err(AddressError::InvalidPort {
                        transport: kind,
                        port,
                    });
                }
                text.parse()
                    .map_err(|_| AddressError::InvalidTransport(kind))?
            }
            "unix" => {
                let path = t.data.join(":");
                if path.is_empty() || path.contains('\0') {
                    return Err(AddressError::InvalidTransport("unix"));
                }
                // The path as written: going through `unix:PATH` text would read a path that
                // starts with `//` as `unix://…` URL syntax.
                Endpoint::Unix(std::path::PathBuf::from(path))
            }
            _ => return Ok(None),
        };
        Ok(Some(endpoint))
    }
}

impl FromStr for MultiAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let alternatives = split_unescaped(text, ';')
            .into_iter()
            .map(str::parse)
            .collect::<Result<Vec<Address>, _>>()?;
        Ok(MultiAddress { alternatives })
    }
}

impl fmt::Display for MultiAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.alternatives.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl MultiAddress {
    /// The alternatives, in order of preference.
    pub fn alternatives(&self) -> &[Address] {
        &self.alternatives
    }

    /// The peer key: the first `shs…` layer in any alternative.
    pub fn key(&self) -> Option<PeerKey> {
        self.alternatives.iter().find_map(Address::key)
    }

    /// Checks every alternative whose transport tether knows (`net`, `tls`, `ws`, `wss`,
    /// `unix`): a bad or missing port or host is an error now rather than an undialable
    /// address later. Other transports are left alone.
    pub fn check_transports(&self) -> Result<(), AddressError> {
        self.alternatives
            .iter()
            .try_for_each(|a| a.endpoint().map(drop))
    }

    /// Checks that every alternative tether can dial carries only layers in `verified` after
    /// its transport (what the dialler verifies, or layers that promise nothing, as
    /// `noauth`). Alternatives on transports tether does not have are left alone.
    pub fn check_layers(&self, verified: &[&str]) -> Result<(), AddressError> {
        for a in &self.alternatives {
            if !matches!(a.endpoint(), Ok(Some(_))) {
                continue;
            }
            if let Some(p) = a.protocols[1..]
                .iter()
                .find(|p| !verified.contains(&p.name.as_str()))
            {
                return Err(AddressError::UnverifiedLayer {
                    layer: p.name.clone(),
                    address: a.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The endpoint of the first alternative tether can dial.
    pub fn endpoint(&self) -> Option<Endpoint> {
        self.alternatives
            .iter()
            .find_map(|a| a.endpoint().ok().flatten())
    }
}

impl From<&Endpoint> for MultiAddress {
    /// The address of a tether endpoint (`net:`, `tls:`, `ws://`, `wss://`, `unix:`).
    fn from(e: &Endpoint) -> Self {
        let protocol = match e {
            Endpoint::Tcp { host, port } => Protocol {
                name: "net".into(),
                data: vec![host.clone(), port.to_string()],
            },
            Endpoint::Tls { host, port } => Protocol {
                name: "tls".into(),
                data: vec![host.clone(), port.to_string()],
            },
            Endpoint::Unix(path) => Protocol {
                name: "unix".into(),
                data: vec![path.display().to_string()],
            },
            other => {
                let text = other.to_string();
                let (name, rest) = text.split_once(':').unwrap_or((&text, ""));
                Protocol {
                    name: name.to_owned(),
                    data: rest.split(':').map(str::to_owned).collect(),
                }
            }
        };
        MultiAddress {
            alternatives: vec![Address {
                protocols: vec![protocol],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";

    #[test]
    fn parses_and_prints_losslessly() {
        for text in [
            "net:1.2.3.4:8008",
            &format!("net:1.2.3.4:8008~shs:{KEY}"),
            &format!("net:host:8008~shs:{KEY};wss://host~shs:{KEY}"),
            "net:fe80::1065:74a4:4016:6266:4849:8889",
            "unix:/tmp/x.sock~noauth",
            "onion:xyz.onion:8080",
            "dht:a!:b!;c!~d!!e:",
            "ws://127.0.0.1:8080",
        ] {
            let a: MultiAddress = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        let a: MultiAddress = "dht:a!:b!;c!~d!!e".parse().unwrap();
        assert_eq!(a.alternatives()[0].protocols()[0].data, vec!["a:b;c~d!e"]);
    }

    #[test]
    fn invalid_addresses_are_typed_errors() {
        assert_eq!("".parse::<MultiAddress>(), Err(AddressError::Empty));
        assert_eq!(
            "n:1".parse::<MultiAddress>(),
            Err(AddressError::InvalidName("n".into()))
        );
        assert_eq!(
            "Net:1".parse::<MultiAddress>(),
            Err(AddressError::InvalidName("Net".into()))
        );
        assert_eq!(
            "net:a b:1".parse::<MultiAddress>(),
            Err(AddressError::InvalidCharacter(' '))
        );
        assert_eq!(
            "net:a!x".parse::<MultiAddress>(),
            Err(AddressError::InvalidEscape)
        );
        assert!(matches!(
            "net:h:1~shs:notakey".parse::<MultiAddress>(),
            Err(AddressError::InvalidKey(_))
        ));
        assert!(matches!(
            "net:h:1~shs:AAAA".parse::<MultiAddress>(),
            Err(AddressError::InvalidKey(_))
        ));
        assert_eq!("net:h:1;".parse::<MultiAddress>(), Err(AddressError::Empty));
    }

    #[test]
    fn typed_views() {
        let a: MultiAddress = format!("onion:x.onion:1;net:fe80::1:3000~shs:{KEY}")
            .parse()
            .unwrap();
        assert_eq!(
            a.endpoint(),
            Some(Endpoint::Tcp {
                host: "fe80::1".into(),
                port: 3000
            })
        );
        assert_eq!(a.key().unwrap().to_base64(), KEY);
        let cases = [
            ("tls:localhost:443", "jstps://localhost:443"),
            ("ws://h:8080", "ws://h:8080/"),
            ("wss://h", "wss://h/"),
            ("unix:/tmp/t.sock", "unix:/tmp/t.sock"),
        ];
        for (text, url) in cases {
            let a: MultiAddress = text.parse().unwrap();
            assert_eq!(a.endpoint().unwrap().to_string(), url, "{text}");
        }
        let bad: Address = "net:host".parse().unwrap();
        assert_eq!(bad.endpoint(), Err(AddressError::MissingPort("net")));
        let e: Endpoint = "jstp://127.0.0.1:9".parse().unwrap();
        assert_eq!(MultiAddress::from(&e).to_string(), "net:127.0.0.1:9");
        assert_eq!(
            PeerKey::parse(&format!("@{KEY}.ed25519"))
                .unwrap()
                .to_base64(),
            KEY
        );
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;

    const KEY: &str = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";

    #[test]
    fn keys_parse_in_every_multiserver_form_and_print_canonically() {
        // A key with `+` and `/` in it, so the URL-safe alphabet differs.
        let key = PeerKey([0xfb; 32]);
        let standard = key.to_base64();
        assert!(
            standard.contains('+') || standard.contains('/'),
            "{standard}"
        );
        let url_safe = standard.replace('+', "-").replace('/', "_");
        for text in [
            standard.clone(),
            standard.trim_end_matches('=').to_owned(),
            url_safe.clone(),
            url_safe.trim_end_matches('=').to_owned(),
            format!("@{}.ed25519", url_safe.trim_end_matches('=')),
        ] {
            assert_eq!(PeerKey::parse(&text), Ok(key), "{text}");
            let address: MultiAddress = format!("net:h:1~shs:{text}").parse().unwrap();
            assert_eq!(address.key(), Some(key), "{text}");
        }
        assert_eq!(key.to_base64(), standard);
        assert_eq!(PeerKey::parse(KEY).unwrap().to_base64(), KEY);
        // Mixed alphabets, wrong lengths and stray characters are still refused.
        let mixed = format!("-{}", &standard[1..]).replace('/', "+");
        for bad in [
            &mixed[..],
            "AAAA",
            &KEY[..42],
            "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0==",
        ] {
            assert!(PeerKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_are_checked_before_dialling() {
        let check = |text: &str| text.parse::<MultiAddress>().unwrap().check_transports();
        assert_eq!(check("net:h"), Err(AddressError::MissingPort("net")));
        assert_eq!(check("tls:h"), Err(AddressError::MissingPort("tls")));
        assert_eq!(
            check("net:h:1~shs:{KEY}".replace("{KEY}", KEY).as_str()),
            Ok(())
        );
        for (text, transport, port) in [
            ("net:h:http", "net", "http"),
            ("net:h:0", "net", "0"),
            ("tls:h:70000", "tls", "70000"),
            ("ws://h:99999", "ws", "99999"),
            ("wss://h:x", "wss", "x"),
        ] {
            assert_eq!(
                check(text),
                Err(AddressError::InvalidPort {
                    transport,
                    port: port.into()
                }),
                "{text}"
            );
        }
        // One bad alternative is enough; unknown transports are not ours to judge.
        assert_eq!(
            check("onion:x.onion:80;net:h:x"),
            Err(AddressError::InvalidPort {
                transport: "net",
                port: "x".into()
            })
        );
        for good in [
            "net:h:1",
            "tls:h:443",
            "ws://h",
            "wss://h:8443/p",
            "onion:x:y",
            "unix:/s",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
    }
}

#[cfg(test)]
mod honest_layers {
    use super::*;

    const KEY: &str = "pAhDcHjunq6epPvYYo483vBjcuDkE10qrc2tYC827R0=";

    #[test]
    fn layers_the_dialler_cannot_verify_are_refused_and_named() {
        let check = |text: &str, verified: &[&str]| {
            text.parse::<MultiAddress>().unwrap().check_layers(verified)
        };
        let shs = format!("net:127.0.0.1:3000~shs:{KEY}");
        assert_eq!(
            check(&shs, &["noauth"]),
            Err(AddressError::UnverifiedLayer {
                layer: "shs".into(),
                address: shs.clone()
            })
        );
        // A connector that verifies `shs` may dial it.
        assert_eq!(check(&shs, &["noauth", "shs"]), Ok(()));
        assert_eq!(check("unix:/s~noauth", &["noauth"]), Ok(()));
        assert!(matches!(
            check("ws://h:1~box2:x", &["noauth"]),
            Err(AddressError::UnverifiedLayer { layer, .. }) if layer == "box2"
        ));
        // Transports tether does not dial are not its to judge; one dialable alternative with
        // an unverified layer refuses the address.
        assert_eq!(check(&format!("onion:x.onion:80~shs:{KEY}"), &[]), Ok(()));
        assert!(check(&format!("net:h:1;tls:h:2~shs:{KEY}"), &["noauth"]).is_err());
        let text = check(&shs, &[]).unwrap_err().to_string();
        assert!(
            text.contains("secret-handshake") && text.contains("\"shs\""),
            "{text}"
        );
    }
}
