//! The freeze marker: a small file in the state directory (tmpfs `/run`) that lists what vssd
//! is about to freeze. Written before the first FIFREEZE and removed after the thaw, so a vssd
//! killed in between lets the next start thaw what it left behind.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::engine::FrozenFs;

#[derive(Debug, Serialize, Deserialize)]
pub struct MarkerData {
    pub pid: u32,
    pub filesystems: Vec<FrozenFs>,
    /// Hooks whose freeze phase ran: their thaw phase runs at recovery.
    #[serde(default)]
    pub hooks: Vec<PathBuf>,
    /// vssd had turned expedited RCU grace periods on for the FIFREEZE calls: recovery turns
    /// them off again.
    #[serde(default)]
    pub rcu_expedited: bool,
}

#[derive(Debug)]
pub struct Marker {
    path: PathBuf,
}

impl Marker {
    pub fn new(path: PathBuf) -> Self {
        Marker { path }
    }

    /// Writes atomically (temporary file, then rename) so a crash never leaves half a marker.
    pub fn write(&self, fs: &[FrozenFs], hooks: &[PathBuf], rcu_expedited: bool) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let data =
            MarkerData { pid: std::process::id(), filesystems: fs.to_vec(), hooks: hooks.to_vec(), rcu_expedited };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&data).map_err(std::io::Error::other)?)?;
        drop(f);
        std::fs::rename(&tmp, &self.path)
    }

    /// The marker a previous run left, if any. An unreadable marker is reported and ignored.
    pub fn read(&self) -> Option<MarkerData> {
        let bytes = std::fs::read(&self.path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(d) => Some(d),
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "ignoring an unreadable freeze marker");
                None
            }
        }
    }

    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(path = %self.path.display(), error = %e, "cannot remove the freeze marker");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_marker_reads_back_and_removal_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let m = Marker::new(d.path().join("sub/frozen.json"));
        assert!(m.read().is_none());
        let fs =
            vec![FrozenFs { mount_point: "/a".into(), fstype: "ext4".into(), dev: "7:1".parse().unwrap(), level: 0 }];
        m.write(&fs, &[], false).unwrap();
        let back = m.read().unwrap();
        assert_eq!(back.filesystems, fs);
        assert_eq!(back.pid, std::process::id());
        m.remove();
        m.remove();
        assert!(m.read().is_none());
    }

    #[test]
    fn a_corrupt_marker_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("frozen.json"), b"{not json").unwrap();
        assert!(Marker::new(d.path().join("frozen.json")).read().is_none());
    }
}
