//! systemd supervision (Type=notify), through the `sd-notify` crate: `READY=1` once every
//! channel serves, `STATUS=` in words on every change of the agent's state, `WATCHDOG=1`
//! from the runtime that serves freezes, `STOPPING=1` when asked to stop.
//!
//! Invariants:
//! - Nothing here is on the freeze path: the state comes from the agent's watch channel
//!   ([`Agent::subscribe`]), which the freeze pipeline updates without waiting for anyone.
//! - The runtime never blocks on systemd: a notification is queued (bounded, dropped when
//!   full) to one thread that does the datagram sends, so a stuck service manager costs a
//!   freeze nothing.
//! - A watchdog ping proves that the runtime ran the watchdog task and that the agent's
//!   state lock could be taken just before; a hung vssd stops pinging, systemd kills it, and
//!   its next start thaws what it left (the marker).
//! - Outside systemd (no `NOTIFY_SOCKET`) there is no thread and no task; nothing is fatal.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use vssd::engine::AutoThawReason;
use vssd::service::{Agent, StateView};

/// How often STATUS is refreshed without a state change: the countdown while frozen, the
/// number of registered apps otherwise (registrations are not state changes).
const FROZEN_REFRESH: Duration = Duration::from_secs(1);
const IDLE_REFRESH: Duration = Duration::from_secs(10);

/// Notifications waiting for the sender thread; more are dropped (systemd is stuck anyway).
const QUEUE: usize = 32;

enum Note {
    Ready(String),
    Status(String),
    Watchdog,
    Stopping(String),
    /// Answered once everything queued before it was sent.
    Flush(mpsc::Sender<()>),
}

/// The way to systemd, or nothing outside it.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::SyncSender<Note>>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`; inert when it is not set or the thread cannot start.
    pub fn from_env() -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier { tx: None };
        }
        let (tx, rx) = mpsc::sync_channel::<Note>(QUEUE);
        let spawned = std::thread::Builder::new().name("vssd-notify".into()).spawn(move || {
            let mut failed = false;
            for note in rx {
                let r = match &note {
                    Note::Ready(s) => sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)]),
                    Note::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
                    Note::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    Note::Stopping(s) => sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(s)]),
                    Note::Flush(done) => {
                        let _ = done.send(());
                        Ok(())
                    }
                };
                match r {
                    Err(e) if !failed => {
                        // Once: a service manager that went away would fill the log otherwise.
                        warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); carrying on without");
                        failed = true;
                    }
                    Err(_) => {}
                    Ok(()) => failed = false,
                }
            }
        });
        match spawned {
            Ok(_) => Notifier { tx: Some(tx) },
            Err(e) => {
                warn!(error = %e, "cannot start the systemd notification thread; not notifying");
                Notifier { tx: None }
            }
        }
    }

    fn send(&self, note: Note) {
        if let Some(tx) = &self.tx {
            if tx.try_send(note).is_err() {
                debug!("systemd notification dropped (queue full)");
            }
        }
    }

    /// READY=1, with the first STATUS.
    pub fn ready(&self, status: String) {
        self.send(Note::Ready(status));
    }

    /// STOPPING=1, with what is happening.
    pub fn stopping(&self, status: String) {
        self.send(Note::Stopping(status));
    }

    /// Waits (at most `limit`, blocking) until everything queued so far is sent: before exit.
    pub fn flush(&self, limit: Duration) {
        if let Some(tx) = &self.tx {
            let (done, wait) = mpsc::channel();
            if tx.try_send(Note::Flush(done)).is_ok() {
                let _ = wait.recv_timeout(limit);
            }
        }
    }

    /// Serves STATUS= and, if systemd asked for it (WATCHDOG_USEC), WATCHDOG=1: tasks on the
    /// current runtime, which is the one that serves freezes.
    pub fn spawn(&self, agent: Arc<Agent>) {
        if self.tx.is_none() {
            return;
        }
        if let Some(timeout) = sd_notify::watchdog_enabled() {
            let period = timeout / 2;
            info!(watchdog_ms = timeout.as_millis() as u64, ping_ms = period.as_millis() as u64, "systemd watchdog on");
            tokio::spawn(watchdog(self.clone(), agent.clone(), period));
        }
        tokio::spawn(status_updates(self.clone(), agent));
    }
}

/// WATCHDOG=1 every `period`, each only after the state lock was taken on this runtime.
async fn watchdog(n: Notifier, agent: Arc<Agent>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Blocks (and so stops the pings) if the state lock is stuck.
        let _ = agent.state_view();
        n.send(Note::Watchdog);
    }
}

