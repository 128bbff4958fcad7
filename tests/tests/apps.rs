//! Root tier: applications holding a freeze through vssd's app socket (appvss protocol,
//! spoken raw here so the tests check the wire, not a client library), and hooks.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::rawapp::RawApp;
use tests::*;

/// What a scripted app does in each phase.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// ready, held, wait for thaw.
    Hold,
    /// veto at PREPARE.
    Veto,
    /// never answers FREEZE.
    Silent,
    /// closes the connection on FREEZE.
    CrashAtFreeze,
}

/// Runs an app on a thread; its log of received messages is shared.
fn spawn_app(socket: &Path, name: &str, role: Role, log: Arc<Mutex<Vec<String>>>) -> thread::JoinHandle<()> {
    let mut a = RawApp::register(socket, name);
    let name = name.to_string();
    thread::spawn(move || {
        while let Some(m) = a.recv() {
            let ty = m["type"].as_str().unwrap_or("?").to_string();
            log.lock().unwrap().push(format!("{name} {ty} {} {}", m["freeze_id"], m["reason"].as_str().unwrap_or("")));
            let id = m["id"].clone();
            match (ty.as_str(), role) {
                ("prepare", Role::Veto) => a.send(&json!({"type": "veto", "re": id, "reason": "migration running"})),
                ("prepare", _) => a.send(&json!({"type": "ready", "re": id})),
                ("freeze", Role::Hold) | ("freeze", Role::Veto) => a.send(&json!({"type": "held", "re": id})),
                ("freeze", Role::Silent) => {}
                ("freeze", Role::CrashAtFreeze) => return,
                ("thaw", _) => a.send(&json!({"type": "thawed", "re": id})),
                _ => {}
            }
        }
    })
}

fn app_entry<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("app {name} not in report {report}"))
}

