//! Property tests: serializer/parser round trips, message round trips, and framing that does
//! not depend on how the input is chunked.

use proptest::prelude::*;
use tether_wire::ser::array_index;
use tether_wire::{
    parse, stringify, Auth, CallbackResult, ErrorCode, FrameError, HandshakeResult, Message,
    NulFramer, Object, RemoteErrorArray, Value,
};

// ---------------------------------------------------------------------------------------------
// Values

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z_$][a-zA-Z0-9_$]{0,6}",
        // Integer-like keys, canonical and not.
        (0u64..20).prop_map(|n| n.to_string()),
        Just("4294967294".to_owned()),
        Just("4294967295".to_owned()),
        Just("01".to_owned()),
        Just("-1".to_owned()),
        Just("1.5".to_owned()),
        any::<String>(),
    ]
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        // Dense in characters that need escaping.
        "['\"\\\\/\\x00-\\x1f\\x7f\u{2028}\u{2029}é😀 a]{0,12}",
    ]
}

fn arb_finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |n| n.is_finite()),
        any::<i32>().prop_map(f64::from),
        (-1e6f64..1e6),
        Just(-0.0),
        Just(1e21),
        Just(1e-7),
        Just(5e-324),
        Just(f64::MAX),
        Just(9007199254740993.0),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Undefined),
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_finite().prop_map(Value::Number),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..8)
                .prop_map(|props| Value::Object(props.into_iter().collect::<Object>())),
        ]
    })
}

/// What one serialize/parse trip makes of a value: object properties holding `Undefined`
/// vanish, keys take JS order (array indices first), and each array loses one trailing
/// `Undefined` (`[1,undefined]` is written `[1,]`, which reads back as `[1]`).
fn after_round_trip(v: &Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(after_round_trip).collect();
            if matches!(items.last(), Some(Value::Undefined)) {
                items.pop();
            }
            Value::Array(items)
        }
        Value::Object(obj) => Value::Object(js_order(obj, after_round_trip)),
        other => other.clone(),
    }
}

/// A value that survives any number of trips unchanged: no trailing `Undefined` in arrays.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(canonical).collect();
            while matches!(items.last(), Some(Value::Undefined)) {
                items.pop();
            }
            Value::Array(items)
        }
        Value::Object(obj) => Value::Object(js_order(obj, canonical)),
        other => other.clone(),
    }
}

fn js_order(obj: &Object, f: fn(&Value) -> Value) -> Object {
    let kept = obj.0.iter().filter(|(_, v)| !matches!(v, Value::Undefined));
    let mut indexed: Vec<(u32, &String, &Value)> = kept
        .clone()
        .filter_map(|(k, v)| array_index(k).map(|i| (i, k, v)))
        .collect();
    indexed.sort_by_key(|e| e.0);
    let mut out = Object::new();
    for (_, k, v) in indexed {
        out.0.push((k.clone(), f(v)));
    }
    for (k, v) in kept.filter(|(k, _)| array_index(k).is_none()) {
        out.0.push((k.clone(), f(v)));
    }
    out
}

/// Equality that also treats NaN as equal to itself (never generated, but cheap to allow).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
        }
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn stringify_then_parse_round_trips(v in arb_value()) {
        let text = stringify(&v).unwrap();
        let back = parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let want = after_round_trip(&v);
        prop_assert!(same(&back, &want), "{text}\n got {back:?}\nwant {want:?}");
        // Numbers keep their exact bits (except -0, which JS writes as 0).
        if let (Value::Number(a), Value::Number(b)) = (&v, &back) {
            prop_assert!(a == b && (a.to_bits() == b.to_bits() || *a == 0.0));
        }
    }

    #[test]
    fn canonical_values_reencode_byte_identical(v in arb_value()) {
        let v = canonical(&v);
        let text = stringify(&v).unwrap();
        let back = parse(&text).unwrap();
        prop_assert!(same(&back, &v));
        prop_assert_eq!(stringify(&back).unwrap(), text);
    }

    #[test]
    fn output_never_holds_raw_nul_or_line_feed(v in arb_value()) {
        let text = stringify(&v).unwrap();
        prop_assert!(!text.contains('\0'));
        prop_assert!(!text.contains('\n'));
    }

    #[test]
    fn numbers_round_trip_bit_exactly(n in arb_finite()) {
        let text = stringify(&Value::Number(n)).unwrap();
        let back = parse(&text).unwrap().as_f64().unwrap();
        prop_assert!(back.to_bits() == n.to_bits() || (n == 0.0 && back == 0.0), "{n} -> {text}");
    }

    #[test]
    fn strings_round_trip(s in arb_string()) {
        let text = stringify(&Value::String(s.clone())).unwrap();
        prop_assert_eq!(parse(&text).unwrap(), Value::String(s.clone()));
        // The double-quoted form reads the same (a `\'` escape stands for `'`).
        let dq = format!("\"{}\"", &text[1..text.len() - 1]);
        prop_assert_eq!(parse(&dq).unwrap(), Value::String(s));
    }

    #[test]
    fn parse_never_panics_on_arbitrary_text(s in any::<String>()) {
        let _ = parse(&s);
    }

    #[test]
    fn parse_never_panics_on_mutated_valid_text(
        v in arb_value(),
        cut in any::<prop::sample::Index>(),
        insert in "[\\[\\]{}(),:'\"\\\\/*+\\-.0-9a-zA-Z \\x00]{0,3}",
    ) {
        let text = stringify(&v).unwrap();
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &text[..at], insert, &text[at..]);
        let _ = parse(&mutated);
        let _ = parse(&text[..at]);
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

