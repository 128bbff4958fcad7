//! The async client: register with vssd, get its PREPARE / FREEZE / THAW as events.
//!
//! [`Client::connect`] returns at once and registers in the background; the first event is
//! [`Event::Connected`]. When vssd is not there yet, or restarts, the client retries with
//! backoff (logged with `tracing`) and says `hello` again; it never panics.
//!
//! The right thing is the easy thing:
//! - [`PrepareRequest`] and [`FreezeRequest`] must be answered; one dropped unanswered answers
//!   `veto` / `failed` by itself, with a reason that says so.
//! - [`FreezeRequest::held`] returns a [`Hold`]: keep it while holding. It ends (see
//!   [`Hold::released`]) at THAW, when `max_hold_ms` has passed, or when the connection to
//!   vssd is lost: the app must stop holding then, whatever it thinks of the snapshot.
//! - Every freeze the app saw (a PREPARE or a FREEZE) ends with exactly one [`Event::Thaw`],
//!   whether vssd sent it or the client made it up (vssd gone, `max_hold_ms` passed).
//!
//! Invariants of the driver task: an answer is sent only on the connection that asked and only
//! while that freeze is still running (an answer to a freeze already thawed would only earn an
//! `unexpected-reply` error); every line the client sends fits
//! [`MAX_MESSAGE_BYTES`](crate::proto::MAX_MESSAGE_BYTES).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::proto::{self, AgentMessage, AppMessage, ErrorCode, FrameError, LineReader, ThawReason};

/// The environment variable that overrides [`proto::DEFAULT_SOCKET`].
pub const SOCKET_ENV: &str = "APPVSS_SOCKET";

/// Longest veto or failure reason sent; longer ones are cut (at a character boundary).
pub const MAX_REASON_BYTES: usize = 4096;

/// What went wrong. Messages are short and say what to do next; `Display` does not repeat the
/// source, so print the chain once at the top (`format!("{:#}", anyhow::Error::from(e))`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The name is empty, longer than [`proto::MAX_NAME_BYTES`], or has control characters.
    #[error("invalid application name {0:?}: it must be 1 to {max} bytes without control characters", max = proto::MAX_NAME_BYTES)]
    InvalidName(String),
    /// The socket could not be opened (vssd not running, or no permission).
    #[error("cannot connect to vssd at {} (is vssd running with its app socket, and may this user open it?)", path.display())]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The connection failed after it was made.
    #[error("connection to vssd failed")]
    Io(#[source] io::Error),
    /// vssd closed the connection.
    #[error("vssd closed the connection")]
    Closed,
    /// vssd sent a line longer than the protocol allows.
    #[error("vssd sent a line over {} bytes; dropping the connection", proto::MAX_MESSAGE_BYTES)]
    TooLarge,
    /// vssd sent something that is not a message of this protocol version.
    #[error("vssd sent a message this client cannot read ({detail}): {excerpt}")]
    BadMessage {
        /// The parser's complaint.
        detail: String,
        /// The start of the line.
        excerpt: String,
    },
    /// vssd sent a valid message where the protocol does not allow it.
    #[error("protocol violation by vssd: {0}")]
    Protocol(String),
    /// vssd refused the registration with a fatal error.
    #[error("vssd refused the registration ({}): {message}", code_name(*code))]
    Refused {
        /// vssd's error code.
        code: ErrorCode,
        /// vssd's explanation.
        message: String,
    },
    /// No welcome in time.
    #[error("vssd did not answer the hello within {0:?}")]
    HandshakeTimeout(Duration),
    /// [`Client::connect`] was called outside a tokio runtime.
    #[error("appvss::client needs a tokio runtime; use appvss::blocking outside one")]
    NoRuntime,
    /// The blocking client's thread could not be started.
    #[error("cannot start the appvss client thread")]
    Thread(#[source] io::Error),
    /// The client has stopped; the error before this one said why.
    #[error("the appvss client has stopped")]
    Stopped,
}

impl Error {
    /// True for errors that trying again cannot fix: the client stops on them even when it
    /// reconnects.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidName(_) | Error::NoRuntime | Error::Thread(_) | Error::Stopped => true,
            Error::Refused { code, .. } => matches!(code, ErrorCode::BadHello | ErrorCode::VersionUnsupported),
            _ => false,
        }
    }
}

pub use crate::proto::code_name;

