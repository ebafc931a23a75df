//! `ivshmem-plain` on the pc board under the qtest accelerator: QEMU's IDs and BARs (BAR 2
//! 64-bit prefetchable, placed above 4 GiB here), the shared file's bytes read and written
//! by the guest through BAR 2 and seen by the host, the registers, QEMU's errors (no or a
//! busy `memdev`, a backend in use refused to `object-del`), and migration: blocked for a
//! peer in QEMU's words, the contents moved for a master.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::migration::{check_migratable, load_vm, save_vm, Progress};
use hw::core::qdev::qdev_unrealize;
use qom::ObjectRef;
use test_support::virtio::PciConfig;

const DEVFN: u32 = 4 << 3;
const REGS: u64 = 0xfe00_0000;
/// BAR 2 above 4 GiB, where only a 64-bit BAR can go.
const SHMEM: u64 = 0x1_0000_0000;
const SIZE: u64 = 1 << 20;

/// The objects under /objects are the process's: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn shm_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qomvm-ivshmem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// `-object memory-backend-file,id=ID,mem-path=PATH,size=1M,share=on`.
fn add_backend(id: &str, path: &std::path::Path) -> ObjectRef {
    accel::init().expect("registrations are intact");
    qom::user_creatable_add_type("memory-backend-file", id, |obj| {
        obj.property_parse("mem-path", path.to_str().unwrap())?;
        obj.property_parse("size", "1M")?;
        obj.property_parse("share", "on")
    })
    .unwrap()
}

/// A pc with `ivshmem-plain,addr=04.0,props...`: the machine, or the error text.
fn try_plug(props: &[(&str, &str)]) -> Result<(ObjectRef, ObjectRef), String> {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let props: Vec<_> = [("addr", "04.0")].iter().chain(props).copied().collect();
    let dev = test_support::qtest::try_plug_pci(&machine, "ivshmem-plain", &props)?;
    machine_creation_done(&machine).unwrap();
    Ok((machine, dev))
}

/// Places BAR 0 and BAR 2 as firmware would and turns memory decoding on.
fn place_bars(machine: &ObjectRef) -> PciConfig {
    let cfg = PciConfig::new(machine, DEVFN);
    cfg.write(0x10, REGS as u32, 4);
    cfg.write(0x18, SHMEM as u32, 4);
    cfg.write(0x1c, (SHMEM >> 32) as u32, 4);
    cfg.write(0x04, 0x2, 2);
    cfg
}

fn guest(machine: &ObjectRef) -> std::sync::Arc<hw::core::memory::AddressSpace> {
    machine_state(machine).unwrap().system_memory().clone()
}

