//! The mdsf parser: accepts at least what `@metarhia/jstp`'s JS fallback parser accepts.
//!
//! Accepted syntax (a superset of what upstream's pure-JS parser reads, which is what a Node 20
//! peer runs):
//!
//! - whitespace: space, `\t \n \v \f \r`, and U+00A0, U+FEFF, U+2028, U+2029; `// line` and
//!   `/* block */` comments wherever whitespace may appear (any number of them in a row);
//! - numbers: decimal with an optional leading `+`/`-`, an optional leading or trailing `.`
//!   and an exponent; `0x`/`0b`/`0o` integers (either case of prefix and digits). A legacy
//!   octal literal such as `07` is an error, as upstream;
//! - the words `true`, `false`, `null`, `undefined`, and `NaN`, `Infinity`, `-Infinity` (which
//!   the native parser accepts and the JS one does not);
//! - strings in `'…'` or `"…"`, raw line breaks allowed, with the escapes `\b \f \n \r \t \v`,
//!   octal `\N`, `\NN`, `\NNN` (up to three octal digits, so `\0` is NUL), `\xHH`, `\uHHHH`
//!   and `\u{H…}`; a backslash before any other character stands for that character (so a
//!   backslash before a line break keeps the line break, as upstream does);
//! - arrays with holes (`[1,,2]` holds `Undefined` in the middle) and one trailing comma
//!   (`[1,]` is `[1]`);
//! - objects whose keys are identifiers (ASCII ones, and Unicode letters, digits and combining
//!   marks as the native parser allows), quoted strings or unsigned number literals (converted
//!   to their `Number#toString` form, as JS does), with an optional trailing comma.
//!   A property whose value is `undefined` is dropped; a repeated key keeps its first position
//!   and takes the last value, as JS assignment does. Keys stay in wire order.
//!
//! **Surrogates:** escaped UTF-16 surrogate pairs (`\ud83d\ude00`, in either `\u` form) are
//! combined into one character. A Rust `String` cannot hold a lone surrogate, so a string value
//! with an unpaired `\udXXX` escape parses as [`Value::Utf16`] (its UTF-16 code units, as a JS
//! string holds them), which serializes back to the same escape. In an object key, where the
//! model has a `String`, an unpaired surrogate becomes U+FFFD REPLACEMENT CHARACTER.
//!
//! **Robustness:** the parser never panics, and arrays and objects may nest at most
//! [`MAX_DEPTH`] levels deep, so hostile input cannot exhaust the stack.
//!
//! **Memory proportional to input:** the heap a parsed value holds (array and object slots
//! with their spare capacity, keys, string bytes) is counted while it is built, against a
//! budget of [`AMPLIFICATION`] × the input's length plus [`BUDGET_FLOOR`] ([`budget_for`]); the
//! duplicate-key index of a large object is counted too while that object is open. Containers
//! grow under the parser's control and never past what the budget has left, so input that
//! would cost more is refused with [`ParseErrorKind::OverBudget`] before the memory is
//! allocated: a message of holes (`[,,,…]`, 32 bytes of [`Value`] per input byte) cannot turn
//! 8 MiB of text into 256 MiB. A parsed value holds at most the budget; while one is being
//! built the peak is at most the budget plus the string literal being decoded (counted once
//! decoded; never longer than its source). The floor keeps every small message parseable;
//! past it, input whose values are small next to their 32-byte slots is refused: dense arrays
//! of one-digit numbers (16× their text) or of strings under about 12 characters (spare
//! capacity included, while the array is open), many tiny nested arrays, objects with very
//! short keys and values.
//!
//! ```
//! use tether_wire::{parse, Value};
//!
//! let v = parse("{ok:[1,,'two',], /* note */ n:0x10}").unwrap();
//! let o = v.as_object().unwrap();
//! assert_eq!(o.get("ok"), Some(&Value::Array(vec![1.into(), Value::Undefined, "two".into()])));
//! assert_eq!(o.get("n"), Some(&Value::from(16)));
//! assert!(parse("[1] x").is_err());
//! ```

use crate::value::{Object, Value};
use std::collections::HashMap;
use thiserror::Error;

/// The deepest nesting of arrays and objects [`parse`] accepts; deeper input is an error.
pub const MAX_DEPTH: usize = 128;

/// How many bytes of heap a parsed value may hold per byte of its text (see the module docs).
pub const AMPLIFICATION: usize = 4;

/// Heap every parse may use beyond [`AMPLIFICATION`] × its text: 64 KiB, so short messages
/// (whose values are small but many times their text) always parse.
pub const BUDGET_FLOOR: usize = 64 * 1024;

/// The heap budget [`parse`] gives `text_len` bytes of input.
pub fn budget_for(text_len: usize) -> usize {
    text_len
        .saturating_mul(AMPLIFICATION)
        .saturating_add(BUDGET_FLOOR)
}