/// An error and its sources on one line, each once: what `{:#}` of an `anyhow::Error` prints,
/// for errors this crate only borrows.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    anyhow::Chain::new(e).map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

// ---------------------------------------------------------------------------------------
// Options

/// How to register. [`Options::new`] takes the socket from `$APPVSS_SOCKET`, else
/// [`proto::DEFAULT_SOCKET`].
#[derive(Debug, Clone)]
pub struct Options {
    name: String,
    socket: PathBuf,
    reconnect: bool,
    handshake_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Options {
    /// Registration under `name` (for vssd's reports: `postgresql`, `orders-db`).
    pub fn new(name: impl Into<String>) -> Options {
        let socket = std::env::var_os(SOCKET_ENV)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET));
        Options {
            name: name.into(),
            socket,
            reconnect: true,
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// Another socket than `$APPVSS_SOCKET` or the default.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Options {
        self.socket = path.into();
        self
    }

    /// Whether to reconnect when vssd is not there or goes away (default: yes). Without, the
    /// first failure stops the client and [`Client::next_event`] returns it.
    pub fn reconnect(mut self, on: bool) -> Options {
        self.reconnect = on;
        self
    }

    /// The wait between attempts: from `min`, doubling up to `max` (defaults 100 ms, 5 s),
    /// with some jitter so that many apps do not all come back in the same millisecond.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Options {
        self.backoff_min = min.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_min);
        self
    }

    /// How long to wait for vssd's welcome (default 5 s).
    pub fn handshake_timeout(mut self, t: Duration) -> Options {
        self.handshake_timeout = t;
        self
    }

    /// The application's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket path that will be used.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        proto::check_name(&self.name).map_err(|_| Error::InvalidName(self.name.clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Events

/// Why an app's part in a freeze ended: what [`Hold::released`] and [`Event::Thaw`] say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Release {
    /// vssd's THAW: the snapshot was taken.
    Completed,
    /// vssd's THAW: the freeze was abandoned (a veto, a failure, a filesystem).
    Aborted,
    /// vssd's THAW: vssd thawed by itself (its deadline, the host gone, shutdown).
    Timeout,
    /// `max_hold_ms` passed without a THAW: the client ended the hold by itself.
    MaxHoldElapsed,
    /// The connection to vssd was lost; vssd counts the app as released.
    Disconnected,
    /// The client was dropped or closed while the freeze ran.
    ClientClosed,
}

impl Release {
    /// The protocol's and the C API's name: `completed`, `aborted`, `timeout`, `max-hold`,
    /// `disconnected`, `closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Release::Completed => "completed",
            Release::Aborted => "aborted",
            Release::Timeout => "timeout",
            Release::MaxHoldElapsed => "max-hold",
            Release::Disconnected => "disconnected",
            Release::ClientClosed => "closed",
        }
    }

    /// True only for a normal end: the snapshot was taken while the app held.
    pub fn is_completed(self) -> bool {
        self == Release::Completed
    }
}

impl From<ThawReason> for Release {
    fn from(r: ThawReason) -> Release {
        match r {
            ThawReason::Completed => Release::Completed,
            ThawReason::Aborted => Release::Aborted,
            ThawReason::Timeout => Release::Timeout,
        }
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What vssd asks, in order. Match with a `_` arm: more kinds may come.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Registered (again, after a reconnect). Apps need not act on it.
    Connected {
        /// vssd's number for this registration.
        app_id: u64,
        /// The protocol version spoken.
        version: u32,
    },
    /// The connection was lost; the client reconnects (unless told not to). Any freeze that
    /// was running has already ended with an [`Event::Thaw`] (`Disconnected`).
    Disconnected(Error),
    /// A freeze is coming: answer [`PrepareRequest::ready`] or [`PrepareRequest::veto`].
    Prepare(PrepareRequest),
    /// Flush, then answer [`FreezeRequest::held`] (and hold) or [`FreezeRequest::failed`].
    Freeze(FreezeRequest),
    /// The freeze is over for this app: exactly one per freeze the app saw.
    Thaw(Thaw),
}

/// The end of a freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thaw {
    /// vssd's number for the freeze.
    pub freeze_id: u64,
    /// Why it ended.
    pub release: Release,
}

// ---------------------------------------------------------------------------------------
// Freeze slots: what the driver, the requests and the hold share about one freeze

/// Set once, waited on from async code (`Notify`) or threads (`Condvar`).
struct Signal {
    value: Mutex<Option<Release>>,
    cond: Condvar,
    notify: Notify,
}

