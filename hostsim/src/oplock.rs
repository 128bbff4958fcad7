//! One operation at a time per VM: backup, checkpoint create, suspend, restore, resume and
//! checkpoint delete all take this lock, so that (for one) a backup and a checkpoint of the
//! same VM cannot interleave their QMP transactions and node graph changes.
//!
//! The lock is an `flock` on a file beside the VM's QMP socket (`VMDIR/qmp.sock.vmctl.lock`
//! for vmctl's VMs, also while the VM is stopped; in attach mode beside the socket given, or,
//! where that directory is missing or not writable, in the temporary directory under a name
//! made from the socket's path). Its holder writes `PID OPERATION` into the file, so that a
//! refusal names what is running and who runs it.
//!
//! Invariants:
//! - The kernel drops an `flock` with its process: a vmctl that was killed holds nothing, and
//!   whatever such a vmctl left in QEMU (block jobs and nodes named `vmctl-*`) is known to be
//!   debris while the lock is held (`backup` cleans it up).
//! - The lock is never waited for: a second operation is refused at once, by name.
//! - Within one process a second `take` is refused as well (flock is per open file), so an
//!   operation made of others (resume = restore + delete) takes the lock once, at the top.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another operation holds it.
    #[error("another {op} of the VM `{vm}` is running ({}): one operation at a time per VM; wait for it", holder(.pid))]
    Busy {
        /// The VM, as the caller names it.
        vm: String,
        /// The operation running ("backup", "checkpoint create", ...).
        op: String,
        /// Its vmctl's pid, when it said.
        pid: Option<i32>,
    },
    /// No lock file could be made.
    #[error("cannot create a lock file for the VM `{vm}` at {path}")]
    Io {
        /// The VM.
        vm: String,
        /// The last place tried.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn holder(pid: &Option<i32>) -> String {
    match pid {
        Some(p) => format!("vmctl pid {p}"),
        None => "another vmctl".into(),
    }
}

/// The VM's operation lock, held while alive.
#[derive(Debug)]
pub struct OpLock {
    _file: Flock<File>,
    path: PathBuf,
}

/// Where the lock of the VM behind `qmp` lives: beside the socket, then the temporary
/// directory. The socket's directory is canonicalised so that two spellings of one path
/// (relative, through a symlink) find one lock.
pub fn candidates(qmp: &Path) -> [PathBuf; 2] {
    let name = qmp.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "qmp".into());
    let parent = qmp.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    let abs = dir.join(&name);
    let flat: String = abs
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    [dir.join(format!("{name}.vmctl.lock")), std::env::temp_dir().join(format!("vmctl-{flat}.lock"))]
}

impl OpLock {
    /// Takes the lock of the VM behind `qmp` for `op` ("backup", "checkpoint create", ...);
    /// refuses at once, naming the running operation, when another holds it. `vm` names the VM
    /// in messages.
    pub fn take(qmp: &Path, vm: &str, op: &str) -> Result<OpLock, LockError> {
        let open = |p: &Path| std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(p);
        let [beside, tmp] = candidates(qmp);
        let (file, path) = match open(&beside) {
            Ok(f) => (f, beside),
            Err(_) => match open(&tmp) {
                Ok(f) => (f, tmp),
                Err(source) => {
                    return Err(LockError::Io { vm: vm.into(), path: tmp.display().to_string(), source });
                }
            },
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => {
                // Who holds it, for the next one's refusal. Not synced: it matters only while
                // this process lives.
                let _ = f.set_len(0);
                let _ = f.write_all_at(format!("{} {op}\n", std::process::id()).as_bytes(), 0);
                Ok(OpLock { _file: f, path })
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let (pid, op) = read_holder(&path);
                Err(LockError::Busy { vm: vm.into(), op, pid })
            }
            Err((_, e)) => Err(LockError::Io { vm: vm.into(), path: path.display().to_string(), source: e.into() }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The holder's `PID OPERATION`. It writes them just after it locked: an empty file is a
/// holder between the two, so look again for a moment.
fn read_holder(path: &Path) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_millis(200);
    loop {
        let mut text = String::new();
        let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut text));
        if let Some((pid, op)) = text.trim().split_once(' ') {
            if let Ok(pid) = pid.parse() {
                return (Some(pid), op.to_string());
            }
        }
        if Instant::now() > deadline {
            return (None, "vmctl operation".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_is_refused_by_the_name_and_pid_of_the_first() {
        let d = tempfile::tempdir().unwrap();
        let qmp = d.path().join("qmp.sock");
        let first = OpLock::take(&qmp, "web1", "backup").unwrap();
        assert_eq!(first.path(), std::fs::canonicalize(d.path()).unwrap().join("qmp.sock.vmctl.lock"));
        let e = OpLock::take(&qmp, "web1", "checkpoint create").unwrap_err();
        match &e {
            LockError::Busy { op, pid, .. } => {
                assert_eq!((op.as_str(), *pid), ("backup", Some(std::process::id() as i32)));
            }
            e => panic!("{e}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("another backup of the VM `web1`"), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        let again = OpLock::take(&qmp, "web1", "checkpoint create").unwrap();
        drop(again);
    }

    #[test]
    fn two_spellings_of_one_socket_share_one_lock() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("vm")).unwrap();
        let _l = OpLock::take(&d.path().join("vm/qmp.sock"), "vm", "restore").unwrap();
        let other = d.path().join("vm/../vm/qmp.sock");
        assert!(matches!(OpLock::take(&other, "vm", "backup"), Err(LockError::Busy { .. })));
    }

    #[test]
    fn what_a_dead_vmctl_left_in_the_file_blocks_nothing() {
        let d = tempfile::tempdir().unwrap();
        let qmp = d.path().join("qmp.sock");
        std::fs::write(&candidates(&qmp)[0], "999999 backup\n").unwrap();
        let l = OpLock::take(&qmp, "web1", "suspend").unwrap();
        let text = std::fs::read_to_string(l.path()).unwrap();
        assert_eq!(text, format!("{} suspend\n", std::process::id()));
    }

    #[test]
    fn a_socket_in_a_missing_directory_is_locked_in_the_temporary_directory() {
        // A name of this run's own, removed after: a lock file another user's run left in the
        // shared temporary directory would make this one fail with EACCES.
        let qmp = PathBuf::from(format!("/nonexistent-vmctl-test-{}/qmp.sock", std::process::id()));
        let l = OpLock::take(&qmp, "vm", "backup").unwrap();
        assert!(l.path().starts_with(std::env::temp_dir()), "{}", l.path().display());
        let path = l.path().to_path_buf();
        drop(l);
        let _ = std::fs::remove_file(path);
    }
}
