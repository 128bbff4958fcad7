//! [`RawApp`]: an app speaking the appvss protocol by hand.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// An app speaking the appvss protocol by hand (lines of JSON on the app socket), for tests
/// of what vssd does with a peer that is not the appvss client.
pub struct RawApp {
    /// The reading half.
    pub r: BufReader<UnixStream>,
    /// The writing half.
    pub w: UnixStream,
}

impl RawApp {
    pub fn connect(path: &Path) -> RawApp {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawApp { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }

    pub fn register(path: &Path, name: &str) -> RawApp {
        let mut a = RawApp::connect(path);
        a.send(&json!({"type": "hello", "id": 1, "name": name, "min_version": 1, "max_version": 1}));
        let w = a.recv().expect("welcome");
        assert_eq!(w["type"], "welcome", "{w}");
        assert_eq!(w["re"], 1);
        a
    }

    pub fn send(&mut self, v: &Value) {
        let mut b = serde_json::to_vec(v).unwrap();
        b.push(b'\n');
        self.w.write_all(&b).unwrap();
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    /// The next message; None at end of stream or timeout.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line from vssd {line:?}: {e}"))),
        }
    }

    pub fn expect(&mut self, ty: &str) -> Value {
        let m = self.recv().unwrap_or_else(|| panic!("expected {ty}, got end of stream"));
        assert_eq!(m["type"], ty, "expected {ty}: {m}");
        m
    }
}
