//! `dump-guest-memory` (QMP and HMP), `query-dump`, `DUMP_COMPLETED`: a guest's memory and
//! registers in an ELF core file, read back here and compared with QEMU 7.2's dump of the
//! same guest where QEMU is installed.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use test_support::console::ConsoleVm;
use test_support::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
use test_support::guest::{Asm, EAX, EBP, EBX, ECX, EDI, EDX, ESI};
use test_support::qmp::QmpClient;

const TIMEOUT: Duration = Duration::from_secs(60);
const QEMU: &str = "qemu-system-x86_64";
/// Where the guest writes its pattern (below 640 KiB: in the first block of both VMMs'
/// dumps, also through the page at 0xc0000000).
const PATTERN: u32 = 0x8_0000;
const PATTERN_DWORDS: u32 = 1024;
/// The guest's page-directory-pointer table; its page directory follows.
const PAGE_DIR: u32 = 0x9_0000;
/// The registers the guest leaves, EAX to EBP.
const REGS: [(u8, u32); 7] = [
    (EAX, 0x1111_1111),
    (EBX, 0x2222_2222),
    (ECX, 0x3333_3333),
    (EDX, 0x4444_4444),
    (ESI, 0x5555_5555),
    (EDI, 0x6666_6666),
    (EBP, 0x7777_7777),
];

fn kvm_or_skip() -> bool {
    if let Some(reason) = test_support::vm::kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return false;
    }
    true
}

fn qemu_installed() -> bool {
    Command::new(QEMU).arg("--version").output().is_ok()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-dump-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kernel.elf"), dump_kernel()).unwrap();
    dir
}

/// The pattern's dword `i`.
fn pattern(i: u32) -> u32 {
    0x5a5a_0000_u32.wrapping_add(i.wrapping_mul(0x0100_0193))
}

/// Whether the guest may turn paging on: PVM's KVM runs only 64-bit guest kernels and
/// triple-faults a 32-bit guest that sets CR0.PG (`x86_paging`'s unit tests walk such
/// tables there).
fn guest_paging() -> bool {
    !Path::new("/sys/module/kvm_pvm").exists()
}

/// A Multiboot kernel (QEMU boots it too): fills [`PATTERN`], turns on PAE paging with
/// 2 MiB pages mapping 0-4 MiB at 0 and at 0xc0000000 (where [`guest_paging`]), prints
/// `ready` on COM1, loads [`REGS`] and halts with interrupts off.
fn dump_kernel() -> Vec<u8> {
    let mut a = Asm::flat32();
    a.mov_imm(EDI, PATTERN)
        .mov_imm(ECX, PATTERN_DWORDS)
        .mov_imm(EAX, pattern(0));
    let fill = a.label();
    a.bind(fill);
    a.store(EDI, 0, EAX)
        .add_imm(EDI, 4)
        .add_imm(EAX, 0x0100_0193)
        .loop_back(fill);
    if !guest_paging() {
        return dump_kernel_tail(a);
    }
    // PAE: PDPT entries 0 and 3 (0 and 0xc0000000) -> one directory whose first two
    // entries are 2 MiB pages (present, writable, PS) at 0 and 2 MiB.
    a.mov_imm(EAX, PAGE_DIR + 0x1000 + 1)
        .store_abs(PAGE_DIR, EAX)
        .store_abs(PAGE_DIR + 3 * 8, EAX)
        .mov_imm(EAX, 0x83)
        .store_abs(PAGE_DIR + 0x1000, EAX)
        .mov_imm(EAX, 0x20_0083)
        .store_abs(PAGE_DIR + 0x1008, EAX);
    a.emit(&[0x0f, 0x20, 0xe0]) // mov eax, cr4
        .or_imm(EAX, 1 << 5) // PAE
        .emit(&[0x0f, 0x22, 0xe0]) // mov cr4, eax
        .mov_imm(EAX, PAGE_DIR)
        .emit(&[0x0f, 0x22, 0xd8]) // mov cr3, eax
        .emit(&[0x0f, 0x20, 0xc0]) // mov eax, cr0
        .or_imm(EAX, 1 << 31) // PG
        .emit(&[0x0f, 0x22, 0xc0]); // mov cr0, eax
    dump_kernel_tail(a)
}

