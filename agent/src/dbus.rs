//! vssd on D-Bus: the well-known name `org.vssd.Agent`, one object `/org/vssd/Agent`, the
//! interface `org.vssd.Agent1`.
//!
//! Properties (read by anyone the bus policy lets in):
//! - `State` (s): `thawed`, `freezing`, `frozen` or `thawing`, as the agent's lifecycle names them;
//! - `FrozenFilesystems` (as): the mount points frozen now;
//! - `SecondsUntilAutoThaw` (d): until the freeze deadline thaws by itself; 0 when not frozen.
//!   It counts down continuously, so it emits no `PropertiesChanged` (EmitsChangedSignal
//!   false): read it; `State` says when a countdown starts and ends;
//! - `LastFreezeReport` (s): the last freeze's report, the JSON `vssd-freeze` returns ("" before
//!   the first);
//! - `RegisteredApps` (as): the names of the applications registered (appvss), one per
//!   registration.
//!
//! Signals: `Frozen(s report)`, `Thawed(s report)` (a thaw on request; the `vssd-thaw` JSON),
//! `AutoThawed(s reason)` (vssd thawed by itself: `deadline`, `channel-closed`, `shutdown`),
//! and `PropertiesChanged` for every property but the countdown.
//!
//! Methods (root only: `packaging/dbus/org.vssd.Agent.conf`, and vssd checks the caller's uid
//! too): `Plan(as mountpoints) → s` (the `vssd-plan` JSON), `Freeze(as mountpoints, d
//! deadline_seconds) → s` (the `vssd-freeze` report; no mount points: all eligible; deadline 0:
//! the configured one), `Thaw() → s` (the `vssd-thaw` report). They go through the same
//! `service::Agent` calls as the QGA commands, on the agent's own runtime.
//!
//! Invariant: D-Bus is never on the freeze path. The connection lives on a thread of its own
//! with its own runtime; the agent's events reach it through a bounded queue that drops (and
//! counts) what does not fit (`service::Agent::subscribe`), so a missing, dead, slow or stopped
//! bus costs a freeze nothing. A bus that is missing at start, or goes away, is logged once
//! and tried again every [`RETRY`]; it is never fatal. The properties are kept from the events
//! and checked against the agent every [`RESYNC`], so dropped events cost signals, not truth.
//! Nothing is sent to the bus while a freeze or thaw is in progress (up to [`HOLD`]) nor in
//! the [`QUIET`] after an event, so the bus's CPU never competes with FIFREEZE, FITHAW or the
//! host reading its reply. A Freeze by D-Bus ends by Thaw or its deadline only (no channel
//! owns it). The AutoThawed(shutdown) of a stopping vssd may not reach the bus before exit.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};
use zbus::object_server::SignalEmitter;
use zbus::{fdo, interface};

use crate::service::{Agent, Event, FreezeRequest};

/// The well-known name.
pub const NAME: &str = "org.vssd.Agent";
/// The one object.
pub const PATH: &str = "/org/vssd/Agent";
/// How often a missing bus is tried again.
pub const RETRY: Duration = Duration::from_secs(10);
/// How often the properties are checked against the agent (and the registered apps read).
pub const RESYNC: Duration = Duration::from_secs(1);
/// How long the announcement of a freeze or thaw in progress waits for its end.
pub const HOLD: Duration = Duration::from_secs(2);
/// How long after an event the bus waits for more before it announces them.
pub const QUIET: Duration = Duration::from_millis(25);
/// Events queued for the bus at most; more are dropped and counted.
pub const QUEUE: usize = 64;

/// What the properties show, kept from the events.
#[derive(Debug, Clone, Default, PartialEq)]
struct View {
    state: String,
    frozen: Vec<String>,
    last_report: String,
    apps: Vec<String>,
}

/// The exported interface.
struct Agent1 {
    agent: Arc<Agent>,
    /// The agent's runtime: freezes and thaws run there, as the QGA commands do (the deadline
    /// timer a freeze arms must live on it, not on the bus's runtime).
    main: tokio::runtime::Handle,
    view: Arc<Mutex<View>>,
}

fn lock(v: &Mutex<View>) -> std::sync::MutexGuard<'_, View> {
    v.lock().unwrap_or_else(|p| p.into_inner())
}

fn failed(e: impl Into<anyhow::Error>) -> fdo::Error {
    fdo::Error::Failed(format!("{:#}", e.into()))
}

