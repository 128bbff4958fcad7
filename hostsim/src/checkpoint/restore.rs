//! Starting a stopped VM from a checkpoint: the manifest's versions, every file's presence and
//! size, the QEMU version → a new overlay on each checkpoint image (so restoring one
//! checkpoint disturbs no other) → QEMU with `-incoming defer -S` → `migrate-incoming` from
//! the hashing source → `cont` only when the stream completed and every checksum (the disk
//! images' too, computed alongside) matched → thaw a guest that was saved frozen.
//!
//! Invariants:
//! - Nothing of a checkpoint that fails a check is started: QEMU is killed and the new
//!   overlays removed on every failure before `cont`.
//! - `resume` holds the VM's lock across the restore and the discard of the suspend
//!   checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::json;

use super::manifest::{check_files, verify_images, Manifest};
use super::migrate::{
    binary_version, check_qemu, enable_migration_events, kill_pid, qmp_gone, wait_migration, write_config,
};
use super::store::{collect_garbage, find, lock, remove_dir, SUSPEND_NAME};
use super::stream::{self_exe, source_uri, wait_report, Digest};
use super::{io_err, step, CheckpointError};
use crate::qmp::Qmp;
use crate::quiesce;
use crate::timings::Timings;
use crate::util;
use crate::vm::{self, PortKind, Vm, VmError};

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// The checkpoint's manifest.
    pub manifest: Manifest,
    /// The new overlays the VM now writes to.
    pub overlays: Vec<PathBuf>,
    /// Overlays nothing references any more, removed.
    pub removed: Vec<PathBuf>,
    /// QEMU's pid.
    pub pid: Option<i32>,
    /// "running" or "paused".
    pub run_state: String,
    /// Filesystems thawed (a quiesced checkpoint).
    pub thawed: Option<u64>,
    /// Why the thaw did not happen.
    pub thaw_error: Option<String>,
    /// Timings.
    pub timings: Timings,
}

/// What `restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The checkpoint.
    pub name: String,
    /// Check the disk images' checksums too (alongside the stream), not only their sizes.
    pub verify_disks: bool,
    /// A quiesced checkpoint: how long to wait for the agent to thaw the guest.
    pub agent_timeout: Duration,
}

