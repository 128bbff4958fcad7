//! The VM's own commands: `create`, `status`, and the helpers `start` uses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use hostsim::qga::Qga;
use hostsim::qmp::Qmp;
use hostsim::vm::{self, Accel, DiskConfig, PortConfig, PortKind, Vm, VmConfig};

use super::{out, resolve, Cli, Fail};

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// The VM's name.
    name: String,
    /// Kernel for direct boot.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initramfs for direct boot.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    append: Option<String>,
    /// A disk: [NAME=]PATH (qcow2 for incremental backups). Repeatable; the first boots when
    /// there is no --kernel.
    #[arg(long = "disk", value_name = "[NAME=]PATH")]
    disks: Vec<String>,
    /// Copy the disks into the VM's directory instead of using them where they are.
    #[arg(long)]
    import: bool,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Accelerator: auto picks KVM when usable, TCG otherwise.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// No guest agent channel.
    #[arg(long)]
    no_agent: bool,
    /// An extra virtio-serial port: NAME=socket|file.
    #[arg(long = "port", value_name = "NAME=KIND")]
    ports: Vec<String>,
    /// An extra QEMU argument, as is. Repeatable.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
}

pub(crate) fn create(cli: &Cli, a: &CreateArgs) -> Result<u8, Fail> {
    let mut c = VmConfig::new(&a.name);
    c.memory_mib = a.memory;
    c.cpus = a.cpus;
    c.accel = a.accel;
    c.kernel = a.kernel.clone();
    c.initrd = a.initrd.clone();
    c.append = a.append.clone();
    c.agent = !a.no_agent;
    c.extra_args = a.qemu_args.clone();
    for (i, d) in a.disks.iter().enumerate() {
        let (name, path) = match d.split_once('=') {
            Some((n, p)) => (n.to_string(), PathBuf::from(p)),
            None => (format!("disk{i}"), PathBuf::from(d)),
        };
        vm::check_name(&name).map_err(|_| Fail::new(format!("bad disk name `{name}`: letters, digits, - _ ."), 2))?;
        if !path.is_file() {
            return Err(Fail::new(
                format!("disk {} does not exist (qemu-img create -f qcow2 FILE SIZE makes one)", path.display()),
                2,
            ));
        }
        let format = if path.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
        c.disks.push(DiskConfig { name, path, format: format.into() });
    }
    for p in &a.ports {
        let (name, kind) =
            p.split_once('=').ok_or_else(|| Fail::new(format!("--port {p}: use NAME=socket or NAME=file"), 2))?;
        let kind = match kind {
            "socket" => PortKind::Socket,
            "file" => PortKind::File,
            _ => return Err(Fail::new(format!("--port {p}: the kind is socket or file"), 2)),
        };
        c.ports.push(PortConfig { name: name.into(), kind });
    }
    let vm = Vm::create(&cli.state_dir, c, a.import)?;
    out(cli, json!({"ok": true, "dir": vm.dir, "config": vm.config}), || {
        format!("created {} in {}", a.name, vm.dir.display())
    });
    Ok(0)
}

/// Waits up to `limit` for the guest agent behind `sock` to answer a ping.
pub(crate) fn wait_for_agent(sock: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut g) = Qga::connect(sock) {
            g.sync_timeout = Duration::from_secs(2);
            if g.execute("guest-ping", None, Duration::from_secs(2)).is_ok() {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

pub(crate) fn status(cli: &Cli, name: Option<&str>) -> Result<u8, Fail> {
    if cli.qmp.is_none() {
        let Some(name) = name else { return Err(Fail::new("name a VM, or attach with --qmp SOCK", 2)) };
        let vm = Vm::open(&cli.state_dir, name)?;
        let repaired = hostsim::checkpoint::inflight::recover(&vm);
        if let Some(what) = &repaired {
            tracing::warn!("{what}");
            eprintln!("vmctl: warning: {what}");
        }
        let st = vm.status()?;
        let agent = if st.pid.is_some() && vm.config.agent { agent_state(&vm.agent_path()) } else { Value::Null };
        let mut doc = json!({"ok": true, "status": st, "agent": agent});
        if let Some(what) = repaired {
            doc["repaired"] = what.into();
        }
        out(cli, doc, || {
            let mut s = format!("{}: {}", st.name, st.state);
            if let Some(p) = st.pid {
                s.push_str(&format!(" (pid {p}, {})", st.accel.clone().unwrap_or_default()));
            }
            if let Some(a) = agent["agent"].as_str() {
                s.push_str(&format!("; agent {a}, {}", agent["fsfreeze"].as_str().unwrap_or("?")));
            } else if st.pid.is_some() && vm.config.agent {
                s.push_str("; agent not answering");
            }
            s
        });
        return Ok(0);
    }
    let t = resolve(cli, name)?;
    let mut q = Qmp::connect(&t.qmp, Duration::from_secs(10))?;
    let st = q.execute("query-status", None)?;
    let agent = t.agent.as_deref().map(agent_state).unwrap_or(Value::Null);
    out(cli, json!({"ok": true, "name": t.name, "state": st["status"], "agent": agent}), || {
        format!(
            "{}: {}; agent {}",
            t.name,
            st["status"].as_str().unwrap_or("?"),
            agent["agent"].as_str().unwrap_or("not answering")
        )
    });
    Ok(0)
}

fn agent_state(sock: &Path) -> Value {
    let Ok(mut g) = Qga::connect(sock) else { return Value::Null };
    g.sync_timeout = Duration::from_secs(3);
    let Ok(info) = g.info(Duration::from_secs(3)) else { return Value::Null };
    let fs = g.execute("guest-fsfreeze-status", None, Duration::from_secs(3)).ok();
    json!({"agent": info.describe(), "fsfreeze": fs})
}
