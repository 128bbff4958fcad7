//! vmctl's checkpoint commands: `checkpoint create|list|delete|destroyall`, `start
//! --checkpoint`, `suspend`, `resume`, `pause`, `unpause`, and the hidden stream ends
//! `__sink` / `__source` that QEMU runs through `exec:` migrations.
//!
//! main.rs owns the top-level parser; it hands these commands over with a [`Ctx`] and turns a
//! [`CliFailure`] into its error output and exit code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::backup::Quiesce;
use crate::checkpoint::{self as ck, CheckpointError, CreateRequest, Digest, RestoreRequest};
use crate::util;
use crate::vm::Vm;

/// What the commands need from the top-level parser.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// vmctl's state directory.
    pub state_dir: &'a Path,
    /// `--json`: one JSON document on stdout.
    pub json: bool,
    /// `--qmp` was given (attach mode): checkpoints need a VM vmctl manages.
    pub attach: bool,
}

/// A failed command: the message and vmctl's exit code.
#[derive(Debug)]
pub struct CliFailure {
    /// What to tell the user (the whole cause chain).
    pub msg: String,
    /// 1 failed, 2 bad usage, 3 VM unreachable or in the wrong state, 4 quiesce required and
    /// impossible, 5 the checkpoint failed its checks.
    pub code: u8,
}

impl From<CheckpointError> for CliFailure {
    fn from(e: CheckpointError) -> CliFailure {
        let code = e.exit_code();
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let t = s.to_string();
            if !msg.contains(&t) {
                msg.push_str(": ");
                msg.push_str(&t);
            }
            src = s.source();
        }
        CliFailure { msg, code }
    }
}

/// `vmctl checkpoint ...`
#[derive(Subcommand, Debug)]
pub enum CheckpointAction {
    /// Save the whole VM (RAM, devices, disks) at one instant; the VM goes on (or, with
    /// --poweroff, stops once the checkpoint is complete).
    Create(CreateArgs),
    /// The VM's complete checkpoints (leftovers of interrupted creates are named, never listed
    /// as checkpoints).
    List {
        /// The VM.
        vm: String,
    },
    /// Delete a checkpoint (images the VM still runs on are kept).
    Delete {
        /// The VM.
        vm: String,
        /// The checkpoint.
        name: String,
    },
    /// Delete every checkpoint of the VM, and the leftovers of interrupted creates.
    Destroyall {
        /// The VM.
        vm: String,
    },
}

/// `vmctl checkpoint create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM.
    pub vm: String,
    /// The checkpoint's name (default: the time, YYYYMMDD-HHMMSS-mmm).
    #[arg(long)]
    pub name: Option<String>,
    /// Quit QEMU once the checkpoint is complete and durable.
    #[arg(long)]
    pub poweroff: bool,
    /// Freeze the guest's filesystems through its agent around the checkpoint. The saved RAM
    /// holds the page cache, so a restore is exact without it (default off); it makes the
    /// checkpoint's disks usable on their own. A restore thaws the guest it brings back.
    #[arg(long, value_enum, default_value_t = Quiesce::Off)]
    pub quiesce: Quiesce,
    /// Seconds to wait for the agent to answer.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub agent_timeout: f64,
    /// Limit the state stream to this many MiB/s (default: no limit, not even QEMU's
    /// 128 MiB/s).
    #[arg(long, value_name = "MIB_PER_S")]
    pub bandwidth: Option<f64>,
    /// Save the RAM while the guest runs: QEMU stops it only for the last pass, when the disk
    /// overlays are taken, so the downtime is tens of milliseconds instead of the whole
    /// stream (about a second per GiB here). The stream is larger by what the guest dirties.
    #[arg(long)]
    pub live: bool,
}

/// `vmctl suspend`.
#[derive(Args, Debug)]
pub struct SuspendArgs {
    /// The VM.
    pub vm: String,
    /// As for `checkpoint create`.
    #[arg(long, value_enum, default_value_t = Quiesce::Off)]
    pub quiesce: Quiesce,
    /// Seconds to wait for the agent to answer.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub agent_timeout: f64,
}

