//! The JS-like value model carried by JSTP messages.

use std::fmt;

/// A value as a JavaScript peer sees it: what mdsf can serialize and parse.
///
/// `Undefined` exists because the format has it: array holes (`[1,,3]`) parse as `Undefined`,
/// and `Undefined` array elements serialize as holes.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// JS `undefined`: a hole in an array, or the bare word `undefined`.
    #[default]
    Undefined,
    /// JS `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A JS number (IEEE-754 double).
    Number(f64),
    /// A string.
    String(String),
    /// A string holding at least one unpaired UTF-16 surrogate (`'\ud800x'`), as UTF-16 code
    /// units. JS strings are UTF-16 and may hold lone surrogates, which a Rust `String` cannot;
    /// keeping them here lets such a string round-trip exactly, as it does through
    /// `@metarhia/jstp`. The parser produces this only for such strings (every well-formed
    /// string is a [`Value::String`]); build one with [`Value::from_utf16`], which keeps the
    /// same rule.
    Utf16(Vec<u16>),
    /// An array; may contain `Undefined` holes.
    Array(Vec<Value>),
    /// An object, with its properties in wire order.
    Object(Object),
}

/// An object's properties in the order they appeared on the wire (or were inserted).
///
/// The serializer writes integer-like keys first, as a JS engine would enumerate them, so output
/// is byte-identical to what Node would send for the same object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object(pub Vec<(String, Value)>);

impl Object {
    /// An empty object.
    pub fn new() -> Self {
        Object(Vec::new())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key`, replacing an existing value in place (JS assignment keeps the key position).
    pub fn insert(&mut self, key: impl Into<String>, value: Value) {
        let key = key.into();
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.0.push((key, value));
        }
    }

    /// Number of properties.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no properties.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over `(key, value)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl FromIterator<(String, Value)> for Object {
    fn from_iter<T: IntoIterator<Item = (String, Value)>>(iter: T) -> Self {
        let mut obj = Object::new();
        for (k, v) in iter {
            obj.insert(k, v);
        }
        obj
    }
}

impl Value {
    /// A string from UTF-16 code units: a [`Value::String`] when they are well-formed, else a
    /// [`Value::Utf16`] keeping the lone surrogates.
    pub fn from_utf16(units: &[u16]) -> Value {
        match String::from_utf16(units) {
            Ok(s) => Value::String(s),
            Err(_) => Value::Utf16(units.to_vec()),
        }
    }

    /// The string, if this is a string of valid Unicode ([`Value::Utf16`] gives `None`; use
    /// [`Value::to_js_string`] for a lossy form).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The number as an integer, if it is a number with no fractional part that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            // i64's range is [-2^63, 2^63); both bounds are exact doubles.
            Value::Number(n)
                if n.fract() == 0.0 && *n >= (i64::MIN as f64) && *n < -(i64::MIN as f64) =>
            {
                Some(*n as i64)
            }
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The object, if this is an object.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// JS truthiness: `undefined`, `null`, `false`, `0`, `NaN` and `''` are falsy.
    pub fn is_truthy(&self) -> bool {
        match self {
            Value::Undefined | Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => *n != 0.0 && !n.is_nan(),
            Value::String(s) => !s.is_empty(),
            Value::Utf16(units) => !units.is_empty(),
            Value::Array(_) | Value::Object(_) => true,
        }
    }

    /// ECMAScript's `ToString`, as a template literal or `String(v)` gives it: arrays join
    /// their items with `,` (`null` and `undefined` items as empty), objects are
    /// `[object Object]`, numbers as `Number#toString`.
    pub fn to_js_string(&self) -> String {
        match self {
            Value::Undefined => "undefined".into(),
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => {
                let mut out = String::new();
                crate::ser::write_number(*n, &mut out);
                out
            }
            Value::String(s) => s.clone(),
            // A Rust string cannot hold the lone surrogates: they become U+FFFD here.
            Value::Utf16(units) => String::from_utf16_lossy(units),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::Undefined | Value::Null => String::new(),
                    other => other.to_js_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            Value::Object(_) => "[object Object]".into(),
        }
    }

    /// ECMAScript's `ToNumber`, as arithmetic applies it: `null` → 0, `undefined` → NaN,
    /// booleans → 0/1, strings parsed after trimming (empty → 0, `0x`/`0o`/`0b` prefixes,
    /// `Infinity`; anything else NaN), arrays through their string, objects NaN.
    pub fn to_js_number(&self) -> f64 {
        match self {
            Value::Undefined | Value::Object(_) => f64::NAN,
            Value::Null => 0.0,
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Number(n) => *n,
            Value::String(s) => js_string_to_number(s),
            Value::Utf16(_) | Value::Array(_) => js_string_to_number(&self.to_js_string()),
        }
    }

    /// Serializes in mdsf compact form. Non-finite numbers are written as `NaN`/`Infinity`
    /// (use [`crate::ser::stringify`] to refuse them).
    pub fn to_mdsf(&self) -> String {
        let mut out = String::new();
        crate::ser::write_value(self, &mut out);
        out
    }
}

/// `ToNumber` applied to a string (ECMAScript's StringToNumber).
fn js_string_to_number(s: &str) -> f64 {
    // JS trims its own whitespace set, which includes what `char::is_whitespace` covers and
    // the BOM.
    let t = s.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if t.is_empty() {
        return 0.0;
    }
    let radix = |p: &str, r: u32| {
        t.strip_prefix(p)
            .or_else(|| t.strip_prefix(&p.to_ascii_uppercase()))
            .map(|digits| {
                if digits.is_empty() {
                    return f64::NAN;
                }
                digits
                    .chars()
                    .try_fold(0f64, |acc, c| {
                        c.to_digit(r).map(|d| acc * f64::from(r) + f64::from(d))
                    })
                    .unwrap_or(f64::NAN)
            })
    };
    if let Some(n) = radix("0x", 16)
        .or_else(|| radix("0o", 8))
        .or_else(|| radix("0b", 2))
    {
        return n;
    }
    let (sign, body) = match t.as_bytes()[0] {
        b'-' => (-1.0, &t[1..]),
        b'+' => (1.0, &t[1..]),
        _ => (1.0, t),
    };
    if body == "Infinity" {
        return sign * f64::INFINITY;
    }
    // Rust also takes `inf`, `nan` and `infinity`; JS takes none of them. A JS numeric
    // literal is digits, an optional fraction and an optional exponent.
    let numeric = body
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    let starts_well = body.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if !numeric || !starts_well || !body.bytes().any(|b| b.is_ascii_digit()) {
        return f64::NAN;
    }
    body.parse::<f64>().map_or(f64::NAN, |n| sign * n)
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_mdsf())
    }
}

