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
//! - One checkpoint operation at a time per VM (`checkpoints/.lock`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::backup::Quiesce;
use crate::qga::{Qga, QgaError};
use crate::qmp::{Qmp, QmpError};
use crate::util;
use crate::vm::{self, PortKind, Vm, VmConfig, VmError};

/// `manifest.json`'s `magic`.
pub const MAGIC: &str = "vmctl-checkpoint";
/// The manifest format this vmctl writes and reads. A different number is refused.
pub const FORMAT_VERSION: u32 = 1;
/// Section versions this vmctl writes; it reads a section up to its version here.
pub const SECTIONS: [(&str, u32); 4] = [("vm", 1), ("qemu", 1), ("disks", 1), ("state", 1)];
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The RAM + device state stream's file name.
pub const STATE_FILE: &str = "state.bin";
/// The checkpoint `vmctl suspend` writes and `vmctl resume` consumes.
pub const SUSPEND_NAME: &str = "suspend";
/// Prefix of a checkpoint directory being written.
pub const TMP_PREFIX: &str = ".tmp-";

const SINK_REPORT: &str = ".sink.json";
const LOCK_FILE: &str = ".lock";
/// The unit the stream moves in: a quarter of a core's L2 cache, so that what was read is
/// still cached when it is hashed and written.
const CHUNK: usize = 128 << 10;

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
    /// Another checkpoint operation holds the lock.
    #[error("another vmctl checkpoint operation runs on VM `{0}`; wait for it")]
    Busy(String),
    /// The manifest is not one.
    #[error("{path} is not a vmctl checkpoint manifest: {why}")]
    BadManifest {
        /// The manifest.
        path: String,
        /// Why.
        why: String,
    },
    /// A format or section version this vmctl does not know.
    #[error("checkpoint `{name}`: {what} version {found} is unknown to this vmctl (it reads {what} version {supported}): use a vmctl at least as new as the one that wrote it")]
    UnknownVersion {
        /// The checkpoint.
        name: String,
        /// "format" or "section `disks`".
        what: String,
        /// The version found.
        found: u32,
        /// The version understood.
        supported: u32,
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
    #[error("the guest could not be quiesced, and --quiesce required was given: {0}")]
    QuiesceRequired(String),
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
    /// File system trouble.
    #[error("{what}: {source}")]
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
    /// vmctl's exit code for it: 2 bad usage, 3 the VM unreachable or in the wrong state,
    /// 4 quiesce required and impossible, 5 the checkpoint failed its checks, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        use CheckpointError as E;
        match self {
            E::BadName(_) | E::NotManaged | E::Exists { .. } | E::NotFound { .. } => 2,
            E::NotRunning(_) | E::Running(..) | E::Busy(_) => 3,
            E::Vm(VmError::NotFound { .. }) | E::Vm(VmError::NotRunning(_)) | E::Qmp(QmpError::Connect { .. }) => 3,
            E::QuiesceRequired(_) => 4,
            E::BadManifest { .. }
            | E::UnknownVersion { .. }
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

// ---------------------------------------------------------------------------------------
// The manifest

/// A file and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRecord {
    /// Relative to the checkpoint directory.
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// BLAKE3, hex.
    pub blake3: String,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageRecord {
    /// Absolute path (overlays record their backing files by absolute path too).
    pub path: PathBuf,
    /// Image format.
    pub format: String,
    /// Bytes of the file.
    pub size: u64,
    /// BLAKE3 of the file, hex.
    pub blake3: String,
    /// Modification time (ns since the epoch) when hashed: lets a later checkpoint reuse the
    /// checksum of an image it shares. Not checked at restore.
    #[serde(default)]
    pub mtime_ns: u128,
}

/// A disk at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskRecord {
    /// The disk's name in the VM's config.
    pub name: String,
    /// QEMU's node name of its top image at the checkpoint.
    pub node: String,
    /// Virtual size, bytes.
    pub virtual_size: u64,
    /// The chain at the checkpoint, top first: the images the checkpoint keeps (immutable
    /// from the checkpoint on; the VM went on writing to `overlay`).
    pub chain: Vec<ImageRecord>,
    /// The overlay the running VM went on with (informational; deleted when unreferenced).
    pub overlay: Option<PathBuf>,
}

/// The QEMU that wrote the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QemuRecord {
    /// "7.2.22".
    pub version: String,
    /// The distribution's package string, if any.
    #[serde(default)]
    pub package: String,
    /// The resolved machine type ("pc-q35-7.2"), not an alias: a newer QEMU's `q35` is another
    /// machine, and the stream loads only into the same one.
    pub machine: String,
    /// "kvm" or "tcg".
    pub accel: String,
}

/// How the guest was quiesced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QuiesceRecord {
    /// The policy asked for.
    pub policy: String,
    /// The agent that froze, e.g. "vssd 0.1.0".
    pub agent: Option<String>,
    /// Filesystems frozen in the saved state: a restore thaws them.
    pub frozen: Option<u64>,
    /// Why not, when it was not.
    pub note: Option<String>,
}

/// How long the parts took.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timings {
    /// Agent freeze (0 without).
    pub freeze_ms: f64,
    /// The overlays' transaction.
    pub snapshot_ms: f64,
    /// `migrate` → QEMU reports completed (the stream was hashed on the way).
    pub stream_ms: f64,
    /// The guest's CPUs were stopped this long (stop → cont). 0 with --poweroff.
    pub downtime_ms: f64,
    /// QEMU's own figure of its final stop-and-copy phase.
    pub qemu_downtime_ms: f64,
    /// The state file's fsync (after `cont`: the guest runs meanwhile).
    pub sync_ms: f64,
    /// The disk images' checksums.
    pub disk_hash_ms: f64,
    /// The whole create.
    pub total_ms: f64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    /// Always [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The version of each section: `vm` (config, run-state, quiesce), `qemu`, `disks`, `state`.
    /// A writer bumps a section's version whenever a restore must understand what changed in
    /// it (a new VmConfig field that changes the machine bumps `vm`); a reader refuses any
    /// section newer than it knows, and any other `version`.
    pub sections: BTreeMap<String, u32>,
    /// The checkpoint's name (also its directory's).
    pub name: String,
    /// The VM's name.
    pub vm: String,
    /// When the VM was stopped for it (UTC).
    pub created: String,
    /// "checkpoint", or "suspend" for `vmctl suspend`.
    pub kind: String,
    /// The VM was powered off after the checkpoint.
    pub poweroff: bool,
    /// The VM's configuration at the checkpoint (memory, cpus, machine, disks, ports...).
    pub config: VmConfig,
    /// "running" or "paused": what the guest was doing; a restore gives it back.
    pub run_state: String,
    /// The agent's part.
    pub quiesce: QuiesceRecord,
    /// The QEMU that wrote the stream.
    pub qemu: QemuRecord,
    /// Every disk's chain.
    pub disks: Vec<DiskRecord>,
    /// The migration stream.
    pub state: FileRecord,
    /// QEMU's count of guest RAM, bytes.
    pub ram_bytes: u64,
    /// Timings of the create.
    pub timings: Timings,
    /// The vmctl that wrote it.
    pub vmctl_version: String,
}

impl Manifest {
    /// Parses a manifest, refusing an unknown format or section version before anything else
    /// is read (a newer writer may have changed what the fields mean).
    pub fn parse(text: &str, path: &Path, name: &str) -> Result<Manifest, CheckpointError> {
        let bad = |why: String| CheckpointError::BadManifest { path: path.display().to_string(), why };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v["magic"] != MAGIC {
            return Err(bad(format!("its magic is {}, not \"{MAGIC}\"", v["magic"])));
        }
        let version = v["version"].as_u64().ok_or_else(|| bad("no format version".into()))?;
        if version != FORMAT_VERSION as u64 {
            return Err(CheckpointError::UnknownVersion {
                name: name.into(),
                what: "format".into(),
                found: version.min(u32::MAX as u64) as u32,
                supported: FORMAT_VERSION,
            });
        }
        let sections = v["sections"].as_object().ok_or_else(|| bad("no section versions".into()))?;
        for (s, supported) in SECTIONS {
            let found =
                sections.get(s).and_then(Value::as_u64).ok_or_else(|| bad(format!("no version for section `{s}`")))?;
            if found == 0 || found > supported as u64 {
                return Err(CheckpointError::UnknownVersion {
                    name: name.into(),
                    what: format!("section `{s}`"),
                    found: found.min(u32::MAX as u64) as u32,
                    supported,
                });
            }
        }
        serde_json::from_value(v).map_err(|e| bad(format!("malformed: {e}")))
    }

    /// Reads `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, CheckpointError> {
        let path = dir.join(MANIFEST);
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&path).map_err(|e| CheckpointError::BadManifest {
            path: path.display().to_string(),
            why: format!("cannot read it: {e}"),
        })?;
        Manifest::parse(&text, &path, &name)
    }

    /// The sections as this vmctl writes them.
    pub fn current_sections() -> BTreeMap<String, u32> {
        SECTIONS.iter().map(|(s, v)| (s.to_string(), *v)).collect()
    }
}

// ---------------------------------------------------------------------------------------
// The stream: hashed on the way, in both directions

/// Size and BLAKE3 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Bytes.
    pub size: u64,
    /// BLAKE3, hex.
    pub blake3: String,
}

/// What [`pump`] did.
#[derive(Debug)]
pub struct Pumped {
    /// What was read.
    pub digest: Digest,
    /// Bytes written to the output.
    pub written: u64,
    /// The first write error (the rest of the input was still read and hashed).
    pub write_error: Option<io::Error>,
    /// With `expect`: the input did not match, and its last chunk was withheld.
    pub withheld: bool,
}

