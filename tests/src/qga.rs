//! The QGA client of the tests: JSON requests and replies on a unix socket, raw bytes for the
//! framing tests, and a guard that refuses to send qemu-ga a freeze outside the sandbox.
//!
//! Kept as one module on purpose: the workspace's shared client (`qga-wire`) replaces it here,
//! in this one file, with the guard on top.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

/// A blocking client of the qemu-guest-agent JSON protocol on a unix socket.
pub struct QgaClient {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When set, refuse any fsfreeze-freeze that does not list mountpoints under this
    /// directory (used for qemu-ga, which would otherwise freeze the whole machine).
    guard: Option<PathBuf>,
}

/// One reply as read from the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The JSON value.
    pub value: Value,
    /// True when one or more 0xFF bytes came right before it.
    pub delimited: bool,
}

impl QgaClient {
    /// Connects with 30 s read and write timeouts.
    pub fn connect(path: &Path) -> io::Result<QgaClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(QgaClient { stream, buf: Vec::new(), guard: None })
    }

    /// Refuses to send freeze requests that are not limited to mountpoints under `dir`.
    pub fn guarded(mut self, dir: &Path) -> QgaClient {
        self.guard = Some(dir.to_path_buf());
        self
    }

    /// Changes the read timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("set timeout");
    }

    fn check_guard(&self, bytes: &[u8]) {
        let Some(dir) = &self.guard else { return };
        if !bytes.windows(15).any(|w| w == b"fsfreeze-freeze") {
            return;
        }
        let v: Value = serde_json::from_slice(bytes.trim_ascii())
            .unwrap_or_else(|_| panic!("guard: refusing an unparsable freeze request to qemu-ga"));
        let cmd = v["execute"].as_str().unwrap_or("");
        assert_eq!(cmd, "guest-fsfreeze-freeze-list", "guard: only guest-fsfreeze-freeze-list may go to qemu-ga");
        // A missing or null list means "every filesystem"; an empty array freezes nothing.
        let list = v["arguments"]["mountpoints"].as_array().expect("guard: freeze-list needs explicit mountpoints");
        for m in list {
            let m = Path::new(m.as_str().expect("guard: mountpoint must be a string"));
            assert!(m.starts_with(dir) && m != dir, "guard: {} is not inside {}", m.display(), dir.display());
        }
    }

    /// Sends raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.check_guard(bytes);
        self.stream.write_all(bytes).expect("send to agent");
    }

    /// Sends one JSON value and a newline.
    pub fn send(&mut self, v: &Value) {
        let mut bytes = serde_json::to_vec(v).unwrap();
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }

    /// Reads one reply (skipping whitespace and 0xFF delimiters). Panics on timeout, EOF or
    /// a reply that is not JSON.
    pub fn read_reply_full(&mut self) -> Reply {
        self.try_read_reply().unwrap_or_else(|e| panic!("reading a reply: {e}"))
    }

    /// Reads one reply, or says why there is none.
    pub fn try_read_reply(&mut self) -> Result<Reply, String> {
        let mut delimited = false;
        loop {
            let skip = self.buf.iter().take_while(|b| b.is_ascii_whitespace() || **b == 0xff).count();
            delimited |= self.buf[..skip].contains(&0xff);
            self.buf.drain(..skip);
            if !self.buf.is_empty() {
                let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                match it.next() {
                    Some(Ok(value)) => {
                        let used = it.byte_offset();
                        self.buf.drain(..used);
                        return Ok(Reply { value, delimited });
                    }
                    Some(Err(e)) if e.is_eof() => {}
                    Some(Err(e)) => {
                        return Err(format!(
                            "the agent sent invalid JSON ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    }
                    None => {}
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("connection closed (pending: {:?})", String::from_utf8_lossy(&self.buf))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(format!("no reply in time (pending: {:?})", String::from_utf8_lossy(&self.buf)))
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Reads one reply's value.
    pub fn read_reply(&mut self) -> Value {
        self.read_reply_full().value
    }

    /// Reads raw bytes until a newline (included) arrives; for checking framing.
    pub fn read_line_raw(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                return self.buf.drain(..=i).collect();
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read raw line");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request and reads its reply.
    pub fn request(&mut self, v: Value) -> Value {
        self.send(&v);
        self.read_reply()
    }

    /// `{"execute": cmd}` or `{"execute": cmd, "arguments": args}`.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let mut v = json!({ "execute": cmd });
        if let Some(a) = args {
            v["arguments"] = a;
        }
        self.request(v)
    }

    /// Executes and returns the `return` member; panics with the reply otherwise.
    pub fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let r = self.execute(cmd, args);
        ret(&r, cmd).clone()
    }

    /// Drains replies until a `guest-sync` with a fresh id comes back; returns the replies
    /// that came before it. Use after sending garbage.
    pub fn resync(&mut self) -> Vec<Value> {
        static SYNC: AtomicU64 = AtomicU64::new(7_000_000);
        let id = SYNC.fetch_add(1, Ordering::Relaxed);
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}));
        let mut before = Vec::new();
        loop {
            let r = self.read_reply();
            if r.get("return").and_then(Value::as_u64) == Some(id) {
                return before;
            }
            before.push(r);
            assert!(before.len() < 20, "no guest-sync reply among {before:?}");
        }
    }
}

/// The `return` member of a reply; panics with the whole reply when it is an error.
pub fn ret<'a>(reply: &'a Value, what: &str) -> &'a Value {
    match reply.get("return") {
        Some(r) => r,
        None => panic!("{what}: expected a return, got {reply}"),
    }
}

/// The error class of an error reply, if it is one.
pub fn error_class(reply: &Value) -> Option<&str> {
    reply.get("error").and_then(|e| e.get("class")).and_then(Value::as_str)
}

/// Asserts `reply` is an error of `class`; returns its description.
pub fn expect_error<'a>(reply: &'a Value, class: &str, what: &str) -> &'a str {
    assert_eq!(error_class(reply), Some(class), "{what}: expected a {class} error, got {reply}");
    reply["error"]["desc"].as_str().unwrap_or_else(|| panic!("{what}: error without desc: {reply}"))
}
