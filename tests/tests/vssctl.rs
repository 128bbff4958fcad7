//! vssctl against a running vssd (through its control socket), and its last resort:
//! `thaw --all` thaws directly when vssd is dead.

use std::ffi::OsStr;
use std::time::Duration;

use tests::*;

fn json_out(o: &Output, what: &str) -> Value {
    serde_json::from_str(o.stdout.trim())
        .unwrap_or_else(|e| panic!("{what}: --json output is not JSON ({e}): {:?}", o.stdout))
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssctl_status_freeze_and_thaw_drive_vssd() {
    require_root!();
    let sb = Sandbox::new("ctl_basic");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::builder(&sb).deadline(10).grace(1).start();

    let st = vssd.vssctl(&["--json", "status"]);
    st.expect_code(0, "status");
    assert_eq!(json_out(&st, "status")["status"], json!("thawed"), "{st:?}");
    vssd.vssctl(&["status"]).expect_code(0, "plain status");

    let plan = vssd.vssctl(&["--json", "plan"]);
    plan.expect_code(0, "plan");
    let plan = json_out(&plan, "plan");
    assert_eq!(field(mount_entry(&plan, &e), "outcome"), "freeze", "{plan}");

    let fr = vssd.vssctl(&["--json", "freeze"]);
    fr.expect_code(0, "freeze");
    assert_eq!(json_out(&fr, "freeze")["frozen"], json!(2), "{fr:?}");
    // vssctl has exited, and its freeze is not bound to its connection: still frozen after
    // the 1 s channel grace.
    let mut probes = WriteProbe::start_all(&[&e, &x]);
    assert_all_blocked(&mut probes, Duration::from_millis(2500), "after vssctl freeze exited");
    let st = vssd.vssctl(&["--json", "status"]);
    st.expect_code(0, "status while frozen");
    let st = json_out(&st, "status while frozen");
    assert_eq!(st["status"], json!("frozen"), "{st}");
    assert_eq!(st["frozen"].as_array().map(Vec::len), Some(2), "{st}");

    // A second freeze is refused: exit 1.
    vssd.vssctl(&["freeze"]).expect_code(1, "freeze while frozen");

    vssd.vssctl(&["thaw"]).expect_code(0, "thaw");
    assert_all_complete(&mut probes, THAWED, "after vssctl thaw");
    let st = vssd.vssctl(&["--json", "status"]);
    assert_eq!(json_out(&st, "status after thaw")["status"], json!("thawed"));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssctl_freeze_of_listed_mountpoints_with_a_deadline_auto_thaws() {
    require_root!();
    let sb = Sandbox::new("ctl_deadline");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::builder(&sb).deadline(10).start();
    let fr = vssd.vssctl(&[
        OsStr::new("--json"),
        OsStr::new("freeze"),
        OsStr::new("--deadline"),
        OsStr::new("2"),
        e.as_os_str(),
    ]);
    fr.expect_code(0, "freeze --deadline 2 E");
    let rep = json_out(&fr, "freeze");
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(rep["deadline-ms"], json!(2000), "{rep}");
    assert_writable(&x, THAWED, "not listed");
    let mut p = WriteProbe::start(&e);
    p.assert_blocked(Duration::from_millis(1000), "before the deadline");
    p.assert_completes(Duration::from_secs(7), "the 2 s deadline, well before the daemon's 10 s");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssctl_thaw_all_thaws_directly_when_vssd_was_killed_while_frozen() {
    require_root!();
    let sb = Sandbox::new("ctl_thaw_all");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let b = sb.btrfs("b");
    let mut vssd = Vssd::builder(&sb).deadline(10).start();
    vssd.vssctl(&["freeze"]).expect_code(0, "freeze");
    vssd.kill9();
    // Also a filesystem in the scope that someone froze by hand.
    let hand = sb.ext4("hand");
    run("fsfreeze", &[OsStr::new("-f"), hand.as_os_str()]);

    let mut probes = WriteProbe::start_all(&[&e, &x, &b, &hand]);
    assert_all_blocked(&mut probes, Duration::from_millis(1000), "vssd is dead, nobody thawed");

    let socket = sb.control_socket();
    vssctl(&socket, &["status"]).expect_code(3, "status with vssd dead");
    vssctl(&socket, &["thaw"]).expect_code(3, "plain thaw with vssd dead");

    let scope = sb.scope();
    let state = sb.state_dir();
    let out = vssctl(
        &socket,
        &[
            OsStr::new("thaw"),
            OsStr::new("--all"),
            OsStr::new("--scope"),
            scope.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ],
    );
    out.expect_code(0, "thaw --all with vssd dead");
    assert_all_complete(&mut probes, THAWED, "thaw --all thawed directly");
    for m in [&e, &x, &b, &hand] {
        assert!(!frozen_by_someone(m), "{} still frozen", m.display());
    }
    // With nothing frozen it is still a success.
    let again = vssctl(
        &socket,
        &[
            OsStr::new("thaw"),
            OsStr::new("--all"),
            OsStr::new("--scope"),
            scope.as_os_str(),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ],
    );
    again.expect_code(0, "thaw --all with nothing frozen");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssctl_thaw_all_goes_through_vssd_when_it_is_alive() {
    require_root!();
    let sb = Sandbox::new("ctl_thaw_all_live");
    let e = sb.ext4("e");
    let vssd = Vssd::start(&sb);
    vssd.vssctl(&["freeze"]).expect_code(0, "freeze");
    let mut p = assert_frozen(&e, BLOCKED, "frozen");
    let scope = sb.scope();
    vssd.vssctl(&[OsStr::new("thaw"), OsStr::new("--all"), OsStr::new("--scope"), scope.as_os_str()])
        .expect_code(0, "thaw --all");
    p.assert_completes(THAWED, "after thaw --all");
    // vssd knows: it thawed, nothing is left for an auto-thaw to report.
    let st = json_out(&vssd.vssctl(&["--json", "status"]), "status");
    assert_eq!(st["status"], json!("thawed"), "{st}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssctl_exit_codes_for_usage_and_unreachable() {
    require_root!();
    let sb = Sandbox::new("ctl_codes");
    let nowhere = sb.root().join("no-such.sock");
    vssctl(&nowhere, &["status"]).expect_code(3, "unreachable");
    vssctl(&nowhere, &["frobnicate"]).expect_code(2, "unknown subcommand");
    vssctl(&nowhere, &["freeze", "--cannot-freeze", "sometimes"]).expect_code(2, "bad policy");
}
