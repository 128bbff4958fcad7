//! `vmctl --connect URI ...`: the commands on libvirt's domains ([`hostsim::libvirt`]), with
//! the output shapes (and `--json`) of the same commands on vmctl's own VMs. `backup
//! list|verify|restore` work on the target directory and need no libvirt: they are the
//! common ones.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use hostsim::backup::step;
use hostsim::libvirt::backup::{self as lvbackup, Request};
use hostsim::libvirt::{Dom, Host};
use hostsim::util;

use hostsim::libvirt::checkpoint as lvck;
use hostsim::quiesce::Quiesce;

use super::backup::{BackupAction, BackupCmd};
use super::checkpoint::CheckpointAction;
use super::{out, Cli, Cmd, Fail};

/// Runs `cli.cmd` on libvirt's domains; None for the commands that do not need libvirt.
pub(crate) fn run(cli: &Cli) -> Option<Result<u8, Fail>> {
    let first = cli.connect.first()?.as_str();
    Some(match &cli.cmd {
        Cmd::List => list(cli),
        Cmd::Status { name } => with_domain(first, name.as_deref(), |d| status(cli, d)),
        Cmd::Fsfreeze { name, deadline, mountpoints } => {
            with_domain(first, name.as_deref(), |d| fsfreeze(cli, d, *deadline, mountpoints))
        }
        Cmd::Fsthaw { name } => with_domain(first, name.as_deref(), |d| {
            let r = d.agent().run("guest-fsfreeze-thaw", None, Duration::from_secs(60))?;
            out(cli, json!({"ok": true, "thawed": r}), || format!("thawed {r} filesystem(s)"));
            Ok(0)
        }),
        Cmd::Fsstatus { name } => with_domain(first, name.as_deref(), |d| {
            let g = d.agent();
            let info = g.info(Duration::from_secs(10))?;
            let r = g.run("guest-fsfreeze-status", None, Duration::from_secs(10))?;
            out(cli, json!({"ok": true, "agent": info.describe(), "status": r}), || {
                format!("{}: {}", info.describe(), r.as_str().unwrap_or("?"))
            });
            Ok(0)
        }),
        Cmd::Backup(b) if b.action.is_none() => backup(cli, b),
        Cmd::Backup(BackupCmd { action: Some(BackupAction::Restore { dir, to, as_vm: Some(name) }), .. }) => {
            restore_as_domain(cli, first, dir, to.as_deref(), name)
        }
        Cmd::Backup(BackupCmd { action: Some(BackupAction::List { .. } | BackupAction::Verify { .. } | BackupAction::Prune { .. }), .. })
        | Cmd::Backup(BackupCmd { action: Some(BackupAction::Restore { as_vm: None, .. }), .. })
        | Cmd::Man => return None,
        Cmd::Checkpoint(a) => checkpoint(cli, first, a),
        // Suspend to disk and back: libvirt's managed save (`virsh managedsave`; `virsh
        // start` restores it and discards it).
        Cmd::Suspend(a) if a.quiesce == Quiesce::Off => with_domain(first, Some(&a.vm), |d| {
            let t = std::time::Instant::now();
            d.virsh(&["managedsave", "{}"])?;
            let ms = util::ms(t.elapsed());
            out(cli, json!({"ok": true, "vm": d.name, "state": d.status()?.state, "took_ms": ms}), || {
                format!("suspended {} to disk in {ms:.0} ms (libvirt's managed save); `vmctl --connect URI resume {}` brings it back", d.name, d.name)
            });
            Ok(0)
        }),
        Cmd::Resume(a) => with_domain(first, Some(&a.vm), |d| {
            if !d.virsh(&["dominfo", "{}"])?.lines().any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes")) {
                return Err(Fail::new(format!("domain `{}` has no managed save to resume (`vmctl --connect URI suspend {}` makes one)", d.name, d.name), 1));
            }
            d.virsh(&["start", "{}"])?;
            out(cli, json!({"ok": true, "vm": d.name, "state": d.status()?.state}), || format!("resumed {}", d.name));
            Ok(0)
        }),
        Cmd::Start { name, checkpoint: Some(c), .. } => with_domain(first, Some(name), |d| {
            let redefined = lvck::restore(d, &cli.state_dir, c)?;
            out(cli, json!({"ok": true, "vm": d.name, "checkpoint": c, "redefined": redefined}), || {
                let again = if redefined { " (its libvirt metadata redefined from vmctl's manifest)" } else { "" };
                format!("domain {} is back at checkpoint {c}{again}, running", d.name)
            });
            Ok(0)
        }),
        _ => Err(Fail::new(
            "with --connect, vmctl has list, status, fsfreeze, fsthaw, fsstatus, backup and backup list|verify|prune|restore, checkpoint create|list|delete|prune|destroyall, start --checkpoint, suspend (no --quiesce) and resume",
            2,
        )),
    })
}

