//! The loop: open, register, then one request at a time, until the device fails (thaw what
//! this channel froze, open again with backoff) or the loop is told to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmod_shim::hv::{self, Op, VssMsg, HV_E_FAIL, HV_S_OK, MSG_SIZE};
use tracing::{error, info, warn};

use super::{HvDevice, HvOpener};
use crate::config::AppFailurePolicy;
use crate::service::{Agent, FreezeRequest, PrepareRound};

/// How the loop waits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long to wait for the kernel's version after REGISTER1 before serving without one.
    pub register_timeout: Duration,
    /// Longest single wait on the device (the stop flag is looked at in between).
    pub idle_wait: Duration,
    /// The first wait before opening the device again after a failure; doubles each time.
    pub backoff_min: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            register_timeout: Duration::from_secs(5),
            idle_wait: Duration::from_secs(60),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What the channel has done, for status and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The device, as given.
    pub device: String,
    /// Registered with the kernel now.
    pub registered: bool,
    /// The kernel's version from the last REGISTER1 handshake (None: it sent none).
    pub kernel_version: Option<u32>,
    /// Successful registrations (more than one: the device failed and was opened again).
    pub registrations: u64,
    /// Requests answered.
    pub requests: u64,
    /// The last request and its answer, e.g. `VSS_OP_FREEZE: HV_S_OK`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// Why the device was last given up and opened again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// The running channel.
pub struct Served {
    stop: Arc<AtomicBool>,
    /// Set while a request is being acted on (before the stop flag is looked at).
    busy: Arc<AtomicBool>,
    status: Arc<Mutex<Status>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Before vssd's shutdown thaws: no request is acted on from now on (one that arrives is
    /// left unanswered, and the kernel fails it to the host when the device closes at exit),
    /// and the one in progress, if any, is waited for, up to `limit`; a FREEZE that finishes
    /// meanwhile is not answered either (the shutdown thaws it).
    pub async fn quiesce(&self, limit: Duration) {
        // Stop first, then look at busy; the loop sets busy first, then looks at stop: one of
        // the two sees the other (SeqCst).
        self.stop.store(true, Ordering::SeqCst);
        let end = tokio::time::Instant::now() + limit;
        while self.busy.load(Ordering::SeqCst) && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the loop (at its next wake-up) and waits for it (tests; vssd quiesces it and
    /// lets it end with the process).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves the device on a thread of its own. `first` is the device already opened (so that
/// vssd's start fails on a device it cannot open); the opener opens it again after failures.
pub fn spawn(
    agent: Arc<Agent>,
    rt: tokio::runtime::Handle,
    mut opener: Box<dyn HvOpener>,
    first: Option<Box<dyn HvDevice>>,
    settings: Settings,
) -> std::io::Result<Served> {
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicBool::new(false));
    let status = Arc::new(Mutex::new(Status { device: opener.name(), ..Status::default() }));
    let channel = agent.new_channel_id();
    let mut ch = Channel {
        agent,
        rt,
        channel,
        froze: false,
        stop: stop.clone(),
        busy: busy.clone(),
        status: status.clone(),
        settings,
    };
    let thread = std::thread::Builder::new().name("hyperv-vss".into()).spawn(move || ch.run(opener.as_mut(), first))?;
    Ok(Served { stop, busy, status, thread: Some(thread) })
}

/// Why a session with the device ended.
enum Ended {
    Stopped,
    Failed(String),
}

struct Channel {
    agent: Arc<Agent>,
    rt: tokio::runtime::Handle,
    channel: u64,
    /// A FREEZE of this channel succeeded and its THAW has not come yet.
    froze: bool,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    status: Arc<Mutex<Status>>,
    settings: Settings,
}

/// Clears the busy flag however `answer` returns.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn hr(e: u32) -> &'static str {
    if e == HV_S_OK {
        "HV_S_OK"
    } else {
        "HV_E_FAIL"
    }
}

impl Channel {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&mut self, opener: &mut dyn HvOpener, mut first: Option<Box<dyn HvDevice>>) {
        let mut backoff = self.settings.backoff_min;
        while !self.stopped() {
            let dev = match first.take() {
                Some(d) => Ok(d),
                None => opener.open(),
            };
            let ended = match dev {
                Ok(mut d) => {
                    let served_before = self.status().requests;
                    let ended = self.session(d.as_mut());
                    // The device is closed (dropped) before anything else: the kernel fails
                    // what was pending and is ready for the next opener.
                    drop(d);
                    if self.status().requests > served_before {
                        backoff = self.settings.backoff_min;
                    }
                    ended
                }
                Err(e) => Ended::Failed(format!("{:#}", anyhow::Error::from(e))),
            };
            if self.stopped() {
                break; // vssd is stopping: its shutdown thaws
            }
            match ended {
                Ended::Stopped => break,
                Ended::Failed(why) => {
                    {
                        let mut s = self.status();
                        s.registered = false;
                        s.last_failure = Some(why.clone());
                    }
                    crate::warn_limited!(device = %opener.name(), error = %why, retry_ms = backoff.as_millis() as u64, "Hyper-V VSS device failed; opening it again");
                    self.thaw_ours("the Hyper-V VSS device failed");
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(self.settings.backoff_max);
                }
            }
        }
    }