/// Reads until `buf` is full or the input ends.
fn fill<R: Read + ?Sized>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies `input` to `output`, hashing what it reads: read, hash, write, one chunk at a time
/// in one thread, so that the chunk is still in the core's cache for the hash and the write.
/// (Measured here: 128 KiB chunks move 1.9 GB/s through read + BLAKE3 + write, 4 MiB chunks
/// 0.3-1.2 GB/s; a second thread bought nothing on two cores, one of them QEMU's.)
///
/// With `expect`, the last chunk is held back until the whole input was read: when the input
/// does not match (size or checksum), it is never written, so the reader at the other end
/// never sees a complete stream. With `stop_on_write_error`, a failed write ends the copy;
/// without it the input is still read to its end and hashed (the caller wants to know whether
/// the input was good).
pub fn pump<R, W>(
    mut input: R,
    output: &mut W,
    expect: Option<&Digest>,
    stop_on_write_error: bool,
) -> io::Result<Pumped>
where
    R: Read,
    W: Write + ?Sized,
{
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut held = vec![0u8; CHUNK];
    let mut held_n: Option<usize> = None;
    let mut written = 0u64;
    let mut write_error: Option<io::Error> = None;
    let mut write = |b: &[u8], written: &mut u64, err: &mut Option<io::Error>| {
        if err.is_none() {
            match output.write_all(b) {
                Ok(()) => *written += b.len() as u64,
                Err(e) => *err = Some(e),
            }
        }
    };
    loop {
        let n = fill(&mut input, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
        if expect.is_some() {
            if let Some(hn) = held_n {
                write(&held[..hn], &mut written, &mut write_error);
            }
            std::mem::swap(&mut buf, &mut held);
            held_n = Some(n);
        } else {
            write(&buf[..n], &mut written, &mut write_error);
        }
        if let Some(e) = write_error.take_if(|_| stop_on_write_error) {
            return Err(e);
        }
    }
    let digest = Digest { size, blake3: h.finalize().to_hex().to_string() };
    let mut withheld = false;
    match (expect, held_n) {
        (Some(e), Some(hn)) if *e == digest => write(&held[..hn], &mut written, &mut write_error),
        (Some(e), _) if *e != digest => withheld = true,
        _ => {}
    }
    if write_error.is_none() {
        if let Err(e) = output.flush() {
            write_error = Some(e);
        }
    }
    Ok(Pumped { digest, written, write_error, withheld })
}

/// The report `__sink` and `__source` leave for vmctl.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StreamReport {
    /// Everything went as it should.
    pub ok: bool,
    /// Bytes read.
    pub size: u64,
    /// BLAKE3 of what was read.
    pub blake3: String,
    /// Bytes written.
    pub written: u64,
    /// Source: the input did not match and its tail was withheld.
    #[serde(default)]
    pub withheld: bool,
    /// What failed.
    pub error: Option<String>,
    /// Milliseconds from start to end.
    pub ms: f64,
}

/// Written whole under another name and renamed, so a reader never sees half of it; not
/// fsynced: it lives only until vmctl has read it, and a sync here could make the journal wait
/// for the state file's data while QEMU waits for the sink.
fn write_report(path: &Path, r: &StreamReport) {
    let text = serde_json::to_vec_pretty(r).expect("report serialises");
    let tmp = path.with_extension("part");
    if let Err(e) = std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, path)) {
        eprintln!("vmctl: cannot write {}: {e}", path.display());
    }
}

/// A bigger pipe means fewer wake-ups of both ends; a pipe is all it applies to.
fn grow_pipe<F: std::os::fd::AsFd>(fd: F) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// `vmctl __sink`: stdin → `out`. See [`sink_stream`].
pub fn run_sink(out: &Path, report: &Path) -> u8 {
    // A descriptor of our own: std's Stdin is a locked, buffered handle of one thread.
    match std::os::fd::AsFd::as_fd(&io::stdin()).try_clone_to_owned() {
        Ok(fd) => {
            let stdin = std::fs::File::from(fd);
            grow_pipe(&stdin);
            sink_stream(stdin, out, report)
        }
        Err(e) => {
            write_report(report, &StreamReport { error: Some(format!("stdin: {e}")), ..Default::default() });
            1
        }
    }
}

/// Writes `input` to a new file `out`, hashed on the way; then leaves the size and checksum
/// in `report` (also when it failed, with the reason). Exit code 0 or 1.
///
/// It does not fsync: QEMU waits for the process it started to exit before it reports the
/// migration complete, and the VM's CPUs stay stopped until then. vmctl fsyncs the file
/// itself after `cont` (fsync acts on the file, whichever descriptor asks).
pub fn sink_stream<R: Read>(input: R, out: &Path, report: &Path) -> u8 {
    let t0 = Instant::now();
    let r = (|| -> io::Result<Pumped> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(out)?;
        let p = pump(input, &mut f, None, true)?;
        if let Some(e) = p.write_error {
            return Err(e);
        }
        Ok(p)
    })();
    let ms = util::ms(t0.elapsed());
    let rep = match r {
        Ok(p) => StreamReport {
            ok: true,
            size: p.digest.size,
            blake3: p.digest.blake3,
            written: p.written,
            ms,
            ..Default::default()
        },
        Err(e) => {
            StreamReport { ok: false, error: Some(format!("writing {}: {e}", out.display())), ms, ..Default::default() }
        }
    };
    write_report(report, &rep);
    if rep.ok {
        0
    } else {
        1
    }
}

/// `vmctl __source`: `input` → stdout. See [`source_stream`].
pub fn run_source(input: &Path, expect: &Digest, report: &Path) -> u8 {
    match std::os::fd::AsFd::as_fd(&io::stdout()).try_clone_to_owned() {
        Ok(fd) => {
            // Unbuffered: std's Stdout is line-buffered.
            let stdout = std::fs::File::from(fd);
            grow_pipe(&stdout);
            source_stream(input, expect, stdout, report)
        }
        Err(e) => {
            write_report(report, &StreamReport { error: Some(format!("stdout: {e}")), ..Default::default() });
            1
        }
    }
}

/// Feeds `input` to `out`, hashed on the way; the last chunk is written only when the whole
/// file matched `expect`, so a reader never sees a complete corrupt stream. Leaves the result
/// in `report`. Exit code 0 when it matched and was delivered, 3 when it did not match, 1 on
/// other errors.
pub fn source_stream<W: Write>(input: &Path, expect: &Digest, mut out: W, report: &Path) -> u8 {
    let t0 = Instant::now();
    let r = std::fs::File::open(input).and_then(|f| pump(f, &mut out, Some(expect), false));
    let ms = util::ms(t0.elapsed());
    let (rep, code) = match r {
        Ok(p) => {
            let matched = p.digest == *expect;
            let error = if !matched {
                Some(format!(
                    "{} does not match its manifest (size {}, BLAKE3 {})",
                    input.display(),
                    p.digest.size,
                    p.digest.blake3
                ))
            } else {
                p.write_error.as_ref().map(|e| format!("QEMU stopped reading the stream: {e}"))
            };
            let code = if !matched {
                3
            } else if p.write_error.is_some() {
                1
            } else {
                0
            };
            (
                StreamReport {
                    ok: code == 0,
                    size: p.digest.size,
                    blake3: p.digest.blake3,
                    written: p.written,
                    withheld: p.withheld,
                    error,
                    ms,
                },
                code,
            )
        }
        Err(e) => (
            StreamReport {
                ok: false,
                error: Some(format!("reading {}: {e}", input.display())),
                ms,
                ..Default::default()
            },
            1,
        ),
    };
    write_report(report, &rep);
    code
}

/// Quotes a word for `/bin/sh` (QEMU runs `exec:` URIs through it).
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn self_exe() -> Result<PathBuf, CheckpointError> {
    std::env::current_exe().map_err(io_err("cannot find vmctl's own executable for the exec: migration"))
}

/// The `exec:` URI that makes QEMU write its stream into `vmctl __sink`.
pub fn sink_uri(exe: &Path, out: &Path, report: &Path) -> String {
    format!(
        "exec:exec {} __sink --out {} --report {}",
        sh_quote(&exe.display().to_string()),
        sh_quote(&out.display().to_string()),
        sh_quote(&report.display().to_string())
    )
}

/// The `exec:` URI that makes QEMU read its stream from `vmctl __source`.
pub fn source_uri(exe: &Path, input: &Path, expect: &Digest, report: &Path) -> String {
    format!(
        "exec:exec {} __source --in {} --size {} --blake3 {} --report {}",
        sh_quote(&exe.display().to_string()),
        sh_quote(&input.display().to_string()),
        expect.size,
        sh_quote(&expect.blake3),
        sh_quote(&report.display().to_string())
    )
}

fn read_report(path: &Path) -> Option<StreamReport> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn wait_report(path: &Path, limit: Duration) -> Option<StreamReport> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(r) = read_report(path) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Where checkpoints live, listing, locking, garbage collection

/// `VMDIR/checkpoints`.
pub fn checkpoints_dir(vm: &Vm) -> PathBuf {
    vm.dir.join("checkpoints")
}

/// `VMDIR/overlays`: every image vmctl makes for checkpoints and restores.
pub fn overlays_dir(vm: &Vm) -> PathBuf {
    vm.dir.join("overlays")
}

/// Checks a checkpoint name (it becomes a directory name).
pub fn check_name(name: &str) -> Result<(), CheckpointError> {
    vm::check_name(name).map_err(|_| CheckpointError::BadName(name.into()))
}

/// A VM's checkpoints.
#[derive(Debug, Default)]
pub struct Listing {
    /// The complete ones, oldest first.
    pub good: Vec<(PathBuf, Manifest)>,
    /// Directories that are not good checkpoints (interrupted creates, unreadable or unknown
    /// manifests), with the reason.
    pub leftovers: Vec<(PathBuf, String)>,
}

