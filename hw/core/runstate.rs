//! The VM's run status and the actions that change it (QEMU's `system/runstate.c` and the
//! `vm_start`/`vm_stop` half of `system/cpus.c`).
//!
//! [`VmState`] (one per machine, in its `MachineServices`) holds the status `query-status`
//! reports, the listeners that turn status changes into QMP events, the machine's
//! power-down notifiers (the ACPI power button), the run-request mailbox devices post to,
//! and the accelerator that starts and stops the vCPUs. The functions here are the only code that
//! changes the status, so the monitor (`stop`, `cont`, `system_reset`, `system_powerdown`),
//! the main loop and tests all take the same path:
//!
//! * [`vm_stop`] pauses every vCPU through the accelerator and returns once all have left
//!   `KVM_RUN` and parked, then reports `STOP`;
//! * [`vm_start`] resumes them (or starts them the first time) and reports `RESUME`;
//! * [`qemu_system_reset`] resets the CPUs with the vCPUs paused and reports `RESET`;
//! * [`qemu_system_suspend`] and [`qemu_system_wakeup`] put the guest to sleep (ACPI S3)
//!   and wake it (the main loop runs them for [`RunRequest::Suspend`] and
//!   [`RunRequest::Wakeup`]; [`qemu_system_wakeup_request`] is how the RTC alarm, the
//!   power button and `system_wakeup` ask);
//! * [`main_loop_should_exit`] turns a [`RunRequest`] into events and an exit status, as
//!   the [`RunActions`] (`-action`, `-no-reboot`, `-no-shutdown`, `set-action`) say.
//!
//! Transitions are serialised by the status lock, which is held while the vCPUs pause, so
//! two monitors racing `stop` and `cont` leave a status that matches the vCPUs, and events
//! come out in the order the transitions happened.

use std::sync::Arc;

use parking_lot::Mutex;

use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Condvar;

use crate::core::accel_ops::AccelOpsRef;

/// Why a run ends or restarts (QEMU's `ShutdownCause`, plus `isa-debug-exit`'s status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunRequest {
    /// The guest powered off (ACPI S5, `poweroff`).
    GuestShutdown,
    /// The guest asked for a reset (keyboard controller, 0xcf9, triple fault).
    GuestReset,
    /// The guest reported a panic.
    GuestPanic,
    /// The host asked to quit (monitor `quit`, Ctrl-A x).
    HostQuit,
    /// `isa-debug-exit`: the process exits with this status.
    DebugExit(i32),
    /// The guest hit a fatal error (emulation failure, failed entry); status 1.
    GuestError,
    /// The monitor asked for a reset (`system_reset`).
    HostReset,
    /// A host signal (SIGTERM, SIGINT, SIGHUP) ends the run, whatever the actions say.
    HostSignal,
    /// The guest asked to sleep (ACPI S3: QEMU's `qemu_system_suspend_request`).
    Suspend,
    /// A wake-up was accepted while suspended ([`qemu_system_wakeup_request`]).
    Wakeup,
    /// A watchdog expired and its action is the main loop's to take (`shutdown`: the power
    /// button; `poweroff`: exit 0; `pause`: stop with status `watchdog`, QEMU's
    /// `qemu_system_vmstop_request`; `inject-nmi`).
    Watchdog(WatchdogAction),
}

impl RunRequest {
    /// The order the main loop takes pending requests in (QEMU's `main_loop_should_exit`
    /// checks suspend, shutdown, reset, wakeup in turn; a request that ends the run wins).
    fn rank(self) -> u8 {
        match self {
            RunRequest::DebugExit(_)
            | RunRequest::GuestError
            | RunRequest::HostQuit
            | RunRequest::HostSignal
            | RunRequest::GuestShutdown => 0,
            RunRequest::GuestPanic => 1,
            RunRequest::GuestReset | RunRequest::HostReset => 2,
            RunRequest::Suspend => 3,
            RunRequest::Wakeup => 4,
            // QEMU's main loop checks its power-down and vmstop requests last.
            RunRequest::Watchdog(_) => 5,
        }
    }
}

/// The mailbox of run requests: vCPU threads and devices post, the main loop waits.
#[derive(Default)]
pub struct RunState {
    pending: Mutex<Vec<RunRequest>>,
    posted: Condvar,
    /// Set from a reset request until the reset is done (or the main loop is otherwise
    /// finished with it): a vCPU whose I/O asked for it does not re-enter the guest
    /// meanwhile (QEMU's `exit_request`). Firmware follows its reset write with more
    /// reset attempts and finally `int3`, which must not run.
    ending: Arc<std::sync::atomic::AtomicBool>,
}

impl RunState {
    /// Posts a request. The same request twice is one; a request that ends the run drops
    /// pending resets (the run ends instead), and is itself never replaced.
    pub fn request(&self, request: RunRequest) {
        let mut pending = self.pending.lock();
        if request.rank() == 0 {
            pending.retain(|r| r.rank() != 2);
        }
        if !pending.contains(&request) {
            pending.push(request);
        }
        if request.rank() == 2 {
            self.ending.store(true, std::sync::atomic::Ordering::Release);
        }
        self.posted.notify_all();
    }

    /// The main loop is done with the requests it took (a reset happened, or the action
    /// was something else), so vCPUs waiting on [`RunState::ending_flag`] may go on.
    pub fn handled(&self) {
        let pending = self.pending.lock();
        if !pending.iter().any(|r| r.rank() == 2) {
            self.ending.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// The flag a vCPU thread checks after an exit: set while a reset is requested and
    /// not yet done.
    pub fn ending_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.ending.clone()
    }

    /// Takes the most pressing pending request, if any (the first posted among equals).
    pub fn take(&self) -> Option<RunRequest> {
        Self::take_locked(&mut self.pending.lock())
    }

    fn take_locked(pending: &mut Vec<RunRequest>) -> Option<RunRequest> {
        let index = (0..pending.len()).min_by_key(|&i| (pending[i].rank(), i))?;
        Some(pending.remove(index))
    }

    /// Waits up to `timeout` for a request and takes it.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<RunRequest> {
        let mut pending = self.pending.lock();
        if pending.is_empty() {
            match timeout {
                Some(t) => {
                    self.posted.wait_for(&mut pending, t);
                }
                None => {
                    while pending.is_empty() {
                        self.posted.wait(&mut pending);
                    }
                }
            }
        }
        Self::take_locked(&mut pending)
    }
}

