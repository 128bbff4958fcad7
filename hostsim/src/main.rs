//! vmctl: consistent backups, checkpoints and lifecycle of QEMU VMs, with the vssd guest agent
//! (or qemu-ga). The command line lives in `cli/`; the work in the hostsim library.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    // Whatever vmctl or the QEMU it starts creates holds disks, RAM or a VM's sockets:
    // owner-only, whatever the user's umask (the library does the same around each operation).
    let _umask = hostsim::vm::private_umask();
    cli::main()
}