impl Signal {
    fn new() -> Signal {
        Signal { value: Mutex::new(None), cond: Condvar::new(), notify: Notify::new() }
    }

    /// Sets the value if unset; true if this call set it.
    fn set(&self, r: Release) -> bool {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        if v.is_some() {
            return false;
        }
        *v = Some(r);
        drop(v);
        self.cond.notify_all();
        self.notify.notify_waiters();
        true
    }

    fn get(&self) -> Option<Release> {
        *self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until(&self, until: Instant) -> Option<Release> {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = *v {
                return Some(r);
            }
            let now = Instant::now();
            if now >= until {
                return None;
            }
            v = self.cond.wait_timeout(v, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    async fn wait_async(&self) -> Release {
        loop {
            let notified = self.notify.notified();
            if let Some(r) = self.get() {
                return r;
            }
            notified.await;
        }
    }
}

struct Slot {
    freeze_id: u64,
    conn: u64,
    ended: Signal,
    /// A [`Hold`] exists (so the `thawed` acknowledgement waits for it to drop).
    hold_live: Mutex<bool>,
}

impl Slot {
    fn new(freeze_id: u64, conn: u64) -> Arc<Slot> {
        Arc::new(Slot { freeze_id, conn, ended: Signal::new(), hold_live: Mutex::new(false) })
    }
}

/// What requests and holds tell the driver.
enum Cmd {
    Answer { conn: u64, freeze_id: u64, msg: AppMessage },
    HoldDropped { conn: u64, freeze_id: u64 },
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn deadline_after(ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_millis(ms)).unwrap_or(now + Duration::from_secs(86400 * 365))
}

/// PREPARE: answer [`ready`](Self::ready) or [`veto`](Self::veto) before
/// [`deadline`](Self::deadline). Dropped unanswered, it vetoes, saying so.
#[must_use = "vssd waits for an answer: call ready() or veto()"]
pub struct PrepareRequest {
    id: u64,
    deadline_ms: u64,
    deadline: Instant,
    slot: Arc<Slot>,
    cmds: mpsc::UnboundedSender<Cmd>,
    answered: bool,
}

impl PrepareRequest {
    /// vssd's number for the freeze.
    pub fn freeze_id(&self) -> u64 {
        self.slot.freeze_id
    }

    /// The answer is due by then (vssd's `deadline_ms` from when the client read the PREPARE).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `deadline_ms` as vssd sent it.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The app can freeze.
    pub fn ready(mut self) {
        self.answer(AppMessage::Ready { re: self.id });
    }

    /// The app cannot freeze now; `reason` goes into vssd's report (cut at
    /// [`MAX_REASON_BYTES`]).
    pub fn veto(mut self, reason: impl fmt::Display) {
        self.answer(AppMessage::Veto { re: self.id, reason: cut(reason.to_string()) });
    }

    fn answer(&mut self, msg: AppMessage) {
        self.answered = true;
        let _ = self.cmds.send(Cmd::Answer { conn: self.slot.conn, freeze_id: self.slot.freeze_id, msg });
    }
}

impl Drop for PrepareRequest {
    fn drop(&mut self) {
        if !self.answered {
            tracing::warn!(freeze_id = self.slot.freeze_id, "PREPARE dropped unanswered: vetoing");
            self.answer(AppMessage::Veto {
                re: self.id,
                reason: "the application dropped the PREPARE request without answering".into(),
            });
        }
    }
}

impl fmt::Debug for PrepareRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrepareRequest")
            .field("freeze_id", &self.slot.freeze_id)
            .field("deadline_ms", &self.deadline_ms)
            .finish()
    }
}

/// FREEZE: flush, then answer [`held`](Self::held) (and keep the [`Hold`] while holding) or
/// [`failed`](Self::failed), before [`deadline`](Self::deadline). Dropped unanswered, it
/// answers `failed`, saying so.
#[must_use = "vssd waits for an answer: call held() or failed()"]
pub struct FreezeRequest {
    id: u64,
    deadline_ms: u64,
    max_hold_ms: u64,
    deadline: Instant,
    max_hold: Instant,
    slot: Arc<Slot>,
    cmds: mpsc::UnboundedSender<Cmd>,
    answered: bool,
}

impl FreezeRequest {
    /// vssd's number for the freeze.
    pub fn freeze_id(&self) -> u64 {
        self.slot.freeze_id
    }

