//! The vssd fixture: a vssd for one sandbox, on a unix socket channel, and `vssctl` against
//! its control socket.
//!
//! Invariants: vssd always gets `--scope <sandbox>/mnt`, the sandbox's own state and hooks
//! directories and a freeze deadline of at most 10 s; it is killed in `Drop`, before its
//! sandbox is torn down (it borrows the sandbox, so the compiler drops it first), and on a
//! panic its log is printed.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use crate::cmd::{bin, run_with_limit, signal_and_wait, stop_child, wait_for_socket, Output};
use crate::qga::QgaClient;
use crate::sandbox::Sandbox;

/// How to start a vssd for a sandbox. The scope is always the sandbox's `mnt/`.
pub struct VssdBuilder<'a> {
    sb: &'a Sandbox,
    deadline_s: u64,
    grace_s: u64,
    extra: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
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

    /// An environment variable for vssd (the test-only `VSSD_TEST_FAULT`).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_os_string(), v.as_ref().to_os_string()));
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
        // Never this machine's system bus: a test that wants D-Bus names its private bus.
        if !self.extra.iter().any(|a| a == "--dbus-address") {
            args.push("--no-dbus".into());
        }
        args.extend(self.extra);
        let mut v = Vssd { sb, child: None, socket, args, env: self.env, log: sb.root().join("vssd.log") };
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
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
}

impl<'a> Vssd<'a> {
    /// Options, then `.start()`. Defaults: deadline 10 s, channel-drop grace 1 s.
    pub fn builder(sb: &'a Sandbox) -> VssdBuilder<'a> {
        VssdBuilder { sb, deadline_s: 10, grace_s: 1, extra: Vec::new(), env: Vec::new() }
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
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
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
        QgaClient::connect(&self.socket).unwrap_or_else(|e| panic!("connect to vssd: {}", crate::chain(&e)))
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
