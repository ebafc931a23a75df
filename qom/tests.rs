//! Unit tests of the object model, on types registered by this test binary only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use parking_lot::Mutex;

use crate::*;

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Tests that read LOG run one at a time.
static LOG_USERS: Mutex<()> = Mutex::new(());

fn log(event: impl Into<String>) {
    LOG.lock().push(event.into());
}

/// Takes the events about types whose names start with `prefix`.
fn take_log(prefix: &str) -> Vec<String> {
    let tag = format!("({prefix}");
    let mut log = LOG.lock();
    let (mine, others): (Vec<_>, Vec<_>) = log.drain(..).partition(|e| e.contains(&tag));
    *log = others;
    mine
}

// ----- a three-level chain: t-animal (abstract) <- t-dog <- t-puppy -----

#[derive(Clone, Debug)]
struct AnimalClass {
    speak: fn(&Object) -> String,
    base_inits: Vec<&'static str>,
}

#[derive(Clone, Debug)]
struct PuppyClass {
    parent_speak: fn(&Object) -> String,
}

#[derive(Default)]
struct Animal {
    legs: AtomicUsize,
}

#[derive(Default)]
struct Dog {
    name: Mutex<String>,
}

#[derive(Default)]
struct Puppy;

fn animal_speak(_: &Object) -> String {
    "...".into()
}
fn dog_speak(_: &Object) -> String {
    "woof".into()
}
fn puppy_speak(obj: &Object) -> String {
    let parent = obj.class().get::<PuppyClass>().unwrap().parent_speak;
    format!("yip, then {}", parent(obj))
}

fn animal_class_init(c: &mut ObjectClass) {
    log(format!("class_init animal ({})", c.name()));
    c.insert(AnimalClass {
        speak: animal_speak,
        base_inits: Vec::new(),
    });
    c.add_property(Property::uint("legs", 8, 4, "Number of legs"));
}
fn animal_class_base_init(c: &mut ObjectClass) {
    log(format!("class_base_init animal ({})", c.name()));
    let name = c.name();
    c.get_mut::<AnimalClass>().unwrap().base_inits.push(name);
}
fn dog_class_init(c: &mut ObjectClass) {
    log(format!("class_init dog ({})", c.name()));
    c.get_mut::<AnimalClass>().unwrap().speak = dog_speak;
}
fn dog_class_base_init(c: &mut ObjectClass) {
    log(format!("class_base_init dog ({})", c.name()));
}
fn puppy_class_init(c: &mut ObjectClass) {
    log(format!("class_init puppy ({})", c.name()));
    let ac = c.get_mut::<AnimalClass>().unwrap();
    let parent_speak = std::mem::replace(&mut ac.speak, puppy_speak);
    c.insert(PuppyClass { parent_speak });
}
fn animal_init(o: &Object) {
    log(format!("instance_init animal ({})", o.type_name()));
    o.downcast::<Animal>()
        .unwrap()
        .legs
        .store(4, Ordering::Relaxed);
}
fn dog_init(o: &Object) {
    log(format!("instance_init dog ({})", o.type_name()));
    *o.downcast::<Dog>().unwrap().name.lock() = "rex".into();
}
fn puppy_init(o: &Object) {
    log(format!("instance_init puppy ({})", o.type_name()));
}
fn animal_post(o: &Object) {
    log(format!("post_init animal ({})", o.type_name()));
}
fn dog_post(o: &Object) {
    log(format!("post_init dog ({})", o.type_name()));
}
fn puppy_post(o: &Object) {
    log(format!("post_init puppy ({})", o.type_name()));
}
fn animal_fin(o: &Object) {
    log(format!("finalize animal ({})", o.type_name()));
}
fn dog_fin(o: &Object) {
    log(format!("finalize dog ({})", o.type_name()));
}
fn puppy_fin(o: &Object) {
    log(format!("finalize puppy ({})", o.type_name()));
}

