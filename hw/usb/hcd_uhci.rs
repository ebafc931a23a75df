//! `piix3-usb-uhci` and `piix4-usb-uhci` (QEMU's `hw/usb/hcd-uhci.c`): the PIIX's USB 1.1
//! Universal Host Controller, function 2 of the south bridge (8086:7020, 8086:7112), what
//! libvirt gives every pc domain (`<controller type='usb' model='piix3-uhci'>`) and QEMU's
//! `-usb` adds. Two root ports (bus `<id>.0`); 32 I/O ports in BAR 4; INTD.
//!
//! Once the guest sets Run/Stop the controller walks one frame of its schedule each
//! millisecond (on the main loop, never a vCPU thread): the frame list entry for the frame
//! number, then queue heads and transfer descriptors in guest memory, each active TD's
//! token handed to the device at its address. A schedule that loops without progress,
//! points outside RAM or holds illegal TDs ends the frame or halts the controller as the
//! hardware would (a host system or process error), never the VMM.

use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::services::MachineServices;
use crate::core::timer::DeviceTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::{config, BarKind, IntxPin, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};
use crate::usb::usb_bus::{pid, usb_host_bus_name, usb_host_bus_new, usb_host_unplug, TokenResult, UsbHostController, UsbPorts};

/// QEMU's `TYPE_PIIX3_USB_UHCI`.
pub const TYPE_PIIX3_USB_UHCI: &str = "piix3-usb-uhci";
/// QEMU's `TYPE_PIIX4_USB_UHCI`.
pub const TYPE_PIIX4_USB_UHCI: &str = "piix4-usb-uhci";

/// Root ports.
const NB_PORTS: usize = 2;
/// Bytes of I/O space in BAR 4.
const IO_SIZE: u64 = 0x20;
/// A frame.
const FRAME: Duration = Duration::from_millis(1);
/// Schedule elements followed in one frame at most (QEMU's `FRAME_MAX_LOOPS`).
const FRAME_MAX_LOOPS: u32 = 256;
/// Queue heads remembered per frame to find a loop that makes no progress.
const MAX_QUEUES_PER_FRAME: usize = 64;
/// The largest transfer a TD may ask for (`MaxLen` 0x4ff; 0x500-0x7fe are illegal).
const MAX_TD_LEN: usize = 0x500;
/// Where the frames' run-state handler runs: above the USB disks' (10), which wait for
/// the commands frames started, and the block layer's flush (0).
const FRAMES_CHANGE_PRIORITY: i32 = 20;
/// Configuration register: serial bus release number, USB 1.0.
const USB_SBRN: usize = 0x60;

/// USBCMD bits.
mod cmd {
    pub const RS: u16 = 1 << 0;
    pub const HCRESET: u16 = 1 << 1;
    pub const GRESET: u16 = 1 << 2;
    pub const EGSM: u16 = 1 << 3;
    pub const FGR: u16 = 1 << 4;
}

/// USBSTS bits.
mod sts {
    pub const USBINT: u16 = 1 << 0;
    pub const USBERR: u16 = 1 << 1;
    pub const RD: u16 = 1 << 2;
    pub const HSE: u16 = 1 << 3;
    pub const HCPE: u16 = 1 << 4;
    pub const HCHALTED: u16 = 1 << 5;
}

/// USBINTR bits.
mod intr {
    pub const TIMEOUT_CRC: u16 = 1 << 0;
    pub const RESUME: u16 = 1 << 1;
    pub const IOC: u16 = 1 << 2;
    pub const SHORT_PACKET: u16 = 1 << 3;
}

/// PORTSC bits.
mod port {
    pub const CCS: u16 = 1 << 0;
    pub const CSC: u16 = 1 << 1;
    pub const PE: u16 = 1 << 2;
    pub const PEC: u16 = 1 << 3;
    pub const RD: u16 = 1 << 6;
    /// Reserved, always reads 1 (drivers count ports by it).
    pub const ALWAYS_ONE: u16 = 1 << 7;
    pub const PR: u16 = 1 << 9;
    pub const SUSP: u16 = 1 << 12;
    /// What software may write (the rest is status, or write-1-to-clear).
    pub const WRITABLE: u16 = PE | RD | PR | SUSP;
    pub const WRITE_CLEAR: u16 = CSC | PEC;
}

