//! VM tier: what vmctl leaves on the host (file modes, whatever the user's umask) and the
//! backup soak (backups in a row with the guest's writers running, each one verified), and
//! vmctl SIGKILLed at each step of a backup (halted there by the test-only
//! `VMCTL_TEST_FAULT=halt-at-STEP`). The other host-side fault cells that need a VM (QEMU
//! killed during a backup or a checkpoint, vmctl killed during its copy, a full target) are in
//! `vm_backup.rs` and `vm_checkpoint.rs`; the README's "Faults and hostile input" table lists
//! them with these.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::stat::{umask, Mode};
use tests::vm::{partial_backups, TestVm, VmOpts};
use tests::*;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

/// Every file and directory under `dir` whose mode lets others (not the owner, not its group)
/// in. (QEMU sets its own umask, 027, once it daemonizes: what it creates later, such as the
/// channel sockets, the console log and checkpoint overlays, is owner+group.)
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        if md.file_type().is_symlink() {
            continue;
        }
        if md.permissions().mode() & 0o007 != 0 {
            out.push(format!("{} {:o}", p.display(), md.permissions().mode() & 0o777));
        }
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    out.sort();
    out
}

/// Sets the process umask for the test's vmctl runs (they inherit it); put back on drop.
struct Umask(Mode);

