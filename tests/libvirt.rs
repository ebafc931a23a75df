//! Issue 14's acceptance: libvirt (Debian 12's 9.0, installed and started by
//! `scripts/libvirt-setup.sh`) drives the `qomvm` binary through `virsh -c qemu:///system`:
//! capability probing (`domcapabilities`), then a domain that boots a Multiboot test kernel
//! built here, with its serial port in a file, through create, dominfo, suspend/resume,
//! `qemu-monitor-command`, an ACPI shutdown, destroy, and define/start/undefine, checking
//! `virsh list` at each step.
//!
//! Domains with `<graphics type='vnc'>` (a password) and `<video>` `cirrus` or `vga`:
//! `domdisplay`, HMP `info vnc`, `virsh screenshot` and `vncsnapshot` with the password
//! (a wrong one refused) see the same 80x25 text screen.
//!
//! Then a Linux domain (the Debian test guest, with a virtio disk and virtio network)
//! boots under libvirt, inside the nested rig where `/dev/kvm` is PVM.
//!
//! Skipped, with the reason printed, where libvirt cannot run: not root (libvirtd is a
//! system daemon), no usable `/dev/kvm`, or the setup script failing (no network for apt,
//! no Debian). Every domain a test creates is destroyed and undefined on every path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[allow(dead_code)] // what the Linux-domain test needs of the rig helpers
mod guest_rig;

use test_support::elf::{Elf32Kernel, PF_R, PF_W, PF_X};
use test_support::guest::{Asm, Cond, EAX, ECX, ESI};
use test_support::vga_text::{mean_difference, rom_font, Image};
use test_support::vm::kvm_unusable;
use test_support::vnc::vncpasswd_file;

const URI: &str = "qemu:///system";

/// Where the kernel is loaded (vaddr = paddr) and where its data starts in the file.
const LOAD: u32 = 0x10_0000;
const DATA_OFF: usize = 0x400;
const COM1: u16 = 0x3f8;
/// PIIX4 PM's PM1a event block (status) and control register (hw/acpi/piix4.rs).
const PM1_STS: u16 = 0x600;
const PM1_CNT: u16 = 0x604;
const PM1_PWRBTN_STS: u32 = 1 << 8;
/// SLP_EN with SLP_TYP 0, the DSDT's `\_S5`: soft power-off.
const PM1_CNT_S5: u32 = 1 << 13;
const BANNER: &str = "qomvm libvirt test kernel: up\n";
/// The VNC password of the display tests' `<graphics>`.
const VNC_SECRET: &str = "SECRET";
/// Port reads between two dots: each is a VM exit (about 10 us on PVM), so a dot every few
/// milliseconds, enough to see the guest run or stop without flooding the file.
const DELAY_READS: u32 = 500;

/// A Multiboot kernel that prints [`BANNER`] on COM1, then a dot every [`DELAY_READS`]
/// reads of PM1_STS; when a read shows the power button (`virsh shutdown` is QEMU's
/// `system_powerdown`), it powers off through PM1_CNT, as an ACPI OS does.
fn test_kernel() -> Vec<u8> {
    let banner = LOAD + DATA_OFF as u32;
    let mut a = Asm::flat32();
    a.mov_imm(ESI, banner).mov_imm(ECX, BANNER.len() as u32);
    let next = a.here();
    a.mov_dx(COM1).lodsb().out_dx_al().loop_back(next);
    let main = a.here();
    let power_off = a.label();
    a.mov_imm(ECX, DELAY_READS);
    let poll = a.here();
    a.mov_dx(PM1_STS)
        .in_ax_dx()
        .and_imm(EAX, PM1_PWRBTN_STS)
        .jcc(Cond::Ne, power_off)
        .loop_back(poll);
    a.mov_dx(COM1).mov_al(b'.').out_dx_al().jmp(main);
    a.bind(power_off);
    a.mov_dx(PM1_CNT).mov_imm(EAX, PM1_CNT_S5).out_dx_ax();
    a.hlt_loop();
    Elf32Kernel {
        vaddr: LOAD,
        paddr: LOAD,
        flags: PF_R | PF_W | PF_X,
        bss: 0,
        data_off: DATA_OFF,
        code: &a.finish(),
        data: BANNER.as_bytes(),
    }
    .build()
}

/// Why libvirt cannot be used here, if it cannot. The set-up runs once for all tests of
/// this binary (they run in parallel; two installs or two daemon starts would collide).
fn libvirt_unusable() -> Option<String> {
    static REASON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REASON.get_or_init(set_up_libvirt).clone()
}

fn set_up_libvirt() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: libvirtd (qemu:///system) needs root".into());
    }
    if let Some(reason) = kvm_unusable() {
        return Some(reason);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/libvirt-setup.sh");
    match Command::new(&script).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "libvirt cannot be installed or started: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run {}: {e}", script.display())),
    }
}

/// `virsh -c qemu:///system ARGS`: status, stdout, stderr.
fn virsh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `virsh ARGS`, which must succeed; its stdout.
fn virsh_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = virsh(args);
    assert!(ok, "virsh {args:?} failed: {stderr}{stdout}");
    stdout
}

/// The state `virsh list --all` shows for `name` (`running`, `paused`, `shut off`), or
/// `None` if it is not listed.
fn listed_state(name: &str) -> Option<String> {
    virsh_ok(&["list", "--all"]).lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        let _id = cols.next()?;
        (cols.next()? == name).then(|| cols.collect::<Vec<_>>().join(" "))
    })
}

/// Waits up to `timeout` for `cond`.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// A domain name for this test run, destroyed and undefined when dropped (on success,
/// failure and panic alike).
struct Domain {
    name: String,
    dir: PathBuf,
}

impl Domain {
    fn new(test: &str) -> Self {
        let name = format!("qomvm-test-{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let domain = Domain { name, dir };
        domain.remove();
        domain
    }

    fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    fn serial_len(&self) -> u64 {
        std::fs::metadata(self.serial()).map_or(0, |m| m.len())
    }

    /// The domain XML that works with qomvm (docs/libvirt.md): direct kernel boot, no USB
    /// controller, no balloon, no graphics or video (libvirt then passes `-display
    /// none`), COM1 into a file, and OpenStack's timers (PIT delay, RTC catchup, no HPET:
    /// `-global kvm-pit.lost_tick_policy=delay`, `-rtc base=utc,driftfix=slew`).
    fn xml(&self, kernel: &Path) -> PathBuf {
        self.xml_with_devices(kernel, &self.serial_xml(), "<memballoon model='none'/>")
    }

    /// The test kernel and a sparse raw disk of `size` bytes in the domain's directory.
    fn kernel_and_disk(&self, size: u64) -> (PathBuf, PathBuf) {
        let kernel = self.dir.join("kernel.elf");
        std::fs::write(&kernel, test_kernel()).unwrap();
        let disk = self.dir.join("disk.raw");
        std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
        (kernel, disk)
    }

    /// COM1 into the domain's serial file.
    fn serial_xml(&self) -> String {
        format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>",
            self.serial().display()
        )
    }

    /// The same with COM1's `<serial>` (and any `<console>`) given.
    fn xml_with_serial(&self, kernel: &Path, serial: &str) -> PathBuf {
        self.xml_with_devices(kernel, serial, "<memballoon model='none'/>")
    }

    /// The same with COM1's `<serial>` and other `<devices>` entries given.
    fn xml_with_devices(&self, kernel: &Path, serial: &str, extra: &str) -> PathBuf {
        let os = format!(
            "<kernel>{}</kernel>\n    <cmdline>libvirt test</cmdline>",
            kernel.display()
        );
        self.xml_with_os(&os, serial, extra)
    }

    /// The same with what `<os>` has after its `<type>` given instead of the test kernel:
    /// without a `<kernel>`, the domain boots qomvm's default firmware (SeaBIOS).
    fn xml_with_os(&self, os: &str, serial: &str, extra: &str) -> PathBuf {
        let xml = format!(
            "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    {os}
  </os>
  <features><acpi/></features>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{emulator}</emulator>
    {usb}
    {serial}
    {extra}
  </devices>
</domain>
",
            name = self.name,
            emulator = env!("CARGO_BIN_EXE_qomvm"),
            // No USB unless the test brings its own controller or USB devices (libvirt
            // adds its default controller then).
            usb = if extra.contains("bus='usb'") || extra.contains("type='usb'") {
                ""
            } else {
                "<controller type='usb' model='none'/>"
            },
        );
        let path = self.dir.join("domain.xml");
        std::fs::write(&path, xml).unwrap();
        path
    }

    /// Waits for the banner in the serial file: the guest runs.
    fn expect_banner(&self) {
        let seen = wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(self.serial()).is_ok_and(|s| s.starts_with(BANNER))
        });
        let text = std::fs::read_to_string(self.serial()).unwrap_or_default();
        assert!(seen, "no banner on the serial port; it has {text:?}");
    }

    fn remove(&self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.remove();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The machine `qomvm -machine help` marks as the default, as libvirt must report it.
fn qomvm_default_machine() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-machine", "help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("(default)"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("a default machine in {text}"))
        .to_string()
}