/// `vmctl resume`.
#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The VM.
    pub vm: String,
    /// Check only the disk images' sizes, not their checksums (faster with big disks).
    #[arg(long)]
    pub no_verify_disks: bool,
}

/// `vmctl pause` / `vmctl unpause`.
#[derive(Args, Debug)]
pub struct VmArg {
    /// The VM.
    pub vm: String,
}

/// `vmctl __sink` (QEMU runs it): stdin → FILE, hashed on the way, fsynced.
#[derive(Args, Debug)]
pub struct SinkArgs {
    /// The state file to create.
    #[arg(long = "out")]
    pub out: PathBuf,
    /// Where to leave the size and checksum.
    #[arg(long)]
    pub report: PathBuf,
}

/// `vmctl __source` (QEMU runs it): FILE → stdout, hashed on the way; the tail is withheld
/// unless the whole file matches.
#[derive(Args, Debug)]
pub struct SourceArgs {
    /// The state file.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// Its size per the manifest.
    #[arg(long)]
    pub size: u64,
    /// Its BLAKE3 per the manifest.
    #[arg(long)]
    pub blake3: String,
    /// Where to leave the verdict.
    #[arg(long)]
    pub report: PathBuf,
}

fn open(ctx: &Ctx, vm: &str) -> Result<Vm, CliFailure> {
    if ctx.attach {
        return Err(CheckpointError::NotManaged.into());
    }
    Vm::open(ctx.state_dir, vm).map_err(|e| CheckpointError::from(e).into())
}

