//! vssd, the guest agent: freezes a running VM's filesystems and the applications that
//! registered to hold a freeze, for a consistent snapshot, on the host's request over the
//! qemu-guest-agent protocol, and always thaws again.
//!
//! Code map: [`config`] (file + flags) → [`server`] (channels; the Hyper-V VSS device in
//! [`hyperv`]) → [`qga`] (protocol; the platform commands such as guest-get-osinfo or
//! guest-shutdown in [`guest`]) →
//! [`service`] (one freeze at a time: `service/freeze.rs` the pipeline, `thaw.rs`,
//! `timers.rs` the deadline and channel-drop grace, `report.rs`) → [`apps`] (apps that hold
//! a freeze), [`hooks`] (fsfreeze hook scripts), [`marker`] (what a crash left frozen),
//! [`plan`] (what to freeze, in what order) → [`engine`] (parallel FIFREEZE on [`workers`],
//! thaw to the end; the kernel behind a trait, with a scripted fake for tests).
//!
//! Errors: one `thiserror` enum per module; a message never repeats its source, and the
//! top level (`main.rs`, the QGA reply) prints the chain once.
#![forbid(unsafe_code)]

pub mod apps;
pub mod config;
pub mod dbus;
pub mod engine;
pub mod guest;
pub mod hooks;
pub mod hyperv;
pub mod marker;
pub mod plan;
pub mod qga;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod workers;
