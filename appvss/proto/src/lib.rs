//! The appvss protocol between vssd (the agent) and the applications that hold a freeze: its
//! message types, the rules for an app's name, version negotiation and the line framing with
//! its size limit. vssd and the `appvss` client library both use this crate, so the two sides
//! cannot disagree; vssd gets the protocol without linking the client, its C ABI or its CLI.
//!
//! Framing: one JSON object per line (UTF-8, `\n`-terminated), at most [`MAX_MESSAGE_BYTES`]
//! including the newline ([`framing`]). Each object has a `type`. Messages that expect an
//! answer carry an `id`; the answer carries the same number as `re`. See `appvss/PROTOCOL.md`.
//!
//! Invariants: every message this crate encodes decodes back to itself; unknown fields and
//! types are errors (new fields come only with a new protocol version).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod framing;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use framing::{FrameError, LineReader};

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// Largest message either side accepts, newline included.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Where vssd listens for applications by default.
pub const DEFAULT_SOCKET: &str = "/run/vssd/appvss.sock";
/// Longest application name accepted in a hello.
pub const MAX_NAME_BYTES: usize = 128;

/// Messages an application sends to vssd.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AppMessage {
    /// First message on a connection: who the app is and which versions it speaks.
    Hello {
        id: u64,
        /// A short name for reports and logs, e.g. `postgresql` or `orders-db`.
        name: String,
        /// Lowest and highest protocol version the app speaks.
        min_version: u32,
        max_version: u32,
    },
    /// PREPARE answered: the app can freeze.
    Ready { re: u64 },
    /// PREPARE answered: the app cannot freeze now; the reason goes into the report.
    Veto { re: u64, reason: String },
    /// FREEZE answered: the app has flushed and holds (stops writing) until THAW.
    Held { re: u64 },
    /// FREEZE answered: the app could not flush; the reason goes into the report.
    Failed { re: u64, reason: String },
    /// THAW acknowledged (optional; vssd never waits for it).
    Thawed { re: u64 },
}

/// A hello's fields: who the app is and which versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The hello's `id`, answered by the welcome's `re`.
    pub id: u64,
    /// The app's name, for reports and logs; see [`check_name`].
    pub name: String,
    /// The lowest protocol version the app speaks.
    pub min_version: u32,
    /// The highest protocol version the app speaks.
    pub max_version: u32,
}

/// Every message an app sends after its hello: an answer (`re`) to a question of vssd.
///
/// Split from [`AppMessage`] so that code serving a registered app cannot be handed a hello:
/// a second hello is a protocol error the server answers, not a case it must remember to
/// exclude.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppAnswer {
    /// PREPARE answered: the app can freeze.
    Ready {
        /// The PREPARE's `id`.
        re: u64,
    },
    /// PREPARE answered: the app cannot freeze now.
    Veto {
        /// The PREPARE's `id`.
        re: u64,
        /// Why, for the report.
        reason: String,
    },
    /// FREEZE answered: flushed, holding.
    Held {
        /// The FREEZE's `id`.
        re: u64,
    },
    /// FREEZE answered: could not flush.
    Failed {
        /// The FREEZE's `id`.
        re: u64,
        /// Why, for the report.
        reason: String,
    },
    /// THAW acknowledged.
    Thawed {
        /// The THAW's `id`.
        re: u64,
    },
}

impl AppMessage {
    /// The hello, or the answer this message is instead.
    pub fn into_hello(self) -> Result<Hello, AppAnswer> {
        match self.into_answer() {
            Ok(a) => Err(a),
            Err(h) => Ok(h),
        }
    }

    /// The answer, or the hello this message is instead.
    pub fn into_answer(self) -> Result<AppAnswer, Hello> {
        Ok(match self {
            AppMessage::Hello { id, name, min_version, max_version } => {
                return Err(Hello { id, name, min_version, max_version })
            }
            AppMessage::Ready { re } => AppAnswer::Ready { re },
            AppMessage::Veto { re, reason } => AppAnswer::Veto { re, reason },
            AppMessage::Held { re } => AppAnswer::Held { re },
            AppMessage::Failed { re, reason } => AppAnswer::Failed { re, reason },
            AppMessage::Thawed { re } => AppAnswer::Thawed { re },
        })
    }
}

impl From<Hello> for AppMessage {
    fn from(h: Hello) -> AppMessage {
        AppMessage::Hello { id: h.id, name: h.name, min_version: h.min_version, max_version: h.max_version }
    }
}

