//! Exit handling (issue 3): (a) dispatch through `system-io` and `system-memory` with no
//! guest, (b) a full PIO round trip through qomvm's vCPU loop against a raw kvm-ioctls
//! `KVM_RUN` loop measured in the same run, (c) the same for MMIO. Targets: dispatch
//! <= 20 ns per access; round trip <= 1.05x the raw loop. Without a usable /dev/kvm only (a)
//! runs.

use test_support::{guest, raw_kvm, vm};

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hw::core::machine::machine_state;
use hw::core::memory::{AddressSpace, MemoryRegion, MemoryRegionOps};
use parking_lot::{Condvar, Mutex};

/// A device that counts accesses and wakes a waiter when a count is reached.
#[derive(Default)]
struct Counter {
    count: AtomicU64,
    target: AtomicU64,
    reached: Mutex<bool>,
    wake: Condvar,
}

impl Counter {
    fn hit(&self) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.target.load(Ordering::Relaxed) {
            *self.reached.lock() = true;
            self.wake.notify_all();
        }
    }

    /// Time for the next `n` accesses.
    fn time_next(&self, n: u64) -> Duration {
        let mut reached = self.reached.lock();
        *reached = false;
        let start = Instant::now();
        let base = self.count.load(Ordering::Relaxed);
        self.target.store(base + n, Ordering::Relaxed);
        while !*reached {
            self.wake.wait(&mut reached);
        }
        start.elapsed()
    }
}

impl MemoryRegionOps for Counter {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        self.hit();
        0
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {
        self.hit();
    }
}

fn dispatch(c: &mut Criterion) {
    accel::init().expect("registrations are intact");
    let mut g = c.benchmark_group("dispatch");
    let io = AddressSpace::new_io();
    let dev = Arc::new(Counter::default());
    io.map(0x3f8, MemoryRegion::new_io("dev", 8, dev.clone()))
        .unwrap();
    g.bench_function("pio_write", |b| {
        b.iter(|| io.write(black_box(0x3f8), 0x41, 1))
    });
    g.bench_function("pio_read", |b| b.iter(|| io.read(black_box(0x3f8), 1)));
    let memory = AddressSpace::new_memory();
    for i in 0..64u64 {
        let region = MemoryRegion::new_io(format!("mmio{i}"), 0x1000, dev.clone());
        memory.map(0xd000_0000 + i * 0x10_0000, region).unwrap();
    }
    // The 40th of 64 regions: a binary search, not a lucky first hit.
    let addr = 0xd000_0000 + 40 * 0x10_0000 + 0x10;
    g.bench_function("mmio_write_64_regions", |b| {
        b.iter(|| memory.write(black_box(addr), 0x41, 4))
    });
    g.bench_function("mmio_read_64_regions", |b| {
        b.iter(|| memory.read(black_box(addr), 4))
    });
    // What a vCPU thread does: dispatch through its own dispatcher, which keeps the flat
    // view and checks it with one atomic load.
    let mut io_vcpu = io.dispatcher();
    g.bench_function("vcpu_pio_write", |b| {
        b.iter(|| io_vcpu.write(black_box(0x3f8), 0x41, 1))
    });
    g.bench_function("vcpu_pio_read", |b| {
        b.iter(|| io_vcpu.read(black_box(0x3f8), 1))
    });
    let mut memory_vcpu = memory.dispatcher();
    g.bench_function("vcpu_mmio_write_64_regions", |b| {
        b.iter(|| memory_vcpu.write(black_box(addr), 0x41, 4))
    });
    g.bench_function("vcpu_mmio_read_64_regions", |b| {
        b.iter(|| memory_vcpu.read(black_box(addr), 4))
    });
    g.finish();
}

/// Times `iters` exits of a raw loop and of qomvm's vCPU loop running the same guest;
/// prints both and their ratio.
fn compare(
    c: &mut Criterion,
    name: &str,
    image: &guest::GuestImage,
    mut raw: raw_kvm::RawLoop,
    map: impl FnOnce(&hw::core::machine::MachineState, Arc<Counter>),
) {
    let mut g = c.benchmark_group("round_trip");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let mut raw_ns = 0.0;
    g.bench_function(format!("{name}_raw_kvm_run_loop"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            raw.run_exits(iters).unwrap();
            let t = start.elapsed();
            raw_ns = t.as_nanos() as f64 / iters as f64;
            t
        })
    });

    let test_vm = vm::TestVm::new(image, 1, "qemu64");
    let ms = machine_state(&test_vm.machine).unwrap();
    let counter = Arc::new(Counter::default());
    map(ms, counter.clone());
    let ops = ms.accel_ops().unwrap();
    ops.vm_start();
    let mut qomvm_ns = 0.0;
    g.bench_function(format!("{name}_qomvm_vcpu_loop"), |b| {
        b.iter_custom(|iters| {
            let t = counter.time_next(iters);
            qomvm_ns = t.as_nanos() as f64 / iters as f64;
            t
        })
    });
    ops.shutdown();
    g.finish();
    println!(
        "round trip ({name}): qomvm {qomvm_ns:.0} ns/exit, raw KVM_RUN loop {raw_ns:.0} ns/exit, ratio {:.3}",
        qomvm_ns / raw_ns
    );
}

fn round_trips(c: &mut Criterion) {
    if let Some(reason) = vm::kvm_unusable() {
        eprintln!("exit_handling: round trips skipped: {reason}");
        return;
    }
    const PORT: u16 = 0x710;
    let image = guest::build(
        guest::Mode::Real,
        &[guest::Op::Loop { port: PORT }],
        vm::EXIT_PORT,
        0,
    );
    let raw = raw_kvm::RawLoop::new(&image, PORT).expect("raw KVM VM");
    compare(c, "pio", &image, raw, |ms, counter| {
        ms.system_io()
            .map(PORT.into(), MemoryRegion::new_io("counter", 1, counter))
            .unwrap();
    });

    const ADDR: u32 = 0xfe10_0000;
    let image = guest::build(
        guest::Mode::Real,
        &[guest::Op::MmioLoop { addr: ADDR }],
        vm::EXIT_PORT,
        0,
    );
    let raw = raw_kvm::RawLoop::new_mmio(&image, ADDR.into()).expect("raw KVM VM");
    compare(c, "mmio", &image, raw, |ms, counter| {
        ms.system_memory()
            .map(ADDR.into(), MemoryRegion::new_io("counter", 4, counter))
            .unwrap();
    });
}

criterion_group!(benches, dispatch, round_trips);
criterion_main!(benches);