/// What kind of error a [`ParseError`] is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The text is not valid mdsf (includes nesting deeper than [`MAX_DEPTH`]).
    Syntax,
    /// The value would hold more heap than its budget ([`budget_for`] the text's length);
    /// refused before it was built.
    OverBudget {
        /// The budget in bytes.
        budget: usize,
    },
}

/// A parse error, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason} at offset {offset}")]
pub struct ParseError {
    /// Byte offset into the input.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
    /// Which kind of error this is.
    pub kind: ParseErrorKind,
}

/// Parses exactly one value (surrounding whitespace and comments allowed), with the heap
/// budget [`budget_for`] its length.
///
/// Anything but whitespace and comments after the value is an error.
pub fn parse(text: &str) -> Result<Value, ParseError> {
    parse_with_budget(text, budget_for(text.len()))
}

/// [`parse`] with an explicit heap budget in bytes (see the module docs for what is counted).
pub fn parse_with_budget(text: &str, budget: usize) -> Result<Value, ParseError> {
    let mut p = Parser {
        src: text,
        pos: 0,
        budget,
        left: budget,
    };
    p.skip_clutter()?;
    let value = p.value(0)?;
    p.skip_clutter()?;
    if p.pos < text.len() {
        return Err(p.unexpected("after the value"));
    }
    Ok(value)
}

type Result<T, E = ParseError> = std::result::Result<T, E>;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// The heap budget this parse started with.
    budget: usize,
    /// What is left of it.
    left: usize,
}

/// Heap one array slot holds.
const SLOT: usize = std::mem::size_of::<Value>();
/// Heap one object property slot holds (its key's bytes are counted apart).
const PROP_SLOT: usize = std::mem::size_of::<(String, Value)>();
/// Heap one entry of a large object's duplicate-key index holds beyond its key's bytes (a
/// `String` and a `usize`, plus hashbrown's control byte, 7/8 load factor and power-of-two
/// bucket count: at most 2 × 8/7 × 33 bytes, rounded up).
const INDEX_ENTRY: usize = 80;

/// Above this many properties an object gets a hash index for its duplicate-key check.
const LINEAR_KEY_SEARCH: usize = 16;

impl<'a> Parser<'a> {
    fn err(&self, offset: usize, reason: impl Into<String>) -> ParseError {
        ParseError {
            offset,
            reason: reason.into(),
            kind: ParseErrorKind::Syntax,
        }
    }

