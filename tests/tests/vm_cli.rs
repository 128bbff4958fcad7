//! vmctl's command line without a VM (no root, no QEMU): errors name the fix, exit codes are
//! the documented ones, `--json` is JSON on every path.

use std::process::Command;
use std::time::Duration;

use tests::*;

fn vmctl(state: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("vmctl"));
    // TMPDIR too: vmctl keeps the lock of an attached VM there, and a lock file another user
    // left in /tmp would fail the test.
    cmd.env("VMCTL_STATE_DIR", state).env("TMPDIR", state).args(args);
    run_with_limit(cmd, Duration::from_secs(30))
}

#[test]
fn unknown_vms_and_missing_qemu_get_exit_3_and_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let out = vmctl(d.path(), &["status", "web1"]);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(out.stderr.contains("vmctl list"), "{}", out.stderr);
    let target = d.path().join("backups");
    std::fs::create_dir(&target).unwrap();
    let out =
        vmctl(d.path(), &["--qmp", "/nonexistent/qmp.sock", "backup", "--target", target.to_str().unwrap(), "--json"]);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("is the VM running"), "{v}");
}

#[test]
fn attach_mode_needs_a_target_and_names_need_no_slashes() {
    let d = tempfile::tempdir().unwrap();
    let out = vmctl(d.path(), &["--qmp", "/nonexistent/qmp.sock", "backup", "vm1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--target"), "{}", out.stderr);
    let out = vmctl(d.path(), &["create", "../evil"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("bad VM name"), "{}", out.stderr);
}

#[test]
fn create_writes_a_config_that_list_and_status_read() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("data.qcow2");
    std::fs::write(&disk, b"").unwrap();
    let out = vmctl(
        d.path(),
        &["create", "web1", "--disk", &format!("data={}", disk.display()), "--memory", "256", "--json"],
    );
    out.expect_code(0, "create");
    let cfg = std::fs::read_to_string(d.path().join("web1/vm.toml")).unwrap();
    assert!(cfg.contains("memory-mib = 256"), "{cfg}");
    assert!(cfg.contains("name = \"data\""), "{cfg}");
    let out = vmctl(d.path(), &["list", "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["vms"][0]["name"], "web1");
    assert_eq!(v["vms"][0]["state"], "stopped");
    let out = vmctl(d.path(), &["create", "web1", "--disk", disk.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("exists already"), "{}", out.stderr);
}

#[test]
fn backup_list_of_an_empty_or_partial_target_lists_nothing() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join(".partial-web1-x")).unwrap();
    let out = vmctl(d.path(), &["backup", "list", "--target", d.path().to_str().unwrap(), "--json"]);
    out.expect_code(0, "backup list");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["backups"], json!([]));
    assert_eq!(v["incomplete"].as_array().unwrap().len(), 1);
    let out = vmctl(d.path(), &["backup", "verify", d.path().to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("not a usable backup"), "{}", out.stderr);
}

#[test]
fn man_prints_a_roff_page_with_every_command() {
    let d = tempfile::tempdir().unwrap();
    let out = vmctl(d.path(), &["man"]);
    out.expect_code(0, "vmctl man");
    let page = &out.stdout;
    assert!(page.lines().any(|l| l.starts_with(".TH vmctl 1")), "{page}");
    let commands = "CREATE,START,STOP,KILL,STATUS,LIST,FSFREEZE,FSTHAW,FSSTATUS,BACKUP,BACKUP LIST,BACKUP VERIFY,\
                    BACKUP RESTORE,CHECKPOINT,CHECKPOINT CREATE,CHECKPOINT LIST,CHECKPOINT DELETE,CHECKPOINT DESTROYALL,\
                    SUSPEND,RESUME,PAUSE,UNPAUSE";
    for cmd in commands.split(',') {
        assert!(page.contains(&format!(".SH \"VMCTL {cmd}\"")), "no section for vmctl {cmd}");
    }
    // Options of the commands, not only their names; nothing hidden.
    assert!(page.contains("\\-\\-incremental") && page.contains("\\-\\-verbose"), "{page}");
    assert!(!page.contains("__sink") && !page.contains("no\\-space\\-check"), "hidden commands leak: {page}");
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn verbose_logs_timestamped_steps_to_stderr_and_quiet_logs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t");
    let args = ["--qmp", "/nonexistent/qmp.sock", "backup", "--target", target.to_str().unwrap(), "--json"];
    let out = vmctl(d.path(), &args);
    assert_eq!(out.code, Some(3));
    assert!(!out.stderr.contains("INFO"), "no log without -v: {}", out.stderr);
    let mut verbose = vec!["-v"];
    verbose.extend(args);
    let out = vmctl(d.path(), &verbose);
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    serde_json::from_str::<Value>(&out.stdout).expect("stdout stays JSON");
    let line = out.stderr.lines().find(|l| l.contains("full backup of")).unwrap_or_else(|| panic!("{}", out.stderr));
    // "HH:MM:SS.micros +elapsed ms  INFO step"
    let (clock, rest) = line.split_once(' ').unwrap();
    assert!(clock.len() == 15 && clock.as_bytes()[2] == b':' && clock.as_bytes()[8] == b'.', "{line}");
    assert!(rest.trim_start().starts_with('+') && rest.contains("ms") && rest.contains("INFO"), "{line}");
}
