//! Machines (QEMU's `hw/core/machine.c`): the abstract `machine` type, `MachineClass`, the
//! `-smp` topology, and the requests (shutdown, reset, debug exit) that end or restart a run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use qom::{type_init, Error, Object, ObjectClass, ObjectRef, Property};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::core::accel_ops::{AccelOpsRef, RamBlock};
use crate::core::memory::AddressSpace;
use crate::core::runstate::VmState;

/// When the process started, as `main` recorded it: boot-time figures are measured from it.
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// QEMU's `TYPE_MACHINE`.
pub const TYPE_MACHINE: &str = "machine";
/// Suffix of every machine type name (`pc-i440fx-9.2-machine`).
pub const TYPE_MACHINE_SUFFIX: &str = "-machine";

/// Board initialisation, QEMU's `MachineClass::init` (`pc_init1` for `pc`).
pub type MachineInitFn = fn(&ObjectRef) -> Result<(), Error>;

/// QEMU's `MachineClass`.
#[derive(Clone, Debug)]
pub struct MachineClass {
    /// The `-M` name: the type name without `-machine` (set by `machine`'s class_base_init).
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
    /// Builds the board.
    pub init: Option<MachineInitFn>,
    /// Board work once every `-device` is created, before the guest starts (QEMU's
    /// `machine_done` notifier: firmware-like set-up such as BAR assignment and ACPI).
    pub machine_done: Option<MachineInitFn>,
    /// Board work at each system reset after the devices reset (QEMU's
    /// `MachineClass::reset`; the pc board reloads a `-kernel` there).
    pub reset: Option<MachineInitFn>,
}

impl Default for MachineClass {
    fn default() -> Self {
        MachineClass {
            name: "",
            desc: "",
            alias: None,
            is_default: false,
            max_cpus: 1,
            min_cpus: 1,
            default_cpu_type: None,
            // QEMU's default RAM size.
            default_ram_size: 128 << 20,
            init: None,
            machine_done: None,
            reset: None,
        }
    }
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

/// Why a run ends or restarts (QEMU's `ShutdownCause`, plus `isa-debug-exit`'s status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunRequest {
    /// The guest powered off (ACPI S5, `poweroff`).
    GuestShutdown,
    /// The guest asked for a reset (keyboard controller, 0xcf9, triple fault).
    GuestReset,
    /// The guest reported a panic.
    GuestPanic,
    /// The host asked to quit (monitor `quit`, Ctrl-A x, a signal).
    HostQuit,
    /// `isa-debug-exit`: the process exits with this status.
    DebugExit(i32),
    /// The guest hit a fatal error (emulation failure, failed entry); status 1.
    GuestError,
    /// The monitor asked for a reset (`system_reset`).
    HostReset,
}

/// The mailbox of run requests: vCPU threads and devices post, the main loop waits.
#[derive(Default)]
pub struct RunState {
    pending: Mutex<Option<RunRequest>>,
    posted: Condvar,
}

impl RunState {
    /// Posts a request; a pending one that ends the run is not replaced by a later one.
    pub fn request(&self, request: RunRequest) {
        let mut pending = self.pending.lock();
        match *pending {
            Some(RunRequest::GuestReset | RunRequest::HostReset) | None => {
                *pending = Some(request)
            }
            Some(_) => {}
        }
        self.posted.notify_all();
    }

    /// Takes the pending request, if any.
    pub fn take(&self) -> Option<RunRequest> {
        self.pending.lock().take()
    }

    /// Waits up to `timeout` for a request and takes it.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<RunRequest> {
        let mut pending = self.pending.lock();
        if pending.is_none() {
            match timeout {
                Some(t) => {
                    self.posted.wait_for(&mut pending, t);
                }
                None => {
                    while pending.is_none() {
                        self.posted.wait(&mut pending);
                    }
                }
            }
        }
        pending.take()
    }
}

/// QEMU's `MachineState`: what every machine instance has.
pub struct MachineState {
    ram_size: AtomicU64,
    smp: Mutex<SmpConfig>,
    cpu_type: Mutex<Option<String>>,
    cpu_options: Mutex<String>,
    system_memory: Arc<AddressSpace>,
    system_io: Arc<AddressSpace>,
    accel: Mutex<Option<ObjectRef>>,
    accel_ops: Mutex<Option<AccelOpsRef>>,
    ram: Mutex<Arc<GuestMemoryMmap>>,
    cpus: Mutex<Vec<ObjectRef>>,
    serial_hds: Mutex<Vec<Option<Arc<dyn crate::char::chardev::CharBackend>>>>,
    run: RunState,
    vm: VmState,
    /// The machine object this state belongs to (set by `machine`'s instance_init).
    machine_object: Mutex<Option<qom::WeakObjectRef>>,
}

