//! The freeze engine: carries out a [`Plan`] and undoes it, whatever fails.
//!
//! The lifecycle is an explicit state machine ([`Lifecycle`]): `Thawed → Freezing → Frozen →
//! Thawing → Thawed`, with `Freezing → Thawed` when a freeze fails. Each transition is a
//! method that checks where it comes from.
//!
//! Invariants:
//! - Filesystems of one level freeze in parallel; levels go in order (0 first).
//! - Any freeze failure thaws everything already frozen by this request before returning.
//!   A FIFREEZE call that panicked counts as a failure whose filesystem may be frozen: it is
//!   thawed with the rest (thawing a filesystem that is not frozen is harmless, EINVAL).
//! - Thaw goes in reverse level order, runs to the end and reports every error.
//! - The engine writes nothing itself; the caller records the marker before freezing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::plan::{Plan, PlannedMount};
use crate::workers::Panicked;
use kmod_shim::DevId;

/// The kernel operations the engine needs; real in production, scripted in unit tests.
pub trait Kernel: Send + Sync {
    fn freeze(&self, mount_point: &Path) -> io::Result<()>;
    fn thaw(&self, mount_point: &Path) -> io::Result<()>;
}

/// FIFREEZE / FITHAW through kmod-shim.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealKernel;

/// **Test only**: `VSSD_TEST_FAULT=slow-freeze:MOUNTPOINT:MS` makes FIFREEZE of that mount
/// point wait MS first, so that a root-tier test can hang up or kill vssd between the
/// filesystems of one freeze (one level frozen, the next not yet) on real filesystems. Read
/// once; nothing else sets it.
fn test_slow_freeze() -> Option<&'static (PathBuf, std::time::Duration)> {
    static SLOW: std::sync::OnceLock<Option<(PathBuf, std::time::Duration)>> = std::sync::OnceLock::new();
    SLOW.get_or_init(|| {
        let v = std::env::var("VSSD_TEST_FAULT").ok()?;
        let rest = v.strip_prefix("slow-freeze:")?;
        let (path, ms) = rest.rsplit_once(':')?;
        Some((PathBuf::from(path), std::time::Duration::from_millis(ms.parse().ok()?)))
    })
    .as_ref()
}

impl Kernel for RealKernel {
    fn freeze(&self, mount_point: &Path) -> io::Result<()> {
        if let Some((p, d)) = test_slow_freeze() {
            if p == mount_point {
                std::thread::sleep(*d);
            }
        }
        kmod_shim::freeze::freeze_path(mount_point)
    }
    fn thaw(&self, mount_point: &Path) -> io::Result<()> {
        kmod_shim::freeze::thaw_path(mount_point)
    }
}

/// A filesystem the engine froze.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrozenFs {
    pub mount_point: PathBuf,
    pub fstype: String,
    #[serde(with = "dev_serde")]
    pub dev: DevId,
    pub level: u32,
}

mod dev_serde {
    use kmod_shim::DevId;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(d: &DevId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DevId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How long each filesystem took to freeze, for the report.
#[derive(Debug, Clone)]
pub struct FreezeTiming {
    pub mount_point: PathBuf,
    pub elapsed: Duration,
}

/// Why a freeze failed. Everything frozen before the failure has been thawed again.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("{}; everything frozen was thawed{}", describe_failures(.failures), describe_thaw(.thaw_errors))]
    Failed { failures: Vec<(PathBuf, io::Error)>, thaw_errors: Vec<(PathBuf, io::Error)> },
}

fn explain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EBUSY) => "already frozen by another process (release it with `fsfreeze -u`)".into(),
        Some(libc::EOPNOTSUPP) => "the filesystem does not support freezing".into(),
        Some(libc::EPERM) => "permission denied: freezing needs CAP_SYS_ADMIN (run vssd as root)".into(),
        _ => e.to_string(),
    }
}

fn describe_failures(f: &[(PathBuf, io::Error)]) -> String {
    let parts: Vec<String> = f.iter().map(|(p, e)| format!("cannot freeze {}: {}", p.display(), explain(e))).collect();
    parts.join("; ")
}

