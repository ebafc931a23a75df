//! Classes: QEMU's `ObjectClass` and `type_initialize`.

use std::any::{Any, TypeId};
use std::sync::Arc;

use crate::object::Object;
use crate::property::Property;
use crate::type_info::{InstanceSpec, TypeInfo};
use crate::type_table::{TypeImpl, TypeTable};

/// The data one class level adds to a class (`DeviceClass`, `MachineClass`...).
///
/// A class holds one value per level, copied from the parent class when a subclass is built
/// (QEMU's `memcpy` of the parent class) and then changed by `class_base_init`/`class_init`:
/// that is how a subclass overrides a virtual method and keeps the parent's to chain to.
pub trait ClassLevel: Any + Send + Sync {
    /// Copies the level for a subclass.
    fn clone_level(&self) -> Box<dyn ClassLevel>;
    /// The level as `Any`, for downcasts.
    fn as_any(&self) -> &dyn Any;
    /// The level as mutable `Any`, for downcasts.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any + Clone + Send + Sync> ClassLevel for T {
    fn clone_level(&self) -> Box<dyn ClassLevel> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A type's class: built once, lazily, then shared read-only by every instance.
pub struct ObjectClass {
    pub(crate) table: &'static TypeTable,
    pub(crate) ty: &'static TypeImpl,
    parent: Option<&'static ObjectClass>,
    /// Every name this class can be cast to: its own, its ancestors', its interfaces'.
    /// Precomputed so that casts neither allocate nor lock.
    cast_names: Box<[&'static str]>,
    /// The type chain, root first: instance hooks walk it.
    pub(crate) chain: Box<[&'static TypeInfo]>,
    /// Instance parts, root first: one typed state, or one legacy part per type.
    pub(crate) parts: Box<[InstanceSpec]>,
    interfaces: Vec<&'static ObjectClass>,
    levels: Vec<(TypeId, Box<dyn ClassLevel>)>,
    properties: Vec<Arc<Property>>,
    /// The casters to interface trait objects, by the caster's type (`ImplCast<dyn I>`).
    interface_casts: Vec<(TypeId, Arc<dyn Any + Send + Sync>)>,
    /// Called when an object is removed from the composition tree (QEMU's
    /// `ObjectClass::unparent`; qdev unrealizes the device there).
    pub unparent: Option<fn(&Object)>,
}

impl ObjectClass {
    /// Builds the class of `ty` (QEMU's `type_initialize`). Called once per type through the
    /// table's `OnceLock`.
    pub(crate) fn initialize(table: &'static TypeTable, ty: &'static TypeImpl) -> ObjectClass {
        let parent = ty.parent().map(|p| table.class_of(p));
        let mut class = match parent {
            Some(p) => ObjectClass {
                table,
                ty,
                parent: Some(p),
                cast_names: Box::new([]),
                chain: p.chain.iter().copied().chain([ty.info()]).collect(),
                parts: p.parts.clone(),
                interfaces: p.interfaces.clone(),
                levels: p
                    .levels
                    .iter()
                    .map(|(id, l)| (*id, (**l).clone_level()))
                    .collect(),
                properties: p.properties.clone(),
                interface_casts: p.interface_casts.clone(),
                unparent: p.unparent,
            },
            None => ObjectClass {
                table,
                ty,
                parent: None,
                cast_names: Box::new([]),
                chain: Box::new([ty.info()]),
                parts: Box::new([]),
                interfaces: Vec::new(),
                levels: Vec::new(),
                properties: Vec::new(),
                interface_casts: Vec::new(),
                unparent: None,
            },
        };
        if let Some(spec) = ty.info().instance {
            class.parts = if spec.embeds_parent {
                Box::new([spec])
            } else {
                class.parts.iter().copied().chain([spec]).collect()
            };
        }
        for &iface in ty.interfaces() {
            let iface_class = table.class_of(iface);
            if class
                .interfaces
                .iter()
                .any(|c| std::ptr::eq(*c, iface_class))
            {
                continue;
            }
            // The implementing class gets its own copy of the interface's levels, which its
            // class_init then fills in (QEMU's per-implementation interface class).
            for (id, level) in &iface_class.levels {
                if *id != TypeId::of::<InterfaceClass>() && class.level_index(*id).is_none() {
                    class.levels.push((*id, (**level).clone_level()));
                }
            }
            class.interfaces.push(iface_class);
            class.interfaces.extend(
                iface_class
                    .interfaces
                    .iter()
                    .filter(|c| !class.interfaces.iter().any(|x| std::ptr::eq(*x, **c)))
                    .copied()
                    .collect::<Vec<_>>(),
            );
        }
        let mut names: Vec<&'static str> = Vec::new();
        let mut cur = Some(ty);
        while let Some(t) = cur {
            names.push(t.name());
            cur = t.parent().map(|p| table.get(p));
        }
        for iface in &class.interfaces {
            for name in iface.cast_names.iter() {
                if !names.contains(name) {
                    names.push(name);
                }
            }
        }
        class.cast_names = names.into_boxed_slice();

        // class_base_init of every ancestor, nearest first, as QEMU does.
        let mut ancestor = ty.parent().map(|p| table.get(p));
        while let Some(a) = ancestor {
            if let Some(hook) = a.info().class_base_init {
                hook(&mut class);
            }
            ancestor = a.parent().map(|p| table.get(p));
        }
        if let Some(hook) = ty.info().class_init {
            hook(&mut class);
        }
        for hook in ty.info().interface_impls {
            hook(&mut class);
        }
        class
    }

    /// The type's name.
    pub fn name(&self) -> &'static str {
        self.ty.name()
    }

    /// The type's record.
    pub fn type_info(&self) -> &'static TypeInfo {
        self.ty.info()
    }

