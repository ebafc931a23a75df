//! `-netdev user`'s options (QEMU's `NetdevUserOptions`), checked in QEMU's order and
//! words (`net_init_slirp`, `net_slirp_init`, `slirp_hostfwd`, `slirp_guestfwd` in
//! `net/slirp.c`; the `ipv6-net=` shorthand of `net/net.c`).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{parse_bool, NetError};

/// Every key `-netdev user` takes (QAPI's `NetdevUserOptions` and `ipv6-net`).
const KEYS: &[&str] = &[
    "hostname",
    "restrict",
    "ipv4",
    "ipv6",
    "ip",
    "net",
    "host",
    "tftp",
    "bootfile",
    "dhcpstart",
    "dns",
    "dnssearch",
    "domainname",
    "ipv6-prefix",
    "ipv6-prefixlen",
    "ipv6-host",
    "ipv6-dns",
    "ipv6-net",
    "smb",
    "smbserver",
    "hostfwd",
    "guestfwd",
    "tftp-server-name",
];

/// A user-mode network, checked: what `slirp_new` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    /// `restrict=on`: the guest reaches only the virtual hosts and forwarded ports.
    pub restrict: bool,
    /// `ipv4=` (on unless only `ipv6=on` was given).
    pub ipv4: bool,
    /// `ipv6=` (on unless only `ipv4=on` was given).
    pub ipv6: bool,
    /// The network (`net=`, host bits cleared), 10.0.2.0 by default.
    pub net: Ipv4Addr,
    /// Its mask, 255.255.255.0 by default.
    pub mask: Ipv4Addr,
    /// The host's address on it (`host=`), 10.0.2.2 by default.
    pub host: Ipv4Addr,
    /// The first address DHCP hands out (`dhcpstart=`), 10.0.2.15 by default.
    pub dhcp_start: Ipv4Addr,
    /// The DNS server's address (`dns=`), 10.0.2.3 by default.
    pub dns: Ipv4Addr,
    /// The IPv6 prefix (`ipv6-prefix=`/`ipv6-net=`), fec0:: by default.
    pub prefix6: Ipv6Addr,
    /// Its length, 64 by default.
    pub prefix6_len: u8,
    /// The host's IPv6 address (`ipv6-host=`), prefix::2 by default.
    pub host6: Ipv6Addr,
    /// The IPv6 DNS server (`ipv6-dns=`), prefix::3 by default.
    pub dns6: Ipv6Addr,
    /// `hostname=`: the name DHCP gives the guest.
    pub hostname: Option<String>,
    /// `domainname=`: DHCP's domain name.
    pub domainname: Option<String>,
    /// `dnssearch=` (repeatable): DHCP's search list.
    pub dnssearch: Vec<String>,
    /// `tftp=`: the directory the TFTP server exports.
    pub tftp: Option<String>,
    /// `bootfile=`: the BOOTP file name.
    pub bootfile: Option<String>,
    /// `tftp-server-name=`: DHCP's option 66.
    pub tftp_server_name: Option<String>,
    /// `hostfwd=` rules (repeatable), in the order QEMU applies them.
    pub hostfwd: Vec<(String, Hostfwd)>,
}

/// One host forwarding rule: `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hostfwd {
    /// UDP instead of TCP.
    pub udp: bool,
    /// The host address to listen on (0.0.0.0 for any).
    pub host_addr: Ipv4Addr,
    /// The host port (0: any free port).
    pub host_port: u16,
    /// The guest address (0.0.0.0: the DHCP start address).
    pub guest_addr: Ipv4Addr,
    /// The guest port.
    pub guest_port: u16,
}

/// QemuOpts' value of a key given without `=`.
fn value(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("on")
}

