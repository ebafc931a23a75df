//! Errors of the object model, worded as QEMU words them.

use crate::type_info::Location;
use crate::type_table::TypeTableErrors;

/// An error from a QOM operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No type of that name is registered.
    #[error("unknown type '{0}'")]
    UnknownType(String),
    /// The type exists but is abstract (QEMU aborts here; we report it).
    #[error("type '{name}' is abstract and cannot be instantiated (registered at {location})")]
    AbstractType {
        /// The type asked for.
        name: &'static str,
        /// Where it was registered.
        location: Location,
    },
    /// The type table built from the registrations is invalid.
    #[error("invalid type table: {0}")]
    TypeTable(&'static TypeTableErrors),
    /// The object has no property of that name.
    #[error("Property '{type_name}.{name}' not found")]
    PropertyNotFound {
        /// Type of the object asked.
        type_name: String,
        /// Property asked for.
        name: String,
    },
    /// A value out of range or unparsable for the property's type.
    #[error("Parameter '{name}' expects {expected}")]
    InvalidParameterValue {
        /// Property name.
        name: String,
        /// What the property accepts, e.g. "a non-negative integer below 65536".
        expected: String,
    },
    /// A value that is not one of an enum property's names.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidEnumValue {
        /// Property name.
        name: String,
        /// The value given.
        value: String,
    },
    /// A value of the wrong kind, or a link to an object of the wrong type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidParameterType {
        /// Property name.
        name: String,
        /// The expected type.
        expected: String,
    },
    /// A property that cannot be written.
    #[error("Property '{name}' of '{type_name}' is read-only")]
    ReadOnlyProperty {
        /// Type of the object.
        type_name: String,
        /// Property name.
        name: String,
    },
    /// A property that cannot be read.
    #[error("Property '{name}' of '{type_name}' is write-only")]
    WriteOnlyProperty {
        /// Type of the object.
        type_name: String,
        /// Property name.
        name: String,
    },
    /// Adding a property whose name the object already has.
    #[error("attempt to add duplicate property '{name}' to object (type '{type_name}')")]
    DuplicateProperty {
        /// Type of the object.
        type_name: String,
        /// Property name.
        name: String,
    },
    /// Adding a child that already has a parent.
    #[error("object of type '{type_name}' already has a parent at '{path}'")]
    AlreadyParented {
        /// Type of the child.
        type_name: String,
        /// Its current path.
        path: String,
    },
    /// A path that names no object.
    #[error("Device '{0}' not found")]
    PathNotFound(String),
    /// A partial path that matches more than one object.
    #[error("Path '{0}' does not uniquely identify an object")]
    AmbiguousPath(String),
    /// Setting a property that is frozen once the device is realized.
    #[error(
        "Attempt to set property '{name}' on {device} (type '{type_name}') after it was realized"
    )]
    PropertyAfterRealize {
        /// Property name.
        name: String,
        /// `device 'ID'` or `anonymous device`.
        device: String,
        /// Type of the device.
        type_name: String,
    },
    /// A type-specific failure (a device's realize, a machine's init...).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Wraps a layer-specific error (a device's own typed error enum).
    pub fn other(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Other(Box::new(err))
    }
}