fn describe_thaw(t: &[(PathBuf, io::Error)]) -> String {
    if t.is_empty() {
        String::new()
    } else {
        let parts: Vec<String> = t.iter().map(|(p, e)| format!("{}: {e}", p.display())).collect();
        format!(" except: {}", parts.join("; "))
    }
}

/// Result of a thaw: what was thawed and every error met on the way.
#[derive(Debug, Default)]
pub struct ThawReport {
    pub thawed: Vec<PathBuf>,
    pub errors: Vec<(PathBuf, io::Error)>,
}

/// Freezes the plan's filesystems, level by level, each level in parallel.
///
/// On any failure every filesystem frozen so far is thawed and the error lists the failures.
pub fn freeze(kernel: &Arc<dyn Kernel>, plan: &Plan) -> Result<(Vec<FrozenFs>, Vec<FreezeTiming>), FreezeError> {
    let mut frozen: Vec<FrozenFs> = Vec::new();
    let mut timings = Vec::new();
    for level in &plan.levels {
        let targets: Vec<&PlannedMount> = level.iter().map(|&i| &plan.mounts[i]).collect();
        let results = run_parallel(kernel, targets.iter().map(|m| m.mount_point.clone()), |k, p| {
            let t = Instant::now();
            k.freeze(&p).map(|()| t.elapsed())
        });
        let mut failures = Vec::new();
        // Frozen or not, nobody knows: the call panicked.
        let mut unknown = Vec::new();
        for (m, r) in targets.iter().zip(results) {
            let fs =
                FrozenFs { mount_point: m.mount_point.clone(), fstype: m.fstype.clone(), dev: m.dev, level: m.level };
            match r {
                Ok(Ok(elapsed)) => {
                    frozen.push(fs);
                    timings.push(FreezeTiming { mount_point: m.mount_point.clone(), elapsed });
                }
                Ok(Err(e)) => failures.push((m.mount_point.clone(), e)),
                Err(p) => {
                    failures.push((m.mount_point.clone(), io::Error::other(p)));
                    unknown.push(fs);
                }
            }
        }
        if !failures.is_empty() {
            frozen.extend(unknown);
            let report = thaw(kernel, &frozen);
            return Err(FreezeError::Failed { failures, thaw_errors: report.errors });
        }
    }
    Ok((frozen, timings))
}

/// Thaws in reverse level order (each level in parallel), to the end, collecting every error.
/// A filesystem that is not frozen (EINVAL) counts as thawed: someone already thawed it.
pub fn thaw(kernel: &Arc<dyn Kernel>, frozen: &[FrozenFs]) -> ThawReport {
    let mut report = ThawReport::default();
    let max = frozen.iter().map(|f| f.level).max();
    let Some(max) = max else { return report };
    for level in (0..=max).rev() {
        let targets: Vec<&FrozenFs> = frozen.iter().filter(|f| f.level == level).collect();
        let results = run_parallel(kernel, targets.iter().map(|f| f.mount_point.clone()), |k, p| k.thaw(&p));
        for (f, r) in targets.iter().zip(results) {
            match r {
                Ok(Ok(())) => report.thawed.push(f.mount_point.clone()),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => report.thawed.push(f.mount_point.clone()),
                Ok(Err(e)) => report.errors.push((f.mount_point.clone(), e)),
                Err(p) => report.errors.push((f.mount_point.clone(), io::Error::other(p))),
            }
        }
    }
    report
}

/// Runs `f` on every mount point at once, on the worker pool; a call that panicked reports
/// `Err(Panicked)` in its place.
fn run_parallel<R: Send + 'static>(
    kernel: &Arc<dyn Kernel>,
    paths: impl Iterator<Item = PathBuf>,
    f: fn(&dyn Kernel, PathBuf) -> R,
) -> Vec<Result<R, Panicked>> {
    let jobs = paths
        .map(|p| {
            let k = kernel.clone();
            Box::new(move || f(k.as_ref(), p)) as Box<dyn FnOnce() -> R + Send>
        })
        .collect();
    crate::workers::run_all(jobs)
}