fn dump_kernel_tail(mut a: Asm) -> Vec<u8> {
    a.mov_dx(0x3f8);
    for &b in b"ready\n" {
        a.mov_al(b).out_dx_al();
    }
    for (reg, value) in REGS {
        a.mov_imm(reg, value);
    }
    a.emit(&[0xfa]).hlt_loop();
    Elf32Kernel {
        vaddr: 0x10_0000,
        paddr: 0x10_0000,
        flags: PF_R | PF_W | PF_X,
        bss: 0,
        data_off: 0x400,
        code: &a.finish(),
        data: &[],
    }
    .build()
}

/// A VMM (qomvm or QEMU) running the dump kernel until it is ready, with QMP.
struct Guest {
    vm: ConsoleVm,
    qmp: QmpClient,
}

impl Guest {
    fn start(bin: &str, dir: &Path, tag: &str, accel: &str, extra: &[&str]) -> Guest {
        let socket = dir.join(format!("{tag}.qmp"));
        let kernel = dir.join("kernel.elf");
        let qmp = format!("unix:{},server=on,wait=off", socket.display());
        let mut args = vec![
            "-M",
            "pc",
            "-accel",
            accel,
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-smp",
            "1",
            "-serial",
            "stdio",
            "-kernel",
        ];
        args.push(kernel.to_str().unwrap());
        args.extend(["-qmp", &qmp]);
        args.extend(extra);
        // In `dir`: HMP commands write files there by relative name.
        let mut vm = ConsoleVm::start_in(bin, &args, TIMEOUT, Some(dir));
        vm.wait_until("the guest is ready", |t| t.contains("ready"));
        let qmp = QmpClient::connect(&socket);
        Guest { vm, qmp }
    }

    fn dump(&mut self, path: &Path, args: Value) -> Value {
        let mut args = args;
        args["protocol"] = json!(format!("file:{}", path.display()));
        self.qmp.execute("dump-guest-memory", args)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.vm.child.kill();
    }
}

