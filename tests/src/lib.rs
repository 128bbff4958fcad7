//! Shared fixtures of the root-tier integration tests: real FIFREEZE on loop filesystems.
//!
//! Invariants, because a mistake here hangs the machine the tests run on:
//! - A test freezes only filesystems its [`Sandbox`] made: loop images under
//!   `/tmp/vssd-test-*/images`, mounted under `/tmp/vssd-test-*/mnt` (the scope).
//! - [`Vssd`] is always started with `--scope <sandbox>/mnt` and a freeze deadline of at most
//!   10 s; [`QemuGa`] blocks `guest-fsfreeze-freeze` and its clients refuse any freeze request
//!   that does not list mountpoints inside the sandbox.
//! - Cleanup runs in `Drop`, also while a test panics: processes first (they borrow the
//!   sandbox, so the compiler drops them first), then the sandbox thaws every mount it made
//!   (in creation order: a backing filesystem before the one whose image it holds), unmounts
//!   in reverse order, detaches its loop devices and removes its directory.
//!
//! Running: `cargo build --workspace --bins`, then, as root,
//! `unshare -m --propagation private cargo test -p tests` (the private mount namespace hides
//! the test filesystems from anything else on the machine that thaws every mount it sees,
//! e.g. a qemu-ga answering `guest-fsfreeze-thaw`). Needs e2fsprogs, xfsprogs, btrfs-progs,
//! util-linux, fuse3, fuse2fs and qemu-guest-agent. Without root every test prints
//! `SKIPPED: needs root` and passes.
#![forbid(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

pub mod vm;

/// True when the tests run as root (the only way to make loop filesystems and freeze them).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns early from a test, with a loud line on stderr, when not running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "\n*** SKIPPED: needs root ({} line {}): root-tier tests make loop filesystems and freeze them ***\n",
                module_path!(),
                line!()
            );
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------
// Commands

/// What a finished command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit code; `None` when a signal ended it (or it was killed at its time limit).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// Panics, with everything the command printed, unless it exited with `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: expected exit code {code}, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to its end (killing it after `limit`), collecting its output.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let mut stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    if status.is_none() {
        stderr.push_str(&format!("\n[fixture: killed after {limit:?}]"));
    }
    Output { code: status.and_then(|s| s.code()), stdout, stderr }
}

/// Runs a program with arguments; panics with its output unless it exits 0. Returns stdout.
pub fn run<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> String {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    let desc = format!("{cmd:?}");
    let out = run_with_limit(cmd, Duration::from_secs(120));
    out.expect_code(0, &desc);
    out.stdout
}

/// Runs a program and returns its output whatever its exit code.
pub fn run_unchecked<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Output {
    let mut cmd = Command::new(prog);
    cmd.args(args);
    run_with_limit(cmd, Duration::from_secs(120))
}

// ---------------------------------------------------------------------------------------
// Binaries under test

/// Where `vssd` and `vssctl` are: `$VSSD_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else
/// `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
    if let Some(d) = std::env::var_os("VSSD_BIN_DIR") {
        return workspace.join(d);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return workspace.join(t).join("debug");
    }
    workspace.join("target").join("debug")
}

/// The path of a workspace binary; panics with what to do when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!("{} not found: run `cargo build --workspace --bins` first", p.display());
    }
    p
}

// ---------------------------------------------------------------------------------------
// Sandbox: loop filesystems under /tmp/vssd-test-*/mnt

/// The filesystems a sandbox can make on a loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    /// ext4 (64 MiB image).
    Ext4,
    /// XFS (320 MiB sparse image: mkfs.xfs wants 300 MiB).
    Xfs,
    /// btrfs (256 MiB sparse image).
    Btrfs,
}

impl Fs {
    /// The fstype as mountinfo names it.
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
            Fs::Btrfs => "btrfs",
        }
    }

    fn size_mib(self) -> u64 {
        match self {
            Fs::Ext4 => 64,
            Fs::Xfs => 320,
            Fs::Btrfs => 256,
        }
    }

    fn mkfs(self, image: &Path) {
        match self {
            Fs::Ext4 => run("mkfs.ext4", &[OsStr::new("-q"), OsStr::new("-F"), image.as_os_str()]),
            Fs::Xfs => run("mkfs.xfs", &[OsStr::new("-q"), OsStr::new("-f"), image.as_os_str()]),
            Fs::Btrfs => run("mkfs.btrfs", &[OsStr::new("-q"), OsStr::new("-f"), image.as_os_str()]),
        };
    }
}

#[derive(Debug)]
enum Resource {
    Loop(PathBuf),
    Mount(PathBuf),
}

/// A private directory with `images/`, `mnt/` (the scope), `outside/` (not in the scope) and
/// `state/` (vssd's state dir), and every loop device and mount the test made in it.
pub struct Sandbox {
    root: PathBuf,
    resources: RefCell<Vec<Resource>>,
    seq: Cell<u32>,
}

