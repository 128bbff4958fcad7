//! The envelope of every manifest vmctl writes (backups' and checkpoints'), the checks a
//! manifest passes before anything in it is used, and the listing of a directory of them.
//!
//! A manifest is one JSON object. Its envelope: a magic (`"format": "vmctl-backup"`,
//! `"magic": "vmctl-checkpoint"`: each kind keeps the key it always had), a format version,
//! the version of each section (checkpoints), and a `checksum` (BLAKE3 of the rest, in a
//! canonical form) that vmctl writes and checks when present (manifests of older vmctls have
//! none and still read).
//!
//! Invariants:
//! - The checks run in this order, each with its own error, before the body is deserialised:
//!   magic, format version, section versions, checksum. A newer writer may have changed what
//!   fields mean, so nothing of a manifest of an unknown version is read.
//! - A directory is a complete one only when its manifest passes: directories being written
//!   carry a prefix (`.partial-`, `.tmp-`) and are listed apart, as leftovers.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::hash;

/// The key of the manifest's own checksum.
pub const CHECKSUM_KEY: &str = "checksum";

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The file could not be read.
    #[error("cannot read it")]
    Unreadable(#[source] io::Error),
    /// Not JSON at all.
    #[error("it is not JSON")]
    NotJson(#[source] serde_json::Error),
    /// Another kind of file (or another kind of manifest).
    #[error("its {key} is {found}, not \"{expected}\"")]
    BadMagic {
        /// "format" or "magic".
        key: &'static str,
        /// What it says, as JSON.
        found: String,
        /// What it must say.
        expected: &'static str,
    },
    /// No format version.
    #[error("it has no format version")]
    NoVersion,
    /// A format version this vmctl does not read.
    #[error("its format version {found} is unknown to this vmctl, which reads versions 1 to {supported}: use a vmctl at least as new as the one that wrote it (upgrade vmctl)")]
    UnknownVersion {
        /// The version found.
        found: u64,
        /// The newest this vmctl reads.
        supported: u32,
    },
    /// No section versions where the kind has sections.
    #[error("it has no section versions")]
    NoSections,
    /// A section without a version.
    #[error("it has no version for section `{0}`")]
    MissingSection(&'static str),
    /// A section newer than this vmctl reads.
    #[error("its section `{section}` version {found} is unknown to this vmctl, which reads it up to version {supported}: use a vmctl at least as new as the one that wrote it")]
    UnknownSection {
        /// The section.
        section: &'static str,
        /// The version found.
        found: u64,
        /// The newest this vmctl reads.
        supported: u32,
    },
    /// The manifest changed after it was written.
    #[error(
        "its checksum says {recorded}, its contents hash to {computed}: it was changed or damaged after it was written"
    )]
    ChecksumMismatch {
        /// The recorded checksum.
        recorded: String,
        /// The checksum of what is there.
        computed: String,
    },
    /// The body does not fit the format.
    #[error("it is malformed")]
    Malformed(#[source] serde_json::Error),
}

/// A kind of manifest: its magic, versions and sections.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// The key of the magic: "format" (backups) or "magic" (checkpoints).
    pub magic_key: &'static str,
    /// The magic.
    pub magic: &'static str,
    /// The format version this vmctl writes; it reads 1 to this.
    pub version: u32,
    /// Each section and the newest version of it this vmctl reads (and writes). A writer
    /// bumps a section's version whenever a reader must understand what changed in it.
    pub sections: &'static [(&'static str, u32)],
}

impl Format {
    /// The section versions as this vmctl writes them.
    pub fn current_sections(&self) -> BTreeMap<String, u32> {
        self.sections.iter().map(|(s, v)| (s.to_string(), *v)).collect()
    }

    /// Checks the envelope of a parsed manifest (see the module's order); removes the
    /// checksum, which is not part of the body.
    pub fn check(&self, v: &mut Value) -> Result<(), EnvelopeError> {
        if v[self.magic_key] != self.magic {
            return Err(EnvelopeError::BadMagic {
                key: self.magic_key,
                found: v[self.magic_key].to_string(),
                expected: self.magic,
            });
        }
        let version = v["version"].as_u64().ok_or(EnvelopeError::NoVersion)?;
        if version == 0 || version > self.version as u64 {
            return Err(EnvelopeError::UnknownVersion { found: version, supported: self.version });
        }
        if !self.sections.is_empty() {
            let sections = v["sections"].as_object().ok_or(EnvelopeError::NoSections)?;
            for &(section, supported) in self.sections {
                let found =
                    sections.get(section).and_then(Value::as_u64).ok_or(EnvelopeError::MissingSection(section))?;
                if found == 0 || found > supported as u64 {
                    return Err(EnvelopeError::UnknownSection { section, found, supported });
                }
            }
        }
        if let Some(obj) = v.as_object_mut() {
            if let Some(recorded) = obj.remove(CHECKSUM_KEY) {
                let recorded = recorded.as_str().unwrap_or("").to_string();
                let computed = checksum(v);
                if recorded != computed {
                    return Err(EnvelopeError::ChecksumMismatch { recorded, computed });
                }
            }
        }
        Ok(())
    }

