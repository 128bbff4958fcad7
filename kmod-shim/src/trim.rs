//! FITRIM: tell a mounted filesystem to discard its free blocks (what `fstrim` does).
//!
//! The kernel takes a `struct fstrim_range { start, len, minlen }` and writes back `len` as
//! the number of bytes it discarded (and may raise `minlen` to the device's discard
//! granularity). A filesystem without discard support answers `EOPNOTSUPP`; a descriptor that
//! is not a filesystem's (or a CD-ROM's) answers `ENOTTY`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

/// `struct fstrim_range` of <linux/fs.h>.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FstrimRange {
    /// First byte to consider.
    pub start: u64,
    /// Bytes to consider; on return, bytes discarded.
    pub len: u64,
    /// Smallest free extent worth discarding; on return, the one the filesystem used.
    pub minlen: u64,
}

mod sys {
    // `_IOWR('X', 121, struct fstrim_range)` from <linux/fs.h>, declared once.
    nix::ioctl_readwrite!(ioctl_fitrim, b'X', 121, super::FstrimRange);
}

/// The request number of FITRIM on this architecture's ioctl encoding.
pub const FITRIM: u64 = nix::request_code_readwrite!(b'X', 121, std::mem::size_of::<FstrimRange>()) as u64;

/// What a trim did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Bytes discarded.
    pub bytes: u64,
    /// The minimum extent length the filesystem applied.
    pub minimum: u64,
}

/// Trims the whole filesystem that `fd` lives on, skipping free extents shorter than `minlen`.
pub fn fitrim(fd: BorrowedFd<'_>, minlen: u64) -> io::Result<Trimmed> {
    let mut range = FstrimRange { start: 0, len: u64::MAX, minlen };
    // SAFETY: FITRIM reads and writes exactly one `struct fstrim_range`, which `range` is
    // (`#[repr(C)]`, three u64s as in <linux/fs.h>, and the size the request number encodes);
    // it lives on our stack for the whole call and is writable. `fd` stays open for the call
    // (it is borrowed). No other memory of ours is touched.
    unsafe { sys::ioctl_fitrim(fd.as_raw_fd(), &mut range) }.map_err(io::Error::from)?;
    Ok(Trimmed { bytes: range.len, minimum: range.minlen })
}

/// Why a trim of a path failed: opening it, or the ioctl.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// The mount point could not be opened.
    #[error("cannot open: {0}")]
    Open(#[source] io::Error),
    /// FITRIM failed.
    #[error("FITRIM: {0}")]
    Trim(#[source] io::Error),
}

/// Opens `path` read-only (as `fstrim` and qemu-ga do: a final symlink is followed) and trims
/// its filesystem.
pub fn trim_path(path: &Path, minlen: u64) -> Result<Trimmed, TrimError> {
    let fd: OwnedFd = open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| TrimError::Open(io::Error::from(e)))?;
    fitrim(fd.as_fd(), minlen).map_err(TrimError::Trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_number_matches_linux_headers() {
        // FITRIM = _IOWR('X', 121, struct fstrim_range): 0xC0185879 with the generic encoding.
        assert_eq!(FITRIM, 0xC018_5879);
        assert_eq!(std::mem::size_of::<FstrimRange>(), 24);
    }

    #[test]
    fn trimming_a_pseudo_filesystem_fails_without_side_effects() {
        // /proc has no FITRIM: ENOTTY (or EPERM/EOPNOTSUPP, depending on privilege and kernel).
        let err = trim_path(Path::new("/proc"), 0).unwrap_err();
        let TrimError::Trim(e) = err else { panic!("open failed: {err}") };
        let code = e.raw_os_error().unwrap();
        assert!([libc::ENOTTY, libc::EPERM, libc::EOPNOTSUPP].contains(&code), "unexpected error {e}");
    }

    #[test]
    fn a_missing_path_is_an_open_error() {
        let err = trim_path(Path::new("/nonexistent-vssd-trim"), 0).unwrap_err();
        assert!(matches!(err, TrimError::Open(ref e) if e.raw_os_error() == Some(libc::ENOENT)), "{err}");
    }
}
