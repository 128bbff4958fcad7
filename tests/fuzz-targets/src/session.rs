//! The stateful targets: a sequence of steps the input picks, through the real QGA session
//! and freeze service over a fake kernel, with scripted apps in-process (`qga_session`) or
//! real appvss connections to the real coordinator (`appvss_coordinator`). After every step:
//!
//! - never frozen without a deadline armed: a filesystem the fake kernel holds frozen means
//!   the agent is `frozen`, with a deadline, and counts it;
//! - `thawed` means the kernel holds nothing frozen (a thaw always ends in Thawed);
//! - every app that got PREPARE for a freeze gets at most one THAW for it, and exactly one
//!   once the agent is thawed again (unless it left).

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appvss_proto::{self as proto, AgentMessage, AppMessage, ThawReason};
use qga_wire::stream::{Event, Splitter};
use qga_wire::{CommandName, Incoming};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use vssd::apps::{Answer, AppReport, AppSettings, Apps, PhaseResult};
use vssd::config::Config;
use vssd::engine::Kernel;
use vssd::qga::Session;
use vssd::service::{Agent, AppCoordinator, BoxFuture};

/// FIFREEZE / FITHAW on a set, as the kernel answers: EBUSY for a second freeze, EINVAL for
/// a thaw of what is not frozen; freezes of the paths in `fail` fail with EIO.
#[derive(Default)]
struct FakeKernel {
    frozen: Mutex<HashSet<PathBuf>>,
    fail: Mutex<HashSet<PathBuf>>,
}

impl Kernel for FakeKernel {
    fn freeze(&self, p: &Path) -> io::Result<()> {
        if self.fail.lock().unwrap().contains(p) {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        if !self.frozen.lock().unwrap().insert(p.to_path_buf()) {
            return Err(io::Error::from_raw_os_error(16)); // EBUSY
        }
        Ok(())
    }
    fn thaw(&self, p: &Path) -> io::Result<()> {
        if self.frozen.lock().unwrap().remove(p) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(22)) // EINVAL
        }
    }
}

fn libc_eio() -> i32 {
    5
}

/// PREPARE / FREEZE / THAW as each app saw them: (kind, freeze id), per app.
type Seen = Arc<Mutex<BTreeMap<u64, Vec<(&'static str, u64)>>>>;

/// Scripted in-process apps (the seam the service's own tests use).
struct ScriptedApps {
    ids: Vec<u64>,
    prepare: Mutex<Answer>,
    freeze: Mutex<Answer>,
    seen: Seen,
    /// Apps that answered `disconnected`: gone, so owed no THAW.
    left: Mutex<HashSet<u64>>,
}

impl ScriptedApps {
    fn reports(&self, ids: &[u64], a: Answer) -> PhaseResult {
        let report = |app_id| AppReport {
            app_id,
            name: format!("app{app_id}"),
            uid: 0,
            pid: None,
            outcome: a,
            reason: None,
            prepare_ms: None,
            freeze_ms: None,
        };
        ids.iter().map(|&id| report(id)).collect()
    }
    fn answer(&self, ids: &[u64], a: Answer) -> PhaseResult {
        if a == Answer::Disconnected {
            self.left.lock().unwrap().extend(ids);
        }
        self.reports(ids, a)
    }
    fn log(&self, ids: &[u64], kind: &'static str, fid: u64) {
        let mut s = self.seen.lock().unwrap();
        for id in ids {
            s.entry(*id).or_default().push((kind, fid));
        }
    }
}

impl AppCoordinator for ScriptedApps {
    fn count(&self) -> usize {
        self.ids.len()
    }
    fn ids(&self) -> Vec<u64> {
        self.ids.clone()
    }
    fn prepare(&self, fid: u64, _: Duration) -> BoxFuture<'_, PhaseResult> {
        self.log(&self.ids, "prepare", fid);
        let a = *self.prepare.lock().unwrap();
        Box::pin(async move { self.answer(&self.ids, a) })
    }
    fn freeze<'a>(&'a self, apps: &'a [u64], fid: u64, _: Duration, _: Duration) -> BoxFuture<'a, PhaseResult> {
        self.log(apps, "freeze", fid);
        let a = *self.freeze.lock().unwrap();
        Box::pin(async move { self.answer(apps, a) })
    }
    fn thaw(&self, apps: &[u64], fid: u64, _: ThawReason) {
        self.log(apps, "thaw", fid);
    }
    fn list(&self) -> Vec<serde_json::Value> {
        vec![]
    }
}

