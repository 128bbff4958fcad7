//! VM tier: the guest agent in a real guest, reached from the host over virtio-serial.
//! Needs root and QEMU; builds the guest image on first use (tests/guest/build.sh).

use std::time::Duration;

use hostsim::qga::Qga;
use tests::vm::{TestVm, VmOpts};
use tests::*;

fn acks_of(vm: &TestVm, writer: &str) -> u64 {
    vm.last_acks().get(writer).copied().unwrap_or(0)
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_over_virtio_serial_pings_freezes_and_thaws_the_guest() {
    require_vm!();
    let vm = TestVm::boot("agent", VmOpts::default());
    vm.wait_acks("e3", 20, Duration::from_secs(30));

    let mut g = Qga::connect(&vm.agent_path()).expect("agent channel");
    assert_eq!(g.execute("guest-ping", None, Duration::from_secs(10)).unwrap(), json!({}));
    let info = g.info(Duration::from_secs(10)).unwrap();
    assert!(info.is_vssd, "the agent in the guest is vssd: {info:?}");

    let n = g.execute("guest-fsfreeze-freeze", None, Duration::from_secs(30)).unwrap();
    assert_eq!(n, json!(4), "db (ext4), logs (xfs), e3, e4 (ext4) are frozen; efi (vfat) cannot be");
    assert_eq!(g.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("frozen"));
    // While frozen, the writers stall: no new acks on any frozen filesystem.
    std::thread::sleep(Duration::from_millis(300));
    let before: Vec<u64> = ["db", "logs", "e3", "e4"].iter().map(|w| acks_of(&vm, w)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let during: Vec<u64> = ["db", "logs", "e3", "e4"].iter().map(|w| acks_of(&vm, w)).collect();
    assert_eq!(before, during, "a writer made progress on a frozen filesystem");

    let thawed = g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)).unwrap();
    assert_eq!(thawed, json!(4));
    assert_eq!(g.execute("guest-fsfreeze-status", None, Duration::from_secs(10)).unwrap(), json!("thawed"));
    for (w, b) in ["db", "logs", "e3", "e4"].iter().zip(&during) {
        vm.wait_acks(w, b + 5, Duration::from_secs(20));
    }

    // vssd's own freeze: a per-mount report, and the vfat it cannot freeze is skipped, not fatal.
    let r = g.execute("vssd-freeze", Some(json!({"deadline": 10})), Duration::from_secs(30)).unwrap();
    let efi = mount_entry(&r, std::path::Path::new("/data/efi"));
    assert_eq!(field(efi, "outcome"), "cannot-freeze", "{r}");
    assert_eq!(r["frozen"], 4, "{r}");
    g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(30)).unwrap();
    drop(g);

    // vmctl's view of the same.
    assert_eq!(vm.fsstatus(), "thawed");
    let v = vm.vmctl_json(&["fsfreeze", "agent", "--deadline", "20"], 0);
    assert_eq!(v["frozen"], 4, "{v}");
    assert_eq!(vm.fsstatus(), "frozen");
    let v = vm.vmctl_json(&["fsthaw", "agent"], 0);
    assert_eq!(v["thawed"], 4, "{v}");
    assert_eq!(vm.fsstatus(), "thawed");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn a_host_that_leaves_while_frozen_gets_the_guest_thawed_by_vssd() {
    require_vm!();
    let vm = TestVm::boot("grace", VmOpts::default());
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    {
        let mut g = Qga::connect(&vm.agent_path()).unwrap();
        g.execute("guest-fsfreeze-freeze", None, Duration::from_secs(30)).unwrap();
        // The host side of the port closes here; vssd waits its grace (10 s) and thaws.
    }
    let frozen_at = acks_of(&vm, "e3");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(acks_of(&vm, "e3"), frozen_at, "still frozen during the grace");
    vm.wait_acks("e3", frozen_at + 5, Duration::from_secs(30));
    assert_eq!(vm.fsstatus(), "thawed");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn qemu_ga_in_the_same_guest_serves_the_same_flow() {
    require_vm!();
    let vm = TestVm::boot("qemuga", VmOpts { agent: "qemu-ga", ..Default::default() });
    vm.wait_acks("e3", 10, Duration::from_secs(30));
    let v = vm.vmctl_json(&["fsstatus", "qemuga"], 0);
    assert!(v["agent"].as_str().unwrap().starts_with("qemu-ga"), "{v}");
    let v = vm.vmctl_json(&["backup", "qemuga"], 0);
    assert_eq!(v["consistency"], "filesystem", "{v}");
    assert_eq!(v["frozen"], 4, "{v}");
    assert_eq!(vm.fsstatus(), "thawed");
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vmctl_lifecycle_status_list_stop_start_kill() {
    require_vm!();
    let vm = TestVm::boot("life", VmOpts { writers: false, ..Default::default() });
    let v = vm.vmctl_json(&["status", "life"], 0);
    assert_eq!(v["status"]["state"], "running", "{v}");
    assert_eq!(v["status"]["accel"], if hostsim::vm::kvm_usable().is_ok() { "kvm" } else { "tcg" }, "{v}");
    assert!(v["agent"]["agent"].as_str().unwrap().starts_with("vssd"), "{v}");
    let v = vm.vmctl_json(&["list"], 0);
    assert_eq!(v["vms"][0]["name"], "life", "{v}");

    // Starting twice is refused; unknown VMs name the fix.
    let out = vm.vmctl(&["start", "life"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("running already"), "{}", out.stderr);
    let out = vm.vmctl(&["status", "nosuch"]);
    assert_eq!(out.code, Some(3));
    assert!(out.stderr.contains("vmctl list"), "{}", out.stderr);

    // The guest powers off on the ACPI button.
    let v = vm.vmctl_json(&["stop", "life", "--timeout", "30"], 0);
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(vm.vmctl_json(&["status", "life"], 0)["status"]["state"], "stopped");
    let out = vm.vmctl(&["backup", "life"]);
    assert_eq!(out.code, Some(3), "a stopped VM cannot be backed up this way: {}", out.stderr);

    // Again, then killed.
    vm.vmctl(&["start", "life", "--wait-agent", "60"]).expect_code(0, "second start");
    vm.vmctl_json(&["kill", "life"], 0);
    assert!(vm.pid().is_none());
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vssd_serves_vsock_inside_the_guest() {
    require_vm!();
    let vm = TestVm::boot("vsock", VmOpts { writers: false, append: "vmtest.vsock=4444".into(), ..Default::default() });
    // No vhost-vsock on this host: a client inside the guest reaches vssd through
    // vsock_loopback (CID 1).
    let (code, out) = vm.shell("vsock-qga 1:4444 guest-fsfreeze-status", Duration::from_secs(60));
    assert_ne!(
        code, 127,
        "the guest image has no vsock-qga: its static build failed (see target/guest/work/extras.err); fix it and \
         rebuild the image with `bash tests/guest/build.sh --install`"
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("thawed"), "{out}");
    let out = vm.sh("vsock-qga 1:4444 guest-ping");
    assert!(out.contains("\"return\""), "{out}");
}

/// CPU time (clock ticks) vssd has used in the guest so far.
fn vssd_cpu_ticks(vm: &TestVm) -> u64 {
    let out = vm.sh("set -- $(cat /proc/$(pidof vssd)/stat); shift 13; echo $(( $1 + $2 ))");
    out.trim().parse().unwrap_or_else(|_| panic!("no CPU figure from the guest: {out:?}"))
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn an_idle_vssd_uses_no_cpu_with_or_without_a_host_and_answers_a_new_host_at_once() {
    require_vm!();
    let vm = TestVm::boot("idle", VmOpts { writers: false, ..Default::default() });
    // A virtio-serial port without a host reads EOF and polls as hung up for as long as the
    // host stays away: an agent that polls it spins. Measure 3 s with no host, then 3 s with a
    // host connected and silent. USER_HZ is 100: a spinning vssd would use ~300 ticks.
    std::thread::sleep(Duration::from_secs(1));
    let a = vssd_cpu_ticks(&vm);
    std::thread::sleep(Duration::from_secs(3));
    let b = vssd_cpu_ticks(&vm);
    assert!(b - a <= 15, "vssd used {} ticks in 3 s with no host connected", b - a);

    let mut g = Qga::connect(&vm.agent_path()).expect("agent channel");
    assert!(g.execute("guest-ping", None, Duration::from_secs(10)).is_ok());
    let c = vssd_cpu_ticks(&vm);
    std::thread::sleep(Duration::from_secs(3));
    let d = vssd_cpu_ticks(&vm);
    assert!(d - c <= 15, "vssd used {} ticks in 3 s with a silent host connected", d - c);
    drop(g);

    // A new host is answered at once, not after a polling interval (generous: TCG).
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let mut g = Qga::connect(&vm.agent_path()).expect("agent channel");
        g.execute("guest-ping", None, Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "first answer after {:?}", t.elapsed());
    }
}