/// A program header of an ELF64 core file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// An ELF64 core file as far as these tests read it.
struct Core {
    bytes: Vec<u8>,
    class64: bool,
    machine: u16,
    phdrs: Vec<Phdr>,
    /// `(name, type, descriptor)`.
    notes: Vec<(String, u32, Vec<u8>)>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Core {
    fn read(path: &Path) -> Core {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
        assert_eq!(le16(&bytes, 16), 4, "ET_CORE");
        let machine = le16(&bytes, 18);
        let class64 = match bytes[4] {
            1 => false,
            2 => true,
            c => panic!("ELF class {c}"),
        };
        let (phoff, phnum, phentsize) = if class64 {
            (le64(&bytes, 32) as usize, le16(&bytes, 56) as usize, 56)
        } else {
            (le32(&bytes, 28) as usize, le16(&bytes, 44) as usize, 32)
        };
        let phdrs: Vec<Phdr> = (0..phnum)
            .map(|i| {
                let at = phoff + i * phentsize;
                if class64 {
                    Phdr {
                        kind: le32(&bytes, at),
                        offset: le64(&bytes, at + 8),
                        vaddr: le64(&bytes, at + 16),
                        paddr: le64(&bytes, at + 24),
                        filesz: le64(&bytes, at + 32),
                        memsz: le64(&bytes, at + 40),
                    }
                } else {
                    let word = |n: usize| u64::from(le32(&bytes, at + 4 * n));
                    Phdr {
                        kind: le32(&bytes, at),
                        offset: word(1),
                        vaddr: word(2),
                        paddr: word(3),
                        filesz: word(4),
                        memsz: word(5),
                    }
                }
            })
            .collect();
        let note = phdrs.iter().find(|p| p.kind == 4).expect("a PT_NOTE");
        let mut notes = Vec::new();
        let mut at = note.offset as usize;
        let end = at + note.filesz as usize;
        while at < end {
            let (namesz, descsz, kind) = (
                le32(&bytes, at) as usize,
                le32(&bytes, at + 4) as usize,
                le32(&bytes, at + 8),
            );
            let name = String::from_utf8_lossy(&bytes[at + 12..at + 12 + namesz - 1]).into_owned();
            let desc_at = at + 12 + namesz.next_multiple_of(4);
            notes.push((name, kind, bytes[desc_at..desc_at + descsz].to_vec()));
            at = desc_at + descsz.next_multiple_of(4);
        }
        Core {
            bytes,
            class64,
            machine,
            phdrs,
            notes,
        }
    }

    fn loads(&self) -> Vec<Phdr> {
        self.phdrs.iter().copied().filter(|p| p.kind == 1).collect()
    }

    /// `len` bytes at virtual address `vaddr`, from the `PT_LOAD` that maps it.
    fn at_vaddr(&self, vaddr: u64, len: usize) -> &[u8] {
        let p = self
            .loads()
            .into_iter()
            .find(|p| (p.vaddr..p.vaddr + p.filesz).contains(&vaddr))
            .unwrap_or_else(|| panic!("no PT_LOAD holds {vaddr:#x}: {:x?}", self.phdrs));
        let at = (p.offset + vaddr - p.vaddr) as usize;
        &self.bytes[at..at + len]
    }

    /// The i386 `NT_PRSTATUS` registers of the first CPU: EBX, ECX, EDX, ESI, EDI, EBP, EAX.
    fn prstatus_regs(&self) -> [u32; 7] {
        let (_, _, desc) = self
            .notes
            .iter()
            .find(|(n, t, _)| n == "CORE" && *t == 1)
            .expect("an NT_PRSTATUS note");
        assert_eq!(desc.len(), 144, "i386 elf_prstatus");
        assert_eq!(le32(desc, 24), 1, "pr_pid: the CPU index + 1");
        std::array::from_fn(|i| le32(desc, 72 + i * 4))
    }

    /// The first `QEMU` note's CR0 and CR3.
    fn qemu_note_cr0_cr3(&self) -> (u64, u64) {
        let (_, _, desc) = self
            .notes
            .iter()
            .find(|(n, _, _)| n == "QEMU")
            .expect("a QEMU note");
        assert_eq!(le32(desc, 0), 1, "QEMUCPUState version");
        assert_eq!(le32(desc, 4) as usize, desc.len());
        let cr = 8 + 18 * 8 + 10 * 24;
        (le64(desc, cr), le64(desc, cr + 24))
    }
}

/// QEMU's choice of class without paging: ELFCLASS64 in long mode or when memory ends
/// above 4 GiB - 1 (its BIOS does; qomvm's `-kernel` boot has none).
fn check_class(core: &Core, who: &str) {
    let top = core
        .loads()
        .iter()
        .map(|p| p.paddr + p.memsz)
        .max()
        .unwrap_or(0);
    assert_eq!(core.class64, top > u64::from(u32::MAX), "{who}: ELF class");
}

fn check_guest_dump(core: &Core, who: &str) {
    assert_eq!(
        core.machine, 3,
        "{who}: EM_386, the guest is not in long mode"
    );
    let bytes = core.at_vaddr(u64::from(PATTERN), 4 * PATTERN_DWORDS as usize);
    for i in 0..PATTERN_DWORDS {
        assert_eq!(
            le32(bytes, i as usize * 4),
            pattern(i),
            "{who}: pattern dword {i}"
        );
    }
    let expect = [
        0x2222_2222,
        0x3333_3333,
        0x4444_4444,
        0x5555_5555,
        0x6666_6666,
        0x7777_7777,
        0x1111_1111,
    ];
    assert_eq!(
        core.prstatus_regs(),
        expect,
        "{who}: EBX ECX EDX ESI EDI EBP EAX"
    );
    let (cr0, cr3) = core.qemu_note_cr0_cr3();
    assert_eq!(cr0 & 1, 1, "{who}: PE in CR0");
    if guest_paging() {
        assert_eq!(cr0 >> 31, 1, "{who}: PG in CR0");
        assert_eq!(cr3, u64::from(PAGE_DIR), "{who}: CR3");
    }
}

/// The physical ranges the `PT_LOAD`s cover, joined where they touch.
fn covered(core: &Core) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = core
        .loads()
        .iter()
        .map(|p| (p.paddr, p.paddr + p.memsz))
        .collect();
    ranges.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        match joined.last_mut() {
            Some(last) if last.1 == r.0 => last.1 = r.1,
            _ => joined.push(r),
        }
    }
    joined
}