    /// Counts `bytes` of heap against the budget; errs once it is spent.
    fn charge(&mut self, bytes: usize) -> Result<()> {
        match self.left.checked_sub(bytes) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err(ParseError {
                offset: self.pos,
                reason: format!("value would hold more than {} bytes", self.budget),
                kind: ParseErrorKind::OverBudget {
                    budget: self.budget,
                },
            }),
        }
    }

    /// Makes room for one more item of `slot` bytes in `items`, counting any growth first:
    /// capacity grows by half (from 1) under our control, never past what the budget has
    /// left, so what is counted is exactly what is allocated. [`Parser::shrink`] gives the
    /// spare capacity back when the container closes.
    fn grow<T>(&mut self, items: &mut Vec<T>, slot: usize) -> Result<()> {
        if items.len() == items.capacity() {
            let room = (self.left / slot.max(1)).max(1);
            // Small arrays (pairs, argument lists) are most of a message: 1, 2, 3, 4, 6, 9…
            // keeps their slack to a slot or two instead of Vec's first 4.
            let more = (items.capacity() / 2).max(1).min(room);
            self.charge(more.saturating_mul(slot))?;
            items.reserve_exact(more);
        }
        Ok(())
    }

    /// Drops a closed container's spare capacity when there is more than a little (a large
    /// block shrinks in place) and returns its count to the budget.
    fn shrink<T>(&mut self, items: &mut Vec<T>, slot: usize) {
        let before = items.capacity();
        if before - items.len() > 4 {
            items.shrink_to_fit();
            let freed = before.saturating_sub(items.capacity()).saturating_mul(slot);
            self.left = self.left.saturating_add(freed);
        }
    }

    /// Counts the heap a just-parsed child holds that was not counted while it was built (a
    /// string's bytes; arrays and objects count their own slots).
    fn charge_leaf(&mut self, value: &Value) -> Result<()> {
        match value {
            Value::String(s) => self.charge(s.capacity()),
            Value::Utf16(units) => self.charge(units.capacity().saturating_mul(2)),
            _ => Ok(()),
        }
    }

    /// An error naming whatever is at the current position.
    fn unexpected(&self, context: &str) -> ParseError {
        match self.peek_char() {
            None => self.err(self.pos, format!("unexpected end of input {context}")),
            Some(c) => self.err(self.pos, format!("unexpected character {c:?} {context}")),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + ahead).copied()
    }

    fn peek_char(&self) -> Option<char> {
        self.src.get(self.pos..).and_then(|s| s.chars().next())
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    /// Skips whitespace and comments.
    fn skip_clutter(&mut self) -> Result<()> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') => self.pos += 1,
                Some(b'/') if self.peek_at(1) == Some(b'/') => {
                    let body = &self.src[self.pos + 2..];
                    let len = body
                        .find(['\n', '\r', '\u{2028}', '\u{2029}'])
                        .unwrap_or(body.len());
                    self.pos += 2 + len;
                }
                Some(b'/') if self.peek_at(1) == Some(b'*') => {
                    let start = self.pos;
                    match self.src[start + 2..].find("*/") {
                        Some(len) => self.pos = start + 2 + len + 2,
                        None => return Err(self.err(start, "unterminated comment")),
                    }
                }
                Some(b) if b >= 0x80 => match self.peek_char() {
                    Some(c @ ('\u{a0}' | '\u{feff}' | '\u{2028}' | '\u{2029}')) => {
                        self.pos += c.len_utf8()
                    }
                    _ => return Ok(()),
                },
                _ => return Ok(()),
            }
        }
    }

    /// Parses one value at the current position (clutter already skipped). `depth` is the
    /// number of arrays and objects enclosing it.
    fn value(&mut self, depth: usize) -> Result<Value> {
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'\'' | b'"') => self.string().map(Utf16Builder::into_value),
            Some(b'0'..=b'9' | b'+' | b'-' | b'.') => self.number().map(Value::Number),
            Some(b'a'..=b'z' | b'A'..=b'Z' | b'_' | b'$') => self.word(),
            _ => Err(self.unexpected("where a value was expected")),
        }
    }

    fn check_depth(&self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            Err(self.err(self.pos, format!("nesting deeper than {MAX_DEPTH} levels")))
        } else {
            Ok(())
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value> {
        self.check_depth(depth)?;
        let open = self.pos;
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_clutter()?;
            match self.peek() {
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                Some(b',') => {
                    // A hole.
                    self.grow(&mut items, SLOT)?;
                    items.push(Value::Undefined);
                    self.pos += 1;
                    continue;
                }
                None => return Err(self.err(open, "unterminated array")),
                _ => {}
            }
            let item = self.value(depth)?;
            self.charge_leaf(&item)?;
            self.grow(&mut items, SLOT)?;
            items.push(item);
            self.skip_clutter()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    break;
                }
                None => return Err(self.err(open, "unterminated array")),
                _ => return Err(self.unexpected("where ',' or ']' was expected")),
            }
        }
        self.shrink(&mut items, SLOT);
        Ok(Value::Array(items))
    }

    fn object(&mut self, depth: usize) -> Result<Value> {
        self.check_depth(depth)?;
        let open = self.pos;
        self.pos += 1;
        let mut props = Props::default();
        let mut index_cost = 0usize;
        loop {
            self.skip_clutter()?;
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                None => return Err(self.err(open, "unterminated object")),
                _ => {}
            }
            let key = self.key()?;
            self.skip_clutter()?;
            if self.peek() != Some(b':') {
                return Err(self.unexpected("where ':' was expected"));
            }
            self.pos += 1;
            self.skip_clutter()?;
            let value = self.value(depth)?;
            if !matches!(value, Value::Undefined) {
                self.charge_leaf(&value)?;
                self.charge(key.capacity())?;
                if props.items.len() >= LINEAR_KEY_SEARCH {
                    // Counted even for a repeated key: a bound, not an exact figure. The index
                    // goes when the object closes, and so does its count.
                    let entry = INDEX_ENTRY.saturating_add(key.len());
                    self.charge(entry)?;
                    index_cost += entry;
                }
                if props.items.len() == LINEAR_KEY_SEARCH {
                    // The index is about to be built over the keys so far.
                    let keys: usize = props.items.iter().map(|(k, _)| k.len()).sum();
                    let built = (INDEX_ENTRY * LINEAR_KEY_SEARCH).saturating_add(keys);
                    self.charge(built)?;
                    index_cost += built;
                }
                self.grow(&mut props.items, PROP_SLOT)?;
                props.insert(key, value);
            }
            self.skip_clutter()?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                None => return Err(self.err(open, "unterminated object")),
                _ => return Err(self.unexpected("where ',' or '}' was expected")),
            }
        }
        self.left = self.left.saturating_add(index_cost);
        let mut items = props.items;
        self.shrink(&mut items, PROP_SLOT);
        Ok(Value::Object(Object(items)))
    }

    /// An object key: identifier, string literal, or unsigned number literal.
    fn key(&mut self) -> Result<String> {
        match self.peek() {
            Some(b'\'' | b'"') => self.string().map(Utf16Builder::into_lossy),
            Some(b'0'..=b'9' | b'.') => {
                let n = self.number()?;
                let mut key = String::new();
                crate::ser::write_number(n, &mut key);
                Ok(key)
            }
            _ => {
                let start = self.pos;
                let mut chars = self.rest().char_indices();
                match chars.next() {
                    Some((_, c)) if is_ident_start(c) => {}
                    _ => return Err(self.unexpected("where a property name was expected")),
                }
                let len = chars
                    .find(|&(_, c)| !is_ident_continue(c))
                    .map_or(self.src.len() - start, |(i, _)| i);
                self.pos = start + len;
                Ok(self.src[start..self.pos].to_owned())
            }
        }
    }

    /// `true`, `false`, `null`, `undefined`, `NaN` or `Infinity`.
    fn word(&mut self) -> Result<Value> {
        let start = self.pos;
        let len = self
            .rest()
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'$'))
            .unwrap_or(self.src.len() - start);
        let word = &self.src[start..start + len];
        let value = match word {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            "null" => Value::Null,
            "undefined" => Value::Undefined,
            "NaN" => Value::Number(f64::NAN),
            "Infinity" => Value::Number(f64::INFINITY),
            _ => {
                let shown: String = word.chars().take(32).collect();
                return Err(self.err(start, format!("unexpected identifier '{shown}'")));
            }
        };
        self.pos = start + len;
        self.no_identifier_after(start)?;
        Ok(value)
    }

    /// Errors if an identifier character (for example a non-ASCII letter) follows a token.
    fn no_identifier_after(&self, token_start: usize) -> Result<()> {
        match self.peek_char() {
            Some(c) if is_ident_continue(c) => Err(self.err(
                token_start,
                format!("unexpected character {c:?} after a literal"),
            )),
            _ => Ok(()),
        }
    }

    fn number(&mut self) -> Result<f64> {
        let start = self.pos;
        let negative = match self.peek() {
            Some(b'-') => {
                self.pos += 1;
                true
            }
            Some(b'+') => {
                self.pos += 1;
                false
            }
            _ => false,
        };
        let sign = if negative { -1.0 } else { 1.0 };
        for (word, value) in [("Infinity", f64::INFINITY), ("NaN", f64::NAN)] {
            if self.rest().starts_with(word) {
                self.pos += word.len();
                self.no_identifier_after(start)?;
                return Ok(sign * value);
            }
        }
        let radix = match (self.peek(), self.peek_at(1)) {
            (Some(b'0'), Some(b'x' | b'X')) => 16,
            (Some(b'0'), Some(b'o' | b'O')) => 8,
            (Some(b'0'), Some(b'b' | b'B')) => 2,
            (Some(b'0'), Some(b'0'..=b'9')) => {
                return Err(self.err(start, "legacy octal literals are not allowed"));
            }
            _ => 10,
        };
        let magnitude = if radix == 10 {
            self.decimal(start)?
        } else {
            self.pos += 2;
            let digits_start = self.pos;
            let len = self
                .rest()
                .bytes()
                .position(|b| !(b as char).is_digit(radix))
                .unwrap_or(self.src.len() - digits_start);
            if len == 0 {
                return Err(self.unexpected("where a digit was expected"));
            }
            self.pos += len;
            radix_value(&self.src[digits_start..self.pos], radix)
        };
        self.no_identifier_after(start)?;
        Ok(sign * magnitude)
    }

    /// A decimal literal without its sign: `12`, `1.5`, `.5`, `5.`, `1e-7`, `2.5E+3`.
    fn decimal(&mut self, start: usize) -> Result<f64> {
        let bytes = self.src.as_bytes();
        let digits = |from: usize| {
            bytes[from..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let int_start = self.pos;
        let int_len = digits(int_start);
        self.pos += int_len;
        let mut frac = "";
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let frac_len = digits(self.pos);
            frac = &self.src[self.pos..self.pos + frac_len];
            self.pos += frac_len;
        }
        if int_len == 0 && frac.is_empty() {
            return Err(self.err(start, "malformed number"));
        }
        let mut exp = "";
        let mut exp_negative = false;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            match self.peek() {
                Some(b'-') => {
                    exp_negative = true;
                    self.pos += 1;
                }
                Some(b'+') => self.pos += 1,
                _ => {}
            }
            let exp_len = digits(self.pos);
            if exp_len == 0 {
                return Err(self.unexpected("in a number's exponent"));
            }
            exp = &self.src[self.pos..self.pos + exp_len];
            self.pos += exp_len;
        }
        let int = &self.src[int_start..int_start + int_len];
        // Fast path for plain integers (every message id): up to 15 digits is below 2^53, so
        // the value is exact and needs neither the float parser nor a rebuilt string.
        if frac.is_empty() && exp.is_empty() && int_len <= 15 {
            let value = int
                .bytes()
                .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
            return Ok(value as f64);
        }
        // Rebuild in a form Rust's (correctly rounding) float parser always reads.
        let mut text = String::with_capacity(int.len() + frac.len() + exp.len() + 5);
        text.push_str(if int.is_empty() { "0" } else { int });
        if !frac.is_empty() {
            text.push('.');
            text.push_str(frac);
        }
        if !exp.is_empty() {
            text.push('e');
            if exp_negative {
                text.push('-');
            }
            text.push_str(exp);
        }
        text.parse::<f64>()
            .map_err(|_| self.err(start, "malformed number"))
    }

    /// A string literal at the current position; returns its decoded text.
    fn string(&mut self) -> Result<Utf16Builder> {
        let open = self.pos;
        let quote = self.src.as_bytes()[open];
        self.pos += 1;
        let mut out = Utf16Builder::default();
        loop {
            let rest = self.rest().as_bytes();
            let Some(stop) = rest.iter().position(|&b| b == quote || b == b'\\') else {
                return Err(self.err(open, "unterminated string"));
            };
            // `stop` is at an ASCII byte, hence at a char boundary.
            out.push_str(&self.src[self.pos..self.pos + stop]);
            self.pos += stop + 1;
            if rest[stop] == quote {
                out.flush_high();
                return Ok(out);
            }
            self.escape(open, &mut out)?;
        }
    }

    /// The escape sequence after a backslash.
    fn escape(&mut self, open: usize, out: &mut Utf16Builder) -> Result<()> {
        let escape_start = self.pos - 1;
        let Some(c) = self.peek_char() else {
            return Err(self.err(open, "unterminated string"));
        };
        self.pos += c.len_utf8();
        match c {
            'b' => out.push_char('\u{8}'),
            'f' => out.push_char('\u{c}'),
            'n' => out.push_char('\n'),
            'r' => out.push_char('\r'),
            't' => out.push_char('\t'),
            'v' => out.push_char('\u{b}'),
            '0'..='7' => {
                // Up to three octal digits in all (upstream reads `\777` as U+01FF).
                let mut code = c as u32 - '0' as u32;
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ b'0'..=b'7') => {
                            code = code * 8 + u32::from(d - b'0');
                            self.pos += 1;
                        }
                        _ => break,
                    }
                }
                out.push_code_point(code);
            }
            'x' => {
                let code = self.fixed_hex(2, escape_start)?;
                out.push_code_point(code);
            }
            'u' if self.peek() == Some(b'{') => {
                self.pos += 1;
                let digits_start = self.pos;
                let len = self
                    .rest()
                    .bytes()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(self.src.len() - digits_start);
                self.pos += len;
                if len == 0 || self.peek() != Some(b'}') {
                    return Err(self.err(escape_start, "malformed \\u{…} escape"));
                }
                self.pos += 1;
                let digits = self.src[digits_start..digits_start + len].trim_start_matches('0');
                let code = if digits.len() > 6 {
                    None
                } else {
                    u32::from_str_radix(digits, 16).ok().or(Some(0))
                };
                match code {
                    Some(code) if code <= 0x10ffff => out.push_code_point(code),
                    _ => return Err(self.err(escape_start, "code point above U+10FFFF")),
                }
            }
            'u' => {
                let code = self.fixed_hex(4, escape_start)?;
                out.push_code_point(code);
            }
            other => out.push_char(other),
        }
        Ok(())
    }

    /// Exactly `n` hex digits.
    fn fixed_hex(&mut self, n: usize, escape_start: usize) -> Result<u32> {
        let digits = self
            .src
            .get(self.pos..self.pos + n)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.err(escape_start, "malformed hex escape"))?;
        self.pos += n;
        u32::from_str_radix(digits, 16).map_err(|_| self.err(escape_start, "malformed hex escape"))
    }
}

