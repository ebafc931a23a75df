//! Objects: QEMU's `Object`, `object_new`, casts, properties and the composition tree.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;

use crate::class::ObjectClass;
use crate::container::object_get_root;
use crate::property::{format_value, Property, PropertyKind, Value};
use crate::type_table::{type_table, TypeTable};
use crate::typed::InstanceState;
use crate::Error;

/// The instance states of an object: one typed state (which embeds its ancestors') or
/// one legacy part per type.
enum Parts {
    One(Box<dyn InstanceState>),
    Many(Box<[Box<dyn InstanceState>]>),
}

impl Parts {
    fn iter(&self) -> impl Iterator<Item = &dyn InstanceState> {
        let slice: &[Box<dyn InstanceState>] = match self {
            Parts::One(part) => std::slice::from_ref(part),
            Parts::Many(parts) => parts,
        };
        slice.iter().map(|part| &**part)
    }
}

/// How many levels of a chain the cast table holds (the pc board's deepest is 5).
const LEVEL_SLOTS: usize = 6;

/// Each level's state by Rust type, root first, `ObjectBase` left out: `downcast` is a
/// short scan of this table, with no dynamic call until the final `Any` check. Built on
/// the first cast, so creating an object costs nothing for it.
struct Levels<'a>(OnceLock<LevelTable<'a>>);

