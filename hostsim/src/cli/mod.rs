//! vmctl's command line: the parser, the dispatch, and the one place a failure becomes its
//! message and exit code. Every command lives here, in one room per family: [`vm`] (create,
//! start, stop, status, the agent's fs* commands), [`backup`], [`checkpoint`] (checkpoints,
//! suspend, resume, pause, and the hidden stream ends QEMU runs), [`man`].
//!
//! Invariants:
//! - A failure is printed once, at the top ([`main`]): its whole cause chain, each cause
//!   once ([`hostsim::util::error_chain`]), and with `--json` as `{"ok": false, "error", "exit-code"}`.
//! - Exit codes are the documented ones (see [`Cli`]); [`exit_code`] maps the library's
//!   errors to them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use hostsim::backup::BackupError;
use hostsim::checkpoint::CheckpointError;
use hostsim::qga::Qga;
use hostsim::qmp::Qmp;
use hostsim::util;
use hostsim::vm::{Vm as HVm, VmError};

mod backup;
mod checkpoint;
mod man;
mod prune;
#[cfg(feature = "libvirt")]
mod virt;
mod vm;

use backup::BackupAction;

/// vmctl: consistent backups of running QEMU VMs, driven through the guest agent.
///
/// A backup freezes the guest's filesystems through its agent (vssd, or qemu-guest-agent),
/// starts a point-in-time copy of every disk in one QMP transaction, thaws at once, and copies
/// while the guest runs on. The freeze window is what the guest's writers feel; vmctl reports it.
///
/// VMs vmctl launches live under the state directory (one directory and a vm.toml each).
/// Attach mode drives a QEMU started elsewhere: `vmctl --qmp SOCK --agent SOCK backup --target DIR`.
/// libvirt mode (`--connect URI`) drives libvirt's domains: list, status, fs*, backup (through
/// libvirt's backup API and checkpoints, into a target on the domain's host), backup --all.
///
/// Exit codes: 0 done; 1 the operation failed; 2 bad usage; 3 QEMU or the VM unreachable;
/// 4 --quiesce required and the guest could not be quiesced; 5 verify found a problem.
#[derive(Parser, Debug)]
#[command(
    version,
    propagate_version = true,
    after_help = "Examples:\n  vmctl create web1 --kernel vmlinuz --initrd initrd.img --disk data=data.qcow2 --import\n  vmctl start web1 --wait-agent 60\n  vmctl backup web1                      # full, quiesced when the agent answers\n  vmctl backup web1 --incremental        # only what changed since the last backup\n  vmctl backup list web1\n  vmctl backup verify /var/lib/vmctl/web1/backups/web1-20260101-120000-000-full\n  vmctl --qmp /run/qmp.sock --agent /run/qga.sock backup --target /srv/backups --json\n  vmctl --connect qemu:///system backup web1 --target /srv/backups/web1 --incremental   # a libvirt domain\n  vmctl --connect qemu+ssh://h1/system --connect qemu+ssh://h2/system backup --all --parallel 2 --target /srv/backups\n  vmctl backup prune --target /srv/backups/web1 --keep-daily 7 --keep-weekly 4 --dry-run"
)]
pub struct Cli {
    /// Where VMs live.
    #[arg(long, env = "VMCTL_STATE_DIR", default_value = hostsim::vm::DEFAULT_STATE_DIR, global = true, value_name = "DIR")]
    pub(crate) state_dir: PathBuf,
    /// Attach mode: the QMP socket of a QEMU that vmctl did not start.
    #[arg(long, global = true, value_name = "SOCK")]
    pub(crate) qmp: Option<PathBuf>,
    /// Attach mode: the host side of its guest agent channel (chardev socket).
    #[arg(long, global = true, value_name = "SOCK", requires = "qmp")]
    pub(crate) agent: Option<PathBuf>,
    /// libvirt mode: the domains of the libvirtd at this URI (`qemu:///system`,
    /// `qemu+ssh://host/system`, `qemu+tcp://host/system`); repeat it for several hosts
    /// (`backup --all`).
    #[arg(long, env = "VMCTL_CONNECT", global = true, value_name = "URI", conflicts_with = "qmp")]
    pub(crate) connect: Vec<String>,
    /// libvirt mode, `backup`: pull mode. libvirt's QEMU serves each disk over NBD (TCP, on
    /// the URI's host) and vmctl copies it into --target on this machine: for a remote host.
    #[arg(long, global = true)]
    pub(crate) pull: bool,
    /// Machine-readable output (one JSON document on stdout).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Log each step to stderr with its time: -v the steps (QMP, agent, freeze, transaction,
    /// thaw, copy, fsync and checksums, manifest), -vv every QMP and agent command with its
    /// round trip, -vvv the messages themselves. RUST_LOG (a level) overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Define a VM: a directory under the state directory with its vm.toml.
    Create(vm::CreateArgs),
    /// Start a VM's QEMU (KVM when usable, else TCG).
    Start {
        /// The VM.
        name: String,
        /// Wait up to this many seconds for the guest agent to answer.
        #[arg(long, value_name = "SECONDS")]
        wait_agent: Option<f64>,
        /// Restore this checkpoint instead of booting (`vmctl checkpoint list VM` names them).
        #[arg(long, value_name = "NAME")]
        checkpoint: Option<String>,
        /// A suspended VM: boot it afresh and discard the saved state, instead of resuming it
        /// (which `vmctl start` does by default).
        #[arg(long, conflicts_with = "checkpoint")]
        force_boot: bool,
    },
    /// Power a VM off: ACPI power button, then QEMU `quit` after the timeout.
    Stop {
        /// The VM.
        name: String,
        /// Seconds the guest gets to power off by itself.
        #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
        timeout: f64,
    },
    /// End a VM's QEMU at once (SIGKILL).
    Kill {
        /// The VM.
        name: String,
    },
    /// Where a VM stands (attach mode: the attached QEMU).
    Status {
        /// The VM.
        name: Option<String>,
    },
    /// Every VM under the state directory.
    List,
    /// Freeze the guest's filesystems (vssd: with a deadline after which it thaws by itself).
    Fsfreeze {
        /// The VM (omit in attach mode).
        name: Option<String>,
        /// vssd thaws by itself after this many seconds.
        #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
        deadline: f64,
        /// Only these mount points (guest paths).
        #[arg(long = "mountpoint", value_name = "PATH")]
        mountpoints: Vec<String>,
    },
    /// Thaw the guest's filesystems.
    Fsthaw {
        /// The VM (omit in attach mode).
        name: Option<String>,
    },
    /// The guest's freeze state, and which agent answers.
    Fsstatus {
        /// The VM (omit in attach mode).
        name: Option<String>,
    },
    /// Back up a running VM; `backup list|verify|restore` manage backups.
    Backup(backup::BackupCmd),
    /// Full-VM checkpoints (RAM, devices, disks): create, list, delete, destroyall.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointAction),
    /// Save the VM to disk and power it off; `vmctl resume` brings it back.
    Suspend(checkpoint::SuspendArgs),
    /// Restore a suspended VM where it was, and discard its suspend checkpoint.
    Resume(checkpoint::ResumeArgs),
    /// Stop the VM's CPUs (QMP stop).
    Pause(checkpoint::VmArg),
    /// Let the VM's CPUs run again (QMP cont).
    Unpause(checkpoint::VmArg),
    /// Print vmctl's manual page (roff, every command included): `vmctl man | man -l -`.
    #[command(hide = true)]
    Man,
    #[command(name = "__sink", hide = true)]
    Sink(checkpoint::SinkArgs),
    #[command(name = "__source", hide = true)]
    Source(checkpoint::SourceArgs),
}

