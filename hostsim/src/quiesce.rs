//! Quiescing the guest through its agent: the one freeze and thaw path of backups and
//! checkpoints.
//!
//! The flow: [`connect`] (connect, resync, `guest-info`; a backup runs it on a thread of its
//! own while it prepares) → [`freeze`] (`vssd-freeze` with a deadline, or qemu-ga's
//! `guest-fsfreeze-freeze`) → the caller's work → [`Frozen::thaw`]. What the policy
//! ([`Quiesce`]) makes of a failure is [`not_quiesced`]'s decision.
//!
//! Invariants:
//! - Every path that froze the guest thaws it: [`Frozen`] thaws on drop unless it was thawed
//!   explicitly, or deliberately left frozen ([`Frozen::leave_frozen`]: a checkpoint that
//!   powers the VM off saves the guest frozen, and its restore thaws it). vssd also gets a
//!   deadline, so that even a vmctl killed mid-freeze cannot keep the guest frozen.
//! - A failed freeze is followed by a thaw at once: the agent may have frozen part.
//! - The agent is behind the [`Agent`] trait, so the guard is tested with a fake.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::qga::{AgentInfo, Qga, QgaError};

/// How hard to try for a quiesced guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Quiesce {
    /// Fail, and keep nothing, unless the agent froze the guest.
    Required,
    /// Freeze when an agent answers; otherwise crash-consistent, marked so.
    #[default]
    BestEffort,
    /// Do not ask the agent: crash-consistent.
    Off,
}

impl Quiesce {
    /// The name on the command line and in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Quiesce::Required => "required",
            Quiesce::BestEffort => "best-effort",
            Quiesce::Off => "off",
        }
    }
}

