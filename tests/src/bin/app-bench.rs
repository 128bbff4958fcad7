//! app-bench: how long vssd takes to get N applications to hold a freeze, and to tell them all
//! to thaw, for N = 1, 100, 1000; next to qemu-ga's way of involving applications, its
//! fsfreeze hook running one script per application, measured on the same filesystem.
//!
//! The apps are N connections served by one poll loop in this process (answering at once), so
//! the figures are vssd's fan-out, not the apps' own work. Needs root; makes one loop ext4.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

fn sh(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", cmd[0]));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Setup {
    dir: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    dev: String,
    children: Vec<Child>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = kmod_shim::freeze::thaw_path(&self.mnt);
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("umount").arg(&self.state).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup() -> Setup {
    let dir = PathBuf::from(sh(&["mktemp", "-d", "/tmp/vssd-appbench.XXXXXX"]));
    let mnt = dir.join("mnt/data");
    let state = dir.join("state");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let img = dir.join("data.img");
    sh(&["truncate", "-s", "64M", img.to_str().unwrap()]);
    sh(&["mkfs.ext4", "-q", "-F", img.to_str().unwrap()]);
    let dev = sh(&["losetup", "-f", "--show", img.to_str().unwrap()]);
    let s = Setup { dir, mnt, state, dev, children: vec![] };
    sh(&["mount", &s.dev, s.mnt.to_str().unwrap()]);
    sh(&["mount", "-t", "tmpfs", "-o", "size=1m", "appbench-state", s.state.to_str().unwrap()]);
    s
}

fn connect(path: &Path) -> UnixStream {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("connect {}: {e}", path.display()),
        }
    }
}

/// The workspace's QGA client, on a stream of which this bench keeps a second handle to poll:
/// it serves the apps on the same thread and must learn when vssd's reply is there.
struct Qga {
    c: qga_wire::Client,
    poll: UnixStream,
}

impl Qga {
    fn new(path: &Path) -> Qga {
        let s = connect(path);
        let poll = s.try_clone().unwrap();
        let mut c = qga_wire::Client::from_stream(s).unwrap_or_else(|e| panic!("{}", tests::chain(&e)));
        c.set_timeout(Duration::from_secs(60));
        Qga { c, poll }
    }
    fn send(&mut self, cmd: &str, args: Value) {
        self.c.send(&json!({"execute": cmd, "arguments": args})).unwrap_or_else(|e| panic!("{}", tests::chain(&e)));
    }
    fn recv(&mut self) -> Value {
        let v = self.c.read_reply().unwrap_or_else(|e| panic!("{}", tests::chain(&e))).value;
        v.get("return").cloned().unwrap_or_else(|| panic!("error: {v}"))
    }
    fn call(&mut self, cmd: &str, args: Value) -> Value {
        self.send(cmd, args);
        self.recv()
    }
}

/// N registered apps answering at once, on one thread.
struct Apps {
    conns: Vec<(UnixStream, Vec<u8>)>,
}

impl Apps {
    fn register(socket: &Path, n: usize) -> Apps {
        let mut conns = Vec::with_capacity(n);
        for i in 0..n {
            let mut s = connect(socket);
            let hello =
                json!({"type": "hello", "id": 1, "name": format!("bench{i}"), "min_version": 1, "max_version": 1});
            s.write_all(format!("{hello}\n").as_bytes()).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert!(l.contains("welcome"), "{l}");
            s.set_nonblocking(true).unwrap();
            conns.push((s, Vec::new()));
        }
        Apps { conns }
    }

    /// Answers PREPARE and FREEZE for up to `limit`; returns early, with the instant of the
    /// last one, once every app got a THAW.
    fn serve_until_all_thawed(&mut self, limit: Duration) -> Option<Instant> {
        self.serve(limit, None).1
    }

