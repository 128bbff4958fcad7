//! vssd under a service manager: what it tells systemd over `$NOTIFY_SOCKET`, seen on a
//! datagram socket the test binds in place of systemd's: READY=1 only once the channel
//! accepts connections, STATUS= through a real freeze and thaw of loop filesystems and after
//! an auto-thaw, WATCHDOG=1 at half of WATCHDOG_USEC (none without it), none while vssd is stopped
//! (SIGSTOP: a hung vssd must let systemd's watchdog fire), STOPPING=1 on SIGTERM.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tests::*;

/// The service manager's end: every datagram vssd sends, with when it arrived.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<(Instant, String)>,
}

impl FakeSystemd {
    fn bind(sb: &Sandbox) -> FakeSystemd {
        let path = sb.root().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the fake NOTIFY_SOCKET");
        FakeSystemd { sock, path, seen: Vec::new() }
    }

    /// The next datagram within `limit`, if any.
    fn next(&mut self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit.max(Duration::from_millis(1)))).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((Instant::now(), m.clone()));
                Some(m)
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) => panic!("reading the fake NOTIFY_SOCKET: {e}"),
        }
    }

    /// Reads until a datagram has a line for which `want` holds; returns that line.
    fn wait_for(&mut self, what: &str, limit: Duration, want: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {what} within {limit:?}; vssd sent: {:#?}", self.texts());
            }
            if let Some(m) = self.next(left) {
                if let Some(l) = m.lines().find(|l| want(l)) {
                    return l.to_string();
                }
            }
        }
    }

    fn status(&mut self, what: &str, limit: Duration, want: impl Fn(&str) -> bool) -> String {
        let l = self.wait_for(what, limit, |l| l.strip_prefix("STATUS=").is_some_and(&want));
        l["STATUS=".len()..].to_string()
    }

    fn texts(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, m)| m.as_str()).collect()
    }
}

