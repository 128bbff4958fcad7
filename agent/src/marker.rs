//! The freeze marker: a small file in the state directory (tmpfs `/run`) that lists what vssd
//! is about to freeze. Written before the first FIFREEZE and removed after the thaw, so a vssd
//! killed in between lets the next start thaw what it left behind.
//!
//! Invariant: an entry leaves the marker only once its FITHAW succeeded (or the filesystem is
//! gone). A filesystem whose thaw failed stays listed (`settle`), is carried into the next
//! freeze's marker (`write`) and retried by the next thaw (`stuck`), so a vssd that dies later
//! still leaves it for the next start to thaw.
//!
//! The state directory is created 0750 whatever the umask (the owner, and the app socket's
//! group when it exists, as packaging's tmpfiles.d does); the marker inside is 0600.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    /// Filesystems whose FITHAW failed: they may still be frozen.
    stuck: Mutex<Vec<FrozenFs>>,
}

/// Creates the state directory `dir` (and missing parents) with mode 0750 whatever the
/// umask, in group `gid` if given; an existing one is left as it is (the admin's tmpfiles.d
/// or unit set it).
pub fn create_state_dir(dir: &Path, gid: Option<u32>) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)?;
    if let Some(g) = gid {
        nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(g))).map_err(std::io::Error::from)?;
    }
    Ok(())
}

impl Marker {
    pub fn new(path: PathBuf) -> Self {
        Marker { path, stuck: Mutex::new(vec![]) }
    }

    /// Writes atomically (temporary file, then rename) so a crash never leaves half a marker.
    /// Filesystems still stuck from an earlier failed thaw are listed too.
    pub fn write(&self, fs: &[FrozenFs], hooks: &[PathBuf], rcu_expedited: bool) -> std::io::Result<()> {
        let mut all = fs.to_vec();
        for s in self.stuck() {
            if !all.iter().any(|f| f.mount_point == s.mount_point) {
                all.push(s);
            }
        }
        self.write_all(all, hooks, rcu_expedited)
    }

    fn write_all(&self, filesystems: Vec<FrozenFs>, hooks: &[PathBuf], rcu_expedited: bool) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            create_state_dir(dir, None)?;
        }
        let data = MarkerData { pid: std::process::id(), filesystems, hooks: hooks.to_vec(), rcu_expedited };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec(&data).map_err(std::io::Error::other)?)?;
        drop(f);
        std::fs::rename(&tmp, &self.path)
    }

    /// Filesystems whose thaw failed earlier: every thaw retries them.
    pub fn stuck(&self) -> Vec<FrozenFs> {
        self.stuck.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ends a thaw: `still_frozen` (what this thaw could not thaw) stays in the marker and
    /// becomes the stuck list; with nothing left the marker goes. The thaw hooks and the RCU
    /// knob were dealt with by the thaw, so they are not carried over.
    pub fn settle(&self, still_frozen: Vec<FrozenFs>) {
        *self.stuck.lock().unwrap_or_else(|e| e.into_inner()) = still_frozen.clone();
        if still_frozen.is_empty() {
            return self.remove();
        }
        warn!(
            count = still_frozen.len(),
            path = %self.path.display(),
            "the freeze marker stays: some filesystems could not be thawed and may still be frozen"
        );
        if let Err(e) = self.write_all(still_frozen, &[], false) {
            warn!(path = %self.path.display(), error = %e, "cannot rewrite the freeze marker");
        }
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

    fn remove(&self) {
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

    fn fs(m: &str) -> FrozenFs {
        FrozenFs { mount_point: m.into(), fstype: "ext4".into(), dev: "7:1".parse().unwrap(), level: 0 }
    }

    #[test]
    fn a_failed_thaw_keeps_its_filesystems_listed_into_the_next_freeze_until_one_thaws_them() {
        let d = tempfile::tempdir().unwrap();
        let m = Marker::new(d.path().join("frozen.json"));
        m.write(&[fs("/a"), fs("/b")], &["/h".into()], true).unwrap();
        m.settle(vec![fs("/b")]);
        let left = m.read().expect("a filesystem that did not thaw keeps the marker");
        assert_eq!(left.filesystems, [fs("/b")]);
        assert!(left.hooks.is_empty() && !left.rcu_expedited);
        m.write(&[fs("/a")], &[], false).unwrap();
        assert_eq!(m.read().unwrap().filesystems, [fs("/a"), fs("/b")], "the next freeze's marker lists it too");
        m.settle(vec![]);
        assert!(m.read().is_none());
        assert!(m.stuck().is_empty());
    }

    #[test]
    fn the_state_directory_and_the_marker_are_owner_only_whatever_the_umask() {
        use nix::sys::stat::{umask, Mode};
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let old = umask(Mode::empty());
        let m = Marker::new(d.path().join("run/frozen.json"));
        let r = m.write(&[fs("/a")], &[], false);
        umask(old);
        r.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.path().join("run")), 0o750);
        assert_eq!(mode(&d.path().join("run/frozen.json")), 0o600);
    }

    #[test]
    fn a_corrupt_marker_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("frozen.json"), b"{not json").unwrap();
        assert!(Marker::new(d.path().join("frozen.json")).read().is_none());
    }
}