/// Link pointer bits.
mod link {
    pub const TERMINATE: u32 = 1 << 0;
    pub const QH: u32 = 1 << 1;
    pub const DEPTH_FIRST: u32 = 1 << 2;
}

/// TD control and status bits.
mod td {
    pub const ACTLEN: u32 = 0x7ff;
    pub const STATUS: u32 = 0xff << 16;
    pub const CRC_TIMEOUT: u32 = 1 << 18;
    pub const NAK: u32 = 1 << 19;
    pub const STALL: u32 = 1 << 22;
    pub const ACTIVE: u32 = 1 << 23;
    pub const IOC: u32 = 1 << 24;
    pub const ERROR_COUNT: u32 = 3 << 27;
    pub const SPD: u32 = 1 << 29;
}

/// The interrupt causes QEMU's UHCI keeps apart (its hidden `status2`): a TD with IOC
/// completed, a short packet was detected.
mod pending {
    pub const IOC: u8 = 1 << 0;
    pub const SHORT: u8 = 1 << 1;
}

/// The registers the guest sees, as a migration carries them.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Registers {
    cmd: u16,
    status: u16,
    /// Interrupt causes signalled by USBINT ([`pending`]).
    status2: u8,
    intr: u16,
    frnum: u16,
    fl_base: u32,
    sof_timing: u8,
    ports: [u16; NB_PORTS],
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            cmd: 0,
            status: sts::HCHALTED,
            status2: 0,
            intr: 0,
            frnum: 0,
            fl_base: 0,
            sof_timing: 64,
            ports: [port::ALWAYS_ONE; NB_PORTS],
        }
    }
}

/// The controller's state under its one lock.
struct State {
    regs: Registers,
    /// Causes found during the frame being walked, signalled at its end.
    frame_pending: u8,
    /// When the next frame is due.
    next_frame: Instant,
    /// The VM is stopped: no frames.
    paused: bool,
    /// The PCI command register lets the function master the bus.
    bus_master: bool,
}

impl State {
    fn running(&self) -> bool {
        self.regs.cmd & cmd::RS != 0 && !self.paused
    }
}

/// How a TD went.
enum TdOutcome {
    /// Done and retired: the queue moves on.
    Complete,
    /// Retired short with SPD, or failed, or inactive, or NAKed: the queue waits; go on
    /// to the next one.
    NextQueue,
    /// The controller halted or the frame's bandwidth is used.
    StopFrame,
}

/// A DMA access outside guest RAM (the hardware's master abort).
struct DmaFault;

/// The controller: registers, ports, the frame timer.
struct Uhci {
    state: Mutex<State>,
    ports: Arc<UsbPorts>,
    services: Arc<MachineServices>,
    intx: Arc<IntxPin>,
    timer: DeviceTimer,
    bandwidth: usize,
    maxframes: u32,
    log: RateLimitedLog,
}

impl Uhci {
    fn update_irq(&self, st: &State) {
        let r = &st.regs;
        let level = (r.status2 & pending::IOC != 0 && r.intr & intr::IOC != 0)
            || (r.status2 & pending::SHORT != 0 && r.intr & intr::SHORT_PACKET != 0)
            || (r.status & sts::USBERR != 0 && r.intr & intr::TIMEOUT_CRC != 0)
            || (r.status & sts::RD != 0 && r.intr & intr::RESUME != 0)
            || r.status & (sts::HSE | sts::HCPE) != 0;
        self.intx.set(level);
    }

    /// QEMU's `uhci_reset`: registers to their reset values, every attached device reset
    /// and seen as newly connected.
    fn reset(&self, st: &mut State) {
        st.regs = Registers::default();
        st.frame_pending = 0;
        for i in 0..NB_PORTS {
            if let Some(dev) = self.ports.device(i) {
                dev.reset();
                st.regs.ports[i] |= port::CCS | port::CSC;
            }
        }
        let _ = self.timer.disarm();
        self.update_irq(st);
    }

    /// A suspended controller resumes (QEMU's `uhci_resume`).
    fn resume(&self, st: &mut State) {
        if st.regs.cmd & cmd::EGSM != 0 {
            st.regs.cmd |= cmd::FGR;
            st.regs.status |= sts::RD;
            self.update_irq(st);
        }
    }

