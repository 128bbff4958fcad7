//! freeze-bench: vssd against qemu-ga and the raw FIFREEZE floor, on the same filesystems.
//!
//! For 1, 16 and 64 loop-mounted ext4 filesystems (`--counts`) with 64 KiB (`--dirty-kib`) of fresh dirty data in each
//! before every cycle, it measures, as a client sees it, the freeze and the thaw of:
//! raw FIFREEZE all in parallel (the floor), raw FIFREEZE one after another, qemu-ga's
//! `guest-fsfreeze-freeze-list`, and vssd's `guest-fsfreeze-freeze-list`; medians over the
//! cycles, interleaved so that no subject gets a quieter machine. Then each agent's idle
//! resident memory. Needs root; touches only the filesystems it creates (vssd runs scoped,
//! qemu-ga only ever gets the explicit list).
//!
//! `--dbus-compare` measures instead what D-Bus costs a freeze: three vssds on the same
//! filesystems, interleaved the same way: without D-Bus (`--no-dbus`), on a private
//! dbus-daemon, and on a second private dbus-daemon that is SIGSTOPped once vssd owns its name
//! (a hung bus); the ratios to the first are printed.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Opts {
    counts: Vec<usize>,
    /// KiB of new dirty data put in each filesystem before every cycle.
    dirty_kib: Vec<usize>,
    cycles: usize,
    json: bool,
    vssd: PathBuf,
    /// Extra arguments for vssd (e.g. --no-rcu-expedite, to compare).
    vssd_args: Vec<String>,
    /// vssd without D-Bus, with a bus, with a hung bus, instead of the agents and raw FIFREEZE.
    dbus_compare: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: freeze-bench [--counts 1,16,64] [--dirty-kib 64] [--cycles 15] [--json] [--vssd PATH] [--vssd-arg ARG]... [--dbus-compare]\n\
         Measures vssd, qemu-ga and raw FIFREEZE on loop-mounted ext4 filesystems it creates. Needs root.\n\
         --counts x --dirty-kib: every pair (e.g. --counts 16,64 --dirty-kib 1024,10240: the curve).\n\
         --dbus-compare: vssd with --no-dbus, with a private dbus-daemon, and with that bus SIGSTOPped, instead."
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        counts: vec![1, 16, 64],
        dirty_kib: vec![64],
        cycles: 15,
        json: false,
        vssd: default_vssd(),
        vssd_args: vec![],
        dbus_compare: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--counts" => {
                o.counts = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--dirty-kib" => {
                o.dirty_kib = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(|s| s.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--cycles" => o.cycles = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--json" => o.json = true,
            "--dbus-compare" => o.dbus_compare = true,
            "--vssd" => o.vssd = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--vssd-arg" => o.vssd_args.push(args.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    o
}

fn default_vssd() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name("vssd")
}

