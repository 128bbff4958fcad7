//! The emulated device as a real character device: a CUSE server (`/dev/cuse`, Linux's
//! `fs/fuse/cuse.c`) that makes the kernel create `/dev/vmbus/hv_vss` and forwards each
//! `open`, `read`, `write`, `poll` and `close` of it to an [`Emulator`].
//!
//! The FUSE kernel protocol (`include/uapi/linux/fuse.h`) is spoken over byte buffers: each
//! `read(2)` of `/dev/cuse` is one request (a 40-byte `fuse_in_header` and its argument), each
//! `write(2)` one reply (a 16-byte `fuse_out_header` with the request's `unique`) or one
//! notification (`unique` 0). No ioctl or raw descriptor is needed: a `File` does it.
//!
//! Reads block as the kernel's do (`hvt_op_read` ignores O_NONBLOCK): a READ that finds
//! nothing is parked and answered when the emulator queues a message, or with EINTR when the
//! kernel INTERRUPTs it (a signal to the reader). A POLL that finds nothing registers its
//! kernel handle and gets a FUSE_NOTIFY_POLL wakeup when a message is queued.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::{Device, Emulator};

/// The name the kernel's driver registers (devtmpfs makes `/dev/vmbus/hv_vss` of it).
pub const DEVNAME: &str = "vmbus/hv_vss";

/// `FUSE_KERNEL_VERSION`.
pub const FUSE_MAJOR: u32 = 7;
/// The protocol minor we speak (7.31: the 40-byte read/write arguments, poll notifications).
pub const FUSE_MINOR: u32 = 31;

/// Opcodes (`enum fuse_opcode`).
pub mod opcode {
    /// FUSE_OPEN.
    pub const OPEN: u32 = 14;
    /// FUSE_READ.
    pub const READ: u32 = 15;
    /// FUSE_WRITE.
    pub const WRITE: u32 = 16;
    /// FUSE_RELEASE.
    pub const RELEASE: u32 = 18;
    /// FUSE_FLUSH.
    pub const FLUSH: u32 = 25;
    /// FUSE_INTERRUPT.
    pub const INTERRUPT: u32 = 36;
    /// FUSE_IOCTL.
    pub const IOCTL: u32 = 39;
    /// FUSE_POLL.
    pub const POLL: u32 = 40;
    /// CUSE_INIT.
    pub const CUSE_INIT: u32 = 4096;
}

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER: usize = 16;
/// `sizeof(struct cuse_init_out)`.
pub const CUSE_INIT_OUT: usize = 72;
/// `sizeof(struct fuse_read_in)` and `sizeof(struct fuse_write_in)` (protocol 7.9 and later).
pub const RW_IN: usize = 40;
/// `FUSE_NOTIFY_POLL`.
pub const NOTIFY_POLL: i32 = 1;
/// `FUSE_POLL_SCHEDULE_NOTIFY`.
pub const POLL_SCHEDULE_NOTIFY: u32 = 1;
/// `FOPEN_NONSEEKABLE`.
pub const FOPEN_NONSEEKABLE: u32 = 1 << 2;

const POLLIN: u32 = 0x001;
const POLLRDNORM: u32 = 0x040;
const POLLERR: u32 = 0x008;
const POLLHUP: u32 = 0x010;

/// The largest read or write we accept (the messages are 12 bytes).
const MAX_IO: u32 = 4096;

/// A request read from `/dev/cuse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `opcode`.
    pub opcode: u32,
    /// `unique`: the reply carries it.
    pub unique: u64,
    /// `pid` of the caller.
    pub pid: u32,
    /// The argument after the header.
    pub arg: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Splits one request; None when it is shorter than its header says.
pub fn parse_request(b: &[u8]) -> Option<Request> {
    let len = u32_at(b, 0)? as usize;
    if len < IN_HEADER || b.len() < len {
        return None;
    }
    Some(Request { opcode: u32_at(b, 4)?, unique: u64_at(b, 8)?, pid: u32_at(b, 32)?, arg: b[IN_HEADER..len].to_vec() })
}

