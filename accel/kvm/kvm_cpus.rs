//! vCPU threads (QEMU's `accel/kvm/kvm-accel-ops.c` and `kvm_cpu_exec`): one thread per CPU,
//! named `CPU n/KVM`, that creates its vCPU, reports created, waits for `vm_start`, then runs
//! the `KVM_RUN` loop, dispatching port and MMIO exits through the machine's address spaces.
//!
//! The hot path takes no lock shared between vCPUs: the address spaces are read through
//! their atomically swapped flat views. Pause and stop kick a vCPU out of `KVM_RUN` with a
//! signal whose handler sets `immediate_exit`, so a kick is never lost, even one that lands
//! just before the vCPU enters the kernel.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use hw::core::machine::machine_state;
use hw::core::memory::Dispatcher;
use hw::core::runstate::RunRequest;
use hw::i386::x86_cpu::X86Cpu;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};
use qom::ObjectRef;

use crate::kvm::kvm_all::{errno_text, ioctl_error, KvmError, KvmVm};
use crate::kvm::kvm_coalesced::CoalescedRing;
use crate::kvm::x86;

/// What the vCPUs are allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Mode {
    /// Created, waiting for `vm_start`.
    #[default]
    Created,
    Running,
    Paused,
    Stopping,
}

/// Work for one vCPU's thread (QEMU's `run_on_cpu`): it runs between two `KVM_RUN`s.
type Work = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct SetState {
    mode: Mode,
    /// Bumped by each system reset; a vCPU that has not seen the current one resets itself
    /// before it runs. It starts at 1 so the first run goes through the reset path too.
    reset_gen: u64,
    /// vCPUs that have reset themselves for `reset_gen`: none runs the guest again until
    /// all have (see [`VcpuSet::reset_finished`]).
    resets_done: usize,
    /// Threads waiting outside `KVM_RUN` (in Created or Paused mode).
    parked: usize,
    /// Threads alive.
    alive: usize,
    /// Queued work: (id, CPU index, work).
    work: Vec<(u64, u32, Work)>,
}

struct VcpuThread {
    index: u32,
    pthread: libc::pthread_t,
    handle: Option<JoinHandle<()>>,
}

impl Default for SetState {
    fn default() -> Self {
        SetState {
            mode: Mode::Created,
            reset_gen: 1,
            resets_done: 0,
            parked: 0,
            alive: 0,
            work: Vec::new(),
        }
    }
}

/// What a vCPU thread does after waiting.
enum Wake {
    Run,
    /// Reset the vCPU's state, then run.
    Reset,
    Stop,
}

/// The vCPU threads of one VM and the mode they run in (QEMU's `all_vcpus_paused` and
/// friends, with condition variables instead of polling).
///
/// Two condition variables, so that a vCPU parking wakes only the one waiting for all to
/// park: with one, every parked vCPU woke at each other's parking and parked again,
/// waking the rest, and waiting vCPUs took a CPU between them (70% of a host CPU with
/// `-S -smp 2`; at start-up the storm slowed the creation of every further vCPU).
#[derive(Default)]
pub struct VcpuSet {
    /// `true` while the mode is Running: the vCPUs' per-exit check, a single atomic load,
    /// so the hot path shares no lock.
    running: AtomicBool,
    state: Mutex<SetState>,
    /// What the vCPU threads wait for: a mode change, queued work, the last vCPU of a
    /// reset pass, a thread ending.
    wake: Condvar,
    /// What [`VcpuSet::pause`] waits for: a vCPU parking, a thread ending, a mode change.
    parked_changed: Condvar,
    threads: Mutex<Vec<VcpuThread>>,
    next_work: AtomicU64,
}

impl VcpuSet {
    fn set_mode(&self, mode: Mode) {
        let mut st = self.state.lock();
        if st.mode == Mode::Stopping {
            return;
        }
        st.mode = mode;
        self.running.store(mode == Mode::Running, Ordering::Release);
        self.wake.notify_all();
        self.parked_changed.notify_all();
    }

    pub(crate) fn start(&self) {
        self.set_mode(Mode::Running);
    }

    pub(crate) fn resume(&self) {
        self.set_mode(Mode::Running);
    }

