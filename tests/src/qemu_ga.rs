//! The qemu-ga fixture: the peer vssd is compared with, started safely.
//!
//! Invariants: qemu-ga runs in a mount namespace of its own that sees only the sandbox's mounts
//! (its `guest-fsfreeze-thaw` thaws every filesystem it sees), `guest-fsfreeze-freeze` (every
//! filesystem) is blocked with `-b`, and its clients refuse freeze-lists outside the scope. It
//! is killed in `Drop`, before its sandbox.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::cmd::{stop_child, wait_for_socket};
use crate::qga::{check_guard, QgaClient};
use crate::sandbox::Sandbox;

/// What qemu-ga is never allowed to do here: freeze every filesystem it sees, and anything
/// that acts on this machine itself (power, clock, CPUs and memory, trim of the busy root it
/// sees at `/`, programs, files, passwords, keys).
pub const BLOCKED: &[&str] = &[
    "guest-fsfreeze-freeze",
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-fstrim",
    "guest-set-time",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-set-user-password",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-exec",
    "guest-file-open",
];

/// Also blocked for a [`QemuGa::start_read_only`]: it is never to freeze or thaw anything.
const ALSO_BLOCKED_READ_ONLY: &[&str] = &["guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw"];

/// A qemu-ga on a unix socket of the sandbox, in a mount namespace of its own.
/// every command of [`BLOCKED`] is blocked with `-b`, and its clients refuse
/// freeze-lists outside the sandbox's scope.
pub struct QemuGa<'a> {
    sb: &'a Sandbox,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    read_only: bool,
}

impl<'a> QemuGa<'a> {
    /// Starts `qemu-ga -m unix-listen -p SOCK -t STATEDIR -f PIDFILE -b BLOCKED`
    /// in a private mount namespace that sees `/` (without its submounts), `/proc`, `/dev`
    /// and the sandbox's `mnt/` and `outside/` mounts at their usual paths, and nothing else:
    /// qemu-ga's `guest-fsfreeze-thaw` thaws every filesystem it sees, and must not thaw what
    /// others froze. Make every mount of the test before starting it.
    pub fn start(sb: &'a Sandbox) -> QemuGa<'a> {
        Self::spawn(sb, BLOCKED.to_vec(), false)
    }

    /// The same, for tests that only read (guest-get-fsinfo, guest-get-disks): its freeze-list
    /// and thaw are blocked too, and its clients refuse to send a freeze or a trim.
    pub fn start_read_only(sb: &'a Sandbox) -> QemuGa<'a> {
        Self::spawn(sb, [BLOCKED, ALSO_BLOCKED_READ_ONLY].concat(), true)
    }

    fn spawn(sb: &'a Sandbox, blocked: Vec<&str>, read_only: bool) -> QemuGa<'a> {
        let qga = Path::new("/usr/sbin/qemu-ga");
        assert!(
            qga.is_file(),
            "qemu-ga is missing: run tests/setup.sh (it installs qemu-guest-agent, never as a service)"
        );
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
mount --bind /sys "$new/sys"
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
            .arg(blocked.join(","))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let mut child = cmd.spawn().expect("start qemu-ga");
        wait_for_socket(&socket, &mut child, Duration::from_secs(20), &log);
        // qemu-ga serves one client at a time; let it notice the probe connection went away.
        thread::sleep(Duration::from_millis(200));
        QemuGa { sb, child: Some(child), socket, log, read_only }
    }

    /// Its mount table: the mountinfo of its namespace, for a vssd that must see the same.
    pub fn mountinfo_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/mountinfo", self.child.as_ref().unwrap().id()))
    }

    /// The mounts qemu-ga sees (its namespace's mountinfo).
    pub fn mounts(&self) -> Vec<kmod_shim::mountinfo::Mount> {
        kmod_shim::mountinfo::read(&self.mountinfo_path()).expect("qemu-ga mountinfo")
    }

    /// A guarded connection (freeze requests limited to the sandbox's scope).
    pub fn client(&self) -> QgaClient {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match QgaClient::connect(&self.socket) {
                Ok(c) => {
                    let scope = self.sb.scope();
                    let read_only = self.read_only;
                    return c.inspect_sends(move |b| {
                        check_guard(&scope, b);
                        if read_only {
                            for word in [&b"fsfreeze-freeze"[..], b"fstrim"] {
                                assert!(
                                    !b.windows(word.len()).any(|w| w == word),
                                    "guard: a read-only qemu-ga gets no freeze nor trim"
                                );
                            }
                        }
                    });
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("connect to qemu-ga: {}", crate::chain(&e)),
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
