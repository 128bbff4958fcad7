//! Full-VM checkpoints: save a VM's RAM, device state and disks at one instant; restore it.
//!
//! A checkpoint is a directory `VMDIR/checkpoints/NAME/` holding `manifest.json` and
//! `state.bin`, QEMU's migration stream (RAM and device state). The manifest carries what the
//! stream does not: the VM's configuration, the QEMU version and the resolved machine type,
//! every disk's image chain at the checkpoint, and each file's size and BLAKE3 checksum.
//!
//! Create: (freeze) → `stop` → one QMP `transaction` of `blockdev-snapshot-sync`, so every disk
//! goes on in a new overlay under `VMDIR/overlays/` and the images below become the
//! checkpoint's immutable disk state → `migrate` to `exec:vmctl __sink`, which hashes the
//! stream as it writes it → `cont` as soon as QEMU has handed over the last byte → fsync of
//! the state file, the images' checksums, the manifest → rename of `.tmp-NAME-PID` to `NAME`.
//! With `live`, the guest runs while its RAM is streamed; QEMU stops it for the last pass and
//! waits (`pause-before-switchover`), the overlays are taken there, and the downtime is that
//! last pass instead of the whole stream.
//!
//! Restore: the manifest's versions, every file's presence and size, the QEMU version → a new
//! overlay on each checkpoint image (so restoring one checkpoint disturbs no other) → QEMU
//! with `-incoming defer -S` → `migrate-incoming` from `exec:vmctl __source`, which hashes
//! while it feeds and withholds the stream's last chunk unless the whole file matched → `cont`
//! only when the stream completed and every checksum (the disk images' too, computed
//! alongside) matched. Overlays nothing references any more are removed.
//!
//! Invariants:
//! - A directory without the `.tmp-` prefix is renamed into place only after its files and the
//!   directory were fsynced: an interrupted create never shows up as a good checkpoint.
//! - No image in the live chain (vm.toml's disks and their backing files) or in any
//!   checkpoint's chain is ever deleted; unreferenced overlays are removed only when both sets
//!   are known, and only under `VMDIR/overlays/`, never a disk the user brought.
//! - A checkpoint's images never change: QEMU reopens an image read-only once an overlay is
//!   on it (so their checksums, taken after the stream, stay true), and vmctl writes only to
//!   overlays it made after them.
//! - One operation at a time per VM, backups included ([`crate::oplock`]).
//! - A guest frozen for a checkpoint is thawed on every path out of `create`
//!   ([`crate::quiesce::Frozen`]), except when the checkpoint powers the VM off: then the
//!   saved state holds it frozen and the restore thaws it.
//!
//! The rooms: [`manifest`] (what a checkpoint records), [`stream`] (the hashed `exec:`
//! migration ends), [`store`] (where checkpoints live, listing, the lock, garbage
//! collection), [`migrate`] (QEMU's side: versions, migration, overlays), [`create`],
//! [`restore`].

use std::io;
use std::time::Duration;

use crate::envelope::EnvelopeError;
use crate::oplock::LockError;
use crate::qmp::QmpError;
use crate::quiesce::QuiesceError;
use crate::vm::{Vm, VmError};

pub mod create;
pub mod inflight;
pub mod manifest;
pub mod migrate;
pub mod restore;
pub mod store;
pub mod stream;

pub use create::{create, suspend, CreateRequest, Created};
pub use manifest::{
    DiskRecord, FileRecord, ImageRecord, Manifest, QemuRecord, QuiesceRecord, FORMAT, MANIFEST, STATE_FILE,
};
pub use restore::{restore, resume, RestoreRequest, Restored};
pub use store::{
    check_name, delete, destroy_all, exposure_warnings, find, list, prune, Listing, Pruned, SUSPEND_NAME, TMP_PREFIX,
};
pub use stream::{run_sink, run_source, Digest};

/// The steps a checkpoint's and a restore's [`crate::timings::Timings`] name.
pub mod step {
    /// Agent freeze (0 without).
    pub const FREEZE: &str = "freeze-ms";
    /// The overlays' transaction.
    pub const SNAPSHOT: &str = "snapshot-ms";
    /// `migrate` → QEMU reports completed (the stream was hashed on the way); in a restore,
    /// `migrate-incoming` → completed.
    pub const STREAM: &str = "stream-ms";
    /// The guest's CPUs were stopped this long (stop → cont). 0 with --poweroff.
    pub const DOWNTIME: &str = "downtime-ms";
    /// QEMU's own figure of its final stop-and-copy phase.
    pub const QEMU_DOWNTIME: &str = "qemu-downtime-ms";
    /// The state file's fsync (after `cont`: the guest runs meanwhile).
    pub const SYNC: &str = "sync-ms";
    /// The disk images' checksums.
    pub const DISK_HASH: &str = "disk-hash-ms";
    /// The whole create; in a restore, start → `cont`.
    pub const TOTAL: &str = "total-ms";
    /// Restore: manifest, files, QEMU version.
    pub const CHECKS: &str = "checks-ms";
    /// Restore: new overlays and QEMU up with `-incoming defer`.
    pub const LAUNCH: &str = "launch-ms";
    /// Restore: waiting for the disk images' checksums after the stream (they run alongside).
    pub const DISK_VERIFY_WAIT: &str = "disk-verify-wait-ms";

    /// A checkpoint's steps.
    pub const CREATE: &[&str] = &[FREEZE, SNAPSHOT, STREAM, DOWNTIME, QEMU_DOWNTIME, SYNC, DISK_HASH, TOTAL];
    /// A restore's steps.
    pub const RESTORE: &[&str] = &[CHECKS, LAUNCH, STREAM, DISK_VERIFY_WAIT, TOTAL];
}

