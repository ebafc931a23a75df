//! Guest core dumps (QEMU's `dump/dump.c` with `target/i386/arch_dump.c`): QMP
//! `dump-guest-memory` writes the guest's memory and its CPUs' registers as an ELF core
//! file that `crash` and `gdb` read, `query-dump` reports progress and `DUMP_COMPLETED`
//! the end.
//!
//! The layout is QEMU's: the ELF header, one `PT_NOTE` program header, one `PT_LOAD` per
//! memory mapping, the notes (an `NT_PRSTATUS` per CPU, then a `QEMU` note per CPU with
//! the system registers), then the memory, block after block. Without `paging` a mapping
//! is a block of guest-physical memory (`vaddr` = `paddr`); with it, a run of virtual
//! pages the CPUs' page tables map. A running VM is stopped (`save-vm`) while its memory
//! is written and resumes after.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hw::core::accel_ops::{CpuDumpError, CpuDumpRegisters, DumpSegment, PagingRegisters};
use hw::core::cpu::CpuState;
use hw::core::machine::{machine_state, MachineState};
use hw::core::os_error::strerror;
use hw::core::runstate::{self, RunStatus};
use hw::core::services::MachineServices;
use parking_lot::Mutex;
use qom::ObjectRef;
use serde_json::{json, Value};

/// Why a dump was refused or failed, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("Dump not allowed during incoming migration.")]
    Incoming,
    #[error("There is a dump in process, please wait.")]
    InProgress,
    #[error("kdump-compressed format doesn't support paging or filter")]
    KdumpWithFilter,
    #[error("Parameter '{0}' is missing")]
    Missing(&'static str),
    #[error("{0} is not available now")]
    Format(String),
    #[error("File descriptor named '{0}' has not been found")]
    NoFd(String),
    #[error("Could not open '{path}': {reason}")]
    Open { path: String, reason: String },
    #[error("Invalid parameter '{0}'")]
    Invalid(&'static str),
    #[error("disallowing migration blocker (migration/snapshot in progress) for: Live migration disabled: dump-guest-memory in progress")]
    MigrationActive,
    #[error("dump: no guest memory to dump")]
    NoMemory,
    #[error("dump: {0}")]
    Cpu(String),
    /// Writing failed (the message says what failed).
    #[error("{0}")]
    Write(String),
}

/// QEMU's `DumpStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DumpStatus {
    None,
    Active,
    Completed,
    Failed,
}

impl DumpStatus {
    fn name(self) -> &'static str {
        match self {
            DumpStatus::None => "none",
            DumpStatus::Active => "active",
            DumpStatus::Completed => "completed",
            DumpStatus::Failed => "failed",
        }
    }
}

/// The last dump's progress (QEMU's global `DumpState` as `query-dump` reads it).
struct Progress {
    status: DumpStatus,
    completed: u64,
    total: u64,
}

static PROGRESS: Mutex<Progress> = Mutex::new(Progress {
    status: DumpStatus::None,
    completed: 0,
    total: 0,
});

/// QMP `query-dump`.
pub fn query() -> Value {
    let p = PROGRESS.lock();
    json!({"status": p.status.name(), "completed": p.completed, "total": p.total})
}

/// Set from the moment a dump blocks migration until it ends (QEMU's
/// `dump_migration_blocker`, added and removed).
static BLOCKING_MIGRATION: AtomicBool = AtomicBool::new(false);

/// Whether a dump runs: migration is refused meanwhile.
pub fn is_active() -> bool {
    BLOCKING_MIGRATION.load(Ordering::SeqCst)
}

/// Held while a dump or a migration checks that the other does not run and claims its
/// start, so the two cannot start together (QEMU checks both under its BQL).
static START_GATE: Mutex<()> = Mutex::new(());

/// [`START_GATE`], for `migrate` up to its `setup` status.
pub fn start_gate() -> parking_lot::MutexGuard<'static, ()> {
    START_GATE.lock()
}

/// Releases the migration blocker when dropped: at the end of a dump, or when it failed
/// to start.
struct MigrationBlocker;

impl MigrationBlocker {
    /// QEMU's `migrate_add_blocker_internal`: refused while a migration runs, or while
    /// another dump holds it.
    fn add() -> Result<MigrationBlocker, DumpError> {
        let _gate = START_GATE.lock();
        if !crate::migration::is_idle() {
            return Err(DumpError::MigrationActive);
        }
        BLOCKING_MIGRATION
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| MigrationBlocker)
            .map_err(|_| DumpError::InProgress)
    }
}

