//! Device fuzzing over QEMU's qtest protocol (issue 19, item 5; QEMU's `generic-fuzz` is
//! the idea): a pc machine with a selection of devices plugged, their BARs programmed, then
//! random port, MMIO, PCI configuration and DMA-triggering sequences (virtqueues of random
//! descriptors, then a kick; IDE commands over random PRD tables; e1000 and rtl8139 rings of random
//! descriptors). After each case qomvm must still answer within a bound and
//! not have exited; at the end SIGTERM must end it with status 0.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::time::{Duration, Instant};

use test_support::fuzz::{FuzzRun, Rng};
use test_support::fuzz_qtest::{hex, program_bars, PciFunction, Qtest};

/// Guest RAM (`-m 64`).
const RAM_SIZE: u64 = 64 << 20;
/// Where the DMA sequences put their rings and buffers.
const RING_AREA: u64 = 0x10_0000;
const BUFFER_AREA: u64 = 0x20_0000;
const BUFFER_AREA_SIZE: u64 = 0x1_0000;

/// Ports of the pc board's own devices, where random accesses are worth more.
const BOARD_PORTS: &[(u16, u16)] = &[
    (0x20, 2),
    (0x40, 4),
    (0x60, 1),
    (0x64, 1),
    (0x70, 2),
    (0x80, 1),
    (0x92, 1),
    (0xa0, 2),
    (0xe0, 0x10),
    (0x2f8, 8),
    (0x3f8, 8),
    (0x378, 8),
    (0x4d0, 2),
    (0x505, 1),
    (0x510, 12),
    (0x600, 0x40),
    (0xb000, 0x40),
    (0xcf8, 8),
    // The PIIX3 IDE channels' command blocks and control ports.
    (0x170, 8),
    (0x1f0, 8),
    (0x376, 1),
    (0x3f6, 1),
];

fn random_port(rng: &mut Rng, functions: &[PciFunction]) -> u16 {
    match rng.below(4) {
        0 => rng.below(0x1_0000) as u16,
        1 => {
            let (base, len) = *rng.pick(BOARD_PORTS);
            base + rng.below(u64::from(len)) as u16
        }
        _ => {
            let io: Vec<_> = functions
                .iter()
                .flat_map(|f| f.bars.iter().filter(|b| b.0))
                .collect();
            if io.is_empty() {
                return rng.below(0x1_0000) as u16;
            }
            let (_, base, size) = **rng.pick(&io);
            (base + rng.below(size)) as u16
        }
    }
}

fn random_mmio_address(rng: &mut Rng, functions: &[PciFunction]) -> u64 {
    match rng.below(6) {
        // The PCI hole, the I/O APIC, HPET, the local APIC and the BIOS.
        0 => 0xe000_0000 + rng.below(0x2000_0000),
        1 => *rng.pick(&[0xfec0_0000, 0xfed0_0000, 0xfee0_0000, 0xfffc_0000]) + rng.below(0x400),
        2 => rng.below(RAM_SIZE),
        _ => {
            let mem: Vec<_> = functions
                .iter()
                .flat_map(|f| f.bars.iter().filter(|b| !b.0))
                .collect();
            if mem.is_empty() {
                return 0xe000_0000 + rng.below(0x1000_0000);
            }
            let (_, base, size) = **rng.pick(&mem);
            base + rng.below(size)
        }
    }
}