/// Why the guest was not quiesced.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// The VM has no agent channel (or attach mode without `--agent`).
    #[error("the VM has no guest agent channel")]
    NoChannel,
    /// A paused guest's agent cannot answer.
    #[error("the VM is paused: its agent cannot answer")]
    Paused,
    /// The agent could not be reached or identified.
    #[error(transparent)]
    Agent(#[from] QgaError),
    /// The agent refused or did not finish the freeze.
    #[error("the freeze failed")]
    FreezeFailed(#[source] QgaError),
    /// The thread that connected to the agent died.
    #[error("the agent thread panicked")]
    Panicked,
    /// A restored guest that was saved frozen did not answer the thaw.
    #[error("the restored guest was saved frozen and could not be thawed (vssd thaws by itself at its deadline; `vmctl fsthaw` retries)")]
    NotThawed(#[source] QgaError),
}

/// What the freeze path needs of a guest agent (a [`Qga`]; a fake in tests).
pub trait Agent {
    /// Resynchronises, then runs `command` ([`Qga::execute`]).
    fn execute(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError>;
    /// Runs `command` on a connection known to be in sync ([`Qga::command`]).
    fn command(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError>;
}

impl Agent for Qga {
    fn execute(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        Qga::execute(self, command, args, limit)
    }
    fn command(&mut self, command: &str, args: Option<Value>, limit: Duration) -> Result<Value, QgaError> {
        Qga::command(self, command, args, limit)
    }
}

/// Connects to the agent at `path`, resynchronises and asks `guest-info` (`timeout` each).
pub fn connect(path: &std::path::Path, timeout: Duration) -> Result<(Qga, AgentInfo), QuiesceError> {
    let mut g = Qga::connect(path)?;
    g.sync_timeout = timeout;
    let info = g.info(timeout)?;
    Ok((g, info))
}

/// How long vssd keeps a preparation for the freeze that follows (it is cancelled then).
pub const PREPARE_KEEP: Duration = Duration::from_secs(60);

/// Announces the freeze to a vssd that knows `vssd-freeze-prepare`: it plans and sends the
/// apps PREPARE now, while the host prepares its targets, so the freeze window holds only
/// FREEZE + FIFREEZE. Any failure is only logged: the `vssd-freeze` that follows does the
/// whole freeze then, as without a prepare (qemu-ga: nothing is sent).
pub fn prepare(mut g: Qga, info: AgentInfo, timeout: Duration) -> (Qga, AgentInfo) {
    if info.is_vssd && info.commands.iter().any(|c| c == "vssd-freeze-prepare") {
        let t = Instant::now();
        let args = json!({"deadline": PREPARE_KEEP.as_secs_f64()});
        match g.command("vssd-freeze-prepare", Some(args), timeout.max(Duration::from_secs(10))) {
            Ok(r) => tracing::info!(
                "freeze prepared in {:.1} ms ({} app(s) ready)",
                crate::util::ms(t.elapsed()),
                r["ready"].as_u64().unwrap_or(0)
            ),
            Err(e) => {
                tracing::info!("vssd-freeze-prepare failed ({e}); the freeze will do it all");
                // A late answer must not be read as the freeze's: resynchronise.
                if let Err(e) = g.execute("guest-ping", None, timeout) {
                    tracing::info!("resync after the failed prepare: {e}");
                }
            }
        }
    }
    (g, info)
}

/// What the policy makes of a failure to quiesce: the note for a crash-consistent result, or
/// (`required`) the error.
pub fn not_quiesced(policy: Quiesce, why: QuiesceError) -> Result<String, QuiesceError> {
    match policy {
        Quiesce::Required => Err(why),
        _ => Ok(format!("not quiesced: {}", crate::util::error_chain(&why))),
    }
}

/// Freezes the guest's filesystems: `vssd-freeze` with `deadline` (vssd thaws by itself then)
/// or qemu-ga's `guest-fsfreeze-freeze`, waiting `limit` for the reply. The connection must
/// be in sync (just identified by [`connect`]): no round trip goes before the freeze. On
/// failure the agent is told to thaw at once, and the error returned.
pub fn freeze<A: Agent>(
    mut agent: A,
    info: &AgentInfo,
    deadline: Duration,
    limit: Duration,
) -> Result<Frozen<A>, QuiesceError> {
    let t = Instant::now();
    let r = if info.is_vssd {
        agent.command("vssd-freeze", Some(json!({"deadline": deadline.as_secs_f64()})), limit)
    } else {
        agent.command("guest-fsfreeze-freeze", None, limit)
    };
    let ms = crate::util::ms(t.elapsed());
    match r {
        Ok(r) => {
            let (frozen, report) = if info.is_vssd { (r["frozen"].as_u64(), Some(r)) } else { (r.as_u64(), None) };
            tracing::info!("frozen: {} filesystem(s) in {ms:.1} ms", frozen.unwrap_or(0));
            Ok(Frozen { agent: Some(agent), frozen, report, ms })
        }
        Err(e) => {
            tracing::info!("freeze failed after {ms:.1} ms: {e}");
            // Whatever the agent did, make sure nothing stays frozen.
            let _ = agent.execute("guest-fsfreeze-thaw", None, Duration::from_secs(10));
            Err(QuiesceError::FreezeFailed(e))
        }
    }
}

/// A frozen guest. Thaws on drop unless thawed or left frozen on purpose.
pub struct Frozen<A: Agent> {
    agent: Option<A>,
    frozen: Option<u64>,
    report: Option<Value>,
    ms: f64,
}

impl<A: Agent> Frozen<A> {
    /// Filesystems the agent froze.
    pub fn frozen(&self) -> Option<u64> {
        self.frozen
    }

    /// vssd's `vssd-freeze` report, as it came (None from qemu-ga).
    pub fn report(&self) -> Option<&Value> {
        self.report.as_ref()
    }

    /// The freeze's round trip, milliseconds.
    pub fn freeze_ms(&self) -> f64 {
        self.ms
    }

    /// Thaws; returns the agent's answer (filesystems thawed). The freeze reply just came on
    /// this connection, so the thaw goes without a resync (it would only lengthen the
    /// window); only when that fails, once more after a resync.
    pub fn thaw(mut self) -> Result<Value, QgaError> {
        let mut agent = self.agent.take().expect("a Frozen has its agent until thawed");
        match agent.command("guest-fsfreeze-thaw", None, Duration::from_secs(10)) {
            Ok(v) => Ok(v),
            Err(QgaError::Command { .. }) | Err(QgaError::Silent { .. }) => {
                agent.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30))
            }
            Err(e) => Err(e),
        }
    }

    /// Leaves the guest frozen: its saved state keeps it so, and whoever brings that state
    /// back thaws it (a powered-off checkpoint, a suspend).
    pub fn leave_frozen(mut self) {
        self.agent = None;
    }
}

impl<A: Agent> Drop for Frozen<A> {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.as_mut() {
            // A failure path: thaw before anything else happens.
            tracing::info!("thawing the guest on the way out of a failed operation");
            if let Err(e) = agent.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)) {
                tracing::warn!("the thaw after a failure failed: {e} (vssd thaws by itself at its deadline)");
            }
        }
    }
}

