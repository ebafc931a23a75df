//! `fw_cfg_io` on the qtest accelerator: the selector/data ports and the DMA interface as a
//! guest drives them, against a `none` machine with RAM (outside the process's `/machine`).

use hw::core::machine::{machine_state, SmpConfig};
use hw::core::qdev::{qdev_unrealize, DeviceMethods};
use hw::nvram::fw_cfg::*;
use qom::{ObjectRef, Typed, Value};
use vm_memory::{Bytes, GuestAddress};

const RAM_SIZE: u64 = 16 << 20;

fn machine_with_fw_cfg(dma: bool) -> (ObjectRef, Typed<FwCfgIo>) {
    hw::init().expect("registrations are intact");
    accel::init().expect("registrations are intact");
    let machine = qom::object_new("none-machine").unwrap();
    let ms = machine_state(&machine).unwrap();
    ms.set_ram_size(RAM_SIZE);
    ms.set_smp(SmpConfig {
        cpus: 2,
        sockets: 1,
        cores: 4,
        threads: 1,
        max_cpus: 4,
    });
    let qtest = accel::accel_find("qtest").unwrap();
    accel::accel_init_machine(qtest, &machine).unwrap();
    ms.add_ram(0, RAM_SIZE).unwrap();
    let dev = fw_cfg_init_io_dma(ms, FW_CFG_IO_BASE, dma.then_some(FW_CFG_DMA_IO_BASE)).unwrap();
    (machine, dev)
}

/// Selects `key` and reads `n` bytes from the data port, as a guest's `inb` loop does.
fn read_item(machine: &ObjectRef, key: u16, n: usize) -> Vec<u8> {
    let io = machine_state(machine).unwrap().system_io().clone();
    io.write(u64::from(FW_CFG_IO_BASE), key.into(), 2);
    (0..n)
        .map(|_| io.read(u64::from(FW_CFG_IO_BASE) + 1, 1) as u8)
        .collect()
}

/// Writes an `FWCfgDmaAccess` at `desc`, starts it as a guest does (two big-endian 32-bit
/// halves) and returns the control word the device wrote back.
fn dma(machine: &ObjectRef, desc: u64, control: u32, length: u32, address: u64) -> u32 {
    let ms = machine_state(machine).unwrap();
    let mut d = Vec::new();
    d.extend_from_slice(&control.to_be_bytes());
    d.extend_from_slice(&length.to_be_bytes());
    d.extend_from_slice(&address.to_be_bytes());
    ms.ram().write_slice(&d, GuestAddress(desc)).unwrap();
    let io = ms.system_io();
    // iowrite32be: the port sees the byte-swapped register value.
    io.write(
        u64::from(FW_CFG_DMA_IO_BASE),
        u64::from(((desc >> 32) as u32).swap_bytes()),
        4,
    );
    io.write(
        u64::from(FW_CFG_DMA_IO_BASE) + 4,
        u64::from((desc as u32).swap_bytes()),
        4,
    );
    let mut status = [0u8; 4];
    ms.ram()
        .read_slice(&mut status, GuestAddress(desc))
        .unwrap();
    u32::from_be_bytes(status)
}

