//! A small pool of threads that run blocking kernel calls (FIFREEZE, FITHAW) side by side.
//!
//! Starting a thread costs tens of microseconds here, sometimes milliseconds on a busy
//! virtual CPU; a freeze of 16 filesystems would pay that 16 times, serially, inside the
//! freeze window. Workers stay parked between requests and leave after a while unused, so
//! an idle agent holds no extra threads for long.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

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

/// Runs every job at once on pooled threads and returns their results in order.
/// A single job runs on the calling thread.
pub fn run_all<R: Send + 'static>(mut jobs: Vec<Box<dyn FnOnce() -> R + Send + 'static>>) -> Vec<R> {
    if jobs.len() <= 1 {
        return jobs.drain(..).map(|j| j()).collect();
    }
    let n = jobs.len();
    let (tx, rx) = mpsc::channel::<(usize, R)>();
    let mut parked: Vec<Worker> = {
        let mut l = lock();
        let keep = l.len().saturating_sub(n);
        l.split_off(keep)
    };
    for (i, j) in jobs.into_iter().enumerate() {
        let tx = tx.clone();
        let job: Job = Box::new(move || {
            let _ = tx.send((i, j()));
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