type_init! {
    name: "t-animal",
    parent: Some(TYPE_OBJECT),
    abstract_: true,
    class_init: Some(animal_class_init),
    class_base_init: Some(animal_class_base_init),
    instance: Some(InstanceSpec::of::<Animal>()),
    instance_init: Some(animal_init),
    instance_post_init: Some(animal_post),
    instance_finalize: Some(animal_fin),
}
type_init! {
    name: "t-dog",
    parent: Some("t-animal"),
    interfaces: &["t-pet"],
    class_init: Some(dog_class_init),
    class_base_init: Some(dog_class_base_init),
    instance: Some(InstanceSpec::of::<Dog>()),
    instance_init: Some(dog_init),
    instance_post_init: Some(dog_post),
    instance_finalize: Some(dog_fin),
}
// The same chain again, used only by the ordering test, so that no other test initialises
// its classes first.
type_init! {
    name: "t-o-animal",
    parent: Some(TYPE_OBJECT),
    abstract_: true,
    class_init: Some(animal_class_init),
    class_base_init: Some(animal_class_base_init),
    instance: Some(InstanceSpec::of::<Animal>()),
    instance_init: Some(animal_init),
    instance_post_init: Some(animal_post),
    instance_finalize: Some(animal_fin),
}
type_init! {
    name: "t-o-dog",
    parent: Some("t-o-animal"),
    class_init: Some(dog_class_init),
    class_base_init: Some(dog_class_base_init),
    instance: Some(InstanceSpec::of::<Dog>()),
    instance_init: Some(dog_init),
    instance_post_init: Some(dog_post),
    instance_finalize: Some(dog_fin),
}
type_init! {
    name: "t-o-puppy",
    parent: Some("t-o-dog"),
    class_init: Some(puppy_class_init),
    instance: Some(InstanceSpec::of::<Puppy>()),
    instance_init: Some(puppy_init),
    instance_post_init: Some(puppy_post),
    instance_finalize: Some(puppy_fin),
}
type_init! {
    name: "t-puppy",
    parent: Some("t-dog"),
    class_init: Some(puppy_class_init),
    instance: Some(InstanceSpec::of::<Puppy>()),
    instance_init: Some(puppy_init),
    instance_post_init: Some(puppy_post),
    instance_finalize: Some(puppy_fin),
}

// ----- an interface with a method the implementer fills in -----

#[derive(Clone, Debug)]
struct PetClass {
    cuddle: Option<fn(&Object) -> &'static str>,
}
fn pet_class_init(c: &mut ObjectClass) {
    c.insert(PetClass { cuddle: None });
}
fn cat_cuddle(_: &Object) -> &'static str {
    "purr"
}
fn cat_class_init(c: &mut ObjectClass) {
    c.get_mut::<PetClass>().unwrap().cuddle = Some(cat_cuddle);
}
type_init! {
    name: "t-pet",
    parent: Some(TYPE_INTERFACE),
    abstract_: true,
    class_init: Some(pet_class_init),
}
type_init! {
    name: "t-cat",
    parent: Some(TYPE_OBJECT),
    interfaces: &["t-pet"],
    class_init: Some(cat_class_init),
}

// ----- types for property and tree tests -----

const GADGET_PROPS: &[Property] = &[
    Property::uint("iobase", 16, 0x501, "First port"),
    Property::bool("enabled", true, "On or off"),
    Property::size("size", 64 << 10, "Window size"),
    Property::string("label", Some("none"), "A label"),
    Property::enumeration("mode", "GadgetMode", &["fast", "slow"], "fast", "Mode"),
    Property::link("peer", "t-cat", "A cat to talk to"),
];
fn gadget_class_init(c: &mut ObjectClass) {
    for p in GADGET_PROPS {
        c.add_property(p.clone());
    }
}
type_init! {
    name: "t-gadget",
    parent: Some(TYPE_OBJECT),
    class_init: Some(gadget_class_init),
}

// ----- class initialisation counted across threads -----

static SLOW_CLASS_INITS: AtomicUsize = AtomicUsize::new(0);
fn slow_class_init(_: &mut ObjectClass) {
    SLOW_CLASS_INITS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(50));
}
type_init! {
    name: "t-slow",
    parent: Some(TYPE_OBJECT),
    class_init: Some(slow_class_init),
}

