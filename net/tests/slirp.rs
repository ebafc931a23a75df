//! `-netdev user` end to end: hand-made Ethernet frames through [`NetQueue::send`] and
//! back through [`NetQueue::receive`], as a guest's NIC moves them. Only loopback is
//! reached: the gateway 10.0.2.2 is the host's 127.0.0.1.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use net::slirp::{self, SlirpNetdev, MAX_FRAME_LEN, QUEUE_LEN};
use net::{NetQueue, Netdev, NetdevKind};
use vm_memory::VolatileSlice;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_IP: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

fn opts(text: &str) -> Vec<(String, Option<String>)> {
    net::parse_opts(text)
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

// ---- Frames ----

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sender_ip: Ipv4Addr, target_mac: [u8; 6], target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&target_mac);
    a.extend_from_slice(&target_ip.octets());
    let dst = if op == 1 { BROADCAST } else { target_mac };
    eth(dst, ETH_ARP, &a)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

#[allow(clippy::too_many_arguments)]
fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data: &[u8],
) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(data);
    let sum = checksum(&[&pseudo(src, dst, 6, t.len()), &t]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    eth(BROADCAST, ETH_IP, &ipv4(src, dst, 6, &t))
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum
    u.extend_from_slice(data);
    eth(BROADCAST, ETH_IP, &ipv4(src, dst, 17, &u))
}

fn dhcp_discover(xid: u32) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1; // Ethernet
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[28..34].copy_from_slice(&GUEST_MAC);
    // Options (libslirp reads a whole 312-byte vendor area).
    let mut opt = vec![0x63, 0x82, 0x53, 0x63, 53, 1, 1, 255];
    opt.resize(312, 0);
    b.extend_from_slice(&opt);
    udp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67, &b)
}

/// An ICMP echo request.
fn ping(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    let sum = checksum(&[&i]);
    i[2..4].copy_from_slice(&sum.to_be_bytes());
    eth(BROADCAST, ETH_IP, &ipv4(src, dst, 1, &i))
}

// ---- Parsing what slirp sends ----

fn ethertype(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[12], f[13]])
}

/// An ARP frame's (op, sender MAC, sender IP, target MAC, target IP).
type Arp = (u16, [u8; 6], Ipv4Addr, [u8; 6], Ipv4Addr);

fn parse_arp(f: &[u8]) -> Option<Arp> {
    if f.len() < 42 || ethertype(f) != ETH_ARP {
        return None;
    }
    let a = &f[14..];
    Some((
        u16::from_be_bytes([a[6], a[7]]),
        a[8..14].try_into().unwrap(),
        ip(a[14..18].try_into().unwrap()),
        a[18..24].try_into().unwrap(),
        ip(a[24..28].try_into().unwrap()),
    ))
}

