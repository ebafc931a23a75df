//! The type table: QEMU's `type_table_add`/`type_get_by_name`, built once from the link-time
//! registrations (`module_call_init(MODULE_INIT_QOM)`) and validated.

use std::fmt;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;

use crate::class::ObjectClass;
use crate::type_info::{Location, TypeInfo};
use crate::{Error, TYPE_INTERFACE};

/// One registered type and its lazily built class.
pub struct TypeImpl {
    info: &'static TypeInfo,
    parent: Option<usize>,
    interfaces: Box<[usize]>,
    class: OnceLock<ObjectClass>,
}

impl TypeImpl {
    /// The type's name.
    pub fn name(&self) -> &'static str {
        self.info.name
    }
    /// The registration record.
    pub fn info(&self) -> &'static TypeInfo {
        self.info
    }
    pub(crate) fn parent(&self) -> Option<usize> {
        self.parent
    }
    pub(crate) fn interfaces(&self) -> &[usize] {
        &self.interfaces
    }
}

/// A problem found while building the type table. Every variant names the type(s) and where
/// they were registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeTableError {
    /// A type registered with an empty name.
    #[error("a type registered at {at} has an empty name")]
    EmptyName {
        /// Where.
        at: Location,
    },
    /// Two registrations of one name.
    #[error("type '{name}' is registered twice: at {first} and at {second}")]
    DuplicateType {
        /// The name.
        name: &'static str,
        /// The registration kept.
        first: Location,
        /// The one refused.
        second: Location,
    },
    /// A parent name that no type has.
    #[error("type '{name}' (registered at {at}) names parent '{parent}', which is not registered")]
    MissingParent {
        /// The type.
        name: &'static str,
        /// Its missing parent.
        parent: &'static str,
        /// Where the type was registered.
        at: Location,
    },
    /// Types whose parent chain loops.
    #[error("types {} form a parent cycle (registered at {})", fmt_names(.types), fmt_locations(.at))]
    ParentCycle {
        /// The types of the cycle, in parent order.
        types: Vec<&'static str>,
        /// Where each was registered.
        at: Vec<Location>,
    },
    /// An interface name that no type has.
    #[error(
        "type '{name}' (registered at {at}) implements '{interface}', which is not registered"
    )]
    UnknownInterface {
        /// The type.
        name: &'static str,
        /// The missing interface.
        interface: &'static str,
        /// Where the type was registered.
        at: Location,
    },
    /// An "interface" that does not descend from `interface`.
    #[error("type '{name}' (registered at {at}) lists '{interface}' (registered at {interface_at}) as an interface, but it is not one")]
    NotAnInterface {
        /// The type.
        name: &'static str,
        /// The type listed as an interface.
        interface: &'static str,
        /// Where the type was registered.
        at: Location,
        /// Where the listed type was registered.
        interface_at: Location,
    },
}

