//! `virtio-blk-pci` on the pc board under the qtest accelerator, driven by the test's own
//! virtio 1.x driver (test_support::virtio): feature negotiation, requests of every type
//! against a real image file, read-only drives, and rings full of garbage, which must
//! never panic or hang qomvm, only mark the device broken until the driver resets it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::{BlockBackend, Format, OpenOptions};
use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::core::runstate::ShutdownCause;
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 4 << 3;

/// Guest addresses the test lays things out at.
const RING: u64 = 0x10_0000;
const HEADER: u64 = 0x20_0000;
const DATA: u64 = 0x21_0000;
const STATUS: u64 = 0x30_0000;

fn temp_image(name: &str, size: u64) -> PathBuf {
    test_support::drives::temp_image("virtio-blk", name, size)
}

/// Opens `path` as drive `id` (as `-drive if=none,id=ID,format=raw`).
fn add_drive(id: &str, path: &std::path::Path, read_only: bool) -> Arc<BlockBackend> {
    test_support::drives::add_raw_drive(id, path, read_only, false)
}

/// A pc machine on qtest with `virtio-blk-pci,drive=DRIVE,props...` at 04.0.
fn pc_with_disk(drive: &str, props: &[(&str, &str)]) -> ObjectRef {
    pc_with_disks(&[(drive, "04.0")], props)
}

/// A pc machine on qtest with a `virtio-blk-pci,drive=DRIVE,addr=ADDR,props...` for each
/// (drive, addr).
fn pc_with_disks(disks: &[(&str, &str)], props: &[(&str, &str)]) -> ObjectRef {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    for (drive, addr) in disks {
        let dev = qdev_new("virtio-blk-pci").unwrap();
        dev.property_parse("drive", drive).unwrap();
        dev.property_parse("addr", addr).unwrap();
        for (k, v) in props {
            dev.property_parse(k, v).unwrap();
        }
        machine
            .child("peripheral-anon")
            .unwrap()
            .add_child("device[*]", &dev)
            .unwrap();
        qdev_realize(&dev, Some(&bus)).unwrap();
    }
    machine_creation_done(&machine).unwrap();
    machine
}

/// A driver with queue 0 running (16 entries).
fn start(machine: &ObjectRef, features: u64) -> (VirtioPciDevice, SplitRing) {
    let dev = VirtioPciDevice::probe(machine, DEVFN);
    assert!(
        dev.negotiate(features),
        "FEATURES_OK refused for {features:#x}"
    );
    let ring = SplitRing::new(RING, 16);
    ring.clear(&dev.mem);
    dev.setup_queue(0, &ring);
    dev.driver_ok();
    (dev, ring)
}