/// Starts QEMU waiting for a migration stream (`-incoming defer -S`); returns its QMP.
fn launch_incoming(rvm: &Vm, accel: &str) -> Result<Qmp, CheckpointError> {
    for p in [rvm.qmp_path(), rvm.agent_path(), rvm.pid_path()] {
        let _ = std::fs::remove_file(p);
    }
    for p in &rvm.config.ports {
        if p.kind == PortKind::Socket {
            let _ = std::fs::remove_file(rvm.port_path(p));
        }
    }
    let mut cmd = rvm.command(accel);
    cmd.args(["-incoming", "defer", "-S"]);
    let name = rvm.config.name.clone();
    let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| VmError::Start {
        name: name.clone(),
        msg: format!("cannot run {}: {e} (apt-get install qemu-system-x86)", rvm.config.qemu),
    })?;
    if !out.status.success() {
        return Err(VmError::Start { name, msg: String::from_utf8_lossy(&out.stderr).trim().to_string() }.into());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rvm.pid().is_some() {
            if let Ok(q) = Qmp::connect(&rvm.qmp_path(), Duration::from_secs(60)) {
                return Ok(q);
            }
        }
        if Instant::now() > deadline {
            if let Some(pid) = rvm.pid() {
                kill_pid(pid);
            }
            return Err(VmError::Start { name, msg: "QMP did not come up within 20 s".into() }.into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a stopped VM from a checkpoint. See the module's description.
pub fn restore(vm: &Vm, req: &RestoreRequest) -> Result<Restored, CheckpointError> {
    if let Some(pid) = vm.pid() {
        return Err(CheckpointError::Running(vm.config.name.clone(), pid));
    }
    let _l = lock(vm, "restore")?;
    restore_locked(vm, req)
}

/// [`restore`], the VM's lock held by the caller.
fn restore_locked(vm: &Vm, req: &RestoreRequest) -> Result<Restored, CheckpointError> {
    let t0 = Instant::now();
    let (dir, m) = find(vm, &req.name)?;
    check_files(&dir, &m)?;
    let qemu_bin = m.config.qemu.clone();
    check_qemu(&m, &qemu_bin, binary_version(&qemu_bin)?)?;
    let mut timings = Timings::new(step::RESTORE);
    timings.since(step::CHECKS, t0);

    // The disk images' checksums run alongside the stream: both must pass before `cont`.
    let verifier = req.verify_disks.then(|| {
        let m2 = m.clone();
        std::thread::spawn(move || verify_images(&m2))
    });
    let join_verifier =
        |v: Option<std::thread::JoinHandle<Result<(), CheckpointError>>>| -> Result<(), CheckpointError> {
            match v {
                Some(h) => {
                    h.join().unwrap_or_else(|_| Err(CheckpointError::Migration("the disk checker panicked".into())))
                }
                None => Ok(()),
            }
        };

    let t_launch = Instant::now();
    let ovdir = vm.overlays_dir();
    // The QEMU started here keeps this umask: its files and overlays are owner-only.
    let _umask = crate::vm::private_umask();
    crate::vm::create_private_dir(&ovdir).map_err(io_err(format!("cannot create {}", ovdir.display())))?;
    let (_, stamp) = util::timestamps(SystemTime::now());
    let mut overlays: Vec<PathBuf> = Vec::new();
    let cleanup = |overlays: &[PathBuf], pid: Option<i32>| {
        if let Some(pid) = pid {
            kill_pid(pid);
        }
        for o in overlays {
            let _ = std::fs::remove_file(o);
        }
    };
    let mut config = m.config.clone();
    config.name = vm.config.name.clone();
    for c in config.disks.iter_mut() {
        let d = m.disks.iter().find(|d| d.name == c.name).expect("check_files saw every disk");
        let top = &d.chain[0];
        let ov = ovdir.join(format!("{}-{stamp}-from-{}.qcow2", c.name, m.name));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", &top.format, "-b"])
            .arg(&top.path)
            .arg(&ov)
            .output();
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(format!("cannot run qemu-img: {e}")),
        };
        if let Some(detail) = failed {
            cleanup(&overlays, None);
            let _ = join_verifier(verifier);
            return Err(CheckpointError::QemuImg { what: "create".into(), detail });
        }
        overlays.push(ov.clone());
        c.path = ov;
        c.format = "qcow2".into();
    }
    // The stream loads only into the machine type that wrote it: the resolved one, not an alias.
    let mut launch_config = config.clone();
    launch_config.machine = m.qemu.machine.clone();
    let rvm = Vm { dir: vm.dir.clone(), config: launch_config };
    let mut qmp = match launch_incoming(&rvm, &m.qemu.accel) {
        Ok(q) => q,
        Err(e) => {
            cleanup(&overlays, rvm.pid());
            let _ = join_verifier(verifier);
            return Err(e);
        }
    };
    let pid = rvm.pid();
    timings.since(step::LAUNCH, t_launch);
    let (a, b, c) = qmp.version();
    if let Err(e) = check_qemu(&m, &qemu_bin, (format!("{a}.{b}.{c}"), (a, b, c))) {
        cleanup(&overlays, pid);
        let _ = join_verifier(verifier);
        return Err(e);
    }

    let exe = self_exe()?;
    let report_path = vm.dir.join(format!(".restore-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report_path);
    let t_stream = Instant::now();
    let expect = Digest { size: m.state.size, blake3: m.state.blake3.clone() };
    let state_path = dir.join(&m.state.file);
    let streamed = (|| -> Result<(), CheckpointError> {
        enable_migration_events(&mut qmp)?;
        qmp.execute("migrate-incoming", Some(json!({"uri": source_uri(&exe, &state_path, &expect, &report_path)})))
            .map_err(qmp_gone("when told to load the state"))?;
        wait_migration(&mut qmp, Duration::from_secs(600), "while loading the state", "completed").map(|_| ())
    })();
    timings.since(step::STREAM, t_stream);
    // The source's verdict comes first: a corrupt file is the cause of any failure it meets.
    let rep = wait_report(&report_path, Duration::from_secs(if streamed.is_ok() { 30 } else { 300 }));
    let _ = std::fs::remove_file(&report_path);
    let verdict = match (&rep, streamed) {
        (Some(r), _) if r.size != expect.size || r.blake3 != expect.blake3 => Err(CheckpointError::ChecksumMismatch {
            name: m.name.clone(),
            path: state_path.display().to_string(),
            expected: expect.blake3.clone(),
            found: if r.size != expect.size {
                format!("{} ({} bytes read)", r.blake3, r.size)
            } else {
                r.blake3.clone()
            },
        }),
        (_, Err(e)) => Err(e),
        (None, Ok(())) => Err(CheckpointError::Migration("vmctl's stream source left no report".into())),
        (Some(r), Ok(())) if !r.ok => Err(CheckpointError::Migration(format!(
            "feeding the state failed: {}",
            r.error.clone().unwrap_or_default()
        ))),
        (Some(_), Ok(())) => Ok(()),
    };
    let t_wait = Instant::now();
    let verdict = verdict.and_then(|_| join_verifier(verifier));
    timings.since(step::DISK_VERIFY_WAIT, t_wait);
    if let Err(e) = verdict {
        drop(qmp);
        cleanup(&overlays, pid.filter(|p| vm::alive(*p)));
        return Err(e);
    }

    // Good: the VM's config now names the new overlays.
    let mut saved = config.clone();
    for d in saved.disks.iter_mut() {
        if let Ok(rel) = d.path.strip_prefix(&vm.dir) {
            d.path = rel.to_path_buf();
        }
    }
    if let Err(e) = write_config(vm, &saved) {
        drop(qmp);
        cleanup(&overlays, pid);
        return Err(e);
    }
    let mut run_state = "paused".to_string();
    if m.run_state == "running" {
        qmp.execute("cont", None).map_err(qmp_gone("when told to continue"))?;
        run_state = "running".into();
    }
    timings.since(step::TOTAL, t0);
    drop(qmp);

    let (mut thawed, mut thaw_error) = (None, None);
    if m.quiesce.frozen.unwrap_or(0) > 0 && run_state == "running" {
        match quiesce::thaw_restored(&rvm.agent_path(), req.agent_timeout) {
            Ok(n) => thawed = n,
            Err(e) => thaw_error = Some(util::error_chain(&e)),
        }
    }
    let saved_vm = Vm { dir: vm.dir.clone(), config: saved };
    let removed = collect_garbage(&saved_vm).unwrap_or_default();
    Ok(Restored { manifest: m, overlays, removed, pid, run_state, thawed, thaw_error, timings })
}

/// `vmctl resume`: restores the suspend checkpoint, then discards it (its images stay: they
/// are the bottom of the VM's live chain now).
pub fn resume(vm: &Vm, verify_disks: bool, agent_timeout: Duration) -> Result<Restored, CheckpointError> {
    if !vm.is_suspended() {
        return Err(CheckpointError::NotFound {
            vm: vm.config.name.clone(),
            name: SUSPEND_NAME.into(),
            known: Vec::new(),
        });
    }
    if let Some(pid) = vm.pid() {
        return Err(CheckpointError::Running(vm.config.name.clone(), pid));
    }
    // One lock across the restore and the discard: nothing gets between them.
    let _l = lock(vm, "resume")?;
    let mut r = restore_locked(vm, &RestoreRequest { name: SUSPEND_NAME.into(), verify_disks, agent_timeout })?;
    let vm = Vm::open(vm.dir.parent().unwrap_or(Path::new(".")), &vm.config.name)?;
    remove_dir(&vm.checkpoints_dir().join(SUSPEND_NAME))?;
    r.removed.extend(collect_garbage(&vm).unwrap_or_default());
    Ok(r)
}