/// A virtqueue of random descriptors behind a legacy virtio device, then a kick: the
/// device's DMA path on a hostile ring (chains out of range, loops, indirect tables, zero
/// and huge lengths, random request headers in the buffers).
fn dma_sequence(qt: &mut Qtest, rng: &mut Rng, io: u16) {
    // Buffers full of random bytes: request headers, frames, anything.
    let data = rng.bytes(4096);
    let at = BUFFER_AREA + rng.below(BUFFER_AREA_SIZE / 4096) * 4096;
    qt.cmd(format!("write {at:#x} {:#x} {}", data.len(), hex(&data)));

    let queue = rng.below(4) as u16;
    qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x0e));
    let size = qt.value(format!("inw {:#x}", io + 0x0c)) as u64;
    if size == 0 || size > 1024 {
        return;
    }
    let ring = RING_AREA + rng.below(8) * 0x1_0000;
    let mut descriptors = Vec::with_capacity(16 * size as usize);
    for _ in 0..size {
        let addr = match rng.below(8) {
            0 => rng.interesting_u64(),
            1 => RAM_SIZE - rng.below(64),
            _ => BUFFER_AREA + rng.below(BUFFER_AREA_SIZE),
        };
        let len = match rng.below(6) {
            0 => 0,
            1 => rng.interesting_u64() as u32,
            _ => rng.below(4096) as u32,
        };
        // NEXT, WRITE, INDIRECT in any mix.
        let flags = rng.below(8) as u16;
        let next = if rng.one_in(8) {
            rng.next_u32() as u16
        } else {
            rng.below(size) as u16
        };
        descriptors.extend_from_slice(&addr.to_le_bytes());
        descriptors.extend_from_slice(&len.to_le_bytes());
        descriptors.extend_from_slice(&flags.to_le_bytes());
        descriptors.extend_from_slice(&next.to_le_bytes());
    }
    qt.cmd(format!(
        "write {ring:#x} {:#x} {}",
        descriptors.len(),
        hex(&descriptors)
    ));
    // The available ring: flags, idx, then heads.
    let avail = ring + 16 * size;
    let idx: u16 = if rng.one_in(6) {
        rng.next_u32() as u16
    } else {
        1 + rng.below(size.min(8)) as u16
    };
    let mut ring_bytes = vec![0u8, 0];
    ring_bytes.extend_from_slice(&idx.to_le_bytes());
    for _ in 0..size.min(8) {
        let head = if rng.one_in(8) {
            rng.next_u32() as u16
        } else {
            rng.below(size) as u16
        };
        ring_bytes.extend_from_slice(&head.to_le_bytes());
    }
    qt.cmd(format!(
        "write {avail:#x} {:#x} {}",
        ring_bytes.len(),
        hex(&ring_bytes)
    ));

    if rng.one_in(4) {
        // Start from a reset device now and then.
        qt.cmd(format!("outb {:#x} 0", io + 0x12));
    }
    qt.cmd(format!("outb {:#x} 3", io + 0x12));
    let features = qt.value(format!("inl {:#x}", io)) as u32;
    let wanted = if rng.one_in(4) {
        rng.next_u32()
    } else {
        features & rng.next_u32()
    };
    qt.cmd(format!("outl {:#x} {wanted:#x}", io + 0x04));
    qt.cmd(format!("outl {:#x} {:#x}", io + 0x08, ring >> 12));
    qt.cmd(format!("outb {:#x} 7", io + 0x12));
    for _ in 0..=rng.below(3) {
        qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x10));
    }
    // The ISR (read clears it), and sometimes the device's status after the kick.
    qt.cmd(format!("inb {:#x}", io + 0x13));
    if rng.one_in(2) {
        qt.cmd(format!("inb {:#x}", io + 0x12));
    }
}

/// The IDE commands worth sending most: reads and writes by PIO and DMA (28 and 48
/// bits), IDENTIFY, PACKET, flush, SET FEATURES, diagnostics, resets.
const IDE_COMMANDS: &[u8] = &[
    0x20, 0x24, 0x30, 0x34, 0xc4, 0xc5, 0xc6, 0xc8, 0xca, 0x25, 0x35, 0xec, 0xa1, 0xa0, 0xe7, 0xef,
    0x90, 0x08, 0xf8, 0x27, 0x40,
];