impl Sandbox {
    /// Makes a new sandbox under /tmp; `name` (shortened) goes into the directory name.
    pub fn new(name: &str) -> Sandbox {
        warn_if_shared_mount_namespace();
        let short: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(24).collect();
        let dir =
            tempfile::Builder::new().prefix(&format!("vssd-test-{short}-")).tempdir_in("/tmp").expect("tempdir").keep();
        let root = dir.canonicalize().expect("canonicalize");
        for sub in ["images", "mnt", "outside", "state"] {
            fs::create_dir(root.join(sub)).expect("mkdir");
        }
        Sandbox { root, resources: RefCell::new(Vec::new()), seq: Cell::new(0) }
    }

    /// The sandbox directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The scope every vssd of this sandbox gets: `<root>/mnt`.
    pub fn scope(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// vssd's state dir: `<root>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The hooks directory vssd runs hooks from (empty unless a test adds hooks).
    pub fn hooks_dir(&self) -> PathBuf {
        self.root().join("hooks")
    }

    /// The app socket (appvss) of a vssd started for this sandbox.
    pub fn app_socket(&self) -> PathBuf {
        self.state_dir().join("appvss.sock")
    }

    /// vssd's control socket in the state dir.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join("vssd.sock")
    }

    /// A directory of the sandbox that is NOT under the scope.
    pub fn outside(&self) -> PathBuf {
        self.root.join("outside")
    }

