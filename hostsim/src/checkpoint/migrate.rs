//! QEMU's side of checkpoints: versions, the migration and its events, the disks as QEMU has
//! them, and the overlays' transaction.
//!
//! Invariants:
//! - `pause-before-switchover` is always set explicitly (a QEMU left with it on would hang the
//!   next plain save).
//! - The overlays go on in one transaction, every disk or none, and each backup bitmap is
//!   carried onto its disk's new overlay in the same transaction.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::manifest::{ImageRecord, Manifest, MANIFEST};
use super::{io_err, CheckpointError};
use crate::qmp::{Qmp, QmpError};
use crate::util;
use crate::vm::{self, Vm, VmConfig};

/// "QEMU emulator version 7.2.22 (Debian ...)" or "7.2.22" → (7, 2, 22).
pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let word =
        s.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))?;
    let mut it = word.split('.').map(|x| x.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>());
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next().and_then(|x| x.ok()).unwrap_or(0)))
}

/// The version a QEMU binary reports with `--version`.
pub fn binary_version(qemu: &str) -> Result<(String, (u64, u64, u64)), CheckpointError> {
    let out = Command::new(qemu).arg("--version").output().map_err(|e| CheckpointError::Io {
        what: format!("cannot run {qemu} --version (apt-get install qemu-system-x86)"),
        source: e,
    })?;
    let text = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    let v = parse_version(&text)
        .ok_or_else(|| CheckpointError::Migration(format!("cannot read the version of {qemu}: {text:?}")))?;
    Ok((text, v))
}

pub(crate) fn qmp_gone(stage: &str) -> impl FnOnce(QmpError) -> CheckpointError + '_ {
    move |e| {
        if e.is_closed() {
            CheckpointError::QemuGone { stage: stage.to_string() }
        } else {
            e.into()
        }
    }
}

/// Waits until a migration (either side) reaches `target` ("completed", or "pre-switchover"
/// with that capability) or fails: the MIGRATION event, with a query now and then in case it
/// was missed. Returns `query-migrate`'s answer.
pub(crate) fn wait_migration(
    qmp: &mut Qmp,
    limit: Duration,
    stage: &str,
    target: &str,
) -> Result<Value, CheckpointError> {
    let deadline = Instant::now() + limit;
    loop {
        let ended = |e: &crate::qmp::Event| {
            e.name == "MIGRATION"
                && e.data["status"]
                    .as_str()
                    .is_some_and(|st| st == target || matches!(st, "completed" | "failed" | "cancelled"))
        };
        let ev = qmp.wait_event(Duration::from_millis(250), ended).map_err(qmp_gone(stage))?;
        let r = qmp.execute("query-migrate", None).map_err(qmp_gone(stage))?;
        match r["status"].as_str() {
            Some(st) if st == target => return Ok(r),
            Some(s @ ("failed" | "cancelled")) => {
                let why = r["error-desc"].as_str().unwrap_or("QEMU gave no reason");
                return Err(CheckpointError::Migration(format!("the migration {s} {stage}: {why}")));
            }
            _ if ev.is_some() => {
                // The event said it ended; query-migrate lags by a moment.
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(CheckpointError::Migration(format!("the migration did not end within {limit:?} {stage}")));
        }
    }
}

/// `cont` on the source of a completed migration. QEMU announces the completion before it
/// leaves `finish-migrate`, and refuses `cont` until then ("Migration is not finalized yet").
///
/// Test only: with `VMCTL_TEST_FAULT=cont-after-migration` it fails before sending `cont`,
/// as if QEMU had refused, so that the VM tier can check what a failure here leaves behind
/// (a running guest, thawed at once).
pub(crate) fn cont_after_migration(qmp: &mut Qmp) -> Result<(), CheckpointError> {
    if util::test_fault("cont-after-migration") {
        return Err(CheckpointError::TestFault("cont-after-migration"));
    }
    cont_when_finalized(qmp)
}

/// `cont`, retried while QEMU says the migration is not finalized yet (30 s at most).
pub(crate) fn cont_when_finalized(qmp: &mut Qmp) -> Result<(), CheckpointError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match qmp.execute("cont", None) {
            Ok(_) => return Ok(()),
            Err(QmpError::Command { desc, .. }) if desc.contains("not finalized") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(qmp_gone("when told to continue")(e)),
        }
    }
}

pub(crate) fn enable_migration_events(qmp: &mut Qmp) -> Result<(), CheckpointError> {
    qmp.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]})))?;
    Ok(())
}

