//! `qemu-xhci` (QEMU's `hw/usb/hcd-xhci.c` and `hcd-xhci-pci.c`): the USB 3.0 eXtensible
//! Host Controller QEMU offers as 1b36:000d, what libvirt writes for `<controller
//! type='usb' model='qemu-xhci'>` (virt-install's default for modern guests) and what
//! `-device qemu-xhci` adds. `p3` USB 3.0 ports (1..p3) and `p2` USB 2.0 ports after them
//! share the bus's physical ports (`<id>.0`, ports 1..max(p2, p3)); qomvm's devices are
//! full speed and show on the USB 2.0 half.
//!
//! BAR 0 (64-bit, 16 KiB) holds the capability registers (0x0), the operational ones
//! (0x40, ports at 0x440), the runtime ones (0x1000: MFINDEX and the interrupters), the
//! doorbells (0x2000) and the MSI-X table and PBA (0x3000, 0x3800). The command ring and
//! the endpoints' transfer rings are walked on the main loop, never on the vCPU thread
//! that rang the doorbell; events go to the interrupters' event rings, with MSI-X or (the
//! first interrupter) INTx.
//!
//! Rings, contexts and TRBs are guest data: a ring that only links, a context outside
//! RAM, an unknown TRB or a slot out of range gets the error the specification gives, or
//! stops the controller with Host Controller Error, never the VMM.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::core::accel_ops::EventFd;
use crate::core::hotplug::{HotplugError, HotplugHandler};
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::services::MachineServices;
use crate::core::timer::DeviceTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::msix::Msix;
use crate::pci::pci::{config, BarKind, IntxPin, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};
use crate::usb::usb_bus::{
    device_at, pid, usb_host_bus_name, usb_host_bus_new, usb_host_unplug, AttachedDevice, PortGroups, TokenResult, UsbHostController,
    UsbPorts,
};

/// QEMU's `TYPE_QEMU_XHCI`.
pub const TYPE_QEMU_XHCI: &str = "qemu-xhci";

/// QEMU's limits (`XHCI_MAXPORTS_2`, `XHCI_MAXPORTS_3`, `XHCI_MAXSLOTS`, `XHCI_MAXINTRS`).
const MAXPORTS_2: u32 = 15;
const MAXPORTS_3: u32 = 15;
const MAXSLOTS: u32 = 64;
const MAXINTRS: u32 = 16;

/// BAR 0's layout.
const BAR_SIZE: u64 = 0x4000;
const CAP_LENGTH: u64 = 0x40;
const OPER: u64 = 0x40;
const PORT_REGS: u64 = 0x440;
const RUNTIME: u64 = 0x1000;
const DOORBELL: u64 = 0x2000;
const MSIX_TABLE: u64 = 0x3000;
const MSIX_PBA: u64 = 0x3800;
/// Configuration register: serial bus release number (3.0).
const USB_SBRN: usize = 0x60;

/// A TRB's size.
const TRB_SIZE: u64 = 16;
/// Link TRBs followed in a row before a ring is taken as empty (QEMU's `TRB_LINK_LIMIT`).
const TRB_LINK_LIMIT: u32 = 32;
/// TRBs one pass takes from a ring before the others get their turn (the rest on the
/// next pass).
const TRBS_PER_PASS: u32 = 4096;
/// The most data one TD may move.
const MAX_TD_BYTES: u64 = 16 << 20;
/// How often an endpoint whose device had nothing yet (NAK) is asked again: a UHCI
/// frame, so a USB disk whose command runs on its worker answers as soon.
const NAK_POLL: Duration = Duration::from_millis(1);
/// Where the controller's run-state handler runs: above the USB disks' (10), as UHCI's.
const CHANGE_PRIORITY: i32 = 20;

/// USBCMD bits.
mod cmd {
    pub const RS: u32 = 1 << 0;
    pub const HCRST: u32 = 1 << 1;
    pub const INTE: u32 = 1 << 2;
    pub const CSS: u32 = 1 << 8;
    pub const CRS: u32 = 1 << 9;
}

/// USBSTS bits.
mod sts {
    pub const HCH: u32 = 1 << 0;
    pub const HSE: u32 = 1 << 2;
    pub const EINT: u32 = 1 << 3;
    pub const PCD: u32 = 1 << 4;
    pub const SRE: u32 = 1 << 10;
    pub const HCE: u32 = 1 << 12;
}

/// CRCR bits.
mod crcr {
    pub const RCS: u32 = 1 << 0;
    pub const CS: u32 = 1 << 1;
    pub const CA: u32 = 1 << 2;
    pub const CRR: u32 = 1 << 3;
}

/// PORTSC bits.
mod portsc {
    pub const CCS: u32 = 1 << 0;
    pub const PED: u32 = 1 << 1;
    pub const PR: u32 = 1 << 4;
    pub const PLS_SHIFT: u32 = 5;
    pub const PLS: u32 = 0xf << PLS_SHIFT;
    pub const PP: u32 = 1 << 9;
    pub const SPEED_SHIFT: u32 = 10;
    pub const LWS: u32 = 1 << 16;
    pub const CSC: u32 = 1 << 17;
    pub const PEC: u32 = 1 << 18;
    pub const WRC: u32 = 1 << 19;
    pub const OCC: u32 = 1 << 20;
    pub const PRC: u32 = 1 << 21;
    pub const PLC: u32 = 1 << 22;
    pub const CEC: u32 = 1 << 23;
    pub const WCE: u32 = 1 << 25;
    pub const WDE: u32 = 1 << 26;
    pub const WOE: u32 = 1 << 27;
    pub const WPR: u32 = 1 << 31;
    /// The change bits software clears by writing 1.
    pub const CHANGES: u32 = CSC | PEC | WRC | OCC | PRC | PLC | CEC;
}

/// Port link states.
mod pls {
    pub const U0: u32 = 0;
    pub const U3: u32 = 3;
    pub const RXDETECT: u32 = 5;
    pub const POLLING: u32 = 7;
    pub const RESUME: u32 = 15;
}

/// PORTSC speeds.
const SPEED_FULL: u32 = 1;

/// Interrupter bits.
const IMAN_IP: u32 = 1 << 0;
const IMAN_IE: u32 = 1 << 1;
const ERDP_EHB: u64 = 1 << 3;

/// TRB types.
mod trb {
    pub const NORMAL: u32 = 1;
    pub const SETUP: u32 = 2;
    pub const DATA: u32 = 3;
    pub const STATUS: u32 = 4;
    pub const ISOCH: u32 = 5;
    pub const LINK: u32 = 6;
    pub const EVENT_DATA: u32 = 7;
    pub const NOOP: u32 = 8;
    pub const ENABLE_SLOT: u32 = 9;
    pub const DISABLE_SLOT: u32 = 10;
    pub const ADDRESS_DEVICE: u32 = 11;
    pub const CONFIGURE_ENDPOINT: u32 = 12;
    pub const EVALUATE_CONTEXT: u32 = 13;
    pub const RESET_ENDPOINT: u32 = 14;
    pub const STOP_ENDPOINT: u32 = 15;
    pub const SET_TR_DEQUEUE: u32 = 16;
    pub const RESET_DEVICE: u32 = 17;
    pub const GET_PORT_BANDWIDTH: u32 = 21;
    pub const NOOP_COMMAND: u32 = 23;
    pub const TRANSFER_EVENT: u32 = 32;
    pub const COMMAND_COMPLETION: u32 = 33;
    pub const PORT_STATUS_CHANGE: u32 = 34;
    pub const HOST_CONTROLLER: u32 = 37;

    /// Control word bits.
    pub const CYCLE: u32 = 1 << 0;
    /// Link TRB: toggle cycle.
    pub const TC: u32 = 1 << 1;
    /// Event Data TRB in a transfer event.
    pub const ED: u32 = 1 << 2;
    /// Transfer TRBs: interrupt on short packet, chain, interrupt on completion,
    /// immediate data.
    pub const ISP: u32 = 1 << 2;
    pub const CH: u32 = 1 << 4;
    pub const IOC: u32 = 1 << 5;
    pub const IDT: u32 = 1 << 6;
    /// Address Device: block SET_ADDRESS.
    pub const BSR: u32 = 1 << 9;
    /// Configure Endpoint: deconfigure.
    pub const DC: u32 = 1 << 9;

    pub fn ty(control: u32) -> u32 {
        (control >> 10) & 0x3f
    }
}

/// Completion codes.
mod cc {
    pub const SUCCESS: u32 = 1;
    pub const DATA_BUFFER: u32 = 2;
    pub const USB_TRANSACTION: u32 = 4;
    pub const TRB: u32 = 5;
    pub const STALL: u32 = 6;
    pub const NO_SLOTS: u32 = 9;
    pub const SLOT_NOT_ENABLED: u32 = 11;
    pub const EP_NOT_ENABLED: u32 = 12;
    pub const SHORT_PACKET: u32 = 13;
    pub const CONTEXT_STATE: u32 = 19;
    pub const EVENT_RING_FULL: u32 = 21;
    pub const COMMAND_RING_STOPPED: u32 = 24;
    pub const STOPPED: u32 = 26;
}

/// Slot states (slot context dword 3).
mod slot_state {
    pub const ENABLED: u32 = 0;
    pub const DEFAULT: u32 = 1;
    pub const ADDRESSED: u32 = 2;
    pub const CONFIGURED: u32 = 3;
}

/// Endpoint states (endpoint context dword 0).
mod ep_state {
    pub const DISABLED: u32 = 0;
    pub const RUNNING: u32 = 1;
    pub const HALTED: u32 = 2;
    pub const STOPPED: u32 = 3;
}

/// Endpoint types (endpoint context dword 1).
const EP_TYPE_CONTROL: u32 = 4;

/// A DMA access outside guest RAM, or with bus mastering off.
#[derive(Debug)]
struct DmaFault;

/// A TRB as read from a ring.
#[derive(Clone, Copy, Debug)]
struct Trb {
    addr: u64,
    parameter: u64,
    status: u32,
    control: u32,
}

impl Trb {
    fn ty(&self) -> u32 {
        trb::ty(self.control)
    }
}

