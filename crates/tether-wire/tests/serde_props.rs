//! serde for `Value`: user types round-trip through `Value` and through the wire text
//! (`to_mdsf` then `parse`), and JSTP's rules hold — integers past 2^53 − 1 and non-finite
//! numbers are refused, `None` is `null`, key order is kept, argument counts are exact.

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use tether_wire::serde_value::MAX_SAFE_INTEGER;
use tether_wire::{
    from_args, from_value, parse, to_args, to_value, PathSegment, Value, ValueErrorKind,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Empty,
    Circle(f64),
    Rect(u32, u32),
    Labelled { name: String, sides: Option<u8> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    flags: Vec<bool>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: i64,
    small: u8,
    ratio: f64,
    name: String,
    nickname: Option<String>,
    shapes: Vec<Shape>,
    scores: BTreeMap<String, i32>,
    by_number: HashMap<u32, String>,
    inner: Inner,
    pair: (i16, char),
}

fn safe_i64() -> impl Strategy<Value = i64> {
    let max = MAX_SAFE_INTEGER as i64;
    prop_oneof![-max..=max, Just(max), Just(-max), Just(0)]
}

fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |n| n.is_finite())
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Empty),
        finite().prop_map(Shape::Circle),
        (any::<u32>(), any::<u32>()).prop_map(|(w, h)| Shape::Rect(w, h)),
        (any::<String>(), any::<Option<u8>>())
            .prop_map(|(name, sides)| Shape::Labelled { name, sides }),
    ]
}

prop_compose! {
    fn user()(
        id in safe_i64(),
        small in any::<u8>(),
        ratio in finite(),
        name in any::<String>(),
        nickname in any::<Option<String>>(),
        shapes in prop::collection::vec(shape(), 0..4),
        scores in prop::collection::btree_map(any::<String>(), any::<i32>(), 0..4),
        by_number in prop::collection::hash_map(any::<u32>(), any::<String>(), 0..4),
        flags in prop::collection::vec(any::<bool>(), 0..4),
        text in any::<String>(),
        pair in (any::<i16>(), any::<char>()),
    ) -> User {
        User { id, small, ratio, name, nickname, shapes, scores, by_number,
               inner: Inner { flags, text }, pair }
    }
}

/// Through `Value`, and through the text a peer would receive.
fn round_trips<T>(x: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let v = to_value(x).map_err(|e| TestCaseError::fail(format!("to_value: {e}")))?;
    let back: T = from_value(v.clone()).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(&back, x);
    let text = v.to_mdsf();
    let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    let back: T = from_value(parsed).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
    prop_assert_eq!(&back, x, "via {}", text);
    Ok(())
}

