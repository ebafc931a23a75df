//! The `qtest` accelerator (QEMU's `accel/qtest/qtest.c`): runs no guest code. The machine
//! and its devices are built as usual, and tests drive the buses directly, so device models
//! are tested on every machine, with or without `/dev/kvm`.

use qom::{type_init, ObjectClass, ObjectRef};

use crate::accel_system::{AccelClass, AccelError, TYPE_ACCEL};

/// QEMU's `TYPE_QTEST_ACCEL`.
pub const TYPE_QTEST_ACCEL: &str = "qtest-accel";

fn qtest_init_machine(_accel: &ObjectRef, _machine: &ObjectRef) -> Result<(), AccelError> {
    // Nothing to set up: no guest code runs, memory and ports are reached through the
    // machine's address spaces.
    Ok(())
}

fn qtest_accel_class_init(class: &mut ObjectClass) {
    if let Some(ac) = class.get_mut::<AccelClass>() {
        ac.init_machine = Some(qtest_init_machine);
    }
}

type_init! {
    name: TYPE_QTEST_ACCEL,
    parent: Some(TYPE_ACCEL),
    class_init: Some(qtest_accel_class_init),
}
