//! `virtio-balloon-pci` on the pc board under the qtest accelerator, driven by the test's
//! own virtio 1.x driver: QEMU's IDs and features, the monitor's `balloon` (through the
//! machine's balloon slot the QMP command uses) setting `num_pages` with a configuration
//! interrupt, inflated pages released to the host (they read back as zeros), `actual`
//! reported as `BALLOON_CHANGE` and by `query-balloon`, the stats queue and its polling,
//! and fuzzed frame lists and broken rings that never panic or hang.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::virtio::virtio_balloon_pci::VirtioBalloonPci;
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_PAGE_POISON: u64 = 1 << 4;
const RAM: u64 = 128 << 20;
const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 3 << 3;
const RINGS: [u64; 3] = [0x10_0000, 0x12_0000, 0x14_0000];
const LIST: u64 = 0x20_0000;
const PAGE: u64 = 0x50_0000;

/// `-device virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,props...` on a 128 MiB pc.
fn pc_with_balloon(props: &[(&str, &str)]) -> (ObjectRef, ObjectRef) {
    let machine = test_support::qtest::pc_on_qtest(RAM);
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new("virtio-balloon-pci").unwrap();
    dev.property_parse("addr", "0x3").unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).unwrap();
    }
    qom::container_get(&machine, "peripheral")
        .add_child("balloon0", &dev)
        .unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    machine_creation_done(&machine).unwrap();
    (machine, dev)
}

/// A driver with the three queues running (16 entries each).
fn start(machine: &ObjectRef, features: u64) -> (VirtioPciDevice, Vec<SplitRing>) {
    let dev = VirtioPciDevice::probe(machine, DEVFN);
    assert!(
        dev.negotiate(features),
        "FEATURES_OK refused for {features:#x}"
    );
    let rings: Vec<SplitRing> = RINGS.iter().map(|&at| SplitRing::new(at, 16)).collect();
    for (i, ring) in rings.iter().enumerate() {
        ring.clear(&dev.mem);
        dev.setup_queue(i as u16, ring);
    }
    dev.driver_ok();
    (dev, rings)
}

fn balloon(machine: &ObjectRef) -> Arc<hw::core::balloon::Balloon> {
    machine_state(machine).unwrap().services().balloon().clone()
}

/// Posts `pfns` on queue `q` (0: inflate, 1: deflate) and waits for the buffer back.
fn post_pfns(dev: &VirtioPciDevice, ring: &mut SplitRing, q: u16, pfns: &[u32]) {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    dev.mem.write_slice(&bytes, GuestAddress(LIST)).unwrap();
    ring.add_chain(&dev.mem, &[(LIST, bytes.len() as u32, false)]);
    dev.notify(q);
    assert_eq!(dev.wait_used(ring, 1, WAIT).len(), 1, "queue {q} answered");
}

