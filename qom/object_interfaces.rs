//! User-creatable objects (QEMU's `qom/object_interfaces.c`): the `user-creatable`
//! interface, `/objects`, and `object-add`/`object-del` below the command line and QMP.
//!
//! A type the user may create with `-object` or QMP's `object-add` implements
//! [`UserCreatable`] (`#[qom(implements = [dyn qom::UserCreatable])]`), as QEMU's types list
//! `TYPE_USER_CREATABLE` among their interfaces. [`user_creatable_add_type`] creates one at
//! `/objects/<id>`, sets its properties and completes it; [`user_creatable_del`] removes it.
//! The front ends (option parsing, QMP argument checks) live in the `qomvm` binary.

use crate::container::{container_get, object_get_root};
use crate::object::{object_new, Object, ObjectRef};
use crate::typed::Interface;
use crate::Error;

/// QEMU's `TYPE_USER_CREATABLE`.
pub const TYPE_USER_CREATABLE: &str = "user-creatable";

/// QEMU's `UserCreatableClass`: what `object-add` calls once the properties are set.
pub trait UserCreatable: Send + Sync {
    /// QEMU's `complete`: checks the properties and brings the object to life (an
    /// iothread starts its thread). An error undoes the `object-add`.
    fn complete(&self) -> Result<(), Error> {
        Ok(())
    }

    /// QEMU's `can_be_deleted`: whether `object-del` may remove it now.
    fn can_be_deleted(&self) -> bool {
        true
    }
}

impl Interface for dyn UserCreatable {
    const TYPE_NAME: &'static str = TYPE_USER_CREATABLE;
}

crate::interface_type!(dyn UserCreatable);

/// `object-add` and `object-del`'s own errors, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum UserCreatableError {
    /// An `id` that is not an identifier (the command line adds [`ID_HINT`]).
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    /// No type of that name.
    #[error("invalid object type: {0}")]
    UnknownType(String),
    /// A type that does not implement `user-creatable`.
    #[error("object type '{0}' isn't supported by object-add")]
    NotUserCreatable(String),
    /// An abstract user-creatable type.
    #[error("object type '{0}' is abstract")]
    Abstract(String),
    /// `object-del` of an id not under `/objects`.
    #[error("object '{0}' not found")]
    NotFound(String),
    /// `object-del` of an object whose `can_be_deleted` refuses.
    #[error("object '{0}' is in use, can not be deleted")]
    InUse(String),
}

impl From<UserCreatableError> for Error {
    fn from(e: UserCreatableError) -> Self {
        Error::other(e)
    }
}

/// The hint QEMU prints under [`UserCreatableError::BadId`] on the command line.
pub const ID_HINT: &str =
    "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";

/// QEMU's `id_wellformed`: letters, digits, `-`, `.`, `_`, starting with a letter.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// QEMU's `object_get_objects_root`: `/objects`, where user-created objects live.
pub fn object_get_objects_root() -> ObjectRef {
    container_get(&object_get_root(), "/objects")
}

/// The user-creatable types that can be instantiated, sorted by name (`-object help`).
pub fn user_creatable_types() -> Vec<&'static str> {
    let mut names: Vec<&'static str> =
        crate::object_class_get_list(Some(TYPE_USER_CREATABLE), false)
            .into_iter()
            .map(|c| c.name())
            .collect();
    names.sort_unstable();
    names
}

/// Whether `type_name` names a type `object-add` accepts (QAPI's `ObjectType` enum).
pub fn is_user_creatable(type_name: &str) -> bool {
    crate::object_class_by_name(type_name)
        .is_some_and(|c| c.is_a(TYPE_USER_CREATABLE) && !c.is_abstract())
}

/// QEMU's `user_creatable_add_type`: creates an object of `type_name`, lets `set_props`
/// set its properties, adds it as `/objects/<id>` and completes it. On any error nothing is
/// left behind.
pub fn user_creatable_add_type(
    type_name: &str,
    id: &str,
    set_props: impl FnOnce(&Object) -> Result<(), Error>,
) -> Result<ObjectRef, Error> {
    if !id_wellformed(id) {
        return Err(UserCreatableError::BadId.into());
    }
    let class = crate::object_class_by_name(type_name)
        .ok_or_else(|| UserCreatableError::UnknownType(type_name.to_string()))?;
    if !class.is_a(TYPE_USER_CREATABLE) {
        return Err(UserCreatableError::NotUserCreatable(type_name.to_string()).into());
    }
    if class.is_abstract() {
        return Err(UserCreatableError::Abstract(type_name.to_string()).into());
    }
    let obj = object_new(type_name)?;
    set_props(&obj)?;
    object_get_objects_root().add_child(id, &obj)?;
    let completed = match obj.interface::<dyn UserCreatable>() {
        Some(uc) => uc.complete(),
        None => Ok(()),
    };
    if let Err(e) = completed {
        obj.unparent();
        return Err(e);
    }
    Ok(obj)
}

/// QEMU's `user_creatable_del`: removes `/objects/<id>` unless it is in use.
pub fn user_creatable_del(id: &str) -> Result<(), Error> {
    let obj = object_get_objects_root()
        .child(id)
        .ok_or_else(|| UserCreatableError::NotFound(id.to_string()))?;
    if let Some(uc) = obj.interface::<dyn UserCreatable>() {
        if !uc.can_be_deleted() {
            return Err(UserCreatableError::InUse(id.to_string()).into());
        }
    }
    obj.unparent();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_identifiers() {
        assert!(id_wellformed("io0"));
        assert!(id_wellformed("a-b.c_d"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("1x"));
        assert!(!id_wellformed("a b"));
        assert!(!id_wellformed("a/b"));
    }

    #[test]
    fn only_user_creatable_types_are_added() {
        let e = user_creatable_add_type("no-such-type", "x", |_| Ok(())).unwrap_err();
        assert_eq!(e.to_string(), "invalid object type: no-such-type");
        let e = user_creatable_add_type(crate::TYPE_CONTAINER, "x", |_| Ok(())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "object type 'container' isn't supported by object-add"
        );
        let e = user_creatable_del("not-there").unwrap_err();
        assert_eq!(e.to_string(), "object 'not-there' not found");
    }
}
