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
//! - Every path that froze the guest thaws it before anything else (a guard thaws on drop);
//!   vssd additionally gets a deadline so that even a vmctl killed mid-freeze cannot keep the
//!   guest frozen.
//! - The incremental chain is carried by bitmap names: backup ID creates bitmap `vmctl-ID` on
//!   every disk; an incremental after ID copies exactly what `vmctl-ID` marks, and on success
//!   replaces it with its own. A missing or inconsistent bitmap means "take a full backup".
//!   The bitmap must be on the top node (QEMU 7.2 looks for it on the node the job reads and
//!   nowhere else, and only the top node sees the guest's writes): a checkpoint carries it
//!   onto its overlay; one found only on a backing image is refused by name.
//! - A disk's name is its device's (see [`disk_name`]), never the node on top, which a
//!   checkpoint replaces.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::qga::{AgentInfo, Qga, QgaError};
use crate::qmp::{Qmp, QmpError};
use crate::util;

/// The manifest's format name and version.
pub const MANIFEST_FORMAT: &str = "vmctl-backup";
/// Current manifest version; readers refuse newer ones.
pub const MANIFEST_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const BITMAP_PREFIX: &str = "vmctl-";
/// Bytes per second of a job between the transaction and the thaw: next to nothing.
const HELD_SPEED: u64 = 1;

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
    #[error("the guest could not be quiesced and --quiesce required was given: {0}. Nothing was copied. Check the guest agent (vmctl fsstatus), or use --quiesce best-effort for a crash-consistent backup")]
    QuiesceRequired(String),
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
    /// Another vmctl is backing up this VM.
    #[error("another backup of the VM behind {0} is running (one at a time per VM); wait for it")]
    VmBusy(String),
    /// qemu-img failed.
    #[error("qemu-img {what} failed: {detail} (apt-get install qemu-utils)")]
    QemuImg {
        /// The subcommand.
        what: String,
        /// Its output.
        detail: String,
    },
    /// Bad or unknown manifest.
    #[error("{path} is not a usable backup: {why}")]
    BadManifest {
        /// The manifest.
        path: String,
        /// Why.
        why: String,
    },
    /// File system trouble.
    #[error("{what}: {source}")]
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

/// How hard to try for a quiesced guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Quiesce {
    /// Fail, and keep nothing, unless the agent froze the guest.
    Required,
    /// Freeze when an agent answers; otherwise a crash-consistent backup, marked so.
    #[default]
    BestEffort,
    /// Do not ask the agent: crash-consistent.
    Off,
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

/// One disk as QEMU reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceDisk {
    /// Name used in file names and the chain: stable for the life of the VM (see [`disk_name`]).
    pub name: String,
    /// QEMU's node name of the top (format) node: what the block job reads. It changes when an
    /// overlay goes on top (a checkpoint), so it never names the disk.
    pub node: String,
    /// The qdev path or device name, for people.
    pub device: String,
    /// Image file.
    pub file: String,
    /// Image format.
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Allocated bytes of the image file.
    pub actual_size: u64,
    /// Persistent dirty bitmaps of the top node: (name, dirty bytes, consistent).
    #[serde(skip)]
    pub bitmaps: Vec<(String, u64, bool)>,
    /// Persistent bitmaps stored in the images below the top one (read only there; they do not
    /// see writes to the overlays above them).
    #[serde(skip)]
    pub backing_bitmaps: Vec<String>,
    /// The name vmctl 0.1 gave this disk (its node name unless QEMU generated one, else the
    /// device name), to continue chains whose manifests use it.
    #[serde(skip)]
    pub legacy_name: String,
}

/// The id a disk's guest device was given (`-device ...,id=ID`), from query-block's `qdev`:
/// the id itself, or a QOM path `/machine/peripheral/ID/virtio-backend`. None when the device
/// has no id (`/machine/peripheral-anon/...`).
fn qdev_id(qdev: &str) -> Option<&str> {
    let id = match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().unwrap_or(""),
        None if qdev.starts_with('/') => "",
        None => qdev,
    };
    (!id.is_empty()).then_some(id)
}

/// A disk's name, from one entry of `query-block`: something that stays while the VM runs,
/// whatever happens to its node graph (a checkpoint's `blockdev-snapshot-sync` puts a new
/// node, with a new name, on top). In order: the guest device's id (`vd-NAME` of vmctl's VMs
/// gives NAME, as checkpoints name disks), the `-drive` id, and the node name as vmctl 0.1
/// used it.
pub fn disk_name(block: &Value) -> String {
    let id = block["qdev"]
        .as_str()
        .and_then(qdev_id)
        .map(|id| id.strip_prefix("vd-").filter(|n| !n.is_empty()).unwrap_or(id));
    let device = block["device"].as_str().filter(|s| !s.is_empty());
    let name = match id.or(device) {
        Some(n) => n.to_string(),
        None => legacy_disk_name(block),
    };
    sanitize(&name)
}

/// vmctl 0.1's name: the node name unless QEMU generated it (`#block123`), else the device.
fn legacy_disk_name(block: &Value) -> String {
    let node = block["inserted"]["node-name"].as_str().unwrap_or("");
    let name = if !node.is_empty() && !node.starts_with('#') {
        node
    } else {
        block["device"].as_str().filter(|s| !s.is_empty()).unwrap_or(node)
    };
    sanitize(name)
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// The disks of a running QEMU (writable, with media).
pub fn query_disks(qmp: &mut Qmp) -> Result<Vec<SourceDisk>, BackupError> {
    let blocks = qmp.execute("query-block", None)?;
    let mut out: Vec<SourceDisk> = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else { continue };
        if ins["ro"].as_bool() == Some(true) {
            continue;
        }
        let node = ins["node-name"].as_str().unwrap_or("").to_string();
        let device = b["device"].as_str().filter(|s| !s.is_empty()).or(b["qdev"].as_str()).unwrap_or("").to_string();
        let mut name = disk_name(b);
        // Names are file names in the backup: two disks must not share one.
        let base = name.clone();
        let mut n = 2;
        while out.iter().any(|d| d.name == name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        let image = &ins["image"];
        let mut bitmaps = Vec::new();
        for bm in ins["dirty-bitmaps"].as_array().or(b["dirty-bitmaps"].as_array()).into_iter().flatten() {
            bitmaps.push((
                bm["name"].as_str().unwrap_or("").to_string(),
                bm["count"].as_u64().unwrap_or(0),
                !bm["inconsistent"].as_bool().unwrap_or(false),
            ));
        }
        let mut backing_bitmaps = Vec::new();
        let mut img = &image["backing-image"];
        while img.is_object() {
            for bm in img["format-specific"]["data"]["bitmaps"].as_array().into_iter().flatten() {
                if let Some(n) = bm["name"].as_str() {
                    backing_bitmaps.push(n.to_string());
                }
            }
            img = &img["backing-image"];
        }
        out.push(SourceDisk {
            name,
            node: if node.is_empty() { b["device"].as_str().unwrap_or("").to_string() } else { node },
            device,
            file: ins["file"].as_str().unwrap_or("").to_string(),
            format: image["format"].as_str().unwrap_or("raw").to_string(),
            virtual_size: image["virtual-size"].as_u64().unwrap_or(0),
            actual_size: image["actual-size"].as_u64().unwrap_or(0),
            bitmaps,
            backing_bitmaps,
            legacy_name: legacy_disk_name(b),
        });
    }
    if out.is_empty() {
        return Err(BackupError::NoDisks);
    }
    Ok(out)
}

/// The parent backup's entry for `d`: the same name, or (a chain begun by vmctl 0.1, which
/// named disks by node) the name vmctl 0.1 gave it, unless another disk now goes by that name.
fn parent_disk<'a>(pm: &'a Manifest, d: &SourceDisk, disks: &[SourceDisk]) -> Option<&'a ManifestDisk> {
    pm.disks.iter().find(|x| x.name == d.name).or_else(|| {
        if disks.iter().any(|o| o.name == d.legacy_name) {
            return None;
        }
        pm.disks.iter().find(|x| x.name == d.legacy_name)
    })
}

