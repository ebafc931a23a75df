//! A virtio 1.x PCI driver written for tests: it finds a device's capabilities through
//! configuration mechanism #1, negotiates features, lays split rings out in guest RAM and
//! submits descriptor chains, the way Linux's virtio_pci_modern does, but from the test
//! thread of a qtest machine (no guest code). Tests also use it to write malformed rings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hw::core::machine::machine_state;
use hw::core::memory::AddressSpace;
use qom::ObjectRef;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Status bits.
pub const ACKNOWLEDGE: u8 = 1;
/// Status: driver found.
pub const DRIVER: u8 = 2;
/// Status: driver ready.
pub const DRIVER_OK: u8 = 4;
/// Status: features negotiated.
pub const FEATURES_OK: u8 = 8;
/// Status: the device needs a reset.
pub const NEEDS_RESET: u8 = 0x40;
/// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const DESC_WRITE: u16 = 2;
/// The buffer is an indirect table.
pub const DESC_INDIRECT: u16 = 4;

/// PCI configuration space through ports 0xcf8/0xcfc.
pub struct PciConfig {
    io: Arc<AddressSpace>,
    devfn: u32,
}

impl PciConfig {
    /// The function at `devfn` on bus 0 of `machine`.
    pub fn new(machine: &ObjectRef, devfn: u32) -> Self {
        PciConfig {
            io: machine_state(machine).unwrap().system_io().clone(),
            devfn,
        }
    }

    fn select(&self, reg: u32) {
        self.io.write(
            0xcf8,
            u64::from(0x8000_0000 | (self.devfn << 8) | (reg & 0xfc)),
            4,
        );
    }

    /// Reads `size` bytes at `reg`.
    pub fn read(&self, reg: u32, size: u32) -> u32 {
        self.select(reg);
        self.io.read(0xcfc + u64::from(reg & 3), size) as u32
    }

    /// Writes `size` bytes at `reg`.
    pub fn write(&self, reg: u32, value: u32, size: u32) {
        self.select(reg);
        self.io
            .write(0xcfc + u64::from(reg & 3), value.into(), size);
    }

    /// The capabilities as (id, offset).
    pub fn capabilities(&self) -> Vec<(u8, u32)> {
        let mut caps = Vec::new();
        if self.read(0x06, 2) & 0x10 == 0 {
            return caps;
        }
        let mut at = self.read(0x34, 1) & 0xfc;
        while at != 0 && caps.len() < 48 {
            caps.push((self.read(at, 1) as u8, at));
            at = self.read(at + 1, 1) & 0xfc;
        }
        caps
    }
}

/// A split ring laid out in guest RAM by the test.
pub struct SplitRing {
    /// Ring size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl SplitRing {
    /// A ring of `size` entries at `base` (page aligned; takes `size * 22 + 8 KiB`).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
        SplitRing {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Zeroes the ring's memory, as a driver allocating fresh rings does.
    pub fn clear(&self, mem: &GuestMemoryMmap) {
        let end = self.used + 6 + 8 * u64::from(self.size);
        let zeros = vec![0u8; (end - self.desc) as usize];
        mem.write_slice(&zeros, GuestAddress(self.desc)).unwrap();
    }

    /// Writes descriptor `index` (`addr`, `len`, `flags`, `next`), raw: tests use it to
    /// write malformed tables.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index % self.size));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, at).unwrap();
    }

    /// Adds a chain of `(addr, len, device_writable)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { DESC_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Puts `head` in the available ring and moves the index (the index may be raw:
    /// `publish_raw_idx` writes any value).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes the available index directly (malformed rings).
    pub fn publish_raw_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// The used entries not seen yet, as (id, len).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A modern virtio-pci device as the test drives it.
pub struct VirtioPciDevice {
    /// Configuration space.
    pub config: PciConfig,
    mmio: Arc<AddressSpace>,
    /// Guest RAM.
    pub mem: Arc<GuestMemoryMmap>,
    common: u64,
    isr: u64,
    device: u64,
    notify: u64,
    notify_multiplier: u32,
}

const COMMON_DEVICE_FEATURE_SELECT: u64 = 0x00;
const COMMON_DEVICE_FEATURE: u64 = 0x04;
const COMMON_DRIVER_FEATURE_SELECT: u64 = 0x08;
const COMMON_DRIVER_FEATURE: u64 = 0x0c;
const COMMON_MSIX_CONFIG: u64 = 0x10;
const COMMON_NUM_QUEUES: u64 = 0x12;
const COMMON_STATUS: u64 = 0x14;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_SIZE: u64 = 0x18;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const COMMON_QUEUE_ENABLE: u64 = 0x1c;
const COMMON_QUEUE_NOTIFY_OFF: u64 = 0x1e;
const COMMON_QUEUE_DESC: u64 = 0x20;
const COMMON_QUEUE_AVAIL: u64 = 0x28;
const COMMON_QUEUE_USED: u64 = 0x30;

impl VirtioPciDevice {
    /// Finds the virtio capabilities of the function at `devfn` (its BARs are assigned).
    pub fn probe(machine: &ObjectRef, devfn: u32) -> Self {
        let ms = machine_state(machine).unwrap();
        let config = PciConfig::new(machine, devfn);
        let mut found = [0u64; 5];
        let mut notify_multiplier = 0;
        for (id, at) in config.capabilities() {
            if id != 0x09 {
                continue;
            }
            let cfg_type = config.read(at + 3, 1) as usize;
            let bar = config.read(at + 4, 1);
            let offset = config.read(at + 8, 4);
            let bar_addr = u64::from(config.read(0x10 + 4 * bar, 4) & !0xf);
            if (1..=4).contains(&cfg_type) {
                found[cfg_type] = bar_addr + u64::from(offset);
            }
            if cfg_type == 2 {
                notify_multiplier = config.read(at + 16, 4);
            }
        }
        assert!(
            found[1..].iter().all(|&a| a != 0),
            "virtio capabilities: {found:x?}"
        );
        VirtioPciDevice {
            config,
            mmio: ms.system_memory().clone(),
            mem: ms.services().ram(),
            common: found[1],
            notify: found[2],
            isr: found[3],
            device: found[4],
            notify_multiplier,
        }
    }