impl UserConfig {
    /// Checks a `-netdev user`'s options (without `type` and `id`) as QEMU does.
    pub fn parse(opts: &[(String, Option<String>)]) -> Result<Self, NetError> {
        // QAPI's visitor first: unknown keys, booleans, numbers; a scalar given twice
        // keeps its last value, lists collect every value.
        let mut scalar = std::collections::HashMap::<&str, &str>::new();
        let mut lists = std::collections::HashMap::<&str, Vec<&str>>::new();
        for (k, v) in opts {
            let Some(key) = KEYS.iter().find(|known| **known == k.as_str()) else {
                return Err(NetError::invalid(format!("Invalid parameter '{k}'")));
            };
            match *key {
                "hostfwd" | "guestfwd" | "dnssearch" => {
                    lists.entry(key).or_default().push(value(v))
                }
                _ => {
                    scalar.insert(key, value(v));
                }
            }
        }
        let get = |k: &str| scalar.get(k).copied();
        let list = |k: &str| lists.get(k).cloned().unwrap_or_default();
        let flag = |k: &str| get(k).map(|v| parse_bool(k, Some(v))).transpose();

        // net/net.c: `ipv6-net=PREFIX[/LEN]` stands for ipv6-prefix and ipv6-prefixlen.
        let mut prefix6_str = get("ipv6-prefix");
        let mut prefix6_len: Option<i64> = None;
        if let Some(n) = get("ipv6-net") {
            let (addr, len) = match n.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (n, None),
            };
            prefix6_str = Some(addr);
            prefix6_len = Some(match len {
                None => 64,
                Some(l) => l.parse().map_err(|_| {
                    NetError::invalid("Parameter 'ipv6-prefixlen' expects a number")
                })?,
            });
        } else if let Some(l) = get("ipv6-prefixlen") {
            prefix6_len = Some(l.parse().map_err(|_| {
                NetError::invalid("Parameter 'ipv6-prefixlen' expects an int64 value")
            })?);
        }
        let restrict = flag("restrict")?.unwrap_or(false);
        let has_ipv4 = flag("ipv4")?;
        let has_ipv6 = flag("ipv6")?;

        // net_init_slirp: ipv4=on alone turns IPv6 off and the other way round.
        let ipv4 = !matches!((has_ipv4, has_ipv6), (Some(false), _) | (None, Some(true)));
        let ipv6 = !matches!((has_ipv4, has_ipv6), (_, Some(false)) | (Some(true), None));
        let vnet = get("net")
            .map(str::to_string)
            .or_else(|| get("ip").map(|ip| format!("{ip}/24")));

        // net_slirp_init.
        let (vhost, vdns) = (get("host"), get("dns"));
        let (vhost6, vdns6) = (get("ipv6-host"), get("ipv6-dns"));
        if !ipv4 && (vnet.is_some() || vhost.is_some() || vdns.is_some()) {
            return Err(NetError::invalid(
                "IPv4 disabled but netmask/host/dns provided",
            ));
        }
        if !ipv6 && (prefix6_str.is_some() || vhost6.is_some() || vdns6.is_some()) {
            return Err(NetError::invalid(
                "IPv6 disabled but prefix/host6/dns6 provided",
            ));
        }
        if !ipv4 && !ipv6 {
            return Err(NetError::invalid("IPv4 and IPv6 disabled"));
        }

        let mut net = u32::from(Ipv4Addr::new(10, 0, 2, 0));
        let mut mask = u32::from(Ipv4Addr::new(255, 255, 255, 0));
        let mut host = u32::from(Ipv4Addr::new(10, 0, 2, 2));
        let mut dhcp = u32::from(Ipv4Addr::new(10, 0, 2, 15));
        let mut dns = u32::from(Ipv4Addr::new(10, 0, 2, 3));
        if let Some(vnet) = vnet {
            let bad = || NetError::invalid("Failed to parse netmask");
            match vnet.split_once('/') {
                None => {
                    net = inet_aton(&vnet).ok_or_else(bad)?.into();
                    mask = classful_mask(net);
                }
                Some((addr, m)) => {
                    net = inet_aton(addr).ok_or_else(bad)?.into();
                    mask = match strtol(m) {
                        Some(shift) if (4..=32).contains(&shift) => {
                            // 4..=32, so the shift is below 32 bits.
                            u32::MAX.checked_shl(32 - shift as u32).unwrap_or(0)
                        }
                        Some(_) => {
                            return Err(NetError::invalid(
                                "Invalid netmask provided (must be in range 4-32)",
                            ))
                        }
                        None => inet_aton(m)
                            .ok_or_else(|| {
                                NetError::invalid("Failed to parse netmask (trailing chars)")
                            })?
                            .into(),
                    };
                }
            }
            net &= mask;
            host = net | (0x0202 & !mask);
            dhcp = net | (0x020f & !mask);
            dns = net | (0x0203 & !mask);
        }
        if let Some(h) = vhost {
            host = inet_aton(h)
                .ok_or_else(|| NetError::invalid("Failed to parse host"))?
                .into();
        }
        if host & mask != net {
            return Err(NetError::invalid("Host doesn't belong to network"));
        }
        if let Some(d) = vdns {
            dns = inet_aton(d)
                .ok_or_else(|| NetError::invalid("Failed to parse DNS"))?
                .into();
        }
        if restrict && dns & mask != net {
            return Err(NetError::invalid("DNS doesn't belong to network"));
        }
        if dns == host {
            return Err(NetError::invalid("DNS must be different from host"));
        }
        if let Some(d) = get("dhcpstart") {
            dhcp = inet_aton(d)
                .ok_or_else(|| NetError::invalid("Failed to parse DHCP start address"))?
                .into();
        }
        if dhcp & mask != net {
            return Err(NetError::invalid("DHCP doesn't belong to network"));
        }
        if dhcp == host || dhcp == dns {
            return Err(NetError::invalid(
                "DHCP must be different from host and DNS",
            ));
        }
        if let Some(s) = get("smbserver") {
            inet_aton(s).ok_or_else(|| NetError::invalid("Failed to parse SMB address"))?;
        }