    /// The loop devices this sandbox attached (and has not detached yet).
    pub fn loop_devices(&self) -> Vec<PathBuf> {
        self.resources
            .borrow()
            .iter()
            .filter_map(|r| match r {
                Resource::Loop(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    fn push(&self, r: Resource) {
        self.resources.borrow_mut().push(r);
    }

    fn mkdir_in(&self, parent: &Path, name: &str) -> PathBuf {
        assert!(parent.starts_with(&self.root), "{} is not in the sandbox", parent.display());
        let p = parent.join(name);
        fs::create_dir_all(&p).expect("mkdir mountpoint");
        p
    }

    /// Makes a sparse image file `dir/name.img` of `size_mib` MiB.
    pub fn image_in(&self, dir: &Path, name: &str, size_mib: u64) -> PathBuf {
        let p = dir.join(format!("{name}.img"));
        let f = fs::File::create(&p).expect("create image");
        f.set_len(size_mib << 20).expect("truncate image");
        p
    }

    /// Attaches `image` to a free loop device (tracked for cleanup) and returns the device.
    pub fn attach_loop(&self, image: &Path, read_only: bool) -> PathBuf {
        let mut args: Vec<&OsStr> = vec![OsStr::new("--find"), OsStr::new("--show")];
        if read_only {
            args.push(OsStr::new("--read-only"));
        }
        args.push(image.as_os_str());
        let printed = run("losetup", &args);
        let dev = PathBuf::from(printed.trim());
        assert!(printed.starts_with("/dev/loop"), "losetup printed {printed:?}");
        self.push(Resource::Loop(dev.clone()));
        dev
    }

    /// Mounts `source` on `target` with `mount ARGS...` and tracks the mount.
    pub fn mount_raw(&self, args: &[&OsStr], target: &Path) {
        assert!(target.starts_with(&self.root), "refusing to mount outside the sandbox");
        let mut all: Vec<&OsStr> = args.to_vec();
        all.push(target.as_os_str());
        run("mount", &all);
        self.push(Resource::Mount(target.to_path_buf()));
    }

    /// Makes a filesystem of `kind` in `images/NAME.img` and mounts it at `mnt/NAME`.
    pub fn mount_fs(&self, kind: Fs, name: &str) -> PathBuf {
        let images = self.root.join("images");
        self.mount_fs_full(kind, name, &images, &self.scope(), &[])
    }

    /// The full form: the image in `image_dir` (which may be another sandbox filesystem: a
    /// nested image), the mount at `parent/NAME`, extra mount options.
    pub fn mount_fs_full(&self, kind: Fs, name: &str, image_dir: &Path, parent: &Path, opts: &[&str]) -> PathBuf {
        assert!(image_dir.starts_with(&self.root), "image outside the sandbox");
        let image = self.image_in(image_dir, name, kind.size_mib());
        kind.mkfs(&image);
        let dev = self.attach_loop(&image, false);
        let target = self.mkdir_in(parent, name);
        let mut args: Vec<&OsStr> = vec![OsStr::new("-t"), OsStr::new(kind.name())];
        let joined = opts.join(",");
        if !opts.is_empty() {
            args.push(OsStr::new("-o"));
            args.push(OsStr::new(&joined));
        }
        args.push(dev.as_os_str());
        self.mount_raw(&args, &target);
        target
    }

    /// ext4 at `mnt/NAME`.
    pub fn ext4(&self, name: &str) -> PathBuf {
        self.mount_fs(Fs::Ext4, name)
    }

    /// XFS at `mnt/NAME`.
    pub fn xfs(&self, name: &str) -> PathBuf {
        self.mount_fs(Fs::Xfs, name)
    }

    /// btrfs at `mnt/NAME`.
    pub fn btrfs(&self, name: &str) -> PathBuf {
        self.mount_fs(Fs::Btrfs, name)
    }

    /// A read-only ext4 at `mnt/NAME` (the superblock is read-only: `mount -o ro`).
    pub fn read_only_ext4(&self, name: &str) -> PathBuf {
        let images = self.root.join("images");
        self.mount_fs_full(Fs::Ext4, name, &images, &self.scope(), &["ro"])
    }

    /// A tmpfs at `mnt/NAME`.
    pub fn tmpfs(&self, name: &str) -> PathBuf {
        let target = self.mkdir_in(&self.scope(), name);
        self.mount_raw(
            &[OsStr::new("-t"), OsStr::new("tmpfs"), OsStr::new("-o"), OsStr::new("size=16m"), OsStr::new("tmpfs")],
            &target,
        );
        target
    }

    /// A bind mount of `source` at `mnt/NAME`.
    pub fn bind(&self, source: &Path, name: &str) -> PathBuf {
        let scope = self.scope();
        self.bind_in(source, &scope, name)
    }

    /// A bind mount of `source` at `outside/NAME`: the same superblock, outside the scope.
    pub fn bind_outside(&self, source: &Path, name: &str) -> PathBuf {
        let outside = self.outside();
        self.bind_in(source, &outside, name)
    }

    /// A bind mount of `source` at `parent/NAME`.
    pub fn bind_in(&self, source: &Path, parent: &Path, name: &str) -> PathBuf {
        assert!(source.starts_with(&self.root), "refusing to bind-mount outside the sandbox");
        let target = self.mkdir_in(parent, name);
        self.mount_raw(&[OsStr::new("--bind"), source.as_os_str()], &target);
        target
    }

    /// Creates btrfs subvolume `subvol` in the btrfs mounted at `btrfs_mnt` and mounts it
    /// (`-o subvol=`) at `mnt/NAME`: a second mount of the same superblock.
    pub fn btrfs_subvolume(&self, btrfs_mnt: &Path, subvol: &str, name: &str) -> PathBuf {
        run(
            "btrfs",
            &[OsStr::new("-q"), OsStr::new("subvolume"), OsStr::new("create"), btrfs_mnt.join(subvol).as_os_str()],
        );
        let dev = self.source_of(btrfs_mnt);
        let target = self.mkdir_in(&self.scope(), name);
        let opt = format!("subvol={subvol}");
        self.mount_raw(
            &[OsStr::new("-t"), OsStr::new("btrfs"), OsStr::new("-o"), OsStr::new(&opt), OsStr::new(&dev)],
            &target,
        );
        target
    }

    /// A FUSE filesystem (fuse2fs over an ext4 image) at `mnt/NAME`: local, writable, and
    /// FIFREEZE on it fails with EOPNOTSUPP. Needs Debian's `fuse2fs` package.
    pub fn fuse(&self, name: &str) -> PathBuf {
        let which = run_unchecked("sh", &["-c", "command -v fuse2fs"]);
        assert_eq!(which.code, Some(0), "fuse2fs is missing: apt-get install fuse2fs");
        let image = self.image_in(&self.root.join("images"), name, 64);
        Fs::Ext4.mkfs(&image);
        let target = self.mkdir_in(&self.scope(), name);
        run("fuse2fs", &[image.as_os_str(), target.as_os_str()]);
        self.push(Resource::Mount(target.clone()));
        let fstype = mount_of(&target).map(|m| m.fstype).unwrap_or_default();
        assert!(fstype.starts_with("fuse"), "fuse2fs mounted {fstype:?} at {}", target.display());
        target
    }

    /// A filesystem of `kind` whose image lives on the sandbox filesystem mounted at `outer`,
    /// loop-mounted at `mnt/NAME`: it must be frozen before `outer` and thawed after it.
    pub fn nested(&self, kind: Fs, outer: &Path, name: &str) -> PathBuf {
        let scope = self.scope();
        self.mount_fs_full(kind, name, outer, &scope, &[])
    }

    /// The mount source (the loop device) of one of this sandbox's mounts.
    pub fn source_of(&self, mountpoint: &Path) -> String {
        mount_of(mountpoint).unwrap_or_else(|| panic!("{} is not mounted", mountpoint.display())).source
    }

    /// Writes a few files without syncing them, so that a freeze has dirty data to flush.
    pub fn dirty(&self, mountpoint: &Path) {
        let n = self.seq.get();
        self.seq.set(n + 1);
        for i in 0..4 {
            fs::write(mountpoint.join(format!("dirty-{n}-{i}")), vec![0xa5u8; 64 << 10]).expect("write dirty data");
        }
    }

    /// Unmounts everything now (what Drop does), leaving the directory in place.
    fn teardown(&self) -> Vec<String> {
        let resources = std::mem::take(&mut *self.resources.borrow_mut());
        let mut problems = Vec::new();
        // Thaw in creation order: a filesystem that holds another's image first, so that
        // thawing the inner one can write through its loop device.
        for r in &resources {
            if let Resource::Mount(p) = r {
                thaw_fully(p);
            }
        }
        for r in resources.iter().rev() {
            match r {
                Resource::Mount(p) => {
                    if let Err(e) = unmount_retrying(p) {
                        problems.push(format!("umount {}: {e}", p.display()));
                    }
                }
                Resource::Loop(d) => {
                    if let Err(e) = detach_retrying(d) {
                        problems.push(format!("losetup -d {}: {e}", d.display()));
                    }
                }
            }
        }
        problems
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let mut problems = self.teardown();
        let left: Vec<_> = mounts().into_iter().filter(|m| m.mount_point.starts_with(&self.root)).collect();
        if left.is_empty() {
            if let Err(e) = fs::remove_dir_all(&self.root) {
                problems.push(format!("rm -r {}: {e}", self.root.display()));
            }
        } else {
            // Never delete files through a mount that is still there.
            for m in left {
                problems.push(format!("still mounted: {}", m.mount_point.display()));
            }
        }
        if !problems.is_empty() {
            eprintln!("!!! sandbox {} cleanup problems:\n  {}", self.root.display(), problems.join("\n  "));
        }
    }
}

/// Anything on this machine that runs an unscoped thaw (qemu-ga's `guest-fsfreeze-thaw`
/// FITHAWs every mount it sees) thaws the tests' filesystems too and makes "frozen" checks
/// fail at random. Run the suite in a private mount namespace
/// (`unshare -m --propagation private cargo test -p tests`) so nothing outside sees them.
fn warn_if_shared_mount_namespace() {
    // Printed by every sandbox: libtest shows a test's stderr only when it fails, which is
    // when this matters.
    let mine = fs::read_link("/proc/self/ns/mnt").ok();
    let init = fs::read_link("/proc/1/ns/mnt").ok();
    if mine.is_some() && mine == init {
        eprintln!(
            "warning: the tests' loop filesystems are visible machine-wide; another program's \
             thaw-everything (e.g. qemu-ga's guest-fsfreeze-thaw) can thaw them mid-test. Run under \
             `unshare -m --propagation private cargo test -p tests`."
        );
    }
}

/// FITHAW until the kernel says the filesystem is not frozen (ignoring every error).
pub fn thaw_fully(mountpoint: &Path) {
    for _ in 0..4 {
        if kmod_shim::freeze::thaw_path(mountpoint).is_err() {
            break;
        }
    }
}

fn unmount_retrying(p: &Path) -> Result<(), nix::Error> {
    use nix::mount::{umount2, MntFlags};
    let mut last = Ok(());
    for _ in 0..50 {
        // A freeze that was still pending during the first thaw pass (stuck behind a frozen
        // backing filesystem) may have completed since: unmounting a frozen filesystem would
        // keep its superblock frozen for good.
        thaw_fully(p);
        match umount2(p, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => return Ok(()), // not mounted (any more)
            Err(e @ nix::Error::EBUSY) => {
                last = Err(e);
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    // A probe thread may still hold a file open: detach lazily rather than leak the mount.
    umount2(p, MntFlags::MNT_DETACH).or(last)
}

fn detach_retrying(dev: &Path) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..50 {
        let out = run_unchecked("losetup", &[OsStr::new("-d"), dev.as_os_str()]);
        if out.code == Some(0) || !loop_attached(dev) {
            return Ok(());
        }
        last = out.stderr;
        thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// True when the loop device has a backing file.
pub fn loop_attached(dev: &Path) -> bool {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    Path::new("/sys/block").join(name).join("loop/backing_file").exists()
}

/// The machine's mounts as this process sees them.
pub fn mounts() -> Vec<kmod_shim::mountinfo::Mount> {
    kmod_shim::mountinfo::read(Path::new("/proc/self/mountinfo")).expect("read mountinfo")
}

/// The mount whose mount point is exactly `p` (the topmost one).
pub fn mount_of(p: &Path) -> Option<kmod_shim::mountinfo::Mount> {
    mounts().into_iter().rev().find(|m| m.mount_point == p)
}

/// True when the filesystem at `mountpoint` is frozen by someone: our own FIFREEZE gets
/// EBUSY. When it is not frozen, this freezes and at once thaws it (do not race a freezer).
pub fn frozen_by_someone(mountpoint: &Path) -> bool {
    match kmod_shim::freeze::freeze_path(mountpoint) {
        Ok(()) => {
            kmod_shim::freeze::thaw_path(mountpoint).expect("thaw after probe freeze");
            false
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(e) => panic!("FIFREEZE probe on {}: {e}", mountpoint.display()),
    }
}

// ---------------------------------------------------------------------------------------
// Write probe

static PROBE_SEQ: AtomicU64 = AtomicU64::new(0);

/// A thread that creates a file in a mount, writes 8 KiB and fsyncs. On a frozen filesystem
/// it blocks until the thaw: that is how the tests see "frozen".
pub struct WriteProbe {
    dir: PathBuf,
    started: Instant,
    rx: mpsc::Receiver<io::Result<Duration>>,
    result: Option<io::Result<Duration>>,
}

impl WriteProbe {
    /// Starts the write in a new thread.
    pub fn start(dir: &Path) -> WriteProbe {
        let seq = PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
        let file = dir.join(format!(".probe-{}-{seq}", std::process::id()));
        let (tx, rx) = mpsc::channel();
        let started = Instant::now();
        thread::Builder::new()
            .name(format!("write-probe-{seq}"))
            .spawn(move || {
                let r = (|| {
                    let mut f = fs::OpenOptions::new().create(true).truncate(true).write(true).open(&file)?;
                    f.write_all(&[0x5a; 8192])?;
                    f.sync_all()?;
                    Ok(started.elapsed())
                })();
                let _ = tx.send(r);
            })
            .expect("spawn probe");
        WriteProbe { dir: dir.to_path_buf(), started, rx, result: None }
    }

    /// Starts one probe per mount.
    pub fn start_all(dirs: &[&Path]) -> Vec<WriteProbe> {
        dirs.iter().map(|d| WriteProbe::start(d)).collect()
    }

    /// Waits until the probe is `timeout` old. `Some(how long the write took)` once done.
    pub fn wait_until_age(&mut self, age: Duration) -> Option<Duration> {
        if self.result.is_none() {
            let left = age.saturating_sub(self.started.elapsed());
            match self.rx.recv_timeout(left) {
                Ok(r) => self.result = Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("probe thread vanished"),
            }
        }
        match self.result.as_ref().unwrap() {
            Ok(d) => Some(*d),
            Err(e) => panic!("probe write in {} failed: {e}", self.dir.display()),
        }
    }

    /// Waits up to `timeout` from now. `Some(how long the write took)` once done.
    pub fn wait(&mut self, timeout: Duration) -> Option<Duration> {
        let age = self.started.elapsed() + timeout;
        self.wait_until_age(age)
    }

    /// Asserts the write has not finished by the time the probe is `age` old: the mount is
    /// frozen.
    pub fn assert_blocked(&mut self, age: Duration, what: &str) {
        if let Some(d) = self.wait_until_age(age) {
            panic!("{what}: a write to {} completed in {d:?}; expected it to block (frozen)", self.dir.display());
        }
    }

    /// Asserts the write finishes within `timeout` from now: the mount is (again) writable.
    pub fn assert_completes(&mut self, timeout: Duration, what: &str) -> Duration {
        match self.wait(timeout) {
            Some(d) => d,
            None => panic!(
                "{what}: a write to {} has not completed after {:?}; the filesystem is still frozen",
                self.dir.display(),
                self.started.elapsed()
            ),
        }
    }
}

/// Asserts every probe stays blocked until it is `age` old.
pub fn assert_all_blocked(probes: &mut [WriteProbe], age: Duration, what: &str) {
    for p in probes.iter_mut() {
        p.assert_blocked(age, what);
    }
}

/// Asserts every probe completes within `timeout`.
pub fn assert_all_complete(probes: &mut [WriteProbe], timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    for p in probes.iter_mut() {
        p.assert_completes(deadline.saturating_duration_since(Instant::now()), what);
    }
}

/// Asserts a fresh write to `dir` completes within `timeout`.
pub fn assert_writable(dir: &Path, timeout: Duration, what: &str) -> Duration {
    WriteProbe::start(dir).assert_completes(timeout, what)
}

/// Starts a write to `dir` and asserts it is still blocked after `blocked_for`; the probe is
/// returned so that the test can check it completes after the thaw.
pub fn assert_frozen(dir: &Path, blocked_for: Duration, what: &str) -> WriteProbe {
    let mut p = WriteProbe::start(dir);
    p.assert_blocked(blocked_for, what);
    p
}

// ---------------------------------------------------------------------------------------
// QGA client

/// A blocking client of the qemu-guest-agent JSON protocol on a unix socket.
pub struct QgaClient {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When set, refuse any fsfreeze-freeze that does not list mountpoints under this
    /// directory (used for qemu-ga, which would otherwise freeze the whole machine).
    guard: Option<PathBuf>,
}

/// One reply as read from the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The JSON value.
    pub value: Value,
    /// True when one or more 0xFF bytes came right before it.
    pub delimited: bool,
}

impl QgaClient {
    /// Connects with 30 s read and write timeouts.
    pub fn connect(path: &Path) -> io::Result<QgaClient> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(QgaClient { stream, buf: Vec::new(), guard: None })
    }

    /// Refuses to send freeze requests that are not limited to mountpoints under `dir`.
    pub fn guarded(mut self, dir: &Path) -> QgaClient {
        self.guard = Some(dir.to_path_buf());
        self
    }

    /// Changes the read timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("set timeout");
    }

    fn check_guard(&self, bytes: &[u8]) {
        let Some(dir) = &self.guard else { return };
        if !bytes.windows(15).any(|w| w == b"fsfreeze-freeze") {
            return;
        }
        let v: Value = serde_json::from_slice(bytes.trim_ascii())
            .unwrap_or_else(|_| panic!("guard: refusing an unparsable freeze request to qemu-ga"));
        let cmd = v["execute"].as_str().unwrap_or("");
        assert_eq!(cmd, "guest-fsfreeze-freeze-list", "guard: only guest-fsfreeze-freeze-list may go to qemu-ga");
        // A missing or null list means "every filesystem"; an empty array freezes nothing.
        let list = v["arguments"]["mountpoints"].as_array().expect("guard: freeze-list needs explicit mountpoints");
        for m in list {
            let m = Path::new(m.as_str().expect("guard: mountpoint must be a string"));
            assert!(m.starts_with(dir) && m != dir, "guard: {} is not inside {}", m.display(), dir.display());
        }
    }

    /// Sends raw bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.check_guard(bytes);
        self.stream.write_all(bytes).expect("send to agent");
    }

    /// Sends one JSON value and a newline.
    pub fn send(&mut self, v: &Value) {
        let mut bytes = serde_json::to_vec(v).unwrap();
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }

    /// Reads one reply (skipping whitespace and 0xFF delimiters). Panics on timeout, EOF or
    /// a reply that is not JSON.
    pub fn read_reply_full(&mut self) -> Reply {
        self.try_read_reply().unwrap_or_else(|e| panic!("reading a reply: {e}"))
    }

    /// Reads one reply, or says why there is none.
    pub fn try_read_reply(&mut self) -> Result<Reply, String> {
        let mut delimited = false;
        loop {
            let skip = self.buf.iter().take_while(|b| b.is_ascii_whitespace() || **b == 0xff).count();
            delimited |= self.buf[..skip].contains(&0xff);
            self.buf.drain(..skip);
            if !self.buf.is_empty() {
                let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                match it.next() {
                    Some(Ok(value)) => {
                        let used = it.byte_offset();
                        self.buf.drain(..used);
                        return Ok(Reply { value, delimited });
                    }
                    Some(Err(e)) if e.is_eof() => {}
                    Some(Err(e)) => {
                        return Err(format!(
                            "the agent sent invalid JSON ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    }
                    None => {}
                }
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("connection closed (pending: {:?})", String::from_utf8_lossy(&self.buf))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(format!("no reply in time (pending: {:?})", String::from_utf8_lossy(&self.buf)))
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Reads one reply's value.
    pub fn read_reply(&mut self) -> Value {
        self.read_reply_full().value
    }

    /// Reads raw bytes until a newline (included) arrives; for checking framing.
    pub fn read_line_raw(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                return self.buf.drain(..=i).collect();
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read raw line");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request and reads its reply.
    pub fn request(&mut self, v: Value) -> Value {
        self.send(&v);
        self.read_reply()
    }

    /// `{"execute": cmd}` or `{"execute": cmd, "arguments": args}`.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let mut v = json!({ "execute": cmd });
        if let Some(a) = args {
            v["arguments"] = a;
        }
        self.request(v)
    }

    /// Executes and returns the `return` member; panics with the reply otherwise.
    pub fn ok(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let r = self.execute(cmd, args);
        ret(&r, cmd).clone()
    }

    /// Drains replies until a `guest-sync` with a fresh id comes back; returns the replies
    /// that came before it. Use after sending garbage.
    pub fn resync(&mut self) -> Vec<Value> {
        static SYNC: AtomicU64 = AtomicU64::new(7_000_000);
        let id = SYNC.fetch_add(1, Ordering::Relaxed);
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}));
        let mut before = Vec::new();
        loop {
            let r = self.read_reply();
            if r.get("return").and_then(Value::as_u64) == Some(id) {
                return before;
            }
            before.push(r);
            assert!(before.len() < 20, "no guest-sync reply among {before:?}");
        }
    }
}

/// The `return` member of a reply; panics with the whole reply when it is an error.
pub fn ret<'a>(reply: &'a Value, what: &str) -> &'a Value {
    match reply.get("return") {
        Some(r) => r,
        None => panic!("{what}: expected a return, got {reply}"),
    }
}

/// The error class of an error reply, if it is one.
pub fn error_class(reply: &Value) -> Option<&str> {
    reply.get("error").and_then(|e| e.get("class")).and_then(Value::as_str)
}

/// Asserts `reply` is an error of `class`; returns its description.
pub fn expect_error<'a>(reply: &'a Value, class: &str, what: &str) -> &'a str {
    assert_eq!(error_class(reply), Some(class), "{what}: expected a {class} error, got {reply}");
    reply["error"]["desc"].as_str().unwrap_or_else(|| panic!("{what}: error without desc: {reply}"))
}

/// The per-mount entry of a vssd-freeze / vssd-plan report for `mountpoint`.
pub fn mount_entry<'a>(report: &'a Value, mountpoint: &Path) -> &'a Value {
    let mounts = report["mounts"].as_array().unwrap_or_else(|| panic!("report without mounts: {report}"));
    let want = mountpoint.to_str().unwrap();
    mounts
        .iter()
        .find(|m| m["mountpoint"].as_str() == Some(want))
        .unwrap_or_else(|| panic!("report has no entry for {want}: {report}"))
}

/// The string field `key` of a report entry (panics with the entry when absent).
pub fn field<'a>(entry: &'a Value, key: &str) -> &'a str {
    entry[key].as_str().unwrap_or_else(|| panic!("no string field {key:?} in {entry}"))
}

