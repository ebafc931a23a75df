//! The hand-assembled test guests (`test_support::guest`) run on raw KVM
//! (`test_support::raw_kvm`) and do what they claim, in every mode.
//!
//! Tests that need KVM print a reason and pass when /dev/kvm is unusable.

use test_support::{guest, raw_kvm};

use guest::{build, smp_apic_id_reporter, GuestImage, Mode, Op, LOAD_ADDR};
use raw_kvm::{RawExit, RawLoop, Stop};

const EXIT_PORT: u16 = 0xf4;
const MEM: usize = 1 << 20;
const MMIO_VALUE: u32 = 0x1122_3344;
const IN_VALUE: u8 = 0xab;

fn kvm_ok() -> bool {
    match raw_kvm::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            test_support::skip::skip_kvm(format!("/dev/kvm not usable: {e}"));
            false
        }
    }
}

fn io_out(port: u16, data: &[u8]) -> RawExit {
    RawExit::IoOut {
        port,
        size: data.len() as u8,
        count: 1,
        data: data.to_vec(),
    }
}

fn io_in(port: u16, size: u8) -> RawExit {
    RawExit::IoIn {
        port,
        size,
        count: 1,
    }
}

/// Splits off the leading exits for `port` (string I/O may come as one
/// exit or several).
fn take_string_io(exits: &mut &[RawExit], want_port: u16) -> (Vec<u32>, Vec<u8>, u32) {
    let mut counts = Vec::new();
    let mut bytes = Vec::new();
    let mut total = 0;
    while let Some(e) = exits.first() {
        match e {
            RawExit::IoOut {
                port,
                size: 1,
                count,
                data,
            } if *port == want_port => {
                counts.push(*count);
                bytes.extend_from_slice(data);
                total += count;
            }
            RawExit::IoIn {
                port,
                size: 1,
                count,
            } if *port == want_port => {
                counts.push(*count);
                total += count;
            }
            _ => break,
        }
        *exits = &exits[1..];
    }
    (counts, bytes, total)
}

