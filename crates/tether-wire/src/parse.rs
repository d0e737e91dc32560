//! The mdsf parser: accepts at least what `@metarhia/jstp`'s JS fallback parser accepts.

use crate::value::Value;
use thiserror::Error;

/// A syntax error, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason} at offset {offset}")]
pub struct ParseError {
    /// Byte offset into the input.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}

/// Parses exactly one value (surrounding whitespace and comments allowed).
pub fn parse(text: &str) -> Result<Value, ParseError> {
    todo!("helper")
}