fn sh(cmd: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().map_err(|e| format!("{}: {e}", cmd[0]))?;
    if !out.status.success() {
        return Err(format!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The loop filesystems; thawed, unmounted and detached on drop, also after a panic.
struct Fleet {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    tmpfs: Vec<PathBuf>,
    children: Vec<Child>,
    dirty_kib: usize,
}

impl Fleet {
    fn new(n: usize, dirty_kib: usize) -> Result<Fleet, String> {
        let dir = PathBuf::from(sh(&["mktemp", "-d", "/tmp/vssd-bench.XXXXXX"])?);
        let mut f = Fleet { dir, mounts: vec![], loops: vec![], tmpfs: vec![], children: vec![], dirty_kib };
        // Sparse images: room for the dirty file twice over (ext4 may keep the old blocks
        // until the new ones are written) and the journal.
        let size = format!("{}M", (64 + 2 * dirty_kib / 1024).max(64));
        std::fs::create_dir_all(f.dir.join("mnt")).map_err(|e| e.to_string())?;
        for i in 0..n {
            let img = f.dir.join(format!("fs{i}.img"));
            let mnt = f.dir.join(format!("mnt/fs{i}"));
            std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
            sh(&["truncate", "-s", &size, img.to_str().unwrap()])?;
            sh(&["mkfs.ext4", "-q", "-F", img.to_str().unwrap()])?;
            let dev = sh(&["losetup", "-f", "--show", img.to_str().unwrap()])?;
            f.loops.push(dev.clone());
            sh(&["mount", &dev, mnt.to_str().unwrap()])?;
            f.mounts.push(mnt);
        }
        Ok(f)
    }

    fn scope(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// `dirty_kib` (default 64 KiB) of new dirty data in every filesystem (not synced: the freeze must write it).
    fn dirty(&self, round: usize) {
        let block = vec![(round % 251) as u8; self.dirty_kib * 1024];
        for m in &self.mounts {
            std::fs::write(m.join("dirty"), &block).expect("write dirty data");
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The last started first: vssd before the bus it talks to.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in &self.mounts {
            let _ = kmod_shim::freeze::thaw_path(m);
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        for t in &self.tmpfs {
            let _ = Command::new("umount").arg(t).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The workspace's QGA client. After connecting, one resynchronised `guest-ping`; the timed
/// exchanges are bare `command`s (no resync round trip), as a host's freeze would be.
struct Qga(qga_wire::Client);

/// How long any one exchange may take.
const LIMIT: Duration = Duration::from_secs(30);

impl Qga {
    fn connect(path: &Path) -> Result<Qga, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match qga_wire::Client::connect(path) {
                Ok(mut c) => {
                    c.execute("guest-ping", None, LIMIT).map_err(|e| tests::chain(&e))?;
                    return Ok(Qga(c));
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(tests::chain(&e)),
            }
        }
    }

    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        self.0.command(cmd, Some(args), LIMIT).map_err(|e| tests::chain(&e))
    }
}

/// A process's memory (KiB) from /proc/PID/smaps_rollup, the same reading for both agents:
/// resident (what `ps` shows), proportional (shared pages split among their users, so libc
/// counts a little) and private (pages only this process has: what it really costs).
#[derive(Clone, Copy)]
struct Mem {
    rss: u64,
    pss: u64,
    private: u64,
}

fn mem_kib(pid: u32) -> Mem {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Mem { rss: field("Rss:"), pss: field("Pss:"), private: field("Private_Clean:") + field("Private_Dirty:") }
}

fn rss_kib(pid: u32) -> u64 {
    mem_kib(pid).rss
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn raw(mounts: &[PathBuf], parallel: bool) -> (Duration, Duration) {
    let t = Instant::now();
    if parallel {
        std::thread::scope(|s| {
            for m in mounts {
                s.spawn(move || kmod_shim::freeze::freeze_path(m).expect("FIFREEZE"));
            }
        });
    } else {
        for m in mounts {
            kmod_shim::freeze::freeze_path(m).expect("FIFREEZE");
        }
    }
    let f = t.elapsed();
    let t = Instant::now();
    if parallel {
        std::thread::scope(|s| {
            for m in mounts {
                s.spawn(move || kmod_shim::freeze::thaw_path(m).expect("FITHAW"));
            }
        });
    } else {
        for m in mounts {
            kmod_shim::freeze::thaw_path(m).expect("FITHAW");
        }
    }
    (f, t.elapsed())
}

fn agent(q: &mut Qga, list: &Value, n: usize) -> Result<(Duration, Duration), String> {
    let t = Instant::now();
    let frozen = q.call("guest-fsfreeze-freeze-list", json!({ "mountpoints": list }))?;
    let f = t.elapsed();
    let t = Instant::now();
    let thawed = q.call("guest-fsfreeze-thaw", json!({}))?;
    let th = t.elapsed();
    // qemu-ga's thaw runs FITHAW on every mount of the machine, so it may count filesystems
    // that another program froze meanwhile; at least ours must be in it.
    if frozen != json!(n) || thawed.as_u64().unwrap_or(0) < n as u64 {
        return Err(format!("expected {n} frozen and thawed, got {frozen} and {thawed}"));
    }
    Ok((f, th))
}

/// A private dbus-daemon that lets root own any name (the bench's own, in `fleet.dir`).
fn private_bus(fleet: &mut Fleet, name: &str) -> Result<(String, u32), String> {
    let socket = fleet.dir.join(format!("{name}.bus"));
    let conf = fleet.dir.join(format!("{name}.conf"));
    let text = format!(
        "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>system</type>\
         <auth>EXTERNAL</auth><listen>unix:path={}</listen><policy context=\"default\"><allow user=\"*\"/>\
         <allow own=\"*\"/><allow send_destination=\"*\"/><allow receive_type=\"*\"/><allow send_type=\"*\"/>\
         </policy></busconfig>\n",
        socket.display()
    );
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--print-address", "--nofork"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start dbus-daemon: {e} (apt-get install dbus-daemon)"))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .map_err(|e| e.to_string())?;
    let pid = child.id();
    fleet.children.push(child);
    Ok((line.trim().to_string(), pid))
}

/// Waits until a vssd owns org.vssd.Agent on `address`.
fn wait_on_bus(address: &str) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(15);
    let args = ["get-property", "org.vssd.Agent", "/org/vssd/Agent", "org.vssd.Agent1", "State"];
    while !Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        if Instant::now() > until {
            return Err(format!("vssd did not appear on the bus {address} in 15 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// vssd without D-Bus, with a bus, with a hung (SIGSTOPped) bus: freeze and thaw medians.
fn run_dbus_compare(o: &Opts, n: usize, dirty_kib: usize) -> Result<Value, String> {
    let mut fleet = Fleet::new(n, dirty_kib)?;
    let state = fleet.dir.join("state");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    sh(&["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "vssd-bench-state", state.to_str().unwrap()])?;
    fleet.tmpfs.push(state.clone());
    let (live, _) = private_bus(&mut fleet, "live")?;
    let (hung, hung_pid) = private_bus(&mut fleet, "hung")?;
    let names = ["no-dbus", "dbus", "hung-dbus"];
    let buses = [None, Some(live.clone()), Some(hung.clone())];
    let mut clients = Vec::new();
    let mut pids = Vec::new();
    for (name, bus) in names.iter().zip(&buses) {
        let sock = fleet.dir.join(format!("vssd-{name}.sock"));
        let st = state.join(name);
        std::fs::create_dir_all(&st).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&o.vssd);
        cmd.args(["--channel", &format!("unix:{}", sock.display())])
            .args(["--scope", fleet.scope().to_str().unwrap()])
            .args(["--freeze-deadline", "20", "--no-control-socket", "--no-apps"])
            .args(["--state-dir", st.to_str().unwrap()])
            .args(&o.vssd_args)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::inherit());
        match bus {
            Some(a) => cmd.args(["--dbus-address", a]),
            None => cmd.arg("--no-dbus"),
        };
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", o.vssd.display()))?;
        pids.push(child.id());
        fleet.children.push(child);
        clients.push(Qga::connect(&sock)?);
    }
    wait_on_bus(&live)?;
    wait_on_bus(&hung)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(hung_pid as i32), nix::sys::signal::Signal::SIGSTOP)
        .map_err(|e| format!("cannot stop the hung bus: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let idle: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let list: Value = fleet.mounts.iter().map(|m| Value::from(m.display().to_string())).collect();
    let mut freeze: Vec<Vec<f64>> = vec![vec![]; names.len()];
    let mut thaw: Vec<Vec<f64>> = vec![vec![]; names.len()];
    for round in 0..=o.cycles {
        for j in 0..names.len() {
            let k = (j + round) % names.len();
            fleet.dirty(round * names.len() + k);
            let (f, t) = agent(&mut clients[k], &list, n)?;
            if round > 0 {
                freeze[k].push(ms(f));
                thaw[k].push(ms(t));
            }
        }
    }
    let f: Vec<f64> = freeze.iter_mut().map(|v| median(v)).collect();
    let t: Vec<f64> = thaw.iter_mut().map(|v| median(v)).collect();
    let mut subjects = serde_json::Map::new();
    for (k, name) in names.iter().enumerate() {
        subjects.insert(name.to_string(), json!({"freeze-ms": f[k], "thaw-ms": t[k]}));
    }
    // The stopped bus must go on again before it is killed with the rest (kill works either way).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(hung_pid as i32), nix::sys::signal::Signal::SIGCONT);
    Ok(json!({
        "filesystems": n,
        "dirty-kib-each": dirty_kib,
        "cycles": o.cycles,
        "median": subjects,
        "ratios": {
            "dbus/no-dbus freeze": f[1] / f[0],
            "hung-dbus/no-dbus freeze": f[2] / f[0],
            "dbus/no-dbus freeze+thaw": (f[1] + t[1]) / (f[0] + t[0]),
            "hung-dbus/no-dbus freeze+thaw": (f[2] + t[2]) / (f[0] + t[0]),
        },
        "rss-kib": {"no-dbus-idle": idle[0], "dbus-idle": idle[1], "hung-dbus-idle": idle[2]},
    }))
}

fn print_dbus_text(r: &Value) {
    let m = &r["median"];
    println!(
        "== D-Bus: {} ext4 filesystems, {} KiB dirty each, median of {} cycles ==",
        r["filesystems"], r["dirty-kib-each"], r["cycles"]
    );
    println!("{:<16} {:>12} {:>10}", "vssd", "freeze ms", "thaw ms");
    for s in ["no-dbus", "dbus", "hung-dbus"] {
        println!("{:<16} {:>12.2} {:>10.2}", s, m[s]["freeze-ms"].as_f64().unwrap(), m[s]["thaw-ms"].as_f64().unwrap());
    }
    let ra = &r["ratios"];
    println!(
        "freeze: dbus/no-dbus {:.3}x   hung-dbus/no-dbus {:.3}x;   freeze+thaw: dbus/no-dbus {:.3}x   hung-dbus/no-dbus {:.3}x",
        ra["dbus/no-dbus freeze"].as_f64().unwrap(),
        ra["hung-dbus/no-dbus freeze"].as_f64().unwrap(),
        ra["dbus/no-dbus freeze+thaw"].as_f64().unwrap(),
        ra["hung-dbus/no-dbus freeze+thaw"].as_f64().unwrap()
    );
    let rss = &r["rss-kib"];
    println!("idle RSS: no-dbus {} KiB, dbus {} KiB\n", rss["no-dbus-idle"], rss["dbus-idle"]);
}

fn run_count(o: &Opts, n: usize, dirty_kib: usize) -> Result<Value, String> {
    if o.dbus_compare {
        return run_dbus_compare(o, n, dirty_kib);
    }
    let mut fleet = Fleet::new(n, dirty_kib)?;
    // vssd's state directory is /run/vssd on a real guest: a tmpfs. Give it one here too.
    let state = fleet.dir.join("state");
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    sh(&["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "vssd-bench-state", state.to_str().unwrap()])?;
    fleet.tmpfs.push(state.clone());
    let sock_v = fleet.dir.join("vssd.sock");
    let sock_q = fleet.dir.join("qga.sock");
    let vssd = Command::new(&o.vssd)
        .args(["--channel", &format!("unix:{}", sock_v.display())])
        .args(["--scope", fleet.scope().to_str().unwrap()])
        .args(["--freeze-deadline", "20", "--no-control-socket"])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(&o.vssd_args)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e} (build it: cargo build --release -p vssd)", o.vssd.display()))?;
    let vpid = vssd.id();
    fleet.children.push(vssd);
    std::fs::create_dir_all(fleet.dir.join("qga-state")).unwrap();
    let qga = Command::new("qemu-ga")
        .args(["-m", "unix-listen", "-p", sock_q.to_str().unwrap()])
        .args(["-t", fleet.dir.join("qga-state").to_str().unwrap()])
        .args(["-f", fleet.dir.join("qga.pid").to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start qemu-ga: {e} (apt-get install qemu-guest-agent)"))?;
    let qpid = qga.id();
    fleet.children.push(qga);
    let mut v = Qga::connect(&sock_v)?;
    let mut q = Qga::connect(&sock_q)?;
    std::thread::sleep(Duration::from_millis(300));
    // Both agents have been connected and have answered (Qga::connect syncs), then idle alike.
    let (mem_v, mem_q) = (mem_kib(vpid), mem_kib(qpid));
    let (idle_v, idle_q) = (mem_v.rss, mem_q.rss);

    let list: Value = fleet.mounts.iter().map(|m| Value::from(m.display().to_string())).collect();
    let names = ["raw-parallel", "raw-sequential", "qemu-ga", "vssd"];
    let mut freeze: Vec<Vec<f64>> = vec![vec![]; 4];
    let mut thaw: Vec<Vec<f64>> = vec![vec![]; 4];
    // One warm-up cycle each, not counted.
    for round in 0..=o.cycles {
        // Rotate who goes first, so no subject always follows the same one.
        for j in 0..names.len() {
            let k = (j + round) % names.len();
            fleet.dirty(round * 4 + k);
            let (f, t) = match k {
                0 => raw(&fleet.mounts, true),
                1 => raw(&fleet.mounts, false),
                2 => agent(&mut q, &list, n)?,
                _ => agent(&mut v, &list, n)?,
            };
            if round > 0 {
                freeze[k].push(ms(f));
                thaw[k].push(ms(t));
            }
        }
    }
    let after_v = rss_kib(vpid);
    let after_q = rss_kib(qpid);
    let f: Vec<f64> = freeze.iter_mut().map(|v| median(v)).collect();
    let t: Vec<f64> = thaw.iter_mut().map(|v| median(v)).collect();
    let mut subjects = serde_json::Map::new();
    for (k, name) in names.iter().enumerate() {
        subjects.insert(name.to_string(), json!({"freeze-ms": f[k], "thaw-ms": t[k]}));
    }
    Ok(json!({
        "filesystems": n,
        "dirty-kib-each": dirty_kib,
        "cycles": o.cycles,
        "median": subjects,
        "ratios": {
            "vssd/qemu-ga freeze": f[3] / f[2],
            "vssd/raw-parallel freeze": f[3] / f[0],
            "vssd/qemu-ga freeze+thaw": (f[3] + t[3]) / (f[2] + t[2]),
        },
        "rss-kib": {"vssd-idle": idle_v, "qemu-ga-idle": idle_q, "vssd-after": after_v, "qemu-ga-after": after_q},
        "idle-kib": {
            "vssd": {"rss": mem_v.rss, "pss": mem_v.pss, "private": mem_v.private},
            "qemu-ga": {"rss": mem_q.rss, "pss": mem_q.pss, "private": mem_q.private},
            "ratios": {
                "rss": mem_v.rss as f64 / mem_q.rss as f64,
                "pss": mem_v.pss as f64 / mem_q.pss as f64,
                "private": mem_v.private as f64 / mem_q.private as f64,
            },
        },
    }))
}

fn main() {
    let o = parse_opts();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("freeze-bench: needs root (loop devices, mount, FIFREEZE)");
        std::process::exit(2);
    }
    let mut results = Vec::new();
    let grid: Vec<(usize, usize)> = o.counts.iter().flat_map(|&n| o.dirty_kib.iter().map(move |&d| (n, d))).collect();
    for &(n, dirty_kib) in &grid {
        match run_count(&o, n, dirty_kib) {
            Ok(r) => {
                if !o.json {
                    if o.dbus_compare {
                        print_dbus_text(&r);
                    } else {
                        print_text(&r);
                    }
                }
                results.push(r);
            }
            Err(e) => {
                eprintln!("freeze-bench: {n} filesystems, {dirty_kib} KiB dirty each: {e}");
                std::process::exit(1);
            }
        }
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&results).unwrap());
    }
}

fn print_text(r: &Value) {
    let m = &r["median"];
    println!(
        "== {} ext4 filesystems, {} KiB dirty each, median of {} cycles ==",
        r["filesystems"], r["dirty-kib-each"], r["cycles"]
    );
    println!("{:<16} {:>12} {:>10}", "subject", "freeze ms", "thaw ms");
    for s in ["raw-parallel", "raw-sequential", "qemu-ga", "vssd"] {
        println!("{:<16} {:>12.2} {:>10.2}", s, m[s]["freeze-ms"].as_f64().unwrap(), m[s]["thaw-ms"].as_f64().unwrap());
    }
    let ra = &r["ratios"];
    println!(
        "vssd/qemu-ga freeze {:.3}x   vssd/raw-parallel freeze {:.3}x   vssd/qemu-ga freeze+thaw {:.3}x",
        ra["vssd/qemu-ga freeze"].as_f64().unwrap(),
        ra["vssd/raw-parallel freeze"].as_f64().unwrap(),
        ra["vssd/qemu-ga freeze+thaw"].as_f64().unwrap()
    );
    let rss = &r["rss-kib"];
    println!(
        "idle RSS: vssd {} KiB, qemu-ga {} KiB (ratio {:.2}); after the cycles: vssd {} KiB, qemu-ga {} KiB\n",
        rss["vssd-idle"],
        rss["qemu-ga-idle"],
        rss["vssd-idle"].as_f64().unwrap() / rss["qemu-ga-idle"].as_f64().unwrap(),
        rss["vssd-after"],
        rss["qemu-ga-after"]
    );
    let m = &r["idle-kib"];
    println!(
        "idle memory (smaps_rollup), vssd / qemu-ga: RSS {} / {} KiB ({:.2}x), PSS {} / {} KiB ({:.2}x), private {} / {} KiB ({:.2}x)\n",
        m["vssd"]["rss"],
        m["qemu-ga"]["rss"],
        m["ratios"]["rss"].as_f64().unwrap_or(f64::NAN),
        m["vssd"]["pss"],
        m["qemu-ga"]["pss"],
        m["ratios"]["pss"].as_f64().unwrap_or(f64::NAN),
        m["vssd"]["private"],
        m["qemu-ga"]["private"],
        m["ratios"]["private"].as_f64().unwrap_or(f64::NAN),
    );
}