/// Submits one request (`kind`, `sector`, data buffer of `len` bytes, device-writable for
/// reads) and returns its status byte and the used length.
fn request(
    dev: &VirtioPciDevice,
    ring: &mut SplitRing,
    kind: u32,
    sector: u64,
    len: u32,
    data_writable: bool,
) -> (u8, u32) {
    let mem = &dev.mem;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut bufs = vec![(HEADER, 16, false)];
    if len > 0 {
        bufs.push((DATA, len, data_writable));
    }
    bufs.push((STATUS, 1, true));
    let head = ring.add_chain(mem, &bufs);
    dev.notify(0);
    let used = dev.wait_used(ring, 1, WAIT);
    assert_eq!(used.len(), 1, "request {kind} was not completed");
    assert_eq!(used[0].0, u32::from(head));
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), used[0].1)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn the_device_presents_virtio_ids_and_capabilities() {
    let path = temp_image("ids.raw", 1 << 20);
    add_drive("vblk-ids", &path, false);
    let m = pc_with_disk("vblk-ids", &[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        dev.config.read(0, 4),
        0x1001_1af4,
        "transitional virtio-blk"
    );
    assert_eq!(dev.config.read(0x2c, 4), 0x0002_1af4, "subsystem: block");
    assert_eq!(dev.config.read(0x0a, 2), 0x0100, "SCSI storage class");
    let caps: Vec<u8> = dev.config.capabilities().iter().map(|c| c.0).collect();
    assert!(caps.contains(&0x11), "MSI-X capability: {caps:?}");
    // Common, ISR, device and notify configuration, and the PCI configuration window.
    assert_eq!(caps.iter().filter(|&&c| c == 0x09).count(), 5, "{caps:?}");
    let features = dev.device_features();
    for f in [
        VERSION_1,
        F_FLUSH,
        F_DISCARD,
        F_WRITE_ZEROES,
        F_INDIRECT,
        F_EVENT_IDX,
    ] {
        assert_ne!(features & f, 0, "feature {f:#x} missing from {features:#x}");
    }
    assert_eq!(features & F_RO, 0);
    assert_eq!(
        dev.device_config(0, 8),
        (1 << 20) / 512,
        "capacity in sectors"
    );
    assert_eq!(dev.num_queues(), 1, "one queue per vCPU");
    // A modern driver must accept VERSION_1; features the device lacks are refused.
    assert!(!dev.negotiate(F_FLUSH), "FEATURES_OK without VERSION_1");
    assert!(
        !dev.negotiate(VERSION_1 | (1 << 63)),
        "FEATURES_OK with unknown bits"
    );
    assert!(dev.negotiate(VERSION_1 | F_FLUSH));
}

#[test]
fn requests_reach_the_image_and_come_back() {
    let path = temp_image("rw.raw", 4 << 20);
    add_drive("vblk-rw", &path, false);
    let m = pc_with_disk("vblk-rw", &[("serial", "QOMVM-SERIAL-0001")]);
    let (dev, mut ring) = start(&m, VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES);

    let data = pattern(8192, 0x5a);
    dev.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_OUT, 16, 8192, false), (0, 1));
    let on_disk = std::fs::read(&path).unwrap();
    let first_diff = (0..8192).find(|&i| on_disk[16 * 512 + i] != data[i]);
    let found_at = on_disk.windows(16).position(|w| w == &data[..16]);
    assert_eq!(
        first_diff, None,
        "the image holds the write (pattern found at {found_at:?})"
    );
    // Without MSI-X the completion raised INTx and set the ISR's queue bit.
    assert_eq!(dev.read_isr() & 1, 1);
    assert_eq!(dev.read_isr(), 0, "reading the ISR clears it");

    dev.mem
        .write_slice(&[0u8; 8192], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&dev, &mut ring, T_IN, 16, 8192, true), (0, 8193));
    let mut back = vec![0u8; 8192];
    dev.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    let first_diff = (0..8192).find(|&i| back[i] != data[i]);
    let found_at = back.windows(16).position(|w| w == &data[..16]);
    assert_eq!(
        first_diff, None,
        "read back (pattern found at {found_at:?})"
    );

    assert_eq!(request(&dev, &mut ring, T_FLUSH, 0, 0, false).0, 0);
    let (status, len) = request(&dev, &mut ring, T_GET_ID, 0, 20, true);
    assert_eq!((status, len), (0, 21));
    let mut id = [0u8; 20];
    dev.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..17], b"QOMVM-SERIAL-0001");

    // Past the end of the disk, and not a multiple of the block size: I/O errors.
    assert_eq!(request(&dev, &mut ring, T_IN, 8192, 512, true).0, 1);
    assert_eq!(request(&dev, &mut ring, T_OUT, 0, 100, false).0, 1);
    // Unknown request types are unsupported.
    assert_eq!(request(&dev, &mut ring, 0x77, 0, 0, false).0, 2);

    // WRITE_ZEROES over the first half of the pattern; DISCARD must not carry flags.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&16u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    dev.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_WRITE_ZEROES, 0, 16, false).0, 0);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[16 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(
        on_disk[24 * 512..32 * 512] == data[4096..],
        "the rest is untouched"
    );
    seg[12] = 1;
    dev.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_DISCARD, 0, 16, false).0, 2);
    seg[12] = 0;
    dev.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_DISCARD, 0, 16, false).0, 0);
}

/// Several requests behind one notification: they go to the device's thread pool and all
/// complete, each with its own data.
#[test]
fn a_batch_of_requests_completes_out_of_the_pool() {
    let path = temp_image("batch.raw", 4 << 20);
    let content: Vec<u8> = (0..(4u32 << 20) / 4)
        .flat_map(|i| i.to_le_bytes())
        .collect();
    std::fs::write(&path, &content).unwrap();
    add_drive("vblk-batch", &path, false);
    let m = pc_with_disk("vblk-batch", &[]);
    let (dev, mut ring) = start(&m, VERSION_1);
    let mem = &dev.mem;
    let mut heads = Vec::new();
    for i in 0..5u64 {
        let header_at = HEADER + 16 * i;
        let mut header = [0u8; 16];
        header[8..16].copy_from_slice(&(i * 64).to_le_bytes());
        mem.write_slice(&header, GuestAddress(header_at)).unwrap();
        heads.push(ring.add_chain(
            mem,
            &[
                (header_at, 16, false),
                (DATA + 0x1000 * i, 4096, true),
                (STATUS + i, 1, true),
            ],
        ));
    }
    dev.notify(0);
    let used = dev.wait_used(&mut ring, 5, WAIT);
    assert_eq!(used.len(), 5, "all requests complete");
    for (i, _) in heads.iter().enumerate() {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + i as u64)).unwrap();
        assert_eq!(status, 0);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA + 0x1000 * i as u64))
            .unwrap();
        let at = i * 64 * 512;
        assert!(
            got == content[at..at + 4096],
            "request {i} read the wrong data"
        );
    }
}

