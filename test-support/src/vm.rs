//! A `none` machine on KVM for tests and benches: RAM, an ISA bus with `isa-debug-exit`,
//! recording devices on ports and MMIO, and vCPUs that start in real mode at a guest
//! image's entry. Built outside the process's `/machine`, so several can run at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hw::core::cpu::machine_create_cpus;
use hw::core::machine::{machine_state, SmpConfig};
use hw::core::memory::{MemoryRegion, MemoryRegionOps};
use hw::core::qdev::{qdev_new, qdev_realize};
use hw::core::runstate::RunRequest;
use hw::i386::x86_cpu::{X86BootState, X86Cpu};
use hw::isa::isa_bus::isa_bus_new;
use parking_lot::Mutex;
use qom::ObjectRef;
use vm_memory::{Bytes, GuestAddress};

use crate::guest::GuestImage;

/// `isa-debug-exit`'s port.
pub const EXIT_PORT: u16 = 0xf4;
/// The first of 16 recorded ports.
pub const RECORD_PORT: u16 = 0x700;
/// The recorded MMIO page.
pub const MMIO_BASE: u64 = 0xfe00_0000;
/// What recorded reads return.
pub const IN_VALUE: u32 = 0x5a5a_5a5a;

/// Returns from the test, reporting the skip ([`crate::skip::skip_kvm`]: a failure where
/// `.ci/run` found /dev/kvm usable), when /dev/kvm is not usable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(reason) = $crate::vm::kvm_unusable() {
            $crate::skip::skip_kvm(reason);
            return;
        }
    };
}

/// Why KVM tests must skip here, if they must.
pub fn kvm_unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not usable: {e}")),
    }
}

/// Records every access a guest makes to it; reads return a fixed pattern.
#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<(u64, u64, u32, bool)>>,
    pub count: AtomicU32,
}

