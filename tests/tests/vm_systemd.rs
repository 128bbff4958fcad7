//! VM tier: vssd installed in a real distribution (Debian 12, systemd as PID 1, udev), as its
//! package installs it. One boot for every check, in order: udev/systemd started vssd at boot;
//! `vmctl backup` of the VM is quiesced; `systemctl kill -s KILL vssd` while frozen → systemd
//! restarts it → every filesystem thawed within seconds; the journal has vssd's logs;
//! a vssd hung (SIGSTOP) while frozen is killed by the watchdog and its restart thaws (with
//! h-notify's WatchdogSec); the agent port unplugged and hot-plugged again (QMP `device_add`) starts vssd through udev;
//! `systemctl poweroff` while frozen thaws first and leaves clean filesystems.
//! Needs root, QEMU and debootstrap; builds the guest on first use (tests/guest/build-debian.sh).

use std::time::{Duration, Instant};

use tests::sysguest::{cannot_run, image, SysVm};
use tests::*;

/// Every filesystem the guest mounts from a disk (root and the five data filesystems).
const MOUNTS: &[&str] = &["/", "/data/db", "/data/logs", "/data/e3", "/data/e4", "/data/efi"];

/// A guest command that writes one small file on every freezable filesystem and syncs it:
/// it returns only when none is frozen.
fn write_everywhere() -> String {
    MOUNTS
        .iter()
        .map(|m| {
            let f = format!("{}/.vmtest-thawed", m.trim_end_matches('/'));
            format!("echo x >{f} && sync -f {f}")
        })
        .collect::<Vec<_>>()
        .join(" && ")
}