/// QEMU's `RunState`, the part of it qomvm reaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunStatus {
    /// Built, vCPUs not started yet (`-S`, or after a reset of a stopped VM).
    #[default]
    Prelaunch,
    /// vCPUs run guest code.
    Running,
    /// Stopped by the monitor.
    Paused,
    /// The guest powered off and `-no-shutdown` kept qomvm alive.
    Shutdown,
    /// The accelerator reported an error the guest cannot continue from.
    InternalError,
    /// The guest reported a panic and was kept stopped.
    GuestPanicked,
    /// The guest sleeps in ACPI S3 until a wake-up.
    Suspended,
    /// A migration's destination, waiting for or loading the stream.
    InMigrate,
    /// A migration's source, stopped for the final copy.
    FinishMigrate,
    /// A migration's source after it completed (the guest now runs elsewhere).
    PostMigrate,
    /// Stopped by an expired watchdog (`watchdog=pause`); `cont` resumes it.
    Watchdog,
    /// Stopped while the monitor writes its memory out (`dump-guest-memory`).
    SaveVm,
}

impl RunStatus {
    /// The QAPI name (`query-status`'s `status`).
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Prelaunch => "prelaunch",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Shutdown => "shutdown",
            RunStatus::InternalError => "internal-error",
            RunStatus::GuestPanicked => "guest-panicked",
            RunStatus::Suspended => "suspended",
            RunStatus::InMigrate => "inmigrate",
            RunStatus::FinishMigrate => "finish-migrate",
            RunStatus::PostMigrate => "postmigrate",
            RunStatus::Watchdog => "watchdog",
            RunStatus::SaveVm => "save-vm",
        }
    }

    /// Whether `cont` must be refused until a reset (QEMU's `runstate_needs_reset`).
    pub fn needs_reset(self) -> bool {
        matches!(
            self,
            RunStatus::Shutdown | RunStatus::InternalError | RunStatus::GuestPanicked
        )
    }
}

/// Why a run ends or the machine resets (QEMU's `ShutdownCause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownCause {
    /// An error in the host (qomvm itself).
    HostError,
    /// The monitor's `quit`.
    HostQmpQuit,
    /// The monitor's `system_reset`.
    HostQmpSystemReset,
    /// A signal (SIGTERM, SIGINT).
    HostSignal,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself.
    GuestReset,
    /// The guest panicked.
    GuestPanic,
}

impl ShutdownCause {
    /// The QAPI name (the `reason` of `SHUTDOWN` and `RESET`).
    pub fn name(self) -> &'static str {
        match self {
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
        }
    }

    /// Whether the guest caused it (the `guest` member of the events).
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// What happened to the VM, for the monitor's events (QEMU's `STOP`, `RESUME`, `RESET`,
/// `SHUTDOWN`, `POWERDOWN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The vCPUs were stopped.
    Stop,
    /// The vCPUs were (re)started.
    Resume,
    /// The machine was reset.
    Reset(ShutdownCause),
    /// The run ends (or, with `-no-shutdown`, the guest powered off).
    Shutdown(ShutdownCause),
    /// The power button was pressed.
    Powerdown,
    /// The guest went to sleep (ACPI S3).
    Suspend,
    /// The guest woke up.
    Wakeup,
    /// The guest reported a panic (`GUEST_PANICKED`), and what is done about it.
    GuestPanicked(GuestPanicAction),
}

/// QAPI's `GuestPanicAction`: what `GUEST_PANICKED` says happens next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPanicAction {
    /// The VM is stopped (`panic=pause`, or `panic=shutdown` with `shutdown=pause`).
    Pause,
    /// The VM is powered off (`panic=shutdown`, `panic=exit-failure`).
    Poweroff,
    /// The guest keeps running (`panic=none`).
    Run,
}

impl GuestPanicAction {
    /// The QAPI name (the event's `action`).
    pub fn name(self) -> &'static str {
        match self {
            GuestPanicAction::Pause => "pause",
            GuestPanicAction::Poweroff => "poweroff",
            GuestPanicAction::Run => "run",
        }
    }
}

/// QEMU's `WakeupReason`: what woke the guest (each one enabled or not by the hardware,
/// QEMU's `qemu_system_wakeup_enable`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeupReason {
    /// The RTC alarm (enabled by PM1_EN.RTC_EN).
    Rtc,
    /// Anything else: `system_wakeup`, the power button (always enabled).
    Other,
}

impl WakeupReason {
    fn bit(self) -> u32 {
        match self {
            WakeupReason::Rtc => 1 << 1,
            WakeupReason::Other => 1 << 3,
        }
    }
}

/// Receives every [`VmEvent`]. Called with the status lock held, so that events keep the
/// order of the transitions: a listener must not call back into this module.
pub type EventListener = Arc<dyn Fn(&VmEvent) + Send + Sync>;

/// Presses the machine's power button (QEMU's powerdown notifier); the board's power
/// management device registers it.
pub type PowerdownNotifier = Arc<dyn Fn() + Send + Sync>;

/// Runs when the guest goes to sleep, before `SUSPEND` (QEMU's suspend notifiers: the RTC
/// leaves the firmware its S3 resume mark).
pub type SuspendNotifier = Arc<dyn Fn() + Send + Sync>;

/// Runs at wake-up, after the machine's reset and before the vCPUs run (QEMU's wakeup
/// notifiers: ACPI PM latches the wake status bits).
pub type WakeupNotifier = Arc<dyn Fn(WakeupReason) + Send + Sync>;

macro_rules! action_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in QAPI order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The QAPI name.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The value called `text`.
            pub fn parse(text: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.name() == text)
            }
        }
    };
}

action_enum! {
    /// QAPI's `RebootAction`: what a reset request does.
    RebootAction {
        /// Reset the machine.
        Reset = "reset",
        /// Turn it into a shutdown (`-no-reboot`).
        Shutdown = "shutdown",
    }
}

action_enum! {
    /// QAPI's `ShutdownAction`: what a shutdown does.
    ShutdownAction {
        /// End the run.
        Poweroff = "poweroff",
        /// Stop the vCPUs and keep the process for the monitor (`-no-shutdown`).
        Pause = "pause",
    }
}

action_enum! {
    /// QAPI's `PanicAction`: what a guest panic does.
    PanicAction {
        /// Stop the vCPUs (status `guest-panicked`).
        Pause = "pause",
        /// Shut down (exit status 0), or pause under `shutdown=pause`.
        Shutdown = "shutdown",
        /// Shut down with exit status 1.
        ExitFailure = "exit-failure",
        /// Only report it.
        None = "none",
    }
}

action_enum! {
    /// QAPI's `WatchdogAction`: what an expired watchdog does ([`watchdog_perform_action`]).
    WatchdogAction {
        /// Reset the machine.
        Reset = "reset",
        /// Shut the guest down through ACPI.
        Shutdown = "shutdown",
        /// Power it off.
        Poweroff = "poweroff",
        /// Stop the vCPUs.
        Pause = "pause",
        /// Enter the debugger.
        Debug = "debug",
        /// Nothing.
        None = "none",
        /// Inject an NMI.
        InjectNmi = "inject-nmi",
    }
}