impl Umask {
    fn set(mask: u32) -> Umask {
        Umask(umask(Mode::from_bits_truncate(mask)))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        umask(self.0);
    }
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn backups_checkpoints_state_and_sockets_are_owner_only_under_umask_000_and_022_and_exposure_is_warned() {
    require_vm!();
    let mut guard = Umask::set(0o000);
    let vm = TestVm::boot("modes", VmOpts { writers: false, ..VmOpts::default() });
    let mut kinds_seen = std::collections::BTreeSet::new();
    for (round, mask) in [0o000u32, 0o022].into_iter().enumerate() {
        drop(guard);
        guard = Umask::set(mask);
        if round > 0 {
            // QEMU's own files (QMP and channel sockets, pid file, logs) again, under this umask.
            vm.kill_qemu();
            vm.vmctl(&["start", &vm.name]).expect_code(0, "vmctl start");
            vm.wait_ready(Duration::from_secs(90));
        }
        let b = vm.vmctl_json(&["backup", vm.name.as_str(), "--verify"], 0);
        assert_eq!(b["verify"]["ok"], true, "umask {mask:03o}: {b}");
        let bdir = PathBuf::from(b["dir"].as_str().unwrap());
        let ck = format!("c{round}");
        vm.vmctl_json(&["checkpoint", "create", &vm.name, "--name", &ck], 0);
        let state = vm.state_dir();
        let wrong = open_to_others(&state);
        assert!(wrong.is_empty(), "umask {mask:03o}: other users can reach:\n{}", wrong.join("\n"));
        // The kinds of file users worry about, named so that a missing one is noticed.
        for (kind, p) in [
            ("backup disk", bdir.join("data.qcow2")),
            ("backup directory", bdir.clone()),
            ("backup manifest", bdir.join("manifest.json")),
            ("backup target", vm.backups()),
            ("checkpoint RAM", vm.dir().join("checkpoints").join(&ck).join("state.bin")),
            ("checkpoints directory", vm.dir().join("checkpoints")),
            ("VM directory", vm.dir()),
            ("state directory", state.clone()),
            ("QMP socket (QEMU's umask 027)", vm.qmp_path()),
            ("agent socket (QEMU's umask 027)", vm.agent_path()),
        ] {
            assert!(p.exists(), "umask {mask:03o}: no {kind} at {}", p.display());
            let allowed = if kind.contains("QEMU's umask") { 0o750 } else { 0o700 };
            assert_eq!(mode(&p) & !allowed, 0, "umask {mask:03o}: {kind} {} is {:o}", p.display(), mode(&p));
            kinds_seen.insert(kind);
        }
        let listed = vm.vmctl_json(&["checkpoint", "list", &vm.name], 0);
        assert_eq!(listed["warnings"], json!([]), "{listed}");
        let verified = vm.vmctl_json(&["backup", "verify", bdir.to_str().unwrap()], 0);
        assert_eq!(verified["verify"]["warnings"], json!([]), "{verified}");
    }
    drop(guard);
    assert_eq!(kinds_seen.len(), 10);
    // A backup or checkpoint someone made readable is warned about (and still verifies).
    let bdir = std::fs::read_dir(vm.backups())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("data.qcow2").exists())
        .unwrap();
    std::fs::set_permissions(bdir.join("data.qcow2"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let v = vm.vmctl_json(&["backup", "verify", bdir.to_str().unwrap()], 0);
    let w = v["verify"]["warnings"].to_string();
    assert!(w.contains("data.qcow2") && w.contains("other users"), "{v}");
    let text = vm.vmctl(&["backup", "verify", bdir.to_str().unwrap()]);
    assert!(text.stdout.contains("warning:"), "the human output warns too: {}", text.stdout);
    let ram = vm.dir().join("checkpoints/c0/state.bin");
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o644)).unwrap();
    let l = vm.vmctl_json(&["checkpoint", "list", &vm.name], 0);
    assert!(l["warnings"].to_string().contains("state.bin"), "{l}");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn backups_in_a_row_with_writers_running_all_verify_and_leave_the_guest_thawed() {
    require_vm!();
    let n: usize = std::env::var("VM_SOAK_BACKUPS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let vm = TestVm::boot("soak", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(60));
    let (mut windows, mut took) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t0 = Instant::now();
        let mut args = vec!["backup", vm.name.as_str(), "--verify"];
        if i > 0 {
            args.push("--incremental");
        }
        let v = vm.vmctl_json(&args, 0);
        took.push(t0.elapsed().as_secs_f64());
        assert_eq!(v["verify"]["ok"], true, "backup {i}: {v}");
        assert_eq!(v["frozen"], 4, "backup {i}: {v}");
        windows.push(v["freeze_window_ms"].as_f64().unwrap());
        assert_eq!(vm.fsstatus(), "thawed", "backup {i}");
        // The writers go on after every backup.
        let acks = vm.last_acks();
        vm.wait_acks("e3", acks["e3"] + 2, Duration::from_secs(30));
    }
    let listed = vm.vmctl_json(&["backup", "list", &vm.name], 0);
    assert_eq!(listed["backups"].as_array().unwrap().len(), n, "every backup listed: {listed}");
    let mut w = windows.clone();
    w.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "[soak] {n} backups: freeze window p50 {:.0} ms, max {:.0} ms; backup + verify {:.1}-{:.1} s",
        w[w.len() / 2],
        w[w.len() - 1],
        took.iter().copied().fold(f64::MAX, f64::min),
        took.iter().copied().fold(0.0, f64::max)
    );
}

/// Starts `vmctl backup` with `VMCTL_TEST_FAULT=halt-at-STEP` and returns it once it says it
/// halted there (it then waits for good, holding its QMP and agent connections).
fn backup_halted_at(vm: &TestVm, step: &str) -> std::process::Child {
    halted_at(vm, step, &["backup", vm.name.as_str(), "--freeze-deadline", "60", "--json"])
}

/// `vmctl ARGS` started with `VMCTL_TEST_FAULT=halt-at-STEP`, returned once it says it halted.
fn halted_at(vm: &TestVm, step: &str, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(bin("vmctl"))
        .env("VMCTL_STATE_DIR", vm.state_dir())
        .env("VMCTL_TEST_FAULT", format!("halt-at-{step}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.contains(&format!("halted at {step}")) => return child,
            Ok(l) => seen.push_str(&(l + "\n")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmctl never halted at `{step}`:\n{seen}");
            }
        }
    }
}