/// An IPv4 frame's (protocol, source, destination, layer-4 bytes).
fn parse_ipv4(f: &[u8]) -> Option<(u8, Ipv4Addr, Ipv4Addr, &[u8])> {
    if f.len() < 34 || ethertype(f) != ETH_IP {
        return None;
    }
    let h = &f[14..];
    let ihl = usize::from(h[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let l4 = h.get(ihl..total)?;
    Some((
        h[9],
        ip(h[12..16].try_into().unwrap()),
        ip(h[16..20].try_into().unwrap()),
        l4,
    ))
}

struct Segment {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data: Vec<u8>,
}

fn parse_tcp(f: &[u8]) -> Option<Segment> {
    let (proto, src, dst, t) = parse_ipv4(f)?;
    if proto != 6 || t.len() < 20 {
        return None;
    }
    let off = usize::from(t[12] >> 4) * 4;
    Some(Segment {
        src,
        dst,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes(t[4..8].try_into().unwrap()),
        ack: u32::from_be_bytes(t[8..12].try_into().unwrap()),
        flags: t[13],
        data: t.get(off..)?.to_vec(),
    })
}

/// A DHCP reply's (message type, yiaddr, server identifier).
fn parse_dhcp(f: &[u8]) -> Option<(u8, Ipv4Addr, Option<Ipv4Addr>)> {
    let (proto, _, _, u) = parse_ipv4(f)?;
    if proto != 17 || u.len() < 8 + 240 || u[0..4] != [0, 67, 0, 68] {
        return None;
    }
    let b = &u[8..];
    let yiaddr = ip(b[16..20].try_into().unwrap());
    let (mut kind, mut server) = (0, None);
    let mut opts = &b[240..];
    while let [code, rest @ ..] = opts {
        match code {
            255 => break,
            0 => opts = rest,
            _ => {
                let len = usize::from(*rest.first()?);
                let val = rest.get(1..1 + len)?;
                match code {
                    53 => kind = val[0],
                    54 => server = Some(ip(val.try_into().ok()?)),
                    _ => {}
                }
                opts = &rest[1 + len..];
            }
        }
    }
    Some((kind, yiaddr, server))
}

// ---- The guest's side of the queue ----

struct Guest {
    netdev: Arc<SlirpNetdev>,
    queue: Arc<dyn NetQueue>,
    ip: Ipv4Addr,
}

impl Guest {
    fn new(options: &str) -> Guest {
        let netdev = slirp::new_slirp("user0", &opts(options)).expect("slirp starts");
        let queue = netdev.queues().pop().unwrap();
        Guest {
            ip: netdev.config().dhcp_start,
            netdev,
            queue,
        }
    }

    fn send(&self, frame: &[u8]) {
        // Two pieces, as a NIC gathers a frame from descriptors.
        let mut frame = frame.to_vec();
        let len = frame.len();
        let cut = len.min(7);
        let (a, b) = frame.split_at_mut(cut);
        let n = self
            .queue
            .send(&[VolatileSlice::from(a), VolatileSlice::from(b)])
            .expect("send never fails");
        assert_eq!(n, len);
    }

    fn try_receive(&self) -> Option<Vec<u8>> {
        let mut a = vec![0u8; 20];
        let mut b = vec![0u8; MAX_FRAME_LEN - 20];
        match self.queue.receive(&[
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ]) {
            Ok(n) => {
                a.extend_from_slice(&b);
                a.truncate(n);
                Some(a)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("receive: {e}"),
        }
    }

    /// Whether `rx_fd` polls readable within `ms`.
    fn readable(&self, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd: self.queue.rx_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, ms) == 1 }
    }

    /// Frames until `want` matches one (answering slirp's ARP requests for the guest, as
    /// a guest's stack would), or `None` after `secs`.
    fn wait_for(&self, secs: u64, mut want: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if !self.readable(50) {
                continue;
            }
            while let Some(f) = self.try_receive() {
                if let Some((1, mac, sip, _, tip)) = parse_arp(&f) {
                    if tip == self.ip {
                        self.send(&arp(2, self.ip, mac, sip));
                    }
                }
                if want(&f) {
                    return Some(f);
                }
            }
        }
        None
    }

    /// Tells slirp the guest's MAC address (an ARP request for the gateway) and waits
    /// for the reply.
    fn announce(&self) {
        let gw = self.netdev.config().host;
        self.send(&arp(1, self.ip, [0; 6], gw));
        self.wait_for(
            5,
            |f| matches!(parse_arp(f), Some((2, _, s, _, _)) if s == gw),
        )
        .expect("ARP reply from the gateway");
    }
}

#[test]
fn arp_for_the_gateway_is_answered() {
    let g = Guest::new("");
    assert!(!g.readable(0), "nothing to read before the guest speaks");
    g.send(&arp(1, ip([10, 0, 2, 15]), [0; 6], ip([10, 0, 2, 2])));
    let reply = g
        .wait_for(5, |f| parse_arp(f).is_some())
        .expect("an ARP frame");
    let (op, smac, sip, tmac, tip) = parse_arp(&reply).unwrap();
    assert_eq!(op, 2);
    assert_eq!(sip, ip([10, 0, 2, 2]));
    // libslirp's own address: 52:55 and the IP.
    assert_eq!(smac, [0x52, 0x55, 10, 0, 2, 2]);
    assert_eq!((tmac, tip), (GUEST_MAC, ip([10, 0, 2, 15])));
    assert_eq!(&reply[0..6], &GUEST_MAC);
    // All read: the fd is quiet again.
    assert!(g.try_receive().is_none());
    assert!(!g.readable(0));

    // Nobody answers for an address that is not slirp's.
    g.send(&arp(1, ip([10, 0, 2, 15]), [0; 6], ip([10, 0, 2, 77])));
    assert!(g.wait_for(1, |f| parse_arp(f).is_some()).is_none());

    let info = g.netdev.info();
    assert_eq!(info.kind, NetdevKind::User);
    assert_eq!(info.id, "user0");
    assert_eq!(info.info_str, "net=10.0.2.0,restrict=off");
    assert_eq!(g.netdev.max_frame_len(), 1514);
    assert!(!g.netdev.has_vnet_hdr());
}

