//! backup-bench: `vmctl backup` in a real guest, vssd against qemu-ga, and the copy against
//! `qemu-img convert` (issue 4's benchmark).
//!
//! One guest image, booted twice: once with vssd as its agent, once with qemu-ga. A writer runs
//! on each of the 4 data filesystems (3 ext4, 1 xfs), and before every cycle each filesystem gets
//! 1 MiB of unsynced data, so every freeze has to flush. The first backup after boot (cold
//! caches in the guest) is reported on its own line, not in the medians. Per cycle: `vmctl backup --json`
//! reports the host-observed freeze window (freeze request sent → thaw reply received); the
//! guest's writers report the longest single write + fdatasync, which is the stall they felt.
//! Then, in the vssd guest, 256 MiB of random data are written and a full `vmctl backup` is
//! timed against `qemu-img convert` of the same disks to the same filesystem.
//!
//! Usage (root): `backup-bench [--cycles N] [--bulk-mib M] [--json]`. It uses the vmctl of
//! `$VSSD_BIN_DIR` (default target/debug; release: `VSSD_BIN_DIR=target/release`).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::vm::{TestVm, VmOpts};

struct Opts {
    cycles: usize,
    bulk_mib: u64,
    json: bool,
}

fn usage() -> ! {
    eprintln!("usage: backup-bench [--cycles N] [--bulk-mib M] [--json]");
    std::process::exit(2);
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default, Debug)]
struct Cycles {
    window: Vec<f64>,
    freeze: Vec<f64>,
    transaction: Vec<f64>,
    thaw: Vec<f64>,
    stall: Vec<f64>,
    /// vssd's own account of its freeze (empty for qemu-ga): total, planning, apps, FIFREEZE.
    guest: Vec<f64>,
    plan: Vec<f64>,
    apps: Vec<f64>,
    fifreeze: Vec<f64>,
    /// vssd's `steps`: when each step ended, per cycle.
    steps: Vec<(String, f64)>,
    /// The first backup after boot (cold caches in the guest), kept out of the medians.
    first_window: f64,
    first_stall: f64,
}

