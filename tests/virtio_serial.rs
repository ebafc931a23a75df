//! `virtio-serial-pci` with a `virtconsole` and a `virtserialport` on the pc board under the
//! qtest accelerator, driven by the test's own virtio 1.x driver: QEMU's IDs and features,
//! the control protocol a Linux guest speaks (DEVICE_READY, PORT_ADD, PORT_READY,
//! CONSOLE_PORT, PORT_NAME, PORT_OPEN both ways), `VSERPORT_CHANGE`, bytes both ways
//! between the guest's queues and a socket chardev whose peer comes and goes, the port
//! rules' errors in QEMU's words, and a broken control ring that marks the device broken.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hw::core::chardev::{chardev_add, CharBackend, Ringbuf};
use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::qdev::{qdev_new, qdev_realize, DeviceMethods};
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const F_MULTIPORT: u64 = 1 << 1;
const F_EMERG_WRITE: u64 = 1 << 2;
const F_EVENT_IDX: u64 = 1 << 29;
const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 5 << 3;
/// Rings of queues 0-5 (port 0, control, port 1), 16 entries each.
const RING_BASE: u64 = 0x10_0000;
const RING_STEP: u64 = 0x2_0000;
/// Control buffers from the device, 64 bytes each; other buffers.
const CTRL_IN: u64 = 0x30_0000;
const BUF: u64 = 0x40_0000;

/// Control events.
const DEVICE_READY: u16 = 0;
const PORT_ADD: u16 = 1;
const PORT_REMOVE: u16 = 2;
const PORT_READY: u16 = 3;
const CONSOLE_PORT: u16 = 4;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// Every `VSERPORT_CHANGE` the machine's devices sent: (id, open).
fn port_events() -> &'static Mutex<Vec<(String, bool)>> {
    static EVENTS: OnceLock<Mutex<Vec<(String, bool)>>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        hw::core::qapi_event::set_sink(Box::new(|name, data| {
            if name == "VSERPORT_CHANGE" {
                let data = data.unwrap_or_default();
                port_events().lock().unwrap().push((
                    data["id"].as_str().unwrap_or_default().to_string(),
                    data["open"].as_bool().unwrap_or_default(),
                ));
            }
        }));
        Mutex::new(Vec::new())
    })
}

fn pc_machine() -> ObjectRef {
    test_support::qtest::pc_on_qtest(128 << 20)
}

/// `-device DRIVER,id=ID,props...` on `bus`; the error text if it fails.
fn plug(
    machine: &ObjectRef,
    driver: &str,
    id: &str,
    bus: &ObjectRef,
    props: &[(&str, &str)],
) -> Result<ObjectRef, String> {
    let dev = qdev_new(driver).unwrap();
    for (k, v) in props {
        dev.property_parse(k, v).map_err(|e| e.to_string())?;
    }
    dev.set_device_id(Some(id.to_string()));
    qom::container_get(machine, "peripheral")
        .add_child(id, &dev)
        .unwrap();
    qdev_realize(&dev, Some(bus)).map_err(|e| e.to_string())?;
    Ok(dev)
}

/// Plugs `virtio-serial-pci,id=ID,props...` into the machine's PCI bus; returns its port
/// bus, `ID.0`.
fn serial_bus(machine: &ObjectRef, id: &str, props: &[(&str, &str)]) -> ObjectRef {
    let pci = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    plug(machine, "virtio-serial-pci", id, &pci, props).unwrap();
    machine
        .child("peripheral")
        .unwrap()
        .child(id)
        .unwrap()
        .child(&format!("{id}.0"))
        .unwrap()
}

struct Serial {
    /// The driver kicks as Linux does: with `EVENT_IDX`, only past the device's
    /// `avail_event`.
    event_idx: bool,
    dev: VirtioPciDevice,
    rings: Vec<SplitRing>,
    /// The control buffers the device has, by head.
    ctrl_bufs: HashMap<u32, u64>,
    next_ctrl: u64,
}