/// Lists a VM's checkpoints.
pub fn list(vm: &Vm) -> Result<Listing, CheckpointError> {
    let dir = checkpoints_dir(vm);
    let mut out = Listing::default();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("cannot read {}", dir.display()))(e)),
    };
    for e in rd.flatten() {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) {
            out.leftovers.push((p, "an interrupted create".into()));
            continue;
        }
        match Manifest::load(&p) {
            Ok(m) => out.good.push((p, m)),
            Err(e) => out.leftovers.push((p, e.to_string())),
        }
    }
    out.good.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.1.name.cmp(&b.1.name)));
    out.leftovers.sort();
    Ok(out)
}

/// Holds `checkpoints/.lock` while alive.
pub struct Lock {
    _f: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the VM's checkpoint lock (refuses at once when another operation holds it).
pub fn lock(vm: &Vm) -> Result<Lock, CheckpointError> {
    let dir = checkpoints_dir(vm);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(io_err("cannot open the checkpoint lock"))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Lock { _f: l }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(CheckpointError::Busy(vm.config.name.clone())),
        Err((_, e)) => Err(io_err("cannot lock the checkpoints")(io::Error::from(e))),
    }
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// An image's backing chain, top first, as qemu-img reads it (`-U`: the image may be in use).
pub fn image_chain(top: &Path) -> Result<Vec<(PathBuf, String)>, CheckpointError> {
    let out =
        Command::new("qemu-img").args(["info", "-U", "--backing-chain", "--output=json"]).arg(top).output().map_err(
            |e| CheckpointError::QemuImg { what: "info".into(), detail: format!("cannot run qemu-img: {e}") },
        )?;
    if !out.status.success() {
        return Err(CheckpointError::QemuImg {
            what: "info".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CheckpointError::QemuImg { what: "info".into(), detail: format!("unreadable output: {e}") })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (PathBuf::from(i["filename"].as_str().unwrap_or("")), i["format"].as_str().unwrap_or("raw").to_string())
        })
        .collect())
}

/// Every image the VM's config uses now, with its backing files.
pub fn live_images(vm: &Vm) -> Result<BTreeSet<PathBuf>, CheckpointError> {
    let mut set = BTreeSet::new();
    for d in &vm.config.disks {
        for (p, _) in image_chain(&vm.disk_path(d))? {
            set.insert(canon(&p));
        }
    }
    Ok(set)
}

/// Removes overlays (under `VMDIR/overlays/` only) that neither the live chain nor any
/// checkpoint references. Returns what it removed. Deletes nothing when it cannot tell.
pub fn collect_garbage(vm: &Vm) -> Result<Vec<PathBuf>, CheckpointError> {
    let dir = overlays_dir(vm);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
    let mut keep = live_images(vm)?;
    let listing = list(vm)?;
    if !listing
        .leftovers
        .iter()
        .all(|(p, _)| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TMP_PREFIX)))
    {
        // A checkpoint this vmctl cannot read may still need its images.
        return Ok(Vec::new());
    }
    for (_, m) in &listing.good {
        for d in &m.disks {
            for i in &d.chain {
                keep.insert(canon(&i.path));
            }
        }
    }
    let mut removed = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2") && !keep.contains(&canon(&p)) && std::fs::remove_file(&p).is_ok()
        {
            removed.push(p);
        }
    }
    let _ = util::fsync_dir(&dir);
    Ok(removed)
}

/// Deletes a checkpoint (its directory) and the overlays nothing references any more.
pub fn delete(vm: &Vm, name: &str) -> Result<Vec<PathBuf>, CheckpointError> {
    let _l = lock(vm)?;
    let dir = checkpoints_dir(vm).join(name);
    if name.starts_with('.') || name.contains('/') || !dir.is_dir() {
        let known = list(vm)?.good.into_iter().map(|(_, m)| m.name).collect();
        return Err(CheckpointError::NotFound { vm: vm.config.name.clone(), name: name.into(), known });
    }
    remove_dir(&dir)?;
    collect_garbage(vm)
}

/// Deletes every checkpoint, and every leftover of an interrupted create.
pub fn destroy_all(vm: &Vm) -> Result<(usize, Vec<PathBuf>), CheckpointError> {
    let _l = lock(vm)?;
    let l = list(vm)?;
    let n = l.good.len();
    for p in l.good.iter().map(|(p, _)| p).chain(l.leftovers.iter().map(|(p, _)| p)) {
        remove_dir(p)?;
    }
    Ok((n, collect_garbage(vm)?))
}

fn remove_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Rename first: a directory half removed must not look like a checkpoint.
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let doomed = if name.starts_with(TMP_PREFIX) {
        dir.to_path_buf()
    } else {
        parent.join(format!("{TMP_PREFIX}deleting-{name}-{}", std::process::id()))
    };
    if doomed != dir {
        std::fs::rename(dir, &doomed).map_err(io_err(format!("cannot remove {}", dir.display())))?;
        let _ = util::fsync_dir(parent);
    }
    std::fs::remove_dir_all(&doomed).map_err(io_err(format!("cannot remove {}", doomed.display())))?;
    let _ = util::fsync_dir(parent);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// QEMU helpers

/// "QEMU emulator version 7.2.22 (Debian ...)" or "7.2.22" → (7, 2, 22).
pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let word =
        s.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))?;
    let mut it = word.split('.').map(|x| x.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>());
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next().and_then(|x| x.ok()).unwrap_or(0)))
}

/// The version a QEMU binary reports with `--version`.
pub fn binary_version(qemu: &str) -> Result<(String, (u64, u64, u64)), CheckpointError> {
    let out = Command::new(qemu).arg("--version").output().map_err(|e| CheckpointError::Io {
        what: format!("cannot run {qemu} --version (apt-get install qemu-system-x86)"),
        source: e,
    })?;
    let text = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    let v = parse_version(&text)
        .ok_or_else(|| CheckpointError::Migration(format!("cannot read the version of {qemu}: {text:?}")))?;
    Ok((text, v))
}

fn qmp_gone(stage: &str) -> impl FnOnce(QmpError) -> CheckpointError + '_ {
    move |e| {
        if e.is_closed() {
            CheckpointError::QemuGone { stage: stage.to_string() }
        } else {
            e.into()
        }
    }
}

/// Waits until a migration (either side) reaches `target` ("completed", or "pre-switchover"
/// with that capability) or fails: the MIGRATION event, with a query now and then in case it
/// was missed. Returns `query-migrate`'s answer.
fn wait_migration(qmp: &mut Qmp, limit: Duration, stage: &str, target: &str) -> Result<Value, CheckpointError> {
    let deadline = Instant::now() + limit;
    loop {
        let ended = |e: &crate::qmp::Event| {
            e.name == "MIGRATION"
                && e.data["status"]
                    .as_str()
                    .is_some_and(|st| st == target || matches!(st, "completed" | "failed" | "cancelled"))
        };
        let ev = qmp.wait_event(Duration::from_millis(250), ended).map_err(qmp_gone(stage))?;
        let r = qmp.execute("query-migrate", None).map_err(qmp_gone(stage))?;
        match r["status"].as_str() {
            Some(st) if st == target => return Ok(r),
            Some(s @ ("failed" | "cancelled")) => {
                let why = r["error-desc"].as_str().unwrap_or("QEMU gave no reason");
                return Err(CheckpointError::Migration(format!("the migration {s} {stage}: {why}")));
            }
            _ if ev.is_some() => {
                // The event said it ended; query-migrate lags by a moment.
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(CheckpointError::Migration(format!("the migration did not end within {limit:?} {stage}")));
        }
    }
}

/// `cont` on the source of a completed migration. QEMU announces the completion before it
/// leaves `finish-migrate`, and refuses `cont` until then ("Migration is not finalized yet").
fn cont_after_migration(qmp: &mut Qmp) -> Result<(), CheckpointError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match qmp.execute("cont", None) {
            Ok(_) => return Ok(()),
            Err(QmpError::Command { desc, .. }) if desc.contains("not finalized") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(qmp_gone("when told to continue")(e)),
        }
    }
}

fn enable_migration_events(qmp: &mut Qmp) -> Result<(), CheckpointError> {
    qmp.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]})))?;
    Ok(())
}

/// `pause-before-switchover`: QEMU stops the VM for the last pass and waits for
/// `migrate-continue`, disks still active; the overlays are taken there. Always set
/// explicitly (on or off): a QEMU left with it on would hang the next plain save.
fn set_pause_before_switchover(qmp: &mut Qmp, on: bool) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "pause-before-switchover", "state": on}]})),
    )
    .map(|_| ())
}

/// Backups' persistent dirty bitmaps stay with the image they were made on, which turns read
/// only under the new overlay; and QEMU's `blockdev-backup` looks for its bitmap only on the
/// node it reads, the top one. So each bitmap gets a copy on the new overlay, what was dirty
/// merged in, in the overlays' own transaction: the overlay never exists without it, and the
/// next incremental backup copies what changed before the checkpoint and after it. (The
/// original stays, read only, in the checkpoint's image, for an incremental after a restore
/// to refuse by name rather than go silent.)
fn bitmap_actions(d: &LiveDisk, node: &str) -> Vec<Value> {
    let mut actions = Vec::new();
    for (name, granularity) in &d.bitmaps {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": node, "name": name, "granularity": granularity, "persistent": true}}));
        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
            "node": node, "target": name, "bitmaps": [{"node": d.node, "name": name}]}}));
    }
    actions
}

