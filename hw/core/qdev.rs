//! qdev: QEMU's device model (`hw/core/qdev.c`, `qdev-properties.c`).
//!
//! `device` ([`DeviceState`]) is the abstract parent of every device. A device type is a
//! struct embedding its parent's state and implementing [`DeviceImpl`] (QEMU's
//! `DeviceClass` as a trait). A device is created, configured through properties, then
//! realized through its `realized` property, which calls the type's realize once with a
//! [`DeviceContext`] (its bus and the machine's services). Its `#[property]` fields are
//! frozen after realize.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{
    container_get, object_get_root, type_init, ClassInitFor, Error, Object, ObjectBase,
    ObjectClass, ObjectRef, ObjectType, Property, PropertyKind, Value, WeakObjectRef,
};

use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::bus::BusState;
use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::memory::MemoryError;
use crate::core::services::MachineServices;

/// QEMU's `TYPE_DEVICE`.
pub const TYPE_DEVICE: &str = "device";

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

/// QEMU's `DeviceClass`: what listings and `-device` read, derived from the type's
/// [`DeviceImpl`].
#[derive(Clone, Debug)]
pub struct DeviceClass {
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
    /// Names of the qdev properties (frozen after realize), in order.
    pub props: Vec<&'static str>,
    /// The device's methods, as a trait object.
    device: Option<qom::ImplCast<dyn Device>>,
}

/// A device type: QEMU's `DeviceClass` constants and methods as a trait.
///
/// Constants default to the parent type's. A method a type does not write is its parent's
/// (the default chains up); a type that writes one calls its parent's explicitly where QEMU
/// would (`device_class_set_parent_realize`): `self.parent_state().realize(ctx)`.
pub trait DeviceImpl: ObjectType<Parent: DeviceParent> {
    /// The `-device help` heading.
    const CATEGORY: DeviceCategory = <Self::Parent as DeviceParent>::CATEGORY;
    /// One-line description for `-device help`.
    const DESCRIPTION: Option<&'static str> = <Self::Parent as DeviceParent>::DESCRIPTION;
    /// Whether `-device` may create it.
    const USER_CREATABLE: bool = <Self::Parent as DeviceParent>::USER_CREATABLE;
    /// Whether it may be added or removed while the VM runs.
    const HOTPLUGGABLE: bool = <Self::Parent as DeviceParent>::HOTPLUGGABLE;
    /// The bus type it plugs into.
    const BUS_TYPE: Option<&'static str> = <Self::Parent as DeviceParent>::BUS_TYPE;
    /// The device holds no state a migration must carry (none at all, or all of it in the
    /// accelerator): the default save/load move an empty section. Not inherited either.
    const STATELESS: bool = false;

    /// QEMU's `DeviceClass::realize`: sets the device up with what `ctx` hands it.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.parent_state().parent_realize(ctx)
    }
    /// QEMU's `DeviceClass::unrealize`: undoes what realize mapped.
    fn unrealize(&self, ctx: &DeviceContext) {
        self.parent_state().parent_unrealize(ctx)
    }
    /// QEMU's legacy `DeviceClass::reset`: back to the power-on state.
    fn reset(&self) {
        self.parent_state().parent_reset()
    }
    /// QEMU's `DeviceClass::vmsd`, saving: the device's state for a snapshot or a
    /// migration, taken with the vCPUs paused. Not inherited: a type that was never taught
    /// what it holds blocks migration (QEMU's unmigratable devices) instead of moving
    /// without its own state; a subclass saves its parent's fields itself.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        if Self::STATELESS {
            return Ok(VmStateSection::new(1));
        }
        Err(VmStateError::Unmigratable(Self::TYPE_NAME.to_string()))
    }
    /// Loading: puts back what [`DeviceImpl::save_state`] saved (on the destination, after
    /// realize and before the vCPUs first run).
    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        if Self::STATELESS {
            return state.check_version(1, 1);
        }
        Err(VmStateError::Unmigratable(Self::TYPE_NAME.to_string()))
    }
    /// QEMU's `migrate_add_blocker` by a realized device: why its machine cannot migrate
    /// now, in its own words, checked before any state is saved.
    fn migration_blocker(&self) -> Option<String> {
        None
    }
}

