//! Typed QOM: a type is a Rust struct that embeds its parent type's struct, derived with
//! `#[derive(qom::Object)]` and registered with `qom::type_init!(Type)`.
//!
//! This is QEMU's Rust binding model (`rust/qom/`): the instance struct starts with its
//! parent's (`ParentField`), so an upcast is a field access that cannot fail (here `Deref`),
//! properties are declared on fields (`#[property]`), and each class level is a trait the
//! type implements (`DeviceImpl`, `MachineImpl`...). The class record QOM keeps for
//! listings and casts is derived from those impls by the parent type's [`ClassInitFor`].
//!
//! | QEMU (C / Rust bindings)            | here                                   |
//! |-------------------------------------|----------------------------------------|
//! | `Object` as first member            | [`ObjectBase`] at the root of the chain |
//! | `ParentField<T>`, `qom_isa!`        | `#[parent]` field, `Deref`, [`IsA`]    |
//! | `#[property]`, `qdev_prop_*`        | `#[property]` on a [`Prop<T>`] field   |
//! | `ObjectImpl::CLASS_INIT`            | `<Parent as ClassInitFor<T>>::class_init` |
//! | `object_dynamic_cast` to a struct   | [`Object::downcast`] (projection)      |

use std::any::{Any, TypeId};
use std::fmt;

use parking_lot::Mutex;

use crate::class::ObjectClass;
use crate::object::{Object, ObjectRef, WeakObjectRef};
use crate::property::{Property, PropertyKind, Value};
use crate::type_info::{InstanceSpec, Location, TypeInfo};
use crate::{Error, TYPE_OBJECT};

/// A QOM type's instance state: implemented by `#[derive(qom::Object)]`.
pub trait ObjectType: Any + Send + Sync + Default {
    /// The QOM type name (`"isa-debug-exit"`).
    const TYPE_NAME: &'static str;
    /// The parent type, whose state this struct embeds.
    type Parent: ObjectType;
    /// Abstract types cannot be instantiated.
    const ABSTRACT: bool;
    /// Interfaces the type implements.
    const INTERFACES: &'static [&'static str];
    /// The properties bound to this type's own `#[property]` fields.
    const PROPERTIES: &'static [Property];
    /// Installs the interface traits the type implements (`#[qom(implements = [..])]`).
    const INTERFACE_IMPLS: &'static [fn(&mut ObjectClass)] = &[];
    /// The embedded parent state: the typed upcast.
    fn parent_state(&self) -> &Self::Parent;
    /// The root of the chain, mutable: how `object_new` tells the state its object.
    fn object_base_mut(&mut self) -> &mut ObjectBase;
    /// This state or the ancestor state of Rust type `id` inside it.
    fn project(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)>;
    /// Every level's state in the chain, root first, with its Rust type.
    fn for_each_level<'a>(&'a self, f: &mut dyn FnMut(TypeId, &'a (dyn Any + Send + Sync)));
}

/// A typed upcast that cannot fail (QEMU's `IsA`): every type is its own and its parent's;
/// `Deref` reaches further ancestors (`let dev: &DeviceState = &serial;`).
pub trait IsA<P: ObjectType>: ObjectType {
    /// The ancestor state.
    fn upcast(&self) -> &P;
}

impl<T: ObjectType> IsA<T> for T {
    fn upcast(&self) -> &T {
        self
    }
}

/// The root of every typed chain: QEMU's `Object` as the first member of each instance.
/// It knows the object it belongs to, so `&self` methods can reach the composition tree.
#[derive(Default)]
pub struct ObjectBase {
    pub(crate) this: WeakObjectRef,
}

impl ObjectBase {
    /// The object this state belongs to. Every state is built inside its object, and
    /// `&self` methods run while the object is referenced.
    ///
    /// # Panics
    /// From an object's finalizer (`Drop` of its state), when no reference is left.
    pub fn object(&self) -> ObjectRef {
        match self.try_object() {
            Some(obj) => obj,
            None => panic!("object state used after its object was freed"),
        }
    }

    /// The object this state belongs to; `None` while it is being finalized.
    pub fn try_object(&self) -> Option<ObjectRef> {
        self.this.upgrade()
    }

    /// A weak reference to the object.
    pub fn weak(&self) -> WeakObjectRef {
        self.this.clone()
    }
}

impl fmt::Debug for ObjectBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.try_object() {
            Some(obj) => write!(f, "ObjectBase({})", obj.type_name()),
            None => f.write_str("ObjectBase"),
        }
    }
}

