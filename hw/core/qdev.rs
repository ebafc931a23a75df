//! qdev: QEMU's device model (`hw/core/qdev.c`, `qdev-properties.c`).
//!
//! `device` is the abstract parent of every device. A device is created, configured through
//! properties, then realized through its `realized` property, which runs the class's realize
//! chain once. Properties declared with [`device_class_set_props`] are frozen after realize.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use qom::{
    container_get, object_get_root, type_init, Error, Object, ObjectClass, ObjectRef, Property,
    PropertyKind, Value, WeakObjectRef,
};

/// QEMU's `TYPE_DEVICE`.
pub const TYPE_DEVICE: &str = "device";

/// A device's realize method; subclasses chain to their parent's.
pub type RealizeFn = fn(&Object) -> Result<(), Error>;
/// A device's unrealize method.
pub type UnrealizeFn = fn(&Object);

/// The categories `-device help` groups devices under, in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceCategory {
    /// Controllers, bridges and hubs.
    Bridge,
    /// USB devices.
    Usb,
    /// Storage.
    Storage,
    /// Network.
    Network,
    /// Input.
    Input,
    /// Display.
    Display,
    /// Sound.
    Sound,
    /// Everything else that has a category.
    Misc,
    /// CPUs.
    Cpu,
    /// Watchdogs.
    Watchdog,
    /// No category given.
    Uncategorized,
}

impl DeviceCategory {
    /// The heading `-device help` prints.
    pub fn heading(self) -> &'static str {
        match self {
            DeviceCategory::Bridge => "Controller/Bridge/Hub devices",
            DeviceCategory::Usb => "USB devices",
            DeviceCategory::Storage => "Storage devices",
            DeviceCategory::Network => "Network devices",
            DeviceCategory::Input => "Input devices",
            DeviceCategory::Display => "Display devices",
            DeviceCategory::Sound => "Sound devices",
            DeviceCategory::Misc => "Misc devices",
            DeviceCategory::Cpu => "CPU devices",
            DeviceCategory::Watchdog => "Watchdog devices",
            DeviceCategory::Uncategorized => "Uncategorized devices",
        }
    }
}

/// QEMU's `DeviceClass`.
#[derive(Clone, Debug)]
pub struct DeviceClass {
    /// Realize method (the class's own, which may chain to the parent's).
    pub realize: Option<RealizeFn>,
    /// Unrealize method.
    pub unrealize: Option<UnrealizeFn>,
    /// Reset method (QEMU's legacy `reset`).
    pub reset: Option<fn(&Object)>,
    /// One-line description for `-device help`.
    pub desc: Option<&'static str>,
    /// The `-device help` heading.
    pub category: DeviceCategory,
    /// Whether `-device` may create it.
    pub user_creatable: bool,
    /// Whether it may be added or removed while the VM runs.
    pub hotpluggable: bool,
    /// The type of bus it plugs into (`ISA`, `PCI`), if any.
    pub bus_type: Option<&'static str>,
    /// Names of the properties declared with [`device_class_set_props`], in order.
    pub props: Vec<&'static str>,
}

impl Default for DeviceClass {
    fn default() -> Self {
        DeviceClass {
            realize: None,
            unrealize: None,
            reset: None,
            desc: None,
            category: DeviceCategory::Uncategorized,
            user_creatable: true,
            hotpluggable: true,
            bus_type: None,
            props: Vec::new(),
        }
    }
}

/// QEMU's `DeviceState`: what every device instance has.
#[derive(Default)]
pub struct DeviceState {
    realized: AtomicBool,
    id: Mutex<Option<String>>,
    parent_bus: Mutex<Option<WeakObjectRef>>,
    /// A `-global` that could not be applied at creation; realize reports it.
    global_error: Mutex<Option<Error>>,
}

/// The `DeviceClass` of `class`; every device class has one, set by `device`'s class_init.
pub fn device_class(class: &ObjectClass) -> Option<&DeviceClass> {
    class.get::<DeviceClass>()
}

/// Mutable `DeviceClass`, for `class_init` of device types.
///
/// # Panics
/// If `class` is not a device class: a programming error in a `type_init!` record.
pub fn device_class_mut(class: &mut ObjectClass) -> &mut DeviceClass {
    let name = class.name();
    class
        .get_mut::<DeviceClass>()
        .unwrap_or_else(|| panic!("class_init of '{name}' expects a device class"))
}

/// QEMU's `device_class_set_parent_realize`: installs `realize` and returns the parent's,
/// which the subclass keeps in its own class level to chain to.
pub fn device_class_set_parent_realize(class: &mut ObjectClass, realize: RealizeFn) -> Option<RealizeFn> {
    device_class_mut(class).realize.replace(realize)
}

/// QEMU's `device_class_set_parent_unrealize`.
pub fn device_class_set_parent_unrealize(
    class: &mut ObjectClass,
    unrealize: UnrealizeFn,
) -> Option<UnrealizeFn> {
    device_class_mut(class).unrealize.replace(unrealize)
}

