//! The harness shared by the tests of emulated PCI network cards on the pc board under
//! qtest (`tests/e1000.rs`, `tests/rtl8139.rs`): the machine with the card over a
//! [`dgram_netdev`](crate::dgram_netdev) backend, the card's PCI side as a driver finds
//! it, the backend's far end, waits against a deadline and the frames the tests build.
//! Each test file keeps only its card's registers and rings.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::memory::AddressSpace;
use hw::core::qdev::{device_impl, qdev_new, qdev_realize, DeviceMethods};
use hw::core::runstate::{self, RunStatus};
use hw::core::vmstate::VmStateSection;
use qom::ObjectRef;
use serde_json::Value;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::dgram_netdev::add_backend;
use crate::virtio::PciConfig;

/// How long one condition may take to come true, and a frame to arrive (as
/// [`add_backend`] sets it).
pub const WAIT: Duration = Duration::from_secs(10);
/// Where [`pc_with_nic`] plugs the card: 04.0.
pub const DEVFN: u32 = 4 << 3;

/// A pc machine on qtest with `driver,netdev=ID,mac=MAC,addr=04.0` (and `props`) over a
/// datagram backend claiming a vnet header when `vnet_hdr`; the VM runs. Returns the
/// machine and the backend's far end.
pub fn pc_with_nic(
    driver: &str,
    id: &str,
    mac: [u8; 6],
    vnet_hdr: bool,
    ram_size: u64,
    props: &[(&str, &str)],
) -> (ObjectRef, FramePeer) {
    let peer = FramePeer(add_backend(id, vnet_hdr));
    let machine = crate::qtest::pc_on_qtest(ram_size);
    let bus = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let dev = qdev_new(driver).unwrap();
    dev.property_parse("netdev", id).unwrap();
    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    dev.property_parse("mac", &mac.join(":")).unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).unwrap();
    }
    dev.property_parse("addr", "04.0").unwrap();
    qom::container_get(&machine, "peripheral")
        .add_child(id, &dev)
        .unwrap();
    dev.set_device_id(Some(id.to_string()));
    qdev_realize(&dev, Some(&bus)).unwrap();
    machine_creation_done(&machine).unwrap();
    runstate::vm_start(machine_state(&machine).unwrap()).unwrap();
    (machine, peer)
}

/// The card `id` that [`pc_with_nic`] put in `machine`'s `peripheral` container, for its
/// saved state.
pub fn device(machine: &ObjectRef, id: &str) -> ObjectRef {
    machine.child("peripheral").unwrap().child(id).unwrap()
}

/// Card `id`'s state saved on `from`, loaded into card `to_id` of a machine `dest(to_id)`
/// makes and stops first, as an incoming migration's is. Returns the state, the stopped
/// machine and its peer. Guest RAM is the test's to copy.
pub fn migrate(
    from: &ObjectRef,
    id: &str,
    to_id: &str,
    dest: impl FnOnce(&str) -> (ObjectRef, FramePeer),
) -> (VmStateSection, ObjectRef, FramePeer) {
    let saved = device_impl(&device(from, id))
        .unwrap()
        .save_state()
        .unwrap();
    let (to, peer) = dest(to_id);
    runstate::vm_stop(machine_state(&to).unwrap(), RunStatus::Paused).unwrap();
    device_impl(&device(&to, to_id))
        .unwrap()
        .load_state(&saved)
        .unwrap();
    (saved, to, peer)
}

/// Asserts that card `dev` refuses `saved` with its field `field` replaced by each of
/// `cases` (what the case is, the value), each on its own, and still loads `saved` as it
/// is after them: each malformed part is caught by itself, not by a check another trips.
pub fn assert_each_refused(
    dev: &ObjectRef,
    saved: &VmStateSection,
    field: &str,
    cases: Vec<(&str, Value)>,
) {
    let dev = device_impl(dev).unwrap();
    for (what, value) in cases {
        let mut bad = saved.clone();
        bad.put(field, value);
        assert!(dev.load_state(&bad).is_err(), "{what} is refused");
    }
    dev.load_state(saved).expect("the unchanged state loads");
}