/// An integer literal's digits (no prefix, at least one digit, all valid for `radix`) as the
/// nearest double, rounding ties to even as JS does.
fn radix_value(digits: &str, radix: u32) -> f64 {
    let bits_per_digit = radix.trailing_zeros() as usize;
    let digits = digits.trim_start_matches('0');
    // Collect the significant bits, most significant first.
    let mut bits: Vec<bool> = Vec::with_capacity(digits.len() * bits_per_digit);
    for d in digits.chars() {
        let v = d.to_digit(radix).unwrap_or(0);
        for shift in (0..bits_per_digit).rev() {
            let bit = (v >> shift) & 1 == 1;
            if bit || !bits.is_empty() {
                bits.push(bit);
            }
        }
    }
    if bits.len() <= 64 {
        let n = bits.iter().fold(0u64, |acc, &b| (acc << 1) | u64::from(b));
        return n as f64;
    }
    // Keep 63 bits plus a sticky bit so the single rounding in `as f64` is correct.
    let mut m = bits[..63]
        .iter()
        .fold(0u64, |acc, &b| (acc << 1) | u64::from(b));
    m <<= 1;
    if bits[63..].iter().any(|&b| b) {
        m |= 1;
    }
    ldexp(m as f64, bits.len() - 64)
}

/// `x · 2^exp`, exact unless it overflows to infinity.
fn ldexp(mut x: f64, mut exp: usize) -> f64 {
    while exp > 0 && x.is_finite() {
        let step = exp.min(1000);
        x *= f64::from_bits(((1023 + step) as u64) << 52);
        exp -= step;
    }
    x
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == '$' || (!c.is_ascii() && c.is_alphabetic())
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || c == '$'
        || (!c.is_ascii()
            && (c.is_alphanumeric()
                || matches!(c,
                    '\u{200c}' | '\u{200d}'
                    | '\u{300}'..='\u{36f}'
                    | '\u{1ab0}'..='\u{1aff}'
                    | '\u{1dc0}'..='\u{1dff}'
                    | '\u{20d0}'..='\u{20ff}'
                    | '\u{fe20}'..='\u{fe2f}')))
}