/// A command on a random IDE channel and drive with a random task file, a PRD table of
/// random entries (addresses anywhere, lengths of any size, the end marker or not), the
/// bus master started either way, and for PACKET a random command packet; then a burst
/// of data port reads or writes.
fn ide_sequence(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    let Some(bm) = functions
        .iter()
        .find(|f| f.vendor_device == 0x7010_8086)
        .and_then(|f| f.bars.iter().find(|b| b.0))
        .map(|b| b.1 as u16)
    else {
        return;
    };
    let secondary = rng.one_in(2);
    let (cmd, bm) = if secondary {
        (0x170u16, bm + 8)
    } else {
        (0x1f0, bm)
    };
    let mut prd = Vec::new();
    for i in 0..=rng.below(6) {
        let addr = match rng.below(4) {
            0 => rng.interesting_u64() as u32,
            _ => (BUFFER_AREA + rng.below(BUFFER_AREA_SIZE)) as u32,
        };
        prd.extend_from_slice(&addr.to_le_bytes());
        prd.extend_from_slice(&(rng.next_u32() as u16).to_le_bytes());
        let eot: u16 = if i == 5 || rng.one_in(3) { 0x8000 } else { 0 };
        prd.extend_from_slice(&eot.to_le_bytes());
    }
    let table = RING_AREA + rng.below(16) * 8;
    qt.cmd(format!("write {table:#x} {:#x} {}", prd.len(), hex(&prd)));
    qt.cmd(format!("outl {:#x} {table:#x}", bm + 4));
    qt.cmd(format!("outb {:#x} {:#x}", cmd + 6, rng.below(256)));
    for reg in 1..=5 {
        for _ in 0..=rng.below(2) {
            qt.cmd(format!("outb {:#x} {:#x}", cmd + reg, rng.below(256)));
        }
    }
    let start_first = rng.one_in(2);
    let direction = if rng.one_in(2) { 0x09 } else { 0x01 };
    if start_first {
        qt.cmd(format!("outb {bm:#x} {direction:#x}"));
    }
    let command = if rng.one_in(8) {
        rng.below(256) as u8
    } else {
        *rng.pick(IDE_COMMANDS)
    };
    qt.cmd(format!("outb {:#x} {command:#x}", cmd + 7));
    if !start_first {
        qt.cmd(format!("outb {bm:#x} {direction:#x}"));
    }
    if command == 0xa0 || rng.one_in(3) {
        let packet = rng.bytes(12);
        for pair in packet.chunks(2) {
            let word = u16::from_le_bytes([pair[0], pair[1]]);
            qt.cmd(format!("outw {cmd:#x} {word:#x}"));
        }
    }
    for _ in 0..rng.below(64) {
        if rng.one_in(2) {
            qt.cmd(format!("inw {cmd:#x}"));
        } else {
            qt.cmd(format!("outl {cmd:#x} {:#x}", rng.next_u32()));
        }
    }
    qt.cmd(format!("inb {:#x}", bm + 2));
    if rng.one_in(4) {
        // A software reset now and then, possibly with a transfer in flight.
        let ctrl = if secondary { 0x376 } else { 0x3f6 };
        qt.cmd(format!("outb {ctrl:#x} 0x04"));
        qt.cmd(format!("outb {ctrl:#x} 0x00"));
    }
    if rng.one_in(2) {
        qt.cmd(format!("outb {bm:#x} 0"));
    }
}

/// A UHCI schedule made of plausible and random parts: a frame list whose entries point
/// at queue heads and TDs in the buffer area (sometimes anywhere), TDs with any token
/// to the tablet's and keyboard's addresses, ports reset and enabled, the controller
/// started; its frames then walk it on their own, a millisecond each.
fn uhci_sequence(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    let Some(io) = functions
        .iter()
        .find(|f| f.vendor_device == 0x7020_8086)
        .and_then(|f| f.bars.iter().find(|b| b.0))
        .map(|b| b.1 as u16)
    else {
        return;
    };
    let pointer = |rng: &mut Rng| -> u32 {
        if rng.one_in(16) {
            return rng.interesting_u64() as u32;
        }
        let at = (BUFFER_AREA + rng.below(BUFFER_AREA_SIZE / 16) * 16) as u32;
        at | rng.below(8) as u32
    };
    let frame_list = RING_AREA & !0xfff;
    let entries: Vec<u8> = (0..64).flat_map(|_| pointer(rng).to_le_bytes()).collect();
    qt.cmd(format!(
        "write {frame_list:#x} {:#x} {}",
        entries.len(),
        hex(&entries)
    ));
    for _ in 0..=rng.below(16) {
        let at = BUFFER_AREA + rng.below(BUFFER_AREA_SIZE / 16) * 16;
        let any_pid = rng.below(256) as u32;
        let pid = *rng.pick(&[0x2du32, 0x69, 0xe1, any_pid]);
        let token = pid
            | (rng.below(4) as u32) << 8
            | (rng.below(3) as u32) << 15
            | (rng.below(0x800) as u32) << 21;
        let ctrl = rng.next_u32() | 1 << 23;
        let words = [pointer(rng), ctrl, token, pointer(rng) & !0xf];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        qt.cmd(format!("write {at:#x} {:#x} {}", bytes.len(), hex(&bytes)));
    }
    qt.cmd(format!("outl {:#x} {frame_list:#x}", io + 8));
    for port in [0x10u16, 0x12] {
        if rng.one_in(2) {
            qt.cmd(format!("outw {:#x} 0x200", io + port));
            qt.cmd(format!("outw {:#x} 0x0", io + port));
        }
        qt.cmd(format!("outw {:#x} {:#x}", io + port, rng.below(0x10000)));
    }
    qt.cmd(format!("outw {:#x} {:#x}", io + 4, rng.below(16)));
    qt.cmd(format!(
        "outw {:#x} {:#x}",
        io,
        1 | rng.below(0x100) as u32 & !6
    ));
    for _ in 0..rng.below(8) {
        qt.cmd(format!("inw {:#x}", io + 2 * rng.below(0x10) as u16));
    }
}