/// The CPU models `qomvm -cpu help` lists (its "Available CPUs:" block).
fn qomvm_cpu_models() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_qomvm"))
        .args(["-cpu", "help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("Available CPUs:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("x86 ")
                .unwrap_or(l)
                .split_whitespace()
                .next()
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn domcapabilities_probes_qomvm_and_reports_what_it_has() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let caps = virsh_ok(&[
        "domcapabilities",
        "--emulatorbin",
        env!("CARGO_BIN_EXE_qomvm"),
        "--arch",
        "x86_64",
        "--virttype",
        "kvm",
    ]);
    assert!(
        caps.contains(&format!("<path>{}</path>", env!("CARGO_BIN_EXE_qomvm"))),
        "{caps}"
    );
    // libvirt's default machine is qomvm's (by its full name, not the `pc` alias).
    let machine = qomvm_default_machine();
    assert!(
        caps.contains(&format!("<machine>{machine}</machine>")),
        "{machine} in {caps}"
    );
    // The custom CPU models are qomvm's (libvirt leaves out max and host, which are modes).
    let custom = caps
        .split("<mode name='custom'")
        .nth(1)
        .and_then(|s| s.split("</mode>").next())
        .unwrap_or_else(|| panic!("a custom CPU mode in {caps}"));
    let models = qomvm_cpu_models();
    let listed: Vec<&str> = custom
        .lines()
        .filter_map(|l| l.trim().strip_suffix("</model>")?.rsplit('>').next())
        .collect();
    assert!(!listed.is_empty(), "{custom}");
    for m in &listed {
        assert!(
            models.iter().any(|q| q == m),
            "{m} is not a qomvm model: {models:?}"
        );
    }
    // Devices: the RNG backends qomvm has, virtio disks, and no TPM.
    assert!(caps.contains("<value>random</value>"), "{caps}");
    assert!(caps.contains("<value>builtin</value>"), "{caps}");
    assert!(caps.contains("<tpm supported='no'/>"), "{caps}");
    assert!(caps.contains("<value>virtio</value>"), "{caps}");
    // Displays: VNC graphics, the std VGA, cirrus-vga and virtio (and no video at all).
    let section = |tag: &str| {
        caps.split(&format!("<{tag} supported='yes'>"))
            .nth(1)
            .and_then(|s| s.split(&format!("</{tag}>")).next())
            .unwrap_or_else(|| panic!("a supported <{tag}> in {caps}"))
            .to_string()
    };
    assert!(section("graphics").contains("<value>vnc</value>"), "{caps}");
    let video = section("video");
    for model in ["vga", "cirrus", "virtio", "none"] {
        assert!(
            video.contains(&format!("<value>{model}</value>")),
            "{video}"
        );
    }
}

#[test]
fn a_domain_runs_pauses_powers_off_and_is_listed_truthfully() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("life");
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, test_kernel()).unwrap();
    let xml = dom.xml(&kernel);
    let xml = xml.to_str().unwrap();
    let name = dom.name.as_str();

    // create: the guest prints, virsh lists it running.
    virsh_ok(&["create", xml]);
    dom.expect_banner();
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    let info = virsh_ok(&["dominfo", name]);
    assert!(info.contains("running"), "{info}");
    assert!(info.contains("Persistent:     no"), "{info}");

    // suspend: the guest really stops (no output), resume: it goes on.
    virsh_ok(&["suspend", name]);
    assert_eq!(listed_state(name).as_deref(), Some("paused"));
    let paused_at = dom.serial_len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        dom.serial_len(),
        paused_at,
        "the guest printed while paused"
    );
    virsh_ok(&["resume", name]);
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    assert!(
        wait_for(Duration::from_secs(10), || dom.serial_len() > paused_at),
        "no output after resume"
    );

    // The human monitor through libvirt's QMP connection.
    let tree = virsh_ok(&["qemu-monitor-command", "--hmp", name, "info qom-tree"]);
    assert!(tree.contains("/machine ("), "{tree}");
    assert!(tree.contains("/serial0 (isa-serial)"), "{tree}");
    // `<timer name='hpet' present='no'/>`: libvirt turns the pc's HPET off.
    assert!(!tree.contains("(hpet)"), "{tree}");
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    assert!(
        log.contains("hpet=off") || log.contains("-no-hpet"),
        "{log}"
    );

    // shutdown: the ACPI power button; the guest powers off and the transient domain
    // is gone.
    virsh_ok(&["shutdown", name]);
    assert!(
        wait_for(Duration::from_secs(30), || listed_state(name).is_none()),
        "the domain did not power off: {:?}",
        listed_state(name)
    );

    // destroy of a running transient domain.
    virsh_ok(&["create", xml]);
    dom.expect_banner();
    virsh_ok(&["destroy", name]);
    assert_eq!(listed_state(name), None);

    // define/start/destroy/undefine of a persistent one.
    virsh_ok(&["define", xml]);
    assert_eq!(listed_state(name).as_deref(), Some("shut off"));
    let _ = std::fs::remove_file(dom.serial());
    virsh_ok(&["start", name]);
    dom.expect_banner();
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    virsh_ok(&["destroy", name]);
    assert_eq!(listed_state(name).as_deref(), Some("shut off"));
    virsh_ok(&["undefine", name]);
    assert_eq!(listed_state(name), None);
}

/// A domain of a versioned machine type, as OpenStack on Ubuntu defined them (`<type
/// machine='pc-i440fx-trusty'>`): libvirt finds the type in `query-machines`, passes it as
/// it is, and the domain runs as that type (QEMU 2.0's compat properties: its qemu64
/// calls itself "QEMU Virtual CPU version 2.0.0").
#[test]
fn a_domain_of_a_versioned_machine_type_runs_as_that_type() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("trusty");
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, test_kernel()).unwrap();
    let xml = dom.xml(&kernel);
    let text = std::fs::read_to_string(&xml)
        .unwrap()
        .replace(
            "<type arch='x86_64'>hvm</type>",
            "<type arch='x86_64' machine='pc-i440fx-trusty'>hvm</type>",
        )
        .replace(
            "<timer name='hpet' present='no'/>",
            "<timer name='hpet' present='yes'/>",
        );
    std::fs::write(&xml, text).unwrap();
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let live = virsh_ok(&["dumpxml", name]);
    assert!(live.contains("machine='pc-i440fx-trusty'"), "{live}");
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    assert!(log.contains("-machine pc-i440fx-trusty,"), "{log}");
    let cpus = virsh_ok(&[
        "qemu-monitor-command",
        name,
        r#"{"execute":"query-cpus-fast"}"#,
    ]);
    let path = cpus
        .split(r#""qom-path":""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("{cpus}"));
    let model_id = virsh_ok(&[
        "qemu-monitor-command",
        name,
        &format!(
            r#"{{"execute":"qom-get","arguments":{{"path":"{path}","property":"model-id"}}}}"#
        ),
    ]);
    assert!(
        model_id.contains("QEMU Virtual CPU version 2.0.0"),
        "{model_id}"
    );
    // `<timer name='hpet' present='yes'/>`: the HPET is there.
    let tree = virsh_ok(&["qemu-monitor-command", "--hmp", name, "info qom-tree"]);
    assert!(tree.contains("(hpet)"), "{tree}");
    virsh_ok(&["destroy", name]);
}

#[test]
fn a_pty_serial_port_is_the_domains_console() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("pty");
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, test_kernel()).unwrap();
    let xml = dom.xml_with_serial(
        &kernel,
        "<serial type='pty'><target port='0'/></serial>\
         <console type='pty'><target type='serial' port='0'/></console>",
    );
    virsh_ok(&["create", xml.to_str().unwrap()]);
    // libvirt found the terminal through query-chardev's `pty:/dev/pts/N`.
    let tty = virsh_ok(&["ttyconsole", &dom.name]).trim().to_string();
    assert!(tty.starts_with("/dev/pts/"), "{tty}");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader_tty = tty.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&reader_tty) else {
            return;
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(BANNER.len()).any(|w| w == BANNER.as_bytes()) {
                let _ = tx.send(());
                return;
            }
        }
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "no banner on the domain's console {tty}"
    );
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// `<serial type='unix'>` in bind mode: libvirt passes a socket chardev (a listening
/// socket it made) for COM1, and a client of that socket sees the guest's output.
#[test]
fn a_unix_socket_serial_port_carries_the_guests_output() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("unixserial");
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, test_kernel()).unwrap();
    let sock = dom.dir.join("com1.sock");
    let xml = dom.xml_with_serial(
        &kernel,
        &format!(
            "<serial type='unix'><source mode='bind' path='{}'/><target port='0'/></serial>",
            sock.display()
        ),
    );
    virsh_ok(&["create", xml.to_str().unwrap()]);
    let mut client = None;
    assert!(
        wait_for(Duration::from_secs(30), || {
            client = std::os::unix::net::UnixStream::connect(&sock).ok();
            client.is_some()
        }),
        "no socket at {}",
        sock.display()
    );
    let mut client = client.unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The banner went out before anyone listened (dropped, as QEMU drops it); the
    // kernel's dots come after.
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut client, &mut buf).unwrap_or(0);
    assert!(
        buf[..n].contains(&b'.'),
        "no output on the socket: {:?}",
        &buf[..n]
    );
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A guest agent channel (`<channel type='unix'>` with a virtio target): libvirt's
/// `virtio-serial-pci`, socket chardev and `virtserialport` start; with no agent in the
/// test kernel, libvirt reports the agent as not connected (it follows the port's state
/// through `VSERPORT_CHANGE`).
#[test]
fn a_guest_agent_channel_starts_and_reports_no_agent() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("agent");
    let (kernel, _) = dom.kernel_and_disk(1 << 20);
    let serial = dom.serial_xml();
    let xml = dom.xml_with_devices(
        &kernel,
        &serial,
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
         <memballoon model='none'/>",
    );
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let reply = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-chardev"}"#,
    ]);
    assert!(reply.contains("charchannel0"), "{reply}");
    let (ok, _, err) = virsh(&[
        "qemu-agent-command",
        &dom.name,
        r#"{"execute":"guest-ping"}"#,
    ]);
    assert!(!ok, "an agent answered in a kernel that has none");
    assert!(err.contains("QEMU guest agent is not connected"), "{err}");
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