/// With MSI-X enabled, completions go to the queue's vector, not INTx: under the function
/// mask the vector's pending bit records it (qtest delivers no MSI).
#[test]
fn completions_use_the_queues_msix_vector() {
    let path = temp_image("msix.raw", 1 << 20);
    add_drive("vblk-msix", &path, false);
    let m = pc_with_disk("vblk-msix", &[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    let (_, cap) = *dev
        .config
        .capabilities()
        .iter()
        .find(|c| c.0 == 0x11)
        .expect("MSI-X capability");
    let table_size = (dev.config.read(cap + 2, 2) & 0x7ff) + 1;
    assert_eq!(
        table_size, 2,
        "one vector per queue plus one for configuration"
    );
    let pba = dev.config.read(cap + 8, 4);
    let pba_bar = u64::from(dev.config.read(0x10 + 4 * (pba & 7), 4) & !0xf);
    let pba_addr = pba_bar + u64::from(pba & !7);
    // Enable MSI-X with the function masked.
    dev.config.write(cap + 2, 0xc000, 2);
    assert!(dev.negotiate(VERSION_1));
    assert_eq!(dev.set_vector(None, 0), 0);
    assert_eq!(dev.set_vector(Some(0), 1), 1);
    assert_eq!(
        dev.set_vector(Some(0), 7),
        0xffff,
        "a vector the table lacks"
    );
    assert_eq!(dev.set_vector(Some(0), 1), 1);
    let mut ring = SplitRing::new(RING, 16);
    ring.clear(&dev.mem);
    dev.setup_queue(0, &ring);
    dev.driver_ok();
    assert_eq!(dev.mmio().read(pba_addr, 8), 0);
    assert_eq!(request(&dev, &mut ring, T_FLUSH, 0, 0, false).0, 0);
    let deadline = std::time::Instant::now() + WAIT;
    while dev.mmio().read(pba_addr, 8) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(dev.mmio().read(pba_addr, 8), 0b10, "vector 1 pending");
    assert_eq!(dev.read_isr(), 0, "no INTx while MSI-X is on");
    // A system reset turns MSI-X off and clears the PBA (QEMU's msix_reset).
    let ms = machine_state(&m).unwrap();
    hw::core::runstate::qemu_system_reset(ms, ShutdownCause::GuestReset);
    assert_eq!(dev.config.read(cap + 2, 2), 1, "MSI-X off, table size 2");
    assert_eq!(dev.mmio().read(pba_addr, 8), 0);
}

/// Slots 4 and 5 swizzle INTA to PIRQA and PIRQB, both on ISA IRQ 10: the line stays high
/// until both devices' interrupts are acknowledged (PIIX ORs the sharers).
#[test]
fn devices_sharing_an_intx_line_do_not_hide_each_others_interrupts() {
    let a = temp_image("share-a.raw", 1 << 20);
    let b = temp_image("share-b.raw", 1 << 20);
    add_drive("vblk-share-a", &a, false);
    add_drive("vblk-share-b", &b, false);
    let m = pc_with_disks(&[("vblk-share-a", "04.0"), ("vblk-share-b", "05.0")], &[]);
    let level = |gsi| {
        machine_state(&m)
            .unwrap()
            .accel_ops()
            .unwrap()
            .as_any()
            .downcast_ref::<accel::qtest::QtestOps>()
            .unwrap()
            .irq_level(gsi)
    };
    let dev_a = VirtioPciDevice::probe(&m, 4 << 3);
    let dev_b = VirtioPciDevice::probe(&m, 5 << 3);
    assert_eq!(dev_a.config.read(0x3c, 1), 10);
    assert_eq!(dev_b.config.read(0x3c, 1), 10);
    let mut rings = Vec::new();
    for (dev, base) in [(&dev_a, RING), (&dev_b, RING + 0x8000)] {
        assert!(dev.negotiate(VERSION_1));
        let ring = SplitRing::new(base, 16);
        ring.clear(&dev.mem);
        dev.setup_queue(0, &ring);
        dev.driver_ok();
        rings.push(ring);
    }
    for (dev, ring) in [&dev_a, &dev_b].into_iter().zip(rings.iter_mut()) {
        assert_eq!(request(dev, ring, T_FLUSH, 0, 0, false).0, 0);
    }
    assert!(level(10), "both devices interrupt");
    assert_eq!(dev_a.read_isr() & 1, 1);
    assert!(level(10), "device B still asserts IRQ 10");
    assert_eq!(dev_b.read_isr() & 1, 1);
    assert!(!level(10), "both acknowledged");
}

#[test]
fn a_read_only_drive_refuses_writes_with_ioerr() {
    let path = temp_image("ro.raw", 1 << 20);
    std::fs::write(&path, vec![0xabu8; 1 << 20]).unwrap();
    add_drive("vblk-ro", &path, true);
    let m = pc_with_disk("vblk-ro", &[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_ne!(dev.device_features() & F_RO, 0, "VIRTIO_BLK_F_RO offered");
    let (dev, mut ring) = start(&m, VERSION_1 | F_RO | F_WRITE_ZEROES);
    dev.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        request(&dev, &mut ring, T_OUT, 0, 512, false).0,
        1,
        "VIRTIO_BLK_S_IOERR"
    );
    assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true).0, 0);
    let mut back = [0u8; 512];
    dev.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == [0xab; 512]);
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0xab));
}

