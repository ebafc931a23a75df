//! `virtio-scsi-pci` with `scsi-hd` units on the pc board under the qtest accelerator,
//! driven by the test's own virtio 1.x driver (test_support::virtio): the adapter's
//! identity and configuration, SCSI commands against a real image file (checked with
//! `qemu-img` where it is installed), addressing of absent targets and LUNs, task
//! management, units plugged and unplugged while the driver runs (events), QEMU's
//! errors for bad options, and rings full of garbage, which must never panic or hang.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use block::{BlockBackend, Format, OpenOptions};
use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize, DeviceMethods};
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const F_HOTPLUG: u64 = 1 << 1;
const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;

const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 5 << 3;

/// Guest addresses the test lays things out at.
const RINGS: u64 = 0x10_0000;
const REQ: u64 = 0x20_0000;
const RESP: u64 = 0x20_1000;
const EVENTS: u64 = 0x20_2000;
const DATA: u64 = 0x21_0000;

const REQ_SIZE: u32 = 19 + 32;
const RESP_SIZE: u32 = 12 + 96;

/// Response codes.
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_INCORRECT_LUN: u8 = 12;
/// SCSI status.
const GOOD: u8 = 0;
const CHECK_CONDITION: u8 = 2;

fn temp_image(name: &str, size: u64) -> PathBuf {
    test_support::drives::temp_image("virtio-scsi", name, size)
}

/// Opens `path` as drive `id` (as `-drive if=none,id=ID,format=raw,discard=unmap`).
fn add_drive(id: &str, path: &std::path::Path, read_only: bool) -> Arc<BlockBackend> {
    test_support::drives::add_raw_drive(id, path, read_only, true)
}

/// A pc machine on qtest with `virtio-scsi-pci,id=ID` at 05.0 and a `scsi-hd` for each
/// (drive, props); the machine is not yet done (more can be plugged).
fn pc_with_adapter(id: &str, disks: &[(&str, &[(&str, &str)])]) -> ObjectRef {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let pci = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let hba = qdev_new("virtio-scsi-pci").unwrap();
    hba.property_parse("addr", "05.0").unwrap();
    hba.set_device_id(Some(id.to_string()));
    qom::container_get(&machine, "peripheral")
        .add_child(id, &hba)
        .unwrap();
    qdev_realize(&hba, Some(&pci)).unwrap();
    for (drive, props) in disks {
        plug_disk(&machine, id, drive, props).unwrap();
    }
    machine
}

fn plug_disk(
    machine: &ObjectRef,
    hba: &str,
    drive: &str,
    props: &[(&str, &str)],
) -> Result<ObjectRef, hw::core::qdev::QdevError> {
    plug_unit(machine, hba, "scsi-hd", Some(drive), props)
}

/// A `DRIVER,drive=DRIVE,PROPS` unit on the adapter `hba`'s bus.
fn plug_unit(
    machine: &ObjectRef,
    hba: &str,
    driver: &str,
    drive: Option<&str>,
    props: &[(&str, &str)],
) -> Result<ObjectRef, hw::core::qdev::QdevError> {
    let bus = machine
        .child("peripheral")
        .unwrap()
        .child(hba)
        .unwrap()
        .child(&format!("{hba}.0"))
        .unwrap();
    let dev = qdev_new(driver).unwrap();
    if let Some(drive) = drive {
        dev.property_parse("drive", drive).unwrap();
    }
    for (k, v) in props {
        match *k {
            "id" => dev.set_device_id(Some(v.to_string())),
            _ => dev.property_parse(k, v).unwrap(),
        }
    }
    machine
        .child("peripheral-anon")
        .unwrap()
        .add_child("device[*]", &dev)
        .unwrap();
    qdev_realize(&dev, Some(&bus))?;
    Ok(dev)
}

/// A driver with the control, event and one request queue running (16 entries each).
struct Driver {
    dev: VirtioPciDevice,
    ctrl: SplitRing,
    event: SplitRing,
    req: SplitRing,
    /// Event buffers given so far: buffer N is descriptor N % 16, at EVENTS + 16 * that.
    events_posted: u64,
}

impl Driver {
    fn start(machine: &ObjectRef, features: u64) -> Driver {
        let dev = VirtioPciDevice::probe(machine, DEVFN);
        assert!(
            dev.negotiate(features),
            "FEATURES_OK refused for {features:#x}"
        );
        let rings: Vec<SplitRing> = (0..3)
            .map(|i| SplitRing::new(RINGS + i * 0x1_0000, 16))
            .collect();
        for (i, ring) in rings.iter().enumerate() {
            ring.clear(&dev.mem);
            dev.setup_queue(i as u16, ring);
        }
        dev.driver_ok();
        let mut rings = rings.into_iter();
        let (ctrl, event, req) = (
            rings.next().unwrap(),
            rings.next().unwrap(),
            rings.next().unwrap(),
        );
        Driver {
            dev,
            ctrl,
            event,
            req,
            events_posted: 0,
        }
    }

    /// Runs `cdb` on `lun` (virtio format) with `out` as data-out and a data-in buffer of
    /// `in_len` bytes: returns the response header fields and the data-in bytes written.
    fn command(&mut self, lun: [u8; 8], cdb: &[u8], out: &[u8], in_len: u32) -> Reply {
        let mem = &self.dev.mem;
        let mut req = vec![0u8; REQ_SIZE as usize];
        req[..8].copy_from_slice(&lun);
        req[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        mem.write_slice(&[0xffu8; RESP_SIZE as usize], GuestAddress(RESP))
            .unwrap();
        let mut bufs = vec![(REQ, REQ_SIZE, false)];
        if !out.is_empty() {
            mem.write_slice(out, GuestAddress(DATA)).unwrap();
            bufs.push((DATA, out.len() as u32, false));
        }
        bufs.push((RESP, RESP_SIZE, true));
        if in_len > 0 {
            mem.write_slice(&vec![0u8; in_len as usize], GuestAddress(DATA))
                .unwrap();
            bufs.push((DATA, in_len, true));
        }
        let head = self.req.add_chain(mem, &bufs);
        self.dev.notify(2);
        let used = self.dev.wait_used(&mut self.req, 1, WAIT);
        assert_eq!(used.len(), 1, "command {cdb:02x?} was not completed");
        assert_eq!(used[0].0, u32::from(head));
        let mut resp = vec![0u8; RESP_SIZE as usize];
        mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        let data_len = used[0].1 - RESP_SIZE;
        let mut data = vec![0u8; data_len as usize];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        let le32 = |at: usize| u32::from_le_bytes(resp[at..at + 4].try_into().unwrap());
        Reply {
            sense: resp[12..12 + le32(0) as usize].to_vec(),
            resid: le32(4),
            status: resp[10],
            response: resp[11],
            data,
        }
    }

    /// TEST UNIT READY reports the device reset the driver's start made (QEMU's
    /// `scsi_disk_reset`: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED), once.
    fn expect_reset_reported(&mut self, lun: [u8; 8]) {
        let tur = [0u8; 6];
        assert_eq!(self.command(lun, &tur, &[], 0).check(), (6, 0x29, 0));
        self.command(lun, &tur, &[], 0).good();
    }

    /// A task management function on `lun`: its response byte.
    fn tmf(&mut self, subtype: u32, lun: [u8; 8]) -> u8 {
        let mem = &self.dev.mem;
        let mut req = [0u8; 32];
        req[4..8].copy_from_slice(&subtype.to_le_bytes());
        req[8..16].copy_from_slice(&lun);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(RESP)).unwrap();
        self.ctrl
            .add_chain(mem, &[(REQ, 32, false), (RESP, 1, true)]);
        self.dev.notify(0);
        let used = self.dev.wait_used(&mut self.ctrl, 1, WAIT);
        assert_eq!(used.len(), 1, "the TMF was not completed");
        mem.read_obj(GuestAddress(RESP)).unwrap()
    }