/// What a device type's parent offers it to inherit and chain to: a device type, or the
/// root `object` (nothing to chain to).
pub trait DeviceParent {
    /// See [`DeviceImpl::CATEGORY`].
    const CATEGORY: DeviceCategory;
    /// See [`DeviceImpl::DESCRIPTION`].
    const DESCRIPTION: Option<&'static str>;
    /// See [`DeviceImpl::USER_CREATABLE`].
    const USER_CREATABLE: bool;
    /// See [`DeviceImpl::HOTPLUGGABLE`].
    const HOTPLUGGABLE: bool;
    /// See [`DeviceImpl::BUS_TYPE`].
    const BUS_TYPE: Option<&'static str>;
    /// The parent's realize.
    fn parent_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError>;
    /// The parent's unrealize.
    fn parent_unrealize(&self, ctx: &DeviceContext);
    /// The parent's reset.
    fn parent_reset(&self);
}

impl DeviceParent for ObjectBase {
    const CATEGORY: DeviceCategory = DeviceCategory::Uncategorized;
    const DESCRIPTION: Option<&'static str> = None;
    const USER_CREATABLE: bool = true;
    const HOTPLUGGABLE: bool = true;
    const BUS_TYPE: Option<&'static str> = None;
    fn parent_realize(&self, _: &DeviceContext) -> Result<(), RealizeError> {
        Ok(())
    }
    fn parent_unrealize(&self, _: &DeviceContext) {}
    fn parent_reset(&self) {}
}

impl<T: DeviceImpl> DeviceParent for T {
    const CATEGORY: DeviceCategory = T::CATEGORY;
    const DESCRIPTION: Option<&'static str> = T::DESCRIPTION;
    const USER_CREATABLE: bool = T::USER_CREATABLE;
    const HOTPLUGGABLE: bool = T::HOTPLUGGABLE;
    const BUS_TYPE: Option<&'static str> = T::BUS_TYPE;
    fn parent_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        DeviceImpl::realize(self, ctx)
    }
    fn parent_unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(self, ctx)
    }
    fn parent_reset(&self) {
        DeviceImpl::reset(self)
    }
}

/// The dynamically dispatched half of [`DeviceImpl`] (its constants live in the class).
pub trait Device: Send + Sync {
    /// [`DeviceImpl::realize`].
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError>;
    /// [`DeviceImpl::unrealize`].
    fn unrealize(&self, ctx: &DeviceContext);
    /// [`DeviceImpl::reset`].
    fn reset(&self);
    /// [`DeviceImpl::save_state`].
    fn save_state(&self) -> Result<VmStateSection, VmStateError>;
    /// [`DeviceImpl::load_state`].
    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError>;
    /// [`DeviceImpl::migration_blocker`].
    fn migration_blocker(&self) -> Option<String>;
}

impl<T: DeviceImpl> Device for T {
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        DeviceImpl::realize(self, ctx)
    }
    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(self, ctx)
    }
    fn reset(&self) {
        DeviceImpl::reset(self)
    }
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        DeviceImpl::save_state(self)
    }
    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        DeviceImpl::load_state(self, state)
    }
    fn migration_blocker(&self) -> Option<String> {
        DeviceImpl::migration_blocker(self)
    }
}

fn as_device<T: DeviceImpl>(obj: &Object) -> Option<&(dyn Device + 'static)> {
    obj.cast::<T>().map(|d| d as &dyn Device)
}

/// The device methods of `obj`, if it is a device.
pub fn device_impl(obj: &Object) -> Option<&dyn Device> {
    device_class(obj.class()).and_then(|dc| dc.device?(obj))
}

