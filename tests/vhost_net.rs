//! `hw::net::vhost_net` against the host kernel's vhost-net, without a device model: a
//! tap in a network namespace of the test's own, a guest's two rings (laid out by
//! test_support::virtio's `SplitRing`) handed to [`VhostNet`], and an `AF_PACKET` socket
//! on the tap to see and make the frames the worker moves. Skipped, with the reason
//! printed, where /dev/vhost-net is missing (run it in scripts/nested-kvm.sh), when not
//! root, or without /dev/net/tun or `ip`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hw::core::accel_ops::EventFd;
use hw::core::dirty_log::DirtyTracker;
use hw::core::iothread::AioContext;
use hw::net::vhost_net::{vhost_features, vhost_net_get_features, VhostNet};
use hw::virtio::virtio::{bit, feature, ActiveQueue, IrqfdSink, VirtioTransport};
use test_support::netns::{
    open_tap, skip_reason, test_frame, Netns, PacketSocket, IFF_TAP, IFF_VNET_HDR,
};
use test_support::virtio::SplitRing;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[allow(dead_code)]
mod guest_rig;

const SIZE: u16 = 16;
const WAIT: Duration = Duration::from_secs(20);
const TX_BUF: u64 = 0x4_0000;
const RX_BUFS: u64 = 0x5_0000;

/// Counts the interrupts the worker's call signals turn into, and keeps the irqfd sinks
/// the worker's owner gives it (the test plays MSI-X, handing it eventfds).
#[derive(Default)]
struct Counting {
    used: [AtomicU32; 2],
    sinks: Mutex<[Option<IrqfdSink>; 2]>,
}

