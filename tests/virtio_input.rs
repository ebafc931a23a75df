//! `virtio-keyboard-pci`, `virtio-mouse-pci` and `virtio-tablet-pci` on the pc board under
//! the qtest accelerator, driven by the test's own virtio 1.x driver: QEMU's IDs (virtio
//! 1.0 only), the configuration the driver probes (name, IDs, event bits, axis ranges,
//! serial), key and pointer reports from the machine's input in Linux's evdev codes, whole
//! reports dropped when the buffers run short, LEDs from the status queue, input handed
//! back when the driver resets, QEMU's errors, and a broken ring that marks the device
//! broken without panicking.

use std::time::Duration;

use hw::core::input::button;
use hw::core::machine::{machine_creation_done, machine_state};
use hw::core::migration::{load_vm, save_vm, Progress};
use hw::core::runstate::{vm_start, vm_stop, RunStatus};
use qom::ObjectRef;
use test_support::virtio::{SplitRing, VirtioPciDevice, NEEDS_RESET};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const WAIT: Duration = Duration::from_secs(10);
const DEVFN: u32 = 4 << 3;
const EVENT_RING: u64 = 0x10_0000;
const STATUS_RING: u64 = 0x18_0000;
const BUF: u64 = 0x20_0000;
const STATUS_BUF: u64 = 0x30_0000;

const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_REL: u16 = 2;
const EV_ABS: u16 = 3;
const EV_LED: u16 = 0x11;
const EV_REP: u16 = 0x14;
const KEY_A: u16 = 30;
const KEY_UP: u16 = 103;
const BTN_LEFT: u16 = 0x110;
const BTN_GEAR_DOWN: u16 = 0x150;
const REL_WHEEL: u16 = 8;

/// Realizes `driver,addr=04.0,props...` on a fresh pc; the error text if it fails.
fn try_plug(driver: &str, props: &[(&str, &str)]) -> Result<ObjectRef, String> {
    let machine = test_support::qtest::pc_on_qtest(128 << 20);
    let props: Vec<_> = [("addr", "04.0")].iter().chain(props).copied().collect();
    test_support::qtest::try_plug_pci(&machine, driver, &props)?;
    machine_creation_done(&machine).unwrap();
    Ok(machine)
}

fn plug(driver: &str, props: &[(&str, &str)]) -> ObjectRef {
    try_plug(driver, props).unwrap()
}

/// The driver's view of the configuration entry (`select`, `subsel`): its size and
/// payload.
fn config_entry(dev: &VirtioPciDevice, select: u8, subsel: u8) -> (u8, Vec<u8>) {
    dev.write_device_config(0, u64::from(select), 1);
    dev.write_device_config(1, u64::from(subsel), 1);
    let size = dev.device_config(2, 1) as u8;
    let payload = (0..u64::from(size))
        .map(|i| dev.device_config(8 + i, 1) as u8)
        .collect();
    (size, payload)
}

fn has_bit(bitmap: &[u8], bit: u16) -> bool {
    bitmap
        .get(usize::from(bit / 8))
        .is_some_and(|b| b & (1 << (bit % 8)) != 0)
}

/// A driver with both queues running (64 entries each).
struct Driver {
    dev: VirtioPciDevice,
    events: SplitRing,
    status: SplitRing,
    posted: u64,
}

impl Driver {
    /// The same driver, its rings where they were, on a machine the first one moved to.
    fn moved_to(self, machine: &ObjectRef) -> Driver {
        Driver {
            dev: VirtioPciDevice::probe(machine, DEVFN),
            ..self
        }
    }

    fn start(machine: &ObjectRef) -> Driver {
        Driver::start_with(machine, VERSION_1)
    }

    /// [`Driver::start`] with `features` negotiated.
    fn start_with(machine: &ObjectRef, features: u64) -> Driver {
        let dev = VirtioPciDevice::probe(machine, DEVFN);
        assert!(dev.negotiate(features));
        let events = SplitRing::new(EVENT_RING, 64);
        let status = SplitRing::new(STATUS_RING, 64);
        events.clear(&dev.mem);
        status.clear(&dev.mem);
        dev.setup_queue(0, &events);
        dev.setup_queue(1, &status);
        dev.driver_ok();
        Driver {
            dev,
            events,
            status,
            posted: 0,
        }
    }

    /// Posts `n` 8-byte event buffers, as Linux's driver keeps the queue full.
    fn post(&mut self, n: u64) {
        for _ in 0..n {
            let addr = BUF + (self.posted % 64) * 8;
            self.events.add_chain(&self.dev.mem, &[(addr, 8, true)]);
            self.posted += 1;
        }
        self.dev.notify(0);
    }