#[test]
fn a_dump_holds_the_guests_memory_and_registers_as_qemus_does() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("guest");
    let mut guest = Guest::start(env!("CARGO_BIN_EXE_qomvm"), &dir, "qomvm", "kvm", &[]);
    let flat = dir.join("qomvm-flat.core");
    assert_eq!(
        guest.dump(&flat, json!({"paging": false})),
        json!({"return": {}})
    );
    let done = guest
        .qmp
        .wait_event("DUMP_COMPLETED", TIMEOUT)
        .expect("DUMP_COMPLETED");
    let result = &done["data"]["result"];
    assert_eq!(result["status"], "completed");
    assert_eq!(result["completed"], result["total"]);
    // The running guest was stopped for the dump and runs again.
    assert!(guest.qmp.wait_event("STOP", TIMEOUT).is_some());
    assert!(guest.qmp.wait_event("RESUME", TIMEOUT).is_some());
    assert_eq!(
        guest.qmp.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    let mode = std::fs::metadata(&flat).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o400,
        "QEMU creates the file for its owner to read"
    );
    let qomvm_flat = Core::read(&flat);
    check_guest_dump(&qomvm_flat, "qomvm");
    check_class(&qomvm_flat, "qomvm");
    let total: u64 = qomvm_flat.loads().iter().map(|p| p.filesz).sum();
    assert_eq!(json!(total), result["total"]);
    // Without paging a load's virtual address is its physical one; with `-kernel` and
    // no firmware the memory is the RAM.
    assert!(qomvm_flat.loads().iter().all(|p| p.vaddr == p.paddr));
    assert_eq!(covered(&qomvm_flat), [(0, 0x400_0000)]);

    // With paging: the guest's 2 MiB pages, joined, its pattern at 0xc0080000 too;
    // without paging on in the guest, the physical layout again.
    let paged = dir.join("qomvm-paged.core");
    assert_eq!(
        guest.dump(&paged, json!({"paging": true})),
        json!({"return": {}})
    );
    let qomvm_paged = Core::read(&paged);
    check_guest_dump(&qomvm_paged, "qomvm, paging");
    let paged_loads: Vec<(u64, u64, u64)> = qomvm_paged
        .loads()
        .iter()
        .map(|p| (p.vaddr, p.paddr, p.memsz))
        .collect();
    if guest_paging() {
        let high = qomvm_paged.at_vaddr(0xc000_0000 + u64::from(PATTERN), 4);
        assert_eq!(le32(high, 0), pattern(0));
        assert_eq!(
            paged_loads,
            [(0xc000_0000, 0, 0x40_0000), (0, 0, 0x40_0000)],
            "one load per run of pages, by physical address (the later one first)"
        );
    } else {
        eprintln!("PVM: the guest runs without paging, so paging=true maps 1:1");
        let flat_loads: Vec<(u64, u64, u64)> = qomvm_flat
            .loads()
            .iter()
            .map(|p| (p.vaddr, p.paddr, p.memsz))
            .collect();
        assert_eq!(paged_loads, flat_loads);
    }
    drop(guest);

    if !qemu_installed() {
        test_support::skip::skip(format!("{QEMU} is not installed: no comparison with QEMU"));
        return;
    }
    let mut qemu = Guest::start(QEMU, &dir, "qemu", "tcg", &[]);
    let qemu_flat_path = dir.join("qemu-flat.core");
    assert_eq!(
        qemu.dump(&qemu_flat_path, json!({"paging": false})),
        json!({"return": {}})
    );
    let qemu_paged_path = dir.join("qemu-paged.core");
    assert_eq!(
        qemu.dump(&qemu_paged_path, json!({"paging": true})),
        json!({"return": {}})
    );
    let qemu_flat = Core::read(&qemu_flat_path);
    let qemu_paged = Core::read(&qemu_paged_path);
    check_guest_dump(&qemu_flat, "QEMU");
    check_class(&qemu_flat, "QEMU");
    check_guest_dump(&qemu_paged, "QEMU, paging");
    // The same memory (QEMU splits RAM around its 0xc0000-0xfffff ROM blocks, which
    // `covered` joins, and maps its BIOS at the top of 4 GiB, which qomvm's `-kernel`
    // boot does without), the same notes in number, names, types and sizes, the same
    // virtual mappings.
    let below_bios = |c: &Core| -> Vec<(u64, u64)> {
        covered(c)
            .into_iter()
            .filter(|r| r.0 < 0xfffc_0000)
            .collect()
    };
    assert_eq!(below_bios(&qomvm_flat), below_bios(&qemu_flat));
    assert_eq!(
        covered(&qemu_flat).last(),
        Some(&(0xfffc_0000, 0x1_0000_0000))
    );
    let shape = |c: &Core| -> Vec<(String, u32, usize)> {
        c.notes
            .iter()
            .map(|(n, t, d)| (n.clone(), *t, d.len()))
            .collect()
    };
    assert_eq!(shape(&qomvm_flat), shape(&qemu_flat));
    // (The bytes each load has in the file follow the blocks: QEMU's first ends at
    // 0xc0000.)
    let mappings = |c: &Core| -> Vec<(u64, u64, u64)> {
        c.loads()
            .iter()
            .map(|p| (p.vaddr, p.paddr, p.memsz))
            .filter(|m| m.1 < 0xfffc_0000)
            .collect()
    };
    assert_eq!(mappings(&qomvm_paged), mappings(&qemu_paged));
}