    /// The `class_data` of the type's record, if it is a `T` (QEMU's `class_init(oc, data)`).
    pub fn class_data<T: std::any::Any>(&self) -> Option<&'static T> {
        self.ty.info().class_data?.downcast_ref::<T>()
    }

    /// Whether the type is abstract.
    pub fn is_abstract(&self) -> bool {
        self.ty.info().abstract_
    }

    /// The parent class, if any.
    pub fn parent(&self) -> Option<&'static ObjectClass> {
        self.parent
    }

    /// The table this class belongs to.
    pub fn table(&self) -> &'static TypeTable {
        self.table
    }

    /// The interface classes this class implements (own and inherited).
    pub fn interfaces(&self) -> &[&'static ObjectClass] {
        &self.interfaces
    }

    /// Every type name this class can be cast to, own name first.
    pub fn cast_names(&self) -> &[&'static str] {
        &self.cast_names
    }

    /// QEMU's `object_class_dynamic_cast`: `Some(self)` if this class is `name`, descends
    /// from it or implements it. Neither allocates nor locks.
    #[inline]
    pub fn dynamic_cast(&self, name: &str) -> Option<&Self> {
        // Callers mostly pass the same `&'static str` constants the table holds, so a pointer
        // comparison settles most hits before any byte is compared; names of another length
        // are never compared byte by byte. One pass either way.
        let hit = self.cast_names.iter().any(|n| {
            n.len() == name.len()
                && (std::ptr::eq(n.as_ptr(), name.as_ptr()) || n.as_bytes() == name.as_bytes())
        });
        hit.then_some(self)
    }

    /// Whether the class is `name` or a subtype or implementation of it.
    #[inline]
    pub fn is_a(&self, name: &str) -> bool {
        self.dynamic_cast(name).is_some()
    }

    fn level_index(&self, id: TypeId) -> Option<usize> {
        self.levels.iter().position(|(l, _)| *l == id)
    }

    /// The class level `T` (e.g. `DeviceClass`), if this class has it.
    #[inline]
    pub fn get<T: ClassLevel>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.levels
            .iter()
            .find(|(l, _)| *l == id)
            .and_then(|(_, level)| (**level).as_any().downcast_ref())
    }

    /// The class level `T`, mutable: for `class_init` and `class_base_init`.
    pub fn get_mut<T: ClassLevel>(&mut self) -> Option<&mut T> {
        let index = self.level_index(TypeId::of::<T>())?;
        (*self.levels[index].1).as_any_mut().downcast_mut()
    }

    /// Adds class level `T` (the abstract type that introduces a level does this in its
    /// `class_init`); replaces it if present.
    pub fn insert<T: ClassLevel>(&mut self, level: T) {
        match self.level_index(TypeId::of::<T>()) {
            Some(i) => self.levels[i].1 = Box::new(level),
            None => self.levels.push((TypeId::of::<T>(), Box::new(level))),
        }
    }

    /// Adds a class property (QEMU's `object_class_property_add`); a subclass property of
    /// the same name replaces the parent's.
    pub fn add_property(&mut self, property: Property) {
        match self.properties.iter().position(|p| p.name == property.name) {
            Some(i) => self.properties[i] = Arc::new(property),
            None => self.properties.push(Arc::new(property)),
        }
    }

    /// Installs how objects of this class reach their implementation of interface trait
    /// `I` (a subclass inherits it, and may replace it).
    pub fn add_interface_impl<I: ?Sized + 'static>(&mut self, cast: crate::ImplCast<I>) {
        let id = TypeId::of::<crate::ImplCast<I>>();
        let cast: Arc<dyn Any + Send + Sync> = Arc::new(cast);
        match self.interface_casts.iter().position(|(t, _)| *t == id) {
            Some(i) => self.interface_casts[i].1 = cast,
            None => self.interface_casts.push((id, cast)),
        }
    }

    /// How objects of this class reach their implementation of interface trait `I`.
    pub fn interface_impl<I: ?Sized + 'static>(&self) -> Option<crate::ImplCast<I>> {
        let id = TypeId::of::<crate::ImplCast<I>>();
        self.interface_casts
            .iter()
            .find(|(t, _)| *t == id)
            .and_then(|(_, cast)| cast.downcast_ref::<crate::ImplCast<I>>())
            .copied()
    }

    /// The class properties, inherited ones first.
    pub fn properties(&self) -> &[Arc<Property>] {
        &self.properties
    }

    /// Finds a class property by name.
    pub fn find_property(&self, name: &str) -> Option<&Arc<Property>> {
        self.properties.iter().find(|p| p.name == name)
    }

    /// The Rust parts an instance of this class holds, root first.
    pub fn instance_parts(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.parts.iter().map(|spec| (spec.rust_name)())
    }
}

impl std::fmt::Debug for ObjectClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectClass")
            .field("name", &self.name())
            .field("cast_names", &self.cast_names)
            .finish_non_exhaustive()
    }
}

/// The class data of an interface type: which interface it is.
///
/// Interface types add their own levels (their "virtual methods") in `class_init`; a class
/// that implements the interface receives a copy of those levels to fill in. This level is
/// what every interface class has in common, and is not copied into implementers.
#[derive(Clone, Debug)]
pub struct InterfaceClass {
    /// The interface's type name.
    pub interface_type: &'static str,
}

pub(crate) fn interface_class_base_init(class: &mut ObjectClass) {
    let name = class.name();
    class.insert(InterfaceClass {
        interface_type: name,
    });
}
