//! The pc's parallel port (`hw/char/parallel.rs`): QEMU's default LPT1, `-parallel`,
//! `-device isa-parallel`, the printer handshake over QEMU's qtest protocol with the
//! bytes landing in the chardev, its interrupt, the DSDT's `PNP0400`, and bad input.

use std::time::Duration;

use test_support::fuzz_qtest::Qtest;

const QOMVM: &str = env!("CARGO_BIN_EXE_qomvm");

fn start(name: &str, args: impl FnOnce(&std::path::Path) -> Vec<String>) -> Qtest {
    Qtest::start(QOMVM, name, args)
}

fn inb(q: &mut Qtest, port: u16) -> u8 {
    q.value(format!("inb {port:#x}")) as u8
}

/// Prints `bytes` the way Linux's `lp` driver does: data, then a strobe pulse with the
/// printer selected and out of reset, waiting for the status to say ready in between.
fn print(q: &mut Qtest, base: u16, bytes: &[u8]) {
    for &b in bytes {
        q.cmd(format!("outb {base:#x} {b:#x}"));
        q.cmd(format!("outb {:#x} 0x0d", base + 2));
        q.cmd(format!("outb {:#x} 0x0c", base + 2));
        let mut ready = false;
        for _ in 0..4 {
            if inb(q, base + 1) & 0x80 != 0 {
                ready = true;
                break;
            }
        }
        assert!(ready, "the printer stayed busy");
    }
}

#[test]
fn the_pc_has_lpt1_by_default_and_nodefaults_takes_it_away() {
    let mut q = start("lpt-default", |_| Vec::new());
    // QEMU's reset values: ready, acknowledged, online, no error, timeout; selected, out
    // of reset, bits 6-7 set.
    assert_eq!(inb(&mut q, 0x379), 0xd9);
    assert_eq!(inb(&mut q, 0x37a), 0xcc);
    // Nothing at LPT2 and LPT3.
    assert_eq!(inb(&mut q, 0x279), 0xff);
    assert_eq!(inb(&mut q, 0x3bd), 0xff);
    q.check_alive();
    drop(q);
    let mut q = start("lpt-nodefaults", |_| vec!["-nodefaults".into()]);
    assert_eq!(inb(&mut q, 0x379), 0xff);
    assert_eq!(inb(&mut q, 0x37a), 0xff);
    q.check_alive();
}