/// Path to a JSON string value.
pub fn p2s(p: &Path) -> Value {
    Value::String(p.to_str().unwrap().to_string())
}

fn wait_for_socket(path: &Path, child: &mut Child, limit: Duration, log: &Path) {
    let deadline = Instant::now() + limit;
    loop {
        if UnixStream::connect(path).is_ok() {
            return;
        }
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!(
                "the agent exited ({st}) before {} accepted connections; its log:\n{}",
                path.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{} did not accept connections within {limit:?}; log:\n{}",
                path.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// Sends `sig` to the child and waits up to `limit` for it; false when it is still there.
fn signal_and_wait(child: &mut Child, sig: nix::sys::signal::Signal, limit: Duration) -> Option<ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Some(st) = child.try_wait().ok().flatten() {
        return Some(st);
    }
    let _ = nix::sys::signal::kill(pid, sig);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().ok().flatten() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Ends a child: SIGTERM, then SIGKILL. Never waits forever (a process stuck in the kernel on
/// a frozen filesystem only dies once the sandbox has thawed it).
fn stop_child(child: &mut Child, term_grace: Duration) -> Option<ExitStatus> {
    use nix::sys::signal::Signal;
    signal_and_wait(child, Signal::SIGTERM, term_grace)
        .or_else(|| signal_and_wait(child, Signal::SIGKILL, Duration::from_secs(5)))
}

// ---------------------------------------------------------------------------------------
// vssd

/// How to start a vssd for a sandbox. The scope is always the sandbox's `mnt/`.
pub struct VssdBuilder<'a> {
    sb: &'a Sandbox,
    deadline_s: u64,
    grace_s: u64,
    extra: Vec<OsString>,
}

impl<'a> VssdBuilder<'a> {
    /// `--freeze-deadline` (at most 10 s, to keep the machine safe).
    pub fn deadline(mut self, secs: u64) -> Self {
        assert!((1..=10).contains(&secs), "tests keep the freeze deadline at 10 s or less");
        self.deadline_s = secs;
        self
    }

    /// `--channel-drop-grace`.
    pub fn grace(mut self, secs: u64) -> Self {
        self.grace_s = secs;
        self
    }

    /// `--cannot-freeze skip|veto`.
    pub fn cannot_freeze(self, policy: &str) -> Self {
        self.arg("--cannot-freeze").arg(policy)
    }

    /// Any further argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.extra.push(a.as_ref().to_os_string());
        self
    }

    /// Starts vssd and waits until its channel accepts connections.
    pub fn start(self) -> Vssd<'a> {
        let sb = self.sb;
        let socket = sb.root().join("qga.sock");
        let mut args: Vec<OsString> = vec![
            "--channel".into(),
            format!("unix:{}", socket.display()).into(),
            "--scope".into(),
            sb.scope().into(),
            "--freeze-deadline".into(),
            self.deadline_s.to_string().into(),
            "--channel-drop-grace".into(),
            self.grace_s.to_string().into(),
            "--state-dir".into(),
            sb.state_dir().into(),
            // The sandbox's own hooks only (none unless a test puts some there), never the
            // machine's /etc/vssd/hooks.d or /etc/qemu/fsfreeze-hook.d.
            "--hooks-dir".into(),
            sb.hooks_dir().into(),
            "-v".into(),
        ];
        args.extend(self.extra);
        let mut v = Vssd { sb, child: None, socket, args, log: sb.root().join("vssd.log") };
        v.spawn();
        v
    }
}

/// A running vssd (killed in Drop, before its sandbox is torn down).
pub struct Vssd<'a> {
    sb: &'a Sandbox,
    child: Option<Child>,
    socket: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
}

