//! Taking a backup: everything slow before the freeze (disks, targets, the agent on its own
//! thread), then freeze → one QMP transaction → thaw, the copy while the guest runs, and
//! fsync + checksums + the manifest last. See the parent module for the whole flow.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tracing::{debug, info};

use super::disks::{parent_disk, query_disks, SourceDisk};
use super::jobs::{
    clean_up_after_a_dead_vmctl, remove_partials, resume_after_io_error, wait_jobs, Attached, Writeback,
};
use super::manifest::{list, Manifest, ManifestDisk, QuiesceReport, FORMAT, MANIFEST};
use super::{io_err, step, BackupError, BackupOutcome, BackupRequest, Consistency, BITMAP_PREFIX, HELD_SPEED};
use crate::hash;
use crate::oplock::OpLock;
use crate::qga::{AgentInfo, Qga, QgaError};
use crate::qmp::Qmp;
use crate::quiesce::{self, Quiesce, QuiesceError};
use crate::timings::Timings;
use crate::util;

/// The agent, connected, resynchronised and identified; or why not; and how long it took.
type AgentReady = (Result<(Qga, AgentInfo), QuiesceError>, f64);

/// Connects to the agent, resynchronises and asks `guest-info` on a thread of its own: these
/// are round trips through the guest that need nothing from QMP, so they run while the
/// targets are prepared instead of after. None when the backup does not quiesce.
fn spawn_agent(req: &BackupRequest) -> Option<std::thread::JoinHandle<AgentReady>> {
    if req.quiesce == Quiesce::Off {
        return None;
    }
    let path = req.agent.clone()?;
    let timeout = req.agent_timeout;
    std::thread::Builder::new()
        .name("vmctl-agent".into())
        .spawn(move || {
            let t = Instant::now();
            let r = quiesce::connect(&path, timeout).map(|(g, i)| quiesce::prepare(g, i, timeout));
            let ms = util::ms(t.elapsed());
            match &r {
                Ok((_, i)) => info!("agent answered: {} (connect, resync, guest-info: {ms:.1} ms)", i.describe()),
                Err(e) => info!("agent not usable after {ms:.1} ms: {}", util::error_chain(e)),
            }
            (r, ms)
        })
        .ok()
}

