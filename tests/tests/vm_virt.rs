//! VM tier, vmctl on libvirt (issue 14): `vmctl --connect qemu:///system` against a real
//! libvirtd running TCG domains of the test guest (see tests/src/libvirt.rs for what libvirtd
//! needs here). One boot of three domains shared by every check, to keep TCG's time down:
//! - `vssd`: vssd as the agent, the writers running;
//! - `qga`: qemu-ga as the agent, the writers running;
//! - `noagent`: no agent at all.
//!
//! Checked: `list`, `status`, `fsfreeze/fsstatus/fsthaw` through libvirt's agent call; full and
//! incremental backups of the vssd and the qemu-ga domain through libvirt's backup API, each
//! verified (checksums, qemu-img check, fsck) and holding every record acked before it and a
//! sound SQLite database; the checkpoint chain redefined from the backups after `virsh
//! checkpoint-delete --metadata`; restore; a remote URI (`qemu+tcp://127.0.0.1:PORT/system`),
//! push and pull mode (NBD: a full and an incremental into a target on vmctl's side);
//! `backup --all --parallel 2` over the three with one
//! agent missing; `backup prune` on a chain; `backup restore --as-vm` as a new domain that boots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hostsim::inspect::RawImage;
use tests::libvirt::{virsh, virsh_ok, vmctl_at, vmctl_json_at, Domain, DomainOpts, Libvirtd, TcpRelay, URI};
use tests::vm::{check_records, sqlite};
use tests::{require_libvirt, Value};

const BOOT: Duration = Duration::from_secs(180);

fn dir_of(v: &Value) -> PathBuf {
    PathBuf::from(v["dir"].as_str().unwrap_or_else(|| panic!("no dir in {v}")))
}

/// Every record acked before the backup is in it, no record is torn, the database is sound.
fn check_contents(dir: &Path, before: &BTreeMap<String, u64>) {
    let mut found = BTreeMap::new();
    for disk in ["vda", "vdb"] {
        let mut img = RawImage::open(&dir.join(format!("{disk}.qcow2"))).expect("open the backup");
        for (p, mnt) in img.mount_all().expect("mount the backup's filesystems") {
            let label = p.label.to_lowercase();
            let rec = mnt.join("records.log");
            if rec.exists() {
                found.insert(label.clone(), check_records(&rec));
            }
            let db = mnt.join("app.db");
            if db.exists() {
                assert_eq!(sqlite(&db, "PRAGMA integrity_check"), "ok", "SQLite integrity_check of {}", dir.display());
                let r = sqlite(&db, "SELECT coalesce(max(n),0) || ' ' || count(*) FROM records");
                let (max, count) = r.split_once(' ').unwrap();
                assert_eq!(max, count, "SQLite records 1..{max} without a hole");
                found.insert("sqlite".into(), max.parse::<u64>().unwrap());
            }
        }
    }
    for (w, n) in before {
        let got = found.get(w).copied().unwrap_or_else(|| panic!("writer {w} has nothing in the backup: {found:?}"));
        assert!(got >= *n, "writer {w}: record {n} was acked before the backup, {} ends at {got}", dir.display());
    }
    eprintln!("[test] {}: acked before {before:?}, in the backup {found:?}", dir.display());
}

