//! checkpoint-bench: `vmctl checkpoint create` and `vmctl start --checkpoint` against QEMU's own
//! `migrate` to `exec:cat > FILE` (and `migrate-incoming` from `exec:cat FILE`), in the same run
//! on the same guest, rounds interleaved so that neither gets a quieter machine.
//!
//! The guest (the VM tier's image, TCG) gets its RAM filled with non-zero data first: QEMU
//! sends zero pages as a few bytes each, and a mostly empty guest would measure nothing. Both
//! saves run with the migration bandwidth cap lifted and the VM stopped (what a checkpoint
//! does); vmctl's figures include the BLAKE3 of the stream computed on the way, the overlays'
//! transaction, the manifest and its fsyncs; `cat` gets an fsync of its file reported apart.
//! Needs root (the VM tier).
#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use hostsim::qmp::Qmp;
use hostsim::vm::{PortKind, Vm};
use serde_json::{json, Value};
use tests::vm::{TestVm, VmOpts};

struct Opts {
    memory_mib: u64,
    rounds: usize,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: checkpoint-bench [--memory MIB] [--rounds N] [--json]\n\
         Boots the VM tier's guest with MIB of RAM (default 2048), fills it, and times vmctl's\n\
         checkpoint create and restore against QEMU's migrate to exec:cat. Needs root.\n\
         VSSD_BIN_DIR=target/release picks the release vmctl."
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts { memory_mib: 2048, rounds: 3, json: false };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--memory" => o.memory_mib = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--rounds" => o.rounds = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => o.json = true,
            _ => usage(),
        }
    }
    o
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn wait_completed(q: &mut Qmp, what: &str) -> Value {
    let ev = q
        .wait_event(Duration::from_secs(600), |e| {
            e.name == "MIGRATION" && matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        })
        .expect("QMP")
        .unwrap_or_else(|| panic!("{what}: no end of migration within 600 s"));
    assert_eq!(ev.data["status"], "completed", "{what}: {:?}", ev.data);
    q.execute("query-migrate", None).expect("query-migrate")
}

/// QEMU's own save: stop, migrate to `exec:cat > FILE`, cont. (stream s, downtime s, fsync s, bytes)
fn qemu_save(vm: &TestVm, file: &Path) -> (f64, f64, f64, u64) {
    let _ = std::fs::remove_file(file);
    let mut q = vm.qmp();
    q.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]})))
        .unwrap();
    let old = q.execute("query-migrate-parameters", None).unwrap()["max-bandwidth"].as_u64().unwrap();
    q.execute("migrate-set-parameters", Some(json!({"max-bandwidth": 1u64 << 40}))).unwrap();
    let _ = q.take_events();
    let t0 = Instant::now();
    q.execute("stop", None).unwrap();
    let t1 = Instant::now();
    q.execute("migrate", Some(json!({"uri": format!("exec:cat > {}", file.display())}))).unwrap();
    wait_completed(&mut q, "migrate to exec:cat");
    let stream = t1.elapsed().as_secs_f64();
    // As vmctl does: QEMU refuses `cont` for a moment after it announced the completion.
    while let Err(e) = q.execute("cont", None) {
        assert!(e.to_string().contains("not finalized"), "cont: {e}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let downtime = t0.elapsed().as_secs_f64();
    q.execute("migrate-set-parameters", Some(json!({"max-bandwidth": old}))).unwrap();
    drop(q);
    let t2 = Instant::now();
    std::fs::File::open(file).and_then(|f| f.sync_all()).unwrap();
    (stream, downtime, t2.elapsed().as_secs_f64(), std::fs::metadata(file).unwrap().len())
}

/// QEMU's own restore: QEMU with `-incoming defer`, `migrate-incoming` from `exec:cat FILE`.
/// (launch s, stream s). The QEMU is killed afterwards (its disks are not the checkpoint's).
fn qemu_restore(vm: &TestVm, machine: &str, file: &Path) -> (f64, f64) {
    let v = Vm::open(&vm.state_dir(), &vm.name).unwrap();
    let mut c = v.config.clone();
    c.machine = machine.to_string();
    let rvm = Vm { dir: v.dir.clone(), config: c };
    for p in [rvm.qmp_path(), rvm.agent_path(), rvm.pid_path()] {
        let _ = std::fs::remove_file(p);
    }
    for p in &rvm.config.ports {
        if p.kind == PortKind::Socket {
            let _ = std::fs::remove_file(rvm.port_path(p));
        }
    }
    let accel = Vm::resolve_accel(rvm.config.accel).unwrap();
    let t0 = Instant::now();
    let mut cmd = rvm.command(accel);
    cmd.args(["-incoming", "defer", "-S"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "QEMU -incoming: {}", String::from_utf8_lossy(&out.stderr));
    let mut q = loop {
        if let Ok(q) = Qmp::connect(&rvm.qmp_path(), Duration::from_secs(60)) {
            break q;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "QMP of the incoming QEMU");
        std::thread::sleep(Duration::from_millis(20));
    };
    let launch = t0.elapsed().as_secs_f64();
    q.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]})))
        .unwrap();
    let t1 = Instant::now();
    q.execute("migrate-incoming", Some(json!({"uri": format!("exec:cat {}", file.display())}))).unwrap();
    wait_completed(&mut q, "migrate-incoming from exec:cat");
    let stream = t1.elapsed().as_secs_f64();
    drop(q);
    vm.kill_qemu();
    (launch, stream)
}

