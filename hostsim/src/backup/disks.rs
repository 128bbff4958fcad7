//! The disks of a running VM as QEMU reports them, and their names: a disk's name is its
//! device's, never the node on top, which a checkpoint replaces.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::manifest::{Manifest, ManifestDisk};
use super::BackupError;
use crate::qmp::Qmp;

/// One disk as QEMU reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceDisk {
    /// Name used in file names and the chain: stable for the life of the VM (see [`disk_name`]).
    pub name: String,
    /// QEMU's node name of the top (format) node: what the block job reads. It changes when an
    /// overlay goes on top (a checkpoint), so it never names the disk.
    pub node: String,
    /// The qdev path or device name, for people.
    pub device: String,
    /// Image file.
    pub file: String,
    /// Image format.
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Allocated bytes of the image file.
    pub actual_size: u64,
    /// Persistent dirty bitmaps of the top node: (name, dirty bytes, consistent).
    #[serde(skip)]
    pub bitmaps: Vec<(String, u64, bool)>,
    /// Persistent bitmaps stored in the images below the top one (read only there; they do not
    /// see writes to the overlays above them).
    #[serde(skip)]
    pub backing_bitmaps: Vec<String>,
    /// The name vmctl 0.1 gave this disk (its node name unless QEMU generated one, else the
    /// device name), to continue chains whose manifests use it.
    #[serde(skip)]
    pub legacy_name: String,
}

/// The id a disk's guest device was given (`-device ...,id=ID`), from query-block's `qdev`:
/// the id itself, or a QOM path `/machine/peripheral/ID/virtio-backend`. None when the device
/// has no id (`/machine/peripheral-anon/...`).
fn qdev_id(qdev: &str) -> Option<&str> {
    let id = match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().unwrap_or(""),
        None if qdev.starts_with('/') => "",
        None => qdev,
    };
    (!id.is_empty()).then_some(id)
}

/// A disk's name, from one entry of `query-block`: something that stays while the VM runs,
/// whatever happens to its node graph (a checkpoint's `blockdev-snapshot-sync` puts a new
/// node, with a new name, on top). In order: the guest device's id (`vd-NAME` of vmctl's VMs
/// gives NAME, as checkpoints name disks), the `-drive` id, and the node name as vmctl 0.1
/// used it.
pub fn disk_name(block: &Value) -> String {
    let id = block["qdev"]
        .as_str()
        .and_then(qdev_id)
        .map(|id| id.strip_prefix("vd-").filter(|n| !n.is_empty()).unwrap_or(id));
    let device = block["device"].as_str().filter(|s| !s.is_empty());
    let name = match id.or(device) {
        Some(n) => n.to_string(),
        None => legacy_disk_name(block),
    };
    sanitize(&name)
}

/// vmctl 0.1's name: the node name unless QEMU generated it (`#block123`), else the device.
fn legacy_disk_name(block: &Value) -> String {
    let node = block["inserted"]["node-name"].as_str().unwrap_or("");
    let name = if !node.is_empty() && !node.starts_with('#') {
        node
    } else {
        block["device"].as_str().filter(|s| !s.is_empty()).unwrap_or(node)
    };
    sanitize(name)
}

pub(crate) fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// The disks of a running QEMU (writable, with media).
pub fn query_disks(qmp: &mut Qmp) -> Result<Vec<SourceDisk>, BackupError> {
    let blocks = qmp.execute("query-block", None)?;
    let mut out: Vec<SourceDisk> = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let Some(ins) = b.get("inserted") else { continue };
        if ins["ro"].as_bool() == Some(true) {
            continue;
        }
        let node = ins["node-name"].as_str().unwrap_or("").to_string();
        let device = b["device"].as_str().filter(|s| !s.is_empty()).or(b["qdev"].as_str()).unwrap_or("").to_string();
        let mut name = disk_name(b);
        // Names are file names in the backup: two disks must not share one.
        let base = name.clone();
        let mut n = 2;
        while out.iter().any(|d| d.name == name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        let image = &ins["image"];
        let mut bitmaps = Vec::new();
        for bm in ins["dirty-bitmaps"].as_array().or(b["dirty-bitmaps"].as_array()).into_iter().flatten() {
            bitmaps.push((
                bm["name"].as_str().unwrap_or("").to_string(),
                bm["count"].as_u64().unwrap_or(0),
                !bm["inconsistent"].as_bool().unwrap_or(false),
            ));
        }
        let mut backing_bitmaps = Vec::new();
        let mut img = &image["backing-image"];
        while img.is_object() {
            for bm in img["format-specific"]["data"]["bitmaps"].as_array().into_iter().flatten() {
                if let Some(n) = bm["name"].as_str() {
                    backing_bitmaps.push(n.to_string());
                }
            }
            img = &img["backing-image"];
        }
        out.push(SourceDisk {
            name,
            node: if node.is_empty() { b["device"].as_str().unwrap_or("").to_string() } else { node },
            device,
            file: ins["file"].as_str().unwrap_or("").to_string(),
            format: image["format"].as_str().unwrap_or("raw").to_string(),
            virtual_size: image["virtual-size"].as_u64().unwrap_or(0),
            actual_size: image["actual-size"].as_u64().unwrap_or(0),
            bitmaps,
            backing_bitmaps,
            legacy_name: legacy_disk_name(b),
        });
    }
    if out.is_empty() {
        return Err(BackupError::NoDisks);
    }
    Ok(out)
}