/// One transaction: every disk's overlay, or none. Then vm.toml names the overlays, since
/// the VM writes to them from now on. Returns the transaction's milliseconds.
fn take_overlays(
    qmp: &mut Qmp,
    vm: &Vm,
    disks: &[LiveDisk],
    plan: &[(PathBuf, String)],
) -> Result<f64, CheckpointError> {
    let t = Instant::now();
    let actions: Vec<Value> = disks
        .iter()
        .zip(plan)
        .flat_map(|(d, (file, node))| {
            let snap = json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": d.node, "snapshot-file": file, "snapshot-node-name": node,
                "format": "qcow2", "mode": "absolute-paths"}});
            std::iter::once(snap).chain(bitmap_actions(d, node))
        })
        .collect();
    if !actions.is_empty() {
        qmp.execute("transaction", Some(json!({"actions": actions})))
            .map_err(qmp_gone("during the overlays' transaction"))?;
    }
    let ms = util::ms(t.elapsed());
    tracing::info!("disk overlays taken (and backups' bitmaps carried onto them) in {ms:.1} ms");
    let mut c = vm.config.clone();
    for (d, (file, _)) in c.disks.iter_mut().zip(plan) {
        d.path = file.strip_prefix(&vm.dir).map(Path::to_path_buf).unwrap_or_else(|_| file.clone());
        d.format = "qcow2".into();
    }
    write_config(vm, &c)?;
    Ok(ms)
}

/// A disk of the running VM, mapped to its config entry.
#[derive(Debug, Clone)]
struct LiveDisk {
    name: String,
    node: String,
    virtual_size: u64,
    /// Top first.
    chain: Vec<(PathBuf, String)>,
    /// Persistent dirty bitmaps of the top node (backups' incrementals): (name, granularity).
    bitmaps: Vec<(String, u64)>,
}

/// The VM's disks as QEMU has them, each matched to its config entry by the device id
/// `vd-NAME` that `Vm::command` gives it. A writable disk QEMU has and the config lacks is
/// refused: its device state would be saved without a consistent disk.
fn live_disks(qmp: &mut Qmp, vm: &Vm) -> Result<Vec<LiveDisk>, CheckpointError> {
    let blocks = qmp.execute("query-block", None)?;
    let blocks: Vec<Value> = blocks.as_array().cloned().unwrap_or_default();
    let id_of = |b: &Value| -> String {
        let q = b["qdev"].as_str().unwrap_or("");
        q.split('/').find(|s| s.starts_with("vd-")).map(|s| s.trim_start_matches("vd-").to_string()).unwrap_or_default()
    };
    let mut out = Vec::new();
    for d in &vm.config.disks {
        let b = blocks.iter().find(|b| id_of(b) == d.name).ok_or_else(|| {
            CheckpointError::Disks(format!("QEMU has no device vd-{} for disk `{}` of the config", d.name, d.name))
        })?;
        let ins =
            b.get("inserted").ok_or_else(|| CheckpointError::Disks(format!("disk `{}` has no medium", d.name)))?;
        let mut chain = Vec::new();
        let mut img = &ins["image"];
        while img.is_object() {
            chain.push((
                PathBuf::from(img["filename"].as_str().unwrap_or("")),
                img["format"].as_str().unwrap_or("raw").to_string(),
            ));
            img = &img["backing-image"];
        }
        let bitmaps = ins["dirty-bitmaps"]
            .as_array()
            .or(b["dirty-bitmaps"].as_array())
            .into_iter()
            .flatten()
            .filter(|bm| bm["persistent"].as_bool() == Some(true) && bm["inconsistent"].as_bool() != Some(true))
            .filter_map(|bm| Some((bm["name"].as_str()?.to_string(), bm["granularity"].as_u64().unwrap_or(65536))))
            .collect();
        out.push(LiveDisk {
            name: d.name.clone(),
            node: ins["node-name"].as_str().unwrap_or("").to_string(),
            virtual_size: ins["image"]["virtual-size"].as_u64().unwrap_or(0),
            chain,
            bitmaps,
        });
    }
    for b in &blocks {
        let Some(ins) = b.get("inserted") else { continue };
        if ins["ro"].as_bool() == Some(true) {
            continue;
        }
        let id = id_of(b);
        if !vm.config.disks.iter().any(|d| d.name == id) {
            return Err(CheckpointError::Disks(format!(
                "QEMU has a writable disk {} that is not in the VM's config: vmctl cannot give it a consistent checkpoint",
                b["qdev"].as_str().or(b["device"].as_str()).unwrap_or("?")
            )));
        }
    }
    Ok(out)
}

