//! Fixtures of the libvirt tests: a running libvirtd (the machine's service, or one started
//! here for the test) and TCG domains built from the VM tier's guest, driven with `virsh` as an
//! admin would.
//!
//! Invariants:
//! - A libvirtd (or virtlogd) this module started is stopped in `Drop` of its [`Libvirtd`];
//!   one that was already running is used and left alone.
//! - Every domain is named `vssd-test-PID-...` and is destroyed and undefined in `Drop` of its
//!   [`Domain`], also when the test panics (the guest's console is printed first). Domains of
//!   an earlier test process that died are removed before a new one is defined.
//! - A domain's files (kernel, initrd, data-disk copies, console) are in a 0755 directory under
//!   /tmp/vssd-libvirt-* of their own: libvirt's dynamic ownership hands them to its QEMU user
//!   (`libvirt-qemu`) and back, and the pristine guest image is never relabelled.
//! - `<domain type='qemu'>`: TCG, as on CI machines without KVM.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::stop_child;
use crate::vm::guest;
use crate::{run_with_limit, Output};

/// The connection every command uses.
pub const URI: &str = "qemu:///system";

/// The prefix of every domain the tests define.
pub const PREFIX: &str = "vssd-test-";

/// `virsh -c qemu:///system ARGS` (60 s limit), whatever its exit code.
pub fn virsh<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    virsh_with_limit(args, Duration::from_secs(60))
}

/// [`virsh`] with another time limit.
pub fn virsh_with_limit<S: AsRef<std::ffi::OsStr>>(args: &[S], limit: Duration) -> Output {
    let mut cmd = Command::new("virsh");
    cmd.arg("-c").arg(URI).args(args);
    run_with_limit(cmd, limit)
}

/// `virsh ARGS` that must succeed; returns what it printed.
pub fn virsh_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = virsh(args);
    let desc =
        format!("virsh {:?}", args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>());
    out.expect_code(0, &desc);
    out.stdout
}

/// What is missing for the libvirt tests, if anything (with the fix).
pub fn cannot_run() -> Option<String> {
    if let Some(why) = crate::vm::cannot_run() {
        return Some(why);
    }
    for (prog, pkg) in [("virsh", "libvirt-clients"), ("libvirtd", "libvirt-daemon"), ("virtlogd", "libvirt-daemon")] {
        if !on_path(prog) {
            return Some(format!(
                "{prog} is missing (Debian package {pkg}): run `bash tests/setup.sh` as root, which installs libvirt-daemon-system"
            ));
        }
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so").exists()
        && !Path::new("/usr/lib/libvirt/connection-driver/libvirt_driver_qemu.so").exists()
    {
        return Some(
            "libvirt's QEMU driver is missing (Debian package libvirt-daemon-driver-qemu): run `bash tests/setup.sh`"
                .into(),
        );
    }
    if let Ok(m) = fs::metadata("/dev/kvm") {
        use std::os::unix::fs::MetadataExt;
        let kvm_gid = fs::read_to_string("/etc/group")
            .ok()
            .and_then(|g| g.lines().find(|l| l.starts_with("kvm:"))?.split(':').nth(2)?.parse::<u32>().ok());
        let for_qemu_user = m.mode() & 0o006 == 0o006 || (Some(m.gid()) == kvm_gid && m.mode() & 0o060 == 0o060);
        if !for_qemu_user {
            return Some(
                "/dev/kvm is root's alone (no udev here): libvirtd, whose QEMU runs as libvirt-qemu (group kvm), then \
                 probes QEMU again for nearly every command (30 s each): run `bash tests/setup.sh` (it gives /dev/kvm \
                 to the group kvm, mode 0660, as udev does)"
                    .into(),
            );
        }
    }
    None
}

/// Fails the test (never returns early) unless libvirt and the VM tier can run here.
#[macro_export]
macro_rules! require_libvirt {
    () => {
        if let Some(why) = $crate::libvirt::cannot_run() {
            panic!("this libvirt test cannot run here ({} line {}): {}", module_path!(), line!(), why);
        }
    };
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file())).unwrap_or(false)
}

