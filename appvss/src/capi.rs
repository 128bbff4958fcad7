//! The C ABI: `include/appvss.h` (generated from this file by cbindgen; a test fails when the
//! committed header differs from what this file generates).
//!
//! It wraps the [`crate::blocking`] client: the C app polls events with
//! `appvss_next_event` and answers a PREPARE or FREEZE by its `freeze_id`. The requests wait
//! in the handle until answered; after `appvss_held` the handle keeps the hold, and the freeze
//! ends with an `APPVSS_EVENT_KIND_THAW` event (vssd's THAW, `max_hold_ms` passed, or vssd gone)
//! that the app must act on at once.
//!
//! The one module of the crate with `unsafe`: every block dereferences a pointer the C caller
//! passed, under the contract written in the header (pointers from `appvss_connect`, not yet
//! closed; NUL-terminated strings; a writable event). No panic crosses the boundary: every
//! entry point runs under `catch_unwind` and answers `APPVSS_ERR_PANIC` instead. (`lib.rs`
//! allows `unsafe_code` for this module alone.)
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::blocking;
use crate::client::{Error, Event, FreezeRequest, Hold, Options, PrepareRequest, Release};

/// Success.
pub const APPVSS_OK: c_int = 0;
/// A NULL pointer, a bad name (empty, or over 128 bytes), or a bad argument.
pub const APPVSS_ERR_INVALID: c_int = -1;
/// No PREPARE or FREEZE with this freeze_id waits for an answer (already answered, or its
/// freeze already ended: check for a THAW event).
pub const APPVSS_ERR_NO_REQUEST: c_int = -2;
/// The client has stopped for good: `appvss_last_error()` says why. Close the handle.
pub const APPVSS_ERR_STOPPED: c_int = -3;
/// A bug in appvss (a Rust panic, caught). `appvss_last_error()` has its message.
pub const APPVSS_ERR_PANIC: c_int = -4;

/// The protocol version this library speaks at most.
pub const APPVSS_PROTOCOL_VERSION: u32 = 1;

/// What `appvss_next_event` got.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppvssEventKind {
    /// Nothing within the timeout.
    None = 0,
    /// Registered with vssd (again, after a reconnect): `app_id`, `version`.
    Connected = 1,
    /// The connection to vssd was lost; the library reconnects with backoff.
    /// `appvss_last_error()` says why.
    Disconnected = 2,
    /// A freeze is coming: answer `appvss_ready` or `appvss_veto` within `deadline_ms`.
    Prepare = 3,
    /// Flush, then answer `appvss_held` (and hold: no writes) or `appvss_failed` within
    /// `deadline_ms`; hold at most `max_hold_ms`.
    Freeze = 4,
    /// The freeze is over for this app: stop holding now. `release` says why.
    Thaw = 5,
}

/// Why a freeze ended for the app (in `APPVSS_EVENT_KIND_THAW`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppvssRelease {
    /// Not a THAW event.
    None = 0,
    /// vssd's THAW: the snapshot was taken.
    Completed = 1,
    /// vssd's THAW: the freeze was abandoned.
    Aborted = 2,
    /// vssd's THAW: vssd thawed by itself (deadline, host gone).
    Timeout = 3,
    /// `max_hold_ms` passed without a THAW.
    MaxHold = 4,
    /// The connection to vssd was lost.
    Disconnected = 5,
    /// The client is closing.
    Closed = 6,
}

/// One event. Fields that do not apply to its kind are 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AppvssEvent {
    /// What happened.
    pub kind: AppvssEventKind,
    /// vssd's number for the freeze (PREPARE, FREEZE, THAW): pass it to the answer.
    pub freeze_id: u64,
    /// PREPARE, FREEZE: milliseconds left to answer when `appvss_next_event` returned.
    pub deadline_ms: u64,
    /// FREEZE: milliseconds the hold may last at most, from when `appvss_next_event` returned.
    pub max_hold_ms: u64,
    /// THAW: why the freeze ended.
    pub release: AppvssRelease,
    /// CONNECTED: vssd's number for this registration.
    pub app_id: u64,
    /// CONNECTED: the protocol version spoken.
    pub version: u32,
}