impl VirtioTransport for Counting {
    fn signal_used_queue(&self, queue: u16) {
        self.used[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {}
    fn mark_broken(&self) {}
    fn set_queue_irqfd_sink(&self, queue: u16, sink: Option<IrqfdSink>) {
        self.sinks.lock().unwrap()[usize::from(queue)] = sink;
    }
}

/// A cleared split ring at `base`, and queue `index` as the device model would hand it
/// to vhost (addresses set, ready, its own kick).
fn ring(mem: &GuestMemoryMmap, index: u16, base: u64) -> (SplitRing, ActiveQueue) {
    let ring = SplitRing::new(base, SIZE);
    ring.clear(mem);
    let active = active_queue(mem, index, &ring);
    (ring, active)
}

/// Queue `index` over `ring` as it stands in `mem`, as the device model hands it to vhost.
fn active_queue(mem: &GuestMemoryMmap, index: u16, ring: &SplitRing) -> ActiveQueue {
    let mut q = Queue::new(256).unwrap();
    q.try_set_size(SIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(ring.desc))
        .unwrap();
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(ring.used))
        .unwrap();
    q.set_ready(true);
    assert!(q.is_valid(mem));
    ActiveQueue {
        index,
        queue: q,
        kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
    }
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The used entries of `ring` not seen yet, waiting for at least one.
fn wait_used(mem: &GuestMemoryMmap, ring: &mut SplitRing, what: &str) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let used = ring.take_used(mem);
        if !used.is_empty() {
            return used;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends test frame `tag` through the TX ring (after an empty 12-byte vnet header), checks
/// it reaches `sock`, and returns the ring's new used entries.
fn transmit(
    mem: &GuestMemoryMmap,
    ring: &mut SplitRing,
    kick: &EventFd,
    sock: &PacketSocket,
    tag: u8,
) -> Vec<(u32, u32)> {
    let frame = test_frame(tag, 114);
    let mut wire = vec![0u8; 12];
    wire.extend_from_slice(&frame);
    mem.write_slice(&wire, GuestAddress(TX_BUF)).unwrap();
    ring.add_chain(mem, &[(TX_BUF, wire.len() as u32, false)]);
    kick.write(1).unwrap();
    assert_eq!(sock.recv_test_frame(), frame);
    wait_used(mem, ring, "the TX buffer used")
}

/// A TX descriptor with a vnet header and a frame reaches an `AF_PACKET` socket on the
/// tap; a frame sent there lands in a posted RX buffer, after a 12-byte header; each
/// used buffer is signalled; stopping gives the rings back where the worker left them,
/// and the same vhost-net file starts again.
#[test]
fn vhost_net_moves_frames_between_rings_and_a_tap() {
    if guest_rig::ran_in_rig_for_vhost("vhost_net_moves_frames_between_rings_and_a_tap") {
        return;
    }
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    if !Path::new("/dev/vhost-net").exists() {
        test_support::skip::skip("no /dev/vhost-net (run it in scripts/nested-kvm.sh)");
        return;
    }
    let ns = Netns::new("vhost");
    ns.run(|| in_namespace(&ns));
}

fn in_namespace(ns: &Netns) {
    // No IPv6 chatter in the RX buffers.
    for f in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
    }
    let tap = open_tap("qvh0", IFF_TAP | IFF_VNET_HDR);
    // Non-blocking, as the tap backend leaves it.
    // SAFETY: F_SETFL on a descriptor we own.
    let ret = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    assert_eq!(ret, 0);
    ns.ip(&["link", "set", "qvh0", "up"]);
    let sock = PacketSocket::bind("qvh0");

    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let (mut rx_ring, rx) = ring(&mem, 0, 0x1_0000);
    let (mut tx_ring, tx) = ring(&mem, 1, 0x2_0000);
    let rx_kick = Arc::clone(&rx.kick);
    let tx_kick = Arc::clone(&tx.kick);
    let transport = Arc::new(Counting::default());
    let ctx = AioContext::new("vhost-test").unwrap();
    let vhost: Arc<File> = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/vhost-net")
            .unwrap(),
    );
    let supported = vhost_features(&vhost).unwrap();
    let features = vhost_net_get_features(supported, bit(feature::VERSION_1));
    assert_ne!(
        features & bit(feature::VERSION_1),
        0,
        "vhost-net has VERSION_1"
    );
    let mut net = VhostNet::start(
        Arc::clone(&vhost),
        &tap,
        Arc::clone(&mem),
        vec![rx, tx],
        features,
        transport.clone(),
        Arc::clone(&ctx),
        Arc::new(DirtyTracker::default()),
    )
    .unwrap();
    assert!(net.is_running());

    let tx_used = transmit(&mem, &mut tx_ring, &tx_kick, &sock, 1);
    assert_eq!(tx_used.len(), 1);
    assert_eq!(tx_used[0].0, 0, "the TX head");
    wait_for("the TX interrupt", || {
        transport.used[1].load(Ordering::SeqCst) > 0
    });

    // RX: buffers first, then a frame on the interface.
    for slot in 0..4u64 {
        rx_ring.add_chain(&mem, &[(RX_BUFS + 0x1000 * slot, 2048, true)]);
    }
    rx_kick.write(1).unwrap();
    let inbound = test_frame(2, 114);
    sock.send(&inbound);
    let mut rx_used = wait_used(&mem, &mut rx_ring, "an RX buffer used");
    let found = rx_used.iter().any(|&(id, len)| {
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(RX_BUFS + 0x1000 * u64::from(id)))
            .unwrap();
        len as usize == 12 + inbound.len() && got[12..] == inbound[..]
    });
    assert!(
        found,
        "the frame landed in an RX buffer, after a 12-byte header"
    );
    wait_for("the RX interrupt", || {
        transport.used[0].load(Ordering::SeqCst) > 0
    });