/// A vssd on the sandbox (scope `mnt/`, its own state and hooks directories, a unix channel)
/// with `env` set; killed on drop, before the sandbox (declared first) thaws and goes.
struct Agent {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(sb: &Sandbox, notify: &Path, deadline_s: u64, env: &[(&str, &str)]) -> Agent {
        let socket = sb.root().join("qga.sock");
        let log = sb.root().join("vssd.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin("vssd"));
        cmd.arg("--channel")
            .arg(format!("unix:{}", socket.display()))
            .arg("--scope")
            .arg(sb.scope())
            .arg("--freeze-deadline")
            .arg(deadline_s.to_string())
            .arg("--state-dir")
            .arg(sb.state_dir())
            .arg("--hooks-dir")
            .arg(sb.hooks_dir())
            .arg("-v")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env("NOTIFY_SOCKET", notify)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("start vssd");
        Agent { child: Some(child), socket, log }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn signal(&self, s: Signal) {
        kill(self.pid(), s).unwrap_or_else(|e| panic!("{s} to vssd: {e}"));
    }

    fn client(&self) -> QgaClient {
        QgaClient::connect(&self.socket).unwrap_or_else(|e| panic!("connect to vssd: {}", chain(&e)))
    }

    /// Waits for the exit (after SIGTERM); true if it exited with 0.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let c = self.child.as_mut().unwrap();
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("vssd did not exit within {limit:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- vssd log:\n{}--- end", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn ready_status_and_stopping_follow_a_real_freeze_and_thaw() {
    require_root!();
    let sb = Sandbox::new("notify_states");
    let (e, x) = (sb.ext4("e"), sb.xfs("x"));
    let mut systemd = FakeSystemd::bind(&sb);
    let mut vssd = Agent::start(&sb, &systemd.path, 10, &[]);

    let ready = systemd.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    assert_eq!(ready, "READY=1");
    // systemd starts what depends on vssd at READY=1: the channel must already accept.
    UnixStream::connect(&vssd.socket).expect("the channel accepts connections once READY=1 is sent");
    let first = systemd.seen.last().unwrap().1.clone();
    assert!(first.contains("STATUS=thawed, no apps registered"), "READY=1 comes with the first STATUS: {first:?}");

    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let frozen = systemd.status("a frozen STATUS", Duration::from_secs(5), |s| s.starts_with("frozen"));
    assert!(
        frozen.starts_with("frozen: 2 filesystems, thaw deadline in ") && frozen.ends_with(" s"),
        "frozen STATUS in words: {frozen:?}"
    );
    let secs: u64 = frozen["frozen: 2 filesystems, thaw deadline in ".len()..frozen.len() - 2].parse().unwrap();
    assert!((8..=10).contains(&secs), "deadline 10 s, just frozen: {frozen:?}");
    // The countdown moves while frozen.
    let later = systemd.status("the countdown", Duration::from_secs(4), |s| s.starts_with("frozen") && s != frozen);
    assert!(later.starts_with("frozen: 2 filesystems, thaw deadline in "), "{later:?}");
    assert!(frozen_by_someone(&e) && frozen_by_someone(&x), "STATUS says frozen: so are the filesystems");

    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
    let thawed = systemd.status("a thawed STATUS", Duration::from_secs(5), |s| s.starts_with("thawed"));
    assert_eq!(thawed, "thawed, no apps registered");

    // Stop while frozen: STOPPING=1 first, then the thaw (and the STATUS saying why).
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    systemd.status("frozen again", Duration::from_secs(5), |s| s.starts_with("frozen"));
    vssd.signal(Signal::SIGTERM);
    let stopping = systemd.wait_for("STOPPING=1", Duration::from_secs(10), |l| l == "STOPPING=1");
    assert_eq!(stopping, "STOPPING=1");
    let said = systemd.seen.last().unwrap().1.clone();
    assert!(said.contains("STATUS=stopping: thawing 2 filesystem(s) first"), "STOPPING=1 says what happens: {said:?}");
    assert!(vssd.wait_exit(Duration::from_secs(15)), "vssd exits 0 on SIGTERM");
    assert_writable(&e, THAWED, "after SIGTERM while frozen");
    assert_writable(&x, THAWED, "after SIGTERM while frozen");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn status_says_why_after_an_auto_thaw() {
    require_root!();
    let sb = Sandbox::new("notify_autothaw");
    let e = sb.ext4("e");
    let mut systemd = FakeSystemd::bind(&sb);
    let vssd = Agent::start(&sb, &systemd.path, 2, &[]);
    systemd.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    let frozen = systemd.status("a frozen STATUS", Duration::from_secs(5), |s| s.starts_with("frozen"));
    assert!(frozen.starts_with("frozen: 1 filesystem, thaw deadline in "), "{frozen:?}");
    // No thaw: the 2 s deadline thaws by itself, and STATUS says so.
    let after = systemd.status("the auto-thaw STATUS", Duration::from_secs(8), |s| s.starts_with("thawed"));
    assert_eq!(after, "thawed, no apps registered; last auto-thaw: the freeze deadline passed");
    assert_writable(&e, THAWED, "after the auto-thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn watchdog_pings_at_half_the_timeout_and_never_while_vssd_is_stopped() {
    require_root!();
    let sb = Sandbox::new("notify_watchdog");
    let mut systemd = FakeSystemd::bind(&sb);
    // WATCHDOG_USEC=2 s: a ping every second.
    let vssd = Agent::start(&sb, &systemd.path, 10, &[("WATCHDOG_USEC", "2000000")]);
    systemd.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    let pings = |s: &mut FakeSystemd, for_: Duration| -> Vec<Instant> {
        let end = Instant::now() + for_;
        let mut at = Vec::new();
        while let Some(m) = s.next(end.saturating_duration_since(Instant::now())) {
            if m.lines().any(|l| l == "WATCHDOG=1") {
                at.push(Instant::now());
            }
            if Instant::now() >= end {
                break;
            }
        }
        at
    };
    let at = pings(&mut systemd, Duration::from_secs(5));
    assert!((4..=7).contains(&at.len()), "5 s at one ping per second: {} pings", at.len());
    let mean = (at[at.len() - 1] - at[0]) / (at.len() as u32 - 1);
    assert!(
        mean >= Duration::from_millis(850) && mean <= Duration::from_millis(1250),
        "pings WATCHDOG_USEC/2 apart on average: {mean:?}"
    );
    // What systemd needs: never a gap as long as the timeout (slack for a loaded machine).
    let longest = at.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(longest < Duration::from_millis(1700), "a gap of {longest:?} between pings");

    // Stopped: no runtime runs, so no ping (systemd's watchdog fires after 2 s).
    vssd.signal(Signal::SIGSTOP);
    // A ping already on its way may still arrive.
    let _ = pings(&mut systemd, Duration::from_millis(100));
    let while_stopped = pings(&mut systemd, Duration::from_secs(3));
    assert!(while_stopped.is_empty(), "{} pings while vssd was stopped", while_stopped.len());
    vssd.signal(Signal::SIGCONT);
    let resumed = pings(&mut systemd, Duration::from_millis(2500));
    assert!(resumed.len() >= 2, "pings resume after SIGCONT: {}", resumed.len());
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn no_watchdog_pings_unless_systemd_asks_for_them() {
    require_root!();
    let sb = Sandbox::new("notify_nowatchdog");
    let mut systemd = FakeSystemd::bind(&sb);
    let _vssd = Agent::start(&sb, &systemd.path, 10, &[]);
    systemd.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    while systemd.next(Duration::from_millis(1500)).is_some() {}
    assert!(
        !systemd.texts().iter().any(|m| m.contains("WATCHDOG=1")),
        "without WATCHDOG_USEC vssd must not ping: {:#?}",
        systemd.texts()
    );
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn thawed_status_counts_the_registered_apps() {
    use std::io::{BufRead, BufReader, Write};
    require_root!();
    let sb = Sandbox::new("notify_apps");
    let mut systemd = FakeSystemd::bind(&sb);
    let _vssd = Agent::start(&sb, &systemd.path, 10, &[]);
    systemd.wait_for("READY=1", Duration::from_secs(20), |l| l == "READY=1");
    // An app registers (appvss hello) and stays connected.
    let mut app = UnixStream::connect(sb.app_socket()).expect("connect to the app socket");
    app.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    app.write_all(b"{\"type\":\"hello\",\"id\":1,\"name\":\"notify-test\",\"min_version\":1,\"max_version\":1}\n")
        .unwrap();
    let mut welcome = String::new();
    BufReader::new(app.try_clone().unwrap()).read_line(&mut welcome).unwrap();
    assert!(welcome.contains("welcome"), "registered: {welcome}");
    // Registrations are not state changes: STATUS catches up within its 10 s refresh.
    let s = systemd.status("the app count", Duration::from_secs(15), |s| s != "thawed, no apps registered");
    assert_eq!(s, "thawed, 1 app registered");
    drop(app);
    let s = systemd.status("the app gone", Duration::from_secs(15), |s| s != "thawed, 1 app registered");
    assert_eq!(s, "thawed, no apps registered");
}
