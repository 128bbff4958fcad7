//! appvss: what applications use to hold a vssd freeze.
//!
//! A filesystem freeze alone gives a crash-consistent snapshot. A database is consistent only
//! if it flushes and stops writing for the freeze. An app registers with vssd over a unix
//! socket; vssd asks every registered app to PREPARE (it may veto), then to FREEZE (it flushes
//! and HOLDS), freezes the filesystems, and after the snapshot sends THAW. See `PROTOCOL.md`.
#![forbid(unsafe_code)]

pub mod proto;
