//! Machines (QEMU's `hw/core/machine.c`): the abstract `machine` type, `MachineClass`, the
//! `-smp` topology, and the requests (shutdown, reset, debug exit) that end or restart a run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qom::{
    type_init, ClassInitFor, Error, Object, ObjectBase, ObjectClass, ObjectRef, ObjectType,
    Prop,
};
use vm_memory::GuestMemoryMmap;

use crate::core::accel_ops::AccelOpsRef;
use crate::core::chardev::CharBackend;
use crate::core::memory::AddressSpace;
use crate::core::qdev::{QdevError, RealizeError};
use crate::core::runstate::{RunState, RunStateError, VmState};
use crate::core::services::{MachineServices, RamError};

/// When the process started, as `main` recorded it: boot-time figures are measured from it.
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Logs (`RUST_LOG=boot=debug`) that start-up finished `phase`, with the time since
/// [`PROCESS_START`]: where the time to the first `KVM_RUN` goes.
pub fn startup_phase(phase: &str) {
    if let Some(start) = PROCESS_START.get() {
        log::debug!(target: "boot", "{phase} done {:.2} ms after process start", start.elapsed().as_secs_f64() * 1e3);
    }
}

/// QEMU's `TYPE_MACHINE`.
pub const TYPE_MACHINE: &str = "machine";
/// Suffix of every machine type name (`pc-i440fx-9.2-machine`).
pub const TYPE_MACHINE_SUFFIX: &str = "-machine";

/// QEMU's `MachineClass`: what `-machine help` and `select_machine` read, derived from the
/// machine type's [`MachineImpl`].
#[derive(Clone, Debug)]
pub struct MachineClass {
    /// The `-M` name: the type name without `-machine`.
    pub name: &'static str,
    /// One-line description for `-machine help`.
    pub desc: &'static str,
    /// Another `-M` name for it (`pc`).
    pub alias: Option<&'static str>,
    /// Chosen when `-M` is not given.
    pub is_default: bool,
    /// Highest `-smp maxcpus`.
    pub max_cpus: u32,
    /// Lowest `-smp`.
    pub min_cpus: u32,
    /// CPU model when `-cpu` is not given; `None` for machines without CPUs.
    pub default_cpu_type: Option<&'static str>,
    /// RAM when `-m` is not given.
    pub default_ram_size: u64,
    /// The `-vga` type the machine gets unless told otherwise (QEMU's
    /// `default_display`: `std` on `pc`), `None` for none.
    pub default_display: Option<&'static str>,
    /// The `-drive` interface when `if=` is not given (QEMU's `block_default_type`:
    /// `ide` on `pc`, `none` elsewhere).
    pub block_default_type: &'static str,
    /// The IDE buses the board builds, which `-drive if=ide` drives go on (QEMU's
    /// `MAX_IDE_BUS` on boards with an IDE controller).
    pub ide_buses: u32,
    /// Whether `-smp` names dies (QEMU's `smp_props.dies_supported`: `pc` does).
    pub smp_dies_supported: bool,
    /// Whether `usb=on` gives the board a USB controller (QEMU's boards that read
    /// `machine_usb()`: `pc`'s PIIX3 UHCI).
    pub has_usb: bool,
    /// The network card `-nic` and `-net nic` make without `model=`, and the one the
    /// machine gets on user networking when no network option or `-nodefaults` is given
    /// (QEMU's `default_nic`: `e1000` on `pc`); `None`: no default network.
    pub default_nic: Option<&'static str>,
    /// Whether the machine gets QEMU's default parallel port (LPT1; QEMU's
    /// `no_parallel` clear).
    pub has_parallel: bool,
    /// Whether the machine gets QEMU's default empty floppy drive `floppy0` (QEMU's
    /// `no_floppy` clear).
    pub has_floppy: bool,
    /// Device defaults an older machine version undoes (QEMU's `compat_props`), applied
    /// to every new device ahead of `-global`, in order (a later entry wins).
    pub compat_props: Vec<crate::core::machine_compat::CompatProp>,
    /// Why the machine type is deprecated, if it is (QEMU's `deprecation_reason`).
    pub deprecation_reason: Option<&'static str>,
    /// The machine's methods, as a trait object.
    machine: Option<qom::ImplCast<dyn Machine>>,
}

