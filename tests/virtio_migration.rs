//! Issue 18: virtio-pci devices move with their machine. Two `pc` machines on the qtest
//! accelerator in one process, each with virtio-blk-pci (on one image file), virtio-rng-pci
//! and virtio-balloon-pci, driven by the test's own virtio driver
//! (`test_support::virtio`): the first runs requests, stops (its devices park) and is
//! saved through the real migration stream; the second, its image opened inactive as a
//! migration's destination opens it, loads the stream, takes the image over and starts;
//! the driver goes on with the same rings there. Requests complete once, used indices go
//! on without a gap, the driver's settings survive, and the device writes made while a
//! migration tracked memory are in the dirty pages it sends again.
//!
//! The tests share the block layer's process-wide table and its "open inactive" switch,
//! so they run one after another (`SERIAL`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use block::BlockBackend;
use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::migration::{load_vm, save_vm, MigrationError, Progress};
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::core::runstate::{vm_start, vm_stop, RunStatus};
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, DRIVER_OK};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const WAIT: Duration = Duration::from_secs(10);
const BLK: u32 = 4 << 3;
const RNG: u32 = 5 << 3;
const BALLOON: u32 = 6 << 3;

/// Guest addresses the test lays things out at.
const BLK_RING: u64 = 0x10_0000;
const RNG_RING: u64 = 0x14_0000;
const INFLATE_RING: u64 = 0x18_0000;
const HEADER: u64 = 0x20_0000;
const DATA: u64 = 0x21_0000;
const STATUS: u64 = 0x30_0000;
const RNG_BUF: u64 = 0x31_0000;
const PFNS: u64 = 0x32_0000;
/// A page the balloon is given (inflated) while the migration tracks memory.
const BALLOONED: u64 = 0x40_0000;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (a failed one does not stop the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn temp_image(name: &str, size: u64) -> PathBuf {
    test_support::drives::temp_image("virtio-mig", name, size)
}

/// Opens `path` as drive `id` (as `-drive if=none,id=ID,format=raw`); inactive while the
/// block layer opens images for a migration's destination.
fn add_drive(id: &str, path: &Path) -> Arc<BlockBackend> {
    test_support::drives::add_raw_drive(id, path, false, false)
}

/// A pc machine on qtest (128 MiB) with virtio-blk-pci on `drive` at 04.0,
/// virtio-rng-pci at 05.0 and virtio-balloon-pci at 06.0.
fn machine(drive: &str) -> ObjectRef {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let devices: [(&str, &str, Option<&str>); 3] = [
        ("virtio-blk-pci", "04.0", Some(drive)),
        ("virtio-rng-pci", "05.0", None),
        ("virtio-balloon-pci", "06.0", None),
    ];
    for (kind, addr, drive) in devices {
        let dev = qdev_new(kind).unwrap();
        dev.property_parse("addr", addr).unwrap();
        if let Some(drive) = drive {
            dev.property_parse("drive", drive).unwrap();
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

/// The driver's side of the three devices: rings it keeps across the move.
struct Driver {
    blk: VirtioPciDevice,
    rng: VirtioPciDevice,
    balloon: VirtioPciDevice,
    blk_ring: SplitRing,
    rng_ring: SplitRing,
    inflate_ring: SplitRing,
}

impl Driver {
    /// Negotiates and starts each device's first queue.
    fn start(machine: &ObjectRef) -> Driver {
        let start_one = |devfn, base| {
            let dev = VirtioPciDevice::probe(machine, devfn);
            assert!(dev.negotiate(VERSION_1));
            let ring = SplitRing::new(base, 16);
            ring.clear(&dev.mem);
            dev.setup_queue(0, &ring);
            dev.driver_ok();
            (dev, ring)
        };
        let (blk, blk_ring) = start_one(BLK, BLK_RING);
        let (rng, rng_ring) = start_one(RNG, RNG_RING);
        let (balloon, inflate_ring) = start_one(BALLOON, INFLATE_RING);
        Driver {
            blk,
            rng,
            balloon,
            blk_ring,
            rng_ring,
            inflate_ring,
        }
    }

    /// The same driver after its machine moved: the devices found again on `machine`,
    /// the rings where they were.
    fn moved_to(self, machine: &ObjectRef) -> Driver {
        Driver {
            blk: VirtioPciDevice::probe(machine, BLK),
            rng: VirtioPciDevice::probe(machine, RNG),
            balloon: VirtioPciDevice::probe(machine, BALLOON),
            ..self
        }
    }

    /// A block request of `kind` (0 read, 1 write) at `sector` over 512 bytes of `DATA`;
    /// returns its used entry and status byte.
    fn blk_request(&mut self, kind: u32, sector: u64) -> ((u32, u32), u8) {
        let mem = &self.blk.mem;
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.blk_ring.add_chain(
            mem,
            &[
                (HEADER, 16, false),
                (DATA, 512, kind == 0),
                (STATUS, 1, true),
            ],
        );
        self.blk.notify(0);
        let used = self.blk.wait_used(&mut self.blk_ring, 1, WAIT);
        assert_eq!(used.len(), 1, "the block request was not completed");
        assert_eq!(used[0].0, u32::from(head));
        (used[0], mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    /// Asks virtio-rng for 64 bytes; returns the used length.
    fn rng_request(&mut self) -> u32 {
        let mem = &self.rng.mem;
        mem.write_slice(&[0u8; 64], GuestAddress(RNG_BUF)).unwrap();
        self.rng_ring.add_chain(mem, &[(RNG_BUF, 64, true)]);
        self.rng.notify(0);
        let used = self.rng.wait_used(&mut self.rng_ring, 1, WAIT);
        assert_eq!(used.len(), 1, "virtio-rng served nothing");
        used[0].1
    }

    /// Gives the page at `pa` to the balloon (an inflate buffer of one frame number).
    fn inflate(&mut self, pa: u64) {
        let mem = &self.balloon.mem;
        mem.write_obj((pa >> 12) as u32, GuestAddress(PFNS))
            .unwrap();
        self.inflate_ring.add_chain(mem, &[(PFNS, 4, false)]);
        self.balloon.notify(0);
        let used = self.balloon.wait_used(&mut self.inflate_ring, 1, WAIT);
        assert_eq!(used.len(), 1, "the inflate buffer was not used");
    }
}

/// The stream of a stopped machine, as `migrate` sends it after its last pass.
fn stream_of(machine: &ObjectRef) -> Vec<u8> {
    let mut out = Vec::new();
    save_vm(machine, &mut out, &mut Progress::default()).unwrap();
    out
}

/// A destination for `image`: the drive opened inactive, as under `-incoming`.
fn destination(id: &str, image: &Path) -> (ObjectRef, Arc<BlockBackend>) {
    block::set_open_inactive(true);
    let backend = add_drive(id, image);
    assert!(backend.is_inactive());
    (machine(id), backend)
}

#[test]
fn virtio_devices_go_on_with_their_rings_on_the_destination() {
    let _serial = serial();
    let image = temp_image("move.raw", 1 << 20);
    let src_backend = add_drive("src0", &image);
    let src = machine("src0");
    vm_start(machine_state(&src).unwrap()).unwrap();
    let mut driver = Driver::start(&src);
    let mem = driver.blk.mem.clone();
    // Some traffic before the move: a sector written, entropy read.
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(driver.blk_request(1, 3).1, 0);
    assert_eq!(driver.rng_request(), 64);
    // The driver turns the write cache off (CONFIG_WCE is not negotiated: the byte
    // stays as the image's cache mode set it) and the balloon gets a target.
    let balloon_target = 5u32;
    driver
        .balloon
        .write_device_config(4, u64::from(balloon_target), 4);

    let ms = machine_state(&src).unwrap();
    vm_stop(ms, RunStatus::FinishMigrate).unwrap();
    // Parked devices serve nothing: a request made now stays in the ring, for the
    // destination to take.
    mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0u8; 16], GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let pending_head = driver.blk_ring.add_chain(
        &mem,
        &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    mem.write_obj(3u64, GuestAddress(HEADER + 8)).unwrap();
    driver.blk.notify(0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        driver.blk_ring.take_used(&mem).is_empty(),
        "a stopped device served a request"
    );
    let stream = stream_of(&src);
    // What `migrate` does with every image (`block::inactivate_all`); both sides share
    // this process's block table here, so each side's image is handed over by itself.
    src_backend.inactivate().unwrap();
    assert!(src_backend.is_inactive());

    let (dst, dst_backend) = destination("dst0", &image);
    load_vm(&dst, &mut stream.as_slice(), None).unwrap();
    block::set_open_inactive(false);
    dst_backend.activate().unwrap();
    assert!(!dst_backend.is_inactive());
    let dst_ms = machine_state(&dst).unwrap();
    vm_start(dst_ms).unwrap();
    let mut driver = driver.moved_to(&dst);
    let mem = driver.blk.mem.clone();
    for dev in [&driver.blk, &driver.rng, &driver.balloon] {
        assert_ne!(
            dev.status() & DRIVER_OK,
            0,
            "the driver's status did not move"
        );
    }
    // The request left in the ring is served at the start, once, and reads the sector
    // the source wrote.
    let used = driver.blk.wait_used(&mut driver.blk_ring, 1, WAIT);
    assert_eq!(used.len(), 1, "the pending request was lost: {used:?}");
    assert_eq!(used[0].0, u32::from(pending_head));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x5a; 512]);
    // New requests on the same rings; used indices go on from the source's.
    mem.write_slice(&[0xa5; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(driver.blk_request(1, 4).1, 0);
    assert_eq!(driver.rng_request(), 64);
    let used_idx: u16 = mem
        .read_obj(GuestAddress(driver.blk_ring.used + 2))
        .unwrap();
    assert_eq!(used_idx, 3, "blk used index after 1 + 1 + 1 requests");
    let used_idx: u16 = mem
        .read_obj(GuestAddress(driver.rng_ring.used + 2))
        .unwrap();
    assert_eq!(used_idx, 2, "rng used index after 1 + 1 requests");
    assert_eq!(
        driver.balloon.device_config(4, 4),
        u64::from(balloon_target),
        "the balloon's actual size did not move"
    );
    // The destination owns the image now: its write reached the file.
    let mut sector = vec![0u8; 512];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut sector, 4 * 512)
        .unwrap();
    assert_eq!(sector, vec![0xa5; 512]);
    // And a stop and a start here (`stop`/`cont`) lose nothing either.
    vm_stop(dst_ms, RunStatus::Paused).unwrap();
    vm_start(dst_ms).unwrap();
    assert_eq!(driver.rng_request(), 64);
    assert_eq!(driver.blk_request(0, 4).1, 0);
}

#[test]
fn device_writes_during_a_migration_are_in_its_dirty_pages() {
    let _serial = serial();
    let image = temp_image("dirty.raw", 1 << 20);
    let _backend = add_drive("dirty0", &image);
    let src = machine("dirty0");
    let ms = machine_state(&src).unwrap();
    vm_start(ms).unwrap();
    let mut driver = Driver::start(&src);
    let tracker = ms.services().dirty_tracker().clone();
    tracker.set_active(true).unwrap();
    driver.blk_request(0, 0);
    driver.rng_request();
    driver.inflate(BALLOONED);
    let during: Vec<u64> = tracker.take();
    vm_stop(ms, RunStatus::FinishMigrate).unwrap();
    let at_stop = tracker.take();
    tracker.set_active(false).unwrap();
    let page = |a: u64| a & !0xfff;
    for (what, addr) in [
        ("read data", DATA),
        ("status byte", STATUS),
        ("entropy", RNG_BUF),
        ("inflated page", BALLOONED),
    ] {
        assert!(
            during.contains(&page(addr)),
            "{what} at {addr:#x} not marked: {during:x?}"
        );
    }
    // The used rings, written by the devices, go again once they stopped.
    for ring in [&driver.blk_ring, &driver.rng_ring, &driver.inflate_ring] {
        assert!(
            at_stop.contains(&page(ring.used)),
            "used ring at {:#x} not marked at the stop: {at_stop:x?}",
            ring.used
        );
    }
    vm_start(ms).unwrap();
}

#[test]
fn a_destination_that_differs_refuses_the_stream() {
    let _serial = serial();
    let image = temp_image("small.raw", 1 << 20);
    let _backend = add_drive("diff0", &image);
    let src = machine("diff0");
    let ms = machine_state(&src).unwrap();
    vm_start(ms).unwrap();
    let mut driver = Driver::start(&src);
    driver.rng_request();
    vm_stop(ms, RunStatus::FinishMigrate).unwrap();
    let stream = stream_of(&src);
    // A disk of another size: the guest would see its disk change under it.
    let other = temp_image("other.raw", 2 << 20);
    let (dst, _) = destination("diff1", &other);
    block::set_open_inactive(false);
    let err = load_vm(&dst, &mut stream.as_slice(), None).unwrap_err();
    assert!(matches!(err, MigrationError::Device { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("virtio-blk: disk of 1048576 bytes saved, this one has 2097152"),
        "{err}"
    );
}
