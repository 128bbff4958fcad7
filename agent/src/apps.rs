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
//! - A misbehaving app gets a specific error; only a bad hello (also a second one), an
//!   unsupported version, a registration over the uid cap, a line that goes on past
//!   [`FLOOD_LIMIT`] beyond the line limit, or a line begun and left unended for
//!   [`LINE_TIMEOUT`] (10 to 20 s) close its connection. After the
//!   hello, messages are `AppAnswer`s, which have no hello: nothing an app sends can panic.
//! - The wire format, the name rules and the line limit are appvss-proto's, the same code the
//!   client library uses. What an app can make vssd log is rate-limited (`ratelimit`).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appvss_proto::{
    self as proto, AgentMessage, AppAnswer, AppMessage, ErrorCode, FrameError, Hello, LineReader, ThawReason,
};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info};

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

    /// The ids of the apps registered now, ascending.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().keys().copied().collect();
        ids.sort_unstable();
        ids
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
                        // Connections churning can run out of descriptors on every accept.
                        crate::warn_limited!(error = %e, "app accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// Serves one app connection that did not come through the socket (tests and fuzzing
    /// hand over one end of a socket pair); spawned on the current runtime.
    pub fn serve_connection(self: &Arc<Self>, s: UnixStream) {
        tokio::spawn(self.clone().serve(s));
    }

    async fn serve(self: Arc<Self>, s: UnixStream) {
        let cred = s.peer_cred().ok();
        let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
        let pid = cred.and_then(|c| c.pid());
        let (rd, mut wr) = s.into_split();
        let mut lines = LineReader::new(rd, proto::MAX_MESSAGE_BYTES).with_flood_limit(FLOOD_LIMIT);
        // The hello, within a bound, so a silent connection does not hold a slot forever.
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut lines)).await.unwrap_or_else(|_| {
            let message = format!("no hello within {} s", HELLO_TIMEOUT.as_secs());
            Err(Refusal { re: None, code: ErrorCode::BadHello, message })
        });
        let (hello, version) = match hello {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(r) => return refuse(&mut wr, uid, pid, r).await,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<AgentMessage>();
        let name = hello.name;
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
                let message =
                    format!("uid {uid} already has {of_uid} registrations, the most vssd allows (app-max-per-uid)");
                let r = Refusal { re: Some(hello.id), code: ErrorCode::TooManyRegistrations, message };
                return refuse(&mut wr, uid, pid, r).await;
            }
        };
        crate::info_limited!(app_id, name = %name, uid, pid, "app registered");
        let _ = tx.send(AgentMessage::Welcome { re: hello.id, version, app_id });
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if wr.write_all(&proto::encode(&m)).await.is_err() {
                    break;
                }
            }
        });
        // Registered: from here on the app sends answers; a hello is a protocol error.
        let complain = |re: Option<u64>, code: ErrorCode, message: String, fatal: bool| {
            crate::warn_limited!(app_id, name = %name, code = proto::code_name(code), %message, "app sent a bad message");
            let _ = tx.send(AgentMessage::Error { re, code, message, fatal });
        };
        // Since when the line now waiting to be ended was begun (None: none is).
        let mut partial_since: Option<tokio::time::Instant> = None;
        loop {
            // An app that begins a line and never ends it holds its registration (and makes
            // every freeze wait for its answers) while looking alive: cut it off. The reader is
            // cancel-safe, so waking up to look loses nothing.
            let now = tokio::time::Instant::now();
            let wake = partial_since.map_or(now + LINE_TIMEOUT, |t| t + LINE_TIMEOUT);
            let got = tokio::select! {
                got = lines.next_message::<AppMessage>() => got,
                _ = tokio::time::sleep_until(wake) => {
                    match partial_since {
                        Some(t) if lines.has_partial() && t.elapsed() >= LINE_TIMEOUT => {
                            let m = format!("a line was begun and not ended within {} s", LINE_TIMEOUT.as_secs());
                            complain(None, ErrorCode::BadMessage, m, true);
                            break;
                        }
                        _ => partial_since = lines.has_partial().then_some(now),
                    }
                    continue;
                }
            };
            // A message ended: what is left in the buffer is a line begun just now.
            partial_since = lines.has_partial().then(tokio::time::Instant::now);
            match got {
                Ok(None) | Err(FrameError::Io(_)) => break,
                Ok(Some(m)) => match m.into_answer() {
                    Ok(a) => self.answer(app_id, a, &tx),
                    Err(second) => {
                        let m = "already registered: one hello per connection".to_string();
                        complain(Some(second.id), ErrorCode::BadHello, m, true);
                        break;
                    }
                },
                Err(FrameError::TooLarge { max }) if lines.kept_streaming() => {
                    let m = format!("a line went on past {FLOOD_LIMIT} bytes beyond the limit of {max} bytes");
                    complain(None, ErrorCode::TooLarge, m, true);
                    break;
                }
                Err(FrameError::TooLarge { max }) => complain(
                    None,
                    ErrorCode::TooLarge,
                    format!("message over the limit of {max} bytes; ignored"),
                    false,
                ),
                Err(FrameError::Decode(e)) => {
                    complain(None, ErrorCode::BadMessage, format!("{}; ignored", e.detail()), false)
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
        crate::info_limited!(app_id, name = %name, "app disconnected");
    }

    fn answer(&self, app_id: u64, a: AppAnswer, tx: &mpsc::UnboundedSender<AgentMessage>) {
        let (re, answer, reason, phase) = match a {
            AppAnswer::Ready { re } => (re, Answer::Ready, None, Phase::Prepare),
            AppAnswer::Veto { re, reason } => (re, Answer::Vetoed, Some(reason), Phase::Prepare),
            AppAnswer::Held { re } => (re, Answer::Held, None, Phase::Freeze),
            AppAnswer::Failed { re, reason } => (re, Answer::Failed, Some(reason), Phase::Freeze),
            AppAnswer::Thawed { re } => (re, Answer::Ready, None, Phase::Thaw),
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

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a registered app may take to end a line it has begun.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// How far an oversized line may go on past the limit (it is dropped, with one `too-large`)
/// before the app is disconnected as one that streams rather than sends lines.
const FLOOD_LIMIT: usize = 4 * proto::MAX_MESSAGE_BYTES;

type Lines = LineReader<tokio::net::unix::OwnedReadHalf>;

/// Why a connection is not registered: sent as a fatal error, then the connection closes.
struct Refusal {
    re: Option<u64>,
    code: ErrorCode,
    message: String,
}

/// The hello and the version both sides speak; `None` when the connection ends before a
/// hello (nothing to answer).
async fn read_hello(lines: &mut Lines) -> Result<Option<(Hello, u32)>, Refusal> {
    let refusal = |re, code, message| Refusal { re, code, message };
    let hello = match lines.next_message::<AppMessage>().await {
        Ok(None) | Err(FrameError::Io(_)) => return Ok(None),
        Ok(Some(m)) => match m.into_hello() {
            Ok(h) => h,
            Err(_) => return Err(refusal(None, ErrorCode::BadHello, "the first message must be a hello".into())),
        },
        Err(FrameError::TooLarge { max }) => {
            return Err(refusal(None, ErrorCode::TooLarge, format!("hello over the limit of {max} bytes")))
        }
        Err(FrameError::Decode(e)) => {
            return Err(refusal(None, ErrorCode::BadHello, format!("not a hello: {}", e.detail())))
        }
    };
    if let Err(e) = proto::check_name(&hello.name) {
        return Err(refusal(Some(hello.id), ErrorCode::BadHello, e.to_string()));
    }
    match proto::negotiate(hello.min_version, hello.max_version) {
        Some(v) => Ok(Some((hello, v))),
        None => {
            let m = format!(
                "no common protocol version: the app speaks {}..{}, vssd {}..{}",
                hello.min_version,
                hello.max_version,
                proto::MIN_PROTOCOL_VERSION,
                proto::PROTOCOL_VERSION
            );
            Err(refusal(Some(hello.id), ErrorCode::VersionUnsupported, m))
        }
    }
}

async fn refuse(wr: &mut tokio::net::unix::OwnedWriteHalf, uid: u32, pid: Option<i32>, r: Refusal) {
    let Refusal { re, code, message } = r;
    // A local user can connect and misbehave in a loop: limited, so it cannot fill the journal.
    crate::warn_limited!(code = proto::code_name(code), %message, uid, pid, "refusing an app connection");
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
pub fn local_gid(group_file: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(group_file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;

    use super::*;

    fn apps() -> Arc<Apps> {
        Apps::new(AppSettings {
            socket: "/nonexistent/appvss.sock".into(),
            group: "vssd".into(),
            mode: 0o660,
            max_per_uid: 4,
        })
    }

    /// An app on one end of a socket pair whose other end `apps` serves.
    struct Peer {
        rd: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
        wr: tokio::net::unix::OwnedWriteHalf,
    }

    impl Peer {
        fn connect(apps: &Arc<Apps>) -> Peer {
            let (ours, theirs) = UnixStream::pair().unwrap();
            tokio::spawn(apps.clone().serve(theirs));
            let (rd, wr) = ours.into_split();
            Peer { rd: tokio::io::BufReader::new(rd), wr }
        }

        async fn send(&mut self, line: &[u8]) {
            self.wr.write_all(line).await.unwrap();
        }

        async fn recv(&mut self) -> Option<AgentMessage> {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(5), self.rd.read_line(&mut line)).await.unwrap().unwrap();
            (n > 0).then(|| serde_json::from_str(&line).unwrap())
        }

        async fn hello(&mut self, name: &str) -> AgentMessage {
            let h = AppMessage::Hello { id: 1, name: name.into(), min_version: 1, max_version: 1 };
            self.send(&proto::encode(&h)).await;
            self.recv().await.unwrap()
        }
    }

    fn error(m: Option<AgentMessage>) -> (ErrorCode, bool, String) {
        match m {
            Some(AgentMessage::Error { code, fatal, message, .. }) => (code, fatal, message),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_second_hello_is_a_fatal_bad_hello_not_a_panic() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        assert!(matches!(p.hello("db").await, AgentMessage::Welcome { re: 1, version: 1, .. }));
        assert_eq!(apps.count(), 1);
        p.send(b"{\"type\":\"hello\",\"id\":2,\"name\":\"db\",\"min_version\":1,\"max_version\":1}\n").await;
        let (code, fatal, message) = error(p.recv().await);
        assert_eq!((code, fatal), (ErrorCode::BadHello, true), "{message}");
        assert!(p.recv().await.is_none(), "closed after the fatal error");
        // The registration is gone, and vssd serves the next app.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(apps.count(), 0);
        let mut q = Peer::connect(&apps);
        assert!(matches!(q.hello("next").await, AgentMessage::Welcome { .. }));
    }

    #[tokio::test]
    async fn garbage_after_the_hello_gets_errors_and_the_app_stays_registered() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        p.hello("db").await;
        let mut big = vec![b'x'; proto::MAX_MESSAGE_BYTES * 2];
        big.push(b'\n');
        p.send(&big).await;
        assert_eq!(error(p.recv().await).0, ErrorCode::TooLarge);
        p.send(b"\xff\xfe\n").await;
        assert_eq!(error(p.recv().await).0, ErrorCode::BadMessage);
        p.send(b"{\"type\":\"dance\"}\n").await;
        let (code, fatal, message) = error(p.recv().await);
        assert_eq!((code, fatal), (ErrorCode::BadMessage, false));
        assert!(message.contains("dance") && message.ends_with("; ignored"), "{message}");
        p.send(b"{\"type\":\"held\",\"re\":9}\n").await;
        assert_eq!(error(p.recv().await).0, ErrorCode::UnexpectedReply);
        assert_eq!(apps.count(), 1);
    }

    #[tokio::test]
    async fn an_oversized_line_gets_too_large_before_its_newline_and_the_app_stays() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        p.hello("db").await;
        // 1 MiB would be flooding; just over the limit, and no newline (yet).
        p.send(&vec![b'x'; proto::MAX_MESSAGE_BYTES + 10]).await;
        let (code, fatal, _) = error(p.recv().await);
        assert_eq!((code, fatal), (ErrorCode::TooLarge, false));
        p.send(b"\n{\"type\":\"held\",\"re\":9}\n").await;
        assert_eq!(error(p.recv().await).0, ErrorCode::UnexpectedReply, "the next line is read");
        assert_eq!(apps.count(), 1);
    }

    #[tokio::test]
    async fn an_app_that_keeps_streaming_one_line_is_disconnected() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        p.hello("db").await;
        let (ours, theirs) = (p.wr, p.rd);
        // Write in the background: vssd stops reading once it gives up on the app.
        let writer = tokio::spawn(async move {
            let mut wr = ours;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if wr.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut p2 = Peer { rd: theirs, wr: UnixStream::pair().unwrap().0.into_split().1 };
        let limit = proto::MAX_MESSAGE_BYTES;
        let first = (ErrorCode::TooLarge, false, format!("message over the limit of {limit} bytes; ignored"));
        assert_eq!(error(p2.recv().await), first);
        let (code, fatal, message) = error(p2.recv().await);
        assert_eq!((code, fatal), (ErrorCode::TooLarge, true), "{message}");
        // Closed: the end of the stream, or a reset, as vssd closes with the flood unread.
        let mut rest = String::new();
        let end = tokio::time::timeout(Duration::from_secs(5), p2.rd.read_line(&mut rest)).await.unwrap();
        assert!(matches!(end, Ok(0)) || end.is_err(), "closed after the fatal error: {end:?} {rest:?}");
        let _ = writer.await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(apps.count(), 0, "the registration is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_line_left_idle_loses_the_registration() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        p.hello("db").await;
        let start = tokio::time::Instant::now();
        p.send(b"{\"type\":\"hel").await;
        let mut line = String::new();
        // The paused clock runs ahead to vssd's timer; 60 s is a bound, not a wait.
        tokio::time::timeout(Duration::from_secs(60), p.rd.read_line(&mut line)).await.unwrap().unwrap();
        let took = start.elapsed();
        let (code, fatal, message) = error(serde_json::from_str(&line).ok());
        assert_eq!((code, fatal), (ErrorCode::BadMessage, true), "{message}");
        assert!(message.contains("not ended within 10 s"), "{message}");
        assert!(took >= LINE_TIMEOUT && took <= 2 * LINE_TIMEOUT, "{took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(apps.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_app_between_lines_stays_registered() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        p.hello("db").await;
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(apps.count(), 1);
        // And a line that is slow but ends in time is read.
        p.send(b"{\"type\":\"held\",").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        p.send(b"\"re\":9}\n").await;
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), p.rd.read_line(&mut line)).await.unwrap().unwrap();
        assert_eq!(error(serde_json::from_str(&line).ok()).0, ErrorCode::UnexpectedReply);
        assert_eq!(apps.count(), 1);
    }

    #[tokio::test]
    async fn bad_hellos_are_refused_with_the_reason() {
        let apps = apps();
        let mut p = Peer::connect(&apps);
        let (code, _, message) = error(Some(p.hello("a\u{1}b").await));
        assert_eq!(code, ErrorCode::BadHello);
        assert!(message.contains("control character"), "{message}");
        let mut p = Peer::connect(&apps);
        p.send(b"{\"type\":\"ready\",\"re\":1}\n").await;
        assert_eq!(error(p.recv().await), (ErrorCode::BadHello, true, "the first message must be a hello".into()));
        let mut p = Peer::connect(&apps);
        p.send(&vec![b'{'; proto::MAX_MESSAGE_BYTES + 1]).await;
        assert_eq!(error(p.recv().await).0, ErrorCode::TooLarge);
        assert_eq!(apps.count(), 0);
    }

    #[test]
    fn local_gid_reads_the_group_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("group");
        std::fs::write(&f, "root:x:0:\nvssdx:x:7:\nvssd:x:998:alice,bob\n").unwrap();
        assert_eq!(local_gid(&f, "vssd"), Some(998));
        assert_eq!(local_gid(&f, "nobody"), None);
    }
}