/// `pause-before-switchover`: QEMU stops the VM for the last pass and waits for
/// `migrate-continue`, disks still active; the overlays are taken there. Always set
/// explicitly (on or off): a QEMU left with it on would hang the next plain save.
pub(crate) fn set_pause_before_switchover(qmp: &mut Qmp, on: bool) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "pause-before-switchover", "state": on}]})),
    )
    .map(|_| ())
}

/// Backups' persistent dirty bitmaps stay with the image they were made on, which turns read
/// only under the new overlay; and QEMU's `blockdev-backup` looks for its bitmap only on the
/// node it reads, the top one. So each bitmap gets a copy on the new overlay, what was dirty
/// merged in, in the overlays' own transaction: the overlay never exists without it, and the
/// next incremental backup copies what changed before the checkpoint and after it. (The
/// original stays, read only, in the checkpoint's image, for an incremental after a restore
/// to refuse by name rather than go silent.)
fn bitmap_actions(d: &LiveDisk, node: &str) -> Vec<Value> {
    let mut actions = Vec::new();
    for (name, granularity) in &d.bitmaps {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": name, "granularity": granularity, "persistent": true}}));
        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
            "node": node, "target": name, "bitmaps": [{"node": d.node, "name": name}]}}));
    }
    actions
}

/// One transaction: every disk's overlay, or none. Then vm.toml names the overlays, since
/// the VM writes to them from now on. Returns the transaction's milliseconds.
pub(crate) fn take_overlays(
    qmp: &mut Qmp,
    vm: &Vm,
    disks: &[LiveDisk],
    plan: &[(PathBuf, String)],
) -> Result<f64, CheckpointError> {
    let t = Instant::now();
    let actions: Vec<Value> = disks
        .iter()
        .zip(plan)
        .flat_map(|(d, (file, node))| {
            let snap = json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": d.node, "snapshot-file": file, "snapshot-node-name": node,
                "format": "qcow2", "mode": "absolute-paths"}});
            std::iter::once(snap).chain(bitmap_actions(d, node))
        })
        .collect();
    if !actions.is_empty() {
        qmp.execute("transaction", Some(json!({"actions": actions})))
            .map_err(qmp_gone("during the overlays' transaction"))?;
    }
    let ms = util::ms(t.elapsed());
    tracing::info!("disk overlays taken (and backups' bitmaps carried onto them) in {ms:.1} ms");
    let mut c = vm.config.clone();
    for (d, (file, _)) in c.disks.iter_mut().zip(plan) {
        d.path = file.strip_prefix(&vm.dir).map(Path::to_path_buf).unwrap_or_else(|_| file.clone());
        d.format = "qcow2".into();
    }
    write_config(vm, &c)?;
    Ok(ms)
}

/// A disk of the running VM, mapped to its config entry.
#[derive(Debug, Clone)]
pub(crate) struct LiveDisk {
    pub(crate) name: String,
    pub(crate) node: String,
    pub(crate) virtual_size: u64,
    /// Top first.
    pub(crate) chain: Vec<(PathBuf, String)>,
    /// Persistent dirty bitmaps of the top node (backups' incrementals): (name, granularity).
    pub(crate) bitmaps: Vec<(String, u64)>,
}

/// The VM's disks as QEMU has them, each matched to its config entry by the device id
/// `vd-NAME` that `Vm::command` gives it. A writable disk QEMU has and the config lacks is
/// refused: its device state would be saved without a consistent disk.
pub(crate) fn live_disks(qmp: &mut Qmp, vm: &Vm) -> Result<Vec<LiveDisk>, CheckpointError> {
    let blocks = qmp.execute("query-block", None)?;
    let blocks: Vec<Value> = blocks.as_array().cloned().unwrap_or_default();
    let id_of = |b: &Value| -> String {
        let q = b["qdev"].as_str().unwrap_or("");
        q.split('/').find(|s| s.starts_with("vd-")).map(|s| s.trim_start_matches("vd-").to_string()).unwrap_or_default()
    };
    let mut out = Vec::new();
    for d in &vm.config.disks {
        let b = blocks.iter().find(|b| id_of(b) == d.name).ok_or_else(|| {
            CheckpointError::Disks(format!("QEMU has no device vd-{} for disk `{}` of the config", d.name, d.name))
        })?;
        let ins =
            b.get("inserted").ok_or_else(|| CheckpointError::Disks(format!("disk `{}` has no medium", d.name)))?;
        let mut chain = Vec::new();
        let mut img = &ins["image"];
        while img.is_object() {
            chain.push((
                PathBuf::from(img["filename"].as_str().unwrap_or("")),
                img["format"].as_str().unwrap_or("raw").to_string(),
            ));
            img = &img["backing-image"];
        }
        let bitmaps = ins["dirty-bitmaps"]
            .as_array()
            .or(b["dirty-bitmaps"].as_array())
            .into_iter()
            .flatten()
            .filter(|bm| bm["persistent"].as_bool() == Some(true) && bm["inconsistent"].as_bool() != Some(true))
            .filter_map(|bm| Some((bm["name"].as_str()?.to_string(), bm["granularity"].as_u64().unwrap_or(65536))))
            .collect();
        out.push(LiveDisk {
            name: d.name.clone(),
            node: ins["node-name"].as_str().unwrap_or("").to_string(),
            virtual_size: ins["image"]["virtual-size"].as_u64().unwrap_or(0),
            chain,
            bitmaps,
        });
    }
    for b in &blocks {
        let Some(ins) = b.get("inserted") else { continue };
        if ins["ro"].as_bool() == Some(true) {
            continue;
        }
        let id = id_of(b);
        if !vm.config.disks.iter().any(|d| d.name == id) {
            return Err(CheckpointError::Disks(format!(
                "QEMU has a writable disk {} that is not in the VM's config: vmctl cannot give it a consistent checkpoint",
                b["qdev"].as_str().or(b["device"].as_str()).unwrap_or("?")
            )));
        }
    }
    Ok(out)
}