#[test]
fn ids_features_and_configuration() {
    let (m, _) = pc_with_balloon(&[("deflate-on-oom", "on")]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        dev.config.read(0, 4),
        0x1002_1af4,
        "transitional virtio-balloon"
    );
    assert_eq!(dev.config.read(0x2c, 4), 0x0005_1af4, "subsystem: balloon");
    assert_eq!(dev.config.read(0x0a, 2), 0x00ff, "PCI_CLASS_OTHERS");
    assert_eq!(dev.num_queues(), 3, "inflate, deflate, stats");
    let f = dev.device_features();
    for bit in [VERSION_1, F_STATS_VQ, F_DEFLATE_ON_OOM, F_PAGE_POISON] {
        assert_ne!(f & bit, 0, "feature {bit:#x} missing from {f:#x}");
    }
    assert_eq!(dev.device_config(0, 4), 0, "num_pages");
    assert_eq!(dev.device_config(4, 4), 0, "actual");
    let (m, _) = pc_with_balloon(&[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        dev.device_features() & F_DEFLATE_ON_OOM,
        0,
        "off by default"
    );
}

#[test]
fn balloon_sets_num_pages_and_interrupts_the_driver() {
    let (m, _) = pc_with_balloon(&[]);
    let b = balloon(&m);
    let (dev, _) = start(&m, VERSION_1 | F_STATS_VQ);
    assert_eq!(dev.read_isr(), 0);
    // QMP `balloon` with 96 MiB: the guest should give up 32 MiB.
    b.set_target(96 << 20).unwrap();
    assert_eq!(dev.device_config(0, 4), (32 << 20) >> 12);
    assert_eq!(
        dev.read_isr() & 2,
        2,
        "configuration interrupt (INTx, ISR bit 1)"
    );
    // Above the guest's RAM it is clamped: nothing to give up.
    b.set_target(1 << 40).unwrap();
    assert_eq!(dev.device_config(0, 4), 0);
    assert_eq!(
        b.set_target(0).unwrap_err().to_string(),
        "Parameter 'target' expects a size"
    );
    assert_eq!(b.actual(), Ok(RAM), "query-balloon before the guest moved");
}

#[test]
fn inflated_pages_are_released_and_actual_is_reported() {
    let (m, _) = pc_with_balloon(&[]);
    let b = balloon(&m);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    b.add_change_listener(Arc::new(move |actual| sink.lock().unwrap().push(actual)));
    let (dev, mut rings) = start(&m, VERSION_1 | F_STATS_VQ);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
    dev.mem.write_slice(&pattern, GuestAddress(PAGE)).unwrap();
    // The driver inflates by the two pages, then writes `actual`.
    post_pfns(
        &dev,
        &mut rings[0],
        0,
        &[(PAGE >> 12) as u32, (PAGE >> 12) as u32 + 1],
    );
    let mut back = vec![0xffu8; 8192];
    dev.mem.read_slice(&mut back, GuestAddress(PAGE)).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "the pages went back to the host"
    );
    let mut next = vec![0u8; 16];
    dev.mem
        .read_slice(&mut next, GuestAddress(PAGE + 8192))
        .unwrap();
    assert_eq!(next, [0u8; 16], "the page after was never written");
    dev.write_device_config(4, 2, 4);
    assert_eq!(dev.device_config(4, 4), 2);
    assert_eq!(*events.lock().unwrap(), vec![RAM - 8192], "BALLOON_CHANGE");
    assert_eq!(b.actual(), Ok(RAM - 8192), "query-balloon");
    // The same value again is no change.
    dev.write_device_config(4, 2, 4);
    assert_eq!(events.lock().unwrap().len(), 1);
    // Deflating needs nothing from the host; the pages are usable again.
    post_pfns(&dev, &mut rings[1], 1, &[(PAGE >> 12) as u32]);
    dev.mem.write_slice(&pattern, GuestAddress(PAGE)).unwrap();
    dev.mem.read_slice(&mut back, GuestAddress(PAGE)).unwrap();
    assert_eq!(back, pattern);
    dev.write_device_config(4, 0, 4);
    assert_eq!(*events.lock().unwrap(), vec![RAM - 8192, RAM]);
}

#[test]
fn fuzzed_frame_lists_are_ignored() {
    let (m, _) = pc_with_balloon(&[]);
    let (dev, mut rings) = start(&m, VERSION_1);
    dev.mem
        .write_slice(&[7u8; 4096], GuestAddress(PAGE))
        .unwrap();
    // Frames beyond RAM, in the PCI hole, at the top of the 32-bit range.
    post_pfns(
        &dev,
        &mut rings[0],
        0,
        &[0xffff_ffff, 0x8000, 0xfee00, 0x7fff_ffff],
    );
    // A huge list of pseudo-random frames (half as many as the guest's pages: a longer
    // list is malformed), all outside the 128 MiB of RAM.
    let mut x = 0x1234_5678u32;
    let pfns: Vec<u32> = (0..16 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x | 0x1_0000
        })
        .collect();
    post_pfns(&dev, &mut rings[0], 0, &pfns);
    // A torn frame number (6 bytes) and an empty buffer.
    rings[0].add_chain(&dev.mem, &[(LIST, 6, false)]);
    rings[0].add_chain(&dev.mem, &[(LIST, 0, false)]);
    dev.notify(0);
    assert_eq!(dev.wait_used(&mut rings[0], 2, WAIT).len(), 2);
    assert_eq!(
        dev.status() & NEEDS_RESET,
        0,
        "bad frames are not ring errors"
    );
    let mut back = [0u8; 4096];
    dev.mem.read_slice(&mut back, GuestAddress(PAGE)).unwrap();
    assert!(back.iter().all(|&b| b == 7), "RAM untouched");
    // A broken ring does mark the device broken, and a reset mends it.
    rings[0].publish_raw_idx(&dev.mem, 300);
    dev.notify(0);
    let deadline = Instant::now() + WAIT;
    while dev.status() & NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(dev.status() & NEEDS_RESET, 0);
    let (dev, mut rings) = start(&m, VERSION_1);
    post_pfns(&dev, &mut rings[1], 1, &[1]);
}

