//! hostsim: the host side of vssd. Drives QEMU over QMP and the guest agent over its
//! virtio-serial channel: VM lifecycle for VMs it launches, attach mode for VMs started
//! elsewhere, and consistent backups (freeze → one QMP transaction → thaw → copy → manifest).
//!
//! The `vmctl` binary is a thin CLI over these modules; the VM-tier tests use them directly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backup;
pub mod checkpoint;
pub mod checkpoint_cli;
pub mod inspect;
pub mod qga;
pub mod qmp;
pub mod util;
pub mod vm;