/// Takes a backup. See the module's description for the flow.
pub fn run(req: &BackupRequest) -> Result<BackupOutcome, BackupError> {
    let t_start = Instant::now();
    info!(
        "{} backup of `{}` into {}",
        if req.incremental { "incremental" } else { "full" },
        req.vm_name,
        req.target.display()
    );
    // Backed-up disks are owner-only whatever the umask: the target, each backup's directory,
    // the images qemu-img creates and the manifest (see `vm::private_umask`).
    let _umask = crate::vm::private_umask();
    crate::vm::create_private_dir(&req.target)
        .map_err(io_err(format!("cannot create the target {}", req.target.display())))?;
    let target = std::fs::canonicalize(&req.target).map_err(io_err("bad target"))?;
    // One backup at a time per target directory.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join(".lock"))
        .map_err(io_err("cannot create the target's lock file"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| BackupError::Busy(target.display().to_string()))?;
    // One backup at a time per VM too: the jobs' names are per VM, and with this lock held
    // whatever vmctl left in QEMU or in the target is from a vmctl that died.
    let _vm_lock = OpLock::take(&req.qmp, &req.vm_name, "backup")?;
    remove_partials(&target);
    // Only once the target is ours: QEMU's agent chardev serves one client at a time.
    let agent = spawn_agent(req);

    let mut qmp = Qmp::connect(&req.qmp, Duration::from_secs(10))?;
    let (maj, min, mic) = qmp.version();
    let qemu_version = format!("{maj}.{min}.{mic}");
    info!("QMP connected: QEMU {qemu_version}");
    clean_up_after_a_dead_vmctl(&mut qmp)?;
    let disks = query_disks(&mut qmp)?;
    for d in &disks {
        debug!(
            "disk `{}`: node {}, {} {}, {} virtual, bitmaps {:?}",
            d.name,
            d.node,
            d.format,
            d.file,
            util::human_bytes(d.virtual_size),
            d.bitmaps.iter().map(|b| &b.0).collect::<Vec<_>>()
        );
    }

    // The parent, for incrementals: the newest complete backup whose bitmap every disk still has.
    let parent = if req.incremental {
        let existing = list(&target)?.good;
        let Some((pdir, pm)) = existing.iter().rev().find(|(_, m)| m.vm == req.vm_name) else {
            return Err(BackupError::NoParent(format!(
                "no earlier backup of `{}` in {}",
                req.vm_name,
                target.display()
            )));
        };
        for d in &disks {
            let Some(md) = parent_disk(pm, d, &disks) else {
                return Err(BackupError::NoParent(format!("disk `{}` is not in backup {}", d.name, pm.id)));
            };
            let Some(bm) = &md.bitmap else {
                return Err(BackupError::NoParent(format!(
                    "disk `{}` is {}, which has no persistent bitmaps (qcow2 has)",
                    d.name, d.format
                )));
            };
            match d.bitmaps.iter().find(|(n, _, _)| n == bm) {
                // Only on an image below the top: it saw nothing written to the overlays
                // above it (QEMU looks for a backup's bitmap on the node it reads, nowhere else).
                None if d.backing_bitmaps.contains(bm) => {
                    return Err(BackupError::NoParent(format!(
                        "the dirty bitmap `{bm}` of disk `{}` is only on a backing image below the running overlay {}, so it did not see the writes since that overlay was made (a checkpoint restored, or taken by an older vmctl)",
                        d.name, d.file
                    )))
                }
                None => {
                    return Err(BackupError::NoParent(format!(
                        "disk `{}` has no dirty bitmap `{bm}` (QEMU restarted without a clean shutdown, or a newer backup went elsewhere)",
                        d.name
                    )))
                }
                Some((_, _, false)) => {
                    return Err(BackupError::NoParent(format!("the dirty bitmap `{bm}` of disk `{}` is inconsistent (QEMU was killed)", d.name)))
                }
                Some(_) => {}
            }
        }
        info!("parent: {}", pm.id);
        Some((pdir.clone(), pm.clone()))
    } else {
        None
    };

    let now = SystemTime::now();
    let (created, stamp) = util::timestamps(now);
    let id = format!("{}-{stamp}-{}", req.vm_name, if parent.is_some() { "inc" } else { "full" });
    let bitmap_name = format!("{BITMAP_PREFIX}{id}");

    // Room for it?
    let need: u64 = disks
        .iter()
        .map(|d| match &parent {
            Some((_, pm)) => {
                let bm = parent_disk(pm, d, &disks).and_then(|x| x.bitmap.clone()).unwrap_or_default();
                d.bitmaps.iter().find(|(n, _, _)| *n == bm).map(|b| b.1).unwrap_or(d.virtual_size)
            }
            None => d.actual_size.min(d.virtual_size.max(d.actual_size)),
        })
        .sum::<u64>();
    let need = need + need / 10 + (4 << 20);
    let free = util::free_bytes(&target).map_err(io_err("cannot stat the target"))?;
    if !req.skip_space_check && free < need {
        return Err(BackupError::NoSpace {
            dir: target.display().to_string(),
            need: util::human_bytes(need),
            free: util::human_bytes(free),
        });
    }

    let partial = target.join(format!(".partial-{id}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&partial)
    }
    .map_err(io_err(format!("cannot create {}", partial.display())))?;
    let mut attached = Attached { nodes: Vec::new(), jobs: Vec::new() };
    let was_running = qmp.execute("query-status", None)?["running"].as_bool() == Some(true);
    let ctx = Take {
        req,
        disks: &disks,
        parent: parent.as_ref(),
        partial: &partial,
        id: &id,
        bitmap_name: &bitmap_name,
        t_start,
    };
    let result = take(&ctx, &mut qmp, &mut attached, agent);
    let (mut manifest, copied, t_finish, mut writeback) = match result {
        Ok(x) => x,
        Err(e) => {
            info!("backup failed: {e}; cleaning up");
            attached.cleanup(&mut qmp);
            // The new bitmap means nothing without its backup.
            for d in &disks {
                let _ = qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": d.node, "name": bitmap_name})));
            }
            let resumed = resume_after_io_error(&mut qmp, was_running);
            let _ = std::fs::remove_dir_all(&partial);
            let e = match e {
                BackupError::Qmp(q) if q.is_closed() => BackupError::QemuGone { stage: "while copying".into() },
                BackupError::TargetFull { dir, detail } if resumed => BackupError::TargetFull {
                    dir,
                    detail: format!(
                        "{detail}; a guest write that had to be copied first paused the VM, which was resumed"
                    ),
                },
                e => e,
            };
            return Err(e);
        }
    };
    attached.cleanup(&mut qmp);

    // The chain continues from this backup: the parent's bitmap is no longer needed. (A copy
    // that a checkpoint left in a read-only image below stays: that image is the checkpoint's.)
    if let Some((_, pm)) = &parent {
        for src in &disks {
            if let Some(bm) = parent_disk(pm, src, &disks).and_then(|d| d.bitmap.as_ref()) {
                let _ = qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": src.node, "name": bm})));
            }
        }
    }
    drop(qmp);

    let finish = (|| -> Result<(), BackupError> {
        // fsync and checksum of every file at once: the fsyncs wait for the disk (QEMU closed
        // the targets without flushing them, see `take`), the checksums for the CPU.
        info!("fsync and checksum of {} file(s)", manifest.disks.len());
        util::test_halt("finish");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = manifest
                .disks
                .iter()
                .map(|d| {
                    let p = partial.join(&d.file);
                    let p2 = p.clone();
                    let sync = s.spawn(move || -> Result<(u64, f64), BackupError> {
                        let t = Instant::now();
                        let f = std::fs::File::open(&p).map_err(io_err(format!("cannot open {}", p.display())))?;
                        f.sync_all().map_err(io_err(format!("fsync of {}", p.display())))?;
                        let size = f.metadata().map_err(io_err("stat"))?.len();
                        Ok((size, util::ms(t.elapsed())))
                    });
                    let hash = s.spawn(move || -> Result<(String, f64), BackupError> {
                        let t = Instant::now();
                        let h = hash::hash_file(&p2).map_err(io_err(format!("cannot read {}", p2.display())))?;
                        Ok((h, util::ms(t.elapsed())))
                    });
                    (sync, hash)
                })
                .collect();
            handles
                .into_iter()
                .map(|(a, b)| (a.join().expect("fsync thread"), b.join().expect("hash thread")))
                .collect()
        });
        for ((d, c), (sync, hash)) in manifest.disks.iter_mut().zip(copied).zip(results) {
            let (size, sync_ms) = sync?;
            let (h, hash_ms) = hash?;
            debug!("{}: {} fsynced in {sync_ms:.1} ms, BLAKE3 in {hash_ms:.1} ms", d.file, util::human_bytes(size));
            d.file_size = size;
            d.blake3 = h;
            d.copied_bytes = c;
            manifest.timings.raise(step::FSYNC, sync_ms);
            manifest.timings.raise(step::HASH, hash_ms);
        }
        manifest.created = created.clone();
        manifest.qemu_version = qemu_version.clone();
        manifest.timings.since(step::FINISH, t_finish);
        manifest.timings.since(step::TOTAL, t_start);
        let text = manifest.to_bytes();
        util::write_atomic(&partial.join(MANIFEST), &text).map_err(io_err("cannot write the manifest"))?;
        let dest = target.join(&id);
        std::fs::rename(&partial, &dest).map_err(io_err(format!(
            "cannot rename {} to {}",
            partial.display(),
            dest.display()
        )))?;
        util::fsync_dir(&target).map_err(io_err("fsync of the target"))?;
        info!("manifest written: {}", dest.display());
        Ok(())
    })();
    writeback.stop();
    if let Err(e) = finish {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(match e {
            BackupError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                BackupError::TargetFull { dir: target.display().to_string(), detail: "writing the manifest".into() }
            }
            e => e,
        });
    }
    let t = &manifest.timings;
    info!(
        "done in {:.1} ms: prepare {:.1}, agent wait {:.1}, freeze window {:.1}, copy {:.1}, finish {:.1}",
        t.get(step::TOTAL),
        t.get(step::PREPARE),
        t.get(step::AGENT_WAIT),
        t.get(step::FREEZE_WINDOW),
        t.get(step::COPY),
        t.get(step::FINISH)
    );
    Ok(BackupOutcome { dir: target.join(&id), manifest })
}

