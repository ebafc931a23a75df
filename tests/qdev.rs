//! qdev on the qtest accelerator: devices are created, configured, plugged into a bus and
//! realized, and their ports answer through the machine's `system-io`, with no guest code.

use std::sync::Arc;

use hw::core::machine::machine_state;
use hw::core::qdev::{qdev_new, qdev_realize, qdev_unrealize, DeviceMethods, QdevError};
use hw::core::runstate::RunRequest;
use qom::{container_get, Value};
use test_support::qtest::{machine_with_isa_bus, plug};

#[test]
fn debug_exit_turns_a_port_write_into_an_exit_status() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(
        &machine,
        &bus,
        "isa-debug-exit",
        &[("iobase", "0xf4"), ("iosize", "4")],
    );
    assert!(dev.is_realized());
    let ms = machine_state(&machine).unwrap();
    ms.system_io().write(0xf4, 0x10, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::DebugExit(0x21)));
    ms.system_io().write(0xf7, 0, 1);
    assert_eq!(ms.run_state().take(), Some(RunRequest::DebugExit(1)));
    ms.system_io().write(0xf4, 0xffff_ffff, 4);
    assert_eq!(ms.run_state().take(), Some(RunRequest::DebugExit(-1)));
    ms.system_io().write(0xf8, 1, 1);
    assert_eq!(ms.run_state().take(), None, "port 0xf8 is past iosize");
}

#[test]
fn properties_are_frozen_once_realized() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(&machine, &bus, "isa-debug-exit", &[("iobase", "0x600")]);
    let err = dev.property_parse("iobase", "0x700").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Attempt to set property 'iobase' on anonymous device (type 'isa-debug-exit') after it was realized"
    );
    dev.set_device_id(Some("dbg".into()));
    let err = dev.property_parse("iobase", "0x700").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Attempt to set property 'iobase' on device 'dbg' (type 'isa-debug-exit') after it was realized"
    );
}

#[test]
fn unrealize_unmaps_the_ports_and_realize_is_a_property() {
    let (machine, bus) = machine_with_isa_bus();
    let dev = plug(&machine, &bus, "isa-debug-exit", &[("iobase", "0x700")]);
    let io = machine_state(&machine).unwrap().system_io().clone();
    assert_eq!(io.flat_view().ranges().len(), 1);
    qdev_unrealize(&dev);
    assert!(!dev.is_realized());
    assert!(io.flat_view().ranges().is_empty());
    assert_eq!(
        io.read(0x700, 1),
        0xff,
        "an unmapped port reads as all ones"
    );
    dev.property_set("realized", Value::Bool(true)).unwrap();
    assert_eq!(io.flat_view().ranges().len(), 1);
    assert!(dev.prop_bool("realized").unwrap());
    assert!(Arc::ptr_eq(
        &dev.prop_link("parent_bus").unwrap().unwrap(),
        &bus
    ));
}

#[test]
fn two_devices_on_one_port_are_refused() {
    let (machine, bus) = machine_with_isa_bus();
    plug(&machine, &bus, "isa-debug-exit", &[("iobase", "0x800")]);
    let dev = qdev_new("isa-debug-exit").unwrap();
    dev.property_parse("iobase", "0x801").unwrap();
    container_get(&machine, "peripheral-anon")
        .add_child("device[*]", &dev)
        .unwrap();
    let err = qdev_realize(&dev, Some(&bus)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "system-io: region 'isa-debug-exit' at 0x801..0x803 overlaps 'isa-debug-exit' at 0x800..0x802"
    );
    assert!(!dev.is_realized());
}

#[test]
fn devices_check_their_bus() {
    let (machine, _bus) = machine_with_isa_bus();
    let dev = qdev_new("isa-debug-exit").unwrap();
    let not_isa = container_get(&machine, "unattached");
    assert!(matches!(
        qdev_realize(&dev, Some(&not_isa)),
        Err(QdevError::WrongBus { .. })
    ));
    assert!(matches!(
        qdev_new("container"),
        Err(QdevError::NotADevice(_))
    ));
    assert!(matches!(qdev_new("device"), Err(QdevError::Abstract)));
}

/// The README's example device (`hw/misc/scratch.rs`): its field property answers QOM,
/// realize maps the port, the register keeps what the guest writes, and the property is
/// frozen once realized.
#[test]
fn the_readme_scratch_device_keeps_its_register_at_its_port() {
    let (machine, bus) = machine_with_isa_bus();
    let io = machine_state(&machine).unwrap().system_io().clone();
    let dev = test_support::qtest::new_dev(&machine, "scratch", &[]);
    assert_eq!(dev.property_get("iobase").unwrap(), Value::Uint(0x520));
    dev.property_parse("iobase", "0x530").unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    assert_eq!(io.read(0x530, 4), 0);
    io.write(0x530, 0xdead_beef, 4);
    assert_eq!(io.read(0x530, 4), 0xdead_beef);
    assert_eq!(
        io.read(0x520, 4),
        0xffff_ffff,
        "nothing at the default port"
    );
    let err = dev.property_parse("iobase", "0x540").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Attempt to set property 'iobase' on anonymous device (type 'scratch') after it was realized"
    );
    qdev_unrealize(&dev);
    assert_eq!(
        io.read(0x530, 4),
        0xffff_ffff,
        "unrealize unmapped the port"
    );
}
