//! Rate limits for log lines a peer can trigger: an app or a host that sends garbage, or
//! connects and drops, in a loop must not be able to fill the journal (and push out the lines
//! that matter, such as a freeze that failed).
//!
//! Each call site of [`warn_limited!`] / [`info_limited!`] has a limit of its own (a static
//! [`RateLimit`]): at most `burst` lines per `interval`, counted in fixed windows that start
//! at the first line after the previous window ended. Lines over the limit are counted, not
//! written; the first line written after them is preceded by one line saying how many were
//! dropped. (If none comes after them, the count is never written: the flood stopped.)
//!
//! Invariants: a call site writes at most `burst + 1` lines per window (the count, then its
//! burst); the limiter never blocks, never allocates, and takes the time only through
//! [`RateLimit::check_at`]'s argument, so the tests run on a clock they move by hand.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per call site and window, for lines a peer can trigger.
pub const BURST: u32 = 10;
/// The window.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it. `suppressed` lines of this call site were dropped since the last one written:
    /// say so first when it is not 0.
    Log { suppressed: u64 },
    /// Over the limit: count it and drop it.
    Drop,
}

/// One call site's limit: at most `burst` lines per `interval`.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    interval: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current window began; `None` before the first line.
    start: Option<Instant>,
    /// Lines written in it.
    written: u32,
    /// Lines dropped since the last one written.
    suppressed: u64,
}

impl RateLimit {
    /// A limit of `burst` lines per `interval` (const, for a `static` per call site).
    pub const fn new(burst: u32, interval: Duration) -> RateLimit {
        RateLimit { burst, interval, state: Mutex::new(Window { start: None, written: 0, suppressed: 0 }) }
    }

    /// The verdict for a line now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// The verdict for a line at `now` (never earlier than a previous call's `now`; an
    /// earlier one counts as being in the current window).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let expired = match w.start {
            Some(s) => now.saturating_duration_since(s) >= self.interval,
            None => true,
        };
        if expired {
            w.start = Some(now);
            w.written = 0;
        }
        if w.written < self.burst {
            w.written += 1;
            Verdict::Log { suppressed: std::mem::take(&mut w.suppressed) }
        } else {
            w.suppressed += 1;
            Verdict::Drop
        }
    }
}

/// Writes a line with `tracing::$level!` under a limit of its own call site; see the module.
#[doc(hidden)]
#[macro_export]
macro_rules! __log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit =
            $crate::ratelimit::RateLimit::new($crate::ratelimit::BURST, $crate::ratelimit::INTERVAL);
        if let $crate::ratelimit::Verdict::Log { suppressed } = LIMIT.check() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, "{suppressed} more lines like the next were not logged (rate limit)");
            }
            ::tracing::$level!($($arg)+);
        }
    }};
}

/// `tracing::warn!`, at most [`BURST`] lines per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::__log_limited!(warn, $($arg)+) };
}

/// `tracing::info!`, at most [`BURST`] lines per [`INTERVAL`] from this call site.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::__log_limited!(info, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_burst_passes_then_lines_are_dropped_until_the_window_ends() {
        let l = RateLimit::new(3, 10 * S);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.check_at(t0 + i * S), Verdict::Log { suppressed: 0 });
        }
        for i in 3..10 {
            assert_eq!(l.check_at(t0 + i * S), Verdict::Drop, "second {i}");
        }
        // The window ends 10 s after its first line; the first line after it tells the count.
        assert_eq!(l.check_at(t0 + 10 * S), Verdict::Log { suppressed: 7 });
        assert_eq!(l.check_at(t0 + 11 * S), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn a_flood_writes_at_most_burst_plus_one_lines_per_window() {
        let l = RateLimit::new(10, 60 * S);
        let t0 = Instant::now();
        let mut lines = 0u64;
        let mut dropped = 0u64;
        // A peer that triggers the line 1000 times a second for ten minutes.
        for ms in 0..600_000u64 {
            match l.check_at(t0 + Duration::from_millis(ms)) {
                Verdict::Log { suppressed } => {
                    lines += 1 + u64::from(suppressed > 0);
                    dropped -= suppressed;
                }
                Verdict::Drop => dropped += 1,
            }
        }
        assert!(lines <= 10 * 11, "{lines}");
        // Every dropped line but the last window's was counted in a written line.
        assert_eq!(dropped, 60_000 - 10);
    }

    #[test]
    fn a_quiet_peer_is_never_limited() {
        let l = RateLimit::new(2, 10 * S);
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(l.check_at(t0 + i * 5 * S), Verdict::Log { suppressed: 0 });
        }
    }

    #[test]
    fn a_clock_that_steps_back_stays_in_the_window() {
        let l = RateLimit::new(1, 10 * S);
        let t0 = Instant::now() + 100 * S;
        assert_eq!(l.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check_at(t0 - 50 * S), Verdict::Drop);
        assert_eq!(l.check_at(t0 + 10 * S), Verdict::Log { suppressed: 1 });
    }

    /// Collects what a `tracing` subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_call_site_has_its_own_limit_and_the_macros_write_through_tracing() {
        fn site_a() {
            warn_limited!(peer = "a", "garbage from a");
        }
        fn site_b() {
            info_limited!("churn from b");
        }
        let out = Captured::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || w.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                site_a();
            }
            site_b();
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("garbage from a").count(), BURST as usize, "{text}");
        assert_eq!(text.matches("churn from b").count(), 1, "{text}");
    }
}
