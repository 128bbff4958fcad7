//! backup-bench: `vmctl backup` in a real guest, vssd against qemu-ga, and the copy against
//! `qemu-img convert` (issue 4's benchmark).
//!
//! One guest image, booted twice: once with vssd as its agent, once with qemu-ga; the two take
//! turns cycle by cycle, the other paused (QMP `stop`), so both see the same host. A writer runs
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
    /// Skip the freeze cycles: only the throughput part.
    throughput_only: bool,
    /// Size of the big disk of the throughput part, GiB (0: none).
    disk_gib: u64,
    /// More arguments for the guest's vssd.
    vssd_args: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: backup-bench [--cycles N] [--bulk-mib M] [--disk-size GIB(G)] [--throughput-only] [--vssd-arg ARG]... [--json]"
    );
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

/// One backup of `vm` (cycle `i`; 0 is the first after boot, kept out of the medians), its
/// figures added to `c`.
fn cycle(vm: &TestVm, i: usize, c: &mut Cycles) {
    let target = vm.work().join("bench-backups");
    vm.sh("for d in db logs e3 e4; do dd if=/dev/zero of=/data/$d/dirty bs=64k count=16 2>/dev/null; done");
    let acks_before = vm.acks().len();
    let v = vm.vmctl_json(&["backup".as_ref(), vm.name.as_ref(), "--target".as_ref(), target.as_os_str()], 0);
    assert_ne!(v["consistency"], "crash", "cycle {i}: not quiesced: {v}");
    // Acks of writes that were blocked by the freeze arrive right after the thaw.
    std::thread::sleep(Duration::from_millis(500));
    let stall = tests::vm::longest_stall_ms(&vm.acks()[acks_before..]);
    let t = &v["timings"];
    if i == 0 {
        c.first_window = v["freeze_window_ms"].as_f64().unwrap();
        c.first_stall = stall;
        let _ = std::fs::remove_dir_all(&target);
        return;
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

/// The freeze cycles of both guests, taking turns (qemu-ga, vssd, then vssd, qemu-ga, ...):
/// the guest whose turn it is not is paused, so each cycle of one agent runs in the same
/// machine state as the other's next to it, and drift of the host (page cache, CPU pressure
/// from elsewhere) falls on both. Returns (qemu-ga's, vssd's).
fn interleaved(qga: &TestVm, vssd: &TestVm, n: usize) -> (Cycles, Cycles) {
    let (mut q, mut s) = (Cycles::default(), Cycles::default());
    for i in 0..=n {
        let mut turns: [(&TestVm, &mut Cycles); 2] = [(qga, &mut q), (vssd, &mut s)];
        if i % 2 == 1 {
            turns.reverse();
        }
        for (vm, c) in turns {
            vm.resume();
            // The writers run for a while before the backup, as in a guest that never paused.
            let e3 = vm.last_acks().get("e3").copied().unwrap_or(0);
            vm.wait_acks("e3", e3 + 20, Duration::from_secs(60));
            cycle(vm, i, c);
            vm.pause();
        }
    }
    (q, s)
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
    let mut o =
        Opts { cycles: 7, bulk_mib: 240, json: false, throughput_only: false, disk_gib: 2, vssd_args: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cycles" => o.cycles = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--bulk-mib" => o.bulk_mib = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => o.json = true,
            "--throughput-only" => o.throughput_only = true,
            // Passed to the guest's vssd (vmtest.vssd-args), e.g. --no-rcu-expedite, to compare.
            "--vssd-arg" => o.vssd_args.push(args.next().unwrap_or_else(|| usage())),
            "--disk-size" => {
                o.disk_gib =
                    args.next().and_then(|s| s.trim_end_matches(['G', 'g']).parse().ok()).unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    if let Some(why) = tests::vm::cannot_run() {
        eprintln!("backup-bench: {why}");
        std::process::exit(2);
    }
    let mut opts = VmOpts { interval_ms: 5, ..Default::default() };
    if !o.vssd_args.is_empty() {
        opts.append = format!("vmtest.vssd-args={}", o.vssd_args.join(","));
    }

    let (mut freeze, vm) = if o.throughput_only {
        (None, TestVm::boot("bench-vssd", opts.clone()))
    } else {
        // Both guests booted, one paused while the other runs (booting included).
        let vm = TestVm::boot("bench-vssd", opts.clone());
        vm.wait_acks("e3", 50, Duration::from_secs(60));
        vm.pause();
        let qvm = vm.boot_beside("bench-qga", VmOpts { agent: "qemu-ga", ..opts.clone() });
        qvm.wait_acks("e3", 50, Duration::from_secs(60));
        qvm.pause();
        eprintln!("backup-bench: {} cycles each, qemu-ga's guest and vssd's taking turns", o.cycles);
        let (qga, vssd) = interleaved(&qvm, &vm, o.cycles);
        qvm.resume();
        let qga_first = first_answer_ms(&qvm, 9);
        drop(qvm);
        vm.resume();
        let vssd_first = first_answer_ms(&vm, 9);
        (Some((qga, qga_first, vssd, vssd_first)), vm)
    };

    // Throughput: real data on the disks, then the same disks copied both ways.
    eprintln!("backup-bench: writing {} MiB of random data in the guest", o.bulk_mib);
    // Two thirds on the xfs (320 MiB), a third on the ext4 db (128 MiB).
    let (a, b) = (o.bulk_mib * 2 / 3, o.bulk_mib - o.bulk_mib * 2 / 3);
    vm.sh(&format!(
        "dd if=/dev/urandom of=/data/logs/bulk bs=1M count={a} 2>/dev/null && dd if=/dev/urandom of=/data/db/bulk bs=1M count={b} 2>/dev/null && sync"
    ));
    let bench_disks = throughput(&vm, &["data", "data2"]);
    drop(vm);
    let big = (o.disk_gib > 0).then(|| big_disk_throughput(o.disk_gib, &opts));

    let mut r = json!({"throughput": {"bench_disks": bench_disks}});
    if let Some(b) = &big {
        r["throughput"]["big_disk"] = b.clone();
    }
    if let Some((qga, qga_first, vssd, vssd_first)) = &mut freeze {
        let q = summary(qga);
        let s = summary(vssd);
        r["freeze"] = json!({"vssd": s, "qemu-ga": q,
                   "window_ratio": s["window_ms"].as_f64().unwrap() / q["window_ms"].as_f64().unwrap(),
                   "stall_ratio": s["stall_ms"].as_f64().unwrap() / q["stall_ms"].as_f64().unwrap()});
        r["first_answer_ms"] = json!({"vssd": *vssd_first, "qemu-ga": *qga_first, "ratio": *vssd_first / *qga_first});
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        return;
    }
    if let Some((_, qga_first, _, vssd_first)) = &freeze {
        print_freeze(&r, o.cycles, *vssd_first, *qga_first);
    }
    print_throughput("the benchmark's disks", &r["throughput"]["bench_disks"]);
    if big.is_some() {
        print_throughput(&format!("with a {} GiB disk", o.disk_gib), &r["throughput"]["big_disk"]);
    }
}

fn print_freeze(r: &Value, cycles: usize, vssd_first: f64, qga_first: f64) {
    let (q, s) = (&r["freeze"]["qemu-ga"], &r["freeze"]["vssd"]);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("freeze window of `vmctl backup` (median of {cycles} cycles, 4 dirty filesystems, TCG guest)");
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>10} {:>14}",
        "agent", "window ms", "freeze ms", "transact. ms", "thaw ms", "guest stall ms"
    );
    for (name, v) in [("qemu-ga", q), ("vssd", s)] {
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
        f(s, "in_guest_ms"),
        f(s, "plan_ms"),
        f(s, "apps_ms"),
        f(s, "fifreeze_ms")
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
        "vssd / qemu-ga: window {:.2}x, guest stall {:.2}x (targets: window <= 0.40x, stall <= 0.25x)",
        r["freeze"]["window_ratio"].as_f64().unwrap(),
        r["freeze"]["stall_ratio"].as_f64().unwrap()
    );
    println!(
        "agent connect → first answer (median of 9): vssd {vssd_first:.1} ms, qemu-ga {qga_first:.1} ms, {:.2}x",
        vssd_first / qga_first
    );
}

/// Rounds of the throughput part: each copies the disks with `qemu-img convert` (+ fsync)
/// and takes a full `vmctl backup` of them, interleaved.
const ROUNDS: usize = 5;

/// Full backups of `vm` against `qemu-img convert` of the same disks (`names`) to the same
/// filesystem, [`ROUNDS`] rounds interleaved. The backup's figures: the copy alone (the
/// jobs), job start → manifest written (copy, fsync, checksums, manifest: what `vmctl` does
/// that `qemu-img convert` + fsync does too), and the whole command (with creating the
/// targets and the freeze). Medians, and every round's ratio to show the swing.
fn throughput(vm: &TestVm, names: &[&str]) -> Value {
    let out_dir = vm.work().join("throughput");
    std::fs::create_dir_all(&out_dir).unwrap();
    let disks: Vec<std::path::PathBuf> =
        names.iter().map(|d| vm.dir().join("disks").join(format!("{d}.qcow2"))).collect();
    let allocated: u64 = disks.iter().map(|d| allocated_bytes(d)).sum();
    let (mut convert_s, mut copy_s, mut job_s, mut whole_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let t = Instant::now();
        for (i, d) in disks.iter().enumerate() {
            let dest = out_dir.join(format!("convert-{round}-{i}.qcow2"));
            tests::run(
                "qemu-img",
                &["convert".as_ref(), "-U".as_ref(), "-O".as_ref(), "qcow2".as_ref(), d.as_os_str(), dest.as_os_str()],
            );
            std::fs::File::open(&dest).unwrap().sync_all().unwrap();
        }
        let conv = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).unwrap();
        settle(&out_dir);
        let target = vm.work().join("throughput-backups");
        let t = Instant::now();
        let v = vm.vmctl_json(&["backup".as_ref(), vm.name.as_ref(), "--target".as_ref(), target.as_os_str()], 0);
        // The command's wall time, less what came before the jobs started (prepare, agent,
        // freeze): job start → manifest written, plus vmctl's exit (so never less than it was).
        let wall = t.elapsed().as_secs_f64();
        let tm = &v["timings"];
        let ms = |k: &str| tm[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}")) / 1000.0;
        let before_jobs = ms("total_ms") - ms("copy_ms") - ms("finish_ms");
        let job = wall - before_jobs;
        assert!(
            v["disks"].as_array().map(|d| d.len()) == Some(names.len()) || v["disks"].is_null(),
            "the backup has every disk: {v}"
        );
        let _ = std::fs::remove_dir_all(&target);
        settle(&out_dir);
        rounds.push(json!({"convert_s": conv, "copy_s": ms("copy_ms"), "job_to_manifest_s": job, "command_s": wall,
                           "fsync_ms": tm["fsync_ms"], "hash_ms": tm["hash_ms"], "finish_ms": tm["finish_ms"],
                           "end_to_end_ratio": conv / job}));
        convert_s.push(conv);
        copy_s.push(ms("copy_ms"));
        job_s.push(job);
        whole_s.push(wall);
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    let mib = allocated as f64 / 1048576.0;
    let (conv, copy, job, whole) =
        (median(&mut convert_s), median(&mut copy_s), median(&mut job_s), median(&mut whole_s));
    json!({"disks": names, "allocated_mib": mib, "rounds": rounds,
           "qemu_img_convert_mib_s": mib / conv,
           "backup_copy_mib_s": mib / copy,
           "backup_end_to_end_mib_s": mib / job,
           "copy_ratio": conv / copy,
           "end_to_end_ratio": conv / job,
           "command_ratio": conv / whole})
}

/// Waits until what the last removal freed is given back to the disk: the filesystem's
/// journal commit (with its discards, on a filesystem mounted `discard`) would otherwise run
/// into the next measured copy, whichever it is (0.4 s on this project's machines after the
/// 2 GiB disk's copies, 20 ms otherwise).
fn settle(dir: &std::path::Path) {
    tests::run("sync", &["-f".as_ref(), dir.as_os_str()]);
}

/// A VM with an extra disk of `gib` GiB, three quarters full of random data (written on the
/// host before the VM starts: the TCG guest would take minutes), and the throughput of a
/// full backup of all its disks.
fn big_disk_throughput(gib: u64, opts: &VmOpts) -> Value {
    let dir = tempfile::Builder::new().prefix("backup-bench-big-").tempdir_in("/tmp").unwrap();
    let raw = dir.path().join("big.raw");
    let img = dir.path().join("big.qcow2");
    let fill_mib = gib * 1024 * 3 / 4;
    eprintln!("backup-bench: a {gib} GiB disk with {fill_mib} MiB of random data");
    let fill = format!("head -c {fill_mib}M /dev/urandom > {0} && truncate -s {gib}G {0}", raw.display());
    tests::run("sh", &["-c", fill.as_str()]);
    tests::run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            img.as_os_str(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    let vm = TestVm::boot("bench-big", VmOpts { extra_disks: vec![("big".into(), img.clone())], ..opts.clone() });
    std::fs::remove_file(&img).unwrap();
    let mut v = throughput(&vm, &["data", "data2", "big"]);
    v["big_disk_gib"] = json!(gib);
    v["big_disk_full_pct"] = json!(75);
    v
}

fn print_throughput(what: &str, t: &Value) {
    let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
    let ratios: Vec<String> = t["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{:.2}", r["end_to_end_ratio"].as_f64().unwrap_or(f64::NAN)))
        .collect();
    println!("\nthroughput, full backup of {:.0} MiB allocated, {what} (median of {ROUNDS})", f("allocated_mib"));
    println!("qemu-img convert + fsync      {:>8.1} MiB/s", f("qemu_img_convert_mib_s"));
    println!("vmctl backup, copy alone      {:>8.1} MiB/s  ratio {:.2}x", f("backup_copy_mib_s"), f("copy_ratio"));
    println!(
        "vmctl backup, job → manifest  {:>8.1} MiB/s  ratio {:.2}x (target >= 1.0x; rounds {})",
        f("backup_end_to_end_mib_s"),
        f("end_to_end_ratio"),
        ratios.join(", ")
    );
    println!(
        "vmctl backup, whole command   ratio {:.2}x (with creating the targets and the freeze)",
        f("command_ratio")
    );
}

/// Allocated bytes of an image (what a copy has to move), from `qemu-img info`.
fn allocated_bytes(p: &std::path::Path) -> u64 {
    let out = tests::run("qemu-img", &["info".as_ref(), "-U".as_ref(), "--output=json".as_ref(), p.as_os_str()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["actual-size"].as_u64().unwrap_or(0)
}