/// `checkpoint ...` on a libvirt domain ([`hostsim::libvirt::checkpoint`]).
fn checkpoint(cli: &Cli, uri: &str, a: &CheckpointAction) -> Result<u8, Fail> {
    match a {
        CheckpointAction::Create(c) => {
            if c.live || c.bandwidth.is_some() || c.quiesce != Quiesce::Off {
                return Err(Fail::new(
                    "with --connect, a checkpoint is libvirt's internal snapshot: no --live, --bandwidth or --quiesce (it holds the RAM, so a restore is exact)",
                    2,
                ));
            }
            with_domain(uri, Some(&c.vm), |d| {
                let m = lvck::create(d, &cli.state_dir, c.name.as_deref(), c.poweroff)?;
                out(
                    cli,
                    json!({"ok": true, "vm": d.name, "name": m.name, "created": m.created, "poweroff": m.poweroff, "took_ms": m.took_ms}),
                    || {
                        let off = if m.poweroff { "; the domain is off" } else { "" };
                        format!("checkpoint {} of {} in {:.0} ms{off}", m.name, d.name, m.took_ms)
                    },
                );
                Ok(0)
            })
        }
        CheckpointAction::List { vm } => with_domain(uri, Some(vm), |d| {
            let l = lvck::list(d, &cli.state_dir)?;
            out(cli, json!({"ok": true, "vm": d.name, "checkpoints": l}), || {
                let mut s = format!("{:<24} {:<26} {}", "NAME", "CREATED", "KEPT BY");
                for e in &l {
                    let by = match (e.in_libvirt, e.in_vmctl) {
                        (true, true) => "libvirt, vmctl",
                        (true, false) => "libvirt only",
                        (false, _) => "vmctl only (restore redefines it)",
                    };
                    s.push_str(&format!("\n{:<24} {:<26} {by}", e.name, e.created));
                }
                s
            });
            Ok(0)
        }),
        CheckpointAction::Delete { vm, name } => with_domain(uri, Some(vm), |d| {
            lvck::delete(d, &cli.state_dir, name)?;
            out(cli, json!({"ok": true, "deleted": name}), || format!("deleted checkpoint {name}"));
            Ok(0)
        }),
        CheckpointAction::Destroyall { vm } => with_domain(uri, Some(vm), |d| {
            let l = lvck::list(d, &cli.state_dir)?;
            for e in &l {
                lvck::delete(d, &cli.state_dir, &e.name)?;
            }
            out(cli, json!({"ok": true, "deleted": l.len()}), || format!("deleted {} checkpoint(s)", l.len()));
            Ok(0)
        }),
        CheckpointAction::Prune { vm, keep_last, dry_run } => with_domain(uri, Some(vm), |d| {
            let l = lvck::list(d, &cli.state_dir)?;
            let (kept, doomed): (Vec<_>, Vec<_>) = l.iter().rev().enumerate().partition(|(i, _)| *i < *keep_last);
            let kept: Vec<&str> = kept.iter().map(|(_, e)| e.name.as_str()).collect();
            let doomed: Vec<&str> = doomed.iter().map(|(_, e)| e.name.as_str()).collect();
            if !dry_run {
                for n in &doomed {
                    lvck::delete(d, &cli.state_dir, n)?;
                }
            }
            out(cli, json!({"ok": true, "dry-run": dry_run, "kept": kept, "deleted": doomed}), || {
                let verb = if *dry_run { "would delete" } else { "deleted" };
                format!("kept {}\n{verb} {}", kept.join(", "), doomed.join(", "))
            });
            Ok(0)
        }),
    }
}

/// `backup restore DIR --as-vm NAME --to DISKS` with --connect: a new libvirt domain.
fn restore_as_domain(cli: &Cli, uri: &str, dir: &Path, to: Option<&Path>, name: &str) -> Result<u8, Fail> {
    let Some(to) = to else {
        return Err(Fail::new(
            "with --connect, --as-vm needs --to DIR: where the restored disks live (libvirt's QEMU opens them there)",
            2,
        ));
    };
    let host = Host::open(uri)?;
    let r = hostsim::libvirt::restore::restore_as_domain(&host, dir, to, name)?;
    out(cli, json!({"ok": true, "vm": r.name, "uri": uri, "disks": r.disks, "xml": r.xml}), || {
        format!(
            "restored {} as libvirt domain {name} ({} disk(s) in {}, defined from {}); start it with `virsh -c {uri} start {name}`",
            dir.display(),
            r.disks.len(),
            to.display(),
            r.xml.display()
        )
    });
    Ok(0)
}

