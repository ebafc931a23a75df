//! `virtio-net-pci` on the pc board under the qtest accelerator, driven by the test's own
//! virtio 1.x driver (test_support::virtio). The backend is a Unix datagram socket pair
//! (one frame per datagram, the far end in the test), so every frame the device sends or
//! receives is visible. The last tests use a real tap in a network namespace of their
//! own (skipped where that is impossible); more tap tests are in net/tests/tap.rs.
//!
//! Covered: feature and configuration layout, transmit (with and without the vnet
//! header), receive into mergeable and single buffers, waiting for buffers, the control
//! queue's receive filter and MAC, link state, and rings full of garbage, which must never
//! panic or hang qomvm.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize, DeviceMethods};
use hw::net::nic::find_nic;
use qom::ObjectRef;
use test_support::dgram_netdev::add_backend;
use test_support::netns::{is_test_frame, skip_reason, test_frame, Netns, PacketSocket};
use test_support::virtio::{SplitRing, VirtioPciDevice, DESC_NEXT, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

#[allow(dead_code)]
mod guest_rig;

const VERSION_1: u64 = 1 << 32;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_CTRL_RX: u64 = 1 << 18;
const F_CSUM: u64 = 1 << 0;
const F_GUEST_TSO4: u64 = 1 << 7;

const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 4 << 3;
const RX_RING: u64 = 0x10_0000;
const TX_RING: u64 = 0x11_0000;
const CTRL_RING: u64 = 0x12_0000;
const TX_BUF: u64 = 0x20_0000;
const RX_BUFS: u64 = 0x30_0000;
const CTRL_BUF: u64 = 0x40_0000;

const OUR_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

/// Sends `count` test frames of `len` bytes out of `ifname` in `ns`, toward qomvm.
fn inject(ns: &Netns, ifname: &str, count: usize, len: usize) {
    ns.run(|| {
        let socket = PacketSocket::bind(ifname);
        for i in 0..count {
            socket.send(&test_frame(i as u8, len));
        }
    });
}

/// A namespace without IPv6, so no router or neighbour chatter lands in the buffers.
fn quiet_netns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix);
    ns.run(|| {
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
    });
    ns
}

/// Adds a `-netdev` (`type=...,id=...`) from a thread inside `ns`, so a tap it opens by
/// name lives there.
fn add_netdev_in(ns: &Netns, opts: &str) {
    ns.run(|| net::netdev_add(&net::parse_opts(opts)).expect(opts));
}

/// A pc machine on qtest with `virtio-net-pci,netdev=NETDEV,id=ID,mac=OUR_MAC,props...`.
fn pc_with_nic(netdev: &str, id: &str, props: &[(&str, &str)]) -> ObjectRef {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new("virtio-net-pci").unwrap();
    dev.property_parse("netdev", netdev).unwrap();
    dev.property_parse("addr", "04.0").unwrap();
    dev.property_parse("mac", "52:54:00:ab:cd:ef").unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).unwrap();
    }
    machine
        .child("peripheral")
        .unwrap()
        .add_child(id, &dev)
        .unwrap();
    dev.set_device_id(Some(id.to_string()));
    qdev_realize(&dev, Some(&bus)).unwrap();
    machine_creation_done(&machine).unwrap();
    machine
}

struct Driver {
    dev: VirtioPciDevice,
    rx: SplitRing,
    tx: SplitRing,
    ctrl: Option<SplitRing>,
    hdr_len: usize,
}

fn start(machine: &ObjectRef, features: u64) -> Driver {
    let dev = VirtioPciDevice::probe(machine, DEVFN);
    assert!(
        dev.negotiate(features),
        "FEATURES_OK refused for {features:#x}"
    );
    let rx = SplitRing::new(RX_RING, 64);
    let tx = SplitRing::new(TX_RING, 64);
    rx.clear(&dev.mem);
    tx.clear(&dev.mem);
    dev.setup_queue(0, &rx);
    dev.setup_queue(1, &tx);
    let ctrl = (features & F_CTRL_VQ != 0).then(|| {
        let ctrl = SplitRing::new(CTRL_RING, 16);
        ctrl.clear(&dev.mem);
        dev.setup_queue(2, &ctrl);
        ctrl
    });
    dev.driver_ok();
    Driver {
        dev,
        rx,
        tx,
        ctrl,
        hdr_len: 12,
    }
}

fn frame(dest: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dest);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

impl Driver {
    fn transmit(&mut self, data: &[u8]) {
        let mut buf = vec![0u8; self.hdr_len];
        buf.extend_from_slice(data);
        self.dev
            .mem
            .write_slice(&buf, GuestAddress(TX_BUF))
            .unwrap();
        self.tx
            .add_chain(&self.dev.mem, &[(TX_BUF, buf.len() as u32, false)]);
        self.dev.notify(1);
        assert_eq!(
            self.dev.wait_used(&mut self.tx, 1, WAIT).len(),
            1,
            "TX completes"
        );
    }

    /// Posts `n` receive buffers of `size` bytes; returns their addresses.
    fn post_rx(&mut self, n: usize, size: u32) -> Vec<u64> {
        let addrs: Vec<u64> = (0..n as u64).map(|i| RX_BUFS + i * 0x1_0000).collect();
        for &a in &addrs {
            self.rx.add_chain(&self.dev.mem, &[(a, size, true)]);
        }
        self.dev.notify(0);
        addrs
    }

    /// Sends `count` test frames of `len` bytes into the NIC from `ifname`'s side in `ns`
    /// (an `AF_PACKET` socket on the tap: the host hands them to qomvm), then returns the
    /// receive buffers used by then (`n` of them at the least).
    fn receive_injected(
        &mut self,
        ns: &Netns,
        ifname: &str,
        count: usize,
        len: usize,
        n: usize,
    ) -> Vec<(u32, u32)> {
        inject(ns, ifname, count, len);
        self.dev.wait_used(&mut self.rx, n, WAIT)
    }

    fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let mem = &self.dev.mem;
        let mut out = vec![class, cmd];
        out.extend_from_slice(data);
        mem.write_slice(&out, GuestAddress(CTRL_BUF)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(CTRL_BUF + 0x1000))
            .unwrap();
        let ctrl = self.ctrl.as_mut().expect("control queue");
        ctrl.add_chain(
            mem,
            &[
                (CTRL_BUF, out.len() as u32, false),
                (CTRL_BUF + 0x1000, 1, true),
            ],
        );
        self.dev.notify(2);
        assert_eq!(
            self.dev.wait_used(ctrl, 1, WAIT).len(),
            1,
            "control command completes"
        );
        mem.read_obj(GuestAddress(CTRL_BUF + 0x1000)).unwrap()
    }
}

#[test]
fn features_and_configuration_are_qemus() {
    let _peer = add_backend("cfg0", true);
    let machine = pc_with_nic("cfg0", "net-cfg", &[]);
    let dev = VirtioPciDevice::probe(&machine, DEVFN);
    let offered = dev.device_features();
    for (bit, name) in [
        (VERSION_1, "VERSION_1"),
        (F_MAC, "MAC"),
        (F_STATUS, "STATUS"),
        (F_CTRL_VQ, "CTRL_VQ"),
        (F_MRG_RXBUF, "MRG_RXBUF"),
        (F_CSUM, "CSUM"),
        (F_GUEST_TSO4, "GUEST_TSO4"),
    ] {
        assert!(offered & bit != 0, "{name} offered ({offered:#x})");
    }
    let mac: Vec<u8> = (0..6).map(|i| dev.device_config(i, 1) as u8).collect();
    assert_eq!(mac, OUR_MAC);
    assert_eq!(dev.device_config(6, 2) & 1, 1, "link up");
    assert_eq!(dev.num_queues(), 3, "rx, tx, ctrl");
}

#[test]
fn backends_without_a_vnet_header_get_no_offloads() {
    let _peer = add_backend("cfg1", false);
    let machine = pc_with_nic("cfg1", "net-nohdr", &[]);
    let dev = VirtioPciDevice::probe(&machine, DEVFN);
    let offered = dev.device_features();
    assert_eq!(offered & (F_CSUM | F_GUEST_TSO4), 0, "{offered:#x}");
}

#[test]
fn transmitted_frames_reach_the_backend_with_or_without_the_header() {
    for vnet in [true, false] {
        let id = format!("tx{}", u8::from(vnet));
        let peer = add_backend(&id, vnet);
        let machine = pc_with_nic(&id, &format!("net-{id}"), &[]);
        let mut d = start(&machine, VERSION_1 | F_MAC | F_MRG_RXBUF);
        let f = frame([0xff; 6], 200, 7);
        d.transmit(&f);
        let mut got = vec![0u8; 2048];
        let n = peer.recv(&mut got).expect("a frame on the backend");
        let expect = if vnet {
            let mut e = vec![0u8; 12];
            e.extend_from_slice(&f);
            e
        } else {
            f.clone()
        };
        assert_eq!(&got[..n], &expect[..], "vnet={vnet}");
    }
}

#[test]
fn a_large_frame_fills_several_mergeable_buffers() {
    let peer = add_backend("mrg0", true);
    let machine = pc_with_nic("mrg0", "net-mrg", &[]);
    let mut d = start(
        &machine,
        VERSION_1 | F_MAC | F_MRG_RXBUF | F_GUEST_TSO4 | F_CSUM | (1 << 1),
    );
    // Enough 1536-byte buffers for a 64 KiB frame, as Linux posts them.
    let addrs = d.post_rx(45, 1536);
    let mut sent = vec![0u8; 12];
    sent[0] = 1; // NEEDS_CSUM, as a tap hands it over
    sent.extend_from_slice(&frame(OUR_MAC, 3000, 3));
    peer.send(&sent).unwrap();
    let used = d.dev.wait_used(&mut d.rx, 2, WAIT);
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(
        lens,
        vec![1536, 1476],
        "3012 bytes fill two buffers: {used:?}"
    );
    let mut got = Vec::new();
    for (i, (id, len)) in used.iter().enumerate().take(2) {
        let at = addrs[*id as usize];
        let mut b = vec![0u8; *len as usize];
        d.dev.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        if i == 0 {
            let num_buffers = u16::from_le_bytes([b[10], b[11]]);
            assert_eq!(num_buffers, 2, "num_buffers");
            assert_eq!(b[0], 1, "the backend's header flags reach the guest");
        }
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[12..], &sent[12..]);
}

