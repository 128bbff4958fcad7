//! Hook scripts: executables run with `freeze` before the filesystems freeze and with `thaw`
//! after they thaw, as qemu-ga's `fsfreeze-hook.d` scripts are (and from the same directory,
//! `/etc/qemu/fsfreeze-hook.d`, besides vssd's own `/etc/vssd/hooks.d`).
//!
//! Invariants: each hook has a deadline; a hook that overruns is killed with its whole process
//! group and reported; thaw hooks always run, in reverse order, whatever happened before;
//! hook output goes to the log, never to a file.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use tracing::{info, warn};

/// How a hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookOutcome {
    Ok,
    Failed,
    Timeout,
    NotStarted,
}

/// One hook's run, for the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HookRun {
    pub path: String,
    pub phase: &'static str,
    pub outcome: HookOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub ms: f64,
    /// The end of what it printed (stdout and stderr), for the report.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub output: String,
}

const OUTPUT_KEEP: usize = 2048;

/// The hooks to run, in name order: executable regular files in `dirs`, leaving out editor
/// and package-manager leftovers, as run-parts does.
pub fn discover(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                || name.ends_with('~')
                || [".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp", ".rpmnew", ".rpmsave", ".swp", ".bak"]
                    .iter()
                    .any(|s| name.ends_with(s))
            {
                continue;
            }
            let Ok(md) = std::fs::metadata(e.path()) else { continue };
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                all.push(e.path());
            }
        }
    }
    all.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then(a.cmp(b)));
    all
}

/// Runs each hook with `phase` as its argument, one after another, each under `deadline`.
/// Freeze hooks run in order and stop at the first failure (what it guarded is not ready);
/// thaw hooks run in reverse order and all of them run.
pub fn run(hooks: &[PathBuf], phase: &'static str, deadline: Duration) -> Vec<HookRun> {
    let mut out = Vec::new();
    let ordered: Vec<&PathBuf> = if phase == "thaw" { hooks.iter().rev().collect() } else { hooks.iter().collect() };
    for h in ordered {
        let r = run_one(h, phase, deadline);
        let failed = r.outcome != HookOutcome::Ok;
        match r.outcome {
            HookOutcome::Ok => info!(hook = %r.path, phase, ms = r.ms, "hook done"),
            _ => {
                warn!(hook = %r.path, phase, outcome = ?r.outcome, exit = ?r.exit_code, output = %r.output, "hook failed")
            }
        }
        out.push(r);
        if failed && phase == "freeze" {
            break;
        }
    }
    out
}

fn run_one(path: &Path, phase: &'static str, deadline: Duration) -> HookRun {
    let t = Instant::now();
    let mut r = HookRun {
        path: path.display().to_string(),
        phase,
        outcome: HookOutcome::NotStarted,
        exit_code: None,
        ms: 0.0,
        output: String::new(),
    };
    let child = Command::new(path)
        .arg(phase)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("VSSD_PHASE", phase)
        // Its own process group: a timeout kills the hook and everything it started.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            r.output = format!("cannot start: {e}");
            return r;
        }
    };
    // Both pipes read here, non-blocking, keeping only the end of each: a chatty hook never
    // blocks on a full pipe nor fills vssd's memory, and a child that outlives the hook with
    // the pipes still open does not hold the hook (or the freeze) up once the hook exits.
    let mut pipes: Vec<Tail> = [child.stdout.take().map(OwnedFd::from), child.stderr.take().map(OwnedFd::from)]
        .into_iter()
        .flatten()
        .filter_map(Tail::new)
        .collect();
    let end = t + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => Tail::wait(&mut pipes, Duration::from_millis(2)),
            _ => {
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
        }
    };
    r.ms = (t.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    // What is left in the pipes now; nothing more is waited for.
    for p in &mut pipes {
        p.read_available();
    }
    // The end of each stream (half the room each when both spoke).
    let text: Vec<String> =
        pipes.iter().map(|p| String::from_utf8_lossy(&p.buf).trim().to_string()).filter(|s| !s.is_empty()).collect();
    let room = OUTPUT_KEEP / text.len().max(1);
    r.output = text.iter().map(|s| tail_of(s, room)).collect::<Vec<_>>().join("\n");
    match status {
        Some(st) => {
            r.exit_code = st.code();
            r.outcome = if st.success() { HookOutcome::Ok } else { HookOutcome::Failed };
        }
        None => {
            r.outcome = HookOutcome::Timeout;
            r.output = format!("killed after {} s (hook-deadline); {}", deadline.as_secs_f64(), r.output);
        }
    }
    r
}

/// The last `room` bytes of `s` (on a character boundary), marked `...` when cut.
fn tail_of(s: &str, room: usize) -> String {
    if s.len() <= room {
        return s.to_string();
    }
    let mut cut = s.len() - room;
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &s[cut..])
}

