//! AF_VSOCK stream sockets: the host reaches a guest port without a network.
//!
//! The standard library has no vsock; these return non-blocking, close-on-exec descriptors
//! that an event loop can wait on.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

/// `VMADDR_CID_ANY`: listen on every CID of this machine.
pub const CID_ANY: u32 = libc::VMADDR_CID_ANY;
/// `VMADDR_CID_LOCAL`: the loopback CID (needs the `vsock_loopback` module).
pub const CID_LOCAL: u32 = 1;
/// `VMADDR_CID_HOST`: the hypervisor's host.
pub const CID_HOST: u32 = 2;

fn stream_socket() -> io::Result<OwnedFd> {
    socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| {
            if e == nix::errno::Errno::EAFNOSUPPORT {
                io::Error::new(io::ErrorKind::Unsupported, "AF_VSOCK is not available: load the vsock module (and a transport such as vmw_vsock_virtio_transport)")
            } else {
                io::Error::from(e)
            }
        })
}

/// Listens on `port` for connections from any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    let fd = stream_socket()?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port)).map_err(io::Error::from)?;
    socket::listen(&fd, socket::Backlog::new(16).expect("16 is a valid backlog")).map_err(io::Error::from)?;
    Ok(fd)
}

/// Accepts one pending connection (non-blocking: `WouldBlock` when none is pending).
/// Returns the connection and the peer's CID.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, u32)> {
    let raw = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
        .map_err(io::Error::from)?;
    // SAFETY: `raw` is a descriptor accept4 just opened for us (it returned no error); no
    // other value owns it, so the `OwnedFd` becomes its only owner and closes it exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let cid = socket::getpeername::<VsockAddr>(raw).map(|a| a.cid()).unwrap_or(u32::MAX);
    Ok((fd, cid))
}

/// Connects (blocking) to `cid:port`; for tests and host-side tools.
pub fn connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)?;
    socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)).map_err(io::Error::from)?;
    Ok(fd)
}
