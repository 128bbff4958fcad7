//! The one client of the protocol: vmctl (QEMU's chardev socket of a virtio-serial port),
//! vssctl (vssd's control socket) and the test fixtures use it.
//!
//! The far side may hold stale bytes: a reply to an earlier client that timed out, half a
//! request, a parse error for a lone 0xFF. Before each exchange [`Client::execute`]
//! resynchronises as libvirt does: it sends 0xFF (the agent drops any partial input) and
//! `guest-sync-delimited` with a fresh id, then discards everything up to the 0xFF-marked reply
//! carrying that id. A channel that stays deaf gets a new connection (see [`Client::sync`]).
//! An agent that does not answer in time is "silent".
//!
//! Replies are read as the agents write them: one JSON text per line. A 0xFF marks the start of
//! a delimited reply; whatever came before it on the line was not a whole reply. The raw calls
//! ([`Client::send_raw`], [`Client::read_reply`], [`Client::read_line_raw`], ...) are for the
//! tests that check the agent's framing and errors themselves.
//!
//! Blocking and single-threaded: each read waits at most until the current deadline (the
//! socket's read timeout is set to what is left of it).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the guest agent's channel {} (does the VM have an agent channel? is it running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("guest agent channel i/o error")]
    Io(#[from] io::Error),
    /// The channel closed (QEMU or the agent went away, or another client took the socket).
    #[error("the guest agent's channel closed (QEMU exited, or another client holds it)")]
    Closed,
    /// No answer to a command in time: no agent runs, or it hangs.
    #[error("the guest agent did not answer `{command}` within {after:?}: is an agent (vssd or qemu-ga) running in the guest?")]
    Silent {
        /// The command.
        command: String,
        /// The limit.
        after: Duration,
    },
    /// No reply at all within the read timeout (a raw read).
    #[error("no reply from the guest agent within {after:?}{}", pending_note(pending))]
    NoReply {
        /// The limit.
        after: Duration,
        /// Bytes received that do not end a line yet.
        pending: String,
    },
    /// The agent refused the command.
    #[error("the guest agent refused `{command}`: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QGA's error class.
        class: String,
        /// QGA's description.
        desc: String,
    },
    /// A line from the agent that is not JSON (a raw read; the exchanges skip such lines).
    #[error("the guest agent sent a line that is not JSON: {line:?}")]
    BadReply {
        /// The line, lossily as text.
        line: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Replies kept coming, but not the one to our `guest-sync`.
    #[error("no reply to guest-sync among {} replies", before.len())]
    NoSyncReply {
        /// What came instead.
        before: Vec<Value>,
    },
}

fn pending_note(pending: &str) -> String {
    if pending.is_empty() {
        String::new()
    } else {
        format!(" (received without a newline: {pending:?})")
    }
}

/// One reply as read from the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The JSON value.
    pub value: Value,
    /// True when a 0xFF came before it (the answer to `guest-sync-delimited`).
    pub delimited: bool,
}

/// One line from the agent, before JSON parsing.
struct Line {
    delimited: bool,
    text: Vec<u8>,
}

impl Line {
    fn value(&self) -> Option<Value> {
        serde_json::from_slice(&self.text).ok()
    }
}

/// How long one resynchronisation attempt waits before trying a new connection.
const SYNC_ATTEMPT: Duration = Duration::from_secs(1);
/// The most replies [`Client::drain_until_sync`] skips.
const DRAIN_MAX: usize = 64;

/// Sees every buffer before it is written.
type Inspector = Box<dyn FnMut(&[u8]) + Send>;

