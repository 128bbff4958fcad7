//! VM tier: the Hyper-V VSS path in a real guest, against the emulated `/dev/vmbus/hv_vss`
//! (hv-emu through CUSE; docs/hyperv-emulation.md). The host plays Hyper-V through the control
//! port `org.vssd.hvhost.0` (hot-plugged over QMP; the guest's hv-emu picks it up).
//!
//! First the proof that the emulation is faithful: Debian's stock `hv_vss_daemon`, unmodified,
//! gets for each request exactly the answer the kernel's code (`hv_snapshot.c`, Linux 6.1)
//! gives. Then vssd (`--channel hyperv`) in the same guest, through the same sequence, gets
//! the same answers. Then the FREEZE → answer time of both, on the same dirty filesystems.

use std::time::{Duration, Instant};

use hv_emu::client::{Client, HostAnswer};
use kmod_shim::hv::{HV_E_FAIL, HV_S_OK};
use tests::vm::{TestVm, VmOpts};
use tests::*;

/// The guest's freezable data filesystems, each with a writer.
const FS: [&str; 4] = ["db", "logs", "e3", "e4"];

/// A daemon of the device, as the guest's `vmtest-hv` starts and stops it.
#[derive(Clone, Copy)]
struct Daemon {
    /// What `vmtest-hv NAME` starts.
    start: &'static str,
    /// Its pid file's name under /run.
    pid: &'static str,
    /// Its log in the guest.
    log: &'static str,
}

const STOCK: Daemon = Daemon { start: "daemon", pid: "hv_vss_daemon", log: "/run/messages" };
const VSSD: Daemon = Daemon { start: "vssd", pid: "vssd-hv", log: "/run/vssd-hv.log" };

impl Daemon {
    fn start(&self, vm: &TestVm) {
        vm.sh(&format!("vmtest-hv {}", self.start));
    }

    fn stop(&self, vm: &TestVm) {
        vm.sh(&format!("vmtest-hv stop-{}", if self.pid == "vssd-hv" { "vssd" } else { "daemon" }));
    }

    /// Sends `sig`; a STOP returns once every thread of the daemon is stopped. `kill` only
    /// queues a group stop and wakes one thread, which stops the others when it runs: on a busy
    /// guest vssd's device thread could otherwise still read the next request first.
    fn signal(&self, vm: &TestVm, sig: &str) {
        if sig != "STOP" {
            vm.sh(&format!("kill -{sig} $(cat /run/{}.pid)", self.pid));
            return;
        }
        let script = format!(
            "pid=$(cat /run/{}.pid); kill -STOP $pid; i=0; \
             while grep -q '^State:.[^Tt]' /proc/$pid/task/*/status && [ $i -lt 500 ]; do sleep 0.01; i=$((i + 1)); done; \
             grep -H '^State:' /proc/$pid/task/*/status",
            self.pid
        );
        let out = vm.sh(&script);
        let states: Vec<&str> = out.lines().filter(|l| l.contains("State:")).collect();
        assert!(
            !states.is_empty() && states.iter().all(|l| l.contains("\tT") || l.contains("\tt")),
            "{} did not stop within 5 s of SIGSTOP:\n{out}",
            self.pid
        );
    }
}

/// Boots a guest with hv-emu, hot-plugs the control port and connects the host to it.
fn boot(name: &str) -> (TestVm, Client) {
    let vm = TestVm::boot(name, VmOpts { agent: "none", append: "vmtest.hvemu=1".into(), ..Default::default() });
    let (code, out) = vm.shell("test -e /dev/vmbus/hv_vss && ls -l /dev/vmbus/hv_vss", Duration::from_secs(10));
    assert_eq!(
        code,
        0,
        "hv-emu made no /dev/vmbus/hv_vss (tests/guest/build.sh builds it in):\n{out}\n{}",
        hv_log(&vm)
    );
    let path = vm.work().join("hvhost.sock");
    {
        let mut q = vm.qmp();
        let sock = json!({"type": "unix", "data": {"path": path.display().to_string()}});
        q.execute(
            "chardev-add",
            Some(json!({"id": "hvhost", "backend": {"type": "socket", "data": {"addr": sock, "server": true, "wait": false}}})),
        )
        .expect("chardev-add");
        q.execute(
            "device_add",
            Some(json!({"driver": "virtserialport", "chardev": "hvhost", "name": "org.vssd.hvhost.0", "id": "hvhostport"})),
        )
        .expect("device_add virtserialport");
    }
    let host = Client::connect(&path).unwrap_or_else(|e| panic!("the control port's socket {}: {e}", path.display()));
    host.set_timeout(Some(Duration::from_secs(120))).unwrap();
    (vm, host)
}

