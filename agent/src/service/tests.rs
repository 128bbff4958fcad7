//! The service without root: a scripted kernel, scripted apps, a mount table of the test's
//! own (the config's `mountinfo` and `sysfs` paths are the seam), and tokio's paused clock
//! for the timers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::testkit::{self, FakeApps};
use super::*;
use crate::apps::Answer;
use crate::engine::fake::FakeKernel;
use crate::engine::{FrozenFs, Kernel};

const DEADLINE: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(5);
const MS: Duration = Duration::from_millis(1);

/// An agent over three filesystems, /s/a /s/b /s/c, one level, and a vfat /s/vfat that
/// cannot freeze (skipped by default).
struct Rig {
    _dir: tempfile::TempDir,
    agent: Arc<Agent>,
    kernel: Arc<FakeKernel>,
    apps: Option<Arc<FakeApps>>,
    marker: PathBuf,
    /// (call, whether the marker existed when it was made), for every kernel call.
    seen: Arc<Mutex<Vec<(String, bool)>>>,
}

fn config(dir: &Path) -> Config {
    Config { channel_drop_grace: GRACE.as_secs_f64(), ..testkit::config(dir, DEADLINE) }
}

fn rig_with(kernel: Arc<FakeKernel>, apps: Option<FakeApps>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let marker = cfg.state_dir.join("frozen.json");
    let seen = Arc::new(Mutex::new(vec![]));
    let (m, s) = (marker.clone(), seen.clone());
    let kernel = kernel.observe(move |op, p| s.lock().unwrap().push((format!("{op} {}", p.display()), m.exists())));
    let apps = apps.map(Arc::new);
    let coordinator = apps.clone().map(|a| a as Arc<dyn AppCoordinator>);
    let agent = Agent::with_coordinator(cfg, kernel.clone(), coordinator);
    Rig { _dir: dir, agent, kernel, apps, marker, seen }
}

fn rig() -> Rig {
    rig_with(FakeKernel::new(), None)
}

impl Rig {
    fn thaws(&self) -> Vec<String> {
        self.kernel.calls().into_iter().filter(|c| c.starts_with("thaw ")).collect()
    }
    fn last_auto_thaw(&self) -> serde_json::Value {
        self.agent.status_json()["last-auto-thaw"]["reason"].clone()
    }
    /// Every kernel call so far was made while the marker existed.
    fn assert_marker_seen_by_every_call(&self) {
        let seen = self.seen.lock().unwrap();
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|(_, m)| *m), "a kernel call without the marker: {seen:?}");
    }
}