    // The transmit ring's vector unmasked: its signals go to the vector's irqfd, with no
    // hop through qomvm; masked again, back through signal_used_queue.
    let tx_sink = transport.sinks.lock().unwrap()[1]
        .clone()
        .expect("the worker's owner offered the TX ring an irqfd sink");
    let irqfd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    tx_sink(Some(&irqfd));
    let before = transport.used[1].load(Ordering::SeqCst);
    transmit(&mem, &mut tx_ring, &tx_kick, &sock, 11);
    wait_for("the TX signal on the irqfd", || irqfd.read().is_ok());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        transport.used[1].load(Ordering::SeqCst),
        before,
        "nothing through qomvm"
    );
    tx_sink(None);
    transmit(&mem, &mut tx_ring, &tx_kick, &sock, 12);
    wait_for("the TX interrupt through qomvm again", || {
        transport.used[1].load(Ordering::SeqCst) > before
    });
    assert!(irqfd.read().is_err(), "nothing on the irqfd once masked");

    net.stop().unwrap();
    assert!(
        transport.sinks.lock().unwrap().iter().all(Option::is_none),
        "a stopped worker takes its sinks back"
    );
    assert!(!net.is_running());
    // Whatever else arrived before the stop.
    rx_used.extend(rx_ring.take_used(&mem));
    assert_eq!(net.queues()[1].queue.next_avail(), 3);
    assert_eq!(net.queues()[1].queue.next_used(), 3);
    assert_eq!(
        usize::from(net.queues()[0].queue.next_used()),
        rx_used.len()
    );
    net.stop().unwrap();
    drop(net);
    // Ownership was given up: the same file starts again.
    let (_, rx) = ring(&mem, 0, 0x6_0000);
    let (_, tx) = ring(&mem, 1, 0x7_0000);
    let again = VhostNet::start(
        vhost,
        &tap,
        mem,
        vec![rx, tx],
        features,
        transport,
        ctx,
        Arc::new(DirtyTracker::default()),
    );
    assert!(again.is_ok(), "restart: {:?}", again.err());
}

/// Issue 18: while a migration tracks memory the worker logs its writes
/// (`VHOST_SET_LOG_BASE`, `VHOST_F_LOG_ALL`, `VHOST_VRING_F_LOG`): a frame received into a
/// guest buffer marks that buffer's page and the used ring's page, and a sent frame the
/// transmit ring's used page. A stop hands over the log's last bits and the rings'
/// positions (`VHOST_GET_VRING_BASE`); a worker started from them (as on a destination)
/// goes on at the next buffer, logging at once while the tracking lasts, and stops
/// logging with it.
#[test]
fn vhost_net_logs_its_writes_while_a_migration_tracks_them() {
    if guest_rig::ran_in_rig_for_vhost("vhost_net_logs_its_writes_while_a_migration_tracks_them") {
        return;
    }
    if let Some(why) = skip_reason() {
        test_support::skip::skip(why);
        return;
    }
    if !Path::new("/dev/vhost-net").exists() {
        test_support::skip::skip("no /dev/vhost-net (run it in scripts/nested-kvm.sh)");
        return;
    }
    let ns = Netns::new("vhostlog");
    ns.run(|| logging_in_namespace(&ns));
}

