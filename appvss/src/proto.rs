//! The app protocol's wire types, shared by vssd (the agent) and every client.
//!
//! Framing: one JSON object per line (UTF-8, `\n`-terminated), at most [`MAX_MESSAGE_BYTES`]
//! including the newline. Each object has a `type`. Messages that expect an answer carry an
//! `id`; the answer carries the same number as `re`. See `appvss/PROTOCOL.md`.

use serde::{Deserialize, Serialize};

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

/// Messages vssd sends to an application.
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
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5), None);
        assert_eq!(negotiate(0, 0), None);
    }
}
