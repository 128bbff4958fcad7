//! `vssctl`: look at and steer the local vssd; thaw by hand in an emergency.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qga_wire::{Client, ClientError};
use serde_json::{json, Value};

/// vssctl: status, freeze and thaw of the local vssd.
///
/// Talks to vssd's control socket (the same qemu-guest-agent protocol the host uses).
/// `thaw --all` also works when vssd is dead or hung: it thaws every filesystem under the
/// scope directly.
///
/// Exit codes: 0 done; 1 vssd refused or the operation failed; 2 bad usage; 3 vssd unreachable.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  vssctl status\n  vssctl plan                       # what a freeze would do, and why\n  vssctl freeze --deadline 30 /srv/db\n  vssctl thaw\n  vssctl thaw --all                 # emergency: thaw everything, with or without vssd"
)]
struct Cli {
    /// vssd's control socket (or any unix channel of it).
    #[arg(long, global = true, default_value = "/run/vssd/vssd.sock", env = "VSSD_SOCKET")]
    socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for vssd's answer (a freeze may take long on a busy disk).
    #[arg(long, global = true, default_value_t = 120.0)]
    timeout: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Frozen or thawed, what is frozen, how long until the deadline, the last automatic thaw.
    Status,
    /// Every mount in scope and what a freeze would do with it, with the reason.
    Plan {
        /// Plan for exactly these mount points.
        mountpoints: Vec<PathBuf>,
    },
    /// Freeze every eligible filesystem (or the given mount points) until `thaw` or the deadline.
    Freeze {
        /// Seconds until vssd thaws by itself (default: vssd's freeze-deadline).
        #[arg(long)]
        deadline: Option<f64>,
        /// skip (report and go on) or veto (fail) when a filesystem cannot be frozen.
        #[arg(long, value_name = "POLICY", value_parser = ["skip", "veto"])]
        cannot_freeze: Option<String>,
        /// Freeze exactly these mount points.
        mountpoints: Vec<PathBuf>,
    },
    /// Thaw what vssd froze.
    Thaw {
        /// Emergency: if vssd does not answer, thaw directly every filesystem under --scope and
        /// what vssd's freeze marker lists.
        #[arg(long)]
        all: bool,
        /// With --all: only filesystems at or below this path are thawed directly.
        #[arg(long, default_value = "/")]
        scope: PathBuf,
        /// With --all: vssd's state directory (for its freeze marker).
        #[arg(long, default_value = "/run/vssd")]
        state_dir: PathBuf,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Debug)]
enum Failure {
    Unreachable(String),
    Refused(String),
}

/// One exchange with vssd through the shared QGA client: resynchronise (0xFF +
/// guest-sync-delimited, as libvirt does, so a half request left on the channel cannot confuse
/// us), then the command.
fn call(socket: &Path, timeout: Duration, execute: &str, args: Value) -> Result<Value, Failure> {
    let mut c = Client::connect(socket).map_err(|e| unreachable(socket, e))?;
    c.sync_timeout = timeout;
    c.execute(execute, Some(args), timeout).map_err(|e| unreachable(socket, e))
}

/// vssctl's words for what the client met: vssd refused, or could not be talked to.
fn unreachable(socket: &Path, e: ClientError) -> Failure {
    match e {
        ClientError::Command { desc, .. } => Failure::Refused(desc),
        ClientError::Connect { source, .. } => Failure::Unreachable(format!(
            "cannot reach vssd at {}: {source} (is vssd running? `--socket` names another)",
            socket.display()
        )),
        ClientError::Closed => Failure::Unreachable("vssd closed the connection".into()),
        ClientError::Silent { after, .. } | ClientError::NoReply { after, .. } => {
            Failure::Unreachable(format!("no answer from vssd within {after:?}"))
        }
        ClientError::Io(source) => Failure::Unreachable(format!("talking to vssd: {source}")),
        ClientError::BadReply { source, .. } => Failure::Unreachable(format!("bad reply: {source}")),
        other => Failure::Unreachable(other.to_string()),
    }
}