/// A ring's dequeue side (QEMU's `XHCIRing`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Ring {
    dequeue: u64,
    ccs: bool,
}

/// An interrupter (QEMU's `XHCIInterrupter`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Interrupter {
    iman: u32,
    imod: u32,
    erstsz: u32,
    erstba: u64,
    erdp: u64,
    /// The event ring's one segment, from the segment table.
    er_start: u64,
    er_size: u32,
    /// Where the next event goes, and its cycle bit.
    er_ep_idx: u32,
    er_pcs: bool,
}

impl Interrupter {
    /// QEMU's limits on the event ring segment (16 to 4096 TRBs), none (size 0), and an
    /// enqueue index inside it (a migration stream is checked against this too).
    fn ring_is_sane(&self) -> bool {
        self.er_size == 0
            || ((16..=4096).contains(&self.er_size)
                && self.er_ep_idx < self.er_size
                && self.er_start.checked_add(TRB_SIZE * u64::from(self.er_size)).is_some())
    }
}

/// An endpoint of a slot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Endpoint {
    state: u32,
    ty: u32,
    ring: Ring,
    /// Its TD had nothing to send (NAK): it is asked again on the poll timer.
    nak_pending: bool,
}

/// An enabled device slot (QEMU's `XHCISlot`; a disabled one is `None`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Slot {
    /// The output device context (from the DCBAA when addressed).
    ctx: u64,
    /// The port path of its device ("2", "1.3" behind a hub), once addressed.
    path: Option<String>,
    /// DCI 1..=31.
    eps: Vec<Endpoint>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            ctx: 0,
            path: None,
            eps: vec![Endpoint::default(); 32],
        }
    }
}

/// The guest-visible state, as a migration carries it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Registers {
    usbcmd: u32,
    usbsts: u32,
    dnctrl: u32,
    crcr_low: u32,
    crcr_high: u32,
    dcbaap: u64,
    config: u32,
    cmd_ring: Ring,
    ports: Vec<u32>,
    intrs: Vec<Interrupter>,
    /// Slot `n` at `n - 1`.
    slots: Vec<Option<Slot>>,
    /// MFINDEX when the controller last stopped (microframes).
    mfindex_base: u32,
}

/// The controller's state under its one lock.
struct State {
    regs: Registers,
    /// When MFINDEX counted from `mfindex_base` (while running).
    mfindex_start: Option<Instant>,
    /// Doorbells rung and not yet served: the command ring, and (slot, DCI) pairs.
    command_pending: bool,
    doorbells: BTreeSet<(u32, u32)>,
    /// The VM is stopped: nothing is walked.
    paused: bool,
    bus_master: bool,
}

impl State {
    fn running(&self) -> bool {
        self.regs.usbcmd & cmd::RS != 0 && self.regs.usbsts & sts::HCE == 0
    }
}

/// An event to post.
struct Event {
    parameter: u64,
    status: u32,
    control: u32,
}

/// The controller.
struct Xhci {
    state: Mutex<State>,
    ports: Arc<UsbPorts>,
    services: Arc<MachineServices>,
    intx: Arc<IntxPin>,
    msix: Arc<Msix>,
    numports_2: u32,
    numports_3: u32,
    numslots: u32,
    numintrs: u32,
    /// Wakes the main loop to serve doorbells.
    kick: EventFd,
    /// Asks NAKed interrupt endpoints again.
    poll: DeviceTimer,
    /// The bus's ports, hubs' included, for devices reached by route string.
    groups: OnceLock<PortGroups>,
    log: RateLimitedLog,
}

