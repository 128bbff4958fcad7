//! appvss: the line framing both sides use, and the messages.

use appvss_proto::{self as proto, AgentMessage, AppMessage, FrameError, LineReader};

/// The line reader over the input in reads of a size the input picks, checked against a
/// model of the rules: lines are what lies between newlines; one of more than the limit
/// (newline included) is one `TooLarge`; an unfinished last line is dropped (or is
/// `TooLarge` once it reached the limit).
pub fn framing(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else { return };
    let max = 1 + (cut as usize % 64);
    let step = 1 + (cut as usize >> 6) * 7;
    let got = crate::runtime(false).block_on(async {
        let chunks: Vec<&[u8]> = data.chunks(step).collect();
        let mut r = LineReader::new(Reader(chunks), max);
        let mut out = Vec::new();
        loop {
            match r.next_line().await {
                Ok(Some(l)) => out.push(Some(l)),
                Ok(None) => break,
                Err(FrameError::TooLarge { max: m }) => {
                    assert_eq!(m, max);
                    out.push(None)
                }
                Err(e) => panic!("{e:?} from an in-memory reader"),
            }
            assert!(out.len() <= data.len() + 1, "more results than bytes");
        }
        out
    });
    assert_eq!(got, model(data, max), "max {max}, reads of {step}");
}

/// What the reader must return: `Some(line)` or `None` for TooLarge.
fn model(data: &[u8], max: usize) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut parts = data.split(|&b| b == b'\n').peekable();
    while let Some(p) = parts.next() {
        let last = parts.peek().is_none();
        if last {
            if p.len() >= max {
                out.push(None);
            }
        } else if p.len() < max {
            out.push(Some(p.to_vec()));
        } else {
            out.push(None);
        }
    }
    out
}

/// Hands out one chunk per read, as a socket does.
struct Reader<'a>(Vec<&'a [u8]>);

impl tokio::io::AsyncRead for Reader<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(c) = self.0.first_mut() {
            let n = c.len().min(buf.remaining());
            buf.put_slice(&c[..n]);
            *c = &c[n..];
            if c.is_empty() {
                self.0.remove(0);
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Each line of the input as an app's message and as vssd's: what decodes encodes to one
/// line that decodes back to itself; a hello's name check and version negotiation answer.
pub fn message(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(m) = proto::decode::<AppMessage>(line) {
            let bytes = proto::encode(&m);
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one line: {bytes:?}");
            assert_eq!(proto::decode::<AppMessage>(&bytes[..bytes.len() - 1]).ok(), Some(m.clone()));
            match m.into_hello() {
                Ok(h) => {
                    let _ = proto::check_name(&h.name);
                    if let Some(v) = proto::negotiate(h.min_version, h.max_version) {
                        assert!(v >= h.min_version && v <= h.max_version, "negotiated {v} outside the app's range");
                    }
                }
                Err(a) => assert_eq!(AppMessage::from(a.clone()).into_answer().ok(), Some(a)),
            }
        }
        if let Ok(m) = proto::decode::<AgentMessage>(line) {
            let bytes = proto::encode(&m);
            assert_eq!(proto::decode::<AgentMessage>(&bytes[..bytes.len() - 1]).ok(), Some(m));
        }
        if let Ok(s) = std::str::from_utf8(line) {
            if proto::check_name(s).is_ok() {
                assert!(s.len() <= proto::MAX_NAME_BYTES && !s.is_empty(), "accepted name {s:?}");
            }
        }
    }
}