    /// Parses and checks a manifest.
    pub fn parse<T: DeserializeOwned>(&self, text: &str) -> Result<T, EnvelopeError> {
        let mut v: Value = serde_json::from_str(text).map_err(EnvelopeError::NotJson)?;
        self.check(&mut v)?;
        serde_json::from_value(v).map_err(EnvelopeError::Malformed)
    }

    /// Reads, parses and checks a manifest file.
    pub fn read<T: DeserializeOwned>(&self, path: &Path) -> Result<T, EnvelopeError> {
        let text = std::fs::read_to_string(path).map_err(EnvelopeError::Unreadable)?;
        self.parse(&text)
    }

    /// The manifest's bytes as written: the body, pretty, with its checksum.
    pub fn to_bytes<T: Serialize>(&self, body: &T) -> Vec<u8> {
        let mut v = serde_json::to_value(body).expect("a manifest serialises");
        if let Some(obj) = v.as_object_mut() {
            obj.remove(CHECKSUM_KEY);
        }
        let sum = checksum(&v);
        if let Some(obj) = v.as_object_mut() {
            obj.insert(CHECKSUM_KEY.into(), Value::String(sum));
        }
        serde_json::to_vec_pretty(&v).expect("a manifest serialises")
    }
}

/// "blake3:HEX" of the canonical form of `v`: compact, keys sorted at every level, so that
/// the checksum does not depend on how a JSON library orders or spaces what it writes.
fn checksum(v: &Value) -> String {
    let mut out = Vec::new();
    canonical(v, &mut out);
    format!("blake3:{}", hash::hash_bytes(&out))
}

fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serialises"));
                out.push(b':');
                canonical(&m[k], out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        x => out.extend(serde_json::to_vec(x).expect("a scalar serialises")),
    }
}

/// A directory of backups or checkpoints.
#[derive(Debug)]
pub struct Listing<M> {
    /// The complete ones (the caller sorts them).
    pub good: Vec<(PathBuf, M)>,
    /// Directories being written, or left by a vmctl that did not finish (the prefix).
    pub leftovers: Vec<PathBuf>,
    /// Directories whose manifest is missing or refused, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
}

impl<M> Default for Listing<M> {
    fn default() -> Self {
        Listing { good: Vec::new(), leftovers: Vec::new(), unreadable: Vec::new() }
    }
}

