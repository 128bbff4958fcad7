//! Starting a helper program in a session of its own, as qemu-ga starts `shutdown`,
//! `hwclock` and the suspend helpers: no controlling terminal, not in the agent's process
//! group, so nothing aimed at the agent (a terminal hang-up, a group signal) reaches it.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd` call `setsid()` in the child before it executes the program.
pub fn in_new_session(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec; it calls only setsid, which is
    // async-signal-safe, allocates nothing and takes no lock. Its result is ignored, as
    // qemu-ga ignores it (it fails only for a process group leader, which a fresh child
    // is not).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
}
