//! serde for [`Value`]: any `Serialize` type becomes a JSTP value and back, under JSTP's rules.
//!
//! - **Numbers are doubles.** An integer (`i64`, `u64`, `i128`, `u128`, …) whose magnitude is
//!   past `2^53 − 1` (JS's `Number.MAX_SAFE_INTEGER`) is an error both ways, never a silent
//!   rounding; so is a number with a fraction read into an integer type. `NaN` and `±Infinity`
//!   are refused, because a Node peer cannot parse them.
//! - **`undefined` and `null`.** `Option::None` becomes `null` (as `serde_json` does): it keeps
//!   its place in arrays and argument lists, where `undefined` would be a hole that a trailing
//!   position loses on the wire (`[1,undefined]` is written `[1,]`, which parses as `[1]`).
//!   Reading, both `null` and `undefined` — and an object property that is absent, which is what
//!   a Node peer sends for a property holding `undefined` — give `None`. To leave a `None`
//!   property off the wire entirely, as JS does for `undefined`, mark the field
//!   `#[serde(skip_serializing_if = "Option::is_none")]`. `()` becomes `undefined`, so a method
//!   returning `()` answers `ok:[]` as a JS function returning nothing does.
//! - **Objects keep their key order** (insertion order, as [`Object`] stores it). Map keys are
//!   strings; integer keys are written as their decimal text and read back from it.
//! - **Enums** are externally tagged, as in `serde_json`: `"Unit"`, `{Newtype:v}`,
//!   `{Tuple:[a,b]}`, `{Struct:{a:1}}`.
//!
//! Errors are [`ValueError`]s: what went wrong ([`ValueErrorKind`]) and where (the path of array
//! indices and object keys from the top).
//!
//! ```
//! use tether_wire::{from_value, to_value, Value};
//!
//! let v = to_value(&(20.5, "x", Some(3u8))).unwrap();
//! assert_eq!(v.to_mdsf(), "[20.5,'x',3]");
//! let back: (f64, String, Option<u8>) = from_value(v).unwrap();
//! assert_eq!(back, (20.5, "x".to_owned(), Some(3)));
//! assert!(to_value(&(1u64 << 53)).is_err());
//! ```

use crate::value::{Object, Value};
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};
use serde::ser::{self, Serialize, Serializer};
use std::cell::{Cell, RefCell};
use std::fmt;

/// `Number.MAX_SAFE_INTEGER`: the largest integer `n` such that `n` and `n + 1` are both exact
/// doubles. Integers past it in magnitude are refused.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Converts any `Serialize` value to a [`Value`].
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, ValueError> {
    value.serialize(ValueSerializer)
}

/// Converts a [`Value`] to any `DeserializeOwned` type.
pub fn from_value<T: de::DeserializeOwned>(value: Value) -> Result<T, ValueError> {
    T::deserialize(value)
}

/// Converts a tuple (or anything serializing to an array, or `()` for none) to call or event
/// arguments.
pub fn to_args<T: Serialize + ?Sized>(args: &T) -> Result<Vec<Value>, ValueError> {
    match to_value(args)? {
        Value::Array(items) => Ok(items),
        Value::Undefined => Ok(Vec::new()),
        other => Err(ValueError::new(ValueErrorKind::NotAnArray(describe(
            &other,
        )))),
    }
}

/// Converts call or event arguments to a tuple: the count must equal the tuple's length (`()`
/// takes none), as a JS function's arity is checked by `@metarhia/jstp`.
pub fn from_args<T: de::DeserializeOwned>(args: Vec<Value>) -> Result<T, ValueError> {
    T::deserialize(ArgsDeserializer(args))
}

/// A conversion between [`Value`] and a Rust type failed: what, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueError {
    /// Innermost segment first (pushed while the error unwinds).
    path: Vec<PathSegment>,
    kind: ValueErrorKind,
}

/// One step into a value: an array index or an object key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    /// An array element (or a call argument).
    Index(usize),
    /// An object property (or an enum variant's content).
    Key(String),
}

