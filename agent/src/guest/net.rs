//! `guest-network-get-interfaces`.
//!
//! As qemu-ga: one interface per distinct `getifaddrs` name, in the order names first
//! appear (an IPv4 label such as `eth0:1` is an interface of its own); its
//! `hardware-address` from `SIOCGIFHWADDR` when the kernel gives one (all zeros for `lo`);
//! `ip-addresses` and `statistics` only once it has an IP address, the statistics being its
//! `/proc/net/dev` line (left out when there is none). IPv6 addresses are written as glibc's
//! `inet_ntop` writes them.

use std::net::{IpAddr, Ipv6Addr};

use kmod_shim::net::IfAddr;
use nix::errno::Errno;
use qga_wire::QgaError;
use serde::Serialize;

use super::{os_error, Host};

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Interface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_addresses: Option<Vec<IpAddress>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<Statistics>,
}

/// One IP address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IpAddress {
    pub ip_address: String,
    /// `ipv4` or `ipv6`.
    pub ip_address_type: &'static str,
    pub prefix: u32,
}

/// An interface's counters, from `/proc/net/dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Statistics {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_dropped: u64,
}

/// `guest-network-get-interfaces` on this machine.
pub fn interfaces(host: &Host) -> Result<Vec<Interface>, QgaError> {
    let addrs = kmod_shim::net::interface_addresses().map_err(|e| os_error("getifaddrs failed", e))?;
    let dev = std::fs::read_to_string(host.procfs.join("net/dev")).ok();
    build(&addrs, kmod_shim::net::hardware_address, dev.as_deref())
}

/// The reply for these `getifaddrs` entries, hardware addresses from `hw` and
/// `/proc/net/dev`'s text.
pub fn build(
    addrs: &[IfAddr],
    mut hw: impl FnMut(&str) -> Result<Option<[u8; 6]>, Errno>,
    proc_net_dev: Option<&str>,
) -> Result<Vec<Interface>, QgaError> {
    let mut out: Vec<Interface> = Vec::new();
    for a in addrs {
        let i = match out.iter().position(|i| i.name == a.name) {
            Some(i) => i,
            None => {
                out.push(Interface {
                    name: a.name.clone(),
                    hardware_address: None,
                    ip_addresses: None,
                    statistics: None,
                });
                out.len() - 1
            }
        };
        let info = &mut out[i];
        if info.hardware_address.is_none() {
            if let Some(m) = hw(&a.name).map_err(|e| os_error("failed to create socket", e))? {
                info.hardware_address =
                    Some(format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]));
            }
        }
        let item = match a.addr {
            Some(IpAddr::V4(ip)) => {
                IpAddress { ip_address: ip.to_string(), ip_address_type: "ipv4", prefix: prefix(a.netmask) }
            }
            Some(IpAddr::V6(ip)) => {
                IpAddress { ip_address: ntop6(ip), ip_address_type: "ipv6", prefix: prefix(a.netmask) }
            }
            None => continue,
        };
        info.ip_addresses.get_or_insert_with(Vec::new).push(item);
        if info.statistics.is_none() {
            info.statistics = proc_net_dev.and_then(|d| statistics(d, &a.name));
        }
    }
    Ok(out)
}

/// The number of set bits of a netmask (0 without one).
fn prefix(netmask: Option<IpAddr>) -> u32 {
    match netmask {
        Some(IpAddr::V4(m)) => u32::from(m).count_ones(),
        Some(IpAddr::V6(m)) => u128::from(m).count_ones(),
        None => 0,
    }
}

/// An IPv6 address as glibc's `inet_ntop` writes it. That is RFC 5952, as Rust's `Display`,
/// but for IPv4-compatible addresses (`::a.b.c.d`, six zero words then a non-zero one),
/// which glibc writes in dotted form.
pub fn ntop6(ip: Ipv6Addr) -> String {
    let s = ip.segments();
    if s[..6] == [0; 6] && s[6] != 0 {
        let [a, b, c, d] = ip.octets()[12..] else { unreachable!() };
        return format!("::{a}.{b}.{c}.{d}");
    }
    ip.to_string()
}