/// An e1000's two rings laid out at the end of the ring area, with plausible and random
/// descriptors (legacy, context and data, TSO with any header length and MSS, any length,
/// buffers in the buffer area or anywhere), both rings enabled and their tails moved.
fn e1000_sequence(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    let Some(mmio) = functions
        .iter()
        .find(|f| f.vendor_device == 0x100e_8086)
        .and_then(|f| f.bars.iter().find(|b| !b.0))
        .map(|b| b.1)
    else {
        return;
    };
    let tx_ring = RING_AREA + 0xe000;
    let rx_ring = RING_AREA + 0xf000;
    for ring in [tx_ring, rx_ring] {
        let mut bytes = Vec::with_capacity(16 * 16);
        for _ in 0..16 {
            let buffer = if rng.one_in(8) {
                rng.interesting_u64()
            } else {
                BUFFER_AREA + rng.below(BUFFER_AREA_SIZE)
            };
            let cmd = *rng.pick(&[
                0x0900_0000u32,
                0x2d00_0000,
                0x2000_0000,
                0x2f10_0000,
                0x2b10_0000,
            ]);
            let lower = cmd | (rng.next_u32() & if rng.one_in(4) { 0x00ff_ffff } else { 0x7ff });
            bytes.extend_from_slice(&buffer.to_le_bytes());
            bytes.extend_from_slice(&lower.to_le_bytes());
            bytes.extend_from_slice(&rng.next_u32().to_le_bytes());
        }
        qt.cmd(format!(
            "write {ring:#x} {:#x} {}",
            bytes.len(),
            hex(&bytes)
        ));
    }
    let len = if rng.one_in(8) {
        rng.next_u32()
    } else {
        16 * 16
    };
    for (reg, value) in [
        (0x3800u64, tx_ring as u32),
        (0x3804, 0),
        (0x3808, len),
        (0x400, 2),
        (0x2800, rx_ring as u32),
        (0x2804, 0),
        (0x2808, len),
        (0x100, 2 | (rng.next_u32() & 0x0607_f03c)),
        (0x0, rng.next_u32() & 0x4000_0000),
        (0x2818, rng.below(20) as u32),
        (0x3818, rng.below(20) as u32),
    ] {
        qt.cmd(format!("writel {:#x} {value:#x}", mmio + reg));
    }
    for _ in 0..rng.below(4) {
        qt.cmd(format!(
            "readl {:#x}",
            mmio + *rng.pick(&[0x8u64, 0xc0, 0x3810, 0x2810, 0x40d4])
        ));
    }
}

