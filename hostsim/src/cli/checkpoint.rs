//! vmctl's checkpoint commands: `checkpoint create|list|delete|destroyall`, `start
//! --checkpoint`, `suspend`, `resume`, `pause`, `unpause`, and the hidden stream ends
//! `__sink` / `__source` that QEMU runs through `exec:` migrations.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use hostsim::checkpoint::{self as ck, CheckpointError, CreateRequest, Digest, RestoreRequest};
use hostsim::quiesce::Quiesce;
use hostsim::util;
use hostsim::vm::Vm;

use super::{out, Cli, Fail};

/// `vmctl checkpoint ...`
#[derive(Subcommand, Debug)]
pub(crate) enum CheckpointAction {
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
    /// Keep the newest N checkpoints and delete the older ones (never the suspend checkpoint;
    /// leftovers of interrupted creates are for destroyall).
    Prune {
        /// The VM.
        vm: String,
        /// How many of the newest checkpoints to keep.
        #[arg(long, value_name = "N")]
        keep_last: usize,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `vmctl checkpoint create`.
#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
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
pub(crate) struct SuspendArgs {
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
pub(crate) struct ResumeArgs {
    /// The VM.
    pub vm: String,
    /// Check only the disk images' sizes, not their checksums (faster with big disks).
    #[arg(long)]
    pub no_verify_disks: bool,
}

/// `vmctl pause` / `vmctl unpause`.
#[derive(Args, Debug)]
pub(crate) struct VmArg {
    /// The VM.
    pub vm: String,
}

/// `vmctl __sink` (QEMU runs it): stdin → FILE, hashed on the way, fsynced.
#[derive(Args, Debug)]
pub(crate) struct SinkArgs {
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
pub(crate) struct SourceArgs {
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

fn open(cli: &Cli, vm: &str) -> Result<Vm, Fail> {
    if cli.qmp.is_some() {
        return Err(CheckpointError::NotManaged.into());
    }
    Ok(Vm::open(&cli.state_dir, vm).map_err(CheckpointError::from)?)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// `vmctl checkpoint ...`
pub(crate) fn checkpoint(cli: &Cli, a: &CheckpointAction) -> Result<u8, Fail> {
    match a {
        CheckpointAction::Create(c) => {
            let vm = open(cli, &c.vm)?;
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
            print_created(cli, &r, if c.poweroff { "powered off" } else { "" });
            Ok(0)
        }
        CheckpointAction::List { vm } => {
            let vm = open(cli, vm)?;
            let l = ck::list(&vm)?;
            let leftovers: Vec<(&PathBuf, String)> = l
                .leftovers
                .iter()
                .map(|p| (p, "an interrupted create".to_string()))
                .chain(l.unreadable.iter().map(|(p, why)| (p, why.clone())))
                .collect();
            let items: Vec<Value> = l
                .good
                .iter()
                .map(|(p, m)| {
                    json!({"name": m.name, "dir": p, "created": m.created, "kind": m.kind, "poweroff": m.poweroff,
                           "run-state": m.run_state, "memory-mib": m.config.memory_mib, "qemu": m.qemu.version,
                           "machine": m.qemu.machine, "state-bytes": m.state.size, "quiesce": m.quiesce,
                           "downtime-ms": m.timings.get(ck::step::DOWNTIME),
                           "disks": m.disks.iter().map(|d| json!({"name": d.name, "top": d.chain.first().map(|i| &i.path)})).collect::<Vec<_>>()})
                })
                .collect();
            let left: Vec<Value> = leftovers.iter().map(|(p, why)| json!({"dir": p, "why": why})).collect();
            let warnings = ck::exposure_warnings(&vm);
            let mut doc = json!({"ok": true, "vm": vm.config.name, "checkpoints": items, "incomplete": left});
            doc["warnings"] = json!(warnings);
            out(cli, doc, || {
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
                for (p, why) in &leftovers {
                    let interrupted = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(ck::TMP_PREFIX));
                    let hint = if interrupted {
                        "safe to delete; `vmctl checkpoint destroyall` does"
                    } else {
                        "kept: a newer vmctl may read it"
                    };
                    s.push_str(&format!("\n(not a checkpoint: {} — {why}; {hint})", p.display()));
                }
                for w in &warnings {
                    s.push_str(&format!("\nwarning: {w}"));
                }
                s
            });
            Ok(0)
        }
        CheckpointAction::Delete { vm, name } => {
            let vm = open(cli, vm)?;
            let removed = ck::delete(&vm, name)?;
            out(cli, json!({"ok": true, "deleted": name, "removed-images": removed}), || {
                let mut s = format!("deleted checkpoint {name}");
                if !removed.is_empty() {
                    s.push_str(&format!(" and {} image(s) nothing uses any more", removed.len()));
                }
                s
            });
            Ok(0)
        }
        CheckpointAction::Prune { vm, keep_last, dry_run } => {
            let vm = open(cli, vm)?;
            let p = ck::prune(&vm, *keep_last, *dry_run)?;
            let doc = json!({"ok": true, "dry-run": dry_run, "kept": p.kept, "deleted": p.deleted, "removed-images": p.removed_images});
            out(cli, doc, || {
                let verb = if *dry_run { "would delete" } else { "deleted" };
                let mut s = format!("kept {}", if p.kept.is_empty() { "none".into() } else { p.kept.join(", ") });
                s.push_str(&format!(
                    "\n{verb} {}",
                    if p.deleted.is_empty() { "none".into() } else { p.deleted.join(", ") }
                ));
                s
            });
            Ok(0)
        }
        CheckpointAction::Destroyall { vm } => {
            let vm = open(cli, vm)?;
            let (n, removed) = ck::destroy_all(&vm)?;
            out(cli, json!({"ok": true, "deleted": n, "removed-images": removed}), || {
                format!("deleted {n} checkpoint(s) and {} image(s) nothing uses any more", removed.len())
            });
            Ok(0)
        }
    }
}

fn print_created(cli: &Cli, r: &ck::Created, what: &str) {
    let m = &r.manifest;
    let t = &m.timings;
    let mut v = json!({"ok": true, "name": m.name, "dir": r.dir, "kind": m.kind, "poweroff": m.poweroff,
        "state-bytes": m.state.size, "ram-bytes": m.ram_bytes, "blake3": m.state.blake3, "timings": t,
        "quiesce": m.quiesce, "overlays": m.disks.iter().map(|d| &d.overlay).collect::<Vec<_>>()});
    if let Some(e) = &r.thaw_error {
        v["thaw-error"] = json!(e);
    }
    out(cli, v, || {
        let mut s = format!("checkpoint {} of {} in {}", m.name, m.vm, r.dir.display());
        if !what.is_empty() {
            s.push_str(&format!("; VM {what}"));
        }
        let downtime = if m.poweroff {
            "VM stopped".to_string()
        } else if m.run_state == "running" {
            format!("downtime {:.0} ms", t.get(ck::step::DOWNTIME))
        } else {
            "VM paused".to_string()
        };
        s.push_str(&format!(
            "\n  state {} ({:.0} MiB/s), {downtime}, total {:.2} s",
            util::human_bytes(m.state.size),
            m.state.size as f64 / 1048576.0 / (t.get(ck::step::STREAM).max(1.0) / 1000.0),
            t.get(ck::step::TOTAL) / 1000.0
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

fn print_restored(cli: &Cli, r: &ck::Restored, wait_agent: Option<bool>) {
    let m = &r.manifest;
    let t = &r.timings;
    let mut v = json!({"ok": true, "checkpoint": m.name, "vm": m.vm, "pid": r.pid, "run-state": r.run_state,
        "overlays": r.overlays, "removed-images": r.removed, "timings": t, "thawed": r.thawed,
        "agent-answered": wait_agent});
    if let Some(e) = &r.thaw_error {
        v["thaw-error"] = json!(e);
    }
    out(cli, v, || {
        let mut s = format!(
            "{} restored from checkpoint {} ({}, pid {}) in {:.2} s: stream {:.2} s ({:.0} MiB/s)",
            m.vm,
            m.name,
            r.run_state,
            r.pid.unwrap_or(0),
            t.get(ck::step::TOTAL) / 1000.0,
            t.get(ck::step::STREAM) / 1000.0,
            m.state.size as f64 / 1048576.0 / (t.get(ck::step::STREAM).max(1.0) / 1000.0)
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

/// `vmctl start VM --checkpoint NAME`.
pub(crate) fn start_from(cli: &Cli, vm: &str, name: &str, wait_agent: Option<f64>) -> Result<u8, Fail> {
    let vm = open(cli, vm)?;
    let r = ck::restore(
        &vm,
        &RestoreRequest { name: name.into(), verify_disks: true, agent_timeout: Duration::from_secs(30) },
    )?;
    let answered = wait_agent.map(|s| super::vm::wait_for_agent(&vm.agent_path(), secs(s)));
    print_restored(cli, &r, answered);
    Ok(if answered == Some(false) { 1 } else { 0 })
}

/// `vmctl suspend VM`.
pub(crate) fn suspend(cli: &Cli, a: &SuspendArgs) -> Result<u8, Fail> {
    let vm = open(cli, &a.vm)?;
    let r = ck::suspend(&vm, a.quiesce, secs(a.agent_timeout))?;
    print_created(cli, &r, "suspended (powered off); `vmctl resume` brings it back");
    Ok(0)
}

/// `vmctl start VM` of a suspended VM: resumes it (as `vmctl resume`), like a laptop's lid.
pub(crate) fn start_suspended(cli: &Cli, vm: &str, wait_agent: Option<f64>) -> Result<u8, Fail> {
    let v = open(cli, vm)?;
    let r = ck::resume(&v, true, Duration::from_secs(30))?;
    let answered = wait_agent.map(|s| super::vm::wait_for_agent(&v.agent_path(), secs(s)));
    print_restored(cli, &r, answered);
    Ok(if answered == Some(false) { 1 } else { 0 })
}

/// `vmctl start VM --force-boot` of a suspended VM: the saved state is discarded first (its
/// images stay while the live disks need them), so that a later start does not go back to it.
pub(crate) fn discard_suspend(cli: &Cli, vm: &str) -> Result<(), Fail> {
    let v = open(cli, vm)?;
    ck::delete(&v, ck::SUSPEND_NAME)?;
    Ok(())
}

/// `vmctl resume VM`.
pub(crate) fn resume(cli: &Cli, a: &ResumeArgs) -> Result<u8, Fail> {
    let vm = open(cli, &a.vm)?;
    let r = match ck::resume(&vm, !a.no_verify_disks, Duration::from_secs(30)) {
        Err(CheckpointError::NotFound { vm, .. }) => {
            return Err(Fail::new(format!("VM `{vm}` is not suspended (`vmctl suspend {vm}` suspends it)"), 2))
        }
        r => r?,
    };
    print_restored(cli, &r, None);
    Ok(0)
}

/// `vmctl pause VM` (`paused = true`) / `vmctl unpause VM`.
pub(crate) fn pause(cli: &Cli, a: &VmArg, paused: bool) -> Result<u8, Fail> {
    let vm = open(cli, &a.vm)?;
    if vm.pid().is_none() {
        return Err(CheckpointError::NotRunning(a.vm.clone()).into());
    }
    let state = ck::set_paused(&vm, paused)?;
    out(cli, json!({"ok": true, "vm": a.vm, "state": state}), || format!("{}: {state}", a.vm));
    Ok(0)
}

/// `vmctl __sink`.
pub(crate) fn sink(a: &SinkArgs) -> u8 {
    ck::run_sink(&a.out, &a.report)
}

/// `vmctl __source`.
pub(crate) fn source(a: &SourceArgs) -> u8 {
    ck::run_source(&a.input, &Digest { size: a.size, blake3: a.blake3.clone() }, &a.report)
}
