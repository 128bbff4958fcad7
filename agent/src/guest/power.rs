//! `guest-shutdown` and `guest-suspend-{disk,ram,hybrid}`: the guest goes away, so a success
//! gets no reply; a failure does.
//!
//! Shutdown runs `/sbin/shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"` (powerdown
//! is the default) and waits for it. Suspend tries, in qemu-ga 7.2.x's order (with its
//! "suspend without systemd" fix): systemd (`systemctl status systemd-<mode>` exiting 1..3
//! means it is there, then `systemctl <mode>`), pm-utils (`pm-is-supported --<mode>`
//! exiting 0, then `pm-<mode>`), then `/sys/power/state` (`disk` or `mem` listed there, then
//! written; hybrid has no such state). The first that works ends it; when none claims the
//! mode, "not supported".

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;

use nix::unistd::{access, AccessFlags};
use qga_wire::{QgaError, ShutdownMode};
use tracing::info;

use super::{run_detached, Host};

/// `guest-shutdown`. Returns when `/sbin/shutdown` has accepted the request.
pub fn shutdown(host: &Host, mode: ShutdownMode) -> Result<(), QgaError> {
    let flag = match mode {
        ShutdownMode::Powerdown => "-P",
        ShutdownMode::Halt => "-H",
        ShutdownMode::Reboot => "-r",
    };
    info!(mode = ?mode, "guest-shutdown: running /sbin/shutdown -h {flag} +0");
    match run_detached(&host.under_root("sbin/shutdown"), &["-h", flag, "+0", "hypervisor initiated shutdown"]) {
        // qemu-ga forks and then execs: an exec that fails is a child exiting 1.
        Err(_) => Err(QgaError::generic("child process has failed to shutdown")),
        Ok(st) if st.code().is_none() => Err(QgaError::generic("child process has terminated abnormally")),
        Ok(st) if st.code() != Some(0) => Err(QgaError::generic("child process has failed to shutdown")),
        Ok(_) => Ok(()),
    }
}

/// What to suspend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendMode {
    /// `guest-suspend-disk`: hibernate.
    Disk,
    /// `guest-suspend-ram`: suspend to RAM.
    Ram,
    /// `guest-suspend-hybrid`: both.
    Hybrid,
}

impl SuspendMode {
    fn systemd_unit(self) -> &'static str {
        match self {
            SuspendMode::Disk => "systemd-hibernate",
            SuspendMode::Ram => "systemd-suspend",
            SuspendMode::Hybrid => "systemd-hybrid-sleep",
        }
    }
    fn systemctl_verb(self) -> &'static str {
        match self {
            SuspendMode::Disk => "hibernate",
            SuspendMode::Ram => "suspend",
            SuspendMode::Hybrid => "hybrid-sleep",
        }
    }
    fn pm_is_supported_flag(self) -> &'static str {
        match self {
            SuspendMode::Disk => "--hibernate",
            SuspendMode::Ram => "--suspend",
            SuspendMode::Hybrid => "--suspend-hybrid",
        }
    }
    fn pm_program(self) -> &'static str {
        match self {
            SuspendMode::Disk => "pm-hibernate",
            SuspendMode::Ram => "pm-suspend",
            SuspendMode::Hybrid => "pm-suspend-hybrid",
        }
    }
    fn sys_state(self) -> Option<&'static str> {
        match self {
            SuspendMode::Disk => Some("disk"),
            SuspendMode::Ram => Some("mem"),
            SuspendMode::Hybrid => None,
        }
    }
}

/// How a helper run went, as qemu-ga's `run_process_child` sees it: its exit code, or not
/// found on the search path, or an error starting it.
enum Run {
    Exited(i32),
    NotFound,
    Failed(QgaError),
}

