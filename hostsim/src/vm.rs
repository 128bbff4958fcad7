//! VMs that vmctl launches: a directory per VM under the state directory, a TOML config, and
//! QEMU started daemonized with a QMP socket and the agent's virtio-serial channel.
//!
//! Layout of `STATE_DIR/NAME/`: `vm.toml` (the config), `qmp.sock`, `agent.sock` (host side of
//! the virtio-serial port `org.qemu.guest_agent.0`), `qemu.pid`, `console.log` (the serial
//! console), `port-NAME.sock|.log` for extra ports, `disks/` for disks imported at create time,
//! `backups/` (the default backup target).
//!
//! Invariant: a VM is "running" only when its pid file names a live QEMU whose command line
//! holds this VM's QMP socket path, so a recycled pid is never mistaken for the VM.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::qmp::{Qmp, QmpError};

/// Where VMs live unless `--state-dir` / `VMCTL_STATE_DIR` say otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vmctl";
/// The virtio-serial port name guest agents listen on.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";
/// The checkpoint `vmctl suspend` writes and `vmctl resume` consumes (its directory under
/// `checkpoints/` is what makes a VM suspended).
pub const SUSPEND_CHECKPOINT: &str = "suspend";

/// Errors of VM lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No such VM.
    #[error("no VM named `{name}` in {dir} (`vmctl list` shows the VMs; `vmctl create` makes one)")]
    NotFound {
        /// The name.
        name: String,
        /// The state directory.
        dir: String,
    },
    /// The name is taken.
    #[error("a VM named `{0}` exists already (`vmctl delete`-style removal: stop it and remove its directory)")]
    Exists(String),
    /// Bad name.
    #[error("bad VM name `{0}`: use letters, digits, '-', '_' and '.' (not first)")]
    BadName(String),
    /// The config file is broken.
    #[error("cannot read the VM config {path}: {msg}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        msg: String,
    },
    /// Running already.
    #[error("VM `{0}` is running already (pid {1})")]
    Running(String, i32),
    /// Not running.
    #[error("VM `{0}` is not running (`vmctl start {0}`)")]
    NotRunning(String),
    /// QEMU would not start.
    #[error("QEMU did not start VM `{name}`: {msg}")]
    Start {
        /// The VM.
        name: String,
        /// QEMU's complaint.
        msg: String,
    },
    /// KVM asked for but unusable.
    #[error("KVM is not usable here ({0}); use `--accel tcg` (software emulation) or `--accel auto`")]
    NoKvm(String),
    /// File system trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// QMP trouble.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// Which accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when usable, TCG otherwise.
    #[default]
    Auto,
    /// KVM (fails when unusable).
    Kvm,
    /// Software emulation.
    Tcg,
}

/// A disk of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskConfig {
    /// Its name: the QEMU node name and the name of its files in backups.
    pub name: String,
    /// The image; relative paths are relative to the VM directory.
    pub path: PathBuf,
    /// Image format (qcow2 is needed for incremental backups' persistent bitmaps).
    #[serde(default = "default_format")]
    pub format: String,
}

/// Files vmctl makes hold a VM's disks and RAM: they are created owner-only whatever the
/// umask. While this guard lives the process umask also masks group and others, so the files
/// that QEMU, qemu-img and vmctl's helpers create on vmctl's behalf (QMP and channel sockets,
/// logs, pid file, backup targets, overlays, migration streams) are owner-only from the start.
#[must_use = "the umask goes back when the guard drops"]
pub struct PrivateUmask(nix::sys::stat::Mode);

/// The umask with group and others masked, until the guard drops.
pub fn private_umask() -> PrivateUmask {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o077));
    // Keep what the user masked already (e.g. 0o277), add group and others.
    umask(old | Mode::from_bits_truncate(0o077));
    PrivateUmask(old)
}

impl Drop for PrivateUmask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