#[test]
fn the_driver_never_sees_part_of_a_frame_in_the_used_ring() {
    // Linux takes a mergeable frame's buffers as soon as it sees the first one (which says
    // how many there are) and drops the frame if one is missing: a used index that moves
    // buffer by buffer loses frames to a driver polling at the wrong moment.
    const BUF: u32 = 1024;
    const PER_FRAME: u16 = 12;
    const FRAMES: usize = 5;
    const ROUNDS: usize = 20;
    let peer = add_backend("whole0", true);
    let machine = pc_with_nic("whole0", "net-whole", &[]);
    let mut d = start(
        &machine,
        VERSION_1 | F_MAC | F_MRG_RXBUF | F_GUEST_TSO4 | F_CSUM | (1 << 1),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        let mem = d.dev.mem.clone();
        let used_idx = GuestAddress(d.rx.used + 2);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut last = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let idx: u16 = mem.load(used_idx, Ordering::Acquire).unwrap();
                if idx != last {
                    seen.push(idx);
                    last = idx;
                }
            }
            seen
        })
    };
    for round in 0..ROUNDS {
        d.post_rx(FRAMES * usize::from(PER_FRAME), BUF);
        for f in 0..FRAMES {
            // 12 KiB less 100 bytes, header included: 11 full buffers and part of a 12th.
            let mut sent = vec![0u8; 12];
            sent.extend_from_slice(&frame(
                OUR_MAC,
                usize::from(PER_FRAME) * BUF as usize - 12 - 100,
                f as u8,
            ));
            peer.send(&sent).unwrap();
        }
        let used = d
            .dev
            .wait_used(&mut d.rx, FRAMES * usize::from(PER_FRAME), WAIT);
        assert_eq!(
            used.len(),
            FRAMES * usize::from(PER_FRAME),
            "round {round}: every frame arrives"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let seen = poller.join().unwrap();
    let partial: Vec<u16> = seen
        .iter()
        .copied()
        .filter(|i| i % PER_FRAME != 0)
        .collect();
    assert!(
        partial.is_empty(),
        "the used index stopped inside a frame at {partial:?} ({} values seen)",
        seen.len()
    );
}

#[test]
fn a_ring_short_of_a_largest_frame_takes_frames_that_fit_and_holds_one_that_does_not() {
    let peer = add_backend("low0", true);
    let machine = pc_with_nic("low0", "net-low", &[]);
    let mut d = start(
        &machine,
        VERSION_1 | F_MAC | F_MRG_RXBUF | F_GUEST_TSO4 | F_CSUM | (1 << 1),
    );
    // Buffer `id` (the ring's descriptors in the order posted) lives at RX_BUFS + id * 64 KiB.
    let post = |d: &mut Driver, ids: std::ops::Range<u64>| {
        for id in ids {
            d.rx.add_chain(&d.dev.mem, &[(RX_BUFS + id * 0x1_0000, 1536, true)]);
        }
        d.dev.notify(0);
    };
    let read = |d: &Driver, used: &[(u32, u32)]| -> Vec<u8> {
        let mut got = Vec::new();
        for &(id, len) in used {
            let mut b = vec![0u8; len as usize];
            let at = RX_BUFS + u64::from(id) * 0x1_0000;
            d.dev.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            got.extend_from_slice(&b);
        }
        got
    };
    let with_header = |f: Vec<u8>| {
        let mut b = vec![0u8; 12];
        b.extend_from_slice(&f);
        b
    };
    // 4.5 KiB of buffers, far less than a TSO frame may need: a 2000-byte frame still
    // goes in (QEMU places each frame by its own size).
    post(&mut d, 0..3);
    let first = with_header(frame(OUR_MAC, 2000, 1));
    peer.send(&first).unwrap();
    let used = d.dev.wait_used(&mut d.rx, 2, WAIT);
    assert_eq!(used, vec![(0, 1536), (1, 476)]);
    let got = read(&d, &used);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &first[12..]);
    // One buffer left: a 3000-byte frame waits for the driver, and the frame after it
    // waits behind it.
    let second = with_header(frame(OUR_MAC, 3000, 2));
    let third = with_header(frame(OUR_MAC, 100, 3));
    peer.send(&second).unwrap();
    peer.send(&third).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.rx.take_used(&d.dev.mem).is_empty(), "nothing fits yet");
    post(&mut d, 3..5);
    let used = d.dev.wait_used(&mut d.rx, 3, WAIT);
    assert_eq!(used, vec![(2, 1536), (3, 1476), (4, 112)]);
    let got = read(&d, &used[..2]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &second[12..], "the held frame, whole");
    let got = read(&d, &used[2..]);
    assert_eq!(&got[12..], &third[12..], "then the next one");
}

#[test]
fn without_mergeable_buffers_each_frame_takes_one_buffer_and_waits_for_one() {
    let peer = add_backend("one0", false);
    let machine = pc_with_nic("one0", "net-one", &[]);
    let mut d = start(&machine, VERSION_1 | F_MAC);
    // A frame before any buffer waits for the driver.
    let f = frame(OUR_MAC, 100, 9);
    peer.send(&f).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(d.rx.take_used(&d.dev.mem).is_empty());
    let addrs = d.post_rx(1, 2048);
    let used = d.dev.wait_used(&mut d.rx, 1, WAIT);
    assert_eq!(used, vec![(0, 112)]);
    let mut b = vec![0u8; 112];
    d.dev
        .mem
        .read_slice(&mut b, GuestAddress(addrs[0]))
        .unwrap();
    assert_eq!(
        u16::from_le_bytes([b[10], b[11]]),
        1,
        "num_buffers is 1 in virtio 1.x"
    );
    assert_eq!(
        &b[..10],
        &[0u8; 10],
        "a zero header for a backend without one"
    );
    assert_eq!(&b[12..], &f[..]);
}

