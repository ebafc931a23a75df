//! Start-up in the order of QEMU's `vl.c`: `module_call_init` (the type table), help
//! listings, `select_machine`, machine properties, `configure_accelerators`, board init,
//! `-device`, then the main loop until a run request ends it.

use std::time::Duration;

use hw::core::bus::find_bus_by_type;
use hw::core::machine::startup_phase;
use hw::core::machine::{
    find_machine, machine_class, machine_run_board_init, machine_state, SmpConfig,
};
use hw::core::qdev::{device_class, device_type, qdev_new, qdev_realize, DeviceMethods, QdevError};
use hw::core::qdev_properties::register_global;
use hw::core::runstate::{self, RunRequest};
use hw::core::sandbox::{parse_sandbox, SandboxPolicy};
use qom::{object_get_root, resolve_path, ObjectRef};

use crate::help;
use crate::monitor;
use crate::options::{split_opts, Located, OptionError, Options};
use crate::os_posix::DaemonPipe;

/// Runs qomvm; returns the process's exit status.
pub fn qemu_main(opts: Options, daemon: Option<DaemonPipe>) -> Result<i32, OptionError> {
    if opts.help {
        print!("{}", help::USAGE);
        return Ok(0);
    }
    if opts.version {
        println!("{}", help::version());
        return Ok(0);
    }
    // QEMU's qemu_maybe_daemonize: the pid file names the daemon; `os_posix::exit`
    // removes it.
    if let Some(p) = &opts.pidfile {
        let pidfile = crate::os_posix::write_pidfile(std::path::Path::new(&p.value))
            .map_err(|e| OptionError::new("", e))?;
        crate::os_posix::hold_pidfile(pidfile);
    }
    qemu_init_and_run(&opts, daemon)
}

/// `qemu_init` then the main loop, with the pid file written.
fn qemu_init_and_run(opts: &Options, daemon: Option<DaemonPipe>) -> Result<i32, OptionError> {
    let sandbox = match &opts.sandbox {
        Some(s) => parse_sandbox(&s.value).map_err(|e| s.error(e))?,
        None => SandboxPolicy::default(),
    };
    hw::core::sandbox::prepare(sandbox);
    // module_call_init(MODULE_INIT_QOM), with the self-check that no registration was lost.
    accel::init().map_err(|e| OptionError::new("", e))?;
    startup_phase("type table");

    if let Some(text) = help_request(opts)? {
        print!("{text}");
        return Ok(0);
    }

    for g in &opts.globals {
        register_global(&g.value).map_err(|e| g.error(e))?;
    }

    // QEMU's audio_parse_option prints the drivers and exits while parsing.
    if opts
        .audiodev
        .iter()
        .any(|a| crate::audio::is_help_option(&a.value))
    {
        print!("{}", crate::audio::audio_help());
        return Ok(0);
    }
    // QEMU's qemu_create_early_backends: user-creatable objects (iothreads), then chardevs.
    for o in &opts.objects {
        if let Some(text) = crate::objects::object_option(o)? {
            print!("{text}");
            return Ok(0);
        }
    }

    configure_host_options(opts)?;
    // QEMU's parse_add_fd: descriptor sets exist before anything opens /dev/fdset/N.
    for a in &opts.add_fd {
        add_fd(a)?;
    }
    for c in &opts.chardev {
        // A socket chardev a monitor uses (`-mon chardev=ID`) is opened by monitor_init,
        // which serves many clients; any other is a device's (`-serial chardev:ID`).
        if chardev_driver(&c.value) == "socket" {
            let id = chardev_id(&c.value);
            if opts.mon.iter().any(|m| mon_chardev(&m.value) == id) {
                continue;
            }
        }
        if opts.daemonize && chardev_driver(&c.value) == "stdio" {
            return Err(c.error("cannot use stdio with -daemonize"));
        }
        let chardev = qom::error_report::with_location(&c.location(), || {
            hw::core::chardev::parse_chardev_opts(&c.value)
        })
        .map_err(|e| c.error(e))?;
        if let Some(path) = chardev.backend.filename().strip_prefix("pty:") {
            // QEMU's char_pty_open tells where the terminal is.
            qom::error_report!("char device redirected to {path} (label {})", chardev.id);
        }
        chardev.register().map_err(|e| c.error(e))?;
    }
    // QEMU's configure_blockdev: images are opened (and locked) before the machine; a
    // migration's destination opens them inactive, as the source still writes them.
    block::set_open_inactive(opts.incoming.is_some());
    for b in &opts.blockdevs {
        crate::blockdev::blockdev_add(b)?;
    }
    // QEMU's configure_blockdev runs with the machine class selected: a -drive without
    // `if=` takes the board's interface. An unknown -M is reported by create_machine.
    let class = find_machine(machine_opts(opts).0.as_deref())
        .ok()
        .and_then(machine_class);
    let default_interface = class.map_or("none", |mc| mc.block_default_type);
    let ide_buses = class.map_or(0, |mc| mc.ide_buses);
    // QEMU's order of creation, in which slots are given: what the board makes (the IDE
    // drives, the network cards of pc_nic_init); then the key=value -device list, to which
    // QEMU appends the `-drive if=virtio` devices as it opens the drives and then the
    // debugcon device; then the JSON -devices.
    let mut board_devices = Vec::new();
    let mut late_devices = Vec::new();
    let mut drive_table = crate::blockdev::DriveTable::default();
    for d in &opts.drives {
        match crate::blockdev::drive_add(d, default_interface, ide_buses, &mut drive_table)? {
            Some((device, crate::blockdev::DriveDeviceTurn::Board)) => board_devices.push(device),
            Some((device, crate::blockdev::DriveDeviceTurn::AfterDevices)) => {
                late_devices.push(device)
            }
            None => {}
        }
    }
    // QEMU's `default_cdrom`, which `-nodefaults` and a disk or CD `-device` turn off.
    if !opts.nodefaults && !device_given(opts, &["ide-cd", "ide-hd", "scsi-cd", "scsi-hd"]) {
        if let Some((device, _)) =
            crate::blockdev::default_cdrom_add(default_interface, ide_buses, &mut drive_table)?
        {
            board_devices.push(device);
        }
    }
    // QEMU's `default_floppy` on a machine with a floppy controller, which `-nodefaults`
    // and an `isa-fdc` or `floppy` in -device or -global turn off.
    let fdc_given = device_given(opts, &["isa-fdc", "floppy"])
        || opts.globals.iter().any(|g| {
            g.value
                .split_once('.')
                .is_some_and(|(driver, _)| driver == "isa-fdc" || driver == "floppy")
        });
    if !opts.nodefaults && class.is_some_and(|mc| mc.has_floppy) && !fdc_given {
        if let Some((device, _)) =
            crate::blockdev::default_floppy_add(default_interface, ide_buses, &mut drive_table)?
        {
            board_devices.push(device);
        }
    }
    for d in &opts.debugcon {
        late_devices.push(debugcon_device(d)?);
    }
    // QEMU's net_init_clients: backends before the cards that use them.
    for n in &opts.netdevs {
        if let Some(text) = crate::net::netdev_option(n)? {
            print!("{text}");
            return Ok(0);
        }
    }
    // QEMU's `default_nic`; a machine without one still parses the options (their cards
    // then fail to find a bus), as e1000.
    let default_nic = class
        .and_then(|mc| mc.default_nic)
        .unwrap_or(hw::net::e1000::TYPE_E1000);
    for (index, n) in opts.nics.iter().enumerate() {
        match crate::net::nic_option(n, index, default_nic)? {
            crate::net::NicOption::None => {}
            crate::net::NicOption::Help(text) => {
                print!("{text}");
                return Ok(0);
            }
            crate::net::NicOption::Device(dev) => board_devices.push(dev),
        }
    }
    match crate::net::net_options(&default_net(opts, class), default_nic)? {
        crate::net::NetOptions::Help(text) => {
            print!("{text}");
            return Ok(0);
        }
        crate::net::NetOptions::Devices(devices) => board_devices.extend(devices),
    }
    startup_phase("backends");
    let machine = create_machine(opts)?;
    startup_phase("machine object");
    register_block_flush(&machine);
    select_vgahw(opts, &machine)?;
    configure_serial(opts, &machine)?;
    configure_parallel(opts, &machine)?;
    let accel = configure_accelerators(opts, &machine)?;
    startup_phase("accelerator");
    // QEMU's qemu_init: a deprecated machine type says so, except to qtest.
    if let Some(mc) = machine_class(machine.class()) {
        if let (Some(reason), false) = (mc.deprecation_reason, accel == "qtest") {
            qom::error_report!(
                "warning: Machine type '{}' is deprecated: {reason}",
                mc.name
            );
        }
    }
    // Board errors (a kernel that does not load...) are not about one option: QEMU prints
    // them without a location.
    machine_run_board_init(&machine).map_err(|e| OptionError::new("", e))?;
    startup_phase("board");
    // QEMU's qemu_create_cli_devices: -usbdevice before -device.
    for dev in &opts.usbdevice {
        usbdevice_add(&machine, dev)?;
    }
    let is_json = |d: &&Located| d.value.trim_start().starts_with('{');
    let keyval_devices = opts.devices.iter().filter(|d| !is_json(d));
    let json_devices = opts.devices.iter().filter(is_json);
    for dev in board_devices
        .iter()
        .chain(keyval_devices)
        .chain(&late_devices)
        .chain(json_devices)
    {
        device_add(&machine, dev)?;
    }
    startup_phase("devices");
    hw::core::machine::machine_creation_done(&machine).map_err(|e| OptionError::new("", e))?;
    startup_phase("creation done");
    start_vnc(opts, &machine)?;
    if let Some(uuid) = vm_uuid(opts)? {
        // QEMU's fw_cfg_init: FW_CFG_UUID carries qemu_uuid.
        if let Some(fw_cfg) = hw::nvram::fw_cfg::fw_cfg_find(&machine) {
            fw_cfg
                .add_bytes(hw::nvram::fw_cfg::FW_CFG_UUID, uuid.0.to_vec())
                .map_err(|e| OptionError::new("", e))?;
        }
    }
    // Before the monitors: under -incoming the runstate is `inmigrate` from the start and
    // `-incoming defer` already waits for `migrate-incoming`, so a client that connects at
    // once sees neither `prelaunch` nor "'-incoming' was not specified".
    if let Some(incoming) = &opts.incoming {
        crate::migration::incoming_at_startup(&machine, &incoming.value, !opts.start_paused)
            .map_err(|e| incoming.error(e))?;
    }
    monitor::monitor_init(&machine, opts)?;
    startup_phase("monitors");
    // QEMU's os_setup_post: start-up is done; the waiting parent may exit.
    if let Some(daemon) = daemon {
        daemon.ready();
    }
    if opts.nographic && opts.monitor.is_empty() {
        // -nographic muxes the human monitor with the serial console (QEMU's mon:stdio).
        crate::mux::set_console_monitor(monitor::console_monitor(&machine, opts));
    }
    if let Some(q) = &opts.qtest {
        let log = opts.qtest_log.as_ref().map(|l| l.value.as_str());
        crate::qtest::qtest_init(&q.value, log, &machine).map_err(|e| q.error(e))?;
    }
    // QEMU's seccomp_start comes first thing; qomvm's allowlists are narrower, so they go
    // on once the machine is built (images open, devices realized, sockets listening) and
    // before the guest runs.
    hw::core::sandbox::set_fatal_hook(crate::term::restore_from_signal);
    hw::core::sandbox::install(sandbox).map_err(|e| OptionError::new("", e))?;
    if sandbox.enabled && !sandbox.spawn {
        ::net::launcher::deny_spawn();
    }
    startup_phase("sandbox");
    let status = main_loop(&machine, opts);
    monitor::monitor_cleanup();
    block::close_all();
    // QEMU's net_cleanup: taps run their downscript, slirp threads end.
    ::net::cleanup_all();
    Ok(status)
}