    /// `held` or `failed` is due by then.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `deadline_ms` as vssd sent it.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The hold ends at the latest then, THAW or not.
    pub fn max_hold(&self) -> Instant {
        self.max_hold
    }

    /// `max_hold_ms` as vssd sent it.
    pub fn max_hold_ms(&self) -> u64 {
        self.max_hold_ms
    }

    /// True if the freeze has already ended (THAW came, vssd went away): answering is then
    /// pointless, and [`held`](Self::held) returns a hold that has already ended.
    pub fn is_over(&self) -> bool {
        self.slot.ended.get().is_some()
    }

    /// Flushed; holding from now on: no writes until the returned [`Hold`] ends.
    pub fn held(mut self) -> Hold {
        *self.slot.hold_live.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.answer(AppMessage::Held { re: self.id });
        Hold { slot: self.slot.clone(), max_hold: self.max_hold, cmds: self.cmds.clone() }
    }

    /// Could not flush; `reason` goes into vssd's report (cut at [`MAX_REASON_BYTES`]).
    pub fn failed(mut self, reason: impl fmt::Display) {
        self.answer(AppMessage::Failed { re: self.id, reason: cut(reason.to_string()) });
    }

    fn answer(&mut self, msg: AppMessage) {
        self.answered = true;
        let _ = self.cmds.send(Cmd::Answer { conn: self.slot.conn, freeze_id: self.slot.freeze_id, msg });
    }
}

impl Drop for FreezeRequest {
    fn drop(&mut self) {
        if !self.answered {
            tracing::warn!(freeze_id = self.slot.freeze_id, "FREEZE dropped unanswered: answering failed");
            self.answer(AppMessage::Failed {
                re: self.id,
                reason: "the application dropped the FREEZE request without answering".into(),
            });
        }
    }
}

impl fmt::Debug for FreezeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreezeRequest")
            .field("freeze_id", &self.slot.freeze_id)
            .field("deadline_ms", &self.deadline_ms)
            .field("max_hold_ms", &self.max_hold_ms)
            .finish()
    }
}

/// The app holds (writes nothing) while this lives and has not [ended](Self::released).
///
/// It ends at vssd's THAW, when `max_hold_ms` has passed, or when the connection to vssd is
/// lost; the app must then stop holding at once. Dropping it earlier means the app stopped
/// holding early (logged: the snapshot may not be consistent for this app). Dropping it after
/// the THAW sends vssd the optional `thawed` acknowledgement.
#[must_use = "the app holds while the Hold lives: keep it until released() returns"]
pub struct Hold {
    slot: Arc<Slot>,
    max_hold: Instant,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl Hold {
    /// vssd's number for the freeze.
    pub fn freeze_id(&self) -> u64 {
        self.slot.freeze_id
    }

    /// The latest the hold may last.
    pub fn max_hold(&self) -> Instant {
        self.max_hold
    }

    /// Why the hold ended, if it has.
    pub fn is_released(&self) -> Option<Release> {
        self.slot.ended.get().or_else(|| (Instant::now() >= self.max_hold).then_some(Release::MaxHoldElapsed))
    }

    /// Waits until the hold ends, and says why. Ends by itself at `max_hold_ms` even if the
    /// client's task is not running.
    pub async fn released(&self) -> Release {
        tokio::select! {
            r = self.slot.ended.wait_async() => r,
            _ = tokio::time::sleep_until(self.max_hold.into()) => {
                self.slot.ended.get().unwrap_or(Release::MaxHoldElapsed)
            }
        }
    }

    /// Blocks the thread until the hold ends (for [`blocking`](crate::blocking) users).
    pub fn wait(&self) -> Release {
        self.slot.ended.wait_until(self.max_hold).unwrap_or(Release::MaxHoldElapsed)
    }

    /// Blocks at most `timeout`; `None` if the hold goes on.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Release> {
        let until = (Instant::now() + timeout).min(self.max_hold);
        self.slot.ended.wait_until(until).or_else(|| self.is_released())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        *self.slot.hold_live.lock().unwrap_or_else(|p| p.into_inner()) = false;
        if self.is_released().is_none() {
            tracing::warn!(
                freeze_id = self.slot.freeze_id,
                "hold dropped before THAW: the app stopped holding early; the snapshot may not be consistent for it"
            );
        }
        let _ = self.cmds.send(Cmd::HoldDropped { conn: self.slot.conn, freeze_id: self.slot.freeze_id });
    }
}

