//! QEMU's object model (QOM) in Rust.
//!
//! The flow follows QEMU's `qom/object.c`:
//!
//! * every type submits a [`TypeInfo`] record at link time with [`type_init!`] (QEMU's
//!   `type_init` + `type_register_static`, collected by the `inventory` crate instead of
//!   `__attribute__((constructor))`);
//! * the records become a validated [`TypeTable`] once, on first use (`module_call_init`);
//! * a type's [`ObjectClass`] is built lazily and exactly once (`type_initialize`): a copy of
//!   the parent class, then every ancestor's `class_base_init`, then the type's `class_init`;
//! * [`object_new`] builds an instance: `instance_init` root to leaf, `instance_post_init` leaf
//!   to root, and `instance_finalize` leaf to root when the last [`ObjectRef`] drops;
//! * properties ([`Property`]) and the composition tree (`child<>`/`link<>`, [`object_get_root`],
//!   [`resolve_path`]) give every object a path such as `/machine/unattached/device[0]`.
//!
//! This crate knows nothing about KVM or devices; `hw` adds qdev, buses and machines on top.

#![deny(missing_docs)]

// `#[derive(Object)]` names `::qom`, also inside this crate (its own tests).
extern crate self as qom;

mod class;
mod container;
mod error;
pub mod error_report;
mod object;
pub mod object_interfaces;
mod property;
mod type_info;
mod type_table;
pub mod typed;

pub use class::{ClassLevel, InterfaceClass, ObjectClass};
pub use container::{container_get, object_get_root, TYPE_CONTAINER};
pub use error::Error;
pub use object::{
    object_new, object_new_in, resolve_path, resolve_path_type, Object, ObjectRef, WeakObjectRef,
};
pub use object_interfaces::{
    object_get_objects_root, user_creatable_add_type, user_creatable_del, UserCreatable,
    TYPE_USER_CREATABLE,
};
pub use property::{
    parse_size, Getter, Property, PropertyAccessor, PropertyDefault, PropertyInfo, PropertyKind,
    Setter, StateAccessor, Value,
};
pub use type_info::{InstanceSpec, Location, TypeInfo, TypeRegistrar};
pub use type_table::{
    object_class_by_name, object_class_foreach, object_class_get_list, type_table, TypeImpl,
    TypeTable, TypeTableError, TypeTableErrors,
};

pub use typed::{
    object_class_init, ClassInitFor, DefaultFrom, ImplCast, Interface, IsA, ObjectBase, ObjectType,
    Prop, PropertyType, QomEnum, Size, Typed,
};

/// `#[derive(qom::Object)]`: see [`typed`].
pub use qom_macros::Object;

#[doc(hidden)]
pub use inventory;

/// Name of the root of the type hierarchy (QEMU's `TYPE_OBJECT`).
pub const TYPE_OBJECT: &str = "object";
/// Name of the abstract parent of all interfaces (QEMU's `TYPE_INTERFACE`).
pub const TYPE_INTERFACE: &str = "interface";

/// Registers a QOM type at link time: this project's `type_init`.
///
/// Takes the fields of a [`TypeInfo`] (unnamed ones keep [`TypeInfo::DEFAULT`]) and records
/// the source file and line of the registration, so that the type table's errors can point
/// at it. `type_init!(fn register)` submits a [`TypeRegistrar`] instead: a function that
/// returns records computed from a table, each registered as if by its own `type_init!`.
///
/// ```
/// #[derive(Default)]
/// struct Blinker { on: std::sync::atomic::AtomicBool }
///
/// qom::type_init! {
///     name: "doc-blinker",
///     parent: Some(qom::TYPE_OBJECT),
///     instance: Some(qom::InstanceSpec::of::<Blinker>()),
/// }
///
/// let obj = qom::object_new("doc-blinker").unwrap();
/// assert!(obj.downcast::<Blinker>().is_some());
/// ```
#[macro_export]
macro_rules! type_init {
    (fn $register:path) => {
        $crate::inventory::submit! {
            $crate::TypeRegistrar {
                register: $register,
                location: $crate::Location { file: file!(), line: line!() },
            }
        }
    };
    ($ty:ty) => {
        $crate::inventory::submit! {
            $crate::typed::type_info::<$ty>($crate::Location { file: file!(), line: line!() })
        }
    };
    ($ty:ty { $($field:ident : $value:expr),* $(,)? }) => {
        $crate::inventory::submit! {
            $crate::TypeInfo {
                $($field: $value,)*
                ..$crate::typed::type_info::<$ty>($crate::Location { file: file!(), line: line!() })
            }
        }
    };
    ($($field:ident : $value:expr),* $(,)?) => {
        $crate::inventory::submit! {
            $crate::TypeInfo {
                $($field: $value,)*
                location: $crate::Location { file: file!(), line: line!() },
                ..$crate::TypeInfo::DEFAULT
            }
        }
    };
}

inventory::collect!(TypeInfo);
inventory::collect!(TypeRegistrar);

type_init! {
    name: TYPE_OBJECT,
    parent: None,
    abstract_: true,
    class_init: Some(object::object_class_init),
}

type_init! {
    name: TYPE_INTERFACE,
    parent: None,
    abstract_: true,
    class_base_init: Some(class::interface_class_base_init),
}

#[cfg(test)]
mod tests;