#[test]
fn a_drive_serves_one_device_only() {
    let path = temp_image("once.raw", 1 << 20);
    add_drive("vblk-once", &path, false);
    let m = pc_with_disk("vblk-once", &[]);
    let bus = m.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new("virtio-blk-pci").unwrap();
    dev.property_parse("drive", "vblk-once").unwrap();
    m.child("peripheral-anon")
        .unwrap()
        .add_child("device[*]", &dev)
        .unwrap();
    let err = qdev_realize(&dev, Some(&bus)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Drive 'vblk-once' is already in use by another device"
    );
}

/// xorshift64*: the fuzz test's reproducible randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn rings_full_of_garbage_never_panic_and_a_reset_recovers() {
    let path = temp_image("fuzz.raw", 1 << 20);
    add_drive("vblk-fuzz", &path, false);
    let m = pc_with_disk("vblk-fuzz", &[]);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut broken = 0;
    for round in 0..200 {
        let (dev, mut ring) = start(&m, VERSION_1 | F_INDIRECT | F_EVENT_IDX | F_FLUSH);
        // Random descriptors: addresses in and far outside RAM, lengths up to 4 GiB,
        // every flag combination (indirect, chained loops), random next indices.
        for i in 0..ring.size {
            let addr = match rng.next() % 4 {
                0 => rng.next(),
                1 => HEADER + (rng.next() % 0x1000),
                2 => DATA,
                _ => (128 << 20) - (rng.next() % 0x2000),
            };
            let len = match rng.next() % 4 {
                0 => rng.next() as u32,
                1 => 16,
                2 => (rng.next() % 0x10000) as u32,
                _ => 0,
            };
            let flags = (rng.next() % 8) as u16;
            let next = (rng.next() % 20) as u16;
            ring.write_desc(&dev.mem, i, addr, len, flags, next);
        }
        // Headers the descriptors may point at.
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&((rng.next() % 16) as u32).to_le_bytes());
        header[8..16].copy_from_slice(&(rng.next() % 4096).to_le_bytes());
        dev.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        for _ in 0..(rng.next() % 8) {
            ring.publish(&dev.mem, (rng.next() % 24) as u16);
        }
        if round % 5 == 0 {
            // An available index far ahead of what the ring holds.
            ring.publish_raw_idx(&dev.mem, rng.next() as u16);
        }
        dev.notify(0);
        dev.notify((rng.next() % 4) as u16);
        std::thread::sleep(Duration::from_millis(2));
        if dev.status() & NEEDS_RESET != 0 {
            broken += 1;
        }
    }
    assert!(broken > 0, "garbage rings never marked the device broken");

    // After a reset, a well-formed ring works again.
    let (dev, mut ring) = start(&m, VERSION_1);
    assert_eq!(dev.status() & NEEDS_RESET, 0);
    let data = pattern(512, 1);
    dev.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_OUT, 1, 512, false).0, 0);
    dev.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&dev, &mut ring, T_IN, 1, 512, true).0, 0);
    let mut back = vec![0u8; 512];
    dev.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == data, "the data read back differs");
}

fn qomvm(args: &[&str]) -> (Option<i32>, String) {
    test_support::qtest::qomvm_pc_quit(env!("CARGO_BIN_EXE_qomvm"), args)
}