#[test]
fn a_domain_with_a_virtio_disk_balloon_and_rng_starts_and_reports_them() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("disk");
    let disk_size: u64 = 8 << 20;
    let (kernel, disk) = dom.kernel_and_disk(disk_size);
    let serial = dom.serial_xml();
    // libvirt writes -blockdev (JSON), -device virtio-blk-pci, virtio-balloon-pci, and
    // -object rng-random with virtio-rng-pci for these.
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <memballoon model='virtio'/>\
         <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>",
        disk.display()
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    assert!(
        blocks.contains(&format!("vda      {}", disk.display())),
        "{blocks}"
    );
    // Statistics are found by the device's qdev path (query-block/query-blockstats).
    let info = virsh_ok(&["domblkinfo", &dom.name, "vda"]);
    assert!(
        info.contains(&format!("Capacity:       {disk_size}")),
        "{info}"
    );
    virsh_ok(&["domblkstat", &dom.name, "vda"]);
    // The balloon reports the guest's size (64 MiB) through query-balloon.
    let mem = virsh_ok(&["dommemstat", &dom.name]);
    assert!(mem.contains("actual 65536"), "{mem}");
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A disk with `<iotune>` (OpenStack's disk QoS): libvirt applies it through
/// `block_set_io_throttle` as the domain starts, `virsh blkdeviotune` reads it back from
/// `query-block` and changes it; `virsh blockresize` (OpenStack's volume extend) grows the
/// disk through `block_resize`, and `domblkinfo` and the image see the new size.
#[test]
fn disk_io_limits_and_a_resize_work_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("iotune");
    let (kernel, disk) = dom.kernel_and_disk(8 << 20);
    let serial = dom.serial_xml();
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/>\
         <iotune><total_iops_sec>500</total_iops_sec><read_bytes_sec>1048576</read_bytes_sec></iotune>\
         </disk>",
        disk.display()
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let limit = |text: &str, name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(name)?
                .trim()
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    };
    let tune = virsh_ok(&["blkdeviotune", &dom.name, "vda"]);
    assert_eq!(limit(&tune, "total_iops_sec"), Some(500), "{tune}");
    assert_eq!(limit(&tune, "read_bytes_sec"), Some(1048576), "{tune}");
    assert_eq!(limit(&tune, "write_bytes_sec"), Some(0), "{tune}");
    virsh_ok(&[
        "blkdeviotune",
        &dom.name,
        "vda",
        "--total-iops-sec",
        "0",
        "--read-bytes-sec",
        "0",
        "--write-iops-sec",
        "40",
        "--write-iops-sec-max",
        "80",
    ]);
    let tune = virsh_ok(&["blkdeviotune", &dom.name, "vda"]);
    assert_eq!(limit(&tune, "total_iops_sec"), Some(0), "{tune}");
    assert_eq!(limit(&tune, "write_iops_sec"), Some(40), "{tune}");
    assert_eq!(limit(&tune, "write_iops_sec_max"), Some(80), "{tune}");
    virsh_ok(&["blockresize", &dom.name, "vda", "16M"]);
    let info = virsh_ok(&["domblkinfo", &dom.name, "vda"]);
    assert!(
        info.contains(&format!("Capacity:       {}", 16u64 << 20)),
        "{info}"
    );
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 << 20);
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A `<parallel type='file'>` as libvirt writes it (`-chardev file,id=charparallel0,...
/// -device isa-parallel,chardev=charparallel0,id=parallel0`): the domain starts with the
/// port at LPT1, in the device tree under libvirt's id.
#[test]
fn a_parallel_port_into_a_file_starts_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("lpt");
    let (kernel, _) = dom.kernel_and_disk(0);
    let serial = dom.serial_xml();
    let extra = format!(
        "<parallel type='file'><source path='{}'/><target port='0'/></parallel>\
         <memballoon model='none'/>",
        dom.dir.join("lpt1.out").display()
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", dom.name)).unwrap();
    assert!(
        log.contains("isa-parallel,chardev=charparallel0,id=parallel0"),
        "{log}"
    );
    let qtree = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info qtree"]);
    assert!(
        qtree.contains("dev: isa-parallel, id \"parallel0\""),
        "{qtree}"
    );
    assert!(qtree.contains("iobase = 888 (0x378)"), "{qtree}");
    virsh_ok(&["destroy", &dom.name]);
}

/// `<watchdog model='i6300esb' action='pause'/>` (OpenStack's `hw:watchdog_action`):
/// libvirt adds `-device i6300esb` and sets the action, `virsh qemu-monitor-command`
/// shows the device, and `set-action` is what libvirt reaches it through.
#[test]
fn an_i6300esb_watchdog_starts_under_libvirt_with_its_action() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("wdt");
    let (kernel, _) = dom.kernel_and_disk(0);
    let serial = dom.serial_xml();
    let extra = "<watchdog model='i6300esb' action='pause'/><memballoon model='none'/>";
    let xml = dom.xml_with_devices(&kernel, &serial, extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", dom.name)).unwrap();
    assert!(log.contains("-device i6300esb,id=watchdog0"), "{log}");
    assert!(
        log.contains("watchdog=pause") || log.contains("-watchdog-action pause"),
        "{log}"
    );
    let pci = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info pci"]);
    assert!(pci.contains("PCI device 8086:25ab"), "{pci}");
    virsh_ok(&["destroy", &dom.name]);
}

/// `<clock>` as libvirt writes it into `-rtc`: OpenStack's `offset='utc'` is the other
/// tests'; here a variable clock a day ahead on the guest's own clock (`-rtc
/// base=<tomorrow>,clock=vm`, what libvirt keeps up to date from `RTC_CHANGE`) and a
/// local-time one (`base=localtime`, Windows guests). The RTC holds tomorrow's date, read
/// through QMP's `rtc-time` as libvirt's passthrough gives it.
#[test]
fn variable_and_localtime_clocks_start_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    // Seconds since the epoch of a UTC date and time, through `date`.
    let epoch = |when: &str| -> i64 {
        let out = Command::new("date")
            .args(["-u", "-d", when, "+%s"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let clocks = [
        "<clock offset='variable' adjustment='86400' basis='utc'><timer name='rtc' track='guest'/></clock>",
        "<clock offset='localtime'/>",
        "<clock offset='timezone' timezone='Asia/Kolkata'/>",
    ];
    for clock in clocks {
        let dom = Domain::new("clock");
        let (kernel, _) = dom.kernel_and_disk(0);
        let xml = dom.xml(&kernel);
        let text = std::fs::read_to_string(&xml).unwrap();
        let start = text.find("<clock").unwrap();
        let end = text.find("</clock>").unwrap() + "</clock>".len();
        std::fs::write(&xml, format!("{}{clock}{}", &text[..start], &text[end..])).unwrap();
        virsh_ok(&["create", xml.to_str().unwrap()]);
        dom.expect_banner();
        let log =
            std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", dom.name)).unwrap();
        // How far the guest's clock is ahead of the host's UTC time.
        let reply = virsh_ok(&[
            "qemu-monitor-command",
            &dom.name,
            r#"{"execute":"qom-get","arguments":{"path":"/machine","property":"rtc-time"}}"#,
        ]);
        let tm: serde_json::Value = serde_json::from_str(&reply).unwrap();
        let tm = &tm["return"];
        let field = |name: &str| tm[name].as_i64().unwrap();
        let guest = epoch(&format!(
            "{}-{}-{} {}:{}:{}",
            field("tm_year") + 1900,
            field("tm_mon") + 1,
            field("tm_mday"),
            field("tm_hour"),
            field("tm_min"),
            field("tm_sec")
        ));
        let ahead = guest - epoch("now");
        if clock.contains("variable") {
            assert!(
                log.contains("-rtc base=") && log.contains(",clock=vm"),
                "{log}"
            );
            // A day; on the VM's clock, less the time the domain spent paused while
            // libvirt set it up.
            assert!(
                (86_400 - 120..=86_400 + 2).contains(&ahead),
                "{ahead} s ahead: {reply}"
            );
        } else {
            assert!(log.contains("-rtc base=localtime"), "{log}");
        }
        if clock.contains("Kolkata") {
            // libvirt gives qomvm the zone in TZ: India is 5:30 ahead, all year.
            assert!(
                (19_800 - 30..=19_800 + 2).contains(&ahead),
                "{ahead} s ahead: {reply}"
            );
        }
        virsh_ok(&["destroy", &dom.name]);
    }
}

/// `<input type='tablet'|'keyboard' bus='virtio'/>` (KubeVirt's and virt-manager's
/// virtio input): libvirt finds the devices in the capabilities, adds `-device
/// virtio-tablet-pci` and `virtio-keyboard-pci` on the PCI bus, and HMP `info pci` shows
/// them as QEMU's virtio 1.0 input devices.
#[test]
fn virtio_input_devices_start_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("vinput");
    let (kernel, _) = dom.kernel_and_disk(0);
    let serial = dom.serial_xml();
    let extra = "<input type='tablet' bus='virtio'/><input type='keyboard' bus='virtio'/>\
                 <memballoon model='none'/>";
    let xml = dom.xml_with_devices(&kernel, &serial, extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", dom.name)).unwrap();
    assert!(log.contains("-device virtio-tablet-pci,id=input0"), "{log}");
    assert!(
        log.contains("-device virtio-keyboard-pci,id=input1"),
        "{log}"
    );
    let pci = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info pci"]);
    assert_eq!(pci.matches("PCI device 1af4:1052").count(), 2, "{pci}");
    virsh_ok(&["destroy", &dom.name]);
}

/// `<shmem><model type='ivshmem-plain'/>` (Looking Glass's frame buffer): libvirt adds a
/// `memory-backend-file` on `/dev/shm/NAME` with `share` and `-device ivshmem-plain`; what
/// the host writes into the file, the guest sees at BAR 2 (read back through HMP `xp`).
#[test]
fn an_ivshmem_plain_shared_memory_starts_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("shmem");
    let (kernel, _) = dom.kernel_and_disk(0);
    let serial = dom.serial_xml();
    let shm = format!("qomvm-test-{}", std::process::id());
    let extra = format!(
        "<shmem name='{shm}'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>\
         <memballoon model='none'/>"
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", dom.name)).unwrap();
    assert!(log.contains("ivshmem-plain"), "{log}");
    let path = format!("/dev/shm/{shm}");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&0x5157_4d56_4d4f_4951u64.to_le_bytes(), 0)
            .unwrap();
    }
    let pci = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info pci"]);
    let at = pci
        .find("PCI device 1af4:1110")
        .unwrap_or_else(|| panic!("{pci}"));
    let bar2 = pci[at..]
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("BAR2: 64 bit prefetchable memory at ")
        })
        .unwrap_or_else(|| panic!("{pci}"));
    let addr = bar2.split_whitespace().next().unwrap();
    let words = virsh_ok(&[
        "qemu-monitor-command",
        "--hmp",
        &dom.name,
        &format!("xp /2wx {addr}"),
    ]);
    assert!(
        words.contains("0x4d4f4951") && words.contains("0x51574d56"),
        "{words}"
    );
    virsh_ok(&["destroy", &dom.name]);
    let _ = std::fs::remove_file(&path);
}

