//! The firmware configuration device (QEMU's `hw/nvram/fw_cfg.c`, `fw_cfg_io`): a keyed
//! store of blobs the firmware or a test kernel reads through I/O ports, interface described
//! in QEMU's `docs/specs/fw_cfg.rst`.
//!
//! Ports (the x86 layout, QEMU's defaults):
//!
//! * `iobase` (0x510), 2 ports: a 16-bit write to either port selects an item and rewinds
//!   its read offset; a byte read from either port returns the next byte of the selected
//!   item. Reading past the item's end, or from an unknown or invalid key, reads zeros.
//!   Byte writes (the old write channel) are ignored, as in QEMU.
//! * `dma_iobase` (0x514), 8 ports: the DMA interface. Reads return the signature
//!   `"QEMU CFG"` (the byte string, i.e. 0x51454d5520434647 big-endian). The guest writes
//!   the guest-physical address of an `FWCfgDmaAccess` (control, length, address; all
//!   big-endian) as two big-endian 32-bit halves: high at +0, low at +4 (the write of the
//!   low half starts the transfer), or as one 64-bit big-endian write at +0. The transfer
//!   is synchronous: when the `out` returns, the control field holds 0 (done) or the error
//!   bit.
//!
//! Items: `FW_CFG_SIGNATURE` ("QEMU"), `FW_CFG_ID` (bit 0: traditional interface, bit 1:
//! DMA), `FW_CFG_UUID` (zeros), `FW_CFG_NOGRAPHIC` and `FW_CFG_BOOT_MENU` (0),
//! `FW_CFG_FILE_DIR`, and, from the machine, `FW_CFG_RAM_SIZE` (u64), `FW_CFG_NB_CPUS` and
//! `FW_CFG_MAX_CPUS` (u16, `-smp cpus` and `maxcpus`; QEMU's x86 board stores the APIC-ID
//! limit in `FW_CFG_MAX_CPUS`, which a board can do by overwriting the item). Boards add
//! more with [`FwCfgIo::add_bytes`], [`FwCfgIo::add_i16`], [`FwCfgIo::add_i32`],
//! [`FwCfgIo::add_i64`], [`FwCfgIo::add_string`] and [`FwCfgIo::add_file`]. Numbers are stored
//! little-endian, as QEMU stores them; the file directory is big-endian.
//!
//! Files get the keys from `FW_CFG_FILE_FIRST` (0x20) up, sorted by name as QEMU sorts
//! them: adding a file can move the keys of files whose names sort after it (QEMU does the
//! same), so guests look keys up in the directory. No item is writable by the guest: DMA
//! write requests end with the error bit.
//!
//! As in QEMU, `fw_cfg_io` is not on a bus: the board makes it a child of the machine
//! (`/machine/fw_cfg`) and realize maps its ports into the machine's `system-io`. DMA
//! reaches guest RAM only.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{type_init, Error, Object, Prop, Typed};
use vm_memory::{Bytes, GuestAddress};