#[test]
fn hooks_run_in_qemu_order_along_a_three_level_chain() {
    let _serial = LOG_USERS.lock();
    take_log("t-o-");
    let puppy = object_new("t-o-puppy").unwrap();
    let log = take_log("t-o-");
    let class_events: Vec<_> = log
        .iter()
        .filter(|e| e.starts_with("class"))
        .cloned()
        .collect();
    // Parent classes are built first; each class gets its ancestors' class_base_init
    // (nearest first) before its own class_init. A class's own class_base_init does not run
    // on itself.
    assert_eq!(
        class_events,
        [
            "class_init animal (t-o-animal)",
            "class_base_init animal (t-o-dog)",
            "class_init dog (t-o-dog)",
            "class_base_init dog (t-o-puppy)",
            "class_base_init animal (t-o-puppy)",
            "class_init puppy (t-o-puppy)",
        ]
    );
    let instance_events: Vec<_> = log
        .iter()
        .filter(|e| !e.starts_with("class"))
        .cloned()
        .collect();
    assert_eq!(
        instance_events,
        [
            "instance_init animal (t-o-puppy)",
            "instance_init dog (t-o-puppy)",
            "instance_init puppy (t-o-puppy)",
            "post_init puppy (t-o-puppy)",
            "post_init dog (t-o-puppy)",
            "post_init animal (t-o-puppy)",
        ]
    );
    assert_eq!(
        puppy.class().get::<AnimalClass>().unwrap().base_inits,
        ["t-o-dog", "t-o-puppy"]
    );
    let second = puppy.clone();
    drop(puppy);
    assert!(
        take_log("t-o-").is_empty(),
        "finalize waits for the last reference"
    );
    drop(second);
    assert_eq!(
        take_log("t-o-"),
        [
            "finalize puppy (t-o-puppy)",
            "finalize dog (t-o-puppy)",
            "finalize animal (t-o-puppy)"
        ]
    );
}

#[test]
fn subclass_overrides_a_virtual_method_and_chains_to_the_parent() {
    let dog = object_new("t-dog").unwrap();
    let puppy = object_new("t-puppy").unwrap();
    let speak = |o: &ObjectRef| (o.class().get::<AnimalClass>().unwrap().speak)(o);
    assert_eq!(speak(&dog), "woof");
    assert_eq!(speak(&puppy), "yip, then woof");
    let animal = object_class_by_name("t-animal").unwrap();
    assert_eq!((animal.get::<AnimalClass>().unwrap().speak)(&dog), "...");
}

#[test]
fn instance_parts_of_every_level_are_reachable() {
    let puppy = object_new("t-puppy").unwrap();
    assert_eq!(
        puppy
            .downcast::<Animal>()
            .unwrap()
            .legs
            .load(Ordering::Relaxed),
        4
    );
    assert_eq!(*puppy.downcast::<Dog>().unwrap().name.lock(), "rex");
    assert!(puppy.downcast::<Puppy>().is_some());
    assert!(puppy.downcast::<String>().is_none());
    let dog = object_new("t-dog").unwrap();
    assert!(dog.downcast::<Puppy>().is_none());
}

#[test]
fn interfaces_are_cast_targets_with_their_own_methods() {
    let cat = object_new("t-cat").unwrap();
    assert!(cat.is_a("t-pet"));
    assert!(cat.is_a(TYPE_INTERFACE));
    let pet = cat.class().get::<PetClass>().unwrap();
    assert_eq!((pet.cuddle.unwrap())(&cat), "purr");
    // Implementers get a copy of the interface's levels, not its InterfaceClass.
    assert!(cat.class().get::<InterfaceClass>().is_none());
    let pet_class = object_class_by_name("t-pet").unwrap();
    assert_eq!(
        pet_class.get::<InterfaceClass>().unwrap().interface_type,
        "t-pet"
    );
    // A subclass inherits the parent's interfaces.
    let puppy = object_new("t-puppy").unwrap();
    assert!(puppy.is_a("t-pet"));
    let list: Vec<_> = object_class_get_list(Some("t-pet"), false)
        .iter()
        .map(|c| c.name())
        .collect();
    assert_eq!(list, ["t-cat", "t-dog", "t-puppy"]);
}