/// QEMU's `system/runstate-action.c`: what resets, shutdowns, panics and watchdogs do.
/// `-no-reboot` is `reboot=shutdown`, `-no-shutdown` is `shutdown=pause`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunActions {
    /// `reboot=`.
    pub reboot: RebootAction,
    /// `shutdown=`.
    pub shutdown: ShutdownAction,
    /// `panic=`.
    pub panic: PanicAction,
    /// `watchdog=`.
    pub watchdog: WatchdogAction,
}

impl Default for RunActions {
    /// QEMU's defaults.
    fn default() -> Self {
        RunActions {
            reboot: RebootAction::Reset,
            shutdown: ShutdownAction::Poweroff,
            panic: PanicAction::Shutdown,
            watchdog: WatchdogAction::Reset,
        }
    }
}

/// Why `-action`/`set-action` text was refused, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// A key that is not an action.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A value the action does not have.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    InvalidValue {
        /// The action.
        name: String,
        /// The value given.
        value: String,
    },
}

impl RunActions {
    /// Sets action `name` (`reboot`, `shutdown`, `panic`, `watchdog`) to `value`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ActionError> {
        let bad = || ActionError::InvalidValue {
            name: name.to_string(),
            value: value.to_string(),
        };
        match name {
            "reboot" => self.reboot = RebootAction::parse(value).ok_or_else(bad)?,
            "shutdown" => self.shutdown = ShutdownAction::parse(value).ok_or_else(bad)?,
            "panic" => self.panic = PanicAction::parse(value).ok_or_else(bad)?,
            "watchdog" => self.watchdog = WatchdogAction::parse(value).ok_or_else(bad)?,
            _ => return Err(ActionError::InvalidParameter(name.to_string())),
        }
        Ok(())
    }
}

/// Errors of run-state changes, in QEMU's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunStateError {
    /// `cont` after a guest power-off, panic or internal error.
    #[error("Resetting the Virtual Machine is required")]
    NeedsReset,
    /// No accelerator was initialised, so no vCPU can be started or stopped.
    #[error("no accelerator is initialised")]
    NoAccelerator,
    /// A second accelerator for the same machine.
    #[error("the machine already has an accelerator")]
    AcceleratorSet,
    /// `system_powerdown` on a machine without a power button.
    #[error("machine has no ACPI power button: system_powerdown needs a machine with ACPI (e.g. pc)")]
    NoPowerButton,
    /// `system_wakeup` while the guest does not sleep.
    #[error("Unable to wake up: guest is not in suspended state")]
    NotSuspended,
    /// `system_wakeup` on a machine that cannot sleep (no ACPI PM).
    #[error("wake-up from suspend is not supported by this guest")]
    WakeupUnsupported,
}

/// Resets the machine's devices and CPUs (the machine registers it: QEMU's
/// `qemu_devices_reset` + `MachineClass::reset`).
pub type ResetHandler = Box<dyn Fn() + Send + Sync>;

/// Called when the vCPUs stop (`false`) or are about to run (`true`), with the status the
/// machine enters (QEMU's `VMChangeStateHandler`): devices that do I/O of their own go
/// quiet at a stop, so a paused or migrating VM writes no guest memory, and resume at a
/// start.
pub type ChangeHandler = Arc<dyn Fn(bool, RunStatus) + Send + Sync>;

/// Names a registered [`ChangeHandler`] for [`VmState::remove_change_handler`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeHandlerId(u64);

/// What wakes a suspended guest (QEMU's `wakeup_reason_mask`, `wakeup_reason`,
/// `wakeup_suspend_enabled`).
struct Wakeup {
    /// Enabled reasons ([`WakeupReason::bit`]).
    mask: u32,
    /// The accepted wake-up the main loop has yet to carry out.
    reason: Option<WakeupReason>,
    /// Whether the machine can sleep at all (ACPI PM registered it).
    supported: bool,
}

impl Default for Wakeup {
    fn default() -> Self {
        // QEMU starts with every reason enabled; ACPI PM disables the RTC's at reset until
        // the guest enables it.
        Wakeup {
            mask: u32::MAX,
            reason: None,
            supported: false,
        }
    }
}

/// A machine's run status, event listeners, power-down, suspend and wake-up notifiers,
/// run actions, run-request mailbox and the accelerator that starts and stops its vCPUs.
///
/// Lock order: `status` before `wakeup`, `actions` and the notifier lists; device locks may
/// be taken under `status` (reset, notifiers, change handlers), so a device never calls in
/// here holding its own lock except for [`VmState::request`] and
/// [`VmState::wakeup_enable`]. Change handlers run under `status` and may wait for I/O
/// threads: an I/O handler never takes `status`.
#[derive(Default)]
pub struct VmState {
    status: Mutex<RunStatus>,
    listeners: Mutex<Vec<EventListener>>,
    powerdown: Mutex<Vec<PowerdownNotifier>>,
    suspend: Mutex<Vec<SuspendNotifier>>,
    wakeup_notifiers: Mutex<Vec<WakeupNotifier>>,
    wakeup: Mutex<Wakeup>,
    actions: Mutex<RunActions>,
    requests: RunState,
    accel_ops: Arc<OnceLock<AccelOpsRef>>,
    reset: OnceLock<ResetHandler>,
    change_handlers: Mutex<ChangeHandlers>,
    /// QEMU's `QEMU_CLOCK_VIRTUAL`: runs while the VM runs.
    clock: Arc<crate::core::timer::VmClock>,
}

/// The run-state change handlers, ordered by priority (QEMU's `vm_change_state_head`).
#[derive(Default)]
struct ChangeHandlers {
    next_id: u64,
    /// `(priority, id, handler)`, sorted by priority, then registration.
    list: Vec<(i32, ChangeHandlerId, ChangeHandler)>,
}

impl AsRef<VmState> for VmState {
    fn as_ref(&self) -> &VmState {
        self
    }
}

impl VmState {
    /// The run-request mailbox: devices and vCPU threads post, the main loop waits.
    pub fn requests(&self) -> &RunState {
        &self.requests
    }

    /// Posts a run request (QEMU's `qemu_system_shutdown_request` and friends).
    pub fn request(&self, request: RunRequest) {
        self.requests.request(request);
    }

    /// The accelerator's operations, once an accelerator is initialised. Read without a
    /// lock: interrupt lines and vCPU control go through here.
    #[inline]
    pub fn accel_ops(&self) -> Option<&AccelOpsRef> {
        self.accel_ops.get()
    }

    /// Where the accelerator's operations are installed, shared: an interrupt line keeps it
    /// to reach the accelerator without holding the machine.
    pub fn accel_slot(&self) -> Arc<OnceLock<AccelOpsRef>> {
        self.accel_ops.clone()
    }

