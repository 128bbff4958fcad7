//! `vmctl backup prune`: retention for a target's backups (vmctl's own VMs and libvirt
//! domains alike: both write the same manifests).
//!
//! Invariants:
//! - A backup is kept when a `--keep-*` rule picks it, or when a kept backup's chain needs it
//!   (an incremental is useless without its parent and the full below it): nothing a kept
//!   incremental needs is ever deleted.
//! - Without any `--keep-*` rule nothing is deleted (the command refuses).
//! - Rules count per VM, newest first; `--keep-daily N` keeps the newest backup of each of the
//!   N newest days that have one (weekly: weeks from Monday, monthly: calendar months), as
//!   restic and borg do.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::json;

use hostsim::backup::{self, Manifest};
use hostsim::util;

use super::{out, Cli, Fail};

/// How many of each to keep.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Keep {
    pub(crate) last: usize,
    pub(crate) daily: usize,
    pub(crate) weekly: usize,
    pub(crate) monthly: usize,
}

impl Keep {
    fn any(&self) -> bool {
        self.last + self.daily + self.weekly + self.monthly > 0
    }
}

/// Days since 1970-01-01 of an RFC 3339 UTC time (`2026-01-05T...`); None when unreadable.
fn days(created: &str) -> Option<i64> {
    let y: i64 = created.get(0..4)?.parse().ok()?;
    let m: i64 = created.get(5..7)?.parse().ok()?;
    let d: i64 = created.get(8..10)?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// The ids to keep among `backups` (one VM's, any order): the rules' picks and their chains.
pub(crate) fn select(backups: &[Manifest], keep: Keep) -> BTreeSet<String> {
    let mut newest: Vec<&Manifest> = backups.iter().collect();
    newest.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
    let mut picked = BTreeSet::new();
    for m in newest.iter().take(keep.last) {
        picked.insert(m.id.clone());
    }
    let mut by_period = |n: usize, period: &dyn Fn(&Manifest) -> Option<i64>| {
        let mut seen = Vec::new();
        for m in &newest {
            let Some(p) = period(m) else { continue };
            if seen.len() >= n {
                break;
            }
            if !seen.contains(&p) {
                seen.push(p);
                picked.insert(m.id.clone());
            }
        }
    };
    by_period(keep.daily, &|m| days(&m.created));
    // Weeks from Monday (1970-01-01 was a Thursday).
    by_period(keep.weekly, &|m| days(&m.created).map(|d| d - (d + 3).rem_euclid(7)));
    by_period(keep.monthly, &|m| {
        let y: i64 = m.created.get(0..4)?.parse().ok()?;
        let mo: i64 = m.created.get(5..7)?.parse().ok()?;
        Some(y * 12 + mo)
    });
    let mut kept = picked.clone();
    for m in backups.iter().filter(|m| picked.contains(&m.id)) {
        kept.extend(m.chain.iter().cloned());
    }
    kept
}

pub(crate) fn prune(
    cli: &Cli,
    name: Option<&str>,
    target: Option<&Path>,
    keep: Keep,
    dry_run: bool,
) -> Result<u8, Fail> {
    if !keep.any() {
        return Err(Fail::new("say what to keep: --keep-last, --keep-daily, --keep-weekly or --keep-monthly", 2));
    }
    let dir = match (target, name) {
        (Some(t), _) => t.to_path_buf(),
        (None, Some(n)) if cli.connect.is_empty() => hostsim::vm::Vm::open(&cli.state_dir, n)?.backup_dir(),
        _ => return Err(Fail::new("name a VM or give --target DIR", 2)),
    };
    let listing = backup::list(&dir)?;
    let mut vms: Vec<&str> = listing.good.iter().map(|(_, m)| m.vm.as_str()).collect();
    vms.sort();
    vms.dedup();
    let mut kept: Vec<(PathBuf, String)> = Vec::new();
    let mut deleted: Vec<(PathBuf, String, u64)> = Vec::new();
    for vm in vms.into_iter().filter(|v| target.is_none() || name.is_none_or(|n| n == *v)) {
        let mine: Vec<Manifest> = listing.good.iter().filter(|(_, m)| m.vm == vm).map(|(_, m)| m.clone()).collect();
        let keep_ids = select(&mine, keep);
        for (p, m) in listing.good.iter().filter(|(_, m)| m.vm == vm) {
            if keep_ids.contains(&m.id) {
                kept.push((p.clone(), m.id.clone()));
            } else {
                deleted.push((p.clone(), m.id.clone(), m.disks.iter().map(|d| d.file_size).sum()));
            }
        }
    }
    if !dry_run {
        // Newest first: should this stop half-way, what is left still restores.
        for (p, _, _) in deleted.iter().rev() {
            std::fs::remove_dir_all(p).map_err(|e| Fail::new(format!("cannot delete {}: {e}", p.display()), 1))?;
        }
        if !deleted.is_empty() {
            let _ = util::fsync_dir(&dir);
        }
    }
    let freed: u64 = deleted.iter().map(|d| d.2).sum();
    out(
        cli,
        json!({"ok": true, "dry_run": dry_run, "kept": kept.iter().map(|k| &k.1).collect::<Vec<_>>(),
               "deleted": deleted.iter().map(|d| &d.1).collect::<Vec<_>>(), "freed_bytes": freed}),
        || {
            let mut s = String::new();
            for (_, id) in &kept {
                s.push_str(&format!("keep    {id}\n"));
            }
            for (_, id, _) in &deleted {
                s.push_str(&format!("{} {id}\n", if dry_run { "would delete" } else { "deleted" }));
            }
            s.push_str(&format!(
                "{} kept, {} {} ({})",
                kept.len(),
                deleted.len(),
                if dry_run { "to delete" } else { "deleted" },
                util::human_bytes(freed)
            ));
            s
        },
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, created: &str, chain: &[&str]) -> Manifest {
        let mut v: Manifest = serde_json::from_value(json!({
            "format": "vmctl-backup", "version": 1, "id": id, "vm": "web1", "created": created,
            "kind": if chain.len() > 1 { "incremental" } else { "full" }, "parent": null,
            "chain": chain, "consistency": "filesystem", "quiesce": {}, "timings": {}, "disks": [],
            "qemu_version": "7.2", "vm_config": null, "vmctl_version": "0.1.0"
        }))
        .unwrap();
        v.chain = chain.iter().map(|s| s.to_string()).collect();
        v
    }

    /// A full on Jan 1 and an incremental on each of the next days, Jan 2..=Jan 9 2026.
    fn chain() -> Vec<Manifest> {
        let mut v = vec![m("f", "2026-01-01T10:00:00.000Z", &["f"])];
        let mut c = vec!["f".to_string()];
        for d in 2..=9 {
            let id = format!("i{d}");
            c.push(id.clone());
            let cr: Vec<&str> = c.iter().map(String::as_str).collect();
            v.push(m(&id, &format!("2026-01-{d:02}T10:00:00.000Z"), &cr));
        }
        v
    }

    #[test]
    fn keep_last_keeps_the_whole_chain_a_kept_incremental_needs() {
        let k = select(&chain(), Keep { last: 1, ..Default::default() });
        assert_eq!(k.len(), 9, "the newest incremental needs every backup before it: {k:?}");
    }

    #[test]
    fn separate_fulls_let_older_chains_go() {
        let v = vec![
            m("f1", "2026-01-01T10:00:00.000Z", &["f1"]),
            m("i1", "2026-01-02T10:00:00.000Z", &["f1", "i1"]),
            m("f2", "2026-01-03T10:00:00.000Z", &["f2"]),
            m("i2", "2026-01-04T10:00:00.000Z", &["f2", "i2"]),
        ];
        let k = select(&v, Keep { last: 1, ..Default::default() });
        assert_eq!(k.into_iter().collect::<Vec<_>>(), ["f2", "i2"]);
    }

    #[test]
    fn daily_weekly_and_monthly_pick_the_newest_of_each_period() {
        let v = vec![
            m("a", "2026-01-05T08:00:00.000Z", &["a"]), // Monday
            m("b", "2026-01-05T20:00:00.000Z", &["b"]), // same day, newer
            m("c", "2026-01-11T09:00:00.000Z", &["c"]), // Sunday of the same week
            m("d", "2026-01-12T09:00:00.000Z", &["d"]), // the next Monday
            m("e", "2025-12-31T09:00:00.000Z", &["e"]), // the month before
        ];
        let ids = |k: Keep| select(&v, k).into_iter().collect::<Vec<_>>();
        assert_eq!(ids(Keep { daily: 2, ..Default::default() }), ["c", "d"]);
        assert_eq!(ids(Keep { weekly: 2, ..Default::default() }), ["c", "d"]);
        assert_eq!(ids(Keep { weekly: 3, ..Default::default() }), ["c", "d", "e"]);
        assert_eq!(ids(Keep { daily: 4, ..Default::default() }), ["b", "c", "d", "e"]);
        assert_eq!(ids(Keep { monthly: 2, ..Default::default() }), ["d", "e"]);
    }

    #[test]
    fn days_counts_from_the_epoch_across_leap_years() {
        assert_eq!(days("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(days("2000-03-01T00:00:00Z"), Some(11_017));
        assert_eq!(days("2026-01-05T00:00:00Z").map(|d| (d + 3).rem_euclid(7)), Some(0), "a Monday");
        assert_eq!(days("garbage"), None);
    }
}