fn logging_in_namespace(ns: &Netns) {
    for f in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
    }
    let tap = open_tap("qvhlog0", IFF_TAP | IFF_VNET_HDR);
    // SAFETY: F_SETFL on a descriptor we own.
    let ret = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    assert_eq!(ret, 0);
    ns.ip(&["link", "set", "qvhlog0", "up"]);
    let sock = PacketSocket::bind("qvhlog0");

    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let (mut rx_ring, rx) = ring(&mem, 0, 0x1_0000);
    let (mut tx_ring, tx) = ring(&mem, 1, 0x2_0000);
    let rx_kick = Arc::clone(&rx.kick);
    let tx_kick = Arc::clone(&tx.kick);
    let transport = Arc::new(Counting::default());
    let ctx = AioContext::new("vhost-log-test").unwrap();
    let vhost: Arc<File> = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/vhost-net")
            .unwrap(),
    );
    let supported = vhost_features(&vhost).unwrap();
    assert_ne!(supported & (1 << 26), 0, "vhost-net offers VHOST_F_LOG_ALL");
    let features = vhost_net_get_features(supported, bit(feature::VERSION_1));
    let tracker = Arc::new(DirtyTracker::default());
    let mut net = VhostNet::start(
        Arc::clone(&vhost),
        &tap,
        Arc::clone(&mem),
        vec![rx, tx],
        features,
        transport.clone(),
        Arc::clone(&ctx),
        Arc::clone(&tracker),
    )
    .unwrap();
    assert!(!net.log().is_logging());
    tracker.set_active(true).unwrap();
    assert!(net.log().is_logging());
    assert!(tracker.take().is_empty(), "nothing written yet");
    let page = |a: u64| a & !0xfff;

    // RX: the buffer the frame lands in, and the used ring.
    for slot in 0..4u64 {
        rx_ring.add_chain(&mem, &[(RX_BUFS + 0x1000 * slot, 2048, true)]);
    }
    rx_kick.write(1).unwrap();
    sock.send(&test_frame(2, 114));
    let rx_used = wait_used(&mem, &mut rx_ring, "an RX buffer used");
    let dirty = tracker.take();
    for &(id, _) in &rx_used {
        let buffer = RX_BUFS + 0x1000 * u64::from(id);
        assert!(
            dirty.contains(&buffer),
            "buffer {id} at {buffer:#x} is dirty: {dirty:x?}"
        );
    }
    assert!(
        dirty.contains(&page(rx_ring.used)),
        "the RX used ring is dirty: {dirty:x?}"
    );
    // Read and cleared.
    assert!(tracker.take().is_empty());

    // TX: the used ring only (the worker reads the buffer).
    let frame = test_frame(1, 114);
    let mut wire = vec![0u8; 12];
    wire.extend_from_slice(&frame);
    mem.write_slice(&wire, GuestAddress(TX_BUF)).unwrap();
    tx_ring.add_chain(&mem, &[(TX_BUF, wire.len() as u32, false)]);
    tx_kick.write(1).unwrap();
    assert_eq!(sock.recv_test_frame(), frame);
    wait_used(&mem, &mut tx_ring, "the TX buffer used");
    let dirty = tracker.take();
    assert!(
        dirty.contains(&page(tx_ring.used)),
        "the TX used ring is dirty: {dirty:x?}"
    );
    assert!(!dirty.contains(&page(TX_BUF)), "a read buffer is not dirty");

    // The stop: a last frame's pages reach the tracker with the stop, not a later sync.
    sock.send(&test_frame(3, 114));
    let mut more = wait_used(&mem, &mut rx_ring, "a second RX buffer used");
    net.stop().unwrap();
    assert!(!net.log().is_logging());
    more.extend(rx_ring.take_used(&mem));
    let dirty = tracker.take();
    let id = more.last().unwrap().0;
    let buffer = RX_BUFS + 0x1000 * u64::from(id);
    assert!(
        dirty.contains(&buffer),
        "buffer {id} is dirty after the stop: {dirty:x?}"
    );
    let rx_next = net.queues()[0].queue.next_avail();
    let tx_next = net.queues()[1].queue.next_avail();
    assert_eq!(tx_next, 1);
    assert_eq!(usize::from(rx_next), rx_used.len() + more.len());
    assert_eq!(net.queues()[0].queue.next_used(), rx_next);
    drop(net);

    // A worker started from the positions (a destination's, or a failed migration's
    // resume) logs at once and takes the next buffer.
    let mut rx = active_queue(&mem, 0, &rx_ring);
    let mut tx = active_queue(&mem, 1, &tx_ring);
    rx.queue.set_next_avail(rx_next);
    rx.queue.set_next_used(rx_next);
    tx.queue.set_next_avail(tx_next);
    tx.queue.set_next_used(tx_next);
    let rx_kick = Arc::clone(&rx.kick);
    let net = VhostNet::start(
        vhost,
        &tap,
        Arc::clone(&mem),
        vec![rx, tx],
        features,
        transport,
        ctx,
        Arc::clone(&tracker),
    )
    .unwrap();
    assert!(
        net.log().is_logging(),
        "started during tracking: logging at once"
    );
    rx_kick.write(1).unwrap();
    sock.send(&test_frame(4, 114));
    let used = wait_used(&mem, &mut rx_ring, "an RX buffer used after the restart");
    assert_eq!(u32::from(rx_next), used[0].0, "the next posted buffer");
    assert!(tracker
        .take()
        .contains(&(RX_BUFS + 0x1000 * u64::from(rx_next))));
    tracker.set_active(false).unwrap();
    assert!(!net.log().is_logging());
}