/// Builds a string from text and UTF-16 code units, pairing surrogates and noting where lone
/// ones fall (kept by [`Utf16Builder::into_value`], replaced with U+FFFD by
/// [`Utf16Builder::into_lossy`]).
#[derive(Default)]
struct Utf16Builder {
    out: String,
    high: Option<u32>,
    /// Unpaired surrogates: the byte offset in `out` each one precedes, and its code unit.
    lone: Vec<(usize, u16)>,
}

impl Utf16Builder {
    fn flush_high(&mut self) {
        if let Some(high) = self.high.take() {
            self.push_lone(high);
        }
    }

    fn push_lone(&mut self, unit: u32) {
        // Only surrogate code points (below 0x10000) get here.
        self.lone.push((self.out.len(), unit as u16));
    }

    fn push_str(&mut self, s: &str) {
        if !s.is_empty() {
            self.flush_high();
            self.out.push_str(s);
        }
    }

    fn push_char(&mut self, c: char) {
        self.flush_high();
        self.out.push(c);
    }

    fn push_code_point(&mut self, code: u32) {
        match code {
            0xd800..=0xdbff => {
                self.flush_high();
                self.high = Some(code);
            }
            0xdc00..=0xdfff => match self.high.take() {
                Some(high) => {
                    let c = 0x10000 + ((high - 0xd800) << 10) + (code - 0xdc00);
                    self.out
                        .push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                }
                None => self.push_lone(code),
            },
            _ => self.push_char(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)),
        }
    }

    /// The value: a [`Value::String`], or [`Value::Utf16`] when a surrogate is unpaired.
    fn into_value(self) -> Value {
        if self.lone.is_empty() {
            return Value::String(self.out);
        }
        let mut units = Vec::with_capacity(self.out.len() + self.lone.len());
        let mut from = 0;
        for (at, unit) in self.lone {
            units.extend(self.out[from..at].encode_utf16());
            units.push(unit);
            from = at;
        }
        units.extend(self.out[from..].encode_utf16());
        Value::Utf16(units)
    }

    /// The text, with U+FFFD for each unpaired surrogate.
    fn into_lossy(self) -> String {
        if self.lone.is_empty() {
            return self.out;
        }
        let mut text = String::with_capacity(self.out.len() + 3 * self.lone.len());
        let mut from = 0;
        for (at, _) in self.lone {
            text.push_str(&self.out[from..at]);
            text.push(char::REPLACEMENT_CHARACTER);
            from = at;
        }
        text.push_str(&self.out[from..]);
        text
    }
}