    /// Installs the accelerator's operations (`accel_init_machine` does, once).
    pub fn set_accel_ops(&self, ops: AccelOpsRef) -> Result<(), RunStateError> {
        self.accel_ops
            .set(ops)
            .map_err(|_| RunStateError::AcceleratorSet)
    }

    /// Installs the machine's reset (the machine does, when it is created).
    pub fn set_reset_handler(&self, reset: ResetHandler) {
        let _ = self.reset.set(reset);
    }

    /// The current status (`query-status`).
    pub fn status(&self) -> RunStatus {
        *self.status.lock()
    }

    /// QEMU's `runstate_set` for the migration states: sets `status` without touching the
    /// vCPUs (a destination waits in `inmigrate`, a source ends in `postmigrate`).
    pub fn set_migration_status(&self, status: RunStatus) {
        *self.status.lock() = status;
    }

    /// Whether the vCPUs are running (`query-status`'s `running`).
    pub fn is_running(&self) -> bool {
        self.status() == RunStatus::Running
    }

    /// Adds a listener for every later event.
    pub fn add_listener(&self, listener: EventListener) {
        self.listeners.lock().push(listener);
    }

    /// Registers the machine's power button (QEMU's `qemu_register_powerdown_notifier`).
    pub fn add_powerdown_notifier(&self, notifier: PowerdownNotifier) {
        self.powerdown.lock().push(notifier);
    }

    /// Whether anything listens to the power button.
    pub fn has_power_button(&self) -> bool {
        !self.powerdown.lock().is_empty()
    }

    /// Registers a suspend notifier (QEMU's `qemu_register_suspend_notifier`).
    pub fn add_suspend_notifier(&self, notifier: SuspendNotifier) {
        self.suspend.lock().push(notifier);
    }

    /// Registers a wake-up notifier (QEMU's `qemu_register_wakeup_notifier`).
    pub fn add_wakeup_notifier(&self, notifier: WakeupNotifier) {
        self.wakeup_notifiers.lock().push(notifier);
    }

    /// Says the machine can sleep and be woken (QEMU's `qemu_register_wakeup_support`).
    pub fn register_wakeup_support(&self) {
        self.wakeup.lock().supported = true;
    }

    /// Whether the machine can sleep and be woken (QEMU's `qemu_wakeup_suspend_enabled`):
    /// its ACPI power management registered it.
    pub fn wakeup_supported(&self) -> bool {
        self.wakeup.lock().supported
    }

    /// Enables or disables a wake-up reason (QEMU's `qemu_system_wakeup_enable`).
    pub fn wakeup_enable(&self, reason: WakeupReason, enabled: bool) {
        let mut w = self.wakeup.lock();
        if enabled {
            w.mask |= reason.bit();
        } else {
            w.mask &= !reason.bit();
        }
    }

    /// The run actions in force.
    pub fn actions(&self) -> RunActions {
        *self.actions.lock()
    }

    /// Changes the run actions (`-action`, `set-action`).
    pub fn set_actions(&self, actions: RunActions) {
        *self.actions.lock() = actions;
    }

    /// Registers a run-state change handler (QEMU's
    /// `qemu_add_vm_change_state_handler_prio`): at a stop, handlers run highest priority
    /// first; at a start, lowest first, so a device that depends on another (a disk flush
    /// after the disk's device went quiet) takes a lower priority.
    pub fn add_change_handler(&self, priority: i32, handler: ChangeHandler) -> ChangeHandlerId {
        let mut handlers = self.change_handlers.lock();
        let id = ChangeHandlerId(handlers.next_id);
        handlers.next_id += 1;
        let at = handlers.list.partition_point(|(p, _, _)| *p <= priority);
        handlers.list.insert(at, (priority, id, handler));
        id
    }

    /// Removes a change handler (a device that goes away).
    pub fn remove_change_handler(&self, id: ChangeHandlerId) {
        self.change_handlers.lock().list.retain(|(_, i, _)| *i != id);
    }

    /// The machine's virtual clock (QEMU's `QEMU_CLOCK_VIRTUAL`): nanoseconds that advance
    /// only while the VM runs, for guest-visible counters (the HPET, the PM timer). It
    /// starts or stops right before the change handlers run.
    pub fn clock(&self) -> &Arc<crate::core::timer::VmClock> {
        &self.clock
    }

    /// Runs the change handlers in QEMU's order for `running`, the clock changed first.
    fn run_change_handlers(&self, running: bool, status: RunStatus) {
        self.clock.set_running(running);
        let mut handlers: Vec<ChangeHandler> = self
            .change_handlers
            .lock()
            .list
            .iter()
            .map(|(_, _, h)| h.clone())
            .collect();
        if !running {
            handlers.reverse();
        }
        for h in handlers {
            h(running, status);
        }
    }

    fn emit(&self, event: VmEvent) {
        let listeners = self.listeners.lock().clone();
        for l in listeners {
            l(&event);
        }
    }
}

/// QEMU's `vm_stop`: if the vCPUs run, pauses them all (returning once each has left
/// `KVM_RUN` and parked), sets `status` and reports `STOP`. A VM that does not run is left
/// as it is, as QEMU does.
pub fn vm_stop(vm: &impl AsRef<VmState>, status: RunStatus) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let mut current = vm.status.lock();
    if *current != RunStatus::Running {
        return Ok(());
    }
    let ops = vm.accel_ops().ok_or(RunStateError::NoAccelerator)?;
    // A vCPU may be waiting for a throttled request (a guest's IDE reset drains its
    // transfers): it parks once the request went.
    let _lifted = block::lift_all_limits();
    ops.pause_all();
    vm.run_change_handlers(false, status);
    *current = status;
    vm.emit(VmEvent::Stop);
    Ok(())
}

/// QEMU's `qmp_cont` -> `vm_start`: starts the vCPUs the first time, or resumes them after a
/// stop, and reports `RESUME`. Refused after a guest power-off, panic or internal error
/// until a reset. Running already: nothing to do.
pub fn vm_start(vm: &impl AsRef<VmState>) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let mut current = vm.status.lock();
    match *current {
        // A sleeping guest is woken by a wake-up, not by `cont` (QEMU's `qmp_cont`).
        RunStatus::Running | RunStatus::Suspended => return Ok(()),
        s if s.needs_reset() => return Err(RunStateError::NeedsReset),
        _ => {}
    }
    let ops = vm.accel_ops().ok_or(RunStateError::NoAccelerator)?;
    // QEMU's vm_prepare_start: devices resume before the vCPUs do.
    vm.run_change_handlers(true, RunStatus::Running);
    if matches!(*current, RunStatus::Prelaunch | RunStatus::InMigrate) {
        ops.vm_start();
    } else {
        ops.resume_all();
    }
    *current = RunStatus::Running;
    vm.emit(VmEvent::Resume);
    Ok(())
}