impl<'a> Vssd<'a> {
    /// Options, then `.start()`. Defaults: deadline 10 s, channel-drop grace 1 s.
    pub fn builder(sb: &'a Sandbox) -> VssdBuilder<'a> {
        VssdBuilder { sb, deadline_s: 10, grace_s: 1, extra: Vec::new() }
    }

    /// Starts with the defaults.
    pub fn start(sb: &'a Sandbox) -> Vssd<'a> {
        Self::builder(sb).start()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "vssd already running");
        let vssd = bin("vssd");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open vssd log");
        let mut cmd = Command::new(vssd);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let mut child = cmd.spawn().expect("start vssd");
        wait_for_socket(&self.socket, &mut child, Duration::from_secs(20), &self.log);
        self.child = Some(child);
    }

    /// The QGA channel socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A new connection to the channel.
    pub fn client(&self) -> QgaClient {
        QgaClient::connect(&self.socket).unwrap_or_else(|e| panic!("connect to vssd at {}: {e}", self.socket.display()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("vssd not running").id()
    }

    /// SIGKILL: no chance to thaw. The sandbox still thaws in its Drop.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("vssd not running");
        let st = signal_and_wait(&mut c, nix::sys::signal::Signal::SIGKILL, Duration::from_secs(10));
        assert!(st.is_some(), "vssd did not die on SIGKILL");
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("vssd not running");
        signal_and_wait(&mut c, nix::sys::signal::Signal::SIGTERM, Duration::from_secs(15)).unwrap_or_else(|| {
            let _ = stop_child(&mut c, Duration::ZERO);
            panic!("vssd did not exit within 15 s of SIGTERM")
        })
    }

    /// Starts vssd again with the same arguments (and state dir).
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// What vssd wrote to stderr so far (all runs).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `vssctl --socket <control socket> ARGS...` (60 s limit).
    pub fn vssctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        vssctl(&self.sb.control_socket(), args)
    }
}

/// Runs `vssctl --socket SOCKET ARGS...` (60 s limit).
pub fn vssctl<S: AsRef<OsStr>>(socket: &Path, args: &[S]) -> Output {
    let mut cmd = Command::new(bin("vssctl"));
    cmd.arg("--socket").arg(socket).args(args);
    run_with_limit(cmd, Duration::from_secs(60))
}

impl Drop for Vssd<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if stop_child(&mut c, Duration::from_secs(10)).is_none() {
                eprintln!("!!! vssd {} did not die; the sandbox thaws and it goes", c.id());
            }
        }
        if thread::panicking() {
            eprintln!("--- vssd log ({}):\n{}--- end of vssd log", self.log.display(), self.log_text());
        }
    }
}

