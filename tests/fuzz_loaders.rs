//! Loader fuzzing (issue 19, item 5): truncated and mutated bzImage, ELF (64-bit and
//! Multiboot ELF32), Multiboot a.out-kludge kernels, initrds and qcow2 images (headers, L1
//! and refcount tables). (qomvm has no `-bios`: its firmware is built in.) qomvm must start (its QMP on stdio then
//! asks it to quit) or exit with status 1 and a one-line `qomvm: ...` error: never panic,
//! die of a signal or hang.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use test_support::elf::{Elf32Kernel, PF_R, PF_X};
use test_support::fuzz::{run_qomvm_until_quit, FuzzRun, Rng};

const BOUND: Duration = Duration::from_secs(20);

/// hlt; jmp $-1: what every kernel here runs (qtest runs nothing anyway).
const CODE: &[u8] = &[0xf4, 0xeb, 0xfd];

/// A bzImage of protocol 2.15 (`HdrS`), 64-bit entry, relocatable: four setup sectors
/// and a protected-mode part of `payload` bytes.
fn bzimage(payload: usize) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x200] = 0xeb; // jump over the header
    f[0x201] = 0x66;
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 0x01; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x234] = 1; // relocatable_kernel
    f[0x236..0x238].copy_from_slice(&0x0003u16.to_le_bytes()); // XLF_KERNEL_64 | above 4G
    f[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    f[0x260..0x264].copy_from_slice(&(payload as u32 * 2).to_le_bytes()); // init_size
    let mut kernel = vec![0x90u8; payload];
    kernel[0x200..0x203].copy_from_slice(CODE); // the 64-bit entry is at +0x200
    f.extend_from_slice(&kernel);
    f
}

/// A Multiboot v1 ELF32 kernel (`test_support::elf`).
fn multiboot_elf() -> Vec<u8> {
    Elf32Kernel {
        vaddr: 0x10_0000,
        paddr: 0x10_0000,
        flags: PF_R | PF_X,
        bss: 0x1000,
        data_off: 0x200,
        code: CODE,
        data: b"data",
    }
    .build()
}

/// A Multiboot v1 kernel with the a.out kludge: load addresses in the header.
fn multiboot_aout() -> Vec<u8> {
    let load = 0x10_0000u32;
    let flags = (1u32 << 16) | (1 << 1); // AOUT_KLUDGE | MEMORY_INFO
    let magic = 0x1bad_b002u32;
    let mut f = vec![0x90u8; 8];
    let entry_off = 8 + 32;
    let len = (entry_off + CODE.len()) as u32;
    for v in [
        magic,
        flags,
        0u32.wrapping_sub(magic).wrapping_sub(flags),
        load + 8,
        load,
        load + len,
        load + len + 0x1000,
        load + entry_off as u32,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(CODE);
    f
}

/// `data` mutated, mostly in its first `header` bytes (where the loaders look).
fn mutate_header(rng: &mut Rng, data: &[u8], header: usize) -> Vec<u8> {
    if rng.one_in(6) {
        return rng.mutate(data);
    }
    let header = header.min(data.len());
    let mut out = rng.mutate(&data[..header]);
    if out.len() == header || rng.one_in(2) {
        out.extend_from_slice(&data[header..]);
    }
    out
}

/// A qcow2 image from qemu-img, with data written so it has L2 tables and refcounts.
fn qcow2_image(dir: &Path) -> Option<Vec<u8>> {
    let path = dir.join("base.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("4M")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return None;
    }
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-q",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 128k",
            "-c",
            "write 3M 64k",
        ])
        .arg(&path)
        .output();
    std::fs::read(&path).ok()
}

/// qcow2 metadata mutated: the header, the L1 table, the refcount table, or anywhere.
fn mutate_qcow2(rng: &mut Rng, image: &[u8]) -> Vec<u8> {
    let mut out = image.to_vec();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(image, 40) as usize;
    let refcounts = be64(image, 48) as usize;
    for _ in 0..=rng.below(3) {
        let at = match rng.below(4) {
            0 => rng.below(104),
            1 => (l1 + rng.below(64) as usize) as u64,
            2 => (refcounts + rng.below(64) as usize) as u64,
            _ => rng.below(out.len() as u64),
        } as usize;
        if at + 8 > out.len() {
            continue;
        }
        let value = rng.interesting_u64();
        match rng.below(3) {
            0 => out[at..at + 8].copy_from_slice(&value.to_be_bytes()),
            1 => out[at..at + 4].copy_from_slice(&(value as u32).to_be_bytes()),
            _ => out[at] ^= 1 << rng.below(8),
        }
    }
    if rng.one_in(8) {
        let keep = rng.below(out.len() as u64) as usize;
        out.truncate(keep);
    }
    out
}

#[test]
fn mutated_kernels_firmware_and_images_load_or_fail_in_one_line() {
    let run = FuzzRun::from_env(0x1951_01d5, 600);
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("qomvm-fuzz-loaders-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let qcow2 = qcow2_image(&dir);
    if qcow2.is_none() {
        test_support::skip::skip("the qcow2 cases need qemu-img");
    }
    let kernels: [(&str, Vec<u8>, usize); 4] = [
        ("bzImage", bzimage(0x4000), 0x280),
        ("ELF64", test_support::elf::elf64_exec(CODE, 0x20_0000), 120),
        ("Multiboot ELF32", multiboot_elf(), 0x200),
        ("Multiboot a.out", multiboot_aout(), 48),
    ];
    let mut outcomes = std::collections::BTreeMap::<String, (u32, u32)>::new();
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        let mut args: Vec<OsString> = [
            "-M", "pc", "-accel", "qtest", "-m", "64", "-display", "none",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let kind = match rng.below(7) {
            0..=4 => {
                let (name, image, header) = rng.pick(&kernels);
                let kernel = if rng.one_in(10) {
                    image.clone()
                } else {
                    mutate_header(&mut rng, image, *header)
                };
                std::fs::write(dir.join("kernel"), &kernel).unwrap();
                args.extend(["-kernel", "kernel"].map(OsString::from));
                if rng.one_in(3) {
                    let len = rng.below(0x2000) as usize;
                    let initrd = rng.bytes(len);
                    std::fs::write(dir.join("initrd"), initrd).unwrap();
                    args.extend(["-initrd", "initrd"].map(OsString::from));
                }
                if rng.one_in(3) {
                    let append = "console=ttyS0 ".repeat(rng.below(400) as usize);
                    args.extend([OsString::from("-append"), OsString::from(append)]);
                }
                name.to_string()
            }
            _ => {
                let Some(image) = &qcow2 else { continue };
                std::fs::write(dir.join("disk.qcow2"), mutate_qcow2(&mut rng, image)).unwrap();

                let readonly = if rng.one_in(3) { ",readonly=on" } else { "" };
                args.push("-drive".into());
                args.push(format!("file=disk.qcow2,format=qcow2,if=none,id=d0{readonly}").into());
                args.extend(["-device", "virtio-blk-pci,drive=d0"].map(OsString::from));
                "qcow2".to_string()
            }
        };
        let outcome = run_qomvm_until_quit(env!("CARGO_BIN_EXE_qomvm"), &args, &dir, BOUND);
        outcome.check(&format!(
            "case {case} (seed {:#x}), {kind}: qomvm {args:?}",
            run.seed
        ));
        let entry = outcomes.entry(kind).or_default();
        if outcome.status == Some(0) {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "(ran, refused) per input: {outcomes:?} (seed {:#x}) in {:.1} s",
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
