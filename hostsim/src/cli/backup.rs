//! `vmctl backup` and `backup list|verify|restore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use hostsim::backup::{self, BackupRequest, Quiesce};
use hostsim::util;
use hostsim::vm::{self, Vm, VmConfig};

use super::{out, resolve, Cli, Fail};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct BackupCmd {
    #[command(subcommand)]
    pub(crate) action: Option<BackupAction>,
    /// The VM (omit in attach mode).
    pub(crate) name: Option<String>,
    /// Where backups go (default: the VM's backups/ directory; required in attach mode).
    #[arg(long, value_name = "DIR")]
    pub(crate) target: Option<PathBuf>,
    /// Copy only what changed since the last backup in the target.
    #[arg(long)]
    pub(crate) incremental: bool,
    /// required: fail unless the agent froze the guest; best-effort: a crash-consistent backup
    /// (marked so) when it cannot; off: do not ask the agent.
    #[arg(long, value_enum, default_value_t = Quiesce::BestEffort)]
    pub(crate) quiesce: Quiesce,
    /// vssd thaws by itself after this many seconds, whatever happens to vmctl.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub(crate) freeze_deadline: f64,
    /// Seconds to wait for the agent to answer before calling it silent.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub(crate) agent_timeout: f64,
    /// Limit the copy to this many MiB/s (the guest's disks stay responsive).
    #[arg(long, value_name = "MIB_PER_S")]
    pub(crate) bandwidth: Option<f64>,
    /// Verify the backup right after taking it (checksums, qemu-img check, fsck).
    #[arg(long)]
    pub(crate) verify: bool,
    /// With --connect: every running domain of every --connect host, each into TARGET/DOMAIN;
    /// one line per domain and a summary; the exit code is 0 only when every one succeeded.
    #[arg(long, conflicts_with = "name")]
    pub(crate) all: bool,
    /// With --all: only the domains whose names begin with PREFIX.
    #[arg(long, value_name = "PREFIX", requires = "all")]
    pub(crate) name_prefix: Option<String>,
    /// With --all: this many backups at once.
    #[arg(long, default_value_t = 1, value_name = "N", requires = "all")]
    pub(crate) parallel: usize,
    /// Skip the free-space check (for tests of the out-of-space path).
    #[arg(long, hide = true)]
    pub(crate) no_space_check: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum BackupAction {
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
    /// Delete old backups by retention rules; never one that a kept incremental needs.
    Prune {
        /// The VM (its backups/ directory), or use --target.
        name: Option<String>,
        /// The target directory (with --connect: where the domain's backups are).
        #[arg(long, value_name = "DIR")]
        target: Option<PathBuf>,
        /// Keep the N newest backups.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_last: usize,
        /// Keep the newest backup of each of the N newest days that have one.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_daily: usize,
        /// Keep the newest backup of each of the N newest weeks (from Monday) that have one.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_weekly: usize,
        /// Keep the newest backup of each of the N newest months that have one.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_monthly: usize,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Rebuild standalone disks from a backup and its chain.
    Restore {
        /// The backup directory.
        dir: PathBuf,
        /// Write NAME.qcow2 per disk here (with --connect and --as-vm: the new domain's disks).
        #[arg(long, value_name = "DIR", required_unless_present = "as_vm")]
        to: Option<PathBuf>,
        /// Make a new VM with the restored disks (the backed-up VM's config). With --connect
        /// (a local URI) and --to DIR: define a new libvirt domain from the backed-up domain
        /// XML (new name, uuid and MACs; the restored disks; its file logs in DIR), not started.
        #[arg(long, value_name = "NAME")]
        as_vm: Option<String>,
    },
}

pub(crate) fn run(cli: &Cli, b: &BackupCmd) -> Result<u8, Fail> {
    if b.all {
        return Err(Fail::new("--all backs up libvirt's domains: give --connect URI", 2));
    }
    let t = resolve(cli, b.name.as_deref())?;
    let target = match (&b.target, &t.vm) {
        (Some(d), _) => d.clone(),
        (None, Some(vm)) => vm.backup_dir(),
        (None, None) => return Err(Fail::new("attach mode needs --target DIR", 2)),
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
    let o = backup::run(&req)?;
    let m = &o.manifest;
    let verified = if b.verify { Some(backup::verify(&o.dir, true)?) } else { None };
    let copied: u64 = m.disks.iter().map(|d| d.copied_bytes).sum();
    let v = json!({
        "ok": true,
        "id": m.id,
        "dir": o.dir,
        "kind": m.kind,
        "consistency": m.consistency,
        "freeze_window_ms": m.timings.get(backup::step::FREEZE_WINDOW),
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
            t.get(backup::step::FREEZE_WINDOW),
            t.get(backup::step::FREEZE),
            t.get(backup::step::TRANSACTION),
            t.get(backup::step::THAW)
        ));
        s.push_str(&format!(
            "\n  copied {} in {:.1} s; total {:.1} s",
            util::human_bytes(copied),
            t.get(backup::step::COPY) / 1000.0,
            t.get(backup::step::TOTAL) / 1000.0
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

pub(crate) fn list(cli: &Cli, name: Option<&str>, target: Option<&Path>) -> Result<u8, Fail> {
    let dir = match (target, name) {
        (Some(t), _) => t.to_path_buf(),
        (None, Some(n)) => Vm::open(&cli.state_dir, n)?.backup_dir(),
        (None, None) => return Err(Fail::new("name a VM or give --target DIR", 2)),
    };
    let backup::Listing { good, leftovers: debris, .. } = backup::list(&dir)?;
    let items: Vec<Value> = good
        .iter()
        .filter(|(_, m)| name.is_none() || target.is_none() || Some(m.vm.as_str()) == name)
        .map(|(p, m)| {
            json!({"id": m.id, "dir": p, "vm": m.vm, "created": m.created, "kind": m.kind, "consistency": m.consistency,
                   "freeze_window_ms": m.timings.get(backup::step::FREEZE_WINDOW), "chain": m.chain,
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

pub(crate) fn verify(cli: &Cli, dir: &Path, fsck: bool) -> Result<u8, Fail> {
    let r = backup::verify(dir, fsck)?;
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
        for w in &r.warnings {
            s.push_str(&format!("\n  warning: {w}"));
        }
        s
    });
    Ok(if r.ok { 0 } else { 5 })
}

pub(crate) fn restore(cli: &Cli, dir: &Path, to: Option<&Path>, as_vm: Option<&str>) -> Result<u8, Fail> {
    let m = backup::Manifest::load(dir)?;
    if let Some(name) = as_vm {
        let Some(cfg) = &m.vm_config else {
            return Err(Fail::new("the backup has no VM config (attach mode); use --to DIR", 2));
        };
        let mut c: VmConfig = serde_json::from_value(cfg.clone())?;
        vm::check_name(name)?;
        c.name = name.to_string();
        let vmdir = cli.state_dir.join(name);
        if vmdir.exists() {
            return Err(Fail::new(format!("a VM named `{name}` exists already"), 1));
        }
        let scratch = cli.state_dir.join(format!(".restore-{name}"));
        let made = backup::restore(dir, &scratch)?;
        for d in &mut c.disks {
            d.path = scratch.join(format!("{}.qcow2", d.name));
            d.format = "qcow2".into();
        }
        let vm = Vm::create(&cli.state_dir, c, true);
        let _ = std::fs::remove_dir_all(&scratch);
        let vm = vm?;
        out(cli, json!({"ok": true, "vm": name, "dir": vm.dir, "disks": made.len()}), || {
            format!("restored {} as VM {name} ({}); start it with `vmctl start {name}`", m.id, vm.dir.display())
        });
        return Ok(0);
    }
    let to = to.expect("clap requires --to or --as-vm");
    let made = backup::restore(dir, to)?;
    out(cli, json!({"ok": true, "disks": made}), || {
        made.iter().map(|p| format!("restored {}", p.display())).collect::<Vec<_>>().join("\n")
    });
    Ok(0)
}