/// Creates `dir` and its missing parents with mode 0700 (an existing one is left alone).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Files and directories under `dir` (itself included, 3 levels down) that users other than
/// the owner and its group can read, with their modes: `backup verify` and `checkpoint list`
/// warn about them.
pub fn readable_by_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(p: &Path, depth: usize, out: &mut Vec<(PathBuf, u32)>) {
        let Ok(md) = std::fs::symlink_metadata(p) else { return };
        if md.file_type().is_symlink() {
            return;
        }
        let mode = md.permissions().mode() & 0o7777;
        if mode & 0o004 != 0 {
            out.push((p.to_path_buf(), mode));
        }
        if md.is_dir() && depth > 0 {
            if let Ok(rd) = std::fs::read_dir(p) {
                let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                entries.sort();
                for e in entries {
                    walk(&e, depth - 1, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 3, &mut out);
    out
}

/// One warning line for what [`readable_by_others`] found, or None.
pub fn exposure_warning(dir: &Path) -> Option<String> {
    let found = readable_by_others(dir);
    let (first, mode) = found.first()?;
    Some(format!(
        "{} file(s) or directories under {} can be read by other users (e.g. {} mode {:o}): \
         they hold disk or RAM contents; chmod -R go-rwx {}",
        found.len(),
        dir.display(),
        first.display(),
        mode,
        dir.display()
    ))
}

fn default_format() -> String {
    "qcow2".into()
}

/// How an extra virtio-serial port is connected on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// A unix socket `port-NAME.sock` (QEMU listens).
    Socket,
    /// Everything the guest writes goes to `port-NAME.log`.
    File,
}

/// An extra virtio-serial port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PortConfig {
    /// The port's name as the guest sees it.
    pub name: String,
    /// Socket or file.
    pub kind: PortKind,
}

/// `vm.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmConfig {
    /// The VM's name (also its directory's).
    pub name: String,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Virtual CPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// auto, kvm or tcg.
    #[serde(default)]
    pub accel: Accel,
    /// QEMU machine type.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// Direct kernel boot: the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Direct kernel boot: the initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Direct kernel boot: the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Serve the guest agent's port `org.qemu.guest_agent.0` on `agent.sock`.
    #[serde(default = "yes")]
    pub agent: bool,
    /// Disks, in order (the first boots when there is no kernel).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Extra virtio-serial ports.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
    /// Further QEMU arguments, as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

fn default_memory() -> u64 {
    512
}
fn default_cpus() -> u32 {
    2
}
fn default_machine() -> String {
    "q35".into()
}
fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn yes() -> bool {
    true
}

impl VmConfig {
    /// A config with defaults.
    pub fn new(name: &str) -> VmConfig {
        toml::from_str(&format!("name = {name:?}")).expect("defaults")
    }
}

/// Checks a VM name: it becomes a directory name.
pub fn check_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(VmError::BadName(name.into()))
    }
}

/// A VM's directory and config.
#[derive(Debug, Clone)]
pub struct Vm {
    /// `STATE_DIR/NAME`.
    pub dir: PathBuf,
    /// The config.
    pub config: VmConfig,
}

/// Runtime state as `status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// `running`, `paused`, `stopped`, or QEMU's run state.
    pub state: String,
    /// QEMU's pid when running.
    pub pid: Option<i32>,
    /// The QMP socket.
    pub qmp: PathBuf,
    /// The agent channel's host socket (when configured).
    pub agent: Option<PathBuf>,
    /// The accelerator in use (`kvm` / `tcg`).
    pub accel: Option<String>,
    /// The directory.
    pub dir: PathBuf,
}

