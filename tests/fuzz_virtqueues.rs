//! Virtqueue fuzzing over QEMU's qtest protocol (issue 19, item 5): the hostile rings a
//! random fuzzer rarely builds, made on purpose for every virtio device on the pc
//! (virtio-blk, -net, -rng, -balloon) and each of its queues: descriptor loops (a chain
//! back to its head, a descriptor naming itself), indirect tables that hold indirect
//! descriptors, loop inside, have a length of 0, 15 or 4 GiB, or lie outside RAM; buffers
//! of length 0 or 4 GiB; addresses past RAM, in the I/O APIC, at 2^64 - 16 (wrapping);
//! next indices and heads past the ring; an available index far ahead. After each case the
//! device must take a reset (which waits for its handler: a handler stuck in a loop hangs
//! it) and qomvm must still answer.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::time::Instant;

use test_support::fuzz::{FuzzRun, Rng};
use test_support::fuzz_qtest::{hex, program_bars, Qtest};

const RAM_SIZE: u64 = 64 << 20;
/// The ring (descriptor table, available ring, used ring), page aligned.
const RING: u64 = 0x10_0000;
/// Indirect tables.
const TABLES: u64 = 0x30_0000;
/// Buffers (random bytes: request headers, frames, frame numbers).
const BUFFERS: u64 = 0x40_0000;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// One descriptor: address, length, flags, next.
type Desc = (u64, u32, u16, u16);

fn encode(descs: &[Desc]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * descs.len());
    for &(addr, len, flags, next) in descs {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out
}

fn hostile_address(rng: &mut Rng) -> u64 {
    *rng.pick(&[
        RAM_SIZE - 8,
        RAM_SIZE,
        0xfec0_0000,
        0xe000_0000,
        u64::MAX - 15,
        u64::MAX,
        1 << 52,
        BUFFERS,
    ])
}

fn hostile_len(rng: &mut Rng) -> u32 {
    *rng.pick(&[0, 1, 15, 16, 0x1000, 0x10_0000, u32::MAX, u32::MAX - 15])
}

/// The descriptor table of a queue of `size` entries and the indirect table, for one
/// kind of hostile chain; the chain's head is descriptor 0.
fn hostile_ring(rng: &mut Rng, size: u16) -> (&'static str, Vec<Desc>, Vec<Desc>) {
    let mut table: Vec<Desc> = vec![(BUFFERS, 512, 0, 0); usize::from(size)];
    let mut indirect = Vec::new();
    let buffer = |rng: &mut Rng| BUFFERS + rng.below(0x1_0000);
    let kind = match rng.below(9) {
        0 => {
            // A chain back to its head: 0 -> 1 -> ... -> k -> 0.
            let k = 1 + rng.below(u64::from(size - 1).max(1)) as u16;
            for i in 0..=k.min(size - 1) {
                let next = if i == k.min(size - 1) { 0 } else { i + 1 };
                table[usize::from(i)] =
                    (buffer(rng), 64, NEXT | (rng.below(2) as u16 * WRITE), next);
            }
            "a chain back to its head"
        }
        1 => {
            table[0] = (buffer(rng), 64, NEXT, 0);
            "a descriptor naming itself"
        }
        2 => {
            // Indirect in indirect, down a few levels.
            let depth = 1 + rng.below(4);
            table[0] = (TABLES, 16, INDIRECT, 0);
            for level in 0..depth {
                indirect.push((
                    TABLES + 16 * (level + 1),
                    16,
                    INDIRECT | (NEXT * rng.below(2) as u16),
                    0,
                ));
            }
            indirect.push((buffer(rng), 64, 0, 0));
            table[0].1 = 16 * indirect.len() as u32;
            "indirect tables nested"
        }
        3 => {
            // A loop inside an indirect table.
            let n = 2 + rng.below(8) as u16;
            for i in 0..n {
                indirect.push((buffer(rng), 64, NEXT, (i + 1) % n));
            }
            table[0] = (TABLES, 16 * u32::from(n), INDIRECT, 0);
            "a loop in an indirect table"
        }
        4 => {
            // An indirect table of a hostile length or place.
            indirect.push((buffer(rng), 64, 0, 0));
            let addr = if rng.one_in(2) {
                TABLES
            } else {
                hostile_address(rng)
            };
            table[0] = (
                addr,
                *rng.pick(&[0, 15, 17, u32::MAX, 16 * 70_000]),
                INDIRECT,
                0,
            );
            "an indirect table of a hostile length or place"
        }
        5 => {
            // Buffers at hostile addresses, of hostile lengths, chained.
            let n = 1 + rng.below(u64::from(size).min(8)) as u16;
            for i in 0..n {
                let flags = if i + 1 < n { NEXT } else { 0 } | (rng.below(2) as u16 * WRITE);
                table[usize::from(i)] = (hostile_address(rng), hostile_len(rng), flags, i + 1);
            }
            "buffers at hostile addresses"
        }
        6 => {
            // Zero and huge lengths in RAM.
            let n = 1 + rng.below(u64::from(size).min(8)) as u16;
            for i in 0..n {
                let flags = if i + 1 < n { NEXT } else { 0 } | (rng.below(2) as u16 * WRITE);
                table[usize::from(i)] = (buffer(rng), hostile_len(rng), flags, i + 1);
            }
            "zero and huge lengths"
        }
        7 => {
            // A next index past the ring.
            table[0] = (
                buffer(rng),
                64,
                NEXT,
                size.wrapping_add(rng.below(1000) as u16),
            );
            "a next index past the ring"
        }
        _ => {
            // An indirect descriptor in the middle of a chain, with NEXT as well.
            indirect.push((buffer(rng), 64, 0, 0));
            table[0] = (buffer(rng), 16, NEXT, 1);
            table[1] = (TABLES, 16, INDIRECT | NEXT, 2);
            table[2] = (buffer(rng), 16, WRITE, 0);
            "an indirect descriptor mid-chain"
        }
    };
    (kind, table, indirect)
}

