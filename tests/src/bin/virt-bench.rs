//! virt-bench: `vmctl --connect URI backup` of a libvirt domain against what users script
//! today (issue 14's benchmark).
//!
//! One TCG domain of the test guest under a real libvirtd (the machine's, or one started as
//! the libvirt tests do), vssd as its agent, the writers running, and an extra disk of random
//! data. Per cycle, alternating:
//! - vmctl: `vmctl --connect qemu:///system backup DOMAIN --target DIR --json`: its freeze
//!   window (freeze request sent → thaw reply received) from the manifest;
//! - by hand: `virsh domfsfreeze` + `virsh backup-begin` + `virsh domfsthaw`, the window timed
//!   from before the first to after the last.
//!
//! For both, the guest's write stall: the longest write + fdatasync its writers saw.
//! Then the copy: vmctl's backup (copy, and the whole backup with its checksums and manifest)
//! against `virsh backup-begin` alone, timed until libvirt's job ends. The first cycle after
//! boot is left out of the medians.
//!
//! Usage (root): `virt-bench [--cycles N] [--bulk-mib M] [--json]`; the vmctl of
//! `$VSSD_BIN_DIR` (default target/debug).
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::libvirt::{virsh, virsh_ok, vmctl_json_at, Domain, DomainOpts, Libvirtd, URI};

