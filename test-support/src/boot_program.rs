//! A program firmware runs at 0:7c00 in real mode (a disk's boot sector, a PXE network
//! bootstrap program): it prints a message on COM1, then powers the pc off through PIIX4's
//! PM1a_CNT (SLP_TYP 0 = S5, SLP_EN), so qomvm exits with status 0, or parks the CPU.

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