/// Why a conversion failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ValueErrorKind {
    /// An integer whose magnitude is past `2^53 − 1`: a JS number cannot hold it exactly.
    UnsafeInteger(String),
    /// `NaN` or `±Infinity`, which a Node peer cannot parse.
    NonFinite(f64),
    /// The value has the wrong type.
    InvalidType {
        /// What was there.
        found: String,
        /// What the Rust type wants.
        expected: String,
    },
    /// The value has the right type but an unacceptable value (e.g. 300 for a `u8`).
    InvalidValue {
        /// What was there.
        found: String,
        /// What the Rust type wants.
        expected: String,
    },
    /// An array (or argument list) of the wrong length.
    InvalidLength {
        /// The length there was.
        found: usize,
        /// What the Rust type wants.
        expected: String,
    },
    /// An enum variant the Rust type does not have.
    UnknownVariant {
        /// The variant name there was.
        variant: String,
        /// The variants there are.
        expected: Vec<&'static str>,
    },
    /// An object property the Rust type refuses (`deny_unknown_fields`).
    UnknownField {
        /// The property there was.
        field: String,
        /// The fields there are.
        expected: Vec<&'static str>,
    },
    /// A required property is absent.
    MissingField(&'static str),
    /// A property given twice.
    DuplicateField(&'static str),
    /// A map key that is neither a string nor an integer.
    KeyMustBeString(String),
    /// Arguments must serialize to an array (a tuple), or `()` for none.
    NotAnArray(String),
    /// Any other message from a `Serialize`/`Deserialize` implementation.
    Custom(String),
}

impl ValueError {
    fn new(kind: ValueErrorKind) -> Self {
        ValueError {
            path: Vec::new(),
            kind,
        }
    }

    fn at(mut self, segment: PathSegment) -> Self {
        self.path.push(segment);
        self
    }

    /// Why it failed.
    pub fn kind(&self) -> &ValueErrorKind {
        &self.kind
    }

    /// Where it failed, outermost step first (empty: the value itself).
    pub fn path(&self) -> Vec<PathSegment> {
        self.path.iter().rev().cloned().collect()
    }

    /// The path as text, e.g. `[1].name` (empty for the value itself).
    pub fn path_text(&self) -> String {
        self.path.iter().rev().map(ToString::to_string).collect()
    }
}

impl fmt::Display for PathSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathSegment::Index(i) => write!(f, "[{i}]"),
            PathSegment::Key(k) => write!(f, ".{k}"),
        }
    }
}

impl fmt::Display for ValueErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueErrorKind::UnsafeInteger(n) => write!(
                f,
                "integer {n} is past 2^53 - 1, which a JS number cannot hold exactly"
            ),
            ValueErrorKind::NonFinite(n) => {
                write!(
                    f,
                    "{n} is not a finite number, which a JS peer cannot parse"
                )
            }
            ValueErrorKind::InvalidType { found, expected } => {
                write!(f, "invalid type: {found}, expected {expected}")
            }
            ValueErrorKind::InvalidValue { found, expected } => {
                write!(f, "invalid value: {found}, expected {expected}")
            }
            ValueErrorKind::InvalidLength { found, expected } => {
                write!(f, "invalid length {found}, expected {expected}")
            }
            ValueErrorKind::UnknownVariant { variant, expected } => {
                write!(
                    f,
                    "unknown variant `{variant}`, expected one of {expected:?}"
                )
            }
            ValueErrorKind::UnknownField { field, expected } => {
                write!(f, "unknown field `{field}`, expected one of {expected:?}")
            }
            ValueErrorKind::MissingField(field) => write!(f, "missing field `{field}`"),
            ValueErrorKind::DuplicateField(field) => write!(f, "duplicate field `{field}`"),
            ValueErrorKind::KeyMustBeString(found) => {
                write!(f, "a map key must be a string or an integer, not {found}")
            }
            ValueErrorKind::NotAnArray(found) => write!(
                f,
                "arguments must serialize to an array (a tuple) or (), not {found}"
            ),
            ValueErrorKind::Custom(msg) => f.write_str(msg),
        }
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "at {}: {}", self.path_text(), self.kind)
        }
    }
}

impl std::error::Error for ValueError {}

impl ser::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ValueError::new(ValueErrorKind::Custom(msg.to_string()))
    }
}