/// Lets the auto-thaw that is due run to its end (on the paused clock, time moves only when
/// nothing else can run, and never while a blocking thread works).
async fn settle(a: &Agent) {
    for _ in 0..100 {
        if a.status() == "thawed" {
            return;
        }
        tokio::time::sleep(MS).await;
    }
    panic!("still {} after 100 ms", a.status_json()["state"]);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_thaws_at_the_deadline_not_before() {
    let r = rig();
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    tokio::time::sleep(DEADLINE - MS).await;
    assert_eq!(r.agent.status(), "frozen");
    assert!(r.thaws().is_empty());
    assert!(r.marker.exists());
    tokio::time::sleep(2 * MS).await;
    settle(&r.agent).await;
    assert_eq!(r.thaws().len(), 3);
    assert_eq!(r.last_auto_thaw(), "deadline");
    assert!(!r.marker.exists());
    // The host's next thaw hears of it, once.
    assert!(matches!(r.agent.thaw().await, Err(AgentError::AlreadyAutoThawed(_))));
    assert_eq!(r.agent.thaw().await.unwrap().thawed, 0);
}

#[tokio::test(start_paused = true)]
async fn subscribers_see_the_freeze_the_thaw_and_the_auto_thaw() {
    let r = rig();
    let mut rx = r.agent.watch_state();
    assert_eq!(rx.borrow_and_update().state, "thawed");
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    assert!(rx.has_changed().unwrap());
    let v = rx.borrow_and_update().clone();
    assert_eq!((v.state, v.filesystems, v.last_auto_thaw), ("frozen", 3, None));
    assert_eq!(v.deadline, r.agent.lock().life.frozen().map(|s| s.deadline));
    r.agent.thaw().await.unwrap();
    let v = rx.borrow_and_update().clone();
    assert_eq!((v.state, v.filesystems, v.deadline), ("thawed", 0, None));
    // A status query changes nothing, so it publishes nothing.
    let _ = r.agent.status_json();
    assert!(!rx.has_changed().unwrap());
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    tokio::time::sleep(DEADLINE + MS).await;
    settle(&r.agent).await;
    let v = rx.borrow_and_update().clone();
    assert_eq!((v.state, v.last_auto_thaw), ("thawed", Some(AutoThawReason::Deadline)));
}

#[tokio::test(start_paused = true)]
async fn a_request_deadline_overrides_the_configured_one() {
    let r = rig();
    r.agent.freeze(FreezeRequest { deadline: Some(Duration::from_secs(2)), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2) - MS).await;
    assert_eq!(r.agent.status(), "frozen");
    tokio::time::sleep(2 * MS).await;
    settle(&r.agent).await;
    assert_eq!(r.last_auto_thaw(), "deadline");
}

#[tokio::test(start_paused = true)]
async fn a_closed_channel_thaws_after_the_grace() {
    let r = rig();
    r.agent.freeze(FreezeRequest { owner: Some(7), ..Default::default() }).await.unwrap();
    r.agent.channel_closed(7);
    tokio::time::sleep(GRACE - MS).await;
    assert_eq!(r.agent.status(), "frozen");
    tokio::time::sleep(2 * MS).await;
    settle(&r.agent).await;
    assert_eq!(r.thaws().len(), 3);
    assert_eq!(r.last_auto_thaw(), "channel-closed");
    assert!(!r.marker.exists());
}

#[tokio::test(start_paused = true)]
async fn a_channel_that_comes_back_within_the_grace_keeps_the_freeze() {
    let r = rig();
    r.agent.freeze(FreezeRequest { owner: Some(7), ..Default::default() }).await.unwrap();
    r.agent.channel_closed(7);
    tokio::time::sleep(GRACE / 2).await;
    r.agent.channel_reopened(7);
    tokio::time::sleep(GRACE).await;
    assert_eq!(r.agent.status(), "frozen");
    assert!(r.thaws().is_empty());
    assert_eq!(r.agent.thaw().await.unwrap().thawed, 3);
}

#[tokio::test(start_paused = true)]
async fn closing_a_channel_that_does_not_own_the_freeze_changes_nothing() {
    let r = rig();
    r.agent.freeze(FreezeRequest { owner: Some(7), ..Default::default() }).await.unwrap();
    r.agent.channel_closed(8);
    tokio::time::sleep(GRACE + MS).await;
    assert_eq!(r.agent.status(), "frozen");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_of_an_earlier_freeze_never_thaws_a_later_one() {
    let r = rig();
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    tokio::time::sleep(DEADLINE / 2).await;
    r.agent.thaw().await.unwrap();
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    // The first freeze's deadline passes: its timer finds another generation.
    tokio::time::sleep(DEADLINE / 2 + MS).await;
    assert_eq!(r.agent.status(), "frozen");
    assert_eq!(r.thaws().len(), 3, "only the host's thaw so far");
    // The second one's own deadline still holds.
    tokio::time::sleep(DEADLINE / 2).await;
    settle(&r.agent).await;
    assert_eq!(r.thaws().len(), 6);
    assert_eq!(r.last_auto_thaw(), "deadline");
}

#[tokio::test(start_paused = true)]
async fn a_grace_timer_of_an_earlier_freeze_never_thaws_a_later_one() {
    let r = rig();
    r.agent.freeze(FreezeRequest { owner: Some(7), ..Default::default() }).await.unwrap();
    r.agent.channel_closed(7);
    r.agent.thaw().await.unwrap();
    // Bound to no channel (as from vssctl): only the generation check stops the old timer.
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    tokio::time::sleep(GRACE + MS).await;
    assert_eq!(r.agent.status(), "frozen");
    assert_eq!(r.thaws().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_thaws_what_is_frozen() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1, 2])));
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    r.agent.shutdown().await;
    assert_eq!(r.agent.status(), "thawed");
    assert_eq!(r.thaws().len(), 3);
    assert_eq!(r.last_auto_thaw(), "shutdown");
    assert_eq!(r.apps.as_ref().unwrap().log().last().unwrap(), "thaw [1, 2] 1 Timeout");
    assert!(!r.marker.exists());
    r.agent.shutdown().await; // nothing frozen: nothing to do
    assert_eq!(r.thaws().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_freeze_waits_for_it_and_thaws() {
    let apps = FakeApps { prepare_takes: Duration::from_secs(1), ..FakeApps::new(&[1]) };
    let r = rig_with(FakeKernel::new(), Some(apps));
    let a = r.agent.clone();
    let freezing = tokio::spawn(async move { a.freeze(FreezeRequest::default()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.agent.status_json()["state"], "freezing");
    r.agent.shutdown().await;
    freezing.await.unwrap().unwrap();
    assert_eq!(r.agent.status(), "thawed");
    assert_eq!(r.thaws().len(), 3);
    assert!(!r.marker.exists());
}

#[tokio::test]
async fn a_failing_fifreeze_thaws_what_was_frozen_and_apps_get_thaw_aborted() {
    let r = rig_with(FakeKernel::new().fail_freeze("/s/b", libc::EIO), Some(FakeApps::new(&[1, 2])));
    let err = r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    assert!(matches!(err, AgentError::Freeze(_)), "{err}");
    let mut thaws = r.thaws();
    thaws.sort();
    assert_eq!(thaws, ["thaw /s/a", "thaw /s/c"], "thaws what froze, not what failed");
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "freeze [1, 2] 1", "thaw [1, 2] 1 Aborted"]);
    assert_eq!(r.agent.status(), "thawed");
    r.assert_marker_seen_by_every_call();
    assert!(!r.marker.exists());
    // And the next freeze works.
    r.agent.thaw().await.unwrap();
}

#[tokio::test]
async fn a_fifreeze_worker_that_panics_ends_like_any_failure() {
    let r = rig_with(FakeKernel::new().panic_on_freeze(3), Some(FakeApps::new(&[1])));
    let err = r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    let calls = r.kernel.calls();
    let freezes: Vec<&str> = calls.iter().filter_map(|c| c.strip_prefix("freeze ")).collect();
    assert_eq!(freezes.len(), 3);
    for m in &freezes[..2] {
        assert!(calls.contains(&format!("thaw {m}")), "{m} froze and must be thawed: {calls:?}");
    }
    // The marker stayed until the last FITHAW was done, and went after.
    r.assert_marker_seen_by_every_call();
    assert!(!r.marker.exists());
    assert_eq!(r.agent.status(), "thawed");
    assert_eq!(r.apps.as_ref().unwrap().log().last().unwrap(), "thaw [1] 1 Aborted");
}

#[tokio::test]
async fn a_step_that_dies_after_the_marker_thaws_everything_the_marker_lists() {
    let r = rig();
    let fs = |m: &str| FrozenFs { mount_point: m.into(), fstype: "ext4".into(), dev: "7:0".parse().unwrap(), level: 0 };
    r.agent.marker.write(&[fs("/s/a"), fs("/s/c")], &[], false).unwrap();
    r.agent.lock().life.begin_freeze().unwrap();
    let join = tokio::spawn(async { panic!("a step dies") }).await.unwrap_err();
    let e = AgentError::Step { step: "filesystem", source: join };
    r.agent.abort(&e, &Engaged::default(), 1).await;
    let mut thaws = r.thaws();
    thaws.sort();
    assert_eq!(thaws, ["thaw /s/a", "thaw /s/c"]);
    r.assert_marker_seen_by_every_call();
    assert!(!r.marker.exists());
    assert_eq!(r.agent.status(), "thawed");
}

#[tokio::test]
async fn the_marker_exists_exactly_while_something_is_frozen() {
    let r = rig();
    assert!(!r.marker.exists());
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    assert!(r.marker.exists());
    let listed = crate::marker::Marker::new(r.marker.clone()).read().unwrap().filesystems;
    assert_eq!(listed.len(), 3);
    r.agent.thaw().await.unwrap();
    assert!(!r.marker.exists());
    r.assert_marker_seen_by_every_call();
    assert_eq!(r.seen.lock().unwrap().len(), 6);
    // A freeze that freezes nothing leaves no marker.
    r.agent.freeze(FreezeRequest { mountpoints: Some(vec!["/s/vfat".into()]), ..Default::default() }).await.unwrap();
    assert_eq!(r.agent.status(), "thawed");
    assert!(!r.marker.exists());
}

#[tokio::test]
async fn a_vetoed_plan_never_has_an_app_hold() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    let req = FreezeRequest {
        mountpoints: Some(vec!["/s/vfat".into()]),
        cannot_freeze: Some(CannotFreezePolicy::Veto),
        ..Default::default()
    };
    let err = r.agent.freeze(req).await.unwrap_err();
    assert!(matches!(err, AgentError::Vetoed(_)), "{err}");
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
    assert!(r.kernel.calls().is_empty());
    assert!(!r.marker.exists());
}

