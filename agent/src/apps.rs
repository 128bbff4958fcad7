//! The app coordinator: applications that hold a freeze (appvss, see `appvss/PROTOCOL.md`).
//!
//! Each app is one unix connection: a hello, then PREPARE / FREEZE / THAW from us, answered
//! by `re`. Fan-out is parallel: every question goes to every app before any answer is
//! awaited, and all answers come back on one channel, so a freeze with a thousand apps costs
//! one round trip, not a thousand.
//!
//! Invariants:
//! - Nothing an app does delays a thaw: THAW is queued to each connection's writer and never
//!   awaited.
//! - An app that disconnects counts as released; a question it had not answered is answered
//!   `disconnected` at once.
//! - Every app that got PREPARE for a freeze gets exactly one THAW for it.
//! - A misbehaving app gets a specific error; only a bad hello, an unsupported version or a
//!   registration over the uid cap close its connection.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appvss::proto::{self, AgentMessage, AppMessage, ErrorCode, ThawReason};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// What an app answered (or did instead) in one phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Ready,
    Vetoed,
    Held,
    Failed,
    Timeout,
    Disconnected,
}

/// One app's line in a report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AppReport {
    pub app_id: u64,
    pub name: String,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The last phase's answer: `held` when all went well.
    pub outcome: Answer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// From sending PREPARE to its answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prepare_ms: Option<f64>,
    /// From sending FREEZE to HELD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<f64>,
}

/// Settings of the app socket.
#[derive(Debug, Clone)]
pub struct AppSettings {
    pub socket: PathBuf,
    pub group: String,
    pub mode: u32,
    pub max_per_uid: usize,
}

struct Reply {
    app_id: u64,
    answer: Answer,
    reason: Option<String>,
}

struct Pending {
    phase: Phase,
    sent: Instant,
    to: mpsc::UnboundedSender<(Reply, Duration)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepare,
    Freeze,
    Thaw,
}

struct Conn {
    name: String,
    uid: u32,
    pid: Option<i32>,
    out: mpsc::UnboundedSender<AgentMessage>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
}

/// The registry of connected apps.
pub struct Apps {
    settings: AppSettings,
    conns: Mutex<HashMap<u64, Conn>>,
    next_app: AtomicU64,
}

/// Answers gathered in one phase, by app.
pub type PhaseResult = Vec<AppReport>;

