//! The sandbox (QEMU's `-sandbox`, `system/qemu-seccomp.c`; Firecracker's per-thread
//! filters): seccomp-bpf allowlists, one per kind of thread, installed before the guest
//! runs.
//!
//! - [`ThreadKind::Process`]: the main loop, the monitors and every other thread (chardev,
//!   slirp, timers). The widest list: files, sockets, threads, and with `spawn=allow` the
//!   tap scripts' fork and exec. [`install`] puts it on every thread at once (`TSYNC`).
//! - [`ThreadKind::Vcpu`]: what a vCPU thread needs to run the guest and emulate devices:
//!   memory, futexes, eventfds, `ioctl` on KVM, vhost and tap descriptors only.
//! - [`ThreadKind::IoThread`]: an event loop's thread: the vCPU list plus block I/O.
//!
//! A vCPU or I/O thread adds its own list on top of the process list ([`enter`], called
//! where its loop starts an iteration), so it is held to both. A call no list allows
//! raises SIGSYS, whose handler names the thread and the call on one line and ends qomvm
//! (status 159, as a shell reports a SIGSYS death).
//!
//! `clone3` fails with ENOSYS everywhere (glibc then uses `clone`, whose flags a filter can
//! read): new threads are allowed, new processes only with `spawn=allow`.
//!
//! QEMU's sandbox is a denylist of categories and off unless asked for; qomvm's is an
//! allowlist and on unless `-sandbox off`. The categories keep QEMU's names and defaults:
//! `obsolete` (deny: qomvm never makes those calls, and no list has them),
//! `elevateprivileges` (allow: `set*id`), `spawn` (allow: `fork`, `vfork`, `execve`,
//! `clone` of a process), `resourcecontrol` (allow: priorities and affinity).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::core::syscall_names::syscall_name;

/// `elevateprivileges=` (QEMU's spellings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElevatePrivileges {
    /// `allow`: the `set*id` calls are allowed.
    Allow,
    /// `deny`: they are not.
    Deny,
    /// `children`: denied to qomvm, allowed to the processes it starts. An allowlist
    /// filter is inherited across `exec`, so qomvm's own calls are denied and a child
    /// that needs more runs without the privilege (no_new_privs is set either way).
    Children,
}

/// What `-sandbox` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxPolicy {
    /// `on` (the default) or `off`.
    pub enabled: bool,
    /// `obsolete=allow`.
    pub obsolete: bool,
    /// `elevateprivileges=`.
    pub elevate_privileges: ElevatePrivileges,
    /// `spawn=allow`.
    pub spawn: bool,
    /// `resourcecontrol=allow`.
    pub resource_control: bool,
}

impl Default for SandboxPolicy {
    /// qomvm's default: on, with QEMU's defaults for `-sandbox on`.
    fn default() -> Self {
        SandboxPolicy {
            enabled: true,
            obsolete: false,
            elevate_privileges: ElevatePrivileges::Allow,
            spawn: true,
            resource_control: true,
        }
    }
}

/// Errors of `-sandbox` and of installing the filters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SandboxError {
    /// A value QEMU does not accept.
    #[error("Parameter '{key}' expects {expected}")]
    BadValue {
        /// The parameter.
        key: String,
        /// QEMU's description of what it takes.
        expected: &'static str,
    },
    /// A parameter `-sandbox` does not have.
    #[error("Invalid parameter '{0}'")]
    UnknownParameter(String),
    /// The kernel refused a filter.
    #[error("failed to install seccomp syscall filter in the kernel: {0}")]
    Install(String),
}

