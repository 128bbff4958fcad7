//! Lines off a byte stream, at most [`MAX_MESSAGE_BYTES`](crate::proto::MAX_MESSAGE_BYTES)
//! each, newline included.
//!
//! Invariant: [`LineReader::next_line`] is cancel-safe (it is polled inside `select!`): all
//! state lives in the reader, and a read that is dropped half-way loses no bytes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why no line came.
#[derive(Debug)]
pub(crate) enum LineError {
    /// The peer sent more than the limit without a newline.
    TooLarge,
    /// The stream failed.
    Io(io::Error),
}

pub(crate) struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        LineReader { inner, buf: Vec::with_capacity(4096), scanned: 0, max }
    }

    /// The next line without its newline; `Ok(None)` at a clean end of stream (a partial line
    /// at the end is dropped: the peer never finished it).
    pub(crate) async fn next_line(&mut self) -> Result<Option<Vec<u8>>, LineError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                if end + 1 > self.max {
                    return Err(LineError::TooLarge);
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() >= self.max {
                return Err(LineError::TooLarge);
            }
            let mut chunk = [0u8; 8192];
            let want = chunk.len().min(self.max + 1 - self.buf.len());
            let n = self.inner.read(&mut chunk[..want]).await.map_err(LineError::Io)?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &'static [u8], max: usize) -> LineReader<&'static [u8]> {
        LineReader::new(bytes, max)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn splits_lines_and_ends_cleanly() {
        let mut r = reader(b"{\"a\":1}\n{\"b\":2}\n", 64);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{\"b\":2}");
        assert!(r.next_line().await.unwrap().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_line_of_exactly_the_limit_passes_and_one_byte_more_does_not() {
        // 9 bytes + newline = 10 = the limit.
        let mut r = reader(b"123456789\n", 10);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"123456789");
        let mut r = reader(b"1234567890\n", 10);
        assert!(matches!(r.next_line().await, Err(LineError::TooLarge)));
        let mut r = reader(b"12345678901234567890", 10);
        assert!(matches!(r.next_line().await, Err(LineError::TooLarge)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_partial_last_line_is_dropped() {
        let mut r = reader(b"{}\n{\"half", 64);
        assert_eq!(r.next_line().await.unwrap().unwrap(), b"{}");
        assert!(r.next_line().await.unwrap().is_none());
    }
}
