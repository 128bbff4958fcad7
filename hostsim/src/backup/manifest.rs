//! What a backup records (`manifest.json`), and the listing of a target directory.
//!
//! The envelope (`"format": "vmctl-backup"`, the version, the manifest's own checksum) is
//! [`crate::envelope`]'s; manifests written before it (no checksum) still read.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::disks::SourceDisk;
use super::{io_err, BackupError, Consistency, PARTIAL_PREFIX};
use crate::envelope::{self, Format};
use crate::quiesce::Quiesce;
use crate::timings::Timings;

/// The backup manifest's envelope: `"format": "vmctl-backup"`, version 1, no sections.
pub const FORMAT: Format = Format { magic_key: "format", magic: "vmctl-backup", version: 1, sections: &[] };
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// A disk in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// Name (also `NAME.qcow2`).
    pub name: String,
    /// The file in the backup directory.
    pub file: String,
    /// The backing file for incrementals (relative: `../PARENT/NAME.qcow2`).
    pub backing: Option<String>,
    /// What it was in QEMU.
    pub source: SourceDisk,
    /// Bytes the block job copied.
    pub copied_bytes: u64,
    /// Size of the backup file.
    pub file_size: u64,
    /// BLAKE3 of the backup file.
    pub blake3: String,
    /// The bitmap that the next incremental starts from (None for non-qcow2 sources).
    pub bitmap: Option<String>,
}

/// The agent's part.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct QuiesceReport {
    /// Policy asked for.
    pub policy: Option<Quiesce>,
    /// "vssd 0.1.0" / "qemu-ga 7.2.22" / None.
    pub agent: Option<String>,
    /// How many filesystems were frozen.
    pub frozen: Option<u64>,
    /// vssd's `vssd-freeze` report, as it came.
    pub report: Option<Value>,
    /// Why the backup is not quiesced, or anything odd.
    pub note: Option<String>,
    /// The thaw's answer (count, or error text).
    pub thaw: Option<Value>,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "vmctl-backup".
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// The backup's id (also its directory name).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// When the point-in-time was taken (UTC).
    pub created: String,
    /// "full" or "incremental".
    pub kind: String,
    /// The backup this one builds on.
    pub parent: Option<String>,
    /// Every backup needed to restore, oldest (the full) first, this one last.
    pub chain: Vec<String>,
    /// What the backup promises.
    pub consistency: Consistency,
    /// The agent's part.
    pub quiesce: QuiesceReport,
    /// Timings ([`super::step`]).
    pub timings: Timings,
    /// Disks.
    pub disks: Vec<ManifestDisk>,
    /// QEMU's version.
    pub qemu_version: String,
    /// The VM's configuration (vmctl VMs), or null (attach mode).
    pub vm_config: Option<Value>,
    /// vmctl's version.
    pub vmctl_version: String,
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, BackupError> {
        let path = dir.join(MANIFEST);
        FORMAT.read(&path).map_err(|source| BackupError::Manifest { path: path.display().to_string(), source })
    }

    /// The manifest's bytes as written (with its checksum).
    pub fn to_bytes(&self) -> Vec<u8> {
        FORMAT.to_bytes(self)
    }
}

/// A target's backups: the complete ones oldest first, and the partial leftovers
/// (`.partial-*`) of a vmctl that did not finish. Directories without a usable manifest are
/// not vmctl's backups and are not reported.
pub type Listing = envelope::Listing<Manifest>;

