//! QEMU's side of a backup's copy: the block jobs and target nodes vmctl attaches, waiting
//! for the jobs, and cleaning up after a failure or after a vmctl that died.
//!
//! Invariants:
//! - Every job and node vmctl attaches is named `vmctl-*` and removed on every path
//!   ([`Attached::cleanup`]); with the VM's operation lock held, any left in QEMU are a dead
//!   vmctl's.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use super::disks::SourceDisk;
use super::manifest::list;
use super::{BackupError, BackupRequest};
use crate::qmp::{Qmp, QmpError};
use crate::util;

/// Target nodes attached to QEMU, removed on every path.
pub(crate) struct Attached {
    pub(crate) nodes: Vec<String>,
    pub(crate) jobs: Vec<String>,
}

impl Attached {
    pub(crate) fn cleanup(&mut self, qmp: &mut Qmp) {
        for j in self.jobs.drain(..) {
            let _ = qmp.execute("job-cancel", Some(json!({"id": j})));
            // A cancelled job must conclude before it can be dismissed.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match qmp.execute("job-dismiss", Some(json!({"id": j}))) {
                    Ok(_) => break,
                    Err(QmpError::Command { desc, .. }) if desc.contains("not found") => break,
                    Err(QmpError::Command { .. }) => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => return,
                }
            }
        }
        for n in self.nodes.drain(..) {
            if let Err(e) = qmp.execute("blockdev-del", Some(json!({"node-name": n}))) {
                if e.is_closed() {
                    return;
                }
            }
        }
    }
}
/// Removes `.partial-*` directories a vmctl killed mid-backup left in the target (the target
/// lock is held: no live vmctl is writing them).
pub(crate) fn remove_partials(target: &Path) {
    let Ok(l) = list(target) else { return };
    for d in l.leftovers {
        warn!("removing {}, left by a vmctl that did not finish", d.display());
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Block jobs and target nodes named by vmctl that are still in QEMU while the VM lock is
/// held belong to a vmctl that died mid-backup (killed, or the host rebooted under it). A job
/// it left could be throttled to nothing (jobs start held until the thaw) and would block
/// the next job of the same name: cancel them and detach their targets.
pub(crate) fn clean_up_after_a_dead_vmctl(qmp: &mut Qmp) -> Result<(), BackupError> {
    let jobs: Vec<String> = qmp
        .execute("query-jobs", None)?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str())
        .filter(|id| id.starts_with("vmctl-"))
        .map(String::from)
        .collect();
    let nodes: Vec<String> = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("vmctl-target-"))
        .map(String::from)
        .collect();
    if jobs.is_empty() && nodes.is_empty() {
        return Ok(());
    }
    warn!("an earlier vmctl did not finish its backup: cancelling its jobs {jobs:?}, detaching {nodes:?}");
    Attached { nodes, jobs }.cleanup(qmp);
    Ok(())
}

/// A guest write that copy-before-write could not copy (the target is full) fails, and a
/// virtio disk's default `werror=enospc` pauses the VM on it. Once the backup job and its
/// filter are gone the write can go through: resume the VM if we paused it that way (never a
/// VM that was paused before the backup). True when it was resumed.
pub(crate) fn resume_after_io_error(qmp: &mut Qmp, was_running: bool) -> bool {
    if !was_running {
        return false;
    }
    // The pause comes a little after the failed write (QEMU stops the VM from a bottom half),
    // so watch for a moment rather than look once.
    let mut resumed = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match qmp.execute("query-status", None) {
            Ok(st) if st["status"] == "io-error" => resumed |= qmp.execute("cont", None).is_ok(),
            Ok(_) => {}
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    resumed
}

/// Waits for every job to conclude, with a progress bar. Returns the bytes each copied.
pub(crate) fn wait_jobs(
    req: &BackupRequest,
    qmp: &mut Qmp,
    disks: &[SourceDisk],
    jobs: &[String],
) -> Result<Vec<u64>, BackupError> {
    let bar = if req.progress {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} copying {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut logged = t0;
    let result = loop {
        let list = qmp.execute("query-jobs", None)?;
        let mut done = 0;
        let (mut cur, mut tot) = (0u64, 0u64);
        let mut failed: Option<(String, String)> = None;
        let mut copied = vec![0u64; jobs.len()];
        for (i, j) in jobs.iter().enumerate() {
            let Some(info) = list.as_array().into_iter().flatten().find(|x| x["id"] == j.as_str()) else {
                failed = Some((disks[i].name.clone(), "the job vanished".into()));
                continue;
            };
            cur += info["current-progress"].as_u64().unwrap_or(0);
            tot += info["total-progress"].as_u64().unwrap_or(0);
            copied[i] = info["current-progress"].as_u64().unwrap_or(0);
            if info["status"] == "concluded" || info["status"] == "null" {
                done += 1;
                if let Some(err) = info["error"].as_str() {
                    failed.get_or_insert((disks[i].name.clone(), err.to_string()));
                }
            }
        }
        if let Some(b) = &bar {
            b.set_length(tot);
            b.set_position(cur);
        }
        if done == jobs.len() || logged.elapsed() >= Duration::from_millis(500) {
            logged = Instant::now();
            info!(
                "copy: {} of {} ({:.0}%), {done}/{} job(s) concluded, {:.1} s",
                util::human_bytes(cur),
                util::human_bytes(tot),
                if tot > 0 { cur as f64 * 100.0 / tot as f64 } else { 100.0 },
                jobs.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        if let Some((disk, detail)) = failed {
            if detail.contains("No space left") || detail.contains("quota") {
                break Err(BackupError::TargetFull { dir: req.target.display().to_string(), detail });
            }
            break Err(BackupError::JobFailed { disk, detail });
        }
        if done == jobs.len() {
            break Ok(copied);
        }
        let _ = qmp.wait_event(Duration::from_millis(200), |e| e.name == "JOB_STATUS_CHANGE")?;
        qmp.take_events();
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// Writes the targets back to disk while QEMU is still copying into them: a thread per file
/// runs `fdatasync` again and again, so the disk writes what the job has put in the page
/// cache so far instead of all of it after the copy, and the fsync that makes the backup
/// durable (still done in full before the manifest exists) has only the tail left. The pages
/// stay cached, so the checksum after the copy still reads from memory. Stopped on drop.
pub(crate) struct Writeback {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writeback {
    /// Starts following `files` (targets already created). A file that cannot be opened is
    /// skipped: the final fsync opens it again and reports the error.
    pub(crate) fn start(files: &[std::path::PathBuf]) -> Writeback {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = files
            .iter()
            .filter_map(|p| {
                let f = std::fs::File::open(p).ok()?;
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("vmctl-writeback".into())
                    .spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let t = Instant::now();
                            if f.sync_data().is_err() {
                                return;
                            }
                            // Nothing was dirty: do not spin on the disk's cache flush.
                            if t.elapsed() < Duration::from_millis(20) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Writeback { stop, threads }
    }

    /// Tells the threads to stop after the fdatasync each is in, without waiting for them:
    /// what they still write back, the final fsync would have to.
    pub(crate) fn signal(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops the threads and waits for them.
    pub(crate) fn stop(&mut self) {
        self.signal();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop();
    }
}
