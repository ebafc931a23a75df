//! `-global DRIVER.PROP=VALUE` (QEMU's `qdev_prop_register_global`) and the machine's
//! compat properties.
//!
//! Globals apply to every device of type DRIVER (or a subtype) when it is created, after the
//! class defaults and before the `-device` options, as QEMU's `device_post_init` does.

use parking_lot::RwLock;
use qom::{Error, Object};

/// One `-global`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalProperty {
    /// The type it applies to.
    pub driver: String,
    /// The property.
    pub property: String,
    /// The value, as typed.
    pub value: String,
}

static GLOBALS: RwLock<Vec<GlobalProperty>> = RwLock::new(Vec::new());

/// The machine's compat properties (QEMU's `object_compat_props[1]`), applied before the
/// `-global`s.
static MACHINE_COMPAT: RwLock<Vec<crate::core::machine_compat::CompatProp>> = RwLock::new(Vec::new());

/// Installs the selected machine's compat properties (QEMU's
/// `object_set_machine_compat_props`), before any device is created.
pub fn set_machine_compat_props(props: &[crate::core::machine_compat::CompatProp]) {
    *MACHINE_COMPAT.write() = props.to_vec();
}

/// Errors of `-global`.
#[derive(Debug, thiserror::Error)]
pub enum GlobalError {
    /// Not of the form `DRIVER.PROP=VALUE`.
    #[error("Invalid format: expected DRIVER.PROP=VALUE")]
    Format,
    /// DRIVER is no type.
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    /// PROP is not a property of DRIVER, or VALUE does not suit it.
    #[error(transparent)]
    Property(#[from] Error),
}

/// Parses and registers one `-global DRIVER.PROP=VALUE`. The driver must exist and have the
/// property, and the value must parse, so mistakes show at start-up.
pub fn register_global(spec: &str) -> Result<GlobalProperty, GlobalError> {
    let (key, value) = spec.split_once('=').ok_or(GlobalError::Format)?;
    let (driver, property) = key.split_once('.').ok_or(GlobalError::Format)?;
    if driver.is_empty() || property.is_empty() {
        return Err(GlobalError::Format);
    }
    check_global(driver, property, value)?;
    let global = GlobalProperty {
        driver: driver.to_string(),
        property: property.to_string(),
        value: value.to_string(),
    };
    GLOBALS.write().push(global.clone());
    Ok(global)
}

/// Whether `driver` is a type with `property` and `value` suits it: what a global (or a
/// machine's compat property) must be to apply to every device of the type.
pub fn check_global(driver: &str, property: &str, value: &str) -> Result<(), GlobalError> {
    let class = qom::object_class_by_name(driver)
        .ok_or_else(|| GlobalError::UnknownDriver(driver.to_string()))?;
    let prop = class.find_property(property).ok_or_else(|| Error::PropertyNotFound {
        type_name: driver.to_string(),
        name: property.to_string(),
    })?;
    if !matches!(prop.kind, qom::PropertyKind::Link(_)) {
        prop.parse(value, |p| Err(Error::PathNotFound(p.to_string())))?;
    }
    Ok(())
}

/// The registered globals.
pub fn globals() -> Vec<GlobalProperty> {
    GLOBALS.read().clone()
}

/// Applies the machine's compat properties, then the `-global`s, that match a new device
/// (QEMU's `object_apply_compat_props`).
pub(crate) fn apply_globals(obj: &Object) -> Result<(), Error> {
    for (driver, property, value) in MACHINE_COMPAT.read().iter() {
        if obj.is_a(driver) {
            obj.property_parse(property, value)?;
        }
    }
    let globals = GLOBALS.read();
    for g in globals.iter().filter(|g| obj.is_a(&g.driver)) {
        obj.property_parse(&g.property, &g.value)?;
    }
    Ok(())
}

qom::qom_enum! {
    /// QAPI's `LostTickPolicy`: what a timer device does with the ticks a guest missed.
    pub enum LostTickPolicy("LostTickPolicy") {
        /// Drop them.
        Discard = "discard",
        /// Re-inject them, one per tick, late.
        Delay = "delay",
        /// Re-inject them faster until the guest caught up.
        Slew = "slew",
    }
}

qom::qom_enum! {
    /// QAPI's `OnOffAuto`.
    pub enum OnOffAuto("OnOffAuto") {
        /// On.
        On = "on",
        /// Off.
        Off = "off",
        /// The machine or device decides.
        Auto = "auto",
    }
}
