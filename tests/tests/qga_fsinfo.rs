//! `guest-get-fsinfo`, `guest-get-disks` and `guest-fstrim` on real loop filesystems (ext4,
//! XFS, btrfs with a second subvolume mount, a bind mount), against the real qemu-ga 7.2.
//!
//! qemu-ga runs in a private mount namespace that sees `/`, `/proc`, `/dev`, `/sys` and the sandbox's
//! mounts, with every command that could change this machine blocked, `guest-fstrim`
//! included (its namespace still sees `/`). vssd reads the same mount table (its
//! `--mountinfo` is qemu-ga's), so the two lists must be the same, entry for entry. vssd's own
//! trims go only to the sandbox: its `--mountinfo` is then a copy of the table with the
//! sandbox's lines alone.

use std::fs;
use std::path::{Path, PathBuf};

use tests::compare::{Check, Compare};
use tests::*;

/// Asserts that vssd's reply is qemu-ga's, key for key, under `cmp`'s rules.
fn assert_same(what: &str, cmp: &Compare, qga: &Value, vssd: &Value) {
    let diffs = cmp.diff(qga, vssd);
    assert!(
        diffs.is_empty(),
        "{what}: vssd differs from qemu-ga:\n  {}\nqemu-ga: {qga}\nvssd:    {vssd}",
        diffs.join("\n  ")
    );
}

/// The sandbox of these tests: ext4, XFS, btrfs and a second mount of a btrfs subvolume, and a
/// bind mount of the ext4 (qemu-ga lists every mount of a device, bind mounts too).
fn filesystems(sb: &Sandbox) -> Vec<PathBuf> {
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let b = sb.btrfs("b");
    let sub = sb.btrfs_subvolume(&b, "sub", "bsub");
    let bind = sb.bind(&e, "ebind");
    vec![e, x, b, sub, bind]
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn fsinfo_and_disks_match_qemu_ga_key_for_key() {
    require_root!();
    let sb = Sandbox::new("qga_fsinfo");
    let mounts = filesystems(&sb);
    fs::write(mounts[0].join("some-data"), vec![1u8; 1 << 20]).unwrap();
    nix::unistd::sync();
    let qga = QemuGa::start_read_only(&sb);
    let vssd = Vssd::builder(&sb).arg("--mountinfo").arg(qga.mountinfo_path()).start();
    let mut q = qga.client();
    let mut v = vssd.client();

    let (qf, vf) = (q.ok("guest-get-fsinfo", None), v.ok("guest-get-fsinfo", None));
    // The same mounts in the same order; then the sandbox's loop filesystems must be equal to
    // the byte. The machine's own filesystem (`/`, and its bind at the sandbox's `mnt/` in
    // qemu-ga's namespace) is in use: its usage may move between the two calls.
    let ours: Vec<Value> = mounts.iter().map(|m| p2s(m)).collect();
    let mountpoints =
        |l: &Value| -> Vec<Value> { l.as_array().unwrap().iter().map(|f| f["mountpoint"].clone()).collect() };
    assert_eq!(mountpoints(&qf), mountpoints(&vf), "guest-get-fsinfo: not qemu-ga's mounts in qemu-ga's order");
    let part = |l: &Value, mine: bool| -> Value {
        l.as_array().unwrap().iter().filter(|f| ours.contains(&f["mountpoint"]) == mine).cloned().collect()
    };
    let cmp = Compare::new("qemu-ga", "vssd");
    assert_same("guest-get-fsinfo (the sandbox's mounts)", &cmp, &part(&qf, true), &part(&vf, true));
    let moving = cmp.clone().check("[].used-bytes", Check::Near(1e9)).check("[].total-bytes", Check::Near(1e9));
    assert_same("guest-get-fsinfo (the machine's mounts)", &moving, &part(&qf, false), &part(&vf, false));

    // What a host relies on, for each sandbox mount: its type, its device's name, the usage,
    // and no disk for a loop device (virtual: nothing below it).
    for (m, fstype) in mounts.iter().zip(["ext4", "xfs", "btrfs", "btrfs", "ext4"]) {
        let f = vf
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["mountpoint"] == p2s(m))
            .unwrap_or_else(|| panic!("{} missing: {vf}", m.display()));
        assert_eq!(f["type"], fstype, "{f}");
        assert!(f["name"].as_str().unwrap().starts_with("loop"), "{f}");
        assert!(f["total-bytes"].as_u64().unwrap() > 0 && f["used-bytes"].is_u64(), "{f}");
        assert_eq!(f["disk"], json!([]), "{f}");
    }
    // The bind mount and the subvolume are listed as their own mounts, on the same devices.
    let name = |m: &Path| vf.as_array().unwrap().iter().find(|f| f["mountpoint"] == p2s(m)).unwrap()["name"].clone();
    assert_eq!(name(&mounts[0]), name(&mounts[4]));
    assert_eq!(name(&mounts[2]), name(&mounts[3]));

    // guest-get-disks lists the machine's block devices; other tests may attach or detach loop
    // devices meanwhile, so take the pair again until qemu-ga's answer held still around vssd's.
    let mut tries = 0;
    loop {
        let q1 = q.ok("guest-get-disks", None);
        let vd = v.ok("guest-get-disks", None);
        let q2 = q.ok("guest-get-disks", None);
        if q1 != q2 && tries < 5 {
            tries += 1;
            continue;
        }
        assert_same("guest-get-disks", &Compare::new("qemu-ga", "vssd"), &q1, &vd);
        for m in &mounts[..3] {
            let dev = sb.source_of(m);
            let d = vd
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == dev.as_str())
                .unwrap_or_else(|| panic!("{dev} missing: {vd}"));
            assert_eq!(d["partition"], false, "{d}");
            assert_eq!(d["dependencies"], json!([]), "{d}");
            assert!(d.get("address").is_none(), "a loop device has no address: {d}");
        }
        break;
    }
}