    /// Kicks every vCPU out of `KVM_RUN` and waits until all are parked.
    pub(crate) fn pause(&self) {
        self.set_mode(Mode::Paused);
        self.kick_all();
        let mut st = self.state.lock();
        while st.mode == Mode::Paused && st.parked < st.alive {
            self.parked_changed.wait(&mut st);
        }
    }

    /// Ends every vCPU thread and joins them.
    pub(crate) fn stop(&self) {
        {
            let mut st = self.state.lock();
            st.mode = Mode::Stopping;
            self.running.store(false, Ordering::Release);
            self.wake.notify_all();
            self.parked_changed.notify_all();
        }
        self.kick_all();
        let handles: Vec<_> = self
            .threads
            .lock()
            .iter_mut()
            .filter_map(|t| t.handle.take())
            .collect();
        for h in handles {
            let _ = h.join();
        }
    }

    /// QEMU's `run_on_cpu`: runs `f` on CPU `index`'s thread between two runs (kicking it
    /// out of `KVM_RUN` if it is in there) and waits up to `timeout` for its result.
    pub(crate) fn run_on_cpu<R: Send + 'static>(
        &self,
        index: u32,
        timeout: Duration,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        let id = self.next_work.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.state.lock();
            if st.mode == Mode::Stopping {
                return None;
            }
            let work: Work = Box::new(move |vcpu: &mut VcpuFd| {
                let _ = tx.send(f(vcpu));
            });
            st.work.push((id, index, work));
            self.wake.notify_all();
        }
        self.kick(|t| t.index == index);
        let result = rx.recv_timeout(timeout).ok();
        if result.is_none() {
            // The thread ended or is stuck: drop the work rather than let it pile up.
            self.state.lock().work.retain(|(w, _, _)| *w != id);
        }
        result
    }

    /// [`VcpuSet::run_on_cpu`] on every CPU that has a thread: all queued and kicked at
    /// once, then up to `timeout` in all for the results, by CPU index (`None`: no answer).
    pub(crate) fn run_on_all_cpus<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl Fn(&mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Vec<(u32, Option<R>)> {
        let indexes: Vec<u32> = self
            .threads
            .lock()
            .iter()
            .filter(|t| t.handle.as_ref().is_some_and(|h| !h.is_finished()))
            .map(|t| t.index)
            .collect();
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        let mut ids = Vec::new();
        {
            let mut st = self.state.lock();
            if st.mode == Mode::Stopping {
                return indexes.into_iter().map(|i| (i, None)).collect();
            }
            for &index in &indexes {
                let id = self.next_work.fetch_add(1, Ordering::Relaxed);
                let (tx, f) = (tx.clone(), f.clone());
                let work: Work = Box::new(move |vcpu: &mut VcpuFd| {
                    let _ = tx.send((index, f(vcpu)));
                });
                st.work.push((id, index, work));
                ids.push(id);
            }
            self.wake.notify_all();
        }
        drop(tx);
        self.kick(|t| indexes.contains(&t.index));
        let deadline = std::time::Instant::now() + timeout;
        let mut results = std::collections::BTreeMap::new();
        while results.len() < indexes.len() {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok((index, r)) => {
                    results.insert(index, r);
                }
                Err(_) => break,
            }
        }
        if results.len() < indexes.len() {
            // Threads that ended or are stuck: drop their work rather than let it pile up.
            self.state.lock().work.retain(|(w, _, _)| !ids.contains(w));
        }
        indexes
            .into_iter()
            .map(|i| (i, results.remove(&i)))
            .collect()
    }

    /// Whether CPU `index` has a thread that has not ended.
    pub(crate) fn has_thread(&self, index: u32) -> bool {
        self.threads
            .lock()
            .iter()
            .any(|t| t.index == index && t.handle.as_ref().is_some_and(|h| !h.is_finished()))
    }

    /// Runs the work queued for CPU `index`, on its own thread.
    fn run_work(&self, index: u32, vcpu: &mut VcpuFd) {
        let mut st = self.state.lock();
        self.run_work_locked(&mut st, index, vcpu);
    }

    fn run_work_locked(
        &self,
        st: &mut parking_lot::MutexGuard<'_, SetState>,
        index: u32,
        vcpu: &mut VcpuFd,
    ) {
        while let Some(pos) = st.work.iter().position(|(_, i, _)| *i == index) {
            let (_, _, work) = st.work.remove(pos);
            parking_lot::MutexGuard::unlocked(st, || work(vcpu));
        }
    }

    pub(crate) fn kick_all(&self) {
        self.kick(|_| true);
    }

    fn kick(&self, which: impl Fn(&VcpuThread) -> bool) {
        for t in self.threads.lock().iter().filter(|t| which(t)) {
            if t.handle.as_ref().is_some_and(|h| !h.is_finished()) {
                // SAFETY: the pthread id belongs to a thread that has not been joined (its
                // handle is still held), so it is valid; the signal's handler only sets a
                // flag in that thread's own kvm_run.
                unsafe {
                    libc::pthread_kill(t.pthread, kick_signal());
                }
            }
        }
    }

    /// Marks every vCPU for reset; they reset when they next run. Call while paused.
    pub(crate) fn reset(&self) {
        let mut st = self.state.lock();
        st.reset_gen += 1;
        st.resets_done = 0;
    }

    /// Called by a vCPU thread once its vCPU is reset for `gen`; with `wait`, returns when
    /// every vCPU is (or the mode changed). QEMU resets all CPUs before any runs again: an
    /// AP reset after the BSP already sent it INIT/SIPI would lose them, and the guest
    /// would wait for a CPU that never comes.
    fn reset_finished(&self, index: u32, vcpu: &mut VcpuFd, gen: u64, wait: bool) {
        let mut st = self.state.lock();
        if st.reset_gen != gen {
            return;
        }
        st.resets_done += 1;
        if st.resets_done >= st.alive {
            self.wake.notify_all();
        }
        while wait && st.reset_gen == gen && st.mode == Mode::Running && st.resets_done < st.alive {
            self.run_work_locked(&mut st, index, vcpu);
            self.wake.wait(&mut st);
        }
    }

    /// Called by a vCPU thread between runs: returns when it may run (after a reset if one
    /// happened since `seen_gen`), or when it must end; runs the work queued for the vCPU
    /// while it waits. Running vCPUs take the lock-free path: a reset only ever happens
    /// while they are paused.
    fn wait_runnable(&self, index: u32, vcpu: &mut VcpuFd, seen_gen: &mut u64) -> Wake {
        if self.running.load(Ordering::Acquire) && *seen_gen != 0 {
            return Wake::Run;
        }
        let mut st = self.state.lock();
        loop {
            self.run_work_locked(&mut st, index, vcpu);
            match st.mode {
                Mode::Running if st.reset_gen != *seen_gen => {
                    *seen_gen = st.reset_gen;
                    return Wake::Reset;
                }
                Mode::Running => return Wake::Run,
                Mode::Stopping => return Wake::Stop,
                Mode::Created | Mode::Paused => {
                    st.parked += 1;
                    self.parked_changed.notify_all();
                    self.wake.wait(&mut st);
                    st.parked -= 1;
                }
            }
        }
    }

    /// Called by a vCPU that has ended the run (shutdown, reset request, guest fault): stays
    /// out of the guest until the machine is reset or stopped, still running the work queued
    /// for it (its registers stay readable).
    fn park_until_reset(&self, index: u32, vcpu: &mut VcpuFd, seen_gen: u64) {
        let mut st = self.state.lock();
        st.parked += 1;
        self.parked_changed.notify_all();
        loop {
            self.run_work_locked(&mut st, index, vcpu);
            if st.mode == Mode::Stopping || st.reset_gen != seen_gen {
                break;
            }
            self.wake.wait(&mut st);
        }
        st.parked -= 1;
    }

    fn thread_started(&self) {
        self.state.lock().alive += 1;
    }

    fn thread_ended(&self) {
        let mut st = self.state.lock();
        st.alive -= 1;
        self.wake.notify_all();
        self.parked_changed.notify_all();
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's kvm_run, for the kick signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set before the thread
        // could be kicked and cleared before the vCPU is dropped; a byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
        // `extern "C" fn(c_int)` as sa_sigaction expects without SA_SIGINFO.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Errors of starting a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be spawned.
    #[error("failed to create vCPU thread 'CPU {index}/KVM': {reason}")]
    Spawn {
        /// CPU index.
        index: u32,
        /// Why.
        reason: String,
    },
    /// The vCPU could not be set up.
    #[error("CPU {index}: {source}")]
    Setup {
        /// CPU index.
        index: u32,
        /// The KVM failure.
        source: KvmError,
    },
    /// The thread died before reporting.
    #[error("CPU {0}: vCPU thread ended before it was created")]
    Lost(u32),
}

