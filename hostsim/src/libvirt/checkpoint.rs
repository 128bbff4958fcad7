//! Checkpoints of libvirt domains (`vmctl --connect URI checkpoint ...`): libvirt's internal
//! snapshots, which hold the whole VM (RAM, devices, and the disks inside their qcow2 images)
//! at one instant (`virsh snapshot-create-as`; `--poweroff` is libvirt's `--halt`), with
//! vmctl's manifest kept beside what libvirt keeps.
//!
//! The manifest (`STATE_DIR/libvirt/UUID/checkpoints/NAME/manifest.json`, magic
//! `vmctl-libvirt-checkpoint`, versioned and checksummed like vmctl's other manifests) holds
//! the domain, the URI, when, whether the domain was powered off after it, and the snapshot's
//! XML as libvirt dumped it. So a checkpoint whose libvirt metadata was lost (`virsh
//! snapshot-delete --metadata`, a libvirt reinstall) is still listed, and restoring it
//! redefines the metadata first (`snapshot-create --redefine`); the data itself never left the
//! images.
//!
//! Invariants: a manifest is written (under a temporary name, then renamed) only after libvirt
//! made the snapshot; a checkpoint is deleted from libvirt before its manifest goes. The calls
//! go through `virsh` (the `virt` crate 0.5 cannot create or look up snapshots).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Dom, LibvirtError};
use crate::envelope::{EnvelopeError, Format};
use crate::util;

/// The manifest's format.
pub const FORMAT: Format = Format {
    magic_key: "magic",
    magic: "vmctl-libvirt-checkpoint",
    version: 1,
    sections: &[("domain", 1), ("snapshot", 1)],
};
const MANIFEST: &str = "manifest.json";
const TMP_PREFIX: &str = ".tmp-";

/// Errors of libvirt checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// libvirt or virsh.
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// A bad name.
    #[error("`{0}` is not a checkpoint name (letters, digits, `-`, `_`, `.`; not starting with `.`)")]
    BadName(String),
    /// The name is taken.
    #[error("domain `{domain}` has a checkpoint `{name}` already")]
    Exists {
        /// The domain.
        domain: String,
        /// The name.
        name: String,
    },
    /// No such checkpoint.
    #[error("domain `{domain}` has no checkpoint `{name}` (`vmctl --connect URI checkpoint list {domain}`)")]
    NotFound {
        /// The domain.
        domain: String,
        /// The name.
        name: String,
    },
    /// A manifest could not be read.
    #[error("the manifest of checkpoint `{name}` cannot be used")]
    Manifest {
        /// The checkpoint.
        name: String,
        /// Why.
        #[source]
        source: EnvelopeError,
    },
    /// Files.
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl CheckpointError {
    /// The documented exit code: 2 for a bad name, 3 when libvirt or the domain cannot be
    /// reached, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CheckpointError::Libvirt(e) => e.exit_code(),
            CheckpointError::BadName(_) => 2,
            _ => 1,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let what = what.into();
    move |source| CheckpointError::Io { what, source }
}

/// vmctl's record of one checkpoint of a libvirt domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `vmctl-libvirt-checkpoint`.
    pub magic: String,
    /// The format version.
    pub version: u32,
    /// Section versions.
    pub sections: std::collections::BTreeMap<String, u32>,
    /// The checkpoint's name (libvirt's snapshot name).
    pub name: String,
    /// The domain's name and uuid when it was taken.
    pub domain: String,
    /// The domain's uuid.
    pub uuid: String,
    /// The libvirt URI it was taken through.
    pub uri: String,
    /// When (UTC, RFC 3339).
    pub created: String,
    /// The domain was powered off once the checkpoint was complete.
    pub poweroff: bool,
    /// How long libvirt took, ms.
    pub took_ms: f64,
    /// The snapshot's XML as libvirt dumped it (for `--redefine`).
    pub snapshot_xml: String,
}