/// The parent backup's entry for `d`: the same name, or (a chain begun by vmctl 0.1, which
/// named disks by node) the name vmctl 0.1 gave it, unless another disk now goes by that name.
pub(crate) fn parent_disk<'a>(pm: &'a Manifest, d: &SourceDisk, disks: &[SourceDisk]) -> Option<&'a ManifestDisk> {
    pm.disks.iter().find(|x| x.name == d.name).or_else(|| {
        if disks.iter().any(|o| o.name == d.legacy_name) {
            return None;
        }
        pm.disks.iter().find(|x| x.name == d.legacy_name)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn block(qdev: &str, device: &str, node: &str) -> Value {
        json!({"qdev": qdev, "device": device, "inserted": {"node-name": node}})
    }

    #[test]
    fn disks_are_named_by_their_device_not_by_the_node_on_top() {
        // vmctl's own VMs, before and after a checkpoint's overlay went on top.
        let b = block("/machine/peripheral/vd-data/virtio-backend", "", "data");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("data".into(), "data".into()));
        let b = block("/machine/peripheral/vd-data/virtio-backend", "", "data-ck1d4073f");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("data".into(), "data-ck1d4073f".into()));
        // -drive if=virtio: no device id, QEMU's node name; the drive's name as before.
        let b = block("/machine/peripheral-anon/device[0]/virtio-backend", "virtio0", "#block162");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("virtio0".into(), "virtio0".into()));
        // -drive if=none,id=drive3 -device ...,id=disk3; a device whose qdev is its id.
        let b = block("/machine/peripheral/disk3/virtio-backend", "drive3", "#block328");
        assert_eq!((disk_name(&b), legacy_disk_name(&b)), ("disk3".into(), "drive3".into()));
        assert_eq!(disk_name(&block("scsi0", "", "n")), "scsi0");
        // -blockdev without a device id: the node name, as before.
        assert_eq!(disk_name(&block("/machine/peripheral-anon/device[1]/virtio-backend", "", "os")), "os");
        assert_eq!(disk_name(&block("", "", "a/b")), "a_b");
    }

    pub(crate) fn source(name: &str, legacy: &str) -> SourceDisk {
        SourceDisk {
            name: name.into(),
            node: legacy.into(),
            device: String::new(),
            file: String::new(),
            format: "qcow2".into(),
            virtual_size: 0,
            actual_size: 0,
            bitmaps: vec![],
            backing_bitmaps: vec![],
            legacy_name: legacy.into(),
        }
    }

    pub(crate) fn manifest_with(disks: &[&str]) -> Manifest {
        let mut v = json!({"format": "vmctl-backup", "version": 1, "id": "p", "vm": "v", "created": "", "kind": "full",
            "parent": null, "chain": ["p"], "consistency": "crash", "quiesce": {}, "timings": {}, "disks": [],
            "qemu_version": "7.2.0", "vm_config": null, "vmctl_version": "0.1.0"});
        for d in disks {
            let s = serde_json::to_value(source(d, d)).unwrap();
            v["disks"].as_array_mut().unwrap().push(json!({"name": d, "file": format!("{d}.qcow2"), "backing": null,
                "source": s, "copied_bytes": 0, "file_size": 0, "blake3": "", "bitmap": format!("vmctl-{d}")}));
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn chains_begun_under_the_old_names_go_on() {
        let pm = manifest_with(&["drive3", "data"]);
        let disks = [source("disk3", "drive3"), source("data", "data-ck1")];
        assert_eq!(parent_disk(&pm, &disks[0], &disks).unwrap().name, "drive3");
        assert_eq!(parent_disk(&pm, &disks[1], &disks).unwrap().name, "data");
        // An old name that another disk now goes by is not taken.
        let disks = [source("x", "data"), source("data", "data")];
        assert!(parent_disk(&pm, &disks[0], &disks).is_none());
    }
}