fn mtime_ns(md: &std::fs::Metadata) -> u128 {
    md.modified().ok().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Records an image: its size and checksum, reusing the checksum another checkpoint recorded
/// for the same unchanged file (the images below a checkpoint are shared and immutable).
fn image_record(path: &Path, format: &str, known: &[ImageRecord]) -> Result<ImageRecord, CheckpointError> {
    let md = std::fs::metadata(path).map_err(io_err(format!("cannot stat {}", path.display())))?;
    let (size, mtime) = (md.len(), mtime_ns(&md));
    if let Some(k) = known.iter().find(|k| k.path == path && k.size == size && k.mtime_ns == mtime && mtime != 0) {
        return Ok(k.clone());
    }
    let blake3 = crate::backup::hash_file(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    Ok(ImageRecord { path: path.to_path_buf(), format: format.into(), size, blake3, mtime_ns: mtime })
}

fn write_config(vm: &Vm, config: &VmConfig) -> Result<(), CheckpointError> {
    let text = toml::to_string(config).expect("config serialises");
    util::write_atomic(&vm.dir.join("vm.toml"), text.as_bytes()).map_err(io_err("cannot write vm.toml"))
}

/// A node name QEMU accepts (at most 31 characters, a letter first) and that is new.
fn node_name(disk: &str, stamp: u64) -> String {
    let d: String = disk.chars().take(18).collect();
    format!("{d}-ck{:x}", stamp & 0xffff_ffff)
}

fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    vm::wait_gone(pid, Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// Create

/// What `create` is asked to do.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The name (default: a timestamp).
    pub name: Option<String>,
    /// `vmctl suspend`'s checkpoint (the reserved name, always powered off).
    pub suspend: bool,
    /// Quit QEMU once the checkpoint is complete.
    pub poweroff: bool,
    /// Freeze the guest's filesystems around it.
    pub quiesce: Quiesce,
    /// vssd thaws by itself after this long.
    pub freeze_deadline: Duration,
    /// How long the agent gets to answer.
    pub agent_timeout: Duration,
    /// Limit the stream to this many bytes per second (None: no limit, not even QEMU's
    /// default 128 MiB/s).
    pub bandwidth: Option<u64>,
    /// Save RAM while the guest runs; QEMU stops it only for the last pass, when the overlays
    /// are taken (`pause-before-switchover`). The downtime is that last pass, not the stream.
    pub live: bool,
}

impl Default for CreateRequest {
    fn default() -> Self {
        CreateRequest {
            name: None,
            suspend: false,
            poweroff: false,
            quiesce: Quiesce::Off,
            freeze_deadline: Duration::from_secs(120),
            agent_timeout: Duration::from_secs(5),
            bandwidth: None,
            live: false,
        }
    }
}

/// What `create` made.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The thaw failed (the guest may still be frozen; vssd thaws by itself at its deadline).
    pub thaw_error: Option<String>,
}

/// Effectively unlimited, and within what QEMU 7.2 accepts for `max-bandwidth`.
const NO_LIMIT: u64 = 1 << 40;

/// Takes a checkpoint of a running (or paused) VM. See the module's description.
pub fn create(vm: &Vm, req: &CreateRequest) -> Result<Created, CheckpointError> {
    let t0 = Instant::now();
    let name = match (&req.name, req.suspend) {
        (_, true) => SUSPEND_NAME.to_string(),
        (Some(n), false) => n.clone(),
        (None, false) => util::timestamps(SystemTime::now()).1,
    };
    check_name(&name)?;
    if name == SUSPEND_NAME && !req.suspend {
        return Err(CheckpointError::BadName(name));
    }
    let Some(pid) = vm.pid() else { return Err(CheckpointError::NotRunning(vm.config.name.clone())) };
    let _l = lock(vm)?;
    let cdir = checkpoints_dir(vm);
    let final_dir = cdir.join(&name);
    if final_dir.exists() {
        return Err(CheckpointError::Exists { vm: vm.config.name.clone(), name });
    }
    let tmp = cdir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
    let r = create_in(vm, req, &name, &tmp, pid, t0);
    let (mut manifest, thaw_error) = match r {
        Ok(x) => x,
        Err(e) => {
            if tmp.join(STATE_FILE).exists() {
                // The sink, QEMU's child, outlives a killed QEMU by a moment and then leaves its
                // report here: let it, or it would recreate the directory's last entry.
                let _ = wait_report(&tmp.join(SINK_REPORT), Duration::from_secs(5));
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let finish = (|| -> Result<(), CheckpointError> {
        manifest.timings.total_ms = util::ms(t0.elapsed());
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        let mp = tmp.join(MANIFEST);
        let mut f = std::fs::File::create(&mp).map_err(io_err("cannot write the manifest"))?;
        f.write_all(&text).and_then(|_| f.sync_all()).map_err(io_err("cannot write the manifest"))?;
        util::fsync_dir(&tmp).map_err(io_err("cannot sync the checkpoint"))?;
        std::fs::rename(&tmp, &final_dir).map_err(io_err(format!(
            "cannot rename {} to {}",
            tmp.display(),
            final_dir.display()
        )))?;
        util::fsync_dir(&cdir).map_err(io_err("cannot sync the checkpoints directory"))
    })();
    if let Err(e) = finish {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if req.poweroff || req.suspend {
        // The checkpoint is complete and durable: only now may the VM go.
        if let Ok(mut q) = Qmp::connect(&vm.qmp_path(), Duration::from_secs(10)) {
            let _ = q.execute("quit", None);
        }
        if !vm::wait_gone(pid, Duration::from_secs(15)) {
            kill_pid(pid);
        }
    }
    Ok(Created { dir: final_dir, manifest, thaw_error })
}

/// The agent, frozen.
struct Freeze {
    qga: Qga,
}

fn freeze(vm: &Vm, req: &CreateRequest, running: bool) -> Result<(Option<Freeze>, QuiesceRecord), CheckpointError> {
    let policy = format!("{:?}", req.quiesce).to_lowercase().replace("besteffort", "best-effort");
    let mut rec = QuiesceRecord { policy, ..Default::default() };
    if req.quiesce == Quiesce::Off {
        return Ok((None, rec));
    }
    let attempt = || -> Result<(Qga, String, Option<u64>), String> {
        if !running {
            return Err("the VM is paused: its agent cannot answer".into());
        }
        if !vm.config.agent {
            return Err("the VM has no guest agent channel".into());
        }
        let mut g = Qga::connect(&vm.agent_path()).map_err(|e| e.to_string())?;
        g.sync_timeout = req.agent_timeout;
        let info = g.info(req.agent_timeout).map_err(|e| e.to_string())?;
        let r = if info.is_vssd {
            g.execute(
                "vssd-freeze",
                Some(json!({"deadline": req.freeze_deadline.as_secs_f64()})),
                Duration::from_secs(60),
            )
            .map(|r| r["frozen"].as_u64())
        } else {
            g.execute("guest-fsfreeze-freeze", None, Duration::from_secs(60)).map(|r| r.as_u64())
        };
        match r {
            Ok(n) => Ok((g, info.describe(), n)),
            Err(e) => {
                let _ = g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(10));
                Err(format!("the freeze failed: {e}"))
            }
        }
    };
    match attempt() {
        Ok((g, agent, n)) => {
            rec.agent = Some(agent);
            rec.frozen = n;
            Ok((Some(Freeze { qga: g }), rec))
        }
        Err(why) if req.quiesce == Quiesce::Required => Err(CheckpointError::QuiesceRequired(why)),
        Err(why) => {
            rec.note = Some(format!("not quiesced: {why}"));
            Ok((None, rec))
        }
    }
}

fn thaw(f: &mut Freeze) -> Result<(), QgaError> {
    f.qga.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)).map(|_| ())
}

#[allow(clippy::too_many_arguments)]
fn create_in(
    vm: &Vm,
    req: &CreateRequest,
    name: &str,
    tmp: &Path,
    pid: i32,
    t0: Instant,
) -> Result<(Manifest, Option<String>), CheckpointError> {
    let exe = self_exe()?;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    let (ma, mi, mc) = qmp.version();
    let package = qmp.greeting()["QMP"]["version"]["package"].as_str().unwrap_or("").trim().to_string();
    let machine = qmp
        .execute("qom-get", Some(json!({"path": "/machine", "property": "type"})))?
        .as_str()
        .unwrap_or("")
        .trim_end_matches("-machine")
        .to_string();
    let accel = if qmp.execute("query-kvm", None)?["enabled"].as_bool() == Some(true) { "kvm" } else { "tcg" };
    let run_state = qmp.execute("query-status", None)?["status"].as_str().unwrap_or("").to_string();
    let running = match run_state.as_str() {
        "running" => true,
        "paused" => false,
        s => {
            return Err(CheckpointError::Migration(format!(
                "VM `{}` is {s}: a checkpoint needs it running or paused",
                vm.config.name
            )))
        }
    };
    let disks = live_disks(&mut qmp, vm)?;
    let ovdir = overlays_dir(vm);
    std::fs::create_dir_all(&ovdir).map_err(io_err(format!("cannot create {}", ovdir.display())))?;
    let (_, stamp) = util::timestamps(SystemTime::now());
    let stamp_n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let plan: Vec<(PathBuf, String)> = disks
        .iter()
        .map(|d| (ovdir.join(format!("{}-{stamp}-after-{name}.qcow2", d.name)), node_name(&d.name, stamp_n)))
        .collect();
    let old_params = qmp.execute("query-migrate-parameters", None)?;
    enable_migration_events(&mut qmp)?;
    let live = req.live && running;
    set_pause_before_switchover(&mut qmp, live)?;
    let _ = qmp.take_events();

    let mut timings = Timings::default();
    let t_freeze = Instant::now();
    let (mut frozen, quiesce) = freeze(vm, req, running)?;
    timings.freeze_ms = util::ms(t_freeze.elapsed());

    let created = util::timestamps(SystemTime::now()).0;
    let state_path = tmp.join(STATE_FILE);
    let report_path = tmp.join(SINK_REPORT);
    let mut t_stop = Instant::now();
    let stopped = (|| -> Result<Value, CheckpointError> {
        if running && !live {
            qmp.execute("stop", None).map_err(qmp_gone("when told to stop"))?;
        }
        if !live {
            timings.snapshot_ms = take_overlays(&mut qmp, vm, &disks, &plan)?;
        }
        let bw = req.bandwidth.unwrap_or(NO_LIMIT).max(1);
        qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": bw})))?;
        let t_stream = Instant::now();
        qmp.execute("migrate", Some(json!({"uri": sink_uri(&exe, &state_path, &report_path)})))
            .map_err(qmp_gone("when told to migrate"))?;
        let limit = match req.bandwidth {
            Some(b) => Duration::from_secs(120 + (vm.config.memory_mib << 20) / b.max(1) * 3),
            None => Duration::from_secs(600),
        };
        let stage = "while saving the VM's state";
        if live {
            // QEMU stopped the VM for the last pass: RAM and disks are frozen at this instant.
            wait_migration(&mut qmp, limit, stage, "pre-switchover")?;
            t_stop = Instant::now();
            timings.snapshot_ms = take_overlays(&mut qmp, vm, &disks, &plan)?;
            qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"}))).map_err(qmp_gone(stage))?;
        }
        let r = wait_migration(&mut qmp, limit, stage, "completed")?;
        timings.stream_ms = util::ms(t_stream.elapsed());
        tracing::info!("state saved in {:.1} ms", timings.stream_ms);
        Ok(r)
    })();
    let restore_params = |qmp: &mut Qmp| {
        if let Some(b) = old_params["max-bandwidth"].as_u64() {
            let _ = qmp.execute("migrate-set-parameters", Some(json!({"max-bandwidth": b})));
        }
        if live {
            let _ = set_pause_before_switchover(qmp, false);
        }
    };
    let migrated = match stopped {
        Ok(r) => r,
        Err(e) => {
            if vm::alive(pid) {
                let _ = qmp.execute("migrate_cancel", None);
                restore_params(&mut qmp);
                if running {
                    let _ = qmp.execute("cont", None);
                }
            }
            if let Some(f) = frozen.as_mut() {
                let _ = thaw(f);
            }
            return Err(e);
        }
    };
    let mut thaw_error = None;
    if !(req.poweroff || req.suspend) {
        if running {
            cont_after_migration(&mut qmp)?;
            timings.downtime_ms = util::ms(t_stop.elapsed());
        }
        restore_params(&mut qmp);
        if let Some(f) = frozen.as_mut() {
            thaw_error = thaw(f).err().map(|e| e.to_string());
        }
    }
    drop(frozen);
    drop(qmp);
    timings.qemu_downtime_ms = migrated["downtime"].as_f64().unwrap_or(0.0);
    if live {
        // Our clock starts when the pre-switchover event arrives, a moment after QEMU stopped
        // the CPUs; QEMU's own figure starts at the stop but ends before our `cont`.
        timings.downtime_ms = timings.downtime_ms.max(timings.qemu_downtime_ms);
    }
    let ram_bytes = migrated["ram"]["total"].as_u64().unwrap_or(0);

    // The sink has exited (QEMU waited for it); its report says what it wrote.
    let t_sync = Instant::now();
    let rep = wait_report(&report_path, Duration::from_secs(300))
        .ok_or_else(|| CheckpointError::Migration("vmctl's stream sink left no report (it was killed?)".into()))?;
    if !rep.ok {
        return Err(CheckpointError::Migration(format!("saving the stream failed: {}", rep.error.unwrap_or_default())));
    }
    let _ = std::fs::remove_file(&report_path);
    std::fs::File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("cannot sync {}", state_path.display())))?;
    timings.sync_ms = util::ms(t_sync.elapsed());
    let md = std::fs::metadata(&state_path).map_err(io_err("the state file is gone"))?;
    if md.len() != rep.size {
        return Err(CheckpointError::Migration(format!(
            "the state file has {} bytes, the sink wrote {}",
            md.len(),
            rep.size
        )));
    }

    // The images below the overlays are immutable from the transaction on.
    let t_hash = Instant::now();
    let known: Vec<ImageRecord> = list(vm)
        .map(|l| l.good.into_iter().flat_map(|(_, m)| m.disks.into_iter().flat_map(|d| d.chain)).collect())
        .unwrap_or_default();
    let mut records = Vec::new();
    for (d, (file, _)) in disks.iter().zip(&plan) {
        let chain = d.chain.iter().map(|(p, f)| image_record(p, f, &known)).collect::<Result<Vec<_>, _>>()?;
        records.push(DiskRecord {
            name: d.name.clone(),
            node: d.node.clone(),
            virtual_size: d.virtual_size,
            chain,
            overlay: Some(file.clone()),
        });
    }
    timings.disk_hash_ms = util::ms(t_hash.elapsed());
    timings.total_ms = util::ms(t0.elapsed());
    let manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        sections: Manifest::current_sections(),
        name: name.into(),
        vm: vm.config.name.clone(),
        created,
        kind: if req.suspend { "suspend" } else { "checkpoint" }.into(),
        poweroff: req.poweroff || req.suspend,
        config: vm.config.clone(),
        run_state: if running { "running" } else { "paused" }.into(),
        quiesce,
        qemu: QemuRecord { version: format!("{ma}.{mi}.{mc}"), package, machine, accel: accel.into() },
        disks: records,
        state: FileRecord { file: STATE_FILE.into(), size: rep.size, blake3: rep.blake3 },
        ram_bytes,
        timings,
        vmctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((manifest, thaw_error))
}

