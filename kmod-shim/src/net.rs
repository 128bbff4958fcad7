//! Network interfaces: their addresses (`getifaddrs`) and hardware addresses (`SIOCGIFHWADDR`).
//!
//! `getifaddrs` lists one entry per interface for its link (`AF_PACKET`), then one per IPv4
//! and one per IPv6 address, in the kernel's order; an IPv4 address with a label (`eth0:1`)
//! carries the label as its name. Only IP addresses are decoded; other families come back
//! with no address.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// One `getifaddrs` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// The interface name (or the address's label).
    pub name: String,
    /// The address, when it is an IPv4 or IPv6 one.
    pub addr: Option<IpAddr>,
    /// Its netmask, when there is one.
    pub netmask: Option<IpAddr>,
}

/// Decodes an IPv4 or IPv6 socket address.
///
/// # Safety
/// `sa` is null or points to a socket address that is as long as its family says.
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller promises a readable sockaddr; its family field comes first.
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in (the caller's promise).
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6 (the caller's promise).
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// Every entry of `getifaddrs`, in its order.
pub fn interface_addresses() -> Result<Vec<IfAddr>, Errno> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a live out-pointer; on success getifaddrs stores a list there that
    // we own until freeifaddrs below.
    Errno::result(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is an element of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        let name = if ifa.ifa_name.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null ifa_name is a NUL-terminated string inside the list.
            unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned()
        };
        // SAFETY: getifaddrs's addresses are null or full socket addresses of their family.
        let (addr, netmask) = unsafe { (ip_of(ifa.ifa_addr), ip_of(ifa.ifa_netmask)) };
        out.push(IfAddr { name, addr, netmask });
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once; nothing borrowed
    // from it outlives this point (names were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The first six bytes of the hardware address of interface `name` (`SIOCGIFHWADDR`, on an
/// `AF_INET` stream socket), or `None` when the kernel gives none. `Err` only when the
/// socket for asking cannot be made.
pub fn hardware_address(name: &str) -> Result<Option<[u8; 6]>, Errno> {
    let sock = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of plain data), valid
    // when zeroed.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name, cut to IFNAMSIZ - 1 bytes so that it stays NUL-terminated.
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name from and writes a sockaddr into `ifr`, a live,
    // writable ifreq for the whole call; `sock` is open.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
    if r == -1 {
        return Ok(None);
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(Some(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_addresses_and_an_all_zero_hardware_address() {
        let addrs = interface_addresses().unwrap();
        let lo: Vec<_> = addrs.iter().filter(|a| a.name == "lo").collect();
        assert!(lo.iter().any(|a| a.addr == Some(IpAddr::V4(Ipv4Addr::LOCALHOST))), "{addrs:?}");
        let v4 = lo.iter().find(|a| a.addr == Some(IpAddr::V4(Ipv4Addr::LOCALHOST))).unwrap();
        assert_eq!(v4.netmask, Some(IpAddr::V4(Ipv4Addr::new(255, 0, 0, 0))));
        assert_eq!(hardware_address("lo").unwrap(), Some([0; 6]));
        assert_eq!(hardware_address("no-such-if0").unwrap(), None);
    }
}
