//! The qemu-guest-agent wire protocol, both ends, as vssd speaks it.
//!
//! - [`stream`]: splits an agent's input stream into messages (0xFF reset, size and depth
//!   limits), as qemu-ga's JSON streamer does.
//! - [`reply`]: QGA's error classes and the bytes of a reply (`{"return": ...}` /
//!   `{"error": {"class": ..., "desc": ...}}`, the echoed `id`, the 0xFF before a
//!   `guest-sync-delimited` answer).
//! - [`command`]: the request envelope and the typed [`Command`] the agent runs, parsed with
//!   qemu-ga's errors and in qemu-ga's order. Every command name the agent knows is declared
//!   there once; `guest-info`'s list and the set allowed while frozen come from it.
//! - [`client`]: the one client of the protocol (vmctl, vssctl and the tests use it), with the
//!   0xFF + `guest-sync-delimited` resynchronisation before each exchange.
//!
//! `docs/qga-wire.md` records qemu-ga 7.2's answers that all of this follows.
#![forbid(unsafe_code)]

pub mod client;
pub mod command;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod reply;
pub mod stream;

pub use client::{AgentInfo, Client, ClientError, Reply};
pub use command::{AppFailure, CannotFreeze, Command, CommandName, Incoming, Request, ShutdownMode, Unknown};
pub use reply::{ErrorClass, QgaError};