impl AppvssEvent {
    fn none() -> AppvssEvent {
        AppvssEvent {
            kind: AppvssEventKind::None,
            freeze_id: 0,
            deadline_ms: 0,
            max_hold_ms: 0,
            release: AppvssRelease::None,
            app_id: 0,
            version: 0,
        }
    }
}

/// An opaque handle: one registration with vssd.
pub struct AppvssClient {
    events: Mutex<blocking::Client>,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    prepare: HashMap<u64, PrepareRequest>,
    freeze: HashMap<u64, FreezeRequest>,
    holds: HashMap<u64, Hold>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl std::fmt::Display) {
    let mut text = msg.to_string().into_bytes();
    text.retain(|&b| b != 0);
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// An error and its sources, each once, on one line (every error's `Display` leaves its
/// source to the chain).
fn chain(e: Error) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f`, turning a panic into `on_panic` and a last error.
fn guarded<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error in appvss (please report): {what}"));
            on_panic
        }
    }
}

/// Reads an optional C string; `Err` for invalid UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
unsafe fn opt_str(p: *const c_char) -> Result<Option<String>, std::str::Utf8Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string valid for this call.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_string()))
}

fn ms_until(t: Instant) -> u64 {
    t.saturating_duration_since(Instant::now()).as_millis().try_into().unwrap_or(u64::MAX)
}

fn release_code(r: Release) -> AppvssRelease {
    match r {
        Release::Completed => AppvssRelease::Completed,
        Release::Aborted => AppvssRelease::Aborted,
        Release::Timeout => AppvssRelease::Timeout,
        Release::MaxHoldElapsed => AppvssRelease::MaxHold,
        Release::Disconnected => AppvssRelease::Disconnected,
        _ => AppvssRelease::Closed,
    }
}

impl AppvssClient {
    fn next_event(&self, timeout_ms: c_int) -> Result<AppvssEvent, Error> {
        let ev = {
            let mut events = lock(&self.events);
            if timeout_ms < 0 {
                Some(events.next_event()?)
            } else {
                events.next_event_timeout(Duration::from_millis(timeout_ms as u64))?
            }
        };
        let mut out = AppvssEvent::none();
        let Some(ev) = ev else { return Ok(out) };
        let mut pending = lock(&self.pending);
        match ev {
            Event::Connected { app_id, version } => {
                out.kind = AppvssEventKind::Connected;
                out.app_id = app_id;
                out.version = version;
            }
            Event::Disconnected(e) => {
                set_error(chain(e));
                out.kind = AppvssEventKind::Disconnected;
            }
            Event::Prepare(req) => {
                out.kind = AppvssEventKind::Prepare;
                out.freeze_id = req.freeze_id();
                out.deadline_ms = ms_until(req.deadline());
                pending.prepare.insert(req.freeze_id(), req);
            }
            Event::Freeze(req) => {
                out.kind = AppvssEventKind::Freeze;
                out.freeze_id = req.freeze_id();
                out.deadline_ms = ms_until(req.deadline());
                out.max_hold_ms = ms_until(req.max_hold());
                pending.freeze.insert(req.freeze_id(), req);
            }
            Event::Thaw(t) => {
                out.kind = AppvssEventKind::Thaw;
                out.freeze_id = t.freeze_id;
                out.release = release_code(t.release);
                // The freeze is over: unanswered requests are moot (the client sends nothing
                // for an ended freeze), and dropping the hold acknowledges the THAW.
                pending.prepare.remove(&t.freeze_id);
                pending.freeze.remove(&t.freeze_id);
                pending.holds.remove(&t.freeze_id);
            }
        }
        Ok(out)
    }
}

/// Registers with vssd as `name` (1 to 128 bytes of UTF-8, for vssd's reports) on `socket`
/// (NULL: `$APPVSS_SOCKET`, else `/run/vssd/appvss.sock`).
///
/// Returns at once: the library connects in the background, retries with backoff while
/// vssd is not there, and reconnects when vssd restarts; `APPVSS_EVENT_KIND_CONNECTED` says when
/// it is registered. Returns NULL on a bad argument (`appvss_last_error()` says which).
/// Close the handle with `appvss_close`.
///
/// # Safety
/// `name` and `socket` are NULL or NUL-terminated strings, readable during the call.
#[no_mangle]
pub unsafe extern "C" fn appvss_connect(name: *const c_char, socket: *const c_char) -> *mut AppvssClient {
    guarded(std::ptr::null_mut(), || {
        // SAFETY: the header's contract: `name` and `socket` are NULL or NUL-terminated
        // strings, valid during this call.
        let (name, socket) = match unsafe { (opt_str(name), opt_str(socket)) } {
            (Ok(Some(n)), Ok(s)) => (n, s),
            (Ok(None), _) => {
                set_error("appvss_connect: name is NULL");
                return std::ptr::null_mut();
            }
            _ => {
                set_error("appvss_connect: name or socket is not valid UTF-8");
                return std::ptr::null_mut();
            }
        };
        let mut options = Options::new(name);
        if let Some(s) = socket {
            options = options.socket(s);
        }
        match blocking::Client::connect(options) {
            Ok(c) => {
                Box::into_raw(Box::new(AppvssClient { events: Mutex::new(c), pending: Mutex::new(Pending::default()) }))
            }
            Err(e) => {
                set_error(chain(e));
                std::ptr::null_mut()
            }
        }
    })
}

/// # Safety
/// `client` is NULL or a handle from `appvss_connect` not yet closed.
unsafe fn handle<'a>(client: *const AppvssClient) -> Option<&'a AppvssClient> {
    // SAFETY: by the header's contract a non-NULL `client` came from `Box::into_raw` in
    // `appvss_connect` and `appvss_close` has not freed it; `as_ref` handles NULL.
    unsafe { client.as_ref() }
}

/// Waits up to `timeout_ms` (negative: forever, 0: just look) for the next event and writes it
/// to `*event`.
///
/// Returns 1 with an event, 0 when none came in time (`event->kind` is `APPVSS_EVENT_KIND_NONE`),
/// or an `APPVSS_ERR_*` code: `APPVSS_ERR_STOPPED` when the client has stopped for good
/// (`appvss_last_error()` says why).
///
/// Keep calling it while holding: the `APPVSS_EVENT_KIND_THAW` that ends the hold comes here.
/// Safe to call from one thread while another answers.
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`; `event` is NULL or points to
/// writable memory for one `appvss_event`.
#[no_mangle]
pub unsafe extern "C" fn appvss_next_event(
    client: *mut AppvssClient,
    timeout_ms: c_int,
    event: *mut AppvssEvent,
) -> c_int {
    guarded(APPVSS_ERR_PANIC, || {
        // SAFETY: the contract of `handle`, which the header states for every function.
        let Some(c) = (unsafe { handle(client) }) else {
            set_error("appvss_next_event: client is NULL");
            return APPVSS_ERR_INVALID;
        };
        if event.is_null() {
            set_error("appvss_next_event: event is NULL");
            return APPVSS_ERR_INVALID;
        }
        let (code, ev) = match c.next_event(timeout_ms) {
            Ok(ev) => (c_int::from(ev.kind != AppvssEventKind::None), ev),
            Err(e) => {
                set_error(chain(e));
                (APPVSS_ERR_STOPPED, AppvssEvent::none())
            }
        };
        // SAFETY: non-NULL, and the header's contract: `event` points to writable memory for
        // one `appvss_event` (alignment as C gives it to a struct of that type).
        unsafe { event.write(ev) };
        code
    })
}

/// Runs `f` on the handle's pending requests, under `guarded`.
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`.
unsafe fn answer(
    client: *mut AppvssClient,
    what: &str,
    f: impl FnOnce(&mut Pending) -> Result<(), &'static str>,
) -> c_int {
    guarded(APPVSS_ERR_PANIC, || {
        // SAFETY: the contract of `handle`, which the header states for every function.
        let Some(c) = (unsafe { handle(client) }) else {
            set_error(format!("{what}: client is NULL"));
            return APPVSS_ERR_INVALID;
        };
        match f(&mut lock(&c.pending)) {
            Ok(()) => APPVSS_OK,
            Err(why) => {
                set_error(format!("{what}: {why}"));
                APPVSS_ERR_NO_REQUEST
            }
        }
    })
}

/// Reads a reason; NULL or invalid UTF-8 still gives a usable text.
///
/// # Safety
/// As [`opt_str`].
unsafe fn reason(p: *const c_char) -> String {
    if p.is_null() {
        return "(no reason given)".into();
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string valid for this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

const NO_PREPARE: &str = "no PREPARE with this freeze_id waits for an answer";
const NO_FREEZE: &str = "no FREEZE with this freeze_id waits for an answer";

/// Answers the PREPARE of `freeze_id`: the app can freeze.
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`.
#[no_mangle]
pub unsafe extern "C" fn appvss_ready(client: *mut AppvssClient, freeze_id: u64) -> c_int {
    let f = |p: &mut Pending| p.prepare.remove(&freeze_id).map(PrepareRequest::ready).ok_or(NO_PREPARE);
    // SAFETY: this function's contract for `client` is `answer`'s.
    unsafe { answer(client, "appvss_ready", f) }
}

/// Answers the PREPARE of `freeze_id`: the app cannot freeze now, because of `reason` (a
/// NUL-terminated string for vssd's report; NULL allowed).
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`; `reason` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn appvss_veto(client: *mut AppvssClient, freeze_id: u64, reason: *const c_char) -> c_int {
    // SAFETY: this function's contract: `reason` is NULL or a NUL-terminated string.
    let reason = unsafe { self::reason(reason) };
    let f = |p: &mut Pending| p.prepare.remove(&freeze_id).map(|r| r.veto(reason)).ok_or(NO_PREPARE);
    // SAFETY: this function's contract for `client` is `answer`'s.
    unsafe { answer(client, "appvss_veto", f) }
}

/// Answers the FREEZE of `freeze_id`: flushed, and holding from now on (no writes) until the
/// `APPVSS_EVENT_KIND_THAW` of this freeze_id.
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`.
#[no_mangle]
pub unsafe extern "C" fn appvss_held(client: *mut AppvssClient, freeze_id: u64) -> c_int {
    let f = |p: &mut Pending| {
        let req = p.freeze.remove(&freeze_id).ok_or(NO_FREEZE)?;
        p.holds.insert(freeze_id, req.held());
        Ok(())
    };
    // SAFETY: this function's contract for `client` is `answer`'s.
    unsafe { answer(client, "appvss_held", f) }
}

/// Answers the FREEZE of `freeze_id`: could not flush, because of `reason` (NULL allowed).
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`; `reason` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn appvss_failed(client: *mut AppvssClient, freeze_id: u64, reason: *const c_char) -> c_int {
    // SAFETY: this function's contract: `reason` is NULL or a NUL-terminated string.
    let reason = unsafe { self::reason(reason) };
    let f = |p: &mut Pending| p.freeze.remove(&freeze_id).map(|r| r.failed(reason)).ok_or(NO_FREEZE);
    // SAFETY: this function's contract for `client` is `answer`'s.
    unsafe { answer(client, "appvss_failed", f) }
}

/// Closes the connection (vssd counts the app as released) and frees the handle. Unanswered
/// requests are answered `veto` / `failed` first. NULL is allowed. The handle must not be used
/// afterwards, nor be in use by another thread.
///
/// # Safety
/// `client` is NULL or a live handle from `appvss_connect`, which no other thread uses; it is
/// freed.
#[no_mangle]
pub unsafe extern "C" fn appvss_close(client: *mut AppvssClient) {
    guarded((), || {
        if client.is_null() {
            return;
        }
        // SAFETY: by the header's contract `client` came from `Box::into_raw` in
        // `appvss_connect`, is closed only once, and no other call uses it any more.
        let c = unsafe { Box::from_raw(client) };
        // Answers go out before the connection closes: requests first, then the client.
        let AppvssClient { events, pending } = *c;
        drop(pending);
        drop(events);
    })
}

/// The last error on this thread, as text ("" if none). Valid until the next appvss call on
/// the same thread; never NULL.
#[no_mangle]
pub extern "C" fn appvss_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of an `appvss_release` value ("completed", "aborted", "timeout", "max-hold",
/// "disconnected", "closed", "none"); "unknown" for others. A static string.
#[no_mangle]
pub extern "C" fn appvss_release_str(release: c_int) -> *const c_char {
    let s: &'static CStr = match release {
        0 => c"none",
        1 => c"completed",
        2 => c"aborted",
        3 => c"timeout",
        4 => c"max-hold",
        5 => c"disconnected",
        6 => c"closed",
        _ => c"unknown",
    };
    s.as_ptr()
}

/// The name of an `appvss_event_kind` value ("none", "connected", "disconnected", "prepare",
/// "freeze", "thaw"); "unknown" for others. A static string.
#[no_mangle]
pub extern "C" fn appvss_event_kind_str(kind: c_int) -> *const c_char {
    let s: &'static CStr = match kind {
        0 => c"none",
        1 => c"connected",
        2 => c"disconnected",
        3 => c"prepare",
        4 => c"freeze",
        5 => c"thaw",
        _ => c"unknown",
    };
    s.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_version_in_the_header_is_the_crates() {
        assert_eq!(APPVSS_PROTOCOL_VERSION, crate::proto::PROTOCOL_VERSION);
    }

    #[test]
    fn release_names_match_the_rust_names() {
        for r in [
            Release::Completed,
            Release::Aborted,
            Release::Timeout,
            Release::MaxHoldElapsed,
            Release::Disconnected,
            Release::ClientClosed,
        ] {
            // SAFETY: appvss_release_str returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(appvss_release_str(release_code(r) as c_int)) };
            assert_eq!(name.to_str().unwrap(), r.as_str());
        }
    }

    #[test]
    fn bad_arguments_are_errors_not_crashes() {
        // SAFETY: NULL and static NUL-terminated strings are within every function's contract.
        unsafe {
            assert!(appvss_connect(std::ptr::null(), std::ptr::null()).is_null());
            let msg = CStr::from_ptr(appvss_last_error()).to_str().unwrap().to_string();
            assert!(msg.contains("name is NULL"), "{msg}");
            assert!(appvss_connect(c"".as_ptr(), std::ptr::null()).is_null());
            let msg = CStr::from_ptr(appvss_last_error()).to_str().unwrap().to_string();
            assert!(msg.contains("invalid application name"), "{msg}");
            let mut ev = AppvssEvent::none();
            assert_eq!(appvss_next_event(std::ptr::null_mut(), 0, &mut ev), APPVSS_ERR_INVALID);
            assert_eq!(appvss_ready(std::ptr::null_mut(), 1), APPVSS_ERR_INVALID);
            appvss_close(std::ptr::null_mut());
        }
    }

    #[test]
    fn answering_nothing_is_an_error_naming_the_function() {
        // SAFETY: `c` is a live handle until appvss_close; strings are static and NUL-terminated.
        unsafe {
            let c = appvss_connect(c"unit".as_ptr(), c"/nonexistent/appvss.sock".as_ptr());
            assert!(!c.is_null());
            assert_eq!(appvss_held(c, 7), APPVSS_ERR_NO_REQUEST);
            let msg = CStr::from_ptr(appvss_last_error()).to_str().unwrap().to_string();
            assert!(msg.starts_with("appvss_held: no FREEZE"), "{msg}");
            let mut ev = AppvssEvent::none();
            assert_eq!(appvss_next_event(c, 0, &mut ev), 0);
            assert_eq!(ev.kind, AppvssEventKind::None);
            appvss_close(c);
        }
    }
}
