//! A small pool of threads that run blocking kernel calls (FIFREEZE, FITHAW) side by side.
//!
//! Starting a thread costs tens of microseconds here, sometimes milliseconds on a busy
//! virtual CPU; a freeze of 16 filesystems would pay that 16 times, serially, inside the
//! freeze window. Workers stay parked between requests and leave after a while unused, so
//! an idle agent holds no extra threads for long.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    idle: AtomicUsize,
}

const IDLE_EXIT: Duration = Duration::from_secs(60);
const MAX_THREADS: usize = 256;

fn pool() -> &'static Arc<Pool> {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    POOL.get_or_init(|| Arc::new(Pool { queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), idle: AtomicUsize::new(0) }))
}

fn worker(p: Arc<Pool>) {
    loop {
        let job = {
            let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = q.pop_front() {
                    break Some(j);
                }
                let (g, t) = p.ready.wait_timeout(q, IDLE_EXIT).unwrap_or_else(|e| e.into_inner());
                q = g;
                if t.timed_out() && q.is_empty() {
                    break None;
                }
            }
        };
        let Some(job) = job else {
            p.idle.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        p.idle.fetch_sub(1, Ordering::AcqRel);
        job();
        p.idle.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs every job at once on pooled threads and returns their results in order.
/// A single job runs on the calling thread.
pub fn run_all<R: Send + 'static>(mut jobs: Vec<Box<dyn FnOnce() -> R + Send + 'static>>) -> Vec<R> {
    if jobs.len() <= 1 {
        return jobs.drain(..).map(|j| j()).collect();
    }
    let p = pool();
    let n = jobs.len();
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    {
        let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        for (i, j) in jobs.into_iter().enumerate() {
            let tx = tx.clone();
            q.push_back(Box::new(move || {
                let _ = tx.send((i, j()));
            }));
        }
    }
    drop(tx);
    let idle = p.idle.load(Ordering::Acquire);
    for _ in idle..n.min(MAX_THREADS) {
        let p2 = p.clone();
        p.idle.fetch_add(1, Ordering::AcqRel);
        if std::thread::Builder::new().name("vssd-fs".into()).stack_size(256 * 1024).spawn(move || worker(p2)).is_err() {
            // No thread: the existing workers still drain the queue, just less in parallel.
            p.idle.fetch_sub(1, Ordering::AcqRel);
        }
    }
    p.ready.notify_all();
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for (i, r) in rx {
        out[i] = Some(r);
    }
    out.into_iter().map(|r| r.expect("every job reports once (a job that panicked is a bug)")).collect()
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
        assert_eq!(run_all(jobs), (0..8).collect::<Vec<_>>());
        assert!(t.elapsed() < Duration::from_millis(700), "{:?}", t.elapsed());
    }
}