#[test]
fn the_receive_filter_follows_the_control_queue() {
    let peer = add_backend("filt0", false);
    let machine = pc_with_nic("filt0", "net-filt", &[]);
    let mut d = start(&machine, VERSION_1 | F_MAC | F_CTRL_VQ | F_CTRL_RX);
    static EVENTS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    hw::core::qapi_event::set_sink(Box::new(|name, data| {
        let who = data.map(|d| d["name"].to_string()).unwrap_or_default();
        EVENTS.lock().unwrap().push((name.to_string(), who));
    }));
    let filter_events = || {
        EVENTS
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, who)| n == "NIC_RX_FILTER_CHANGED" && who == "\"net-filt\"")
            .count()
    };
    let nic = find_nic("net-filt").expect("the NIC is listed");
    assert_eq!(
        nic.rx_filter_info().unwrap()["promiscuous"],
        true,
        "promiscuous after reset"
    );
    assert_eq!(d.command(0, 0, &[0]), 0, "PROMISC off acked");
    assert_eq!(d.command(0, 1, &[1]), 0, "ALLMULTI on acked");
    assert_eq!(filter_events(), 1, "one event until the filter is queried");
    assert_eq!(nic.rx_filter_info().unwrap()["promiscuous"], false);
    assert_eq!(nic.rx_filter_info().unwrap()["multicast"], "all");
    assert_eq!(d.command(0, 1, &[0]), 0, "ALLMULTI off acked");
    assert_eq!(filter_events(), 2, "query-rx-filter re-arms the event");
    assert_eq!(d.command(9, 9, &[]), 1, "unknown class refused");
    d.post_rx(4, 2048);
    // Another host's unicast is dropped; ours and broadcast arrive, in order.
    peer.send(&frame([0x52, 0x54, 0, 0, 0, 1], 80, 1)).unwrap();
    peer.send(&frame(OUR_MAC, 81, 2)).unwrap();
    peer.send(&frame([0xff; 6], 82, 3)).unwrap();
    let used = d.dev.wait_used(&mut d.rx, 2, WAIT);
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    assert_eq!(
        lens,
        vec![81 + 12, 82 + 12],
        "only ours and broadcast: {used:?}"
    );
    // A new MAC through the control queue.
    let new_mac = [0x52, 0x54, 0, 0x11, 0x22, 0x33];
    assert_eq!(d.command(1, 1, &new_mac), 0);
    assert_eq!(nic.mac(), new_mac);
    peer.send(&frame(new_mac, 83, 4)).unwrap();
    let used = d.dev.wait_used(&mut d.rx, 1, WAIT);
    assert_eq!(used.first().map(|u| u.1), Some(83 + 12));
}

#[test]
fn a_link_that_is_down_moves_no_frames() {
    let peer = add_backend("link0", false);
    let machine = pc_with_nic("link0", "net-link", &[]);
    let mut d = start(&machine, VERSION_1 | F_MAC | F_STATUS);
    let nic = find_nic("link0").expect("found by its backend's id too");
    nic.set_link(false);
    assert_eq!(d.dev.device_config(6, 2) & 1, 0, "status says down");
    d.post_rx(2, 2048);
    peer.send(&frame(OUR_MAC, 90, 5)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        d.rx.take_used(&d.dev.mem).is_empty(),
        "nothing received while down"
    );
    // What the guest sends while down is dropped (completed, not sent).
    d.transmit(&frame([0xff; 6], 60, 1));
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    assert!(peer.recv(&mut buf).is_err(), "nothing sent while down");
    nic.set_link(true);
    assert_eq!(d.dev.device_config(6, 2) & 1, 1);
    let used = d.dev.wait_used(&mut d.rx, 1, WAIT);
    assert_eq!(
        used.first().map(|u| u.1),
        Some(102),
        "the waiting frame arrives"
    );
}

#[test]
fn garbage_rings_never_panic_or_hang() {
    let peer = add_backend("fuzz0", true);
    peer.set_nonblocking(true).unwrap();
    let machine = pc_with_nic("fuzz0", "net-fuzz", &[]);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let mut d = start(&machine, VERSION_1 | F_MAC | F_MRG_RXBUF | F_CTRL_VQ);
        let mem = d.dev.mem.clone();
        for ring in [&d.rx, &d.tx] {
            for i in 0..64u16 {
                let r = next();
                let addr = match r % 4 {
                    0 => u64::MAX - (r >> 8) % 4096,
                    1 => RX_BUFS + (r >> 16) % 0x10_0000,
                    2 => 1 << 40,
                    _ => (r >> 20) % (256 << 20),
                };
                let len = match (r >> 3) % 4 {
                    0 => 0,
                    1 => u32::MAX,
                    _ => (r >> 32) as u32 % 70_000,
                };
                let flags = (r >> 40) as u16 & 7;
                ring.write_desc(
                    &mem,
                    i,
                    addr,
                    len,
                    flags | (DESC_NEXT & flags),
                    (r >> 48) as u16,
                );
            }
        }
        d.rx.publish_raw_idx(&mem, (next() % 200) as u16);
        d.tx.publish_raw_idx(&mem, (next() % 200) as u16);
        let _ = peer.send(&frame(OUR_MAC, 64 + round, round as u8));
        d.dev.notify(0);
        d.dev.notify(1);
        d.dev.notify(2);
        std::thread::sleep(Duration::from_millis(5));
        // Whatever the garbage did, a reset brings back a device that works.
        d.dev.set_status(0);
        assert_eq!(d.dev.status(), 0, "reset works after round {round}");
        if round % 10 == 9 {
            let mut d = start(&machine, VERSION_1 | F_MAC | F_MRG_RXBUF);
            assert_eq!(d.dev.status() & NEEDS_RESET, 0);
            while peer.recv(&mut [0u8; 70_000]).is_ok() {}
            let f = frame([0xff; 6], 100, 1);
            d.transmit(&f);
            peer.set_nonblocking(false).unwrap();
            let mut got = vec![0u8; 2048];
            let n = peer.recv(&mut got).expect("a frame after the reset");
            assert_eq!(&got[12..n], &f[..]);
            peer.set_nonblocking(true).unwrap();
            d.dev.set_status(0);
        }
    }
}