/// A machine type: QEMU's `MachineClass` constants and methods as a trait.
pub trait MachineImpl: ObjectType {
    /// One-line description for `-machine help`.
    const DESC: &'static str = "";
    /// Another `-M` name (`pc`).
    const ALIAS: Option<&'static str> = None;
    /// Chosen when `-M` is not given.
    const IS_DEFAULT: bool = false;
    /// Highest `-smp maxcpus`.
    const MAX_CPUS: u32 = 1;
    /// Lowest `-smp`.
    const MIN_CPUS: u32 = 1;
    /// CPU model when `-cpu` is not given.
    const DEFAULT_CPU_TYPE: Option<&'static str> = None;
    /// RAM when `-m` is not given (QEMU's default, 128 MiB).
    const DEFAULT_RAM_SIZE: u64 = 128 << 20;
    /// The `-vga` type when none is given (QEMU's `default_display`).
    const DEFAULT_DISPLAY: Option<&'static str> = None;
    /// The `-drive` interface when `if=` is not given (QEMU's `block_default_type`).
    const BLOCK_DEFAULT_TYPE: &'static str = "none";
    /// See [`MachineClass::ide_buses`].
    const IDE_BUSES: u32 = 0;
    /// Whether `-smp` names dies (QEMU's `smp_props.dies_supported`).
    const SMP_DIES_SUPPORTED: bool = false;
    /// See [`MachineClass::has_usb`].
    const HAS_USB: bool = false;
    /// See [`MachineClass::default_nic`].
    const DEFAULT_NIC: Option<&'static str> = None;
    /// [`MachineClass::has_parallel`].
    const HAS_PARALLEL: bool = false;
    /// [`MachineClass::has_floppy`].
    const HAS_FLOPPY: bool = false;

    /// Builds the board (QEMU's `MachineClass::init`, `pc_init1` for `pc`).
    fn init(&self) -> Result<(), MachineError> {
        Ok(())
    }
    /// Board work once every `-device` is created, before the guest starts (QEMU's
    /// `machine_done` notifier: firmware-like set-up such as BAR assignment and ACPI).
    fn machine_done(&self) -> Result<(), MachineError> {
        Ok(())
    }
    /// Board work at each system reset after the devices reset (QEMU's
    /// `MachineClass::reset`; the pc board reloads a `-kernel` there).
    fn reset(&self) -> Result<(), MachineError> {
        Ok(())
    }
}

/// The dynamically dispatched half of [`MachineImpl`] (its constants live in the class).
pub trait Machine: Send + Sync {
    /// [`MachineImpl::init`].
    fn init(&self) -> Result<(), MachineError>;
    /// [`MachineImpl::machine_done`].
    fn machine_done(&self) -> Result<(), MachineError>;
    /// [`MachineImpl::reset`].
    fn reset(&self) -> Result<(), MachineError>;
}

impl<T: MachineImpl> Machine for T {
    fn init(&self) -> Result<(), MachineError> {
        MachineImpl::init(self)
    }
    fn machine_done(&self) -> Result<(), MachineError> {
        MachineImpl::machine_done(self)
    }
    fn reset(&self) -> Result<(), MachineError> {
        MachineImpl::reset(self)
    }
}

fn as_machine<T: MachineImpl>(obj: &Object) -> Option<&(dyn Machine + 'static)> {
    obj.downcast::<T>().map(|m| m as &dyn Machine)
}

/// `machine`'s class_init of each machine type: the class record from the impl.
impl<T: MachineImpl> ClassInitFor<T> for MachineState {
    fn class_init(class: &mut ObjectClass) {
        qom::object_class_init::<T>(class);
        let type_name = T::TYPE_NAME;
        class.insert(MachineClass {
            name: type_name
                .strip_suffix(TYPE_MACHINE_SUFFIX)
                .unwrap_or(type_name),
            desc: T::DESC,
            alias: T::ALIAS,
            is_default: T::IS_DEFAULT,
            max_cpus: T::MAX_CPUS,
            min_cpus: T::MIN_CPUS,
            default_cpu_type: T::DEFAULT_CPU_TYPE,
            default_ram_size: T::DEFAULT_RAM_SIZE,
            default_display: T::DEFAULT_DISPLAY,
            block_default_type: T::BLOCK_DEFAULT_TYPE,
            ide_buses: T::IDE_BUSES,
            smp_dies_supported: T::SMP_DIES_SUPPORTED,
            has_usb: T::HAS_USB,
            default_nic: T::DEFAULT_NIC,
            has_parallel: T::HAS_PARALLEL,
            has_floppy: T::HAS_FLOPPY,
            compat_props: Vec::new(),
            deprecation_reason: None,
            machine: Some(as_machine::<T>),
        });
    }
}

