//! What a checkpoint create that dies mid-way leaves behind, and its repair.
//!
//! Between its freeze and its `cont`, `checkpoint create` holds the VM stopped (or, for a live
//! save, paused at QEMU's switchover) and the guest frozen. A vmctl killed there leaves both:
//! QEMU never resumes by itself, and a stopped guest's vssd cannot run its own deadline. So
//! create writes `VMDIR/checkpoint-in-flight.json` (its pid, whether it must resume the VM,
//! whether it froze the guest) before it stops anything, and removes it on every way out that
//! it lives to see (the migration's bandwidth cap it lifted stays lifted: the next create
//! saves and restores whatever it finds). The next vmctl command on that VM that finds the file with its writer dead
//! ([`recover`]) cancels the migration, resumes the VM, thaws the guest and removes the file.
//! The half-made checkpoint stays a leftover (`checkpoint list` names it, `destroyall` removes
//! it); the VM goes on from its current state, as after any checkpoint.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::migrate::{cont_when_finalized, set_pause_before_switchover};
use crate::vm::Vm;

/// The record's file name, in the VM's directory.
pub const FILE: &str = "checkpoint-in-flight.json";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    pid: i32,
    /// The VM ran before the create: it must run again.
    resume: bool,
    /// The create froze the guest: it must be thawed.
    frozen: bool,
}

/// The record of a create in flight; removed when dropped (every way out but a kill).
pub(crate) struct InFlight {
    path: PathBuf,
}

impl InFlight {
    /// Writes the record for this process, before the VM is stopped.
    pub(crate) fn begin(vm: &Vm, resume: bool, frozen: bool) -> std::io::Result<InFlight> {
        let path = vm.dir.join(FILE);
        let rec = Record { pid: std::process::id() as i32, resume, frozen };
        crate::util::write_atomic(&path, &serde_json::to_vec(&rec).unwrap_or_default())?;
        Ok(InFlight { path })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Repairs what a dead checkpoint create left (see the module); returns what was done, or
/// None when there was nothing to repair (no record, or its vmctl still runs).
pub fn recover(vm: &Vm) -> Option<String> {
    let path = vm.dir.join(FILE);
    let rec: Record = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    if rec.pid == std::process::id() as i32 || crate::vm::alive(rec.pid) {
        return None;
    }
    let mut done = Vec::new();
    if vm.pid().is_some() {
        match vm.qmp(Duration::from_secs(10)) {
            Ok(mut qmp) => {
                let migrating = qmp
                    .execute("query-migrate", None)
                    .ok()
                    .and_then(|m| m["status"].as_str().map(String::from))
                    .is_some_and(|s| !matches!(s.as_str(), "completed" | "failed" | "cancelled" | "none"));
                if migrating {
                    let _ = qmp.execute("migrate_cancel", None);
                    done.push("cancelled its migration");
                }
                let _ = set_pause_before_switchover(&mut qmp, false);
                let status = qmp.execute("query-status", None).ok();
                let status = status.as_ref().and_then(|s| s["status"].as_str()).unwrap_or("");
                if rec.resume && status != "running" {
                    match cont_when_finalized(&mut qmp) {
                        Ok(()) => done.push("resumed the VM"),
                        Err(e) => tracing::warn!("could not resume the VM after a dead checkpoint create: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("cannot reach QEMU to repair a dead checkpoint create: {e}"),
        }
        if rec.frozen && vm.config.agent {
            match crate::quiesce::thaw_restored(&vm.agent_path(), Duration::from_secs(30)) {
                Ok(_) => done.push("thawed the guest"),
                Err(e) => tracing::warn!("could not thaw the guest after a dead checkpoint create: {e}"),
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    let what = if done.is_empty() { "nothing to undo".to_string() } else { done.join(", ") };
    Some(format!("a checkpoint create (vmctl pid {}) died mid-way: {what}", rec.pid))
}
