//! Firmware boot (issue 13): without `-kernel` the pc board maps `-bios` (default:
//! SeaBIOS's `bios-256k.bin`) at the top of 4 GiB and its last 128 KiB below 1 MiB, the
//! BSP starts at the reset vector, and the i440FX's PAM registers switch 0xc0000-0xfffff
//! between that ROM and shadow RAM.
//!
//! - a hand-made 64 KiB ROM walks the PAM modes of the 0xf0000 segment (0: ROM, 2: read
//!   ROM / write RAM while copying itself, 3: RAM, 1: read-only RAM) and prints what it
//!   reads back on COM1;
//! - SeaBIOS prints its banner on the serial console under `-nographic` and reports no
//!   bootable device;
//! - SeaBIOS boots a raw disk on `virtio-blk-pci,bootindex=1` whose MBR prints a marker
//!   and powers off;
//! - bad firmware files and `-kernel` with `-bios` get one-line errors, never a panic.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod firmware;
use firmware::*;

/// A scratch directory `name` holding `image` as a raw disk, and the `-drive` (id `d0`)
/// that opens it.
fn scratch_disk(name: &str, image: Vec<u8>) -> (PathBuf, String) {
    let dir = temp_dir(name);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, image).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    (dir, drive)
}

/// A 64 KiB ROM. The reset vector jumps to f000:0000, the copy of the ROM's start that
/// PAM mode 0 shows at 0xf0000. The code then, for the 0xf0000 segment (PAM register 0x59,
/// high nibble): writes 'X' to f000:0100 and prints the byte read back (the ROM's 'A': the
/// write went to the bus); sets mode 2 and copies its first 512 bytes onto themselves
/// (reads from ROM, writes to RAM); sets mode 3 and writes and prints 'X' (RAM); sets
/// mode 1, writes 'Y' and prints the byte (still 'X': read-only RAM); then powers off
/// through PIIX4's PM1a_CNT (SLP_TYP 0 = S5, SLP_EN). So the console reads "AXX".
fn pam_walk_rom() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0x00, 0xf0,             // 00 mov ax, 0xf000
        0x8e, 0xd8,                   // 03 mov ds, ax
        0x8e, 0xc0,                   // 05 mov es, ax
        0xba, 0xf8, 0x03,             // 07 mov dx, 0x3f8
        0xc6, 0x06, 0x00, 0x01, b'X', // 0a mov byte [0x100], 'X'
        0xa0, 0x00, 0x01,             // 0f mov al, [0x100]
        0xee,                         // 12 out dx, al
        0xb3, 0x20,                   // 13 mov bl, 0x20 (mode 2)
        0xe8, 0x2f, 0x00,             // 15 call setpam
        0x31, 0xf6,                   // 18 xor si, si
        0x31, 0xff,                   // 1a xor di, di
        0xb9, 0x00, 0x02,             // 1c mov cx, 0x200
        0xf3, 0xa4,                   // 1f rep movsb
        0xb3, 0x30,                   // 21 mov bl, 0x30 (mode 3)
        0xe8, 0x21, 0x00,             // 23 call setpam
        0xc6, 0x06, 0x00, 0x01, b'X', // 26 mov byte [0x100], 'X'
        0xa0, 0x00, 0x01,             // 2b mov al, [0x100]
        0xee,                         // 2e out dx, al
        0xb3, 0x10,                   // 2f mov bl, 0x10 (mode 1)
        0xe8, 0x13, 0x00,             // 31 call setpam
        0xc6, 0x06, 0x00, 0x01, b'Y', // 34 mov byte [0x100], 'Y'
        0xa0, 0x00, 0x01,             // 39 mov al, [0x100]
        0xee,                         // 3c out dx, al
        0xba, 0x04, 0x06,             // 3d mov dx, 0x604
        0xb8, 0x00, 0x20,             // 40 mov ax, 0x2000
        0xef,                         // 43 out dx, ax
        0xf4,                         // 44 hlt
        0xeb, 0xfd,                   // 45 jmp 0x44
        // setpam: i440FX (00:00.0) register 0x59 = bl
        0x66, 0xb8, 0x58, 0x00, 0x00, 0x80, // 47 mov eax, 0x80000058
        0xba, 0xf8, 0x0c,             // 4d mov dx, 0xcf8
        0x66, 0xef,                   // 50 out dx, eax
        0xba, 0xfd, 0x0c,             // 52 mov dx, 0xcfd
        0x88, 0xd8,                   // 55 mov al, bl
        0xee,                         // 57 out dx, al
        0xba, 0xf8, 0x03,             // 58 mov dx, 0x3f8
        0xc3,                         // 5b ret
    ];
    let mut rom = vec![0xf4u8; 64 << 10];
    rom[..code.len()].copy_from_slice(code);
    rom[0x100] = b'A';
    // The reset vector (0xfffffff0): jmp far f000:0000.
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    rom
}

