//! Fixtures of the VM tier: a real guest (Debian kernel, busybox initramfs, vssd or qemu-ga,
//! writers) under QEMU, driven by `vmctl` as an admin would.
//!
//! Invariants:
//! - All freezing happens inside the guest; nothing here freezes a host filesystem.
//! - Every QEMU a test starts is killed in `Drop` of its [`TestVm`] (also when the test
//!   panics), and its directory under /tmp is removed; on a panic the guest's console and the
//!   agent's log are printed first.
//! - VM tests run one at a time (a process-wide lock): the machine has 2 cores, and two TCG
//!   guests at once would only make both slow and their timings meaningless.
//!
//! The guest image is built once per test process by `tests/guest/build.sh` into
//! `$CARGO_TARGET_DIR/guest` (kept between runs while its inputs do not change).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, run_with_limit, Output};

/// Fails the test (never returns early: a test that cannot run must not pass) unless the VM
/// tier can run here: root, QEMU, a guest image. Every VM-tier test is also
/// `#[ignore = "vm tier: ..."]`.
#[macro_export]
macro_rules! require_vm {
    () => {
        if let Some(why) = $crate::vm::cannot_run() {
            panic!("this VM-tier test cannot run here ({} line {}): {}", module_path!(), line!(), why);
        }
    };
}

/// Why the VM tier cannot run here, if it cannot. Builds the guest image first (once per
/// process; a failed build panics with the builder's output).
pub fn cannot_run() -> Option<String> {
    if !crate::is_root() {
        return Some(
            "the VM tier needs root (loop devices to check backups, apt for the guest image): run it as root, \
             e.g. `sudo tests/run-all.sh`"
                .into(),
        );
    }
    // The builder installs QEMU and the rest from Debian's packages when they are missing.
    guest();
    if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        return Some(
            "qemu-system-x86_64 is missing: run tests/setup.sh (or bash tests/guest/build.sh --install)".into(),
        );
    }
    None
}

/// The built guest.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// Directory of the build.
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Pristine data disks (copied by each VM).
    pub disks: Vec<(String, PathBuf)>,
}

/// Builds the guest once per process (panics with the builder's output when it fails).
pub fn guest() -> &'static GuestImage {
    static G: OnceLock<GuestImage> = OnceLock::new();
    G.get_or_init(|| {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut cmd = Command::new("bash");
        cmd.arg(ws.join("tests/guest/build.sh")).arg("--install");
        let out = run_with_limit(cmd, Duration::from_secs(1200));
        out.expect_code(0, "tests/guest/build.sh");
        let dir = PathBuf::from(out.stdout.lines().last().expect("build.sh prints its output directory").trim());
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            disks: vec![("data".into(), dir.join("data.qcow2")), ("data2".into(), dir.join("data2.qcow2"))],
            dir,
        }
    })
}

/// How to boot a test VM.
#[derive(Debug, Clone)]
pub struct VmOpts {
    /// `vssd`, `qemu-ga` or `none` (the port exists, nobody answers).
    pub agent: &'static str,
    /// Start the writers at boot.
    pub writers: bool,
    /// Pause between records of the plain writers.
    pub interval_ms: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// Give the VM an agent channel at all.
    pub agent_channel: bool,
    /// Extra kernel command line.
    pub append: String,
    /// A virtio-net NIC on QEMU's user network, MAC [`GUEST_MAC`]: the guest's eth0, up with
    /// 10.0.2.15/24 and a default route, an IPv6 link-local address and the site-local one QEMU's
    /// router advertisement gives (fec0::/64); [`TestVm::boot`] returns once it is there, so
    /// that the addresses do not change under a test.
    pub nic: bool,
    /// A second agent port, [`QGA1_PORT`], served by a real qemu-ga in the guest (whatever
    /// `agent` serves the first one); reach it with [`TestVm::qemu_ga`].
    pub qemu_ga_port: bool,
    /// Each data disk gets the serial `vmtest-NAME` (`data`, `data2`), and the guest's init
    /// writes it to udev's database as udev would (`ID_SERIAL`), where both agents read it.
    pub serials: bool,
    /// More disks (`NAME`, image to import), after the guest's data disks: the guest does not
    /// mount them; for host-side work such as backup-bench's big disk.
    pub extra_disks: Vec<(String, PathBuf)>,
}

