//! `i8042`, the PC's keyboard controller (QEMU's `hw/input/pckbd.c`), with a PS/2 keyboard
//! and mouse that answer their commands (QEMU's `hw/input/ps2.c`, reduced to the replies).
//!
//! What it is for here: Linux's i8042 and atkbd/psmouse drivers probe it at boot and find a
//! working controller, keyboard and mouse; and the guest resets the machine through it
//! (command 0xFE, or clearing bit 0 of the output port), which becomes a `GuestReset`
//! request. Host input (the VNC server) reaches the keyboard and the mouse through the
//! machine's input handlers (`crate::core::input`): keys become scancodes of the set the
//! guest chose (set 1 where the controller translates, QEMU's `ps2_put_keycode`), pointer
//! motion becomes standard 3-byte packets while the guest has reporting on.
//!
//! Ports: 0x60 data, 0x64 status (read) / command (write). IRQ 1 is raised while the output
//! buffer holds keyboard data or a controller reply, IRQ 12 while it holds mouse data, each
//! only when the command byte enables it. Commands complete at once, so the input buffer
//! is never full (IBF stays clear).

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};

use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::irq::IrqLine;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::RunRequest;
use crate::core::services::MachineServices;
use crate::isa::isa_bus::{IsaDevice, ISA_NUM_IRQS};

/// QEMU's `TYPE_I8042`.
pub const TYPE_I8042: &str = "i8042";

/// The data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The status (read) and command (write) port.
pub const I8042_CMD_PORT: u16 = 0x64;

// Status register bits.
/// Output buffer full.
pub const KBD_STAT_OBF: u8 = 0x01;
/// Input buffer full (never set: commands complete at once).
pub const KBD_STAT_IBF: u8 = 0x02;
/// System flag: set by the self test (POST passed).
pub const KBD_STAT_SELFTEST: u8 = 0x04;
/// The last write went to the command port.
pub const KBD_STAT_CMD: u8 = 0x08;
/// Keyboard not inhibited by the key lock.
pub const KBD_STAT_UNLOCKED: u8 = 0x10;
/// The output buffer holds mouse data.
pub const KBD_STAT_MOUSE_OBF: u8 = 0x20;

// Command byte ("mode") bits.
/// Interrupt on keyboard data (IRQ 1).
pub const KBD_MODE_KBD_INT: u8 = 0x01;
/// Interrupt on mouse data (IRQ 12).
pub const KBD_MODE_MOUSE_INT: u8 = 0x02;
/// System flag.
pub const KBD_MODE_SYS: u8 = 0x04;
/// Keyboard clock disabled.
pub const KBD_MODE_DISABLE_KBD: u8 = 0x10;
/// Mouse clock disabled.
pub const KBD_MODE_DISABLE_MOUSE: u8 = 0x20;
/// Scancode translation (set 2 to set 1).
pub const KBD_MODE_KCC: u8 = 0x40;

// Controller commands (port 0x64).
const KBD_CCMD_READ_MODE: u8 = 0x20;
const KBD_CCMD_WRITE_MODE: u8 = 0x60;
const KBD_CCMD_MOUSE_DISABLE: u8 = 0xa7;
const KBD_CCMD_MOUSE_ENABLE: u8 = 0xa8;
const KBD_CCMD_TEST_MOUSE: u8 = 0xa9;
const KBD_CCMD_SELF_TEST: u8 = 0xaa;
const KBD_CCMD_KBD_TEST: u8 = 0xab;
const KBD_CCMD_KBD_DISABLE: u8 = 0xad;
const KBD_CCMD_KBD_ENABLE: u8 = 0xae;
const KBD_CCMD_READ_INPORT: u8 = 0xc0;
const KBD_CCMD_READ_OUTPORT: u8 = 0xd0;
const KBD_CCMD_WRITE_OUTPORT: u8 = 0xd1;
const KBD_CCMD_WRITE_OBUF: u8 = 0xd2;
const KBD_CCMD_WRITE_AUX_OBUF: u8 = 0xd3;
const KBD_CCMD_WRITE_MOUSE: u8 = 0xd4;
const KBD_CCMD_DISABLE_A20: u8 = 0xdd;
const KBD_CCMD_ENABLE_A20: u8 = 0xdf;
const KBD_CCMD_READ_TSTINP: u8 = 0xe0;
const KBD_CCMD_RESET: u8 = 0xfe;

// Output port bits.
const KBD_OUT_RESET: u8 = 0x01;
const KBD_OUT_A20: u8 = 0x02;
const KBD_OUT_OBF: u8 = 0x10;
const KBD_OUT_MOUSE_OBF: u8 = 0x20;
const KBD_OUT_ONES: u8 = 0xcc;

// PS/2 device replies.
const PS2_ACK: u8 = 0xfa;
const PS2_POR: u8 = 0xaa;
const PS2_ECHO: u8 = 0xee;

/// Device queues are bounded as a PS/2 device's buffer is; more is dropped.
const PS2_QUEUE_SIZE: usize = 256;

/// Set 2 codes as the controller delivers them with translation on (the part of the
/// standard set 2 -> set 1 table the replies need).
fn translate(code: u8) -> u8 {
    match code {
        0x01 => 0x43,
        0x02 => 0x41,
        0x03 => 0x3f,
        0x83 => 0x41,
        other => other,
    }
}

/// The PS/2 keyboard's command state.
#[derive(Default)]
struct Ps2Kbd {
    queue: VecDeque<u8>,
    /// A command waiting for its argument byte.
    arg_cmd: Option<u8>,
    scan_enabled: bool,
    scancode_set: u8,
}

/// The PS/2 mouse's command state.
#[derive(Default)]
struct Ps2Mouse {
    queue: VecDeque<u8>,
    arg_cmd: Option<u8>,
    enabled: bool,
    sample_rate: u8,
    resolution: u8,
    scaling_2to1: bool,
    remote: bool,
}