fn usage() -> ! {
    eprintln!("usage: virt-bench [--cycles N] [--bulk-mib M] [--json]");
    std::process::exit(2);
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The longest write stall (ms) among the acks after `from`.
fn stall_since(d: &Domain, from: usize) -> f64 {
    std::thread::sleep(Duration::from_millis(500));
    tests::vm::longest_stall_ms(&d.acks()[from..])
}

/// Waits until the domain's job (the backup) has ended.
fn wait_job(d: &Domain) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = virsh(&["domjobinfo", &d.name]);
        if out.stdout.lines().any(|l| l.starts_with("Job type:") && l.contains("None")) {
            return;
        }
        assert!(Instant::now() < deadline, "the backup job of {} did not end: {}", d.name, out.stdout);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A push-mode full backup XML of every disk of `d` into `dir`.
fn backup_xml(d: &Domain, dir: &Path) -> std::path::PathBuf {
    // `domblklist --details`: Type Device Target Source.
    let table = virsh_ok(&["domblklist", &d.name, "--details"]);
    let mut b = String::from("<domainbackup mode='push'><disks>");
    for row in tests::libvirt::parse_table(&table).iter().filter(|r| r.get(1).map(String::as_str) == Some("disk")) {
        let dev = &row[2];
        b.push_str(&format!(
            "<disk name='{dev}' type='file'><driver type='qcow2'/><target file='{}/{dev}.qcow2'/></disk>",
            dir.display()
        ));
    }
    b.push_str("</disks></domainbackup>");
    let p = dir.join("backup.xml");
    std::fs::write(&p, b).unwrap();
    p
}

fn fresh_dir(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

fn files_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Deletes every checkpoint of `d` (each vmctl backup makes one).
fn drop_checkpoints(d: &Domain) {
    for c in virsh_ok(&["checkpoint-list", &d.name, "--name"]).lines().map(str::trim).filter(|l| !l.is_empty()) {
        let _ = virsh(&["checkpoint-delete", &d.name, c]);
    }
}

fn main() {
    let (mut cycles, mut bulk_mib, mut as_json) = (5usize, 256u64, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cycles" => cycles = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--bulk-mib" => bulk_mib = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => as_json = true,
            _ => usage(),
        }
    }
    if let Some(why) = tests::libvirt::cannot_run() {
        eprintln!("virt-bench: {why}");
        std::process::exit(2);
    }
    let lv = Libvirtd::ensure();
    let d = Domain::define(&lv, "bench", &DomainOpts { writers: true, bulk_mib, ..Default::default() });
    d.start(Duration::from_secs(240));
    d.wait_acks("e3", 30, Duration::from_secs(90));
    let work = tempfile::Builder::new().prefix("vssd-virt-bench-").tempdir_in("/tmp").unwrap();
    let (vm_dir, hand_dir) = (work.path().join("vmctl"), work.path().join("hand"));

    let (mut vm_window, mut vm_stall, mut hand_window, mut hand_stall) = (vec![], vec![], vec![], vec![]);
    let (mut vm_copy, mut vm_total) = (vec![], vec![]);
    let (mut vm_freeze, mut vm_begin, mut vm_thaw) = (vec![], vec![], vec![]);
    let mut bytes = 0;
    for i in 0..=cycles {
        // vmctl.
        fresh_dir(&vm_dir);
        let from = d.acks().len();
        let v = vmctl_json_at(URI, &["backup", &d.name, "--target", vm_dir.to_str().unwrap()], 0);
        assert_ne!(v["consistency"], "crash", "not quiesced: {v}");
        let stall = stall_since(&d, from);
        let dir = Path::new(v["dir"].as_str().unwrap());
        bytes = files_bytes(dir);
        drop_checkpoints(&d);
        // By hand.
        fresh_dir(&hand_dir);
        let xml = backup_xml(&d, &hand_dir);
        let from = d.acks().len();
        let t = Instant::now();
        virsh_ok(&["domfsfreeze", &d.name]);
        let begun = virsh(&["backup-begin".as_ref(), d.name.as_ref(), xml.as_os_str()]);
        virsh_ok(&["domfsthaw", &d.name]);
        let window = t.elapsed().as_secs_f64() * 1000.0;
        begun.expect_code(0, "virsh backup-begin");
        wait_job(&d);
        let hstall = stall_since(&d, from);
        eprintln!(
            "virt-bench: cycle {i}: vmctl window {:.1} ms stall {stall:.1} ms; by hand window {window:.1} ms stall {hstall:.1} ms",
            v["freeze_window_ms"].as_f64().unwrap_or(f64::NAN)
        );
        if i == 0 {
            continue;
        }
        vm_window.push(v["freeze_window_ms"].as_f64().unwrap());
        vm_stall.push(stall);
        vm_copy.push(v["timings"]["copy_ms"].as_f64().unwrap());
        vm_freeze.push(v["timings"]["freeze_ms"].as_f64().unwrap());
        vm_begin.push(v["timings"]["transaction_ms"].as_f64().unwrap());
        vm_thaw.push(v["timings"]["thaw_ms"].as_f64().unwrap());
        vm_total.push(v["timings"]["total_ms"].as_f64().unwrap());
        hand_window.push(window);
        hand_stall.push(hstall);
    }
    // The copy alone, through libvirt.
    let mut plain = vec![];
    for _ in 0..cycles.clamp(1, 3) {
        fresh_dir(&hand_dir);
        let xml = backup_xml(&d, &hand_dir);
        let t = Instant::now();
        virsh(&["backup-begin".as_ref(), d.name.as_ref(), xml.as_os_str()]).expect_code(0, "virsh backup-begin");
        wait_job(&d);
        plain.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mib = bytes as f64 / 1048576.0;
    let (w, s, hw, hs) =
        (median(&mut vm_window), median(&mut vm_stall), median(&mut hand_window), median(&mut hand_stall));
    let (c, tot, p) = (median(&mut vm_copy), median(&mut vm_total), median(&mut plain));
    let r = json!({
        "cycles": cycles,
        "bytes": bytes,
        "vmctl": {"window_ms": w, "stall_ms": s, "freeze_ms": median(&mut vm_freeze),
                  "backup_begin_ms": median(&mut vm_begin), "thaw_ms": median(&mut vm_thaw), "copy_ms": c, "total_ms": tot,
                  "copy_mib_s": mib / (c / 1000.0), "total_mib_s": mib / (tot / 1000.0)},
        "by_hand": {"window_ms": hw, "stall_ms": hs},
        "backup_begin_alone": {"ms": p, "mib_s": mib / (p / 1000.0)},
        "ratios": {"window": w / hw, "stall": s / hs, "copy_throughput": p / c, "total_throughput": p / tot},
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
    } else {
        print(&r, mib);
    }
}

fn print(r: &Value, mib: f64) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("virt-bench: {} cycles, {mib:.0} MiB per backup (medians; the first after boot left out)", r["cycles"]);
    println!("{:<44} {:>10} {:>12}", "flow", "window ms", "stall ms");
    println!(
        "{:<44} {:>10.1} {:>12.1}",
        "vmctl --connect ... backup",
        f(&r["vmctl"]["window_ms"]),
        f(&r["vmctl"]["stall_ms"])
    );
    println!(
        "  vmctl's window: freeze {:.1} + virsh backup-begin {:.1} + thaw {:.1} ms",
        f(&r["vmctl"]["freeze_ms"]),
        f(&r["vmctl"]["backup_begin_ms"]),
        f(&r["vmctl"]["thaw_ms"])
    );
    println!(
        "{:<44} {:>10.1} {:>12.1}",
        "virsh domfsfreeze + backup-begin + domfsthaw",
        f(&r["by_hand"]["window_ms"]),
        f(&r["by_hand"]["stall_ms"])
    );
    println!(
        "copy: vmctl {:.0} ms ({:.0} MiB/s; whole backup with checksums {:.0} ms, {:.0} MiB/s); virsh backup-begin alone {:.0} ms ({:.0} MiB/s)",
        f(&r["vmctl"]["copy_ms"]),
        f(&r["vmctl"]["copy_mib_s"]),
        f(&r["vmctl"]["total_ms"]),
        f(&r["vmctl"]["total_mib_s"]),
        f(&r["backup_begin_alone"]["ms"]),
        f(&r["backup_begin_alone"]["mib_s"])
    );
    println!(
        "ratios vmctl / by hand: window {:.2}x, stall {:.2}x; throughput vmctl / backup-begin alone: copy {:.2}x, whole backup {:.2}x",
        f(&r["ratios"]["window"]),
        f(&r["ratios"]["stall"]),
        f(&r["ratios"]["copy_throughput"]),
        f(&r["ratios"]["total_throughput"])
    );
}
