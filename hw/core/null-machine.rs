//! The `none` machine (QEMU's `hw/core/null-machine.c`): no devices, no RAM unless `-m` asks
//! for it, at most one CPU. Useful to inspect types and accelerators without a board.

use qom::{type_init, Error, ObjectClass, ObjectRef};

use crate::core::cpu::machine_create_cpus;
use crate::core::machine::{machine_class_mut, machine_state, TYPE_MACHINE};

/// QEMU's `machine_none_init`: RAM at address 0 if `-m` asks for it, one CPU if `-cpu`
/// names one.
fn machine_none_init(machine: &ObjectRef) -> Result<(), Error> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    if ms.ram_size() > 0 {
        ms.add_ram(0, ms.ram_size()).map_err(Error::other)?;
    }
    if ms.cpu_type().is_some() {
        machine_create_cpus(machine).map_err(Error::other)?;
    }
    Ok(())
}

fn machine_none_class_init(class: &mut ObjectClass) {
    let mc = machine_class_mut(class);
    mc.desc = "empty machine";
    mc.max_cpus = 1;
    mc.default_ram_size = 0;
    mc.init = Some(machine_none_init);
}

type_init! {
    name: "none-machine",
    parent: Some(TYPE_MACHINE),
    class_init: Some(machine_none_class_init),
}
