//! Taking a checkpoint of a running (or paused) VM: freeze (optional) → stop → overlays →
//! `migrate` into the hashing sink → `cont` → thaw → fsync and checksums → manifest →
//! rename into place. See the parent module for the whole story.
//!
//! Invariants:
//! - The guest frozen here is thawed on every way out ([`crate::quiesce::Frozen`]), after
//!   the VM runs again (a stopped guest's agent cannot answer); a VM powered off with the
//!   checkpoint keeps its saved state frozen for the restore to thaw.
//! - The directory becomes `checkpoints/NAME` only once its files and itself were fsynced.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};

use super::manifest::{
    DiskRecord, FileRecord, ImageRecord, Manifest, QemuRecord, QuiesceRecord, FORMAT, MANIFEST, STATE_FILE,
};
use super::migrate::{
    cont_after_migration, cont_when_finalized, enable_migration_events, image_record, kill_pid, live_disks, node_name,
    qmp_gone, set_pause_before_switchover, take_overlays, wait_migration,
};
use super::store::{check_name, list, lock, SUSPEND_NAME, TMP_PREFIX};
use super::stream::{self_exe, sink_uri, wait_report, SINK_REPORT};
use super::{io_err, step, CheckpointError};
use crate::qga::Qga;
use crate::qmp::Qmp;
use crate::quiesce::{self, Frozen, Quiesce, QuiesceError};
use crate::timings::Timings;
use crate::util;
use crate::vm::{self, Vm};

/// What `create` is asked to do.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The name (default: a timestamp).
    pub name: Option<String>,
    /// `vmctl suspend`'s checkpoint (the reserved name, always powered off).
    pub suspend: bool,
    /// Quit QEMU once the checkpoint is complete.
    pub poweroff: bool,
    /// Freeze the guest's filesystems around it.
    pub quiesce: Quiesce,
    /// vssd thaws by itself after this long.
    pub freeze_deadline: Duration,
    /// How long the agent gets to answer.
    pub agent_timeout: Duration,
    /// Limit the stream to this many bytes per second (None: no limit, not even QEMU's
    /// default 128 MiB/s).
    pub bandwidth: Option<u64>,
    /// Save RAM while the guest runs; QEMU stops it only for the last pass, when the overlays
    /// are taken (`pause-before-switchover`). The downtime is that last pass, not the stream.
    pub live: bool,
}

impl Default for CreateRequest {
    fn default() -> Self {
        CreateRequest {
            name: None,
            suspend: false,
            poweroff: false,
            quiesce: Quiesce::Off,
            freeze_deadline: Duration::from_secs(120),
            agent_timeout: Duration::from_secs(5),
            bandwidth: None,
            live: false,
        }
    }
}

/// What `create` made.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The thaw failed (the guest may still be frozen; vssd thaws by itself at its deadline).
    pub thaw_error: Option<String>,
}

/// Effectively unlimited, and within what QEMU 7.2 accepts for `max-bandwidth`.
const NO_LIMIT: u64 = 1 << 40;