const MOUNTS: &[&str] = &["/s/a", "/s/b", "/s/c"];

struct Rig {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    kernel: Arc<FakeKernel>,
    session: Session,
    /// What the host's side of the session got (kept short: only to debug a failure).
    replies: usize,
}

impl Rig {
    fn new(apps: Option<Arc<dyn AppCoordinator>>) -> Rig {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mi = dir.path().join("mountinfo");
        std::fs::write(
            &mi,
            "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n\
             12 1 7:2 / /s/c rw - ext4 /dev/loop2 rw\n13 1 7:3 / /s/vfat rw - vfat /dev/loop3 rw\n",
        )
        .expect("write mountinfo");
        let cfg = Config {
            scope: "/s".into(),
            mountinfo: mi,
            sysfs: dir.path().join("sys"),
            state_dir: dir.path().join("state"),
            hooks_dirs: vec![],
            freeze_deadline: 30.0,
            channel_drop_grace: 5.0,
            app_prepare_deadline: 0.5,
            app_freeze_deadline: 0.5,
            ..Config::default()
        };
        let kernel = Arc::new(FakeKernel::default());
        let agent = Agent::with_coordinator(cfg, kernel.clone(), apps);
        let session = Session::new(agent.clone(), agent.new_channel_id());
        Rig { _dir: dir, agent, kernel, session, replies: 0 }
    }

    async fn send(&mut self, msg: &[u8]) {
        self.replies += self.session.feed(msg).await.len();
    }

    async fn request(&mut self, v: serde_json::Value) {
        self.send(&serde_json::to_vec(&v).expect("serialises")).await;
    }

    /// Never frozen without a deadline; thawed means nothing frozen.
    fn check(&self, step: &str) {
        let frozen = self.kernel.frozen.lock().unwrap().clone();
        let view = self.agent.state_view();
        match view.state {
            "frozen" => {
                assert!(view.deadline.is_some(), "after {step}: frozen without a deadline");
                assert_eq!(
                    view.filesystems,
                    frozen.len(),
                    "after {step}: the agent counts other filesystems than the kernel holds: {frozen:?}"
                );
            }
            "thawed" => assert!(frozen.is_empty(), "after {step}: thawed, but the kernel holds {frozen:?} frozen"),
            other => panic!("after {step}: left in {other}"),
        }
        if !frozen.is_empty() {
            assert_eq!(view.state, "frozen", "after {step}: {frozen:?} frozen while the agent is {}", view.state);
        }
    }
}

/// PREPAREs and THAWs by freeze: at most one THAW each, only for a PREPARE; exactly one once
/// thawed, for apps that did not leave.
fn check_thaws(seen: &Seen, left: &HashSet<u64>, thawed: bool, step: &str) {
    for (app, log) in seen.lock().unwrap().iter() {
        let mut prepared: BTreeMap<u64, usize> = BTreeMap::new();
        let mut thaws: BTreeMap<u64, usize> = BTreeMap::new();
        for (kind, fid) in log {
            match *kind {
                "prepare" => *prepared.entry(*fid).or_default() += 1,
                "thaw" => *thaws.entry(*fid).or_default() += 1,
                _ => {}
            }
        }
        for (fid, n) in &thaws {
            assert!(*n <= 1, "after {step}: app {app} got {n} THAWs for freeze {fid}: {log:?}");
            assert!(
                prepared.contains_key(fid),
                "after {step}: app {app} got THAW for freeze {fid} it was never prepared for"
            );
        }
        if thawed && !left.contains(app) {
            for fid in prepared.keys() {
                assert_eq!(thaws.get(fid), Some(&1), "after {step}: app {app} got PREPARE {fid} and no THAW: {log:?}");
            }
        }
    }
}

