//! hostsim: the host side of vssd. Drives QEMU over QMP and the guest agent over its
//! virtio-serial channel: VM lifecycle for VMs it launches, attach mode for VMs started
//! elsewhere, consistent backups (freeze → one QMP transaction → thaw → copy → manifest) and
//! full-VM checkpoints.
//!
//! The `vmctl` binary (`main.rs`, `cli/`) is a thin CLI over these modules; the VM-tier tests
//! use them directly. Shared by backups and checkpoints: [`quiesce`] (the one freeze/thaw
//! path, with a guard that thaws on every exit), [`oplock`] (one operation per VM at a
//! time), [`envelope`] (manifests' magic, versions and checks; listing complete vs. leftover
//! directories), [`timings`], [`hash`]. Dependencies point one way: `backup` and
//! `checkpoint` use `vm`, `qmp`, `qga` and the shared modules, never each other; `vm` uses
//! only `qmp`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backup;
pub mod checkpoint;
pub mod envelope;
pub mod hash;
pub mod inspect;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod oplock;
pub mod qga;
pub mod qmp;
pub mod quiesce;
pub mod timings;
pub mod util;
pub mod vm;