/// The `-net` options to act on: those given, or QEMU's default network (`-net nic -net
/// user`: the machine's `default_nic` on user networking) when the machine has a default
/// card and neither `-nodefaults` nor any `-net`, `-nic` or `-netdev` is given.
fn default_net(opts: &Options, class: Option<&hw::core::machine::MachineClass>) -> Vec<Located> {
    let wants_default = !opts.nodefaults
        && opts.nets.is_empty()
        && opts.nics.is_empty()
        && opts.netdevs.is_empty()
        && class.is_some_and(|mc| mc.default_nic.is_some());
    if !wants_default {
        return opts.nets.clone();
    }
    ["nic", "user"]
        .into_iter()
        .map(|value| Located {
            option: "net",
            value: value.into(),
        })
        .collect()
}

/// QEMU's `debugcon_parse`: chardev `debugcon` from a `-serial`-style spec, and the
/// `isa-debugcon` device (id `debugcon`) that prints to it.
fn debugcon_device(located: &Located) -> Result<Located, OptionError> {
    let invalid = || located.error(format!("invalid character backend '{}'", located.value));
    let backend = hw::core::chardev::parse_serial_spec(&located.value)
        .ok()
        .flatten()
        .ok_or_else(invalid)?;
    hw::core::chardev::chardev_add("debugcon", backend).map_err(|_| invalid())?;
    Ok(Located {
        option: "device",
        value: "isa-debugcon,chardev=debugcon,id=debugcon".to_string(),
    })
}

/// `-vnc` (the last one) or `-display vnc=...` (QEMU's `vnc_parse` and
/// `vnc_display_open`): the server starts listening once the machine's displays exist.
fn start_vnc(opts: &Options, machine: &ObjectRef) -> Result<(), OptionError> {
    let (located, text) = match (&opts.vnc, &opts.display) {
        (Some(v), _) => (v, v.value.as_str()),
        (None, Some(d)) => match d.value.strip_prefix("vnc=") {
            Some(rest) => (d, rest),
            None => return Ok(()),
        },
        (None, None) => return Ok(()),
    };
    let config = crate::vnc::parse_vnc_option(text).map_err(|e| located.error(e))?;
    let guest_name = opts.name.as_ref().and_then(|n| {
        split_opts(&n.value, Some("guest"))
            .into_iter()
            .find(|(k, _)| k == "guest")
            .and_then(|(_, v)| v)
    });
    let title = guest_name.map(|g| format!("QEMU ({g})"));
    let ms = machine_state(machine).expect("machines have a MachineState");
    crate::vnc::vnc_display_init(ms.services(), config.as_ref(), title.as_deref())
        .map_err(|e| located.error(e))
}

