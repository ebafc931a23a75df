//! Hotplug handlers (QEMU's `hw/core/hotplug.c`, `TYPE_HOTPLUG_HANDLER`): the object a bus
//! names to plug devices in while the machine runs and to take them out when the guest
//! lets them go. On the pc machine that is `PIIX4_PM`, whose ACPI PCI hotplug registers
//! tell the guest a slot changed (QEMU's `hw/acpi/pcihp.c`).
//!
//! A bus without a handler takes no hotplugged devices (QEMU's `qbus_is_hotpluggable`).
//! Unplugging is a request: the handler asks the guest, and the guest's answer (an eject)
//! finishes it through [`qdev_unplug_complete`](crate::core::qdev::qdev_unplug_complete).

use qom::{Interface, Object};

/// The interface's QOM name.
pub const TYPE_HOTPLUG_HANDLER: &str = "hotplug-handler";

/// Why a plug or an unplug request was refused.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The device is not of a kind the handler knows (QEMU's handlers' own texts).
    #[error("{0}")]
    Unsupported(String),
}

/// QEMU's `HotplugHandlerClass`.
pub trait HotplugHandler: Send + Sync {
    /// `plug`: `dev` was realized on the handler's bus; `hotplugged` is false for devices
    /// created with the machine (the guest finds those at boot, no event is due).
    fn plug(&self, dev: &Object, hotplugged: bool) -> Result<(), HotplugError>;
    /// `unplug_request`: asks the guest to let `dev` go. The device stays until the guest
    /// answers; a repeated request asks again.
    fn unplug_request(&self, dev: &Object) -> Result<(), HotplugError>;
}

impl Interface for dyn HotplugHandler {
    const TYPE_NAME: &'static str = TYPE_HOTPLUG_HANDLER;
}

qom::interface_type!(dyn HotplugHandler);