use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::machine::MachineState;
use crate::core::memory::{AddressSpace, MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{
    qdev_new_typed, qdev_realize, DeviceCategory, DeviceContext, DeviceImpl, DeviceState,
    QdevError, RealizeError,
};
use crate::core::services::MachineServices;

/// QEMU's `TYPE_FW_CFG_IO`.
pub const TYPE_FW_CFG_IO: &str = "fw_cfg_io";
/// The name of the device in the machine's tree (QEMU's `TYPE_FW_CFG`: `/machine/fw_cfg`).
pub const FW_CFG_PATH_NAME: &str = "fw_cfg";

/// x86 selector port (QEMU's `FW_CFG_IO_BASE`).
pub const FW_CFG_IO_BASE: u16 = 0x510;
/// x86 DMA port (`FW_CFG_IO_BASE + 4`).
pub const FW_CFG_DMA_IO_BASE: u16 = 0x514;

/// "QEMU", the value of [`FW_CFG_SIGNATURE`].
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Interface bits: [`FW_CFG_VERSION`], [`FW_CFG_VERSION_DMA`].
pub const FW_CFG_ID: u16 = 0x01;
/// 16 bytes of UUID.
pub const FW_CFG_UUID: u16 = 0x02;
/// RAM size in bytes, u64.
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Whether `-nographic` was given, u16.
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
/// CPUs present at start, u16.
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Machine id, u32.
pub const FW_CFG_MACHINE_ID: u16 = 0x06;
/// Linux kernel load address (QEMU's Linux loader).
pub const FW_CFG_KERNEL_ADDR: u16 = 0x07;
/// Linux kernel size.
pub const FW_CFG_KERNEL_SIZE: u16 = 0x08;
/// Linux kernel command line address.
pub const FW_CFG_KERNEL_CMDLINE: u16 = 0x09;
/// Linux initrd load address.
pub const FW_CFG_INITRD_ADDR: u16 = 0x0a;
/// Linux initrd size.
pub const FW_CFG_INITRD_SIZE: u16 = 0x0b;
/// Boot device.
pub const FW_CFG_BOOT_DEVICE: u16 = 0x0c;
/// NUMA data.
pub const FW_CFG_NUMA: u16 = 0x0d;
/// Whether the boot menu is enabled, u16.
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
/// Highest CPU count (QEMU's x86 board: the APIC-ID limit), u16.
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Linux kernel entry point.
pub const FW_CFG_KERNEL_ENTRY: u16 = 0x10;
/// Linux kernel image.
pub const FW_CFG_KERNEL_DATA: u16 = 0x11;
/// Linux initrd image.
pub const FW_CFG_INITRD_DATA: u16 = 0x12;
/// Linux command line address.
pub const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
/// Linux command line size.
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
/// Linux command line.
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
/// Linux setup header address.
pub const FW_CFG_SETUP_ADDR: u16 = 0x16;
/// Linux setup header size.
pub const FW_CFG_SETUP_SIZE: u16 = 0x17;
/// Linux setup header.
pub const FW_CFG_SETUP_DATA: u16 = 0x18;
/// The file directory: a big-endian u32 count, then [`FW_CFG_FILE_ENTRY_SIZE`]-byte entries.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// The key of the first file.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// The default number of file slots (QEMU's `FW_CFG_FILE_SLOTS_DFLT`).
pub const FW_CFG_FILE_SLOTS_DFLT: u16 = 0x20;
/// Selector bit of the (unsupported) write channel; ignored when selecting.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// Selector bit of architecture-specific items.
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
/// The selector bits that index an item table.
pub const FW_CFG_ENTRY_MASK: u16 = !(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL);
/// x86: ACPI tables (QEMU's `FW_CFG_ACPI_TABLES`).
pub const FW_CFG_ACPI_TABLES: u16 = FW_CFG_ARCH_LOCAL;
/// x86: SMBIOS entries.
pub const FW_CFG_SMBIOS_ENTRIES: u16 = FW_CFG_ARCH_LOCAL + 1;
/// x86: whether IRQ0 is overridden to GSI 2, u32.
pub const FW_CFG_IRQ0_OVERRIDE: u16 = FW_CFG_ARCH_LOCAL + 2;
/// x86: the e820 table.
pub const FW_CFG_E820_TABLE: u16 = FW_CFG_ARCH_LOCAL + 3;
/// x86: HPET description.
pub const FW_CFG_HPET: u16 = FW_CFG_ARCH_LOCAL + 4;

/// [`FW_CFG_ID`] bit: the traditional (port) interface.
pub const FW_CFG_VERSION: u32 = 0x01;
/// [`FW_CFG_ID`] bit: the DMA interface.
pub const FW_CFG_VERSION_DMA: u32 = 0x02;

/// `FWCfgDmaAccess.control` bit: the transfer failed.
pub const FW_CFG_DMA_CTL_ERROR: u32 = 0x01;
/// `FWCfgDmaAccess.control` bit: read the item into guest memory.
pub const FW_CFG_DMA_CTL_READ: u32 = 0x02;
/// `FWCfgDmaAccess.control` bit: advance the item's offset without transferring.
pub const FW_CFG_DMA_CTL_SKIP: u32 = 0x04;
/// `FWCfgDmaAccess.control` bit: select the key in the high 16 bits first.
pub const FW_CFG_DMA_CTL_SELECT: u32 = 0x08;
/// `FWCfgDmaAccess.control` bit: write guest memory into the item (refused here).
pub const FW_CFG_DMA_CTL_WRITE: u32 = 0x10;
/// What reading the DMA port returns: "QEMU CFG" (QEMU's `FW_CFG_DMA_SIGNATURE`).
pub const FW_CFG_DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// Bytes of a file name in a directory entry, terminating NUL included.
pub const FW_CFG_MAX_FILE_PATH: usize = 56;
/// Bytes of one directory entry: size (BE32), select (BE16), reserved (16), name.
pub const FW_CFG_FILE_ENTRY_SIZE: usize = 8 + FW_CFG_MAX_FILE_PATH;
/// Bytes of an `FWCfgDmaAccess`.
pub const FW_CFG_DMA_ACCESS_SIZE: u64 = 16;

/// QEMU's `FW_CFG_INVALID`: the selector state after an out-of-range key.
const FW_CFG_INVALID: u16 = 0xffff;

/// Errors of the fw_cfg board API and of realize.
#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    /// The key is past the item table, or sets the write-channel bit.
    #[error("fw_cfg: key 0x{0:x} is out of range")]
    BadKey(u16),
    /// The key lies in the file range; files are added by name.
    #[error("fw_cfg: key 0x{0:x} is reserved for files: use add_file")]
    FileKey(u16),
    /// A file name too long for the directory.
    #[error("fw_cfg: file name '{0}' is longer than {max} bytes", max = FW_CFG_MAX_FILE_PATH - 1)]
    NameTooLong(String),
    /// A file name used twice (QEMU: "duplicate fw_cfg file name").
    #[error("duplicate fw_cfg file name: {0}")]
    DuplicateFile(String),
    /// Every file slot is taken.
    #[error("fw_cfg: no more file slots (x-file-slots={0})")]
    NoFileSlots(u16),
    /// An item larger than the 32-bit size the interface can describe.
    #[error("fw_cfg: item of {0} bytes is too large")]
    TooLarge(usize),
    /// A port base above 0xffff.
    #[error("fw_cfg: port base 0x{0:x} is out of range")]
    BadPort(u64),
}