/// An object's properties being collected, with JS assignment semantics for repeated keys.
#[derive(Default)]
struct Props {
    items: Vec<(String, Value)>,
    index: Option<HashMap<String, usize>>,
}

impl Props {
    fn insert(&mut self, key: String, value: Value) {
        if self.index.is_none() && self.items.len() >= LINEAR_KEY_SEARCH {
            let index = self
                .items
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.clone(), i))
                .collect();
            self.index = Some(index);
        }
        let existing = match &self.index {
            Some(index) => index.get(&key).copied(),
            None => self.items.iter().position(|(k, _)| *k == key),
        };
        match existing {
            Some(i) => self.items[i].1 = value,
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(key.clone(), self.items.len());
                }
                self.items.push((key, value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    fn num(text: &str) -> f64 {
        match parse(text) {
            Ok(Value::Number(n)) => n,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    fn string(text: &str) -> String {
        match parse(text) {
            Ok(Value::String(s)) => s,
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn words() {
        assert_eq!(parse("true"), Ok(Value::Bool(true)));
        assert_eq!(parse("false"), Ok(Value::Bool(false)));
        assert_eq!(parse("null"), Ok(Value::Null));
        assert_eq!(parse("undefined"), Ok(Value::Undefined));
        assert!(num("NaN").is_nan());
        assert!(num("-NaN").is_nan());
        assert_eq!(num("Infinity"), f64::INFINITY);
        assert_eq!(num("+Infinity"), f64::INFINITY);
        assert_eq!(num("-Infinity"), f64::NEG_INFINITY);
        for bad in [
            "True",
            "NULL",
            "nul",
            "truex",
            "Infinityx",
            "foo",
            "nan",
            "-infinity",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers() {
        let cases: &[(&str, f64)] = &[
            ("0", 0.0),
            ("-0", -0.0),
            ("42", 42.0),
            // The integer fast path's last length, and the first that takes the float parser.
            ("999999999999999", 999999999999999.0),
            ("9007199254740993", 9007199254740992.0),
            ("+42", 42.0),
            ("-42", -42.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("-.5", -0.5),
            ("+.5", 0.5),
            ("5.", 5.0),
            ("1e3", 1000.0),
            ("1E+3", 1000.0),
            ("1.e3", 1000.0),
            ("1e-7", 1e-7),
            ("1e400", f64::INFINITY),
            ("0.30000000000000004", 0.30000000000000004),
            ("123456789012345680000", 123456789012345680000.0),
            ("0x10", 16.0),
            ("0XfF", 255.0),
            ("-0x10", -16.0),
            ("0b101", 5.0),
            ("0B11", 3.0),
            ("0o17", 15.0),
            ("0O17", 15.0),
            ("0x0000000000000000000000001", 1.0),
            ("0x1fffffffffffff", 9007199254740991.0),
            // 2^53 + 1 rounds to even (2^53), 2^53 + 3 to 2^53 + 4.
            ("0x20000000000001", 9007199254740992.0),
            ("0x20000000000003", 9007199254740996.0),
            ("0xffffffffffffffffff", 4722366482869645213696.0),
            // Ties beyond 64 bits: a sticky bit far to the right rounds up.
            (
                "0x200000000000010000000000000001",
                2.0f64.powi(117) + 2.0f64.powi(65),
            ),
            ("0x20000000000001000000000000000", 2.0f64.powi(113)),
        ];
        for &(text, want) in cases {
            let got = num(text);
            assert_eq!(got.to_bits(), want.to_bits(), "{text}: {got} != {want}");
        }
        let huge = format!("0x1{}", "0".repeat(300));
        assert_eq!(num(&huge), f64::INFINITY);
        for bad in [
            "07", "00", "-01", "0x", "0xg", "0b2", "0o8", "1e", "1e+", ".", "-", "+", "--1",
            "1.2.3", "1a", "0x1z", "1é", ".e5", "- 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(string("'it\\'s'"), "it's");
        assert_eq!(string("\"say \\\"hi\\\"\""), "say \"hi\"");
        assert_eq!(string("'a\"b'"), "a\"b");
        assert_eq!(string("\"a'b\""), "a'b");
        assert_eq!(string(r"'\b\f\n\r\t\v'"), "\u{8}\u{c}\n\r\t\u{b}");
        assert_eq!(string(r"'\0'"), "\0");
        assert_eq!(string(r"'\0a'"), "\0a");
        assert_eq!(string(r"'\101\7\77\1234'"), "A\u{7}?S4");
        assert_eq!(string(r"'\777'"), "\u{1ff}");
        assert_eq!(string(r"'\8\9'"), "89");
        assert_eq!(string(r"'\x41\xe9'"), "Aé");
        assert_eq!(string(r"'\u0041\u00E9'"), "Aé");
        assert_eq!(string(r"'\u{41}\u{1F600}\u{0000000041}'"), "A😀A");
        assert_eq!(string(r"'\q\/\\'"), "q/\\");
        assert_eq!(string("'line\\\nnext'"), "line\nnext");
        assert_eq!(string("'raw\nbreak\ttab'"), "raw\nbreak\ttab");
        assert_eq!(string("'é … 😀'"), "é … 😀");
        assert_eq!(string("'\\é'"), "é");
        for bad in [
            "'abc",
            "'abc\\'",
            "'\\x4'",
            "'\\xzz'",
            "'\\u12'",
            "'\\u{}'",
            "'\\u{110000}'",
            "'\\u{41'",
            "'\\u{1234567}'",
            "\"abc'",
            "'\\",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn surrogates() {
        assert_eq!(string(r"'\ud83d\ude00'"), "😀");
        assert_eq!(string(r"'\uD83D\u{DE00}'"), "😀");
        let units = |text: &str| match parse(text) {
            Ok(Value::Utf16(u)) => u,
            other => panic!("{text:?} gave {other:?}"),
        };
        assert_eq!(units(r"'\ud800'"), [0xd800]);
        assert_eq!(units(r"'\ud800x'"), [0xd800, 0x78]);
        assert_eq!(units(r"'\ud800\n'"), [0xd800, 0x0a]);
        assert_eq!(units(r"'\ude00'"), [0xde00]);
        assert_eq!(units(r"'\ude00\ud83d'"), [0xde00, 0xd83d]);
        assert_eq!(
            units(r"'a\ud83d\ud83d\ude00é'"),
            [0x61, 0xd83d, 0xd83d, 0xde00, 0xe9]
        );
        assert_eq!(units(r"'\u{d800}'"), [0xd800]);
        // Keys have no UTF-16 form: the lone surrogate becomes U+FFFD there.
        let obj = parse(r"{'k\ud800':1}").unwrap();
        assert_eq!(
            obj.as_object().unwrap().get("k\u{fffd}"),
            Some(&Value::from(1))
        );
        // The serializer writes each lone surrogate back as the escape it came from.
        for text in [r"'\ud800x'", r"'\ude00\ud83d'", r"'é\ud800\n\'\udfff'"] {
            let v = parse(text).unwrap();
            assert_eq!(crate::ser::stringify(&v).unwrap(), text);
            assert_eq!(parse(&crate::ser::stringify(&v).unwrap()).unwrap(), v);
        }
    }

    #[test]
    fn whitespace_and_comments() {
        let v = parse(" \t\n\u{b}\u{c}\r// line\n/* block */ /**/[ 1 /* x */ , // y\n 2 ]//end")
            .unwrap();
        assert_eq!(v, arr(vec![1.into(), 2.into()]));
        assert_eq!(parse("\u{feff}\u{a0}1\u{2028}"), Ok(Value::from(1)));
        assert_eq!(parse("/* a */ /* b */ // c\r1"), Ok(Value::from(1)));
        assert_eq!(
            parse("'/* not a comment */'"),
            Ok(Value::from("/* not a comment */"))
        );
        assert!(parse("/* open").is_err());
        assert!(parse("1 /* open").is_err());
        assert!(parse("/ 1").is_err());
        assert!(parse("// only a comment").is_err());
    }

    #[test]
    fn arrays() {
        let u = Value::Undefined;
        assert_eq!(parse("[]"), Ok(arr(vec![])));
        assert_eq!(
            parse("[1,,2]"),
            Ok(arr(vec![1.into(), u.clone(), 2.into()]))
        );
        assert_eq!(parse("[1,]"), Ok(arr(vec![1.into()])));
        assert_eq!(parse("[,]"), Ok(arr(vec![u.clone()])));
        assert_eq!(parse("[,,]"), Ok(arr(vec![u.clone(), u.clone()])));
        assert_eq!(parse("[1,,]"), Ok(arr(vec![1.into(), u.clone()])));
        assert_eq!(parse("[undefined]"), Ok(arr(vec![u.clone()])));
        assert_eq!(
            parse("[[],[[]]]"),
            Ok(arr(vec![arr(vec![]), arr(vec![arr(vec![])])]))
        );
        for bad in ["[", "[1", "[1,", "[1 2]", "[1;2]", "]", "[}", "[1,]]"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn objects() {
        let v =
            parse("{a:1, 'b-c' : 2, \"d\":3, $x:4, _y:5, é:6, x\u{301}:7, 1:8, 1.50:9, 0x10:10, }")
                .unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            ["a", "b-c", "d", "$x", "_y", "é", "x\u{301}", "1", "1.5", "16"]
        );
        // Wire order is kept, even for integer-like keys.
        let v = parse("{call:[1,'a'],'7':[]}").unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["call", "7"]);
        // `undefined` values dropped; repeated keys keep the first position and last value.
        let v = parse("{a:1,b:undefined,c:2,a:3}").unwrap();
        assert_eq!(v.to_mdsf(), "{a:3,c:2}");
        let v = parse("{a:1,a:undefined}").unwrap();
        assert_eq!(v.to_mdsf(), "{a:1}");
        assert_eq!(parse("{}"), Ok(Value::Object(Object::new())));
        for bad in [
            "{",
            "{a",
            "{a:",
            "{a:1",
            "{a:1,",
            "{a 1}",
            "{a:1 b:2}",
            "{,}",
            "{:1}",
            "{-1:2}",
            "{a-b:1}",
            "{a:}",
            "{'a'}",
            "{a:1}}",
            "{[]:1}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn many_repeated_keys_use_the_index() {
        let mut text = String::from("{");
        for round in 0..3 {
            for i in 0..100 {
                text.push_str(&format!("k{i}:{round},"));
            }
        }
        text.push('}');
        let v = parse(&text).unwrap();
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 100);
        assert_eq!(o.0[0], ("k0".to_owned(), Value::from(2)));
        assert_eq!(o.0[99], ("k99".to_owned(), Value::from(2)));
    }

    #[test]
    fn exactly_one_value() {
        for bad in [
            "", "   ", "1 2", "{} {}", "[]x", "'a''b'", "null,", "{a:1}\0",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.offset <= bad.len(), "{bad}: {err}");
        }
        assert_eq!(parse("1 2").unwrap_err().offset, 2);
        assert_eq!(parse("[1 2]").unwrap_err().offset, 3);
        assert_eq!(parse("{a:'x").unwrap_err().offset, 3);
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = parse(&deep).unwrap_err();
        assert!(err.reason.contains("nesting"), "{err}");
        assert_eq!(err.offset, MAX_DEPTH);
        let objects = "{a:".repeat(MAX_DEPTH + 1);
        assert!(parse(&objects).unwrap_err().reason.contains("nesting"));
        // Far deeper than any stack would survive without the limit.
        let hostile = "[{a:".repeat(1_000_000);
        assert!(parse(&hostile).is_err());
    }
}
