//! Forwarding to qemu-ga: every command vssd does not implement (guest-exec, guest-file-*,
//! guest-set-user-password, guest-ssh-*, ...) runs in a qemu-ga that listens on a unix socket
//! (`qga-backend`, started as `qemu-ga -m unix-listen -p PATH --block-rpcs=guest-fsfreeze-freeze,
//! guest-fsfreeze-freeze-list,guest-fsfreeze-thaw`), so the host sees one agent. vssd itself
//! never runs a host's program nor writes a host's file: only that qemu-ga does, and only when
//! the admin configured it.
//!
//! Invariants:
//! - One connection, one request at a time: qemu-ga's unix-listen mode serves one client. The
//!   requests of every channel queue on a mutex that guards that connection and nothing else;
//!   a freeze, a thaw or a status query never waits for the backend.
//! - Every exchange ends within `qga-backend-timeout`, the wait for the connection included. A
//!   dead or hung backend is a `GenericError` for the host that names the socket and the fix.
//! - Before each request: 0xFF and `guest-sync-delimited` with a fresh id, and everything
//!   before its answer is dropped (qemu-ga keeps a partial message across connections, and a
//!   timed-out request's reply may still come). Each request carries an id of ours, and only
//!   the reply with that id is taken; the host's id is put back on it ([`relay`]).
//! - The backend's output is cut by the agent's own [`Splitter`] with max-message-bytes: a
//!   larger reply is an error for the host and never costs more memory than that limit.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qga_wire::stream::{Event, Splitter};
use qga_wire::Unknown;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::debug;

use crate::config::Config;

/// One command as the backend's `guest-info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCommand {
    pub name: String,
    pub enabled: bool,
    pub success_response: bool,
}

/// What the backend answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Its reply object (`return` or `error`, with our id, which [`relay`] replaces).
    Reply(Map<String, Value>),
    /// Nothing, as qemu-ga answers a command without a success response that succeeded
    /// (`guest-shutdown`): the host gets no reply either.
    NoReply,
}

/// Why a command could not be run through the backend. Each message names the socket and
/// what to do; the operating system's reason is part of the message (there is no source to
/// print after it), since a host sees this one line.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "`{command}` was not run: cannot reach the qemu-ga backend on {} ({reason}); start it \
         (systemctl start vssd-qga-backend.service) or remove qga-backend from vssd's configuration",
        path.display()
    )]
    Unreachable { command: String, path: PathBuf, reason: io::Error },
    #[error(
        "the qemu-ga backend on {} closed the connection before answering `{command}` (it may \
         have run); check it: systemctl status vssd-qga-backend.service",
        path.display()
    )]
    Closed { command: String, path: PathBuf },
    #[error("i/o error with the qemu-ga backend on {} during `{command}` ({reason})", path.display())]
    Io { command: String, path: PathBuf, reason: io::Error },
    #[error(
        "the qemu-ga backend on {} did not answer `{command}` within {} s (qga-backend-timeout): it \
         hangs or is busy; restart it (systemctl restart vssd-qga-backend.service) or raise qga-backend-timeout",
        path.display(), after.as_secs_f64()
    )]
    Timeout { command: String, path: PathBuf, after: Duration },
    #[error(
        "the qemu-ga backend's reply to `{command}` is {len} bytes, over vssd's limit of {max} bytes \
         (max-message-bytes): ask for less, or raise max-message-bytes"
    )]
    TooLarge { command: String, len: usize, max: usize },
    #[error("the qemu-ga backend on {} refused guest-info: {desc}", path.display())]
    Info { path: PathBuf, desc: String },
}

/// The longest guest-info waits for the backend's list.
pub const INFO_WAIT: Duration = Duration::from_secs(2);

/// The connection to the backend, and the backend's command list as last seen.
pub struct Backend {
    path: PathBuf,
    timeout: Duration,
    max_bytes: usize,
    conn: tokio::sync::Mutex<Option<Conn>>,
    seq: AtomicI64,
    /// The backend's commands as its last `guest-info` listed them (for success-response and
    /// for the names it does not have).
    known: Mutex<Option<Arc<[BackendCommand]>>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("path", &self.path).field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend on `path`; nothing is connected until the first command.
    pub fn new(path: &Path, timeout: Duration, max_bytes: usize) -> Backend {
        Backend {
            path: path.to_owned(),
            timeout,
            max_bytes,
            conn: tokio::sync::Mutex::new(None),
            // Ids of ours: time-seeded so that a restarted vssd does not meet its own old ids.
            seq: AtomicI64::new(seed()),
            known: Mutex::new(None),
        }
    }