/// Thaws a restored guest that was saved frozen: its agent comes back with the guest, so
/// this connects and tries again until `limit`. Returns the filesystems thawed.
pub fn thaw_restored(agent: &std::path::Path, limit: Duration) -> Result<Option<u64>, QuiesceError> {
    let deadline = Instant::now() + limit;
    let mut last = QgaError::Closed;
    while Instant::now() < deadline {
        match Qga::connect(agent) {
            Ok(mut g) => {
                g.sync_timeout = Duration::from_secs(2);
                match g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(10)) {
                    Ok(v) => return Ok(v.as_u64()),
                    Err(e) => last = e,
                }
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(QuiesceError::NotThawed(last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A scripted agent: answers each command from `replies` (default: success), logs
    /// `(command, resynced)`.
    #[derive(Default, Clone)]
    struct Fake {
        log: Rc<RefCell<Vec<(String, bool)>>>,
        fail: Rc<RefCell<Vec<(&'static str, bool)>>>,
    }

    impl Fake {
        fn answer(&mut self, command: &str, resync: bool) -> Result<Value, QgaError> {
            self.log.borrow_mut().push((command.to_string(), resync));
            let mut fail = self.fail.borrow_mut();
            if let Some(i) = fail.iter().position(|(c, r)| *c == command && *r == resync) {
                fail.remove(i);
                return Err(QgaError::Silent { command: command.into(), after: Duration::from_secs(1) });
            }
            Ok(match command {
                "vssd-freeze" => json!({"frozen": 2, "apps": []}),
                "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => json!(2),
                _ => json!({}),
            })
        }
        fn calls(&self) -> Vec<(String, bool)> {
            self.log.borrow().clone()
        }
        fn thaws(&self) -> usize {
            self.calls().iter().filter(|(c, _)| c == "guest-fsfreeze-thaw").count()
        }
    }

    impl Agent for Fake {
        fn execute(&mut self, command: &str, _: Option<Value>, _: Duration) -> Result<Value, QgaError> {
            self.answer(command, true)
        }
        fn command(&mut self, command: &str, _: Option<Value>, _: Duration) -> Result<Value, QgaError> {
            self.answer(command, false)
        }
    }

    fn vssd() -> AgentInfo {
        AgentInfo { version: "0.1.0".into(), is_vssd: true, commands: vec!["vssd-freeze".into()] }
    }

    fn qemu_ga() -> AgentInfo {
        AgentInfo { version: "7.2".into(), is_vssd: false, commands: vec![] }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_guard_dropped_on_an_error_path_thaws_the_guest() {
        let fake = Fake::default();
        let step_after_migration = |f: Frozen<Fake>| -> Result<(), &'static str> {
            let _f = f;
            Err("cont failed")
        };
        let f = freeze(fake.clone(), &vssd(), S, S).unwrap();
        assert_eq!(f.frozen(), Some(2));
        assert_eq!(fake.thaws(), 0);
        assert!(step_after_migration(f).is_err());
        assert_eq!(fake.thaws(), 1, "the guard thawed at once: {:?}", fake.calls());
    }

    #[test]
    fn an_explicit_thaw_returns_the_agents_report_and_the_guard_does_not_thaw_again() {
        let fake = Fake::default();
        let f = freeze(fake.clone(), &qemu_ga(), S, S).unwrap();
        assert_eq!(f.report(), None);
        assert_eq!(f.thaw().unwrap(), json!(2));
        assert_eq!(fake.calls(), [("guest-fsfreeze-freeze".into(), false), ("guest-fsfreeze-thaw".into(), false)]);
    }

    #[test]
    fn a_thaw_that_goes_unanswered_is_retried_after_a_resync() {
        let fake = Fake::default();
        fake.fail.borrow_mut().push(("guest-fsfreeze-thaw", false));
        let f = freeze(fake.clone(), &vssd(), S, S).unwrap();
        assert_eq!(f.thaw().unwrap(), json!(2));
        assert_eq!(fake.calls()[1..], [("guest-fsfreeze-thaw".into(), false), ("guest-fsfreeze-thaw".into(), true)]);
    }

    #[test]
    fn a_failed_freeze_is_followed_by_a_thaw_and_named() {
        let fake = Fake::default();
        fake.fail.borrow_mut().push(("vssd-freeze", false));
        let e = freeze(fake.clone(), &vssd(), S, S).err().unwrap();
        assert!(matches!(e, QuiesceError::FreezeFailed(QgaError::Silent { .. })), "{e}");
        assert_eq!(fake.thaws(), 1);
        assert!(crate::util::error_chain(&e).starts_with("the freeze failed: the guest agent did not answer"));
    }

    #[test]
    fn a_guest_left_frozen_on_purpose_is_not_thawed() {
        let fake = Fake::default();
        freeze(fake.clone(), &vssd(), S, S).unwrap().leave_frozen();
        assert_eq!(fake.thaws(), 0);
    }

    #[test]
    fn the_policy_turns_a_failure_into_a_note_or_an_error() {
        let note = not_quiesced(Quiesce::BestEffort, QuiesceError::NoChannel).unwrap();
        assert_eq!(note, "not quiesced: the VM has no guest agent channel");
        assert!(matches!(not_quiesced(Quiesce::Required, QuiesceError::Paused), Err(QuiesceError::Paused)));
        assert_eq!(Quiesce::BestEffort.as_str(), "best-effort");
    }
}