#[test]
fn abstract_types_are_refused_with_their_location() {
    let err = object_new("t-animal").unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("type 't-animal' is abstract and cannot be instantiated (registered at ")
    );
    assert!(text.contains("tests.rs:"), "{text}");
    assert!(matches!(
        object_new("t-pet"),
        Err(Error::AbstractType { .. })
    ));
    assert!(matches!(object_new("t-nosuch"), Err(Error::UnknownType(_))));
}

#[test]
fn casts_hit_and_miss() {
    let puppy = object_new("t-puppy").unwrap();
    for hit in ["t-puppy", "t-dog", "t-animal", TYPE_OBJECT, "t-pet"] {
        assert!(puppy.dynamic_cast(hit).is_some(), "{hit}");
    }
    // Equal names held elsewhere (not the table's own pointers) hit too.
    assert!(puppy.dynamic_cast(&String::from("t-dog")).is_some());
    for miss in ["t-cat", "t-gadget", "container", "t-do", ""] {
        assert!(puppy.dynamic_cast(miss).is_none(), "{miss}");
    }
    let dog = object_new("t-dog").unwrap();
    assert!(dog.dynamic_cast("t-puppy").is_none());
    let classes: Vec<_> = object_class_get_list(Some("t-animal"), true)
        .iter()
        .map(|c| c.name())
        .collect();
    assert_eq!(classes, ["t-animal", "t-dog", "t-puppy"]);
    let mut seen = Vec::new();
    object_class_foreach(Some("t-animal"), false, |c| seen.push(c.name()));
    assert_eq!(seen, ["t-dog", "t-puppy"]);
}

#[test]
fn properties_parse_validate_and_read_back() {
    let g = object_new("t-gadget").unwrap();
    assert_eq!(g.prop_uint("iobase").unwrap(), 0x501);
    g.property_parse("iobase", "0xf4").unwrap();
    assert_eq!(g.prop_uint("iobase").unwrap(), 0xf4);
    assert_eq!(
        g.property_parse("iobase", "65536").unwrap_err().to_string(),
        "Parameter 'iobase' expects a non-negative integer below 65536"
    );
    assert_eq!(
        g.prop_uint("iobase").unwrap(),
        0xf4,
        "a refused value changes nothing"
    );
    g.property_parse("enabled", "off").unwrap();
    assert!(!g.prop_bool("enabled").unwrap());
    g.property_parse("size", "2G").unwrap();
    assert_eq!(g.prop_uint("size").unwrap(), 2 << 30);
    assert_eq!(g.property_print("size").unwrap(), "2147483648");
    assert_eq!(g.prop_str("label").unwrap(), "none");
    g.property_parse("mode", "slow").unwrap();
    assert_eq!(
        g.property_parse("mode", "warp").unwrap_err().to_string(),
        "Parameter 'mode' does not accept value 'warp'"
    );
    assert_eq!(
        g.property_parse("nosuch", "1").unwrap_err().to_string(),
        "Property 't-gadget.nosuch' not found"
    );
    assert_eq!(
        g.property_set("enabled", Value::Uint(1))
            .unwrap_err()
            .to_string(),
        "Invalid parameter type for 'enabled', expected: bool"
    );
    assert_eq!(g.prop_str("type").unwrap(), "t-gadget");
    assert!(matches!(
        g.property_set("type", Value::Str("x".into())),
        Err(Error::ReadOnlyProperty { .. })
    ));
    let info = g.class().find_property("iobase").unwrap().info();
    assert_eq!(info.type_name, "uint16");
    assert_eq!(info.default.as_deref(), Some("1281"));
}