    /// Answers apps until every app got THAW, `limit` passes, or `wake` becomes readable
    /// (true in the first field then).
    fn serve(&mut self, limit: Duration, wake: Option<&UnixStream>) -> (bool, Option<Instant>) {
        let n = self.conns.len();
        let mut thawed = vec![false; n];
        let mut left = n;
        let end = Instant::now() + limit;
        let mut last = None;
        while left > 0 && Instant::now() < end {
            let ready: Vec<usize> = {
                let mut fds: Vec<PollFd> =
                    self.conns.iter().map(|(s, _)| PollFd::new(s.as_fd(), PollFlags::POLLIN)).collect();
                if let Some(w) = wake {
                    fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
                }
                let wait = end.saturating_duration_since(Instant::now()).as_millis().min(200) as u16;
                if poll(&mut fds, PollTimeout::from(wait)).unwrap_or(0) == 0 {
                    continue;
                }
                if wake.is_some() && fds[n].revents().is_some_and(|r| !r.is_empty()) {
                    return (true, None);
                }
                fds.iter()
                    .enumerate()
                    .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(i, _)| i)
                    .collect()
            };
            for i in ready {
                let (s, buf) = &mut self.conns[i];
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk) {
                    Ok(0) => panic!("vssd closed app {i}"),
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    Err(_) => continue,
                }
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let m: Value = serde_json::from_slice(&line).unwrap();
                    let reply = match m["type"].as_str() {
                        Some("prepare") => json!({"type": "ready", "re": m["id"]}),
                        Some("freeze") => json!({"type": "held", "re": m["id"]}),
                        Some("thaw") => {
                            if !thawed[i] {
                                thawed[i] = true;
                                left -= 1;
                                last = Some(Instant::now());
                            }
                            continue;
                        }
                        _ => continue,
                    };
                    s.set_nonblocking(false).unwrap();
                    s.write_all(format!("{reply}\n").as_bytes()).unwrap();
                    s.set_nonblocking(true).unwrap();
                }
            }
        }
        (false, if left == 0 { last } else { None })
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn vssd_bin() -> PathBuf {
    std::env::current_exe().unwrap().with_file_name("vssd")
}

