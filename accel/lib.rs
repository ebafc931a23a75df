//! qomvm's accelerators (QEMU's `accel/`): the abstract `accel` type with `AccelClass`, and
//! the concrete accelerators, each a QOM type found by name (`-accel kvm` -> `kvm-accel`).

#![deny(missing_docs)]

#[path = "accel_system.rs"]
pub mod accel_system;
#[path = "qtest/qtest.rs"]
pub mod qtest;

/// The KVM accelerator (QEMU's `accel/kvm/`, `target/i386/kvm/`).
pub mod kvm {
    #[path = "cpuid_cache.rs"]
    pub(crate) mod cpuid_cache;
    #[path = "hyperv.rs"]
    pub mod hyperv;
    #[path = "kvm_all.rs"]
    pub mod kvm_all;
    #[path = "kvm_coalesced.rs"]
    pub mod kvm_coalesced;
    #[path = "kvm_cpus.rs"]
    pub mod kvm_cpus;
    #[path = "kvm_irq.rs"]
    pub mod kvm_irq;
    #[path = "kvm_state.rs"]
    pub mod kvm_state;
    #[path = "x86.rs"]
    pub mod x86;
}

pub use accel_system::{
    accel_find, accel_init_machine, accel_list, Accel, AccelClass, AccelError, AccelImpl,
    AccelState, TYPE_ACCEL,
};

/// Keeps this crate's registrations linked into a binary (see `hw::init`).
pub fn init() -> Result<&'static qom::TypeTable, hw::RegistrationError> {
    let table = hw::init()?;
    debug_assert!(table.lookup(TYPE_ACCEL).is_some());
    Ok(table)
}