/// A disk in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// Name (also `NAME.qcow2`).
    pub name: String,
    /// The file in the backup directory.
    pub file: String,
    /// The backing file for incrementals (relative: `../PARENT/NAME.qcow2`).
    pub backing: Option<String>,
    /// What it was in QEMU.
    pub source: SourceDisk,
    /// Bytes the block job copied.
    pub copied_bytes: u64,
    /// Size of the backup file.
    pub file_size: u64,
    /// BLAKE3 of the backup file.
    pub blake3: String,
    /// The bitmap that the next incremental starts from (None for non-qcow2 sources).
    pub bitmap: Option<String>,
}

/// The agent's part.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct QuiesceReport {
    /// Policy asked for.
    pub policy: Option<Quiesce>,
    /// "vssd 0.1.0" / "qemu-ga 7.2.22" / None.
    pub agent: Option<String>,
    /// How many filesystems were frozen.
    pub frozen: Option<u64>,
    /// vssd's `vssd-freeze` report, as it came.
    pub report: Option<Value>,
    /// Why the backup is not quiesced, or anything odd.
    pub note: Option<String>,
    /// The thaw's answer (count, or error text).
    pub thaw: Option<Value>,
}

/// Timings in milliseconds. The steps on the critical path add up to `total_ms` within a few
/// milliseconds: prepare + agent_wait + freeze + copy (which begins with the transaction and
/// the thaw) + finish. Fields added after the first vmctl read as 0 from older manifests.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Timings {
    /// Start → the transaction ready: the lock, QMP, querying disks, the parent, creating and
    /// attaching the target images.
    pub prepare_ms: f64,
    /// The target images: `qemu-img create` of every disk (run in parallel) and `blockdev-add`
    /// (part of prepare).
    pub targets_ms: f64,
    /// The agent's connection, resync and `guest-info` (on its own thread, alongside prepare).
    pub agent_ms: f64,
    /// How long the backup waited for the agent after prepare (the agent's share of the
    /// critical path).
    pub agent_wait_ms: f64,
    /// Freeze request → frozen reply.
    pub freeze_ms: f64,
    /// The QMP transaction.
    pub transaction_ms: f64,
    /// Thaw request → thawed reply.
    pub thaw_ms: f64,
    /// Freeze request sent → thaw reply received, as the host saw it (0 when not frozen).
    pub freeze_window_ms: f64,
    /// The block jobs: transaction start → every job concluded and every target closed.
    pub copy_ms: f64,
    /// Everything after the copy up to the manifest: the parent's bitmaps removed, fsync and
    /// checksum of every file (all in parallel).
    pub finish_ms: f64,
    /// Within finish: the longest fsync of a backup file.
    pub fsync_ms: f64,
    /// Within finish: the longest checksum of a backup file (alongside the fsyncs).
    pub hash_ms: f64,
    /// The whole backup, up to writing the manifest.
    pub total_ms: f64,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "vmctl-backup".
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// The backup's id (also its directory name).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// When the point-in-time was taken (UTC).
    pub created: String,
    /// "full" or "incremental".
    pub kind: String,
    /// The backup this one builds on.
    pub parent: Option<String>,
    /// Every backup needed to restore, oldest (the full) first, this one last.
    pub chain: Vec<String>,
    /// What the backup promises.
    pub consistency: Consistency,
    /// The agent's part.
    pub quiesce: QuiesceReport,
    /// Timings.
    pub timings: Timings,
    /// Disks.
    pub disks: Vec<ManifestDisk>,
    /// QEMU's version.
    pub qemu_version: String,
    /// The VM's configuration (vmctl VMs), or null (attach mode).
    pub vm_config: Option<Value>,
    /// vmctl's version.
    pub vmctl_version: String,
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, BackupError> {
        let path = dir.join(MANIFEST);
        let bad = |why: String| BackupError::BadManifest { path: path.display().to_string(), why };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if v["format"] != MANIFEST_FORMAT {
            return Err(bad(format!("format is {}, not {MANIFEST_FORMAT}", v["format"])));
        }
        let ver = v["version"].as_u64().unwrap_or(0);
        if ver == 0 || ver > MANIFEST_VERSION as u64 {
            return Err(bad(format!(
                "manifest version {ver}; this vmctl reads up to {MANIFEST_VERSION}: upgrade vmctl"
            )));
        }
        serde_json::from_value(v).map_err(|e| bad(format!("malformed: {e}")))
    }
}

/// What `run` returns.
#[derive(Debug, Clone, Serialize)]
pub struct BackupOutcome {
    /// The backup directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Calls `f` with the agent frozen guard semantics: remembers what to thaw.
struct Frozen<'a> {
    qga: &'a mut Qga,
    vssd: bool,
    done: bool,
}

impl Frozen<'_> {
    fn thaw(&mut self) -> Result<Value, QgaError> {
        self.done = true;
        // The freeze reply just came on this connection: it is in sync, and a resync round
        // trip would only lengthen the window. Resync and retry only if that fails.
        match self.qga.command("guest-fsfreeze-thaw", None, Duration::from_secs(10)) {
            Ok(v) => Ok(v),
            Err(QgaError::Command { .. }) | Err(QgaError::Silent { .. }) => {
                self.qga.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30))
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.done {
            // A failure path we did not foresee: thaw before anything else happens.
            let _ = self.qga.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30));
            let _ = self.vssd;
        }
    }
}

/// Target nodes attached to QEMU, removed on every path.
struct Attached {
    nodes: Vec<String>,
    jobs: Vec<String>,
}

