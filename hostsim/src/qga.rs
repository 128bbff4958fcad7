//! A client of the guest agent (qemu-guest-agent's protocol; vssd speaks it too).
//!
//! The channel is a virtio-serial port, so the far side may hold stale bytes: a reply to an
//! earlier client that timed out, half a request, a parse error for a lone 0xFF. Before each
//! exchange we resynchronise as libvirt does: send 0xFF (the agent drops any partial input)
//! and `guest-sync-delimited` with a fresh random id, then discard everything up to the
//! 0xFF-marked reply carrying that id. An agent that does not answer in time is "silent".

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What went wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The host side of the channel could not be reached.
    #[error("cannot connect to the guest agent's channel {path}: {source} (does the VM have an agent channel? is it running?)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("guest agent channel i/o error: {0}")]
    Io(#[from] io::Error),
    /// The channel closed (QEMU went away, or another client took the socket).
    #[error("the guest agent's channel closed (QEMU exited, or another client holds it)")]
    Closed,
    /// No answer in time: no agent runs in the guest, or it hangs.
    #[error("the guest agent did not answer `{command}` within {after:?}: is an agent (vssd or qemu-ga) running in the guest?")]
    Silent {
        /// The command.
        command: String,
        /// The limit.
        after: Duration,
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
}

/// One line from the agent.
struct Line {
    delimited: bool,
    value: Option<Value>,
}

/// A guest agent connection.
pub struct Qga {
    writer: Box<dyn Write + Send>,
    rx: mpsc::Receiver<Option<Line>>,
    closed: bool,
    /// Time limit of the resynchronisation before each command.
    pub sync_timeout: Duration,
    /// Hangs up for real (the reader thread holds its own handle; QEMU's chardev serves one
    /// client at a time).
    closer: Option<Box<dyn FnOnce() + Send>>,
    /// The socket, when connected by path (for reconnecting).
    path: Option<std::path::PathBuf>,
}

impl Drop for Qga {
    fn drop(&mut self) {
        if let Some(c) = self.closer.take() {
            c();
        }
    }
}

impl Qga {
    /// Connects to the host side of the agent channel (QEMU's chardev socket).
    pub fn connect(path: &Path) -> Result<Qga, QgaError> {
        let s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|source| QgaError::Connect { path: path.display().to_string(), source })?;
        let r = s.try_clone()?;
        let closer = s.try_clone()?;
        let mut g = Qga::over(r, s);
        g.closer = Some(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }));
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Hangs up and connects again (same socket).
    fn reconnect(&mut self) -> Result<(), QgaError> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        if let Some(c) = self.closer.take() {
            c();
        }
        let fresh = Qga::connect(&path)?;
        let sync_timeout = self.sync_timeout;
        *self = fresh;
        self.sync_timeout = sync_timeout;
        Ok(())
    }

    /// Uses any stream.
    pub fn over<R, W>(reader: R, writer: W) -> Qga
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qga-reader".into())
            .spawn(move || {
                let mut reader = reader;
                let mut buf = [0u8; 16384];
                let mut line: Vec<u8> = Vec::new();
                let mut delimited = false;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(None);
                            return;
                        }
                        Ok(n) => n,
                    };
                    for &b in &buf[..n] {
                        match b {
                            0xFF => {
                                // A delimiter starts a new message; whatever came before it was
                                // not a whole reply.
                                line.clear();
                                delimited = true;
                            }
                            b'\n' => {
                                let text = line.trim_ascii();
                                if !text.is_empty() {
                                    let value = serde_json::from_slice(text).ok();
                                    if tx.send(Some(Line { delimited, value })).is_err() {
                                        return;
                                    }
                                }
                                line.clear();
                                delimited = false;
                            }
                            _ => line.push(b),
                        }
                    }
                }
            })
            .expect("spawn qga reader");
        Qga {
            writer: Box::new(writer),
            rx,
            closed: false,
            sync_timeout: Duration::from_secs(5),
            closer: None,
            path: None,
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), QgaError> {
        self.writer.write_all(bytes).and_then(|_| self.writer.flush()).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                self.closed = true;
                QgaError::Closed
            }
            _ => QgaError::Io(e),
        })
    }

    fn next(&mut self, deadline: Instant) -> Result<Option<Line>, QgaError> {
        if self.closed {
            return Err(QgaError::Closed);
        }
        match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Some(l)) => Ok(Some(l)),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Err(QgaError::Closed)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
        }
    }

    /// Resynchronises: 0xFF, `guest-sync-delimited` with a fresh id, and everything before
    /// its reply is thrown away. A connection to QEMU's chardev can stay deaf after the VM was
    /// paused and resumed (observed with QEMU 7.2: the first connection afterwards gets no
    /// answer, the next one does), so a sync unanswered for a second is retried on a new
    /// connection, with a new id, until `sync_timeout`. Only the reply to the newest id counts.
    pub fn sync(&mut self) -> Result<(), QgaError> {
        let limit = self.sync_timeout;
        // Anything already queued is stale.
        while let Ok(Some(_)) = self.rx.try_recv() {}
        let deadline = Instant::now() + limit;
        let mut first = true;
        loop {
            if !first {
                self.reconnect()?;
            }
            first = false;
            let id = fresh_id();
            let mut msg = vec![0xFF];
            msg.extend(
                serde_json::to_vec(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})).unwrap(),
            );
            msg.push(b'\n');
            self.send(&msg)?;
            let sent = Instant::now();
            tracing::trace!("agent -> guest-sync-delimited {id}");
            let attempt_end = (Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                match self.next(attempt_end)? {
                    None if Instant::now() >= deadline => {
                        return Err(QgaError::Silent { command: "guest-sync-delimited".into(), after: limit })
                    }
                    None => {
                        tracing::debug!("agent: no answer to the resync within a second; connecting again");
                        break;
                    }
                    Some(Line { delimited: true, value: Some(v) })
                        if v.get("return").and_then(Value::as_i64) == Some(id) =>
                    {
                        tracing::debug!("agent: in sync ({:.1} ms)", sent.elapsed().as_secs_f64() * 1000.0);
                        return Ok(());
                    }
                    Some(_) => continue,
                }
            }
        }
    }

    /// Resynchronises, then runs `command`, waiting at most `limit` for its reply.
    pub fn execute(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        self.sync()?;
        self.command(command, args, limit)
    }

    /// Runs `command` without resynchronising first: only right after a successful exchange
    /// on this connection, where a round trip would cost time (inside the freeze window).
    pub fn command(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        let mut msg = json!({"execute": command});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        tracing::trace!("agent -> {}", String::from_utf8_lossy(&bytes));
        bytes.push(b'\n');
        self.send(&bytes)?;
        let sent = Instant::now();
        let deadline = Instant::now() + limit;
        loop {
            let line = self.next(deadline)?;
            if let Some(Line { value: Some(v), .. }) = &line {
                tracing::trace!("agent <- {v}");
            }
            match line {
                None => return Err(QgaError::Silent { command: command.into(), after: limit }),
                // A late reply to an earlier resync attempt, not ours.
                Some(Line { delimited: true, .. }) if command != "guest-sync-delimited" => continue,
                Some(Line { value: Some(v), .. }) => {
                    let ms = sent.elapsed().as_secs_f64() * 1000.0;
                    if let Some(r) = v.get("return") {
                        tracing::debug!("agent {command}: {ms:.1} ms");
                        return Ok(r.clone());
                    }
                    if let Some(e) = v.get("error") {
                        tracing::debug!("agent {command}: error after {ms:.1} ms: {}", e["desc"]);
                        return Err(QgaError::Command {
                            command: command.into(),
                            class: e["class"].as_str().unwrap_or("GenericError").into(),
                            desc: e["desc"].as_str().unwrap_or("").into(),
                        });
                    }
                }
                Some(_) => continue,
            }
        }
    }

    /// The agent's `guest-info`, reduced to what vmctl needs.
    pub fn info(&mut self, limit: Duration) -> Result<AgentInfo, QgaError> {
        let v = self.execute("guest-info", None, limit)?;
        let cmds: Vec<String> = v["supported_commands"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|c| c["enabled"].as_bool().unwrap_or(true))
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let is_vssd = cmds.iter().any(|c| c == "vssd-freeze");
        Ok(AgentInfo { version: v["version"].as_str().unwrap_or("?").to_string(), is_vssd, commands: cmds })
    }
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
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    /// A scripted agent: stale garbage first, then qemu-ga's behaviour for 0xFF and sync.
    fn fake_agent() -> UnixStream {
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            // Stale output of an earlier client.
            w.write_all(b"{\"return\": 99}\n{\"return\": {}}\n").unwrap();
            let mut r = BufReader::new(b);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if r.read_until(b'\n', &mut buf).unwrap_or(0) == 0 {
                    return;
                }
                let mut text: &[u8] = &buf;
                if text.first() == Some(&0xFF) {
                    // qemu-ga answers a lone 0xFF with a parse error first.
                    w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\ufffd'\"}}\n").unwrap();
                    text = &text[1..];
                }
                let v: Value = serde_json::from_slice(text).unwrap();
                let out = match v["execute"].as_str().unwrap() {
                    "guest-sync-delimited" => format!("\u{FFFF}{{\"return\": {}}}\n", v["arguments"]["id"]),
                    "guest-ping" => "{\"return\": {}}\n".into(),
                    _ => "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}\n".into(),
                };
                // \u{FFFF} stands for the raw 0xFF byte.
                let bytes: Vec<u8> = if let Some(rest) = out.strip_prefix('\u{FFFF}') {
                    let mut b = vec![0xFF];
                    b.extend(rest.as_bytes());
                    b
                } else {
                    out.into_bytes()
                };
                w.write_all(&bytes).unwrap();
            }
        });
        a
    }

    #[test]
    fn resync_skips_stale_replies_and_parse_errors() {
        let s = fake_agent();
        let mut q = Qga::over(s.try_clone().unwrap(), s);
        assert_eq!(q.execute("guest-ping", None, Duration::from_secs(2)).unwrap(), json!({}));
        let e = q.execute("no-such", None, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(&e, QgaError::Command { class, .. } if class == "CommandNotFound"), "{e}");
    }

    #[test]
    fn a_silent_agent_is_reported_as_such() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut q = Qga::over(a.try_clone().unwrap(), a);
        q.sync_timeout = Duration::from_millis(200);
        let e = q.execute("guest-ping", None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, QgaError::Silent { .. }), "{e}");
        assert!(e.to_string().contains("is an agent"), "{e}");
    }

    #[test]
    fn fresh_ids_differ() {
        assert_ne!(fresh_id(), fresh_id());
        assert!(fresh_id() > 0);
    }
}
