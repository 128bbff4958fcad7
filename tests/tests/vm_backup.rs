//! VM tier: `vmctl backup` of a running guest (issue 4). Needs root (loop devices to look
//! inside the backups) and QEMU; builds the guest image on first use.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hostsim::inspect::RawImage;
use tests::vm::{check_records, partial_backups, sqlite, TestVm, VmOpts};
use tests::*;

const MIB: u64 = 1 << 20;

fn backup_dir(v: &Value) -> PathBuf {
    PathBuf::from(v["dir"].as_str().unwrap_or_else(|| panic!("no dir in {v}")))
}

/// Every complete backup `vmctl backup list` shows, and the partial leftovers it reports.
fn listed(vm: &TestVm, target: Option<&Path>) -> (Vec<String>, usize) {
    let v = match target {
        Some(t) => vm.vmctl_json(&["backup".as_ref(), "list".as_ref(), "--target".as_ref(), t.as_os_str()], 0),
        None => vm.vmctl_json(&["backup", "list", &vm.name], 0),
    };
    let ids = v["backups"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    (ids, v["incomplete"].as_array().map(|a| a.len()).unwrap_or(0))
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn backup_while_writers_run_has_clean_filesystems_and_every_acked_record() {
    require_vm!();
    let vm = TestVm::boot("consistent", VmOpts::default());
    vm.wait_acks("sqlite", 20, Duration::from_secs(90));
    vm.wait_acks("logs", 50, Duration::from_secs(30));
    // Acked before vmctl even starts: certainly before the freeze.
    let before = vm.last_acks();

    let v = vm.vmctl_json(&["backup", "consistent", "--verify"], 0);
    let consistency = v["consistency"].as_str().unwrap();
    assert!(consistency == "application" || consistency == "filesystem", "{v}");
    let window = v["freeze_window_ms"].as_f64().unwrap();
    assert!(window > 0.0 && window < 10_000.0, "freeze window {window} ms: {v}");
    assert_eq!(v["frozen"], 4, "{v}");
    assert_eq!(v["verify"]["ok"], true, "verify (checksums, qemu-img check, fsck -n): {v}");
    eprintln!("[test] consistency {consistency}, freeze window {window} ms");

    // The writers went on after the thaw.
    let after_backup = vm.last_acks();
    for (w, n) in &after_backup {
        vm.wait_acks(w, n + 3, Duration::from_secs(60));
    }
    assert_eq!(vm.fsstatus(), "thawed");

    // Inside the backup: every acked record, no torn line, a sound database.
    let dir = backup_dir(&v);
    let mut found = std::collections::BTreeMap::new();
    for disk in ["data", "data2"] {
        let mut img = RawImage::open(&dir.join(format!("{disk}.qcow2"))).expect("open the backup");
        for (p, mnt) in img.mount_all().expect("mount the backup's filesystems") {
            let label = p.label.to_lowercase();
            let rec = mnt.join("records.log");
            if rec.exists() {
                found.insert(label.clone(), check_records(&rec));
            }
            let db = mnt.join("app.db");
            if db.exists() {
                assert_eq!(sqlite(&db, "PRAGMA integrity_check"), "ok", "SQLite integrity_check of the backup");
                let r = sqlite(&db, "SELECT coalesce(max(n),0) || ' ' || count(*) FROM records");
                let (max, count) = r.split_once(' ').unwrap();
                let (max, count): (u64, u64) = (max.parse().unwrap(), count.parse().unwrap());
                assert_eq!(max, count, "records 1..{max} without a hole");
                found.insert("sqlite".into(), max);
            }
        }
    }
    for (w, n) in &before {
        let got = found.get(w).copied().unwrap_or_else(|| panic!("writer {w} has nothing in the backup: {found:?}"));
        assert!(got >= *n, "writer {w}: record {n} was acked before the backup, the backup ends at {got}");
    }
    eprintln!("[test] acked before: {before:?}; in the backup: {found:?}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn incremental_copies_about_the_changed_bytes_and_restores_like_a_full() {
    require_vm!();
    let vm = TestVm::boot("incr", VmOpts { writers: false, ..Default::default() });
    let full1 = vm.vmctl_json(&["backup", "incr"], 0);
    assert_eq!(full1["kind"], "full");

    // A known change: 8 MiB of new data on e3 (disk data2).
    vm.sh("dd if=/dev/urandom of=/data/e3/blob bs=1M count=8 2>/dev/null && sync");
    // Pause the guest so that the incremental and a new full see the same disk, byte for byte.
    vm.qmp().execute("stop", None).unwrap();
    let inc = vm.vmctl_json(&["backup", "incr", "--incremental", "--quiesce", "off"], 0);
    let full2 = vm.vmctl_json(&["backup", "incr", "--quiesce", "off"], 0);
    vm.qmp().execute("cont", None).unwrap();

    assert_eq!(inc["kind"], "incremental");
    assert_eq!(inc["chain"], json!([full1["id"], inc["id"]]));
    assert_eq!(inc["consistency"], "crash", "--quiesce off");
    let copied = inc["copied_bytes"].as_u64().unwrap();
    assert!(
        (8 * MIB..=8 * MIB + 8 * MIB).contains(&copied),
        "the incremental copied {copied} bytes for 8 MiB of changes"
    );
    let inc_dir = backup_dir(&inc);
    let size = |d: &Path, f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    assert!(size(&inc_dir, "data2.qcow2") >= 8 * MIB && size(&inc_dir, "data2.qcow2") < 20 * MIB, "data2 increment");
    assert!(size(&inc_dir, "data.qcow2") < 8 * MIB, "data barely changed");
    eprintln!("[test] incremental copied {copied} bytes; full copied {}", full2["copied_bytes"]);

    // The chain restores to exactly what a full backup of the same moment holds.
    let a = vm.work().join("restored-inc");
    let b = vm.work().join("restored-full");
    vm.vmctl(&["backup".as_ref(), "restore".as_ref(), inc_dir.as_os_str(), "--to".as_ref(), a.as_os_str()])
        .expect_code(0, "restore inc");
    vm.vmctl(&["backup".as_ref(), "restore".as_ref(), backup_dir(&full2).as_os_str(), "--to".as_ref(), b.as_os_str()])
        .expect_code(0, "restore full");
    for disk in ["data.qcow2", "data2.qcow2"] {
        let out = run_unchecked("qemu-img", &["compare".as_ref(), a.join(disk).as_os_str(), b.join(disk).as_os_str()]);
        assert_eq!(out.code, Some(0), "restored {disk} differs: {}{}", out.stdout, out.stderr);
        let info = run("qemu-img", &["info".as_ref(), a.join(disk).as_os_str()]);
        assert!(!info.contains("backing file"), "a restored disk stands alone: {info}");
    }
    let v = vm.vmctl_json(&["backup".as_ref(), "verify".as_ref(), inc_dir.as_os_str()], 0);
    assert_eq!(v["ok"], true, "{v}");

    // The chain goes on from the newest backup: a second incremental after the new full.
    vm.sh("dd if=/dev/urandom of=/data/db/blob bs=1M count=2 2>/dev/null && sync");
    let inc2 = vm.vmctl_json(&["backup", "incr", "--incremental"], 0);
    assert_eq!(inc2["chain"], json!([full2["id"], inc2["id"]]));
    assert_eq!(inc2["consistency"], "filesystem");
}

/// The name of the node QEMU reads disk `name` (`vd-NAME`) through.
fn top_node(vm: &TestVm, name: &str) -> String {
    let blocks = vm.qmp().execute("query-block", None).unwrap();
    let b = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"].as_str().unwrap_or("").contains(&format!("/vd-{name}/")))
        .unwrap_or_else(|| panic!("no device vd-{name}: {blocks}"));
    b["inserted"]["node-name"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn incremental_after_a_checkpoint_copies_what_changed_on_both_sides_of_it() {
    require_vm!();
    let vm = TestVm::boot("ckincr", VmOpts { writers: false, ..Default::default() });
    // With -v: each step on stderr, with its time; stdout stays JSON.
    let out = vm.vmctl(&["-v", "backup", "ckincr", "--json"]);
    out.expect_code(0, "vmctl -v backup");
    let full1: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(full1["kind"], "full");
    let mut last = -1.0;
    for step in [
        "full backup of",
        "QMP connected",
        "agent answered",
        "target images:",
        "freeze: vssd-freeze",
        "frozen:",
        "transaction done",
        "copy:",
        "copied",
        "fsync and checksum",
        "manifest written",
        "done in",
    ] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(&format!("INFO {step}")))
            .unwrap_or_else(|| panic!("no `{step}` in:\n{}", out.stderr));
        let ms: f64 = line
            .split('+')
            .nth(1)
            .and_then(|r| r.split("ms").next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no elapsed time in `{line}`"));
        if step != "agent answered" {
            // The agent thread runs alongside the preparation; every other step comes in order.
            assert!(ms >= last, "`{step}` at {ms} ms comes before the step before it ({last} ms):\n{}", out.stderr);
            last = ms;
        }
    }

    // 4 MiB before the checkpoint (their bitmap bits are on the image that becomes the
    // checkpoint's), then 2 + 8 MiB after it (on the new overlays).
    vm.sh("dd if=/dev/urandom of=/data/db/before bs=1M count=4 2>/dev/null && sync");
    let node_before = top_node(&vm, "data");
    vm.vmctl_json(&["checkpoint", "create", "ckincr", "--name", "c1"], 0);
    let node_after = top_node(&vm, "data");
    assert_ne!(node_before, node_after, "the checkpoint put a new node on top");
    vm.sh("dd if=/dev/urandom of=/data/db/after bs=1M count=2 2>/dev/null && dd if=/dev/urandom of=/data/e3/after bs=1M count=8 2>/dev/null && sync");

    // Paused, so that the incremental and a new full see the same disks, byte for byte.
    vm.qmp().execute("stop", None).unwrap();
    let inc = vm.vmctl_json(&["backup", "ckincr", "--incremental", "--quiesce", "off"], 0);
    let full2 = vm.vmctl_json(&["backup", "ckincr", "--quiesce", "off"], 0);
    vm.qmp().execute("cont", None).unwrap();

    assert_eq!(inc["kind"], "incremental", "{inc}");
    assert_eq!(inc["chain"], json!([full1["id"], inc["id"]]));
    let inc_dir = backup_dir(&inc);
    let m = hostsim::backup::Manifest::load(&inc_dir).unwrap();
    let names: Vec<&str> = m.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["data", "data2"], "disks keep the names of the VM's config");
    assert_eq!(m.disks[0].source.node, node_after, "the job read the checkpoint's overlay");
    let copied = |disk: &str| m.disks.iter().find(|d| d.name == disk).unwrap().copied_bytes;
    eprintln!("[test] after the checkpoint: data {} bytes, data2 {} bytes copied", copied("data"), copied("data2"));
    assert!(
        (6 * MIB..=6 * MIB + 6 * MIB).contains(&copied("data")),
        "data: 4 MiB before + 2 MiB after the checkpoint, copied {}",
        copied("data")
    );
    assert!(
        (8 * MIB..=8 * MIB + 6 * MIB).contains(&copied("data2")),
        "data2: 8 MiB after the checkpoint, copied {}",
        copied("data2")
    );

    // The chain restores to exactly what a full backup of the same moment holds.
    let a = vm.work().join("restored-inc");
    let b = vm.work().join("restored-full");
    vm.vmctl(&["backup".as_ref(), "restore".as_ref(), inc_dir.as_os_str(), "--to".as_ref(), a.as_os_str()])
        .expect_code(0, "restore inc");
    vm.vmctl(&["backup".as_ref(), "restore".as_ref(), backup_dir(&full2).as_os_str(), "--to".as_ref(), b.as_os_str()])
        .expect_code(0, "restore full");
    for disk in ["data.qcow2", "data2.qcow2"] {
        let out = run_unchecked("qemu-img", &["compare".as_ref(), a.join(disk).as_os_str(), b.join(disk).as_os_str()]);
        assert_eq!(out.code, Some(0), "restored {disk} differs: {}{}", out.stdout, out.stderr);
    }

    // And the chain goes on from the newest backup, quiesced this time.
    vm.sh("dd if=/dev/urandom of=/data/e3/later bs=1M count=1 2>/dev/null && sync");
    let inc2 = vm.vmctl_json(&["backup", "ckincr", "--incremental"], 0);
    assert_eq!(inc2["chain"], json!([full2["id"], inc2["id"]]));
    assert_eq!(inc2["consistency"], "filesystem");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn agent_silent_or_missing_gives_crash_consistent_or_a_clear_refusal() {
    require_vm!();
    let vm = TestVm::boot("noagent", VmOpts { agent: "none", ..Default::default() });
    vm.wait_acks("e3", 10, Duration::from_secs(30));

    // Silent (the port exists, nobody answers), best-effort: a backup marked crash-consistent.
    let t = Instant::now();
    let v = vm.vmctl_json(&["backup", "noagent", "--agent-timeout", "2"], 0);
    assert_eq!(v["consistency"], "crash", "{v}");
    assert!(v["note"].as_str().unwrap_or("").contains("did not answer"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(60));
    let (ids, _) = listed(&vm, None);
    assert_eq!(ids.len(), 1);

    // Silent, required: exit 4, a message that names the fix, nothing that looks like a backup.
    let v = vm.vmctl_json(&["backup", "noagent", "--quiesce", "required", "--agent-timeout", "2"], 4);
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("--quiesce required") && err.contains("best-effort"), "{err}");
    assert_eq!(listed(&vm, None), (ids.clone(), 0));
    assert!(partial_backups(&vm.backups()).is_empty());

    // Missing (attach mode without --agent): the same two outcomes.
    let target = vm.work().join("attached");
    let qmp = vm.qmp_path();
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["--qmp".as_ref(), qmp.as_os_str(), "backup".as_ref(), "--target".as_ref(), target.as_os_str()];
    let v = vm.vmctl_json(&args, 0);
    assert_eq!(v["consistency"], "crash", "{v}");
    assert!(v["note"].as_str().unwrap().contains("no guest agent"), "{v}");
    args.extend([std::ffi::OsStr::new("--quiesce"), std::ffi::OsStr::new("required")]);
    let v = vm.vmctl_json(&args, 4);
    assert!(v["error"].as_str().unwrap().contains("no guest agent"), "{v}");
    assert_eq!(listed(&vm, Some(&target)).0.len(), 1, "only the best-effort backup");
    assert!(partial_backups(&target).is_empty());
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn qemu_killed_mid_backup_is_a_clear_error_and_leaves_no_backup() {
    require_vm!();
    let vm = TestVm::boot("killed", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    let mut child = vm.start_slow_backup();
    // Past the freeze window (it takes well under a second) and into the copy.
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the backup should still be copying at 1 MiB/s");
    vm.kill_qemu();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("QEMU exited"), "{v}");
    assert!(partial_backups(&vm.backups()).is_empty(), "the partial backup was removed");
    let (ids, debris) = listed(&vm, None);
    assert!(ids.is_empty() && debris == 0, "nothing claims to be a backup: {ids:?}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vmctl_killed_mid_backup_leaves_nothing_in_the_way_of_the_next() {
    require_vm!();
    let vm = TestVm::boot("vmctlkilled", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    let mut child = vm.start_slow_backup();
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the backup should still be copying at 1 MiB/s");
    child.kill().unwrap();
    child.wait().unwrap();
    {
        let mut q = vm.qmp();
        let jobs = q.execute("query-jobs", None).unwrap();
        assert!(!jobs.as_array().unwrap().is_empty(), "the dead vmctl's jobs are still in QEMU: {jobs}");
    }
    // The guest does not stay frozen: vmctl had thawed before copying.
    assert_eq!(vm.fsstatus(), "thawed");

    // The next backup cleans up after it and succeeds.
    let v = vm.vmctl_json(&["backup", "vmctlkilled"], 0);
    assert_ne!(v["consistency"], "crash", "{v}");
    assert!(partial_backups(&vm.backups()).is_empty(), "the dead vmctl's partial backup was removed");
    let (ids, debris) = listed(&vm, None);
    assert_eq!((ids.len(), debris), (1, 0), "{ids:?}");
    let jobs = vm.qmp().execute("query-jobs", None).unwrap();
    assert!(jobs.as_array().unwrap().is_empty(), "no job is left behind: {jobs}");
    let verify = vm.vmctl_json(&["backup", "verify", backup_dir(&v).to_str().unwrap()], 0);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_second_backup_of_the_same_vm_is_refused_while_one_runs() {
    require_vm!();
    let vm = TestVm::boot("twobackups", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    let mut child = vm.start_slow_backup();
    // Into another target: the first one's jobs must not be mistaken for a dead vmctl's.
    let other = vm.work().join("other-target");
    let out = vm.vmctl(&["backup", "twobackups", "--target", other.to_str().unwrap()]);
    out.expect_code(1, "a second backup of the same VM");
    assert!(out.stderr.contains("another backup of the VM"), "{out:?}");
    assert!(child.try_wait().unwrap().is_none(), "the first backup goes on");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_full_target_is_a_clear_error_with_the_guest_thawed_and_nothing_listed() {
    require_vm!();
    let vm = TestVm::boot("fulltarget", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    // Enough data that a full copy cannot fit in the 6 MiB target.
    vm.sh("dd if=/dev/urandom of=/data/e3/blob bs=1M count=12 2>/dev/null && sync");
    let small = vm.work().join("small");
    std::fs::create_dir_all(&small).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=6m", "tmpfs", small.to_str().unwrap()]);

    // Caught before the freeze: the estimate does not fit.
    let target = small.as_os_str();
    let v = vm.vmctl_json(&["backup".as_ref(), "fulltarget".as_ref(), "--target".as_ref(), target], 1);
    assert!(v["error"].as_str().unwrap().contains("not enough space"), "{v}");
    assert_eq!(vm.fsstatus(), "thawed");

    // Past the check: the copy runs out of space half way.
    let v = vm.vmctl_json(
        &["backup".as_ref(), "fulltarget".as_ref(), "--target".as_ref(), target, "--no-space-check".as_ref()],
        1,
    );
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("filled up") && err.contains("another --target"), "{err}");
    assert_eq!(vm.fsstatus(), "thawed");
    assert!(partial_backups(&small).is_empty(), "the partial backup was removed");
    assert_eq!(listed(&vm, Some(&small)), (vec![], 0));
    // The guest is fine: its writers go on.
    let now = vm.last_acks();
    for (w, n) in &now {
        vm.wait_acks(w, n + 3, Duration::from_secs(60));
    }
    assert!(!vm.acks().is_empty());
    let errs: Vec<String> = std::fs::read_to_string(vm.dir().join("port-org.vssd.acks.0.log"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("err"))
        .map(String::from)
        .collect();
    assert!(errs.is_empty(), "guest writers saw errors: {errs:?}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn one_flipped_byte_in_a_backed_up_image_fails_verify() {
    require_vm!();
    let vm = TestVm::boot("flipped", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    vm.sh("dd if=/dev/urandom of=/data/db/blob bs=1M count=8 2>/dev/null && sync");
    let v = vm.vmctl_json(&["backup", "flipped"], 0);
    let dir = backup_dir(&v);
    let verify = vm.vmctl_json(&["backup".as_ref(), "verify".as_ref(), "--no-fsck".as_ref(), dir.as_os_str()], 0);
    assert_eq!(verify["ok"], true, "the backup as taken verifies: {verify}");

    // A byte in the middle of the largest data extent of data.qcow2 (the guest's random
    // data): the image stays a valid qcow2, only the checksum can tell.
    let img = dir.join("data.qcow2");
    let map: Value = serde_json::from_str(&run(
        "qemu-img",
        &["map".as_ref(), "--output=json".as_ref(), "-f".as_ref(), "qcow2".as_ref(), img.as_os_str()],
    ))
    .unwrap();
    let extent = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["offset"].is_u64())
        .max_by_key(|e| e["length"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("data.qcow2 has data: {map}"));
    let at = extent["offset"].as_u64().unwrap() + extent["length"].as_u64().unwrap() / 2;
    let flip = |img: &Path| {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x80]).unwrap();
    };
    flip(&img);
    let verify = vm.vmctl_json(&["backup".as_ref(), "verify".as_ref(), "--no-fsck".as_ref(), dir.as_os_str()], 5);
    assert_eq!(verify["ok"], false, "a flipped byte at {at} fails verify: {verify}");
    let failed: Vec<&str> = verify["verify"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["what"].as_str().unwrap())
        .collect();
    assert_eq!(failed, [format!("checksum {}/data.qcow2", v["id"].as_str().unwrap())], "{verify}");

    // Flipped back, it verifies again: the checksum is the image's, byte for byte.
    flip(&img);
    let verify = vm.vmctl_json(&["backup".as_ref(), "verify".as_ref(), "--no-fsck".as_ref(), dir.as_os_str()], 0);
    assert_eq!(verify["ok"], true, "{verify}");
}