/// Why vssd thawed on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoThawReason {
    /// No thaw came before the freeze deadline.
    Deadline,
    /// The channel that asked for the freeze went away and did not come back within the grace.
    ChannelClosed,
    /// A previous vssd died while frozen; this one thawed at start.
    RecoveredAfterCrash,
    /// vssd was asked to stop while frozen.
    Shutdown,
}

/// Where the freeze lifecycle stands.
#[derive(Debug)]
pub enum Lifecycle {
    Thawed,
    Freezing,
    Frozen(FrozenState),
    Thawing,
}

/// What is held while frozen. Times are tokio's, so that the timers that end a freeze can
/// be tested on a paused clock (they are the system's monotonic clock otherwise).
#[derive(Debug, Clone)]
pub struct FrozenState {
    pub filesystems: Vec<FrozenFs>,
    pub since: tokio::time::Instant,
    pub deadline: tokio::time::Instant,
    /// The channel whose disappearance thaws (None: only the deadline does).
    pub owner: Option<u64>,
    /// Increments per freeze, so a timer of an old freeze never thaws a new one; also the
    /// `freeze_id` apps see.
    pub generation: u64,
    /// Apps that got PREPARE for this freeze: each gets THAW.
    pub apps: Vec<u64>,
    /// Hooks whose freeze phase ran: each gets its thaw phase.
    pub hooks: Vec<PathBuf>,
}

/// A transition attempted from the wrong state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransitionError {
    #[error("the filesystems are already frozen; thaw them first")]
    AlreadyFrozen,
    #[error("a freeze or thaw is already in progress")]
    Busy,
    #[error("nothing is being frozen")]
    NotFreezing,
    #[error("nothing is being thawed")]
    NotThawing,
}

impl Lifecycle {
    pub fn name(&self) -> &'static str {
        match self {
            Lifecycle::Thawed => "thawed",
            Lifecycle::Freezing => "freezing",
            Lifecycle::Frozen(_) => "frozen",
            Lifecycle::Thawing => "thawing",
        }
    }

    /// Thawed → Freezing.
    pub fn begin_freeze(&mut self) -> Result<(), TransitionError> {
        match self {
            Lifecycle::Thawed => {
                *self = Lifecycle::Freezing;
                Ok(())
            }
            Lifecycle::Frozen(_) => Err(TransitionError::AlreadyFrozen),
            Lifecycle::Freezing | Lifecycle::Thawing => Err(TransitionError::Busy),
        }
    }

    /// Freezing → Frozen.
    pub fn freeze_done(&mut self, state: FrozenState) -> Result<(), TransitionError> {
        match self {
            Lifecycle::Freezing => {
                *self = Lifecycle::Frozen(state);
                Ok(())
            }
            _ => Err(TransitionError::NotFreezing),
        }
    }

    /// Freezing → Thawed (the freeze failed and undid itself, or froze nothing).
    pub fn freeze_failed(&mut self) -> Result<(), TransitionError> {
        match self {
            Lifecycle::Freezing => {
                *self = Lifecycle::Thawed;
                Ok(())
            }
            _ => Err(TransitionError::NotFreezing),
        }
    }

    /// Frozen → Thawing, handing over what to thaw. From Thawed: `Ok(None)`, nothing to do.
    pub fn begin_thaw(&mut self) -> Result<Option<FrozenState>, TransitionError> {
        match std::mem::replace(self, Lifecycle::Thawing) {
            Lifecycle::Frozen(s) => Ok(Some(s)),
            Lifecycle::Thawed => {
                *self = Lifecycle::Thawed;
                Ok(None)
            }
            other => {
                *self = other;
                Err(TransitionError::Busy)
            }
        }
    }

    /// Thawing → Thawed.
    pub fn thaw_done(&mut self) -> Result<(), TransitionError> {
        match self {
            Lifecycle::Thawing => {
                *self = Lifecycle::Thawed;
                Ok(())
            }
            _ => Err(TransitionError::NotThawing),
        }
    }

    pub fn frozen(&self) -> Option<&FrozenState> {
        match self {
            Lifecycle::Frozen(s) => Some(s),
            _ => None,
        }
    }
}