/// Parses `-sandbox on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]
/// [,spawn=allow|deny][,resourcecontrol=allow|deny]`.
pub fn parse_sandbox(text: &str) -> Result<SandboxPolicy, SandboxError> {
    let mut policy = SandboxPolicy::default();
    let mut enable = None;
    for (i, item) in text.split(',').enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, v),
            None if i == 0 => ("enable", item),
            None => (item, "on"),
        };
        let allow_deny = |value: &str| match value {
            "allow" => Ok(true),
            "deny" => Ok(false),
            _ => Err(SandboxError::BadValue {
                key: key.to_string(),
                expected: "'allow' or 'deny'",
            }),
        };
        match key {
            "enable" => {
                enable = Some(match value {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => {
                        return Err(SandboxError::BadValue {
                            key: "enable".into(),
                            expected: "'on' or 'off'",
                        })
                    }
                })
            }
            "obsolete" => policy.obsolete = allow_deny(value)?,
            "spawn" => policy.spawn = allow_deny(value)?,
            "resourcecontrol" => policy.resource_control = allow_deny(value)?,
            "elevateprivileges" => {
                policy.elevate_privileges = match value {
                    "allow" => ElevatePrivileges::Allow,
                    "deny" => ElevatePrivileges::Deny,
                    "children" => ElevatePrivileges::Children,
                    _ => {
                        return Err(SandboxError::BadValue {
                            key: key.to_string(),
                            expected: "'allow', 'deny' or 'children'",
                        })
                    }
                }
            }
            _ => return Err(SandboxError::UnknownParameter(key.to_string())),
        }
    }
    // As in QEMU, options without `on` leave the sandbox off.
    policy.enabled = enable.unwrap_or(false);
    Ok(policy)
}

/// The kinds of threads with a list of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main loop, monitors, and every other thread.
    Process,
    /// A vCPU thread.
    Vcpu,
    /// An event loop (iothread) thread.
    IoThread,
}

/// The installed policy's filters; `enter` does nothing until they are set.
static FILTERS: OnceLock<Filters> = OnceLock::new();
/// [`prepare`]'s compilation, for [`install`] to take.
static PREPARED: std::sync::Mutex<Option<Prepared>> = std::sync::Mutex::new(None);

/// A policy's filters, compiled once, off the path to the guest's first instruction
/// ([`prepare`]); applying them stays on it (about 0.55 ms of the kernel's on PVM for the
/// process list).
struct Filters {
    clone3: BpfProgram,
    process: BpfProgram,
    vcpu: BpfProgram,
    iothread: BpfProgram,
}

impl Filters {
    fn compile(policy: &SandboxPolicy) -> Result<Filters, SandboxError> {
        Ok(Filters {
            clone3: clone3_enosys_filter()?,
            process: build(ThreadKind::Process, policy)?,
            vcpu: build(ThreadKind::Vcpu, policy)?,
            iothread: build(ThreadKind::IoThread, policy)?,
        })
    }

    fn thread(&self, kind: ThreadKind) -> &BpfProgram {
        match kind {
            ThreadKind::Process => &self.process,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::IoThread => &self.iothread,
        }
    }
}

/// A compilation under way for a policy.
struct Prepared {
    policy: SandboxPolicy,
    compiling: crate::core::deferred::Deferred<Result<Filters, SandboxError>>,
}

/// Starts compiling `policy`'s filters on a thread of their own, while the machine is
/// built; [`install`] takes them. Nothing to do for `-sandbox off`.
pub fn prepare(policy: SandboxPolicy) {
    if !policy.enabled {
        return;
    }
    let compiling = crate::core::deferred::Deferred::spawn("sandbox-compile", move || {
        let filters = Filters::compile(&policy);
        prime_heap_trim();
        filters
    });
    if let Ok(compiling) = compiling {
        *PREPARED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Prepared { policy, compiling });
    }
}
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// A function the SIGSYS handler calls before exiting (the terminal's restore); it must
/// be async-signal-safe. Stored as an address so the handler reads it with one load.
static FATAL_HOOK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static APPLIED: Cell<bool> = const { Cell::new(false) };
    /// The kind the thread said it is at its first [`enter`], sandbox or not.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Whether the calling thread may read and write images itself: every thread but a
/// vCPU's, whose list has no block I/O calls (and which must not wait on a disk).
/// Devices move such work to the main loop from a vCPU thread.
pub fn thread_may_block_io() -> bool {
    KIND.with(Cell::get) != Some(ThreadKind::Vcpu)
}

/// Sets the async-signal-safe function the SIGSYS handler runs before ending qomvm.
pub fn set_fatal_hook(hook: fn()) {
    FATAL_HOOK.store(hook as usize, Ordering::Release);
}

