//! Root tier: the appvss client side against a real vssd on real loop filesystems. The SQLite
//! example (`appvss/examples/sqlite_writer.rs`) under a freeze: a copy of its filesystem image
//! taken while frozen is clean, its database passes `integrity_check`, its WAL is empty, and it
//! holds every record acknowledged before the freeze. Also the C example (`hold.c` against
//! `libappvss.a`) and the CLI (`appvss hold --on-freeze / --hold`), and the Rust client
//! registering again after vssd restarts.
//!
//! The appvss binaries are built on demand (`cargo build -p appvss --bins --example
//! sqlite_writer`): `cargo test -p tests` alone does not build another package's examples.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// Builds appvss's binary, its static library and the SQLite example, once per test run.
fn appvss_artifacts() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "appvss", "--bins", "--example", "sqlite_writer"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build appvss's binaries and examples");
        bin_dir()
    })
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for the exit (at most `limit`); its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < end, "process {} did not exit within {limit:?}", self.0.id());
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Lines of a child's stdout, read on a thread.
fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines until one starts with `prefix`; returns it. `ack N` lines update `last_ack`.
fn until(rx: &mpsc::Receiver<String>, prefix: &str, last_ack: &mut u64) -> String {
    let end = Instant::now() + WAIT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let l = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no line starting {prefix:?} within {WAIT:?}"));
        if let Some(n) = l.strip_prefix("ack ") {
            *last_ack = n.parse().expect("ack number");
        }
        if l.starts_with(prefix) {
            return l;
        }
    }
}