#[tokio::test]
async fn an_app_that_vetoes_fails_the_freeze_under_policy_fail() {
    let apps = FakeApps { prepare: Answer::Vetoed, ..FakeApps::new(&[1]) };
    let r = rig_with(FakeKernel::new(), Some(apps));
    let req = FreezeRequest { app_failure: Some(AppFailurePolicy::Fail), ..Default::default() };
    let err = r.agent.freeze(req).await.unwrap_err();
    assert!(matches!(err, AgentError::AppFailed(_)), "{err}");
    assert!(r.kernel.calls().is_empty());
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
}

#[tokio::test]
async fn apps_that_hold_make_the_freeze_application_consistent() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1, 2])));
    let rep = r.agent.freeze(FreezeRequest::default()).await.unwrap();
    assert_eq!((rep.frozen, rep.consistency, rep.apps.len()), (3, "application", 2));
    for step in ["apps-prepared", "planned", "apps-held", "marker-written", "filesystems-frozen"] {
        assert!(rep.steps.contains_key(step), "{step} missing: {:?}", rep.steps);
    }
    r.agent.thaw().await.unwrap();
    assert_eq!(r.apps.as_ref().unwrap().log().last().unwrap(), "thaw [1, 2] 1 Completed");
}

#[tokio::test]
async fn without_apps_the_freeze_is_filesystem_consistent() {
    let r = rig();
    let rep = r.agent.freeze(FreezeRequest::default()).await.unwrap();
    assert_eq!((rep.frozen, rep.consistency), (3, "filesystem"));
    assert!(rep.steps.contains_key("planned") && !rep.steps.contains_key("apps-prepared"), "{:?}", rep.steps);
}