/// Whether the sandbox is installed.
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Installs the sandbox (QEMU's `seccomp_start`): the SIGSYS reporter, then the process
/// list on every thread. Threads of the other kinds add theirs at their next [`enter`].
pub fn install(policy: SandboxPolicy) -> Result<(), SandboxError> {
    if !policy.enabled {
        return Ok(());
    }
    install_sigsys_reporter()?;
    fix_malloc_arena_limit();
    let prepared = PREPARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    let filters = match prepared {
        Some(p) if p.policy == policy => p
            .compiling
            .into_inner()
            .unwrap_or_else(|| Filters::compile(&policy))?,
        _ => {
            // A thread of its own: the priming needs a heap other than the main arena.
            let _ = std::thread::Builder::new()
                .name("sandbox-prime".into())
                .spawn(prime_heap_trim)
                .map(|t| t.join());
            Filters::compile(&policy)?
        }
    };
    for filter in [&filters.clone3, &filters.process] {
        seccompiler::apply_filter_all_threads(filter)
            .map_err(|e| SandboxError::Install(e.to_string()))?;
    }
    let _ = FILTERS.set(filters);
    APPLIED.with(|a| a.set(true));
    INSTALLED.store(true, Ordering::Release);
    self_test(ThreadKind::Process);
    Ok(())
}

/// glibc's malloc reads `/sys/devices/system/cpu/online` (`get_nprocs`) the first time a
/// thread needs a ninth arena, to compute its arena limit: under the vCPU or event loop
/// list that `openat` is forbidden, so the first allocation of a thread started by such a
/// thread (a block worker) ended qomvm. Setting the limit glibc would compute (8 arenas per
/// CPU on 64-bit hosts) before the filters go on means it is never computed later.
fn fix_malloc_arena_limit() {
    let cpus = scheduler_cpus();
    let limit = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a tunable of the allocator; any positive value is valid.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, limit)
    };
    #[cfg(not(target_env = "gnu"))]
    let _ = limit;
}

/// glibc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks the heap of a
/// thread's arena (`shrink_heap`, after a large free), and caches the answer for the
/// process. Under the event loop's and vCPU's lists `openat` is forbidden, so the first
/// large free on such a thread ended qomvm (a virtio-scsi disk's bounce buffer did). Made
/// to happen here, on a thread of its own before the filters go on: 64 KiB blocks (below
/// any mmap threshold, above the size that makes `free` consider trimming) adding up to
/// 4 MiB (above any trim threshold at start-up), never touched, freed newest first.
fn prime_heap_trim() {
    let blocks: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(64 * 1024)).collect();
    for block in blocks.into_iter().rev() {
        drop(std::hint::black_box(block));
    }
}

/// The CPUs this thread may run on, as glibc counts them for its arena limit
/// (`__get_nprocs_sched`): one `sched_getaffinity`. (`available_parallelism` also reads
/// the cgroup's files, 0.16 ms on the path to the guest's first instruction.)
fn scheduler_cpus() -> usize {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the size passed is the set's; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return 1;
    }
    // SAFETY: CPU_COUNT only reads the set.
    usize::try_from(unsafe { libc::CPU_COUNT(&set) }).map_or(1, |n| n.max(1))
}

/// Debug builds only: with `QOMVM_SANDBOX_SELFTEST=process|vcpu|iothread` set, the first
/// thread of that kind makes a call its list forbids once the sandbox is on, so tests can
/// see the report and the exit; with `heaptrim`, every vCPU and event loop allocates and
/// frees large blocks, which must not end qomvm.
fn self_test(kind: ThreadKind) {
    if !cfg!(debug_assertions) {
        return;
    }
    let wanted = match std::env::var("QOMVM_SANDBOX_SELFTEST") {
        Ok(v) => v,
        Err(_) => return,
    };
    let name = match kind {
        ThreadKind::Process => "process",
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::IoThread => "iothread",
    };
    if wanted == "heaptrim" && kind != ThreadKind::Process {
        // Large blocks allocated and freed on a vCPU or an event loop: glibc trims the
        // thread's heap, which must not need a forbidden call (see `prime_heap_trim`).
        let blocks: Vec<Vec<u8>> = (0..256).map(|_| Vec::with_capacity(64 * 1024)).collect();
        for block in blocks.into_iter().rev() {
            drop(std::hint::black_box(block));
        }
    }
    if wanted == name {
        // ptrace is on no list; openat is not on the vCPU list.
        let nr = if kind == ThreadKind::Process {
            libc::SYS_ptrace
        } else {
            libc::SYS_openat
        };
        // SAFETY: both calls fail harmlessly (or trap) with these zero arguments.
        unsafe { libc::syscall(nr, 0, 0, 0, 0) };
    }
}