fn push(queue: &mut VecDeque<u8>, bytes: &[u8]) {
    for &b in bytes {
        if queue.len() < PS2_QUEUE_SIZE {
            queue.push_back(b);
        }
    }
}

impl Ps2Kbd {
    fn reset(&mut self) {
        self.queue.clear();
        self.arg_cmd = None;
        self.scan_enabled = true;
        self.scancode_set = 2;
    }

    /// A byte the guest sent to the keyboard (QEMU's `ps2_write_keyboard`).
    fn write(&mut self, val: u8, translated: bool) {
        if let Some(cmd) = self.arg_cmd.take() {
            match cmd {
                // "Get/set scancode set": 0 asks for the current one.
                0xf0 => {
                    if val == 0 {
                        let set = if translated {
                            translate(self.scancode_set)
                        } else {
                            self.scancode_set
                        };
                        push(&mut self.queue, &[PS2_ACK, set]);
                    } else {
                        if (1..=3).contains(&val) {
                            self.scancode_set = val;
                        }
                        push(&mut self.queue, &[PS2_ACK]);
                    }
                }
                // LEDs, typematic rate, make/break: the argument is taken and acknowledged.
                _ => push(&mut self.queue, &[PS2_ACK]),
            }
            return;
        }
        match val {
            PS2_ECHO => push(&mut self.queue, &[PS2_ECHO]),
            // Identify: an MF2 keyboard (0xab 0x83; 0x41 for 0x83 when translated).
            0xf2 => {
                let id = if translated { translate(0x83) } else { 0x83 };
                push(&mut self.queue, &[PS2_ACK, 0xab, id]);
            }
            // Set LEDs, scancode set, typematic rate, make/break: an argument follows.
            0xed | 0xf0 | 0xf3 | 0xfb | 0xfc | 0xfd => {
                self.arg_cmd = Some(val);
                push(&mut self.queue, &[PS2_ACK]);
            }
            0xf4 => {
                self.scan_enabled = true;
                push(&mut self.queue, &[PS2_ACK]);
            }
            // Reset and disable / reset to defaults.
            0xf5 | 0xf6 => {
                self.reset();
                self.scan_enabled = val == 0xf6;
                push(&mut self.queue, &[PS2_ACK]);
            }
            // Reset: ACK, then the power-on self test passed.
            0xff => {
                self.reset();
                push(&mut self.queue, &[PS2_ACK, PS2_POR]);
            }
            // Everything else is acknowledged, so probing moves on.
            _ => push(&mut self.queue, &[PS2_ACK]),
        }
    }
}

impl Ps2Mouse {
    fn reset(&mut self) {
        self.queue.clear();
        self.arg_cmd = None;
        self.enabled = false;
        self.sample_rate = 100;
        self.resolution = 2;
        self.scaling_2to1 = false;
        self.remote = false;
    }

    /// A byte the guest sent to the mouse through command 0xD4 (QEMU's
    /// `ps2_write_mouse`): a standard 3-byte PS/2 mouse with ID 0 that never moves.
    fn write(&mut self, val: u8) {
        if let Some(cmd) = self.arg_cmd.take() {
            match cmd {
                0xf3 => self.sample_rate = val,
                0xe8 => self.resolution = val & 3,
                _ => {}
            }
            push(&mut self.queue, &[PS2_ACK]);
            return;
        }
        match val {
            // Set resolution / sample rate: an argument follows.
            0xe8 | 0xf3 => {
                self.arg_cmd = Some(val);
                push(&mut self.queue, &[PS2_ACK]);
            }
            0xe6 | 0xe7 => {
                self.scaling_2to1 = val == 0xe7;
                push(&mut self.queue, &[PS2_ACK]);
            }
            // Status request: mode, resolution, sample rate.
            0xe9 => {
                let status = (u8::from(self.remote) << 6)
                    | (u8::from(self.enabled) << 5)
                    | (u8::from(self.scaling_2to1) << 4);
                push(
                    &mut self.queue,
                    &[PS2_ACK, status, self.resolution, self.sample_rate],
                );
            }
            0xea | 0xf0 => {
                self.remote = val == 0xf0;
                push(&mut self.queue, &[PS2_ACK]);
            }
            // Read data: a packet with no movement and no buttons.
            0xeb => push(&mut self.queue, &[PS2_ACK, 0x08, 0, 0]),
            // Get ID: a standard mouse.
            0xf2 => push(&mut self.queue, &[PS2_ACK, 0x00]),
            0xf4 | 0xf5 => {
                self.enabled = val == 0xf4;
                push(&mut self.queue, &[PS2_ACK]);
            }
            0xf6 => {
                self.reset();
                push(&mut self.queue, &[PS2_ACK]);
            }
            0xff => {
                self.reset();
                push(&mut self.queue, &[PS2_ACK, PS2_POR, 0x00]);
            }
            _ => push(&mut self.queue, &[PS2_ACK]),
        }
    }
}

/// Where the byte in the output buffer came from.
#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Source {
    Kbd,
    Mouse,
}

