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
//! * [`main_loop_should_exit`] turns a [`RunRequest`] into events and an exit status.
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
}

/// Receives every [`VmEvent`]. Called with the status lock held, so that events keep the
/// order of the transitions: a listener must not call back into this module.
pub type EventListener = Arc<dyn Fn(&VmEvent) + Send + Sync>;

/// Presses the machine's power button (QEMU's powerdown notifier); the board's power
/// management device registers it.
pub type PowerdownNotifier = Arc<dyn Fn() + Send + Sync>;

/// What the start-up options say about the end of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunPolicy {
    /// `-no-reboot`: a reset ends the run.
    pub no_reboot: bool,
    /// `-no-shutdown`: a guest power-off stops the vCPUs instead of ending the run.
    pub no_shutdown: bool,
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
}

/// Resets the machine's devices and CPUs (the machine registers it: QEMU's
/// `qemu_devices_reset` + `MachineClass::reset`).
pub type ResetHandler = Box<dyn Fn() + Send + Sync>;

/// A machine's run status, event listeners, power-down notifiers, run-request mailbox and
/// the accelerator that starts and stops its vCPUs.
#[derive(Default)]
pub struct VmState {
    status: Mutex<RunStatus>,
    listeners: Mutex<Vec<EventListener>>,
    powerdown: Mutex<Vec<PowerdownNotifier>>,
    requests: RunState,
    accel_ops: Arc<OnceLock<AccelOpsRef>>,
    reset: OnceLock<ResetHandler>,
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
    ops.pause_all();
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
        RunStatus::Running => return Ok(()),
        s if s.needs_reset() => return Err(RunStateError::NeedsReset),
        _ => {}
    }
    let ops = vm.accel_ops().ok_or(RunStateError::NoAccelerator)?;
    if *current == RunStatus::Prelaunch {
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
pub fn qemu_system_powerdown(vm: &impl AsRef<VmState>) -> Result<(), RunStateError> {
    let vm = vm.as_ref();
    let _transition = vm.status.lock();
    let notifiers = vm.powerdown.lock().clone();
    if notifiers.is_empty() {
        return Err(RunStateError::NoPowerButton);
    }
    vm.emit(VmEvent::Powerdown);
    for n in notifiers {
        n();
    }
    Ok(())
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

/// QEMU's `main_loop_should_exit` for one request: reports the events, resets or stops as
/// the policy says, and returns the exit status when the run must end.
pub fn main_loop_should_exit(
    vm: &impl AsRef<VmState>,
    request: RunRequest,
    policy: RunPolicy,
) -> Option<i32> {
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
        RunRequest::GuestPanic => {
            report_shutdown(ms, ShutdownCause::GuestPanic);
            return Some(0);
        }
        RunRequest::GuestShutdown => {
            report_shutdown(ms, ShutdownCause::GuestShutdown);
            if policy.no_shutdown {
                // Keep the process for the monitor; the vCPUs stop, `cont` is refused until
                // a reset.
                if vm_stop(ms, RunStatus::Shutdown).is_err() {
                    return Some(0);
                }
                return None;
            }
            return Some(0);
        }
        RunRequest::GuestReset => ShutdownCause::GuestReset,
        RunRequest::HostReset => ShutdownCause::HostQmpSystemReset,
    };
    if policy.no_reboot {
        report_shutdown(ms, reset_cause);
        return Some(0);
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
        fn set_pit_reinject(&self, _: bool) -> Result<(), qom::Error> {
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
    fn a_powered_off_guest_needs_a_reset_before_cont() {
        let (ms, _, events) = machine();
        vm_start(&ms).unwrap();
        let policy = RunPolicy {
            no_reboot: false,
            no_shutdown: true,
        };
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::GuestShutdown, policy),
            None
        );
        assert_eq!(ms.status(), RunStatus::Shutdown);
        assert_eq!(vm_start(&ms), Err(RunStateError::NeedsReset));
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::HostReset, policy),
            None
        );
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
        let policy = RunPolicy::default();
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::DebugExit(7), policy),
            Some(7)
        );
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::HostQuit, policy),
            Some(0)
        );
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::GuestReset, policy),
            None
        );
        let no_reboot = RunPolicy {
            no_reboot: true,
            no_shutdown: false,
        };
        assert_eq!(
            main_loop_should_exit(&ms, RunRequest::HostReset, no_reboot),
            Some(0)
        );
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
}