impl From<FwCfgError> for Error {
    fn from(e: FwCfgError) -> Self {
        Error::other(e)
    }
}

/// The items and the interface state, shared by the port handlers and the board API.
#[derive(Debug)]
struct FwCfgInner {
    /// Items by key (`key & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK)`).
    entries: BTreeMap<u16, Arc<[u8]>>,
    /// File names, sorted; file `i` has key `FW_CFG_FILE_FIRST + i`.
    files: Vec<String>,
    /// The selected key, or `FW_CFG_INVALID`.
    cur_entry: u16,
    /// Read offset in the selected item.
    cur_offset: u32,
    /// The address being written to the DMA port.
    dma_addr: u64,
    /// Keys below this (without the arch bit) are valid.
    max_entry: u16,
}

impl Default for FwCfgInner {
    fn default() -> Self {
        FwCfgInner {
            entries: BTreeMap::new(),
            files: Vec::new(),
            cur_entry: 0,
            cur_offset: 0,
            dma_addr: 0,
            max_entry: FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS_DFLT,
        }
    }
}

impl FwCfgInner {
    fn entry_index(key: u16) -> u16 {
        key & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK)
    }

    /// QEMU's `fw_cfg_select`.
    fn select(&mut self, key: u16) {
        self.cur_offset = 0;
        self.cur_entry = if key & FW_CFG_ENTRY_MASK >= self.max_entry {
            FW_CFG_INVALID
        } else {
            key
        };
    }

    fn current(&self) -> Option<Arc<[u8]>> {
        if self.cur_entry == FW_CFG_INVALID {
            return None;
        }
        self.entries.get(&Self::entry_index(self.cur_entry)).cloned()
    }

    /// One byte of the traditional data port.
    fn read_byte(&mut self) -> u8 {
        match self.current() {
            Some(data) if (self.cur_offset as usize) < data.len() => {
                let b = data[self.cur_offset as usize];
                self.cur_offset += 1;
                b
            }
            _ => 0,
        }
    }

    fn rebuild_file_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.files.len() * FW_CFG_FILE_ENTRY_SIZE);
        dir.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for (i, name) in self.files.iter().enumerate() {
            let key = FW_CFG_FILE_FIRST + i as u16;
            let size = self.entries.get(&key).map_or(0, |d| d.len());
            dir.extend_from_slice(&(size as u32).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FW_CFG_MAX_FILE_PATH];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.entries.insert(FW_CFG_FILE_DIR, dir.into());
    }

    /// QEMU's `fw_cfg_dma_transfer`, on the `FWCfgDmaAccess` at `self.dma_addr`; `wrote`
    /// hears of the guest RAM it writes.
    fn dma_transfer<M: Bytes<GuestAddress>>(&mut self, ram: &M, wrote: &dyn Fn(u64, u64)) {
        let desc_addr = std::mem::take(&mut self.dma_addr);
        let control_addr = GuestAddress(desc_addr);
        wrote(desc_addr, 4);
        let mut desc = [0u8; FW_CFG_DMA_ACCESS_SIZE as usize];
        if ram.read_slice(&mut desc, control_addr).is_err() {
            let _ = ram.write_slice(&FW_CFG_DMA_CTL_ERROR.to_be_bytes(), control_addr);
            return;
        }
        // FWCfgDmaAccess: control, length (big-endian u32s), address (big-endian u64).
        let [c0, c1, c2, c3, l0, l1, l2, l3, a @ ..] = desc;
        let control = u32::from_be_bytes([c0, c1, c2, c3]);
        let mut length = u32::from_be_bytes([l0, l1, l2, l3]);
        let mut address = u64::from_be_bytes(a);

        if control & FW_CFG_DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & FW_CFG_DMA_CTL_READ != 0 {
            wrote(address, u64::from(length));
        }
        let (read, write) = if control & FW_CFG_DMA_CTL_READ != 0 {
            (true, false)
        } else if control & FW_CFG_DMA_CTL_WRITE != 0 {
            (false, true)
        } else if control & FW_CFG_DMA_CTL_SKIP != 0 {
            (false, false)
        } else {
            length = 0;
            (false, false)
        };

        let entry = self.current();
        let mut status = 0;
        while length > 0 && status & FW_CFG_DMA_CTL_ERROR == 0 {
            let offset = self.cur_offset as usize;
            let len = match &entry {
                Some(data) if offset < data.len() => {
                    let len = (length as usize).min(data.len() - offset);
                    if read
                        && ram
                            .write_slice(&data[offset..offset + len], GuestAddress(address))
                            .is_err()
                    {
                        status |= FW_CFG_DMA_CTL_ERROR;
                    }
                    if write {
                        // No item is writable (QEMU: only items added writable are).
                        status |= FW_CFG_DMA_CTL_ERROR;
                    }
                    self.cur_offset += len as u32;
                    len as u32
                }
                // Past the end, or nothing selected: reads fill zeros, skips just advance.
                _ => {
                    if read && write_zeros(ram, address, length).is_err() {
                        status |= FW_CFG_DMA_CTL_ERROR;
                    }
                    if write {
                        status |= FW_CFG_DMA_CTL_ERROR;
                    }
                    length
                }
            };
            address = address.wrapping_add(u64::from(len));
            length -= len;
        }
        let _ = ram.write_slice(&status.to_be_bytes(), control_addr);
    }
}