/// QEMU's `kvm_start_vcpu_thread`: spawns `CPU n/KVM` and waits for it to report created.
pub(crate) fn start_vcpu_thread(vm: &Arc<KvmVm>, cpu: &ObjectRef) -> Result<(), VcpuError> {
    install_kick_handler();
    let index = cpu
        .downcast::<hw::core::cpu::CpuState>()
        .map(|c| c.index())
        .unwrap_or(0);
    let (created_tx, created_rx) = mpsc::channel();
    let thread_vm = vm.clone();
    let thread_cpu = cpu.clone();
    vm.vcpus.thread_started();
    let handle = hw::core::thread::builder(format!("CPU {index}/KVM"))
        .spawn(move || {
            vcpu_thread(&thread_vm, &thread_cpu, index, created_tx);
            thread_vm.vcpus.thread_ended();
        })
        .map_err(|e| {
            vm.vcpus.thread_ended();
            VcpuError::Spawn {
                index,
                reason: e.to_string(),
            }
        })?;
    use std::os::unix::thread::JoinHandleExt;
    let pthread = handle.as_pthread_t();
    vm.vcpus.threads.lock().push(VcpuThread {
        index,
        pthread,
        handle: Some(handle),
    });
    if let Some(pending) = vm.vcpus_in_parallel.lock().as_mut() {
        pending.push((index, created_rx));
        return Ok(());
    }
    wait_created(index, &created_rx)
}