fn wait_for(log: &Arc<Mutex<Vec<String>>>, what: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if log.lock().unwrap().iter().any(|l| l.contains(what)) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

fn hook(sb: &Sandbox, name: &str, body: &str) -> PathBuf {
    let d = sb.hooks_dir();
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn an_app_that_holds_makes_the_freeze_application_consistent_and_gets_thaw() {
    require_root!();
    let sb = Sandbox::new("apps_hold");
    let e = sb.ext4("e");
    let v = Vssd::start(&sb);
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = spawn_app(&sb.app_socket(), "db", Role::Hold, log.clone());
    let mut c = v.client();
    let r = c.ok("vssd-freeze", None);
    assert_eq!(r["frozen"], 1, "{r}");
    assert_eq!(r["consistency"], "application", "{r}");
    let a = app_entry(&r, "db");
    assert_eq!(a["outcome"], "held", "{r}");
    assert!(a["prepare-ms"].as_f64().is_some() && a["freeze-ms"].as_f64().is_some(), "{a}");
    let _probe = assert_frozen(&e, Duration::from_millis(300), "ext4 while the app holds");
    let th = c.ok("vssd-thaw", None);
    assert_eq!(th["apps"], 1, "{th}");
    assert!(wait_for(&log, "db thaw", Duration::from_secs(5)), "no THAW: {:?}", log.lock().unwrap());
    let l = log.lock().unwrap().clone();
    assert!(l[0].starts_with("db prepare") && l[1].starts_with("db freeze") && l[2].contains("completed"), "{l:?}");
    drop(c);
    drop(v);
    t.join().unwrap();
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_veto_is_reported_and_the_freeze_goes_on_under_policy_continue() {
    require_root!();
    let sb = Sandbox::new("apps_veto_continue");
    let _e = sb.ext4("e");
    let v = Vssd::start(&sb);
    let log = Arc::new(Mutex::new(Vec::new()));
    let _t = spawn_app(&sb.app_socket(), "migrator", Role::Veto, log.clone());
    let _h = spawn_app(&sb.app_socket(), "db", Role::Hold, log.clone());
    let mut c = v.client();
    let r = c.ok("vssd-freeze", None);
    assert_eq!(r["frozen"], 1, "{r}");
    assert_eq!(r["consistency"], "filesystem", "{r}");
    let m = app_entry(&r, "migrator");
    assert_eq!(m["outcome"], "vetoed", "{r}");
    assert_eq!(m["reason"], "migration running", "{r}");
    assert_eq!(app_entry(&r, "db")["outcome"], "held", "{r}");
    c.ok("vssd-thaw", None);
    assert!(wait_for(&log, "migrator thaw", Duration::from_secs(5)), "{:?}", log.lock().unwrap());
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_veto_fails_the_freeze_under_policy_fail_and_nothing_stays_frozen() {
    require_root!();
    let sb = Sandbox::new("apps_veto_fail");
    let e = sb.ext4("e");
    let v = Vssd::builder(&sb).arg("--app-failure").arg("fail").start();
    let log = Arc::new(Mutex::new(Vec::new()));
    let _t = spawn_app(&sb.app_socket(), "migrator", Role::Veto, log.clone());
    let _h = spawn_app(&sb.app_socket(), "db", Role::Hold, log.clone());
    let mut c = v.client();
    let r = c.call("vssd-freeze", None);
    let desc = expect_error(&r, "GenericError", "veto under policy fail");
    assert!(desc.contains("migrator") && desc.contains("vetoed") && desc.contains("migration running"), "{desc}");
    assert_writable(&e, Duration::from_secs(5), "after a vetoed freeze");
    assert_eq!(ret(&c.call("guest-fsfreeze-status", None), "status"), "thawed");
    // Every app that got PREPARE gets THAW(aborted); the other app was never asked to FREEZE.
    assert!(wait_for(&log, "migrator thaw 1 aborted", Duration::from_secs(5)), "{:?}", log.lock().unwrap());
    assert!(wait_for(&log, "db thaw 1 aborted", Duration::from_secs(5)), "{:?}", log.lock().unwrap());
    assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("db freeze")), "{:?}", log.lock().unwrap());
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn an_app_that_misses_the_freeze_deadline_is_reported_or_fails_the_freeze() {
    require_root!();
    for policy in ["continue", "fail"] {
        let sb = Sandbox::new(&format!("apps_late_{policy}"));
        let e = sb.ext4("e");
        let v = Vssd::builder(&sb).arg("--app-failure").arg(policy).arg("--app-freeze-deadline").arg("1").start();
        let log = Arc::new(Mutex::new(Vec::new()));
        let _t = spawn_app(&sb.app_socket(), "slow", Role::Silent, log.clone());
        let mut c = v.client();
        let t0 = Instant::now();
        let r = c.call("vssd-freeze", None);
        assert!(t0.elapsed() < Duration::from_secs(5), "the deadline must bound the wait: {:?}", t0.elapsed());
        if policy == "continue" {
            let rr = ret(&r, "late app, continue");
            assert_eq!(app_entry(rr, "slow")["outcome"], "timeout", "{rr}");
            assert_eq!(rr["consistency"], "filesystem");
            c.ok("vssd-thaw", None);
        } else {
            let desc = expect_error(&r, "GenericError", "late app, fail");
            assert!(desc.contains("slow") && desc.contains("did not answer in time"), "{desc}");
            assert_writable(&e, Duration::from_secs(5), "after a failed freeze");
        }
        assert!(wait_for(&log, "slow thaw", Duration::from_secs(5)), "{policy}: {:?}", log.lock().unwrap());
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn an_app_that_crashes_at_freeze_or_while_holding_never_blocks_the_thaw() {
    require_root!();
    let sb = Sandbox::new("apps_crash");
    let e = sb.ext4("e");
    let v = Vssd::start(&sb);
    let log = Arc::new(Mutex::new(Vec::new()));
    let crash = spawn_app(&sb.app_socket(), "crashy", Role::CrashAtFreeze, log.clone());
    // A holder that then dies (its connection closes) while the filesystems are frozen.
    let mut holder = RawApp::register(&sb.app_socket(), "holder");
    let mut c = v.client();
    let h = thread::spawn(move || {
        let p = holder.expect("prepare");
        holder.send(&json!({"type": "ready", "re": p["id"]}));
        let f = holder.expect("freeze");
        holder.send(&json!({"type": "held", "re": f["id"]}));
        holder // dropped by the caller: the app "crashes" while holding
    });
    let r = c.ok("vssd-freeze", None);
    assert_eq!(app_entry(&r, "crashy")["outcome"], "disconnected", "{r}");
    assert_eq!(app_entry(&r, "holder")["outcome"], "held", "{r}");
    crash.join().unwrap();
    drop(h.join().unwrap());
    let _probe = assert_frozen(&e, Duration::from_millis(300), "still frozen after the holder died");
    let t0 = Instant::now();
    let th = c.ok("vssd-thaw", None);
    assert!(t0.elapsed() < Duration::from_secs(2), "thaw waited on a dead app: {:?}", t0.elapsed());
    assert_eq!(th["thawed"], 1);
    assert_writable(&e, Duration::from_secs(5), "after thaw");
    let st = c.ok("vssd-status", None);
    assert_eq!(st["apps"].as_array().map(Vec::len), Some(0), "dead apps are unregistered: {st}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_hung_hook_is_killed_at_its_deadline_and_reported() {
    require_root!();
    let sb = Sandbox::new("apps_hung_hook");
    let _e = sb.ext4("e");
    hook(&sb, "10-hang", "[ \"$1\" = freeze ] && sleep 60; exit 0");
    let v = Vssd::builder(&sb).arg("--hook-deadline").arg("1").start();
    let mut c = v.client();
    let t0 = Instant::now();
    let r = c.ok("vssd-freeze", None);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let h = &r["hooks"][0];
    assert_eq!(h["outcome"], "timeout", "{r}");
    assert_eq!(r["consistency"], "filesystem", "{r}");
    assert_eq!(r["frozen"], 1, "policy continue still freezes: {r}");
    let th = c.ok("vssd-thaw", None);
    assert_eq!(th["hooks"][0]["outcome"], "ok", "thaw hook runs: {th}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn apps_then_hooks_then_filesystems_on_freeze_and_filesystems_then_apps_then_hooks_on_thaw() {
    require_root!();
    let sb = Sandbox::new("apps_order");
    let e = sb.ext4("e");
    let order = sb.root().join("order.log");
    let o = order.display().to_string();
    // The freeze hook records what the apps said so far; the thaw hook proves the filesystem
    // is already thawed by writing to it (it would block if it were not).
    hook(
        &sb,
        "10-record",
        &format!(
            "echo \"hook $1\" >> {o}; if [ \"$1\" = thaw ]; then echo x > {}/after-thaw && sync {}/after-thaw && echo 'fs writable at thaw hook' >> {o}; fi",
            e.display(),
            e.display()
        ),
    );
    let v = Vssd::start(&sb);
    let log = Arc::new(Mutex::new(Vec::new()));
    let _a = spawn_app(&sb.app_socket(), "a", Role::Hold, log.clone());
    let _b = spawn_app(&sb.app_socket(), "b", Role::Hold, log.clone());
    let mut c = v.client();
    let r = c.ok("vssd-freeze", None);
    assert_eq!(r["consistency"], "application", "{r}");
    // Both apps had FREEZE before the hook ran (the hook ran before the reply, FREEZE before it).
    let l = log.lock().unwrap().clone();
    assert!(l.iter().filter(|x| x.contains(" freeze ")).count() == 2, "{l:?}");
    let hook_freeze = std::fs::read_to_string(&order).unwrap();
    assert_eq!(hook_freeze, "hook freeze\n");
    let _probe = assert_frozen(&e, Duration::from_millis(200), "frozen after hooks");
    c.ok("vssd-thaw", None);
    let text = std::fs::read_to_string(&order).unwrap();
    assert_eq!(text, "hook freeze\nhook thaw\nfs writable at thaw hook\n", "thaw hook after the filesystem thawed");
    assert!(wait_for(&log, "a thaw", Duration::from_secs(5)) && wait_for(&log, "b thaw", Duration::from_secs(5)));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn every_app_gets_exactly_one_thaw_per_freeze_whatever_ends_it() {
    require_root!();
    let sb = Sandbox::new("apps_thaw_every_time");
    let _e = sb.ext4("e");
    let v = Vssd::builder(&sb).deadline(2).start();
    let log = Arc::new(Mutex::new(Vec::new()));
    let names: Vec<String> = (0..8).map(|i| format!("app{i}")).collect();
    let _apps: Vec<_> = names.iter().map(|n| spawn_app(&sb.app_socket(), n, Role::Hold, log.clone())).collect();
    let mut c = v.client();
    // 1: completed. 2: aborted after the apps held (a freeze hook fails, policy fail).
    // 3: vssd thaws by itself at the deadline. 4: completed again.
    c.ok("vssd-freeze", None);
    c.ok("vssd-thaw", None);
    let flag = sb.root().join("fail-hook");
    hook(&sb, "10-maybe-fail", &format!("[ \"$1\" = freeze ] && [ -e {} ] && exit 1; exit 0", flag.display()));
    std::fs::write(&flag, "").unwrap();
    expect_error(&c.call("vssd-freeze", Some(json!({"app-failure": "fail"}))), "GenericError", "failing hook");
    std::fs::remove_file(&flag).unwrap();
    c.ok("vssd-freeze", Some(json!({"deadline": 1})));
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(ret(&c.call("guest-fsfreeze-status", None), "status"), "thawed");
    c.ok("vssd-freeze", None);
    c.ok("vssd-thaw", None);
    thread::sleep(Duration::from_millis(500));
    let l = log.lock().unwrap().clone();
    for n in &names {
        for (fid, want) in [(1, "completed"), (2, "aborted"), (3, "timeout"), (4, "completed")] {
            let preps = l.iter().filter(|x| x.starts_with(&format!("{n} prepare {fid} "))).count();
            let thaws: Vec<_> = l.iter().filter(|x| x.starts_with(&format!("{n} thaw {fid} "))).collect();
            assert_eq!(preps, 1, "{n} freeze {fid}: {l:?}");
            assert_eq!(thaws.len(), 1, "{n} freeze {fid}: {l:?}");
            assert!(thaws[0].ends_with(want), "{n} freeze {fid}: {thaws:?}");
        }
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn bad_hellos_oversized_and_unknown_messages_get_clear_errors_and_vssd_keeps_serving() {
    require_root!();
    let sb = Sandbox::new("apps_bad_input");
    let _e = sb.ext4("e");
    let v = Vssd::builder(&sb).arg("--app-max-per-uid").arg("1").start();
    let sock = sb.app_socket();

    let mut a = RawApp::connect(&sock);
    a.send(&json!({"type": "ready", "re": 1}));
    let m = a.expect("error");
    assert_eq!((m["code"].as_str(), m["fatal"].as_bool()), (Some("bad-hello"), Some(true)), "{m}");
    assert!(a.recv().is_none(), "closed after a fatal error");

    let mut a = RawApp::connect(&sock);
    a.send(&json!({"type": "hello", "id": 1, "name": "future", "min_version": 7, "max_version": 9}));
    let m = a.expect("error");
    assert_eq!(m["code"], "version-unsupported", "{m}");
    assert!(m["message"].as_str().unwrap().contains("7..9"), "{m}");

    let mut a = RawApp::connect(&sock);
    a.send_raw(b"this is not json\n");
    assert_eq!(a.expect("error")["code"], "bad-hello");

    let mut ok = RawApp::register(&sock, "first");
    let mut big = b"{\"type\":\"ready\",\"re\":1,\"x\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend(b"\"}\n");
    ok.send_raw(&big);
    let m = ok.expect("error");
    assert_eq!((m["code"].as_str(), m["fatal"].as_bool()), (Some("too-large"), Some(false)), "{m}");
    ok.send(&json!({"type": "dance"}));
    assert_eq!(ok.expect("error")["code"], "bad-message");
    ok.send(&json!({"type": "held", "re": 99}));
    assert_eq!(ok.expect("error")["code"], "unexpected-reply");

    // Over the uid cap (1): refused, named, and the first registration is unharmed.
    let mut second = RawApp::connect(&sock);
    second.send(&json!({"type": "hello", "id": 1, "name": "second", "min_version": 1, "max_version": 1}));
    let m = second.expect("error");
    assert_eq!(m["code"], "too-many-registrations", "{m}");
    assert!(m["message"].as_str().unwrap().contains("app-max-per-uid"), "{m}");

    // vssd still serves hosts and the registered app.
    let mut c = v.client();
    c.ok("guest-ping", None);
    let t = thread::spawn(move || {
        let p = ok.expect("prepare");
        ok.send(&json!({"type": "ready", "re": p["id"]}));
        let f = ok.expect("freeze");
        ok.send(&json!({"type": "held", "re": f["id"]}));
        ok.expect("thaw");
    });
    let r = c.ok("vssd-freeze", None);
    assert_eq!(app_entry(&r, "first")["outcome"], "held", "{r}");
    c.ok("vssd-thaw", None);
    t.join().unwrap();
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn the_app_socket_is_private_to_root_and_the_vssd_group() {
    require_root!();
    let sb = Sandbox::new("apps_socket_mode");
    let _v = Vssd::start(&sb);
    let md = std::fs::metadata(sb.app_socket()).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
}