/// Records what the RCU knob read at each FIFREEZE.
struct KnobWatcher {
    knob: PathBuf,
    seen: Mutex<Vec<String>>,
}
impl Kernel for KnobWatcher {
    fn freeze(&self, _: &Path) -> std::io::Result<()> {
        self.seen.lock().unwrap().push(std::fs::read_to_string(&self.knob)?.trim().to_string());
        Ok(())
    }
    fn thaw(&self, _: &Path) -> std::io::Result<()> {
        Ok(())
    }
}

fn knob_agent(dir: &Path, knob_initial: &str, expedite: bool) -> (Arc<Agent>, Arc<KnobWatcher>, PathBuf) {
    let mi = dir.join("mountinfo");
    std::fs::write(&mi, "10 1 7:0 / /s/a rw - ext4 /dev/loop0 rw\n11 1 7:1 / /s/b rw - xfs /dev/loop1 rw\n").unwrap();
    let sys = dir.join("sys");
    std::fs::create_dir_all(sys.join("kernel")).unwrap();
    let knob = kmod_shim::rcu::knob(&sys);
    std::fs::write(&knob, knob_initial).unwrap();
    let k = Arc::new(KnobWatcher { knob: knob.clone(), seen: Mutex::new(vec![]) });
    let cfg = Config {
        scope: "/s".into(),
        mountinfo: mi,
        sysfs: sys,
        state_dir: dir.join("state"),
        hooks_dirs: vec![],
        rcu_expedite: expedite,
        ..Config::default()
    };
    (Agent::new(cfg, k.clone()), k, knob)
}

