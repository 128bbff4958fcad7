//! The Hyper-V VSS channel: `/dev/vmbus/hv_vss`, as Linux's `hv_utils` driver serves it.
//!
//! Our own statement of the VSS part of `include/uapi/linux/hyperv.h` (the kernel's
//! `drivers/hv/hv_snapshot.c` and `tools/hv/hv_vss_daemon.c` are the other side and the peer).
//! The kernel and the daemon exchange one `struct hv_vss_msg` per read or write: 12 bytes,
//! packed, native endian (the guest is little-endian x86 or arm64):
//!
//! ```text
//! offset 0  u8      operation  } a union: the daemon's reply stores `int error` over
//! offset 1  u8[7]   reserved   } these 8 bytes, so its low byte replaces the operation
//! offset 0  i32     error      }
//! offset 8  u32     flags         (vss_cf.flags / dm_info.flags)
//! ```
//!
//! Registration is different: the daemon writes a message whose operation is REGISTER or
//! REGISTER1; for REGISTER1 the kernel answers with a 4-byte version (its own read), for
//! REGISTER with nothing. Nothing here needs `unsafe`: the message is encoded to and decoded
//! from a byte array.

use std::fmt;

/// The path the kernel's `hv_utils` driver creates (a misc device, one opener at a time).
pub const DEVICE_PATH: &str = "/dev/vmbus/hv_vss";

/// `sizeof(struct hv_vss_msg)`.
pub const MSG_SIZE: usize = 12;

/// The size of the kernel's reply to REGISTER1 (a `__u32` version).
pub const VERSION_SIZE: usize = 4;

/// The version the kernel answers REGISTER1 with: `VSS_OP_REGISTER1` itself (`our_ver` in
/// hv_snapshot.c's handshake), as a native-endian `__u32`.
pub const KERNEL_VERSION_REGISTER1: u32 = Op::Register1 as u32;

/// `VSS_HBU_NO_AUTO_RECOVERY`: the flag the kernel tells the host with a HOT_BACKUP answer.
pub const VSS_HBU_NO_AUTO_RECOVERY: u32 = 0x0000_0005;

/// `HV_S_OK`.
pub const HV_S_OK: u32 = 0x0000_0000;
/// `HV_E_FAIL`.
pub const HV_E_FAIL: u32 = 0x8000_4005;

/// The operations of `enum hv_vss_op` and the two registration codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// `VSS_OP_CREATE` (0).
    Create = 0,
    /// `VSS_OP_DELETE` (1).
    Delete = 1,
    /// `VSS_OP_HOT_BACKUP` (2): may the host take an online backup?
    HotBackup = 2,
    /// `VSS_OP_GET_DM_INFO` (3): answered by the kernel, never sent to the daemon.
    GetDmInfo = 3,
    /// `VSS_OP_BU_COMPLETE` (4).
    BuComplete = 4,
    /// `VSS_OP_FREEZE` (5): freeze the filesystems (IC version 5.0 and later).
    Freeze = 5,
    /// `VSS_OP_THAW` (6).
    Thaw = 6,
    /// `VSS_OP_AUTO_RECOVER` (7).
    AutoRecover = 7,
    /// `VSS_OP_REGISTER` (128): registration without a version reply.
    Register = 128,
    /// `VSS_OP_REGISTER1` (129): registration; the kernel replies with its version.
    Register1 = 129,
}

/// `VSS_OP_COUNT`: one past the last operation of `enum hv_vss_op`.
pub const VSS_OP_COUNT: u8 = 8;

impl Op {
    /// The operation with this number, if it is one.
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0 => Op::Create,
            1 => Op::Delete,
            2 => Op::HotBackup,
            3 => Op::GetDmInfo,
            4 => Op::BuComplete,
            5 => Op::Freeze,
            6 => Op::Thaw,
            7 => Op::AutoRecover,
            128 => Op::Register,
            129 => Op::Register1,
            _ => return None,
        })
    }

    /// The kernel's name for it, as in logs (`VSS_OP_FREEZE`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "VSS_OP_CREATE",
            Op::Delete => "VSS_OP_DELETE",
            Op::HotBackup => "VSS_OP_HOT_BACKUP",
            Op::GetDmInfo => "VSS_OP_GET_DM_INFO",
            Op::BuComplete => "VSS_OP_BU_COMPLETE",
            Op::Freeze => "VSS_OP_FREEZE",
            Op::Thaw => "VSS_OP_THAW",
            Op::AutoRecover => "VSS_OP_AUTO_RECOVER",
            Op::Register => "VSS_OP_REGISTER",
            Op::Register1 => "VSS_OP_REGISTER1",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `struct hv_vss_msg`, as bytes. The header union is kept as its 8 raw bytes so that
/// both readings (operation, error) stay exact, including what a reply's `error` does to the
/// operation byte.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VssMsg {
    /// The 8-byte header union (`vss_hdr` / `error`).
    pub header: [u8; 8],
    /// `vss_cf.flags` / `dm_info.flags`.
    pub flags: u32,
}

