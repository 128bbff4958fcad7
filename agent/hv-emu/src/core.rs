//! The kernel's state machine, without threads or clocks: `hv_snapshot.c`'s transaction state
//! and `hv_utils_transport.c`'s character-device mode and one-message buffer, as Linux 6.1
//! has them.
//!
//! Every entry point is one thing that happens to the kernel (a host packet, a timer firing,
//! the daemon's read, write, open or release, hibernation) and does what the kernel's code
//! does, returning the errno the daemon would see and recording the answer the host would get
//! in [`Core::take_answers`]. The two wrappers ([`crate::Emulator`] in process, the CUSE
//! server) add the blocking, the timers and the wakeups.
//!
//! Things the kernel does that are easy to get wrong, and that this keeps:
//! - The state leaves DEVICE_INIT only through `vss_poll_wrapper` (the end of any transaction,
//!   or the daemon reading the REGISTER1 version). REGISTER (the old handshake) therefore does
//!   not make the kernel ready by itself; the next request the kernel answers alone does.
//! - A timed-out request is answered HV_E_FAIL but its message stays in the device buffer if
//!   the daemon has not read it: the daemon reads it later, acts on it, and its reply is
//!   refused (EINVAL: no transaction).
//! - The reply's `error` overlays the operation byte; the kernel sets
//!   VSS_HBU_NO_AUTO_RECOVERY only when that byte still reads HOT_BACKUP.
//! - Closing the device with a request pending answers the host HV_E_FAIL and drops what was
//!   not read; the state goes back to DEVICE_INIT (the daemon must register again).

use std::time::Duration;

use kmod_shim::hv::{Op, VssMsg, HV_E_FAIL, HV_S_OK, VSS_HBU_NO_AUTO_RECOVERY};

/// `HV_UTIL_TIMEOUT`: what the kernel gives the daemon for every request but FREEZE.
pub const UTIL_TIMEOUT: Duration = Duration::from_secs(30);
/// `VSS_FREEZE_TIMEOUT`: what the kernel gives the daemon for FREEZE (15 minutes).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The kernel's version reply to REGISTER1 (`our_ver = VSS_OP_REGISTER1`).
pub const KERNEL_VERSION_REPLY: u32 = Op::Register1 as u32;

/// How long the kernel waits for the daemon's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// For FREEZE (the kernel: 15 minutes).
    pub freeze: Duration,
    /// For every other request sent to the daemon (the kernel: 30 s).
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts { freeze: FREEZE_TIMEOUT, other: UTIL_TIMEOUT }
    }
}

/// `enum hvutil_device_state`, as far as VSS uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// No daemon registered (or the device was closed): `HVUTIL_DEVICE_INIT`.
    DeviceInit,
    /// Idle, ready for the host's next request: `HVUTIL_READY`.
    Ready,
    /// A request came from the host: `HVUTIL_HOSTMSG_RECEIVED` (transient here).
    HostMsgReceived,
    /// The request is in the device for the daemon: `HVUTIL_USERSPACE_REQ`.
    UserspaceReq,
    /// The daemon replied (transient here): `HVUTIL_USERSPACE_RECV`.
    UserspaceRecv,
}

impl State {
    /// A short name for logs and the control socket.
    pub fn name(self) -> &'static str {
        match self {
            State::DeviceInit => "device-init",
            State::Ready => "ready",
            State::HostMsgReceived => "hostmsg-received",
            State::UserspaceReq => "userspace-req",
            State::UserspaceRecv => "userspace-recv",
        }
    }
}

/// What the host gets back for one request: `icmsghdr.status` and the message's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The transaction it answers.
    pub txn: u64,
    /// `icmsghdrp->status`: HV_S_OK, HV_E_FAIL or whatever the daemon wrote.
    pub error: u32,
    /// `vss_cf.flags` / `dm_info.flags` of the message sent back.
    pub flags: u32,
}

/// What [`Core::host_request`] did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The kernel answered it at once (see [`Core::take_answers`]).
    Answered,
    /// It went to the daemon; the kernel's timer for it runs for this long.
    ToDaemon {
        /// The transaction, for [`Core::timeout`].
        txn: u64,
        /// The timer.
        timeout: Duration,
    },
}

/// The character device's mode (`hvutil_transport` mode; netlink is not emulated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nobody has the device open.
    Init,
    /// One opener has it.
    Chardev,
    /// The module is going away (fault injection): every call fails EBADF.
    Destroy,
}

