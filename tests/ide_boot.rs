//! IDE on the pc board, end to end through SeaBIOS: the `piix3-ide` function at 00:01.1
//! (legacy ports 0x1f0/0x3f6 and 0x170/0x376), its buses `ide.0` and `ide.1`, `ide-hd` and
//! `ide-cd`, and QEMU's command line forms for them (`-hda`, `-cdrom`, `-drive if=ide`,
//! `-drive media=cdrom`, `-device ide-hd/ide-cd,drive=`, `bootindex`, `-boot`).
//!
//! The guests are hand-assembled boot sectors that talk to SeaBIOS's INT 13h, print on COM1
//! (polling the LSR's THRE bit before each byte) and power off through PIIX4's PM1a_CNT:
//!
//! - a disk whose boot sector reads a sector far beyond what CHS can address (LBA
//!   0x1234567, past 8 GiB, so SeaBIOS must program the device's 28-bit LBA with its top
//!   nibble in the device register) with INT 13h AH=42h, as `-hda` and on the secondary
//!   channel;
//! - a disk whose boot sector writes a pattern beyond LBA 2^28 with AH=43h (SeaBIOS then
//!   uses the LBA48 commands), reads it back with AH=42h and compares; the test then finds
//!   the pattern in the image file;
//! - an El Torito CD (ISO 9660 built here, no emulation) whose boot image reads a 2048-byte
//!   sector of the CD with AH=42h on the drive number SeaBIOS passed (0xE0), as
//!   `-drive media=cdrom`, as `-cdrom` and as `-device ide-cd` with a bootindex that puts
//!   it before a bootable disk;
//! - `-boot order=c` and `-boot d` choosing between a disk and a CD;
//! - bad IDE configurations get QEMU's one-line errors (on qtest: nothing runs).
//!
//! The images are sparse files: a 128 GiB disk costs a few blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod firmware;
use firmware::*;

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// Boots `extra` on [`FIRMWARE_VM`] until the guest powers off; returns the console.
fn boot_to_poweroff(extra: &[&str]) -> String {
    let mut vm = start_vm(&firmware_vm(extra));
    assert_eq!(
        vm.wait_exit(),
        Some(0),
        "{extra:?}: console: {:?}",
        vm.text()
    );
    vm.text()
}

const SECTOR: u64 = 512;
const CD_SECTOR: u64 = 2048;

/// Creates `path` as a sparse image of `blocks` blocks of `block_size` bytes holding
/// `contents` (block number, bytes); the rest reads as zeros.
fn sparse_image(path: &Path, block_size: u64, blocks: u64, contents: &[(u64, &[u8])]) {
    let file = File::create(path).unwrap();
    file.set_len(blocks * block_size).unwrap();
    for (block, bytes) in contents {
        file.write_all_at(bytes, block * block_size).unwrap();
    }
}