impl MemoryRegionOps for Recorder {
    fn read(&self, offset: u64, size: u32) -> u64 {
        self.log.lock().push((offset, 0, size, false));
        self.count.fetch_add(1, Ordering::Relaxed);
        u64::from(IN_VALUE) & (u64::MAX >> (64 - 8 * size))
    }
    fn write(&self, offset: u64, value: u64, size: u32) {
        self.log.lock().push((offset, value, size, true));
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct TestVm {
    pub machine: ObjectRef,
    pub ports: Arc<Recorder>,
    pub mmio: Arc<Recorder>,
}

impl TestVm {
    /// A `none` machine on KVM with RAM, an ISA bus, `isa-debug-exit` at EXIT_PORT, recorders
    /// at RECORD_PORT and MMIO_BASE, and `cpus` vCPUs of `model` (with any `-cpu` options
    /// after a comma) starting in real mode at the image's entry.
    pub fn new(image: &GuestImage, cpus: u32, model: &str) -> TestVm {
        let vm = TestVm::bare(cpus, model, 2 << 20);
        let ms = machine_state(&vm.machine).unwrap();
        ms.ram()
            .write_slice(&image.bytes, GuestAddress(image.load_addr))
            .unwrap();
        for cpu in ms.cpus() {
            cpu.downcast::<X86Cpu>()
                .unwrap()
                .set_boot_state(real_mode_boot_state(image));
        }
        vm
    }

    /// The same machine with `ram_size` bytes of RAM, nothing loaded and no boot state set:
    /// the test loads its guest and calls [`TestVm::set_boot_state`].
    pub fn bare(cpus: u32, model: &str, ram_size: u64) -> TestVm {
        accel::init().expect("registrations are intact");
        let machine = qom::object_new("none-machine").unwrap();
        let ms = machine_state(&machine).unwrap();
        ms.set_smp(SmpConfig {
            cpus,
            sockets: 1,
            cores: cpus,
            threads: 1,
            max_cpus: cpus,
        });
        ms.set_ram_size(ram_size);
        // `model` may carry -cpu options: `SandyBridge,+vmx`.
        let (model, options) = model.split_once(',').unwrap_or((model, ""));
        ms.set_cpu_type(Some(format!("{model}-x86_64-cpu")));
        ms.set_cpu_options(options.to_string());
        let kvm = accel::accel_find("kvm").unwrap();
        accel::accel_init_machine(kvm, &machine).expect("KVM initialises");
        ms.add_ram(0, ram_size).unwrap();

        let bus = isa_bus_new(&machine, "isa.0", ms.services()).unwrap();
        let exit = qdev_new("isa-debug-exit").unwrap();
        exit.property_parse("iobase", &EXIT_PORT.to_string())
            .unwrap();
        machine.add_child("debug-exit", &exit).unwrap();
        qdev_realize(&exit, Some(&bus)).unwrap();
        let ports = Arc::new(Recorder::default());
        ms.system_io()
            .map(
                RECORD_PORT.into(),
                MemoryRegion::new_io("recorder", 0x10, ports.clone()),
            )
            .unwrap();
        let mmio = Arc::new(Recorder::default());
        ms.system_memory()
            .map(
                MMIO_BASE,
                MemoryRegion::new_io("mmio-recorder", 0x1000, mmio.clone()),
            )
            .unwrap();

        machine_create_cpus(ms).unwrap();
        TestVm {
            machine,
            ports,
            mmio,
        }
    }

    /// Sets the state CPU `index` starts in (a loader's entry state).
    pub fn set_boot_state(&self, index: usize, state: X86BootState) {
        let ms = machine_state(&self.machine).unwrap();
        ms.cpus()[index]
            .downcast::<X86Cpu>()
            .unwrap()
            .set_boot_state(state);
    }

    /// Starts the vCPUs and waits for the run to end.
    pub fn run(&self) -> Option<RunRequest> {
        let ms = machine_state(&self.machine).unwrap();
        let ops = ms.accel_ops().unwrap();
        ops.vm_start();
        let result = ms.run_state().wait(Some(Duration::from_secs(60)));
        ops.shutdown();
        result
    }
}

/// The state a guest image starts in: real mode at its entry (KVM's reset segments, with CS
/// moved from f000:fff0 to 0:entry), as [`crate::raw_kvm::RawVm`] starts it.
pub fn real_mode_boot_state(image: &GuestImage) -> X86BootState {
    let mut state = X86BootState::default();
    state.regs.rip = image.entry;
    state.regs.rflags = 2;
    state.sregs = reset_sregs();
    state
}

/// QEMU's `pc` machine (i440FX, PIIX3, PIIX4 PM, PIT, RTC, i8042, fw_cfg...) on the `accel`
/// accelerator with `ram_size` bytes of RAM and one CPU, built as `qomvm -M pc` builds it
/// (board init, then `machine_creation_done`), outside the process's `/machine`. No kernel:
/// the caller loads its guest and sets CPU 0's boot state.
pub fn pc_machine(accel: &str, ram_size: u64) -> ObjectRef {
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("pc-i440fx-10.0-machine").unwrap();
    machine_state(&machine).unwrap().set_ram_size(ram_size);
    let accel = accel::accel_find(accel).unwrap();
    accel::accel_init_machine(accel, &machine).expect("the accelerator initialises");
    hw::core::machine::machine_run_board_init(&machine).unwrap();
    hw::core::machine::machine_creation_done(&machine).unwrap();
    machine
}

fn reset_sregs() -> kvm_bindings::kvm_sregs {
    let seg = |type_: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    kvm_bindings::kvm_sregs {
        cs: seg(0xb),
        ds: seg(3),
        es: seg(3),
        fs: seg(3),
        gs: seg(3),
        ss: seg(3),
        ldt: kvm_bindings::kvm_segment {
            limit: 0xffff,
            type_: 2,
            present: 1,
            ..Default::default()
        },
        tr: kvm_bindings::kvm_segment {
            limit: 0xffff,
            type_: 11,
            present: 1,
            ..Default::default()
        },
        gdt: kvm_bindings::kvm_dtable {
            limit: 0xffff,
            ..Default::default()
        },
        idt: kvm_bindings::kvm_dtable {
            limit: 0xffff,
            ..Default::default()
        },
        cr0: 0x6000_0010,
        ..Default::default()
    }
}
