//! kmod-shim's parsers of what the kernel hands over: `hv_vss_msg`, mountinfo, sysfs.

use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use kmod_shim::hv::{self, VssMsg};
use kmod_shim::topology::Topology;
use kmod_shim::DevId;

/// Every prefix of the input as an `hv_vss_msg` and a version reply: only the exact sizes
/// decode, and a decoded message encodes back to the same bytes.
pub fn hv_vss_msg(data: &[u8]) {
    for n in 0..=data.len().min(32) {
        let b = &data[..n];
        match VssMsg::from_bytes(b) {
            Ok(m) => {
                assert_eq!(m.to_bytes().as_slice(), b, "{m:?} does not encode back");
                let _ = (m.op(), m.error(), format!("{m:?}"));
                // A reply: the error goes over the union's first four bytes (the operation
                // byte becomes its low byte), the rest of the header and the flags stay.
                let mut r = m;
                let e = m.error() ^ 0x8000_4005;
                r.set_error(e);
                assert_eq!(r.op_byte(), e.to_ne_bytes()[0], "the error's low byte is not over the operation");
                assert_eq!((&r.header[4..], r.flags), (&m.header[4..], m.flags), "the error spilled past the union");
                assert_eq!(VssMsg::from_bytes(&r.to_bytes()).map(|x| x.error()), Ok(e));
            }
            Err(e) => assert_ne!(n, 12, "12 bytes are a message: {e}"),
        }
        let _ = hv::decode_version(b);
        if let Some(op) = b.first().and_then(|&o| hv::Op::from_u8(o)) {
            assert_eq!(VssMsg::with_op(b[0]).op(), Some(op));
            let _ = op.name();
        }
    }
}

/// The input as `/proc/self/mountinfo`: parses or is an error, every mount's accessors
/// answer, and unescaping never panics.
pub fn mountinfo(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(mounts) = kmod_shim::mountinfo::parse(&text) {
        for m in &mounts {
            let _ = (m.is_read_only(), m.superblock_read_only(), m.super_option("errors"));
        }
    }
    for word in text.split_whitespace() {
        let _ = kmod_shim::mountinfo::unescape(word);
    }
}

/// The input as a sysfs tree in a temporary directory, one entry a line: `d PATH`, `f PATH
/// CONTENT` (`\n` written as the two characters), `l PATH TARGET` (relative, never out of the
/// tree). Then every walk the agent does: each `dev/block/M:N` device's disks, backing files
/// and name, and the list of block disks. Nothing may panic or loop.
pub fn topology(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(dir) = tempfile::tempdir() else { return };
    let root = dir.path();
    for line in text.lines().take(200) {
        let mut f = line.splitn(3, ' ');
        let (Some(kind), Some(path)) = (f.next(), f.next()) else { continue };
        let Some(rel) = inside(path) else { continue };
        let p = root.join(&rel);
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match kind {
            "d" => drop(std::fs::create_dir_all(&p)),
            "f" => drop(std::fs::write(&p, f.next().unwrap_or("").replace("\\n", "\n"))),
            "l" => {
                let target = f.next().unwrap_or("");
                let depth = rel.components().count().saturating_sub(1);
                let ups = Path::new(target).components().filter(|c| *c == Component::ParentDir).count();
                if !target.starts_with('/') && ups <= depth && !target.is_empty() {
                    let _ = symlink(target, &p);
                }
            }
            _ => {}
        }
    }
    let t = Topology::new(root).with_udev_db(root.join("udev"));
    let mut devs = vec![DevId::from_raw(0)];
    if let Ok(rd) = std::fs::read_dir(root.join("dev/block")) {
        for e in rd.flatten().take(32) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((maj, min)) = name.split_once(':') {
                if let (Ok(maj), Ok(min)) = (maj.parse::<u64>(), min.parse::<u64>()) {
                    devs.push(DevId::from_raw(((maj & 0xfff) << 8) | (min & 0xff) | ((min & !0xff) << 12)));
                }
            }
        }
    }
    for d in devs {
        let _ = t.backing_files(d);
        let _ = t.name(d);
        let _ = t.fs_disks(d);
    }
    let _ = t.block_disks();
}

/// A relative path of plain names, or None.
fn inside(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}