/// The machine methods of `obj`, if it is a machine.
pub fn machine_impl(obj: &Object) -> Option<&dyn Machine> {
    machine_class(obj.class()).and_then(|mc| mc.machine?(obj))
}

/// The `-smp` configuration (QEMU's `CpuTopology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmpConfig {
    /// CPUs present at start.
    pub cpus: u32,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// CPUs possible (hotplug limit).
    pub max_cpus: u32,
}

impl Default for SmpConfig {
    fn default() -> Self {
        SmpConfig {
            cpus: 1,
            sockets: 1,
            cores: 1,
            threads: 1,
            max_cpus: 1,
        }
    }
}

/// QEMU's `MachineState`: what every machine instance has.
#[derive(qom::Object)]
#[qom(name = TYPE_MACHINE, abstract, class_level)]
pub struct MachineState {
    #[parent]
    parent: ObjectBase,
    #[property(desc = "Linux kernel image file")]
    kernel: Prop<Option<String>>,
    #[property(desc = "Linux initial ramdisk file")]
    initrd: Prop<Option<String>>,
    #[property(desc = "Linux kernel command line")]
    append: Prop<Option<String>>,
    #[property(desc = "Firmware image")]
    firmware: Prop<Option<String>>,
    #[property(name = "dump-guest-core", default = true, desc = "Include guest memory in a core dump")]
    dump_guest_core: Prop<bool>,
    #[property(name = "mem-merge", default = true, desc = "Enable/disable memory merge support")]
    mem_merge: Prop<bool>,
    #[property(default = true, desc = "Set on/off to enable/disable graphics emulation")]
    graphics: Prop<bool>,
    #[property(default = false, desc = "Set on/off to enable/disable usb")]
    usb: Prop<bool>,
    ram_size: AtomicU64,
    /// `-boot`: what the firmware is told about booting.
    boot: Mutex<BootConfig>,
    /// `-uuid` (QEMU's `qemu_uuid`), or `-smbios type=1,uuid=`.
    uuid: Mutex<Option<crate::core::uuid::Uuid>>,
    /// The `-smbios` option strings, in order (checked where they are parsed; boards build
    /// their tables from them).
    smbios: Mutex<Vec<String>>,
    smp: Mutex<SmpConfig>,
    cpu_type: Mutex<Option<String>>,
    cpu_options: Mutex<String>,
    accel: Mutex<Option<ObjectRef>>,
    cpus: Mutex<Vec<ObjectRef>>,
    serial_hds: Mutex<Vec<Option<Arc<dyn CharBackend>>>>,
    parallel_hds: Mutex<Vec<Option<Arc<dyn CharBackend>>>>,
    /// The display device the board creates (QEMU's `vga_interface_type`, from `-vga` or
    /// the machine's default display): a device type name, or none.
    vga_interface: Mutex<Option<&'static str>>,
    services: Arc<MachineServices>,
}

/// `-boot` (QEMU's `BootConfiguration`): checked where it is parsed, read by boards when
/// they tell their firmware.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// `order=`: boot device letters (a-b floppy, c-f disk, d CD-ROM, n-p network).
    pub order: Option<String>,
    /// `once=`: the order for the first boot only; a reset restores `order`.
    pub once: Option<String>,
    /// `menu=on|off`: the firmware offers its boot menu.
    pub menu: Option<bool>,
    /// `splash=`: a JPEG or BMP the firmware shows while it waits for the menu key.
    pub splash: Option<String>,
    /// `splash-time=`: how long the menu (and splash) waits, in ms (0-65535).
    pub splash_time: Option<i64>,
    /// `reboot-timeout=`: ms before the firmware reboots after finding nothing to boot
    /// (-1: never; up to 65535).
    pub reboot_timeout: Option<i64>,
    /// `strict=on`: only the `bootindex` devices are tried.
    pub strict: bool,
}

/// Errors of `-boot`'s values, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootConfigError {
    /// A letter outside a-p.
    #[error("Invalid boot device '{0}'")]
    InvalidDevice(char),
    /// A letter given twice.
    #[error("Boot device '{0}' was given twice")]
    Twice(char),
    /// `splash-time` outside 0-65535.
    #[error("splash-time is invalid,it should be a value between 0 and 65535")]
    SplashTime,
    /// `reboot-timeout` outside -1-65535.
    #[error("reboot timeout is invalid,it should be a value between -1 and 65535")]
    RebootTimeout,
}

