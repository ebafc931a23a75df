//! Issue 17 in a real guest: the Debian test guest booted without `console=`, so the
//! kernel's console and /init's shell are on the VGA text screen, seen and typed into over
//! VNC. `tests/vnc_guest.py` drives it (inside the nested-KVM rig on PVM hosts, directly on
//! hardware KVM): it waits for the shell's prompt in the VGA text memory, takes pictures
//! with Debian's `vncsnapshot` (a real client) and with QMP `screendump`, types a command
//! as a VNC client does and powers the guest off by typing `exit`. This file then reads
//! the screendumps cell by cell with the VGA BIOS's font, checks that the client's
//! pictures show the same screens, and reads the client's pictures with `tesseract` (OCR,
//! outside the rig).

use std::path::{Path, PathBuf};
use std::process::Command;

mod guest_rig;
use guest_rig::{assets, host_or_rig, kvm_path, repo, shutdowns, text, Path_, BOOTS, SHUTDOWN_LOG};
use test_support::vga_text::{mean_difference, rom_font, Image};

/// The VGA BIOS whose font both displays use (SeaBIOS's VGA BIOSes share it).
const VGABIOS: &str = "/usr/share/seabios/vgabios-stdvga.bin";

/// The tools the scenario and the checks need, or why the test cannot run.
fn tools_or_skip() -> bool {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = ["vncsnapshot", "djpeg", "tesseract", "python3"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    test_support::skip::skip(format!(
        "{} missing (Debian packages vncsnapshot, libjpeg-turbo-progs, tesseract-ocr, python3)",
        missing.join(", ")
    ));
    false
}

/// What tesseract reads in `picture`, without white space (OCR splits and joins words
/// unpredictably; the checks look for runs of characters).
fn ocr(picture: &Path) -> String {
    let out = Command::new("tesseract")
        .arg(picture)
        .arg("stdout")
        .output()
        .expect("tesseract runs");
    assert!(
        out.status.success(),
        "tesseract {}: {}",
        picture.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Runs the scenario with `display_args` (the display device and, optionally, its own
/// `-vnc` on `vnc_display`) and checks the pictures.
fn console_over_vnc(name: &str, vnc_display: u16, display_args: &[&str]) {
    if !tools_or_skip() {
        return;
    }
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = assets().unwrap_or_else(|e| panic!("guest assets: {e}"));
    // On the host's file system in both cases (the rig shares it read-write), so the
    // pictures outlive L1 and the OCR runs at the host's speed.
    let out_dir: PathBuf = repo().join("target/vnc-guest-tests").join(name);
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();
    let out_arg = out_dir.display().to_string();
    let script = repo().join("tests/vnc_guest.py").display().to_string();
    let display = vnc_display.to_string();
    let mut command = vec!["/usr/bin/python3", &script, &out_arg, &display];
    command.extend_from_slice(display_args);
    let envs = [
        ("QOMVM_BIN", env!("CARGO_BIN_EXE_qomvm").to_string()),
        ("QOMVM_ASSETS", dir.display().to_string()),
        (SHUTDOWN_LOG.0, SHUTDOWN_LOG.1.to_string()),
    ];
    let rig_options = match kvm_path() {
        Path_::NestedRig => vec!["--rw", out_arg.as_str()],
        Path_::Direct => vec![],
    };
    eprintln!("vnc-guest: {:?}: scenario {name}", kvm_path());
    let o = host_or_rig(&command, &rig_options, &envs, 600);
    let out = text(&o);
    for l in out.lines().filter(|l| l.starts_with("vnc-guest: ")) {
        println!("{name}: {l}");
    }
    assert_eq!(o.status.code(), Some(0), "scenario {name}:\n{out}");
    assert!(out.contains("VNC-GUEST-OK"), "scenario {name}:\n{out}");
    assert_eq!(
        shutdowns(&out, "guest-shutdown"),
        1,
        "qomvm ended by the guest's power-off:\n{out}"
    );

    // The screen as qomvm drew it, read cell by cell with the VGA BIOS's font: /init's
    // words and the prompt, then the command typed over VNC and the shell's answer.
    let rom = std::fs::read(VGABIOS).expect("the VGA BIOS (Debian package seabios)");
    let font = rom_font(&rom);
    let boot_dump = Image::read_ppm(&out_dir.join("boot.ppm"));
    let boot_text = boot_dump.text(&font, [0, 0, 0]);
    assert!(
        boot_text
            .iter()
            .any(|l| l.starts_with("qomvm: interactive shell;"))
            && boot_text.iter().any(|l| l.starts_with("qomvm#")),
        "the greeting and the prompt on the screen: {boot_text:#?}"
    );
    let keys_dump = Image::read_ppm(&out_dir.join("keys.ppm"));
    let keys_text = keys_dump.text(&font, [0, 0, 0]);
    let typed = keys_text
        .iter()
        .position(|l| l == "qomvm# echo VNC-$((6*7))-KEYS")
        .unwrap_or_else(|| panic!("the command typed over VNC on the screen: {keys_text:#?}"));
    assert_eq!(
        keys_text.get(typed + 1).map(String::as_str),
        Some("VNC-42-KEYS"),
        "its answer: {keys_text:#?}"
    );

    // The VNC client saw the same screens (JPEG is lossy: close on average) ...
    for (name, dump) in [("boot", &boot_dump), ("keys", &keys_dump)] {
        let snapshot = jpeg(&out_dir.join(format!("{name}.jpg")));
        let difference = mean_difference(&snapshot, dump);
        assert!(
            difference < 4.0,
            "{name}: vncsnapshot's picture differs from the screendump by {difference} on average"
        );
    }
    // ... and its pictures are readable: OCR finds the words (tesseract misreads this
    // font's V as U or W at this size, so the checks are on words it reads reliably).
    let boot = ocr(&out_dir.join("boot.jpg"));
    assert!(
        boot.contains("interactiveshell") && boot.contains("BusyBox"),
        "the shell's greeting, read from vncsnapshot's picture: {boot}"
    );
    let keys = ocr(&out_dir.join("keys.jpg"));
    assert!(
        keys.contains("-42-KEYS") && keys.contains("((6"),
        "the command typed over VNC and its answer, read from vncsnapshot's picture: {keys}"
    );
}

/// A JPEG decoded with `djpeg` (Debian package libjpeg-turbo-progs).
fn jpeg(path: &Path) -> Image {
    let ppm = path.with_extension("jpg.ppm");
    let out = std::fs::File::create(&ppm).unwrap();
    let status = Command::new("djpeg")
        .arg(path)
        .stdout(out)
        .status()
        .expect("djpeg runs");
    assert!(status.success(), "djpeg {}", path.display());
    Image::read_ppm(&ppm)
}

#[test]
fn a_linux_console_on_the_std_vga_is_read_and_typed_into_over_vnc() {
    console_over_vnc("std-vga", 1, &["-vga", "std"]);
}

/// The seed's display pair as OpenStack's libvirt writes it (`-vnc 127.0.0.1:12 -device
/// cirrus-vga,id=video0,bus=pci.0,addr=0x2`), in place of the default VGA; no default
/// card, which would take slot 2 first (libvirt's line has `-nodefaults`).
#[test]
fn a_linux_console_on_the_seeds_cirrus_vga_is_read_and_typed_into_over_vnc() {
    console_over_vnc(
        "cirrus-vga",
        12,
        &[
            "-nic",
            "none",
            "-vga",
            "none",
            "-vnc",
            "127.0.0.1:12",
            "-device",
            "cirrus-vga,id=video0,bus=pci.0,addr=0x2",
        ],
    );
}
