//! The `appvss` CLI against a scripted vssd.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::{Server, WAIT};

fn appvss(server: &Server, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_appvss"))
        .args(args)
        .arg("--socket")
        .arg(server.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start appvss")
}

fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(WAIT) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("appvss did not exit");
        }
    }
}

fn text(o: &Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn on_freeze_runs_before_held_and_on_thaw_after_the_hold() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = log.display();
    let child = appvss(
        &server,
        &[
            "hold",
            "--name",
            "script",
            "--once",
            "--on-freeze",
            &format!("echo \"freeze $APPVSS_FREEZE_ID $APPVSS_PHASE\" >> {l}"),
            "--on-thaw",
            &format!("echo \"thaw $APPVSS_FREEZE_ID $APPVSS_RELEASE\" >> {l}"),
        ],
    );
    let (mut conn, hello) = server.register(1);
    assert_eq!(hello["name"], "script");
    conn.prepare(1, 21, 5000);
    conn.expect("ready");
    conn.freeze(2, 21, 5000, 60000);
    conn.expect("held");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze 21 freeze\n");
    conn.thaw(3, 21, "completed");
    conn.expect("thawed");
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze 21 freeze\nthaw 21 completed\n");
}

#[test]
fn a_failing_on_freeze_answers_failed_with_its_stderr() {
    let server = Server::new();
    let child = appvss(&server, &["hold", "--name", "broken", "--once", "--on-freeze", "echo 'disk full' >&2; exit 3"]);
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 2, 5000);
    conn.expect("ready");
    conn.freeze(2, 2, 5000, 60000);
    let f = conn.expect("failed");
    let reason = f["reason"].as_str().unwrap();
    assert!(reason.contains("disk full") && reason.contains("exit status 3"), "{reason}");
    let out = finish(child);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn on_freeze_past_the_deadline_is_killed_and_answers_failed() {
    let server = Server::new();
    let child = appvss(&server, &["hold", "--name", "slow", "--once", "--on-freeze", "sleep 30"]);
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 2, 5000);
    conn.expect("ready");
    conn.freeze(2, 2, 300, 60000);
    let f = conn.expect("failed");
    assert!(f["reason"].as_str().unwrap().contains("deadline"), "{f}");
    assert_eq!(finish(child).status.code(), Some(1));
}

#[test]
fn on_prepare_failure_vetoes() {
    let server = Server::new();
    let child = appvss(
        &server,
        &["hold", "--name", "migrating", "--once", "--on-prepare", "echo 'migration running' >&2; false"],
    );
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 2, 5000);
    let v = conn.expect("veto");
    assert!(v["reason"].as_str().unwrap().contains("migration running"), "{v}");
    conn.thaw(2, 2, "aborted");
    conn.expect("thawed");
    assert_eq!(finish(child).status.code(), Some(1));
}

#[test]
fn hold_process_answers_held_at_its_ready_line_and_is_stopped_at_thaw() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // A lock holder that ignores its stdin closing: it must be terminated.
    let hold = format!("echo $$ > {}; sleep 0.3; echo 'lock taken: locked'; exec sleep 60", pidfile.display());
    let child = appvss(
        &server,
        &["hold", "--name", "locker", "--once", "--stop-grace-ms", "200", "--hold", &hold, "--ready-line", "locked"],
    );
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 4, 5000);
    conn.expect("ready");
    let t0 = std::time::Instant::now();
    conn.freeze(2, 4, 5000, 60000);
    conn.expect("held");
    assert!(t0.elapsed() >= Duration::from_millis(250), "held before the ready line");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(alive(&pid), "the hold process is not running while holding");
    conn.thaw(3, 4, "completed");
    conn.expect("thawed");
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!alive(&pid), "the hold process outlived the thaw");
    assert!(String::from_utf8_lossy(&out.stdout).contains("lock taken: locked"));
}

#[test]
fn hold_process_that_dies_before_ready_answers_failed() {
    let server = Server::new();
    let child = appvss(
        &server,
        &["hold", "--name", "locker", "--once", "--hold", "echo 'access denied' >&2; exit 1", "--ready-line", "locked"],
    );
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 4, 5000);
    conn.expect("ready");
    conn.freeze(2, 4, 5000, 60000);
    let f = conn.expect("failed");
    assert!(f["reason"].as_str().unwrap().contains("access denied"), "{f}");
    assert_eq!(finish(child).status.code(), Some(1));
}

#[test]
fn hold_without_ready_line_holds_at_once_and_stdin_close_ends_it() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out");
    // `cat` ends when appvss closes its stdin: no signal needed.
    let hold = format!("cat; echo released > {}", out_file.display());
    let child = appvss(&server, &["hold", "--name", "catlock", "--once", "--hold", &hold]);
    let (mut conn, _) = server.register(1);
    conn.prepare(1, 4, 5000);
    conn.expect("ready");
    conn.freeze(2, 4, 5000, 60000);
    conn.expect("held");
    conn.thaw(3, 4, "completed");
    conn.expect("thawed");
    assert_eq!(finish(child).status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "released\n");
}

#[test]
fn sigterm_while_holding_releases_and_exits_0() {
    let server = Server::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let child = appvss(
        &server,
        &["hold", "--name", "stopper", "--on-thaw", &format!("echo \"$APPVSS_RELEASE\" > {}", log.display())],
    );
    let (mut conn, _) = server.register(1);
    conn.prepare_and_freeze(4, 60000);
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    conn.expect_closed();
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "closed\n");
}

#[test]
fn no_reconnect_without_vssd_exits_3() {
    let server = Server::unbound();
    let out = finish(appvss(&server, &["hold", "--name", "x", "--no-reconnect"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to vssd"), "{}", text(&out));
}

#[test]
fn status_says_whether_vssd_listens() {
    let server = Server::unbound();
    let out = finish(appvss(&server, &["status"]));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let server = Server::new();
    let out = finish(appvss(&server, &["status", "--json"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["reachable"], true);
    let child = appvss(&server, &["status", "--register", "--json"]);
    // `status --json` above, then the --register run's own check, only connected and left.
    for _ in 0..2 {
        server.accept().expect_closed();
    }
    let (mut conn, hello) = server.register(9);
    assert_eq!(hello["name"], "appvss-status");
    conn.expect_closed();
    let out = finish(child);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["registered"].as_bool(), v["app_id"].as_u64()), (Some(true), Some(9)), "{v}");
}

#[test]
fn usage_errors_exit_2_and_help_teaches_with_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_appvss")).args(["hold"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_appvss")).args(["hold", "--name", ""]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_appvss")).args(["hold", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("FLUSH TABLES WITH READ LOCK"), "{help}");
    let out = Command::new(env!("CARGO_BIN_EXE_appvss")).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Exit codes"));
}