impl From<AppAnswer> for AppMessage {
    fn from(a: AppAnswer) -> AppMessage {
        match a {
            AppAnswer::Ready { re } => AppMessage::Ready { re },
            AppAnswer::Veto { re, reason } => AppMessage::Veto { re, reason },
            AppAnswer::Held { re } => AppMessage::Held { re },
            AppAnswer::Failed { re, reason } => AppMessage::Failed { re, reason },
            AppAnswer::Thawed { re } => AppMessage::Thawed { re },
        }
    }
}

/// Messages vssd sends to an application.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AgentMessage {
    /// The hello was accepted.
    Welcome {
        re: u64,
        /// The version both sides speak from now on.
        version: u32,
        /// vssd's number for this registration (in reports and logs).
        app_id: u64,
    },
    /// A freeze is coming: answer `ready` or `veto` within `deadline_ms`.
    Prepare { id: u64, freeze_id: u64, deadline_ms: u64 },
    /// Flush now and answer `held` within `deadline_ms`; then keep holding until THAW, but
    /// never longer than `max_hold_ms` from now (vssd's own freeze deadline): an app whose
    /// vssd went silent releases by itself.
    Freeze { id: u64, freeze_id: u64, deadline_ms: u64, max_hold_ms: u64 },
    /// Stop holding: the freeze `freeze_id` is over (completed, aborted, or timed out).
    Thaw { id: u64, freeze_id: u64, reason: ThawReason },
    /// Something the app sent was wrong. `fatal`: vssd closes the connection after this.
    Error {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        re: Option<u64>,
        code: ErrorCode,
        message: String,
        fatal: bool,
    },
}

/// Why a THAW was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThawReason {
    /// The snapshot was taken; normal end.
    Completed,
    /// The freeze was abandoned (another app vetoed or failed, a filesystem failed).
    Aborted,
    /// vssd thawed by itself (deadline, host gone, shutdown).
    Timeout,
}

/// Error codes vssd sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON, or not a known message, or a field missing or of the wrong type.
    BadMessage,
    /// Over [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// The first message was not a hello, or a second hello came.
    BadHello,
    /// No protocol version in common.
    VersionUnsupported,
    /// The uid already has as many registrations as vssd allows.
    TooManyRegistrations,
    /// An answer (`re`) to nothing vssd asked, or to a question already answered.
    UnexpectedReply,
}

/// The protocol's name for an error code (`bad-hello`, ...), as on the wire.
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadMessage => "bad-message",
        ErrorCode::TooLarge => "too-large",
        ErrorCode::BadHello => "bad-hello",
        ErrorCode::VersionUnsupported => "version-unsupported",
        ErrorCode::TooManyRegistrations => "too-many-registrations",
        ErrorCode::UnexpectedReply => "unexpected-reply",
    }
}

/// Why a name is not a valid application name (see [`check_name`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("the name is empty; it must be 1 to {MAX_NAME_BYTES} bytes without control characters")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("the name is {len} bytes; it must be 1 to {MAX_NAME_BYTES} bytes without control characters")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name has a control character (it goes into logs and reports, one line each).
    #[error("the name has a control character; it must be 1 to {MAX_NAME_BYTES} bytes without control characters")]
    ControlCharacter,
}

/// Checks an application's name: 1 to [`MAX_NAME_BYTES`] bytes of UTF-8 without control
/// characters. vssd refuses a hello with another name; the client checks before connecting.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        Err(NameError::Empty)
    } else if name.len() > MAX_NAME_BYTES {
        Err(NameError::TooLong { len: name.len() })
    } else if name.chars().any(char::is_control) {
        Err(NameError::ControlCharacter)
    } else {
        Ok(())
    }
}

/// A line that is not a message of this protocol version: not UTF-8, not JSON, an unknown
/// type, a missing or unknown field.
#[derive(Debug, thiserror::Error)]
#[error("not a message of appvss protocol version {PROTOCOL_VERSION}")]
pub struct DecodeError {
    excerpt: String,
    #[source]
    source: serde_json::Error,
}

impl DecodeError {
    /// The start of the line (at most 200 bytes, invalid UTF-8 replaced), for an error message.
    pub fn excerpt(&self) -> &str {
        &self.excerpt
    }

    /// What the parser said, e.g. ``unknown variant `dance` ``.
    pub fn detail(&self) -> &serde_json::Error {
        &self.source
    }
}

/// Decodes one line (without its newline) as a message.
pub fn decode<T: DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(line).map_err(|source| DecodeError {
        excerpt: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
        source,
    })
}

/// Encodes a message as one line, newline included.
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(m).expect("protocol messages always serialise");
    v.push(b'\n');
    v
}

