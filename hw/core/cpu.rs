//! The abstract CPU device (QEMU's `hw/core/cpu-common.c`): what every CPU model has, and
//! the board's loop that creates the `-smp` CPUs.

use std::sync::atomic::{AtomicU32, Ordering};

use qom::{
    type_init, ClassInitFor, ObjectClass, ObjectRef, Property, PropertyKind, StateAccessor,
    Value,
};

use crate::core::machine::{MachineState, SmpConfig};
use crate::core::qdev::{
    device_class_init, qdev_new, qdev_realize, DeviceCategory, DeviceImpl, DeviceState,
};

/// QEMU's `TYPE_CPU`.
pub const TYPE_CPU: &str = "cpu";

/// QEMU's `CPUClass`: what `-cpu help` shows of a model, derived from its [`CpuImpl`].
#[derive(Clone, Debug, Default)]
pub struct CpuClass {
    /// One-line description of the model.
    pub model_description: Option<&'static str>,
    /// The `-cpu` name (the type name without the architecture suffix).
    pub model_name: &'static str,
    /// The CPU's methods, as a trait object.
    cpu: Option<qom::ImplCast<dyn Cpu>>,
}

/// A CPU model: QEMU's `CPUClass` constants and methods as a trait.
pub trait CpuImpl: DeviceImpl {
    /// The `-cpu` name.
    const MODEL_NAME: &'static str = "";
    /// `-cpu help`'s description.
    const MODEL_DESCRIPTION: Option<&'static str> = None;

    /// Places CPU `index` in the `-smp` topology before realize (the x86 board's APIC ID).
    fn set_topology(&self, _index: u32, _smp: &SmpConfig) {}
    /// Applies the options after the model in `-cpu MODEL,opts` (QEMU's
    /// `CPUClass::parse_features`).
    fn parse_features(&self, _cpu: &ObjectRef, _options: &str) -> Result<(), qom::Error> {
        Ok(())
    }
}

/// The dynamically dispatched half of [`CpuImpl`].
pub trait Cpu: Send + Sync {
    /// [`CpuImpl::set_topology`].
    fn set_topology(&self, index: u32, smp: &SmpConfig);
    /// [`CpuImpl::parse_features`].
    fn parse_features(&self, cpu: &ObjectRef, options: &str) -> Result<(), qom::Error>;
}

impl<T: CpuImpl> Cpu for T {
    fn set_topology(&self, index: u32, smp: &SmpConfig) {
        CpuImpl::set_topology(self, index, smp)
    }
    fn parse_features(&self, cpu: &ObjectRef, options: &str) -> Result<(), qom::Error> {
        CpuImpl::parse_features(self, cpu, options)
    }
}

fn as_cpu<T: CpuImpl>(obj: &qom::Object) -> Option<&(dyn Cpu + 'static)> {
    obj.downcast::<T>().map(|c| c as &dyn Cpu)
}

/// `cpu`'s class_init of each CPU type.
impl<T: CpuImpl> ClassInitFor<T> for CpuState {
    fn class_init(class: &mut ObjectClass) {
        device_class_init::<T>(class);
        class.insert(CpuClass {
            model_description: T::MODEL_DESCRIPTION,
            model_name: T::MODEL_NAME,
            cpu: Some(as_cpu::<T>),
        });
    }
}

/// QEMU's `CPUState`: what every CPU instance has.
#[derive(qom::Object)]
#[qom(name = TYPE_CPU, abstract, class_level)]
pub struct CpuState {
    #[parent]
    parent: DeviceState,
    index: AtomicU32,
}

type_init!(CpuState {
    class_init: Some(cpu_base_class_init),
});

impl DeviceImpl for CpuState {
    const CATEGORY: DeviceCategory = DeviceCategory::Cpu;
    // CPUs are created by the board from -smp, not with -device.
    const USER_CREATABLE: bool = false;
}

impl CpuImpl for CpuState {}

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

static CPU_INDEX: StateAccessor<CpuState> = StateAccessor {
    get: |cpu, _| Value::Uint(cpu.index().into()),
    set: None,
};

fn cpu_base_class_init(class: &mut ObjectClass) {
    <DeviceState as ClassInitFor<CpuState>>::class_init(class);
    class.insert(CpuClass::default());
    class.add_property(Property::state(
        "cpu-index",
        PropertyKind::Uint(32),
        "The CPU's index",
        &CPU_INDEX,
    ));
}

/// The CPU methods of `obj`, if it is a CPU.
pub fn cpu_impl(obj: &qom::Object) -> Option<&dyn Cpu> {
    obj.class().get::<CpuClass>().and_then(|cc| cc.cpu?(obj))
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

/// QEMU's `x86_cpus_init`/`cpu_create` loop: creates and realizes the `-smp` CPUs of the
/// machine, each under `/machine/unattached`, placed in the topology and with the `-cpu`
/// options, and waits until every vCPU is set up.
pub fn machine_create_cpus(ms: &MachineState) -> Result<(), CpuCreateError> {
    machine_start_cpus(ms)?;
    Ok(ms.wait_cpus_created()?)
}

/// [`machine_create_cpus`] without the wait: the vCPUs set themselves up (a dozen ioctls
/// each) while the board goes on with its devices; `machine_creation_done` waits for them
/// ([`MachineState::wait_cpus_created`]), before anything runs.
pub fn machine_start_cpus(ms: &MachineState) -> Result<(), CpuCreateError> {
    let cpu_type = ms.cpu_type().ok_or(CpuCreateError::NoCpuType)?;
    let options = ms.cpu_options();
    let smp = ms.smp();
    let unattached = qom::container_get(&ms.object(), "unattached");
    if let Some(accel) = ms.accel_ops() {
        accel.create_vcpus_in_parallel();
    }
    let created = (0..smp.cpus).try_for_each(|index| -> Result<(), CpuCreateError> {
        let cpu = qdev_new(&cpu_type)?;
        if let Some(state) = cpu.downcast::<CpuState>() {
            state.set_index(index);
            state.set_services(ms.services());
        }
        if let Some(methods) = cpu_impl(&cpu) {
            methods.set_topology(index, &smp);
            methods.parse_features(&cpu, &options)?;
        }
        unattached.add_child("device[*]", &cpu)?;
        qdev_realize(&cpu, None)?;
        ms.add_cpu(cpu);
        Ok(())
    });
    if created.is_err() {
        // The threads started so far are waited for: the creation's error is the one told.
        let _ = ms.wait_cpus_created();
    }
    created
}