fn mtime_ns(md: &std::fs::Metadata) -> u128 {
    md.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Records an image: its size and checksum, reusing the checksum another checkpoint recorded
/// for the same unchanged file (the images below a checkpoint are shared and immutable).
pub(crate) fn image_record(path: &Path, format: &str, known: &[ImageRecord]) -> Result<ImageRecord, CheckpointError> {
    let md = std::fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
    let (size, mtime) = (md.len(), mtime_ns(&md));
    if let Some(k) = known.iter().find(|k| k.path == path && k.size == size && k.mtime_ns == mtime && mtime != 0) {
        return Ok(k.clone());
    }
    let blake3 = crate::hash::hash_file(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    Ok(ImageRecord { path: path.to_path_buf(), format: format.into(), size, blake3, mtime_ns: mtime })
}

pub(crate) fn write_config(vm: &Vm, config: &VmConfig) -> Result<(), CheckpointError> {
    let text = toml::to_string(config).expect("config serialises");
    util::write_atomic(&vm.dir.join("vm.toml"), text.as_bytes()).map_err(io_err("cannot write vm.toml"))
}

/// A node name QEMU accepts (at most 31 characters, a letter first) and that is new.
pub(crate) fn node_name(disk: &str, stamp: u64) -> String {
    let d: String = disk.chars().take(18).collect();
    format!("{d}-ck{:x}", stamp & 0xffff_ffff)
}

pub(crate) fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    vm::wait_gone(pid, Duration::from_secs(10));
}

/// Refuses a QEMU older than the one that wrote the stream.
pub fn check_qemu(m: &Manifest, binary: &str, installed: (String, (u64, u64, u64))) -> Result<(), CheckpointError> {
    let recorded = parse_version(&m.qemu.version).ok_or_else(|| CheckpointError::Inconsistent {
        path: MANIFEST.into(),
        why: format!("unreadable QEMU version {:?}", m.qemu.version),
    })?;
    if installed.1 < recorded {
        let (a, b, c) = installed.1;
        return Err(CheckpointError::QemuTooOld {
            name: m.name.clone(),
            recorded: m.qemu.version.clone(),
            installed: format!("{a}.{b}.{c}"),
            binary: binary.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::fixtures::sample_manifest;

    #[test]
    fn an_older_qemu_is_refused_a_newer_one_is_not() {
        let m = sample_manifest();
        assert_eq!(parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"), Some((7, 2, 22)));
        assert_eq!(parse_version("8.2.0"), Some((8, 2, 0)));
        assert_eq!(parse_version("9.1"), Some((9, 1, 0)));
        let e = check_qemu(&m, "qemu", ("7.1.0".into(), (7, 1, 0))).unwrap_err();
        assert!(e.to_string().contains("7.2.22") && e.to_string().contains("7.1.0"), "{e}");
        check_qemu(&m, "qemu", ("7.2.22".into(), (7, 2, 22))).unwrap();
        check_qemu(&m, "qemu", ("8.0.0".into(), (8, 0, 0))).unwrap();
    }

    #[test]
    fn node_names_fit_qemu() {
        let n = node_name("a-very-long-disk-name-indeed-yes", 0xdead_beef_1234);
        assert!(n.len() <= 31 && n.starts_with('a'), "{n}");
    }
}