fn dhcp_offer(options: &str) -> (u8, Ipv4Addr, Option<Ipv4Addr>) {
    let g = Guest::new(options);
    g.send(&dhcp_discover(0x1234_5678));
    let f = g
        .wait_for(5, |f| parse_dhcp(f).is_some())
        .expect("a DHCP reply");
    parse_dhcp(&f).unwrap()
}

#[test]
fn dhcp_offers_the_first_address() {
    assert_eq!(
        dhcp_offer(""),
        (2, ip([10, 0, 2, 15]), Some(ip([10, 0, 2, 2])))
    );
    assert_eq!(
        dhcp_offer("net=192.168.76.0/24"),
        (2, ip([192, 168, 76, 15]), Some(ip([192, 168, 76, 2])))
    );
    assert_eq!(
        dhcp_offer("dhcpstart=10.0.2.40"),
        (2, ip([10, 0, 2, 40]), Some(ip([10, 0, 2, 2])))
    );
}

#[test]
fn a_guest_connection_reaches_a_host_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let g = Guest::new("");
    g.announce();

    let (me, gw) = (g.ip, ip([10, 0, 2, 2]));
    let isn = 1000;
    g.send(&tcp(me, gw, 40000, port, isn, 0, TCP_SYN, &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut accepted = None;
    while accepted.is_none() && Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => accepted = Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    let mut host = accepted.expect("slirp connected to the listener");
    let synack = g
        .wait_for(5, |f| parse_tcp(f).is_some_and(|s| s.dport == 40000))
        .expect("a SYN-ACK");
    let s = parse_tcp(&synack).unwrap();
    assert_eq!((s.src, s.dst, s.sport), (gw, me, port));
    assert_eq!(s.flags & (TCP_SYN | TCP_ACK), TCP_SYN | TCP_ACK);
    assert_eq!(s.ack, isn + 1);

    // Bytes both ways.
    let (seq, ack) = (isn + 1, s.seq.wrapping_add(1));
    g.send(&tcp(me, gw, 40000, port, seq, ack, TCP_ACK, &[]));
    g.send(&tcp(
        me,
        gw,
        40000,
        port,
        seq,
        ack,
        TCP_ACK | TCP_PSH,
        b"hello",
    ));
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    host.write_all(b"world").unwrap();
    let data = g
        .wait_for(5, |f| parse_tcp(f).is_some_and(|s| !s.data.is_empty()))
        .expect("data from the host");
    assert_eq!(parse_tcp(&data).unwrap().data, b"world");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn hostfwd_forwards_a_host_connection_to_the_guest() {
    let port = free_port();
    let g = Guest::new(&format!("hostfwd=tcp:127.0.0.1:{port}-:2222"));
    g.announce();
    let _host = TcpStream::connect(("127.0.0.1", port)).expect("slirp listens");
    let syn = g
        .wait_for(10, |f| parse_tcp(f).is_some_and(|s| s.dport == 2222))
        .expect("a SYN towards the guest");
    let s = parse_tcp(&syn).unwrap();
    assert_eq!(s.flags & (TCP_SYN | TCP_ACK), TCP_SYN);
    assert_eq!((s.src, s.dst), (ip([10, 0, 2, 2]), ip([10, 0, 2, 15])));
    let info = g.netdev.connection_info();
    assert!(info.contains("HOST_FORWARD"), "{info}");
    assert!(info.contains(&port.to_string()), "{info}");
}

#[test]
fn a_taken_host_port_is_qemus_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let rule = format!("tcp:127.0.0.1:{port}-:22");
    let err = slirp::new_slirp("taken", &opts(&format!("hostfwd={rule}")))
        .err()
        .expect("the port is in use");
    assert_eq!(
        err.to_string(),
        format!("Could not set up host forwarding rule '{rule}'")
    );
}

#[test]
fn monitor_hostfwd_add_and_remove() {
    let netdev = slirp::new_slirp("hmp0", &[]).unwrap();
    let port = free_port();
    let rule = format!("tcp:127.0.0.1:{port}-:22");
    assert_eq!(slirp::hostfwd_add(Some("hmp0"), &rule), Ok(()));
    // Its port is slirp's now.
    assert_eq!(
        slirp::hostfwd_add(Some("hmp0"), &rule),
        Err(format!("Could not set up host forwarding rule '{rule}'"))
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(slirp::usernet_info().contains("Hub -1 (hmp0):\n"));

    let spec = format!("tcp:127.0.0.1:{port}");
    assert_eq!(
        slirp::hostfwd_remove(Some("hmp0"), &spec),
        Ok(format!("host forwarding rule for {spec} removed"))
    );
    assert_eq!(
        slirp::hostfwd_remove(Some("hmp0"), &spec),
        Ok(format!("host forwarding rule for {spec} not found"))
    );
    assert_eq!(
        slirp::hostfwd_remove(Some("hmp0"), "sctp::1"),
        Err("invalid format".to_string())
    );
    assert_eq!(
        slirp::hostfwd_add(Some("hmp0"), "tcp:1"),
        Err("Invalid host forwarding rule 'tcp:1' (Missing : separator)".to_string())
    );
    assert_eq!(
        slirp::hostfwd_add(Some("nosuch"), &rule),
        Err("unrecognized netdev id 'nosuch'".to_string())
    );

    // Once cleaned up (netdev_del), the stack is gone from the monitor's view.
    netdev.cleanup();
    assert_eq!(
        slirp::hostfwd_add(Some("hmp0"), &rule),
        Err("unrecognized netdev id 'hmp0'".to_string())
    );
    assert!(!slirp::usernet_info().contains("(hmp0)"));
}

#[test]
fn netdev_add_reports_bad_options() {
    let err = |o: &str| net::netdev_add(&opts(o)).unwrap_err().to_string();
    assert_eq!(err("type=user,id=u1,foo=bar"), "Invalid parameter 'foo'");
    assert_eq!(err("type=user,id=u1,net=bogus"), "Failed to parse netmask");
    assert_eq!(
        err("type=user,id=u1,hostfwd=tcp::1-:0"),
        "Invalid host forwarding rule 'tcp::1-:0' (Bad guest port)"
    );
    net::netdev_add(&opts("type=user,id=u2,restrict=on")).unwrap();
    let u2 = net::find_netdev("u2").unwrap();
    assert_eq!(u2.info().info_str, "net=10.0.2.0,restrict=on");
    assert!(net::remove_netdev("u2"));
}

#[test]
fn a_guest_that_does_not_read_loses_the_newest_frames() {
    let g = Guest::new("");
    let extra = 100;
    let request = arp(1, ip([10, 0, 2, 15]), [0; 6], ip([10, 0, 2, 2]));
    for _ in 0..QUEUE_LEN + extra {
        g.send(&request);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let lost = || {
        let (rx, tx) = g.netdev.dropped();
        rx + tx
    };
    while lost() < extra as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(lost(), extra as u64);
    let mut n = 0;
    while let Some(f) = g.try_receive() {
        assert!(parse_arp(&f).is_some());
        n += 1;
    }
    assert_eq!(n, QUEUE_LEN);
    assert!(!g.readable(0));
}

/// An ICMPv6 router solicitation from the guest's link-local address to all routers.
fn router_solicitation() -> Vec<u8> {
    let src: std::net::Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().unwrap();
    let dst: std::net::Ipv6Addr = "ff02::2".parse().unwrap();
    let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let sum = checksum(&[&pseudo, &icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip6 = vec![0x60, 0, 0, 0];
    ip6.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip6.extend_from_slice(&[58, 255]);
    ip6.extend_from_slice(&src.octets());
    ip6.extend_from_slice(&dst.octets());
    ip6.extend_from_slice(&icmp);
    eth([0x33, 0x33, 0, 0, 0, 2], 0x86dd, &ip6)
}

/// A router advertisement's first prefix information option: (length, prefix).
fn parse_ra_prefix(f: &[u8]) -> Option<(u8, std::net::Ipv6Addr)> {
    if f.len() < 14 + 40 + 16 || ethertype(f) != 0x86dd || f[14 + 6] != 58 {
        return None;
    }
    let icmp = &f[14 + 40..];
    if icmp[0] != 134 {
        return None;
    }
    let mut opts = &icmp[16..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == 3 && len == 32 {
            let prefix: [u8; 16] = opts[16..32].try_into().ok()?;
            return Some((opts[2], prefix.into()));
        }
        opts = &opts[len..];
    }
    None
}

#[test]
fn a_router_solicitation_gets_the_ipv6_prefix() {
    let g = Guest::new("ipv6-net=fd00:1234::/48");
    g.send(&router_solicitation());
    let ra = g
        .wait_for(5, |f| parse_ra_prefix(f).is_some())
        .expect("a router advertisement");
    assert_eq!(
        parse_ra_prefix(&ra),
        Some((48, "fd00:1234::".parse().unwrap()))
    );
    // ipv4=on alone turns IPv6 off: no answer.
    let g = Guest::new("ipv4=on");
    g.send(&router_solicitation());
    assert!(g.wait_for(1, |f| parse_ra_prefix(f).is_some()).is_none());
}

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Keeps a mangled IPv4 frame on the virtual network: its destination is one of
/// slirp's own addresses, so nothing can leave the machine whatever the bytes say
/// (and `restrict=on` drops anything bound elsewhere too).
fn keep_local(f: &mut [u8], rng: &mut Rng) {
    if f.len() >= 34 && ethertype(f) == ETH_IP {
        f[30..34].copy_from_slice(&[10, 0, 2, [2, 3, 15, 255][rng.below(4)]]);
    }
}

#[test]
fn a_storm_of_garbage_frames_is_survived() {
    let g = Guest::new("restrict=on,ipv6=off");
    let (me, gw, dns) = (ip([10, 0, 2, 15]), ip([10, 0, 2, 2]), ip([10, 0, 2, 3]));
    let valid = [
        arp(1, me, [0; 6], gw),
        arp(2, me, [0x52, 0x55, 10, 0, 2, 2], gw),
        dhcp_discover(7),
        tcp(me, gw, 1234, 80, 1, 0, TCP_SYN, &[]),
        tcp(me, gw, 1234, 80, 1, 1, TCP_ACK | TCP_PSH, b"GET /"),
        udp(me, dns, 5353, 53, b"\x12\x34\x01\x00\x00\x01"),
        udp(me, gw, 1069, 69, b"\x00\x01file\x00octet\x00"),
        ping(me, gw),
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // Every truncation of every valid frame.
    for v in &valid {
        for len in 0..v.len() {
            frames.push(v[..len].to_vec());
        }
    }
    // Valid frames with a few bytes changed, lengths and checksums included.
    for _ in 0..3000 {
        let mut f = valid[rng.below(valid.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(f.len());
            f[i] = rng.next() as u8;
        }
        frames.push(f);
    }
    // Plain noise, some with the IPv4 or ARP type.
    for _ in 0..1000 {
        let mut f: Vec<u8> = (0..rng.below(1600)).map(|_| rng.next() as u8).collect();
        if f.len() >= 14 && rng.below(2) == 0 {
            f[12..14].copy_from_slice(&[ETH_IP, ETH_ARP][rng.below(2)].to_be_bytes());
        }
        frames.push(f);
    }
    for f in &mut frames {
        keep_local(f, &mut rng);
    }
    let started = Instant::now();
    for (i, f) in frames.iter().enumerate() {
        g.send(f);
        if i % 64 == 0 {
            while g.try_receive().is_some() {}
        }
    }
    // Still alive and answering.
    while g.try_receive().is_some() {}
    g.announce();
    assert!(started.elapsed() < Duration::from_secs(60));
}