/// Errors of the options that set up the host process rather than the machine.
#[derive(Debug, thiserror::Error)]
enum HostOptionError {
    /// A key the option does not have.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// A value that is not `on`/`off`.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    NotBool(String),
    /// A QEMU setting qomvm does not implement.
    #[error("{0} is not supported by qomvm")]
    Unsupported(String),
    /// `-overcommit mem-lock=on` failed.
    #[error("locking memory failed: {0}")]
    MemLock(std::io::Error),
    /// A bad `-uuid`.
    #[error(transparent)]
    Uuid(#[from] hw::core::uuid::UuidError),
    /// `-add-fd` with a bad `fd=`/`set=`.
    #[error(transparent)]
    Fdset(#[from] hw::core::fdset::FdsetError),
    /// `-nographic` would put a default serial port or monitor on stdio.
    #[error("-nographic cannot be used with -daemonize")]
    NographicDaemon,
}

/// `-boot [order=]DEVICES,once=,menu=,splash=,splash-time=,reboot-timeout=,strict=` (QEMU
/// merges repeated `-boot`s, the later value of a key winning), checked in QEMU's words.
fn boot_config(opts: &Options) -> Result<hw::core::machine::BootConfig, OptionError> {
    let mut config = hw::core::machine::BootConfig::default();
    for b in &opts.boot {
        for (key, value) in split_opts(&b.value, Some("order")) {
            let bool_value = |v: Option<&str>| {
                on_off(&format!("boot.{key}"), v).map_err(|e| OptionError::new("", e))
            };
            let int_value = |v: Option<&str>| {
                v.unwrap_or_default().parse::<i64>().map_err(|_| {
                    OptionError::new("", format!("Parameter 'boot.{key}' expects integer"))
                })
            };
            let v = value.as_deref();
            match key.as_str() {
                "order" => config.order = Some(v.unwrap_or_default().to_string()),
                "once" => config.once = Some(v.unwrap_or_default().to_string()),
                "menu" => config.menu = Some(bool_value(v)?),
                "strict" => config.strict = bool_value(v)?,
                "splash" => config.splash = Some(v.unwrap_or_default().to_string()),
                "splash-time" => config.splash_time = Some(int_value(v)?),
                "reboot-timeout" => config.reboot_timeout = Some(int_value(v)?),
                _ => {
                    let e = format!("Parameter 'boot.{key}' is unexpected");
                    return Err(OptionError::new("", e));
                }
            }
        }
    }
    config.validate().map_err(|e| OptionError::new("", e))?;
    Ok(config)
}

fn on_off(key: &str, value: Option<&str>) -> Result<bool, HostOptionError> {
    match value {
        None | Some("on" | "yes" | "true") => Ok(true),
        Some("off" | "no" | "false") => Ok(false),
        Some(_) => Err(HostOptionError::NotBool(key.to_string())),
    }
}

/// The options that shape the process, not the machine, checked and applied as QEMU does
/// while parsing: `-name`, `-overcommit`, `-rtc`, `-boot`, `-msg`, `-audiodev`, `-uuid`; `-daemonize`'s
/// conflicts. `-no-user-config` needs nothing: qomvm reads no configuration file.
fn configure_host_options(opts: &Options) -> Result<(), OptionError> {
    if let Some(name) = &opts.name {
        for (key, value) in split_opts(&name.value, Some("guest")) {
            match key.as_str() {
                "guest" => {}
                // qomvm names its threads (`CPU 0/KVM`) whether or not this is on.
                "debug-threads" => {
                    on_off(&key, value.as_deref()).map_err(|e| name.error(e))?;
                }
                "process" => set_process_name(value.as_deref().unwrap_or_default()),
                _ => return Err(name.error(HostOptionError::InvalidParameter(key))),
            }
        }
    }
    for o in &opts.overcommit {
        for (key, value) in split_opts(&o.value, None) {
            let on = on_off(&key, value.as_deref()).map_err(|e| o.error(e))?;
            match key.as_str() {
                // QEMU's os_mlock: lock current and future memory, guest RAM included.
                "mem-lock" if on => {
                    // SAFETY: mlockall has no memory-safety preconditions.
                    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } < 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(o.error(HostOptionError::MemLock(e)));
                    }
                }
                "cpu-pm" if on => {
                    return Err(o.error(HostOptionError::Unsupported("cpu-pm=on".into())))
                }
                "mem-lock" | "cpu-pm" => {}
                _ => return Err(o.error(HostOptionError::InvalidParameter(key))),
            }
        }
    }
    // QEMU's configure_rtc, once over the merged -rtc options (the last value of each key
    // counts): where the guest's clock starts and what moves it (hw/core/rtc_clock.rs);
    // lost periodic ticks discarded, or caught up with under driftfix=slew (libvirt's
    // tickpolicy='catchup'), a global for the RTC.
    let mut rtc: [Option<(&Located, String)>; 3] = [None, None, None];
    for r in &opts.rtc {
        for (key, value) in split_opts(&r.value, None) {
            let slot = match key.as_str() {
                "base" => 0,
                "clock" => 1,
                "driftfix" => 2,
                _ => return Err(r.error(HostOptionError::InvalidParameter(key))),
            };
            rtc[slot] = Some((r, value.unwrap_or_default()));
        }
    }
    let [base, clock, driftfix] = rtc;
    let value = |slot: &Option<(&Located, String)>| slot.as_ref().map(|(_, v)| v.clone());
    if let Err(e) =
        hw::core::rtc_clock::configure_rtc(value(&base).as_deref(), value(&clock).as_deref())
    {
        // The -rtc that gave the refused value.
        let culprit = match e {
            hw::core::rtc_clock::RtcOptionError::Datetime => &base,
            hw::core::rtc_clock::RtcOptionError::Clock(_) => &clock,
        };
        if let Some((r, _)) = culprit {
            return Err(r.error(e));
        }
    }
    match driftfix {
        Some((r, value)) if value == "slew" => {
            hw::core::qdev_properties::register_global("mc146818rtc.lost_tick_policy=slew")
                .map_err(|e| r.error(e))?;
        }
        Some((r, value)) if value != "none" => {
            return Err(r.error(format!("invalid option value '{value}'")));
        }
        _ => {}
    }
    // -boot is checked here, before anything is built; the board tells its firmware.
    boot_config(opts)?;
    for m in &opts.msg {
        for (key, value) in split_opts(&m.value, None) {
            let on = on_off(&key, value.as_deref()).map_err(|e| m.error(e))?;
            match key.as_str() {
                "timestamp" => qom::error_report::set_timestamps(on),
                "guest-name" if on => {
                    let what = "guest-name=on".to_string();
                    return Err(m.error(HostOptionError::Unsupported(what)));
                }
                "guest-name" => {}
                _ => return Err(m.error(HostOptionError::InvalidParameter(key))),
            }
        }
    }
    // QEMU's audio_parse_option (while parsing) and audio_init_audiodevs (with the early
    // backends): every -audiodev checked, then the backends created; `none` is the only
    // one qomvm has (it has no sound device), which displays' `audiodev=` may name.
    let mut audiodevs = Vec::with_capacity(opts.audiodev.len());
    for a in &opts.audiodev {
        audiodevs.push(crate::audio::audio_parse_option(&a.value).map_err(|e| a.error(e))?);
    }
    crate::audio::audio_init_audiodevs(&audiodevs).map_err(|(i, e)| opts.audiodev[i].error(e))?;
    vm_uuid(opts)?;
    // As QEMU: the default serial or parallel port would go to the terminal.
    let default_serial = opts.serial.is_empty() && !device_given(opts, &["isa-serial"]);
    let machine_has_parallel = find_machine(machine_opts(opts).0.as_deref())
        .ok()
        .and_then(machine_class)
        .is_some_and(|mc| mc.has_parallel);
    let default_parallel =
        machine_has_parallel && opts.parallel.is_empty() && !device_given(opts, &["isa-parallel"]);
    if opts.daemonize && opts.nographic && !opts.nodefaults && (default_serial || default_parallel)
    {
        return Err(OptionError::new("", HostOptionError::NographicDaemon));
    }
    Ok(())
}