/// What `take` works on.
struct Take<'a> {
    req: &'a BackupRequest,
    disks: &'a [SourceDisk],
    parent: Option<&'a (PathBuf, Manifest)>,
    partial: &'a Path,
    id: &'a str,
    bitmap_name: &'a str,
    t_start: Instant,
}

/// Creates every target image at once (`qemu-img create` is mostly process start-up) and
/// attaches each as a QEMU node. Returns the manifest entries.
fn prepare_targets(c: &Take, qmp: &mut Qmp, attached: &mut Attached) -> Result<Vec<ManifestDisk>, BackupError> {
    let mut plan = Vec::new();
    for d in c.disks {
        let file = format!("{}.qcow2", d.name);
        let path = c.partial.join(&file);
        let backing = c.parent.map(|(pdir, pm)| {
            let pfile = parent_disk(pm, d, c.disks).map(|x| x.file.clone()).unwrap_or_else(|| file.clone());
            format!("../{}/{pfile}", pdir.file_name().unwrap().to_string_lossy())
        });
        let mut args: Vec<String> = ["create", "-q", "-f", "qcow2"].map(String::from).to_vec();
        if let Some(b) = &backing {
            args.extend(["-F".into(), "qcow2".into(), "-b".into(), b.clone()]);
        }
        args.push(path.to_str().expect("utf-8 path").to_string());
        args.push(d.virtual_size.to_string());
        let child = std::process::Command::new("qemu-img")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| BackupError::QemuImg { what: "create".into(), detail: format!("cannot run qemu-img: {e}") });
        plan.push((d, file, path, backing, child));
    }
    let mut mdisks = Vec::new();
    let mut failed = None;
    // Wait for every child, also after a failure: none is left running.
    let plan: Vec<_> = plan
        .into_iter()
        .map(|(d, file, path, backing, child)| {
            let r = child.and_then(|ch| {
                let out = ch.wait_with_output().map_err(|e| BackupError::QemuImg {
                    what: "create".into(),
                    detail: format!("waiting for qemu-img: {e}"),
                })?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(BackupError::QemuImg {
                        what: "create".into(),
                        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    })
                }
            });
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
            (d, file, path, backing)
        })
        .collect();
    if let Some(e) = failed {
        return Err(e);
    }
    for (d, file, path, backing) in plan {
        let node = format!("vmctl-target-{}", d.name);
        // No flushes: the job's ordering flushes and the fdatasync at blockdev-del would make
        // QEMU wait for the disk while nothing else happens; vmctl fsyncs every file itself,
        // alongside its checksum, before the manifest exists. (QEMU still writes its cached
        // metadata into the file when the node is closed.) A crash before that leaves a
        // partial directory, never a backup.
        let mut opts = json!({
            "driver": "qcow2",
            "node-name": node,
            "cache": {"no-flush": true},
            "file": {"driver": "file", "filename": path.to_str().expect("utf-8 path"), "cache": {"no-flush": true}},
        });
        if backing.is_some() {
            // The job writes only what changed; QEMU need not open the chain.
            opts["backing"] = Value::Null;
        }
        qmp.execute("blockdev-add", Some(opts))?;
        attached.nodes.push(node.clone());
        mdisks.push(ManifestDisk {
            name: d.name.clone(),
            file,
            backing,
            source: d.clone(),
            copied_bytes: 0,
            file_size: 0,
            blake3: String::new(),
            bitmap: (d.format == "qcow2").then(|| c.bitmap_name.to_string()),
        });
    }
    Ok(mdisks)
}