/// A scripted kernel for tests without root: per-mount FIFREEZE / FITHAW results, a panic
/// on the n-th FIFREEZE, a delay, an observer called at every call; records every call.
#[cfg(test)]
pub(crate) mod fake {
    use super::Kernel;
    use std::collections::HashMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    type Observer = Box<dyn Fn(&str, &Path) + Send + Sync>;

    #[derive(Default)]
    pub struct FakeKernel {
        calls: Mutex<Vec<String>>,
        fail_freeze: HashMap<PathBuf, i32>,
        fail_thaw: HashMap<PathBuf, i32>,
        panic_thaw: Vec<PathBuf>,
        panic_on_freeze: Option<usize>,
        delay: Duration,
        observer: Option<Observer>,
    }

    impl FakeKernel {
        pub fn new() -> Arc<Self> {
            Arc::new(Self::default())
        }
        fn edit(self: Arc<Self>, f: impl FnOnce(&mut Self)) -> Arc<Self> {
            let mut me = Arc::into_inner(self).expect("configure a FakeKernel before sharing it");
            f(&mut me);
            Arc::new(me)
        }
        /// FIFREEZE of `mp` fails with `errno`.
        pub fn fail_freeze(self: Arc<Self>, mp: &str, errno: i32) -> Arc<Self> {
            self.edit(|k| {
                k.fail_freeze.insert(mp.into(), errno);
            })
        }
        /// FITHAW of `mp` fails with `errno`.
        pub fn fail_thaw(self: Arc<Self>, mp: &str, errno: i32) -> Arc<Self> {
            self.edit(|k| {
                k.fail_thaw.insert(mp.into(), errno);
            })
        }
        /// FITHAW of `mp` panics.
        pub fn panic_on_thaw(self: Arc<Self>, mp: &str) -> Arc<Self> {
            self.edit(|k| k.panic_thaw.push(mp.into()))
        }
        /// The `n`-th FIFREEZE call (counting from 1) panics instead of freezing.
        pub fn panic_on_freeze(self: Arc<Self>, n: usize) -> Arc<Self> {
            self.edit(|k| k.panic_on_freeze = Some(n))
        }
        /// Every FIFREEZE takes this long.
        pub fn delay(self: Arc<Self>, d: Duration) -> Arc<Self> {
            self.edit(|k| k.delay = d)
        }
        /// Called with ("freeze" | "thaw", mount point) at the start of every call.
        pub fn observe(self: Arc<Self>, f: impl Fn(&str, &Path) + Send + Sync + 'static) -> Arc<Self> {
            self.edit(|k| k.observer = Some(Box::new(f)))
        }
        /// Every call so far, as "freeze /m" or "thaw /m", in call order.
        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
        /// Records the call; returns how many calls of this kind there were, this one included
        /// (counted under the same lock, so the n-th FIFREEZE is the n-th in `calls`).
        fn record(&self, op: &str, p: &Path) -> usize {
            if let Some(o) = &self.observer {
                o(op, p);
            }
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.push(format!("{op} {}", p.display()));
            calls.iter().filter(|c| c.starts_with(op) && c.as_bytes().get(op.len()) == Some(&b' ')).count()
        }
    }

