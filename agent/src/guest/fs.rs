//! `guest-get-fsinfo`, `guest-get-disks` and `guest-fstrim`, answered as qemu-ga 7.2 answers
//! them (docs/qga-wire.md, "Filesystem and disk commands").
//!
//! The three share qemu-ga's choice of mounts (`build_fs_mount_list`): every line of the mount
//! table whose device has a major number, plus btrfs mounts (whose superblock has an anonymous
//! device) when their source is a block device; nothing else is filtered, so a filesystem
//! mounted twice is listed (and trimmed) twice, as by qemu-ga. Lists come in qemu-ga's order:
//! it prepends as it goes, so the last mount comes first. The disk topology is
//! `kmod_shim::topology`'s; the paths (mount table, sysfs, udev's database) come from
//! [`Paths`], so tests run on trees they wrote.
//!
//! Everything here blocks (sysfs, `statvfs`, FITRIM): callers run it on a blocking thread.
//! A trim must not overlap a freeze; the caller holds the agent's operation lock for it
//! ([`crate::service::Agent::while_thawed`]).

use std::path::{Path, PathBuf};

use kmod_shim::mountinfo::Mount;
use kmod_shim::topology::{BlockDisk, BusType, DiskAddress, Topology};
use kmod_shim::trim::TrimError;
use kmod_shim::DevId;
use qga_wire::QgaError;
use serde_json::{json, Map, Value};

use crate::config::Config;

/// Where the commands read the machine from.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// The sysfs root (`/sys`).
    pub sysfs: PathBuf,
    /// udev's database (`/run/udev/data`), where serials and device-mapper names are.
    pub udev_db: Option<PathBuf>,
}

impl Paths {
    /// The agent's paths; udev's database at its usual place.
    pub fn from_config(cfg: &Config) -> Paths {
        Paths { mountinfo: cfg.mountinfo.clone(), sysfs: cfg.sysfs.clone(), udev_db: Some("/run/udev/data".into()) }
    }

    fn topology(&self) -> Topology {
        let t = Topology::new(&self.sysfs);
        match &self.udev_db {
            Some(db) => t.with_udev_db(db),
            None => t,
        }
    }
}

/// A mount as qemu-ga keeps it: where, what type, and the block device it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMount {
    /// The mount point.
    pub dirname: PathBuf,
    /// The filesystem type.
    pub devtype: String,
    /// The block device (for btrfs, its source device's number, not the anonymous one).
    pub dev: DevId,
}

/// qemu-ga's `build_fs_mount_list` over a parsed mount table. `block_dev_of` answers the
/// device number of a source path that is a block device node (for btrfs).
pub fn fs_mounts(mounts: &[Mount], block_dev_of: impl Fn(&str) -> Option<DevId>) -> Vec<FsMount> {
    mounts
        .iter()
        .filter_map(|m| {
            let dev = if m.dev.major != 0 {
                m.dev
            } else if m.fstype == "btrfs" {
                block_dev_of(&m.source)?
            } else {
                return None;
            };
            Some(FsMount { dirname: m.mount_point.clone(), devtype: m.fstype.clone(), dev })
        })
        .collect()
}

/// The device number of `path` if it is a block device node (qemu-ga's `dev_major_minor`).
pub fn block_dev_of(path: &str) -> Option<DevId> {
    use nix::sys::stat::{stat, SFlag};
    let st = stat(Path::new(path)).ok()?;
    (SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK).then(|| DevId::from_raw(st.st_rdev))
}

