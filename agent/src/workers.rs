//! A small pool of threads that run blocking kernel calls (FIFREEZE, FITHAW) side by side.
//!
//! Starting a thread costs tens of microseconds here, sometimes milliseconds on a busy
//! virtual CPU; a freeze of 16 filesystems would pay that 16 times, serially, inside the
//! freeze window. Workers stay parked between requests and leave after a while unused, so
//! an idle agent holds no extra threads for long.
//!
//! Invariants: every job reports exactly once, in its place: a job that panics reports
//! [`Panicked`] instead of a result (the caller then knows which call did not finish and can
//! undo around it), and the worker that ran it survives and returns to the pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A job that panicked instead of returning.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the worker running it panicked: {0}")]
pub struct Panicked(pub String);

/// Runs `job`, turning a panic into [`Panicked`].
fn guarded<R>(job: impl FnOnce() -> R) -> Result<R, Panicked> {
    // The job owns what it captured and is gone after a panic; what it shares (the kernel)
    // must tolerate a panic in a call anyway, as any caller may unwind.
    catch_unwind(AssertUnwindSafe(job)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        Panicked(msg)
    })
}

/// A parked worker: its own channel, so handing it a job wakes exactly that thread (a shared
/// queue would wake every worker to fight over one lock, on two vCPUs, inside the window).
struct Worker {
    id: u64,
    tx: Sender<Job>,
}

const IDLE_EXIT: Duration = Duration::from_secs(60);

fn idle() -> &'static Mutex<Vec<Worker>> {
    static IDLE: OnceLock<Mutex<Vec<Worker>>> = OnceLock::new();
    IDLE.get_or_init(|| Mutex::new(Vec::new()))
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Worker>> {
    idle().lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_worker() -> Option<Sender<Job>> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Job>();
    let back = tx.clone();
    let spawned = std::thread::Builder::new().name("vssd-fs".into()).stack_size(256 * 1024).spawn(move || loop {
        match rx.recv_timeout(IDLE_EXIT) {
            Ok(job) => {
                job();
                lock().push(Worker { id, tx: back.clone() });
            }
            Err(RecvTimeoutError::Timeout) => {
                let mut l = lock();
                // Leave only if parked; if a job was just handed over, stay for it.
                if let Some(pos) = l.iter().position(|w| w.id == id) {
                    l.swap_remove(pos);
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    });
    spawned.ok().map(|_| tx)
}

/// Runs every job at once on pooled threads and returns their results in order, a job that
/// panicked as `Err(Panicked)`. A single job runs on the calling thread.
pub fn run_all<R: Send + 'static>(mut jobs: Vec<Box<dyn FnOnce() -> R + Send + 'static>>) -> Vec<Result<R, Panicked>> {
    if jobs.len() <= 1 {
        return jobs.drain(..).map(guarded).collect();
    }
    let n = jobs.len();
    let (tx, rx) = mpsc::channel::<(usize, Result<R, Panicked>)>();
    let mut parked: Vec<Worker> = {
        let mut l = lock();
        let keep = l.len().saturating_sub(n);
        l.split_off(keep)
    };
    for (i, j) in jobs.into_iter().enumerate() {
        let tx = tx.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send((i, guarded(j)));
        });
        let handed = match parked.pop() {
            Some(w) => w.tx.send(job).map_err(|e| e.0),
            None => match spawn_worker() {
                Some(t) => t.send(job).map_err(|e| e.0),
                None => Err(job),
            },
        };
        // No worker could take it (no thread to be had): run it here, less parallel but done.
        if let Err(job) = handed {
            job();
        }
    }
    drop(tx);
    let mut out: Vec<Option<Result<R, Panicked>>> = (0..n).map(|_| None).collect();
    for (i, r) in rx {
        out[i] = Some(r);
    }
    // A job reports even when it panics; one that never did went down with its thread in a
    // way `guarded` cannot catch (a panic while panicking aborts anyway): report it, never
    // panic here, so the caller still thaws around it.
    out.into_iter().map(|r| r.unwrap_or_else(|| Err(Panicked("the job never reported".into())))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn jobs_run_at_once_and_results_keep_their_order() {
        let jobs: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..8usize)
            .map(|i| {
                Box::new(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    i
                }) as Box<dyn FnOnce() -> usize + Send>
            })
            .collect();
        let t = Instant::now();
        let got: Vec<usize> = run_all(jobs).into_iter().map(Result::unwrap).collect();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        assert!(t.elapsed() < Duration::from_millis(700), "{:?}", t.elapsed());
    }

    #[test]
    fn a_job_that_panics_reports_in_its_place_and_the_others_still_run() {
        for n in [1usize, 4] {
            let jobs: Vec<Box<dyn FnOnce() -> usize + Send>> = (0..n)
                .map(|i| {
                    Box::new(move || {
                        if i == n - 1 {
                            panic!("job {i} panics");
                        }
                        i
                    }) as Box<dyn FnOnce() -> usize + Send>
                })
                .collect();
            let got = run_all(jobs);
            assert_eq!(got.len(), n);
            for (i, r) in got.iter().enumerate().take(n - 1) {
                assert_eq!(r.as_ref().unwrap(), &i);
            }
            let err = got[n - 1].as_ref().unwrap_err();
            assert!(err.0.contains(&format!("job {} panics", n - 1)), "{err}");
        }
        // The pool still works after a panic.
        let jobs: Vec<Box<dyn FnOnce() -> u8 + Send>> = (0..3u8).map(|i| Box::new(move || i) as Box<_>).collect();
        assert!(run_all(jobs).into_iter().all(|r| r.is_ok()));
    }
}
