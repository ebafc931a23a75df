//! `kvm-pit` (QEMU's `hw/i386/kvm/i8254.c`): the i8254 timer lives in KVM, which handles
//! ports 0x40-0x43 itself; this device creates it at realize (`KVM_CREATE_PIT2`) and is
//! its QOM face, so that `-global kvm-pit.lost_tick_policy=discard` reaches it. A pc
//! machine with `pit=off` does not create it, and then has no PIT at all.

use std::sync::{Arc, OnceLock};

use qom::{type_init, Prop};

use crate::core::accel_ops::AccelOpsRef;

use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::isa::isa_bus::IsaDevice;

/// QEMU's `TYPE_KVM_I8254`.
pub const TYPE_KVM_PIT: &str = "kvm-pit";

pub use crate::core::qdev_properties::LostTickPolicy;

#[derive(Debug, thiserror::Error)]
#[error("Lost tick policy not supported.")]
struct UnsupportedPolicy;

/// QEMU's `KVMPITState`.
#[derive(qom::Object)]
#[qom(name = TYPE_KVM_PIT)]
pub struct KvmPit {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0x40, desc = "I/O base (KVM decodes the ports)")]
    iobase: Prop<u32>,
    #[property(
        default = "delay",
        desc = "What to do with ticks the guest missed: re-inject them (delay) or drop them"
    )]
    lost_tick_policy: Prop<LostTickPolicy>,
    /// The accelerator holding the PIT, from realize on.
    ops: OnceLock<AccelOpsRef>,
}

type_init!(KvmPit);

impl KvmPit {
    /// The `lost_tick_policy` property.
    pub fn lost_tick_policy(&self) -> LostTickPolicy {
        self.lost_tick_policy.get()
    }
}

impl DeviceImpl for KvmPit {
    // The PIT's state is KVM's, saved with the accelerator's VM section.
    const STATELESS: bool = true;
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const USER_CREATABLE: bool = false;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let reinject = match self.lost_tick_policy.get() {
            LostTickPolicy::Delay => true,
            LostTickPolicy::Discard => false,
            // KVM's PIT re-injects one tick per tick or drops them: no catching up.
            LostTickPolicy::Slew => return Err(RealizeError::device(UnsupportedPolicy)),
        };
        let services = ctx.machine()?;
        let Some(ops) = services.accel_ops() else {
            return Ok(());
        };
        ops.create_in_kernel_pit(reinject)?;
        // QEMU resets the machine before it first runs: the PIT starts as its reset
        // leaves it.
        ops.reset_pit()?;
        // QEMU's `kvm_pit_vm_state_change`: a VM that runs again starts channel 0's
        // period afresh, without a burst of the ticks it missed while stopped.
        let restart_ops = ops.clone();
        services.vm().add_change_handler(
            0,
            Arc::new(move |running, _| {
                if running {
                    if let Err(e) = restart_ops.reload_pit() {
                        log::warn!("kvm-pit: {e}");
                    }
                }
            }),
        );
        let _ = self.ops.set(ops.clone());
        Ok(())
    }

    fn reset(&self) {
        if let Some(ops) = self.ops.get() {
            if let Err(e) = ops.reset_pit() {
                log::warn!("kvm-pit: {e}");
            }
        }
    }
}