impl BootConfig {
    /// QEMU's `validate_bootdevices`: letters a-p, each at most once (what a board can
    /// boot from is the board's call).
    pub fn validate_devices(devices: &str) -> Result<(), BootConfigError> {
        let mut seen = 0u32;
        for c in devices.chars() {
            if !c.is_ascii_lowercase() || c > 'p' {
                return Err(BootConfigError::InvalidDevice(c));
            }
            let bit = 1 << (c as u32 - 'a' as u32);
            if seen & bit != 0 {
                return Err(BootConfigError::Twice(c));
            }
            seen |= bit;
        }
        Ok(())
    }

    /// The checks QEMU makes of the whole configuration (the timeouts' ranges).
    pub fn validate(&self) -> Result<(), BootConfigError> {
        for devices in [&self.order, &self.once].into_iter().flatten() {
            Self::validate_devices(devices)?;
        }
        if self.splash_time.is_some_and(|t| !(0..=0xffff).contains(&t)) {
            return Err(BootConfigError::SplashTime);
        }
        if self.reboot_timeout.is_some_and(|t| !(-1..=0xffff).contains(&t)) {
            return Err(BootConfigError::RebootTimeout);
        }
        Ok(())
    }
}

type_init!(MachineState {
    class_init: Some(machine_base_class_init),
    instance_init: Some(machine_instance_init),
});

impl AsRef<VmState> for MachineState {
    fn as_ref(&self) -> &VmState {
        self.services.vm()
    }
}