#[test]
fn hostile_virtqueues_leave_every_virtio_device_resettable() {
    let run = FuzzRun::from_env(0x1951_0e0e, 3000);
    let started = Instant::now();
    let mut qt = Qtest::start(
        env!("CARGO_BIN_EXE_qomvm"),
        "qomvm-fuzz-virtqueues",
        |dir| {
            std::fs::write(dir.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
            [
                "-drive",
                "file=disk.raw,format=raw,if=none,id=d0",
                "-device",
                "virtio-blk-pci,drive=d0",
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,ctrl_vq=on",
                "-device",
                "virtio-rng-pci",
                "-device",
                "virtio-balloon-pci",
                "-chardev",
                "ringbuf,id=vcon",
                "-chardev",
                "ringbuf,id=vport",
                "-device",
                "virtio-serial-pci,id=vs0",
                "-device",
                "virtconsole,chardev=vcon",
                "-device",
                "virtserialport,chardev=vport,name=fuzz",
            ]
            .map(String::from)
            .to_vec()
        },
    );
    qt.seed = run.seed;
    let devices: Vec<(u32, u16)> = program_bars(&mut qt)
        .iter()
        .filter_map(|f| f.virtio_legacy_io().map(|io| (f.vendor_device >> 16, io)))
        .collect();
    assert_eq!(devices.len(), 5, "five virtio devices: {devices:?}");
    let mut kinds = std::collections::BTreeMap::<&str, u32>::new();
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        qt.log.clear();
        qt.case = case;
        let (_, io) = *rng.pick(&devices);
        // Reset, then a queue of the device, the guest taking every feature offered
        // (indirect descriptors, event index, the control queue...).
        qt.cmd(format!("outb {:#x} 0", io + 0x12));
        qt.cmd(format!("outb {:#x} 3", io + 0x12));
        let features = qt.value(format!("inl {io:#x}"));
        qt.cmd(format!("outl {:#x} {features:#x}", io + 0x04));
        // Up to the fourth queue: virtio-serial's control queue from the guest.
        let queue = rng.below(4) as u16;
        qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x0e));
        let size = qt.value(format!("inw {:#x}", io + 0x0c)) as u16;
        if size == 0 {
            continue;
        }
        let (kind, table, indirect) = hostile_ring(&mut rng, size);
        *kinds.entry(kind).or_default() += 1;
        let data = rng.bytes(0x1000);
        qt.cmd(format!("write {BUFFERS:#x} 0x1000 {}", hex(&data)));
        if !indirect.is_empty() {
            let bytes = encode(&indirect);
            qt.cmd(format!(
                "write {TABLES:#x} {:#x} {}",
                bytes.len(),
                hex(&bytes)
            ));
        }
        let bytes = encode(&table);
        qt.cmd(format!(
            "write {RING:#x} {:#x} {}",
            bytes.len(),
            hex(&bytes)
        ));
        // The available ring: flags 0, then idx, then the heads (descriptor 0, or one past
        // the ring now and then); sometimes an idx far ahead.
        let avail = RING + 16 * u64::from(size);
        let idx: u16 = if rng.one_in(8) {
            size.wrapping_add(rng.below(30_000) as u16)
        } else {
            1 + rng.below(3) as u16
        };
        let mut ring = vec![0u8, 0];
        ring.extend_from_slice(&idx.to_le_bytes());
        for _ in 0..4 {
            let head: u16 = if rng.one_in(8) {
                size + rng.below(100) as u16
            } else {
                0
            };
            ring.extend_from_slice(&head.to_le_bytes());
        }
        qt.cmd(format!("write {avail:#x} {:#x} {}", ring.len(), hex(&ring)));
        qt.cmd(format!("outl {:#x} {:#x}", io + 0x08, RING >> 12));
        qt.cmd(format!("outb {:#x} 7", io + 0x12));
        qt.cmd(format!("outw {:#x} {queue:#x}", io + 0x10));
        // Let the event loop take it, then check the status and ISR, and that a reset
        // (waiting for the handler) comes back.
        qt.cmd("clock_step 1000000".to_string());
        qt.cmd(format!("inb {:#x}", io + 0x12));
        qt.cmd(format!("inb {:#x}", io + 0x13));
        qt.cmd(format!("outb {:#x} 0", io + 0x12));
        qt.check_alive();
    }
    println!(
        "{kinds:?} on {devices:x?} (seed {:#x}) in {:.1} s",
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
