//! The agent's heart: one freeze at a time, shared by every channel, that always ends.
//!
//! Freeze and thaw are serialised by an operation lock (a thaw that arrives while a freeze is
//! still syncing waits for it, then thaws). The lifecycle and what is reported about it sit
//! behind a plain mutex that is never held across blocking work, so status queries answer at
//! once. Every freeze arms a deadline; the channel that froze going away arms a grace timer;
//! either thaws by itself and leaves a notice for the host's next thaw.
//!
//! Nothing here writes to a filesystem that may be frozen: the marker lives in the state
//! directory, which the planner never freezes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kmod_shim::topology::Topology;
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::apps::{Answer, AppReport, Apps};
use crate::config::{AppFailurePolicy, Config};
use crate::engine::{self, AutoThawReason, FrozenFs, FrozenState, Kernel, Lifecycle};
use crate::hooks::{self, HookOutcome, HookRun};
use crate::marker::Marker;
use crate::plan::{self, CannotFreezePolicy, Outcome, Plan, PlanOptions};
use appvss_proto::ThawReason;

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

/// Per-mount line of a report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MountReport {
    pub mountpoint: String,
    pub fstype: String,
    pub device: String,
    pub outcome: String,
    pub reason: String,
    pub level: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_via: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_ms: Option<f64>,
}

/// What a successful freeze reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FreezeReport {
    pub frozen: usize,
    pub deadline_ms: u64,
    /// From the request to all frozen.
    pub elapsed_ms: f64,
    /// Of which reading the mount table and topology and planning.
    pub plan_ms: f64,
    /// `application` when apps or hooks took part and all held; else `filesystem`.
    pub consistency: &'static str,
    pub mounts: Vec<MountReport>,
    pub apps: Vec<AppReport>,
    pub hooks: Vec<HookRun>,
    /// When each step ended, in ms since the request: where a slow freeze spent its time.
    pub steps: StepTimes,
}

/// Step name → milliseconds since the request, in the order the steps ended.
pub type StepTimes = serde_json::Map<String, serde_json::Value>;

/// Marks the end of each freeze step (shared with the blocking steps).
struct StepClock {
    t0: Instant,
    marks: std::sync::Mutex<Vec<(&'static str, f64)>>,
}

impl StepClock {
    fn new(t0: Instant) -> Self {
        StepClock { t0, marks: std::sync::Mutex::new(Vec::new()) }
    }
    fn mark(&self, step: &'static str) {
        let at = ms(self.t0.elapsed());
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).push((step, at));
    }
    fn report(&self) -> StepTimes {
        let mut m = self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        m.sort_by(|a, b| a.1.total_cmp(&b.1));
        m.into_iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect()
    }
}

/// A thaw vssd did by itself, kept for `vssd-status` and the host's next thaw.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AutoThaw {
    pub reason: AutoThawReason,
    pub at_unix_ms: u64,
    pub frozen_for_ms: u64,
    pub thawed: Vec<String>,
    pub errors: Vec<ThawError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThawError {
    pub mountpoint: String,
    pub error: String,
}

/// What a thaw reports.
#[derive(Debug, Clone, Serialize)]
pub struct ThawResult {
    pub thawed: usize,
    pub errors: Vec<ThawError>,
    /// Apps sent THAW.
    pub apps: usize,
    pub hooks: Vec<HookRun>,
    /// Milliseconds from the request to the filesystems thawed (what the writers waited).
    #[serde(rename = "fs-thaw-ms")]
    pub fs_thaw_ms: f64,
    /// Milliseconds from the request to this reply (thaw hooks included).
    #[serde(rename = "elapsed-ms")]
    pub elapsed_ms: f64,
}