impl ObjectType for ObjectBase {
    const TYPE_NAME: &'static str = TYPE_OBJECT;
    type Parent = ObjectBase;
    const ABSTRACT: bool = true;
    const INTERFACES: &'static [&'static str] = &[];
    const PROPERTIES: &'static [Property] = &[];
    fn parent_state(&self) -> &ObjectBase {
        self
    }
    fn object_base_mut(&mut self) -> &mut ObjectBase {
        self
    }
    fn project(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)> {
        (id == TypeId::of::<ObjectBase>()).then_some(self as &(dyn Any + Send + Sync))
    }
    fn for_each_level<'a>(&'a self, f: &mut dyn FnMut(TypeId, &'a (dyn Any + Send + Sync))) {
        f(TypeId::of::<ObjectBase>(), self);
    }
}

/// How a class record reaches an object's class-level methods as a trait object: the
/// caster a `ClassInitFor` stores (`fn(&Object) -> Option<&dyn Device>`).
pub type ImplCast<D> = fn(&Object) -> Option<&D>;

/// How a parent type builds the class of a subtype `T` from `T`'s trait impls (QEMU's
/// `ObjectImpl::CLASS_INIT`, e.g. `DeviceClass::class_init::<T>`). Implemented by each
/// type that introduces a class level, generically over its subtypes.
pub trait ClassInitFor<T: ObjectType> {
    /// Fills in `class` (already a copy of the parent class) for `T`.
    fn class_init(class: &mut ObjectClass);
}

/// Types directly under `object`: their properties only.
impl<T: ObjectType> ClassInitFor<T> for ObjectBase {
    fn class_init(class: &mut ObjectClass) {
        object_class_init::<T>(class);
    }
}

/// The `object` level of every typed class_init: adds `T`'s field properties.
pub fn object_class_init<T: ObjectType>(class: &mut ObjectClass) {
    for prop in T::PROPERTIES {
        class.add_property(prop.clone());
    }
}

/// The registration record of typed `T`; `type_init!(T)` submits it.
pub const fn type_info<T: ObjectType>(location: Location) -> TypeInfo
where
    T::Parent: ClassInitFor<T>,
{
    TypeInfo {
        name: T::TYPE_NAME,
        parent: Some(<T::Parent as ObjectType>::TYPE_NAME),
        abstract_: T::ABSTRACT,
        interfaces: T::INTERFACES,
        class_init: Some(<T::Parent as ClassInitFor<T>>::class_init),
        class_base_init: None,
        instance: Some(InstanceSpec::typed::<T>()),
        instance_init: None,
        instance_post_init: None,
        instance_finalize: None,
        interface_impls: T::INTERFACE_IMPLS,
        class_data: None,
        location,
    }
}

/// An interface as a Rust trait: `impl qom::Interface for dyn Resettable` names the QOM
/// interface type (a descendant of `interface`) that `dyn Resettable` stands for. A type
/// lists it with `#[qom(implements = [dyn Resettable])]`, implements the trait, and
/// `obj.interface::<dyn Resettable>()` reaches that implementation from any `&Object`.
pub trait Interface {
    /// The QOM interface type's name.
    const TYPE_NAME: &'static str;
}

/// Registers the QOM type of an interface trait: `qom::interface_type!(dyn Resettable)`.
#[macro_export]
macro_rules! interface_type {
    ($iface:ty) => {
        $crate::type_init! {
            name: <$iface as $crate::Interface>::TYPE_NAME,
            parent: Some($crate::TYPE_INTERFACE),
            abstract_: true,
        }
    };
}

/// A property value cell on a typed state's field: set through QOM before realize, read by
/// the device's own code. Cloned out on read; properties are not on hot paths.
#[derive(Default)]
pub struct Prop<T>(Mutex<T>);

impl<T: Clone> Prop<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Prop(Mutex::new(value))
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> T {
        self.0.lock().clone()
    }

    /// Replaces the value (QOM's setter does this; devices may for internal properties).
    pub fn set(&self, value: T) {
        *self.0.lock() = value;
    }
}

impl<T: fmt::Debug> fmt::Debug for Prop<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.lock().fmt(f)
    }
}