/// Picks the version both sides speak, if any.
pub fn negotiate(min: u32, max: u32) -> Option<u32> {
    let hi = max.min(PROTOCOL_VERSION);
    (hi >= min.max(MIN_PROTOCOL_VERSION)).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_documented_wire_form() {
        let hello = AppMessage::Hello { id: 1, name: "db".into(), min_version: 1, max_version: 1 };
        assert_eq!(
            String::from_utf8(encode(&hello)).unwrap(),
            "{\"type\":\"hello\",\"id\":1,\"name\":\"db\",\"min_version\":1,\"max_version\":1}\n"
        );
        let f = AgentMessage::Freeze { id: 7, freeze_id: 3, deadline_ms: 10000, max_hold_ms: 60000 };
        assert_eq!(
            String::from_utf8(encode(&f)).unwrap(),
            "{\"type\":\"freeze\",\"id\":7,\"freeze_id\":3,\"deadline_ms\":10000,\"max_hold_ms\":60000}\n"
        );
        let t: AgentMessage =
            serde_json::from_str("{\"type\":\"thaw\",\"id\":9,\"freeze_id\":3,\"reason\":\"aborted\"}").unwrap();
        assert_eq!(t, AgentMessage::Thaw { id: 9, freeze_id: 3, reason: ThawReason::Aborted });
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        assert!(serde_json::from_str::<AppMessage>("{\"type\":\"held\",\"re\":1,\"x\":2}").is_err());
        assert!(serde_json::from_str::<AppMessage>("{\"type\":\"dance\"}").is_err());
    }

    #[test]
    fn names_are_one_to_128_bytes_without_control_characters() {
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name(&"x".repeat(129)), Err(NameError::TooLong { len: 129 }));
        assert_eq!(check_name("a\nb"), Err(NameError::ControlCharacter));
        assert_eq!(check_name("a\u{7f}"), Err(NameError::ControlCharacter));
        assert_eq!(check_name(&"x".repeat(128)), Ok(()));
        assert_eq!(check_name("orders-db (é)"), Ok(()));
        // 64 two-byte characters: 128 bytes, the limit is in bytes.
        assert_eq!(check_name(&"é".repeat(64)), Ok(()));
        assert_eq!(check_name(&"é".repeat(65)), Err(NameError::TooLong { len: 130 }));
    }

    #[test]
    fn a_second_hello_is_told_apart_from_answers_by_type() {
        let hello: AppMessage =
            decode(b"{\"type\":\"hello\",\"id\":1,\"name\":\"db\",\"min_version\":1,\"max_version\":1}").unwrap();
        let h = hello.clone().into_hello().unwrap();
        assert_eq!(h.name, "db");
        assert_eq!(hello.clone().into_answer(), Err(h.clone()));
        assert_eq!(AppMessage::from(h), hello);
        let held: AppMessage = decode(b"{\"type\":\"held\",\"re\":4}").unwrap();
        assert_eq!(held.clone().into_answer(), Ok(AppAnswer::Held { re: 4 }));
        assert_eq!(held.clone().into_hello(), Err(AppAnswer::Held { re: 4 }));
        assert_eq!(AppMessage::from(AppAnswer::Held { re: 4 }), held);
    }

    #[test]
    fn invalid_utf8_and_invalid_json_are_decode_errors_with_an_excerpt() {
        let e = decode::<AppMessage>(b"\xff\xfe{}").unwrap_err();
        assert!(e.excerpt().starts_with('\u{fffd}'), "{:?}", e.excerpt());
        let e = decode::<AppMessage>(b"{\"type\":\"ready\"").unwrap_err();
        assert_eq!(e.excerpt(), "{\"type\":\"ready\"");
        let e = decode::<AppMessage>(b"{\"type\":\"dance\"}").unwrap_err();
        assert!(e.detail().to_string().contains("dance"), "{}", e.detail());
        // The message does not repeat the parser's text: that is the source.
        assert!(!e.to_string().contains("dance"), "{e}");
        let long = vec![b'x'; 1000];
        assert_eq!(decode::<AppMessage>(&long).unwrap_err().excerpt().len(), 200);
    }

    #[test]
    fn code_names_are_the_wire_names() {
        for code in [
            ErrorCode::BadMessage,
            ErrorCode::TooLarge,
            ErrorCode::BadHello,
            ErrorCode::VersionUnsupported,
            ErrorCode::TooManyRegistrations,
            ErrorCode::UnexpectedReply,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code_name(code));
        }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5), None);
        assert_eq!(negotiate(0, 0), None);
    }
}