#[tokio::test]
async fn grace_periods_are_expedited_only_while_the_filesystems_freeze() {
    let d = tempfile::tempdir().unwrap();
    let (a, k, knob) = knob_agent(d.path(), "0\n", true);
    a.freeze(FreezeRequest::default()).await.unwrap();
    assert_eq!(*k.seen.lock().unwrap(), ["1", "1"], "each FIFREEZE ran expedited");
    assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0", "put back while still frozen");
    let t = a.thaw().await.unwrap();
    assert_eq!(t.thawed, 2);
    assert!(t.fs_thaw_ms > 0.0 && t.fs_thaw_ms <= t.elapsed_ms, "{t:?}");
}

#[tokio::test]
async fn the_knob_is_left_alone_when_configured_off_or_already_on() {
    let d = tempfile::tempdir().unwrap();
    let (a, k, knob) = knob_agent(d.path(), "0\n", false);
    a.freeze(FreezeRequest::default()).await.unwrap();
    a.thaw().await.unwrap();
    assert_eq!(*k.seen.lock().unwrap(), ["0", "0"]);
    assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0");

    let d = tempfile::tempdir().unwrap();
    let (a, k, knob) = knob_agent(d.path(), "1\n", true);
    a.freeze(FreezeRequest::default()).await.unwrap();
    a.thaw().await.unwrap();
    assert_eq!(*k.seen.lock().unwrap(), ["1", "1"]);
    assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "1", "the admin's setting survives");
}

#[tokio::test]
async fn recovery_turns_off_what_a_crashed_vssd_turned_on() {
    let d = tempfile::tempdir().unwrap();
    let (a, _k, knob) = knob_agent(d.path(), "1\n", true);
    let fs = FrozenFs { mount_point: "/s/a".into(), fstype: "ext4".into(), dev: "7:0".parse().unwrap(), level: 0 };
    a.marker.write(&[fs], &[], true).unwrap();
    a.recover();
    assert_eq!(std::fs::read_to_string(&knob).unwrap().trim(), "0");
    assert!(a.marker.read().is_none());
}

#[tokio::test]
async fn recovery_thaws_what_a_dead_vssd_left_frozen_and_tells_the_host_once() {
    let r = rig();
    let fs =
        |m: &str, d: &str| FrozenFs { mount_point: m.into(), fstype: "ext4".into(), dev: d.parse().unwrap(), level: 0 };
    // /s/b is now another device: not ours to thaw.
    r.agent.marker.write(&[fs("/s/a", "7:0"), fs("/s/b", "9:9")], &[], false).unwrap();
    r.agent.recover();
    assert_eq!(r.thaws(), ["thaw /s/a"]);
    assert!(!r.marker.exists());
    assert!(matches!(r.agent.thaw().await, Err(AgentError::AlreadyAutoThawed(_))));
}

/// The kinds of events in a subscription's queue so far.
fn events(s: &mut Subscription) -> Vec<String> {
    let mut out = vec![];
    while let Ok(ev) = s.events.try_recv() {
        out.push(match ev {
            Event::Frozen(r) => format!("frozen {}", r.frozen),
            Event::Thawed(r) => format!("thawed {}", r.thawed),
            Event::AutoThawed(a) => format!("auto-thawed {:?}", a.reason),
            Event::NotFrozen(r) => format!("not-frozen {}", r.is_some()),
            other => other.state().to_string(),
        });
    }
    out
}

