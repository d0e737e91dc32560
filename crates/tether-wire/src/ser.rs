//! The mdsf serializer (compact "record serialization"), byte-compatible with `mdsf.stringify`.

use crate::value::Value;
use thiserror::Error;

/// Why a value cannot be sent to a JS peer.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SerializeError {
    /// `NaN` or `±Infinity`: Node's parser cannot read them back.
    #[error("non-finite number {0} cannot be sent to a JSTP peer")]
    NonFinite(f64),
}

/// Serializes `value`, refusing non-finite numbers anywhere inside it.
pub fn stringify(value: &Value) -> Result<String, SerializeError> {
    todo!("helper: check finiteness then write_value")
}

/// Appends the compact serialization of `value` to `out`.
///
/// `Undefined` writes nothing (a hole inside arrays); non-finite numbers write `NaN`/`Infinity`.
pub fn write_value(value: &Value, out: &mut String) {
    todo!("helper")
}

/// Appends `s` as a single-quoted string literal with upstream's escapes.
pub fn write_string_literal(s: &str, out: &mut String) {
    todo!("helper")
}

/// Whether `key` may be written bare: `^[a-zA-Z_$][\w$]*$`, ASCII only.
pub fn is_bare_key(key: &str) -> bool {
    todo!("helper")
}