/// A Rust type a property field may hold, with its QOM kind and value conversions.
pub trait PropertyType: Clone + Send + Sync + 'static {
    /// The QOM kind (`uint16`, `str`, an enum...).
    const KIND: PropertyKind;
    /// The value QOM reads.
    fn to_value(&self) -> Value;
    /// The Rust value of a QOM value already checked against [`PropertyType::KIND`].
    fn from_value(value: Value) -> Option<Self>;
    /// The default that listings show; `None` for "unset" (`Option::None`).
    fn default_value(&self) -> Option<Value> {
        Some(self.to_value())
    }
}

/// Converts a property's string-literal default (`#[property(default = "delay")]`).
pub trait DefaultFrom<S>: Sized {
    /// The value named by `source`.
    fn default_from(source: S) -> Self;
}

impl DefaultFrom<&str> for String {
    fn default_from(source: &str) -> Self {
        source.to_string()
    }
}

impl DefaultFrom<&str> for Option<String> {
    fn default_from(source: &str) -> Self {
        Some(source.to_string())
    }
}

impl PropertyType for bool {
    const KIND: PropertyKind = PropertyKind::Bool;
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}

macro_rules! uint_property {
    ($($t:ty => $bits:expr),*) => {$(
        impl PropertyType for $t {
            const KIND: PropertyKind = PropertyKind::Uint($bits);
            fn to_value(&self) -> Value {
                Value::Uint(u64::from(*self))
            }
            fn from_value(value: Value) -> Option<Self> {
                match value {
                    Value::Uint(v) => <$t>::try_from(v).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
uint_property!(u8 => 8, u16 => 16, u32 => 32, u64 => 64);

macro_rules! int_property {
    ($($t:ty => $bits:expr),*) => {$(
        impl PropertyType for $t {
            const KIND: PropertyKind = PropertyKind::Int($bits);
            fn to_value(&self) -> Value {
                Value::Int(i64::from(*self))
            }
            fn from_value(value: Value) -> Option<Self> {
                match value {
                    Value::Int(v) => <$t>::try_from(v).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
int_property!(i8 => 8, i16 => 16, i32 => 32, i64 => 64);

/// A size in bytes (`512M`, `2G`): QEMU's `size` property type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl PropertyType for Size {
    const KIND: PropertyKind = PropertyKind::Size;
    fn to_value(&self) -> Value {
        Value::Uint(self.0)
    }
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Uint(v) => Some(Size(v)),
            _ => None,
        }
    }
}

impl PropertyType for String {
    const KIND: PropertyKind = PropertyKind::Str;
    fn to_value(&self) -> Value {
        Value::Str(self.clone())
    }
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// An optional string: unset reads as empty and shows no default.
impl PropertyType for Option<String> {
    const KIND: PropertyKind = PropertyKind::Str;
    fn to_value(&self) -> Value {
        Value::Str(self.clone().unwrap_or_default())
    }
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Str(s) if s.is_empty() => Some(None),
            Value::Str(s) => Some(Some(s)),
            _ => None,
        }
    }
    fn default_value(&self) -> Option<Value> {
        self.as_ref().map(|s| Value::Str(s.clone()))
    }
}

/// An enum property's Rust type: declared with [`crate::qom_enum!`].
pub trait QomEnum: Copy + Send + Sync + 'static {
    /// The QAPI enum's name (`LostTickPolicy`).
    const ENUM_NAME: &'static str;
    /// The value names, in declaration order.
    const NAMES: &'static [&'static str];
    /// The name of `self`.
    fn name(self) -> &'static str;
    /// The value named `name`.
    fn from_name(name: &str) -> Option<Self>;
}

/// Declares an enum usable as a property type (QEMU's QAPI enums):
///
/// ```
/// qom::qom_enum! {
///     /// What the PIT does with ticks the guest missed.
///     pub enum LostTickPolicy("LostTickPolicy") {
///         Discard = "discard",
///         Delay = "delay",
///     }
/// }
/// assert_eq!(<LostTickPolicy as qom::QomEnum>::NAMES, &["discard", "delay"]);
/// ```
#[macro_export]
macro_rules! qom_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident($qapi:literal) {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vmeta])* $variant),* }

        impl $crate::QomEnum for $name {
            const ENUM_NAME: &'static str = $qapi;
            const NAMES: &'static [&'static str] = &[$($text),*];
            fn name(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
            fn from_name(name: &str) -> Option<Self> {
                match name { $($text => Some($name::$variant),)* _ => None }
            }
        }

        impl $crate::PropertyType for $name {
            const KIND: $crate::PropertyKind =
                $crate::PropertyKind::Enum($qapi, <$name as $crate::QomEnum>::NAMES);
            fn to_value(&self) -> $crate::Value {
                $crate::Value::Str($crate::QomEnum::name(*self).to_string())
            }
            fn from_value(value: $crate::Value) -> Option<Self> {
                match value {
                    $crate::Value::Str(s) => $crate::QomEnum::from_name(&s),
                    _ => None,
                }
            }
        }

        impl $crate::DefaultFrom<&str> for $name {
            fn default_from(source: &str) -> Self {
                match <$name as $crate::QomEnum>::from_name(source) {
                    Some(v) => v,
                    None => panic!("'{}' is no value of enum {}", source, $qapi),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                [$($name::$variant),*][0]
            }
        }
    };
}

fn field_state<'a, S: Any>(obj: &'a Object, prop: &Property) -> Result<&'a S, Error> {
    obj.downcast::<S>().ok_or_else(|| Error::PropertyNotFound {
        type_name: obj.type_name().to_string(),
        name: prop.name.to_string(),
    })
}

