//! Test fixtures shared by the service's tests and the Hyper-V channel's: scripted apps and an
//! agent over a mount table of the test's own (the config's `mountinfo` and `sysfs` paths are
//! the seam), with no root needed.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use appvss_proto::ThawReason;

use super::{AppCoordinator, BoxFuture};
use crate::apps::{Answer, AppReport, PhaseResult};
use crate::config::Config;

/// Apps that answer as scripted and log what they were asked (`prepare ID`,
/// `freeze [APPS] ID`, `thaw [APPS] ID REASON`).
pub(crate) struct FakeApps {
    /// The registered apps; a test may change them (an app leaves, another registers).
    pub ids: Mutex<Vec<u64>>,
    pub prepare: Answer,
    /// Answers for the next PREPAREs, in order, before `prepare` again.
    pub prepare_next: Mutex<std::collections::VecDeque<Answer>>,
    pub freeze: Answer,
    pub prepare_takes: Duration,
    pub log: Mutex<Vec<String>>,
}

impl FakeApps {
    /// Apps `ids` that say ready at PREPARE and hold at FREEZE, at once.
    pub fn new(ids: &[u64]) -> FakeApps {
        FakeApps {
            ids: Mutex::new(ids.to_vec()),
            prepare: Answer::Ready,
            prepare_next: Mutex::default(),
            freeze: Answer::Held,
            prepare_takes: Duration::ZERO,
            log: Mutex::new(vec![]),
        }
    }
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// One report per app, all with `outcome`.
pub(crate) fn reports(ids: &[u64], outcome: Answer) -> PhaseResult {
    ids.iter()
        .map(|&app_id| AppReport {
            app_id,
            name: format!("app{app_id}"),
            uid: 0,
            pid: None,
            outcome,
            reason: None,
            prepare_ms: None,
            freeze_ms: None,
        })
        .collect()
}

impl AppCoordinator for FakeApps {
    fn count(&self) -> usize {
        self.ids.lock().unwrap().len()
    }
    fn ids(&self) -> Vec<u64> {
        let mut ids = self.ids.lock().unwrap().clone();
        ids.sort_unstable();
        ids
    }
    fn prepare(&self, freeze_id: u64, _: Duration) -> BoxFuture<'_, PhaseResult> {
        Box::pin(async move {
            self.log.lock().unwrap().push(format!("prepare {freeze_id}"));
            tokio::time::sleep(self.prepare_takes).await;
            let answer = self.prepare_next.lock().unwrap().pop_front().unwrap_or(self.prepare);
            let ids = self.ids.lock().unwrap().clone();
            reports(&ids, answer)
        })
    }
    fn freeze<'a>(&'a self, apps: &'a [u64], freeze_id: u64, _: Duration, _: Duration) -> BoxFuture<'a, PhaseResult> {
        Box::pin(async move {
            self.log.lock().unwrap().push(format!("freeze {apps:?} {freeze_id}"));
            reports(apps, self.freeze)
        })
    }
    fn thaw(&self, apps: &[u64], freeze_id: u64, reason: ThawReason) {
        self.log.lock().unwrap().push(format!("thaw {apps:?} {freeze_id} {reason:?}"));
    }
    fn list(&self) -> Vec<serde_json::Value> {
        vec![]
    }
}

/// A config over three freezable filesystems, /s/a (ext4) /s/b (xfs) /s/c (ext4), one level,
/// and a vfat /s/vfat that cannot freeze (skipped by default); state in `dir`, no hooks.
pub(crate) fn config(dir: &Path, deadline: Duration) -> Config {
    let mi = dir.join("mountinfo");
    std::fs::write(
        &mi,
        "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n\
         12 1 7:2 / /s/c rw - ext4 /dev/loop2 rw\n13 1 7:3 / /s/vfat rw - vfat /dev/loop3 rw\n",
    )
    .unwrap();
    Config {
        scope: "/s".into(),
        mountinfo: mi,
        sysfs: dir.join("sys"),
        state_dir: dir.join("state"),
        hooks_dirs: vec![],
        freeze_deadline: deadline.as_secs_f64(),
        ..Config::default()
    }
}