/// QEMU's `qemu_system_reset` as the main loop runs it: reports `RESET`, resets the CPUs
/// with the vCPUs paused, then lets them run again if they ran; a VM that did not run is
/// left in `prelaunch`, to be started with `cont`.
pub fn qemu_system_reset(vm: &impl AsRef<VmState>, cause: ShutdownCause) {
    let vm = vm.as_ref();
    let mut current = vm.status.lock();
    let running = *current == RunStatus::Running;
    let ops = vm.accel_ops();
    // As in `vm_stop`: neither the pause nor the devices' resets wait out I/O limits.
    let lifted = block::lift_all_limits();
    if running {
        if let Some(ops) = &ops {
            ops.pause_all();
        }
    }
    // Devices, the board's reload (-kernel) and the vCPUs' state; a bare VmState (unit
    // tests) has no machine and nothing of that to reset.
    if let Some(reset) = vm.reset.get() {
        reset();
    }
    drop(lifted);
    vm.requests.handled();
    vm.emit(VmEvent::Reset(cause));
    if running {
        if let Some(ops) = &ops {
            ops.resume_all();
        }
    } else {
        *current = RunStatus::Prelaunch;
    }
}

/// QEMU's `qemu_system_powerdown`: presses the power button and reports `POWERDOWN`. A
/// machine without one (no ACPI, like `none`) refuses.
///
/// The power button is a wake source (ACPI's fixed power button event): pressed while the
/// guest sleeps, it also wakes it, with the wake status of [`WakeupReason::Other`] (which
/// ACPI PM reports as the power button). QEMU only latches the button there.
pub fn qemu_system_powerdown(vm: &impl AsRef<VmState>) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let status = vm.status.lock();
    let notifiers = vm.powerdown.lock().clone();
    if notifiers.is_empty() {
        return Err(RunStateError::NoPowerButton);
    }
    vm.emit(VmEvent::Powerdown);
    for n in notifiers {
        n();
    }
    if *status == RunStatus::Suspended {
        accept_wakeup(vm, WakeupReason::Other);
    }
    Ok(())
}

/// QEMU's `qemu_system_suspend`, run by the main loop for [`RunRequest::Suspend`]: stops
/// the vCPUs, runs the suspend notifiers, sets `suspended` and reports `SUSPEND` (no
/// `STOP`). A guest that sleeps already is left as it is.
pub fn qemu_system_suspend(vm: &impl AsRef<VmState>) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let mut current = vm.status.lock();
    match *current {
        RunStatus::Suspended => return Ok(()),
        RunStatus::Running => vm
            .accel_ops()
            .ok_or(RunStateError::NoAccelerator)?
            .pause_all(),
        _ => {}
    }
    let notifiers = vm.suspend.lock().clone();
    for n in notifiers {
        n();
    }
    *current = RunStatus::Suspended;
    vm.emit(VmEvent::Suspend);
    Ok(())
}

/// QEMU's `qemu_system_wakeup_request`: a wake-up from `reason` (the RTC alarm, the
/// monitor's `system_wakeup`). Refused unless the guest sleeps; ignored if the hardware
/// has `reason` disabled; otherwise the main loop wakes the guest ([`qemu_system_wakeup`]).
/// Callers must not hold a device lock a reset takes.
pub fn qemu_system_wakeup_request(
    vm: &impl AsRef<VmState>,
    reason: WakeupReason,
) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let status = vm.status.lock();
    if *status != RunStatus::Suspended {
        return Err(RunStateError::NotSuspended);
    }
    accept_wakeup(vm, reason);
    Ok(())
}

/// QEMU's `qmp_system_wakeup`.
pub fn qmp_system_wakeup(vm: &impl AsRef<VmState>) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    if !vm.wakeup.lock().supported {
        return Err(RunStateError::WakeupUnsupported);
    }
    qemu_system_wakeup_request(vm, WakeupReason::Other)
}

/// Records an enabled wake-up for the main loop; the status lock is held by the caller.
fn accept_wakeup(vm: &VmState, reason: WakeupReason) {
    let mut w = vm.wakeup.lock();
    if w.mask & reason.bit() == 0 || w.reason.is_some() {
        return;
    }
    w.reason = Some(reason);
    drop(w);
    vm.request(RunRequest::Wakeup);
}

/// QEMU's wake-up in `main_loop_should_exit`, for [`RunRequest::Wakeup`]: resets the
/// machine with the vCPUs still stopped (no `RESET` event: QEMU's cause is "none"; the
/// board takes its firmware's S3 resume path), runs the wake-up notifiers, lets the vCPUs
/// run and reports `WAKEUP`.
pub fn qemu_system_wakeup(vm: &impl AsRef<VmState>) {
    let vm = vm.as_ref();
    let mut current = vm.status.lock();
    let Some(reason) = vm.wakeup.lock().reason.take() else {
        return;
    };
    if *current != RunStatus::Suspended {
        return;
    }
    if let Some(reset) = vm.reset.get() {
        reset();
    }
    let notifiers = vm.wakeup_notifiers.lock().clone();
    for n in notifiers {
        n(reason);
    }
    if let Some(ops) = vm.accel_ops() {
        ops.resume_all();
    }
    *current = RunStatus::Running;
    vm.emit(VmEvent::Wakeup);
}

/// QEMU's `qemu_system_guest_panicked` as the main loop runs it for
/// [`RunRequest::GuestPanic`]: reports `GUEST_PANICKED` with what the panic action does,
/// stops the vCPUs (status `guest-panicked`, `STOP`) for a pause, and says whether a
/// shutdown (cause `guest-panic`) follows. As in QEMU 7.2, a powering-off panic reports no
/// `STOP`: the shutdown is handled first and ends the run (or, under `shutdown=pause`,
/// stops the vCPUs with status `shutdown`).
pub fn qemu_system_guest_panicked(vm: &impl AsRef<VmState>) -> bool {
    let vm = vm.as_ref();
    let actions = vm.actions();
    let action = match actions.panic {
        PanicAction::Pause => GuestPanicAction::Pause,
        PanicAction::Shutdown if actions.shutdown == ShutdownAction::Pause => {
            GuestPanicAction::Pause
        }
        PanicAction::Shutdown | PanicAction::ExitFailure => GuestPanicAction::Poweroff,
        PanicAction::None => GuestPanicAction::Run,
    };
    {
        let _transition = vm.status.lock();
        vm.emit(VmEvent::GuestPanicked(action));
    }
    if action == GuestPanicAction::Pause {
        // Fails only without an accelerator, and then nothing runs.
        let _ = vm_stop(vm, RunStatus::GuestPanicked);
    }
    action == GuestPanicAction::Poweroff
}