/// Random vnet headers and frames from the guest into a real tap, and a storm of frames
/// from the host while the guest posts few buffers: qomvm neither panics nor hangs, and
/// the device still moves frames afterwards.
#[test]
fn malformed_vnet_headers_and_frame_storms_on_a_real_tap() {
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    let ns = quiet_netns("vnetfuzz");
    add_netdev_in(
        &ns,
        "type=tap,id=fuzztap,ifname=fuzztap0,script=no,downscript=no",
    );
    ns.ip(&["link", "set", "fuzztap0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    let machine = pc_with_nic("fuzztap", "net-fuzztap", &[]);
    let mut d = start(
        &machine,
        VERSION_1 | F_MAC | F_MRG_RXBUF | F_CSUM | (1 << 1) | F_GUEST_TSO4 | (1 << 11),
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let len = (next() % 200) as usize + 12;
        let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Keep some frames plausible so the host kernel parses them deeper.
        if next() % 2 == 0 && len > 26 {
            buf[12..18].copy_from_slice(&[0xff; 6]);
            buf[24..26].copy_from_slice(&[0x08, 0x00]);
        }
        d.dev.mem.write_slice(&buf, GuestAddress(TX_BUF)).unwrap();
        d.tx.add_chain(&d.dev.mem, &[(TX_BUF, len as u32, false)]);
        d.dev.notify(1);
        assert_eq!(
            d.dev.wait_used(&mut d.tx, 1, WAIT).len(),
            1,
            "every frame completes"
        );
    }
    assert_eq!(
        d.dev.status() & NEEDS_RESET,
        0,
        "bad headers are the host's to refuse"
    );
    // A storm from the namespace while the guest has two buffers: qomvm takes what fits
    // and stops reading until the driver posts more (the host drops the rest).
    ns.ip(&["addr", "add", "192.168.77.1/24", "dev", "fuzztap0"]);
    d.post_rx(2, 70_000);
    let storm = d.receive_injected(&ns, "fuzztap0", 3000, 1000, 2);
    assert_eq!(storm.len(), 2, "the two buffers fill");
    // Buffers posted after the storm are used: the device reads the tap again.
    d.post_rx(8, 70_000);
    let more = d.receive_injected(&ns, "fuzztap0", 3, 100, 1);
    assert!(!more.is_empty(), "frames arrive after the storm");
    d.dev.set_status(0);
    assert_eq!(d.dev.status(), 0);
}

/// `mq=on` over a multiqueue tap: two queue pairs and the control queue; the driver picks
/// how many pairs it uses (VQ_PAIRS_SET), within what the device has.
#[test]
fn multiqueue_taps_give_queue_pairs_the_driver_enables() {
    const F_MQ: u64 = 1 << 22;
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    let ns = quiet_netns("vnetmq");
    add_netdev_in(
        &ns,
        "type=tap,id=mqtap,ifname=mqtap0,script=no,downscript=no,queues=2",
    );
    let machine = pc_with_nic("mqtap", "net-mq", &[("mq", "on")]);
    let dev = VirtioPciDevice::probe(&machine, DEVFN);
    assert!(dev.device_features() & F_MQ != 0, "MQ offered");
    assert_eq!(dev.device_config(8, 2), 2, "max_virtqueue_pairs");
    assert_eq!(dev.num_queues(), 5, "two pairs and the control queue");
    assert!(dev.negotiate(VERSION_1 | F_MAC | F_CTRL_VQ | F_MQ));
    let rings: Vec<SplitRing> = (0..5u64)
        .map(|i| SplitRing::new(RX_RING + i * 0x1_0000, 16))
        .collect();
    for (i, r) in rings.iter().enumerate() {
        r.clear(&dev.mem);
        dev.setup_queue(i as u16, r);
    }
    dev.driver_ok();
    let mut d = Driver {
        dev,
        rx: SplitRing::new(RX_RING, 16),
        tx: SplitRing::new(RX_RING + 0x1_0000, 16),
        ctrl: None,
        hdr_len: 12,
    };
    d.ctrl = Some(SplitRing::new(RX_RING + 4 * 0x1_0000, 16));
    // The control queue is queue 4 here: send on it by hand.
    let mem = d.dev.mem.clone();
    let mut command = |pairs: u16| -> u8 {
        let out = [4u8, 0, pairs as u8, (pairs >> 8) as u8];
        mem.write_slice(&out, GuestAddress(CTRL_BUF)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(CTRL_BUF + 0x1000))
            .unwrap();
        let ctrl = d.ctrl.as_mut().unwrap();
        ctrl.add_chain(&mem, &[(CTRL_BUF, 4, false), (CTRL_BUF + 0x1000, 1, true)]);
        d.dev.notify(4);
        assert_eq!(d.dev.wait_used(ctrl, 1, WAIT).len(), 1);
        mem.read_obj(GuestAddress(CTRL_BUF + 0x1000)).unwrap()
    };
    assert_eq!(command(2), 0, "two pairs");
    assert_eq!(command(1), 0, "back to one");
    assert_eq!(command(3), 1, "more than the device has");
    assert_eq!(command(0), 1, "none");
    assert_eq!(d.dev.status() & NEEDS_RESET, 0);
}

/// `vhost=on`: the kernel's vhost-net moves the frames; the device still negotiates, and
/// frames cross both ways. Runs where /dev/vhost-net exists (the nested rig on PVM hosts).
#[test]
fn vhost_net_moves_frames_both_ways() {
    if guest_rig::ran_in_rig_for_vhost("vhost_net_moves_frames_both_ways") {
        return;
    }
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    if !std::path::Path::new("/dev/vhost-net").exists() {
        test_support::skip::skip("no /dev/vhost-net on this host (the nested rig has one)");
        return;
    }
    let ns = quiet_netns("vnetvhost");
    add_netdev_in(
        &ns,
        "type=tap,id=vhosttap,ifname=vhosttap0,script=no,downscript=no,vhost=on",
    );
    ns.ip(&["link", "set", "vhosttap0", "up"]);
    ns.ip(&["addr", "add", "192.168.78.1/24", "dev", "vhosttap0"]);
    let machine = pc_with_nic("vhosttap", "net-vhost", &[]);
    let mut d = start(&machine, VERSION_1 | F_MAC | F_MRG_RXBUF);
    let rx_packets = || -> u64 {
        let o = ns.exec(&["cat", "/sys/class/net/vhosttap0/statistics/rx_packets"]);
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let before = rx_packets();
    d.transmit(&frame([0xff; 6], 100, 1));
    let deadline = std::time::Instant::now() + WAIT;
    while rx_packets() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        rx_packets() > before,
        "the frame reached the tap through vhost"
    );
    d.post_rx(8, 2048);
    let used = d.receive_injected(&ns, "vhosttap0", 3, 100, 1);
    assert!(!used.is_empty(), "host frames arrive through vhost");
    d.dev.set_status(0);
    assert_eq!(d.dev.status(), 0, "reset stops the vhost worker");
}

/// A driver that queues more frames than one burst, with one kick, gets them all sent,
/// even through a backend that fills up (here a datagram socket holds ten at a time).
#[test]
fn frames_queued_beyond_one_burst_and_a_full_backend_all_go_out() {
    let peer = add_backend("burst0", false);
    let machine = pc_with_nic("burst0", "net-burst", &[("tx_queue_size", "512")]);
    let d = start(&machine, VERSION_1 | F_MAC);
    let mut tx = SplitRing::new(TX_RING, 512);
    tx.clear(&d.dev.mem);
    d.dev.setup_queue(1, &tx);
    d.dev.set_status(0);
    // Start again with the big transmit ring.
    assert!(d.dev.negotiate(VERSION_1 | F_MAC));
    d.dev.setup_queue(0, &d.rx);
    d.dev.setup_queue(1, &tx);
    d.dev.driver_ok();
    const N: usize = 300;
    for i in 0..N {
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&frame([0xff; 6], 60, i as u8));
        let at = TX_BUF + (i as u64) * 128;
        d.dev.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        tx.add_chain(&d.dev.mem, &[(at, buf.len() as u32, false)]);
    }
    d.dev.notify(1);
    let mut got = 0;
    let mut buf = [0u8; 256];
    while got < N {
        match peer.recv(&mut buf) {
            Ok(n) => {
                assert_eq!(n, 60);
                assert_eq!(buf[14], got as u8, "in order");
                got += 1;
            }
            Err(e) => panic!("frame {got} of {N} did not come: {e}"),
        }
    }
    assert_eq!(d.dev.wait_used(&mut tx, N, WAIT).len(), N, "all completed");
}

/// `tx=timer` (libvirt's `<driver txmode='timer'/>`): a kick holds the frames for
/// `x-txtimer` nanoseconds, and a second kick while they wait sends them at once.
#[test]
fn tx_timer_holds_frames_until_it_fires_or_a_second_kick() {
    // A frame within `wait` of the kick is early unless the timer had run by then (a
    // loaded machine can keep the test thread away from the socket that long).
    let frame_within = |peer: &UnixDatagram, wait: Duration, kicked: Instant, timer: Duration| {
        peer.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 256];
        let got = peer.recv(&mut buf);
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let n = got.ok()?;
        assert!(
            kicked.elapsed() >= timer,
            "the frame went out before the timer ({:?} after the kick)",
            kicked.elapsed()
        );
        Some(buf[..n].to_vec())
    };
    for (id, txtimer, second_kick) in [
        ("txt0", 400_000_000u64, false),
        ("txt1", 4_000_000_000, true),
    ] {
        let peer = add_backend(id, false);
        let machine = pc_with_nic(
            id,
            &format!("net-{id}"),
            &[("tx", "timer"), ("x-txtimer", &txtimer.to_string())],
        );
        let mut d = start(&machine, VERSION_1 | F_MAC);
        // The queue's first look at its rings (at DRIVER_OK) must be over before the frame
        // is queued, or it sends the frame as any pass does: two turns of the loop.
        let main_loop = machine_state(&machine).unwrap().services().main_context();
        for _ in 0..2 {
            main_loop.run_sync(Box::new(|| {}));
        }
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&frame([0xff; 6], 60, 9));
        d.dev.mem.write_slice(&buf, GuestAddress(TX_BUF)).unwrap();
        d.tx.add_chain(&d.dev.mem, &[(TX_BUF, buf.len() as u32, false)]);
        let kicked = Instant::now();
        d.dev.notify(1);
        let timer = Duration::from_nanos(txtimer);
        let got = match frame_within(&peer, Duration::from_millis(200), kicked, timer) {
            Some(early) => early,
            None => {
                if second_kick {
                    // Well before the 4 s timer could.
                    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    d.dev.notify(1);
                }
                let mut got = [0u8; 256];
                let n = peer.recv(&mut got).expect("the held frame goes out");
                got[..n].to_vec()
            }
        };
        assert_eq!(&got[..], &buf[12..], "{id}");
        assert_eq!(
            d.dev.wait_used(&mut d.tx, 1, WAIT).len(),
            1,
            "{id}: completed"
        );
    }
}