impl Host {
    /// `name` on the search path, as `execvp` looks for it.
    fn find_program(&self, name: &str) -> Result<Option<PathBuf>, std::io::Error> {
        let path: OsString = self
            .search_path
            .clone()
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        let mut denied = None;
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if !p.is_file() {
                continue;
            }
            match access(&p, AccessFlags::X_OK) {
                Ok(()) => return Ok(Some(p)),
                Err(e) => denied = Some(std::io::Error::from(e)),
            }
        }
        denied.map_or(Ok(None), Err)
    }

    fn run_helper(&self, name: &str, args: &[&str]) -> Run {
        let start_failed = |e: std::io::Error| {
            let why = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)).desc();
            Run::Failed(QgaError::generic(format!(
                "failed to create child process, error 'Failed to execute child process \u{201c}{name}\u{201d} ({why})'"
            )))
        };
        let program = match self.find_program(name) {
            Ok(Some(p)) => p,
            Ok(None) => return Run::NotFound,
            Err(e) => return start_failed(e),
        };
        match run_detached(&program, args) {
            Err(e) => start_failed(e),
            // qemu-ga takes WEXITSTATUS of whatever ended the child: a signal reads as 0.
            Ok(st) => Run::Exited(st.code().unwrap_or(0)),
        }
    }

    fn systemd_supports(&self, mode: SuspendMode) -> bool {
        // LSB codes of `systemctl status`: 1..3 is a unit that exists; 4 is no such unit.
        matches!(self.run_helper("systemctl", &["status", mode.systemd_unit()]), Run::Exited(1..=3))
    }

    fn systemd_suspend(&self, mode: SuspendMode) -> Result<(), QgaError> {
        let verb = mode.systemctl_verb();
        match self.run_helper("systemctl", &[verb]) {
            Run::Exited(0) => Ok(()),
            Run::NotFound => Err(QgaError::generic(format!("the helper program 'systemctl {verb}' was not found"))),
            Run::Failed(e) => Err(e),
            Run::Exited(n) => Err(QgaError::generic(format!(
                "the helper program 'systemctl {verb}' returned an unexpected exit status code ({n})"
            ))),
        }
    }

    fn pmutils_supports(&self, mode: SuspendMode) -> bool {
        matches!(self.run_helper("pm-is-supported", &[mode.pm_is_supported_flag()]), Run::Exited(0))
    }

    fn pmutils_suspend(&self, mode: SuspendMode) -> Result<(), QgaError> {
        let prog = mode.pm_program();
        match self.run_helper(prog, &[]) {
            Run::Exited(0) => Ok(()),
            Run::NotFound => Err(QgaError::generic(format!("the helper program '{prog}' was not found"))),
            Run::Failed(e) => Err(e),
            Run::Exited(n) => Err(QgaError::generic(format!(
                "the helper program '{prog}' returned an unexpected exit status code ({n})"
            ))),
        }
    }

    fn sys_state_supports(&self, mode: SuspendMode) -> Result<bool, QgaError> {
        let Some(word) = mode.sys_state() else { return Err(QgaError::generic("unknown guest suspend mode")) };
        let Ok(mut f) = std::fs::File::open(self.sysfs.join("power/state")) else { return Ok(false) };
        let mut buf = [0u8; 31];
        let n = f.read(&mut buf).unwrap_or(0);
        Ok(buf[..n].windows(word.len()).any(|w| w == word.as_bytes()))
    }

    fn sys_state_suspend(&self, mode: SuspendMode) -> Result<(), QgaError> {
        let word = mode.sys_state().ok_or_else(|| QgaError::generic("unknown guest suspend mode"))?;
        // qemu-ga writes from a child process, whose failure is this one message.
        OpenOptions::new()
            .write(true)
            .open(self.sysfs.join("power/state"))
            .and_then(|mut f| f.write_all(word.as_bytes()))
            .map_err(|_| QgaError::generic("child process has failed to suspend"))
    }
}

