//! The abstract accelerator (QEMU's `accel/accel-common.c`, `accel-system.c`).

use qom::{type_init, Object, ObjectClass, ObjectRef};

/// QEMU's `TYPE_ACCEL`.
pub const TYPE_ACCEL: &str = "accel";
/// Suffix of accelerator type names (`kvm-accel`).
pub const ACCEL_SUFFIX: &str = "-accel";

/// Initialises an accelerator for a machine (QEMU's `AccelClass::init_machine`).
pub type InitMachineFn = fn(accel: &ObjectRef, machine: &ObjectRef) -> Result<(), AccelError>;

/// QEMU's `AccelClass`.
#[derive(Clone, Debug, Default)]
pub struct AccelClass {
    /// The `-accel` name: the type name without `-accel` (set by class_base_init).
    pub name: &'static str,
    /// Prepares the accelerator for `machine` before board init.
    pub init_machine: Option<InitMachineFn>,
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

fn accel_class_init(class: &mut ObjectClass) {
    class.insert(AccelClass::default());
}

fn accel_class_base_init(class: &mut ObjectClass) {
    let type_name = class.name();
    let name = type_name.strip_suffix(ACCEL_SUFFIX).unwrap_or(type_name);
    if let Some(ac) = class.get_mut::<AccelClass>() {
        ac.name = name;
    }
}

type_init! {
    name: TYPE_ACCEL,
    parent: Some(qom::TYPE_OBJECT),
    abstract_: true,
    class_init: Some(accel_class_init),
    class_base_init: Some(accel_class_base_init),
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
    if let Some(init) = class.get::<AccelClass>().and_then(|ac| ac.init_machine) {
        init(&accel, machine)?;
    }
    if let Some(ms) = hw::core::machine::machine_state(machine) {
        ms.set_accel(accel.clone());
    }
    Ok(accel)
}
