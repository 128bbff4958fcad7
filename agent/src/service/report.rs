//! What the agent tells about its work: freeze and thaw reports, the record of a thaw vssd
//! did by itself, and the step clock that says where a slow freeze spent its time.
//!
//! Plain data and small helpers only: nothing here takes a lock or touches a filesystem, so
//! building a report can never delay a thaw.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::apps::{Answer, AppReport};
use crate::engine::{self, AutoThawReason};
use crate::hooks::HookRun;
use crate::plan::{self, Outcome};

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
pub(super) struct StepClock {
    t0: Instant,
    marks: std::sync::Mutex<Vec<(&'static str, f64)>>,
}

impl StepClock {
    pub(super) fn new(t0: Instant) -> Self {
        StepClock { t0, marks: std::sync::Mutex::new(Vec::new()) }
    }
    pub(super) fn mark(&self, step: &'static str) {
        let at = ms(self.t0.elapsed());
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).push((step, at));
    }
    pub(super) fn since_start(&self) -> Duration {
        self.t0.elapsed()
    }
    pub(super) fn report(&self) -> StepTimes {
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

impl AutoThaw {
    pub(super) fn new(reason: AutoThawReason, frozen_for: Duration, r: &engine::ThawReport) -> AutoThaw {
        AutoThaw {
            reason,
            at_unix_ms: unix_ms(SystemTime::now()),
            frozen_for_ms: frozen_for.as_millis() as u64,
            thawed: r.thawed.iter().map(|p| p.display().to_string()).collect(),
            errors: thaw_errors(r),
        }
    }
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

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Milliseconds with microsecond resolution, as every report gives them.
pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One line on why an app does not hold a freeze, for an error under the `fail` policy.
pub(super) fn describe_app(r: &AppReport, phase: &str) -> String {
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

pub(super) fn thaw_errors(r: &engine::ThawReport) -> Vec<ThawError> {
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