impl Vm {
    /// Opens `STATE_DIR/NAME`.
    pub fn open(state_dir: &Path, name: &str) -> Result<Vm, VmError> {
        check_name(name)?;
        let dir = state_dir.join(name);
        let path = dir.join("vm.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VmError::NotFound { name: name.into(), dir: state_dir.display().to_string() })
            }
            Err(e) => return Err(VmError::Config { path: path.display().to_string(), msg: e.to_string() }),
        };
        let config: VmConfig = toml::from_str(&text)
            .map_err(|e| VmError::Config { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(Vm { dir, config })
    }

    /// Makes `STATE_DIR/NAME` with `vm.toml`. Disks in `import` are copied into `disks/`.
    pub fn create(state_dir: &Path, mut config: VmConfig, import: bool) -> Result<Vm, VmError> {
        check_name(&config.name)?;
        let dir = state_dir.join(&config.name);
        let _umask = private_umask();
        create_private_dir(state_dir).map_err(io_err(format!("cannot create {}", state_dir.display())))?;
        let made = {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&dir)
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(VmError::Exists(config.name.clone())),
            Err(e) => return Err(io_err(format!("cannot create {}", dir.display()))(e)),
        }
        let result = (|| {
            if import {
                create_private_dir(&dir.join("disks")).map_err(io_err("cannot create disks/"))?;
                for d in &mut config.disks {
                    let dest = PathBuf::from("disks").join(format!("{}.{}", d.name, d.format));
                    copy_sparse(&d.path, &dir.join(&dest))?;
                    d.path = dest;
                }
            } else {
                for d in &mut config.disks {
                    d.path = std::path::absolute(&d.path).map_err(io_err("bad disk path"))?;
                }
            }
            for p in [&mut config.kernel, &mut config.initrd].into_iter().flatten() {
                *p = std::path::absolute(&*p).map_err(io_err("bad path"))?;
            }
            let text = toml::to_string(&config).expect("config serialises");
            crate::util::write_atomic(&dir.join("vm.toml"), text.as_bytes()).map_err(io_err("cannot write vm.toml"))?;
            Ok(Vm { dir: dir.clone(), config })
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    /// Every VM under the state directory, sorted by name.
    pub fn list(state_dir: &Path) -> Result<Vec<Vm>, VmError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(state_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(format!("cannot read {}", state_dir.display()))(e)),
        };
        for e in rd.flatten() {
            if e.path().join("vm.toml").is_file() {
                if let Some(name) = e.file_name().to_str() {
                    if let Ok(vm) = Vm::open(state_dir, name) {
                        out.push(vm);
                    }
                }
            }
        }
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        Ok(out)
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The agent channel's host socket.
    pub fn agent_path(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// The pid file.
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// The serial console's log.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The host side of an extra port.
    pub fn port_path(&self, p: &PortConfig) -> PathBuf {
        match p.kind {
            PortKind::Socket => self.dir.join(format!("port-{}.sock", p.name)),
            PortKind::File => self.dir.join(format!("port-{}.log", p.name)),
        }
    }
    /// Where backups go by default.
    pub fn backup_dir(&self) -> PathBuf {
        self.dir.join("backups")
    }

    /// `VMDIR/checkpoints`: one directory per checkpoint.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// `VMDIR/overlays`: every image vmctl makes for checkpoints and restores.
    pub fn overlays_dir(&self) -> PathBuf {
        self.dir.join("overlays")
    }
    /// A disk's image path (absolute).
    pub fn disk_path(&self, d: &DiskConfig) -> PathBuf {
        if d.path.is_absolute() {
            d.path.clone()
        } else {
            self.dir.join(&d.path)
        }
    }

    /// QEMU's pid when this VM's QEMU runs.
    pub fn pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_path()).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let want = self.qmp_path();
        let want = want.to_str()?.as_bytes();
        cmdline.windows(want.len()).any(|w| w == want).then_some(pid)
    }

    /// Connects to QMP (the VM must run).
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp, VmError> {
        if self.pid().is_none() {
            return Err(VmError::NotRunning(self.config.name.clone()));
        }
        Ok(Qmp::connect(&self.qmp_path(), timeout)?)
    }

    /// The accelerator to use.
    pub fn resolve_accel(accel: Accel) -> Result<&'static str, VmError> {
        match (accel, kvm_usable()) {
            (Accel::Tcg, _) => Ok("tcg"),
            (Accel::Kvm, Ok(())) | (Accel::Auto, Ok(())) => Ok("kvm"),
            (Accel::Kvm, Err(e)) => Err(e),
            (Accel::Auto, Err(_)) => Ok("tcg"),
        }
    }