/// The counters of interface `name` in `/proc/net/dev`'s text: the line whose text before
/// its first colon is the name, with 16 numbers after it.
pub fn statistics(proc_net_dev: &str, name: &str) -> Option<Statistics> {
    for line in proc_net_dev.lines() {
        let line = line.trim_start();
        let Some((n, rest)) = line.split_once(':') else { continue };
        if n != name {
            continue;
        }
        let v: Vec<u64> = rest.split_ascii_whitespace().take(16).map_while(|t| t.parse().ok()).collect();
        if v.len() != 16 {
            continue;
        }
        return Some(Statistics {
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_errs: v[2],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_errs: v[10],
            tx_dropped: v[11],
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::Ipv4Addr;

    const DEV: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    6438      59    0    0    0     0          0         0     6438      59    0    0    0     0       0          0
  eth0: 445443087   12791    1    2    0     0          0         0   550269    7373    3    4    0     0       0          0
 short: 1 2 3
";

    fn entry(name: &str, addr: Option<IpAddr>, mask: Option<IpAddr>) -> IfAddr {
        IfAddr { name: name.into(), addr, netmask: mask }
    }

    #[test]
    fn interfaces_are_built_as_qemu_ga_builds_them() {
        let v4 = |a, b, c, d| Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
        let v6 = |s: &str| Some(IpAddr::V6(s.parse().unwrap()));
        let addrs = [
            entry("lo", None, None), // AF_PACKET
            entry("eth0", None, None),
            entry("dummy0", None, None),
            entry("lo", v4(127, 0, 0, 1), v4(255, 0, 0, 0)),
            entry("eth0", v4(10, 0, 2, 15), v4(255, 255, 255, 0)),
            entry("eth0:1", v4(10, 0, 3, 1), v4(255, 255, 0, 0)),
            entry("lo", v6("::1"), v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            entry("eth0", v6("fe80::5054:ff:fe12:3456"), v6("ffff:ffff:ffff:ffff::")),
            entry("eth0", v4(10, 0, 2, 16), None),
        ];
        let hw = |n: &str| -> Result<Option<[u8; 6]>, Errno> {
            Ok(match n {
                "lo" => Some([0; 6]),
                "eth0" | "eth0:1" => Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
                _ => None,
            })
        };
        let got = serde_json::to_value(build(&addrs, hw, Some(DEV)).unwrap()).unwrap();
        let lo_stats = json!({"rx-bytes": 6438, "rx-packets": 59, "rx-errs": 0, "rx-dropped": 0,
            "tx-bytes": 6438, "tx-packets": 59, "tx-errs": 0, "tx-dropped": 0});
        let eth_stats = json!({"rx-bytes": 445443087u64, "rx-packets": 12791, "rx-errs": 1, "rx-dropped": 2,
            "tx-bytes": 550269, "tx-packets": 7373, "tx-errs": 3, "tx-dropped": 4});
        assert_eq!(
            got,
            json!([
                {"name": "lo", "hardware-address": "00:00:00:00:00:00", "statistics": lo_stats, "ip-addresses": [
                    {"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                    {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}]},
                {"name": "eth0", "hardware-address": "52:54:00:12:34:56", "statistics": eth_stats, "ip-addresses": [
                    {"ip-address": "10.0.2.15", "ip-address-type": "ipv4", "prefix": 24},
                    {"ip-address": "fe80::5054:ff:fe12:3456", "ip-address-type": "ipv6", "prefix": 64},
                    {"ip-address": "10.0.2.16", "ip-address-type": "ipv4", "prefix": 0}]},
                {"name": "dummy0"},
                {"name": "eth0:1", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
                    {"ip-address": "10.0.3.1", "ip-address-type": "ipv4", "prefix": 16}]},
            ])
        );
        let e = build(&addrs, |_| Err(Errno::EMFILE), None).unwrap_err();
        assert_eq!(e.desc, "failed to create socket: Too many open files");
    }

    #[test]
    fn statistics_need_the_exact_name_and_sixteen_numbers() {
        assert_eq!(statistics(DEV, "eth0").unwrap().tx_dropped, 4);
        assert_eq!(statistics(DEV, "eth"), None);
        assert_eq!(statistics(DEV, "short"), None);
        assert_eq!(statistics(DEV, "face |bytes    packets errs drop fifo frame compressed multicast|bytes"), None);
    }

    #[test]
    fn ipv6_addresses_are_written_as_glibc_writes_them() {
        let cases = [
            ("::", "::"),
            ("::1", "::1"),
            ("::10.0.2.15", "::10.0.2.15"),
            ("::ffff:10.0.2.15", "::ffff:10.0.2.15"),
            ("::0.0.0.2", "::2"),
            ("fe80::1:0:0:1", "fe80::1:0:0:1"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
            ("2001:db8::", "2001:db8::"),
            ("1:0:1:1:1:1:1:1", "1:0:1:1:1:1:1:1"),
        ];
        for (ip, want) in cases {
            assert_eq!(ntop6(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn this_machine_lists_loopback_with_its_address() {
        let d = tempfile::tempdir().unwrap();
        let mut h = super::super::testing::host(d.path());
        h.procfs = "/proc".into();
        let all = interfaces(&h).unwrap();
        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert_eq!(lo.hardware_address.as_deref(), Some("00:00:00:00:00:00"));
        assert!(lo.ip_addresses.as_ref().unwrap().iter().any(|a| a.ip_address == "127.0.0.1" && a.prefix == 8));
        assert!(lo.statistics.is_some());
    }
}
