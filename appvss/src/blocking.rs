//! The client for code without an async runtime: the same events, read with a blocking call.
//!
//! The registration is kept up by a thread of its own (one small tokio runtime inside), so the
//! app's threads may be busy flushing while vssd's THAW, a lost connection or `max_hold_ms`
//! still end a [`Hold`](crate::Hold) on time. Dropping the [`Client`] closes the connection
//! (vssd counts the app as released) and joins the thread.
//!
//! ```no_run
//! use appvss::blocking::Client;
//! use appvss::{Event, Options};
//!
//! # fn checkpoint() -> std::io::Result<()> { Ok(()) }
//! let mut vss = Client::connect(Options::new("queue"))?;
//! loop {
//!     match vss.next_event()? {
//!         Event::Prepare(req) => req.ready(),
//!         Event::Freeze(req) => match checkpoint() {
//!             Ok(()) => {
//!                 let hold = req.held();
//!                 let why = hold.wait(); // THAW, max_hold_ms, or vssd gone
//!                 eprintln!("released: {why}");
//!             }
//!             Err(e) => req.failed(format!("checkpoint failed: {e}")),
//!         },
//!         _ => {}
//!     }
//! }
//! # Ok::<(), appvss::Error>(())
//! ```

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::client::{drive, Error, Event, Options, Sink};

/// A registration with vssd, kept up by a thread. See the [module](self) docs.
pub struct Client {
    events: mpsc::Receiver<Result<Event, Error>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Client {
    /// Starts registering with vssd; returns at once (the first event is
    /// [`Event::Connected`]). Errors only for bad options or when no thread can be started.
    pub fn connect(options: Options) -> Result<Client, Error> {
        options.validate()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Thread)?;
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("appvss".into())
            .spawn(move || runtime.block_on(drive(options, Sink::Std(tx), stop_rx)))
            .map_err(Error::Thread)?;
        Ok(Client { events: rx, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// Blocks until the next event. `Err` means the client has stopped (see
    /// [`client::Client::next_event`](crate::client::Client::next_event)).
    pub fn next_event(&mut self) -> Result<Event, Error> {
        self.events.recv().unwrap_or(Err(Error::Stopped))
    }

    /// Blocks at most `timeout`; `Ok(None)` if nothing came.
    pub fn next_event_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, Error> {
        match self.events.recv_timeout(timeout) {
            Ok(r) => r.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Stopped),
        }
    }

    /// Closes the connection and waits for the client's thread to end (what `Drop` does).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("blocking::Client").finish_non_exhaustive()
    }
}
