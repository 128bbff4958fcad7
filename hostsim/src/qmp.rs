//! A QMP client: QEMU's machine protocol (7.2 and newer), synchronous, generic over the stream.
//!
//! A reader thread turns the stream into JSON messages; replies are matched to requests by a
//! fresh `id`, and events that arrive meanwhile are queued for [`Qmp::take_events`] /
//! [`Qmp::wait_event`]. Every wait has a time limit, and end-of-file (QEMU exited or was
//! killed) is an error that says so, never a panic.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to QMP at {path} (is the VM running? `vmctl status` tells)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("QMP i/o error")]
    Io(#[from] io::Error),
    /// QEMU closed the connection: it exited or was killed.
    #[error("QEMU closed its QMP connection{during} (it exited or was killed)")]
    Closed {
        /// " during `cmd`", or empty.
        during: String,
    },
    /// No reply in time.
    #[error("QEMU did not answer `{command}` within {after:?}")]
    Timeout {
        /// The command.
        command: String,
        /// The limit.
        after: Duration,
    },
    /// QEMU refused the command.
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// Something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
}

impl QmpError {
    /// True when QEMU went away (the caller may want to say "the VM died").
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. })
    }
}

/// A QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    /// `event` (e.g. `JOB_STATUS_CHANGE`).
    pub name: String,
    /// `data`, or null.
    pub data: Value,
}

enum Incoming {
    Msg(Value),
    Bad(String),
    Closed,
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: Box<dyn Write + Send>,
    rx: mpsc::Receiver<Incoming>,
    events: VecDeque<Event>,
    next_id: u64,
    timeout: Duration,
    greeting: Value,
    closed: bool,
    /// Ends the connection for both directions: the reader thread holds its own handle, and
    /// QEMU serves one QMP client at a time, so a dropped client must really hang up.
    closer: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        if let Some(c) = self.closer.take() {
            c();
        }
    }
}

