//! The write probe: a thread that writes and fsyncs a file in a mount. On a frozen filesystem
//! the write blocks until the thaw; that is how the tests see "frozen" from the outside, the
//! way an application would.
//!
//! Invariant: a probe never blocks its test for longer than asked; a blocked probe thread
//! finishes on its own once the sandbox thaws.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a write must stay blocked to count as "frozen".
pub const BLOCKED: Duration = Duration::from_millis(800);
/// How long a write may take to complete once the filesystem is thawed.
pub const THAWED: Duration = Duration::from_secs(10);

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