/// `announce-self`: a driver that negotiated GUEST_ANNOUNCE is asked through the status
/// (and acks on the control queue); otherwise qomvm sends a RARP for the NIC's MAC.
#[test]
fn announcements_go_through_the_driver_or_as_rarp() {
    const F_GUEST_ANNOUNCE: u64 = 1 << 21;
    let peer = add_backend("ann0", true);
    let machine = pc_with_nic("ann0", "net-ann", &[]);
    let mut d = start(
        &machine,
        VERSION_1 | F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE,
    );
    let nic = find_nic("net-ann").unwrap();
    nic.announce();
    assert_eq!(d.dev.device_config(6, 2) & 2, 2, "S_ANNOUNCE set");
    assert_eq!(d.command(3, 0, &[]), 0, "ANNOUNCE_ACK");
    assert_eq!(d.dev.device_config(6, 2) & 2, 0, "acked");
    d.dev.set_status(0);
    // Without GUEST_ANNOUNCE: a RARP after the 12-byte header the tap expects.
    let d = start(&machine, VERSION_1 | F_MAC | F_MRG_RXBUF);
    nic.announce();
    let mut got = [0u8; 256];
    let n = peer.recv(&mut got).expect("a RARP frame");
    assert_eq!(n, 12 + 60);
    assert_eq!(&got[12..18], &[0xff; 6], "broadcast");
    assert_eq!(&got[18..24], &OUR_MAC);
    assert_eq!(&got[24..26], &[0x80, 0x35], "RARP");
    drop(d);
}

