//! soak: freeze/thaw cycles through vssd with writers on several loop filesystems and apps
//! registered, checking after every cycle that nothing is left frozen, and at the end that
//! vssd's file descriptors, threads and resident memory did not grow.
//!
//! `soak --cycles 10000` is the long mode; the root-tier test `tests/tests/soak.rs` runs a
//! short count. Needs root; touches only the filesystems it creates (a sandbox, vssd scoped to
//! it, deadline 10 s). Exit status 0 when every check held, 1 when one failed (each failure is
//! printed), 2 on bad usage.
//!
//! What is measured, and the allowances: the baseline is taken after `--warmup` cycles (the
//! allocator and tokio's blocking pool settle in the first ones); at the end vssd may have no
//! more file descriptors than at the baseline, at most 4 more threads (tokio's blocking
//! threads live 10 s after their last job), and at most 2 MiB more resident memory; and from
//! the middle of the run to its end resident memory may grow by at most 256 KiB (a flat line:
//! a leak keeps rising, an allocator settles early). RSS is printed every tenth of the run,
//! split into anonymous (heap, stacks: where a leak would show) and file-backed (vssd's code
//! and libc, mapped as they are first run).
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::*;

const FD_ALLOWANCE: i64 = 0;
const THREAD_ALLOWANCE: i64 = 4;
const RSS_ALLOWANCE_KIB: i64 = 2048;
/// From the middle of the run to its end: flat, but for a page or two of allocator slack.
const SECOND_HALF_RSS_ALLOWANCE_KIB: i64 = 256;

struct Opts {
    cycles: usize,
    warmup: usize,
    filesystems: usize,
    apps: usize,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: soak [--cycles 300] [--warmup 30] [--filesystems 3] [--apps 2] [--json]\n\
         Freeze/thaw cycles through a scoped vssd with writers and apps; needs root."
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts { cycles: 300, warmup: 30, filesystems: 3, apps: 2, json: false };
    let mut args = std::env::args().skip(1);
    let num = |a: Option<String>| a.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cycles" => o.cycles = num(args.next()),
            "--warmup" => o.warmup = num(args.next()),
            "--filesystems" => o.filesystems = num(args.next()),
            "--apps" => o.apps = num(args.next()),
            "--json" => o.json = true,
            _ => usage(),
        }
    }
    if o.cycles == 0 || o.filesystems == 0 {
        usage();
    }
    o
}

/// vssd's file descriptors, threads and resident memory (KiB): all of it, and its anonymous
/// (heap, stacks, written data) and file-backed (code, read-only data) parts.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: i64,
    threads: i64,
    rss_kib: i64,
    anon_kib: i64,
    file_kib: i64,
}

fn usage_of(pid: u32) -> Usage {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as i64).unwrap_or(-1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    Usage {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({"fds": u.fds, "threads": u.threads, "rss-kib": u.rss_kib, "anon-kib": u.anon_kib, "file-kib": u.file_kib})
}

/// A writer: small files written and fsynced in a loop (blocked while frozen), rotating
/// through 16 names so the filesystem never fills.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let p = dir.join(format!("soak-{}", i % 16));
            if let Ok(mut f) = std::fs::File::create(&p) {
                let _ = f.write_all(&[0xa5; 16384]);
                let _ = f.sync_data();
                done.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
    })
}

/// An app that holds every freeze; counts PREPAREs and THAWs.
fn app(sock: &Path, name: &str, prepares: Arc<AtomicU64>, thaws: Arc<AtomicU64>) -> thread::JoinHandle<()> {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut send = move |v: Value| {
        let mut b = serde_json::to_vec(&v).unwrap();
        b.push(b'\n');
        w.write_all(&b).is_ok()
    };
    send(json!({"type": "hello", "id": 1, "name": name, "min_version": 1, "max_version": 1}));
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("welcome"), "app {name} not welcomed: {line}");
    thread::spawn(move || loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let m: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let id = m["id"].clone();
        let ok = match m["type"].as_str() {
            Some("prepare") => {
                prepares.fetch_add(1, Ordering::Relaxed);
                send(json!({"type": "ready", "re": id}))
            }
            Some("freeze") => send(json!({"type": "held", "re": id})),
            Some("thaw") => {
                thaws.fetch_add(1, Ordering::Relaxed);
                send(json!({"type": "thawed", "re": id}))
            }
            _ => true,
        };
        if !ok {
            return;
        }
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn stats(v: &mut [f64]) -> Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({"p50": percentile(v, 0.5), "p99": percentile(v, 0.99), "max": v.last().copied().unwrap_or(0.0)})
}