/// One checkpoint as `checkpoint list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// When (from vmctl's manifest, else libvirt's creation time).
    pub created: String,
    /// libvirt has its metadata.
    pub in_libvirt: bool,
    /// vmctl has its manifest.
    pub in_vmctl: bool,
    /// Powered off after it (vmctl's manifest).
    pub poweroff: bool,
}

fn dir_of(state_dir: &Path, uuid: &str) -> PathBuf {
    state_dir.join("libvirt").join(uuid).join("checkpoints")
}

fn check_name(name: &str) -> Result<(), CheckpointError> {
    crate::vm::check_name(name).map_err(|_| CheckpointError::BadName(name.into()))
}

/// libvirt's snapshot names of `dom`.
fn libvirt_names(dom: &Dom) -> Result<Vec<String>, LibvirtError> {
    let out = dom.virsh(&["snapshot-list", "{}", "--name"])?;
    Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

/// Takes checkpoint `name` (default: the time) of the running or paused domain `dom`.
pub fn create(dom: &Dom, state_dir: &Path, name: Option<&str>, poweroff: bool) -> Result<Manifest, CheckpointError> {
    let name = name.map(String::from).unwrap_or_else(|| util::timestamps(SystemTime::now()).1);
    check_name(&name)?;
    if !dom.is_active() {
        return Err(LibvirtError::NotRunning(dom.name.clone()).into());
    }
    let uuid = dom.uuid()?;
    let dir = dir_of(state_dir, &uuid);
    if dir.join(&name).exists() || libvirt_names(dom)?.contains(&name) {
        return Err(CheckpointError::Exists { domain: dom.name.clone(), name });
    }
    let _umask = crate::vm::private_umask();
    crate::vm::create_private_dir(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let created = util::timestamps(SystemTime::now()).0;
    let t = Instant::now();
    let mut args = vec!["snapshot-create-as", "{}", "--name", name.as_str(), "--atomic"];
    if poweroff {
        args.push("--halt");
    }
    dom.virsh(&args)?;
    let took_ms = util::ms(t.elapsed());
    let snapshot_xml = dom.virsh(&["snapshot-dumpxml", "{}", name.as_str()])?;
    let m = Manifest {
        magic: FORMAT.magic.into(),
        version: FORMAT.version,
        sections: FORMAT.current_sections(),
        name: name.clone(),
        domain: dom.name.clone(),
        uuid,
        uri: dom.uri.clone(),
        created,
        poweroff,
        took_ms,
        snapshot_xml,
    };
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    crate::vm::create_private_dir(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
    util::write_atomic(&tmp.join(MANIFEST), &FORMAT.to_bytes(&m)).map_err(io("cannot write the manifest"))?;
    std::fs::rename(&tmp, dir.join(&name)).map_err(io("cannot rename the manifest's directory"))?;
    let _ = util::fsync_dir(&dir);
    Ok(m)
}

fn manifests(dir: &Path) -> Vec<(String, Result<Manifest, EnvelopeError>)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<_> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (!n.starts_with('.')).then(|| (n, FORMAT.read::<Manifest>(&e.path().join(MANIFEST))))
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Every checkpoint of `dom` that libvirt or vmctl knows, oldest first.
pub fn list(dom: &Dom, state_dir: &Path) -> Result<Vec<Entry>, CheckpointError> {
    let in_libvirt = libvirt_names(dom)?;
    let dir = dir_of(state_dir, &dom.uuid()?);
    let mut v: Vec<Entry> = Vec::new();
    for (name, m) in manifests(&dir) {
        let m = m.map_err(|source| CheckpointError::Manifest { name: name.clone(), source })?;
        v.push(Entry {
            in_libvirt: in_libvirt.contains(&name),
            in_vmctl: true,
            created: m.created,
            poweroff: m.poweroff,
            name,
        });
    }
    for n in in_libvirt {
        if !v.iter().any(|e| e.name == n) {
            let xml = dom.virsh(&["snapshot-dumpxml", "{}", n.as_str()]).unwrap_or_default();
            let created = creation_time(&xml).unwrap_or_default();
            v.push(Entry { name: n, created, in_libvirt: true, in_vmctl: false, poweroff: false });
        }
    }
    v.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    Ok(v)
}

/// `<creationTime>` of a snapshot XML, as RFC 3339 UTC.
fn creation_time(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let secs: i64 = doc.descendants().find(|n| n.has_tag_name("creationTime"))?.text()?.trim().parse().ok()?;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    Some(util::timestamps(t).0)
}

/// Deletes checkpoint `name`: libvirt's snapshot (its data in the images too), then vmctl's
/// manifest.
pub fn delete(dom: &Dom, state_dir: &Path, name: &str) -> Result<(), CheckpointError> {
    check_name(name)?;
    let dir = dir_of(state_dir, &dom.uuid()?).join(name);
    let in_libvirt = libvirt_names(dom)?.iter().any(|n| n == name);
    if !in_libvirt && !dir.exists() {
        return Err(CheckpointError::NotFound { domain: dom.name.clone(), name: name.into() });
    }
    if in_libvirt {
        dom.virsh(&["snapshot-delete", "{}", name])?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(format!("cannot remove {}", dir.display())))?;
    }
    Ok(())
}

/// Brings the domain back to checkpoint `name`, running; redefines libvirt's metadata from
/// vmctl's manifest first when libvirt lost it. Returns whether it had to.
pub fn restore(dom: &Dom, state_dir: &Path, name: &str) -> Result<bool, CheckpointError> {
    check_name(name)?;
    let redefined = if libvirt_names(dom)?.iter().any(|n| n == name) {
        false
    } else {
        let path = dir_of(state_dir, &dom.uuid()?).join(name).join(MANIFEST);
        if !path.exists() {
            return Err(CheckpointError::NotFound { domain: dom.name.clone(), name: name.into() });
        }
        let m: Manifest =
            FORMAT.read(&path).map_err(|source| CheckpointError::Manifest { name: name.into(), source })?;
        let xml = path.with_file_name("snapshot.xml");
        std::fs::write(&xml, &m.snapshot_xml).map_err(io(format!("cannot write {}", xml.display())))?;
        let r = dom.virsh(&["snapshot-create", "{}", xml.to_str().unwrap_or_default(), "--redefine"]);
        let _ = std::fs::remove_file(&xml);
        r?;
        true
    };
    dom.virsh(&["snapshot-revert", "{}", name, "--running"])?;
    Ok(redefined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_round_trips_and_a_flipped_byte_is_caught() {
        let m = Manifest {
            magic: FORMAT.magic.into(),
            version: 1,
            sections: FORMAT.current_sections(),
            name: "c1".into(),
            domain: "web1".into(),
            uuid: "u".into(),
            uri: "qemu:///system".into(),
            created: "2026-12-02T15:00:00Z".into(),
            poweroff: false,
            took_ms: 1.0,
            snapshot_xml: "<domainsnapshot/>".into(),
        };
        let bytes = FORMAT.to_bytes(&m);
        let back: Manifest = FORMAT.parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        assert_eq!((back.name.as_str(), back.snapshot_xml.as_str()), ("c1", "<domainsnapshot/>"));
        let bad = String::from_utf8(bytes).unwrap().replace("web1", "web2");
        assert!(matches!(FORMAT.parse::<Manifest>(&bad), Err(EnvelopeError::ChecksumMismatch { .. })));
    }

    #[test]
    fn libvirts_creation_time_is_read_as_utc() {
        let xml = "<domainsnapshot><name>c</name><creationTime>1764687600</creationTime></domainsnapshot>";
        assert_eq!(creation_time(xml).as_deref(), Some("2025-12-02T15:00:00.000Z"));
        assert_eq!(creation_time("<domainsnapshot/>"), None);
    }
}