/// Errors of the agent's operations, mapped to QGA error classes by the protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transition(#[from] engine::TransitionError),
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("cannot read the mount table: {0}")]
    MountTable(#[from] kmod_shim::mountinfo::Error),
    #[error("freeze vetoed: {0} (cannot-freeze policy is `veto`; use `skip` to freeze the rest and report these)")]
    Vetoed(String),
    #[error(transparent)]
    Freeze(#[from] engine::FreezeError),
    #[error("cannot record the freeze marker in {dir}: {source}; nothing was frozen")]
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
    #[error("internal error: {0}")]
    Internal(String),
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
    apps: Option<Arc<Apps>>,
}

/// What a freeze in progress has engaged and must release if it does not complete.
#[derive(Debug, Default)]
struct Engaged {
    apps: Vec<u64>,
    hooks: Vec<PathBuf>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Agent {
    pub fn new(cfg: Config, kernel: Arc<dyn Kernel>) -> Arc<Agent> {
        Self::with_apps(cfg, kernel, None)
    }

    /// An agent whose freezes include the apps registered with `apps`.
    pub fn with_apps(cfg: Config, kernel: Arc<dyn Kernel>, apps: Option<Arc<Apps>>) -> Arc<Agent> {
        let marker = Marker::new(cfg.state_dir.join("frozen.json"));
        Arc::new(Agent {
            cfg,
            kernel,
            op: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                life: Lifecycle::Thawed,
                last_auto_thaw: None,
                notice: None,
                disconnected: HashSet::new(),
            }),
            generation: AtomicU64::new(0),
            next_channel: AtomicU64::new(1),
            marker,
            apps,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it half-updated (single assignments),
        // so a poisoned lock is still safe to use; thawing must never be refused.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Thaws what a previous vssd left frozen (its marker). Run once at start.
    pub fn recover(&self) {
        let Some(m) = self.marker.read() else { return };
        warn!(pid = m.pid, count = m.filesystems.len(), "a previous vssd left filesystems frozen; thawing them");
        let mounts = kmod_shim::mountinfo::read(&self.cfg.mountinfo).unwrap_or_default();
        // Thaw only what is still mounted at the same place with the same device.
        let still: Vec<FrozenFs> = m
            .filesystems
            .into_iter()
            .filter(|f| mounts.iter().any(|x| x.mount_point == f.mount_point && x.dev == f.dev))
            .collect();
        let report = engine::thaw(&self.kernel, &still);
        if !m.hooks.is_empty() {
            hooks::run(&m.hooks, "thaw", self.cfg.hook_deadline());
        }
        if m.rcu_expedited {
            let knob = kmod_shim::rcu::knob(&self.cfg.sysfs);
            if let Err(e) = kmod_shim::rcu::reset(&knob) {
                warn!(knob = %knob.display(), error = %e, "cannot turn expedited RCU grace periods off");
            }
        }
        let rec = self.auto_thaw_record(AutoThawReason::RecoveredAfterCrash, Duration::ZERO, &report);
        for e in &rec.errors {
            error!(mountpoint = %e.mountpoint, error = %e.error, "recovery thaw failed");
        }
        info!(thawed = rec.thawed.len(), "recovered after a crash: thawed");
        let mut inner = self.lock();
        inner.notice = Some(format!(
            "a previous vssd (pid {}) died while frozen and this one thawed {} filesystem(s) at start",
            m.pid,
            rec.thawed.len()
        ));
        inner.last_auto_thaw = Some(rec);
        drop(inner);
        self.marker.remove();
    }

    fn auto_thaw_record(&self, reason: AutoThawReason, frozen_for: Duration, r: &engine::ThawReport) -> AutoThaw {
        AutoThaw {
            reason,
            at_unix_ms: unix_ms(SystemTime::now()),
            frozen_for_ms: frozen_for.as_millis() as u64,
            thawed: r.thawed.iter().map(|p| p.display().to_string()).collect(),
            errors: thaw_errors(r),
        }
    }

    fn plan_options(&self, only: Option<Vec<PathBuf>>) -> PlanOptions {
        let mut o = PlanOptions::new(&self.cfg.scope);
        o.exclude = self.cfg.exclude.clone();
        o.exclude_fstypes = self.cfg.exclude_fstypes.clone();
        o.include = self.cfg.include.clone();
        o.only = only;
        if let Ok(d) = kmod_shim::topology::dev_of(&self.cfg.state_dir) {
            o.avoid_devs.push(d);
        }
        o
    }

    /// Plans without freezing (blocking: reads mountinfo and sysfs).
    pub fn plan(&self, only: Option<Vec<PathBuf>>) -> Result<Plan, AgentError> {
        let mounts = kmod_shim::mountinfo::read(&self.cfg.mountinfo)?;
        let topo = Topology::new(&self.cfg.sysfs);
        let backing = |m: &kmod_shim::mountinfo::Mount| plan::backing_devs(m, &mounts, &topo);
        Ok(plan::plan(&mounts, &self.plan_options(only), &backing)?)
    }

    /// Freezes apps, hooks and filesystems; on success they stay frozen until thaw, the
    /// deadline, or the owner channel's disappearance. On failure nothing stays frozen.
    pub async fn freeze(self: &Arc<Self>, req: FreezeRequest) -> Result<FreezeReport, AgentError> {
        let _op = self.op.lock().await;
        let start = Instant::now();
        self.lock().life.begin_freeze()?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let deadline_len = req.deadline.unwrap_or_else(|| self.cfg.freeze_deadline());
        let mut engaged = Engaged::default();
        let result = self.freeze_steps(&req, generation, start + deadline_len, &mut engaged).await;
        match result {
            Err(e) => {
                self.release(&engaged, generation, ThawReason::Aborted).await;
                self.lock().life.freeze_failed()?;
                self.marker.remove();
                warn!(error = %e, "freeze failed; nothing is left frozen");
                Err(e)
            }
            Ok((frozen, report)) if frozen.is_empty() => {
                // As qemu-ga: a freeze that froze nothing leaves the guest thawed.
                self.release(&engaged, generation, ThawReason::Completed).await;
                self.lock().life.freeze_failed()?;
                self.marker.remove();
                info!("nothing to freeze; still thawed");
                Ok(report)
            }
            Ok((frozen, report)) => {
                let deadline = start + deadline_len;
                {
                    let mut inner = self.lock();
                    inner.life.freeze_done(FrozenState {
                        filesystems: frozen,
                        since: start,
                        deadline,
                        owner: req.owner,
                        generation,
                        apps: engaged.apps,
                        hooks: engaged.hooks,
                    })?;
                    inner.notice = None;
                }
                info!(
                    frozen = report.frozen,
                    apps = report.apps.len(),
                    elapsed_ms = report.elapsed_ms,
                    deadline_s = deadline_len.as_secs_f64(),
                    consistency = report.consistency,
                    "frozen"
                );
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(deadline.into()).await;
                    me.auto_thaw(generation, AutoThawReason::Deadline).await;
                });
                Ok(FreezeReport { deadline_ms: deadline_len.as_millis() as u64, ..report })
            }
        }
    }

    /// Plan → apps PREPARE and FREEZE → hooks → marker → FIFREEZE. Records in `engaged` what
    /// must be released if a later step fails. Without apps, the blocking steps run in one
    /// go on one thread: every hop between threads is inside the freeze window.
    async fn freeze_steps(
        self: &Arc<Self>,
        req: &FreezeRequest,
        freeze_id: u64,
        deadline: Instant,
        engaged: &mut Engaged,
    ) -> Result<(Vec<FrozenFs>, FreezeReport), AgentError> {
        let t0 = Instant::now();
        let clock = Arc::new(StepClock::new(t0));
        let app_policy = req.app_failure.unwrap_or(self.cfg.app_failure);
        let apps = self.apps.as_ref().filter(|a| a.count() > 0);
        let hook_list = hooks::discover(&self.cfg.hooks_dirs);
        clock.mark("hooks-found");
        let mut app_reports = Vec::new();
        let (plan_elapsed, step) = match apps {
            None => {
                let me = self.clone();
                let req = req.clone();
                let step_hooks = hook_list.clone();
                let c = clock.clone();
                let (planned, step) = tokio::task::spawn_blocking(move || match me.checked_plan(&req) {
                    Err(e) => (None, Err(e)),
                    Ok(plan) => {
                        c.mark("planned");
                        (Some(t0.elapsed()), me.fs_step(plan, &step_hooks, app_policy, &c))
                    }
                })
                .await
                .map_err(|e| AgentError::Internal(format!("freeze task failed: {e}")))?;
                let Some(plan_elapsed) = planned else {
                    // Planning failed: no hook ran, nothing to release.
                    return Err(step
                        .err()
                        .unwrap_or_else(|| AgentError::Internal("plan failed without an error".into())));
                };
                engaged.hooks = hook_list;
                (plan_elapsed, step?)
            }
            Some(apps) => {
                // Planning (mountinfo, sysfs) runs while the apps prepare; FREEZE goes out only
                // once the plan stands, so a vetoed plan never has an app hold for nothing.
                let me = self.clone();
                let req2 = req.clone();
                let c = clock.clone();
                let planning = tokio::task::spawn_blocking(move || {
                    let plan = me.checked_plan(&req2);
                    c.mark("planned");
                    (plan, t0.elapsed())
                });
                let (reports, plan, plan_elapsed) =
                    self.apps_hold(apps, freeze_id, deadline, app_policy, engaged, planning, &clock).await?;
                app_reports = reports;
                debug!(apps = app_reports.len(), at_ms = ms(t0.elapsed()), "apps answered");
                engaged.hooks = hook_list.clone();
                let me = self.clone();
                let c = clock.clone();
                let step = tokio::task::spawn_blocking(move || me.fs_step(plan, &hook_list, app_policy, &c))
                    .await
                    .map_err(|e| AgentError::Internal(format!("freeze task failed: {e}")))??;
                (plan_elapsed, step)
            }
        };
        let (frozen, timings, hook_runs, plan) = step;
        debug!(at_ms = ms(t0.elapsed()), "filesystems frozen");
        let mounts = plan
            .mounts
            .iter()
            .map(|m| {
                let t = timings.iter().find(|t| t.mount_point == m.mount_point);
                mount_report(m, if t.is_some() { "frozen" } else { m.outcome.name() }, t.map(|t| ms(t.elapsed)))
            })
            .collect();
        let took_part = !app_reports.is_empty() || !hook_runs.is_empty();
        let all_held = app_reports.iter().all(|r| r.outcome == Answer::Held)
            && hook_runs.iter().all(|r| r.outcome == HookOutcome::Ok);
        let report = FreezeReport {
            frozen: frozen.len(),
            deadline_ms: 0,
            elapsed_ms: ms(t0.elapsed()),
            plan_ms: ms(plan_elapsed),
            consistency: if took_part && all_held { "application" } else { "filesystem" },
            mounts,
            apps: app_reports,
            hooks: hook_runs,
            steps: clock.report(),
        };
        Ok((frozen, report))
    }

    /// The plan, with the cannot-freeze policy applied (blocking: mountinfo and sysfs).
    fn checked_plan(&self, req: &FreezeRequest) -> Result<Plan, AgentError> {
        let plan = self.plan(req.mountpoints.clone())?;
        let policy = req.cannot_freeze.unwrap_or(self.cfg.cannot_freeze);
        if policy == CannotFreezePolicy::Veto {
            let blocked: Vec<String> =
                plan.cannot_freeze().map(|m| format!("{} ({})", m.mount_point.display(), m.fstype)).collect();
            if !blocked.is_empty() {
                return Err(AgentError::Vetoed(format!("cannot freeze {}", blocked.join(", "))));
            }
        }
        for m in plan.cannot_freeze() {
            warn!(mountpoint = %m.mount_point.display(), fstype = %m.fstype, "cannot be frozen; skipped (policy skip)");
        }
        Ok(plan)
    }

    /// PREPARE then FREEZE to every registered app; the merged report per app.
    #[allow(clippy::too_many_arguments)]
    async fn apps_hold(
        &self,
        apps: &Apps,
        freeze_id: u64,
        deadline: Instant,
        app_policy: AppFailurePolicy,
        engaged: &mut Engaged,
        planning: tokio::task::JoinHandle<(Result<Plan, AgentError>, Duration)>,
        clock: &StepClock,
    ) -> Result<(Vec<AppReport>, Plan, Duration), AgentError> {
        let prep = apps.prepare(freeze_id, self.cfg.app_prepare_deadline()).await;
        clock.mark("apps-prepared");
        engaged.apps = prep.iter().filter(|r| r.outcome != Answer::Disconnected).map(|r| r.app_id).collect();
        let (plan, plan_elapsed) =
            planning.await.map_err(|e| AgentError::Internal(format!("plan task failed: {e}")))?;
        let plan = plan?;
        let ready: Vec<u64> = prep.iter().filter(|r| r.outcome == Answer::Ready).map(|r| r.app_id).collect();
        if app_policy == AppFailurePolicy::Fail {
            if let Some(bad) = prep.iter().find(|r| r.outcome != Answer::Ready) {
                return Err(AgentError::AppFailed(describe_app(bad, "PREPARE")));
            }
        }
        let max_hold = deadline.saturating_duration_since(Instant::now());
        let held = apps.freeze(&ready, freeze_id, self.cfg.app_freeze_deadline(), max_hold).await;
        clock.mark("apps-held");
        if app_policy == AppFailurePolicy::Fail {
            if let Some(bad) = held.iter().find(|r| r.outcome != Answer::Held) {
                return Err(AgentError::AppFailed(describe_app(bad, "FREEZE")));
            }
        }
        let held: HashMap<u64, AppReport> = held.into_iter().map(|h| (h.app_id, h)).collect();
        let mut out = Vec::with_capacity(prep.len());
        for mut r in prep {
            if let Some(h) = held.get(&r.app_id) {
                r.outcome = h.outcome;
                r.reason = h.reason.clone();
                r.freeze_ms = h.freeze_ms;
            }
            if r.outcome != Answer::Held {
                warn!(app = %r.name, app_id = r.app_id, outcome = ?r.outcome, reason = ?r.reason, "app does not hold this freeze");
            }
            out.push(r);
        }
        Ok((out, plan, plan_elapsed))
    }

    /// Freeze hooks, marker, FIFREEZE (blocking).
    #[allow(clippy::type_complexity)]
    fn fs_step(
        &self,
        plan: Plan,
        hook_list: &[PathBuf],
        app_policy: AppFailurePolicy,
        clock: &StepClock,
    ) -> Result<(Vec<FrozenFs>, Vec<engine::FreezeTiming>, Vec<HookRun>, Plan), AgentError> {
        clock.mark("fs-step");
        let runs = hooks::run(hook_list, "freeze", self.cfg.hook_deadline());
        if !hook_list.is_empty() {
            clock.mark("hooks-ran");
        }
        if app_policy == AppFailurePolicy::Fail {
            if let Some(bad) = runs.iter().find(|r| r.outcome != HookOutcome::Ok) {
                return Err(AgentError::HookFailed(format!(
                    "{} failed at freeze ({:?}, exit {:?}): {}",
                    bad.path, bad.outcome, bad.exit_code, bad.output
                )));
            }
        }
        let planned: Vec<FrozenFs> = plan
            .levels
            .iter()
            .flatten()
            .map(|&i| {
                let m = &plan.mounts[i];
                FrozenFs { mount_point: m.mount_point.clone(), fstype: m.fstype.clone(), dev: m.dev, level: m.level }
            })
            .collect();
        // Expedited grace periods only around the FIFREEZE calls (the knob is system-wide).
        let expedite = if self.cfg.rcu_expedite && !planned.is_empty() {
            let knob = kmod_shim::rcu::knob(&self.cfg.sysfs);
            match kmod_shim::rcu::Expedite::engage(&knob) {
                Ok(g) => g,
                Err(e) => {
                    debug!(knob = %knob.display(), error = %e, "no expedited RCU grace periods for this freeze");
                    None
                }
            }
        } else {
            None
        };
        clock.mark("rcu-expedited");
        self.marker
            .write(&planned, hook_list, expedite.is_some())
            .map_err(|source| AgentError::Marker { dir: self.cfg.state_dir.clone(), source })?;
        clock.mark("marker-written");
        let result = engine::freeze(&self.kernel, &plan);
        clock.mark("filesystems-frozen");
        if let Some(g) = expedite {
            if let Err(e) = g.restore() {
                warn!(error = %e, "cannot turn expedited RCU grace periods off again");
            }
        }
        let (frozen, timings) = result?;
        Ok((frozen, timings, runs, plan))
    }

    /// Releases apps (THAW, never awaited) and runs the thaw hooks, after the filesystems
    /// are thawed (or were never frozen).
    async fn release(&self, engaged: &Engaged, freeze_id: u64, reason: ThawReason) -> Vec<HookRun> {
        if let Some(apps) = &self.apps {
            if !engaged.apps.is_empty() {
                apps.thaw(&engaged.apps, freeze_id, reason);
            }
        }
        if engaged.hooks.is_empty() {
            return vec![];
        }
        let hooks = engaged.hooks.clone();
        let deadline = self.cfg.hook_deadline();
        tokio::task::spawn_blocking(move || hooks::run(&hooks, "thaw", deadline)).await.unwrap_or_default()
    }

    /// Thaws on the host's request. Reports the auto-thaw notice once, as an error, when vssd
    /// had already thawed by itself since the last freeze.
    pub async fn thaw(self: &Arc<Self>) -> Result<ThawResult, AgentError> {
        let start = Instant::now();
        let _op = self.op.lock().await;
        let state = {
            let mut inner = self.lock();
            let s = inner.life.begin_thaw()?;
            if s.is_none() {
                if let Some(n) = inner.notice.take() {
                    return Err(AgentError::AlreadyAutoThawed(n));
                }
            }
            s
        };
        let Some(state) = state else {
            return Ok(ThawResult {
                thawed: 0,
                errors: vec![],
                apps: 0,
                hooks: vec![],
                fs_thaw_ms: 0.0,
                elapsed_ms: ms(start.elapsed()),
            });
        };
        let report = self.thaw_blocking(state.filesystems.clone()).await;
        let fs_thaw_ms = ms(start.elapsed());
        let engaged = Engaged { apps: state.apps.clone(), hooks: state.hooks.clone() };
        let hook_runs = self.release(&engaged, state.generation, ThawReason::Completed).await;
        self.lock().life.thaw_done()?;
        self.marker.remove();
        info!(
            thawed = report.thawed.len(),
            frozen_ms = state.since.elapsed().as_millis() as u64,
            fs_thaw_ms,
            elapsed_ms = ms(start.elapsed()),
            "thawed"
        );
        let errors = thaw_errors(&report);
        if !errors.is_empty() {
            let msg: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.mountpoint, e.error)).collect();
            return Err(AgentError::ThawErrors(msg.join("; ")));
        }
        Ok(ThawResult {
            thawed: report.thawed.len(),
            errors,
            apps: state.apps.len(),
            hooks: hook_runs,
            fs_thaw_ms,
            elapsed_ms: ms(start.elapsed()),
        })
    }

    async fn thaw_blocking(&self, fs: Vec<FrozenFs>) -> engine::ThawReport {
        let kernel = self.kernel.clone();
        match tokio::task::spawn_blocking(move || engine::thaw(&kernel, &fs)).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "thaw task failed");
                engine::ThawReport::default()
            }
        }
    }

    /// Thaws by itself if freeze `generation` is still in force.
    pub async fn auto_thaw(self: &Arc<Self>, generation: u64, reason: AutoThawReason) {
        let _op = self.op.lock().await;
        let state = {
            let mut inner = self.lock();
            match inner.life.frozen() {
                Some(s) if s.generation == generation => {}
                _ => return,
            }
            if reason == AutoThawReason::ChannelClosed {
                let owner = inner.life.frozen().and_then(|s| s.owner);
                if owner.is_some_and(|o| !inner.disconnected.contains(&o)) {
                    return; // it came back in time
                }
            }
            match inner.life.begin_thaw() {
                Ok(Some(s)) => s,
                _ => return,
            }
        };
        let frozen_for = state.since.elapsed();
        let report = self.thaw_blocking(state.filesystems.clone()).await;
        let engaged = Engaged { apps: state.apps.clone(), hooks: state.hooks.clone() };
        self.release(&engaged, state.generation, ThawReason::Timeout).await;
        let rec = self.auto_thaw_record(reason, frozen_for, &report);
        let why = match reason {
            AutoThawReason::Deadline => format!("the freeze deadline passed after {} ms", frozen_for.as_millis()),
            AutoThawReason::ChannelClosed => {
                format!("the channel that froze closed and did not come back within {} s", self.cfg.channel_drop_grace)
            }
            AutoThawReason::Shutdown => "vssd was stopped while frozen".into(),
            AutoThawReason::RecoveredAfterCrash => "recovered after a crash".into(),
        };
        warn!(reason = ?reason, thawed = rec.thawed.len(), errors = rec.errors.len(), "thawed by itself: {why}");
        let mut inner = self.lock();
        let _ = inner.life.thaw_done();
        inner.notice = Some(why);
        inner.last_auto_thaw = Some(rec);
        drop(inner);
        self.marker.remove();
    }

    /// Thaws whatever is frozen because vssd is stopping.
    pub async fn shutdown(self: &Arc<Self>) {
        let generation = self.lock().life.frozen().map(|s| s.generation);
        if let Some(g) = generation {
            self.auto_thaw(g, AutoThawReason::Shutdown).await;
        }
    }

    /// A channel connection went away (EOF, error, host disconnected).
    pub fn channel_closed(self: &Arc<Self>, id: u64) {
        let generation = {
            let mut inner = self.lock();
            inner.disconnected.insert(id);
            match inner.life.frozen() {
                Some(s) if s.owner == Some(id) => s.generation,
                _ => {
                    // Not the owner of a freeze: nothing to remember.
                    inner.disconnected.remove(&id);
                    return;
                }
            }
        };
        let grace = self.cfg.channel_drop_grace();
        warn!(channel = id, grace_s = grace.as_secs_f64(), "the channel that froze closed; thawing unless it returns");
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            me.auto_thaw(generation, AutoThawReason::ChannelClosed).await;
            me.lock().disconnected.remove(&id);
        });
    }

    /// A persistent channel (virtio-serial) is connected again.
    pub fn channel_reopened(&self, id: u64) {
        self.lock().disconnected.remove(&id);
    }

    /// The `vssd-status` view.
    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let mut v = serde_json::json!({
            "status": match inner.life { Lifecycle::Thawed => "thawed", _ => "frozen" },
            "state": inner.life.name(),
            "version": env!("CARGO_PKG_VERSION"),
            "scope": self.cfg.scope.display().to_string(),
            "frozen": [],
        });
        if let Some(s) = inner.life.frozen() {
            v["frozen"] = s.filesystems.iter().map(|f| f.mount_point.display().to_string()).collect();
            v["frozen-for-ms"] = (s.since.elapsed().as_millis() as u64).into();
            v["deadline-in-ms"] = (s.deadline.saturating_duration_since(Instant::now()).as_millis() as u64).into();
            v["bound-to-channel"] = s.owner.is_some().into();
        }
        if let Some(a) = &inner.last_auto_thaw {
            v["last-auto-thaw"] = serde_json::to_value(a).unwrap_or_default();
        }
        if let Some(apps) = &self.apps {
            v["apps"] = apps.list().into();
        }
        v
    }
}