impl Qmp {
    /// Connects to a unix socket and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let s = std::os::unix::net::UnixStream::connect(path)
            .map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
        let r = s.try_clone()?;
        let closer = s.try_clone()?;
        let mut q = Qmp::handshake(r, s, timeout)?;
        q.closer = Some(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }));
        Ok(q)
    }

    /// Takes over any stream: reads the greeting, sends `qmp_capabilities`.
    pub fn handshake<R, W>(reader: R, writer: W, timeout: Duration) -> Result<Qmp, QmpError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                let mut r = BufReader::new(reader);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Incoming::Closed);
                            return;
                        }
                        Ok(_) => {
                            let text = line.trim_ascii();
                            if text.is_empty() {
                                continue;
                            }
                            let msg = match serde_json::from_slice::<Value>(text) {
                                Ok(v) => Incoming::Msg(v),
                                Err(_) => Incoming::Bad(String::from_utf8_lossy(text).into_owned()),
                            };
                            if tx.send(msg).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
            .map_err(QmpError::Io)?;
        let mut q = Qmp {
            writer: Box::new(writer),
            rx,
            events: VecDeque::new(),
            next_id: 1,
            timeout,
            greeting: Value::Null,
            closed: false,
            closer: None,
        };
        let deadline = Instant::now() + timeout;
        match q.recv(deadline, "the greeting")? {
            v if v.get("QMP").is_some() => q.greeting = v,
            v => return Err(QmpError::Protocol(format!("expected the QMP greeting, got {v}"))),
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The greeting (QEMU's version is in `QMP.version.qemu`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version as (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        let v = &self.greeting["QMP"]["version"]["qemu"];
        (v["major"].as_u64().unwrap_or(0), v["minor"].as_u64().unwrap_or(0), v["micro"].as_u64().unwrap_or(0))
    }

    /// The default time limit of a command.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn recv(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        if self.closed {
            return Err(QmpError::Closed { during: format!(" before {what}") });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(Incoming::Msg(v)) => Ok(v),
            Ok(Incoming::Bad(s)) => Err(QmpError::Protocol(s)),
            Ok(Incoming::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Err(QmpError::Closed { during: format!(" while waiting for {what}") })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(QmpError::Timeout { command: what.to_string(), after: Duration::ZERO })
            }
        }
    }

    /// Runs a command with the default time limit; returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let t = self.timeout;
        self.execute_within(command, args, t)
    }

    /// Runs a command; waits at most `limit` for the reply. Events met on the way are queued.
    pub fn execute_within(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("serialise");
        tracing::trace!("QMP -> {}", String::from_utf8_lossy(&bytes));
        bytes.push(b'\n');
        let sent = Instant::now();
        if let Err(e) = self.writer.write_all(&bytes).and_then(|_| self.writer.flush()) {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    self.closed = true;
                    QmpError::Closed { during: format!(" during `{command}`") }
                }
                _ => QmpError::Io(e),
            });
        }
        let deadline = Instant::now() + limit;
        loop {
            let v = match self.recv(deadline, &format!("`{command}`")) {
                Ok(v) => v,
                Err(QmpError::Timeout { .. }) => {
                    return Err(QmpError::Timeout { command: command.into(), after: limit })
                }
                Err(QmpError::Closed { .. }) => {
                    return Err(QmpError::Closed { during: format!(" during `{command}`") })
                }
                Err(e) => return Err(e),
            };
            if let Some(name) = v.get("event").and_then(Value::as_str) {
                self.events
                    .push_back(Event { name: name.to_string(), data: v.get("data").cloned().unwrap_or(Value::Null) });
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to a request that timed out earlier: late, and no longer wanted.
                continue;
            }
            tracing::trace!("QMP <- {v}");
            if let Some(r) = v.get("return") {
                tracing::debug!("QMP {command}: {:.1} ms", sent.elapsed().as_secs_f64() * 1000.0);
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                tracing::debug!(
                    "QMP {command}: error after {:.1} ms: {}",
                    sent.elapsed().as_secs_f64() * 1000.0,
                    e["desc"]
                );
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    /// Every event received so far (the queue is emptied).
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits up to `limit` for an event that `pred` accepts; earlier events that it does not
    /// accept stay queued. `Ok(None)` when the time ran out.
    pub fn wait_event(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Option<Event>, QmpError> {
        if let Some(i) = self.events.iter().position(&mut pred) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + limit;
        loop {
            let v = match self.recv(deadline, "an event") {
                Ok(v) => v,
                Err(QmpError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(name) = v.get("event").and_then(Value::as_str) {
                let ev = Event { name: name.to_string(), data: v.get("data").cloned().unwrap_or(Value::Null) };
                if pred(&ev) {
                    return Ok(Some(ev));
                }
                self.events.push_back(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A scripted QEMU on the other end of a socket pair: answers each request with `reply(req)`.
    fn fake(
        mut script: impl FnMut(&Value) -> Vec<String> + Send + 'static,
    ) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n").unwrap();
            let mut r = BufReader::new(b);
            let mut line = String::new();
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                let req: Value = serde_json::from_str(&line).unwrap();
                for out in script(&req) {
                    if w.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
                line.clear();
            }
        });
        (a, h)
    }

    fn connect(s: UnixStream) -> Result<Qmp, QmpError> {
        let r = s.try_clone().unwrap();
        Qmp::handshake(r, s, Duration::from_secs(2))
    }

    #[test]
    fn replies_are_matched_by_id_and_events_are_queued() {
        let (s, _h) = fake(|req| {
            let id = &req["id"];
            if req["execute"] == "query-status" {
                vec![
                    "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\", \"status\": \"running\"}}\n".into(),
                    format!("{{\"return\": {{\"status\": \"running\"}}, \"id\": {id}}}\n"),
                ]
            } else {
                vec![format!("{{\"return\": {{}}, \"id\": {id}}}\n")]
            }
        });
        let mut q = connect(s).unwrap();
        assert_eq!(q.version(), (7, 2, 0));
        let r = q.execute("query-status", None).unwrap();
        assert_eq!(r["status"], "running");
        let ev = q.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].name, "JOB_STATUS_CHANGE");
    }

    #[test]
    fn errors_carry_class_and_description() {
        let (s, _h) = fake(|req| {
            let id = &req["id"];
            if req["execute"] == "qmp_capabilities" {
                vec![format!("{{\"return\": {{}}, \"id\": {id}}}\n")]
            } else {
                vec![format!(
                    "{{\"id\": {id}, \"error\": {{\"class\": \"GenericError\", \"desc\": \"no such node\"}}}}\n"
                )]
            }
        });
        let mut q = connect(s).unwrap();
        let e = q.execute("blockdev-del", Some(json!({"node-name": "x"}))).unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no such node"),
            "{e}"
        );
    }

    #[test]
    fn end_of_file_is_an_error_not_a_panic() {
        let (s, _h) = fake(|req| {
            if req["execute"] == "qmp_capabilities" {
                vec![format!("{{\"return\": {{}}, \"id\": {}}}\n", req["id"])]
            } else {
                vec![] // and the fake ends when the client's next write finds no reader
            }
        });
        let mut q = connect(s).unwrap();
        q.set_timeout(Duration::from_millis(300));
        let e = q.execute("query-status", None).unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e}");
        drop(_h);
    }

    #[test]
    fn a_peer_that_hangs_up_reports_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = b;
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n").unwrap();
            // Hang up without answering qmp_capabilities.
        });
        h.join().unwrap();
        let e = connect(a).err().expect("must fail");
        assert!(e.is_closed(), "{e}");
    }

    #[test]
    fn wait_event_keeps_the_events_it_does_not_want() {
        let (s, _h) = fake(|req| {
            let id = &req["id"];
            vec![
                "{\"event\": \"A\", \"data\": {}}\n".into(),
                "{\"event\": \"B\", \"data\": {\"n\": 1}}\n".into(),
                format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
            ]
        });
        let mut q = connect(s).unwrap();
        let b = q.wait_event(Duration::from_secs(1), |e| e.name == "B").unwrap().unwrap();
        assert_eq!(b.data["n"], 1);
        assert_eq!(q.take_events().iter().map(|e| e.name.clone()).collect::<Vec<_>>(), vec!["A".to_string()]);
    }
}
