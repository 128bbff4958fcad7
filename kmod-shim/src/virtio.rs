//! virtio-serial ports: the guest side of QEMU's `virtserialport` channels.
//!
//! The host names a port (`org.qemu.guest_agent.0`); the guest sees a character device
//! `/dev/vportNpM` whose name is in `/sys/class/virtio-ports/vportNpM/name`. udev normally adds
//! `/dev/virtio-ports/NAME`, but an initramfs or a minimal guest may lack udev, so we look the
//! name up in sysfs ourselves.

use std::path::{Path, PathBuf};

/// Why a port could not be found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No port with this name.
    #[error(
        "no virtio-serial port named `{name}` (looked in {sys}/class/virtio-ports); add \
         `-device virtserialport,name={name}` to the VM, or load the virtio_console module"
    )]
    NotFound {
        /// The name asked for.
        name: String,
        /// The sysfs root used.
        sys: String,
    },
}

/// Finds the device node of the virtio-serial port called `name`.
///
/// `sys` is normally `/sys` and `dev` normally `/dev`.
pub fn find_port(sys: &Path, dev: &Path, name: &str) -> Result<PathBuf, Error> {
    let by_name = dev.join("virtio-ports").join(name);
    if by_name.exists() {
        return Ok(by_name);
    }
    if let Ok(rd) = std::fs::read_dir(sys.join("class/virtio-ports")) {
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(n) = std::fs::read_to_string(e.path().join("name")) else { continue };
            if n.trim_end_matches('\n') == name {
                return Ok(dev.join(e.file_name()));
            }
        }
    }
    Err(Error::NotFound { name: name.to_owned(), sys: sys.display().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_its_sysfs_name() {
        let t = tempfile::tempdir().unwrap();
        for (port, name) in [("vport0p1", "org.example.other\n"), ("vport0p2", "org.qemu.guest_agent.0\n")] {
            let d = t.path().join("sys/class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        let p = find_port(&t.path().join("sys"), &t.path().join("dev"), "org.qemu.guest_agent.0").unwrap();
        assert_eq!(p, t.path().join("dev/vport0p2"));
    }

    #[test]
    fn prefers_the_udev_symlink_and_names_the_fix_when_missing() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("dev/virtio-ports")).unwrap();
        std::fs::write(t.path().join("dev/virtio-ports/a.b"), "").unwrap();
        assert_eq!(find_port(t.path(), &t.path().join("dev"), "a.b").unwrap(), t.path().join("dev/virtio-ports/a.b"));
        let err = find_port(t.path(), &t.path().join("dev"), "x.y").unwrap_err().to_string();
        assert!(err.contains("virtserialport,name=x.y"), "{err}");
    }
}