// ---------------------------------------------------------------------------------------
// qemu-ga

/// A qemu-ga on a unix socket of the sandbox, in a mount namespace of its own.
/// `guest-fsfreeze-freeze` (all filesystems) is blocked with `-b`, and its clients refuse
/// freeze-lists outside the sandbox's scope.
pub struct QemuGa<'a> {
    sb: &'a Sandbox,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl<'a> QemuGa<'a> {
    /// Starts `qemu-ga -m unix-listen -p SOCK -t STATEDIR -f PIDFILE -b guest-fsfreeze-freeze`
    /// in a private mount namespace that sees `/` (without its submounts), `/proc`, `/dev`
    /// and the sandbox's `mnt/` and `outside/` mounts at their usual paths, and nothing else:
    /// qemu-ga's `guest-fsfreeze-thaw` thaws every filesystem it sees, and must not thaw what
    /// others froze. Make every mount of the test before starting it.
    pub fn start(sb: &'a Sandbox) -> QemuGa<'a> {
        let qga = Path::new("/usr/sbin/qemu-ga");
        assert!(qga.is_file(), "qemu-ga is missing: apt-get install qemu-guest-agent");
        let root = sb.root();
        let socket = root.join("qemu-ga.sock");
        let state = root.join("qemu-ga-state");
        for d in [state.clone(), root.join("ns"), root.join("ns-old")] {
            fs::create_dir_all(&d).unwrap();
        }
        let log = root.join("qemu-ga.log");
        let logf = fs::File::create(&log).unwrap();
        const SCRIPT: &str = r#"set -e
root="$1"; shift
new="$root/ns"
mount --bind / "$new"
mount -t proc proc "$new/proc"
mount --bind /dev "$new/dev"
mount --rbind "$root/mnt" "$new$root/mnt"
mount --rbind "$root/outside" "$new$root/outside"
cd "$new"
pivot_root . ".$root/ns-old"
cd /
umount -l "$root/ns-old"
exec "$@"
"#;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh"])
            .arg(root)
            .arg(qga)
            .arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(&socket)
            .arg("-t")
            .arg(&state)
            .arg("-f")
            .arg(root.join("qemu-ga.pid"))
            .arg("-b")
            .arg("guest-fsfreeze-freeze")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let mut child = cmd.spawn().expect("start qemu-ga");
        wait_for_socket(&socket, &mut child, Duration::from_secs(20), &log);
        // qemu-ga serves one client at a time; let it notice the probe connection went away.
        thread::sleep(Duration::from_millis(200));
        QemuGa { sb, child: Some(child), socket, log }
    }

    /// The mounts qemu-ga sees (its namespace's mountinfo).
    pub fn mounts(&self) -> Vec<kmod_shim::mountinfo::Mount> {
        let pid = self.child.as_ref().unwrap().id();
        kmod_shim::mountinfo::read(Path::new(&format!("/proc/{pid}/mountinfo"))).expect("qemu-ga mountinfo")
    }

    /// A guarded connection (freeze requests limited to the sandbox's scope).
    pub fn client(&self) -> QgaClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match QgaClient::connect(&self.socket) {
                Ok(c) => return c.guarded(&self.sb.scope()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect to qemu-ga: {e}"),
            }
        }
    }
}

impl Drop for QemuGa<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if stop_child(&mut c, Duration::from_secs(10)).is_none() {
                eprintln!("!!! qemu-ga {} did not die", c.id());
            }
        }
        if thread::panicking() {
            eprintln!("--- qemu-ga log:\n{}", fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Timings shared by the tests (generous: CI has 2 cores)

/// How long a write must stay blocked to count as "frozen".
pub const BLOCKED: Duration = Duration::from_millis(800);
/// How long a write may take to complete once the filesystem is thawed.
pub const THAWED: Duration = Duration::from_secs(10);
