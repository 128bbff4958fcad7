//! Splits the byte stream of a QGA channel into messages.
//!
//! qemu-ga reads a JSON *stream*, not lines: an object may span reads and lines, several may
//! share one read, and an unfinished object waits for more bytes. A 0xFF byte (never valid in
//! UTF-8 JSON) resets the parser: clients send it before `guest-sync-delimited` to throw away
//! whatever half-message a previous client left behind.
//!
//! Invariants: memory per connection is bounded by `max_bytes` (a longer message is counted,
//! not kept, and answered with an error once it ends); nesting is bounded likewise; after any
//! error the splitter is ready for the next message.

use crate::reply::QgaError;

/// What the splitter found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// One complete top-level JSON text (object, array or scalar), not yet parsed.
    Message(Vec<u8>),
    /// A message longer than the limit ended; it was dropped.
    TooLarge { len: usize },
    /// A message nested deeper than the limit; dropped up to its end.
    TooDeep,
    /// Stray closing bracket outside any message.
    Unbalanced,
    /// A 0xFF byte interrupted an unfinished message, which was dropped.
    Interrupted,
}

impl Event {
    /// The error reply for an event that is not a message; None for a message. `max_bytes`
    /// is the splitter's limit, named after vssd's setting so the host knows what to raise.
    pub fn error(&self, max_bytes: usize) -> Option<QgaError> {
        Some(QgaError::generic(match self {
            Event::Message(_) => return None,
            Event::TooLarge { len } => {
                format!("request of {len} bytes exceeds the limit of {max_bytes} bytes (max-message-bytes)")
            }
            Event::TooDeep => "JSON nesting too deep".into(),
            Event::Unbalanced => "JSON parse error, stray '}' or ']'".into(),
            Event::Interrupted => "JSON parse error, message interrupted by a 0xFF reset byte; it was dropped".into(),
        }))
    }
}

/// qemu-ga's nesting limit (`MAX_NESTING`).
const MAX_DEPTH: usize = 1024;

/// Incremental splitter; feed it bytes as they arrive.
#[derive(Debug)]
pub struct Splitter {
    max_bytes: usize,
    buf: Vec<u8>,
    /// Length of the current message, also when it is no longer kept.
    len: usize,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// In a top-level scalar (`123`, `"x"`, `true`): ends at whitespace or a bracket.
    scalar: bool,
    /// The current message is being dropped (too large or too deep).
    dropping: Option<Drop>,
}

#[derive(Debug, Clone, Copy)]
enum Drop {
    Large,
    Deep,
}

impl Splitter {
    /// A splitter that keeps at most `max_bytes` of one message.
    pub fn new(max_bytes: usize) -> Self {
        Splitter {
            max_bytes,
            buf: Vec::new(),
            len: 0,
            depth: 0,
            in_string: false,
            escape: false,
            scalar: false,
            dropping: None,
        }
    }

    fn in_message(&self) -> bool {
        self.len > 0
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.len = 0;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.scalar = false;
        self.dropping = None;
    }

    fn push(&mut self, b: u8) {
        self.len += 1;
        if self.dropping.is_none() && self.len > self.max_bytes {
            self.dropping = Some(Drop::Large);
            self.buf = Vec::new();
        }
        if self.dropping.is_none() {
            self.buf.push(b);
        }
    }

    fn finish(&mut self, out: &mut Vec<Event>) {
        let ev = match self.dropping {
            None => Event::Message(std::mem::take(&mut self.buf)),
            Some(Drop::Large) => Event::TooLarge { len: self.len },
            Some(Drop::Deep) => Event::TooDeep,
        };
        out.push(ev);
        self.reset();
    }