    /// QEMU's command line for this VM.
    pub fn command(&self, accel: &str) -> Command {
        let c = &self.config;
        let mut cmd = Command::new(&c.qemu);
        let s = |p: PathBuf| p.display().to_string();
        cmd.arg("-name").arg(&c.name);
        cmd.args(["-machine", &c.machine, "-accel", accel]);
        if accel == "kvm" {
            cmd.args(["-cpu", "host"]);
        }
        cmd.args(["-m", &c.memory_mib.to_string(), "-smp", &c.cpus.to_string()]);
        cmd.args(["-nodefaults", "-display", "none", "-no-user-config"]);
        cmd.arg("-serial").arg(format!("file:{}", s(self.console_path())));
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", s(self.qmp_path())));
        cmd.arg("-pidfile").arg(self.pid_path());
        if let Some(k) = &c.kernel {
            cmd.arg("-kernel").arg(k);
            if let Some(i) = &c.initrd {
                cmd.arg("-initrd").arg(i);
            }
            if let Some(a) = &c.append {
                cmd.arg("-append").arg(a);
            }
        }
        for (i, d) in c.disks.iter().enumerate() {
            let file =
                format!("driver=file,filename={},node-name={}-file,cache.direct=off", s(self.disk_path(d)), d.name);
            cmd.arg("-blockdev").arg(file);
            cmd.arg("-blockdev")
                .arg(format!("driver={},file={}-file,node-name={},discard=unmap", d.format, d.name, d.name));
            let mut dev = format!("virtio-blk-pci,drive={},id=vd-{}", d.name, d.name);
            if c.kernel.is_none() && i == 0 {
                dev.push_str(",bootindex=0");
            }
            cmd.arg("-device").arg(dev);
        }
        if c.agent || !c.ports.is_empty() {
            cmd.args(["-device", "virtio-serial-pci,id=vser0"]);
        }
        if c.agent {
            cmd.arg("-chardev").arg(format!("socket,id=agent,path={},server=on,wait=off", s(self.agent_path())));
            cmd.arg("-device").arg(format!("virtserialport,chardev=agent,name={AGENT_PORT}"));
        }
        for (i, p) in c.ports.iter().enumerate() {
            let chardev = match p.kind {
                PortKind::Socket => format!("socket,id=port{i},path={},server=on,wait=off", s(self.port_path(p))),
                PortKind::File => format!("file,id=port{i},path={}", s(self.port_path(p))),
            };
            cmd.arg("-chardev").arg(chardev);
            cmd.arg("-device").arg(format!("virtserialport,chardev=port{i},name={}", p.name));
        }
        cmd.args(&c.extra_args);
        cmd.arg("-daemonize");
        cmd
    }