fn write_zeros<M: Bytes<GuestAddress>>(ram: &M, address: u64, length: u32) -> Result<(), M::E> {
    const CHUNK: usize = 4096;
    let zeros = [0u8; CHUNK];
    let mut done = 0usize;
    let length = length as usize;
    while done < length {
        let n = (length - done).min(CHUNK);
        ram.write_slice(&zeros[..n], GuestAddress(address.wrapping_add(done as u64)))?;
        done += n;
    }
    Ok(())
}

/// `fw_cfg_io` (QEMU's `FWCfgIoState`): the item store behind one lock, shared with the
/// port handlers, and the regions to unmap.
#[derive(qom::Object)]
#[qom(name = TYPE_FW_CFG_IO)]
pub struct FwCfgIo {
    #[parent]
    parent: DeviceState,
    #[property(default = FW_CFG_IO_BASE as u32, desc = "Selector/data port base")]
    iobase: Prop<u32>,
    #[property(default = FW_CFG_DMA_IO_BASE as u32, desc = "DMA port base")]
    dma_iobase: Prop<u32>,
    #[property(default = true, desc = "Whether the DMA interface is present")]
    dma_enabled: Prop<bool>,
    #[property(name = "x-file-slots", default = FW_CFG_FILE_SLOTS_DFLT, desc = "Number of file slots")]
    file_slots: Prop<u16>,
    inner: Arc<Mutex<FwCfgInner>>,
    regions: Mutex<Vec<(Arc<AddressSpace>, Arc<MemoryRegion>)>>,
}