fn read_mounts(p: &Paths) -> Result<Vec<FsMount>, QgaError> {
    let mounts = kmod_shim::mountinfo::read(&p.mountinfo)
        .map_err(|e| QgaError::generic(format!("{:#}", anyhow::Error::from(e))))?;
    Ok(fs_mounts(&mounts, block_dev_of))
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A `GuestDiskAddress`.
pub fn disk_address_json(d: &DiskAddress) -> Value {
    let pci = &d.pci_controller;
    let mut v = json!({
        "pci-controller": {"domain": pci.domain, "bus": pci.bus, "slot": pci.slot, "function": pci.function},
        "bus-type": d.bus_type.as_str(),
        "bus": d.bus,
        "target": d.target,
        "unit": d.unit,
    });
    if let Some(s) = &d.serial {
        v["serial"] = json!(s);
    }
    if let Some(s) = &d.dev {
        v["dev"] = json!(s);
    }
    if let Some(c) = &d.ccw_address {
        v["ccw-address"] = json!({"cssid": c.cssid, "ssid": c.ssid, "subchno": c.subchno, "devno": c.devno});
    }
    v
}

/// Used and total bytes as qemu-ga counts them: used = blocks - free, total = used + the
/// blocks available to unprivileged users (so root's reserve is in neither), in fragments.
fn usage(mountpoint: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(mountpoint).ok()?;
    let frsize = st.fragment_size() as u64;
    let used = (st.blocks() as u64).wrapping_sub(st.blocks_free() as u64);
    let total = used.wrapping_add(st.blocks_available() as u64);
    Some((used.wrapping_mul(frsize), total.wrapping_mul(frsize)))
}

/// `guest-get-fsinfo`: every mount qemu-ga lists, with its disks and usage.
pub fn get_fsinfo(p: &Paths) -> Result<Value, QgaError> {
    let topo = p.topology();
    let mut out = Vec::new();
    for m in read_mounts(p)? {
        // A sysfs directory that cannot be read fails the command, as in qemu-ga.
        let fs = topo.fs_disks(m.dev).map_err(|e| QgaError::generic(e.to_string()))?;
        let mut v = Map::new();
        v.insert("name".into(), json!(fs.name));
        v.insert("mountpoint".into(), json!(path_str(&m.dirname)));
        v.insert("type".into(), json!(m.devtype));
        if let Some((used, total)) = usage(&m.dirname) {
            v.insert("used-bytes".into(), json!(used));
            v.insert("total-bytes".into(), json!(total));
        }
        v.insert("disk".into(), Value::Array(fs.disks.iter().map(disk_address_json).collect()));
        out.insert(0, Value::Object(v));
    }
    Ok(Value::Array(out))
}

/// A `GuestDiskSmart` of type nvme.
fn smart_json(s: &kmod_shim::nvme::SmartLog) -> Value {
    let mut v = json!({
        "type": "nvme",
        "critical-warning": s.critical_warning,
        "temperature": s.temperature,
        "available-spare": s.available_spare,
        "available-spare-threshold": s.available_spare_threshold,
        "percentage-used": s.percentage_used,
    });
    for (key, [lo, hi]) in [
        ("data-units-read", s.data_units_read),
        ("data-units-written", s.data_units_written),
        ("host-read-commands", s.host_read_commands),
        ("host-write-commands", s.host_write_commands),
        ("controller-busy-time", s.controller_busy_time),
        ("power-cycles", s.power_cycles),
        ("power-on-hours", s.power_on_hours),
        ("unsafe-shutdowns", s.unsafe_shutdowns),
        ("media-errors", s.media_errors),
        ("number-of-error-log-entries", s.number_of_error_log_entries),
    ] {
        v[format!("{key}-lo")] = json!(lo);
        v[format!("{key}-hi")] = json!(hi);
    }
    v
}

fn block_disk_json(d: &BlockDisk) -> Value {
    let mut v = json!({"name": d.name, "partition": d.partition});
    if let Some(deps) = &d.dependencies {
        v["dependencies"] = json!(deps);
    }
    if let Some(a) = &d.address {
        v["address"] = disk_address_json(a);
    }
    if let Some(a) = &d.alias {
        v["alias"] = json!(a);
    }
    // NVMe disks: the SMART / health log, when the device answers (qemu-ga: `smart`).
    if d.address.as_ref().is_some_and(|a| a.bus_type == BusType::Nvme) {
        if let Ok(s) = kmod_shim::nvme::smart_log(Path::new(&d.name)) {
            v["smart"] = smart_json(&s);
        }
    }
    v
}

/// `guest-get-disks`: every block device with a size and its partitions (and an NVMe disk's
/// SMART log).
pub fn get_disks(p: &Paths) -> Result<Value, QgaError> {
    let disks = p.topology().block_disks().map_err(|e| QgaError::generic(e.to_string()))?;
    Ok(Value::Array(disks.iter().map(block_disk_json).collect()))
}

fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

/// One path's `GuestFilesystemTrimResult`.
fn trim_one(path: &Path, minimum: Option<i64>) -> Value {
    let mut v = json!({"path": path_str(path)});
    // qemu-ga hands the signed argument to the kernel's unsigned field as it is.
    match kmod_shim::trim::trim_path(path, minimum.unwrap_or(0) as u64) {
        Ok(t) => {
            v["minimum"] = json!(t.minimum as i64);
            v["trimmed"] = json!(t.bytes as i64);
        }
        Err(TrimError::Open(e)) => v["error"] = json!(format!("failed to open: {}", strerror(&e))),
        Err(TrimError::Trim(e)) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EOPNOTSUPP)) => {
            v["error"] = json!("trim not supported")
        }
        Err(TrimError::Trim(e)) => v["error"] = json!(format!("failed to trim: {}", strerror(&e))),
    }
    v
}

