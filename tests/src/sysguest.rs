//! The VM tier's systemd guest: Debian 12 made with debootstrap (`tests/guest/build-debian.sh`),
//! booted with systemd as PID 1 under QEMU through `vmctl`, vssd installed in it as its package
//! installs it (unit, udev rule, tmpfiles.d) and started by udev for the agent port.
//!
//! Invariants (those of [`crate::vm`]): all freezing happens inside the guest; the QEMU a test
//! starts is killed in `Drop` of its [`SysVm`] (also when the test panics, after printing the
//! guest's console and vssd's journal) and its directory under /tmp is removed.
//!
//! The guest has a root shell on the port `org.vssd.shell.0` (`vmtest-shell.service`), spoken
//! to with the protocol of [`crate::vm::TestVm::shell`]; its journal lives in /run, so nothing
//! the tests run writes to a filesystem they froze.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{bin, run_with_limit, Output};

/// The built systemd guest.
#[derive(Debug, Clone)]
pub struct DebianImage {
    /// Directory of the build.
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs that mounts the root disk and starts systemd.
    pub initrd: PathBuf,
    /// The root disk (ext4 "vmroot", no partition table).
    pub root: PathBuf,
    /// Pristine data disks (copied by each VM): `data` (db, logs), `data2` (e3, e4, efi).
    pub disks: Vec<(String, PathBuf)>,
    /// How long debootstrap took when it ran (0: never here, e.g. an old build).
    pub debootstrap_seconds: u64,
}

/// Builds the systemd guest once per process (panics with the builder's output when it fails).
pub fn image() -> &'static DebianImage {
    static G: OnceLock<DebianImage> = OnceLock::new();
    G.get_or_init(|| {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut cmd = Command::new("bash");
        cmd.arg(ws.join("tests/guest/build-debian.sh"));
        let t0 = Instant::now();
        let out = run_with_limit(cmd, Duration::from_secs(1800));
        out.expect_code(0, "tests/guest/build-debian.sh");
        eprintln!("[sysguest] image ready in {:.1} s", t0.elapsed().as_secs_f64());
        let dir = PathBuf::from(out.stdout.lines().last().expect("build-debian.sh prints its directory").trim());
        let env = fs::read_to_string(dir.join("debian.env")).unwrap_or_default();
        let val = |k: &str| {
            env.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_default().trim_matches('"').to_string()
        };
        let disks = val("DISKS")
            .split_whitespace()
            .map(|p| {
                let p = PathBuf::from(p);
                (p.file_stem().unwrap().to_string_lossy().into_owned(), p)
            })
            .collect();
        DebianImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            root: dir.join("root.qcow2"),
            disks,
            debootstrap_seconds: val("DEBOOTSTRAP_SECONDS").parse().unwrap_or(0),
            dir,
        }
    })
}

/// Why the systemd guest cannot run here, if it cannot (builds the image first).
pub fn cannot_run() -> Option<String> {
    if !crate::is_root() {
        return Some(
            "the systemd guest needs root (debootstrap, QEMU): run it as root, e.g. `sudo tests/run-all.sh`".into(),
        );
    }
    if Command::new("debootstrap").arg("--version").output().is_err() {
        return Some("debootstrap is missing: run tests/setup.sh (or apt-get install debootstrap)".into());
    }
    image();
    None
}

/// A running systemd guest.
pub struct SysVm {
    /// Private directory under /tmp: `state/` is vmctl's state dir.
    pub root: PathBuf,
    /// The VM's name.
    pub name: String,
    /// From `vmctl start` to vssd answering `guest-ping` on the host's socket.
    pub boot_to_vssd: Duration,
    /// From `vmctl start` to the test shell answering.
    pub boot_to_shell: Duration,
}

