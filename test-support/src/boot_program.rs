//! A program firmware runs at 0:7c00 in real mode (a disk's boot sector, a PXE network
//! bootstrap program): it prints a message on COM1, then powers the pc off through PIIX4's
//! PM1a_CNT (SLP_TYP 0 = S5, SLP_EN), so qomvm exits with status 0, or parks the CPU; and a
//! floppy image whose boot sector first reads the rest of its track through INT 13h, or
//! one sector straight from the floppy controller without DMA.

/// Where the message starts in the program.
const MESSAGE_AT: usize = 0x1c;

/// The program printing `message` (ASCII, without a NUL) and powering off,
/// `0x1c + message.len() + 1` bytes.
pub fn print_and_power_off(message: &[u8]) -> Vec<u8> {
    #[rustfmt::skip]
    let power_off: &[u8] = &[
        0xba, 0x04, 0x06, // 12 mov dx, 0x604
        0xb8, 0x00, 0x20, // 15 mov ax, 0x2000
        0xef,             // 18 out dx, ax
        0xf4,             // 19 hlt
        0xeb, 0xfd,       // 1a jmp 0x19
    ];
    print_then(message, power_off)
}

/// The program printing `message` and halting with interrupts off, leaving memory as the
/// firmware left it.
pub fn print_and_park(message: &[u8]) -> Vec<u8> {
    #[rustfmt::skip]
    let park: &[u8] = &[
        0xfa,             // 12 cli
        0xf4,             // 13 hlt
        0xeb, 0xfd,       // 14 jmp 0x13
    ];
    print_then(message, park)
}

/// Prints the NUL-terminated message at 0x7c1c on COM1, then runs `tail` (at 0x12).
fn print_then(message: &[u8], tail: &[u8]) -> Vec<u8> {
    #[rustfmt::skip]
    let print: &[u8] = &[
        0x31, 0xc0,       // 00 xor ax, ax
        0x8e, 0xd8,       // 02 mov ds, ax
        0xbe, 0x1c, 0x7c, // 04 mov si, 0x7c1c (the message)
        0xba, 0xf8, 0x03, // 07 mov dx, 0x3f8
        0xac,             // 0a lodsb
        0x84, 0xc0,       // 0b test al, al
        0x74, 0x03,       // 0d jz 0x12
        0xee,             // 0f out dx, al
        0xeb, 0xf8,       // 10 jmp 0x0a
    ];
    assert!(!message.contains(&0), "the message ends at its first NUL");
    assert!(print.len() + tail.len() <= MESSAGE_AT);
    let mut program = [print, tail].concat();
    program.resize(MESSAGE_AT, 0);
    program.extend_from_slice(message);
    program.push(0);
    program
}

/// A 1.44 MB floppy whose boot sector reads the rest of the first track (sectors 2-18 of
/// cylinder 0, head 0: 17 sectors) to 1000:0000 through INT 13h, prints the message that
/// spans the end of sector 17 and the start of sector 18 as loaded ("FLOPPY-" and
/// "READ-OK"), and powers off; on a read error it prints "F" and powers off.
pub fn floppy_loader_image() -> Vec<u8> {
    #[rustfmt::skip]
    let loader: &[u8] = &[
        0x31, 0xc0,       // 00 xor ax, ax
        0x8e, 0xd0,       // 02 mov ss, ax
        0xbc, 0x00, 0x7c, // 04 mov sp, 0x7c00
        0xb8, 0x00, 0x10, // 07 mov ax, 0x1000
        0x8e, 0xc0,       // 0a mov es, ax
        0x31, 0xdb,       // 0c xor bx, bx
        0xb8, 0x11, 0x02, // 0e mov ax, 0x0211 (read 17 sectors)
        0xb9, 0x02, 0x00, // 11 mov cx, 0x0002 (cylinder 0, sector 2)
        0xba, 0x00, 0x00, // 14 mov dx, 0x0000 (head 0, drive A:)
        0xcd, 0x13,       // 17 int 0x13
        0x72, 0x1c,       // 19 jc 0x37
        0x8c, 0xc0,       // 1b mov ax, es
        0x8e, 0xd8,       // 1d mov ds, ax
        0xbe, 0xf9, 0x1f, // 1f mov si, 0x1ff9 (7 bytes before sector 18)
        0xba, 0xf8, 0x03, // 22 mov dx, 0x3f8
        0xac,             // 25 lodsb
        0x84, 0xc0,       // 26 test al, al
        0x74, 0x03,       // 28 jz 0x2d
        0xee,             // 2a out dx, al
        0xeb, 0xf8,       // 2b jmp 0x25
        0xba, 0x04, 0x06, // 2d mov dx, 0x604
        0xb8, 0x00, 0x20, // 30 mov ax, 0x2000
        0xef,             // 33 out dx, ax (S5)
        0xf4,             // 34 hlt
        0xeb, 0xfd,       // 35 jmp 0x34
        0xb0, 0x46,       // 37 mov al, 'F'
        0xba, 0xf8, 0x03, // 39 mov dx, 0x3f8
        0xee,             // 3c out dx, al
        0xeb, 0xee,       // 3d jmp 0x2d
    ];
    // Every other loaded byte is not a NUL, so a sector that lands elsewhere shows.
    floppy_image(loader, 18 * 512, b"FLOPPY-READ-OK\r\n\0", 512 + 0x1ff9)
}