/// The getter `#[derive(Object)]` generates for a `#[property]` field.
pub fn field_get<S: Any, T: PropertyType>(
    obj: &Object,
    prop: &Property,
    field: fn(&S) -> &Prop<T>,
) -> Result<Value, Error> {
    Ok(field(field_state::<S>(obj, prop)?).get().to_value())
}

/// The setter `#[derive(Object)]` generates for a `#[property]` field.
pub fn field_set<S: Any, T: PropertyType>(
    obj: &Object,
    prop: &Property,
    value: Value,
    field: fn(&S) -> &Prop<T>,
) -> Result<(), Error> {
    let value = T::from_value(value).ok_or_else(|| Error::InvalidParameterType {
        name: prop.name.to_string(),
        expected: prop.kind.type_name().into_owned(),
    })?;
    field(field_state::<S>(obj, prop)?).set(value);
    Ok(())
}

/// A counted reference to an object known to be of typed `T`: derefs to `T`'s state.
pub struct Typed<T: ObjectType> {
    obj: ObjectRef,
    _state: std::marker::PhantomData<fn() -> T>,
}

impl<T: ObjectType> Typed<T> {
    /// `obj` as a `T`, if its class is `T` or a subtype.
    pub fn new(obj: ObjectRef) -> Option<Self> {
        obj.downcast::<T>()?;
        Some(Typed {
            obj,
            _state: std::marker::PhantomData,
        })
    }

    /// The object.
    pub fn object(&self) -> &ObjectRef {
        &self.obj
    }

    /// The object, giving up the typed view.
    pub fn into_object(self) -> ObjectRef {
        self.obj
    }
}

impl<T: ObjectType> Clone for Typed<T> {
    fn clone(&self) -> Self {
        Typed {
            obj: self.obj.clone(),
            _state: std::marker::PhantomData,
        }
    }
}

impl<T: ObjectType> std::ops::Deref for Typed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self.obj.downcast::<T>() {
            Some(state) => state,
            // `new` checked the class, and an object's class never changes.
            None => unreachable!("typed reference to a {} without its state", T::TYPE_NAME),
        }
    }
}

impl<T: ObjectType> fmt::Debug for Typed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Typed<{}>({:?})", T::TYPE_NAME, self.obj)
    }
}

/// A type's instance state as the object holds it: a typed state projects to its
/// ancestors, a legacy part (one per type, `InstanceSpec::of`) only to itself.
pub(crate) trait InstanceState: Send + Sync {
    fn project(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)>;
    fn levels<'a>(&'a self, f: &mut dyn FnMut(TypeId, &'a (dyn Any + Send + Sync)));
}

pub(crate) struct TypedState<T: ObjectType>(pub(crate) T);

impl<T: ObjectType> InstanceState for TypedState<T> {
    #[inline]
    fn project(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)> {
        self.0.project(id)
    }
    fn levels<'a>(&'a self, f: &mut dyn FnMut(TypeId, &'a (dyn Any + Send + Sync))) {
        self.0.for_each_level(f)
    }
}

pub(crate) struct LegacyPart<T: Any + Send + Sync>(pub(crate) T);

impl<T: Any + Send + Sync> InstanceState for LegacyPart<T> {
    #[inline]
    fn project(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)> {
        (id == TypeId::of::<T>()).then_some(&self.0 as &(dyn Any + Send + Sync))
    }
    fn levels<'a>(&'a self, f: &mut dyn FnMut(TypeId, &'a (dyn Any + Send + Sync))) {
        f(TypeId::of::<T>(), &self.0)
    }
}
