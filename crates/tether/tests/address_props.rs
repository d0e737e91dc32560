//! Multiserver addresses: printing and parsing round-trip for any valid address (escapes
//! included), and no input makes the parser panic.

use proptest::prelude::*;
use tether::hub::MultiAddress;

fn protocol() -> impl Strategy<Value = String> {
    // A name, then data fields drawn from the allowed characters and the escaped ones.
    // `shs…` layers must hold a valid key; they have their own tests.
    let name = "[a-z][a-z0-9-]{1,6}".prop_filter("not shs", |n: &String| !n.starts_with("shs"));
    let field = proptest::collection::vec(
        prop_oneof![
            "[\"-9<-}&&[^:;~!]]".prop_map(|s: String| s),
            Just("!!".to_owned()),
            Just("!:".to_owned()),
            Just("!;".to_owned()),
            Just("!~".to_owned()),
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat());
    (name, proptest::collection::vec(field, 0..4)).prop_map(|(name, fields)| {
        let mut out = name;
        for f in fields {
            out.push(':');
            out.push_str(&f);
        }
        out
    })
}

fn multiaddress() -> impl Strategy<Value = String> {
    let address = proptest::collection::vec(protocol(), 1..4).prop_map(|p| p.join("~"));
    proptest::collection::vec(address, 1..4).prop_map(|a| a.join(";"))
}

proptest! {
    #[test]
    fn valid_addresses_round_trip(text in multiaddress()) {
        let parsed: MultiAddress = text.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), text.clone());
        let again: MultiAddress = parsed.to_string().parse().unwrap();
        prop_assert_eq!(again, parsed);
    }

    #[test]
    fn any_text_parses_or_fails_cleanly(text in "\\PC{0,64}") {
        if let Ok(a) = text.parse::<MultiAddress>() {
            let _ = a.endpoint();
            let _ = a.key();
            prop_assert_eq!(a.to_string().parse::<MultiAddress>().ok(), Some(a));
        }
    }
}