type_init!(FwCfgIo);

/// The selector and data ports (QEMU's `fw_cfg_comb_mem_ops`).
struct FwCfgCombPort {
    inner: Arc<Mutex<FwCfgInner>>,
}

impl MemoryRegionOps for FwCfgCombPort {
    fn read(&self, _offset: u64, size: u32) -> u64 {
        // QEMU accepts byte reads only; wider reads return the next bytes, first byte most
        // significant, as its memory-mapped data register does.
        let mut inner = self.inner.lock();
        (0..size.min(8)).fold(0u64, |v, _| (v << 8) | u64::from(inner.read_byte()))
    }

    fn write(&self, _offset: u64, value: u64, size: u32) {
        // A 16-bit write selects; byte writes to the data port are ignored (QEMU dropped the
        // write channel).
        if size == 2 {
            self.inner.lock().select(value as u16);
        }
    }
}

/// The DMA address register (QEMU's `fw_cfg_dma_mem_ops`, big-endian).
struct FwCfgDmaPort {
    inner: Arc<Mutex<FwCfgInner>>,
    machine: Weak<MachineServices>,
}

impl FwCfgDmaPort {
    fn transfer(&self, inner: &mut FwCfgInner) {
        match self.machine.upgrade() {
            Some(machine) => {
                let tracker = machine.dirty_tracker();
                inner.dma_transfer(&*machine.ram(), &|addr, len| tracker.mark(addr, len))
            }
            None => inner.dma_addr = 0,
        }
    }
}

impl MemoryRegionOps for FwCfgDmaPort {
    fn read(&self, offset: u64, size: u32) -> u64 {
        // The guest sees the bytes of "QEMU CFG" at their offsets.
        let sig = FW_CFG_DMA_SIGNATURE.to_be_bytes();
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().enumerate().take(size.min(8) as usize) {
            *b = sig.get(offset as usize + i).copied().unwrap_or(0);
        }
        u64::from_le_bytes(bytes)
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut inner = self.inner.lock();
        match (size, offset) {
            (4, 0) => inner.dma_addr = u64::from((value as u32).swap_bytes()) << 32,
            (4, 4) => {
                inner.dma_addr |= u64::from((value as u32).swap_bytes());
                self.transfer(&mut inner);
            }
            (8, 0) => {
                inner.dma_addr = value.swap_bytes();
                self.transfer(&mut inner);
            }
            // Other sizes and offsets are invalid accesses: ignored.
            _ => {}
        }
    }
}

fn port_base(value: u32) -> Result<u16, FwCfgError> {
    u16::try_from(value).map_err(|_| FwCfgError::BadPort(value.into()))
}