const MAX_SAFE: i64 = 9_007_199_254_740_991;

fn arb_id() -> impl Strategy<Value = i64> {
    prop_oneof![-1000i64..1000, -MAX_SAFE..=MAX_SAFE]
}

/// A payload that reads back exactly: canonical and not `Undefined`.
fn arb_payload() -> impl Strategy<Value = Value> {
    arb_value()
        .prop_map(|v| canonical(&v))
        .prop_filter("a payload cannot be undefined", |v| {
            !matches!(v, Value::Undefined)
        })
}

fn arb_results() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(arb_value(), 0..5).prop_map(|items| {
        match canonical(&Value::Array(items)) {
            Value::Array(items) => items,
            _ => unreachable!(),
        }
    })
}

/// Errors whose wire form reads back as the same error.
fn arb_error() -> impl Strategy<Value = RemoteErrorArray> {
    let standard = prop::sample::select(vec![10i64, 11, 12, 13, 14, 15, 16, 17]).prop_map(|code| {
        RemoteErrorArray {
            code,
            message: None,
            info: Vec::new(),
        }
    });
    let custom = (
        prop_oneof![Just(1i64), -50i64..1000],
        arb_string(),
        arb_results(),
    )
        .prop_filter("standard codes send no message", |(c, _, _)| {
            ErrorCode::from_code(*c).is_none()
        })
        .prop_filter("message equal to the code is not sent", |(c, m, _)| {
            *m != c.to_string()
        })
        .prop_map(|(code, message, info)| RemoteErrorArray {
            code,
            message: Some(message),
            info,
        });
    prop_oneof![standard, custom]
}

fn arb_auth() -> impl Strategy<Value = Auth> {
    prop_oneof![
        Just(Auth::Anonymous),
        (arb_string(), arb_string()).prop_map(|(user, password)| Auth::Login { user, password }),
        (arb_string(), 0..=MAX_SAFE as u64)
            .prop_map(|(id, received)| Auth::Session { id, received }),
        (arb_key(), arb_payload())
            .prop_filter("not a built-in strategy", |(s, _)| {
                !["login", "session", "handshake"].contains(&s.as_str())
            })
            .prop_map(|(strategy, credentials)| Auth::Custom {
                strategy,
                credentials
            }),
    ]
}

