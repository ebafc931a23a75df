//! The direct Linux boot state on real KVM: a fake ELF "kernel" loaded by `load_linux`, with
//! an initrd, a command line and ACPI tables, runs from the 64-bit entry and checks what a
//! kernel relies on (long mode, a stack, RSI pointing at the zero page with "HdrS", the RSDP
//! pointer, the initrd and the command line), then reports through `isa-debug-exit`.
//! Skipped, and the skip reported (`test_support::skip`), where `/dev/kvm` is not usable.

use std::path::PathBuf;

use hw::core::machine::machine_state;
use hw::core::runstate::RunRequest;
use hw::i386::acpi_build::{build_acpi_tables, AcpiConfig};
use hw::i386::e820::pc_e820_table;
use hw::i386::x86_cpu::X86Cpu;
use hw::i386::x86_linux::{load_linux, set_acpi_rsdp_addr};
use test_support::{guest, vm};
use vm::{kvm_unusable, TestVm, EXIT_PORT};

/// A file in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("qomvm-linux-boot-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// 64-bit code: fails (exit 0x7f) unless [rsi+0x70] points at "RSD PTR " and [rsi+0x202]
/// is "HdrS"; else pushes and pops through the boot stack and exits with
/// cmdline[0] + initrd[0].
fn kernel_code() -> Vec<u8> {
    let mut c: Vec<u8> = Vec::new();
    let mut fail_jumps = Vec::new();
    // mov rax, [rsi+0x70]; mov rax, [rax]; mov rdx, "RSD PTR "; cmp rax, rdx; jne fail
    c.extend_from_slice(&[0x48, 0x8b, 0x46, 0x70, 0x48, 0x8b, 0x00, 0x48, 0xba]);
    c.extend_from_slice(b"RSD PTR ");
    c.extend_from_slice(&[0x48, 0x39, 0xd0, 0x75, 0]);
    fail_jumps.push(c.len() - 1);
    // mov eax, [rsi+0x202]; cmp eax, "HdrS"; jne fail
    c.extend_from_slice(&[0x8b, 0x86, 0x02, 0x02, 0, 0, 0x3d]);
    c.extend_from_slice(b"HdrS");
    c.extend_from_slice(&[0x75, 0]);
    fail_jumps.push(c.len() - 1);
    // mov eax, [rsi+0x218] (ramdisk_image); movzx ebx, byte [rax]
    c.extend_from_slice(&[0x8b, 0x86, 0x18, 0x02, 0, 0, 0x0f, 0xb6, 0x18]);
    // movzx ecx, byte [0x20000] (the command line)
    c.extend_from_slice(&[0x0f, 0xb6, 0x0c, 0x25, 0x00, 0x00, 0x02, 0x00]);
    // push rax; pop rax; add ecx, ebx
    c.extend_from_slice(&[0x50, 0x58, 0x01, 0xd9]);
    // mov dx, EXIT_PORT; mov al, cl; out dx, al; hlt
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&EXIT_PORT.to_le_bytes());
    c.extend_from_slice(&[0x88, 0xc8, 0xee, 0xf4]);
    // fail: mov dx, EXIT_PORT; mov al, 0x7f; out dx, al; hlt
    let fail = c.len();
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&EXIT_PORT.to_le_bytes());
    c.extend_from_slice(&[0xb0, 0x7f, 0xee, 0xf4]);
    for at in fail_jumps {
        c[at] = (fail - (at + 1)) as u8;
    }
    c
}

#[test]
fn linux_boot_state_runs_on_kvm() {
    if let Some(reason) = kvm_unusable() {
        test_support::skip::skip_kvm(reason);
        return;
    }
    // A placeholder image: the loader's state replaces its start state.
    let placeholder = guest::build(guest::Mode::Real, &[], EXIT_PORT, 0x55);
    let vm = TestVm::new(&placeholder, 1, "qemu64");
    let ms = machine_state(&vm.machine).unwrap();
    let ram = ms.ram();
    // TestVm has 2 MiB of RAM.
    let e820 = pc_e820_table(2 << 20, 0);
    let kernel = TempFile::new(
        "vmlinux",
        &test_support::elf::elf64_exec(&kernel_code(), 0x10_0000),
    );
    let mut initrd_data = vec![0u8; 4096];
    initrd_data[0] = 0x10;
    let initrd = TempFile::new("initrd", &initrd_data);
    let loaded = load_linux(&ram, &kernel.0, Some(&initrd.0), "A console=ttyS0", &e820).unwrap();
    let state = loaded.state;
    let rsdp = build_acpi_tables(
        &ram,
        &AcpiConfig {
            cpus: 1,
            apic_ids: vec![0],
            pm_io_base: 0x600,
            sci_irq: 9,
            pci_hole: (2 << 20, 0xfec0_0000),
            pci_hole64: (1 << 32, 1 << 32),
            pirq_irqs: [10, 10, 11, 11],
            s3: true,
            s4: Some(2),
            pvpanic_port: None,
            i8042: true,
            rtc: Some((0x70, 8)),
            serial_ports: vec![Some((0x3f8, 4))],
            parallel_ports: Vec::new(),
            fdc: None,
            gpe0_blk: None,
            pci_hotplug: None,
            hpet: None,
        },
    )
    .unwrap();
    set_acpi_rsdp_addr(&ram, loaded.entry, rsdp).unwrap();
    let cpu = &ms.cpus()[0];
    cpu.downcast::<X86Cpu>().unwrap().set_boot_state(state);

    // 'A' + 0x10 = 0x51.
    assert_eq!(vm.run(), Some(RunRequest::DebugExit((0x51 << 1) | 1)));
}