/// A libvirtd that answers on [`URI`]: the machine's, or ones this fixture started.
pub struct Libvirtd {
    /// Daemons started here (name, process), stopped in reverse order in `Drop`.
    started: Vec<(&'static str, Child)>,
    /// Logs of the daemons started here.
    pub log_dir: PathBuf,
}

impl Libvirtd {
    /// Uses the running libvirtd, or starts virtlogd and libvirtd (not daemonized: children of
    /// this process, their stderr in `log_dir`) and waits until `virsh version` answers.
    pub fn ensure() -> Libvirtd {
        let log_dir = tempfile::Builder::new().prefix("vssd-libvirtd-").tempdir_in("/tmp").unwrap().keep();
        let mut lv = Libvirtd { started: Vec::new(), log_dir };
        if virsh_with_limit(&["version"], Duration::from_secs(10)).code == Some(0) {
            eprintln!("[libvirt] using the running libvirtd");
            lv.remove_stale_domains();
            return lv;
        }
        // Without systemd nothing socket-activates virtlogd; libvirtd's QEMU driver needs it
        // for the domain's log and its file chardevs (stdio_handler = "logd").
        if !Path::new("/run/libvirt/virtlogd-sock").exists() {
            lv.spawn("virtlogd", &[]);
            lv.wait_for(Duration::from_secs(20), "virtlogd's socket /run/libvirt/virtlogd-sock", || {
                Path::new("/run/libvirt/virtlogd-sock").exists()
            });
        }
        lv.spawn("libvirtd", &[]);
        lv.wait_for(Duration::from_secs(60), "`virsh -c qemu:///system version`", || {
            virsh_with_limit(&["version"], Duration::from_secs(10)).code == Some(0)
        });
        eprintln!(
            "[libvirt] started {}",
            lv.started.iter().map(|(n, c)| format!("{n} ({})", c.id())).collect::<Vec<_>>().join(", ")
        );
        lv.remove_stale_domains();
        lv
    }

    fn spawn(&mut self, prog: &'static str, args: &[&str]) {
        let log = fs::File::create(self.log_dir.join(format!("{prog}.log"))).unwrap();
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {prog}: {e}: run `bash tests/setup.sh`"));
        self.started.push((prog, child));
    }