struct LevelTable<'a> {
    slots: [Option<(TypeId, &'a (dyn Any + Send + Sync))>; LEVEL_SLOTS],
    overflowed: bool,
}

impl<'a> LevelTable<'a> {
    fn of(parts: &'a Parts) -> Self {
        let mut levels = LevelTable {
            slots: [None; LEVEL_SLOTS],
            overflowed: false,
        };
        let mut next = 0;
        for part in parts.iter() {
            part.levels(&mut |id, state| {
                if id == TypeId::of::<crate::ObjectBase>() {
                    return;
                }
                match levels.slots.get_mut(next) {
                    Some(slot) => *slot = Some((id, state)),
                    None => levels.overflowed = true,
                }
                next += 1;
            });
        }
        levels
    }
}

self_cell::self_cell!(
    struct InstanceStates {
        owner: Parts,
        #[not_covariant]
        dependent: Levels,
    }
);

impl InstanceStates {
    fn build(class: &ObjectClass, this: &WeakObjectRef) -> Self {
        let parts = match &*class.parts {
            [spec] => Parts::One((spec.new)(this)),
            specs => Parts::Many(specs.iter().map(|spec| (spec.new)(this)).collect()),
        };
        InstanceStates::new(parts, |_| Levels(OnceLock::new()))
    }

    /// The state of Rust type `id` in the chain.
    #[inline]
    fn find(&self, id: TypeId) -> Option<&(dyn Any + Send + Sync)> {
        self.with_dependent(|parts, levels| {
            let table = levels.0.get_or_init(|| LevelTable::of(parts));
            for (level, state) in table.slots.iter().map_while(Option::as_ref) {
                if *level == id {
                    return Some(*state);
                }
            }
            if !table.overflowed && id != TypeId::of::<crate::ObjectBase>() {
                return None;
            }
            // The root, or a chain deeper than the table: walk it.
            parts.iter().find_map(|part| part.project(id))
        })
    }
}

/// A counted reference to an object (QEMU's `object_ref`/`object_unref`).
pub type ObjectRef = Arc<Object>;
/// A reference that does not keep the object alive.
pub type WeakObjectRef = Weak<Object>;

/// Where an object sits in the composition tree, and the properties it added itself.
#[derive(Default)]
struct Tree {
    parent: Option<WeakObjectRef>,
    name: Option<Arc<str>>,
    /// `child<>` properties, in the order they were added.
    children: Vec<(Arc<str>, ObjectRef)>,
    /// Instance properties (QEMU's `object_property_add`), `child<>` ones included.
    properties: Vec<Arc<Property>>,
}

/// An instance of a QOM type.
///
/// Each type of the chain contributes a Rust part ([`crate::InstanceSpec`]), reached with
/// [`Object::downcast`]; parts use interior mutability because vCPU threads and the monitor
/// share objects.
pub struct Object {
    class: &'static ObjectClass,
    this: WeakObjectRef,
    state: InstanceStates,
    tree: RwLock<Tree>,
    values: Mutex<FxHashMap<Arc<str>, Value>>,
}

/// `object`'s `class_init`: the `type` property every object has.
pub(crate) fn object_class_init(class: &mut ObjectClass) {
    fn get_type(obj: &Object, _: &Property) -> Result<Value, Error> {
        Ok(Value::Str(obj.type_name().to_string()))
    }
    class.add_property(Property::custom(
        "type",
        PropertyKind::Str,
        Some(get_type),
        None,
        "The QOM type of the object",
    ));
}

/// QEMU's `object_new`: a new instance of `typename` from the process's type table.
pub fn object_new(typename: &str) -> Result<ObjectRef, Error> {
    object_new_in(type_table()?, typename)
}

/// `object_new` on a given table (tests build their own tables).
pub fn object_new_in(table: &'static TypeTable, typename: &str) -> Result<ObjectRef, Error> {
    let class = table
        .class_by_name(typename)
        .ok_or_else(|| Error::UnknownType(typename.to_string()))?;
    Object::new_with_class(class)
}

impl Object {
    /// Instantiates `class`: parts built, `instance_init` root to leaf, then
    /// `instance_post_init` leaf to root.
    pub fn new_with_class(class: &'static ObjectClass) -> Result<ObjectRef, Error> {
        if class.is_abstract() {
            return Err(Error::AbstractType {
                name: class.name(),
                location: class.type_info().location,
            });
        }
        let obj = Arc::new_cyclic(|this| Object {
            class,
            this: this.clone(),
            state: InstanceStates::build(class, this),
            tree: RwLock::new(Tree::default()),
            values: Mutex::new(FxHashMap::default()),
        });
        for info in class.chain.iter() {
            if let Some(init) = info.instance_init {
                init(&obj);
            }
        }
        for info in class.chain.iter().rev() {
            if let Some(post) = info.instance_post_init {
                post(&obj);
            }
        }
        Ok(obj)
    }

    /// The object's class.
    #[inline]
    pub fn class(&self) -> &'static ObjectClass {
        self.class
    }

    /// The object's type name.
    #[inline]
    pub fn type_name(&self) -> &'static str {
        self.class.name()
    }

    /// A new counted reference to this object. `None` only while it is being finalized.
    pub fn to_ref(&self) -> Option<ObjectRef> {
        self.this.upgrade()
    }

    /// A weak reference to this object.
    pub fn downgrade(&self) -> WeakObjectRef {
        self.this.clone()
    }

    /// QEMU's `object_dynamic_cast`: `Some(self)` if the object is of type `name`, a subtype
    /// or an implementation of it. Neither allocates nor locks.
    #[inline]
    pub fn dynamic_cast(&self, name: &str) -> Option<&Self> {
        self.class.dynamic_cast(name).map(|_| self)
    }

    /// Whether the object is of type `name` (or a subtype or implementation).
    #[inline]
    pub fn is_a(&self, name: &str) -> bool {
        self.class.is_a(name)
    }

    /// The Rust part of type `T` one of the object's types added (`DeviceState`,
    /// `IsaDevice`, the concrete device's struct...). Neither allocates nor locks.
    #[inline]
    pub fn downcast<T: Any>(&self) -> Option<&T> {
        self.state.find(TypeId::of::<T>())?.downcast_ref()
    }

    /// The object's implementation of interface trait `I` (QEMU's cast to an interface,
    /// e.g. `ACPI_DEVICE_IF(obj)` followed by a call through its class), if its class
    /// implements it.
    #[inline]
    pub fn interface<I: ?Sized + 'static>(&self) -> Option<&I> {
        self.class.interface_impl::<I>()?(self)
    }

    /// QEMU's checked cast of an object to a typed QOM type (`PCI_BUS(obj)`,
    /// `ISA_DEVICE(obj)`): the state of type `T` inside this object, if its class is `T` or
    /// a subtype. [`Object::downcast`] also reaches legacy parts.
    #[inline]
    pub fn cast<T: crate::ObjectType>(&self) -> Option<&T> {
        self.downcast::<T>()
    }

    // ----- composition tree -----

    /// The object's parent in the composition tree.
    pub fn parent(&self) -> Option<ObjectRef> {
        self.tree.read().parent.as_ref().and_then(Weak::upgrade)
    }

    /// The name of the `child<>` property that holds this object in its parent.
    pub fn name_in_parent(&self) -> Option<Arc<str>> {
        self.tree.read().name.clone()
    }

    /// The object's children, in the order they were added.
    pub fn children(&self) -> Vec<(Arc<str>, ObjectRef)> {
        self.tree.read().children.clone()
    }

    /// The child named `name`.
    pub fn child(&self, name: &str) -> Option<ObjectRef> {
        let tree = self.tree.read();
        tree.children
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, c)| c.clone())
    }

    /// QEMU's `object_property_add_child`: makes `child` a child of this object under `name`.
    /// A name ending in `[*]` takes the first free index (`device[0]`, `device[1]`...).
    /// Returns the name used.
    pub fn add_child(&self, name: &str, child: &ObjectRef) -> Result<Arc<str>, Error> {
        if let Some(path) = child.parent().and_then(|_| child.canonical_path()) {
            return Err(Error::AlreadyParented {
                type_name: child.type_name().to_string(),
                path,
            });
        }
        let mut tree = self.tree.write();
        let name: Arc<str> = match name.strip_suffix("[*]") {
            Some(stem) => {
                let taken = |n: &str| {
                    tree.properties.iter().any(|p| p.name == n)
                        || self.class.find_property(n).is_some()
                };
                let free = (0..)
                    .map(|i| format!("{stem}[{i}]"))
                    .find(|n| !taken(n))
                    .expect("an unbounded range has a free index");
                free.into()
            }
            None => {
                if tree.properties.iter().any(|p| p.name == name)
                    || self.class.find_property(name).is_some()
                {
                    return Err(Error::DuplicateProperty {
                        type_name: self.type_name().to_string(),
                        name: name.to_string(),
                    });
                }
                name.into()
            }
        };
        tree.properties.push(Arc::new(Property {
            name: Cow::Owned(name.to_string()),
            kind: PropertyKind::Child(child.type_name()),
            description: "",
            default: crate::PropertyDefault::None,
            getter: Some(get_child_path),
            setter: None,
            check_set: None,
            accessor: None,
        }));
        tree.children.push((name.clone(), child.clone()));
        drop(tree);
        let mut child_tree = child.tree.write();
        child_tree.parent = Some(self.this.clone());
        child_tree.name = Some(name.clone());
        Ok(name)
    }

    /// QEMU's `object_unparent`: removes the object from its parent (running the class's
    /// `unparent` hook first) and drops the parent's reference.
    pub fn unparent(&self) {
        let Some(parent) = self.parent() else { return };
        if let Some(hook) = self.class.unparent {
            hook(self);
        }
        let name = {
            let mut tree = self.tree.write();
            tree.parent = None;
            tree.name.take()
        };
        if let Some(name) = name {
            let removed = {
                let mut ptree = parent.tree.write();
                ptree.properties.retain(|p| p.name != *name);
                let pos = ptree.children.iter().position(|(n, _)| *n == name);
                pos.map(|i| ptree.children.remove(i))
            };
            // The parent's reference drops here, outside its lock: finalizers may run.
            drop(removed);
        }
    }

    /// QEMU's `object_get_canonical_path`: `/machine/unattached/device[0]`; `/` for a root,
    /// `None` for an object outside any tree.
    pub fn canonical_path(&self) -> Option<String> {
        let mut parts = Vec::new();
        let mut cur = self.to_ref()?;
        loop {
            let (parent, name) = {
                let tree = cur.tree.read();
                (
                    tree.parent.as_ref().and_then(Weak::upgrade),
                    tree.name.clone(),
                )
            };
            match (parent, name) {
                (Some(p), Some(n)) => {
                    parts.push(n);
                    cur = p;
                }
                _ => break,
            }
        }
        // A subtree not attached to the process's root gets paths relative to its own root,
        // so that tests can build private trees.
        let rel: Vec<&str> = parts.iter().rev().map(|s| &**s).collect();
        Some(format!("/{}", rel.join("/")))
    }

    // ----- properties -----

    /// Adds an instance property (QEMU's `object_property_add`).
    pub fn add_property(&self, property: Property) -> Result<(), Error> {
        let mut tree = self.tree.write();
        if tree.properties.iter().any(|p| p.name == property.name)
            || self.class.find_property(&property.name).is_some()
        {
            return Err(Error::DuplicateProperty {
                type_name: self.type_name().to_string(),
                name: property.name.to_string(),
            });
        }
        tree.properties.push(Arc::new(property));
        Ok(())
    }

    /// Finds a property: the object's own first, then its class's.
    pub fn find_property(&self, name: &str) -> Option<Arc<Property>> {
        if let Some(p) = self.tree.read().properties.iter().find(|p| p.name == name) {
            return Some(p.clone());
        }
        self.class.find_property(name).cloned()
    }

    /// Every property: the object's own, then its class's (QEMU's order).
    pub fn properties(&self) -> Vec<Arc<Property>> {
        let mut list = self.tree.read().properties.clone();
        list.extend(self.class.properties().iter().cloned());
        list
    }

    fn property(&self, name: &str) -> Result<Arc<Property>, Error> {
        self.find_property(name)
            .ok_or_else(|| Error::PropertyNotFound {
                type_name: self.type_name().to_string(),
                name: name.to_string(),
            })
    }

    /// QEMU's `object_property_get`.
    pub fn property_get(&self, name: &str) -> Result<Value, Error> {
        let prop = self.property(name)?;
        if let Some(accessor) = prop.accessor {
            return accessor.get(self, &prop);
        }
        if let Some(get) = prop.getter {
            return get(self, &prop);
        }
        if prop.setter.is_some() {
            return Err(Error::WriteOnlyProperty {
                type_name: self.type_name().to_string(),
                name: name.to_string(),
            });
        }
        Ok(self
            .values
            .lock()
            .get(name)
            .cloned()
            .unwrap_or_else(|| prop.default_value()))
    }

    /// QEMU's `object_property_set`: checks the value against the property, then writes it.
    pub fn property_set(&self, name: &str, value: Value) -> Result<(), Error> {
        let prop = self.property(name)?;
        if let Some(check) = prop.check_set {
            check(self, &prop)?;
        }
        if let Some(accessor) = prop.accessor {
            prop.validate(&value)?;
            return accessor.set(self, &prop, value).unwrap_or_else(|| {
                Err(Error::ReadOnlyProperty {
                    type_name: self.type_name().to_string(),
                    name: name.to_string(),
                })
            });
        }
        if let Some(set) = prop.setter {
            prop.validate(&value)?;
            return set(self, &prop, value);
        }
        if !prop.is_stored() {
            return Err(Error::ReadOnlyProperty {
                type_name: self.type_name().to_string(),
                name: name.to_string(),
            });
        }
        prop.validate(&value)?;
        self.values.lock().insert(Arc::from(name), value);
        Ok(())
    }

    /// QEMU's `object_property_parse`: sets a property from its command-line spelling.
    /// Link paths resolve from the process's root.
    pub fn property_parse(&self, name: &str, text: &str) -> Result<(), Error> {
        let prop = self.property(name)?;
        let value = prop.parse(text, |path| resolve_path(&object_get_root(), path))?;
        self.property_set(name, value)
    }

    /// QEMU's `object_property_print`: a property's value as text.
    pub fn property_print(&self, name: &str) -> Result<String, Error> {
        Ok(format_value(&self.property_get(name)?))
    }

    /// A `bool` property's value.
    pub fn prop_bool(&self, name: &str) -> Result<bool, Error> {
        match self.property_get(name)? {
            Value::Bool(b) => Ok(b),
            _ => Err(self.type_mismatch(name, "bool")),
        }
    }

    /// An unsigned or size property's value.
    pub fn prop_uint(&self, name: &str) -> Result<u64, Error> {
        match self.property_get(name)? {
            Value::Uint(v) => Ok(v),
            _ => Err(self.type_mismatch(name, "uint64")),
        }
    }

    /// A signed property's value.
    pub fn prop_int(&self, name: &str) -> Result<i64, Error> {
        match self.property_get(name)? {
            Value::Int(v) => Ok(v),
            _ => Err(self.type_mismatch(name, "int64")),
        }
    }

    /// A string or enum property's value.
    pub fn prop_str(&self, name: &str) -> Result<String, Error> {
        match self.property_get(name)? {
            Value::Str(s) => Ok(s),
            _ => Err(self.type_mismatch(name, "str")),
        }
    }

    /// A `link<>` property's target.
    pub fn prop_link(&self, name: &str) -> Result<Option<ObjectRef>, Error> {
        match self.property_get(name)? {
            Value::Link(l) => Ok(l),
            _ => Err(self.type_mismatch(name, "link")),
        }
    }

    fn type_mismatch(&self, name: &str, expected: &str) -> Error {
        Error::InvalidParameterType {
            name: name.to_string(),
            expected: expected.to_string(),
        }
    }

    /// Follows one path component from this object: a child, or a link's target.
    fn step(&self, component: &str) -> Option<ObjectRef> {
        if let Some(child) = self.child(component) {
            return Some(child);
        }
        let prop = self.find_property(component)?;
        match prop.kind {
            PropertyKind::Link(_) => self.prop_link(component).ok().flatten(),
            _ => None,
        }
    }
}

