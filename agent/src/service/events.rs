//! What the agent tells its observers (the D-Bus task; anything else that shows the state):
//! one [`Event`] per lifecycle transition, with the report that goes with it.
//!
//! Invariant: an observer never slows or blocks a freeze or a thaw. Events go into a bounded
//! queue per observer with `try_send`: a full queue drops the event and counts the drop, a
//! closed one is forgotten. Emitting takes an uncontended mutex over the list of observers and
//! clones an `Arc`; nothing here awaits, allocates per byte of report, or does I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::report::{AutoThaw, FreezeReport, ThawResult};

/// One transition of the freeze lifecycle, as observers see it.
#[derive(Debug, Clone)]
pub enum Event {
    /// A freeze began (thawed → freezing).
    Freezing,
    /// A freeze holds (freezing → frozen): the report the host got.
    Frozen(Arc<FreezeReport>),
    /// A freeze left nothing frozen (freezing → thawed): it failed (None), or found nothing
    /// to freeze (its report).
    NotFrozen(Option<Arc<FreezeReport>>),
    /// A thaw began (frozen → thawing), on request or by vssd itself.
    Thawing,
    /// A thaw on request ended (thawing → thawed): its report, errors included.
    Thawed(Arc<ThawResult>),
    /// vssd thawed by itself (thawing → thawed): why, and what.
    AutoThawed(Arc<AutoThaw>),
}

impl Event {
    /// The lifecycle state after this event, by the names of `engine::Lifecycle::name`.
    pub fn state(&self) -> &'static str {
        match self {
            Event::Freezing => "freezing",
            Event::Frozen(_) => "frozen",
            Event::Thawing => "thawing",
            Event::NotFrozen(_) | Event::Thawed(_) | Event::AutoThawed(_) => "thawed",
        }
    }
}

/// An observer's end: its queue, and how many events did not fit in it.
pub struct Subscription {
    pub events: mpsc::Receiver<Event>,
    pub dropped: Arc<AtomicU64>,
}

/// The agent's list of observers.
#[derive(Default)]
pub(super) struct Observers {
    list: Mutex<Vec<(mpsc::Sender<Event>, Arc<AtomicU64>)>>,
}

impl Observers {
    pub(super) fn subscribe(&self, capacity: usize) -> Subscription {
        let (tx, events) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        self.list.lock().unwrap_or_else(|p| p.into_inner()).push((tx, dropped.clone()));
        Subscription { events, dropped }
    }

    /// Offers `ev` to every observer; never waits.
    pub(super) fn emit(&self, ev: Event) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|(tx, dropped)| match tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_and_a_closed_one_is_forgotten() {
        let o = Observers::default();
        let mut s = o.subscribe(2);
        for _ in 0..5 {
            o.emit(Event::Freezing);
        }
        assert_eq!(s.dropped.load(Ordering::Relaxed), 3);
        assert!(matches!(s.events.try_recv(), Ok(Event::Freezing)));
        drop(s);
        o.emit(Event::Thawing);
        assert!(o.list.lock().unwrap().is_empty());
    }
}