/// The VM's UUID (QEMU's `qemu_uuid`): `-smbios type=1,uuid=` if given, else `-uuid`. Every
/// `-smbios` is checked here, where its errors can name it.
pub fn vm_uuid(opts: &Options) -> Result<Option<hw::core::uuid::Uuid>, OptionError> {
    let mut uuid = match &opts.uuid {
        Some(u) => Some(
            u.value
                .parse::<hw::core::uuid::Uuid>()
                .map_err(|e| u.error(HostOptionError::from(e)))?,
        ),
        None => None,
    };
    let mut smbios = hw::smbios::smbios::SmbiosConfig::default();
    for located in &opts.smbios {
        smbios
            .add_option(&located.value)
            .map_err(|e| located.error(e))?;
    }
    if let Some(u) = smbios.uuid() {
        uuid = Some(u);
    }
    Ok(uuid)
}

/// `-name process=NAME`: the process's name as `ps` shows it (QEMU's `os_set_proc_name`).
fn set_process_name(name: &str) {
    // The kernel keeps 15 bytes and a NUL.
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
}

/// `-add-fd fd=N,set=M[,opaque=TEXT]` (QEMU's `parse_add_fd`).
fn add_fd(located: &Located) -> Result<(), OptionError> {
    let (mut fd, mut set, mut opaque) = (None, None, None);
    for (key, value) in split_opts(&located.value, None) {
        match key.as_str() {
            "fd" => fd = value,
            "set" => set = value,
            "opaque" => opaque = value,
            _ => return Err(located.error(HostOptionError::InvalidParameter(key))),
        }
    }
    let fd = fd
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| located.error(hw::core::fdset::FdsetError::BadFd))?;
    let set = set
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| located.error(hw::core::fdset::FdsetError::BadSet))?;
    hw::core::fdset::fdset_add_fd(set, fd, opaque).map_err(|e| located.error(e))
}

/// The backend of a `-chardev` value.
fn chardev_driver(text: &str) -> String {
    split_opts(text, Some("backend"))
        .into_iter()
        .next()
        .and_then(|(_, v)| v)
        .unwrap_or_default()
}

/// The `id=` of a `-chardev` value.
fn chardev_id(text: &str) -> Option<String> {
    split_opts(text, Some("backend"))
        .into_iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v)
}

/// The `chardev=` of a `-mon` value.
fn mon_chardev(text: &str) -> Option<String> {
    split_opts(text, Some("chardev"))
        .into_iter()
        .find(|(k, _)| k == "chardev")
        .and_then(|(_, v)| v)
}

fn machine_location(opts: &Options) -> String {
    opts.machine
        .iter()
        .rev()
        .find(|l| l.option == "machine")
        .map(Located::location)
        .unwrap_or_default()
}

/// The merged `-machine` options: type, then properties in order.
/// A `-machine` property: key, value, and the option it came from.
type MachineProp<'a> = (String, Option<String>, &'a Located);

fn machine_opts(opts: &Options) -> (Option<String>, Vec<MachineProp<'_>>) {
    let mut machine_type = None;
    let mut props = Vec::new();
    for m in &opts.machine {
        for (key, value) in split_opts(&m.value, Some("type")) {
            if key == "type" {
                machine_type = value;
            } else {
                props.push((key, value, m));
            }
        }
    }
    (machine_type, props)
}

/// Handles `help` wherever QEMU accepts it; returns the listing to print. Also refuses
/// unknown `-device` drivers before anything is built.
fn help_request(opts: &Options) -> Result<Option<String>, OptionError> {
    let (machine_type, _) = machine_opts(opts);
    if matches!(machine_type.as_deref(), Some("help" | "?")) {
        return Ok(Some(help::machines()));
    }
    if opts.accel.iter().any(|a| {
        split_opts(&a.value, Some("accel"))
            .first()
            .is_some_and(|(_, v)| matches!(v.as_deref(), Some("help" | "?")))
    }) {
        return Ok(Some(help::accels()));
    }
    if let Some(cpu) = &opts.cpu {
        if matches!(cpu.value.as_str(), "help" | "?") {
            return Ok(Some(help::cpus()));
        }
    }
    if opts.vga.as_ref().is_some_and(|v| v.value == "help") {
        let class = find_machine(machine_type.as_deref())
            .map_err(|e| OptionError::new(machine_location(opts), e))?;
        let default = machine_class(class).and_then(|mc| mc.default_display);
        let mut text = String::new();
        for t in VGA_INTERFACES
            .iter()
            .filter(|t| t.driver.is_some() || t.opt_name == "none")
        {
            let mark = if default == Some(t.opt_name) {
                " (default)"
            } else {
                ""
            };
            text.push_str(&format!("{:<20} {}{mark}\n", t.opt_name, t.name));
        }
        return Ok(Some(text));
    }
    for dev in &opts.devices {
        let items =
            crate::options::split_opts_or_json(&dev.value, "driver").map_err(|e| dev.error(e))?;
        let driver = items[0].1.clone().unwrap_or_default();
        if matches!(driver.as_str(), "help" | "?") {
            return Ok(Some(help::devices()));
        }
        let class = device_type(&driver).map_err(|e| dev.error(e))?;
        if items.iter().skip(1).any(|(k, _)| k == "help" || k == "?") {
            return Ok(Some(help::device_properties(class)));
        }
    }
    Ok(None)
}