fn check_ops(mode: Mode) {
    if !kvm_ok() {
        return;
    }
    let outs_data = vec![0x10, 0x20, 0x30, 0x40, 0x50];
    let ops = [
        Op::OutB {
            port: 0x80,
            value: 0x12,
        },
        Op::OutW {
            port: 0x81,
            value: 0x3456,
        },
        Op::OutL {
            port: 0x3f8,
            value: 0x789a_bcde,
        },
        Op::InB { port: 0x60 },
        Op::InW { port: 0x64 },
        Op::InL { port: 0xcfc },
        Op::EchoInB {
            from: 0x61,
            to: 0x62,
        },
        Op::OutsB {
            port: 0x90,
            data: outs_data.clone(),
        },
        Op::InsB {
            port: 0x91,
            count: 4,
        },
        Op::MmioWriteL {
            addr: 0xfe00_0000,
            value: 0xdead_beef,
        },
        // Last op: its value stays in EAX[31:8] (the exit only sets AL).
        Op::MmioReadL { addr: 0xfe00_0ffc },
    ];
    let image = build(mode, &ops, EXIT_PORT, 0x33);
    assert_eq!(image.load_addr, LOAD_ADDR);
    assert_eq!(image.entry, LOAD_ADDR);
    let t = std::time::Instant::now();
    let run = raw_kvm::run(&image, MEM, MMIO_VALUE, IN_VALUE, 100);
    eprintln!(
        "{mode:?}: {} exits in {:?}: {:?}",
        run.exits.len(),
        t.elapsed(),
        run.exits
    );
    assert_eq!(run.stop, Stop::ExitPort(0x33), "{:?}", run.exits);
    assert_eq!(run.exit_code, Some(0x33));
    assert_eq!(run.exits.last(), Some(&io_out(EXIT_PORT, &[0x33])));

    let mut exits = run.io_exits();
    let expect_head = [
        io_out(0x80, &[0x12]),
        io_out(0x81, &0x3456u16.to_le_bytes()),
        io_out(0x3f8, &0x789a_bcdeu32.to_le_bytes()),
        io_in(0x60, 1),
        io_in(0x64, 2),
        io_in(0xcfc, 4),
        io_in(0x61, 1),
        // The value returned by the VMM reached the guest and came back.
        io_out(0x62, &[IN_VALUE]),
    ];
    assert_eq!(&exits[..expect_head.len()], &expect_head);
    exits = &exits[expect_head.len()..];

    let (counts, bytes, total) = take_string_io(&mut exits, 0x90);
    eprintln!("{mode:?}: rep outsb x5 -> exit counts {counts:?}");
    assert_eq!(total, 5);
    assert_eq!(bytes, outs_data);

    let (counts, _, total) = take_string_io(&mut exits, 0x91);
    eprintln!("{mode:?}: rep insb x4 -> exit counts {counts:?}");
    assert_eq!(total, 4);
    assert_eq!(run.mem(image.ins_buffers[0], 4), &[IN_VALUE; 4]);

    assert_eq!(
        exits,
        &[
            RawExit::MmioWrite {
                addr: 0xfe00_0000,
                data: 0xdead_beefu32.to_le_bytes().to_vec(),
            },
            RawExit::MmioRead {
                addr: 0xfe00_0ffc,
                len: 4,
            },
        ]
    );
    assert_eq!(
        run.regs.rax as u32 & 0xffff_ff00,
        MMIO_VALUE & 0xffff_ff00,
        "MMIO read value reached EAX"
    );

    // The image really switched modes.
    let (cr0, efer) = (run.sregs.cr0, run.sregs.efer);
    match mode {
        Mode::Real => assert_eq!(cr0 & 1, 0, "CR0.PE clear"),
        Mode::Protected32 => {
            assert_eq!(cr0 & 0x8000_0001, 1, "CR0.PE set, CR0.PG clear");
            assert_eq!(run.sregs.cs.selector, guest::SEL_CODE32);
            assert_eq!(run.sregs.cs.db, 1);
        }
        Mode::Long64 => {
            assert_eq!(cr0 & 0x8000_0001, 0x8000_0001, "CR0.PE and CR0.PG set");
            assert_ne!(efer & (1 << 10), 0, "EFER.LMA set");
            assert_eq!(run.sregs.cs.selector, guest::SEL_CODE64);
            assert_eq!(run.sregs.cs.l, 1);
        }
    }
}

#[test]
fn real_mode_ops() {
    check_ops(Mode::Real);
}

#[test]
fn protected32_ops() {
    check_ops(Mode::Protected32);
}

#[test]
fn long64_ops() {
    check_ops(Mode::Long64);
}

#[test]
fn triple_fault_shuts_down() {
    if !kvm_ok() {
        return;
    }
    for mode in [Mode::Real, Mode::Protected32, Mode::Long64] {
        let image = build(
            mode,
            &[
                Op::OutB {
                    port: 0x80,
                    value: 1,
                },
                Op::TripleFault,
                Op::OutB {
                    port: 0x80,
                    value: 2,
                },
            ],
            EXIT_PORT,
            0,
        );
        let run = raw_kvm::run(&image, MEM, 0, 0, 10);
        assert_eq!(run.stop, Stop::Shutdown, "{mode:?}: {:?}", run.exits);
        assert_eq!(
            run.exits,
            [io_out(0x80, &[1]), RawExit::Shutdown],
            "{mode:?}"
        );
    }
}

#[test]
fn hlt_exits() {
    if !kvm_ok() {
        return;
    }
    for mode in [Mode::Real, Mode::Long64] {
        let image = build(mode, &[Op::Hlt], EXIT_PORT, 0);
        let run = raw_kvm::run(&image, MEM, 0, 0, 10);
        assert_eq!(run.stop, Stop::Hlt, "{mode:?}");
        assert_eq!(run.exits, [RawExit::Hlt]);
    }
}

#[test]
fn smp_reporter_on_one_vcpu() {
    if !kvm_ok() {
        return;
    }
    let image = smp_apic_id_reporter(0x70, EXIT_PORT, 7, 1);
    let run = raw_kvm::run(&image, MEM, 0, 0, 10);
    assert_eq!(
        run.exits,
        [io_out(0x70, &[0]), io_out(EXIT_PORT, &[7])],
        "APIC ID 0 reported, then the exit port"
    );
}