/// One reply: `error` is 0 or a negative errno; `body` follows the header.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let body = if error == 0 { body } else { &[] };
    let mut out = Vec::with_capacity(OUT_HEADER + body.len());
    out.extend_from_slice(&((OUT_HEADER + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&error.to_ne_bytes());
    out.extend_from_slice(&unique.to_ne_bytes());
    out.extend_from_slice(body);
    out
}

/// The CUSE_INIT reply: protocol version, limits, a dynamic device number and `DEVNAME=`.
pub fn init_reply(unique: u64, devname: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(CUSE_INIT_OUT + 32);
    for v in [FUSE_MAJOR, FUSE_MINOR, 0, 0, MAX_IO, MAX_IO, 0, 0] {
        body.extend_from_slice(&v.to_ne_bytes());
    }
    body.resize(CUSE_INIT_OUT, 0);
    body.extend_from_slice(format!("DEVNAME={devname}").as_bytes());
    body.push(0);
    reply(unique, 0, &body)
}

/// A FUSE_NOTIFY_POLL wakeup for the kernel's poll handle `kh`.
pub fn poll_wakeup(kh: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER + 8);
    out.extend_from_slice(&((OUT_HEADER + 8) as u32).to_ne_bytes());
    out.extend_from_slice(&NOTIFY_POLL.to_ne_bytes());
    out.extend_from_slice(&0u64.to_ne_bytes());
    out.extend_from_slice(&kh.to_ne_bytes());
    out
}

fn errno_of(e: &io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// A read waiting for a message.
#[derive(Debug, Clone, Copy)]
struct ParkedRead {
    unique: u64,
    size: usize,
}

#[derive(Default)]
struct Parked {
    /// The one opener (fh, its device).
    open: Option<(u64, Device)>,
    reads: Vec<ParkedRead>,
    polls: Vec<u64>,
}

/// Where replies go: `/dev/cuse` in the server, a buffer in tests.
pub trait Sink: Send + Sync {
    /// Writes one reply or notification.
    fn send(&self, msg: &[u8]);
}

impl Sink for File {
    fn send(&self, msg: &[u8]) {
        // ENOENT: the request was interrupted or aborted meanwhile; nothing to do.
        let _ = (&*self).write(msg);
    }
}

/// The request handling of the server, apart from `/dev/cuse` (tests feed it requests).
pub struct Handler {
    emu: Emulator,
    sink: Arc<dyn Sink>,
    parked: Arc<Mutex<Parked>>,
    next_fh: u64,
    wake: mpsc::Sender<()>,
    devname: String,
}

impl Handler {
    /// A handler for `emu`, answering into `sink`; starts the thread that completes parked
    /// reads and polls.
    pub fn new(emu: Emulator, sink: Arc<dyn Sink>, devname: &str) -> Handler {
        let parked = Arc::new(Mutex::new(Parked::default()));
        let (wake, rx) = mpsc::channel::<()>();
        let w = Mutex::new(wake.clone());
        emu.on_change(move || {
            let _ = w.lock().map(|w| w.send(()));
        });
        {
            let parked = parked.clone();
            let sink = sink.clone();
            std::thread::spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    pump(&parked, &*sink);
                }
            });
        }
        Handler { emu, sink, parked, next_fh: 1, wake, devname: devname.to_string() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one request (replies go to the sink, now or later).
    pub fn handle(&mut self, req: &Request) {
        let u = req.unique;
        match req.opcode {
            opcode::CUSE_INIT => {
                let major = u32_at(&req.arg, 0).unwrap_or(0);
                if major != FUSE_MAJOR {
                    self.sink.send(&reply(u, -libc::EPROTO, &[]));
                } else {
                    self.sink.send(&init_reply(u, &self.devname));
                }
            }
            opcode::OPEN => match self.emu.open() {
                Ok(dev) => {
                    let fh = self.next_fh;
                    self.next_fh += 1;
                    self.lock().open = Some((fh, dev));
                    let mut body = fh.to_ne_bytes().to_vec();
                    body.extend_from_slice(&FOPEN_NONSEEKABLE.to_ne_bytes());
                    body.extend_from_slice(&0u32.to_ne_bytes());
                    self.sink.send(&reply(u, 0, &body));
                }
                Err(e) => self.sink.send(&reply(u, errno_of(&e), &[])),
            },
            opcode::READ => {
                let size = u32_at(&req.arg, 16).unwrap_or(0) as usize;
                self.lock().reads.push(ParkedRead { unique: u, size });
                let _ = self.wake.send(());
            }
            opcode::WRITE => {
                let size = u32_at(&req.arg, 16).unwrap_or(0) as usize;
                let data = req.arg.get(RW_IN..RW_IN + size).unwrap_or(&[]);
                let p = self.lock();
                let r = match &p.open {
                    Some((_, dev)) => dev.write(data),
                    None => Err(io::Error::from_raw_os_error(libc::EBADF)),
                };
                drop(p);
                match r {
                    Ok(n) => {
                        let mut body = (n as u32).to_ne_bytes().to_vec();
                        body.extend_from_slice(&0u32.to_ne_bytes());
                        self.sink.send(&reply(u, 0, &body));
                    }
                    Err(e) => self.sink.send(&reply(u, errno_of(&e), &[])),
                }
            }
            opcode::POLL => {
                let kh = u64_at(&req.arg, 8).unwrap_or(0);
                let flags = u32_at(&req.arg, 16).unwrap_or(0);
                let mut p = self.lock();
                let revents = match p.open.as_ref().map(|(_, d)| d.wait_readable(Some(std::time::Duration::ZERO))) {
                    Some(Ok(crate::Readiness::Readable)) => POLLIN | POLLRDNORM,
                    Some(Ok(crate::Readiness::Timeout)) => 0,
                    _ => POLLERR | POLLHUP,
                };
                if revents == 0 && flags & POLL_SCHEDULE_NOTIFY != 0 && !p.polls.contains(&kh) {
                    p.polls.push(kh);
                }
                drop(p);
                let mut body = revents.to_ne_bytes().to_vec();
                body.extend_from_slice(&0u32.to_ne_bytes());
                self.sink.send(&reply(u, 0, &body));
                let _ = self.wake.send(());
            }
            opcode::INTERRUPT => {
                let target = u64_at(&req.arg, 0).unwrap_or(0);
                let mut p = self.lock();
                if let Some(i) = p.reads.iter().position(|r| r.unique == target) {
                    p.reads.remove(i);
                    self.sink.send(&reply(target, -libc::EINTR, &[]));
                }
                // INTERRUPT itself gets no reply.
            }
            opcode::RELEASE => {
                let fh = u64_at(&req.arg, 0).unwrap_or(0);
                let mut p = self.lock();
                let dev = if p.open.as_ref().is_some_and(|(f, _)| *f == fh) { p.open.take() } else { None };
                for r in std::mem::take(&mut p.reads) {
                    self.sink.send(&reply(r.unique, -libc::EBADF, &[]));
                }
                p.polls.clear();
                drop(p);
                drop(dev); // the last close: hvt_op_release
                self.sink.send(&reply(u, 0, &[]));
            }
            opcode::FLUSH => self.sink.send(&reply(u, 0, &[])),
            opcode::IOCTL => self.sink.send(&reply(u, -libc::ENOTTY, &[])),
            _ => self.sink.send(&reply(u, -libc::ENOSYS, &[])),
        }
    }
}

