//! An emulation of Linux's `/dev/vmbus/hv_vss`, the device through which the `hv_utils` driver
//! (`drivers/hv/hv_snapshot.c` over `drivers/hv/hv_utils_transport.c`, Linux 6.1) hands the
//! Hyper-V host's VSS requests to a daemon (`hv_vss_daemon`, or vssd).
//!
//! One state machine ([`core::Core`], the kernel's code as a pure function of events) serves
//! two forms:
//! - **in process** ([`Emulator`] and [`Device`]), for unit tests of a daemon's Hyper-V loop:
//!   the test plays the host through the [`Emulator`] and the code under test reads and
//!   writes a [`Device`] as it would the file;
//! - **a real character device** in a test guest: the `hv-emu` binary serves
//!   `/dev/vmbus/hv_vss` through CUSE ([`cuse`]) and takes the host's requests on a control
//!   socket ([`control`]; JSON lines, also over a virtio-serial port from the host);
//!   [`client`] and the `hv-host` binary are the host's side.
//!
//! # The in-process API
//!
//! ```
//! use hv_emu::{Emulator, Timeouts, Readiness};
//! use kmod_shim::hv::{Op, VssMsg, HV_S_OK, MSG_SIZE};
//! use std::time::Duration;
//!
//! let emu = Emulator::new(Timeouts { freeze: Duration::from_secs(5), other: Duration::from_secs(5) });
//! // The daemon's side: open, register with REGISTER1, read the kernel's 4-byte version.
//! let dev = emu.open().unwrap();
//! dev.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()).unwrap();
//! let mut buf = [0u8; MSG_SIZE];
//! assert_eq!(dev.read(&mut buf).unwrap(), 4);
//! // The host's side, on another thread: a FREEZE waits for the daemon's reply.
//! let pending = emu.start(Op::Freeze);
//! assert_eq!(dev.wait_readable(Some(Duration::from_secs(5))).unwrap(), Readiness::Readable);
//! assert_eq!(dev.read(&mut buf).unwrap(), MSG_SIZE);
//! assert_eq!(VssMsg::from_bytes(&buf).unwrap().op(), Some(Op::Freeze));
//! let mut reply = VssMsg::from_bytes(&buf).unwrap();
//! reply.set_error(HV_S_OK);
//! dev.write(&reply.to_bytes()).unwrap();
//! let answer = pending.wait();
//! assert_eq!(answer.error, HV_S_OK);
//! // GET_DM_INFO is the kernel's own: answered at once, flags 0.
//! assert_eq!(emu.request(Op::GetDmInfo).flags, 0);
//! ```
//!
//! - [`Emulator::request`] / [`Emulator::request_raw`] block until the kernel answers the host
//!   (the daemon's reply, the kernel's own answer, or HV_E_FAIL when the kernel's timer
//!   fires); [`Emulator::start`] does it on a thread and returns a [`PendingRequest`]. The
//!   [`Answer`] carries the host's `error` (HRESULT), `flags`, the time it took, and
//!   `dropped` when the kernel never answers (a request cancelled by [`Emulator::fake_thaw`]).
//!   Requests from several threads are served one at a time, as the host sends them.
//! - [`Device`] (from [`Emulator::open`]; a second open is EBUSY) is the file:
//!   [`Device::read`] blocks until a message is queued and returns the whole message (EINVAL
//!   if the buffer is too small), [`Device::write`] returns the count or the kernel's errno
//!   (EINVAL for a wrong size, a spurious reply, a registration mid-transaction),
//!   [`Device::wait_readable`] is `poll(2)` with a timeout, [`Device::try_read`] never blocks.
//!   Errors are `std::io::Error`s with the raw errno a real file gives. Dropping it is the
//!   last `close(2)`: a pending request is failed to the host and registration is undone.
//! - Faults: [`Emulator::fake_thaw`] (the THAW the kernel sends around hibernation),
//!   [`Emulator::destroy`] (the open device fails EBADF and polls as hung up until closed),
//!   [`Emulator::inject`] (arbitrary bytes for the daemon's next read), shortened
//!   [`Timeouts`] ([`Emulator::set_timeouts`]).
//!
//! The kernel's own quirks that a daemon meets are kept; see [`core`].

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kmod_shim::hv::Op;

pub mod client;
pub mod control;
pub mod core;
pub mod cuse;

