//! Thawing, whoever asks: the host (`thaw`), vssd itself when a timer or a stop ends a freeze
//! (`auto_thaw`, `shutdown`), and a new vssd that finds a dead one's marker (`recover`).
//!
//! Invariants: filesystems thaw first (writers wait on them), then apps get THAW and the thaw
//! hooks run; every thaw runs to the end and reports every error; the marker is settled
//! last: it keeps what could not be thawed (and every later thaw retries it), so a FITHAW that
//! failed is never forgotten by a vssd that dies afterwards. An auto-thaw acts only on the freeze generation it was armed for and leaves a notice
//! that the host's next thaw reports once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appvss_proto::ThawReason;
use tracing::{error, info, warn};

use super::report::{ms, thaw_errors, AutoThaw, ThawResult};
use super::{Agent, AgentError, Engaged, Event};
use crate::engine::{self, AutoThawReason, FrozenFs};
use crate::hooks::{self, HookRun};

impl Agent {
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
        let failed = still_frozen(&still, &report);
        if !m.hooks.is_empty() {
            hooks::run(&m.hooks, "thaw", self.cfg.hook_deadline());
        }
        if m.rcu_expedited {
            let knob = kmod_shim::rcu::knob(&self.cfg.sysfs);
            if let Err(e) = kmod_shim::rcu::reset(&knob) {
                warn!(knob = %knob.display(), error = %e, "cannot turn expedited RCU grace periods off");
            }
        }
        let rec = AutoThaw::new(AutoThawReason::RecoveredAfterCrash, Duration::ZERO, &report);
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
        self.marker.settle(failed);
    }

    /// Releases apps (THAW, never awaited) and runs the thaw hooks, after the filesystems
    /// are thawed (or were never frozen).
    pub(super) async fn release(&self, engaged: &Engaged, freeze_id: u64, reason: ThawReason) -> Vec<HookRun> {
        if let Some(apps) = &self.apps {
            if !engaged.apps.is_empty() {
                apps.thaw(&engaged.apps, freeze_id, reason);
            }
        }
        if engaged.hooks.is_empty() {
            return vec![];
        }
        let hooks: Vec<PathBuf> = engaged.hooks.clone();
        let deadline = self.cfg.hook_deadline();
        match tokio::task::spawn_blocking(move || hooks::run(&hooks, "thaw", deadline)).await {
            Ok(runs) => runs,
            Err(e) => {
                error!(error = &e as &dyn std::error::Error, "the thaw hooks' thread failed");
                vec![]
            }
        }
    }

    /// Thaws on the host's request. Reports the auto-thaw notice once, as an error, when vssd
    /// had already thawed by itself since the last freeze.
    pub async fn thaw(self: &Arc<Self>) -> Result<ThawResult, AgentError> {
        let start = Instant::now();
        let _op = self.op.lock().await;
        // A thaw ends a freeze that was announced and never came, too.
        self.cancel_prepared("a thaw");
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
        if state.is_some() {
            self.emit(Event::Thawing);
        }
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
        let targets = with_stuck(&state.filesystems, self.marker.stuck());
        let report = self.thaw_blocking(targets.clone()).await;
        let fs_thaw_ms = ms(start.elapsed());
        let engaged = Engaged { apps: state.apps.clone(), hooks: state.hooks.clone() };
        let hook_runs = self.release(&engaged, state.generation, ThawReason::Completed).await;
        self.lock().life.thaw_done()?;
        self.marker.settle(still_frozen(&targets, &report));
        info!(
            thawed = report.thawed.len(),
            frozen_ms = state.since.elapsed().as_millis() as u64,
            fs_thaw_ms,
            elapsed_ms = ms(start.elapsed()),
            "thawed"
        );
        let result = ThawResult {
            thawed: report.thawed.len(),
            errors: thaw_errors(&report),
            apps: state.apps.len(),
            hooks: hook_runs,
            fs_thaw_ms,
            elapsed_ms: ms(start.elapsed()),
        };
        self.emit(Event::Thawed(Arc::new(result.clone())));
        if !result.errors.is_empty() {
            let msg: Vec<String> = result.errors.iter().map(|e| format!("{}: {}", e.mountpoint, e.error)).collect();
            return Err(AgentError::ThawErrors(msg.join("; ")));
        }
        Ok(result)
    }

    /// FITHAW of `fs` on a blocking thread. Should that thread die, every filesystem is
    /// reported as an error: it may still be frozen.
    pub(super) async fn thaw_blocking(&self, fs: Vec<FrozenFs>) -> engine::ThawReport {
        let kernel = self.kernel.clone();
        let all: Vec<PathBuf> = fs.iter().map(|f| f.mount_point.clone()).collect();
        match tokio::task::spawn_blocking(move || engine::thaw(&kernel, &fs)).await {
            Ok(r) => r,
            Err(e) => {
                error!(error = &e as &dyn std::error::Error, "the thaw thread failed");
                let errors = all
                    .into_iter()
                    .map(|p| (p, std::io::Error::other(format!("the thaw thread failed: {e}"))))
                    .collect();
                engine::ThawReport { thawed: vec![], errors }
            }
        }
    }

    /// Thaws by itself if freeze `generation` is still in force.
    pub async fn auto_thaw(self: &Arc<Self>, generation: u64, reason: AutoThawReason) {
        let _op = self.op.lock().await;
        self.thaw_by_itself(Some(generation), reason).await;
    }

    /// Thaws whatever is frozen because vssd is stopping; a freeze still in progress is
    /// waited for (under the same operation lock), then thawed.
    pub async fn shutdown(self: &Arc<Self>) {
        let _op = self.op.lock().await;
        self.cancel_prepared("vssd is stopping");
        self.thaw_by_itself(None, AutoThawReason::Shutdown).await;
    }

    /// The auto-thaw, under the operation lock the caller holds: of freeze `generation`
    /// only, or (None) of whatever is frozen.
    async fn thaw_by_itself(&self, generation: Option<u64>, reason: AutoThawReason) {
        let state = {
            let mut inner = self.lock();
            match inner.life.frozen() {
                Some(s) if generation.is_none() || generation == Some(s.generation) => {}
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
        self.emit(Event::Thawing);
        let frozen_for = state.since.elapsed();
        let targets = with_stuck(&state.filesystems, self.marker.stuck());
        let report = self.thaw_blocking(targets.clone()).await;
        let engaged = Engaged { apps: state.apps.clone(), hooks: state.hooks.clone() };
        self.release(&engaged, state.generation, ThawReason::Timeout).await;
        let rec = AutoThaw::new(reason, frozen_for, &report);
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
        inner.last_auto_thaw = Some(rec.clone());
        drop(inner);
        self.marker.settle(still_frozen(&targets, &report));
        self.emit(Event::AutoThawed(Arc::new(rec)));
    }
}

/// This freeze's filesystems and those an earlier thaw left stuck (retried by every thaw).
pub(super) fn with_stuck(frozen: &[FrozenFs], stuck: Vec<FrozenFs>) -> Vec<FrozenFs> {
    let mut all = frozen.to_vec();
    all.extend(stuck.into_iter().filter(|s| !frozen.iter().any(|f| f.mount_point == s.mount_point)));
    all
}

/// The filesystems of `tried` whose FITHAW failed: they may still be frozen.
pub(super) fn still_frozen(tried: &[FrozenFs], report: &engine::ThawReport) -> Vec<FrozenFs> {
    tried.iter().filter(|f| report.errors.iter().any(|(p, _)| *p == f.mount_point)).cloned().collect()
}
