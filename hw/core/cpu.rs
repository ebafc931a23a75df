//! The abstract CPU device (QEMU's `hw/core/cpu-common.c`): what every CPU model has.

use std::sync::atomic::{AtomicU32, Ordering};

use qom::{type_init, Object, ObjectClass, Property, PropertyKind, Value};

use crate::core::qdev::{device_class_mut, DeviceCategory, TYPE_DEVICE};

/// QEMU's `TYPE_CPU`.
pub const TYPE_CPU: &str = "cpu";

/// QEMU's `CPUClass`: what `-cpu help` shows of a model.
#[derive(Clone, Debug, Default)]
pub struct CpuClass {
    /// One-line description of the model.
    pub model_description: Option<&'static str>,
    /// The `-cpu` name (the type name without the architecture suffix).
    pub model_name: &'static str,
}

/// QEMU's `CPUState`: what every CPU instance has.
#[derive(Default)]
pub struct CpuState {
    index: AtomicU32,
}

impl CpuState {
    /// The CPU's index (`cpu_index`).
    pub fn index(&self) -> u32 {
        self.index.load(Ordering::Relaxed)
    }
    /// Sets the index before realize.
    pub fn set_index(&self, index: u32) {
        self.index.store(index, Ordering::Relaxed);
    }
}

fn get_index(obj: &Object, _: &Property) -> Result<Value, qom::Error> {
    let st = obj.downcast::<CpuState>().expect("CPUs have a CpuState part");
    Ok(Value::Uint(st.index().into()))
}

fn cpu_class_init(class: &mut ObjectClass) {
    class.insert(CpuClass::default());
    class.add_property(Property::custom(
        "cpu-index",
        PropertyKind::Uint(32),
        Some(get_index),
        None,
        "The CPU's index",
    ));
    let dc = device_class_mut(class);
    dc.category = DeviceCategory::Cpu;
    // CPUs are created by the board from -smp, not with -device.
    dc.user_creatable = false;
}

type_init! {
    name: TYPE_CPU,
    parent: Some(TYPE_DEVICE),
    abstract_: true,
    class_init: Some(cpu_class_init),
    instance: Some(qom::InstanceSpec::of::<CpuState>()),
}