/// USB as libvirt gives a pc domain by default and OpenStack asks for a console's pointer:
/// the default controller (`piix3-uhci`: `-device piix3-usb-uhci,id=usb,bus=pci.0,
/// addr=0x1.0x2`) with a tablet and a keyboard on its ports (`-device usb-tablet,
/// bus=usb.0,port=1`). The domain starts, HMP `info usb` lists both with libvirt's ids,
/// and `virsh send-key` (QMP `send-key`) and `input-send-event` reach them.
#[test]
fn a_domain_with_the_default_usb_controller_a_tablet_and_a_keyboard_starts() {
    a_domain_with_a_usb_tablet_and_keyboard_starts(
        "usb",
        "<controller type='usb' index='0'/>",
        "Bus  0, device   1, function 2:",
    );
}

/// The same on `<controller type='usb' model='qemu-xhci'/>`, virt-install's choice for
/// modern guests (`-device qemu-xhci,id=usb,...`).
#[test]
fn a_domain_with_qemu_xhci_a_tablet_and_a_keyboard_starts() {
    a_domain_with_a_usb_tablet_and_keyboard_starts(
        "xhci",
        "<controller type='usb' index='0' model='qemu-xhci'/>",
        "PCI device 1b36:000d",
    );
}

/// A domain with the USB `controller`, a tablet and a keyboard, whose `info pci` shows
/// `pci_line`.
fn a_domain_with_a_usb_tablet_and_keyboard_starts(name: &str, controller: &str, pci_line: &str) {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new(name);
    let (kernel, _) = dom.kernel_and_disk(0);
    let serial = dom.serial_xml();
    let extra = format!(
        "{controller}<input type='tablet' bus='usb'/><input type='keyboard' bus='usb'/>\
         <memballoon model='none'/>"
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let usb = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info usb"]);
    assert!(
        usb.contains("Port 1, Speed 12 Mb/s, Product QEMU USB Tablet, ID: input0"),
        "{usb}"
    );
    assert!(
        usb.contains("Port 2, Speed 12 Mb/s, Product QEMU USB Keyboard, ID: input1"),
        "{usb}"
    );
    let pci = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info pci"]);
    assert!(pci.contains(pci_line), "{pci}");
    virsh_ok(&["send-key", &dom.name, "KEY_LEFTCTRL", "KEY_A"]);
    virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"input-send-event","arguments":{"events":[{"type":"abs","data":{"axis":"x","value":1000}},{"type":"btn","data":{"down":true,"button":"left"}}]}}"#,
    ]);
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A USB disk as libvirt writes `<disk bus='usb'>` (`-blockdev`, `-device usb-storage,
/// bus=usb.0,port=...,drive=...,id=usb-disk0,removable=off` on the default controller),
/// with a tablet and a keyboard and a `<hub type='usb'/>` (`-device usb-hub`, ports
/// "1.1"...): the domain starts, libvirt finds the disk's size and statistics, HMP
/// `info usb` lists them all.
#[test]
fn a_usb_disk_starts_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("usbdisk");
    let disk_size: u64 = 8 << 20;
    let (kernel, disk) = dom.kernel_and_disk(disk_size);
    let serial = dom.serial_xml();
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='sda' bus='usb'/></disk>\
         <hub type='usb'/>\
         <input type='tablet' bus='usb'/><input type='keyboard' bus='usb'/>\
         <memballoon model='none'/>",
        disk.display()
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    assert!(
        blocks.contains(&format!("sda      {}", disk.display())),
        "{blocks}"
    );
    let info = virsh_ok(&["domblkinfo", &dom.name, "sda"]);
    assert!(
        info.contains(&format!("Capacity:       {disk_size}")),
        "{info}"
    );
    virsh_ok(&["domblkstat", &dom.name, "sda"]);
    let usb = virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info usb"]);
    // Three devices on a two-port controller, with the test's <hub type='usb'/>: libvirt
    // puts the hub on a root port and places the devices.
    assert!(usb.contains("Product QEMU USB Hub"), "{usb}");
    assert!(
        usb.contains(", Port 1.") || usb.contains(", Port 2."),
        "a device behind the hub: {usb}"
    );
    assert!(usb.contains("Product QEMU USB MSD, ID: usb-disk0"), "{usb}");
    assert!(usb.contains("Product QEMU USB Tablet, ID: input0"), "{usb}");
    assert!(
        usb.contains("Product QEMU USB Keyboard, ID: input1"),
        "{usb}"
    );
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// `<model type='e1000'/>`, QEMU's default card on pc, as libvirt writes it (`-netdev`
/// JSON and `-device {"driver":"e1000",...}`): the domain starts, `domiflist` shows the
/// model and MAC, the monitor's `info network` the card over its backend, and
/// `domif-setlink` takes the link down and up again (QMP `set_link`).
#[test]
fn an_e1000_interface_starts_under_libvirt() {
    nic_starts_under_libvirt("e1000", "<model type='e1000'/>", "52:54:00:e1:00:01");
}

/// An `<interface>` without `<model>`: libvirt 9.0 gives a pc guest QEMU's `rtl8139`,
/// which starts, shows and takes `domif-setlink` as the e1000 does.
#[test]
fn an_interface_without_a_model_is_an_rtl8139_under_libvirt() {
    nic_starts_under_libvirt("rtl8139", "", "52:54:00:81:39:01");
}

