//! Exit handling (issues 3 and 16).
//!
//! (a) `dispatch`: one access through the `pc` board's own `system-io` and `system-memory`
//!     (every device of `qomvm -M pc` mapped, on the qtest accelerator so it runs anywhere),
//!     with the calls a vCPU thread makes (`Dispatcher::write_bytes`/`read_bytes`), to a
//!     device that counts. Target: <= 20 ns per access.
//! (b) `round_trip`: a guest that loops on `out` to a port (PIO) or on a 4-byte store to an
//!     unmapped address (MMIO), run by qomvm's own vCPU thread (`accel/kvm/kvm_cpus.rs`) on
//!     the `pc` board, and by a bare kvm-ioctls `KVM_RUN` loop (`test_support::raw_kvm`) in
//!     the same process. Both VMs have the same configuration: in-kernel irqchip and PIT,
//!     128 MiB of RAM, the CPUID qomvm gives the pc's `qemu64` CPU, the same guest code in
//!     real mode. The two run in alternating batches of the same size (each criterion
//!     sample is one raw batch and one qomvm batch, the order swapped every sample), so
//!     drift hits both; at the end the bench prints, per access kind, the medians of the
//!     per-exit times and the median of the per-pair ratios qomvm/raw with a bootstrap 95%
//!     confidence interval. Target: ratio <= 1.05. Without a usable /dev/kvm only (a) runs
//!     (the skip is reported; a failure where `QOMVM_REQUIRE_KVM` says KVM is usable).
//!
//! The qomvm batch is timed on the vCPU thread, inside the device: from the moment the
//! thread is let go (it returns from the handler into `KVM_RUN`) to the n-th access, so it
//! counts n full round trips and no thread wake-up. Every wait has a time limit.

use test_support::{guest, raw_kvm, skip, vm};

use std::cell::RefCell;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hw::core::machine::machine_state;
use hw::core::memory::{MemoryRegion, MemoryRegionOps};
use hw::i386::x86_cpu::X86Cpu;
use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress};

/// The guest's loop port: free on the pc board.
const PORT: u16 = 0x710;
/// The guest's MMIO loop address: in the PCI hole, clear of the BARs and the APICs.
const MMIO_ADDR: u32 = 0xfe10_0000;
/// RAM of both VMs of the round trips.
const RAM_SIZE: u64 = 128 << 20;
/// Limit of one batch (raw or qomvm).
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Pairs with fewer exits per batch (criterion's first warm-up calls) are left out of the
/// ratio, unless there are no others (`--test` runs one exit).
const MIN_BATCH_EXITS: u64 = 100;

/// A device that counts accesses (the dispatch benchmarks).
#[derive(Default)]
struct Sink {
    count: AtomicU64,
}

impl MemoryRegionOps for Sink {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        self.count.fetch_add(1, Ordering::Relaxed);
        0
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// The device at the end of the round trip: it lets the vCPU thread run a batch of `n`
/// accesses, then holds it (inside the handler, so the guest does not run) until the next
/// batch, and times each batch on the vCPU thread.
struct Gate {
    /// Accesses left in this batch; the one that brings it to 0 holds the vCPU.
    remaining: AtomicU64,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// The vCPU thread waits in [`Gate::hold`].
    held: bool,
    /// The bench let it go for a batch.
    go: bool,
    /// No more batches: the guest runs freely until the vCPU is stopped.
    released: bool,
    /// When the vCPU left [`Gate::hold`] and when it came back.
    start: Option<Instant>,
    end: Option<Instant>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            // The first access holds the vCPU until the first batch.
            remaining: AtomicU64::new(1),
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    fn access(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.hold();
        }
    }

    /// On the vCPU thread: records the end of the batch and waits for the next one.
    #[cold]
    fn hold(&self) {
        let end = Instant::now();
        let mut st = self.state.lock();
        st.end = Some(end);
        st.held = true;
        self.changed.notify_all();
        while !st.go && !st.released {
            if self
                .changed
                .wait_for(&mut st, BATCH_TIMEOUT * 2)
                .timed_out()
            {
                // The bench is gone: do not keep the vCPU here for ever.
                eprintln!("exit_handling: no batch came; the guest runs freely");
                st.released = true;
            }
        }
        if st.released {
            self.remaining.store(u64::MAX, Ordering::Relaxed);
        }
        st.go = false;
        st.held = false;
        st.start = Some(Instant::now());
    }

    /// Lets the held vCPU run `n` accesses and returns the time they took.
    fn batch(&self, n: u64) -> Result<Duration, String> {
        let deadline = Instant::now() + BATCH_TIMEOUT;
        let mut st = self.state.lock();
        while !st.held {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return Err("the vCPU never reached the device".into());
            }
        }
        self.remaining.store(n, Ordering::Relaxed);
        st.end = None;
        st.go = true;
        self.changed.notify_all();
        loop {
            if let (Some(start), Some(end), true) = (st.start, st.end, st.held) {
                return Ok(end - start);
            }
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return Err(format!(
                    "the vCPU did not finish {n} accesses in {BATCH_TIMEOUT:?}"
                ));
            }
        }
    }

    /// Ends the batches: the guest runs freely (until the caller stops the vCPU).
    fn release(&self) {
        let mut st = self.state.lock();
        st.released = true;
        self.remaining.store(u64::MAX, Ordering::Relaxed);
        self.changed.notify_all();
    }
}

