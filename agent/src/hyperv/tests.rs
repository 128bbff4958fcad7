//! The Hyper-V loop against hv-emu's in-process kernel device (hv_snapshot.c's behaviour:
//! timeouts, one opener, spurious replies refused), with a scripted filesystem kernel and
//! scripted apps. Real time, short timers: the loop blocks a thread of its own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hv_emu::{Emulator, Readiness, Timeouts};
use kmod_shim::hv::{Op, VssMsg, HV_E_FAIL, HV_S_OK, VSS_HBU_NO_AUTO_RECOVERY};

use super::*;
use crate::apps::Answer;
use crate::config::Config;
use crate::engine::fake::FakeKernel;
use crate::engine::Kernel;
use crate::service::testkit::{config, FakeApps};
use crate::service::{Agent, AgentError, AppCoordinator, FreezeRequest};

const T: Duration = Duration::from_secs(10);

struct EmuDev(hv_emu::Device);

impl HvDevice for EmuDev {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        Ok(self.0.wait_readable(Some(timeout))? != Readiness::Timeout)
    }
}

struct EmuOpener(Emulator);

impl HvOpener for EmuOpener {
    fn open(&mut self) -> Result<Box<dyn HvDevice>, OpenError> {
        match self.0.open() {
            Ok(d) => Ok(Box::new(EmuDev(d))),
            Err(e) => Err(OpenError::from_io(Path::new("/dev/vmbus/hv_vss (emulated)"), e)),
        }
    }
    fn name(&self) -> String {
        "/dev/vmbus/hv_vss (emulated)".into()
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    emu: Emulator,
    agent: Arc<Agent>,
    kernel: Arc<FakeKernel>,
    apps: Option<Arc<FakeApps>>,
    served: Option<Served>,
    marker: std::path::PathBuf,
}

fn settings() -> Settings {
    Settings {
        register_timeout: Duration::from_millis(300),
        idle_wait: Duration::from_millis(20),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

fn rig_with(kernel: Arc<FakeKernel>, apps: Option<FakeApps>, deadline: Duration, timeouts: Timeouts) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), deadline);
    let marker = cfg.state_dir.join("frozen.json");
    let apps = apps.map(Arc::new);
    let agent = Agent::with_coordinator(cfg, kernel.clone(), apps.clone().map(|a| a as Arc<dyn AppCoordinator>));
    let emu = Emulator::new(timeouts);
    let served =
        spawn(agent.clone(), tokio::runtime::Handle::current(), Box::new(EmuOpener(emu.clone())), None, settings())
            .unwrap();
    Rig { _dir: dir, emu, agent, kernel, apps, served: Some(served), marker }
}

fn rig() -> Rig {
    rig_with(FakeKernel::new(), None, T, Timeouts { freeze: T, other: T })
}