#[derive(Default)]
struct Series {
    cat_save_stream: Vec<f64>,
    cat_save_downtime: Vec<f64>,
    cat_save_fsync: Vec<f64>,
    cat_bytes: Vec<f64>,
    ck_save_stream: Vec<f64>,
    ck_save_downtime: Vec<f64>,
    ck_save_total: Vec<f64>,
    ck_save_sync: Vec<f64>,
    ck_save_wall: Vec<f64>,
    ck_bytes: Vec<f64>,
    qemu_downtime: Vec<f64>,
    cat_restore_launch: Vec<f64>,
    cat_restore_stream: Vec<f64>,
    ck_restore_stream: Vec<f64>,
    ck_restore_total: Vec<f64>,
    ck_restore_wall: Vec<f64>,
    live_downtime: Vec<f64>,
    live_stream: Vec<f64>,
    live_bytes: Vec<f64>,
}

fn main() {
    let o = parse_opts();
    if let Some(why) = tests::vm::cannot_run() {
        eprintln!("checkpoint-bench: cannot run: {why}");
        std::process::exit(1);
    }
    let vm = TestVm::boot("ckbench", VmOpts { writers: false, memory_mib: o.memory_mib, ..Default::default() });
    // Non-zero RAM: 64 MiB of random data copied over and over into a tmpfs.
    let fill_mib = o.memory_mib.saturating_sub(400).max(64);
    let t = Instant::now();
    let (code, out) = vm.shell(
        &format!(
            "mount -o remount,size=95% /tmp && dd if=/dev/urandom of=/tmp/seed bs=1M count=64 2>/dev/null && \
             i=1; while [ $i -lt {} ]; do cat /tmp/seed > /tmp/f$i || exit 1; i=$((i+1)); done; free -m",
            fill_mib / 64
        ),
        Duration::from_secs(900),
    );
    assert_eq!(code, 0, "filling the guest's RAM: {out}");
    eprintln!("[bench] filled {fill_mib} MiB of guest RAM in {:.1} s\n{out}", t.elapsed().as_secs_f64());
    let gib = o.memory_mib as f64 / 1024.0;
    let cat_file = vm.work().join("cat.bin");
    let mut s = Series::default();
    for round in 0..o.rounds {
        // Save: QEMU's own, then vmctl's, alternating which goes first.
        let ck_name = format!("r{round}");
        let ck = || {
            let t = Instant::now();
            let v = vm.vmctl_json(&["checkpoint", "create", &vm.name, "--name", &ck_name], 0);
            (v, t.elapsed().as_secs_f64())
        };
        let ((cs, cd, cf, cb), (v, wall)) = if round % 2 == 0 {
            let c = qemu_save(&vm, &cat_file);
            (c, ck())
        } else {
            let k = ck();
            (qemu_save(&vm, &cat_file), k)
        };
        let tm = &v["timings"];
        s.cat_save_stream.push(cs);
        s.cat_save_downtime.push(cd);
        s.cat_save_fsync.push(cf);
        s.cat_bytes.push(cb as f64);
        s.ck_save_stream.push(tm["stream-ms"].as_f64().unwrap() / 1000.0);
        s.ck_save_downtime.push(tm["downtime-ms"].as_f64().unwrap() / 1000.0);
        s.ck_save_sync.push(tm["sync-ms"].as_f64().unwrap() / 1000.0);
        s.ck_save_total.push(tm["total-ms"].as_f64().unwrap() / 1000.0);
        s.qemu_downtime.push(tm["qemu-downtime-ms"].as_f64().unwrap() / 1000.0);
        s.ck_save_wall.push(wall);
        s.ck_bytes.push(v["state-bytes"].as_f64().unwrap());
        eprintln!(
            "[bench] round {round} save: cat stream {cs:.3} s, vmctl stream {:.3} s (total {:.3} s)",
            s.ck_save_stream[round], s.ck_save_total[round]
        );
        // The live variant, for its downtime.
        let live_name = format!("live{round}");
        let lv = vm.vmctl_json(&["checkpoint", "create", &vm.name, "--name", &live_name, "--live"], 0);
        s.live_downtime.push(lv["timings"]["downtime-ms"].as_f64().unwrap() / 1000.0);
        s.live_stream.push(lv["timings"]["stream-ms"].as_f64().unwrap() / 1000.0);
        s.live_bytes.push(lv["state-bytes"].as_f64().unwrap());
        vm.vmctl_json(&["checkpoint", "delete", &vm.name, &live_name], 0);

        // Restore: QEMU's own from the cat file and vmctl's from the checkpoint, alternating
        // which goes first (each starts right after a 2 GiB QEMU was killed). The VM must run
        // again at the end: vmctl's restore, untimed, when it went first.
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(vm.dir().join("checkpoints").join(&ck_name).join("manifest.json")).unwrap(),
        )
        .unwrap();
        let machine = manifest["qemu"]["machine"].as_str().unwrap().to_string();
        vm.kill_qemu();
        let ck_restore = || {
            let t = Instant::now();
            let r = vm.vmctl_json(&["start", &vm.name, "--checkpoint", &ck_name], 0);
            (r, t.elapsed().as_secs_f64())
        };
        let ((rl, rs), (r, wall)) = if round % 2 == 0 {
            let c = qemu_restore(&vm, &machine, &cat_file);
            (c, ck_restore())
        } else {
            let k = ck_restore();
            vm.kill_qemu();
            let c = qemu_restore(&vm, &machine, &cat_file);
            ck_restore();
            (c, k)
        };
        s.cat_restore_launch.push(rl);
        s.cat_restore_stream.push(rs);
        s.ck_restore_stream.push(r["timings"]["stream-ms"].as_f64().unwrap() / 1000.0);
        s.ck_restore_total.push(r["timings"]["total-ms"].as_f64().unwrap() / 1000.0);
        s.ck_restore_wall.push(wall);
        eprintln!(
            "[bench] round {round} restore: cat launch {rl:.3} + stream {rs:.3} s, vmctl stream {:.3} s (total {:.3} s)",
            s.ck_restore_stream[round], s.ck_restore_total[round]
        );
        // The restored VM runs on the checkpoint's images; its state file is no longer needed.
        vm.vmctl_json(&["checkpoint", "delete", &vm.name, &ck_name], 0);
        let _ = std::fs::remove_file(&cat_file);
    }

    let m = |v: &[f64]| median(v);
    let mib = |bytes: f64, secs: f64| bytes / 1048576.0 / secs;
    let save_ratio = m(&s.cat_save_stream) / m(&s.ck_save_stream);
    let save_total_ratio = m(&s.cat_save_stream) / m(&s.ck_save_total);
    let save_durable_ratio = (m(&s.cat_save_stream) + m(&s.cat_save_fsync)) / m(&s.ck_save_total);
    let restore_ratio = m(&s.cat_restore_stream) / m(&s.ck_restore_stream);
    let restore_total_ratio = (m(&s.cat_restore_launch) + m(&s.cat_restore_stream)) / m(&s.ck_restore_total);
    let report = json!({
        "guest-ram-mib": o.memory_mib, "filled-mib": fill_mib, "rounds": o.rounds,
        "cat": {"stream-bytes": m(&s.cat_bytes), "save-stream-s": m(&s.cat_save_stream), "save-downtime-s": m(&s.cat_save_downtime),
                "fsync-s": m(&s.cat_save_fsync), "restore-launch-s": m(&s.cat_restore_launch), "restore-stream-s": m(&s.cat_restore_stream)},
        "vmctl": {"stream-bytes": m(&s.ck_bytes), "save-stream-s": m(&s.ck_save_stream), "save-downtime-s": m(&s.ck_save_downtime),
                  "qemu-downtime-s": m(&s.qemu_downtime), "save-sync-s": m(&s.ck_save_sync), "save-total-s": m(&s.ck_save_total),
                  "save-wall-s": m(&s.ck_save_wall), "restore-stream-s": m(&s.ck_restore_stream), "restore-total-s": m(&s.ck_restore_total),
                  "restore-wall-s": m(&s.ck_restore_wall), "live-downtime-s": m(&s.live_downtime),
                  "live-stream-s": m(&s.live_stream), "live-stream-bytes": m(&s.live_bytes)},
        "ratios": {"save-stream": save_ratio, "save-total-vs-cat-stream": save_total_ratio, "save-total-vs-cat-stream+fsync": save_durable_ratio,
                   "restore-stream": restore_ratio, "restore-total-vs-cat-launch+stream": restore_total_ratio},
    });
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
        return;
    }
    println!(
        "checkpoint-bench: guest RAM {} MiB ({fill_mib} MiB filled), TCG, medians of {} rounds",
        o.memory_mib, o.rounds
    );
    println!("\nSAVE (VM stopped, bandwidth cap lifted)            s     s/GiB RAM   MiB/s of stream");
    let row = |name: &str, secs: f64, bytes: f64| {
        println!("  {name:<46} {secs:6.3}  {:8.3}   {:8.0}", secs / gib, mib(bytes, secs))
    };
    row("QEMU migrate → exec:cat > FILE", m(&s.cat_save_stream), m(&s.cat_bytes));
    row("QEMU migrate → exec:cat, + fsync of FILE", m(&s.cat_save_stream) + m(&s.cat_save_fsync), m(&s.cat_bytes));
    row("vmctl: stream into __sink (BLAKE3 on the way)", m(&s.ck_save_stream), m(&s.ck_bytes));
    row("vmctl checkpoint create, total (fsyncs, manifest)", m(&s.ck_save_total), m(&s.ck_bytes));
    row("vmctl checkpoint create, wall (process)", m(&s.ck_save_wall), m(&s.ck_bytes));
    println!("\nDOWNTIME (guest CPUs stopped)");
    println!("  stop → migrate exec:cat → cont              {:8.3} s", m(&s.cat_save_downtime));
    println!(
        "  vmctl checkpoint create                     {:8.3} s   (QEMU's own final-phase figure {:.3} s)",
        m(&s.ck_save_downtime),
        m(&s.qemu_downtime)
    );
    println!(
        "  vmctl checkpoint create --live              {:8.3} s   (stream {:.3} s, {:.0} MiB/s)",
        m(&s.live_downtime),
        m(&s.live_stream),
        mib(m(&s.live_bytes), m(&s.live_stream))
    );
    println!("\nRESTORE");
    row("QEMU -incoming defer: launch", m(&s.cat_restore_launch), 0.0);
    row("QEMU migrate-incoming ← exec:cat FILE", m(&s.cat_restore_stream), m(&s.cat_bytes));
    row("vmctl: stream from __source (BLAKE3 on the way)", m(&s.ck_restore_stream), m(&s.ck_bytes));
    row("vmctl start --checkpoint, total (checks..cont)", m(&s.ck_restore_total), m(&s.ck_bytes));
    row("vmctl start --checkpoint, wall (process)", m(&s.ck_restore_wall), m(&s.ck_bytes));
    println!("\nRATIOS (vmctl throughput / QEMU's; target ≥ 0.90)");
    println!("  save stream                                 {save_ratio:.2}");
    println!("  save total vs cat stream                    {save_total_ratio:.2}");
    println!("  save total vs cat stream + fsync            {save_durable_ratio:.2}");
    println!("  restore stream                              {restore_ratio:.2}");
    println!("  restore total vs cat launch + stream        {restore_total_ratio:.2}");
}