fn with_domain(uri: &str, name: Option<&str>, f: impl FnOnce(&Dom) -> Result<u8, Fail>) -> Result<u8, Fail> {
    let Some(name) = name else { return Err(Fail::new("name a domain (`vmctl --connect URI list`)", 2)) };
    let host = Host::open(uri)?;
    let d = host.domain(name)?;
    f(&d)
}

fn list(cli: &Cli) -> Result<u8, Fail> {
    let mut all = Vec::new();
    for uri in &cli.connect {
        all.extend(Host::open(uri)?.list()?);
    }
    out(cli, json!({"ok": true, "vms": all}), || {
        let mut s = format!("{:<28} {:<12} {:>5} {:>8}  {}", "NAME", "STATE", "VCPUS", "MEMORY", "URI");
        for d in &all {
            s.push_str(&format!("\n{:<28} {:<12} {:>5} {:>6}Mi  {}", d.name, d.state, d.vcpus, d.memory_mib, d.uri));
        }
        s
    });
    Ok(0)
}

fn status(cli: &Cli, d: &Dom) -> Result<u8, Fail> {
    let st = d.status()?;
    let agent = if d.is_active() {
        let g = d.agent();
        match g.info(Duration::from_secs(3)) {
            Ok(info) => {
                let fs = g.run("guest-fsfreeze-status", None, Duration::from_secs(3)).ok();
                json!({"agent": info.describe(), "fsfreeze": fs})
            }
            Err(_) => Value::Null,
        }
    } else {
        Value::Null
    };
    out(cli, json!({"ok": true, "status": st, "agent": agent}), || {
        let mut s = format!("{}: {} ({})", st.name, st.state, st.uri);
        if let Some(a) = agent["agent"].as_str() {
            s.push_str(&format!("; agent {a}, {}", agent["fsfreeze"].as_str().unwrap_or("?")));
        } else if st.state == "running" {
            s.push_str("; agent not answering");
        }
        s
    });
    Ok(0)
}

