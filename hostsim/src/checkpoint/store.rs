//! Where a VM's checkpoints live, and what keeps them whole: the listing, the VM's operation
//! lock, the overlays' garbage collection, deletion.
//!
//! Invariants:
//! - No image in the live chain (vm.toml's disks and their backing files) or in any
//!   checkpoint's chain is ever deleted; unreferenced overlays are removed only when both sets
//!   are known (no unreadable manifest), and only under `VMDIR/overlays/`.
//! - A directory is removed by renaming it to a `.tmp-` name first: half removed, it is a
//!   leftover, never a checkpoint.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::manifest::Manifest;
use super::{io_err, CheckpointError};
use crate::envelope;
use crate::oplock::OpLock;
use crate::util;
use crate::vm::{self, Vm};

/// The checkpoint `vmctl suspend` writes and `vmctl resume` consumes.
pub use crate::vm::SUSPEND_CHECKPOINT as SUSPEND_NAME;
/// Prefix of a checkpoint directory being written (or being removed).
pub const TMP_PREFIX: &str = ".tmp-";

/// `VMDIR/checkpoints`.
pub fn checkpoints_dir(vm: &Vm) -> PathBuf {
    vm.checkpoints_dir()
}

/// `VMDIR/overlays`: every image vmctl makes for checkpoints and restores.
pub fn overlays_dir(vm: &Vm) -> PathBuf {
    vm.overlays_dir()
}

/// Checks a checkpoint name (it becomes a directory name).
pub fn check_name(name: &str) -> Result<(), CheckpointError> {
    vm::check_name(name).map_err(|_| CheckpointError::BadName(name.into()))
}

/// A VM's checkpoints: the complete ones oldest first, the leftovers of interrupted creates,
/// and directories whose manifest this vmctl cannot read (kept: a newer vmctl may).
pub type Listing = envelope::Listing<Manifest>;

/// Lists a VM's checkpoints.
pub fn list(vm: &Vm) -> Result<Listing, CheckpointError> {
    let dir = vm.checkpoints_dir();
    let mut l =
        envelope::list(&dir, TMP_PREFIX, Manifest::load).map_err(io_err(format!("cannot read {}", dir.display())))?;
    l.good.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.1.name.cmp(&b.1.name)));
    Ok(l)
}

/// Warnings for checkpoint files (RAM images, disk overlays) that other users can read.
pub fn exposure_warnings(vm: &Vm) -> Vec<String> {
    [vm.checkpoints_dir(), vm.overlays_dir()].iter().filter_map(|d| crate::vm::exposure_warning(d)).collect()
}

/// Takes the VM's operation lock for `op` (shared with backups: [`crate::oplock`]).
pub fn lock(vm: &Vm, op: &str) -> Result<OpLock, CheckpointError> {
    let l = OpLock::take(&vm.qmp_path(), &vm.config.name, op)?;
    if let Some(what) = super::inflight::recover(vm) {
        tracing::warn!("{what}");
        eprintln!("vmctl: warning: {what}");
    }
    Ok(l)
}

/// Finds a complete checkpoint by name.
pub fn find(vm: &Vm, name: &str) -> Result<(PathBuf, Manifest), CheckpointError> {
    check_name(name)?;
    let dir = vm.checkpoints_dir().join(name);
    if !dir.is_dir() {
        let known = list(vm)?.good.into_iter().map(|(_, m)| m.name).collect();
        return Err(CheckpointError::NotFound { vm: vm.config.name.clone(), name: name.into(), known });
    }
    let mut m = Manifest::load(&dir)?;
    m.name = name.to_string();
    Ok((dir, m))
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// An image's backing chain, top first, as qemu-img reads it (`-U`: the image may be in use).
pub fn image_chain(top: &Path) -> Result<Vec<(PathBuf, String)>, CheckpointError> {
    let out =
        Command::new("qemu-img").args(["info", "-U", "--backing-chain", "--output=json"]).arg(top).output().map_err(
            |e| CheckpointError::QemuImg { what: "info".into(), detail: format!("cannot run qemu-img: {e}") },
        )?;
    if !out.status.success() {
        return Err(CheckpointError::QemuImg {
            what: "info".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CheckpointError::QemuImg { what: "info".into(), detail: format!("unreadable output: {e}") })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (PathBuf::from(i["filename"].as_str().unwrap_or("")), i["format"].as_str().unwrap_or("raw").to_string())
        })
        .collect())
}

