//! Block-device topology from sysfs: what a filesystem's device is stacked on.
//!
//! A filesystem on `/dev/loop3` lives, through the loop device, in a backing *file* that sits
//! on some other filesystem. Freezing that other filesystem first would block the loop device's
//! writeback and deadlock the freeze of the upper one, so the planner needs to know these
//! edges. Device-mapper and md devices list their lower devices in `slaves/`; a partition
//! belongs to the disk whose sysfs directory contains it.
//!
//! The same tree also says which host disk a filesystem is on, for `guest-get-fsinfo` and
//! `guest-get-disks`: [`Topology::fs_disks`] and [`Topology::block_disks`] walk it as qemu-ga
//! 7.2 does (see the section "Disk addresses" below).

use std::path::{Path, PathBuf};

use crate::DevId;

/// Reads block topology below a sysfs root (normally `/sys`).
#[derive(Debug, Clone)]
pub struct Topology {
    sys: PathBuf,
    udev_db: Option<PathBuf>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new("/sys")
    }
}

impl Topology {
    /// A reader rooted at `sys` (a test passes a directory it populated).
    pub fn new(sys: impl Into<PathBuf>) -> Self {
        Topology { sys: sys.into(), udev_db: None }
    }

    fn dev_dir(&self, dev: DevId) -> PathBuf {
        self.sys.join("dev/block").join(dev.to_string())
    }

    /// Every backing file that the block device `dev` is ultimately stored in: the loop
    /// device's file, or those of the loop devices below a device-mapper/md device or below
    /// the disk a partition belongs to. Empty for a device stacked on no file (a real disk)
    /// and for devices sysfs does not know (anonymous devices, network filesystems).
    pub fn backing_files(&self, dev: DevId) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        self.walk(self.dev_dir(dev), &mut out, &mut seen, 0);
        out
    }

    fn walk(&self, dir: PathBuf, out: &mut Vec<PathBuf>, seen: &mut Vec<PathBuf>, depth: usize) {
        // Stacks deeper than this are not real; the bound also ends any loop in sysfs.
        if depth > 16 {
            return;
        }
        let Some(dir) = resolve(&dir) else { return };
        if seen.contains(&dir) {
            return;
        }
        seen.push(dir.clone());
        // The common case first, in one read: a loop device has a backing file and nothing below.
        if let Ok(s) = std::fs::read_to_string(dir.join("loop/backing_file")) {
            let s = s.trim_end_matches('\n');
            // The kernel appends " (deleted)" when the file was unlinked.
            let s = s.strip_suffix(" (deleted)").unwrap_or(s);
            if !s.is_empty() {
                out.push(PathBuf::from(s));
            }
            return;
        }
        // A partition: its disk is the parent directory.
        if dir.join("partition").exists() {
            if let Some(parent) = dir.parent() {
                self.walk(parent.to_owned(), out, seen, depth + 1);
            }
            return;
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("slaves")) {
            let mut lowers: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            lowers.sort();
            for l in lowers {
                self.walk(l, out, seen, depth + 1);
            }
        }
    }

    /// The kernel name of a block device (`loop3`, `dm-0`, `vda1`), if sysfs knows it.
    pub fn name(&self, dev: DevId) -> Option<String> {
        let p = resolve(&self.dev_dir(dev))?;
        p.file_name().map(|n| n.to_string_lossy().into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Disk addresses: which host disk a filesystem lives on, the way qemu-ga 7.2 tells it.
//
// libvirt and KubeVirt map a guest mount to a host disk by the PCI address of its controller,
// the bus/target/unit on it, and the disk's serial. The walk follows qemu-ga's
// (`build_guest_fsinfo_for_device` and friends in qga/commands-posix.c) decision for decision,
// including its quirks (virtio-scsi reports the LUN as `unit` and nothing as `target`; a
// partly parsed path keeps what was parsed), because hosts compare the two agents' answers.
// `dev` is the device node udev would name (`/dev/` + the uevent's DEVNAME); `serial` and a
// device-mapper alias come from udev's database, as libudev reads them, so a guest without
// udev gets neither, from either agent.
// ---------------------------------------------------------------------------------------------

/// The bus a disk hangs on (qemu-ga's `GuestDiskBusType`, the values Linux guests produce).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusType {
    /// IDE (`ata_piix`).
    Ide,
    /// SCSI: LSI (`sym53c8xx`) or virtio-scsi.
    Scsi,
    /// virtio-blk.
    Virtio,
    /// SATA (`ahci`).
    Sata,
    /// NVMe.
    Nvme,
    /// Anything else.
    Unknown,
}

impl BusType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BusType::Ide => "ide",
            BusType::Scsi => "scsi",
            BusType::Virtio => "virtio",
            BusType::Sata => "sata",
            BusType::Nvme => "nvme",
            BusType::Unknown => "unknown",
        }
    }
}

