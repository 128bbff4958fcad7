//! Talking QGA to both agents (vssd and qemu-ga) with the workspace's one client,
//! [`qga_wire::Client`], re-exported here as [`QgaClient`].
//!
//! What the tests add on top is assertions, not a second client: [`QgaExt`] gives the panicking
//! shorthands the tests are written in (`ok`, `call`, `resync`), and [`check_guard`] is the
//! inspector the qemu-ga fixture installs so that no buffer asking qemu-ga to freeze anything
//! outside the sandbox ever leaves the test (it sees every write, the client's own syncs
//! included).
//!
//! `call` and `ok` read exactly the next reply, without a resync first: a stale or extra reply
//! on the connection fails the test instead of being skipped.

use std::path::Path;

use serde_json::Value;

pub use qga_wire::{Client as QgaClient, ClientError, Reply};

/// The message of `e` and of each of its sources, one after the other (each level says only
/// its own part, so nothing repeats).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Panicking shorthands of the tests over [`QgaClient`].
pub trait QgaExt {
    /// `{"execute": cmd, "arguments": args}` and the next reply, whole (`return` or `error`).
    fn call(&mut self, cmd: &str, args: Option<Value>) -> Value;
    /// [`QgaExt::call`] that returns the `return` member; panics with the reply otherwise.
    fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value;
    /// A plain `guest-sync` with a fresh id; returns the replies that came before its answer
    /// (what earlier input drew). Use after sending garbage.
    fn resync(&mut self) -> Vec<Value>;
}

impl QgaExt for QgaClient {
    fn call(&mut self, cmd: &str, args: Option<Value>) -> Value {
        self.exchange(cmd, args).unwrap_or_else(|e| panic!("{cmd}: {}", chain(&e)))
    }

    fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let r = self.call(cmd, args);
        ret(&r, cmd).clone()
    }

    fn resync(&mut self) -> Vec<Value> {
        let before = self.drain_until_sync().unwrap_or_else(|e| panic!("resync: {}", chain(&e)));
        // The tests never expect more than a handful; the client itself stops at 64.
        assert!(before.len() < 20, "no guest-sync reply among {before:?}");
        before
    }
}

/// Panics unless `bytes`, about to go to qemu-ga, are harmless: any freeze must be a
/// `guest-fsfreeze-freeze-list` of explicit mountpoints strictly inside `dir` (qemu-ga would
/// otherwise freeze the whole machine).
pub fn check_guard(dir: &Path, bytes: &[u8]) {
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