impl fmt::Debug for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hold").field("freeze_id", &self.slot.freeze_id).field("released", &self.is_released()).finish()
    }
}

// ---------------------------------------------------------------------------------------
// The client

/// Where the driver delivers events: a tokio channel (async client) or a std one (blocking).
pub(crate) enum Sink {
    Tokio(mpsc::UnboundedSender<Result<Event, Error>>),
    Std(std::sync::mpsc::Sender<Result<Event, Error>>),
}

impl Sink {
    /// False once nobody listens.
    fn send(&self, e: Result<Event, Error>) -> bool {
        match self {
            Sink::Tokio(t) => t.send(e).is_ok(),
            Sink::Std(s) => s.send(e).is_ok(),
        }
    }
}

/// A registration with vssd, kept up in a background task. See the [module](self) docs.
///
/// ```no_run
/// use appvss::client::{Client, Event, Options};
/// # async fn demo() -> Result<(), appvss::Error> {
/// let mut vss = Client::connect(Options::new("cache").socket("/run/vssd/appvss.sock"))?;
/// while let Ok(ev) = vss.next_event().await {
///     match ev {
///         Event::Prepare(req) if migration_running() => req.veto("schema migration running"),
///         Event::Prepare(req) => req.ready(),
///         Event::Freeze(req) => {
///             write_back_dirty_entries();
///             let hold = req.held();
///             hold.released().await;
///         }
///         Event::Thaw(t) => println!("freeze {} over: {}", t.freeze_id, t.release),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// # fn migration_running() -> bool { false }
/// # fn write_back_dirty_entries() {}
/// ```
pub struct Client {
    events: mpsc::UnboundedReceiver<Result<Event, Error>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts registering with vssd in a task of the current tokio runtime; returns at once.
    /// Errors only for bad options or when called outside a runtime.
    pub fn connect(options: Options) -> Result<Client, Error> {
        options.validate()?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = handle.spawn(drive(options, Sink::Tokio(tx), stop_rx));
        Ok(Client { events: rx, stop: stop_tx, task })
    }

    /// Sends the answers still queued, closes the connection (vssd counts the app as
    /// released) and waits for the client's task to end. Dropping the client does the same
    /// in the background, as long as the runtime lives on.
    pub async fn close(self) {
        let Client { events, stop, task } = self;
        drop(events);
        drop(stop);
        let _ = task.await;
    }

    /// The next event. `Err` means the client has stopped: a permanent error (e.g. vssd
    /// speaks no common protocol version), or any error without
    /// [`reconnect`](Options::reconnect); after that, [`Error::Stopped`].
    pub async fn next_event(&mut self) -> Result<Event, Error> {
        self.events.recv().await.unwrap_or(Err(Error::Stopped))
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// The driver task

struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { next: min, min, max }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt: the current step plus up to a quarter of jitter.
    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
                ^ std::process::id().wrapping_mul(2_654_435_761);
        let jitter_ms = (base.as_millis() as u64 / 4).max(1);
        base + Duration::from_millis(u64::from(nanos) % jitter_ms)
    }
}

type Reader = LineReader<tokio::net::unix::OwnedReadHalf>;

