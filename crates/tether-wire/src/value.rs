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
    /// The string, if this is a string.
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
            Value::Array(_) | Value::Object(_) => true,
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