    /// The configured backend, one per socket for the whole process: every channel's session
    /// shares its one connection (qemu-ga serves one client at a time). None without
    /// `qga-backend`.
    pub fn shared(cfg: &Config) -> Option<Arc<Backend>> {
        static ALL: Mutex<Vec<Arc<Backend>>> = Mutex::new(Vec::new());
        let path = cfg.qga_backend.as_deref()?;
        let (timeout, max) = (cfg.qga_backend_timeout(), cfg.max_message_bytes);
        let mut all = ALL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.iter().find(|b| b.path == path && b.timeout == timeout && b.max_bytes == max) {
            return Some(b.clone());
        }
        let b = Arc::new(Backend::new(path, timeout, max));
        all.push(b.clone());
        Some(b)
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn next_id(&self) -> i64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn known(&self) -> Option<Arc<[BackendCommand]>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the backend's last `guest-info` listed `name`; None before any.
    pub fn lists(&self, name: &str) -> Option<bool> {
        self.known().map(|k| k.iter().any(|c| c.name == name))
    }

    /// The backend's `guest-info` command list (and remembers it), waiting at most
    /// [`INFO_WAIT`] or the timeout, whichever is shorter: guest-info is what hosts poll to
    /// see that the agent lives, and it answers without the backend's list rather than late.
    pub async fn commands(&self) -> Result<Arc<[BackendCommand]>, BackendError> {
        let limit = self.timeout.min(INFO_WAIT);
        self.commands_until(Instant::now() + limit, limit).await
    }

    /// [`Backend::commands`] by `deadline`; `limit` is what a timeout error reports.
    async fn commands_until(&self, deadline: Instant, limit: Duration) -> Result<Arc<[BackendCommand]>, BackendError> {
        let make = |id| json!({"execute": "guest-info", "id": id});
        let reply = match self.exchange_until(deadline, limit, "guest-info", make, true).await? {
            Outcome::Reply(r) => r,
            Outcome::NoReply => unreachable!("guest-info is asked with a success response"),
        };
        if let Some(e) = reply.get("error") {
            let desc = e["desc"].as_str().unwrap_or("no description").to_string();
            return Err(BackendError::Info { path: self.path.clone(), desc });
        }
        let list: Arc<[BackendCommand]> = reply["return"]["supported_commands"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| {
                Some(BackendCommand {
                    name: c["name"].as_str()?.to_string(),
                    enabled: c["enabled"].as_bool().unwrap_or(true),
                    success_response: c["success-response"].as_bool().unwrap_or(true),
                })
            })
            .collect();
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = Some(list.clone());
        Ok(list)
    }

    /// Runs a command vssd does not implement in the backend; its reply comes back with our
    /// id in it (see [`relay`]).
    /// Runs a command vssd does not implement in the backend, within the timeout; its reply
    /// comes back with our id in it (see [`relay`]).
    pub async fn forward(&self, req: &Unknown) -> Result<Outcome, BackendError> {
        let deadline = Instant::now() + self.timeout;
        if self.known().is_none() {
            // Once: whether the command answers on success comes from the backend's list. Out
            // of the same time limit.
            let until = deadline.min(Instant::now() + INFO_WAIT);
            if let Err(e) = self.commands_until(until, self.timeout.min(INFO_WAIT)).await {
                debug!(error = %e, "backend: no command list yet");
            }
        }
        let success_response = self
            .known()
            .and_then(|k| k.iter().find(|c| c.name == req.name).map(|c| c.success_response))
            .unwrap_or(true);
        self.exchange_until(deadline, self.timeout, &req.name, |id| req.envelope(json!(id)), success_response).await
    }

    /// One request by `deadline`, the wait for the connection included; `limit` is what a
    /// timeout error reports.
    async fn exchange_until(
        &self,
        deadline: Instant,
        limit: Duration,
        command: &str,
        make: impl FnOnce(i64) -> Value,
        success_response: bool,
    ) -> Result<Outcome, BackendError> {
        match tokio::time::timeout_at(deadline, self.exchange_now(command, make, success_response)).await {
            Ok(r) => r,
            // The connection stays as it is; the next request's resync drops the late reply.
            Err(_) => Err(BackendError::Timeout { command: command.into(), path: self.path.clone(), after: limit }),
        }
    }

    async fn exchange_now(
        &self,
        command: &str,
        make: impl FnOnce(i64) -> Value,
        success_response: bool,
    ) -> Result<Outcome, BackendError> {
        let fail = |e: ConnError| match e {
            ConnError::Closed => BackendError::Closed { command: command.into(), path: self.path.clone() },
            ConnError::Io(reason) => BackendError::Io { command: command.into(), path: self.path.clone(), reason },
            ConnError::TooLarge(len) => BackendError::TooLarge { command: command.into(), len, max: self.max_bytes },
        };
        let mut slot = self.conn.lock().await;
        // A connection kept from an earlier request may have died with a restarted backend:
        // then one new connection. The resync is harmless to repeat; the request is not.
        let mut reconnected = false;
        loop {
            let conn = match &mut *slot {
                Some(c) => c,
                None => {
                    let s = UnixStream::connect(&self.path).await.map_err(|reason| BackendError::Unreachable {
                        command: command.into(),
                        path: self.path.clone(),
                        reason,
                    })?;
                    debug!(path = %self.path.display(), "backend: connected");
                    reconnected = true;
                    slot.insert(Conn::new(s, self.max_bytes))
                }
            };
            match conn.sync(self.next_id()).await {
                Ok(()) => break,
                Err(e) => {
                    *slot = None;
                    if reconnected {
                        return Err(fail(e));
                    }
                    debug!(error = ?e, "backend: the kept connection is dead; connecting again");
                }
            }
        }
        let conn = slot.as_mut().expect("connected above");
        let id = self.next_id();
        // After a command without a success response, a guest-sync: its answer first means
        // the command succeeded silently (qemu-ga runs requests in order).
        let after = (!success_response).then(|| self.next_id());
        match conn.request(&make(id), id, after).await {
            Ok(o) => Ok(o),
            Err(e) => {
                if !matches!(e, ConnError::TooLarge(_)) {
                    *slot = None;
                }
                Err(fail(e))
            }
        }
    }
}

/// The backend's reply as the host's: our id replaced by the host's (or removed when the host
/// sent none), `return` or `error` as the backend wrote them, and the newline.
pub fn relay(mut reply: Map<String, Value>, host_id: Option<Value>) -> Vec<u8> {
    reply.remove("id");
    if let Some(id) = host_id {
        reply.insert("id".into(), id);
    }
    let mut out = serde_json::to_vec(&Value::Object(reply)).expect("a Value always serialises");
    out.push(b'\n');
    out
}

fn seed() -> i64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // Millisecond time in the high bits: thousands of ids a millisecond before any repeat.
    ((t.as_millis() as i64) & 0x0000_ffff_ffff_ffff) << 10
}