fn fsfreeze(cli: &Cli, d: &Dom, deadline: f64, mountpoints: &[String]) -> Result<u8, Fail> {
    let g = d.agent();
    let info = g.info(Duration::from_secs(10))?;
    let limit = Duration::from_secs(120);
    let r = if info.is_vssd {
        let mut args = json!({"deadline": deadline, "bind-to-channel": false});
        if !mountpoints.is_empty() {
            args["mountpoints"] = json!(mountpoints);
        }
        g.run("vssd-freeze", Some(args), limit)?
    } else if mountpoints.is_empty() {
        g.run("guest-fsfreeze-freeze", None, limit)?
    } else {
        g.run("guest-fsfreeze-freeze-list", Some(json!({"mountpoints": mountpoints})), limit)?
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

fn request(b: &BackupCmd, pull: bool, uri: &str, domain: &str, target: PathBuf) -> Request {
    Request {
        uri: uri.to_string(),
        domain: domain.to_string(),
        target,
        pull,
        incremental: b.incremental,
        quiesce: b.quiesce,
        freeze_deadline: Duration::from_secs_f64(b.freeze_deadline),
        freeze_timeout: Duration::from_secs_f64(b.freeze_deadline.max(1.0)),
        agent_timeout: Duration::from_secs_f64(b.agent_timeout),
    }
}

/// What one backup printed: its JSON and its line.
fn outcome_json(o: &hostsim::backup::BackupOutcome, verified: Option<&hostsim::backup::VerifyReport>) -> Value {
    let m = &o.manifest;
    json!({
        "ok": verified.is_none_or(|v| v.ok),
        "id": m.id,
        "vm": m.vm,
        "dir": o.dir,
        "kind": m.kind,
        "consistency": m.consistency,
        "freeze_window_ms": m.timings.get(step::FREEZE_WINDOW),
        "timings": m.timings,
        "agent": m.quiesce.agent,
        "frozen": m.quiesce.frozen,
        "note": m.quiesce.note,
        "copied_bytes": m.disks.iter().map(|d| d.copied_bytes).sum::<u64>(),
        "chain": m.chain,
        "verify": verified,
    })
}

fn backup(cli: &Cli, b: &BackupCmd) -> Result<u8, Fail> {
    if b.bandwidth.is_some() {
        return Err(Fail::new(
            "--bandwidth is not available with --connect (libvirt's backup job has no speed limit)",
            2,
        ));
    }
    let Some(target) = &b.target else {
        return Err(Fail::new("with --connect, give --target DIR (on the host that runs the domain)", 2));
    };
    if b.all {
        return backup_all(cli, b, target);
    }
    let Some(name) = &b.name else { return Err(Fail::new("name a domain, or --all", 2)) };
    if cli.connect.len() > 1 {
        return Err(Fail::new("one domain is on one host: give one --connect URI (several go with --all)", 2));
    }
    let o = lvbackup::run(&request(b, cli.pull, &cli.connect[0], name, target.clone()))?;
    let verified = if b.verify { Some(hostsim::backup::verify(&o.dir, true)?) } else { None };
    let v = outcome_json(&o, verified.as_ref());
    let m = &o.manifest;
    out(cli, v.clone(), || {
        let copied = v["copied_bytes"].as_u64().unwrap_or(0);
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
            "\n  freeze window: {:.1} ms (freeze {:.1} + backup-begin {:.1} + thaw {:.1})",
            t.get(step::FREEZE_WINDOW),
            t.get(step::FREEZE),
            t.get(step::TRANSACTION),
            t.get(step::THAW)
        ));
        s.push_str(&format!(
            "\n  copied {} in {:.1} s; total {:.1} s",
            util::human_bytes(copied),
            t.get(step::COPY) / 1000.0,
            t.get(step::TOTAL) / 1000.0
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

/// `backup --all`: every running domain of every `--connect` host, `--parallel` at once, into
/// TARGET/DOMAIN; one line each and a summary. One failure stops nothing else.
fn backup_all(cli: &Cli, b: &BackupCmd, target: &std::path::Path) -> Result<u8, Fail> {
    let mut jobs = Vec::new();
    // A host that cannot be reached is one failure, like a domain's: the others go on.
    let mut unreachable = Vec::new();
    for uri in &cli.connect {
        match Host::open(uri).and_then(|h| h.running()) {
            Ok(doms) => {
                for d in doms {
                    if b.name_prefix.as_ref().is_some_and(|p| !d.starts_with(p.as_str())) {
                        continue;
                    }
                    jobs.push((uri.clone(), d));
                }
            }
            Err(e) => {
                let v = json!({"ok": false, "vm": "(host)", "uri": uri, "error": util::error_chain(&e), "exit-code": e.exit_code()});
                if !cli.json {
                    println!("{}  ({uri})", line(&v));
                }
                unreachable.push(v);
            }
        }
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Value>>> = Mutex::new(vec![None; jobs.len()]);
    let workers = b.parallel.max(1).min(jobs.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((uri, dom)) = jobs.get(i) else { break };
                let v = match lvbackup::run(&request(b, cli.pull, uri, dom, target.join(dom))) {
                    Ok(o) => {
                        let verified = if b.verify { hostsim::backup::verify(&o.dir, true).ok() } else { None };
                        outcome_json(&o, verified.as_ref())
                    }
                    Err(e) => {
                        json!({"ok": false, "vm": dom, "error": util::error_chain(&e), "exit-code": e.exit_code()})
                    }
                };
                let mut v = v;
                v["uri"] = json!(uri);
                if !cli.json {
                    println!("{}", line(&v));
                }
                results.lock().unwrap()[i] = Some(v);
            });
        }
    });
    let results: Vec<Value> = results.into_inner().unwrap().into_iter().flatten().collect();
    let failed = results.iter().filter(|r| r["ok"] != json!(true)).count();
    let ok = failed == 0 && unreachable.is_empty();
    let mut summary = format!("{} of {} domain(s) backed up, {failed} failed", results.len() - failed, results.len());
    if !unreachable.is_empty() {
        summary.push_str(&format!("; {} host(s) not reached", unreachable.len()));
    }
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"ok": ok, "backups": results, "failed": failed, "unreachable": unreachable, "summary": summary})
            )
            .unwrap()
        );
    } else {
        println!("{summary}");
    }
    Ok(if ok { 0 } else { 1 })
}

/// One domain's line of `backup --all`.
fn line(v: &Value) -> String {
    let vm = v["vm"].as_str().unwrap_or("?");
    if v["ok"] != json!(true) && v.get("error").is_some() {
        return format!("{vm:<28} FAILED  {}", v["error"].as_str().unwrap_or(""));
    }
    format!(
        "{vm:<28} {:<4} {:<11} window {:>7.1} ms  {:>10}  {}{}",
        if v["ok"] == json!(true) { "ok" } else { "BAD" },
        v["consistency"].as_str().unwrap_or(""),
        v["freeze_window_ms"].as_f64().unwrap_or(0.0),
        util::human_bytes(v["copied_bytes"].as_u64().unwrap_or(0)),
        v["id"].as_str().unwrap_or(""),
        v["note"].as_str().map(|n| format!("  ({n})")).unwrap_or_default()
    )
}