/// A PCI address; -1 everywhere when the disk is not (known to be) on PCI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    /// Domain (segment).
    pub domain: i64,
    /// Bus.
    pub bus: i64,
    /// Slot (device).
    pub slot: i64,
    /// Function.
    pub function: i64,
}

impl PciAddress {
    const UNKNOWN: PciAddress = PciAddress { domain: -1, bus: -1, slot: -1, function: -1 };
}

/// An s390x channel-I/O address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CcwAddress {
    /// Channel subsystem id.
    pub cssid: i64,
    /// Subchannel set id.
    pub ssid: i64,
    /// Subchannel number.
    pub subchno: i64,
    /// Device number.
    pub devno: i64,
}

/// Where a disk is, as far as the guest can tell (qemu-ga's `GuestDiskAddress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAddress {
    /// The PCI function of the disk's controller.
    pub pci_controller: PciAddress,
    /// The bus type.
    pub bus_type: BusType,
    /// Bus number on the controller (IDE: which channel).
    pub bus: i64,
    /// Target number.
    pub target: i64,
    /// Unit number.
    pub unit: i64,
    /// udev's `ID_SERIAL`.
    pub serial: Option<String>,
    /// The device node, e.g. `/dev/vda1`.
    pub dev: Option<String>,
    /// The channel-I/O address (s390x).
    pub ccw_address: Option<CcwAddress>,
}

/// A filesystem's device: its kernel name and the disks it is stored on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsDisks {
    /// The kernel name of the device (`vda1`, `dm-0`), or `major:minor` when sysfs does not
    /// know it.
    pub name: String,
    /// The real disks below it, in qemu-ga's order.
    pub disks: Vec<DiskAddress>,
}

/// One block device or partition as `guest-get-disks` lists it (qemu-ga's `GuestDiskInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDisk {
    /// Its device node, e.g. `/dev/vda`.
    pub name: String,
    /// Whether it is a partition.
    pub partition: bool,
    /// The device nodes it is stacked on (a partition: its disk); None when sysfs has no
    /// `slaves/` for it.
    pub dependencies: Option<Vec<String>>,
    /// Its address, for disks that are not virtual.
    pub address: Option<DiskAddress>,
    /// Its device-mapper name (udev's `DM_NAME`).
    pub alias: Option<String>,
}

/// A failure qemu-ga reports as the command's error (a sysfs directory it could not read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WalkError(pub String);

fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

fn walk_error(call: &str, path: &Path, e: &std::io::Error) -> WalkError {
    WalkError(format!("{call}(\"{}\"): {}", path.display(), errno_text(e)))
}

impl Topology {
    /// Reads udev's properties (`ID_SERIAL`, `DM_NAME`) from the database in `dir`
    /// (normally `/run/udev/data`); without one, disks have no serial and no alias.
    pub fn with_udev_db(mut self, dir: impl Into<PathBuf>) -> Self {
        self.udev_db = Some(dir.into());
        self
    }

    /// The device node of the sysfs device at `syspath`: `/dev/` + its uevent's DEVNAME.
    pub fn devnode(&self, syspath: &Path) -> Option<String> {
        let text = std::fs::read_to_string(syspath.join("uevent")).ok()?;
        let name = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
        Some(if name.starts_with('/') { name.to_string() } else { format!("/dev/{name}") })
    }

