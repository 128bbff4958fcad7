//! Every freeze ends: at the deadline, when the channel that froze goes away, and after
//! vssd itself was killed (the next start thaws what the marker lists).

use std::time::{Duration, Instant};

use tests::*;

fn last_auto_thaw_reason(c: &mut QgaClient) -> String {
    let st = c.ok("vssd-status", None);
    st["last-auto-thaw"]["reason"].as_str().unwrap_or_else(|| panic!("no last-auto-thaw.reason in {st}")).to_string()
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn deadline_passes_then_vssd_thaws_by_itself_and_says_so_once() {
    require_root!();
    let sb = Sandbox::new("deadline");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::builder(&sb).deadline(2).start();
    let mut c = vssd.client();
    sb.dirty(&e);
    let frozen_at = Instant::now();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let mut probes = WriteProbe::start_all(&[&e, &x]);
    // Well inside the 2 s deadline, still frozen.
    assert_all_blocked(&mut probes, Duration::from_millis(1000), "before the deadline");
    assert_all_complete(&mut probes, THAWED, "vssd thaws at the deadline");
    let took = frozen_at.elapsed();
    assert!(took >= Duration::from_millis(1800), "thawed after {took:?}, before the 2 s deadline");

    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_eq!(last_auto_thaw_reason(&mut c), "deadline");
    // The host's thaw comes late: it must learn that the snapshot may not be consistent.
    let r = c.call("guest-fsfreeze-thaw", None);
    let desc = expect_error(&r, "GenericError", "thaw after the deadline");
    assert!(desc.to_lowercase().contains("deadline"), "the error should say the deadline passed: {desc}");
    // Once.
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(0));
    // A new freeze works as usual afterwards.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_freeze_deadline_argument_sets_the_auto_thaw() {
    require_root!();
    let sb = Sandbox::new("deadline_arg");
    let e = sb.ext4("e");
    let vssd = Vssd::builder(&sb).deadline(10).start();
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", Some(json!({"deadline": 2})));
    assert_eq!(rep["deadline-ms"], json!(2000), "{rep}");
    let mut p = WriteProbe::start(&e);
    p.assert_blocked(Duration::from_millis(1000), "before the 2 s deadline");
    // Well before the daemon's 10 s default.
    let d = p.assert_completes(Duration::from_secs(7), "the request's 2 s deadline");
    assert!(d < Duration::from_secs(9), "thawed only after {d:?}");
    assert_eq!(last_auto_thaw_reason(&mut c), "deadline");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn closing_the_channel_that_froze_thaws_after_the_grace() {
    require_root!();
    let sb = Sandbox::new("chan_closed");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::builder(&sb).deadline(10).grace(1).start();
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let mut probes = WriteProbe::start_all(&[&e, &x]);
    assert_all_blocked(&mut probes, Duration::from_millis(500), "before the channel closes");
    let closed_at = Instant::now();
    drop(c);
    assert_all_complete(&mut probes, Duration::from_secs(8), "channel closed: thawed after the 1 s grace");
    let took = closed_at.elapsed();
    assert!(took >= Duration::from_millis(700), "thawed {took:?} after the close, before the 1 s grace");
    assert!(took < Duration::from_secs(8), "thawed only {took:?} after the close (deadline is 10 s)");

    let mut c2 = vssd.client();
    assert_eq!(c2.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_eq!(last_auto_thaw_reason(&mut c2), "channel-closed");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn closing_another_connection_leaves_the_freeze_in_place() {
    require_root!();
    let sb = Sandbox::new("other_closed");
    let e = sb.ext4("e");
    let vssd = Vssd::builder(&sb).deadline(10).grace(1).start();
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    let mut bystander = vssd.client();
    assert_eq!(bystander.ok("guest-fsfreeze-status", None), json!("frozen"));
    drop(bystander);
    let mut p = WriteProbe::start(&e);
    p.assert_blocked(Duration::from_millis(2500), "a bystander closing must not thaw");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    p.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn freeze_not_bound_to_the_channel_survives_its_close_until_thawed() {
    require_root!();
    let sb = Sandbox::new("unbound");
    let e = sb.ext4("e");
    let vssd = Vssd::builder(&sb).deadline(10).grace(1).start();
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", Some(json!({"bind-to-channel": false})));
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    drop(c);
    let mut p = WriteProbe::start(&e);
    p.assert_blocked(Duration::from_millis(2500), "unbound freeze after its channel closed");
    let mut c2 = vssd.client();
    assert_eq!(c2.ok("guest-fsfreeze-status", None), json!("frozen"));
    assert_eq!(c2.ok("vssd-thaw", None)["thawed"], json!(1));
    p.assert_completes(THAWED, "after thaw from another connection");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_while_frozen_leaves_it_frozen_and_the_next_start_thaws() {
    require_root!();
    let sb = Sandbox::new("crash");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let mut vssd = Vssd::builder(&sb).deadline(10).start();
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(2), "{rep}");
    let marker = sb.state_dir().join("frozen.json");
    assert!(marker.is_file(), "no marker {} while frozen", marker.display());

    vssd.kill9();
    drop(c);
    let mut probes = WriteProbe::start_all(&[&e, &x]);
    // Nobody is left to thaw: the kernel keeps the filesystems frozen.
    assert_all_blocked(&mut probes, Duration::from_millis(1500), "after SIGKILL");

    vssd.restart();
    assert_all_complete(&mut probes, THAWED, "the next start thaws what the marker lists");
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_eq!(last_auto_thaw_reason(&mut c), "recovered-after-crash");
    assert!(!marker.exists(), "marker still there after recovery");
    // And it works as usual afterwards.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert!(marker.is_file());
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
    assert!(!marker.exists(), "marker left after a thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn sigterm_while_frozen_thaws_and_exits_zero() {
    require_root!();
    let sb = Sandbox::new("sigterm");
    let e = sb.ext4("e");
    let mut vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    let mut p = assert_frozen(&e, BLOCKED, "frozen");
    let st = vssd.terminate();
    assert_eq!(st.code(), Some(0), "vssd exit status on SIGTERM: {st}");
    p.assert_completes(THAWED, "SIGTERM thaws");
    assert!(!sb.state_dir().join("frozen.json").exists(), "marker left after a clean stop");
}
