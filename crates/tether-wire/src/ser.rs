//! The mdsf serializer (compact "record serialization"), byte-compatible with `mdsf.stringify`.
//!
//! The output has no whitespace. Objects are `{key:value,…}` with bare identifier keys, strings
//! are single-quoted with JSON-style escapes plus `\'`, numbers are written as ECMAScript's
//! `Number#toString` writes them, and `Undefined` array elements become holes (`[1,,3]`).
//!
//! ```
//! use tether_wire::{ser::stringify, Object, Value};
//!
//! let mut o = Object::new();
//! o.insert("b-c", Value::from(2));
//! o.insert("7", Value::from(5));
//! o.insert("ok", Value::Array(vec![1.into(), Value::Undefined, Value::Null, 0.5.into()]));
//! assert_eq!(stringify(&Value::Object(o)).unwrap(), "{'7':5,'b-c':2,ok:[1,,null,0.5]}");
//! ```
//!
//! Serialization recurses once per nesting level; values produced by [`crate::parse()`] are at
//! most [`crate::parse::MAX_DEPTH`] deep, but a hand-built value nested tens of thousands of
//! levels deep can exhaust the stack.

use crate::value::{Object, Value};
use thiserror::Error;

/// Why a value cannot be sent to a JS peer.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SerializeError {
    /// `NaN` or `±Infinity`: Node's parser cannot read them back.
    #[error("non-finite number {0} cannot be sent to a JSTP peer")]
    NonFinite(f64),
}

/// Serializes `value`, refusing non-finite numbers anywhere inside it.
///
/// A top-level `Undefined` gives the word `undefined`, as `mdsf.stringify(undefined)` does.
pub fn stringify(value: &Value) -> Result<String, SerializeError> {
    check_finite(value)?;
    let mut out = String::new();
    write_value(value, &mut out);
    Ok(out)
}

/// The first non-finite number inside `value`, as an error.
fn check_finite(value: &Value) -> Result<(), SerializeError> {
    match value {
        Value::Number(n) if !n.is_finite() => Err(SerializeError::NonFinite(*n)),
        Value::Array(items) => items.iter().try_for_each(check_finite),
        // Properties holding `Undefined` are skipped by the writer, and cannot hold numbers.
        Value::Object(obj) => obj.0.iter().try_for_each(|(_, v)| check_finite(v)),
        _ => Ok(()),
    }
}

/// Appends the compact serialization of `value` to `out`.
///
/// A top-level `Undefined` writes the word `undefined`; inside arrays `Undefined` elements are
/// written as holes (nothing between the commas), and object properties holding `Undefined`
/// are left out. Non-finite numbers write `NaN`/`Infinity`/`-Infinity` (use [`stringify()`] to
/// refuse them).
pub fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Undefined => out.push_str("undefined"),
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(*n, out),
        Value::String(s) => write_string_literal(s, out),
        Value::Utf16(units) => write_utf16_literal(units, out),
        Value::Array(items) => write_array(items, out),
        Value::Object(obj) => write_object(obj, out),
    }
}

/// Appends `items` as an array literal: `[a,b]`, with `Undefined` elements left as holes
/// (`[1,,3]`; `[undefined]` gives `[]` and `[undefined,undefined]` gives `[,]`).
pub fn write_array(items: &[Value], out: &mut String) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if !matches!(item, Value::Undefined) {
            write_value(item, out);
        }
    }
    out.push(']');
}

/// Appends `n` exactly as ECMAScript's `Number#toString` formats it (`-0` gives `0`,
/// `1e21` gives `1e+21`, non-finite numbers give `NaN`, `Infinity`, `-Infinity`).
pub fn write_number(n: f64, out: &mut String) {
    let mut buf = ryu_js::Buffer::new();
    out.push_str(buf.format(n));
}

fn write_object(obj: &Object, out: &mut String) {
    out.push('{');
    let mut first = true;
    let mut write_prop = |key: &str, value: &Value, out: &mut String| {
        if matches!(value, Value::Undefined) {
            return;
        }
        if !first {
            out.push(',');
        }
        first = false;
        write_key(key, out);
        out.push(':');
        write_value(value, out);
    };
    // JS own-property order: array-index keys ascending, then the others in insertion order.
    let mut indexed: Vec<(u32, &str, &Value)> = obj
        .0
        .iter()
        .filter_map(|(k, v)| array_index(k).map(|i| (i, k.as_str(), v)))
        .collect();
    if indexed.is_empty() {
        for (k, v) in &obj.0 {
            write_prop(k, v, out);
        }
    } else {
        indexed.sort_by_key(|&(i, _, _)| i);
        for &(_, k, v) in &indexed {
            write_prop(k, v, out);
        }
        for (k, v) in obj.0.iter().filter(|(k, _)| array_index(k).is_none()) {
            write_prop(k, v, out);
        }
    }
    out.push('}');
}

/// Writes an object key: bare when [`is_bare_key`], else as a quoted string literal.
pub fn write_key(key: &str, out: &mut String) {
    if is_bare_key(key) {
        out.push_str(key);
    } else {
        write_string_literal(key, out);
    }
}

/// The array index a key denotes, if it is a canonical one: `0`, or digits without a leading
/// zero, at most 2³²−2. Such keys are enumerated first by JS engines.
pub fn array_index(key: &str) -> Option<u32> {
    let bytes = key.as_bytes();
    if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    let n: u64 = key.parse().ok()?;
    if n <= u64::from(u32::MAX - 1) {
        Some(n as u32)
    } else {
        None
    }
}