    /// Sleeps, waking early to stop.
    fn sleep(&self, d: Duration) {
        let end = std::time::Instant::now() + d;
        while !self.stopped() {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    /// Waits for a message, in slices so that a stop is seen. Ok(false): stopped.
    fn wait(&self, dev: &mut dyn HvDevice, mut total: Option<Duration>) -> Result<bool, String> {
        loop {
            if self.stopped() {
                return Ok(false);
            }
            let slice = match total {
                Some(t) => t.min(self.settings.idle_wait),
                None => self.settings.idle_wait,
            };
            match dev.wait_readable(slice) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(e) => return Err(format!("waiting on the device: {e}")),
            }
            if let Some(t) = total.as_mut() {
                *t = t.saturating_sub(slice);
                if t.is_zero() {
                    return Ok(true); // the caller reads nothing: it checks itself
                }
            }
        }
    }

    fn session(&mut self, dev: &mut dyn HvDevice) -> Ended {
        // Registration: REGISTER1 wants the kernel's version back; a kernel that refuses it
        // gets the older REGISTER, which has no reply.
        let mut reg = Op::Register1;
        match dev.write(&VssMsg::with_op(Op::Register1 as u8).to_bytes()) {
            Ok(MSG_SIZE) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                reg = Op::Register;
                if let Err(e) = dev.write(&VssMsg::with_op(Op::Register as u8).to_bytes()) {
                    return Ended::Failed(format!("registration (VSS_OP_REGISTER) refused: {e}"));
                }
            }
            Ok(n) => return Ended::Failed(format!("registration: the kernel took {n} of {MSG_SIZE} bytes")),
            Err(e) => return Ended::Failed(format!("registration (VSS_OP_REGISTER1) refused: {e}")),
        }
        let mut buf = [0u8; 64];
        let mut early: Option<VssMsg> = None;
        let mut version = None;
        if reg == Op::Register1 {
            match self.wait(dev, Some(self.settings.register_timeout)) {
                Ok(false) => return Ended::Stopped,
                Ok(true) => {}
                Err(e) => return Ended::Failed(e),
            }
            if dev.wait_readable(Duration::ZERO).unwrap_or(false) {
                match dev.read(&mut buf) {
                    Ok(hv::VERSION_SIZE) => version = hv::decode_version(&buf[..hv::VERSION_SIZE]).ok(),
                    // A request already: this kernel answers REGISTER1 with nothing.
                    Ok(MSG_SIZE) => early = VssMsg::from_bytes(&buf[..MSG_SIZE]).ok(),
                    Ok(n) => {
                        return Ended::Failed(format!("registration: the kernel answered {n} bytes, not a version"))
                    }
                    Err(e) => return Ended::Failed(format!("registration: reading the version failed: {e}")),
                }
            }
        }
        {
            let mut s = self.status();
            s.registered = true;
            s.kernel_version = version;
            s.registrations += 1;
        }
        match version {
            Some(v) => info!(version = v, "registered with the kernel's Hyper-V VSS driver (VSS_OP_REGISTER1)"),
            None if reg == Op::Register1 => info!(
                "registered with the kernel's Hyper-V VSS driver; it sent no version after VSS_OP_REGISTER1 \
                 (a REGISTER-only kernel): serving without one"
            ),
            None => info!("registered with the kernel's Hyper-V VSS driver (VSS_OP_REGISTER)"),
        }
        if let Some(m) = early {
            if let Err(why) = self.answer(dev, m) {
                return Ended::Failed(why);
            }
        }
        loop {
            match self.wait(dev, None) {
                Ok(false) => return Ended::Stopped,
                Ok(true) => {}
                Err(e) => return Ended::Failed(e),
            }
            let n = match dev.read(&mut buf) {
                Ok(0) => return Ended::Failed("the device reads end-of-file".into()),
                Ok(n) => n,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
                Err(e) => return Ended::Failed(format!("reading the device failed: {e}")),
            };
            let Ok(m) = VssMsg::from_bytes(&buf[..n]) else {
                crate::warn_limited!(bytes = n, want = MSG_SIZE, "a Hyper-V VSS message of the wrong size; skipped");
                continue;
            };
            if let Err(why) = self.answer(dev, m) {
                return Ended::Failed(why);
            }
        }
    }

