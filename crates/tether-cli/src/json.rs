//! Converting JSTP values to JSON for the command's output, and reading arguments.

use serde_json::{Map, Number, Value as Json};
use tether::Value;

/// A JSTP value as JSON. `undefined` and holes become `null`; JSTP numbers are doubles, so
/// integral ones print without a fraction.
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Undefined | Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Json::Number(Number::from(*n as i64))
            } else {
                Number::from_f64(*n).map_or(Json::Null, Json::Number)
            }
        }
        Value::String(s) => Json::String(s.clone()),
        // serde_json strings are UTF-8: lone surrogates become U+FFFD.
        Value::Utf16(_) => Json::String(value.to_js_string()),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Object(obj) => Json::Object(
            obj.iter()
                .map(|(k, v)| (k.to_owned(), to_json(v)))
                .collect::<Map<_, _>>(),
        ),
    }
}

/// A list of values as a JSON array.
pub fn list_to_json(values: &[Value]) -> Json {
    Json::Array(values.iter().map(to_json).collect())
}

/// Reads one command-line argument as a JSTP value: anything the record-serialization parser
/// accepts (`42`, `'text'`, `[1,2]`, `{a:1}`, `true`), otherwise the argument as a string.
pub fn parse_arg(arg: &str) -> Value {
    tether_wire::parse(arg).unwrap_or_else(|_| Value::from(arg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_as_values_or_fall_back_to_strings() {
        assert_eq!(parse_arg("20"), Value::from(20));
        assert_eq!(parse_arg("'hi'"), Value::from("hi"));
        assert_eq!(
            parse_arg("[1,'a']"),
            Value::from(vec![Value::from(1), Value::from("a")])
        );
        assert_eq!(parse_arg("hello world"), Value::from("hello world"));
    }

    #[test]
    fn values_become_json() {
        let v = tether_wire::parse("{a:1,b:[null,undefined,'x',2.5,true]}").unwrap();
        assert_eq!(
            to_json(&v).to_string(),
            r#"{"a":1,"b":[null,null,"x",2.5,true]}"#
        );
    }
}
