//! The agent's heart: one freeze at a time, shared by every channel, that always ends.
//!
//! Freeze and thaw are serialised by an operation lock (a thaw that arrives while a freeze is
//! still syncing waits for it, then thaws). The lifecycle and what is reported about it sit
//! behind a plain mutex that is never held across blocking work, so status queries answer at
//! once. Every freeze arms a deadline; the channel that froze going away arms a grace timer;
//! either thaws by itself and leaves a notice for the host's next thaw.
//!
//! By job: [`freeze`] (the one pipeline: plan → apps → hooks → marker → FIFREEZE),
//! [`thaw`] (on request, by itself, at start after a crash, at shutdown), [`timers`] (the
//! deadline and the channel-drop grace), [`report`] (what is told about it all), and
//! [`coordinator`] (what a freeze needs from the apps, so tests can script them).
//!
//! Invariants:
//! - Nothing here writes to a filesystem that may be frozen: the marker lives in the state
//!   directory, which the planner never freezes.
//! - The marker exists whenever something may be frozen: written before the first FIFREEZE,
//!   removed only once everything this freeze froze has been thawed again, on every path
//!   (thaw, auto-thaw, a failed or panicking freeze).
//! - A timer acts only on the freeze that armed it (the generation check).
//! - Nothing that watches the agent can slow a freeze. Every change of the lifecycle or of the
//!   last auto-thaw is published as the lock that made it is released ([`Agent::watch_state`],
//!   a watch channel, for systemd's STATUS: a slow reader only misses intermediate states);
//!   the lifecycle's events, with their reports, go to bounded queues that drop and count what
//!   does not fit ([`Agent::subscribe`], for D-Bus signals).

mod channels;
mod coordinator;
mod events;
mod freeze;
mod prepare;
mod report;
mod thaw;
mod timers;

#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::apps::Apps;
use crate::config::{AppFailurePolicy, Config};
use crate::engine::{self, AutoThawReason, Kernel, Lifecycle};
use crate::marker::Marker;
use crate::plan::{self, CannotFreezePolicy};

pub use channels::PrepareRound;
pub use coordinator::{AppCoordinator, BoxFuture};
pub use events::{Event, Subscription};
pub use prepare::PrepareReport;
pub use report::{mount_report, AutoThaw, FreezeReport, MountReport, StepTimes, ThawError, ThawResult};

/// A freeze request, whichever command it came from.
#[derive(Debug, Clone, Default)]
pub struct FreezeRequest {
    /// Exactly these mount points (`guest-fsfreeze-freeze-list`); None: all eligible.
    pub mountpoints: Option<Vec<PathBuf>>,
    /// Overrides the configured deadline.
    pub deadline: Option<Duration>,
    /// Overrides the configured cannot-freeze policy.
    pub cannot_freeze: Option<CannotFreezePolicy>,
    /// The channel whose disappearance thaws; None: only the deadline thaws.
    pub owner: Option<u64>,
    /// Overrides the configured app-failure policy.
    pub app_failure: Option<AppFailurePolicy>,
}