impl Attached {
    fn cleanup(&mut self, qmp: &mut Qmp) {
        for j in self.jobs.drain(..) {
            let _ = qmp.execute("job-cancel", Some(json!({"id": j})));
            // A cancelled job must conclude before it can be dismissed.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match qmp.execute("job-dismiss", Some(json!({"id": j}))) {
                    Ok(_) => break,
                    Err(QmpError::Command { desc, .. }) if desc.contains("not found") => break,
                    Err(QmpError::Command { .. }) => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => return,
                }
            }
        }
        for n in self.nodes.drain(..) {
            if let Err(e) = qmp.execute("blockdev-del", Some(json!({"node-name": n}))) {
                if e.is_closed() {
                    return;
                }
            }
        }
    }
}

/// Complete backups (directory, manifest), oldest first; and the partial leftovers.
pub type Listing = (Vec<(PathBuf, Manifest)>, Vec<PathBuf>);

/// Lists the complete backups in `target` (oldest first) and the hidden partial ones.
pub fn list(target: &Path) -> Result<Listing, BackupError> {
    let mut good = Vec::new();
    let mut debris = Vec::new();
    let rd = match std::fs::read_dir(target) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((good, debris)),
        Err(e) => return Err(io_err(format!("cannot read {}", target.display()))(e)),
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !p.is_dir() {
            continue;
        }
        if name.starts_with(".partial-") {
            debris.push(p);
            continue;
        }
        if name.starts_with('.') {
            continue;
        }
        if let Ok(m) = Manifest::load(&p) {
            good.push((p, m));
        }
    }
    good.sort_by(|a, b| a.1.created.cmp(&b.1.created).then(a.1.id.cmp(&b.1.id)));
    Ok((good, debris))
}