    /// Reads the common configuration.
    pub fn common_read(&self, offset: u64, size: u32) -> u64 {
        self.mmio.read(self.common + offset, size)
    }

    /// Writes the common configuration.
    pub fn common_write(&self, offset: u64, value: u64, size: u32) {
        self.mmio.write(self.common + offset, value, size)
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.common_read(COMMON_STATUS, 1) as u8
    }

    /// Writes the device status.
    pub fn set_status(&self, status: u8) {
        self.common_write(COMMON_STATUS, status.into(), 1)
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.common_write(COMMON_DEVICE_FEATURE_SELECT, 0, 4);
        let lo = self.common_read(COMMON_DEVICE_FEATURE, 4);
        self.common_write(COMMON_DEVICE_FEATURE_SELECT, 1, 4);
        let hi = self.common_read(COMMON_DEVICE_FEATURE, 4);
        lo | (hi << 32)
    }

    /// Resets, acknowledges and accepts `features`; returns whether FEATURES_OK stuck.
    pub fn negotiate(&self, features: u64) -> bool {
        self.set_status(0);
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        self.common_write(COMMON_DRIVER_FEATURE_SELECT, 0, 4);
        self.common_write(COMMON_DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.common_write(COMMON_DRIVER_FEATURE_SELECT, 1, 4);
        self.common_write(COMMON_DRIVER_FEATURE, features >> 32, 4);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    /// The number of queues.
    pub fn num_queues(&self) -> u16 {
        self.common_read(COMMON_NUM_QUEUES, 2) as u16
    }

    /// Programs and enables queue `index` with `ring`.
    pub fn setup_queue(&self, index: u16, ring: &SplitRing) {
        self.common_write(COMMON_QUEUE_SELECT, index.into(), 2);
        self.common_write(COMMON_QUEUE_SIZE, ring.size.into(), 2);
        self.common_write(COMMON_QUEUE_DESC, ring.desc, 8);
        self.common_write(COMMON_QUEUE_AVAIL, ring.avail, 8);
        self.common_write(COMMON_QUEUE_USED, ring.used, 8);
        self.common_write(COMMON_QUEUE_ENABLE, 1, 2);
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Notifies queue `index`.
    pub fn notify(&self, index: u16) {
        self.common_write(COMMON_QUEUE_SELECT, index.into(), 2);
        let off = self.common_read(COMMON_QUEUE_NOTIFY_OFF, 2);
        self.mmio.write(
            self.notify + off * u64::from(self.notify_multiplier),
            index.into(),
            2,
        );
    }

    /// Guest-physical memory, for BARs the capabilities do not describe (MSI-X).
    pub fn mmio(&self) -> &AddressSpace {
        &self.mmio
    }

    /// Sets the MSI-X vector of queue `index` (or of configuration changes, `None`);
    /// returns what the device took (0xffff: refused).
    pub fn set_vector(&self, index: Option<u16>, vector: u16) -> u16 {
        match index {
            Some(q) => {
                self.common_write(COMMON_QUEUE_SELECT, q.into(), 2);
                self.common_write(COMMON_QUEUE_MSIX_VECTOR, vector.into(), 2);
                self.common_read(COMMON_QUEUE_MSIX_VECTOR, 2) as u16
            }
            None => {
                self.common_write(COMMON_MSIX_CONFIG, vector.into(), 2);
                self.common_read(COMMON_MSIX_CONFIG, 2) as u16
            }
        }
    }

    /// Reads (and so clears) the ISR.
    pub fn read_isr(&self) -> u8 {
        self.mmio.read(self.isr, 1) as u8
    }

    /// Reads `size` bytes of the device configuration.
    pub fn device_config(&self, offset: u64, size: u32) -> u64 {
        self.mmio.read(self.device + offset, size)
    }

    /// Writes `size` bytes of the device configuration (the driver's fields).
    pub fn write_device_config(&self, offset: u64, value: u64, size: u32) {
        self.mmio.write(self.device + offset, value, size)
    }

    /// Waits until `ring` has `n` new used entries (or `timeout` passes).
    pub fn wait_used(&self, ring: &mut SplitRing, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            got.extend(ring.take_used(&self.mem));
            if got.len() < n {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got
    }
}
