//! The serving loop of a scripted agent, for tests of clients (the QGA client here, vssd's
//! qemu-ga backend): it reads requests with the agent's own [`Splitter`], answers a 0xFF
//! with qemu-ga 7.2's parse error, and each request as a script says.
//!
//! Built for this crate's tests and, with the `fake` feature, for other crates' tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use serde_json::Value;

use crate::stream::{Event, Splitter};

/// What qemu-ga 7.2 writes when its input has a 0xFF (before the delimited sync's reply).
pub const STRAY_FF_ERROR: &[u8] =
    b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n";

/// What the script does with one request.
pub enum Answer {
    /// Writes these bytes (nothing when empty) and goes on serving.
    Write(Vec<u8>),
    /// Writes these bytes, then closes the connection.
    WriteThenClose(Vec<u8>),
}

/// Serves one connection until the client leaves (or the script closes it).
pub fn serve(s: UnixStream, mut script: impl FnMut(&Value) -> Answer) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = s;
    let mut sp = Splitter::new(1 << 20);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for piece in chunk[..n].split_inclusive(|&b| b == 0xFF) {
            for ev in sp.feed(piece) {
                let Event::Message(m) = ev else { continue };
                let v: Value = serde_json::from_slice(&m).expect("the fake agent got a request that is not JSON");
                let (bytes, close) = match script(&v) {
                    Answer::Write(b) => (b, false),
                    Answer::WriteThenClose(b) => (b, true),
                };
                if w.write_all(&bytes).is_err() || close {
                    return;
                }
            }
            if piece.last() == Some(&0xFF) && w.write_all(STRAY_FF_ERROR).is_err() {
                return;
            }
        }
    }
}