/// A connection to an agent.
pub struct Client {
    stream: UnixStream,
    /// Bytes received and not yet returned.
    buf: Vec<u8>,
    /// The socket, when connected by path (for reconnecting).
    path: Option<PathBuf>,
    /// Called with every buffer before it is written.
    inspect: Option<Inspector>,
    /// Time limit of the resynchronisation before each [`Client::execute`].
    pub sync_timeout: Duration,
    /// Time limit of each raw read ([`Client::read_reply`] and friends).
    pub timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).field("pending", &self.buf.len()).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to a unix socket: QEMU's chardev of the agent's port, or vssd's own socket.
    /// A deaf connection is replaced by a new one to the same path.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.into(), source })?;
        let mut c = Client::from_stream(s)?;
        c.path = Some(path.into());
        Ok(c)
    }

    /// Uses a connected stream (it is never replaced: a deaf one stays deaf).
    pub fn from_stream(stream: UnixStream) -> Result<Client, ClientError> {
        // A write blocks only on a full socket buffer, i.e. a peer that stopped reading.
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            path: None,
            inspect: None,
            sync_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        })
    }

    /// Calls `f` with every buffer before it is written (a test fixture asserts with it that
    /// it never freezes outside its sandbox).
    pub fn inspect_sends(mut self, f: impl FnMut(&[u8]) + Send + 'static) -> Client {
        self.inspect = Some(Box::new(f));
        self
    }

    /// Sets the limit of each raw read.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Hangs up and connects again to the same path; nothing to do for a given stream.
    fn reconnect(&mut self) -> Result<(), ClientError> {
        let Some(path) = &self.path else { return Ok(()) };
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.stream =
            UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.clone(), source })?;
        self.stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        self.buf.clear();
        Ok(())
    }

    // -- raw calls ------------------------------------------------------------------------

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        if let Some(f) = &mut self.inspect {
            f(bytes);
        }
        self.stream.write_all(bytes).and_then(|_| self.stream.flush()).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ClientError::Closed,
            _ => ClientError::Io(e),
        })
    }

    /// Sends one JSON value and a newline.
    pub fn send(&mut self, v: &Value) -> Result<(), ClientError> {
        let mut bytes = v.to_string().into_bytes();
        bytes.push(b'\n');
        self.send_raw(&bytes)
    }

    /// Reads until `buf` holds a newline or `deadline` passes; false on timeout.
    fn fill_line(&mut self, deadline: Instant) -> Result<bool, ClientError> {
        let mut chunk = [0u8; 65536];
        while !self.buf.contains(&b'\n') {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // A zero timeout means "block forever" to the socket: the check above rules it out.
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ClientError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// The next line that is not blank, or None at `deadline`.
    fn next_line(&mut self, deadline: Instant) -> Result<Option<Line>, ClientError> {
        loop {
            if !self.fill_line(deadline)? {
                return Ok(None);
            }
            let Some(end) = self.buf.iter().position(|&b| b == b'\n') else { continue };
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let (delimited, rest) = match raw.iter().rposition(|&b| b == 0xFF) {
                Some(p) => (true, &raw[p + 1..]),
                None => (false, &raw[..]),
            };
            let text = rest.trim_ascii();
            if !text.is_empty() {
                return Ok(Some(Line { delimited, text: text.to_vec() }));
            }
        }
    }

    fn pending(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Reads one reply within [`Client::timeout`].
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let after = self.timeout;
        let Some(line) = self.next_line(Instant::now() + after)? else {
            return Err(ClientError::NoReply { after, pending: self.pending() });
        };
        match serde_json::from_slice(&line.text) {
            Ok(value) => Ok(Reply { value, delimited: line.delimited }),
            Err(source) => Err(ClientError::BadReply { line: String::from_utf8_lossy(&line.text).into(), source }),
        }
    }

    /// Reads the raw bytes of one line, its newline (and any 0xFF) included, within
    /// [`Client::timeout`]; for checking the agent's framing.
    pub fn read_line_raw(&mut self) -> Result<Vec<u8>, ClientError> {
        let after = self.timeout;
        if !self.fill_line(Instant::now() + after)? {
            return Err(ClientError::NoReply { after, pending: self.pending() });
        }
        let end = self.buf.iter().position(|&b| b == b'\n').unwrap_or(self.buf.len() - 1);
        Ok(self.buf.drain(..=end).collect())
    }

    /// Sends a request and returns the whole reply (`return` or `error`), without resync.
    pub fn request(&mut self, v: &Value) -> Result<Value, ClientError> {
        self.send(v)?;
        Ok(self.read_reply()?.value)
    }

    /// `{"execute": command, "arguments": args}` as [`Client::request`]: the whole reply.
    pub fn exchange(&mut self, command: &str, args: Option<Value>) -> Result<Value, ClientError> {
        self.request(&envelope(command, args))
    }

    /// Sends a plain `guest-sync` (no 0xFF, which would draw an error reply of its own) and
    /// returns the replies that came before its answer: what some earlier input drew.
    pub fn drain_until_sync(&mut self) -> Result<Vec<Value>, ClientError> {
        let id = fresh_id();
        self.send(&envelope("guest-sync", Some(json!({ "id": id }))))?;
        let mut before = Vec::new();
        while before.len() < DRAIN_MAX {
            let r = self.read_reply()?.value;
            if r.get("return").and_then(Value::as_i64) == Some(id) {
                return Ok(before);
            }
            before.push(r);
        }
        Err(ClientError::NoSyncReply { before })
    }

    // -- exchanges ------------------------------------------------------------------------

    /// Resynchronises: 0xFF, `guest-sync-delimited` with a fresh id, and everything before
    /// its reply is thrown away. A connection to QEMU's chardev can stay deaf after the VM was
    /// paused and resumed (observed with QEMU 7.2: the first connection afterwards gets no
    /// answer, the next one does), so a sync unanswered for a second is retried on a new
    /// connection (when connected by path), with a new id, until `sync_timeout`. Only the
    /// reply to the newest id counts.
    pub fn sync(&mut self) -> Result<(), ClientError> {
        let limit = self.sync_timeout;
        // Anything already received is stale.
        self.buf.clear();
        let deadline = Instant::now() + limit;
        let mut first = true;
        loop {
            if !first {
                self.reconnect()?;
            }
            first = false;
            let id = fresh_id();
            let mut msg = vec![0xFF];
            msg.extend(envelope("guest-sync-delimited", Some(json!({ "id": id }))).to_string().into_bytes());
            msg.push(b'\n');
            self.send_raw(&msg)?;
            let sent = Instant::now();
            tracing::trace!("agent -> guest-sync-delimited {id}");
            let attempt_end = (sent + SYNC_ATTEMPT).min(deadline);
            loop {
                match self.next_line(attempt_end)? {
                    None if Instant::now() >= deadline => {
                        return Err(ClientError::Silent { command: "guest-sync-delimited".into(), after: limit })
                    }
                    None => {
                        tracing::debug!("agent: no answer to the resync within a second; connecting again");
                        break;
                    }
                    Some(l) if l.delimited && l.value().and_then(|v| v.get("return")?.as_i64()) == Some(id) => {
                        tracing::debug!("agent: in sync ({:.1} ms)", sent.elapsed().as_secs_f64() * 1000.0);
                        return Ok(());
                    }
                    Some(_) => continue,
                }
            }
        }
    }

    /// Resynchronises, then runs `command`, waiting at most `limit` for its reply; returns its
    /// `return` member.
    pub fn execute(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, ClientError> {
        self.sync()?;
        self.command(command, args, limit)
    }

    /// Runs `command` without resynchronising first: only right after a successful exchange
    /// on this connection, where a round trip would cost time (inside the freeze window).
    pub fn command(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, ClientError> {
        let msg = envelope(command, args).to_string();
        tracing::trace!("agent -> {msg}");
        let mut bytes = msg.into_bytes();
        bytes.push(b'\n');
        self.send_raw(&bytes)?;
        let sent = Instant::now();
        let deadline = sent + limit;
        loop {
            let Some(line) = self.next_line(deadline)? else {
                return Err(ClientError::Silent { command: command.into(), after: limit });
            };
            // A late reply to an earlier resync attempt, not ours.
            if line.delimited && command != "guest-sync-delimited" {
                continue;
            }
            let Some(v) = line.value() else { continue };
            tracing::trace!("agent <- {v}");
            let ms = sent.elapsed().as_secs_f64() * 1000.0;
            if let Some(r) = v.get("return") {
                tracing::debug!("agent {command}: {ms:.1} ms");
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                tracing::debug!("agent {command}: error after {ms:.1} ms: {}", e["desc"]);
                return Err(ClientError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("GenericError").into(),
                    desc: e["desc"].as_str().unwrap_or("").into(),
                });
            }
        }
    }

    /// The agent's `guest-info`, reduced to what a host needs.
    pub fn info(&mut self, limit: Duration) -> Result<AgentInfo, ClientError> {
        let v = self.execute("guest-info", None, limit)?;
        let commands: Vec<String> = v["supported_commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["enabled"].as_bool().unwrap_or(true))
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let is_vssd = commands.iter().any(|c| c == "vssd-freeze");
        Ok(AgentInfo { version: v["version"].as_str().unwrap_or("?").to_string(), is_vssd, commands })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // QEMU's chardev serves one client at a time: hang up for real, now.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn envelope(command: &str, args: Option<Value>) -> Value {
    let mut msg = json!({ "execute": command });
    if let Some(a) = args {
        msg["arguments"] = a;
    }
    msg
}

/// What the agent is.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its version string.
    pub version: String,
    /// vssd (it has `vssd-freeze`), else a plain qemu-guest-agent.
    pub is_vssd: bool,
    /// Enabled commands.
    pub commands: Vec<String>,
}

impl AgentInfo {
    /// "vssd 0.1.0" or "qemu-ga 7.2.22".
    pub fn describe(&self) -> String {
        format!("{} {}", if self.is_vssd { "vssd" } else { "qemu-ga" }, self.version)
    }
}

/// A positive id unlikely to repeat: time and pid mixed (no RNG crate needed for this).
fn fresh_id() -> i64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let x = t ^ ((std::process::id() as u64) << 32) ^ SEQ.fetch_add(0x9E37_79B9, Ordering::Relaxed);
    (x & 0x3fff_ffff_ffff_ffff) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// What the fake agent does with one request: the bytes to write back.
    type Script = Box<dyn FnMut(&Value) -> Vec<u8> + Send>;

    /// qemu-ga's answers, as a script: sync, sync-delimited and ping; anything else unknown.
    fn qemu_ga(v: &Value) -> Vec<u8> {
        let id = &v["arguments"]["id"];
        match v["execute"].as_str().unwrap_or("") {
            "guest-sync-delimited" => [&[0xFF][..], format!("{{\"return\": {id}}}\n").as_bytes()].concat(),
            "guest-sync" => format!("{{\"return\": {id}}}\n").into_bytes(),
            "guest-ping" => b"{\"return\": {}}\n".to_vec(),
            n => format!(
                "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command {n} has not been found\"}}}}\n"
            )
            .into_bytes(),
        }
    }

    /// A client over a socket pair whose other end `script` serves, after `first` is written.
    fn fake(first: &[u8], script: Script) -> Client {
        let (a, b) = UnixStream::pair().unwrap();
        let first = first.to_vec();
        std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            w.write_all(&first).unwrap();
            let mut script = script;
            crate::fake::serve(b, |v| crate::fake::Answer::Write(script(v)));
        });
        Client::from_stream(a).unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn resync_skips_stale_replies_garbage_and_parse_errors() {
        // Stale output of an earlier client: plain replies, a delimited one with another id,
        // and half a line.
        let stale = b"{\"return\": 99}\n{\"return\": {}}\n\xff{\"return\": 12345}\n{\"retu";
        let mut c = fake(stale, Box::new(qemu_ga));
        assert_eq!(c.execute("guest-ping", None, T).unwrap(), json!({}));
        let e = c.execute("no-such", None, T).unwrap_err();
        assert!(matches!(&e, ClientError::Command { class, .. } if class == "CommandNotFound"), "{e}");
    }

    #[test]
    fn garbage_before_the_delimiter_on_the_same_line_is_dropped() {
        let mut c = fake(
            b"",
            Box::new(|v| {
                let mut out = b"garbage {\"return\": ".to_vec();
                out.extend(qemu_ga(v));
                out
            }),
        );
        c.sync().unwrap();
    }

    #[test]
    fn a_late_answer_to_an_earlier_resync_is_not_taken_for_the_reply() {
        // The first sync goes unanswered; its answer comes late, right before the ping's.
        let mut ignored: Option<Value> = None;
        let mut c = fake(
            b"",
            Box::new(move |v| match v["execute"].as_str() {
                Some("guest-sync-delimited") if ignored.is_none() => {
                    ignored = Some(v.clone());
                    Vec::new()
                }
                Some("guest-ping") => [qemu_ga(ignored.as_ref().unwrap()), qemu_ga(v)].concat(),
                _ => qemu_ga(v),
            }),
        );
        c.sync_timeout = Duration::from_secs(5);
        assert_eq!(c.execute("guest-ping", None, T).unwrap(), json!({}));
    }

    #[test]
    fn a_peer_that_closes_is_reported_closed_not_silent() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut c = Client::from_stream(a).unwrap();
        let e = c.execute("guest-ping", None, T).unwrap_err();
        assert!(matches!(e, ClientError::Closed), "{e}");

        // Closing halfway through a reply.
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut b = b;
            let mut buf = [0u8; 256];
            let _ = b.read(&mut buf);
            let _ = b.write_all(b"\xff{\"return\":");
        });
        let mut c = Client::from_stream(a).unwrap();
        let e = c.execute("guest-ping", None, T).unwrap_err();
        assert!(matches!(e, ClientError::Closed), "{e}");
    }

    #[test]
    fn a_silent_agent_is_reported_as_such() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Client::from_stream(a).unwrap();
        c.sync_timeout = Duration::from_millis(200);
        let t = Instant::now();
        let e = c.execute("guest-ping", None, T).unwrap_err();
        assert!(matches!(e, ClientError::Silent { .. }), "{e}");
        assert!(e.to_string().contains("is an agent"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // In sync but the command itself goes unanswered.
        let mut c = fake(b"", Box::new(|v| if v["execute"] == "guest-ping" { Vec::new() } else { qemu_ga(v) }));
        let e = c.execute("guest-ping", None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(&e, ClientError::Silent { command, .. } if command == "guest-ping"), "{e}");
    }

    #[test]
    fn a_deaf_channel_gets_a_new_connection() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            let mut deaf = Vec::new();
            for s in l.incoming() {
                let s = s.unwrap();
                // The first connection is accepted and never answered, as QEMU's chardev
                // after a pause and resume.
                if n.fetch_add(1, Ordering::SeqCst) == 0 {
                    deaf.push(s);
                    continue;
                }
                std::thread::spawn(move || crate::fake::serve(s, |v| crate::fake::Answer::Write(qemu_ga(v))));
            }
        });
        let mut c = Client::connect(&path).unwrap();
        c.sync_timeout = Duration::from_secs(5);
        let t = Instant::now();
        assert_eq!(c.execute("guest-ping", None, T).unwrap(), json!({}));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert!(t.elapsed() >= SYNC_ATTEMPT && t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        // Now in sync on the new connection.
        assert_eq!(c.command("guest-ping", None, T).unwrap(), json!({}));
    }

    #[test]
    fn connecting_to_nothing_says_where() {
        let d = tempfile::tempdir().unwrap();
        let e = Client::connect(&d.path().join("none.sock")).unwrap_err();
        assert!(matches!(&e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("none.sock"), "{e}");
        // The cause is the source, not repeated in the message.
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&cause), "{e}");
    }

    #[test]
    fn raw_reads_see_delimiters_lines_and_bad_json() {
        // Blank lines are no replies.
        let mut c = fake(b"\n  \n", Box::new(qemu_ga));
        c.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": 5}})).unwrap();
        assert_eq!(c.read_reply().unwrap(), Reply { value: json!({"return": 5}), delimited: true });
        c.send(&json!({"execute": "guest-sync", "arguments": {"id": 6}})).unwrap();
        assert_eq!(c.read_reply().unwrap(), Reply { value: json!({"return": 6}), delimited: false });
        c.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": 7}})).unwrap();
        assert_eq!(c.read_line_raw().unwrap(), b"\xff{\"return\": 7}\n");
        assert_eq!(c.exchange("guest-ping", None).unwrap(), json!({"return": {}}));
        let r = c.exchange("nope", Some(json!({}))).unwrap();
        assert_eq!(r["error"]["class"], "CommandNotFound");

        let mut c = fake(b"not json\n", Box::new(qemu_ga));
        assert!(matches!(c.read_reply(), Err(ClientError::BadReply { .. })));
        c.set_timeout(Duration::from_millis(100));
        let e = c.read_reply().unwrap_err();
        assert!(matches!(e, ClientError::NoReply { .. }), "{e}");
    }

    #[test]
    fn drain_until_sync_returns_what_came_before() {
        let mut c = fake(b"", Box::new(qemu_ga));
        c.send_raw(b"\xff").unwrap();
        c.send(&json!({"execute": "nope"})).unwrap();
        let before = c.drain_until_sync().unwrap();
        assert_eq!(before.len(), 2, "{before:?}");
        assert_eq!(before[0]["error"]["class"], "GenericError");
        assert_eq!(before[1]["error"]["class"], "CommandNotFound");
        assert!(c.drain_until_sync().unwrap().is_empty());
    }

    #[test]
    fn every_sent_buffer_is_shown_to_the_inspector() {
        let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let s = seen.clone();
        let mut c = fake(b"", Box::new(qemu_ga)).inspect_sends(move |b| s.lock().unwrap().push(b.to_vec()));
        c.execute("guest-ping", None, T).unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0][0], 0xFF);
        assert_eq!(serde_json::from_slice::<Value>(&seen[1]).unwrap(), json!({"execute": "guest-ping"}));
    }

    #[test]
    fn info_tells_vssd_from_qemu_ga() {
        let info = |cmds: Value| {
            let mut c = fake(
                b"",
                Box::new(move |v| {
                    if v["execute"] == "guest-info" {
                        format!("{}\n", json!({"return": {"version": "7.2.22", "supported_commands": cmds}}))
                            .into_bytes()
                    } else {
                        qemu_ga(v)
                    }
                }),
            );
            c.info(T).unwrap()
        };
        let q = info(json!([{"name": "guest-ping", "enabled": true}, {"name": "guest-get-devices", "enabled": false}]));
        assert_eq!(
            (q.is_vssd, q.commands.as_slice(), q.describe().as_str()),
            (false, &["guest-ping".to_string()][..], "qemu-ga 7.2.22")
        );
        let v = info(json!([{"name": "vssd-freeze", "enabled": true}]));
        assert!(v.is_vssd);
    }

    #[test]
    fn fresh_ids_differ() {
        assert_ne!(fresh_id(), fresh_id());
        assert!(fresh_id() > 0);
    }
}