/// A failed command: what to tell the user and the exit code.
pub(crate) struct Fail {
    msg: String,
    code: u8,
}

impl Fail {
    /// A failure vmctl itself words (bad usage and the like).
    pub(crate) fn new(msg: impl Into<String>, code: u8) -> Fail {
        Fail { msg: msg.into(), code }
    }
}

impl<E: std::error::Error + 'static> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail { msg: util::error_chain(&e), code: exit_code(&e) }
    }
}

/// The documented exit code of a failure: the library's errors say theirs; anything else is 1.
fn exit_code(e: &(dyn std::error::Error + 'static)) -> u8 {
    if let Some(e) = e.downcast_ref::<BackupError>() {
        return e.exit_code();
    }
    if let Some(e) = e.downcast_ref::<CheckpointError>() {
        return e.exit_code();
    }
    #[cfg(feature = "libvirt")]
    if let Some(e) = e.downcast_ref::<hostsim::libvirt::backup::Error>() {
        return e.exit_code();
    }
    #[cfg(feature = "libvirt")]
    if let Some(e) = e.downcast_ref::<hostsim::libvirt::LibvirtError>() {
        return e.exit_code();
    }
    #[cfg(feature = "libvirt")]
    if let Some(e) = e.downcast_ref::<hostsim::libvirt::restore::RestoreError>() {
        return e.exit_code();
    }
    #[cfg(feature = "libvirt")]
    if let Some(e) = e.downcast_ref::<hostsim::libvirt::checkpoint::CheckpointError>() {
        return e.exit_code();
    }
    match e.downcast_ref::<VmError>() {
        Some(VmError::NotFound { .. } | VmError::NotRunning(_)) => 3,
        Some(VmError::BadName(_)) => 2,
        _ => 1,
    }
}

/// Which QEMU a command acts on.
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) qmp: PathBuf,
    pub(crate) agent: Option<PathBuf>,
    pub(crate) vm: Option<HVm>,
}