/// Runs until `stop` fires (the client was dropped), the sink has no listener, or a permanent
/// error.
pub(crate) async fn drive(options: Options, sink: Sink, mut stop: oneshot::Receiver<()>) {
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
    let mut backoff = Backoff::new(options.backoff_min, options.backoff_max);
    let mut conn: u64 = 0;
    let mut attempts: u32 = 0;
    let mut last_error: Option<String> = None;
    loop {
        conn += 1;
        attempts += 1;
        let attempt = tokio::select! {
            r = handshake(&options) => r,
            _ = &mut stop => return,
        };
        match attempt {
            Ok((reader, writer, app_id, version)) => {
                tracing::info!(app_id, version, socket = %options.socket.display(), "registered with vssd as {:?}", options.name);
                backoff.reset();
                attempts = 0;
                last_error = None;
                if !sink.send(Ok(Event::Connected { app_id, version })) {
                    return;
                }
                let mut session = Session {
                    conn,
                    reader,
                    writer,
                    slots: HashMap::new(),
                    awaiting_thawed: HashMap::new(),
                    cmd_tx: cmd_tx.clone(),
                    sink: &sink,
                };
                let end = session.run(&mut cmd_rx, &mut stop).await;
                let ended = session.end_all(if matches!(end, End::Stop) {
                    Release::ClientClosed
                } else {
                    Release::Disconnected
                });
                match end {
                    End::Stop => return,
                    End::Lost(e) => {
                        tracing::warn!(error = %chain(&e), "lost the connection to vssd; any hold has ended");
                        if !ended || e.is_permanent() || !options.reconnect {
                            sink.send(Err(e));
                            return;
                        }
                        if !sink.send(Ok(Event::Disconnected(e))) {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                if e.is_permanent() || !options.reconnect {
                    tracing::error!(error = %chain(&e), "cannot register with vssd");
                    sink.send(Err(e));
                    return;
                }
                let text = chain(&e);
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot register with vssd yet; retrying with backoff");
                    last_error = Some(text);
                } else {
                    tracing::debug!(attempts, error = %text, "still cannot register with vssd");
                }
            }
        }
        // Answers queued for the old connection are meaningless now.
        while cmd_rx.try_recv().is_ok() {}
        let wait = backoff.step();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return,
        }
    }
}

async fn handshake(options: &Options) -> Result<(Reader, OwnedWriteHalf, u64, u32), Error> {
    let stream = UnixStream::connect(&options.socket)
        .await
        .map_err(|source| Error::Connect { path: options.socket.clone(), source })?;
    let (r, mut w) = stream.into_split();
    let mut reader = LineReader::new(r, proto::MAX_MESSAGE_BYTES);
    let hello = AppMessage::Hello {
        id: 1,
        name: options.name.clone(),
        min_version: proto::MIN_PROTOCOL_VERSION,
        max_version: proto::PROTOCOL_VERSION,
    };
    let welcome = async {
        w.write_all(&proto::encode(&hello)).await.map_err(Error::Io)?;
        read_message(&mut reader).await
    };
    let msg = tokio::time::timeout(options.handshake_timeout, welcome)
        .await
        .map_err(|_| Error::HandshakeTimeout(options.handshake_timeout))??;
    match msg {
        AgentMessage::Welcome { re: 1, version, app_id } => {
            if !(proto::MIN_PROTOCOL_VERSION..=proto::PROTOCOL_VERSION).contains(&version) {
                return Err(Error::Protocol(format!(
                    "welcome chose version {version}, outside the {}..={} this client offered",
                    proto::MIN_PROTOCOL_VERSION,
                    proto::PROTOCOL_VERSION
                )));
            }
            Ok((reader, w, app_id, version))
        }
        AgentMessage::Welcome { re, .. } => Err(Error::Protocol(format!("welcome answers id {re}, the hello was 1"))),
        AgentMessage::Error { code, message, .. } => Err(Error::Refused { code, message }),
        other => Err(Error::Protocol(format!("{} before the welcome", kind(&other)))),
    }
}

async fn read_message(reader: &mut Reader) -> Result<AgentMessage, Error> {
    match reader.next_message().await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(Error::Closed),
        Err(FrameError::TooLarge { .. }) => Err(Error::TooLarge),
        Err(FrameError::Io(e)) => Err(Error::Io(e)),
        Err(FrameError::Decode(d)) => {
            Err(Error::BadMessage { detail: d.detail().to_string(), excerpt: d.excerpt().to_owned() })
        }
    }
}

fn kind(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Welcome { .. } => "welcome",
        AgentMessage::Prepare { .. } => "prepare",
        AgentMessage::Freeze { .. } => "freeze",
        AgentMessage::Thaw { .. } => "thaw",
        AgentMessage::Error { .. } => "error",
    }
}

enum End {
    Stop,
    Lost(Error),
}

struct Session<'a> {
    conn: u64,
    reader: Reader,
    writer: OwnedWriteHalf,
    /// Freezes seen on this connection and not yet thawed by vssd. A slot whose signal is set
    /// (max_hold passed) stays until vssd's THAW so that THAW does not make a second event.
    slots: HashMap<u64, (Arc<Slot>, Option<Instant>)>,
    /// freeze_id → THAW's id, for freezes thawed while a Hold lived: `thawed` goes when it drops.
    awaiting_thawed: HashMap<u64, u64>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    sink: &'a Sink,
}