#[test]
fn links_are_type_checked_and_resolved_by_path() {
    let root = object_new(TYPE_CONTAINER).unwrap();
    let cat = object_new("t-cat").unwrap();
    let dog = object_new("t-dog").unwrap();
    let gadget = object_new("t-gadget").unwrap();
    root.add_child("cat", &cat).unwrap();
    root.add_child("dog", &dog).unwrap();
    root.add_child("gadget", &gadget).unwrap();
    let peer = gadget.find_property("peer").unwrap();
    let value = peer.parse("/cat", |p| resolve_path(&root, p)).unwrap();
    gadget.property_set("peer", value).unwrap();
    assert!(Arc::ptr_eq(
        &gadget.prop_link("peer").unwrap().unwrap(),
        &cat
    ));
    let err = gadget
        .property_set("peer", Value::Link(Some(dog.clone())))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Invalid parameter type for 'peer', expected: link<t-cat>"
    );
    // Absolute paths follow links too.
    assert!(Arc::ptr_eq(
        &resolve_path(&root, "/gadget/peer").unwrap(),
        &cat
    ));
}

#[test]
fn composition_tree_gives_canonical_and_partial_paths() {
    let root = object_new(TYPE_CONTAINER).unwrap();
    let unattached = container_get(&root, "/machine/unattached");
    let a = object_new("t-cat").unwrap();
    let b = object_new("t-cat").unwrap();
    assert_eq!(
        &*unattached.add_child("device[*]", &a).unwrap(),
        "device[0]"
    );
    assert_eq!(
        &*unattached.add_child("device[*]", &b).unwrap(),
        "device[1]"
    );
    assert_eq!(a.canonical_path().unwrap(), "/machine/unattached/device[0]");
    assert_eq!(root.canonical_path().unwrap(), "/");
    assert_eq!(
        unattached.prop_str("device[1]").unwrap(),
        "/machine/unattached/device[1]"
    );
    assert_eq!(
        unattached
            .find_property("device[0]")
            .unwrap()
            .kind
            .type_name(),
        "child<t-cat>"
    );

    let peripheral = container_get(&root, "/machine/peripheral");
    let ser0 = object_new("t-dog").unwrap();
    peripheral.add_child("ser0", &ser0).unwrap();
    assert!(Arc::ptr_eq(
        &resolve_path(&root, "/machine/peripheral/ser0").unwrap(),
        &ser0
    ));
    assert!(Arc::ptr_eq(&resolve_path(&root, "ser0").unwrap(), &ser0));
    assert!(Arc::ptr_eq(
        &resolve_path(&root, "peripheral/ser0").unwrap(),
        &ser0
    ));
    assert!(matches!(
        resolve_path(&root, "/machine/ser0"),
        Err(Error::PathNotFound(_))
    ));
    assert!(matches!(
        resolve_path(&root, "nosuch"),
        Err(Error::PathNotFound(_))
    ));

    // Two objects with the same name: ambiguous, unless the type narrows it down.
    let other = container_get(&root, "/other");
    let ser0_cat = object_new("t-cat").unwrap();
    other.add_child("ser0", &ser0_cat).unwrap();
    assert!(matches!(
        resolve_path(&root, "ser0"),
        Err(Error::AmbiguousPath(_))
    ));
    assert!(Arc::ptr_eq(
        &resolve_path_type(&root, "ser0", "t-dog").unwrap(),
        &ser0
    ));

    assert!(matches!(
        peripheral.add_child("ser0", &object_new("t-cat").unwrap()),
        Err(Error::DuplicateProperty { .. })
    ));
    assert!(matches!(
        other.add_child("again", &ser0),
        Err(Error::AlreadyParented { .. })
    ));
}

#[test]
fn unparent_drops_the_tree_reference_and_finalizes() {
    let _serial = LOG_USERS.lock();
    let root = object_new(TYPE_CONTAINER).unwrap();
    let dog = object_new("t-dog").unwrap();
    root.add_child("dog", &dog).unwrap();
    let weak = dog.downgrade();
    drop(dog);
    take_log("t-dog");
    assert!(weak.upgrade().is_some(), "the tree keeps it alive");
    weak.upgrade().unwrap().unparent();
    assert!(weak.upgrade().is_none());
    assert!(root.child("dog").is_none());
    assert!(root.find_property("dog").is_none());
    let finalized: Vec<_> = take_log("t-dog")
        .into_iter()
        .filter(|e| e.starts_with("finalize"))
        .collect();
    assert_eq!(
        finalized,
        ["finalize dog (t-dog)", "finalize animal (t-dog)"]
    );
}

