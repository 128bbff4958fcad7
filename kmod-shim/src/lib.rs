//! The thin layer between vssd and the kernel.
//!
//! Everything that touches an ioctl, a socket family the standard library lacks, or a kernel
//! text format lives here, behind small safe functions. Paths such as `/proc/self/mountinfo`
//! and `/sys` are parameters so that every layer above can be tested on files a test writes.
//!
//! Invariant: this crate opts back into `unsafe` (the workspace denies it; the only other
//! exception is appvss's C ABI module). Each block carries a `// SAFETY:` comment that says
//! why it is sound; `clippy::undocumented_unsafe_blocks` (a workspace lint) enforces that.
//! The blocks: the two ioctls in `freeze`, FITRIM in `trim`, the NVMe admin command in
//! `nvme`, taking ownership of an accepted descriptor in `vsock`, `localtime_r` /
//! `clock_settime` in `clock`, `uname` in `uts`, `getifaddrs` and `SIOCGIFHWADDR` in `net`,
//! `setsid` before exec in `process`. Every public function is safe.
#![allow(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod freeze;
pub mod hv;
pub mod mountinfo;
pub mod net;
pub mod nvme;
pub mod process;
pub mod rcu;
pub mod topology;
pub mod trim;
pub mod uts;
pub mod virtio;
pub mod vsock;

/// A block device number as the kernel prints it in mountinfo and sysfs (`major:minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId {
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl DevId {
    /// Builds a `DevId` from the `st_dev` / `st_rdev` value of a `stat`.
    pub fn from_raw(dev: u64) -> Self {
        DevId { major: nix::sys::stat::major(dev) as u32, minor: nix::sys::stat::minor(dev) as u32 }
    }

    /// True for anonymous devices (major 0): tmpfs, proc, btrfs's per-filesystem anon dev, ...
    pub fn is_anonymous(&self) -> bool {
        self.major == 0
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl std::str::FromStr for DevId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s.split_once(':').ok_or_else(|| format!("`{s}` is not major:minor"))?;
        let major = a.trim().parse().map_err(|_| format!("bad major in `{s}`"))?;
        let minor = b.trim().parse().map_err(|_| format!("bad minor in `{s}`"))?;
        Ok(DevId { major, minor })
    }
}