// ---------------------------------------------------------------------------------------
// Restore

/// How a restore went.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreTimings {
    /// Manifest, files, QEMU version.
    pub checks_ms: f64,
    /// New overlays and QEMU up with `-incoming defer`.
    pub launch_ms: f64,
    /// `migrate-incoming` → completed (hashed on the way).
    pub stream_ms: f64,
    /// Waiting for the disk images' checksums after the stream (they run alongside it).
    pub disk_verify_wait_ms: f64,
    /// Start → `cont`.
    pub total_ms: f64,
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// The checkpoint's manifest.
    pub manifest: Manifest,
    /// The new overlays the VM now writes to.
    pub overlays: Vec<PathBuf>,
    /// Overlays nothing references any more, removed.
    pub removed: Vec<PathBuf>,
    /// QEMU's pid.
    pub pid: Option<i32>,
    /// "running" or "paused".
    pub run_state: String,
    /// Filesystems thawed (a quiesced checkpoint).
    pub thawed: Option<u64>,
    /// Why the thaw did not happen.
    pub thaw_error: Option<String>,
    /// Timings.
    pub timings: RestoreTimings,
}

/// What `restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    /// The checkpoint.
    pub name: String,
    /// Check the disk images' checksums too (alongside the stream), not only their sizes.
    pub verify_disks: bool,
    /// A quiesced checkpoint: how long to wait for the agent to thaw the guest.
    pub agent_timeout: Duration,
}

