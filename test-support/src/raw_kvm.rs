//! A minimal raw KVM runner for [`GuestImage`]s (kvm-ioctls directly, no
//! qomvm code): the reference that qomvm's behaviour and speed are compared
//! with.
//!
//! VM setup (see [`RawVm::new`]): `KVM_SET_TSS_ADDR` (0xfffb_d000; not
//! needed on the PVM development host but required by KVM on Intel hosts
//! without unrestricted guest), one RAM slot at guest-physical 0, one vCPU
//! whose CPUID is KVM's supported CPUID with APIC ID 0 (needed for long
//! mode: without CPUID.LM KVM refuses `EFER.LME`, the guest's `wrmsr`
//! faults and the vCPU shuts down), `CS` = 0/base 0, `RIP` = entry,
//! `RFLAGS` = 2. No in-kernel irqchip, so `hlt` exits to user space.
//! `KVM_SET_IDENTITY_MAP_ADDR` is not used (Intel-only, not needed).
//!
//! kvm-ioctls 0.25 hands out I/O exits as `VcpuExit::IoOut(port, data)` /
//! `IoIn(port, data)` where `data` is `size * count` bytes at
//! `kvm_run.io.data_offset` (string I/O: all `count` elements back to
//! back); `size` and `count` themselves are only in `kvm_run.io`, read here
//! through `VcpuFd::get_kvm_run()` after the exit.
use crate::guest::GuestImage;
use kvm_bindings::{
    kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest-physical address given to `KVM_SET_TSS_ADDR` (three pages, the
/// address QEMU and the kvm-ioctls docs use; far above any test RAM).
pub const TSS_ADDR: usize = 0xfffb_d000;

/// One exit seen by [`run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawExit {
    /// `out`/`outs`: `data` is `size * count` bytes.
    IoOut {
        port: u16,
        size: u8,
        count: u32,
        data: Vec<u8>,
    },
    /// `in`/`ins`: every byte was answered with `in_value`.
    IoIn {
        port: u16,
        size: u8,
        count: u32,
    },
    MmioWrite {
        addr: u64,
        data: Vec<u8>,
    },
    /// Answered with the low `len` bytes of `mmio_read_value` (LE).
    MmioRead {
        addr: u64,
        len: usize,
    },
    Hlt,
    Shutdown,
    InternalError {
        suberror: u32,
    },
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// Any other exit, as its `Debug` text.
    Other(String),
    /// `KVM_RUN` itself failed (errno).
    RunError(i32),
}

/// Why [`run`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// One-byte write to the image's exit port: the exit code.
    ExitPort(u8),
    Hlt,
    Shutdown,
    /// Internal error, failed entry, `KVM_RUN` error, unexpected exit.
    Error,
    MaxExits,
    /// The guest ran for [`RUN_TIMEOUT`] (or the given timeout) without stopping (e.g. a loop
    /// that never exits to user space).
    Timeout,
}

/// Wall-clock limit of one [`run`].
pub const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Kicks a thread out of `KVM_RUN` (EINTR) with `SIGUSR2` until dropped.
struct Watchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fired: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

extern "C" fn noop_signal_handler(_: libc::c_int) {}

