//! vmctl: consistent backups, checkpoints and lifecycle of QEMU VMs, with the vssd guest agent
//! (or qemu-ga). The command line lives in `cli/`; the work in the hostsim library.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