impl SysVm {
    /// Creates the VM (root disk first: /dev/vda; then the data disks), starts it and returns
    /// once vssd answers on the agent socket and the test shell answers.
    pub fn boot(name: &str) -> SysVm {
        let g = image();
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let root = tempfile::Builder::new().prefix(&format!("vssd-vm-{name}-")).tempdir_in("/tmp").unwrap().keep();
        let mut vm = SysVm { root, name: name.into(), boot_to_vssd: Duration::ZERO, boot_to_shell: Duration::ZERO };
        let mut args: Vec<String> = vec![
            "create".into(),
            name.into(),
            "--kernel".into(),
            g.kernel.display().to_string(),
            "--initrd".into(),
            g.initrd.display().to_string(),
            "--append".into(),
            "console=ttyS0 panic=-1 systemd.show_status=1 net.ifnames=0".into(),
            "--import".into(),
            "--memory".into(),
            "768".into(),
            "--cpus".into(),
            "2".into(),
            "--accel".into(),
            "auto".into(),
            "--port".into(),
            "org.vssd.shell.0=socket".into(),
            "--qemu-arg=-no-reboot".into(),
            "--disk".into(),
            format!("root={}", g.root.display()),
        ];
        for (n, p) in &g.disks {
            args.push("--disk".into());
            args.push(format!("{n}={}", p.display()));
        }
        vm.vmctl(&args).expect_code(0, "vmctl create");
        let t0 = Instant::now();
        vm.vmctl(&["start", name]).expect_code(0, "vmctl start");
        let deadline = t0 + Duration::from_secs(300);
        loop {
            if let Ok(mut c) = crate::QgaClient::connect(&vm.agent_path()) {
                c.sync_timeout = Duration::from_secs(2);
                if c.sync().is_ok() && c.execute("guest-ping", None, Duration::from_secs(5)).is_ok() {
                    break;
                }
            }
            assert!(vm.pid().is_some(), "QEMU ended during the boot; console:\n{}", vm.console());
            assert!(
                Instant::now() < deadline,
                "vssd did not answer within 300 s of the boot; console:\n{}",
                vm.console()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        vm.boot_to_vssd = t0.elapsed();
        vm.sh("true");
        vm.boot_to_shell = t0.elapsed();
        // The rest of the boot (the data filesystems among it): "running", or "degraded"
        // with the failed units listed.
        let (_, state) = vm.shell("systemctl is-system-running --wait", Duration::from_secs(240));
        let state = state.trim().to_string();
        if state != "running" {
            let failed = vm.sh("systemctl --failed --no-pager --no-legend || true");
            panic!("the guest's boot ended {state}; failed units:\n{failed}");
        }
        eprintln!(
            "[sysguest] {name}: vssd answered {:.1} s after vmctl start, the test shell {:.1} s, the boot was complete at {:.1} s",
            vm.boot_to_vssd.as_secs_f64(),
            vm.boot_to_shell.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
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

    /// The agent channel's host socket.
    pub fn agent_path(&self) -> PathBuf {
        self.dir().join("agent.sock")
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }

    /// A QMP connection (drop it before running vmctl: QEMU serves one QMP client at a time).
    pub fn qmp(&self) -> hostsim::qmp::Qmp {
        hostsim::qmp::Qmp::connect(&self.qmp_path(), Duration::from_secs(10)).expect("QMP")
    }

    /// The VM's copy of disk `name` (`root`, `data`, `data2`).
    pub fn disk(&self, name: &str) -> PathBuf {
        let want = format!("{name}.qcow2");
        let found = walk(&self.dir()).into_iter().find(|p| {
            p.file_name().is_some_and(|f| f.to_string_lossy() == want) && !p.to_string_lossy().contains("/backups/")
        });
        found.unwrap_or_else(|| panic!("no {want} under {}", self.dir().display()))
    }

    /// A QGA client of vssd on org.qemu.guest_agent.0, in sync.
    pub fn agent(&self) -> crate::QgaClient {
        let path = self.agent_path();
        let mut c = crate::QgaClient::connect(&path)
            .unwrap_or_else(|e| panic!("agent socket {}: {}", path.display(), crate::chain(&e)));
        c.sync_timeout = Duration::from_secs(30);
        c.sync().unwrap_or_else(|e| panic!("agent on {}: {}", path.display(), crate::chain(&e)));
        c.sync_timeout = Duration::from_secs(5);
        c
    }

    /// QEMU's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.dir().join("qemu.pid")).ok()?.trim().parse().ok()?;
        hostsim::vm::alive(pid).then_some(pid)
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir().join("console.log")).unwrap_or_default()
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

    /// Runs a shell command in the guest (dash, as root, in vmtest-shell.service) and returns
    /// (exit code, output).
    pub fn shell(&self, cmd: &str, limit: Duration) -> (i32, String) {
        self.try_shell(cmd, limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`SysVm::shell`] that reports instead of panicking (for Drop).
    pub fn try_shell(&self, cmd: &str, limit: Duration) -> Result<(i32, String), String> {
        crate::vm::shell_at(&self.dir().join("port-org.vssd.shell.0.sock"), cmd, limit)
    }

    /// Runs a guest command that must succeed; returns its output.
    pub fn sh(&self, cmd: &str) -> String {
        let (code, out) = self.shell(cmd, Duration::from_secs(120));
        assert_eq!(code, 0, "guest command `{cmd}` failed ({code}):\n{out}");
        out
    }

    /// Waits up to `limit` for QEMU to end by itself; true if it did.
    pub fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.pid().is_some() {
            crate::vm::reap_qemus();
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        crate::vm::reap_qemus();
        true
    }
}

impl Drop for SysVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ({}):\n{}--- end of console", self.name, self.console());
            if self.pid().is_some() {
                match self.try_shell("journalctl -b --no-pager -n 80 -u vssd -u vmtest-shell", Duration::from_secs(10))
                {
                    Ok((_, log)) => eprintln!("--- vssd's journal:\n{log}--- end of journal"),
                    Err(e) => eprintln!("--- no journal: {e}"),
                }
            }
        }
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            if !hostsim::vm::wait_gone(pid, Duration::from_secs(10)) {
                eprintln!("!!! QEMU {pid} survived SIGKILL for 10 s");
            }
        }
        crate::vm::reap_qemus();
        if std::env::var_os("VSSD_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        } else {
            eprintln!("[sysguest] kept {}", self.root.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The systemd guest as a libvirt domain (TCG) under a [`crate::libvirt::Libvirtd`], for the
/// `virsh` checks against the packaged vssd (tests/tests/vm_systemd_libvirt.rs).
///
/// Invariants: the domain is named `vssd-test-PID-SUFFIX` (the prefix libvirt.rs cleans up
/// after a dead test) and is destroyed and undefined in `Drop`, also when the test panics
/// (after printing the console); its disks are qcow2 overlays in a directory of its own under
/// /tmp, on the pristine images, which QEMU never writes; QEMU runs as root with no
/// relabelling (`<seclabel model='dac' relabel='no'>`), so libvirt chowns no file of the image.
pub struct SysDomain<'a> {
    /// `vssd-test-PID-SUFFIX`.
    pub name: String,
    /// Its files: overlays, console.log, shell.sock, snapshot overlays.
    pub dir: PathBuf,
    _lv: &'a crate::libvirt::Libvirtd,
}

impl<'a> SysDomain<'a> {
    /// Defines the domain (not started): root disk vda, then the data disks.
    pub fn define(lv: &'a crate::libvirt::Libvirtd, suffix: &str) -> SysDomain<'a> {
        let g = image();
        let name = format!("{}{}-{suffix}", crate::libvirt::PREFIX, std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("vssd-libvirt-{}-{suffix}-", std::process::id()))
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let dom = SysDomain { name, dir, _lv: lv };
        let mut disks = String::new();
        let all = std::iter::once(("root".to_string(), g.root.clone())).chain(g.disks.iter().cloned());
        for (i, (n, p)) in all.enumerate() {
            let overlay = dom.dir.join(format!("{n}.qcow2"));
            let mut cmd = Command::new("qemu-img");
            cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(p.canonicalize().unwrap()).arg(&overlay);
            run_with_limit(cmd, Duration::from_secs(60)).expect_code(0, "qemu-img create (overlay)");
            let dev = (b'a' + i as u8) as char;
            disks.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
                 <source file='{}'/>\n      <target dev='vd{dev}' bus='virtio'/>\n    </disk>\n",
                overlay.display()
            ));
        }
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>768</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 net.ifnames=0</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{dir}/shell.sock'/>
      <target type='virtio' name='org.vssd.shell.0'/>
    </channel>
    <serial type='file'>
      <source path='{dir}/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'>
    <label>+0:+0</label>
  </seclabel>
</domain>
",
            name = dom.name,
            kernel = g.kernel.canonicalize().unwrap().display(),
            initrd = g.initrd.canonicalize().unwrap().display(),
            dir = dom.dir.display(),
        );
        let xml_path = dom.dir.join("domain.xml");
        fs::write(&xml_path, xml).unwrap();
        crate::libvirt::virsh(&["define".as_ref(), xml_path.as_os_str()]).expect_code(0, "virsh define");
        dom
    }

    /// Starts the domain; returns once vssd answers a guest-ping through libvirt and the boot
    /// is complete (`systemctl is-system-running --wait`).
    pub fn start(&self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        crate::libvirt::virsh(&["start", &self.name]).expect_code(0, "virsh start");
        let ping = r#"{"execute":"guest-ping"}"#;
        loop {
            let out = crate::libvirt::virsh_with_limit(
                &["qemu-agent-command", &self.name, "--timeout", "5", ping],
                Duration::from_secs(20),
            );
            if out.code == Some(0) {
                break;
            }
            let state = self.state();
            assert!(
                state == "running" && t0.elapsed() < limit,
                "domain {} ({state}): vssd did not answer within {limit:?} (last: {}); console:\n{}",
                self.name,
                out.stderr.trim(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let (_, st) = self.shell("systemctl is-system-running --wait", Duration::from_secs(240));
        assert_eq!(st.trim(), "running", "the guest's boot under libvirt ended {}", st.trim());
        t0.elapsed()
    }

    /// A command in the guest's test shell (as [`SysVm::shell`]).
    pub fn shell(&self, cmd: &str, limit: Duration) -> (i32, String) {
        crate::vm::shell_at(&self.dir.join("shell.sock"), cmd, limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A guest command that must succeed; its output.
    pub fn sh(&self, cmd: &str) -> String {
        let (code, out) = self.shell(cmd, Duration::from_secs(120));
        assert_eq!(code, 0, "guest command `{cmd}` failed ({code}):\n{out}");
        out
    }

    /// `virsh domstate`.
    pub fn state(&self) -> String {
        crate::libvirt::virsh(&["domstate", &self.name]).stdout.trim().to_string()
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

impl Drop for SysDomain<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ({}):\n{}--- end of console", self.name, self.console());
            if let Ok((_, log)) = crate::vm::shell_at(
                &self.dir.join("shell.sock"),
                "journalctl -b --no-pager -n 60 -u vssd",
                Duration::from_secs(10),
            ) {
                eprintln!("--- vssd's journal:\n{log}--- end of journal");
            }
        }
        if self.state() != "shut off" {
            let out = crate::libvirt::virsh(&["destroy", &self.name]);
            if out.code != Some(0) {
                eprintln!("!!! virsh destroy {}: {}", self.name, out.stderr.trim());
            }
        }
        let out = crate::libvirt::virsh(&["undefine", &self.name]);
        if out.code != Some(0) {
            eprintln!("!!! virsh undefine {}: {}", self.name, out.stderr.trim());
        }
        let _ = fs::remove_file(format!("/var/log/libvirt/qemu/{}.log", self.name));
        if std::env::var_os("VSSD_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("[sysguest] kept {}", self.dir.display());
        }
    }
}