proptest! {
    #[test]
    fn user_structs_round_trip(u in user()) {
        round_trips(&u)?;
    }

    #[test]
    fn enums_options_and_maps_round_trip(
        shapes in prop::collection::vec(shape(), 0..6),
        opt in any::<Option<Option<()>>>().prop_map(|o| o.map(|_| 1.5f64)),
        map in prop::collection::btree_map(any::<String>(), any::<Option<i32>>(), 0..6),
    ) {
        round_trips(&shapes)?;
        round_trips(&opt)?;
        round_trips(&map)?;
    }

    #[test]
    fn i64_within_2_pow_53_round_trips_and_past_it_is_refused(n in any::<i64>()) {
        let safe = n.unsigned_abs() <= MAX_SAFE_INTEGER;
        match to_value(&n) {
            Ok(v) => {
                prop_assert!(safe, "{} was accepted", n);
                prop_assert_eq!(from_value::<i64>(v).unwrap(), n);
            }
            Err(e) => {
                prop_assert!(!safe, "{} was refused: {}", n, e);
                prop_assert_eq!(e.kind(), &ValueErrorKind::UnsafeInteger(n.to_string()));
            }
        }
    }

    #[test]
    fn u64_i128_u128_are_checked_too(n in any::<u64>(), wide in any::<i128>(), uwide in any::<u128>()) {
        prop_assert_eq!(to_value(&n).is_ok(), n <= MAX_SAFE_INTEGER);
        prop_assert_eq!(to_value(&wide).is_ok(), wide.unsigned_abs() <= u128::from(MAX_SAFE_INTEGER));
        prop_assert_eq!(to_value(&uwide).is_ok(), uwide <= u128::from(MAX_SAFE_INTEGER));
        let small = n & MAX_SAFE_INTEGER;
        prop_assert_eq!(from_value::<u128>(to_value(&small).unwrap()).unwrap(), u128::from(small));
        prop_assert_eq!(from_value::<i128>(to_value(&(-(small as i128))).unwrap()).unwrap(), -(small as i128));
    }

    #[test]
    fn numbers_past_2_pow_53_on_the_wire_are_not_integers(n in (MAX_SAFE_INTEGER + 1)..u64::MAX) {
        // What a peer sends: a number whose text names an integer a double cannot hold.
        let v = parse(&n.to_string()).unwrap();
        let e = from_value::<u64>(v.clone()).unwrap_err();
        prop_assert!(matches!(e.kind(), ValueErrorKind::UnsafeInteger(_)), "{}", e);
        prop_assert!(from_value::<i64>(v.clone()).is_err());
        // As a float it is what it is.
        prop_assert_eq!(from_value::<f64>(v).unwrap(), n as f64);
    }

    #[test]
    fn a_wrong_argument_count_is_an_invalid_length(n in 0usize..6) {
        let args: Vec<Value> = (0..n).map(|i| Value::from(i as f64)).collect();
        let got = from_args::<(f64, f64)>(args);
        if n == 2 {
            prop_assert_eq!(got.unwrap(), (0.0, 1.0));
        } else {
            let e = got.unwrap_err();
            prop_assert!(matches!(e.kind(), ValueErrorKind::InvalidLength { found, .. } if *found == n), "{}", e);
        }
    }
}

#[test]
fn non_finite_numbers_are_refused_with_their_path() {
    for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = to_value(&n).unwrap_err();
        assert!(matches!(e.kind(), ValueErrorKind::NonFinite(_)), "{e}");
        let e = to_value(&Shape::Circle(n)).unwrap_err();
        assert_eq!(e.path(), vec![PathSegment::Key("Circle".into())]);
        let e = from_value::<f64>(Value::Number(n)).unwrap_err();
        assert!(matches!(e.kind(), ValueErrorKind::NonFinite(_)), "{e}");
    }
    assert!(to_value(&f32::NAN).is_err());
}

#[test]
fn key_order_is_the_declaration_or_insertion_order() {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Z {
        zeta: u8,
        alpha: u8,
        mid: u8,
    }
    let v = to_value(&Z {
        zeta: 1,
        alpha: 2,
        mid: 3,
    })
    .unwrap();
    assert_eq!(v.to_mdsf(), "{zeta:1,alpha:2,mid:3}");
    // A Value read through serde keeps the wire's order.
    let wire = parse("{b:1,a:[2,'x'],c:{y:1,x:2}}").unwrap();
    let again: Value = from_value(wire.clone()).unwrap();
    assert_eq!(again.to_mdsf(), "{b:1,a:[2,'x'],c:{y:1,x:2}}");
    assert_eq!(to_value(&wire).unwrap(), wire);
}