impl MemoryRegionOps for Gate {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        self.access();
        0
    }
    fn write(&self, _offset: u64, _value: u64, _size: u32) {
        self.access();
    }
}

fn dispatch(c: &mut Criterion) {
    let machine = vm::pc_machine("qtest", RAM_SIZE);
    let ms = machine_state(&machine).unwrap();
    let sink = Arc::new(Sink::default());
    let io = ms.system_io();
    let memory = ms.system_memory();
    io.map(PORT.into(), MemoryRegion::new_io("sink", 1, sink.clone()))
        .unwrap();
    memory
        .map(MMIO_ADDR.into(), MemoryRegion::new_io("sink", 4, sink))
        .unwrap();
    println!(
        "dispatch: the pc board's system-io has {} ranges, system-memory {}",
        io.flat_view().ranges().len(),
        memory.flat_view().ranges().len()
    );
    // What a vCPU thread does: its own dispatchers, and `write_bytes`/`read_bytes` on the
    // bytes KVM left in `kvm_run`.
    let mut io_vcpu = io.dispatcher();
    let mut memory_vcpu = memory.dispatcher();
    let mut g = c.benchmark_group("dispatch");
    g.bench_function("pc_pio_write_bytes", |b| {
        b.iter(|| io_vcpu.write_bytes(black_box(PORT.into()), black_box(&[0x41])))
    });
    g.bench_function("pc_pio_read_bytes", |b| {
        let mut data = [0u8; 1];
        b.iter(|| io_vcpu.read_bytes(black_box(PORT.into()), black_box(&mut data)))
    });
    g.bench_function("pc_mmio_write_bytes", |b| {
        b.iter(|| memory_vcpu.write_bytes(black_box(MMIO_ADDR.into()), black_box(&[0x41; 4])))
    });
    g.bench_function("pc_mmio_read_bytes", |b| {
        let mut data = [0u8; 4];
        b.iter(|| memory_vcpu.read_bytes(black_box(MMIO_ADDR.into()), black_box(&mut data)))
    });
    g.finish();
}

/// One sample of a round trip: a raw batch and a qomvm batch of `exits` each.
#[derive(Clone, Copy)]
struct Pair {
    exits: u64,
    raw: Duration,
    qomvm: Duration,
}

#[derive(Clone, Copy)]
enum Kind {
    Pio,
    Mmio,
}