fn qemu_img(args: &[&str]) -> Result<String, BackupError> {
    let out = std::process::Command::new("qemu-img").args(args).output().map_err(|e| BackupError::QemuImg {
        what: args.first().unwrap_or(&"").to_string(),
        detail: format!("cannot run qemu-img: {e}"),
    })?;
    if !out.status.success() {
        return Err(BackupError::QemuImg {
            what: args.first().unwrap_or(&"").to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// BLAKE3 of a file: memory-mapped and hashed on every core (BLAKE3 is a tree hash), so the
/// checksum costs a fraction of the copy.
pub fn hash_file(p: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(p)?;
    Ok(h.finalize().to_hex().to_string())
}

/// The agent, connected, resynchronised and identified; or why not; and how long it took.
type AgentReady = (Result<(Qga, AgentInfo), String>, f64);

/// Connects to the agent, resynchronises and asks `guest-info` on a thread of its own: these
/// are round trips through the guest that need nothing from QMP, so they run while the
/// targets are prepared instead of after. None when the backup does not quiesce.
fn spawn_agent(req: &BackupRequest) -> Option<std::thread::JoinHandle<AgentReady>> {
    if req.quiesce == Quiesce::Off {
        return None;
    }
    let path = req.agent.clone()?;
    let timeout = req.agent_timeout;
    std::thread::Builder::new()
        .name("vmctl-agent".into())
        .spawn(move || {
            let t = Instant::now();
            let r = Qga::connect(&path).map_err(|e| e.to_string()).and_then(|mut g| {
                debug!("agent: connected to {}", path.display());
                g.sync_timeout = timeout;
                g.info(timeout).map(|i| (g, i)).map_err(|e| e.to_string())
            });
            let ms = util::ms(t.elapsed());
            match &r {
                Ok((_, i)) => info!("agent answered: {} (connect, resync, guest-info: {ms:.1} ms)", i.describe()),
                Err(e) => info!("agent not usable after {ms:.1} ms: {e}"),
            }
            (r, ms)
        })
        .ok()
}

/// The per-VM backup lock, a file beside the VM's QMP socket (or, where that directory is
/// not writable, in the temporary directory, named after the socket's path).
fn lock_vm(qmp: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, BackupError> {
    let beside = PathBuf::from(format!("{}.vmctl-backup.lock", qmp.display()));
    let open = |p: &Path| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(p);
    let file = open(&beside).or_else(|_| {
        let abs = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
        open(&std::env::temp_dir().join(format!("vmctl-backup-{}.lock", sanitize(&abs.display().to_string()))))
    });
    let file = file.map_err(io_err(format!("cannot create a lock file for the VM of {}", qmp.display())))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| BackupError::VmBusy(qmp.display().to_string()))
}

/// Removes `.partial-*` directories a vmctl killed mid-backup left in the target (the target
/// lock is held: no live vmctl is writing them).
fn remove_partials(target: &Path) {
    let Ok((_, debris)) = list(target) else { return };
    for d in debris {
        if d.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".partial-")) {
            warn!("removing {}, left by a vmctl that did not finish", d.display());
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

/// Block jobs and target nodes named by vmctl that are still in QEMU while the VM lock is
/// held belong to a vmctl that died mid-backup (killed, or the host rebooted under it). A job
/// it left could be throttled to nothing (jobs start held until the thaw) and would block
/// the next job of the same name: cancel them and detach their targets.
fn clean_up_after_a_dead_vmctl(qmp: &mut Qmp) -> Result<(), BackupError> {
    let jobs: Vec<String> = qmp
        .execute("query-jobs", None)?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str())
        .filter(|id| id.starts_with("vmctl-"))
        .map(String::from)
        .collect();
    let nodes: Vec<String> = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("vmctl-target-"))
        .map(String::from)
        .collect();
    if jobs.is_empty() && nodes.is_empty() {
        return Ok(());
    }
    warn!("an earlier vmctl did not finish its backup: cancelling its jobs {jobs:?}, detaching {nodes:?}");
    Attached { nodes, jobs }.cleanup(qmp);
    Ok(())
}

/// Takes a backup. See the module's description for the flow.
pub fn run(req: &BackupRequest) -> Result<BackupOutcome, BackupError> {
    let t_start = Instant::now();
    info!(
        "{} backup of `{}` into {}",
        if req.incremental { "incremental" } else { "full" },
        req.vm_name,
        req.target.display()
    );
    std::fs::create_dir_all(&req.target)
        .map_err(io_err(format!("cannot create the target {}", req.target.display())))?;
    let target = std::fs::canonicalize(&req.target).map_err(io_err("bad target"))?;
    // One backup at a time per target directory.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join(".lock"))
        .map_err(io_err("cannot create the target's lock file"))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| BackupError::Busy(target.display().to_string()))?;
    // One backup at a time per VM too: the jobs' names are per VM, and with this lock held
    // whatever vmctl left in QEMU or in the target is from a vmctl that died.
    let _vm_lock = lock_vm(&req.qmp)?;
    remove_partials(&target);
    // Only once the target is ours: QEMU's agent chardev serves one client at a time.
    let agent = spawn_agent(req);

    let mut qmp = Qmp::connect(&req.qmp, Duration::from_secs(10))?;
    let (maj, min, mic) = qmp.version();
    let qemu_version = format!("{maj}.{min}.{mic}");
    info!("QMP connected: QEMU {qemu_version}");
    clean_up_after_a_dead_vmctl(&mut qmp)?;
    let disks = query_disks(&mut qmp)?;
    for d in &disks {
        debug!(
            "disk `{}`: node {}, {} {}, {} virtual, bitmaps {:?}",
            d.name,
            d.node,
            d.format,
            d.file,
            util::human_bytes(d.virtual_size),
            d.bitmaps.iter().map(|b| &b.0).collect::<Vec<_>>()
        );
    }

    // The parent, for incrementals: the newest complete backup whose bitmap every disk still has.
    let parent = if req.incremental {
        let (existing, _) = list(&target)?;
        let Some((pdir, pm)) = existing.iter().rev().find(|(_, m)| m.vm == req.vm_name) else {
            return Err(BackupError::NoParent(format!(
                "no earlier backup of `{}` in {}",
                req.vm_name,
                target.display()
            )));
        };
        for d in &disks {
            let Some(md) = parent_disk(pm, d, &disks) else {
                return Err(BackupError::NoParent(format!("disk `{}` is not in backup {}", d.name, pm.id)));
            };
            let Some(bm) = &md.bitmap else {
                return Err(BackupError::NoParent(format!(
                    "disk `{}` is {}, which has no persistent bitmaps (qcow2 has)",
                    d.name, d.format
                )));
            };
            match d.bitmaps.iter().find(|(n, _, _)| n == bm) {
                // Only on an image below the top: it saw nothing written to the overlays
                // above it (QEMU looks for a backup's bitmap on the node it reads, nowhere else).
                None if d.backing_bitmaps.contains(bm) => {
                    return Err(BackupError::NoParent(format!(
                        "the dirty bitmap `{bm}` of disk `{}` is only on a backing image below the running overlay {}, so it did not see the writes since that overlay was made (a checkpoint restored, or taken by an older vmctl)",
                        d.name, d.file
                    )))
                }
                None => {
                    return Err(BackupError::NoParent(format!(
                        "disk `{}` has no dirty bitmap `{bm}` (QEMU restarted without a clean shutdown, or a newer backup went elsewhere)",
                        d.name
                    )))
                }
                Some((_, _, false)) => {
                    return Err(BackupError::NoParent(format!("the dirty bitmap `{bm}` of disk `{}` is inconsistent (QEMU was killed)", d.name)))
                }
                Some(_) => {}
            }
        }
        info!("parent: {}", pm.id);
        Some((pdir.clone(), pm.clone()))
    } else {
        None
    };

    let now = SystemTime::now();
    let (created, stamp) = util::timestamps(now);
    let id = format!("{}-{stamp}-{}", req.vm_name, if parent.is_some() { "inc" } else { "full" });
    let bitmap_name = format!("{BITMAP_PREFIX}{id}");

    // Room for it?
    let need: u64 = disks
        .iter()
        .map(|d| match &parent {
            Some((_, pm)) => {
                let bm = parent_disk(pm, d, &disks).and_then(|x| x.bitmap.clone()).unwrap_or_default();
                d.bitmaps.iter().find(|(n, _, _)| *n == bm).map(|b| b.1).unwrap_or(d.virtual_size)
            }
            None => d.actual_size.min(d.virtual_size.max(d.actual_size)),
        })
        .sum::<u64>();
    let need = need + need / 10 + (4 << 20);
    let free = util::free_bytes(&target).map_err(io_err("cannot stat the target"))?;
    if !req.skip_space_check && free < need {
        return Err(BackupError::NoSpace {
            dir: target.display().to_string(),
            need: util::human_bytes(need),
            free: util::human_bytes(free),
        });
    }

    let partial = target.join(format!(".partial-{id}"));
    std::fs::create_dir(&partial).map_err(io_err(format!("cannot create {}", partial.display())))?;
    let mut attached = Attached { nodes: Vec::new(), jobs: Vec::new() };
    let was_running = qmp.execute("query-status", None)?["running"].as_bool() == Some(true);
    let ctx = Take {
        req,
        disks: &disks,
        parent: parent.as_ref(),
        partial: &partial,
        id: &id,
        bitmap_name: &bitmap_name,
        t_start,
    };
    let result = take(&ctx, &mut qmp, &mut attached, agent);
    let (mut manifest, copied, t_finish) = match result {
        Ok(x) => x,
        Err(e) => {
            info!("backup failed: {e}; cleaning up");
            attached.cleanup(&mut qmp);
            // The new bitmap means nothing without its backup.
            for d in &disks {
                let _ = qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": d.node, "name": bitmap_name})));
            }
            let resumed = resume_after_io_error(&mut qmp, was_running);
            let _ = std::fs::remove_dir_all(&partial);
            let e = match e {
                BackupError::Qmp(q) if q.is_closed() => BackupError::QemuGone { stage: "while copying".into() },
                BackupError::TargetFull { dir, detail } if resumed => BackupError::TargetFull {
                    dir,
                    detail: format!(
                        "{detail}; a guest write that had to be copied first paused the VM, which was resumed"
                    ),
                },
                e => e,
            };
            return Err(e);
        }
    };
    attached.cleanup(&mut qmp);

    // The chain continues from this backup: the parent's bitmap is no longer needed. (A copy
    // that a checkpoint left in a read-only image below stays: that image is the checkpoint's.)
    if let Some((_, pm)) = &parent {
        for src in &disks {
            if let Some(bm) = parent_disk(pm, src, &disks).and_then(|d| d.bitmap.as_ref()) {
                let _ = qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": src.node, "name": bm})));
            }
        }
    }
    drop(qmp);

    let finish = (|| -> Result<(), BackupError> {
        // fsync and checksum of every file at once: the fsyncs wait for the disk (QEMU closed
        // the targets without flushing them, see `take`), the checksums for the CPU.
        info!("fsync and checksum of {} file(s)", manifest.disks.len());
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = manifest
                .disks
                .iter()
                .map(|d| {
                    let p = partial.join(&d.file);
                    let p2 = p.clone();
                    let sync = s.spawn(move || -> Result<(u64, f64), BackupError> {
                        let t = Instant::now();
                        let f = std::fs::File::open(&p).map_err(io_err(format!("cannot open {}", p.display())))?;
                        f.sync_all().map_err(io_err(format!("fsync of {}", p.display())))?;
                        let size = f.metadata().map_err(io_err("stat"))?.len();
                        Ok((size, util::ms(t.elapsed())))
                    });
                    let hash = s.spawn(move || -> Result<(String, f64), BackupError> {
                        let t = Instant::now();
                        let h = hash_file(&p2).map_err(io_err(format!("cannot read {}", p2.display())))?;
                        Ok((h, util::ms(t.elapsed())))
                    });
                    (sync, hash)
                })
                .collect();
            handles
                .into_iter()
                .map(|(a, b)| (a.join().expect("fsync thread"), b.join().expect("hash thread")))
                .collect()
        });
        for ((d, c), (sync, hash)) in manifest.disks.iter_mut().zip(copied).zip(results) {
            let (size, sync_ms) = sync?;
            let (h, hash_ms) = hash?;
            debug!("{}: {} fsynced in {sync_ms:.1} ms, BLAKE3 in {hash_ms:.1} ms", d.file, util::human_bytes(size));
            d.file_size = size;
            d.blake3 = h;
            d.copied_bytes = c;
            manifest.timings.fsync_ms = manifest.timings.fsync_ms.max(sync_ms);
            manifest.timings.hash_ms = manifest.timings.hash_ms.max(hash_ms);
        }
        manifest.created = created.clone();
        manifest.qemu_version = qemu_version.clone();
        manifest.timings.finish_ms = util::ms(t_finish.elapsed());
        manifest.timings.total_ms = util::ms(t_start.elapsed());
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        util::write_atomic(&partial.join(MANIFEST), &text).map_err(io_err("cannot write the manifest"))?;
        let dest = target.join(&id);
        std::fs::rename(&partial, &dest).map_err(io_err(format!(
            "cannot rename {} to {}",
            partial.display(),
            dest.display()
        )))?;
        util::fsync_dir(&target).map_err(io_err("fsync of the target"))?;
        info!("manifest written: {}", dest.display());
        Ok(())
    })();
    if let Err(e) = finish {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(match e {
            BackupError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                BackupError::TargetFull { dir: target.display().to_string(), detail: "writing the manifest".into() }
            }
            e => e,
        });
    }
    let t = &manifest.timings;
    info!(
        "done in {:.1} ms: prepare {:.1}, agent wait {:.1}, freeze window {:.1}, copy {:.1}, finish {:.1}",
        t.total_ms, t.prepare_ms, t.agent_wait_ms, t.freeze_window_ms, t.copy_ms, t.finish_ms
    );
    Ok(BackupOutcome { dir: target.join(&id), manifest })
}

