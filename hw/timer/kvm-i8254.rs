//! `kvm-pit` (QEMU's `hw/i386/kvm/i8254.c`): the i8254 timer lives in KVM, which handles
//! ports 0x40-0x43 itself; this device is its QOM face, so that
//! `-global kvm-pit.lost_tick_policy=discard` reaches it.

use qom::{type_init, Error, Object, ObjectClass, Property};

use crate::core::machine::{machine_of, machine_state};
use crate::core::qdev::{device_class_mut, device_class_set_props, DeviceCategory};
use crate::isa::isa_bus::TYPE_ISA_DEVICE;

/// QEMU's `TYPE_KVM_I8254`.
pub const TYPE_KVM_PIT: &str = "kvm-pit";

const PROPERTIES: &[Property] = &[
    Property::uint("iobase", 32, 0x40, "I/O base (KVM decodes the ports)"),
    // QEMU's kvm-pit accepts these two of LostTickPolicy's values.
    Property::enumeration(
        "lost_tick_policy",
        "LostTickPolicy",
        &["delay", "discard"],
        "delay",
        "What to do with ticks the guest missed: re-inject them (delay) or drop them",
    ),
];

fn kvm_pit_realize(dev: &Object) -> Result<(), Error> {
    let reinject = dev.prop_str("lost_tick_policy")? == "delay";
    if let Some(ops) = machine_of(dev).as_deref().and_then(machine_state).and_then(|ms| ms.accel_ops()) {
        ops.set_pit_reinject(reinject)?;
    }
    Ok(())
}

fn kvm_pit_class_init(class: &mut ObjectClass) {
    device_class_set_props(class, PROPERTIES);
    let dc = device_class_mut(class);
    dc.realize = Some(kvm_pit_realize);
    dc.category = DeviceCategory::Misc;
    dc.user_creatable = false;
}

type_init! {
    name: TYPE_KVM_PIT,
    parent: Some(TYPE_ISA_DEVICE),
    class_init: Some(kvm_pit_class_init),
}