#[tokio::test(start_paused = true)]
async fn observers_see_every_transition_with_its_report() {
    let r = rig();
    let mut s = r.agent.subscribe(16);
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    r.agent.thaw().await.unwrap();
    assert_eq!(events(&mut s), ["freezing", "frozen 3", "thawing", "thawed 3"]);
    r.agent.freeze(FreezeRequest { deadline: Some(Duration::from_secs(1)), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1) + MS).await;
    settle(&r.agent).await;
    assert_eq!(events(&mut s), ["freezing", "frozen 3", "thawing", "auto-thawed Deadline"]);
    // A thaw with nothing frozen is no transition.
    let _ = r.agent.thaw().await;
    assert_eq!(events(&mut s), Vec::<String>::new());
    assert_eq!(s.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_failed_freeze_is_seen_as_not_frozen_and_a_full_queue_never_blocks_it() {
    let r = rig_with(FakeKernel::new().fail_freeze("/s/b", libc::EIO), None);
    let mut s = r.agent.subscribe(1);
    r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    assert_eq!(events(&mut s), ["freezing"], "the queue holds one; the rest were dropped");
    assert_eq!(s.dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    assert_eq!(events(&mut s), ["freezing"]);
    let mut big = r.agent.subscribe(8);
    r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    assert_eq!(events(&mut big), ["freezing", "not-frozen false"]);
}

#[tokio::test]
async fn a_fithaw_that_fails_keeps_the_marker_so_a_later_start_or_thaw_still_thaws_it() {
    let r = rig_with(FakeKernel::new().fail_thaw("/s/b", libc::EIO), Some(FakeApps::new(&[1])));
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    let err = r.agent.thaw().await.unwrap_err();
    assert!(matches!(err, AgentError::ThawErrors(ref m) if m.contains("/s/b")), "{err}");
    assert_eq!(r.agent.status(), "thawed");
    let left = crate::marker::Marker::new(r.marker.clone()).read().expect("the marker must stay for /s/b");
    assert_eq!(left.filesystems.iter().map(|f| f.mount_point.clone()).collect::<Vec<_>>(), [PathBuf::from("/s/b")]);
    assert_eq!(r.apps.as_ref().unwrap().log().last().unwrap(), "thaw [1] 1 Completed", "apps are released anyway");
    // A freeze of /s/a only: its marker still lists /s/b, and its thaw retries /s/b.
    r.agent.freeze(FreezeRequest { mountpoints: Some(vec!["/s/a".into()]), ..Default::default() }).await.unwrap();
    let listed = crate::marker::Marker::new(r.marker.clone()).read().unwrap().filesystems;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let _ = r.agent.thaw().await;
    assert_eq!(r.thaws().iter().filter(|c| *c == "thaw /s/b").count(), 2, "{:?}", r.thaws());
    // A new vssd on the same state directory (after a crash) thaws it too.
    let cfg = config(r._dir.path());
    let k2 = FakeKernel::new();
    let again = Agent::with_coordinator(cfg, k2.clone(), None);
    again.recover();
    assert_eq!(k2.calls(), ["thaw /s/b"]);
    assert!(!r.marker.exists(), "thawed at last: the marker goes");
}

#[tokio::test(start_paused = true)]
async fn an_auto_thaw_whose_fithaw_fails_keeps_the_marker() {
    let r = rig_with(FakeKernel::new().fail_thaw("/s/c", libc::EIO), None);
    r.agent.freeze(FreezeRequest::default()).await.unwrap();
    tokio::time::sleep(DEADLINE + MS).await;
    settle(&r.agent).await;
    assert_eq!(r.last_auto_thaw(), "deadline");
    let left = crate::marker::Marker::new(r.marker.clone()).read().expect("the marker must stay for /s/c");
    assert_eq!(left.filesystems.len(), 1);
}

#[tokio::test]
async fn a_failed_freeze_whose_rollback_thaw_fails_keeps_that_filesystem_in_the_marker() {
    let k = FakeKernel::new().fail_freeze("/s/b", libc::EIO).fail_thaw("/s/a", libc::EIO);
    let r = rig_with(k, None);
    r.agent.freeze(FreezeRequest::default()).await.unwrap_err();
    let left = crate::marker::Marker::new(r.marker.clone()).read().expect("the marker must stay for /s/a");
    assert_eq!(left.filesystems.iter().map(|f| f.mount_point.clone()).collect::<Vec<_>>(), [PathBuf::from("/s/a")]);
}

// vssd-freeze-prepare: planning and PREPARE ahead of the freeze, and every way it ends.

fn on_channel(owner: u64) -> FreezeRequest {
    FreezeRequest { owner: Some(owner), ..Default::default() }
}

#[tokio::test]
async fn a_prepared_freeze_goes_straight_to_freeze_with_the_prepared_id() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1, 2])));
    let p = r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    assert_eq!((p.freeze_id, p.to_freeze, p.ready), (1, 3, 2));
    assert!(r.kernel.calls().is_empty(), "a prepare freezes nothing");
    let rep = r.agent.freeze(on_channel(7)).await.unwrap();
    assert_eq!((rep.frozen, rep.consistency), (3, "application"));
    assert!(rep.steps.contains_key("plan-checked") && !rep.steps.contains_key("apps-prepared"), "{:?}", rep.steps);
    r.agent.thaw().await.unwrap();
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "freeze [1, 2] 1", "thaw [1, 2] 1 Completed"]);
}