impl Watchdog {
    fn new(timeout: std::time::Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        // SAFETY: installs a handler that does nothing (async-signal-safe)
        // for SIGUSR2, without SA_RESTART so that KVM_RUN returns EINTR;
        // the sigaction struct is fully initialised (zeroed, then set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = noop_signal_handler as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + timeout;
            while !s.load(Ordering::Acquire) {
                let now = std::time::Instant::now();
                if now < deadline {
                    std::thread::park_timeout(deadline - now);
                    continue;
                }
                f.store(true, Ordering::Release);
                // SAFETY: `target` is the thread that owns this watchdog; it
                // joins this thread (in `drop`) before it can exit, so the
                // pthread_t is valid. Repeated until stopped, in case a
                // signal lands outside KVM_RUN.
                unsafe { libc::pthread_kill(target, libc::SIGUSR2) };
                std::thread::park_timeout(std::time::Duration::from_millis(10));
            }
        });
        Watchdog {
            stop,
            fired,
            thread: Some(thread),
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The result of [`run`].
pub struct RawRun {
    /// Every exit, in order (including the final one).
    pub exits: Vec<RawExit>,
    pub stop: Stop,
    /// `Some(code)` when the guest wrote its exit port.
    pub exit_code: Option<u8>,
    /// vCPU state after the last exit.
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    ram: Vec<u8>,
}

impl RawRun {
    /// Guest RAM after the run.
    pub fn mem(&self, addr: u64, len: usize) -> &[u8] {
        &self.ram[addr as usize..addr as usize + len]
    }

    /// The exits other than the final exit-port write.
    pub fn io_exits(&self) -> &[RawExit] {
        match self.stop {
            Stop::ExitPort(_) => &self.exits[..self.exits.len() - 1],
            _ => &self.exits,
        }
    }
}

/// Whether `/dev/kvm` can be opened and a VM created.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    Ok(())
}

/// Anonymous guest RAM.
struct Ram {
    ptr: *mut u8,
    len: usize,
}

impl Ram {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: an anonymous private mapping with no address hint touches
        // no existing memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Ram {
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by
        // `self`; the guest may write it concurrently only while a vCPU runs,
        // and callers only read between `KVM_RUN`s on the single vCPU.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, plus `&mut self` makes this the only
        // host-side reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; the VM that
        // used it has been dropped first (field order in `RawVm`).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// How a [`RawVm`] is set up beyond its RAM slot, so that a benchmark can give it the
/// configuration of the qomvm VM it is compared with.
#[derive(Clone, Default)]
pub struct RawConfig {
    /// `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2` (speaker dummy), as qomvm's `kvm_init`
    /// does. With it a `hlt` no longer exits to user space.
    pub irqchip: bool,
    /// The vCPU's CPUID; `None`: KVM's supported CPUID with APIC ID 0.
    pub cpuid: Option<CpuId>,
}

/// A VM with one vCPU and the image loaded, ready to run.
pub struct RawVm {
    // Field order = drop order: vCPU, VM, then the RAM they map.
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    ram: Ram,
    _kvm: Kvm,
}

impl RawVm {
    /// Creates the VM (TSS address, RAM slot 0 at GPA 0 of `mem_size`
    /// bytes, vCPU 0 with KVM's supported CPUID) and loads `image` with the
    /// real-mode start state documented in `guest.rs`.
    pub fn new(image: &GuestImage, mem_size: usize) -> Result<Self, String> {
        Self::with_config(image, mem_size, &RawConfig::default())
    }

    /// [`RawVm::new`] with the irqchip and CPUID `config` asks for.
    pub fn with_config(
        image: &GuestImage,
        mem_size: usize,
        config: &RawConfig,
    ) -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        if std::env::var("NO_TSS").is_err() {
            vm.set_tss_address(TSS_ADDR)
                .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
        }
        if std::env::var("IDMAP").is_ok() {
            vm.set_identity_map_address(0xfffb_c000)
                .map_err(|e| format!("IDMAP: {e}"))?;
        }

        let end = image.load_addr as usize + image.bytes.len();
        if end > mem_size {
            return Err(format!("image ends at {end:#x}, RAM is {mem_size:#x}"));
        }
        let mut ram = Ram::new(mem_size)?;
        ram.as_mut_slice()[image.load_addr as usize..end].copy_from_slice(&image.bytes);
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_size as u64,
            userspace_addr: ram.ptr as u64,
        };
        // SAFETY: `ram` is a valid mapping of `mem_size` bytes that outlives
        // the VM (`RawVm` drops the VM before the RAM).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;

