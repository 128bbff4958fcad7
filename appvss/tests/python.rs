//! `examples/python/hold.py` against a scripted vssd. Needs python3, so the tests are
//! `#[ignore]`d in a plain `cargo test` and run by `tests/run-all.sh` (which installs python3
//! through tests/setup.sh); run anyway without python3, they fail rather than pass unseen.

mod support;

use std::process::{Command, Stdio};

use support::{Server, WAIT};

fn python() -> Option<String> {
    let p = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    Command::new(&p).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| p)
}

/// The interpreter; a failure naming the fix when there is none.
fn require_python() -> String {
    python().unwrap_or_else(|| {
        panic!("this test needs python3 for examples/python/hold.py: run tests/setup.sh (or set PYTHON)")
    })
}

#[test]
#[ignore = "needs python3; tests/run-all.sh runs it"]
fn python_example_registers_holds_and_releases_at_thaw() {
    let py = require_python();
    let server = Server::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/hold.py");
    let mut child = Command::new(py)
        .arg(script)
        .args(["--name", "py-example", "--once", "--socket"])
        .arg(server.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, hello) = server.register(5);
    assert_eq!(hello["name"], "py-example");
    conn.prepare_and_freeze(12, 60000);
    conn.expect_silence(std::time::Duration::from_millis(200));
    conn.thaw(3, 12, "completed");
    assert_eq!(conn.expect("thawed")["re"], 3);
    conn.expect_closed();
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "hold.py did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("held freeze_id=12") && stdout.contains("release=completed"), "{stdout}");
}

#[test]
#[ignore = "needs python3; tests/run-all.sh runs it"]
fn python_example_releases_when_vssd_goes_away() {
    let py = require_python();
    let server = Server::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/hold.py");
    let child = Command::new(py)
        .arg(script)
        .args(["--name", "py-example", "--once", "--socket"])
        .arg(server.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut conn, _) = server.register(5);
    conn.prepare_and_freeze(12, 60000);
    drop(conn);
    let out = child.wait_with_output().unwrap();
    // --once: the freeze ended without a completed THAW.
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("release=disconnected"));
}