pub(crate) fn resolve(cli: &Cli, name: Option<&str>) -> Result<Target, Fail> {
    if let Some(qmp) = &cli.qmp {
        let name = match name {
            Some(n) => n.to_string(),
            None => Qmp::connect(qmp, Duration::from_secs(10))
                .ok()
                .and_then(|mut q| q.execute("query-name", None).ok())
                .and_then(|v| v["name"].as_str().map(String::from))
                .unwrap_or_else(|| "vm".into()),
        };
        return Ok(Target { name, qmp: qmp.clone(), agent: cli.agent.clone(), vm: None });
    }
    let Some(name) = name else {
        return Err(Fail::new("name a VM, or attach to a QEMU with --qmp SOCK [--agent SOCK]", 2));
    };
    let vm = HVm::open(&cli.state_dir, name)?;
    // A checkpoint create killed mid-way left the VM stopped and the guest frozen: repair
    // that before anything else acts on the VM.
    if let Some(what) = hostsim::checkpoint::inflight::recover(&vm) {
        tracing::warn!("{what}");
        eprintln!("vmctl: warning: {what}");
    }
    if vm.pid().is_none() {
        return Err(Fail::new(format!("VM `{name}` is not running (`vmctl start {name}`)"), 3));
    }
    Ok(Target {
        name: name.to_string(),
        qmp: vm.qmp_path(),
        agent: vm.config.agent.then(|| vm.agent_path()),
        vm: Some(vm),
    })
}

pub(crate) fn agent(t: &Target) -> Result<Qga, Fail> {
    let Some(p) = &t.agent else {
        return Err(Fail::new(format!("`{}` has no guest agent channel (attach mode: pass --agent SOCK)", t.name), 2));
    };
    Ok(Qga::connect(p)?)
}

pub(crate) fn out(cli: &Cli, v: Value, human: impl FnOnce() -> String) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
    } else {
        let s = human();
        if !s.is_empty() {
            println!("{s}");
        }
    }
}

/// Log timestamps: the time of day (UTC, microseconds) and the time since vmctl started, so
/// that each step's duration reads straight off the log.
struct StepClock(Instant);

impl tracing_subscriber::fmt::time::FormatTime for StepClock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let s = now.as_secs() % 86_400;
        write!(
            w,
            "{:02}:{:02}:{:02}.{:06} +{:9.3}ms",
            s / 3600,
            (s / 60) % 60,
            s % 60,
            now.subsec_micros(),
            self.0.elapsed().as_secs_f64() * 1000.0
        )
    }
}