    /// Feeds bytes; returns the events they complete, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        for &b in data {
            if b == 0xFF {
                if self.in_message() {
                    out.push(Event::Interrupted);
                }
                self.reset();
                continue;
            }
            if self.scalar {
                if self.in_string {
                    // A top-level string: ends at its closing quote.
                    self.push(b);
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.finish(&mut out);
                    }
                    continue;
                }
                if b.is_ascii_whitespace() {
                    self.finish(&mut out);
                    continue;
                }
                if !matches!(b, b'{' | b'[' | b'}' | b']') {
                    self.push(b);
                    continue;
                }
                // A bracket ends the scalar and is read afresh below.
                self.finish(&mut out);
            }
            if !self.in_message() {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' | b'[' => {
                        self.depth = 1;
                        self.push(b);
                    }
                    b'}' | b']' => out.push(Event::Unbalanced),
                    _ => {
                        self.scalar = true;
                        self.in_string = b == b'"';
                        self.push(b);
                    }
                }
                continue;
            }
            self.push(b);
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH && self.dropping.is_none() {
                        self.dropping = Some(Drop::Deep);
                        self.buf = Vec::new();
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.finish(&mut out);
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(ev: Vec<Event>) -> Vec<String> {
        ev.into_iter()
            .map(|e| match e {
                Event::Message(m) => String::from_utf8(m).unwrap(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn splits_objects_regardless_of_lines() {
        let mut s = Splitter::new(1024);
        let r = msgs(s.feed(b"{\"a\":1}{\"b\":\n2}\n\n  {\"c\":\"}{\"}"));
        assert_eq!(r, vec!["{\"a\":1}", "{\"b\":\n2}", "{\"c\":\"}{\"}"]);
    }

    #[test]
    fn an_unfinished_object_waits_for_more_bytes() {
        let mut s = Splitter::new(1024);
        assert!(s.feed(b"{\"execute\":").is_empty());
        assert!(s.feed(b"\"guest-ping\"").is_empty());
        assert_eq!(msgs(s.feed(b"}")), vec!["{\"execute\":\"guest-ping\"}"]);
    }

    #[test]
    fn escaped_quotes_and_brackets_in_strings_do_not_end_a_message() {
        let mut s = Splitter::new(1024);
        assert_eq!(msgs(s.feed(br#"{"a":"x\"}\\"}"#)), vec![r#"{"a":"x\"}\\"}"#]);
    }

    #[test]
    fn ff_resets_and_reports_an_interrupted_message() {
        let mut s = Splitter::new(1024);
        let r = msgs(s.feed(b"\xff{\"execute\":\xff{\"x\":1}"));
        assert_eq!(r, vec!["Interrupted", "{\"x\":1}"]);
    }

    #[test]
    fn a_message_over_the_limit_is_dropped_and_reported_once_it_ends() {
        let mut s = Splitter::new(16);
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 100));
        big.extend(b"\"}{\"b\":1}");
        let r = s.feed(&big);
        assert_eq!(r[0], Event::TooLarge { len: 108 });
        assert_eq!(r[1], Event::Message(b"{\"b\":1}".to_vec()));
        assert!(s.buf.capacity() < 1024);
    }

    #[test]
    fn deep_nesting_is_dropped() {
        let mut s = Splitter::new(1 << 20);
        let mut m = vec![b'['; 2000];
        m.extend(vec![b']'; 2000]);
        assert_eq!(s.feed(&m), vec![Event::TooDeep]);
        assert_eq!(msgs(s.feed(b"{}")), vec!["{}"]);
    }

    #[test]
    fn events_other_than_messages_are_generic_errors() {
        assert_eq!(Event::Message(b"{}".to_vec()).error(10), None);
        let e = Event::TooLarge { len: 20 }.error(10).unwrap();
        assert_eq!(e.class, crate::reply::ErrorClass::GenericError);
        assert_eq!(e.desc, "request of 20 bytes exceeds the limit of 10 bytes (max-message-bytes)");
        assert!(Event::Interrupted.error(10).unwrap().desc.contains("0xFF"));
        assert!(Event::TooDeep.error(10).is_some() && Event::Unbalanced.error(10).is_some());
    }

    #[test]
    fn top_level_scalars_and_stray_brackets_are_events() {
        let mut s = Splitter::new(1024);
        let r = msgs(s.feed(b"123 \"str\" true\n} {\"ok\":1}"));
        assert_eq!(r, vec!["123", "\"str\"", "true", "Unbalanced", "{\"ok\":1}"]);
    }
}
