//! Containers and the root of the composition tree (QEMU's `qom/container.c`).

use std::sync::OnceLock;

use crate::object::{object_new, ObjectRef};
use crate::type_init;

/// QEMU's `TYPE_CONTAINER`: an object that only holds children.
pub const TYPE_CONTAINER: &str = "container";

type_init! {
    name: TYPE_CONTAINER,
    parent: Some(crate::TYPE_OBJECT),
}

/// QEMU's `object_get_root`: the process's root container, `/`.
pub fn object_get_root() -> ObjectRef {
    static ROOT: OnceLock<ObjectRef> = OnceLock::new();
    ROOT.get_or_init(|| {
        // `container` is registered in this crate, so it is in every table built from the
        // link-time registrations; a broken table is reported at start-up before any use.
        object_new(TYPE_CONTAINER).expect("the type table has the 'container' type")
    })
    .clone()
}

/// QEMU's `container_get`: the object at `path` under `root`, creating missing containers
/// along the way (`/machine/unattached`). Threads racing to create the same container all
/// get the one that won.
pub fn container_get(root: &ObjectRef, path: &str) -> ObjectRef {
    let mut cur = root.clone();
    for component in path.split('/').filter(|c| !c.is_empty()) {
        cur = match cur.child(component) {
            Some(child) => child,
            None => {
                let child =
                    object_new(TYPE_CONTAINER).expect("the type table has the 'container' type");
                match cur.add_child(component, &child) {
                    Ok(_) => child,
                    // Another thread added it since the look-up: use that one.
                    Err(e) => cur.child(component).unwrap_or_else(|| {
                        panic!("container_get: '{component}' is taken by a non-child: {e}")
                    }),
                }
            }
        };
    }
    cur
}
