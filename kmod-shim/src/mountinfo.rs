//! `/proc/self/mountinfo` (see proc(5)), parsed into one [`Mount`] per line.
//!
//! Fields: `id parent major:minor root mount-point mount-options [optional fields...] -
//! fstype source super-options`. Paths escape space, tab, newline and backslash as octal
//! (`\040`); the optional fields end at a lone `-`.

use std::path::{Path, PathBuf};

use crate::DevId;

/// One mount as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// The superblock's device number (`st_dev` of files on it).
    pub dev: DevId,
    /// The directory of the filesystem that forms this mount's root (bind mounts, subvolumes).
    pub root: PathBuf,
    /// Where it is mounted, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `noatime`, ...).
    pub mount_options: Vec<String>,
    /// Optional fields such as `shared:1` or `master:2`.
    pub optional_fields: Vec<String>,
    /// Filesystem type, e.g. `ext4` or `fuse.sshfs`.
    pub fstype: String,
    /// Mount source, e.g. `/dev/loop3`, `tmpfs`, `server:/export`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl Mount {
    /// True when this mount point, or its superblock, is read-only.
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro") || self.super_options.iter().any(|o| o == "ro")
    }

    /// True when the superblock itself is read-only (no mount of it can write).
    pub fn superblock_read_only(&self) -> bool {
        self.super_options.iter().any(|o| o == "ro")
    }

    /// The value of a super option such as `subvol=/a` for btrfs.
    pub fn super_option(&self, key: &str) -> Option<&str> {
        self.super_options.iter().find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// What went wrong reading mountinfo.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line does not have the shape proc(5) describes.
    #[error("mountinfo line {line}: {reason}: `{text}`")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
        /// The line.
        text: String,
    },
}

/// Reads and parses a mountinfo file (normally `/proc/self/mountinfo`).
pub fn read(path: &Path) -> Result<Vec<Mount>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
    parse(&text)
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Result<Vec<Mount>, Error> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l).map_err(|reason| Error::Parse { line: i + 1, reason, text: l.to_owned() }))
        .collect()
}

fn parse_line(line: &str) -> Result<Mount, &'static str> {
    let mut it = line.split(' ');
    let mut next = |what: &'static str| it.next().filter(|s| !s.is_empty()).ok_or(what);
    let mount_id = next("missing mount id")?.parse().map_err(|_| "bad mount id")?;
    let parent_id = next("missing parent id")?.parse().map_err(|_| "bad parent id")?;
    let dev = next("missing major:minor")?.parse().map_err(|_| "bad major:minor")?;
    let root = PathBuf::from(unescape(next("missing root")?));
    let mount_point = PathBuf::from(unescape(next("missing mount point")?));
    let mount_options = split_opts(next("missing mount options")?);
    let mut optional_fields = Vec::new();
    loop {
        let f = next("missing ` - ` separator")?;
        if f == "-" {
            break;
        }
        optional_fields.push(f.to_owned());
    }
    let fstype = unescape(next("missing fstype")?);
    // The source may be empty on some pseudo filesystems; the kernel then prints "none".
    let source = unescape(next("missing source")?);
    let super_options = split_opts(next("missing super options")?);
    Ok(Mount {
        mount_id,
        parent_id,
        dev,
        root,
        mount_point,
        mount_options,
        optional_fields,
        fstype,
        source,
        super_options,
    })
}

fn split_opts(s: &str) -> Vec<String> {
    s.split(',').filter(|o| !o.is_empty()).map(unescape).collect()
}

/// Undoes the kernel's octal escapes (`\040` for space, `\134` for backslash, ...).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64 + (oct[1] - b'0') as u32 * 8 + (oct[2] - b'0') as u32;
                if v <= 255 {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
61 22 7:0 / /mnt/with\\040space rw,relatime shared:30 master:2 - xfs /dev/loop0 rw,attr2,inode64
70 22 0:45 /sub /srv/sub rw,relatime - btrfs /dev/loop1 rw,space_cache=v2,subvolid=256,subvol=/sub
71 22 0:45 / /srv/top ro,relatime - btrfs /dev/loop1 rw,subvolid=5,subvol=/
80 22 0:50 / /net rw - nfs4 server:/export\\134x rw,vers=4.2
";

    #[test]
    fn parses_fields_optional_fields_and_escapes() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].dev, DevId { major: 252, minor: 1 });
        assert_eq!(m[0].optional_fields, vec!["shared:1"]);
        assert_eq!(m[2].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[2].optional_fields, vec!["shared:30", "master:2"]);
        assert_eq!(m[2].fstype, "xfs");
        assert_eq!(m[5].source, "server:/export\\x");
    }

    #[test]
    fn btrfs_subvolumes_share_one_device_id() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m[3].dev, m[4].dev);
        assert_eq!(m[3].root, Path::new("/sub"));
        assert_eq!(m[3].super_option("subvol"), Some("/sub"));
        assert!(m[4].is_read_only());
        assert!(!m[4].superblock_read_only());
    }

    #[test]
    fn rejects_a_line_without_separator() {
        let err = parse("1 0 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn unescape_handles_all_kernel_escapes_and_leaves_other_backslashes() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("x\\9y\\"), "x\\9y\\");
    }

    #[test]
    fn reads_this_process_mountinfo() {
        let m = read(Path::new("/proc/self/mountinfo")).unwrap();
        assert!(m.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