pub use crate::core::{Event, State, Timeouts, FREEZE_TIMEOUT, UTIL_TIMEOUT};

/// What the host got for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The HRESULT (`icmsghdr.status`): `HV_S_OK`, `HV_E_FAIL`, or what the daemon wrote.
    pub error: u32,
    /// The message's flags as sent back (`VSS_HBU_NO_AUTO_RECOVERY` for some HOT_BACKUPs).
    pub flags: u32,
    /// From the request to the answer.
    pub elapsed: Duration,
    /// The kernel dropped the request without answering (the fake THAW cancelled it); `error`
    /// and `flags` are then meaningless (zero).
    pub dropped: bool,
}

/// What [`Device::wait_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// A message is waiting (POLLIN).
    Readable,
    /// Nothing came within the timeout.
    Timeout,
    /// The device is broken ([`Emulator::destroy`]): POLLERR|POLLHUP.
    Hangup,
}

type Watcher = Box<dyn Fn() + Send + Sync>;

struct Shared {
    core: Mutex<core::Core>,
    changed: Condvar,
    /// Serializes the host's requests.
    host: Mutex<()>,
    watchers: Mutex<Vec<Watcher>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, core::Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the core and wakes whoever waits when it changed something.
    fn with<R>(&self, f: impl FnOnce(&mut core::Core) -> R) -> R {
        let (r, changed) = {
            let mut c = self.lock();
            let before = (c.generation(), c.pending_events());
            let r = f(&mut c);
            (r, (c.generation(), c.pending_events()) != before)
        };
        if changed {
            self.changed.notify_all();
            for w in self.watchers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                w();
            }
        }
        r
    }
}

/// The kernel and the Hyper-V host of one emulated `/dev/vmbus/hv_vss`. Cloning gives another
/// handle on the same device.
#[derive(Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.shared.lock();
        f.debug_struct("Emulator").field("state", &c.state()).field("open", &c.is_open()).finish()
    }
}

impl Default for Emulator {
    fn default() -> Emulator {
        Emulator::new(Timeouts::default())
    }
}