fn listed_backups(vm: &TestVm) -> (usize, usize) {
    let v = vm.vmctl_json(&["backup", "list", &vm.name], 0);
    (v["backups"].as_array().unwrap().len(), v["incomplete"].as_array().map(|a| a.len()).unwrap_or(0))
}

fn e3_acks(vm: &TestVm) -> u64 {
    vm.last_acks().get("e3").copied().unwrap_or(0)
}

/// vmctl SIGKILLed at each step of a backup, one VM for all the cells. Expected after each:
/// a guest frozen at the kill (after the freeze, before or after the QMP transaction) is
/// thawed by vssd once the host side of the agent's port has been closed for its
/// channel-drop grace (10 s), well before the 60 s freeze deadline vmctl asked for (the bound
/// asserted: 25 s from the kill to the writers' next records); a guest not frozen at the kill
/// never stops; nothing new is listed as a backup and the dead one's partial directory does
/// not verify; the next `vmctl backup --verify` works, verifies, is quiesced, and leaves no
/// debris and no job in QEMU.
#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vmctl_killed_at_each_step_of_a_backup_leaves_the_guest_thawed_and_the_next_backup_good() {
    require_vm!();
    let vm = TestVm::boot("vmctlsteps", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(60));
    let mut good = 0;
    let mut figures = Vec::new();
    for step in ["targets", "frozen", "transaction", "finish"] {
        let frozen_at_kill = matches!(step, "frozen" | "transaction");
        eprintln!("[vmctl killed] `{step}`: starting the backup");
        let mut child = backup_halted_at(&vm, step);
        eprintln!("[vmctl killed] `{step}`: halted");
        // The cell is the one named: the guest's writers stop exactly when it is frozen.
        std::thread::sleep(Duration::from_secs(1));
        let a0 = e3_acks(&vm);
        std::thread::sleep(Duration::from_secs(2));
        let a1 = e3_acks(&vm);
        if frozen_at_kill {
            assert_eq!(a1, a0, "`{step}`: the guest should be frozen while vmctl is halted there");
        } else {
            assert!(a1 > a0, "`{step}`: the guest should not be frozen at this step ({a0} -> {a1} acks)");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let t_kill = Instant::now();
        vm.wait_acks("e3", a1 + 3, Duration::from_secs(90));
        let thawed_after = t_kill.elapsed().as_secs_f64();
        if frozen_at_kill {
            assert!(
                thawed_after < 25.0,
                "`{step}`: the guest thawed {thawed_after:.1} s after the kill; the channel-drop grace is 10 s"
            );
        }
        eprintln!("[vmctl killed] `{step}`: writers on {thawed_after:.1} s after the kill");
        figures.push(format!("{step}: writers on after {thawed_after:.1} s"));
        assert_eq!(vm.fsstatus(), "thawed", "`{step}`");
        let (ids, _) = listed_backups(&vm);
        assert_eq!(ids, good, "`{step}`: the killed backup is not listed as one");
        for p in partial_backups(&vm.backups()) {
            let out = vm.vmctl(&["backup", "verify", vm.backups().join(&p).to_str().unwrap()]);
            assert_ne!(out.code, Some(0), "`{step}`: the dead backup's {p} verified:\n{}{}", out.stdout, out.stderr);
        }
        let v = vm.vmctl_json(&["backup", vm.name.as_str(), "--verify"], 0);
        assert_eq!(v["verify"]["ok"], true, "after `{step}`: {v}");
        assert_ne!(v["consistency"], "crash", "after `{step}`: {v}");
        assert_eq!(v["frozen"], 4, "after `{step}`: {v}");
        good += 1;
        assert_eq!(listed_backups(&vm), (good, 0), "after `{step}`: the good ones, no debris");
        assert!(partial_backups(&vm.backups()).is_empty(), "after `{step}`");
        let jobs = vm.qmp().execute("query-jobs", None).unwrap();
        assert!(jobs.as_array().unwrap().is_empty(), "after `{step}`: no job left behind: {jobs}");
        let writes_on = e3_acks(&vm);
        vm.wait_acks("e3", writes_on + 2, Duration::from_secs(30));
    }
    eprintln!("[vmctl killed] {}", figures.join("; "));
}