fn paths(p: &[PathBuf]) -> Value {
    p.iter().map(|p| Value::from(p.display().to_string())).collect()
}

fn print_mounts(v: &Value) {
    let Some(mounts) = v["mounts"].as_array() else { return };
    println!("{:<32} {:<8} {:<16} {:>5}  REASON", "MOUNTPOINT", "FSTYPE", "OUTCOME", "LEVEL");
    for m in mounts {
        println!(
            "{:<32} {:<8} {:<16} {:>5}  {}",
            m["mountpoint"].as_str().unwrap_or("?"),
            m["fstype"].as_str().unwrap_or("?"),
            m["outcome"].as_str().unwrap_or("?"),
            m["level"],
            m["reason"].as_str().unwrap_or("")
        );
    }
}

fn run(cli: &Cli) -> Result<Value, Failure> {
    let timeout = Duration::from_secs_f64(cli.timeout.max(0.1));
    match &cli.cmd {
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command().name("vssctl");
            clap_mangen::Man::new(cmd)
                .section("8")
                .render(&mut std::io::stdout())
                .map_err(|e| Failure::Refused(e.to_string()))?;
            std::process::exit(0);
        }
        Cmd::Status => {
            let v = call(&cli.socket, timeout, "vssd-status", json!({}))?;
            if !cli.json {
                println!("status: {}", v["status"].as_str().unwrap_or("?"));
                println!("scope:  {}", v["scope"].as_str().unwrap_or("?"));
                if let Some(f) = v["frozen"].as_array().filter(|f| !f.is_empty()) {
                    println!("frozen: {}", f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "));
                    println!("thaws by itself in {} ms unless thawed", v["deadline-in-ms"]);
                }
                if let Some(a) = v.get("last-auto-thaw") {
                    println!(
                        "last automatic thaw: {} (after {} ms frozen)",
                        a["reason"].as_str().unwrap_or("?"),
                        a["frozen-for-ms"]
                    );
                }
                if let Some(p) = v.get("prepared") {
                    println!(
                        "prepared: freeze {} announced ({} filesystem(s), {} app(s) got PREPARE); cancelled in {} ms unless it comes",
                        p["freeze-id"], p["to-freeze"], p["apps"], p["expires-in-ms"]
                    );
                }
                for h in v["hyperv"].as_array().into_iter().flatten() {
                    let version = h["kernel-version"].as_u64().map_or("none".to_string(), |n| n.to_string());
                    println!(
                        "hyperv: {} ({}, kernel version {version}, {} request(s), last: {})",
                        h["device"].as_str().unwrap_or("?"),
                        if h["registered"] == true { "registered" } else { "not registered" },
                        h["requests"],
                        h["last"].as_str().unwrap_or("none")
                    );
                }
            }
            Ok(v)
        }
        Cmd::Plan { mountpoints } => {
            let args = if mountpoints.is_empty() { json!({}) } else { json!({"mountpoints": paths(mountpoints)}) };
            let v = call(&cli.socket, timeout, "vssd-plan", args)?;
            if !cli.json {
                print_mounts(&v);
            }
            Ok(v)
        }
        Cmd::Freeze { deadline, cannot_freeze, mountpoints } => {
            let mut args = json!({"bind-to-channel": false});
            if !mountpoints.is_empty() {
                args["mountpoints"] = paths(mountpoints);
            }
            if let Some(d) = deadline {
                args["deadline"] = json!(d);
            }
            if let Some(p) = cannot_freeze {
                args["cannot-freeze"] = json!(p);
            }
            let v = call(&cli.socket, timeout, "vssd-freeze", args)?;
            if !cli.json {
                print_mounts(&v);
                println!(
                    "frozen {} filesystem(s) in {} ms; vssd thaws by itself in {} s unless `vssctl thaw` comes first",
                    v["frozen"],
                    v["elapsed-ms"],
                    v["deadline-ms"].as_u64().unwrap_or(0) as f64 / 1000.0
                );
            }
            Ok(v)
        }
        Cmd::Thaw { all, scope, state_dir } => {
            let via_vssd = call(&cli.socket, timeout, "vssd-thaw", json!({}));
            match via_vssd {
                Ok(v) => {
                    if !cli.json {
                        println!("thawed {} filesystem(s)", v["thawed"]);
                    }
                    Ok(v)
                }
                Err(Failure::Unreachable(why)) if *all => {
                    eprintln!("vssctl: {why}; thawing directly under {}", scope.display());
                    let v = direct_thaw(scope, state_dir);
                    if !cli.json {
                        for t in v["thawed"].as_array().into_iter().flatten() {
                            println!("thawed {}", t.as_str().unwrap_or("?"));
                        }
                        println!(
                            "{} filesystem(s) were frozen and are thawed now",
                            v["thawed"].as_array().map_or(0, Vec::len)
                        );
                    }
                    match v["errors"].as_array() {
                        Some(e) if !e.is_empty() => {
                            Err(Failure::Refused(format!("some thaws failed: {}", Value::from(e.clone()))))
                        }
                        _ => Ok(v),
                    }
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// FITHAW on every freezable filesystem under `scope` and on what vssd's marker lists, lower
/// filesystems first (a filesystem stored in a file on another thaws after it, or its thaw
/// would wait on the frozen one below). FITHAW on a filesystem that is not frozen fails with
/// EINVAL and changes nothing.
fn direct_thaw(scope: &Path, state_dir: &Path) -> Value {
    let mut targets: Vec<(PathBuf, u32)> = Vec::new();
    let mut add = |p: PathBuf, level: u32| {
        if !targets.iter().any(|(t, _)| *t == p) {
            targets.push((p, level));
        }
    };
    if let Ok(mounts) = kmod_shim::mountinfo::read(Path::new("/proc/self/mountinfo")) {
        let topo = kmod_shim::topology::Topology::default();
        let backing = |m: &kmod_shim::mountinfo::Mount| vssd::plan::backing_devs(m, &mounts, &topo);
        if let Ok(plan) = vssd::plan::plan(&mounts, &vssd::plan::PlanOptions::new(scope), &backing) {
            for m in plan.levels.iter().flatten().map(|&i| &plan.mounts[i]) {
                add(m.mount_point.clone(), m.level);
            }
        }
    }
    if let Ok(bytes) = std::fs::read(state_dir.join("frozen.json")) {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            for f in v["filesystems"].as_array().into_iter().flatten() {
                if let Some(p) = f["mount_point"].as_str() {
                    add(PathBuf::from(p), f["level"].as_u64().unwrap_or(0) as u32);
                }
            }
        }
    }
    targets.sort_by_key(|(_, level)| std::cmp::Reverse(*level));
    let mut thawed = Vec::new();
    let mut errors = Vec::new();
    for (t, _) in &targets {
        match kmod_shim::freeze::thaw_path(t) {
            Ok(()) => thawed.push(Value::from(t.display().to_string())),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOENT | libc::ENOTDIR)) => {
            }
            Err(e) => errors.push(json!({"mountpoint": t.display().to_string(), "error": e.to_string()})),
        }
    }
    // A filesystem that did not thaw stays recorded: the next vssd start (or the next
    // `thaw --all`) retries it, as vssd does with a failed FITHAW.
    if errors.is_empty() {
        let _ = std::fs::remove_file(state_dir.join("frozen.json"));
    }
    json!({"thawed": thawed, "errors": errors})
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(v) => {
            if cli.json {
                println!("{v}");
            }
            ExitCode::SUCCESS
        }
        Err(Failure::Refused(m)) => {
            if cli.json {
                println!("{}", json!({"error": m}));
            }
            eprintln!("vssctl: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(m)) => {
            if cli.json {
                println!("{}", json!({"error": m}));
            }
            eprintln!("vssctl: {m}");
            ExitCode::from(3)
        }
    }
}
