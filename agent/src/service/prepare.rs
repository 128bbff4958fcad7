//! A freeze announced ahead (`vssd-freeze-prepare`): planning and the apps' PREPARE happen
//! when the host announces a backup, outside the freeze window, and the `vssd-freeze` that
//! follows on the same channel goes straight to the apps' FREEZE and FIFREEZE.
//!
//! What is kept ([`Prepared`]) is the plan, the mount table it was made from, and the apps'
//! PREPARE answers. The freeze that takes it re-reads the mount table (one read, no sysfs)
//! and plans again only if it changed, so it freezes what a freeze from scratch would.
//!
//! Invariants:
//! - At most one prepared freeze exists; whoever takes it out of its slot (the freeze that
//!   uses it, or whatever cancels it) owns it, so its apps get exactly one THAW: THAW
//!   (aborted) on cancellation, the freeze's own THAW otherwise.
//! - A prepared freeze never outlives its deadline, its channel, a thaw, a shutdown, or a
//!   freeze it does not match (another channel's, other options): each cancels it.
//! - Nothing is frozen or held by a prepare: apps that answered PREPARE only got ready.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appvss_proto::ThawReason;
use serde::Serialize;
use tracing::{info, warn};

use super::report::ms;
use super::{Agent, AgentError, FreezeRequest};
use crate::apps::{Answer, AppReport};
use crate::config::AppFailurePolicy;
use crate::engine::Lifecycle;
use crate::plan::{CannotFreezePolicy, Plan};

/// A freeze planned and PREPAREd ahead, waiting for its `vssd-freeze`.
pub(super) struct Prepared {
    /// The freeze id the apps got with PREPARE; the freeze that uses this keeps it.
    pub(super) generation: u64,
    owner: Option<u64>,
    mountpoints: Option<Vec<PathBuf>>,
    cannot_freeze: Option<CannotFreezePolicy>,
    app_failure: Option<AppFailurePolicy>,
    /// The mount table the plan was made from, as read.
    pub(super) mountinfo: String,
    pub(super) plan: Plan,
    /// Every app's answer to PREPARE.
    pub(super) prep: Vec<AppReport>,
    /// The apps that got PREPARE (each gets one THAW).
    pub(super) asked: Vec<u64>,
    /// When it is cancelled unless its freeze comes first.
    expires: tokio::time::Instant,
}

impl Prepared {
    /// Whether `req` is the freeze this was prepared for (the deadline is the freeze's own).
    fn matches(&self, req: &FreezeRequest) -> bool {
        self.owner == req.owner
            && self.mountpoints == req.mountpoints
            && self.cannot_freeze == req.cannot_freeze
            && self.app_failure == req.app_failure
    }
}

/// What `vssd-freeze-prepare` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrepareReport {
    /// The freeze id the apps got.
    pub freeze_id: u64,
    /// Filesystems the plan would freeze now.
    pub to_freeze: usize,
    /// Apps asked, and how many answered ready.
    pub apps: Vec<AppReport>,
    pub ready: usize,
    pub plan_ms: f64,
    pub elapsed_ms: f64,
    /// How long the preparation is kept for its freeze.
    pub expires_in_ms: u64,
}