impl KbdState {
    /// QEMU's `vmstate_kbd` with the PS/2 devices' `vmstate_ps2_keyboard`/`_mouse`.
    fn save_state(&self) -> VmStateSection {
        let (k, m) = (&self.kbd, &self.mouse);
        VmStateSection::new(1)
            .with("mode", self.mode)
            .with("status", self.status)
            .with("outport", self.outport)
            .with("write_cmd", self.write_cmd)
            .with("ob", self.ob)
            .with("obdata", self.obdata)
            .with("ctrl", self.ctrl.iter().copied().collect::<Vec<_>>())
            .with_bytes("kbd_queue", &k.queue.iter().copied().collect::<Vec<u8>>())
            .with("kbd_arg_cmd", k.arg_cmd)
            .with("kbd_scan_enabled", k.scan_enabled)
            .with("kbd_scancode_set", k.scancode_set)
            .with_bytes("mouse_queue", &m.queue.iter().copied().collect::<Vec<u8>>())
            .with("mouse_arg_cmd", m.arg_cmd)
            .with("mouse_enabled", m.enabled)
            .with("mouse_sample_rate", m.sample_rate)
            .with("mouse_resolution", m.resolution)
            .with("mouse_scaling_2to1", m.scaling_2to1)
            .with("mouse_remote", m.remote)
    }

    fn load_state(&mut self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(1, 1)?;
        let ctrl: Vec<(u8, Source)> = s.get("ctrl")?;
        self.mode = s.get("mode")?;
        self.status = s.get("status")?;
        self.outport = s.get("outport")?;
        self.write_cmd = s.get("write_cmd")?;
        self.ob = s.get("ob")?;
        self.obdata = s.get("obdata")?;
        self.ctrl = ctrl.into();
        self.kbd.queue = s.get_bytes("kbd_queue")?.into();
        self.kbd.arg_cmd = s.get("kbd_arg_cmd")?;
        self.kbd.scan_enabled = s.get("kbd_scan_enabled")?;
        self.kbd.scancode_set = s.get("kbd_scancode_set")?;
        self.mouse.queue = s.get_bytes("mouse_queue")?.into();
        self.mouse.arg_cmd = s.get("mouse_arg_cmd")?;
        self.mouse.enabled = s.get("mouse_enabled")?;
        self.mouse.sample_rate = s.get("mouse_sample_rate")?;
        self.mouse.resolution = s.get("mouse_resolution")?;
        self.mouse.scaling_2to1 = s.get("mouse_scaling_2to1")?;
        self.mouse.remote = s.get("mouse_remote")?;
        self.update_irq();
        Ok(())
    }
}

struct KbdState {
    /// The command byte.
    mode: u8,
    status: u8,
    outport: u8,
    /// A controller command waiting for its data byte on port 0x60.
    write_cmd: Option<u8>,
    /// The output buffer and its source, when full.
    ob: Option<Source>,
    obdata: u8,
    /// Controller replies, before device data (QEMU's `KBD_PENDING_CTRL_*`).
    ctrl: VecDeque<(u8, Source)>,
    kbd: Ps2Kbd,
    mouse: Ps2Mouse,
    kbd_irq: IrqLine,
    mouse_irq: IrqLine,
    kbd_level: bool,
    mouse_level: bool,
}

impl Default for KbdState {
    fn default() -> Self {
        let mut s = KbdState {
            mode: 0,
            status: 0,
            outport: 0,
            write_cmd: None,
            ob: None,
            obdata: 0,
            ctrl: VecDeque::new(),
            kbd: Ps2Kbd::default(),
            mouse: Ps2Mouse::default(),
            kbd_irq: IrqLine::disconnected(),
            mouse_irq: IrqLine::disconnected(),
            kbd_level: false,
            mouse_level: false,
        };
        s.reset();
        s
    }
}

impl KbdState {
    /// QEMU's `kbd_reset`, with the PS/2 devices reset too.
    fn reset(&mut self) {
        self.mode = KBD_MODE_KBD_INT | KBD_MODE_MOUSE_INT;
        self.status = KBD_STAT_CMD | KBD_STAT_UNLOCKED;
        self.outport = KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES;
        self.write_cmd = None;
        self.ob = None;
        self.obdata = 0;
        self.ctrl.clear();
        self.kbd.reset();
        self.mouse.reset();
        self.update_irq();
    }

    /// Loads the output buffer if it is empty: controller replies first, then keyboard,
    /// then mouse data, each device only while its clock is enabled.
    fn refill(&mut self) {
        if self.ob.is_some() {
            return;
        }
        let next = if let Some((byte, src)) = self.ctrl.pop_front() {
            Some((byte, src))
        } else if self.mode & KBD_MODE_DISABLE_KBD == 0 && !self.kbd.queue.is_empty() {
            self.kbd.queue.pop_front().map(|b| (b, Source::Kbd))
        } else if self.mode & KBD_MODE_DISABLE_MOUSE == 0 && !self.mouse.queue.is_empty() {
            self.mouse.queue.pop_front().map(|b| (b, Source::Mouse))
        } else {
            None
        };
        if let Some((byte, src)) = next {
            self.obdata = byte;
            self.ob = Some(src);
        }
    }

    /// Status bits and IRQ levels from the output buffer (QEMU's `kbd_update_irq`).
    fn update_irq(&mut self) {
        self.refill();
        self.status &= !(KBD_STAT_OBF | KBD_STAT_MOUSE_OBF);
        self.outport &= !(KBD_OUT_OBF | KBD_OUT_MOUSE_OBF);
        let mut kbd = false;
        let mut mouse = false;
        match self.ob {
            Some(Source::Mouse) => {
                self.status |= KBD_STAT_OBF | KBD_STAT_MOUSE_OBF;
                self.outport |= KBD_OUT_OBF | KBD_OUT_MOUSE_OBF;
                mouse = self.mode & KBD_MODE_MOUSE_INT != 0;
            }
            Some(Source::Kbd) => {
                self.status |= KBD_STAT_OBF;
                self.outport |= KBD_OUT_OBF;
                kbd = self.mode & KBD_MODE_KBD_INT != 0 && self.mode & KBD_MODE_DISABLE_KBD == 0;
            }
            None => {}
        }
        if kbd != self.kbd_level {
            self.kbd_level = kbd;
            self.kbd_irq.set(kbd);
        }
        if mouse != self.mouse_level {
            self.mouse_level = mouse;
            self.mouse_irq.set(mouse);
        }
    }