impl Serial {
    /// Negotiates `features`, sets up queues 0-5 and gives the device 8 control buffers.
    fn start(machine: &ObjectRef, features: u64) -> Serial {
        let dev = VirtioPciDevice::probe(machine, DEVFN);
        assert!(
            dev.negotiate(features),
            "FEATURES_OK refused for {features:#x}"
        );
        let rings: Vec<SplitRing> = (0..6u64)
            .map(|i| SplitRing::new(RING_BASE + i * RING_STEP, 16))
            .collect();
        for (i, ring) in rings.iter().enumerate() {
            ring.clear(&dev.mem);
            if features & F_MULTIPORT != 0 || i < 2 {
                dev.setup_queue(i as u16, ring);
            }
        }
        dev.driver_ok();
        let mut s = Serial {
            event_idx: features & F_EVENT_IDX != 0,
            dev,
            rings,
            ctrl_bufs: HashMap::new(),
            next_ctrl: CTRL_IN,
        };
        if features & F_MULTIPORT != 0 {
            for _ in 0..8 {
                s.give_ctrl_buffer();
            }
        }
        s
    }

    /// Adds a chain to queue `q` and kicks the device if it asked for it.
    fn post(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let ring = &mut self.rings[q];
        let old: u16 = self.dev.mem.read_obj(GuestAddress(ring.avail + 2)).unwrap();
        let head = ring.add_chain(&self.dev.mem, bufs);
        let new = old.wrapping_add(1);
        let event_at = ring.used + 4 + 8 * u64::from(ring.size);
        let event: u16 = self.dev.mem.read_obj(GuestAddress(event_at)).unwrap();
        // The kernel's vring_need_event.
        if !self.event_idx || new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.dev.notify(q as u16);
        }
        head
    }

    fn give_ctrl_buffer(&mut self) {
        let at = self.next_ctrl;
        self.next_ctrl += 64;
        let head = self.post(2, &[(at, 64, true)]);
        self.ctrl_bufs.insert(u32::from(head), at);
    }

    /// Sends a control message (id, event, value) on queue 3.
    fn send_ctrl(&mut self, id: u32, event: u16, value: u16) {
        let mut msg = Vec::new();
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&event.to_le_bytes());
        msg.extend_from_slice(&value.to_le_bytes());
        self.dev.mem.write_slice(&msg, GuestAddress(BUF)).unwrap();
        self.post(3, &[(BUF, 8, false)]);
        assert_eq!(
            self.dev.wait_used(&mut self.rings[3], 1, WAIT).len(),
            1,
            "control sent"
        );
    }

    /// The next `n` control messages from the device: (id, event, value, extra bytes).
    fn recv_ctrl(&mut self, n: usize) -> Vec<(u32, u16, u16, Vec<u8>)> {
        let used = self.dev.wait_used(&mut self.rings[2], n, WAIT);
        assert_eq!(used.len(), n, "control messages from the device: {used:?}");
        let mut out = Vec::new();
        for (head, len) in used {
            let at = self
                .ctrl_bufs
                .remove(&head)
                .expect("a buffer the test gave");
            let mut b = vec![0u8; len as usize];
            self.dev.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            out.push((
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                u16::from_le_bytes([b[4], b[5]]),
                u16::from_le_bytes([b[6], b[7]]),
                b[8..].to_vec(),
            ));
            self.give_ctrl_buffer();
        }
        out
    }

    /// Whether the device sends nothing more on the control queue for a while.
    fn no_ctrl(&mut self) -> bool {
        self.dev
            .wait_used(&mut self.rings[2], 1, Duration::from_millis(200))
            .is_empty()
    }

    /// Sends `bytes` out of port queue `tx`.
    fn write(&mut self, tx: usize, bytes: &[u8]) {
        self.dev
            .mem
            .write_slice(bytes, GuestAddress(BUF + 0x1000))
            .unwrap();
        self.post(tx, &[(BUF + 0x1000, bytes.len() as u32, false)]);
        assert_eq!(self.dev.wait_used(&mut self.rings[tx], 1, WAIT).len(), 1);
    }

    /// Gives port queue `rx` a 256-byte buffer and returns what the device put there.
    fn read(&mut self, rx: usize) -> Vec<u8> {
        self.post(rx, &[(BUF + 0x2000, 256, true)]);
        let used = self.dev.wait_used(&mut self.rings[rx], 1, WAIT);
        assert_eq!(used.len(), 1, "nothing received on queue {rx}");
        let mut b = vec![0u8; used[0].1 as usize];
        self.dev
            .mem
            .read_slice(&mut b, GuestAddress(BUF + 0x2000))
            .unwrap();
        b
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_guest_agent_channel_and_a_console_work_as_on_qemu() {
    let events = port_events();
    let dir = std::env::temp_dir().join(format!("qomvm-virtio-serial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let console = Arc::new(Ringbuf::default());
    chardev_add("vs-console", console.clone()).unwrap();
    let spec = hw::core::char_socket::SocketSpec {
        target: hw::core::char_socket::SocketTarget::Unix(sock.clone()),
        server: true,
        wait: false,
        nodelay: false,
    };
    let agent = hw::core::char_socket::SocketBackend::open(spec).unwrap();
    chardev_add("vs-agent", agent.clone() as Arc<dyn CharBackend>).unwrap();

    let machine = pc_machine();
    let bus = serial_bus(&machine, "vs0", &[("addr", "05.0"), ("max_ports", "4")]);
    plug(
        &machine,
        "virtconsole",
        "con0",
        &bus,
        &[("chardev", "vs-console")],
    )
    .unwrap();
    let name = "org.qemu.guest_agent.0";
    plug(
        &machine,
        "virtserialport",
        "channel0",
        &bus,
        &[("nr", "1"), ("chardev", "vs-agent"), ("name", name)],
    )
    .unwrap();
    // QEMU's port rules.
    let n = std::cell::Cell::new(0);
    let refused = |driver: &str, props: &[(&str, &str)]| {
        n.set(n.get() + 1);
        plug(&machine, driver, &format!("bad{}", n.get()), &bus, props).unwrap_err()
    };
    assert_eq!(
        refused("virtserialport", &[("nr", "1")]),
        "virtio-serial-bus: A port already exists at id 1"
    );
    assert_eq!(
        refused("virtserialport", &[("name", name)]),
        format!("virtio-serial-bus: A port already exists by name {name}")
    );
    assert_eq!(
        refused("virtserialport", &[("nr", "4")]),
        "virtio-serial-bus: Out-of-range port id specified, max. allowed: 3"
    );
    assert_eq!(
        refused("virtserialport", &[("nr", "0")]),
        "virtio-serial-bus: A port already exists at id 0"
    );
    assert_eq!(
        refused("virtserialport", &[("chardev", "nope")]),
        "Property 'virtserialport.chardev' can't find value 'nope'"
    );
    machine_creation_done(&machine).unwrap();

    let probe = VirtioPciDevice::probe(&machine, DEVFN);
    assert_eq!(
        probe.config.read(0, 4),
        0x1003_1af4,
        "transitional virtio console"
    );
    assert_eq!(
        probe.config.read(0x2c, 4),
        0x0003_1af4,
        "subsystem: console"
    );
    assert_eq!(
        probe.config.read(0x0a, 2),
        0x0780,
        "PCI_CLASS_COMMUNICATION_OTHER"
    );
    assert_eq!(
        probe.num_queues(),
        10,
        "two per port, four ports and the control pair"
    );
    let f = probe.device_features();
    for bit in [VERSION_1, F_MULTIPORT, F_EMERG_WRITE] {
        assert_ne!(f & bit, 0, "feature {bit:#x} missing from {f:#x}");
    }
    assert_eq!(probe.device_config(4, 4), 4, "max_nr_ports");
    // The emergency write register goes to port 0's chardev.
    probe.write_device_config(8, u64::from(b'!'), 4);
    assert_eq!(console.take(), b"!");

    let mut s = Serial::start(&machine, VERSION_1 | F_MULTIPORT | F_EVENT_IDX);
    // The driver is up: the device names its ports.
    s.send_ctrl(0, DEVICE_READY, 1);
    let mut added: Vec<(u32, u16, u16)> = s
        .recv_ctrl(2)
        .into_iter()
        .map(|(i, e, v, _)| (i, e, v))
        .collect();
    added.sort_unstable();
    assert_eq!(added, [(0, PORT_ADD, 1), (1, PORT_ADD, 1)]);
    // The console port: a console, open on the host side.
    s.send_ctrl(0, PORT_READY, 1);
    let msgs = s.recv_ctrl(2);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (0, CONSOLE_PORT, 1));
    assert_eq!((msgs[1].0, msgs[1].1, msgs[1].2), (0, PORT_OPEN, 1));
    // The agent's port: its name, and no PORT_OPEN while nobody is on the socket.
    s.send_ctrl(1, PORT_READY, 1);
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_NAME, 1));
    assert_eq!(msgs[0].3, format!("{name}\0").as_bytes());
    assert!(s.no_ctrl(), "PORT_OPEN without a host side");
    // query-chardev's frontend-open follows the guest's side of the port.
    assert!(!agent.frontend_open());
    // The guest opens both ports: libvirt hears of the agent's.
    s.send_ctrl(0, PORT_OPEN, 1);
    s.send_ctrl(1, PORT_OPEN, 1);
    wait_for("VSERPORT_CHANGE", || {
        events.lock().unwrap().contains(&("channel0".into(), true))
    });
    assert!(events.lock().unwrap().contains(&("con0".into(), true)));
    assert!(agent.frontend_open());
    // Output to the agent's port without a host side is taken and goes nowhere.
    s.write(5, b"lost");
    // The host connects: PORT_OPEN, then bytes both ways.
    let mut host = UnixStream::connect(&sock).unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_OPEN, 1));
    host.write_all(b"{\"execute\":\"guest-ping\"}\n").unwrap();
    let mut got = Vec::new();
    while got.len() < 25 {
        got.extend(s.read(4));
    }
    assert_eq!(got, b"{\"execute\":\"guest-ping\"}\n");
    s.write(5, b"{\"return\": {}}\n");
    let mut reply = [0u8; 15];
    host.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"{\"return\": {}}\n");
    // The console's output goes to its chardev.
    s.write(1, b"login: ");
    assert_eq!(console.take(), b"login: ");
    // A host that does not read: the guest's output waits in its queue (QEMU throttles
    // a serial port) and none of it is lost. Three chains of 600 KiB: the first fits the
    // chardev's empty queue, the others wait until the host reads.
    let chain: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();
    for k in 0..3u64 {
        let at = 0x80_0000 + k * 0x10_0000;
        s.dev.mem.write_slice(&chain, GuestAddress(at)).unwrap();
        s.post(5, &[(at, chain.len() as u32, false)]);
    }
    let taken = s
        .dev
        .wait_used(&mut s.rings[5], 3, Duration::from_millis(500));
    assert!(
        taken.len() < 3,
        "all three chains taken by a host that reads nothing"
    );
    let mut all = vec![0u8; 3 * chain.len()];
    host.read_exact(&mut all).unwrap();
    for k in 0..3 {
        assert!(
            all[k * chain.len()..(k + 1) * chain.len()] == chain[..],
            "chain {k} arrived whole"
        );
    }
    let rest = s.dev.wait_used(&mut s.rings[5], 3 - taken.len(), WAIT);
    assert_eq!(taken.len() + rest.len(), 3, "the held chains were taken");
    // The host leaves: PORT_OPEN 0; what it sent and the guest did not take goes with it.
    host.write_all(b"stale").unwrap();
    drop(host);
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_OPEN, 0));
    let mut host = UnixStream::connect(&sock).unwrap();
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_OPEN, 1));
    host.write_all(b"fresh").unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(s.read(4));
    }
    assert_eq!(got, b"fresh");
    drop(host);
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_OPEN, 0));
    // A driver reset closes the guest's side.
    s.dev.set_status(0);
    wait_for("VSERPORT_CHANGE on reset", || {
        events.lock().unwrap().contains(&("channel0".into(), false))
    });

    // A control chain the device cannot read breaks the device, without a panic.
    let mut s = Serial::start(&machine, VERSION_1 | F_MULTIPORT);
    // (The console's emergency write: a character, never a 0.)
    s.dev.write_device_config(8, 0, 4);
    s.dev.write_device_config(8, u64::from(b'E'), 4);
    assert_eq!(console.take(), b"E");
    s.rings[3].write_desc(&s.dev.mem, 0, 0x7fff_f000_0000, 8, 0, 0);
    s.rings[3].publish(&s.dev.mem, 0);
    s.dev.notify(3);
    wait_for("NEEDS_RESET", || s.dev.status() & NEEDS_RESET != 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_multiport_port_0_is_a_plain_console() {
    let console = Arc::new(Ringbuf::default());
    chardev_add("vs-plain", console.clone()).unwrap();
    let machine = pc_machine();
    let pci = machine.child("i440fx").unwrap().child("pci.0").unwrap();
    let bus = serial_bus(&machine, "vs1", &[("addr", "05.0")]);
    plug(
        &machine,
        "virtconsole",
        "hvc",
        &bus,
        &[("chardev", "vs-plain")],
    )
    .unwrap();
    machine_creation_done(&machine).unwrap();
    let mut s = Serial::start(&machine, VERSION_1);
    s.write(1, b"hello");
    assert_eq!(console.take(), b"hello");
    console.inject(b"typed");
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(s.read(0));
    }
    assert_eq!(got, b"typed");
    // Number 0 is a console's.
    let bus3 = serial_bus(&machine, "vs3", &[("addr", "07.0")]);
    assert_eq!(
        plug(&machine, "virtserialport", "p0", &bus3, &[("nr", "0")]).unwrap_err(),
        "Port number 0 on virtio-serial devices reserved for virtconsole devices for backward compatibility."
    );
    assert_eq!(
        plug(
            &machine,
            "virtio-serial-pci",
            "vs2",
            &pci,
            &[("addr", "06.0"), ("max_ports", "0")]
        )
        .unwrap_err(),
        "Maximum number of serial ports not specified"
    );
}

