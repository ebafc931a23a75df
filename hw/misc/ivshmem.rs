//! `ivshmem-plain` (QEMU's `hw/misc/ivshmem.c`, 1af4:1110): a host memory backend's
//! memory (`memdev=`, a `memory-backend-file` with `share=on` for memory another process
//! sees) shown to the guest as BAR 2, 64-bit prefetchable, mapped straight into the guest
//! where the accelerator can. BAR 0 holds the registers (interrupt mask and status, the
//! position, the doorbell), which the plain variant has without interrupts or peers.
//! libvirt writes it for `<shmem><model type='ivshmem-plain'/>`; Looking Glass and
//! similar guests share a frame buffer with the host through it.
//!
//! As QEMU's, the device migrates only with `master=on` (the memory's contents go
//! along); by default it is a peer and blocks migration. The doorbell variant, which
//! talks to `ivshmem-server`, is not there.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, ObjectRef, Prop};

use crate::backends::hostmem::{HostMemory, HostMemoryBackend};
use crate::core::memory::{MemoryRegion, MemoryRegionOps, RamBacking};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::qdev_properties::OnOffAuto;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_IVSHMEM_PLAIN`.
pub const TYPE_IVSHMEM_PLAIN: &str = "ivshmem-plain";
/// QEMU's `IVSHMEM_REG_BAR_SIZE`.
const REG_BAR_SIZE: u64 = 0x100;
const INTRMASK: u64 = 0;
const INTRSTATUS: u64 = 4;
const IVPOSITION: u64 = 8;
const STATE_VERSION: u32 = 1;
/// QEMU's migration blocker of a device that is not the master.
const PEER_BLOCKER: &str = "Migration is disabled when using feature 'peer mode' in device 'ivshmem'";

/// QEMU's `IVShmemState` for the plain variant.
#[derive(qom::Object)]
#[qom(name = TYPE_IVSHMEM_PLAIN, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct IvshmemPlain {
    #[parent]
    parent: PciDevice,
    #[property(desc = "ID or path of the memory-backend whose memory is BAR 2")]
    memdev: Prop<Option<String>>,
    #[property(
        default = OnOffAuto::Off,
        desc = "Whether this device's guest owns the memory's contents (on: they migrate with it)"
    )]
    master: Prop<OnOffAuto>,
    regs: Arc<Mutex<Registers>>,
    /// The backend, marked mapped while the device lives.
    backend: OnceLock<ObjectRef>,
    memory: OnceLock<Arc<HostMemory>>,
}

type_init!(IvshmemPlain);

/// Errors of `ivshmem-plain`, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum IvshmemError {
    /// No `memdev=`.
    #[error("You must specify a 'memdev'")]
    NoMemdev,
    /// `memdev=` names nothing.
    #[error("Device '{0}' not found")]
    NotFound(String),
    /// `memdev=` names an object that is not a memory backend.
    #[error("Invalid parameter type for 'memdev', expected: memory-backend")]
    NotBackend,
    /// Another device maps the backend already.
    #[error("can't use already busy memdev: {0}")]
    Busy(String),
}

/// The registers of BAR 0. Without interrupts in the plain variant, they only store.
#[derive(Default)]
struct Registers {
    intrmask: u32,
    intrstatus: u32,
}

struct RegisterOps(Arc<Mutex<Registers>>);

impl RegisterOps {
    /// QEMU's `ivshmem_io_read` of the 4-byte register at `offset` (only aligned offsets
    /// name one).
    fn read_reg(&self, offset: u64) -> u32 {
        let mut regs = self.0.lock();
        match offset {
            INTRMASK => regs.intrmask,
            // Reading the status clears it.
            INTRSTATUS => std::mem::take(&mut regs.intrstatus),
            // The plain device is peer 0.
            IVPOSITION => 0,
            _ => 0,
        }
    }
}

/// QEMU serves these registers 4 bytes at a time (`.impl` sizes 4): an access is split
/// or widened into 4-byte accesses at its own offset, as QEMU's memory core does.
impl MemoryRegionOps for RegisterOps {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut value = 0u64;
        for i in (0..u64::from(size.clamp(1, 8))).step_by(4) {
            value |= u64::from(self.read_reg(offset + i)) << (8 * i);
        }
        if size >= 8 {
            value
        } else {
            value & ((1u64 << (8 * size)) - 1)
        }
    }

    /// QEMU's `ivshmem_io_write`: the doorbell has no peers to ring here.
    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in (0..u64::from(size.clamp(1, 8))).step_by(4) {
            let v = (value >> (8 * i)) as u32;
            let mut regs = self.0.lock();
            match (offset + i) & 0xfc {
                INTRMASK => regs.intrmask = v,
                INTRSTATUS => regs.intrstatus = v,
                _ => {}
            }
        }
    }
}

/// BAR 2's accesses where the accelerator does not map it (qtest, the monitor).
struct SharedMemoryOps(Arc<HostMemory>);

impl SharedMemoryOps {
    /// The host address of `size` bytes at `offset`, if they are inside the mapping.
    fn at(&self, offset: u64, size: u32) -> Option<*mut u8> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(size as usize)?;
        // SAFETY: `offset..end` is inside the mapping, which lives as long as `self.0`.
        (end <= self.0.len()).then(|| unsafe { self.0.as_ptr().add(offset) })
    }
}

/// Aligned accesses of 1, 2, 4 or 8 bytes are single loads and stores, so a guest's atomic
/// counters stay whole for the other side; others go byte by byte. Volatile: another
/// process writes the memory too.
impl MemoryRegionOps for SharedMemoryOps {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let aligned = matches!(size, 1 | 2 | 4 | 8) && offset.is_multiple_of(u64::from(size));
        match self.at(offset, size) {
            // SAFETY: `p` is valid for `size` bytes and aligned to `size`.
            Some(p) if aligned => unsafe {
                match size {
                    1 => u64::from(p.read_volatile()),
                    2 => u64::from(p.cast::<u16>().read_volatile()),
                    4 => u64::from(p.cast::<u32>().read_volatile()),
                    _ => p.cast::<u64>().read_volatile(),
                }
            },
            _ => (0..u64::from(size.min(8))).fold(0, |v, i| {
                // SAFETY: a byte of the live mapping.
                let b = self.at(offset + i, 1).map_or(0, |p| unsafe { p.read_volatile() });
                v | (u64::from(b) << (8 * i))
            }),
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let aligned = matches!(size, 1 | 2 | 4 | 8) && offset.is_multiple_of(u64::from(size));
        match self.at(offset, size) {
            // SAFETY: `p` is valid for `size` bytes and aligned to `size`.
            Some(p) if aligned => unsafe {
                match size {
                    1 => p.write_volatile(value as u8),
                    2 => p.cast::<u16>().write_volatile(value as u16),
                    4 => p.cast::<u32>().write_volatile(value as u32),
                    _ => p.cast::<u64>().write_volatile(value),
                }
            },
            _ => {
                for i in 0..u64::from(size.min(8)) {
                    if let Some(p) = self.at(offset + i, 1) {
                        // SAFETY: a byte of the live mapping.
                        unsafe { p.write_volatile((value >> (8 * i)) as u8) };
                    }
                }
            }
        }
    }
}

impl IvshmemPlain {
    /// `memdev=`'s backend, checked as QEMU's `ivshmem_plain_realize` checks it.
    fn backend(&self) -> Result<ObjectRef, IvshmemError> {
        let name = self.memdev.get().ok_or(IvshmemError::NoMemdev)?;
        let obj = qom::resolve_path(&qom::object_get_root(), &name).map_err(|_| IvshmemError::NotFound(name.clone()))?;
        let backend = obj.cast::<HostMemoryBackend>().ok_or(IvshmemError::NotBackend)?;
        // Claimed here, at once: two devices realized together cannot both take it.
        if !backend.claim() {
            let id = obj.canonical_path().unwrap_or_default();
            let id = id.rsplit('/').next().unwrap_or_default().to_string();
            return Err(IvshmemError::Busy(id));
        }
        Ok(obj)
    }

    /// QEMU's `ivshmem_is_master` (the plain device is peer 0, so `auto` is the master).
    fn is_master(&self) -> bool {
        self.master.get() != OnOffAuto::Off
    }

    fn shared_memory(&self) -> Result<&Arc<HostMemory>, VmStateError> {
        self.memory
            .get()
            .ok_or_else(|| VmStateError::Host(format!("{TYPE_IVSHMEM_PLAIN} is not realized")))
    }
}

impl DeviceImpl for IvshmemPlain {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> = Some("Inter-VM shared memory");

    fn reset(&self) {
        *self.regs.lock() = Registers::default();
        DeviceImpl::reset(&self.parent);
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(&self.parent, ctx);
        if let Some(backend) = self.backend.get().and_then(|b| b.cast::<HostMemoryBackend>()) {
            backend.set_mapped(false);
        }
    }

    /// QEMU's blocker, added at realize for a peer.
    fn migration_blocker(&self) -> Option<String> {
        (!self.is_master()).then(|| PEER_BLOCKER.to_string())
    }

    /// The registers and, from a master, the memory's contents; a peer blocks migration.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        if !self.is_master() {
            return Err(VmStateError::Blocked(PEER_BLOCKER.into()));
        }
        let memory = self.shared_memory()?;
        let mut s = VmStateSection::new(STATE_VERSION);
        self.parent.save_pci_state(&mut s);
        let regs = self.regs.lock();
        s.put("intrmask", regs.intrmask);
        s.put("intrstatus", regs.intrstatus);
        // Copied out through raw pointers: the guest and other processes may write it
        // meanwhile (no Rust reference may point into it), as under QEMU.
        let mut contents = vec![0u8; memory.len()];
        // SAFETY: `memory.len()` bytes of the live mapping into a buffer of that size.
        unsafe { std::ptr::copy_nonoverlapping(memory.as_ptr(), contents.as_mut_ptr(), memory.len()) };
        s.put_bytes("shared_memory", &contents);
        Ok(s)
    }

    fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(STATE_VERSION, STATE_VERSION)?;
        if !self.is_master() {
            return Err(VmStateError::Mismatch("'peer' devices are not migratable".into()));
        }
        let memory = self.shared_memory()?;
        let data = s.get_bytes("shared_memory")?;
        if data.len() != memory.len() {
            return Err(VmStateError::Mismatch(format!(
                "{TYPE_IVSHMEM_PLAIN}: {} bytes of shared memory in the stream, {} here",
                data.len(),
                memory.len()
            )));
        }
        // SAFETY: `data.len()` bytes into the live mapping of that length.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), memory.as_ptr(), data.len()) };
        {
            let mut regs = self.regs.lock();
            regs.intrmask = s.get("intrmask")?;
            regs.intrstatus = s.get("intrstatus")?;
        }
        self.parent.load_pci_state(s)
    }
}

impl PciDeviceImpl for IvshmemPlain {
    const VENDOR_ID: u16 = 0x1af4;
    const DEVICE_ID: u16 = 0x1110;
    /// QEMU's `PCI_CLASS_MEMORY_RAM`.
    const CLASS_ID: u16 = 0x0500;
    const REVISION: u8 = 1;
    const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
    /// QEMU's default subsystem (`PCI_SUBDEVICE_ID_QEMU`).
    const SUBSYSTEM_ID: u16 = 0x1100;

    /// QEMU's `ivshmem_plain_realize` and `ivshmem_common_realize`.
    fn pci_realize(&self, _ctx: &DeviceContext) -> Result<(), RealizeError> {
        let obj = self.backend().map_err(RealizeError::device)?;
        let result = self.map_bars(&obj);
        if result.is_err() {
            if let Some(backend) = obj.cast::<HostMemoryBackend>() {
                backend.set_mapped(false);
            }
        }
        result
    }
}

impl IvshmemPlain {
    /// BAR 0 (the registers) and BAR 2 (the claimed backend's memory).
    fn map_bars(&self, obj: &ObjectRef) -> Result<(), RealizeError> {
        let backend = obj.cast::<HostMemoryBackend>().ok_or_else(|| RealizeError::device(IvshmemError::NotBackend))?;
        let name = self.memdev.get().unwrap_or_default();
        let memory = backend.memory().ok_or_else(|| RealizeError::device(IvshmemError::NotFound(name)))?;
        let registers = MemoryRegion::new_io("ivshmem-mmio", REG_BAR_SIZE, Arc::new(RegisterOps(self.regs.clone())));
        self.register_bar(0, BarKind::Mem32, registers)?;
        let bar2 = MemoryRegion::new_ram_device(
            "ivshmem.bar2",
            memory.len() as u64,
            Arc::new(SharedMemoryOps(memory.clone())),
            RamBacking {
                host_addr: memory.as_ptr() as u64,
                owner: memory.clone(),
            },
        );
        self.register_bar(2, BarKind::Mem64Prefetch, bar2)?;
        let _ = self.backend.set(obj.clone());
        let _ = self.memory.set(memory);
        Ok(())
    }
}