/// A driver that keeps its receive ring full, as Linux does, gets a sustained flood
/// through mergeable buffers with no stall: the device waits for buffers when it has too
/// few for a largest frame and resumes on the driver's kick, however the two interleave.
#[test]
fn a_sustained_flood_into_recycled_mergeable_buffers_never_stalls() {
    const RING: u16 = 256;
    const BUF: u32 = 1536;
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    let ns = quiet_netns("vnetflood");
    add_netdev_in(
        &ns,
        "type=tap,id=floodtap,ifname=floodtap0,script=no,downscript=no",
    );
    ns.ip(&["link", "set", "floodtap0", "up"]);
    let machine = pc_with_nic("floodtap", "net-flood", &[]);
    let dev = VirtioPciDevice::probe(&machine, DEVFN);
    assert!(dev.negotiate(VERSION_1 | F_MAC | F_MRG_RXBUF | F_CSUM | (1 << 1) | F_GUEST_TSO4));
    let mut rx = SplitRing::new(RX_RING, RING);
    let tx = SplitRing::new(TX_RING + 0x1_0000, 16);
    rx.clear(&dev.mem);
    tx.clear(&dev.mem);
    dev.setup_queue(0, &rx);
    dev.setup_queue(1, &tx);
    dev.driver_ok();
    let addr = |i: u64| RX_BUFS + (i % u64::from(RING)) * 0x1_0000;
    for i in 0..u64::from(RING) {
        rx.add_chain(&dev.mem, &[(addr(i), BUF, true)]);
    }
    dev.notify(0);
    const FRAMES: usize = 20_000;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (received, ours) = std::thread::scope(|s| {
        s.spawn(|| {
            inject(&ns, "floodtap0", FRAMES, 1514);
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        let mut received = 0usize;
        let mut ours = 0usize;
        let mut posted = u64::from(RING);
        let mut quiet_since = std::time::Instant::now();
        loop {
            let used = rx.take_used(&dev.mem);
            for &(id, len) in &used {
                let mut head = [0u8; 26];
                dev.mem
                    .read_slice(&mut head, GuestAddress(addr(u64::from(id))))
                    .unwrap();
                if len as usize >= 26 && is_test_frame(&head[12..]) {
                    ours += 1;
                }
                rx.add_chain(&dev.mem, &[(addr(posted), BUF, true)]);
                posted += 1;
            }
            received += used.len();
            if !used.is_empty() {
                dev.notify(0);
                quiet_since = std::time::Instant::now();
            } else if done.load(std::sync::atomic::Ordering::Acquire)
                && quiet_since.elapsed() > Duration::from_millis(500)
            {
                break (received, ours);
            }
            assert!(
                quiet_since.elapsed() < WAIT,
                "no frame for {WAIT:?} after {received}: the receive path stalled"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    // The host drops what its queue cannot hold while the driver lags: most, not all.
    println!("flood: {ours} of {FRAMES} test frames in {received} buffers");
    assert!(
        ours > FRAMES / 10,
        "frames of the flood arrived: {ours} of {FRAMES} ({received} buffers)"
    );
    assert_eq!(dev.status() & NEEDS_RESET, 0);
    // After the flood, a small frame still gets through at once.
    inject(&ns, "floodtap0", 1, 60);
    assert!(
        !dev.wait_used(&mut rx, 1, WAIT).is_empty(),
        "the device still receives"
    );
}

/// Issue 18: the NIC moves to another machine through the migration stream (two machines
/// in this process, each NIC on its own socket backend). A receive buffer the device had
/// taken but not filled, the receive filter, the MAC and the rings' positions go with it;
/// on the destination frames go both ways on its backend, the used indices continuing.
#[test]
fn a_migrated_nic_keeps_its_rings_filter_and_mac() {
    use hw::core::migration::{load_vm, save_vm, Progress};
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    let src_peer = add_backend("mig-src", false);
    let dst_peer = add_backend("mig-dst", false);
    let src = pc_with_nic("mig-src", "net-mig", &[]);
    let src_ms = machine_state(&src).unwrap();
    vm_start(src_ms).unwrap();
    let mut d = start(&src, VERSION_1 | F_MAC | F_CTRL_VQ | F_CTRL_RX);
    assert_eq!(d.command(0, 0, &[0]), 0, "PROMISC off acked");
    let new_mac = [0x52, 0x54, 0, 0x11, 0x22, 0x44];
    assert_eq!(d.command(1, 1, &new_mac), 0, "MAC_ADDR_SET acked");
    // A frame out, and one in: the device takes a buffer for the next one right away.
    d.transmit(&frame([0xff; 6], 60, 1));
    let mut got = [0u8; 256];
    assert_eq!(src_peer.recv(&mut got).unwrap(), 60);
    let posted = d.post_rx(4, 2048);
    src_peer.send(&frame(new_mac, 70, 2)).unwrap();
    assert_eq!(d.dev.wait_used(&mut d.rx, 1, WAIT), vec![(0, 70 + 12)]);

    vm_stop(src_ms, RunStatus::FinishMigrate).unwrap();
    // Stopped: a frame for the guest stays in the source's backend.
    src_peer.send(&frame(new_mac, 71, 3)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        d.rx.take_used(&d.dev.mem).is_empty(),
        "a stopped NIC received"
    );
    let mut stream = Vec::new();
    save_vm(&src, &mut stream, &mut Progress::default()).unwrap();

    let dst = pc_with_nic("mig-dst", "net-mig", &[]);
    load_vm(&dst, &mut stream.as_slice(), None).unwrap();
    vm_start(machine_state(&dst).unwrap()).unwrap();
    d.dev = VirtioPciDevice::probe(&dst, DEVFN);
    let nic = find_nic("mig-dst").expect("the destination's NIC");
    assert_eq!(nic.mac(), new_mac);
    assert_eq!(nic.rx_filter_info().unwrap()["promiscuous"], false);
    // Another host's unicast is still filtered; ours lands in the next buffer the driver
    // posted on the source.
    dst_peer
        .send(&frame([0x52, 0x54, 0, 0, 0, 1], 80, 4))
        .unwrap();
    dst_peer.send(&frame(new_mac, 81, 5)).unwrap();
    let used = d.dev.wait_used(&mut d.rx, 1, WAIT);
    assert_eq!(used, vec![(1, 81 + 12)], "buffers at {posted:x?}");
    let mut data = vec![0u8; 81];
    d.dev
        .mem
        .read_slice(&mut data, GuestAddress(posted[1] + 12))
        .unwrap();
    assert_eq!(data, frame(new_mac, 81, 5));
    d.transmit(&frame([0xff; 6], 62, 6));
    assert_eq!(dst_peer.recv(&mut got).unwrap(), 62);
    assert_eq!(&got[..62], &frame([0xff; 6], 62, 6)[..]);
}

/// Issue 18 with `vhost=on`: while a migration tracks memory, the frames the kernel's
/// worker writes into guest buffers, and its used ring, are in the dirty pages; the VM's
/// stop parks the worker (its rings' positions from `VHOST_GET_VRING_BASE`), and on the
/// destination's own tap and worker frames go both ways with the used indices
/// continuing. Runs where /dev/vhost-net exists (the nested rig on PVM hosts).
#[test]
fn a_migrated_vhost_nic_logs_its_writes_and_keeps_its_rings() {
    use hw::core::migration::{load_vm, save_vm, Progress};
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    if guest_rig::ran_in_rig_for_vhost("a_migrated_vhost_nic_logs_its_writes_and_keeps_its_rings") {
        return;
    }
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    if !std::path::Path::new("/dev/vhost-net").exists() {
        test_support::skip::skip("no /dev/vhost-net on this host (the nested rig has one)");
        return;
    }
    let ns = quiet_netns("vnetvhostmig");
    for (id, ifname) in [("vhostmigsrc", "vhostmig0"), ("vhostmigdst", "vhostmig1")] {
        add_netdev_in(
            &ns,
            &format!("type=tap,id={id},ifname={ifname},script=no,downscript=no,vhost=on"),
        );
        ns.ip(&["link", "set", ifname, "up"]);
    }
    let src = pc_with_nic("vhostmigsrc", "net-vhostmig", &[]);
    let src_ms = machine_state(&src).unwrap();
    vm_start(src_ms).unwrap();
    let mut d = start(&src, VERSION_1 | F_MAC | F_MRG_RXBUF);
    let tracker = src_ms.services().dirty_tracker().clone();
    tracker.set_active(true).unwrap();
    let posted = d.post_rx(4, 2048);
    let used = d.receive_injected(&ns, "vhostmig0", 1, 100, 1);
    let dirty = tracker.take();
    let page = |a: u64| a & !0xfff;
    let buffer = posted[used[0].0 as usize];
    assert!(
        dirty.contains(&page(buffer)),
        "the buffer at {buffer:#x} is dirty: {dirty:x?}"
    );
    assert!(
        dirty.contains(&page(d.rx.used)),
        "the used ring at {:#x} is dirty: {dirty:x?}",
        d.rx.used
    );
    d.transmit(&frame([0xff; 6], 60, 1));

    vm_stop(src_ms, RunStatus::FinishMigrate).unwrap();
    // Parked: a frame for the guest stays in the source's tap.
    inject(&ns, "vhostmig0", 1, 101);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        d.rx.take_used(&d.dev.mem).is_empty(),
        "a stopped vhost worker received"
    );
    let mut stream = Vec::new();
    save_vm(&src, &mut stream, &mut Progress::default()).unwrap();
    tracker.set_active(false).unwrap();

    let dst = pc_with_nic("vhostmigdst", "net-vhostmig", &[]);
    load_vm(&dst, &mut stream.as_slice(), None).unwrap();
    vm_start(machine_state(&dst).unwrap()).unwrap();
    d.dev = VirtioPciDevice::probe(&dst, DEVFN);
    // The next buffer the driver posted on the source takes the destination's frame.
    let used = d.receive_injected(&ns, "vhostmig1", 1, 102, 1);
    assert_eq!(used, vec![(1, 102 + 12)], "buffers at {posted:x?}");
    // The transmit ring goes on from where the source's worker left it.
    d.transmit(&frame([0xff; 6], 62, 2));
}