/// Called by a thread of `kind` where it is safe to change its filter (a loop's next
/// iteration): adds the kind's list once the sandbox is installed. One relaxed load when
/// it has nothing to do.
pub fn enter(kind: ThreadKind) {
    KIND.with(|k| {
        if k.get().is_none() {
            k.set(Some(kind));
        }
    });
    if !INSTALLED.load(Ordering::Acquire) || APPLIED.with(Cell::get) {
        return;
    }
    APPLIED.with(|a| a.set(true));
    if kind == ThreadKind::Process {
        return; // installed on every thread already
    }
    let Some(filters) = FILTERS.get() else { return };
    if let Err(e) = seccompiler::apply_filter(filters.thread(kind)) {
        log::error!("sandbox: cannot add the {kind:?} filter: {e}");
    }
    self_test(kind);
}

// ----- the lists -----

/// Calls every thread makes: memory, futexes, signals, time, thread start and end,
/// eventfd and epoll, reads and writes on descriptors it already has.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_eventfd2,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // Monitor events and serial output reach sockets from any thread.
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_seccomp,
    // Allowed here so that the ENOSYS filter decides (of two filters' verdicts the
    // stricter wins, and a trap is stricter than an error).
    libc::SYS_clone3,
];

/// Block I/O, for event loops and the worker threads they start.
const BLOCK_IO: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_sync_file_range,
];

/// What the main loop and the monitors add: files, sockets, processes' own data.
const PROCESS: &[i64] = &[
    // A migration's destination skips guest pages the host never touched.
    libc::SYS_mincore,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
    libc::SYS_flock,
    libc::SYS_fadvise64,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_memfd_create,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_epoll_create1,
    libc::SYS_ioctl,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_mbind,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_kill,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_set_tid_address,
];

/// `spawn=allow`: new processes (tap scripts).
const SPAWN: &[i64] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
];

/// `elevateprivileges=allow`.
const ELEVATE_PRIVILEGES: &[i64] = &[
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setpgid,
    libc::SYS_setsid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
];

/// `resourcecontrol=allow` (`sched_getaffinity` is common: thread pools size themselves
/// with it).
const RESOURCE_CONTROL: &[i64] = &[
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
];

/// `ioctl` types a vCPU or event loop thread may use: KVM (0xAE), vhost (0xAF), tun and
/// terminals ('T'), block devices (0x12).
const THREAD_IOCTL_TYPES: &[u64] = &[0xAE, 0xAF, b'T' as u64, 0x12];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Install(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(|e| SandboxError::Install(e.to_string()))
}

/// The rules of `kind`'s list under `policy`: syscall number -> conditions (empty: any
/// arguments).
fn rules(
    kind: ThreadKind,
    policy: &SandboxPolicy,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |list: &[i64]| {
        for &nr in list {
            rules.insert(nr, Vec::new());
        }
    };
    allow(COMMON);
    if kind != ThreadKind::Vcpu {
        allow(BLOCK_IO);
    }
    if kind == ThreadKind::Process {
        allow(PROCESS);
        if policy.spawn {
            allow(SPAWN);
        }
        if policy.elevate_privileges == ElevatePrivileges::Allow {
            allow(ELEVATE_PRIVILEGES);
        }
        if policy.resource_control {
            allow(RESOURCE_CONTROL);
        }
    } else {
        let ioctls = THREAD_IOCTL_TYPES
            .iter()
            .map(|&t| rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    // Threads (CLONE_THREAD) always; processes with spawn=allow, from the process list.
    let clone = if kind == ThreadKind::Process && policy.spawn {
        Vec::new()
    } else {
        let thread = libc::CLONE_THREAD as u64;
        vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?])?]
    };
    rules.insert(libc::SYS_clone, clone);
    // Thread names (and the SIGSYS report's), and a thread adding its own filter.
    let prctl = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
        libc::PR_SET_SECCOMP,
    ]
    .iter()
    .map(|&op| rule(vec![cond(0, SeccompCmpOp::Eq, op as u64)?]))
    .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    Ok(rules)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| SandboxError::Install(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Install(e.to_string()))
}

/// `kind`'s list as a filter: allowed calls pass, others trap (SIGSYS).
fn build(kind: ThreadKind, policy: &SandboxPolicy) -> Result<BpfProgram, SandboxError> {
    compile(rules(kind, policy)?, SeccompAction::Trap, SeccompAction::Allow)
}

/// `clone3` fails with ENOSYS, so that glibc starts threads with `clone`, whose flags the
/// lists check.
fn clone3_enosys_filter() -> Result<BpfProgram, SandboxError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