fn main() {
    let o = parse_opts();
    if let Some(why) = root_tier_missing() {
        eprintln!("soak: {why}");
        std::process::exit(1);
    }
    let sb = Sandbox::new("soak");
    let dirs: Vec<PathBuf> = (0..o.filesystems)
        .map(|i| if i % 3 == 2 { sb.xfs(&format!("x{i}")) } else { sb.ext4(&format!("e{i}")) })
        .collect();
    let vssd = Vssd::builder(&sb).deadline(10).start();
    let (prepares, thaws) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let _apps: Vec<_> =
        (0..o.apps).map(|i| app(&sb.app_socket(), &format!("soak-app-{i}"), prepares.clone(), thaws.clone())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = dirs.iter().map(|d| writer(d.clone(), stop.clone(), written.clone())).collect();

    let mut c = vssd.client();
    let mut failures: Vec<String> = Vec::new();
    let (mut freeze_ms, mut thaw_ms) = (Vec::with_capacity(o.cycles), Vec::with_capacity(o.cycles));
    let mut base = usage_of(vssd.pid());
    // RSS (KiB) after the warm-up and then every tenth of the run: a leak is a line that keeps
    // rising, the allocator settling is a step early on and then flat.
    let every = (o.cycles / 10).max(1);
    let mut samples: Vec<(usize, Usage)> = Vec::new();
    let started = Instant::now();
    let n = dirs.len() as u64;
    for cycle in 0..o.warmup + o.cycles {
        if cycle == o.warmup {
            base = usage_of(vssd.pid());
        }
        if cycle >= o.warmup && (cycle - o.warmup).is_multiple_of(every) {
            samples.push((cycle - o.warmup, usage_of(vssd.pid())));
        }
        let t = Instant::now();
        let f = c.call("guest-fsfreeze-freeze", None);
        let fm = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let th = c.call("guest-fsfreeze-thaw", None);
        let tm = t.elapsed().as_secs_f64() * 1e3;
        if f["return"] != json!(n) || th["return"] != json!(n) {
            failures.push(format!("cycle {cycle}: freeze {f}, thaw {th} (expected {n} each)"));
        }
        // Nothing is left frozen: a FIFREEZE of our own on each one succeeds (and is undone).
        for d in &dirs {
            if frozen_by_someone(d) {
                failures.push(format!("cycle {cycle}: {} still frozen after the thaw", d.display()));
                thaw_fully(d);
            }
        }
        if cycle >= o.warmup {
            freeze_ms.push(fm);
            thaw_ms.push(tm);
        }
        if failures.len() > 20 {
            break;
        }
    }
    let took = started.elapsed();
    // Lets the last THAWs reach the apps (threads get an allowance instead of a 10 s wait).
    thread::sleep(Duration::from_millis(200));
    let end = usage_of(vssd.pid());
    samples.push((o.cycles, end));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    let cycles_run = (o.warmup + o.cycles) as u64;
    let (p, t) = (prepares.load(Ordering::Relaxed), thaws.load(Ordering::Relaxed));
    if o.apps > 0 && (p != cycles_run * o.apps as u64 || t != p) {
        failures.push(format!("apps: {p} PREPAREs and {t} THAWs for {cycles_run} cycles of {} apps", o.apps));
    }
    if written.load(Ordering::Relaxed) == 0 {
        failures.push("the writers wrote nothing".into());
    }
    for (what, b, e, allowed) in [
        ("file descriptors", base.fds, end.fds, FD_ALLOWANCE),
        ("threads", base.threads, end.threads, THREAD_ALLOWANCE),
        ("resident memory (KiB)", base.rss_kib, end.rss_kib, RSS_ALLOWANCE_KIB),
    ] {
        if b < 0 || e < 0 || e - b > allowed {
            failures.push(format!("vssd's {what} grew from {b} to {e} (allowed: +{allowed})"));
        }
    }
    let mid_usage = samples.iter().find(|(c, _)| *c >= o.cycles / 2).map(|s| s.1).unwrap_or(end);
    let mid = mid_usage.rss_kib;
    if mid < 0 || end.rss_kib - mid > SECOND_HALF_RSS_ALLOWANCE_KIB {
        failures.push(format!(
            "vssd's resident memory still grew in the second half: {mid} -> {} KiB (allowed: +{SECOND_HALF_RSS_ALLOWANCE_KIB})",
            end.rss_kib
        ));
    }
    let report = json!({
        "cycles": o.cycles,
        "warmup": o.warmup,
        "filesystems": dirs.len(),
        "apps": o.apps,
        "seconds": took.as_secs_f64(),
        "writes": written.load(Ordering::Relaxed),
        "freeze-ms": stats(&mut freeze_ms),
        "thaw-ms": stats(&mut thaw_ms),
        "vssd-start": usage_json(&base),
        "vssd-end": usage_json(&end),
        "rss-kib-middle": mid,
        "anon-kib-middle": mid_usage.anon_kib,
        // [cycle, rss, anonymous, file-backed]
        "rss-kib-samples": samples.iter().map(|(c, u)| json!([c, u.rss_kib, u.anon_kib, u.file_kib])).collect::<Vec<_>>(),
        "failures": failures,
    });
    if o.json {
        println!("{report}");
    } else {
        println!(
            "soak: {} cycles (+{} warm-up) on {} filesystems with {} apps in {:.1} s, {} writes",
            o.cycles,
            o.warmup,
            dirs.len(),
            o.apps,
            took.as_secs_f64(),
            report["writes"]
        );
        for k in ["freeze-ms", "thaw-ms"] {
            let s = &report[k];
            let f = |q: &str| s[q].as_f64().unwrap_or(0.0);
            println!("  {k:<10} p50 {:.2}  p99 {:.2}  max {:.2}", f("p50"), f("p99"), f("max"));
        }
        println!(
            "  vssd       fds {} -> {}   threads {} -> {}   rss {} -> {} KiB (anonymous {} -> {}, file-backed {} -> {})",
            base.fds,
            end.fds,
            base.threads,
            end.threads,
            base.rss_kib,
            end.rss_kib,
            base.anon_kib,
            end.anon_kib,
            base.file_kib,
            end.file_kib
        );
        let line: Vec<String> = samples.iter().map(|(c, u)| format!("{c}:{}", u.rss_kib)).collect();
        println!("  rss KiB by cycle (start, middle {mid}, end {}): {}", end.rss_kib, line.join(" "));
        let line: Vec<String> = samples.iter().map(|(c, u)| format!("{c}:{}/{}", u.anon_kib, u.file_kib)).collect();
        println!("  anonymous/file-backed KiB by cycle: {}", line.join(" "));
        for f in report["failures"].as_array().unwrap() {
            println!("  FAILED: {}", f.as_str().unwrap());
        }
    }
    drop(c);
    drop(vssd);
    drop(sb);
    std::process::exit(if failures.is_empty() { 0 } else { 1 });
}