/// What `take` works on.
struct Take<'a> {
    req: &'a BackupRequest,
    disks: &'a [SourceDisk],
    parent: Option<&'a (PathBuf, Manifest)>,
    partial: &'a Path,
    id: &'a str,
    bitmap_name: &'a str,
    t_start: Instant,
}

/// Creates every target image at once (`qemu-img create` is mostly process start-up) and
/// attaches each as a QEMU node. Returns the manifest entries.
fn prepare_targets(c: &Take, qmp: &mut Qmp, attached: &mut Attached) -> Result<Vec<ManifestDisk>, BackupError> {
    let mut plan = Vec::new();
    for d in c.disks {
        let file = format!("{}.qcow2", d.name);
        let path = c.partial.join(&file);
        let backing = c.parent.map(|(pdir, pm)| {
            let pfile = parent_disk(pm, d, c.disks).map(|x| x.file.clone()).unwrap_or_else(|| file.clone());
            format!("../{}/{pfile}", pdir.file_name().unwrap().to_string_lossy())
        });
        let mut args: Vec<String> = ["create", "-q", "-f", "qcow2"].map(String::from).to_vec();
        if let Some(b) = &backing {
            args.extend(["-F".into(), "qcow2".into(), "-b".into(), b.clone()]);
        }
        args.push(path.to_str().expect("utf-8 path").to_string());
        args.push(d.virtual_size.to_string());
        let child = std::process::Command::new("qemu-img")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| BackupError::QemuImg { what: "create".into(), detail: format!("cannot run qemu-img: {e}") });
        plan.push((d, file, path, backing, child));
    }
    let mut mdisks = Vec::new();
    let mut failed = None;
    // Wait for every child, also after a failure: none is left running.
    let plan: Vec<_> = plan
        .into_iter()
        .map(|(d, file, path, backing, child)| {
            let r = child.and_then(|ch| {
                let out = ch.wait_with_output().map_err(|e| BackupError::QemuImg {
                    what: "create".into(),
                    detail: format!("waiting for qemu-img: {e}"),
                })?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(BackupError::QemuImg {
                        what: "create".into(),
                        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    })
                }
            });
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
            (d, file, path, backing)
        })
        .collect();
    if let Some(e) = failed {
        return Err(e);
    }
    for (d, file, path, backing) in plan {
        let node = format!("vmctl-target-{}", d.name);
        // No flushes: the job's ordering flushes and the fdatasync at blockdev-del would make
        // QEMU wait for the disk while nothing else happens; vmctl fsyncs every file itself,
        // alongside its checksum, before the manifest exists. (QEMU still writes its cached
        // metadata into the file when the node is closed.) A crash before that leaves a
        // partial directory, never a backup.
        let mut opts = json!({
            "driver": "qcow2",
            "node-name": node,
            "cache": {"no-flush": true},
            "file": {"driver": "file", "filename": path.to_str().expect("utf-8 path"), "cache": {"no-flush": true}},
        });
        if backing.is_some() {
            // The job writes only what changed; QEMU need not open the chain.
            opts["backing"] = Value::Null;
        }
        qmp.execute("blockdev-add", Some(opts))?;
        attached.nodes.push(node.clone());
        mdisks.push(ManifestDisk {
            name: d.name.clone(),
            file,
            backing,
            source: d.clone(),
            copied_bytes: 0,
            file_size: 0,
            blake3: String::new(),
            bitmap: (d.format == "qcow2").then(|| c.bitmap_name.to_string()),
        });
    }
    Ok(mdisks)
}

