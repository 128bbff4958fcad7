//! A scripted vssd: a unix listener in a temporary directory that plays vssd's side of
//! PROTOCOL.md line by line, as each test dictates. Blocking std I/O with timeouts, so a test
//! that goes wrong fails with a message instead of hanging.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

/// Long enough for a slow machine, short enough that a broken test ends.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Server {
    /// Listening at once.
    pub fn new() -> Server {
        let mut s = Server::unbound();
        s.bind();
        s
    }

    /// A path where nothing listens yet (vssd not started).
    pub fn unbound() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("appvss.sock");
        Server { _dir: dir, path, listener: None }
    }

    pub fn bind(&mut self) {
        let l = UnixListener::bind(&self.path).expect("bind scripted vssd");
        l.set_nonblocking(true).expect("nonblocking");
        self.listener = Some(l);
    }

    /// Stops listening (vssd gone): new connections are refused.
    pub fn unbind(&mut self) {
        self.listener = None;
        let _ = std::fs::remove_file(&self.path);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection, within [`WAIT`].
    pub fn accept(&self) -> Conn {
        self.try_accept(WAIT).expect("no client connected to the scripted vssd")
    }

    pub fn try_accept(&self, limit: Duration) -> Option<Conn> {
        let l = self.listener.as_ref().expect("scripted vssd is not listening");
        let until = Instant::now() + limit;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    return Some(Conn::new(s));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > until {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Accepts and registers: expects a hello, answers a welcome with `app_id`; returns the
    /// connection and the hello.
    pub fn register(&self, app_id: u64) -> (Conn, Value) {
        let mut c = self.accept();
        let hello = c.handshake(app_id);
        (c, hello)
    }
}

pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn new(s: UnixStream) -> Conn {
        let writer = s.try_clone().unwrap();
        Conn { reader: BufReader::new(s), writer }
    }

    /// Expects a valid hello; sends the welcome.
    pub fn handshake(&mut self, app_id: u64) -> Value {
        let hello = self.expect("hello");
        assert_eq!(hello["min_version"], 1, "{hello}");
        assert!(hello["max_version"].as_u64().unwrap() >= 1, "{hello}");
        let id = hello["id"].as_u64().expect("hello id");
        self.send(json!({"type": "welcome", "re": id, "version": 1, "app_id": app_id}));
        hello
    }

    pub fn send(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.writer.write_all(b).expect("write to client");
    }

    /// The next message, or `None` at end of stream or after `limit`.
    pub fn try_recv(&mut self, limit: Duration) -> Option<Value> {
        self.reader.get_ref().set_read_timeout(Some(limit)).unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "line without newline: {line:?}");
                assert!(line.len() <= 65536, "client line over 64 KiB");
                Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("client sent bad JSON {line:?}: {e}")))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read from client: {e}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        self.try_recv(WAIT).expect("the client sent nothing (or closed)")
    }

    /// The next message, which must be of type `ty`.
    pub fn expect(&mut self, ty: &str) -> Value {
        let m = self.recv();
        assert_eq!(m["type"], ty, "expected {ty}, got {m}");
        m
    }

    /// Nothing arrives within `limit` (and the connection stays open).
    pub fn expect_silence(&mut self, limit: Duration) {
        if let Some(m) = self.try_recv(limit) {
            panic!("expected silence, got {m}");
        }
    }

    /// The client closes the connection within [`WAIT`].
    pub fn expect_closed(&mut self) {
        self.reader.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("expected the client to close, got {line:?}"),
            Err(e) => panic!("expected the client to close: {e}"),
        }
    }

    pub fn prepare(&mut self, id: u64, freeze_id: u64, deadline_ms: u64) {
        self.send(json!({"type": "prepare", "id": id, "freeze_id": freeze_id, "deadline_ms": deadline_ms}));
    }

    pub fn freeze(&mut self, id: u64, freeze_id: u64, deadline_ms: u64, max_hold_ms: u64) {
        self.send(json!({"type": "freeze", "id": id, "freeze_id": freeze_id, "deadline_ms": deadline_ms, "max_hold_ms": max_hold_ms}));
    }

    pub fn thaw(&mut self, id: u64, freeze_id: u64, reason: &str) {
        self.send(json!({"type": "thaw", "id": id, "freeze_id": freeze_id, "reason": reason}));
    }

    /// PREPARE → ready, FREEZE → held, as a well-behaved app answers; ids 1 and 2.
    pub fn prepare_and_freeze(&mut self, freeze_id: u64, max_hold_ms: u64) {
        self.prepare(1, freeze_id, 5000);
        let r = self.expect("ready");
        assert_eq!(r["re"], 1, "{r}");
        self.freeze(2, freeze_id, 10000, max_hold_ms);
        let h = self.expect("held");
        assert_eq!(h["re"], 2, "{h}");
    }
}