impl DeviceImpl for FwCfgIo {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> =
        Some("QEMU firmware configuration interface (I/O ports)");
    // A board device (QEMU's sysbus devices are not user-creatable either).
    const USER_CREATABLE: bool = false;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let machine = ctx.machine()?;
        let io = machine.system_io();
        let iobase = port_base(self.iobase.get()).map_err(RealizeError::device)?;
        let dma_iobase = port_base(self.dma_iobase.get()).map_err(RealizeError::device)?;
        let dma_enabled = self.dma_enabled.get();
        let slots = self.file_slots.get();
        let max_entry = FW_CFG_FILE_FIRST.saturating_add(slots);
        if max_entry > FW_CFG_ENTRY_MASK + 1 {
            return Err(RealizeError::device(FwCfgError::NoFileSlots(slots)));
        }
        {
            let mut inner = self.inner.lock();
            if inner.files.len() > usize::from(slots) {
                return Err(RealizeError::device(FwCfgError::NoFileSlots(slots)));
            }
            inner.max_entry = max_entry;
            // QEMU's fw_cfg_init1 / fw_cfg_common_realize.
            inner.entries.insert(FW_CFG_SIGNATURE, Arc::from(&b"QEMU"[..]));
            let mut id = FW_CFG_VERSION;
            if dma_enabled {
                id |= FW_CFG_VERSION_DMA;
            }
            inner.entries.insert(FW_CFG_ID, Arc::from(&id.to_le_bytes()[..]));
            for (key, default) in [
                (FW_CFG_UUID, &[0u8; 16][..]),
                (FW_CFG_NOGRAPHIC, &[0u8; 2][..]),
                (FW_CFG_BOOT_MENU, &[0u8; 2][..]),
            ] {
                inner.entries.entry(key).or_insert_with(|| Arc::from(default));
            }
            inner.rebuild_file_dir();
            inner.select(0);
        }

        let comb = MemoryRegion::new_io(
            "fwcfg",
            2,
            Arc::new(FwCfgCombPort {
                inner: self.inner.clone(),
            }),
        );
        io.map(iobase.into(), comb.clone())?;
        let mut regions = vec![(io.clone(), comb)];
        if dma_enabled {
            let dma = MemoryRegion::new_io(
                "fwcfg.dma",
                8,
                Arc::new(FwCfgDmaPort {
                    inner: self.inner.clone(),
                    machine: Arc::downgrade(machine),
                }),
            );
            if let Err(e) = io.map(dma_iobase.into(), dma.clone()) {
                io.unmap(&regions[0].1);
                return Err(e.into());
            }
            regions.push((io.clone(), dma));
        }
        *self.regions.lock() = regions;
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        for (io, region) in self.regions.lock().drain(..) {
            io.unmap(&region);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    /// QEMU's `vmstate_fw_cfg`: the selected item, the read offset, the DMA address being
    /// written (the items themselves come from the configuration, the same on both sides).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let inner = self.inner.lock();
        Ok(VmStateSection::new(1)
            .with("cur_entry", inner.cur_entry)
            .with("cur_offset", inner.cur_offset)
            .with("dma_addr", inner.dma_addr))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let mut inner = self.inner.lock();
        inner.cur_entry = state.get("cur_entry")?;
        inner.cur_offset = state.get("cur_offset")?;
        inner.dma_addr = state.get("dma_addr")?;
        Ok(())
    }
}

