//! Command-line fuzzing (issue 19, item 5): byte-level mutations of valid `-device`,
//! `-drive`, `-blockdev`, `-object`, `-machine`, `-smp` and `-netdev` values, a few at a
//! time. qomvm must start (and quit when its QMP on stdio asks) or exit with status 1 and
//! a one-line `qomvm: ...` error: never panic (101), die of a signal or hang.
//!
//! `QOMVM_FUZZ_SEED=N` and `QOMVM_FUZZ_ITERATIONS=N` (0: for ever) run it by hand.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use test_support::fuzz::{run_qomvm_until_quit, FuzzRun};

/// How long one start may take before it counts as a hang.
const BOUND: Duration = Duration::from_secs(20);

/// Valid values of each option, to mutate (they name the files and objects of the
/// scratch directory: `disk.raw`, `disk.qcow2`, `d0`, `n0`, `io0`, `c0`).
const CORPUS: &[(&str, &[&str])] = &[
    (
        "-device",
        &[
            "virtio-blk-pci,drive=d0,id=blk0,addr=0x5",
            "virtio-blk-pci,drive=d0,iothread=io0,num-queues=2,queue-size=256",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,mq=on,vectors=10",
            "virtio-rng-pci,max-bytes=1024,period=1000",
            "virtio-balloon-pci,deflate-on-oom=on",
            "isa-serial,chardev=c0,iobase=0x2f8,irq=3",
            "pvpanic,ioport=0x505",
            "pci-testdev,addr=0x6.0,multifunction=on",
            "{\"driver\":\"virtio-rng-pci\",\"id\":\"rng0\",\"addr\":\"0x7\"}",
            "pc-testdev",
        ],
    ),
    (
        "-drive",
        &[
            "file=disk.raw,format=raw,if=none,id=d0",
            "file=disk.qcow2,format=qcow2,if=none,id=d0,cache=none,aio=threads",
            "file=disk.raw,format=raw,if=virtio,readonly=on",
            "file=disk.raw,format=raw,if=none,id=d0,discard=unmap,detect-zeroes=unmap",
        ],
    ),
    (
        "-blockdev",
        &[
            "driver=file,filename=disk.raw,node-name=f0",
            "driver=raw,file.driver=file,file.filename=disk.raw,node-name=d0",
            "{\"driver\":\"qcow2\",\"node-name\":\"d0\",\"file\":{\"driver\":\"file\",\"filename\":\"disk.qcow2\"}}",
        ],
    ),
    (
        "-object",
        &[
            "iothread,id=io0,poll-max-ns=32768,poll-grow=2",
            "memory-backend-ram,id=m0,size=16M",
            "{\"qom-type\":\"iothread\",\"id\":\"io0\"}",
        ],
    ),
    (
        "-machine",
        &[
            "pc,accel=qtest",
            "pc-i440fx-10.0,pit=off,smm=off",
            "type=pc,kernel-irqchip=split,usb=off",
            "q35",
        ],
    ),
    (
        "-smp",
        &["2,sockets=1,cores=2,threads=1", "4,maxcpus=8", "cpus=2,dies=1", "1"],
    ),
    (
        "-netdev",
        &[
            "user,id=n0",
            "user,id=n0,net=10.0.3.0/24,dhcpstart=10.0.3.20,restrict=on",
            "{\"type\":\"user\",\"id\":\"n0\"}",
        ],
    ),
    ("-chardev", &["null,id=c0", "file,id=c0,path=serial.log"]),
];

#[test]
fn mutated_options_start_or_fail_in_one_line() {
    let run = FuzzRun::from_env(0x1951_0c11, 800);
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("qomvm-fuzz-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "disk.qcow2", "1M"])
        .current_dir(&dir)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        println!("no qemu-img: the qcow2 entries fail to open, which is fine");
    }
    let (mut ran, mut refused) = (0, 0);
    for case in run.cases() {
        let mut rng = run.rng_for(case);
        let mut args: Vec<OsString> = [
            "-M", "pc", "-accel", "qtest", "-m", "64", "-display", "none",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        // The objects the corpus names, unmutated, so that mutations of the others get
        // past "not found".
        for (option, value) in [
            ("-drive", "file=disk.raw,format=raw,if=none,id=d1"),
            ("-netdev", "user,id=n1"),
        ] {
            if rng.one_in(2) {
                args.extend([OsString::from(option), OsString::from(value)]);
            }
        }
        for _ in 0..=rng.below(3) {
            let (option, values) = rng.pick(CORPUS);
            let value = rng.pick(values).as_bytes();
            let mut value = if rng.one_in(3) {
                value.to_vec()
            } else {
                rng.mutate(value)
            };
            // An argument cannot hold a NUL byte.
            value.iter_mut().filter(|b| **b == 0).for_each(|b| *b = 1);
            args.push(OsString::from(*option));
            args.push(OsString::from_vec(value));
        }
        let outcome = run_qomvm_until_quit(env!("CARGO_BIN_EXE_qomvm"), &args, &dir, BOUND);
        outcome.check(&format!(
            "case {case} (seed {:#x}): qomvm {args:?}",
            run.seed
        ));
        match outcome.status {
            Some(0) => ran += 1,
            _ => refused += 1,
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{ran} ran, {refused} refused (seed {:#x}) in {:.1} s",
        run.seed,
        started.elapsed().as_secs_f64()
    );
}