/// QEMU's `device_class_set_props`: adds qdev properties, which refuse writes once the
/// device is realized.
pub fn device_class_set_props(class: &mut ObjectClass, props: &'static [Property]) {
    for prop in props {
        class.add_property(prop.clone().with_check(check_not_realized));
        let dc = device_class_mut(class);
        if !dc.props.contains(&prop.name.as_ref()) {
            if let std::borrow::Cow::Borrowed(name) = prop.name {
                dc.props.push(name);
            }
        }
    }
}

fn check_not_realized(obj: &Object, prop: &Property) -> Result<(), Error> {
    if obj.is_realized() {
        let device = match obj.device_id() {
            Some(id) => format!("device '{id}'"),
            None => "anonymous device".to_string(),
        };
        return Err(Error::PropertyAfterRealize {
            name: prop.name.to_string(),
            device,
            type_name: obj.type_name().to_string(),
        });
    }
    Ok(())
}

fn device_class_init(class: &mut ObjectClass) {
    class.insert(DeviceClass::default());
    class.unparent = Some(device_unparent);
    class.add_property(Property::custom(
        "realized",
        PropertyKind::Bool,
        Some(get_realized),
        Some(set_realized),
        "Whether the device is realized",
    ));
    class.add_property(Property::custom(
        "hotpluggable",
        PropertyKind::Bool,
        Some(get_hotpluggable),
        None,
        "Whether the device can be hot-plugged",
    ));
    class.add_property(Property::custom(
        "parent_bus",
        PropertyKind::Link("bus"),
        Some(get_parent_bus),
        None,
        "The bus the device is plugged into",
    ));
}

fn get_realized(obj: &Object, _: &Property) -> Result<Value, Error> {
    Ok(Value::Bool(obj.is_realized()))
}

fn set_realized(obj: &Object, _: &Property, value: Value) -> Result<(), Error> {
    match value {
        Value::Bool(true) => device_realize(obj),
        Value::Bool(false) => {
            device_unrealize(obj);
            Ok(())
        }
        _ => Err(Error::InvalidParameterType {
            name: "realized".into(),
            expected: "bool".into(),
        }),
    }
}

fn get_hotpluggable(obj: &Object, _: &Property) -> Result<Value, Error> {
    Ok(Value::Bool(
        device_class(obj.class()).is_some_and(|dc| dc.hotpluggable),
    ))
}

fn get_parent_bus(obj: &Object, _: &Property) -> Result<Value, Error> {
    Ok(Value::Link(obj.parent_bus()))
}

fn state(obj: &Object) -> &DeviceState {
    // `device` adds DeviceState to every device; these helpers are only reached through
    // objects whose class has a DeviceClass.
    obj.downcast::<DeviceState>()
        .expect("every device instance has a DeviceState part")
}

/// QEMU's `device_set_realized(true)`: puts an orphan under `/machine/unattached`, runs the
/// class's realize chain once, then marks the device realized.
fn device_realize(obj: &Object) -> Result<(), Error> {
    let st = state(obj);
    if st.realized.load(Ordering::Acquire) {
        return Ok(());
    }
    if let Some(err) = st.global_error.lock().take() {
        return Err(err);
    }
    if obj.parent().is_none() {
        let unattached = container_get(&object_get_root(), "/machine/unattached");
        let this = obj.to_ref().expect("an object being realized is alive");
        unattached.add_child("device[*]", &this)?;
    }
    if let Some(realize) = device_class(obj.class()).and_then(|dc| dc.realize) {
        realize(obj)?;
    }
    st.realized.store(true, Ordering::Release);
    Ok(())
}

fn device_unrealize(obj: &Object) {
    let st = state(obj);
    if !st.realized.swap(false, Ordering::AcqRel) {
        return;
    }
    if let Some(unrealize) = device_class(obj.class()).and_then(|dc| dc.unrealize) {
        unrealize(obj);
    }
}

fn device_unparent(obj: &Object) {
    device_unrealize(obj);
    if let Some(bus) = obj.parent_bus() {
        crate::core::bus::bus_remove_child(&bus, obj);
    }
}

fn device_post_init(obj: &Object) {
    if let Err(err) = crate::core::qdev_properties::apply_globals(obj) {
        *state(obj).global_error.lock() = Some(err);
    }
}

type_init! {
    name: TYPE_DEVICE,
    parent: Some(qom::TYPE_OBJECT),
    abstract_: true,
    class_init: Some(device_class_init),
    instance: Some(qom::InstanceSpec::of::<DeviceState>()),
    instance_post_init: Some(device_post_init),
}