#[tokio::test]
async fn a_prepared_freeze_plans_again_when_the_mount_table_changed() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    let mi = r.agent.config().mountinfo.clone();
    let mut t = std::fs::read_to_string(&mi).unwrap();
    t.push_str("14 1 7:4 / /s/d rw - ext4 /dev/loop4 rw\n");
    std::fs::write(&mi, t).unwrap();
    let rep = r.agent.freeze(on_channel(7)).await.unwrap();
    assert_eq!(rep.frozen, 4, "the new filesystem is frozen too");
    r.agent.thaw().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_prepared_freeze_that_never_comes_releases_the_apps_once_at_its_deadline() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), Duration::from_secs(3)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(r.agent.is_prepared());
    let p = &r.agent.status_json()["prepared"];
    assert_eq!(
        (p["freeze-id"].as_u64(), p["apps"].as_u64(), p["to-freeze"].as_u64()),
        (Some(1), Some(1), Some(3)),
        "{p}"
    );
    assert_eq!((p["expires-in-ms"].as_u64(), &p["bound-to-channel"]), (Some(1000), &serde_json::json!(true)), "{p}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!r.agent.is_prepared());
    assert!(r.agent.status_json().get("prepared").is_none(), "vssd-status shows no preparation once it ended");
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
    // A freeze later starts from scratch with a new id.
    r.agent.freeze(on_channel(7)).await.unwrap();
    r.agent.thaw().await.unwrap();
    assert_eq!(r.apps.as_ref().unwrap().log()[2..], ["prepare 2", "freeze [1] 2", "thaw [1] 2 Completed"]);
}

#[tokio::test]
async fn closing_the_channel_cancels_its_prepared_freeze() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    r.agent.channel_closed(8);
    assert!(r.agent.is_prepared(), "another channel's close changes nothing");
    r.agent.channel_closed(7);
    assert!(!r.agent.is_prepared());
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
}

#[tokio::test]
async fn a_thaw_cancels_a_prepared_freeze() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    assert_eq!(r.agent.thaw().await.unwrap().thawed, 0);
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
}

#[tokio::test]
async fn another_channels_freeze_cancels_the_prepared_one_and_runs_in_full() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    let rep = r.agent.freeze(on_channel(9)).await.unwrap();
    assert_eq!((rep.frozen, rep.consistency), (3, "application"));
    r.agent.thaw().await.unwrap();
    assert_eq!(
        r.apps.as_ref().unwrap().log(),
        ["prepare 1", "thaw [1] 1 Aborted", "prepare 2", "freeze [1] 2", "thaw [1] 2 Completed"]
    );
}