// ----- the SIGSYS report -----

fn install_sigsys_reporter() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction with a valid handler address and SA_SIGINFO; the
    // handler only makes async-signal-safe calls.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = sigsys_handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SandboxError::Install(format!(
            "SIGSYS handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A message built without allocating (the handler runs in signal context).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report: `qomvm: sandbox: thread 'NAME' made a forbidden system call: NAME (NR)`.
fn report(thread: &[u8], nr: i64) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"qomvm: sandbox: thread '");
    line.push(thread);
    line.push(b"' made a forbidden system call: ");
    match syscall_name(nr) {
        Some(name) => {
            line.push(name.as_bytes());
            line.push(b" (");
            line.push_number(nr as u64);
            line.push(b")");
        }
        None => {
            line.push(b"number ");
            line.push_number(nr as u64);
        }
    }
    line.push(b"\n");
    line
}

extern "C" fn sigsys_handler(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t's SIGSYS member: after si_signo, si_errno, si_code (and padding), the
    // calling address (8 bytes), then the system call number.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; offset 24 is
    // `_sigsys._syscall` on x86-64.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let line = report(&name[..name_len], i64::from(nr));
    // SAFETY: write(2) of a buffer we own; async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    let hook = FATAL_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: the address was stored from a `fn()` by set_fatal_hook.
        let hook: fn() = unsafe { std::mem::transmute::<usize, fn()>(hook) };
        hook();
    }
    // SAFETY: _exit is async-signal-safe and does not return.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_options_are_qemus() {
        let p = parse_sandbox("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
            .unwrap();
        assert!(p.enabled && !p.spawn && !p.resource_control && !p.obsolete);
        assert_eq!(p.elevate_privileges, ElevatePrivileges::Deny);
        assert!(!parse_sandbox("off").unwrap().enabled);
        assert_eq!(parse_sandbox("on").unwrap(), SandboxPolicy::default());
        assert_eq!(
            parse_sandbox("maybe"),
            Err(SandboxError::BadValue {
                key: "enable".into(),
                expected: "'on' or 'off'"
            })
        );
        assert_eq!(
            parse_sandbox("on,spawn=sometimes").unwrap_err().to_string(),
            "Parameter 'spawn' expects 'allow' or 'deny'"
        );
        assert_eq!(
            parse_sandbox("on,warp=allow").unwrap_err().to_string(),
            "Invalid parameter 'warp'"
        );
        assert!(!parse_sandbox("spawn=deny").unwrap().enabled);
    }

    #[test]
    fn every_list_compiles() {
        for kind in [ThreadKind::Process, ThreadKind::Vcpu, ThreadKind::IoThread] {
            for policy in [
                SandboxPolicy::default(),
                parse_sandbox("on,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
                    .unwrap(),
            ] {
                build(kind, &policy).unwrap();
            }
        }
        clone3_enosys_filter().unwrap();
    }

    #[test]
    fn lists_nest_and_spawn_is_the_policys() {
        let default = SandboxPolicy::default();
        let process = rules(ThreadKind::Process, &default).unwrap();
        for kind in [ThreadKind::Vcpu, ThreadKind::IoThread] {
            for nr in rules(kind, &default).unwrap().keys() {
                assert!(process.contains_key(nr), "{kind:?}: {:?}", syscall_name(*nr));
            }
        }
        assert!(process.contains_key(&libc::SYS_execve));
        let no_spawn = parse_sandbox("on,spawn=deny").unwrap();
        assert!(!rules(ThreadKind::Process, &no_spawn)
            .unwrap()
            .contains_key(&libc::SYS_execve));
        let vcpu = rules(ThreadKind::Vcpu, &default).unwrap();
        assert!(!vcpu.contains_key(&libc::SYS_openat));
        assert!(!vcpu.contains_key(&libc::SYS_execve));
    }

    #[test]
    fn the_report_names_thread_and_call() {
        let line = report(b"CPU 0/KVM", libc::SYS_openat);
        assert_eq!(
            &line.buf[..line.len],
            b"qomvm: sandbox: thread 'CPU 0/KVM' made a forbidden system call: openat (257)\n"
        );
        let line = report(b"x", 999);
        assert_eq!(
            &line.buf[..line.len],
            b"qomvm: sandbox: thread 'x' made a forbidden system call: number 999\n"
        );
    }
}
