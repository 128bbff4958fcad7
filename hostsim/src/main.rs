//! vmctl: consistent backups and lifecycle of QEMU VMs, with the vssd guest agent (or qemu-ga).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use hostsim::backup::{self, BackupRequest, Quiesce};
use hostsim::checkpoint_cli;
use hostsim::qga::Qga;
use hostsim::qmp::Qmp;
use hostsim::util;
use hostsim::vm::{self, Accel, DiskConfig, PortConfig, PortKind, Vm, VmConfig};

/// vmctl: consistent backups of running QEMU VMs, driven through the guest agent.
///
/// A backup freezes the guest's filesystems through its agent (vssd, or qemu-guest-agent),
/// starts a point-in-time copy of every disk in one QMP transaction, thaws at once, and copies
/// while the guest runs on. The freeze window is what the guest's writers feel; vmctl reports it.
///
/// VMs vmctl launches live under the state directory (one directory and a vm.toml each).
/// Attach mode drives a QEMU started elsewhere: `vmctl --qmp SOCK --agent SOCK backup --target DIR`.
///
/// Exit codes: 0 done; 1 the operation failed; 2 bad usage; 3 QEMU or the VM unreachable;
/// 4 --quiesce required and the guest could not be quiesced; 5 verify found a problem.
#[derive(Parser, Debug)]
#[command(
    version,
    propagate_version = true,
    after_help = "Examples:\n  vmctl create web1 --kernel vmlinuz --initrd initrd.img --disk data=data.qcow2 --import\n  vmctl start web1 --wait-agent 60\n  vmctl backup web1                      # full, quiesced when the agent answers\n  vmctl backup web1 --incremental        # only what changed since the last backup\n  vmctl backup list web1\n  vmctl backup verify /var/lib/vmctl/web1/backups/web1-20260101-120000-000-full\n  vmctl --qmp /run/qmp.sock --agent /run/qga.sock backup --target /srv/backups --json"
)]
struct Cli {
    /// Where VMs live.
    #[arg(long, env = "VMCTL_STATE_DIR", default_value = vm::DEFAULT_STATE_DIR, global = true, value_name = "DIR")]
    state_dir: PathBuf,
    /// Attach mode: the QMP socket of a QEMU that vmctl did not start.
    #[arg(long, global = true, value_name = "SOCK")]
    qmp: Option<PathBuf>,
    /// Attach mode: the host side of its guest agent channel (chardev socket).
    #[arg(long, global = true, value_name = "SOCK", requires = "qmp")]
    agent: Option<PathBuf>,
    /// Machine-readable output (one JSON document on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// Log each step to stderr with its time: -v the steps (QMP, agent, freeze, transaction,
    /// thaw, copy, fsync and checksums, manifest), -vv every QMP and agent command with its
    /// round trip, -vvv the messages themselves. RUST_LOG (a level) overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Define a VM: a directory under the state directory with its vm.toml.
    Create(CreateArgs),
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
    Backup(BackupCmd),
    /// Full-VM checkpoints (RAM, devices, disks): create, list, delete, destroyall.
    #[command(subcommand)]
    Checkpoint(checkpoint_cli::CheckpointAction),
    /// Save the VM to disk and power it off; `vmctl resume` brings it back.
    Suspend(checkpoint_cli::SuspendArgs),
    /// Restore a suspended VM where it was, and discard its suspend checkpoint.
    Resume(checkpoint_cli::ResumeArgs),
    /// Stop the VM's CPUs (QMP stop).
    Pause(checkpoint_cli::VmArg),
    /// Let the VM's CPUs run again (QMP cont).
    Unpause(checkpoint_cli::VmArg),
    /// Print vmctl's manual page (roff, every command included): `vmctl man | man -l -`.
    #[command(hide = true)]
    Man,
    #[command(name = "__sink", hide = true)]
    Sink(checkpoint_cli::SinkArgs),
    #[command(name = "__source", hide = true)]
    Source(checkpoint_cli::SourceArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
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

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupCmd {
    #[command(subcommand)]
    action: Option<BackupAction>,
    /// The VM (omit in attach mode).
    name: Option<String>,
    /// Where backups go (default: the VM's backups/ directory; required in attach mode).
    #[arg(long, value_name = "DIR")]
    target: Option<PathBuf>,
    /// Copy only what changed since the last backup in the target.
    #[arg(long)]
    incremental: bool,
    /// required: fail unless the agent froze the guest; best-effort: a crash-consistent backup
    /// (marked so) when it cannot; off: do not ask the agent.
    #[arg(long, value_enum, default_value_t = Quiesce::BestEffort)]
    quiesce: Quiesce,
    /// vssd thaws by itself after this many seconds, whatever happens to vmctl.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    freeze_deadline: f64,
    /// Seconds to wait for the agent to answer before calling it silent.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    agent_timeout: f64,
    /// Limit the copy to this many MiB/s (the guest's disks stay responsive).
    #[arg(long, value_name = "MIB_PER_S")]
    bandwidth: Option<f64>,
    /// Verify the backup right after taking it (checksums, qemu-img check, fsck).
    #[arg(long)]
    verify: bool,
    /// Skip the free-space check (for tests of the out-of-space path).
    #[arg(long, hide = true)]
    no_space_check: bool,
}

#[derive(Subcommand, Debug)]
enum BackupAction {
    /// The complete backups in a target (partial leftovers are reported, never listed).
    List {
        /// The VM (its backups/ directory), or use --target.
        name: Option<String>,
        /// The target directory.
        #[arg(long, value_name = "DIR")]
        target: Option<PathBuf>,
    },
    /// Check a backup: checksums of its chain, qemu-img check, fsck -n of the filesystems.
    Verify {
        /// The backup directory.
        dir: PathBuf,
        /// Skip the filesystem checks (they need root).
        #[arg(long)]
        no_fsck: bool,
    },
    /// Rebuild standalone disks from a backup and its chain.
    Restore {
        /// The backup directory.
        dir: PathBuf,
        /// Write NAME.qcow2 per disk here.
        #[arg(long, value_name = "DIR", required_unless_present = "as_vm")]
        to: Option<PathBuf>,
        /// Make a new VM with the restored disks (the backed-up VM's config).
        #[arg(long, value_name = "NAME")]
        as_vm: Option<String>,
    },
}

/// A failure: the message and the exit code.
struct Fail(String, u8);

impl<E: std::error::Error> From<E> for Fail {
    fn from(e: E) -> Fail {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let s_text = s.to_string();
            if !msg.contains(&s_text) {
                msg.push_str(": ");
                msg.push_str(&s_text);
            }
            src = s.source();
        }
        Fail(msg, 1)
    }
}

fn fail_backup(e: backup::BackupError) -> Fail {
    let code = e.exit_code();
    let mut f = Fail::from(e);
    f.1 = code;
    f
}

fn fail_vm(e: vm::VmError) -> Fail {
    let code = match e {
        vm::VmError::NotFound { .. } | vm::VmError::NotRunning(_) => 3,
        vm::VmError::BadName(_) => 2,
        _ => 1,
    };
    let mut f = Fail::from(e);
    f.1 = code;
    f
}

/// Which QEMU a command acts on.
struct Target {
    name: String,
    qmp: PathBuf,
    agent: Option<PathBuf>,
    vm: Option<Vm>,
}

fn resolve(cli: &Cli, name: Option<&str>) -> Result<Target, Fail> {
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
        return Err(Fail("name a VM, or attach to a QEMU with --qmp SOCK [--agent SOCK]".into(), 2));
    };
    let vm = Vm::open(&cli.state_dir, name).map_err(fail_vm)?;
    if vm.pid().is_none() {
        return Err(Fail(format!("VM `{name}` is not running (`vmctl start {name}`)"), 3));
    }
    Ok(Target {
        name: name.to_string(),
        qmp: vm.qmp_path(),
        agent: vm.config.agent.then(|| vm.agent_path()),
        vm: Some(vm),
    })
}