    impl Kernel for FakeKernel {
        fn freeze(&self, p: &Path) -> io::Result<()> {
            std::thread::sleep(self.delay);
            let n = self.record("freeze", p);
            if self.panic_on_freeze == Some(n) {
                panic!("FakeKernel: FIFREEZE #{n} ({}) panics", p.display());
            }
            match self.fail_freeze.get(p) {
                Some(e) => Err(io::Error::from_raw_os_error(*e)),
                None => Ok(()),
            }
        }
        fn thaw(&self, p: &Path) -> io::Result<()> {
            self.record("thaw", p);
            if self.panic_thaw.iter().any(|m| m == p) {
                panic!("FakeKernel: FITHAW of {} panics", p.display());
            }
            match self.fail_thaw.get(p) {
                Some(e) => Err(io::Error::from_raw_os_error(*e)),
                None => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::FakeKernel;
    use crate::plan::{plan, PlanOptions};

    fn stacked_plan() -> Plan {
        let t = kmod_shim::mountinfo::parse(
            "\
10 1 7:0 / /s/lower rw - ext4 /dev/loop0 rw
11 1 7:1 / /s/upper rw - ext4 /dev/loop1 rw
12 1 7:2 / /s/other rw - xfs /dev/loop2 rw
",
        )
        .unwrap();
        let backing = |m: &kmod_shim::mountinfo::Mount| {
            if m.mount_point == Path::new("/s/upper") {
                vec!["7:0".parse().unwrap()]
            } else {
                vec![]
            }
        };
        plan(&t, &PlanOptions::new("/s"), &backing).unwrap()
    }

    fn position(calls: &[String], c: &str) -> usize {
        calls.iter().position(|x| x == c).unwrap_or_else(|| panic!("{c} not in {calls:?}"))
    }

    #[test]
    fn levels_freeze_in_order_and_thaw_in_reverse() {
        let fake = FakeKernel::new();
        let k: Arc<dyn Kernel> = fake.clone();
        let p = stacked_plan();
        let (frozen, timings) = freeze(&k, &p).unwrap();
        assert_eq!(frozen.len(), 3);
        assert_eq!(timings.len(), 3);
        let r = thaw(&k, &frozen);
        assert!(r.errors.is_empty());
        assert_eq!(r.thawed.len(), 3);
        let calls = fake.calls();
        assert!(position(&calls, "freeze /s/upper") < position(&calls, "freeze /s/lower"));
        assert!(position(&calls, "thaw /s/lower") < position(&calls, "thaw /s/upper"));
    }

    #[test]
    fn freeze_thaws_everything_when_one_filesystem_fails() {
        let fake = FakeKernel::new().fail_freeze("/s/lower", libc::EBUSY);
        let k: Arc<dyn Kernel> = fake.clone();
        let err = freeze(&k, &stacked_plan()).unwrap_err().to_string();
        assert!(err.contains("/s/lower") && err.contains("fsfreeze -u"), "{err}");
        let calls = fake.calls();
        assert!(calls.contains(&"thaw /s/upper".to_string()), "{calls:?}");
        assert!(calls.contains(&"thaw /s/other".to_string()), "{calls:?}");
        assert!(!calls.contains(&"thaw /s/lower".to_string()), "must not thaw what it did not freeze: {calls:?}");
    }

    #[test]
    fn thaw_runs_to_the_end_and_reports_every_error() {
        let k: Arc<dyn Kernel> = FakeKernel::new().fail_thaw("/s/upper", libc::EIO).fail_thaw("/s/other", libc::EIO);
        let (frozen, _) = freeze(&k, &stacked_plan()).unwrap();
        let r = thaw(&k, &frozen);
        assert_eq!(r.errors.len(), 2);
        assert_eq!(r.thawed, vec![PathBuf::from("/s/lower")]);
    }

    #[test]
    fn thawing_a_filesystem_someone_else_thawed_is_not_an_error() {
        let k: Arc<dyn Kernel> = FakeKernel::new().fail_thaw("/s/other", libc::EINVAL);
        let (frozen, _) = freeze(&k, &stacked_plan()).unwrap();
        assert!(thaw(&k, &frozen).errors.is_empty());
    }

    #[test]
    fn one_level_freezes_in_parallel() {
        let k: Arc<dyn Kernel> = FakeKernel::new().delay(Duration::from_millis(100));
        let t: String = (0..8).map(|i| format!("{} 1 7:{i} / /s/{i} rw - ext4 /dev/loop{i} rw\n", 10 + i)).collect();
        let p = plan(&kmod_shim::mountinfo::parse(&t).unwrap(), &PlanOptions::new("/s"), &|_| vec![]).unwrap();
        let start = Instant::now();
        freeze(&k, &p).unwrap();
        assert!(start.elapsed() < Duration::from_millis(600), "took {:?}", start.elapsed());
    }

    #[test]
    fn a_fifreeze_that_panics_fails_the_freeze_and_everything_is_thawed() {
        let fake = FakeKernel::new().panic_on_freeze(3);
        let k: Arc<dyn Kernel> = fake.clone();
        let t: String = (0..4).map(|i| format!("{} 1 7:{i} / /s/{i} rw - ext4 /dev/loop{i} rw\n", 10 + i)).collect();
        let p = plan(&kmod_shim::mountinfo::parse(&t).unwrap(), &PlanOptions::new("/s"), &|_| vec![]).unwrap();
        let err = freeze(&k, &p).unwrap_err().to_string();
        let calls = fake.calls();
        let freezes: Vec<&String> = calls.iter().filter(|c| c.starts_with("freeze ")).collect();
        let panicked = freezes[2].trim_start_matches("freeze ");
        assert!(err.contains(&format!("cannot freeze {panicked}")) && err.contains("panicked"), "{err}");
        for f in &freezes {
            let m = f.trim_start_matches("freeze ");
            // Every one that froze is thawed, and the one that panicked may have: thawed too.
            assert!(position(&calls, f) < position(&calls, &format!("thaw {m}")), "{calls:?}");
        }
    }

    #[test]
    fn a_fithaw_that_panics_is_reported_and_the_rest_still_thaw() {
        let fake = FakeKernel::new().panic_on_thaw("/s/upper");
        let k: Arc<dyn Kernel> = fake.clone();
        let (frozen, _) = freeze(&k, &stacked_plan()).unwrap();
        let r = thaw(&k, &frozen);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].0, PathBuf::from("/s/upper"));
        assert_eq!(r.thawed.len(), 2);
    }