impl MachineState {
    /// `-bios` (QEMU's `firmware` machine property).
    pub fn firmware(&self) -> Option<String> {
        self.firmware.get()
    }
    /// `usb=on` (`-usb`, `-usbdevice`): the board adds its USB controller.
    pub fn usb(&self) -> bool {
        self.usb.get()
    }
    /// `-nographic` and `graphics=off` clear it.
    pub fn graphics(&self) -> bool {
        self.graphics.get()
    }
    /// `-kernel`.
    pub fn kernel(&self) -> Option<String> {
        self.kernel.get()
    }
    /// `-initrd`.
    pub fn initrd(&self) -> Option<String> {
        self.initrd.get()
    }
    /// `-append`.
    pub fn append(&self) -> Option<String> {
        self.append.get()
    }
    /// Guest RAM in bytes (`-m`).
    pub fn ram_size(&self) -> u64 {
        self.ram_size.load(Ordering::Relaxed)
    }
    /// `-boot strict=on` (QEMU's `boot_strict`).
    pub fn boot_strict(&self) -> bool {
        self.boot.lock().strict
    }
    /// `-boot`, as given.
    pub fn boot_config(&self) -> BootConfig {
        self.boot.lock().clone()
    }
    /// Sets `-boot`, before board init.
    pub fn set_boot_config(&self, config: BootConfig) {
        *self.boot.lock() = config;
    }
    /// The VM's UUID, if one was given.
    pub fn uuid(&self) -> Option<crate::core::uuid::Uuid> {
        *self.uuid.lock()
    }
    /// Sets the VM's UUID, before board init.
    pub fn set_uuid(&self, uuid: Option<crate::core::uuid::Uuid>) {
        *self.uuid.lock() = uuid;
    }
    /// The `-smbios` options, in order.
    pub fn smbios_options(&self) -> Vec<String> {
        self.smbios.lock().clone()
    }
    /// Sets the `-smbios` options, before board init.
    pub fn set_smbios_options(&self, options: Vec<String>) {
        *self.smbios.lock() = options;
    }
    /// Sets guest RAM (`-m`), before board init.
    pub fn set_ram_size(&self, bytes: u64) {
        self.ram_size.store(bytes, Ordering::Relaxed);
    }
    /// The `-smp` topology.
    pub fn smp(&self) -> SmpConfig {
        *self.smp.lock()
    }
    /// Sets the `-smp` topology, before board init.
    pub fn set_smp(&self, smp: SmpConfig) {
        self.services.set_cpu_count(smp.cpus);
        *self.smp.lock() = smp;
    }
    /// The CPU type (`-cpu` or the class default) as a QOM type name.
    pub fn cpu_type(&self) -> Option<String> {
        self.cpu_type.lock().clone()
    }
    /// Sets the CPU type.
    pub fn set_cpu_type(&self, cpu_type: Option<String>) {
        *self.cpu_type.lock() = cpu_type;
    }
    /// What followed the model in `-cpu MODEL,...`.
    pub fn cpu_options(&self) -> String {
        self.cpu_options.lock().clone()
    }
    /// Sets the `-cpu` options.
    pub fn set_cpu_options(&self, options: String) {
        *self.cpu_options.lock() = options;
    }
    /// What the machine hands to its devices.
    pub fn services(&self) -> &Arc<MachineServices> {
        &self.services
    }
    /// QEMU's `get_system_memory()`.
    pub fn system_memory(&self) -> &Arc<AddressSpace> {
        self.services.system_memory()
    }
    /// QEMU's `get_system_io()`.
    pub fn system_io(&self) -> &Arc<AddressSpace> {
        self.services.system_io()
    }
    /// The accelerator object (`/machine/accel` in QEMU's `current_accel()`).
    pub fn accel(&self) -> Option<ObjectRef> {
        self.accel.lock().clone()
    }
    /// Records the accelerator chosen by `configure_accelerator`.
    pub fn set_accel(&self, accel: ObjectRef) {
        *self.accel.lock() = Some(accel);
    }
    /// The accelerator's operations, once an accelerator is initialised.
    pub fn accel_ops(&self) -> Option<AccelOpsRef> {
        self.services.accel_ops().cloned()
    }
    /// Installs the accelerator's operations (`accel_init_machine` does, once).
    pub fn set_accel_ops(&self, ops: AccelOpsRef) -> Result<(), RunStateError> {
        self.services.vm().set_accel_ops(ops)
    }
    /// Guest RAM, for loaders and devices that read or write guest memory.
    pub fn ram(&self) -> Arc<GuestMemoryMmap> {
        self.services.ram()
    }
    /// Allocates `size` bytes of guest RAM at `guest_addr` and maps it through the
    /// accelerator.
    pub fn add_ram(&self, guest_addr: u64, size: u64) -> Result<(), MachineError> {
        self.add_ram_except(guest_addr, size, None)
    }
    /// [`MachineState::add_ram`] with `hole` left out of the accelerator's mapping (see
    /// [`MachineServices::add_ram_except`]).
    pub fn add_ram_except(
        &self,
        guest_addr: u64,
        size: u64,
        hole: Option<std::ops::Range<u64>>,
    ) -> Result<(), MachineError> {
        self.services.add_ram_except(guest_addr, size, hole)?;
        // QEMU's ram_block_add: huge pages (MADV_HUGEPAGE), `dump-guest-core=off` keeps
        // guest RAM out of qomvm's core dumps (MADV_DONTDUMP), `mem-merge=on` offers it to
        // KSM (MADV_MERGEABLE). All advice: a kernel without THP or KSM refuses it, which
        // changes nothing else.
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let ram = self.services.ram();
        if let (Ok(host), Ok(len)) = (
            ram.get_host_address(GuestAddress(guest_addr)),
            usize::try_from(size),
        ) {
            let advise = |advice| {
                // SAFETY: [host, host + len) is the mapping add_ram just created; advice
                // changes no contents.
                unsafe { libc::madvise(host.cast(), len, advice) }
            };
            // Transparent huge pages where the host offers them (QEMU_MADV_HUGEPAGE).
            advise(libc::MADV_HUGEPAGE);
            if !self.dump_guest_core.get() {
                advise(libc::MADV_DONTDUMP);
            }
            if self.mem_merge.get() {
                advise(libc::MADV_MERGEABLE);
            }
        }
        Ok(())
    }
    /// Waits for the vCPUs `machine_start_cpus` left setting themselves up to report
    /// created; the failure of the lowest CPU index, if any. Nothing to do when none is
    /// pending or no accelerator is initialised.
    pub fn wait_cpus_created(&self) -> Result<(), qom::Error> {
        self.accel_ops()
            .map_or(Ok(()), |accel| accel.wait_vcpus_created())
    }
    /// The machine's CPUs, by index.
    pub fn cpus(&self) -> Vec<ObjectRef> {
        self.cpus.lock().clone()
    }
    /// Adds a CPU (board init does, as CPUs are created).
    pub fn add_cpu(&self, cpu: ObjectRef) {
        self.cpus.lock().push(cpu);
    }
    /// The backends of `-serial` (QEMU's `serial_hds`): entry `i` is COM`i+1`, `None` for
    /// `-serial none`.
    pub fn serial_hds(&self) -> Vec<Option<Arc<dyn CharBackend>>> {
        self.serial_hds.lock().clone()
    }
    /// The display device the board creates, if any.
    pub fn vga_interface(&self) -> Option<&'static str> {
        *self.vga_interface.lock()
    }

    /// Sets the display device the board creates (`-vga`, or the default display unless
    /// `-nodefaults` or a `-device` of a display device).
    pub fn set_vga_interface(&self, driver: Option<&'static str>) {
        *self.vga_interface.lock() = driver;
    }

    /// Sets the `-serial` backends, before board init.
    pub fn set_serial_hds(&self, hds: Vec<Option<Arc<dyn CharBackend>>>) {
        *self.serial_hds.lock() = hds;
    }
    /// The backends of `-parallel` (QEMU's `parallel_hds`): entry `i` is LPT`i+1`, `None`
    /// for `-parallel none`.
    pub fn parallel_hds(&self) -> Vec<Option<Arc<dyn CharBackend>>> {
        self.parallel_hds.lock().clone()
    }
    /// Sets the `-parallel` backends, before board init.
    pub fn set_parallel_hds(&self, hds: Vec<Option<Arc<dyn CharBackend>>>) {
        *self.parallel_hds.lock() = hds;
    }
    /// The run-request mailbox.
    pub fn run_state(&self) -> &RunState {
        self.services.vm().requests()
    }
    /// The run status, its event listeners and the power button (see `runstate`).
    pub fn vm_state(&self) -> &VmState {
        self.services.vm()
    }
}

