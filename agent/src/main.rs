//! `vssd`: the guest agent daemon: configuration from file and flags, logging, the channels,
//! and a clean stop (thawed first).
//!
//! Errors are printed once, here, with their whole chain (`{:#}` of an `anyhow::Error`):
//! the library's error messages never repeat their sources.
#![forbid(unsafe_code)]

mod notify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use vssd::apps::{AppSettings, Apps};
use vssd::config::{AppFailurePolicy, ChannelSpec, Config, ConfigError, DEFAULT_PATH};
use vssd::engine::RealKernel;
use vssd::plan::CannotFreezePolicy;
use vssd::service::Agent;

/// vssd: application-consistent freeze and thaw of this VM's filesystems, on the host's request.
///
/// vssd speaks qemu-guest-agent's protocol, so libvirt (`virsh domfsfreeze`, `snapshot-create
/// --quiesce`), Proxmox, OpenStack and KubeVirt drive it unchanged. Every freeze ends: if no
/// thaw arrives before the deadline, or the channel that froze goes away, vssd thaws by itself.
///
/// With `--qga-backend PATH` (or `qga-backend` in the config), every command vssd does not
/// implement (guest-exec, guest-file-*, guest-set-user-password, guest-ssh-*, ...) is forwarded
/// to a qemu-ga listening on that unix socket with its freeze commands blocked
/// (`qemu-ga -m unix-listen -p PATH --block-rpcs=guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw`;
/// vssd-qga-backend.service runs it), and guest-info lists both agents' commands. vssd itself
/// never runs a program nor writes a file a host names; without a backend those commands do
/// not exist.
///
/// On Hyper-V (and Azure), `--channel hyperv` serves the host's backup (VSS) through Linux's
/// `hv_utils` device /dev/vmbus/hv_vss in place of hv_vss_daemon (stop that daemon first: the
/// kernel allows one opener): FREEZE runs the same app + hook + filesystem freeze as the QGA
/// freeze, with the same deadline; HOT_BACKUP asks the apps and fails on a veto. When no
/// channel is configured and /dev/vmbus/hv_vss exists, vssd serves it by itself (and the QGA
/// port too, if the VM has one). See docs/hyperv.md.
///
/// Flags override the config file (default /etc/vssd/vssd.toml; `--print-config` shows the result).
///
/// Exit codes: 0 stopped cleanly (thawed first), 1 runtime error (a channel could not be
/// opened), 2 bad usage or configuration.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  vssd                                   # virtio-serial port org.qemu.guest_agent.0\n  vssd --channel vsock:4444 --channel virtio-serial:org.qemu.guest_agent.0\n  vssd --channel unix:/run/vssd/test.sock --scope /srv/data --freeze-deadline 10\n  vssd --qga-backend /run/qga-backend.sock            # qemu-ga behind vssd for the rest\n  vssd --channel hyperv                  # Hyper-V VSS through /dev/vmbus/hv_vss (in place of hv_vss_daemon)"
)]
struct Cli {
    /// Config file (TOML). Missing default file: built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the host reaches vssd: unix:PATH, virtio-serial:NAME, vsock:PORT, or hyperv[:PATH]
    /// (the Hyper-V VSS device, default /dev/vmbus/hv_vss). Repeatable; replaces the config's
    /// list. With none here nor in the config, vssd serves hyperv by itself when
    /// /dev/vmbus/hv_vss exists.
    #[arg(long = "channel", value_name = "SPEC")]
    channels: Vec<ChannelSpec>,
    /// Only mounts at or below this path are ever touched (default /).
    #[arg(long, value_name = "PREFIX")]
    scope: Option<PathBuf>,
    /// Seconds a freeze may last before vssd thaws by itself (default 60).
    #[arg(long, value_name = "SECONDS")]
    freeze_deadline: Option<f64>,
    /// Seconds to wait for the channel that froze to come back before thawing (default 10).
    #[arg(long, value_name = "SECONDS")]
    channel_drop_grace: Option<f64>,
    /// A local writable filesystem that cannot freeze (vfat, FUSE): skip it and report (default),
    /// or veto the whole freeze.
    #[arg(long, value_name = "POLICY")]
    cannot_freeze: Option<CannotFreezePolicy>,
    /// Never freeze this mount point or anything below it. Repeatable; adds to the config.
    #[arg(long, value_name = "MOUNTPOINT")]
    exclude: Vec<PathBuf>,
    /// Runtime state directory: freeze marker and control socket; must be on tmpfs (default /run/vssd).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Largest request accepted, in bytes (default 1048576).
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// Do not serve the local control socket STATE_DIR/vssd.sock.
    #[arg(long)]
    no_control_socket: bool,
    /// Where applications register to hold a freeze (default STATE_DIR/appvss.sock).
    #[arg(long, value_name = "PATH")]
    app_socket: Option<PathBuf>,
    /// Serve no applications (no app socket).
    #[arg(long)]
    no_apps: bool,
    /// An app or hook that vetoes, fails, is late or vanishes: `continue` (default; report it,
    /// freeze the rest) or `fail` the freeze.
    #[arg(long, value_name = "POLICY")]
    app_failure: Option<AppFailurePolicy>,
    /// Most app registrations per uid (default 64).
    #[arg(long, value_name = "N")]
    app_max_per_uid: Option<usize>,
    /// Seconds an app has to answer PREPARE (default 5).
    #[arg(long, value_name = "SECONDS")]
    app_prepare_deadline: Option<f64>,
    /// Seconds an app has to flush and answer HELD (default 10).
    #[arg(long, value_name = "SECONDS")]
    app_freeze_deadline: Option<f64>,
    /// A directory of hook executables run with `freeze`/`thaw`. Repeatable; replaces the
    /// config's list (default /etc/vssd/hooks.d and /etc/qemu/fsfreeze-hook.d).
    #[arg(long = "hooks-dir", value_name = "DIR")]
    hooks_dirs: Vec<PathBuf>,
    /// Seconds a hook may run before it is killed (default 30).
    #[arg(long, value_name = "SECONDS")]
    hook_deadline: Option<f64>,
    /// Leave /sys/kernel/rcu_expedited alone (by default vssd expedites RCU grace periods
    /// while FIFREEZE runs, and puts the knob back after).
    #[arg(long)]
    no_rcu_expedite: bool,
    /// Forward every command vssd does not implement to the qemu-ga listening on this unix
    /// socket (default: none; such commands are "not found").
    #[arg(long, value_name = "PATH")]
    qga_backend: Option<PathBuf>,
    /// Seconds a command forwarded to the qemu-ga backend may take before the host gets an
    /// error naming the backend (default 10).
    #[arg(long, value_name = "SECONDS")]
    qga_backend_timeout: Option<f64>,
    /// Do not serve org.vssd.Agent on D-Bus.
    #[arg(long)]
    no_dbus: bool,
    /// The D-Bus address to serve on (for tests; default the system bus).
    #[arg(long, value_name = "ADDRESS", hide = true)]
    dbus_address: Option<String>,
    /// Mount table to read (for tests; default /proc/self/mountinfo).
    #[arg(long, value_name = "FILE", hide = true)]
    mountinfo: Option<PathBuf>,
    /// Print the man page (roff) and exit.
    #[arg(long, hide = true)]
    man: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// The error and its sources, on one line: `what: because: because`.
fn chain(e: impl Into<anyhow::Error>) -> String {
    format!("{:#}", e.into())
}

/// Whether the config file names its channels (a missing or unreadable file does not).
fn file_sets_channels(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.contains_key("channels"))
}

