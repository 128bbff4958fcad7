//! FIFREEZE / FITHAW: freeze and thaw the filesystem that an open file belongs to.
//!
//! The kernel freezes a whole superblock: every mount of it, every btrfs subvolume of it.
//! `FIFREEZE` syncs the filesystem and blocks new writers until `FITHAW`. Freezing twice
//! gives `EBUSY`; thawing a filesystem that is not frozen gives `EINVAL`; a filesystem
//! without freeze support gives `EOPNOTSUPP`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

mod sys {
    // `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from <linux/fs.h>, declared once.
    nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);
}
use sys::{ioctl_fifreeze, ioctl_fithaw};

/// The request number of FIFREEZE on this architecture's ioctl encoding.
pub const FIFREEZE: u64 = nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<libc::c_int>()) as u64;
/// The request number of FITHAW.
pub const FITHAW: u64 = nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<libc::c_int>()) as u64;

/// Opens a mount point (a directory) for freezing or thawing, without following a final
/// symlink, without updating atime and without blocking on a frozen filesystem.
pub fn open_mountpoint(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    open(path, flags, Mode::empty()).map_err(io::Error::from)
}

/// Freezes the filesystem that `fd` lives on (blocks while the kernel syncs it).
pub fn freeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: the ioctl reads no memory of ours but `arg`, and writes none: the kernel's
    // FIFREEZE handler ignores its argument, and `arg` is a live, writable `c_int` anyway, as
    // the `_IOWR(.., int)` declaration promises. `fd` stays open for the call (it is borrowed);
    // on a descriptor that is not a filesystem's the kernel returns an error, nothing worse.
    unsafe { ioctl_fifreeze(fd.as_raw_fd(), &mut arg) }.map(|_| ()).map_err(io::Error::from)
}

/// Thaws the filesystem that `fd` lives on.
pub fn thaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: as for `freeze`: FITHAW ignores its argument, `arg` is a live `c_int`, `fd` is
    // open for the call, and no other memory of ours is read or written.
    unsafe { ioctl_fithaw(fd.as_raw_fd(), &mut arg) }.map(|_| ()).map_err(io::Error::from)
}

/// Opens `path` and freezes its filesystem.
pub fn freeze_path(path: &Path) -> io::Result<()> {
    let fd = open_mountpoint(path)?;
    use std::os::fd::AsFd;
    freeze(fd.as_fd())
}

/// Opens `path` and thaws its filesystem.
pub fn thaw_path(path: &Path) -> io::Result<()> {
    let fd = open_mountpoint(path)?;
    use std::os::fd::AsFd;
    thaw(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_numbers_match_linux_headers() {
        // Pinned to the values of <linux/fs.h> on x86_64 and aarch64 (generic ioctl encoding).
        assert_eq!(FIFREEZE, 0xC004_5877);
        assert_eq!(FITHAW, 0xC004_5878);
    }

    #[test]
    fn thawing_a_filesystem_that_is_not_frozen_is_einval_or_eperm() {
        // /proc is never frozen; thaw must fail without side effects. Unprivileged: EPERM.
        let err = thaw_path(Path::new("/proc")).unwrap_err();
        let code = err.raw_os_error().unwrap();
        assert!([libc::EINVAL, libc::EPERM, libc::EOPNOTSUPP].contains(&code), "unexpected error {err}");
    }

    #[test]
    fn open_mountpoint_refuses_a_regular_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = open_mountpoint(f.path()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    }
}