fn get_child_path(obj: &Object, prop: &Property) -> Result<Value, Error> {
    let child = obj
        .child(&prop.name)
        .ok_or_else(|| Error::PropertyNotFound {
            type_name: obj.type_name().to_string(),
            name: prop.name.to_string(),
        })?;
    Ok(Value::Str(child.canonical_path().unwrap_or_default()))
}

impl Drop for Object {
    fn drop(&mut self) {
        for info in self.class.chain.iter().rev() {
            if let Some(finalize) = info.instance_finalize {
                finalize(self);
            }
        }
    }
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("type", &self.type_name())
            .field("name", &self.tree.read().name)
            .finish_non_exhaustive()
    }
}

/// QEMU's `object_resolve_path` from `root`: an absolute path (`/machine/peripheral/ser0`)
/// walks `child<>` and `link<>` properties from `root`; a partial path (`ser0`,
/// `peripheral/ser0`) must name exactly one object anywhere under `root`.
pub fn resolve_path(root: &ObjectRef, path: &str) -> Result<ObjectRef, Error> {
    resolve(root, path, None)
}

/// `resolve_path` keeping only objects of type `typename`: a partial path is ambiguous only
/// if several matches have that type (QEMU's `object_resolve_path_type`).
pub fn resolve_path_type(root: &ObjectRef, path: &str, typename: &str) -> Result<ObjectRef, Error> {
    resolve(root, path, Some(typename))
}

