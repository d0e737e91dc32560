//! The body of tether's multiserver address fuzz target, free of libfuzzer so a stable test
//! could run it too.

use tether::hub::{AddressError, MultiAddress, PeerKey};

/// Any text → `MultiAddress`: whatever parses prints to text that parses back to an equal
/// value and prints the same again (the round trip `address_props.rs` checks for generated
/// addresses), its typed views never panic, and a dialable endpoint converts back to an
/// address with the same endpoint. Keys that parse print to a form that parses to the same key.
/// The layer check refuses exactly the dialable alternatives with a layer it was not told it
/// can verify, and names that layer and alternative.
pub fn address_body(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(key) = PeerKey::parse(&text) {
        assert_eq!(PeerKey::parse(&key.to_string()), Ok(key));
        assert_eq!(PeerKey::parse(&key.to_base64()), Ok(key));
    }
    let Ok(addr) = text.parse::<MultiAddress>() else {
        return;
    };
    let printed = addr.to_string();
    let again: MultiAddress = printed
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} prints as {printed:?}, which does not parse: {e}"));
    assert_eq!(again, addr, "{text:?} → {printed:?}");
    assert_eq!(again.to_string(), printed);
    assert!(!addr.alternatives().is_empty());
    for alt in addr.alternatives() {
        assert!(!alt.protocols().is_empty());
        let _ = alt.endpoint();
        if let Some(key) = alt.key() {
            assert!(addr.key().is_some(), "{text:?}: {key:?}");
        }
    }
    check_layers(&text, &addr);
    if let Some(endpoint) = addr.endpoint() {
        let back = MultiAddress::from(&endpoint);
        let reprinted = back.to_string();
        let reparsed: MultiAddress = reprinted.parse().unwrap_or_else(|e| {
            panic!(
                "{endpoint:?} (from {text:?}) prints as {reprinted:?}, which does not parse: {e}"
            )
        });
        assert_eq!(
            reparsed.endpoint(),
            Some(endpoint),
            "{text:?} → {reprinted:?}"
        );
    }
}

fn check_layers(text: &str, addr: &MultiAddress) {
    let dialable_layers: Vec<&str> = addr
        .alternatives()
        .iter()
        .filter(|a| matches!(a.endpoint(), Ok(Some(_))))
        .flat_map(|a| a.protocols()[1..].iter().map(|p| p.name.as_str()))
        .collect();
    // Verifying every layer there is passes; verifying none refuses iff a dialable
    // alternative has a layer, naming one of them.
    assert_eq!(addr.check_layers(&dialable_layers), Ok(()), "{text:?}");
    match addr.check_layers(&[]) {
        Ok(()) => assert!(dialable_layers.is_empty(), "{text:?}"),
        Err(AddressError::UnverifiedLayer { layer, address }) => {
            assert!(
                dialable_layers.contains(&layer.as_str()),
                "{text:?}: {layer}"
            );
            let alt: MultiAddress = address
                .parse()
                .unwrap_or_else(|e| panic!("{text:?}: {address:?} does not parse: {e}"));
            assert!(
                addr.alternatives().contains(&alt.alternatives()[0]),
                "{text:?}"
            );
        }
        Err(other) => panic!("{text:?}: {other:?}"),
    }
}