    /// Gives the event queue `n` buffers of 16 bytes.
    fn post_event_buffers(&mut self, n: u64) {
        for _ in 0..n {
            let at = EVENTS + 16 * (self.events_posted % 16);
            self.event.add_chain(&self.dev.mem, &[(at, 16, true)]);
            self.events_posted += 1;
        }
        self.dev.notify(1);
    }

    /// The next event within `wait`: (event, lun, reason).
    fn next_event(&mut self, wait: Duration) -> Option<(u32, [u8; 8], u32)> {
        let used = self.dev.wait_used(&mut self.event, 1, wait);
        let (head, len) = *used.first()?;
        assert_eq!(len, 16);
        let mut ev = [0u8; 16];
        self.dev
            .mem
            .read_slice(&mut ev, GuestAddress(EVENTS + 16 * u64::from(head)))
            .unwrap();
        Some((
            u32::from_le_bytes(ev[0..4].try_into().unwrap()),
            ev[4..12].try_into().unwrap(),
            u32::from_le_bytes(ev[12..16].try_into().unwrap()),
        ))
    }
}

struct Reply {
    sense: Vec<u8>,
    resid: u32,
    status: u8,
    response: u8,
    data: Vec<u8>,
}

impl Reply {
    fn good(&self) -> &Self {
        assert_eq!(
            (self.response, self.status),
            (S_OK, GOOD),
            "sense {:02x?}",
            self.sense
        );
        self
    }

    /// Key, ASC, ASCQ of a CHECK CONDITION.
    fn check(&self) -> (u8, u8, u8) {
        assert_eq!((self.response, self.status), (S_OK, CHECK_CONDITION));
        assert_eq!(self.sense[0], 0x70, "fixed-format sense");
        (self.sense[2], self.sense[12], self.sense[13])
    }
}

/// A LUN as Linux's virtio_scsi writes it: peripheral addressing below 256, flat space
/// addressing from there.
fn lun(target: u8, lun: u16) -> [u8; 8] {
    let flat = if lun >= 256 {
        0x40 | (lun >> 8) as u8
    } else {
        0
    };
    [1, target, flat, lun as u8, 0, 0, 0, 0]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

#[test]
fn the_adapter_presents_virtio_scsi_ids_and_configuration() {
    let path = temp_image("ids.raw", 1 << 20);
    add_drive("vscsi-ids", &path, false);
    let m = pc_with_adapter("scsi-ids", &[("vscsi-ids", &[])]);
    machine_creation_done(&m).unwrap();
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        dev.config.read(0, 4),
        0x1004_1af4,
        "transitional virtio-scsi"
    );
    assert_eq!(dev.config.read(0x2c, 4), 0x0008_1af4, "subsystem: SCSI");
    assert_eq!(dev.config.read(0x0a, 2), 0x0100, "SCSI storage class");
    let features = dev.device_features();
    for f in [VERSION_1, F_HOTPLUG, F_INDIRECT, F_EVENT_IDX] {
        assert_ne!(features & f, 0, "feature {f:#x} missing from {features:#x}");
    }
    assert_eq!(
        dev.num_queues(),
        3,
        "control, event and one request queue per vCPU"
    );
    let cfg = |offset, size| dev.device_config(offset, size);
    assert_eq!(cfg(0x00, 4), 1, "num_queues");
    assert_eq!(cfg(0x10, 4), 16, "event_info_size");
    assert_eq!(cfg(0x14, 4), 96, "sense_size");
    assert_eq!(cfg(0x18, 4), 32, "cdb_size");
    assert_eq!(
        (cfg(0x1c, 2), cfg(0x1e, 2), cfg(0x20, 4)),
        (0, 255, 16383),
        "max channel, target, lun"
    );
    // The bus is the adapter's id and ".0", with the unit placed at 0:0.
    let disk = m
        .child("peripheral-anon")
        .unwrap()
        .child("device[0]")
        .unwrap();
    assert_eq!(disk.property_print("scsi-id").unwrap(), "0");
    assert_eq!(disk.property_print("lun").unwrap(), "0");
}