macro_rules! from_number {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(n: $t) -> Self { Value::Number(n as f64) }
        }
    )*};
}
from_number!(i8, i16, i32, i64, u8, u16, u32, u64, usize, isize, f32, f64);

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::Array(v.into_iter().map(Into::into).collect())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}
impl From<Object> for Value {
    fn from(o: Object) -> Self {
        Value::Object(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_coercions_follow_ecmascript() {
        let num = |v: Value| v.to_js_number();
        assert_eq!(num(Value::from("20")), 20.0);
        assert_eq!(num(Value::from(" 2.5e1 ")), 25.0);
        assert_eq!(num(Value::from("")), 0.0);
        assert_eq!(num(Value::from("0x1f")), 31.0);
        assert_eq!(num(Value::from("-Infinity")), f64::NEG_INFINITY);
        assert!(num(Value::from("inf")).is_nan());
        assert!(num(Value::from("1,2")).is_nan());
        assert!(num(Value::from("--1")).is_nan());
        assert_eq!(num(Value::Null), 0.0);
        assert_eq!(num(Value::from(true)), 1.0);
        assert!(num(Value::Undefined).is_nan());
        assert_eq!(num(Value::from(vec![5])), 5.0);
        assert_eq!(num(Value::Array(vec![])), 0.0);
        assert!(num(Value::from(vec![1, 2])).is_nan());
        let text = |v: Value| v.to_js_string();
        assert_eq!(text(Value::from(vec![1, 2])), "1,2");
        assert_eq!(
            text(Value::Array(vec![
                Value::Null,
                Value::from(1.5),
                Value::Undefined
            ])),
            ",1.5,"
        );
        assert_eq!(text(Value::Object(Object::new())), "[object Object]");
        assert_eq!(text(Value::from(1e21)), "1e+21");
        assert_eq!(text(Value::Undefined), "undefined");
    }

    #[test]
    fn as_i64_only_for_integers_in_range() {
        assert_eq!(Value::from(42).as_i64(), Some(42));
        assert_eq!(Value::from(-0.0).as_i64(), Some(0));
        assert_eq!(Value::from(1.5).as_i64(), None);
        assert_eq!(Value::from(f64::NAN).as_i64(), None);
        assert_eq!(Value::from(f64::INFINITY).as_i64(), None);
        assert_eq!(Value::from(i64::MIN as f64).as_i64(), Some(i64::MIN));
        assert_eq!(Value::from(-(i64::MIN as f64)).as_i64(), None);
        assert_eq!(Value::from(9.25e18).as_i64(), None);
        assert_eq!(Value::from("1").as_i64(), None);
    }
}
