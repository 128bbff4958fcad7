//! The freeze engine on real loop filesystems: what gets frozen, what is skipped and why,
//! one freeze per superblock, dependency order, and failures that leave nothing frozen.
//!
//! "Frozen" is observed, not trusted: a write (create + write + fsync) to the mount blocks
//! while it is frozen and completes after the thaw.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::*;

fn outcome(report: &Value, m: &Path) -> String {
    field(mount_entry(report, m), "outcome").to_string()
}

/// Asserts the entry's reason carries the spec's keyword (`pseudo`, `read-only`, `excluded`,
/// `not-listed`, `also-mounted-outside-scope`), hyphenated or with spaces.
fn assert_reason(report: &Value, m: &Path, keyword: &str) {
    let entry = mount_entry(report, m);
    let reason = entry["reason"].as_str().unwrap_or("").to_lowercase();
    assert!(
        reason.contains(keyword) || reason.contains(&keyword.replace('-', " ")),
        "the reason for {} should say {keyword:?}: {entry}",
        m.display()
    );
}

fn level(report: &Value, m: &Path) -> i64 {
    let e = mount_entry(report, m);
    e["level"].as_i64().unwrap_or_else(|| panic!("no numeric level in {e}"))
}

fn paths(ms: &[&PathBuf]) -> Vec<Value> {
    ms.iter().map(|m| p2s(m)).collect()
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn ext4_xfs_and_btrfs_block_writes_while_frozen_and_resume_after_thaw() {
    require_root!();
    let sb = Sandbox::new("basic");
    let knob = Path::new("/sys/kernel/rcu_expedited");
    let off = || std::fs::read_to_string(knob).map(|s| s.trim() == "0").unwrap_or(true);
    let knob_was_off = off();
    let mps = [sb.ext4("e"), sb.xfs("x"), sb.btrfs("b")];
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    for round in 0..2 {
        for m in &mps {
            sb.dirty(m);
        }
        assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(3), "round {round}");
        assert_eq!(c.ok("guest-fsfreeze-status", None), json!("frozen"));
        let mut probes = WriteProbe::start_all(&[&mps[0], &mps[1], &mps[2]]);
        assert_all_blocked(&mut probes, BLOCKED, "while frozen");
        for m in &mps {
            assert!(frozen_by_someone(m), "{} not frozen", m.display());
        }
        assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(3), "round {round}");
        assert_all_complete(&mut probes, THAWED, "after thaw");
        assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    }
    // vssd expedites RCU grace periods only around its FIFREEZE calls: the system-wide knob
    // must be off again (unless the machine has it on for good). Other tests freeze
    // concurrently and flip it for moments, so wait for it to settle rather than look once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while knob_was_off && !off() {
        assert!(std::time::Instant::now() < deadline, "/sys/kernel/rcu_expedited stayed on after the thaw");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn freeze_list_freezes_only_the_listed_filesystems() {
    require_root!();
    let sb = Sandbox::new("freeze_list");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": [p2s(&x)]}))), json!(1));
    let mut px = assert_frozen(&x, BLOCKED, "listed");
    assert_writable(&e, THAWED, "not listed");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    px.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_plan_freezes_nothing_and_vssd_freeze_reports_every_mount() {
    require_root!();
    let sb = Sandbox::new("report");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let b = sb.btrfs("b");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let plan = c.ok("vssd-plan", None);
    for (m, fstype) in [(&e, "ext4"), (&x, "xfs"), (&b, "btrfs")] {
        let entry = mount_entry(&plan, m);
        assert_eq!(field(entry, "outcome"), "freeze", "{entry}");
        assert_eq!(field(entry, "fstype"), fstype, "{entry}");
        // The device is either the mount source or the superblock's major:minor.
        let dev = field(entry, "device");
        let mount = mount_of(m).unwrap();
        assert!(dev == mount.source || dev == mount.dev.to_string(), "device {dev}: {entry}");
        assert!(entry["level"].is_u64(), "{entry}");
        assert_writable(m, THAWED, "plan must not freeze");
    }
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));

    let rep = c.ok("vssd-freeze", Some(json!({"deadline": 8})));
    assert_eq!(rep["frozen"], json!(3), "{rep}");
    assert_eq!(rep["deadline-ms"], json!(8000), "{rep}");
    assert!(rep["elapsed-ms"].is_number(), "{rep}");
    for (m, fstype) in [(&e, "ext4"), (&x, "xfs"), (&b, "btrfs")] {
        let entry = mount_entry(&rep, m);
        assert_eq!(field(entry, "outcome"), "frozen", "{entry}");
        assert_eq!(field(entry, "fstype"), fstype, "{entry}");
        assert!(entry["freeze-ms"].is_number(), "{entry}");
    }
    let mut probes = WriteProbe::start_all(&[&e, &x, &b]);
    assert_all_blocked(&mut probes, BLOCKED, "after vssd-freeze");

    let st = c.ok("vssd-status", None);
    assert_eq!(st["status"], json!("frozen"), "{st}");
    let mut listed: Vec<String> =
        st["frozen"].as_array().expect("frozen list").iter().map(|v| v.as_str().unwrap().to_string()).collect();
    listed.sort();
    let mut want: Vec<String> = [&b, &e, &x].iter().map(|p| p.to_str().unwrap().to_string()).collect();
    want.sort();
    assert_eq!(listed, want, "{st}");
    let left = st["deadline-in-ms"].as_u64().unwrap_or_else(|| panic!("no deadline-in-ms in {st}"));
    assert!(left > 0 && left <= 8000, "{st}");

    let th = c.ok("vssd-thaw", None);
    assert_eq!(th["thawed"], json!(3), "{th}");
    assert_eq!(th["errors"], json!([]), "{th}");
    assert_all_complete(&mut probes, THAWED, "after vssd-thaw");
    assert_eq!(c.ok("vssd-status", None)["status"], json!("thawed"));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_freeze_with_mountpoints_skips_the_others_as_not_listed() {
    require_root!();
    let sb = Sandbox::new("not_listed");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", Some(json!({"mountpoints": [p2s(&e)]})));
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(outcome(&rep, &e), "frozen");
    assert_eq!(outcome(&rep, &x), "skipped");
    assert_reason(&rep, &x, "not-listed");
    let mut pe = assert_frozen(&e, BLOCKED, "listed");
    assert_writable(&x, THAWED, "not listed");
    assert_eq!(c.ok("vssd-thaw", None)["thawed"], json!(1));
    pe.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn excluded_mount_is_skipped_and_stays_writable() {
    require_root!();
    let sb = Sandbox::new("excluded");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::builder(&sb).arg("--exclude").arg(&x).start();
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(outcome(&rep, &x), "skipped");
    assert_reason(&rep, &x, "excluded");
    let mut pe = assert_frozen(&e, BLOCKED, "in scope");
    assert_writable(&x, THAWED, "excluded");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    pe.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn btrfs_subvolume_and_bind_mount_of_one_superblock_are_frozen_once() {
    require_root!();
    let sb = Sandbox::new("btrfs_once");
    let b = sb.btrfs("b");
    let sv = sb.btrfs_subvolume(&b, "sv", "sv");
    let bb = sb.bind(&b, "bbind");
    let all = [&b, &sv, &bb];
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let plan = c.ok("vssd-plan", None);
    let plan_outcomes: Vec<String> = all.iter().map(|m| outcome(&plan, m)).collect();
    assert_eq!(plan_outcomes.iter().filter(|o| *o == "freeze").count(), 1, "{plan}");
    assert_eq!(plan_outcomes.iter().filter(|o| *o == "same-filesystem").count(), 2, "{plan}");

    sb.dirty(&sv);
    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    let frozen: Vec<&&PathBuf> = all.iter().filter(|m| outcome(&rep, m) == "frozen").collect();
    assert_eq!(frozen.len(), 1, "exactly one mount frozen: {rep}");
    let via = frozen[0].to_str().unwrap();
    for m in all.iter().filter(|m| **m != *frozen[0]) {
        let entry = mount_entry(&rep, m);
        assert_eq!(field(entry, "outcome"), "same-filesystem", "{entry}");
        assert_eq!(field(entry, "frozen-via"), via, "{entry}");
    }
    let mut probes = WriteProbe::start_all(&[&b, &sv, &bb]);
    assert_all_blocked(&mut probes, BLOCKED, "every mount of the frozen superblock");
    assert_eq!(c.ok("vssd-thaw", None)["thawed"], json!(1));
    assert_all_complete(&mut probes, THAWED, "after thaw");

    // The QGA commands count superblocks too.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    let list = paths(&all);
    assert_eq!(c.ok("guest-fsfreeze-freeze-list", Some(json!({ "mountpoints": list }))), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn ext4_device_mounted_twice_is_frozen_once() {
    require_root!();
    let sb = Sandbox::new("ext4_twice");
    let e = sb.ext4("e");
    let dev = sb.source_of(&e);
    let again = sb.scope().join("again");
    std::fs::create_dir(&again).unwrap();
    sb.mount_raw(&[OsStr::new("-t"), OsStr::new("ext4"), OsStr::new(&dev)], &again);
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    let mut outcomes = vec![outcome(&rep, &e), outcome(&rep, &again)];
    outcomes.sort();
    assert_eq!(outcomes, ["frozen", "same-filesystem"], "{rep}");
    let mut p = assert_frozen(&again, BLOCKED, "second mount");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    p.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn fuse_filesystem_is_reported_cannot_freeze_and_skipped_under_policy_skip() {
    require_root!();
    let sb = Sandbox::new("fuse_skip");
    let e = sb.ext4("e");
    let f = sb.fuse("f");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let rep = c.ok("vssd-freeze", Some(json!({"cannot-freeze": "skip"})));
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(outcome(&rep, &e), "frozen", "{rep}");
    assert_eq!(outcome(&rep, &f), "cannot-freeze", "{rep}");
    let mut pe = assert_frozen(&e, BLOCKED, "ext4 beside the FUSE mount");
    assert_writable(&f, THAWED, "FUSE mount during the freeze");
    assert_eq!(c.ok("vssd-thaw", None)["thawed"], json!(1));
    pe.assert_completes(THAWED, "after thaw");

    // skip is the default, for the QGA commands too.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn fuse_filesystem_vetoes_the_whole_freeze_under_policy_veto() {
    require_root!();
    let sb = Sandbox::new("fuse_veto");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let f = sb.fuse("f");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let plan = c.ok("vssd-plan", None);
    assert_eq!(outcome(&plan, &f), "cannot-freeze", "{plan}");

    let r = c.call("vssd-freeze", Some(json!({"cannot-freeze": "veto"})));
    let desc = expect_error(&r, "GenericError", "veto");
    assert!(desc.contains(f.to_str().unwrap()), "the error should name {}: {desc}", f.display());
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    for m in [&e, &x, &f] {
        assert_writable(m, Duration::from_secs(3), "nothing frozen after a veto");
    }
    assert!(!frozen_by_someone(&e) && !frozen_by_someone(&x));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn daemon_veto_policy_makes_guest_fsfreeze_freeze_fail_and_freeze_nothing() {
    require_root!();
    let sb = Sandbox::new("fuse_veto_daemon");
    let e = sb.ext4("e");
    let f = sb.fuse("f");
    let vssd = Vssd::builder(&sb).cannot_freeze("veto").start();
    let mut c = vssd.client();
    let r = c.call("guest-fsfreeze-freeze", None);
    let desc = expect_error(&r, "GenericError", "daemon veto policy");
    assert!(desc.contains(f.to_str().unwrap()), "the error should name {}: {desc}", f.display());
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_writable(&e, Duration::from_secs(3), "nothing frozen after a veto");
    // An explicit skip in the request overrides the daemon's policy.
    let rep = c.ok("vssd-freeze", Some(json!({"cannot-freeze": "skip"})));
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(c.ok("vssd-thaw", None)["thawed"], json!(1));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn tmpfs_and_read_only_mounts_are_skipped_with_reasons() {
    require_root!();
    let sb = Sandbox::new("skipped");
    let e = sb.ext4("e");
    let t = sb.tmpfs("t");
    let ro = sb.read_only_ext4("ro");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let plan = c.ok("vssd-plan", None);
    assert_eq!(outcome(&plan, &t), "skipped", "{plan}");
    assert_eq!(outcome(&plan, &ro), "skipped", "{plan}");

    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(1), "{rep}");
    assert_eq!(outcome(&rep, &e), "frozen", "{rep}");
    assert_eq!(outcome(&rep, &t), "skipped", "{rep}");
    assert_reason(&rep, &t, "pseudo");
    assert_eq!(outcome(&rep, &ro), "skipped", "{rep}");
    assert_reason(&rep, &ro, "read-only");
    let mut pe = assert_frozen(&e, BLOCKED, "the writable ext4");
    assert_writable(&t, THAWED, "tmpfs during the freeze");
    // A read-only filesystem cannot take a write; our own FIFREEZE succeeding shows nobody
    // froze it.
    assert!(!frozen_by_someone(&ro), "vssd froze the read-only mount");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    pe.assert_completes(THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn nested_filesystem_is_frozen_before_the_one_holding_its_image_and_both_thaw() {
    require_root!();
    let sb = Sandbox::new("nested");
    let outer = sb.xfs("outer");
    let inner = sb.nested(Fs::Ext4, &outer, "inner");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    c.set_timeout(Duration::from_secs(30));

    let plan = c.ok("vssd-plan", None);
    assert!(level(&plan, &inner) < level(&plan, &outer), "inner must get the lower level (frozen first): {plan}");

    // Lots of dirty data in the inner filesystem: freezing it writes through its loop device
    // into the outer one, which deadlocks if the outer one is frozen first.
    for _ in 0..8 {
        sb.dirty(&inner);
    }
    let rep = c.ok("vssd-freeze", None);
    assert_eq!(rep["frozen"], json!(2), "{rep}");
    assert!(level(&rep, &inner) < level(&rep, &outer), "{rep}");
    let mut probes = WriteProbe::start_all(&[&inner, &outer]);
    assert_all_blocked(&mut probes, BLOCKED, "both frozen");
    let th = c.ok("vssd-thaw", None);
    assert_eq!(th["thawed"], json!(2), "{th}");
    assert_eq!(th["errors"], json!([]), "{th}");
    assert_all_complete(&mut probes, THAWED, "both thawed");

    // The QGA path orders the same way.
    for _ in 0..8 {
        sb.dirty(&inner);
    }
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_writable(&inner, THAWED, "inner after QGA thaw");
    assert_writable(&outer, THAWED, "outer after QGA thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn freeze_thaws_everything_when_one_filesystem_fails() {
    require_root!();
    let sb = Sandbox::new("one_fails");
    let a = sb.ext4("a");
    let busy = sb.xfs("busy");
    let b = sb.btrfs("b");
    let c2 = sb.ext4("c");
    // Someone else holds a freeze: FIFREEZE on it gets EBUSY.
    run("fsfreeze", &[OsStr::new("-f"), busy.as_os_str()]);
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    for (cmd, args) in [("guest-fsfreeze-freeze", None), ("vssd-freeze", Some(json!({})))] {
        for m in [&a, &b, &c2] {
            sb.dirty(m);
        }
        let r = c.call(cmd, args);
        let desc = expect_error(&r, "GenericError", cmd);
        assert!(desc.contains(busy.to_str().unwrap()), "{cmd}: the error should name {}: {desc}", busy.display());
        assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"), "{cmd}");
        for m in [&a, &b, &c2] {
            assert_writable(m, Duration::from_secs(5), "thawed after the failed freeze");
        }
        // vssd thaws what it froze, not what someone else froze.
        assert!(frozen_by_someone(&busy), "{cmd}: vssd thawed a freeze it did not make");
    }
    let mut pb = assert_frozen(&busy, Duration::from_millis(300), "still held by fsfreeze -f");
    run("fsfreeze", &[OsStr::new("-u"), busy.as_os_str()]);
    pb.assert_completes(THAWED, "after fsfreeze -u");
    // And with the obstacle gone the same freeze works.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(4));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(4));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_filesystem_thawed_behind_vssds_back_fails_fithaw_and_the_thaw_still_ends_clean() {
    // An admin runs `fsfreeze -u` on one of vssd's frozen filesystems: vssd's own FITHAW on
    // it then fails for real (EINVAL, not frozen). The thaw must count it as thawed, thaw the
    // rest, report no error and leave no marker that a later start would act on.
    require_root!();
    let sb = Sandbox::new("thawed_behind");
    let a = sb.ext4("a");
    let x = sb.xfs("x");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let mut pa = assert_frozen(&a, Duration::from_millis(300), "a, frozen by vssd");
    let mut px = assert_frozen(&x, Duration::from_millis(300), "x, frozen by vssd");
    run("fsfreeze", &[OsStr::new("-u"), a.as_os_str()]);
    pa.assert_completes(THAWED, "a, after the admin's fsfreeze -u");
    assert!(
        kmod_shim::freeze::thaw_path(&a).is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)),
        "FITHAW on a filesystem no longer frozen fails with EINVAL (what vssd's thaw meets)"
    );
    let r = c.ok("vssd-thaw", None);
    assert_eq!(r["thawed"], json!(2), "both count as thawed: {r}");
    assert!(r["errors"].as_array().is_none_or(|e| e.is_empty()), "no error for a filesystem already thawed: {r}");
    px.assert_completes(THAWED, "x, after vssd's thaw");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert!(!sb.state_dir().join("frozen.json").exists(), "the freeze marker is gone");
    assert_writable(&a, THAWED, "a at the end");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn second_freeze_while_frozen_is_refused_and_the_first_stays() {
    require_root!();
    let sb = Sandbox::new("second_freeze");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    let mut other = vssd.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    let mut probes = WriteProbe::start_all(&[&e, &x]);

    for (who, conn) in [("same connection", &mut c), ("other connection", &mut other)] {
        for (cmd, args) in [
            ("guest-fsfreeze-freeze", None),
            ("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": [p2s(&e)]}))),
            ("vssd-freeze", None),
        ] {
            let r = conn.call(cmd, args);
            assert!(r.get("error").is_some(), "{who}: {cmd} while frozen must fail, got {r}");
            assert_eq!(conn.ok("guest-fsfreeze-status", None), json!("frozen"), "{who} after {cmd}");
        }
    }
    assert_all_blocked(&mut probes, BLOCKED, "the first freeze stays");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
    assert_all_complete(&mut probes, THAWED, "after thaw");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn superblock_also_mounted_outside_the_scope_is_skipped_and_never_frozen() {
    require_root!();
    let sb = Sandbox::new("outside");
    let e = sb.ext4("e");
    let shared = sb.xfs("shared");
    let out = sb.bind_outside(&shared, "shared");
    assert!(!out.starts_with(sb.scope()));
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();

    let plan = c.ok("vssd-plan", None);
    assert_eq!(outcome(&plan, &shared), "skipped", "{plan}");

    for (cmd, args) in [("vssd-freeze", None), ("vssd-freeze", Some(json!({"mountpoints": [p2s(&e), p2s(&shared)]})))] {
        let rep = c.ok(cmd, args);
        assert_eq!(rep["frozen"], json!(1), "{rep}");
        assert_eq!(outcome(&rep, &shared), "skipped", "{rep}");
        assert_reason(&rep, &shared, "also-mounted-outside-scope");
        assert_writable(&out, THAWED, "the outside mount");
        assert_writable(&shared, THAWED, "the inside mount of the same superblock");
        let mut pe = assert_frozen(&e, BLOCKED, "the other filesystem");
        assert_eq!(c.ok("vssd-thaw", None)["thawed"], json!(1));
        pe.assert_completes(THAWED, "after thaw");
    }
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_writable(&out, THAWED, "outside, via guest-fsfreeze-freeze");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn scope_is_a_directory_prefix_not_a_string_prefix() {
    require_root!();
    let sb = Sandbox::new("scope_prefix");
    let e = sb.ext4("e");
    // <root>/mnt-sibling/s starts with the string "<root>/mnt" but is not under <root>/mnt/.
    let sibling_dir = sb.root().join("mnt-sibling");
    std::fs::create_dir(&sibling_dir).unwrap();
    let images = sb.root().join("images");
    let s = sb.mount_fs_full(Fs::Ext4, "s", &images, &sibling_dir, &[]);
    let vssd = Vssd::start(&sb);
    let mut c = vssd.client();
    let plan = c.ok("vssd-plan", None);
    let listed = plan["mounts"].as_array().unwrap().iter().find(|m| m["mountpoint"].as_str() == s.to_str());
    if let Some(entry) = listed {
        assert_ne!(field(entry, "outcome"), "freeze", "{entry}");
    }
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_writable(&s, THAWED, "outside the scope");
    let mut pe = assert_frozen(&e, BLOCKED, "in scope");
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    pe.assert_completes(THAWED, "after thaw");
}