    fn wait_for(&mut self, limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if ok() {
                return;
            }
            let log_dir = &self.log_dir;
            for (name, child) in &mut self.started {
                if let Some(st) = child.try_wait().ok().flatten() {
                    let log = fs::read_to_string(log_dir.join(format!("{name}.log"))).unwrap_or_default();
                    panic!("{name} exited ({st}) before {what} answered; its log:\n{log}");
                }
            }
            if Instant::now() > deadline {
                panic!("{what} did not answer within {limit:?}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A started daemon's log so far.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The logs of every daemon started here.
    pub fn logs(&self) -> String {
        self.started.iter().map(|(n, _)| format!("--- {n}:\n{}", self.log(n))).collect()
    }

    /// True when this fixture started libvirtd (rather than using the machine's).
    pub fn started_here(&self) -> bool {
        !self.started.is_empty()
    }

    /// Destroys and undefines `vssd-test-PID-*` domains whose test process is gone.
    fn remove_stale_domains(&self) {
        let out = virsh(&["list", "--all", "--name"]);
        for name in out.stdout.lines().map(str::trim).filter(|n| n.starts_with(PREFIX)) {
            let pid: Option<i32> = name[PREFIX.len()..].split('-').next().and_then(|p| p.parse().ok());
            if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                continue;
            }
            eprintln!("[libvirt] removing the stale domain {name}");
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name, "--checkpoints-metadata", "--snapshots-metadata"]);
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if std::thread::panicking() && self.started_here() {
            eprintln!("--- logs of the daemons started by the test:\n{}--- end of logs", self.logs());
        }
        while let Some((name, mut child)) = self.started.pop() {
            if stop_child(&mut child, Duration::from_secs(15)).is_none() {
                eprintln!("!!! {name} ({}) survived SIGTERM and SIGKILL", child.id());
            }
        }
        let _ = fs::remove_dir_all(&self.log_dir);
    }
}

/// How to build a domain from the test guest.
#[derive(Debug, Clone)]
pub struct DomainOpts {
    /// `vmtest.agent=`: `vssd` or `qemu-ga`.
    pub agent: &'static str,
    /// The NIC's MAC address (user-mode networking, virtio).
    pub mac: &'static str,
    /// vCPUs.
    pub cpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// `vmtest.writers=1`: the guest's writers run (records and SQLite, acked on org.vssd.acks.0).
    pub writers: bool,
    /// An extra disk of this many MiB of random data (`bulk.qcow2`, the last disk): something
    /// for a copy to be timed on.
    pub bulk_mib: u64,
}

impl Default for DomainOpts {
    fn default() -> Self {
        DomainOpts { agent: "vssd", mac: "52:54:00:56:53:01", cpus: 1, memory_mib: 512, writers: false, bulk_mib: 0 }
    }
}

/// A defined (and, after [`Domain::start`], running) domain of the test guest.
pub struct Domain<'a> {
    /// Its name, `vssd-test-PID-SUFFIX`.
    pub name: String,
    /// Its files: kernel, initrd, disk copies, console.log, acks.log.
    pub dir: PathBuf,
    /// The daemon it runs under, which must outlive it.
    _lv: &'a Libvirtd,
}

impl<'a> Domain<'a> {
    /// Copies the guest's files into a directory of the domain's and defines it (not started).
    pub fn define(lv: &'a Libvirtd, suffix: &str, opts: &DomainOpts) -> Domain<'a> {
        let g = guest();
        let name = format!("{PREFIX}{}-{suffix}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("vssd-libvirt-{}-{suffix}-", std::process::id()))
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        // libvirt's QEMU runs as libvirt-qemu: it must reach the files (dynamic_ownership
        // chowns the files themselves, not the directories above them).
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let dom = Domain { name, dir, _lv: lv };
        for (from, to) in [(&g.kernel, "vmlinuz"), (&g.initrd, "initrd.img")] {
            fs::copy(from, dom.dir.join(to)).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        }
        let mut disks = String::new();
        for (i, (n, p)) in g.disks.iter().enumerate() {
            let copy = dom.dir.join(format!("{n}.qcow2"));
            fs::copy(p, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
            let dev = (b'a' + i as u8) as char;
            disks.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
                 <source file='{}'/>\n      <target dev='vd{dev}' bus='virtio'/>\n      <serial>vssd-{n}</serial>\n    </disk>\n",
                copy.display()
            ));
        }
        if opts.bulk_mib > 0 {
            let raw = dom.dir.join("bulk.raw");
            let mut cmd = Command::new("dd");
            cmd.arg("if=/dev/urandom")
                .arg(format!("of={}", raw.display()))
                .arg("bs=1M")
                .arg(format!("count={}", opts.bulk_mib));
            run_with_limit(cmd, Duration::from_secs(300)).expect_code(0, "dd of the bulk disk");
            let copy = dom.dir.join("bulk.qcow2");
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&copy);
            run_with_limit(cmd, Duration::from_secs(300)).expect_code(0, "qemu-img convert of the bulk disk");
            let _ = fs::remove_file(&raw);
            let dev = (b'a' + g.disks.len() as u8) as char;
            disks.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
                 <source file='{}'/>\n      <target dev='vd{dev}' bus='virtio'/>\n    </disk>\n",
                copy.display()
            ));
        }
        let cmdline = format!(
            "console=ttyS0 quiet panic=-1 vmtest.agent={} vmtest.writers={} vmtest.interval=5",
            opts.agent,
            u8::from(opts.writers)
        );
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel>
    <initrd>{dir}/initrd.img</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <interface type='user'>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='file'>
      <source path='{dir}/acks.log'/>
      <target type='virtio' name='org.vssd.acks.0'/>
    </channel>
    <serial type='file'>
      <source path='{dir}/console.log'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
            name = dom.name,
            mem = opts.memory_mib,
            cpus = opts.cpus,
            dir = dom.dir.display(),
            mac = opts.mac,
        );
        let xml_path = dom.dir.join("domain.xml");
        fs::write(&xml_path, xml).unwrap();
        virsh(&["define".as_ref(), xml_path.as_os_str()]).expect_code(0, "virsh define");
        dom
    }

    /// A domain someone else defined (vmctl's `backup restore --as-vm`) whose files are in
    /// `dir`: destroyed, undefined and its directory removed on drop, like the others.
    pub fn adopt(lv: &'a Libvirtd, name: &str, dir: PathBuf) -> Domain<'a> {
        Domain { name: name.to_string(), dir, _lv: lv }
    }

    /// Starts the domain; returns once the guest's init said "ready" and the agent answers a
    /// guest-ping through libvirt.
    pub fn start(&self, limit: Duration) {
        let t0 = Instant::now();
        self.start_no_agent(limit);
        let deadline = t0 + limit;
        let ping = r#"{"execute":"guest-ping"}"#;
        loop {
            let out =
                virsh_with_limit(&["qemu-agent-command", &self.name, "--timeout", "5", ping], Duration::from_secs(20));
            if out.code == Some(0) {
                break;
            }
            self.check_booting(
                deadline,
                limit,
                &format!("the agent answered guest-ping (last: {})", out.stderr.trim()),
            );
        }
        eprintln!("[libvirt] {} booted in {:.1} s", self.name, t0.elapsed().as_secs_f64());
    }

    /// Starts the domain; returns once the guest's init said "ready" (for a guest without an
    /// agent: `vmtest.agent=none`).
    pub fn start_no_agent(&self, limit: Duration) {
        let t0 = Instant::now();
        virsh(&["start", &self.name]).expect_code(0, "virsh start");
        let deadline = t0 + limit;
        while !fs::read_to_string(self.dir.join("acks.log")).unwrap_or_default().lines().any(|l| l == "ready") {
            self.check_booting(deadline, limit, "the guest's init said \"ready\"");
        }
    }

    fn check_booting(&self, deadline: Instant, limit: Duration, what: &str) {
        let state = self.state();
        if state != "running" || Instant::now() > deadline {
            panic!("domain {} ({state}): not ready within {limit:?}: waited until {what}", self.name);
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    /// `virsh domstate`: `running`, `shut off`, ...
    pub fn state(&self) -> String {
        virsh(&["domstate", &self.name]).stdout.trim().to_string()
    }

    /// Waits until the domain is in `state`; false when it is not within `limit`.
    pub fn wait_state(&self, state: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.state() == state {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The guest's serial console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The writers' acknowledgements so far (see [`crate::vm::parse_acks`]).
    pub fn acks(&self) -> Vec<crate::vm::Ack> {
        crate::vm::parse_acks(&fs::read_to_string(self.dir.join("acks.log")).unwrap_or_default())
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
                "{}: writer {writer} did not ack {n} records within {limit:?}: {:?}",
                self.name,
                self.last_acks()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// libvirt's log of the domain's QEMU.
    pub fn qemu_log(&self) -> String {
        fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", self.name)).unwrap_or_default()
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- guest console ({}):\n{}--- end of console", self.name, self.console());
            eprintln!("--- libvirt's QEMU log ({}):\n{}--- end of QEMU log", self.name, self.qemu_log());
        }
        if self.state() != "shut off" {
            let out = virsh(&["destroy", &self.name]);
            if out.code != Some(0) {
                eprintln!("!!! virsh destroy {}: {}", self.name, out.stderr.trim());
            }
        }
        // Backups leave libvirt checkpoints: their metadata goes with the domain.
        let out = virsh(&["undefine", &self.name, "--checkpoints-metadata", "--snapshots-metadata"]);
        if out.code != Some(0) {
            eprintln!("!!! virsh undefine {}: {}", self.name, out.stderr.trim());
        }
        let _ = fs::remove_file(format!("/var/log/libvirt/qemu/{}.log", self.name));
        if std::env::var_os("VSSD_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("[libvirt] kept {}", self.dir.display());
        }
    }
}

/// `vmctl --connect URI ARGS` (10 min limit), whatever its exit code.
pub fn vmctl_at<S: AsRef<std::ffi::OsStr>>(uri: &str, args: &[S]) -> Output {
    let mut cmd = Command::new(crate::cmd::bin("vmctl"));
    cmd.env_remove("VMCTL_CONNECT").arg("--connect").arg(uri).args(args);
    run_with_limit(cmd, Duration::from_secs(600))
}

/// `vmctl --connect URI ARGS --json`, expecting `code`; the JSON it printed.
pub fn vmctl_json_at<S: AsRef<std::ffi::OsStr>>(uri: &str, args: &[S], code: i32) -> serde_json::Value {
    let mut cmd = Command::new(crate::cmd::bin("vmctl"));
    cmd.env_remove("VMCTL_CONNECT").arg("--connect").arg(uri).args(args).arg("--json");
    let desc = format!("{cmd:?}");
    let out = run_with_limit(cmd, Duration::from_secs(600));
    out.expect_code(code, &desc);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{desc} printed no JSON ({e}):\n{}\n{}", out.stdout, out.stderr))
}

/// libvirtd's RPC reached over TCP on loopback: a relay from `127.0.0.1:PORT` to libvirtd's
/// unix socket, so that `qemu+tcp://127.0.0.1:PORT/system` is a remote connection (libvirt's
/// TCP transport, as to another host) to the daemon the test runs, which listens on no TCP
/// port itself. The relay connects as root, so libvirtd applies its unix socket's auth (none
/// for root). It stops with the test process.
pub struct TcpRelay {
    /// The URI to use.
    pub uri: String,
}

impl TcpRelay {
    /// Listens on an ephemeral loopback port and relays every connection.
    pub fn start() -> TcpRelay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let Ok(u) = std::os::unix::net::UnixStream::connect("/run/libvirt/libvirt-sock") else { continue };
                let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                let (mut c, mut u) = (c, u);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c, &mut u);
                    let _ = u.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        TcpRelay { uri: format!("qemu+tcp://127.0.0.1:{port}/system") }
    }
}

/// The rows of a virsh table (`domfsinfo`, `domifaddr`): the lines after the `----` rule, split
/// on runs of blanks. Empty cells at the end of a row are missing from it.
pub fn parse_table(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("---"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// The `key : value` lines of `virsh guestinfo` (and `domtime`'s `Time: N`), in order.
pub fn parse_fields(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table_reads_the_rows_after_the_rule() {
        let t = " Mountpoint   Name   Type   Target\n------------------------------------\n /data/db     vda1   ext4   vda\n /data/e4     vdb2   ext4   \n\n";
        assert_eq!(parse_table(t), vec![vec!["/data/db", "vda1", "ext4", "vda"], vec!["/data/e4", "vdb2", "ext4"]]);
    }

    #[test]
    fn parse_fields_splits_at_the_first_colon() {
        let t = "user.count          : 1\nif.0.addr.1.addr    : fe80::5054:ff:fe56:5301\n";
        assert_eq!(
            parse_fields(t),
            vec![("user.count".into(), "1".into()), ("if.0.addr.1.addr".into(), "fe80::5054:ff:fe56:5301".into())]
        );
    }
}
