//! Checking a backup (checksums of its chain, `qemu-img check`, fsck of what it holds) and
//! rebuilding standalone disks from it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::manifest::Manifest;
use super::{io_err, BackupError, Consistency};
use crate::hash;
use crate::util;

fn qemu_img(args: &[&str]) -> Result<String, BackupError> {
    let out = std::process::Command::new("qemu-img").args(args).output().map_err(|e| BackupError::QemuImg {
        what: args.first().unwrap_or(&"").to_string(),
        detail: format!("cannot run qemu-img: {e}"),
    })?;
    if !out.status.success() {
        return Err(BackupError::QemuImg {
            what: args.first().unwrap_or(&"").to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The backup.
    pub id: String,
    /// True when nothing is wrong.
    pub ok: bool,
    /// One line per check: (what, passed, detail).
    pub checks: Vec<Check>,
    /// Consistency the manifest claims.
    pub consistency: Consistency,
    /// Not failures, but worth acting on: files of the backup that other users can read.
    pub warnings: Vec<String>,
}

/// One verification step.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Passed?
    pub ok: bool,
    /// Details (tool output on failure).
    pub detail: String,
}

/// Checks a backup: manifest, chain present, checksums of every file of the chain,
/// `qemu-img check`, and with `fsck`, a filesystem check of every partition it can read.
pub fn verify(dir: &Path, fsck: bool) -> Result<VerifyReport, BackupError> {
    let m = Manifest::load(dir)?;
    let parent_dir = dir.parent().unwrap_or(Path::new("."));
    let mut checks = Vec::new();
    let mut push = |what: String, ok: bool, detail: String| checks.push(Check { what, ok, detail });
    for id in &m.chain {
        let d = parent_dir.join(id);
        let cm = match Manifest::load(&d) {
            Ok(cm) => cm,
            Err(e) => {
                push(format!("chain: backup {id}"), false, e.to_string());
                continue;
            }
        };
        for disk in &cm.disks {
            let p = d.join(&disk.file);
            match hash::hash_file(&p) {
                Ok(h) if h == disk.blake3 => push(format!("checksum {id}/{}", disk.file), true, h),
                Ok(h) => {
                    push(format!("checksum {id}/{}", disk.file), false, format!("expected {}, got {h}", disk.blake3))
                }
                Err(e) => push(format!("checksum {id}/{}", disk.file), false, e.to_string()),
            }
        }
    }
    for disk in &m.disks {
        let p = dir.join(&disk.file);
        let out = std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&p).output();
        match out {
            Ok(o) if o.status.success() => push(format!("qemu-img check {}", disk.file), true, String::new()),
            Ok(o) => push(
                format!("qemu-img check {}", disk.file),
                false,
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                    .trim()
                    .to_string(),
            ),
            Err(e) => push(format!("qemu-img check {}", disk.file), false, format!("cannot run qemu-img: {e}")),
        }
        if fsck {
            match crate::inspect::fsck_image(&p) {
                Ok(results) => {
                    for r in results {
                        push(format!("fsck {} {} ({})", disk.name, r.partition, r.fstype), r.ok, r.detail);
                    }
                }
                Err(e) => push(format!("fsck {}", disk.name), false, e.to_string()),
            }
        }
    }
    let ok = checks.iter().all(|c| c.ok);
    let warnings = crate::vm::exposure_warning(dir).into_iter().collect();
    Ok(VerifyReport { id: m.id, ok, checks, consistency: m.consistency, warnings })
}

/// Rebuilds standalone disk images from a backup's chain into `out` (`NAME.qcow2` each):
/// `qemu-img convert` follows the backing chain, so the result needs nothing else.
pub fn restore(dir: &Path, out: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let m = Manifest::load(dir)?;
    let _umask = crate::vm::private_umask();
    crate::vm::create_private_dir(out).map_err(io_err(format!("cannot create {}", out.display())))?;
    let mut made = Vec::new();
    for d in &m.disks {
        let src = dir.join(&d.file);
        let dest = out.join(format!("{}.qcow2", d.name));
        if dest.exists() {
            return Err(BackupError::Io {
                what: format!("refusing to overwrite {}", dest.display()),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let tmp = out.join(format!(".{}.qcow2.restoring", d.name));
        let r = qemu_img(&["convert", "-f", "qcow2", "-O", "qcow2", src.to_str().unwrap(), tmp.to_str().unwrap()]);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err("fsync"))?;
        std::fs::rename(&tmp, &dest).map_err(io_err("rename"))?;
        made.push(dest);
    }
    util::fsync_dir(out).map_err(io_err("fsync"))?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::disks::tests::manifest_with;
    use std::io::{Read, Seek, SeekFrom, Write};

    /// A backup directory `p` holding one qcow2 image of random data and its manifest.
    fn backup_of_random_data(root: &Path) -> PathBuf {
        let dir = root.join("p");
        std::fs::create_dir(&dir).unwrap();
        let raw = root.join("data.raw");
        let mut bytes = vec![0u8; 1 << 20];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for b in bytes.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        std::fs::write(&raw, &bytes).unwrap();
        let img = dir.join("data.qcow2");
        qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()])
            .expect("qemu-img converts (apt-get install qemu-utils)");
        let mut m = manifest_with(&["data"]);
        m.disks[0].blake3 = hash::hash_file(&img).unwrap();
        std::fs::write(dir.join(super::super::manifest::MANIFEST), m.to_bytes()).unwrap();
        dir
    }

    #[test]
    fn verify_catches_one_flipped_byte_in_a_backed_up_image() {
        let d = tempfile::tempdir().unwrap();
        let dir = backup_of_random_data(d.path());
        let r = verify(&dir, false).unwrap();
        assert!(r.ok, "a good backup verifies: {:?}", r.checks);

        // One byte of the last data cluster: the image is still a valid qcow2 (qemu-img check
        // passes), only the checksum can tell.
        let img = dir.join("data.qcow2");
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let at = f.metadata().unwrap().len() - 4096;
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
        drop(f);

        let r = verify(&dir, false).unwrap();
        assert!(!r.ok, "a flipped byte fails verify: {:?}", r.checks);
        let failed: Vec<&str> = r.checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect();
        assert_eq!(failed, ["checksum p/data.qcow2"], "{:?}", r.checks);
    }
}
