//! The fixtures themselves: sandboxes mount what they say and leave nothing behind, also
//! when a test panics with a filesystem frozen; the write probe tells frozen from thawed.
//! These need no vssd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::*;

fn fstype(p: &Path) -> String {
    mount_of(p).unwrap_or_else(|| panic!("{} not mounted", p.display())).fstype
}

fn assert_clean(root: &Path, loops: &[PathBuf]) {
    let left: Vec<_> = mounts().into_iter().filter(|m| m.mount_point.starts_with(root)).collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
    // Loop devices are reused at once by tests running in parallel: check the backing file.
    for d in loops {
        let name = d.file_name().unwrap().to_str().unwrap();
        if let Ok(b) = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) {
            assert!(!b.trim().starts_with(root.to_str().unwrap()), "loop device {} still attached to {b}", d.display());
        }
    }
    assert!(!root.exists(), "sandbox dir {} left behind", root.display());
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn sandbox_mounts_every_kind_and_cleans_up() {
    require_root!();
    let sb = Sandbox::new("fixture_kinds");
    let root = sb.root().to_path_buf();
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let b = sb.btrfs("b");
    let sv = sb.btrfs_subvolume(&b, "sv", "sv");
    let bind = sb.bind(&e, "ebind");
    let out = sb.bind_outside(&e, "eout");
    let t = sb.tmpfs("t");
    let ro = sb.read_only_ext4("ro");
    let f = sb.fuse("f");
    let inner = sb.nested(Fs::Ext4, &x, "inner");

    assert_eq!(fstype(&e), "ext4");
    assert_eq!(fstype(&x), "xfs");
    assert_eq!(fstype(&b), "btrfs");
    assert_eq!(fstype(&sv), "btrfs");
    assert_eq!(mount_of(&sv).unwrap().dev, mount_of(&b).unwrap().dev, "subvolume shares the superblock");
    assert_eq!(mount_of(&bind).unwrap().dev, mount_of(&e).unwrap().dev);
    assert_eq!(mount_of(&out).unwrap().dev, mount_of(&e).unwrap().dev);
    assert!(!out.starts_with(sb.scope()));
    assert_eq!(fstype(&t), "tmpfs");
    assert!(mount_of(&ro).unwrap().is_read_only());
    assert!(fstype(&f).starts_with("fuse"));
    assert_eq!(fstype(&inner), "ext4");
    // The nested image's loop device is backed by a file on x.
    let src = sb.source_of(&inner);
    let name = Path::new(&src).file_name().unwrap().to_str().unwrap().to_string();
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).unwrap();
    assert!(Path::new(backing.trim()).starts_with(&x), "backing {backing} not on {}", x.display());
    for p in [&e, &x, &b, &sv, &t, &f, &inner] {
        assert_writable(p, THAWED, "fresh mount");
    }
    let loops = sb.loop_devices();
    assert_eq!(loops.len(), 5, "e x b ro inner: {loops:?}");
    drop(sb);
    assert_clean(&root, &loops);
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn write_probe_blocks_while_frozen_and_completes_after_thaw() {
    require_root!();
    let sb = Sandbox::new("fixture_probe");
    let e = sb.ext4("e");
    let x = sb.xfs("x");
    let b = sb.btrfs("b");
    for m in [&e, &x, &b] {
        sb.dirty(m);
        run("fsfreeze", &[std::ffi::OsStr::new("-f"), m.as_os_str()]);
        assert!(frozen_by_someone(m));
        let mut p = assert_frozen(m, BLOCKED, "after fsfreeze -f");
        run("fsfreeze", &[std::ffi::OsStr::new("-u"), m.as_os_str()]);
        p.assert_completes(THAWED, "after fsfreeze -u");
        assert!(!frozen_by_someone(m));
    }
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn fuse_mount_cannot_be_frozen() {
    require_root!();
    let sb = Sandbox::new("fixture_fuse");
    let f = sb.fuse("f");
    let err = kmod_shim::freeze::freeze_path(&f).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn sandbox_thaws_and_cleans_up_when_a_test_panics_while_frozen() {
    require_root!();
    let (root, loops) = {
        let info = std::sync::Mutex::new(None);
        let r = std::panic::catch_unwind(|| {
            let sb = Sandbox::new("fixture_panic");
            let x = sb.xfs("x");
            // Nested and both frozen, in the order vssd would freeze them.
            let inner = sb.nested(Fs::Ext4, &x, "inner");
            sb.dirty(&inner);
            kmod_shim::freeze::freeze_path(&inner).unwrap();
            kmod_shim::freeze::freeze_path(&x).unwrap();
            let _blocked = WriteProbe::start(&inner);
            *info.lock().unwrap() = Some((sb.root().to_path_buf(), sb.loop_devices()));
            panic!("deliberate panic while frozen");
        });
        assert!(r.is_err());
        info.into_inner().unwrap().unwrap()
    };
    assert_clean(&root, &loops);
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn frozen_probe_reports_a_read_only_filesystem_as_not_frozen() {
    require_root!();
    let sb = Sandbox::new("fixture_ro");
    let ro = sb.read_only_ext4("ro");
    assert!(!frozen_by_someone(&ro));
    kmod_shim::freeze::freeze_path(&ro).unwrap();
    assert!(frozen_by_someone(&ro));
    kmod_shim::freeze::thaw_path(&ro).unwrap();
}

#[test]
#[ignore = "root tier: needs root; tests/run-all.sh runs it"]
fn sandbox_cleans_up_a_nested_freeze_deadlock() {
    require_root!();
    let (root, loops) = {
        let sb = Sandbox::new("fixture_deadlock");
        let outer = sb.xfs("outer");
        let inner = sb.nested(Fs::Ext4, &outer, "inner");
        for _ in 0..8 {
            sb.dirty(&inner);
        }
        // The wrong order: the backing filesystem first. Freezing the inner one then has to
        // write through its loop device into the frozen outer one, and hangs.
        kmod_shim::freeze::freeze_path(&outer).unwrap();
        let inner2 = inner.clone();
        let stuck = std::thread::spawn(move || kmod_shim::freeze::freeze_path(&inner2));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!stuck.is_finished(), "the wrong-order freeze did not hang: {:?}", stuck.join());
        let info = (sb.root().to_path_buf(), sb.loop_devices());
        drop(sb);
        // The sandbox's thaw of the outer filesystem let the stuck freeze finish.
        let _ = stuck.join();
        info
    };
    assert_clean(&root, &loops);
}