/// What went wrong with a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Attach mode or no VM directory.
    #[error("checkpoints need a VM that vmctl manages (its directory keeps them); attach mode cannot")]
    NotManaged,
    /// No such checkpoint.
    #[error("VM `{vm}` has no checkpoint `{name}`{}", if .known.is_empty() { " (it has none)".to_string() } else { format!(" (it has: {})", .known.join(", ")) })]
    NotFound {
        /// The VM.
        vm: String,
        /// The checkpoint asked for.
        name: String,
        /// The complete ones.
        known: Vec<String>,
    },
    /// The name is taken.
    #[error("VM `{vm}` has a checkpoint `{name}` already (`vmctl checkpoint delete {vm} {name}` removes it)")]
    Exists {
        /// The VM.
        vm: String,
        /// The name.
        name: String,
    },
    /// A bad checkpoint name.
    #[error("bad checkpoint name `{0}`: letters, digits, '-', '_' and '.' (not first); `suspend` is vmctl suspend's")]
    BadName(String),
    /// Another operation (a backup, another checkpoint) holds the VM's lock.
    #[error(transparent)]
    Busy(#[from] LockError),
    /// The manifest is refused by its envelope's checks.
    #[error("{path} is not a usable vmctl checkpoint manifest")]
    Manifest {
        /// The manifest.
        path: String,
        /// Why.
        #[source]
        source: EnvelopeError,
    },
    /// The manifest reads but does not make sense.
    #[error("{path} is not a usable vmctl checkpoint manifest: {why}")]
    Inconsistent {
        /// The manifest.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A file is missing.
    #[error("checkpoint `{name}`: {what} {path} is missing")]
    Missing {
        /// The checkpoint.
        name: String,
        /// "the state file", "disk `data`'s image".
        what: String,
        /// The file.
        path: String,
    },
    /// A file has the wrong size.
    #[error("checkpoint `{name}`: {path} is {found} bytes, the manifest says {expected}: the file is truncated or was changed")]
    Truncated {
        /// The checkpoint.
        name: String,
        /// The file.
        path: String,
        /// Manifest's size.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// A file's checksum does not match.
    #[error("checkpoint `{name}`: {path} is corrupt: its BLAKE3 checksum is {found}, the manifest says {expected}")]
    ChecksumMismatch {
        /// The checkpoint.
        name: String,
        /// The file.
        path: String,
        /// Manifest's checksum.
        expected: String,
        /// Computed.
        found: String,
    },
    /// The QEMU here is older than the one that wrote the stream.
    #[error("checkpoint `{name}` was saved by QEMU {recorded}; this QEMU ({binary}) is {installed}: a migration stream loads only into the same or a newer QEMU")]
    QemuTooOld {
        /// The checkpoint.
        name: String,
        /// The writer's version.
        recorded: String,
        /// The version here.
        installed: String,
        /// The binary.
        binary: String,
    },
    /// The guest could not be quiesced and `--quiesce required` was given.
    #[error("the guest could not be quiesced, and --quiesce required was given")]
    QuiesceRequired(#[source] QuiesceError),
    /// The VM must run.
    #[error("VM `{0}` is not running (`vmctl start {0}`)")]
    NotRunning(String),
    /// The VM must not run.
    #[error("VM `{0}` is running (pid {1}): stop it first (`vmctl stop {0}`); a restore replaces the running state")]
    Running(String, i32),
    /// QEMU went away.
    #[error("QEMU exited {stage}")]
    QemuGone {
        /// When.
        stage: String,
    },
    /// The migration failed.
    #[error("{0}")]
    Migration(String),
    /// A disk QEMU has is not in the VM's config, or the other way round.
    #[error("{0}")]
    Disks(String),
    /// qemu-img failed.
    #[error("qemu-img {what} failed: {detail}")]
    QemuImg {
        /// The subcommand.
        what: String,
        /// Its complaint.
        detail: String,
    },
    /// A test made this step fail ([`crate::util::test_fault`]); never outside tests.
    #[error("test fault `{0}` (VMCTL_TEST_FAULT is set)")]
    TestFault(&'static str),
    /// File system trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// QMP trouble.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// VM trouble.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl CheckpointError {
    /// vmctl's exit code for it: 2 bad usage, 3 the VM unreachable, busy or in the wrong
    /// state, 4 quiesce required and impossible, 5 the checkpoint failed its checks, 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        use CheckpointError as E;
        match self {
            E::BadName(_) | E::NotManaged | E::Exists { .. } | E::NotFound { .. } => 2,
            E::NotRunning(_) | E::Running(..) | E::Busy(_) => 3,
            E::Vm(VmError::NotFound { .. }) | E::Vm(VmError::NotRunning(_)) | E::Qmp(QmpError::Connect { .. }) => 3,
            E::QuiesceRequired(_) => 4,
            E::Manifest { .. }
            | E::Inconsistent { .. }
            | E::Missing { .. }
            | E::Truncated { .. }
            | E::ChecksumMismatch { .. }
            | E::QemuTooOld { .. } => 5,
            _ => 1,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CheckpointError {
    let what = what.into();
    move |source| CheckpointError::Io { what, source }
}

/// QMP `stop` (`paused`) or `cont` (`running`); returns QEMU's run state after it.
pub fn set_paused(vm: &Vm, paused: bool) -> Result<String, CheckpointError> {
    let mut q = vm.qmp(Duration::from_secs(10))?;
    q.execute(if paused { "stop" } else { "cont" }, None)?;
    Ok(q.execute("query-status", None)?["status"].as_str().unwrap_or("unknown").to_string())
}