#[test]
fn signature_id_ram_size_and_cpus_read_through_the_data_port() {
    let (machine, dev) = machine_with_fw_cfg(true);
    assert_eq!(read_item(&machine, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
    assert_eq!(
        read_item(&machine, FW_CFG_ID, 4),
        (FW_CFG_VERSION | FW_CFG_VERSION_DMA).to_le_bytes()
    );
    assert_eq!(
        read_item(&machine, FW_CFG_RAM_SIZE, 8),
        RAM_SIZE.to_le_bytes()
    );
    assert_eq!(read_item(&machine, FW_CFG_NB_CPUS, 2), 2u16.to_le_bytes());
    assert_eq!(read_item(&machine, FW_CFG_MAX_CPUS, 2), 4u16.to_le_bytes());
    // The board can store the APIC-ID limit instead, as QEMU's x86 board does.
    dev.add_i16(FW_CFG_MAX_CPUS, 8).unwrap();
    assert_eq!(read_item(&machine, FW_CFG_MAX_CPUS, 2), 8u16.to_le_bytes());
    // Reselecting rewinds; either port of the pair selects and reads.
    let io = machine_state(&machine).unwrap().system_io().clone();
    io.write(u64::from(FW_CFG_IO_BASE) + 1, 0, 2);
    assert_eq!(io.read(u64::from(FW_CFG_IO_BASE), 1), u64::from(b'Q'));
    // Byte writes (the old write channel) change nothing.
    io.write(u64::from(FW_CFG_IO_BASE) + 1, 0x55, 1);
    assert_eq!(io.read(u64::from(FW_CFG_IO_BASE) + 1, 1), u64::from(b'E'));
    assert!(fw_cfg_find(&machine).is_some_and(|d| std::sync::Arc::ptr_eq(d.object(), dev.object())));
}

#[test]
fn without_dma_the_id_says_so_and_the_dma_ports_are_free() {
    let (machine, _dev) = machine_with_fw_cfg(false);
    assert_eq!(
        read_item(&machine, FW_CFG_ID, 4),
        FW_CFG_VERSION.to_le_bytes()
    );
    let io = machine_state(&machine).unwrap().system_io().clone();
    assert_eq!(io.read(u64::from(FW_CFG_DMA_IO_BASE), 4), 0xffff_ffff);
}

#[test]
fn unknown_and_invalid_keys_and_reads_past_the_end_are_zeros() {
    let (machine, dev) = machine_with_fw_cfg(true);
    dev.add_bytes(FW_CFG_ARCH_LOCAL + 0x10, vec![7, 8]).unwrap();
    assert_eq!(read_item(&machine, 0x1f, 4), [0; 4]);
    assert_eq!(read_item(&machine, 0x3fff, 4), [0; 4]);
    assert_eq!(read_item(&machine, 0xffff, 4), [0; 4]);
    assert_eq!(
        read_item(&machine, FW_CFG_ARCH_LOCAL + 0x10, 4),
        [7, 8, 0, 0]
    );
    assert_eq!(read_item(&machine, FW_CFG_ARCH_LOCAL + 0x11, 2), [0, 0]);
}

#[test]
fn files_are_listed_sorted_in_the_directory_and_read_by_their_key() {
    let (machine, dev) = machine_with_fw_cfg(true);
    assert_eq!(read_item(&machine, FW_CFG_FILE_DIR, 4), [0; 4]);
    let b = dev.add_file("etc/zeta", b"last".to_vec()).unwrap();
    assert_eq!(b, FW_CFG_FILE_FIRST);
    let a = dev.add_file("etc/alpha", b"first file".to_vec()).unwrap();
    // Sorted by name: "etc/alpha" takes 0x20, "etc/zeta" moves to 0x21 (QEMU does this too).
    assert_eq!(a, FW_CFG_FILE_FIRST);
    assert_eq!(dev.file_key("etc/zeta"), Some(FW_CFG_FILE_FIRST + 1));

    let dir = read_item(
        &machine,
        FW_CFG_FILE_DIR,
        4 + 2 * FW_CFG_FILE_ENTRY_SIZE + 4,
    );
    assert_eq!(&dir[..4], &2u32.to_be_bytes());
    let entry =
        |i: usize| &dir[4 + i * FW_CFG_FILE_ENTRY_SIZE..4 + (i + 1) * FW_CFG_FILE_ENTRY_SIZE];
    let parse = |e: &[u8]| {
        let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
        let select = u16::from_be_bytes(e[4..6].try_into().unwrap());
        let name: Vec<u8> = e[8..].iter().copied().take_while(|&c| c != 0).collect();
        (size, select, String::from_utf8(name).unwrap())
    };
    assert_eq!(parse(entry(0)), (10, 0x20, "etc/alpha".to_string()));
    assert_eq!(parse(entry(1)), (4, 0x21, "etc/zeta".to_string()));
    assert_eq!(&entry(0)[6..8], &[0, 0], "reserved field");
    assert_eq!(&dir[dir.len() - 4..], &[0; 4], "past the directory's end");

    // Look the file up in the directory as a guest does, then read it.
    let (size, select, _) = parse(entry(1));
    assert_eq!(read_item(&machine, select, size as usize + 1), b"last\0");

    assert!(matches!(
        dev.add_file("etc/zeta", vec![]),
        Err(FwCfgError::DuplicateFile(_))
    ));
    assert!(matches!(
        dev.add_file(&"x".repeat(56), vec![]),
        Err(FwCfgError::NameTooLong(_))
    ));
    dev.add_file(&"y".repeat(55), vec![]).unwrap();
    assert!(matches!(
        dev.add_bytes(FW_CFG_FILE_FIRST + 5, vec![1]),
        Err(FwCfgError::FileKey(_))
    ));
    assert!(matches!(
        dev.add_bytes(0x4001, vec![1]),
        Err(FwCfgError::BadKey(_))
    ));
}

#[test]
fn the_file_slots_run_out() {
    let (_machine, dev) = machine_with_fw_cfg(true);
    for i in 0..FW_CFG_FILE_SLOTS_DFLT {
        dev.add_file(&format!("f{i:02}"), vec![i as u8]).unwrap();
    }
    assert!(matches!(
        dev.add_file("one-more", vec![]),
        Err(FwCfgError::NoFileSlots(0x20))
    ));
    assert_eq!(dev.item(FW_CFG_FILE_FIRST + 0x1f), Some(vec![0x1f]));
}

#[test]
fn the_dma_port_reads_as_the_signature() {
    let (machine, _dev) = machine_with_fw_cfg(true);
    let io = machine_state(&machine).unwrap().system_io().clone();
    let base = u64::from(FW_CFG_DMA_IO_BASE);
    assert_eq!(
        u64::from_be_bytes(io.read(base, 8).to_le_bytes()),
        FW_CFG_DMA_SIGNATURE
    );
    assert_eq!((io.read(base, 4) as u32).to_le_bytes(), *b"QEMU");
    assert_eq!((io.read(base + 4, 4) as u32).to_le_bytes(), *b" CFG");
    assert_eq!(io.read(base + 7, 1), u64::from(b'G'));
}

#[test]
fn dma_selects_reads_skips_and_refuses_writes() {
    let (machine, dev) = machine_with_fw_cfg(true);
    let key = dev
        .add_file("etc/payload", (0..=255u8).collect::<Vec<_>>())
        .unwrap();
    let ms = machine_state(&machine).unwrap();
    let ram = ms.ram();
    ram.write_slice(&[0xee; 0x200], GuestAddress(0x2000))
        .unwrap();

    // Select + read 16 bytes.
    let ctl = (u32::from(key) << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ;
    assert_eq!(dma(&machine, 0x1000, ctl, 16, 0x2000), 0);
    let mut got = [0u8; 17];
    ram.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(&got[..16], &(0..16).collect::<Vec<u8>>()[..]);
    assert_eq!(got[16], 0xee, "nothing past the length is written");

    // Skip 0xe0 more, then read 0x20: 16 bytes of data, then zeros past the end.
    assert_eq!(dma(&machine, 0x1000, FW_CFG_DMA_CTL_SKIP, 0xe0, 0), 0);
    assert_eq!(dma(&machine, 0x1000, FW_CFG_DMA_CTL_READ, 0x20, 0x2100), 0);
    let mut tail = [0u8; 0x20];
    ram.read_slice(&mut tail, GuestAddress(0x2100)).unwrap();
    assert_eq!(&tail[..16], &(0xf0..=0xffu8).collect::<Vec<u8>>()[..]);
    assert_eq!(&tail[16..], &[0; 16]);

    // The data port continues where DMA stopped (past the end: zeros).
    let io = ms.system_io();
    assert_eq!(io.read(u64::from(FW_CFG_IO_BASE) + 1, 1), 0);

    // Writes are refused; an unknown key reads as zeros.
    let ctl = (u32::from(key) << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_WRITE;
    assert_eq!(dma(&machine, 0x1000, ctl, 4, 0x2000), FW_CFG_DMA_CTL_ERROR);
    let ctl = (0x1e << 16) | FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ;
    assert_eq!(dma(&machine, 0x1000, ctl, 8, 0x2000), 0);
    let mut zeros = [0xffu8; 8];
    ram.read_slice(&mut zeros, GuestAddress(0x2000)).unwrap();
    assert_eq!(zeros, [0; 8]);

    // A signature read through DMA, and a read into memory that is not RAM.
    let ctl = FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ;
    assert_eq!(dma(&machine, 0x1000, ctl, 4, 0x3000), 0);
    let mut sig = [0u8; 4];
    ram.read_slice(&mut sig, GuestAddress(0x3000)).unwrap();
    assert_eq!(&sig, b"QEMU");
    assert_eq!(
        dma(&machine, 0x1000, ctl, 4, RAM_SIZE - 2),
        FW_CFG_DMA_CTL_ERROR
    );

    // No operation bit: nothing is transferred, the status is 0.
    assert_eq!(dma(&machine, 0x1000, 0, 4, 0x2000), 0);
}

#[test]
fn dma_with_one_64_bit_write() {
    let (machine, _dev) = machine_with_fw_cfg(true);
    let ms = machine_state(&machine).unwrap();
    let mut d = Vec::new();
    d.extend_from_slice(&(FW_CFG_DMA_CTL_SELECT | FW_CFG_DMA_CTL_READ).to_be_bytes());
    d.extend_from_slice(&4u32.to_be_bytes());
    d.extend_from_slice(&0x4000u64.to_be_bytes());
    ms.ram().write_slice(&d, GuestAddress(0x1000)).unwrap();
    ms.system_io()
        .write(u64::from(FW_CFG_DMA_IO_BASE), 0x1000u64.swap_bytes(), 8);
    let mut sig = [0u8; 4];
    ms.ram().read_slice(&mut sig, GuestAddress(0x4000)).unwrap();
    assert_eq!(&sig, b"QEMU");
}

#[test]
fn unrealize_frees_the_ports_and_realize_maps_them_again() {
    let (machine, dev) = machine_with_fw_cfg(true);
    let io = machine_state(&machine).unwrap().system_io().clone();
    assert_eq!(io.flat_view().ranges().len(), 2);
    qdev_unrealize(dev.object());
    assert!(!dev.object().is_realized());
    assert!(io.flat_view().ranges().is_empty());
    dev.object()
        .property_set("realized", Value::Bool(true))
        .unwrap();
    assert_eq!(read_item(&machine, FW_CFG_SIGNATURE, 4), b"QEMU");
}