#[test]
fn the_guest_and_the_host_share_the_file_through_bar_2() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = shm_file("share");
    let backend = add_backend("shm-share", &path);
    let (m, _dev) = try_plug(&[("memdev", "shm-share")]).unwrap();
    let cfg = place_bars(&m);
    // QEMU's IDs: 1af4:1110 revision 1, RAM controller, subsystem 1af4:1100, no pin.
    assert_eq!(cfg.read(0x00, 4), 0x1110_1af4);
    assert_eq!(cfg.read(0x08, 4), 0x0500_0001);
    assert_eq!(cfg.read(0x2c, 4), 0x1100_1af4);
    assert_eq!(cfg.read(0x3d, 1), 0, "no interrupt pin");
    // BAR 2: 64-bit prefetchable memory (type bits 0b1100), sized 1 MiB through both dwords.
    assert_eq!(cfg.read(0x18, 4), SHMEM as u32 | 0xc);
    assert_eq!(cfg.read(0x1c, 4), 1, "the upper half");
    let mem = guest(&m);
    // The host writes, the guest reads; the guest writes, the host reads.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.write_all_at(b"from the host", 4096).unwrap();
    let word = mem.read(SHMEM + 4096, 8);
    assert_eq!(&word.to_le_bytes(), b"from the");
    mem.write(SHMEM + SIZE - 8, u64::from_le_bytes(*b"guest!!\n"), 8);
    let mut tail = [0u8; 8];
    file.read_exact_at(&mut tail, SIZE - 8).unwrap();
    assert_eq!(&tail, b"guest!!\n");
    // The registers: the mask stores, the status clears when read, the position is 0.
    mem.write(REGS, 0xffff_ffff, 4);
    assert_eq!(mem.read(REGS, 4), 0xffff_ffff);
    mem.write(REGS + 4, 0x5, 4);
    assert_eq!(mem.read(REGS + 4, 4), 0x5);
    assert_eq!(mem.read(REGS + 4, 4), 0);
    assert_eq!(mem.read(REGS + 8, 4), 0);
    // QEMU serves them 4 bytes at a time: an 8-byte read is mask and status (and clears
    // the status); a narrow read at an offset that names no register reads 0.
    mem.write(REGS + 4, 0x7, 4);
    assert_eq!(mem.read(REGS + 5, 1), 0);
    assert_eq!(mem.read(REGS, 8), 0x7_ffff_ffff);
    assert_eq!(mem.read(REGS + 4, 4), 0);
    // A narrow write at 6 is a 4-byte write of its value to the status.
    mem.write(REGS + 6, 0x3, 2);
    assert_eq!(mem.read(REGS + 4, 4), 0x3);
    // Sizing BAR 2 the way firmware does: all ones in both halves.
    cfg.write(0x04, 0, 2);
    cfg.write(0x18, 0xffff_ffff, 4);
    cfg.write(0x1c, 0xffff_ffff, 4);
    assert_eq!(cfg.read(0x18, 4), !(SIZE as u32 - 1) | 0xc);
    assert_eq!(cfg.read(0x1c, 4), 0xffff_ffff);
    // The backend is the device's while it lives.
    assert_eq!(
        qom::user_creatable_del("shm-share")
            .unwrap_err()
            .to_string(),
        "object 'shm-share' is in use, can not be deleted"
    );
    drop(backend);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn qemus_errors() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(try_plug(&[]).unwrap_err(), "You must specify a 'memdev'");
    assert_eq!(
        try_plug(&[("memdev", "nothing-here")]).unwrap_err(),
        "Device 'nothing-here' not found"
    );
    let path = shm_file("busy");
    add_backend("shm-busy", &path);
    let (_m, dev) = try_plug(&[("memdev", "shm-busy")]).unwrap();
    assert_eq!(
        try_plug(&[("memdev", "shm-busy")]).unwrap_err(),
        "can't use already busy memdev: shm-busy"
    );
    // Once the device goes, the backend is free again.
    qdev_unrealize(&dev);
    qom::user_creatable_del("shm-busy").unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_peer_blocks_migration_and_a_master_moves_the_contents() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = shm_file("peer");
    add_backend("shm-peer", &path);
    let (m, dev) = try_plug(&[("memdev", "shm-peer")]).unwrap();
    assert_eq!(
        check_migratable(&m).unwrap_err().to_string(),
        "Migration is disabled when using feature 'peer mode' in device 'ivshmem'"
    );
    qdev_unrealize(&dev);
    qom::user_creatable_del("shm-peer").unwrap();

    let src_path = shm_file("master-src");
    add_backend("shm-src", &src_path);
    let (src, _) = try_plug(&[("memdev", "shm-src"), ("master", "on")]).unwrap();
    place_bars(&src);
    guest(&src).write(SHMEM + 64, 0x1122_3344_5566_7788, 8);
    let mut stream = Vec::new();
    save_vm(&src, &mut stream, &mut Progress::default()).unwrap();
    let dst_path = shm_file("master-dst");
    add_backend("shm-dst", &dst_path);
    let (dst, _) = try_plug(&[("memdev", "shm-dst"), ("master", "on")]).unwrap();
    load_vm(&dst, &mut stream.as_slice(), None).unwrap();
    // The destination's file has the contents, and its BARs are where the source's were.
    let mut word = [0u8; 8];
    std::fs::File::open(&dst_path)
        .unwrap()
        .read_exact_at(&mut word, 64)
        .unwrap();
    assert_eq!(u64::from_le_bytes(word), 0x1122_3344_5566_7788);
    assert_eq!(guest(&dst).read(SHMEM + 64, 8), 0x1122_3344_5566_7788);
    for p in [path, src_path, dst_path] {
        let _ = std::fs::remove_file(p);
    }
}

