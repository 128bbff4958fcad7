//! The kernel's `/dev/vmbus/hv_vss`: a std `File` and poll(2), nothing unsafe.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{HvDevice, OpenError};

/// The opened device.
pub struct CharDevice {
    file: File,
}

impl CharDevice {
    /// Opens `path` read-write (blocking reads: a dedicated thread waits on it).
    pub fn open(path: &Path) -> Result<CharDevice, OpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            // Never this process's controlling terminal, whatever the path is (a test's pty).
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .map(|file| CharDevice { file })
            .map_err(|e| OpenError::from_io(path, e))
    }
}

impl HvDevice for CharDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            // POLLERR / POLLHUP (the driver going away) count as readable: the read says why.
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// The processes that hold `device` open, as (pid, command name), from `proc` (/proc).
pub fn holders(proc: &Path, device: &Path) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(proc) else { return out };
    let me = std::process::id();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == device));
        if holds {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_string();
            out.push((pid, if comm.is_empty() { "?".into() } else { comm }));
        }
    }
    out.sort();
    out
}
