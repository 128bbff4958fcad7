//! What a checkpoint records (`manifest.json`), and the checks of a checkpoint's files
//! against it before a restore uses them.
//!
//! The manifest carries what the migration stream does not: the VM's configuration, the QEMU
//! version and the resolved machine type, every disk's image chain, each file's size and
//! BLAKE3 checksum. Its envelope (magic, format and section versions, its own checksum) is
//! [`crate::envelope`]'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, CheckpointError};
use crate::envelope::Format;
use crate::timings::Timings;
use crate::vm::VmConfig;

/// The checkpoint manifest's envelope: `"magic": "vmctl-checkpoint"`, format version 1, and
/// the sections `vm` (config, run-state, quiesce), `qemu`, `disks`, `state`.
pub const FORMAT: Format = Format {
    magic_key: "magic",
    magic: "vmctl-checkpoint",
    version: 1,
    sections: &[("vm", 1), ("qemu", 1), ("disks", 1), ("state", 1)],
};
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The RAM + device state stream's file name.
pub const STATE_FILE: &str = "state.bin";

/// A file and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRecord {
    /// Relative to the checkpoint directory.
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// BLAKE3, hex.
    pub blake3: String,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageRecord {
    /// Absolute path (overlays record their backing files by absolute path too).
    pub path: PathBuf,
    /// Image format.
    pub format: String,
    /// Bytes of the file.
    pub size: u64,
    /// BLAKE3 of the file, hex.
    pub blake3: String,
    /// Modification time (ns since the epoch) when hashed: lets a later checkpoint reuse the
    /// checksum of an image it shares. Not checked at restore.
    #[serde(default)]
    pub mtime_ns: u128,
}

/// A disk at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskRecord {
    /// The disk's name in the VM's config.
    pub name: String,
    /// QEMU's node name of its top image at the checkpoint.
    pub node: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// The chain at the checkpoint, top first: the images the checkpoint keeps (immutable
    /// from the checkpoint on; the VM went on writing to `overlay`).
    pub chain: Vec<ImageRecord>,
    /// The overlay the running VM went on with (informational; deleted when unreferenced).
    pub overlay: Option<PathBuf>,
}

/// The QEMU that wrote the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuRecord {
    /// "7.2.22".
    pub version: String,
    /// The distribution's package string, if any.
    #[serde(default)]
    pub package: String,
    /// The resolved machine type ("pc-q35-7.2"), not an alias: a newer QEMU's `q35` is another
    /// machine, and the stream loads only into the same one.
    pub machine: String,
    /// "kvm" or "tcg".
    pub accel: String,
}

/// How the guest was quiesced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QuiesceRecord {
    /// The policy asked for.
    pub policy: String,
    /// The agent that froze, e.g. "vssd 0.1.0".
    pub agent: Option<String>,
    /// Filesystems frozen in the saved state: a restore thaws them.
    pub frozen: Option<u64>,
    /// Why not, when it was not.
    pub note: Option<String>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// Always `vmctl-checkpoint` ([`FORMAT`]).
    pub magic: String,
    /// [`FORMAT`]'s version.
    pub version: u32,
    /// The version of each section: `vm` (config, run-state, quiesce), `qemu`, `disks`, `state`.
    /// A writer bumps a section's version whenever a restore must understand what changed in
    /// it (a new VmConfig field that changes the machine bumps `vm`); a reader refuses any
    /// section newer than it knows, and any other `version`.
    pub sections: BTreeMap<String, u32>,
    /// The checkpoint's name (also its directory's).
    pub name: String,
    /// The VM's name.
    pub vm: String,
    /// When the VM was stopped for it (UTC).
    pub created: String,
    /// "checkpoint", or "suspend" for `vmctl suspend`.
    pub kind: String,
    /// The VM was powered off after the checkpoint.
    pub poweroff: bool,
    /// The VM's configuration at the checkpoint (memory, cpus, machine, disks, ports...).
    pub config: VmConfig,
    /// "running" or "paused": what the guest was doing; a restore gives it back.
    pub run_state: String,
    /// The agent's part.
    pub quiesce: QuiesceRecord,
    /// The QEMU that wrote the stream.
    pub qemu: QemuRecord,
    /// Every disk's chain.
    pub disks: Vec<DiskRecord>,
    /// The migration stream.
    pub state: FileRecord,
    /// QEMU's count of guest RAM, bytes.
    pub ram_bytes: u64,
    /// Timings of the create ([`super::step::CREATE`]).
    pub timings: Timings,
    /// The vmctl that wrote it.
    pub vmctl_version: String,
}

