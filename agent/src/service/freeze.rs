//! The freeze, written once as a pipeline: plan → apps (PREPARE, FREEZE) → hooks → marker →
//! FIFREEZE, then the report and the deadline.
//!
//! Two properties shape it, both inside the freeze window:
//! - planning (mountinfo, sysfs) runs while the apps PREPARE, and FREEZE goes to them only
//!   once the plan stands, so a vetoed plan never has an app hold for nothing;
//! - without apps there is no stage to overlap, and planning runs on the filesystem stage's
//!   own blocking thread: one thread hop for the whole freeze.
//!
//! [`Planning`] carries the plan between the stages either as work still to do (no apps) or
//! as its result (made beside PREPARE), so the stages are the same in both cases.
//!
//! Invariants: on failure nothing stays frozen, every app that got PREPARE gets THAW
//! (aborted), every hook whose freeze phase may have run gets its thaw phase, and the marker
//! is removed only after all of that; a step that panics counts as a failure whose
//! filesystems may be frozen, and everything the marker lists is thawed first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appvss_proto::ThawReason;
use kmod_shim::topology::Topology;
use tracing::{debug, error, info, warn};

use super::prepare::Prepared;
use super::report::{describe_app, mount_report, ms, FreezeReport, StepClock};
use super::{Agent, AgentError, AppCoordinator, Engaged, Event, FreezeRequest};
use crate::apps::{Answer, AppReport};
use crate::config::AppFailurePolicy;
use crate::engine::{self, FrozenFs, FrozenState};
use crate::hooks::{self, HookOutcome, HookRun};
use crate::plan::{self, CannotFreezePolicy, Plan, PlanOptions};

/// A plan and how long it took from the request.
type Planned = Result<(Plan, Duration), AgentError>;

/// The plan as it travels down the pipeline.
enum Planning {
    /// Still to make, on whichever thread resolves it.
    Later(Box<dyn FnOnce() -> Planned + Send>),
    /// Made (beside the apps' PREPARE).
    Made(Plan, Duration),
}

impl Planning {
    /// The plan, making it now if it is still to make (blocking: mountinfo and sysfs).
    fn resolve(self) -> Planned {
        match self {
            Planning::Later(make) => make(),
            Planning::Made(plan, took) => Ok((plan, took)),
        }
    }
}

/// What the filesystem stage did.
struct FsStage {
    frozen: Vec<FrozenFs>,
    timings: Vec<engine::FreezeTiming>,
    hook_runs: Vec<HookRun>,
}

impl Agent {
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

    /// Plans without freezing (blocking: reads mountinfo and sysfs, at the config's paths:
    /// the seam through which tests give a mount table of their own).
    pub fn plan(&self, only: Option<Vec<PathBuf>>) -> Result<Plan, AgentError> {
        let mounts = kmod_shim::mountinfo::read(&self.cfg.mountinfo)?;
        self.plan_mounts(&mounts, only)
    }

    fn plan_mounts(
        &self,
        mounts: &[kmod_shim::mountinfo::Mount],
        only: Option<Vec<PathBuf>>,
    ) -> Result<Plan, AgentError> {
        let topo = Topology::new(&self.cfg.sysfs);
        let backing = |m: &kmod_shim::mountinfo::Mount| plan::backing_devs(m, mounts, &topo);
        Ok(plan::plan(mounts, &self.plan_options(only), &backing)?)
    }

    /// The plan, with the cannot-freeze policy applied (blocking: mountinfo and sysfs).
    fn checked_plan(&self, req: &FreezeRequest) -> Result<Plan, AgentError> {
        self.checked_plan_of(req, &self.read_mountinfo()?)
    }