/// QEMU's `fw_cfg_init_io_dma` for the x86 layout, with `fw_cfg_arch_create`'s items:
/// creates `fw_cfg_io` with its ports at `iobase` and `dma_iobase`, stores the RAM size and
/// CPU counts of `ms`, makes it the machine's child `fw_cfg` and realizes it. `None` for
/// `dma_iobase` leaves DMA out.
pub fn fw_cfg_init_io_dma(
    ms: &MachineState,
    iobase: u16,
    dma_iobase: Option<u16>,
) -> Result<Typed<FwCfgIo>, QdevError> {
    let dev = qdev_new_typed::<FwCfgIo>()?;
    dev.iobase.set(iobase.into());
    match dma_iobase {
        Some(port) => dev.dma_iobase.set(port.into()),
        None => dev.dma_enabled.set(false),
    }
    let smp = ms.smp();
    dev.insert(FW_CFG_NB_CPUS, &(smp.cpus as u16).to_le_bytes());
    dev.insert(FW_CFG_MAX_CPUS, &(smp.max_cpus as u16).to_le_bytes());
    dev.insert(FW_CFG_RAM_SIZE, &ms.ram_size().to_le_bytes());
    dev.set_services(ms.services());
    let obj = dev.object().clone();
    ms.object().add_child(FW_CFG_PATH_NAME, &obj)?;
    if let Err(e) = qdev_realize(&obj, None) {
        obj.unparent();
        return Err(e);
    }
    Ok(dev)
}

/// QEMU's `fw_cfg_find`: the machine's fw_cfg device, if it has one.
pub fn fw_cfg_find(machine: &Object) -> Option<Typed<FwCfgIo>> {
    machine.child(FW_CFG_PATH_NAME).and_then(Typed::new)
}

impl FwCfgIo {
    fn insert(&self, key: u16, data: &[u8]) {
        self.inner.lock().entries.insert(key, Arc::from(data));
    }

    /// QEMU's `fw_cfg_add_bytes`: sets item `key` (replacing what it held). File keys are
    /// refused: files are added with [`FwCfgIo::add_file`].
    pub fn add_bytes(&self, key: u16, data: impl Into<Vec<u8>>) -> Result<(), FwCfgError> {
        let data = data.into();
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let mut inner = self.inner.lock();
        let index = key & FW_CFG_ENTRY_MASK;
        if key & FW_CFG_WRITE_CHANNEL != 0 || index >= inner.max_entry {
            return Err(FwCfgError::BadKey(key));
        }
        if key & FW_CFG_ARCH_LOCAL == 0 && (index == FW_CFG_FILE_DIR || index >= FW_CFG_FILE_FIRST)
        {
            return Err(FwCfgError::FileKey(key));
        }
        inner.entries.insert(key, data.into());
        Ok(())
    }

    /// QEMU's `fw_cfg_add_string`: the string and a terminating NUL.
    pub fn add_string(&self, key: u16, value: &str) -> Result<(), FwCfgError> {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.add_bytes(key, data)
    }

    /// QEMU's `fw_cfg_add_i16`: a little-endian u16.
    pub fn add_i16(&self, key: u16, value: u16) -> Result<(), FwCfgError> {
        self.add_bytes(key, value.to_le_bytes())
    }

    /// QEMU's `fw_cfg_add_i32`: a little-endian u32.
    pub fn add_i32(&self, key: u16, value: u32) -> Result<(), FwCfgError> {
        self.add_bytes(key, value.to_le_bytes())
    }

    /// QEMU's `fw_cfg_add_i64`: a little-endian u64.
    pub fn add_i64(&self, key: u16, value: u64) -> Result<(), FwCfgError> {
        self.add_bytes(key, value.to_le_bytes())
    }