/// A note of what happened, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The daemon registered (REGISTER or REGISTER1).
    Registered(u8),
    /// A request was put in the device for the daemon.
    SentToDaemon(u8),
    /// The daemon read a message (its length).
    DaemonRead(usize),
    /// The host was answered.
    Answered(Reply),
    /// The kernel's timer fired.
    TimedOut(u64),
    /// The device was released.
    Released,
    /// A write was refused with this errno.
    WriteRefused(i32),
    /// The fake THAW of hibernation was queued (or not: false when the buffer was full).
    FakeThaw(bool),
}

/// The kernel side of `/dev/vmbus/hv_vss`.
#[derive(Debug)]
pub struct Core {
    state: State,
    mode: Mode,
    /// The one message waiting for the daemon's read (`hvt->outmsg`).
    outmsg: Option<Vec<u8>>,
    /// `hvt->on_read` is `vss_register_done`.
    register_done_on_read: bool,
    /// The host's request being handled (the message in `recv_buffer`).
    current: Option<(u64, VssMsg)>,
    /// The kernel's delayed work is armed for this transaction.
    timer: Option<u64>,
    next_txn: u64,
    /// `dm_reg_value`: the registration the daemon used last (the kernel never clears it).
    dm_reg_value: Option<u8>,
    /// The opener of now has registered (written REGISTER, or REGISTER1 and read the version).
    session_registered: bool,
    timeouts: Timeouts,
    answers: Vec<Reply>,
    events: Vec<Event>,
    /// Bumped whenever a reader or poller could see something new.
    generation: u64,
}

