//! Consistent backups of a running QEMU VM.
//!
//! The flow (DESIGN.md, "Host side"): everything slow happens before the freeze (query the
//! disks, create the target images in parallel, attach them as QEMU nodes; meanwhile, on its
//! own thread, connect to the agent, resync, `guest-info`), so that the freeze window holds
//! only: freeze through the agent → one QMP `transaction` (a `blockdev-backup` per disk, whose
//! copy-before-write filter makes the copy point-in-time at that instant, plus a new
//! persistent dirty bitmap per disk for the next incremental) → thaw. The jobs are held back
//! until the thaw has its reply (a running copy starves it), then copy while the guest runs;
//! every file is fsynced and checksummed in parallel, and the manifest is written last,
//! atomically.
//!
//! Invariants:
//! - A backup directory without a manifest does not exist for `list`: a backup is built in
//!   `TARGET/.partial-ID/` and renamed to `TARGET/ID/` only once its manifest is durable, and
//!   every failure removes the partial directory (a crash leaves a hidden one that `list`
//!   reports as debris).
//! - Every path that froze the guest thaws it before anything else
//!   ([`crate::quiesce::Frozen`] thaws on drop); vssd additionally gets a deadline so that
//!   even a vmctl killed mid-freeze cannot keep the guest frozen.
//! - One operation at a time per VM, checkpoints included ([`crate::oplock`]); with that lock
//!   held, jobs and nodes named `vmctl-*` in QEMU are a dead vmctl's, and are cleaned up.
//! - The incremental chain is carried by bitmap names: backup ID creates bitmap `vmctl-ID` on
//!   every disk; an incremental after ID copies exactly what `vmctl-ID` marks, and on success
//!   replaces it with its own. A missing or inconsistent bitmap means "take a full backup".
//!   The bitmap must be on the top node (QEMU 7.2 looks for it on the node the job reads and
//!   nowhere else, and only the top node sees the guest's writes): a checkpoint carries it
//!   onto its overlay; one found only on a backing image is refused by name.
//! - A disk's name is its device's (see [`disk_name`]), never the node on top, which a
//!   checkpoint replaces.
//!
//! The rooms: [`disks`] (the disks as QEMU has them, and their names), [`manifest`] (what a
//! backup records, the listing of a target), [`take`] (the flow above), [`jobs`] (QEMU's
//! block jobs and nodes: waiting, cleaning up), [`verify`] (checks and restore).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::EnvelopeError;
use crate::oplock::LockError;
use crate::qmp::QmpError;
use crate::quiesce::QuiesceError;

pub mod disks;
pub mod jobs;
pub mod manifest;
pub mod take;
pub mod verify;

pub use crate::quiesce::Quiesce;
pub use disks::{disk_name, query_disks, SourceDisk};
pub use manifest::{list, Listing, Manifest, ManifestDisk, QuiesceReport, FORMAT};
pub use take::run;
pub use verify::{restore, verify, Check, VerifyReport};

const BITMAP_PREFIX: &str = "vmctl-";
/// Bytes per second of a job between the transaction and the thaw: next to nothing.
const HELD_SPEED: u64 = 1;
/// Prefix of a backup directory being written.
pub const PARTIAL_PREFIX: &str = ".partial-";

/// The steps of a backup's [`crate::timings::Timings`]. The steps on the critical path add up
/// to `total_ms` within a few milliseconds: prepare + agent_wait + freeze + copy (which begins
/// with the transaction and the thaw) + finish. Steps added after the first vmctl read as 0
/// from older manifests.
pub mod step {
    /// Start → the transaction ready: the lock, QMP, querying disks, the parent, creating and
    /// attaching the target images.
    pub const PREPARE: &str = "prepare_ms";
    /// The target images: `qemu-img create` of every disk (run in parallel) and `blockdev-add`
    /// (part of prepare).
    pub const TARGETS: &str = "targets_ms";
    /// The agent's connection, resync and `guest-info` (on its own thread, alongside prepare).
    pub const AGENT: &str = "agent_ms";
    /// How long the backup waited for the agent after prepare (the agent's share of the
    /// critical path).
    pub const AGENT_WAIT: &str = "agent_wait_ms";
    /// Freeze request → frozen reply.
    pub const FREEZE: &str = "freeze_ms";
    /// The QMP transaction.
    pub const TRANSACTION: &str = "transaction_ms";
    /// Thaw request → thawed reply.
    pub const THAW: &str = "thaw_ms";
    /// Freeze request sent → thaw reply received, as the host saw it (0 when not frozen).
    pub const FREEZE_WINDOW: &str = "freeze_window_ms";
    /// The block jobs: transaction start → every job concluded and every target closed.
    pub const COPY: &str = "copy_ms";
    /// Everything after the copy up to the manifest: the parent's bitmaps removed, fsync and
    /// checksum of every file (all in parallel).
    pub const FINISH: &str = "finish_ms";
    /// Within finish: the longest fsync of a backup file.
    pub const FSYNC: &str = "fsync_ms";
    /// Within finish: the longest checksum of a backup file (alongside the fsyncs).
    pub const HASH: &str = "hash_ms";
    /// The whole backup, up to writing the manifest.
    pub const TOTAL: &str = "total_ms";