    /// A udev property of the block device at `syspath`, from udev's database.
    pub fn udev_property(&self, syspath: &Path, key: &str) -> Option<String> {
        let db = self.udev_db.as_ref()?;
        let dev = std::fs::read_to_string(syspath.join("dev")).ok()?;
        let text = std::fs::read_to_string(db.join(format!("b{}", dev.trim()))).ok()?;
        text.lines().find_map(|l| l.strip_prefix("E:")?.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
    }

    /// The disks that the filesystem on block device `dev` is stored on (qemu-ga's
    /// `build_guest_fsinfo` for a mount of that device).
    pub fn fs_disks(&self, dev: DevId) -> Result<FsDisks, WalkError> {
        let mut acc = FsDisks { name: String::new(), disks: Vec::new() };
        let mut named = false;
        let r = self.walk_device(&self.dev_dir(dev), &mut acc, &mut named, 0);
        r.map(|()| acc)
    }

    /// qemu-ga's `build_guest_fsinfo_for_device`: names the filesystem after the first device
    /// met, then walks down a virtual device's slaves or reads a real device's address.
    fn walk_device(&self, devpath: &Path, acc: &mut FsDisks, named: &mut bool, depth: usize) -> Result<(), WalkError> {
        let syspath = match std::fs::canonicalize(devpath) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Not in sysfs (a container's view, an anonymous device): named after the path.
                if !*named {
                    acc.name = base_name(devpath);
                    *named = true;
                }
                return Ok(());
            }
            Err(e) => return Err(walk_error("realpath", devpath, &e)),
        };
        if !*named {
            acc.name = base_name(&syspath);
            *named = true;
        }
        if is_virtual(&syspath) {
            // Stacks deeper than this are not real; the bound also ends any loop in sysfs.
            if depth > 16 {
                return Ok(());
            }
            let slaves = syspath.join("slaves");
            let rd = match std::fs::read_dir(&slaves) {
                Ok(rd) => rd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(walk_error("opendir", &slaves, &e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| walk_error("readdir", &slaves, &e))?;
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    self.walk_device(&entry.path(), acc, named, depth + 1)?;
                }
            }
            Ok(())
        } else {
            let (disk, err) = self.real_device(&syspath);
            if let Some(d) = disk {
                // qemu-ga prepends each disk to its list.
                acc.disks.insert(0, d);
            }
            err.map_or(Ok(()), Err)
        }
    }

    /// qemu-ga's `build_guest_fsinfo_for_real_device`: the address of a device that is not
    /// virtual, kept when anything is known of it (even after a failure, which is returned).
    fn real_device(&self, syspath: &Path) -> (Option<DiskAddress>, Option<WalkError>) {
        let mut disk = DiskAddress {
            pci_controller: PciAddress::UNKNOWN,
            bus_type: BusType::Unknown,
            bus: 0,
            target: 0,
            unit: 0,
            serial: None,
            dev: self.devnode(syspath),
            ccw_address: None,
        };
        disk.serial = self.udev_property(syspath, "ID_SERIAL").filter(|s| !s.is_empty());
        let s = syspath.to_string_lossy();
        let (known, err) = if s.contains("/devices/pci") {
            pci_device(&s, &mut disk)
        } else if s.contains("/devices/css") {
            (ccw_device(&s, &mut disk), None)
        } else if s.contains("/virtio") {
            (nonpci_virtio(&s, &mut disk), None)
        } else {
            (false, None)
        };
        let keep = known || disk.dev.is_some() || disk.serial.is_some();
        (keep.then_some(disk), err)
    }

    /// The address of the disk whose sysfs directory is `syspath` (qemu-ga's
    /// `get_disk_address`); failures are ignored, as qemu-ga ignores them here.
    fn disk_address(&self, syspath: &Path) -> Option<DiskAddress> {
        let mut acc = FsDisks { name: String::new(), disks: Vec::new() };
        let mut named = false;
        let _ = self.walk_device(syspath, &mut acc, &mut named, 0);
        acc.disks.into_iter().next()
    }

    /// Every block device of `/sys/block` with a size, and its partitions, in the order
    /// qemu-ga's `guest-get-disks` lists them.
    pub fn block_disks(&self) -> Result<Vec<BlockDisk>, WalkError> {
        let dir = self.sys.join("block");
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| WalkError(format!("Can't open directory \"{}\": {}", dir.display(), errno_text(&e))))?;
        let mut out: Vec<BlockDisk> = Vec::new();
        for entry in rd.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_symlink()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let disk_dir = dir.join(&name);
            match std::fs::read_to_string(disk_dir.join("size")) {
                Ok(s) if s != "0\n" => {}
                _ => continue,
            }
            let Some(dev_name) = self.devnode(&disk_dir) else { continue };
            // A disk whose path cannot be resolved counts as virtual: no address.
            let virtual_ = std::fs::canonicalize(&disk_dir).map(|p| is_virtual(&p)).unwrap_or(true);
            let address = if virtual_ { None } else { self.disk_address(&disk_dir) };
            let dependencies = std::fs::read_dir(disk_dir.join("slaves")).ok().map(|rd| {
                let mut deps = Vec::new();
                for dep in rd.flatten() {
                    if let Some(node) = std::fs::canonicalize(dep.path()).ok().and_then(|p| self.devnode(&p)) {
                        deps.insert(0, node);
                    }
                }
                deps
            });
            out.insert(
                0,
                BlockDisk {
                    name: dev_name.clone(),
                    partition: false,
                    dependencies,
                    address,
                    alias: self.udev_property(&disk_dir, "DM_NAME").filter(|a| !a.is_empty()),
                },
            );
            // Partitions: subdirectories named `<disk><n>` or `<disk>p<n>`.
            let Ok(parts) = std::fs::read_dir(&disk_dir) else { continue };
            for part in parts.flatten() {
                if !part.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let pname = part.file_name().to_string_lossy().into_owned();
                let Some(rest) = pname.strip_prefix(name.as_str()) else { continue };
                let rest =
                    rest.strip_prefix('p').filter(|r| r.starts_with(|c: char| c.is_ascii_digit())).unwrap_or(rest);
                if !rest.starts_with(|c: char| c.is_ascii_digit()) {
                    continue;
                }
                let Some(node) = self.devnode(&disk_dir.join(&pname)) else { continue };
                out.insert(
                    0,
                    BlockDisk {
                        name: node,
                        partition: true,
                        dependencies: Some(vec![dev_name.clone()]),
                        address: None,
                        alias: None,
                    },
                );
            }
        }
        Ok(out)
    }
}