/// One of a hook's output pipes, non-blocking, keeping the last `OUTPUT_KEEP` bytes.
struct Tail {
    fd: OwnedFd,
    buf: Vec<u8>,
    open: bool,
}

impl Tail {
    fn new(fd: OwnedFd) -> Option<Tail> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).ok()?;
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK)).ok()?;
        Some(Tail { fd, buf: Vec::new(), open: true })
    }

    /// Waits up to `limit` for output on any pipe, and reads what came.
    fn wait(pipes: &mut [Tail], limit: Duration) {
        let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
        let ready = {
            let mut fds: Vec<PollFd> =
                pipes.iter().filter(|p| p.open).map(|p| PollFd::new(p.fd.as_fd(), PollFlags::POLLIN)).collect();
            if fds.is_empty() {
                std::thread::sleep(limit);
                return;
            }
            poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0
        };
        if ready {
            for p in pipes.iter_mut() {
                p.read_available();
            }
        }
    }

    /// Reads until the pipe is empty (or closed), keeping the end.
    fn read_available(&mut self) {
        let mut chunk = [0u8; 16384];
        while self.open {
            match nix::unistd::read(&self.fd, &mut chunk) {
                Ok(0) => self.open = false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > 2 * OUTPUT_KEEP {
                        self.buf.drain(..self.buf.len() - OUTPUT_KEEP);
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break, // EAGAIN: nothing more for now
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn discovers_executables_in_name_order_and_skips_leftovers() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "20-b", "true");
        script(d.path(), "10-a", "true");
        script(d.path(), "30-c.dpkg-old", "true");
        script(d.path(), ".hidden", "true");
        std::fs::write(d.path().join("40-not-exec"), "x").unwrap();
        let names: Vec<_> = discover(&[d.path().into(), "/nonexistent".into()])
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["10-a", "20-b"]);
    }

    #[test]
    fn hooks_get_the_phase_and_thaw_runs_in_reverse() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let l = log.display();
        script(d.path(), "10-a", &format!("echo a $1 >> {l}"));
        script(d.path(), "20-b", &format!("echo b $1 >> {l}"));
        let hooks = discover(&[d.path().into()]);
        assert!(run(&hooks, "freeze", Duration::from_secs(5)).iter().all(|r| r.outcome == HookOutcome::Ok));
        run(&hooks, "thaw", Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "a freeze\nb freeze\nb thaw\na thaw\n");
    }

    #[test]
    fn a_failing_freeze_hook_stops_the_freeze_hooks_and_reports_its_output() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "10-fail", "echo 'database not ready' >&2; exit 3");
        script(d.path(), "20-never", "true");
        let r = run(&discover(&[d.path().into()]), "freeze", Duration::from_secs(5));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, HookOutcome::Failed);
        assert_eq!(r[0].exit_code, Some(3));
        assert_eq!(r[0].output, "database not ready");
    }

    #[test]
    fn a_hung_hook_is_killed_with_its_children_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        script(d.path(), "10-hang", "sleep 30 & sleep 30");
        let t = Instant::now();
        let r = run(&discover(&[d.path().into()]), "thaw", Duration::from_millis(300));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(r[0].outcome, HookOutcome::Timeout);
        assert!(r[0].output.contains("killed"), "{}", r[0].output);
    }

    #[test]
    fn a_hook_whose_child_outlives_it_is_done_when_the_hook_exits_not_when_the_child_does() {
        let d = tempfile::tempdir().unwrap();
        // The child keeps the hook's stdout and stderr open for 20 s.
        script(d.path(), "10-daemon", "echo started; sleep 20 & exit 0");
        let t = Instant::now();
        let r = run(&discover(&[d.path().into()]), "freeze", Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(3), "waited {:?} for the hook's child", t.elapsed());
        assert_eq!(r[0].outcome, HookOutcome::Ok);
        assert_eq!(r[0].output, "started");
    }

    #[test]
    fn a_hook_that_prints_megabytes_is_not_held_up_and_only_the_end_of_its_output_is_kept() {
        let d = tempfile::tempdir().unwrap();
        // 32 MiB on stdout, 8 MiB on stderr, then a last line.
        script(
            d.path(),
            "10-chatty",
            "head -c 33554432 /dev/zero | tr '\\0' x; echo; echo OUT-END; head -c 8388608 /dev/zero | tr '\\0' e >&2; echo ERR-END >&2",
        );
        let t = Instant::now();
        let r = run(&discover(&[d.path().into()]), "freeze", Duration::from_secs(20));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(r[0].outcome, HookOutcome::Ok, "{}", &r[0].output[..100.min(r[0].output.len())]);
        let o = &r[0].output;
        assert!(
            o.contains("OUT-END\n") && o.ends_with("ERR-END"),
            "kept the end of each stream: {}",
            &o[o.len() - 80..]
        );
        assert!(o.len() <= OUTPUT_KEEP + 8, "{}", o.len());
    }
}