fn out(ctx: &Ctx, v: Value, human: impl FnOnce() -> String) {
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        let s = human();
        if !s.is_empty() {
            println!("{s}");
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// `vmctl checkpoint ...`
pub fn checkpoint(ctx: &Ctx, a: &CheckpointAction) -> Result<u8, CliFailure> {
    match a {
        CheckpointAction::Create(c) => {
            let vm = open(ctx, &c.vm)?;
            let req = CreateRequest {
                name: c.name.clone(),
                poweroff: c.poweroff,
                quiesce: c.quiesce,
                agent_timeout: secs(c.agent_timeout),
                bandwidth: c.bandwidth.map(|m| (m * 1048576.0).max(1.0) as u64),
                live: c.live,
                ..Default::default()
            };
            let r = ck::create(&vm, &req)?;
            print_created(ctx, &r, if c.poweroff { "powered off" } else { "" });
            Ok(0)
        }
        CheckpointAction::List { vm } => {
            let vm = open(ctx, vm)?;
            let l = ck::list(&vm)?;
            let items: Vec<Value> = l
                .good
                .iter()
                .map(|(p, m)| {
                    json!({"name": m.name, "dir": p, "created": m.created, "kind": m.kind, "poweroff": m.poweroff,
                           "run-state": m.run_state, "memory-mib": m.config.memory_mib, "qemu": m.qemu.version,
                           "machine": m.qemu.machine, "state-bytes": m.state.size, "quiesce": m.quiesce,
                           "downtime-ms": m.timings.downtime_ms,
                           "disks": m.disks.iter().map(|d| json!({"name": d.name, "top": d.chain.first().map(|i| &i.path)})).collect::<Vec<_>>()})
                })
                .collect();
            let left: Vec<Value> = l.leftovers.iter().map(|(p, why)| json!({"dir": p, "why": why})).collect();
            out(ctx, json!({"ok": true, "vm": vm.config.name, "checkpoints": items, "incomplete": left}), || {
                let mut s =
                    format!("{:<24} {:<10} {:<24} {:>10} {:>7}  {}", "NAME", "KIND", "CREATED", "STATE", "RAM", "QEMU");
                for (_, m) in &l.good {
                    s.push_str(&format!(
                        "\n{:<24} {:<10} {:<24} {:>10} {:>7}  {} {}",
                        m.name,
                        if m.poweroff && m.kind == "checkpoint" { "poweroff" } else { &m.kind },
                        m.created,
                        util::human_bytes(m.state.size),
                        format!("{}M", m.config.memory_mib),
                        m.qemu.version,
                        m.qemu.machine
                    ));
                }
                for (p, why) in &l.leftovers {
                    let interrupted = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(ck::TMP_PREFIX));
                    let hint = if interrupted {
                        "safe to delete; `vmctl checkpoint destroyall` does"
                    } else {
                        "kept: a newer vmctl may read it"
                    };
                    s.push_str(&format!("\n(not a checkpoint: {} — {why}; {hint})", p.display()));
                }
                s
            });
            Ok(0)
        }
        CheckpointAction::Delete { vm, name } => {
            let vm = open(ctx, vm)?;
            let removed = ck::delete(&vm, name)?;
            out(ctx, json!({"ok": true, "deleted": name, "removed-images": removed}), || {
                let mut s = format!("deleted checkpoint {name}");
                if !removed.is_empty() {
                    s.push_str(&format!(" and {} image(s) nothing uses any more", removed.len()));
                }
                s
            });
            Ok(0)
        }
        CheckpointAction::Destroyall { vm } => {
            let vm = open(ctx, vm)?;
            let (n, removed) = ck::destroy_all(&vm)?;
            out(ctx, json!({"ok": true, "deleted": n, "removed-images": removed}), || {
                format!("deleted {n} checkpoint(s) and {} image(s) nothing uses any more", removed.len())
            });
            Ok(0)
        }
    }
}

fn print_created(ctx: &Ctx, r: &ck::Created, what: &str) {
    let m = &r.manifest;
    let t = &m.timings;
    let mut v = json!({"ok": true, "name": m.name, "dir": r.dir, "kind": m.kind, "poweroff": m.poweroff,
        "state-bytes": m.state.size, "ram-bytes": m.ram_bytes, "blake3": m.state.blake3, "timings": t,
        "quiesce": m.quiesce, "overlays": m.disks.iter().map(|d| &d.overlay).collect::<Vec<_>>()});
    if let Some(e) = &r.thaw_error {
        v["thaw-error"] = json!(e);
    }
    out(ctx, v, || {
        let mut s = format!("checkpoint {} of {} in {}", m.name, m.vm, r.dir.display());
        if !what.is_empty() {
            s.push_str(&format!("; VM {what}"));
        }
        let downtime = if m.poweroff {
            "VM stopped".to_string()
        } else if m.run_state == "running" {
            format!("downtime {:.0} ms", t.downtime_ms)
        } else {
            "VM paused".to_string()
        };
        s.push_str(&format!(
            "\n  state {} ({:.0} MiB/s), {downtime}, total {:.2} s",
            util::human_bytes(m.state.size),
            m.state.size as f64 / 1048576.0 / (t.stream_ms.max(1.0) / 1000.0),
            t.total_ms / 1000.0
        ));
        if let Some(a) = &m.quiesce.agent {
            s.push_str(&format!("\n  quiesced by {a}: {} filesystem(s)", m.quiesce.frozen.unwrap_or(0)));
        }
        if let Some(n) = &m.quiesce.note {
            s.push_str(&format!("\n  note: {n}"));
        }
        if let Some(e) = &r.thaw_error {
            s.push_str(&format!("\n  WARNING: the thaw failed: {e}"));
        }
        s
    });
}

fn print_restored(ctx: &Ctx, r: &ck::Restored, wait_agent: Option<bool>) {
    let m = &r.manifest;
    let t = &r.timings;
    let mut v = json!({"ok": true, "checkpoint": m.name, "vm": m.vm, "pid": r.pid, "run-state": r.run_state,
        "overlays": r.overlays, "removed-images": r.removed, "timings": t, "thawed": r.thawed,
        "agent-answered": wait_agent});
    if let Some(e) = &r.thaw_error {
        v["thaw-error"] = json!(e);
    }
    out(ctx, v, || {
        let mut s = format!(
            "{} restored from checkpoint {} ({}, pid {}) in {:.2} s: stream {:.2} s ({:.0} MiB/s)",
            m.vm,
            m.name,
            r.run_state,
            r.pid.unwrap_or(0),
            t.total_ms / 1000.0,
            t.stream_ms / 1000.0,
            m.state.size as f64 / 1048576.0 / (t.stream_ms.max(1.0) / 1000.0)
        );
        if let Some(n) = r.thawed {
            s.push_str(&format!("; thawed {n} filesystem(s)"));
        }
        if let Some(e) = &r.thaw_error {
            s.push_str(&format!("\n  WARNING: {e}"));
        }
        match wait_agent {
            Some(true) => s.push_str("; the guest agent answers"),
            Some(false) => s.push_str("; the guest agent did not answer in time"),
            None => {}
        }
        s
    });
}

fn wait_for_agent(sock: &Path, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(mut g) = crate::qga::Qga::connect(sock) {
            g.sync_timeout = Duration::from_secs(2);
            if g.execute("guest-ping", None, Duration::from_secs(2)).is_ok() {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    false
}

/// `vmctl start VM --checkpoint NAME`.
pub fn start_from(ctx: &Ctx, vm: &str, name: &str, wait_agent: Option<f64>) -> Result<u8, CliFailure> {
    let vm = open(ctx, vm)?;
    let r = ck::restore(
        &vm,
        &RestoreRequest { name: name.into(), verify_disks: true, agent_timeout: Duration::from_secs(30) },
    )?;
    let answered = wait_agent.map(|s| wait_for_agent(&vm.agent_path(), secs(s)));
    print_restored(ctx, &r, answered);
    Ok(if answered == Some(false) { 1 } else { 0 })
}

/// `vmctl suspend VM`.
pub fn suspend(ctx: &Ctx, a: &SuspendArgs) -> Result<u8, CliFailure> {
    let vm = open(ctx, &a.vm)?;
    let r = ck::suspend(&vm, a.quiesce, secs(a.agent_timeout))?;
    print_created(ctx, &r, "suspended (powered off); `vmctl resume` brings it back");
    Ok(0)
}

/// `vmctl start VM` of a suspended VM: resumes it (as `vmctl resume`), like a laptop's lid.
pub fn start_suspended(ctx: &Ctx, vm: &str, wait_agent: Option<f64>) -> Result<u8, CliFailure> {
    let v = open(ctx, vm)?;
    let r = ck::resume(&v, true, Duration::from_secs(30))?;
    let answered = wait_agent.map(|s| wait_for_agent(&v.agent_path(), secs(s)));
    print_restored(ctx, &r, answered);
    Ok(if answered == Some(false) { 1 } else { 0 })
}

/// `vmctl start VM --force-boot` of a suspended VM: the saved state is discarded first (its
/// images stay while the live disks need them), so that a later start does not go back to it.
pub fn discard_suspend(ctx: &Ctx, vm: &str) -> Result<(), CliFailure> {
    let v = open(ctx, vm)?;
    ck::delete(&v, ck::SUSPEND_NAME)?;
    Ok(())
}

/// `vmctl resume VM`.
pub fn resume(ctx: &Ctx, a: &ResumeArgs) -> Result<u8, CliFailure> {
    let vm = open(ctx, &a.vm)?;
    let r = match ck::resume(&vm, !a.no_verify_disks, Duration::from_secs(30)) {
        Err(CheckpointError::NotFound { vm, .. }) => {
            return Err(CliFailure {
                msg: format!("VM `{vm}` is not suspended (`vmctl suspend {vm}` suspends it)"),
                code: 2,
            })
        }
        r => r?,
    };
    print_restored(ctx, &r, None);
    Ok(0)
}

/// `vmctl pause VM` (`paused = true`) / `vmctl unpause VM`.
pub fn pause(ctx: &Ctx, a: &VmArg, paused: bool) -> Result<u8, CliFailure> {
    let vm = open(ctx, &a.vm)?;
    if vm.pid().is_none() {
        return Err(CheckpointError::NotRunning(a.vm.clone()).into());
    }
    let state = ck::set_paused(&vm, paused)?;
    out(ctx, json!({"ok": true, "vm": a.vm, "state": state}), || format!("{}: {state}", a.vm));
    Ok(0)
}

/// `vmctl __sink`.
pub fn sink(a: &SinkArgs) -> u8 {
    ck::run_sink(&a.out, &a.report)
}

/// `vmctl __source`.
pub fn source(a: &SourceArgs) -> u8 {
    ck::run_source(&a.input, &Digest { size: a.size, blake3: a.blake3.clone() }, &a.report)
}