fn run_state(vm: &TestVm) -> String {
    vm.qmp().execute("query-status", None).unwrap()["status"].as_str().unwrap_or("?").to_string()
}

/// vmctl SIGKILLed inside `checkpoint create`: after the freeze (VM still running), and after
/// the VM's state was saved (VM stopped by the create, guest frozen). QEMU never resumes by
/// itself and a stopped guest's vssd cannot thaw itself, so without repair the VM would stay
/// stopped for good. Expected: the next vmctl command on the VM (`vmctl status`) finds the
/// dead create's record, resumes the VM, thaws the guest and says so; the half-made
/// checkpoint is listed as incomplete, never as a checkpoint; the next create works.
#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vmctl_killed_inside_a_checkpoint_create_is_repaired_by_the_next_command() {
    require_vm!();
    let vm = TestVm::boot("vmctlckpt", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(60));
    for (i, step) in ["checkpoint-frozen", "checkpoint-saved"].into_iter().enumerate() {
        let name = format!("killed{i}");
        let mut child = halted_at(
            &vm,
            step,
            &["checkpoint", "create", vm.name.as_str(), "--name", &name, "--quiesce", "required", "--json"],
        );
        std::thread::sleep(Duration::from_secs(1));
        let a0 = e3_acks(&vm);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(e3_acks(&vm), a0, "`{step}`: the guest is frozen while vmctl is halted there");
        child.kill().unwrap();
        child.wait().unwrap();
        // QEMU serves one QMP client: ask only now that the halted vmctl is gone.
        let stopped = run_state(&vm);
        if step == "checkpoint-saved" {
            assert_ne!(stopped, "running", "`{step}`: the create stopped the VM, and nothing resumed it");
        }
        eprintln!("[vmctl killed] `{step}`: QEMU was {stopped} at the kill");
        let st = vm.vmctl_json(&["status", vm.name.as_str()], 0);
        let repaired = st["repaired"].as_str().unwrap_or_else(|| panic!("`{step}`: nothing repaired: {st}"));
        if step == "checkpoint-saved" {
            assert!(repaired.contains("resumed the VM"), "`{step}`: {repaired}");
        }
        assert!(repaired.contains("thawed the guest"), "`{step}`: {repaired}");
        assert_eq!(run_state(&vm), "running", "`{step}`: after the repair");
        let t = Instant::now();
        vm.wait_acks("e3", a0 + 3, Duration::from_secs(30));
        eprintln!(
            "[vmctl killed] `{step}`: repaired ({repaired}); writers on {:.1} s later",
            t.elapsed().as_secs_f64()
        );
        assert_eq!(vm.fsstatus(), "thawed", "`{step}`");
        let again = vm.vmctl_json(&["status", vm.name.as_str()], 0);
        assert!(again.get("repaired").is_none(), "`{step}`: repaired once only: {again}");
        let l = vm.vmctl_json(&["checkpoint", "list", vm.name.as_str()], 0);
        let listed: Vec<&str> =
            l["checkpoints"].as_array().unwrap().iter().filter_map(|c| c["name"].as_str()).collect();
        assert!(!listed.contains(&name.as_str()), "`{step}`: the dead create is not listed as a checkpoint: {l}");
        assert!(!l["incomplete"].as_array().unwrap().is_empty(), "`{step}`: its leftover is named: {l}");
    }
    let c = vm.vmctl_json(&["checkpoint", "create", vm.name.as_str(), "--name", "after", "--quiesce", "required"], 0);
    assert_eq!(c["name"], "after", "{c}");
    assert_eq!(run_state(&vm), "running");
    let v = vm.vmctl_json(&["checkpoint", "destroyall", vm.name.as_str()], 0);
    eprintln!("[vmctl killed] destroyall: {v}");
}