fn read64(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, DmaFault> {
    mem.read_obj::<u64>(GuestAddress(addr)).map(u64::from_le).map_err(|_| DmaFault)
}

fn read32(mem: &GuestMemoryMmap, addr: u64) -> Result<u32, DmaFault> {
    mem.read_obj::<u32>(GuestAddress(addr)).map(u32::from_le).map_err(|_| DmaFault)
}

impl Xhci {
    fn numports(&self) -> u32 {
        self.numports_2 + self.numports_3
    }

    /// The physical port behind xHCI port `port` (0-based), and whether it is the USB
    /// 3.0 one: `qemu-xhci` numbers its USB 3.0 ports first (QEMU's
    /// `XHCI_FLAG_SS_FIRST`), the USB 2.0 ones after them.
    fn uport_of(&self, port: usize) -> (usize, bool) {
        let p3 = self.numports_3 as usize;
        if port < p3 {
            (port, true)
        } else {
            (port - p3, false)
        }
    }

    /// The xHCI port a device on physical port `uport` shows on: qomvm's devices are full
    /// speed, on the USB 2.0 half (none where there are no USB 2.0 ports for it).
    fn port_of_uport(&self, uport: usize) -> Option<usize> {
        (uport < self.numports_2 as usize).then_some(self.numports_3 as usize + uport)
    }

    fn write32(&self, mem: &GuestMemoryMmap, addr: u64, val: u32) -> Result<(), DmaFault> {
        mem.write_obj(val.to_le(), GuestAddress(addr)).map_err(|_| DmaFault)?;
        self.services.dirty_tracker().mark(addr, 4);
        Ok(())
    }

    fn write_bytes(&self, mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        mem.write_slice(data, GuestAddress(addr)).map_err(|_| DmaFault)?;
        self.services.dirty_tracker().mark(addr, data.len() as u64);
        Ok(())
    }

    /// QEMU's `xhci_die`: the controller stops with Host Controller Error.
    fn die(&self, st: &mut State, why: &str) {
        self.log.warn(|| format!("qemu-xhci: {why}: host controller error"));
        st.regs.usbsts |= sts::HCE;
    }

    // --- Interrupts and events ---

    /// QEMU's `xhci_intr_update` for interrupter 0's INTx and every vector's mask.
    fn intr_update(&self, st: &mut State) {
        let intr = &mut st.regs.intrs[0];
        let level = intr.iman & IMAN_IP != 0 && intr.iman & IMAN_IE != 0 && st.regs.usbcmd & cmd::INTE != 0;
        if self.msix.is_enabled() {
            self.intx.set(false);
            if level {
                self.msix.notify(0);
                st.regs.intrs[0].iman &= !IMAN_IP;
            }
        } else {
            self.intx.set(level);
        }
    }

    /// QEMU's `xhci_intr_raise`.
    fn intr_raise(&self, st: &mut State, v: usize) {
        let usbcmd = st.regs.usbcmd;
        let intr = &mut st.regs.intrs[v];
        let pending = intr.erdp & ERDP_EHB != 0;
        intr.erdp |= ERDP_EHB;
        intr.iman |= IMAN_IP;
        st.regs.usbsts |= sts::EINT;
        if pending || intr.iman & IMAN_IE == 0 || usbcmd & cmd::INTE == 0 {
            return;
        }
        if self.msix.is_enabled() {
            self.msix.notify(v as u16);
            intr.iman &= !IMAN_IP;
        } else if v == 0 {
            self.intx.set(true);
        }
    }

    /// QEMU's `xhci_er_reset`: the event ring from its segment table.
    fn er_reset(&self, st: &mut State, mem: &GuestMemoryMmap, v: usize) {
        let intr = &mut st.regs.intrs[v];
        if intr.erstsz == 0 || intr.erstba == 0 {
            intr.er_start = 0;
            intr.er_size = 0;
            return;
        }
        // QEMU's as well: one segment.
        if intr.erstsz != 1 {
            let n = intr.erstsz;
            self.die(st, &format!("{n} event ring segments (only 1 is supported)"));
            return;
        }
        let entry = intr.erstba;
        let (Ok(base), Ok(size)) = (read64(mem, entry), read32(mem, entry.wrapping_add(8))) else {
            self.die(st, "event ring segment table outside RAM");
            return;
        };
        let intr = &mut st.regs.intrs[v];
        intr.er_start = base & !0x3f;
        intr.er_size = size & 0xffff;
        intr.er_ep_idx = 0;
        intr.er_pcs = true;
        if !intr.ring_is_sane() {
            let (n, at) = (intr.er_size, intr.er_start);
            intr.er_size = 0;
            self.die(st, &format!("event ring segment of {n} TRBs at {at:#x}"));
        }
    }

    fn write_event(&self, st: &mut State, mem: &GuestMemoryMmap, v: usize, ev: &Event) {
        let intr = &st.regs.intrs[v];
        let addr = intr.er_start + TRB_SIZE * u64::from(intr.er_ep_idx);
        let control = (ev.control & !trb::CYCLE) | u32::from(intr.er_pcs);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&ev.parameter.to_le_bytes());
        bytes[8..12].copy_from_slice(&ev.status.to_le_bytes());
        bytes[12..].copy_from_slice(&control.to_le_bytes());
        // The control word (with the cycle bit) last, as hardware makes an event valid.
        if self.write_bytes(mem, addr, &bytes[..12]).and_then(|()| self.write32(mem, addr + 12, control)).is_err() {
            self.die(st, "event ring outside RAM");
            return;
        }
        let intr = &mut st.regs.intrs[v];
        intr.er_ep_idx += 1;
        if intr.er_ep_idx >= intr.er_size {
            intr.er_ep_idx = 0;
            intr.er_pcs = !intr.er_pcs;
        }
    }

    /// QEMU's `xhci_event`: `ev` on interrupter `v`'s ring, unless it is full.
    fn event(&self, st: &mut State, mem: &GuestMemoryMmap, v: usize, ev: Event) {
        // QEMU drops an event for an interrupter it does not have.
        let Some(intr) = st.regs.intrs.get(v) else {
            return;
        };
        if intr.er_size == 0 {
            // No ring to post to (QEMU drops it too).
            return;
        }
        let erdp = intr.erdp & !0xf;
        let end = intr.er_start + TRB_SIZE * u64::from(intr.er_size);
        if erdp < intr.er_start || erdp >= end {
            self.die(st, "event ring dequeue pointer outside the ring");
            return;
        }
        let dp_idx = ((erdp - intr.er_start) / TRB_SIZE) as u32;
        if (intr.er_ep_idx + 2) % intr.er_size == dp_idx {
            let full = Event {
                parameter: 0,
                status: cc::EVENT_RING_FULL << 24,
                control: trb::HOST_CONTROLLER << 10,
            };
            self.write_event(st, mem, v, &full);
        } else if (intr.er_ep_idx + 1) % intr.er_size != dp_idx {
            self.write_event(st, mem, v, &ev);
        }
        self.intr_raise(st, v);
    }

    fn command_completion(&self, st: &mut State, mem: &GuestMemoryMmap, trb_addr: u64, code: u32, slot: u32) {
        let ev = Event {
            parameter: trb_addr,
            status: code << 24,
            control: (trb::COMMAND_COMPLETION << 10) | (slot << 24),
        };
        self.event(st, mem, 0, ev);
    }

    // --- Ports ---

    /// QEMU's `xhci_port_notify`: sets change `bits`, posting a Port Status Change Event
    /// if they were not all set already.
    fn port_notify(&self, st: &mut State, mem: &GuestMemoryMmap, port: usize, bits: u32) {
        if st.regs.ports[port] & bits == bits {
            return;
        }
        st.regs.ports[port] |= bits;
        st.regs.usbsts |= sts::PCD;
        if !st.running() {
            return;
        }
        let ev = Event {
            parameter: ((port as u64) + 1) << 24,
            status: cc::SUCCESS << 24,
            control: trb::PORT_STATUS_CHANGE << 10,
        };
        self.event(st, mem, 0, ev);
    }

    /// QEMU's `xhci_port_update`: connection and speed from the device on the port.
    fn port_update(&self, st: &mut State, mem: &GuestMemoryMmap, port: usize, detach: bool) {
        let (uport, usb3) = self.uport_of(port);
        let attached = !detach && !usb3 && self.ports.device(uport).is_some();
        // QEMU's xhci_port_update starts from PP (and the wake enables): change bits of
        // a device before do not survive.
        let mut sc = portsc::PP | (st.regs.ports[port] & (portsc::WCE | portsc::WDE | portsc::WOE));
        let link = if attached {
            sc |= portsc::CCS | (SPEED_FULL << portsc::SPEED_SHIFT);
            pls::POLLING
        } else {
            pls::RXDETECT
        };
        st.regs.ports[port] = sc | (link << portsc::PLS_SHIFT);
        self.port_notify(st, mem, port, portsc::CSC);
    }

    /// QEMU's `xhci_port_reset`: the device reset, the port enabled in U0.
    fn port_reset(&self, st: &mut State, mem: &GuestMemoryMmap, port: usize) {
        let (uport, usb3) = self.uport_of(port);
        let Some(dev) = (!usb3).then(|| self.ports.device(uport)).flatten() else {
            return;
        };
        dev.reset();
        let sc = &mut st.regs.ports[port];
        *sc = (*sc & !(portsc::PLS | portsc::PR)) | (pls::U0 << portsc::PLS_SHIFT) | portsc::PED;
        self.port_notify(st, mem, port, portsc::PRC);
    }

    fn port_write(&self, st: &mut State, mem: &GuestMemoryMmap, port: usize, reg: u64, val: u32) {
        if reg != 0 {
            // PORTPMSC, PORTLI, PORTHLPMC: nothing to model.
            return;
        }
        if val & (portsc::PR | portsc::WPR) != 0 {
            self.port_reset(st, mem, port);
            return;
        }
        let mut sc = st.regs.ports[port];
        let mut notify = 0;
        sc &= !(val & portsc::CHANGES);
        if val & portsc::LWS != 0 {
            let old = (sc & portsc::PLS) >> portsc::PLS_SHIFT;
            let new = (val & portsc::PLS) >> portsc::PLS_SHIFT;
            match new {
                pls::U0 if old != pls::U0 => {
                    sc = (sc & !portsc::PLS) | (new << portsc::PLS_SHIFT);
                    notify = portsc::PLC;
                }
                pls::U3 if old < pls::U3 => sc = (sc & !portsc::PLS) | (new << portsc::PLS_SHIFT),
                pls::RESUME => {}
                _ => {}
            }
        }
        let rw = portsc::PP | portsc::WCE | portsc::WDE | portsc::WOE;
        sc = (sc & !rw) | (val & rw) | portsc::PP;
        st.regs.ports[port] = sc;
        if notify != 0 {
            self.port_notify(st, mem, port, notify);
        }
    }

    // --- Run state ---

    fn mfindex(&self, st: &State) -> u32 {
        let ticks = st
            .mfindex_start
            .map_or(0, |t| (t.elapsed().as_nanos() / 125_000) as u32);
        st.regs.mfindex_base.wrapping_add(ticks) & 0x3fff
    }

    /// QEMU's `xhci_reset`: registers to their reset values, slots gone, each attached
    /// device seen as newly connected.
    fn reset(&self, st: &mut State, mem: &GuestMemoryMmap) {
        let numports = self.numports() as usize;
        st.regs = Registers::new(numports, self.numintrs as usize, self.numslots as usize);
        st.mfindex_start = None;
        st.command_pending = false;
        st.doorbells.clear();
        let _ = self.poll.disarm();
        for port in 0..numports {
            self.port_update(st, mem, port, false);
        }
        self.intr_update(st);
    }

    fn write_usbcmd(&self, st: &mut State, mem: &GuestMemoryMmap, val: u32) {
        let was = st.regs.usbcmd & cmd::RS != 0;
        if val & cmd::RS != 0 && !was {
            st.regs.usbsts &= !sts::HCH;
            st.mfindex_start = Some(Instant::now());
        } else if val & cmd::RS == 0 && was {
            st.regs.mfindex_base = self.mfindex(st);
            st.mfindex_start = None;
            st.regs.usbsts |= sts::HCH;
            st.regs.crcr_low &= !crcr::CRR;
        }
        if val & cmd::CSS != 0 {
            st.regs.usbsts &= !sts::SRE;
        }
        if val & cmd::CRS != 0 {
            st.regs.usbsts |= sts::SRE;
        }
        st.regs.usbcmd = val & 0xc0f;
        if val & cmd::HCRST != 0 {
            self.reset(st, mem);
            return;
        }
        self.intr_update(st);
        self.kick_if_work(st);
    }

    // --- MMIO ---

    fn read(&self, offset: u64) -> u32 {
        let st = self.state.lock();
        let r = &st.regs;
        match offset {
            0x00 => CAP_LENGTH as u32 | (0x0100 << 16),
            0x04 => (self.numports() << 24) | (self.numintrs << 8) | self.numslots,
            0x08 => 0x0000_000f,
            0x0c => 0,
            // 64-bit addressing; extended capabilities at 0x20 (8 dwords).
            0x10 => 0x0008_0001,
            0x14 => DOORBELL as u32,
            0x18 => RUNTIME as u32,
            0x1c => 0,
            // Supported Protocol capabilities: USB 2.0, then USB 3.0.
            0x20 => 0x0200_0402,
            0x24 => u32::from_le_bytes(*b"USB "),
            0x28 => (self.numports_3 + 1) | (self.numports_2 << 8),
            0x2c => 0,
            0x30 => 0x0300_0002,
            0x34 => u32::from_le_bytes(*b"USB "),
            0x38 => 1 | (self.numports_3 << 8),
            0x3c => 0,
            o if (OPER..OPER + 0x40).contains(&o) => match o - OPER {
                0x00 => r.usbcmd,
                0x04 => r.usbsts,
                0x08 => 1,
                0x14 => r.dnctrl,
                0x18 => r.crcr_low & crcr::CRR,
                0x1c => 0,
                0x30 => r.dcbaap as u32,
                0x34 => (r.dcbaap >> 32) as u32,
                0x38 => r.config,
                _ => 0,
            },
            o if (PORT_REGS..PORT_REGS + 0x10 * u64::from(self.numports())).contains(&o) => {
                let port = ((o - PORT_REGS) / 0x10) as usize;
                match (o - PORT_REGS) % 0x10 {
                    0 => r.ports[port],
                    _ => 0,
                }
            }
            RUNTIME => self.mfindex(&st),
            o if (RUNTIME + 0x20..RUNTIME + 0x20 + 0x20 * u64::from(self.numintrs)).contains(&o) => {
                let v = ((o - RUNTIME - 0x20) / 0x20) as usize;
                let intr = &st.regs.intrs[v];
                match (o - RUNTIME - 0x20) % 0x20 {
                    0x00 => intr.iman,
                    0x04 => intr.imod,
                    0x08 => intr.erstsz,
                    0x10 => intr.erstba as u32,
                    0x14 => (intr.erstba >> 32) as u32,
                    0x18 => intr.erdp as u32,
                    0x1c => (intr.erdp >> 32) as u32,
                    _ => 0,
                }
            }
            // Doorbells read 0.
            _ => 0,
        }
    }

    fn write(&self, offset: u64, val: u32) {
        let mem = self.services.ram();
        let mut st = self.state.lock();
        let st = &mut *st;
        match offset {
            o if (OPER..OPER + 0x40).contains(&o) => match o - OPER {
                0x00 => self.write_usbcmd(st, &mem, val),
                0x04 => {
                    st.regs.usbsts &= !(val & (sts::HSE | sts::EINT | sts::PCD | sts::SRE));
                    self.intr_update(st);
                }
                0x14 => st.regs.dnctrl = val & 0xffff,
                0x18 => st.regs.crcr_low = (val & 0xffff_ffcf) | (st.regs.crcr_low & crcr::CRR),
                0x1c => self.write_crcr_high(st, &mem, val),
                0x30 => st.regs.dcbaap = (st.regs.dcbaap & !0xffff_ffff) | u64::from(val & 0xffff_ffc0),
                0x34 => st.regs.dcbaap = (st.regs.dcbaap & 0xffff_ffff) | (u64::from(val) << 32),
                0x38 => st.regs.config = val & 0xff,
                _ => {}
            },
            o if (PORT_REGS..PORT_REGS + 0x10 * u64::from(self.numports())).contains(&o) => {
                let port = ((o - PORT_REGS) / 0x10) as usize;
                self.port_write(st, &mem, port, (o - PORT_REGS) % 0x10, val);
            }
            o if (RUNTIME + 0x20..RUNTIME + 0x20 + 0x20 * u64::from(self.numintrs)).contains(&o) => {
                let v = ((o - RUNTIME - 0x20) / 0x20) as usize;
                self.write_interrupter(st, &mem, v, (o - RUNTIME - 0x20) % 0x20, val);
            }
            o if (DOORBELL..DOORBELL + 4 * (u64::from(self.numslots) + 1)).contains(&o) => {
                self.doorbell(st, ((o - DOORBELL) / 4) as u32, val);
            }
            _ => {}
        }
    }

    fn write_crcr_high(&self, st: &mut State, mem: &GuestMemoryMmap, val: u32) {
        st.regs.crcr_high = val;
        let low = st.regs.crcr_low;
        if low & (crcr::CA | crcr::CS) != 0 && low & crcr::CRR != 0 {
            st.regs.crcr_low &= !crcr::CRR;
            let dequeue = st.regs.cmd_ring.dequeue;
            self.command_completion(st, mem, dequeue, cc::COMMAND_RING_STOPPED, 0);
        } else if low & crcr::CRR == 0 {
            st.regs.cmd_ring = Ring {
                dequeue: (u64::from(val) << 32) | u64::from(low & !0x3f),
                ccs: low & crcr::RCS != 0,
            };
        }
        st.regs.crcr_low &= !(crcr::CA | crcr::CS);
    }

    fn write_interrupter(&self, st: &mut State, mem: &GuestMemoryMmap, v: usize, reg: u64, val: u32) {
        let intr = &mut st.regs.intrs[v];
        match reg {
            0x00 => {
                if val & IMAN_IP != 0 {
                    intr.iman &= !IMAN_IP;
                }
                intr.iman = (intr.iman & !IMAN_IE) | (val & IMAN_IE);
                if v == 0 {
                    self.intr_update(st);
                }
            }
            0x04 => intr.imod = val,
            0x08 => intr.erstsz = val & 0xffff,
            0x10 => intr.erstba = (intr.erstba & !0xffff_ffff) | u64::from(val & 0xffff_ffc0),
            0x14 => {
                intr.erstba = (intr.erstba & 0xffff_ffff) | (u64::from(val) << 32);
                self.er_reset(st, mem, v);
            }
            0x18 => {
                let ehb = if u64::from(val) & ERDP_EHB != 0 { 0 } else { intr.erdp & ERDP_EHB };
                intr.erdp = (intr.erdp & !0xffff_ffff) | (u64::from(val) & !ERDP_EHB) | ehb;
                if u64::from(val) & ERDP_EHB != 0 {
                    // Events the driver has not consumed yet interrupt again.
                    let erdp = intr.erdp & !0xf;
                    let end = intr.er_start + TRB_SIZE * u64::from(intr.er_size);
                    if erdp >= intr.er_start && erdp < end && ((erdp - intr.er_start) / TRB_SIZE) as u32 != intr.er_ep_idx {
                        self.intr_raise(st, v);
                    }
                }
            }
            0x1c => intr.erdp = (intr.erdp & 0xffff_ffff) | (u64::from(val) << 32),
            _ => {}
        }
    }

    /// A doorbell: 0 the command ring, `n` slot `n`'s endpoint `val & 0xff`. Served on the
    /// main loop.
    fn doorbell(&self, st: &mut State, n: u32, val: u32) {
        log::trace!("qemu-xhci: doorbell {n}: {val:#x}");
        if !st.running() {
            return;
        }
        if n == 0 {
            if val == 0 {
                st.command_pending = true;
                st.regs.crcr_low |= crcr::CRR;
            }
        } else {
            let dci = val & 0xff;
            if (1..=31).contains(&dci) {
                st.doorbells.insert((n, dci));
            }
        }
        let _ = self.kick.write(1);
    }

    fn kick_if_work(&self, st: &State) {
        if st.running() && (st.command_pending || !st.doorbells.is_empty()) {
            let _ = self.kick.write(1);
        }
    }

    // --- Rings ---

    /// The next TRB of `ring`, Link TRBs followed; `None` when the ring is empty (or only
    /// links). The dequeue pointer is left on the TRB returned.
    fn ring_peek(ring: &mut Ring, mem: &GuestMemoryMmap) -> Result<Option<Trb>, DmaFault> {
        for _ in 0..TRB_LINK_LIMIT {
            let addr = ring.dequeue;
            let parameter = read64(mem, addr)?;
            let status = read32(mem, addr + 8)?;
            let control = read32(mem, addr + 12)?;
            if (control & trb::CYCLE != 0) != ring.ccs {
                return Ok(None);
            }
            if trb::ty(control) == trb::LINK {
                ring.dequeue = parameter & !0xf;
                if control & trb::TC != 0 {
                    ring.ccs = !ring.ccs;
                }
                continue;
            }
            return Ok(Some(Trb {
                addr,
                parameter,
                status,
                control,
            }));
        }
        Ok(None)
    }

    /// The TRBs of the TD at `ring`'s dequeue pointer, and the ring after it; `None`
    /// while the TD is incomplete. A TD ends at a TRB without the chain bit, a control TD
    /// at its Status Stage (QEMU's `xhci_ring_chain_length`).
    fn fetch_td(ring: &Ring, mem: &GuestMemoryMmap) -> Result<Option<(Vec<Trb>, Ring)>, DmaFault> {
        let mut r = *ring;
        let mut trbs = Vec::new();
        let mut in_control_td = false;
        loop {
            let Some(t) = Self::ring_peek(&mut r, mem)? else {
                return Ok(None);
            };
            r.dequeue += TRB_SIZE;
            trbs.push(t);
            if trbs.len() as u32 >= TRBS_PER_PASS {
                return Ok(Some((trbs, r)));
            }
            match t.ty() {
                trb::SETUP => in_control_td = true,
                trb::STATUS => in_control_td = false,
                _ => {}
            }
            if !in_control_td && t.control & trb::CH == 0 {
                return Ok(Some((trbs, r)));
            }
        }
    }

    // --- Commands ---

    fn run_commands(&self, st: &mut State, mem: &GuestMemoryMmap) {
        st.command_pending = false;
        for _ in 0..TRBS_PER_PASS {
            if !st.running() || st.regs.crcr_low & crcr::CRR == 0 {
                return;
            }
            let mut ring = st.regs.cmd_ring;
            let t = match Self::ring_peek(&mut ring, mem) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    st.regs.cmd_ring = ring;
                    return;
                }
                Err(DmaFault) => {
                    self.die(st, "command ring outside RAM");
                    return;
                }
            };
            ring.dequeue += TRB_SIZE;
            st.regs.cmd_ring = ring;
            let (code, slot) = self.command(st, mem, &t);
            log::trace!("qemu-xhci: command {} (slot {}): {code}", t.ty(), t.control >> 24);
            self.command_completion(st, mem, t.addr, code, slot);
        }
        // More than a pass's worth: the rest on the next.
        st.command_pending = true;
        let _ = self.kick.write(1);
    }

    /// One command: its completion code and the slot the completion names.
    fn command(&self, st: &mut State, mem: &GuestMemoryMmap, t: &Trb) -> (u32, u32) {
        let slot_id = t.control >> 24;
        let in_range = (1..=self.numslots).contains(&slot_id);
        let enabled = in_range && st.regs.slots[slot_id as usize - 1].is_some();
        let result = match t.ty() {
            trb::ENABLE_SLOT => {
                return match (1..=self.numslots).find(|&n| st.regs.slots[n as usize - 1].is_none()) {
                    Some(n) => {
                        st.regs.slots[n as usize - 1] = Some(Slot::new());
                        (cc::SUCCESS, n)
                    }
                    None => (cc::NO_SLOTS, 0),
                };
            }
            trb::NOOP_COMMAND => Ok(cc::SUCCESS),
            trb::GET_PORT_BANDWIDTH => self.get_port_bandwidth(mem, t.parameter),
            trb::DISABLE_SLOT | trb::ADDRESS_DEVICE | trb::CONFIGURE_ENDPOINT | trb::EVALUATE_CONTEXT
            | trb::RESET_ENDPOINT | trb::STOP_ENDPOINT | trb::SET_TR_DEQUEUE | trb::RESET_DEVICE
                if !in_range =>
            {
                Ok(cc::TRB)
            }
            trb::DISABLE_SLOT | trb::ADDRESS_DEVICE | trb::CONFIGURE_ENDPOINT | trb::EVALUATE_CONTEXT
            | trb::RESET_ENDPOINT | trb::STOP_ENDPOINT | trb::SET_TR_DEQUEUE | trb::RESET_DEVICE
                if !enabled =>
            {
                Ok(cc::SLOT_NOT_ENABLED)
            }
            trb::DISABLE_SLOT => {
                self.disable_slot(st, slot_id);
                Ok(cc::SUCCESS)
            }
            trb::ADDRESS_DEVICE => self.address_device(st, mem, slot_id, t.parameter & !0xf, t.control & trb::BSR != 0),
            trb::CONFIGURE_ENDPOINT => self.configure_endpoint(st, mem, slot_id, t.parameter & !0xf, t.control & trb::DC != 0),
            trb::EVALUATE_CONTEXT => self.evaluate_context(st, mem, slot_id, t.parameter & !0xf),
            trb::RESET_ENDPOINT => self.reset_endpoint(st, mem, slot_id, (t.control >> 16) & 0x1f),
            trb::STOP_ENDPOINT => self.stop_endpoint(st, mem, slot_id, (t.control >> 16) & 0x1f),
            trb::SET_TR_DEQUEUE => self.set_tr_dequeue(st, mem, slot_id, (t.control >> 16) & 0x1f, t.parameter),
            trb::RESET_DEVICE => self.reset_device(st, mem, slot_id),
            other => {
                self.log.warn(|| format!("qemu-xhci: unknown command TRB type {other}"));
                Ok(cc::TRB)
            }
        };
        match result {
            Ok(code) => (code, slot_id),
            Err(DmaFault) => {
                self.log.warn(|| "qemu-xhci: a command's context is outside RAM".to_string());
                (cc::TRB, slot_id)
            }
        }
    }

    /// QEMU's `xhci_get_port_bandwidth`: every port 80% free.
    fn get_port_bandwidth(&self, mem: &GuestMemoryMmap, ctx: u64) -> Result<u32, DmaFault> {
        let mut bw = vec![80u8; self.numports() as usize + 1];
        bw[0] = 0;
        self.write_bytes(mem, ctx & !0xf, &bw)?;
        Ok(cc::SUCCESS)
    }

    fn slot_mut(st: &mut State, slot_id: u32) -> &mut Slot {
        st.regs.slots[slot_id as usize - 1].as_mut().expect("checked enabled")
    }

    fn disable_slot(&self, st: &mut State, slot_id: u32) {
        st.regs.slots[slot_id as usize - 1] = None;
        st.doorbells.retain(|(s, _)| *s != slot_id);
    }

    /// Reads `n` dwords at `addr`.
    fn read_ctx(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Result<Vec<u32>, DmaFault> {
        (0..n as u64).map(|i| read32(mem, addr.wrapping_add(4 * i))).collect()
    }

    fn write_ctx(&self, mem: &GuestMemoryMmap, addr: u64, dwords: &[u32]) -> Result<(), DmaFault> {
        let bytes: Vec<u8> = dwords.iter().flat_map(|d| d.to_le_bytes()).collect();
        self.write_bytes(mem, addr, &bytes)
    }

    /// The port path the slot context names: its root port's, then a hub port for each
    /// tier of the route string (QEMU's `xhci_lookup_uport`).
    fn lookup_path(&self, slot_ctx: &[u32]) -> Option<String> {
        let port = ((slot_ctx[1] >> 16) & 0xff) as usize;
        if port == 0 || port > self.numports() as usize {
            return None;
        }
        let (uport, usb3) = self.uport_of(port - 1);
        if usb3 {
            return None;
        }
        let mut path = (uport + 1).to_string();
        for tier in 0..5 {
            let hub_port = (slot_ctx[0] >> (4 * tier)) & 0xf;
            if hub_port == 0 {
                break;
            }
            path.push_str(&format!(".{hub_port}"));
        }
        Some(path)
    }

    /// The device at port `path` of the controller's bus.
    fn device_at(&self, path: &str) -> Option<Arc<AttachedDevice>> {
        match path.parse::<usize>() {
            Ok(root) => root.checked_sub(1).and_then(|i| self.ports.device(i)),
            Err(_) => device_at(self.groups.get()?, path),
        }
    }

    /// QEMU's `xhci_address_slot`.
    fn address_device(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, input: u64, bsr: bool) -> Result<u32, DmaFault> {
        let dcbaa_entry = st.regs.dcbaap.wrapping_add(8 * u64::from(slot_id));
        let octx = read64(mem, dcbaa_entry)? & !0x3f;
        let ictl = Self::read_ctx(mem, input, 2)?;
        if ictl[0] != 0 || ictl[1] != 0x3 {
            return Ok(cc::TRB);
        }
        let mut slot_ctx = Self::read_ctx(mem, input.wrapping_add(0x20), 8)?;
        let mut ep0_ctx = Self::read_ctx(mem, input.wrapping_add(0x40), 8)?;
        // QEMU's xhci_lookup_uport looks among the ports with a device: an empty one is
        // a TRB error too.
        let Some((path, dev)) = self.lookup_path(&slot_ctx).and_then(|p| Some((p.clone(), self.device_at(&p)?))) else {
            return Ok(cc::TRB);
        };
        // Another slot may not hold the same device.
        let taken = st.regs.slots.iter().enumerate().any(|(i, s)| {
            i as u32 + 1 != slot_id && s.as_ref().is_some_and(|s| s.path.as_deref() == Some(path.as_str()))
        });
        if taken {
            return Ok(cc::TRB);
        }
        // The device in its default state, then SET_ADDRESS (the slot id) unless blocked.
        dev.reset();
        let address = if bsr {
            0
        } else {
            let mut setup = [0x00, 0x05, slot_id as u8, 0, 0, 0, 0, 0];
            if dev.handle_token(pid::SETUP, 0, &mut setup) != TokenResult::Done(8)
                || dev.handle_token(pid::IN, 0, &mut []) != TokenResult::Done(0)
            {
                return Ok(cc::USB_TRANSACTION);
            }
            slot_id
        };
        let state = if bsr { slot_state::DEFAULT } else { slot_state::ADDRESSED };
        slot_ctx[3] = (state << 27) | address;
        ep0_ctx[0] = (ep0_ctx[0] & !0x7) | ep_state::RUNNING;
        self.write_ctx(mem, octx, &slot_ctx)?;
        self.write_ctx(mem, octx.wrapping_add(0x20), &ep0_ctx)?;
        let dequeue = u64::from(ep0_ctx[2]) | (u64::from(ep0_ctx[3]) << 32);
        let slot = Self::slot_mut(st, slot_id);
        slot.ctx = octx;
        slot.path = Some(path);
        slot.eps = vec![Endpoint::default(); 32];
        slot.eps[1] = Endpoint {
            state: ep_state::RUNNING,
            ty: EP_TYPE_CONTROL,
            ring: Ring {
                dequeue: dequeue & !0xf,
                ccs: dequeue & 1 != 0,
            },
            nak_pending: false,
        };
        Ok(cc::SUCCESS)
    }

    /// The slot's state from its output context.
    fn slot_state(mem: &GuestMemoryMmap, slot: &Slot) -> Result<u32, DmaFault> {
        if slot.ctx == 0 {
            return Ok(slot_state::ENABLED);
        }
        Ok((read32(mem, slot.ctx.wrapping_add(12))? >> 27) & 0x1f)
    }

    /// Sets endpoint `dci`'s state in the output context.
    fn set_ep_state(&self, mem: &GuestMemoryMmap, slot: &Slot, dci: u32, state: u32) -> Result<(), DmaFault> {
        let at = slot.ctx.wrapping_add(0x20 * u64::from(dci));
        let dw0 = read32(mem, at)?;
        self.write32(mem, at, (dw0 & !0x7) | state)?;
        // The dequeue pointer the controller stopped at, with its cycle state.
        let ep = &slot.eps[dci as usize];
        let deq = ep.ring.dequeue | u64::from(ep.ring.ccs);
        self.write32(mem, at.wrapping_add(8), deq as u32)?;
        self.write32(mem, at.wrapping_add(12), (deq >> 32) as u32)
    }

    /// QEMU's `xhci_configure_slot`.
    fn configure_endpoint(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, input: u64, dc: bool) -> Result<u32, DmaFault> {
        let slot = Self::slot_mut(st, slot_id).clone();
        if slot.ctx == 0 {
            return Ok(cc::CONTEXT_STATE);
        }
        let octx = slot.ctx;
        let mut slot_ctx = Self::read_ctx(mem, octx, 8)?;
        if dc {
            let s = Self::slot_mut(st, slot_id);
            for dci in 2..32 {
                if s.eps[dci].state != ep_state::DISABLED {
                    s.eps[dci] = Endpoint::default();
                    let at = octx.wrapping_add(0x20 * dci as u64);
                    let dw0 = read32(mem, at)?;
                    self.write32(mem, at, dw0 & !0x7)?;
                }
            }
            slot_ctx[3] = (slot_ctx[3] & !(0x1f << 27)) | (slot_state::ADDRESSED << 27);
            self.write_ctx(mem, octx, &slot_ctx)?;
            return Ok(cc::SUCCESS);
        }
        let ictl = Self::read_ctx(mem, input, 2)?;
        let (drop, add) = (ictl[0], ictl[1]);
        if drop & 0x3 != 0 || add & 0x3 != 0x1 {
            return Ok(cc::TRB);
        }
        if Self::slot_state(mem, &slot)? < slot_state::ADDRESSED {
            return Ok(cc::CONTEXT_STATE);
        }
        let islot = Self::read_ctx(mem, input.wrapping_add(0x20), 8)?;
        for dci in 2..32u32 {
            let bit = 1 << dci;
            if drop & bit != 0 {
                Self::slot_mut(st, slot_id).eps[dci as usize] = Endpoint::default();
                let at = octx.wrapping_add(0x20 * u64::from(dci));
                let dw0 = read32(mem, at)?;
                self.write32(mem, at, dw0 & !0x7)?;
            }
            if add & bit != 0 {
                let mut ep = Self::read_ctx(mem, input.wrapping_add(0x20 * (u64::from(dci) + 1)), 8)?;
                ep[0] = (ep[0] & !0x7) | ep_state::RUNNING;
                self.write_ctx(mem, octx.wrapping_add(0x20 * u64::from(dci)), &ep)?;
                let dequeue = u64::from(ep[2]) | (u64::from(ep[3]) << 32);
                Self::slot_mut(st, slot_id).eps[dci as usize] = Endpoint {
                    state: ep_state::RUNNING,
                    ty: (ep[1] >> 3) & 0x7,
                    ring: Ring {
                        dequeue: dequeue & !0xf,
                        ccs: dequeue & 1 != 0,
                    },
                    nak_pending: false,
                };
            }
        }
        slot_ctx[3] = (slot_ctx[3] & !(0x1f << 27)) | (slot_state::CONFIGURED << 27);
        slot_ctx[0] = (slot_ctx[0] & !(0x1f << 27)) | (islot[0] & (0x1f << 27));
        self.write_ctx(mem, octx, &slot_ctx)?;
        Ok(cc::SUCCESS)
    }

    /// QEMU's `xhci_evaluate_slot`.
    fn evaluate_context(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, input: u64) -> Result<u32, DmaFault> {
        let slot = Self::slot_mut(st, slot_id).clone();
        if slot.ctx == 0 {
            return Ok(cc::CONTEXT_STATE);
        }
        let ictl = Self::read_ctx(mem, input, 2)?;
        if ictl[0] != 0 || ictl[1] & !0x3 != 0 {
            return Ok(cc::TRB);
        }
        if ictl[1] & 0x1 != 0 {
            let islot = Self::read_ctx(mem, input.wrapping_add(0x20), 4)?;
            let mut oslot = Self::read_ctx(mem, slot.ctx, 4)?;
            oslot[1] = (oslot[1] & !0xffff) | (islot[1] & 0xffff);
            oslot[2] = (oslot[2] & !(0x3ff << 22)) | (islot[2] & (0x3ff << 22));
            self.write_ctx(mem, slot.ctx, &oslot)?;
        }
        if ictl[1] & 0x2 != 0 {
            let iep0 = Self::read_ctx(mem, input.wrapping_add(0x40), 2)?;
            let at = slot.ctx.wrapping_add(0x20);
            let dw1 = read32(mem, at.wrapping_add(4))?;
            self.write32(mem, at.wrapping_add(4), (dw1 & 0xffff) | (iep0[1] & 0xffff_0000))?;
        }
        Ok(cc::SUCCESS)
    }

    fn endpoint_checked(st: &mut State, slot_id: u32, dci: u32) -> Result<&mut Endpoint, u32> {
        if !(1..=31).contains(&dci) {
            return Err(cc::TRB);
        }
        let ep = &mut Self::slot_mut(st, slot_id).eps[dci as usize];
        if ep.state == ep_state::DISABLED {
            return Err(cc::EP_NOT_ENABLED);
        }
        Ok(ep)
    }

    /// QEMU's `xhci_reset_ep`: a halted endpoint stops.
    fn reset_endpoint(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, dci: u32) -> Result<u32, DmaFault> {
        match Self::endpoint_checked(st, slot_id, dci) {
            Err(code) => Ok(code),
            Ok(ep) if ep.state != ep_state::HALTED => Ok(cc::CONTEXT_STATE),
            Ok(ep) => {
                ep.state = ep_state::STOPPED;
                ep.nak_pending = false;
                let slot = Self::slot_mut(st, slot_id).clone();
                self.set_ep_state(mem, &slot, dci, ep_state::STOPPED)?;
                Ok(cc::SUCCESS)
            }
        }
    }

    /// QEMU's `xhci_stop_ep`: a TD waiting for data ends with Stopped.
    fn stop_endpoint(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, dci: u32) -> Result<u32, DmaFault> {
        let pending_td = match Self::endpoint_checked(st, slot_id, dci) {
            Err(code) => return Ok(code),
            Ok(ep) => {
                let pending = std::mem::take(&mut ep.nak_pending).then_some(ep.ring);
                ep.state = ep_state::STOPPED;
                pending
            }
        };
        st.doorbells.remove(&(slot_id, dci));
        if let Some(mut ring) = pending_td {
            if let Ok(Some(t)) = Self::ring_peek(&mut ring, mem) {
                let v = (t.status >> 22) as usize;
                let ev = Event {
                    parameter: t.addr,
                    status: (cc::STOPPED << 24) | (t.status & 0x1_ffff),
                    control: (trb::TRANSFER_EVENT << 10) | (dci << 16) | (slot_id << 24),
                };
                self.event(st, mem, v, ev);
            }
        }
        let slot = Self::slot_mut(st, slot_id).clone();
        self.set_ep_state(mem, &slot, dci, ep_state::STOPPED)?;
        Ok(cc::SUCCESS)
    }

    /// QEMU's `xhci_set_ep_dequeue`.
    fn set_tr_dequeue(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, dci: u32, pdequeue: u64) -> Result<u32, DmaFault> {
        match Self::endpoint_checked(st, slot_id, dci) {
            Err(code) => Ok(code),
            Ok(ep) if ep.state != ep_state::STOPPED => Ok(cc::CONTEXT_STATE),
            Ok(ep) => {
                ep.ring = Ring {
                    dequeue: pdequeue & !0xf,
                    ccs: pdequeue & 1 != 0,
                };
                ep.nak_pending = false;
                let state = ep.state;
                let slot = Self::slot_mut(st, slot_id).clone();
                self.set_ep_state(mem, &slot, dci, state)?;
                Ok(cc::SUCCESS)
            }
        }
    }

    /// QEMU's `xhci_reset_slot`: endpoints but the default one disabled, the slot back to
    /// Default.
    fn reset_device(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32) -> Result<u32, DmaFault> {
        let slot = Self::slot_mut(st, slot_id).clone();
        if slot.ctx == 0 {
            return Ok(cc::CONTEXT_STATE);
        }
        let octx = slot.ctx;
        for dci in 2..32u64 {
            let at = octx.wrapping_add(0x20 * dci);
            let dw0 = read32(mem, at)?;
            self.write32(mem, at, dw0 & !0x7)?;
        }
        let mut slot_ctx = Self::read_ctx(mem, octx, 4)?;
        slot_ctx[3] = (slot_ctx[3] & !(0x1f << 27 | 0xff)) | (slot_state::DEFAULT << 27);
        self.write_ctx(mem, octx, &slot_ctx)?;
        let s = Self::slot_mut(st, slot_id);
        for ep in s.eps.iter_mut().skip(2) {
            *ep = Endpoint::default();
        }
        st.doorbells.retain(|(s, dci)| *s != slot_id || *dci == 1);
        Ok(cc::SUCCESS)
    }

    // --- Transfers ---

    /// Serves a doorbell of slot `slot_id`'s endpoint `dci`: its TDs until the ring is
    /// empty, a TD waits for data, or the endpoint halts.
    fn kick_endpoint(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, dci: u32) {
        if !(1..=self.numslots).contains(&slot_id) {
            return;
        }
        let Some(slot) = st.regs.slots[slot_id as usize - 1].as_mut() else {
            return;
        };
        let ep = &mut slot.eps[dci as usize];
        let mut restarted = false;
        match ep.state {
            ep_state::RUNNING => {}
            // Ringing a stopped endpoint's doorbell runs it again.
            ep_state::STOPPED => {
                ep.state = ep_state::RUNNING;
                restarted = true;
            }
            _ => return,
        }
        if ep.state == ep_state::RUNNING && std::mem::take(&mut restarted) {
            let slot = slot.clone();
            if self.set_ep_state(mem, &slot, dci, ep_state::RUNNING).is_err() {
                self.die(st, "device context outside RAM");
                return;
            }
        }
        let slot = st.regs.slots[slot_id as usize - 1].as_ref().expect("present");
        let dev = slot.path.as_deref().and_then(|p| self.device_at(p));
        let mut trbs_left = TRBS_PER_PASS;
        loop {
            let slot = st.regs.slots[slot_id as usize - 1].as_mut().expect("present");
            let ep = &mut slot.eps[dci as usize];
            if ep.state != ep_state::RUNNING {
                return;
            }
            let ring = ep.ring;
            let ty = ep.ty;
            let (trbs, after) = match Self::fetch_td(&ring, mem) {
                Ok(Some(td)) => td,
                Ok(None) => return,
                Err(DmaFault) => {
                    self.die(st, "transfer ring outside RAM");
                    return;
                }
            };
            let count = trbs.len() as u32;
            let outcome = match &dev {
                Some(dev) => self.run_td(mem, dev, dci, ty, &trbs),
                None => TdOutcome::Done { code: cc::USB_TRANSACTION, transferred: 0 },
            };
            log::trace!("qemu-xhci: slot {slot_id} endpoint {dci}: TD of {count} TRBs: {outcome:?}");
            let slot = st.regs.slots[slot_id as usize - 1].as_mut().expect("present");
            let ep = &mut slot.eps[dci as usize];
            match outcome {
                TdOutcome::Nak => {
                    ep.nak_pending = true;
                    if let Err(e) = self.poll.arm(NAK_POLL) {
                        log::error!("qemu-xhci: cannot arm the poll timer: {e}");
                    }
                    return;
                }
                TdOutcome::Done { code, transferred } => {
                    ep.nak_pending = false;
                    ep.ring = after;
                    if code == cc::STALL || code == cc::USB_TRANSACTION || code == cc::TRB {
                        ep.state = ep_state::HALTED;
                    }
                    let halted = ep.state == ep_state::HALTED;
                    self.report(st, mem, slot_id, dci, &trbs, code, transferred);
                    if halted {
                        let slot = st.regs.slots[slot_id as usize - 1].clone().expect("present");
                        if self.set_ep_state(mem, &slot, dci, ep_state::HALTED).is_err() {
                            self.die(st, "device context outside RAM");
                        }
                        return;
                    }
                }
            }
            trbs_left = trbs_left.saturating_sub(count);
            if trbs_left == 0 {
                // The rest on the next pass.
                st.doorbells.insert((slot_id, dci));
                let _ = self.kick.write(1);
                return;
            }
        }
    }

    /// QEMU's `xhci_xfer_report`: a Transfer Event for the first TRB that asks for one
    /// (IOC, or ISP on a short packet, or the one where an error leaves nothing to
    /// account), per stage of a control TD; Event Data TRBs report the bytes moved since
    /// the last one.
    #[allow(clippy::too_many_arguments)]
    fn report(&self, st: &mut State, mem: &GuestMemoryMmap, slot_id: u32, dci: u32, trbs: &[Trb], code: u32, transferred: u64) {
        // Short packets are found here, TRB by TRB.
        let status = if code == cc::SHORT_PACKET { cc::SUCCESS } else { code };
        let mut left = transferred;
        let mut edtla: u64 = 0;
        let mut reported = false;
        let mut short = false;
        for t in trbs {
            let len = u64::from(t.status & 0x1_ffff);
            let mut chunk = 0;
            match t.ty() {
                trb::SETUP => chunk = len.min(8),
                trb::DATA | trb::NORMAL | trb::ISOCH => {
                    chunk = len;
                    if chunk > left {
                        chunk = left;
                        if status == cc::SUCCESS {
                            short = true;
                        }
                    }
                    left -= chunk;
                    edtla += chunk;
                }
                trb::STATUS => {
                    reported = false;
                    short = false;
                }
                _ => {}
            }
            let wants = t.control & trb::IOC != 0
                || (short && t.control & trb::ISP != 0)
                || (status != cc::SUCCESS && left == 0);
            if !reported && wants {
                let this_code = match status {
                    cc::SUCCESS if short => cc::SHORT_PACKET,
                    other => other,
                };
                let (parameter, length, ed) = if t.ty() == trb::EVENT_DATA {
                    let n = edtla as u32 & 0xff_ffff;
                    edtla = 0;
                    (t.parameter, n, trb::ED)
                } else {
                    (t.addr, (len - chunk) as u32, 0)
                };
                let ev = Event {
                    parameter,
                    status: (this_code << 24) | length,
                    control: (trb::TRANSFER_EVENT << 10) | (dci << 16) | (slot_id << 24) | ed,
                };
                self.event(st, mem, ((t.status >> 22) & 0x3ff) as usize, ev);
                reported = true;
                if status != cc::SUCCESS {
                    return;
                }
            }
            if t.ty() == trb::SETUP {
                reported = false;
                short = false;
            }
        }
    }

    /// Runs one TD on `dev`: how it ended, and the bytes moved in its data stage.
    fn run_td(&self, mem: &GuestMemoryMmap, dev: &AttachedDevice, dci: u32, ty: u32, trbs: &[Trb]) -> TdOutcome {
        if dci == 1 || ty == EP_TYPE_CONTROL {
            return self.run_control_td(mem, dev, trbs);
        }
        let ep = (dci / 2) as u8;
        let is_in = dci % 2 == 1;
        let mut buffers = Vec::new();
        for t in trbs {
            match t.ty() {
                trb::NORMAL | trb::ISOCH => buffers.push(*t),
                trb::EVENT_DATA | trb::NOOP => {}
                _ => return TdOutcome::Done { code: cc::TRB, transferred: 0 },
            }
        }
        self.move_data(mem, dev, if is_in { pid::IN } else { pid::OUT }, ep, &buffers)
    }

    /// A control TD: Setup (8 bytes of immediate data), optional Data TRBs, Status.
    fn run_control_td(&self, mem: &GuestMemoryMmap, dev: &AttachedDevice, trbs: &[Trb]) -> TdOutcome {
        let Some(setup) = trbs.first().filter(|t| t.ty() == trb::SETUP) else {
            return TdOutcome::Done { code: cc::TRB, transferred: 0 };
        };
        if setup.control & trb::IDT == 0 || setup.status & 0x1_ffff != 8 {
            return TdOutcome::Done { code: cc::TRB, transferred: 0 };
        }
        let mut packet = setup.parameter.to_le_bytes();
        match dev.handle_token(pid::SETUP, 0, &mut packet) {
            TokenResult::Done(_) => {}
            TokenResult::Stall => return TdOutcome::Done { code: cc::STALL, transferred: 0 },
            TokenResult::Nak => return TdOutcome::Done { code: cc::USB_TRANSACTION, transferred: 0 },
        }
        let data: Vec<Trb> = trbs[1..].iter().filter(|t| matches!(t.ty(), trb::DATA | trb::NORMAL)).copied().collect();
        let is_in = packet[0] & 0x80 != 0;
        let mut transferred = 0;
        if !data.is_empty() {
            match self.move_data(mem, dev, if is_in { pid::IN } else { pid::OUT }, 0, &data) {
                TdOutcome::Done { code: cc::SUCCESS | cc::SHORT_PACKET, transferred: n } => transferred = n,
                TdOutcome::Done { code, transferred } => return TdOutcome::Done { code, transferred },
                TdOutcome::Nak => return TdOutcome::Done { code: cc::USB_TRANSACTION, transferred: 0 },
            }
        }
        // The status stage goes the other way.
        let status_pid = if is_in && !data.is_empty() { pid::OUT } else { pid::IN };
        match dev.handle_token(status_pid, 0, &mut []) {
            TokenResult::Done(_) => TdOutcome::Done { code: cc::SUCCESS, transferred },
            TokenResult::Stall => TdOutcome::Done { code: cc::STALL, transferred },
            TokenResult::Nak => TdOutcome::Done { code: cc::USB_TRANSACTION, transferred },
        }
    }

    /// The data of `trbs` (immediate or in guest buffers) to or from endpoint `ep` in one
    /// token.
    fn move_data(&self, mem: &GuestMemoryMmap, dev: &AttachedDevice, token: u8, ep: u8, trbs: &[Trb]) -> TdOutcome {
        let total: u64 = trbs.iter().map(|t| u64::from(t.status & 0x1_ffff)).sum();
        if total > MAX_TD_BYTES {
            self.log.warn(|| format!("qemu-xhci: a TD of {total} bytes"));
            return TdOutcome::Done { code: cc::TRB, transferred: 0 };
        }
        let mut buf = vec![0u8; total as usize];
        if token == pid::OUT {
            let mut at = 0usize;
            for t in trbs {
                let len = (t.status & 0x1_ffff) as usize;
                if t.control & trb::IDT != 0 {
                    let imm = t.parameter.to_le_bytes();
                    buf[at..at + len.min(8)].copy_from_slice(&imm[..len.min(8)]);
                } else if mem.read_slice(&mut buf[at..at + len], GuestAddress(t.parameter)).is_err() {
                    return TdOutcome::Done { code: cc::DATA_BUFFER, transferred: 0 };
                }
                at += len;
            }
        }
        let n = match dev.handle_token(token, ep, &mut buf) {
            TokenResult::Done(n) => n.min(buf.len()),
            TokenResult::Nak => return TdOutcome::Nak,
            TokenResult::Stall => return TdOutcome::Done { code: cc::STALL, transferred: 0 },
        };
        if token == pid::IN {
            let mut at = 0usize;
            for t in trbs {
                let len = (t.status & 0x1_ffff) as usize;
                let take = len.min(n.saturating_sub(at));
                if take > 0 && self.write_bytes(mem, t.parameter, &buf[at..at + take]).is_err() {
                    return TdOutcome::Done { code: cc::DATA_BUFFER, transferred: at as u64 };
                }
                at += len;
            }
        }
        let code = if (n as u64) < total { cc::SHORT_PACKET } else { cc::SUCCESS };
        TdOutcome::Done { code, transferred: n as u64 }
    }

    /// The main loop's turn: the command ring, then the endpoints whose doorbells rang.
    fn serve(&self) {
        let _ = self.kick.read();
        let mem = self.services.ram();
        let mut st = self.state.lock();
        if st.paused || !st.bus_master || !st.running() {
            return;
        }
        if st.command_pending {
            self.run_commands(&mut st, &mem);
        }
        let rung = std::mem::take(&mut st.doorbells);
        for (slot_id, dci) in rung {
            self.kick_endpoint(&mut st, &mem, slot_id, dci);
        }
    }

    /// The poll timer: endpoints whose TD had nothing to send are asked again.
    fn poll_naks(&self) {
        if !self.poll.take_expired() {
            return;
        }
        let mem = self.services.ram();
        let mut st = self.state.lock();
        if st.paused || !st.bus_master || !st.running() {
            return;
        }
        let waiting: Vec<(u32, u32)> = st
            .regs
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i as u32 + 1, s.as_ref()?)))
            .flat_map(|(id, s)| s.eps.iter().enumerate().filter(|(_, e)| e.nak_pending).map(move |(dci, _)| (id, dci as u32)))
            .collect();
        for (slot_id, dci) in waiting {
            self.kick_endpoint(&mut st, &mem, slot_id, dci);
        }
    }
}

