//! The Hyper-V VSS channel: vssd in place of hv_vss_daemon on `/dev/vmbus/hv_vss`.
//!
//! Linux's `hv_utils` driver turns the host's VSS requests into 12-byte `hv_vss_msg`s on a
//! misc device (wire format in [`kmod_shim::hv`]; the protocol and what vssd answers, with
//! the reasons, in docs/hyperv.md). One request at a time: the kernel sends the next only
//! after the answer, and answers the host itself with HV_E_FAIL when the daemon is late
//! (15 minutes for FREEZE, 30 s for the rest).
//!
//! A dedicated thread serves the device with blocking reads (the device behind
//! [`HvDevice`], so the loop runs against an emulation in tests) and calls the shared
//! [`Agent`](crate::service::Agent) on the runtime: FREEZE is the very freeze a QGA
//! `guest-fsfreeze-freeze` runs (apps, hooks, filesystems, deadline, crash marker), bound to
//! this channel; one freeze at a time across all channels, so a second one is refused.
//!
//! Invariants:
//! - The device fails (read or write error, end of file): whatever this channel froze is
//!   thawed before the device is opened and registered again, with backoff.
//! - A THAW thaws only a freeze this channel made; it never thaws a QGA client's.
//! - Nothing here writes a file; logs go to stderr, and what the guest can trigger is
//!   rate-limited.

mod device;
mod serve;

#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use device::{holders, CharDevice};
pub use serve::{spawn, Served, Settings, Status};

/// The kernel's device as the loop needs it. Each call maps to one system call on the real
/// device: a read or write moves one whole message.
pub trait HvDevice: Send {
    /// One message from the kernel into `buf`; its length.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// One message to the kernel; the length the kernel took.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Whether a message (or an error) is waiting, within `timeout`.
    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool>;
}

/// Opens the device, again after a failure.
pub trait HvOpener: Send {
    fn open(&mut self) -> Result<Box<dyn HvDevice>, OpenError>;
    /// What to call it in logs (the path).
    fn name(&self) -> String;
}

/// The device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The kernel allows one opener at a time.
    #[error(
        "{path} is already open in {holder} (the kernel allows one opener): stop it first \
         (hv_vss_daemon: systemctl stop hv-vss-daemon) or run one vssd"
    )]
    Busy { path: PathBuf, holder: String },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl OpenError {
    /// From a failed open(2) of `path`; EBUSY names the process holding it, when /proc tells.
    pub fn from_io(path: &Path, source: io::Error) -> OpenError {
        if source.raw_os_error() == Some(libc::EBUSY) {
            let h = holders(Path::new("/proc"), path);
            let holder = if h.is_empty() {
                "another process".to_string()
            } else {
                h.iter().map(|(pid, comm)| format!("{comm} (pid {pid})")).collect::<Vec<_>>().join(", ")
            };
            return OpenError::Busy { path: path.to_owned(), holder };
        }
        OpenError::Open { path: path.to_owned(), source }
    }
}

/// The real device at a path.
pub struct PathOpener(pub PathBuf);

impl HvOpener for PathOpener {
    fn open(&mut self) -> Result<Box<dyn HvDevice>, OpenError> {
        CharDevice::open(&self.0).map(|d| Box::new(d) as Box<dyn HvDevice>)
    }
    fn name(&self) -> String {
        self.0.display().to_string()
    }
}

/// The Hyper-V channels this vssd serves (one process serves the device once).
static SERVED: std::sync::Mutex<Vec<Served>> = std::sync::Mutex::new(Vec::new());

/// Keeps a running channel for vssd's lifetime, its status readable by [`status_json`].
pub fn publish(s: Served) {
    SERVED.lock().unwrap_or_else(|p| p.into_inner()).push(s);
}

/// The Hyper-V channels' status, for `vssd-status` (and so vssctl and D-Bus); None when
/// vssd serves none.
pub fn status_json() -> Option<serde_json::Value> {
    let served = SERVED.lock().unwrap_or_else(|p| p.into_inner());
    if served.is_empty() {
        return None;
    }
    Some(served.iter().map(|s| serde_json::to_value(s.status()).unwrap_or_default()).collect())
}

/// Quiesces every published channel before vssd's shutdown thaws ([`Served::quiesce`]).
pub async fn quiesce_all(limit: Duration) {
    // Out of the list while waiting (no lock held across an await), then back for status.
    let list = std::mem::take(&mut *SERVED.lock().unwrap_or_else(|p| p.into_inner()));
    for s in &list {
        s.quiesce(limit).await;
    }
    SERVED.lock().unwrap_or_else(|p| p.into_inner()).extend(list);
}

/// Stops every published channel (a test that served a device path through the server).
#[cfg(test)]
pub(crate) fn stop_all() {
    let served: Vec<Served> = std::mem::take(&mut *SERVED.lock().unwrap_or_else(|p| p.into_inner()));
    for s in served {
        s.stop();
    }
}