/// The sandbox's lines of this process's mount table, written to `<root>/mountinfo`.
fn sandbox_mountinfo(sb: &Sandbox) -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = sb.root().to_string_lossy().into_owned();
    let mine: String = text
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&root)))
        .map(|l| format!("{l}\n"))
        .collect();
    let path = sb.root().join("mountinfo");
    fs::write(&path, mine).unwrap();
    path
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn fstrim_trims_every_mount_and_is_refused_while_frozen() {
    require_root!();
    let sb = Sandbox::new("qga_fstrim");
    let mounts = filesystems(&sb);
    for m in &mounts[..3] {
        fs::write(m.join("gone"), vec![7u8; 4 << 20]).unwrap();
        nix::unistd::sync();
        fs::remove_file(m.join("gone")).unwrap();
    }
    nix::unistd::sync();
    let table = sandbox_mountinfo(&sb);
    let vssd = Vssd::builder(&sb).deadline(5).arg("--mountinfo").arg(&table).start();
    let mut c = vssd.client();

    let r = c.ok("guest-fstrim", None);
    let paths = r["paths"].as_array().unwrap_or_else(|| panic!("no paths: {r}"));
    // One result per mount, the last mount first (qemu-ga's order).
    let mut want: Vec<Value> = mounts.iter().map(|m| p2s(m)).collect();
    want.reverse();
    let got: Vec<Value> = paths.iter().map(|p| p["path"].clone()).collect();
    assert_eq!(got, want, "{r}");
    for p in paths {
        assert!(p.get("error").is_none(), "{p}");
        assert!(p["trimmed"].is_i64() && p["minimum"].is_i64(), "{p}");
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["minimum", "path", "trimmed"], "{p}");
    }
    // A freshly mounted filesystem trims all its free space on the first FITRIM.
    for m in &mounts[..3] {
        let p = paths.iter().find(|p| p["path"] == p2s(m)).unwrap();
        assert!(p["trimmed"].as_i64().unwrap() > 0, "nothing trimmed on {}: {p}", m.display());
    }
    let r = c.ok("guest-fstrim", Some(json!({"minimum": 1 << 20})));
    assert_eq!(r["paths"].as_array().unwrap().len(), mounts.len(), "{r}");

    // Frozen (through vssd's scope, a short deadline): refused as qemu-ga refuses it.
    let list: Vec<Value> = mounts[..3].iter().map(|m| p2s(m)).collect();
    let f = c.ok("vssd-freeze", Some(json!({"mountpoints": list, "deadline": 5})));
    assert!(f["frozen"].as_u64().unwrap() >= 3, "{f}");
    let refused = c.call("guest-fstrim", None);
    assert_eq!(
        expect_error(&refused, "CommandNotFound", "guest-fstrim while frozen"),
        "Command guest-fstrim has been disabled: the agent is in frozen state"
    );
    let info = c.ok("guest-info", None);
    let entry = info["supported_commands"].as_array().unwrap().iter().find(|e| e["name"] == "guest-fstrim").cloned();
    assert_eq!(entry.unwrap()["enabled"], false, "guest-info while frozen");
    for m in &mounts[..3] {
        assert!(frozen_by_someone(m), "{} is not frozen", m.display());
    }
    c.ok("guest-fsfreeze-thaw", None);
    let r = c.ok("guest-fstrim", None);
    assert!(r["paths"].as_array().unwrap().iter().all(|p| p.get("error").is_none()), "after thaw: {r}");
}