fn describe_app(r: &AppReport, phase: &str) -> String {
    let what = match r.outcome {
        Answer::Vetoed => "vetoed",
        Answer::Failed => "failed to flush",
        Answer::Timeout => "did not answer in time",
        Answer::Disconnected => "disconnected",
        Answer::Ready | Answer::Held => "answered",
    };
    let reason = r.reason.as_deref().map(|x| format!(": {x}")).unwrap_or_default();
    format!("`{}` (id {}, uid {}) {what} at {phase}{reason}", r.name, r.app_id, r.uid)
}

fn thaw_errors(r: &engine::ThawReport) -> Vec<ThawError> {
    r.errors.iter().map(|(p, e)| ThawError { mountpoint: p.display().to_string(), error: e.to_string() }).collect()
}

/// The report line for one planned mount.
pub fn mount_report(m: &plan::PlannedMount, outcome: &str, freeze_ms: Option<f64>) -> MountReport {
    MountReport {
        mountpoint: m.mount_point.display().to_string(),
        fstype: m.fstype.clone(),
        device: m.dev.to_string(),
        outcome: outcome.to_string(),
        reason: m.outcome.reason(),
        level: m.level,
        frozen_via: match &m.outcome {
            Outcome::SameFilesystem { via } => Some(via.display().to_string()),
            _ => None,
        },
        freeze_ms,
    }
}