/// Errors of the agent's operations, mapped to QGA error classes by the protocol layer.
/// A message never repeats its source: print the chain (`{:#}` of an `anyhow::Error`).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transition(#[from] engine::TransitionError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("cannot read the mount table")]
    MountTable(#[from] kmod_shim::mountinfo::Error),
    #[error("freeze vetoed: {0} (cannot-freeze policy is `veto`; use `skip` to freeze the rest and report these)")]
    Vetoed(String),
    #[error(transparent)]
    Freeze(#[from] engine::FreezeError),
    #[error("cannot record the freeze marker in {dir}, so nothing was frozen")]
    Marker {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "vssd had already thawed by itself: {0}. A snapshot taken after that moment is only \
         crash-consistent; take it again, or raise freeze-deadline"
    )]
    AlreadyAutoThawed(String),
    #[error("app {0} (app-failure policy is `fail`; `continue` freezes anyway and reports the app)")]
    AppFailed(String),
    #[error("hook {0} (app-failure policy is `fail`; `continue` freezes anyway and reports the hook)")]
    HookFailed(String),
    #[error("thaw finished with errors: {0}")]
    ThawErrors(String),
    /// A step's thread died (a bug): whatever it may have frozen was thawed.
    #[error("internal error: the {step} step failed")]
    Step {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl AgentError {
    fn step(step: &'static str) -> impl FnOnce(tokio::task::JoinError) -> AgentError {
        move |source| AgentError::Step { step, source }
    }
}

/// The agent's state as its observers see it (systemd's STATUS, D-Bus): published on every
/// change, read with [`Agent::subscribe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateView {
    /// `thawed`, `freezing`, `frozen` or `thawing`.
    pub state: &'static str,
    /// Filesystems frozen (0 unless `frozen`).
    pub filesystems: usize,
    /// When vssd thaws by itself (only while `frozen`).
    pub deadline: Option<tokio::time::Instant>,
    /// Why vssd last thawed by itself, if it ever did.
    pub last_auto_thaw: Option<AutoThawReason>,
}

impl StateView {
    fn of(inner: &Inner) -> StateView {
        let frozen = inner.life.frozen();
        StateView {
            state: inner.life.name(),
            filesystems: frozen.map_or(0, |s| s.filesystems.len()),
            deadline: frozen.map(|s| s.deadline),
            last_auto_thaw: inner.last_auto_thaw.as_ref().map(|a| a.reason),
        }
    }
}

/// The state lock held; on release, publishes the state if it changed (never blocks: a
/// watch channel's send only swaps the value).
struct StateGuard<'a> {
    inner: std::sync::MutexGuard<'a, Inner>,
    tx: &'a tokio::sync::watch::Sender<StateView>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let now = StateView::of(&self.inner);
        self.tx.send_if_modified(|v| {
            let changed = *v != now;
            if changed {
                *v = now;
            }
            changed
        });
    }
}

struct Inner {
    life: Lifecycle,
    last_auto_thaw: Option<AutoThaw>,
    /// Told to the host on its next guest-fsfreeze-thaw, once.
    notice: Option<String>,
    disconnected: HashSet<u64>,
}

/// The agent shared by all channels.
pub struct Agent {
    cfg: Config,
    kernel: Arc<dyn Kernel>,
    op: tokio::sync::Mutex<()>,
    inner: Mutex<Inner>,
    generation: AtomicU64,
    next_channel: AtomicU64,
    marker: Marker,
    apps: Option<Arc<dyn AppCoordinator>>,
    state_tx: tokio::sync::watch::Sender<StateView>,
    observers: events::Observers,
    /// A freeze planned and PREPAREd ahead (`vssd-freeze-prepare`), waiting for its freeze.
    prepared: Mutex<Option<prepare::Prepared>>,
}

/// What a freeze in progress has engaged and must release if it does not complete.
#[derive(Debug, Default)]
struct Engaged {
    apps: Vec<u64>,
    hooks: Vec<PathBuf>,
}

impl Agent {
    pub fn new(cfg: Config, kernel: Arc<dyn Kernel>) -> Arc<Agent> {
        Self::with_coordinator(cfg, kernel, None)
    }

    /// An agent whose freezes include the apps registered with `apps`.
    pub fn with_apps(cfg: Config, kernel: Arc<dyn Kernel>, apps: Option<Arc<Apps>>) -> Arc<Agent> {
        Self::with_coordinator(cfg, kernel, apps.map(|a| a as Arc<dyn AppCoordinator>))
    }