/// QEMU's `select_machine` + `qemu_create_machine` + `qemu_apply_machine_options`.
fn create_machine(opts: &Options) -> Result<ObjectRef, OptionError> {
    let (machine_type, props) = machine_opts(opts);
    let class = find_machine(machine_type.as_deref())
        .map_err(|e| OptionError::new(machine_location(opts), e))?;
    if let Some(mc) = machine_class(class) {
        hw::core::qdev_properties::set_machine_compat_props(&mc.compat_props);
    }
    let machine = qom::Object::new_with_class(class)
        .map_err(|e| OptionError::new(machine_location(opts), e))?;
    object_get_root()
        .add_child("machine", &machine)
        .map_err(|e| OptionError::new("", e))?;
    for (key, value, located) in props {
        if key == "accel" {
            continue;
        }
        // A bare property name means "on", as QemuOpts reads it.
        let value = value.unwrap_or_else(|| "on".to_string());
        machine
            .property_parse(&key, &value)
            .map_err(|e| located.error(e))?;
    }
    let ms = machine_state(&machine).expect("machines have a MachineState");
    if let Some(m) = &opts.memory {
        ms.set_ram_size(parse_ram_size(&m.value).map_err(|e| m.error(e))?);
    }
    if let Some(smp) = &opts.smp {
        let dies_supported = machine_class(machine.class()).is_some_and(|mc| mc.smp_dies_supported);
        ms.set_smp(parse_smp(&smp.value, dies_supported).map_err(|e| smp.error(e))?);
    }
    for (located, prop) in [
        (&opts.kernel, "kernel"),
        (&opts.bios, "firmware"),
        (&opts.initrd, "initrd"),
        (&opts.append, "append"),
    ] {
        if let Some(l) = located {
            machine
                .property_parse(prop, &l.value)
                .map_err(|e| l.error(e))?;
        }
    }
    ms.set_boot_config(boot_config(opts)?);
    ms.set_uuid(vm_uuid(opts)?);
    ms.set_smbios_options(opts.smbios.iter().map(|l| l.value.clone()).collect());
    // QEMU's -usb and -usbdevice put usb=on among the machine options.
    if opts.usb || !opts.usbdevice.is_empty() {
        machine
            .property_parse("usb", "on")
            .map_err(|e| OptionError::new("-usb", e))?;
    }
    // QEMU's -nographic turns the machine's graphics off (firmware then prints on serial).
    if opts.nographic {
        machine
            .property_parse("graphics", "off")
            .map_err(|e| OptionError::new("-nographic", e))?;
    }
    if let Some(cpu) = &opts.cpu {
        let (model, options) = cpu.value.split_once(',').unwrap_or((&cpu.value, ""));
        let cpu_type = find_cpu_type(model)
            .ok_or_else(|| cpu.error(format!("unable to find CPU model '{model}'")))?;
        // Check the options on a CPU that is never realized, so mistakes show here and
        // not in the middle of board init.
        let class = qom::object_class_by_name(cpu_type).expect("find_cpu_type returned a type");
        let probe = qom::Object::new_with_class(class).map_err(|e| cpu.error(e))?;
        if let Some(methods) = hw::core::cpu::cpu_impl(&probe) {
            methods
                .parse_features(&probe, options)
                .map_err(|e| cpu.error(e))?;
        }
        ms.set_cpu_type(Some(cpu_type.to_string()));
        ms.set_cpu_options(options.to_string());
    }
    if let Some(display) = &opts.display {
        let kind = display.value.split(',').next().unwrap_or_default();
        if kind != "none" && !kind.starts_with("vnc=") {
            return Err(display.error(format!("Display '{kind}' is not available")));
        }
    }
    ms.vm_state().set_actions(run_actions(opts)?);
    Ok(machine)
}

/// One `-vga` type (QEMU's `VGAInterfaceInfo`): its option name, its name in messages,
/// and the device qomvm creates for it, `None` where qomvm has no such device.
struct VgaInterface {
    opt_name: &'static str,
    name: &'static str,
    driver: Option<&'static str>,
}

/// QEMU's `vga_interfaces`, in its order.
const VGA_INTERFACES: &[VgaInterface] = &[
    VgaInterface {
        opt_name: "none",
        name: "no graphic card",
        driver: None,
    },
    VgaInterface {
        opt_name: "std",
        name: "standard VGA",
        driver: Some("VGA"),
    },
    VgaInterface {
        opt_name: "cirrus",
        name: "Cirrus VGA",
        driver: Some("cirrus-vga"),
    },
    VgaInterface {
        opt_name: "vmware",
        name: "VMWare SVGA",
        driver: None,
    },
    VgaInterface {
        opt_name: "xenfb",
        name: "Xen paravirtualized framebuffer",
        driver: None,
    },
    VgaInterface {
        opt_name: "qxl",
        name: "QXL VGA",
        driver: None,
    },
    VgaInterface {
        opt_name: "tcx",
        name: "TCX framebuffer",
        driver: None,
    },
    VgaInterface {
        opt_name: "cg3",
        name: "CG3 framebuffer",
        driver: None,
    },
    VgaInterface {
        opt_name: "virtio",
        name: "Virtio VGA",
        driver: Some("virtio-vga"),
    },
];

/// Display devices whose `-device` turns the default VGA off (QEMU's `default_list`
/// entries for `default_vga`).
const VGA_DEVICE_DRIVERS: &[&str] = &[
    "VGA",
    "isa-vga",
    "cirrus-vga",
    "isa-cirrus-vga",
    "vmware-svga",
    "qxl-vga",
    "virtio-vga",
    "virtio-vga-gl",
    "ati-vga",
    "vhost-user-vga",
];

/// Whether a `-device` (key=value or JSON) names one of `drivers`: QEMU's `default_list`,
/// whose devices take the place of the default one.
fn device_given(opts: &Options, drivers: &[&str]) -> bool {
    opts.devices.iter().any(|d| {
        crate::options::split_opts_or_json(&d.value, "driver")
            .ok()
            .and_then(|items| items.into_iter().find(|(k, _)| k == "driver"))
            .and_then(|(_, v)| v)
            .is_some_and(|driver| drivers.contains(&driver.as_str()))
    })
}

/// QEMU's `select_vgahw` with its defaults: `-vga TYPE` (the last one), else the
/// machine's default display unless `-nodefaults` or a display `-device` (QEMU 7.2 keeps
/// it under `-nographic` and `-display none`). Sets the device the board creates.
fn select_vgahw(opts: &Options, machine: &ObjectRef) -> Result<(), OptionError> {
    let ms = machine_state(machine).expect("machines have a MachineState");
    let default_display = machine_class(machine.class()).and_then(|mc| mc.default_display);
    let chosen = match &opts.vga {
        Some(located) => Some(located.value.as_str()),
        None => {
            let display_device = device_given(opts, VGA_DEVICE_DRIVERS);
            (!opts.nodefaults && !display_device)
                .then_some(default_display)
                .flatten()
        }
    };
    let Some(text) = chosen else {
        ms.set_vga_interface(None);
        return Ok(());
    };
    // QEMU reports these without the option's location.
    let error = |message: String| OptionError::new("", message);
    let unknown = || error(format!("unknown vga type: {text}"));
    // QEMU matches the type as a prefix, then reads `,retrace=` options.
    let t = VGA_INTERFACES
        .iter()
        .find(|t| text.starts_with(t.opt_name))
        .ok_or_else(unknown)?;
    if t.opt_name != "none" && t.driver.is_none() {
        return Err(error(format!("{} not available", t.name)));
    }
    let mut rest = &text[t.opt_name.len()..];
    while !rest.is_empty() {
        let Some(after) = rest.strip_prefix(",retrace=") else {
            return Err(unknown());
        };
        if let Some(r) = after.strip_prefix("dumb") {
            rest = r;
        } else if after.starts_with("precise") {
            return Err(error(
                "-vga retrace=precise is not supported by qomvm (retrace=dumb is)".into(),
            ));
        } else {
            return Err(unknown());
        }
    }
    ms.set_vga_interface(t.driver);
    Ok(())
}

