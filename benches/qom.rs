//! QOM hot paths: type lookup, object creation, casts, property parsing.
//! Targets (issue 2): lookup <= 30 ns, cached cast <= 10 ns, object_new <= 1 us.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

fn qom_benches(c: &mut Criterion) {
    accel::init().expect("registrations are intact");
    let mut g = c.benchmark_group("qom");

    g.bench_function("type_lookup_by_name", |b| {
        b.iter(|| qom::object_class_by_name(black_box("isa-debug-exit")))
    });

    g.bench_function("object_new_device", |b| {
        b.iter(|| hw::core::qdev::qdev_new(black_box("isa-debug-exit")).unwrap())
    });

    let dev = hw::core::qdev::qdev_new("isa-debug-exit").unwrap();
    // A name that is not the table's own pointer, so the byte comparison path is measured.
    let device = String::from("device");
    g.bench_function("dynamic_cast_hit", |b| {
        b.iter(|| {
            black_box(&dev)
                .dynamic_cast(black_box(hw::core::qdev::TYPE_DEVICE))
                .is_some()
        })
    });
    g.bench_function("dynamic_cast_hit_copied_name", |b| {
        b.iter(|| {
            black_box(&dev)
                .dynamic_cast(black_box(device.as_str()))
                .is_some()
        })
    });
    g.bench_function("dynamic_cast_miss", |b| {
        b.iter(|| {
            black_box(&dev)
                .dynamic_cast(black_box("pci-device"))
                .is_some()
        })
    });
    g.bench_function("downcast_to_rust_part", |b| {
        b.iter(|| {
            black_box(&dev)
                .downcast::<hw::core::qdev::DeviceState>()
                .is_some()
        })
    });
    g.bench_function("property_set_from_string", |b| {
        b.iter(|| {
            dev.property_parse(black_box("iobase"), black_box("0x3f8"))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, qom_benches);
criterion_main!(benches);
