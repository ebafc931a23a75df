//! `-global DRIVER.PROP=VALUE` (QEMU's `qdev_prop_register_global`).
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
    let class = qom::object_class_by_name(driver)
        .ok_or_else(|| GlobalError::UnknownDriver(driver.to_string()))?;
    let prop = class.find_property(property).ok_or_else(|| Error::PropertyNotFound {
        type_name: driver.to_string(),
        name: property.to_string(),
    })?;
    if !matches!(prop.kind, qom::PropertyKind::Link(_)) {
        prop.parse(value, |p| Err(Error::PathNotFound(p.to_string())))?;
    }
    let global = GlobalProperty {
        driver: driver.to_string(),
        property: property.to_string(),
        value: value.to_string(),
    };
    GLOBALS.write().push(global.clone());
    Ok(global)
}

/// The registered globals.
pub fn globals() -> Vec<GlobalProperty> {
    GLOBALS.read().clone()
}

/// Applies the matching globals to a new device.
pub(crate) fn apply_globals(obj: &Object) -> Result<(), Error> {
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