/// No channel configured anywhere and the Hyper-V VSS device exists: serve it, and the QGA
/// port too if this VM has one (a Hyper-V VM has none, and a missing port would stop vssd).
/// Returns the channels chosen, for the log.
fn choose_hyperv(c: &mut Config, device: &std::path::Path) -> Option<Vec<ChannelSpec>> {
    if !device.exists() {
        return None;
    }
    let mut chosen = vec![ChannelSpec::HyperV(device.to_path_buf())];
    for ch in &c.channels {
        if let ChannelSpec::VirtioSerial(name) = ch {
            if kmod_shim::virtio::find_port(&c.sysfs, &c.devfs, name).is_ok() {
                chosen.push(ch.clone());
            }
        }
    }
    c.channels = chosen.clone();
    Some(chosen)
}

fn effective_config(cli: &Cli) -> Result<(Config, Option<Vec<ChannelSpec>>), ConfigError> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let mut c = Config::load(&path, explicit)?;
    let mut auto = None;
    if !cli.channels.is_empty() {
        c.channels = cli.channels.clone();
    } else if !file_sets_channels(&path) {
        auto = choose_hyperv(&mut c, std::path::Path::new(kmod_shim::hv::DEVICE_PATH));
    }
    if let Some(v) = &cli.scope {
        c.scope = v.clone();
    }
    if let Some(v) = cli.freeze_deadline {
        c.freeze_deadline = v;
    }
    if let Some(v) = cli.channel_drop_grace {
        c.channel_drop_grace = v;
    }
    if let Some(v) = cli.cannot_freeze {
        c.cannot_freeze = v;
    }
    c.exclude.extend(cli.exclude.iter().cloned());
    if let Some(v) = &cli.state_dir {
        c.state_dir = v.clone();
    }
    if let Some(v) = cli.max_message_bytes {
        c.max_message_bytes = v;
    }
    if cli.no_control_socket {
        c.control_socket = false;
    }
    if let Some(v) = &cli.app_socket {
        c.app_socket = Some(v.clone());
    }
    if cli.no_apps {
        c.apps = false;
    }
    if cli.no_rcu_expedite {
        c.rcu_expedite = false;
    }
    if let Some(v) = cli.app_failure {
        c.app_failure = v;
    }
    if let Some(v) = cli.app_max_per_uid {
        c.app_max_per_uid = v;
    }
    if let Some(v) = cli.app_prepare_deadline {
        c.app_prepare_deadline = v;
    }
    if let Some(v) = cli.app_freeze_deadline {
        c.app_freeze_deadline = v;
    }
    if !cli.hooks_dirs.is_empty() {
        c.hooks_dirs = cli.hooks_dirs.clone();
    }
    if let Some(v) = cli.hook_deadline {
        c.hook_deadline = v;
    }
    if let Some(v) = &cli.qga_backend {
        c.qga_backend = Some(v.clone());
    }
    if let Some(v) = cli.qga_backend_timeout {
        c.qga_backend_timeout = v;
    }
    if cli.no_dbus {
        c.dbus = false;
    }
    if let Some(v) = &cli.dbus_address {
        c.dbus_address = Some(v.clone());
    }
    if let Some(v) = &cli.mountinfo {
        c.mountinfo = v.clone();
    }
    c.validate()?;
    Ok((c, auto))
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // RUST_LOG takes `level` or `target=level,...` (no regular expressions: a smaller agent).
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        // zbus logs its own warnings when the bus goes away; vssd says that once itself.
        .unwrap_or_else(|| format!("{default},zbus=error").parse().expect("a level name parses"));
    // stderr only: journald picks it up; nothing is ever written to a freezable filesystem.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .finish()
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.man {
        let cmd = <Cli as clap::CommandFactory>::command().name("vssd");
        return match clap_mangen::Man::new(cmd).section("8").render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(1),
        };
    }
    let (cfg, auto) = match effective_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vssd: {}", chain(e));
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", toml::to_string(&cfg).expect("config serialises"));
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose);
    if let Some(chosen) = &auto {
        let list: Vec<String> = chosen.iter().map(|c| c.to_string()).collect();
        info!(
            channels = %list.join(" "),
            "no channel configured and {} exists: serving the Hyper-V VSS channel",
            kmod_shim::hv::DEVICE_PATH
        );
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(8).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vssd: {}", chain(anyhow::Error::from(e).context("cannot start the runtime")));
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cfg))
}

