//! The `help` listings, in QEMU's formats.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hw::core::cpu::{CpuClass, TYPE_CPU};
use hw::core::machine::{machine_class, TYPE_MACHINE};
use hw::core::qdev::{device_class, DeviceCategory, TYPE_DEVICE};
use hw::i386::x86_cpu::{feature_names, ModelKind, X86CpuClass};
use qom::{ObjectClass, PropertyKind};

pub const USAGE: &str = "\
usage: qomvm [options]

Standard options:
-h or -help          display this help and exit
-version             display version information and exit
-machine [type=]name[,prop[=value][,...]]
                     selects emulated machine ('-machine help' for list)
                     property accel=accel1[:accel2[:...]] selects accelerator
-M                   as -machine
-accel [accel=]accelerator
                     select accelerator ('-accel help' for list)
-enable-kvm          enable KVM full virtualization support
-cpu cpu             select CPU ('-cpu help' for list)
-smp [[cpus=]n][,maxcpus=maxcpus][,sockets=sockets][,cores=cores][,threads=threads]
                     set the number of initial CPUs to 'n' and the topology
-m [size=]megs[M|G]  configure guest RAM (default 128M; no suffix means MiB)
-name [guest=]name[,debug-threads=on|off][,process=name]
                     set the name of the guest (and of the process)
-uuid %08x-%04x-%04x-%04x-%012x
                     specify machine UUID
-smbios file=binary
                     load SMBIOS entry from binary file
-smbios type=0[,vendor=str][,version=str][,date=str][,release=%d.%d][,uefi=on|off]
                     specify SMBIOS type 0 fields
-smbios type=1[,manufacturer=str][,product=str][,version=str][,serial=str]
              [,uuid=uuid][,sku=str][,family=str]
                     specify SMBIOS type 1 fields
-smbios type=2[,manufacturer=str][,product=str][,version=str][,serial=str]
              [,asset=str][,location=str]
                     specify SMBIOS type 2 fields
-smbios type=3[,manufacturer=str][,version=str][,serial=str][,asset=str][,sku=str]
                     specify SMBIOS type 3 fields
-smbios type=4[,sock_pfx=str][,manufacturer=str][,version=str][,serial=str]
              [,asset=str][,part=str][,max-speed=%d][,current-speed=%d]
              [,processor-id=%d]
                     specify SMBIOS type 4 fields
-smbios type=11[,value=str][,path=filename]
                     specify SMBIOS type 11 fields
-smbios type=17[,loc_pfx=str][,bank=str][,manufacturer=str][,serial=str]
              [,asset=str][,part=str][,speed=%d]
                     specify SMBIOS type 17 fields
-device driver[,prop[=value][,...]]
                     add device (based on driver); '-device help' lists drivers,
                     '-device driver,help' lists a driver's properties
-usb                 enable on-board USB host controller (if not enabled by default)
-usbdevice name      add the host or guest USB device 'name' (tablet, mouse, keyboard)
-global driver.property=value
                     set a default value of a driver's property