    fn start_frames(&self, st: &mut State) {
        st.next_frame = Instant::now() + FRAME;
        if let Err(e) = self.timer.arm(FRAME) {
            log::error!("uhci: cannot arm the frame timer: {e}");
        }
    }

    fn read(&self, offset: u64) -> u16 {
        let st = self.state.lock();
        let r = &st.regs;
        match offset {
            0x00 => r.cmd,
            0x02 => r.status,
            0x04 => r.intr,
            0x06 => r.frnum,
            0x08 => r.fl_base as u16,
            0x0a => (r.fl_base >> 16) as u16,
            0x0c => r.sof_timing.into(),
            0x10 | 0x12 => r.ports[((offset - 0x10) / 2) as usize],
            // Past the last port: a value without bit 7, where drivers stop counting.
            _ => 0xff7f,
        }
    }

    fn write(&self, offset: u64, val: u16) {
        let mut st = self.state.lock();
        match offset {
            0x00 => self.write_cmd(&mut st, val),
            0x02 => {
                // Write 1 to clear; halted is the controller's to say.
                st.regs.status &= !(val & !sts::HCHALTED);
                if val & sts::USBINT != 0 {
                    st.regs.status2 = 0;
                }
                self.update_irq(&st);
            }
            0x04 => {
                st.regs.intr = val & 0x0f;
                self.update_irq(&st);
            }
            0x06 if st.regs.status & sts::HCHALTED != 0 => st.regs.frnum = val & 0x7ff,
            0x08 => st.regs.fl_base = (st.regs.fl_base & 0xffff_0000) | u32::from(val & !0xfff),
            0x0a => st.regs.fl_base = (st.regs.fl_base & 0xffff) | u32::from(val) << 16,
            0x0c => st.regs.sof_timing = val as u8,
            0x10 | 0x12 => self.write_port(&mut st, ((offset - 0x10) / 2) as usize, val),
            _ => {}
        }
    }

    fn write_cmd(&self, st: &mut State, val: u16) {
        if val & (cmd::GRESET | cmd::HCRESET) != 0 {
            // A global reset resets the bus's devices; so does QEMU's controller reset.
            self.reset(st);
            return;
        }
        let was_running = st.regs.cmd & cmd::RS != 0;
        st.regs.cmd = val & 0xff;
        // Suspending while a port already asks to resume resumes at once.
        if val & cmd::EGSM != 0 && st.regs.ports.iter().any(|p| p & port::RD != 0) {
            self.resume(st);
        }
        if val & cmd::RS != 0 {
            st.regs.status &= !sts::HCHALTED;
            if !was_running && !st.paused {
                self.start_frames(st);
            }
        } else {
            st.regs.status |= sts::HCHALTED;
            let _ = self.timer.disarm();
        }
    }

    fn write_port(&self, st: &mut State, i: usize, val: u16) {
        let ctrl = st.regs.ports[i];
        let mut val = val;
        if val & port::PR != 0 && ctrl & port::PR == 0 {
            if let Some(dev) = self.ports.device(i) {
                dev.reset();
            }
            // A port in reset is disabled: its device hears nothing until enabled again.
            val &= !port::PE;
        }
        if ctrl & port::CCS == 0 {
            // A port with nothing connected cannot be enabled.
            val &= !port::PE;
        }
        let mut ctrl = (ctrl & !port::WRITABLE) | (val & port::WRITABLE);
        ctrl &= !(val & port::WRITE_CLEAR);
        st.regs.ports[i] = ctrl;
    }

    /// The frame timer fired: walk the frames due (at most `maxframes`; those beyond are
    /// skipped, as after a host stall), then wait for the next.
    fn frame_timer(&self) {
        if !self.timer.take_expired() {
            return;
        }
        let mut st = self.state.lock();
        if !st.running() {
            return;
        }
        let now = Instant::now();
        let mut due = if now >= st.next_frame {
            (now.duration_since(st.next_frame).as_micros() / FRAME.as_micros()) as u64 + 1
        } else {
            0
        };
        let max = u64::from(self.maxframes.max(1));
        if due > max {
            let skipped = due - max;
            st.regs.frnum = ((u64::from(st.regs.frnum) + skipped) & 0x7ff) as u16;
            st.next_frame += FRAME * skipped.min(u64::from(u32::MAX)) as u32;
            due = max;
        }
        let mem = self.services.ram();
        for _ in 0..due {
            self.run_frame(&mut st, &mem);
            st.next_frame += FRAME;
            if !st.running() {
                return;
            }
        }
        let wait = st.next_frame.saturating_duration_since(Instant::now());
        if let Err(e) = self.timer.arm(wait) {
            log::error!("uhci: cannot arm the frame timer: {e}");
        }
    }