    /// A controller reply (QEMU's `kbd_queue`).
    fn reply(&mut self, byte: u8, src: Source) {
        self.ctrl.push_back((byte, src));
        self.update_irq();
    }

    fn read_data(&mut self) -> u8 {
        let val = self.obdata;
        if self.ob.take().is_some() {
            // Reading deasserts the line; more data reasserts it, so an edge-triggered
            // PIC sees one interrupt per byte (QEMU's `ps2_read_data` does the same).
            for (level, line) in [
                (&mut self.kbd_level, &self.kbd_irq),
                (&mut self.mouse_level, &self.mouse_irq),
            ] {
                if *level {
                    *level = false;
                    line.lower();
                }
            }
            self.update_irq();
        }
        val
    }

    /// Writes the output port; returns whether the CPU reset line was pulled.
    fn write_outport(&mut self, val: u8) -> bool {
        self.outport = val;
        if val & KBD_OUT_A20 == 0 {
            // KVM has no A20 gate; guests that turn it off (DOS) see no change.
            log::debug!("i8042: A20 gate disabled by the guest; ignored");
        }
        val & KBD_OUT_RESET == 0
    }

    /// A write to port 0x60; returns whether the guest asked for a reset.
    fn write_data(&mut self, val: u8) -> bool {
        self.status &= !KBD_STAT_CMD;
        let mut reset = false;
        match self.write_cmd.take() {
            None => {
                let translated = self.mode & KBD_MODE_KCC != 0;
                self.kbd.write(val, translated);
                // Sending data to the keyboard re-enables its clock.
                self.mode &= !KBD_MODE_DISABLE_KBD;
            }
            Some(KBD_CCMD_WRITE_MODE) => {
                self.mode = val;
                self.status = (self.status & !KBD_STAT_SELFTEST) | (val & KBD_MODE_SYS);
            }
            Some(KBD_CCMD_WRITE_OBUF) => self.ctrl.push_back((val, Source::Kbd)),
            Some(KBD_CCMD_WRITE_AUX_OBUF) => self.ctrl.push_back((val, Source::Mouse)),
            Some(KBD_CCMD_WRITE_MOUSE) => {
                self.mouse.write(val);
                self.mode &= !KBD_MODE_DISABLE_MOUSE;
            }
            Some(KBD_CCMD_WRITE_OUTPORT) => reset = self.write_outport(val),
            Some(_) => {}
        }
        self.update_irq();
        reset
    }

    /// A write to port 0x64 (QEMU's `kbd_write_command`); returns whether the guest asked
    /// for a reset.
    fn write_command(&mut self, val: u8) -> bool {
        self.status |= KBD_STAT_CMD;
        // 0xF0..0xFF pulse the output port's low bits low for a moment: bit 0 is the CPU
        // reset line, so the even ones (0xFE among them) reset.
        let val = if val >= 0xf0 && val & 1 == 0 {
            KBD_CCMD_RESET
        } else {
            val
        };
        match val {
            KBD_CCMD_READ_MODE => self.reply(self.mode, Source::Kbd),
            KBD_CCMD_WRITE_MODE
            | KBD_CCMD_WRITE_OBUF
            | KBD_CCMD_WRITE_AUX_OBUF
            | KBD_CCMD_WRITE_MOUSE
            | KBD_CCMD_WRITE_OUTPORT => self.write_cmd = Some(val),
            KBD_CCMD_MOUSE_DISABLE => {
                self.mode |= KBD_MODE_DISABLE_MOUSE;
                self.update_irq();
            }
            KBD_CCMD_MOUSE_ENABLE => {
                self.mode &= !KBD_MODE_DISABLE_MOUSE;
                self.update_irq();
            }
            // Interface tests: 0 means no error.
            KBD_CCMD_TEST_MOUSE | KBD_CCMD_KBD_TEST => self.reply(0x00, Source::Kbd),
            KBD_CCMD_SELF_TEST => {
                self.status |= KBD_STAT_SELFTEST;
                self.outport |= KBD_OUT_A20;
                self.reply(0x55, Source::Kbd);
            }
            KBD_CCMD_KBD_DISABLE => {
                self.mode |= KBD_MODE_DISABLE_KBD;
                self.update_irq();
            }
            KBD_CCMD_KBD_ENABLE => {
                self.mode &= !KBD_MODE_DISABLE_KBD;
                self.update_irq();
            }
            // Input port: keyboard not inhibited.
            KBD_CCMD_READ_INPORT => self.reply(0x80, Source::Kbd),
            KBD_CCMD_READ_OUTPORT => self.reply(self.outport, Source::Kbd),
            KBD_CCMD_ENABLE_A20 => self.outport |= KBD_OUT_A20,
            KBD_CCMD_DISABLE_A20 => {
                let outport = self.outport & !KBD_OUT_A20;
                self.write_outport(outport);
            }
            KBD_CCMD_READ_TSTINP => self.reply(0x00, Source::Kbd),
            KBD_CCMD_RESET => return true,
            // Odd pulse commands pulse nothing that matters; 0xFF is a no-op.
            0xf0..=0xff => {}
            other => log::debug!("i8042: unsupported controller command 0x{other:02x}"),
        }
        false
    }
}

