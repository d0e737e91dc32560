//! The bodies of tether-wire's fuzz targets.
//!
//! They live here, free of libfuzzer, so that the crate's ordinary test suite can run them too
//! (`tests/fuzz_bodies.rs` includes this file by path) on stable Rust.

use tether_wire::ser::array_index;
use tether_wire::{parse, stringify, FrameError, Message, NulFramer, Object, Value};

/// Any bytes → `parse`; whatever parses must serialize, re-parse and classify without panics,
/// and the serializer's output must always be readable again.
pub fn parse_body(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(value) = parse(&text) else {
        return;
    };
    check_value(&value);
}

fn check_value(value: &Value) {
    // `to_mdsf` writes NaN/Infinity, which the parser accepts.
    let loose = value.to_mdsf();
    let reparsed = parse(&loose).unwrap_or_else(|e| panic!("own output {loose:?} unreadable: {e}"));
    let want = after_round_trip(value);
    assert!(
        same(&reparsed, &want),
        "{loose:?} reads back as {reparsed:?}, not {want:?}"
    );
    match stringify(value) {
        Ok(strict) => assert_eq!(strict, loose, "stringify and to_mdsf differ"),
        Err(_) => assert!(loose.contains("NaN") || loose.contains("Infinity")),
    }
    if let Ok(msg) = Message::from_value(value) {
        let wire = msg.encode();
        let back = Message::parse(&wire)
            .unwrap_or_else(|e| panic!("{msg:?} encodes to unreadable {wire:?}: {e}"));
        assert_eq!(back.kind(), msg.kind(), "{wire:?}");
    }
}

/// What one serialize/parse trip makes of a value: object properties holding `Undefined`
/// vanish, keys take JS order (array indices first, ascending), and each array loses one
/// trailing `Undefined` (`[1,undefined]` is written `[1,]`, which reads back as `[1]`).
pub fn after_round_trip(value: &Value) -> Value {
    match value {
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(after_round_trip).collect();
            if matches!(items.last(), Some(Value::Undefined)) {
                items.pop();
            }
            Value::Array(items)
        }
        Value::Object(obj) => {
            let kept = || obj.0.iter().filter(|(_, v)| !matches!(v, Value::Undefined));
            let mut indexed: Vec<(u32, &(String, Value))> = kept()
                .filter_map(|p| array_index(&p.0).map(|i| (i, p)))
                .collect();
            indexed.sort_by_key(|e| e.0);
            let mut out = Object::new();
            let others = kept().filter(|(k, _)| array_index(k).is_none());
            for (k, v) in indexed.into_iter().map(|e| e.1).chain(others) {
                out.0.push((k.clone(), after_round_trip(v)));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Structural equality in which NaN equals NaN.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.0
                    .iter()
                    .zip(&y.0)
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

/// A small deterministic generator for chunk sizes.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Collects what a framer yields for `chunks`, stopping at the first fatal error, and parses
/// each frame as a message (which must not panic).
fn frame(max: usize, chunks: &mut dyn Iterator<Item = &[u8]>) -> Vec<Result<String, FrameError>> {
    let mut framer = NulFramer::new(max);
    let mut out = Vec::new();
    for chunk in chunks {
        framer.push(chunk);
        while let Some(result) = framer.next_message() {
            if let Ok(text) = &result {
                assert!(text.len() <= max);
                assert!(!text.contains('\0'));
                if let Ok(msg) = Message::parse(text) {
                    let _ = msg.encode();
                }
            }
            let fatal = matches!(result, Err(FrameError::TooLarge { .. }));
            out.push(result);
            if fatal {
                return out;
            }
        }
        assert!(framer.buffered() <= max, "holding more than the limit");
    }
    out
}

/// Bytes → a NUL-framed stream fed in arbitrary chunks; every frame goes to `Message::parse`,
/// and the frames must not depend on the chunking.
///
/// The first two bytes choose the size limit and the chunking; the rest is the stream.
pub fn framer_body(data: &[u8]) {
    let (head, stream) = data.split_at(data.len().min(2));
    let seed = head.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let max = match head.first() {
        Some(&b) if b & 1 == 1 => usize::from(b >> 1) + 1,
        _ => tether_wire::DEFAULT_MAX_MESSAGE_SIZE,
    };
    let whole = frame(max, &mut std::iter::once(stream));
    let mut rng = Lcg(seed);
    let mut rest = stream;
    let mut chunked_input = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        let n = (rng.next() as usize % 17).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    });
    let chunked = frame(max, &mut chunked_input);
    assert_eq!(whole, chunked, "framing depends on chunking");
}

/// Any bytes → the conductor envelope decoder; whatever decodes must re-encode to an envelope
/// that decodes to the same message, and payload splitting must never panic.
pub fn conductor_body(data: &[u8]) {
    use tether_wire::conductor::{split_payload, WireMessage};
    let _ = split_payload(data);
    let Ok(msg) = WireMessage::decode(data) else {
        return;
    };
    let again = WireMessage::decode(&msg.encode())
        .unwrap_or_else(|e| panic!("{msg:?} re-encodes to an unreadable envelope: {e}"));
    assert_eq!(again, msg);
    match &msg {
        WireMessage::Signal { data } | WireMessage::Request { data, .. } => {
            let _ = split_payload(data);
        }
        WireMessage::Response { data, .. } => {
            if let Some(d) = data {
                let _ = split_payload(d);
            }
        }
    }
}