fn init_logging(verbose: u8) {
    let level = match (std::env::var("RUST_LOG").ok().and_then(|v| v.parse().ok()), verbose) {
        (Some(l), _) => l,
        (None, 0) => return,
        (None, 1) => tracing_subscriber::filter::LevelFilter::INFO,
        (None, 2) => tracing_subscriber::filter::LevelFilter::DEBUG,
        (None, _) => tracing_subscriber::filter::LevelFilter::TRACE,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_timer(StepClock(Instant::now()))
        .with_max_level(level)
        .init();
}

/// vmctl: parse, run, and print a failure once.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(Fail { msg, code }) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"ok": false, "error": msg, "exit-code": code})).unwrap()
                );
            }
            eprintln!("vmctl: error: {msg}");
            ExitCode::from(code)
        }
    }
}

pub(crate) fn run(cli: &Cli) -> Result<u8, Fail> {
    #[cfg(feature = "libvirt")]
    if let Some(r) = virt::run(cli) {
        return r;
    }
    if cli.pull && cli.connect.is_empty() {
        return Err(Fail::new("--pull is for libvirt's domains (with --connect URI)", 2));
    }
    #[cfg(not(feature = "libvirt"))]
    if !cli.connect.is_empty() {
        return Err(Fail::new("this vmctl was built without libvirt (cargo feature `libvirt`)", 2));
    }
    match &cli.cmd {
        Cmd::Create(a) => vm::create(cli, a),
        Cmd::Start { name, wait_agent, checkpoint: Some(c), .. } => checkpoint::start_from(cli, name, c, *wait_agent),
        Cmd::Start { name, wait_agent, checkpoint: None, force_boot } => {
            let vm = HVm::open(&cli.state_dir, name)?;
            // Suspended: resume where it was, unless told to boot afresh.
            if vm.is_suspended() && vm.pid().is_none() {
                if !*force_boot {
                    tracing::info!("`{name}` is suspended: resuming it (--force-boot boots afresh)");
                    return checkpoint::start_suspended(cli, name, *wait_agent);
                }
                checkpoint::discard_suspend(cli, name)?;
                tracing::warn!("`{name}` was suspended: its saved state is discarded (--force-boot)");
            }
            let st = vm.start()?;
            let mut agent_ok = None;
            if let Some(secs) = wait_agent {
                agent_ok = Some(vm::wait_for_agent(&vm.agent_path(), Duration::from_secs_f64(*secs)));
            }
            out(cli, json!({"ok": true, "status": st, "agent-answered": agent_ok}), || {
                let mut s = format!(
                    "{} started (pid {}, {})",
                    st.name,
                    st.pid.unwrap_or(0),
                    st.accel.clone().unwrap_or_default()
                );
                match agent_ok {
                    Some(true) => s.push_str("; the guest agent answers"),
                    Some(false) => s.push_str("; the guest agent did not answer in time"),
                    None => {}
                }
                s
            });
            Ok(if agent_ok == Some(false) { 1 } else { 0 })
        }
        Cmd::Stop { name, timeout } => {
            let vm = HVm::open(&cli.state_dir, name)?;
            let clean = vm.stop(Duration::from_secs_f64(*timeout))?;
            out(cli, json!({"ok": true, "clean": clean}), || {
                if clean {
                    format!("{name} powered off")
                } else {
                    format!("{name} did not power off within {timeout} s: QEMU was told to quit")
                }
            });
            Ok(0)
        }
        Cmd::Kill { name } => {
            let vm = HVm::open(&cli.state_dir, name)?;
            vm.kill()?;
            out(cli, json!({"ok": true}), || format!("{name} killed"));
            Ok(0)
        }
        Cmd::Status { name } => vm::status(cli, name.as_deref()),
        Cmd::List => {
            let vms = HVm::list(&cli.state_dir)?;
            let sts: Vec<_> = vms.iter().filter_map(|v| v.status().ok()).collect();
            out(cli, json!({"ok": true, "vms": sts}), || {
                let mut s = format!("{:<20} {:<12} {:>8}  {}", "NAME", "STATE", "PID", "DIR");
                for st in &sts {
                    s.push_str(&format!(
                        "\n{:<20} {:<12} {:>8}  {}",
                        st.name,
                        st.state,
                        st.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        st.dir.display()
                    ));
                }
                s
            });
            Ok(0)
        }
        Cmd::Fsfreeze { name, deadline, mountpoints } => {
            let t = resolve(cli, name.as_deref())?;
            let mut g = agent(&t)?;
            let info = g.info(Duration::from_secs(10))?;
            let r = if info.is_vssd {
                let mut args = json!({"deadline": deadline, "bind-to-channel": false});
                if !mountpoints.is_empty() {
                    args["mountpoints"] = json!(mountpoints);
                }
                g.execute("vssd-freeze", Some(args), Duration::from_secs(120))?
            } else if mountpoints.is_empty() {
                g.execute("guest-fsfreeze-freeze", None, Duration::from_secs(120))?
            } else {
                g.execute(
                    "guest-fsfreeze-freeze-list",
                    Some(json!({"mountpoints": mountpoints})),
                    Duration::from_secs(120),
                )?
            };
            let n = if info.is_vssd { r["frozen"].as_u64() } else { r.as_u64() };
            out(cli, json!({"ok": true, "agent": info.describe(), "frozen": n, "report": r}), || {
                let mut s = format!("{} froze {} filesystem(s)", info.describe(), n.unwrap_or(0));
                if info.is_vssd {
                    s.push_str(&format!("; it thaws by itself in {deadline} s unless `vmctl fsthaw` comes first"));
                } else {
                    s.push_str("; qemu-ga stays frozen until `vmctl fsthaw`");
                }
                s
            });
            Ok(0)
        }
        Cmd::Fsthaw { name } => {
            let t = resolve(cli, name.as_deref())?;
            let mut g = agent(&t)?;
            let r = g.execute("guest-fsfreeze-thaw", None, Duration::from_secs(60))?;
            out(cli, json!({"ok": true, "thawed": r}), || format!("thawed {} filesystem(s)", r));
            Ok(0)
        }
        Cmd::Fsstatus { name } => {
            let t = resolve(cli, name.as_deref())?;
            let mut g = agent(&t)?;
            let info = g.info(Duration::from_secs(10))?;
            let r = g.execute("guest-fsfreeze-status", None, Duration::from_secs(10))?;
            out(cli, json!({"ok": true, "agent": info.describe(), "status": r}), || {
                format!("{}: {}", info.describe(), r.as_str().unwrap_or("?"))
            });
            Ok(0)
        }
        Cmd::Backup(b) => match &b.action {
            None => backup::run(cli, b),
            Some(BackupAction::List { name, target }) => backup::list(cli, name.as_deref(), target.as_deref()),
            Some(BackupAction::Verify { dir, no_fsck }) => backup::verify(cli, dir, !no_fsck),
            Some(BackupAction::Prune { name, target, keep_last, keep_daily, keep_weekly, keep_monthly, dry_run }) => {
                let keep =
                    prune::Keep { last: *keep_last, daily: *keep_daily, weekly: *keep_weekly, monthly: *keep_monthly };
                prune::prune(cli, name.as_deref(), target.as_deref(), keep, *dry_run)
            }
            Some(BackupAction::Restore { dir, to, as_vm }) => {
                backup::restore(cli, dir, to.as_deref(), as_vm.as_deref())
            }
        },
        Cmd::Checkpoint(a) => checkpoint::checkpoint(cli, a),
        Cmd::Suspend(a) => checkpoint::suspend(cli, a),
        Cmd::Resume(a) => checkpoint::resume(cli, a),
        Cmd::Pause(a) => checkpoint::pause(cli, a, true),
        Cmd::Unpause(a) => checkpoint::pause(cli, a, false),
        Cmd::Man => match man::man_page(&mut std::io::stdout().lock()) {
            Ok(()) => Ok(0),
            // `vmctl man | head`
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
            Err(e) => Err(Fail::new(format!("cannot write the man page: {e}"), 1)),
        },
        Cmd::Sink(a) => Ok(checkpoint::sink(a)),
        Cmd::Source(a) => Ok(checkpoint::source(a)),
    }
}