/// Scancode set 2's code for set 1 code `code` (`extended`: after `0xe0`), for a keyboard
/// the controller does not translate (the inverse of the i8042's translation table).
fn set1_to_set2(code: u8, extended: bool) -> Option<u8> {
    if extended {
        return Some(match code {
            0x10 => 0x15, // previous track
            0x19 => 0x4d, // next track
            0x1c => 0x5a, // keypad Enter
            0x1d => 0x14, // right Ctrl
            0x20 => 0x23, // mute
            0x21 => 0x2b, // calculator
            0x22 => 0x34, // play/pause
            0x24 => 0x3b, // stop
            0x2a => 0x12, // fake left Shift (Print Screen)
            0x2e => 0x21, // volume down
            0x30 => 0x32, // volume up
            0x32 => 0x3a, // WWW home
            0x35 => 0x4a, // keypad /
            0x37 => 0x7c, // Print Screen
            0x38 => 0x11, // right Alt
            0x47 => 0x6c, // Home
            0x48 => 0x75, // Up
            0x49 => 0x7d, // Page Up
            0x4b => 0x6b, // Left
            0x4d => 0x74, // Right
            0x4f => 0x69, // End
            0x50 => 0x72, // Down
            0x51 => 0x7a, // Page Down
            0x52 => 0x70, // Insert
            0x53 => 0x71, // Delete
            0x5b => 0x1f, // left Windows
            0x5c => 0x27, // right Windows
            0x5d => 0x2f, // Menu
            0x5e => 0x37, // Power
            0x5f => 0x3f, // Sleep
            0x63 => 0x5e, // Wake
            _ => return None,
        });
    }
    const TABLE: [u8; 0x59] = [
        0x00, 0x76, 0x16, 0x1e, 0x26, 0x25, 0x2e, 0x36, // 00-07: Esc, 1-6
        0x3d, 0x3e, 0x46, 0x45, 0x4e, 0x55, 0x66, 0x0d, // 08-0f: 7-0, -, =, BS, Tab
        0x15, 0x1d, 0x24, 0x2d, 0x2c, 0x35, 0x3c, 0x43, // 10-17: Q-I
        0x44, 0x4d, 0x54, 0x5b, 0x5a, 0x14, 0x1c, 0x1b, // 18-1f: O, P, [, ], Enter, Ctrl, A, S
        0x23, 0x2b, 0x34, 0x33, 0x3b, 0x42, 0x4b, 0x4c, // 20-27: D-L, ;
        0x52, 0x0e, 0x12, 0x5d, 0x1a, 0x22, 0x21, 0x2a, // 28-2f: ', `, LShift, \, Z-V
        0x32, 0x31, 0x3a, 0x41, 0x49, 0x4a, 0x59, 0x7c, // 30-37: B-M, ",", ".", /, RShift, KP*
        0x11, 0x29, 0x58, 0x05, 0x06, 0x04, 0x0c, 0x03, // 38-3f: Alt, Space, Caps, F1-F5
        0x0b, 0x83, 0x0a, 0x01, 0x09, 0x77, 0x7e, 0x6c, // 40-47: F6-F10, NumLock, Scroll, KP7
        0x75, 0x7d, 0x7b, 0x6b, 0x73, 0x74, 0x79, 0x69, // 48-4f: KP8, KP9, KP-, KP4-6, KP+, KP1
        0x72, 0x7a, 0x70, 0x71, 0x84, 0x00, 0x61, 0x78, // 50-57: KP2, KP3, KP0, KP., SysRq, -, <>, F11
        0x07, // 58: F12
    ];
    match code {
        0x70 => Some(0x13), // Katakana/Hiragana
        0x73 => Some(0x51), // Ro
        0x79 => Some(0x64), // Henkan
        0x7b => Some(0x67), // Muhenkan
        0x7d => Some(0x6a), // Yen
        0x7e => Some(0x6d), // keypad , (Brazil)
        _ => TABLE.get(usize::from(code)).copied().filter(|c| *c != 0),
    }
}

/// Set 1's Pause: a make sequence and no break (Ctrl+NumLock with an `0xe1` prefix).
const PAUSE_SET1: [u8; 6] = [0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5];
/// Set 2's Pause.
const PAUSE_SET2: [u8; 8] = [0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77];
/// QEMU's key number of Pause.
const QNUM_PAUSE: u16 = 0xc6;

impl crate::core::input::KeyboardHandler for KbdController {
    /// QEMU's `ps2_keyboard_event`: the key in the keyboard's scancode set, or in set 1
    /// when the controller translates set 2 (what PC firmware and Linux choose).
    fn key(&self, qnum: u16, down: bool) {
        let mut s = self.state.lock();
        log::debug!(
            "i8042: key 0x{qnum:x} {}, scanning {}, set {}, mode 0x{:x}",
            if down { "down" } else { "up" },
            s.kbd.scan_enabled,
            s.kbd.scancode_set,
            s.mode
        );
        if !s.kbd.scan_enabled {
            return;
        }
        let set1 = s.kbd.scancode_set == 1
            || (s.kbd.scancode_set == 2 && s.mode & KBD_MODE_KCC != 0);
        let code = (qnum & 0x7f) as u8;
        let extended = qnum & 0x80 != 0;
        let mut bytes: Vec<u8> = Vec::with_capacity(8);
        if qnum == QNUM_PAUSE {
            if down {
                bytes.extend_from_slice(if set1 { &PAUSE_SET1 } else { &PAUSE_SET2 });
            }
        } else if qnum > 0xff {
            log::debug!("i8042: key number 0x{qnum:x} has no scancode");
            return;
        } else if set1 {
            if extended {
                bytes.push(0xe0);
            }
            bytes.push(if down { code } else { code | 0x80 });
        } else {
            // Sets 2 and 3 (which qomvm's keyboard sends as set 2).
            let Some(code2) = set1_to_set2(code, extended) else {
                log::debug!("i8042: key number 0x{qnum:x} has no set 2 scancode");
                return;
            };
            if extended {
                bytes.push(0xe0);
            }
            if !down {
                bytes.push(0xf0);
            }
            bytes.push(code2);
        }
        push(&mut s.kbd.queue, &bytes);
        s.update_irq();
    }
}