/// Commands the fuzzed raw bytes may run: nothing that acts on the host.
fn allowed(msg: &[u8]) -> bool {
    let Incoming { request, .. } = Incoming::parse(msg);
    match request {
        Ok(r) => match r.name() {
            None => true, // unknown: "has not been found" (no backend)
            Some(n) => matches!(
                n,
                CommandName::SyncDelimited
                    | CommandName::Sync
                    | CommandName::Ping
                    | CommandName::Info
                    | CommandName::FsfreezeStatus
                    | CommandName::FsfreezeFreeze
                    | CommandName::FsfreezeFreezeList
                    | CommandName::FsfreezeThaw
                    | CommandName::VssdThaw
                    | CommandName::VssdStatus
                    | CommandName::VssdPlan
                    | CommandName::VssdFreeze
                    | CommandName::VssdFreezePrepare
            ),
        },
        Err(_) => true,
    }
}

/// One step the input picks; returns the name of the step, for messages.
async fn step(rig: &mut Rig, splitter: &mut Splitter, op: u8, data: &mut &[u8]) -> &'static str {
    use serde_json::json;
    match op % 12 {
        0 => rig.request(json!({"execute": "guest-fsfreeze-freeze"})).await,
        1 => {
            let pick = data.split_first().map_or(0, |(b, rest)| {
                *data = rest;
                *b
            });
            let list: Vec<&str> =
                MOUNTS.iter().enumerate().filter(|(i, _)| pick & (1 << i) != 0).map(|(_, m)| *m).collect();
            let mut list: Vec<String> = list.into_iter().map(String::from).collect();
            if pick & 8 != 0 {
                list.push("/s/vfat".into());
            }
            if pick & 16 != 0 {
                list.push("/nowhere".into());
            }
            rig.request(json!({"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": list}})).await
        }
        2 => rig.request(json!({"execute": "guest-fsfreeze-thaw"})).await,
        3 => {
            // A freeze announced ahead, and the vssd-freeze it announces (or not).
            let prepare = (op / 12).is_multiple_of(2);
            let cmd = if prepare { "vssd-freeze-prepare" } else { "vssd-freeze" };
            rig.request(json!({"execute": cmd, "arguments": {"deadline": 5, "bind-to-channel": true}})).await;
            return cmd;
        }
        4 => rig.request(json!({"execute": "guest-fsfreeze-status", "id": 4})).await,
        5 => rig.send(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":5}}").await,
        6 => {
            // A filesystem starts (or stops) failing FIFREEZE.
            let m = PathBuf::from(MOUNTS[usize::from(op / 12) % MOUNTS.len()]);
            let mut f = rig.kernel.fail.lock().unwrap();
            if !f.remove(&m) {
                f.insert(m);
            }
            return "a FIFREEZE fault";
        }
        7 => rig.request(json!({"execute": "vssd-thaw"})).await,
        8 => rig.request(json!({"execute": "vssd-status"})).await,
        9 => {
            // Raw bytes, split as the session would, with only the allowed commands passed.
            let n = data.first().map_or(0, |&b| usize::from(b)).min(data.len().saturating_sub(1));
            let raw = &data[1.min(data.len())..1.min(data.len()) + n];
            *data = &data[(1 + n).min(data.len())..];
            for ev in splitter.feed(raw) {
                if let Event::Message(mut m) = ev {
                    if allowed(&m) {
                        // Ended, as it was in the raw stream: a top-level scalar ends only at
                        // what follows it, which is not forwarded.
                        m.push(b'\n');
                        rig.send(&m).await;
                    }
                }
            }
            return "raw bytes";
        }
        10 => {
            // Time passes (the paused clock jumps): the deadline may thaw by itself.
            tokio::time::sleep(Duration::from_secs(u64::from(op / 12) * 3)).await;
            return "time passing";
        }
        _ => return "apps",
    }
    ["freeze", "freeze-list", "thaw", "(prepare)", "status", "sync", "", "vssd-thaw", "vssd-status"]
        [usize::from(op % 12)]
}