-nodefaults          don't create default devices
-object TYPE,id=ID[,PROP=VALUE,...]
-object '{\"qom-type\": TYPE, \"id\": ID, ...}'
                     create a user-creatable object ('-object help' lists the
                     types, '-object TYPE,help' a type's properties), e.g.
                     -object iothread,id=io0[,poll-max-ns=N][,poll-grow=N]
                            [,poll-shrink=N][,aio-max-batch=N]

Block devices:
-drive file=PATH,if=none|virtio|ide[,format=raw|qcow2][,id=ID][,readonly=on|off]
       [,media=disk|cdrom][,cache=none|writeback|writethrough|directsync|unsafe]
       [,discard=ignore|unmap][,detect-zeroes=off|on|unmap]
       [,aio=threads|native|io_uring][,index=INDEX][,addr=SLOT (if=virtio)]
                     open a disk image: if=virtio adds its virtio-blk-pci, if=ide
                     (pc's default) its ide-hd or ide-cd (media=cdrom) on
                     ide.(INDEX/2) unit INDEX%2, if=none leaves it for
                     -device ...,drive=ID
-hda/-hdb/-hdc/-hdd FILE
                     IDE disk at index 0/1/2/3 (a bare FILE is -hda)
-cdrom FILE          IDE CD-ROM at index 2 (ide.1 master; -M pc has an empty one
                     there unless -nodefaults)
-blockdev driver=file,node-name=N,filename=PATH[,aio=...][,cache.direct=on|off]
-blockdev driver=qcow2|raw,node-name=N,file.driver=file,file.filename=PATH
          [,discard=ignore|unmap][,detect-zeroes=off|on|unmap][,read-only=on|off]
-blockdev driver=qcow2|raw,node-name=N,file=FILE-NODE[,backing=NODE] (qcow2)
-blockdev JSON      the same as a JSON object (file: {\"driver\": \"file\", ...} or a
                     node name; \"backing\": null for none)
                     open a disk image as a block node
-no-reboot           exit instead of rebooting
-no-shutdown         stop before shutdown
-action reboot=reset|shutdown,shutdown=poweroff|pause,panic=pause|shutdown|exit-failure|none,
        watchdog=reset|shutdown|poweroff|pause|debug|none|inject-nmi
                     what resets, shutdowns, panics and expired watchdogs do
-watchdog-action reset|shutdown|poweroff|pause|debug|none|inject-nmi
                     action when the watchdog fires (-action watchdog=)
-rtc [base=utc][,clock=host][,driftfix=none|slew]
                     the RTC runs on the host's UTC clock; driftfix=slew re-injects
                     the periodic ticks a guest missed (libvirt's catchup)
-boot [order=drives][,once=drives][,menu=on|off][,splash=file][,splash-time=ms]
      [,reboot-timeout=ms][,strict=on|off]
                     the firmware's boot order (a floppy, c disk, d CD-ROM, n network),
                     for the first boot only with once=; its menu and splash; ms before
                     it reboots when nothing boots (-1: never); strict=on: only the
                     bootindex devices
-no-hpet             HPET disabled (-machine hpet=off)
-overcommit [mem-lock=on|off][,cpu-pm=off]
                     mem-lock=on locks all of qomvm's memory (mlockall)
-audiodev [driver=]none,id=id
                     an audio backend that discards (qomvm has no sound device)

Network:
-netdev user,id=str[,net=addr[/mask]][,hostfwd=rule][,restrict=on|off][,...]
-netdev tap,id=str[,ifname=name][,fd=h][,script=file][,downscript=file][,vhost=on|off]
                     a network backend for a card's netdev=
-nic user|tap|none[,model=e1000|rtl8139|virtio-net-pci][,mac=addr][,backend options]
                     a backend and its card in one (e1000 by default)
-net nic[,model=type][,macaddr=addr][,netdev=id][,name=str]
-net user|tap[,backend options]
-net none            legacy networking: one card on one backend (no hubs); with no
                     -net, -nic, -netdev or -nodefaults, -M pc gets -net nic -net user

Display and character devices:
-display none        no window (qomvm has none)
-display vnc=[host]:display[,...]
                     the same as -vnc
-vga std|none        the display device (-M pc: std unless -nodefaults)
-vnc [host]:display[,to=L][,share=allow-exclusive|force-shared|ignore]
                     a VNC server on port 5900+display (the first free one up to
                     5900+L with to=); -vnc none: no server
-nographic           no graphical output; serial console on this terminal
-serial dev          redirect the serial port to char device 'dev'
                     (stdio, null, none, pty, file:PATH)
-parallel dev        redirect the parallel port to char device 'dev'
                     (null, none, file:PATH, pty, ...; the pc has LPT1 on null
                     unless -nodefaults)
-debugcon dev        redirect the debug console to char device 'dev'
                     (an isa-debugcon at port 0xe9: SeaBIOS's log with -global
                     isa-debugcon.iobase=0x402)
-chardev backend,id=id[,...]
                     configure a character device (stdio, null, ringbuf, pty,
                     file,path=PATH[,append=on], or socket,path=PATH|fd=N,
                     server=on[,wait=off] for a -mon)

Debug/Expert options:
-qmp dev             QMP monitor on 'dev' (stdio, unix:PATH,server=on[,wait=off],
                     tcp:127.0.0.1:PORT,server=on[,wait=off])
-monitor dev         human monitor on 'dev' (same backends as -qmp, or none)
-mon chardev=id[,mode=control|readline]
                     QMP (control) or human monitor on a socket chardev
-add-fd fd=fd,set=set[,opaque=text]
                     pass an inherited descriptor; /dev/fdset/set opens it
-pidfile file        write the process id to 'file' (locked, removed at exit)
-daemonize           detach once start-up has succeeded
-no-user-config      accepted: qomvm reads no configuration files
-msg timestamp=on|off
                     prefix messages with a UTC timestamp
-S                   freeze CPUs at startup (use 'cont' to start)
-incoming unix:socketpath
                     prepare for incoming migration, listen on a unix socket
-incoming tcp:[host]:port
                     prepare for incoming migration, listen on a TCP port
-incoming file:filename
                     prepare for incoming migration, read the stream from a file
-incoming exec:cmdline
                     accept incoming migration on given file descriptor
                     or from given external command
-incoming defer
                     wait for the URI to be specified via migrate_incoming

Linux/Multiboot boot specific:
-bios file           set the filename for the BIOS (default: SeaBIOS's bios-256k.bin)
-kernel bzImage      use 'bzImage' as kernel image
-append cmdline      use 'cmdline' as kernel command line
-initrd file         use 'file' as initial ram disk
";

pub fn version() -> String {
    format!(
        "qomvm version {}\nA VMM built on QEMU's object model, in Rust",
        env!("CARGO_PKG_VERSION")
    )
}

pub fn machines() -> String {
    let mut out = String::from("Supported machines are:\n");
    let mut classes: Vec<_> = qom::object_class_get_list(Some(TYPE_MACHINE), false)
        .into_iter()
        .filter_map(machine_class)
        .collect();
    // QEMU's order: a family's types by name from the last (the i440FX versions, newest
    // first by its string comparison), then the machines of no family by name.
    let family = |name: &str| name.starts_with("pc-i440fx-");
    classes.sort_by(|a, b| match (family(a.name), family(b.name)) {
        (true, true) => b.name.cmp(a.name),
        (fa, fb) => fb.cmp(&fa).then(a.name.cmp(b.name)),
    });
    for mc in classes {
        if let Some(alias) = mc.alias {
            let _ = writeln!(out, "{:<20} {} (alias of {})", alias, mc.desc, mc.name);
        }
        let default = if mc.is_default { " (default)" } else { "" };
        let deprecated = if mc.deprecation_reason.is_some() {
            " (deprecated)"
        } else {
            ""
        };
        let _ = writeln!(out, "{:<20} {}{}{}", mc.name, mc.desc, default, deprecated);
    }
    out
}

pub fn accels() -> String {
    let mut out = String::from("Accelerators supported in qomvm binary:\n");
    for ac in accel::accel_list() {
        let _ = writeln!(out, "{}", ac.name);
    }
    out
}

pub fn devices() -> String {
    let mut by_category: BTreeMap<DeviceCategory, Vec<&'static ObjectClass>> = BTreeMap::new();
    for class in qom::object_class_get_list(Some(TYPE_DEVICE), false) {
        let dc = device_class(class).expect("device classes have a DeviceClass");
        if dc.user_creatable {
            by_category.entry(dc.category).or_default().push(class);
        }
    }
    let mut out = String::new();
    for (i, (category, classes)) in by_category.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}:", category.heading());
        for class in classes {
            let dc = device_class(class).expect("device classes have a DeviceClass");
            let _ = write!(out, "name \"{}\"", class.name());
            if let Some(bus) = dc.bus_type {
                let _ = write!(out, ", bus {bus}");
            }
            if let Some(desc) = dc.desc {
                let _ = write!(out, ", desc \"{desc}\"");
            }
            out.push('\n');
        }
    }
    out
}

/// Properties `-device DRIVER,help` does not show: QOM bookkeeping, not configuration.
const INTERNAL_PROPERTIES: &[&str] = &["type", "realized", "hotpluggable", "parent_bus"];

pub fn device_properties(class: &ObjectClass) -> String {
    let mut out = format!("{} options:\n", class.name());
    let mut props: Vec<_> = class
        .properties()
        .iter()
        .filter(|p| !INTERNAL_PROPERTIES.contains(&p.name.as_ref()))
        .filter(|p| p.is_settable())
        .filter(|p| !matches!(p.kind, PropertyKind::Child(_)))
        .collect();
    props.sort_by(|a, b| a.name.cmp(&b.name));
    if props.is_empty() {
        out.push_str("There are no options for ");
        out.push_str(class.name());
        out.push_str(".\n");
        return out;
    }
    for prop in props {
        let info = prop.info();
        let head = format!("  {}=<{}>", info.name, info.type_name);
        let _ = write!(out, "{head:<24} - {}", info.description);
        if let Some(default) = info.default {
            let _ = write!(out, " (default: {default})");
        }
        out.push('\n');
    }
    out
}

/// `-cpu help` in QEMU's layout (`x86_cpu_list`): the models, table models first then
/// the special ones, each by name; then the feature names, wrapped as `listflags` does.
pub fn cpus() -> String {
    let mut out = String::from("Available CPUs:\n");
    let mut models: Vec<(bool, &'static str, &'static str)> =
        qom::object_class_get_list(Some(TYPE_CPU), false)
            .into_iter()
            .filter_map(|class| {
                let cc = class.get::<CpuClass>()?;
                let special = class
                    .get::<X86CpuClass>()
                    .and_then(|x| x.model)
                    .is_some_and(|m| m.kind != ModelKind::Named);
                Some((special, cc.model_name, cc.model_description.unwrap_or("")))
            })
            .collect();
    models.sort();
    for (_, name, description) in models {
        let _ = writeln!(out, "x86 {name:<20}  {description}");
    }
    out.push_str("\nRecognized CPUID flags:\n");
    // Lines of at most 75 columns, two spaces in; QEMU ends the list with a blank line.
    let mut line = String::new();
    for flag in feature_names() {
        if !line.is_empty() && line.len() + flag.len() + 1 > 75 {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        line.push_str(if line.is_empty() { "  " } else { " " });
        line.push_str(flag);
    }
    out.push_str(&line);
    out.push_str("\n\n");
    out
}
