//! Hook scripts: executables run with `freeze` before the filesystems freeze and with `thaw`
//! after they thaw, as qemu-ga's `fsfreeze-hook.d` scripts are (and from the same directory,
//! `/etc/qemu/fsfreeze-hook.d`, besides vssd's own `/etc/vssd/hooks.d`).
//!
//! Invariants: each hook has a deadline; a hook that overruns is killed with its whole process
//! group and reported; thaw hooks always run, in reverse order, whatever happened before;
//! hook output goes to the log, never to a file.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    // Drain both pipes on threads so a chatty hook cannot block on a full pipe.
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_t = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let end = t + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
        }
    };
    r.ms = (t.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    // A killed hook's grandchildren may keep the pipes open; do not wait for them forever.
    let mut text = Vec::new();
    for h in [out_t, err_t] {
        if status.is_some() || h.is_finished() {
            text.extend(h.join().unwrap_or_default());
        }
    }
    let s = String::from_utf8_lossy(&text);
    let s = s.trim();
    r.output = if s.len() > OUTPUT_KEEP {
        let mut cut = s.len() - OUTPUT_KEEP;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        format!("...{}", &s[cut..])
    } else {
        s.to_string()
    };
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
}