        let prefix6: Ipv6Addr = prefix6_str
            .unwrap_or("fec0::")
            .parse()
            .map_err(|_| NetError::invalid("Failed to parse IPv6 prefix"))?;
        let prefix6_len =
            match prefix6_len.unwrap_or(0) {
                0 => 64,
                l @ 1..=126 => l as u8,
                _ => return Err(NetError::invalid(
                    "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)",
                )),
            };
        let with_last = |last: u8| {
            let mut o = prefix6.octets();
            o[15] |= last;
            Ipv6Addr::from(o)
        };
        let host6 = match vhost6 {
            Some(h) => {
                let h: Ipv6Addr = h
                    .parse()
                    .map_err(|_| NetError::invalid("Failed to parse IPv6 host"))?;
                if !in6_equal_net(prefix6, h, prefix6_len) {
                    return Err(NetError::invalid("IPv6 Host doesn't belong to network"));
                }
                h
            }
            None => with_last(2),
        };
        let dns6 = match vdns6 {
            Some(d) => {
                let d: Ipv6Addr = d
                    .parse()
                    .map_err(|_| NetError::invalid("Failed to parse IPv6 DNS"))?;
                if restrict && !in6_equal_net(prefix6, d, prefix6_len) {
                    return Err(NetError::invalid("IPv6 DNS doesn't belong to network"));
                }
                d
            }
            None => with_last(3),
        };

        let domainname = get("domainname").map(str::to_string);
        if domainname.as_deref() == Some("") {
            return Err(NetError::invalid("'domainname' parameter cannot be empty"));
        }
        if domainname.as_ref().is_some_and(|d| d.len() > 255) {
            return Err(NetError::invalid(
                "'domainname' parameter cannot exceed 255 bytes",
            ));
        }
        let hostname = get("hostname").map(str::to_string);
        if hostname.as_ref().is_some_and(|h| h.len() > 255) {
            return Err(NetError::invalid(
                "'vhostname' parameter cannot exceed 255 bytes",
            ));
        }
        let tftp_server_name = get("tftp-server-name").map(str::to_string);
        if tftp_server_name.as_ref().is_some_and(|h| h.len() > 255) {
            return Err(NetError::invalid(
                "'tftp-server-name' parameter cannot exceed 255 bytes",
            ));
        }
        // libslirp takes C strings.
        let strings = [&hostname, &domainname, &tftp_server_name];
        let more = [get("tftp"), get("bootfile")];
        if strings
            .iter()
            .filter_map(|s| s.as_deref())
            .chain(more.into_iter().flatten())
            .chain(list("dnssearch"))
            .any(|s| s.contains('\0'))
        {
            return Err(NetError::invalid("Parameter values cannot contain NUL"));
        }

