//! VM tier: vssd installed in a real distribution (Debian 12, systemd as PID 1, udev), as its
//! package installs it. One boot for every check, in order: udev/systemd started vssd at boot;
//! `vmctl backup` of the VM is quiesced; `systemctl kill -s KILL vssd` while frozen → systemd
//! restarts it → every filesystem thawed within seconds; the journal has vssd's logs;
//! a vssd hung (SIGSTOP) while frozen is killed by the watchdog and its restart thaws (with
//! h-notify's WatchdogSec); the agent port unplugged and hot-plugged again (QMP `device_add`) starts vssd through udev;
//! `systemctl poweroff` while frozen thaws first and leaves clean filesystems. Also: the
//! backup's SQLite database is sound and has every acknowledged record; `busctl` in the guest
//! sees the freeze and thaw signals and reads the properties; a filesystem mounted after vssd
//! started is frozen; with the journal persistent on the frozen root, vssd keeps answering and
//! thaws on time, and no write reaches a frozen device; `dpkg -i` of a newer vssd while it holds
//! a freeze waits for the thaw, then runs the new one; `dpkg --purge` leaves nothing running,
//! nothing frozen, no unit, no configuration, no group; `systemd-analyze security vssd` is
//! printed with its exposure score.
//! Needs root, QEMU and debootstrap; builds the guest on first use (tests/guest/build-debian.sh).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hostsim::inspect::RawImage;
use tests::sysguest::{cannot_run, image, SysVm};
use tests::vm::sqlite;
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

