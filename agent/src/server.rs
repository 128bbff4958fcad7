//! Transports: unix sockets, virtio-serial ports and vsock, all served at once.
//!
//! Each connection gets a channel id and a protocol [`Session`]. When a connection ends, the
//! agent is told, so a freeze bound to it can thaw after the grace. A virtio-serial port is a
//! single long-lived channel whose host side comes and goes: while the host is away the port
//! reads end-of-file; we poll it gently until the host is back, keeping the same channel id.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::config::ChannelSpec;
use crate::qga::Session;
use crate::service::Agent;

/// A channel that could not be opened. A message never repeats its source: print the chain.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on unix socket {path}")]
    Unix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    VirtioPort(#[from] kmod_shim::virtio::Error),
    #[error("cannot open virtio-serial port {path}")]
    VirtioOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("Hyper-V VSS channel")]
    HyperV(#[from] crate::hyperv::OpenError),
    #[error("cannot start the Hyper-V VSS channel's thread")]
    HyperVThread(#[source] io::Error),
}

/// Opens every channel and starts serving it. Returns once all are open, so the caller can
/// report readiness; an error means none is served.
pub async fn start(agent: Arc<Agent>, channels: &[ChannelSpec], control: Option<PathBuf>) -> Result<(), ServeError> {
    let mut unix = Vec::new();
    let mut ports = Vec::new();
    let mut vsocks = Vec::new();
    let mut hyperv = Vec::new();
    for c in channels {
        match c {
            ChannelSpec::Unix(p) => unix.push((p.clone(), bind_unix(p, 0o600)?)),
            ChannelSpec::VirtioSerial(name) => {
                let cfg = agent.config();
                let path = kmod_shim::virtio::find_port(&cfg.sysfs, &cfg.devfs, name)?;
                let fd = open_port(&path).map_err(|source| ServeError::VirtioOpen { path: path.clone(), source })?;
                ports.push((path, fd));
            }
            ChannelSpec::Vsock(port) => {
                let fd = kmod_shim::vsock::listen(*port).map_err(|source| ServeError::Vsock { port: *port, source })?;
                let fd = async_fd(fd).map_err(|source| ServeError::Vsock { port: *port, source })?;
                vsocks.push((*port, fd));
            }
            ChannelSpec::HyperV(path) => {
                // Opened here, so that a device held by hv_vss_daemon or another vssd stops
                // this one at start with the holder named.
                let dev = crate::hyperv::CharDevice::open(path)?;
                hyperv.push((path.clone(), dev));
            }
        }
    }
    if let Some(p) = control {
        unix.push((p.clone(), bind_unix(&p, 0o600)?));
    }
    for (path, l) in unix {
        info!(channel = %format!("unix:{}", path.display()), "listening");
        tokio::spawn(serve_unix(agent.clone(), l));
    }
    for (path, fd) in ports {
        info!(channel = %format!("virtio-serial:{}", path.display()), "serving");
        tokio::spawn(serve_port(agent.clone(), path, fd));
    }
    for (port, fd) in vsocks {
        info!(channel = %format!("vsock:{port}"), "listening");
        tokio::spawn(serve_vsock(agent.clone(), fd));
    }
    for (path, dev) in hyperv {
        info!(channel = %format!("hyperv:{}", path.display()), "serving");
        let served = crate::hyperv::spawn(
            agent.clone(),
            tokio::runtime::Handle::current(),
            Box::new(crate::hyperv::PathOpener(path)),
            Some(Box::new(dev)),
            crate::hyperv::Settings::default(),
        )
        .map_err(ServeError::HyperVThread)?;
        // It serves for vssd's lifetime; its status stays readable for vssd-status.
        crate::hyperv::publish(served);
    }
    Ok(())
}

fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Unix { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run: replace it unless something still answers on it.
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving it (is vssd already running?)",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(l)
}

async fn serve_unix(agent: Arc<Agent>, l: UnixListener) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let id = agent.new_channel_id();
                debug!(channel = id, "unix connection");
                tokio::spawn(run_session(agent.clone(), id, s));
            }
            Err(e) => {
                crate::warn_limited!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_vsock(agent: Arc<Agent>, l: AsyncFd<OwnedFd>) {
    loop {
        let r = match l.readable().await {
            Ok(mut guard) => match guard.try_io(|fd| kmod_shim::vsock::accept(fd.get_ref().as_fd())) {
                Ok(r) => r,
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        match r.and_then(|(fd, cid)| Ok((FdStream::new(fd)?, cid))) {
            Ok((s, cid)) => {
                let id = agent.new_channel_id();
                debug!(channel = id, cid, "vsock connection");
                tokio::spawn(run_session(agent.clone(), id, s));
            }
            Err(e) => {
                crate::warn_limited!(error = %e, "vsock accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection until it ends, then tells the agent.
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(agent: Arc<Agent>, id: u64, mut s: S) {
    let mut session = Session::new(agent.clone(), id);
    let mut buf = vec![0u8; 16 * 1024];
    'conn: loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for reply in session.feed(&buf[..n]).await {
            if s.write_all(&reply).await.is_err() {
                break 'conn;
            }
        }
    }
    debug!(channel = id, "connection closed");
    agent.channel_closed(id);
}

fn open_port(path: &Path) -> io::Result<OwnedFd> {
    use nix::fcntl::{open, OFlag};
    open(path, OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY, nix::sys::stat::Mode::empty())
        .map_err(io::Error::from)
}

/// A virtio-serial port: one channel for vssd's lifetime; hosts come and go.
///
/// While no host is connected the port reads EOF and polls as hung up (POLLHUP cannot be
/// masked), and tokio's readiness keeps a hang-up forever (it is final for sockets), so the
/// port is not registered with the runtime. A thread of its own waits on an edge-triggered
/// epoll, which reports each wake-up of the port once: data, the host connecting or leaving,
/// room to write. The port is read and written here without blocking, and every "nothing
/// now" (EOF while the host is away, EAGAIN) waits for the next wake-up. So a host that
/// connects is answered at once, and an idle port costs nothing.
async fn serve_port(agent: Arc<Agent>, path: PathBuf, fd: OwnedFd) {
    let id = agent.new_channel_id();
    let fd = Arc::new(fd);
    let wake = Arc::new(tokio::sync::Notify::new());
    if let Err(e) = spawn_port_watcher(fd.clone(), wake.clone()) {
        warn!(port = %path.display(), error = %e, "cannot watch the virtio-serial port");
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut host_present = true;
    let mut session = Session::new(agent.clone(), id);
    loop {
        match nix::unistd::read(fd.as_fd(), &mut buf) {
            Ok(n) if n > 0 => {
                if !host_present {
                    host_present = true;
                    agent.channel_reopened(id);
                    debug!(port = %path.display(), "host connected");
                }
                for reply in session.feed(&buf[..n]).await {
                    if let Err(e) = write_port(&fd, &wake, &reply).await {
                        debug!(error = %e, "write to the port failed; the host went away");
                        break;
                    }
                }
            }
            Ok(_) => {
                // EOF: the host side is closed until it comes back. Start afresh then: a half
                // request from the old host means nothing.
                if host_present {
                    host_present = false;
                    debug!(port = %path.display(), "host disconnected");
                    agent.channel_closed(id);
                    session = Session::new(agent.clone(), id);
                }
                wait_port(&wake).await;
            }
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => wait_port(&wake).await,
            Err(e) => {
                // Not the EOF of an absent host: do not spin on a port in a strange state.
                crate::warn_limited!(port = %path.display(), error = %e, "reading the virtio-serial port failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Waits for the port's next wake-up. The timeout is only a safety net for a wake-up that
/// never comes; a permit stored by a wake-up before this call returns at once.
async fn wait_port(wake: &tokio::sync::Notify) {
    let _ = tokio::time::timeout(Duration::from_secs(5), wake.notified()).await;
}

/// Writes all of `data`, waiting for room (a port's buffer toward the host is small).
async fn write_port(fd: &OwnedFd, wake: &tokio::sync::Notify, mut data: &[u8]) -> io::Result<()> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while !data.is_empty() {
        match nix::unistd::write(fd.as_fd(), data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                if tokio::time::Instant::now() > give_up {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the host reads nothing"));
                }
                wait_port(wake).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The port's watcher: an edge-triggered epoll on its own thread, one notification per
/// wake-up of the port.
fn spawn_port_watcher(fd: Arc<OwnedFd>, wake: Arc<tokio::sync::Notify>) -> io::Result<()> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    ep.add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, 0))?;
    std::thread::Builder::new().name("vport-watch".into()).stack_size(64 * 1024).spawn(move || {
        let _keep = fd;
        let mut events = [EpollEvent::empty(); 4];
        loop {
            match ep.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) if n > 0 => wake.notify_one(),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "watching the virtio-serial port failed; falling back to polling");
                    loop {
                        std::thread::sleep(Duration::from_millis(200));
                        wake.notify_one();
                    }
                }
            }
        }
    })?;
    Ok(())
}

/// Registers an owned descriptor with the runtime. `AsyncFd::new` is deprecated because a
/// borrowed descriptor could be closed while registered; an `OwnedFd` moved into the
/// `AsyncFd` cannot be, and `register` (its replacement) is `unsafe`, which this crate forbids.
#[allow(deprecated)]
fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd)
}

/// A non-blocking file descriptor (vsock connection, virtio-serial port) as a tokio stream.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(FdStream { fd: async_fd(fd)? })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_prints_its_source_once() {
        let e =
            ServeError::Unix { path: "/run/vssd.sock".into(), source: io::Error::from_raw_os_error(libc::EADDRINUSE) };
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(text.starts_with("cannot listen on unix socket /run/vssd.sock: "), "{text}");
        assert_eq!(text.matches("in use").count(), 1, "{text}");
    }
}