/// Prepare → quiesce → transaction → thaw → copy. Returns the manifest (without checksums),
/// the bytes each job copied, and when the copy ended (the start of `finish`).
fn take(
    c: &Take,
    qmp: &mut Qmp,
    attached: &mut Attached,
    agent_task: Option<std::thread::JoinHandle<AgentReady>>,
) -> Result<(Manifest, Vec<u64>, Instant), BackupError> {
    let (req, disks, parent) = (c.req, c.disks, c.parent);
    let mut timings = Timings::default();
    // Target images and nodes, before anything touches the guest.
    let t_targets = Instant::now();
    let mdisks = prepare_targets(c, qmp, attached)?;
    timings.targets_ms = util::ms(t_targets.elapsed());
    info!("target images: {} created and attached in {:.1} ms", mdisks.len(), timings.targets_ms);
    // The transaction's actions, ready before the freeze.
    let mut actions = Vec::new();
    for (d, md) in disks.iter().zip(&mdisks) {
        let job = format!("vmctl-{}", d.name);
        let mut data = json!({
            "job-id": job,
            "device": d.node,
            "target": format!("vmctl-target-{}", d.name),
            "sync": "full",
            "auto-finalize": true,
            "auto-dismiss": false,
        });
        if req.speed > 0 {
            data["speed"] = json!(req.speed);
        }
        if let Some((_, pm)) = parent {
            let pbm = parent_disk(pm, d, disks).and_then(|x| x.bitmap.clone()).expect("checked");
            // The bitmap is on `device`, the node the job reads: QEMU looks for it there only.
            data["sync"] = json!("bitmap");
            data["bitmap"] = json!(pbm);
            data["bitmap-mode"] = json!("never");
        }
        actions.push(json!({"type": "blockdev-backup", "data": data}));
        if md.bitmap.is_some() {
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": d.node, "name": c.bitmap_name, "persistent": true}}));
        }
    }
    timings.prepare_ms = util::ms(c.t_start.elapsed());

    // Quiesce.
    let mut q = QuiesceReport { policy: Some(req.quiesce), ..Default::default() };
    let mut consistency = Consistency::Crash;
    let mut agent: Option<(Qga, AgentInfo)> = None;
    if req.quiesce != Quiesce::Off {
        let t_wait = Instant::now();
        let connected = match agent_task {
            None => Err("the VM has no guest agent channel".to_string()),
            Some(h) => {
                let (r, ms) = h.join().unwrap_or_else(|_| (Err("the agent thread panicked".into()), 0.0));
                timings.agent_ms = ms;
                r
            }
        };
        timings.agent_wait_ms = util::ms(t_wait.elapsed());
        match connected {
            Ok((g, i)) => {
                q.agent = Some(i.describe());
                agent = Some((g, i));
            }
            Err(why) => {
                if req.quiesce == Quiesce::Required {
                    return Err(BackupError::QuiesceRequired(why));
                }
                q.note = Some(format!("not quiesced: {why}"));
            }
        }
    }

    // `info` resynchronised this connection and got its answer, and nothing has been sent on
    // it since: the freeze goes out without another round trip, and the window holds only
    // freeze, transaction and thaw.
    let t_freeze = Instant::now();
    let mut t_copy = t_freeze;
    let mut txn_result: Result<(), BackupError> = Ok(());
    if let Some((g, info)) = agent.as_mut() {
        info!("freeze: {}", if info.is_vssd { "vssd-freeze" } else { "guest-fsfreeze-freeze" });
        let freeze = if info.is_vssd {
            g.command("vssd-freeze", Some(json!({"deadline": req.freeze_deadline.as_secs_f64()})), req.freeze_timeout)
        } else {
            g.command("guest-fsfreeze-freeze", None, req.freeze_timeout)
        };
        timings.freeze_ms = util::ms(t_freeze.elapsed());
        match freeze {
            Ok(r) => {
                let (frozen, report) =
                    if info.is_vssd { (r["frozen"].as_u64(), Some(r.clone())) } else { (r.as_u64(), None) };
                info!("frozen: {} filesystem(s) in {:.1} ms", frozen.unwrap_or(0), timings.freeze_ms);
                q.frozen = frozen;
                q.report = report;
                let mut fz = Frozen { qga: g, vssd: info.is_vssd, done: false };
                consistency = if frozen.unwrap_or(0) == 0 {
                    q.note = Some("the agent froze no filesystem".into());
                    Consistency::Crash
                } else if apps_held(q.report.as_ref()) {
                    Consistency::Application
                } else {
                    Consistency::Filesystem
                };
                // A running copy competes with the thaw for QEMU's main loop and the host's
                // CPUs: the thaw's reply came only once most of the copy was done. So the
                // jobs start held back (their copy-before-write filters are in place at once:
                // the point in time is the transaction's either way) and get their speed
                // once the guest is thawed.
                let held: Vec<Value> = actions
                    .iter()
                    .map(|a| {
                        let mut a = a.clone();
                        if a["type"] == "blockdev-backup" {
                            a["data"]["speed"] = json!(HELD_SPEED);
                        }
                        a
                    })
                    .collect();
                let t_txn = Instant::now();
                t_copy = t_txn;
                txn_result = qmp.execute("transaction", Some(json!({"actions": held}))).map(|_| ()).map_err(Into::into);
                timings.transaction_ms = util::ms(t_txn.elapsed());
                let t_thaw = Instant::now();
                let thaw = fz.thaw();
                timings.thaw_ms = util::ms(t_thaw.elapsed());
                timings.freeze_window_ms = util::ms(t_freeze.elapsed());
                if txn_result.is_ok() {
                    for d in disks {
                        let job = format!("vmctl-{}", d.name);
                        if let Err(e) =
                            qmp.execute("block-job-set-speed", Some(json!({"device": job, "speed": req.speed})))
                        {
                            attached.jobs.extend(disks.iter().map(|d| format!("vmctl-{}", d.name)));
                            return Err(e.into());
                        }
                    }
                }
                info!(
                    "transaction {} in {:.1} ms; thawed in {:.1} ms; freeze window {:.1} ms",
                    if txn_result.is_ok() { "done" } else { "failed" },
                    timings.transaction_ms,
                    timings.thaw_ms,
                    timings.freeze_window_ms
                );
                match thaw {
                    Ok(v) => q.thaw = Some(v),
                    Err(e) => {
                        // vssd answers a thaw after its own deadline thaw with an error: the
                        // guest ran on unfrozen for part of the window; do not claim more.
                        info!("thaw: {e}");
                        q.thaw = Some(json!(e.to_string()));
                        if matches!(e, QgaError::Command { .. }) {
                            consistency = Consistency::Crash;
                            q.note = Some(format!("the guest thawed before the thaw request: {e}"));
                        }
                    }
                }
            }
            Err(e) => {
                info!("freeze failed after {:.1} ms: {e}", timings.freeze_ms);
                // Whatever the agent did, make sure nothing stays frozen.
                let _ = g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(10));
                if req.quiesce == Quiesce::Required {
                    return Err(BackupError::QuiesceRequired(e.to_string()));
                }
                q.note = Some(format!("not quiesced: the freeze failed: {e}"));
            }
        }
    }
    if q.frozen.is_none() {
        let t_txn = Instant::now();
        t_copy = t_txn;
        txn_result = qmp.execute("transaction", Some(json!({"actions": actions}))).map(|_| ()).map_err(Into::into);
        timings.transaction_ms = util::ms(t_txn.elapsed());
        info!("transaction (not quiesced) in {:.1} ms", timings.transaction_ms);
    }
    drop(agent);
    match txn_result {
        Ok(()) => {}
        Err(BackupError::Qmp(e)) if e.is_closed() => {
            return Err(BackupError::QemuGone { stage: "during the transaction".into() })
        }
        Err(e) => return Err(e),
    }
    for d in disks {
        attached.jobs.push(format!("vmctl-{}", d.name));
    }

    // Copy. The jobs started with the transaction (they ran on during the thaw); the copy is
    // done when they concluded and the targets are closed (blockdev-del).
    let copied = wait_jobs(req, qmp, disks, &attached.jobs.clone()).map_err(|e| match e {
        BackupError::Qmp(q) if q.is_closed() => BackupError::QemuGone { stage: "while copying".into() },
        e => e,
    })?;
    for j in attached.jobs.drain(..) {
        qmp.execute("job-dismiss", Some(json!({"id": j})))?;
    }
    for n in attached.nodes.drain(..) {
        qmp.execute("blockdev-del", Some(json!({"node-name": n})))?;
    }
    timings.copy_ms = util::ms(t_copy.elapsed());
    let t_finish = Instant::now();
    info!("copied {} in {:.1} ms", util::human_bytes(copied.iter().sum()), timings.copy_ms);
    let chain = match parent {
        Some((_, pm)) => pm.chain.iter().cloned().chain([c.id.to_string()]).collect(),
        None => vec![c.id.to_string()],
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        id: c.id.to_string(),
        vm: req.vm_name.clone(),
        created: String::new(),
        kind: if parent.is_some() { "incremental" } else { "full" }.into(),
        parent: parent.map(|(_, pm)| pm.id.clone()),
        chain,
        consistency,
        quiesce: q,
        timings,
        disks: mdisks,
        qemu_version: String::new(),
        vm_config: req.vm_config.clone(),
        vmctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok((manifest, copied, t_finish))
}