/// Input that waits when the driver starts, and a broken ring of the port it goes to: the
/// device notices on its event loop, not in the transport's DRIVER_OK (which holds the
/// transport's lock that marking the device broken takes).
#[test]
fn a_broken_ring_found_at_driver_ok_does_not_hang_it() {
    let console = Arc::new(Ringbuf::default());
    chardev_add("vs-early", console.clone()).unwrap();
    let machine = pc_machine();
    let bus = serial_bus(&machine, "vs4", &[("addr", "05.0")]);
    plug(
        &machine,
        "virtconsole",
        "early",
        &bus,
        &[("chardev", "vs-early")],
    )
    .unwrap();
    machine_creation_done(&machine).unwrap();
    console.inject(b"typed before the driver");
    let dev = VirtioPciDevice::probe(&machine, DEVFN);
    assert!(dev.negotiate(VERSION_1));
    let mut rings: Vec<SplitRing> = (0..2u64)
        .map(|i| SplitRing::new(RING_BASE + i * RING_STEP, 16))
        .collect();
    for (i, ring) in rings.iter().enumerate() {
        ring.clear(&dev.mem);
        dev.setup_queue(i as u16, ring);
    }
    rings[0].publish_raw_idx(&dev.mem, 1000);
    // On another thread, so that a hang fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    let status = std::thread::spawn(move || {
        dev.driver_ok();
        let _ = tx.send(());
        dev
    });
    assert!(rx.recv_timeout(WAIT).is_ok(), "DRIVER_OK hung");
    let dev = status.join().unwrap();
    wait_for("NEEDS_RESET", || dev.status() & NEEDS_RESET != 0);
}