/// Defence in depth behind the bus policy: only root may act.
async fn require_root(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>) -> fdo::Result<()> {
    let sender = hdr.sender().ok_or_else(|| fdo::Error::AccessDenied("no sender".into()))?;
    let uid = fdo::DBusProxy::new(conn).await?.get_connection_unix_user(sender.clone().into()).await?;
    if uid != 0 {
        return Err(fdo::Error::AccessDenied(format!("vssd's methods are for root only (caller uid {uid})")));
    }
    Ok(())
}

#[interface(name = "org.vssd.Agent1")]
impl Agent1 {
    #[zbus(property)]
    fn state(&self) -> String {
        lock(&self.view).state.clone()
    }

    #[zbus(property)]
    fn frozen_filesystems(&self) -> Vec<String> {
        lock(&self.view).frozen.clone()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn seconds_until_auto_thaw(&self) -> f64 {
        let s = self.agent.status_json();
        match s["deadline-in-ms"].as_u64() {
            Some(ms) if s["state"] == "frozen" => ms as f64 / 1000.0,
            _ => 0.0,
        }
    }

    #[zbus(property)]
    fn last_freeze_report(&self) -> String {
        lock(&self.view).last_report.clone()
    }

    #[zbus(property)]
    fn registered_apps(&self) -> Vec<String> {
        lock(&self.view).apps.clone()
    }

    /// What a freeze of `mountpoints` (none: all) would do, and why: the `vssd-plan` JSON.
    async fn plan(
        &self,
        mountpoints: Vec<String>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &hdr).await?;
        let agent = self.agent.clone();
        let only = (!mountpoints.is_empty()).then(|| mountpoints.into_iter().map(Into::into).collect());
        let plan = tokio::task::spawn_blocking(move || agent.plan(only)).await.map_err(failed)?.map_err(failed)?;
        let mounts: Vec<_> =
            plan.mounts.iter().map(|m| crate::service::mount_report(m, m.outcome.name(), None)).collect();
        let v =
            serde_json::json!({ "mounts": mounts, "outside-scope": plan.outside_scope, "levels": plan.levels.len() });
        Ok(v.to_string())
    }

    /// Freezes `mountpoints` (none: every eligible one) until Thaw or `deadline_seconds` (0:
    /// the configured deadline); the `vssd-freeze` report.
    async fn freeze(
        &self,
        mountpoints: Vec<String>,
        deadline_seconds: f64,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &hdr).await?;
        let deadline = match deadline_seconds {
            0.0 => None,
            d if d > 0.0 && d <= 86_400.0 => Some(Duration::from_secs_f64(d)),
            d => {
                return Err(fdo::Error::InvalidArgs(format!(
                    "deadline_seconds {d} must be 0 (the default) or up to 86400"
                )))
            }
        };
        let req = FreezeRequest {
            mountpoints: (!mountpoints.is_empty()).then(|| mountpoints.into_iter().map(Into::into).collect()),
            deadline,
            ..FreezeRequest::default()
        };
        let agent = self.agent.clone();
        let report = self.main.spawn(async move { agent.freeze(req).await }).await.map_err(failed)?.map_err(failed)?;
        Ok(serde_json::to_string(&report).expect("report serialises"))
    }

    /// Thaws; the `vssd-thaw` report.
    async fn thaw(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &hdr).await?;
        let agent = self.agent.clone();
        let r = self.main.spawn(async move { agent.thaw().await }).await.map_err(failed)?.map_err(failed)?;
        Ok(serde_json::to_string(&r).expect("report serialises"))
    }

    #[zbus(signal)]
    async fn frozen(emitter: &SignalEmitter<'_>, report: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn thawed(emitter: &SignalEmitter<'_>, report: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn auto_thawed(emitter: &SignalEmitter<'_>, reason: &str) -> zbus::Result<()>;
}

/// Where to connect: a bus address (tests: a private dbus-daemon), or None for the system bus.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub address: Option<String>,
}

/// Starts the D-Bus thread. Call from inside the agent's runtime. Never fails the agent: a
/// thread that cannot start is logged.
pub fn spawn(agent: Arc<Agent>, settings: Settings) {
    let main = tokio::runtime::Handle::current();
    let sub = agent.subscribe(QUEUE);
    let started = std::thread::Builder::new().name("vssd-dbus".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build() {
            Ok(rt) => rt,
            Err(e) => return warn!(error = %e, "no D-Bus: cannot start its runtime"),
        };
        rt.block_on(Bus { agent, main, settings, sub, view: Arc::default() }.run());
    });
    if let Err(e) = started {
        warn!(error = %e, "no D-Bus: cannot start its thread");
    }
}