/// `device`'s class_init for each device type (QEMU's `device_class_init` plus
/// `device_class_set_props`): the class record from the impl; the type's own field
/// properties refuse writes once the device is realized.
pub fn device_class_init<T: DeviceImpl>(class: &mut ObjectClass) {
    let props = device_class(class).map(|dc| dc.props.clone()).unwrap_or_default();
    class.insert(DeviceClass {
        desc: T::DESCRIPTION,
        category: T::CATEGORY,
        user_creatable: T::USER_CREATABLE,
        hotpluggable: T::HOTPLUGGABLE,
        bus_type: T::BUS_TYPE,
        props,
        device: Some(as_device::<T>),
    });
    for prop in T::PROPERTIES {
        device_class_add_property(class, prop.clone());
    }
}

/// Adds a qdev property that is not a plain field (a `Property::state`): like the field
/// properties, it refuses writes once the device is realized (QEMU's qdev properties).
pub fn device_class_add_property(class: &mut ObjectClass, prop: Property) {
    let name = match prop.name {
        std::borrow::Cow::Borrowed(name) => Some(name),
        std::borrow::Cow::Owned(_) => None,
    };
    class.add_property(prop.with_check(check_not_realized));
    if let (Some(name), Some(dc)) = (name, class.get_mut::<DeviceClass>()) {
        if !dc.props.contains(&name) {
            dc.props.push(name);
        }
    }
}

impl<T: DeviceImpl> ClassInitFor<T> for DeviceState {
    fn class_init(class: &mut ObjectClass) {
        device_class_init::<T>(class);
    }
}

/// What realize hands a device: its object, its bus, and the machine's services (QEMU's
/// devices reach these as globals; here they are given).
pub struct DeviceContext<'a> {
    object: &'a ObjectRef,
    bus: Option<ObjectRef>,
    machine: Option<Arc<MachineServices>>,
}

impl<'a> DeviceContext<'a> {
    /// The device's QOM object (its path, its `id=`, where to add child objects).
    pub fn object(&self) -> &'a ObjectRef {
        self.object
    }

    /// The device's type name, for messages.
    pub fn type_name(&self) -> &'static str {
        self.object.type_name()
    }

    /// The bus the device is plugged into.
    pub fn bus(&self) -> Option<&ObjectRef> {
        self.bus.as_ref()
    }

    /// The bus's typed state (`IsaBus`, `PciBus`).
    pub fn bus_state<B: ObjectType>(&self) -> Result<&B, RealizeError> {
        self.bus
            .as_deref()
            .and_then(|b| b.downcast::<B>())
            .ok_or(RealizeError::NoBus {
                driver: self.type_name(),
                bus_type: B::TYPE_NAME,
            })
    }

    /// The machine's services: address spaces, guest RAM, run requests, the accelerator.
    pub fn machine(&self) -> Result<&Arc<MachineServices>, RealizeError> {
        self.machine.as_ref().ok_or(RealizeError::NoMachine(self.type_name()))
    }
}

