//! The abstract accelerator (QEMU's `accel/accel-common.c`, `accel-system.c`).

use hw::core::machine::{machine_state, MachineState};
use qom::{type_init, ClassInitFor, Object, ObjectBase, ObjectClass, ObjectRef, ObjectType};

/// QEMU's `TYPE_ACCEL`.
pub const TYPE_ACCEL: &str = "accel";
/// Suffix of accelerator type names (`kvm-accel`).
pub const ACCEL_SUFFIX: &str = "-accel";

/// QEMU's `AccelClass`: derived from the accelerator's [`AccelImpl`].
#[derive(Clone, Debug, Default)]
pub struct AccelClass {
    /// The `-accel` name: the type name without `-accel`.
    pub name: &'static str,
    accel: Option<qom::ImplCast<dyn Accel>>,
}

/// An accelerator type: QEMU's `AccelClass` methods as a trait.
pub trait AccelImpl: ObjectType {
    /// Prepares the accelerator for `machine` before board init (QEMU's
    /// `AccelClass::init_machine`): installs its operations in the machine.
    fn init_machine(&self, machine: &MachineState) -> Result<(), AccelError>;
}

/// The dynamically dispatched [`AccelImpl`].
pub trait Accel: Send + Sync {
    /// [`AccelImpl::init_machine`].
    fn init_machine(&self, machine: &MachineState) -> Result<(), AccelError>;
}

impl<T: AccelImpl> Accel for T {
    fn init_machine(&self, machine: &MachineState) -> Result<(), AccelError> {
        AccelImpl::init_machine(self, machine)
    }
}

fn as_accel<T: AccelImpl>(obj: &Object) -> Option<&(dyn Accel + 'static)> {
    obj.downcast::<T>().map(|a| a as &dyn Accel)
}

/// QEMU's `AccelState`.
#[derive(qom::Object)]
#[qom(name = TYPE_ACCEL, abstract, class_level)]
pub struct AccelState {
    #[parent]
    parent: ObjectBase,
}

type_init!(AccelState);

/// `accel`'s class_init of each accelerator type.
impl<T: AccelImpl> ClassInitFor<T> for AccelState {
    fn class_init(class: &mut ObjectClass) {
        qom::object_class_init::<T>(class);
        let type_name = T::TYPE_NAME;
        class.insert(AccelClass {
            name: type_name.strip_suffix(ACCEL_SUFFIX).unwrap_or(type_name),
            accel: Some(as_accel::<T>),
        });
    }
}

/// Errors of choosing and starting an accelerator, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `-accel` names no accelerator.
    #[error("invalid accelerator {0}")]
    Unknown(String),
    /// Every accelerator of the list failed.
    #[error("no accelerator found")]
    NoneWorked,
    /// An accelerator-specific failure.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
    /// A QOM error.
    #[error(transparent)]
    Qom(#[from] qom::Error),
}

/// QEMU's `accel_find`: the class of `-accel name`.
pub fn accel_find(name: &str) -> Option<&'static ObjectClass> {
    qom::object_class_by_name(&format!("{name}{ACCEL_SUFFIX}"))
        .filter(|c| c.is_a(TYPE_ACCEL) && !c.is_abstract())
}

/// Every accelerator, sorted by `-accel` name.
pub fn accel_list() -> Vec<&'static AccelClass> {
    let mut list: Vec<_> = qom::object_class_get_list(Some(TYPE_ACCEL), false)
        .into_iter()
        .filter_map(|c| c.get::<AccelClass>())
        .collect();
    list.sort_by_key(|ac| ac.name);
    list
}

/// QEMU's `accel_init_machine`: instantiates the accelerator and initialises it for
/// `machine`. On success the machine records it.
pub fn accel_init_machine(
    class: &'static ObjectClass,
    machine: &ObjectRef,
) -> Result<ObjectRef, AccelError> {
    let accel = Object::new_with_class(class)?;
    let ms = machine_state(machine).ok_or(AccelError::NoneWorked)?;
    if let Some(methods) = class.get::<AccelClass>().and_then(|ac| ac.accel?(&accel)) {
        methods.init_machine(ms)?;
    }
    ms.set_accel(accel.clone());
    Ok(accel)
}