/// Runs `cycles` backups of `vm` and collects the figures.
fn cycles(vm: &TestVm, n: usize) -> Cycles {
    let mut c = Cycles::default();
    let target = vm.work().join("bench-backups");
    // Cycle 0 is the first freeze after boot: reported on its own, not in the medians.
    for i in 0..=n {
        vm.sh("for d in db logs e3 e4; do dd if=/dev/zero of=/data/$d/dirty bs=64k count=16 2>/dev/null; done");
        let acks_before = vm.acks().len();
        let v = vm.vmctl_json(&["backup".as_ref(), vm.name.as_ref(), "--target".as_ref(), target.as_os_str()], 0);
        assert_ne!(v["consistency"], "crash", "cycle {i}: not quiesced: {v}");
        // Acks of writes that were blocked by the freeze arrive right after the thaw.
        std::thread::sleep(Duration::from_millis(500));
        let stall = vm.acks()[acks_before..]
            .iter()
            .filter(|a| a.writer != "sqlite")
            .map(|a| a.lat_us as f64 / 1000.0)
            .fold(0.0, f64::max);
        let t = &v["timings"];
        if i == 0 {
            c.first_window = v["freeze_window_ms"].as_f64().unwrap();
            c.first_stall = stall;
            let _ = std::fs::remove_dir_all(&target);
            continue;
        }
        c.window.push(v["freeze_window_ms"].as_f64().unwrap());
        c.freeze.push(t["freeze_ms"].as_f64().unwrap());
        c.transaction.push(t["transaction_ms"].as_f64().unwrap());
        c.thaw.push(t["thaw_ms"].as_f64().unwrap());
        c.stall.push(stall);
        // vssd's report is in the manifest (vmctl's --json summary leaves it out).
        let manifest: Value = v["dir"]
            .as_str()
            .and_then(|d| std::fs::read(std::path::Path::new(d).join("manifest.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let r = &manifest["quiesce"]["report"];
        if let Some(total) = r["elapsed-ms"].as_f64() {
            let max = |list: &Value, keys: &[&str]| {
                list.as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| keys.iter().map(|k| x[*k].as_f64().unwrap_or(0.0)).sum::<f64>())
                    .fold(0.0, f64::max)
            };
            c.guest.push(total);
            c.plan.push(r["plan-ms"].as_f64().unwrap_or(0.0));
            c.apps.push(max(&r["apps"], &["prepare-ms", "freeze-ms"]));
            c.fifreeze.push(max(&r["mounts"], &["freeze-ms"]));
            for (k, v) in r["steps"].as_object().into_iter().flatten() {
                c.steps.push((k.clone(), v.as_f64().unwrap_or(f64::NAN)));
            }
        }
        let _ = std::fs::remove_dir_all(&target);
    }
    c
}

/// Connect → first answer on the agent channel (QEMU's chardev socket): what every vmctl
/// command waits before it can start. Each round connects afresh, sends 0xFF +
/// guest-sync-delimited and waits for its reply. Median in ms.
fn first_answer_ms(vm: &TestVm, rounds: usize) -> f64 {
    let mut v = Vec::new();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        // What vmctl does first: the workspace's client, its 0xFF + guest-sync-delimited resync.
        let mut c =
            qga_wire::Client::connect(&vm.dir().join("agent.sock")).unwrap_or_else(|e| panic!("{}", tests::chain(&e)));
        c.sync_timeout = Duration::from_secs(10);
        c.sync().unwrap_or_else(|e| panic!("the agent answers within 10 s: {}", tests::chain(&e)));
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    median(&mut v)
}

fn summary(c: &mut Cycles) -> Value {
    let mut names: Vec<String> = Vec::new();
    for (k, _) in &c.steps {
        if !names.contains(k) {
            names.push(k.clone());
        }
    }
    let mut steps: Vec<(String, f64)> = names
        .iter()
        .map(|n| {
            let mut v: Vec<f64> = c.steps.iter().filter(|(k, _)| k == n).map(|(_, v)| *v).collect();
            (n.clone(), median(&mut v))
        })
        .collect();
    steps.sort_by(|a, b| a.1.total_cmp(&b.1));
    let steps: Vec<Value> = steps.into_iter().map(|(n, v)| json!([n, v])).collect();
    json!({
        "steps_ms": steps,
        "window_ms": median(&mut c.window),
        "freeze_ms": median(&mut c.freeze),
        "transaction_ms": median(&mut c.transaction),
        "thaw_ms": median(&mut c.thaw),
        "stall_ms": median(&mut c.stall),
        "first_after_boot": {"window_ms": c.first_window, "stall_ms": c.first_stall},
        "in_guest_ms": median(&mut c.guest),
        "plan_ms": median(&mut c.plan),
        "apps_ms": median(&mut c.apps),
        "fifreeze_ms": median(&mut c.fifreeze),
        "cycles": c.window.len(),
    })
}

fn main() {
    let mut o = Opts { cycles: 7, bulk_mib: 240, json: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cycles" => o.cycles = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--bulk-mib" => o.bulk_mib = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => o.json = true,
            _ => usage(),
        }
    }
    if let Some(why) = tests::vm::cannot_run() {
        eprintln!("backup-bench: {why}");
        std::process::exit(2);
    }
    let opts = VmOpts { interval_ms: 5, ..Default::default() };

    eprintln!("backup-bench: qemu-ga guest, {} cycles", o.cycles);
    let (mut qga, qga_first) = {
        let vm = TestVm::boot("bench-qga", VmOpts { agent: "qemu-ga", ..opts.clone() });
        vm.wait_acks("e3", 50, Duration::from_secs(60));
        (cycles(&vm, o.cycles), first_answer_ms(&vm, 9))
    };
    eprintln!("backup-bench: vssd guest, {} cycles", o.cycles);
    let vm = TestVm::boot("bench-vssd", opts);
    vm.wait_acks("e3", 50, Duration::from_secs(60));
    let mut vssd = cycles(&vm, o.cycles);
    let vssd_first = first_answer_ms(&vm, 9);

    // Throughput: real data on the disks, then the same disks copied both ways.
    eprintln!("backup-bench: writing {} MiB of random data in the guest", o.bulk_mib);
    // Two thirds on the xfs (320 MiB), a third on the ext4 db (128 MiB).
    let (a, b) = (o.bulk_mib * 2 / 3, o.bulk_mib - o.bulk_mib * 2 / 3);
    vm.sh(&format!(
        "dd if=/dev/urandom of=/data/logs/bulk bs=1M count={a} 2>/dev/null && dd if=/dev/urandom of=/data/db/bulk bs=1M count={b} 2>/dev/null && sync"
    ));
    let out_dir = vm.work().join("throughput");
    std::fs::create_dir_all(&out_dir).unwrap();
    let disks: Vec<std::path::PathBuf> =
        ["data", "data2"].iter().map(|d| vm.dir().join("disks").join(format!("{d}.qcow2"))).collect();
    let allocated: u64 = disks.iter().map(|d| allocated_bytes(d)).sum();
    let mut convert_s = Vec::new();
    let mut copy_s = Vec::new();
    let mut backup_s = Vec::new();
    for round in 0..2 {
        let t = Instant::now();
        for (i, d) in disks.iter().enumerate() {
            let dest = out_dir.join(format!("convert-{round}-{i}.qcow2"));
            tests::run(
                "qemu-img",
                &["convert".as_ref(), "-U".as_ref(), "-O".as_ref(), "qcow2".as_ref(), d.as_os_str(), dest.as_os_str()],
            );
            std::fs::File::open(&dest).unwrap().sync_all().unwrap();
        }
        convert_s.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).unwrap();
        let target = vm.work().join("throughput-backups");
        let v = vm.vmctl_json(&["backup".as_ref(), vm.name.as_ref(), "--target".as_ref(), target.as_os_str()], 0);
        copy_s.push(v["timings"]["copy_ms"].as_f64().unwrap() / 1000.0);
        backup_s.push(v["timings"]["total_ms"].as_f64().unwrap() / 1000.0);
        let _ = std::fs::remove_dir_all(&target);
    }
    drop(vm);

    let q = summary(&mut qga);
    let s = summary(&mut vssd);
    let mib = allocated as f64 / 1048576.0;
    let conv = median(&mut convert_s);
    let copy = median(&mut copy_s);
    let whole = median(&mut backup_s);
    let r = json!({
        "freeze": {"vssd": s, "qemu-ga": q,
                   "window_ratio": s["window_ms"].as_f64().unwrap() / q["window_ms"].as_f64().unwrap(),
                   "stall_ratio": s["stall_ms"].as_f64().unwrap() / q["stall_ms"].as_f64().unwrap()},
        "first_answer_ms": {"vssd": vssd_first, "qemu-ga": qga_first, "ratio": vssd_first / qga_first},
        "throughput": {"allocated_mib": mib,
                       "qemu_img_convert_mib_s": mib / conv,
                       "backup_copy_mib_s": mib / copy,
                       "backup_end_to_end_mib_s": mib / whole,
                       "copy_ratio": conv / copy,
                       "end_to_end_ratio": conv / whole},
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        return;
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("freeze window of `vmctl backup` (median of {} cycles, 4 dirty filesystems, TCG guest)", o.cycles);
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>10} {:>14}",
        "agent", "window ms", "freeze ms", "transact. ms", "thaw ms", "guest stall ms"
    );
    for (name, v) in [("qemu-ga", &q), ("vssd", &s)] {
        println!(
            "{:<10} {:>10.1} {:>10.1} {:>12.1} {:>10.1} {:>14.1}",
            name,
            f(v, "window_ms"),
            f(v, "freeze_ms"),
            f(v, "transaction_ms"),
            f(v, "thaw_ms"),
            f(v, "stall_ms")
        );
    }
    println!(
        "vssd inside the guest: {:.1} ms (planning {:.1}, apps prepare+hold {:.1}, slowest FIFREEZE {:.1}); \
         the rest of `freeze ms` is the channel's round trip",
        f(&s, "in_guest_ms"),
        f(&s, "plan_ms"),
        f(&s, "apps_ms"),
        f(&s, "fifreeze_ms")
    );
    println!(
        "first backup after boot (not in the medians): window qemu-ga {:.1} ms, vssd {:.1} ms ({:.2}x)",
        q["first_after_boot"]["window_ms"].as_f64().unwrap_or(f64::NAN),
        s["first_after_boot"]["window_ms"].as_f64().unwrap_or(f64::NAN),
        s["first_after_boot"]["window_ms"].as_f64().unwrap_or(f64::NAN)
            / q["first_after_boot"]["window_ms"].as_f64().unwrap_or(f64::NAN)
    );
    let steps: Vec<String> = s["steps_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{} {:.1}", p[0].as_str().unwrap_or("?"), p[1].as_f64().unwrap_or(f64::NAN)))
        .collect();
    if !steps.is_empty() {
        println!("vssd's steps, ms since the request (medians): {}", steps.join(", "));
    }
    println!(
        "vssd / qemu-ga: window {:.2}x, guest stall {:.2}x (target <= 0.5x)",
        r["freeze"]["window_ratio"].as_f64().unwrap(),
        r["freeze"]["stall_ratio"].as_f64().unwrap()
    );
    println!(
        "agent connect → first answer (median of 9): vssd {vssd_first:.1} ms, qemu-ga {qga_first:.1} ms, {:.2}x",
        vssd_first / qga_first
    );
    println!("\nthroughput, full backup of {mib:.0} MiB allocated (median of 2)");
    println!("qemu-img convert      {:>8.1} MiB/s", mib / conv);
    println!("vmctl backup (copy)   {:>8.1} MiB/s  ratio {:.2}x (target >= 0.8x)", mib / copy, conv / copy);
    println!(
        "vmctl backup (total)  {:>8.1} MiB/s  ratio {:.2}x (with checksums and manifest)",
        mib / whole,
        conv / whole
    );
}

/// Allocated bytes of an image (what a copy has to move), from `qemu-img info`.
fn allocated_bytes(p: &std::path::Path) -> u64 {
    let out = tests::run("qemu-img", &["info".as_ref(), "-U".as_ref(), "--output=json".as_ref(), p.as_os_str()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["actual-size"].as_u64().unwrap_or(0)
}
