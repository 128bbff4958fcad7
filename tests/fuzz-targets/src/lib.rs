//! The bodies of vssd's fuzz targets, one function per decoder that reads a peer's bytes, and
//! two stateful ones that drive the real state machines with fakes around them.
//!
//! Each function takes the fuzzer's bytes, must never panic for any input, and panics (with a
//! message naming the broken rule) when an invariant does not hold. `fuzz/fuzz_targets/*.rs`
//! (cargo-fuzz, nightly) is one line per target calling [`run`]; the stable test
//! `tests/tests/fuzz_corpus.rs` replays every file of `fuzz/corpus/TARGET/` through the same
//! functions, so the corpus and every crash found in it are a regression suite without
//! nightly.
//!
//! Nothing here touches the host: files go to temporary directories, the kernel is a fake,
//! and the QGA session only ever sees commands from an allowlist (freeze, thaw, status, sync,
//! info): fuzzed bytes never reach guest-exec, guest-shutdown or guest-file-*.
#![forbid(unsafe_code)]

mod appvss;
mod hostside;
mod kmod;
mod qga;
mod session;

/// A target's body: the fuzzer's bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name of its fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("qga_stream", qga::stream),
    ("qga_command", qga::command),
    ("qga_client", qga::client),
    ("appvss_framing", appvss::framing),
    ("appvss_message", appvss::message),
    ("hv_vss_msg", kmod::hv_vss_msg),
    ("mountinfo", kmod::mountinfo),
    ("topology", kmod::topology),
    ("qmp", hostside::qmp),
    ("backup_manifest", hostside::backup_manifest),
    ("checkpoint_manifest", hostside::checkpoint_manifest),
    ("qga_session", session::qga_session),
    ("appvss_coordinator", session::appvss_coordinator),
];

/// Runs the target `name` on `data`; panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => f(data),
        None => panic!("no fuzz target {name}"),
    }
}

/// A current-thread runtime with every driver, for the async decoders.
fn runtime(paused: bool) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all();
    if paused {
        b.start_paused(true);
    }
    b.build().expect("a current-thread runtime")
}