/// Steps through the QGA session, with scripted apps whose answers the input also picks.
pub fn qga_session(data: &[u8]) {
    if data.len() > 4096 {
        return;
    }
    let rt = crate::runtime(true);
    rt.block_on(async {
        let seen: Seen = Arc::default();
        let apps = Arc::new(ScriptedApps {
            ids: vec![1, 2],
            prepare: Mutex::new(Answer::Ready),
            freeze: Mutex::new(Answer::Held),
            seen: seen.clone(),
            left: Mutex::default(),
        });
        let mut rig = Rig::new(Some(apps.clone()));
        let mut splitter = Splitter::new(4096);
        let mut rest = data;
        while let Some((&op, tail)) = rest.split_first() {
            rest = tail;
            let mut name = step(&mut rig, &mut splitter, op, &mut rest).await;
            if op % 12 == 11 {
                const PREPARE: [Answer; 4] = [Answer::Ready, Answer::Vetoed, Answer::Timeout, Answer::Disconnected];
                const FREEZE: [Answer; 4] = [Answer::Held, Answer::Failed, Answer::Timeout, Answer::Disconnected];
                *apps.prepare.lock().unwrap() = PREPARE[usize::from(op / 12) % 4];
                *apps.freeze.lock().unwrap() = FREEZE[usize::from(op / 48) % 4];
                name = "apps answer otherwise";
            }
            rig.check(name);
            let left = apps.left.lock().unwrap().clone();
            // A preparation waiting for its freeze owes its apps a THAW only once it ends.
            let settled = rig.agent.state_view().state == "thawed" && !rig.agent.is_prepared();
            check_thaws(&seen, &left, settled, name);
        }
        rig.request(serde_json::json!({"execute": "guest-fsfreeze-thaw"})).await;
        rig.check("the last thaw");
        assert!(!rig.agent.is_prepared(), "a thaw cancels a preparation");
        let left = apps.left.lock().unwrap().clone();
        check_thaws(&seen, &left, true, "the last thaw");
        let _ = rig.replies;
    });
}

/// How a fake app answers a question: the input's byte for it.
#[derive(Clone, Copy)]
enum Manner {
    Right,
    No,
    Silent,
    Garbage,
    Twice,
    WrongId,
    Leave,
}

fn manner(b: u8) -> Manner {
    [
        Manner::Right,
        Manner::No,
        Manner::Silent,
        Manner::Garbage,
        Manner::Twice,
        Manner::WrongId,
        Manner::Leave,
        Manner::Right,
    ][usize::from(b) % 8]
}

