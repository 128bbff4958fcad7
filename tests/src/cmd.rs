//! Running programs: a command to its end under a time limit with its output collected, the
//! workspace binaries under test (built on demand, so no earlier `cargo build` is needed), and
//! ending the daemons the fixtures start.
//!
//! Invariants: nothing here waits without a limit (a process stuck on a frozen filesystem must
//! not hang the suite), and a failure panics with everything the command printed.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

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
    let mut child = cmd.spawn().unwrap_or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => panic!("cannot start {desc}: it is not installed: run tests/setup.sh"),
        _ => panic!("cannot start {desc}: {e}"),
    });
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

/// The workspace's directory (relative paths in `$VSSD_BIN_DIR` and `$CARGO_TARGET_DIR` are
/// relative to it).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// Where `vssd` and `vssctl` are: `$VSSD_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else
/// `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    let workspace = workspace();
    if let Some(d) = std::env::var_os("VSSD_BIN_DIR") {
        return workspace.join(d);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return workspace.join(t).join("debug");
    }
    workspace.join("target").join("debug")
}

/// The path of a workspace binary (`vssd`, `vssctl`, `vmctl`), built first unless
/// `$VSSD_BIN_DIR` names binaries built elsewhere (the benchmarks' release builds).
pub fn bin(name: &str) -> PathBuf {
    if std::env::var_os("VSSD_BIN_DIR").is_none() {
        build_binaries();
    }
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!("{} not found: build it (`cargo build --workspace --bins`) or fix $VSSD_BIN_DIR", p.display());
    }
    p
}

/// Builds the binaries the fixtures run, once per test process. `cargo test -p tests` does
/// not build another package's binaries, and a binary left from an earlier build may be
/// stale: either way a test would run something other than the tree it tests.
fn build_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        // The cargo running the tests; a benchmark binary started by hand finds it on $PATH.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace());
        // --locked: the `cargo test` that started us has resolved Cargo.lock already; a test
        // must never rewrite it.
        cmd.args(["build", "--quiet", "--locked", "-p", "vssd", "-p", "hostsim", "--bins"]);
        run_with_limit(cmd, Duration::from_secs(1200)).expect_code(0, "cargo build -p vssd -p hostsim --bins");
    });
}

/// Waits until `path` accepts connections; panics with the child's log when it exits first or
/// the limit passes.
pub(crate) fn wait_for_socket(path: &Path, child: &mut Child, limit: Duration, log: &Path) {
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
pub(crate) fn signal_and_wait(child: &mut Child, sig: nix::sys::signal::Signal, limit: Duration) -> Option<ExitStatus> {
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
pub(crate) fn stop_child(child: &mut Child, term_grace: Duration) -> Option<ExitStatus> {
    use nix::sys::signal::Signal;
    signal_and_wait(child, Signal::SIGTERM, term_grace)
        .or_else(|| signal_and_wait(child, Signal::SIGKILL, Duration::from_secs(5)))
}