/// The MAC address of the guest's NIC ([`VmOpts::nic`]).
pub const GUEST_MAC: &str = "52:54:00:76:6d:74";
/// The guest's IPv4 address on its NIC (QEMU's user network).
pub const GUEST_IPV4: &str = "10.0.2.15";
/// The name of the second agent port ([`VmOpts::qemu_ga_port`]).
pub const QGA1_PORT: &str = "org.qemu.guest_agent.1";

impl Default for VmOpts {
    fn default() -> Self {
        VmOpts {
            agent: "vssd",
            writers: true,
            interval_ms: 5,
            cpus: 2,
            memory_mib: 512,
            agent_channel: true,
            append: String::new(),
            nic: false,
            qemu_ga_port: false,
            serials: false,
            extra_disks: Vec::new(),
        }
    }
}

fn vm_lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running guest and everything the test made for it.
pub struct TestVm {
    /// Private directory under /tmp: `state/` is vmctl's state dir, `work/` is the test's.
    pub root: PathBuf,
    /// The VM's name.
    pub name: String,
    /// One VM at a time per process (test threads take turns); `None` for a VM booted with
    /// [`TestVm::boot_beside`], which runs under its companion's turn.
    _lock: Option<MutexGuard<'static, ()>>,
}

/// One acknowledged record of a guest writer.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// Writer name (`db`, `logs`, `e3`, `e4`: the filesystem; `sqlite`).
    pub writer: String,
    /// Record number.
    pub n: u64,
    /// Write + fdatasync latency, µs (0 for the SQLite writer).
    pub lat_us: u64,
    /// Guest monotonic time of completion, µs.
    pub done_us: u64,
}

/// The longest stall a plain writer felt among `acks` (its write + fdatasync, ms; the SQLite
/// writer reports none): what the benchmarks call the guest write stall.
pub fn longest_stall_ms(acks: &[Ack]) -> f64 {
    acks.iter().filter(|a| a.writer != "sqlite").map(|a| a.lat_us as f64 / 1000.0).fold(0.0, f64::max)
}

