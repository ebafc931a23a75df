//! `pci-testdev` (QEMU's `hw/misc/pci-testdev.c`, 1b36:0005): a PCI device for hypervisor
//! test suites. BAR 0 (memory) and BAR 1 (I/O) each hold a list of tests; writing a test's
//! number to offset 0 selects it, its header reads back from the BAR, and every write of
//! the header's data to the header's offset increments the header's count.

use std::sync::Arc;

use parking_lot::Mutex;
use qom::type_init;

use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_PCI_TEST_DEV`.
pub const TYPE_PCI_TEST_DEV: &str = "pci-testdev";

/// QEMU's `PCITestDevState`; its test lists live in the BARs' handlers.
#[derive(qom::Object)]
#[qom(name = TYPE_PCI_TEST_DEV, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct PciTestDev {
    #[parent]
    parent: PciDevice,
}

type_init!(PciTestDev);

/// Size of the memory BAR (QEMU's `IOTEST_MEMSIZE * 2`).
const MEM_BAR_SIZE: u64 = 4096;
/// Size of the I/O BAR (QEMU's `IOTEST_IOSIZE * 2`).
const IO_BAR_SIZE: u64 = 256;

/// The tests every BAR offers, as QEMU names them. Their data registers sit in the upper
/// half of the BAR, one 4-byte slot per test, clear of the header.
const TESTS: &[&str] = &["no-eventfd", "wildcard-eventfd", "datamatch-eventfd"];
/// The value a test's write must carry to count.
const TEST_DATA: u32 = 0x1234_5678;

/// One test's header, laid out as QEMU's `PCITestDevHdr`: test (u8), width (u8), 2 pad
/// bytes, offset (u32), data (u32), count (u32), then the NUL-terminated name.
struct Test {
    width: u8,
    offset: u32,
    count: u32,
    name: &'static str,
}

impl Test {
    fn header(&self, index: u8) -> Vec<u8> {
        let mut h = vec![index, self.width, 0, 0];
        h.extend_from_slice(&self.offset.to_le_bytes());
        h.extend_from_slice(&TEST_DATA.to_le_bytes());
        h.extend_from_slice(&self.count.to_le_bytes());
        h.extend_from_slice(self.name.as_bytes());
        h.push(0);
        h
    }
}

/// One BAR's tests and the selected one.
struct TestBar {
    tests: Mutex<(usize, Vec<Test>)>,
}

impl TestBar {
    fn new(size: u64, width: u8) -> Self {
        let tests = TESTS
            .iter()
            .enumerate()
            .map(|(i, name)| Test {
                width,
                offset: (size / 2) as u32 + 4 * i as u32,
                count: 0,
                name,
            })
            .collect();
        TestBar {
            tests: Mutex::new((0, tests)),
        }
    }
}

impl MemoryRegionOps for TestBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let guard = self.tests.lock();
        let (current, tests) = &*guard;
        let header = tests[*current].header(*current as u8);
        let mut value = 0u64;
        for i in 0..size.min(8) as usize {
            let byte = header.get(offset as usize + i).copied().unwrap_or(0);
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn write(&self, offset: u64, value: u64, _size: u32) {
        let mut guard = self.tests.lock();
        let (current, tests) = &mut *guard;
        if offset == 0 {
            if (value as usize) < tests.len() {
                *current = value as usize;
            }
            return;
        }
        if let Some(test) = tests.iter_mut().find(|t| u64::from(t.offset) == offset) {
            // The eventfd flavours in QEMU differ in how KVM signals them; without
            // ioeventfd every flavour counts matching writes here.
            let matches = test.name != "datamatch-eventfd" || value as u32 == TEST_DATA;
            if matches {
                test.count += 1;
            }
        }
    }
}

impl DeviceImpl for PciTestDev {
    const DESCRIPTION: Option<&'static str> = Some("PCI Test Device");
}

impl PciDeviceImpl for PciTestDev {
    const VENDOR_ID: u16 = 0x1b36;
    const DEVICE_ID: u16 = 0x0005;
    const REVISION: u8 = 0;
    const CLASS_ID: u16 = 0x00ff;

    fn pci_realize(&self, _ctx: &DeviceContext) -> Result<(), RealizeError> {
        let mmio = MemoryRegion::new_io(
            "pci-testdev-mmio",
            MEM_BAR_SIZE,
            Arc::new(TestBar::new(MEM_BAR_SIZE, 4)),
        );
        let portio = MemoryRegion::new_io(
            "pci-testdev-portio",
            IO_BAR_SIZE,
            Arc::new(TestBar::new(IO_BAR_SIZE, 4)),
        );
        self.register_bar(0, BarKind::Mem32, mmio)?;
        self.register_bar(1, BarKind::Io, portio)?;
        Ok(())
    }
}