/// An rtl8139's C+ rings (descriptors with random flags, sizes, offload bits and MSS,
/// buffers in the buffer area or anywhere) or its classic buffers, the card enabled in one
/// mode or the other with random filters, then a transmit poll or status write.
fn rtl8139_sequence(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    let Some(mmio) = functions
        .iter()
        .find(|f| f.vendor_device == 0x8139_10ec)
        .and_then(|f| f.bars.iter().find(|b| !b.0))
        .map(|b| b.1)
    else {
        return;
    };
    let tx_ring = RING_AREA + 0xc000;
    let rx_ring = RING_AREA + 0xd000;
    for ring in [tx_ring, rx_ring] {
        let mut bytes = Vec::with_capacity(16 * 16);
        for i in 0..16 {
            let buffer = if rng.one_in(8) {
                rng.interesting_u64()
            } else {
                BUFFER_AREA + rng.below(BUFFER_AREA_SIZE)
            };
            // OWN, FS/LS or not, offloads and MSS at random; EOR on the last unless not.
            let mut opts1 = (1 << 31) | (rng.next_u32() & 0x3fff_ffff);
            if i == 15 && !rng.one_in(4) {
                opts1 |= 1 << 30;
            }
            bytes.extend_from_slice(&opts1.to_le_bytes());
            bytes.extend_from_slice(&rng.next_u32().to_le_bytes());
            bytes.extend_from_slice(&buffer.to_le_bytes());
        }
        qt.cmd(format!(
            "write {ring:#x} {:#x} {}",
            bytes.len(),
            hex(&bytes)
        ));
    }
    let cplus = rng.one_in(2);
    let mut regs = vec![
        (0x37u64, 4, 0x0c),
        (0x44, 4, rng.next_u32() & 0x0000_f8ff),
        (0x3c, 2, rng.next_u32() & 0xffff),
    ];
    if cplus {
        regs.extend([
            (0xe0, 2, 0x0003 | (rng.next_u32() & 0x0060)),
            (0x20, 4, tx_ring as u32),
            (0x24, 4, 0),
            (0xe4, 4, rx_ring as u32),
            (0xe8, 4, 0),
            (0xd9, 1, 0x40),
        ]);
    } else {
        let slot = rng.below(4);
        regs.extend([
            (0x30, 4, (BUFFER_AREA + rng.below(BUFFER_AREA_SIZE)) as u32),
            (
                0x20 + 4 * slot,
                4,
                (BUFFER_AREA + rng.below(BUFFER_AREA_SIZE)) as u32,
            ),
            (0x10 + 4 * slot, 4, rng.next_u32() & 0x1fff),
            (0x38, 2, rng.next_u32() & 0xffff),
        ]);
    }
    for (reg, width, value) in regs {
        let op = match width {
            1 => "writeb",
            2 => "writew",
            _ => "writel",
        };
        qt.cmd(format!("{op} {:#x} {value:#x}", mmio + reg));
    }
    for _ in 0..rng.below(4) {
        qt.cmd(format!(
            "readw {:#x}",
            mmio + *rng.pick(&[0x36u64, 0x3a, 0x3e, 0x60, 0x64])
        ));
    }
}

fn random_access(qt: &mut Qtest, rng: &mut Rng, functions: &[PciFunction]) {
    const OUT: [&str; 3] = ["outb", "outw", "outl"];
    const IN: [&str; 3] = ["inb", "inw", "inl"];
    const WRITE: [&str; 4] = ["writeb", "writew", "writel", "writeq"];
    const READ: [&str; 4] = ["readb", "readw", "readl", "readq"];
    match rng.below(20) {
        0..=4 => {
            let port = random_port(rng, functions);
            let value = rng.interesting_u64() as u32;
            qt.cmd(format!("{} {port:#x} {value:#x}", rng.pick(&OUT)));
        }
        5..=7 => {
            let port = random_port(rng, functions);
            qt.cmd(format!("{} {port:#x}", rng.pick(&IN)));
        }
        8..=11 => {
            let addr = random_mmio_address(rng, functions);
            let value = rng.interesting_u64();
            let op = rng.pick(&WRITE);
            let value = match *op {
                "writeb" => value & 0xff,
                "writew" => value & 0xffff,
                "writel" => value & 0xffff_ffff,
                _ => value,
            };
            qt.cmd(format!("{op} {addr:#x} {value:#x}"));
        }
        12..=13 => {
            let addr = random_mmio_address(rng, functions);
            qt.cmd(format!("{} {addr:#x}", rng.pick(&READ)));
        }
        14..=16 => {
            // PCI configuration: mostly the functions that exist, any register (BARs,
            // command, capabilities: MSI-X, virtio's), any width.
            let devfn = if rng.one_in(8) || functions.is_empty() {
                rng.below(256) as u32
            } else {
                rng.pick(functions).devfn
            };
            let reg = rng.below(256) as u32;
            qt.cmd(format!("outl 0xcf8 {:#x}", Qtest::pci_address(devfn, reg)));
            let port = 0xcfc + (reg & 3);
            let value = rng.interesting_u64() as u32;
            if rng.one_in(3) {
                qt.cmd(format!("{} {port:#x}", rng.pick(&IN)));
            } else {
                qt.cmd(format!("{} {port:#x} {value:#x}", rng.pick(&OUT)));
            }
        }
        17 => {
            let ns = rng.below(10_000_000);
            qt.cmd(format!("clock_step {ns}"));
        }
        18 if rng.one_in(2) => ide_sequence(qt, rng, functions),
        18 if rng.one_in(2) => uhci_sequence(qt, rng, functions),
        18 if rng.one_in(2) => e1000_sequence(qt, rng, functions),
        18 => rtl8139_sequence(qt, rng, functions),
        _ => {
            let virtio: Vec<u16> = functions
                .iter()
                .filter_map(|f| f.virtio_legacy_io())
                .collect();
            if !virtio.is_empty() {
                let io = *rng.pick(&virtio);
                dma_sequence(qt, rng, io);
            }
        }
    }
}