/// What every device handle can do (QEMU's `qdev_*` functions on `DeviceState`).
pub trait DeviceMethods {
    /// Whether the device is realized.
    fn is_realized(&self) -> bool;
    /// The `id=` the user gave, if any.
    fn device_id(&self) -> Option<String>;
    /// Sets the `id=`.
    fn set_device_id(&self, id: Option<String>);
    /// The bus the device is plugged into.
    fn parent_bus(&self) -> Option<ObjectRef>;
    /// Runs the class's reset method.
    fn reset(&self);
}

impl DeviceMethods for Object {
    fn is_realized(&self) -> bool {
        self.downcast::<DeviceState>()
            .is_some_and(|st| st.realized.load(Ordering::Acquire))
    }

    fn device_id(&self) -> Option<String> {
        self.downcast::<DeviceState>()?.id.lock().clone()
    }

    fn set_device_id(&self, id: Option<String>) {
        if let Some(st) = self.downcast::<DeviceState>() {
            *st.id.lock() = id;
        }
    }

    fn parent_bus(&self) -> Option<ObjectRef> {
        self.downcast::<DeviceState>()?
            .parent_bus
            .lock()
            .as_ref()
            .and_then(|w| w.upgrade())
    }

    fn reset(&self) {
        if let Some(reset) = device_class(self.class()).and_then(|dc| dc.reset) {
            reset(self);
        }
    }
}

/// Errors of creating and plugging devices.
#[derive(Debug, thiserror::Error)]
pub enum QdevError {
    /// The name is no device type.
    #[error("'{0}' is not a valid device model name")]
    NotADevice(String),
    /// The type is abstract.
    #[error("Parameter 'driver' expects a non-abstract device type")]
    Abstract,
    /// `-device` of a type users may not create.
    #[error("Parameter 'driver' expects a pluggable device type")]
    NotUserCreatable,
    /// No bus of the type the device needs.
    #[error("No '{bus_type}' bus found for device '{driver}'")]
    NoBus {
        /// The bus type.
        bus_type: &'static str,
        /// The device type.
        driver: String,
    },
    /// `bus=` names a bus of the wrong type.
    #[error("Device '{driver}' can't go on {bus_type} bus")]
    WrongBus {
        /// The device type.
        driver: String,
        /// The type of the bus named.
        bus_type: String,
    },
    /// `bus=` names no bus.
    #[error("Bus '{0}' not found")]
    BusNotFound(String),
    /// A device that needs no bus was given one.
    #[error("Device '{0}' does not plug into a bus")]
    Busless(String),
    /// `id=` already in use.
    #[error("Duplicate ID '{0}' for device")]
    DuplicateId(String),
    /// A QOM error (property values, realize failures).
    #[error(transparent)]
    Qom(#[from] Error),
}

/// QEMU's `qdev_new`: a new, unrealized device of type `name`.
pub fn qdev_new(name: &str) -> Result<ObjectRef, QdevError> {
    let class = qom::object_class_by_name(name)
        .filter(|c| c.is_a(TYPE_DEVICE))
        .ok_or_else(|| QdevError::NotADevice(name.to_string()))?;
    if class.is_abstract() {
        return Err(QdevError::Abstract);
    }
    Ok(Object::new_with_class(class)?)
}

/// QEMU's `qdev_realize`: plugs `dev` into `bus` (type-checked) and realizes it.
pub fn qdev_realize(dev: &ObjectRef, bus: Option<&ObjectRef>) -> Result<(), QdevError> {
    let dc = device_class(dev.class()).ok_or_else(|| QdevError::NotADevice(dev.type_name().into()))?;
    match (bus, dc.bus_type) {
        (Some(bus), Some(bus_type)) => {
            if !bus.is_a(bus_type) {
                return Err(QdevError::WrongBus {
                    driver: dev.type_name().to_string(),
                    bus_type: bus.type_name().to_string(),
                });
            }
            crate::core::bus::bus_add_child(bus, dev);
            *state(dev).parent_bus.lock() = Some(bus.downgrade());
        }
        (Some(_), None) => return Err(QdevError::Busless(dev.type_name().to_string())),
        (None, _) => {}
    }
    let result = dev.property_set("realized", Value::Bool(true));
    if result.is_err() {
        if let Some(bus) = dev.parent_bus() {
            crate::core::bus::bus_remove_child(&bus, dev);
            *state(dev).parent_bus.lock() = None;
        }
    }
    Ok(result?)
}

/// QEMU's `qdev_unrealize`.
pub fn qdev_unrealize(dev: &Object) {
    device_unrealize(dev);
}

/// Whether `name` names a device type users can create, with its class.
pub fn device_type(name: &str) -> Result<&'static ObjectClass, QdevError> {
    let class = qom::object_class_by_name(name)
        .filter(|c| c.is_a(TYPE_DEVICE))
        .ok_or_else(|| QdevError::NotADevice(name.to_string()))?;
    if class.is_abstract() {
        return Err(QdevError::Abstract);
    }
    if !device_class(class).is_some_and(|dc| dc.user_creatable) {
        return Err(QdevError::NotUserCreatable);
    }
    Ok(class)
}