impl Agent {
    /// Plans `req` and sends PREPARE to every app (beside each other), and keeps both for the
    /// freeze that follows with the same request, for at most `keep`. A preparation already
    /// waiting is cancelled first. Fails, keeping nothing, where the freeze itself would fail
    /// before FREEZE (the plan, the cannot-freeze veto, an app not ready under `fail`).
    pub async fn prepare_freeze(
        self: &Arc<Self>,
        req: FreezeRequest,
        keep: Duration,
    ) -> Result<PrepareReport, AgentError> {
        let _op = self.op.lock().await;
        let start = Instant::now();
        {
            let inner = self.lock();
            if !matches!(inner.life, Lifecycle::Thawed) {
                return Err(crate::engine::TransitionError::AlreadyFrozen.into());
            }
        }
        self.cancel_prepared("a new vssd-freeze-prepare");
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let planning = {
            let (me, req) = (self.clone(), req.clone());
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let text = me.read_mountinfo()?;
                let plan = me.checked_plan_of(&req, &text)?;
                Ok::<_, AgentError>((text, plan, t.elapsed()))
            })
        };
        let apps = self.apps.as_ref().filter(|a| a.count() > 0);
        let prep = match apps {
            Some(apps) => apps.prepare(generation, self.cfg.app_prepare_deadline()).await,
            None => Vec::new(),
        };
        let asked: Vec<u64> = prep.iter().filter(|r| r.outcome != Answer::Disconnected).map(|r| r.app_id).collect();
        let release = |why: &str| {
            if let Some(apps) = &self.apps {
                if !asked.is_empty() {
                    apps.thaw(&asked, generation, ThawReason::Aborted);
                }
            }
            warn!(why, "vssd-freeze-prepare failed; apps released");
        };
        let planned = match planning.await {
            Ok(r) => r,
            Err(join) => Err(AgentError::step("plan")(join)),
        };
        let (mountinfo, plan, plan_took) = match planned {
            Ok(p) => p,
            Err(e) => {
                release("planning failed");
                return Err(e);
            }
        };
        if req.app_failure.unwrap_or(self.cfg.app_failure) == AppFailurePolicy::Fail {
            if let Some(bad) = prep.iter().find(|r| r.outcome != Answer::Ready) {
                release("an app is not ready");
                return Err(AgentError::AppFailed(super::report::describe_app(bad, "PREPARE")));
            }
        }
        let report = PrepareReport {
            freeze_id: generation,
            to_freeze: plan.levels.iter().map(Vec::len).sum(),
            ready: prep.iter().filter(|r| r.outcome == Answer::Ready).count(),
            apps: prep.clone(),
            plan_ms: ms(plan_took),
            elapsed_ms: ms(start.elapsed()),
            expires_in_ms: keep.as_millis() as u64,
        };
        let expires = tokio::time::Instant::now() + keep;
        *self.prepared.lock().unwrap_or_else(|p| p.into_inner()) = Some(Prepared {
            generation,
            owner: req.owner,
            mountpoints: req.mountpoints,
            cannot_freeze: req.cannot_freeze,
            app_failure: req.app_failure,
            mountinfo,
            plan,
            prep,
            asked,
            expires,
        });
        self.arm_prepare_expiry(generation, expires);
        info!(
            freeze_id = generation,
            apps = report.apps.len(),
            ready = report.ready,
            elapsed_ms = report.elapsed_ms,
            "freeze prepared"
        );
        Ok(report)
    }

    /// The preparation for `req`, taken out of its slot; one that does not match is
    /// cancelled (THAW aborted to its apps) and None returned.
    pub(super) fn take_prepared(&self, req: &FreezeRequest) -> Option<Prepared> {
        let p = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        if p.matches(req) {
            // An app that registered since PREPARE would miss the freeze (even when another
            // left, so the count alone cannot tell): start from scratch.
            let now = self.apps.as_ref().map_or_else(Vec::new, |a| a.ids());
            if now.iter().all(|id| p.asked.contains(id)) {
                return Some(p);
            }
        }
        self.release_prepared(p, "a freeze it was not prepared for");
        None
    }

    /// Cancels the preparation waiting, if any: its apps get THAW (aborted).
    pub(super) fn cancel_prepared(&self, why: &str) {
        let p = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = p {
            self.release_prepared(p, why);
        }
    }

    /// The preparation waiting, for `vssd-status`: its freeze id, the apps that got PREPARE,
    /// how long it is kept, whether a channel owns it.
    pub(super) fn prepared_json(&self) -> Option<serde_json::Value> {
        let slot = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        let p = slot.as_ref()?;
        let left = p.expires.saturating_duration_since(tokio::time::Instant::now());
        Some(serde_json::json!({
            "freeze-id": p.generation,
            "apps": p.asked.len(),
            "to-freeze": p.plan.levels.iter().map(Vec::len).sum::<usize>(),
            "expires-in-ms": left.as_millis() as u64,
            "bound-to-channel": p.owner.is_some(),
        }))
    }

    /// Whether a preparation is waiting for its freeze.
    pub fn is_prepared(&self) -> bool {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn release_prepared(&self, p: Prepared, why: &str) {
        if let Some(apps) = &self.apps {
            if !p.asked.is_empty() {
                apps.thaw(&p.asked, p.generation, ThawReason::Aborted);
            }
        }
        info!(freeze_id = p.generation, why, "prepared freeze cancelled; apps released");
    }

    /// Cancels preparation `generation` at `at` unless its freeze took it by then.
    fn arm_prepare_expiry(self: &Arc<Self>, generation: u64, at: tokio::time::Instant) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let Some(me) = me.upgrade() else { return };
            let p = {
                let mut slot = me.prepared.lock().unwrap_or_else(|p| p.into_inner());
                match slot.as_ref() {
                    Some(p) if p.generation == generation => slot.take(),
                    _ => None,
                }
            };
            if let Some(p) = p {
                me.release_prepared(p, "no freeze came before its deadline");
            }
        });
    }

    /// A channel went away: a preparation it made is cancelled at once (nothing is held, and
    /// its freeze can only come on that channel).
    pub(super) fn prepared_channel_closed(&self, id: u64) {
        let p = {
            let mut slot = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(p) if p.owner == Some(id) => slot.take(),
                _ => None,
            }
        };
        if let Some(p) = p {
            self.release_prepared(p, "its channel closed");
        }
    }

    /// The mount table as text (blocking).
    pub(super) fn read_mountinfo(&self) -> Result<String, AgentError> {
        std::fs::read_to_string(&self.cfg.mountinfo).map_err(|source| {
            AgentError::MountTable(kmod_shim::mountinfo::Error::Read { path: self.cfg.mountinfo.clone(), source })
        })
    }

    /// The prepared plan if the mount table has not changed since, else a new one (blocking:
    /// one read of the mount table; sysfs only when it changed).
    pub(super) fn recheck_plan(&self, p: &mut Option<(String, Plan)>, req: &FreezeRequest) -> Result<Plan, AgentError> {
        let text = self.read_mountinfo()?;
        match p.take() {
            Some((old, plan)) if old == text => Ok(plan),
            _ => self.checked_plan_of(req, &text),
        }
    }
}