        if config.irqchip {
            vm.create_irq_chip()
                .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(|e| format!("KVM_CREATE_PIT2: {e}"))?;
        }
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let cpuid = match &config.cpuid {
            Some(cpuid) => cpuid.clone(),
            None => {
                let mut cpuid = kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
                // KVM reports the APIC ID of whichever host CPU ran the ioctl;
                // give vCPU 0 APIC ID 0 (leaf 1 EBX[31:24], leaves 0xb/0x1f EDX).
                for e in cpuid.as_mut_slice() {
                    match e.function {
                        1 => e.ebx &= 0x00ff_ffff,
                        0xb | 0x1f => e.edx = 0,
                        _ => {}
                    }
                }
                cpuid
            }
        };
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;

        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.selector = 0;
        sregs.cs.base = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let regs = kvm_regs {
            rip: image.entry,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        Ok(RawVm {
            vcpu,
            vm,
            ram,
            _kvm: kvm,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// `(size, count)` of the I/O exit that `KVM_RUN` just returned.
    fn io_size_count(&mut self) -> (u8, u32) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: only called right after a KVM_EXIT_IO, for which the
        // kernel filled the `io` member of the union.
        let io = unsafe { run.__bindgen_anon_1.io };
        (io.size, io.count)
    }

    /// `internal.suberror` of the KVM_EXIT_INTERNAL_ERROR just returned.
    fn internal_suberror(&mut self) -> u32 {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: only called right after a KVM_EXIT_INTERNAL_ERROR, for
        // which the kernel filled the `internal` member of the union.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }
}

/// Loads `image` into a fresh VM with `mem_size` bytes of RAM and runs it,
/// answering port reads with `in_value` (every byte) and MMIO reads with
/// `mmio_read_value` (little endian, truncated to the access size). Stops
/// at a one-byte write to `image.exit_port`, HLT, shutdown, an error, or
/// after `max_exits` exits. Panics if the VM cannot be set up.
pub fn run(
    image: &GuestImage,
    mem_size: usize,
    mmio_read_value: u32,
    in_value: u8,
    max_exits: usize,
) -> RawRun {
    run_with_timeout(
        image,
        mem_size,
        mmio_read_value,
        in_value,
        max_exits,
        RUN_TIMEOUT,
    )
}

/// [`run`] with a wall-clock limit other than [`RUN_TIMEOUT`]; when it
/// expires the vCPU is kicked out of `KVM_RUN` and the run stops with
/// [`Stop::Timeout`].
pub fn run_with_timeout(
    image: &GuestImage,
    mem_size: usize,
    mmio_read_value: u32,
    in_value: u8,
    max_exits: usize,
    timeout: std::time::Duration,
) -> RawRun {
    let mut vm = RawVm::new(image, mem_size).unwrap_or_else(|e| panic!("raw KVM setup: {e}"));
    let mut exits = Vec::new();
    let mut exit_code = None;
    let watchdog = Watchdog::new(timeout);
    let stop = loop {
        if exits.len() >= max_exits {
            break Stop::MaxExits;
        }
        let (exit, stop) = match vm.vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = data.to_vec();
                let (size, count) = vm.io_size_count();
                let stop = if port == image.exit_port && data.len() == 1 {
                    exit_code = Some(data[0]);
                    Some(Stop::ExitPort(data[0]))
                } else {
                    None
                };
                let exit = RawExit::IoOut {
                    port,
                    size,
                    count,
                    data,
                };
                (exit, stop)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(in_value);
                let (size, count) = vm.io_size_count();
                (RawExit::IoIn { port, size, count }, None)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => (
                RawExit::MmioWrite {
                    addr,
                    data: data.to_vec(),
                },
                None,
            ),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let len = data.len();
                let v = mmio_read_value.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get(i).copied().unwrap_or(0);
                }
                (RawExit::MmioRead { addr, len }, None)
            }
            Ok(VcpuExit::Hlt) => (RawExit::Hlt, Some(Stop::Hlt)),
            Ok(VcpuExit::Shutdown) => (RawExit::Shutdown, Some(Stop::Shutdown)),
            Ok(VcpuExit::InternalError) => {
                let suberror = vm.internal_suberror();
                (RawExit::InternalError { suberror }, Some(Stop::Error))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                (RawExit::FailEntry { reason, cpu }, Some(Stop::Error))
            }
            Ok(other) => (RawExit::Other(format!("{other:?}")), Some(Stop::Error)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if watchdog.fired() {
                    break Stop::Timeout;
                }
                continue;
            }
            Err(e) => (RawExit::RunError(e.errno()), Some(Stop::Error)),
        };
        exits.push(exit);
        if let Some(stop) = stop {
            break stop;
        }
    };
    drop(watchdog);
    let regs = vm.vcpu.get_regs().unwrap_or_default();
    let sregs = vm.vcpu.get_sregs().unwrap_or_default();
    RawRun {
        exits,
        stop,
        exit_code,
        regs,
        sregs,
        ram: vm.ram().to_vec(),
    }
}