#[test]
fn a_rom_sees_the_pam_modes_of_the_bios_segment() {
    if !kvm_or_skip() {
        return;
    }
    let dir = temp_dir("pam");
    let rom = dir.join("pam.bin");
    std::fs::write(&rom, pam_walk_rom()).unwrap();
    let mut vm = start_vm(&[
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-bios",
        rom.to_str().unwrap(),
    ]);
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    assert_eq!(vm.text(), "AXX");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn seabios_prints_its_banner_on_the_serial_console() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let mut vm = start_vm(&FIRMWARE_VM);
    vm.wait_for(&["SeaBIOS (version", "No bootable device."]);
}

/// A 1 MiB raw disk whose MBR is `code` (loaded at 0x7c00) with `data` at its offset and
/// the boot signature.
fn mbr_disk(code: &[u8], data: Option<(usize, &[u8])>) -> Vec<u8> {
    let mut disk = vec![0u8; 1 << 20];
    disk[..code.len()].copy_from_slice(code);
    if let Some((at, bytes)) = data {
        disk[at..at + bytes.len()].copy_from_slice(bytes);
    }
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk
}

/// A boot sector: prints "BOOT-SECTOR-RAN" on COM1, then powers off (PM1a_CNT S5).
fn boot_sector_disk() -> Vec<u8> {
    mbr_disk(
        &test_support::boot_program::print_and_power_off(b"BOOT-SECTOR-RAN\r\n"),
        None,
    )
}

