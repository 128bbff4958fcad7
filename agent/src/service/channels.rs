//! What a channel other than QGA needs from the agent: whose freeze is in force (so that a
//! channel thaws only its own), and a prepare-only round of the apps (Hyper-V's HOT_BACKUP:
//! "may the host take an online backup?").
//!
//! Invariant: every app that got PREPARE in a prepare-only round gets THAW (aborted) before
//! the round returns; nothing is frozen by it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use appvss_proto::ThawReason;
use tracing::info;

use super::Agent;
use crate::apps::{Answer, AppReport};
use crate::engine::Lifecycle;

/// What a prepare-only round found.
#[derive(Debug, Clone)]
pub enum PrepareRound {
    /// No app is registered (or vssd serves none): nothing to ask.
    NoApps,
    /// Not asked: a freeze is in progress or in force (its apps hold already).
    Busy(&'static str),
    /// Every registered app's answer to PREPARE.
    Asked(Vec<AppReport>),
}

impl PrepareRound {
    /// The first app that vetoed, if one did.
    pub fn veto(&self) -> Option<&AppReport> {
        match self {
            PrepareRound::Asked(r) => r.iter().find(|r| r.outcome == Answer::Vetoed),
            _ => None,
        }
    }

    /// The first app that did not answer READY (vetoed, failed, late, gone).
    pub fn not_ready(&self) -> Option<&AppReport> {
        match self {
            PrepareRound::Asked(r) => r.iter().find(|r| r.outcome != Answer::Ready),
            _ => None,
        }
    }
}

impl Agent {
    /// The channel the freeze in force is bound to: None when nothing is frozen, Some(None)
    /// when it is frozen but bound to no channel.
    pub fn frozen_owner(&self) -> Option<Option<u64>> {
        self.lock().life.frozen().map(|s| s.owner)
    }

    /// PREPARE to every registered app, then THAW (aborted) to each that was asked: a
    /// question, with nothing frozen. Under the operation lock, so it never overlaps a freeze
    /// or thaw; while something is frozen it asks nobody.
    pub async fn prepare_round(self: &Arc<Self>) -> PrepareRound {
        let _op = self.op.lock().await;
        let Some(apps) = self.apps.as_ref().filter(|a| a.count() > 0) else {
            return PrepareRound::NoApps;
        };
        {
            let inner = self.lock();
            if !matches!(inner.life, Lifecycle::Thawed) {
                return PrepareRound::Busy(inner.life.name());
            }
        }
        // The apps are already PREPAREd for a freeze another channel announced.
        if self.is_prepared() {
            return PrepareRound::Busy("prepared");
        }
        // Its own id, from the freezes' sequence, so an app never mixes it up with a freeze.
        let id = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let answers = apps.prepare(id, self.cfg.app_prepare_deadline()).await;
        let asked: Vec<u64> = answers.iter().filter(|r| r.outcome != Answer::Disconnected).map(|r| r.app_id).collect();
        if !asked.is_empty() {
            apps.thaw(&asked, id, ThawReason::Aborted);
        }
        info!(
            apps = answers.len(),
            ready = answers.iter().filter(|r| r.outcome == Answer::Ready).count(),
            "prepare-only round done; apps released"
        );
        PrepareRound::Asked(answers)
    }
}