/// The benchmark baseline: a VM created once, then a bare `KVM_RUN` loop
/// that expects only `out` exits to one port (use an image built with
/// `Op::Loop { port }`).
pub struct RawLoop {
    vm: RawVm,
    target: LoopTarget,
}

/// What the guest loop exits on.
#[derive(Clone, Copy)]
enum LoopTarget {
    Port(u16),
    Mmio(u64),
}

impl RawLoop {
    /// RAM size used by [`RawLoop::new`] (the images fit in 64 KiB).
    pub const MEM_SIZE: usize = 1 << 20;

    /// A loop of `out` to `loop_port` (image built with [`crate::guest::Op::Loop`]).
    pub fn new(image: &GuestImage, loop_port: u16) -> Result<Self, String> {
        Self::with_config(image, loop_port, Self::MEM_SIZE, &RawConfig::default())
    }

    /// A loop of MMIO writes to `addr` (image built with [`crate::guest::Op::MmioLoop`]).
    pub fn new_mmio(image: &GuestImage, addr: u64) -> Result<Self, String> {
        Self::mmio_with_config(image, addr, Self::MEM_SIZE, &RawConfig::default())
    }

    /// [`RawLoop::new`] with `mem_size` bytes of RAM and `config`'s irqchip and CPUID.
    pub fn with_config(
        image: &GuestImage,
        loop_port: u16,
        mem_size: usize,
        config: &RawConfig,
    ) -> Result<Self, String> {
        Ok(RawLoop {
            vm: RawVm::with_config(image, mem_size, config)?,
            target: LoopTarget::Port(loop_port),
        })
    }

    /// [`RawLoop::new_mmio`] with `mem_size` bytes of RAM and `config`'s irqchip and CPUID.
    pub fn mmio_with_config(
        image: &GuestImage,
        addr: u64,
        mem_size: usize,
        config: &RawConfig,
    ) -> Result<Self, String> {
        Ok(RawLoop {
            vm: RawVm::with_config(image, mem_size, config)?,
            target: LoopTarget::Mmio(addr),
        })
    }

    /// Runs until `n` exits to the loop's port or address have been handled and returns the
    /// time they took. Any other exit is an error, and so is a run longer than `timeout` (the
    /// vCPU is then kicked out of `KVM_RUN`). No allocation or logging per exit.
    pub fn run_exits(
        &mut self,
        n: u64,
        timeout: std::time::Duration,
    ) -> Result<std::time::Duration, String> {
        let watchdog = Watchdog::new(timeout);
        let mut done = 0;
        let target = self.target;
        let start = std::time::Instant::now();
        while done < n {
            match (self.vm.vcpu.run(), target) {
                (Ok(VcpuExit::IoOut(port, _)), LoopTarget::Port(p)) if port == p => done += 1,
                (Ok(VcpuExit::MmioWrite(addr, _)), LoopTarget::Mmio(a)) if addr == a => done += 1,
                (Ok(other), _) => return Err(format!("unexpected exit after {done}: {other:?}")),
                (Err(e), _) if e.errno() == libc::EINTR => {
                    if watchdog.fired() {
                        return Err(format!("{done} of {n} exits in {timeout:?}"));
                    }
                }
                (Err(e), _) => return Err(format!("KVM_RUN after {done} exits: {e}")),
            }
        }
        let elapsed = start.elapsed();
        drop(watchdog);
        Ok(elapsed)
    }
}