/// How a TD went.
#[derive(Debug)]
enum TdOutcome {
    /// The device had nothing to send: the TD waits.
    Nak,
    /// Ended with a completion code, so many bytes moved in its data stage.
    Done { code: u32, transferred: u64 },
}

impl Registers {
    fn new(numports: usize, numintrs: usize, numslots: usize) -> Registers {
        Registers {
            usbcmd: 0,
            usbsts: sts::HCH,
            dnctrl: 0,
            crcr_low: 0,
            crcr_high: 0,
            dcbaap: 0,
            config: 0,
            cmd_ring: Ring::default(),
            ports: vec![portsc::PP | (pls::RXDETECT << portsc::PLS_SHIFT); numports],
            intrs: vec![Interrupter::default(); numintrs],
            slots: vec![None; numslots],
            mfindex_base: 0,
        }
    }
}

impl UsbHostController for Xhci {
    fn attach(&self, uport: usize) {
        let mem = self.services.ram();
        let mut st = self.state.lock();
        if let Some(port) = self.port_of_uport(uport) {
            self.port_update(&mut st, &mem, port, false);
        }
    }

    fn detach(&self, uport: usize) {
        let mem = self.services.ram();
        let mut st = self.state.lock();
        // Slots of the device (and of those behind it, a hub's) stay until the driver
        // disables them; their transfers fail.
        let root = (uport + 1).to_string();
        let below = format!("{root}.");
        for slot in st.regs.slots.iter_mut().flatten() {
            if slot.path.as_deref().is_some_and(|p| p == root || p.starts_with(&below)) {
                slot.path = None;
                for ep in &mut slot.eps {
                    ep.nak_pending = false;
                }
            }
        }
        if let Some(port) = self.port_of_uport(uport) {
            self.port_update(&mut st, &mem, port, true);
        }
    }