impl Drop for MigrationBlocker {
    fn drop(&mut self) {
        BLOCKING_MIGRATION.store(false, Ordering::SeqCst);
    }
}

/// The formats this build writes (`query-dump-guest-memory-capability`).
pub const FORMATS: [&str; 1] = ["elf"];

/// What `dump-guest-memory` asks for.
pub struct DumpRequest<'a> {
    /// `protocol`: `file:PATH` or `fd:NAME`.
    pub protocol: &'a str,
    /// Map virtual addresses through the CPUs' page tables.
    pub paging: bool,
    /// `begin` and `length`, each if given.
    pub begin: Option<u64>,
    pub length: Option<u64>,
    /// Return at once; the dump goes on in a thread.
    pub detach: bool,
    /// `format`, if given.
    pub format: Option<&'a str>,
}

/// QEMU's `qmp_dump_guest_memory`.
pub fn dump_guest_memory(
    machine: &ObjectRef,
    req: &DumpRequest,
    named_fd: &dyn Fn(&str) -> Option<OwnedFd>,
) -> Result<(), DumpError> {
    let ms = machine_state(machine).ok_or(DumpError::Invalid("machine"))?;
    let vm = ms.services().vm();
    if vm.status() == RunStatus::InMigrate {
        return Err(DumpError::Incoming);
    }
    if PROGRESS.lock().status == DumpStatus::Active {
        return Err(DumpError::InProgress);
    }
    let format = req.format.unwrap_or("elf");
    if format != "elf" && (req.paging || req.begin.is_some() || req.length.is_some()) {
        return Err(DumpError::KdumpWithFilter);
    }
    let filter = match (req.begin, req.length) {
        (Some(b), Some(l)) => Some((b, l)),
        (Some(_), None) => return Err(DumpError::Missing("length")),
        (None, Some(_)) => return Err(DumpError::Missing("begin")),
        (None, None) => None,
    };
    if format != "elf" {
        return Err(DumpError::Format(format.to_string()));
    }
    let file = open_target(req.protocol, named_fd)?;
    let blocker = MigrationBlocker::add()?;

    let was_running = vm.is_running();
    if was_running {
        runstate::vm_stop(ms, RunStatus::SaveVm).map_err(|e| DumpError::Cpu(e.to_string()))?;
    }
    let plan = match Plan::new(ms, req.paging, filter) {
        Ok(p) => p,
        Err(e) => {
            // QEMU's dump_init failing: the dump is `failed`, nothing counted.
            *PROGRESS.lock() = Progress {
                status: DumpStatus::Failed,
                completed: 0,
                total: 0,
            };
            resume(ms, was_running);
            return Err(e);
        }
    };
    {
        let mut p = PROGRESS.lock();
        p.status = DumpStatus::Active;
        p.completed = 0;
        p.total = plan.total();
    }
    let services = ms.services().clone();
    let machine = machine.clone();
    // QEMU's dump_process then dump_cleanup: DUMP_COMPLETED, the VM runs again, and only
    // then may a migration start (the blocker goes last).
    let job = move || {
        let result = plan.write(&services, file);
        finish(result.clone());
        if let Some(ms) = machine_state(&machine) {
            resume(ms, was_running);
        }
        drop(blocker);
        result
    };
    if req.detach {
        let spawned = std::thread::Builder::new()
            .name("dump_thread".into())
            .spawn(move || {
                let _ = job();
            });
        if let Err(e) = spawned {
            // The job (the migration blocker in it) went with the failed spawn.
            let what = format!("dump: cannot start its thread: {e}");
            finish(Err(what.clone()));
            resume(ms, was_running);
            return Err(DumpError::Write(what));
        }
        Ok(())
    } else {
        job().map_err(DumpError::Write)
    }
}

fn resume(ms: &MachineState, was_running: bool) {
    if was_running {
        if let Err(e) = runstate::vm_start(ms) {
            log::warn!("dump: the VM could not resume: {e}");
        }
    }
}

/// Records the end and sends `DUMP_COMPLETED` (with `error` when it failed).
fn finish(result: Result<(), String>) {
    let data = {
        let mut p = PROGRESS.lock();
        p.status = if result.is_ok() {
            DumpStatus::Completed
        } else {
            DumpStatus::Failed
        };
        json!({"status": p.status.name(), "completed": p.completed, "total": p.total})
    };
    let mut event = json!({ "result": data });
    if let Err(e) = result {
        event["error"] = json!(e);
    }
    hw::core::qapi_event::emit("DUMP_COMPLETED", Some(event));
}