/// A domain with one user-networking `<interface>` (`model_xml` inside it) whose card
/// libvirt makes a `model` with `mac`: see [`an_e1000_interface_starts_under_libvirt`].
fn nic_starts_under_libvirt(model: &str, model_xml: &str, mac: &str) {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new(model);
    let (kernel, _disk) = dom.kernel_and_disk(1 << 20);
    let serial = dom.serial_xml();
    let extra = format!(
        "<interface type='user'><mac address='{mac}'/>{model_xml}</interface>\
         <memballoon model='none'/>"
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let ifaces = virsh_ok(&["domiflist", &dom.name]);
    assert!(ifaces.contains(model) && ifaces.contains(mac), "{ifaces}");
    let info = || virsh_ok(&["qemu-monitor-command", "--hmp", &dom.name, "info network"]);
    let network = info();
    assert!(
        network.contains(&format!("type=nic,model={model},macaddr={mac}")),
        "{network}"
    );
    assert!(network.contains("type=user"), "{network}");
    virsh_ok(&["domif-setlink", &dom.name, mac, "down"]);
    assert!(
        info().contains(&format!("macaddr={mac},link=down")),
        "{}",
        info()
    );
    virsh_ok(&["domif-setlink", &dom.name, mac, "up"]);
    assert!(!info().contains("link=down"), "{}", info());
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A SCSI disk as libvirt writes one (`<controller type='scsi' model='virtio-scsi'>`,
/// `<disk bus='scsi'>`: `-device virtio-scsi-pci`, `-blockdev`, `-device scsi-hd` on
/// `scsi0.0` with channel, target and LUN): the domain starts, libvirt finds the disk's
/// statistics by its device, a SCSI CD's medium changes (`change-media`), and
/// `attach-disk`/`detach-disk` of a second SCSI disk plug it into the running adapter and
/// take it out at once.
#[test]
fn scsi_disks_start_and_hotplug_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("scsi");
    let disk_size: u64 = 8 << 20;
    let (kernel, disk) = dom.kernel_and_disk(disk_size);
    let iso = dom.dir.join("scsi.iso");
    std::fs::write(&iso, vec![0x33; 1 << 20]).unwrap();
    let extra = format!(
        "<controller type='scsi' index='0' model='virtio-scsi'/>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='sda' bus='scsi'/></disk>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='sdc' bus='scsi'/><readonly/></disk>",
        disk.display(),
        iso.display()
    );
    let xml = dom.xml_with_devices(&kernel, &dom.serial_xml(), &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    assert!(
        blocks.contains(&format!("sda      {}", disk.display())),
        "{blocks}"
    );
    let info = virsh_ok(&["domblkinfo", &dom.name, "sda"]);
    assert!(
        info.contains(&format!("Capacity:       {disk_size}")),
        "{info}"
    );
    virsh_ok(&["domblkstat", &dom.name, "sda"]);
    // The SCSI CD's medium changes as an IDE one's does (tray, remove, insert).
    assert!(
        blocks.contains(&format!("sdc      {}", iso.display())),
        "{blocks}"
    );
    virsh_ok(&["change-media", &dom.name, "sdc", "--eject"]);
    assert!(virsh_ok(&["domblklist", &dom.name]).contains("sdc      -"));
    let iso = iso.to_str().unwrap();
    virsh_ok(&["change-media", &dom.name, "sdc", iso, "--insert"]);
    assert!(virsh_ok(&["domblklist", &dom.name]).contains(&format!("sdc      {iso}")));

    let hot = dom.dir.join("hot-scsi.raw");
    std::fs::File::create(&hot)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let hot = hot.to_str().unwrap();
    virsh_ok(&[
        "attach-disk",
        &dom.name,
        hot,
        "sdb",
        "--targetbus",
        "scsi",
        "--live",
    ]);
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    assert!(blocks.contains(&format!("sdb      {hot}")), "{blocks}");
    let qtree = virsh_ok(&["qemu-monitor-command", &dom.name, "--hmp", "info qtree"]);
    assert!(qtree.contains("scsi-hd"), "{qtree}");
    // A SCSI unit goes at once: libvirt hears DEVICE_DELETED and drops it.
    virsh_ok(&["detach-disk", &dom.name, "sdb", "--live"]);
    let gone = wait_for(Duration::from_secs(10), || {
        !virsh_ok(&["domblklist", &dom.name]).contains("sdb")
    });
    assert!(gone, "{}", virsh_ok(&["domblklist", &dom.name]));
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// Hotplug as libvirt drives it: `attach-disk` (`blockdev-add`, then `device_add
/// virtio-blk-pci` at the PCI address libvirt picked) and `attach-device` of a virtio NIC
/// on user networking (`netdev_add`, `device_add`). Detaching asks the guest
/// (`device_del`); the test kernel never answers, so the devices stay, as with QEMU, until
/// a reset ejects what was asked out. libvirt, told by `DEVICE_DELETED`, then drops them
/// from the domain and deletes their backends.
#[test]
fn a_disk_and_a_nic_are_hotplugged_and_unplugged_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("hotplug");
    let (kernel, _) = dom.kernel_and_disk(1 << 20);
    let xml = dom.xml_with_devices(
        &kernel,
        &dom.serial_xml(),
        "<memballoon model='none'/><controller type='virtio-serial' index='0'/>",
    );
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();

    // A guest agent channel: chardev-add of its socket, then a virtserialport; detaching
    // it takes it out at once (no guest involved), and libvirt removes the chardev.
    let channel = dom.dir.join("channel.xml");
    std::fs::write(
        &channel,
        "<channel type='unix'><source mode='bind'/>\
         <target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
    )
    .unwrap();
    virsh_ok(&[
        "attach-device",
        &dom.name,
        channel.to_str().unwrap(),
        "--live",
    ]);
    let chardevs = || {
        virsh_ok(&[
            "qemu-monitor-command",
            &dom.name,
            r#"{"execute":"query-chardev"}"#,
        ])
    };
    assert!(chardevs().contains("charchannel0"), "{}", chardevs());
    let (ok, out, err) = virsh(&["domfsinfo", &dom.name]);
    assert!(
        !ok && err.contains("QEMU guest agent is not connected"),
        "{out} {err}"
    );
    let live = virsh_ok(&["dumpxml", &dom.name]);
    assert!(live.contains("<alias name='channel0'/>"), "{live}");
    virsh_ok(&["detach-device-alias", &dom.name, "channel0", "--live"]);
    let gone = wait_for(Duration::from_secs(10), || {
        !chardevs().contains("charchannel0")
    });
    assert!(
        gone,
        "libvirt did not remove the channel's chardev: {}",
        chardevs()
    );

    let disk = dom.dir.join("hot.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let disk = disk.to_str().unwrap();
    virsh_ok(&[
        "attach-disk",
        &dom.name,
        disk,
        "vdb",
        "--targetbus",
        "virtio",
        "--live",
    ]);
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    assert!(blocks.contains(&format!("vdb      {disk}")), "{blocks}");
    let info = virsh_ok(&["domblkinfo", &dom.name, "vdb"]);
    assert!(info.contains("Capacity:       4194304"), "{info}");
    let nic = dom.dir.join("nic.xml");
    std::fs::write(
        &nic,
        "<interface type='user'><mac address='52:54:00:aa:bb:cc'/><model type='virtio'/></interface>",
    )
    .unwrap();
    virsh_ok(&["attach-device", &dom.name, nic.to_str().unwrap(), "--live"]);
    assert!(virsh_ok(&["domiflist", &dom.name]).contains("52:54:00:aa:bb:cc"));
    let peripheral = || {
        virsh_ok(&[
            "qemu-monitor-command",
            &dom.name,
            r#"{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}"#,
        ])
    };
    let devices = peripheral();
    assert!(
        devices.contains("\"virtio-disk1\"") && devices.contains("\"net0\""),
        "{devices}"
    );

    // Asked out: libvirt waits for the guest, which never answers.
    let (ok, out, err) = virsh(&["detach-disk", &dom.name, "vdb", "--live"]);
    assert!(ok, "detach-disk: {out} {err}");
    let (ok, out, err) = virsh(&["detach-device", &dom.name, nic.to_str().unwrap(), "--live"]);
    assert!(ok, "detach-device: {out} {err}");
    assert!(
        virsh_ok(&["domblklist", &dom.name]).contains("vdb"),
        "still there until ejected"
    );
    // A reset ejects them; libvirt hears DEVICE_DELETED and lets them go.
    virsh_ok(&["reset", &dom.name]);
    let gone = wait_for(Duration::from_secs(20), || {
        !virsh_ok(&["domblklist", &dom.name]).contains("vdb")
            && !virsh_ok(&["domiflist", &dom.name]).contains("52:54:00:aa:bb:cc")
    });
    assert!(
        gone,
        "libvirt still lists the devices: {} {}",
        virsh_ok(&["domblklist", &dom.name]),
        virsh_ok(&["domiflist", &dom.name])
    );
    let devices = peripheral();
    assert!(
        !devices.contains("\"virtio-disk1\"") && !devices.contains("\"net0\""),
        "{devices}"
    );
    // libvirt deleted the disk's nodes (blockdev-del) once the device was gone.
    let nodes = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-named-block-nodes"}"#,
    ]);
    assert!(!nodes.contains(disk), "{nodes}");
    virsh_ok(&["destroy", &dom.name]);
}

/// IDE as libvirt writes it for `<target bus='ide'/>` on pc: a disk (`hda`), a CD with
/// its image (`hdc`) and an empty CD drive (`hdd`) become `-blockdev` nodes and
/// `-device ide-hd`/`ide-cd` on `ide.0`/`ide.1` with libvirt's ids; libvirt lists them, finds
/// the disk's size and statistics by its qdev id, and query-block shows the CDs removable
/// (the empty one by its device, as QEMU's anonymous backend).
#[test]
fn ide_disks_and_cdroms_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("ide");
    let disk_size: u64 = 8 << 20;
    let (kernel, disk) = dom.kernel_and_disk(disk_size);
    let iso = dom.dir.join("cd.iso");
    std::fs::write(&iso, vec![0x43; 1 << 20]).unwrap();
    let serial = dom.serial_xml();
    let extra = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='hda' bus='ide'/></disk>\
         <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='hdc' bus='ide'/><readonly/></disk>\
         <disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>\
         <memballoon model='none'/>",
        disk.display(),
        iso.display()
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    for line in [
        format!("hda      {}", disk.display()),
        format!("hdc      {}", iso.display()),
        "hdd      -".to_string(),
    ] {
        assert!(blocks.contains(&line), "no '{line}': {blocks}");
    }
    let info = virsh_ok(&["domblkinfo", &dom.name, "hda"]);
    assert!(
        info.contains(&format!("Capacity:       {disk_size}")),
        "{info}"
    );
    virsh_ok(&["domblkstat", &dom.name, "hda"]);
    let reply = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-block"}"#,
    ]);
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let cd = reply["return"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["qdev"] == "ide0-1-0").cloned())
        .unwrap_or_else(|| panic!("no ide0-1-0: {reply}"));
    assert_eq!(cd["removable"], true, "{cd}");
    assert_eq!(cd["inserted"]["ro"], true, "{cd}");
    // The empty drive is there by its device, with no medium.
    let empty = reply["return"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["qdev"] == "ide0-1-1").cloned())
        .unwrap_or_else(|| panic!("no ide0-1-1: {reply}"));
    assert_eq!(empty["removable"], true, "{empty}");
    assert!(empty.get("inserted").is_none(), "{empty}");
    // libvirt's change-media: open the tray, take the medium out, delete its nodes, add
    // the new ones, put them in, close the tray.
    let iso2 = dom.dir.join("cd2.iso");
    std::fs::write(&iso2, vec![0x44; 2 << 20]).unwrap();
    let iso2 = iso2.to_str().unwrap();
    virsh_ok(&["change-media", &dom.name, "hdd", iso2, "--insert"]);
    virsh_ok(&["change-media", &dom.name, "hdc", "--eject"]);
    let blocks = virsh_ok(&["domblklist", &dom.name]);
    for line in ["hdc      -".to_string(), format!("hdd      {iso2}")] {
        assert!(blocks.contains(&line), "no '{line}': {blocks}");
    }
    virsh_ok(&["change-media", &dom.name, "hdc", iso2, "--update"]);
    virsh_ok(&[
        "change-media",
        &dom.name,
        "hdd",
        iso.to_str().unwrap(),
        "--update",
    ]);
    let reply = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-block"}"#,
    ]);
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let media = [
        ("ide0-1-0", iso2, 2u64 << 20),
        ("ide0-1-1", iso.to_str().unwrap(), 1 << 20),
    ];
    for (qdev, file, size) in media {
        let cd = reply["return"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["qdev"] == qdev).cloned())
            .unwrap_or_else(|| panic!("no {qdev}: {reply}"));
        assert_eq!(cd["tray_open"], false, "{cd}");
        assert_eq!(cd["inserted"]["image"]["virtual-size"], size, "{cd}");
        assert_eq!(cd["inserted"]["image"]["filename"], file, "{cd}");
    }
    // The old media's nodes are gone: each image has its format and file node once.
    let nodes = virsh_ok(&[
        "qemu-monitor-command",
        &dom.name,
        r#"{"execute":"query-named-block-nodes"}"#,
    ]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    for file in [iso.to_str().unwrap(), iso2] {
        let count = nodes["return"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["file"] == file)
            .count();
        assert_eq!(count, 2, "nodes of {file}: {nodes}");
    }
    virsh_ok(&["destroy", &dom.name]);
    assert_eq!(listed_state(&dom.name), None);
}

