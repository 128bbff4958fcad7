//! The NVMe SMART / health log (log page 02h), read with an admin command through the
//! namespace's device node, as qemu-ga 7.2's `guest-get-disks` reads it for NVMe disks.
//!
//! The command is `NVME_IOCTL_ADMIN_CMD` with Get Log Page (opcode 02h) for every namespace
//! (NSID FFFFFFFFh), Retain Asynchronous Event set, 512 bytes into a buffer of ours. The log's
//! layout is the NVMe base specification's (Figure "SMART / Health Information Log"): all
//! fields little-endian, the temperature (kelvin) unaligned at byte 1, the 128-bit counters
//! as two 64-bit halves.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

/// `struct nvme_admin_cmd` (= `struct nvme_passthru_cmd`) of <linux/nvme_ioctl.h>.
#[repr(C)]
#[derive(Debug, Default)]
struct AdminCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

mod sys {
    // `_IOWR('N', 0x41, struct nvme_admin_cmd)` from <linux/nvme_ioctl.h>, declared once.
    nix::ioctl_readwrite!(ioctl_nvme_admin_cmd, b'N', 0x41, super::AdminCmd);
}

/// The request number of NVME_IOCTL_ADMIN_CMD on this architecture's ioctl encoding.
pub const NVME_IOCTL_ADMIN_CMD: u64 = nix::request_code_readwrite!(b'N', 0x41, std::mem::size_of::<AdminCmd>()) as u64;

const LOG_LEN: usize = 512;
const GET_LOG_PAGE: u8 = 0x02;
const SMART_LOG: u32 = 0x02;
const RETAIN_ASYNC_EVENT: u32 = 1 << 15;

/// The SMART / health log, in the fields qemu-ga reports (`[lo, hi]` halves for 128-bit counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SmartLog {
    pub critical_warning: u8,
    /// Kelvin.
    pub temperature: u16,
    pub available_spare: u8,
    pub available_spare_threshold: u8,
    pub percentage_used: u8,
    pub data_units_read: [u64; 2],
    pub data_units_written: [u64; 2],
    pub host_read_commands: [u64; 2],
    pub host_write_commands: [u64; 2],
    pub controller_busy_time: [u64; 2],
    pub power_cycles: [u64; 2],
    pub power_on_hours: [u64; 2],
    pub unsafe_shutdowns: [u64; 2],
    pub media_errors: [u64; 2],
    pub number_of_error_log_entries: [u64; 2],
}

impl SmartLog {
    /// Decodes the 512 bytes of log page 02h.
    pub fn parse(b: &[u8; LOG_LEN]) -> SmartLog {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u128_at = |o: usize| [u64_at(o), u64_at(o + 8)];
        SmartLog {
            critical_warning: b[0],
            temperature: u16::from_le_bytes([b[1], b[2]]),
            available_spare: b[3],
            available_spare_threshold: b[4],
            percentage_used: b[5],
            data_units_read: u128_at(32),
            data_units_written: u128_at(48),
            host_read_commands: u128_at(64),
            host_write_commands: u128_at(80),
            controller_busy_time: u128_at(96),
            power_cycles: u128_at(112),
            power_on_hours: u128_at(128),
            unsafe_shutdowns: u128_at(144),
            media_errors: u128_at(160),
            number_of_error_log_entries: u128_at(176),
        }
    }
}

/// Reads the SMART / health log through the NVMe device node `dev` (e.g. `/dev/nvme0n1`).
pub fn smart_log(dev: &Path) -> io::Result<SmartLog> {
    let fd: OwnedFd = open(dev, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(io::Error::from)?;
    let mut log = [0u8; LOG_LEN];
    let mut cmd = AdminCmd {
        opcode: GET_LOG_PAGE,
        nsid: u32::MAX,
        addr: log.as_mut_ptr() as u64,
        data_len: LOG_LEN as u32,
        // The log identifier, RAE, and the number of dwords minus one (0's based).
        cdw10: SMART_LOG | RETAIN_ASYNC_EVENT | (((LOG_LEN as u32 / 4) - 1) << 16),
        ..AdminCmd::default()
    };
    // SAFETY: the ioctl reads `cmd` (a `#[repr(C)]` `struct nvme_admin_cmd`, the size the
    // request number encodes) and writes its `result`, both live and writable for the call.
    // Through `cmd.addr` the kernel writes at most `cmd.data_len` = 512 bytes, exactly the
    // length of `log`, which stays alive and unborrowed on our stack until the call returns;
    // no metadata buffer is given (`metadata_len` 0). `fd` stays open for the call. On a
    // device that is not an NVMe namespace the kernel returns an error (ENOTTY), nothing worse.
    unsafe { sys::ioctl_nvme_admin_cmd(fd.as_raw_fd(), &mut cmd) }.map_err(io::Error::from)?;
    Ok(SmartLog::parse(&log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn ioctl_number_and_layout_match_linux_headers() {
        assert_eq!(std::mem::size_of::<AdminCmd>(), 72);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xC048_4E41);
    }

    #[test]
    fn the_log_decodes_little_endian_and_unaligned() {
        let mut b = [0u8; LOG_LEN];
        b[0] = 0x04;
        b[1..3].copy_from_slice(&323u16.to_le_bytes());
        b[3] = 100;
        b[4] = 10;
        b[5] = 7;
        b[32..40].copy_from_slice(&1u64.to_le_bytes());
        b[40..48].copy_from_slice(&2u64.to_le_bytes());
        b[64..72].copy_from_slice(&10u64.to_le_bytes());
        b[176..184].copy_from_slice(&u64::MAX.to_le_bytes());
        let s = SmartLog::parse(&b);
        assert_eq!((s.critical_warning, s.temperature, s.available_spare), (4, 323, 100));
        assert_eq!((s.available_spare_threshold, s.percentage_used), (10, 7));
        assert_eq!(s.data_units_read, [1, 2]);
        assert_eq!(s.host_read_commands, [10, 0]);
        assert_eq!(s.number_of_error_log_entries, [u64::MAX, 0]);
    }

    #[test]
    fn a_device_that_is_not_nvme_is_an_error() {
        assert!(smart_log(Path::new("/dev/null")).is_err());
        assert!(smart_log(Path::new("/nonexistent-nvme")).is_err());
    }
}