/// Waits for vCPU `index`'s thread to report created.
fn wait_created(
    index: u32,
    created: &mpsc::Receiver<Result<(), KvmError>>,
) -> Result<(), VcpuError> {
    match created.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(VcpuError::Setup { index, source }),
        Err(_) => Err(VcpuError::Lost(index)),
    }
}

/// [`AccelOps::wait_vcpus_created`]: every vCPU started in parallel mode, in index order.
pub(crate) fn wait_vcpus_created(vm: &KvmVm) -> Result<(), VcpuError> {
    let pending = vm.vcpus_in_parallel.lock().take().unwrap_or_default();
    let mut first_error = None;
    for (index, created) in &pending {
        if let Err(e) = wait_created(*index, created) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What one `KVM_RUN` led to.
enum Step {
    Continue,
    Interrupted,
    End(RunRequest),
}

fn vcpu_thread(
    vm: &Arc<KvmVm>,
    cpu: &ObjectRef,
    index: u32,
    created: mpsc::Sender<Result<(), KvmError>>,
) {
    let x86 = cpu.downcast::<X86Cpu>();
    if let Some(x86) = x86 {
        // SAFETY: gettid has no preconditions.
        x86.set_thread_id(unsafe { libc::gettid() } as u32);
    }
    let apic_id = x86.map_or(index, X86Cpu::apic_id);
    let (mut vcpu, hyperv) = match vm
        .irqchip()
        .and_then(|_| {
            vm.vm
                .create_vcpu(apic_id.into())
                .map_err(|e| ioctl_error("KVM_CREATE_VCPU", e))
        })
        .and_then(|vcpu| vm.map_coalesced_ring(&vcpu).map(|()| vcpu))
        .and_then(|mut vcpu| x86::init_vcpu(vm, cpu, &mut vcpu, index).map(|hv| (vcpu, hv)))
    {
        Ok(created) => created,
        Err(e) => {
            let _ = created.send(Err(e));
            return;
        }
    };
    KVM_RUN.with(|r| r.set(vcpu.get_kvm_run()));
    let _ = created.send(Ok(()));

    let Some(machine) = vm.machine.upgrade() else {
        return;
    };
    let Some(ms) = machine_state(&machine) else {
        return;
    };
    let ending = ms.run_state().ending_flag();
    let io_space = ms.system_io().clone();
    let memory_space = ms.system_memory().clone();
    drop(machine);
    let mut io = io_space.dispatcher();
    let mut memory = memory_space.dispatcher();
    let coalesced = vm.coalesced_ring.get();
    let pristine = match x86::PristineState::capture(&vcpu, hyperv) {
        Ok(p) => p,
        Err(e) => {
            qom::error_report!("CPU {index}: {e}");
            request(vm, RunRequest::GuestError);
            return;
        }
    };
    let mut seen_gen = 0;
    let mut exit_pending = false;
    // CPU 0's first run after the start-up reset: its start-up time is logged there.
    let mut first_run_pending = false;
    loop {
        if exit_pending && !vm.vcpus.running.load(Ordering::Acquire) {
            // KVM finishes an I/O or MMIO instruction on the next KVM_RUN. Do that run now,
            // with immediate_exit so no guest code runs, before parking: whoever acts on a
            // paused vCPU (reset, register reads) must not see it mid-instruction.
            complete_pending_exit(&mut vcpu);
            if let Some(ring) = coalesced.filter(|r| r.pending()) {
                drain_coalesced(ring, &mut io, &mut memory);
            }
        }
        match vm.vcpus.wait_runnable(index, &mut vcpu, &mut seen_gen) {
            Wake::Stop => break,
            Wake::Run => {}
            Wake::Reset => {
                exit_pending = false;
                if seen_gen == 1 && index == 0 {
                    hw::core::panic_selftest::panic_if_asked("vcpu");
                    first_run_pending = true;
                }
                // A migration's destination: the saved state replaces the reset one.
                let incoming = vm.incoming_cpu_state.lock().remove(&index);
                let reset =
                    x86::reset_vcpu(vm, cpu, &mut vcpu, &pristine).and_then(|()| match incoming {
                        Some(state) => crate::kvm::kvm_state::load_cpu_state(&vcpu, &state)
                            .map_err(|e| KvmError::Ioctl {
                                what: "loading the migrated CPU state",
                                reason: e.to_string(),
                            }),
                        None => Ok(()),
                    });
                if let Err(e) = reset {
                    qom::error_report!("CPU {index}: {e}");
                    request(vm, RunRequest::GuestError);
                    vm.vcpus.reset_finished(index, &mut vcpu, seen_gen, false);
                    vm.vcpus.park_until_reset(index, &mut vcpu, seen_gen);
                    continue;
                }
                vm.vcpus.reset_finished(index, &mut vcpu, seen_gen, true);
                // Paused or stopped while waiting for the others: ask again.
                continue;
            }
        }
        // The vCPU list goes on before the first guest instruction after the sandbox is
        // installed (one atomic load otherwise).
        hw::core::sandbox::enter(hw::core::sandbox::ThreadKind::Vcpu);
        if std::mem::take(&mut first_run_pending) {
            if let Some(start) = hw::core::machine::PROCESS_START.get() {
                // scripts/bench-boot.sh and bench-scale.sh read this line
                // (RUST_LOG=boot=info): everything before the ioctl is counted.
                log::info!(target: "boot", "first KVM_RUN {:.1} ms after process start", start.elapsed().as_secs_f64() * 1e3);
            }
        }
        match run_once(&mut vcpu, &mut io, &mut memory, coalesced, index) {
            Step::Continue => {
                exit_pending = true;
                if ending.load(Ordering::Acquire) {
                    // This exit (or another vCPU's) asked for a reset: stay out of the
                    // guest until the main loop pauses the vCPUs for it or is done with
                    // it, as QEMU's vCPUs wait for the BQL.
                    while ending.load(Ordering::Acquire) && vm.vcpus.running.load(Ordering::Acquire)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            Step::Interrupted => {
                vcpu.set_kvm_immediate_exit(0);
                exit_pending = false;
                // A kick may mean the address spaces changed: let go of old views (and of
                // the devices they hold).
                io.refresh();
                memory.refresh();
                // A kick may have come with work (`info registers`).
                vm.vcpus.run_work(index, &mut vcpu);
            }
            Step::End(req) => {
                request(vm, req);
                vm.vcpus.park_until_reset(index, &mut vcpu, seen_gen);
            }
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

#[cold]
fn drain_coalesced(ring: &CoalescedRing, io: &mut Dispatcher, memory: &mut Dispatcher) {
    ring.drain(|pio, addr, data| {
        if pio {
            io.write_bytes(addr, data);
        } else {
            memory.write_bytes(addr, data);
        }
    });
}

fn complete_pending_exit(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => log::warn!("completing a pending exit returned {:?}", other.map(|_| ())),
    }
    vcpu.set_kvm_immediate_exit(0);
}

fn request(vm: &KvmVm, req: RunRequest) {
    if let Some(machine) = vm.machine.upgrade() {
        if let Some(ms) = machine_state(&machine) {
            ms.run_state().request(req);
        }
    }
}

/// One `KVM_RUN` and the handling of its exit (QEMU's `kvm_cpu_exec`).
#[inline]
fn run_once(
    vcpu: &mut VcpuFd,
    io: &mut Dispatcher,
    memory: &mut Dispatcher,
    coalesced: Option<&CoalescedRing>,
    index: u32,
) -> Step {
    let exit = vcpu.run();
    // The guest's buffered writes happened before whatever made it exit.
    if let Some(ring) = coalesced.filter(|r| r.pending()) {
        drain_coalesced(ring, io, memory);
    }
    let is_io = match exit {
        Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) => true,
        Ok(VcpuExit::MmioRead(addr, data)) => {
            memory.read_bytes(addr, data);
            return Step::Continue;
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            memory.write_bytes(addr, data);
            return Step::Continue;
        }
        Ok(VcpuExit::Intr) => return Step::Interrupted,
        Ok(VcpuExit::Hyperv) => {
            crate::kvm::hyperv::handle_exit(vcpu.get_kvm_run());
            return Step::Continue;
        }
        Ok(VcpuExit::Hlt) => {
            // With the in-kernel irqchip KVM handles HLT itself; a HLT exit means the
            // guest halted with nothing to wake it.
            qom::error_report!("CPU {index} halted with no interrupt source");
            return Step::End(RunRequest::GuestShutdown);
        }
        Ok(VcpuExit::Shutdown) => {
            qom::error_report!("CPU {index}: triple fault (KVM_EXIT_SHUTDOWN)");
            eprint!("{}", x86::shutdown_register_dump(vcpu));
            return Step::End(RunRequest::GuestError);
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            return Step::End(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => RunRequest::GuestReset,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => RunRequest::GuestPanic,
                _ => RunRequest::GuestShutdown,
            });
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            qom::error_report!("KVM: entry failed, hardware error 0x{reason:x} (cpu {cpu})");
            eprint!("{}", x86::register_dump(vcpu));
            return Step::End(RunRequest::GuestError);
        }
        Ok(VcpuExit::InternalError) => {
            let run = vcpu.get_kvm_run();
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
            // member KVM filled in.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            qom::error_report!("KVM internal error. Suberror: {suberror}");
            if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                qom::error_report!("emulation failure");
            }
            eprint!("{}", x86::register_dump(vcpu));
            return Step::End(RunRequest::GuestError);
        }
        Ok(other) => {
            qom::error_report!("CPU {index}: unhandled KVM exit {other:?}");
            eprint!("{}", x86::register_dump(vcpu));
            return Step::End(RunRequest::GuestError);
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return Step::Interrupted
        }
        Err(e) => {
            qom::error_report!("CPU {index}: KVM_RUN failed: {}", errno_text(e.errno()));
            return Step::End(RunRequest::GuestError);
        }
    };
    debug_assert!(is_io);
    handle_io(vcpu, io);
    Step::Continue
}

/// Port I/O, including string I/O (`rep outsb`: `count` accesses of `size` bytes).
#[inline]
fn handle_io(vcpu: &mut VcpuFd, io: &mut Dispatcher) {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the union member KVM filled in.
    let exit = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(exit.size);
    let total = size * exit.count as usize;
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: KVM places `count * size` bytes of data at `data_offset` inside the vCPU's
    // kvm_run mapping, which is larger than `kvm_run` itself; nothing else aliases it while
    // this thread handles the exit.
    let data =
        unsafe { std::slice::from_raw_parts_mut(base.add(exit.data_offset as usize), total) };
    let port = u64::from(exit.port);
    if u32::from(exit.direction) == kvm_bindings::KVM_EXIT_IO_OUT {
        for chunk in data.chunks_exact(size) {
            io.write_bytes(port, chunk);
        }
    } else {
        for chunk in data.chunks_exact_mut(size) {
            io.read_bytes(port, chunk);
        }
    }
}