/// Appends `s` as a single-quoted string literal with upstream's escapes.
///
/// These are `JSON.stringify`'s escapes (`\"`, `\\`, `\b \f \n \r \t`, other C0 controls as
/// `\u00xx` in lowercase hex), plus `\'` for the quote; everything else, DEL, `/`, U+2028 and
/// U+2029 included, is written raw.
pub fn write_string_literal(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('\'');
    write_escaped(s, out);
    out.push('\'');
}

/// The body of a string literal: `s` with the escapes [`write_string_literal`] lists.
fn write_escaped(s: &str, out: &mut String) {
    let bytes = s.as_bytes();
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &str = match b {
            b'\'' => "\\'",
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Only ASCII bytes get here, so `i` is a char boundary.
        out.push_str(&s[run_start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push_str(escape);
        }
        run_start = i + 1;
    }
    out.push_str(&s[run_start..]);
}

/// Appends UTF-16 code units as a quoted string literal: well-formed runs as
/// [`write_string_literal`] writes them, each unpaired surrogate as a `\uXXXX` escape (what
/// `JSON.stringify` writes for one), so a peer parses back the same code units.
pub fn write_utf16_literal(units: &[u16], out: &mut String) {
    out.push('\'');
    let mut run = String::new();
    for unit in char::decode_utf16(units.iter().copied()) {
        match unit {
            Ok(c) => run.push(c),
            Err(e) => {
                write_escaped(&run, out);
                run.clear();
                out.push_str(&format!("\\u{:04x}", e.unpaired_surrogate()));
            }
        }
    }
    write_escaped(&run, out);
    out.push('\'');
}

/// Whether `key` may be written bare: `^[a-zA-Z_$][\w$]*$`, ASCII only.
pub fn is_bare_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b'$' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &Value) -> String {
        v.to_mdsf()
    }

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Object(Object(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ))
    }

    #[test]
    fn numbers_like_number_to_string() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-1.0, "-1"),
            (1.5, "1.5"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-7, "1e-7"),
            (1e-6, "0.000001"),
            (1.23e-18, "1.23e-18"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for &(n, want) in cases {
            assert_eq!(s(&Value::Number(n)), want, "{n:?}");
        }
    }

    #[test]
    fn string_escapes() {
        let cases: &[(&str, &str)] = &[
            ("", "''"),
            ("it's", r"'it\'s'"),
            ("say \"hi\"", r#"'say \"hi\"'"#),
            ("a\\b", r"'a\\b'"),
            ("\u{8}\u{c}\n\r\t", r"'\b\f\n\r\t'"),
            ("\u{0}\u{b}\u{1f}\u{1}", r"'\u0000\u000b\u001f\u0001'"),
            ("\u{7f}/\u{2028}\u{2029}", "'\u{7f}/\u{2028}\u{2029}'"),
            ("é … 😀", "'é … 😀'"),
        ];
        for &(input, want) in cases {
            let mut out = String::new();
            write_string_literal(input, &mut out);
            assert_eq!(out, want, "{input:?}");
        }
    }

    #[test]
    fn bare_keys() {
        for k in ["a", "_x", "$", "$x", "A1_$", "handshake"] {
            assert!(is_bare_key(k), "{k}");
        }
        for k in ["", "1a", "b-c", "a b", "é", "x\u{e9}", "7", "-1"] {
            assert!(!is_bare_key(k), "{k}");
        }
    }

    #[test]
    fn array_index_keys() {
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("7"), Some(7));
        assert_eq!(array_index("4294967294"), Some(u32::MAX - 1));
        for k in [
            "",
            "01",
            "-1",
            "1.5",
            "+1",
            "4294967295",
            "99999999999",
            "1e3",
            " 1",
        ] {
            assert_eq!(array_index(k), None, "{k}");
        }
    }

    #[test]
    fn arrays_with_holes() {
        let u = Value::Undefined;
        assert_eq!(s(&Value::Array(vec![])), "[]");
        assert_eq!(s(&Value::Array(vec![u.clone()])), "[]");
        assert_eq!(s(&Value::Array(vec![u.clone(), u.clone()])), "[,]");
        assert_eq!(
            s(&Value::Array(vec![1.into(), u.clone(), 3.into()])),
            "[1,,3]"
        );
        assert_eq!(s(&Value::Array(vec![1.into(), u.clone()])), "[1,]");
        assert_eq!(s(&u), "undefined");
        assert_eq!(stringify(&u).unwrap(), "undefined");
    }

    #[test]
    fn objects_order_and_omit() {
        let v = obj(&[
            ("a", 1.into()),
            ("skip", Value::Undefined),
            ("4294967295", 2.into()),
            ("10", 3.into()),
            ("2", 4.into()),
        ]);
        assert_eq!(s(&v), "{'2':4,'10':3,a:1,'4294967295':2}");
        assert_eq!(s(&obj(&[("x", Value::Undefined)])), "{}");
        assert_eq!(
            s(&obj(&[("x", Value::Undefined), ("y", Value::Null)])),
            "{y:null}"
        );
    }

    #[test]
    fn stringify_refuses_non_finite_anywhere() {
        let nested = obj(&[(
            "a",
            Value::Array(vec![1.into(), obj(&[("b", f64::NAN.into())])]),
        )]);
        assert!(matches!(stringify(&nested), Err(SerializeError::NonFinite(n)) if n.is_nan()));
        assert_eq!(
            stringify(&Value::Number(f64::NEG_INFINITY)),
            Err(SerializeError::NonFinite(f64::NEG_INFINITY))
        );
        assert_eq!(s(&nested), "{a:[1,{b:NaN}]}");
        assert_eq!(stringify(&obj(&[("a", 1.5.into())])).unwrap(), "{a:1.5}");
    }
}