impl VssMsg {
    /// A request or registration: `operation` set, the rest zero.
    pub fn with_op(op: u8) -> VssMsg {
        let mut header = [0u8; 8];
        header[0] = op;
        VssMsg { header, flags: 0 }
    }

    /// The operation byte (`vss_hdr.operation`).
    pub fn op_byte(&self) -> u8 {
        self.header[0]
    }

    /// The operation, when the byte names one.
    pub fn op(&self) -> Option<Op> {
        Op::from_u8(self.op_byte())
    }

    /// The `int error` reading of the header's first four bytes (as the kernel reads a
    /// reply), as the unsigned HRESULT it carries.
    pub fn error(&self) -> u32 {
        u32::from_ne_bytes([self.header[0], self.header[1], self.header[2], self.header[3]])
    }

    /// Stores `error` over the header's first four bytes, as the daemon does when it answers
    /// (`vss_msg->error = error`): the operation byte becomes the error's low byte.
    pub fn set_error(&mut self, error: u32) {
        self.header[..4].copy_from_slice(&error.to_ne_bytes());
    }

    /// The 12 bytes.
    pub fn to_bytes(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[..8].copy_from_slice(&self.header);
        b[8..].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }

    /// Decodes exactly [`MSG_SIZE`] bytes; any other length is an error naming it.
    pub fn from_bytes(b: &[u8]) -> Result<VssMsg, WireError> {
        if b.len() != MSG_SIZE {
            return Err(WireError::Length { got: b.len(), want: MSG_SIZE });
        }
        let mut header = [0u8; 8];
        header.copy_from_slice(&b[..8]);
        Ok(VssMsg { header, flags: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]) })
    }
}

impl fmt::Debug for VssMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op() {
            Some(op) => write!(f, "VssMsg({op}, error={:#x}, flags={:#x})", self.error(), self.flags),
            None => write!(f, "VssMsg(op={}, error={:#x}, flags={:#x})", self.op_byte(), self.error(), self.flags),
        }
    }
}

/// A message of the wrong size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not the size of the structure expected.
    #[error("a hv_vss message is {want} bytes, got {got}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
}

/// Decodes the kernel's 4-byte reply to REGISTER1.
pub fn decode_version(b: &[u8]) -> Result<u32, WireError> {
    if b.len() != VERSION_SIZE {
        return Err(WireError::Length { got: b.len(), want: VERSION_SIZE });
    }
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The literals come from include/uapi/linux/hyperv.h; a change here is a change of ABI.
    #[test]
    fn numbers_are_the_kernels() {
        assert_eq!(MSG_SIZE, 12);
        assert_eq!(VERSION_SIZE, 4);
        assert_eq!(KERNEL_VERSION_REGISTER1, 129);
        assert_eq!(VSS_HBU_NO_AUTO_RECOVERY, 5);
        assert_eq!(HV_S_OK, 0);
        assert_eq!(HV_E_FAIL, 0x80004005);
        let ops = [
            (Op::Create, 0),
            (Op::Delete, 1),
            (Op::HotBackup, 2),
            (Op::GetDmInfo, 3),
            (Op::BuComplete, 4),
            (Op::Freeze, 5),
            (Op::Thaw, 6),
            (Op::AutoRecover, 7),
            (Op::Register, 128),
            (Op::Register1, 129),
        ];
        for (op, n) in ops {
            assert_eq!(op as u8, n);
            assert_eq!(Op::from_u8(n), Some(op));
        }
        assert_eq!(VSS_OP_COUNT, 8);
        assert_eq!(Op::from_u8(8), None);
        assert_eq!(Op::from_u8(130), None);
    }

    #[test]
    fn layout_offsets() {
        let mut m = VssMsg::with_op(Op::Freeze as u8);
        m.flags = 0x0403_0201;
        let b = m.to_bytes();
        assert_eq!(b, [5, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(VssMsg::from_bytes(&b).unwrap(), m);
    }

    #[test]
    fn error_overlays_the_operation_byte() {
        let mut m = VssMsg::with_op(Op::HotBackup as u8);
        m.set_error(HV_S_OK);
        assert_eq!(m.op_byte(), 0, "an HV_S_OK answer leaves operation 0 (CREATE), not HOT_BACKUP");
        m.set_error(HV_E_FAIL);
        assert_eq!(m.to_bytes()[..4], [0x05, 0x40, 0x00, 0x80]);
        assert_eq!(m.op_byte(), 5);
        assert_eq!(m.error(), HV_E_FAIL);
    }

    #[test]
    fn wrong_sizes_are_named() {
        assert_eq!(VssMsg::from_bytes(&[0; 11]), Err(WireError::Length { got: 11, want: 12 }));
        assert_eq!(VssMsg::from_bytes(&[0; 13]).unwrap_err().to_string(), "a hv_vss message is 12 bytes, got 13");
        assert_eq!(decode_version(&129u32.to_ne_bytes()), Ok(129));
        assert!(decode_version(&[1, 2]).is_err());
    }
}