    /// [`Self::checked_plan`] of a mount table already read (blocking: sysfs).
    pub(super) fn checked_plan_of(&self, req: &FreezeRequest, mountinfo: &str) -> Result<Plan, AgentError> {
        let mounts = kmod_shim::mountinfo::parse(mountinfo)?;
        let plan = self.plan_mounts(&mounts, req.mountpoints.clone())?;
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

    /// Freezes apps, hooks and filesystems; on success they stay frozen until thaw, the
    /// deadline, or the owner channel's disappearance. On failure nothing stays frozen.
    pub async fn freeze(self: &Arc<Self>, req: FreezeRequest) -> Result<FreezeReport, AgentError> {
        let _op = self.op.lock().await;
        let start = tokio::time::Instant::now();
        self.lock().life.begin_freeze()?;
        self.emit(Event::Freezing);
        // A freeze prepared for this request keeps the id its apps got PREPARE with.
        let prepared = self.take_prepared(&req);
        let generation = match &prepared {
            Some(p) => p.generation,
            None => self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let deadline_len = req.deadline.unwrap_or_else(|| self.cfg.freeze_deadline());
        let deadline = start + deadline_len;
        let mut engaged = Engaged::default();
        match self.pipeline(&req, generation, deadline, &mut engaged, prepared).await {
            Err(e) => {
                self.abort(&e, &engaged, generation).await;
                Err(e)
            }
            Ok((frozen, report)) if frozen.is_empty() => {
                // As qemu-ga: a freeze that froze nothing leaves the guest thawed.
                self.release(&engaged, generation, ThawReason::Completed).await;
                self.lock().life.freeze_failed()?;
                self.marker.settle(self.marker.stuck());
                info!("nothing to freeze; still thawed");
                self.emit(Event::NotFrozen(Some(Arc::new(report.clone()))));
                Ok(report)
            }
            Ok((frozen, report)) => {
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
                self.arm_deadline(generation, deadline);
                let report = FreezeReport { deadline_ms: deadline_len.as_millis() as u64, ..report };
                self.emit(Event::Frozen(Arc::new(report.clone())));
                Ok(report)
            }
        }
    }

    /// Undoes a freeze that failed at any step. The filesystems a clean failure froze are
    /// already thawed (the engine does that before it returns); a step that panicked may
    /// have left some frozen, so everything the marker lists is thawed. The marker goes last.
    /// What could not be thawed stays in the marker.
    pub(super) async fn abort(&self, e: &AgentError, engaged: &Engaged, generation: u64) {
        let listed = self.marker.read().map(|m| m.filesystems).unwrap_or_default();
        let mut left = self.marker.stuck();
        match e {
            AgentError::Step { .. } => {
                let r = self.thaw_blocking(listed.clone()).await;
                for (p, e) in &r.errors {
                    error!(mountpoint = %p.display(), error = %e, "cannot thaw after a failed freeze step");
                }
                left = super::thaw::still_frozen(&listed, &r);
            }
            AgentError::Freeze(engine::FreezeError::Failed { thaw_errors, .. }) => {
                for f in listed.iter().filter(|f| thaw_errors.iter().any(|(p, _)| *p == f.mount_point)) {
                    if !left.iter().any(|l| l.mount_point == f.mount_point) {
                        left.push(f.clone());
                    }
                }
            }
            _ => {}
        }
        self.release(engaged, generation, ThawReason::Aborted).await;
        // Only freeze() moves the lifecycle out of Freezing, and it holds the op lock.
        if let Err(t) = self.lock().life.freeze_failed() {
            error!(error = %t, "freeze failed in an unexpected state");
        }
        self.marker.settle(left);
        self.emit(Event::NotFrozen(None));
        // As `&dyn Error`, the log line carries its sources too.
        warn!(error = e as &dyn std::error::Error, "freeze failed; nothing is left frozen");
    }

    /// The pipeline. Records in `engaged` what must be released if a later step fails.
    async fn pipeline(
        self: &Arc<Self>,
        req: &FreezeRequest,
        freeze_id: u64,
        deadline: tokio::time::Instant,
        engaged: &mut Engaged,
        prepared: Option<Prepared>,
    ) -> Result<(Vec<FrozenFs>, FreezeReport), AgentError> {
        let clock = Arc::new(StepClock::new(Instant::now()));
        let app_policy = req.app_failure.unwrap_or(self.cfg.app_failure);
        let hook_list = hooks::discover(&self.cfg.hooks_dirs);
        clock.mark("hooks-found");

        let apps = self.apps.as_ref().filter(|a| a.count() > 0);
        let (planning, app_reports) = match prepared {
            // Planned and PREPAREd ahead: the mount table re-read (planned again only if it
            // changed), then straight to FREEZE.
            Some(p) => {
                engaged.apps = p.asked.clone();
                let mut kept = Some((p.mountinfo, p.plan));
                let planning = {
                    let (me, req, clock) = (self.clone(), req.clone(), clock.clone());
                    Planning::Later(Box::new(move || {
                        let plan = me.recheck_plan(&mut kept, &req)?;
                        clock.mark("plan-checked");
                        Ok((plan, clock.since_start()))
                    }))
                };
                match apps {
                    Some(apps) if !p.prep.is_empty() => {
                        let (plan, took) = tokio::task::spawn_blocking(move || planning.resolve())
                            .await
                            .map_err(AgentError::step("plan"))??;
                        let out =
                            self.freeze_apps(apps.as_ref(), p.prep, freeze_id, deadline, app_policy, &clock).await?;
                        (Planning::Made(plan, took), out)
                    }
                    _ => (planning, Vec::new()),
                }
            }
            None => {
                let planning = {
                    let (me, req, clock) = (self.clone(), req.clone(), clock.clone());
                    Planning::Later(Box::new(move || {
                        let plan = me.checked_plan(&req)?;
                        clock.mark("planned");
                        Ok((plan, clock.since_start()))
                    }))
                };
                // Apps, if any: PREPARE beside planning, FREEZE once the plan stands.
                match apps {
                    Some(apps) => {
                        self.hold_apps(apps.as_ref(), planning, freeze_id, deadline, app_policy, engaged, &clock)
                            .await?
                    }
                    None => (planning, Vec::new()),
                }
            }
        };

        // Hooks, marker, FIFREEZE on one blocking thread (planning too, if still to do).
        let staged = {
            let (me, hook_list, clock) = (self.clone(), hook_list.clone(), clock.clone());
            tokio::task::spawn_blocking(move || {
                let (plan, plan_took) = planning.resolve()?;
                let fs = me.fs_stage(&plan, &hook_list, app_policy, &clock);
                Ok::<_, AgentError>((plan, plan_took, fs))
            })
            .await
        };
        let (plan, plan_took, fs) = match staged {
            Ok(Ok(done)) => done,
            // Planning failed: no hook ran, nothing to release.
            Ok(Err(e)) => return Err(e),
            Err(join) => {
                // The hooks may have run: their thaw phase runs (the lesser harm).
                engaged.hooks = hook_list;
                return Err(AgentError::step("filesystem")(join));
            }
        };
        engaged.hooks = hook_list;
        let FsStage { frozen, timings, hook_runs } = fs?;
        debug!(at_ms = ms(clock.since_start()), "filesystems frozen");

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
            elapsed_ms: ms(clock.since_start()),
            plan_ms: ms(plan_took),
            consistency: if took_part && all_held { "application" } else { "filesystem" },
            mounts,
            apps: app_reports,
            hooks: hook_runs,
            steps: clock.report(),
        };
        Ok((frozen, report))
    }

    /// The app stage: PREPARE to every registered app while the plan is made on a blocking
    /// thread, then FREEZE to those ready; the merged report per app.
    #[allow(clippy::too_many_arguments)]
    async fn hold_apps(
        &self,
        apps: &dyn AppCoordinator,
        planning: Planning,
        freeze_id: u64,
        deadline: tokio::time::Instant,
        app_policy: AppFailurePolicy,
        engaged: &mut Engaged,
        clock: &StepClock,
    ) -> Result<(Planning, Vec<AppReport>), AgentError> {
        let making = tokio::task::spawn_blocking(move || planning.resolve());
        let prep = apps.prepare(freeze_id, self.cfg.app_prepare_deadline()).await;
        clock.mark("apps-prepared");
        engaged.apps = prep.iter().filter(|r| r.outcome != Answer::Disconnected).map(|r| r.app_id).collect();
        let (plan, plan_took) = making.await.map_err(AgentError::step("plan"))??;
        let out = self.freeze_apps(apps, prep, freeze_id, deadline, app_policy, clock).await?;
        Ok((Planning::Made(plan, plan_took), out))
    }

    /// FREEZE to the apps that answered PREPARE ready; the merged report per app.
    async fn freeze_apps(
        &self,
        apps: &dyn AppCoordinator,
        prep: Vec<AppReport>,
        freeze_id: u64,
        deadline: tokio::time::Instant,
        app_policy: AppFailurePolicy,
        clock: &StepClock,
    ) -> Result<Vec<AppReport>, AgentError> {
        let ready: Vec<u64> = prep.iter().filter(|r| r.outcome == Answer::Ready).map(|r| r.app_id).collect();
        if app_policy == AppFailurePolicy::Fail {
            if let Some(bad) = prep.iter().find(|r| r.outcome != Answer::Ready) {
                return Err(AgentError::AppFailed(describe_app(bad, "PREPARE")));
            }
        }
        let max_hold = deadline.saturating_duration_since(tokio::time::Instant::now());
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
        debug!(apps = out.len(), at_ms = ms(clock.since_start()), "apps answered");
        Ok(out)
    }

    /// The filesystem stage: freeze hooks, marker, FIFREEZE (blocking).
    fn fs_stage(
        &self,
        plan: &Plan,
        hook_list: &[PathBuf],
        app_policy: AppFailurePolicy,
        clock: &StepClock,
    ) -> Result<FsStage, AgentError> {
        clock.mark("fs-step");
        if !hook_list.is_empty() {
            // Before the freeze hooks: a vssd killed while they run leaves the next start the
            // thaw hooks to run (the marker's filesystems come later, before FIFREEZE).
            self.marker
                .write(&[], hook_list, false)
                .map_err(|source| AgentError::Marker { dir: self.cfg.state_dir.clone(), source })?;
        }
        let hook_runs = hooks::run(hook_list, "freeze", self.cfg.hook_deadline());
        if !hook_list.is_empty() {
            clock.mark("hooks-ran");
        }
        if app_policy == AppFailurePolicy::Fail {
            if let Some(bad) = hook_runs.iter().find(|r| r.outcome != HookOutcome::Ok) {
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
        // Expedited grace periods only around the FIFREEZE calls (the knob is system-wide;
        // the guard puts it back on drop too, should this thread unwind).
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
        let result = engine::freeze(&self.kernel, plan);
        clock.mark("filesystems-frozen");
        if let Some(g) = expedite {
            if let Err(e) = g.restore() {
                warn!(error = %e, "cannot turn expedited RCU grace periods off again");
            }
        }
        let (frozen, timings) = result?;
        Ok(FsStage { frozen, timings, hook_runs })
    }
}