/// The dump's file: `file:PATH` is created for its owner to read only (QEMU's `S_IRUSR`),
/// `fd:NAME` a descriptor passed with `getfd`.
fn open_target(
    protocol: &str,
    named_fd: &dyn Fn(&str) -> Option<OwnedFd>,
) -> Result<File, DumpError> {
    if let Some(name) = protocol.strip_prefix("fd:") {
        return named_fd(name)
            .map(File::from)
            .ok_or_else(|| DumpError::NoFd(name.to_string()));
    }
    if let Some(path) = protocol.strip_prefix("file:") {
        return std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o400)
            .open(path)
            .map_err(|e| DumpError::Open {
                path: path.to_string(),
                reason: strerror(&e),
            });
    }
    Err(DumpError::Invalid("protocol"))
}

/// One `PT_LOAD`: `length` bytes at guest-physical `phys`, virtual `virt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    phys: u64,
    virt: u64,
    length: u64,
}

/// Everything the dump writes, gathered with the VM stopped.
struct Plan {
    /// Guest-physical memory, `(start, end)`, cut to the filter.
    blocks: Vec<(u64, u64)>,
    mappings: Vec<Mapping>,
    /// Each CPU's index and registers, by index.
    cpus: Vec<(u32, CpuDumpRegisters)>,
    /// The first CPU is in long mode: 64-bit `NT_PRSTATUS` notes, `EM_X86_64`.
    long_mode: bool,
    /// ELFCLASS64 (long mode, or memory above 4 GiB).
    class64: bool,
}

/// Past this many program headers, `e_phnum` says `PN_XNUM` and section 0 the count.
const PN_XNUM: usize = 0xffff;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
/// `QEMUCPUState`: version, size, 18 registers, 10 segments of 24 bytes, CR0-CR4 and
/// `kernel_gs_base`.
const QEMU_CPU_STATE_SIZE: usize = 8 + 18 * 8 + 10 * 24 + 5 * 8 + 8;
const PRSTATUS64_SIZE: usize = 336;
const PRSTATUS32_SIZE: usize = 144;
/// A note's header (`Elf{32,64}_Nhdr`, the same 12 bytes) and its 4-aligned name.
const NOTE_HEADER: usize = 12;
const NOTE_NAME: usize = 8;

impl Plan {
    fn new(ms: &MachineState, paging: bool, filter: Option<(u64, u64)>) -> Result<Plan, DumpError> {
        let services = ms.services();
        let all_blocks = services.guest_phys_blocks();
        let mut blocks = all_blocks.clone();
        if let Some((begin, length)) = filter {
            let end = begin.saturating_add(length);
            // QEMU 7.2's dump_init: a filter that holds no memory is refused.
            if length == 0 || !blocks.iter().any(|&(s, e)| begin < e && end > s) {
                return Err(DumpError::NoMemory);
            }
            blocks = blocks
                .into_iter()
                .filter(|&(s, e)| begin < e && end > s)
                .map(|(s, e)| (s.max(begin), e.min(end)))
                .collect();
        }
        let cpus = cpu_registers(ms)?;
        let long_mode = cpus.first().is_some_and(|(_, c)| c.efer & (1 << 10) != 0);
        // QEMU decides on the whole memory, whatever the filter keeps.
        let class64 = long_mode || all_blocks.iter().any(|&(_, e)| e > u64::from(u32::MAX));
        let mut mappings = if paging {
            paged_mappings(&cpus, services, &all_blocks)?
        } else {
            None
        }
        .unwrap_or_else(|| {
            blocks
                .iter()
                .map(|&(s, e)| Mapping {
                    phys: s,
                    virt: s,
                    length: e - s,
                })
                .collect()
        });
        if let Some((begin, length)) = filter {
            // QEMU's memory_mapping_filter.
            let end = begin.saturating_add(length);
            mappings.retain(|m| m.phys < end && m.phys.saturating_add(m.length) > begin);
            for m in &mut mappings {
                let cut = begin.saturating_sub(m.phys);
                m.phys += cut;
                m.virt = m.virt.wrapping_add(cut);
                m.length = (m.length - cut).min(end - m.phys);
            }
        }
        if !class64 && mappings.iter().any(|m| m.virt > u32::MAX as u64) {
            // A 32-bit class cannot say such an address.
            return Err(DumpError::Invalid("paging"));
        }
        Ok(Plan {
            blocks,
            mappings,
            cpus,
            long_mode,
            class64,
        })
    }