#[test]
fn a_detached_dump_reports_progress_blocks_migration_and_resumes_the_guest() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("detach");
    let mut guest = Guest::start(
        env!("CARGO_BIN_EXE_qomvm"),
        &dir,
        "qomvm",
        "kvm",
        &["-m", "256"],
    );
    // Into a FIFO the test reads only after its checks: the dump waits on the full pipe,
    // so it is still at work whatever the machine's speed.
    let core = dir.join("dump.fifo");
    let path = std::ffi::CString::new(core.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&core)
        .unwrap();
    assert_eq!(
        guest.dump(&core, json!({"paging": false, "detach": true})),
        json!({"return": {}})
    );
    let progress = guest.qmp.execute("query-dump", json!({}));
    assert_eq!(progress["return"]["status"], "active", "{progress}");
    assert_eq!(
        guest.qmp.execute("query-status", json!({}))["return"]["status"],
        "save-vm"
    );
    assert_eq!(
        guest
            .qmp
            .execute("migrate", json!({"uri": "exec:cat >/dev/null"}))["error"]["desc"],
        "Live migration disabled: dump-guest-memory in progress"
    );
    assert_eq!(
        guest.dump(&dir.join("second.core"), json!({"paging": false}))["error"]["desc"],
        "There is a dump in process, please wait."
    );
    let info = guest.qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info dump"}),
    );
    let text = info["return"].as_str().unwrap().to_string();
    assert!(text.starts_with("Status: active\r\nFinished: "), "{text:?}");
    // Now the dump may go on: drain the pipe until the writer closes it.
    let mut bytes = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "the dump stalled");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("reading the dump: {e}"),
        }
    }
    let done = guest
        .qmp
        .wait_event("DUMP_COMPLETED", TIMEOUT)
        .expect("DUMP_COMPLETED");
    let total = done["data"]["result"]["total"].as_u64().unwrap();
    assert!(total >= 256 << 20, "{done}");
    assert!(
        bytes as u64 > total,
        "headers and {total} bytes of memory, read {bytes}"
    );
    assert_eq!(done["data"]["result"]["completed"].as_u64(), Some(total));
    assert!(guest.qmp.wait_event("RESUME", TIMEOUT).is_some());
    assert_eq!(
        guest.qmp.execute("query-status", json!({}))["return"]["status"],
        "running"
    );
    assert_eq!(
        guest.qmp.execute("query-dump", json!({}))["return"],
        json!({"status": "completed", "completed": total, "total": total})
    );
    // HMP: a file, a range of one page, and `info dump` after.
    let page = dir.join("page.core");
    let reply = guest.qmp.execute(
        "human-monitor-command",
        json!({"command-line": format!("dump-guest-memory {} 0x80000 4096", page.display())}),
    );
    assert_eq!(reply["return"], "");
    let one = Core::read(&page);
    assert_eq!(
        one.loads()
            .iter()
            .map(|p| (p.paddr, p.filesz))
            .collect::<Vec<_>>(),
        [(u64::from(PATTERN), 4096)]
    );
    assert_eq!(le32(one.at_vaddr(u64::from(PATTERN), 4), 0), pattern(0));
    let info = guest.qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info dump"}),
    );
    assert_eq!(info["return"], "Status: completed\r\n");
}

