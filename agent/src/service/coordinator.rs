//! What a freeze needs from the applications that hold it: the seam between the service and
//! the app coordinator ([`crate::apps::Apps`]), so that the freeze pipeline, its failure
//! paths and its timers are tested with scripted apps, without sockets.
//!
//! Invariants the service relies on (the real coordinator keeps them, a fake must too):
//! `prepare` and `freeze` answer for every app they asked, by the deadline; `thaw` never
//! blocks and never fails (it is called on every exit path of a freeze).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use appvss_proto::ThawReason;

use crate::apps::{Apps, PhaseResult};

/// A future the coordinator returns (boxed: the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The app coordinator as the freeze pipeline sees it.
pub trait AppCoordinator: Send + Sync {
    /// How many apps are registered now (none: the freeze skips the app stage entirely).
    fn count(&self) -> usize;
    /// The ids of the apps registered now, ascending.
    fn ids(&self) -> Vec<u64>;
    /// PREPARE to every registered app.
    fn prepare(&self, freeze_id: u64, deadline: Duration) -> BoxFuture<'_, PhaseResult>;
    /// FREEZE to `apps`, each to hold for at most `max_hold`.
    fn freeze<'a>(
        &'a self,
        apps: &'a [u64],
        freeze_id: u64,
        deadline: Duration,
        max_hold: Duration,
    ) -> BoxFuture<'a, PhaseResult>;
    /// THAW to `apps`; queued, never awaited.
    fn thaw(&self, apps: &[u64], freeze_id: u64, reason: ThawReason);
    /// The registered apps, for `vssd-status`.
    fn list(&self) -> Vec<serde_json::Value>;
}

impl AppCoordinator for Apps {
    fn count(&self) -> usize {
        Apps::count(self)
    }
    fn ids(&self) -> Vec<u64> {
        Apps::ids(self)
    }
    fn prepare(&self, freeze_id: u64, deadline: Duration) -> BoxFuture<'_, PhaseResult> {
        Box::pin(Apps::prepare(self, freeze_id, deadline))
    }
    fn freeze<'a>(
        &'a self,
        apps: &'a [u64],
        freeze_id: u64,
        deadline: Duration,
        max_hold: Duration,
    ) -> BoxFuture<'a, PhaseResult> {
        Box::pin(Apps::freeze(self, apps, freeze_id, deadline, max_hold))
    }
    fn thaw(&self, apps: &[u64], freeze_id: u64, reason: ThawReason) {
        Apps::thaw(self, apps, freeze_id, reason)
    }
    fn list(&self) -> Vec<serde_json::Value> {
        Apps::list(self)
    }
}