fn agent(t: &Target) -> Result<Qga, Fail> {
    let Some(p) = &t.agent else {
        return Err(Fail(format!("`{}` has no guest agent channel (attach mode: pass --agent SOCK)", t.name), 2));
    };
    Ok(Qga::connect(p)?)
}

fn out(cli: &Cli, v: Value, human: impl FnOnce() -> String) {
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

/// The manual page: vmctl's own sections, then one per command (`vmctl backup`, `vmctl
/// checkpoint create`, ...) with its synopsis, description and options.
fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command()
        .name("vmctl")
        .bin_name("vmctl")
        .about("consistent backups and checkpoints of running QEMU VMs, driven through the guest agent");
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    commands(&cmd, "vmctl", &mut page)?;
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    // Each piece clap_mangen renders starts with the same preamble: once is enough.
    let page = String::from_utf8_lossy(&page);
    let mut seen = std::collections::HashSet::new();
    for line in page.lines() {
        if (line.starts_with(".ie ") || line.starts_with(".el ")) && !seen.insert(line) {
            continue;
        }
        let line = if line == ".SH EXTRA" { ".SH EXAMPLES" } else { line };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// One section per visible command, depth first; its own sections become subsections, and the
/// options every command shares are left to vmctl's OPTIONS.
fn commands(cmd: &clap::Command, path: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("{path} {}", sub.get_name());
        let sub = sub.clone().bin_name(&name).mut_args(|a| {
            let shared = a.is_global_set() || matches!(a.get_id().as_str(), "help" | "version");
            if shared {
                a.hide(true)
            } else {
                a
            }
        });
        let man = clap_mangen::Man::new(sub.clone());
        let mut text = Vec::new();
        man.render_synopsis_section(&mut text)?;
        man.render_description_section(&mut text)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut text)?;
        }
        let text = String::from_utf8_lossy(&text).replace(".SH ", ".SS ");
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        out.write_all(text.as_bytes())?;
        commands(&sub, &name, out)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(msg, code)) => {
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

fn run(cli: &Cli) -> Result<u8, Fail> {
    match &cli.cmd {
        Cmd::Create(a) => create(cli, a),
        Cmd::Start { name, wait_agent, checkpoint: Some(c), .. } => {
            checkpoint_cli::start_from(&ck_ctx(cli), name, c, *wait_agent).map_err(ck_fail)
        }
        Cmd::Start { name, wait_agent, checkpoint: None, force_boot } => {
            let vm = Vm::open(&cli.state_dir, name).map_err(fail_vm)?;
            // Suspended: resume where it was, unless told to boot afresh.
            if vm.is_suspended() && vm.pid().is_none() {
                if !*force_boot {
                    tracing::info!("`{name}` is suspended: resuming it (--force-boot boots afresh)");
                    return checkpoint_cli::start_suspended(&ck_ctx(cli), name, *wait_agent).map_err(ck_fail);
                }
                checkpoint_cli::discard_suspend(&ck_ctx(cli), name).map_err(ck_fail)?;
                tracing::warn!("`{name}` was suspended: its saved state is discarded (--force-boot)");
            }
            let st = vm.start().map_err(fail_vm)?;
            let mut agent_ok = None;
            if let Some(secs) = wait_agent {
                agent_ok = Some(wait_for_agent(&vm.agent_path(), Duration::from_secs_f64(*secs)));
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
            let vm = Vm::open(&cli.state_dir, name).map_err(fail_vm)?;
            let clean = vm.stop(Duration::from_secs_f64(*timeout)).map_err(fail_vm)?;
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
            let vm = Vm::open(&cli.state_dir, name).map_err(fail_vm)?;
            vm.kill().map_err(fail_vm)?;
            out(cli, json!({"ok": true}), || format!("{name} killed"));
            Ok(0)
        }
        Cmd::Status { name } => status(cli, name.as_deref()),
        Cmd::List => {
            let vms = Vm::list(&cli.state_dir).map_err(fail_vm)?;
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
            None => backup_run(cli, b),
            Some(BackupAction::List { name, target }) => backup_list(cli, name.as_deref(), target.as_deref()),
            Some(BackupAction::Verify { dir, no_fsck }) => backup_verify(cli, dir, !no_fsck),
            Some(BackupAction::Restore { dir, to, as_vm }) => backup_restore(cli, dir, to.as_deref(), as_vm.as_deref()),
        },
        Cmd::Checkpoint(a) => checkpoint_cli::checkpoint(&ck_ctx(cli), a).map_err(ck_fail),
        Cmd::Suspend(a) => checkpoint_cli::suspend(&ck_ctx(cli), a).map_err(ck_fail),
        Cmd::Resume(a) => checkpoint_cli::resume(&ck_ctx(cli), a).map_err(ck_fail),
        Cmd::Pause(a) => checkpoint_cli::pause(&ck_ctx(cli), a, true).map_err(ck_fail),
        Cmd::Unpause(a) => checkpoint_cli::pause(&ck_ctx(cli), a, false).map_err(ck_fail),
        Cmd::Man => match man_page(&mut std::io::stdout().lock()) {
            Ok(()) => Ok(0),
            // `vmctl man | head`
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
            Err(e) => Err(Fail(format!("cannot write the man page: {e}"), 1)),
        },
        Cmd::Sink(a) => Ok(checkpoint_cli::sink(a)),
        Cmd::Source(a) => Ok(checkpoint_cli::source(a)),
    }
}

fn ck_ctx(cli: &Cli) -> checkpoint_cli::Ctx<'_> {
    checkpoint_cli::Ctx { state_dir: &cli.state_dir, json: cli.json, attach: cli.qmp.is_some() }
}

fn ck_fail(f: checkpoint_cli::CliFailure) -> Fail {
    Fail(f.msg, f.code)
}

fn create(cli: &Cli, a: &CreateArgs) -> Result<u8, Fail> {
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
        vm::check_name(&name).map_err(|_| Fail(format!("bad disk name `{name}`: letters, digits, - _ ."), 2))?;
        if !path.is_file() {
            return Err(Fail(
                format!("disk {} does not exist (qemu-img create -f qcow2 FILE SIZE makes one)", path.display()),
                2,
            ));
        }
        let format = if path.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
        c.disks.push(DiskConfig { name, path, format: format.into() });
    }
    for p in &a.ports {
        let (name, kind) =
            p.split_once('=').ok_or_else(|| Fail(format!("--port {p}: use NAME=socket or NAME=file"), 2))?;
        let kind = match kind {
            "socket" => PortKind::Socket,
            "file" => PortKind::File,
            _ => return Err(Fail(format!("--port {p}: the kind is socket or file"), 2)),
        };
        c.ports.push(PortConfig { name: name.into(), kind });
    }
    let vm = Vm::create(&cli.state_dir, c, a.import).map_err(fail_vm)?;
    out(cli, json!({"ok": true, "dir": vm.dir, "config": vm.config}), || {
        format!("created {} in {}", a.name, vm.dir.display())
    });
    Ok(0)
}