impl crate::core::input::MouseHandler for KbdController {
    /// QEMU's `ps2_mouse_event` + `ps2_mouse_send_packet`: while reporting is on (stream
    /// mode), standard 3-byte packets of at most 127 counts each way, y growing upwards;
    /// the wheel is dropped (the mouse is a plain one, ID 0).
    fn motion(&self, dx: i32, dy: i32, _dz: i32, buttons: u8) {
        use crate::core::input::button;
        let mut s = self.state.lock();
        if !s.mouse.enabled || s.mouse.remote {
            return;
        }
        let b = (if buttons & button::LEFT != 0 { 1 } else { 0 })
            | (if buttons & button::RIGHT != 0 { 2 } else { 0 })
            | (if buttons & button::MIDDLE != 0 { 4 } else { 0 });
        let (mut dx, mut dy) = (dx, -dy);
        loop {
            let x = dx.clamp(-127, 127);
            let y = dy.clamp(-127, 127);
            let mut head = 0x08 | b;
            if x < 0 {
                head |= 0x10;
            }
            if y < 0 {
                head |= 0x20;
            }
            if s.mouse.queue.len() + 3 > PS2_QUEUE_SIZE {
                break;
            }
            push(&mut s.mouse.queue, &[head, x as u8, y as u8]);
            dx -= x;
            dy -= y;
            if dx == 0 && dy == 0 {
                break;
            }
        }
        s.update_irq();
    }
}

/// What the controller does when the guest pulls the CPU reset line.
pub type ResetHook = Arc<dyn Fn() + Send + Sync>;

/// The controller's state and port handlers, shared by its two port regions.
#[derive(Default)]
pub struct KbdController {
    state: Mutex<KbdState>,
    reset_hook: Mutex<Option<ResetHook>>,
}

impl KbdController {
    /// Sets what a guest-requested reset does (the device posts `GuestReset` to its
    /// machine).
    pub fn set_reset_hook(&self, hook: Option<ResetHook>) {
        *self.reset_hook.lock() = hook;
    }

    /// Connects the keyboard (IRQ 1) and mouse (IRQ 12) interrupt outputs.
    pub fn set_irqs(&self, kbd: IrqLine, mouse: IrqLine) {
        let mut s = self.state.lock();
        s.kbd_irq = kbd;
        s.mouse_irq = mouse;
        let (k, m) = (s.kbd_level, s.mouse_level);
        s.kbd_irq.set(k);
        s.mouse_irq.set(m);
    }

    /// Queues a byte from the keyboard (a scancode in the keyboard's current set), for a
    /// future host input path.
    pub fn put_kbd_byte(&self, byte: u8) {
        let mut s = self.state.lock();
        if s.kbd.scan_enabled {
            push(&mut s.kbd.queue, &[byte]);
            s.update_irq();
        }
    }

    /// Back to the power-on state (QEMU's `kbd_reset` + `ps2_reset`).
    pub fn reset(&self) {
        self.state.lock().reset();
    }

    /// The command byte.
    pub fn mode(&self) -> u8 {
        self.state.lock().mode
    }

    fn guest_reset(&self, requested: bool) {
        if requested {
            let hook = self.reset_hook.lock().clone();
            match hook {
                Some(hook) => hook(),
                None => {
                    log::warn!("i8042: the guest asked for a reset, but nothing is wired to do it")
                }
            }
        }
    }

    /// Reads port 0x60 (`data`) or 0x64 (status).
    pub fn read_port(&self, data: bool) -> u8 {
        let mut s = self.state.lock();
        if data {
            s.read_data()
        } else {
            s.status
        }
    }

    /// Writes port 0x60 (`data`) or 0x64 (command).
    pub fn write_port(&self, data: bool, val: u8) {
        let reset = {
            let mut s = self.state.lock();
            if data {
                s.write_data(val)
            } else {
                s.write_command(val)
            }
        };
        // Outside the lock: the hook takes the machine's locks.
        self.guest_reset(reset);
    }
}

/// One of the controller's two one-byte port regions.
struct KbdPort {
    ctrl: Arc<KbdController>,
    data: bool,
}

impl MemoryRegionOps for KbdPort {
    fn read(&self, _offset: u64, size: u32) -> u64 {
        // The register is one byte; the upper bytes of a wider access read as all ones
        // (the dispatcher does not split it to reach the device at the next port).
        let val = u64::from(self.ctrl.read_port(self.data));
        let ones = if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (size * 8)) - 1
        };
        (ones & !0xff) | val
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        self.ctrl.write_port(self.data, value as u8);
    }
}

/// QEMU's `ISAKBDState`: the controller and its IRQ properties.
#[derive(qom::Object)]
#[qom(name = TYPE_I8042)]
pub struct I8042 {
    #[parent]
    parent: IsaDevice,
    #[property(name = "kbd-irq", default = 1, desc = "ISA IRQ of the keyboard")]
    kbd_irq: Prop<u8>,
    #[property(name = "mouse-irq", default = 12, desc = "ISA IRQ of the mouse")]
    mouse_irq: Prop<u8>,
    ctrl: Arc<KbdController>,
}

type_init!(I8042);

impl I8042 {
    /// The controller (QEMU's `ISAKBDState::kbd`).
    pub fn controller(&self) -> &Arc<KbdController> {
        &self.ctrl
    }
}

/// Realize errors of `i8042`.
#[derive(Debug, thiserror::Error)]
enum I8042Error {
    #[error("i8042: IRQ {0} is invalid (the ISA bus has {ISA_NUM_IRQS})")]
    BadIrq(u8),
}