/// A boot sector for disks and for a CD's no-emulation boot image (both load at 0x7c00;
/// the code uses relative jumps and DS=0 data only, so SeaBIOS's CS does not matter). It
/// reads one block at `lba` of the boot drive (DL as SeaBIOS passed it) into 0000:9000
/// with INT 13h AH=42h; then, with interrupts off (so that SeaBIOS's serial console cannot
/// flush its own output into the middle), prints `prefix`, DL in hex and the NUL-terminated
/// string the block starts with, or " READ-FAILED AH=" and INT 13h's status in hex; then
/// powers off.
fn read_boot_sector(prefix: &str, lba: u64) -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xfc,                         // 00 cld
        0x31, 0xc0,                   // 01 xor ax, ax
        0x8e, 0xd8,                   // 03 mov ds, ax
        0x8e, 0xc0,                   // 05 mov es, ax
        0x8e, 0xd0,                   // 07 mov ss, ax
        0xbc, 0x00, 0x7c,             // 09 mov sp, 0x7c00
        0x88, 0x16, 0x80, 0x7c,       // 0c mov [0x7c80], dl (the boot drive)
        0xbe, 0x88, 0x7c,             // 10 mov si, 0x7c88 (the disk address packet)
        0xb4, 0x42,                   // 13 mov ah, 0x42 (extended read)
        0xcd, 0x13,                   // 15 int 0x13
        0xfa,                         // 17 cli
        0x88, 0x26, 0x81, 0x7c,       // 18 mov [0x7c81], ah (the status)
        0x72, 0x0b,                   // 1c jc 0x29
        0xe8, 0x21, 0x00,             // 1e call header
        0xbe, 0x00, 0x90,             // 21 mov si, 0x9000 (the block read)
        0xe8, 0x26, 0x00,             // 24 call puts
        0xeb, 0x0f,                   // 27 jmp 0x38
        0xe8, 0x16, 0x00,             // 29 call header
        0xbe, 0x98, 0x7c,             // 2c mov si, 0x7c98 (" READ-FAILED AH=")
        0xe8, 0x1b, 0x00,             // 2f call puts
        0xa0, 0x81, 0x7c,             // 32 mov al, [0x7c81]
        0xe8, 0x31, 0x00,             // 35 call puthex
        0xba, 0x04, 0x06,             // 38 mov dx, 0x604 (PM1a_CNT)
        0xb8, 0x00, 0x20,             // 3b mov ax, 0x2000 (SLP_EN, S5)
        0xef,                         // 3e out dx, ax
        0xf4,                         // 3f hlt
        0xeb, 0xfd,                   // 40 jmp 0x3f
        // header: the prefix, then DL in hex
        0xbe, 0xb0, 0x7c,             // 42 mov si, 0x7cb0 (the prefix)
        0xe8, 0x05, 0x00,             // 45 call puts
        0xa0, 0x80, 0x7c,             // 48 mov al, [0x7c80]
        0xeb, 0x1c,                   // 4b jmp puthex
        // puts: prints the NUL-terminated string at ds:si
        0xac,                         // 4d lodsb
        0x84, 0xc0,                   // 4e test al, al
        0x74, 0x05,                   // 50 jz 0x57
        0xe8, 0x03, 0x00,             // 52 call putc
        0xeb, 0xf6,                   // 55 jmp puts
        0xc3,                         // 57 ret
        // putc: prints al once COM1's transmitter holding register is empty
        0x52,                         // 58 push dx
        0x50,                         // 59 push ax
        0xba, 0xfd, 0x03,             // 5a mov dx, 0x3fd (LSR)
        0xec,                         // 5d in al, dx
        0xa8, 0x20,                   // 5e test al, 0x20 (THRE)
        0x74, 0xfb,                   // 60 jz 0x5d
        0x58,                         // 62 pop ax
        0xba, 0xf8, 0x03,             // 63 mov dx, 0x3f8
        0xee,                         // 66 out dx, al
        0x5a,                         // 67 pop dx
        0xc3,                         // 68 ret
        // puthex: prints al as two hex digits
        0x50,                         // 69 push ax
        0xc0, 0xe8, 0x04,             // 6a shr al, 4
        0xe8, 0x03, 0x00,             // 6d call nibble
        0x58,                         // 70 pop ax
        0x24, 0x0f,                   // 71 and al, 0xf
        // nibble: prints the hex digit for al (0-15)
        0x04, 0x30,                   // 73 add al, '0'
        0x3c, 0x39,                   // 75 cmp al, '9'
        0x76, 0xdf,                   // 77 jbe putc
        0x04, 0x07,                   // 79 add al, 'A' - '9' - 1
        0xeb, 0xdb,                   // 7b jmp putc
    ];
    let mut sector = vec![0u8; 512];
    sector[..code.len()].copy_from_slice(code);
    // 0x80: the boot drive, 0x81: INT 13h's status (both written by the code).
    sector[0x88..0x98].copy_from_slice(&disk_address_packet(0x9000, lba));
    put_cstr(&mut sector, 0x98, " READ-FAILED AH=");
    put_cstr(&mut sector, 0xb0, prefix);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

/// INT 13h AH=42h/43h's disk address packet: 16 bytes, one block, buffer 0000:`buffer`,
/// 64-bit LBA.
fn disk_address_packet(buffer: u16, lba: u64) -> [u8; 16] {
    let mut dap = [0u8; 16];
    dap[0] = 0x10;
    dap[2..4].copy_from_slice(&1u16.to_le_bytes());
    dap[4..6].copy_from_slice(&buffer.to_le_bytes());
    // Segment 0.
    dap[8..16].copy_from_slice(&lba.to_le_bytes());
    dap
}

/// Writes `text` and a NUL at `at`.
fn put_cstr(buf: &mut [u8], at: usize, text: &str) {
    buf[at..at + text.len()].copy_from_slice(text.as_bytes());
    buf[at + text.len()] = 0;
}

/// What a block read by [`read_boot_sector`] holds (and what the console then shows after
/// the prefix and DL): a NUL-terminated marker naming the block.
fn block_marker(what: &str) -> Vec<u8> {
    let mut block = format!(" READ-{what}-OK\r\n").into_bytes();
    block.push(0);
    block
}

/// The far block of the read disk: 0x1234567 is past 1024 cylinders x 255 heads x 63
/// sectors (8 GiB), out of CHS's reach, and sets the device register's LBA nibble (1).
const FAR_LBA: u64 = 0x0123_4567;

/// The console line of a read disk's boot (DL 0x80: the first hard disk).
const FAR_READ_LINE: &str = "HD-BOOTED DL=80 READ-LBA-01234567-OK";

/// A sparse raw disk (a little over 9 GiB) whose boot sector reads [`FAR_LBA`].
fn far_read_disk(path: &Path) {
    let boot = read_boot_sector("HD-BOOTED DL=", FAR_LBA);
    let data = block_marker("LBA-01234567");
    sparse_image(
        path,
        SECTOR,
        FAR_LBA + 2048,
        &[(0, &boot), (FAR_LBA, &data)],
    );
}