/// QEMU's `watchdog_perform_action`, for a watchdog device whose timer expired (on the
/// main loop's thread): reports `WATCHDOG` with the action (throttled to one a second, as
/// QEMU's), then requests the guest's reset, prints "watchdog: timer fired" (`debug`),
/// does nothing (`none`), or leaves the rest to the main loop ([`RunRequest::Watchdog`]):
/// a device's handler must not wait for the run state or the vCPUs.
pub fn watchdog_perform_action(vm: &impl AsRef<VmState>) {
    let vm = vm.as_ref();
    let action = vm.actions().watchdog;
    crate::core::qapi_event::emit(
        "WATCHDOG",
        Some(serde_json::json!({"action": action.name()})),
    );
    match action {
        WatchdogAction::Reset => vm.request(RunRequest::GuestReset),
        // QEMU writes it to stderr as it is, without its program prefix.
        WatchdogAction::Debug => eprintln!("watchdog: timer fired"),
        WatchdogAction::None => {}
        other => vm.request(RunRequest::Watchdog(other)),
    }
}

/// Reports `SHUTDOWN` with `cause` (the main loop does, as the run ends). The event also
/// goes to the log (target `runstate`, level info, with QMP's `reason` and `guest`), where a
/// test without a QMP client tells a guest power-off from a reset under `-no-reboot`, which
/// both exit 0 (`RUST_LOG=warn,runstate=info`; QEMU's trace point
/// `qemu_system_shutdown_request` is the counterpart).
pub fn report_shutdown(vm: &impl AsRef<VmState>, cause: ShutdownCause) {
    let vm = vm.as_ref();
    log::info!(
        target: "runstate",
        "SHUTDOWN reason={} guest={}",
        cause.name(),
        cause.is_guest()
    );
    let _transition = vm.status.lock();
    vm.emit(VmEvent::Shutdown(cause));
}

/// QEMU's shutdown in `main_loop_should_exit`: reports `SHUTDOWN` with `cause`, then ends
/// the run (status 1 for a panic under `panic=exit-failure`) or, under `shutdown=pause`,
/// stops the vCPUs and keeps the process for the monitor.
fn system_shutdown(vm: &VmState, cause: ShutdownCause) -> Option<i32> {
    report_shutdown(vm, cause);
    let actions = vm.actions();
    if actions.shutdown == ShutdownAction::Pause {
        // `cont` is refused until a reset.
        return match vm_stop(vm, RunStatus::Shutdown) {
            Ok(()) => None,
            Err(_) => Some(0),
        };
    }
    if cause == ShutdownCause::GuestPanic && actions.panic == PanicAction::ExitFailure {
        return Some(1);
    }
    Some(0)
}