#[derive(Debug)]
enum ConnError {
    Closed,
    Io(io::Error),
    /// A reply longer than max-message-bytes, of this length.
    TooLarge(usize),
}

/// The connection: a stream and the splitter of its output.
struct Conn {
    stream: UnixStream,
    splitter: Splitter,
    events: VecDeque<Event>,
    chunk: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream, max_bytes: usize) -> Conn {
        Conn { stream, splitter: Splitter::new(max_bytes), events: VecDeque::new(), chunk: vec![0; 16 * 1024] }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        self.stream.write_all(bytes).await.map_err(io_error)
    }

    async fn next_event(&mut self) -> Result<Event, ConnError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            let n = self.stream.read(&mut self.chunk).await.map_err(io_error)?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            self.events.extend(self.splitter.feed(&self.chunk[..n]));
        }
    }

    /// The next whole JSON object the backend wrote; other events are noise (a 0xFF's parse
    /// error, a stale reply) unless `large` is told about a message over the limit.
    async fn next_object(&mut self, large_is_error: bool) -> Result<Map<String, Value>, ConnError> {
        loop {
            match self.next_event().await? {
                Event::Message(m) => {
                    if let Ok(Value::Object(o)) = serde_json::from_slice(&m) {
                        return Ok(o);
                    }
                }
                Event::TooLarge { len } if large_is_error => return Err(ConnError::TooLarge(len)),
                _ => {}
            }
        }
    }

    /// 0xFF and `guest-sync-delimited`; everything before its answer is dropped.
    async fn sync(&mut self, id: i64) -> Result<(), ConnError> {
        let mut msg = vec![0xFF];
        msg.extend(json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}).to_string().into_bytes());
        msg.push(b'\n');
        self.send(&msg).await?;
        loop {
            let o = self.next_object(false).await?;
            if o.get("return").and_then(Value::as_i64) == Some(id) && o.get("id").is_none() {
                return Ok(());
            }
        }
    }

    /// Sends `msg` (whose top-level id is `id`) and returns the reply with that id. With
    /// `sync_after`, a `guest-sync` follows it, and its answer coming first means no reply.
    async fn request(&mut self, msg: &Value, id: i64, sync_after: Option<i64>) -> Result<Outcome, ConnError> {
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        if let Some(s) = sync_after {
            bytes.extend(json!({"execute": "guest-sync", "arguments": {"id": s}}).to_string().into_bytes());
            bytes.push(b'\n');
        }
        self.send(&bytes).await?;
        loop {
            let o = self.next_object(true).await?;
            if o.get("id").and_then(Value::as_i64) == Some(id) {
                return Ok(Outcome::Reply(o));
            }
            if sync_after.is_some() && o.get("id").is_none() && o.get("return").and_then(Value::as_i64) == sync_after {
                return Ok(Outcome::NoReply);
            }
        }
    }
}