fn resolve(root: &ObjectRef, path: &str, typename: Option<&str>) -> Result<ObjectRef, Error> {
    let not_found = || Error::PathNotFound(path.to_string());
    let type_ok = |o: &ObjectRef| typename.is_none_or(|t| o.is_a(t));
    if let Some(abs) = path.strip_prefix('/') {
        let mut cur = root.clone();
        for component in abs.split('/').filter(|c| !c.is_empty()) {
            cur = cur.step(component).ok_or_else(not_found)?;
        }
        return if type_ok(&cur) {
            Ok(cur)
        } else {
            Err(not_found())
        };
    }
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if components.is_empty() {
        return Err(not_found());
    }
    let mut found: Vec<ObjectRef> = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(start) = stack.pop() {
        let mut cur = Some(start.clone());
        for component in &components {
            cur = cur.and_then(|c| c.step(component));
        }
        if let Some(hit) = cur {
            if type_ok(&hit) && !found.iter().any(|f| Arc::ptr_eq(f, &hit)) {
                found.push(hit);
            }
        }
        stack.extend(start.children().into_iter().map(|(_, c)| c));
    }
    match found.len() {
        0 => Err(not_found()),
        1 => Ok(found.remove(0)),
        _ => Err(Error::AmbiguousPath(path.to_string())),
    }
}