fn main_pid(vm: &SysVm) -> u64 {
    vm.sh("systemctl show -p MainPID --value vssd").trim().parse().unwrap_or(0)
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_under_systemd_starts_by_udev_survives_a_kill_while_frozen_and_thaws_before_poweroff() {
    if let Some(why) = cannot_run() {
        panic!("this VM-tier test cannot run here: {why}");
    }
    let g = image();
    eprintln!("[sysguest] image {} (debootstrap took {} s when it ran)", g.dir.display(), g.debootstrap_seconds);
    let vm = SysVm::boot("sysd");

    // (1) Started at boot by udev/systemd: active, wanted by the port's device unit, and
    // answering on the host's socket (SysVm::boot waited for guest-ping).
    assert_eq!(vm.sh("systemctl is-active vssd").trim(), "active");
    // udev applied 60-vssd.rules to the port (SYSTEMD_WANTS), and systemd made the port's
    // device unit want vssd.
    let props = vm.sh("udevadm info -q property /dev/virtio-ports/org.qemu.guest_agent.0");
    assert!(
        props.lines().any(|l| l.starts_with("SYSTEMD_WANTS=") && l.contains("vssd.service")),
        "udev did not apply 60-vssd.rules to the agent port:\n{props}"
    );
    let wanted_by = vm.sh("systemctl show -p WantedBy -p TriggeredBy -p BindsTo --value vssd");
    eprintln!(
        "[sysguest] vssd.service WantedBy/TriggeredBy/BindsTo: {}",
        wanted_by.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    eprintln!("[sysguest] {}", vm.sh("systemctl status --no-pager -n 0 vssd | head -n 5"));
    eprintln!("[sysguest] mounts:\n{}", vm.sh("findmnt -rno TARGET,FSTYPE,SOURCE -t ext4,xfs,vfat"));
    for m in MOUNTS {
        vm.sh(&format!("mountpoint -q {m}"));
    }
    let pid0 = main_pid(&vm);
    assert!(pid0 > 0);

    // (2) vmctl backup of the running guest, quiesced by vssd, with appvss's SQLite writer
    // (vmtest-sqlite.service) holding the freeze: application-consistent.
    assert_eq!(vm.sh("systemctl is-active vmtest-sqlite").trim(), "active", "the application service runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    let registered = "journalctl -b -u vssd -o cat | grep -q 'app registered.*name=sqlite'";
    while vm.shell(registered, Duration::from_secs(30)).0 != 0 {
        assert!(Instant::now() < deadline, "the SQLite writer never registered with vssd");
        std::thread::sleep(Duration::from_millis(500));
    }
    let v = vm.vmctl_json(&["backup", "sysd", "--quiesce", "required"], 0);
    let consistency = v["consistency"].as_str().unwrap_or("?");
    assert_eq!(consistency, "application", "the backup is not application-consistent: {v}");
    let frozen = v["frozen"].as_u64().unwrap_or(0);
    assert!(frozen >= 5, "the backup froze {frozen} filesystems, want root and the data filesystems: {v}");
    eprintln!(
        "[sysguest] backup: consistency {consistency}, {frozen} frozen, freeze window {} ms",
        v["freeze_window_ms"]
    );
    let mut a = vm.agent();
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("thawed"));

    // (3) SIGKILL while frozen (a long deadline: only the restart can thaw within the test's
    // limit) → systemd restarts vssd → the new vssd thaws what the old one left.
    let r = a.execute("vssd-freeze", Some(json!({"deadline": 120})), Duration::from_secs(60)).unwrap();
    eprintln!("[sysguest] frozen: {r}");
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
    drop(a);
    let t_kill = Instant::now();
    vm.sh("systemctl kill -s KILL vssd");
    let (code, out) = vm.shell(&write_everywhere(), Duration::from_secs(30));
    let thawed_after = t_kill.elapsed();
    assert_eq!(code, 0, "writing to every filesystem after the kill: {out}");
    assert!(thawed_after < Duration::from_secs(15), "thawed only {thawed_after:?} after the kill");
    eprintln!(
        "[sysguest] every filesystem writable {:.1} s after SIGKILL of the frozen vssd",
        thawed_after.as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid1 = loop {
        let p = main_pid(&vm);
        if p != 0 && p != pid0 && vm.sh("systemctl is-active vssd || true").trim() == "active" {
            break p;
        }
        assert!(Instant::now() < deadline, "systemd did not restart vssd");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("[sysguest] vssd restarted: pid {pid0} → {pid1}");
    let mut a = vm.agent();
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("thawed"));

    // (4) The journal has vssd's logs, those of both runs, the recovery included.
    let journal = vm.sh("journalctl -b -u vssd --no-pager -o cat");
    assert!(journal.contains("serving"), "no start of vssd in its journal:\n{journal}");
    assert!(
        journal.contains("left filesystems frozen") || journal.contains("recovered after a crash"),
        "the restarted vssd did not log its recovery:\n{journal}"
    );
    eprintln!("[sysguest] journalctl -u vssd: {} lines", journal.lines().count());

    // (7) A hung vssd while frozen (SIGSTOP: no more WATCHDOG=1) → systemd's watchdog kills it
    // (WatchdogSec) → the restart thaws what it left.
    let watchdog = vm.sh("systemctl show -p WatchdogUSec --value vssd").trim().to_string();
    a.execute("vssd-freeze", Some(json!({"deadline": 120})), Duration::from_secs(60)).unwrap();
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
    drop(a);
    let pid_stopped = main_pid(&vm);
    let t_stop = Instant::now();
    vm.sh(&format!("kill -STOP {pid_stopped}"));
    let (code, out) = vm.shell(&write_everywhere(), Duration::from_secs(60));
    let thawed_after = t_stop.elapsed();
    assert_eq!(code, 0, "writing to every filesystem after vssd hung: {out}");
    assert!(
        thawed_after < Duration::from_secs(40),
        "thawed only {thawed_after:?} after vssd hung (watchdog {watchdog})"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while main_pid(&vm) == pid_stopped || vm.sh("systemctl is-active vssd || true").trim() != "active" {
        assert!(Instant::now() < deadline, "systemd did not restart vssd after its watchdog fired");
        std::thread::sleep(Duration::from_millis(200));
    }
    let wd_log = vm.sh("journalctl -b -u vssd --no-pager -o cat | grep 'Watchdog timeout' || true");
    assert!(!wd_log.trim().is_empty(), "systemd did not log a watchdog timeout for vssd");
    eprintln!(
        "[sysguest] hung vssd (SIGSTOP, watchdog {watchdog}): every filesystem writable {:.1} s later; journal: {}",
        thawed_after.as_secs_f64(),
        wd_log.lines().next().unwrap_or("")
    );
    let a = vm.agent();

    // (6) Hot-plug: with the agent port unplugged and vssd stopped, the port plugged again
    // (QMP device_add of the virtserialport) starts vssd through udev.
    drop(a); // QEMU's socket serves one client: the one after the hot-plug must get it
    let mut q = vm.qmp();
    let list = q.execute("qom-list", Some(json!({"path": "/machine/peripheral-anon"}))).expect("qom-list");
    let port = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "child<virtserialport>")
        .map(|e| format!("/machine/peripheral-anon/{}", e["name"].as_str().unwrap()))
        .find(|p| {
            q.execute("qom-get", Some(json!({"path": p, "property": "name"}))).ok()
                == Some(json!("org.qemu.guest_agent.0"))
        })
        .expect("the agent's virtserialport in QOM");
    q.execute("device_del", Some(json!({"id": port}))).expect("device_del of the agent port");
    // A unit that BindsTo the port stops with it; one that serves every channel (h-notify's)
    // goes on: then stop it by hand, so that only udev can start it again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.sh("systemctl is-active vssd || true").trim() == "active" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    if vm.sh("systemctl is-active vssd || true").trim() == "active" {
        eprintln!("[sysguest] vssd goes on without the port (its unit does not BindsTo it): stopping it");
        vm.sh("systemctl stop vssd");
    }
    assert_ne!(vm.sh("systemctl is-active vssd || true").trim(), "active");
    let t_plug = Instant::now();
    q.execute(
        "device_add",
        Some(json!({"driver": "virtserialport", "bus": "vser0.0", "chardev": "agent",
                    "name": "org.qemu.guest_agent.0", "id": "agent-hotplug"})),
    )
    .expect("device_add of the agent port");
    drop(q);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = QgaClient::connect(&vm.agent_path()) {
            c.sync_timeout = Duration::from_secs(2);
            if c.sync().is_ok() && c.execute("guest-ping", None, Duration::from_secs(5)).is_ok() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "vssd did not answer within 60 s of the hot-plug: {}",
            vm.sh("systemctl status --no-pager vssd 2>&1 || true")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(vm.sh("systemctl is-active vssd").trim(), "active");
    eprintln!("[sysguest] hot-plugged port: vssd answered {:.1} s after device_add", t_plug.elapsed().as_secs_f64());
    let mut a = vm.agent();

    // (5) systemctl poweroff while frozen: vssd thaws on its stop, the filesystems unmount
    // clean, QEMU ends well before the freeze's own deadline.
    a.execute("vssd-freeze", Some(json!({"deadline": 120})), Duration::from_secs(60)).unwrap();
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
    drop(a);
    let t_off = Instant::now();
    let _ = vm.try_shell("systemctl poweroff --no-block", Duration::from_secs(10));
    assert!(vm.wait_exit(Duration::from_secs(90)), "the guest did not power off within 90 s while frozen");
    let off = t_off.elapsed();
    eprintln!("[sysguest] powered off {:.1} s after systemctl poweroff (frozen, deadline 120 s)", off.as_secs_f64());
    assert!(off < Duration::from_secs(60), "poweroff took {off:?}: waited for the auto-thaw?");
    for disk in ["data", "data2"] {
        let res = hostsim::inspect::fsck_image(&vm.disk(disk)).expect("fsck the data disk");
        assert!(!res.is_empty(), "no filesystem found on {disk}");
        for r in res {
            assert!(r.ok, "{disk} {} ({}) is not clean after the poweroff: {}", r.label, r.fstype, r.detail);
        }
    }
}