fn arb_handshake_result() -> impl Strategy<Value = HandshakeResult> {
    prop_oneof![
        arb_string().prop_map(HandshakeResult::NewSession),
        (0..=MAX_SAFE as u64).prop_map(HandshakeResult::Restored),
        arb_payload()
            .prop_filter("strings and counts have their own variants", |v| {
                !matches!(v, Value::String(_) | Value::Number(_))
            })
            .prop_map(HandshakeResult::OtherOk),
        arb_error().prop_map(HandshakeResult::Error),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    let verb_for =
        |kind: &'static str| arb_key().prop_filter("verb differs from kind", move |v| v != kind);
    prop_oneof![
        Just(Message::Heartbeat),
        (
            arb_id(),
            arb_string().prop_filter("a request names an app", |s| !s.is_empty()),
            prop::option::of(arb_string()),
            arb_auth()
        )
            .prop_map(|(id, app, version, auth)| Message::HandshakeRequest {
                id,
                app,
                version,
                auth
            }),
        (arb_id(), arb_handshake_result())
            .prop_map(|(id, result)| Message::HandshakeResponse { id, result }),
        (arb_id(), arb_string(), verb_for("call"), arb_payload()).prop_map(
            |(id, iface, method, args)| Message::Call {
                id,
                iface,
                method,
                args
            }
        ),
        (arb_id(), arb_string(), verb_for("event"), arb_payload()).prop_map(
            |(id, iface, event, args)| Message::Event {
                id,
                iface,
                event,
                args
            }
        ),
        (
            arb_id(),
            prop_oneof![
                arb_results().prop_map(CallbackResult::Ok),
                arb_error().prop_map(CallbackResult::Error),
                Just(CallbackResult::Empty),
            ]
        )
            .prop_map(|(id, result)| Message::Callback { id, result }),
        (arb_id(), arb_string()).prop_map(|(id, iface)| Message::Inspect { id, iface }),
        arb_id().prop_map(|id| Message::Ping { id }),
        arb_id().prop_map(|id| Message::Pong { id }),
        (
            arb_key().prop_filter("not a known kind", |k| {
                ![
                    "handshake",
                    "call",
                    "callback",
                    "event",
                    "inspect",
                    "ping",
                    "pong",
                ]
                .contains(&k.as_str())
            }),
            prop::option::of(arb_id())
        )
            .prop_map(|(kind, id)| Message::Unknown { kind, id }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn message_encode_then_parse_round_trips(m in arb_message()) {
        let text = m.encode();
        let back = Message::parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        prop_assert_eq!(&back, &m, "{}", text);
        prop_assert_eq!(back.encode(), text);
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// Every result the framer gives for `chunks`, stopping at the first fatal error; and the
/// bytes left buffered when nothing failed.
fn frame_all<'a>(
    max: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Result<String, FrameError>>, Option<usize>) {
    let mut f = NulFramer::new(max);
    let mut out = Vec::new();
    for chunk in chunks {
        f.push(chunk);
        while let Some(r) = f.next_message() {
            let fatal = matches!(r, Err(FrameError::TooLarge { .. }));
            out.push(r);
            if fatal {
                return (out, None);
            }
        }
    }
    (out, Some(f.buffered()))
}

fn split_at_points<'a>(bytes: &'a [u8], points: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p.index(bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain(std::iter::once(bytes.len())) {
        chunks.push(&bytes[prev..c]);
        prev = c;
    }
    chunks
}

fn arb_frame_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => arb_message().prop_map(|m| m.encode().into_bytes()),
        1 => prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 0..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn framing_is_independent_of_chunking(
        bodies in prop::collection::vec(arb_frame_body(), 0..12),
        tail in prop::collection::vec(any::<u8>().prop_filter("no NUL", |b| *b != 0), 0..20),
        points in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        max in prop_oneof![Just(tether_wire::DEFAULT_MAX_MESSAGE_SIZE), 1usize..120],
    ) {
        let mut stream = Vec::new();
        for b in &bodies {
            stream.extend_from_slice(b);
            stream.push(0);
        }
        stream.extend_from_slice(&tail);

        let (whole, whole_left) = frame_all(max, [stream.as_slice()]);
        let (chunked, chunked_left) = frame_all(max, split_at_points(&stream, &points));
        let (bytewise, bytewise_left) = frame_all(max, stream.chunks(1));
        prop_assert_eq!(&chunked, &whole);
        prop_assert_eq!(&bytewise, &whole);
        prop_assert_eq!(chunked_left, whole_left);
        prop_assert_eq!(bytewise_left, whole_left);

        // With no size limit in play, the frames are exactly the bodies.
        if max == tether_wire::DEFAULT_MAX_MESSAGE_SIZE {
            prop_assert_eq!(whole.len(), bodies.len());
            for (r, body) in whole.iter().zip(&bodies) {
                match r {
                    Ok(text) => prop_assert_eq!(text.as_bytes(), body.as_slice()),
                    Err(FrameError::Empty) => prop_assert!(body.is_empty()),
                    Err(FrameError::InvalidUtf8) => prop_assert!(std::str::from_utf8(body).is_err()),
                    Err(e) => prop_assert!(false, "unexpected {e}"),
                }
            }
            prop_assert_eq!(whole_left, Some(tail.len()));
        }
    }

    #[test]
    fn framed_messages_parse_however_chunked(
        messages in prop::collection::vec(arb_message(), 1..8),
        points in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let mut stream = Vec::new();
        for m in &messages {
            tether_wire::encode_frame(&m.encode(), &mut stream);
        }
        let (frames, left) = frame_all(tether_wire::DEFAULT_MAX_MESSAGE_SIZE, split_at_points(&stream, &points));
        prop_assert_eq!(left, Some(0));
        let parsed: Vec<Message> = frames
            .into_iter()
            .map(|f| Message::parse(&f.unwrap()).unwrap())
            .collect();
        prop_assert_eq!(parsed, messages);
    }
}