fn fmt_names(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn fmt_locations(at: &[Location]) -> String {
    at.iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every problem found in a set of registrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeTableErrors(pub Vec<TypeTableError>);

impl fmt::Display for TypeTableErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TypeTableErrors {}

/// All registered types, by name.
pub struct TypeTable {
    types: Box<[TypeImpl]>,
    by_name: FxHashMap<&'static str, usize>,
}

impl TypeTable {
    /// Builds and validates a table from registration records. The table lives for the rest
    /// of the process, like QEMU's: classes and objects point into it.
    pub fn build(
        records: impl IntoIterator<Item = &'static TypeInfo>,
    ) -> Result<&'static TypeTable, TypeTableErrors> {
        let mut errors = Vec::new();
        let mut infos: Vec<&'static TypeInfo> = Vec::new();
        let mut by_name: FxHashMap<&'static str, usize> = FxHashMap::default();
        for info in records {
            if info.name.is_empty() {
                errors.push(TypeTableError::EmptyName { at: info.location });
                continue;
            }
            if let Some(&first) = by_name.get(info.name) {
                errors.push(TypeTableError::DuplicateType {
                    name: info.name,
                    first: infos[first].location,
                    second: info.location,
                });
                continue;
            }
            by_name.insert(info.name, infos.len());
            infos.push(info);
        }

        let mut parents = vec![None; infos.len()];
        for (i, info) in infos.iter().enumerate() {
            if let Some(parent) = info.parent {
                match by_name.get(parent) {
                    Some(&p) => parents[i] = Some(p),
                    None => errors.push(TypeTableError::MissingParent {
                        name: info.name,
                        parent,
                        at: info.location,
                    }),
                }
            }
        }

        // Parent cycles: walk each chain; a chain longer than the table loops.
        let mut in_cycle = vec![false; infos.len()];
        for start in 0..infos.len() {
            let mut cur = Some(start);
            let mut steps = 0;
            while let Some(c) = cur {
                steps += 1;
                if steps > infos.len() {
                    break;
                }
                cur = parents[c];
            }
            if let Some(c) = cur {
                // `c` is on the cycle: report it once, starting from its first member.
                let mut members = vec![c];
                let mut next = parents[c].expect("a node on a cycle has a parent");
                while next != c {
                    members.push(next);
                    next = parents[next].expect("a node on a cycle has a parent");
                }
                if members.iter().all(|&m| !in_cycle[m]) {
                    let first = *members.iter().min().expect("a cycle has members");
                    let rot = members.iter().position(|&m| m == first).unwrap_or(0);
                    members.rotate_left(rot);
                    for &m in &members {
                        in_cycle[m] = true;
                    }
                    errors.push(TypeTableError::ParentCycle {
                        types: members.iter().map(|&m| infos[m].name).collect(),
                        at: members.iter().map(|&m| infos[m].location).collect(),
                    });
                }
            }
        }

        let descends_from = |mut t: usize, ancestor: &str| {
            let mut steps = 0;
            loop {
                if infos[t].name == ancestor {
                    return true;
                }
                steps += 1;
                match parents[t] {
                    Some(p) if steps <= infos.len() => t = p,
                    _ => return false,
                }
            }
        };

        let mut interfaces = vec![Vec::new(); infos.len()];
        for (i, info) in infos.iter().enumerate() {
            for &iface in info.interfaces {
                match by_name.get(iface) {
                    None => errors.push(TypeTableError::UnknownInterface {
                        name: info.name,
                        interface: iface,
                        at: info.location,
                    }),
                    Some(&j) if !descends_from(j, TYPE_INTERFACE) => {
                        errors.push(TypeTableError::NotAnInterface {
                            name: info.name,
                            interface: iface,
                            at: info.location,
                            interface_at: infos[j].location,
                        })
                    }
                    Some(&j) => interfaces[i].push(j),
                }
            }
        }

        if !errors.is_empty() {
            return Err(TypeTableErrors(errors));
        }
        let types = infos
            .iter()
            .zip(parents)
            .zip(interfaces)
            .map(|((info, parent), ifaces)| TypeImpl {
                info,
                parent,
                interfaces: ifaces.into_boxed_slice(),
                class: OnceLock::new(),
            })
            .collect();
        Ok(Box::leak(Box::new(TypeTable { types, by_name })))
    }

    pub(crate) fn get(&'static self, index: usize) -> &'static TypeImpl {
        &self.types[index]
    }

    pub(crate) fn class_of(&'static self, index: usize) -> &'static ObjectClass {
        let ty = &self.types[index];
        ty.class.get_or_init(|| ObjectClass::initialize(self, ty))
    }

    /// Looks a type up by name (QEMU's `type_get_by_name`).
    #[inline]
    pub fn lookup(&'static self, name: &str) -> Option<&'static TypeImpl> {
        self.by_name.get(name).map(|&i| &self.types[i])
    }

    /// The class of `name`, initialised on first use (QEMU's `object_class_by_name`).
    #[inline]
    pub fn class_by_name(&'static self, name: &str) -> Option<&'static ObjectClass> {
        self.by_name.get(name).map(|&i| self.class_of(i))
    }

    /// Every type, in registration order.
    pub fn types(&'static self) -> impl Iterator<Item = &'static TypeImpl> {
        self.types.iter()
    }

    /// Classes that are (or implement) `implements`, sorted by name (QEMU's
    /// `object_class_get_list`). Initialises every class it visits.
    pub fn class_list(
        &'static self,
        implements: Option<&str>,
        include_abstract: bool,
    ) -> Vec<&'static ObjectClass> {
        // Filtered on the type records first, so that only the classes listed are built.
        let mut list: Vec<_> = (0..self.types.len())
            .filter(|&i| include_abstract || !self.types[i].info.abstract_)
            .filter(|&i| implements.is_none_or(|name| self.type_is_a(i, name)))
            .map(|i| self.class_of(i))
            .collect();
        list.sort_by_key(|c| c.name());
        list
    }

    /// Whether type `index` is `name`, descends from it or implements it, from the records
    /// alone (no class is built).
    fn type_is_a(&self, index: usize, name: &str) -> bool {
        let mut cur = Some(index);
        while let Some(i) = cur {
            let ty = &self.types[i];
            if ty.info.name == name || ty.interfaces.iter().any(|&j| self.type_is_a(j, name)) {
                return true;
            }
            cur = ty.parent;
        }
        false
    }

    /// The number of registered types.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether no type is registered.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

static GLOBAL: OnceLock<Result<&'static TypeTable, TypeTableErrors>> = OnceLock::new();

/// The process's type table, built from every `type_init!` linked into the binary on first
/// use: this is `module_call_init(MODULE_INIT_QOM)`.
pub fn type_table() -> Result<&'static TypeTable, Error> {
    match GLOBAL.get_or_init(|| {
        // Records computed by registrars live as long as the table: leaked once, here.
        let computed: &'static [TypeInfo] = Vec::leak(
            inventory::iter::<crate::TypeRegistrar>
                .into_iter()
                .flat_map(|r| {
                    (r.register)().into_iter().map(|info| TypeInfo {
                        location: r.location,
                        ..info
                    })
                })
                .collect(),
        );
        TypeTable::build(inventory::iter::<TypeInfo>.into_iter().chain(computed))
    }) {
        Ok(table) => Ok(table),
        Err(errors) => Err(Error::TypeTable(errors)),
    }
}

/// QEMU's `object_class_by_name` on the process's table.
#[inline]
pub fn object_class_by_name(name: &str) -> Option<&'static ObjectClass> {
    type_table().ok()?.class_by_name(name)
}

/// QEMU's `object_class_get_list` on the process's table, sorted by name.
pub fn object_class_get_list(
    implements: Option<&str>,
    include_abstract: bool,
) -> Vec<&'static ObjectClass> {
    type_table()
        .map(|t| t.class_list(implements, include_abstract))
        .unwrap_or_default()
}

/// QEMU's `object_class_foreach` on the process's table.
pub fn object_class_foreach(
    implements: Option<&str>,
    include_abstract: bool,
    mut f: impl FnMut(&'static ObjectClass),
) {
    for class in object_class_get_list(implements, include_abstract) {
        f(class);
    }
}
