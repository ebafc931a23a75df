//! `virtio-rng-pci` on the pc board under the qtest accelerator, driven by the test's own
//! virtio 1.x driver: QEMU's IDs, bytes from the default backend and from `rng-random`,
//! `max-bytes`/`period` rate limiting (counted in whole periods, with no timing assert that
//! can flake: the token arithmetic itself is unit-tested in `hw/virtio/virtio_rng.rs`),
//! QEMU's errors, and broken rings that mark the device broken without panicking.

use std::time::{Duration, Instant};

use hw::core::machine::machine_creation_done;
use qom::ObjectRef;
use test_support::virtio::{PciConfig, SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 4 << 3;
const RING: u64 = 0x10_0000;
const BUF: u64 = 0x20_0000;

fn pc_machine() -> ObjectRef {
    test_support::qtest::pc_on_qtest(128 << 20)
}

/// Realizes `virtio-rng-pci,addr=04.0,props...`; the error text if it fails.
fn try_plug(machine: &ObjectRef, props: &[(&str, &str)]) -> Result<ObjectRef, String> {
    let props: Vec<_> = [("addr", "04.0")].iter().chain(props).copied().collect();
    test_support::qtest::try_plug_pci(machine, "virtio-rng-pci", &props)
}

fn pc_with_rng(props: &[(&str, &str)]) -> ObjectRef {
    let machine = pc_machine();
    try_plug(&machine, props).unwrap();
    machine_creation_done(&machine).unwrap();
    machine
}

/// A driver with the request queue running (8 entries).
fn start(machine: &ObjectRef) -> (VirtioPciDevice, SplitRing) {
    let dev = VirtioPciDevice::probe(machine, DEVFN);
    assert!(dev.negotiate(VERSION_1));
    let ring = SplitRing::new(RING, 8);
    ring.clear(&dev.mem);
    dev.setup_queue(0, &ring);
    dev.driver_ok();
    (dev, ring)
}

/// Posts `n` device-writable buffers of `len` bytes (buffer i at BUF + i * 4 KiB).
fn post(dev: &VirtioPciDevice, ring: &mut SplitRing, n: u64, len: u32) {
    for i in 0..n {
        ring.add_chain(&dev.mem, &[(BUF + i * 4096, len, true)]);
    }
    dev.notify(0);
}

/// `rng-random` `/objects/ID` reading `path` (as `-object rng-random,id=ID,filename=PATH`).
fn add_rng_random(id: &str, path: &str) -> Result<ObjectRef, String> {
    accel::init().expect("registrations are intact");
    qom::user_creatable_add_type("rng-random", id, |obj| obj.property_parse("filename", path))
        .map_err(|e| e.to_string())
}

#[test]
fn ids_and_bytes_from_the_default_backend() {
    let m = pc_with_rng(&[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        dev.config.read(0, 4),
        0x1005_1af4,
        "transitional virtio-rng"
    );
    assert_eq!(dev.config.read(0x2c, 4), 0x0004_1af4, "subsystem: rng");
    assert_eq!(dev.config.read(0x0a, 2), 0x00ff, "PCI_CLASS_OTHERS");
    assert_eq!(dev.num_queues(), 1);
    let dev_obj = m
        .child("peripheral-anon")
        .unwrap()
        .child("device[0]")
        .unwrap();
    assert!(
        dev_obj.child("default-backend").is_some(),
        "an implicit rng-builtin, as QEMU's"
    );
    let (dev, mut ring) = start(&m);
    dev.mem.write_slice(&[0u8; 256], GuestAddress(BUF)).unwrap();
    post(&dev, &mut ring, 1, 256);
    let used = dev.wait_used(&mut ring, 1, WAIT);
    assert_eq!(used, vec![(0, 256)]);
    let mut got = [0u8; 256];
    dev.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert!(got.iter().filter(|&&b| b == 0).count() < 32, "random bytes");
}

#[test]
fn rng_random_reads_its_file_into_the_guest() {
    let dir = std::env::temp_dir().join(format!("qomvm-virtio-rng-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("entropy");
    let content: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    add_rng_random("rng-file", path.to_str().unwrap()).unwrap();
    let m = pc_with_rng(&[("rng", "rng-file")]);
    let (dev, mut ring) = start(&m);
    post(&dev, &mut ring, 2, 200);
    let used = dev.wait_used(&mut ring, 2, WAIT);
    assert_eq!(
        used,
        vec![(0, 200), (1, 100)],
        "the file's 300 bytes, then its end"
    );
    let mut got = vec![0u8; 200];
    dev.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got, content[..200]);
    dev.mem
        .read_slice(&mut got[..100], GuestAddress(BUF + 4096))
        .unwrap();
    assert_eq!(got[..100], content[200..]);
    // At its end the file serves nothing more; the device neither spins nor breaks.
    post(&dev, &mut ring, 1, 16);
    std::thread::sleep(Duration::from_millis(100));
    assert!(ring.take_used(&dev.mem).is_empty());
    assert_eq!(dev.status() & NEEDS_RESET, 0);
}

#[test]
fn backends_and_properties_get_qemus_errors() {
    assert_eq!(
        add_rng_random("rng-missing", "/nonexistent/qomvm").unwrap_err(),
        "Could not open '/nonexistent/qomvm': No such file or directory"
    );
    let m = pc_machine();
    assert_eq!(
        try_plug(&m, &[("period", "0")]).unwrap_err(),
        "'period' parameter expects a positive integer"
    );
    let m = pc_machine();
    assert_eq!(
        try_plug(&m, &[("max-bytes", "9223372036854775808")]).unwrap_err(),
        "'max-bytes' parameter must be non-negative, and less than 2^63"
    );
    let m = pc_machine();
    assert_eq!(
        try_plug(&m, &[("rng", "no-such-rng")]).unwrap_err(),
        "Device 'no-such-rng' not found"
    );
    // The default path of rng-random is QEMU 7.2's.
    let obj = add_rng_random("rng-default", "/dev/urandom").unwrap();
    assert_eq!(
        qom::object_new("rng-random")
            .unwrap()
            .property_get("filename")
            .unwrap(),
        qom::Value::Str("/dev/urandom".into())
    );
    obj.unparent();
}

#[test]
fn max_bytes_is_served_once_per_period() {
    const MAX: u64 = 100;
    const PERIOD_MS: u64 = 300;
    let m = pc_with_rng(&[("max-bytes", "100"), ("period", "300")]);
    let (dev, mut ring) = start(&m);
    let t0 = Instant::now();
    post(&dev, &mut ring, 8, 64);
    // The first period serves exactly its quota, whatever the timing: 64 + 36 bytes.
    let first = dev.wait_used(&mut ring, 2, WAIT);
    assert_eq!(first, vec![(0, 64), (1, 36)]);
    // Later periods refill it: the rest arrives, never faster than a quota per period.
    let mut total: u64 = first.iter().map(|u| u64::from(u.1)).sum();
    let mut entries = first.len();
    let deadline = Instant::now() + WAIT;
    while entries < 8 && Instant::now() < deadline {
        for (_, len) in ring.take_used(&dev.mem) {
            total += u64::from(len);
            entries += 1;
        }
        let periods = t0.elapsed().as_millis() as u64 / PERIOD_MS;
        assert!(
            total <= MAX * (periods + 1),
            "{total} bytes after {periods} whole periods"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(entries, 8, "the later periods served the rest");
    // Each period's 100 bytes fill one buffer and 36 bytes of the next.
    assert_eq!(total, 4 * MAX);
}

#[test]
fn max_bytes_zero_serves_nothing() {
    let m = pc_with_rng(&[("max-bytes", "0"), ("period", "50")]);
    let (dev, mut ring) = start(&m);
    post(&dev, &mut ring, 1, 64);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ring.take_used(&dev.mem).is_empty());
    assert_eq!(dev.status() & NEEDS_RESET, 0);
}

#[test]
fn broken_rings_mark_the_device_broken_until_reset() {
    let m = pc_with_rng(&[]);
    // A buffer outside guest RAM.
    let (dev, mut ring) = start(&m);
    ring.add_chain(&dev.mem, &[(0xffff_0000_0000, 64, true)]);
    dev.notify(0);
    let deadline = Instant::now() + WAIT;
    while dev.status() & NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(dev.status() & NEEDS_RESET, 0, "bad buffer address");
    // The available index moved by more than the ring holds.
    let (dev, mut ring) = start(&m);
    ring.publish_raw_idx(&dev.mem, 200);
    dev.notify(0);
    let deadline = Instant::now() + WAIT;
    while dev.status() & NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_ne!(dev.status() & NEEDS_RESET, 0, "bad avail index");
    // A descriptor loop is cut at the ring's size: served, no hang.
    let (dev, mut ring) = start(&m);
    ring.write_desc(&dev.mem, 0, BUF, 16, 1 | 2, 1);
    ring.write_desc(&dev.mem, 1, BUF, 16, 1 | 2, 0);
    ring.publish(&dev.mem, 0);
    dev.notify(0);
    let used = dev.wait_used(&mut ring, 1, WAIT);
    assert!(matches!(used[..], [(0, len)] if len <= 8 * 16), "{used:?}");
    // After a reset the device works again.
    let (dev, mut ring) = start(&m);
    post(&dev, &mut ring, 1, 32);
    assert_eq!(dev.wait_used(&mut ring, 1, WAIT), vec![(0, 32)]);
}

/// The `VIRTIO_PCI_CAP_PCI_CFG` window (virtio 1.x, 4.1.4.7): the driver names a BAR
/// offset and length in the capability, and the capability's data bytes then read and
/// write the modern BAR there, as they do through the BAR itself (iPXE refuses a device
/// without the capability; firmware in 32-bit mode reaches a BAR above 4 GiB through it).
#[test]
fn the_pci_configuration_window_reads_and_writes_the_modern_bar() {
    let m = pc_with_rng(&[]);
    let config = PciConfig::new(&m, DEVFN);
    let window = config
        .capabilities()
        .into_iter()
        .filter(|&(id, _)| id == 0x09)
        .map(|(_, at)| at)
        .find(|&at| config.read(at + 3, 1) == 5)
        .expect("a VIRTIO_PCI_CAP_PCI_CFG capability");
    assert_eq!(config.read(window + 2, 1), 20, "cap_len");
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    let at = |offset: u32, len: u32| {
        config.write(window + 4, 4, 1); // the modern BAR
        config.write(window + 8, offset, 4);
        config.write(window + 12, len, 4);
    };
    // num_queues (common configuration 0x12, 2 bytes): one request queue.
    at(0x12, 2);
    assert_eq!(config.read(window + 16, 2), 1);
    // device_status (0x14, 1 byte) written through the window, read through the BAR.
    at(0x14, 1);
    config.write(window + 16, 1, 1);
    assert_eq!(dev.status(), 1, "ACKNOWLEDGE reached the device");
    dev.set_status(3);
    assert_eq!(
        config.read(window + 16, 1),
        3,
        "and the window reads what the BAR has"
    );
    // A length other than 1, 2 or 4 moves nothing (the data bytes just hold what was written).
    at(0x14, 3);
    config.write(window + 16, 0, 1);
    assert_eq!(dev.status(), 3);
}

/// A driver sizing BAR 4 with memory decoding on (iPXE does) writes all ones: the BAR
/// then reads back its size mask, a range ending at 0xffffffff, over the BIOS. As in
/// QEMU, such a range is not mapped; the old address maps again once written back.
#[test]
fn a_bar_sized_with_decoding_on_stays_unmapped() {
    let m = pc_with_rng(&[]);
    let config = PciConfig::new(&m, DEVFN);
    config.write(0x04, 0x7, 2);
    let dev = m
        .child("peripheral-anon")
        .unwrap()
        .child("device[0]")
        .unwrap();
    let pci = dev.cast::<hw::pci::pci::PciDevice>().unwrap();
    let bar4 = |pci: &hw::pci::pci::PciDevice| {
        pci.regions()
            .into_iter()
            .find(|r| r.0 == 4)
            .and_then(|r| r.2)
    };
    let before = config.read(0x20, 4);
    assert_eq!(bar4(pci), Some(u64::from(before & !0xf)));
    config.write(0x20, 0xffff_ffff, 4);
    assert_eq!(config.read(0x20, 4) & !0xf, 0xffff_c000, "the size mask");
    assert_eq!(bar4(pci), None);
    config.write(0x20, before, 4);
    assert_eq!(bar4(pci), Some(u64::from(before & !0xf)));
}