fn io_error(e: io::Error) -> ConnError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => ConnError::Closed,
        _ => ConnError::Io(e),
    }
}

/// A scripted qemu-ga on a unix socket in a temp dir, for the tests: it serves one client at
/// a time, as qemu-ga's unix-listen mode does, answers a 0xFF with qemu-ga's parse error,
/// the syncs itself, and every other request as the script says.
#[cfg(test)]
pub(crate) mod fake {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use qga_wire::fake::Answer;
    use serde_json::{json, Value};

    /// What the fake does with one request.
    pub enum Act {
        /// This reply body (`{"return": ..}` or `{"error": ..}`), the request's id echoed.
        Reply(Value),
        /// No reply, as qemu-ga after a command without a success response.
        Nothing,
        /// These bytes, then the connection is closed.
        CloseAfter(Vec<u8>),
        /// This reply (id echoed), then the connection is closed (a restart between requests).
        ReplyThenClose(Value),
        /// Sleeps (serving nobody, as a hung qemu-ga), then replies.
        Late(Duration, Value),
    }

    type Script = Box<dyn Fn(&str, &Value) -> Act + Send + Sync>;

    pub struct FakeQemuGa {
        pub path: PathBuf,
        /// Every request it received that is not a sync, in order.
        pub seen: Arc<Mutex<Vec<Value>>>,
        _dir: tempfile::TempDir,
    }

    /// A guest-info list as qemu-ga 7.2 gives it (abridged), with its freeze commands blocked.
    pub fn info_list() -> Value {
        json!({"return": {"version": "7.2.22", "supported_commands": [
            {"enabled": true, "name": "guest-ping", "success-response": true},
            {"enabled": true, "name": "guest-exec", "success-response": true},
            {"enabled": true, "name": "guest-exec-status", "success-response": true},
            {"enabled": false, "name": "guest-file-open", "success-response": true},
            {"enabled": false, "name": "guest-fsfreeze-freeze", "success-response": true},
            {"enabled": true, "name": "guest-info", "success-response": true},
            {"enabled": true, "name": "x-test-silent-on-success", "success-response": false},
        ]}})
    }

