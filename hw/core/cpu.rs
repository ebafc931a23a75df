//! The abstract CPU device (QEMU's `hw/core/cpu-common.c`): what every CPU model has.

use std::sync::atomic::{AtomicU32, Ordering};

use qom::{type_init, Object, ObjectClass, Property, PropertyKind, Value};

use crate::core::qdev::{device_class_mut, DeviceCategory, TYPE_DEVICE};

/// QEMU's `TYPE_CPU`.
pub const TYPE_CPU: &str = "cpu";

/// Applies `-cpu` options to a CPU (QEMU's `CPUClass::parse_features`).
pub type ParseFeaturesFn = fn(&Object, &str) -> Result<(), qom::Error>;

/// QEMU's `CPUClass`: what `-cpu help` shows of a model.
#[derive(Clone, Debug, Default)]
pub struct CpuClass {
    /// One-line description of the model.
    pub model_description: Option<&'static str>,
    /// The `-cpu` name (the type name without the architecture suffix).
    pub model_name: &'static str,
    /// Applies the options after the model in `-cpu MODEL,opts` to a new CPU (QEMU's
    /// `CPUClass::parse_features`).
    pub parse_features: Option<ParseFeaturesFn>,
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

/// Errors of creating the machine's CPUs.
#[derive(Debug, thiserror::Error)]
pub enum CpuCreateError {
    /// The machine has no CPU type.
    #[error("machine has no CPU type: use -cpu")]
    NoCpuType,
    /// Creating or realizing a CPU failed.
    #[error(transparent)]
    Qdev(#[from] crate::core::qdev::QdevError),
    /// A QOM error.
    #[error(transparent)]
    Qom(#[from] qom::Error),
}

/// QEMU's `x86_cpus_init`/`cpu_create` loop: creates and realizes the `-smp` CPUs of
/// `machine`, each under `/machine/unattached`, with index, APIC ID and `-cpu` options.
pub fn machine_create_cpus(machine: &qom::ObjectRef) -> Result<(), CpuCreateError> {
    use crate::core::machine::machine_state;
    let ms = machine_state(machine).expect("machines have a MachineState");
    let cpu_type = ms.cpu_type().ok_or(CpuCreateError::NoCpuType)?;
    let options = ms.cpu_options();
    let smp = ms.smp();
    let unattached = qom::container_get(machine, "unattached");
    for index in 0..smp.cpus {
        let cpu = crate::core::qdev::qdev_new(&cpu_type)?;
        cpu.downcast::<CpuState>()
            .expect("CPUs have a CpuState part")
            .set_index(index);
        if cpu.find_property("apic-id").is_some() {
            let apic_id = crate::i386::x86_cpu::apic_id_from_index(index, smp.cores, smp.threads);
            cpu.property_set("apic-id", Value::Uint(apic_id.into()))?;
        }
        if let Some(parse) = cpu.class().get::<CpuClass>().and_then(|c| c.parse_features) {
            parse(&cpu, &options)?;
        }
        unattached.add_child("device[*]", &cpu)?;
        crate::core::qdev::qdev_realize(&cpu, None)?;
        ms.add_cpu(cpu);
    }
    Ok(())
}