#[test]
fn concurrent_class_initialisation_happens_once() {
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let class = object_class_by_name("t-slow").unwrap();
                class as *const ObjectClass as usize
            })
        })
        .collect();
    let addresses: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(SLOW_CLASS_INITS.load(Ordering::SeqCst), 1);
    assert!(addresses.windows(2).all(|w| w[0] == w[1]));
}

// ----- validation of the type table, on tables built from explicit records -----

fn record(name: &'static str, parent: Option<&'static str>, line: u32) -> &'static TypeInfo {
    Box::leak(Box::new(TypeInfo {
        name,
        parent,
        location: Location {
            file: "hw/misc/example.rs",
            line,
        },
        ..TypeInfo::DEFAULT
    }))
}

fn with_interfaces(
    info: &'static TypeInfo,
    interfaces: &'static [&'static str],
) -> &'static TypeInfo {
    Box::leak(Box::new(TypeInfo {
        interfaces,
        ..*info
    }))
}

fn roots() -> Vec<&'static TypeInfo> {
    vec![record("object", None, 1), record("interface", None, 2)]
}

fn errors(records: Vec<&'static TypeInfo>) -> Vec<String> {
    match TypeTable::build(records) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_valid_table_builds() {
    let mut r = roots();
    r.push(record("a", Some("object"), 10));
    let table = TypeTable::build(r).unwrap();
    assert_eq!(table.len(), 3);
    assert!(object_new_in(table, "a").is_ok());
}

#[test]
fn duplicate_names_are_reported_with_both_locations() {
    let mut r = roots();
    r.push(record("dup", Some("object"), 10));
    r.push(record("dup", Some("object"), 20));
    assert_eq!(
        errors(r),
        ["type 'dup' is registered twice: at hw/misc/example.rs:10 and at hw/misc/example.rs:20"]
    );
}

#[test]
fn missing_parents_are_reported() {
    let mut r = roots();
    r.push(record("orphan", Some("nowhere"), 10));
    assert_eq!(
        errors(r),
        ["type 'orphan' (registered at hw/misc/example.rs:10) names parent 'nowhere', which is not registered"]
    );
}

#[test]
fn parent_cycles_are_reported_once() {
    let mut r = roots();
    r.push(record("c1", Some("c2"), 10));
    r.push(record("c2", Some("c3"), 11));
    r.push(record("c3", Some("c1"), 12));
    r.push(record("hanger", Some("c1"), 13));
    assert_eq!(
        errors(r),
        ["types 'c1' -> 'c2' -> 'c3' form a parent cycle (registered at hw/misc/example.rs:10, hw/misc/example.rs:11, hw/misc/example.rs:12)"]
    );
}

#[test]
fn non_interfaces_listed_as_interfaces_are_reported() {
    let mut r = roots();
    r.push(record("plain", Some("object"), 10));
    r.push(with_interfaces(
        record("user", Some("object"), 11),
        &["plain", "ghost"],
    ));
    assert_eq!(
        errors(r),
        [
            "type 'user' (registered at hw/misc/example.rs:11) lists 'plain' (registered at hw/misc/example.rs:10) as an interface, but it is not one",
            "type 'user' (registered at hw/misc/example.rs:11) implements 'ghost', which is not registered",
        ]
    );
}

#[test]
fn empty_names_are_reported() {
    let mut r = roots();
    r.push(record("", Some("object"), 10));
    assert_eq!(
        errors(r),
        ["a type registered at hw/misc/example.rs:10 has an empty name"]
    );
}

#[test]
fn the_process_table_holds_this_binarys_registrations() {
    let table = type_table().unwrap();
    for name in [
        TYPE_OBJECT,
        TYPE_INTERFACE,
        TYPE_CONTAINER,
        "t-animal",
        "t-cat",
    ] {
        assert!(table.lookup(name).is_some(), "{name}");
    }
}

mod typed_types {
    use super::*;
    use crate::{ObjectBase, ObjectType, Prop, Typed, Value};

    crate::qom_enum! {
        /// A test enum.
        pub enum Mode("TestMode") {
            Off = "off",
            Fast = "fast",
        }
    }

    #[derive(crate::Object)]
    #[qom(name = "typed-base", abstract)]
    pub struct TypedBase {
        #[parent]
        parent: ObjectBase,
        #[property(default = 0x501, desc = "First I/O port")]
        iobase: Prop<u16>,
        #[property(name = "chardev", desc = "Backend")]
        chardev: Prop<Option<String>>,
    }

    #[derive(crate::Object)]
    #[qom(name = "typed-leaf")]
    pub struct TypedLeaf {
        #[parent]
        parent: TypedBase,
        #[property(default = "fast")]
        mode: Prop<Mode>,
        #[property(default = -3)]
        delta: Prop<i8>,
        hits: std::sync::atomic::AtomicU32,
    }

    crate::type_init!(TypedBase);
    crate::type_init!(TypedLeaf);

    #[test]
    fn typed_state_embeds_its_parent_and_reaches_ancestors_by_cast() {
        let obj = crate::object_new("typed-leaf").unwrap();
        assert!(obj.is_a("typed-base"));
        let leaf = obj.downcast::<TypedLeaf>().unwrap();
        let base: &TypedBase = leaf;
        assert_eq!(base.iobase.get(), 0x501);
        assert!(std::ptr::eq(obj.downcast::<TypedBase>().unwrap(), base));
        let root = obj.downcast::<ObjectBase>().unwrap();
        assert!(Arc::ptr_eq(&root.object(), &obj));
        assert_eq!(leaf.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(obj.downcast::<String>().is_none());
        let typed = Typed::<TypedLeaf>::new(obj.clone()).unwrap();
        assert_eq!(typed.mode.get(), Mode::Fast);
        assert!(Typed::<TypedLeaf>::new(crate::object_new("typed-leaf").unwrap()).is_some());
        assert_eq!(<TypedLeaf as ObjectType>::TYPE_NAME, "typed-leaf");
    }

    #[test]
    fn field_properties_parse_list_and_refuse_like_stored_ones() {
        let obj = crate::object_new("typed-leaf").unwrap();
        obj.property_parse("iobase", "0x3f8").unwrap();
        assert_eq!(obj.downcast::<TypedBase>().unwrap().iobase.get(), 0x3f8);
        assert_eq!(obj.property_get("iobase").unwrap(), Value::Uint(0x3f8));
        let err = obj.property_parse("iobase", "70000").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'iobase' expects a non-negative integer below 65536"
        );
        obj.property_parse("mode", "off").unwrap();
        assert_eq!(obj.downcast::<TypedLeaf>().unwrap().mode.get(), Mode::Off);
        let err = obj.property_parse("mode", "slow").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'mode' does not accept value 'slow'"
        );
        assert_eq!(obj.property_print("chardev").unwrap(), "");
        obj.property_parse("chardev", "ser0").unwrap();
        assert_eq!(
            obj.downcast::<TypedBase>()
                .unwrap()
                .chardev
                .get()
                .as_deref(),
            Some("ser0")
        );
        obj.property_parse("delta", "-128").unwrap();
        assert!(obj.property_parse("delta", "128").is_err());

        let class = obj.class();
        let infos: Vec<_> = class.properties().iter().map(|p| p.info()).collect();
        let find = |n: &str| infos.iter().find(|i| i.name == n).unwrap().clone();
        assert_eq!(find("iobase").type_name, "uint16");
        assert_eq!(find("iobase").default.as_deref(), Some("1281"));
        assert_eq!(find("iobase").description, "First I/O port");
        assert_eq!(find("chardev").default, None);
        assert_eq!(find("mode").type_name, "TestMode");
        assert_eq!(find("mode").default.as_deref(), Some("fast"));
        assert_eq!(find("delta").default.as_deref(), Some("-3"));
    }

    #[test]
    fn abstract_typed_types_cannot_be_instantiated() {
        assert!(matches!(
            crate::object_new("typed-base"),
            Err(crate::Error::AbstractType { .. })
        ));
    }
}