#[test]
fn bad_virtio_blk_options_get_qemus_errors() {
    let path = temp_image("cli.raw", 1 << 20);
    let file = format!("file={},if=none,id=d0,format=raw", path.display());
    for (device, error) in [
        ("virtio-blk-pci", "drive property not set"),
        (
            "virtio-blk-pci,drive=nope",
            "Property 'virtio-blk-device.drive' can't find value 'nope'",
        ),
        (
            "virtio-blk-pci,drive=d0,scsi=on",
            "Please set scsi=off for virtio-blk devices in order to use virtio 1.0",
        ),
        (
            "virtio-blk-pci,drive=d0,queue-size=100",
            "invalid queue-size property (100), must be a power of 2 (max 1024)",
        ),
        (
            "virtio-blk-pci,drive=d0,num-queues=0",
            "num-queues property must be larger than 0",
        ),
        (
            "virtio-blk-pci,drive=d0,iothread=io9",
            "Property 'virtio-blk-device.iothread' can't find value 'io9'",
        ),
        (
            "virtio-blk-pci,drive=d0,disable-legacy=on,disable-modern=on",
            "device cannot work as neither modern nor legacy mode is enabled",
        ),
    ] {
        let (status, stderr) = qomvm(&["-drive", &file, "-device", device]);
        assert_eq!(status, Some(1), "{device}: {stderr}");
        assert_eq!(stderr, format!("qomvm: -device {device}: {error}\n"));
    }
    // Two devices on one drive.
    let (status, stderr) = qomvm(&[
        "-drive",
        &file,
        "-device",
        "virtio-blk-pci,drive=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
    ]);
    assert_eq!(status, Some(1));
    assert!(
        stderr.contains("Drive 'd0' is already in use by another device"),
        "{stderr}"
    );
}

/// The seed's OpenStack command line: a qcow2 overlay on a backing file, `if=none` with
/// `cache=none`, and its `-device virtio-blk-pci` with `scsi=off`, `bus=pci.0`, `addr`,
/// `id` and `bootindex`, as libvirt writes them; `if=virtio` too.
#[test]
fn the_seeds_drive_and_device_pair_is_accepted() {
    let dir = temp_image("seed-dummy", 0).parent().unwrap().to_path_buf();
    let base = dir.join("seed-base.qcow2");
    let top = dir.join("seed-top.qcow2");
    let img = |args: &[&str]| {
        let ok = std::process::Command::new("qemu-img").args(args).status();
        ok.map(|s| s.success()).unwrap_or(false)
    };
    if !img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]) {
        test_support::skip::skip("qemu-img (Debian qemu-utils) is not installed");
        return;
    }
    assert!(img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]));
    let drive = format!(
        "file={},if=none,id=drive-virtio-disk0,format=qcow2,cache=none",
        top.display()
    );
    // cache=none needs O_DIRECT, which tmpfs refuses: fall back to writeback there.
    let (status, stderr) = qomvm(&[
        "-drive", &drive,
        "-device", "virtio-blk-pci,scsi=off,bus=pci.0,addr=0x4,drive=drive-virtio-disk0,id=virtio-disk0,bootindex=1",
    ]);
    let (status, stderr) = if stderr.contains("Invalid argument") {
        let drive = drive.replace("cache=none", "cache=writeback");
        qomvm(&[
            "-drive", &drive,
            "-device", "virtio-blk-pci,scsi=off,bus=pci.0,addr=0x4,drive=drive-virtio-disk0,id=virtio-disk0,bootindex=1",
        ])
    } else {
        (status, stderr)
    };
    assert_eq!(status, Some(0), "{stderr}");
    let virtio = format!("file={},if=virtio,format=qcow2", top.display());
    let (status, stderr) = qomvm(&["-drive", &virtio]);
    assert_eq!(status, Some(0), "{stderr}");
}

/// fio's pattern on an iothread: rounds of four 1 MiB writes behind one notification, each
/// through an indirect table of 4 KiB pieces, with event index on; every round completes.
#[test]
fn queued_large_writes_on_an_iothread_all_complete() {
    let path = temp_image("stress.raw", 16 << 20);
    add_drive("vblk-stress", &path, false);
    qom::object_interfaces::user_creatable_add_type("iothread", "io-stress", |_| Ok(())).unwrap();
    queued_large_writes("vblk-stress", "io-stress");
}

/// The same on a qcow2 image, whose clusters the concurrent writes allocate.
#[test]
fn queued_large_writes_allocating_qcow2_clusters_all_complete() {
    let path = temp_image("stress-q.qcow2", 0);
    std::fs::remove_file(&path).unwrap();
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "16M"])
        .status();
    if !created.map(|s| s.success()).unwrap_or(false) {
        test_support::skip::skip("qemu-img (Debian qemu-utils) is not installed");
        return;
    }
    let mut opts = OpenOptions::new(&path);
    opts.format = Some(Format::Qcow2);
    // O_DIRECT, as the seed's cache=none: guest buffers go to the file as they are.
    opts.cache = block::CacheMode::from_name("none").unwrap();
    let backend =
        BlockBackend::open("vblk-stress-q", &block::auto_node_name(), opts, |_| {}).unwrap();
    block::add_backend(backend).unwrap();
    qom::object_interfaces::user_creatable_add_type("iothread", "io-stress-q", |_| Ok(())).unwrap();
    queued_large_writes("vblk-stress-q", "io-stress-q");
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-U", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