/// Prepare → quiesce → transaction → thaw → copy. Returns the manifest (without checksums),
/// the bytes each job copied, when the copy ended (the start of `finish`), and the targets'
/// writeback, told to stop (joined once the final fsyncs are done).
fn take(
    c: &Take,
    qmp: &mut Qmp,
    attached: &mut Attached,
    agent_task: Option<std::thread::JoinHandle<AgentReady>>,
) -> Result<(Manifest, Vec<u64>, Instant, Writeback), BackupError> {
    let (req, disks, parent) = (c.req, c.disks, c.parent);
    let mut timings = Timings::new(step::ALL);
    // Target images and nodes, before anything touches the guest.
    let t_targets = Instant::now();
    let mdisks = prepare_targets(c, qmp, attached)?;
    let ms = timings.since(step::TARGETS, t_targets);
    info!("target images: {} created and attached in {ms:.1} ms", mdisks.len());
    util::test_halt("targets");
    // The transaction's actions, ready before the freeze.
    let mut actions = Vec::new();
    for (d, md) in disks.iter().zip(&mdisks) {
        let job = format!("vmctl-{}", d.name);
        let mut data = json!({
            "job-id": job,
            "device": d.node,
            "target": format!("vmctl-target-{}", d.name),
            "sync": "full",
            "auto-finalize": true,
            "auto-dismiss": false,
        });
        if req.speed > 0 {
            data["speed"] = json!(req.speed);
        }
        if let Some((_, pm)) = parent {
            let pbm = parent_disk(pm, d, disks).and_then(|x| x.bitmap.clone()).expect("checked");
            // The bitmap is on `device`, the node the job reads: QEMU looks for it there only.
            data["sync"] = json!("bitmap");
            data["bitmap"] = json!(pbm);
            data["bitmap-mode"] = json!("never");
        }
        actions.push(json!({"type": "blockdev-backup", "data": data}));
        if md.bitmap.is_some() {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": d.node, "name": c.bitmap_name, "persistent": true}}));
        }
    }
    timings.since(step::PREPARE, c.t_start);

    // Quiesce.
    let mut q = QuiesceReport { policy: Some(req.quiesce), ..Default::default() };
    let mut consistency = Consistency::Crash;
    let mut agent: Option<(Qga, AgentInfo)> = None;
    if req.quiesce != Quiesce::Off {
        let t_wait = Instant::now();
        let connected = match agent_task {
            None => Err(QuiesceError::NoChannel),
            Some(h) => {
                let (r, ms) = h.join().unwrap_or_else(|_| (Err(QuiesceError::Panicked), 0.0));
                timings.set(step::AGENT, ms);
                r
            }
        };
        timings.since(step::AGENT_WAIT, t_wait);
        match connected {
            Ok((g, i)) => {
                q.agent = Some(i.describe());
                agent = Some((g, i));
            }
            Err(why) => q.note = Some(quiesce::not_quiesced(req.quiesce, why).map_err(BackupError::QuiesceRequired)?),
        }
    }

    // `info` resynchronised this connection and got its answer, and nothing has been sent on
    // it since: the freeze goes out without another round trip, and the window holds only
    // freeze, transaction and thaw.
    let t_freeze = Instant::now();
    let mut t_copy = t_freeze;
    let mut txn_result: Result<(), BackupError> = Ok(());
    let mut quiesced = false;
    if let Some((g, info)) = agent.take() {
        info!("freeze: {}", if info.is_vssd { "vssd-freeze" } else { "guest-fsfreeze-freeze" });
        // On failure the agent was told to thaw at once; from success on, the guard thaws on
        // every way out.
        let freeze = quiesce::freeze(g, &info, req.freeze_deadline, req.freeze_timeout);
        timings.since(step::FREEZE, t_freeze);
        match freeze {
            Ok(fz) => {
                quiesced = true;
                let frozen = fz.frozen();
                q.frozen = frozen;
                q.report = fz.report().cloned();
                consistency = if frozen.unwrap_or(0) == 0 {
                    q.note = Some("the agent froze no filesystem".into());
                    Consistency::Crash
                } else if apps_held(q.report.as_ref()) {
                    Consistency::Application
                } else {
                    Consistency::Filesystem
                };
                // A running copy competes with the thaw for QEMU's main loop and the host's
                // CPUs: the thaw's reply came only once most of the copy was done. So the
                // jobs start held back (their copy-before-write filters are in place at once:
                // the point in time is the transaction's either way) and get their speed
                // once the guest is thawed.
                let held: Vec<Value> = actions
                    .iter()
                    .map(|a| {
                        let mut a = a.clone();
                        if a["type"] == "blockdev-backup" {
                            a["data"]["speed"] = json!(HELD_SPEED);
                        }
                        a
                    })
                    .collect();
                util::test_halt("frozen");
                let t_txn = Instant::now();
                t_copy = t_txn;
                txn_result = qmp.execute("transaction", Some(json!({"actions": held}))).map(|_| ()).map_err(Into::into);
                timings.since(step::TRANSACTION, t_txn);
                util::test_halt("transaction");
                let t_thaw = Instant::now();
                let thaw = fz.thaw();
                timings.since(step::THAW, t_thaw);
                timings.since(step::FREEZE_WINDOW, t_freeze);
                if txn_result.is_ok() {
                    for d in disks {
                        let job = format!("vmctl-{}", d.name);
                        if let Err(e) =
                            qmp.execute("block-job-set-speed", Some(json!({"device": job, "speed": req.speed})))
                        {
                            attached.jobs.extend(disks.iter().map(|d| format!("vmctl-{}", d.name)));
                            return Err(e.into());
                        }
                    }
                }
                info!(
                    "transaction {} in {:.1} ms; thawed in {:.1} ms; freeze window {:.1} ms",
                    if txn_result.is_ok() { "done" } else { "failed" },
                    timings.get(step::TRANSACTION),
                    timings.get(step::THAW),
                    timings.get(step::FREEZE_WINDOW)
                );
                match thaw {
                    Ok(v) => q.thaw = Some(v),
                    Err(e) => {
                        // vssd answers a thaw after its own deadline thaw with an error: the
                        // guest ran on unfrozen for part of the window; do not claim more.
                        info!("thaw: {e}");
                        q.thaw = Some(json!(e.to_string()));
                        if matches!(e, QgaError::Command { .. }) {
                            consistency = Consistency::Crash;
                            q.note = Some(format!("the guest thawed before the thaw request: {e}"));
                        }
                    }
                }
            }
            Err(why) => q.note = Some(quiesce::not_quiesced(req.quiesce, why).map_err(BackupError::QuiesceRequired)?),
        }
    }
    if !quiesced {
        let t_txn = Instant::now();
        t_copy = t_txn;
        txn_result = qmp.execute("transaction", Some(json!({"actions": actions}))).map(|_| ()).map_err(Into::into);
        let ms = timings.since(step::TRANSACTION, t_txn);
        info!("transaction (not quiesced) in {ms:.1} ms");
    }
    match txn_result {
        Ok(()) => {}
        Err(BackupError::Qmp(e)) if e.is_closed() => {
            return Err(BackupError::QemuGone { stage: "during the transaction".into() })
        }
        Err(e) => return Err(e),
    }
    for d in disks {
        attached.jobs.push(format!("vmctl-{}", d.name));
    }

    // Copy. The jobs started with the transaction (they ran on during the thaw); the copy is
    // done when they concluded and the targets are closed (blockdev-del). Meanwhile the
    // targets are written back to disk as they fill (see `Writeback`).
    let files: Vec<PathBuf> = mdisks.iter().map(|d| c.partial.join(&d.file)).collect();
    let writeback = Writeback::start(&files);
    let copied = wait_jobs(req, qmp, disks, &attached.jobs.clone()).map_err(|e| match e {
        BackupError::Qmp(q) if q.is_closed() => BackupError::QemuGone { stage: "while copying".into() },
        e => e,
    })?;
    writeback.signal();
    for j in attached.jobs.drain(..) {
        qmp.execute("job-dismiss", Some(json!({"id": j})))?;
    }
    for n in attached.nodes.drain(..) {
        qmp.execute("blockdev-del", Some(json!({"node-name": n})))?;
    }
    let ms = timings.since(step::COPY, t_copy);
    let t_finish = Instant::now();
    info!("copied {} in {ms:.1} ms", util::human_bytes(copied.iter().sum()));
    let chain = match parent {
        Some((_, pm)) => pm.chain.iter().cloned().chain([c.id.to_string()]).collect(),
        None => vec![c.id.to_string()],
    };
    let manifest = Manifest {
        format: FORMAT.magic.into(),
        version: FORMAT.version,
        id: c.id.to_string(),
        vm: req.vm_name.clone(),
        created: String::new(),
        kind: if parent.is_some() { "incremental" } else { "full" }.into(),
        parent: parent.map(|(_, pm)| pm.id.clone()),
        chain,
        consistency,
        quiesce: q,
        timings,
        disks: mdisks,
        qemu_version: String::new(),
        vm_config: req.vm_config.clone(),
        vmctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((manifest, copied, t_finish, writeback))
}

/// True when vssd's report says registered applications held the freeze (appvss, issue 3):
/// an `apps` list, not empty, every entry held.
pub(crate) fn apps_held(report: Option<&Value>) -> bool {
    let Some(apps) = report.and_then(|r| r.get("apps")).and_then(Value::as_array) else { return false };
    !apps.is_empty()
        && apps.iter().all(|a| {
            let o = a.get("outcome").or_else(|| a.get("state")).and_then(Value::as_str).unwrap_or("");
            o == "held" || o == "thawed"
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_held_only_when_every_app_held() {
        assert!(!apps_held(None));
        assert!(!apps_held(Some(&json!({"mounts": []}))));
        assert!(!apps_held(Some(&json!({"apps": []}))));
        assert!(apps_held(Some(&json!({"apps": [{"name": "db", "outcome": "held"}]}))));
        assert!(!apps_held(Some(&json!({"apps": [{"outcome": "held"}, {"outcome": "timeout"}]}))));
    }
}
