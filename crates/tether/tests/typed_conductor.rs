//! Typed conductor payloads (`tether::conductor::{to_payload, from_payload, to_nested,
//! from_nested}`): property tests of user structs, enums, options, maps and 64-bit integers
//! through MessagePack values and bytes; typed requests and handlers against our server; and
//! typed requests, nested payloads and signals through the Node `ws` + `@msgpack/msgpack`
//! server (interop/conductor-peer.mjs).

mod common;

use common::{within, LIMIT};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use tether::conductor::{
    from_nested, from_payload, to_nested, to_payload, typed_handler, ConductorConnection,
    ConductorError, ConductorOptions, ConductorServer, PayloadError, TypedConductor,
    TypedRequestError, Value,
};
use tether_wire::conductor::{from_bytes, to_bytes};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Dot,
    Circle(f64),
    Rect { w: u32, h: u32 },
    Path(Vec<(i64, i64)>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    id: u64,
    delta: i64,
    name: String,
    note: Option<String>,
    shapes: Vec<Shape>,
    counts: BTreeMap<String, u32>,
    #[serde(with = "serde_bytes")]
    hash: Vec<u8>,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Dot),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
            .prop_map(Shape::Circle),
        (any::<u32>(), any::<u32>()).prop_map(|(w, h)| Shape::Rect { w, h }),
        prop::collection::vec(any::<(i64, i64)>(), 0..4).prop_map(Shape::Path),
    ]
}

prop_compose! {
    fn entry()(
        id in any::<u64>(),
        delta in any::<i64>(),
        name in ".*",
        note in prop::option::of(".*"),
        shapes in prop::collection::vec(shape(), 0..4),
        counts in prop::collection::btree_map(".*", any::<u32>(), 0..4),
        hash in prop::collection::vec(any::<u8>(), 0..40),
    ) -> Entry {
        Entry { id, delta, name, note, shapes, counts, hash }
    }
}

proptest! {
    /// A value, its MessagePack bytes and the value read back: equal, with all 64 bits of
    /// every integer (unlike JSTP, MessagePack has them).
    #[test]
    fn user_structs_round_trip_through_values_and_bytes(e in entry()) {
        let v = to_payload(&e).unwrap();
        let back: Entry = from_payload(from_bytes(&to_bytes(&v)).unwrap()).unwrap();
        prop_assert_eq!(back, e.clone());
        // A struct is a map keyed by field name, in declaration order.
        let keys: Vec<_> = v.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap()).collect();
        prop_assert_eq!(keys, ["id", "delta", "name", "note", "shapes", "counts", "hash"]);
        // Bytes marked `serde_bytes` are a `bin`.
        let hash = &v.as_map().unwrap()[6].1;
        prop_assert!(matches!(hash, Value::Binary(_)), "{:?}", hash);
    }

    /// The nested form (bytes inside the envelope, as zome call payloads and app signals):
    /// the same value comes back.
    #[test]
    fn nested_payloads_round_trip(e in entry(), extra in any::<Option<u64>>()) {
        let nested = to_nested(&(&e, extra)).unwrap();
        let Value::Binary(bytes) = &nested else { panic!("{nested:?}") };
        prop_assert_eq!(from_bytes(bytes).unwrap(), to_payload(&(&e, extra)).unwrap());
        let back: (Entry, Option<u64>) = from_nested(nested.clone()).unwrap();
        prop_assert_eq!(back, (e, extra));
        // A JS client's `number[]` of bytes reads the same.
        let as_array = Value::Array(bytes.iter().map(|b| Value::from(*b)).collect());
        let back: (Entry, Option<u64>) = from_nested(as_array).unwrap();
        prop_assert_eq!(back.1, extra);
    }

    /// Options and maps with integer keys.
    #[test]
    fn options_and_integer_keyed_maps_round_trip(
        m in prop::collection::btree_map(any::<i64>(), prop::option::of(any::<bool>()), 0..6),
    ) {
        let back: BTreeMap<i64, Option<bool>> = from_payload(to_payload(&m).unwrap()).unwrap();
        prop_assert_eq!(back, m);
    }
}