/// Ports plugged in and out while the guest runs (libvirt's channel hotplug:
/// `device_add virtserialport` on the device's bus, `device_del`): the guest hears
/// `PORT_ADD`, then `PORT_REMOVE` at once (the bus's handler takes a port out without
/// asking), and the port number is free again.
#[test]
fn ports_come_and_go_while_the_guest_runs() {
    let machine = pc_machine();
    let bus = serial_bus(&machine, "vs2", &[("addr", "05.0"), ("max_ports", "4")]);
    machine_creation_done(&machine).unwrap();
    let mut s = Serial::start(&machine, VERSION_1 | F_MULTIPORT);
    s.send_ctrl(0, DEVICE_READY, 1);
    assert!(s.no_ctrl(), "no ports yet");
    let hot = |id: &str| {
        chardev_add(&format!("{id}-chr"), Arc::new(Ringbuf::default())).unwrap();
        let dev = qdev_new("virtserialport").unwrap();
        dev.property_parse("nr", "1").unwrap();
        dev.property_parse("chardev", &format!("{id}-chr")).unwrap();
        dev.set_device_id(Some(id.to_string()));
        dev.downcast::<hw::core::qdev::DeviceState>()
            .unwrap()
            .set_hotplugged(true);
        qom::container_get(&machine, "peripheral")
            .add_child(id, &dev)
            .unwrap();
        qdev_realize(&dev, Some(&bus)).unwrap();
        dev
    };
    // PORT_ADD, then PORT_OPEN: its chardev has a host side already.
    let added = |s: &mut Serial| {
        let msgs: Vec<(u32, u16, u16)> = s
            .recv_ctrl(2)
            .into_iter()
            .map(|(i, e, v, _)| (i, e, v))
            .collect();
        assert_eq!(msgs, [(1, PORT_ADD, 1), (1, PORT_OPEN, 1)]);
    };
    let port = hot("hp1");
    added(&mut s);
    hw::core::qdev::qdev_unplug(&port).unwrap();
    assert!(!port.is_realized(), "a port goes at once");
    assert!(machine.child("peripheral").unwrap().child("hp1").is_none());
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1, msgs[0].2), (1, PORT_REMOVE, 1));
    assert!(s.no_ctrl());
    // Number 1 is free for the next port.
    hot("hp2");
    added(&mut s);
}