/// Refuses a checkpoint whose files are missing or of the wrong size, before anything is done.
pub fn check_files(dir: &Path, m: &Manifest) -> Result<(), CheckpointError> {
    let name = &m.name;
    if m.state.file.contains('/') || m.state.file.starts_with('.') {
        return Err(CheckpointError::BadManifest {
            path: dir.join(MANIFEST).display().to_string(),
            why: "a state file outside it".into(),
        });
    }
    let state = dir.join(&m.state.file);
    let check = |what: String, path: &Path, size: u64| -> Result<(), CheckpointError> {
        match std::fs::metadata(path) {
            Err(_) => Err(CheckpointError::Missing { name: name.clone(), what, path: path.display().to_string() }),
            Ok(md) if md.len() != size => Err(CheckpointError::Truncated {
                name: name.clone(),
                path: path.display().to_string(),
                expected: size,
                found: md.len(),
            }),
            Ok(_) => Ok(()),
        }
    };
    check("the state file".into(), &state, m.state.size)?;
    for c in &m.config.disks {
        let Some(d) = m.disks.iter().find(|d| d.name == c.name) else {
            return Err(CheckpointError::BadManifest {
                path: dir.join(MANIFEST).display().to_string(),
                why: format!("disk `{}` of the config has no chain", c.name),
            });
        };
        if d.chain.is_empty() {
            return Err(CheckpointError::BadManifest {
                path: dir.join(MANIFEST).display().to_string(),
                why: format!("disk `{}` has an empty chain", c.name),
            });
        }
        for i in &d.chain {
            check(format!("disk `{}`'s image", d.name), &i.path, i.size)?;
        }
    }
    for (what, p) in [("the kernel", &m.config.kernel), ("the initramfs", &m.config.initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(CheckpointError::Missing {
                    name: name.clone(),
                    what: what.into(),
                    path: p.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Refuses a QEMU older than the one that wrote the stream.
pub fn check_qemu(m: &Manifest, binary: &str, installed: (String, (u64, u64, u64))) -> Result<(), CheckpointError> {
    let recorded = parse_version(&m.qemu.version).ok_or_else(|| CheckpointError::BadManifest {
        path: MANIFEST.into(),
        why: format!("unreadable QEMU version {:?}", m.qemu.version),
    })?;
    if installed.1 < recorded {
        let (a, b, c) = installed.1;
        return Err(CheckpointError::QemuTooOld {
            name: m.name.clone(),
            recorded: m.qemu.version.clone(),
            installed: format!("{a}.{b}.{c}"),
            binary: binary.into(),
        });
    }
    Ok(())
}

fn verify_images(m: &Manifest) -> Result<(), CheckpointError> {
    for d in &m.disks {
        for i in &d.chain {
            let h = crate::backup::hash_file(&i.path).map_err(io_err(format!("cannot read {}", i.path.display())))?;
            if h != i.blake3 {
                return Err(CheckpointError::ChecksumMismatch {
                    name: m.name.clone(),
                    path: i.path.display().to_string(),
                    expected: i.blake3.clone(),
                    found: h,
                });
            }
        }
    }
    Ok(())
}

/// Finds a complete checkpoint by name.
pub fn find(vm: &Vm, name: &str) -> Result<(PathBuf, Manifest), CheckpointError> {
    check_name(name)?;
    let dir = checkpoints_dir(vm).join(name);
    if !dir.is_dir() {
        let known = list(vm)?.good.into_iter().map(|(_, m)| m.name).collect();
        return Err(CheckpointError::NotFound { vm: vm.config.name.clone(), name: name.into(), known });
    }
    let mut m = Manifest::load(&dir)?;
    m.name = name.to_string();
    Ok((dir, m))
}

/// Starts QEMU waiting for a migration stream (`-incoming defer -S`); returns its QMP.
fn launch_incoming(rvm: &Vm, accel: &str) -> Result<Qmp, CheckpointError> {
    for p in [rvm.qmp_path(), rvm.agent_path(), rvm.pid_path()] {
        let _ = std::fs::remove_file(p);
    }
    for p in &rvm.config.ports {
        if p.kind == PortKind::Socket {
            let _ = std::fs::remove_file(rvm.port_path(p));
        }
    }
    let mut cmd = rvm.command(accel);
    cmd.args(["-incoming", "defer", "-S"]);
    let name = rvm.config.name.clone();
    let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| VmError::Start {
        name: name.clone(),
        msg: format!("cannot run {}: {e} (apt-get install qemu-system-x86)", rvm.config.qemu),
    })?;
    if !out.status.success() {
        return Err(VmError::Start { name, msg: String::from_utf8_lossy(&out.stderr).trim().to_string() }.into());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rvm.pid().is_some() {
            if let Ok(q) = Qmp::connect(&rvm.qmp_path(), Duration::from_secs(60)) {
                return Ok(q);
            }
        }
        if Instant::now() > deadline {
            if let Some(pid) = rvm.pid() {
                kill_pid(pid);
            }
            return Err(VmError::Start { name, msg: "QMP did not come up within 20 s".into() }.into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a stopped VM from a checkpoint. See the module's description.
pub fn restore(vm: &Vm, req: &RestoreRequest) -> Result<Restored, CheckpointError> {
    let t0 = Instant::now();
    if let Some(pid) = vm.pid() {
        return Err(CheckpointError::Running(vm.config.name.clone(), pid));
    }
    let _l = lock(vm)?;
    let (dir, m) = find(vm, &req.name)?;
    check_files(&dir, &m)?;
    let qemu_bin = m.config.qemu.clone();
    check_qemu(&m, &qemu_bin, binary_version(&qemu_bin)?)?;
    let mut timings = RestoreTimings { checks_ms: util::ms(t0.elapsed()), ..Default::default() };

    // The disk images' checksums run alongside the stream: both must pass before `cont`.
    let verifier = req.verify_disks.then(|| {
        let m2 = m.clone();
        std::thread::spawn(move || verify_images(&m2))
    });
    let join_verifier =
        |v: Option<std::thread::JoinHandle<Result<(), CheckpointError>>>| -> Result<(), CheckpointError> {
            match v {
                Some(h) => {
                    h.join().unwrap_or_else(|_| Err(CheckpointError::Migration("the disk checker panicked".into())))
                }
                None => Ok(()),
            }
        };

    let t_launch = Instant::now();
    let ovdir = overlays_dir(vm);
    std::fs::create_dir_all(&ovdir).map_err(io_err(format!("cannot create {}", ovdir.display())))?;
    let (_, stamp) = util::timestamps(SystemTime::now());
    let mut overlays: Vec<PathBuf> = Vec::new();
    let cleanup = |overlays: &[PathBuf], pid: Option<i32>| {
        if let Some(pid) = pid {
            kill_pid(pid);
        }
        for o in overlays {
            let _ = std::fs::remove_file(o);
        }
    };
    let mut config = m.config.clone();
    config.name = vm.config.name.clone();
    for c in config.disks.iter_mut() {
        let d = m.disks.iter().find(|d| d.name == c.name).expect("check_files saw every disk");
        let top = &d.chain[0];
        let ov = ovdir.join(format!("{}-{stamp}-from-{}.qcow2", c.name, m.name));
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", &top.format, "-b"])
            .arg(&top.path)
            .arg(&ov)
            .output();
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(format!("cannot run qemu-img: {e}")),
        };
        if let Some(detail) = failed {
            cleanup(&overlays, None);
            let _ = join_verifier(verifier);
            return Err(CheckpointError::QemuImg { what: "create".into(), detail });
        }
        overlays.push(ov.clone());
        c.path = ov;
        c.format = "qcow2".into();
    }
    // The stream loads only into the machine type that wrote it: the resolved one, not an alias.
    let mut launch_config = config.clone();
    launch_config.machine = m.qemu.machine.clone();
    let rvm = Vm { dir: vm.dir.clone(), config: launch_config };
    let mut qmp = match launch_incoming(&rvm, &m.qemu.accel) {
        Ok(q) => q,
        Err(e) => {
            cleanup(&overlays, rvm.pid());
            let _ = join_verifier(verifier);
            return Err(e);
        }
    };
    let pid = rvm.pid();
    timings.launch_ms = util::ms(t_launch.elapsed());
    let (a, b, c) = qmp.version();
    if let Err(e) = check_qemu(&m, &qemu_bin, (format!("{a}.{b}.{c}"), (a, b, c))) {
        cleanup(&overlays, pid);
        let _ = join_verifier(verifier);
        return Err(e);
    }

    let exe = self_exe()?;
    let report_path = vm.dir.join(format!(".restore-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report_path);
    let t_stream = Instant::now();
    let expect = Digest { size: m.state.size, blake3: m.state.blake3.clone() };
    let state_path = dir.join(&m.state.file);
    let streamed = (|| -> Result<(), CheckpointError> {
        enable_migration_events(&mut qmp)?;
        qmp.execute("migrate-incoming", Some(json!({"uri": source_uri(&exe, &state_path, &expect, &report_path)})))
            .map_err(qmp_gone("when told to load the state"))?;
        wait_migration(&mut qmp, Duration::from_secs(600), "while loading the state", "completed").map(|_| ())
    })();
    timings.stream_ms = util::ms(t_stream.elapsed());
    // The source's verdict comes first: a corrupt file is the cause of any failure it meets.
    let rep = wait_report(&report_path, Duration::from_secs(if streamed.is_ok() { 30 } else { 300 }));
    let _ = std::fs::remove_file(&report_path);
    let verdict = match (&rep, streamed) {
        (Some(r), _) if r.size != expect.size || r.blake3 != expect.blake3 => Err(CheckpointError::ChecksumMismatch {
            name: m.name.clone(),
            path: state_path.display().to_string(),
            expected: expect.blake3.clone(),
            found: if r.size != expect.size {
                format!("{} ({} bytes read)", r.blake3, r.size)
            } else {
                r.blake3.clone()
            },
        }),
        (_, Err(e)) => Err(e),
        (None, Ok(())) => Err(CheckpointError::Migration("vmctl's stream source left no report".into())),
        (Some(r), Ok(())) if !r.ok => Err(CheckpointError::Migration(format!(
            "feeding the state failed: {}",
            r.error.clone().unwrap_or_default()
        ))),
        (Some(_), Ok(())) => Ok(()),
    };
    let t_wait = Instant::now();
    let verdict = verdict.and_then(|_| join_verifier(verifier));
    timings.disk_verify_wait_ms = util::ms(t_wait.elapsed());
    if let Err(e) = verdict {
        drop(qmp);
        cleanup(&overlays, pid.filter(|p| vm::alive(*p)));
        return Err(e);
    }

    // Good: the VM's config now names the new overlays.
    let mut saved = config.clone();
    for d in saved.disks.iter_mut() {
        if let Ok(rel) = d.path.strip_prefix(&vm.dir) {
            d.path = rel.to_path_buf();
        }
    }
    if let Err(e) = write_config(vm, &saved) {
        drop(qmp);
        cleanup(&overlays, pid);
        return Err(e);
    }
    let mut run_state = "paused".to_string();
    if m.run_state == "running" {
        qmp.execute("cont", None).map_err(qmp_gone("when told to continue"))?;
        run_state = "running".into();
    }
    timings.total_ms = util::ms(t0.elapsed());
    drop(qmp);

    let (mut thawed, mut thaw_error) = (None, None);
    if m.quiesce.frozen.unwrap_or(0) > 0 && run_state == "running" {
        match thaw_after_restore(&rvm, req.agent_timeout) {
            Ok(n) => thawed = n,
            Err(e) => thaw_error = Some(e),
        }
    }
    let saved_vm = Vm { dir: vm.dir.clone(), config: saved };
    let removed = collect_garbage(&saved_vm).unwrap_or_default();
    Ok(Restored { manifest: m, overlays, removed, pid, run_state, thawed, thaw_error, timings })
}

fn thaw_after_restore(vm: &Vm, limit: Duration) -> Result<Option<u64>, String> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no agent channel");
    while Instant::now() < deadline {
        match Qga::connect(&vm.agent_path()) {
            Ok(mut g) => {
                g.sync_timeout = Duration::from_secs(2);
                match g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(10)) {
                    Ok(v) => return Ok(v.as_u64()),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(format!("the restored guest was saved frozen and could not be thawed: {last} (vssd thaws by itself at its deadline; `vmctl fsthaw` retries)"))
}

// ---------------------------------------------------------------------------------------
// Suspend, resume, pause, unpause

/// `vmctl suspend`: a checkpoint under the reserved name, then QEMU quits.
pub fn suspend(vm: &Vm, quiesce: Quiesce, agent_timeout: Duration) -> Result<Created, CheckpointError> {
    create(vm, &CreateRequest { suspend: true, poweroff: true, quiesce, agent_timeout, ..Default::default() })
}

/// `vmctl resume`: restores the suspend checkpoint, then discards it (its images stay: they
/// are the bottom of the VM's live chain now).
pub fn resume(vm: &Vm, verify_disks: bool, agent_timeout: Duration) -> Result<Restored, CheckpointError> {
    if !vm.is_suspended() {
        return Err(CheckpointError::NotFound {
            vm: vm.config.name.clone(),
            name: SUSPEND_NAME.into(),
            known: Vec::new(),
        });
    }
    let mut r = restore(vm, &RestoreRequest { name: SUSPEND_NAME.into(), verify_disks, agent_timeout })?;
    let _l = lock(vm)?;
    let vm = Vm::open(vm.dir.parent().unwrap_or(Path::new(".")), &vm.config.name)?;
    remove_dir(&checkpoints_dir(&vm).join(SUSPEND_NAME))?;
    r.removed.extend(collect_garbage(&vm).unwrap_or_default());
    Ok(r)
}

/// QMP `stop` (`paused`) or `cont` (`running`); returns QEMU's run state after it.
pub fn set_paused(vm: &Vm, paused: bool) -> Result<String, CheckpointError> {
    let mut q = vm.qmp(Duration::from_secs(10))?;
    q.execute(if paused { "stop" } else { "cont" }, None)?;
    Ok(q.execute("query-status", None)?["status"].as_str().unwrap_or("unknown").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that are not all alike (xorshift).
    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn digest_of(d: &[u8]) -> Digest {
        Digest { size: d.len() as u64, blake3: blake3::hash(d).to_hex().to_string() }
    }

    fn sample_manifest() -> Manifest {
        let mut config = VmConfig::new("web1");
        config.disks.push(crate::vm::DiskConfig {
            name: "data".into(),
            path: "disks/data.qcow2".into(),
            format: "qcow2".into(),
        });
        Manifest {
            magic: MAGIC.into(),
            version: FORMAT_VERSION,
            sections: Manifest::current_sections(),
            name: "c1".into(),
            vm: "web1".into(),
            created: "2026-01-01T12:00:00.000Z".into(),
            kind: "checkpoint".into(),
            poweroff: false,
            config,
            run_state: "running".into(),
            quiesce: QuiesceRecord { policy: "off".into(), ..Default::default() },
            qemu: QemuRecord {
                version: "7.2.22".into(),
                package: "Debian".into(),
                machine: "pc-q35-7.2".into(),
                accel: "tcg".into(),
            },
            disks: vec![DiskRecord {
                name: "data".into(),
                node: "data".into(),
                virtual_size: 1 << 30,
                chain: vec![ImageRecord {
                    path: "/nonexistent/data.qcow2".into(),
                    format: "qcow2".into(),
                    size: 1,
                    blake3: "x".into(),
                    mtime_ns: 0,
                }],
                overlay: None,
            }],
            state: FileRecord { file: STATE_FILE.into(), size: 3, blake3: "abc".into() },
            ram_bytes: 512 << 20,
            timings: Timings::default(),
            vmctl_version: "0.1.0".into(),
        }
    }

    /// A checkpoint directory with a real state file and disk image, and its manifest.
    fn sample_dir(state: &[u8]) -> (tempfile::TempDir, Manifest) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(STATE_FILE), state).unwrap();
        let img = d.path().join("data.qcow2");
        std::fs::write(&img, b"disk image").unwrap();
        let mut m = sample_manifest();
        m.state = FileRecord { file: STATE_FILE.into(), size: state.len() as u64, blake3: digest_of(state).blake3 };
        m.disks[0].chain[0] = ImageRecord {
            path: img,
            format: "qcow2".into(),
            size: 10,
            blake3: digest_of(b"disk image").blake3,
            mtime_ns: 0,
        };
        (d, m)
    }

    #[test]
    fn the_sink_checksums_a_pipe_while_writing_it() {
        let payload = data(3 * CHUNK + 12345, 7);
        let (r, mut w) = std::io::pipe().unwrap();
        let p2 = payload.clone();
        let writer = std::thread::spawn(move || {
            // Odd-sized writes, as QEMU's iovecs come.
            for c in p2.chunks(33_333) {
                w.write_all(c).unwrap();
            }
        });
        let d = tempfile::tempdir().unwrap();
        let (out, report) = (d.path().join("state.bin"), d.path().join("r.json"));
        assert_eq!(sink_stream(r, &out, &report), 0);
        writer.join().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), payload);
        let rep = read_report(&report).unwrap();
        assert!(rep.ok, "{rep:?}");
        assert_eq!(Digest { size: rep.size, blake3: rep.blake3 }, digest_of(&payload));
    }

    #[test]
    fn the_sink_refuses_to_overwrite_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let (out, report) = (d.path().join("state.bin"), d.path().join("r.json"));
        std::fs::write(&out, b"old").unwrap();
        assert_eq!(sink_stream(&b"new"[..], &out, &report), 1);
        let rep = read_report(&report).unwrap();
        assert!(!rep.ok && rep.error.as_deref().unwrap_or("").contains("state.bin"), "{rep:?}");
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
    }

    #[test]
    fn a_failing_writer_stops_the_sink_pump() {
        struct Full(u64);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("no space left"));
                }
                let n = (b.len() as u64).min(self.0);
                self.0 -= n;
                Ok(n as usize)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let payload = data(5 * CHUNK, 3);
        let e = pump(&payload[..], &mut Full(CHUNK as u64 + 10), None, true).unwrap_err();
        assert!(e.to_string().contains("no space"), "{e}");
    }

    #[test]
    fn the_source_feeds_a_good_file_whole() {
        let payload = data(2 * CHUNK + 777, 11);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.bin");
        std::fs::write(&f, &payload).unwrap();
        let mut out = Vec::new();
        assert_eq!(source_stream(&f, &digest_of(&payload), &mut out, &d.path().join("r.json")), 0);
        assert!(out == payload, "the stream differs");
    }

    #[test]
    fn the_source_withholds_the_tail_of_a_file_with_a_flipped_byte() {
        let payload = data(2 * CHUNK + 777, 13);
        let good = digest_of(&payload);
        let mut bad = payload.clone();
        bad[CHUNK / 2] ^= 0x01;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.bin");
        std::fs::write(&f, &bad).unwrap();
        let report = d.path().join("r.json");
        let mut out = Vec::new();
        assert_eq!(source_stream(&f, &good, &mut out, &report), 3);
        assert!(out.len() < bad.len(), "a corrupt stream must never reach its reader whole");
        assert_eq!(out.len(), 2 * CHUNK, "only the last chunk is held back");
        let rep = read_report(&report).unwrap();
        assert!(rep.withheld && !rep.ok, "{rep:?}");
        assert!(rep.error.unwrap().contains("state.bin"));
    }

    #[test]
    fn the_source_withholds_a_file_that_is_too_short_even_when_small() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.bin");
        std::fs::write(&f, b"short").unwrap();
        let mut out = Vec::new();
        let want = Digest { size: 6, blake3: digest_of(b"short!").blake3 };
        assert_eq!(source_stream(&f, &want, &mut out, &d.path().join("r.json")), 3);
        assert!(out.is_empty());
    }

    #[test]
    fn a_reader_that_goes_away_does_not_stop_the_source_from_judging_the_file() {
        struct Gone;
        impl Write for Gone {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let payload = data(3 * CHUNK, 17);
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.bin");
        std::fs::write(&f, &payload).unwrap();
        let report = d.path().join("r.json");
        assert_eq!(source_stream(&f, &digest_of(&payload), Gone, &report), 1);
        let rep = read_report(&report).unwrap();
        assert_eq!(rep.blake3, digest_of(&payload).blake3, "the whole file was still hashed");
        assert!(rep.error.unwrap().contains("stopped reading"));
    }

    #[test]
    fn the_manifest_round_trips() {
        let m = sample_manifest();
        let text = serde_json::to_string_pretty(&m).unwrap();
        let back = Manifest::parse(&text, Path::new("m.json"), "c1").unwrap();
        assert_eq!(back, m);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["magic"], MAGIC);
        assert_eq!(v["sections"]["disks"], 1);
        assert_eq!(v["config"]["memory-mib"], 512);
    }

    #[test]
    fn unknown_versions_and_foreign_files_are_refused_by_name() {
        let good: Value = serde_json::to_value(sample_manifest()).unwrap();
        let parse = |v: &Value| Manifest::parse(&v.to_string(), Path::new("m.json"), "c1");

        let mut v = good.clone();
        v["version"] = json!(2);
        let e = parse(&v).unwrap_err();
        assert!(matches!(e, CheckpointError::UnknownVersion { found: 2, .. }), "{e}");
        assert!(e.to_string().contains("format version 2"), "{e}");

        let mut v = good.clone();
        v["sections"]["state"] = json!(9);
        let e = parse(&v).unwrap_err();
        assert!(e.to_string().contains("section `state` version 9"), "{e}");
        assert_eq!(e.exit_code(), 5);

        let mut v = good.clone();
        v["sections"].as_object_mut().unwrap().remove("disks");
        assert!(parse(&v).unwrap_err().to_string().contains("section `disks`"));

        let mut v = good.clone();
        v["magic"] = json!("vmctl-backup");
        assert!(matches!(parse(&v).unwrap_err(), CheckpointError::BadManifest { .. }));
        assert!(Manifest::parse("{not json", Path::new("m.json"), "c1").is_err());
    }

    #[test]
    fn a_truncated_state_file_is_refused_before_anything_starts() {
        let state = data(1000, 5);
        let (d, m) = sample_dir(&state);
        check_files(d.path(), &m).unwrap();
        std::fs::write(d.path().join(STATE_FILE), &state[..999]).unwrap();
        let e = check_files(d.path(), &m).unwrap_err();
        assert!(matches!(e, CheckpointError::Truncated { expected: 1000, found: 999, .. }), "{e}");
        assert!(e.to_string().contains(STATE_FILE), "{e}");
        std::fs::remove_file(d.path().join(STATE_FILE)).unwrap();
        assert!(matches!(check_files(d.path(), &m).unwrap_err(), CheckpointError::Missing { .. }));
    }

    #[test]
    fn a_missing_disk_image_is_refused_by_name() {
        let (d, m) = sample_dir(b"abc");
        std::fs::remove_file(d.path().join("data.qcow2")).unwrap();
        let e = check_files(d.path(), &m).unwrap_err();
        assert!(e.to_string().contains("disk `data`'s image") && e.to_string().contains("data.qcow2"), "{e}");
    }

    #[test]
    fn a_changed_disk_image_fails_its_checksum() {
        let (d, m) = sample_dir(b"abc");
        verify_images(&m).unwrap();
        std::fs::write(d.path().join("data.qcow2"), b"disk imagf").unwrap();
        let e = verify_images(&m).unwrap_err();
        assert!(matches!(e, CheckpointError::ChecksumMismatch { .. }) && e.to_string().contains("data.qcow2"), "{e}");
    }

    #[test]
    fn an_older_qemu_is_refused_a_newer_one_is_not() {
        let m = sample_manifest();
        assert_eq!(parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"), Some((7, 2, 22)));
        assert_eq!(parse_version("8.2.0"), Some((8, 2, 0)));
        assert_eq!(parse_version("9.1"), Some((9, 1, 0)));
        let e = check_qemu(&m, "qemu", ("7.1.0".into(), (7, 1, 0))).unwrap_err();
        assert!(e.to_string().contains("7.2.22") && e.to_string().contains("7.1.0"), "{e}");
        check_qemu(&m, "qemu", ("7.2.22".into(), (7, 2, 22))).unwrap();
        check_qemu(&m, "qemu", ("8.0.0".into(), (8, 0, 0))).unwrap();
    }

    #[test]
    fn list_shows_complete_checkpoints_and_names_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let vm = Vm { dir: root.path().join("web1"), config: VmConfig::new("web1") };
        let cdir = checkpoints_dir(&vm);
        std::fs::create_dir_all(cdir.join("c1")).unwrap();
        std::fs::write(cdir.join("c1").join(MANIFEST), serde_json::to_vec(&sample_manifest()).unwrap()).unwrap();
        std::fs::create_dir_all(cdir.join(".tmp-c2-123")).unwrap();
        std::fs::create_dir_all(cdir.join("c3")).unwrap(); // no manifest
        let l = list(&vm).unwrap();
        assert_eq!(l.good.iter().map(|(_, m)| m.name.as_str()).collect::<Vec<_>>(), ["c1"]);
        assert_eq!(l.leftovers.len(), 2, "{:?}", l.leftovers);
        // Deleting leaves nothing that looks like a checkpoint, and an unknown name is refused.
        assert!(matches!(delete(&vm, "nope").unwrap_err(), CheckpointError::NotFound { .. }));
        delete(&vm, "c1").unwrap();
        assert!(list(&vm).unwrap().good.is_empty());
        let (n, _) = destroy_all(&vm).unwrap();
        assert_eq!(n, 0);
        assert!(list(&vm).unwrap().leftovers.is_empty());
    }

    #[test]
    fn exec_uris_quote_their_paths() {
        assert_eq!(sh_quote("a b'c"), "'a b'\\''c'");
        let u = sink_uri(Path::new("/usr/bin/vmctl"), Path::new("/x y/state.bin"), Path::new("/r"));
        assert_eq!(u, "exec:exec '/usr/bin/vmctl' __sink --out '/x y/state.bin' --report '/r'");
        let s = source_uri(Path::new("/v"), Path::new("/s"), &Digest { size: 5, blake3: "ab".into() }, Path::new("/r"));
        assert_eq!(s, "exec:exec '/v' __source --in '/s' --size 5 --blake3 'ab' --report '/r'");
    }

    #[test]
    fn node_names_fit_qemu() {
        let n = node_name("a-very-long-disk-name-indeed-yes", 0xdead_beef_1234);
        assert!(n.len() <= 31 && n.starts_with('a'), "{n}");
        assert!(check_name(SUSPEND_NAME).is_ok());
        assert!(check_name("../x").is_err());
    }
}