struct Bus {
    agent: Arc<Agent>,
    main: tokio::runtime::Handle,
    settings: Settings,
    sub: crate::service::Subscription,
    view: Arc<Mutex<View>>,
}

impl Bus {
    fn where_(&self) -> String {
        self.settings.address.clone().unwrap_or_else(|| "the system bus".into())
    }

    async fn run(mut self) {
        *lock(&self.view) = self.live(String::new());
        let mut warned = false;
        loop {
            match self.connect().await {
                Ok(conn) => {
                    info!(bus = %self.where_(), name = NAME, "serving on D-Bus");
                    warned = false;
                    self.serve(&conn).await;
                    warn!(bus = %self.where_(), retry_s = RETRY.as_secs(), "D-Bus connection lost; trying again (freezes are not affected)");
                }
                Err(e) if !warned => {
                    warned = true;
                    warn!(bus = %self.where_(), error = %e, retry_s = RETRY.as_secs(), "no D-Bus; trying again (freezes are not affected)");
                }
                Err(e) => debug!(bus = %self.where_(), error = %e, "still no D-Bus"),
            }
            // Keep the view current while away, so the next connection starts right.
            let until = tokio::time::Instant::now() + RETRY;
            loop {
                match tokio::time::timeout_at(until, self.sub.events.recv()).await {
                    Ok(Some(ev)) => {
                        self.apply(&ev);
                    }
                    Ok(None) => {
                        tokio::time::sleep_until(until).await;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }

    async fn connect(&self) -> zbus::Result<zbus::Connection> {
        let b = match &self.settings.address {
            Some(a) => zbus::connection::Builder::address(a.as_str())?,
            None => zbus::connection::Builder::system()?,
        };
        let iface = Agent1 { agent: self.agent.clone(), main: self.main.clone(), view: self.view.clone() };
        b.name(NAME)?.serve_at(PATH, iface)?.build().await
    }

    /// Updates the view for `ev`; what changed, for PropertiesChanged.
    fn apply(&self, ev: &Event) -> Changed {
        let mut v = lock(&self.view);
        let before = v.clone();
        v.state = ev.state().to_string();
        match ev {
            Event::Frozen(r) => {
                v.frozen = r.mounts.iter().filter(|m| m.outcome == "frozen").map(|m| m.mountpoint.clone()).collect();
                v.last_report = serde_json::to_string(&**r).unwrap_or_default();
            }
            Event::NotFrozen(Some(r)) => {
                v.frozen.clear();
                v.last_report = serde_json::to_string(&**r).unwrap_or_default();
            }
            Event::NotFrozen(None) | Event::Thawed(_) | Event::AutoThawed(_) => v.frozen.clear(),
            Event::Freezing | Event::Thawing => {}
        }
        Changed::between(&before, &v)
    }

    /// The view as the agent has it now (the last report is only in the events).
    fn live(&self, last_report: String) -> View {
        let s = self.agent.status_json();
        let strings = |v: &serde_json::Value, key: Option<&str>| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| key.map_or(Some(x), |k| x.get(k)))
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        View {
            state: s["state"].as_str().unwrap_or("thawed").to_string(),
            frozen: strings(&s["frozen"], None),
            last_report,
            apps: strings(&s["apps"], Some("name")),
        }
    }

    async fn serve(&mut self, conn: &zbus::Connection) {
        let iface = match conn.object_server().interface::<_, Agent1>(PATH).await {
            Ok(i) => i,
            Err(e) => return warn!(error = %e, "D-Bus object missing"),
        };
        let emitter = iface.signal_emitter().clone();
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut dropped = self.sub.dropped.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                _ = conn.closed() => return,
                ev = self.sub.events.recv() => {
                    let Some(ev) = ev else { return };
                    for (changed, ev) in self.settle(ev).await {
                        if let Err(e) = self.announce(&emitter, changed, &ev).await {
                            crate::warn_limited!(error = %e, "cannot send a D-Bus signal");
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = self.sub.dropped.load(Ordering::Relaxed);
                    if now != dropped {
                        warn!(dropped = now, "D-Bus was too slow for the agent's events; signals were dropped");
                        dropped = now;
                    }
                    let last = lock(&self.view).last_report.clone();
                    let live = self.live(last);
                    // Only with no event pending: an event sent before this read is in the
                    // queue, and newer than what a resync could say.
                    if !self.sub.events.is_empty() {
                        continue;
                    }
                    let changed = {
                        let mut v = lock(&self.view);
                        let c = Changed::between(&v, &live);
                        *v = live;
                        c
                    };
                    if let Err(e) = changed.send(&emitter).await {
                        crate::warn_limited!(error = %e, "cannot send D-Bus PropertiesChanged");
                    }
                }
            }
        }
    }

    /// `ev` and the events that follow it closely, each with what it changed. Nothing goes
    /// to the bus while filesystems freeze or thaw (a freeze or thaw in progress waits for its
    /// end, up to [`HOLD`]), nor in the [`QUIET`] after an event, when the host is reading its
    /// answer: the bus's CPU time (ours and the daemon's) never competes with FIFREEZE, FITHAW
    /// or the reply. The signals still go out in order.
    async fn settle(&mut self, ev: Event) -> Vec<(Changed, Event)> {
        let start = tokio::time::Instant::now();
        let mut out = vec![(self.apply(&ev), ev)];
        loop {
            let busy = matches!(out.last(), Some((_, Event::Freezing | Event::Thawing)));
            let until = if busy { start + HOLD } else { (tokio::time::Instant::now() + QUIET).min(start + HOLD) };
            match tokio::time::timeout_at(until, self.sub.events.recv()).await {
                Ok(Some(next)) => out.push((self.apply(&next), next)),
                _ => break,
            }
        }
        out
    }

    async fn announce(&self, emitter: &SignalEmitter<'static>, changed: Changed, ev: &Event) -> zbus::Result<()> {
        changed.send(emitter).await?;
        match ev {
            Event::Frozen(r) => Agent1::frozen(emitter, &serde_json::to_string(&**r).unwrap_or_default()).await,
            Event::Thawed(r) => Agent1::thawed(emitter, &serde_json::to_string(&**r).unwrap_or_default()).await,
            Event::AutoThawed(r) => {
                let reason = serde_json::to_value(r.reason).ok().and_then(|v| v.as_str().map(String::from));
                Agent1::auto_thawed(emitter, reason.as_deref().unwrap_or("unknown")).await
            }
            _ => Ok(()),
        }
    }
}

/// Which properties changed between two views, and their values then (a later event may
/// have moved the view on by the time this is sent).
#[derive(Debug, Default, Clone, PartialEq)]
struct Changed {
    state: bool,
    frozen: bool,
    last_report: bool,
    apps: bool,
    then: View,
}

impl Changed {
    fn between(a: &View, b: &View) -> Changed {
        Changed {
            state: a.state != b.state,
            frozen: a.frozen != b.frozen,
            last_report: a.last_report != b.last_report,
            apps: a.apps != b.apps,
            then: b.clone(),
        }
    }

    fn any(&self) -> bool {
        self.state || self.frozen || self.last_report || self.apps
    }

    /// One PropertiesChanged with every property that changed.
    async fn send(self, e: &SignalEmitter<'static>) -> zbus::Result<()> {
        use zbus::zvariant::Value;
        if !self.any() {
            return Ok(());
        }
        let mut m: std::collections::HashMap<&str, Value<'_>> = std::collections::HashMap::new();
        if self.state {
            m.insert("State", Value::from(self.then.state.as_str()));
        }
        if self.frozen {
            m.insert("FrozenFilesystems", Value::from(self.then.frozen.clone()));
        }
        if self.last_report {
            m.insert("LastFreezeReport", Value::from(self.then.last_report.as_str()));
        }
        if self.apps {
            m.insert("RegisteredApps", Value::from(self.then.apps.clone()));
        }
        let name = zbus::names::InterfaceName::from_static_str_unchecked("org.vssd.Agent1");
        fdo::Properties::properties_changed(e, name, m, std::borrow::Cow::Borrowed(&[])).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_says_which_properties_changed() {
        let a = View { state: "thawed".into(), ..View::default() };
        let b = View { state: "frozen".into(), frozen: vec!["/a".into()], ..a.clone() };
        let c = Changed::between(&a, &b);
        assert!(c.state && c.frozen && !c.last_report && !c.apps);
        assert_eq!(c.then, b);
        assert!(!Changed::between(&b, &b).any());
    }
}