/// The `MachineClass` of `class`, if it is a machine class.
pub fn machine_class(class: &ObjectClass) -> Option<&MachineClass> {
    class.get::<MachineClass>()
}

/// The machine part of a machine object.
pub fn machine_state(obj: &Object) -> Option<&MachineState> {
    obj.downcast::<MachineState>()
}

/// The abstract `machine` class: a class record for listings of the abstract type.
fn machine_base_class_init(class: &mut ObjectClass) {
    qom::object_class_init::<MachineState>(class);
    class.insert(MachineClass {
        name: TYPE_MACHINE,
        desc: "",
        alias: None,
        is_default: false,
        max_cpus: 1,
        min_cpus: 1,
        default_cpu_type: None,
        default_ram_size: 128 << 20,
        default_display: None,
        block_default_type: "none",
        ide_buses: 0,
        smp_dies_supported: false,
        has_usb: false,
        default_nic: None,
        has_parallel: false,
        has_floppy: false,
        compat_props: Vec::new(),
        deprecation_reason: None,
        machine: None,
    });
}

fn machine_instance_init(obj: &Object) {
    // The containers every machine has (QEMU creates them in `qemu_create_machine`).
    let Some(this) = obj.to_ref() else { return };
    for name in ["unattached", "peripheral", "peripheral-anon"] {
        qom::container_get(&this, name);
    }
    let (Some(ms), Some(mc)) = (machine_state(obj), machine_class(obj.class())) else {
        return;
    };
    ms.set_ram_size(mc.default_ram_size);
    ms.set_cpu_type(mc.default_cpu_type.map(str::to_string));
    let machine = obj.downgrade();
    ms.vm_state().set_reset_handler(Box::new(move || {
        if let Some(machine) = machine.upgrade() {
            if let Err(e) = reset_machine(&machine) {
                qom::error_report!("system reset: {e}");
            }
        }
    }));
}