/// Completes parked reads while messages are queued, then wakes parked polls if the device
/// is readable or broken.
fn pump(parked: &Mutex<Parked>, sink: &dyn Sink) {
    let mut guard = parked.lock().unwrap_or_else(|e| e.into_inner());
    let Parked { open, reads, polls } = &mut *guard;
    let Some((_, dev)) = open.as_ref() else { return };
    let mut done = 0;
    for r in reads.iter() {
        let mut buf = vec![0u8; r.size];
        match dev.try_read(&mut buf) {
            Ok(Some(n)) => sink.send(&reply(r.unique, 0, &buf[..n])),
            Ok(None) => break,
            Err(e) => sink.send(&reply(r.unique, errno_of(&e), &[])),
        }
        done += 1;
    }
    reads.drain(..done);
    let ready = !matches!(dev.wait_readable(Some(std::time::Duration::ZERO)), Ok(crate::Readiness::Timeout));
    if ready {
        for kh in std::mem::take(polls) {
            sink.send(&poll_wakeup(kh));
        }
    }
}

/// Serves `emu` as the character device `devname` until `/dev/cuse` fails (or forever).
pub fn serve(emu: Emulator, cuse_path: &std::path::Path, devname: &str) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(cuse_path)?;
    let file = Arc::new(file);
    let mut handler = Handler::new(emu, file.clone(), devname);
    // FUSE wants room for the largest write and its headers, at least 8 KiB.
    let mut buf = vec![0u8; 64 * 1024 + 4096];
    loop {
        let n = match (&*file).read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::ENOENT)) => continue,
            Err(e) => return Err(e),
        };
        match parse_request(&buf[..n]) {
            Some(req) => handler.handle(&req),
            None => eprintln!("hv-emu: a short request from /dev/cuse ({n} bytes)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timeouts;
    use kmod_shim::hv::{Op, VssMsg, MSG_SIZE};
    use std::time::Duration;

    #[derive(Default)]
    struct Buf(Mutex<Vec<Vec<u8>>>);
    impl Sink for Buf {
        fn send(&self, msg: &[u8]) {
            self.0.lock().unwrap().push(msg.to_vec());
        }
    }
    impl Buf {
        fn wait(&self, n: usize) -> Vec<Vec<u8>> {
            for _ in 0..200 {
                if self.0.lock().unwrap().len() >= n {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn req(opcode: u32, unique: u64, arg: &[u8]) -> Request {
        Request { opcode, unique, pid: 1, arg: arg.to_vec() }
    }

    fn rw_in(fh: u64, size: u32) -> Vec<u8> {
        let mut a = fh.to_ne_bytes().to_vec();
        a.extend_from_slice(&0u64.to_ne_bytes());
        a.extend_from_slice(&size.to_ne_bytes());
        a.resize(RW_IN, 0);
        a
    }

    fn header(m: &[u8]) -> (u32, i32, u64) {
        (u32_at(m, 0).unwrap(), i32::from_ne_bytes(m[4..8].try_into().unwrap()), u64_at(m, 8).unwrap())
    }

    #[test]
    fn init_reply_names_the_device() {
        let r = init_reply(9, DEVNAME);
        assert_eq!(header(&r), (r.len() as u32, 0, 9));
        assert_eq!(u32_at(&r, OUT_HEADER), Some(7));
        assert_eq!(&r[OUT_HEADER + CUSE_INIT_OUT..], b"DEVNAME=vmbus/hv_vss\0");
    }

    #[test]
    fn parse_checks_the_length() {
        let mut b = vec![0u8; 48];
        b[..4].copy_from_slice(&48u32.to_ne_bytes());
        b[4..8].copy_from_slice(&opcode::READ.to_ne_bytes());
        b[8..16].copy_from_slice(&5u64.to_ne_bytes());
        let r = parse_request(&b).unwrap();
        assert_eq!((r.opcode, r.unique, r.arg.len()), (15, 5, 8));
        assert!(parse_request(&b[..40]).is_none());
    }

    #[test]
    fn a_daemon_session_over_fuse_requests() {
        let emu = Emulator::new(Timeouts::default());
        let sink = Arc::new(Buf::default());
        let mut h = Handler::new(emu.clone(), sink.clone(), DEVNAME);
        h.handle(&req(opcode::OPEN, 1, &[0; 8]));
        let out = sink.wait(1);
        assert_eq!(header(&out[0]).1, 0);
        let fh = u64_at(&out[0], OUT_HEADER).unwrap();
        h.handle(&req(opcode::OPEN, 2, &[0; 8]));
        assert_eq!(header(&sink.wait(1)[0]).1, -libc::EBUSY);
        // REGISTER1, then the 4-byte version.
        let mut w = rw_in(fh, 12);
        w.extend_from_slice(&VssMsg::with_op(Op::Register1 as u8).to_bytes());
        h.handle(&req(opcode::WRITE, 3, &w));
        assert_eq!(u32_at(&sink.wait(1)[0], OUT_HEADER), Some(12));
        h.handle(&req(opcode::READ, 4, &rw_in(fh, 12)));
        let out = sink.wait(1);
        assert_eq!(header(&out[0]), (20, 0, 4));
        assert_eq!(u32_at(&out[0], OUT_HEADER), Some(129));
        // A poll that finds nothing is woken when the FREEZE is queued.
        let mut poll = fh.to_ne_bytes().to_vec();
        poll.extend_from_slice(&77u64.to_ne_bytes());
        poll.extend_from_slice(&POLL_SCHEDULE_NOTIFY.to_ne_bytes());
        poll.extend_from_slice(&1u32.to_ne_bytes());
        h.handle(&req(opcode::POLL, 5, &poll));
        assert_eq!(u32_at(&sink.wait(1)[0], OUT_HEADER), Some(0));
        let p = emu.start(Op::Freeze);
        let out = sink.wait(1);
        assert_eq!(out[0], poll_wakeup(77));
        h.handle(&req(opcode::READ, 6, &rw_in(fh, 12)));
        let out = sink.wait(1);
        assert_eq!(out[0][OUT_HEADER..], VssMsg::with_op(5).to_bytes());
        let mut w = rw_in(fh, 12);
        w.extend_from_slice(&[0; MSG_SIZE]);
        h.handle(&req(opcode::WRITE, 7, &w));
        sink.wait(1);
        assert_eq!(p.wait().error, 0);
        // A parked read is interrupted; the close fails nothing pending.
        h.handle(&req(opcode::READ, 8, &rw_in(fh, 12)));
        h.handle(&req(opcode::INTERRUPT, 9, &8u64.to_ne_bytes()));
        assert_eq!(header(&sink.wait(1)[0]), (16, -libc::EINTR, 8));
        let mut rel = fh.to_ne_bytes().to_vec();
        rel.resize(24, 0);
        h.handle(&req(opcode::RELEASE, 10, &rel));
        assert_eq!(header(&sink.wait(1)[0]), (16, 0, 10));
        assert!(!emu.is_open());
    }
}