fn queued_large_writes(drive: &str, iothread: &str) {
    let m = pc_with_disk(drive, &[("iothread", iothread)]);
    let (dev, mut ring) = start(&m, VERSION_1 | F_INDIRECT | F_EVENT_IDX);
    let mem = dev.mem.clone();
    const TABLES: u64 = 0x40_0000;
    const BUFS: u64 = 0x100_0000;
    for round in 0..50u64 {
        for r in 0..4u64 {
            let header_at = HEADER + 16 * r;
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&T_OUT.to_le_bytes());
            header[8..16].copy_from_slice(&(((round * 4 + r) % 16) * 2048).to_le_bytes());
            mem.write_slice(&header, GuestAddress(header_at)).unwrap();
            // Indirect table: header, 256 x 4 KiB, status.
            let table = TABLES + r * 0x2000;
            let mut descs = vec![(header_at, 16u32, 0u16)];
            for piece in 0..256u64 {
                descs.push((BUFS + r * (1 << 20) + piece * 4096, 4096, 0));
            }
            descs.push((STATUS + r, 1, 2));
            let n = descs.len();
            for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
                let next = if i + 1 < n { 1 } else { 0 };
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&(flags | next).to_le_bytes());
                d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
                mem.write_slice(&d, GuestAddress(table + 16 * i as u64))
                    .unwrap();
            }
            let head = r as u16;
            ring.write_desc(&mem, head, table, (16 * n) as u32, 4, 0);
            ring.publish(&mem, head);
        }
        dev.notify(0);
        let used = dev.wait_used(&mut ring, 4, WAIT);
        assert_eq!(
            used.len(),
            4,
            "round {round}: {} of 4 requests completed",
            used.len()
        );
        for r in 0..4u64 {
            let status: u8 = mem.read_obj(GuestAddress(STATUS + r)).unwrap();
            assert_eq!(status, 0, "round {round} request {r}");
        }
    }
}

/// Whether this process has `path` open.
fn has_open(path: &std::path::Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target == path)
}

/// A pc with a disk on drive `name` (an image of its own) that the test's driver used
/// once: the image's path, the drive and the machine.
fn used_disk(name: &str) -> (PathBuf, Arc<BlockBackend>, ObjectRef) {
    let path = temp_image(&format!("{name}.raw"), 1 << 20);
    let backend = add_drive(name, &path, false);
    let m = pc_with_disk(name, &[]);
    let (dev, mut ring) = start(&m, VERSION_1);
    assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true), (0, 513));
    (path, backend, m)
}

/// `device_del` of the disk at 04.0, then the guest's answer as the DSDT's `PCEJ(0, 4)`
/// writes it (BNUM, then B0EJ).
fn eject_slot_4(m: &ObjectRef) {
    let bus = m.child("i440fx").unwrap().child("pci.0").unwrap();
    let disk = hw::pci::pci::pci_find_device(&bus, DEVFN as u8).expect("the disk");
    hw::core::qdev::qdev_unplug(disk.object()).unwrap();
    drop(disk);
    let io = machine_state(m).unwrap().services().system_io().clone();
    assert_eq!(io.read(0xae04, 4), 1 << 4, "PCID names slot 4");
    io.write(0xae10, 0, 4);
    io.write(0xae08, 1 << 4, 4);
    assert!(
        hw::pci::pci::pci_find_device(&bus, DEVFN as u8).is_none(),
        "the slot is empty"
    );
}

/// A disk the guest used, then ejected through ACPI PCI hotplug: the device, its rings'
/// handlers and its requests let go of the image, so that once the drive is gone too
/// nothing holds the file open.
#[test]
fn an_ejected_disk_lets_go_of_its_image() {
    let (path, backend, m) = used_disk("ejected");
    assert!(has_open(&path), "the image is open while the disk is in");
    eject_slot_4(&m);
    assert_eq!(backend.attached_dev(), None, "the drive is free");
    block::remove_backend(&backend);
    drop(backend);
    assert!(
        !has_open(&path),
        "qomvm still holds {} open after the eject",
        path.display()
    );
}

/// A vCPU keeps the view of the address spaces it last dispatched through (so a dispatch
/// touches no shared counter): the ejected disk lives on in it until the vCPU refreshes,
/// which a KVM vCPU does when the eject kicks it out of KVM_RUN (QEMU's RCU grace
/// period). Here the "vCPU" is a dispatcher of the test's own.
#[test]
fn a_vcpus_old_view_keeps_an_ejected_disk_until_it_refreshes() {
    let (path, backend, m) = used_disk("ejected-view");
    let memory = machine_state(&m)
        .unwrap()
        .services()
        .system_memory()
        .clone();
    let mut vcpu = memory.dispatcher();
    vcpu.read(0xfee0_0000, 4);
    eject_slot_4(&m);
    block::remove_backend(&backend);
    drop(backend);
    assert!(has_open(&path), "the vCPU's old view still holds the disk");
    vcpu.refresh();
    assert!(!has_open(&path), "a refreshed view lets the disk go");
}