/// Waits until vssd lists an app registered as `name`.
fn wait_registered(c: &mut QgaClient, name: &str) {
    let end = Instant::now() + WAIT;
    loop {
        let st = c.ok("vssd-status", None);
        if st["apps"].as_array().is_some_and(|a| a.iter().any(|e| e["name"] == name)) {
            return;
        }
        assert!(Instant::now() < end, "{name} never registered with vssd: {st}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn app_entry<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("app {name} not in report {report}"))
}

fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn sqlite_copy_taken_while_frozen_is_consistent_and_has_every_acked_record() {
    require_root!();
    let bins = appvss_artifacts();
    let sb = Sandbox::new("appsc_sqlite");
    let mnt = sb.ext4("db");
    let image = sb.root().join("images/db.img");
    let v = Vssd::start(&sb);
    let mut c = v.client();
    let mut writer = Proc(
        Command::new(bins.join("examples/sqlite_writer"))
            .arg(mnt.join("orders.db"))
            .args(["--interval-ms", "1", "--socket"])
            .arg(sb.app_socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sqlite_writer"),
    );
    let rx = lines(writer.0.stdout.take().unwrap());
    wait_registered(&mut c, "sqlite-writer");
    let mut acked = 0;
    until(&rx, "ack 300", &mut acked);

    let r = c.ok("vssd-freeze", None);
    assert_eq!(r["frozen"], 1, "{r}");
    assert_eq!(app_entry(&r, "sqlite-writer")["outcome"], "held", "{r}");
    assert_eq!(r["consistency"], "application", "{r}");
    let held = until(&rx, "held ", &mut acked);
    let n: u64 = held.rsplit("last_ack=").next().unwrap().parse().expect("last_ack");
    assert_eq!(n, acked, "the held line names the last ack printed before it: {held}");

    // The point in time: copy the image while the filesystem is frozen and the app holds.
    let _probe = assert_frozen(&mnt, Duration::from_millis(200), "ext4 under the SQLite writer");
    let copy = sb.outside().join("copy.img");
    std::fs::copy(&image, &copy).expect("copy the frozen image");
    assert!(rx.try_recv().is_err(), "the writer acknowledged a record while holding");

    c.ok("vssd-thaw", None);
    let thaw = until(&rx, "thaw ", &mut acked);
    assert!(thaw.ends_with(" completed"), "{thaw}");
    until(&rx, &format!("ack {}", n + 50), &mut acked);
    drop(writer);

    // The copy: a clean filesystem (the freeze flushed the journal), an empty WAL, every
    // acked record, no more.
    let fsck = run_unchecked("e2fsck", &[OsStr::new("-fn"), copy.as_os_str()]);
    assert_eq!(fsck.code, Some(0), "e2fsck of the frozen copy:\n{}\n{}", fsck.stdout, fsck.stderr);
    let dev = sb.attach_loop(&copy, false);
    let copy_mnt = sb.outside().join("copy");
    std::fs::create_dir_all(&copy_mnt).unwrap();
    sb.mount_raw(&[OsStr::new("-t"), OsStr::new("ext4"), dev.as_os_str()], &copy_mnt);
    let wal = std::fs::metadata(copy_mnt.join("orders.db-wal")).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal, 0, "the WAL in the frozen copy is not empty");
    let db = rusqlite::Connection::open(copy_mnt.join("orders.db")).expect("open the copy's database");
    let ok: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let (count, max): (u64, u64) =
        db.query_row("SELECT COUNT(*), MAX(n) FROM records", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((count, max), (n, n), "records 1..={n} were acked before the freeze");
    drop(db);
    drop(c);
    drop(v);
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn c_example_holds_a_real_freeze() {
    require_root!();
    let bins = appvss_artifacts();
    let sb = Sandbox::new("appsc_c");
    let e = sb.ext4("e");
    let v = Vssd::start(&sb);
    let mut c = v.client();
    let exe = sb.outside().join("hold");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../appvss");
    let cc = run_unchecked(
        "cc",
        &[
            OsStr::new("-std=c99"),
            OsStr::new("-Wall"),
            OsStr::new("-o"),
            exe.as_os_str(),
            src.join("examples/c/hold.c").as_os_str(),
            OsStr::new("-I"),
            src.join("include").as_os_str(),
            bins.join("libappvss.a").as_os_str(),
            OsStr::new("-lpthread"),
            OsStr::new("-ldl"),
            OsStr::new("-lm"),
            OsStr::new("-lrt"),
        ],
    );
    assert_eq!(cc.code, Some(0), "cc hold.c:\n{}", cc.stderr);
    let mut app = Proc(
        Command::new(&exe)
            .args(["--name", "c-app", "--once", "--socket"])
            .arg(sb.app_socket())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = lines(app.0.stdout.take().unwrap());
    wait_registered(&mut c, "c-app");
    let r = c.ok("vssd-freeze", None);
    assert_eq!(app_entry(&r, "c-app")["outcome"], "held", "{r}");
    let mut n = 0;
    until(&rx, "held freeze_id=", &mut n);
    let _probe = assert_frozen(&e, Duration::from_millis(200), "while the C app holds");
    c.ok("vssd-thaw", None);
    assert!(until(&rx, "thaw ", &mut n).ends_with("release=completed"));
    assert_eq!(app.wait(WAIT), Some(0));
    assert_writable(&e, Duration::from_secs(5), "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn cli_on_freeze_and_hold_process_bracket_a_real_freeze() {
    require_root!();
    let bins = appvss_artifacts();
    let sb = Sandbox::new("appsc_cli");
    let e = sb.ext4("e");
    let v = Vssd::start(&sb);
    let mut c = v.client();
    let log = sb.outside().join("log");
    let pidfile = sb.outside().join("pid");
    let mut app = Proc(
        Command::new(bins.join("appvss"))
            .args(["hold", "--name", "cli", "--once", "--stop-grace-ms", "300", "--socket"])
            .arg(sb.app_socket())
            .arg("--on-freeze")
            .arg(format!("echo \"flushed $APPVSS_FREEZE_ID\" >> {}", log.display()))
            .arg("--hold")
            .arg(format!("echo $$ > {}; echo locked; exec sleep 60", pidfile.display()))
            .args(["--ready-line", "locked"])
            .arg("--on-thaw")
            .arg(format!("echo \"thawed $APPVSS_RELEASE\" >> {}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_registered(&mut c, "cli");
    let r = c.ok("vssd-freeze", None);
    assert_eq!(app_entry(&r, "cli")["outcome"], "held", "{r}");
    let flushed = std::fs::read_to_string(&log).unwrap();
    assert!(flushed.starts_with("flushed "), "{flushed}");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(alive(&pid), "the --hold process is not running while frozen");
    let _probe = assert_frozen(&e, Duration::from_millis(200), "while the CLI holds");
    c.ok("vssd-thaw", None);
    assert_eq!(app.wait(WAIT), Some(0), "appvss hold --once after a completed freeze");
    assert!(!alive(&pid), "the --hold process outlived the thaw");
    let all = std::fs::read_to_string(&log).unwrap();
    assert!(all.ends_with("thawed completed\n"), "{all}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn cli_on_freeze_failure_fails_the_freeze_under_policy_fail_with_its_reason() {
    require_root!();
    let bins = appvss_artifacts();
    let sb = Sandbox::new("appsc_cli_fail");
    let e = sb.ext4("e");
    let v = Vssd::builder(&sb).arg("--app-failure").arg("fail").start();
    let mut c = v.client();
    let _app = Proc(
        Command::new(bins.join("appvss"))
            .args(["hold", "--name", "spool", "--socket"])
            .arg(sb.app_socket())
            .args(["--on-freeze", "echo 'spool disk full' >&2; exit 1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_registered(&mut c, "spool");
    let r = c.call("vssd-freeze", None);
    let desc = expect_error(&r, "GenericError", "an app failed under policy fail");
    assert!(desc.contains("spool") && desc.contains("spool disk full"), "{desc}");
    assert_writable(&e, Duration::from_secs(5), "after the failed freeze");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn rust_client_registers_again_after_vssd_restarts_and_holds_the_next_freeze() {
    require_root!();
    let bins = appvss_artifacts();
    let sb = Sandbox::new("appsc_restart");
    let _e = sb.ext4("e");
    let mut v = Vssd::start(&sb);
    let mut app = Proc(
        Command::new(bins.join("appvss"))
            .args(["hold", "--name", "survivor", "--socket"])
            .arg(sb.app_socket())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_registered(&mut v.client(), "survivor");
    v.kill9();
    v.restart();
    let mut c = v.client();
    wait_registered(&mut c, "survivor");
    let r = c.ok("vssd-freeze", None);
    assert_eq!(app_entry(&r, "survivor")["outcome"], "held", "{r}");
    c.ok("vssd-thaw", None);
    assert!(app.0.try_wait().unwrap().is_none(), "appvss hold exited");
}
