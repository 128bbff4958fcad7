//! The watchdogs that make every freeze end: the freeze deadline, and the grace after the
//! channel that froze goes away.
//!
//! Invariants: each timer is armed for one freeze generation and acts only if that freeze is
//! still in force when it fires (a timer of an earlier freeze never thaws a later one); the
//! grace timer also stands down if the owner channel came back in time. Timers run on tokio's
//! clock, so tests drive them on a paused one.

use std::sync::Arc;

use tracing::warn;

use super::Agent;
use crate::engine::AutoThawReason;

impl Agent {
    /// Thaws freeze `generation` at `deadline` unless it has ended by then.
    pub(super) fn arm_deadline(self: &Arc<Self>, generation: u64, deadline: tokio::time::Instant) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            me.auto_thaw(generation, AutoThawReason::Deadline).await;
        });
    }

    /// A channel connection went away (EOF, error, host disconnected). If it owns the freeze
    /// in force, that freeze thaws after the grace unless the channel comes back.
    pub fn channel_closed(self: &Arc<Self>, id: u64) {
        self.prepared_channel_closed(id);
        let generation = {
            let mut inner = self.lock();
            inner.disconnected.insert(id);
            match inner.life.frozen() {
                Some(s) if s.owner == Some(id) => s.generation,
                _ => {
                    // Not the owner of a freeze: nothing to remember.
                    inner.disconnected.remove(&id);
                    return;
                }
            }
        };
        let grace = self.cfg.channel_drop_grace();
        warn!(channel = id, grace_s = grace.as_secs_f64(), "the channel that froze closed; thawing unless it returns");
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            me.auto_thaw(generation, AutoThawReason::ChannelClosed).await;
            me.lock().disconnected.remove(&id);
        });
    }

    /// A persistent channel (virtio-serial) is connected again.
    pub fn channel_reopened(&self, id: u64) {
        self.lock().disconnected.remove(&id);
    }
}