#[test]
fn none_is_null_and_absent_or_undefined_read_as_none() {
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct P {
        a: u8,
        b: Option<u8>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Q {
        a: u8,
        #[serde(skip_serializing_if = "Option::is_none")]
        b: Option<u8>,
    }
    assert_eq!(
        to_value(&P { a: 1, b: None }).unwrap().to_mdsf(),
        "{a:1,b:null}"
    );
    assert_eq!(to_value(&Q { a: 1, b: None }).unwrap().to_mdsf(), "{a:1}");
    // Node leaves out a property holding undefined; a `null` one stays.
    for text in ["{a:1}", "{a:1,b:null}", "{a:1,b:undefined}"] {
        let p: P = from_value(parse(text).unwrap()).unwrap();
        assert_eq!(p, P { a: 1, b: None }, "{text}");
    }
    // In an argument list None keeps its place (undefined would be a hole that a trailing
    // position loses on the wire).
    assert_eq!(
        Value::Array(to_args(&(1, None::<u8>)).unwrap()).to_mdsf(),
        "[1,null]"
    );
    // `()` is undefined: a method returning nothing answers `ok:[]`.
    assert_eq!(to_value(&()).unwrap(), Value::Undefined);
    assert_eq!(to_args(&()).unwrap(), Vec::<Value>::new());
    from_args::<()>(vec![]).unwrap();
    assert!(from_args::<()>(vec![Value::Null]).is_err());
}

#[test]
fn errors_say_where_and_why() {
    let wire = parse("{id:1,small:300,ratio:1,name:'n',nickname:null,shapes:[],scores:{},by_number:{},inner:{flags:[],text:''},pair:[1,'c']}").unwrap();
    let e = from_value::<User>(wire).unwrap_err();
    assert_eq!(e.path_text(), ".small");
    assert!(
        matches!(e.kind(), ValueErrorKind::InvalidValue { found, .. } if found.contains("300")),
        "{e}"
    );

    let wire = parse("{flags:[true,false,'yes'],text:''}").unwrap();
    let e = from_value::<Inner>(wire).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at .flags[2]: invalid type: string \"yes\", expected a boolean"
    );

    let e = from_value::<u8>(Value::Number(1.5)).unwrap_err();
    assert!(
        matches!(e.kind(), ValueErrorKind::InvalidType { .. }),
        "{e}"
    );

    let e = from_args::<(f64, String)>(vec![Value::from(1), Value::from(2)]).unwrap_err();
    assert_eq!(e.path(), vec![PathSegment::Index(1)]);

    let e = from_value::<Shape>(parse("'Hexagon'").unwrap()).unwrap_err();
    assert!(
        matches!(e.kind(), ValueErrorKind::UnknownVariant { variant, .. } if variant == "Hexagon"),
        "{e}"
    );

    let e = to_args(&5u8).unwrap_err();
    assert!(matches!(e.kind(), ValueErrorKind::NotAnArray(_)), "{e}");

    let mut bad = BTreeMap::new();
    bad.insert("k".to_owned(), vec![1u64, 1 << 60]);
    let e = to_value(&bad).unwrap_err();
    assert_eq!(e.path_text(), ".k[1]");
}

#[test]
fn enums_are_externally_tagged() {
    let v = to_value(&vec![
        Shape::Empty,
        Shape::Circle(2.5),
        Shape::Rect(1, 2),
        Shape::Labelled {
            name: "t".into(),
            sides: Some(3),
        },
    ])
    .unwrap();
    assert_eq!(
        v.to_mdsf(),
        "['Empty',{Circle:2.5},{Rect:[1,2]},{Labelled:{name:'t',sides:3}}]"
    );
}

/// A `Value` holding strings with lone UTF-16 surrogates goes through `to_value`/`from_value`
/// and argument lists exactly (so typed methods taking or returning `Value` echo what a Node
/// peer sent), while a `String` refuses such a string instead of replacing its surrogates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    raw: Value,
    list: Vec<Value>,
}

proptest! {
    #[test]
    fn lone_surrogates_survive_values_inside_user_types(
        units in prop::collection::vec(prop_oneof![Just(0xd800u16), Just(0xdfffu16), 0x20u16..0x7f], 0..12),
    ) {
        let s = Value::from_utf16(&units);
        let holder = Holder { raw: s.clone(), list: vec![s.clone(), Value::from(1)] };
        let v = to_value(&holder).unwrap();
        let back: Holder = from_value(v.clone()).unwrap();
        prop_assert_eq!(&back, &holder);
        // And through the wire text.
        let back: Holder = from_value(parse(&v.to_mdsf()).unwrap()).unwrap();
        prop_assert_eq!(&back, &holder);
        let args: (Value,) = from_args(to_args(&(&s,)).unwrap()).unwrap();
        prop_assert_eq!(&args.0, &s);
        prop_assert_eq!(from_value::<String>(s.clone()).is_ok(), matches!(s, Value::String(_)));
    }
}