fn run_vssd(n: usize, cycles: usize) -> (f64, f64, f64, f64) {
    let mut s = setup();
    let chan = s.dir.join("qga.sock");
    let child = Command::new(vssd_bin())
        .args(["--channel", &format!("unix:{}", chan.display())])
        .args(["--scope", s.dir.join("mnt").to_str().unwrap()])
        .args(["--state-dir", s.state.to_str().unwrap(), "--no-control-socket", "--freeze-deadline", "30"])
        .args(["--hooks-dir", s.dir.join("no-hooks").to_str().unwrap(), "--app-max-per-uid", "5000"])
        .env("RUST_LOG", std::env::var("APP_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .expect("start vssd (cargo build --release -p vssd)");
    s.children.push(child);
    let mut q = Qga::new(&chan);
    let mut apps = Apps::register(&s.state.join("appvss.sock"), n);
    let (mut total, mut held, mut thaw_reply, mut fanout) = (vec![], vec![], vec![], vec![]);
    for _ in 0..cycles {
        // The apps answer from this thread, so the request goes out and the apps are served
        // while vssd works; the reply is read after.
        let t0 = Instant::now();
        q.send("vssd-freeze", json!({}));
        // Serve PREPARE/FREEZE until the reply is there: one poll over the apps and the channel.
        let chan = q.poll.try_clone().unwrap();
        let (woke, _) = apps.serve(Duration::from_secs(60), Some(&chan));
        assert!(woke, "no reply to vssd-freeze within 60 s");
        let report = q.recv();
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        if std::env::var_os("APP_BENCH_DEBUG").is_some() {
            eprintln!(
                "client {:.2} vssd elapsed {} plan {} bytes {}",
                t0.elapsed().as_secs_f64() * 1e3,
                report["elapsed-ms"],
                report["plan-ms"],
                report.to_string().len()
            );
        }
        let max_freeze = report["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["freeze-ms"].as_f64().unwrap_or(f64::NAN))
            .fold(0.0, f64::max);
        let max_prep = report["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["prepare-ms"].as_f64().unwrap_or(f64::NAN))
            .fold(0.0, f64::max);
        assert!(report["apps"].as_array().unwrap().iter().all(|a| a["outcome"] == "held"), "not all held: {report}");
        held.push(max_prep + max_freeze);
        let t1 = Instant::now();
        q.send("vssd-thaw", json!({}));
        let last = apps.serve_until_all_thawed(Duration::from_secs(30)).expect("every app gets THAW");
        q.recv();
        thaw_reply.push(t1.elapsed().as_secs_f64() * 1e3);
        fanout.push((last - t1).as_secs_f64() * 1e3);
    }
    (median(&mut total), median(&mut held), median(&mut fanout), median(&mut thaw_reply))
}

/// qemu-ga with its fsfreeze hook running one (empty) script per application, the way
/// qemu-ga lets applications in: freeze and thaw of the same single filesystem.
fn run_qga(n: usize, cycles: usize) -> (f64, f64) {
    let mut s = setup();
    let d = s.dir.join("hook.d");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..n {
        let p = d.join(format!("{i:04}-app"));
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // What Debian's /etc/qemu/fsfreeze-hook does: run every script in the directory in turn.
    let hook = s.dir.join("fsfreeze-hook");
    std::fs::write(&hook, format!("#!/bin/sh\nfor f in {}/*; do \"$f\" \"$@\" || exit 1; done\n", d.display()))
        .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chan = s.dir.join("qemu-ga.sock");
    std::fs::create_dir_all(s.dir.join("qga-state")).unwrap();
    let child = Command::new("qemu-ga")
        .args(["-m", "unix-listen", "-p", chan.to_str().unwrap()])
        .args(["-t", s.dir.join("qga-state").to_str().unwrap(), "-f", s.dir.join("qga.pid").to_str().unwrap()])
        .arg(format!("--fsfreeze-hook={}", hook.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-ga (apt-get install qemu-guest-agent)");
    s.children.push(child);
    let mut q = Qga::new(&chan);
    let list = json!({"mountpoints": [s.mnt.to_str().unwrap()]});
    let (mut f, mut t) = (vec![], vec![]);
    for _ in 0..cycles {
        let t0 = Instant::now();
        q.call("guest-fsfreeze-freeze-list", list.clone());
        f.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        q.call("guest-fsfreeze-thaw", json!({}));
        t.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    (median(&mut f), median(&mut t))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("app-bench: needs root (loop device, mount, FIFREEZE)");
        std::process::exit(2);
    }
    let mut counts = vec![1usize, 100, 1000];
    let mut cycles = 7;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--counts" => counts = args.next().unwrap().split(',').map(|x| x.parse().unwrap()).collect(),
            "--cycles" => cycles = args.next().unwrap().parse().unwrap(),
            _ => {
                eprintln!("usage: app-bench [--counts 1,100,1000] [--cycles 7]");
                std::process::exit(2);
            }
        }
    }
    println!("median of {cycles} cycles; 1 loop ext4; apps answer at once from one thread");
    println!(
        "{:>6} | {:>16} {:>18} {:>16} {:>14} | {:>20} {:>14} | {:>8}",
        "apps",
        "vssd freeze ms",
        "to all held ms",
        "thaw fan-out ms",
        "thaw reply ms",
        "qemu-ga+hooks frz ms",
        "its thaw ms",
        "ratio"
    );
    for n in counts {
        let (total, held, fanout, thaw) = run_vssd(n, cycles);
        let (qf, qt) = run_qga(n, cycles.min(3));
        println!(
            "{n:>6} | {total:>16.2} {held:>18.2} {fanout:>16.2} {thaw:>14.2} | {qf:>20.2} {qt:>14.2} | {:>8.3}",
            total / qf
        );
    }
    println!("(to all held = slowest PREPARE answer + slowest HELD, as vssd timed them; ratio = vssd freeze / qemu-ga freeze with one hook script per app)");
}