#[test]
fn seabios_boots_a_virtio_blk_disk_through_its_boot_sector() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, drive) = scratch_disk("disk", boot_sector_disk());
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("SeaBIOS (version"), "{text:?}");
    // SeaBIOS's serial console flushes its own "Booting from Hard Disk..." lazily, so
    // the sector's first bytes may interleave with it.
    assert!(text.contains("SECTOR-RAN"), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `bootindex` reaches SeaBIOS as the `bootorder` file: with a blank disk in the first
/// slot, the boot sector on the second one boots only because its bootindex is lower (by
/// slot order SeaBIOS tries the blank one: "Boot failed: not a bootable disk").
#[test]
fn bootindex_orders_the_disks_seabios_tries() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("bootorder");
    let blank = dir.join("blank.img");
    let disk = dir.join("disk.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk, boot_sector_disk()).unwrap();
    let d0 = format!("file={},if=none,id=d0,format=raw", blank.display());
    let d1 = format!("file={},if=none,id=d1,format=raw", disk.display());
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &d0,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=2",
        "-drive",
        &d1,
        "-device",
        "virtio-blk-pci,drive=d1,bootindex=1",
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("SECTOR-RAN"), "{text:?}");
    assert!(!text.contains("Boot failed"), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A disk on virtio-scsi (`scsi-hd` on `virtio-scsi-pci`, as OpenStack's
/// `hw_disk_bus=scsi` images have it) boots through SeaBIOS's virtio-scsi driver, ahead of
/// a blank virtio-blk disk in an earlier slot: its `bootindex` reaches SeaBIOS as the
/// adapter's path and the unit's `channel@0/disk@T,L`.
#[test]
fn seabios_boots_a_scsi_disk_by_its_bootindex() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("scsiboot");
    let blank = dir.join("blank.img");
    let disk = dir.join("disk.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk, boot_sector_disk()).unwrap();
    let d0 = format!("file={},if=none,id=d0,format=raw", blank.display());
    let d1 = format!("file={},if=none,id=d1,format=raw", disk.display());
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &d0,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=2",
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-drive",
        &d1,
        "-device",
        "scsi-hd,bus=scsi0.0,scsi-id=3,lun=0,drive=d1,bootindex=1",
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("SECTOR-RAN"), "{text:?}");
    assert!(!text.contains("Boot failed"), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A disk on a USB stick (`usb-storage` on `-usb`'s UHCI, as installer images are
/// attached): SeaBIOS's UHCI and mass storage drivers find it, read its boot sector over
/// the Bulk-Only Transport and run it, ahead of a blank virtio-blk disk in an earlier
/// slot: its `bootindex` reaches SeaBIOS as `usb@1,2/storage@1/channel@0/disk@0,0`.
#[test]
fn seabios_boots_a_usb_storage_disk_by_its_bootindex() {
    usb_stick_boots("usbboot", &["-device", "usb-storage,drive=u0,bootindex=1"]);
}

/// The same stick behind a `usb-hub` (port "1.2"): SeaBIOS's hub driver enables the port,
/// and the boot order names it `usb@1,2/hub@1/storage@2/...`.
#[test]
fn seabios_boots_a_usb_storage_disk_behind_a_hub() {
    usb_stick_boots(
        "usbhubboot",
        &[
            "-device",
            "usb-hub,port=1",
            "-device",
            "usb-storage,drive=u0,port=1.2,bootindex=1",
        ],
    );
}

/// The stick on `qemu-xhci`: SeaBIOS's xHCI driver addresses it, configures its bulk
/// endpoints and reads the boot sector through transfer rings; the boot order names it
/// under the controller's slot (`usb@N/storage@1/...`).
#[test]
fn seabios_boots_a_usb_storage_disk_on_xhci() {
    usb_stick_boots(
        "xhciboot",
        &[
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "usb-storage,bus=xhci.0,drive=u0,bootindex=1",
        ],
    );
}

/// Boots the boot sector disk as drive `u0` of `usb` devices, a blank virtio-blk disk
/// with a later boot index beside it.
fn usb_stick_boots(name: &str, usb: &[&str]) {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir(name);
    let blank = dir.join("blank.img");
    let disk = dir.join("disk.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk, boot_sector_disk()).unwrap();
    let d0 = format!("file={},if=none,id=d0,format=raw", blank.display());
    let u0 = format!("file={},if=none,id=u0,format=raw", disk.display());
    let mut args = vec![
        "-drive",
        &d0,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=2",
        "-usb",
        "-drive",
        &u0,
    ];
    args.extend_from_slice(usb);
    let mut vm = start_vm(&firmware_vm(&args));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("SECTOR-RAN"), "{text:?}");
    assert!(
        !text.contains("Boot failed"),
        "the USB disk came first: {text:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// SeaBIOS times its floppy commands out after 37 PIT ticks (its motor counter, counted
/// down by IRQ 0). On PVM, real-mode code runs through KVM's emulator; on a loaded host
/// the in-kernel PIT then re-injects a backlog of ticks (QEMU's default policy, `delay`)
/// that ends the count before IRQ 6 is served, and SeaBIOS gives up on a floppy that did
/// answer. Dropping missed ticks, as libvirt's `tickpolicy='discard'` does, keeps the
/// count in wall-clock time.
const FLOPPY_PIT: &str = "kvm-pit.lost_tick_policy=discard";

/// SeaBIOS boots `-fda` by the CMOS boot order (`-boot a`): its floppy driver resets
/// the controller, senses the medium's data rate with READ ID, and reads through ISA
/// DMA channel 2 (the i8257), 17 sectors at once for the boot sector's INT 13h.
#[test]
fn seabios_boots_a_floppy_and_reads_a_track_through_dma() {
    floppy_boots(
        "floppy",
        test_support::boot_program::floppy_loader_image(),
        "FLOPPY-READ-OK",
    );
}

/// Boots `image` as `-fda` by the CMOS boot order and waits for `marker` and power-off.
fn floppy_boots(name: &str, image: Vec<u8>, marker: &str) {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir(name);
    let floppy = dir.join("floppy.img");
    std::fs::write(&floppy, image).unwrap();
    let floppy = floppy.display().to_string();
    let mut vm = start_vm(&firmware_vm(&[
        "-fda", &floppy, "-boot", "a", "-global", FLOPPY_PIT,
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("Booting from Floppy"), "{text:?}");
    assert!(text.contains(marker), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A guest reads a floppy sector without DMA (the controller's FIFO, polled on MSR): on
/// KVM its reads come from a vCPU thread, which may not touch the image itself.
#[test]
fn a_boot_sector_reads_a_floppy_sector_without_dma() {
    floppy_boots(
        "floppy-pio",
        test_support::boot_program::floppy_pio_image(),
        "FLOPPY-PIO-OK",
    );
}

/// `isa-fdc`'s `bootindexA` reaches SeaBIOS's `bootorder` as
/// `/pci@i0cf8/isa@1/fdc@03f0/floppy@0`: the floppy boots before a blank disk with a
/// higher bootindex (and CMOS's "cad" would try the disk first).
#[test]
fn a_floppy_boots_first_by_the_controllers_bootindex() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("floppy-bootindex");
    let floppy = dir.join("floppy.img");
    let blank = dir.join("blank.img");
    std::fs::write(&floppy, test_support::boot_program::floppy_loader_image()).unwrap();
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let fd = format!("file={},if=floppy,format=raw", floppy.display());
    let d0 = format!("file={},if=none,id=d0,format=raw", blank.display());
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &d0,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=2",
        "-drive",
        &fd,
        "-global",
        "isa-fdc.bootindexA=1",
        "-global",
        FLOPPY_PIT,
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("FLOPPY-READ-OK"), "{text:?}");
    assert!(
        !text.contains("Boot failed"),
        "the floppy came first: {text:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `-boot strict=on` ends `bootorder` with `HALT`: SeaBIOS tries only the bootindex
/// devices (the blank disk), not its floppy default as well.
#[test]
fn boot_strict_limits_seabios_to_the_bootindex_devices() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("strict");
    let blank = dir.join("blank.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let d0 = format!("file={},if=none,id=d0,format=raw", blank.display());
    for (strict, floppy) in [("off", true), ("on", false)] {
        let boot = format!("strict={strict}");
        let mut vm = start_vm(&firmware_vm(&[
            "-boot",
            &boot,
            "-drive",
            &d0,
            "-device",
            "virtio-blk-pci,drive=d0,bootindex=1",
        ]));
        vm.wait_for(&["Boot failed: not a bootable disk", "No bootable device."]);
        let text = vm.text();
        assert_eq!(
            text.contains("Booting from Floppy"),
            floppy,
            "strict={strict}: {text:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A boot sector that prints "R" on COM1 and resets the machine through port 0xcf9.
fn reboot_disk() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xba, 0xf8, 0x03, // 00 mov dx, 0x3f8
        0xb0, b'R',       // 03 mov al, 'R'
        0xee,             // 05 out dx, al
        0xba, 0xf9, 0x0c, // 06 mov dx, 0xcf9
        0xb0, 0x06,       // 09 mov al, 6 (full reset)
        0xee,             // 0b out dx, al
        0xf4,             // 0c hlt
        0xeb, 0xfd,       // 0d jmp 0x0c
    ];
    mbr_disk(code, None)
}

/// A guest reset goes through the firmware again (SeaBIOS's reboot path, which restores
/// its shadow copy through the PAM and resets once more, then its POST), and `-no-reboot`
/// turns the guest's reset into an exit with status 0.
#[test]
fn guest_reset_reenters_the_firmware() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, drive) = scratch_disk("reboot", reboot_disk());
    let base = firmware_vm(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
    ]);
    let mut vm = start_vm(&base);
    let start = Instant::now();
    while vm.text().matches("SeaBIOS (version").count() < 2 {
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no second boot within {BOOT_TIMEOUT:?}; console: {:?}",
            vm.text()
        );
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "qomvm exited; console: {:?}",
            vm.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(vm.text().contains('R'), "{:?}", vm.text());
    drop(vm);

    let mut args = base.clone();
    args.push("-no-reboot");
    let mut vm = start_vm(&args);
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    assert_eq!(
        vm.text().matches("SeaBIOS (version").count(),
        1,
        "{:?}",
        vm.text()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A boot sector that scans 0xe0000-0xfffff in 16-byte steps for "RSD PTR ", prints the
/// RSDP's OEM ID (6 bytes at offset 9) on COM1 if it finds one, then powers off.
fn rsdp_scan_disk() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xba, 0xf8, 0x03,             // 00 mov dx, 0x3f8
        0xbb, 0x00, 0xe0,             // 03 mov bx, 0xe000
        0x8e, 0xc3,                   // 06 mov es, bx
        0x26, 0x66, 0x81, 0x3e, 0x00, 0x00, b'R', b'S', b'D', b' ', // 08 cmp dword es:[0], "RSD "
        0x75, 0x0c,                   // 12 jne 0x20
        0x26, 0x66, 0x81, 0x3e, 0x04, 0x00, b'P', b'T', b'R', b' ', // 14 cmp dword es:[4], "PTR "
        0x74, 0x05,                   // 1e je 0x25
        0x43,                         // 20 inc bx
        0x75, 0xe3,                   // 21 jnz 0x06 (until bx wraps past 0xffff)
        0xeb, 0x0c,                   // 23 jmp 0x31
        0xbe, 0x09, 0x00,             // 25 mov si, 9
        0xb9, 0x06, 0x00,             // 28 mov cx, 6
        0x26, 0xac,                   // 2b lodsb (es:si)
        0xee,                         // 2d out dx, al
        0xe2, 0xfb,                   // 2e loop 0x2b
        0x90,                         // 30 nop
        0xba, 0x04, 0x06,             // 31 mov dx, 0x604
        0xb8, 0x00, 0x20,             // 34 mov ax, 0x2000
        0xef,                         // 37 out dx, ax
        0xf4,                         // 38 hlt
        0xeb, 0xfd,                   // 39 jmp 0x38
    ];
    mbr_disk(code, None)
}

/// The RSDP SeaBIOS leaves in the F segment is qomvm's (OEM "QOMVM "), placed through
/// `etc/table-loader`, not the "BOCHS " tables SeaBIOS builds itself without one.
#[test]
fn seabios_places_qomvms_acpi_tables_through_the_loader() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, drive) = scratch_disk("rsdp", rsdp_scan_disk());
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    // SeaBIOS's console may flush the end of "Booting from Hard Disk...\r\n" into the
    // sector's output.
    let text = vm.text().replace(['.', '\r', '\n'], "");
    assert!(text.ends_with("Booting from Hard DiskQOMVM "), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Firmware files the ROM cannot hold fail before any guest code runs: no KVM needed.
#[test]
fn bad_firmware_files_get_one_line_errors() {
    let dir = temp_dir("bad");
    let cases: [(&str, u64, &str); 3] = [
        ("empty.bin", 0, "the file is empty"),
        (
            "truncated.bin",
            (256 << 10) - 4096,
            "is not a multiple of 64 KiB",
        ),
        ("huge.bin", 17 << 20, "larger than the 16 MiB ROM window"),
    ];
    for (name, size, why) in cases {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        let (status, err) = qtest_pc(&["-bios", path.to_str().unwrap()]);
        assert_eq!(status, Some(1), "{name}: {err}");
        assert!(
            err.starts_with(&format!(
                "qomvm: could not load PC BIOS '{}': ",
                path.display()
            )),
            "{name}: {err}"
        );
        assert!(err.contains(why), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
    }
    let missing = dir.join("missing.bin");
    let (status, err) = qtest_pc(&["-bios", missing.to_str().unwrap()]);
    assert_eq!(status, Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "qomvm: could not load PC BIOS '{}': No such file or directory\n",
            missing.display()
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kernel_with_bios_is_refused() {
    let (status, err) = qtest_pc(&["-bios", "bios-256k.bin", "-kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(status, Some(1));
    assert_eq!(err, "qomvm: -kernel with -bios is not supported yet\n");
}

/// A boot sector that prints "#" and CMOS byte 0x3d (the first two boot devices) as two
/// letters ('A' + nibble, high first) on COM1, then resets the machine through 0xcf9.
fn cmos_boot_order_disk() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb0, b'#',       // 00 mov al, '#'
        0xba, 0xf8, 0x03, // 02 mov dx, 0x3f8
        0xee,             // 05 out dx, al
        0xb0, 0x3d,       // 06 mov al, 0x3d
        0xe6, 0x70,       // 08 out 0x70, al
        0xe4, 0x71,       // 0a in al, 0x71
        0x88, 0xc4,       // 0c mov ah, al
        0xc0, 0xe8, 0x04, // 0e shr al, 4
        0x04, b'A',       // 11 add al, 'A'
        0xee,             // 13 out dx, al
        0x88, 0xe0,       // 14 mov al, ah
        0x24, 0x0f,       // 16 and al, 0xf
        0x04, b'A',       // 18 add al, 'A'
        0xee,             // 1a out dx, al
        0xb0, b'\n',      // 1b mov al, '\n'
        0xee,             // 1d out dx, al
        0xba, 0xf9, 0x0c, // 1e mov dx, 0xcf9
        0xb0, 0x06,       // 21 mov al, 6 (full reset)
        0xee,             // 23 out dx, al
        0xf4,             // 24 hlt
        0xeb, 0xfd,       // 25 jmp 0x24
    ];
    mbr_disk(code, None)
}

/// `-boot once=a,order=d`: the first boot sees floppy first in the CMOS (0x3d = 0x01,
/// "#AB"), and after the guest's reset the order is back to `order=` (CD-ROM, 0x03,
/// "#AD"), as QEMU's `restore_boot_order` does.
#[test]
fn boot_once_lasts_until_the_first_reset() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, drive) = scratch_disk("once", cmos_boot_order_disk());
    let vm = start_vm(&firmware_vm(&[
        "-boot",
        "once=a,order=d",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
    ]));
    // What each boot printed: SeaBIOS flushes the end of "Booting from Hard Disk...\r\n"
    // lazily, so its dots and line end may follow the '#'.
    let boots = |text: &str| -> Vec<String> {
        text.split('#')
            .skip(1)
            .map(|b| {
                b.chars()
                    .filter(|c| ('A'..='P').contains(c))
                    .take(2)
                    .collect()
            })
            .filter(|b: &String| b.len() == 2)
            .collect()
    };
    let start = Instant::now();
    while boots(&vm.text()).len() < 2 {
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "no second boot within {BOOT_TIMEOUT:?}; console: {:?}",
            vm.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = vm.text();
    assert_eq!(boots(&text)[..2], ["AB", "AD"], "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `menu=on` makes SeaBIOS offer its menu (waiting `splash-time` ms), `reboot-timeout`
/// makes it reboot when nothing boots (which `-no-reboot` turns into an exit); without
/// them it neither offers a menu nor reboots.
#[test]
fn boot_menu_and_reboot_timeout_reach_seabios() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let mut vm = start_vm(&firmware_vm(&[
        "-boot",
        "menu=on,splash-time=100,reboot-timeout=0",
        "-no-reboot",
    ]));
    assert_eq!(vm.wait_exit(), Some(0), "console: {:?}", vm.text());
    let text = vm.text();
    assert!(text.contains("Press ESC for boot menu."), "{text:?}");
    assert!(
        text.contains("No bootable device.  Retrying in 0 seconds."),
        "{text:?}"
    );
    let mut vm = start_vm(&FIRMWARE_VM);
    vm.wait_for(&["No bootable device."]);
    assert!(!vm.text().contains("Press ESC"), "{:?}", vm.text());
    assert!(!vm.text().contains("Retrying"), "{:?}", vm.text());
}

/// `-boot`'s values get QEMU's one-line errors.
#[test]
fn bad_boot_options_get_qemus_errors() {
    for (boot, error) in [
        ("order=z", "Invalid boot device 'z'"),
        ("order=cc", "Boot device 'c' was given twice"),
        ("order=abcd", "Too many boot devices for PC"),
        ("once=e", "Invalid boot device for PC: 'e'"),
        (
            "splash-time=70000",
            "splash-time is invalid,it should be a value between 0 and 65535",
        ),
        (
            "reboot-timeout=-2",
            "reboot timeout is invalid,it should be a value between -1 and 65535",
        ),
        (
            "reboot-timeout=abc",
            "Parameter 'boot.reboot-timeout' expects integer",
        ),
        ("menu=maybe", "Parameter 'boot.menu' expects 'on' or 'off'"),
        ("foo=1", "Parameter 'boot.foo' is unexpected"),
    ] {
        let (status, err) = qtest_pc(&["-boot", boot]);
        assert_eq!(status, Some(1), "-boot {boot}");
        assert_eq!(err, format!("qomvm: {error}\n"), "-boot {boot}");
    }
}

/// A boot sector that prints "PARKED" on COM1 and halts with interrupts off, leaving
/// memory as the firmware left it.
fn parked_disk() -> Vec<u8> {
    mbr_disk(
        &test_support::boot_program::print_and_park(b"PARKED\r\n"),
        None,
    )
}

/// SeaBIOS installs qomvm's SMBIOS tables (`etc/smbios/*`): the guest finds the anchor in
/// the F segment, the UUID and strings `-uuid`/`-smbios` gave, and the type 0 structure
/// SeaBIOS adds itself when the tables have none.
#[test]
fn seabios_installs_the_smbios_tables_from_fw_cfg() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, drive) = scratch_disk("smbios", parked_disk());
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let uuid = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
    let mut vm = start_vm(&firmware_vm(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
        "-uuid",
        uuid,
        "-smbios",
        "type=1,serial=FW-SERIAL",
        "-smbios",
        "type=11,value=qomvm.reboot=once",
        "-qmp",
        &qmp_arg,
    ]));
    // SeaBIOS's serial console may still flush "Booting from Hard Disk..." into it.
    vm.wait_for(&["ARKED"]);
    let mut qmp = test_support::qmp::QmpClient::connect(&sock);
    let segment = qmp.read_guest(&dir, 0xf0000, 0x10000);
    let (_, addr, len, count) =
        test_support::smbios::find_anchor(&segment).expect("SeaBIOS's _SM_ anchor");
    let tables = test_support::smbios::structures(&qmp.read_guest(&dir, addr.into(), len.into()));
    assert_eq!(tables.len(), usize::from(count));
    let t0 = tables.iter().find(|s| s.ty == 0).expect("SeaBIOS's type 0");
    assert_eq!(t0.string_at(4), Some("SeaBIOS"));
    let t1 = tables.iter().find(|s| s.ty == 1).expect("a type 1");
    assert_eq!(t1.string_at(4), Some("QEMU"));
    assert_eq!(t1.string_at(7), Some("FW-SERIAL"));
    assert_eq!(test_support::smbios::uuid_text(&t1.formatted[8..24]), uuid);
    let t11 = tables.iter().find(|s| s.ty == 11).expect("a type 11");
    assert_eq!(t11.strings, ["qomvm.reboot=once"]);
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}
