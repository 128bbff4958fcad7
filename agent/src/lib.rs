//! vssd, the guest agent: freezes a running VM's filesystems (and, later, its applications)
//! for a consistent snapshot, on the host's request over the qemu-guest-agent protocol, and
//! always thaws again.
//!
//! Code map: [`config`] (file + flags) → [`server`] (channels) → [`qga`] (protocol) →
//! [`service`] (one freeze at a time, deadlines, channel drops, crash recovery) →
//! [`plan`] (what to freeze, in what order) → [`engine`] (parallel FIFREEZE, thaw to the end).
#![forbid(unsafe_code)]

pub mod apps;
pub mod config;
pub mod engine;
pub mod hooks;
pub mod marker;
pub mod plan;
pub mod qga;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod workers;
