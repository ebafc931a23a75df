//! `pc-testdev` (QEMU's `hw/misc/pc-testdev.c`): the ISA test device kvm-unit-tests use.
//!
//! * ports 0xe0-0xe3: a 32-bit scratch register; an access of n bytes at offset k reads or
//!   writes bytes k..k+n of it (little-endian);
//! * ports 0xe8-0xeb: the same register, accessed one byte at a time (QEMU's
//!   `ioport_byte`: a wider access is split into byte accesses);
//! * port 0xe4: "flush page": a write of a guest-physical address. QEMU
//!   (`test_flush_page_write`) flips the host mapping of that page to `PROT_NONE` and back,
//!   so that the kernel's MMU notifier makes KVM drop its mapping of the page; the guest's
//!   next access refaults it, with the same contents. Nothing a guest can observe changes
//!   (only the cost of that access, and under shadow paging when KVM re-sets accessed and
//!   dirty bits), and the `PROT_NONE` window would make any other thread touching the page
//!   (a device's I/O thread, vhost) fault, so qomvm accepts the write and does nothing;
//! * ports 0x2000-0x2017: a byte write of v to 0x2000 + n sets ISA IRQ n to `v != 0`
//!   (lines the ISA bus does not have are ignored);
//! * 64 KiB of scratch memory at 0xff000000 in `system-memory`: reads return what was
//!   written, at any size.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qom::type_init;

use crate::core::irq::IrqLine;
use crate::core::memory::{AddressSpace, MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::isa::isa_bus::IsaDevice;

/// QEMU's `TYPE_TESTDEV`.
pub const TYPE_PC_TESTDEV: &str = "pc-testdev";

/// The scratch register's port.
pub const PC_TESTDEV_IOPORT: u16 = 0xe0;
/// The flush-page port.
pub const PC_TESTDEV_FLUSH: u16 = 0xe4;
/// The byte view of the scratch register.
pub const PC_TESTDEV_IOPORT_BYTE: u16 = 0xe8;
/// The first IRQ-line port.
pub const PC_TESTDEV_IRQ: u16 = 0x2000;
/// Number of IRQ-line ports.
pub const PC_TESTDEV_IRQ_LINES: u64 = 24;
/// Guest-physical address of the scratch memory.
pub const PC_TESTDEV_IOMEM: u64 = 0xff00_0000;
/// Size of the scratch memory (QEMU's `IOMEM_LEN`).
pub const PC_TESTDEV_IOMEM_LEN: usize = 0x10000;

/// QEMU's `PCTestdev`: the scratch register and memory, and the MMIO mapping to undo.
#[derive(qom::Object)]
#[qom(name = TYPE_PC_TESTDEV, no_default)]
pub struct PcTestdev {
    #[parent]
    parent: IsaDevice,
    ioport_data: Arc<AtomicU32>,
    iomem: Arc<Mutex<Box<[u8]>>>,
    /// Where the scratch memory is mapped, once realized.
    iomem_mapping: Mutex<Option<(Arc<AddressSpace>, Arc<MemoryRegion>)>>,
}

impl Default for PcTestdev {
    fn default() -> Self {
        PcTestdev {
            parent: IsaDevice::default(),
            ioport_data: Arc::new(AtomicU32::new(0)),
            iomem: Arc::new(Mutex::new(vec![0; PC_TESTDEV_IOMEM_LEN].into_boxed_slice())),
            iomem_mapping: Mutex::new(None),
        }
    }
}

type_init!(PcTestdev);

/// QEMU's `test_ioport_read`/`test_ioport_write` on the 32-bit register.
struct ScratchPort {
    data: Arc<AtomicU32>,
    /// The byte view: wider accesses are split into byte accesses.
    bytewise: bool,
}

fn lane_mask(offset: u64, size: u32) -> (u32, u32) {
    let start_bit = ((offset & 3) * 8) as u32;
    let bits = (size.min(4) * 8).min(32 - start_bit);
    let mask = if bits == 32 {
        u32::MAX
    } else {
        ((1u32 << bits) - 1) << start_bit
    };
    (mask, start_bit)
}

impl ScratchPort {
    fn read_lane(&self, offset: u64, size: u32) -> u64 {
        let (mask, shift) = lane_mask(offset, size);
        u64::from((self.data.load(Ordering::Relaxed) & mask) >> shift)
    }

    fn write_lane(&self, offset: u64, value: u64, size: u32) {
        let (mask, shift) = lane_mask(offset, size);
        let bits = ((value as u32) << shift) & mask;
        let _ = self
            .data
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some((v & !mask) | bits)
            });
    }
}