/// Lists `dir`: subdirectories named `PREFIX...` are leftovers, other hidden entries are not
/// vmctl's and are skipped, every other subdirectory is good when `load` accepts it. A
/// missing `dir` lists nothing.
pub fn list<M, E>(dir: &Path, partial_prefix: &str, load: impl Fn(&Path) -> Result<M, E>) -> io::Result<Listing<M>>
where
    E: std::error::Error + 'static,
{
    let mut out = Listing::default();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(partial_prefix) {
            out.leftovers.push(p);
        } else if name.starts_with('.') {
            continue;
        } else {
            match load(&p) {
                Ok(m) => out.good.push((p, m)),
                Err(e) => out.unreadable.push((p, crate::util::error_chain(&e))),
            }
        }
    }
    out.leftovers.sort();
    out.unreadable.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const F: Format =
        Format { magic_key: "magic", magic: "vmctl-test", version: 2, sections: &[("vm", 1), ("disks", 3)] };

    fn good() -> Value {
        json!({"magic": "vmctl-test", "version": 2, "sections": {"vm": 1, "disks": 3}, "x": [1.25, "a"], "y": {"b": 1, "a": 2}})
    }

    fn check(v: Value) -> Result<Value, EnvelopeError> {
        let mut v = v;
        F.check(&mut v).map(|_| v)
    }

    #[test]
    fn a_written_manifest_reads_back_and_carries_its_checksum() {
        let bytes = F.to_bytes(&good());
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v[CHECKSUM_KEY].as_str().unwrap().starts_with("blake3:"));
        let back: Value = F.parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        assert_eq!(back, good(), "the checksum is not part of the body");
        // An older vmctl's manifest has no checksum: it still reads.
        assert_eq!(check(good()).unwrap(), good());
    }

    #[test]
    fn bad_magic_is_refused_by_name() {
        let mut v = good();
        v["magic"] = json!("vmctl-backup");
        assert!(matches!(check(v), Err(EnvelopeError::BadMagic { key: "magic", .. })));
        assert!(matches!(check(json!([1])), Err(EnvelopeError::BadMagic { .. })));
    }

    #[test]
    fn a_newer_format_version_is_refused_with_the_fix() {
        let mut v = good();
        v["version"] = json!(3);
        let e = check(v).unwrap_err();
        assert!(matches!(e, EnvelopeError::UnknownVersion { found: 3, supported: 2 }), "{e}");
        assert!(e.to_string().contains("format version 3") && e.to_string().contains("upgrade vmctl"), "{e}");
        let mut v = good();
        v["version"] = json!(0);
        assert!(matches!(check(v), Err(EnvelopeError::UnknownVersion { found: 0, .. })));
        let mut v = good();
        v.as_object_mut().unwrap().remove("version");
        assert!(matches!(check(v), Err(EnvelopeError::NoVersion)));
    }

    #[test]
    fn an_unknown_or_missing_section_version_is_refused_by_name() {
        let mut v = good();
        v["sections"]["disks"] = json!(4);
        let e = check(v).unwrap_err();
        assert!(matches!(e, EnvelopeError::UnknownSection { section: "disks", found: 4, supported: 3 }), "{e}");
        assert!(e.to_string().contains("section `disks` version 4"), "{e}");
        let mut v = good();
        v["sections"].as_object_mut().unwrap().remove("vm");
        assert!(matches!(check(v), Err(EnvelopeError::MissingSection("vm"))));
        let mut v = good();
        v.as_object_mut().unwrap().remove("sections");
        assert!(matches!(check(v), Err(EnvelopeError::NoSections)));
    }

    #[test]
    fn a_changed_manifest_fails_its_checksum() {
        let bytes = F.to_bytes(&good());
        let text = String::from_utf8(bytes).unwrap().replace("1.25", "1.5");
        let e = F.parse::<Value>(&text).unwrap_err();
        assert!(matches!(e, EnvelopeError::ChecksumMismatch { .. }), "{e}");
        // Reordering or reindenting what was written is no change.
        let v: Value = serde_json::from_slice(&F.to_bytes(&good())).unwrap();
        F.parse::<Value>(&serde_json::to_string(&v).unwrap()).unwrap();
    }

    #[test]
    fn not_json_and_malformed_bodies_are_told_apart() {
        assert!(matches!(F.parse::<Value>("{nope"), Err(EnvelopeError::NotJson(_))));
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            needed: u32,
        }
        assert!(matches!(F.parse::<Body>(&good().to_string()), Err(EnvelopeError::Malformed(_))));
        assert!(matches!(F.read::<Value>(Path::new("/nonexistent/m.json")), Err(EnvelopeError::Unreadable(_))));
    }

    #[test]
    fn a_listing_tells_complete_from_leftover_and_unreadable() {
        let d = tempfile::tempdir().unwrap();
        for n in ["a", "b", ".partial-c", ".other", "junk"] {
            std::fs::create_dir(d.path().join(n)).unwrap();
        }
        std::fs::write(d.path().join("file"), b"").unwrap();
        let l = list(d.path(), ".partial-", |p| {
            if p.ends_with("junk") {
                Err(io::Error::other("no manifest"))
            } else {
                Ok(p.file_name().unwrap().to_string_lossy().into_owned())
            }
        })
        .unwrap();
        let mut good: Vec<_> = l.good.iter().map(|(_, m)| m.as_str()).collect();
        good.sort();
        assert_eq!(good, ["a", "b"]);
        assert_eq!(l.leftovers, [d.path().join(".partial-c")]);
        assert_eq!(l.unreadable, [(d.path().join("junk"), "no manifest".to_string())]);
        assert!(list(&d.path().join("missing"), ".tmp-", |_| Ok::<_, io::Error>(())).unwrap().good.is_empty());
    }
}