/// A backup (full or incremental) of `d` into `target`, verified, with its contents checked.
fn backup_checked(d: &Domain, target: &Path, incremental: bool, agent: &str) -> Value {
    d.wait_acks("sqlite", d.last_acks().get("sqlite").copied().unwrap_or(0) + 3, Duration::from_secs(90));
    let before = d.last_acks();
    let mut args = vec!["backup", &d.name, "--target", target.to_str().unwrap(), "--verify", "--quiesce", "required"];
    if incremental {
        args.push("--incremental");
    }
    let v = vmctl_json_at(URI, &args, 0);
    assert_eq!(v["kind"], if incremental { "incremental" } else { "full" }, "{v}");
    assert_eq!(v["verify"]["ok"], true, "verify (checksums, qemu-img check, fsck -n): {v}");
    assert!(v["agent"].as_str().unwrap_or("").starts_with(agent), "{v}");
    assert!(v["frozen"].as_u64().unwrap_or(0) >= 1, "{v}");
    let c = v["consistency"].as_str().unwrap();
    assert!(c == "application" || c == "filesystem", "{v}");
    let w = v["freeze_window_ms"].as_f64().unwrap();
    assert!(w > 0.0 && w < 30_000.0, "{v}");
    eprintln!("[test] {} {}: {c}, freeze window {w:.1} ms, {} bytes", d.name, v["kind"], v["copied_bytes"]);
    check_contents(&dir_of(&v), &before);
    // Thawed, and the writers go on.
    let after = d.last_acks();
    d.wait_acks("sqlite", after.get("sqlite").copied().unwrap_or(0) + 2, Duration::from_secs(60));
    v
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn vmctl_connect_backs_up_libvirt_domains_consistently_and_keeps_their_checkpoint_chain() {
    require_libvirt!();
    let t0 = Instant::now();
    let lv = Libvirtd::ensure();
    let vssd =
        Domain::define(&lv, "vssd", &DomainOpts { writers: true, mac: "52:54:00:56:53:11", ..Default::default() });
    let qga = Domain::define(
        &lv,
        "qga",
        &DomainOpts { agent: "qemu-ga", writers: true, mac: "52:54:00:56:53:12", ..Default::default() },
    );
    let none =
        Domain::define(&lv, "noagent", &DomainOpts { agent: "none", mac: "52:54:00:56:53:13", ..Default::default() });
    vssd.start(BOOT);
    qga.start(BOOT);
    none.start_no_agent(BOOT);
    let work = tempfile::Builder::new().prefix("vssd-virt-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // list and status, through libvirt.
    let l = vmctl_json_at(URI, &["list"], 0);
    let names: Vec<&str> = l["vms"].as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    for d in [&vssd, &qga, &none] {
        assert!(names.contains(&d.name.as_str()), "{} not listed: {l}", d.name);
    }
    let st = vmctl_json_at(URI, &["status", &vssd.name], 0);
    assert_eq!(st["status"]["state"], "running", "{st}");
    assert!(st["agent"]["agent"].as_str().unwrap_or("").starts_with("vssd"), "{st}");
    assert_eq!(st["status"]["disks"].as_array().map(|a| a.len()), Some(2), "{st}");

    // fsfreeze / fsstatus / fsthaw through virDomainQemuAgentCommand.
    let f = vmctl_json_at(URI, &["fsfreeze", &vssd.name, "--deadline", "20"], 0);
    assert!(f["frozen"].as_u64().unwrap_or(0) >= 1, "{f}");
    assert_eq!(vmctl_json_at(URI, &["fsstatus", &vssd.name], 0)["status"], "frozen");
    vmctl_json_at(URI, &["fsthaw", &vssd.name], 0);
    assert_eq!(vmctl_json_at(URI, &["fsstatus", &vssd.name], 0)["status"], "thawed");
    let out = vmctl_at(URI, &["fsstatus", &none.name]);
    assert_eq!(out.code, Some(1), "no agent: {} {}", out.stdout, out.stderr);

    // Full + incremental of each agent's domain.
    for (d, agent) in [(&vssd, "vssd"), (&qga, "qemu-ga")] {
        let target = work.path().join(&d.name);
        let full = backup_checked(d, &target, false, agent);
        let inc = backup_checked(d, &target, true, agent);
        assert_eq!(inc["chain"].as_array().unwrap().len(), 2, "{inc}");
        assert_eq!(inc["chain"][0], full["id"]);
        if agent == "vssd" {
            assert!(full["note"].is_null(), "{full}");
        }
        // The checkpoint XML is kept with each backup.
        assert!(dir_of(&inc).join("checkpoint.xml").is_file());
    }

    // The chain survives libvirt forgetting its checkpoints: they are redefined from the backups.
    let cps = virsh_ok(&["checkpoint-list", &vssd.name, "--name", "--topological"]);
    let cps: Vec<&str> = cps.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(cps.len(), 2, "{cps:?}");
    for c in cps.iter().rev() {
        virsh_ok(&["checkpoint-delete", &vssd.name, c, "--metadata"]);
    }
    assert!(virsh_ok(&["checkpoint-list", &vssd.name, "--name"]).trim().is_empty());
    let target = work.path().join(&vssd.name);
    let inc2 = backup_checked(&vssd, &target, true, "vssd");
    assert_eq!(inc2["chain"].as_array().unwrap().len(), 3, "{inc2}");
    let cps = virsh_ok(&["checkpoint-list", &vssd.name, "--name"]);
    assert_eq!(cps.lines().filter(|l| !l.trim().is_empty()).count(), 3, "redefined + the new one: {cps}");

    // Restore rebuilds standalone disks from the chain.
    let to = work.path().join("restored");
    let r =
        vmctl_json_at(URI, &["backup", "restore", dir_of(&inc2).to_str().unwrap(), "--to", to.to_str().unwrap()], 0);
    assert_eq!(r["disks"].as_array().map(|a| a.len()), Some(2), "{r}");
    for disk in ["vda", "vdb"] {
        let out = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(to.join(format!("{disk}.qcow2")))
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(info.get("backing-filename").is_none(), "a restored disk stands alone: {info}");
    }

    // Prune: every backup of the chain is needed by the newest; after a new full, the old
    // chain goes and the full stays.
    let t = target.to_str().unwrap();
    let p = vmctl_json_at(URI, &["backup", "prune", "--target", t, "--keep-last", "1", "--dry-run"], 0);
    assert_eq!(p["deleted"].as_array().map(|a| a.len()), Some(0), "a kept incremental needs all: {p}");
    assert_eq!(p["kept"].as_array().map(|a| a.len()), Some(3), "{p}");
    let full2 = vmctl_json_at(URI, &["backup", &vssd.name, "--target", t], 0);
    let p = vmctl_json_at(URI, &["backup", "prune", "--target", t, "--keep-last", "1"], 0);
    assert_eq!(p["kept"], serde_json::json!([full2["id"]]), "{p}");
    assert_eq!(p["deleted"].as_array().map(|a| a.len()), Some(3), "{p}");
    let l = vmctl_json_at(URI, &["backup", "list", "--target", t], 0);
    assert_eq!(l["backups"].as_array().map(|a| a.len()), Some(1), "{l}");
    assert_eq!(vmctl_json_at(URI, &["backup", "verify", dir_of(&full2).to_str().unwrap()], 0)["ok"], true);

    // A remote URI: libvirt's TCP transport (to the same daemon, through a loopback relay).
    let relay = TcpRelay::start();
    let l = vmctl_json_at(&relay.uri, &["list"], 0);
    assert!(
        l["vms"].as_array().unwrap().iter().any(|d| d["name"] == qga.name.as_str() && d["uri"] == relay.uri.as_str()),
        "{l}"
    );
    assert_eq!(vmctl_json_at(&relay.uri, &["fsstatus", &qga.name], 0)["status"], "thawed");
    let target = work.path().join(&qga.name);
    let before = qga.last_acks();
    let v = vmctl_json_at(
        &relay.uri,
        &["backup", &qga.name, "--target", target.to_str().unwrap(), "--incremental", "--verify"],
        0,
    );
    assert_eq!((v["kind"].as_str(), v["verify"]["ok"].as_bool()), (Some("incremental"), Some(true)), "{v}");
    check_contents(&dir_of(&v), &before);

    // Pull mode over the remote URI: libvirt's QEMU serves the disks over NBD, vmctl copies
    // them into a target on its own machine; a full, then an incremental of what changed.
    let pulled = work.path().join("pull");
    let pt = pulled.to_str().unwrap();
    let mut ids = Vec::new();
    for inc in [false, true] {
        qga.wait_acks("sqlite", qga.last_acks().get("sqlite").copied().unwrap_or(0) + 3, Duration::from_secs(90));
        let before = qga.last_acks();
        let mut args = vec!["--pull", "backup", &qga.name, "--target", pt, "--verify", "--quiesce", "required"];
        if inc {
            args.push("--incremental");
        }
        let v = vmctl_json_at(&relay.uri, &args, 0);
        assert_eq!(v["kind"], if inc { "incremental" } else { "full" }, "{v}");
        assert_eq!(v["verify"]["ok"], true, "verify of a pulled backup: {v}");
        assert_eq!(v["consistency"], "filesystem", "{v}");
        check_contents(&dir_of(&v), &before);
        let job = virsh_ok(&["domjobinfo", &qga.name]);
        assert!(job.contains("None"), "the pull job ended: {job}");
        eprintln!("[test] pull {}: {} bytes, freeze window {} ms", v["kind"], v["copied_bytes"], v["freeze_window_ms"]);
        ids.push((v["id"].as_str().unwrap().to_string(), v["copied_bytes"].as_u64().unwrap()));
        if inc {
            assert_eq!(v["chain"][0], ids[0].0.as_str(), "{v}");
            assert!(ids[1].1 < ids[0].1 / 2, "the incremental holds only what changed: {ids:?}");
        }
    }
    let r = vmctl_json_at(
        URI,
        &[
            "backup",
            "restore",
            pulled.join(&ids[1].0).to_str().unwrap(),
            "--to",
            work.path().join("pull-restored").to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(r["disks"].as_array().map(|a| a.len()), Some(2), "{r}");

    // --all --parallel 2: the three (one without an agent: crash-consistent, best-effort).
    let prefix = format!("{}{}-", tests::libvirt::PREFIX, std::process::id());
    let all = work.path().join("all");
    let t = Instant::now();
    let a = vmctl_json_at(
        URI,
        &["backup", "--all", "--parallel", "2", "--name-prefix", &prefix, "--target", all.to_str().unwrap()],
        0,
    );
    eprintln!("[test] --all --parallel 2 of three domains in {:.1} s", t.elapsed().as_secs_f64());
    let bs = a["backups"].as_array().unwrap();
    assert_eq!(bs.len(), 3, "{a}");
    assert_eq!(a["failed"], 0, "{a}");
    for b in bs {
        let expect = if b["vm"] == none.name { "crash" } else { "filesystem|application" };
        assert!(expect.split('|').any(|e| b["consistency"] == e), "{b}");
        assert!(dir_of(b).starts_with(all.join(b["vm"].as_str().unwrap())), "{b}");
    }
    // And with --quiesce required the agentless one fails alone, the others succeed, exit 1.
    let a = vmctl_json_at(
        URI,
        &[
            "backup",
            "--all",
            "--parallel",
            "2",
            "--name-prefix",
            &prefix,
            "--target",
            all.to_str().unwrap(),
            "--quiesce",
            "required",
        ],
        1,
    );
    assert_eq!(a["failed"], 1, "{a}");
    let failed: Vec<&Value> = a["backups"].as_array().unwrap().iter().filter(|b| b["ok"] != true).collect();
    assert_eq!(failed[0]["vm"], none.name.as_str(), "{a}");
    assert_eq!(failed[0]["exit-code"], 4, "{a}");
    // Two hosts, one of them not there: its failure is one entry, the reachable host's domains
    // are all backed up, and the exit code says that not everything succeeded.
    let gone = "qemu+tcp://127.0.0.1:1/system";
    let a = vmctl_json_at(
        URI,
        &[
            "--connect",
            gone,
            "backup",
            "--all",
            "--parallel",
            "2",
            "--name-prefix",
            &prefix,
            "--target",
            all.to_str().unwrap(),
        ],
        1,
    );
    assert_eq!((a["failed"].as_u64(), a["backups"].as_array().map(|b| b.len())), (Some(0), Some(3)), "{a}");
    assert_eq!(
        (a["unreachable"][0]["uri"].as_str(), a["unreachable"][0]["exit-code"].as_u64()),
        (Some(gone), Some(3)),
        "{a}"
    );

    // Restore as a new libvirt domain, beside the original that still runs: the vssd domain's
    // newest backup (a full), defined from its kept XML with the restored disks. It boots, its
    // agent answers, and its SQLite writer works on the restored database.
    for d in [&qga, &none] {
        virsh_ok(&["destroy", &d.name]);
    }
    let name = format!("{}{}-restored", tests::libvirt::PREFIX, std::process::id());
    let to = work.path().join("as-domain");
    let r = vmctl_json_at(
        URI,
        &["backup", "restore", dir_of(&full2).to_str().unwrap(), "--as-vm", &name, "--to", to.to_str().unwrap()],
        0,
    );
    let restored = Domain::adopt(&lv, &name, to.clone());
    assert_eq!((r["vm"].as_str(), r["disks"].as_array().map(|a| a.len())), (Some(name.as_str()), Some(2)), "{r}");
    let blk = virsh_ok(&["domblklist", &name]);
    for dev in ["vda", "vdb"] {
        let want = to.join(format!("{dev}.qcow2"));
        assert!(
            blk.contains(&format!("{dev} ")) && blk.contains(want.to_str().unwrap()),
            "{dev} is not {}: {blk}",
            want.display()
        );
    }
    let xml = virsh_ok(&["dumpxml", &name, "--inactive"]);
    assert!(!xml.contains("52:54:00:56:53:11"), "a new MAC, not the original's: {xml}");
    assert!(xml.contains(&format!("{}/acks.log", to.display())), "its own file outputs: {xml}");
    let again = vmctl_at(
        URI,
        &["backup", "restore", dir_of(&full2).to_str().unwrap(), "--as-vm", &name, "--to", "/nonexistent"],
    );
    assert_eq!(again.code, Some(1), "a name libvirt has is refused: {} {}", again.stdout, again.stderr);
    assert!(again.stderr.contains("already"), "{}", again.stderr);
    let t = Instant::now();
    restored.start(BOOT);
    restored.wait_acks("sqlite", 3, Duration::from_secs(120));
    eprintln!("[test] the restored domain booted and its SQLite writer runs ({:.1} s)", t.elapsed().as_secs_f64());

    // A domain with libvirt backup checkpoints (dirty bitmaps) takes an internal snapshot too
    // (libvirt 9.0 here), and loses it again without touching the backups' chain.
    let chain = virsh_ok(&["checkpoint-list", &vssd.name, "--name"]);
    assert!(!chain.trim().is_empty(), "the vssd domain has backup checkpoints");
    let mixed = vmctl_json_at(URI, &["checkpoint", "create", &vssd.name, "--name", "mixed"], 0);
    assert_eq!(mixed["name"], "mixed", "{mixed}");
    vmctl_json_at(URI, &["checkpoint", "delete", &vssd.name, "mixed"], 0);
    assert_eq!(virsh_ok(&["checkpoint-list", &vssd.name, "--name"]), chain, "the backups' checkpoints are untouched");

    // Checkpoints through libvirt (internal snapshots: RAM, devices, disks), on the restored
    // domain.
    restored.wait_acks("e3", 3, Duration::from_secs(60));
    let c = vmctl_json_at(URI, &["checkpoint", "create", &name, "--name", "c1"], 0);
    let at = restored.last_acks()["e3"];
    eprintln!("[test] libvirt checkpoint c1 in {} ms at e3 record {at}", c["took_ms"]);
    restored.wait_acks("e3", at + 20, Duration::from_secs(90));
    let l = vmctl_json_at(URI, &["checkpoint", "list", &name], 0);
    assert_eq!(
        (l["checkpoints"][0]["name"].as_str(), &l["checkpoints"][0]["in_libvirt"]),
        (Some("c1"), &serde_json::json!(true)),
        "{l}"
    );
    // libvirt forgets it; vmctl's manifest still names it, and the restore redefines it.
    virsh_ok(&["snapshot-delete", &name, "c1", "--metadata"]);
    let l = vmctl_json_at(URI, &["checkpoint", "list", &name], 0);
    assert_eq!(
        (&l["checkpoints"][0]["in_libvirt"], &l["checkpoints"][0]["in_vmctl"]),
        (&serde_json::json!(false), &serde_json::json!(true)),
        "{l}"
    );
    let acks_file = to.join("acks.log");
    let before = std::fs::metadata(&acks_file).map(|m| m.len()).unwrap_or(0);
    let r = vmctl_json_at(URI, &["start", &name, "--checkpoint", "c1"], 0);
    assert_eq!(r["redefined"], true, "{r}");
    assert_eq!(restored.state(), "running");
    // The guest goes on from the checkpoint: its e3 writer numbers from about `at` again.
    let deadline = Instant::now() + Duration::from_secs(90);
    let first_after = loop {
        let text = std::fs::read_to_string(&acks_file).unwrap_or_default();
        let from = if (text.len() as u64) < before { 0 } else { before as usize };
        if let Some(a) = tests::vm::parse_acks(&text[from..]).into_iter().find(|a| a.writer == "e3") {
            break a.n;
        }
        assert!(Instant::now() < deadline, "no e3 record after the revert");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(first_after <= at + 3, "after the revert e3 went on from {first_after}, the checkpoint was at {at}");
    eprintln!("[test] reverted to c1: e3 went on from record {first_after} (checkpoint at {at})");
    // Suspend to disk (libvirt's managed save) and back.
    let sus = vmctl_json_at(URI, &["suspend", &name], 0);
    assert_eq!(sus["state"], "shut off", "{sus}");
    let res = vmctl_json_at(URI, &["resume", &name], 0);
    assert_eq!(res["state"], "running", "{res}");
    assert_eq!(vmctl_json_at(URI, &["fsstatus", &name], 0)["status"], "thawed", "the agent answers after resume");
    // --poweroff, prune, destroyall.
    let c2 = vmctl_json_at(URI, &["checkpoint", "create", &name, "--name", "c2", "--poweroff"], 0);
    assert_eq!(c2["poweroff"], true, "{c2}");
    assert_eq!(restored.state(), "shut off", "--poweroff leaves the domain off");
    let p = vmctl_json_at(URI, &["checkpoint", "prune", &name, "--keep-last", "1"], 0);
    assert_eq!(
        (p["kept"].clone(), p["deleted"].clone()),
        (serde_json::json!(["c2"]), serde_json::json!(["c1"])),
        "{p}"
    );
    assert_eq!(virsh_ok(&["snapshot-list", &name, "--name"]).trim(), "c2");
    vmctl_json_at(URI, &["checkpoint", "destroyall", &name], 0);
    assert!(virsh_ok(&["snapshot-list", &name, "--name"]).trim().is_empty());
    let l = vmctl_json_at(URI, &["checkpoint", "list", &name], 0);
    assert_eq!(l["checkpoints"], serde_json::json!([]), "{l}");
    drop(restored);

    let _ = virsh(&["list"]);
    eprintln!("[test] done in {:.1} s", t0.elapsed().as_secs_f64());
}
