//! VM tier: what backups and checkpoints share (issue 9): the one quiesce guard, that thaws
//! the guest on every way out of a checkpoint, and the one per-VM operation lock, that keeps
//! a backup and a checkpoint of the same VM apart. Needs root and QEMU; `tests/run-all.sh`
//! runs these with `--include-ignored`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::vm::{TestVm, VmOpts};
use tests::*;

/// Fails loudly (never passes by returning early) where the VM tier cannot run.
fn require_vm_tier() {
    if let Some(why) = tests::vm::cannot_run() {
        panic!("this VM-tier test cannot run here: {why}");
    }
}

/// `vmctl ARGS --json` with `VMCTL_TEST_FAULT=fault`; expects `code`, returns the JSON.
fn vmctl_with_fault(vm: &TestVm, fault: &str, args: &[&str], code: i32) -> Value {
    let mut cmd = Command::new(bin("vmctl"));
    cmd.env("VMCTL_STATE_DIR", vm.state_dir()).env("VMCTL_TEST_FAULT", fault).args(args).arg("--json");
    let desc = format!("{cmd:?}");
    let out = run_with_limit(cmd, Duration::from_secs(600));
    out.expect_code(code, &desc);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{desc} printed no JSON ({e}):\n{out:?}"))
}

/// Hidden entries of a directory (partial backups, checkpoints being written).
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_checkpoint_whose_cont_fails_after_the_migration_thaws_the_guest_at_once() {
    require_vm_tier();
    let vm = TestVm::boot("contfails", VmOpts { writers: false, ..Default::default() });
    assert_eq!(vm.fsstatus(), "thawed");

    // Quiesced (required: exit 4 unless vssd froze), then the step after the migration fails.
    let t = Instant::now();
    let v = vmctl_with_fault(
        &vm,
        "cont-after-migration",
        &["checkpoint", "create", "contfails", "--name", "c1", "--quiesce", "required"],
        1,
    );
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("test fault `cont-after-migration`"), "{v}");
    eprintln!("[test] the failed checkpoint took {:.1} s", t.elapsed().as_secs_f64());

    // At once: vssd's own deadline (120 s for checkpoints) is far off, and a guest left frozen
    // (or left stopped, whose agent cannot answer) would not say "thawed" here.
    let t = Instant::now();
    assert_eq!(vm.fsstatus(), "thawed", "the guest was left frozen after the failed step");
    assert!(t.elapsed() < Duration::from_secs(30), "fsstatus took {:?}", t.elapsed());
    let st = vm.vmctl_json(&["status", "contfails"], 0);
    assert_eq!(st["status"]["state"], "running", "{st}");
    // The guest writes again (a frozen filesystem would block this).
    vm.sh("echo after > /data/e3/after-failed-checkpoint && sync");

    // Nothing claims to be a checkpoint, and nothing half-written is left.
    let l = vm.vmctl_json(&["checkpoint", "list", "contfails"], 0);
    assert_eq!(l["checkpoints"].as_array().map(Vec::len), Some(0), "{l}");
    assert_eq!(l["incomplete"].as_array().map(Vec::len), Some(0), "{l}");

    // Without the fault the same checkpoint succeeds, and the guest is thawed after it too.
    let v = vm.vmctl_json(&["checkpoint", "create", "contfails", "--name", "c1", "--quiesce", "required"], 0);
    assert!(v["quiesce"]["frozen"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v.get("thaw-error").is_none(), "{v}");
    assert_eq!(vm.fsstatus(), "thawed");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_backup_and_a_checkpoint_of_one_vm_exclude_each_other_by_name() {
    require_vm_tier();
    let vm = TestVm::boot("oplock", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    let mut child = vm.start_slow_backup();
    let pid = child.id();

    // A checkpoint, and a suspend, of the VM while its backup copies: refused at once, by
    // the name of what runs and its pid (exit 3: the VM is busy).
    for args in [&["checkpoint", "create", "oplock"][..], &["suspend", "oplock"][..]] {
        let t = Instant::now();
        let v = vm.vmctl_json(args, 3);
        let err = v["error"].as_str().unwrap_or_default();
        assert!(err.contains("another backup of the VM `oplock`"), "{args:?}: {err}");
        assert!(err.contains(&format!("vmctl pid {pid}")), "{args:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "a refusal does not wait: {:?}", t.elapsed());
    }
    assert!(child.try_wait().unwrap().is_none(), "the backup goes on");
    assert!(hidden(&vm.dir().join("checkpoints")).is_empty(), "the refused checkpoint began nothing");
    assert!(vm.pid().is_some(), "the refused suspend left the VM running");
    child.kill().unwrap();
    child.wait().unwrap();
}