/// Where the write disk's boot sector writes: past 2^28, so SeaBIOS issues WRITE SECTORS
/// EXT and READ SECTORS EXT (or their DMA forms) with the high LBA bytes in the HOB.
const WRITE_LBA: u64 = 0x1000_0800;

/// The 512 bytes the write disk's boot sector writes: byte i is 3i + 0x11 (mod 256),
/// inverted in the second half so that a transfer that swaps the halves shows.
fn write_pattern() -> Vec<u8> {
    (0..512u32)
        .map(|i| {
            let b = (i * 3 + 0x11) as u8;
            if i >= 256 {
                !b
            } else {
                b
            }
        })
        .collect()
}

/// A boot sector that fills 0000:8000 with [`write_pattern`] and zeroes 0000:8200, writes
/// the pattern to [`WRITE_LBA`] with INT 13h AH=43h, reads that block back into 0000:8200
/// with AH=42h and compares; with interrupts off it prints "WRITE-READBACK-OK",
/// "WRITE-READBACK-MISMATCH" or which call failed and its status, then powers off.
fn write_boot_sector() -> Vec<u8> {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xfc,                         // 00 cld
        0x31, 0xc0,                   // 01 xor ax, ax
        0x8e, 0xd8,                   // 03 mov ds, ax
        0x8e, 0xc0,                   // 05 mov es, ax
        0x8e, 0xd0,                   // 07 mov ss, ax
        0xbc, 0x00, 0x7c,             // 09 mov sp, 0x7c00
        0x88, 0x16, 0xc0, 0x7c,       // 0c mov [0x7cc0], dl (the boot drive)
        0xbf, 0x00, 0x80,             // 10 mov di, 0x8000
        0x31, 0xdb,                   // 13 xor bx, bx (i)
        0x88, 0xd8,                   // 15 mov al, bl
        0x00, 0xd8,                   // 17 add al, bl
        0x00, 0xd8,                   // 19 add al, bl
        0x04, 0x11,                   // 1b add al, 0x11
        0xf6, 0xc7, 0x01,             // 1d test bh, 1 (the second half?)
        0x74, 0x02,                   // 20 jz 0x24
        0xf6, 0xd0,                   // 22 not al
        0xaa,                         // 24 stosb
        0x43,                         // 25 inc bx
        0x81, 0xfb, 0x00, 0x02,       // 26 cmp bx, 512
        0x75, 0xe9,                   // 2a jne 0x15
        0xb9, 0x00, 0x01,             // 2c mov cx, 256
        0x31, 0xc0,                   // 2f xor ax, ax
        0xf3, 0xab,                   // 31 rep stosw (zeroes 0x8200-0x83ff)
        0xbe, 0xc8, 0x7c,             // 33 mov si, 0x7cc8 (the write packet)
        0x8a, 0x16, 0xc0, 0x7c,       // 36 mov dl, [0x7cc0]
        0xb8, 0x00, 0x43,             // 3a mov ax, 0x4300 (extended write, no verify)
        0xcd, 0x13,                   // 3d int 0x13
        0xbe, 0xe8, 0x7c,             // 3f mov si, 0x7ce8 ("INT13-43-FAILED AH=")
        0x72, 0x2a,                   // 42 jc 0x6e
        0xbe, 0xd8, 0x7c,             // 44 mov si, 0x7cd8 (the read packet)
        0x8a, 0x16, 0xc0, 0x7c,       // 47 mov dl, [0x7cc0]
        0xb4, 0x42,                   // 4b mov ah, 0x42 (extended read)
        0xcd, 0x13,                   // 4d int 0x13
        0xbe, 0x00, 0x7d,             // 4f mov si, 0x7d00 ("INT13-42-FAILED AH=")
        0x72, 0x1a,                   // 52 jc 0x6e
        0xfa,                         // 54 cli
        0xbe, 0x00, 0x80,             // 55 mov si, 0x8000
        0xbf, 0x00, 0x82,             // 58 mov di, 0x8200
        0xb9, 0x00, 0x01,             // 5b mov cx, 256
        0xf3, 0xa7,                   // 5e repe cmpsw
        0xbe, 0x30, 0x7d,             // 60 mov si, 0x7d30 ("WRITE-READBACK-MISMATCH")
        0x75, 0x03,                   // 63 jne 0x68
        0xbe, 0x18, 0x7d,             // 65 mov si, 0x7d18 ("WRITE-READBACK-OK")
        0xfa,                         // 68 cli
        0xe8, 0x1a, 0x00,             // 69 call puts
        0xeb, 0x0e,                   // 6c jmp 0x7c
        0xfa,                         // 6e cli
        0x88, 0x26, 0xc1, 0x7c,       // 6f mov [0x7cc1], ah (the status)
        0xe8, 0x10, 0x00,             // 73 call puts
        0xa0, 0xc1, 0x7c,             // 76 mov al, [0x7cc1]
        0xe8, 0x26, 0x00,             // 79 call puthex
        0xba, 0x04, 0x06,             // 7c mov dx, 0x604 (PM1a_CNT)
        0xb8, 0x00, 0x20,             // 7f mov ax, 0x2000 (SLP_EN, S5)
        0xef,                         // 82 out dx, ax
        0xf4,                         // 83 hlt
        0xeb, 0xfd,                   // 84 jmp 0x83
        // puts: prints the NUL-terminated string at ds:si
        0xac,                         // 86 lodsb
        0x84, 0xc0,                   // 87 test al, al
        0x74, 0x05,                   // 89 jz 0x90
        0xe8, 0x03, 0x00,             // 8b call putc
        0xeb, 0xf6,                   // 8e jmp puts
        0xc3,                         // 90 ret
        // putc: prints al once COM1's transmitter holding register is empty
        0x52,                         // 91 push dx
        0x50,                         // 92 push ax
        0xba, 0xfd, 0x03,             // 93 mov dx, 0x3fd (LSR)
        0xec,                         // 96 in al, dx
        0xa8, 0x20,                   // 97 test al, 0x20 (THRE)
        0x74, 0xfb,                   // 99 jz 0x96
        0x58,                         // 9b pop ax
        0xba, 0xf8, 0x03,             // 9c mov dx, 0x3f8
        0xee,                         // 9f out dx, al
        0x5a,                         // a0 pop dx
        0xc3,                         // a1 ret
        // puthex: prints al as two hex digits
        0x50,                         // a2 push ax
        0xc0, 0xe8, 0x04,             // a3 shr al, 4
        0xe8, 0x03, 0x00,             // a6 call nibble
        0x58,                         // a9 pop ax
        0x24, 0x0f,                   // aa and al, 0xf
        // nibble: prints the hex digit for al (0-15)
        0x04, 0x30,                   // ac add al, '0'
        0x3c, 0x39,                   // ae cmp al, '9'
        0x76, 0xdf,                   // b0 jbe putc
        0x04, 0x07,                   // b2 add al, 'A' - '9' - 1
        0xeb, 0xdb,                   // b4 jmp putc
    ];
    let mut sector = vec![0u8; 512];
    sector[..code.len()].copy_from_slice(code);
    // 0xc0: the boot drive, 0xc1: INT 13h's status (both written by the code).
    sector[0xc8..0xd8].copy_from_slice(&disk_address_packet(0x8000, WRITE_LBA));
    sector[0xd8..0xe8].copy_from_slice(&disk_address_packet(0x8200, WRITE_LBA));
    put_cstr(&mut sector, 0xe8, "INT13-43-FAILED AH=");
    put_cstr(&mut sector, 0x100, "INT13-42-FAILED AH=");
    put_cstr(&mut sector, 0x118, "WRITE-READBACK-OK\r\n");
    put_cstr(&mut sector, 0x130, "WRITE-READBACK-MISMATCH\r\n");
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

