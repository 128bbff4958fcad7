//! appvss: what applications use to hold a vssd freeze.
//!
//! A filesystem freeze alone gives a crash-consistent snapshot. A database is consistent only
//! if it flushes and stops writing for the freeze. An app registers with vssd over a unix
//! socket; vssd asks every registered app to PREPARE (it may veto), then to FREEZE (it flushes
//! and HOLDS), freezes the filesystems, and after the snapshot sends THAW. See `PROTOCOL.md`.
//!
//! What is here:
//! - [`proto`]: the wire types, name rules and line framing, shared with vssd (the
//!   `appvss-proto` crate, re-exported).
//! - [`client`]: the async (tokio) client: an event stream, requests that cannot be forgotten,
//!   a [`Hold`] guard that ends at THAW, at `max_hold_ms` or when vssd goes away; it
//!   reconnects with backoff when vssd restarts or is not there yet.
//! - [`blocking`]: the same client for code without an async runtime.
//! - `capi`: the C ABI (`include/appvss.h`), for C and any language with a C FFI.
//! - the `appvss` binary: `appvss hold` for shell scripts (e.g. `FLUSH TABLES WITH READ LOCK`
//!   held for the freeze).
//!
//! ```no_run
//! use appvss::client::{Client, Event, Options};
//!
//! # async fn flush_everything() -> std::io::Result<()> { Ok(()) }
//! # async fn demo() -> Result<(), appvss::Error> {
//! let mut vss = Client::connect(Options::new("orders-db"))?;
//! loop {
//!     match vss.next_event().await? {
//!         Event::Prepare(req) => req.ready(),
//!         Event::Freeze(req) => match flush_everything().await {
//!             Ok(()) => {
//!                 let hold = req.held();
//!                 // No writes from here ...
//!                 let why = hold.released().await;
//!                 // ... until here.
//!                 println!("hold ended: {why}");
//!             }
//!             Err(e) => req.failed(e),
//!         },
//!         _ => {}
//!     }
//! }
//! # }
//! ```
// `unsafe` is denied here (and by the workspace); the C ABI (`capi`) is the one module that
// opts back in, because its callers hand it raw pointers. Every unsafe block says why it holds.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod blocking;
#[allow(unsafe_code)]
pub mod capi;
pub mod client;
/// The wire protocol, shared with vssd: the [`appvss_proto`] crate.
pub use appvss_proto as proto;

pub use client::{Error, Event, FreezeRequest, Hold, Options, PrepareRequest, Release, Thaw};