/// QEMU's `main_loop_should_exit` for one request: reports the events, resets, stops,
/// suspends or wakes as the run actions say, and returns the exit status when the run must
/// end.
pub fn main_loop_should_exit(vm: &impl AsRef<VmState>, request: RunRequest) -> Option<i32> {
    let ms = vm.as_ref();
    let reset_cause = match request {
        // isa-debug-exit ends the process at once, as QEMU's exit() does: no event.
        RunRequest::DebugExit(status) => return Some(status),
        RunRequest::GuestError => {
            report_shutdown(ms, ShutdownCause::HostError);
            return Some(1);
        }
        RunRequest::HostQuit => {
            report_shutdown(ms, ShutdownCause::HostQmpQuit);
            return Some(0);
        }
        // QEMU's qemu_system_killed forces the power-off action: -no-shutdown keeps the
        // process for guest shutdowns only.
        RunRequest::HostSignal => {
            report_shutdown(ms, ShutdownCause::HostSignal);
            return Some(0);
        }
        RunRequest::GuestPanic => {
            if qemu_system_guest_panicked(ms) {
                return system_shutdown(ms, ShutdownCause::GuestPanic);
            }
            return None;
        }
        RunRequest::GuestShutdown => return system_shutdown(ms, ShutdownCause::GuestShutdown),
        RunRequest::Suspend => {
            if qemu_system_suspend(ms).is_err() {
                return Some(0);
            }
            return None;
        }
        RunRequest::Wakeup => {
            qemu_system_wakeup(ms);
            return None;
        }
        RunRequest::Watchdog(action) => {
            match action {
                // QEMU's watchdog presses the power button even without ACPI (the event is
                // all there is then).
                WatchdogAction::Shutdown => {
                    if qemu_system_powerdown(ms).is_err() {
                        let _transition = ms.status.lock();
                        ms.emit(VmEvent::Powerdown);
                    }
                }
                // QEMU's exit(0): no SHUTDOWN event.
                WatchdogAction::Poweroff => return Some(0),
                // Fails only without an accelerator, and then nothing runs.
                WatchdogAction::Pause => {
                    let _ = vm_stop(ms, RunStatus::Watchdog);
                }
                WatchdogAction::InjectNmi => match ms.accel_ops() {
                    Some(ops) => {
                        if let Err(e) = ops.inject_nmi() {
                            log::warn!("watchdog: {e}");
                        }
                    }
                    None => log::warn!("watchdog: no accelerator to send an NMI"),
                },
                // Taken where the watchdog fired.
                WatchdogAction::Reset | WatchdogAction::Debug | WatchdogAction::None => {}
            }
            return None;
        }
        RunRequest::GuestReset => ShutdownCause::GuestReset,
        RunRequest::HostReset => ShutdownCause::HostQmpSystemReset,
    };
    // QEMU's `qemu_system_reset_request`: `reboot=shutdown` makes it a shutdown.
    if ms.actions().reboot == RebootAction::Shutdown {
        return system_shutdown(ms, reset_cause);
    }
    qemu_system_reset(ms, reset_cause);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::accel_ops::{AccelOps, RamBlock};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts the accelerator calls.
    #[derive(Default)]
    struct CountingOps {
        started: AtomicU32,
        paused: AtomicU32,
        resumed: AtomicU32,
    }

    impl AccelOps for CountingOps {
        fn map_ram(&self, _: RamBlock) -> Result<(), qom::Error> {
            Ok(())
        }
        fn create_vcpu_thread(&self, _: &qom::ObjectRef) -> Result<(), qom::Error> {
            Ok(())
        }
        fn set_irq(&self, _: u32, _: bool) {}
        fn vm_start(&self) {
            self.started.fetch_add(1, Ordering::Relaxed);
        }
        fn pause_all(&self) {
            self.paused.fetch_add(1, Ordering::Relaxed);
        }
        fn resume_all(&self) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        fn reset_vcpus(&self) {}
        fn create_in_kernel_pit(&self, _: bool) -> Result<(), qom::Error> {
            Ok(())
        }
        fn shutdown(&self) {}
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    fn machine() -> (VmState, Arc<CountingOps>, Arc<Mutex<Vec<VmEvent>>>) {
        let ms = VmState::default();
        let ops = Arc::new(CountingOps::default());
        ms.set_accel_ops(ops.clone()).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        ms.add_listener(Arc::new(move |e: &VmEvent| sink.lock().push(*e)));
        (ms, ops, events)
    }

    #[test]
    fn stop_and_cont_change_the_status_once_and_report_it() {
        let (ms, ops, events) = machine();
        assert_eq!(ms.status(), RunStatus::Prelaunch);
        // stop before the start changes nothing, as in QEMU.
        vm_stop(&ms, RunStatus::Paused).unwrap();
        assert_eq!(ms.status(), RunStatus::Prelaunch);
        vm_start(&ms).unwrap();
        assert_eq!(ops.started.load(Ordering::Relaxed), 1);
        assert!(ms.is_running());
        vm_start(&ms).unwrap();
        vm_stop(&ms, RunStatus::Paused).unwrap();
        vm_stop(&ms, RunStatus::Paused).unwrap();
        assert_eq!(ms.status(), RunStatus::Paused);
        assert_eq!(ops.paused.load(Ordering::Relaxed), 1);
        vm_start(&ms).unwrap();
        assert_eq!(ops.resumed.load(Ordering::Relaxed), 1);
        assert_eq!(
            *events.lock(),
            vec![VmEvent::Resume, VmEvent::Stop, VmEvent::Resume]
        );
    }

    #[test]
    fn change_handlers_run_by_priority_at_stop_and_start_only() {
        let (ms, _, _) = machine();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handler = |name: &'static str| {
            let calls = calls.clone();
            Arc::new(move |running: bool, status: RunStatus| calls.lock().push((name, running, status)))
                as ChangeHandler
        };
        ms.add_change_handler(0, handler("flush"));
        let dev = ms.add_change_handler(10, handler("device"));
        ms.add_change_handler(10, handler("device2"));
        // A stop before the start runs nothing.
        vm_stop(&ms, RunStatus::Paused).unwrap();
        assert!(calls.lock().is_empty());
        vm_start(&ms).unwrap();
        vm_stop(&ms, RunStatus::FinishMigrate).unwrap();
        use RunStatus::{FinishMigrate, Running};
        assert_eq!(
            std::mem::take(&mut *calls.lock()),
            vec![
                ("flush", true, Running),
                ("device", true, Running),
                ("device2", true, Running),
                ("device2", false, FinishMigrate),
                ("device", false, FinishMigrate),
                ("flush", false, FinishMigrate),
            ]
        );
        ms.remove_change_handler(dev);
        vm_start(&ms).unwrap();
        vm_start(&ms).unwrap();
        assert_eq!(
            *calls.lock(),
            vec![("flush", true, Running), ("device2", true, Running)]
        );
    }

    #[test]
    fn a_host_signal_ends_the_run_even_under_no_shutdown() {
        let (ms, _, events) = machine();
        vm_start(&ms).unwrap();
        let mut actions = RunActions::default();
        actions.set("shutdown", "pause").unwrap();
        actions.set("reboot", "shutdown").unwrap();
        ms.set_actions(actions);
        assert_eq!(main_loop_should_exit(&ms, RunRequest::HostSignal), Some(0));
        assert_eq!(
            events.lock().last(),
            Some(&VmEvent::Shutdown(ShutdownCause::HostSignal))
        );
    }

    #[test]
    fn a_powered_off_guest_needs_a_reset_before_cont() {
        let (ms, _, events) = machine();
        vm_start(&ms).unwrap();
        let mut actions = RunActions::default();
        actions.set("shutdown", "pause").unwrap();
        ms.set_actions(actions);
        assert_eq!(main_loop_should_exit(&ms, RunRequest::GuestShutdown), None);
        assert_eq!(ms.status(), RunStatus::Shutdown);
        assert_eq!(vm_start(&ms), Err(RunStateError::NeedsReset));
        assert_eq!(main_loop_should_exit(&ms, RunRequest::HostReset), None);
        assert_eq!(ms.status(), RunStatus::Prelaunch);
        vm_start(&ms).unwrap();
        assert_eq!(
            *events.lock(),
            vec![
                VmEvent::Resume,
                VmEvent::Shutdown(ShutdownCause::GuestShutdown),
                VmEvent::Stop,
                VmEvent::Reset(ShutdownCause::HostQmpSystemReset),
                VmEvent::Resume,
            ]
        );
    }

    #[test]
    fn requests_end_the_run_with_qemus_causes() {
        let (ms, _, events) = machine();
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::DebugExit(7)),
            Some(7)
        );
        assert_eq!(main_loop_should_exit(&ms, RunRequest::HostQuit), Some(0));
        assert_eq!(main_loop_should_exit(&ms, RunRequest::GuestReset), None);
        let mut no_reboot = RunActions::default();
        no_reboot.set("reboot", "shutdown").unwrap();
        ms.set_actions(no_reboot);
        assert_eq!(main_loop_should_exit(&ms, RunRequest::HostReset), Some(0));
        assert_eq!(
            *events.lock(),
            vec![
                VmEvent::Shutdown(ShutdownCause::HostQmpQuit),
                VmEvent::Reset(ShutdownCause::GuestReset),
                VmEvent::Shutdown(ShutdownCause::HostQmpSystemReset),
            ]
        );
        assert!(ShutdownCause::GuestReset.is_guest());
        assert!(!ShutdownCause::HostQmpQuit.is_guest());
    }

    #[test]
    fn powerdown_needs_a_power_button() {
        let (ms, _, events) = machine();
        assert_eq!(
            qemu_system_powerdown(&ms),
            Err(RunStateError::NoPowerButton)
        );
        let pressed = Arc::new(AtomicU32::new(0));
        let p = pressed.clone();
        ms
            .add_powerdown_notifier(Arc::new(move || {
                p.fetch_add(1, Ordering::Relaxed);
            }));
        qemu_system_powerdown(&ms).unwrap();
        assert_eq!(pressed.load(Ordering::Relaxed), 1);
        assert_eq!(*events.lock(), vec![VmEvent::Powerdown]);
    }

    #[test]
    fn requests_are_taken_by_priority_and_an_ending_one_drops_resets() {
        let rs = RunState::default();
        rs.request(RunRequest::Wakeup);
        rs.request(RunRequest::GuestReset);
        rs.request(RunRequest::Suspend);
        rs.request(RunRequest::Suspend);
        assert_eq!(rs.take(), Some(RunRequest::GuestReset));
        rs.request(RunRequest::HostReset);
        rs.request(RunRequest::GuestShutdown);
        rs.request(RunRequest::HostQuit);
        assert_eq!(rs.take(), Some(RunRequest::GuestShutdown));
        assert_eq!(rs.take(), Some(RunRequest::HostQuit));
        assert_eq!(rs.take(), Some(RunRequest::Suspend));
        assert_eq!(rs.take(), Some(RunRequest::Wakeup));
        assert_eq!(rs.take(), None);
    }

    #[test]
    fn actions_parse_with_qemus_words() {
        let mut a = RunActions::default();
        assert_eq!(a.panic, PanicAction::Shutdown);
        a.set("panic", "exit-failure").unwrap();
        a.set("watchdog", "inject-nmi").unwrap();
        assert_eq!(a.panic, PanicAction::ExitFailure);
        assert_eq!(a.watchdog, WatchdogAction::InjectNmi);
        assert_eq!(
            a.set("panic", "foo").unwrap_err().to_string(),
            "Parameter 'panic' does not accept value 'foo'"
        );
        assert_eq!(
            a.set("foo", "bar").unwrap_err().to_string(),
            "Invalid parameter 'foo'"
        );
    }

    #[test]
    fn suspend_then_an_enabled_wakeup_resets_and_resumes() {
        let (ms, ops, events) = machine();
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        ms.set_reset_handler(Box::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
        }));
        let marks = Arc::new(Mutex::new(Vec::new()));
        let m = marks.clone();
        ms.add_suspend_notifier(Arc::new(move || m.lock().push("suspend")));
        let m = marks.clone();
        ms.add_wakeup_notifier(Arc::new(move |reason| {
            assert_eq!(reason, WakeupReason::Rtc);
            m.lock().push("wakeup");
        }));
        assert_eq!(qmp_system_wakeup(&ms), Err(RunStateError::WakeupUnsupported));
        ms.register_wakeup_support();
        assert_eq!(qmp_system_wakeup(&ms), Err(RunStateError::NotSuspended));
        vm_start(&ms).unwrap();
        assert_eq!(main_loop_should_exit(&ms, RunRequest::Suspend), None);
        assert_eq!(ms.status(), RunStatus::Suspended);
        assert_eq!(ops.paused.load(Ordering::Relaxed), 1);
        // stop and cont leave a sleeping guest alone.
        vm_stop(&ms, RunStatus::Paused).unwrap();
        vm_start(&ms).unwrap();
        assert_eq!(ms.status(), RunStatus::Suspended);
        // A disabled reason is ignored.
        ms.wakeup_enable(WakeupReason::Rtc, false);
        qemu_system_wakeup_request(&ms, WakeupReason::Rtc).unwrap();
        assert_eq!(ms.requests().take(), None);
        ms.wakeup_enable(WakeupReason::Rtc, true);
        qemu_system_wakeup_request(&ms, WakeupReason::Rtc).unwrap();
        let request = ms.requests().take();
        assert_eq!(request, Some(RunRequest::Wakeup));
        assert_eq!(main_loop_should_exit(&ms, RunRequest::Wakeup), None);
        assert_eq!(ms.status(), RunStatus::Running);
        assert_eq!(resets.load(Ordering::Relaxed), 1);
        assert_eq!(ops.resumed.load(Ordering::Relaxed), 1);
        assert_eq!(*marks.lock(), vec!["suspend", "wakeup"]);
        assert_eq!(
            *events.lock(),
            vec![VmEvent::Resume, VmEvent::Suspend, VmEvent::Wakeup]
        );
    }

    #[test]
    fn the_power_button_wakes_a_sleeping_guest() {
        let (ms, _, events) = machine();
        ms.add_powerdown_notifier(Arc::new(|| {}));
        vm_start(&ms).unwrap();
        main_loop_should_exit(&ms, RunRequest::Suspend);
        qemu_system_powerdown(&ms).unwrap();
        assert_eq!(ms.requests().take(), Some(RunRequest::Wakeup));
        main_loop_should_exit(&ms, RunRequest::Wakeup);
        assert_eq!(ms.status(), RunStatus::Running);
        assert_eq!(
            *events.lock(),
            vec![
                VmEvent::Resume,
                VmEvent::Suspend,
                VmEvent::Powerdown,
                VmEvent::Wakeup
            ]
        );
    }

    #[test]
    fn each_panic_action_reports_and_acts_as_qemu() {
        /// `panic=`, `shutdown=`, the exit status, the status after, the events.
        type Case<'a> = (&'a str, &'a str, Option<i32>, RunStatus, &'a [VmEvent]);
        let cases: &[Case] = &[
            (
                "pause",
                "poweroff",
                None,
                RunStatus::GuestPanicked,
                &[VmEvent::GuestPanicked(GuestPanicAction::Pause), VmEvent::Stop],
            ),
            // QEMU 7.2: no STOP before the SHUTDOWN that ends the run.
            (
                "shutdown",
                "poweroff",
                Some(0),
                RunStatus::Running,
                &[
                    VmEvent::GuestPanicked(GuestPanicAction::Poweroff),
                    VmEvent::Shutdown(ShutdownCause::GuestPanic),
                ],
            ),
            (
                "exit-failure",
                "poweroff",
                Some(1),
                RunStatus::Running,
                &[
                    VmEvent::GuestPanicked(GuestPanicAction::Poweroff),
                    VmEvent::Shutdown(ShutdownCause::GuestPanic),
                ],
            ),
            // exit-failure under -no-shutdown: the shutdown pauses.
            (
                "exit-failure",
                "pause",
                None,
                RunStatus::Shutdown,
                &[
                    VmEvent::GuestPanicked(GuestPanicAction::Poweroff),
                    VmEvent::Shutdown(ShutdownCause::GuestPanic),
                    VmEvent::Stop,
                ],
            ),
            (
                "none",
                "poweroff",
                None,
                RunStatus::Running,
                &[VmEvent::GuestPanicked(GuestPanicAction::Run)],
            ),
            // -no-shutdown turns the default panic=shutdown into a pause.
            (
                "shutdown",
                "pause",
                None,
                RunStatus::GuestPanicked,
                &[VmEvent::GuestPanicked(GuestPanicAction::Pause), VmEvent::Stop],
            ),
        ];
        for (panic, shutdown, exit, status, expected) in cases {
            let (ms, _, events) = machine();
            let mut actions = RunActions::default();
            actions.set("panic", panic).unwrap();
            actions.set("shutdown", shutdown).unwrap();
            ms.set_actions(actions);
            vm_start(&ms).unwrap();
            events.lock().clear();
            assert_eq!(
                main_loop_should_exit(&ms, RunRequest::GuestPanic),
                *exit,
                "panic={panic}"
            );
            assert_eq!(ms.status(), *status, "panic={panic}");
            assert_eq!(&*events.lock(), expected, "panic={panic}");
        }
    }
}