// The CD's layout, in 2048-byte sectors.
const PRIMARY_VOLUME_DESCRIPTOR: u64 = 16;
const BOOT_RECORD: u64 = 17;
const DESCRIPTOR_SET_TERMINATOR: u64 = 18;
const BOOT_CATALOG: u64 = 19;
const BOOT_IMAGE: u64 = 20;
const ROOT_DIRECTORY: u64 = 21;
const L_PATH_TABLE: u64 = 22;
const M_PATH_TABLE: u64 = 23;
/// The sector the CD's boot image reads (in no-emulation mode INT 13h counts 2048-byte
/// sectors).
const CD_DATA: u64 = 40;
const CD_SECTORS: u64 = 48;

/// The console line of the CD's boot (DL 0xE0: SeaBIOS's first CD).
const CD_READ_LINE: &str = "CD-BOOTED DL=E0 READ-CD-SECTOR-40-OK";

fn both_endian_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_le_bytes());
    buf[at + 2..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn both_endian_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
    buf[at + 4..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// An ISO 9660 directory record (34 bytes) for a directory at `sector`, one sector long,
/// named `name` (0: ".", 1: "..").
fn directory_record(sector: u64, name: u8) -> [u8; 34] {
    let mut record = [0u8; 34];
    record[0] = 34;
    both_endian_u32(&mut record, 2, sector as u32);
    both_endian_u32(&mut record, 10, CD_SECTOR as u32);
    record[25] = 2; // a directory
    both_endian_u16(&mut record, 28, 1); // volume sequence number
    record[32] = 1;
    record[33] = name;
    record
}

/// A volume descriptor's first bytes: its type, "CD001" and version 1.
fn volume_descriptor(ty: u8) -> Vec<u8> {
    let mut sector = vec![0u8; CD_SECTOR as usize];
    sector[0] = ty;
    sector[1..6].copy_from_slice(b"CD001");
    sector[6] = 1;
    sector
}

/// A bootable CD in ISO 9660 with El Torito: the primary volume descriptor (an empty root
/// directory and its path tables), the boot record pointing at the boot catalog, whose
/// validation entry and initial entry (bootable, no emulation, load segment 0 = 0x7c0,
/// four 512-byte virtual sectors) load the sector holding [`read_boot_sector`] for
/// [`CD_DATA`], and that sector's marker.
fn el_torito_cd(path: &Path) {
    let mut pvd = volume_descriptor(1);
    pvd[8..40].fill(b' '); // system identifier
    pvd[40..72].fill(b' ');
    pvd[40..54].copy_from_slice(b"QOMVM_IDE_TEST"); // volume identifier
    both_endian_u32(&mut pvd, 80, CD_SECTORS as u32); // volume space size
    both_endian_u16(&mut pvd, 120, 1); // volume set size
    both_endian_u16(&mut pvd, 124, 1); // volume sequence number
    both_endian_u16(&mut pvd, 128, CD_SECTOR as u16); // logical block size
    both_endian_u32(&mut pvd, 132, 10); // path table size: the root's entry
    pvd[140..144].copy_from_slice(&(L_PATH_TABLE as u32).to_le_bytes());
    pvd[148..152].copy_from_slice(&(M_PATH_TABLE as u32).to_be_bytes());
    pvd[156..190].copy_from_slice(&directory_record(ROOT_DIRECTORY, 0));
    // Volume set, publisher, preparer, application, file identifiers: blank.
    pvd[190..813].fill(b' ');
    // Creation, modification, expiration, effective dates: "not specified".
    for date in pvd[813..881].chunks_mut(17) {
        date[..16].fill(b'0');
        date[16] = 0;
    }
    pvd[881] = 1; // file structure version

    let mut root = vec![0u8; CD_SECTOR as usize];
    root[..34].copy_from_slice(&directory_record(ROOT_DIRECTORY, 0));
    root[34..68].copy_from_slice(&directory_record(ROOT_DIRECTORY, 1));
    // Path tables: the root (name length 1, name 0), its own parent (directory 1).
    let mut l_path = vec![0u8; CD_SECTOR as usize];
    l_path[0] = 1;
    l_path[2..6].copy_from_slice(&(ROOT_DIRECTORY as u32).to_le_bytes());
    l_path[6..8].copy_from_slice(&1u16.to_le_bytes());
    let mut m_path = vec![0u8; CD_SECTOR as usize];
    m_path[0] = 1;
    m_path[2..6].copy_from_slice(&(ROOT_DIRECTORY as u32).to_be_bytes());
    m_path[6..8].copy_from_slice(&1u16.to_be_bytes());

    let mut boot_record = volume_descriptor(0);
    // The boot system identifier, NUL-padded to 32 bytes (SeaBIOS compares it as a
    // NUL-terminated string), and the boot catalog's sector.
    boot_record[7..7 + 23].copy_from_slice(b"EL TORITO SPECIFICATION");
    boot_record[0x47..0x4b].copy_from_slice(&(BOOT_CATALOG as u32).to_le_bytes());

    let terminator = volume_descriptor(255);

    let mut catalog = vec![0u8; CD_SECTOR as usize];
    // Validation entry: header 1, platform 0 (80x86), an ID string, the checksum that
    // makes its 16 words sum to 0, key bytes 0x55 0xaa.
    catalog[0] = 1;
    catalog[4..9].copy_from_slice(b"QOMVM");
    catalog[30] = 0x55;
    catalog[31] = 0xaa;
    let sum = catalog[..32].chunks(2).fold(0u16, |s, w| {
        s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    catalog[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    // Initial/default entry: bootable, no emulation, load segment 0 (0x7c0), system type
    // 0, 4 virtual sectors, the boot image's sector.
    catalog[32] = 0x88;
    catalog[38..40].copy_from_slice(&4u16.to_le_bytes());
    catalog[40..44].copy_from_slice(&(BOOT_IMAGE as u32).to_le_bytes());

    let mut boot_image = vec![0u8; CD_SECTOR as usize];
    boot_image[..512].copy_from_slice(&read_boot_sector("CD-BOOTED DL=", CD_DATA));
    let data = block_marker("CD-SECTOR-40");

    sparse_image(
        path,
        CD_SECTOR,
        CD_SECTORS,
        &[
            (PRIMARY_VOLUME_DESCRIPTOR, &pvd),
            (BOOT_RECORD, &boot_record),
            (DESCRIPTOR_SET_TERMINATOR, &terminator),
            (BOOT_CATALOG, &catalog),
            (BOOT_IMAGE, &boot_image),
            (ROOT_DIRECTORY, &root),
            (L_PATH_TABLE, &l_path),
            (M_PATH_TABLE, &m_path),
            (CD_DATA, &data),
        ],
    );
}

/// The console line of [`small_read_disk`]'s boot.
const SMALL_READ_LINE: &str = "HD-BOOTED DL=80 READ-LBA-00000001-OK";

/// A 1 MiB raw disk whose boot sector reads its second sector.
fn small_read_disk(path: &Path) {
    let boot = read_boot_sector("HD-BOOTED DL=", 1);
    let data = block_marker("LBA-00000001");
    sparse_image(path, SECTOR, 2048, &[(0, &boot), (1, &data)]);
}

/// `-hda` of a raw image (qomvm, like QEMU, warns on stderr that it probed the format).
#[test]
fn seabios_reads_a_block_beyond_chs_from_an_hda_disk() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("hda");
    let disk = dir.join("disk.img");
    far_read_disk(&disk);
    let text = boot_to_poweroff(&["-hda", path_str(&disk)]);
    assert!(text.contains("SeaBIOS (version"), "{text:?}");
    assert!(text.contains(FAR_READ_LINE), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A write through INT 13h beyond LBA 2^28 reaches the image file at that block, and
/// nothing around it.
#[test]
fn int13_writes_beyond_lba28_reach_the_image() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("write");
    let disk = dir.join("disk.img");
    sparse_image(
        &disk,
        SECTOR,
        WRITE_LBA + 2048,
        &[(0, &write_boot_sector())],
    );
    let drive = format!("file={},format=raw,if=ide", disk.display());
    let text = boot_to_poweroff(&["-drive", &drive]);
    assert!(text.contains("WRITE-READBACK-OK"), "{text:?}");

    let file = File::open(&disk).unwrap();
    let block = |lba: u64| {
        let mut buf = vec![0u8; SECTOR as usize];
        file.read_exact_at(&mut buf, lba * SECTOR).unwrap();
        buf
    };
    assert!(
        block(WRITE_LBA) == write_pattern(),
        "{:02x?}",
        block(WRITE_LBA)
    );
    for lba in [WRITE_LBA - 1, WRITE_LBA + 1] {
        assert!(
            block(lba).iter().all(|&b| b == 0),
            "block {lba:#x} was written"
        );
    }
    // The pattern's low 28 bits alone would have landed at 0x800.
    assert!(block(WRITE_LBA & 0x0fff_ffff).iter().all(|&b| b == 0));
    assert_eq!(block(0), write_boot_sector(), "the boot sector changed");
    let _ = std::fs::remove_dir_all(dir);
}

/// `-device ide-hd` on the secondary channel's master (ports 0x170/0x376): SeaBIOS finds
/// and boots it as the first hard disk.
#[test]
fn seabios_boots_a_disk_on_the_secondary_channel() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("secondary");
    let disk = dir.join("disk.img");
    far_read_disk(&disk);
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let text = boot_to_poweroff(&[
        "-drive",
        &drive,
        "-device",
        "ide-hd,drive=d0,bus=ide.1,unit=0",
    ]);
    assert!(text.contains(FAR_READ_LINE), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `-drive media=cdrom,if=ide` (the first free IDE unit: the primary master) and `-boot d`:
/// SeaBIOS reads the boot record, the catalog and the boot image through ATAPI, and the
/// boot image reads a 2048-byte sector through INT 13h on DL 0xE0.
#[test]
fn seabios_boots_an_el_torito_cd_on_drive_media_cdrom() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let dir = temp_dir("cd");
    let cd = dir.join("cd.iso");
    el_torito_cd(&cd);
    let drive = format!("file={},media=cdrom,if=ide,format=raw", cd.display());
    let text = boot_to_poweroff(&["-drive", &drive, "-boot", "d"]);
    assert!(text.contains("Booting from DVD/CD"), "{text:?}");
    assert!(text.contains(CD_READ_LINE), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A scratch directory `name` with a bootable CD (`cd.iso`, printing [`CD_READ_LINE`]) and
/// a bootable disk (`disk.img`, printing [`SMALL_READ_LINE`]).
fn bootable_cd_and_disk(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let cd = dir.join("cd.iso");
    let disk = dir.join("disk.img");
    el_torito_cd(&cd);
    small_read_disk(&disk);
    (dir, cd, disk)
}

/// `-device ide-cd,bootindex=1` boots before a bootable disk, although without bootindex
/// the pc's default order ("cad") tries the disk first. Without `bus=`, QEMU puts the CD on
/// ide.1 (the bus qdev finds first: the one created last), as its master; the disk is
/// ide.0's slave with no master beside it, so SeaBIOS's probe of the absent master must
/// fail cleanly (QEMU aborts its IDENTIFYs) before it finds the slave.
#[test]
fn bootindex_puts_an_ide_cd_before_the_disk() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, cd, disk) = bootable_cd_and_disk("bootindex");
    let cd_drive = format!(
        "file={},if=none,id=cd0,format=raw,readonly=on",
        cd.display()
    );
    let hd_drive = format!("file={},if=none,id=hd0,format=raw", disk.display());
    let text = boot_to_poweroff(&[
        "-drive",
        &cd_drive,
        "-device",
        "ide-cd,drive=cd0,bootindex=1",
        "-drive",
        &hd_drive,
        "-device",
        "ide-hd,drive=hd0,bus=ide.0,unit=1",
    ]);
    assert!(text.contains(CD_READ_LINE), "{text:?}");
    assert!(!text.contains("HD-BOOTED"), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// With `-hda` (the primary master) and `-cdrom` (the secondary master) both bootable,
/// `-boot order=c` boots the disk and `-boot d` the CD.
#[test]
fn boot_order_chooses_between_hda_and_cdrom() {
    if !kvm_or_skip() || !seabios_or_skip() {
        return;
    }
    let (dir, cd, disk) = bootable_cd_and_disk("order");
    let both = ["-hda", path_str(&disk), "-cdrom", path_str(&cd)];

    let text = boot_to_poweroff(&[&both[..], &["-boot", "order=c"]].concat());
    assert!(text.contains(SMALL_READ_LINE), "order=c: {text:?}");
    assert!(!text.contains("CD-BOOTED"), "order=c: {text:?}");

    let text = boot_to_poweroff(&[&both[..], &["-boot", "d"]].concat());
    assert!(text.contains(CD_READ_LINE), "-boot d: {text:?}");
    assert!(!text.contains("HD-BOOTED"), "-boot d: {text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// QEMU 7.2's errors for IDE configurations it refuses (`qemu-system-x86_64` prints them
/// the same way, after its own name):
///
/// - blockdev.c, `drive_new`: "drive with bus=%d, unit=%d (index=%d) exists";
/// - blockdev.c, `drive_check_orphaned`: "machine type does not support if=%s,bus=%d,unit=%d";
/// - hw/ide/qdev.c, `ide_qdev_realize`: "Can't create IDE unit %d, bus supports only %d
///   units", "IDE unit %d is in use" (its "Invalid IDE unit %d" is unreachable with two
///   units per bus);
/// - hw/ide/qdev.c, `ide_dev_initfn`: "No drive specified" (ide-hd; an ide-cd without a
///   drive is an empty CD);
/// - hw/core/qdev-properties-system.c, the drive property's setter: "Drive '%s' is already
///   in use by another device", "Drive '%s' is already in use because it has been
///   automatically connected to another device (did you need 'if=none' in the drive
///   options?)", "Property '%s.%s' can't find value '%s'";
/// - qdev_device_add: "Bus '%s' not found".
///
/// `-hda` and `-cdrom` drives are named as QEMU names `if=ide` drives: `ide0-hd0` (bus 0,
/// unit 0), `ide1-cd0`.
#[test]
fn bad_ide_configurations_get_qemus_errors() {
    let dir = temp_dir("errors");
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    let c = dir.join("c.img");
    for image in [&a, &b, &c] {
        std::fs::write(image, vec![0u8; 1 << 20]).unwrap();
    }
    let (a, b, c) = (path_str(&a), path_str(&b), path_str(&c));
    let a_ide0 = format!("file={a},format=raw,if=ide,index=0");
    let b_ide0 = format!("file={b},format=raw,if=ide,index=0");
    let a_ide4 = format!("file={a},format=raw,if=ide,index=4");
    let a_none = format!("file={a},format=raw,if=none,id=d0");
    let b_none = format!("file={b},format=raw,if=none,id=d1");
    let c_none = format!("file={c},format=raw,if=none,id=d2");

    // Every case: (arguments, the option QEMU's error names, the error).
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["-drive", &a_ide0, "-drive", &b_ide0],
            &b_ide0,
            "drive with bus=0, unit=0 (index=0) exists",
        ),
        (
            vec!["-drive", &a_ide4],
            &a_ide4,
            "machine type does not support if=ide,bus=2,unit=0",
        ),
        (vec!["-device", "ide-hd"], "ide-hd", "No drive specified"),
        (
            vec![
                "-drive",
                &a_none,
                "-device",
                "ide-hd,drive=d0,bus=ide.0,unit=2",
            ],
            "ide-hd,drive=d0,bus=ide.0,unit=2",
            "Can't create IDE unit 2, bus supports only 2 units",
        ),
        (
            vec![
                "-drive",
                &a_none,
                "-drive",
                &b_none,
                "-device",
                "ide-hd,drive=d0,bus=ide.1,unit=0",
                "-device",
                "ide-hd,drive=d1,bus=ide.1,unit=0",
            ],
            "ide-hd,drive=d1,bus=ide.1,unit=0",
            "IDE unit 0 is in use",
        ),
        (
            // The if=ide drive took ide.0's master before any -device.
            vec![
                "-drive",
                &a_ide0,
                "-drive",
                &b_none,
                "-device",
                "ide-hd,drive=d1,bus=ide.0,unit=0",
            ],
            "ide-hd,drive=d1,bus=ide.0,unit=0",
            "IDE unit 0 is in use",
        ),
        (
            vec![
                "-drive",
                &a_none,
                "-device",
                "ide-hd,drive=d0",
                "-device",
                "ide-cd,drive=d0",
            ],
            "ide-cd,drive=d0",
            "Drive 'd0' is already in use by another device",
        ),
        (
            vec!["-drive", &a_ide0, "-device", "ide-cd,drive=ide0-hd0"],
            "ide-cd,drive=ide0-hd0",
            "Drive 'ide0-hd0' is already in use because it has been automatically connected \
             to another device (did you need 'if=none' in the drive options?)",
        ),
        // A disk needs a medium; an empty CD drive has one device.
        (
            vec![
                "-drive",
                "if=none,id=e0,media=cdrom",
                "-device",
                "ide-hd,drive=e0",
            ],
            "ide-hd,drive=e0",
            "Device needs media, but drive is empty",
        ),
        (
            vec![
                "-drive",
                "if=none,id=e0,media=cdrom",
                "-device",
                "virtio-blk-pci,drive=e0",
            ],
            "virtio-blk-pci,drive=e0",
            "Device needs media, but drive is empty",
        ),
        (
            vec![
                "-drive",
                "if=none,id=e0,media=cdrom",
                "-device",
                "ide-cd,drive=e0",
                "-device",
                "ide-cd,drive=e0",
            ],
            "ide-cd,drive=e0",
            "Drive 'e0' is already in use by another device",
        ),
        (
            vec!["-drive", &a_none, "-device", "ide-hd,drive=nope"],
            "ide-hd,drive=nope",
            "Property 'ide-hd.drive' can't find value 'nope'",
        ),
        (
            vec!["-drive", &a_none, "-device", "ide-hd,drive=d0,bus=ide.2"],
            "ide-hd,drive=d0,bus=ide.2",
            "Bus 'ide.2' not found",
        ),
        // Without bus=, QEMU puts IDE devices on ide.1 (the bus qdev finds first), master
        // first...
        (
            vec![
                "-drive",
                &a_none,
                "-drive",
                &b_none,
                "-device",
                "ide-hd,drive=d0",
                "-device",
                "ide-hd,drive=d1,bus=ide.1,unit=0",
            ],
            "ide-hd,drive=d1,bus=ide.1,unit=0",
            "IDE unit 0 is in use",
        ),
        // ...then slave, and a third one does not move on to ide.0.
        (
            vec![
                "-drive",
                &a_none,
                "-drive",
                &b_none,
                "-drive",
                &c_none,
                "-device",
                "ide-hd,drive=d0",
                "-device",
                "ide-cd,drive=d1",
                "-device",
                "ide-hd,drive=d2",
            ],
            "ide-hd,drive=d2",
            "IDE unit 1 is in use",
        ),
    ];
    for (args, option_value, error) in cases {
        let (code, err) = qtest_pc(&args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(code, Some(1), "{args:?}: {err}");
        let option = if option_value.starts_with("ide-") || option_value.starts_with("virtio-") {
            "-device"
        } else {
            "-drive"
        };
        assert_eq!(
            err,
            format!("qomvm: {option} {option_value}: {error}\n"),
            "{args:?}"
        );
    }

    // -hda/-hdc/-cdrom: QEMU warns before the error that it probed a writable raw image's
    // format (qomvm too), so only the last line is the error.
    let last_line_cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["-hda", a, "-hda", b],
            format!("qomvm: -hda {b}: drive with bus=0, unit=0 (index=0) exists"),
        ),
        (
            vec!["-hda", a, "-device", "ide-cd,drive=ide0-hd0"],
            "qomvm: -device ide-cd,drive=ide0-hd0: Drive 'ide0-hd0' is already in use because \
             it has been automatically connected to another device (did you need 'if=none' in \
             the drive options?)"
                .to_string(),
        ),
        (
            vec!["-cdrom", a, "-device", "ide-cd,drive=ide1-cd0"],
            "qomvm: -device ide-cd,drive=ide1-cd0: Drive 'ide1-cd0' is already in use because \
             it has been automatically connected to another device (did you need 'if=none' in \
             the drive options?)"
                .to_string(),
        ),
        (
            vec![
                "-cdrom",
                a,
                "-drive",
                &b_none,
                "-device",
                "ide-hd,drive=d1,bus=ide.1,unit=0",
            ],
            "qomvm: -device ide-hd,drive=d1,bus=ide.1,unit=0: IDE unit 0 is in use".to_string(),
        ),
        // -cdrom is index 2: bus 1, unit 0, which -hdc already took.
        (
            vec!["-hdc", a, "-cdrom", b],
            format!("qomvm: -cdrom {b}: drive with bus=1, unit=0 (index=2) exists"),
        ),
    ];
    for (args, line) in last_line_cases {
        let (code, err) = qtest_pc(&args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().last(), Some(line.as_str()), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