/// Every image the VM's config uses now, with its backing files.
pub fn live_images(vm: &Vm) -> Result<BTreeSet<PathBuf>, CheckpointError> {
    let mut set = BTreeSet::new();
    for d in &vm.config.disks {
        for (p, _) in image_chain(&vm.disk_path(d))? {
            set.insert(canon(&p));
        }
    }
    Ok(set)
}

/// Removes overlays (under `VMDIR/overlays/` only) that neither the live chain nor any
/// checkpoint references. Returns what it removed. Deletes nothing when it cannot tell.
pub fn collect_garbage(vm: &Vm) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = vm.overlays_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut keep = live_images(vm)?;
    let listing = list(vm)?;
    if !listing.unreadable.is_empty() {
        // A checkpoint this vmctl cannot read may still need its images.
        return Ok(Vec::new());
    }
    for (_, m) in &listing.good {
        for d in &m.disks {
            for i in &d.chain {
                keep.insert(canon(&i.path));
            }
        }
    }
    let mut removed = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2") && !keep.contains(&canon(&p)) && std::fs::remove_file(&p).is_ok()
        {
            removed.push(p);
        }
    }
    let _ = util::fsync_dir(&dir);
    Ok(removed)
}

/// Deletes a checkpoint (its directory) and the overlays nothing references any more.
pub fn delete(vm: &Vm, name: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let _l = lock(vm, "checkpoint delete")?;
    delete_locked(vm, name)
}

/// [`delete`], the VM's lock held by the caller.
pub(crate) fn delete_locked(vm: &Vm, name: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = vm.checkpoints_dir().join(name);
    if name.starts_with('.') || name.contains('/') || !dir.is_dir() {
        let known = list(vm)?.good.into_iter().map(|(_, m)| m.name).collect();
        return Err(CheckpointError::NotFound { vm: vm.config.name.clone(), name: name.into(), known });
    }
    remove_dir(&dir)?;
    collect_garbage(vm)
}

/// Deletes every checkpoint, every leftover of an interrupted create, and every directory
/// with an unreadable manifest.
pub fn destroy_all(vm: &Vm) -> Result<(usize, Vec<PathBuf>), CheckpointError> {
    let _l = lock(vm, "checkpoint destroyall")?;
    let l = list(vm)?;
    let n = l.good.len();
    for p in l.good.iter().map(|(p, _)| p).chain(&l.leftovers).chain(l.unreadable.iter().map(|(p, _)| p)) {
        remove_dir(p)?;
    }
    Ok((n, collect_garbage(vm)?))
}

/// What `checkpoint prune` kept and deleted (names, newest first), and the overlays it freed.
#[derive(Debug, serde::Serialize)]
pub struct Pruned {
    /// Kept: the newest `keep_last`, and the suspend checkpoint whatever its age.
    pub kept: Vec<String>,
    /// Deleted (or, with `dry_run`, to be deleted).
    pub deleted: Vec<String>,
    /// Overlays nothing references any more, removed.
    pub removed_images: Vec<PathBuf>,
}

/// Keeps the newest `keep_last` complete checkpoints and deletes the older ones (`dry_run`:
/// only says which). The suspend checkpoint is `vmctl resume`'s state, never pruned.
/// Leftovers of interrupted creates are left to `destroyall`. Checkpoints do not depend on one
/// another (each lists its own image chain), so any of them can go.
pub fn prune(vm: &Vm, keep_last: usize, dry_run: bool) -> Result<Pruned, CheckpointError> {
    let _l = lock(vm, "checkpoint prune")?;
    let l = list(vm)?;
    let mut kept = Vec::new();
    let mut doomed = Vec::new();
    for (p, m) in l.good.iter().rev() {
        if m.name == SUSPEND_NAME || kept.len() < keep_last {
            kept.push(m.name.clone());
        } else {
            doomed.push((p.clone(), m.name.clone()));
        }
    }
    let mut removed_images = Vec::new();
    if !dry_run && !doomed.is_empty() {
        for (p, _) in &doomed {
            remove_dir(p)?;
        }
        removed_images = collect_garbage(vm)?;
    }
    Ok(Pruned { kept, deleted: doomed.into_iter().map(|(_, n)| n).collect(), removed_images })
}