#[test]
fn printed_bytes_reach_the_chardev_and_the_interrupt_follows_the_strobe() {
    let mut file = std::path::PathBuf::new();
    let mut q = start("lpt-print", |dir| {
        file = dir.join("lpt1.out");
        vec!["-parallel".into(), format!("file:{}", file.display())]
    });
    print(&mut q, 0x378, b"Hello, printer\n");
    // The data register reads back what was written.
    assert_eq!(inb(&mut q, 0x378), b'\n');
    // INTEN: releasing the strobe raises IRQ 7 until the status register is read.
    assert_eq!(q.cmd("irq_intercept_in ioapic".into()), "OK");
    q.cmd("outb 0x378 0x21".into());
    q.cmd("outb 0x37a 0x1d".into());
    let (_, irqs) = q.cmd_irqs("outb 0x37a 0x1c".into());
    assert_eq!(irqs, ["IRQ raise 7"]);
    let (_, irqs) = q.cmd_irqs("inb 0x379".into());
    assert_eq!(irqs, ["IRQ lower 7"]);
    q.check_alive();
    // The file has every strobed byte, in order.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::fs::read(&file).unwrap_or_default();
        if out == b"Hello, printer\n!" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_device_or_parallel_none_takes_the_defaults_place() {
    // An isa-parallel -device replaces the default LPT1, as in QEMU.
    let mut file = std::path::PathBuf::new();
    let mut q = start("lpt-replace", |dir| {
        file = dir.join("lpt.out");
        vec![
            "-chardev".into(),
            format!("file,id=c,path={}", file.display()),
            "-device".into(),
            "isa-parallel,chardev=c".into(),
        ]
    });
    print(&mut q, 0x378, b"x");
    assert_eq!(inb(&mut q, 0x279), 0xff, "no second port");
    // Ports are bytes: a dword reads all ones and leaves the handshake alone.
    let status = inb(&mut q, 0x379);
    assert_eq!(q.value("inl 0x378".into()), 0xffff_ffff);
    assert_eq!(inb(&mut q, 0x379), status);
    drop(q);
    // `-parallel none` takes no LPT index: the next one is LPT1.
    let mut q = start("lpt-none", |dir| {
        vec![
            "-parallel".into(),
            "none".into(),
            "-parallel".into(),
            format!("file:{}", dir.join("p.out").display()),
        ]
    });
    assert_eq!(inb(&mut q, 0x379), 0xd9);
    assert_eq!(inb(&mut q, 0x279), 0xff);
    q.check_alive();
}

#[test]
fn device_ports_take_the_next_index_and_a_chardev() {
    let mut files = Vec::new();
    let mut q = start("lpt-device", |dir| {
        let mut args: Vec<String> = vec!["-nodefaults".into()];
        for n in 0..3 {
            let file = dir.join(format!("p{n}.out"));
            args.extend([
                "-chardev".into(),
                format!("file,id=p{n},path={}", file.display()),
                "-device".into(),
                format!("isa-parallel,chardev=p{n},id=lpt{n}"),
            ]);
            files.push(file);
        }
        args
    });
    for (n, base) in [0x378u16, 0x278, 0x3bc].into_iter().enumerate() {
        assert_eq!(inb(&mut q, base + 1), 0xd9, "LPT{}", n + 1);
        print(&mut q, base, format!("port {n}").as_bytes());
    }
    q.check_alive();
    for (n, file) in files.iter().enumerate() {
        let want = format!("port {n}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(file).unwrap_or_default() != want {
            assert!(std::time::Instant::now() < deadline, "{}", file.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn refused(args: &[&str]) -> String {
    test_support::qtest::qomvm_pc_refused(QOMVM, args)
}

#[test]
fn bad_parallel_options_are_one_line_errors_in_qemus_words() {
    assert_eq!(
        refused(&[
            "-parallel",
            "null",
            "-parallel",
            "null",
            "-parallel",
            "null",
            "-parallel",
            "null"
        ]),
        "qomvm: -parallel null: too many parallel ports\n"
    );
    assert_eq!(
        refused(&["-parallel", "bogus:x"]),
        "qomvm: -parallel bogus:x: 'bogus' is not a valid char driver name\n"
    );
    assert_eq!(
        refused(&["-device", "isa-parallel"]),
        "qomvm: -device isa-parallel: Can't create parallel device, empty char device\n"
    );
    assert_eq!(
        refused(&["-device", "isa-parallel,chardev=nope"]),
        "qomvm: -device isa-parallel,chardev=nope: Property 'isa-parallel.chardev' can't find value 'nope'\n"
    );
    assert_eq!(
        refused(&["-chardev", "null,id=c", "-device", "isa-parallel,chardev=c,index=3"]),
        "qomvm: -device isa-parallel,chardev=c,index=3: Max. supported number of parallel ports is 3.\n"
    );
}

#[test]
fn the_dsdt_describes_lpt1() {
    let seabios = "/usr/share/seabios/bios-256k.bin";
    if !std::path::Path::new(seabios).exists() {
        test_support::skip::skip(format!("{seabios} is missing (Debian package seabios)"));
        return;
    }
    let has = |t: &[u8], needle: &[u8]| t.windows(needle.len()).any(|w| w == needle);
    let mut q = start("lpt-acpi", |_| vec!["-bios".into(), seabios.into()]);
    let tables = q.fw_cfg_file("etc/acpi/tables").expect("etc/acpi/tables");
    // EISAID("PNP0400"); IO(Decode16, 0x378, 0x378, 8, 8), IRQNoFlags() {7}.
    assert!(has(&tables, &[0x0c, 0x41, 0xd0, 0x04, 0x00]), "PNP0400");
    assert!(has(&tables, b"LPT1"));
    assert!(has(
        &tables,
        &[0x47, 0x01, 0x78, 0x03, 0x78, 0x03, 0x08, 0x08, 0x22, 0x80, 0x00]
    ));
    q.check_alive();
}