const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl Session<'_> {
    async fn run(&mut self, cmds: &mut mpsc::UnboundedReceiver<Cmd>, stop: &mut oneshot::Receiver<()>) -> End {
        loop {
            let next_max_hold =
                self.slots.values().filter(|(s, _)| s.ended.get().is_none()).filter_map(|(_, m)| *m).min();
            let step = tokio::select! {
                _ = &mut *stop => {
                    // Answers the app gave (or its dropped requests gave) before it closed
                    // the client still go out, before the connection closes.
                    while let Ok(cmd) = cmds.try_recv() {
                        if self.on_cmd(cmd).await.is_err() {
                            break;
                        }
                    }
                    return End::Stop;
                }
                m = read_message(&mut self.reader) => match m {
                    Ok(m) => self.on_message(m).await,
                    Err(e) => Err(e),
                },
                Some(cmd) = cmds.recv() => self.on_cmd(cmd).await,
                _ = sleep_until_opt(next_max_hold), if next_max_hold.is_some() => {
                    self.on_max_hold();
                    Ok(())
                }
            };
            if let Err(e) = step {
                return End::Lost(e);
            }
        }
    }

    async fn send(&mut self, msg: &AppMessage) -> Result<(), Error> {
        let line = proto::encode(msg);
        debug_assert!(line.len() <= proto::MAX_MESSAGE_BYTES);
        match tokio::time::timeout(WRITE_TIMEOUT, self.writer.write_all(&line)).await {
            Ok(r) => r.map_err(Error::Io),
            Err(_) => Err(Error::Io(io::Error::new(io::ErrorKind::TimedOut, "vssd has not read for 5 s"))),
        }
    }

    fn emit(&self, e: Event) {
        // A closed sink means the client is going away; `stop` ends the loop next.
        let _ = self.sink.send(Ok(e));
    }

    fn slot(&mut self, freeze_id: u64) -> Arc<Slot> {
        let conn = self.conn;
        self.slots.entry(freeze_id).or_insert_with(|| (Slot::new(freeze_id, conn), None)).0.clone()
    }

    async fn on_message(&mut self, m: AgentMessage) -> Result<(), Error> {
        match m {
            AgentMessage::Prepare { id, freeze_id, deadline_ms } => {
                tracing::debug!(freeze_id, deadline_ms, "PREPARE");
                if self.slots.contains_key(&freeze_id) {
                    tracing::warn!(freeze_id, "vssd sent a second PREPARE for the same freeze");
                }
                let slot = self.slot(freeze_id);
                self.emit(Event::Prepare(PrepareRequest {
                    id,
                    deadline_ms,
                    deadline: deadline_after(deadline_ms),
                    slot,
                    cmds: self.cmd_tx.clone(),
                    answered: false,
                }));
            }
            AgentMessage::Freeze { id, freeze_id, deadline_ms, max_hold_ms } => {
                tracing::debug!(freeze_id, deadline_ms, max_hold_ms, "FREEZE");
                let slot = self.slot(freeze_id);
                let max_hold = deadline_after(max_hold_ms);
                if let Some(e) = self.slots.get_mut(&freeze_id) {
                    e.1 = Some(max_hold);
                }
                self.emit(Event::Freeze(FreezeRequest {
                    id,
                    deadline_ms,
                    max_hold_ms,
                    deadline: deadline_after(deadline_ms),
                    max_hold,
                    slot,
                    cmds: self.cmd_tx.clone(),
                    answered: false,
                }));
            }
            AgentMessage::Thaw { id, freeze_id, reason } => {
                tracing::debug!(freeze_id, ?reason, "THAW");
                let mut ack_now = true;
                if let Some((slot, _)) = self.slots.remove(&freeze_id) {
                    if slot.ended.set(reason.into()) {
                        self.emit(Event::Thaw(Thaw { freeze_id, release: reason.into() }));
                    }
                    if *slot.hold_live.lock().unwrap_or_else(|p| p.into_inner()) {
                        self.awaiting_thawed.insert(freeze_id, id);
                        ack_now = false;
                    }
                }
                if ack_now {
                    self.send(&AppMessage::Thawed { re: id }).await?;
                }
            }
            AgentMessage::Error { re, code, message, fatal } => {
                if fatal {
                    return Err(Error::Refused { code, message });
                }
                tracing::warn!(?re, code = code_name(code), %message, "vssd reports an error in what this client sent");
            }
            AgentMessage::Welcome { .. } => {
                tracing::warn!("vssd sent a second welcome; ignored");
            }
        }
        Ok(())
    }

    async fn on_cmd(&mut self, cmd: Cmd) -> Result<(), Error> {
        match cmd {
            Cmd::Answer { conn, freeze_id, msg } => {
                if conn != self.conn {
                    tracing::debug!(freeze_id, "answer for an earlier connection dropped");
                    return Ok(());
                }
                match self.slots.get(&freeze_id) {
                    Some((slot, _)) if slot.ended.get().is_none() => self.send(&msg).await,
                    _ => {
                        tracing::debug!(freeze_id, "answer after the freeze ended; not sent");
                        Ok(())
                    }
                }
            }
            Cmd::HoldDropped { conn, freeze_id } => {
                if conn == self.conn {
                    if let Some(thaw_id) = self.awaiting_thawed.remove(&freeze_id) {
                        return self.send(&AppMessage::Thawed { re: thaw_id }).await;
                    }
                }
                Ok(())
            }
        }
    }

    fn on_max_hold(&mut self) {
        let now = Instant::now();
        let due: Vec<Arc<Slot>> =
            self.slots.values().filter(|(_, m)| m.is_some_and(|m| m <= now)).map(|(s, _)| s.clone()).collect();
        for slot in due {
            if slot.ended.set(Release::MaxHoldElapsed) {
                tracing::warn!(freeze_id = slot.freeze_id, "max_hold_ms passed without THAW: hold ended");
                self.emit(Event::Thaw(Thaw { freeze_id: slot.freeze_id, release: Release::MaxHoldElapsed }));
            }
        }
    }

    /// Ends every freeze still running; false if the sink has gone (nobody to tell).
    fn end_all(&mut self, why: Release) -> bool {
        let mut ok = true;
        for (freeze_id, (slot, _)) in self.slots.drain() {
            if slot.ended.set(why) && why == Release::Disconnected {
                ok &= self.sink.send(Ok(Event::Thaw(Thaw { freeze_id, release: why })));
            }
        }
        ok
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let s = "é".repeat(MAX_REASON_BYTES);
        let c = cut(s);
        assert!(c.len() <= MAX_REASON_BYTES && c.len() >= MAX_REASON_BYTES - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
        assert_eq!(cut("short".into()), "short");
    }

    #[test]
    fn the_longest_answer_fits_a_line() {
        let m = AppMessage::Failed { re: u64::MAX, reason: "\u{1}".repeat(MAX_REASON_BYTES) };
        // Control characters escape to six bytes each: still well under the limit.
        assert!(proto::encode(&m).len() <= proto::MAX_MESSAGE_BYTES);
    }

    #[test]
    fn names_are_checked_before_connecting() {
        assert!(matches!(Options::new("").validate(), Err(Error::InvalidName(_))));
        assert!(matches!(Options::new("x".repeat(129)).validate(), Err(Error::InvalidName(_))));
        assert!(matches!(Options::new("a\nb").validate(), Err(Error::InvalidName(_))));
        assert!(Options::new("x".repeat(128)).validate().is_ok());
        assert!(Options::new("orders-db (é)").validate().is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let steps: Vec<Duration> = (0..6).map(|_| b.step()).collect();
        let bases = [100u64, 200, 400, 500, 500, 500];
        for (s, base) in steps.iter().zip(bases) {
            assert!(
                *s >= Duration::from_millis(base) && *s < Duration::from_millis(base + base / 4 + 1),
                "{s:?} vs {base}"
            );
        }
        b.reset();
        assert!(b.step() < Duration::from_millis(126));
    }

    #[test]
    fn errors_print_their_source_once() {
        let io = || io::Error::new(io::ErrorKind::NotFound, "no such socket here");
        for e in [Error::Connect { path: "/run/x.sock".into(), source: io() }, Error::Io(io()), Error::Thread(io())] {
            assert!(!e.to_string().contains("no such socket here"), "{e}");
            let c = chain(&e);
            assert_eq!(c.matches("no such socket here").count(), 1, "{c}");
            assert_eq!(c, format!("{:#}", anyhow::Error::from(e)));
        }
    }

    #[test]
    fn permanent_errors_are_the_ones_a_retry_cannot_fix() {
        let refused = |code| Error::Refused { code, message: String::new() };
        assert!(refused(ErrorCode::VersionUnsupported).is_permanent());
        assert!(refused(ErrorCode::BadHello).is_permanent());
        assert!(!refused(ErrorCode::TooManyRegistrations).is_permanent());
        assert!(!Error::Closed.is_permanent());
    }
}