    /// The events of the used buffers not yet seen, as (type, code, value).
    fn events(&mut self, n: usize) -> Vec<(u16, u16, i32)> {
        let used = if n == 0 {
            std::thread::sleep(Duration::from_millis(100));
            self.events.take_used(&self.dev.mem)
        } else {
            self.dev.wait_used(&mut self.events, n, WAIT)
        };
        used.iter()
            .map(|&(id, len)| {
                assert_eq!(len, 8);
                // Buffer i lives at BUF + (i % 64) * 8, and descriptor i holds it.
                let mut e = [0u8; 8];
                self.dev
                    .mem
                    .read_slice(&mut e, GuestAddress(BUF + u64::from(id) * 8))
                    .unwrap();
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    i32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect()
    }
}

fn input(machine: &ObjectRef) -> &hw::core::input::InputHandlers {
    machine_state(machine).unwrap().services().input()
}

#[test]
fn ids_and_configuration_are_qemus() {
    for (driver, class, name, product) in [
        ("virtio-keyboard-pci", 0x0900, "QEMU Virtio Keyboard", 1),
        ("virtio-mouse-pci", 0x0902, "QEMU Virtio Mouse", 2),
        ("virtio-tablet-pci", 0x0902, "QEMU Virtio Tablet", 3),
    ] {
        let m = plug(driver, &[("serial", "sn-42")]);
        let dev = VirtioPciDevice::probe(&m, DEVFN);
        // Virtio 1.0 only, on conventional PCI too: no legacy I/O BAR.
        assert_eq!(dev.config.read(0, 4), 0x1052_1af4, "{driver}");
        assert_eq!(dev.config.read(0x08, 1), 1, "{driver}: revision 1");
        assert_eq!(dev.config.read(0x0a, 2), class, "{driver}");
        assert_eq!(dev.config.read(0x2c, 4), 0x1100_1af4, "{driver}: subsystem");
        assert_eq!(
            dev.config.read(0x10, 4) & 1,
            0,
            "{driver}: BAR 0 is no I/O BAR"
        );
        assert_eq!(dev.num_queues(), 2);
        let (size, payload) = config_entry(&dev, 0x01, 0);
        assert_eq!(size as usize, name.len() + 1, "{driver}");
        assert_eq!(&payload[..name.len()], name.as_bytes());
        let (_, ids) = config_entry(&dev, 0x03, 0);
        let version = if driver == "virtio-keyboard-pci" {
            1
        } else {
            2
        };
        assert_eq!(
            ids,
            [6, 0, 0x27, 0x06, product, 0, version, 0],
            "{driver}: devids"
        );
        assert_eq!(config_entry(&dev, 0x02, 0).1, b"sn-42");
        // Nothing selected: everything reads zero, the select byte too.
        let (size, _) = config_entry(&dev, 0x7f, 0);
        assert_eq!((size, dev.device_config(0, 1)), (0, 0));
        match driver {
            "virtio-keyboard-pci" => {
                let (_, keys) = config_entry(&dev, 0x11, EV_KEY as u8);
                assert!(has_bit(&keys, KEY_A) && has_bit(&keys, KEY_UP) && has_bit(&keys, 28));
                assert_eq!(config_entry(&dev, 0x11, EV_LED as u8), (1, vec![0x07]));
                assert_eq!(config_entry(&dev, 0x11, EV_REP as u8), (1, vec![0]));
            }
            "virtio-mouse-pci" => {
                let (_, rel) = config_entry(&dev, 0x11, EV_REL as u8);
                assert_eq!(rel, [0x03, 0x01], "REL_X, REL_Y, REL_WHEEL");
                let (_, keys) = config_entry(&dev, 0x11, EV_KEY as u8);
                assert!(has_bit(&keys, BTN_LEFT) && has_bit(&keys, BTN_GEAR_DOWN));
            }
            _ => {
                assert_eq!(config_entry(&dev, 0x11, EV_ABS as u8), (1, vec![0x03]));
                let (size, abs) = config_entry(&dev, 0x12, 0);
                assert_eq!(size, 20);
                assert_eq!(&abs[..8], [0, 0, 0, 0, 0xff, 0x7f, 0, 0], "0..=0x7fff");
            }
        }
    }
    // QEMU 7.2 picks the configuration before `wheel-axis` is set: without the wheel axis
    // a mouse still says version 2 with REL_WHEEL (and sends gear buttons).
    let m = plug("virtio-mouse-pci", &[("wheel-axis", "off")]);
    let dev = VirtioPciDevice::probe(&m, DEVFN);
    assert_eq!(
        config_entry(&dev, 0x11, EV_REL as u8),
        (2, vec![0x03, 0x01])
    );
    assert_eq!(config_entry(&dev, 0x03, 0).1[6], 2);
}

#[test]
fn keys_arrive_as_linux_key_codes_while_the_driver_runs() {
    let m = plug("virtio-keyboard-pci", &[]);
    let mut d = Driver::start(&m);
    d.post(16);
    let input = input(&m);
    input.send_key(0x1e, true);
    input.send_key(0x1e, false);
    input.send_key(0xc8, true);
    assert_eq!(
        d.events(6),
        [
            (EV_KEY, KEY_A, 1),
            (EV_SYN, 0, 0),
            (EV_KEY, KEY_A, 0),
            (EV_SYN, 0, 0),
            (EV_KEY, KEY_UP, 1),
            (EV_SYN, 0, 0)
        ]
    );
    // A report that does not fit is dropped whole: 10 buffers left, then 1.
    for _ in 0..5 {
        input.send_key(0x1e, true);
    }
    assert_eq!(d.events(10).len(), 10);
    d.post(1);
    input.send_key(0x1e, false);
    assert!(d.events(0).is_empty(), "half a report");
    d.post(1);
    input.send_key(0x1e, false);
    assert_eq!(d.events(2), [(EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]);
    // A driver reset hands the keys back (to the PS/2 keyboard): nothing comes here.
    d.post(4);
    d.dev.set_status(0);
    input.send_key(0x1e, true);
    assert!(d.events(0).is_empty());
    assert!(input.has_keyboard(), "the i8042 still takes keys");
}

#[test]
fn a_tablet_reports_positions_buttons_and_the_wheel_and_goes_first() {
    let m = plug("virtio-tablet-pci", &[]);
    let input = input(&m);
    // Before its driver runs, the PS/2 mouse is the first pointer.
    assert!(!input.is_absolute());
    let mut d = Driver::start(&m);
    assert!(
        input.is_absolute(),
        "the tablet goes first once its driver runs"
    );
    d.post(32);
    input.send_position(0x4000, 0x2000, 0, button::LEFT);
    assert_eq!(
        d.events(4),
        [
            (EV_KEY, BTN_LEFT, 1),
            (EV_ABS, 0, 0x4000),
            (EV_ABS, 1, 0x2000),
            (EV_SYN, 0, 0)
        ]
    );
    // Wheel down, button released: buttons, wheel, axes, as QEMU's interfaces send them.
    input.send_position(0x4000, 0x2000, 1, 0);
    assert_eq!(
        d.events(5),
        [
            (EV_KEY, BTN_LEFT, 0),
            (EV_REL, REL_WHEEL, -1),
            (EV_ABS, 0, 0x4000),
            (EV_ABS, 1, 0x2000),
            (EV_SYN, 0, 0)
        ]
    );
    d.dev.set_status(0);
    assert!(
        !input.is_absolute(),
        "a reset sends it back behind the PS/2 mouse"
    );
}

#[test]
fn a_mouse_reports_motion_and_without_a_wheel_axis_gear_buttons() {
    let m = plug("virtio-mouse-pci", &[("wheel-axis", "off")]);
    let mut d = Driver::start(&m);
    d.post(32);
    let input = input(&m);
    input.send_motion(5, -3, 0, 0);
    assert_eq!(
        d.events(3),
        [(EV_REL, 0, 5), (EV_REL, 1, -3), (EV_SYN, 0, 0)]
    );
    input.send_motion(0, 0, 1, 0);
    assert_eq!(
        d.events(3),
        [
            (EV_KEY, BTN_GEAR_DOWN, 1),
            (EV_KEY, BTN_GEAR_DOWN, 0),
            (EV_SYN, 0, 0)
        ]
    );
}

#[test]
fn leds_come_from_the_status_queue() {
    let m = plug("virtio-keyboard-pci", &[]);
    // With EVENT_IDX, as Linux's driver negotiates it: the device says where it wants the
    // next kick, or a driver that honours it stops kicking after its first report.
    let mut d = Driver::start_with(&m, VERSION_1 | (1 << 29));
    // EV_LED LED_CAPSL on, then LED_NUML on.
    for (i, code) in [1u16, 0].into_iter().enumerate() {
        let mut e = [0u8; 8];
        e[0..2].copy_from_slice(&EV_LED.to_le_bytes());
        e[2..4].copy_from_slice(&code.to_le_bytes());
        e[4..8].copy_from_slice(&1u32.to_le_bytes());
        let addr = STATUS_BUF + i as u64 * 8;
        d.dev.mem.write_slice(&e, GuestAddress(addr)).unwrap();
        d.status.add_chain(&d.dev.mem, &[(addr, 8, false)]);
    }
    d.dev.notify(1);
    assert_eq!(d.dev.wait_used(&mut d.status, 2, WAIT), [(0, 8), (1, 8)]);
    let dev = m
        .child("peripheral-anon")
        .unwrap()
        .child("device[0]")
        .unwrap();
    let kbd = dev
        .cast::<hw::virtio::virtio_input_pci::VirtioKeyboardPci>()
        .unwrap();
    assert_eq!(kbd.leds(), 0b011);
    // avail_event, after the used ring's entries: the next report's index.
    let avail_event_at = d.status.used + 4 + 8 * u64::from(d.status.size);
    let avail_event: u16 = d.dev.mem.read_obj(GuestAddress(avail_event_at)).unwrap();
    assert_eq!(
        avail_event, 2,
        "the device asks for a kick at the next report"
    );
}

#[test]
fn a_broken_event_ring_marks_the_device_broken() {
    let m = plug("virtio-keyboard-pci", &[]);
    let mut d = Driver::start(&m);
    // Two buffers far outside guest memory.
    d.events
        .add_chain(&d.dev.mem, &[(0xdead_0000_0000, 8, true)]);
    d.events
        .add_chain(&d.dev.mem, &[(0xdead_0000_0000, 8, true)]);
    input(&m).send_key(0x1e, true);
    assert_ne!(d.dev.status() & NEEDS_RESET, 0);
    // Later input does nothing and breaks nothing.
    input(&m).send_key(0x1e, false);
}

#[test]
fn the_transport_is_virtio_1_whatever_the_properties_say() {
    // QEMU's virtio_pci_force_virtio_1 overrides disable-legacy and disable-modern.
    for props in [[("disable-legacy", "off")], [("disable-modern", "on")]] {
        let m = plug("virtio-tablet-pci", &props);
        let dev = VirtioPciDevice::probe(&m, DEVFN);
        assert_eq!(dev.config.read(0, 4), 0x1052_1af4, "{props:?}");
        assert_eq!(
            dev.config.read(0x10, 4) & 1,
            0,
            "{props:?}: no legacy I/O BAR"
        );
    }
    // The keyboard has no wheel.
    assert!(try_plug("virtio-keyboard-pci", &[("wheel-axis", "on")])
        .unwrap_err()
        .contains("wheel-axis"));
}

#[test]
fn input_goes_on_after_stop_cont_and_on_a_migrations_destination() {
    let src = plug("virtio-keyboard-pci", &[]);
    let ms = machine_state(&src).unwrap();
    vm_start(ms).unwrap();
    let mut d = Driver::start(&src);
    d.post(16);
    input(&src).send_key(0x1e, true);
    assert_eq!(d.events(2), [(EV_KEY, KEY_A, 1), (EV_SYN, 0, 0)]);
    // A stop and a start keep the keyboard: its driver did not go.
    vm_stop(ms, RunStatus::Paused).unwrap();
    vm_start(ms).unwrap();
    input(&src).send_key(0x1e, false);
    assert_eq!(d.events(2), [(EV_KEY, KEY_A, 0), (EV_SYN, 0, 0)]);
    // Moved: the destination's keyboard writes into the same ring, used index going on.
    vm_stop(ms, RunStatus::FinishMigrate).unwrap();
    let mut stream = Vec::new();
    save_vm(&src, &mut stream, &mut Progress::default()).unwrap();
    let dst = plug("virtio-keyboard-pci", &[]);
    load_vm(&dst, &mut stream.as_slice(), None).unwrap();
    vm_start(machine_state(&dst).unwrap()).unwrap();
    let mut d = d.moved_to(&dst);
    input(&dst).send_key(0xc8, true);
    assert_eq!(d.events(2), [(EV_KEY, KEY_UP, 1), (EV_SYN, 0, 0)]);
    let used_idx: u16 = d.dev.mem.read_obj(GuestAddress(d.events.used + 2)).unwrap();
    assert_eq!(used_idx, 6, "2 + 2 + 2 events");
}
