//! `-global` applies to devices created afterwards, before their own options. In a test
//! binary of its own because globals are process-wide.

use hw::core::machine::machine_state;
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::core::qdev_properties::{register_global, GlobalError};
use test_support::qtest::machine_with_isa_bus;

#[test]
fn globals_set_defaults_and_bad_ones_are_refused() {
    accel::init().expect("registrations are intact");
    assert!(matches!(
        register_global("nosuch.iobase=1"),
        Err(GlobalError::UnknownDriver(_))
    ));
    assert!(matches!(
        register_global("isa-debug-exit"),
        Err(GlobalError::Format)
    ));
    assert_eq!(
        register_global("isa-debug-exit.nosuch=1")
            .unwrap_err()
            .to_string(),
        "Property 'isa-debug-exit.nosuch' not found"
    );
    assert_eq!(
        register_global("isa-debug-exit.iobase=0x10000")
            .unwrap_err()
            .to_string(),
        "Parameter 'iobase' expects a non-negative integer below 65536"
    );
    register_global("isa-debug-exit.iobase=0x510").unwrap();

    let dev = qdev_new("isa-debug-exit").unwrap();
    assert_eq!(dev.prop_uint("iobase").unwrap(), 0x510);
    dev.property_parse("iobase", "0x520").unwrap();

    let (machine, bus) = machine_with_isa_bus();
    let io = machine_state(&machine).unwrap().system_io().clone();
    machine.add_child("dbg", &dev).unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    assert_eq!(
        io.flat_view().ranges()[0].start(),
        0x520,
        "-device options win over -global"
    );
}