/// QEMU's `runstate_action_parse` for every `-action` (and `-no-reboot`, `-no-shutdown`),
/// in command-line order.
fn run_actions(opts: &Options) -> Result<hw::core::runstate::RunActions, OptionError> {
    let mut actions = hw::core::runstate::RunActions::default();
    for located in &opts.actions {
        for (key, value) in split_opts(&located.value, None) {
            // A bare name means "on", as QemuOpts reads it (no action takes it).
            let value = value.unwrap_or_else(|| "on".to_string());
            actions.set(&key, &value).map_err(|e| located.error(e))?;
        }
    }
    Ok(actions)
}

fn find_cpu_type(model: &str) -> Option<&'static str> {
    qom::object_class_get_list(Some(hw::core::cpu::TYPE_CPU), false)
        .into_iter()
        .find(|c| {
            c.get::<hw::core::cpu::CpuClass>()
                .is_some_and(|cc| cc.model_name == model)
        })
        .map(|c| c.name())
}

/// `-m [size=]N[M|G]`: no suffix means MiB, as in QEMU.
fn parse_ram_size(text: &str) -> Result<u64, String> {
    let mut size = None;
    for (key, value) in split_opts(text, Some("size")) {
        match (key.as_str(), value) {
            ("size", Some(v)) => size = Some(v),
            ("slots" | "maxmem", Some(_)) => {
                return Err("memory hotplug (slots, maxmem) is not supported".to_string())
            }
            (k, _) => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let text = size.unwrap_or_default();
    let bytes = if text.chars().all(|c| c.is_ascii_digit()) && !text.is_empty() {
        text.parse::<u64>()
            .ok()
            .and_then(|mib| mib.checked_mul(1 << 20))
    } else {
        qom::parse_size(&text)
    };
    match bytes {
        Some(0) | None => Err(format!("invalid RAM size '{text}'")),
        Some(b) => Ok(b),
    }
}

/// `-smp [cpus=]n[,sockets=s][,cores=c][,threads=t][,maxcpus=m]` with QEMU's rules for the
/// values left out (cores preferred, as for QEMU's machine types since 6.2). A machine
/// with `dies_supported` (pc) names dies in its errors, as QEMU's do; qomvm's CPUs have one
/// die per socket and one cluster per die.
fn parse_smp(text: &str, dies_supported: bool) -> Result<SmpConfig, String> {
    let mut cpus = None;
    let mut sockets = None;
    let mut cores = None;
    let mut threads = None;
    let mut maxcpus = None;
    for (key, value) in split_opts(text, Some("cpus")) {
        let v: u32 = value
            .as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("Parameter '{key}' expects a number"))?;
        if v == 0 {
            return Err(format!(
                "Invalid CPU topology: CPU topology parameters must be greater than zero ({key}=0)"
            ));
        }
        match key.as_str() {
            "cpus" => cpus = Some(v),
            "sockets" => sockets = Some(v),
            "cores" => cores = Some(v),
            "threads" => threads = Some(v),
            "maxcpus" => maxcpus = Some(v),
            "dies" | "clusters" if v == 1 => {}
            // QEMU's pc takes more dies; qomvm's CPUs have one per socket.
            "dies" if dies_supported => {
                return Err(format!("dies={v}: qomvm supports one die per socket"))
            }
            "dies" | "clusters" => {
                return Err(format!(
                    "{key} not supported by this machine's CPU topology"
                ))
            }
            other => return Err(format!("Invalid parameter '{other}'")),
        }
    }
    // QEMU's smp_parse for machines since 6.2: cores are preferred over sockets for the
    // values left out, threads are worked out last.
    let (sockets, cores, threads) = match maxcpus.or(cpus) {
        None => (
            sockets.unwrap_or(1),
            cores.unwrap_or(1),
            threads.unwrap_or(1),
        ),
        Some(total) => match (sockets, cores, threads) {
            (s, None, t) => {
                let (s, t) = (s.unwrap_or(1), t.unwrap_or(1));
                (s, total / s.saturating_mul(t), t)
            }
            (None, Some(c), t) => {
                let t = t.unwrap_or(1);
                (total / c.saturating_mul(t), c, t)
            }
            (Some(s), Some(c), t) => (s, c, t.unwrap_or(total / s.saturating_mul(c))),
        },
    };
    // In 64 bits: the product of three u32 values a user typed may not fit in 32.
    let product = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    let max_cpus = maxcpus
        .or(cpus)
        .unwrap_or(u32::try_from(product).unwrap_or(u32::MAX));
    let cpus = cpus.unwrap_or(max_cpus);
    // QEMU's cpu_hierarchy_to_string.
    let dies = if dies_supported { " * dies (1)" } else { "" };
    let hierarchy = format!("sockets ({sockets}){dies} * cores ({cores}) * threads ({threads})");
    if product != u64::from(max_cpus) {
        return Err(format!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: {hierarchy} != maxcpus ({max_cpus})"
        ));
    }
    if cpus > max_cpus {
        return Err(format!(
            "Invalid CPU topology: maxcpus must be equal to or greater than smp: {hierarchy} == maxcpus ({max_cpus}) < smp_cpus ({cpus})"
        ));
    }
    Ok(SmpConfig {
        cpus,
        sockets,
        cores,
        threads,
        max_cpus,
    })
}

/// QEMU's `serial_parse` for each `-serial`, with its defaults: without `-serial`, the
/// first port goes to this terminal (qomvm has no graphical console to put it on) unless
/// `-nodefaults`. Under `-nographic` a console on stdio gets QEMU's Ctrl-A escapes and the
/// terminal goes to raw mode.
fn configure_serial(opts: &Options, machine: &ObjectRef) -> Result<(), OptionError> {
    let specs: Vec<(String, String)> = if opts.serial.is_empty() {
        // A daemon has no terminal: QEMU's default (a graphical console) shows nothing
        // without a display, and neither does qomvm's under -daemonize.
        // Nor does it take stdio from a monitor or qtest that has it (QEMU's default serial
        // is never stdio then either).
        let stdio_taken = opts
            .qmp
            .iter()
            .chain(&opts.monitor)
            .chain(&opts.qtest)
            .any(|l| l.value == "stdio" || l.value.starts_with("stdio,"));
        // An `isa-serial` -device takes the default's place, as in QEMU.
        if opts.nodefaults || opts.daemonize || stdio_taken || device_given(opts, &["isa-serial"]) {
            Vec::new()
        } else {
            vec![("stdio".to_string(), String::new())]
        }
    } else {
        opts.serial
            .iter()
            .map(|s| (s.value.clone(), s.location()))
            .collect()
    };
    if specs.len() > 4 {
        return Err(OptionError::new("", "too many serial ports (at most 4)"));
    }
    let hds = char_frontend_backends(opts, machine, specs, "serial")?;
    machine_state(machine)
        .expect("machines have a MachineState")
        .set_serial_hds(hds);
    Ok(())
}