#[tokio::test]
async fn a_second_prepare_replaces_the_first() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    r.agent.freeze(on_channel(7)).await.unwrap();
    r.agent.thaw().await.unwrap();
    assert_eq!(
        r.apps.as_ref().unwrap().log(),
        ["prepare 1", "thaw [1] 1 Aborted", "prepare 2", "freeze [1] 2", "thaw [1] 2 Completed"]
    );
}

#[tokio::test]
async fn a_prepare_whose_plan_is_vetoed_keeps_nothing_and_releases_the_apps() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    let req = FreezeRequest { cannot_freeze: Some(CannotFreezePolicy::Veto), ..on_channel(7) };
    let err = r.agent.prepare_freeze(req, DEADLINE).await.unwrap_err();
    assert!(matches!(err, AgentError::Vetoed(_)), "{err}");
    assert!(!r.agent.is_prepared());
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "thaw [1] 1 Aborted"]);
}

#[tokio::test]
async fn a_prepared_freeze_that_fails_releases_the_apps_once() {
    let r = rig_with(FakeKernel::new().fail_freeze("/s/b", libc::EIO), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    r.agent.freeze(on_channel(7)).await.unwrap_err();
    assert!(!r.agent.is_prepared());
    assert_eq!(r.apps.as_ref().unwrap().log(), ["prepare 1", "freeze [1] 1", "thaw [1] 1 Aborted"]);
    assert!(!r.marker.exists());
}

#[tokio::test]
async fn a_prepare_without_apps_still_saves_the_planning() {
    let r = rig();
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    let rep = r.agent.freeze(on_channel(7)).await.unwrap();
    assert_eq!(rep.frozen, 3);
    assert!(rep.steps.contains_key("plan-checked"), "{:?}", rep.steps);
    r.agent.thaw().await.unwrap();
}

#[tokio::test]
async fn an_app_that_registered_since_the_prepare_gets_a_freeze_from_scratch() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    *r.apps.as_ref().unwrap().ids.lock().unwrap() = vec![1, 2];
    let rep = r.agent.freeze(on_channel(7)).await.unwrap();
    assert!(rep.steps.contains_key("apps-prepared"), "prepared again: {:?}", rep.steps);
    r.agent.thaw().await.unwrap();
    assert_eq!(
        r.apps.as_ref().unwrap().log(),
        ["prepare 1", "thaw [1] 1 Aborted", "prepare 2", "freeze [1, 2] 2", "thaw [1, 2] 2 Completed"]
    );
}

#[tokio::test]
async fn one_app_leaving_and_another_registering_is_not_taken_for_the_prepared_set() {
    // Same count, different apps: app 3 never got PREPARE, so the preparation is not used.
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1, 2])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    *r.apps.as_ref().unwrap().ids.lock().unwrap() = vec![1, 3];
    r.agent.freeze(on_channel(7)).await.unwrap();
    r.agent.thaw().await.unwrap();
    assert_eq!(
        r.apps.as_ref().unwrap().log(),
        ["prepare 1", "thaw [1, 2] 1 Aborted", "prepare 2", "freeze [1, 3] 2", "thaw [1, 3] 2 Completed"]
    );
}

#[tokio::test]
async fn an_app_leaving_since_the_prepare_keeps_the_preparation() {
    let r = rig_with(FakeKernel::new(), Some(FakeApps::new(&[1, 2])));
    r.agent.prepare_freeze(on_channel(7), DEADLINE).await.unwrap();
    *r.apps.as_ref().unwrap().ids.lock().unwrap() = vec![1];
    let rep = r.agent.freeze(on_channel(7)).await.unwrap();
    assert!(rep.steps.contains_key("plan-checked"), "{:?}", rep.steps);
    r.agent.thaw().await.unwrap();
    assert_eq!(r.apps.as_ref().unwrap().log()[0], "prepare 1");
    assert_eq!(r.apps.as_ref().unwrap().log().len(), 3, "{:?}", r.apps.as_ref().unwrap().log());
}
