//! VM tier, libvirt against the packaged vssd: the systemd guest (Debian 12, vssd installed
//! with `dpkg -i`, started by udev for the agent port) booted as a libvirt domain (TCG), and
//! the three commands a backup tool runs through libvirt's agent channel: `virsh domfsfreeze`,
//! `virsh domfsthaw` and `virsh snapshot-create-as --disk-only --quiesce`. The snapshot's
//! point-in-time images (the overlays the domain wrote until the snapshot) pass fsck. One boot.
//!
//! libvirtd is the machine's or one started by tests/src/libvirt.rs (`Libvirtd::ensure`);
//! the domain is tests/src/sysguest.rs's `SysDomain`.

use std::time::{Duration, Instant};

use tests::libvirt::{virsh, virsh_with_limit, Libvirtd};
use tests::require_libvirt;
use tests::sysguest::{cannot_run, image, SysDomain};

/// Writes a file on every data filesystem and syncs it: returns only when none is frozen.
const WRITE_DATA: &str = "for m in / /data/db /data/logs /data/e3 /data/e4; do echo x >$m/.lv-thawed && sync -f $m/.lv-thawed || exit 1; done";

fn number_in(text: &str) -> u64 {
    text.split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_else(|| panic!("no number in {text:?}"))
}

#[test]
#[ignore = "vm tier: needs root and QEMU; tests/run-all.sh runs it"]
fn virsh_freezes_thaws_and_takes_a_quiesced_snapshot_through_the_packaged_vssd() {
    require_libvirt!();
    if let Some(why) = cannot_run() {
        panic!("this VM-tier test cannot run here: {why}");
    }
    eprintln!("[libvirt-sys] image {}", image().dir.display());
    let lv = Libvirtd::ensure();
    let dom = SysDomain::define(&lv, "sys");
    let booted = dom.start(Duration::from_secs(300));
    eprintln!("[libvirt-sys] {} booted, vssd answering through libvirt, in {:.1} s", dom.name, booted.as_secs_f64());
    assert_eq!(dom.sh("dpkg-query -W -f '${Status}' vssd").trim(), "install ok installed");
    assert_eq!(dom.sh("systemctl is-active vssd").trim(), "active");

    // domfsfreeze: every freezable filesystem (root and the four data ones; not vfat).
    let t = Instant::now();
    let out = virsh(&["domfsfreeze", &dom.name]);
    out.expect_code(0, "virsh domfsfreeze");
    let froze = number_in(&out.stdout);
    let froze_in = t.elapsed();
    assert!(froze >= 5, "virsh domfsfreeze froze {froze}: {}", out.stdout);
    let status = dom.sh("vssctl --timeout 5 status");
    assert!(status.contains("status: frozen"), "vssd after domfsfreeze: {status}");
    let st = virsh(&["qemu-agent-command", &dom.name, r#"{"execute":"guest-fsfreeze-status"}"#]);
    assert!(st.stdout.contains("frozen"), "guest-fsfreeze-status: {}", st.stdout);
    let t = Instant::now();
    let out = virsh(&["domfsthaw", &dom.name]);
    out.expect_code(0, "virsh domfsthaw");
    let thawed = number_in(&out.stdout);
    assert_eq!(thawed, froze, "virsh domfsthaw: {}", out.stdout);
    let (code, o) = dom.shell(WRITE_DATA, Duration::from_secs(30));
    assert_eq!(code, 0, "writing after domfsthaw: {o}");
    eprintln!(
        "[libvirt-sys] domfsfreeze: {froze} filesystems in {:.2} s; domfsthaw: {thawed} in {:.2} s",
        froze_in.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    // A disk-only snapshot, quiesced by vssd: new overlays take the writes from now on, the
    // old ones are the point in time, frozen while libvirt switched.
    let journal_before = dom.sh("journalctl -b -u vssd -o cat --no-pager | wc -l").trim().parse::<u64>().unwrap();
    let mut args: Vec<String> =
        ["snapshot-create-as", &dom.name, "vssd-quiesced", "--disk-only", "--quiesce", "--atomic", "--no-metadata"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    for (i, n) in ["root", "data", "data2"].iter().enumerate() {
        let dev = (b'a' + i as u8) as char;
        args.push("--diskspec".into());
        args.push(format!("vd{dev},snapshot=external,file={}", dom.dir.join(format!("{n}-snap.qcow2")).display()));
    }
    let t = Instant::now();
    let out = virsh_with_limit(&args, Duration::from_secs(180));
    out.expect_code(0, "virsh snapshot-create-as --disk-only --quiesce");
    let snap_took = t.elapsed();
    for n in ["root", "data", "data2"] {
        assert!(dom.dir.join(format!("{n}-snap.qcow2")).is_file(), "no snapshot overlay for {n}");
    }
    let blk = virsh(&["domblklist", &dom.name]).stdout;
    assert!(blk.contains("-snap.qcow2"), "the domain does not write to the new overlays:\n{blk}");
    let (code, o) = dom.shell(WRITE_DATA, Duration::from_secs(30));
    assert_eq!(code, 0, "writing after the quiesced snapshot (vssd thawed?): {o}");
    assert!(dom.sh("vssctl --timeout 5 status").contains("status: thawed"));
    let journal = dom.sh("journalctl -b -u vssd -o cat --no-pager");
    let new_lines: Vec<&str> = journal.lines().skip(journal_before as usize).collect();
    eprintln!(
        "[libvirt-sys] snapshot-create-as --disk-only --quiesce: {:.2} s; vssd logged:\n{}",
        snap_took.as_secs_f64(),
        new_lines.join("\n")
    );
    assert!(!new_lines.is_empty(), "vssd logged nothing of the quiesced snapshot");
    // The point in time: the data overlays libvirt stopped writing at the snapshot are clean
    // filesystems (quiesced), read while the domain runs on.
    for n in ["data", "data2"] {
        let img = dom.dir.join(format!("{n}.qcow2"));
        let res = hostsim::inspect::fsck_image(&img).expect("fsck the snapshot's point in time");
        assert!(!res.is_empty(), "no filesystem found in {n}");
        for r in res {
            assert!(r.ok, "{n} {} ({}) in the quiesced snapshot is not clean: {}", r.label, r.fstype, r.detail);
        }
    }
    assert_eq!(dom.state(), "running");
}