impl TestVm {
    /// Starts `vmctl backup VM --bandwidth 1 --json` (1 MiB/s: there is a "mid-backup") and
    /// returns once its target images exist, i.e. past the preparation. Output is piped.
    #[allow(clippy::zombie_processes)] // returned to the caller, which kills and waits for it
    pub fn start_slow_backup(&self) -> std::process::Child {
        let mut child = Command::new(bin("vmctl"))
            .env("VMCTL_STATE_DIR", self.state_dir())
            .args(["backup", self.name.as_str(), "--bandwidth", "1", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let partial = partial_backups(&self.backups());
            if partial.len() == 1 && self.backups().join(&partial[0]).join("data2.qcow2").exists() {
                return child;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the backup never started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates the VM with `vmctl create` (disks imported from the built guest) and starts it
    /// with `vmctl start`; returns once the guest's init said "ready".
    pub fn boot(name: &str, opts: VmOpts) -> TestVm {
        let lock = vm_lock();
        TestVm::boot_with(name, opts, Some(lock))
    }

    /// [`TestVm::boot`] of a second VM while `self` runs, under `self`'s turn of the
    /// one-VM-at-a-time lock (which a second `boot` in this thread would wait for forever):
    /// for a benchmark that has two guests take turns, pausing one. Drop it before `self`.
    pub fn boot_beside(&self, name: &str, opts: VmOpts) -> TestVm {
        TestVm::boot_with(name, opts, None)
    }

    fn boot_with(name: &str, opts: VmOpts, lock: Option<MutexGuard<'static, ()>>) -> TestVm {
        let g = guest();
        // QEMU daemonizes; as a subreaper this process inherits it, so that a killed QEMU is
        // reaped here at once instead of lingering as a zombie `pgrep qemu-system` still sees.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let root = tempfile::Builder::new().prefix(&format!("vssd-vm-{name}-")).tempdir_in("/tmp").unwrap().keep();
        fs::create_dir_all(root.join("work")).unwrap();
        let vm = TestVm { root, name: name.to_string(), _lock: lock };
        let append = format!(
            "console=ttyS0 quiet panic=-1 vmtest.agent={} vmtest.writers={} vmtest.interval={} {}",
            opts.agent,
            if opts.writers { 1 } else { 0 },
            opts.interval_ms,
            opts.append
        );
        let mut args: Vec<String> = vec![
            "create".into(),
            name.into(),
            "--kernel".into(),
            g.kernel.display().to_string(),
            "--initrd".into(),
            g.initrd.display().to_string(),
            "--append".into(),
            append,
            "--import".into(),
            "--memory".into(),
            opts.memory_mib.to_string(),
            "--cpus".into(),
            opts.cpus.to_string(),
            "--accel".into(),
            "auto".into(),
            "--port".into(),
            "org.vssd.shell.0=socket".into(),
            "--port".into(),
            "org.vssd.acks.0=file".into(),
            "--qemu-arg=-no-reboot".into(),
        ];
        for (n, p) in g.disks.iter().chain(&opts.extra_disks) {
            args.push("--disk".into());
            args.push(format!("{n}={}", p.display()));
        }
        if !opts.agent_channel {
            args.push("--no-agent".into());
        }
        if opts.nic {
            for a in ["-netdev", "user,id=net0", "-device", &format!("virtio-net-pci,netdev=net0,mac={GUEST_MAC}")] {
                args.push(format!("--qemu-arg={a}"));
            }
        }
        if opts.serials {
            for (n, _) in &g.disks {
                args.push("--qemu-arg=-set".into());
                args.push(format!("--qemu-arg=device.vd-{n}.serial=vmtest-{n}"));
            }
        }
        if opts.qemu_ga_port {
            args.push("--port".into());
            args.push(format!("{QGA1_PORT}=socket"));
        }
        vm.vmctl(&args).expect_code(0, "vmctl create");
        let t0 = Instant::now();
        vm.vmctl(&["start", name]).expect_code(0, "vmctl start");
        vm.wait_ready(Duration::from_secs(90));
        if opts.nic {
            // /proc/net/if_inet6: address, index, prefix length, scope (20: link, 40: site,
            // 00: global), flags, name. (No `exit` here: it would end the guest's shell.)
            let has = "awk '$6 == \"eth0\" && $4 != \"20\" {f=1} END {exit !f}' /proc/net/if_inet6";
            let (code, out) = vm.shell(
                &format!(
                    "i=0; while ! {has} && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done; \
                     {has} || {{ cat /proc/net/if_inet6; false; }}"
                ),
                Duration::from_secs(30),
            );
            assert_eq!(code, 0, "eth0 got no IPv6 address from QEMU's router advertisement within 10 s:\n{out}");
        }
        reap_qemus();
        eprintln!("[vm] {name} booted in {:.1} s", t0.elapsed().as_secs_f64());
        vm
    }

    /// vmctl's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The VM's directory.
    pub fn dir(&self) -> PathBuf {
        self.state_dir().join(&self.name)
    }

    /// A scratch directory of the test.
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }

    /// The agent channel's host socket.
    pub fn agent_path(&self) -> PathBuf {
        self.dir().join("agent.sock")
    }

    /// The host socket of the second agent port ([`VmOpts::qemu_ga_port`]).
    pub fn qemu_ga_path(&self) -> PathBuf {
        self.dir().join(format!("port-{QGA1_PORT}.sock"))
    }

    /// A QGA client of the agent on org.qemu.guest_agent.0 ([`TestVm::agent_path`]), in sync.
    pub fn agent(&self) -> crate::QgaClient {
        connect_agent(&self.agent_path())
    }

    /// A QGA client of the guest's qemu-ga on the second agent port ([`VmOpts::qemu_ga_port`]),
    /// in sync (it may take a few seconds after "ready" to start).
    pub fn qemu_ga(&self) -> crate::QgaClient {
        connect_agent(&self.qemu_ga_path())
    }

    /// The default backup directory.
    pub fn backups(&self) -> PathBuf {
        self.dir().join("backups")
    }

    /// QEMU's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.dir().join("qemu.pid")).ok()?.trim().parse().ok()?;
        hostsim::vm::alive(pid).then_some(pid)
    }

    /// Runs `vmctl ARGS` with this VM's state dir (10 min limit).
    pub fn vmctl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new(bin("vmctl"));
        cmd.env("VMCTL_STATE_DIR", self.state_dir()).args(args);
        run_with_limit(cmd, Duration::from_secs(600))
    }

    /// Runs `vmctl ARGS --json`, expects `code`, returns the JSON it printed.
    pub fn vmctl_json<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], code: i32) -> Value {
        let mut cmd = Command::new(bin("vmctl"));
        cmd.env("VMCTL_STATE_DIR", self.state_dir()).args(args).arg("--json");
        let desc = format!("{cmd:?}");
        let out = run_with_limit(cmd, Duration::from_secs(600));
        out.expect_code(code, &desc);
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{desc} printed no JSON ({e}):\n{}\n{}", out.stdout, out.stderr))
    }

    /// Waits until the guest's init says "ready" (after a boot, e.g. `vmctl start --force-boot`).
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if fs::read_to_string(self.acks_path()).unwrap_or_default().lines().any(|l| l == "ready") {
                return;
            }
            if self.pid().is_none() || Instant::now() > deadline {
                panic!(
                    "the guest did not get ready within {limit:?} (QEMU {}); console:\n{}",
                    if self.pid().is_some() { "running" } else { "gone" },
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn acks_path(&self) -> PathBuf {
        self.dir().join("port-org.vssd.acks.0.log")
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir().join("console.log")).unwrap_or_default()
    }

    /// Every ack so far.
    pub fn acks(&self) -> Vec<Ack> {
        parse_acks(&fs::read_to_string(self.acks_path()).unwrap_or_default())
    }

    /// The highest acked record per writer.
    pub fn last_acks(&self) -> std::collections::BTreeMap<String, u64> {
        let mut m = std::collections::BTreeMap::new();
        for a in self.acks() {
            let e = m.entry(a.writer).or_insert(0);
            *e = (*e).max(a.n);
        }
        m
    }

    /// Waits until `writer` has acked at least `n` records.
    pub fn wait_acks(&self, writer: &str, n: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.last_acks().get(writer).copied().unwrap_or(0) < n {
            assert!(
                Instant::now() < deadline,
                "writer {writer} did not ack {n} records within {limit:?}; acks: {:?}",
                self.last_acks()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a shell command in the guest (busybox sh, as root) and returns (exit code, output).
    pub fn shell(&self, cmd: &str, limit: Duration) -> (i32, String) {
        self.try_shell(cmd, limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TestVm::shell`] that reports instead of panicking (for Drop).
    pub fn try_shell(&self, cmd: &str, limit: Duration) -> Result<(i32, String), String> {
        shell_at(&self.dir().join("port-org.vssd.shell.0.sock"), cmd, limit)
    }

    /// Runs a guest command that must succeed; returns its output.
    pub fn sh(&self, cmd: &str) -> String {
        let (code, out) = self.shell(cmd, Duration::from_secs(120));
        assert_eq!(code, 0, "guest command `{cmd}` failed ({code}):\n{out}");
        out
    }

    /// Stops the guest's vCPUs (QMP `stop`): it uses no CPU and its clocks stand still until
    /// [`TestVm::resume`], so a benchmark can take turns between two guests.
    pub fn pause(&self) {
        self.qmp().execute("stop", None).expect("QMP stop");
    }

    /// Starts the vCPUs again (QMP `cont`).
    pub fn resume(&self) {
        self.qmp().execute("cont", None).expect("QMP cont");
    }

    /// A QMP connection (drop it before running vmctl: QEMU serves one QMP client at a time).
    pub fn qmp(&self) -> hostsim::qmp::Qmp {
        hostsim::qmp::Qmp::connect(&self.qmp_path(), Duration::from_secs(10)).expect("QMP")
    }

    /// SIGKILL to QEMU.
    pub fn kill_qemu(&self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            if !hostsim::vm::wait_gone(pid, Duration::from_secs(10)) {
                eprintln!("!!! QEMU {pid} survived SIGKILL for 10 s");
            }
        }
        self.reap();
    }

    /// Reaps every QEMU process of ours that ended: we are a subreaper, so QEMU's daemon and
    /// the intermediate process of its double fork are our children. Only QEMU processes:
    /// other children belong to their `Child` handles.
    pub fn reap(&self) {
        reap_qemus();
    }

    /// The guest's freeze status as the agent reports it (`vmctl fsstatus`).
    pub fn fsstatus(&self) -> String {
        let v = self.vmctl_json(&["fsstatus", &self.name], 0);
        v["status"].as_str().unwrap_or("?").to_string()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ({}):\n{}--- end of console", self.name, self.console());
            if self.pid().is_some() {
                match self.try_shell(
                    "tail -n 40 /run/vssd.log /run/qemu-ga.log /run/qemu-ga1.log /run/writer.log /run/sqlite.log \
                     /run/vssd-hv.log /run/hv-emu.log /run/messages 2>/dev/null",
                    Duration::from_secs(5),
                ) {
                    Ok((_, log)) => eprintln!("--- guest logs:\n{log}--- end of guest logs"),
                    Err(e) => eprintln!("--- no guest logs: {e}"),
                }
            }
        }
        self.kill_qemu();
        // Anything the test mounted under its directory (a full-disk target) goes first.
        if let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") {
            let root = self.root.to_str().unwrap().to_string();
            let mut mps: Vec<&str> =
                mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)).collect();
            mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mps {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        if std::env::var_os("VSSD_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        } else {
            eprintln!("[vm] kept {}", self.root.display());
        }
    }
}

/// Connects to an agent's host socket and syncs (up to 30 s: the agent may still be starting).
fn connect_agent(path: &Path) -> crate::QgaClient {
    let mut c = crate::QgaClient::connect(path)
        .unwrap_or_else(|e| panic!("agent socket {}: {}", path.display(), crate::chain(&e)));
    c.sync_timeout = Duration::from_secs(30);
    c.sync().unwrap_or_else(|e| panic!("agent on {}: {}", path.display(), crate::chain(&e)));
    c.sync_timeout = Duration::from_secs(5);
    c
}

/// The `.partial-*` directories (backups in progress, or left by a vmctl that died) in `dir`.
pub fn partial_backups(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".partial"))
                .collect()
        })
        .unwrap_or_default()
}

/// Reaps ended QEMU children of this process (see [`TestVm::reap`]).
pub fn reap_qemus() {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let me = std::process::id().to_string();
    let Ok(rd) = fs::read_dir("/proc") else { return };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = &stat[open + 1..close];
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if comm.starts_with("qemu-system") && rest.first() == Some(&"Z") && rest.get(1) == Some(&me.as_str()) {
            let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Parses the acks port's log.
pub fn parse_acks(text: &str) -> Vec<Ack> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() >= 5 && f[0] == "ack" {
                Some(Ack {
                    writer: f[1].to_string(),
                    n: f[2].parse().ok()?,
                    lat_us: f[3].parse().ok()?,
                    done_us: f[4].parse().ok()?,
                })
            } else {
                None
            }
        })
        .collect()
}

/// The payload of record `n` of the plain writer (the same function as tests/guest/writer.rs).
pub fn payload(n: u64) -> String {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let a = z ^ (z >> 31);
    format!("{a:016x}{:016x}", a.rotate_left(17) ^ n)
}

/// Checks a plain writer's `records.log`: every line whole and right, numbered 1, 2, 3, ...
/// A torn last line (a write the freeze cut in half) would be an error: a consistent copy
/// has none. Returns the last record number.
pub fn check_records(path: &Path) -> u64 {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut last = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.unwrap_or_else(|e| panic!("{} line {}: {e}", path.display(), i + 1));
        let want = format!("rec {} {}", last + 1, payload(last + 1));
        assert_eq!(line, want, "{} line {}: torn or wrong record", path.display(), i + 1);
        last += 1;
    }
    last
}

/// `sqlite3 DB SQL` on the host.
pub fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("run sqlite3 (apt-get install sqlite3)");
    assert!(out.status.success(), "sqlite3 {} {sql}: {}", db.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Leftover QEMU processes started from a test directory (there must be none after a test).
pub fn stray_qemus() -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "qemu-system"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    out.unwrap_or_default().lines().filter(|l| l.contains("/tmp/vssd-vm-")).map(String::from).collect()
}

/// Runs `cmd` through a guest's test shell whose port is the host socket `path` (the protocol
/// of [`TestVm::shell`]: the command, then an `echo` of a unique marker and its exit code;
/// the output up to the marker is the command's). Waits up to `limit` for the socket and the
/// command; returns (exit code, output) or why it could not.
pub fn shell_at(path: &Path, cmd: &str, limit: Duration) -> Result<(i32, String), String> {
    let deadline = Instant::now() + limit;
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("cannot reach the guest shell at {}: {e}", path.display())),
        }
    };
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let marker = format!("__vmt_done_{}_", SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let script = format!("{{ {cmd}\n}} </dev/null 2>&1; echo \"{marker}$?\"\n");
    s.write_all(script.as_bytes()).map_err(|e| format!("send to the guest shell: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("the guest shell closed; output so far:\n{}", String::from_utf8_lossy(&out))),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("reading the guest shell: {e}")),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some(i) = text.find(&marker) {
            let rest = &text[i + marker.len()..];
            if let Some(end) = rest.find('\n') {
                let code = rest[..end].trim().parse().unwrap_or(-1);
                return Ok((code, text[..i].to_string()));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("guest command `{cmd}` did not finish within {limit:?}; output so far:\n{text}"));
        }
    }
}