        // QEMU applies the forwarding rules after creating the stack, from a list each
        // rule was prepended to (guestfwd after hostfwd): the guest rules come first, and
        // each kind in reverse order.
        if let Some(rule) = list("guestfwd").last() {
            check_guestfwd(rule)?;
            return Err(NetError::invalid(format!(
                "guestfwd is not supported by qomvm (rule '{rule}')"
            )));
        }
        let mut hostfwd = Vec::new();
        for rule in list("hostfwd").into_iter().rev() {
            hostfwd.push((rule.to_string(), Hostfwd::parse(rule)?));
        }
        if get("smb").is_some() {
            return Err(NetError::invalid(
                "smb= is not supported by qomvm (it has no SMB server)",
            ));
        }

        Ok(UserConfig {
            restrict,
            ipv4,
            ipv6,
            net: net.into(),
            mask: mask.into(),
            host: host.into(),
            dhcp_start: dhcp.into(),
            dns: dns.into(),
            prefix6,
            prefix6_len,
            host6,
            dns6,
            hostname,
            domainname,
            dnssearch: list("dnssearch").into_iter().map(str::to_string).collect(),
            tftp: get("tftp").map(str::to_string),
            bootfile: get("bootfile").map(str::to_string),
            tftp_server_name,
            hostfwd,
        })
    }

    /// QEMU's `info_str`: `net=10.0.2.0,restrict=off`.
    pub fn info_str(&self) -> String {
        format!(
            "net={},restrict={}",
            self.net,
            if self.restrict { "on" } else { "off" }
        )
    }
}