impl Apps {
    pub fn new(settings: AppSettings) -> Arc<Apps> {
        Arc::new(Apps { settings, conns: Mutex::new(HashMap::new()), next_app: AtomicU64::new(1) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many apps are registered now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Listens on the app socket and serves it until the process ends.
    pub fn listen(self: &Arc<Self>) -> io::Result<()> {
        let l = bind(&self.settings)?;
        info!(socket = %self.settings.socket.display(), "listening for applications (appvss)");
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let me = me.clone();
                        tokio::spawn(async move { me.serve(s).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "app accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(())
    }

    async fn serve(self: Arc<Self>, s: UnixStream) {
        let cred = s.peer_cred().ok();
        let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
        let pid = cred.and_then(|c| c.pid());
        let (mut rd, mut wr) = s.into_split();
        let mut lines = LineReader::new(proto::MAX_MESSAGE_BYTES);
        // The hello, within a bound, so a silent connection does not hold a slot forever.
        let hello = tokio::time::timeout(Duration::from_secs(10), lines.next(&mut rd)).await;
        let (hello_id, name, version) = match hello {
            Ok(Some(Ok(line))) => match serde_json::from_slice::<AppMessage>(&line) {
                Ok(AppMessage::Hello { id, name, min_version, max_version }) => {
                    if name.is_empty() || name.len() > proto::MAX_NAME_BYTES || name.chars().any(char::is_control) {
                        let m =
                            format!("the name must be 1 to {} bytes without control characters", proto::MAX_NAME_BYTES);
                        return fatal(&mut wr, Some(id), ErrorCode::BadHello, m).await;
                    }
                    match proto::negotiate(min_version, max_version) {
                        Some(v) => (id, name, v),
                        None => {
                            let m = format!(
                                "no common protocol version: the app speaks {min_version}..{max_version}, vssd {}..{}",
                                proto::MIN_PROTOCOL_VERSION,
                                proto::PROTOCOL_VERSION
                            );
                            return fatal(&mut wr, Some(id), ErrorCode::VersionUnsupported, m).await;
                        }
                    }
                }
                Ok(_) => {
                    return fatal(&mut wr, None, ErrorCode::BadHello, "the first message must be a hello".into()).await
                }
                Err(e) => return fatal(&mut wr, None, ErrorCode::BadHello, format!("not a hello: {e}")).await,
            },
            Ok(Some(Err(too_long))) => {
                return fatal(
                    &mut wr,
                    None,
                    ErrorCode::TooLarge,
                    format!("hello of {too_long} bytes is over the limit"),
                )
                .await
            }
            Ok(None) => return,
            Err(_) => return fatal(&mut wr, None, ErrorCode::BadHello, "no hello within 10 s".into()).await,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<AgentMessage>();
        let registered = {
            let mut conns = self.lock();
            let of_uid = conns.values().filter(|c| c.uid == uid).count();
            if of_uid >= self.settings.max_per_uid {
                Err(of_uid)
            } else {
                let app_id = self.next_app.fetch_add(1, Ordering::Relaxed);
                conns.insert(
                    app_id,
                    Conn { name: name.clone(), uid, pid, out: tx.clone(), pending: HashMap::new(), next_id: 1 },
                );
                Ok(app_id)
            }
        };
        let app_id = match registered {
            Ok(id) => id,
            Err(of_uid) => {
                let m = format!("uid {uid} already has {of_uid} registrations, the most vssd allows (app-max-per-uid)");
                return fatal(&mut wr, Some(hello_id), ErrorCode::TooManyRegistrations, m).await;
            }
        };
        info!(app_id, name = %name, uid, pid, "app registered");
        let _ = tx.send(AgentMessage::Welcome { re: hello_id, version, app_id });
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if wr.write_all(&proto::encode(&m)).await.is_err() {
                    break;
                }
            }
        });
        loop {
            let line = match lines.next(&mut rd).await {
                None => break,
                Some(Err(len)) => {
                    let _ = tx.send(AgentMessage::Error {
                        re: None,
                        code: ErrorCode::TooLarge,
                        message: format!(
                            "message of {len} bytes is over the limit of {} bytes; ignored",
                            proto::MAX_MESSAGE_BYTES
                        ),
                        fatal: false,
                    });
                    continue;
                }
                Some(Ok(line)) => line,
            };
            match serde_json::from_slice::<AppMessage>(&line) {
                Ok(AppMessage::Hello { id, .. }) => {
                    let _ = tx.send(AgentMessage::Error {
                        re: Some(id),
                        code: ErrorCode::BadHello,
                        message: "already registered: one hello per connection".into(),
                        fatal: true,
                    });
                    break;
                }
                Ok(m) => self.answer(app_id, m, &tx),
                Err(e) => {
                    let _ = tx.send(AgentMessage::Error {
                        re: None,
                        code: ErrorCode::BadMessage,
                        message: format!("{e}; ignored"),
                        fatal: false,
                    });
                }
            }
        }
        // Gone: answer what it still owed, so no phase waits for it.
        if let Some(c) = self.lock().remove(&app_id) {
            for (_, p) in c.pending {
                let _ = p.to.send((Reply { app_id, answer: Answer::Disconnected, reason: None }, p.sent.elapsed()));
            }
        }
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        info!(app_id, name = %name, "app disconnected");
    }

    fn answer(&self, app_id: u64, m: AppMessage, tx: &mpsc::UnboundedSender<AgentMessage>) {
        let (re, answer, reason, phase) = match m {
            AppMessage::Ready { re } => (re, Answer::Ready, None, Phase::Prepare),
            AppMessage::Veto { re, reason } => (re, Answer::Vetoed, Some(reason), Phase::Prepare),
            AppMessage::Held { re } => (re, Answer::Held, None, Phase::Freeze),
            AppMessage::Failed { re, reason } => (re, Answer::Failed, Some(reason), Phase::Freeze),
            AppMessage::Thawed { re } => (re, Answer::Ready, None, Phase::Thaw),
            AppMessage::Hello { .. } => unreachable!("handled by the caller"),
        };
        let mut conns = self.lock();
        let Some(c) = conns.get_mut(&app_id) else { return };
        match c.pending.remove(&re) {
            Some(p) if p.phase == phase => {
                if phase != Phase::Thaw {
                    let _ = p.to.send((Reply { app_id, answer, reason: reason.clone() }, p.sent.elapsed()));
                }
            }
            other => {
                if let Some(p) = other {
                    c.pending.insert(re, p);
                }
                let _ = tx.send(AgentMessage::Error {
                    re: Some(re),
                    code: ErrorCode::UnexpectedReply,
                    message: format!("no open question {re} that this answers"),
                    fatal: false,
                });
            }
        }
    }

    /// Sends a question to the given apps (all registered ones if `only` is None) and gathers
    /// the answers until all are in or the deadline passes.
    async fn ask(
        &self,
        phase: Phase,
        only: Option<&[u64]>,
        make: impl Fn(u64) -> AgentMessage,
        deadline: Duration,
    ) -> PhaseResult {
        let (to, mut from) = mpsc::unbounded_channel();
        let mut waiting: HashMap<u64, AppReport> = HashMap::new();
        {
            let mut conns = self.lock();
            for (&app_id, c) in conns.iter_mut() {
                if only.is_some_and(|o| !o.contains(&app_id)) {
                    continue;
                }
                let id = c.next_id;
                c.next_id += 1;
                c.pending.insert(id, Pending { phase, sent: Instant::now(), to: to.clone() });
                let sent = c.out.send(make(id)).is_ok();
                let mut r = AppReport {
                    app_id,
                    name: c.name.clone(),
                    uid: c.uid,
                    pid: c.pid,
                    outcome: Answer::Timeout,
                    reason: None,
                    prepare_ms: None,
                    freeze_ms: None,
                };
                if !sent {
                    c.pending.remove(&id);
                    r.outcome = Answer::Disconnected;
                }
                waiting.insert(app_id, r);
            }
        }
        drop(to);
        let mut done: Vec<AppReport> = Vec::with_capacity(waiting.len());
        let mut open = waiting.values().filter(|r| r.outcome == Answer::Timeout).count();
        let end = tokio::time::Instant::now() + deadline;
        while open > 0 {
            match tokio::time::timeout_at(end, from.recv()).await {
                Ok(Some((reply, took))) => {
                    if let Some(mut r) = waiting.remove(&reply.app_id) {
                        r.outcome = reply.answer;
                        r.reason = reply.reason;
                        let ms = Some((took.as_secs_f64() * 1e6).round() / 1e3);
                        match phase {
                            Phase::Prepare => r.prepare_ms = ms,
                            _ => r.freeze_ms = ms,
                        }
                        done.push(r);
                        open -= 1;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        // Whoever did not answer in time: forget the question, so a late answer is "unexpected".
        if !waiting.is_empty() {
            let mut conns = self.lock();
            for (app_id, r) in &waiting {
                if r.outcome == Answer::Timeout {
                    if let Some(c) = conns.get_mut(app_id) {
                        c.pending.retain(|_, p| p.phase != phase);
                    }
                }
            }
        }
        done.extend(waiting.into_values());
        done.sort_by_key(|r| r.app_id);
        done
    }

    /// PREPARE to every registered app.
    pub async fn prepare(&self, freeze_id: u64, deadline: Duration) -> PhaseResult {
        let ms = deadline.as_millis() as u64;
        self.ask(Phase::Prepare, None, |id| AgentMessage::Prepare { id, freeze_id, deadline_ms: ms }, deadline).await
    }

    /// FREEZE to the given apps.
    pub async fn freeze(&self, apps: &[u64], freeze_id: u64, deadline: Duration, max_hold: Duration) -> PhaseResult {
        let ms = deadline.as_millis() as u64;
        let hold = max_hold.as_millis() as u64;
        self.ask(
            Phase::Freeze,
            Some(apps),
            |id| AgentMessage::Freeze { id, freeze_id, deadline_ms: ms, max_hold_ms: hold },
            deadline,
        )
        .await
    }

    /// THAW to the given apps; queued, never awaited.
    pub fn thaw(&self, apps: &[u64], freeze_id: u64, reason: ThawReason) {
        let mut conns = self.lock();
        let mut sent = 0;
        for app_id in apps {
            if let Some(c) = conns.get_mut(app_id) {
                let id = c.next_id;
                c.next_id += 1;
                // The acknowledgement is optional; remember the question only so that a
                // `thawed` answer is not reported as unexpected.
                let (to, _) = mpsc::unbounded_channel();
                c.pending.retain(|_, p| p.phase == Phase::Thaw && p.sent.elapsed() < Duration::from_secs(60));
                c.pending.insert(id, Pending { phase: Phase::Thaw, sent: Instant::now(), to });
                if c.out.send(AgentMessage::Thaw { id, freeze_id, reason }).is_ok() {
                    sent += 1;
                }
            }
        }
        debug!(sent, freeze_id, ?reason, "THAW sent");
    }

    /// The registered apps, for `vssd-status`.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let conns = self.lock();
        let mut v: Vec<_> = conns
            .iter()
            .map(|(id, c)| serde_json::json!({"app-id": id, "name": c.name, "uid": c.uid, "pid": c.pid}))
            .collect();
        v.sort_by_key(|a| a["app-id"].as_u64());
        v
    }
}

async fn fatal(wr: &mut tokio::net::unix::OwnedWriteHalf, re: Option<u64>, code: ErrorCode, message: String) {
    warn!(?code, %message, "refusing an app connection");
    let _ = wr.write_all(&proto::encode(&AgentMessage::Error { re, code, message, fatal: true })).await;
    let _ = wr.shutdown().await;
}

fn bind(s: &AppSettings) -> io::Result<UnixListener> {
    if let Some(dir) = s.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::symlink_metadata(&s.socket).is_ok() {
        if std::os::unix::net::UnixStream::connect(&s.socket).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", s.socket.display()),
            ));
        }
        std::fs::remove_file(&s.socket)?;
    }
    let l = UnixListener::bind(&s.socket)?;
    set_access(&s.socket, &s.group, s.mode)?;
    Ok(l)
}

fn set_access(path: &Path, group: &str, mode: u32) -> io::Result<()> {
    match local_gid(Path::new("/etc/group"), group) {
        Some(gid) => nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(io::Error::from)?,
        None => info!(group, "group not in /etc/group: the app socket stays in root's group (groupadd --system vssd to let its members' apps in)"),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The gid of a local group. Read from /etc/group directly rather than through NSS, which
/// would load (and keep mapped for the agent's lifetime) NSS modules for one lookup.
fn local_gid(group_file: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(group_file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Reads `\n`-terminated lines up to a limit; a longer line is skipped to its end and
/// reported as `Err(length)`.
struct LineReader {
    max: usize,
    buf: Vec<u8>,
    start: usize,
    skipping: Option<usize>,
}

impl LineReader {
    fn new(max: usize) -> Self {
        LineReader { max, buf: Vec::with_capacity(1024), start: 0, skipping: None }
    }

    async fn next<R: AsyncReadExt + Unpin>(&mut self, r: &mut R) -> Option<Result<Vec<u8>, usize>> {
        loop {
            if let Some(pos) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                let end = self.start + pos;
                let line = self.buf[self.start..end].to_vec();
                self.start = end + 1;
                if let Some(skipped) = self.skipping.take() {
                    return Some(Err(skipped + line.len() + 1));
                }
                if line.len() + 1 > self.max {
                    return Some(Err(line.len() + 1));
                }
                return Some(Ok(line));
            }
            let pending = self.buf.len() - self.start;
            if pending >= self.max {
                // Too long already: drop what we have, remember how much, keep reading to the newline.
                self.skipping = Some(self.skipping.unwrap_or(0) + pending);
                self.buf.clear();
                self.start = 0;
            } else if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 8192];
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_gid_reads_the_group_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("group");
        std::fs::write(&f, "root:x:0:\nvssdx:x:7:\nvssd:x:998:alice,bob\n").unwrap();
        assert_eq!(local_gid(&f, "vssd"), Some(998));
        assert_eq!(local_gid(&f, "nobody"), None);
    }

    #[tokio::test]
    async fn line_reader_splits_lines_and_skips_overlong_ones() {
        let data = [b"{\"a\":1}\n".to_vec(), vec![b'x'; 100], b"\n{\"b\":2}\n".to_vec()].concat();
        let mut r = &data[..];
        let mut l = LineReader::new(32);
        assert_eq!(l.next(&mut r).await, Some(Ok(b"{\"a\":1}".to_vec())));
        assert_eq!(l.next(&mut r).await, Some(Err(101)));
        assert_eq!(l.next(&mut r).await, Some(Ok(b"{\"b\":2}".to_vec())));
        assert_eq!(l.next(&mut r).await, None);
    }
}