mod typed_interfaces {
    use crate::{Interface, ObjectBase, Prop};

    /// An interface as a trait: something that can be reset.
    pub trait Resettable: Send + Sync {
        fn reset_count(&self) -> u32;
    }

    impl Interface for dyn Resettable {
        const TYPE_NAME: &'static str = "typed-resettable";
    }

    crate::interface_type!(dyn Resettable);

    #[derive(crate::Object)]
    #[qom(name = "typed-counter", implements = [dyn Resettable])]
    pub struct Counter {
        #[parent]
        parent: ObjectBase,
        #[property(default = 3)]
        resets: Prop<u32>,
    }

    impl Resettable for Counter {
        fn reset_count(&self) -> u32 {
            self.resets.get()
        }
    }

    #[derive(crate::Object)]
    #[qom(name = "typed-counter-child")]
    pub struct CounterChild {
        #[parent]
        parent: Counter,
    }

    crate::type_init!(Counter);
    crate::type_init!(CounterChild);

    #[test]
    fn an_interface_trait_is_reached_from_any_object_of_an_implementing_class() {
        let obj = crate::object_new("typed-counter").unwrap();
        assert!(
            obj.is_a("typed-resettable"),
            "the QOM name follows the trait"
        );
        assert!(obj.is_a(crate::TYPE_INTERFACE));
        assert_eq!(obj.interface::<dyn Resettable>().unwrap().reset_count(), 3);
        // Subclasses inherit the implementation.
        let child = crate::object_new("typed-counter-child").unwrap();
        child.property_parse("resets", "7").unwrap();
        assert!(child.is_a("typed-resettable"));
        assert_eq!(
            child.interface::<dyn Resettable>().unwrap().reset_count(),
            7
        );
        // Objects whose class does not implement it have none.
        let other = crate::object_new("typed-leaf").unwrap();
        assert!(other.interface::<dyn Resettable>().is_none());
        assert!(!other.is_a("typed-resettable"));
    }
}