    /// Does what `m` asks and writes the answer: the same message with `error` stored over its
    /// header, as hv_vss_daemon answers (so the operation byte becomes the error's low byte).
    fn answer(&mut self, dev: &mut dyn HvDevice, m: VssMsg) -> Result<(), String> {
        self.busy.store(true, Ordering::SeqCst);
        let _busy = Busy(self.busy.clone());
        if self.stop.load(Ordering::SeqCst) {
            return Err("vssd is stopping: request left unanswered".into());
        }
        let op = m.op();
        let error = match op {
            Some(Op::Freeze) => self.freeze(),
            Some(Op::Thaw) => self.thaw(),
            Some(Op::HotBackup) => self.hot_backup(),
            _ => {
                // The kernel forwards only FREEZE, THAW and HOT_BACKUP; hv_vss_daemon answers
                // anything else with HV_S_OK, and the kernel waits for an answer.
                crate::warn_limited!(op = m.op_byte(), "unexpected Hyper-V VSS operation; answered HV_S_OK");
                HV_S_OK
            }
        };
        let name = op.map_or_else(|| format!("op {}", m.op_byte()), |o| o.name().to_string());
        {
            let mut s = self.status();
            s.requests += 1;
            s.last = Some(format!("{name}: {}", hr(error)));
        }
        if self.stopped() && self.froze {
            // vssd began stopping during this FREEZE: its shutdown thaws, so the host must not
            // hear HV_S_OK; unanswered, the kernel fails it when the device closes.
            return Err("vssd is stopping: FREEZE left unanswered".into());
        }
        let mut reply = m;
        reply.set_error(error);
        match dev.write(&reply.to_bytes()) {
            Ok(MSG_SIZE) => Ok(()),
            Ok(n) => Err(format!("the answer to {name}: the kernel took {n} of {MSG_SIZE} bytes")),
            // EINVAL: the kernel no longer waits for this answer (it answered the host itself
            // after its timeout, or faked a THAW around hibernation); hv_vss_daemon opens the
            // device again then, and so does vssd.
            Err(e) => Err(format!("the answer to {name} was refused: {e}")),
        }
    }