    /// Every step, as a backup reports them.
    pub const ALL: &[&str] = &[
        PREPARE,
        TARGETS,
        AGENT,
        AGENT_WAIT,
        FREEZE,
        TRANSACTION,
        THAW,
        FREEZE_WINDOW,
        COPY,
        FINISH,
        FSYNC,
        HASH,
        TOTAL,
    ];
}

/// Errors of backups. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// QMP trouble before or after the guest was touched.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU went away during the backup.
    #[error(
        "QEMU exited during the backup ({stage}); nothing was kept. Start the VM again and take a new full backup"
    )]
    QemuGone {
        /// Where it happened.
        stage: String,
    },
    /// Quiesce was required and failed.
    #[error("the guest could not be quiesced and --quiesce required was given (nothing was copied; check the guest agent with `vmctl fsstatus`, or use --quiesce best-effort for a crash-consistent backup)")]
    QuiesceRequired(#[source] QuiesceError),
    /// No disk to back up.
    #[error("QEMU has no writable disk to back up (query-block lists none)")]
    NoDisks,
    /// Not enough space on the target.
    #[error("not enough space in {dir}: the backup needs about {need}, {free} are free. Free space there or choose another --target")]
    NoSpace {
        /// The target directory.
        dir: String,
        /// Estimate.
        need: String,
        /// Available.
        free: String,
    },
    /// The target filled up while copying.
    #[error("the target {dir} filled up while copying ({detail}); the partial backup was removed and the guest is thawed. Free space there or choose another --target")]
    TargetFull {
        /// The target directory.
        dir: String,
        /// QEMU's message.
        detail: String,
    },
    /// A block job failed.
    #[error("the copy of disk `{disk}` failed: {detail}; the partial backup was removed")]
    JobFailed {
        /// The disk.
        disk: String,
        /// QEMU's message.
        detail: String,
    },
    /// Incremental without a usable parent.
    #[error("cannot take an incremental backup: {0}. Take a full backup first (vmctl backup without --incremental)")]
    NoParent(String),
    /// Another vmctl is working on this target.
    #[error("another vmctl is taking a backup into {0}; wait for it")]
    Busy(String),
    /// Another operation (a backup, a checkpoint) runs on this VM.
    #[error(transparent)]
    VmBusy(#[from] LockError),
    /// qemu-img failed.
    #[error("qemu-img {what} failed: {detail} (apt-get install qemu-utils)")]
    QemuImg {
        /// The subcommand.
        what: String,
        /// Its output.
        detail: String,
    },
    /// Bad or unknown manifest.
    #[error("{path} is not a usable backup")]
    Manifest {
        /// The manifest.
        path: String,
        /// Why.
        #[source]
        source: EnvelopeError,
    },
    /// File system trouble.
    #[error("{what}")]
    Io {
        /// What.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl BackupError {
    /// The process exit code for this error (see the CLI's help).
    pub fn exit_code(&self) -> u8 {
        match self {
            BackupError::Qmp(QmpError::Connect { .. }) => 3,
            BackupError::QuiesceRequired(_) => 4,
            _ => 1,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// What a backup can promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Applications flushed and held (vssd's appvss) and filesystems were frozen.
    Application,
    /// Filesystems were frozen: each is as after a clean unmount.
    Filesystem,
    /// As if the power had been cut: journals replay, applications recover.
    Crash,
}

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    /// The VM's name (for ids and `list`).
    pub vm_name: String,
    /// QMP socket.
    pub qmp: PathBuf,
    /// Agent channel (host side), if any.
    pub agent: Option<PathBuf>,
    /// The VM's config, recorded in the manifest (attach mode: None).
    pub vm_config: Option<Value>,
    /// Where backups go.
    pub target: PathBuf,
    /// Copy only what changed since the last backup in `target`.
    pub incremental: bool,
    /// Quiesce policy.
    pub quiesce: Quiesce,
    /// vssd thaws by itself after this long, whatever happens to vmctl.
    pub freeze_deadline: Duration,
    /// How long to wait for the agent's freeze reply.
    pub freeze_timeout: Duration,
    /// How long to wait for the agent to answer at all (resync).
    pub agent_timeout: Duration,
    /// Block job speed limit, bytes per second (0 = none).
    pub speed: u64,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Skip the free-space check (tests of the out-of-space path).
    pub skip_space_check: bool,
}

/// What `run` returns.
#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}