    /// Bytes of memory the dump writes (`query-dump`'s `total`).
    fn total(&self) -> u64 {
        self.blocks.iter().map(|&(s, e)| e - s).sum()
    }

    fn note_size(&self) -> usize {
        let prstatus = if self.long_mode {
            PRSTATUS64_SIZE
        } else {
            PRSTATUS32_SIZE
        };
        self.cpus.len() * (2 * (NOTE_HEADER + NOTE_NAME) + prstatus + QEMU_CPU_STATE_SIZE)
    }

    /// Everything before the memory: headers and notes.
    fn headers(&self) -> Vec<u8> {
        let (ehdr_size, phdr_size, shdr_size) = if self.class64 {
            (64usize, 56usize, 64usize)
        } else {
            (52, 32, 40)
        };
        let phnum = 1 + self.mappings.len();
        let sections = usize::from(phnum >= PN_XNUM);
        let note_offset = ehdr_size + phnum * phdr_size + sections * shdr_size;
        let memory_offset = (note_offset + self.note_size()) as u64;
        let mut out = Vec::with_capacity(memory_offset as usize);

        // The ELF header.
        out.extend_from_slice(b"\x7fELF");
        out.push(if self.class64 { 2 } else { 1 }); // ELFCLASS
        out.push(1); // ELFDATA2LSB
        out.push(1); // EV_CURRENT
        out.resize(16, 0);
        put16(&mut out, 4); // ET_CORE
        put16(&mut out, if self.long_mode { EM_X86_64 } else { EM_386 });
        put32(&mut out, 1); // e_version
        let shoff = if sections == 1 {
            (ehdr_size + phnum * phdr_size) as u64
        } else {
            0
        };
        // e_entry, e_phoff, e_shoff
        self.put_word(&mut out, 0);
        self.put_word(&mut out, ehdr_size as u64);
        self.put_word(&mut out, shoff);
        put32(&mut out, 0); // e_flags
        put16(&mut out, ehdr_size as u16);
        put16(&mut out, phdr_size as u16);
        put16(&mut out, phnum.min(PN_XNUM) as u16);
        put16(&mut out, if sections == 1 { shdr_size as u16 } else { 0 });
        put16(&mut out, sections as u16); // e_shnum
        put16(&mut out, 0); // e_shstrndx

        // PT_NOTE, then one PT_LOAD per mapping, its bytes where its block's are.
        self.put_phdr(
            &mut out,
            PT_NOTE,
            note_offset as u64,
            0,
            0,
            self.note_size() as u64,
            self.note_size() as u64,
        );
        // Where each block's bytes start in the file.
        let starts: Vec<u64> = self
            .blocks
            .iter()
            .scan(memory_offset, |at, &(s, e)| {
                let start = *at;
                *at += e - s;
                Some(start)
            })
            .collect();
        for m in &self.mappings {
            let (offset, filesz) = self.file_range(&starts, m);
            // QEMU writes the physical address where the virtual one is 0.
            let vaddr = if m.virt == 0 { m.phys } else { m.virt };
            self.put_phdr(&mut out, PT_LOAD, offset, vaddr, m.phys, filesz, m.length);
        }
        if sections == 1 {
            // Section 0's sh_info holds the real number of program headers.
            let start = out.len();
            out.resize(start + shdr_size, 0);
            let info_at = start + if self.class64 { 44 } else { 28 };
            out[info_at..info_at + 4].copy_from_slice(&(phnum as u32).to_le_bytes());
        }
        debug_assert_eq!(out.len(), note_offset);

        for (index, cpu) in &self.cpus {
            // QEMU's cpu_index + 1.
            let pid = index + 1;
            let desc = if self.long_mode {
                prstatus64(cpu, pid)
            } else {
                prstatus32(cpu, pid)
            };
            put_note(&mut out, b"CORE", NT_PRSTATUS, &desc);
        }
        for (_, cpu) in &self.cpus {
            put_note(&mut out, b"QEMU", 0, &qemu_cpu_state(cpu));
        }
        debug_assert_eq!(out.len() as u64, memory_offset);
        out
    }

    /// Where mapping `m`'s bytes are in the file, and how many of them are (QEMU's
    /// `get_offset_range`): none when its memory is not dumped.
    fn file_range(&self, starts: &[u64], m: &Mapping) -> (u64, u64) {
        // The blocks are sorted and disjoint: the candidate is the last starting at or
        // below the mapping.
        let i = self.blocks.partition_point(|&(s, _)| s <= m.phys);
        match i.checked_sub(1).map(|i| (i, self.blocks[i])) {
            Some((i, (s, e))) if m.phys < e => (starts[i] + m.phys - s, m.length.min(e - m.phys)),
            _ => (u64::MAX, 0),
        }
    }