/// `guest-fstrim`: FITRIM on every mount qemu-ga lists, one result per mount; a failure is
/// that path's `error`, never the command's.
pub fn fstrim(p: &Paths, minimum: Option<i64>) -> Result<Value, QgaError> {
    let mut paths = Vec::new();
    for m in read_mounts(p)? {
        paths.insert(0, trim_one(&m.dirname, minimum));
    }
    Ok(json!({ "paths": paths }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A machine in a directory: a virtio-blk disk `vdb` with a partition holding ext4, a
    /// device-mapper volume on that partition holding xfs, a loop device, btrfs on the loop
    /// device, a tmpfs and proc.
    struct Machine {
        dir: tempfile::TempDir,
    }

    impl Machine {
        fn new() -> Machine {
            let m = Machine { dir: tempfile::tempdir().unwrap() };
            let sys = m.sys();
            let pci = sys.join("devices/pci0000:00/0000:00:04.0");
            std::fs::create_dir_all(sys.join("bus/pci/drivers/virtio-pci")).unwrap();
            std::fs::create_dir_all(&pci).unwrap();
            symlink(sys.join("bus/pci/drivers/virtio-pci"), pci.join("driver")).unwrap();
            let vdb = pci.join("virtio2/block/vdb");
            let dm = sys.join("devices/virtual/block/dm-0");
            let lo = sys.join("devices/virtual/block/loop0");
            for (d, id, name) in [
                (&vdb, "252:16", "vdb"),
                (&vdb.join("vdb1"), "252:17", "vdb1"),
                (&dm, "253:0", "dm-0"),
                (&lo, "7:0", "loop0"),
            ] {
                std::fs::create_dir_all(d).unwrap();
                std::fs::write(d.join("uevent"), format!("DEVNAME={name}\n")).unwrap();
                std::fs::write(d.join("dev"), format!("{id}\n")).unwrap();
                std::fs::write(d.join("size"), "2048\n").unwrap();
                std::fs::create_dir_all(sys.join("dev/block")).unwrap();
                symlink(d, sys.join("dev/block").join(id)).unwrap();
                if name != "vdb1" {
                    std::fs::create_dir_all(d.join("slaves")).unwrap();
                    std::fs::create_dir_all(sys.join("block")).unwrap();
                    symlink(d, sys.join("block").join(name)).unwrap();
                }
            }
            symlink(vdb.join("vdb1"), dm.join("slaves/vdb1")).unwrap();
            std::fs::create_dir_all(m.dir.path().join("udev")).unwrap();
            std::fs::write(m.dir.path().join("udev/b253:0"), "E:DM_NAME=vg-data\n").unwrap();
            std::fs::write(m.dir.path().join("udev/b252:17"), "E:ID_SERIAL=disk-1\n").unwrap();
            for d in ["data", "vol", "img", "bt", "tmp"] {
                std::fs::create_dir_all(m.dir.path().join("mnt").join(d)).unwrap();
            }
            let mnt = m.dir.path().join("mnt");
            let mnt = mnt.display();
            std::fs::write(
                m.mountinfo(),
                format!(
                    "23 1 0:21 / /proc rw - proc proc rw\n\
                     30 1 252:17 / {mnt}/data rw - ext4 /dev/vdb1 rw\n\
                     31 1 253:0 / {mnt}/vol rw - xfs /dev/mapper/vg-data rw\n\
                     32 1 7:0 / {mnt}/img rw - ext4 /dev/loop0 rw\n\
                     33 1 0:45 / {mnt}/bt rw - btrfs /dev/vssd-test-loop rw,subvol=/\n\
                     34 1 0:46 / {mnt}/tmp rw - tmpfs tmpfs rw\n\
                     35 1 0:47 / /gone rw - btrfs /dev/nonexistent rw\n"
                ),
            )
            .unwrap();
            m
        }

        fn sys(&self) -> PathBuf {
            self.dir.path().join("sys")
        }

        fn mountinfo(&self) -> PathBuf {
            self.dir.path().join("mountinfo")
        }

        fn paths(&self) -> Paths {
            Paths { mountinfo: self.mountinfo(), sysfs: self.sys(), udev_db: Some(self.dir.path().join("udev")) }
        }

        fn mnt(&self, name: &str) -> String {
            path_str(&self.dir.path().join("mnt").join(name))
        }
    }

    #[test]
    fn qemu_gas_mounts_are_those_with_a_block_device() {
        let mounts = kmod_shim::mountinfo::read(&Machine::new().mountinfo()).unwrap();
        // The btrfs source stands in for a block device node here.
        let fake = |s: &str| (s == "/dev/vssd-test-loop").then_some(DevId { major: 7, minor: 0 });
        let got: Vec<(String, String, String)> = fs_mounts(&mounts, fake)
            .into_iter()
            .map(|m| (m.dirname.file_name().unwrap().to_string_lossy().into_owned(), m.devtype, m.dev.to_string()))
            .collect();
        let want =
            [("data", "ext4", "252:17"), ("vol", "xfs", "253:0"), ("img", "ext4", "7:0"), ("bt", "btrfs", "7:0")];
        assert_eq!(got, want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())));
    }

    #[test]
    fn a_btrfs_source_that_is_not_a_block_device_is_left_out() {
        assert_eq!(block_dev_of("/dev/null"), None, "a character device");
        assert_eq!(block_dev_of("/"), None, "a directory (a bind mount's source)");
        assert_eq!(block_dev_of("/nonexistent"), None);
    }

    #[test]
    fn fsinfo_lists_mounts_last_first_with_names_disks_and_usage() {
        let m = Machine::new();
        let v = get_fsinfo(&m.paths()).unwrap();
        let list = v.as_array().unwrap();
        // Its source is no block device on this machine: the btrfs mount is left out.
        let points: Vec<&str> = list.iter().map(|f| f["mountpoint"].as_str().unwrap()).collect();
        assert_eq!(points, [m.mnt("img"), m.mnt("vol"), m.mnt("data")]);
        let data = &list[2];
        assert_eq!(data["name"], "vdb1");
        assert_eq!(data["type"], "ext4");
        assert!(data["used-bytes"].is_u64() && data["total-bytes"].is_u64(), "{data}");
        assert_eq!(
            data["disk"],
            json!([{
                "pci-controller": {"domain": 0, "bus": 0, "slot": 4, "function": 0},
                "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0,
                "serial": "disk-1", "dev": "/dev/vdb1",
            }])
        );
        assert_eq!(list[1]["name"], "dm-0");
        assert_eq!(list[1]["disk"], data["disk"], "dm-0 lives on vdb1");
        assert_eq!(list[0]["name"], "loop0");
        assert_eq!(list[0]["disk"], json!([]));
    }

    #[test]
    fn fsinfo_leaves_out_usage_it_cannot_read() {
        let m = Machine::new();
        std::fs::write(m.mountinfo(), "30 1 252:17 / /nonexistent/data rw - ext4 /dev/vdb1 rw\n").unwrap();
        let v = get_fsinfo(&m.paths()).unwrap();
        let f = v[0].as_object().unwrap();
        let mut keys: Vec<&str> = f.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["disk", "mountpoint", "name", "type"]);
    }

    #[test]
    fn disks_have_their_partitions_dependencies_and_aliases() {
        let m = Machine::new();
        let v = get_disks(&m.paths()).unwrap();
        let by_name = |n: &str| v.as_array().unwrap().iter().find(|d| d["name"] == n).cloned().unwrap();
        assert_eq!(by_name("/dev/vdb1"), json!({"name": "/dev/vdb1", "partition": true, "dependencies": ["/dev/vdb"]}));
        assert_eq!(
            by_name("/dev/dm-0"),
            json!({"name": "/dev/dm-0", "partition": false, "dependencies": ["/dev/vdb1"], "alias": "vg-data"})
        );
        let vdb = by_name("/dev/vdb");
        assert_eq!(vdb["address"]["bus-type"], "virtio");
        assert_eq!(vdb["address"]["dev"], "/dev/vdb");
        assert_eq!(vdb["dependencies"], json!([]));
        assert_eq!(v.as_array().unwrap().len(), 4);
    }

    #[test]
    fn nvme_smart_has_qemu_gas_keys_and_types() {
        let s = kmod_shim::nvme::SmartLog { temperature: 323, data_units_read: [1, 2], ..Default::default() };
        let v = smart_json(&s);
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 26, "{v}");
        assert_eq!(v["type"], "nvme");
        assert_eq!(v["temperature"], 323);
        assert_eq!((v["data-units-read-lo"].as_u64(), v["data-units-read-hi"].as_u64()), (Some(1), Some(2)));
        assert!(o.values().all(|x| x.is_string() || x.is_u64()), "{v}");
    }

    #[test]
    fn fstrim_gives_every_mount_a_result_and_failures_stay_per_path() {
        let m = Machine::new();
        std::fs::write(
            m.mountinfo(),
            "30 1 252:17 / /nonexistent/data rw - ext4 /dev/vdb1 rw\n32 1 7:0 / /proc rw - proc x rw\n",
        )
        .unwrap();
        let v = fstrim(&m.paths(), Some(4096)).unwrap();
        let paths = v["paths"].as_array().unwrap();
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0]["path"], "/proc");
        // /proc cannot be trimmed: ENOTTY as root, EPERM otherwise.
        let e = paths[0]["error"].as_str().unwrap();
        assert!(e == "trim not supported" || e == "failed to trim: Operation not permitted", "{e}");
        assert_eq!(
            paths[1],
            json!({"path": "/nonexistent/data", "error": "failed to open: No such file or directory"})
        );
    }

    struct NoopKernel;
    impl crate::engine::Kernel for NoopKernel {
        fn freeze(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
        fn thaw(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn agent(m: &Machine) -> std::sync::Arc<crate::service::Agent> {
        let cfg = Config {
            scope: m.dir.path().join("mnt"),
            mountinfo: m.mountinfo(),
            sysfs: m.sys(),
            state_dir: m.dir.path().join("state"),
            ..Config::default()
        };
        crate::service::Agent::new(cfg, std::sync::Arc::new(NoopKernel))
    }

    async fn reply(s: &mut crate::qga::Session, req: &str) -> Value {
        let r = s.feed(req.as_bytes()).await;
        assert_eq!(r.len(), 1, "{req}");
        serde_json::from_slice(&r[0]).unwrap()
    }

    #[tokio::test]
    async fn while_frozen_fstrim_and_the_read_commands_are_disabled_as_in_qemu_ga() {
        let m = Machine::new();
        let table = std::fs::read_to_string(m.mountinfo()).unwrap();
        // Trim only what does not exist: the fixture's directories are on this machine's disk.
        std::fs::write(m.mountinfo(), "30 1 252:17 / /nonexistent/x rw - ext4 /dev/vdb1 rw\n").unwrap();
        let mut s = crate::qga::Session::new(agent(&m), 1);
        let v = reply(&mut s, r#"{"execute":"guest-fstrim","arguments":{"minimum":0}}"#).await;
        assert_eq!(v["return"]["paths"][0]["path"], "/nonexistent/x");
        std::fs::write(m.mountinfo(), table).unwrap();
        assert!(reply(&mut s, r#"{"execute":"guest-fsfreeze-freeze"}"#).await["return"].as_u64().unwrap() > 0);
        for cmd in ["guest-fstrim", "guest-get-fsinfo", "guest-get-disks"] {
            let v = reply(&mut s, &format!(r#"{{"execute":"{cmd}"}}"#)).await;
            assert_eq!(
                v["error"],
                json!({"class": "CommandNotFound", "desc": format!("Command {cmd} has been disabled: the agent is in frozen state")})
            );
        }
        reply(&mut s, r#"{"execute":"guest-fsfreeze-thaw"}"#).await;
        assert!(reply(&mut s, r#"{"execute":"guest-get-disks"}"#).await["return"].is_array());
    }

    #[tokio::test]
    async fn a_freeze_waits_for_a_trim_in_progress_and_a_trim_never_runs_frozen() {
        let m = Machine::new();
        let a = agent(&m);
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let trim = {
            let a = a.clone();
            tokio::spawn(async move {
                a.while_thawed("trim", move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
                .await
            })
        };
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap()).await.unwrap();
        let freeze = {
            let a = a.clone();
            tokio::spawn(async move { a.freeze(crate::service::FreezeRequest::default()).await.map(|r| r.frozen) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!freeze.is_finished(), "the freeze ran while a trim was in progress");
        assert_eq!(a.status(), "thawed");
        release_tx.send(()).unwrap();
        assert_eq!(trim.await.unwrap().unwrap(), Some(()));
        assert!(freeze.await.unwrap().unwrap() > 0);
        // Frozen now: the work does not run at all.
        assert_eq!(a.while_thawed("trim", || panic!("ran while frozen")).await.unwrap(), None::<()>);
        a.thaw().await.unwrap();
    }

    #[test]
    fn an_unreadable_mount_table_is_the_commands_error() {
        let m = Machine::new();
        let p = Paths { mountinfo: m.dir.path().join("nope"), ..m.paths() };
        assert!(get_fsinfo(&p).unwrap_err().desc.contains("nope"));
        assert!(fstrim(&p, None).unwrap_err().desc.contains("nope"));
    }
}