/// Each registered app is a connection: lift the soft descriptor limit to the hard one so a
/// thousand apps fit (systemd's default soft limit is 1024).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

async fn run(cfg: Config) -> ExitCode {
    raise_fd_limit();
    if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
        let e = anyhow::Error::from(e).context(format!("cannot create state directory {}", cfg.state_dir.display()));
        error!("{}", chain(e));
        return ExitCode::from(1);
    }
    let control = cfg.control_socket.then(|| cfg.control_socket_path());
    let channels = cfg.channels.clone();
    let apps = cfg.apps.then(|| {
        Apps::new(AppSettings {
            socket: cfg.app_socket_path(),
            group: cfg.app_socket_group.clone(),
            mode: cfg.app_socket_mode,
            max_per_uid: cfg.app_max_per_uid,
        })
    });
    if let Some(a) = &apps {
        if let Err(e) = a.listen() {
            let what = format!("cannot listen for applications on {}", cfg.app_socket_path().display());
            error!("{}", chain(anyhow::Error::from(e).context(what)));
            return ExitCode::from(1);
        }
    }
    let agent = Agent::with_apps(cfg, Arc::new(RealKernel), apps);
    agent.recover();
    if let Err(e) = vssd::server::start(agent.clone(), &channels, control).await {
        error!("{}", chain(e));
        return ExitCode::from(1);
    }
    // Plan once now, thrown away, before saying ready: the first freeze then finds mountinfo,
    // sysfs and the planner's code warm (TCG demo guest: first plan 39 ms, later ones 2-8).
    // On this thread, so that no thread or allocator arena is made just for it.
    let t = std::time::Instant::now();
    match agent.plan(None) {
        Ok(p) => tracing::debug!(mounts = p.mounts.len(), ms = t.elapsed().as_secs_f64() * 1000.0, "warm-up plan"),
        Err(e) => warn!(error = %chain(e), "cannot plan (the first freeze will say why)"),
    }
    if let Some(b) = &agent.config().qga_backend {
        info!(backend = %b.display(), "forwarding the commands vssd does not implement to qemu-ga");
    }
    if agent.config().dbus {
        vssd::dbus::spawn(agent.clone(), vssd::dbus::Settings { address: agent.config().dbus_address.clone() });
    }
    info!(scope = %agent.config().scope.display(), deadline_s = agent.config().freeze_deadline, "vssd ready");
    // systemd: every channel serves now. STATUS and the watchdog follow the agent's state.
    let systemd = notify::Notifier::from_env();
    systemd.ready(notify::status_text(&agent.state_view(), agent.app_count(), tokio::time::Instant::now()));
    systemd.spawn(agent.clone());
    wait_for_stop().await;
    info!("stopping");
    let view = agent.state_view();
    systemd.stopping(match view.filesystems {
        0 => "stopping".to_string(),
        n => format!("stopping: thawing {n} filesystem(s) first"),
    });
    // The Hyper-V channel acts on no request from here on, and the one in progress ends first.
    vssd::hyperv::quiesce_all(std::time::Duration::from_secs(30)).await;
    agent.shutdown().await;
    systemd.flush(std::time::Duration::from_secs(1));
    ExitCode::SUCCESS
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hyperv_device_is_served_by_itself_only_when_no_channel_is_configured() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("hv_vss");
        let mut c = Config { sysfs: d.path().join("sys"), devfs: d.path().join("dev"), ..Config::default() };
        // No device: the default channel stays.
        assert!(choose_hyperv(&mut c, &dev).is_none());
        assert_eq!(c.channels, Config::default().channels);
        // The device, and no QGA port in this VM: Hyper-V alone (a missing port would stop vssd).
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(choose_hyperv(&mut c, &dev), Some(vec![ChannelSpec::HyperV(dev.clone())]));
        assert_eq!(c.channels, vec![ChannelSpec::HyperV(dev)]);
        // A config file that names its channels keeps them.
        let f = d.path().join("vssd.toml");
        std::fs::write(&f, "channels = [\"vsock:9\"]\n").unwrap();
        assert!(file_sets_channels(&f));
        std::fs::write(&f, "scope = \"/\"\n").unwrap();
        assert!(!file_sets_channels(&f));
        assert!(!file_sets_channels(&d.path().join("missing.toml")));
    }

    #[test]
    fn help_teaches_the_hyperv_channel() {
        let help = <Cli as clap::CommandFactory>::command().render_long_help().to_string();
        assert!(help.contains("hyperv[:PATH]"), "{help}");
        assert!(help.contains("/dev/vmbus/hv_vss"), "{help}");
    }
}