/// Takes a checkpoint of a running (or paused) VM. See the module's description.
pub fn create(vm: &Vm, req: &CreateRequest) -> Result<Created, CheckpointError> {
    let t0 = Instant::now();
    let name = match (&req.name, req.suspend) {
        (_, true) => SUSPEND_NAME.to_string(),
        (Some(n), false) => n.clone(),
        (None, false) => util::timestamps(SystemTime::now()).1,
    };
    check_name(&name)?;
    if name == SUSPEND_NAME && !req.suspend {
        return Err(CheckpointError::BadName(name));
    }
    let Some(pid) = vm.pid() else { return Err(CheckpointError::NotRunning(vm.config.name.clone())) };
    let _l = lock(vm, if req.suspend { "suspend" } else { "checkpoint create" })?;
    // A checkpoint holds the guest's RAM: owner-only whatever the umask (`vm::private_umask`).
    let _umask = crate::vm::private_umask();
    let cdir = vm.checkpoints_dir();
    let final_dir = cdir.join(&name);
    if final_dir.exists() {
        return Err(CheckpointError::Exists { vm: vm.config.name.clone(), name });
    }
    let tmp = cdir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    crate::vm::create_private_dir(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
    let r = create_in(vm, req, &name, &tmp, pid, t0);
    let (mut manifest, thaw_error) = match r {
        Ok(x) => x,
        Err(e) => {
            if tmp.join(STATE_FILE).exists() {
                // The sink, QEMU's child, outlives a killed QEMU by a moment and then leaves its
                // report here: let it, or it would recreate the directory's last entry.
                let _ = wait_report(&tmp.join(SINK_REPORT), Duration::from_secs(5));
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let finish = (|| -> Result<(), CheckpointError> {
        manifest.timings.since(step::TOTAL, t0);
        let text = manifest.to_bytes();
        let mp = tmp.join(MANIFEST);
        let mut f = std::fs::File::create(&mp).map_err(io_err("cannot write the manifest"))?;
        f.write_all(&text).and_then(|_| f.sync_all()).map_err(io_err("cannot write the manifest"))?;
        util::fsync_dir(&tmp).map_err(io_err("cannot sync the checkpoint"))?;
        std::fs::rename(&tmp, &final_dir).map_err(io_err(format!(
            "cannot rename {} to {}",
            tmp.display(),
            final_dir.display()
        )))?;
        util::fsync_dir(&cdir).map_err(io_err("cannot sync the checkpoints directory"))
    })();
    if let Err(e) = finish {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if req.poweroff || req.suspend {
        // The checkpoint is complete and durable: only now may the VM go.
        if let Ok(mut q) = Qmp::connect(&vm.qmp_path(), Duration::from_secs(10)) {
            let _ = q.execute("quit", None);
        }
        if !vm::wait_gone(pid, Duration::from_secs(15)) {
            kill_pid(pid);
        }
    }
    Ok(Created { dir: final_dir, manifest, thaw_error })
}

/// Freezes the guest as the policy says; returns the guard (None when not frozen) and what
/// to record.
fn quiesce(
    vm: &Vm,
    req: &CreateRequest,
    running: bool,
) -> Result<(Option<Frozen<Qga>>, QuiesceRecord), CheckpointError> {
    let mut rec = QuiesceRecord { policy: req.quiesce.as_str().into(), ..Default::default() };
    if req.quiesce == Quiesce::Off {
        return Ok((None, rec));
    }
    let attempt = || -> Result<(Frozen<Qga>, String), QuiesceError> {
        if !running {
            return Err(QuiesceError::Paused);
        }
        if !vm.config.agent {
            return Err(QuiesceError::NoChannel);
        }
        let (g, info) = quiesce::connect(&vm.agent_path(), req.agent_timeout)?;
        let f = quiesce::freeze(g, &info, req.freeze_deadline, Duration::from_secs(60))?;
        Ok((f, info.describe()))
    };
    match attempt() {
        Ok((f, agent)) => {
            rec.agent = Some(agent);
            rec.frozen = f.frozen();
            Ok((Some(f), rec))
        }
        Err(why) => {
            rec.note = Some(quiesce::not_quiesced(req.quiesce, why).map_err(CheckpointError::QuiesceRequired)?);
            Ok((None, rec))
        }
    }
}

fn create_in(
    vm: &Vm,
    req: &CreateRequest,
    name: &str,
    tmp: &Path,
    pid: i32,
    t0: Instant,
) -> Result<(Manifest, Option<String>), CheckpointError> {
    let exe = self_exe()?;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    let (ma, mi, mc) = qmp.version();
    let package = qmp.greeting()["QMP"]["version"]["package"].as_str().unwrap_or("").trim().to_string();
    let machine = qmp
        .execute("qom-get", Some(json!({"path": "/machine", "property": "type"})))?
        .as_str()
        .unwrap_or("")
        .trim_end_matches("-machine")
        .to_string();
    let accel = if qmp.execute("query-kvm", None)?["enabled"].as_bool() == Some(true) { "kvm" } else { "tcg" };
    let run_state = qmp.execute("query-status", None)?["status"].as_str().unwrap_or("").to_string();
    let running = match run_state.as_str() {
        "running" => true,
        "paused" => false,
        s => {
            return Err(CheckpointError::Migration(format!(
                "VM `{}` is {s}: a checkpoint needs it running or paused",
                vm.config.name
            )))
        }
    };
    let disks = live_disks(&mut qmp, vm)?;
    let ovdir = vm.overlays_dir();
    crate::vm::create_private_dir(&ovdir).map_err(io_err(format!("cannot create {}", ovdir.display())))?;
    let (_, stamp) = util::timestamps(SystemTime::now());
    let stamp_n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let plan: Vec<(PathBuf, String)> = disks
        .iter()
        .map(|d| (ovdir.join(format!("{}-{stamp}-after-{name}.qcow2", d.name)), node_name(&d.name, stamp_n)))
        .collect();
    let old_params = qmp.execute("query-migrate-parameters", None)?;
    enable_migration_events(&mut qmp)?;
    let live = req.live && running;
    set_pause_before_switchover(&mut qmp, live)?;
    let _ = qmp.take_events();

    let mut timings = Timings::new(step::CREATE);
    let t_freeze = Instant::now();
    // From here on every way out thaws the guest (the guard), unless the VM is powered off
    // with its state saved frozen.
    let (frozen, quiesce) = quiesce(vm, req, running)?;
    timings.since(step::FREEZE, t_freeze);
    // A vmctl killed from here until `cont` would leave the VM stopped and the guest frozen:
    // the record lets the next vmctl command repair that ([`super::inflight`]).
    let _in_flight = super::inflight::InFlight::begin(vm, running, frozen.is_some())
        .map_err(io_err(format!("cannot write {}", vm.dir.join(super::inflight::FILE).display())))?;
    util::test_halt("checkpoint-frozen");

    let created = util::timestamps(SystemTime::now()).0;
    let state_path = tmp.join(STATE_FILE);
    let report_path = tmp.join(SINK_REPORT);
    let mut t_stop = Instant::now();
    let stopped = (|| -> Result<Value, CheckpointError> {
        if running && !live {
            qmp.execute("stop", None).map_err(qmp_gone("when told to stop"))?;
        }
        if !live {
            timings.set(step::SNAPSHOT, take_overlays(&mut qmp, vm, &disks, &plan)?);
        }
        let bw = req.bandwidth.unwrap_or(NO_LIMIT).max(1);
        qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": bw})))?;
        let t_stream = Instant::now();
        qmp.execute("migrate", Some(json!({"uri": sink_uri(&exe, &state_path, &report_path)})))
            .map_err(qmp_gone("when told to migrate"))?;
        let limit = match req.bandwidth {
            Some(b) => Duration::from_secs(120 + (vm.config.memory_mib << 20) / b.max(1) * 3),
            None => Duration::from_secs(600),
        };
        let stage = "while saving the VM's state";
        if live {
            // QEMU stopped the VM for the last pass: RAM and disks are frozen at this instant.
            wait_migration(&mut qmp, limit, stage, "pre-switchover")?;
            t_stop = Instant::now();
            timings.set(step::SNAPSHOT, take_overlays(&mut qmp, vm, &disks, &plan)?);
            qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"}))).map_err(qmp_gone(stage))?;
        }
        let r = wait_migration(&mut qmp, limit, stage, "completed")?;
        let ms = timings.since(step::STREAM, t_stream);
        tracing::info!("state saved in {ms:.1} ms");
        Ok(r)
    })();
    let restore_params = |qmp: &mut Qmp| {
        if let Some(b) = old_params["max-bandwidth"].as_u64() {
            let _ = qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": b})));
        }
        if live {
            let _ = set_pause_before_switchover(qmp, false);
        }
    };
    let migrated = match stopped {
        Ok(r) => r,
        Err(e) => {
            if vm::alive(pid) {
                let _ = qmp.execute("migrate_cancel", None);
                restore_params(&mut qmp);
                if running {
                    let _ = qmp.execute("cont", None);
                }
            }
            // The guest runs again (or QEMU is gone): the guard thaws it as it drops.
            drop(frozen);
            return Err(e);
        }
    };
    util::test_halt("checkpoint-saved");
    let mut thaw_error = None;
    if req.poweroff || req.suspend {
        // The saved state holds the guest frozen; the restore that brings it back thaws it.
        if let Some(f) = frozen {
            f.leave_frozen();
        }
    } else {
        if running {
            if let Err(e) = cont_after_migration(&mut qmp) {
                // The agent answers only a running guest: `cont` once more (it returns at once
                // when QEMU is gone), then the guard thaws the guest now rather than at vssd's
                // deadline.
                restore_params(&mut qmp);
                if vm::alive(pid) {
                    if let Err(again) = cont_when_finalized(&mut qmp) {
                        tracing::warn!("the VM could not be continued after a failed checkpoint: {again}");
                    }
                }
                drop(frozen);
                return Err(e);
            }
            timings.since(step::DOWNTIME, t_stop);
        }
        restore_params(&mut qmp);
        if let Some(f) = frozen {
            thaw_error = f.thaw().err().map(|e| util::error_chain(&e));
        }
    }
    drop(qmp);
    timings.set(step::QEMU_DOWNTIME, migrated["downtime"].as_f64().unwrap_or(0.0));
    if live {
        // Our clock starts when the pre-switchover event arrives, a moment after QEMU stopped
        // the CPUs; QEMU's own figure starts at the stop but ends before our `cont`.
        timings.raise(step::DOWNTIME, timings.get(step::QEMU_DOWNTIME));
    }
    let ram_bytes = migrated["ram"]["total"].as_u64().unwrap_or(0);

    // The sink has exited (QEMU waited for it); its report says what it wrote.
    let t_sync = Instant::now();
    let rep = wait_report(&report_path, Duration::from_secs(300))
        .ok_or_else(|| CheckpointError::Migration("vmctl's stream sink left no report (it was killed?)".into()))?;
    if !rep.ok {
        return Err(CheckpointError::Migration(format!("saving the stream failed: {}", rep.error.unwrap_or_default())));
    }
    let _ = std::fs::remove_file(&report_path);
    std::fs::File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot sync {}", state_path.display())))?;
    timings.since(step::SYNC, t_sync);
    let md = std::fs::metadata(&state_path).map_err(io_err("the state file is gone"))?;
    if md.len() != rep.size {
        return Err(CheckpointError::Migration(format!(
            "the state file has {} bytes, the sink wrote {}",
            md.len(),
            rep.size
        )));
    }

    // The images below the overlays are immutable from the transaction on.
    let t_hash = Instant::now();
    let known: Vec<ImageRecord> = list(vm)
        .map(|l| l.good.into_iter().flat_map(|(_, m)| m.disks.into_iter().flat_map(|d| d.chain)).collect())
        .unwrap_or_default();
    let mut records = Vec::new();
    for (d, (file, _)) in disks.iter().zip(&plan) {
        let chain = d.chain.iter().map(|(p, f)| image_record(p, f, &known)).collect::<Result<Vec<_>, _>>()?;
        records.push(DiskRecord {
            name: d.name.clone(),
            node: d.node.clone(),
            virtual_size: d.virtual_size,
            chain,
            overlay: Some(file.clone()),
        });
    }
    timings.since(step::DISK_HASH, t_hash);
    timings.since(step::TOTAL, t0);
    let manifest = Manifest {
        magic: FORMAT.magic.into(),
        version: FORMAT.version,
        sections: FORMAT.current_sections(),
        name: name.into(),
        vm: vm.config.name.clone(),
        created,
        kind: if req.suspend { "suspend" } else { "checkpoint" }.into(),
        poweroff: req.poweroff || req.suspend,
        config: vm.config.clone(),
        run_state: if running { "running" } else { "paused" }.into(),
        quiesce,
        qemu: QemuRecord { version: format!("{ma}.{mi}.{mc}"), package, machine, accel: accel.into() },
        disks: records,
        state: FileRecord { file: STATE_FILE.into(), size: rep.size, blake3: rep.blake3 },
        ram_bytes,
        timings,
        vmctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((manifest, thaw_error))
}

/// `vmctl suspend`: a checkpoint under the reserved name, then QEMU quits.
pub fn suspend(vm: &Vm, quiesce: Quiesce, agent_timeout: Duration) -> Result<Created, CheckpointError> {
    create(vm, &CreateRequest { suspend: true, poweroff: true, quiesce, agent_timeout, ..Default::default() })
}
