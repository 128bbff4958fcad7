//! How long the steps of an operation took, in milliseconds: one type for backups, checkpoints
//! and restores.
//!
//! A timing is a named step (`freeze_ms` in a backup's manifest, `downtime-ms` in a
//! checkpoint's: each manifest keeps the names it always had, scripts and benchmarks read
//! them). Each operation declares its steps once (`backup::step`, `checkpoint::step`) and
//! starts from [`Timings::new`] with all of them at 0, so a report names every step even when
//! one did not happen. A step a manifest written by an older vmctl lacks reads as 0.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::util;

/// Milliseconds per step (rounded to 0.01), serialised as one JSON object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timings(BTreeMap<String, f64>);

impl Timings {
    /// Every step of `steps` at 0.
    pub fn new(steps: &[&str]) -> Timings {
        Timings(steps.iter().map(|s| (s.to_string(), 0.0)).collect())
    }

    /// A step's milliseconds (0 when it was not recorded).
    pub fn get(&self, step: &str) -> f64 {
        self.0.get(step).copied().unwrap_or(0.0)
    }

    /// Records a step.
    pub fn set(&mut self, step: &str, ms: f64) {
        self.0.insert(step.to_string(), ms);
    }

    /// Records a step as the time since `t`; returns it.
    pub fn since(&mut self, step: &str, t: Instant) -> f64 {
        let ms = util::ms(t.elapsed());
        self.set(step, ms);
        ms
    }

    /// Keeps the larger of the recorded and `ms` (the longest of parallel parts).
    pub fn raise(&mut self, step: &str, ms: f64) {
        let cur = self.get(step);
        self.set(step, cur.max(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_step_is_reported_and_missing_ones_read_as_zero() {
        let mut t = Timings::new(&["a_ms", "b_ms"]);
        t.set("a_ms", 1.5);
        t.raise("a_ms", 1.0);
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v, serde_json::json!({"a_ms": 1.5, "b_ms": 0.0}));
        let old: Timings = serde_json::from_value(serde_json::json!({"a_ms": 2.0})).unwrap();
        assert_eq!((old.get("a_ms"), old.get("b_ms")), (2.0, 0.0));
    }
}
