//! Shared fixtures of the integration tests, one module per fixture:
//!
//! - [`cmd`]: running a program under a time limit; the workspace binaries under test;
//! - [`sandbox`]: loop filesystems under `/tmp/vssd-test-*/mnt`, thawed and removed in `Drop`;
//! - [`probe`]: the write probe that sees "frozen" as an application would;
//! - [`vssd`]: a vssd scoped to one sandbox, and `vssctl`;
//! - [`qemu_ga`]: a qemu-ga that sees only its sandbox;
//! - [`qga`]: the workspace's one QGA client (`qga-wire`) and the tests' assertions on top;
//! - [`compare`]: the differences between two agents' replies, as paths;
//! - [`report`]: reading vssd's JSON reports;
//! - [`vm`]: the VM tier's guest under QEMU.
//!
//! Invariants, because a mistake here hangs the machine the tests run on: a test freezes only
//! filesystems its [`Sandbox`] made; every daemon gets that sandbox's `mnt/` as its scope and a
//! deadline of at most 10 s; cleanup runs in `Drop`, also while a test panics (processes first,
//! then the sandbox).
//!
//! Tiers. A test that needs root carries `#[ignore = "root tier: ..."]`, one that boots a guest
//! `#[ignore = "vm tier: ..."]`, so a plain `cargo test --workspace` (no root) lists them as
//! ignored rather than passing them unseen. `tests/run-all.sh` runs them as root with
//! `-- --include-ignored` and fails when any test of its run was ignored. Inside such a test, a
//! missing prerequisite is a failure that names the fix ([`require_root!`],
//! [`require_vm!`]), never an early return. By hand, as root:
//! `unshare -m --propagation private cargo test -p tests --test NAME -- --include-ignored` (the
//! private mount namespace hides the test filesystems from anything else on the machine that
//! thaws every mount it sees, e.g. a qemu-ga answering `guest-fsfreeze-thaw`). The packages
//! they need: `tests/setup.sh`.
#![forbid(unsafe_code)]

pub use serde_json::{json, Value};

pub mod cmd;
pub mod compare;
pub mod libvirt;
pub mod probe;
pub mod qemu_ga;
pub mod qga;
pub mod rawapp;
pub mod report;
pub mod sandbox;
pub mod sysguest;
pub mod vm;
pub mod vssd;

pub use cmd::{bin, bin_dir, run, run_unchecked, run_with_limit, Output};
pub use probe::{assert_all_blocked, assert_all_complete, assert_frozen, assert_writable, WriteProbe, BLOCKED, THAWED};
pub use qemu_ga::QemuGa;
pub use qga::{chain, check_guard, error_class, expect_error, ret, ClientError, QgaClient, QgaExt, Reply};
pub use report::{field, mount_entry, p2s};
pub use sandbox::{frozen_by_someone, loop_attached, mount_of, mounts, thaw_fully, Fs, Sandbox};
pub use vssd::{vssctl, Vssd, VssdBuilder};

/// True when the tests run as root (the only way to make loop filesystems and freeze them).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The reason a root-tier test cannot run here, if it cannot.
pub fn root_tier_missing() -> Option<String> {
    if is_root() {
        return None;
    }
    Some(
        "root-tier tests make loop filesystems and freeze them: run them as root, e.g. `sudo tests/run-all.sh`, \
         or `sudo unshare -m --propagation private cargo test -p tests --test NAME -- --include-ignored`"
            .into(),
    )
}

/// Fails the test (never returns early: a test that cannot run must not pass) unless it runs
/// as root. Every root-tier test is also `#[ignore = "root tier: ..."]`.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(why) = $crate::root_tier_missing() {
            panic!("this root-tier test cannot run here ({} line {}): {}", module_path!(), line!(), why);
        }
    };
}