fn errno(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

impl Default for Core {
    fn default() -> Core {
        Core::new(Timeouts::default())
    }
}

impl Core {
    /// The state `hv_vss_init` leaves: DEVICE_INIT, nobody has the device open.
    pub fn new(timeouts: Timeouts) -> Core {
        Core {
            state: State::DeviceInit,
            mode: Mode::Init,
            outmsg: None,
            register_done_on_read: false,
            current: None,
            timer: None,
            next_txn: 1,
            dm_reg_value: None,
            session_registered: false,
            timeouts,
            answers: Vec::new(),
            events: Vec::new(),
            generation: 0,
        }
    }

    /// The transaction state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether someone has the device open.
    pub fn is_open(&self) -> bool {
        self.mode == Mode::Chardev
    }

    /// The registration the daemon used last (REGISTER or REGISTER1), if any.
    pub fn registered(&self) -> Option<u8> {
        self.dm_reg_value
    }

    /// Whether the host's request `txn` is still being handled (not answered, not dropped).
    pub fn in_flight(&self, txn: u64) -> bool {
        self.current.is_some_and(|(t, _)| t == txn)
    }

    /// Whether the present opener has completed a registration (REGISTER written, or REGISTER1
    /// written and its version read). Not the kernel's notion: READY alone does not say it, as
    /// a request the kernel answers itself also makes the state READY.
    pub fn session_registered(&self) -> bool {
        self.session_registered && !self.register_done_on_read
    }

    /// The timers in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Changes the timers for the requests that come next.
    pub fn set_timeouts(&mut self, t: Timeouts) {
        self.timeouts = t;
    }

    /// Changes whenever a read, a poll or a host waiter may see something new.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The host's answers given since the last call.
    pub fn take_answers(&mut self) -> Vec<Reply> {
        std::mem::take(&mut self.answers)
    }

    /// How many events wait for [`Core::take_events`].
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn bump(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// `vss_respond_to_host`.
    fn respond(&mut self, error: u32) {
        if let Some((txn, msg)) = self.current {
            let r = Reply { txn, error, flags: msg.flags };
            self.answers.push(r);
            self.events.push(Event::Answered(r));
            self.bump();
        }
    }

    /// `vss_poll_wrapper`: the transaction is over; the kernel reads the next packet.
    fn poll_wrapper(&mut self) {
        self.state = State::Ready;
        self.current = None;
    }

    /// `hvutil_transport_send`.
    fn transport_send(&mut self, bytes: Vec<u8>, register_done: bool) -> Result<(), i32> {
        match self.mode {
            Mode::Init | Mode::Destroy => Err(libc::EINVAL),
            Mode::Chardev if self.outmsg.is_some() => Err(libc::EFAULT),
            Mode::Chardev => {
                self.outmsg = Some(bytes);
                self.register_done_on_read = register_done;
                self.bump();
                Ok(())
            }
        }
    }

    /// A VSS packet from the host (`hv_vss_onchannelcallback` + `vss_handle_request`). The host
    /// sends one at a time: the wrappers hold the next until this one is answered, as the
    /// kernel leaves it in the ring buffer while `state > READY`.
    pub fn host_request(&mut self, op: u8, flags: u32) -> Dispatch {
        assert!(self.state <= State::Ready, "the host sends one VSS request at a time");
        let txn = self.next_txn;
        self.next_txn += 1;
        let mut msg = VssMsg::with_op(op);
        msg.flags = flags;
        self.current = Some((txn, msg));
        match Op::from_u8(op) {
            Some(Op::Thaw | Op::Freeze | Op::HotBackup) => {
                if self.state < State::Ready {
                    // Userspace is not registered yet; the state stays DEVICE_INIT.
                    self.respond(HV_E_FAIL);
                    self.current = None;
                    return Dispatch::Answered;
                }
                self.state = State::HostMsgReceived;
                self.send_op(txn, op)
            }
            Some(Op::GetDmInfo) => {
                if let Some((_, m)) = self.current.as_mut() {
                    m.flags = 0;
                }
                self.respond(HV_S_OK);
                self.poll_wrapper();
                Dispatch::Answered
            }
            _ => {
                self.respond(HV_S_OK);
                self.poll_wrapper();
                Dispatch::Answered
            }
        }
    }

    /// `vss_send_op`.
    fn send_op(&mut self, txn: u64, op: u8) -> Dispatch {
        self.state = State::UserspaceReq;
        let timeout = if op == Op::Freeze as u8 { self.timeouts.freeze } else { self.timeouts.other };
        self.timer = Some(txn);
        match self.transport_send(VssMsg::with_op(op).to_bytes().to_vec(), false) {
            Ok(()) => {
                self.events.push(Event::SentToDaemon(op));
                Dispatch::ToDaemon { txn, timeout }
            }
            Err(_) => {
                // "failed to communicate to the daemon": the timer is cancelled, HV_E_FAIL.
                self.timer = None;
                self.respond(HV_E_FAIL);
                self.state = State::Ready;
                self.current = None;
                Dispatch::Answered
            }
        }
    }

    /// The kernel's timer for `txn` fired (`vss_timeout_func`); nothing if it was cancelled.
    pub fn timeout(&mut self, txn: u64) {
        if self.timer != Some(txn) {
            return;
        }
        self.timer = None;
        self.events.push(Event::TimedOut(txn));
        self.respond(HV_E_FAIL);
        self.poll_wrapper();
    }

    /// The hibernation path's fake THAW (`hv_vss_pre_suspend`): pending work is cancelled
    /// (no answer to the host for it), a THAW is queued for the daemon if the buffer is free,
    /// and the state is forced to READY, so the daemon's reply to it is refused (EINVAL) and
    /// the daemon resets the device.
    pub fn fake_thaw(&mut self) {
        self.timer = None;
        self.current = None;
        let queued = self.transport_send(VssMsg::with_op(Op::Thaw as u8).to_bytes().to_vec(), false).is_ok();
        self.events.push(Event::FakeThaw(queued));
        self.state = State::Ready;
        self.bump();
    }

    /// `open(2)` on the device (`hvt_op_open`): one opener at a time.
    pub fn open(&mut self) -> std::io::Result<()> {
        match self.mode {
            Mode::Destroy => Err(errno(libc::EBADF)),
            Mode::Init => {
                self.mode = Mode::Chardev;
                self.session_registered = false;
                Ok(())
            }
            Mode::Chardev => Err(errno(libc::EBUSY)),
        }
    }

    /// The last close of the device (`hvt_op_release` + `hvt_reset` + `vss_on_reset`).
    pub fn release(&mut self) {
        // Also after [`Core::destroy`]: the "module reload" lets the device be opened again.
        self.mode = Mode::Init;
        self.outmsg = None;
        self.register_done_on_read = false;
        self.session_registered = false;
        if self.timer.take().is_some() {
            self.respond(HV_E_FAIL);
        }
        self.current = None;
        self.state = State::DeviceInit;
        self.events.push(Event::Released);
        self.bump();
    }

    /// Fault injection modelled on the module going away (`hvutil_transport_destroy`): the open
    /// device fails every read and write with EBADF and polls POLLERR|POLLHUP until closed;
    /// unlike the kernel, it can then be opened again (the module "reloaded").
    pub fn destroy(&mut self) {
        if self.mode == Mode::Chardev {
            self.mode = Mode::Destroy;
        }
        self.bump();
    }

    /// Fault injection: puts these bytes in the device buffer for the daemon's next read, as if
    /// the kernel had sent them (a malformed, short or unknown message). EFAULT if the buffer
    /// is full, EINVAL if nobody has the device open.
    pub fn inject(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.transport_send(bytes.to_vec(), false).map_err(errno)
    }

    /// Whether a read would return at once (`hvt_op_poll`): `Some(true)` readable,
    /// `Some(false)` not yet, `None` error/hangup (POLLERR|POLLHUP).
    pub fn poll(&self) -> Option<bool> {
        if self.mode == Mode::Destroy {
            return None;
        }
        Some(self.outmsg.is_some())
    }

    /// Whether a blocked read should wake up (`outmsg_len > 0 || mode != CHARDEV`).
    pub fn read_ready(&self) -> bool {
        self.outmsg.is_some() || self.mode != Mode::Chardev
    }

    /// `read(2)` of `count` bytes once [`Core::read_ready`] (`hvt_op_read`): the whole message
    /// or EINVAL if `count` is too small (the message stays); EBADF on a destroyed device.
    pub fn read(&mut self, count: usize) -> std::io::Result<Vec<u8>> {
        if self.mode == Mode::Destroy {
            return Err(errno(libc::EBADF));
        }
        let Some(len) = self.outmsg.as_ref().map(Vec::len) else {
            return Err(errno(libc::EAGAIN));
        };
        if count < len {
            return Err(errno(libc::EINVAL));
        }
        let msg = self.outmsg.take().unwrap_or_default();
        self.events.push(Event::DaemonRead(msg.len()));
        if std::mem::take(&mut self.register_done_on_read) {
            // vss_register_done
            self.poll_wrapper();
        }
        self.bump();
        Ok(msg)
    }

    /// `write(2)` (`hvt_op_write` + `vss_on_msg`): returns the count written or the errno.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.mode == Mode::Destroy {
            return Err(errno(libc::EBADF));
        }
        let r = self.on_msg(bytes);
        if let Err(e) = r {
            self.events.push(Event::WriteRefused(e));
        }
        r.map(|()| bytes.len()).map_err(errno)
    }

    /// `vss_on_msg`.
    fn on_msg(&mut self, bytes: &[u8]) -> Result<(), i32> {
        let Ok(reply) = VssMsg::from_bytes(bytes) else {
            return Err(libc::EINVAL);
        };
        let op = reply.op_byte();
        if op == Op::Register as u8 || op == Op::Register1 as u8 {
            if self.state > State::Ready {
                return Err(libc::EINVAL);
            }
            if op == Op::Register1 as u8 {
                self.transport_send(KERNEL_VERSION_REPLY.to_ne_bytes().to_vec(), true).map_err(|_| libc::EFAULT)?;
            }
            self.dm_reg_value = Some(op);
            self.session_registered = true;
            self.events.push(Event::Registered(op));
            return Ok(());
        }
        if self.state != State::UserspaceReq {
            // "Transaction not active": a spurious reply.
            return Err(libc::EINVAL);
        }
        self.state = State::UserspaceRecv;
        if op == Op::HotBackup as u8 {
            if let Some((_, m)) = self.current.as_mut() {
                m.flags = VSS_HBU_NO_AUTO_RECOVERY;
            }
        }
        if self.timer.take().is_some() {
            self.respond(reply.error());
            self.poll_wrapper();
        }
        Ok(())
    }
}