/// An ejected device does not hold its shared interrupt line up (QEMU's
/// `pci_device_deassert_intx` at unrealize): a completion it raised and the driver never
/// acknowledged goes with it.
#[test]
fn an_ejected_disk_lowers_its_intx() {
    let (_path, _backend, m) = used_disk("ejected-intx");
    // Slot 4, pin A: PIRQA, ISA IRQ 10.
    assert!(
        test_support::qtest::irq_level(&m, 10),
        "the completion raised INTx"
    );
    eject_slot_4(&m);
    assert!(
        !test_support::qtest::irq_level(&m, 10),
        "IRQ 10 stays up after its device went"
    );
}

/// `block_resize` on a running disk (QEMU's `virtio_blk_resize`): the capacity in the
/// configuration is the new one, the driver gets a configuration change interrupt (ISR
/// bit 1) with a new configuration generation, and sectors past the old end can be
/// written and read back; before the driver is ready, only the capacity changes.
#[test]
fn a_resized_drive_shows_its_capacity_and_interrupts_the_driver() {
    let path = temp_image("resize.raw", 1 << 20);
    let backend = add_drive("vblk-resize", &path, false);
    let m = pc_with_disk("vblk-resize", &[]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(dev.device_config(0, 8), 2048, "1 MiB in sectors");
    // No driver yet: nothing to interrupt.
    backend.truncate(2 << 20).unwrap();
    assert_eq!(dev.device_config(0, 8), 4096);
    assert_eq!(dev.read_isr(), 0);
    let (dev, mut ring) = start(&m, VERSION_1 | F_FLUSH);
    let generation = dev.common_read(0x15, 1);
    backend.truncate(3 << 20).unwrap();
    assert_eq!(dev.device_config(0, 8), 6144, "3 MiB in sectors");
    assert_eq!(dev.read_isr() & 2, 2, "configuration change interrupt");
    assert_ne!(
        dev.common_read(0x15, 1),
        generation,
        "configuration generation"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
    // The new last sector works.
    let data = pattern(512, 0x3c);
    dev.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&dev, &mut ring, T_OUT, 6143, 512, false).0, 0);
    dev.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&dev, &mut ring, T_IN, 6143, 512, true).0, 0);
    let mut back = vec![0u8; 512];
    dev.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
    // A shrink takes the sectors away again.
    backend.truncate(1 << 20).unwrap();
    assert_eq!(dev.device_config(0, 8), 2048);
    assert_ne!(
        request(&dev, &mut ring, T_IN, 6143, 512, true).0,
        0,
        "past the end"
    );
}

/// Under I/O limits (`block_set_io_throttle`) requests wait on the pool, never on the
/// event loop: at 1 IOPS a lone read right after another waits most of a second, and
/// meanwhile the loop answers at once (QMP, timers and other devices go on). (A lone
/// request with nothing in flight is otherwise served on the loop itself.)
#[test]
fn throttled_requests_wait_off_the_event_loop() {
    use block::throttle::{Bucket, ThrottleConfig};
    let path = temp_image("throttle.raw", 1 << 20);
    let backend = add_drive("vblk-throttle", &path, false);
    let m = pc_with_disk("vblk-throttle", &[]);
    let (dev, mut ring) = start(&m, VERSION_1 | F_FLUSH);
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = 1;
    backend.set_io_limits("vblk-throttle", false, config);
    let main_loop = machine_state(&m).unwrap().services().main_context();
    // The first read fills the bucket (a tenth of a second's worth).
    assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true).0, 0);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    dev.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    let submitted = std::time::Instant::now();
    ring.add_chain(
        &dev.mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    dev.notify(0);
    std::thread::sleep(Duration::from_millis(50));
    let asked = std::time::Instant::now();
    main_loop.run_sync(Box::new(|| {}));
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "the event loop answered after {:?}",
        asked.elapsed()
    );
    assert_eq!(dev.wait_used(&mut ring, 1, WAIT).len(), 1);
    assert!(
        submitted.elapsed() >= Duration::from_millis(700),
        "the second read at 1 IOPS after {:?}",
        submitted.elapsed()
    );
    backend.disable_io_limits();
}