/// QEMU's `parallel_parse` for each `-parallel`, with its default: without `-parallel`,
/// LPT1 on a null chardev (QEMU's is a graphical console, which shows nothing here either)
/// on machines that have parallel ports, unless `-nodefaults` or an `isa-parallel`
/// `-device`.
fn configure_parallel(opts: &Options, machine: &ObjectRef) -> Result<(), OptionError> {
    let has_parallel = machine_class(machine.class()).is_some_and(|mc| mc.has_parallel);
    let specs: Vec<(String, String)> = if opts.parallel.is_empty() {
        // An `isa-parallel` -device takes the default's place, as in QEMU.
        if opts.nodefaults || !has_parallel || device_given(opts, &["isa-parallel"]) {
            Vec::new()
        } else {
            vec![("null".to_string(), String::new())]
        }
    } else {
        // QEMU's parallel_parse: `none` takes no LPT index.
        opts.parallel
            .iter()
            .filter(|p| p.value != "none")
            .map(|p| (p.value.clone(), p.location()))
            .collect()
    };
    if let Some((_, location)) = specs.get(hw::char::parallel::MAX_PARALLEL_PORTS) {
        return Err(OptionError::new(
            location.clone(),
            "too many parallel ports",
        ));
    }
    let hds = char_frontend_backends(opts, machine, specs, "parallel")?;
    machine_state(machine)
        .expect("machines have a MachineState")
        .set_parallel_hds(hds);
    Ok(())
}

/// The backends of `-serial` or `-parallel` `specs` (each with its option's location):
/// QEMU's `qemu_chr_new_mux_mon` names each new chardev `{label}N` (`query-chardev` lists
/// it), `chardev:ID` claims an existing one, `none` is no backend.
fn char_frontend_backends(
    opts: &Options,
    machine: &ObjectRef,
    specs: Vec<(String, String)>,
    label: &str,
) -> Result<Vec<Option<std::sync::Arc<dyn hw::core::chardev::CharBackend>>>, OptionError> {
    let mut hds = Vec::new();
    for (spec, location) in specs {
        let backend = qom::error_report::with_location(&location, || {
            hw::core::chardev::parse_serial_spec(&spec)
        })
        .map_err(|e| OptionError::new(location.clone(), e))?;
        if let Some(path) = backend
            .as_ref()
            .and_then(|b| b.filename().strip_prefix("pty:").map(str::to_string))
        {
            // QEMU labels the chardev of the n-th -serial serialN (-parallel: parallelN).
            qom::error_report!(
                "char device redirected to {path} (label {label}{})",
                hds.len()
            );
        }
        if opts.daemonize && backend.as_ref().is_some_and(|b| b.driver() == "stdio") {
            return Err(OptionError::new(
                location,
                "cannot use stdio with -daemonize",
            ));
        }
        if let Some(id) = spec.strip_prefix("chardev:") {
            hw::core::chardev::chardev_claim(id)
                .map_err(|e| OptionError::new(location.clone(), e))?;
        } else if let Some(b) = &backend {
            let id = format!("{label}{}", hds.len());
            hw::core::chardev::chardev_add(&id, b.clone())
                .map_err(|e| OptionError::new(location.clone(), e))?;
            let _ = hw::core::chardev::chardev_claim(&id);
        }
        let backend = match backend {
            Some(b) if opts.nographic && b.driver() == "stdio" => {
                crate::term::enter_raw_mode();
                Some(crate::mux::MuxBackend::new(b, machine.downgrade())
                    as std::sync::Arc<dyn hw::core::chardev::CharBackend>)
            }
            other => other,
        };
        hds.push(backend);
    }
    Ok(hds)
}

/// QEMU's `configure_accelerators`: tries each accelerator of the list in order; the first
/// that initialises wins.
/// Returns the name of the one that did.
fn configure_accelerators(opts: &Options, machine: &ObjectRef) -> Result<String, OptionError> {
    let (_, props) = machine_opts(opts);
    let machine_accel = props
        .iter()
        .rfind(|(k, _, _)| k == "accel")
        .map(|(_, v, l)| (v.clone().unwrap_or_default(), *l));
    let mut candidates: Vec<(String, String)> = Vec::new();
    if !opts.accel.is_empty() {
        if machine_accel.is_some() {
            return Err(OptionError::new(
                "",
                "The -accel and \"-machine accel=\" options are incompatible",
            ));
        }
        for a in &opts.accel {
            let items = split_opts(&a.value, Some("accel"));
            let name = items[0].1.clone().unwrap_or_default();
            if let Some((k, _)) = items.get(1) {
                return Err(a.error(format!("Property '{name}-accel.{k}' not found")));
            }
            candidates.push((name, a.location()));
        }
    } else if let Some((list, located)) = machine_accel {
        for name in list.split(':') {
            candidates.push((name.to_string(), located.location()));
        }
    }
    if opts.enable_kvm {
        if !candidates.is_empty() && candidates.iter().any(|(n, _)| n != "kvm") {
            return Err(OptionError::new(
                "",
                "The -accel and -enable-kvm options are incompatible",
            ));
        }
        candidates = vec![("kvm".to_string(), "-enable-kvm".to_string())];
    }
    if candidates.is_empty() {
        // A qtest driver wants no guest code to run, as QEMU's -qtest does.
        let default = if opts.qtest.is_some() { "qtest" } else { "kvm" };
        candidates.push((default.to_string(), String::new()));
    }
    let mut failures = Vec::new();
    for (name, location) in &candidates {
        let Some(class) = accel::accel_find(name) else {
            failures.push(OptionError::new(
                location.clone(),
                accel::AccelError::Unknown(name.clone()),
            ));
            continue;
        };
        match accel::accel_init_machine(class, machine) {
            Ok(_) => {
                for f in failures {
                    qom::error_report!("{f}");
                }
                return Ok(name.clone());
            }
            Err(e) => failures.push(OptionError::new(location.clone(), e)),
        }
    }
    // One failure: report it as is; several: each, then QEMU's summary.
    if failures.len() == 1 {
        return Err(failures.remove(0));
    }
    for f in &failures {
        qom::error_report!("{f}");
    }
    Err(OptionError::new("", accel::AccelError::NoneWorked))
}

/// `-device`: QEMU's `qdev_device_add` with the option's location on errors.
/// QEMU's `usbdevice_create`: `-usbdevice NAME` is the USB device registered under that
/// legacy name, on the first USB bus.
fn usbdevice_add(machine: &ObjectRef, located: &Located) -> Result<(), OptionError> {
    let (name, params) = match located.value.split_once(':') {
        Some((name, params)) => (name, Some(params)),
        None => (located.value.as_str(), None),
    };
    let driver = match name {
        "tablet" => "usb-tablet",
        "mouse" => "usb-mouse",
        "keyboard" => "usb-kbd",
        _ => return Err(located.error(format!("usbdevice {name} not found"))),
    };
    if params.is_some() {
        return Err(located.error(format!("usbdevice {name} accepts no params")));
    }
    qdev_device_add(
        machine,
        vec![("driver".to_string(), Some(driver.to_string()))],
        false,
    )
    .map_err(|e| located.error(e))?;
    Ok(())
}

fn device_add(machine: &ObjectRef, located: &Located) -> Result<(), OptionError> {
    let items = crate::options::split_opts_or_json(&located.value, "driver")
        .map_err(|e| located.error(e))?;
    qdev_device_add(machine, items, false).map_err(|e| match e {
        QdevError::BadId => located.error(format!("{e}\n{}", qom::object_interfaces::ID_HINT)),
        e => located.error(e),
    })?;
    Ok(())
}