impl Rig {
    /// The host sends `op` and waits for the kernel's answer (on a blocking thread, so the
    /// runtime keeps serving the agent meanwhile).
    async fn host(&self, op: Op) -> hv_emu::Answer {
        let e = self.emu.clone();
        tokio::task::spawn_blocking(move || e.request(op)).await.unwrap()
    }
    async fn host_raw(&self, op: u8) -> hv_emu::Answer {
        let e = self.emu.clone();
        tokio::task::spawn_blocking(move || e.request_raw(op, 0)).await.unwrap()
    }
    fn status(&self) -> Status {
        self.served.as_ref().unwrap().status()
    }
    async fn until(&self, what: &str, f: impl Fn(&Rig) -> bool) {
        let end = Instant::now() + T;
        while !f(self) {
            assert!(Instant::now() < end, "timed out waiting for: {what}; channel status {:?}", self.status());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    async fn registered(&self, n: u64) {
        self.until(&format!("registration #{n}"), |r| {
            r.status().registrations >= n && r.status().registered && r.emu.state() == hv_emu::State::Ready
        })
        .await;
    }
    fn count(&self, what: &str) -> usize {
        self.kernel.calls().iter().filter(|c| c.starts_with(what)).count()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(s) = self.served.take() {
            s.stop();
        }
    }
}

#[tokio::test]
async fn a_full_sequence_answers_as_hv_vss_daemon_and_freezes_like_qga() {
    let r = rig();
    r.registered(1).await;
    assert_eq!(r.status().kernel_version, Some(kmod_shim::hv::KERNEL_VERSION_REGISTER1));
    assert_eq!(r.emu.registered(), Some(Op::Register1 as u8));

    // GET_DM_INFO is the kernel's own; vssd never sees it.
    let a = r.host(Op::GetDmInfo).await;
    assert_eq!((a.error, a.flags), (HV_S_OK, 0));

    // HOT_BACKUP: yes. The answer's error overlays the operation byte, so the kernel never
    // sees HOT_BACKUP in it and never sets VSS_HBU_NO_AUTO_RECOVERY (as with hv_vss_daemon).
    let a = r.host(Op::HotBackup).await;
    assert_eq!(a.error, HV_S_OK);
    assert_ne!(a.flags, VSS_HBU_NO_AUTO_RECOVERY);

    let a = r.host(Op::Freeze).await;
    assert_eq!(a.error, HV_S_OK);
    assert_eq!(r.count("freeze "), 3);
    assert_eq!(r.agent.status(), "frozen");
    assert!(r.marker.exists(), "the crash-recovery marker is written as for a QGA freeze");
    assert_eq!(r.agent.status_json()["bound-to-channel"], true);

    let a = r.host(Op::Thaw).await;
    assert_eq!(a.error, HV_S_OK);
    assert_eq!(r.count("thaw "), 3);
    assert_eq!(r.agent.status(), "thawed");
    assert!(!r.marker.exists());

    let s = r.status();
    assert_eq!((s.registrations, s.requests), (1, 3), "{s:?}");
    assert_eq!(s.last.as_deref(), Some("VSS_OP_THAW: HV_S_OK"));
}

#[tokio::test]
async fn hot_backup_asks_the_apps_and_answers_hv_e_fail_on_a_veto() {
    let apps = FakeApps { prepare: Answer::Vetoed, ..FakeApps::new(&[1, 2]) };
    let r = rig_with(FakeKernel::new(), Some(apps), T, Timeouts { freeze: T, other: T });
    r.registered(1).await;
    let a = r.host(Op::HotBackup).await;
    assert_eq!(a.error, HV_E_FAIL);
    let log = r.apps.as_ref().unwrap().log();
    assert_eq!(log, vec!["prepare 1".to_string(), "thaw [1, 2] 1 Aborted".to_string()], "asked, then released");
    assert!(r.kernel.calls().is_empty(), "a HOT_BACKUP freezes nothing");
    assert_eq!(r.agent.status(), "thawed");
}

#[tokio::test]
async fn after_a_vetoed_hot_backup_the_next_one_is_yes_and_the_freeze_holds_the_apps() {
    let apps = FakeApps::new(&[1, 2]);
    apps.prepare_next.lock().unwrap().push_back(Answer::Vetoed);
    let r = rig_with(FakeKernel::new(), Some(apps), T, Timeouts { freeze: T, other: T });
    r.registered(1).await;
    assert_eq!(r.host(Op::HotBackup).await.error, HV_E_FAIL, "an app vetoed");
    assert!(r.kernel.calls().is_empty(), "nothing frozen for a HOT_BACKUP");
    assert_eq!(r.host(Op::HotBackup).await.error, HV_S_OK, "no veto this time");
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    let log = r.apps.as_ref().unwrap().log();
    assert_eq!(log.last().unwrap(), "freeze [1, 2] 3", "the apps hold during the FREEZE: {log:?}");
    assert_eq!(r.count("freeze "), 3);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
    let log = r.apps.as_ref().unwrap().log();
    assert_eq!(
        log,
        [
            "prepare 1",
            "thaw [1, 2] 1 Aborted",
            "prepare 2",
            "thaw [1, 2] 2 Aborted",
            "prepare 3",
            "freeze [1, 2] 3",
            "thaw [1, 2] 3 Completed"
        ],
        "exactly one THAW per round, the last after the host's THAW"
    );
}

#[tokio::test]
async fn hot_backup_with_ready_apps_is_yes_and_releases_them_before_the_freeze() {
    let apps = FakeApps::new(&[1, 2]);
    let r = rig_with(FakeKernel::new(), Some(apps), T, Timeouts { freeze: T, other: T });
    r.registered(1).await;
    assert_eq!(r.host(Op::HotBackup).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
    let log = r.apps.as_ref().unwrap().log();
    assert_eq!(log, ["prepare 1", "thaw [1, 2] 1 Aborted", "prepare 2", "freeze [1, 2] 2", "thaw [1, 2] 2 Completed"]);
}

#[tokio::test]
async fn a_freeze_that_outlives_the_kernels_timeout_fails_to_the_host_and_is_thawed() {
    // FIFREEZE takes 400 ms (the three run in parallel); the kernel gives FREEZE 200 ms.
    let kernel = FakeKernel::new().delay(Duration::from_millis(400));
    let r = rig_with(kernel, None, T, Timeouts { freeze: Duration::from_millis(200), other: T });
    r.registered(1).await;
    let a = r.host(Op::Freeze).await;
    assert_eq!(a.error, HV_E_FAIL, "the kernel answers the host itself");
    assert!(a.elapsed < Duration::from_millis(400), "{a:?}");
    // vssd's late answer is refused (EINVAL): it thaws what it froze, opens the device again
    // and registers again, as hv_vss_daemon does.
    r.registered(2).await;
    r.until("thawed", |r| r.agent.status() == "thawed" && r.count("thaw ") == 3).await;
    assert!(r.status().last_failure.unwrap().contains("refused"));
    r.emu.set_timeouts(Timeouts { freeze: T, other: T });
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn vssd_s_own_deadline_thaws_and_the_late_thaw_hears_of_it() {
    let r = rig_with(FakeKernel::new(), None, Duration::from_millis(300), Timeouts { freeze: T, other: T });
    r.registered(1).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    r.until("the deadline's thaw", |r| r.agent.status() == "thawed").await;
    assert_eq!(r.count("thaw "), 3);
    assert_eq!(r.agent.status_json()["last-auto-thaw"]["reason"], "deadline");
    // The snapshot the host took after the deadline is only crash-consistent: its THAW fails.
    assert_eq!(r.host(Op::Thaw).await.error, HV_E_FAIL);
    // And the next round is clean.
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn the_device_failing_mid_freeze_thaws_reopens_and_registers_again() {
    let r = rig();
    r.registered(1).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    r.emu.destroy();
    r.until("thawed after the failure", |r| r.agent.status() == "thawed").await;
    assert_eq!(r.count("thaw "), 3);
    r.registered(2).await;
    assert!(r.status().last_failure.unwrap().contains("Bad file descriptor"));
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn the_fake_thaw_before_hibernation_thaws_and_vssd_serves_on() {
    let r = rig();
    r.registered(1).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    r.emu.fake_thaw();
    r.until("thawed by the fake THAW", |r| r.agent.status() == "thawed").await;
    // Its answer is refused (nothing pending in the kernel): vssd opens the device again.
    r.registered(2).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn malformed_short_long_and_unknown_messages_are_skipped_and_serving_goes_on() {
    let r = rig();
    r.registered(1).await;
    r.emu.inject(&[5, 0, 0]).unwrap();
    r.until("short message read", |r| r.emu.wait_for(Duration::ZERO, |c| c.poll() == Some(false))).await;
    r.emu.inject(&[5; 20]).unwrap();
    r.until("long message read", |r| r.emu.wait_for(Duration::ZERO, |c| c.poll() == Some(false))).await;
    assert_eq!(r.count("freeze "), 0, "neither was taken for a FREEZE");
    assert_eq!(r.status().registrations, 1, "skipped, the device kept");
    // Unknown operations from the host are the kernel's to answer (HV_S_OK)...
    assert_eq!(r.host_raw(42).await.error, HV_S_OK);
    assert_eq!(r.host_raw(Op::AutoRecover as u8).await.error, HV_S_OK);
    // ...and one that reaches vssd anyway gets HV_S_OK, as from hv_vss_daemon (the kernel
    // refuses that answer, expecting none, and vssd opens the device again).
    r.emu.inject(&VssMsg::with_op(42).to_bytes()).unwrap();
    r.registered(2).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn a_second_vssd_is_refused_with_a_clear_error_and_the_first_serves_on() {
    let r = rig();
    r.registered(1).await;
    let e = EmuOpener(r.emu.clone()).open().err().expect("a second opener is refused");
    let text = e.to_string();
    assert!(matches!(e, OpenError::Busy { .. }), "{text}");
    assert!(text.contains("already open") && text.contains("hv_vss_daemon"), "{text}");
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
}

#[tokio::test]
async fn a_qga_freeze_and_a_hyperv_freeze_never_interleave() {
    // FIFREEZE is slow enough that both requests meet while the first freezes.
    let r = rig_with(FakeKernel::new().delay(Duration::from_millis(30)), None, T, Timeouts { freeze: T, other: T });
    r.registered(1).await;

    // QGA first: the Hyper-V FREEZE is refused, and its THAW leaves QGA's freeze alone.
    let a = r.agent.clone();
    let qga = tokio::spawn(async move { a.freeze(FreezeRequest { owner: Some(999), ..Default::default() }).await });
    r.until("the QGA freeze started", |r| r.agent.status() == "frozen").await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_E_FAIL);
    assert!(qga.await.unwrap().is_ok());
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
    assert_eq!(r.agent.status(), "frozen", "a Hyper-V THAW never thaws another channel's freeze");
    assert_eq!(r.count("freeze "), 3);
    r.agent.thaw().await.unwrap();

    // Hyper-V first: the QGA freeze gets QGA's usual error.
    let e = r.emu.clone();
    let hv = tokio::task::spawn_blocking(move || e.request(Op::Freeze));
    r.until("the Hyper-V freeze started", |r| r.agent.status() == "frozen").await;
    let q = r.agent.freeze(FreezeRequest { owner: Some(999), ..Default::default() }).await;
    assert!(q.is_err(), "the second freeze is refused");
    assert_eq!(hv.await.unwrap().error, HV_S_OK);
    assert_eq!(r.count("freeze "), 6, "only one freeze ran each time");
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
    assert_eq!(r.agent.status(), "thawed");
}

#[tokio::test]
async fn a_qga_thaw_of_a_hyperv_freeze_thaws_and_the_hosts_thaw_then_hears_hv_e_fail() {
    let r = rig();
    r.registered(1).await;
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    // qemu-ga's guest-fsfreeze-thaw thaws whatever is frozen; so does vssd's, for every channel.
    let t = r.agent.thaw().await.unwrap();
    assert_eq!(t.thawed, 3);
    assert_eq!(r.agent.status(), "thawed");
    // The host's snapshot may have been taken after that thaw: not application-consistent.
    assert_eq!(r.host(Op::Thaw).await.error, HV_E_FAIL);
    assert_eq!(r.count("thaw "), 3, "nothing thawed twice");
    // A QGA freeze taken in between is never thawed by the Hyper-V THAW.
    assert_eq!(r.host(Op::Freeze).await.error, HV_S_OK);
    r.agent.thaw().await.unwrap();
    r.agent.freeze(FreezeRequest { owner: Some(999), ..Default::default() }).await.unwrap();
    assert_eq!(r.host(Op::Thaw).await.error, HV_E_FAIL);
    assert_eq!(r.agent.status(), "frozen", "the QGA client's freeze holds");
    assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK, "a THAW again: nothing of this channel's frozen");
    assert_eq!(r.agent.status(), "frozen");
    r.agent.thaw().await.unwrap();
}

#[tokio::test]
async fn a_qga_freeze_and_a_hyperv_freeze_sent_at_once_freeze_once() {
    let r = rig_with(FakeKernel::new().delay(Duration::from_millis(20)), None, T, Timeouts { freeze: T, other: T });
    r.registered(1).await;
    for round in 0..10 {
        let e = r.emu.clone();
        let hv = tokio::task::spawn_blocking(move || e.request(Op::Freeze));
        let a = r.agent.clone();
        let qga = tokio::spawn(async move { a.freeze(FreezeRequest { owner: Some(999), ..Default::default() }).await });
        let (hv, qga) = (hv.await.unwrap(), qga.await.unwrap());
        if let Err(e) = &qga {
            // What the QGA layer answers as qemu-ga does for a freeze while frozen.
            assert!(
                matches!(
                    e,
                    AgentError::Transition(
                        crate::engine::TransitionError::AlreadyFrozen | crate::engine::TransitionError::Busy
                    )
                ),
                "round {round}: the QGA freeze lost with {e:?}"
            );
        }
        assert_eq!(r.count("freeze "), 3 * (round + 1), "round {round}: exactly one freeze ran");
        assert_eq!(r.agent.status(), "frozen");
        match (hv.error, qga.is_ok()) {
            // Hyper-V won: QGA got its error, and the host's THAW thaws.
            (HV_S_OK, false) => assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK),
            // QGA won: HV_E_FAIL; the host's THAW leaves QGA's freeze alone, QGA's thaw thaws.
            (HV_E_FAIL, true) => {
                assert_eq!(r.host(Op::Thaw).await.error, HV_S_OK);
                assert_eq!(r.agent.status(), "frozen");
                r.agent.thaw().await.unwrap();
            }
            other => panic!("round {round}: both or neither froze: {other:?}"),
        }
        assert_eq!(r.agent.status(), "thawed", "round {round}: never left frozen");
        assert_eq!(r.count("thaw "), 3 * (round + 1));
    }
}

#[test]
fn holders_names_the_process_that_has_the_device_open() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("dev");
    std::fs::write(&f, b"").unwrap();
    assert!(holders(Path::new("/proc"), &f).is_empty());
    let e = OpenError::from_io(&f, io::Error::from_raw_os_error(libc::EBUSY));
    assert!(e.to_string().contains("already open in another process"), "{e}");
    // A process that holds it (here on its stdin) is named, with its pid.
    let mut child =
        std::process::Command::new("sleep").arg("30").stdin(std::fs::File::open(&f).unwrap()).spawn().unwrap();
    let end = Instant::now() + T;
    let found = loop {
        let h = holders(Path::new("/proc"), &f);
        if !h.is_empty() || Instant::now() > end {
            break h;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(found, vec![(child.id(), "sleep".to_string())]);
}

/// A loop-mounted ext4 of the test's own, unmounted and detached on drop.
struct LoopFs {
    dir: tempfile::TempDir,
    loopdev: String,
}

impl LoopFs {
    fn new() -> LoopFs {
        let run = |cmd: &str, args: &[&str]| {
            let out = std::process::Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        run("mkfs.ext4", &["-q", img.to_str().unwrap()]);
        let loopdev = run("losetup", &["-f", "--show", img.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run("mount", &[&loopdev, mnt.to_str().unwrap()]);
        LoopFs { dir, loopdev }
    }
    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mnt = self.mnt();
        let _ = crate::engine::RealKernel.thaw(&mnt);
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        let _ = std::process::Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// Reads exactly `n` bytes from the pty's master (the kernel's side of this test).
fn read_exact_master(m: &mut nix::pty::PtyMaster, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    m.read_exact(&mut buf).unwrap();
    buf
}

#[tokio::test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
async fn the_real_device_path_serves_a_freeze_and_thaw_of_a_real_filesystem() {
    use nix::fcntl::OFlag;
    use std::io::Write;
    assert!(nix::unistd::geteuid().is_root(), "needs root (loop devices, FIFREEZE): run tests/run-all.sh as root");
    // A pty in raw mode stands in for /dev/vmbus/hv_vss: vssd opens its slave by path and does
    // blocking reads, writes and poll(2) on it as on the kernel's device; the test plays the
    // kernel on the master (one whole message per write).
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).unwrap();
    nix::pty::grantpt(&master).unwrap();
    nix::pty::unlockpt(&master).unwrap();
    let slave = std::path::PathBuf::from(nix::pty::ptsname_r(&master).unwrap());
    let keep = std::fs::OpenOptions::new().read(true).write(true).open(&slave).unwrap();
    let mut t = nix::sys::termios::tcgetattr(&keep).unwrap();
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&keep, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();

    let fs = LoopFs::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        scope: fs.mnt(),
        state_dir: dir.path().join("state"),
        hooks_dirs: vec![],
        freeze_deadline: 20.0,
        channels: vec![crate::config::ChannelSpec::HyperV(slave.clone())],
        ..Config::default()
    };
    let agent = Agent::new(cfg.clone(), Arc::new(crate::engine::RealKernel));
    crate::server::start(agent.clone(), &cfg.channels, None).await.unwrap();

    let kernel_side = tokio::task::spawn_blocking(move || {
        let mut m = master;
        let reg = VssMsg::from_bytes(&read_exact_master(&mut m, 12)).unwrap();
        assert_eq!(reg.op(), Some(Op::Register1));
        m.write_all(&kmod_shim::hv::KERNEL_VERSION_REGISTER1.to_ne_bytes()).unwrap();
        // A pty is a byte stream: let vssd take the version before the first request, so the
        // two are not read as one (the kernel's device hands over one message per read).
        let end = Instant::now() + T;
        while super::status_json().is_none_or(|s| s[0]["registered"] != true) {
            assert!(Instant::now() < end, "vssd did not register");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut answers = vec![];
        for op in [Op::HotBackup, Op::Freeze] {
            m.write_all(&VssMsg::with_op(op as u8).to_bytes()).unwrap();
            answers.push(VssMsg::from_bytes(&read_exact_master(&mut m, 12)).unwrap());
        }
        (m, answers)
    });
    let (mut m, answers) = tokio::time::timeout(T, kernel_side).await.expect("vssd answers in time").unwrap();
    assert_eq!(answers[0].error(), HV_S_OK);
    assert_eq!(answers[1].error(), HV_S_OK);
    assert_eq!(agent.status(), "frozen");
    // Really frozen: a second FIFREEZE of it is EBUSY.
    let again = crate::engine::RealKernel.freeze(&fs.mnt()).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::EBUSY), "{again}");

    let kernel_side = tokio::task::spawn_blocking(move || {
        m.write_all(&VssMsg::with_op(Op::Thaw as u8).to_bytes()).unwrap();
        let answer = VssMsg::from_bytes(&read_exact_master(&mut m, 12)).unwrap();
        (m, answer)
    });
    let (m, thawed) = tokio::time::timeout(T, kernel_side).await.expect("vssd answers in time").unwrap();
    assert_eq!(thawed.error(), HV_S_OK);
    assert_eq!(agent.status(), "thawed");
    std::fs::write(fs.mnt().join("after-thaw"), b"writable").unwrap();
    let st = super::status_json().expect("the channel is published for vssd-status");
    assert_eq!(st[0]["registered"], true, "{st}");
    assert_eq!(st[0]["kernel-version"], 129, "{st}");
    assert_eq!(st[0]["requests"], 3, "{st}");
    // The device going away (here: the pty's other end closing) is noticed, not spun on.
    drop(m);
    let end = Instant::now() + T;
    while super::status_json().unwrap()[0]["registered"] == true {
        assert!(Instant::now() < end, "the closed device went unnoticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its thread is between attempts to open it again now: stop it, so that it never opens
    // a pty that another process gets under the same name.
    tokio::task::spawn_blocking(super::stop_all).await.unwrap();
    drop(keep);
}

#[tokio::test]
async fn a_freeze_under_way_when_vssd_stops_is_not_answered_ok_and_the_shutdown_thaws() {
    let r = rig_with(FakeKernel::new().delay(Duration::from_millis(300)), None, T, Timeouts { freeze: T, other: T });
    r.registered(1).await;
    let e = r.emu.clone();
    let freeze = tokio::task::spawn_blocking(move || e.request(Op::Freeze));
    r.until("freezing", |r| r.agent.status() == "frozen").await;
    r.served.as_ref().unwrap().quiesce(T).await;
    r.agent.shutdown().await;
    assert_eq!(r.agent.status(), "thawed");
    assert_eq!(r.count("thaw "), 3);
    // The device closes when its loop ends (here: at once; in vssd: at exit): the kernel
    // fails the FREEZE to the host, which never heard HV_S_OK.
    let a = freeze.await.unwrap();
    assert_eq!(a.error, HV_E_FAIL, "{a:?}");
}
