//! The sandbox: loop filesystems (ext4, XFS, btrfs, FUSE, tmpfs, bind mounts, nested images)
//! under `/tmp/vssd-test-*/mnt`, the scope every daemon of the test gets.
//!
//! Invariants, because a mistake here hangs the machine the tests run on:
//! - A test freezes only filesystems its [`Sandbox`] made: images under `<root>/images`,
//!   mounted under `<root>/mnt` (or `<root>/outside`, never in the scope).
//! - Cleanup runs in `Drop`, also while a test panics: the sandbox thaws every mount it made
//!   (in creation order: a backing filesystem before the one whose image it holds), unmounts
//!   in reverse order, detaches its loop devices and removes its directory, but never deletes
//!   through a mount that is still there.

use std::cell::{Cell, RefCell};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::cmd::{run, run_unchecked};

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
        assert_eq!(which.code, Some(0), "fuse2fs is missing: run tests/setup.sh (it installs fuse2fs)");
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