    /// A device with something to say: endpoints waiting for it are asked now.
    fn wakeup(&self, _uport: usize) {
        if self.state.lock().running() {
            let _ = self.poll.arm(Duration::from_micros(1));
        }
    }
}

/// BAR 0: registers of 32 bits (64-bit accesses are two, low first); the MSI-X table
/// and PBA at its end.
struct XhciBar {
    xhci: Arc<Xhci>,
    msix: Arc<dyn MemoryRegionOps>,
}

impl MemoryRegionOps for XhciBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        if offset >= MSIX_TABLE {
            return self.msix.read(offset - MSIX_TABLE, size);
        }
        let dword = u64::from(self.xhci.read(offset & !3));
        match size {
            8 if offset.is_multiple_of(4) => dword | (u64::from(self.xhci.read(offset + 4)) << 32),
            _ => {
                let shift = 8 * (offset & 3);
                let mask = if size >= 4 { u64::MAX } else { (1u64 << (8 * size)) - 1 };
                (dword >> shift) & mask
            }
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if offset >= MSIX_TABLE {
            self.msix.write(offset - MSIX_TABLE, value, size);
            return;
        }
        match (size, offset % 4) {
            (4, 0) => self.xhci.write(offset, value as u32),
            (8, 0) => {
                self.xhci.write(offset, value as u32);
                self.xhci.write(offset + 4, (value >> 32) as u32);
            }
            _ => self
                .xhci
                .log
                .warn(|| format!("qemu-xhci: {size}-byte write at {offset:#x} ignored (registers are 32 bits)")),
        }
    }
}

