//! Looking inside a backed-up disk: flatten it to a scratch raw image, find its partitions,
//! check their filesystems, mount them. Needs root (loop devices); everything it makes is
//! scratch and is removed on drop, also when a check panics.
//!
//! Why a scratch copy: a frozen XFS leaves a dirty log in a point-in-time copy, and
//! `xfs_repair -n` complains until the log is replayed, which writes. The backup itself is
//! never written.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Errors of image inspection.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// A tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The tool.
        tool: String,
        /// Its output.
        detail: String,
    },
    /// File system trouble.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn run(tool: &str, args: &[&str]) -> Result<String, InspectError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| InspectError::Tool { tool: tool.into(), detail: format!("cannot run it: {e}") })?;
    if !out.status.success() {
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if tool == "losetup" && !nix::unistd::geteuid().is_root() {
            detail.push_str(" (filesystem checks need root for loop devices: run as root, or pass --no-fsck)");
        }
        return Err(InspectError::Tool { tool: format!("{tool} {}", args.join(" ")), detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One partition (or the whole disk) of a flattened image.
#[derive(Debug, Clone)]
pub struct Partition {
    /// "p1", "p2", ... or "whole".
    pub name: String,
    /// The loop device.
    pub dev: PathBuf,
    /// The filesystem type blkid found ("" when none).
    pub fstype: String,
    /// Its label.
    pub label: String,
}

/// A backed-up disk flattened into a scratch raw file, its partitions on loop devices.
pub struct RawImage {
    dir: PathBuf,
    /// The partitions.
    pub partitions: Vec<Partition>,
    mounts: Vec<PathBuf>,
}

impl RawImage {
    /// Flattens `image` (following its backing chain) into a scratch directory and attaches
    /// its partitions.
    pub fn open(image: &Path) -> Result<RawImage, InspectError> {
        let base = std::env::var_os("VMCTL_SCRATCH").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "vmctl-inspect-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir_all(&dir)?;
        let mut me = RawImage { dir, partitions: Vec::new(), mounts: Vec::new() };
        let raw = me.dir.join("disk.raw");
        run("qemu-img", &["convert", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()])?;
        let raw_s = raw.to_str().unwrap().to_string();
        let table = Command::new("sfdisk").args(["-J", &raw_s]).output().ok().filter(|o| o.status.success());
        let mut parts: Vec<(String, u64, u64)> = Vec::new();
        if let Some(o) = table {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
            for (i, p) in v["partitiontable"]["partitions"].as_array().into_iter().flatten().enumerate() {
                let start = p["start"].as_u64().unwrap_or(0) * ss;
                let size = p["size"].as_u64().unwrap_or(0) * ss;
                if size > 0 {
                    parts.push((format!("p{}", i + 1), start, size));
                }
            }
        }
        if parts.is_empty() {
            let size = std::fs::metadata(&raw)?.len();
            parts.push(("whole".into(), 0, size));
        }
        for (name, off, size) in parts {
            let dev = run(
                "losetup",
                &["--find", "--show", "--offset", &off.to_string(), "--sizelimit", &size.to_string(), &raw_s],
            )?;
            let dev = PathBuf::from(dev.trim());
            let probe = |tag: &str| {
                Command::new("blkid")
                    .args(["-p", "-o", "value", "-s", tag])
                    .arg(&dev)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default()
            };
            let fstype = probe("TYPE");
            let label = probe("LABEL");
            me.partitions.push(Partition { name, dev, fstype, label });
        }
        Ok(me)
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks every partition's filesystem without repairing (XFS: after replaying its log).
    pub fn fsck(&self) -> Vec<FsckResult> {
        self.partitions.iter().map(|p| self.fsck_one(p)).collect()
    }

    fn fsck_one(&self, p: &Partition) -> FsckResult {
        let dev = p.dev.to_str().unwrap();
        let res = |ok: bool, detail: String| FsckResult {
            partition: p.name.clone(),
            fstype: p.fstype.clone(),
            label: p.label.clone(),
            ok,
            detail,
        };
        let out = |tool: &str, args: &[&str]| -> (bool, String) {
            match Command::new(tool).args(args).output() {
                Ok(o) => (
                    o.status.success(),
                    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                        .trim()
                        .to_string(),
                ),
                Err(e) => (false, format!("cannot run {tool}: {e}")),
            }
        };
        match p.fstype.as_str() {
            "ext2" | "ext3" | "ext4" => {
                let (ok, d) = out("e2fsck", &["-fn", dev]);
                res(ok, if ok { "e2fsck -fn: clean".into() } else { d })
            }
            "xfs" => {
                let mnt = self.dir.join(format!("replay-{}", p.name));
                let _ = std::fs::create_dir_all(&mnt);
                let mnt_s = mnt.to_str().unwrap();
                // Replaying the log writes: this is the scratch copy. A private mount namespace
                // keeps the mount out of everyone's sight.
                let (ok, d) = out(
                    "unshare",
                    &[
                        "-m",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        "mount -t xfs \"$1\" \"$2\" && umount \"$2\"",
                        "sh",
                        dev,
                        mnt_s,
                    ],
                );
                if !ok {
                    return res(false, format!("mounting to replay the log failed: {d}"));
                }
                let (ok, d) = out("xfs_repair", &["-n", dev]);
                res(ok, if ok { "log replayed, xfs_repair -n: clean".into() } else { d })
            }
            "vfat" => {
                let (ok, d) = out("fsck.vfat", &["-n", dev]);
                if ok {
                    return res(true, "fsck.vfat -n: clean".into());
                }
                // Linux sets FAT's dirty bit while it is mounted, and vfat cannot be frozen: a
                // copy of a mounted vfat always has it. Only the dirty bit is not a fault.
                if d.contains("Dirty bit is set") && vfat_only_dirty_bit(&d) {
                    return res(true, "dirty bit set (it was mounted; vfat cannot be frozen), otherwise clean".into());
                }
                res(false, d)
            }
            "" => res(true, "no filesystem".into()),
            other => res(true, format!("{other}: not checked")),
        }
    }

    /// Mounts every partition with a filesystem under `SCRATCH/mnt/LABEL-or-pN` (read-write:
    /// it is the scratch copy; XFS needs its log replayed anyway). In the caller's mount
    /// namespace: tests run in a private one.
    /// Filesystems this host's kernel cannot mount (e.g. vfat here) are left out.
    pub fn mount_all(&mut self) -> Result<Vec<(Partition, PathBuf)>, InspectError> {
        let known = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        let mountable = |t: &str| known.lines().any(|l| l.split_whitespace().last() == Some(t));
        let mut out = Vec::new();
        for p in self.partitions.clone() {
            if p.fstype.is_empty() || !mountable(&p.fstype) {
                continue;
            }
            let name = if p.label.is_empty() { p.name.clone() } else { p.label.to_lowercase() };
            let mnt = self.dir.join("mnt").join(name);
            std::fs::create_dir_all(&mnt)?;
            run("mount", &["-t", &p.fstype, p.dev.to_str().unwrap(), mnt.to_str().unwrap()])?;
            self.mounts.push(mnt.clone());
            out.push((p, mnt));
        }
        Ok(out)
    }
}

impl Drop for RawImage {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for p in &self.partitions {
            let _ = Command::new("losetup").arg("-d").arg(&p.dev).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// True when fsck.vfat's report holds nothing but the dirty-bit notice and its summary.
fn vfat_only_dirty_bit(report: &str) -> bool {
    report.lines().map(str::trim).all(|l| {
        l.is_empty()
            || l.starts_with("fsck.fat")
            || l.starts_with("Dirty bit is set")
            || l.starts_with("Automatically removing dirty bit")
            || l.starts_with("Leaving filesystem unchanged")
            || (l.contains(" files, ") && l.contains(" clusters"))
    })
}

/// One filesystem check.
#[derive(Debug, Clone)]
pub struct FsckResult {
    /// Partition name.
    pub partition: String,
    /// Filesystem type.
    pub fstype: String,
    /// Label.
    pub label: String,
    /// Clean?
    pub ok: bool,
    /// Tool output when not clean.
    pub detail: String,
}

/// Flattens `image` and checks every filesystem on it.
pub fn fsck_image(image: &Path) -> Result<Vec<FsckResult>, InspectError> {
    let raw = RawImage::open(image)?;
    Ok(raw.fsck())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vfat_dirty_bit_alone_is_not_a_fault() {
        let only = "fsck.fat 4.2 (2021-01-31)\nDirty bit is set. Fs was not properly unmounted and some data may be corrupt.\n Automatically removing dirty bit.\n\nLeaving filesystem unchanged.\n/dev/loop2: 1 files, 0/16343 clusters";
        assert!(super::vfat_only_dirty_bit(only));
        let more = format!("{only}\n/FOO.TXT\n  File size is 100 bytes, cluster chain length is 0.");
        assert!(!super::vfat_only_dirty_bit(&more));
    }
}