#[test]
fn commands_reach_the_image_and_come_back() {
    let path = temp_image("rw.raw", 4 << 20);
    add_drive("vscsi-rw", &path, false);
    let m = pc_with_adapter(
        "scsi-rw",
        &[("vscsi-rw", &[("serial", "QOMVM-SCSI-1"), ("scsi-id", "2")])],
    );
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1 | F_HOTPLUG);
    let disk = lun(2, 0);

    let r = d.command(disk, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    r.good();
    assert_eq!(r.data.len(), 36, "standard INQUIRY data");
    assert_eq!((r.data[0], r.data[2]), (0, 5), "a disk, SPC-3");
    assert_eq!(&r.data[8..32], b"QEMU    QEMU HARDDISK   ");
    assert_eq!(r.resid, 96 - 36);
    let serial = d.command(disk, &[0x12, 1, 0x80, 0, 64, 0], &[], 64);
    assert_eq!(
        &serial.good().data[4..],
        b"QOMVM-SCSI-1",
        "unit serial number page"
    );

    // INQUIRY ran under the reset's unit attention; the next other command reports it.
    d.expect_reset_reported(disk);
    let cap = d.command(disk, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        cap.good().data,
        [0, 0, 0x1f, 0xff, 0, 0, 2, 0],
        "last LBA 8191, 512-byte blocks"
    );
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let cap16 = d.command(disk, &rc16, &[], 32);
    assert_eq!(
        &cap16.good().data[..12],
        &[0, 0, 0, 0, 0, 0, 0x1f, 0xff, 0, 0, 2, 0]
    );
    assert_eq!(cap16.data[14] & 0x80, 0x80, "thin provisioning (UNMAP)");

    // WRITE(10) of 16 blocks at LBA 100, in the image; READ(10) gives them back.
    let data = pattern(8192, 0x5a);
    d.command(disk, &rw10(0x2a, 100, 16), &data, 0).good();
    let on_disk = std::fs::read(&path).unwrap();
    assert!(
        on_disk[100 * 512..100 * 512 + 8192] == data[..],
        "the image holds the write"
    );
    let back = d.command(disk, &rw10(0x28, 100, 16), &[], 8192);
    assert!(
        back.good().data == data,
        "READ(10) returns what was written"
    );
    d.command(disk, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
        .good();

    // Beyond the end, a buffer too small, an unknown opcode.
    assert_eq!(
        d.command(disk, &rw10(0x28, 8190, 4), &[], 2048).check(),
        (5, 0x21, 0)
    );
    assert_eq!(
        d.command(disk, &rw10(0x28, 0, 4), &[], 512).response,
        S_OVERRUN
    );
    assert_eq!(
        d.command(disk, &[0xc7, 0, 0, 0, 0, 0], &[], 0).check(),
        (5, 0x20, 0)
    );

    // MODE SENSE(6) of the caching page: write cache on (the drive's writeback);
    // MODE SELECT(6) switches it off, as `sd`'s cache_type attribute does.
    let cache = d.command(disk, &[0x1a, 0x08, 0x08, 0, 64, 0], &[], 64);
    let page = &cache.good().data[4..];
    assert_eq!((page[0], page[1], page[2] & 0x04), (0x08, 0x12, 0x04));
    let mut select = vec![0u8; 4];
    select.extend_from_slice(&[0x08, 0x12]);
    select.extend_from_slice(&[0u8; 0x12]);
    d.command(disk, &[0x15, 0x10, 0, 0, select.len() as u8, 0], &select, 0)
        .good();
    let cache = d.command(disk, &[0x1a, 0x08, 0x08, 0, 64, 0], &[], 64);
    assert_eq!(cache.good().data[4 + 2] & 0x04, 0, "WCE off");

    // UNMAP of the written blocks (`discard=unmap`): the image lets go of them, and they
    // read back as zeroes.
    use std::os::unix::fs::MetadataExt;
    let allocated = || std::fs::metadata(&path).unwrap().blocks();
    let before = allocated();
    let mut unmap = vec![0u8; 24];
    unmap[0..2].copy_from_slice(&22u16.to_be_bytes());
    unmap[2..4].copy_from_slice(&16u16.to_be_bytes());
    unmap[8..16].copy_from_slice(&96u64.to_be_bytes());
    unmap[16..20].copy_from_slice(&24u32.to_be_bytes());
    d.command(disk, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &unmap, 0)
        .good();
    assert!(
        allocated() < before,
        "UNMAP punched the image ({before} -> {} blocks)",
        allocated()
    );
    let back = d.command(disk, &rw10(0x28, 100, 16), &[], 8192);
    assert!(
        back.good().data.iter().all(|&b| b == 0),
        "unmapped blocks read zero"
    );
    // WRITE SAME(16) repeats one block; with NDOB it writes zeroes without data.
    let mut same = [0u8; 16];
    same[0] = 0x93;
    same[2..10].copy_from_slice(&200u64.to_be_bytes());
    same[10..14].copy_from_slice(&4u32.to_be_bytes());
    d.command(disk, &same, &[0xabu8; 512], 0).good();
    let back = d.command(disk, &rw10(0x28, 200, 4), &[], 2048);
    assert!(
        back.good().data.iter().all(|&b| b == 0xab),
        "the block four times"
    );
    same[1] = 0x01;
    d.command(disk, &same, &[], 0).good();
    let back = d.command(disk, &rw10(0x28, 200, 4), &[], 2048);
    assert!(back.good().data.iter().all(|&b| b == 0), "NDOB: zeroes");

    // REPORT LUNS lists LUN 0; an absent LUN of the target is answered by the target,
    // an absent target by the adapter.
    let mut report = [0u8; 12];
    report[0] = 0xa0;
    report[9] = 64;
    let luns = d.command(disk, &report, &[], 64);
    assert_eq!(
        &luns.good().data[..16],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let absent = d.command(lun(2, 3), &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(absent.good().data[0], 0x7f, "no unit at LUN 3");
    assert_eq!(
        d.command(lun(2, 3), &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (5, 0x25, 0)
    );
    assert_eq!(
        d.command(lun(7, 0), &[0, 0, 0, 0, 0, 0], &[], 0).response,
        S_BAD_TARGET
    );
    assert_eq!(
        d.command([0; 8], &[0, 0, 0, 0, 0, 0], &[], 0).response,
        S_BAD_TARGET
    );

    // Task management: a LUN reset (the guest's cache choice stays, as in QEMU), an
    // absent LUN and target.
    assert_eq!(d.tmf(5, disk), S_OK);
    d.expect_reset_reported(disk);
    let cache = d.command(disk, &[0x1a, 0x08, 0x08, 0, 64, 0], &[], 64);
    assert_eq!(
        cache.good().data[4 + 2] & 0x04,
        0,
        "WCE still off after a LUN reset"
    );
    // The choice moves with the machine: a second one loads the disk's state.
    let state = hw::core::qdev::device_impl(
        &m.child("peripheral-anon")
            .unwrap()
            .child("device[0]")
            .unwrap(),
    )
    .unwrap()
    .save_state()
    .unwrap();
    add_drive("vscsi-rw2", &temp_image("rw2.raw", 4 << 20), false);
    let m2 = pc_with_adapter("scsi-rw2", &[("vscsi-rw2", &[("scsi-id", "2")])]);
    let disk2 = m2
        .child("peripheral-anon")
        .unwrap()
        .child("device[0]")
        .unwrap();
    hw::core::qdev::device_impl(&disk2)
        .unwrap()
        .load_state(&state)
        .unwrap();
    machine_creation_done(&m2).unwrap();
    let mut d2 = Driver::start(&m2, VERSION_1);
    d2.expect_reset_reported(disk);
    let cache = d2.command(disk, &[0x1a, 0x08, 0x08, 0, 64, 0], &[], 64);
    assert_eq!(
        cache.good().data[4 + 2] & 0x04,
        0,
        "WCE off on the destination"
    );
    assert_eq!(d.tmf(0, lun(2, 9)), S_INCORRECT_LUN);
    assert_eq!(d.tmf(5, lun(9, 0)), S_BAD_TARGET);
}

#[test]
fn a_read_only_drive_refuses_writes_with_data_protect() {
    let path = temp_image("ro.raw", 1 << 20);
    add_drive("vscsi-ro", &path, true);
    let m = pc_with_adapter("scsi-ro", &[("vscsi-ro", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1);
    d.expect_reset_reported(lun(0, 0));
    assert_eq!(
        d.command(lun(0, 0), &rw10(0x2a, 0, 1), &[1u8; 512], 0)
            .check(),
        (7, 0x27, 0)
    );
    let sense = d.command(lun(0, 0), &[0x1a, 0x08, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(
        sense.good().data[2] & 0x80,
        0x80,
        "MODE SENSE says write-protected"
    );
}

/// libvirt's disk hotplug on a SCSI controller: `device_add scsi-hd` on the adapter's bus
/// while the driver runs; the driver hears of the new unit on the event queue, reaches
/// it, and hears of it again when `device_del` takes it out (at once), after which its
/// target is gone and the image is let go.
#[test]
fn units_plugged_and_unplugged_are_announced_on_the_event_queue() {
    let path = temp_image("hot.raw", 1 << 20);
    add_drive("vscsi-base", &temp_image("base.raw", 1 << 20), false);
    add_drive("vscsi-hot", &path, false);
    add_drive("vscsi-paused", &temp_image("paused.raw", 1 << 20), false);
    let m = pc_with_adapter("scsi-hot", &[("vscsi-base", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1 | F_HOTPLUG | F_EVENT_IDX);
    d.post_event_buffers(4);
    assert!(
        d.next_event(Duration::from_millis(300)).is_none(),
        "no event without a change"
    );

    let hot = plug_hot(&m, "vscsi-hot", &[("scsi-id", "0"), ("lun", "5")], "hot0");
    assert_eq!(
        d.next_event(WAIT),
        Some((1, lun(0, 5), 1)),
        "TRANSPORT_RESET, RESCAN of 0:5"
    );
    // With event index the device asks for a kick at the next buffer it has not taken.
    let avail_event: u16 = d
        .dev
        .mem
        .read_obj(GuestAddress(d.event.used + 4 + 8 * u64::from(d.event.size)))
        .unwrap();
    assert_eq!(avail_event, 1, "avail_event follows the buffers taken");
    let cap = d.command(lun(0, 5), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(&cap.good().data[..4], &[0, 0, 0x07, 0xff]);
    let mut report = [0u8; 12];
    report[0] = 0xa0;
    report[9] = 64;
    let luns = d.command(lun(0, 0), &report, &[], 64);
    assert_eq!(&luns.good().data[..4], &[0, 0, 0, 16], "LUNs 0 and 5");
    assert_eq!(&luns.data[16..18], &[0, 5]);

    hw::core::qdev::qdev_unplug(&hot).unwrap();
    assert!(!hot.is_realized(), "a SCSI unit goes at once");
    assert_eq!(
        d.next_event(WAIT),
        Some((1, lun(0, 5), 2)),
        "TRANSPORT_RESET, REMOVED of 0:5"
    );
    assert_eq!(
        d.command(lun(0, 5), &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (5, 0x25, 0)
    );
    assert!(
        block::find_backend("vscsi-hot").is_some(),
        "a node added on its own stays"
    );
    // The drive is free for the next unit: plugged and unplugged it takes the last
    // two buffers.
    let again = plug_hot(&m, "vscsi-hot", &[("scsi-id", "1")], "hot1");
    assert_eq!(d.next_event(WAIT), Some((1, lun(1, 0), 1)));
    hw::core::qdev::qdev_unplug(&again).unwrap();
    assert_eq!(d.next_event(WAIT), Some((1, lun(1, 0), 2)));
    // With no buffer left an event is lost; the next buffer tells the driver so
    // (EVENTS_MISSED), and it rescans.
    plug_hot(&m, "vscsi-hot", &[("scsi-id", "1")], "hot2");
    assert!(d.next_event(Duration::from_millis(300)).is_none());
    d.post_event_buffers(1);
    assert_eq!(
        d.next_event(WAIT),
        Some((0x8000_0000, [0; 8], 0)),
        "EVENTS_MISSED"
    );
    d.command(lun(1, 0), &[0, 0, 0, 0, 0, 0], &[], 0).good();

    // A unit plugged while the VM is paused: the driver hears of it (as missed events)
    // when the VM runs again.
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    let ms = machine_state(&m).unwrap();
    vm_start(ms).unwrap();
    d.post_event_buffers(2);
    vm_stop(ms, RunStatus::Paused).unwrap();
    plug_hot(&m, "vscsi-paused", &[("scsi-id", "3")], "hot3");
    vm_start(ms).unwrap();
    assert_eq!(
        d.next_event(WAIT),
        Some((0x8000_0000, [0; 8], 0)),
        "EVENTS_MISSED on resume"
    );
}

/// `device_add scsi-hd,drive=DRIVE,PROPS,id=ID` on `scsi-hot.0` while running.
fn plug_hot(m: &ObjectRef, drive: &str, props: &[(&str, &str)], id: &str) -> ObjectRef {
    plug_hot_on(m, "scsi-hot", drive, props, id)
}

/// [`plug_hot`] on adapter `adapter`'s bus.
fn plug_hot_on(
    m: &ObjectRef,
    adapter: &str,
    drive: &str,
    props: &[(&str, &str)],
    id: &str,
) -> ObjectRef {
    let bus = m
        .child("peripheral")
        .unwrap()
        .child(adapter)
        .unwrap()
        .child(&format!("{adapter}.0"))
        .unwrap();
    let dev = qdev_new("scsi-hd").unwrap();
    dev.property_parse("drive", drive).unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).unwrap();
    }
    dev.set_device_id(Some(id.into()));
    dev.downcast::<hw::core::qdev::DeviceState>()
        .unwrap()
        .set_hotplugged(true);
    qom::container_get(m, "peripheral")
        .add_child(id, &dev)
        .unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    dev
}

#[test]
fn two_units_at_one_address_and_addresses_beyond_the_adapter_are_refused() {
    let a = temp_image("a.raw", 1 << 20);
    let b = temp_image("b.raw", 1 << 20);
    add_drive("vscsi-a", &a, false);
    add_drive("vscsi-b", &b, false);
    let m = pc_with_adapter(
        "scsi-addr",
        &[("vscsi-a", &[("scsi-id", "3"), ("id", "first")])],
    );
    let err = |props: &[(&str, &str)]| {
        plug_disk(&m, "scsi-addr", "vscsi-b", props)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(&[("scsi-id", "3"), ("lun", "0")]),
        "lun already used by 'first'"
    );
    assert_eq!(err(&[("scsi-id", "256")]), "bad scsi device id: 256");
    assert_eq!(err(&[("lun", "16384")]), "bad scsi device lun: 16384");
    assert_eq!(err(&[("channel", "1")]), "bad scsi channel id: 1");
    // Without scsi-id, the first free target.
    let dev = plug_disk(&m, "scsi-addr", "vscsi-b", &[]).unwrap();
    assert_eq!(dev.property_print("scsi-id").unwrap(), "0");
}

#[test]
fn rings_full_of_garbage_never_panic_and_a_reset_recovers() {
    let path = temp_image("fuzz.raw", 1 << 20);
    add_drive("vscsi-fuzz", &path, false);
    let m = pc_with_adapter("scsi-fuzz", &[("vscsi-fuzz", &[])]);
    machine_creation_done(&m).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut broken = 0;
    for round in 0..150 {
        let mut d = Driver::start(&m, VERSION_1 | F_HOTPLUG | F_INDIRECT | F_EVENT_IDX);
        let queue = (round % 3) as u16;
        let ring = match queue {
            0 => &mut d.ctrl,
            1 => &mut d.event,
            _ => &mut d.req,
        };
        for i in 0..ring.size {
            let addr = match next() % 4 {
                0 => next(),
                1 => REQ + (next() % 0x100),
                2 => DATA,
                _ => (128 << 20) - (next() % 0x2000),
            };
            let len = match next() % 4 {
                0 => next() as u32,
                1 => REQ_SIZE,
                2 => (next() % 0x10000) as u32,
                _ => 0,
            };
            ring.write_desc(
                &d.dev.mem,
                i,
                addr,
                len,
                (next() % 8) as u16,
                (next() % 20) as u16,
            );
        }
        // CDBs and LUNs the descriptors may point at.
        let mut req = [0u8; 64];
        req[0] = 1;
        for b in &mut req[8..] {
            *b = next() as u8;
        }
        req[19] = [0x28, 0x2a, 0x12, 0x1a, 0x42, 0x93, 0xa0][(next() % 7) as usize];
        d.dev.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        for _ in 0..(next() % 8) {
            ring.publish(&d.dev.mem, (next() % 24) as u16);
        }
        if round % 5 == 0 {
            ring.publish_raw_idx(&d.dev.mem, next() as u16);
        }
        d.dev.notify(queue);
        std::thread::sleep(Duration::from_millis(2));
        if d.dev.status() & NEEDS_RESET != 0 {
            broken += 1;
        }
    }
    assert!(broken > 0, "garbage rings never marked the device broken");
    // After a reset, a well-formed ring works again.
    let mut d = Driver::start(&m, VERSION_1);
    assert_eq!(d.dev.status() & NEEDS_RESET, 0);
    d.expect_reset_reported(lun(0, 0));
    let data = pattern(512, 7);
    d.command(lun(0, 0), &rw10(0x2a, 1, 1), &data, 0).good();
    assert!(
        d.command(lun(0, 0), &rw10(0x28, 1, 1), &[], 512)
            .good()
            .data
            == data
    );
}

#[test]
fn bad_virtio_scsi_options_get_qemus_errors() {
    let run = |args: &[&str]| test_support::qtest::qomvm_pc_quit(env!("CARGO_BIN_EXE_qomvm"), args);
    let path = temp_image("cli.raw", 1 << 20);
    let drive = format!("file={},if=none,id=d0,format=raw", path.display());
    let hba = "virtio-scsi-pci,id=scsi0";
    let (status, stderr) = run(&[
        "-drive",
        "if=none,id=cd0,media=cdrom",
        "-device",
        hba,
        "-device",
        "scsi-cd,drive=cd0",
        "-device",
        "scsi-cd",
    ]);
    assert_eq!(status, Some(0), "empty CD drives: {stderr}");
    for (devices, error) in [
        (&["scsi-hd,drive=d0"][..], "-device scsi-hd,drive=d0: No 'SCSI' bus found for device 'scsi-hd'"),
        (&[hba, "scsi-hd"], "-device scsi-hd: drive property not set"),
        (
            &[hba, "scsi-hd,drive=nope"],
            "-device scsi-hd,drive=nope: Property 'scsi-hd.drive' can't find value 'nope'",
        ),
        (&[hba, "scsi-hd,drive=d0,scsi-id=300"], "-device scsi-hd,drive=d0,scsi-id=300: bad scsi device id: 300"),
        (
            &[hba, "scsi-hd,drive=d0,logical_block_size=1000"],
            "-device scsi-hd,drive=d0,logical_block_size=1000: Property scsi-hd.logical_block_size doesn't take value 1000 (must be a power of 2 between 512 and 32768)",
        ),
        (
            &["virtio-scsi-pci,num_queues=0"],
            "-device virtio-scsi-pci,num_queues=0: Invalid number of queues (= 0), must be a positive integer less than 1022.",
        ),
        (
            &["virtio-scsi-pci,iothread=io9"],
            "-device virtio-scsi-pci,iothread=io9: Property 'virtio-scsi-device.iothread' can't find value 'io9'",
        ),
    ] {
        let mut args = vec!["-drive", &drive];
        for d in devices {
            args.extend(["-device", d]);
        }
        let (status, stderr) = run(&args);
        assert_eq!(status, Some(1), "{devices:?}: {stderr}");
        assert_eq!(stderr, format!("qomvm: {error}\n"));
    }
    // QEMU's if=scsi means an LSI adapter qomvm lacks: it says what to use instead.
    let scsi_drive = format!("file={},if=scsi,format=raw", path.display());
    let (status, stderr) = run(&["-drive", &scsi_drive]);
    assert_eq!(status, Some(1));
    assert_eq!(
        stderr,
        format!("qomvm: -drive {scsi_drive}: if=scsi is not available: use if=none with -device virtio-scsi-pci and -device scsi-hd,drive=ID\n")
    );
    // libvirt's pair, and two disks on one adapter at the next free targets.
    let second = temp_image("cli2.raw", 1 << 20);
    let drive2 = format!("file={},if=none,id=d1,format=raw", second.display());
    let (status, stderr) = run(&[
        "-drive",
        &drive,
        "-drive",
        &drive2,
        "-device",
        "virtio-scsi-pci,id=scsi0,bus=pci.0,addr=0x5",
        "-device",
        "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=d0,id=scsi0-0-0-0,bootindex=1",
        "-device",
        "scsi-hd,drive=d1",
    ]);
    assert_eq!(status, Some(0), "{stderr}");
}

/// `scsi-cd` as libvirt writes it for `<disk device='cdrom' bus='scsi'>`: a read-only,
/// removable unit of 2048-byte blocks with a tray. The guest reads the ISO's bytes, the
/// TOC and the drive's features; locks the tray so its eject is refused; opens it. The
/// host's medium change (what QMP `eject` and `blockdev-change-medium` do) shows as QEMU
/// shows it: "no medium", then "medium may have changed", and a media event.
#[test]
fn a_scsi_cd_reads_its_medium_and_sees_it_change() {
    use hw::core::removable_media::{change_media, RemovableMedia};
    let iso: Vec<u8> = (0..64 * 2048)
        .map(|i| (i / 2048) as u8 ^ (i as u8))
        .collect();
    let path = temp_image("cd.iso", 0);
    std::fs::write(&path, &iso).unwrap();
    add_drive("vscsi-cd", &path, true);
    let m = pc_with_adapter("scsi-cd", &[]);
    let cd = plug_unit(&m, "scsi-cd", "scsi-cd", Some("vscsi-cd"), &[("id", "cd0")]).unwrap();
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1);
    let at = lun(0, 0);

    let inq = d.command(at, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(
        (inq.good().data[0], inq.data[1]),
        (5, 0x80),
        "a removable CD/DVD drive"
    );
    assert_eq!(&inq.data[16..27], b"QEMU CD-ROM");
    // The machine's reset is reported once, then the drive is ready.
    assert_eq!(
        d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (6, 0x29, 0),
        "power on, reset"
    );
    d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    let cap = d.command(at, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        cap.good().data,
        [0, 0, 0, 63, 0, 0, 8, 0],
        "64 blocks of 2048 bytes"
    );
    let back = d.command(at, &rw10(0x28, 10, 2), &[], 4096);
    assert!(
        back.good().data[..] == iso[10 * 2048..12 * 2048],
        "READ(10) of blocks 10-11"
    );
    assert_eq!(
        d.command(at, &rw10(0x28, 63, 2), &[], 4096).check(),
        (5, 0x21, 0)
    );
    assert_eq!(
        d.command(at, &rw10(0x2a, 0, 1), &[0; 2048], 0).check(),
        (5, 0x20, 0),
        "no WRITE"
    );
    let toc = d.command(at, &[0x43, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[], 64);
    assert_eq!(
        &toc.good().data[..4],
        &[0, 18, 1, 1],
        "one track and the lead-out"
    );
    assert_eq!(
        &toc.data[16..20],
        &[0, 0, 0, 64],
        "the lead-out at block 64"
    );
    let config = d.command(at, &[0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[], 64);
    assert_eq!(
        &config.good().data[6..8],
        &[0, 8],
        "current profile: CD-ROM"
    );
    let caps = d.command(at, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64, 0], &[], 64);
    assert_eq!(
        &caps.good().data[6..8],
        &[0, 0],
        "no block descriptor on an MMC drive"
    );
    assert_eq!(caps.data[8], 0x2a, "the capabilities page");

    // Locked, the tray stays shut; unlocked, it opens and the drive is empty.
    d.command(at, &[0x1e, 0, 0, 0, 1, 0], &[], 0).good();
    assert!(cd
        .interface::<dyn RemovableMedia>()
        .unwrap()
        .is_medium_locked());
    assert_eq!(
        d.command(at, &[0x1b, 0, 0, 0, 2, 0], &[], 0).check(),
        (5, 0x53, 2)
    );
    d.command(at, &[0x1e, 0, 0, 0, 0, 0], &[], 0).good();
    d.command(at, &[0x1b, 0, 0, 0, 2, 0], &[], 0).good();
    let media = cd.interface::<dyn RemovableMedia>().unwrap();
    assert!(media.is_tray_open());
    assert_eq!(
        d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (2, 0x3a, 0)
    );
    d.command(at, &[0x1b, 0, 0, 0, 3, 0], &[], 0).good();
    d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).good();
    // A LUN reset closes a tray the guest opened (QEMU's scsi_disk_reset), and says so.
    d.command(at, &[0x1b, 0, 0, 0, 2, 0], &[], 0).good();
    assert_eq!(d.tmf(5, at), S_OK);
    assert!(!media.is_tray_open(), "closed by the reset");
    assert_eq!(
        d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (6, 0x29, 0)
    );
    d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).good();

    // The host takes the medium out and puts another in (blockdev-change-medium).
    let second: Vec<u8> = vec![0x77; 8 * 2048];
    let path2 = temp_image("cd2.iso", 0);
    std::fs::write(&path2, &second).unwrap();
    change_media(media, false);
    let old = media.remove_medium().expect("a medium was in");
    drop(old);
    let mut opts = OpenOptions::new(&path2);
    opts.format = Some(Format::Raw);
    opts.read_only = true;
    let new = Arc::new(BlockBackend::open("", &block::auto_node_name(), opts, |_| {}).unwrap());
    media.insert_medium(new).unwrap();
    change_media(media, true);
    assert_eq!(
        d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (6, 0x3a, 0),
        "no medium"
    );
    assert_eq!(
        d.command(at, &[0, 0, 0, 0, 0, 0], &[], 0).check(),
        (6, 0x28, 0),
        "medium may have changed"
    );
    let event = d.command(at, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], &[], 8);
    assert_eq!(&event.good().data[4..6], &[2, 2], "new media, present");
    let cap = d.command(at, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        &cap.good().data[..4],
        &[0, 0, 0, 7],
        "the new medium's 8 blocks"
    );
    let back = d.command(at, &rw10(0x28, 0, 8), &[], 8 * 2048);
    assert!(back.good().data == second);
}

/// `device_del` of a unit whose drive is under I/O limits waits for the commands it has
/// taken, but not for their limits: at 1 IOPS four queued reads would take four seconds;
/// the unplug lets them go at once (QEMU's drain lifts the limits) and each completes.
#[test]
fn unplugging_a_throttled_unit_does_not_wait_for_its_limits() {
    add_drive("vscsi-tbase", &temp_image("tbase.raw", 1 << 20), false);
    let backend = add_drive(
        "vscsi-throttled",
        &temp_image("throttled.raw", 1 << 20),
        false,
    );
    let m = pc_with_adapter("scsi-throttle", &[("vscsi-tbase", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1 | F_HOTPLUG);
    let hot = plug_hot_on(
        &m,
        "scsi-throttle",
        "vscsi-throttled",
        &[("scsi-id", "1")],
        "throttled0",
    );
    let at = lun(1, 0);
    d.command(at, &[0x12, 0, 0, 0, 36, 0], &[], 36).good();
    unplug_beside_throttled_reads(&mut d, at, &backend, &hot);
}

/// Unplugging a unit waits for the adapter's commands, not for another unit's I/O limits:
/// with four reads queued on a disk at 1 IOPS, `device_del` of the disk beside it comes
/// back at once.
#[test]
fn unplugging_a_unit_does_not_wait_for_another_units_limits() {
    let slow = add_drive("vscsi-other-slow", &temp_image("oslow.raw", 1 << 20), false);
    add_drive("vscsi-other-free", &temp_image("ofree.raw", 1 << 20), false);
    let m = pc_with_adapter("scsi-other", &[("vscsi-other-slow", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1 | F_HOTPLUG);
    let free = plug_hot_on(
        &m,
        "scsi-other",
        "vscsi-other-free",
        &[("scsi-id", "1")],
        "free0",
    );
    let at = lun(0, 0);
    d.expect_reset_reported(at);
    unplug_beside_throttled_reads(&mut d, at, &slow, &free);
}

/// Puts `drive` (the unit at `at`) under 1 IOPS, fills its bucket with a read and queues
/// four more, then unplugs `unplugged`: the unplug must come back at once, and the four
/// reads complete.
fn unplug_beside_throttled_reads(
    d: &mut Driver,
    at: [u8; 8],
    drive: &Arc<BlockBackend>,
    unplugged: &ObjectRef,
) {
    use block::throttle::{Bucket, ThrottleConfig};
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = 1;
    drive.set_io_limits(&drive.id(), false, config);
    // The first read fills the bucket; four more wait for it.
    d.command(at, &rw10(0x28, 0, 1), &[], 512).good();
    let mem = &d.dev.mem;
    for i in 0..4u64 {
        let (req, resp, data) = (
            0x40_0000 + i * 0x1000,
            0x48_0000 + i * 0x1000,
            0x50_0000 + i * 0x1000,
        );
        let mut header = vec![0u8; REQ_SIZE as usize];
        header[..8].copy_from_slice(&at);
        header[19..29].copy_from_slice(&rw10(0x28, i as u32, 1));
        mem.write_slice(&header, GuestAddress(req)).unwrap();
        d.req.add_chain(
            mem,
            &[
                (req, REQ_SIZE, false),
                (resp, RESP_SIZE, true),
                (data, 512, true),
            ],
        );
    }
    d.dev.notify(2);
    std::thread::sleep(Duration::from_millis(100));
    let began = std::time::Instant::now();
    hw::core::qdev::qdev_unplug(unplugged).unwrap();
    assert!(
        began.elapsed() < Duration::from_millis(800),
        "the unplug waited {:?} for the limits",
        began.elapsed()
    );
    assert_eq!(d.dev.wait_used(&mut d.req, 4, WAIT).len(), 4);
    drive.disable_io_limits();
}

/// A unit waiting for its I/O limits holds up only itself: with more commands queued for a
/// disk at 1 IOPS than the adapter has pool threads, a read of an unthrottled disk on the
/// same adapter still completes at once (QEMU queues throttled requests in their group,
/// holding no thread).
#[test]
fn a_throttled_unit_does_not_hold_up_the_others() {
    throttled_neighbour("starve", false);
}

/// Units of one throttle group take turns: with 100 reads queued for one disk, a read of
/// the other disk in its group goes within a turn or two (QEMU's round robin), not after
/// the first disk's backlog.
#[test]
fn units_of_one_throttle_group_take_turns() {
    throttled_neighbour("turns", true);
}

/// 100 reads queued for a throttled disk, then one read of the disk beside it on the same
/// adapter (in the same throttle group, or without limits), which must complete at once.
fn throttled_neighbour(tag: &str, same_group: bool) {
    use block::throttle::{Bucket, ThrottleConfig};
    let (free_id, slow_id) = (format!("vscsi-{tag}-free"), format!("vscsi-{tag}-slow"));
    let other = add_drive(
        &free_id,
        &temp_image(&format!("{tag}-free.raw"), 1 << 20),
        false,
    );
    let slow = add_drive(
        &slow_id,
        &temp_image(&format!("{tag}-slow.raw"), 1 << 20),
        false,
    );
    let m = pc_with_adapter(
        &format!("scsi-{tag}"),
        &[
            (free_id.as_str(), &[]),
            (slow_id.as_str(), &[("scsi-id", "1")]),
        ],
    );
    machine_creation_done(&m).unwrap();
    // The request queue holds more than the pool's 64 threads.
    const ENTRIES: u16 = 256;
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert!(dev.negotiate(VERSION_1));
    let mut rings: Vec<SplitRing> = [16, 16, ENTRIES]
        .iter()
        .enumerate()
        .map(|(i, &n)| SplitRing::new(RINGS + i as u64 * 0x1_0000, n))
        .collect();
    for (i, ring) in rings.iter().enumerate() {
        ring.clear(&dev.mem);
        dev.setup_queue(i as u16, ring);
    }
    dev.driver_ok();
    let mut req = rings.pop().unwrap();
    let mem = &dev.mem;
    let (free, throttled) = (lun(0, 0), lun(1, 0));
    // Two descriptors a command (the response and the data in one buffer), so the ring
    // holds them all.
    let queue_read = |req: &mut SplitRing, slot: u64, at: [u8; 8]| {
        let (header_at, reply_at) = (0x40_0000 + slot * 0x100, 0x48_0000 + slot * 0x400);
        let mut header = vec![0u8; REQ_SIZE as usize];
        header[..8].copy_from_slice(&at);
        header[19..29].copy_from_slice(&rw10(0x28, slot as u32 % 2048, 1));
        mem.write_slice(&header, GuestAddress(header_at)).unwrap();
        req.add_chain(
            mem,
            &[
                (header_at, REQ_SIZE, false),
                (reply_at, RESP_SIZE + 512, true),
            ],
        )
    };
    // Each unit's reset unit attention, reported to its first command.
    for at in [free, throttled] {
        queue_read(&mut req, 0, at);
        dev.notify(2);
        assert_eq!(dev.wait_used(&mut req, 1, WAIT).len(), 1);
    }
    let mut config = ThrottleConfig::default();
    config.bucket_mut(Bucket::OpsTotal).avg = if same_group { 5 } else { 1 };
    let group = format!("vscsi-{tag}");
    slow.set_io_limits(&group, false, config);
    if same_group {
        other.set_io_limits(&group, false, config);
    }
    let queued = 100u64;
    for slot in 0..queued {
        queue_read(&mut req, slot, throttled);
    }
    dev.notify(2);
    // Every worker the adapter has is waiting by now.
    std::thread::sleep(Duration::from_millis(300));
    let head = queue_read(&mut req, queued, free);
    dev.notify(2);
    let began = std::time::Instant::now();
    let deadline = began + WAIT;
    let mut done = Vec::new();
    while !done.iter().any(|&(id, _)| id == u32::from(head)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the neighbour's read waited for the throttled disk's backlog"
        );
        done.extend(dev.wait_used(&mut req, 1, Duration::from_millis(100)));
    }
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "the neighbour's read took {:?}",
        began.elapsed()
    );
    // The throttled reads all go once the limits do.
    slow.disable_io_limits();
    other.disable_io_limits();
    let mut completed = done.len() as u64;
    while completed < queued + 1 {
        let more = dev.wait_used(&mut req, 1, WAIT);
        assert!(
            !more.is_empty(),
            "{completed} of {} commands completed",
            queued + 1
        );
        completed += more.len() as u64;
    }
}

/// REQUEST SENSE takes a pending unit attention as its data, with GOOD status, and clears
/// it (SPC; QEMU's bus does so for every unit): the disk's reset is reported once.
#[test]
fn request_sense_reports_a_pending_unit_attention_as_its_data() {
    add_drive("vscsi-rs", &temp_image("rs.raw", 1 << 20), false);
    let m = pc_with_adapter("scsi-rs", &[("vscsi-rs", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1);
    let at = lun(0, 0);
    let reply = d.command(at, &[0x03, 0, 0, 0, 18, 0], &[], 18);
    let sense = &reply.good().data;
    assert_eq!(
        (sense[0], sense[2] & 0xf, sense[12], sense[13]),
        (0x70, 6, 0x29, 0)
    );
    d.command(at, &[0u8; 6], &[], 0).good();
}

/// A unit attention still pending moves with the disk (QEMU's `vmstate_scsi_device`), and
/// a stream without one (from before) loads as none pending.
#[test]
fn a_pending_unit_attention_migrates() {
    add_drive("vscsi-ua", &temp_image("ua.raw", 1 << 20), false);
    add_drive("vscsi-ua2", &temp_image("ua2.raw", 1 << 20), false);
    let m = pc_with_adapter("scsi-ua", &[("vscsi-ua", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1);
    d.expect_reset_reported(lun(0, 0));
    // A LUN reset leaves POWER ON/RESET pending: not consumed before the save.
    assert_eq!(d.tmf(5, lun(0, 0)), S_OK);
    let disk = |m: &ObjectRef| {
        m.child("peripheral-anon")
            .unwrap()
            .child("device[0]")
            .unwrap()
    };
    let state = hw::core::qdev::device_impl(&disk(&m))
        .unwrap()
        .save_state()
        .unwrap();
    assert_eq!(
        state.get::<Option<[u8; 3]>>("unit_attention").unwrap(),
        Some([6, 0x29, 0])
    );
    let m2 = pc_with_adapter("scsi-ua2", &[("vscsi-ua2", &[])]);
    let disk2 = disk(&m2);
    let target = hw::core::qdev::device_impl(&disk2).unwrap();
    target.load_state(&state).unwrap();
    assert_eq!(
        target
            .save_state()
            .unwrap()
            .get::<Option<[u8; 3]>>("unit_attention")
            .unwrap(),
        Some([6, 0x29, 0])
    );
    // An older stream's section, without the field: nothing pending.
    let mut old = hw::core::vmstate::VmStateSection::new(1);
    old.put("wce", true);
    target.load_state(&old).unwrap();
    assert_eq!(
        target
            .save_state()
            .unwrap()
            .get::<Option<[u8; 3]>>("unit_attention")
            .unwrap(),
        None
    );
}

/// Commands behind one notification go to the adapter's pool and wait on the disk
/// together: all complete, each into its own used entry, with the data in the image.
#[test]
fn a_batch_of_commands_completes_out_of_the_pool() {
    let path = temp_image("batch.raw", 4 << 20);
    add_drive("vscsi-batch", &path, false);
    let m = pc_with_adapter("scsi-batch", &[("vscsi-batch", &[])]);
    machine_creation_done(&m).unwrap();
    let mut d = Driver::start(&m, VERSION_1 | F_EVENT_IDX);
    d.expect_reset_reported(lun(0, 0));
    let mem = &d.dev.mem;
    let mut heads = Vec::new();
    for i in 0..5u64 {
        // Each command's header, response and 64 KiB of data at addresses of its own.
        let (req, resp, data) = (
            0x40_0000 + i * 0x1000,
            0x48_0000 + i * 0x1000,
            0x50_0000 + i * 0x1_0000,
        );
        let mut header = vec![0u8; REQ_SIZE as usize];
        header[..8].copy_from_slice(&lun(0, 0));
        header[19..29].copy_from_slice(&rw10(0x2a, (i * 128) as u32, 128));
        mem.write_slice(&header, GuestAddress(req)).unwrap();
        mem.write_slice(&pattern(65536, i as u8), GuestAddress(data))
            .unwrap();
        heads.push(d.req.add_chain(
            mem,
            &[
                (req, REQ_SIZE, false),
                (data, 65536, false),
                (resp, RESP_SIZE, true),
            ],
        ));
    }
    d.dev.notify(2);
    let mut used = d.dev.wait_used(&mut d.req, 5, WAIT);
    assert_eq!(used.len(), 5, "every command completes");
    used.sort();
    let mut want: Vec<(u32, u32)> = heads.iter().map(|&h| (u32::from(h), RESP_SIZE)).collect();
    want.sort();
    assert_eq!(used, want);
    for i in 0..5u64 {
        let resp: [u8; 12] = d
            .dev
            .mem
            .read_obj(GuestAddress(0x48_0000 + i * 0x1000))
            .unwrap();
        assert_eq!((resp[10], resp[11]), (GOOD, S_OK), "command {i}");
    }
    let on_disk = std::fs::read(&path).unwrap();
    for i in 0..5usize {
        assert!(
            on_disk[i * 65536..(i + 1) * 65536] == pattern(65536, i as u8)[..],
            "write {i}"
        );
    }
}

/// `block_resize` on a `scsi-hd` (QEMU's `scsi_disk_resize_cb`): the adapter tells a driver
/// that took `VIRTIO_SCSI_F_CHANGE` with a `PARAM_CHANGE` event (reason: ASC 0x2a, ASCQ
/// 0x09), the unit's next command but INQUIRY ends in CHECK CONDITION with CAPACITY DATA
/// HAS CHANGED, reported once, and READ CAPACITY then gives the new size. A driver without
/// the feature gets no event, only the unit attention.
#[test]
fn a_resized_disk_reports_its_new_capacity() {
    const F_CHANGE: u64 = 1 << 2;
    let backend = add_drive("vscsi-resize", &temp_image("resize.raw", 1 << 20), false);
    let m = pc_with_adapter("scsi-resize", &[("vscsi-resize", &[("scsi-id", "1")])]);
    machine_creation_done(&m).unwrap();
    let features = VirtioPciDevice::probe(&m, DEVFN).device_features();
    assert_ne!(
        features & F_CHANGE,
        0,
        "param_change is on by default, as QEMU's"
    );
    let read_capacity = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for with_change in [true, false] {
        let mut d = Driver::start(
            &m,
            VERSION_1 | F_EVENT_IDX | if with_change { F_CHANGE } else { 0 },
        );
        d.post_event_buffers(2);
        let size = if with_change { 2 << 20 } else { 3 << 20 };
        backend.truncate(size).unwrap();
        let event = d.next_event(if with_change {
            WAIT
        } else {
            Duration::from_millis(300)
        });
        if with_change {
            assert_eq!(event, Some((3, lun(1, 0), 0x092a)), "PARAM_CHANGE, 2a/09");
        } else {
            assert_eq!(event, None, "no event without VIRTIO_SCSI_F_CHANGE");
        }
        // INQUIRY runs under the unit attention; TEST UNIT READY reports it, once.
        d.command(lun(1, 0), &[0x12, 0, 0, 0, 36, 0], &[], 36)
            .good();
        assert_eq!(
            d.command(lun(1, 0), &[0, 0, 0, 0, 0, 0], &[], 0).check(),
            (6, 0x2a, 0x09)
        );
        d.command(lun(1, 0), &[0, 0, 0, 0, 0, 0], &[], 0).good();
        let last = (size / 512 - 1) as u32;
        let cap = d.command(lun(1, 0), &read_capacity, &[], 8);
        assert_eq!(cap.good().data[..4], last.to_be_bytes());
    }
}