impl Default for MachineState {
    fn default() -> Self {
        MachineState {
            ram_size: AtomicU64::new(0),
            smp: Mutex::new(SmpConfig::default()),
            cpu_type: Mutex::new(None),
            cpu_options: Mutex::new(String::new()),
            system_memory: Arc::new(AddressSpace::new_memory()),
            system_io: Arc::new(AddressSpace::new_io()),
            accel: Mutex::new(None),
            accel_ops: Mutex::new(None),
            ram: Mutex::new(Arc::new(GuestMemoryMmap::default())),
            cpus: Mutex::new(Vec::new()),
            serial_hds: Mutex::new(Vec::new()),
            run: RunState::default(),
            machine_object: Mutex::new(None),
            vm: VmState::default(),
        }
    }
}

impl MachineState {
    /// Guest RAM in bytes (`-m`).
    pub fn ram_size(&self) -> u64 {
        self.ram_size.load(Ordering::Relaxed)
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
    /// QEMU's `get_system_memory()`.
    pub fn system_memory(&self) -> &Arc<AddressSpace> {
        &self.system_memory
    }
    /// QEMU's `get_system_io()`.
    pub fn system_io(&self) -> &Arc<AddressSpace> {
        &self.system_io
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
        self.accel_ops.lock().clone()
    }
    /// Installs the accelerator's operations (`accel_init_machine` does).
    pub fn set_accel_ops(&self, ops: AccelOpsRef) {
        *self.accel_ops.lock() = Some(ops);
    }
    /// Guest RAM, for loaders and devices that read or write guest memory.
    pub fn ram(&self) -> Arc<GuestMemoryMmap> {
        self.ram.lock().clone()
    }
    /// Allocates `size` bytes of guest RAM at `guest_addr` and maps it through the
    /// accelerator (QEMU's `memory_region_add_subregion` of a RAM region).
    pub fn add_ram(&self, guest_addr: u64, size: u64) -> Result<(), MachineError> {
        let ops = self.accel_ops().ok_or(MachineError::NoAccelerator)?;
        let len = usize::try_from(size).map_err(|_| MachineError::RamTooLarge(size))?;
        let region = GuestRegionMmap::from_range(GuestAddress(guest_addr), len, None)
            .map_err(|e| MachineError::RamAllocation(e.to_string()))?;
        let host_addr = region.as_ptr() as u64;
        {
            let mut ram = self.ram.lock();
            let next = ram
                .insert_region(Arc::new(region))
                .map_err(|e| MachineError::RamAllocation(e.to_string()))?;
            *ram = Arc::new(next);
        }
        ops.map_ram(RamBlock {
            guest_addr,
            size,
            host_addr,
        })?;
        Ok(())
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
    pub fn serial_hds(&self) -> Vec<Option<Arc<dyn crate::char::chardev::CharBackend>>> {
        self.serial_hds.lock().clone()
    }
    /// Sets the `-serial` backends, before board init.
    pub fn set_serial_hds(&self, hds: Vec<Option<Arc<dyn crate::char::chardev::CharBackend>>>) {
        *self.serial_hds.lock() = hds;
    }
    /// The machine object, if this state belongs to one.
    pub fn object(&self) -> Option<ObjectRef> {
        self.machine_object.lock().as_ref().and_then(|w| w.upgrade())
    }
    /// The run-request mailbox.
    pub fn run_state(&self) -> &RunState {
        &self.run
    }
    /// The run status, its event listeners and the power button (see `runstate`).
    pub fn vm_state(&self) -> &VmState {
        &self.vm
    }
}

/// The `MachineClass` of `class`, if it is a machine class.
pub fn machine_class(class: &ObjectClass) -> Option<&MachineClass> {
    class.get::<MachineClass>()
}

/// Mutable `MachineClass`, for `class_init` of machine types.
///
/// # Panics
/// If `class` is not a machine class: a programming error in a `type_init!` record.
pub fn machine_class_mut(class: &mut ObjectClass) -> &mut MachineClass {
    let name = class.name();
    class
        .get_mut::<MachineClass>()
        .unwrap_or_else(|| panic!("class_init of '{name}' expects a machine class"))
}

/// The machine part of a machine object.
pub fn machine_state(obj: &Object) -> Option<&MachineState> {
    obj.downcast::<MachineState>()
}

/// The machine `obj` belongs to: itself, or its nearest machine ancestor in the tree.
pub fn machine_of(obj: &Object) -> Option<ObjectRef> {
    let mut cur = obj.to_ref()?;
    loop {
        if cur.is_a(TYPE_MACHINE) {
            return Some(cur);
        }
        cur = cur.parent()?;
    }
}

/// Properties common to all machines (QEMU's `machine_class_init`).
const MACHINE_PROPERTIES: &[Property] = &[
    Property::string("kernel", None, "Linux kernel image file"),
    Property::string("initrd", None, "Linux initial ramdisk file"),
    Property::string("append", None, "Linux kernel command line"),
    Property::string("firmware", None, "Firmware image"),
    Property::bool("dump-guest-core", true, "Include guest memory in a core dump"),
    Property::bool("mem-merge", true, "Enable/disable memory merge support"),
    Property::bool("graphics", true, "Set on/off to enable/disable graphics emulation"),
    Property::bool("usb", false, "Set on/off to enable/disable usb"),
];

fn machine_class_init(class: &mut ObjectClass) {
    class.insert(MachineClass::default());
    for p in MACHINE_PROPERTIES {
        class.add_property(p.clone());
    }
}

/// Every machine type's `-M` name is its type name without `-machine` (QEMU does this in
/// `machine_class_base_init`).
fn machine_class_base_init(class: &mut ObjectClass) {
    let type_name = class.name();
    let name = type_name
        .strip_suffix(TYPE_MACHINE_SUFFIX)
        .unwrap_or(type_name);
    machine_class_mut(class).name = name;
}

fn machine_instance_init(obj: &Object) {
    // The containers every machine has (QEMU creates them in `qemu_create_machine`).
    let this = obj.to_ref().expect("an object in instance_init is alive");
    for name in ["unattached", "peripheral", "peripheral-anon"] {
        qom::container_get(&this, name);
    }
    if let Some(st) = machine_state(obj) {
        *st.machine_object.lock() = Some(obj.downgrade());
    }
    if let (Some(st), Some(mc)) = (machine_state(obj), machine_class(obj.class())) {
        st.set_ram_size(mc.default_ram_size);
        st.set_cpu_type(mc.default_cpu_type.map(str::to_string));
    }
}

type_init! {
    name: TYPE_MACHINE,
    parent: Some(qom::TYPE_OBJECT),
    abstract_: true,
    class_init: Some(machine_class_init),
    class_base_init: Some(machine_class_base_init),
    instance: Some(qom::InstanceSpec::of::<MachineState>()),
    instance_init: Some(machine_instance_init),
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
    /// RAM requested before an accelerator was initialised.
    #[error("no accelerator is initialised")]
    NoAccelerator,
    /// RAM larger than the host's address space.
    #[error("cannot set up guest memory: {0} bytes do not fit in the host's address space")]
    RamTooLarge(u64),
    /// The host refused the RAM mapping.
    #[error("cannot set up guest memory 'pc.ram': {0}")]
    RamAllocation(String),
    /// A QOM error during board init.
    #[error(transparent)]
    Qom(#[from] Error),
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
    if machine.prop_bool("usb")? {
        return Err(MachineError::Unsupported(format!(
            "machine '{}' has no USB controller: use usb=off",
            mc.name
        )));
    }
    if let Some(init) = mc.init {
        init(machine)?;
    }
    Ok(())
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
pub fn reset_machine(machine: &ObjectRef) -> Result<(), Error> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    reset_devices(machine);
    let result = match machine_class(machine.class()).and_then(|mc| mc.reset) {
        Some(reset) => reset(machine),
        None => Ok(()),
    };
    if let Some(ops) = ms.accel_ops() {
        ops.reset_vcpus();
    }
    result
}

/// QEMU's `qdev_machine_creation_done`: runs the board's `machine_done` once every device
/// exists.
pub fn machine_creation_done(machine: &ObjectRef) -> Result<(), Error> {
    match machine_class(machine.class()).and_then(|mc| mc.machine_done) {
        Some(done) => done(machine),
        None => Ok(()),
    }
}