#[test]
fn what_does_not_fit_is_a_typed_error() {
    // 128-bit integers are their 16 big-endian bytes, as rmp_serde writes them.
    let wide = u64::MAX as u128 + 1;
    let v = to_payload(&wide).unwrap();
    assert_eq!(v, Value::Binary(wide.to_be_bytes().to_vec()));
    assert_eq!(from_payload::<u128>(v).unwrap(), wide);
    // Wrong type, and which field is missing.
    let e = from_payload::<Entry>(Value::from("x")).unwrap_err();
    assert!(matches!(e, PayloadError::Decode(_)), "{e}");
    let e = from_payload::<Entry>(Value::Map(vec![("id".into(), 1.into())])).unwrap_err();
    assert!(e.to_string().contains("delta"), "{e}");
    // A nested payload must be bytes of one MessagePack value.
    assert!(matches!(
        from_nested::<u8>(Value::from(3)),
        Err(PayloadError::NotBytes {
            found: "an integer"
        })
    ));
    assert!(matches!(
        from_nested::<u8>(Value::Binary(vec![0xc1])),
        Err(PayloadError::Nested(_))
    ));
    assert!(matches!(
        from_nested::<u8>(Value::Array(vec![300.into()])),
        Err(PayloadError::NotBytes { .. })
    ));
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Divide {
    a: f64,
    b: f64,
}

/// Typed handlers on our server, typed requests from our client: results, the handler's own
/// error, and arguments that do not decode answered as the conductor's `deserialization`.
#[tokio::test]
async fn typed_requests_to_typed_handlers() {
    let server = ConductorServer::builder()
        .handler(
            "divide",
            typed_handler(|Divide { a, b }| async move {
                if b == 0.0 {
                    return Err(("internal_error".to_owned(), "Zero division".to_owned()));
                }
                Ok(a / b)
            }),
        )
        .handler(
            "entry",
            typed_handler(|e: Entry| async move { Ok::<_, (String, String)>((e.id, e)) }),
        )
        .build();
    let addr = within(LIMIT, "a conductor listener", server.listen("127.0.0.1:0"))
        .await
        .unwrap();
    let conn = ConductorConnection::new(addr.as_str(), ConductorOptions::default()).unwrap();
    within(LIMIT, "open", conn.open(None)).await.unwrap();

    let q: f64 = within(
        LIMIT,
        "divide",
        conn.request_typed("divide", &Divide { a: 20.0, b: 8.0 }, None),
    )
    .await
    .unwrap();
    assert_eq!(q, 2.5);
    let e = entry_fixture();
    let (id, back): (u64, Entry) = within(LIMIT, "entry", conn.request_typed("entry", &e, None))
        .await
        .unwrap();
    assert_eq!((id, back), (u64::MAX, e));

    match within(
        LIMIT,
        "divide by zero",
        conn.request_typed::<f64>("divide", &Divide { a: 1.0, b: 0.0 }, None),
    )
    .await
    {
        Err(TypedRequestError::Request(ConductorError::Remote { kind, message })) => {
            assert_eq!(
                (kind.as_str(), message.as_str()),
                ("internal_error", "Zero division")
            )
        }
        other => panic!("{other:?}"),
    }
    match within(
        LIMIT,
        "divide with a string",
        conn.request_typed::<f64>("divide", &"twenty", None),
    )
    .await
    {
        Err(TypedRequestError::Request(ConductorError::Remote { kind, message })) => {
            assert_eq!(kind, "deserialization");
            assert!(message.contains("invalid type"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Our side: arguments that cannot encode are not sent; a result of the wrong type is
    // reported as such.
    let refused = conn.request_typed::<f64>("divide", &Refuses, None).await;
    assert!(
        matches!(
            refused,
            Err(TypedRequestError::Arguments(PayloadError::Encode(_)))
        ),
        "{refused:?}"
    );
    assert!(matches!(
        within(
            LIMIT,
            "divide read as a string",
            conn.request_typed::<String>("divide", &Divide { a: 1.0, b: 2.0 }, None),
        )
        .await,
        Err(TypedRequestError::Result(PayloadError::Decode(_)))
    ));
    within(LIMIT, "close", conn.close(None)).await.unwrap();
}

/// A value whose `Serialize` fails.
struct Refuses;

impl Serialize for Refuses {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refused"))
    }
}

fn entry_fixture() -> Entry {
    Entry {
        id: u64::MAX,
        delta: i64::MIN,
        name: "ünï 'q'".into(),
        note: None,
        shapes: vec![
            Shape::Dot,
            Shape::Circle(0.5),
            Shape::Rect { w: 3, h: 4 },
            Shape::Path(vec![(1, -2)]),
        ],
        counts: [("a".to_owned(), 1), ("b".to_owned(), 2)].into(),
        hash: vec![0, 1, 254, 255],
    }
}

/// The Node `ws` + `@msgpack/msgpack` server echoes our typed payloads and signals them back:
/// a struct with safe integers decodes and re-encodes as itself; a nested payload (bytes) is
/// opaque to it, so even `u64::MAX` inside comes back exactly.
#[tokio::test]
async fn typed_payloads_through_their_msgpack_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    assert!(
        dir.join("node_modules/@msgpack/msgpack").exists(),
        "interop/node_modules is missing: run `npm ci --ignore-scripts` in interop/"
    );
    let mut node = Command::new("node")
        .arg(dir.join("conductor-peer.mjs"))
        .arg("server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node is not installed");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let ready = within(LIMIT, "the node server's ready line", lines.next_line())
        .await
        .unwrap()
        .expect("the node server ended");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let port = ready["port"].as_u64().unwrap();
    let conn = ConductorConnection::new(
        format!("127.0.0.1:{port}").as_str(),
        ConductorOptions::default(),
    )
    .unwrap();
    within(LIMIT, "open", conn.open(None)).await.unwrap();

    // JS numbers: keep the integers within 2^53 for the part Node decodes.
    let mut e = entry_fixture();
    e.id = (1 << 53) - 1;
    e.delta = -(1 << 53) + 1;
    let back: Entry = within(LIMIT, "their echo", conn.request_typed("echo", &e, None))
        .await
        .unwrap();
    assert_eq!(back, e);

    let full = entry_fixture();
    let nested = to_nested(&full).unwrap();
    let back: Value = within(
        LIMIT,
        "their echo of a nested payload",
        conn.request_typed("echo", &nested, None),
    )
    .await
    .unwrap();
    assert_eq!(from_nested::<Entry>(back).unwrap(), full);

    let mut signals = conn.signals();
    let sent: String = within(
        LIMIT,
        "their signal",
        conn.request_typed("signal", &Divide { a: 1.5, b: -2.0 }, None),
    )
    .await
    .unwrap();
    assert_eq!(sent, "sent");
    let signal = within(LIMIT, "the signal", signals.recv()).await.unwrap();
    assert_eq!(
        from_payload::<Divide>(signal).unwrap(),
        Divide { a: 1.5, b: -2.0 }
    );
    within(LIMIT, "close", conn.close(None)).await.unwrap();
}