    /// QEMU's `fw_cfg_add_file`: adds file `name` (at most 55 bytes, unique) and returns the
    /// key it has now. Files are kept sorted by name; keys of files sorting after `name`
    /// move up by one, as in QEMU.
    pub fn add_file(&self, name: &str, data: impl Into<Vec<u8>>) -> Result<u16, FwCfgError> {
        let data = data.into();
        if name.len() >= FW_CFG_MAX_FILE_PATH || name.as_bytes().contains(&0) {
            return Err(FwCfgError::NameTooLong(name.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let slots = self.file_slots.get();
        let mut inner = self.inner.lock();
        if inner.files.iter().any(|f| f == name) {
            return Err(FwCfgError::DuplicateFile(name.to_string()));
        }
        if inner.files.len() >= usize::from(slots) {
            return Err(FwCfgError::NoFileSlots(slots));
        }
        let index = inner.files.partition_point(|f| f.as_str() <= name);
        let count = inner.files.len();
        // Move the files after the insertion point up one key.
        for i in (index..count).rev() {
            let from = FW_CFG_FILE_FIRST + i as u16;
            if let Some(d) = inner.entries.remove(&from) {
                inner.entries.insert(from + 1, d);
            }
        }
        inner.files.insert(index, name.to_string());
        let key = FW_CFG_FILE_FIRST + index as u16;
        inner.entries.insert(key, data.into());
        inner.rebuild_file_dir();
        Ok(key)
    }

    /// The key file `name` has, if it was added.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        let inner = self.inner.lock();
        let index = inner.files.iter().position(|f| f == name)?;
        Some(FW_CFG_FILE_FIRST + index as u16)
    }

    /// The bytes of item `key`, as a guest reading from offset 0 sees them (`None` for a key
    /// without an item). For tests and the monitor.
    pub fn item(&self, key: u16) -> Option<Vec<u8>> {
        let inner = self.inner.lock();
        inner
            .entries
            .get(&FwCfgInner::entry_index(key))
            .map(|d| d.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn inner_with_file() -> FwCfgInner {
        let mut inner = FwCfgInner::default();
        inner.entries.insert(FW_CFG_SIGNATURE, Arc::from(&b"QEMU"[..]));
        inner.files.push("etc/test".into());
        inner.entries.insert(FW_CFG_FILE_FIRST, Arc::from(&b"hello"[..]));
        inner.rebuild_file_dir();
        inner
    }

    fn dma(ram: &GuestMemoryMmap, inner: &mut FwCfgInner, control: u32, len: u32, addr: u64) -> u32 {
        let mut desc = Vec::new();
        desc.extend_from_slice(&control.to_be_bytes());
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&addr.to_be_bytes());
        ram.write_slice(&desc, GuestAddress(0x100)).unwrap();
        inner.dma_addr = 0x100;
        inner.dma_transfer(ram, &|_, _| {});
        let mut status = [0u8; 4];
        ram.read_slice(&mut status, GuestAddress(0x100)).unwrap();
        u32::from_be_bytes(status)
    }

    #[test]
    fn dma_reads_skips_pads_with_zeros_and_refuses_writes() {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut inner = inner_with_file();
        ram.write_slice(&[0xaa; 16], GuestAddress(0x1000)).unwrap();
        let ctl = (u32::from(FW_CFG_FILE_FIRST) << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_SKIP;
        assert_eq!(dma(&ram, &mut inner, ctl, 1, 0x1000), 0);
        assert_eq!(dma(&ram, &mut inner, FW_CFG_DMA_CTL_READ, 8, 0x1000), 0);
        let mut got = [0u8; 10];
        ram.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"ello\0\0\0\0\xaa\xaa");
        assert_eq!(
            dma(&ram, &mut inner, FW_CFG_DMA_CTL_WRITE, 4, 0x1000),
            FW_CFG_DMA_CTL_ERROR
        );
        // A read into memory that is not RAM fails.
        let ctl = FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ;
        assert_eq!(dma(&ram, &mut inner, ctl, 4, 0xfff0_0000), FW_CFG_DMA_CTL_ERROR);
        // A descriptor outside RAM: nothing to write the status to, nothing happens.
        inner.dma_addr = 0x1_0000_0000;
        inner.dma_transfer(&ram, &|_, _| {});
        assert_eq!(inner.dma_addr, 0);
    }

    #[test]
    fn out_of_range_keys_select_nothing() {
        let mut inner = inner_with_file();
        inner.select(FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS_DFLT);
        assert_eq!(inner.cur_entry, FW_CFG_INVALID);
        assert_eq!(inner.read_byte(), 0);
        // The write-channel bit is ignored when looking the item up.
        inner.select(FW_CFG_SIGNATURE | FW_CFG_WRITE_CHANNEL);
        assert_eq!(inner.read_byte(), b'Q');
    }
}
