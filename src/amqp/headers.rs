//! Header values as text: what Warren and the broker write into headers (a reason, a queue
//! name, a `traceparent`) is text, sent as a long or a short string.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

/// `value` as text, if it is a string and valid UTF-8.
pub fn text(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str()),
        _ => None,
    }
}

/// The header `name` of `properties` as text, if it is there and a string.
pub fn header_text<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(text)
}