#[test]
fn stats_are_received_and_polled() {
    let (m, obj) = pc_with_balloon(&[]);
    let pci = obj.cast::<VirtioBalloonPci>().unwrap();
    // With EVENT_IDX, as Linux negotiates it.
    let (dev, mut rings) = start(&m, VERSION_1 | F_STATS_VQ | (1 << 29));
    let mut records = Vec::new();
    for (tag, val) in [(4u16, 1234u64), (5, 5678), (99, 1)] {
        records.extend_from_slice(&tag.to_le_bytes());
        records.extend_from_slice(&val.to_le_bytes());
    }
    dev.mem.write_slice(&records, GuestAddress(LIST)).unwrap();
    rings[2].add_chain(&dev.mem, &[(LIST, records.len() as u32, false)]);
    dev.notify(2);
    let deadline = Instant::now() + WAIT;
    while pci.stats().guest_stats().1 == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (stats, last_update) = pci.stats().guest_stats();
    assert!(last_update > 0, "last-update");
    assert_eq!(stats[4], ("stat-free-memory", 1234));
    assert_eq!(stats[5], ("stat-total-memory", 5678));
    assert_eq!(stats[0].1, u64::MAX, "not reported");
    // The device asks for a kick at the refill (avail_event, after the used ring), or a
    // driver that honours it never reports again.
    let avail_event_at = rings[2].used + 4 + 8 * u64::from(rings[2].size);
    let avail_event: u16 = dev.mem.read_obj(GuestAddress(avail_event_at)).unwrap();
    assert_eq!(avail_event, 1, "a kick asked for at the next buffer");
    // Without polling the device keeps the buffer.
    std::thread::sleep(Duration::from_millis(50));
    assert!(rings[2].take_used(&dev.mem).is_empty());
    // guest-stats-polling-interval=1: the buffer comes back for a refill.
    obj.property_set("guest-stats-polling-interval", qom::Value::Int(1))
        .unwrap();
    assert_eq!(
        obj.property_get("guest-stats-polling-interval").unwrap(),
        qom::Value::Int(1)
    );
    assert_eq!(dev.wait_used(&mut rings[2], 1, WAIT).len(), 1, "polled");
    let err = obj
        .property_set("guest-stats-polling-interval", qom::Value::Int(-1))
        .unwrap_err();
    assert_eq!(err.to_string(), "timer value must be greater than zero");
}

#[test]
fn one_balloon_per_machine() {
    let (m, _) = pc_with_balloon(&[]);
    let bus = m.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new("virtio-balloon-pci").unwrap();
    dev.property_parse("addr", "0x5").unwrap();
    m.child("peripheral-anon")
        .unwrap()
        .add_child("device[*]", &dev)
        .unwrap();
    assert_eq!(
        qdev_realize(&dev, Some(&bus)).unwrap_err().to_string(),
        "Only one balloon device is supported"
    );
}

/// Found by `tests/fuzz_devices.rs`: buffers spanning guest RAM (frame numbers 0 repeated
/// and then more frames than the guest has) were each walked frame by frame, millions of
/// madvise calls, while the driver's reset waited for the handler. A repeated frame is
/// advised once, a buffer naming more frames than the guest has pages breaks the device,
/// and both come back quickly.
#[test]
fn buffers_of_more_frames_than_guest_pages_break_the_device_quickly() {
    let (m, _) = pc_with_balloon(&[]);
    let (dev, mut rings) = start(&m, VERSION_1);
    let started = Instant::now();
    // 32 MiB of zeroes: 8M frame numbers for a guest of 32K pages.
    rings[0].add_chain(&dev.mem, &[(0x100_0000, 32 << 20, false)]);
    dev.notify(0);
    let deadline = Instant::now() + WAIT;
    while dev.status() & NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(
        dev.status() & NEEDS_RESET,
        0,
        "a 32 MiB frame list is malformed"
    );
    // Fewer frames than pages, all the same frame: one madvise, the buffer comes back.
    let (dev, mut rings) = start(&m, VERSION_1);
    rings[0].add_chain(&dev.mem, &[(0x100_0000, 4 * 30_000, false)]);
    dev.notify(0);
    assert_eq!(dev.wait_used(&mut rings[0], 1, WAIT).len(), 1);
    assert_eq!(dev.status() & NEEDS_RESET, 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