/// A guest write that copy-before-write could not copy (the target is full) fails, and a
/// virtio disk's default `werror=enospc` pauses the VM on it. Once the backup job and its
/// filter are gone the write can go through: resume the VM if we paused it that way (never a
/// VM that was paused before the backup). True when it was resumed.
fn resume_after_io_error(qmp: &mut Qmp, was_running: bool) -> bool {
    if !was_running {
        return false;
    }
    // The pause comes a little after the failed write (QEMU stops the VM from a bottom half),
    // so watch for a moment rather than look once.
    let mut resumed = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match qmp.execute("query-status", None) {
            Ok(st) if st["status"] == "io-error" => resumed |= qmp.execute("cont", None).is_ok(),
            Ok(_) => {}
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    resumed
}

/// True when vssd's report says registered applications held the freeze (appvss, issue 3):
/// an `apps` list, not empty, every entry held.
fn apps_held(report: Option<&Value>) -> bool {
    let Some(apps) = report.and_then(|r| r.get("apps")).and_then(Value::as_array) else { return false };
    !apps.is_empty()
        && apps.iter().all(|a| {
            let o = a.get("outcome").or_else(|| a.get("state")).and_then(Value::as_str).unwrap_or("");
            o == "held" || o == "thawed"
        })
}

/// Waits for every job to conclude, with a progress bar. Returns the bytes each copied.
fn wait_jobs(
    req: &BackupRequest,
    qmp: &mut Qmp,
    disks: &[SourceDisk],
    jobs: &[String],
) -> Result<Vec<u64>, BackupError> {
    let bar = if req.progress {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} copying {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Some(b)
    } else {
        None
    };
    let t0 = Instant::now();
    let mut logged = t0;
    let result = loop {
        let list = qmp.execute("query-jobs", None)?;
        let mut done = 0;
        let (mut cur, mut tot) = (0u64, 0u64);
        let mut failed: Option<(String, String)> = None;
        let mut copied = vec![0u64; jobs.len()];
        for (i, j) in jobs.iter().enumerate() {
            let Some(info) = list.as_array().into_iter().flatten().find(|x| x["id"] == j.as_str()) else {
                failed = Some((disks[i].name.clone(), "the job vanished".into()));
                continue;
            };
            cur += info["current-progress"].as_u64().unwrap_or(0);
            tot += info["total-progress"].as_u64().unwrap_or(0);
            copied[i] = info["current-progress"].as_u64().unwrap_or(0);
            if info["status"] == "concluded" || info["status"] == "null" {
                done += 1;
                if let Some(err) = info["error"].as_str() {
                    failed.get_or_insert((disks[i].name.clone(), err.to_string()));
                }
            }
        }
        if let Some(b) = &bar {
            b.set_length(tot);
            b.set_position(cur);
        }
        if done == jobs.len() || logged.elapsed() >= Duration::from_millis(500) {
            logged = Instant::now();
            info!(
                "copy: {} of {} ({:.0}%), {done}/{} job(s) concluded, {:.1} s",
                util::human_bytes(cur),
                util::human_bytes(tot),
                if tot > 0 { cur as f64 * 100.0 / tot as f64 } else { 100.0 },
                jobs.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        if let Some((disk, detail)) = failed {
            if detail.contains("No space left") || detail.contains("quota") {
                break Err(BackupError::TargetFull { dir: req.target.display().to_string(), detail });
            }
            break Err(BackupError::JobFailed { disk, detail });
        }
        if done == jobs.len() {
            break Ok(copied);
        }
        let _ = qmp.wait_event(Duration::from_millis(200), |e| e.name == "JOB_STATUS_CHANGE")?;
        qmp.take_events();
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The backup.
    pub id: String,
    /// True when nothing is wrong.
    pub ok: bool,
    /// One line per check: (what, passed, detail).
    pub checks: Vec<Check>,
    /// Consistency the manifest claims.
    pub consistency: Consistency,
}

/// One verification step.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub what: String,
    /// Passed?
    pub ok: bool,
    /// Details (tool output on failure).
    pub detail: String,
}

/// Checks a backup: manifest, chain present, checksums of every file of the chain,
/// `qemu-img check`, and with `fsck`, a filesystem check of every partition it can read.
pub fn verify(dir: &Path, fsck: bool) -> Result<VerifyReport, BackupError> {
    let m = Manifest::load(dir)?;
    let parent_dir = dir.parent().unwrap_or(Path::new("."));
    let mut checks = Vec::new();
    let mut push = |what: String, ok: bool, detail: String| checks.push(Check { what, ok, detail });
    for id in &m.chain {
        let d = parent_dir.join(id);
        let cm = match Manifest::load(&d) {
            Ok(cm) => cm,
            Err(e) => {
                push(format!("chain: backup {id}"), false, e.to_string());
                continue;
            }
        };
        for disk in &cm.disks {
            let p = d.join(&disk.file);
            match hash_file(&p) {
                Ok(h) if h == disk.blake3 => push(format!("checksum {id}/{}", disk.file), true, h),
                Ok(h) => {
                    push(format!("checksum {id}/{}", disk.file), false, format!("expected {}, got {h}", disk.blake3))
                }
                Err(e) => push(format!("checksum {id}/{}", disk.file), false, e.to_string()),
            }
        }
    }
    for disk in &m.disks {
        let p = dir.join(&disk.file);
        let out = std::process::Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&p).output();
        match out {
            Ok(o) if o.status.success() => push(format!("qemu-img check {}", disk.file), true, String::new()),
            Ok(o) => push(
                format!("qemu-img check {}", disk.file),
                false,
                format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
                    .trim()
                    .to_string(),
            ),
            Err(e) => push(format!("qemu-img check {}", disk.file), false, format!("cannot run qemu-img: {e}")),
        }
        if fsck {
            match crate::inspect::fsck_image(&p) {
                Ok(results) => {
                    for r in results {
                        push(format!("fsck {} {} ({})", disk.name, r.partition, r.fstype), r.ok, r.detail);
                    }
                }
                Err(e) => push(format!("fsck {}", disk.name), false, e.to_string()),
            }
        }
    }
    let ok = checks.iter().all(|c| c.ok);
    Ok(VerifyReport { id: m.id, ok, checks, consistency: m.consistency })
}

/// Rebuilds standalone disk images from a backup's chain into `out` (`NAME.qcow2` each):
/// `qemu-img convert` follows the backing chain, so the result needs nothing else.
pub fn restore(dir: &Path, out: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let m = Manifest::load(dir)?;
    std::fs::create_dir_all(out).map_err(io_err(format!("cannot create {}", out.display())))?;
    let mut made = Vec::new();
    for d in &m.disks {
        let src = dir.join(&d.file);
        let dest = out.join(format!("{}.qcow2", d.name));
        if dest.exists() {
            return Err(BackupError::Io {
                what: format!("refusing to overwrite {}", dest.display()),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let tmp = out.join(format!(".{}.qcow2.restoring", d.name));
        let r = qemu_img(&["convert", "-f", "qcow2", "-O", "qcow2", src.to_str().unwrap(), tmp.to_str().unwrap()]);
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err("fsync"))?;
        std::fs::rename(&tmp, &dest).map_err(io_err("rename"))?;
        made.push(dest);
    }
    util::fsync_dir(out).map_err(io_err("fsync"))?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_held_only_when_every_app_held() {
        assert!(!apps_held(None));
        assert!(!apps_held(Some(&json!({"mounts": []}))));
        assert!(!apps_held(Some(&json!({"apps": []}))));
        assert!(apps_held(Some(&json!({"apps": [{"name": "db", "outcome": "held"}]}))));
        assert!(!apps_held(Some(&json!({"apps": [{"outcome": "held"}, {"outcome": "timeout"}]}))));
    }

    #[test]
    fn manifests_of_unknown_versions_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MANIFEST), r#"{"format":"vmctl-backup","version":99}"#).unwrap();
        let e = Manifest::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("upgrade vmctl"), "{e}");
        std::fs::write(d.path().join(MANIFEST), r#"{"format":"other","version":1}"#).unwrap();
        assert!(Manifest::load(d.path()).is_err());
    }

    fn block(qdev: &str, device: &str, node: &str) -> Value {
        json!({"qdev": qdev, "device": device, "inserted": {"node-name": node}})
    }

    #[test]
    fn disks_are_named_by_their_device_not_by_the_node_on_top() {
        // vmctl's own VMs, before and after a checkpoint's overlay went on top.
        let b = block("/machine/peripheral/vd-data/virtio-backend", "", "data");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("data".into(), "data".into()));
        let b = block("/machine/peripheral/vd-data/virtio-backend", "", "data-ck1d4073f");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("data".into(), "data-ck1d4073f".into()));
        // -drive if=virtio: no device id, QEMU's node name; the drive's name as before.
        let b = block("/machine/peripheral-anon/device[0]/virtio-backend", "virtio0", "#block162");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("virtio0".into(), "virtio0".into()));
        // -drive if=none,id=drive3 -device ...,id=disk3; a device whose qdev is its id.
        let b = block("/machine/peripheral/disk3/virtio-backend", "drive3", "#block328");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("disk3".into(), "drive3".into()));
        assert_eq!(disk_name(&block("scsi0", "", "n")), "scsi0");
        // -blockdev without a device id: the node name, as before.
        assert_eq!(disk_name(&block("/machine/peripheral-anon/device[1]/virtio-backend", "", "os")), "os");
        assert_eq!(disk_name(&block("", "", "a/b")), "a_b");
    }

    fn source(name: &str, legacy: &str) -> SourceDisk {
        SourceDisk {
            name: name.into(),
            node: legacy.into(),
            device: String::new(),
            file: String::new(),
            format: "qcow2".into(),
            virtual_size: 0,
            actual_size: 0,
            bitmaps: vec![],
            backing_bitmaps: vec![],
            legacy_name: legacy.into(),
        }
    }

    fn manifest_with(disks: &[&str]) -> Manifest {
        let mut v = json!({"format": MANIFEST_FORMAT, "version": 1, "id": "p", "vm": "v", "created": "", "kind": "full",
            "parent": null, "chain": ["p"], "consistency": "crash", "quiesce": {}, "timings": {}, "disks": [],
            "qemu_version": "7.2.0", "vm_config": null, "vmctl_version": "0.1.0"});
        for d in disks {
            let s = serde_json::to_value(source(d, d)).unwrap();
            v["disks"].as_array_mut().unwrap().push(json!({"name": d, "file": format!("{d}.qcow2"), "backing": null,
                "source": s, "copied_bytes": 0, "file_size": 0, "blake3": "", "bitmap": format!("vmctl-{d}")}));
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn chains_begun_under_the_old_names_go_on() {
        let pm = manifest_with(&["drive3", "data"]);
        let disks = [source("disk3", "drive3"), source("data", "data-ck1")];
        assert_eq!(parent_disk(&pm, &disks[0], &disks).unwrap().name, "drive3");
        assert_eq!(parent_disk(&pm, &disks[1], &disks).unwrap().name, "data");
        // An old name that another disk now goes by is not taken.
        let disks = [source("x", "data"), source("data", "data")];
        assert!(parent_disk(&pm, &disks[0], &disks).is_none());
    }

    #[test]
    fn manifests_without_the_newer_timings_still_load() {
        let d = tempfile::tempdir().unwrap();
        let m = manifest_with(&["data"]);
        let mut v = serde_json::to_value(&m).unwrap();
        v["timings"] = json!({"prepare_ms": 1.0, "freeze_ms": 2.0, "transaction_ms": 3.0, "thaw_ms": 4.0,
            "freeze_window_ms": 9.0, "copy_ms": 5.0, "finish_ms": 6.0, "total_ms": 20.0});
        std::fs::write(d.path().join(MANIFEST), serde_json::to_vec(&v).unwrap()).unwrap();
        let m = Manifest::load(d.path()).unwrap();
        assert_eq!((m.timings.total_ms, m.timings.agent_ms, m.timings.hash_ms), (20.0, 0.0, 0.0));
    }

    #[test]
    fn list_ignores_partial_and_unreadable_directories() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join(".partial-x")).unwrap();
        std::fs::create_dir(d.path().join("junk")).unwrap();
        let (good, debris) = list(d.path()).unwrap();
        assert!(good.is_empty());
        assert_eq!(debris.len(), 1);
    }
}