fn round_trip(c: &mut Criterion, kind: Kind) {
    let (name, op) = match kind {
        Kind::Pio => ("pio", guest::Op::Loop { port: PORT }),
        Kind::Mmio => ("mmio", guest::Op::MmioLoop { addr: MMIO_ADDR }),
    };
    let image = guest::build(guest::Mode::Real, &[op], vm::EXIT_PORT, 0);

    // qomvm: the pc board, the gate on its address spaces, CPU 0 at the guest's entry.
    let machine = vm::pc_machine("kvm", RAM_SIZE);
    let ms = machine_state(&machine).unwrap();
    ms.ram()
        .write_slice(&image.bytes, GuestAddress(image.load_addr))
        .unwrap();
    let cpu = ms.cpus()[0].clone();
    cpu.downcast::<X86Cpu>()
        .unwrap()
        .set_boot_state(vm::real_mode_boot_state(&image));
    let gate = Arc::new(Gate::new());
    match kind {
        Kind::Pio => ms
            .system_io()
            .map(PORT.into(), MemoryRegion::new_io("gate", 1, gate.clone())),
        Kind::Mmio => ms.system_memory().map(
            MMIO_ADDR.into(),
            MemoryRegion::new_io("gate", 4, gate.clone()),
        ),
    }
    .expect("the loop's port or address is free on the pc board");

    // The raw loop: the same configuration.
    let config = raw_kvm::RawConfig {
        irqchip: true,
        cpuid: Some(accel::kvm::x86::vcpu_cpuid(&machine, &cpu).expect("the pc is on KVM")),
    };
    let mut raw = match kind {
        Kind::Pio => raw_kvm::RawLoop::with_config(&image, PORT, RAM_SIZE as usize, &config),
        Kind::Mmio => {
            raw_kvm::RawLoop::mmio_with_config(&image, MMIO_ADDR.into(), RAM_SIZE as usize, &config)
        }
    }
    .expect("raw KVM VM");

    let ops = ms.accel_ops().unwrap();
    ops.vm_start();
    let pairs = RefCell::new(Vec::new());
    let mut raw_first = true;
    let mut g = c.benchmark_group("round_trip");
    g.sample_size(50).measurement_time(Duration::from_secs(10));
    // Criterion's estimate is qomvm's time per exit; the raw batch beside each sample is
    // kept for the ratio printed below.
    g.bench_function(format!("{name}_qomvm_interleaved_with_raw"), |b| {
        b.iter_custom(|exits| {
            let run_raw = |raw: &mut raw_kvm::RawLoop| {
                raw.run_exits(exits, BATCH_TIMEOUT)
                    .unwrap_or_else(|e| panic!("raw {name} loop: {e}"))
            };
            let run_qomvm = || {
                gate.batch(exits)
                    .unwrap_or_else(|e| panic!("qomvm {name} loop: {e}"))
            };
            let (raw_t, qomvm_t) = if raw_first {
                let r = run_raw(&mut raw);
                (r, run_qomvm())
            } else {
                let q = run_qomvm();
                (run_raw(&mut raw), q)
            };
            raw_first = !raw_first;
            pairs.borrow_mut().push(Pair {
                exits,
                raw: raw_t,
                qomvm: qomvm_t,
            });
            qomvm_t
        })
    });
    g.finish();
    gate.release();
    ops.shutdown();
    let pairs = pairs.into_inner();
    if !pairs.is_empty() {
        println!("{}", report(name, &pairs));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The medians of the per-exit times, and the median of the per-pair ratios with a
/// bootstrap 95% confidence interval (resampling pairs) and the extremes.
fn report(name: &str, all: &[Pair]) -> String {
    let big: Vec<Pair> = all
        .iter()
        .copied()
        .filter(|p| p.exits >= MIN_BATCH_EXITS)
        .collect();
    let pairs = if big.is_empty() { all.to_vec() } else { big };
    let per_exit = |d: Duration, n: u64| d.as_nanos() as f64 / n as f64;
    let mut raw: Vec<f64> = pairs.iter().map(|p| per_exit(p.raw, p.exits)).collect();
    let mut qomvm: Vec<f64> = pairs.iter().map(|p| per_exit(p.qomvm, p.exits)).collect();
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|p| p.qomvm.as_secs_f64() / p.raw.as_secs_f64())
        .collect();
    let mut sorted = ratios.clone();
    let ratio = median(&mut sorted);
    let (lo, hi) = bootstrap_ci(&ratios);
    let exits: u64 = pairs.iter().map(|p| p.exits).sum();
    format!(
        "round trip ({name}): qomvm {:.0} ns/exit, raw KVM_RUN loop {:.0} ns/exit \
         (medians over {} interleaved batch pairs, {exits} exits each side)\n\
         round trip ({name}): ratio qomvm/raw {ratio:.3} (median of per-pair ratios; \
         bootstrap 95% CI {lo:.3}-{hi:.3}; pairs ranged {:.3}-{:.3})",
        median(&mut qomvm),
        median(&mut raw),
        pairs.len(),
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

/// The 2.5th and 97.5th percentiles of the median of `v` resampled with replacement
/// (2000 resamples; a fixed xorshift seed, so a run's figures are reproducible from its
/// pairs).
fn bootstrap_ci(v: &[f64]) -> (f64, f64) {
    const RESAMPLES: usize = 2000;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let mut sample: Vec<f64> = (0..v.len())
                .map(|_| v[(next() % v.len() as u64) as usize])
                .collect();
            median(&mut sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (
        medians[RESAMPLES * 25 / 1000],
        medians[RESAMPLES * 975 / 1000 - 1],
    )
}

fn round_trips(c: &mut Criterion) {
    if let Some(reason) = vm::kvm_unusable() {
        skip::skip_kvm(format!("exit_handling round trips: {reason}"));
        return;
    }
    round_trip(c, Kind::Pio);
    round_trip(c, Kind::Mmio);
}

criterion_group!(benches, dispatch, round_trips);
criterion_main!(benches);