#[test]
fn racing_container_gets_agree_on_one_container() {
    let root = crate::object_new(crate::TYPE_CONTAINER).unwrap();
    let got: Vec<ObjectRef> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| crate::container_get(&root, "/machine/unattached")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|c| Arc::ptr_eq(c, &got[0])));
    assert_eq!(root.children().len(), 1);
}

// ----- types registered from a table: one class_init, class data per type -----

/// What each table-registered type's class carries.
#[derive(Clone, Debug, PartialEq)]
struct Breed {
    legs: u32,
}

static BREEDS: [(&str, Breed); 2] = [
    ("t-breed-a", Breed { legs: 3 }),
    ("t-breed-b", Breed { legs: 5 }),
];

fn breed_class_init(class: &mut ObjectClass) {
    let breed = class
        .class_data::<Breed>()
        .expect("table types carry their breed")
        .clone();
    class.insert(breed);
}

fn register_breeds() -> Vec<TypeInfo> {
    BREEDS
        .iter()
        .map(|(name, breed)| TypeInfo {
            name,
            parent: Some(TYPE_OBJECT),
            class_init: Some(breed_class_init),
            class_data: Some(breed),
            ..TypeInfo::DEFAULT
        })
        .collect()
}
type_init!(fn register_breeds);

#[test]
fn registrar_types_get_their_class_data_and_location() {
    for (name, breed) in &BREEDS {
        let class = crate::object_class_by_name(name).expect("registered by the registrar");
        assert_eq!(class.get::<Breed>(), Some(breed));
        assert!(class.type_info().location.file.ends_with("tests.rs"));
    }
    assert!(crate::object_class_by_name("t-breed-c").is_none());
}