fn base_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn is_virtual(syspath: &Path) -> bool {
    syspath.to_string_lossy().contains("/devices/virtual/block/")
}

/// A small `sscanf` for the patterns qemu-ga matches sysfs paths with: literals, `%x` and
/// `%u` (stored unless written `%*x`/`%*u`) and `%n` (how far it got). Like `sscanf`, it
/// stops at the first mismatch and returns what it converted until then.
fn scan(s: &str, pattern: &str) -> (Vec<u32>, Option<usize>) {
    let (b, p) = (s.as_bytes(), pattern.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut vals = Vec::new();
    let mut consumed = None;
    while j < p.len() {
        if p[j] != b'%' {
            if i >= b.len() || b[i] != p[j] {
                break;
            }
            i += 1;
            j += 1;
            continue;
        }
        j += 1;
        let store = p.get(j) != Some(&b'*');
        if !store {
            j += 1;
        }
        let conv = p.get(j).copied();
        j += 1;
        let radix = match conv {
            Some(b'n') => {
                consumed = Some(i);
                continue;
            }
            Some(b'x') => 16,
            _ => 10,
        };
        let start = i;
        while i < b.len() && (b[i] as char).is_digit(radix) {
            i += 1;
        }
        if i == start {
            break;
        }
        let v = u64::from_str_radix(&s[start..i], radix).map_or(u32::MAX, |v| v as u32);
        if store {
            vals.push(v);
        }
    }
    (vals, consumed)
}

/// The driver bound to the sysfs device at `dir` (the last component of its `driver` link).
fn driver_of(dir: &str) -> Option<String> {
    let link = std::fs::read_link(format!("{dir}/driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The sorted numbers of the `ata<N>` or `host<N>` entries of `dir` (at most 8, as qemu-ga).
fn host_numbers(dir: &str, ata: bool) -> std::io::Result<Vec<u32>> {
    let prefix = if ata { "ata" } else { "host" };
    let mut hosts = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        if hosts.len() >= 8 {
            break;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(prefix) {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = digits.parse::<u32>() {
                hosts.push(n);
            }
        }
    }
    hosts.sort_unstable();
    Ok(hosts)
}

const PCI_DRIVERS: &[&str] = &["ata_piix", "sym53c8xx", "virtio-pci", "ahci", "nvme"];

/// qemu-ga's `build_guest_fsinfo_for_pci_dev`: the controller's PCI address (below any
/// bridges) and the bus type and numbers its driver implies.
fn pci_device(syspath: &str, disk: &mut DiskAddress) -> (bool, Option<WalkError>) {
    let at = syspath.find("/devices/pci").expect("checked by the caller") + "/devices/pci".len();
    let (pci, n) = scan(&syspath[at..], "%*x:%*x/%x:%x:%x.%x%n");
    let Some(n) = n.filter(|_| pci.len() == 4) else { return (false, None) };
    let mut pci = [pci[0], pci[1], pci[2], pci[3]];
    // Walk down through bridges to the first function whose driver qemu-ga knows.
    let mut end = at + n;
    let driver = loop {
        let driver = driver_of(&syspath[..end]);
        if let Some(d) = driver.filter(|d| PCI_DRIVERS.contains(&d.as_str())) {
            break d;
        }
        match scan(&syspath[end..], "/%x:%x:%x.%x%n") {
            (v, Some(len)) if v.len() == 4 => {
                pci = [v[0], v[1], v[2], v[3]];
                end += len;
            }
            _ => return (false, None),
        }
    };
    let tgt = syspath.find("/target").map(|t| scan(&syspath[t + 7..], "%*u:%*u:%*u/%*u:%u:%u:%u").0);
    let tgt = tgt.filter(|t| t.len() == 3);
    let (host_at, ata) = match syspath.find("/ata") {
        Some(p) => (Some((p, p + 4)), true),
        None => (syspath.find("/host").map(|p| (p, p + 5)), false),
    };
    let mut host = None;
    let mut hosts = Vec::new();
    if let Some((p, q)) = host_at {
        if let Some(&h) = scan(&syspath[q..], "%u").0.first() {
            host = Some(h);
            match host_numbers(&syspath[..p], ata) {
                Ok(h) => hosts = h,
                Err(e) => return (false, Some(walk_error("opendir", Path::new(&syspath[..p]), &e))),
            }
        }
    }
    disk.pci_controller =
        PciAddress { domain: pci[0].into(), bus: pci[1].into(), slot: pci[2].into(), function: pci[3].into() };
    let index = |h: u32| hosts.iter().position(|&x| x == h).map(|i| i as i64);
    match driver.as_str() {
        "ata_piix" => {
            // A host per IDE channel; target*:0:<unit>:0.
            let (Some(h), Some(t)) = (host, &tgt) else { return (false, None) };
            let Some(i) = index(h) else { return (false, None) };
            disk.bus_type = BusType::Ide;
            disk.bus = i;
            disk.unit = t[1].into();
        }
        "sym53c8xx" => {
            let Some(t) = &tgt else { return (false, None) };
            disk.bus_type = BusType::Scsi;
            disk.unit = t[1].into();
        }
        "virtio-pci" => match &tgt {
            // virtio-scsi: qemu-ga reports the LUN only.
            Some(t) => {
                disk.bus_type = BusType::Scsi;
                disk.unit = t[2].into();
            }
            None => disk.bus_type = BusType::Virtio,
        },
        "ahci" => {
            // One host per port.
            let (Some(h), Some(_)) = (host, &tgt) else { return (false, None) };
            let Some(i) = index(h) else { return (false, None) };
            disk.unit = i;
            disk.bus_type = BusType::Sata;
        }
        "nvme" => disk.bus_type = BusType::Nvme,
        _ => return (false, None),
    }
    (true, None)
}

/// qemu-ga's `build_guest_fsinfo_for_nonpci_virtio` (virtio-mmio, virtio-ccw).
fn nonpci_virtio(syspath: &str, disk: &mut DiskAddress) -> bool {
    if !syspath.contains("/virtio") || !syspath.contains("/block") {
        return false;
    }
    let tgt = syspath.find("/target").map(|t| scan(&syspath[t + 7..], "%*u:%*u:%*u/%*u:%u:%u:%u").0);
    match tgt.filter(|t| t.len() == 3) {
        Some(t) => {
            disk.bus_type = BusType::Scsi;
            disk.bus = t[0].into();
            disk.target = t[1].into();
            disk.unit = t[2].into();
        }
        None => disk.bus_type = BusType::Virtio,
    }
    true
}

/// qemu-ga's `build_guest_fsinfo_for_ccw_dev` (s390x).
fn ccw_device(syspath: &str, disk: &mut DiskAddress) -> bool {
    let at = syspath.find("/devices/css").expect("checked by the caller") + "/devices/css".len();
    let v = scan(&syspath[at..], "%*x/%x.%x.%x/%*x.%*x.%x/").0;
    if v.len() < 4 {
        return false;
    }
    disk.ccw_address =
        Some(CcwAddress { cssid: v[0].into(), ssid: v[1].into(), subchno: v[2].into(), devno: v[3].into() });
    if syspath[at..].contains("/virtio") {
        nonpci_virtio(syspath, disk);
    }
    true
}

/// Follows the one symlink sysfs puts at `/sys/dev/block/M:N` and at `slaves/*` (a relative
/// link into `/sys/devices`) and folds the `..`s, without the readlink per path component
/// that `canonicalize` costs: the planner runs this for every filesystem on every freeze.
fn resolve(p: &Path) -> Option<PathBuf> {
    let target = match std::fs::read_link(p) {
        Ok(t) => t,
        // Not a symlink: a directory reached through its parent, as it is.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Some(p.to_owned()),
        Err(_) => return None,
    };
    let joined = if target.is_absolute() { target } else { p.parent()?.join(target) };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// The device number of the filesystem that `path` lives on (`st_dev`), without following a
/// final symlink. `stat` does not block on a frozen filesystem.
pub fn dev_of(path: &Path) -> std::io::Result<DevId> {
    let st = nix::sys::stat::lstat(path).map_err(std::io::Error::from)?;
    Ok(DevId::from_raw(st.st_dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_sys() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let devices = r.join("devices/virtual/block");
        // loop0 backed by /img/a.img, loop1 by a deleted file, dm-0 over loop0, loop0p1 a partition.
        for (name, backing) in [
            ("loop0", Some("/img/a.img\n")),
            ("loop1", Some("/img/gone.img (deleted)\n")),
            ("dm-0", None),
            ("vda", None),
        ] {
            let d = devices.join(name);
            std::fs::create_dir_all(&d).unwrap();
            if let Some(b) = backing {
                std::fs::create_dir_all(d.join("loop")).unwrap();
                std::fs::write(d.join("loop/backing_file"), b).unwrap();
            }
        }
        std::fs::create_dir_all(devices.join("loop0/loop0p1")).unwrap();
        std::fs::write(devices.join("loop0/loop0p1/partition"), "1\n").unwrap();
        std::fs::create_dir_all(devices.join("dm-0/slaves")).unwrap();
        symlink("../../loop0", devices.join("dm-0/slaves/loop0")).unwrap();
        symlink("../../loop1", devices.join("dm-0/slaves/loop1")).unwrap();
        std::fs::create_dir_all(r.join("dev/block")).unwrap();
        for (id, target) in
            [("7:0", "loop0"), ("7:1", "loop1"), ("259:0", "loop0/loop0p1"), ("253:0", "dm-0"), ("252:0", "vda")]
        {
            symlink(devices.join(target), r.join("dev/block").join(id)).unwrap();
        }
        t
    }

    #[test]
    fn loop_device_reports_its_backing_file() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("7:0".parse().unwrap()), vec![PathBuf::from("/img/a.img")]);
        assert_eq!(topo.name("7:0".parse().unwrap()).as_deref(), Some("loop0"));
    }

    #[test]
    fn deleted_backing_file_keeps_its_path() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("7:1".parse().unwrap()), vec![PathBuf::from("/img/gone.img")]);
    }

    #[test]
    fn partition_and_device_mapper_resolve_to_the_loop_files_below() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert_eq!(topo.backing_files("259:0".parse().unwrap()), vec![PathBuf::from("/img/a.img")]);
        assert_eq!(
            topo.backing_files("253:0".parse().unwrap()),
            vec![PathBuf::from("/img/a.img"), PathBuf::from("/img/gone.img")]
        );
    }

    /// A sysfs tree with the disks qemu-ga knows: virtio-blk with a partition, virtio-scsi,
    /// NVMe behind a PCIe port, SATA, IDE, device-mapper over a partition, an empty loop.
    struct Disks {
        dir: tempfile::TempDir,
    }

    impl Disks {
        fn sys(&self) -> &Path {
            self.dir.path()
        }

        fn topo(&self) -> Topology {
            Topology::new(self.sys()).with_udev_db(self.sys().join("udev"))
        }

        /// A PCI function at `rel` (under devices/) bound to `driver`.
        fn pci(&self, rel: &str, driver: &str) {
            let d = self.sys().join("devices").join(rel);
            std::fs::create_dir_all(&d).unwrap();
            let drv = self.sys().join("bus/pci/drivers").join(driver);
            std::fs::create_dir_all(&drv).unwrap();
            symlink(&drv, d.join("driver")).unwrap();
        }

        /// A block device at `rel` (under devices/), `/sys/dev/block/ID` pointing at it, and for
        /// whole disks `/sys/block/NAME`.
        fn block(&self, rel: &str, id: &str, size: &str, partition: bool) -> PathBuf {
            let d = self.sys().join("devices").join(rel);
            std::fs::create_dir_all(&d).unwrap();
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            let kind = if partition { "partition" } else { "disk" };
            std::fs::write(d.join("uevent"), format!("MAJOR=1\nMINOR=2\nDEVNAME={name}\nDEVTYPE={kind}\n")).unwrap();
            std::fs::write(d.join("dev"), format!("{id}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
            std::fs::create_dir_all(d.join("power")).unwrap();
            std::fs::create_dir_all(self.sys().join("dev/block")).unwrap();
            symlink(&d, self.sys().join("dev/block").join(id)).unwrap();
            if partition {
                std::fs::write(d.join("partition"), "1\n").unwrap();
            } else {
                std::fs::create_dir_all(d.join("slaves")).unwrap();
                std::fs::create_dir_all(self.sys().join("block")).unwrap();
                symlink(&d, self.sys().join("block").join(&name)).unwrap();
            }
            d
        }

        fn udev(&self, id: &str, props: &str) {
            std::fs::create_dir_all(self.sys().join("udev")).unwrap();
            std::fs::write(self.sys().join("udev").join(format!("b{id}")), props).unwrap();
        }

        fn new() -> Disks {
            let x = Disks { dir: tempfile::tempdir().unwrap() };
            x.pci("pci0000:00/0000:00:04.0", "virtio-pci");
            let vdb = x.block("pci0000:00/0000:00:04.0/virtio2/block/vdb", "252:16", "2097152", false);
            x.block("pci0000:00/0000:00:04.0/virtio2/block/vdb/vdb1", "252:17", "2095104", true);
            x.udev("252:17", "S:disk/by-id/virtio-data\nE:ID_SERIAL=data-serial\nE:ID_FS_TYPE=ext4\n");
            x.pci("pci0000:00/0000:00:05.0", "virtio-pci");
            x.block("pci0000:00/0000:00:05.0/virtio3/host2/target2:0:1/2:0:1:3/block/sdb", "8:16", "1024", false);
            x.udev("8:16", "E:ID_SERIAL=0QEMU_QEMU_HARDDISK_drive-scsi1\n");
            x.pci("pci0000:00/0000:00:1c.0", "pcieport");
            x.pci("pci0000:00/0000:00:1c.0/0000:01:00.0", "nvme");
            x.block("pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1", "259:0", "4096", false);
            x.block("pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1/nvme0n1p1", "259:1", "2048", true);
            x.pci("pci0000:00/0000:00:1f.2", "ahci");
            for a in ["ata1", "ata2", "ata3"] {
                std::fs::create_dir_all(x.sys().join("devices/pci0000:00/0000:00:1f.2").join(a)).unwrap();
            }
            x.block("pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sda", "8:0", "100", false);
            x.pci("pci0000:00/0000:00:01.1", "ata_piix");
            for a in ["ata1", "ata2"] {
                std::fs::create_dir_all(x.sys().join("devices/pci0000:00/0000:00:01.1").join(a)).unwrap();
            }
            x.block("pci0000:00/0000:00:01.1/ata2/host1/target1:0:1/1:0:1:0/block/sdc", "8:32", "100", false);
            let dm = x.block("virtual/block/dm-0", "253:0", "2095104", false);
            symlink(vdb.join("vdb1"), dm.join("slaves/vdb1")).unwrap();
            x.udev("253:0", "E:DM_NAME=vg-data\n");
            x.block("virtual/block/loop0", "7:0", "0", false);
            x
        }
    }

    fn virtio_at(slot: i64) -> PciAddress {
        PciAddress { domain: 0, bus: 0, slot, function: 0 }
    }

    #[test]
    fn a_virtio_blk_partition_is_on_its_pci_function_with_its_serial() {
        let x = Disks::new();
        let fs = x.topo().fs_disks("252:17".parse().unwrap()).unwrap();
        assert_eq!(fs.name, "vdb1");
        assert_eq!(
            fs.disks,
            vec![DiskAddress {
                pci_controller: virtio_at(4),
                bus_type: BusType::Virtio,
                bus: 0,
                target: 0,
                unit: 0,
                serial: Some("data-serial".into()),
                dev: Some("/dev/vdb1".into()),
                ccw_address: None,
            }]
        );
        // Without udev's database: no serial, as qemu-ga in a guest without udev.
        let plain = Topology::new(x.sys()).fs_disks("252:17".parse().unwrap()).unwrap();
        assert_eq!(plain.disks[0].serial, None);
    }

    #[test]
    fn virtio_scsi_reports_the_lun_as_unit_like_qemu_ga() {
        let x = Disks::new();
        let d = &x.topo().fs_disks("8:16".parse().unwrap()).unwrap().disks[0];
        assert_eq!((d.bus_type, d.bus, d.target, d.unit), (BusType::Scsi, 0, 0, 3));
        assert_eq!(d.pci_controller, virtio_at(5));
        assert_eq!(d.serial.as_deref(), Some("0QEMU_QEMU_HARDDISK_drive-scsi1"));
    }

    #[test]
    fn nvme_behind_a_pcie_port_reports_the_controller_below_the_bridge() {
        let x = Disks::new();
        let d = &x.topo().fs_disks("259:1".parse().unwrap()).unwrap().disks[0];
        assert_eq!(d.bus_type, BusType::Nvme);
        assert_eq!(d.pci_controller, PciAddress { domain: 0, bus: 1, slot: 0, function: 0 });
        assert_eq!(d.dev.as_deref(), Some("/dev/nvme0n1p1"));
    }

    #[test]
    fn sata_and_ide_units_are_the_host_index() {
        let x = Disks::new();
        let sata = &x.topo().fs_disks("8:0".parse().unwrap()).unwrap().disks[0];
        assert_eq!((sata.bus_type, sata.bus, sata.unit), (BusType::Sata, 0, 2));
        assert_eq!(sata.pci_controller, PciAddress { domain: 0, bus: 0, slot: 0x1f, function: 2 });
        let ide = &x.topo().fs_disks("8:32".parse().unwrap()).unwrap().disks[0];
        assert_eq!((ide.bus_type, ide.bus, ide.unit), (BusType::Ide, 1, 1));
    }

    #[test]
    fn device_mapper_is_named_itself_and_lists_the_disk_below() {
        let x = Disks::new();
        let fs = x.topo().fs_disks("253:0".parse().unwrap()).unwrap();
        assert_eq!(fs.name, "dm-0");
        assert_eq!(fs.disks.len(), 1);
        assert_eq!(fs.disks[0].dev.as_deref(), Some("/dev/vdb1"));
        assert_eq!(fs.disks[0].bus_type, BusType::Virtio);
    }

    #[test]
    fn loop_and_unknown_devices_have_no_disks() {
        let x = Disks::new();
        let lo = x.topo().fs_disks("7:0".parse().unwrap()).unwrap();
        assert_eq!((lo.name.as_str(), lo.disks.len()), ("loop0", 0));
        // btrfs's anonymous device or a container without the device: named major:minor.
        let anon = x.topo().fs_disks("0:45".parse().unwrap()).unwrap();
        assert_eq!((anon.name.as_str(), anon.disks.len()), ("0:45", 0));
    }

    #[test]
    fn a_real_device_qemu_ga_cannot_place_keeps_its_node_with_unknown_bus() {
        let x = Disks::new();
        x.pci("pci0000:00/0000:00:06.0", "xhci_hcd");
        x.block("pci0000:00/0000:00:06.0/usb1/1-1/1-1:1.0/host5/target5:0:0/5:0:0:0/block/sdd", "8:48", "8", false);
        let d = &x.topo().fs_disks("8:48".parse().unwrap()).unwrap().disks[0];
        assert_eq!(d.bus_type, BusType::Unknown);
        assert_eq!(d.pci_controller, PciAddress::UNKNOWN);
        assert_eq!(d.dev.as_deref(), Some("/dev/sdd"));
    }

    #[test]
    fn block_disks_lists_disks_partitions_dependencies_and_aliases() {
        let x = Disks::new();
        let all = x.topo().block_disks().unwrap();
        let get = |n: &str| all.iter().find(|d| d.name == n).unwrap_or_else(|| panic!("{n} missing: {all:?}"));
        assert!(!all.iter().any(|d| d.name == "/dev/loop0"), "zero-sized disks are skipped");
        let vdb = get("/dev/vdb");
        assert!(!vdb.partition);
        assert_eq!(vdb.dependencies, Some(vec![]));
        assert_eq!(vdb.address.as_ref().unwrap().bus_type, BusType::Virtio);
        assert_eq!(vdb.address.as_ref().unwrap().dev.as_deref(), Some("/dev/vdb"));
        let vdb1 = get("/dev/vdb1");
        assert!(vdb1.partition);
        assert_eq!(vdb1.dependencies, Some(vec!["/dev/vdb".to_string()]));
        assert_eq!(vdb1.address, None);
        assert_eq!(get("/dev/nvme0n1p1").dependencies, Some(vec!["/dev/nvme0n1".to_string()]));
        let dm = get("/dev/dm-0");
        assert_eq!(dm.alias.as_deref(), Some("vg-data"));
        assert_eq!(dm.address, None, "virtual devices have no address");
        assert_eq!(dm.dependencies, Some(vec!["/dev/vdb1".to_string()]));
        // qemu-ga prepends: a disk's partitions come before the disk.
        let pos = |n: &str| all.iter().position(|d| d.name == n).unwrap();
        assert!(pos("/dev/vdb1") < pos("/dev/vdb"));
        assert_eq!(all.len(), 8, "{all:?}");
    }

    #[test]
    fn scan_behaves_like_sscanf_for_qemu_gas_patterns() {
        assert_eq!(scan("0000:00/0000:00:1f.2/ata1", "%*x:%*x/%x:%x:%x.%x%n"), (vec![0, 0, 0x1f, 2], Some(20)));
        assert_eq!(scan("/virtio2/block", "/%x:%x:%x.%x%n"), (vec![], None));
        assert_eq!(scan("2:0:1/2:0:1:3/block", "%*u:%*u:%*u/%*u:%u:%u:%u").0, vec![0, 1, 3]);
        assert_eq!(scan("0/0.0.0000/0.0.0001/virtio0", "%*x/%x.%x.%x/%*x.%*x.%x/").0, vec![0, 0, 0, 1]);
    }

    #[test]
    fn plain_disks_and_unknown_devices_have_no_backing_file() {
        let t = fake_sys();
        let topo = Topology::new(t.path());
        assert!(topo.backing_files("252:0".parse().unwrap()).is_empty());
        assert!(topo.backing_files("0:45".parse().unwrap()).is_empty());
    }
}