    /// Starts QEMU (daemonized) and waits until QMP answers.
    pub fn start(&self) -> Result<VmStatus, VmError> {
        if let Some(pid) = self.pid() {
            return Err(VmError::Running(self.config.name.clone(), pid));
        }
        for p in [self.qmp_path(), self.agent_path(), self.pid_path()] {
            let _ = std::fs::remove_file(p);
        }
        for p in &self.config.ports {
            if p.kind == PortKind::Socket {
                let _ = std::fs::remove_file(self.port_path(p));
            }
        }
        for d in &self.config.disks {
            let p = self.disk_path(d);
            if !p.is_file() {
                return Err(VmError::Start {
                    name: self.config.name.clone(),
                    msg: format!("disk {} is missing", p.display()),
                });
            }
        }
        let accel = Vm::resolve_accel(self.config.accel)?;
        let mut cmd = self.command(accel);
        // QEMU keeps the umask it starts with: its sockets, logs and pid file, and the
        // overlays and migration streams it makes later for vmctl, are owner-only.
        let _umask = private_umask();
        // With -daemonize the first process exits once the VM is set up; its exit status and
        // stderr tell whether it worked.
        let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|e| VmError::Start {
            name: self.config.name.clone(),
            msg: format!("cannot run {}: {e} (apt-get install qemu-system-x86)", self.config.qemu),
        })?;
        if !out.status.success() {
            return Err(VmError::Start {
                name: self.config.name.clone(),
                msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.pid().is_some() {
                if let Ok(mut q) = Qmp::connect(&self.qmp_path(), Duration::from_secs(10)) {
                    let _ = q.execute("query-status", None)?;
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(VmError::Start {
                    name: self.config.name.clone(),
                    msg: "QMP did not come up within 20 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.status()
    }

    /// `vmctl suspend` saved it (and it was not resumed since): `vmctl start` or `resume`
    /// brings it back.
    pub fn is_suspended(&self) -> bool {
        self.checkpoints_dir().join(SUSPEND_CHECKPOINT).is_dir()
    }

    /// Where the VM stands.
    pub fn status(&self) -> Result<VmStatus, VmError> {
        let pid = self.pid();
        let (state, accel) = match pid {
            None if self.is_suspended() => ("suspended".to_string(), None),
            None => ("stopped".to_string(), None),
            Some(_) => match Qmp::connect(&self.qmp_path(), Duration::from_secs(5)) {
                Ok(mut q) => {
                    let st = q.execute("query-status", None).ok();
                    let state = st.as_ref().and_then(|s| s["status"].as_str()).unwrap_or("unknown").to_string();
                    let accel = q
                        .execute("query-kvm", None)
                        .ok()
                        .map(|k| if k["enabled"].as_bool() == Some(true) { "kvm" } else { "tcg" }.to_string());
                    (state, accel)
                }
                Err(_) => ("unresponsive".to_string(), None),
            },
        };
        Ok(VmStatus {
            name: self.config.name.clone(),
            state,
            pid,
            qmp: self.qmp_path(),
            agent: self.config.agent.then(|| self.agent_path()),
            accel,
            dir: self.dir.clone(),
        })
    }

    /// Asks the guest to power off (ACPI), waits up to `grace`, then ends QEMU with `quit`.
    /// Returns true when the guest went down by itself.
    pub fn stop(&self, grace: Duration) -> Result<bool, VmError> {
        let Some(pid) = self.pid() else { return Err(VmError::NotRunning(self.config.name.clone())) };
        let mut q = Qmp::connect(&self.qmp_path(), Duration::from_secs(10))?;
        let _ = q.execute("system_powerdown", None);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !alive(pid) {
                return Ok(true);
            }
            if let Ok(st) = q.execute("query-status", None) {
                if st["status"] == "shutdown" {
                    let _ = q.execute("quit", None);
                    wait_gone(pid, Duration::from_secs(10));
                    return Ok(true);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = q.execute("quit", None);
        if !wait_gone(pid, Duration::from_secs(15)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            wait_gone(pid, Duration::from_secs(5));
        }
        Ok(false)
    }

    /// SIGKILL: the guest gets no say.
    pub fn kill(&self) -> Result<(), VmError> {
        let Some(pid) = self.pid() else { return Err(VmError::NotRunning(self.config.name.clone())) };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(10));
        Ok(())
    }
}

/// True while `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone; false on time out.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Whether KVM can run guests here; [`VmError::NoKvm`] with the reason when not.
pub fn kvm_usable() -> Result<(), VmError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_ext = cpuinfo.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")));
    if !has_ext {
        return Err(VmError::NoKvm("the CPU has no virtualization extensions (vmx/svm)".into()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| VmError::NoKvm(format!("/dev/kvm: {e}")))
}

/// Copies an image keeping it sparse (`cp --sparse=always`).
fn copy_sparse(from: &Path, to: &Path) -> Result<(), VmError> {
    let st = Command::new("cp").arg("--sparse=always").arg(from).arg(to).status().map_err(io_err("cannot run cp"))?;
    if st.success() {
        Ok(())
    } else {
        Err(VmError::Io {
            what: format!("cannot copy {} to {}", from.display(), to.display()),
            source: io::Error::other("cp failed"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_the_state_dir_are_refused() {
        for bad in ["", "..", ".x", "a/b", "a b", "x\n"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["web1", "db-2", "a_b.c"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_keys() {
        let mut c = VmConfig::new("web1");
        c.disks.push(DiskConfig { name: "data".into(), path: "disks/data.qcow2".into(), format: "qcow2".into() });
        c.ports.push(PortConfig { name: "org.vssd.shell.0".into(), kind: PortKind::Socket });
        let text = toml::to_string(&c).unwrap();
        let back: VmConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        assert!(toml::from_str::<VmConfig>("name = \"x\"\nmemory = 3").is_err());
    }

    #[test]
    fn command_line_has_qmp_agent_and_disks() {
        let mut c = VmConfig::new("t");
        c.disks.push(DiskConfig { name: "data".into(), path: "/d/data.qcow2".into(), format: "qcow2".into() });
        c.kernel = Some("/k".into());
        let vm = Vm { dir: "/s/t".into(), config: c };
        let cmd = vm.command("tcg");
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let all = args.join(" ");
        assert!(all.contains("unix:/s/t/qmp.sock,server=on,wait=off"), "{all}");
        assert!(all.contains("name=org.qemu.guest_agent.0"), "{all}");
        assert!(all.contains("node-name=data,"), "{all}");
        assert!(all.contains("-accel tcg"), "{all}");
        assert!(!all.contains("bootindex"), "direct kernel boot: {all}");
    }

    /// Every kind of file vmctl makes itself, under umask 022 and 000 (one test: the umask is
    /// the process's).
    #[test]
    fn vm_directories_configs_and_ram_images_are_owner_only_whatever_the_umask() {
        use nix::sys::stat::{umask, Mode};
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for mask in [0o022, 0o000] {
            let d = tempfile::tempdir().unwrap();
            let disk = d.path().join("d1.raw");
            std::fs::write(&disk, b"disk").unwrap();
            let old = umask(Mode::from_bits_truncate(mask));
            let state = d.path().join("state");
            let mut c = VmConfig::new("web1");
            c.disks.push(DiskConfig { name: "d1".into(), path: disk.clone(), format: "raw".into() });
            let vm = Vm::create(&state, c, true);
            let ram = d.path().join("state.bin");
            let sink = crate::checkpoint::stream::sink_stream(&b"RAM"[..], &ram, &d.path().join("report.json"));
            let restored = umask(old);
            assert_eq!(restored.bits(), mask, "the guards put the umask back");
            let vm = vm.unwrap();
            assert_eq!(sink, 0);
            for dir in [state.clone(), vm.dir.clone(), vm.dir.join("disks")] {
                assert_eq!(mode(&dir), 0o700, "umask {mask:03o}: {}", dir.display());
            }
            assert_eq!(mode(&vm.dir.join("vm.toml")), 0o600, "umask {mask:03o}");
            assert_eq!(mode(&vm.dir.join("disks/d1.raw")) & 0o077, 0, "umask {mask:03o}: an imported disk");
            assert_eq!(mode(&ram), 0o600, "umask {mask:03o}: a RAM image");
            assert!(readable_by_others(&state).is_empty(), "{:?}", readable_by_others(&state));
        }
    }

    #[test]
    fn files_others_can_read_are_found_and_named_in_the_warning() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("b1");
        std::fs::create_dir(&b).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(b.join("d1.qcow2"), b"x").unwrap();
        std::fs::set_permissions(b.join("d1.qcow2"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(readable_by_others(d.path()), [(b.join("d1.qcow2"), 0o644)]);
        let w = exposure_warning(d.path()).unwrap();
        assert!(w.contains("d1.qcow2") && w.contains("644") && w.contains("chmod -R go-rwx"), "{w}");
        std::fs::set_permissions(b.join("d1.qcow2"), std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(exposure_warning(d.path()).is_none(), "owner and group only is fine");
    }
}