/// `guest-suspend-*`. Returns after the guest has resumed (or the helper has queued the
/// suspend), or with why it could not.
pub fn suspend(host: &Host, mode: SuspendMode) -> Result<(), QgaError> {
    info!(mode = ?mode, "guest-suspend");
    let mut supported = false;
    if host.systemd_supports(mode) {
        supported = true;
        if host.systemd_suspend(mode).is_ok() {
            return Ok(());
        }
    }
    if host.pmutils_supports(mode) {
        supported = true;
        if host.pmutils_suspend(mode).is_ok() {
            return Ok(());
        }
    }
    let last = match host.sys_state_supports(mode) {
        Ok(true) => {
            supported = true;
            host.sys_state_suspend(mode).err()
        }
        Ok(false) => None,
        Err(e) => Some(e),
    };
    if !supported {
        return Err(QgaError::generic("the requested suspend mode is not supported by the guest"));
    }
    // As qemu-ga: once some method claimed the mode, only the sysfs step's error is reported
    // (none when that step did not apply, even if an earlier method failed).
    last.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{host, script, write};
    use super::*;

    fn log_of(d: &std::path::Path) -> String {
        std::fs::read_to_string(d.join("log")).unwrap_or_default()
    }

    /// A fake helper on the search path that logs its name and arguments, then exits `code`.
    fn helper(d: &std::path::Path, name: &str, code: i32) {
        script(d, &format!("bin/{name}"), &format!("echo {name} \"$@\" >> {}/log; exit {code}", d.display()));
    }

    #[test]
    fn shutdown_runs_sbin_shutdown_with_qemu_gas_arguments() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        assert_eq!(shutdown(&h, ShutdownMode::Powerdown).unwrap_err().desc, "child process has failed to shutdown");
        script(d.path(), "root/sbin/shutdown", &format!("echo \"$@\" >> {}/log", d.path().display()));
        for m in [ShutdownMode::Powerdown, ShutdownMode::Halt, ShutdownMode::Reboot] {
            shutdown(&h, m).unwrap();
        }
        assert_eq!(
            log_of(d.path()),
            "-h -P +0 hypervisor initiated shutdown\n-h -H +0 hypervisor initiated shutdown\n-h -r +0 hypervisor initiated shutdown\n"
        );
        script(d.path(), "root/sbin/shutdown", "exit 1");
        assert_eq!(shutdown(&h, ShutdownMode::Reboot).unwrap_err().desc, "child process has failed to shutdown");
        script(d.path(), "root/sbin/shutdown", "kill -KILL $$");
        assert_eq!(shutdown(&h, ShutdownMode::Halt).unwrap_err().desc, "child process has terminated abnormally");
    }

    #[test]
    fn the_helper_runs_in_a_session_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        // Field 6 of /proc/PID/stat is the session id: the script's own pid.
        script(
            d.path(),
            "root/sbin/shutdown",
            &format!("[ \"$(cut -d' ' -f6 /proc/$$/stat)\" = \"$$\" ] || exit 7; echo ok > {}/log", d.path().display()),
        );
        shutdown(&h, ShutdownMode::Powerdown).unwrap();
        assert_eq!(log_of(d.path()), "ok\n");
    }

    #[test]
    fn nothing_to_suspend_with_is_not_supported() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        for m in [SuspendMode::Disk, SuspendMode::Ram, SuspendMode::Hybrid] {
            assert_eq!(suspend(&h, m).unwrap_err().desc, "the requested suspend mode is not supported by the guest");
        }
        // systemd without the unit (status 4) and pm-utils saying no: still not supported.
        helper(d.path(), "systemctl", 4);
        helper(d.path(), "pm-is-supported", 1);
        write(d.path(), "sys/power/state", "freeze standby\n");
        assert_eq!(
            suspend(&h, SuspendMode::Ram).unwrap_err().desc,
            "the requested suspend mode is not supported by the guest"
        );
        assert_eq!(log_of(d.path()), "systemctl status systemd-suspend\npm-is-supported --suspend\n");
    }

    #[test]
    fn systemd_comes_first_when_it_has_the_unit() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        // `systemctl status` of an inactive unit exits 3; `systemctl hibernate` then works.
        script(
            d.path(),
            "bin/systemctl",
            &format!("echo systemctl \"$@\" >> {}/log; [ \"$1\" = status ] && exit 3; exit 0", d.path().display()),
        );
        helper(d.path(), "pm-is-supported", 0);
        suspend(&h, SuspendMode::Disk).unwrap();
        assert_eq!(log_of(d.path()), "systemctl status systemd-hibernate\nsystemctl hibernate\n");
    }

    #[test]
    fn without_systemd_pm_utils_then_sys_power_state_are_tried() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        helper(d.path(), "pm-is-supported", 0);
        helper(d.path(), "pm-suspend-hybrid", 0);
        suspend(&h, SuspendMode::Hybrid).unwrap();
        assert_eq!(log_of(d.path()), "pm-is-supported --suspend-hybrid\npm-suspend-hybrid\n");

        // pm-utils fails: /sys/power/state gets the mode's word (written over the start, no
        // truncation, as qemu-ga opens it).
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        helper(d.path(), "pm-is-supported", 0);
        helper(d.path(), "pm-suspend", 1);
        let state = write(d.path(), "sys/power/state", "freeze mem disk\n");
        suspend(&h, SuspendMode::Ram).unwrap();
        assert!(std::fs::read_to_string(&state).unwrap().starts_with("mem"));
        write(d.path(), "sys/power/state", "freeze mem disk\n");
        suspend(&h, SuspendMode::Disk).unwrap_or_else(|e| panic!("{e}"));
        assert!(std::fs::read_to_string(&state).unwrap().starts_with("disk"));
        // Hybrid has no state word: pm-utils claimed the mode, so sysfs's refusal is the answer.
        helper(d.path(), "pm-suspend-hybrid", 1);
        assert_eq!(suspend(&h, SuspendMode::Hybrid).unwrap_err().desc, "unknown guest suspend mode");
    }

    #[test]
    fn only_sys_power_state_listing_the_mode_is_enough() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        let state = write(d.path(), "sys/power/state", "freeze mem\n");
        assert_eq!(
            suspend(&h, SuspendMode::Disk).unwrap_err().desc,
            "the requested suspend mode is not supported by the guest"
        );
        suspend(&h, SuspendMode::Ram).unwrap();
        assert!(std::fs::read_to_string(&state).unwrap().starts_with("mem"));
        // A state file that cannot be read lists nothing.
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        assert_eq!(
            suspend(&h, SuspendMode::Ram).unwrap_err().desc,
            "the requested suspend mode is not supported by the guest"
        );
    }

    #[test]
    fn a_helper_that_cannot_start_is_reported_as_glib_reports_it() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path());
        write(d.path(), "bin/pm-suspend", "not executable");
        assert!(matches!(h.run_helper("pm-suspend", &[]), Run::Failed(e) if e.desc ==
            "failed to create child process, error 'Failed to execute child process \u{201c}pm-suspend\u{201d} (Permission denied)'"));
        assert!(matches!(h.run_helper("nothing-here", &[]), Run::NotFound));
    }
}