/// A 1.44 MB floppy's size, the capacity libvirt reports for its image.
const FLOPPY_1440K: u64 = 1_474_560;

/// `<boot dev='fd'/>` and a floppy (`<target dev='fda' bus='fdc'/>`) without a `<kernel>`:
/// libvirt 9.0 passes `-boot strict=on -global isa-fdc.bootindexA=1`, the image as two
/// `-blockdev`s and `-device floppy,unit=0,drive=libvirt-1-format,id=fdc0-0-0`. SeaBIOS,
/// qomvm's default firmware, boots the floppy, whose boot sector reads the rest of its
/// track through INT 13h (ISA DMA), prints what it read on COM1 and powers off: the
/// transient domain is gone.
#[test]
fn a_domain_boots_from_a_floppy_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    if test_support::skip::read_or_skip("/usr/share/seabios/bios-256k.bin", "seabios").is_none() {
        return;
    }
    let dom = Domain::new("floppy-boot");
    let floppy = dom.dir.join("floppy.img");
    std::fs::write(&floppy, test_support::boot_program::floppy_loader_image()).unwrap();
    let extra = format!(
        "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='fda' bus='fdc'/></disk>\
         <memballoon model='none'/>",
        floppy.display()
    );
    let xml = dom.xml_with_os("<boot dev='fd'/>", &dom.serial_xml(), &extra);
    // SeaBIOS times floppy commands out in PIT ticks; on a loaded PVM host a re-injected
    // backlog of ticks ends that count early (see tests/firmware_boot.rs, FLOPPY_PIT):
    // missed ticks are dropped, as libvirt writes `-global kvm-pit.lost_tick_policy=discard`.
    let text = std::fs::read_to_string(&xml).unwrap();
    let text = text.replace(
        "<timer name='pit' tickpolicy='delay'/>",
        "<timer name='pit' tickpolicy='discard'/>",
    );
    assert!(text.contains("tickpolicy='discard'"), "{text}");
    std::fs::write(&xml, text).unwrap();
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    // PVM runs real mode through KVM's emulator: SeaBIOS takes a while there.
    let booted = wait_for(Duration::from_secs(120), || {
        std::fs::read_to_string(dom.serial()).is_ok_and(|s| s.contains("FLOPPY-READ-OK"))
    });
    let text = std::fs::read_to_string(dom.serial()).unwrap_or_default();
    assert!(
        booted,
        "the floppy did not boot; the serial port has {text:?}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || listed_state(name).is_none()),
        "the domain did not power off: {:?}",
        listed_state(name)
    );
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    for arg in [
        "-boot strict=on",
        "-global isa-fdc.bootindexA=1",
        "-device floppy,unit=0,drive=libvirt-1-format,id=fdc0-0-0",
    ] {
        assert!(log.contains(arg), "no '{arg}': {log}");
    }
}

/// The entry of HMP `info block` (through libvirt) for the drive whose device is `qdev`.
fn hmp_block_info(name: &str, qdev: &str) -> String {
    let text = virsh_ok(&["qemu-monitor-command", "--hmp", name, "info block"]).replace('\r', "");
    let attached = format!("Attached to:      {qdev}\n");
    text.split("\n\n")
        .find(|entry| entry.contains(&attached))
        .unwrap_or_else(|| panic!("no drive of {qdev}: {text}"))
        .to_string()
}

/// Floppy drives as libvirt writes them on pc: `fda` with an image (`-device
/// floppy,unit=0,drive=libvirt-N-format,id=fdc0-0-0`) and an empty `fdb` (`-device
/// floppy,unit=1,id=fdc0-0-1`). libvirt lists them and finds fda's size; `change-media`
/// (blockdev-open-tray, blockdev-remove-medium, blockdev-insert-medium,
/// blockdev-close-tray) ejects fda's image and inserts images into both drives, and HMP
/// `info block` shows what each drive has after each change.
#[test]
fn floppy_media_are_ejected_and_inserted_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("floppy-media");
    let (kernel, _) = dom.kernel_and_disk(0);
    let floppy = dom.dir.join("floppy.img");
    std::fs::write(&floppy, vec![0xf6; FLOPPY_1440K as usize]).unwrap();
    let floppy = floppy.to_str().unwrap();
    let floppy_720k = dom.dir.join("floppy-720k.img");
    std::fs::write(&floppy_720k, vec![0xf6; 737_280]).unwrap();
    let floppy_720k = floppy_720k.to_str().unwrap();
    let extra = format!(
        "<disk type='file' device='floppy'><driver name='qemu' type='raw'/>\
         <source file='{floppy}'/><target dev='fda' bus='fdc'/></disk>\
         <disk type='file' device='floppy'><target dev='fdb' bus='fdc'/></disk>\
         <memballoon model='none'/>"
    );
    let xml = dom.xml_with_devices(&kernel, &dom.serial_xml(), &extra);
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    for arg in [",id=fdc0-0-0", "-device floppy,unit=1,id=fdc0-0-1"] {
        assert!(log.contains(arg), "no '{arg}': {log}");
    }
    let blocks = virsh_ok(&["domblklist", name]);
    for line in [format!("fda      {floppy}"), "fdb      -".to_string()] {
        assert!(blocks.contains(&line), "no '{line}': {blocks}");
    }
    let info = virsh_ok(&["domblkinfo", name, "fda"]);
    assert!(
        info.contains(&format!("Capacity:       {FLOPPY_1440K}")),
        "{info}"
    );
    let fda = hmp_block_info(name, "fdc0-0-0");
    assert!(fda.contains(&format!(": {floppy} (raw)")), "{fda}");
    let fdb = hmp_block_info(name, "fdc0-0-1");
    assert!(fdb.contains(": [not inserted]"), "{fdb}");

    // Eject fda's image; insert another into the empty fdb.
    virsh_ok(&["change-media", name, "fda", "--eject"]);
    virsh_ok(&["change-media", name, "fdb", floppy_720k, "--insert"]);
    let blocks = virsh_ok(&["domblklist", name]);
    for line in ["fda      -".to_string(), format!("fdb      {floppy_720k}")] {
        assert!(blocks.contains(&line), "no '{line}': {blocks}");
    }
    let fda = hmp_block_info(name, "fdc0-0-0");
    assert!(fda.contains(": [not inserted]"), "{fda}");
    let fdb = hmp_block_info(name, "fdc0-0-1");
    assert!(fdb.contains(&format!(": {floppy_720k} (raw)")), "{fdb}");
    let info = virsh_ok(&["domblkinfo", name, "fdb"]);
    assert!(info.contains("Capacity:       737280"), "{info}");
    let (ok, _, _) = virsh(&["domblkinfo", name, "fda"]);
    assert!(!ok, "domblkinfo of the empty fda succeeded");

    // The first image back into fda.
    virsh_ok(&["change-media", name, "fda", floppy, "--insert"]);
    let blocks = virsh_ok(&["domblklist", name]);
    assert!(blocks.contains(&format!("fda      {floppy}")), "{blocks}");
    let fda = hmp_block_info(name, "fdc0-0-0");
    assert!(fda.contains(&format!(": {floppy} (raw)")), "{fda}");
    let info = virsh_ok(&["domblkinfo", name, "fda"]);
    assert!(
        info.contains(&format!("Capacity:       {FLOPPY_1440K}")),
        "{info}"
    );
    virsh_ok(&["destroy", name]);
    assert_eq!(listed_state(name), None);
}