fn wait_for_agent(sock: &Path, limit: Duration) -> bool {
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

fn status(cli: &Cli, name: Option<&str>) -> Result<u8, Fail> {
    if cli.qmp.is_none() {
        let Some(name) = name else { return Err(Fail("name a VM, or attach with --qmp SOCK".into(), 2)) };
        let vm = Vm::open(&cli.state_dir, name).map_err(fail_vm)?;
        let st = vm.status().map_err(fail_vm)?;
        let agent = if st.pid.is_some() && vm.config.agent { agent_state(&vm.agent_path()) } else { Value::Null };
        out(cli, json!({"ok": true, "status": st, "agent": agent}), || {
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

fn backup_run(cli: &Cli, b: &BackupCmd) -> Result<u8, Fail> {
    let t = resolve(cli, b.name.as_deref())?;
    let target = match (&b.target, &t.vm) {
        (Some(d), _) => d.clone(),
        (None, Some(vm)) => vm.backup_dir(),
        (None, None) => return Err(Fail("attach mode needs --target DIR".into(), 2)),
    };
    let req = BackupRequest {
        vm_name: t.name.clone(),
        qmp: t.qmp.clone(),
        agent: t.agent.clone(),
        vm_config: t.vm.as_ref().map(|v| serde_json::to_value(&v.config).unwrap()),
        target,
        incremental: b.incremental,
        quiesce: b.quiesce,
        freeze_deadline: Duration::from_secs_f64(b.freeze_deadline),
        freeze_timeout: Duration::from_secs_f64(b.freeze_deadline.max(1.0)),
        agent_timeout: Duration::from_secs_f64(b.agent_timeout),
        speed: b.bandwidth.map(|m| (m * 1048576.0) as u64).unwrap_or(0),
        // The log's lines and a progress bar would garble each other.
        progress: !cli.json && cli.verbose == 0,
        skip_space_check: b.no_space_check,
    };
    let o = backup::run(&req).map_err(fail_backup)?;
    let m = &o.manifest;
    let verified = if b.verify { Some(backup::verify(&o.dir, true).map_err(fail_backup)?) } else { None };
    let copied: u64 = m.disks.iter().map(|d| d.copied_bytes).sum();
    let v = json!({
        "ok": true,
        "id": m.id,
        "dir": o.dir,
        "kind": m.kind,
        "consistency": m.consistency,
        "freeze_window_ms": m.timings.freeze_window_ms,
        "timings": m.timings,
        "agent": m.quiesce.agent,
        "frozen": m.quiesce.frozen,
        "note": m.quiesce.note,
        "copied_bytes": copied,
        "chain": m.chain,
        "verify": verified,
    });
    out(cli, v, || {
        let mut s = format!("backup {} ({}) in {}\n", m.id, m.kind, o.dir.display());
        s.push_str(&format!("  consistency: {:?}", m.consistency).to_lowercase());
        if let (Some(a), Some(n)) = (&m.quiesce.agent, m.quiesce.frozen) {
            s.push_str(&format!(" ({a} froze {n} filesystem(s))"));
        }
        if let Some(n) = &m.quiesce.note {
            s.push_str(&format!("\n  note: {n}"));
        }
        let t = &m.timings;
        s.push_str(&format!(
            "\n  freeze window: {:.1} ms (freeze {:.1} + transaction {:.1} + thaw {:.1})",
            t.freeze_window_ms, t.freeze_ms, t.transaction_ms, t.thaw_ms
        ));
        s.push_str(&format!(
            "\n  copied {} in {:.1} s; total {:.1} s",
            util::human_bytes(copied),
            t.copy_ms / 1000.0,
            t.total_ms / 1000.0
        ));
        if let Some(vr) = &verified {
            s.push_str(&format!("\n  verify: {}", if vr.ok { "ok" } else { "FAILED" }));
            for c in vr.checks.iter().filter(|c| !c.ok) {
                s.push_str(&format!("\n    {}: {}", c.what, c.detail));
            }
        }
        s
    });
    Ok(if verified.is_some_and(|v| !v.ok) { 5 } else { 0 })
}

fn backup_list(cli: &Cli, name: Option<&str>, target: Option<&Path>) -> Result<u8, Fail> {
    let dir = match (target, name) {
        (Some(t), _) => t.to_path_buf(),
        (None, Some(n)) => Vm::open(&cli.state_dir, n).map_err(fail_vm)?.backup_dir(),
        (None, None) => return Err(Fail("name a VM or give --target DIR".into(), 2)),
    };
    let (good, debris) = backup::list(&dir).map_err(fail_backup)?;
    let items: Vec<Value> = good
        .iter()
        .filter(|(_, m)| name.is_none() || target.is_none() || Some(m.vm.as_str()) == name)
        .map(|(p, m)| {
            json!({"id": m.id, "dir": p, "vm": m.vm, "created": m.created, "kind": m.kind, "consistency": m.consistency,
                   "freeze_window_ms": m.timings.freeze_window_ms, "chain": m.chain,
                   "bytes": m.disks.iter().map(|d| d.file_size).sum::<u64>()})
        })
        .collect();
    out(cli, json!({"ok": true, "backups": items, "incomplete": debris}), || {
        let mut s = format!("{:<45} {:<11} {:<11} {:>10} {:>10}", "ID", "KIND", "CONSISTENCY", "WINDOW", "SIZE");
        for i in &items {
            s.push_str(&format!(
                "\n{:<45} {:<11} {:<11} {:>8.1}ms {:>10}",
                i["id"].as_str().unwrap_or(""),
                i["kind"].as_str().unwrap_or(""),
                i["consistency"].as_str().unwrap_or(""),
                i["freeze_window_ms"].as_f64().unwrap_or(0.0),
                util::human_bytes(i["bytes"].as_u64().unwrap_or(0))
            ));
        }
        for d in &debris {
            s.push_str(&format!("\n(incomplete, not a backup: {} — safe to delete)", d.display()));
        }
        s
    });
    Ok(0)
}

fn backup_verify(cli: &Cli, dir: &Path, fsck: bool) -> Result<u8, Fail> {
    let r = backup::verify(dir, fsck).map_err(fail_backup)?;
    out(cli, json!({"ok": r.ok, "verify": r}), || {
        let mut s = format!("backup {}: {}", r.id, if r.ok { "ok" } else { "FAILED" });
        for c in &r.checks {
            s.push_str(&format!("\n  [{}] {}", if c.ok { " ok " } else { "FAIL" }, c.what));
            if !c.ok {
                for l in c.detail.lines().take(20) {
                    s.push_str(&format!("\n         {l}"));
                }
            }
        }
        s
    });
    Ok(if r.ok { 0 } else { 5 })
}

fn backup_restore(cli: &Cli, dir: &Path, to: Option<&Path>, as_vm: Option<&str>) -> Result<u8, Fail> {
    let m = backup::Manifest::load(dir).map_err(fail_backup)?;
    if let Some(name) = as_vm {
        let Some(cfg) = &m.vm_config else {
            return Err(Fail("the backup has no VM config (attach mode); use --to DIR".into(), 2));
        };
        let mut c: VmConfig = serde_json::from_value(cfg.clone())?;
        vm::check_name(name).map_err(fail_vm)?;
        c.name = name.to_string();
        let vmdir = cli.state_dir.join(name);
        if vmdir.exists() {
            return Err(Fail(format!("a VM named `{name}` exists already"), 1));
        }
        let scratch = cli.state_dir.join(format!(".restore-{name}"));
        let made = backup::restore(dir, &scratch).map_err(fail_backup)?;
        for d in &mut c.disks {
            d.path = scratch.join(format!("{}.qcow2", d.name));
            d.format = "qcow2".into();
        }
        let vm = Vm::create(&cli.state_dir, c, true).map_err(fail_vm);
        let _ = std::fs::remove_dir_all(&scratch);
        let vm = vm?;
        out(cli, json!({"ok": true, "vm": name, "dir": vm.dir, "disks": made.len()}), || {
            format!("restored {} as VM {name} ({}); start it with `vmctl start {name}`", m.id, vm.dir.display())
        });
        return Ok(0);
    }
    let to = to.expect("clap requires --to or --as-vm");
    let made = backup::restore(dir, to).map_err(fail_backup)?;
    out(cli, json!({"ok": true, "disks": made}), || {
        made.iter().map(|p| format!("restored {}", p.display())).collect::<Vec<_>>().join("\n")
    });
    Ok(0)
}