    /// An agent whose freezes include the apps of any coordinator (tests script one).
    pub fn with_coordinator(cfg: Config, kernel: Arc<dyn Kernel>, apps: Option<Arc<dyn AppCoordinator>>) -> Arc<Agent> {
        let marker = Marker::new(cfg.state_dir.join("frozen.json"));
        let inner = Inner { life: Lifecycle::Thawed, last_auto_thaw: None, notice: None, disconnected: HashSet::new() };
        let (state_tx, _) = tokio::sync::watch::channel(StateView::of(&inner));
        Arc::new(Agent {
            cfg,
            kernel,
            op: tokio::sync::Mutex::new(()),
            inner: Mutex::new(inner),
            generation: AtomicU64::new(0),
            next_channel: AtomicU64::new(1),
            marker,
            apps,
            state_tx,
            observers: events::Observers::default(),
            prepared: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> StateGuard<'_> {
        // A panic while holding this lock cannot leave it half-updated (single assignments),
        // so a poisoned lock is still safe to use; thawing must never be refused.
        StateGuard { inner: self.inner.lock().unwrap_or_else(|p| p.into_inner()), tx: &self.state_tx }
    }

    /// The state now, and every change from here on (a watch: a reader that falls behind
    /// sees the latest state, never a queue). Publishing never waits for a reader.
    pub fn watch_state(&self) -> tokio::sync::watch::Receiver<StateView> {
        self.state_tx.subscribe()
    }

    /// The state now; takes the state lock, so it also proves that lock is not stuck (the
    /// systemd watchdog pings only after this returns).
    pub fn state_view(&self) -> StateView {
        StateView::of(&self.lock())
    }

    /// How many applications are registered; None when vssd serves no applications.
    pub fn app_count(&self) -> Option<usize> {
        self.apps.as_ref().map(|a| a.count())
    }

    /// A queue of the lifecycle's events from now on, holding at most `capacity`; events that
    /// do not fit are dropped and counted, never waited for.
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        self.observers.subscribe(capacity)
    }

    fn emit(&self, ev: Event) {
        self.observers.emit(ev);
    }

    /// A fresh id for a channel connection.
    pub fn new_channel_id(&self) -> u64 {
        self.next_channel.fetch_add(1, Ordering::Relaxed)
    }

    /// "frozen" or "thawed", as guest-fsfreeze-status reports it. A freeze or thaw in progress
    /// counts as frozen: writers may block.
    pub fn status(&self) -> &'static str {
        match self.lock().life {
            Lifecycle::Thawed => "thawed",
            _ => "frozen",
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.status() == "frozen"
    }

    /// Runs `work` on a blocking thread while nothing is frozen, under the operation lock: no
    /// freeze starts until it is done (a freeze request waits for it, as behind any command in
    /// qemu-ga, which runs one at a time). None, without running it, when filesystems are
    /// frozen. For `guest-fstrim`, whose FITRIMs must not overlap a FIFREEZE.
    pub async fn while_thawed<T: Send + 'static>(
        &self,
        step: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>, AgentError> {
        let _op = self.op.lock().await;
        if self.is_frozen() {
            return Ok(None);
        }
        tokio::task::spawn_blocking(work).await.map(Some).map_err(AgentError::step(step))
    }

    /// The `vssd-status` view.
    pub fn status_json(&self) -> serde_json::Value {
        let prepared = self.prepared_json();
        let inner = self.lock();
        let mut v = serde_json::json!({
            "status": match inner.life { Lifecycle::Thawed => "thawed", _ => "frozen" },
            "state": inner.life.name(),
            "version": env!("CARGO_PKG_VERSION"),
            "scope": self.cfg.scope.display().to_string(),
            "frozen": [],
        });
        if let Some(s) = inner.life.frozen() {
            let now = tokio::time::Instant::now();
            v["frozen"] = s.filesystems.iter().map(|f| f.mount_point.display().to_string()).collect();
            v["frozen-for-ms"] = (now.saturating_duration_since(s.since).as_millis() as u64).into();
            v["deadline-in-ms"] = (s.deadline.saturating_duration_since(now).as_millis() as u64).into();
            v["bound-to-channel"] = s.owner.is_some().into();
        }
        if let Some(a) = &inner.last_auto_thaw {
            v["last-auto-thaw"] = serde_json::to_value(a).unwrap_or_default();
        }
        if let Some(p) = prepared {
            v["prepared"] = p;
        }
        if let Some(apps) = &self.apps {
            v["apps"] = apps.list().into();
        }
        if let Some(h) = crate::hyperv::status_json() {
            v["hyperv"] = h;
        }
        v
    }
}

/// Whether `p` is inside the agent's scope (used by vssctl's direct thaw too).
pub fn in_scope(p: &Path, scope: &Path) -> bool {
    p.starts_with(scope)
}