/// Requests QEMU refuses, each with the reply both give (QEMU 7.2 compared where
/// installed).
#[test]
fn bad_dump_requests_get_qemus_errors() {
    let dir = scratch("errors");
    let missing_dir = dir.join("no-such-dir/x.core");
    // A file of its own for each request that may create one: a dump is created for its
    // owner to read only, so a second one into it fails unless run as root.
    let ok = |tag: &str, i: usize| dir.join(format!("{tag}-ok{i}.core"));
    let requests = |tag: &str| {
        [
            json!({"paging": false, "protocol": "tcp:localhost:1"}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 1).display()), "begin": 4096}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 2).display()), "length": 4096}),
            json!({"paging": true, "protocol": format!("file:{}", ok(tag, 3).display()), "format": "kdump-zlib"}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 4).display()), "begin": 0, "length": 4096, "format": "kdump-lzo"}),
            json!({"paging": false, "protocol": "fd:nothing"}),
            json!({"paging": false, "protocol": format!("file:{}", missing_dir.display())}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 5).display()), "begin": 0x2_0000_0000_u64, "length": 4096}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 6).display()), "format": "kdump-lzo"}),
            json!({"paging": false, "protocol": format!("file:{}", ok(tag, 7).display()), "format": "elf", "begin": 0x8_0000, "length": 4096}),
        ]
    };
    let run = |bin: &str, accel: &str| -> Vec<Value> {
        let socket = dir.join(format!("{accel}.qmp"));
        let qmp = format!("unix:{},server=on,wait=off", socket.display());
        let mut child = Command::new(bin)
            .args([
                "-M",
                "pc",
                "-accel",
                accel,
                "-S",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-m", "64", "-qmp", &qmp])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut client = QmpClient::connect(&socket);
        let replies = requests(accel)
            .iter()
            .map(|r| {
                let reply = client.execute("dump-guest-memory", r.clone());
                reply
                    .get("error")
                    .map_or_else(|| json!("ok"), |e| e["desc"].clone())
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        replies
    };
    let ours = run(env!("CARGO_BIN_EXE_qomvm"), "qtest");
    let expected = [
        json!("Invalid parameter 'protocol'"),
        json!("Parameter 'length' is missing"),
        json!("Parameter 'begin' is missing"),
        json!("kdump-compressed format doesn't support paging or filter"),
        json!("kdump-compressed format doesn't support paging or filter"),
        json!("File descriptor named 'nothing' has not been found"),
        json!(format!(
            "Could not open '{}': No such file or directory",
            missing_dir.display()
        )),
        json!("dump: no guest memory to dump"),
        json!("kdump-lzo is not available now"),
        json!("ok"),
    ];
    assert_eq!(ours, expected);
    if !qemu_installed() {
        test_support::skip::skip(format!("{QEMU} is not installed: no comparison with QEMU"));
        return;
    }
    // QEMU writes kdump-zlib; qomvm does not, and says so in QEMU's words for the
    // formats a QEMU build lacks (checked above): the rest must match.
    let qemu = run(QEMU, "tcg");
    for (i, (q, o)) in qemu.iter().zip(&ours).enumerate() {
        if i == 8 {
            continue;
        }
        assert_eq!(q, o, "request {}", requests("qtest")[i]);
    }
}

/// `memsave` reads virtual memory through a CPU's page tables (one to one with paging
/// off), `pmemsave` physical memory; HMP's run through the monitor's current CPU. What
/// each writes, and what each refuses, as QEMU 7.2 does for the same guest.
#[test]
fn memsave_reads_virtual_memory_as_qemus_does() {
    if !kvm_or_skip() {
        return;
    }
    let dir = scratch("memsave");
    let pattern_bytes: Vec<u8> = (0..PATTERN_DWORDS)
        .flat_map(|i| pattern(i).to_le_bytes())
        .collect();
    // Where the pattern is virtually: through the 0xc0000000 mapping, or at its
    // physical address when the guest runs without paging.
    let virt = if guest_paging() {
        0xc000_0000 + u64::from(PATTERN)
    } else {
        u64::from(PATTERN)
    };
    let run = |bin: &str, tag: &str, accel: &str| -> Vec<Value> {
        let mut g = Guest::start(bin, &dir, tag, accel, &[]);
        let file = |name: &str| dir.join(format!("{tag}-{name}")).display().to_string();
        let mut replies = Vec::new();
        let mut call = |name: &str, args: Value| {
            let reply = g.qmp.execute(name, args);
            reply
                .get("error")
                .map_or_else(|| json!("ok"), |e| e["desc"].clone())
        };
        replies.push(call(
            "memsave",
            json!({"val": virt, "size": 4096, "filename": file("v")}),
        ));
        replies.push(call(
            "pmemsave",
            json!({"val": PATTERN, "size": 4096, "filename": file("p")}),
        ));
        replies.push(call(
            "memsave",
            json!({"val": virt, "size": 16, "filename": file("c"), "cpu-index": 3}),
        ));
        // Nothing there: 2 GiB is neither mapped nor memory.
        replies.push(call(
            "memsave",
            json!({"val": 0x8000_0000_u64, "size": 4096, "filename": file("x")}),
        ));
        replies.push(call(
            "memsave",
            json!({"val": virt, "size": 16, "filename": "/nonexistent/dir/f"}),
        ));
        let hmp = g.qmp.execute(
            "human-monitor-command",
            // A relative name: QEMU reads `4096 /path` as a division.
            json!({"command-line": format!("memsave {virt:#x} 4096 {tag}-hv")}),
        );
        replies.push(hmp["return"].clone());
        let hmp = g.qmp.execute(
            "human-monitor-command",
            json!({"command-line": format!("pmemsave {PATTERN:#x} 4096 {tag}-hp")}),
        );
        replies.push(hmp["return"].clone());
        for name in ["v", "p", "hv", "hp"] {
            let bytes = std::fs::read(file(name))
                .unwrap_or_else(|e| panic!("{tag}: {name}: {e}; replies {replies:?}"));
            assert_eq!(bytes, pattern_bytes, "{tag}: {name}");
        }
        replies
    };
    let ours = run(env!("CARGO_BIN_EXE_qomvm"), "qomvm", "kvm");
    let unmapped = format!(
        "Invalid addr 0x{:016x}/size 4096 specified",
        0x8000_0000_u64
    );
    assert_eq!(
        ours,
        [
            json!("ok"),
            json!("ok"),
            json!("Parameter 'cpu-index' expects a CPU number"),
            json!(unmapped),
            json!("Could not open '/nonexistent/dir/f': No such file or directory"),
            json!(""),
            json!(""),
        ]
    );
    if !qemu_installed() {
        test_support::skip::skip(format!("{QEMU} is not installed: no comparison with QEMU"));
        return;
    }
    assert_eq!(run(QEMU, "qemu", "tcg"), ours);
}