/// QEMU's `qdev_device_add`: creates the device `items` describe (`driver` first, then
/// `id`, `bus` and properties), names it, and realizes it on its bus. `hotplug`: the
/// machine is running (`device_add`), so the bus and the type must take hotplugged
/// devices, and the bus's hotplug handler tells the guest.
pub fn qdev_device_add(
    machine: &ObjectRef,
    items: Vec<(String, Option<String>)>,
    hotplug: bool,
) -> Result<ObjectRef, QdevError> {
    let mut items = items.into_iter();
    let driver = items.next().and_then(|(_, v)| v).unwrap_or_default();
    let class = device_type(&driver)?;
    let dc = device_class(class).expect("device classes have a DeviceClass");
    let mut id = None;
    let mut bus_name = None;
    let mut props = Vec::new();
    for (key, value) in items {
        match key.as_str() {
            "id" => {
                if !value
                    .as_deref()
                    .is_some_and(qom::object_interfaces::id_wellformed)
                {
                    return Err(QdevError::BadId);
                }
                id = value
            }
            "bus" => bus_name = value,
            _ => props.push((key, value.unwrap_or_else(|| "on".to_string()))),
        }
    }
    let bus =
        match (bus_name, dc.bus_type) {
            (Some(name), _) => Some(
                resolve_path(&object_get_root(), &name)
                    .map_err(|_| QdevError::BusNotFound(name.clone()))?,
            ),
            (None, Some(bus_type)) => Some(find_bus_by_type(machine, bus_type).ok_or_else(
                || QdevError::NoBus {
                    bus_type,
                    driver: driver.clone(),
                },
            )?),
            (None, None) => None,
        };
    if hotplug {
        hw::core::qdev::qdev_hotplug_allowed(&driver, bus.as_deref())?;
    }
    let dev = qdev_new(&driver)?;
    for (key, value) in props {
        dev.property_parse(&key, &value)?;
    }
    match &id {
        Some(id) => {
            let peripheral = machine
                .child("peripheral")
                .expect("machines have /peripheral");
            if peripheral.child(id).is_some() {
                return Err(QdevError::DuplicateId(id.clone()));
            }
            peripheral.add_child(id, &dev)?;
            dev.set_device_id(Some(id.clone()));
        }
        None => {
            let anon = machine
                .child("peripheral-anon")
                .expect("machines have /peripheral-anon");
            anon.add_child("device[*]", &dev)?;
        }
    }
    let state = dev.downcast::<hw::core::qdev::DeviceState>();
    if let Some(state) = state {
        state.set_hotplugged(hotplug);
    }
    // A device on no bus takes the machine's services from the machine (QEMU's sysbus
    // devices reach them as globals).
    if let (None, Some(state), Some(ms)) = (&bus, state, machine_state(machine)) {
        state.set_services(ms.services());
    }
    if let Err(e) = qdev_realize(&dev, bus.as_ref()) {
        dev.unparent();
        return Err(e);
    }
    Ok(dev)
}

/// Starts the vCPUs (unless `-S`), then waits for run requests and turns them into events
/// and an exit status (`hw::core::runstate` has QEMU's `main_loop_should_exit`).
fn main_loop(machine: &ObjectRef, opts: &Options) -> i32 {
    let ms = machine_state(machine).expect("machines have a MachineState");
    let mc = machine_class(machine.class()).expect("machines have a MachineClass");
    log::debug!("machine '{}' running", mc.name);
    // A migration's destination starts once the stream is in (`crate::migration`).
    if !opts.start_paused && opts.incoming.is_none() {
        // Fails only without an accelerator, and then there is nothing to start.
        let _ = runstate::vm_start(ms);
    }
    let killable = machine.clone();
    crate::signals::on_termination(Box::new(move || {
        if let Some(ms) = machine_state(&killable) {
            ms.run_state().request(RunRequest::HostSignal);
        }
    }));
    hw::core::panic_selftest::panic_if_asked("main");
    loop {
        if let Some(request) = ms.run_state().wait(Some(Duration::from_secs(3600))) {
            if request == RunRequest::HostSignal {
                crate::signals::kill_report();
            }
            if let Some(status) = runstate::main_loop_should_exit(ms, request) {
                return status;
            }
            ms.run_state().handled();
        }
    }
}

/// QEMU's `do_vm_stop` flushes every image once the devices went quiet (their handlers run
/// at higher priorities), so a stopped or migrating VM's writes are on storage.
fn register_block_flush(machine: &ObjectRef) {
    let Some(ms) = hw::core::machine::machine_state(machine) else {
        return;
    };
    ms.services().vm().add_change_handler(
        0,
        std::sync::Arc::new(|running, _| {
            if running {
                return;
            }
            for b in block::backends() {
                if let Err(e) = b.flush() {
                    log::warn!("flushing '{}' at the VM's stop failed: {e}", b.node_name());
                }
            }
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::parse_smp;

    fn topology(text: &str) -> (u32, u32, u32, u32, u32) {
        let s = parse_smp(text, true).unwrap_or_else(|e| panic!("{text}: {e}"));
        (s.cpus, s.sockets, s.cores, s.threads, s.max_cpus)
    }

    #[test]
    fn smp_fills_in_cores_first_as_qemu_machines_since_6_2() {
        assert_eq!(topology("4"), (4, 1, 4, 1, 4));
        assert_eq!(topology("8,sockets=2"), (8, 2, 4, 1, 8));
        assert_eq!(topology("8,cores=2"), (8, 4, 2, 1, 8));
        assert_eq!(topology("8,threads=2"), (8, 1, 4, 2, 8));
        assert_eq!(topology("8,sockets=2,cores=2"), (8, 2, 2, 2, 8));
        assert_eq!(topology("sockets=2"), (2, 2, 1, 1, 2));
        assert_eq!(topology("4,maxcpus=8"), (4, 1, 8, 1, 8));
        assert_eq!(
            topology("cpus=2,sockets=2,cores=1,threads=1"),
            (2, 2, 1, 1, 2)
        );
        // No overflow on values whose product does not fit in 32 bits.
        assert!(parse_smp("sockets=65536,cores=65536", true).is_err());
        assert!(parse_smp("4,sockets=65536,threads=65536", true).is_err());
    }

    #[test]
    fn smp_that_does_not_add_up_is_refused_in_qemus_words() {
        for (text, error) in [
            (
                "4,sockets=3,cores=2,maxcpus=4",
                "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (3) * cores (2) * threads (0) != maxcpus (4)",
            ),
            (
                "2,sockets=4",
                "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (4) * cores (0) * threads (1) != maxcpus (2)",
            ),
            (
                "8,maxcpus=4",
                "Invalid CPU topology: maxcpus must be equal to or greater than smp: sockets (1) * cores (4) * threads (1) == maxcpus (4) < smp_cpus (8)",
            ),
        ] {
            assert_eq!(parse_smp(text, false).err().as_deref(), Some(error), "{text}");
        }
        // pc's hierarchy has dies (QEMU's smp_props.dies_supported), one per socket here.
        assert_eq!(
            parse_smp("2,sockets=4", true).err().as_deref(),
            Some("Invalid CPU topology: product of the hierarchy must match maxcpus: sockets (4) * dies (1) * cores (0) * threads (1) != maxcpus (2)")
        );
        assert_eq!(
            parse_smp("4,dies=2", true).err().as_deref(),
            Some("dies=2: qomvm supports one die per socket")
        );
        assert_eq!(
            parse_smp("4,dies=2", false).err().as_deref(),
            Some("dies not supported by this machine's CPU topology")
        );
        assert!(parse_smp("4,dies=1,clusters=1", true).is_ok());
    }
}