    fn put_word(&self, out: &mut Vec<u8>, v: u64) {
        if self.class64 {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            put32(out, v as u32);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn put_phdr(
        &self,
        out: &mut Vec<u8>,
        kind: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    ) {
        put32(out, kind);
        if self.class64 {
            put32(out, 0); // p_flags
            for v in [offset, vaddr, paddr, filesz, memsz, 0] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            for v in [offset, vaddr, paddr, filesz, memsz] {
                put32(out, v as u32);
            }
            put32(out, 0); // p_flags
            put32(out, 0); // p_align
        }
    }

    /// Writes the dump: headers and notes, then each block's memory as the CPU reads it,
    /// progress counted as it goes.
    fn write(&self, services: &Arc<MachineServices>, file: File) -> Result<(), String> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&self.headers())
            .map_err(|e| format!("dump: failed to write elf header: {}", strerror(&e)))?;
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK as usize];
        for &(start, end) in &self.blocks {
            let mut at = start;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                services.read_physical(at, &mut buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| format!("dump: failed to save memory: {}", strerror(&e)))?;
                at += n as u64;
                PROGRESS.lock().completed += n as u64;
            }
        }
        out.flush()
            .map_err(|e| format!("dump: failed to save memory: {}", strerror(&e)))
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// An ELF note: header, name padded to 4 bytes, descriptor padded to 4 bytes.
fn put_note(out: &mut Vec<u8>, name: &[u8; 4], kind: u32, desc: &[u8]) {
    put32(out, name.len() as u32 + 1);
    put32(out, desc.len() as u32);
    put32(out, kind);
    out.extend_from_slice(name);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Every CPU's registers, by CPU index. An accelerator without register state (qtest)
/// gives a dump without CPU notes.
fn cpu_registers(ms: &MachineState) -> Result<Vec<(u32, CpuDumpRegisters)>, DumpError> {
    let Some(ops) = ms.accel_ops() else {
        return Ok(Vec::new());
    };
    let mut indexes: Vec<u32> = ms
        .cpus()
        .iter()
        .filter_map(|c| c.downcast::<CpuState>().map(CpuState::index))
        .collect();
    indexes.sort_unstable();
    let mut cpus = Vec::with_capacity(indexes.len());
    for index in indexes {
        match ops.cpu_dump_registers(index) {
            Ok(regs) => cpus.push((index, regs)),
            Err(CpuDumpError::NoRegisters(_)) => return Ok(Vec::new()),
            Err(e) => return Err(DumpError::Cpu(e.to_string())),
        }
    }
    Ok(cpus)
}

const CS: usize = 0;
const DS: usize = 1;
const ES: usize = 2;
const FS: usize = 3;
const GS: usize = 4;
const SS: usize = 5;
/// Indexes in [`CpuDumpRegisters::gprs`].
const RAX: usize = 0;
const RBX: usize = 1;
const RCX: usize = 2;
const RDX: usize = 3;
const RSI: usize = 4;
const RDI: usize = 5;
const RSP: usize = 6;
const RBP: usize = 7;

/// The x86-64 `elf_prstatus`: `pr_pid` at 32, then `user_regs_struct` at 112.
fn prstatus64(c: &CpuDumpRegisters, pid: u32) -> Vec<u8> {
    let mut d = vec![0u8; PRSTATUS64_SIZE];
    d[32..36].copy_from_slice(&pid.to_le_bytes());
    let g = &c.gprs;
    let sel = |i: usize| u64::from(c.segments[i].selector);
    let regs = [
        g[15],
        g[14],
        g[13],
        g[12],
        g[RBP],
        g[RBX],
        g[11],
        g[10],
        g[9],
        g[8],
        g[RAX],
        g[RCX],
        g[RDX],
        g[RSI],
        g[RDI],
        0, // orig_rax
        c.rip,
        sel(CS),
        c.rflags,
        g[RSP],
        sel(SS),
        c.segments[FS].base,
        c.segments[GS].base,
        sel(DS),
        sel(ES),
        sel(FS),
        sel(GS),
    ];
    for (i, v) in regs.iter().enumerate() {
        d[112 + i * 8..120 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    d
}

/// The i386 `elf_prstatus`: `pr_pid` at 24, then `user_regs_struct` at 72.
fn prstatus32(c: &CpuDumpRegisters, pid: u32) -> Vec<u8> {
    let mut d = vec![0u8; PRSTATUS32_SIZE];
    d[24..28].copy_from_slice(&pid.to_le_bytes());
    let g = &c.gprs;
    let sel = |i: usize| u64::from(c.segments[i].selector);
    let regs = [
        g[RBX],
        g[RCX],
        g[RDX],
        g[RSI],
        g[RDI],
        g[RBP],
        g[RAX],
        sel(DS),
        sel(ES),
        sel(FS),
        sel(GS),
        0, // orig_eax
        c.rip,
        sel(CS),
        c.rflags,
        g[RSP],
        sel(SS),
    ];
    for (i, v) in regs.iter().enumerate() {
        d[72 + i * 4..76 + i * 4].copy_from_slice(&(*v as u32).to_le_bytes());
    }
    d
}

/// QEMU's `QEMUCPUState` (version 1), which `crash` reads for the system registers.
fn qemu_cpu_state(c: &CpuDumpRegisters) -> Vec<u8> {
    let mut d = Vec::with_capacity(QEMU_CPU_STATE_SIZE);
    put32(&mut d, 1);
    put32(&mut d, QEMU_CPU_STATE_SIZE as u32);
    for v in c.gprs.iter().chain([&c.rip, &c.rflags]) {
        d.extend_from_slice(&v.to_le_bytes());
    }
    let mut put_segment = |s: &DumpSegment| {
        put32(&mut d, u32::from(s.selector));
        put32(&mut d, s.limit);
        put32(&mut d, s.flags);
        put32(&mut d, 0);
        d.extend_from_slice(&s.base.to_le_bytes());
    };
    for s in c.segments.iter().chain([&c.ldt, &c.tr, &c.gdt, &c.idt]) {
        put_segment(s);
    }
    for v in c.cr.iter().chain([&c.kernel_gs_base]) {
        d.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(d.len(), QEMU_CPU_STATE_SIZE);
    d
}

/// With `paging`: the runs of virtual pages each CPU with paging on maps to dumped
/// memory, every CPU's in turn (QEMU's `qemu_get_guest_memory_mapping`); `None` when no
/// CPU has paging on, and the dump maps physical addresses one to one.
fn paged_mappings(
    cpus: &[(u32, CpuDumpRegisters)],
    services: &Arc<MachineServices>,
    blocks: &[(u64, u64)],
) -> Result<Option<Vec<Mapping>>, DumpError> {
    let paging: Vec<PagingRegisters> = cpus
        .iter()
        .map(|(_, c)| PagingRegisters {
            cr0: c.cr[0],
            cr3: c.cr[3],
            cr4: c.cr[4],
            efer: c.efer,
        })
        .collect();
    let Some(first) = paging.iter().position(|p| p.cr0 & (1 << 31) != 0) else {
        return Ok(None);
    };
    // Tables in holes read as zeroes (not present), as in QEMU's debug walks.
    let read = crate::monitor::x86_paging::debug_reader(services);
    let in_blocks = |phys: u64| blocks.iter().any(|&(s, e)| (s..e).contains(&phys));
    let mut mappings = MappingList::default();
    // One budget of tables for all CPUs' walks: a guest's tables cannot make the dump
    // read more than `MAX_TABLES` of them however many CPUs it has.
    let mut tables = crate::monitor::x86_paging::MAX_TABLES;
    for regs in &paging[first..] {
        crate::monitor::x86_paging::for_each_page_within(
            regs,
            &read,
            &mut tables,
            &mut |virt, phys, size| {
                // QEMU skips pages that are not RAM (`cpu_physical_memory_is_io`).
                if in_blocks(phys) {
                    mappings.add(phys, virt, size);
                }
            },
        );
    }
    if tables == 0 {
        log::warn!(
            "dump: the page walk stopped after {} page tables; mappings beyond are not in the dump",
            crate::monitor::x86_paging::MAX_TABLES
        );
    }
    mappings.finish()
}

/// The list of mappings a paged dump writes, sorted by physical address (QEMU's
/// `MemoryMappingList`).
#[derive(Default)]
struct MappingList {
    list: Vec<Mapping>,
    /// The mapping the last page went into (QEMU's `last_mapping`).
    last: Option<usize>,
    /// Mappings compared so far; past [`MappingList::MAX_STEPS`] pages are appended
    /// without the search and sorted at the end, so tables made to defeat merging cannot
    /// keep the monitor for hours.
    steps: u64,
    /// Pages were appended out of order (after `MAX_STEPS`).
    unsorted: bool,
    /// More than [`MappingList::MAX_MAPPINGS`]: the dump is refused.
    overflowed: bool,
}

impl MappingList {
    const MAX_STEPS: u64 = 1 << 28;
    /// About 56 MiB of program headers: more separate mappings are a guest's tables made
    /// to defeat the dump, not a kernel's.
    const MAX_MAPPINGS: usize = 1 << 20;

    /// The mappings by physical address, or QEMU-worded refusal past the cap.
    fn finish(mut self) -> Result<Option<Vec<Mapping>>, DumpError> {
        if self.overflowed {
            return Err(DumpError::Cpu(format!(
                "the guest's page tables map more than {} separate ranges",
                Self::MAX_MAPPINGS
            )));
        }
        if self.unsorted {
            self.list.sort_by_key(|m| m.phys);
        }
        Ok(Some(self.list))
    }

    /// QEMU's `memory_mapping_list_add_merge_sorted`: a page that continues a mapping in
    /// both address spaces extends it, one inside a mapping at the same offset merges
    /// into it, any other goes in by physical address.
    fn add(&mut self, phys: u64, virt: u64, length: u64) {
        let contiguous = |m: &Mapping| {
            phys == m.phys.wrapping_add(m.length) && virt == m.virt.wrapping_add(m.length)
        };
        if self.overflowed {
            return;
        }
        if let Some(i) = self.last {
            if contiguous(&self.list[i]) {
                self.list[i].length = self.list[i].length.wrapping_add(length);
                return;
            }
        }
        if self.steps < Self::MAX_STEPS {
            for i in 0..self.list.len() {
                self.steps += 1;
                let m = self.list[i];
                if contiguous(&m) {
                    self.list[i].length = m.length.wrapping_add(length);
                    self.last = Some(i);
                    return;
                }
                if phys.wrapping_add(length) < m.phys {
                    break;
                }
                let overlaps =
                    !(phys.wrapping_add(length) < m.phys || phys >= m.phys.wrapping_add(m.length));
                if overlaps {
                    if virt.wrapping_sub(m.virt) != phys.wrapping_sub(m.phys) {
                        continue;
                    }
                    // mapping_merge: widen the virtual range to cover both.
                    let m = &mut self.list[i];
                    if virt < m.virt {
                        m.length = m.length.wrapping_add(m.virt - virt);
                        m.virt = virt;
                    }
                    if virt.wrapping_add(length) > m.virt.wrapping_add(m.length) {
                        m.length = virt.wrapping_add(length).wrapping_sub(m.virt);
                    }
                    self.last = Some(i);
                    return;
                }
            }
        }
        if self.list.len() >= Self::MAX_MAPPINGS {
            self.overflowed = true;
            return;
        }
        let mapping = Mapping { phys, virt, length };
        let at = self.list.partition_point(|m| m.phys < phys);
        // The shift of the entries after `at` is work too: pages in falling physical
        // order would otherwise move the whole list each time.
        self.steps = self.steps.saturating_add((self.list.len() - at) as u64);
        if self.steps < Self::MAX_STEPS {
            self.list.insert(at, mapping);
            self.last = Some(at);
        } else {
            self.unsorted = true;
            self.list.push(mapping);
            self.last = Some(self.list.len() - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(long_mode: bool, blocks: Vec<(u64, u64)>, cpus: usize) -> Plan {
        let mut regs = CpuDumpRegisters::default();
        if long_mode {
            regs.efer = 1 << 10 | 1 << 8;
        }
        let mappings = blocks
            .iter()
            .map(|&(s, e)| Mapping {
                phys: s,
                virt: s,
                length: e - s,
            })
            .collect();
        Plan {
            class64: long_mode || blocks.iter().any(|&(_, e)| e > u64::from(u32::MAX)),
            blocks,
            mappings,
            cpus: (0..cpus as u32).map(|i| (i, regs)).collect(),
            long_mode,
        }
    }

    #[test]
    fn the_notes_have_qemus_sizes() {
        assert_eq!(QEMU_CPU_STATE_SIZE, 0x1b8);
        assert_eq!(prstatus32(&CpuDumpRegisters::default(), 1).len(), 0x90);
        let p = plan(false, vec![(0, 0xa0000)], 2);
        // QEMU 7.2 with two CPUs in real mode: a PT_NOTE of 0x4e0 bytes.
        assert_eq!(p.note_size(), 0x4e0);
    }

    #[test]
    fn headers_point_each_load_at_its_blocks_bytes() {
        let p = plan(true, vec![(0, 0xa0000), (0x10_0000, 0x800_0000)], 1);
        let h = p.headers();
        assert_eq!(&h[..4], b"\x7fELF");
        assert_eq!(h[4], 2);
        assert_eq!(u16::from_le_bytes([h[18], h[19]]), EM_X86_64);
        assert_eq!(u16::from_le_bytes([h[56], h[57]]), 3, "e_phnum");
        let phdr = |i: usize, field: usize| {
            let at = 64 + i * 56 + 8 + field * 8;
            u64::from_le_bytes(h[at..at + 8].try_into().unwrap())
        };
        let memory = h.len() as u64;
        assert_eq!(phdr(1, 0), memory, "first load's offset");
        assert_eq!(phdr(2, 0), memory + 0xa0000);
        assert_eq!(phdr(2, 2), 0x10_0000, "paddr");
        assert_eq!(phdr(2, 3), 0x7f0_0000, "filesz");
    }

    #[test]
    fn many_mappings_move_the_count_to_section_zero() {
        let mut p = plan(true, vec![(0, 0x1_0000_0000)], 1);
        p.mappings = (0..0x10000u64)
            .map(|i| Mapping {
                phys: i * 0x2000,
                virt: 0xffff_8000_0000_0000 + i * 0x2000,
                length: 0x1000,
            })
            .collect();
        let h = p.headers();
        assert_eq!(u16::from_le_bytes([h[56], h[57]]), 0xffff);
        let shoff = u64::from_le_bytes(h[40..48].try_into().unwrap()) as usize;
        let info = u32::from_le_bytes(h[shoff + 44..shoff + 48].try_into().unwrap());
        assert_eq!(info, 0x10001);
    }

    #[test]
    fn mappings_at_the_top_of_the_address_space_wrap_without_overflow() {
        // The review's case: a page at the top, then pages that make a mapping reach
        // across 2^64 and another overlap it.
        let p = 0x10_0000;
        let mut l = MappingList::default();
        l.add(p, 0xffff_ffff_ffff_f000, 0x1000);
        l.add(p + 0x1000, 0, 0x1000);
        l.add(p, 0xffff_ffff_ffff_f000, 0x1000);
        l.add(p + 0x1000, 0, 0x1000);
        l.add(p - 0x1000, 0xffff_ffff_ffff_e000, 0x1000);
        let list = l.finish().unwrap().unwrap();
        assert!(!list.is_empty());
    }

    #[test]
    fn too_many_separate_mappings_refuse_the_dump() {
        let mut l = MappingList::default();
        for i in 0..=MappingList::MAX_MAPPINGS as u64 {
            // Every other page, at descending virtual addresses: nothing merges.
            l.add(i * 0x2000, u64::MAX - i * 0x4000 - 0xfff, 0x1000);
        }
        assert!(l.finish().is_err());
    }

    /// Pages in falling physical order (and rising virtual) stop the search at once, but
    /// each goes in at the front: the shifts count as work, so past the budget they are
    /// appended and sorted at the end instead of moving the list again for each page.
    #[test]
    fn pages_in_falling_physical_order_use_up_the_budget() {
        let mut l = MappingList::default();
        let n: u64 = 30_000;
        for k in 0..n {
            l.add((n - k) * 0x2000, 0x4000_0000 + k * 0x1000, 0x1000);
        }
        assert!(l.unsorted, "{} steps for {n} pages", l.steps);
        let list = l.finish().unwrap().unwrap();
        assert_eq!(list.len(), n as usize);
        assert!(list.windows(2).all(|w| w[0].phys <= w[1].phys));
    }

    #[test]
    fn pages_merge_as_qemus_mapping_list_merges_them() {
        let mut l = MappingList::default();
        l.add(0x5000, 0xffff_8000_0000_5000, 0x1000);
        // Continues the last mapping in both spaces.
        l.add(0x6000, 0xffff_8000_0000_6000, 0x1000);
        // Lower physical address: goes first.
        l.add(0x1000, 0xffff_8000_0000_9000, 0x1000);
        // The same physical page at another virtual address: its own mapping.
        l.add(0x5000, 0xc000_5000, 0x1000);
        // Inside the first at the same offset: merged into it.
        l.add(0x5000, 0xffff_8000_0000_5000, 0x1000);
        let got: Vec<(u64, u64, u64)> = l.list.iter().map(|m| (m.phys, m.virt, m.length)).collect();
        assert_eq!(
            got,
            [
                (0x1000, 0xffff_8000_0000_9000, 0x1000),
                (0x5000, 0xc000_5000, 0x1000),
                (0x5000, 0xffff_8000_0000_5000, 0x2000),
            ]
        );
    }
}