/// Issue 14: a Linux domain with a virtio disk (a qcow2 overlay of the test guest's root
/// file system) and virtio network (`<interface type='user'>`) boots under libvirt to its
/// init marker, gets an address by DHCP, pings the gateway and powers off; libvirt then
/// lists it no more. Where `/dev/kvm` is PVM, libvirtd runs inside the nested rig (set up
/// there by `scripts/libvirt-setup.sh`), on L1's KVM.
#[test]
fn a_linux_domain_with_virtio_disk_and_network_boots_under_libvirt() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let _one = guest_rig::BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let assets = match guest_rig::assets() {
        Ok(d) => d,
        Err(e) => panic!("guest assets: {e}"),
    };
    let work = match guest_rig::kvm_path() {
        guest_rig::Path_::NestedRig => "/tmp/qomvm-libvirt-linux".to_string(),
        guest_rig::Path_::Direct => std::env::temp_dir()
            .join(format!("qomvm-libvirt-linux-{}", std::process::id()))
            .display()
            .to_string(),
    };
    // In the rig, libvirt's private /dev of each domain would lack L1's /dev/kvm.
    let namespaces = match guest_rig::kvm_path() {
        guest_rig::Path_::NestedRig => "off",
        guest_rig::Path_::Direct => "on",
    };
    let envs = [
        ("QOMVM_BIN", env!("CARGO_BIN_EXE_qomvm").to_string()),
        ("QOMVM_ASSETS", assets.display().to_string()),
        (
            "QOMVM_SCRIPTS",
            guest_rig::repo().join("scripts").display().to_string(),
        ),
        ("QOMVM_WORK", work),
        ("QOMVM_LIBVIRT_NAMESPACES", namespaces.to_string()),
    ];
    let out = guest_rig::host_or_rig(&["/bin/sh", "-c", LINUX_DOMAIN_SCRIPT], &[], &envs, 900);
    let text = guest_rig::text(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for line in [
        "host: domain created",
        "QOMVM-GUEST-READY",
        "root: /dev/vda rw",
        "net: eth0 10.0.2.15/24 52:54:00:4c:56:01",
        "QOMVM-PING-OK 10.0.2.2",
        "QOMVM-POWEROFF",
        "host: the domain is gone",
    ] {
        assert!(text.contains(line), "no '{line}':\n{text}");
    }
    assert!(
        text.contains("pci: 0000:00:") && text.contains(" 0x1af4:0x1000"),
        "no virtio-net-pci function:\n{text}"
    );
}

/// Run by the test above, on this host or in the rig: sets libvirt up, creates the domain,
/// waits for it to end, prints its serial log and libvirt's view.
const LINUX_DOMAIN_SCRIPT: &str = r#"
set -u
rm -rf "$QOMVM_WORK" && mkdir -p "$QOMVM_WORK" && cd "$QOMVM_WORK" || exit 1
"$QOMVM_SCRIPTS/libvirt-setup.sh" >setup.log 2>&1 || { echo "host: libvirt-setup.sh failed"; cat setup.log; exit 1; }
name=qomvm-test-linux-$$
qemu-img create -q -f qcow2 -b "$QOMVM_ASSETS/rootfs.ext4" -F raw disk.qcow2 || exit 1
cat >domain.xml <<EOF
<domain type='kvm'>
  <name>$name</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$QOMVM_ASSETS/vmlinuz</kernel>
    <initrd>$QOMVM_ASSETS/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet qomvm.root=/dev/vda qomvm.net=dhcp qomvm.nettest=ping:10.0.2.2</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>$QOMVM_BIN</emulator>
    <controller type='usb' model='none'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$QOMVM_WORK/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:4c:56:01'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='$QOMVM_WORK/serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
if ! virsh -c qemu:///system create domain.xml; then
    echo "host: virsh create failed"
    tail -n 30 "/var/log/libvirt/qemu/$name.log" 2>/dev/null
    exit 1
fi
echo "host: domain created"
i=0
while virsh -c qemu:///system domstate "$name" >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 1500 ]; then
        echo "host: the domain still runs after 750 s"
        virsh -c qemu:///system destroy "$name"
        break
    fi
    sleep 0.5
done
tr -d '\r' <serial.log
virsh -c qemu:///system list --all --name | grep -qx "$name" || echo "host: the domain is gone"
echo "host: libvirt's log of the domain:"
# qomvm's own words on how the guest ended (a triple fault in the rig is the rig's, and
# the rig harness retries on it), then the log's last lines.
grep -h "triple fault" "/var/log/libvirt/qemu/$name.log" 2>/dev/null | sed 's/^/host:   /'
tail -n 5 "/var/log/libvirt/qemu/$name.log" 2>/dev/null | sed 's/^/host:   /'
"#;

/// Issue 18: `virsh save` stops the guest and writes it to a file through qomvm's
/// migration (`getfd` with the file passed over QMP, then `migrate` to `fd:NAME`);
/// `virsh restore` starts a new qomvm with `-incoming defer` and the file as an inherited
/// descriptor, and the guest goes on where it was.
#[test]
fn virsh_save_and_restore_move_a_domain_through_a_file() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("save");
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, test_kernel()).unwrap();
    let xml = dom.xml(&kernel);
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let image = dom.dir.join("domain.save");
    virsh_ok(&["save", name, image.to_str().unwrap()]);
    assert_eq!(listed_state(name), None, "saved domains are not running");
    assert!(std::fs::metadata(&image).is_ok_and(|m| m.len() > 0));
    virsh_ok(&["restore", image.to_str().unwrap()]);
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    // libvirt opens the serial file anew for the restored process.
    assert!(
        wait_for(Duration::from_secs(30), || dom.serial_len() > 10),
        "the restored guest prints nothing"
    );
    // The restored guest is the saved one, going on with its dots: a guest that booted
    // anew would print its banner first. It still answers the power button.
    let text = std::fs::read_to_string(dom.serial()).unwrap_or_default();
    assert!(!text.contains(BANNER) && text.starts_with('.'), "{text:?}");
    virsh_ok(&["shutdown", name]);
    assert!(
        wait_for(Duration::from_secs(30), || listed_state(name).is_none()),
        "the restored domain did not power off"
    );
}

/// `virsh dump --memory-only` (what nova's and oVirt's crash dumps use): libvirt passes
/// a descriptor with `getfd` and runs `dump-guest-memory` on it, detached, waiting for
/// `DUMP_COMPLETED`. The file is an ELF core whose `PT_LOAD`s hold the guest's memory: the
/// kernel libvirt booted is at its load address. A format qomvm does not write is refused
/// by libvirt from `query-dump-guest-memory-capability`; the domain runs on.
#[test]
fn virsh_dump_memory_only_writes_the_guests_memory_as_an_elf_core() {
    if let Some(reason) = libvirt_unusable() {
        test_support::skip::skip(reason);
        return;
    }
    let dom = Domain::new("dump");
    let kernel = dom.dir.join("kernel.elf");
    let image = test_kernel();
    std::fs::write(&kernel, &image).unwrap();
    let xml = dom.xml(&kernel);
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let core = dom.dir.join("domain.core");
    virsh_ok(&["dump", "--memory-only", name, core.to_str().unwrap()]);
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    let bytes = std::fs::read(&core).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 4, "ET_CORE");
    // ELFCLASS32 or 64 (QEMU's rule: above 4 GiB or long mode); the program headers.
    let class64 = bytes[4] == 2;
    let word = |at: usize, wide: bool| -> u64 {
        if wide {
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
        } else {
            u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
        }
    };
    let (phoff, phnum, size) = if class64 {
        (
            word(32, true),
            u16::from_le_bytes([bytes[56], bytes[57]]),
            56,
        )
    } else {
        (
            word(28, false),
            u16::from_le_bytes([bytes[44], bytes[45]]),
            32,
        )
    };
    // The kernel's text, as it was loaded: where a PT_LOAD maps LOAD in the file.
    let code = &image[test_support::elf::CODE_OFF..test_support::elf::CODE_OFF + 64];
    let at = u64::from(LOAD) + test_support::elf::CODE_OFF as u64;
    let found = (0..phnum as usize).any(|i| {
        let h = phoff as usize + i * size;
        let kind = u32::from_le_bytes(bytes[h..h + 4].try_into().unwrap());
        let (offset, paddr, filesz) = if class64 {
            (word(h + 8, true), word(h + 24, true), word(h + 32, true))
        } else {
            (word(h + 4, false), word(h + 12, false), word(h + 16, false))
        };
        kind == 1 && (paddr..paddr + filesz).contains(&at) && {
            let start = (offset + at - paddr) as usize;
            &bytes[start..start + code.len()] == code
        }
    });
    assert!(found, "the kernel's code is not in the dump at {at:#x}");
    let (ok, _, err) = virsh(&[
        "dump",
        "--memory-only",
        "--format",
        "kdump-zlib",
        name,
        "/dev/null",
    ]);
    assert!(!ok, "kdump-zlib is not written");
    assert!(err.contains("kdump-zlib"), "{err}");
    assert_eq!(listed_state(name).as_deref(), Some("running"));
    virsh_ok(&["destroy", name]);
}