impl Emulator {
    /// A device as `hv_vss_init` leaves it (no daemon registered), with these timers
    /// ([`Timeouts::default`] is the kernel's: FREEZE 15 minutes, the rest 30 s).
    pub fn new(timeouts: Timeouts) -> Emulator {
        Emulator {
            shared: Arc::new(Shared {
                core: Mutex::new(core::Core::new(timeouts)),
                changed: Condvar::new(),
                host: Mutex::new(()),
                watchers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Changes the kernel's timers for the requests that come next.
    pub fn set_timeouts(&self, t: Timeouts) {
        self.shared.with(|c| c.set_timeouts(t));
    }

    /// The timers in force.
    pub fn timeouts(&self) -> Timeouts {
        self.shared.lock().timeouts()
    }

    /// The host sends `op` (flags 0) and waits for the kernel's answer.
    pub fn request(&self, op: Op) -> Answer {
        self.request_raw(op as u8, 0)
    }

    /// The host sends any operation number with these flags and waits for the answer.
    pub fn request_raw(&self, op: u8, flags: u32) -> Answer {
        let _serial = self.shared.host.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let dispatch = self.shared.with(|c| c.host_request(op, flags));
        let (txn, deadline) = match dispatch {
            core::Dispatch::ToDaemon { txn, timeout } => (Some(txn), start.checked_add(timeout)),
            core::Dispatch::Answered => (None, None),
        };
        let mut c = self.shared.lock();
        loop {
            let answers = c.take_answers();
            if let Some(r) = answers.into_iter().find(|r| txn.is_none_or(|t| r.txn == t)) {
                return Answer { error: r.error, flags: r.flags, elapsed: start.elapsed(), dropped: false };
            }
            let Some(t) = txn else {
                unreachable!("the kernel answers what it does not send to the daemon");
            };
            if !c.in_flight(t) {
                return Answer { error: 0, flags: 0, elapsed: start.elapsed(), dropped: true };
            }
            let now = Instant::now();
            match deadline {
                Some(d) if now >= d => {
                    drop(c);
                    self.shared.with(|c| c.timeout(t));
                    c = self.shared.lock();
                }
                Some(d) => {
                    c = self.shared.changed.wait_timeout(c, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
                None => c = self.shared.changed.wait(c).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }

    /// [`Emulator::request`] on a thread of its own.
    pub fn start(&self, op: Op) -> PendingRequest {
        self.start_raw(op as u8, 0)
    }

    /// [`Emulator::request_raw`] on a thread of its own.
    pub fn start_raw(&self, op: u8, flags: u32) -> PendingRequest {
        let emu = self.clone();
        PendingRequest { thread: std::thread::spawn(move || emu.request_raw(op, flags)) }
    }

    /// The THAW the kernel fakes for the daemon before hibernation (`hv_vss_pre_suspend`).
    pub fn fake_thaw(&self) {
        self.shared.with(|c| c.fake_thaw());
    }

    /// Opens the device, as the daemon does; EBUSY while another [`Device`] is open.
    pub fn open(&self) -> io::Result<Device> {
        self.shared.with(|c| c.open())?;
        Ok(Device { shared: self.shared.clone() })
    }

    /// The kernel's transaction state.
    pub fn state(&self) -> State {
        self.shared.lock().state()
    }

    /// Whether a [`Device`] is open.
    pub fn is_open(&self) -> bool {
        self.shared.lock().is_open()
    }

    /// The registration the daemon used last (`Op::Register as u8` or `Op::Register1 as u8`).
    pub fn registered(&self) -> Option<u8> {
        self.shared.lock().registered()
    }

    /// Waits until the kernel is READY with the present opener registered (REGISTER written,
    /// or REGISTER1 written and its version read) and nothing pending, up to `limit`; false
    /// if it did not happen.
    pub fn wait_ready(&self, limit: Duration) -> bool {
        self.wait_for(limit, |c| c.state() == State::Ready && c.is_open() && c.session_registered())
    }

    /// Waits until `f` holds for the kernel's state, up to `limit`.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&core::Core) -> bool) -> bool {
        let end = Instant::now() + limit;
        let mut c = self.shared.lock();
        loop {
            if f(&c) {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            c = self.shared.changed.wait_timeout(c, end - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Breaks the open device as the module's removal would: EBADF for reads and writes,
    /// [`Readiness::Hangup`] for polls, until it is closed; then it can be opened again.
    pub fn destroy(&self) {
        self.shared.with(|c| c.destroy());
    }

    /// Queues these bytes for the daemon's next read, as if the kernel had sent them.
    pub fn inject(&self, bytes: &[u8]) -> io::Result<()> {
        self.shared.with(|c| c.inject(bytes))
    }

    /// What happened since the last call (for logs and tests).
    pub fn take_events(&self) -> Vec<Event> {
        self.shared.lock().take_events()
    }

    /// Calls `f` (from whichever thread changed it) whenever the device may have something new
    /// for a reader or a poller. The CUSE server answers parked reads and polls with it.
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        self.shared.watchers.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(f));
    }
}

/// A host request running on its own thread ([`Emulator::start`]).
#[derive(Debug)]
pub struct PendingRequest {
    thread: std::thread::JoinHandle<Answer>,
}

impl PendingRequest {
    /// Whether the answer is in.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the answer.
    pub fn wait(self) -> Answer {
        match self.thread.join() {
            Ok(a) => a,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// The open `/dev/vmbus/hv_vss` of an [`Emulator`]; dropping it closes it.
pub struct Device {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Device(/dev/vmbus/hv_vss, emulated)")
    }
}

impl Device {
    /// `read(2)`: blocks until the kernel queues a message, then returns all of it (EINVAL,
    /// and the message stays, if `buf` is smaller; EBADF on a destroyed device).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut c = self.shared.lock();
        while !c.read_ready() {
            c = self.shared.changed.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        drop(c);
        self.take(buf)
    }

    /// A read that never blocks: `Ok(None)` when nothing is queued.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.take(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(None),
            r => r.map(Some),
        }
    }

    fn take(&self, buf: &mut [u8]) -> io::Result<usize> {
        let msg = self.shared.with(|c| c.read(buf.len()))?;
        buf[..msg.len()].copy_from_slice(&msg);
        Ok(msg.len())
    }

    /// `write(2)` of one message: the count, or the kernel's errno.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.shared.with(|c| c.write(buf))
    }

    /// `poll(2)` for POLLIN, waiting up to `timeout` (`None`: forever).
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<Readiness> {
        let end = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut c = self.shared.lock();
        loop {
            match c.poll() {
                None => return Ok(Readiness::Hangup),
                Some(true) => return Ok(Readiness::Readable),
                Some(false) => {}
            }
            match end {
                None => c = self.shared.changed.wait(c).unwrap_or_else(|e| e.into_inner()),
                Some(end) => {
                    let now = Instant::now();
                    if now >= end {
                        return Ok(Readiness::Timeout);
                    }
                    c = self.shared.changed.wait_timeout(c, end - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }

    /// `close(2)` (the same as dropping it).
    pub fn close(self) {}
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.with(|c| c.release());
    }
}

impl io::Read for &Device {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Device::read(self, buf)
    }
}

impl io::Write for &Device {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Device::write(self, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmod_shim::hv::{VssMsg, HV_E_FAIL, HV_S_OK, MSG_SIZE};

    fn short() -> Timeouts {
        Timeouts { freeze: Duration::from_millis(300), other: Duration::from_millis(300) }
    }

    fn register(emu: &Emulator) -> Device {
        let dev = emu.open().unwrap();
        dev.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()).unwrap();
        let mut b = [0u8; MSG_SIZE];
        assert_eq!(dev.read(&mut b).unwrap(), 4);
        assert!(emu.wait_ready(Duration::from_secs(1)));
        dev
    }

    /// A daemon on a thread that answers every request with `error`.
    fn daemon(dev: Device, error: u32) -> std::thread::JoinHandle<Device> {
        std::thread::spawn(move || {
            let mut b = [0u8; MSG_SIZE];
            loop {
                match dev.wait_readable(Some(Duration::from_secs(2))).unwrap() {
                    Readiness::Readable => {}
                    _ => return dev,
                }
                let n = dev.read(&mut b).unwrap();
                let mut m = VssMsg::from_bytes(&b[..n]).unwrap();
                m.set_error(error);
                let _ = dev.write(&m.to_bytes());
            }
        })
    }

    #[test]
    fn a_freeze_is_answered_with_the_daemons_error() {
        let emu = Emulator::new(short());
        let t = daemon(register(&emu), HV_S_OK);
        let a = emu.request(Op::Freeze);
        assert_eq!((a.error, a.flags, a.dropped), (HV_S_OK, 0, false));
        assert_eq!(emu.request(Op::Thaw).error, HV_S_OK);
        drop(t);
    }

    #[test]
    fn a_daemon_that_never_answers_times_out_with_fail() {
        let emu = Emulator::new(short());
        let _dev = register(&emu);
        let a = emu.request(Op::Freeze);
        assert_eq!(a.error, HV_E_FAIL);
        assert!(a.elapsed >= Duration::from_millis(300));
    }

    #[test]
    fn closing_the_device_fails_the_pending_request() {
        let emu = Emulator::new(Timeouts::default());
        let dev = register(&emu);
        let p = emu.start(Op::Freeze);
        assert_eq!(dev.wait_readable(Some(Duration::from_secs(2))).unwrap(), Readiness::Readable);
        drop(dev);
        assert_eq!(p.wait().error, HV_E_FAIL);
        assert_eq!(emu.state(), State::DeviceInit);
    }

    #[test]
    fn fake_thaw_drops_the_pending_request() {
        let emu = Emulator::new(Timeouts::default());
        let dev = register(&emu);
        let p = emu.start(Op::Freeze);
        assert_eq!(dev.wait_readable(Some(Duration::from_secs(2))).unwrap(), Readiness::Readable);
        let mut b = [0u8; MSG_SIZE];
        dev.read(&mut b).unwrap();
        emu.fake_thaw();
        assert!(p.wait().dropped);
        assert_eq!(dev.read(&mut b).unwrap(), MSG_SIZE);
        assert_eq!(b[0], Op::Thaw as u8);
    }

    #[test]
    fn destroy_hangs_up_the_reader() {
        let emu = Emulator::default();
        let dev = register(&emu);
        emu.destroy();
        assert_eq!(dev.wait_readable(None).unwrap(), Readiness::Hangup);
        let mut b = [0u8; MSG_SIZE];
        assert_eq!(dev.read(&mut b).unwrap_err().raw_os_error(), Some(libc::EBADF));
        drop(dev);
        assert!(emu.open().is_ok());
    }

    #[test]
    fn a_second_open_is_busy() {
        let emu = Emulator::default();
        let _dev = emu.open().unwrap();
        assert_eq!(emu.open().unwrap_err().raw_os_error(), Some(libc::EBUSY));
    }
}
