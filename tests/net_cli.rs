//! `-netdev`/`-nic`/`-device virtio-net-pci` on qomvm's command line, as people and
//! management stacks write them: the seed's inherited-descriptor pair, taps by name in a
//! namespace the test makes, and QEMU's one-line errors for bad input.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use test_support::netns::{open_tap, skip_reason, Netns, IFF_TAP, IFF_VNET_HDR};

const QUIT: &str = "{\"execute\":\"qmp_capabilities\"}\n\
{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info network\"}}\n\
{\"execute\":\"quit\"}\n";

fn qomvm_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qomvm"));
    c.args([
        "-accel",
        "qtest",
        "-display",
        "none",
        "-nodefaults",
        "-qmp",
        "stdio",
    ])
    .args(args)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

fn run_with_quit(mut c: Command) -> Output {
    use std::io::Write;
    let mut child = c.spawn().expect("start qomvm");
    let _ = child.stdin.take().unwrap().write_all(QUIT.as_bytes());
    child.wait_with_output().expect("qomvm ends")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

macro_rules! skip_unless_possible {
    () => {
        if let Some(why) = skip_reason() {
            test_support::skip::skip(why);
            return;
        }
    };
}

#[test]
fn the_seeds_tap_pair_is_accepted_with_an_inherited_descriptor() {
    skip_unless_possible!();
    let ns = Netns::new("netcli");
    let out = ns.run(|| {
        let tap = open_tap("seedtap0", IFF_TAP | IFF_VNET_HDR);
        let fd = tap.as_raw_fd();
        let mut c = qomvm_cmd(&[
            "-netdev",
            "tap,fd=32,id=hostnet0",
            "-device",
            "virtio-net-pci,netdev=hostnet0,id=net0,mac=fa:16:3e:d1:2d:99,bus=pci.0,addr=0x3",
        ]);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(fd, 32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        run_with_quit(c)
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("net0: index=0,type=nic,model=virtio-net-pci,macaddr=fa:16:3e:d1:2d:99"),
        "{text}"
    );
    assert!(text.contains("hostnet0: index=0,type=tap,fd=32"), "{text}");
}

#[test]
fn a_tap_by_name_and_a_nic_shorthand() {
    skip_unless_possible!();
    let ns = Netns::new("netcli");
    let out = ns.run(|| {
        run_with_quit(qomvm_cmd(&[
            "-nic",
            "tap,ifname=nictap0,script=no,downscript=no,mac=52:54:00:00:00:07",
        ]))
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("type=nic,model=e1000,macaddr=52:54:00:00:00:07"),
        "{text}"
    );
    assert!(
        text.contains("__org.qemu.nic0: index=0,type=tap,ifname=nictap0,script=no,downscript=no"),
        "{text}"
    );
}

/// QEMU's legacy `-net nic -net user` (countless how-tos): one card on one backend;
/// `model=virtio` names virtio-net-pci, `macaddr=` its MAC; e1000 without a model.
#[test]
fn legacy_net_options_connect_a_card_to_a_backend() {
    for (args, line) in [
        (
            &[
                "-net",
                "nic,model=virtio,macaddr=52:54:00:00:00:09",
                "-net",
                "user",
            ][..],
            "type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:09",
        ),
        (
            &["-net", "nic", "-net", "user,restrict=on"][..],
            "type=nic,model=e1000,",
        ),
        (
            &["-net", "nic,name=lan", "-net", "user", "-net", "none"][..],
            "lan: index=0,type=nic,model=e1000",
        ),
    ] {
        let out = run_with_quit(qomvm_cmd(args));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(text.contains(line), "{args:?}: {text}");
        assert!(
            text.contains("user.0: index=0,type=user"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn bad_network_options_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["-netdev", "tap,id=n0,fd=99"],
            "qomvm: -netdev tap,id=n0,fd=99: ",
        ),
        (
            &["-netdev", "bogus,id=n0"],
            "Parameter 'type' does not accept value 'bogus'",
        ),
        (&["-netdev", "tap"], "Parameter 'id' is missing"),
        (
            &["-netdev", "tap,id=0bad"],
            "Parameter 'id' expects an identifier",
        ),
        (
            &["-device", "virtio-net-pci,netdev=nothere"],
            "Property 'virtio-net-pci.netdev' can't find value 'nothere'",
        ),
        (
            &["-device", "e1000,netdev=nothere"],
            "Property 'e1000.netdev' can't find value 'nothere'",
        ),
        (
            &[
                "-netdev",
                "user,id=u0",
                "-device",
                "e1000,netdev=u0,mac=52:54",
            ],
            "Property 'e1000.mac' doesn't take value '52:54'",
        ),
        (
            &["-net", "nic"],
            "-net nic: nothing to connect this card to: add -net user or -net tap",
        ),
        (
            &["-net", "nic", "-net", "nic", "-net", "user"],
            "qomvm has no network hubs",
        ),
        (
            &["-net", "nic,vlan=1", "-net", "user"],
            "Invalid parameter 'vlan'",
        ),
        (&["-net", "user"], "no -net nic to connect this backend to"),
        (
            &["-net", "bogus"],
            "Parameter 'type' expects a net backend type",
        ),
        (
            &["-nic", "user,model=ne2k_pci"],
            "Unsupported NIC model: ne2k_pci",
        ),
    ];
    for (args, expect) in cases {
        let out = run_with_quit(qomvm_cmd(args));
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
    }
}

#[test]
fn a_mac_that_does_not_parse_and_a_netdev_used_twice_are_refused() {
    skip_unless_possible!();
    let ns = Netns::new("netcli");
    let outs = ns.run(|| {
        [
            run_with_quit(qomvm_cmd(&[
                "-netdev",
                "tap,id=n0,ifname=mactap0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:zz:00:01",
            ])),
            run_with_quit(qomvm_cmd(&[
                "-netdev",
                "tap,id=n0,ifname=twotap0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ])),
        ]
    });
    assert!(
        stderr(&outs[0])
            .contains("Property 'virtio-net-pci.mac' doesn't take value '52:54:00:zz:00:01'"),
        "{}",
        stderr(&outs[0])
    );
    assert!(
        stderr(&outs[1])
            .contains("Property 'virtio-net-pci.netdev' can't take value 'n0', it's in use"),
        "{}",
        stderr(&outs[1])
    );
}

#[test]
fn the_downscript_runs_when_qomvm_exits() {
    skip_unless_possible!();
    let dir = std::env::temp_dir().join(format!("qomvm-netcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = dir.join("up.sh");
    let down = dir.join("down.sh");
    let log = dir.join("log");
    for (path, word) in [(&up, "up"), (&down, "down")] {
        std::fs::write(
            path,
            format!("#!/bin/sh\necho {word} $1 >> {}\n", log.display()),
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(path)
            .status()
            .unwrap();
    }
    let ns = Netns::new("netcli");
    let netdev = format!(
        "tap,id=n0,ifname=scripttap0,script={},downscript={}",
        up.display(),
        down.display()
    );
    let out = ns.run(|| run_with_quit(qomvm_cmd(&["-netdev", &netdev])));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(text, "up scripttap0\ndown scripttap0\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn libvirts_json_netdev_and_device_are_accepted() {
    skip_unless_possible!();
    let ns = Netns::new("netcli");
    let out = ns.run(|| {
        run_with_quit(qomvm_cmd(&[
            "-netdev",
            r#"{"type":"tap","id":"hostnet0","ifname":"jsontap0","script":"no","downscript":"no","vhost":false}"#,
            "-device",
            r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"fa:16:3e:d1:2d:99","bus":"pci.0","addr":"0x3"}"#,
        ]))
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("net0: index=0,type=nic,model=virtio-net-pci,macaddr=fa:16:3e:d1:2d:99"),
        "{text}"
    );
    assert!(
        text.contains("hostnet0: index=0,type=tap,ifname=jsontap0"),
        "{text}"
    );
}

/// `romfile=` is PCI's on virtio-net-pci too: a ROM that is not there is QEMU's error, an
/// empty one means no ROM (what libvirt writes for `<rom enabled='no'/>`).
#[test]
fn the_nics_romfile_is_the_pci_option_rom() {
    let missing = run_with_quit(qomvm_cmd(&[
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=/nonexistent.bin",
    ]));
    assert!(!missing.status.success(), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("failed to find romfile \"/nonexistent.bin\""),
        "{}",
        stderr(&missing)
    );
    let none = run_with_quit(qomvm_cmd(&[
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]));
    assert!(none.status.success(), "{}", stderr(&none));
}

/// The cards' iPXE ROMs (QEMU's `efi-e1000.rom`, `efi-virtio.rom`, Debian package
/// ipxe-qemu) sit in their ROM BARs with the PCI data structure naming the card itself,
/// as SeaBIOS requires before it runs one: e1000-82545em's 8086:100f in the e1000 image,
/// and a modern-only virtio-net's 1af4:1041, the id its realize gives it.
#[test]
fn a_cards_boot_rom_names_the_card() {
    const E1000_ROM: &str = "/usr/lib/ipxe/qemu/efi-e1000.rom";
    if !std::path::Path::new(E1000_ROM).is_file() {
        test_support::skip::skip(format!(
            "{E1000_ROM} is missing (Debian package 'ipxe-qemu')"
        ));
        return;
    }
    let (mut qt, _qmp, _dir) = test_support::fuzz_qtest::Qtest::start_with_qmp(
        env!("CARGO_BIN_EXE_qomvm"),
        "net-cli-roms",
        &[
            "-nic",
            "none",
            "-netdev",
            "user,id=n0",
            "-netdev",
            "user,id=n1",
            "-device",
            "e1000-82545em,netdev=n0,addr=04.0",
            "-device",
            "virtio-net-pci,netdev=n1,disable-legacy=on,addr=05.0",
        ],
    );
    for (slot, ids, rom_at) in [
        (4u32, 0x100f_8086u32, 0xd000_0000u32),
        (5, 0x1041_1af4, 0xd010_0000),
    ] {
        let devfn = slot << 3;
        assert_eq!(qt.pci_read32(devfn, 0), ids);
        qt.pci_write32(devfn, 0x30, rom_at | 1);
        let command = qt.pci_read32(devfn, 4);
        qt.pci_write32(devfn, 4, command | 2);
        let header = qt.read_bytes(u64::from(rom_at), 0x1a);
        assert_eq!(&header[..2], &[0x55, 0xaa], "slot {slot}: an option ROM");
        let pcir = u32::from(u16::from_le_bytes([header[0x18], header[0x19]]));
        let data = qt.read_bytes(u64::from(rom_at + pcir), 8);
        assert_eq!(&data[..4], b"PCIR");
        assert_eq!(
            u32::from_le_bytes(data[4..8].try_into().unwrap()),
            ids,
            "slot {slot}"
        );
    }
}

/// QEMU's default network: `-M pc` with no network option gets `-net nic -net user`, an
/// e1000 named `e1000.0` on `user.0`, made with the board (00:03.0) before the `-device`s;
/// QEMU adds the `-drive if=virtio` devices after the key=value `-device`s and makes the
/// JSON ones last. `-nodefaults`,
/// `-nic none` and any `-netdev` leave it out.
#[test]
fn the_default_network_is_qemus_and_comes_with_the_board() {
    let dir = std::env::temp_dir().join(format!("net-cli-default-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let network = |extra: &[&str]| -> (String, Vec<u32>) {
        let (mut qt, mut qmp, _dir) = test_support::fuzz_qtest::Qtest::start_with_qmp(
            env!("CARGO_BIN_EXE_qomvm"),
            "net-cli-default",
            extra,
        );
        let info = qmp.execute(
            "human-monitor-command",
            serde_json::json!({"command-line": "info network"}),
        );
        let ids = (3..7).map(|slot| qt.pci_read32(slot << 3, 0)).collect();
        (info["return"].as_str().unwrap_or_default().to_string(), ids)
    };
    let (info, ids) = network(&[
        "-drive",
        &drive,
        "-device",
        r#"{"driver": "virtio-balloon-pci"}"#,
        "-device",
        "virtio-rng-pci",
    ]);
    assert!(
        info.starts_with("e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56"),
        "{info}"
    );
    assert!(
        info.contains(" \\ user.0: index=0,type=user,net=10.0.2.0"),
        "{info}"
    );
    assert_eq!(
        ids,
        [0x100e_8086, 0x1005_1af4, 0x1001_1af4, 0x1002_1af4],
        "e1000, then the key=value -device, then if=virtio, then the JSON -device"
    );
    for extra in [
        &["-nodefaults"][..],
        &["-nic", "none"],
        &["-netdev", "user,id=n0"],
    ] {
        let (info, ids) = network(extra);
        assert!(!info.contains("type=nic"), "{extra:?}: {info}");
        assert_ne!(ids[0], 0x100e_8086, "{extra:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