/// Whether `p` is inside the agent's scope (used by vssctl's direct thaw too).
pub fn in_scope(p: &Path, scope: &Path) -> bool {
    p.starts_with(scope)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Kernel;
    use std::path::Path;
    use std::sync::Mutex as StdMutex;

    /// Records what the RCU knob read at each FIFREEZE.
    struct KnobWatcher {
        knob: PathBuf,
        seen: StdMutex<Vec<String>>,
    }
    impl Kernel for KnobWatcher {
        fn freeze(&self, _: &Path) -> std::io::Result<()> {
            self.seen.lock().unwrap().push(std::fs::read_to_string(&self.knob)?.trim().to_string());
            Ok(())
        }
        fn thaw(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn agent(dir: &Path, knob_initial: &str, expedite: bool) -> (Arc<Agent>, Arc<KnobWatcher>, PathBuf) {
        let mi = dir.join("mountinfo");
        std::fs::write(&mi, "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n")
            .unwrap();
        let sys = dir.join("sys");
        std::fs::create_dir_all(sys.join("kernel")).unwrap();
        let knob = kmod_shim::rcu::knob(&sys);
        std::fs::write(&knob, knob_initial).unwrap();
        let k = Arc::new(KnobWatcher { knob: knob.clone(), seen: StdMutex::new(vec![]) });
        let cfg = Config {
            scope: "/s".into(),
            mountinfo: mi,
            sysfs: sys,
            state_dir: dir.join("state"),
            rcu_expedite: expedite,
            ..Config::default()
        };
        (Agent::new(cfg, k.clone()), k, knob)
    }

    #[tokio::test]
    async fn grace_periods_are_expedited_only_while_the_filesystems_freeze() {
        let d = tempfile::tempdir().unwrap();
        let (a, k, knob) = agent(d.path(), "0\n", true);
        a.freeze(FreezeRequest::default()).await.unwrap();
        assert_eq!(*k.seen.lock().unwrap(), ["1", "1"], "each FIFREEZE ran expedited");
        assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0", "put back while still frozen");
        let t = a.thaw().await.unwrap();
        assert_eq!(t.thawed, 2);
        assert!(t.fs_thaw_ms > 0.0 && t.fs_thaw_ms <= t.elapsed_ms, "{t:?}");
    }

    #[tokio::test]
    async fn the_knob_is_left_alone_when_configured_off_or_already_on() {
        let d = tempfile::tempdir().unwrap();
        let (a, k, knob) = agent(d.path(), "0\n", false);
        a.freeze(FreezeRequest::default()).await.unwrap();
        a.thaw().await.unwrap();
        assert_eq!(*k.seen.lock().unwrap(), ["0", "0"]);
        assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0");

        let d = tempfile::tempdir().unwrap();
        let (a, k, knob) = agent(d.path(), "1\n", true);
        a.freeze(FreezeRequest::default()).await.unwrap();
        a.thaw().await.unwrap();
        assert_eq!(*k.seen.lock().unwrap(), ["1", "1"]);
        assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "1", "the admin's setting survives");
    }

    #[tokio::test]
    async fn recovery_turns_off_what_a_crashed_vssd_turned_on() {
        let d = tempfile::tempdir().unwrap();
        let (a, _k, knob) = agent(d.path(), "1\n", true);
        let fs = FrozenFs { mount_point: "/s/a".into(), fstype: "ext4".into(), dev: "7:0".parse().unwrap(), level: 0 };
        a.marker.write(&[fs], &[], true).unwrap();
        a.recover();
        assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0");
        assert!(a.marker.read().is_none());
    }
}
