//! The guest's own state, read and changed the way qemu-ga 7.2 does it on Linux, for the
//! platform QGA commands: time and time zone ([`time`]), kernel, distribution and host name
//! ([`os`]), logged-in users ([`users`]), CPUs ([`cpu`]), memory blocks ([`memory`]),
//! network interfaces ([`net`]), shutdown and suspend ([`power`]), and mounted filesystems,
//! disks and trimming ([`fs`]).
//!
//! Invariants: every reply has qemu-ga's keys, JSON types and error wording
//! (docs/qga-wire.md, "Platform commands"); everything is read from files under the paths of
//! a [`Host`], so that tests point them at a directory they wrote; no program runs except the
//! fixed ones qemu-ga runs (`/sbin/shutdown`, `/sbin/hwclock`, `systemctl`, `pm-is-supported`
//! and the pm-utils helpers), never one the host names. Callers run these on a blocking
//! thread: they read files and some wait for a program.

pub mod cpu;
pub mod fs;
pub mod memory;
pub mod net;
pub mod os;
pub mod power;
pub mod time;
pub mod users;

use std::ffi::OsString;
use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;

use nix::errno::Errno;
use qga_wire::QgaError;
use serde_json::Value;

/// Sets the wall clock; a fake in tests, so that no test ever sets the machine's clock.
pub trait WallClock: Send + Sync {
    /// Sets the clock to `secs` seconds and `nanos` nanoseconds after the epoch.
    fn set(&self, secs: i64, nanos: i64) -> Result<(), Errno>;
}

/// The kernel's `CLOCK_REALTIME`.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn set(&self, secs: i64, nanos: i64) -> Result<(), Errno> {
        kmod_shim::clock::set_wall_clock(secs, nanos)
    }
}

/// Where the platform commands look.
#[derive(Clone)]
pub struct Host {
    /// The root: `etc/os-release`, `usr/lib/os-release`, `var/run/utmp`, `sbin/shutdown`,
    /// `sbin/hwclock` are under it. `/` but in tests.
    pub root: PathBuf,
    /// sysfs (`devices/system/cpu`, `devices/system/memory`, `power/state`).
    pub sysfs: PathBuf,
    /// procfs (`net/dev`).
    pub procfs: PathBuf,
    /// An os-release file to read instead of the usual two (qemu-ga's `$QGA_OS_RELEASE`).
    pub os_release: Option<PathBuf>,
    /// Where `systemctl` and the pm-utils programs are looked for; `None`: `$PATH`.
    pub search_path: Option<OsString>,
    /// The clock `guest-set-time` sets.
    pub clock: Arc<dyn WallClock>,
}

impl Host {
    /// The running system, with sysfs at `sysfs` (the agent's configured one).
    pub fn system(sysfs: &Path) -> Host {
        Host {
            root: "/".into(),
            sysfs: sysfs.to_path_buf(),
            procfs: "/proc".into(),
            os_release: std::env::var_os("QGA_OS_RELEASE").map(PathBuf::from),
            search_path: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// A path under the root (`rel` without a leading slash).
    fn under_root(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

/// qemu-ga's `error_setg_errno`: the message, a colon, and the C library's text for `errno`
/// (no Rust "(os error N)" suffix).
pub(crate) fn os_error(what: impl Display, errno: Errno) -> QgaError {
    QgaError::generic(format!("{what}: {}", errno.desc()))
}

/// [`os_error`] for an `io::Error` (its errno; EIO when it has none).
pub(crate) fn io_error(what: impl Display, e: &io::Error) -> QgaError {
    os_error(what, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
}

/// A double as QEMU's JSON writer prints it (`%.17g`): an integral value has no fraction,
/// so `1700000000.0` goes out as `1700000000`, as qemu-ga sends it.
pub(crate) fn qemu_double(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
    }
}

/// Runs `program args...` as qemu-ga runs its helpers: in a session of its own, stdin,
/// stdout and stderr on /dev/null; waits for it.
pub(crate) fn run_detached(program: &Path, args: &[&str]) -> io::Result<ExitStatus> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    kmod_shim::process::in_new_session(&mut cmd);
    cmd.status()
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fake root for the tests: files written under a temporary directory.
    use super::*;
    use std::sync::Mutex;

    /// Records what it was asked to set; never touches the machine's clock.
    #[derive(Default)]
    pub struct FakeClock {
        pub set_to: Mutex<Vec<(i64, i64)>>,
        pub fail: Option<Errno>,
    }

    impl WallClock for FakeClock {
        fn set(&self, secs: i64, nanos: i64) -> Result<(), Errno> {
            self.set_to.lock().unwrap().push((secs, nanos));
            self.fail.map_or(Ok(()), Err)
        }
    }

    /// A host whose root, sysfs, procfs and search path are all under `dir`.
    pub fn host(dir: &Path) -> Host {
        Host {
            root: dir.join("root"),
            sysfs: dir.join("sys"),
            procfs: dir.join("proc"),
            os_release: None,
            search_path: Some(dir.join("bin").into_os_string()),
            clock: Arc::new(FakeClock::default()),
        }
    }

    /// Writes `content` to `dir/rel`, making the directories.
    pub fn write(dir: &Path, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Writes an executable shell script to `dir/rel`. A child process writes it: a file
    /// this (multi-threaded) process had open for writing could be inherited by another
    /// test's fork, and executing it would then fail with ETXTBSY.
    pub fn script(dir: &Path, rel: &str, body: &str) -> PathBuf {
        use std::io::Write;
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_extension("new");
        let mut child = Command::new("sh")
            .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&tmp)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("#!/bin/sh\n{body}\n").as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        std::fs::rename(&tmp, &p).unwrap();
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn doubles_go_out_as_qemu_prints_them() {
        assert_eq!(qemu_double(1_700_000_000.0).to_string(), "1700000000");
        assert_eq!(qemu_double(1_700_000_000.25), json!(1_700_000_000.25));
        assert_eq!(qemu_double(0.0).to_string(), "0");
    }

    #[test]
    fn os_errors_read_like_strerror() {
        assert_eq!(os_error("open(\"/x\")", Errno::ENOENT).desc, "open(\"/x\"): No such file or directory");
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(io_error("pread", &e).desc, "pread: Permission denied");
    }
}