    fn frozen_state() -> FrozenState {
        FrozenState {
            filesystems: vec![],
            since: tokio::time::Instant::now(),
            deadline: tokio::time::Instant::now(),
            owner: None,
            generation: 1,
            apps: vec![],
            hooks: vec![],
        }
    }

    #[test]
    fn begin_freeze_only_from_thawed() {
        let mut l = Lifecycle::Thawed;
        l.begin_freeze().unwrap();
        assert_eq!(l.begin_freeze(), Err(TransitionError::Busy));
        let mut f = Lifecycle::Frozen(frozen_state());
        assert_eq!(f.begin_freeze(), Err(TransitionError::AlreadyFrozen));
    }

    #[test]
    fn freeze_done_only_from_freezing() {
        let mut l = Lifecycle::Thawed;
        assert_eq!(l.freeze_done(frozen_state()), Err(TransitionError::NotFreezing));
        l.begin_freeze().unwrap();
        l.freeze_done(frozen_state()).unwrap();
        assert_eq!(l.name(), "frozen");
    }

    #[test]
    fn freeze_failed_returns_to_thawed() {
        let mut l = Lifecycle::Freezing;
        l.freeze_failed().unwrap();
        assert_eq!(l.name(), "thawed");
        assert_eq!(l.freeze_failed(), Err(TransitionError::NotFreezing));
    }

    #[test]
    fn begin_thaw_hands_over_the_frozen_state_and_is_a_no_op_when_thawed() {
        let mut l = Lifecycle::Thawed;
        assert!(l.begin_thaw().unwrap().is_none());
        assert_eq!(l.name(), "thawed");
        let mut f = Lifecycle::Frozen(frozen_state());
        assert_eq!(f.begin_thaw().unwrap().unwrap().generation, 1);
        assert_eq!(f.name(), "thawing");
        assert_eq!(f.begin_thaw().unwrap_err(), TransitionError::Busy);
        assert_eq!(f.name(), "thawing");
    }

    #[test]
    fn thaw_done_only_from_thawing() {
        let mut l = Lifecycle::Thawed;
        assert_eq!(l.thaw_done(), Err(TransitionError::NotThawing));
        let mut t = Lifecycle::Thawing;
        t.thaw_done().unwrap();
        assert_eq!(t.name(), "thawed");
    }
}