impl MemoryRegionOps for ScratchPort {
    fn read(&self, offset: u64, size: u32) -> u64 {
        if !self.bytewise {
            return self.read_lane(offset, size);
        }
        (0..size.min(4)).fold(0, |v, i| {
            v | (self.read_lane(offset + u64::from(i), 1) << (8 * i))
        })
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if !self.bytewise {
            return self.write_lane(offset, value, size);
        }
        for i in 0..size.min(4) {
            self.write_lane(offset + u64::from(i), value >> (8 * i), 1);
        }
    }
}

/// QEMU's `test_flush_page_write`, without the `mprotect` (see the module docs): the port
/// is claimed, a write does nothing.
struct FlushPort;

impl MemoryRegionOps for FlushPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }

    fn write(&self, _offset: u64, _value: u64, _size: u32) {}
}

/// QEMU's `test_irq_line`: the device's ISA IRQ lines, taken at realize.
struct IrqPort {
    irqs: Vec<IrqLine>,
}

impl MemoryRegionOps for IrqPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        0
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mask = if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * size)) - 1
        };
        if let Some(irq) = self.irqs.get(offset as usize) {
            irq.set(value & mask != 0);
        }
    }
}

/// QEMU's `test_iomem_read`/`test_iomem_write`: plain memory.
struct IomemRegion {
    buf: Arc<Mutex<Box<[u8]>>>,
}

impl MemoryRegionOps for IomemRegion {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let buf = self.buf.lock();
        let start = offset as usize;
        let end = (start + size.min(8) as usize).min(buf.len());
        let mut bytes = [0u8; 8];
        if start < end {
            bytes[..end - start].copy_from_slice(&buf[start..end]);
        }
        u64::from_le_bytes(bytes)
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let mut buf = self.buf.lock();
        let start = offset as usize;
        let end = (start + size.min(8) as usize).min(buf.len());
        if start < end {
            buf[start..end].copy_from_slice(&value.to_le_bytes()[..end - start]);
        }
    }
}

impl DeviceImpl for PcTestdev {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let machine = ctx.machine()?;
        let irqs = (0..PC_TESTDEV_IRQ_LINES as usize)
            .map(|n| self.irq(ctx, n))
            .collect();
        let ports: [(u16, u64, &str, Arc<dyn MemoryRegionOps>); 4] = [
            (
                PC_TESTDEV_IOPORT,
                4,
                "pc-testdev-ioport",
                Arc::new(ScratchPort {
                    data: self.ioport_data.clone(),
                    bytewise: false,
                }),
            ),
            (
                PC_TESTDEV_FLUSH,
                4,
                "pc-testdev-flush-page",
                Arc::new(FlushPort),
            ),
            (
                PC_TESTDEV_IOPORT_BYTE,
                4,
                "pc-testdev-ioport-byte",
                Arc::new(ScratchPort {
                    data: self.ioport_data.clone(),
                    bytewise: true,
                }),
            ),
            (
                PC_TESTDEV_IRQ,
                PC_TESTDEV_IRQ_LINES,
                "pc-testdev-irq-line",
                Arc::new(IrqPort { irqs }),
            ),
        ];
        for (base, size, name, ops) in ports {
            // On failure the ISA device's unrealize is not run; unmap what was mapped here.
            if let Err(e) = self.register_ioport(ctx, MemoryRegion::new_io(name, size, ops), base) {
                DeviceImpl::unrealize(self, ctx);
                return Err(e);
            }
        }
        let iomem = MemoryRegion::new_io(
            "pc-testdev-iomem",
            PC_TESTDEV_IOMEM_LEN as u64,
            Arc::new(IomemRegion {
                buf: self.iomem.clone(),
            }),
        );
        let memory = machine.system_memory();
        if let Err(e) = memory.map(PC_TESTDEV_IOMEM, iomem.clone()) {
            DeviceImpl::unrealize(self, ctx);
            return Err(e.into());
        }
        *self.iomem_mapping.lock() = Some((memory.clone(), iomem));
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((memory, region)) = self.iomem_mapping.lock().take() {
            memory.unmap(&region);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_lanes_follow_qemus_masks() {
        let port = ScratchPort {
            data: Arc::new(AtomicU32::new(0)),
            bytewise: false,
        };
        port.write(0, 0x1122_3344, 4);
        assert_eq!(port.read(1, 1), 0x33);
        assert_eq!(port.read(2, 2), 0x1122);
        port.write(3, 0xff, 1);
        assert_eq!(port.read(0, 4), 0xff22_3344);
        // An unaligned dword keeps to the register's bytes.
        port.write(2, 0xaabb_ccdd, 4);
        assert_eq!(port.read(0, 4), 0xccdd_3344);
    }
}