/// A message for logs: decoded when it is 12 bytes, raw otherwise.
pub fn describe(bytes: &[u8]) -> String {
    match VssMsg::from_bytes(bytes) {
        Ok(m) => format!("{m:?}"),
        Err(_) => format!("{} bytes {:02x?}", bytes.len(), bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmod_shim::hv::MSG_SIZE;

    fn registered() -> Core {
        let mut c = Core::default();
        c.open().unwrap();
        c.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()).unwrap();
        assert_eq!(c.state(), State::DeviceInit, "not ready until the version is read");
        let v = c.read(MSG_SIZE).unwrap();
        assert_eq!(v, 129u32.to_ne_bytes());
        assert_eq!(c.state(), State::Ready);
        c
    }

    fn reply(op_error: u32) -> [u8; MSG_SIZE] {
        let mut m = VssMsg::with_op(0);
        m.set_error(op_error);
        m.to_bytes()
    }

    #[test]
    fn register1_gets_the_version_and_makes_the_kernel_ready() {
        let c = registered();
        assert_eq!(c.registered(), Some(129));
        assert!(c.session_registered());
    }

    #[test]
    fn a_kernel_answered_request_makes_ready_without_a_registration() {
        let mut c = Core::default();
        c.host_request(Op::GetDmInfo as u8, 0);
        c.open().unwrap();
        assert_eq!(c.state(), State::Ready);
        assert!(!c.session_registered());
        c.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()).unwrap();
        assert!(!c.session_registered(), "not until the version is read");
        c.read(MSG_SIZE).unwrap();
        assert!(c.session_registered());
        c.release();
        assert!(!c.session_registered());
        assert_eq!(c.registered(), Some(129), "dm_reg_value stays");
    }

    #[test]
    fn register_gets_no_reply_and_leaves_the_kernel_in_device_init() {
        let mut c = Core::default();
        c.open().unwrap();
        c.write(&VssMsg::with_op(Op::Register as u8).to_bytes()).unwrap();
        assert_eq!(c.poll(), Some(false));
        assert_eq!(c.state(), State::DeviceInit);
        assert_eq!(c.host_request(Op::Freeze as u8, 0), Dispatch::Answered);
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
        // Any request the kernel answers itself ends in vss_poll_wrapper: READY.
        c.host_request(Op::GetDmInfo as u8, 7);
        assert_eq!(c.state(), State::Ready);
    }

    #[test]
    fn get_dm_info_is_answered_without_the_daemon_with_flags_zero() {
        let mut c = Core::default();
        assert_eq!(c.host_request(Op::GetDmInfo as u8, 0xff), Dispatch::Answered);
        let a = c.take_answers();
        assert_eq!((a[0].error, a[0].flags), (HV_S_OK, 0));
    }

    #[test]
    fn other_ops_are_answered_ok_by_the_kernel_with_their_flags() {
        let mut c = registered();
        for op in [0u8, 1, 4, 7, 8, 200] {
            assert_eq!(c.host_request(op, 3), Dispatch::Answered);
            let a = c.take_answers();
            assert_eq!((a[0].error, a[0].flags), (HV_S_OK, 3), "op {op}");
            assert_eq!(c.poll(), Some(false), "nothing for the daemon");
        }
    }

    #[test]
    fn freeze_goes_to_the_daemon_and_its_error_goes_to_the_host() {
        let mut c = registered();
        let Dispatch::ToDaemon { txn, timeout } = c.host_request(Op::Freeze as u8, 0) else { panic!() };
        assert_eq!(timeout, FREEZE_TIMEOUT);
        assert_eq!(c.read(MSG_SIZE).unwrap(), VssMsg::with_op(5).to_bytes());
        assert_eq!(c.write(&reply(HV_S_OK)).unwrap(), MSG_SIZE);
        assert_eq!(c.take_answers(), vec![Reply { txn, error: HV_S_OK, flags: 0 }]);
        assert_eq!(c.state(), State::Ready);
        let Dispatch::ToDaemon { timeout, .. } = c.host_request(Op::Thaw as u8, 0) else { panic!() };
        assert_eq!(timeout, UTIL_TIMEOUT);
        c.read(MSG_SIZE).unwrap();
        c.write(&reply(HV_E_FAIL)).unwrap();
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
    }

    #[test]
    fn hot_backup_flag_follows_the_replys_operation_byte() {
        let mut c = registered();
        // The stock daemon stores error=0 over the header: op byte 0, no flag.
        c.host_request(Op::HotBackup as u8, 0);
        c.read(MSG_SIZE).unwrap();
        c.write(&reply(HV_S_OK)).unwrap();
        assert_eq!(c.take_answers()[0].flags, 0);
        // A reply that keeps the op byte HOT_BACKUP (error's low byte 2) gets the flag.
        c.host_request(Op::HotBackup as u8, 0);
        c.read(MSG_SIZE).unwrap();
        c.write(&VssMsg::with_op(Op::HotBackup as u8).to_bytes()).unwrap();
        let a = c.take_answers()[0];
        assert_eq!((a.error, a.flags), (2, VSS_HBU_NO_AUTO_RECOVERY));
    }

    #[test]
    fn requests_without_the_device_open_fail() {
        let mut c = Core::default();
        c.host_request(Op::GetDmInfo as u8, 0); // READY, yet nobody listens
        assert_eq!(c.host_request(Op::Freeze as u8, 0), Dispatch::Answered);
        assert_eq!(c.take_answers()[1].error, HV_E_FAIL);
        assert_eq!(c.state(), State::Ready);
    }

    #[test]
    fn timeout_answers_fail_and_leaves_the_message_for_a_late_daemon() {
        let mut c = registered();
        let Dispatch::ToDaemon { txn, .. } = c.host_request(Op::Freeze as u8, 0) else { panic!() };
        c.timeout(txn);
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
        assert_eq!(c.state(), State::Ready);
        // The next request cannot be queued: the buffer still holds the FREEZE.
        assert_eq!(c.host_request(Op::Thaw as u8, 0), Dispatch::Answered);
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
        assert_eq!(c.read(MSG_SIZE).unwrap()[0], 5);
        assert_eq!(c.write(&reply(HV_S_OK)).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        c.timeout(txn); // a stale timer does nothing
        assert!(c.take_answers().is_empty());
    }

    #[test]
    fn wrong_sizes_and_spurious_replies_are_einval() {
        let mut c = registered();
        assert_eq!(c.write(&[0; 11]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(c.write(&[0; 13]).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(c.write(&reply(0)).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn registration_mid_transaction_is_refused() {
        let mut c = registered();
        c.host_request(Op::Freeze as u8, 0);
        let e = c.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn a_short_read_is_einval_and_keeps_the_message() {
        let mut c = registered();
        c.host_request(Op::Freeze as u8, 0);
        assert_eq!(c.read(4).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(c.read(64).unwrap().len(), MSG_SIZE);
    }

    #[test]
    fn second_opener_is_busy() {
        let mut c = registered();
        assert_eq!(c.open().unwrap_err().raw_os_error(), Some(libc::EBUSY));
    }

    #[test]
    fn closing_with_a_request_pending_fails_it_and_needs_a_new_registration() {
        let mut c = registered();
        c.host_request(Op::Freeze as u8, 0);
        c.release();
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
        assert_eq!(c.state(), State::DeviceInit);
        c.open().unwrap();
        assert_eq!(c.poll(), Some(false), "the unread FREEZE was dropped");
        c.host_request(Op::Freeze as u8, 0);
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
    }

    #[test]
    fn fake_thaw_reaches_the_daemon_and_its_reply_is_refused() {
        let mut c = registered();
        c.fake_thaw();
        assert_eq!(c.read(MSG_SIZE).unwrap()[0], 6);
        assert_eq!(c.write(&reply(0)).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert!(c.take_answers().is_empty(), "the host is told nothing");
    }

    #[test]
    fn fake_thaw_during_a_freeze_cancels_it_without_an_answer() {
        let mut c = registered();
        let Dispatch::ToDaemon { txn, .. } = c.host_request(Op::Freeze as u8, 0) else { panic!() };
        c.read(MSG_SIZE).unwrap();
        c.fake_thaw();
        c.timeout(txn);
        assert!(c.take_answers().is_empty());
        assert_eq!(c.read(MSG_SIZE).unwrap()[0], 6);
    }

    #[test]
    fn destroyed_device_fails_ebadf_then_reopens() {
        let mut c = registered();
        c.host_request(Op::Freeze as u8, 0);
        c.destroy();
        assert_eq!(c.poll(), None);
        assert_eq!(c.read(MSG_SIZE).unwrap_err().raw_os_error(), Some(libc::EBADF));
        assert_eq!(c.write(&reply(0)).unwrap_err().raw_os_error(), Some(libc::EBADF));
        c.release();
        assert_eq!(c.take_answers()[0].error, HV_E_FAIL);
        c.open().unwrap();
    }

    #[test]
    fn injected_bytes_are_read_as_is() {
        let mut c = registered();
        c.inject(&[1, 2, 3]).unwrap();
        assert_eq!(c.read(MSG_SIZE).unwrap(), vec![1, 2, 3]);
    }
}
