//! `pc-testdev` on the qtest accelerator: the scratch register, IRQ lines and scratch
//! memory as kvm-unit-tests drive them.

use hw::core::machine::machine_state;
use hw::core::qdev::qdev_unrealize;
use hw::misc::pc_testdev::*;
use qom::ObjectRef;
use test_support::qtest::{irq_level, machine_with_isa_bus, plug};

/// A `none` machine on qtest with RAM, an ISA bus wired to the accelerator's GSIs, and a
/// `pc-testdev`.
fn machine_with_testdev() -> (ObjectRef, ObjectRef) {
    let (machine, bus) = machine_with_isa_bus();
    machine_state(&machine)
        .unwrap()
        .add_ram(0, 1 << 20)
        .unwrap();
    let dev = plug(&machine, &bus, TYPE_PC_TESTDEV, &[]);
    (machine, dev)
}

#[test]
fn the_scratch_register_keeps_bytes_words_and_dwords() {
    let (machine, _dev) = machine_with_testdev();
    let io = machine_state(&machine).unwrap().system_io().clone();
    io.write(0xe0, 0x1234_5678, 4);
    assert_eq!(io.read(0xe0, 4), 0x1234_5678);
    assert_eq!(io.read(0xe1, 1), 0x56);
    assert_eq!(io.read(0xe2, 2), 0x1234);
    io.write(0xe3, 0xab, 1);
    io.write(0xe0, 0xcdef, 2);
    assert_eq!(io.read(0xe0, 4), 0xab34_cdef);
    // The byte view at 0xe8 is the same register.
    assert_eq!(io.read(0xe8, 4), 0xab34_cdef);
    assert_eq!(io.read(0xea, 1), 0x34);
    io.write(0xe8, 0x0102_0304, 4);
    assert_eq!(io.read(0xe0, 4), 0x0102_0304);
    io.write(0xe9, 0xff, 1);
    assert_eq!(io.read(0xe0, 4), 0x0102_ff04);
}

#[test]
fn a_write_to_0x2000_plus_n_sets_isa_irq_n() {
    let (machine, _dev) = machine_with_testdev();
    let io = machine_state(&machine).unwrap().system_io().clone();
    assert!(!irq_level(&machine, 5));
    io.write(0x2005, 1, 1);
    assert!(irq_level(&machine, 5));
    io.write(0x200e, 0x80, 1);
    assert!(irq_level(&machine, 14));
    io.write(0x2005, 0, 1);
    assert!(!irq_level(&machine, 5));
    assert!(irq_level(&machine, 14));
    // Lines 16..23 are not on the ISA bus: ignored.
    io.write(0x2017, 1, 1);
    assert!(!irq_level(&machine, 23));
}

#[test]
fn the_scratch_memory_returns_what_was_written() {
    let (machine, _dev) = machine_with_testdev();
    let mem = machine_state(&machine).unwrap().system_memory().clone();
    mem.write(PC_TESTDEV_IOMEM, 0x1122_3344_5566_7788, 8);
    assert_eq!(mem.read(PC_TESTDEV_IOMEM, 8), 0x1122_3344_5566_7788);
    assert_eq!(mem.read(PC_TESTDEV_IOMEM + 2, 2), 0x5566);
    mem.write(PC_TESTDEV_IOMEM + 0xfffc, 0xdead_beef, 4);
    assert_eq!(mem.read(PC_TESTDEV_IOMEM + 0xfffe, 2), 0xdead);
    assert_eq!(mem.read(PC_TESTDEV_IOMEM + 0xfffc, 1), 0xef);
    // Just past it: nothing.
    assert_eq!(mem.read(PC_TESTDEV_IOMEM + 0x10000, 1), 0xff);
}

#[test]
fn unrealize_unmaps_ports_and_memory() {
    let (machine, dev) = machine_with_testdev();
    let ms = machine_state(&machine).unwrap();
    assert_eq!(ms.system_io().flat_view().ranges().len(), 4);
    assert_eq!(ms.system_memory().flat_view().ranges().len(), 1);
    qdev_unrealize(&dev);
    assert!(ms.system_io().flat_view().ranges().is_empty());
    assert!(ms.system_memory().flat_view().ranges().is_empty());
}