impl Manifest {
    /// Parses a manifest (`path` names it in errors), refusing an unknown format or section
    /// version before anything else is read (a newer writer may have changed what the fields
    /// mean).
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, CheckpointError> {
        FORMAT.parse(text).map_err(|source| CheckpointError::Manifest { path: path.display().to_string(), source })
    }

    /// Reads `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, CheckpointError> {
        let path = dir.join(MANIFEST);
        FORMAT.read(&path).map_err(|source| CheckpointError::Manifest { path: path.display().to_string(), source })
    }

    /// The manifest's bytes as written (with its checksum).
    pub fn to_bytes(&self) -> Vec<u8> {
        FORMAT.to_bytes(self)
    }
}

/// Refuses a checkpoint whose files are missing or of the wrong size, before anything is done.
pub fn check_files(dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    let name = &m.name;
    if m.state.file.contains('/') || m.state.file.starts_with('.') {
        return Err(CheckpointError::Inconsistent {
            path: dir.join(MANIFEST).display().to_string(),
            why: "a state file outside it".into(),
        });
    }
    let state = dir.join(&m.state.file);
    let check = |what: String, path: &Path, size: u64| -> Result<(), CheckpointError> {
        match std::fs::metadata(path) {
            Err(_) => Err(CheckpointError::Missing { name: name.clone(), what, path: path.display().to_string() }),
            Ok(md) if md.len() != size => Err(CheckpointError::Truncated {
                name: name.clone(),
                path: path.display().to_string(),
                expected: size,
                found: md.len(),
            }),
            Ok(_) => Ok(()),
        }
    };
    check("the state file".into(), &state, m.state.size)?;
    for c in &m.config.disks {
        let Some(d) = m.disks.iter().find(|d| d.name == c.name) else {
            return Err(CheckpointError::Inconsistent {
                path: dir.join(MANIFEST).display().to_string(),
                why: format!("disk `{}` of the config has no chain", c.name),
            });
        };
        if d.chain.is_empty() {
            return Err(CheckpointError::Inconsistent {
                path: dir.join(MANIFEST).display().to_string(),
                why: format!("disk `{}` has an empty chain", c.name),
            });
        }
        for i in &d.chain {
            check(format!("disk `{}`'s image", d.name), &i.path, i.size)?;
        }
    }
    for (what, p) in [("the kernel", &m.config.kernel), ("the initramfs", &m.config.initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(CheckpointError::Missing {
                    name: name.clone(),
                    what: what.into(),
                    path: p.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Checks every disk image of the checkpoint against its checksum (they are big: a restore
/// runs this alongside the stream).
pub fn verify_images(m: &Manifest) -> Result<(), CheckpointError> {
    for d in &m.disks {
        for i in &d.chain {
            let h = crate::hash::hash_file(&i.path).map_err(io_err(format!("cannot read {}", i.path.display())))?;
            if h != i.blake3 {
                return Err(CheckpointError::ChecksumMismatch {
                    name: m.name.clone(),
                    path: i.path.display().to_string(),
                    expected: i.blake3.clone(),
                    found: h,
                });
            }
        }
    }
    Ok(())
}

/// Shared by the tests of the checkpoint modules.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::checkpoint::stream::Digest;

    /// Deterministic bytes that are not all alike (xorshift).
    pub fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    pub fn digest_of(d: &[u8]) -> Digest {
        Digest { size: d.len() as u64, blake3: blake3::hash(d).to_hex().to_string() }
    }

    pub fn sample_manifest() -> Manifest {
        let mut config = VmConfig::new("web1");
        config.disks.push(crate::vm::DiskConfig {
            name: "data".into(),
            path: "disks/data.qcow2".into(),
            format: "qcow2".into(),
        });
        Manifest {
            magic: FORMAT.magic.into(),
            version: FORMAT.version,
            sections: FORMAT.current_sections(),
            name: "c1".into(),
            vm: "web1".into(),
            created: "2026-01-01T12:00:00.000Z".into(),
            kind: "checkpoint".into(),
            poweroff: false,
            config,
            run_state: "running".into(),
            quiesce: QuiesceRecord { policy: "off".into(), ..Default::default() },
            qemu: QemuRecord {
                version: "7.2.22".into(),
                package: "Debian".into(),
                machine: "pc-q35-7.2".into(),
                accel: "tcg".into(),
            },
            disks: vec![DiskRecord {
                name: "data".into(),
                node: "data".into(),
                virtual_size: 1 << 30,
                chain: vec![ImageRecord {
                    path: "/nonexistent/data.qcow2".into(),
                    format: "qcow2".into(),
                    size: 1,
                    blake3: "x".into(),
                    mtime_ns: 0,
                }],
                overlay: None,
            }],
            state: FileRecord { file: STATE_FILE.into(), size: 3, blake3: "abc".into() },
            ram_bytes: 512 << 20,
            timings: Timings::new(crate::checkpoint::step::CREATE),
            vmctl_version: "0.1.0".into(),
        }
    }

    /// A checkpoint directory with a real state file and disk image, and its manifest.
    pub fn sample_dir(state: &[u8]) -> (tempfile::TempDir, Manifest) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STATE_FILE), state).unwrap();
        let img = d.path().join("data.qcow2");
        std::fs::write(&img, b"disk image").unwrap();
        let mut m = sample_manifest();
        m.state = FileRecord { file: STATE_FILE.into(), size: state.len() as u64, blake3: digest_of(state).blake3 };
        m.disks[0].chain[0] = ImageRecord {
            path: img,
            format: "qcow2".into(),
            size: 10,
            blake3: digest_of(b"disk image").blake3,
            mtime_ns: 0,
        };
        (d, m)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::envelope::EnvelopeError;
    use serde_json::{json, Value};

    /// A manifest as vmctl 0.1 wrote it (before the shared envelope: no checksum; the timings
    /// a struct of its own), byte for byte in its layout.
    const V01_MANIFEST: &str = r#"{
  "magic": "vmctl-checkpoint",
  "version": 1,
  "sections": {"disks": 1, "qemu": 1, "state": 1, "vm": 1},
  "name": "c1",
  "vm": "web1",
  "created": "2026-01-01T12:00:00.000Z",
  "kind": "checkpoint",
  "poweroff": false,
  "config": {"name": "web1", "memory-mib": 512, "cpus": 2, "accel": "auto", "machine": "q35",
             "qemu": "qemu-system-x86_64", "agent": true,
             "disk": [{"name": "data", "path": "disks/data.qcow2", "format": "qcow2"}], "port": []},
  "run-state": "running",
  "quiesce": {"policy": "best-effort", "agent": "vssd 0.1.0", "frozen": 2, "note": null},
  "qemu": {"version": "7.2.22", "package": "Debian 1:7.2+dfsg-7", "machine": "pc-q35-7.2", "accel": "tcg"},
  "disks": [{"name": "data", "node": "data", "virtual-size": 1073741824,
             "chain": [{"path": "/var/lib/vmctl/web1/disks/data.qcow2", "format": "qcow2", "size": 196768,
                        "blake3": "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
                        "mtime-ns": 1767268800000000000}],
             "overlay": "/var/lib/vmctl/web1/overlays/data-20260101-120000-000-after-c1.qcow2"}],
  "state": {"file": "state.bin", "size": 123456,
            "blake3": "d74981efa70a0c880b8d8c1985d075dbcbf679b99a5f9914e5aaf96b831a9e24"},
  "ram-bytes": 536870912,
  "timings": {"freeze-ms": 3.1, "snapshot-ms": 4.2, "stream-ms": 900.5, "downtime-ms": 910.0,
              "qemu-downtime-ms": 890.0, "sync-ms": 20.0, "disk-hash-ms": 1.5, "total-ms": 1000.25},
  "vmctl-version": "0.1.0"
}"#;

    #[test]
    fn a_manifest_written_by_vmctl_0_1_still_reads() {
        let m = Manifest::parse(V01_MANIFEST, Path::new("m.json")).unwrap();
        assert_eq!(m.quiesce.frozen, Some(2));
        assert_eq!(m.disks[0].chain[0].mtime_ns, 1_767_268_800_000_000_000);
        assert_eq!(m.timings.get(crate::checkpoint::step::DOWNTIME), 910.0);
        assert_eq!(m.config.disks[0].name, "data");
    }

    #[test]
    fn the_manifest_round_trips() {
        let m = sample_manifest();
        let bytes = m.to_bytes();
        let back = Manifest::parse(std::str::from_utf8(&bytes).unwrap(), Path::new("m.json")).unwrap();
        assert_eq!(back, m);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["magic"], "vmctl-checkpoint");
        assert_eq!(v["sections"]["disks"], 1);
        assert_eq!(v["config"]["memory-mib"], 512);
        assert_eq!(v["timings"]["downtime-ms"], 0.0, "every step is written, also when 0");
        assert!(v["checksum"].as_str().unwrap().starts_with("blake3:"));
    }

    #[test]
    fn unknown_versions_and_foreign_files_are_refused_by_name() {
        let good: Value = serde_json::to_value(sample_manifest()).unwrap();
        let parse = |v: &Value| Manifest::parse(&v.to_string(), Path::new("m.json"));
        let source = |e: CheckpointError| match e {
            CheckpointError::Manifest { source, .. } => source,
            e => panic!("{e}"),
        };

        let mut v = good.clone();
        v["version"] = json!(2);
        let e = parse(&v).unwrap_err();
        assert_eq!(e.exit_code(), 5);
        let chain = crate::util::error_chain(&e);
        assert!(chain.starts_with("m.json is not a usable") && chain.contains("format version 2"), "{chain}");
        assert!(matches!(source(e), EnvelopeError::UnknownVersion { found: 2, .. }));

        let mut v = good.clone();
        v["sections"]["state"] = json!(9);
        let e = source(parse(&v).unwrap_err());
        assert!(e.to_string().contains("section `state` version 9"), "{e}");

        let mut v = good.clone();
        v["sections"].as_object_mut().unwrap().remove("disks");
        assert!(matches!(source(parse(&v).unwrap_err()), EnvelopeError::MissingSection("disks")));

        let mut v = good.clone();
        v["magic"] = json!("vmctl-backup");
        assert!(matches!(source(parse(&v).unwrap_err()), EnvelopeError::BadMagic { .. }));
        assert!(matches!(
            source(Manifest::parse("{not json", Path::new("m.json")).unwrap_err()),
            EnvelopeError::NotJson(_)
        ));
    }

    #[test]
    fn a_truncated_state_file_is_refused_before_anything_starts() {
        let state = data(1000, 5);
        let (d, m) = sample_dir(&state);
        check_files(d.path(), &m).unwrap();
        std::fs::write(d.path().join(STATE_FILE), &state[..999]).unwrap();
        let e = check_files(d.path(), &m).unwrap_err();
        assert!(matches!(e, CheckpointError::Truncated { expected: 1000, found: 999, .. }), "{e}");
        assert!(e.to_string().contains(STATE_FILE), "{e}");
        std::fs::remove_file(d.path().join(STATE_FILE)).unwrap();
        assert!(matches!(check_files(d.path(), &m).unwrap_err(), CheckpointError::Missing { .. }));
    }

    #[test]
    fn a_missing_disk_image_is_refused_by_name() {
        let (d, m) = sample_dir(b"abc");
        std::fs::remove_file(d.path().join("data.qcow2")).unwrap();
        let e = check_files(d.path(), &m).unwrap_err();
        assert!(e.to_string().contains("disk `data`'s image") && e.to_string().contains("data.qcow2"), "{e}");
    }

    #[test]
    fn a_changed_disk_image_fails_its_checksum() {
        let (d, m) = sample_dir(b"abc");
        verify_images(&m).unwrap();
        std::fs::write(d.path().join("data.qcow2"), b"disk imagf").unwrap();
        let e = verify_images(&m).unwrap_err();
        assert!(matches!(e, CheckpointError::ChecksumMismatch { .. }) && e.to_string().contains("data.qcow2"), "{e}");
    }
}