/// A fake app on one end of a socket pair: says hello, then answers each PREPARE and FREEZE
/// in the manner its script says (one byte per question, cycling), logging what it got.
async fn fake_app(s: tokio::net::UnixStream, script: Vec<u8>, seen: Seen, left: Arc<Mutex<HashSet<u64>>>, me: u64) {
    let (rd, mut wr) = s.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let hello = AppMessage::Hello { id: 1, name: format!("app{me}"), min_version: 1, max_version: 1 };
    if wr.write_all(&proto::encode(&hello)).await.is_err() {
        return;
    }
    let mut app_id = None;
    let mut n = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(m) = serde_json::from_str::<AgentMessage>(&line) else { continue };
        let (kind, id, fid) = match m {
            AgentMessage::Welcome { app_id: a, .. } => {
                app_id = Some(a);
                continue;
            }
            AgentMessage::Prepare { id, freeze_id, .. } => ("prepare", id, freeze_id),
            AgentMessage::Freeze { id, freeze_id, .. } => ("freeze", id, freeze_id),
            AgentMessage::Thaw { id, freeze_id, .. } => ("thaw", id, freeze_id),
            AgentMessage::Error { fatal: true, .. } => break,
            AgentMessage::Error { .. } => continue,
        };
        let Some(a) = app_id else { panic!("{kind} before the welcome") };
        seen.lock().unwrap().entry(a).or_default().push((kind, fid));
        let right = match kind {
            "prepare" => AppMessage::Ready { re: id },
            "freeze" => AppMessage::Held { re: id },
            _ => AppMessage::Thawed { re: id },
        };
        let no = match kind {
            "prepare" => AppMessage::Veto { re: id, reason: "no".into() },
            "freeze" => AppMessage::Failed { re: id, reason: "no".into() },
            _ => AppMessage::Thawed { re: id },
        };
        let how = if kind == "thaw" {
            Manner::Right
        } else {
            manner(script.get(n % script.len().max(1)).copied().unwrap_or(0))
        };
        n += 1;
        let out: Vec<u8> = match how {
            Manner::Right => proto::encode(&right),
            Manner::No => proto::encode(&no),
            Manner::Silent => vec![],
            Manner::Garbage => [b"{\"type\":\"dance\"}\n\xff\n".to_vec(), proto::encode(&right)].concat(),
            Manner::Twice => [proto::encode(&right), proto::encode(&right)].concat(),
            Manner::WrongId => proto::encode(&AppMessage::Held { re: id + 1000 }),
            Manner::Leave => {
                left.lock().unwrap().insert(a);
                return;
            }
        };
        if wr.write_all(&out).await.is_err() {
            break;
        }
    }
    if let Some(a) = app_id {
        left.lock().unwrap().insert(a);
    }
}

/// Steps through the QGA session with the real appvss coordinator and up to three fake apps
/// on real connections; the first bytes are the apps' scripts.
pub fn appvss_coordinator(data: &[u8]) {
    if data.len() > 2048 || data.is_empty() {
        return;
    }
    let rt = crate::runtime(true);
    rt.block_on(async {
        let apps = Apps::new(AppSettings {
            socket: "/nonexistent/appvss.sock".into(),
            group: "vssd".into(),
            mode: 0o660,
            max_per_uid: 8,
        });
        let seen: Seen = Arc::default();
        let left: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let count = 1 + usize::from(data[0] % 3);
        let mut rest = &data[1..];
        let mut tasks = Vec::new();
        for me in 0..count {
            let len = rest.first().map_or(0, |&b| usize::from(b % 4)).min(rest.len().saturating_sub(1));
            let script = rest.get(1..1 + len).map(<[u8]>::to_vec).unwrap_or_default();
            rest = &rest[(1 + len).min(rest.len())..];
            let (ours, theirs) = tokio::net::UnixStream::pair().expect("a socket pair");
            apps.serve_connection(theirs);
            tasks.push(tokio::spawn(fake_app(ours, script, seen.clone(), left.clone(), me as u64)));
        }
        // Let every hello through before the first step.
        while apps.count() < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut rig = Rig::new(Some(apps.clone() as Arc<dyn AppCoordinator>));
        let mut splitter = Splitter::new(4096);
        while let Some((&op, tail)) = rest.split_first() {
            rest = tail;
            let name = step(&mut rig, &mut splitter, op, &mut rest).await;
            // THAWs are queued, never awaited: let the apps read them before counting.
            tokio::time::sleep(Duration::from_millis(5)).await;
            rig.check(name);
            let left = left.lock().unwrap().clone();
            // A preparation waiting for its freeze owes its apps a THAW only once it ends.
            let settled = rig.agent.state_view().state == "thawed" && !rig.agent.is_prepared();
            check_thaws(&seen, &left, settled, name);
        }
        rig.request(serde_json::json!({"execute": "guest-fsfreeze-thaw"})).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        rig.check("the last thaw");
        assert!(!rig.agent.is_prepared(), "a thaw cancels a preparation");
        let left_now = left.lock().unwrap().clone();
        check_thaws(&seen, &left_now, true, "the last thaw");
        for t in tasks {
            t.abort();
        }
    });
}
