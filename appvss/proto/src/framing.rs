//! Lines off a byte stream, at most a limit each, newline included
//! ([`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES) on both sides of the protocol).
//!
//! Invariants:
//! - [`LineReader::next_line`] is cancel-safe (both sides poll it inside `select!`): all state
//!   lives in the reader, and a read dropped half-way loses no bytes.
//! - Memory stays bounded by the limit, whatever the peer sends: a line over the limit is
//!   reported as [`FrameError::TooLarge`] as soon as it is known to be too long (not when its
//!   newline finally comes), and the rest of it is discarded unread into the buffer. The
//!   reader stays usable: the next line after it is read normally.
//! - A line is bytes: UTF-8 and JSON are checked by [`LineReader::next_message`].
//! - A server can refuse a peer that keeps streaming: with [`LineReader::with_flood_limit`],
//!   an oversized line that goes on for more than that many further bytes is reported once
//!   more, and [`LineReader::kept_streaming`] says why; and [`LineReader::has_partial`] lets it
//!   time out a line that was begun and never finished.

use std::io;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::DecodeError;

/// Why no line (or message) came.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer sent a line over the limit. Its start is dropped, and so is the rest of it,
    /// up to its newline; the reader goes on with the next line.
    #[error("a line over the limit of {max} bytes")]
    TooLarge {
        /// The limit, newline included.
        max: usize,
    },
    /// The stream failed.
    #[error("reading the connection failed")]
    Io(#[source] io::Error),
    /// A whole line came that is not a message ([`LineReader::next_message`] only).
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads `\n`-terminated lines of at most `max` bytes (newline included) from `R`.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    /// In the middle of a line already reported too large: drop bytes up to its newline.
    discarding: bool,
    /// Bytes of the current oversized line dropped since it was reported.
    discarded: usize,
    /// Report an oversized line again once this many more of its bytes were dropped.
    flood_limit: Option<usize>,
    /// The current oversized line went past `flood_limit`.
    flooded: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// A reader of lines of at most `max` bytes, newline included (at least 1).
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: Vec::with_capacity(4096),
            scanned: 0,
            max: max.max(1),
            discarding: false,
            discarded: 0,
            flood_limit: None,
            flooded: false,
        }
    }

    /// The same reader, but an oversized line that goes on for more than `limit` bytes after
    /// it was reported [`FrameError::TooLarge`] is reported `TooLarge` a second time, with
    /// [`kept_streaming`](Self::kept_streaming) true: a peer that does that is not sending
    /// lines, and a server should disconnect it. Without a limit such a line is dropped
    /// silently to its end, however long.
    pub fn with_flood_limit(mut self, limit: usize) -> Self {
        self.flood_limit = Some(limit);
        self
    }

    /// The last [`FrameError::TooLarge`] was the second one of a line that went past the flood
    /// limit. Reset when a line ends.
    pub fn kept_streaming(&self) -> bool {
        self.flooded
    }

    /// Bytes of an unfinished line are waiting (or an oversized line is still being dropped):
    /// the peer began a line and has not ended it.
    pub fn has_partial(&self) -> bool {
        self.discarding || !self.buf.is_empty()
    }

    /// The next line without its newline; `Ok(None)` at the end of the stream (a partial line
    /// at the end is dropped: the peer never finished it).
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            if self.discarding {
                match self.buf.iter().position(|&b| b == b'\n') {
                    Some(pos) => {
                        self.buf.drain(..=pos);
                        self.discarding = false;
                        self.flooded = false;
                        self.discarded = 0;
                    }
                    None => {
                        self.discarded = self.discarded.saturating_add(self.buf.len());
                        self.buf.clear();
                        if !self.flooded && self.flood_limit.is_some_and(|l| self.discarded > l) {
                            self.flooded = true;
                            self.scanned = 0;
                            return Err(FrameError::TooLarge { max: self.max });
                        }
                    }
                }
                self.scanned = 0;
            }
            if !self.discarding {
                if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                    let end = self.scanned + pos;
                    self.scanned = 0;
                    if end + 1 > self.max {
                        self.buf.drain(..=end);
                        return Err(FrameError::TooLarge { max: self.max });
                    }
                    let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                    line.pop();
                    return Ok(Some(line));
                }
                self.scanned = self.buf.len();
                if self.buf.len() >= self.max {
                    // `max` bytes and no newline: with its newline it cannot fit.
                    self.buf.clear();
                    self.scanned = 0;
                    self.discarding = true;
                    self.discarded = 0;
                    return Err(FrameError::TooLarge { max: self.max });
                }
            }
            // Never read past the limit into the buffer: what lies beyond it is either the
            // newline that makes the line fit or the byte that makes it too large.
            let mut chunk = [0u8; 8192];
            let want = if self.discarding { chunk.len() } else { chunk.len().min(self.max - self.buf.len()) };
            let n = self.inner.read(&mut chunk[..want]).await.map_err(FrameError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next line decoded as a `T`. A line that does not decode is
    /// [`FrameError::Decode`]; the reader goes on with the next line.
    pub async fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_line().await? {
            Some(line) => Ok(Some(crate::decode(&line)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;
    use crate::AppMessage;

    fn reader(bytes: &'static [u8], max: usize) -> LineReader<&'static [u8]> {
        LineReader::new(bytes, max)
    }

    /// Hands out its chunks one read at a time, as a socket does.
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if !self.0.is_empty() {
                let c = &mut self.0[0];
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                c.drain(..n);
                if c.is_empty() {
                    self.0.remove(0);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn chunks(parts: &[&[u8]], max: usize) -> LineReader<Chunks> {
        LineReader::new(Chunks(parts.iter().map(|p| p.to_vec()).collect()), max)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn splits_lines_and_ends_cleanly() {
        let mut r = reader(b"{\"a\":1}\n{\"b\":2}\n", 64);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"b\":2}");
        assert!(r.next_line().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_of_exactly_the_limit_passes_and_one_byte_more_is_too_large() {
        // 9 bytes + newline = 10 = the limit.
        let mut r = reader(b"123456789\n", 10);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"123456789");
        let mut r = reader(b"1234567890\n", 10);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 10 })));
        let mut r = reader(b"12345678901234567890", 10);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 10 })));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_line_is_one_error_and_the_next_line_is_read() {
        let data: &'static [u8] =
            [b"{\"a\":1}\n".to_vec(), vec![b'x'; 100_000], b"\n{\"b\":2}\n".to_vec()].concat().leak();
        let mut r = reader(data, 32);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"a\":1}");
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 32 })));
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"b\":2}");
        assert!(r.next_line().await.unwrap().is_none());
        // The buffer never held the oversized line.
        assert!(r.buf.capacity() < 16 * 1024, "{}", r.buf.capacity());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_line_is_reported_before_its_newline_comes() {
        // A peer that never sends a newline gets its error at once, not never.
        let mut r = chunks(&[&[b'x'; 40], &[b'y'; 40]], 32);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { .. })));
        assert!(r.next_line().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_partial_last_line_is_dropped() {
        let mut r = reader(b"{}\n{\"half", 64);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{}");
        assert!(r.next_line().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_split_across_reads_is_put_together() {
        let mut r = chunks(&[b"{\"type\":", b"\"held\",", b"\"re\":3}\n{\"ty", b"pe\":\"ready\",\"re\":4}\n"], 64);
        assert_eq!(r.next_message::<AppMessage>().await.unwrap(), Some(AppMessage::Held { re: 3 }));
        assert_eq!(r.next_message::<AppMessage>().await.unwrap(), Some(AppMessage::Ready { re: 4 }));
        assert!(r.next_message::<AppMessage>().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_line_split_across_reads_is_too_large_and_then_skipped() {
        let mut r = chunks(&[b"12345", b"67890", b"abc\nok", b"\n"], 10);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { .. })));
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"ok");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn invalid_utf8_and_json_are_decode_errors_and_the_reader_goes_on() {
        let mut r = reader(b"\xff\xfe\n{\"type\":\n{\"type\":\"thawed\",\"re\":1}\n", 64);
        let e = r.next_message::<AppMessage>().await.unwrap_err();
        assert!(matches!(&e, FrameError::Decode(d) if d.excerpt() == "\u{fffd}\u{fffd}"), "{e:?}");
        assert!(matches!(r.next_message::<AppMessage>().await, Err(FrameError::Decode(_))));
        assert_eq!(r.next_message::<AppMessage>().await.unwrap(), Some(AppMessage::Thawed { re: 1 }));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_that_goes_on_past_the_flood_limit_is_reported_again_as_kept_streaming() {
        let mut r = chunks(&[&[b'x'; 40], &[b'y'; 40], &[b'z'; 40], b"\nok\n"], 32).with_flood_limit(50);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 32 })));
        assert!(!r.kept_streaming());
        assert!(r.has_partial());
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 32 })));
        assert!(r.kept_streaming());
        // The line still ends and the reader goes on (the server chooses to disconnect).
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"ok");
        assert!(!r.kept_streaming());
        assert!(!r.has_partial());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_flood_limit_a_long_line_is_one_error() {
        let mut r = chunks(&[&[b'x'; 40], &[b'y'; 4000], b"\nok\n"], 32);
        assert!(matches!(r.next_line().await, Err(FrameError::TooLarge { max: 32 })));
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"ok");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn has_partial_says_a_line_was_begun_and_not_ended() {
        let mut r = chunks(&[b"{}\n{\"ha"], 64);
        assert!(!r.has_partial());
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{}");
        // The rest of the read is buffered: a begun line.
        assert!(r.has_partial());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_read_error_is_io() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
            }
        }
        let mut r = LineReader::new(Broken, 64);
        assert!(matches!(r.next_line().await, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset));
    }
}