/// Lists the complete backups in `target` (oldest first) and the hidden partial ones.
pub fn list(target: &Path) -> Result<Listing, BackupError> {
    let mut l = envelope::list(target, PARTIAL_PREFIX, Manifest::load)
        .map_err(io_err(format!("cannot read {}", target.display())))?;
    l.good.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.1.id.cmp(&b.1.id)));
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::disks::tests::manifest_with;
    use serde_json::json;

    /// A manifest as vmctl 0.1 wrote it (before the shared envelope: no checksum), as an
    /// existing backup has it on disk.
    const V01_MANIFEST: &str = r#"{
  "format": "vmctl-backup",
  "version": 1,
  "id": "web1-20260101-120000-000-full",
  "vm": "web1",
  "created": "2026-01-01T12:00:00.000Z",
  "kind": "full",
  "parent": null,
  "chain": ["web1-20260101-120000-000-full"],
  "consistency": "filesystem",
  "quiesce": {"policy": "best-effort", "agent": "vssd 0.1.0", "frozen": 2,
              "report": {"frozen": 2, "mounts": []}, "note": null, "thaw": 2},
  "timings": {"prepare_ms": 120.5, "targets_ms": 60.25, "agent_ms": 30.0, "agent_wait_ms": 0.0,
              "freeze_ms": 8.5, "transaction_ms": 4.0, "thaw_ms": 3.0, "freeze_window_ms": 15.5,
              "copy_ms": 2000.0, "finish_ms": 300.0, "fsync_ms": 250.0, "hash_ms": 120.0, "total_ms": 2500.0},
  "disks": [{"name": "data", "file": "data.qcow2", "backing": null,
             "source": {"name": "data", "node": "data", "device": "/machine/peripheral/vd-data/virtio-backend",
                        "file": "/var/lib/vmctl/web1/disks/data.qcow2", "format": "qcow2",
                        "virtual_size": 67108864, "actual_size": 2424832},
             "copied_bytes": 2359296, "file_size": 2555904,
             "blake3": "5d6a9e2cbd83f3d2a4f1f7f2c3a3c0e1b0f6e2d1c4b3a29180706f5e4d3c2b1a",
             "bitmap": "vmctl-web1-20260101-120000-000-full"}],
  "qemu_version": "7.2.22",
  "vm_config": {"name": "web1", "memory-mib": 512},
  "vmctl_version": "0.1.0"
}"#;

    #[test]
    fn a_backup_manifest_written_by_vmctl_0_1_still_reads_and_lists() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("web1-20260101-120000-000-full");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join(MANIFEST), V01_MANIFEST).unwrap();
        let m = Manifest::load(&b).unwrap();
        assert_eq!((m.consistency, m.quiesce.frozen), (Consistency::Filesystem, Some(2)));
        assert_eq!(m.timings.get(crate::backup::step::FREEZE_WINDOW), 15.5);
        assert_eq!(m.disks[0].source.virtual_size, 67108864);
        assert_eq!(list(d.path()).unwrap().good.len(), 1);
    }

    #[test]
    fn a_manifest_written_now_carries_its_checksum_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let mut m = manifest_with(&["data"]);
        m.timings = Timings::new(crate::backup::step::ALL);
        std::fs::write(d.path().join(MANIFEST), m.to_bytes()).unwrap();
        let back = Manifest::load(d.path()).unwrap();
        assert_eq!(back.timings, m.timings);
        let text = std::fs::read_to_string(d.path().join(MANIFEST)).unwrap();
        assert!(text.contains("\"checksum\": \"blake3:"), "{text}");
        std::fs::write(d.path().join(MANIFEST), text.replace("\"full\"", "\"incremental\"")).unwrap();
        let e = crate::util::error_chain(&Manifest::load(d.path()).unwrap_err());
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn manifests_of_unknown_versions_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MANIFEST), r#"{"format":"vmctl-backup","version":99}"#).unwrap();
        let e = crate::util::error_chain(&Manifest::load(d.path()).unwrap_err());
        assert!(e.contains("upgrade vmctl"), "{e}");
        std::fs::write(d.path().join(MANIFEST), r#"{"format":"other","version":1}"#).unwrap();
        assert!(Manifest::load(d.path()).is_err());
    }

    #[test]
    fn manifests_without_the_newer_timings_still_load() {
        let d = tempfile::tempdir().unwrap();
        let m = manifest_with(&["data"]);
        let mut v = serde_json::to_value(&m).unwrap();
        v["timings"] = json!({"prepare_ms": 1.0, "freeze_ms": 2.0, "transaction_ms": 3.0, "thaw_ms": 4.0,
            "freeze_window_ms": 9.0, "copy_ms": 5.0, "finish_ms": 6.0, "total_ms": 20.0});
        std::fs::write(d.path().join(MANIFEST), serde_json::to_vec(&v).unwrap()).unwrap();
        let m = Manifest::load(d.path()).unwrap();
        assert_eq!((m.timings.get("total_ms"), m.timings.get("agent_ms"), m.timings.get("hash_ms")), (20.0, 0.0, 0.0));
    }

    #[test]
    fn list_ignores_partial_and_unreadable_directories() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".partial-x")).unwrap();
        std::fs::create_dir(d.path().join("junk")).unwrap();
        let l = list(d.path()).unwrap();
        assert!(l.good.is_empty());
        assert_eq!(l.leftovers.len(), 1);
    }
}