    impl FakeQemuGa {
        pub fn start(script: impl Fn(&str, &Value) -> Act + Send + Sync + 'static) -> FakeQemuGa {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qga.sock");
            let l = UnixListener::bind(&path).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (script, log): (Script, _) = (Box::new(script), seen.clone());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    match s {
                        Ok(s) => serve(s, &script, &log),
                        Err(_) => return,
                    }
                }
            });
            FakeQemuGa { path, seen, _dir: dir }
        }

        /// The names it was asked to run (syncs and guest-info left out).
        pub fn ran(&self) -> Vec<String> {
            let seen = self.seen.lock().unwrap();
            seen.iter().filter_map(|v| v["execute"].as_str().map(String::from)).filter(|n| n != "guest-info").collect()
        }
    }

    fn with_id(mut body: Value, req: &Value) -> Vec<u8> {
        if let Some(id) = req.get("id") {
            body["id"] = id.clone();
        }
        let mut out = serde_json::to_vec(&body).unwrap();
        out.push(b'\n');
        out
    }

    fn serve(s: UnixStream, script: &Script, log: &Mutex<Vec<Value>>) {
        qga_wire::fake::serve(s, |v| {
            let name = v["execute"].as_str().unwrap_or("").to_string();
            match name.as_str() {
                "guest-sync-delimited" => {
                    Answer::Write([&[0xFF][..], &with_id(json!({"return": v["arguments"]["id"]}), v)].concat())
                }
                "guest-sync" => Answer::Write(with_id(json!({"return": v["arguments"]["id"]}), v)),
                _ => {
                    log.lock().unwrap().push(v.clone());
                    match script(&name, v) {
                        Act::Reply(body) => Answer::Write(with_id(body, v)),
                        Act::Nothing => Answer::Write(Vec::new()),
                        Act::CloseAfter(bytes) => Answer::WriteThenClose(bytes),
                        Act::ReplyThenClose(body) => Answer::WriteThenClose(with_id(body, v)),
                        Act::Late(d, body) => {
                            std::thread::sleep(d);
                            Answer::Write(with_id(body, v))
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{info_list, Act, FakeQemuGa};
    use super::*;

    #[test]
    fn relay_puts_the_hosts_id_in_place_of_ours() {
        let reply = |v: Value| v.as_object().unwrap().clone();
        let r = relay(reply(json!({"return": {"pid": 1}, "id": 99})), Some(json!("h")));
        assert_eq!(r, b"{\"id\":\"h\",\"return\":{\"pid\":1}}\n");
        let r = relay(reply(json!({"error": {"class": "GenericError", "desc": "d"}, "id": 99})), None);
        assert_eq!(r, b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"d\"}}\n");
    }

    #[tokio::test]
    async fn a_backend_restarted_between_requests_costs_no_error_and_runs_nothing_twice() {
        // It hangs up after every reply, as a qemu-ga that restarts between two requests.
        let q = FakeQemuGa::start(|name, _| match name {
            "guest-info" => Act::Reply(info_list()),
            _ => Act::ReplyThenClose(json!({"return": {"pid": 1}})),
        });
        let b = Backend::new(&q.path, Duration::from_secs(5), 1 << 20);
        let u = Unknown { name: "guest-exec".into(), arguments: None };
        for _ in 0..3 {
            let Outcome::Reply(r) = b.forward(&u).await.unwrap() else { panic!("no reply") };
            assert_eq!(r["return"], json!({"pid": 1}));
        }
        assert_eq!(q.ran(), ["guest-exec", "guest-exec", "guest-exec"]);
    }

    #[tokio::test]
    async fn commands_are_read_from_the_backends_guest_info_and_remembered() {
        let q = FakeQemuGa::start(|_, _| Act::Reply(info_list()));
        let b = Backend::new(&q.path, Duration::from_secs(5), 1 << 20);
        assert_eq!(b.lists("guest-exec"), None);
        let list = b.commands().await.unwrap();
        assert_eq!(list.len(), 7);
        assert_eq!(
            list[6],
            BackendCommand { name: "x-test-silent-on-success".into(), enabled: true, success_response: false }
        );
        assert_eq!((b.lists("guest-exec"), b.lists("guest-nope")), (Some(true), Some(false)));
    }
}
