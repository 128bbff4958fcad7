//! vmctl: the host side (issue 4). Until it lands, it says so rather than pretending.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("vmctl: not built yet (backups arrive with issue 4); see README.md for what works today");
    std::process::exit(2);
}
