//! `uname(2)`: the kernel's name, release, version, machine, and this UTS namespace's host name.

use nix::errno::Errno;

/// What `uname(2)` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uname {
    /// The host name of this UTS namespace (`nodename`, what `gethostname` returns).
    pub nodename: String,
    /// The kernel release, e.g. `6.1.0-13-amd64`.
    pub release: String,
    /// The kernel version string, e.g. `#1 SMP PREEMPT_DYNAMIC Debian 6.1.55-1`.
    pub version: String,
    /// The machine, e.g. `x86_64`.
    pub machine: String,
}

fn field(f: &[libc::c_char]) -> String {
    // The kernel NUL-terminates every field; a missing NUL would take the whole array.
    let bytes: Vec<u8> = f.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Calls `uname(2)`.
pub fn uname() -> Result<Uname, Errno> {
    // SAFETY: `utsname` is plain old data (arrays of c_char), valid when zeroed.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live, writable utsname for the whole call; uname writes only it.
    Errno::result(unsafe { libc::uname(&mut u) })?;
    Ok(Uname {
        nodename: field(&u.nodename),
        release: field(&u.release),
        version: field(&u.version),
        machine: field(&u.machine),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn uname_names_this_kernel() {
        let u = super::uname().unwrap();
        assert_eq!(u.release, std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim_end());
        assert_eq!(u.nodename, std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim_end());
        assert!(!u.machine.is_empty());
    }
}