#[test]
fn random_port_mmio_pci_and_dma_sequences_leave_qomvm_answering() {
    let run = FuzzRun::from_env(0x1951_0005, 1500);
    let started = Instant::now();
    let mut qt = Qtest::start(env!("CARGO_BIN_EXE_qomvm"), "qomvm-fuzz-devices", |dir| {
        std::fs::write(dir.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("ide.raw"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("cd.raw"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("stick.raw"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("stick2.raw"), vec![0u8; 1 << 20]).unwrap();
        [
            "-drive",
            "file=disk.raw,format=raw,if=none,id=d0",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
            // QEMU's default card on a user network that reaches nothing outside.
            "-netdev",
            "user,id=n1,restrict=on",
            "-device",
            "e1000,netdev=n1",
            // libvirt's default card, on its own closed user network.
            "-netdev",
            "user,id=n2,restrict=on",
            "-device",
            "rtl8139,netdev=n2",
            "-device",
            "virtio-rng-pci",
            "-device",
            "virtio-balloon-pci",
            "-device",
            "virtio-gpu-pci",
            // A second VGA: the std VGA keeps the legacy ports, this one has its BARs.
            "-device",
            "virtio-vga",
            "-device",
            "pvpanic",
            "-device",
            "pvpanic-pci",
            "-device",
            "pc-testdev",
            "-device",
            "pci-testdev",
            "-device",
            "scratch",
            // The watchdog resets the machine when random writes arm and starve it.
            "-device",
            "i6300esb",
            // USB: the PIIX3's UHCI at 01.2 with a stick on port 1 and a hub on port 2
            // (a tablet and a keyboard behind it, reached when random control transfers
            // happen to enable the hub's ports).
            "-usb",
            "-drive",
            "file=stick.raw,format=raw,if=none,id=stick",
            "-device",
            "usb-storage,drive=stick,port=1",
            "-device",
            "usb-hub,port=2",
            "-device",
            "usb-tablet,port=2.1",
            "-device",
            "usb-kbd,port=2.2",
            // xHCI with a tablet and a stick of its own (random doorbells and rings).
            "-device",
            "qemu-xhci,id=xhci",
            "-device",
            "usb-tablet,bus=xhci.0",
            "-drive",
            "file=stick2.raw,format=raw,if=none,id=stick2",
            "-device",
            "usb-storage,bus=xhci.0,drive=stick2",
            // IDE: a disk on the primary channel, a CD on the secondary.
            "-drive",
            "file=ide.raw,format=raw,if=ide,index=0",
            "-drive",
            "file=cd.raw,format=raw,if=ide,index=2,media=cdrom",
        ]
        .map(String::from)
        .to_vec()
    });
    qt.seed = run.seed;
    let functions = program_bars(&mut qt);
    let names: Vec<String> = functions
        .iter()
        .map(|f| {
            format!(
                "{:02x}.{} {:08x}",
                f.devfn >> 3,
                f.devfn & 7,
                f.vendor_device
            )
        })
        .collect();
    // The plugged devices are there: virtio-blk, -net, -balloon, -rng (legacy ids), the
    // UHCI, the e1000, and their BARs have addresses.
    for device in [
        0x1001_1af4u32,
        0x1000_1af4,
        0x1002_1af4,
        0x1005_1af4,
        0x7020_8086,
        0x100e_8086,
    ] {
        assert!(
            functions
                .iter()
                .any(|f| f.vendor_device == device && !f.bars.is_empty()),
            "{device:08x} not found: {names:?}"
        );
    }
    let mut cases = 0;
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        qt.log.clear();
        qt.case = case;
        // Some cases program the BARs again: a machine reset or random configuration
        // writes may have moved or disabled them.
        let functions = if rng.one_in(25) {
            program_bars(&mut qt)
        } else {
            functions
                .iter()
                .map(|f| PciFunction {
                    bars: f.bars.clone(),
                    ..*f
                })
                .collect()
        };
        for _ in 0..32 {
            random_access(&mut qt, &mut rng, &functions);
        }
        qt.check_alive();
        cases += 1;
    }
    // SIGTERM ends the VM as QEMU does, with status 0.
    let pid = qt.child.id() as i32;
    // SAFETY: kill(2) of our own child, which has not been waited for.
    let killed = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(killed, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = qt.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "qomvm ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "SIGTERM after the fuzzing");
    println!(
        "{cases} cases (seed {:#x}) in {:.1} s on {names:?}",
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