/// The status byte is the last writable byte, whichever buffer holds it: a read whose
/// chain ends with an empty writable buffer still reads its sector and reports its status
/// where Linux's driver looks (QEMU's `iov_discard_back`).
#[test]
fn an_empty_last_buffer_leaves_the_status_byte_where_it_was() {
    let path = temp_image("empty-last.raw", 1 << 20);
    let sector: Vec<u8> = (0..512u32).map(|i| (i * 3) as u8).collect();
    std::fs::write(&path, [sector.clone(), vec![0; (1 << 20) - 512]].concat()).unwrap();
    add_drive("vblk-empty-last", &path, false);
    let m = pc_with_disk("vblk-empty-last", &[]);
    let (dev, mut ring) = start(&m, VERSION_1);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    dev.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    dev.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = ring.add_chain(
        &dev.mem,
        &[
            (HEADER, 16, false),
            (DATA, 512, true),
            (STATUS, 1, true),
            (STATUS + 0x10, 0, true),
        ],
    );
    dev.notify(0);
    let used = dev.wait_used(&mut ring, 1, WAIT);
    assert_eq!(used, [(u32::from(head), 513)]);
    assert_eq!(dev.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let mut got = vec![0u8; 512];
    dev.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == sector);
}

/// A driver that offers the same request again and again before the device used it (its
/// head republished in the avail ring) breaks the device once more are outstanding than
/// the ring holds (QEMU's "Virtqueue size exceeded"), instead of piling up requests that
/// a stop or reset would wait for; a reset recovers.
#[test]
fn a_head_offered_again_before_use_breaks_the_device_past_the_ring_size() {
    use block::throttle::{Bucket, ThrottleConfig};
    let path = temp_image("republish.raw", 1 << 20);
    let backend = add_drive("vblk-republish", &path, false);
    let m = pc_with_disk("vblk-republish", &[]);
    let (dev, mut ring) = start(&m, VERSION_1);
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = 1;
    backend.set_io_limits("vblk-republish", false, config);
    // The first read fills the bucket; the same read, offered again, waits.
    assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true).0, 0);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    dev.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    let head = ring.add_chain(
        &dev.mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    dev.notify(0);
    // Eight at a time, so the avail index never runs more than the ring ahead.
    for _ in 0..4 {
        for _ in 0..8 {
            ring.publish(&dev.mem, head);
        }
        dev.notify(0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = std::time::Instant::now() + WAIT;
    while dev.status() & NEEDS_RESET == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "33 requests outstanding on a ring of 16, and the device is not broken"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    backend.disable_io_limits();
    dev.set_status(0);
    let (dev, mut ring) = start(&m, VERSION_1);
    assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true).0, 0);
}

/// A device reset (or a stop, a migration) waits for the requests it has taken, but not
/// for their I/O limits: at 1 IOPS, four queued reads would take four seconds; the reset
/// lets them go at once, as QEMU's drain lifts the limits. Lifting the limits
/// (`block_set_io_throttle` all zero) releases waiting reads too.
#[test]
fn a_reset_or_lifted_limits_release_throttled_requests() {
    use block::throttle::{Bucket, ThrottleConfig};
    let path = temp_image("throttle-reset.raw", 1 << 20);
    let backend = add_drive("vblk-throttle-reset", &path, false);
    let m = pc_with_disk("vblk-throttle-reset", &[]);
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = 1;
    let submit = |dev: &VirtioPciDevice, ring: &mut SplitRing, n: u64| {
        for i in 0..n {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&T_IN.to_le_bytes());
            let at = HEADER + 0x100 * i;
            dev.mem.write_slice(&header, GuestAddress(at)).unwrap();
            ring.add_chain(
                &dev.mem,
                &[
                    (at, 16, false),
                    (DATA + 0x1000 * i, 512, true),
                    (STATUS + i, 1, true),
                ],
            );
        }
        dev.notify(0);
    };
    for lift in ["reset", "limits off"] {
        let (dev, mut ring) = start(&m, VERSION_1 | F_FLUSH);
        backend.set_io_limits("vblk-throttle-reset", false, config);
        assert_eq!(request(&dev, &mut ring, T_IN, 0, 512, true).0, 0);
        // (Four chains of three descriptors: with the first read's, 15 of the ring's 16.)
        submit(&dev, &mut ring, 4);
        std::thread::sleep(Duration::from_millis(100));
        let began = std::time::Instant::now();
        match lift {
            "reset" => dev.set_status(0),
            _ => {
                backend.disable_io_limits();
                assert_eq!(dev.wait_used(&mut ring, 4, WAIT).len(), 4);
            }
        }
        assert!(
            began.elapsed() < Duration::from_millis(800),
            "{lift}: the reads took {:?} to go",
            began.elapsed()
        );
        backend.disable_io_limits();
    }
}