pub(crate) fn remove_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Rename first: a directory half removed must not look like a checkpoint.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let doomed = if name.starts_with(TMP_PREFIX) {
        dir.to_path_buf()
    } else {
        parent.join(format!("{TMP_PREFIX}deleting-{name}-{}", std::process::id()))
    };
    if doomed != dir {
        std::fs::rename(dir, &doomed).map_err(io_err(format!("cannot remove {}", dir.display())))?;
        let _ = util::fsync_dir(parent);
    }
    std::fs::remove_dir_all(&doomed).map_err(io_err(format!("cannot remove {}", doomed.display())))?;
    let _ = util::fsync_dir(parent);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::manifest::fixtures::sample_manifest;
    use crate::checkpoint::manifest::MANIFEST;
    use crate::vm::VmConfig;

    #[test]
    fn list_shows_complete_checkpoints_and_names_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let vm = Vm { dir: root.path().join("web1"), config: VmConfig::new("web1") };
        let cdir = vm.checkpoints_dir();
        std::fs::create_dir_all(cdir.join("c1")).unwrap();
        std::fs::write(cdir.join("c1").join(MANIFEST), sample_manifest().to_bytes()).unwrap();
        std::fs::create_dir_all(cdir.join(".tmp-c2-123")).unwrap();
        std::fs::create_dir_all(cdir.join("c3")).unwrap(); // no manifest
        let l = list(&vm).unwrap();
        assert_eq!(l.good.iter().map(|(_, m)| m.name.as_str()).collect::<Vec<_>>(), ["c1"]);
        assert_eq!((l.leftovers.len(), l.unreadable.len()), (1, 1), "{l:?}");
        // Deleting leaves nothing that looks like a checkpoint, and an unknown name is refused.
        assert!(matches!(delete(&vm, "nope").unwrap_err(), CheckpointError::NotFound { .. }));
        delete(&vm, "c1").unwrap();
        assert!(list(&vm).unwrap().good.is_empty());
        let (n, _) = destroy_all(&vm).unwrap();
        assert_eq!(n, 0);
        let l = list(&vm).unwrap();
        assert!(l.leftovers.is_empty() && l.unreadable.is_empty(), "{l:?}");
    }

    #[test]
    fn prune_keeps_the_newest_and_the_suspend_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let vm = Vm { dir: root.path().join("web1"), config: VmConfig::new("web1") };
        let cdir = vm.checkpoints_dir();
        for (i, name) in ["c1", SUSPEND_NAME, "c2", "c3", "c4"].iter().enumerate() {
            let mut m = sample_manifest();
            m.name = name.to_string();
            m.created = format!("2026-12-0{}T00:00:00Z", i + 1);
            std::fs::create_dir_all(cdir.join(name)).unwrap();
            std::fs::write(cdir.join(name).join(MANIFEST), m.to_bytes()).unwrap();
        }
        let p = prune(&vm, 2, true).unwrap();
        assert_eq!(
            (p.kept.clone(), p.deleted.clone()),
            (vec!["c4".into(), "c3".into(), SUSPEND_NAME.into()], vec!["c2".into(), "c1".into()])
        );
        assert_eq!(list(&vm).unwrap().good.len(), 5, "a dry run deletes nothing");
        prune(&vm, 2, false).unwrap();
        let names: Vec<String> = list(&vm).unwrap().good.into_iter().map(|(_, m)| m.name).collect();
        assert_eq!(names, [SUSPEND_NAME, "c3", "c4"]);
        let p = prune(&vm, 0, false).unwrap();
        assert_eq!(p.kept, [SUSPEND_NAME], "never the suspend checkpoint");
    }

    #[test]
    fn checkpoint_names_are_directory_names() {
        assert!(check_name(SUSPEND_NAME).is_ok());
        assert!(check_name("../x").is_err());
    }
}