/// The last record the SQLite writer acknowledged (its `ack N` lines, in /run).
fn last_ack(vm: &SysVm) -> u64 {
    let t = vm.sh("tail -n 1 /run/vmtest-sqlite.acks 2>/dev/null || true");
    t.trim().strip_prefix("ack ").and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// (writes completed, sectors written) of the block device under each mount point, from
/// /sys/class/block/DEV/stat (reading sysfs writes nothing).
fn write_counters(vm: &SysVm, mps: &[String]) -> BTreeMap<String, (String, u64, u64)> {
    let script = mps
        .iter()
        .map(|m| {
            format!(
                "d=$(findmnt -no SOURCE '{m}'); n=$(basename \"$(readlink -f \"$d\")\"); \
                 set -- $(cat /sys/class/block/$n/stat); echo \"{m} $n $5 $7\""
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    vm.sh(&script)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 {
                return None;
            }
            Some((f[0].to_string(), (f[1].to_string(), f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .collect()
}

/// The signals `busctl monitor --json=short` wrote in the guest so far: (member, data).
fn bus_signals(vm: &SysVm, file: &str) -> Vec<(String, Value)> {
    vm.sh(&format!("cat {file}"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["type"] == "signal")
        .map(|m| (m["member"].as_str().unwrap_or("").to_string(), m["payload"]["data"].clone()))
        .collect()
}

/// A property of vssd's D-Bus object, read in the guest with `busctl get-property`.
fn bus_prop(vm: &SysVm, name: &str) -> Value {
    let out = vm.sh(&format!(
        "busctl --system --json=short get-property org.vssd.Agent /org/vssd/Agent org.vssd.Agent1 {name}"
    ));
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("busctl get-property {name}: {e}: {out}"));
    v["data"].clone()
}

/// Waits up to `limit` for a guest condition (a shell test) to hold.
fn wait_guest(vm: &SysVm, what: &str, test: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while vm.shell(test, Duration::from_secs(30)).0 != 0 {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
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

    // systemd's view of the unit's hardening, for the log, with its exposure score (0 = the
    // most confined, 10 = none). vssd sees every mount as it is (no mount namespace of its
    // own: packaging/vssd.service says why), so the score stays mid-range.
    let security = vm.sh("systemd-analyze security --no-pager vssd.service");
    eprintln!("[sysguest] systemd-analyze security vssd:\n{security}");
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("Overall exposure level for vssd.service:").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in systemd-analyze security's output:\n{security}"));
    eprintln!("[sysguest] systemd-analyze security vssd: overall exposure {exposure:.1} (of 10)");
    assert!((0.0..=10.0).contains(&exposure));

    // (2) vmctl backup of the running guest, quiesced by vssd, with appvss's SQLite writer
    // (vmtest-sqlite.service) holding the freeze: application-consistent.
    assert_eq!(vm.sh("systemctl is-active vmtest-sqlite").trim(), "active", "the application service runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    let registered = "journalctl -b -u vssd -o cat | grep -q 'app registered.*name=sqlite'";
    while vm.shell(registered, Duration::from_secs(30)).0 != 0 {
        assert!(Instant::now() < deadline, "the SQLite writer never registered with vssd");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every record the writer acknowledged before the backup started must be in it.
    wait_guest(
        &vm,
        "the SQLite writer acknowledges records",
        "[ -s /run/vmtest-sqlite.acks ]",
        Duration::from_secs(30),
    );
    let acked = last_ack(&vm);
    let v = vm.vmctl_json(&["backup", "sysd", "--quiesce", "required"], 0);
    let consistency = v["consistency"].as_str().unwrap_or("?");
    assert_eq!(consistency, "application", "the backup is not application-consistent: {v}");
    let frozen = v["frozen"].as_u64().unwrap_or(0);
    assert!(frozen >= 5, "the backup froze {frozen} filesystems, want root and the data filesystems: {v}");
    eprintln!(
        "[sysguest] backup: consistency {consistency}, {frozen} frozen, freeze window {} ms",
        v["freeze_window_ms"]
    );
    // (2b) Inside the backup: the SQLite database is sound and has every acknowledged record,
    // 1..N without a hole (the writer's lock held the freeze after a checkpoint).
    let dir = std::path::PathBuf::from(v["dir"].as_str().unwrap_or_else(|| panic!("no dir in {v}")));
    let mut img = RawImage::open(&dir.join("data.qcow2")).expect("open the backup's data disk");
    let mounted = img.mount_all().expect("mount the backup's filesystems");
    let (_, db_mnt) = mounted
        .iter()
        .find(|(p, _)| p.label.eq_ignore_ascii_case("db"))
        .unwrap_or_else(|| panic!("no filesystem labelled db in the backup: {mounted:?}"));
    let db = db_mnt.join("app.db");
    assert!(db.is_file(), "no app.db in the backup's /data/db");
    assert_eq!(sqlite(&db, "PRAGMA integrity_check"), "ok", "SQLite integrity_check of the backup");
    let r = sqlite(&db, "SELECT coalesce(max(n),0) || ' ' || count(*) FROM records");
    let (max, count) = r.split_once(' ').unwrap();
    let (max, count): (u64, u64) = (max.parse().unwrap(), count.parse().unwrap());
    assert_eq!(max, count, "records 1..{max} without a hole");
    assert!(acked > 0 && max >= acked, "record {acked} was acknowledged before the backup, which ends at {max}");
    eprintln!("[sysguest] backup's app.db: integrity ok, records 1..{max}; acknowledged before the backup: {acked}");
    drop(img);

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

    // (8) D-Bus, a filesystem mounted after vssd started, and vssd's logging while the root
    // filesystem (where a persistent journal lives) is frozen.
    // A loop filesystem mounted now: it reaches vssd's view (no mount namespace of its own).
    vm.sh("modprobe loop 2>/dev/null; truncate -s 64M /var/tmp/late.img && mkfs.ext4 -q -F -L late /var/tmp/late.img && mkdir -p /mnt/late \
         && mount -o loop /var/tmp/late.img /mnt/late && echo x >/mnt/late/f && sync");
    // busctl monitors vssd's signals from now on (into /run: never a frozen filesystem).
    vm.sh("setsid busctl --system --json=short monitor org.vssd.Agent >/run/busmon.json 2>/run/busmon.err \
         </dev/null 3>&- & echo $! >/run/busmon.pid; sleep 1; kill -0 $(cat /run/busmon.pid)");
    assert_eq!(bus_prop(&vm, "State"), json!("thawed"), "busctl get-property State");
    assert_eq!(bus_prop(&vm, "FrozenFilesystems"), json!([]));
    // The journal persistent, on the root filesystem that the freeze is about to freeze
    // (journald blocks on its writes there until the thaw).
    vm.sh("mkdir -p /var/log/journal && printf '[Journal]\\nStorage=persistent\\n' \
         >/etc/systemd/journald.conf.d/vmtest.conf && systemctl restart systemd-journald && journalctl --flush \
         && ls /var/log/journal/*/system.journal");
    let guest_now = |vm: &SysVm| -> f64 { vm.sh("date +%s.%N").trim().parse().unwrap() };
    let t_before = guest_now(&vm);
    let t_freeze = Instant::now();
    let r = a.execute("vssd-freeze", Some(json!({"deadline": 60})), Duration::from_secs(60)).unwrap();
    let froze_in = t_freeze.elapsed();
    let frozen_mps: Vec<String> = r["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["outcome"] == "frozen")
        .map(|m| m["mountpoint"].as_str().unwrap().to_string())
        .collect();
    assert!(
        frozen_mps.iter().any(|m| m == "/mnt/late"),
        "the filesystem mounted after vssd started is not in the freeze report: {frozen_mps:?}\n{r}"
    );
    assert!(frozen_mps.iter().any(|m| m == "/"), "the root filesystem is not frozen: {frozen_mps:?}");
    // (The bus announces a freeze once it is complete: poll a moment.)
    let until = Instant::now() + Duration::from_secs(10);
    while bus_prop(&vm, "State") != json!("frozen") {
        assert!(Instant::now() < until, "State (busctl) did not become frozen within 10 s of the freeze");
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut in_prop = bus_prop(&vm, "FrozenFilesystems").as_array().unwrap().clone();
    in_prop.sort_by_key(|v| v.to_string());
    let mut want: Vec<Value> = frozen_mps.iter().map(|m| json!(m)).collect();
    want.sort_by_key(|v| v.to_string());
    assert_eq!(in_prop, want, "FrozenFilesystems (busctl) is not the report's frozen list");
    let left = bus_prop(&vm, "SecondsUntilAutoThaw").as_f64().unwrap();
    assert!(left > 30.0 && left <= 60.0, "SecondsUntilAutoThaw {left}");
    eprintln!(
        "[sysguest] frozen in {} ms ({:.1} s round trip) with the journal persistent on /: {frozen_mps:?}",
        r["elapsed-ms"],
        froze_in.as_secs_f64()
    );
    // While frozen: vssd answers the host, vssctl and the bus, promptly, and logs (a refused
    // second freeze is logged); no write reaches a frozen device meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    let w0 = write_counters(&vm, &frozen_mps);
    assert_eq!(w0.len(), frozen_mps.len(), "no block statistics for some frozen filesystem: {w0:?}");
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
        let status = vm.sh("vssctl --timeout 5 status");
        assert!(status.contains("status: frozen"), "vssctl status while frozen: {status}");
        assert_eq!(bus_prop(&vm, "State"), json!("frozen"));
        if i % 3 == 0 {
            // A second freeze while frozen: refused (and logged), as by qemu-ga.
            let e = a.execute("guest-fsfreeze-freeze", None, Duration::from_secs(10));
            if i == 0 {
                eprintln!("[sysguest] a second guest-fsfreeze-freeze while frozen: {e:?}");
            }
        }
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(slowest < Duration::from_secs(10), "vssd answered slowly while frozen: {slowest:?}");
    let w1 = write_counters(&vm, &frozen_mps);
    for (m, (dev, writes, sectors)) in &w0 {
        let (_, w, sct) = &w1[m];
        assert_eq!(
            (writes, sectors),
            (w, sct),
            "{m} ({dev}) is frozen, but its device completed {} writes ({} sectors) meanwhile",
            w - writes,
            sct - sectors
        );
    }
    let t_thaw = Instant::now();
    let thawed = a.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)).unwrap();
    let thaw_took = t_thaw.elapsed();
    assert_eq!(thawed.as_u64(), Some(frozen_mps.len() as u64), "guest-fsfreeze-thaw: {thawed}");
    assert!(thaw_took < Duration::from_secs(10), "the thaw took {thaw_took:?} with the journal on a frozen /");
    eprintln!(
        "[sysguest] while frozen ({} filesystems): 10 rounds of status (QGA, vssctl, busctl), slowest {:.2} s; \
         no write reached {:?}; thaw answered in {:.2} s",
        frozen_mps.len(),
        slowest.as_secs_f64(),
        w0.values().map(|(d, _, _)| d.as_str()).collect::<Vec<_>>(),
        thaw_took.as_secs_f64()
    );
    // A freeze left to its deadline: vssd thaws by itself, on time, journal still on /.
    let t_auto = Instant::now();
    a.execute("vssd-freeze", Some(json!({"deadline": 5})), Duration::from_secs(60)).unwrap();
    let (code, out) = vm.shell(&write_everywhere(), Duration::from_secs(60));
    let auto_after = t_auto.elapsed();
    assert_eq!(code, 0, "writing after the auto-thaw: {out}");
    assert!(auto_after < Duration::from_secs(20), "the 5 s deadline thawed only after {auto_after:?}");
    assert!(auto_after >= Duration::from_secs(4), "thawed after {auto_after:?}, before its 5 s deadline");
    eprintln!("[sysguest] 5 s deadline: every filesystem writable {:.1} s after the freeze", auto_after.as_secs_f64());
    // What busctl saw: the freezes, the thaw, the auto-thaw with its reason.
    let deadline = Instant::now() + Duration::from_secs(20);
    let sig = loop {
        let sig = bus_signals(&vm, "/run/busmon.json");
        if sig.iter().any(|(m, _)| m == "AutoThawed") || Instant::now() > deadline {
            break sig;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let members: Vec<&str> =
        sig.iter().map(|(m, _)| m.as_str()).filter(|m| ["Frozen", "Thawed", "AutoThawed"].contains(m)).collect();
    assert_eq!(members, ["Frozen", "Thawed", "Frozen", "AutoThawed"], "vssd's signals as busctl saw them");
    let frozen_report: Value =
        serde_json::from_str(sig.iter().find(|(m, _)| m == "Frozen").unwrap().1[0].as_str().unwrap())
            .expect("Frozen's report is JSON");
    assert_eq!(frozen_report["frozen"].as_u64(), Some(frozen_mps.len() as u64), "Frozen signal: {frozen_report}");
    let reason = &sig.iter().find(|(m, _)| m == "AutoThawed").unwrap().1;
    assert_eq!(reason, &json!(["deadline"]), "AutoThawed's reason");
    let changed = sig.iter().filter(|(m, _)| m == "PropertiesChanged").count();
    eprintln!("[sysguest] busctl monitor: {members:?} and {changed} PropertiesChanged");
    // The journal (persistent) has what vssd logged while / was frozen, once journald could
    // write again.
    let t_after = guest_now(&vm);
    let logged =
        vm.sh(&format!("journalctl -u vssd -o short-unix --no-pager --since @{t_before:.3} --until @{t_after:.3}"));
    let files = vm.sh("ls /var/log/journal/*/");
    assert!(files.contains("system.journal"), "the journal was not persistent: /var/log/journal has {files}");
    let lines = logged.lines().filter(|l| !l.starts_with("--")).count();
    assert!(lines >= 2, "vssd's lines of the frozen period are missing from the journal:\n{logged}");
    eprintln!("[sysguest] journal (persistent): {lines} lines of vssd from the two freezes:\n{logged}");
    // Back to the volatile journal; the late filesystem goes.
    vm.sh(
        "printf '[Journal]\\nStorage=volatile\\n' >/etc/systemd/journald.conf.d/vmtest.conf && journalctl --relinquish-var \
         && systemctl restart systemd-journald && rm -rf /var/log/journal && umount /mnt/late && rm -f /var/tmp/late.img \
         && kill $(cat /run/busmon.pid); true",
    );

    // (9) An upgrade (dpkg -i of a newer build) while vssd holds a host's freeze: the restart
    // waits for the thaw (vssd-wait-thawed says so), the host's thaw is served by the old vssd,
    // then the new one runs. (Only /data/e3 is frozen: with / frozen, dpkg itself would block
    // at its first write until the thaw.)
    let next_version = vm.sh("dpkg-deb -f /opt/vmtest/vssd-next.deb Version").trim().to_string();
    assert_ne!(next_version, vm.sh("dpkg-query -W -f '${Version}' vssd").trim(), "the upgrade is no newer build");
    let pid_old = main_pid(&vm);
    let r = a
        .execute("vssd-freeze", Some(json!({"mountpoints": ["/data/e3"], "deadline": 90})), Duration::from_secs(60))
        .unwrap();
    assert_eq!(r["frozen"], json!(1), "{r}");
    let t_up = Instant::now();
    vm.sh("rm -f /run/upgrade.rc; setsid sh -c 'dpkg -i /opt/vmtest/vssd-next.deb >/run/upgrade.log 2>&1; \
         echo $? >/run/upgrade.rc' </dev/null >/dev/null 2>&1 3>&- &");
    wait_guest(
        &vm,
        "dpkg -i waits for the thaw",
        "grep -q 'waiting for it to thaw' /run/upgrade.log",
        Duration::from_secs(120),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(main_pid(&vm), pid_old, "the upgrade restarted vssd while it held a freeze");
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
    assert!(vm.shell("test -e /run/upgrade.rc", Duration::from_secs(10)).0 != 0, "dpkg ended during the freeze");
    let thawed = a.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)).unwrap();
    assert_eq!(thawed, json!(1), "the host's thaw during the upgrade: {thawed}");
    drop(a);
    wait_guest(&vm, "dpkg -i of the newer vssd ends", "test -s /run/upgrade.rc", Duration::from_secs(180));
    let up_log = vm.sh("cat /run/upgrade.log");
    assert_eq!(vm.sh("cat /run/upgrade.rc").trim(), "0", "dpkg -i of the newer vssd:\n{up_log}");
    assert!(up_log.contains("vssd thawed after"), "the upgrade did not say it waited for the thaw:\n{up_log}");
    assert_eq!(vm.sh("dpkg-query -W -f '${Version}' vssd").trim(), next_version);
    wait_guest(&vm, "the new vssd runs", "systemctl is-active -q vssd", Duration::from_secs(30));
    let pid_new = main_pid(&vm);
    assert!(pid_new != pid_old && pid_new != 0, "vssd was not restarted by the upgrade");
    let mut a = vm.agent();
    assert_eq!(a.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("thawed"));
    eprintln!(
        "[sysguest] upgrade to {next_version} during a freeze: dpkg -i took {:.1} s, vssd pid {pid_old} → {pid_new}; it said:\n{}",
        t_up.elapsed().as_secs_f64(),
        up_log.lines().filter(|l| l.contains("vssd")).collect::<Vec<_>>().join("\n")
    );

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
    drop(vm.agent());

    // (10) dpkg --purge while vssd holds a freeze (vssctl's, 8 s): the removal waits for the
    // thaw, then nothing of vssd is left: no process, nothing frozen, no unit, no
    // configuration, no group. Then the package installed again starts vssd at once (the
    // port is there).
    vm.sh("vssctl freeze --deadline 8 /data/e3");
    let t_purge = Instant::now();
    let (code, purge_log) = vm.shell("dpkg --purge vssd", Duration::from_secs(120));
    let purge_took = t_purge.elapsed();
    assert_eq!(code, 0, "dpkg --purge vssd:\n{purge_log}");
    assert!(purge_log.contains("waiting for it to thaw"), "the purge did not wait for the thaw:\n{purge_log}");
    let left =
        vm.sh("for f in /usr/sbin/vssd /lib/systemd/system/vssd.service /lib/udev/rules.d/60-vssd.rules /etc/vssd \
         /etc/systemd/system/multi-user.target.wants/vssd.service; do [ -e $f ] && echo $f; done; \
         getent group vssd; pgrep -a -x vssd; systemctl is-active vssd; true");
    assert_eq!(left.trim(), "inactive", "left after dpkg --purge vssd:\n{left}");
    let (code, out) = vm.shell(&write_everywhere(), Duration::from_secs(30));
    assert_eq!(code, 0, "a filesystem is still frozen after the purge: {out}");
    eprintln!(
        "[sysguest] dpkg --purge vssd while frozen: {:.1} s (waited for the thaw); nothing left\n{}",
        purge_took.as_secs_f64(),
        purge_log.lines().filter(|l| l.contains("vssd")).collect::<Vec<_>>().join("\n")
    );
    let install = vm.sh("dpkg -i /opt/vmtest/vssd-next.deb");
    wait_guest(&vm, "the reinstalled vssd runs", "systemctl is-active -q vssd", Duration::from_secs(60));
    assert!(vm.sh("getent group vssd").starts_with("vssd:"), "the reinstall made no vssd group:\n{install}");
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