/// QEMU's `XHCIPciState` with `qemu-xhci`'s properties.
#[derive(qom::Object)]
#[qom(name = TYPE_QEMU_XHCI, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE], implements = [dyn HotplugHandler])]
pub struct QemuXhci {
    #[parent]
    parent: PciDevice,
    #[property(default = 4u32, desc = "USB 2.0 ports (at most 15)")]
    p2: Prop<u32>,
    #[property(default = 4u32, desc = "USB 3.0 ports (at most 15)")]
    p3: Prop<u32>,
    xhci: OnceLock<Arc<Xhci>>,
    handlers: OnceLock<(Arc<AioContext>, [AioHandlerId; 2], ChangeHandlerId)>,
}

type_init!(QemuXhci);

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
enum XhciError {
    #[error("cannot set up the controller's notifiers: {0}")]
    Host(std::io::Error),
}

impl DeviceImpl for QemuXhci {
    const DESCRIPTION: Option<&'static str> = Some("QEMU's xHCI (USB 3.0) controller");
    const CATEGORY: DeviceCategory = DeviceCategory::Usb;

    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(x) = self.xhci.get() {
            let mem = x.services.ram();
            let mut st = x.state.lock();
            x.reset(&mut st, &mem);
            st.bus_master = false;
            x.msix.reset();
        }
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some((aio, fds, change)), Ok(services)) = (self.handlers.get(), ctx.machine()) {
            for fd in fds {
                aio.remove_fd(*fd);
            }
            services.vm().remove_change_handler(*change);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        if let Some(x) = self.xhci.get() {
            x.msix.save_state(&mut s);
            let mut st = x.state.lock();
            // MFINDEX as it stands; the destination counts on from it.
            st.regs.mfindex_base = x.mfindex(&st);
            if st.mfindex_start.is_some() {
                st.mfindex_start = Some(Instant::now());
            }
            s.put("regs", &st.regs);
            s.put("command_pending", st.command_pending);
            s.put("doorbells", &st.doorbells);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let x = self
            .xhci
            .get()
            .ok_or_else(|| VmStateError::Host(format!("{TYPE_QEMU_XHCI} is not realized")))?;
        let regs: Registers = state.get("regs")?;
        let bad = |reason: String| VmStateError::BadField {
            field: "regs".into(),
            reason,
        };
        if regs.ports.len() != x.numports() as usize
            || regs.intrs.len() != x.numintrs as usize
            || regs.slots.len() != x.numslots as usize
        {
            return Err(VmStateError::Mismatch(format!(
                "{TYPE_QEMU_XHCI}: {} ports, {} interrupters and {} slots in the stream, {}, {} and {} here",
                regs.ports.len(),
                regs.intrs.len(),
                regs.slots.len(),
                x.numports(),
                x.numintrs,
                x.numslots
            )));
        }
        if let Some(v) = regs.intrs.iter().position(|i| !i.ring_is_sane()) {
            return Err(bad(format!("interrupter {v}'s event ring")));
        }
        for slot in regs.slots.iter().flatten() {
            let idle = |e: &Endpoint| e.state == ep_state::DISABLED && !e.nak_pending;
            if slot.eps.len() != 32 || !idle(&slot.eps[0]) || (slot.ctx == 0 && !slot.eps.iter().all(idle)) {
                return Err(bad("a slot's endpoints".into()));
            }
        }
        let command_pending: bool = state.get("command_pending")?;
        let doorbells: BTreeSet<(u32, u32)> = state.get("doorbells")?;
        if doorbells.iter().any(|&(s, d)| !(1..=x.numslots).contains(&s) || !(1..=31).contains(&d)) {
            return Err(bad("a doorbell of no slot".into()));
        }
        self.parent.load_pci_state(state)?;
        x.msix.load_state(state)?;
        let running = x.services.vm().is_running();
        let mut st = x.state.lock();
        st.mfindex_start = (regs.usbcmd & cmd::RS != 0).then(Instant::now);
        st.regs = regs;
        st.command_pending = command_pending;
        st.doorbells = doorbells;
        st.paused = !running;
        x.intr_update(&mut st);
        drop(st);
        self.update_bus_master();
        Ok(())
    }
}

