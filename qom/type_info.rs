//! The static record a type registers: QEMU's `TypeInfo`.

use std::fmt;

use crate::class::ObjectClass;
use crate::object::Object;
use crate::typed::{InstanceState, LegacyPart, ObjectType, TypedState};

/// Where a type was registered, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Source file of the `type_init!` call.
    pub file: &'static str,
    /// Line of the `type_init!` call.
    pub line: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// How to build the Rust state one type adds to its instances.
///
/// A typed type ([`crate::ObjectType`], registered with `type_init!(Type)`) holds its whole
/// chain in one struct that embeds its parent's, as QEMU's instance structs do; its spec
/// replaces the parent's. A legacy part ([`InstanceSpec::of`]) is added beside the parts of
/// the parent types. Either is reached by Rust type with [`crate::Object::downcast`].
#[derive(Clone, Copy)]
pub struct InstanceSpec {
    /// The Rust name of the state, for messages.
    pub(crate) rust_name: fn() -> &'static str,
    /// Builds the state in its default state, before any `instance_init`.
    pub(crate) new: fn() -> Box<dyn InstanceState>,
    /// Whether the state embeds the parent types' states (typed) or sits beside them.
    pub(crate) embeds_parent: bool,
}

impl InstanceSpec {
    /// A part of Rust type `T` added beside the parent types' parts, built with
    /// `T::default()`.
    pub const fn of<T: Default + Send + Sync + 'static>() -> Self {
        fn new<T: Default + Send + Sync + 'static>() -> Box<dyn InstanceState> {
            Box::new(LegacyPart(T::default()))
        }
        InstanceSpec {
            rust_name: std::any::type_name::<T>,
            new: new::<T>,
            embeds_parent: false,
        }
    }

    /// The whole state of typed `T`, which embeds its ancestors' states.
    pub const fn typed<T: ObjectType>() -> Self {
        fn new<T: ObjectType>() -> Box<dyn InstanceState> {
            Box::new(TypedState(T::default()))
        }
        InstanceSpec {
            rust_name: std::any::type_name::<T>,
            new: new::<T>,
            embeds_parent: true,
        }
    }
}

/// A class-level hook (`class_init`, `class_base_init`).
pub type ClassHook = fn(&mut ObjectClass);
/// An instance-level hook (`instance_init`, `instance_post_init`, `instance_finalize`).
pub type InstanceHook = fn(&Object);

/// The record a type registers with [`crate::type_init!`] (QEMU's `TypeInfo`).
#[derive(Clone, Copy)]
pub struct TypeInfo {
    /// The type's unique name, e.g. `"isa-serial"`.
    pub name: &'static str,
    /// The parent type; `None` only for the roots `object` and `interface`.
    pub parent: Option<&'static str>,
    /// Abstract types cannot be instantiated.
    pub abstract_: bool,
    /// Interfaces the type implements (each must descend from `interface`).
    pub interfaces: &'static [&'static str],
    /// Runs on the new class after the ancestors' `class_base_init`.
    pub class_init: Option<ClassHook>,
    /// Runs on the class of every descendant type (not this type's own class).
    pub class_base_init: Option<ClassHook>,
    /// The Rust state this type adds to its instances, if any.
    pub instance: Option<InstanceSpec>,
    /// Runs on a new instance, root type first.
    pub instance_init: Option<InstanceHook>,
    /// Runs after every `instance_init`, leaf type first.
    pub instance_post_init: Option<InstanceHook>,
    /// Runs when the last reference drops, leaf type first.
    pub instance_finalize: Option<InstanceHook>,
    /// Where the type was registered (filled in by `type_init!`).
    pub location: Location,
}

impl TypeInfo {
    /// A record with every optional field empty, for struct update syntax.
    pub const DEFAULT: TypeInfo = TypeInfo {
        name: "",
        parent: None,
        abstract_: false,
        interfaces: &[],
        class_init: None,
        class_base_init: None,
        instance: None,
        instance_init: None,
        instance_post_init: None,
        instance_finalize: None,
        location: Location { file: "", line: 0 },
    };
}

impl fmt::Debug for TypeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypeInfo")
            .field("name", &self.name)
            .field("parent", &self.parent)
            .field("abstract", &self.abstract_)
            .field("interfaces", &self.interfaces)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}