/// The card as its driver sees it once pci_enable_device and pci_set_master have run:
/// configuration space, BAR 0 and BAR 1 as the board assigned them, the INTx line, and
/// the address spaces and guest RAM to reach them through.
pub struct PciNic {
    pub cfg: PciConfig,
    pub machine: ObjectRef,
    pub mmio: Arc<AddressSpace>,
    pub io: Arc<AddressSpace>,
    pub mem: Arc<GuestMemoryMmap>,
    /// BAR 0's address in I/O or memory space, its flag bits masked off.
    pub bar0: u64,
    /// BAR 1's, the same.
    pub bar1: u64,
    /// The GSI the board routed INTx to (Interrupt Line).
    pub gsi: u32,
}

impl PciNic {
    /// The function at `devfn` on `machine`'s bus 0, with I/O, memory and bus mastering on.
    pub fn new(machine: &ObjectRef, devfn: u32) -> PciNic {
        let ms = machine_state(machine).unwrap();
        let cfg = PciConfig::new(machine, devfn);
        cfg.write(0x04, 0x7, 2);
        // Bit 0 tells an I/O BAR (flags in bits 0-1) from a memory one (bits 0-3).
        let bar = |reg| {
            let v = cfg.read(reg, 4);
            u64::from(if v & 1 != 0 { v & !0x3 } else { v & !0xf })
        };
        let (bar0, bar1) = (bar(0x10), bar(0x14));
        assert!(bar0 != 0 && bar1 != 0, "BARs assigned: {bar0:#x} {bar1:#x}");
        let gsi = cfg.read(0x3c, 1);
        PciNic {
            cfg,
            machine: machine.clone(),
            mmio: ms.system_memory().clone(),
            io: ms.system_io().clone(),
            mem: ms.services().ram(),
            bar0,
            bar1,
            gsi,
        }
    }

    /// The card's INTx line as the interrupt controller sees it.
    pub fn line(&self) -> bool {
        crate::qtest::irq_level(&self.machine, self.gsi)
    }

    /// Writes `data` to guest RAM at `addr`.
    pub fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads `len` bytes of guest RAM at `addr`.
    pub fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        data
    }
}

/// The backend's far end: the wire as the card sees it, one frame a datagram.
pub struct FramePeer(UnixDatagram);

impl FramePeer {
    /// Puts `frame` on the wire towards the card.
    pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }

    /// The next frame the card sends, waiting up to [`WAIT`].
    pub fn recv_frame(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70000];
        let n = self.0.recv(&mut buf).expect("a frame from the card");
        buf.truncate(n);
        buf
    }

    /// Whether the card sends nothing for `d` (a frame it does send is taken).
    pub fn no_frame_for(&self, d: Duration) -> bool {
        self.0.set_read_timeout(Some(d)).unwrap();
        let mut buf = [0u8; 2048];
        let got = self.0.recv(&mut buf);
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        got.is_err()
    }

    /// Takes every frame the card sends until it has been quiet for `d`; at most `limit`.
    pub fn drain(&self, d: Duration, limit: usize) -> usize {
        let mut n = 0;
        while !self.no_frame_for(d) {
            n += 1;
            assert!(n <= limit, "the card sent more than {limit} frames");
        }
        n
    }

    /// Receives frames until one equals `frame`; at most `limit` others before it.
    pub fn recv_until(&self, frame: &[u8], limit: usize) {
        for _ in 0..=limit {
            if self.recv_frame() == frame {
                return;
            }
        }
        panic!("the expected frame never came out");
    }
}

/// Polls `cond` until it holds, failing after [`WAIT`]: cards move frames on the main
/// loop, not in the test's register accesses.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An Ethernet frame to `dest` from 02:00:00:00:00:42 of `ethertype`, with `payload_len`
/// bytes that differ with `seed`.
pub fn ether(dest: [u8; 6], ethertype: u16, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dest);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// The one's-complement sum RFC 1071 defines, folded (not complemented).
pub fn sum16(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}