/// Errors of choosing and building a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// `-M` names no machine.
    #[error("unsupported machine type '{0}'\nUse -machine help to list supported machines")]
    Unknown(String),
    /// No machine type is marked default.
    #[error("No machine specified, and there is no default\nUse -machine help to list supported machines")]
    NoDefault,
    /// `-smp` above the machine's limit.
    #[error("Invalid SMP CPUs {cpus}. The max CPUs supported by machine '{machine}' is {max}")]
    TooManyCpus {
        /// CPUs asked for.
        cpus: u32,
        /// The machine.
        machine: &'static str,
        /// Its limit.
        max: u32,
    },
    /// `-smp` below the machine's minimum.
    #[error("Invalid SMP CPUs {cpus}. The min CPUs supported by machine '{machine}' is {min}")]
    TooFewCpus {
        /// CPUs asked for.
        cpus: u32,
        /// The machine.
        machine: &'static str,
        /// Its minimum.
        min: u32,
    },
    /// A property the machine refuses (`usb=on` without USB).
    #[error("{0}")]
    Unsupported(String),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// A device of the board failed to realize.
    #[error(transparent)]
    Realize(#[from] RealizeError),
    /// A device of the board could not be created or plugged.
    #[error(transparent)]
    Qdev(#[from] QdevError),
    /// The board failed in its own way (a kernel that does not load...).
    #[error(transparent)]
    Board(Box<dyn std::error::Error + Send + Sync>),
    /// A QOM error during board init.
    #[error(transparent)]
    Qom(#[from] Error),
}

impl MachineError {
    /// A board-specific error.
    pub fn board(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        MachineError::Board(Box::new(err))
    }
}

/// QEMU's `select_machine`/`find_machine`: the class for `-M name` (by name or alias), or the
/// default machine without `-M`.
pub fn find_machine(name: Option<&str>) -> Result<&'static ObjectClass, MachineError> {
    let machines = qom::object_class_get_list(Some(TYPE_MACHINE), false);
    let found = machines.iter().copied().find(|c| {
        let mc = machine_class(c).expect("machine classes have a MachineClass");
        match name {
            Some(n) => mc.name == n || mc.alias == Some(n),
            None => mc.is_default,
        }
    });
    found.ok_or_else(|| match name {
        Some(n) => MachineError::Unknown(n.to_string()),
        None => MachineError::NoDefault,
    })
}

/// QEMU's `machine_run_board_init`: checks `-smp` against the class, then builds the board.
pub fn machine_run_board_init(machine: &ObjectRef) -> Result<(), MachineError> {
    let mc = machine_class(machine.class()).expect("machines have a MachineClass");
    let ms = machine_state(machine).expect("machines have a MachineState");
    let smp = ms.smp();
    if smp.max_cpus > mc.max_cpus {
        return Err(MachineError::TooManyCpus {
            cpus: smp.max_cpus,
            machine: mc.name,
            max: mc.max_cpus,
        });
    }
    if smp.cpus < mc.min_cpus {
        return Err(MachineError::TooFewCpus {
            cpus: smp.cpus,
            machine: mc.name,
            min: mc.min_cpus,
        });
    }
    if ms.usb.get() && !mc.has_usb {
        return Err(MachineError::Unsupported(format!(
            "machine '{}' has no USB controller: use usb=off",
            mc.name
        )));
    }
    match machine_impl(machine) {
        Some(m) => m.init(),
        None => Ok(()),
    }
}

/// Resets every realized device under `root`, children before parents as QEMU's
/// `qdev_reset_all` walks buses.
fn reset_devices(root: &ObjectRef) {
    use crate::core::qdev::DeviceMethods;
    for (_, child) in root.children() {
        reset_devices(&child);
    }
    if root.is_realized() {
        root.reset();
    }
}

/// The machine part of QEMU's `qemu_system_reset`, run with the vCPUs paused: resets the
/// devices, lets the board reload what it loaded at start, and marks the vCPUs for reset
/// (they take their reset or loader state before they next run).
pub fn reset_machine(machine: &ObjectRef) -> Result<(), MachineError> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    // The interrupt controllers first (QEMU's are devices made before the others): the
    // devices' resets then set their lines on reset controllers.
    if let Some(ops) = ms.accel_ops() {
        if let Err(e) = ops.reset_irqchip() {
            qom::error_report!("system reset: {e}");
        }
    }
    reset_devices(machine);
    let result = match machine_impl(machine) {
        Some(m) => m.reset(),
        None => Ok(()),
    };
    if let Some(ops) = ms.accel_ops() {
        ops.reset_vcpus();
    }
    result
}

/// QEMU's `qdev_machine_creation_done`: runs the board's `machine_done` once every device
/// exists.
pub fn machine_creation_done(machine: &ObjectRef) -> Result<(), MachineError> {
    // The board's vCPUs set themselves up while its devices were made.
    if let Some(ms) = machine_state(machine) {
        ms.wait_cpus_created().map_err(MachineError::board)?;
    }
    match machine_impl(machine) {
        Some(m) => m.machine_done(),
        None => Ok(()),
    }
}