impl QemuXhci {
    fn update_bus_master(&self) {
        let command = self.parent.read_config(config::COMMAND, 2) as u16;
        if let Some(x) = self.xhci.get() {
            let mut st = x.state.lock();
            st.bus_master = command & config::COMMAND_MASTER != 0;
            x.kick_if_work(&st);
            // Endpoints that were waiting for data when bus mastering went off.
            if st.bus_master {
                let _ = x.poll.arm(NAK_POLL);
            }
        }
    }

    /// QEMU's `usb_xhci_realize` and `usb_xhci_pci_realize`.
    fn xhci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let internal = |e: std::io::Error| RealizeError::device(XhciError::Host(e));
        // QEMU's usb_xhci_init: the sizes clamped to its limits, interrupters a power of two.
        // `qemu-xhci` has QEMU's maximums (`intrs` and `slots` are `nec-usb-xhci`'s).
        let (numintrs, numslots) = (MAXINTRS, MAXSLOTS);
        let numports_2 = self.p2.get().min(MAXPORTS_2);
        let numports_3 = self.p3.get().min(MAXPORTS_3);
        self.parent.config_set(USB_SBRN, &[0x30]);
        let bus_name = usb_host_bus_name(self.parent.id());
        let ports = UsbPorts::new(numports_2.max(numports_3).max(1) as usize, &bus_name);
        // The MSI-X capability where QEMU's `usb_xhci_pci_realize` puts it.
        self.parent.place_next_capability_at(0x90);
        let (msix, msix_ops) = Msix::init(&self.parent, numintrs as u16, 0, MSIX_TABLE, MSIX_PBA, services)?;
        let xhci = Arc::new(Xhci {
            state: Mutex::new(State {
                regs: Registers::new((numports_2 + numports_3) as usize, numintrs as usize, numslots as usize),
                mfindex_start: None,
                command_pending: false,
                doorbells: BTreeSet::new(),
                paused: !services.vm().is_running(),
                bus_master: false,
            }),
            ports: ports.clone(),
            services: services.clone(),
            intx: self.parent.intx(),
            msix,
            numports_2,
            numports_3,
            numslots,
            numintrs,
            kick: EventFd::new(libc::EFD_NONBLOCK).map_err(internal)?,
            poll: DeviceTimer::new().map_err(internal)?,
            groups: OnceLock::new(),
            log: RateLimitedLog::default(),
        });
        let weak: Weak<Xhci> = Arc::downgrade(&xhci);
        ports.set_controller(weak.clone());
        let _ = xhci.groups.set(usb_host_bus_new(ctx, services, &bus_name, &ports)?);
        let bar = XhciBar {
            xhci: xhci.clone(),
            msix: msix_ops,
        };
        self.register_bar(0, BarKind::Mem64, MemoryRegion::new_io("xhci", BAR_SIZE, Arc::new(bar)))?;
        let aio = services.try_main_context().map_err(internal)?;
        let w = weak.clone();
        let kick = aio
            .add_fd(
                xhci.kick.as_raw_fd(),
                Box::new(move || {
                    if let Some(x) = w.upgrade() {
                        x.serve();
                    }
                }),
            )
            .map_err(internal)?;
        let w = weak.clone();
        let poll = aio
            .add_fd(
                xhci.poll.as_raw_fd(),
                Box::new(move || {
                    if let Some(x) = w.upgrade() {
                        x.poll_naks();
                    }
                }),
            )
            .map_err(internal)?;
        // Nothing is walked while the VM is stopped; what was rung meanwhile is served
        // when it runs again.
        let change = services.vm().add_change_handler(
            CHANGE_PRIORITY,
            Arc::new(move |running, _| {
                if let Some(x) = weak.upgrade() {
                    let mut st = x.state.lock();
                    st.paused = !running;
                    if running {
                        x.kick_if_work(&st);
                        let _ = x.poll.arm(NAK_POLL);
                    }
                }
            }),
        );
        let _ = self.handlers.set((aio, [kick, poll], change));
        {
            let mem = services.ram();
            let mut st = xhci.state.lock();
            for port in 0..(numports_2 + numports_3) as usize {
                xhci.port_update(&mut st, &mem, port, false);
            }
            // Connections found at realize are not changes yet.
            for sc in st.regs.ports.iter_mut() {
                *sc &= !portsc::CSC;
            }
            st.regs.usbsts &= !sts::PCD;
        }
        let _ = self.xhci.set(xhci);
        self.update_bus_master();
        Ok(())
    }
}

impl PciDeviceImpl for QemuXhci {
    const VENDOR_ID: u16 = 0x1b36;
    const DEVICE_ID: u16 = 0x000d;
    const REVISION: u8 = 0x01;
    /// Serial bus controller, USB (class 0c03).
    const CLASS_ID: u16 = 0x0c03;
    /// xHCI.
    const PROG_IF: u8 = 0x30;
    const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
    const SUBSYSTEM_ID: u16 = 0x1100;
    const INTERRUPT_PIN: u8 = 1;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.xhci_realize(ctx)
    }

    fn config_write(&self, addr: usize, val: u32, len: usize) {
        if let Some(x) = self.xhci.get() {
            x.msix.config_write(addr, val, len);
            let mut st = x.state.lock();
            x.intr_update(&mut st);
        }
        self.update_bus_master();
    }
}

/// USB devices come and go at once, as on the UHCI's bus.
impl HotplugHandler for QemuXhci {
    fn plug(&self, _dev: &qom::Object, _hotplugged: bool) -> Result<(), HotplugError> {
        Ok(())
    }

    fn unplug_request(&self, dev: &qom::Object) -> Result<(), HotplugError> {
        usb_host_unplug(dev);
        Ok(())
    }
}
