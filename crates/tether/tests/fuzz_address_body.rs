//! Runs the `address` fuzz target body (`fuzz/src/lib.rs`) over its committed seed corpus and
//! mutations of it, so stable CI exercises it without libfuzzer or nightly.

#[path = "../fuzz/src/lib.rs"]
mod body;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    ":", ";", "~", "!", "!!", "!:", "!;", "!~", "net:", "ws://", "wss://", "unix:", "tls:", "shs:",
    "::", "[", "]", "/", "@", "=", ".ed25519", "0", "65535", "65536", " ", "é",
];

#[test]
fn address_target_body() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/address");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("corpus entry").path()).expect("seed"))
        .collect();
    assert!(
        seeds.len() >= 10,
        "{}: only {} seeds",
        dir.display(),
        seeds.len()
    );
    seeds.sort();
    let mut rng = Rng(0xadd2_e55e);
    for seed in &seeds {
        body::address_body(seed);
        for _ in 0..200 {
            let mut input = seed.clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(input.len() + 1);
                match rng.below(3) {
                    0 if at < input.len() => {
                        input.remove(at);
                    }
                    1 => {
                        let piece = PIECES[rng.below(PIECES.len())].as_bytes();
                        input.splice(at..at, piece.iter().copied());
                    }
                    _ => input.insert(at, b'!' + (rng.next() % 94) as u8),
                }
            }
            body::address_body(&input);
        }
    }
}

/// Found by the `address` fuzz target: a Unix path starting with `//` printed as `unix://…`
/// did not parse back.
#[test]
fn unix_endpoint_with_double_slash_converts_back() {
    let endpoint: tether::Endpoint = "unix:////tmp/t.sock".parse().expect("endpoint");
    let printed = tether::hub::MultiAddress::from(&endpoint).to_string();
    let back: Option<tether::hub::MultiAddress> = printed.parse().ok();
    assert_eq!(back.and_then(|a| a.endpoint()), Some(endpoint), "{printed}");
}