/// Debian's `vncsnapshot` and `djpeg` (packages vncsnapshot, libjpeg-turbo-progs).
fn snapshot_tools() -> Option<String> {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("-h")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    };
    (!have("vncsnapshot") || !have("djpeg")).then(|| {
        "vncsnapshot and djpeg are needed (packages vncsnapshot, libjpeg-turbo-progs)".into()
    })
}

/// A picture `virsh screenshot` wrote: PNG (libvirt asks for it when `screendump` takes
/// a `format`) or PPM, decoded.
fn read_screenshot(path: &Path) -> Image {
    let data = std::fs::read(path).unwrap();
    if !data.starts_with(b"\x89PNG\r\n\x1a\n") {
        assert!(
            data.starts_with(b"P6"),
            "neither PNG nor PPM: {:?}",
            &data[..8]
        );
        return Image::read_ppm(path);
    }
    let mut reader = png::Decoder::new(std::io::Cursor::new(data))
        .read_info()
        .unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut rgb).unwrap();
    assert_eq!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight)
    );
    rgb.truncate(info.buffer_size());
    Image {
        width: info.width as usize,
        height: info.height as usize,
        rgb,
    }
}

/// What the display tests' kernel writes on the screen's second row.
const SCREEN_TEXT: &str = "QOMVM-VNC-SCREEN";

/// A 64-bit kernel for direct Linux boot (the board then leaves the display in 80x25
/// text mode, as QEMU's VGA BIOS does): it prints [`BANNER`] on COM1, writes
/// [`SCREEN_TEXT`] into the text memory's second row (the first holds the cursor), and
/// halts.
fn text_screen_kernel() -> Vec<u8> {
    let mut c: Vec<u8> = Vec::new();
    for ch in BANNER.bytes() {
        // mov dx, COM1; mov al, ch; out dx, al
        c.extend_from_slice(&[0x66, 0xba]);
        c.extend_from_slice(&COM1.to_le_bytes());
        c.extend_from_slice(&[0xb0, ch, 0xee]);
    }
    for (i, ch) in SCREEN_TEXT.bytes().enumerate() {
        // mov word [0xb8000 + 160 + 2i], 0x0700 | ch: light grey on black
        c.extend_from_slice(&[0x66, 0xc7, 0x04, 0x25]);
        c.extend_from_slice(&(0xb80a0u32 + 2 * i as u32).to_le_bytes());
        c.extend_from_slice(&[ch, 0x07]);
    }
    // hlt; jmp back to it
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    test_support::elf::elf64_exec(&c, u64::from(LOAD))
}

/// `<graphics type='vnc'>` with a password and `<video>` of `model`: libvirt writes
/// `-audiodev` (driver `none`), `-vnc 127.0.0.1:N,password=on,audiodev=...`, the video
/// `-device` and sets the password with QMP `set_password` once qomvm runs. Then
/// `domdisplay` and HMP `info vnc` name the same port; `virsh screenshot` is a picture of
/// the display's size, and `vncsnapshot` with a vncpasswd file of the password sees the
/// same picture, while a wrong password is refused.
fn a_domain_with_a_vnc_display(model: &str, vgabios: &str) {
    if let Some(reason) = libvirt_unusable().or_else(snapshot_tools) {
        test_support::skip::skip(reason);
        return;
    }
    let Ok(rom) = std::fs::read(vgabios) else {
        test_support::skip::skip(format!("{vgabios} is missing (Debian package 'seabios')"));
        return;
    };
    let dom = Domain::new(&format!("vnc-{model}"));
    let kernel = dom.dir.join("kernel.elf");
    std::fs::write(&kernel, text_screen_kernel()).unwrap();
    let serial = dom.serial_xml();
    let extra = format!(
        "<memballoon model='none'/>\
         <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='{VNC_SECRET}'/>\
         <video><model type='{model}'/></video>"
    );
    let xml = dom.xml_with_devices(&kernel, &serial, &extra);
    let name = dom.name.as_str();
    virsh_ok(&["create", xml.to_str().unwrap()]);
    dom.expect_banner();
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).unwrap();
    let device = match model {
        "vga" => "VGA",
        "virtio" => "virtio-vga",
        _ => "cirrus-vga",
    };
    assert!(
        log.contains(&format!("-device {device},id=video0")),
        "{log}"
    );
    // The display's audio backend: qomvm's `none` (it has no sound device).
    assert!(
        log.contains(r#"-audiodev '{"id":"audio1","driver":"none"}'"#),
        "{log}"
    );
    assert!(log.contains(",password=on,audiodev=audio1"), "{log}");

    // domdisplay: vnc://127.0.0.1:DISPLAY; the human monitor's `info vnc` agrees.
    let display = virsh_ok(&["domdisplay", name]).trim().to_string();
    let number: u16 = display
        .strip_prefix("vnc://127.0.0.1:")
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("domdisplay says {display:?}"));
    let port = 5900 + number;
    let info = virsh_ok(&["qemu-monitor-command", "--hmp", name, "info vnc"]);
    assert!(
        info.contains(&format!("Server: 127.0.0.1:{port} (ipv4)")),
        "{display} against {info}"
    );
    assert!(info.contains("Auth: vnc"), "{info}");

    // virsh screenshot: the 80x25 text screen (9x16 cells), with the kernel's text in
    // the VGA BIOS's font.
    let shot = dom.dir.join("screenshot");
    let font = rom_font(&rom);
    let mut lines = Vec::new();
    let mut picture = None;
    for _ in 0..50 {
        let said = virsh_ok(&["screenshot", name, shot.to_str().unwrap()]);
        assert!(said.contains("Screenshot saved to"), "{said}");
        let image = read_screenshot(&shot);
        assert_eq!((image.width, image.height), (720, 400), "80x25 text");
        lines = image.text(&font, [0, 0, 0]);
        picture = Some(image);
        if lines[1] == SCREEN_TEXT {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lines[1], SCREEN_TEXT, "{lines:#?}");
    let picture = picture.unwrap();

    // vncsnapshot with the password's vncpasswd file sees the same picture.
    let passwd = dom.dir.join("passwd");
    let jpeg = dom.dir.join("snap.jpg");
    let snapshot = |password: &[u8]| {
        std::fs::write(&passwd, vncpasswd_file(password)).unwrap();
        let _ = std::fs::remove_file(&jpeg);
        // coreutils' timeout: vncsnapshot waits for ever for a screen that is not blank.
        Command::new("timeout")
            .args([
                "60",
                "vncsnapshot",
                "-quiet",
                "-quality",
                "95",
                "-passwd",
                passwd.to_str().unwrap(),
            ])
            .arg(format!("127.0.0.1::{port}"))
            .arg(&jpeg)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = snapshot(VNC_SECRET.as_bytes());
    assert!(out.status.success(), "vncsnapshot: {out:?}");
    let ppm = dom.dir.join("snap.ppm");
    let status = Command::new("djpeg")
        .arg(&jpeg)
        .stdout(std::fs::File::create(&ppm).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let snap = Image::read_ppm(&ppm);
    assert_eq!(
        (snap.width, snap.height),
        (picture.width, picture.height),
        "vncsnapshot's picture against virsh screenshot's"
    );
    let diff = mean_difference(&snap, &picture);
    assert!(diff < 4.0, "mean difference {diff}");
    // A wrong password: refused, no picture.
    let out = snapshot(b"WRONG");
    assert!(!out.status.success(), "a wrong password got in");
    assert!(!jpeg.exists());

    virsh_ok(&["destroy", name]);
    assert_eq!(listed_state(name), None);
}

#[test]
fn a_domain_with_vnc_and_cirrus_video_shows_its_screen() {
    a_domain_with_a_vnc_display("cirrus", "/usr/share/seabios/vgabios-cirrus.bin");
}

/// libvirt's `virtio` model as the primary display: `virtio-vga`, whose VGA shows the
/// text screen (the kernel has no virtio-gpu driver).
#[test]
fn a_domain_with_vnc_and_virtio_video_shows_its_screen() {
    a_domain_with_a_vnc_display("virtio", "/usr/share/seabios/vgabios-virtio.bin");
}

#[test]
fn a_domain_with_vnc_and_vga_video_shows_its_screen() {
    a_domain_with_a_vnc_display("vga", "/usr/share/seabios/vgabios-stdvga.bin");
}
