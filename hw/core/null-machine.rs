//! The `none` machine (QEMU's `hw/core/null-machine.c`): no devices, no RAM unless `-m` asks
//! for it, at most one CPU. Useful to inspect types and accelerators without a board.

use qom::{type_init, ObjectClass};

use crate::core::machine::{machine_class_mut, TYPE_MACHINE};

fn machine_none_class_init(class: &mut ObjectClass) {
    let mc = machine_class_mut(class);
    mc.desc = "empty machine";
    mc.max_cpus = 1;
    mc.default_ram_size = 0;
}

type_init! {
    name: "none-machine",
    parent: Some(TYPE_MACHINE),
    class_init: Some(machine_none_class_init),
}