    /// One frame: the schedule from the frame list entry, then the frame number moves on
    /// and the frame's interrupts are signalled.
    fn run_frame(&self, st: &mut State, mem: &GuestMemoryMmap) {
        if st.bus_master && st.regs.cmd & cmd::EGSM == 0 {
            if let Err(DmaFault) = self.walk_schedule(st, mem) {
                // A master abort: the controller halts with a host system error.
                self.log.warn(|| "uhci: schedule outside guest RAM: host system error".into());
                st.regs.status |= sts::HSE | sts::HCHALTED;
                st.regs.cmd &= !cmd::RS;
            }
        }
        st.regs.frnum = (st.regs.frnum + 1) & 0x7ff;
        if st.frame_pending != 0 {
            st.regs.status2 |= st.frame_pending;
            st.regs.status |= sts::USBINT;
            st.frame_pending = 0;
        }
        self.update_irq(st);
    }

    fn walk_schedule(&self, st: &mut State, mem: &GuestMemoryMmap) -> Result<(), DmaFault> {
        let entry = u64::from(st.regs.fl_base) + (u64::from(st.regs.frnum & 0x3ff) << 2);
        let mut next = read32(mem, entry)?;
        let mut queue: Option<(u64, u32)> = None;
        let mut seen_queues: Vec<u64> = Vec::new();
        let mut progress = 0u32;
        let mut bytes = 0usize;
        for _ in 0..FRAME_MAX_LOOPS {
            if next & link::TERMINATE != 0 {
                break;
            }
            let addr = u64::from(next & !0xf);
            if next & link::QH != 0 {
                // Drivers loop their asynchronous queues back to reclaim bandwidth: a
                // queue seen again with no TD done since means the frame has nothing left.
                if seen_queues.contains(&addr) {
                    if progress == 0 {
                        break;
                    }
                    seen_queues.clear();
                    progress = 0;
                }
                if seen_queues.len() == MAX_QUEUES_PER_FRAME {
                    break;
                }
                seen_queues.push(addr);
                let head = read32(mem, addr)?;
                let element = read32(mem, addr + 4)?;
                if element & link::TERMINATE != 0 {
                    next = head;
                    queue = None;
                } else {
                    queue = Some((addr, head));
                    next = element;
                }
                continue;
            }
            let td_link = read32(mem, addr)?;
            let ctrl = read32(mem, addr + 4)?;
            let token = read32(mem, addr + 8)?;
            let buffer = read32(mem, addr + 12)?;
            let (outcome, new_ctrl) = self.run_td(st, mem, ctrl, token, buffer, &mut bytes)?;
            if new_ctrl != ctrl {
                write32(&self.services, mem, addr + 4, new_ctrl)?;
            }
            match outcome {
                TdOutcome::StopFrame => break,
                TdOutcome::NextQueue => {
                    next = match queue.take() {
                        Some((_, head)) => head,
                        None => td_link,
                    };
                }
                TdOutcome::Complete => {
                    progress += 1;
                    next = td_link;
                    if let Some((qh, head)) = queue {
                        write32(&self.services, mem, qh + 4, td_link)?;
                        if td_link & link::DEPTH_FIRST == 0 || td_link & link::TERMINATE != 0 {
                            next = head;
                            queue = None;
                        }
                    }
                    if bytes >= self.bandwidth {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// One TD: its token to the device at its address. Returns what to do next and the
    /// TD's new control and status word.
    fn run_td(
        &self,
        st: &mut State,
        mem: &GuestMemoryMmap,
        ctrl: u32,
        token: u32,
        buffer: u32,
        bytes: &mut usize,
    ) -> Result<(TdOutcome, u32), DmaFault> {
        if ctrl & td::ACTIVE == 0 {
            // An inactive TD still interrupts if it asks to: Linux's uhci-hcd sets IOC on
            // its terminating TD to hear when a frame has passed.
            if ctrl & td::IOC != 0 {
                st.frame_pending |= pending::IOC;
            }
            return Ok((TdOutcome::NextQueue, ctrl));
        }
        let pid_code = token as u8;
        let max_len = (((token >> 21) + 1) & 0x7ff) as usize;
        if !matches!(pid_code, pid::SETUP | pid::IN | pid::OUT) || max_len > MAX_TD_LEN {
            // An illegal TD: a host controller process error halts the controller.
            self.log.warn(|| format!("uhci: illegal TD (token {token:#010x}): process error"));
            st.regs.status |= sts::HCPE | sts::HCHALTED;
            st.regs.cmd &= !cmd::RS;
            return Ok((TdOutcome::StopFrame, ctrl));
        }
        let address = ((token >> 8) & 0x7f) as u8;
        let ep = ((token >> 15) & 0xf) as u8;
        let device = (0..NB_PORTS)
            .filter(|&i| st.regs.ports[i] & port::PE != 0)
            .filter_map(|i| self.ports.device(i))
            .find_map(|d| d.find(address));
        let Some(device) = device else {
            // No answer: a timeout, retired with its error count spent.
            st.regs.status |= sts::USBERR;
            if ctrl & td::IOC != 0 {
                st.frame_pending |= pending::IOC;
            }
            let ctrl = (ctrl & !(td::ACTIVE | td::ERROR_COUNT)) | td::CRC_TIMEOUT;
            return Ok((TdOutcome::NextQueue, ctrl));
        };
        let mut data = vec![0u8; max_len];
        if pid_code != pid::IN && max_len > 0 {
            mem.read_slice(&mut data, GuestAddress(buffer.into())).map_err(|_| DmaFault)?;
        }
        let result = device.handle_token(pid_code, ep, &mut data);
        let base = ctrl & !(td::STATUS | td::ACTLEN);
        match result {
            TokenResult::Done(n) => {
                let n = n.min(max_len);
                if pid_code == pid::IN && n > 0 {
                    mem.write_slice(&data[..n], GuestAddress(buffer.into())).map_err(|_| DmaFault)?;
                    self.services.dirty_tracker().mark(buffer.into(), n as u64);
                }
                *bytes += n;
                let ctrl = base | ((n as u32).wrapping_sub(1) & td::ACTLEN);
                if ctrl & td::IOC != 0 {
                    st.frame_pending |= pending::IOC;
                }
                if pid_code == pid::IN && n < max_len && ctrl & td::SPD != 0 {
                    // A short packet stops the queue where it is; the driver moves it on.
                    st.frame_pending |= pending::SHORT;
                    return Ok((TdOutcome::NextQueue, ctrl));
                }
                Ok((TdOutcome::Complete, ctrl))
            }
            TokenResult::Nak => Ok((TdOutcome::NextQueue, ctrl | td::NAK)),
            TokenResult::Stall => {
                st.regs.status |= sts::USBERR;
                if ctrl & td::IOC != 0 {
                    st.frame_pending |= pending::IOC;
                }
                let ctrl = (base & !td::ACTIVE) | td::STALL | td::ACTLEN;
                Ok((TdOutcome::NextQueue, ctrl))
            }
        }
    }
}

fn read32(mem: &GuestMemoryMmap, addr: u64) -> Result<u32, DmaFault> {
    mem.read_obj::<u32>(GuestAddress(addr)).map(u32::from_le).map_err(|_| DmaFault)
}

fn write32(services: &MachineServices, mem: &GuestMemoryMmap, addr: u64, val: u32) -> Result<(), DmaFault> {
    mem.write_obj(val.to_le(), GuestAddress(addr)).map_err(|_| DmaFault)?;
    services.dirty_tracker().mark(addr, 4);
    Ok(())
}

impl UsbHostController for Uhci {
    fn attach(&self, i: usize) {
        let mut st = self.state.lock();
        st.regs.ports[i] |= port::CCS | port::CSC;
        self.resume(&mut st);
    }

    fn detach(&self, i: usize) {
        let mut st = self.state.lock();
        let ctrl = &mut st.regs.ports[i];
        if *ctrl & port::PE != 0 {
            *ctrl |= port::PEC;
        }
        *ctrl &= !(port::CCS | port::PE);
        *ctrl |= port::CSC;
        self.resume(&mut st);
    }

    fn wakeup(&self, i: usize) {
        let mut st = self.state.lock();
        if st.regs.ports[i] & port::SUSP != 0 {
            st.regs.ports[i] |= port::RD;
            self.resume(&mut st);
        }
    }
}

/// BAR 4: the registers, 16 bits wide; narrower and wider accesses are made of them.
struct UhciPorts(Arc<Uhci>);

impl MemoryRegionOps for UhciPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let mut value = 0u64;
        let mut word = None;
        for b in 0..u64::from(size.min(8)) {
            let at = offset + b;
            let w = match word {
                Some((a, w)) if a == at & !1 => w,
                _ => {
                    let w = self.0.read(at & !1);
                    word = Some((at & !1, w));
                    w
                }
            };
            value |= u64::from((w >> (8 * (at & 1))) as u8) << (8 * b);
        }
        value
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        // Each register the access touches is written whole, with the bytes the access
        // has and zeros for the rest (QEMU's 2-byte implementation size).
        let end = offset + u64::from(size.min(8));
        let mut at = offset & !1;
        while at < end {
            let mut w = 0u16;
            for half in 0..2 {
                let byte_at = at + half;
                if byte_at >= offset && byte_at < end {
                    w |= u16::from((value >> (8 * (byte_at - offset))) as u8) << (8 * half);
                }
            }
            self.0.write(at, w);
            at += 2;
        }
    }
}

/// QEMU's `UHCIState`: the PCI function and its controller.
#[derive(qom::Object)]
#[qom(name = TYPE_PIIX3_USB_UHCI, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE], implements = [dyn HotplugHandler])]
pub struct Piix3UsbUhci {
    #[parent]
    parent: PciDevice,
    #[property(default = 1280u32, desc = "Bytes a frame moves at most (USB 1.1: 1280)")]
    bandwidth: Prop<u32>,
    #[property(default = 128u32, desc = "Frames caught up at most after the host fell behind")]
    maxframes: Prop<u32>,
    uhci: OnceLock<Arc<Uhci>>,
    handlers: OnceLock<(Arc<AioContext>, AioHandlerId, ChangeHandlerId)>,
}

type_init!(Piix3UsbUhci);

impl DeviceImpl for Piix3UsbUhci {
    const DESCRIPTION: Option<&'static str> = Some("UHCI USB controller of the PIIX3");
    const CATEGORY: DeviceCategory = DeviceCategory::Usb;

    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(u) = self.uhci.get() {
            let mut st = u.state.lock();
            u.reset(&mut st);
            st.bus_master = false;
        }
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some((aio, timer, change)), Ok(services)) = (self.handlers.get(), ctx.machine()) {
            aio.remove_fd(*timer);
            services.vm().remove_change_handler(*change);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        if let Some(u) = self.uhci.get() {
            let st = u.state.lock();
            s.put("regs", &st.regs);
            // Interrupt causes of a frame not yet ended (none while stopped: frames
            // end whole). The next frame's time is the destination's own.
            s.put("frame_pending", st.frame_pending);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.parent.load_pci_state(state)?;
        let mut regs: Registers = state.get("regs")?;
        let frame_pending: u8 = state.get("frame_pending")?;
        if regs.frnum > 0x7ff {
            return Err(VmStateError::BadField {
                field: "regs".into(),
                reason: format!("frame number {:#x} beyond 11 bits", regs.frnum),
            });
        }
        regs.fl_base &= !0xfff;
        regs.intr &= 0x0f;
        regs.status2 &= pending::IOC | pending::SHORT;
        if let Some(u) = self.uhci.get() {
            // The run state first: its lock is held while change handlers take ours.
            let running = u.services.vm().is_running();
            let mut st = u.state.lock();
            st.regs = regs;
            st.frame_pending = frame_pending;
            st.paused = !running;
            if st.running() {
                u.start_frames(&mut st);
            } else {
                let _ = u.timer.disarm();
            }
            u.update_irq(&st);
        }
        self.update_bus_master();
        Ok(())
    }
}

impl Piix3UsbUhci {
    fn update_bus_master(&self) {
        let command = self.parent.read_config(config::COMMAND, 2) as u16;
        if let Some(u) = self.uhci.get() {
            u.state.lock().bus_master = command & config::COMMAND_MASTER != 0;
        }
    }

    /// QEMU's `usb_uhci_common_realize`, for the PIIX3's and the PIIX4's.
    fn uhci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let internal = |e: std::io::Error| RealizeError::device(UhciError::Host(e));
        self.parent.config_set(USB_SBRN, &[0x10]);
        let bus_name = usb_host_bus_name(self.parent.id());
        let ports = UsbPorts::new(NB_PORTS, &bus_name);
        let uhci = Arc::new(Uhci {
            state: Mutex::new(State {
                regs: Registers::default(),
                frame_pending: 0,
                next_frame: Instant::now(),
                paused: !services.vm().is_running(),
                bus_master: false,
            }),
            ports: ports.clone(),
            services: services.clone(),
            intx: self.parent.intx(),
            timer: DeviceTimer::new().map_err(internal)?,
            bandwidth: self.bandwidth.get() as usize,
            maxframes: self.maxframes.get(),
            log: RateLimitedLog::default(),
        });
        let weak: Weak<Uhci> = Arc::downgrade(&uhci);
        ports.set_controller(weak.clone());
        usb_host_bus_new(ctx, services, &bus_name, &ports)?;
        self.register_bar(4, BarKind::Io, MemoryRegion::new_io("uhci", IO_SIZE, Arc::new(UhciPorts(uhci.clone()))))?;
        let aio = services.try_main_context().map_err(internal)?;
        let w = weak.clone();
        let timer = aio
            .add_fd(
                uhci.timer.as_raw_fd(),
                Box::new(move || {
                    if let Some(u) = w.upgrade() {
                        u.frame_timer();
                    }
                }),
            )
            .map_err(internal)?;
        // Frames follow the VM: none while it is stopped (QEMU's virtual clock stops).
        // At a stop this runs before the USB disks wait for their commands (their
        // handlers' priority is lower): no frame starts one after that.
        let change = services.vm().add_change_handler(
            FRAMES_CHANGE_PRIORITY,
            Arc::new(move |running, _| {
                if let Some(u) = weak.upgrade() {
                    let mut st = u.state.lock();
                    st.paused = !running;
                    if st.running() {
                        u.start_frames(&mut st);
                    } else {
                        let _ = u.timer.disarm();
                    }
                }
            }),
        );
        let _ = self.handlers.set((aio, timer, change));
        let _ = self.uhci.set(uhci);
        self.update_bus_master();
        Ok(())
    }
}

impl PciDeviceImpl for Piix3UsbUhci {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x7020;
    const REVISION: u8 = 0x01;
    /// Serial bus controller, USB, UHCI.
    const CLASS_ID: u16 = 0x0c03;
    const INTERRUPT_PIN: u8 = 4;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.uhci_realize(ctx)
    }

    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
        self.update_bus_master();
    }
}