/// A 1.44 MB floppy whose boot sector reads sector 2 without DMA: SPECIFY with ND set,
/// READ of cylinder 0, head 0, sector 2, then its 512 bytes one by one from the FIFO as
/// RQM allows (a vCPU thread leaves the sector's loading to the main loop meanwhile),
/// then the 7 result bytes; it prints the message at the end of the sector
/// ("FLOPPY-PIO-OK") and powers off.
pub fn floppy_pio_image() -> Vec<u8> {
    #[rustfmt::skip]
    let program: &[u8] = &[
        0x31, 0xc0,       // 00 xor ax, ax
        0x8e, 0xd8,       // 02 mov ds, ax
        0x8e, 0xc0,       // 04 mov es, ax
        0xbe, 0x5d, 0x7c, // 06 mov si, 0x7c5d (the command bytes)
        0xb9, 0x0c, 0x00, // 09 mov cx, 12
        0xac,             // 0c lodsb
        0xe8, 0x3c, 0x00, // 0d call 0x4c (send)
        0xe2, 0xfa,       // 10 loop 0x0c
        0xbf, 0x00, 0x80, // 12 mov di, 0x8000
        0xb9, 0x00, 0x02, // 15 mov cx, 512
        0xba, 0xf4, 0x03, // 18 mov dx, 0x3f4 (MSR)
        0xec,             // 1b in al, dx
        0xa8, 0x80,       // 1c test al, 0x80 (RQM)
        0x74, 0xfb,       // 1e jz 0x1b
        0x42,             // 20 inc dx (FIFO)
        0xec,             // 21 in al, dx
        0xaa,             // 22 stosb
        0xe2, 0xf3,       // 23 loop 0x18
        0xb9, 0x07, 0x00, // 25 mov cx, 7 (the result bytes)
        0xba, 0xf4, 0x03, // 28 mov dx, 0x3f4
        0xec,             // 2b in al, dx
        0xa8, 0x80,       // 2c test al, 0x80
        0x74, 0xfb,       // 2e jz 0x2b
        0x42,             // 30 inc dx
        0xec,             // 31 in al, dx
        0xe2, 0xf4,       // 32 loop 0x28
        0xbe, 0xf0, 0x81, // 34 mov si, 0x81f0 (the message, at the sector's end)
        0xba, 0xf8, 0x03, // 37 mov dx, 0x3f8
        0xac,             // 3a lodsb
        0x84, 0xc0,       // 3b test al, al
        0x74, 0x03,       // 3d jz 0x42
        0xee,             // 3f out dx, al
        0xeb, 0xf8,       // 40 jmp 0x3a
        0xba, 0x04, 0x06, // 42 mov dx, 0x604
        0xb8, 0x00, 0x20, // 45 mov ax, 0x2000
        0xef,             // 48 out dx, ax (S5)
        0xf4,             // 49 hlt
        0xeb, 0xfd,       // 4a jmp 0x49
        // send: the byte in AL once MSR says RQM and not DIO.
        0x88, 0xc4,       // 4c mov ah, al
        0xba, 0xf4, 0x03, // 4e mov dx, 0x3f4
        0xec,             // 51 in al, dx
        0x24, 0xc0,       // 52 and al, 0xc0
        0x3c, 0x80,       // 54 cmp al, 0x80
        0x75, 0xf9,       // 56 jne 0x51
        0x88, 0xe0,       // 58 mov al, ah
        0x42,             // 5a inc dx
        0xee,             // 5b out dx, al
        0xc3,             // 5c ret
        // 5d: SPECIFY (ND: no DMA), then READ C0 H0 R2, 512-byte sectors, EOT 2.
        0x03, 0xdf, 0x03,
        0x46, 0x00, 0x00, 0x00, 0x02, 0x02, 0x02, 0x1b, 0xff,
    ];
    let message = b"FLOPPY-PIO-OK\r\n\0";
    floppy_image(program, 1024, message, 1024 - message.len())
}

/// A 1.44 MB floppy: `program` as its boot sector (with the boot signature), the bytes
/// after it up to `filled_to` set to '.', and `message` at `message_at`.
fn floppy_image(program: &[u8], filled_to: usize, message: &[u8], message_at: usize) -> Vec<u8> {
    let mut image = vec![0u8; 1_474_560];
    image[..program.len()].copy_from_slice(program);
    image[510] = 0x55;
    image[511] = 0xaa;
    image[512..filled_to].fill(b'.');
    image[message_at..message_at + message.len()].copy_from_slice(message);
    image
}