/// A port plugged in and another taken out while the VM is paused: the guest hears of
/// both when it runs again (QEMU writes control messages whatever the run state).
#[test]
fn ports_plugged_while_paused_are_announced_on_resume() {
    use hw::core::runstate::{vm_start, vm_stop, RunStatus};
    let machine = pc_machine();
    let bus = serial_bus(&machine, "vs3", &[("addr", "05.0"), ("max_ports", "4")]);
    chardev_add("vs3-c0", Arc::new(Ringbuf::default())).unwrap();
    let first = plug(
        &machine,
        "virtserialport",
        "vs3p0",
        &bus,
        &[("nr", "1"), ("chardev", "vs3-c0")],
    )
    .unwrap();
    machine_creation_done(&machine).unwrap();
    let ms = machine_state(&machine).unwrap();
    vm_start(ms).unwrap();
    let mut s = Serial::start(&machine, VERSION_1 | F_MULTIPORT);
    s.send_ctrl(0, DEVICE_READY, 1);
    let msgs = s.recv_ctrl(1);
    assert_eq!((msgs[0].0, msgs[0].1), (1, PORT_ADD));
    vm_stop(ms, RunStatus::Paused).unwrap();
    chardev_add("vs3-c1", Arc::new(Ringbuf::default())).unwrap();
    let dev = qdev_new("virtserialport").unwrap();
    dev.property_parse("nr", "2").unwrap();
    dev.property_parse("chardev", "vs3-c1").unwrap();
    dev.set_device_id(Some("vs3p1".into()));
    dev.downcast::<hw::core::qdev::DeviceState>()
        .unwrap()
        .set_hotplugged(true);
    qom::container_get(&machine, "peripheral")
        .add_child("vs3p1", &dev)
        .unwrap();
    qdev_realize(&dev, Some(&bus)).unwrap();
    hw::core::qdev::qdev_unplug(&first).unwrap();
    vm_start(ms).unwrap();
    let msgs: Vec<(u32, u16, u16)> = s
        .recv_ctrl(3)
        .into_iter()
        .map(|(i, e, v, _)| (i, e, v))
        .collect();
    // What waited, in order; then the new port's host side, announced as the device
    // starts again.
    assert_eq!(
        msgs,
        [(2, PORT_ADD, 1), (1, PORT_REMOVE, 1), (2, PORT_OPEN, 1)]
    );
}
