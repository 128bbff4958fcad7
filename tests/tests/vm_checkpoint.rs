//! VM tier: full-VM checkpoints (`vmctl checkpoint`, `start --checkpoint`, `suspend`, `resume`)
//! of a real guest. Needs root and QEMU; builds the guest image on first use.
//!
//! The guest's memory is watched through a counter: a busybox shell loop that keeps its count
//! in a shell variable (process memory) and shows it in /run/count (tmpfs, also memory). A
//! restored guest must go on counting from the value it had at the checkpoint, not from where
//! the live guest got to afterwards, nor from zero.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::vm::{TestVm, VmOpts};
use tests::*;

fn opts() -> VmOpts {
    // No writers: the counter is the probe, and a quiet guest keeps the two cores for QEMU.
    VmOpts { writers: false, ..Default::default() }
}

fn start_counter(vm: &TestVm) {
    vm.sh("sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 &");
    wait_count(vm, 5);
}

fn count(vm: &TestVm) -> u64 {
    // The loop truncates and rewrites the file: a read may fall in between.
    for _ in 0..20 {
        if let Ok(n) = vm.sh("cat /run/count").trim().parse() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("/run/count never held a number: {:?}", vm.sh("cat /run/count"));
}

fn wait_count(vm: &TestVm, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = vm.shell("cat /run/count 2>/dev/null", Duration::from_secs(30)).1.trim().parse().unwrap_or(0);
        if c >= n {
            return c;
        }
        assert!(Instant::now() < deadline, "the guest's counter did not reach {n} (at {c})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A restored guest counts on: two reads a moment apart, the second higher.
fn assert_counting(vm: &TestVm) -> u64 {
    let a = count(vm);
    std::thread::sleep(Duration::from_millis(700));
    let b = count(vm);
    assert!(b > a, "the restored guest does not count: {a} then {b}");
    a
}

fn checkpoints(vm: &TestVm) -> (Vec<Value>, Vec<Value>) {
    let v = vm.vmctl_json(&["checkpoint", "list", &vm.name], 0);
    (v["checkpoints"].as_array().cloned().unwrap_or_default(), v["incomplete"].as_array().cloned().unwrap_or_default())
}

fn names(list: &[Value]) -> Vec<String> {
    list.iter().map(|c| c["name"].as_str().unwrap_or("").to_string()).collect()
}

fn restore(vm: &TestVm, name: &str) -> Value {
    vm.kill_qemu();
    let v = vm.vmctl_json(&["start", &vm.name, "--checkpoint", name], 0);
    assert_eq!(v["run-state"], "running", "{v}");
    v
}

/// What the guest sees: its memory mark, and its disk mark read from the disk itself.
fn marks(vm: &TestVm) -> (String, String) {
    let mem = vm.sh("cat /run/mark").trim().to_string();
    let disk = vm.sh("echo 3 > /proc/sys/vm/drop_caches; cat /data/e3/marker").trim().to_string();
    (mem, disk)
}

fn state_file(vm: &TestVm, name: &str) -> PathBuf {
    vm.dir().join("checkpoints").join(name).join("state.bin")
}

/// QEMU processes started for this test's VM (others may run for other tests meanwhile).
fn qemus_of(vm: &TestVm) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "qemu-system"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let dir = vm.dir().display().to_string();
    out.unwrap_or_default().lines().filter(|l| l.contains(&dir)).map(String::from).collect()
}

fn flip_byte(p: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_restored_guest_counts_on_from_where_it_was_saved() {
    require_vm!();
    let vm = TestVm::boot("ckcount", opts());
    start_counter(&vm);
    let before = wait_count(&vm, 20);
    let v = vm.vmctl_json(&["checkpoint", "create", "ckcount", "--name", "c1"], 0);
    let after = count(&vm);
    eprintln!("[ck] create: {}", v["timings"]);
    assert!(v["timings"]["downtime-ms"].as_f64().unwrap() > 0.0, "{v}");
    // The live guest goes on well past the checkpoint.
    let late = wait_count(&vm, after + 40);

    let r = restore(&vm, "c1");
    eprintln!("[ck] restore: {}", r["timings"]);
    let c = assert_counting(&vm);
    assert!(
        c >= before,
        "the restored count {c} is below the count before the checkpoint ({before}): memory was not restored"
    );
    assert!(c < late, "the restored count {c} is not below the live guest's later count {late}: it did not go back");
    assert!(vm.pid().is_some());

    // The same with --live: RAM saved while the guest runs, stopped only for the last pass.
    let before = count(&vm);
    let v = vm.vmctl_json(&["checkpoint", "create", "ckcount", "--name", "c2", "--live"], 0);
    let after = count(&vm);
    eprintln!("[ck] create --live: {}", v["timings"]);
    let late = wait_count(&vm, after + 40);
    restore(&vm, "c2");
    let c = assert_counting(&vm);
    assert!(
        c >= before && c < late,
        "after a live checkpoint: restored count {c}, saved between {before} and {after}, later {late}"
    );
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn two_checkpoints_restore_in_either_order_with_their_own_memory_and_disks() {
    require_vm!();
    let vm = TestVm::boot("cktwo", opts());
    start_counter(&vm);
    vm.sh("echo A > /run/mark; echo diskA > /data/e3/marker; sync");
    let a0 = count(&vm);
    vm.vmctl_json(&["checkpoint", "create", "cktwo", "--name", "A"], 0);
    let a1 = count(&vm);
    wait_count(&vm, a1 + 20);
    vm.sh("echo B > /run/mark; echo diskB > /data/e3/marker; sync");
    let b0 = count(&vm);
    vm.vmctl_json(&["checkpoint", "create", "cktwo", "--name", "B"], 0);
    let b1 = count(&vm);
    wait_count(&vm, b1 + 20);
    vm.sh("echo C > /run/mark; echo diskC > /data/e3/marker; sync");
    assert_eq!(names(&checkpoints(&vm).0), ["A", "B"]);

    for (name, lo, hi) in [("B", b0, b1), ("A", a0, a1), ("B", b0, b1), ("A", a0, a1)] {
        restore(&vm, name);
        let c = assert_counting(&vm);
        assert!(c >= lo && c < hi + 20, "after restoring {name}: count {c}, saved between {lo} and {hi}");
        let (mem, disk) = marks(&vm);
        assert_eq!(mem, name, "memory of checkpoint {name}");
        assert_eq!(disk, format!("disk{name}"), "disk of checkpoint {name} (read from the disk, caches dropped)");
        // The restored guest writes on; that must not leak into either checkpoint.
        vm.sh("echo X > /data/e3/marker; sync");
    }
    // Restores made overlays and removed the ones nothing needs; the checkpoints are intact.
    assert_eq!(names(&checkpoints(&vm).0), ["A", "B"]);
    let overlays = std::fs::read_dir(vm.dir().join("overlays")).unwrap().count();
    assert!(overlays <= 6, "unreferenced overlays pile up: {overlays}");

    // Prune: keep the newest; B still restores after A went, and A's overlays went with it.
    let p = vm.vmctl_json(&["checkpoint", "prune", "cktwo", "--keep-last", "1", "--dry-run"], 0);
    assert_eq!((p["kept"].clone(), p["deleted"].clone()), (serde_json::json!(["B"]), serde_json::json!(["A"])), "{p}");
    assert_eq!(names(&checkpoints(&vm).0), ["A", "B"], "a dry run deletes nothing");
    let p = vm.vmctl_json(&["checkpoint", "prune", "cktwo", "--keep-last", "1"], 0);
    assert_eq!(p["deleted"], serde_json::json!(["A"]), "{p}");
    assert_eq!(names(&checkpoints(&vm).0), ["B"]);
    restore(&vm, "B");
    assert_counting(&vm);
    assert_eq!(marks(&vm), ("B".to_string(), "diskB".to_string()), "B is whole after A was pruned");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn poweroff_leaves_the_vm_stopped_and_the_checkpoint_complete() {
    require_vm!();
    let vm = TestVm::boot("ckoff", opts());
    start_counter(&vm);
    let before = wait_count(&vm, 20);
    let v = vm.vmctl_json(&["checkpoint", "create", "ckoff", "--name", "off", "--poweroff"], 0);
    assert_eq!(v["poweroff"], true, "{v}");
    assert!(vm.pid().is_none(), "QEMU still runs after --poweroff");
    let st = vm.vmctl_json(&["status", "ckoff"], 0);
    assert_eq!(st["status"]["state"], "stopped", "{st}");

    let (good, incomplete) = checkpoints(&vm);
    assert_eq!(names(&good), ["off"]);
    assert_eq!(good[0]["poweroff"], true);
    assert!(incomplete.is_empty(), "{incomplete:?}");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(vm.dir().join("checkpoints/off/manifest.json")).unwrap()).unwrap();
    assert_eq!(std::fs::metadata(state_file(&vm, "off")).unwrap().len(), manifest["state"]["size"].as_u64().unwrap());

    restore(&vm, "off");
    let c = assert_counting(&vm);
    assert!(c >= before && c < before + 40, "count {c}, saved at {before}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn qemu_killed_mid_create_leaves_no_good_checkpoint() {
    require_vm!();
    let vm = TestVm::boot("ckkill", opts());
    // A slow stream (2 MiB/s) so that QEMU can be killed while it is being written.
    let mut child = Command::new(bin("vmctl"))
        .env("VMCTL_STATE_DIR", vm.state_dir())
        .args(["checkpoint", "create", "ckkill", "--name", "doomed", "--bandwidth", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cdir = vm.dir().join("checkpoints");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        let tmp = std::fs::read_dir(&cdir)
            .ok()
            .and_then(|rd| rd.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().contains(".tmp-doomed")));
        if let Some(t) = tmp {
            if std::fs::metadata(t.join("state.bin")).map(|m| m.len() > 1 << 20).unwrap_or(false) {
                break t;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the create never got going: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    vm.kill_qemu();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "create succeeded although QEMU was killed");
    assert!(stderr.contains("QEMU exited"), "{stderr}");
    assert!(!partial.exists(), "the partial checkpoint {} is left behind", partial.display());
    let (good, incomplete) = checkpoints(&vm);
    assert!(good.is_empty(), "{good:?}");
    assert!(incomplete.is_empty(), "{incomplete:?}");
    let r = vm.vmctl(&["start", "ckkill", "--checkpoint", "doomed"]);
    r.expect_code(2, "restore of a checkpoint that never was");
    assert!(r.stderr.contains("no checkpoint `doomed`"), "{}", r.stderr);
    assert!(vm.pid().is_none());
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_flipped_byte_makes_restore_refuse_and_name_the_file() {
    require_vm!();
    let vm = TestVm::boot("ckflip", opts());
    start_counter(&vm);
    vm.vmctl_json(&["checkpoint", "create", "ckflip", "--name", "c1"], 0);
    vm.kill_qemu();
    let state = state_file(&vm, "c1");
    let size = std::fs::metadata(&state).unwrap().len();
    let config = std::fs::read(vm.dir().join("vm.toml")).unwrap();
    let overlays = std::fs::read_dir(vm.dir().join("overlays")).unwrap().count();

    // In the RAM part (QEMU would load it without complaint) and in the header (QEMU stops
    // reading at once): either way the checksum names the file and nothing starts.
    for at in [size / 2, 3] {
        flip_byte(&state, at);
        let r = vm.vmctl(&["start", "ckflip", "--checkpoint", "c1"]);
        r.expect_code(5, "restore of a corrupt checkpoint");
        assert!(r.stderr.contains(&state.display().to_string()) && r.stderr.contains("corrupt"), "{}", r.stderr);
        assert!(vm.pid().is_none(), "a QEMU runs after a refused restore");
        assert!(qemus_of(&vm).is_empty(), "{:?}", qemus_of(&vm));
        assert_eq!(std::fs::read(vm.dir().join("vm.toml")).unwrap(), config, "a refused restore changed vm.toml");
        assert_eq!(
            std::fs::read_dir(vm.dir().join("overlays")).unwrap().count(),
            overlays,
            "a refused restore left overlays"
        );
        flip_byte(&state, at);
    }
    // A truncated file is refused before QEMU starts.
    let last = *std::fs::read(&state).unwrap().last().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&state).unwrap();
    f.set_len(size - 1).unwrap();
    let r = vm.vmctl(&["start", "ckflip", "--checkpoint", "c1"]);
    r.expect_code(5, "restore of a truncated checkpoint");
    assert!(r.stderr.contains("truncated") && r.stderr.contains("state.bin"), "{}", r.stderr);
    drop(f);
    // The refusals disturbed nothing: with the file whole again the checkpoint restores.
    let mut f = std::fs::OpenOptions::new().append(true).open(&state).unwrap();
    std::io::Write::write_all(&mut f, &[last]).unwrap();
    drop(f);
    restore(&vm, "c1");
    assert_counting(&vm);
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn suspend_then_resume_continues_the_guest() {
    require_vm!();
    let vm = TestVm::boot("cksusp", opts());
    start_counter(&vm);
    let before = wait_count(&vm, 20);
    let v = vm.vmctl_json(&["suspend", "cksusp"], 0);
    assert_eq!(v["kind"], "suspend", "{v}");
    assert!(vm.pid().is_none(), "QEMU still runs after suspend");
    assert_eq!(names(&checkpoints(&vm).0), ["suspend"]);

    let r = vm.vmctl_json(&["resume", "cksusp"], 0);
    assert_eq!(r["run-state"], "running", "{r}");
    let c = assert_counting(&vm);
    assert!(c >= before && c < before + 40, "count {c}, suspended at {before}");
    assert!(names(&checkpoints(&vm).0).is_empty(), "resume keeps the suspend checkpoint");

    // pause / unpause: the count stands still while paused.
    vm.vmctl_json(&["pause", "cksusp"], 0);
    let v = vm.vmctl_json(&["status", "cksusp"], 0);
    assert_eq!(v["status"]["state"], "paused", "{v}");
    vm.vmctl_json(&["unpause", "cksusp"], 0);
    assert_counting(&vm);

    let r = vm.vmctl(&["resume", "cksusp"]);
    r.expect_code(2, "resume of a VM that is not suspended");
    assert!(r.stderr.contains("not suspended"), "{}", r.stderr);

    // A plain `vmctl start` of a suspended VM resumes it, as a laptop opens where it was.
    let before = wait_count(&vm, 1);
    vm.vmctl_json(&["suspend", "cksusp"], 0);
    let v = vm.vmctl_json(&["status", "cksusp"], 0);
    assert_eq!(v["status"]["state"], "suspended", "{v}");
    let r = vm.vmctl_json(&["start", "cksusp"], 0);
    assert_eq!(r["run-state"], "running", "start resumed: {r}");
    let c = assert_counting(&vm);
    assert!(c >= before, "count {c}, suspended at {before}: the guest went on, it did not boot afresh");
    assert!(names(&checkpoints(&vm).0).is_empty());

    // --force-boot boots afresh and discards the saved state.
    vm.vmctl_json(&["suspend", "cksusp"], 0);
    vm.vmctl_json(&["start", "cksusp", "--force-boot"], 0);
    vm.wait_ready(Duration::from_secs(90));
    let (code, out) = vm.shell("cat /run/count", Duration::from_secs(30));
    assert_ne!(code, 0, "a fresh boot has no counter file: {out}");
    assert!(names(&checkpoints(&vm).0).is_empty(), "the suspend checkpoint was discarded");
    let v = vm.vmctl_json(&["status", "cksusp"], 0);
    assert_eq!(v["status"]["state"], "running", "{v}");
}