#[test]
fn raw_loop_round_trip() {
    if !kvm_ok() {
        return;
    }
    const N: u32 = 10_000;
    for mode in [Mode::Real, Mode::Protected32, Mode::Long64] {
        let image = build(mode, &[Op::Loop { port: 0x80 }], EXIT_PORT, 0);
        let mut l = RawLoop::new(&image, 0x80).expect("RawLoop");
        let limit = std::time::Duration::from_secs(30);
        l.run_exits(100, limit).expect("warm-up");
        let per = l.run_exits(N.into(), limit).expect("loop") / N;
        eprintln!("{mode:?}: raw KVM_RUN out-exit round trip {per:?} ({N} exits)");
    }
    // A loop on the wrong port is reported, not miscounted.
    let image = build(Mode::Real, &[Op::Loop { port: 0x81 }], EXIT_PORT, 0);
    let mut l = RawLoop::new(&image, 0x80).expect("RawLoop");
    assert!(l.run_exits(1, std::time::Duration::from_secs(5)).is_err());
}

#[test]
fn silent_guest_times_out() {
    if !kvm_ok() {
        return;
    }
    // `jmp $` never exits to user space.
    let image = GuestImage {
        load_addr: LOAD_ADDR,
        bytes: vec![0xeb, 0xfe],
        mode: Mode::Real,
        entry: LOAD_ADDR,
        exit_port: EXIT_PORT,
        ins_buffers: Vec::new(),
    };
    let t = std::time::Instant::now();
    let run =
        raw_kvm::run_with_timeout(&image, MEM, 0, 0, 10, std::time::Duration::from_millis(200));
    assert_eq!(run.stop, Stop::Timeout);
    assert!(run.exits.is_empty());
    assert!(t.elapsed() < std::time::Duration::from_secs(3));
    assert_eq!(run.regs.rip, LOAD_ADDR);
}

// --- Image layout (no KVM needed) ------------------------------------------

fn assert_fits_real_mode(image: &GuestImage) {
    assert!(image.load_addr + image.bytes.len() as u64 <= 0x1_0000);
}

#[test]
fn real_mode_encoding() {
    let image = build(
        Mode::Real,
        &[Op::OutB {
            port: 0x80,
            value: 0x12,
        }],
        EXIT_PORT,
        0x33,
    );
    assert_fits_real_mode(&image);
    #[rustfmt::skip]
    let expect: &[u8] = &[
        0xfa,                   // cli
        0x31, 0xc0,             // xor ax, ax
        0x8e, 0xd8,             // mov ds, ax
        0x8e, 0xc0,             // mov es, ax
        0x8e, 0xd0,             // mov ss, ax
        0xbc, 0x00, 0x80,       // mov sp, 0x8000
        0xba, 0x80, 0x00,       // mov dx, 0x80
        0xb0, 0x12,             // mov al, 0x12
        0xee,                   // out dx, al
        0xba, 0xf4, 0x00,       // mov dx, 0xf4
        0xb0, 0x33,             // mov al, 0x33
        0xee,                   // out dx, al
        0xf4,                   // 1: hlt
        0xeb, 0xfd,             // jmp 1b
    ];
    assert_eq!(image.bytes, expect);
}

#[test]
fn long_mode_page_tables_identity_map_4g() {
    let image = build(Mode::Long64, &[], EXIT_PORT, 0);
    assert_fits_real_mode(&image);
    let len = image.bytes.len();
    // The page tables are the last 24 KiB, 4 KiB-aligned.
    let pml4 = len - 6 * 4096;
    assert_eq!((image.load_addr as usize + pml4) % 4096, 0);
    let entry = |off: usize| u64::from_le_bytes(image.bytes[off..off + 8].try_into().unwrap());
    let base = image.load_addr;
    assert_eq!(entry(pml4), base + pml4 as u64 + 0x1000 + 3);
    for gib in 0..4u64 {
        let pd = entry(pml4 + 0x1000 + gib as usize * 8) & !0xfff;
        let pd_off = (pd - base) as usize;
        for j in [0u64, 1, 511] {
            let pde = entry(pd_off + j as usize * 8);
            assert_eq!(pde, ((gib * 512 + j) << 21) | 0x83);
        }
    }
}