/// QEMU's `usb_device_hotplug`-less USB bus: a device plugged in while the guest runs is
/// connected at once (the port reports it); one unplugged goes at once.
impl HotplugHandler for Piix3UsbUhci {
    fn plug(&self, _dev: &qom::Object, _hotplugged: bool) -> Result<(), HotplugError> {
        Ok(())
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        usb_host_unplug(dev);
        Ok(())
    }
}

/// The PIIX4's UHCI function (8086:7112): the PIIX3's with another ID.
#[derive(qom::Object)]
#[qom(name = TYPE_PIIX4_USB_UHCI, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE], implements = [dyn HotplugHandler])]
pub struct Piix4UsbUhci {
    #[parent]
    parent: Piix3UsbUhci,
}

type_init!(Piix4UsbUhci);

impl DeviceImpl for Piix4UsbUhci {
    const DESCRIPTION: Option<&'static str> = Some("UHCI USB controller of the PIIX4");

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_state(state)
    }
}

impl PciDeviceImpl for Piix4UsbUhci {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x7112;
    const REVISION: u8 = 0x01;
    const CLASS_ID: u16 = 0x0c03;
    const INTERRUPT_PIN: u8 = 4;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.parent.uhci_realize(ctx)
    }

    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
        self.parent.update_bus_master();
    }
}

impl HotplugHandler for Piix4UsbUhci {
    fn plug(&self, dev: &qom::Object, hotplugged: bool) -> Result<(), HotplugError> {
        self.parent.plug(dev, hotplugged)
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        self.parent.unplug_request(dev)
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
enum UhciError {
    #[error("cannot set up the frame timer: {0}")]
    Host(std::io::Error),
}