impl DeviceImpl for I8042 {
    const CATEGORY: DeviceCategory = DeviceCategory::Input;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let kbd_irq = self.kbd_irq.get();
        let mouse_irq = self.mouse_irq.get();
        for irq in [kbd_irq, mouse_irq] {
            if usize::from(irq) >= ISA_NUM_IRQS {
                return Err(RealizeError::device(I8042Error::BadIrq(irq)));
            }
        }
        let machine: Weak<MachineServices> = Arc::downgrade(ctx.machine()?);
        self.ctrl.set_reset_hook(Some(Arc::new(move || {
            if let Some(machine) = machine.upgrade() {
                machine.request(RunRequest::GuestReset);
            }
        })));
        let input = ctx.machine()?.input();
        input.register_keyboard(self.ctrl.clone());
        input.register_mouse("QEMU PS/2 Mouse", self.ctrl.clone());
        self.ctrl.set_irqs(
            self.irq(ctx, kbd_irq.into()),
            self.irq(ctx, mouse_irq.into()),
        );
        for (name, port, data) in [
            ("i8042-data", I8042_DATA_PORT, true),
            ("i8042-cmd", I8042_CMD_PORT, false),
        ] {
            let ops = Arc::new(KbdPort {
                ctrl: self.ctrl.clone(),
                data,
            });
            self.register_ioport(ctx, MemoryRegion::new_io(name, 1, ops), port)?;
        }
        Ok(())
    }

    fn reset(&self) {
        self.ctrl.reset();
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        Ok(self.ctrl.state.lock().save_state())
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.ctrl.state.lock().load_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::irq::IrqHandler;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Pins(Mutex<[bool; 16]>);

    impl IrqHandler for Pins {
        fn set_irq(&self, n: u32, level: bool) {
            self.0.lock()[n as usize] = level;
        }
    }

    fn controller() -> (Arc<KbdController>, Arc<Pins>, Arc<AtomicUsize>) {
        let ctrl = Arc::new(KbdController::default());
        let pins = Arc::new(Pins::default());
        ctrl.set_irqs(
            IrqLine::new(pins.clone(), 1),
            IrqLine::new(pins.clone(), 12),
        );
        let resets = Arc::new(AtomicUsize::new(0));
        let count = resets.clone();
        ctrl.set_reset_hook(Some(Arc::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })));
        (ctrl, pins, resets)
    }

    /// Sends a controller command (and its argument) and reads what comes back, as
    /// Linux's `i8042_command` does.
    fn command(ctrl: &KbdController, cmd: u8, arg: Option<u8>) -> Vec<(u8, u8)> {
        ctrl.write_port(false, cmd);
        if let Some(arg) = arg {
            ctrl.write_port(true, arg);
        }
        drain(ctrl)
    }

    /// (status, data) pairs while the output buffer is full.
    fn drain(ctrl: &KbdController) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        loop {
            let status = ctrl.read_port(false);
            if status & KBD_STAT_OBF == 0 {
                return out;
            }
            out.push((status, ctrl.read_port(true)));
        }
    }

    fn data(replies: &[(u8, u8)]) -> Vec<u8> {
        replies.iter().map(|r| r.1).collect()
    }

    #[test]
    fn host_keys_become_the_scancodes_of_the_guests_set() {
        use crate::core::input::KeyboardHandler;
        let (ctrl, pins, _) = controller();
        // Translated (the command byte's bit 6): set 1, extended keys with 0xe0.
        command(&ctrl, KBD_CCMD_WRITE_MODE, Some(0x61));
        ctrl.key(0x1e, true);
        assert!(pins.0.lock()[1], "IRQ 1 for a key");
        ctrl.key(0x1e, false);
        ctrl.key(0xc8, true);
        ctrl.key(0xc8, false);
        ctrl.key(QNUM_PAUSE, true);
        ctrl.key(QNUM_PAUSE, false);
        let mut want = vec![0x1e, 0x9e, 0xe0, 0x48, 0xe0, 0xc8];
        want.extend_from_slice(&PAUSE_SET1);
        assert_eq!(data(&drain(&ctrl)), want);
        // Untranslated set 2: 0xf0 before a break.
        command(&ctrl, KBD_CCMD_WRITE_MODE, Some(0x21));
        ctrl.key(0x1e, true);
        ctrl.key(0x1e, false);
        ctrl.key(0x9d, true);
        ctrl.key(0x9d, false);
        ctrl.key(0x7f, true); // no set 2 code: nothing
        assert_eq!(
            data(&drain(&ctrl)),
            [0x1c, 0xf0, 0x1c, 0xe0, 0x14, 0xe0, 0xf0, 0x14]
        );
        // A keyboard the guest disabled (0xf5) sends nothing.
        ctrl.write_port(true, 0xf5);
        assert_eq!(data(&drain(&ctrl)), [PS2_ACK]);
        ctrl.key(0x1e, true);
        assert!(drain(&ctrl).is_empty());
    }

    #[test]
    fn host_pointer_motion_becomes_ps2_packets_once_enabled() {
        use crate::core::input::{button, MouseHandler};
        let (ctrl, pins, _) = controller();
        ctrl.motion(5, 5, 0, 0);
        assert!(drain(&ctrl).is_empty(), "reporting is off after reset");
        command(&ctrl, KBD_CCMD_WRITE_MOUSE, Some(0xf4));
        ctrl.motion(3, -4, 0, button::LEFT | button::RIGHT);
        assert!(pins.0.lock()[12], "IRQ 12 for mouse data");
        let replies = drain(&ctrl);
        assert!(replies.iter().all(|r| r.0 & KBD_STAT_MOUSE_OBF != 0));
        assert_eq!(data(&replies), [0x0b, 3, 4]);
        // Large moves go as several packets of at most 127 counts.
        ctrl.motion(-200, 0, 0, 0);
        assert_eq!(
            data(&drain(&ctrl)),
            [0x18, (-127i8) as u8, 0, 0x18, (-73i8) as u8, 0]
        );
    }

    #[test]
    fn self_test_and_interface_tests_pass() {
        let (ctrl, _, _) = controller();
        assert_eq!(ctrl.read_port(false) & (KBD_STAT_OBF | KBD_STAT_IBF), 0);
        assert_eq!(data(&command(&ctrl, 0xaa, None)), [0x55]);
        assert_ne!(
            ctrl.read_port(false) & KBD_STAT_SELFTEST,
            0,
            "SYS flag after POST"
        );
        assert_eq!(data(&command(&ctrl, 0xab, None)), [0x00]);
        assert_eq!(data(&command(&ctrl, 0xa9, None)), [0x00]);
    }

    #[test]
    fn command_byte_round_trips_and_aux_kbd_disable_show_in_it() {
        let (ctrl, _, _) = controller();
        assert_eq!(data(&command(&ctrl, 0x20, None)), [0x03]);
        assert!(command(&ctrl, 0x60, Some(0x47)).is_empty());
        assert_eq!(data(&command(&ctrl, 0x20, None)), [0x47]);
        command(&ctrl, 0xa7, None);
        assert_eq!(
            data(&command(&ctrl, 0x20, None)),
            [0x47 | KBD_MODE_DISABLE_MOUSE]
        );
        command(&ctrl, 0xa8, None);
        command(&ctrl, 0xad, None);
        assert_eq!(
            data(&command(&ctrl, 0x20, None)),
            [0x47 | KBD_MODE_DISABLE_KBD]
        );
        command(&ctrl, 0xae, None);
        assert_eq!(data(&command(&ctrl, 0x20, None)), [0x47]);
    }

    #[test]
    fn aux_loopback_comes_back_as_mouse_data_on_irq_12() {
        let (ctrl, pins, _) = controller();
        ctrl.write_port(false, 0xd3);
        ctrl.write_port(true, 0x5a);
        assert!(pins.0.lock()[12], "MOUSE_INT is on by default");
        assert!(!pins.0.lock()[1]);
        let replies = drain(&ctrl);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, 0x5a);
        assert_ne!(replies[0].0 & KBD_STAT_MOUSE_OBF, 0);
        assert!(!pins.0.lock()[12], "reading the byte lowers the line");
    }

    #[test]
    fn keyboard_answers_probe_commands_on_irq_1() {
        let (ctrl, pins, _) = controller();
        ctrl.write_port(true, 0xff);
        assert!(pins.0.lock()[1]);
        assert_eq!(data(&drain(&ctrl)), [0xfa, 0xaa]);
        ctrl.write_port(true, 0xf2);
        assert_eq!(data(&drain(&ctrl)), [0xfa, 0xab, 0x83]);
        ctrl.write_port(true, 0xf5);
        assert_eq!(data(&drain(&ctrl)), [0xfa]);
        ctrl.write_port(true, 0xed);
        assert_eq!(data(&drain(&ctrl)), [0xfa]);
        ctrl.write_port(true, 0x07);
        assert_eq!(data(&drain(&ctrl)), [0xfa]);
        ctrl.write_port(true, 0xf4);
        assert_eq!(data(&drain(&ctrl)), [0xfa]);
        ctrl.write_port(true, 0x42);
        assert_eq!(data(&drain(&ctrl)), [0xfa]);
        // With translation on, the ID's second byte is translated.
        command(&ctrl, 0x60, Some(0x43));
        ctrl.write_port(true, 0xf2);
        assert_eq!(data(&drain(&ctrl)), [0xfa, 0xab, 0x41]);
        assert!(!pins.0.lock()[1]);
    }

    #[test]
    fn each_byte_is_its_own_interrupt_edge() {
        let ctrl = Arc::new(KbdController::default());
        #[derive(Default)]
        struct Edges(Mutex<Vec<(u32, bool)>>);
        impl IrqHandler for Edges {
            fn set_irq(&self, n: u32, level: bool) {
                self.0.lock().push((n, level));
            }
        }
        let edges = Arc::new(Edges::default());
        ctrl.set_irqs(
            IrqLine::new(edges.clone(), 1),
            IrqLine::new(edges.clone(), 12),
        );
        edges.0.lock().clear();
        ctrl.write_port(true, 0xff);
        ctrl.read_port(true);
        ctrl.read_port(true);
        assert_eq!(
            *edges.0.lock(),
            [(1, true), (1, false), (1, true), (1, false)]
        );
    }

    #[test]
    fn mouse_answers_through_d4() {
        let (ctrl, _, _) = controller();
        let mouse = |b: u8| {
            ctrl.write_port(false, 0xd4);
            ctrl.write_port(true, b);
            drain(&ctrl)
        };
        let reset = mouse(0xff);
        assert_eq!(data(&reset), [0xfa, 0xaa, 0x00]);
        assert!(reset.iter().all(|(st, _)| st & KBD_STAT_MOUSE_OBF != 0));
        assert_eq!(data(&mouse(0xf2)), [0xfa, 0x00]);
        assert_eq!(data(&mouse(0xf3)), [0xfa]);
        assert_eq!(data(&mouse(200)), [0xfa]);
        assert_eq!(data(&mouse(0xe9)), [0xfa, 0x00, 2, 200]);
    }

    #[test]
    fn fe_and_output_port_bit_0_reset_the_machine() {
        let (ctrl, _, resets) = controller();
        ctrl.write_port(false, 0xfe);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        ctrl.write_port(false, 0xd1);
        ctrl.write_port(true, 0xfe);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        ctrl.write_port(false, 0xd1);
        ctrl.write_port(true, 0xdf);
        ctrl.write_port(false, 0xff);
        assert_eq!(
            resets.load(Ordering::SeqCst),
            2,
            "bit 0 set and 0xff pulse nothing"
        );
        assert_eq!(data(&command(&ctrl, 0xd0, None))[0] & 0x03, 0x03);
    }
}
