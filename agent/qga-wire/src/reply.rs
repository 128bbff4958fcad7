//! QGA's error classes and the bytes of a reply.
//!
//! A reply is `{"return": VALUE}` or `{"error": {"class": CLASS, "desc": TEXT}}`, with the
//! request's top-level `id` echoed when it had one, and exactly one `\n` after it. A successful
//! `guest-sync-delimited` reply starts with one 0xFF byte, so a client can find it after a
//! reset; nothing else does (errors never do). qemu-ga uses two classes only:
//! `GenericError` and `CommandNotFound` (docs/qga-wire.md, rule 4).
//!
//! The JSON is serde_json's compact form with members in sorted order, as vssd has always
//! written it; clients read values, not bytes.

use serde_json::{json, Value};

/// The class of a QGA error, as qemu-ga 7.2 uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Parse errors, a bad envelope, bad, missing or extra arguments, limits, failures.
    GenericError,
    /// An unknown command, or one disabled (while frozen).
    CommandNotFound,
}

impl ErrorClass {
    /// The class as it goes on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QGA error: what goes into a reply's `error` member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QgaError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QgaError {
    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        QgaError { class: ErrorClass::GenericError, desc: desc.into() }
    }

    /// qemu-ga's answer to a command it does not know.
    pub fn not_found(name: &str) -> Self {
        QgaError { class: ErrorClass::CommandNotFound, desc: format!("The command {name} has not been found") }
    }

    /// qemu-ga's answer to a command that may not run while filesystems are frozen.
    pub fn disabled_while_frozen(name: &str) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: format!("Command {name} has been disabled: the agent is in frozen state"),
        }
    }
}

/// A reply ready to write: the bytes including the trailing newline (and the leading 0xFF of a
/// `guest-sync-delimited` answer).
pub type ReplyBytes = Vec<u8>;

fn encode(mut body: Value, id: Option<Value>, delimited: bool) -> ReplyBytes {
    if let (Some(id), Value::Object(m)) = (id, &mut body) {
        m.insert("id".into(), id);
    }
    let mut out = Vec::with_capacity(64);
    if delimited {
        out.push(0xFF);
    }
    // Writing a Value to a Vec cannot fail: no I/O, and every key is a string.
    serde_json::to_writer(&mut out, &body).expect("a Value always serialises");
    out.push(b'\n');
    out
}

/// `{"return": value}` (with `id` when the request had one). `delimited` puts the 0xFF of a
/// `guest-sync-delimited` answer in front.
pub fn encode_return(value: Value, id: Option<Value>, delimited: bool) -> ReplyBytes {
    encode(json!({ "return": value }), id, delimited)
}

/// `{"error": {"class": ..., "desc": ...}}` (with `id` when the request had one).
pub fn encode_error(e: &QgaError, id: Option<Value>) -> ReplyBytes {
    encode(json!({"error": {"class": e.class.as_str(), "desc": e.desc}}), id, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(bytes: &[u8]) -> Value {
        assert_eq!(bytes.last(), Some(&b'\n'), "a reply ends in a newline");
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "exactly one newline");
        serde_json::from_slice(bytes).unwrap()
    }

    /// The replies recorded from qemu-ga 7.2 in docs/qga-wire.md, as values.
    #[test]
    fn replies_match_the_recorded_qemu_ga_answers() {
        let cases: Vec<(ReplyBytes, &str)> = vec![
            (encode_return(json!({}), None, false), r#"{"return": {}}"#),
            (encode_return(json!(1234), None, false), r#"{"return": 1234}"#),
            (encode_return(json!({}), Some(json!(7)), false), r#"{"return": {}, "id": 7}"#),
            (encode_return(json!({}), Some(json!({"a": [1, 2]})), false), r#"{"return": {}, "id": {"a": [1, 2]}}"#),
            (encode_return(json!({}), Some(Value::Null), false), r#"{"return": {}, "id": null}"#),
            (encode_return(json!(5), Some(json!("req-1")), false), r#"{"return": 5, "id": "req-1"}"#),
            (encode_return(json!("frozen"), None, false), r#"{"return": "frozen"}"#),
            (
                encode_error(&QgaError::not_found("no-such-cmd"), Some(json!(9))),
                r#"{"id": 9, "error": {"class": "CommandNotFound", "desc": "The command no-such-cmd has not been found"}}"#,
            ),
            (
                encode_error(&QgaError::generic("Parameter 'id' is missing"), None),
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}"#,
            ),
            (
                encode_error(&QgaError::disabled_while_frozen("guest-fsfreeze-freeze-list"), None),
                r#"{"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze-list has been disabled: the agent is in frozen state"}}"#,
            ),
        ];
        for (bytes, recorded) in cases {
            assert_ne!(bytes[0], 0xFF);
            assert_eq!(value(&bytes), serde_json::from_str::<Value>(recorded).unwrap(), "{recorded}");
        }
    }

    #[test]
    fn only_a_delimited_return_starts_with_ff() {
        // qemu-ga: b'\xff{"return": 5, "id": "t"}\n'
        let r = encode_return(json!(5), Some(json!("t")), true);
        assert_eq!(r[0], 0xFF);
        assert_eq!(value(&r[1..]), json!({"return": 5, "id": "t"}));
        assert!(!r[1..].contains(&0xFF));
        assert_ne!(encode_error(&QgaError::generic("x"), None)[0], 0xFF);
    }

    #[test]
    fn bytes_are_compact_and_sorted_as_vssd_has_always_written_them() {
        assert_eq!(encode_return(json!({}), Some(json!(3)), false), b"{\"id\":3,\"return\":{}}\n");
        assert_eq!(
            encode_error(&QgaError::generic("d"), None),
            b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"d\"}}\n"
        );
    }
}