fn hv_log(vm: &TestVm) -> String {
    vm.try_shell("cat /run/hv-emu.log", Duration::from_secs(10)).map(|r| r.1).unwrap_or_default()
}

fn count(vm: &TestVm, what: &str) -> usize {
    hv_log(vm).matches(what).count()
}

fn acks(vm: &TestVm) -> Vec<u64> {
    let last = vm.last_acks();
    FS.iter().map(|w| last.get(*w).copied().unwrap_or(0)).collect()
}

/// No writer makes progress for 1.5 s: every data filesystem is frozen.
fn assert_frozen(vm: &TestVm, what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    let before = acks(vm);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(before, acks(vm), "{what}: a writer made progress: not every filesystem is frozen");
}

/// Every writer makes progress: nothing is frozen.
fn assert_thawed(vm: &TestVm, what: &str) {
    let before = acks(vm);
    for (w, b) in FS.iter().zip(&before) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while vm.last_acks().get(*w).copied().unwrap_or(0) < b + 3 {
            assert!(Instant::now() < deadline, "{what}: writer {w} is stalled (still frozen?)");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn answer(host: &mut Client, op: &str) -> HostAnswer {
    host.request(op).unwrap_or_else(|e| panic!("host request {op}: {e}"))
}

fn wait_registered(vm: &TestVm, host: &mut Client, who: &str) {
    assert!(host.wait_ready(Duration::from_secs(30)).unwrap(), "{who} did not register within 30 s:\n{}", hv_log(vm));
    let st = host.state().unwrap();
    assert_eq!(st["registered"], 129, "{who} registers with REGISTER1 and reads the kernel's version: {st}");
}

/// The sequence of the issue, with the answers `hv_snapshot.c` gives; the same for both daemons.
fn kernel_sequence(vm: &TestVm, host: &mut Client, d: Daemon, who: &str) {
    host.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30))).unwrap();
    d.start(vm);
    wait_registered(vm, host, who);

    // GET_DM_INFO and the operations the kernel answers itself: never sent to the daemon.
    let sent = count(vm, "SentToDaemon");
    let a = host.request_raw(3, 0x55).unwrap();
    assert_eq!((a.error, a.flags), (HV_S_OK, 0), "GET_DM_INFO: HV_S_OK, dm_info.flags 0");
    for op in [0u8, 1, 4, 7, 8, 200] {
        let a = host.request_raw(op, 3).unwrap();
        assert_eq!((a.error, a.flags), (HV_S_OK, 3), "op {op}: the kernel's default answer");
    }
    assert_eq!(count(vm, "SentToDaemon"), sent, "{who} was sent a request the kernel answers itself");

    // FREEZE: every data filesystem frozen, HV_S_OK; THAW: HV_S_OK, writers go on.
    vm.wait_acks("e4", 10, Duration::from_secs(30));
    let a = answer(host, "freeze");
    assert_eq!((a.error, a.flags, a.dropped), (HV_S_OK, 0, false), "{who}: FREEZE");
    eprintln!("[hv] {who}: FREEZE answered in {:.1} ms", a.ms);
    assert_frozen(vm, &format!("{who} after FREEZE"));
    let a = answer(host, "thaw");
    assert_eq!((a.error, a.flags), (HV_S_OK, 0), "{who}: THAW");
    assert_thawed(vm, &format!("{who} after THAW"));

    // HOT_BACKUP: the reply's error (HV_S_OK) overlays the operation byte, so the kernel does
    // not set VSS_HBU_NO_AUTO_RECOVERY.
    let a = answer(host, "hot-backup");
    assert_eq!((a.error, a.flags), (HV_S_OK, 0), "{who}: HOT_BACKUP");

    // A FREEZE that outlives the kernel's (shortened) timeout while the daemon is stopped:
    // HV_E_FAIL at the timeout, nothing frozen for it.
    host.set_timeouts(Some(Duration::from_secs(3)), Some(Duration::from_secs(3))).unwrap();
    d.signal(vm, "STOP");
    let a = answer(host, "freeze");
    assert_eq!(a.error, HV_E_FAIL, "{who}: a FREEZE past the timeout");
    assert!(a.ms >= 2900.0 && a.ms < 8000.0, "{who}: answered at the 3 s timeout, not after {} ms", a.ms);
    assert_thawed(vm, &format!("{who} stopped, after the timed-out FREEZE"));
    // The FREEZE is still unread in the device: the next request cannot be queued.
    let a = answer(host, "thaw");
    assert_eq!(a.error, HV_E_FAIL, "{who}: THAW while the stale FREEZE fills the device");
    assert!(a.ms < 1000.0, "the kernel fails it at once, not at the timeout: {} ms", a.ms);
    // Resumed, the daemon reads the stale FREEZE and its reply is refused (EINVAL: no
    // transaction); it resets the device and registers again.
    let refused = count(vm, "WriteRefused(22)");
    d.signal(vm, "CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(vm, "WriteRefused(22)") == refused {
        assert!(Instant::now() < deadline, "{who}'s late reply never came:\n{}", hv_log(vm));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_registered(vm, host, &format!("{who} after its refused late reply"));
    host.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30))).unwrap();
    let a = answer(host, "thaw");
    assert_eq!(a.error, HV_S_OK, "{who}: THAW after the late FREEZE");
    assert_thawed(vm, &format!("{who} after the late FREEZE and a THAW"));

    // The daemon closes the device (killed) with a FREEZE pending: HV_E_FAIL at once.
    d.signal(vm, "STOP");
    let sent = count(vm, "SentToDaemon(5)");
    let a = std::thread::scope(|s| {
        let t = s.spawn(|| answer(host, "freeze"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(vm, "SentToDaemon(5)") == sent {
            assert!(Instant::now() < deadline, "the FREEZE never reached the device");
            std::thread::sleep(Duration::from_millis(100));
        }
        d.signal(vm, "KILL");
        t.join().unwrap()
    });
    assert_eq!(a.error, HV_E_FAIL, "{who} closed the device with a FREEZE pending");
    assert!(a.ms < 15_000.0, "failed by the close, not by the 30 s timeout: {} ms", a.ms);
    let st = host.state().unwrap();
    assert_eq!(st["state"], "device-init", "the close undoes the registration: {st}");
    assert_eq!(answer(host, "freeze").error, HV_E_FAIL, "no daemon: FREEZE fails");
    d.stop(vm);
    d.start(vm);
    wait_registered(vm, host, &format!("{who} restarted"));

    // The fake THAW of hibernation: the daemon thaws, its reply is refused, it registers again.
    let a = answer(host, "freeze");
    assert_eq!(a.error, HV_S_OK, "{who}: FREEZE before the fake THAW");
    assert_frozen(vm, &format!("{who} before the fake THAW"));
    let refused = count(vm, "WriteRefused(22)");
    host.fake_thaw().unwrap();
    assert_thawed(vm, &format!("{who} after the fake THAW"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(vm, "WriteRefused(22)") == refused {
        assert!(Instant::now() < deadline, "{who}'s reply to the fake THAW was not refused:\n{}", hv_log(vm));
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_registered(vm, host, &format!("{who} after the fake THAW"));
    assert_eq!(answer(host, "freeze").error, HV_S_OK, "{who} serves again after the fake THAW");
    assert_eq!(answer(host, "thaw").error, HV_S_OK);
    assert_thawed(vm, &format!("{who} at the end"));
    d.stop(vm);
    eprintln!("[hv] {who}'s log (tail):\n{}", vm.sh(&format!("tail -n 40 {}", d.log)));
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn stock_hv_vss_daemon_gets_the_kernels_answers_from_the_emulation() {
    require_vm!();
    let (vm, mut host) = boot("hvdaemon");
    let (code, out) =
        vm.shell("test -x /usr/sbin/hv_vss_daemon && cat /etc/hyperv-daemons.deb", Duration::from_secs(10));
    assert_eq!(code, 0, "the guest has no hv_vss_daemon (tests/guest/build.sh downloads hyperv-daemons):\n{out}");
    eprintln!("[hv] stock daemon from {}", out.trim());

    // Before any daemon: DEVICE_INIT; FREEZE fails, GET_DM_INFO is the kernel's.
    assert_eq!(host.state().unwrap()["state"], "device-init");
    assert_eq!(answer(&mut host, "freeze").error, HV_E_FAIL, "FREEZE without a daemon");
    let a = answer(&mut host, "get-dm-info");
    assert_eq!((a.error, a.flags), (HV_S_OK, 0));

    kernel_sequence(&vm, &mut host, STOCK, "hv_vss_daemon");
    let (_, msgs) = vm.shell("cat /run/messages", Duration::from_secs(10));
    eprintln!("[hv] hv_vss_daemon's syslog:\n{msgs}");
    assert!(msgs.contains("129"), "hv_vss_daemon logged the kernel's version 129:\n{msgs}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_gets_the_same_answers_as_hv_vss_daemon() {
    require_vm!();
    let (vm, mut host) = boot("hvvssd");
    kernel_sequence(&vm, &mut host, VSSD, "vssd");
    // The stock daemon after vssd, in the same guest: the same answers for the basic requests.
    STOCK.start(&vm);
    wait_registered(&vm, &mut host, "hv_vss_daemon after vssd");
    assert_eq!(answer(&mut host, "freeze").error, HV_S_OK);
    assert_eq!(answer(&mut host, "thaw").error, HV_S_OK);
    assert_eq!(answer(&mut host, "hot-backup").error, HV_S_OK);
    STOCK.stop(&vm);

    // What only vssd does: an app in the guest (appvss's CLI, as an admin would script it)
    // vetoes at HOT_BACKUP, and the host hears HV_E_FAIL where hv_vss_daemon says yes.
    VSSD.start(&vm);
    wait_registered(&vm, &mut host, "vssd, for the apps");
    let (code, out) = vm.shell("test -x /usr/bin/appvss", Duration::from_secs(10));
    assert_eq!(code, 0, "the guest has no appvss CLI (tests/guest/build.sh builds it in; see its extras.err): {out}");
    // Counted by name: the guest's SQLite app registers again with each new vssd, at a moment of
    // its own, and counting any registration let HOT_BACKUP go before the veto was in.
    let apps_before = vssd_logged(&vm, "app registered.*name=veto");
    vm.sh(
        "appvss hold --name veto --socket /run/vssd/appvss.sock \
           --on-prepare 'echo migrating >&2; exit 1' </dev/null >>/run/appvss-veto.log 2>&1 & echo $! >/run/appvss-veto.pid",
    );
    wait_vssd_logged(&vm, "app registered.*name=veto", apps_before + 1, "the vetoing app");
    let a = answer(&mut host, "hot-backup");
    assert_eq!(a.error, HV_E_FAIL, "an app's veto at HOT_BACKUP is HV_E_FAIL to the host");
    let line = vm.sh("grep 'Hyper-V HOT_BACKUP' /run/vssd-hv.log | tail -n 1");
    assert!(line.contains("migrating"), "vssd's log names the veto's reason: {line}");
    assert_thawed(&vm, "after the vetoed HOT_BACKUP");
    let gone = vssd_logged(&vm, "app disconnected.*name=veto");
    vm.sh("kill $(cat /run/appvss-veto.pid); rm -f /run/appvss-veto.pid");
    wait_vssd_logged(&vm, "app disconnected.*name=veto", gone + 1, "the vetoing app, killed");

    // Without the veto, yes again; and an app holds for the FREEZE: its --on-freeze ran
    // before the host got HV_S_OK, its --on-thaw after the THAW.
    let apps_before = vssd_logged(&vm, "app registered.*name=holder");
    vm.sh("rm -f /run/held-*; appvss hold --name holder --socket /run/vssd/appvss.sock \
           --on-freeze 'touch /run/held-freeze' --on-thaw 'touch /run/held-thaw' \
           </dev/null >>/run/appvss-holder.log 2>&1 & echo $! >/run/appvss-holder.pid");
    wait_vssd_logged(&vm, "app registered.*name=holder", apps_before + 1, "the holding app");
    assert_eq!(answer(&mut host, "hot-backup").error, HV_S_OK, "HOT_BACKUP once the veto is gone");
    assert_eq!(answer(&mut host, "freeze").error, HV_S_OK, "FREEZE with apps");
    let (code, _) = vm.shell("test -e /run/held-freeze && test ! -e /run/held-thaw", Duration::from_secs(10));
    assert_eq!(code, 0, "the app's --on-freeze ran before HV_S_OK and it holds until the THAW");
    assert_frozen(&vm, "vssd's FREEZE with apps");
    assert_eq!(answer(&mut host, "thaw").error, HV_S_OK);
    assert_thawed(&vm, "after the THAW of the FREEZE with apps");
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm.shell("test -e /run/held-thaw", Duration::from_secs(10)).0 != 0 {
        assert!(Instant::now() < deadline, "the app's --on-thaw never ran:\n{}", vm.sh("cat /run/appvss-holder.log"));
        std::thread::sleep(Duration::from_millis(200));
    }
    vm.sh("kill $(cat /run/appvss-holder.pid); rm -f /run/appvss-holder.pid");
    VSSD.stop(&vm);
}

/// How many lines of vssd's Hyper-V log say `what` (`app registered`, `app disconnected`).
fn vssd_logged(vm: &TestVm, what: &str) -> usize {
    vm.sh(&format!("grep -c '{what}' /run/vssd-hv.log || true")).trim().parse().unwrap_or(0)
}

fn wait_vssd_logged(vm: &TestVm, what: &str, n: usize, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while vssd_logged(vm, what) < n {
        assert!(
            Instant::now() < deadline,
            "{who}: vssd never logged `{what}`:\n{}",
            vm.sh("tail -n 20 /run/vssd-hv.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// FREEZE → answer, as the host sees it (measured by the emulated kernel), for `n` cycles.
fn freeze_times(vm: &TestVm, host: &mut Client, d: Daemon, who: &str, n: usize) -> Vec<f64> {
    d.start(vm);
    wait_registered(vm, host, who);
    let mut t = Vec::new();
    for _ in 0..n {
        // Dirty data in every filesystem before each freeze (the writers run all the time).
        std::thread::sleep(Duration::from_millis(500));
        let a = answer(host, "freeze");
        assert_eq!(a.error, HV_S_OK, "{who}: FREEZE");
        t.push(a.ms);
        assert_eq!(answer(host, "thaw").error, HV_S_OK, "{who}: THAW");
    }
    d.stop(vm);
    t
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_answers_freeze_faster_than_hv_vss_daemon() {
    require_vm!();
    let (vm, mut host) = boot("hvbench");
    vm.wait_acks("e4", 10, Duration::from_secs(30));
    let mut daemon = Vec::new();
    let mut vssd = Vec::new();
    // Alternate, so that neither gets the guest's first (slower) freezes alone.
    for _ in 0..2 {
        daemon.extend(freeze_times(&vm, &mut host, STOCK, "hv_vss_daemon", 5));
        vssd.extend(freeze_times(&vm, &mut host, VSSD, "vssd", 5));
    }
    let (md, mv) = (median(&mut daemon), median(&mut vssd));
    eprintln!(
        "[hv-bench] FREEZE -> answer, {} dirty filesystems, {} cycles each: hv_vss_daemon median {md:.1} ms \
         (min {:.1}, max {:.1}); vssd median {mv:.1} ms (min {:.1}, max {:.1}); ratio {:.2}",
        FS.len(),
        daemon.len(),
        daemon[0],
        daemon[daemon.len() - 1],
        vssd[0],
        vssd[vssd.len() - 1],
        md / mv
    );
    assert!(mv < md, "vssd's FREEZE ({mv:.1} ms) is not faster than hv_vss_daemon's ({md:.1} ms)");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_backup_frozen_through_the_hyperv_path_verifies_clean_with_every_acked_record() {
    require_vm!();
    let (vm, mut host) = boot("hvbackup");
    VSSD.start(&vm);
    wait_registered(&vm, &mut host, "vssd");
    // The SQLite app writes once it has registered with vssd (it retries with backoff).
    vm.wait_acks("sqlite", 20, Duration::from_secs(90));
    vm.wait_acks("logs", 50, Duration::from_secs(60));
    let before = vm.last_acks();

    // The host freezes through the device, takes the point-in-time copy (vmctl's QMP
    // transaction of blockdev-backup, without asking a QGA agent), thaws through the device.
    let a = answer(&mut host, "freeze");
    assert_eq!(a.error, HV_S_OK, "FREEZE through the Hyper-V path");
    let t = Instant::now();
    // The SQLite app took part: vssd's FREEZE held it (checkpoint, write lock) like a QGA one.
    let line = vm.sh("grep 'Hyper-V FREEZE' /run/vssd-hv.log | tail -n 1");
    assert!(line.contains("HV_S_OK") && line.contains("apps=1"), "vssd's FREEZE did not hold the app: {line}");
    let v = vm.vmctl_json(&["backup", &vm.name, "--quiesce", "off", "--verify"], 0);
    let window = t.elapsed();
    let a = answer(&mut host, "thaw");
    assert_eq!(a.error, HV_S_OK, "THAW through the Hyper-V path");
    eprintln!("[hv] backup while frozen through /dev/vmbus/hv_vss: {:.1} s frozen; {v}", window.as_secs_f64());
    assert_eq!(v["verify"]["ok"], true, "verify (checksums, qemu-img check, fsck -n): {v}");
    assert_thawed(&vm, "after the backup's THAW");

    let dir = std::path::PathBuf::from(v["dir"].as_str().unwrap_or_else(|| panic!("no dir in {v}")));
    let mut found = std::collections::BTreeMap::new();
    for disk in ["data", "data2"] {
        let mut img = hostsim::inspect::RawImage::open(&dir.join(format!("{disk}.qcow2"))).expect("open the backup");
        for (p, mnt) in img.mount_all().expect("mount the backup's filesystems") {
            let label = p.label.to_lowercase();
            let rec = mnt.join("records.log");
            if rec.exists() {
                found.insert(label.clone(), tests::vm::check_records(&rec));
            }
            let db = mnt.join("app.db");
            if db.exists() {
                assert_eq!(
                    tests::vm::sqlite(&db, "PRAGMA integrity_check"),
                    "ok",
                    "SQLite integrity_check of the backup"
                );
                let r = tests::vm::sqlite(&db, "SELECT coalesce(max(n),0) || ' ' || count(*) FROM records");
                let (max, count) = r.split_once(' ').unwrap();
                let (max, count): (u64, u64) = (max.parse().unwrap(), count.parse().unwrap());
                assert_eq!(max, count, "records 1..{max} without a hole");
                found.insert("sqlite".into(), max);
            }
        }
    }
    for (w, n) in &before {
        let got = found.get(w).copied().unwrap_or_else(|| panic!("writer {w} has nothing in the backup: {found:?}"));
        assert!(got >= *n, "writer {w}: record {n} was acked before the FREEZE, the backup ends at {got}");
    }
    eprintln!("[hv] acked before the FREEZE: {before:?}; in the backup: {found:?}");
    VSSD.stop(&vm);
}

/// The `Conflicts=` line of vssd.service that stops hv_vss_daemon (the kernel lets one process
/// open /dev/vmbus/hv_vss).
fn conflicts_of_vssd_service() -> Vec<String> {
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let unit = std::fs::read_to_string(ws.join("packaging/vssd.service")).expect("packaging/vssd.service");
    unit.lines()
        .filter_map(|l| l.strip_prefix("Conflicts="))
        .flat_map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect()
}

#[test]
fn vssd_service_conflicts_with_hv_vss_daemon() {
    let c = conflicts_of_vssd_service();
    for unit in ["hv-vss-daemon.service", "hyperv-daemons.hv-vss-daemon.service", "qemu-guest-agent.service"] {
        assert!(c.iter().any(|u| u == unit), "vssd.service does not conflict with {unit}: {c:?}");
    }
}

/// Debian's hyperv-daemons (the one the guest runs) names its unit as vssd.service's
/// Conflicts= does, so installing vssd stops the stock daemon rather than racing it.
#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn debian_names_the_daemons_unit_as_vssd_service_conflicts_with() {
    let g = tests::vm::guest();
    let unit = g.dir.join("hyperv-root/lib/systemd/system/hv-vss-daemon.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| {
        panic!("{}: {e} (tests/guest/build.sh unpacks Debian's hyperv-daemons there)", unit.display())
    });
    assert!(text.contains("ExecStart=/usr/sbin/hv_vss_daemon"), "{}:\n{text}", unit.display());
    assert!(conflicts_of_vssd_service().iter().any(|u| u == "hv-vss-daemon.service"));
}