    fn freeze(&mut self) -> u32 {
        match self.agent.frozen_owner() {
            Some(Some(o)) if o == self.channel => {
                info!("Hyper-V FREEZE: already frozen by this channel");
                return HV_S_OK;
            }
            _ => {}
        }
        let req = FreezeRequest { owner: Some(self.channel), ..Default::default() };
        let agent = self.agent.clone();
        match self.rt.block_on(async move { agent.freeze(req).await }) {
            Ok(r) => {
                self.froze = r.frozen > 0;
                info!(frozen = r.frozen, apps = r.apps.len(), consistency = r.consistency, "Hyper-V FREEZE: HV_S_OK");
                HV_S_OK
            }
            Err(e) => {
                warn!(error = &e as &dyn std::error::Error, "Hyper-V FREEZE: HV_E_FAIL");
                HV_E_FAIL
            }
        }
    }

    fn thaw(&mut self) -> u32 {
        let froze = std::mem::take(&mut self.froze);
        match self.agent.frozen_owner() {
            Some(Some(o)) if o == self.channel => {
                let agent = self.agent.clone();
                match self.rt.block_on(async move { agent.thaw().await }) {
                    Ok(r) => {
                        info!(thawed = r.thawed, "Hyper-V THAW: HV_S_OK");
                        HV_S_OK
                    }
                    Err(e) => {
                        warn!(error = &e as &dyn std::error::Error, "Hyper-V THAW: HV_E_FAIL");
                        HV_E_FAIL
                    }
                }
            }
            owner if froze => {
                // This channel's freeze ended before its THAW: vssd's deadline, or a thaw from
                // another channel. A snapshot taken since is only crash-consistent: say so.
                let mut why = "it was thawed from another channel".to_string();
                if owner.is_none() {
                    let agent = self.agent.clone();
                    if let Err(e) = self.rt.block_on(async move { agent.thaw().await }) {
                        why = format!("{e}");
                    }
                }
                warn!("Hyper-V THAW: HV_E_FAIL: this channel's freeze had already ended: {why}");
                HV_E_FAIL
            }
            // Nothing of this channel's is frozen (its FREEZE failed, froze nothing, or this
            // is the THAW the kernel fakes before hibernation): nothing to do.
            _ => HV_S_OK,
        }
    }

    fn hot_backup(&mut self) -> u32 {
        let agent = self.agent.clone();
        let round = self.rt.block_on(async move { agent.prepare_round().await });
        if let Some(v) = round.veto() {
            warn!(app = %v.name, app_id = v.app_id, reason = ?v.reason, "Hyper-V HOT_BACKUP: HV_E_FAIL: an app vetoed");
            return HV_E_FAIL;
        }
        if self.agent.config().app_failure == AppFailurePolicy::Fail {
            if let Some(b) = round.not_ready() {
                warn!(app = %b.name, app_id = b.app_id, outcome = ?b.outcome, "Hyper-V HOT_BACKUP: HV_E_FAIL: an app is not ready (app-failure policy is `fail`)");
                return HV_E_FAIL;
            }
        }
        match round {
            PrepareRound::Busy(state) => {
                info!(state, "Hyper-V HOT_BACKUP: HV_S_OK (apps not asked: a freeze is in progress)")
            }
            PrepareRound::NoApps => info!("Hyper-V HOT_BACKUP: HV_S_OK (no apps registered)"),
            PrepareRound::Asked(r) => info!(apps = r.len(), "Hyper-V HOT_BACKUP: HV_S_OK (apps ready)"),
        }
        HV_S_OK
    }

    /// Thaws what this channel froze (the device failed, so no THAW can come through it).
    fn thaw_ours(&mut self, why: &str) {
        self.froze = false;
        if self.agent.frozen_owner() != Some(Some(self.channel)) {
            return;
        }
        let agent = self.agent.clone();
        match self.rt.block_on(async move { agent.thaw().await }) {
            Ok(r) => warn!(thawed = r.thawed, "{why}: thawed what this channel froze"),
            Err(e) => error!(error = &e as &dyn std::error::Error, "{why}: thawing what this channel froze failed"),
        }
    }
}
