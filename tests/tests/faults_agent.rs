//! Root tier: the fault matrix of the agent on real loop filesystems. Each test is one cell (or
//! one row of cells): the fault is named, and so is what the user gets, and the test fails if
//! the user does not get it. The cells the fake kernel covers better (a FIFREEZE or FITHAW that
//! fails) are unit tests in `agent/src/service/tests.rs`; the hook cells are also unit tests in
//! `agent/src/hooks.rs`. The README's "Faults and hostile input" table lists them all.
//!
//! What every cell checks afterwards: the filesystems are writable (thawed) within the time a
//! user relies on (the channel-drop grace, the deadline), vssd still serves, and the report or
//! the error says what happened.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::rawapp::RawApp;
use tests::*;

/// The channel-drop grace the cells run with, and the deadline (long enough that a thaw by
/// the grace is told apart from one by the deadline).
const GRACE_S: u64 = 1;
const DEADLINE_S: u64 = 10;

/// The reason of vssd's last thaw by itself. The filesystems thaw first and the report is
/// recorded after the thaw hooks ran, so a test that saw them writable waits for it (3 s).
fn last_auto_thaw_reason(c: &mut QgaClient) -> String {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let st = c.ok("vssd-status", None);
        match st["last-auto-thaw"]["reason"].as_str() {
            Some(r) => return r.to_string(),
            None if Instant::now() >= end => return "none".into(),
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn hook(sb: &Sandbox, name: &str, body: &str) -> PathBuf {
    let d = sb.hooks_dir();
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A host that sends one command and hangs up without reading the reply.
fn request_then_hang_up(sock: &Path, command: &str) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes()).unwrap();
    // Long enough for vssd to read the request before the connection goes.
    thread::sleep(Duration::from_millis(100));
}

/// An app that answers PREPARE after `prepare` and FREEZE after `freeze`, then waits for THAW
/// (answered) until its connection ends; returns how many THAWs it got.
fn slow_app(sock: &Path, name: &str, prepare: Duration, freeze: Duration) -> thread::JoinHandle<usize> {
    let mut a = RawApp::register(sock, name);
    thread::spawn(move || {
        let mut thaws = 0;
        while let Some(m) = a.recv() {
            let id = m["id"].clone();
            match m["type"].as_str() {
                Some("prepare") => {
                    thread::sleep(prepare);
                    a.send(&json!({"type": "ready", "re": id}));
                }
                Some("freeze") => {
                    thread::sleep(freeze);
                    a.send(&json!({"type": "held", "re": id}));
                }
                Some("thaw") => {
                    thaws += 1;
                    a.send(&json!({"type": "thawed", "re": id}));
                    return thaws;
                }
                _ => {}
            }
        }
        thaws
    })
}

/// The cell: the host hangs up while a freeze is at `step` (which takes 1.5 s). Expected: the
/// freeze completes, then the grace (1 s) thaws it, long before the 10 s deadline; the
/// reason is `channel-closed`; vssd serves the next host.
fn host_hangs_up_during(step: &str) {
    let sb = Sandbox::new(&format!("hangup_{step}"));
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let slow = Duration::from_millis(1500);
    if step == "hooks" {
        hook(&sb, "10-slow", "[ \"$1\" = freeze ] && sleep 1.5; exit 0");
    }
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let app = match step {
        "prepare" => Some(slow_app(&sb.app_socket(), "slow-prepare", slow, Duration::ZERO)),
        "app-freeze" => Some(slow_app(&sb.app_socket(), "slow-freeze", Duration::ZERO, slow)),
        _ => None,
    };
    let t0 = Instant::now();
    request_then_hang_up(v.socket(), "guest-fsfreeze-freeze");
    // The freeze goes on to its end (the apps hold, the filesystems freeze)...
    let mut c = v.client();
    let end = Instant::now() + Duration::from_secs(5);
    // (vssd-status tells freezing from frozen; guest-fsfreeze-status says "frozen" for both,
    // as qemu-ga does.)
    while c.ok("vssd-status", None)["state"] != json!("frozen") {
        assert!(Instant::now() < end, "{step}: the freeze of a host that hung up never completed");
        thread::sleep(Duration::from_millis(20));
    }
    let frozen_at = Instant::now();
    // ...and ends by the grace: 1.5 s of step + 1 s of grace, with a margin, and well before
    // the 10 s deadline.
    assert_writable(&e, Duration::from_secs(7), &format!("{step}: thawed by the channel-drop grace"));
    assert_writable(&x, Duration::from_secs(1), step);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(7), "{step}: thawed only after {took:?}");
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(500),
        "{step}: thawed {:?} after the freeze, before the grace",
        frozen_at.elapsed()
    );
    assert_eq!(last_auto_thaw_reason(&mut c), "channel-closed", "{step}");
    if let Some(a) = app {
        assert_eq!(a.join().unwrap(), 1, "{step}: the app gets exactly one THAW");
    }
    // vssd serves the next host.
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn host_hangs_up_during_app_prepare_then_the_grace_thaws_and_vssd_serves() {
    require_root!();
    host_hangs_up_during("prepare");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn host_hangs_up_during_app_freeze_then_the_grace_thaws_and_vssd_serves() {
    require_root!();
    host_hangs_up_during("app-freeze");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn host_hangs_up_during_the_freeze_hooks_then_the_grace_thaws_and_vssd_serves() {
    require_root!();
    host_hangs_up_during("hooks");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn host_hangs_up_during_a_thaw_then_the_thaw_completes_and_vssd_serves() {
    require_root!();
    let sb = Sandbox::new("hangup_thaw");
    let e = sb.ext4("e");
    let log = sb.root().join("hook.log");
    hook(&sb, "10-slow-thaw", &format!("echo $1 >> {}; [ \"$1\" = thaw ] && sleep 1.5; exit 0", log.display()));
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let mut c = v.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    // The thaw's host goes away while the thaw hook runs.
    request_then_hang_up(v.socket(), "guest-fsfreeze-thaw");
    // Filesystems thaw first, before the hooks.
    assert_writable(&e, Duration::from_secs(1), "the filesystems thaw before the thaw hooks");
    thread::sleep(Duration::from_millis(2000));
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze\nthaw\n", "the thaw hook ran once, to its end");
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
}

/// The cell: vssd is SIGKILLed while a freeze is at `step`. Expected: nothing is left frozen
/// once the next start is up, which thaws what the marker lists, runs the thaw hooks of
/// freeze hooks that ran, and reports `recovered-after-crash`; a kill before FIFREEZE leaves
/// nothing frozen even before.
fn vssd_killed_during(step: &str) {
    let sb = Sandbox::new(&format!("kill_{step}"));
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let marker = sb.state_dir().join("frozen.json");
    let hook_log = sb.root().join("hook.log");
    let body = match step {
        "hooks" => format!("echo $1 >> {}; [ \"$1\" = freeze ] && sleep 3; exit 0", hook_log.display()),
        "thaw-hooks" => format!("echo $1 >> {}; [ \"$1\" = thaw ] && sleep 3; exit 0", hook_log.display()),
        _ => format!("echo $1 >> {}", hook_log.display()),
    };
    hook(&sb, "10-h", &body);
    let mut v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let app = match step {
        "prepare" => Some(slow_app(&sb.app_socket(), "slow", Duration::from_secs(3), Duration::ZERO)),
        "app-freeze" => Some(slow_app(&sb.app_socket(), "slow", Duration::ZERO, Duration::from_secs(3))),
        _ => None,
    };
    let sock = v.socket().to_path_buf();
    let host = thread::spawn(move || {
        let mut c = QgaClient::connect(&sock).unwrap();
        if c.exchange("guest-fsfreeze-freeze", None).is_ok() {
            thread::sleep(Duration::from_millis(600));
            let _ = c.exchange("guest-fsfreeze-thaw", None);
        }
    });
    match step {
        "prepare" | "app-freeze" | "hooks" => thread::sleep(Duration::from_millis(1000)),
        "frozen" | "thaw-hooks" => {
            // Until the freeze is in force (and, for thaw-hooks, the thaw hook is running).
            let end = Instant::now() + Duration::from_secs(8);
            let want = if step == "frozen" { "freeze\n" } else { "freeze\nthaw\n" };
            while std::fs::read_to_string(&hook_log).unwrap_or_default() != want || !marker.exists() {
                assert!(Instant::now() < end, "{step}: never reached the step");
                thread::sleep(Duration::from_millis(5));
            }
            if step == "frozen" {
                thread::sleep(Duration::from_millis(100));
            }
        }
        _ => unreachable!(),
    }
    let had_marker = marker.exists();
    v.kill9();
    let _ = host.join();
    match step {
        "prepare" | "app-freeze" => {
            assert!(!had_marker, "{step}: no marker before the freeze hooks");
            assert_writable(&e, Duration::from_secs(1), &format!("{step}: nothing froze before the kill"));
        }
        "hooks" => {
            assert!(had_marker, "hooks: the marker lists the hooks before they run");
            assert_writable(&e, Duration::from_secs(1), "hooks: nothing froze before the kill");
        }
        "frozen" => {
            assert!(had_marker, "frozen: the marker lists what is frozen");
            let _p = assert_frozen(&e, Duration::from_millis(500), "frozen: nobody is left to thaw");
        }
        _ => assert!(had_marker, "thaw-hooks: the marker stays until the thaw hooks are done"),
    }
    v.restart();
    assert_writable(&e, Duration::from_secs(2), &format!("{step}: the next start thaws"));
    assert_writable(&x, Duration::from_secs(1), step);
    assert!(!marker.exists(), "{step}: the marker is gone after recovery");
    let mut c = v.client();
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    let reason = last_auto_thaw_reason(&mut c);
    if had_marker {
        assert_eq!(reason, "recovered-after-crash", "{step}");
    } else {
        assert_eq!(reason, "none", "{step}: nothing to recover");
    }
    if had_marker {
        let log = std::fs::read_to_string(&hook_log).unwrap();
        assert!(log.ends_with("thaw\n"), "{step}: recovery runs the thaw hooks: {log:?}");
    }
    drop(app);
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_during_app_prepare_leaves_nothing_frozen_and_restarts_clean() {
    require_root!();
    vssd_killed_during("prepare");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_during_the_apps_freeze_leaves_nothing_frozen_and_restarts_clean() {
    require_root!();
    vssd_killed_during("app-freeze");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_during_the_freeze_hooks_leaves_nothing_frozen_and_the_next_start_runs_the_thaw_hooks() {
    require_root!();
    vssd_killed_during("hooks");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_while_frozen_is_thawed_by_the_next_start_with_its_thaw_hooks() {
    require_root!();
    vssd_killed_during("frozen");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_during_the_thaw_hooks_reruns_them_at_the_next_start() {
    require_root!();
    vssd_killed_during("thaw-hooks");
}

/// A small xorshift generator: the rounds differ from run to run, and the seed is printed so
/// a failing run can be repeated (`FAULT_SEED`).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("FAULT_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_at_random_moments_of_freeze_and_thaw_is_always_recovered_by_the_next_start() {
    require_root!();
    let rounds: usize = std::env::var("FAULT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    let sb = Sandbox::new("kill_random");
    let fs = [sb.ext4("e1"), sb.ext4("e2"), sb.xfs("x")];
    let marker = sb.state_dir().join("frozen.json");
    let mut v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let mut rng = Rng::seeded();
    let (mut while_marked, mut while_clean) = (0, 0);
    for round in 0..rounds {
        for f in &fs {
            sb.dirty(f);
        }
        let sock = v.socket().to_path_buf();
        let host = thread::spawn(move || {
            let Ok(mut c) = QgaClient::connect(&sock) else { return };
            loop {
                if c.exchange("guest-fsfreeze-freeze", None).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
                if c.exchange("guest-fsfreeze-thaw", None).is_err() {
                    return;
                }
            }
        });
        thread::sleep(Duration::from_millis(rng.below(120)));
        let had_marker = marker.exists();
        v.kill9();
        let _ = host.join();
        if had_marker {
            while_marked += 1;
        } else {
            while_clean += 1;
        }
        v.restart();
        for f in &fs {
            assert_writable(f, Duration::from_secs(2), &format!("round {round}: after the next start"));
        }
        assert!(!marker.exists(), "round {round}: the marker is gone after the next start");
        let mut c = v.client();
        assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"), "round {round}");
        if had_marker {
            assert_eq!(last_auto_thaw_reason(&mut c), "recovered-after-crash", "round {round}");
        }
    }
    eprintln!("{rounds} rounds: killed {while_marked} times with the marker written, {while_clean} times without");
    assert!(while_marked > 0, "no round killed vssd while frozen: the loop tests nothing");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn two_channels_freezing_at_the_same_moment_get_one_freeze_and_either_can_thaw_it() {
    require_root!();
    let sb = Sandbox::new("two_channels");
    let e = sb.ext4("e");
    let _x = sb.xfs("x");
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let barrier = Arc::new(Barrier::new(2));
    let hosts: Vec<_> = (0..2)
        .map(|_| {
            let (sock, b) = (v.socket().to_path_buf(), barrier.clone());
            thread::spawn(move || {
                let mut c = QgaClient::connect(&sock).unwrap();
                b.wait();
                let r = c.call("guest-fsfreeze-freeze", None);
                (c, r)
            })
        })
        .collect();
    let mut results: Vec<(QgaClient, Value)> = hosts.into_iter().map(|h| h.join().unwrap()).collect();
    results.sort_by_key(|(_, r)| error_class(r).is_some());
    assert_eq!(
        results[0].1["return"],
        json!(2),
        "one freeze wins: {:?}",
        results.iter().map(|r| &r.1).collect::<Vec<_>>()
    );
    // As qemu-ga: the command is disabled while frozen.
    let desc = expect_error(&results[1].1, "CommandNotFound", "the other freeze is refused");
    assert!(desc.contains("frozen state"), "the refusal says it is already frozen: {desc}");
    let _p = assert_frozen(&e, Duration::from_millis(300), "the winner's freeze is in force");
    // A thaw from the channel that did not freeze thaws it (as a host reconnecting would).
    let (mut loser, _) = results.pop().unwrap();
    assert_eq!(loser.ok("guest-fsfreeze-thaw", None), json!(2));
    assert_writable(&e, Duration::from_secs(1), "thawed by the other channel");
    // The winner's own thaw then finds nothing to do, and says so without an error.
    let (mut winner, _) = results.pop().unwrap();
    assert_eq!(winner.ok("guest-fsfreeze-thaw", None), json!(0));
    assert_eq!(winner.ok("guest-fsfreeze-status", None), json!("thawed"));
}

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn hundreds_of_app_connections_that_never_say_hello_do_not_stop_a_freeze_or_a_real_app() {
    require_root!();
    let sb = Sandbox::new("silent_conns");
    let e = sb.ext4("e");
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let before = fd_count(v.pid());
    let silent: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(sb.app_socket()).unwrap()).collect();
    // Half of them sent half a line.
    for s in silent.iter().step_by(2) {
        let _ = (&*s).write_all(b"{\"type\":\"hel");
    }
    let app = slow_app(&sb.app_socket(), "real", Duration::ZERO, Duration::ZERO);
    let mut c = v.client();
    let t0 = Instant::now();
    let r = c.ok("vssd-freeze", None);
    assert!(t0.elapsed() < Duration::from_secs(3), "freeze took {:?} beside 300 silent peers", t0.elapsed());
    assert_eq!(r["frozen"], 1, "{r}");
    assert_eq!(r["consistency"], "application", "the real app held: {r}");
    let _p = assert_frozen(&e, Duration::from_millis(200), "frozen");
    c.ok("vssd-thaw", None);
    assert_eq!(app.join().unwrap(), 1);
    drop(silent);
    // Their descriptors are given back once they go.
    let end = Instant::now() + Duration::from_secs(5);
    while fd_count(v.pid()) > before + 5 && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(fd_count(v.pid()) <= before + 5, "fds {} after, {before} before", fd_count(v.pid()));
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn an_app_that_floods_while_holding_and_never_reads_cannot_delay_the_thaw_or_other_apps() {
    require_root!();
    let sb = Sandbox::new("flood_app");
    let e = sb.ext4("e");
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).start();
    let good = slow_app(&sb.app_socket(), "good", Duration::ZERO, Duration::ZERO);
    let mut flood = RawApp::register(&sb.app_socket(), "flood");
    let flooder = thread::spawn(move || {
        let p = flood.expect("prepare");
        flood.send(&json!({"type": "ready", "re": p["id"]}));
        let f = flood.expect("freeze");
        flood.send(&json!({"type": "held", "re": f["id"]}));
        // Answers twice, then floods replies nobody asked for, never reading what vssd says.
        flood.send(&json!({"type": "held", "re": f["id"]}));
        let line = serde_json::to_vec(&json!({"type": "held", "re": 424242})).unwrap();
        let mut burst = Vec::new();
        for _ in 0..2000 {
            burst.extend_from_slice(&line);
            burst.push(b'\n');
        }
        flood.w.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if flood.w.write_all(&burst).is_err() {
                thread::sleep(Duration::from_millis(10));
            }
        }
        flood
    });
    let mut c = v.client();
    let r = c.ok("vssd-freeze", None);
    assert_eq!(r["consistency"], "application", "{r}");
    thread::sleep(Duration::from_millis(1000)); // the flood is under way
    let t0 = Instant::now();
    let th = c.ok("vssd-thaw", None);
    assert!(t0.elapsed() < Duration::from_secs(2), "the thaw waited {:?} on a flooding app", t0.elapsed());
    assert_eq!(th["thawed"], 1, "{th}");
    assert_writable(&e, Duration::from_secs(1), "after the thaw");
    assert_eq!(good.join().unwrap(), 1, "the other app got its THAW");
    let flood = flooder.join().unwrap();
    // vssd still serves hosts while the flooder is connected.
    c.ok("guest-ping", None);
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
    drop(flood);
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_failing_a_chatty_and_a_daemonising_hook_are_reported_and_never_hold_the_freeze_up() {
    require_root!();
    let sb = Sandbox::new("hooks_bad");
    let e = sb.ext4("e");
    // Prints 16 MiB, leaves a child holding its output for 60 s, then fails at thaw.
    hook(&sb, "10-chatty", "[ \"$1\" = freeze ] && head -c 16777216 /dev/zero | tr '\\0' x; echo CHATTY-END; exit 0");
    let pids = sb.root().join("daemon.pids");
    hook(&sb, "20-daemon", &format!("sleep 60 & echo $! >> {}; echo daemon started; exit 0", pids.display()));
    hook(&sb, "30-fail-at-thaw", "[ \"$1\" = thaw ] && { echo 'cache flush failed' >&2; exit 4; }; exit 0");
    let v = Vssd::builder(&sb).deadline(DEADLINE_S).grace(GRACE_S).arg("--hook-deadline").arg("5").start();
    let mut c = v.client();
    let t0 = Instant::now();
    let r = c.ok("vssd-freeze", None);
    assert!(t0.elapsed() < Duration::from_secs(4), "the freeze waited {:?} on its hooks", t0.elapsed());
    assert_eq!(r["frozen"], 1, "{r}");
    let hooks = r["hooks"].as_array().unwrap();
    assert!(hooks.iter().all(|h| h["outcome"] == "ok"), "{r}");
    assert!(hooks[0]["output"].as_str().unwrap().ends_with("CHATTY-END"), "the end of the output is kept");
    assert!(hooks[0]["output"].as_str().unwrap().len() < 4096, "only the end of the output is kept");
    let th = c.call("vssd-thaw", None);
    assert_writable(&e, Duration::from_secs(1), "thawed whatever the hooks did");
    let text = th.to_string();
    assert!(text.contains("cache flush failed"), "the failed thaw hook is reported with its output: {th}");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
    // The daemonised children do not hold vssd's next freeze up either.
    let t0 = Instant::now();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    let _ = c.call("guest-fsfreeze-thaw", None);
    for pid in std::fs::read_to_string(&pids).unwrap().split_whitespace() {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.parse().unwrap()), nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn a_process_outside_root_and_the_vssd_group_cannot_register_an_app() {
    require_root!();
    let py = Path::new("/usr/bin/python3");
    assert!(py.is_file(), "this test connects as user nobody with {}: apt-get install python3-minimal", py.display());
    let sb = Sandbox::new("app_uid");
    let _e = sb.ext4("e");
    let v = Vssd::start(&sb);
    // Let nobody reach the socket's directory, so that only the socket's own mode decides.
    for d in [sb.root().to_path_buf(), sb.state_dir()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let connect = |uid: u32, gid: u32| {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(py)
            .arg("-c")
            .arg(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect(sys.argv[1])\nexcept PermissionError:\n  sys.exit(13)\n\
                 s.sendall(b'{\"type\":\"hello\",\"id\":1,\"name\":\"intruder\",\"min_version\":1,\"max_version\":1}\\n')\nprint(s.recv(4096).decode())",
            )
            .arg(sb.app_socket())
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, said) = connect(65534, 65534);
    assert_eq!(code, Some(13), "user nobody got through to the app socket: {said}");
    // Root still registers, and nobody's attempt did not disturb vssd.
    let (code, said) = connect(0, 0);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("welcome"), "{said}");
    let mut c = v.client();
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(1));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(1));
}

/// Between the filesystems of one freeze, on real filesystems: `inner` lives in an image on
/// `outer`, so the plan freezes inner (level 0), then outer (level 1); vssd's test-only
/// `VSSD_TEST_FAULT=slow-freeze:OUTER:MS` holds outer's FIFREEZE back for 3 s. Returns once
/// inner is frozen and outer still takes writes: the moment between the two.
fn between_filesystems(sb: &Sandbox) -> (PathBuf, PathBuf, Vssd<'_>, UnixStream, WriteProbe) {
    let outer = sb.ext4("outer");
    let inner = sb.nested(Fs::Ext4, &outer, "inner");
    let v = Vssd::builder(sb)
        .deadline(DEADLINE_S)
        .grace(GRACE_S)
        .env("VSSD_TEST_FAULT", format!("slow-freeze:{}:3000", outer.display()))
        .start();
    let mut host = UnixStream::connect(v.socket()).unwrap();
    host.write_all(b"{\"execute\":\"guest-fsfreeze-freeze\"}\n").unwrap();
    // (Observed by writes only: a probing FIFREEZE of our own would race vssd's.)
    let end = Instant::now() + Duration::from_secs(2);
    let blocked = loop {
        let mut p = WriteProbe::start(&inner);
        if p.wait(Duration::from_millis(150)).is_none() {
            break p;
        }
        assert!(Instant::now() < end, "inner never froze");
    };
    assert_writable(&outer, Duration::from_secs(1), "outer, level 1, not frozen yet");
    (outer, inner, v, host, blocked)
}

/// The cell: the host hangs up between the filesystems of its freeze. Expected: the freeze
/// completes (outer freezes too), then the channel-drop grace thaws both, long before the
/// deadline (`channel-closed`); vssd serves the next host.
#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn host_hangs_up_between_the_filesystems_of_a_freeze_then_the_grace_thaws_both() {
    require_root!();
    let sb = Sandbox::new("hangup_between");
    let t0 = Instant::now();
    let (outer, _inner, v, host, mut blocked) = between_filesystems(&sb);
    drop(host);
    let mut c = v.client();
    let end = Instant::now() + Duration::from_secs(6);
    while c.ok("vssd-status", None)["state"] != json!("frozen") {
        assert!(Instant::now() < end, "the freeze of a host that hung up never completed");
        thread::sleep(Duration::from_millis(20));
    }
    blocked.assert_completes(Duration::from_secs(5), "inner: thawed by the channel-drop grace");
    assert_writable(&outer, Duration::from_secs(1), "outer: thawed with it");
    assert!(t0.elapsed() < Duration::from_secs(9), "thawed only after {:?} (deadline 10 s)", t0.elapsed());
    assert_eq!(last_auto_thaw_reason(&mut c), "channel-closed");
    assert_eq!(c.ok("guest-fsfreeze-freeze", None), json!(2));
    assert_eq!(c.ok("guest-fsfreeze-thaw", None), json!(2));
}

/// The cell: vssd SIGKILLed between the filesystems of a freeze. Expected: the marker, written
/// before the first FIFREEZE, lists both; inner stays frozen with nobody to thaw it until the
/// next start, which thaws it (outer, never frozen, counts as thawed) and reports
/// `recovered-after-crash`.
#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn vssd_killed_between_the_filesystems_of_a_freeze_is_thawed_by_the_next_start() {
    require_root!();
    let sb = Sandbox::new("kill_between");
    let (outer, inner, mut v, _host, mut blocked) = between_filesystems(&sb);
    let marker = sb.state_dir().join("frozen.json");
    let listed = std::fs::read_to_string(&marker).expect("the marker is written before the first FIFREEZE");
    for m in [&inner, &outer] {
        assert!(listed.contains(m.to_str().unwrap()), "the marker lists {}: {listed}", m.display());
    }
    v.kill9();
    let mut still = assert_frozen(&inner, Duration::from_millis(500), "inner, with vssd gone");
    assert_writable(&outer, Duration::from_secs(1), "outer never froze");
    v.restart();
    still.assert_completes(Duration::from_secs(2), "inner: thawed by the next start");
    blocked.assert_completes(Duration::from_secs(1), "inner's first writer");
    assert!(!marker.exists(), "the marker is gone after recovery");
    let mut c = v.client();
    assert_eq!(last_auto_thaw_reason(&mut c), "recovered-after-crash");
    assert_eq!(c.ok("guest-fsfreeze-status", None), json!("thawed"));
}