/// The command line libvirt writes (`-object memory-backend-file,...,share=on -device
/// ivshmem-plain,memdev=...`), with HMP's `xp` reading the guest's view: RAM in each
/// format QEMU's `memory_dump` prints, then BAR 2 showing the host's file.
#[test]
fn the_command_line_and_hmp_xp_show_the_shared_file() {
    use serde_json::json;
    use test_support::fuzz_qtest::Qtest;
    let path = shm_file("cli");
    std::fs::write(&path, [0u8; SIZE as usize]).unwrap();
    let object = format!(
        "memory-backend-file,id=hm,mem-path={},size=1M,share=on",
        path.display()
    );
    let (mut q, mut qmp, _) = Qtest::start_with_qmp(
        env!("CARGO_BIN_EXE_qomvm"),
        "ivshmem-cli",
        &[
            "-object",
            &object,
            "-device",
            "ivshmem-plain,memdev=hm,addr=04.0",
        ],
    );
    let mut hmp = |line: &str| {
        let reply = qmp.execute("human-monitor-command", json!({ "command-line": line }));
        reply["return"]
            .as_str()
            .unwrap_or_else(|| panic!("{line}: {reply}"))
            .to_string()
    };
    q.cmd("writeq 0x1000 0x0a41_7fff_8000_0102".replace('_', ""));
    assert_eq!(
        hmp("xp /2wx 0x1000"),
        "0000000000001000: 0x80000102 0x0a417fff\r\n"
    );
    assert_eq!(
        hmp("xp /4hu 0x1000"),
        "0000000000001000:   258 32768 32767  2625\r\n"
    );
    // QEMU loads units zero-extended: `d` shows 0x8000 as 32768.
    assert_eq!(hmp("xp /2hd 0x1002"), "0000000000001002: 32768 32767\r\n");
    assert_eq!(hmp("xp /1bo 0x1001"), "0000000000001001:  01\r\n");
    assert_eq!(hmp("xp /2c 0x1006"), "0000000000001006: 'A' '\\n'\r\n");
    // The last format and unit stay; sixteen bytes a line.
    assert_eq!(
        hmp("xp /9 0x1000"),
        "0000000000001000: 0x0000000000000000 0x0000000000000000\r\n".replace(
            "0x0000000000000000 0x0000000000000000",
            "'\\x02' '\\x01' '\\x00' '\\x80' '\\xff' '\\x7f' 'A' '\\n'"
        ) + "0000000000001008: '\\x00'\r\n"
    );
    assert!(hmp("xp /2z 0x1000").contains("invalid char in format: 'z'"));
    // No space after the name; `c` with a word unit reads count * 4 bytes, as QEMU's.
    assert_eq!(
        hmp("xp/2wc 0x1004"),
        r"0000000000001004: '\xff' '\x7f' 'A' '\n' '\x00' '\x00' '\x00' '\x00'".to_string()
            + "\r\n"
    );
    // BAR 2 where firmware would put it, decoding on: the guest sees the host's bytes.
    let cfg = |reg: u32| format!("outl 0xcf8 {:#x}", 0x8000_0000u32 | (4 << 11) | reg);
    q.cmd(cfg(0x18));
    q.cmd("outl 0xcfc 0xe0000000".into());
    q.cmd(cfg(0x04));
    q.cmd("outw 0xcfc 0x2".into());
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"QOMVMIVS", 0).unwrap();
    assert_eq!(
        hmp("xp /2wx 0xe0000000"),
        "00000000e0000000: 0x564d4f51 0x5356494d\r\n"
    );
    // Nothing there: QEMU's address_space_read fails, and the dump stops at that line.
    assert_eq!(
        hmp("xp /2wx 0xd0000000"),
        "00000000d0000000: Cannot access memory\r\n"
    );
    assert_eq!(
        hmp("xp /2gx 0xfffffffffffffff8"),
        "fffffffffffffff8: Cannot access memory\r\n"
    );
    // The last line of RAM prints, the next does not (-m 64).
    let end = hmp("xp /8wx 0x3fffff0");
    assert!(
        end.starts_with("0000000003fffff0: 0x")
            && end.ends_with("0000000004000000: Cannot access memory\r\n"),
        "{end}"
    );
    q.check_alive();
    let _ = std::fs::remove_file(&path);
}