impl de::Error for ValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ValueError::new(ValueErrorKind::Custom(msg.to_string()))
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        ValueError::new(ValueErrorKind::InvalidType {
            found: unexp.to_string(),
            expected: exp.to_string(),
        })
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        ValueError::new(ValueErrorKind::InvalidValue {
            found: unexp.to_string(),
            expected: exp.to_string(),
        })
    }
    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        ValueError::new(ValueErrorKind::InvalidLength {
            found: len,
            expected: exp.to_string(),
        })
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        ValueError::new(ValueErrorKind::UnknownVariant {
            variant: variant.to_owned(),
            expected: expected.to_vec(),
        })
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        ValueError::new(ValueErrorKind::UnknownField {
            field: field.to_owned(),
            expected: expected.to_vec(),
        })
    }
    fn missing_field(field: &'static str) -> Self {
        ValueError::new(ValueErrorKind::MissingField(field))
    }
    fn duplicate_field(field: &'static str) -> Self {
        ValueError::new(ValueErrorKind::DuplicateField(field))
    }
}

/// A short description of a value's kind, for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Undefined => "undefined".into(),
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(_) => format!("number `{}`", v.to_js_string()),
        Value::String(s) => format!("string {s:?}"),
        Value::Utf16(_) => format!("string {:?} (with lone surrogates)", v.to_js_string()),
        Value::Array(a) => format!("an array of {}", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Undefined => Unexpected::Other("undefined"),
        Value::Null => Unexpected::Other("null"),
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => Unexpected::Float(*n),
        Value::String(s) => Unexpected::Str(s),
        Value::Utf16(_) => Unexpected::Other("a string with lone surrogates"),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

fn checked_int(n: i128) -> Result<Value, ValueError> {
    if n.unsigned_abs() <= u128::from(MAX_SAFE_INTEGER) {
        Ok(Value::Number(n as f64))
    } else {
        Err(ValueError::new(ValueErrorKind::UnsafeInteger(
            n.to_string(),
        )))
    }
}

fn checked_float(n: f64) -> Result<Value, ValueError> {
    if n.is_finite() {
        Ok(Value::Number(n))
    } else {
        Err(ValueError::new(ValueErrorKind::NonFinite(n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Serializing into a Value

/// The `Serializer` whose output is a [`Value`] (what [`to_value`] uses).
#[derive(Debug, Clone, Copy, Default)]
pub struct ValueSerializer;

impl Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = SerializeArray;
    type SerializeTuple = SerializeArray;
    type SerializeTupleStruct = SerializeArray;
    type SerializeTupleVariant = SerializeTupleVariant;
    type SerializeMap = SerializeObject;
    type SerializeStruct = SerializeObject;
    type SerializeStructVariant = SerializeStructVariant;

    fn serialize_bool(self, v: bool) -> Result<Value, ValueError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, ValueError> {
        checked_int(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<Value, ValueError> {
        checked_int(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, ValueError> {
        Ok(Value::Number(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, ValueError> {
        checked_int(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<Value, ValueError> {
        match i128::try_from(v) {
            Ok(n) => checked_int(n),
            Err(_) => Err(ValueError::new(ValueErrorKind::UnsafeInteger(
                v.to_string(),
            ))),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ValueError> {
        checked_float(v.into())
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ValueError> {
        checked_float(v)
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ValueError> {
        Ok(Value::Array(
            v.iter().map(|b| Value::Number(f64::from(*b))).collect(),
        ))
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Ok(Value::Undefined)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, ValueError> {
        Ok(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        if name == UTF16_MARKER {
            // A `Value::Utf16` serializing itself: take its code units, not the lossy text.
            CAPTURE_UTF16.set(true);
            let lossy = value.serialize(self);
            CAPTURE_UTF16.set(false);
            return match UTF16_UNITS.take() {
                Some(units) => Ok(Value::Utf16(units)),
                None => lossy,
            };
        }
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        let inner = value
            .serialize(self)
            .map_err(|e| e.at(PathSegment::Key(variant.to_owned())))?;
        Ok(Value::Object(Object(vec![(variant.to_owned(), inner)])))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SerializeArray, ValueError> {
        Ok(SerializeArray(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SerializeArray, ValueError> {
        Ok(SerializeArray(Vec::with_capacity(len)))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SerializeArray, ValueError> {
        Ok(SerializeArray(Vec::with_capacity(len)))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SerializeTupleVariant, ValueError> {
        Ok(SerializeTupleVariant {
            variant,
            items: SerializeArray(Vec::with_capacity(len)),
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<SerializeObject, ValueError> {
        Ok(SerializeObject::default())
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<SerializeObject, ValueError> {
        Ok(SerializeObject::default())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<SerializeStructVariant, ValueError> {
        Ok(SerializeStructVariant {
            variant,
            fields: SerializeObject::default(),
        })
    }
}

/// Builds an array (sequences and tuples).
#[derive(Debug)]
pub struct SerializeArray(Vec<Value>);

impl SerializeArray {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let index = self.0.len();
        let v = to_value(value).map_err(|e| e.at(PathSegment::Index(index)))?;
        self.0.push(v);
        Ok(())
    }
}

impl ser::SerializeSeq for SerializeArray {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Array(self.0))
    }
}

impl ser::SerializeTuple for SerializeArray {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Array(self.0))
    }
}

impl ser::SerializeTupleStruct for SerializeArray {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Array(self.0))
    }
}

/// Builds `{Variant:[…]}`.
#[derive(Debug)]
pub struct SerializeTupleVariant {
    variant: &'static str,
    items: SerializeArray,
}

impl ser::SerializeTupleVariant for SerializeTupleVariant {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.items
            .push(value)
            .map_err(|e| e.at(PathSegment::Key(self.variant.to_owned())))
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Object(Object(vec![(
            self.variant.to_owned(),
            Value::Array(self.items.0),
        )])))
    }
}

/// Builds an object (maps and structs), keeping insertion order.
#[derive(Debug, Default)]
pub struct SerializeObject {
    object: Object,
    key: Option<String>,
}

impl SerializeObject {
    fn field<T: Serialize + ?Sized>(&mut self, key: String, value: &T) -> Result<(), ValueError> {
        match to_value(value) {
            Ok(v) => {
                self.object.insert(key, v);
                Ok(())
            }
            Err(e) => Err(e.at(PathSegment::Key(key))),
        }
    }
}

/// A map key: a string as it is, an integer as its decimal text.
fn key_text<T: Serialize + ?Sized>(key: &T) -> Result<String, ValueError> {
    match to_value(key)? {
        Value::String(s) => Ok(s),
        Value::Number(n) if n.fract() == 0.0 => Ok(Value::Number(n).to_js_string()),
        other => Err(ValueError::new(ValueErrorKind::KeyMustBeString(describe(
            &other,
        )))),
    }
}

impl ser::SerializeMap for SerializeObject {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        self.key = Some(key_text(key)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| ser::Error::custom("serialize_value called before serialize_key"))?;
        self.field(key, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Object(self.object))
    }
}

impl ser::SerializeStruct for SerializeObject {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.field(key.to_owned(), value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Object(self.object))
    }
}

/// Builds `{Variant:{…}}`.
#[derive(Debug)]
pub struct SerializeStructVariant {
    variant: &'static str,
    fields: SerializeObject,
}

impl ser::SerializeStructVariant for SerializeStructVariant {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ValueError> {
        self.fields
            .field(key.to_owned(), value)
            .map_err(|e| e.at(PathSegment::Key(self.variant.to_owned())))
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::Object(Object(vec![(
            self.variant.to_owned(),
            Value::Object(self.fields.object),
        )])))
    }
}

// ---------------------------------------------------------------------------------------------
// Value's own Serialize / Deserialize

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // `()` ↔ undefined and `None` ↔ null, so a Value survives a trip through
            // `to_value` exactly; to JSON both are `null`.
            Value::Undefined => s.serialize_unit(),
            Value::Null => s.serialize_none(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Number(n) => match safe_integer(*n) {
                Some(i) => s.serialize_i64(i),
                None => s.serialize_f64(*n),
            },
            Value::String(v) => s.serialize_str(v),
            // serde's strings are UTF-8: to other serializers lone surrogates become U+FFFD
            // (a newtype struct is transparent to them); `to_value` keeps the code units.
            Value::Utf16(units) => s.serialize_newtype_struct(UTF16_MARKER, &Utf16Str(units)),
            Value::Array(items) => s.collect_seq(items),
            Value::Object(o) => s.collect_map(o.iter()),
        }
    }
}

// A string with lone surrogates cannot be a serde string (UTF-8), so between our own
// serializer/deserializer and `Value`'s own Serialize/Deserialize its UTF-16 code units go by
// a side channel on the thread, and everyone else sees the lossy text. This keeps a `Value`
// exact through `to_value`/`from_value` and typed methods taking or returning `Value`
// (`@metarhia/jstp` echoes `'\ud800x'` exactly, so we must too).

/// The newtype name under which a `Value::Utf16` serializes.
const UTF16_MARKER: &str = "$tether_wire::Utf16";

thread_local! {
    /// Set while `ValueSerializer` serializes a [`UTF16_MARKER`] newtype.
    static CAPTURE_UTF16: Cell<bool> = const { Cell::new(false) };
    /// The code units handed over: by [`Utf16Str`] to the serializer, or by the deserializer
    /// to [`ValueVisitor`] for the string it is visiting. At most one string's worth.
    static UTF16_UNITS: RefCell<Option<Vec<u16>>> = const { RefCell::new(None) };
}

/// A `Value::Utf16`'s code units: the lossy text, or the units themselves to `to_value`.
struct Utf16Str<'a>(&'a [u16]);

impl Serialize for Utf16Str<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if CAPTURE_UTF16.get() {
            UTF16_UNITS.set(Some(self.0.to_vec()));
        }
        s.serialize_str(&String::from_utf16_lossy(self.0))
    }
}

/// Visits a lone-surrogate string: `visitor` sees the lossy text, and [`ValueVisitor`] (only
/// it reads the side channel, and only when the text matches) the exact code units.
fn visit_utf16<'de, V: Visitor<'de>>(units: Vec<u16>, visitor: V) -> Result<V::Value, ValueError> {
    let lossy = String::from_utf16_lossy(&units);
    UTF16_UNITS.set(Some(units));
    let out = visitor.visit_string(lossy);
    UTF16_UNITS.set(None);
    out
}

/// `n` as an integer, if it is one within ±(2^53 − 1) (and not `-0`).
fn safe_integer(n: f64) -> Option<i64> {
    let limit = MAX_SAFE_INTEGER as f64;
    (n.fract() == 0.0 && n.abs() <= limit && !(n == 0.0 && n.is_sign_negative()))
        .then_some(n as i64)
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSTP value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.visit_i128(v.into())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.visit_i128(v.into())
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        checked_int(v).map_err(|e| E::custom(e))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        ValueSerializer.serialize_u128(v).map_err(|e| E::custom(e))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.visit_string(v.to_owned())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        // Our deserializer visiting a lone-surrogate string left its units (see `visit_utf16`).
        match UTF16_UNITS.take() {
            Some(units) if String::from_utf16_lossy(&units) == v => Ok(Value::Utf16(units)),
            _ => Ok(Value::String(v)),
        }
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Array(
            v.iter().map(|b| Value::Number(f64::from(*b))).collect(),
        ))
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Undefined)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        de::Deserialize::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        de::Deserialize::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Object::new();
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            object.insert(k, v);
        }
        Ok(Value::Object(object))
    }
}

// ---------------------------------------------------------------------------------------------
// Deserializing from a Value

impl Value {
    fn invalid_type<E: de::Error>(&self, exp: &dyn Expected) -> E {
        E::invalid_type(unexpected(self), exp)
    }

    /// The integer this number holds, for an integer type: a fraction is a type error, a
    /// magnitude past 2^53 − 1 an [`ValueErrorKind::UnsafeInteger`].
    fn integer(&self, exp: &dyn Expected) -> Result<i64, ValueError> {
        match *self {
            Value::Number(n) if n.fract() == 0.0 => match safe_integer(n) {
                Some(i) => Ok(i),
                None if n == 0.0 => Ok(0),
                None => Err(ValueError::new(ValueErrorKind::UnsafeInteger(
                    Value::Number(n).to_js_string(),
                ))),
            },
            Value::Number(n) if !n.is_finite() => {
                Err(ValueError::new(ValueErrorKind::NonFinite(n)))
            }
            _ => Err(self.invalid_type(exp)),
        }
    }
}

macro_rules! deserialize_integer {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
            let n = self.integer(&visitor)?;
            if n < 0 { visitor.visit_i64(n) } else { visitor.visit_u64(n as u64) }
        }
    )*};
}

impl<'de> Deserializer<'de> for Value {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Undefined => visitor.visit_none(),
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Number(n) => match safe_integer(n) {
                Some(i) if i < 0 => visitor.visit_i64(i),
                Some(i) => visitor.visit_u64(i as u64),
                None => visitor.visit_f64(n),
            },
            Value::String(s) => visitor.visit_string(s),
            // serde's strings are UTF-8: lone surrogates become U+FFFD, except to `Value`.
            Value::Utf16(units) => visit_utf16(units, visitor),
            Value::Array(items) => visit_array(items, visitor),
            Value::Object(o) => visit_object(o, visitor),
        }
    }

    deserialize_integer!(
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    );

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_f64(visitor)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Number(n) if n.is_finite() => visitor.visit_f64(n),
            Value::Number(n) => Err(ValueError::new(ValueErrorKind::NonFinite(n))),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Bool(b) => visitor.visit_bool(b),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::String(s) => visitor.visit_string(s),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_byte_buf(visitor)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Array(items) => {
                let bytes = items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let n = v
                            .integer(&"a byte")
                            .map_err(|e| e.at(PathSegment::Index(i)))?;
                        u8::try_from(n)
                            .map_err(|_| de::Error::invalid_value(Unexpected::Signed(n), &"a byte"))
                    })
                    .collect::<Result<Vec<u8>, ValueError>>()?;
                visitor.visit_byte_buf(bytes)
            }
            Value::String(s) => visitor.visit_string(s),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Undefined | Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Undefined | Value::Null => visitor.visit_unit(),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_unit(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Array(items) => visit_array(items, visitor),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match self {
            Value::Array(items) if items.len() != len => {
                Err(de::Error::invalid_length(items.len(), &visitor))
            }
            Value::Array(items) => visit_array(items, visitor),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        match self {
            Value::Object(o) => visit_object(o, visitor),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_map(visitor)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        match self {
            Value::String(variant) => visitor.visit_enum(EnumDeserializer {
                variant,
                content: None,
            }),
            Value::Object(Object(mut props)) if props.len() == 1 => {
                let (variant, content) = props.remove(0);
                visitor.visit_enum(EnumDeserializer {
                    variant,
                    content: Some(content),
                })
            }
            Value::Object(_) => Err(de::Error::invalid_value(
                Unexpected::Map,
                &"an object with a single key (an enum variant)",
            )),
            other => Err(other.invalid_type(&visitor)),
        }
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        self.deserialize_string(visitor)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_unit()
    }
}

impl<'de> IntoDeserializer<'de, ValueError> for Value {
    type Deserializer = Value;
    fn into_deserializer(self) -> Value {
        self
    }
}

fn visit_array<'de, V: Visitor<'de>>(
    items: Vec<Value>,
    visitor: V,
) -> Result<V::Value, ValueError> {
    let len = items.len();
    let mut seq = ArrayAccess {
        items: items.into_iter(),
        index: 0,
    };
    let out = visitor.visit_seq(&mut seq)?;
    if seq.items.len() == 0 {
        Ok(out)
    } else {
        Err(de::Error::invalid_length(
            len,
            &"fewer elements in the array",
        ))
    }
}

fn visit_object<'de, V: Visitor<'de>>(object: Object, visitor: V) -> Result<V::Value, ValueError> {
    let mut map = ObjectAccess {
        props: object.0.into_iter(),
        value: None,
    };
    visitor.visit_map(&mut map)
}

struct ArrayAccess {
    items: std::vec::IntoIter<Value>,
    index: usize,
}

impl<'de> SeqAccess<'de> for ArrayAccess {
    type Error = ValueError;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ValueError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(item)
            .map(Some)
            .map_err(|e| e.at(PathSegment::Index(index)))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct ObjectAccess {
    props: std::vec::IntoIter<(String, Value)>,
    value: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for ObjectAccess {
    type Error = ValueError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ValueError> {
        let Some((key, value)) = self.props.next() else {
            return Ok(None);
        };
        let k = seed
            .deserialize(KeyDeserializer(key.clone()))
            .map_err(|e| e.at(PathSegment::Key(key.clone())))?;
        self.value = Some((key, value));
        Ok(Some(k))
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, ValueError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("next_value_seed called before next_key_seed"))?;
        seed.deserialize(value)
            .map_err(|e| e.at(PathSegment::Key(key)))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.props.len())
    }
}

/// A property name read as a map key: a string, or an integer from its decimal text.
struct KeyDeserializer(String);

macro_rules! deserialize_key_integer {
    ($($method:ident => $visit:ident: $t:ty),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
            match self.0.parse::<$t>() {
                Ok(n) => visitor.$visit(n),
                Err(_) => Err(de::Error::invalid_type(Unexpected::Str(&self.0), &visitor)),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for KeyDeserializer {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_string(self.0)
    }

    deserialize_key_integer!(
        deserialize_i8 => visit_i64: i64, deserialize_i16 => visit_i64: i64,
        deserialize_i32 => visit_i64: i64, deserialize_i64 => visit_i64: i64,
        deserialize_i128 => visit_i128: i128,
        deserialize_u8 => visit_u64: u64, deserialize_u16 => visit_u64: u64,
        deserialize_u32 => visit_u64: u64, deserialize_u64 => visit_u64: u64,
        deserialize_u128 => visit_u128: u128
    );

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_enum(EnumDeserializer {
            variant: self.0,
            content: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool f32 f64 char str string bytes byte_buf unit unit_struct seq tuple tuple_struct
        map struct identifier ignored_any
    }
}

/// An externally tagged enum: the variant name and its content, if any.
struct EnumDeserializer {
    variant: String,
    content: Option<Value>,
}

impl<'de> EnumAccess<'de> for EnumDeserializer {
    type Error = ValueError;
    type Variant = VariantDeserializer;
    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, VariantDeserializer), ValueError> {
        let tag = seed.deserialize(Value::String(self.variant.clone()))?;
        Ok((
            tag,
            VariantDeserializer {
                variant: self.variant,
                content: self.content,
            },
        ))
    }
}

struct VariantDeserializer {
    variant: String,
    content: Option<Value>,
}

impl VariantDeserializer {
    fn content(self, exp: &dyn Expected) -> Result<(Value, String), ValueError> {
        match self.content {
            Some(v) => Ok((v, self.variant)),
            None => Err(de::Error::invalid_type(Unexpected::UnitVariant, exp)),
        }
    }
}

impl<'de> VariantAccess<'de> for VariantDeserializer {
    type Error = ValueError;
    fn unit_variant(self) -> Result<(), ValueError> {
        match self.content {
            None | Some(Value::Undefined | Value::Null) => Ok(()),
            Some(other) => Err(other
                .invalid_type::<ValueError>(&"a unit variant")
                .at(PathSegment::Key(self.variant))),
        }
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, ValueError> {
        let (v, variant) = self.content(&"a newtype variant")?;
        seed.deserialize(v)
            .map_err(|e| e.at(PathSegment::Key(variant)))
    }
    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        let (v, variant) = self.content(&visitor)?;
        v.deserialize_tuple(len, visitor)
            .map_err(|e| e.at(PathSegment::Key(variant)))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        let (v, variant) = self.content(&visitor)?;
        v.deserialize_map(visitor)
            .map_err(|e| e.at(PathSegment::Key(variant)))
    }
}

/// Call or event arguments read as a tuple: the count must match exactly, and `()` takes none.
struct ArgsDeserializer(Vec<Value>);

impl<'de> Deserializer<'de> for ArgsDeserializer {
    type Error = ValueError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_any(visitor)
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        if self.0.is_empty() {
            visitor.visit_unit()
        } else {
            Err(de::Error::invalid_length(self.0.len(), &"no arguments"))
        }
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        self.deserialize_unit(visitor)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_tuple(len, visitor)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_tuple(len, visitor)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_seq(visitor)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_option(visitor)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ValueError> {
        Value::Array(self.0).deserialize_seq(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_failing_element() {
        let e =
            from_value::<Vec<(u8, String)>>(crate::parse("[[1,'a'],[2,3]]").unwrap()).unwrap_err();
        assert_eq!(e.path_text(), "[1][1]");
        assert!(
            matches!(e.kind(), ValueErrorKind::InvalidType { .. }),
            "{e}"
        );
    }

    #[test]
    fn value_round_trips_through_itself() {
        let v =
            crate::parse("{a:[1,,null,'x',{b:true}],'7':-2.5,c:undefined,d:'\\ud800x'}").unwrap();
        let Value::Object(o) = &v else {
            panic!("{v:?}")
        };
        let d = o.get("d").unwrap().clone();
        assert!(matches!(d, Value::Utf16(_)), "{v:?}");
        assert_eq!(to_value(&v).unwrap(), v);
        assert_eq!(from_value::<Value>(v.clone()).unwrap(), v);
        // In an argument list too; a `String` cannot hold it and refuses it.
        let args: (Value, Value) = from_args(vec![v.clone(), d.clone()]).unwrap();
        assert_eq!(args, (v.clone(), d.clone()));
        assert!(from_args::<(String,)>(vec![d.clone()]).is_err());
        assert_eq!(to_args(&(&v, &d)).unwrap(), vec![v, d]);
    }
}