/// Why a device could not be realized.
#[derive(Debug, thiserror::Error)]
pub enum RealizeError {
    /// Realized outside a machine (no services were handed over).
    #[error("{0}: not part of a machine")]
    NoMachine(&'static str),
    /// Not plugged into the bus it needs.
    #[error("device '{driver}' is not on a {bus_type} bus")]
    NoBus {
        /// The device type.
        driver: &'static str,
        /// The bus type it needs.
        bus_type: &'static str,
    },
    /// A region overlaps another device's.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A property or child object could not be set up.
    #[error(transparent)]
    Qom(#[from] Error),
    /// A device the device builds failed.
    #[error(transparent)]
    Qdev(Box<QdevError>),
    /// The device's own reason, in its words.
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

impl From<QdevError> for RealizeError {
    fn from(err: QdevError) -> Self {
        RealizeError::Qdev(Box::new(err))
    }
}

impl RealizeError {
    /// A device-specific error.
    pub fn device(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        RealizeError::Device(Box::new(err))
    }
}

/// QEMU's `DeviceState`: what every device instance has.
#[derive(qom::Object)]
#[qom(name = TYPE_DEVICE, abstract, class_level)]
pub struct DeviceState {
    #[parent]
    parent: ObjectBase,
    realized: AtomicBool,
    id: Mutex<Option<String>>,
    parent_bus: Mutex<Option<WeakObjectRef>>,
    /// The machine's services for a device on no bus (the board hands them over).
    services: OnceLock<Arc<MachineServices>>,
    /// A `-global` that could not be applied at creation; realize reports it.
    global_error: Mutex<Option<Error>>,
    /// Plugged in while the machine ran (QEMU's `DeviceState::hotplugged`).
    hotplugged: AtomicBool,
}

type_init!(DeviceState {
    class_init: Some(device_base_class_init),
    instance_post_init: Some(device_post_init),
});

impl DeviceImpl for DeviceState {}

impl DeviceState {
    /// Whether the device is realized.
    pub fn is_realized(&self) -> bool {
        self.realized.load(Ordering::Acquire)
    }

    /// The `id=` the user gave, if any.
    pub fn id(&self) -> Option<String> {
        self.id.lock().clone()
    }

    /// The bus the device is plugged into.
    pub fn parent_bus(&self) -> Option<ObjectRef> {
        self.parent_bus.lock().as_ref().and_then(|w| w.upgrade())
    }

    /// The machine's services, for a device that plugs into no bus. The board calls this
    /// before realize (QEMU's busless devices reach the machine through globals).
    pub fn set_services(&self, services: &Arc<MachineServices>) {
        let _ = self.services.set(services.clone());
    }

    /// Whether the device was plugged in while the machine ran.
    pub fn is_hotplugged(&self) -> bool {
        self.hotplugged.load(Ordering::Acquire)
    }

    /// Marks the device as plugged in while the machine runs (before its realize; QEMU's
    /// `qdev_device_add` once the machine is ready).
    pub fn set_hotplugged(&self, hotplugged: bool) {
        self.hotplugged.store(hotplugged, Ordering::Release);
    }
}

/// The `DeviceClass` of `class`, if it is a device class.
pub fn device_class(class: &ObjectClass) -> Option<&DeviceClass> {
    class.get::<DeviceClass>()
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

/// The abstract `device` class: the properties every device has (QEMU's
/// `device_class_init`).
fn device_base_class_init(class: &mut ObjectClass) {
    device_class_init::<DeviceState>(class);
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

/// The context realize and unrealize of `obj` receive: its bus, and the machine's
/// services from the bus or from the board.
fn device_context<'a>(obj: &'a ObjectRef, st: &DeviceState) -> DeviceContext<'a> {
    let bus = st.parent_bus();
    let machine = bus
        .as_deref()
        .and_then(|b| b.downcast::<BusState>())
        .and_then(|b| b.services().cloned())
        .or_else(|| st.services.get().cloned());
    DeviceContext {
        object: obj,
        bus,
        machine,
    }
}

/// QEMU's `device_set_realized(true)`: puts an orphan under `/machine/unattached`, runs the
/// type's realize once, then marks the device realized.
fn device_realize(obj: &Object) -> Result<(), Error> {
    let (Some(st), Some(this)) = (obj.downcast::<DeviceState>(), obj.to_ref()) else {
        return Ok(());
    };
    if st.is_realized() {
        return Ok(());
    }
    if let Some(err) = st.global_error.lock().take() {
        return Err(err);
    }
    if obj.parent().is_none() {
        let unattached = container_get(&object_get_root(), "/machine/unattached");
        unattached.add_child("device[*]", &this)?;
    }
    if let Some(dev) = device_impl(obj) {
        dev.realize(&device_context(&this, st))
            .map_err(|e| match e {
                RealizeError::Qom(e) => e,
                e => Error::other(e),
            })?;
    }
    st.realized.store(true, Ordering::Release);
    // QEMU's device_set_realized: a device plugged into a running machine starts from
    // its reset state, as the others did at the machine's reset.
    if st.is_hotplugged() {
        if let Some(dev) = device_impl(obj) {
            dev.reset();
        }
    }
    // QEMU's `hotplug_handler_plug` after realize: the bus's handler learns of every
    // device, and tells the guest of those plugged in while it runs.
    if let Some(handler) = st.parent_bus().and_then(|bus| bus_hotplug_handler(&bus)) {
        if let Some(hotplug) = handler.interface::<dyn HotplugHandler>() {
            if let Err(e) = hotplug.plug(obj, st.is_hotplugged()) {
                device_unrealize(obj);
                return Err(Error::other(e));
            }
        }
    }
    Ok(())
}

fn bus_hotplug_handler(bus: &Object) -> Option<ObjectRef> {
    bus.downcast::<BusState>()?.hotplug_handler()
}

fn device_unrealize(obj: &Object) {
    let (Some(st), Some(this)) = (obj.downcast::<DeviceState>(), obj.to_ref()) else {
        return;
    };
    if !st.realized.swap(false, Ordering::AcqRel) {
        return;
    }
    if let Some(dev) = device_impl(obj) {
        dev.unrealize(&device_context(&this, st));
    }
}

fn device_unparent(obj: &Object) {
    // QEMU's `device_unparent`: the devices on this device's buses go first.
    for (_, child) in obj.children() {
        if child.downcast::<BusState>().is_some() {
            for dev in crate::core::bus::bus_children(&child) {
                dev.unparent();
            }
        }
    }
    device_unrealize(obj);
    if let Some(bus) = obj.parent_bus() {
        crate::core::bus::bus_remove_child(&bus, obj);
    }
}

fn device_post_init(obj: &Object) {
    if let Err(err) = crate::core::qdev_properties::apply_globals(obj) {
        if let Some(st) = obj.downcast::<DeviceState>() {
            *st.global_error.lock() = Some(err);
        }
    }
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
        self.cast::<DeviceState>()
            .is_some_and(DeviceState::is_realized)
    }

    fn device_id(&self) -> Option<String> {
        self.cast::<DeviceState>()?.id()
    }

    fn set_device_id(&self, id: Option<String>) {
        if let Some(st) = self.cast::<DeviceState>() {
            *st.id.lock() = id;
        }
    }

    fn parent_bus(&self) -> Option<ObjectRef> {
        self.cast::<DeviceState>()?.parent_bus()
    }

    fn reset(&self) {
        if let Some(dev) = device_impl(self) {
            dev.reset();
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
    /// `id=` that is not an identifier (QEMU's `id_wellformed`).
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    /// A QOM error (property values, realize failures).
    #[error(transparent)]
    Qom(#[from] Error),
    /// Hot(un)plug on a bus without a hotplug handler (QEMU's `QERR_BUS_NO_HOTPLUG`).
    #[error("Bus '{0}' does not support hotplugging")]
    BusNoHotplug(String),
    /// Hot(un)plug of a type that cannot be (QEMU's `QERR_DEVICE_NO_HOTPLUG`).
    #[error("Device '{0}' does not support hotplugging")]
    DeviceNoHotplug(String),
    /// Hotplug of a device on no bus: only the machine could take it, and it does not.
    #[error("Device '{0}' can not be hotplugged on this machine")]
    MachineNoHotplug(String),
    /// The handler refused.
    #[error(transparent)]
    Hotplug(#[from] HotplugError),
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

/// `qdev_new` of typed `T`, with a typed view of its state (QEMU's `qdev_new` + the
/// type's cast macro, `MC146818_RTC(qdev_new(...))`).
pub fn qdev_new_typed<T: ObjectType>() -> Result<qom::Typed<T>, QdevError> {
    let dev = qdev_new(T::TYPE_NAME)?;
    qom::Typed::new(dev).ok_or_else(|| QdevError::NotADevice(T::TYPE_NAME.to_string()))
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
            if let Some(st) = dev.downcast::<DeviceState>() {
                *st.parent_bus.lock() = Some(bus.downgrade());
            }
        }
        (Some(_), None) => return Err(QdevError::Busless(dev.type_name().to_string())),
        (None, _) => {}
    }
    let result = dev.property_set("realized", Value::Bool(true));
    if result.is_err() {
        if let Some(bus) = dev.parent_bus() {
            crate::core::bus::bus_remove_child(&bus, dev);
            if let Some(st) = dev.downcast::<DeviceState>() {
                *st.parent_bus.lock() = None;
            }
        }
    }
    Ok(result?)
}

/// The realized devices under `root`, by canonical path, sorted (QEMU's
/// `qdev_walk_children` from the machine).
pub fn qdev_realized_devices(root: &ObjectRef) -> Vec<(String, ObjectRef)> {
    fn walk(obj: &ObjectRef, out: &mut Vec<(String, ObjectRef)>) {
        for (_, child) in obj.children() {
            if device_impl(&child).is_some() && child.is_realized() {
                if let Some(path) = child.canonical_path() {
                    out.push((path, child.clone()));
                }
            }
            walk(&child, out);
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// QEMU's `qdev_unrealize`.
pub fn qdev_unrealize(dev: &Object) {
    device_unrealize(dev);
}

/// The name a bus goes by in messages (`pci.0`).
fn bus_name(bus: &Object) -> String {
    bus.name_in_parent().map_or_else(String::new, |n| n.to_string())
}

/// QEMU's `qdev_unplug` (`device_del`): checks that `dev` may go, then asks its bus's
/// hotplug handler to take it out. The device stays until the guest lets it go, then
/// [`qdev_unplug_complete`] removes it.
pub fn qdev_unplug(dev: &Object) -> Result<(), QdevError> {
    let bus = dev.parent_bus();
    let handler = bus.as_deref().and_then(bus_hotplug_handler);
    if let (Some(bus), None) = (&bus, &handler) {
        return Err(QdevError::BusNoHotplug(bus_name(bus)));
    }
    if !device_class(dev.class()).is_some_and(|dc| dc.hotpluggable) {
        return Err(QdevError::DeviceNoHotplug(dev.type_name().to_string()));
    }
    let Some(handler) = handler else {
        return Err(QdevError::DeviceNoHotplug(dev.type_name().to_string()));
    };
    let hotplug = handler
        .interface::<dyn HotplugHandler>()
        .ok_or_else(|| QdevError::DeviceNoHotplug(dev.type_name().to_string()))?;
    Ok(hotplug.unplug_request(dev)?)
}

/// Whether a device may be plugged into `bus` while the machine runs (QEMU's checks in
/// `qdev_device_add` once the machine is ready): the bus has a hotplug handler and the
/// type is hotpluggable.
pub fn qdev_hotplug_allowed(driver: &str, bus: Option<&Object>) -> Result<(), QdevError> {
    let Some(bus) = bus else {
        return Err(QdevError::MachineNoHotplug(driver.to_string()));
    };
    if bus_hotplug_handler(bus).is_none() {
        return Err(QdevError::BusNoHotplug(bus_name(bus)));
    }
    let class = qom::object_class_by_name(driver);
    if !class.and_then(device_class).is_some_and(|dc| dc.hotpluggable) {
        return Err(QdevError::DeviceNoHotplug(driver.to_string()));
    }
    Ok(())
}

/// QEMU's `object_unparent` of an unplugged device and its `DEVICE_DELETED` event: the
/// guest let `dev` go (or the machine reset with the request pending).
pub fn qdev_unplug_complete(dev: &Object) {
    // The devices on its buses go with it, first, each with its event (a virtio-serial
    // controller's ports).
    fn gone(dev: &Object, out: &mut Vec<(Option<String>, Option<String>)>) {
        for (_, child) in dev.children() {
            if child.downcast::<BusState>().is_some() {
                for plugged in crate::core::bus::bus_children(&child) {
                    gone(&plugged, out);
                }
            }
        }
        if dev.is_realized() {
            out.push((dev.canonical_path(), dev.device_id()));
        }
    }
    let mut events = Vec::new();
    gone(dev, &mut events);
    let services = dev
        .downcast::<DeviceState>()
        .zip(dev.to_ref())
        .and_then(|(st, this)| device_context(&this, st).machine.clone());
    dev.unparent();
    // The vCPUs' views of the address spaces still hold its regions until they exit.
    if let Some(accel) = services.as_ref().and_then(|s| s.accel_ops()) {
        accel.refresh_vcpu_views();
    }
    for (path, id) in events {
        let mut data = crate::core::qapi_event::json!({ "path": path.unwrap_or_default() });
        if let Some(id) = id {
            data["device"] = id.into();
        }
        crate::core::qapi_event::emit("DEVICE_DELETED", Some(data));
    }
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