impl Hostfwd {
    /// QEMU's `slirp_hostfwd` syntax check, with its reasons:
    /// `Invalid host forwarding rule 'RULE' (REASON)`.
    pub fn parse(rule: &str) -> Result<Self, NetError> {
        let fail = |reason: &str| {
            NetError::invalid(format!("Invalid host forwarding rule '{rule}' ({reason})"))
        };
        let (proto, p) = rule
            .split_once(':')
            .ok_or_else(|| fail("No : separators"))?;
        let udp = match proto {
            "tcp" | "" => false,
            "udp" => true,
            _ => return Err(fail("Bad protocol name")),
        };
        let (haddr, p) = p
            .split_once(':')
            .ok_or_else(|| fail("Missing : separator"))?;
        let host_addr = if haddr.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            inet_aton(haddr).ok_or_else(|| fail("Bad host address"))?
        };
        let (hport, p) = p
            .split_once('-')
            .ok_or_else(|| fail("Bad host port separator"))?;
        let host_port = strtoi(hport)
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| fail("Bad host port"))?;
        let (gaddr, gport) = p
            .split_once(':')
            .ok_or_else(|| fail("Missing guest address"))?;
        let guest_addr = if gaddr.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            inet_aton(gaddr).ok_or_else(|| fail("Bad guest address"))?
        };
        let guest_port = strtoi(gport)
            .and_then(|v| u16::try_from(v).ok())
            .filter(|v| *v >= 1)
            .ok_or_else(|| fail("Bad guest port"))?;
        Ok(Hostfwd {
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// `hostfwd_remove`'s `[tcp|udp]:[hostaddr]:hostport`; `None` is QEMU's "invalid format".
pub fn parse_hostfwd_remove(rule: &str) -> Option<(bool, Ipv4Addr, u16)> {
    let (proto, p) = rule.split_once(':')?;
    let udp = match proto {
        "tcp" | "" => false,
        "udp" => true,
        _ => return None,
    };
    let (haddr, port) = p.split_once(':')?;
    let addr = if haddr.is_empty() {
        Ipv4Addr::UNSPECIFIED
    } else {
        inet_aton(haddr)?
    };
    // qemu_strtoi base 10 into an int, then htons: only the low 16 bits count.
    let port: i32 = port.parse().ok()?;
    Some((udp, addr, port as u16))
}

/// QEMU's `slirp_guestfwd` syntax check: `[tcp]:[server]:port-dev`.
fn check_guestfwd(rule: &str) -> Result<(), NetError> {
    let fail = || NetError::invalid(format!("Invalid guest forwarding rule '{rule}'"));
    let (proto, p) = rule.split_once(':').ok_or_else(fail)?;
    if !proto.is_empty() && proto != "tcp" {
        return Err(fail());
    }
    let (server, p) = p.split_once(':').ok_or_else(fail)?;
    if !server.is_empty() && inet_aton(server).is_none() {
        return Err(fail());
    }
    let (port, _dev) = p.split_once('-').ok_or_else(fail)?;
    match port.parse::<u32>() {
        Ok(1..=65535) => Ok(()),
        _ => Err(fail()),
    }
}

/// QEMU's mask for `net=ADDR` without one (historic classful networks).
fn classful_mask(addr: u32) -> u32 {
    if addr & 0x8000_0000 == 0 {
        0xff00_0000 // class A
    } else if addr & 0xfff0_0000 == 0xac10_0000 {
        0xfff0_0000 // 172.16.0.0/12
    } else if addr & 0xc000_0000 == 0x8000_0000 || addr & 0xffff_0000 == 0xc0a8_0000 {
        0xffff_0000 // class B, 192.168.0.0/16
    } else if addr & 0xffff_0000 == 0xc612_0000 {
        0xfffe_0000 // 198.18.0.0/15
    } else if addr & 0xe000_0000 == 0xe000_0000 {
        0xffff_ff00 // "class C", as QEMU tests it
    } else {
        0xffff_fff0 // multicast/reserved
    }
}

/// Whether `a` and `b` share their first `len` bits (QEMU's `in6_equal_net`).
fn in6_equal_net(a: Ipv6Addr, b: Ipv6Addr, len: u8) -> bool {
    let (a, b) = (u128::from(a), u128::from(b));
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    a & mask == b & mask
}

/// C's `strtol(s, &end, 10)` with `*end == '\0'` required: `None` when characters
/// trail (an empty string is 0, as strtol leaves `end` at its start).
fn strtol(s: &str) -> Option<i64> {
    if s.is_empty() {
        return Some(0);
    }
    s.trim_start().parse().ok()
}

/// QEMU's `qemu_strtoi(s, &end, 0, ..)`: decimal, `0x` hex or `0` octal, optional sign,
/// nothing trailing, within an int.
fn strtoi(s: &str) -> Option<i64> {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let v = parse_c_number(digits)?;
    let v = if neg { -v } else { v };
    (i64::from(i32::MIN)..=i64::from(i32::MAX))
        .contains(&v)
        .then_some(v)
}

/// One C integer literal: `0x1f`, `017`, `15`.
fn parse_c_number(s: &str) -> Option<i64> {
    if s.is_empty() {
        return None;
    }
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    i64::from_str_radix(digits, radix).ok()
}

/// glibc's `inet_aton`: one to four parts (`a`, `a.b`, `a.b.c`, `a.b.c.d`), each decimal,
/// octal or hex, the last filling the remaining bytes.
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    // glibc stops at whitespace and ignores what follows.
    let s = s.split(|c: char| c.is_ascii_whitespace()).next()?;
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut vals = Vec::with_capacity(4);
    for p in &parts {
        let v = parse_c_number(p)?;
        vals.push(u32::try_from(v).ok()?);
    }
    let (last, head) = vals.split_last()?;
    if head.iter().any(|v| *v > 0xff) {
        return None;
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 32 && *last >> room != 0 {
        return None;
    }
    let mut addr = *last;
    for (i, v) in head.iter().enumerate() {
        addr |= v << (24 - 8 * i);
    }
    Some(Ipv4Addr::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(text: &str) -> Vec<(String, Option<String>)> {
        crate::parse_opts(text)
    }

    fn err(text: &str) -> String {
        UserConfig::parse(&opts(text)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_qemus() {
        let c = UserConfig::parse(&[]).unwrap();
        assert_eq!(c.net, Ipv4Addr::new(10, 0, 2, 0));
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.host, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(c.dns, Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.prefix6, "fec0::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.prefix6_len, 64);
        assert_eq!(c.host6, "fec0::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(c.dns6, "fec0::3".parse::<Ipv6Addr>().unwrap());
        assert!(c.ipv4 && c.ipv6 && !c.restrict);
        assert_eq!(c.info_str(), "net=10.0.2.0,restrict=off");
    }

    #[test]
    fn net_moves_host_dns_and_dhcp() {
        let c = UserConfig::parse(&opts("net=192.168.76.0/24,restrict=on")).unwrap();
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(c.dns, Ipv4Addr::new(192, 168, 76, 3));
        assert_eq!(c.dhcp_start, Ipv4Addr::new(192, 168, 76, 15));
        assert_eq!(c.info_str(), "net=192.168.76.0,restrict=on");
        // Host bits are cleared; a dotted mask works; classful without a mask.
        let c = UserConfig::parse(&opts("net=10.1.2.3/255.255.0.0")).unwrap();
        assert_eq!(
            (c.net, c.host),
            ("10.1.0.0".parse().unwrap(), "10.1.2.2".parse().unwrap())
        );
        let c = UserConfig::parse(&opts("net=192.168.5.0")).unwrap();
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 2, 2));
        // The legacy ip= is net=IP/24.
        let c = UserConfig::parse(&opts("ip=10.9.8.7")).unwrap();
        assert_eq!(c.net, Ipv4Addr::new(10, 9, 8, 0));
    }

    #[test]
    fn ipv4_ipv6_switches() {
        let c = UserConfig::parse(&opts("ipv4=on")).unwrap();
        assert!(c.ipv4 && !c.ipv6);
        let c = UserConfig::parse(&opts("ipv6=on")).unwrap();
        assert!(!c.ipv4 && c.ipv6);
        let c = UserConfig::parse(&opts("ipv6-net=fd00:1::/48")).unwrap();
        assert_eq!(c.prefix6_len, 48);
        assert_eq!(c.host6, "fd00:1::2".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn bad_options_get_qemus_errors() {
        // Each expected message is what qemu-system-x86_64 7.2 prints for the same option.
        let cases = [
            ("foo=bar", "Invalid parameter 'foo'"),
            ("net=bogus", "Failed to parse netmask"),
            ("net", "Failed to parse netmask"),
            ("ip=bogus", "Failed to parse netmask"),
            (
                "net=10.0.2.0/33",
                "Invalid netmask provided (must be in range 4-32)",
            ),
            (
                "net=10.0.2.0/",
                "Invalid netmask provided (must be in range 4-32)",
            ),
            ("net=10.0.2.0/x", "Failed to parse netmask (trailing chars)"),
            (
                "net=10.0.2.0/255.255.255.x",
                "Failed to parse netmask (trailing chars)",
            ),
            ("host=1.2.3.4", "Host doesn't belong to network"),
            ("host=x", "Failed to parse host"),
            ("dns=10.0.2.2", "DNS must be different from host"),
            ("dns=x", "Failed to parse DNS"),
            ("dns=1.1.1.1,restrict=on", "DNS doesn't belong to network"),
            (
                "dhcpstart=10.0.2.2",
                "DHCP must be different from host and DNS",
            ),
            ("dhcpstart=1.2.3.4", "DHCP doesn't belong to network"),
            (
                "net=10.0.2.0/24,dhcpstart=10.0.3.5",
                "DHCP doesn't belong to network",
            ),
            ("dhcpstart=z", "Failed to parse DHCP start address"),
            (
                "restrict=maybe",
                "Parameter 'restrict' expects 'on' or 'off'",
            ),
            ("ipv4=maybe", "Parameter 'ipv4' expects 'on' or 'off'"),
            ("ipv4=off,ipv6=off", "IPv4 and IPv6 disabled"),
            (
                "ipv4=off,net=10.0.3.0",
                "IPv4 disabled but netmask/host/dns provided",
            ),
            (
                "ipv6=off,ipv6-net=fec0::/64",
                "IPv6 disabled but prefix/host6/dns6 provided",
            ),
            (
                "ipv6-net=fec0::/x",
                "Parameter 'ipv6-prefixlen' expects a number",
            ),
            ("ipv6-net=zz", "Failed to parse IPv6 prefix"),
            (
                "ipv6-net=fec0::/127",
                "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)",
            ),
            (
                "ipv6-net=fec0::/-5",
                "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)",
            ),
            (
                "ipv6-prefixlen=x",
                "Parameter 'ipv6-prefixlen' expects an int64 value",
            ),
            (
                "ipv6-prefixlen=200",
                "Invalid IPv6 prefix provided (IPv6 prefix length must be between 0 and 126)",
            ),
            ("ipv6-host=zz", "Failed to parse IPv6 host"),
            ("ipv6-host=fec1::2", "IPv6 Host doesn't belong to network"),
            ("ipv6-dns=zz", "Failed to parse IPv6 DNS"),
            ("domainname=", "'domainname' parameter cannot be empty"),
            ("smbserver=zz", "Failed to parse SMB address"),
            (
                "hostfwd=bogus",
                "Invalid host forwarding rule 'bogus' (No : separators)",
            ),
            (
                "hostfwd=xyz:1-:2",
                "Invalid host forwarding rule 'xyz:1-:2' (Bad protocol name)",
            ),
            (
                "hostfwd=tcp:1",
                "Invalid host forwarding rule 'tcp:1' (Missing : separator)",
            ),
            (
                "hostfwd=tcp:x:1-:2",
                "Invalid host forwarding rule 'tcp:x:1-:2' (Bad host address)",
            ),
            (
                "hostfwd=tcp::1",
                "Invalid host forwarding rule 'tcp::1' (Bad host port separator)",
            ),
            (
                "hostfwd=tcp::99999-:2",
                "Invalid host forwarding rule 'tcp::99999-:2' (Bad host port)",
            ),
            (
                "hostfwd=tcp::1-2",
                "Invalid host forwarding rule 'tcp::1-2' (Missing guest address)",
            ),
            (
                "hostfwd=tcp::1-x:2",
                "Invalid host forwarding rule 'tcp::1-x:2' (Bad guest address)",
            ),
            (
                "hostfwd=tcp::1-:0",
                "Invalid host forwarding rule 'tcp::1-:0' (Bad guest port)",
            ),
            (
                "hostfwd=tcp::1-:x",
                "Invalid host forwarding rule 'tcp::1-:x' (Bad guest port)",
            ),
            ("guestfwd=bogus", "Invalid guest forwarding rule 'bogus'"),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "for {text}");
        }
        // Scalars keep the last value given, as QemuOpts does.
        assert!(UserConfig::parse(&opts("net=bogus,net=10.0.3.0/24")).is_ok());
        // What qomvm does not do is refused, not ignored.
        assert!(err("guestfwd=tcp:10.0.2.100:1234-cmd:cat").contains("not supported"));
        assert!(err("smb=/tmp").contains("not supported"));
    }

    #[test]
    fn hostfwd_rules_parse() {
        let h = Hostfwd::parse("tcp:127.0.0.1:2222-:22").unwrap();
        assert_eq!(
            h,
            Hostfwd {
                udp: false,
                host_addr: Ipv4Addr::LOCALHOST,
                host_port: 2222,
                guest_addr: Ipv4Addr::UNSPECIFIED,
                guest_port: 22
            }
        );
        let h = Hostfwd::parse("udp::0x10-10.0.2.20:010").unwrap();
        assert!(h.udp);
        assert_eq!((h.host_port, h.guest_port), (16, 8));
        assert_eq!(h.guest_addr, Ipv4Addr::new(10, 0, 2, 20));
        let h = Hostfwd::parse(":1.2.3.4:5-:6").unwrap();
        assert!(!h.udp);
        let c = UserConfig::parse(&opts("hostfwd=tcp::1-:2,hostfwd=udp::3-:4")).unwrap();
        // Applied in reverse, as QEMU's prepended list does.
        assert_eq!(c.hostfwd[0].0, "udp::3-:4");
        assert_eq!(
            parse_hostfwd_remove("tcp::22"),
            Some((false, Ipv4Addr::UNSPECIFIED, 22))
        );
        assert_eq!(
            parse_hostfwd_remove("udp:127.0.0.1:5"),
            Some((true, Ipv4Addr::LOCALHOST, 5))
        );
        assert_eq!(parse_hostfwd_remove("sctp::5"), None);
        assert_eq!(parse_hostfwd_remove("tcp:22"), None);
        assert_eq!(parse_hostfwd_remove("tcp::x"), None);
    }

    #[test]
    fn inet_aton_is_glibcs() {
        assert_eq!(inet_aton("10.0.2.15"), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(inet_aton("10"), Some(Ipv4Addr::new(0, 0, 0, 10)));
        assert_eq!(inet_aton("10.1"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(inet_aton("0x0a.0.2.010"), Some(Ipv4Addr::new(10, 0, 2, 8)));
        assert_eq!(inet_aton("256.0.0.1"), None);
        assert_eq!(inet_aton("1.2.3.4.5"), None);
        assert_eq!(inet_aton("1..3"), None);
        assert_eq!(inet_aton(""), None);
        assert_eq!(inet_aton("09"), None);
    }
}
