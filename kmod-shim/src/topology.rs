//! Block-device topology from sysfs: what a filesystem's device is stacked on.
//!
//! A filesystem on `/dev/loop3` lives, through the loop device, in a backing *file* that sits
//! on some other filesystem. Freezing that other filesystem first would block the loop device's
//! writeback and deadlock the freeze of the upper one, so the planner needs to know these
//! edges. Device-mapper and md devices list their lower devices in `slaves/`; a partition
//! belongs to the disk whose sysfs directory contains it.

use std::path::{Path, PathBuf};

use crate::DevId;

/// Reads block topology below a sysfs root (normally `/sys`).
#[derive(Debug, Clone)]
pub struct Topology {
    sys: PathBuf,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new("/sys")
    }
}

impl Topology {
    /// A reader rooted at `sys` (a test passes a directory it populated).
    pub fn new(sys: impl Into<PathBuf>) -> Self {
        Topology { sys: sys.into() }
    }

    fn dev_dir(&self, dev: DevId) -> PathBuf {
        self.sys.join("dev/block").join(dev.to_string())
    }

    /// Every backing file that the block device `dev` is ultimately stored in: the loop
    /// device's file, or those of the loop devices below a device-mapper/md device or below
    /// the disk a partition belongs to. Empty for a device stacked on no file (a real disk)
    /// and for devices sysfs does not know (anonymous devices, network filesystems).
    pub fn backing_files(&self, dev: DevId) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        self.walk(self.dev_dir(dev), &mut out, &mut seen, 0);
        out
    }

    fn walk(&self, dir: PathBuf, out: &mut Vec<PathBuf>, seen: &mut Vec<PathBuf>, depth: usize) {
        // Stacks deeper than this are not real; the bound also ends any loop in sysfs.
        if depth > 16 {
            return;
        }
        let Some(dir) = resolve(&dir) else { return };
        if seen.contains(&dir) {
            return;
        }
        seen.push(dir.clone());
        // The common case first, in one read: a loop device has a backing file and nothing below.
        if let Ok(s) = std::fs::read_to_string(dir.join("loop/backing_file")) {
            let s = s.trim_end_matches('\n');
            // The kernel appends " (deleted)" when the file was unlinked.
            let s = s.strip_suffix(" (deleted)").unwrap_or(s);
            if !s.is_empty() {
                out.push(PathBuf::from(s));
            }
            return;
        }
        // A partition: its disk is the parent directory.
        if dir.join("partition").exists() {
            if let Some(parent) = dir.parent() {
                self.walk(parent.to_owned(), out, seen, depth + 1);
            }
            return;
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("slaves")) {
            let mut lowers: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            lowers.sort();
            for l in lowers {
                self.walk(l, out, seen, depth + 1);
            }
        }
    }

    /// The kernel name of a block device (`loop3`, `dm-0`, `vda1`), if sysfs knows it.
    pub fn name(&self, dev: DevId) -> Option<String> {
        let p = resolve(&self.dev_dir(dev))?;
        p.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

/// Follows the one symlink sysfs puts at `/sys/dev/block/M:N` and at `slaves/*` (a relative
/// link into `/sys/devices`) and folds the `..`s, without the readlink per path component
/// that `canonicalize` costs: the planner runs this for every filesystem on every freeze.
fn resolve(p: &Path) -> Option<PathBuf> {
    let target = match std::fs::read_link(p) {
        Ok(t) => t,
        // Not a symlink: a directory reached through its parent, as it is.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Some(p.to_owned()),
        Err(_) => return None,
    };
    let joined = if target.is_absolute() { target } else { p.parent()?.join(target) };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// The device number of the filesystem that `path` lives on (`st_dev`), without following a
/// final symlink. `stat` does not block on a frozen filesystem.
pub fn dev_of(path: &Path) -> std::io::Result<DevId> {
    let st = nix::sys::stat::lstat(path).map_err(std::io::Error::from)?;
    Ok(DevId::from_raw(st.st_dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_sys() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let devices = r.join("devices/virtual/block");
        // loop0 backed by /img/a.img, loop1 by a deleted file, dm-0 over loop0, loop0p1 a partition.
        for (name, backing) in [
            ("loop0", Some("/img/a.img\n")),
            ("loop1", Some("/img/gone.img (deleted)\n")),
            ("dm-0", None),
            ("vda", None),
        ] {
            let d = devices.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(b) = backing {
                std::fs::create_dir_all(d.join("loop")).unwrap();
                std::fs::write(d.join("loop/backing_file"), b).unwrap();
            }
        }
        std::fs::create_dir_all(devices.join("loop0/loop0p1")).unwrap();
        std::fs::write(devices.join("loop0/loop0p1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(devices.join("dm-0/slaves")).unwrap();
        symlink("../../loop0", devices.join("dm-0/slaves/loop0")).unwrap();
        symlink("../../loop1", devices.join("dm-0/slaves/loop1")).unwrap();
        std::fs::create_dir_all(r.join("dev/block")).unwrap();
        for (id, target) in
            [("7:0", "loop0"), ("7:1", "loop1"), ("259:0", "loop0/loop0p1"), ("253:0", "dm-0"), ("252:0", "vda")]
        {
            symlink(devices.join(target), r.join("dev/block").join(id)).unwrap();
        }
        t
    }

    #[test]
    fn loop_device_reports_its_backing_file() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("7:0".parse().unwrap()), vec![PathBuf::from("/img/a.img")]);
        assert_eq!(topo.name("7:0".parse().unwrap()).as_deref(), Some("loop0"));
    }

    #[test]
    fn deleted_backing_file_keeps_its_path() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("7:1".parse().unwrap()), vec![PathBuf::from("/img/gone.img")]);
    }

    #[test]
    fn partition_and_device_mapper_resolve_to_the_loop_files_below() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("259:0".parse().unwrap()), vec![PathBuf::from("/img/a.img")]);
        assert_eq!(
            topo.backing_files("253:0".parse().unwrap()),
            vec![PathBuf::from("/img/a.img"), PathBuf::from("/img/gone.img")]
        );
    }

    #[test]
    fn plain_disks_and_unknown_devices_have_no_backing_file() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert!(topo.backing_files("252:0".parse().unwrap()).is_empty());
        assert!(topo.backing_files("0:45".parse().unwrap()).is_empty());
    }
}