/// STATUS= whenever the state changes, and as the countdown or the app count moves.
async fn status_updates(n: Notifier, agent: Arc<Agent>) {
    let mut rx = agent.subscribe();
    let mut last = String::new();
    loop {
        let view = rx.borrow_and_update().clone();
        let text = status_text(&view, agent.app_count(), Instant::now());
        if text != last {
            n.send(Note::Status(text.clone()));
            last = text;
        }
        let refresh = if view.state == "frozen" { FROZEN_REFRESH } else { IDLE_REFRESH };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(refresh) => {}
        }
    }
}

/// The state for STATUS= and `systemctl status`, in words:
/// `thawed, 3 apps registered`, `frozen: 5 filesystems, thaw deadline in 42 s`, and the last
/// auto-thaw's reason after a `;` when there was one.
pub fn status_text(view: &StateView, apps: Option<usize>, now: Instant) -> String {
    let mut s = match view.state {
        "frozen" => {
            let fs = plural(view.filesystems, "filesystem");
            match view.deadline {
                Some(d) => {
                    // Whole seconds, rounded up: "in 0 s" only once it is due.
                    let left = d.saturating_duration_since(now);
                    let secs = left.as_millis().div_ceil(1000);
                    format!("frozen: {fs}, thaw deadline in {secs} s")
                }
                None => format!("frozen: {fs}"),
            }
        }
        "thawed" => match apps {
            None => "thawed".to_string(),
            Some(0) => "thawed, no apps registered".to_string(),
            Some(n) => format!("thawed, {} registered", plural(n, "app")),
        },
        other => other.to_string(), // freezing, thawing
    };
    if let Some(r) = view.last_auto_thaw {
        s.push_str("; last auto-thaw: ");
        s.push_str(auto_thaw_words(r));
    }
    s
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn auto_thaw_words(r: AutoThawReason) -> &'static str {
    match r {
        AutoThawReason::Deadline => "the freeze deadline passed",
        AutoThawReason::ChannelClosed => "the channel that froze went away",
        AutoThawReason::RecoveredAfterCrash => "a previous vssd died while frozen",
        AutoThawReason::Shutdown => "vssd was stopped while frozen",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(state: &'static str, filesystems: usize, deadline: Option<Instant>) -> StateView {
        StateView { state, filesystems, deadline, last_auto_thaw: None }
    }

    #[test]
    fn thawed_status_counts_the_registered_apps() {
        let now = Instant::now();
        let v = view("thawed", 0, None);
        assert_eq!(status_text(&v, Some(3), now), "thawed, 3 apps registered");
        assert_eq!(status_text(&v, Some(1), now), "thawed, 1 app registered");
        assert_eq!(status_text(&v, Some(0), now), "thawed, no apps registered");
        assert_eq!(status_text(&v, None, now), "thawed", "apps disabled: nothing to count");
    }

    #[test]
    fn frozen_status_counts_filesystems_and_the_seconds_to_the_auto_thaw() {
        let now = Instant::now();
        let v = view("frozen", 5, Some(now + Duration::from_millis(41_200)));
        assert_eq!(status_text(&v, Some(2), now), "frozen: 5 filesystems, thaw deadline in 42 s");
        let v = view("frozen", 1, Some(now + Duration::from_secs(10)));
        assert_eq!(status_text(&v, None, now), "frozen: 1 filesystem, thaw deadline in 10 s");
        let due = view("frozen", 1, Some(now));
        assert_eq!(status_text(&due, None, now + Duration::from_secs(3)), "frozen: 1 filesystem, thaw deadline in 0 s");
    }

    #[test]
    fn transitional_states_are_named() {
        let now = Instant::now();
        assert_eq!(status_text(&view("freezing", 0, None), Some(1), now), "freezing");
        assert_eq!(status_text(&view("thawing", 0, None), Some(1), now), "thawing");
    }

    #[test]
    fn status_after_an_auto_thaw_says_why() {
        let now = Instant::now();
        let mut v = view("thawed", 0, None);
        v.last_auto_thaw = Some(AutoThawReason::Deadline);
        assert_eq!(
            status_text(&v, Some(0), now),
            "thawed, no apps registered; last auto-thaw: the freeze deadline passed"
        );
        v.last_auto_thaw = Some(AutoThawReason::ChannelClosed);
        assert!(status_text(&v, None, now).ends_with("; last auto-thaw: the channel that froze went away"));
        v.last_auto_thaw = Some(AutoThawReason::RecoveredAfterCrash);
        assert!(status_text(&v, None, now).ends_with("; last auto-thaw: a previous vssd died while frozen"));
    }
}
