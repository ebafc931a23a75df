//! `rtl8139` (QEMU's `hw/net/rtl8139.c`): the Realtek RTL8139C+ Fast Ethernet controller,
//! the card libvirt gives a `pc` guest whose `<interface>` names no model, and one that
//! old images and installers have a driver for.
//!
//! The card is 256 bytes of registers (BAR 0 as I/O ports, BAR 1 as memory), a 93C46
//! EEPROM holding the MAC address, and two ways to move frames that drivers choose
//! between: the RTL8139's own (four transmit buffers, and one receive ring buffer that
//! frames are copied into one after another, as Linux's `8139too` and Windows use it), and
//! the C+ mode of the 8139C+ (descriptor rings, checksum offload, large send and VLAN tags,
//! as Linux's `8139cp` uses it). Frames move on the main loop, never on a vCPU thread: a
//! guest's transmit request or a freed receive buffer only kicks the loop. Checksums and
//! large sends are done here, in software, so any backend carries the frames.
//!
//! A guest that programs nonsense (buffers outside RAM, sizes past the buffers, rings
//! without an end) gets its frames dropped and a rate-limited log line, never a panic or a
//! stuck loop: each pass walks a bounded number of descriptors.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use net::Netdev;
use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::core::iothread::Interest;
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::services::MachineServices;
use crate::core::timer::VirtualTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::net::nic::{CardLoop, LoopCard, self, checksum_add, ether_crc, fold_checksum, parse_mac, HeldFrames, Nic, NicBackend, NicBackendError};
use crate::pci::pci::{config, BarKind, IntxPin, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_RTL8139`.
pub const TYPE_RTL8139: &str = "rtl8139";

/// Both BARs: 256 bytes of registers.
const REGS_SIZE: u64 = 0x100;
/// The revision of an 8139C+ (also read back at `PCIRevisionID`).
const PCI_REVISION: u8 = 0x20;
/// The PCI clock the timer counts (33 MHz).
const PCI_FREQUENCY: u64 = 33_000_000;
/// The C+ transmitter assembles frames of at most this many bytes (QEMU's
/// `CP_TX_BUFFER_SIZE`).
const CP_TX_BUFFER: usize = 65536;
/// A C+ ring has at most 64 descriptors.
const CP_RING_MAX: u32 = 64;
/// Ethernet's minimum frame without FCS.
const MIN_FRAME: usize = 60;
/// The largest frame taken from a backend (a 64 KiB frame a host handed over whole).
const RX_BUF: usize = 65536 + 64;
/// Frames taken from the backend in one pass of the loop, so a flood cannot hold it.
const RX_BURST: usize = 256;
/// Bytes of frames a blocked backend may hold back before more are dropped (a large send
/// makes up to 64 KiB / MSS frames at once).
const TX_HELD_MAX_BYTES: usize = 4 << 20;
/// Frames one pass may send (a large send with a tiny MSS makes thousands).
const TX_PASS_FRAMES: usize = 4096;
/// Segments one large send may make: 64 KiB at an MSS of 88 (Linux's smallest) is 745.
const MAX_SEGMENTS: usize = 2048;

/// Register offsets (Realtek's names, as QEMU's and Linux's drivers use them).
mod reg {
    pub const MAC0: usize = 0x00;
    pub const MAR0: usize = 0x08;
    pub const TX_STATUS0: usize = 0x10;
    pub const TX_ADDR0: usize = 0x20;
    pub const RX_BUF: usize = 0x30;
    pub const CHIP_CMD: usize = 0x37;
    pub const RX_BUF_PTR: usize = 0x38;
    pub const RX_BUF_ADDR: usize = 0x3a;
    pub const INTR_MASK: usize = 0x3c;
    pub const INTR_STATUS: usize = 0x3e;
    pub const TX_CONFIG: usize = 0x40;
    pub const RX_CONFIG: usize = 0x44;
    pub const TIMER: usize = 0x48;
    pub const RX_MISSED: usize = 0x4c;
    pub const CFG9346: usize = 0x50;
    pub const CONFIG0: usize = 0x51;
    pub const CONFIG1: usize = 0x52;
    pub const TIMER_INT: usize = 0x54;
    pub const MEDIA_STATUS: usize = 0x58;
    pub const CONFIG3: usize = 0x59;
    pub const CONFIG4: usize = 0x5a;
    pub const HLT_CLK: usize = 0x5b;
    pub const MULTI_INTR: usize = 0x5c;
    pub const PCI_REVISION_ID: usize = 0x5e;
    pub const TX_SUMMARY: usize = 0x60;
    pub const BASIC_MODE_CTRL: usize = 0x62;
    pub const BASIC_MODE_STATUS: usize = 0x64;
    pub const NWAY_ADVERT: usize = 0x66;
    pub const NWAY_LPAR: usize = 0x68;
    pub const NWAY_EXPANSION: usize = 0x6a;
    pub const CSCR: usize = 0x74;
    pub const CONFIG5: usize = 0xd8;
    pub const TX_POLL: usize = 0xd9;
    pub const RX_MAX_SIZE: usize = 0xda;
    pub const CP_CMD: usize = 0xe0;
    pub const INTR_MITIGATE: usize = 0xe2;
    pub const RX_RING_ADDR_LO: usize = 0xe4;
    pub const RX_RING_ADDR_HI: usize = 0xe8;
    pub const TX_THRESH: usize = 0xec;
}

/// Register bits.
mod bits {
    // ChipCmd.
    pub const CMD_RESET: u8 = 0x10;
    pub const CMD_RX_ENB: u8 = 0x08;
    pub const CMD_TX_ENB: u8 = 0x04;
    pub const RX_BUF_EMPTY: u8 = 0x01;
    // IntrStatus / IntrMask.
    pub const PCS_TIMEOUT: u16 = 0x4000;
    /// "RxUnderrun" on the 8139, the link change on the 8139C+.
    pub const LINK_CHANGE: u16 = 0x20;
    /// No room in the receive buffer (C+: no receive descriptor).
    pub const RX_OVERFLOW: u16 = 0x10;
    pub const TX_OK: u16 = 0x04;
    pub const RX_OK: u16 = 0x01;
    // TxStatus.
    pub const TX_HOST_OWNS: u32 = 0x2000;
    pub const TX_UNDERRUN: u32 = 0x4000;
    pub const TX_STAT_OK: u32 = 0x8000;
    pub const TX_ABORTED: u32 = 0x4000_0000;
    /// TxConfig: the hardware version of an RTL8139C+ (Linux's `HW_REVID(1,1,1,0,1,1,0)`).
    pub const TX_CONFIG_VERSION: u32 = 0x7480_0000;
    /// TxConfig's loopback mode bits.
    pub const TX_LOOPBACK: u32 = 0x0006_0000;
    // RxConfig.
    pub const ACCEPT_ALL_PHYS: u32 = 0x01;
    pub const ACCEPT_MY_PHYS: u32 = 0x02;
    pub const ACCEPT_MULTICAST: u32 = 0x04;
    pub const ACCEPT_BROADCAST: u32 = 0x08;
    /// Frames may run past the end of the receive buffer instead of wrapping.
    pub const RX_NO_WRAP: u32 = 0x80;
    // The receive packet header.
    pub const RX_MULTICAST: u32 = 0x8000;
    pub const RX_PHYSICAL: u32 = 0x4000;
    pub const RX_BROADCAST: u32 = 0x2000;
    pub const RX_STATUS_OK: u32 = 0x0001;
    // CpCmd.
    pub const CPLUS_RX_VLAN: u16 = 0x0040;
    pub const CPLUS_RX_ENB: u16 = 0x0002;
    pub const CPLUS_TX_ENB: u16 = 0x0001;
    // Cfg9346's operating modes.
    pub const CFG9346_MODE: u8 = 0xc0;
    pub const CFG9346_PROGRAM: u8 = 0x80;
    pub const CFG9346_AUTOLOAD: u8 = 0x40;
    pub const CFG9346_CONFIG_WRITE: u8 = 0xc0;
    pub const EE_CS: u8 = 0x08;
    pub const EE_SK: u8 = 0x04;
    pub const EE_DI: u8 = 0x02;
    pub const EE_DO: u8 = 0x01;
    // C+ descriptors (first and second words).
    pub const DESC_OWN: u32 = 1 << 31;
    pub const DESC_EOR: u32 = 1 << 30;
    pub const DESC_FS: u32 = 1 << 29;
    pub const DESC_LS: u32 = 1 << 28;
    pub const TX_LGSEN: u32 = 1 << 27;
    pub const TX_IPCS: u32 = 1 << 18;
    pub const TX_UDPCS: u32 = 1 << 17;
    pub const TX_TCPCS: u32 = 1 << 16;
    /// The error bits a transmit descriptor's status clears (UNF, TES, OWC, LNKF, EXC).
    pub const TX_STATUS_ERRORS: u32 = (1 << 25) | (1 << 23) | (1 << 22) | (1 << 21) | (1 << 20);
    pub const TX_TAGC: u32 = 1 << 17;
    pub const RX_MAR: u32 = 1 << 26;
    pub const RX_PAM: u32 = 1 << 25;
    pub const RX_BAR: u32 = 1 << 24;
    pub const RX_TAVA: u32 = 1 << 16;
}

/// QEMU's `SET_MASKED`: the bits in `mask` keep `current`'s value.
fn set_masked(input: u32, mask: u32, current: u32) -> u32 {
    (input & !mask) | (current & mask)
}

/// The 93C46 EEPROM's place in a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum EepromPhase {
    /// Selected, waiting for the start bit.
    #[default]
    Idle,
    /// Taking the opcode and address.
    Command,
    /// Shifting words out.
    Reading,
    /// Taking a word to write (`all`: every word).
    Writing { all: bool },
}

/// A 93C46 (64 words of 16 bits) behind Cfg9346's pins (QEMU's `prom9346`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Eeprom {
    contents: Vec<u16>,
    phase: EepromPhase,
    /// Bits shifted in or out in this phase.
    tick: u8,
    address: u8,
    input: u16,
    /// The word being shifted out, most significant bit first.
    output: u16,
    write_enabled: bool,
    cs: bool,
    sk: bool,
    /// The data-out pin.
    dout: bool,
}

impl Eeprom {
    fn new(mac: &[u8; 6]) -> Self {
        let mut contents = vec![0u16; 64];
        contents[0] = 0x8129;
        contents[1] = 0x10ec;
        contents[2] = 0x8139;
        for (i, pair) in mac.chunks(2).enumerate() {
            contents[7 + i] = u16::from_le_bytes([pair[0], pair[1]]);
        }
        Eeprom {
            contents,
            ..Eeprom::default()
        }
    }

    /// The guest drove the pins: a rising clock with the chip selected moves a bit.
    fn set_pins(&mut self, cs: bool, sk: bool, di: bool) {
        if !cs {
            self.phase = EepromPhase::Idle;
            self.cs = false;
            self.sk = sk;
            return;
        }
        if !self.cs {
            self.phase = EepromPhase::Idle;
            self.tick = 0;
        }
        let rising = sk && !self.sk;
        self.cs = true;
        self.sk = sk;
        if !rising {
            return;
        }
        match self.phase {
            EepromPhase::Idle => {
                if di {
                    self.phase = EepromPhase::Command;
                    self.input = 0;
                    self.tick = 0;
                }
            }
            EepromPhase::Command => {
                self.input = (self.input << 1) | u16::from(di);
                self.tick += 1;
                if self.tick >= 8 {
                    self.decode();
                }
            }
            EepromPhase::Reading => {
                self.dout = self.output & 0x8000 != 0;
                self.output <<= 1;
                self.tick += 1;
                if self.tick >= 16 {
                    self.address = (self.address + 1) & 0x3f;
                    self.output = self.contents[usize::from(self.address)];
                    self.tick = 0;
                }
            }
            EepromPhase::Writing { all } => {
                self.input = (self.input << 1) | u16::from(di);
                self.tick += 1;
                if self.tick >= 16 {
                    if self.write_enabled {
                        if all {
                            self.contents.fill(self.input);
                        } else {
                            self.contents[usize::from(self.address)] = self.input;
                        }
                    }
                    // Ready at once.
                    self.dout = true;
                    self.phase = EepromPhase::Idle;
                }
            }
        }
    }

    /// A command's two opcode bits and six address bits are in.
    fn decode(&mut self) {
        let address = (self.input & 0x3f) as u8;
        self.tick = 0;
        self.phase = EepromPhase::Idle;
        match self.input >> 6 & 3 {
            0b10 => {
                self.address = address;
                self.output = self.contents[usize::from(address)];
                // The dummy zero before the data.
                self.dout = false;
                self.phase = EepromPhase::Reading;
            }
            0b01 => {
                self.address = address;
                self.input = 0;
                self.phase = EepromPhase::Writing { all: false };
            }
            0b11 => {
                if self.write_enabled {
                    self.contents[usize::from(address)] = 0xffff;
                }
                self.dout = true;
            }
            _ => match address >> 4 {
                0b00 => self.write_enabled = false,
                0b11 => self.write_enabled = true,
                0b10 => {
                    if self.write_enabled {
                        self.contents.fill(0xffff);
                    }
                    self.dout = true;
                }
                _ => {
                    self.input = 0;
                    self.phase = EepromPhase::Writing { all: true };
                }
            },
        }
    }
}

/// The C+ tally counters, dumped into guest memory on request (64 bytes).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Tally {
    tx_ok: u64,
    rx_ok: u64,
    tx_err: u64,
    rx_err: u32,
    miss_pkt: u16,
    fae: u16,
    tx1_col: u32,
    txm_col: u32,
    rx_ok_phy: u64,
    rx_ok_brd: u64,
    rx_ok_mul: u32,
    tx_abt: u16,
    tx_undrn: u16,
}

impl Tally {
    fn bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..8].copy_from_slice(&self.tx_ok.to_le_bytes());
        b[8..16].copy_from_slice(&self.rx_ok.to_le_bytes());
        b[16..24].copy_from_slice(&self.tx_err.to_le_bytes());
        b[24..28].copy_from_slice(&self.rx_err.to_le_bytes());
        b[28..30].copy_from_slice(&self.miss_pkt.to_le_bytes());
        b[30..32].copy_from_slice(&self.fae.to_le_bytes());
        b[32..36].copy_from_slice(&self.tx1_col.to_le_bytes());
        b[36..40].copy_from_slice(&self.txm_col.to_le_bytes());
        b[40..48].copy_from_slice(&self.rx_ok_phy.to_le_bytes());
        b[48..56].copy_from_slice(&self.rx_ok_brd.to_le_bytes());
        b[56..60].copy_from_slice(&self.rx_ok_mul.to_le_bytes());
        b[60..62].copy_from_slice(&self.tx_abt.to_le_bytes());
        b[62..64].copy_from_slice(&self.tx_undrn.to_le_bytes());
        b
    }
}

/// The registers and what the card keeps between frames: all of it migrates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Regs {
    phys: [u8; 6],
    mult: [u8; 8],
    tx_status: [u32; 4],
    tx_addr: [u32; 4],
    rx_buf: u32,
    rx_buffer_size: u32,
    /// Where the driver reads next (CAPR + 16).
    rx_buf_ptr: u32,
    /// Where the card writes next (CBR).
    rx_buf_addr: u32,
    intr_status: u16,
    intr_mask: u16,
    tx_config: u32,
    rx_config: u32,
    rx_missed: u32,
    cscr: u16,
    cfg9346: u8,
    config0: u8,
    config1: u8,
    config3: u8,
    config4: u8,
    config5: u8,
    clock_enabled: bool,
    chip_cmd: u8,
    multi_intr: u16,
    basic_mode_ctrl: u16,
    basic_mode_status: u16,
    nway_advert: u16,
    nway_lpar: u16,
    nway_expansion: u16,
    cp_cmd: u16,
    /// CpCmd was written since the last reset: TxStatus0/1 are the tally dump's
    /// address and TxPoll drives the transmit ring (QEMU's `cplus_enabled`).
    cplus_enabled: bool,
    intr_mitigate: u16,
    tx_thresh: u8,
    curr_tx_desc: u8,
    curr_cplus_rx_desc: u32,
    curr_cplus_tx_desc: u32,
    rx_ring_addr_lo: u32,
    rx_ring_addr_hi: u32,
    /// The VM clock's nanoseconds when the timer was last cleared.
    tctr_base_ns: u64,
    timer_int: u32,
    eeprom: Eeprom,
    tally: Tally,
    /// The C+ frame assembled so far.
    cplus_tx: Vec<u8>,
}

impl Regs {
    fn transmitter_enabled(&self) -> bool {
        self.chip_cmd & bits::CMD_TX_ENB != 0
    }

    fn receiver_enabled(&self) -> bool {
        self.chip_cmd & bits::CMD_RX_ENB != 0
    }

    fn cp_transmitter_enabled(&self) -> bool {
        self.transmitter_enabled() && self.cp_cmd & bits::CPLUS_TX_ENB != 0
    }

    fn cp_receiver_enabled(&self) -> bool {
        self.receiver_enabled() && self.cp_cmd & bits::CPLUS_RX_ENB != 0
    }

    /// The C+ receive ring is set (QEMU's `rtl8139_cp_rx_valid`: older 8139cp drivers
    /// turn the receiver on before they program it).
    fn cp_rx_valid(&self) -> bool {
        self.rx_ring_addr_lo != 0 || self.rx_ring_addr_hi != 0
    }

    fn config_writable(&self) -> bool {
        self.cfg9346 & bits::CFG9346_MODE == bits::CFG9346_CONFIG_WRITE
    }

    /// QEMU's `rtl8139_reset_rxring`.
    fn reset_rx_ring(&mut self, size: u32) {
        self.rx_buffer_size = size;
        self.rx_buf_ptr = 0;
        self.rx_buf_addr = 0;
    }

    /// Whether the driver has read every frame (QEMU's `rtl8139_RxBufferEmpty`).
    fn rx_buffer_empty(&self) -> bool {
        let size = self.rx_buffer_size.max(1);
        self.rx_buf_addr % size == self.rx_buf_ptr % size
    }

    /// Free bytes in the receive buffer (0: empty, and so all of it).
    fn rx_available(&self) -> u32 {
        let size = self.rx_buffer_size.max(1);
        (size + self.rx_buf_ptr % size - self.rx_buf_addr % size) % size
    }

    /// QEMU's `rtl8139_reset_phy`: the link as it stands.
    /// QEMU's `rtl8139_reset_phy` (a chip reset, or BMCR's reset bit): autonegotiation
    /// done at 100 Mbit/s full duplex, the link as it is.
    fn reset_phy(&mut self, link_up: bool) {
        self.basic_mode_status = 0x7809 | 0x0020 | if link_up { 0x0004 } else { 0 };
        // All modes, full duplex, advertised and seen; autonegotiation supported.
        self.nway_advert = 0x05e1;
        self.nway_lpar = 0x05e1;
        self.nway_expansion = 0x0001;
        // 100 Mbit/s link, heartbeat, LED: QEMU's CSCR_F_LINK_100 | CSCR_HEART_BIT |
        // CSCR_LD (read only here, as there).
        self.cscr = 0x0040 | 0x0100 | 0x0200;
    }

    fn tx_summary(&self) -> u16 {
        let mut v = 0u16;
        for (i, status) in self.tx_status.iter().enumerate() {
            if status & bits::TX_STAT_OK != 0 {
                v |= 1 << (12 + i);
            }
            if status & bits::TX_UNDERRUN != 0 {
                v |= 1 << (8 + i);
            }
            if status & bits::TX_ABORTED != 0 {
                v |= 1 << (4 + i);
            }
            if status & bits::TX_HOST_OWNS != 0 {
                v |= 1 << i;
            }
        }
        v
    }

    /// Where a frame goes: the receive header's address bits (none in promiscuous mode,
    /// as QEMU's), or `None` when the filter refuses it (QEMU's checks in
    /// `rtl8139_do_receive`).
    fn classify(&self, frame: &[u8]) -> Option<u32> {
        let dest = &frame[0..6];
        if self.rx_config & bits::ACCEPT_ALL_PHYS != 0 {
            return Some(0);
        }
        if dest == [0xff; 6] {
            (self.rx_config & bits::ACCEPT_BROADCAST != 0).then_some(bits::RX_BROADCAST)
        } else if dest[0] & 1 != 0 {
            if self.rx_config & bits::ACCEPT_MULTICAST == 0 {
                return None;
            }
            let index = (ether_crc(dest) >> 26) as usize;
            (self.mult[index >> 3] & (1 << (index & 7)) != 0).then_some(bits::RX_MULTICAST)
        } else if dest == self.phys {
            (self.rx_config & bits::ACCEPT_MY_PHYS != 0).then_some(bits::RX_PHYSICAL)
        } else {
            None
        }
    }
}

/// What became of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    Dropped,
    /// No room in the RTL8139's buffer yet.
    NoRoom,
}

/// The card's state under its one lock.
struct State {
    regs: Regs,
    /// The VM is stopped: no frames move.
    paused: bool,
    /// The PCI command register lets the card master the bus.
    bus_master: bool,
    /// Frames sent while the backend was full.
    held: HeldFrames,
    /// The backend descriptor's events the loop waits for now.
    interest: Interest,
    /// Frames sent in this pass of the loop.
    pass_frames: usize,
    /// A frame from the backend waiting for room in the receive buffer.
    rx_pending: Option<Vec<u8>>,
}

impl State {
    /// The card may take a frame now (QEMU's `rtl8139_can_receive`): a card that is off
    /// takes and drops them; in C+ mode a frame without a descriptor is dropped (the
    /// driver refills descriptors without telling the card); the RTL8139's buffer waits
    /// for room for a full frame.
    fn can_receive(&self) -> bool {
        if self.paused || !self.bus_master || self.rx_pending.is_some() {
            return false;
        }
        let r = &self.regs;
        if !r.clock_enabled || !r.receiver_enabled() || r.cp_receiver_enabled() {
            return true;
        }
        let avail = r.rx_available();
        avail == 0 || avail >= 1514 || r.intr_mask & bits::RX_OVERFLOW != 0
    }
}

/// The card: registers, EEPROM, and the way to its backend and loop.
struct Rtl8139 {
    state: Mutex<State>,
    backend: NicBackend,
    services: Arc<MachineServices>,
    intx: Arc<IntxPin>,
    /// Woken when the guest asks for a transmission, frees receive space or the link
    /// changes: the loop looks at the card.
    card_loop: CardLoop,
    link_up: AtomicBool,
    /// The MAC of `mac=` (what a reset restores).
    conf_mac: [u8; 6],
    /// The PCS timer (TCTR reaching TimerInt).
    timer: VirtualTimer,
    log: RateLimitedLog,
}

impl Rtl8139 {
    /// QEMU's `rtl8139_reset`.
    fn reset(&self, st: &mut State) {
        let link_up = self.link_up.load(Ordering::Acquire);
        let r = &mut st.regs;
        let kept = std::mem::take(r);
        // What QEMU's reset does not touch keeps its value: the EEPROM, the multicast
        // filter, the transmit buffers' addresses, RxConfig, Cfg9346, Config4, ...
        *r = Regs {
            phys: self.conf_mac,
            eeprom: kept.eeprom,
            mult: kept.mult,
            tx_addr: kept.tx_addr,
            rx_config: kept.rx_config,
            rx_missed: kept.rx_missed,
            cfg9346: kept.cfg9346,
            config4: kept.config4,
            multi_intr: kept.multi_intr,
            intr_mitigate: kept.intr_mitigate,
            tx_thresh: kept.tx_thresh,
            tx_status: [bits::TX_HOST_OWNS; 4],
            tx_config: bits::TX_CONFIG_VERSION,
            clock_enabled: true,
            chip_cmd: bits::CMD_RESET,
            // No boot ROM; I/O and memory mapped; fast back-to-back.
            config1: 0x0c,
            config3: 0x01,
            basic_mode_ctrl: 0x1000,
            tctr_base_ns: self.timer.now_ns(),
            ..Regs::default()
        };
        r.eeprom.phase = EepromPhase::Idle;
        r.reset_rx_ring(8192);
        r.reset_phy(link_up);
        st.held.clear();
        st.rx_pending = None;
        let _ = self.timer.cancel();
        self.update_irq(st);
    }

    /// Writes `bytes` to guest memory at `addr` as the card's DMA: marked dirty for a
    /// migration. False when they fall outside RAM.
    fn dma_write(&self, mem: &GuestMemoryMmap, bytes: &[u8], addr: u64) -> bool {
        if mem.write_slice(bytes, GuestAddress(addr)).is_err() {
            return false;
        }
        self.services.dirty_tracker().mark(addr, bytes.len() as u64);
        true
    }

    fn update_irq(&self, st: &State) {
        self.intx.set(st.regs.intr_status & st.regs.intr_mask != 0);
    }

    fn raise(&self, st: &mut State, causes: u16) {
        st.regs.intr_status |= causes;
        self.update_irq(st);
    }

    fn wake(&self) {
        self.card_loop.wake();
    }

    /// TCTR: the PCI clocks since the timer was cleared.
    fn tctr(&self, st: &State) -> u32 {
        let ns = self.timer.now_ns().saturating_sub(st.regs.tctr_base_ns);
        (u128::from(ns) * u128::from(PCI_FREQUENCY) / 1_000_000_000) as u32
    }

    /// QEMU's `rtl8139_set_next_tctr_time`: the PCS timeout fires when TCTR next equals
    /// TimerInt.
    fn set_next_tctr_time(&self, st: &State) {
        let r = &st.regs;
        if r.timer_int == 0 {
            let _ = self.timer.cancel();
            return;
        }
        let pci_now =
            (u128::from(self.timer.now_ns().saturating_sub(r.tctr_base_ns)) * u128::from(PCI_FREQUENCY) / 1_000_000_000) as u64;
        let mut next = (pci_now & !0xffff_ffff) + u64::from(r.timer_int);
        if next <= pci_now {
            next += 1 << 32;
        }
        let ns = (u128::from(next) * 1_000_000_000 / u128::from(PCI_FREQUENCY)) as u64;
        if let Err(e) = self.timer.arm_at(r.tctr_base_ns.saturating_add(ns)) {
            log::error!("rtl8139: cannot arm the timer: {e}");
        }
    }

    fn pcs_timer_expired(&self) {
        // Under the lock, so a TimerInt written meanwhile decides.
        let mut st = self.state.lock();
        match self.timer.take_due() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::error!("rtl8139: timer: {e}");
                return;
            }
        }
        if st.regs.clock_enabled {
            self.raise(&mut st, bits::PCS_TIMEOUT);
        }
        self.set_next_tctr_time(&st);
    }

    fn read8(&self, st: &State, at: usize) -> u8 {
        let r = &st.regs;
        match at {
            reg::MAC0..=0x05 => r.phys[at],
            reg::MAR0..=0x0f => r.mult[at - reg::MAR0],
            reg::CHIP_CMD => r.chip_cmd | if r.rx_buffer_empty() { bits::RX_BUF_EMPTY } else { 0 },
            reg::CFG9346 => {
                let mut v = r.cfg9346;
                if v & bits::CFG9346_MODE == bits::CFG9346_PROGRAM {
                    v = (v & !bits::EE_DO) | if r.eeprom.cs && r.eeprom.dout { bits::EE_DO } else { 0 };
                }
                v
            }
            reg::CONFIG0 => r.config0,
            reg::CONFIG1 => r.config1,
            reg::CONFIG3 => r.config3,
            reg::CONFIG4 => r.config4,
            reg::CONFIG5 => r.config5,
            // 100 Mbit/s; bit 2 says the link failed.
            reg::MEDIA_STATUS => 0xd0 | if r.basic_mode_status & 0x04 == 0 { 0x04 } else { 0 },
            reg::HLT_CLK => u8::from(r.clock_enabled),
            reg::PCI_REVISION_ID => PCI_REVISION,
            reg::TX_THRESH => r.tx_thresh,
            reg::TX_POLL => 0,
            _ => match wide_register(at) {
                Some((base, 2)) => (self.read16(st, base) >> (8 * (at - base))) as u8,
                Some((base, _)) => (self.read32(st, base) >> (8 * (at - base))) as u8,
                None => 0,
            },
        }
    }

    fn read16(&self, st: &State, at: usize) -> u16 {
        let r = &st.regs;
        match at {
            reg::INTR_MASK => r.intr_mask,
            reg::INTR_STATUS => r.intr_status,
            reg::MULTI_INTR => r.multi_intr,
            // The driver's read pointer is kept 16 bytes behind.
            reg::RX_BUF_PTR => r.rx_buf_ptr.wrapping_sub(0x10) as u16,
            reg::RX_BUF_ADDR => r.rx_buf_addr as u16,
            reg::TX_SUMMARY => r.tx_summary(),
            reg::BASIC_MODE_CTRL => r.basic_mode_ctrl,
            reg::BASIC_MODE_STATUS => r.basic_mode_status,
            reg::NWAY_ADVERT => r.nway_advert,
            reg::NWAY_LPAR => r.nway_lpar,
            reg::NWAY_EXPANSION => r.nway_expansion,
            reg::CSCR => r.cscr,
            reg::CP_CMD => r.cp_cmd,
            reg::INTR_MITIGATE => r.intr_mitigate,
            _ => 0,
        }
    }

    fn read32(&self, st: &State, at: usize) -> u32 {
        let r = &st.regs;
        match at {
            reg::TX_STATUS0..=0x1c => r.tx_status[(at - reg::TX_STATUS0) / 4],
            reg::TX_ADDR0..=0x2c => r.tx_addr[(at - reg::TX_ADDR0) / 4],
            reg::RX_BUF => r.rx_buf,
            reg::TX_CONFIG => r.tx_config,
            reg::RX_CONFIG => r.rx_config,
            reg::TIMER => self.tctr(st),
            reg::RX_MISSED => r.rx_missed,
            reg::TIMER_INT => r.timer_int,
            reg::RX_RING_ADDR_LO => r.rx_ring_addr_lo,
            reg::RX_RING_ADDR_HI => r.rx_ring_addr_hi,
            _ => 0,
        }
    }

    fn read(&self, offset: u64, size: u32) -> u64 {
        let at = (offset & 0xff) as usize;
        let st = self.state.lock();
        let by_bytes = |n: usize| {
            (0..n).fold(0u64, |v, i| v | u64::from(self.read8(&st, (at + i) & 0xff)) << (8 * i))
        };
        match (size, wide_register(at)) {
            (4, Some((base, 4))) if base == at => u64::from(self.read32(&st, at)),
            (2, Some((base, 2))) if base == at => u64::from(self.read16(&st, at)),
            (2, Some((base, 4))) if at - base == 2 || at == base => {
                u64::from((self.read32(&st, base) >> (8 * (at - base))) as u16)
            }
            (1, _) => u64::from(self.read8(&st, at)),
            (n, _) => by_bytes(n.min(4) as usize),
        }
    }

    fn write8(&self, st: &mut State, at: usize, value: u8) {
        let r = &mut st.regs;
        match at {
            reg::MAC0..=0x05 => r.phys[at] = value,
            reg::MAR0..=0x0f => r.mult[at - reg::MAR0] = value,
            reg::CHIP_CMD => self.write_chip_cmd(st, value),
            reg::CFG9346 => self.write_cfg9346(st, value),
            reg::CONFIG0 if r.config_writable() => r.config0 = set_masked(value.into(), 0xf8, r.config0.into()) as u8,
            reg::CONFIG1 if r.config_writable() => r.config1 = set_masked(value.into(), 0x0c, r.config1.into()) as u8,
            reg::CONFIG3 if r.config_writable() => r.config3 = set_masked(value.into(), 0x8f, r.config3.into()) as u8,
            reg::CONFIG4 if r.config_writable() => r.config4 = set_masked(value.into(), 0x0a, r.config4.into()) as u8,
            reg::CONFIG5 => r.config5 = set_masked(value.into(), 0x80, r.config5.into()) as u8,
            reg::HLT_CLK => match value {
                b'R' => r.clock_enabled = true,
                b'H' => r.clock_enabled = false,
                _ => {}
            },
            reg::TX_THRESH => r.tx_thresh = value,
            reg::TX_POLL => {
                // Bit 6 polls the normal-priority ring; the high-priority ring is not
                // served (as QEMU's).
                if value & 0x40 != 0 {
                    self.wake();
                }
            }
            // Reserved.
            0x06 | 0x07 | reg::MEDIA_STATUS | reg::PCI_REVISION_ID | 0x5f => {}
            reg::INTR_STATUS => self.write16(st, reg::INTR_STATUS, u16::from(value)),
            0x3f => self.write16(st, reg::INTR_STATUS, u16::from(value) << 8),
            // A byte of a wider register (Windows writes TxConfig's low byte alone): the
            // register with its other bytes as they are.
            _ if matches!(wide_register(at), Some((_, 2))) => {
                let base = at & !1;
                let shift = 8 * (at - base);
                let v = (self.read16(st, base) & !(0xff << shift)) | u16::from(value) << shift;
                self.write16(st, base, v);
            }
            _ if matches!(wide_register(at), Some((base, 4)) if ![reg::TIMER, reg::RX_MISSED].contains(&base) && !(reg::TX_STATUS0..=0x1f).contains(&base)) => {
                let base = at & !3;
                let shift = 8 * (at - base);
                let v = (self.read32(st, base) & !(0xff << shift)) | u32::from(value) << shift;
                self.write32(st, base, v);
            }
            _ => self.log.warn(|| format!("rtl8139: write of {value:#04x} to register {at:#04x} ignored")),
        }
    }

    fn write16(&self, st: &mut State, at: usize, value: u16) {
        let r = &mut st.regs;
        match at {
            reg::INTR_MASK => {
                r.intr_mask = set_masked(value.into(), 0x1e00, r.intr_mask.into()) as u16;
                self.update_irq(st);
            }
            reg::INTR_STATUS => {
                // Written ones clear their causes.
                let value = set_masked(value.into(), 0x1e00, 0) as u16;
                r.intr_status &= !value;
                self.update_irq(st);
            }
            reg::MULTI_INTR => r.multi_intr = value & 0x0fff,
            reg::RX_BUF_PTR => {
                // Kept 16 bytes behind by the driver.
                r.rx_buf_ptr = (u32::from(value) + 0x10) % r.rx_buffer_size.max(1);
                self.wake();
            }
            reg::BASIC_MODE_CTRL => {
                if value & 0x8000 != 0 {
                    let up = self.link_up.load(Ordering::Acquire);
                    r.reset_phy(up);
                }
                // Speed, duplex and autonegotiation are fixed.
                r.basic_mode_ctrl = set_masked(value.into(), 0xfdff, r.basic_mode_ctrl.into()) as u16;
            }
            reg::BASIC_MODE_STATUS => {
                r.basic_mode_status = set_masked(value.into(), 0xff3f, r.basic_mode_status.into()) as u16;
            }
            reg::NWAY_ADVERT => r.nway_advert = value,
            reg::NWAY_LPAR | reg::NWAY_EXPANSION | reg::RX_BUF_ADDR | reg::TX_SUMMARY => {}
            reg::CSCR => {}
            reg::CP_CMD => {
                r.cplus_enabled = true;
                r.cp_cmd = set_masked(value.into(), 0xff84, r.cp_cmd.into()) as u16;
                self.wake();
            }
            reg::INTR_MITIGATE => r.intr_mitigate = value,
            // The RTL8169's: iPXE tells the cards apart by whether a write sticks.
            reg::RX_MAX_SIZE => {}
            _ => {
                for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                    self.write8(st, (at + i) & 0xff, b);
                }
            }
        }
    }

    fn write32(&self, st: &mut State, at: usize, value: u32) {
        let r = &mut st.regs;
        match at {
            reg::RX_MISSED => r.rx_missed = 0,
            // Taken only while the transmitter is on, as QEMU's.
            reg::TX_CONFIG if r.transmitter_enabled() => {
                r.tx_config = set_masked(value, 0x7c80_0000 | 0x8070_f80f, r.tx_config);
            }
            reg::TX_CONFIG => {}
            reg::RX_CONFIG => {
                r.rx_config = set_masked(value, 0xf0fc_0040, r.rx_config);
                let size = 8192 << ((r.rx_config >> 11) & 3);
                r.reset_rx_ring(size);
                self.wake();
            }
            reg::TX_STATUS0..=0x1c => self.write_tx_status((at - reg::TX_STATUS0) / 4, st, value),
            reg::TX_ADDR0..=0x2c => r.tx_addr[(at - reg::TX_ADDR0) / 4] = value,
            reg::RX_BUF => r.rx_buf = value,
            reg::RX_RING_ADDR_LO => {
                r.rx_ring_addr_lo = value;
                self.wake();
            }
            reg::RX_RING_ADDR_HI => {
                r.rx_ring_addr_hi = value;
                self.wake();
            }
            reg::TIMER => {
                r.tctr_base_ns = self.timer.now_ns();
                self.set_next_tctr_time(st);
            }
            reg::TIMER_INT => {
                r.timer_int = value;
                self.set_next_tctr_time(st);
            }
            _ => {
                for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                    self.write8(st, (at + i) & 0xff, b);
                }
            }
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let at = (offset & 0xff) as usize;
        let mut st = self.state.lock();
        match (size, wide_register(at)) {
            (4, Some((base, 4))) if base == at => self.write32(&mut st, at, value as u32),
            (4, _) => {
                self.write16(&mut st, at, value as u16);
                self.write16(&mut st, (at + 2) & 0xff, (value >> 16) as u16);
            }
            (2, Some((base, 2))) if base == at => self.write16(&mut st, at, value as u16),
            (2, _) => {
                self.write8(&mut st, at, value as u8);
                self.write8(&mut st, (at + 1) & 0xff, (value >> 8) as u8);
            }
            _ => self.write8(&mut st, at, value as u8),
        }
    }

    /// QEMU's `rtl8139_ChipCmd_write`.
    fn write_chip_cmd(&self, st: &mut State, value: u8) {
        if value & bits::CMD_RESET != 0 {
            self.reset(st);
        }
        let r = &mut st.regs;
        if value & bits::CMD_RX_ENB != 0 {
            r.curr_cplus_rx_desc = 0;
        }
        if value & bits::CMD_TX_ENB != 0 {
            r.curr_cplus_tx_desc = 0;
        }
        r.chip_cmd = set_masked(value.into(), 0xe3, r.chip_cmd.into()) as u8 & !bits::CMD_RESET;
        self.wake();
    }

    /// QEMU's `rtl8139_Cfg9346_write`: the EEPROM's pins in programming mode; autoload
    /// mode resets the card.
    fn write_cfg9346(&self, st: &mut State, value: u8) {
        let r = &mut st.regs;
        let mut value = set_masked(value.into(), 0x31, r.cfg9346.into()) as u8;
        match value & bits::CFG9346_MODE {
            bits::CFG9346_PROGRAM => r.eeprom.set_pins(
                value & bits::EE_CS != 0,
                value & bits::EE_SK != 0,
                value & bits::EE_DI != 0,
            ),
            bits::CFG9346_AUTOLOAD => {
                value = 0;
                self.reset(st);
            }
            // The pins follow the register only in programming mode: chip select drops.
            _ => r.eeprom.set_pins(false, false, false),
        }
        st.regs.cfg9346 = value;
    }

    /// QEMU's `rtl8139_TxStatus_write`: in C+ mode TxStatus0/1 are the tally counters'
    /// dump address (DTCCR); otherwise a descriptor handed to the card.
    fn write_tx_status(&self, index: usize, st: &mut State, value: u32) {
        let r = &mut st.regs;
        if r.cplus_enabled {
            r.tx_status[index] = value;
            if index == 0 && value & 0x8 != 0 {
                let addr = u64::from(r.tx_status[1]) << 32 | u64::from(r.tx_status[0] & !0x3f);
                let mem = self.services.ram();
                if !st.bus_master || !self.dma_write(&mem, &r.tally.bytes(), addr) {
                    self.log.warn(|| format!("rtl8139: tally counters to {addr:#x} outside RAM"));
                }
                r.tx_status[0] &= !0x8;
            }
            return;
        }
        let value = set_masked(value & !0xff00_c000, 0x00c0_0000, r.tx_status[index]);
        r.tx_status[index] = value;
        self.wake();
    }

    /// The loop's pass: held frames, transmissions, then frames from the backend; then
    /// which backend events to wait for.
    fn pass(&self) {
        self.card_loop.take_kick();
        let mut st = self.state.lock();
        st.pass_frames = 0;
        if !st.paused && st.bus_master {
            let mem = self.services.ram();
            st.held.flush(self.backend.queue.as_ref());
            if st.held.is_empty() {
                if st.regs.cplus_enabled {
                    self.cplus_transmit(&mut st, &mem);
                } else {
                    self.transmit(&mut st, &mem);
                }
            }
            self.receive(&mut st, &mem);
        }
        let wanted = Interest {
            read: st.can_receive(),
            write: self.backend.tx_on_rx_fd() && !st.held.is_empty() && !st.paused && st.bus_master,
        };
        self.card_loop.watch_backend(&mut st.interest, wanted);
    }

    /// QEMU's `rtl8139_transfer_frame`: to the backend (or held while it is full), or back
    /// to the card's own receiver in loopback mode.
    fn send(&self, st: &mut State, mem: &GuestMemoryMmap, frame: Vec<u8>) {
        if frame.is_empty() {
            return;
        }
        st.pass_frames += 1;
        if st.regs.tx_config & bits::TX_LOOPBACK == bits::TX_LOOPBACK {
            let _ = self.deliver(st, mem, &frame);
            return;
        }
        if self.link_up.load(Ordering::Acquire) {
            st.held.send(self.backend.queue.as_ref(), frame, TX_HELD_MAX_BYTES);
        }
    }

    /// QEMU's `rtl8139_transmit`: the RTL8139's four buffers, in order from the current
    /// one, each the driver handed over (OWN clear) sent and marked done.
    fn transmit(&self, st: &mut State, mem: &GuestMemoryMmap) {
        for _ in 0..4 {
            let r = &st.regs;
            let index = usize::from(r.curr_tx_desc & 3);
            if !r.transmitter_enabled() || r.tx_status[index] & bits::TX_HOST_OWNS != 0 || !st.held.is_empty() {
                return;
            }
            let size = (r.tx_status[index] & 0x1fff) as usize;
            let addr = GuestAddress(u64::from(r.tx_addr[index]));
            let mut frame = vec![0u8; size];
            if mem.read_slice(&mut frame, addr).is_err() {
                self.log.warn(|| format!("rtl8139: transmit buffer {:#x}+{size} outside RAM", addr.0));
                frame.clear();
            }
            let r = &mut st.regs;
            r.tx_status[index] |= bits::TX_HOST_OWNS | bits::TX_STAT_OK;
            r.curr_tx_desc = ((index + 1) & 3) as u8;
            if !frame.is_empty() {
                r.tally.tx_ok = r.tally.tx_ok.wrapping_add(1);
                self.send(st, mem, frame);
            }
            self.raise(st, bits::TX_OK);
        }
    }

    /// QEMU's `rtl8139_cplus_transmit`: descriptors of the normal-priority ring from the
    /// current one, as long as the driver has given them to the card (OWN set), at most a
    /// ring's worth per pass.
    fn cplus_transmit(&self, st: &mut State, mem: &GuestMemoryMmap) {
        let mut sent = 0;
        while sent < CP_RING_MAX && st.pass_frames < TX_PASS_FRAMES && st.held.is_empty() {
            if !self.cplus_transmit_one(st, mem) {
                break;
            }
            sent += 1;
        }
        if sent > 0 {
            self.raise(st, bits::TX_OK);
            if sent == CP_RING_MAX || st.pass_frames >= TX_PASS_FRAMES {
                // More may wait: come back after others had their turn.
                self.wake();
            }
        }
    }

    fn cplus_transmit_one(&self, st: &mut State, mem: &GuestMemoryMmap) -> bool {
        let r = &mut st.regs;
        if !r.cp_transmitter_enabled() {
            return false;
        }
        let ring = u64::from(r.tx_addr[1]) << 32 | u64::from(r.tx_addr[0]);
        let desc_addr = GuestAddress(ring.wrapping_add(16 * u64::from(r.curr_cplus_tx_desc)));
        let mut desc = [0u8; 16];
        if mem.read_slice(&mut desc, desc_addr).is_err() {
            self.log.warn(|| format!("rtl8139: transmit descriptor at {:#x} outside RAM", desc_addr.0));
            return false;
        }
        let word = |i: usize| u32::from_le_bytes(desc[4 * i..4 * i + 4].try_into().unwrap_or_default());
        let (w0, w1) = (word(0), word(1));
        if w0 & bits::DESC_OWN == 0 {
            return false;
        }
        if w0 & bits::DESC_FS != 0 {
            r.cplus_tx.clear();
        }
        let mut size = (w0 & 0xffff) as usize;
        if r.cplus_tx.len() + size >= CP_TX_BUFFER {
            size = CP_TX_BUFFER - r.cplus_tx.len();
        }
        let buf = GuestAddress(u64::from(word(3)) << 32 | u64::from(word(2)));
        let start = r.cplus_tx.len();
        r.cplus_tx.resize(start + size, 0);
        if mem.read_slice(&mut r.cplus_tx[start..], buf).is_err() {
            self.log.warn(|| format!("rtl8139: transmit buffer {:#x}+{size} outside RAM", buf.0));
            r.cplus_tx.truncate(start);
        }
        r.curr_cplus_tx_desc = if w0 & bits::DESC_EOR != 0 { 0 } else { (r.curr_cplus_tx_desc + 1) % CP_RING_MAX };
        // Handed back, without errors.
        let status = w0 & !bits::DESC_OWN & !bits::TX_STATUS_ERRORS;
        if !self.dma_write(mem, &status.to_le_bytes(), desc_addr.0) {
            return false;
        }
        if w0 & bits::DESC_LS != 0 {
            let frame = std::mem::take(&mut r.cplus_tx);
            r.tally.tx_ok = r.tally.tx_ok.wrapping_add(1);
            let offloads = w0 & (bits::TX_IPCS | bits::TX_UDPCS | bits::TX_TCPCS | bits::TX_LGSEN);
            let frames = if offloads == 0 { vec![frame] } else { offload(frame, w0) };
            for mut f in frames {
                // The tag goes into each frame the offloads made, as QEMU's
                // `rtl8139_transfer_frame` inserts it.
                if w1 & bits::TX_TAGC != 0 && f.len() >= 12 {
                    let tci = (w1 as u16).to_le_bytes();
                    f.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
                }
                self.send(st, mem, f);
            }
        }
        true
    }

    /// Frames from the backend, while the card takes them.
    fn receive(&self, st: &mut State, mem: &GuestMemoryMmap) {
        if let Some(frame) = st.rx_pending.take() {
            if self.deliver(st, mem, &frame) == Delivery::NoRoom {
                st.rx_pending = Some(frame);
                return;
            }
        }
        if !st.can_receive() {
            return;
        }
        let mut buf = vec![0u8; RX_BUF];
        for _ in 0..RX_BURST {
            if !st.can_receive() {
                return;
            }
            let n = match self.backend.queue.receive(&[VolatileSlice::from(&mut buf[..])]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("rtl8139: backend receive failed: {e}");
                    return;
                }
            };
            // A card whose link is down gets nothing from the wire.
            if !self.link_up.load(Ordering::Acquire) {
                continue;
            }
            let frame = &buf[..n.min(RX_BUF)];
            if self.deliver(st, mem, frame) == Delivery::NoRoom {
                st.rx_pending = Some(frame.to_vec());
                return;
            }
        }
        // More may wait: the loop comes back (the descriptor stays readable).
    }

    /// QEMU's `rtl8139_do_receive`: one frame into the receive buffer or a C+ descriptor,
    /// or dropped (card off, filtered, no C+ descriptor), or left for later (no room in
    /// the RTL8139's buffer).
    fn deliver(&self, st: &mut State, mem: &GuestMemoryMmap, frame: &[u8]) -> Delivery {
        let r = &st.regs;
        if !r.clock_enabled || !r.receiver_enabled() || frame.len() < 14 {
            return Delivery::Dropped;
        }
        let Some(kind) = r.classify(frame) else {
            st.regs.tally.rx_err = st.regs.tally.rx_err.wrapping_add(1);
            return Delivery::Dropped;
        };
        let mut data = frame.to_vec();
        if data.len() < MIN_FRAME {
            data.resize(MIN_FRAME, 0);
        }
        // The frame check sequence the card appends.
        let crc = crc32fast::hash(&data).to_le_bytes();
        let r = &mut st.regs;
        match kind {
            bits::RX_BROADCAST => r.tally.rx_ok_brd = r.tally.rx_ok_brd.wrapping_add(1),
            bits::RX_MULTICAST => r.tally.rx_ok_mul = r.tally.rx_ok_mul.wrapping_add(1),
            bits::RX_PHYSICAL => r.tally.rx_ok_phy = r.tally.rx_ok_phy.wrapping_add(1),
            _ => {}
        }
        let delivery = if r.cp_receiver_enabled() {
            if !r.cp_rx_valid() {
                Delivery::Dropped
            } else if self.deliver_cplus(st, mem, &mut data, kind, crc) {
                Delivery::Delivered
            } else {
                Delivery::Dropped
            }
        } else {
            self.deliver_classic(st, mem, &data, kind, crc)
        };
        if delivery == Delivery::Delivered {
            st.regs.tally.rx_ok = st.regs.tally.rx_ok.wrapping_add(1);
            self.raise(st, bits::RX_OK);
        }
        delivery
    }

    /// Into the next C+ receive descriptor, whole (QEMU does not spread a frame).
    fn deliver_cplus(&self, st: &mut State, mem: &GuestMemoryMmap, data: &mut Vec<u8>, kind: u32, crc: [u8; 4]) -> bool {
        let r = &mut st.regs;
        let ring = u64::from(r.rx_ring_addr_hi) << 32 | u64::from(r.rx_ring_addr_lo);
        let desc_addr = GuestAddress(ring.wrapping_add(16 * u64::from(r.curr_cplus_rx_desc)));
        let mut desc = [0u8; 16];
        if mem.read_slice(&mut desc, desc_addr).is_err() {
            self.log.warn(|| format!("rtl8139: receive descriptor at {:#x} outside RAM", desc_addr.0));
            return false;
        }
        let word = |i: usize| u32::from_le_bytes(desc[4 * i..4 * i + 4].try_into().unwrap_or_default());
        let (mut w0, mut w1) = (word(0), word(1));
        let missed = |st: &mut State| {
            st.regs.rx_missed = st.regs.rx_missed.wrapping_add(1);
            st.regs.tally.rx_err = st.regs.tally.rx_err.wrapping_add(1);
            st.regs.tally.miss_pkt = st.regs.tally.miss_pkt.wrapping_add(1);
            self.raise(st, bits::RX_OVERFLOW);
            false
        };
        if w0 & bits::DESC_OWN == 0 {
            return missed(st);
        }
        // The VLAN tag goes into the descriptor, out of the frame.
        if r.cp_cmd & bits::CPLUS_RX_VLAN != 0 && data.len() >= 18 && data[12..14] == [0x81, 0x00] {
            w1 = (w1 & !0xffff) | bits::RX_TAVA | u32::from(u16::from_le_bytes([data[14], data[15]]));
            data.drain(12..16);
            if data.len() < MIN_FRAME {
                data.resize(MIN_FRAME, 0);
            }
        } else {
            w1 &= !bits::RX_TAVA;
        }
        let space = (w0 & 0x1fff) as usize;
        if data.len() + 4 > space {
            return missed(st);
        }
        let buf = GuestAddress(u64::from(word(3)) << 32 | u64::from(word(2)));
        if !self.dma_write(mem, data, buf.0) || !self.dma_write(mem, &crc, buf.0.wrapping_add(data.len() as u64)) {
            self.log.warn(|| format!("rtl8139: receive buffer {:#x} outside RAM", buf.0));
            return false;
        }
        w0 &= !(bits::DESC_OWN | 0x1fff | bits::RX_MAR | bits::RX_PAM | bits::RX_BAR);
        w0 |= bits::DESC_FS | bits::DESC_LS | (data.len() as u32 + 4);
        w0 |= match kind {
            bits::RX_BROADCAST => bits::RX_BAR,
            bits::RX_MULTICAST => bits::RX_MAR,
            bits::RX_PHYSICAL => bits::RX_PAM,
            _ => 0,
        };
        // The second word first: the driver looks at OWN in the first.
        self.dma_write(mem, &w1.to_le_bytes(), desc_addr.0.wrapping_add(4));
        self.dma_write(mem, &w0.to_le_bytes(), desc_addr.0);
        let r = &mut st.regs;
        r.curr_cplus_rx_desc = if w0 & bits::DESC_EOR != 0 { 0 } else { (r.curr_cplus_rx_desc + 1) % CP_RING_MAX };
        true
    }

    /// Into the RTL8139's receive buffer: a header (status, length with the FCS), the
    /// frame and its FCS, the next frame at a 4-byte boundary.
    /// A frame without room waits for the driver to free some, as QEMU's net queue keeps
    /// it; one larger than the whole buffer never fits and is dropped.
    fn deliver_classic(&self, st: &mut State, mem: &GuestMemoryMmap, data: &[u8], kind: u32, crc: [u8; 4]) -> Delivery {
        let r = &mut st.regs;
        let size = r.rx_buffer_size.max(1);
        let total = data.len() as u32 + 8;
        let avail = r.rx_available();
        let too_big = total > size;
        if (avail != 0 && (total + 3) & !3 >= avail) || too_big {
            r.rx_missed = r.rx_missed.wrapping_add(1);
            r.tally.miss_pkt = r.tally.miss_pkt.wrapping_add(1);
            self.raise(st, bits::RX_OVERFLOW);
            return if too_big { Delivery::Dropped } else { Delivery::NoRoom };
        }
        let header = (bits::RX_STATUS_OK | kind | (data.len() as u32 + 4) << 16).to_le_bytes();
        let mut ok = self.write_rx_buffer(r, mem, &header);
        ok &= self.write_rx_buffer(r, mem, data);
        ok &= self.write_rx_buffer(r, mem, &crc);
        r.rx_buf_addr = ((r.rx_buf_addr + 3) & !3) % size;
        if !ok {
            self.log.warn(|| format!("rtl8139: receive buffer at {:#x} outside RAM", r.rx_buf));
        }
        Delivery::Delivered
    }

    /// QEMU's `rtl8139_write_buffer`: at the write pointer, wrapping at the end of the
    /// buffer unless the driver asked for frames to run past it.
    fn write_rx_buffer(&self, r: &mut Regs, mem: &GuestMemoryMmap, bytes: &[u8]) -> bool {
        let size = r.rx_buffer_size.max(1);
        let base = u64::from(r.rx_buf);
        let len = bytes.len() as u32;
        let mut ok = true;
        if r.rx_buf_addr + len > size && !(size < 65536 && r.rx_config & bits::RX_NO_WRAP != 0) {
            let first = (size - r.rx_buf_addr.min(size)) as usize;
            ok &= self.dma_write(mem, &bytes[..first], base + u64::from(r.rx_buf_addr));
            ok &= self.dma_write(mem, &bytes[first..], base);
            r.rx_buf_addr = len - first as u32;
            return ok;
        }
        ok &= self.dma_write(mem, bytes, base + u64::from(r.rx_buf_addr));
        r.rx_buf_addr += len;
        ok
    }
}

impl LoopCard for Rtl8139 {
    fn serve(&self) {
        self.pass();
    }

    fn timer_expired(&self) {
        self.pcs_timer_expired();
    }

    fn run_state_changed(&self, running: bool) {
        // The timer stands still with the VM.
        self.state.lock().paused = !running;
        if let Err(e) = self.timer.run_state_changed(running) {
            log::error!("rtl8139: timer: {e}");
        }
        if running {
            self.wake();
        }
    }
}

/// Which wide register a byte belongs to: its base and width (2 or 4).
fn wide_register(at: usize) -> Option<(usize, usize)> {
    const WORDS: [usize; 16] = [
        reg::RX_BUF_PTR,
        reg::RX_BUF_ADDR,
        reg::INTR_MASK,
        reg::INTR_STATUS,
        reg::MULTI_INTR,
        reg::TX_SUMMARY,
        reg::BASIC_MODE_CTRL,
        reg::BASIC_MODE_STATUS,
        reg::NWAY_ADVERT,
        reg::NWAY_LPAR,
        reg::NWAY_EXPANSION,
        reg::CSCR,
        reg::RX_MAX_SIZE,
        reg::CP_CMD,
        reg::INTR_MITIGATE,
        0x5e,
    ];
    const LONGS: [usize; 16] = [
        0x10,
        0x14,
        0x18,
        0x1c,
        0x20,
        0x24,
        0x28,
        0x2c,
        reg::RX_BUF,
        reg::TX_CONFIG,
        reg::RX_CONFIG,
        reg::TIMER,
        reg::RX_MISSED,
        reg::TIMER_INT,
        reg::RX_RING_ADDR_LO,
        reg::RX_RING_ADDR_HI,
    ];
    if at == reg::PCI_REVISION_ID || at == reg::PCI_REVISION_ID + 1 {
        return None;
    }
    let word = at & !1;
    if WORDS.contains(&word) {
        return Some((word, 2));
    }
    let long = at & !3;
    LONGS.contains(&long).then_some((long, 4))
}

/// QEMU's C+ offloads on an IPv4 frame: the IP header checksum (IPCS), the TCP or UDP
/// checksum (TCPCS, UDPCS), or a large TCP send cut into segments of the MSS the
/// descriptor carries (LGSEN), each with its own lengths, sequence number and checksums.
/// Other frames go as they are.
fn offload(frame: Vec<u8>, w0: u32) -> Vec<Vec<u8>> {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH] >> 4 != 4 {
        return vec![frame];
    }
    let ihl = usize::from(frame[ETH] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    if ihl < 20 || total < ihl || ETH + total > frame.len() {
        return vec![frame];
    }
    let protocol = frame[ETH + 9];
    let l4 = ETH + ihl;
    let mss = ((w0 >> 16) & 0x7ff) as usize;
    if w0 & bits::TX_LGSEN != 0 && protocol == 6 {
        if mss == 0 || total < ihl + 20 {
            return vec![frame];
        }
        let thl = usize::from(frame[l4 + 12] >> 4) * 4;
        if thl < 20 || ihl + thl > total {
            return vec![frame];
        }
        let headers = &frame[..l4 + thl];
        let payload = &frame[l4 + thl..ETH + total];
        let seq = u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]);
        let id = u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]]);
        let count = payload.len().div_ceil(mss).max(1);
        if count > MAX_SEGMENTS {
            // No driver cuts a 64 KiB send this fine; a guest that asks gets it dropped.
            return Vec::new();
        }
        let mut out = Vec::with_capacity(count);
        for (i, chunk) in payload.chunks(mss).chain(payload.is_empty().then_some(&[][..])).enumerate() {
            let mut seg = Vec::with_capacity(headers.len() + chunk.len());
            seg.extend_from_slice(headers);
            seg.extend_from_slice(chunk);
            let ip_len = (ihl + thl + chunk.len()) as u16;
            seg[ETH + 2..ETH + 4].copy_from_slice(&ip_len.to_be_bytes());
            seg[ETH + 4..ETH + 6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
            if i + 1 < count {
                // PSH and FIN only on the last segment.
                seg[l4 + 13] &= !0x09;
            }
            ip_checksum(&mut seg, ETH, ihl);
            l4_checksum(&mut seg, ETH, ihl, 16);
            out.push(seg);
        }
        return out;
    }
    let mut frame = frame;
    if w0 & bits::TX_IPCS != 0 {
        ip_checksum(&mut frame, ETH, ihl);
    }
    if w0 & bits::TX_LGSEN != 0 {
        // A large send of a frame that is not TCP: the bits below are the MSS, not
        // TCPCS/UDPCS, so QEMU leaves the transport checksum as the driver wrote it.
        return vec![frame];
    }
    if w0 & bits::TX_TCPCS != 0 && protocol == 6 && total >= ihl + 20 {
        l4_checksum(&mut frame, ETH, ihl, 16);
    } else if w0 & bits::TX_UDPCS != 0 && protocol == 17 && total >= ihl + 8 {
        l4_checksum(&mut frame, ETH, ihl, 6);
    }
    vec![frame]
}

/// The IPv4 header checksum of the header at `ip`.
fn ip_checksum(frame: &mut [u8], ip: usize, ihl: usize) {
    frame[ip + 10..ip + 12].fill(0);
    let sum = fold_checksum(checksum_add(&frame[ip..ip + ihl]));
    frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
}

/// The TCP or UDP checksum (at `at` in the transport header) over the IPv4 pseudo-header
/// and the segment the IP header's total length bounds.
fn l4_checksum(frame: &mut [u8], ip: usize, ihl: usize, at: usize) {
    let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let l4 = ip + ihl;
    let end = (ip + total).min(frame.len());
    let len = end - l4;
    frame[l4 + at..l4 + at + 2].fill(0);
    let mut pseudo = [0u8; 12];
    pseudo[0..8].copy_from_slice(&frame[ip + 12..ip + 20]);
    pseudo[9] = frame[ip + 9];
    pseudo[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    let mut sum = fold_checksum(checksum_add(&pseudo) + checksum_add(&frame[l4..end]));
    if sum == 0 && at == 6 {
        // UDP's "no checksum" is written as all ones.
        sum = 0xffff;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The registers through BAR 0 (I/O) and BAR 1 (memory): the same 256 bytes.
struct Registers(Arc<Rtl8139>);

impl MemoryRegionOps for Registers {
    /// Wider than 4 bytes: two 4-byte accesses, as QEMU's `max_access_size`.
    fn read(&self, offset: u64, size: u32) -> u64 {
        if size > 4 {
            return self.0.read(offset, 4) | self.0.read(offset + 4, 4) << 32;
        }
        self.0.read(offset, size)
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if size > 4 {
            self.0.write(offset, value & 0xffff_ffff, 4);
            self.0.write(offset + 4, value >> 32, 4);
            return;
        }
        self.0.write(offset, value, size);
    }
}

impl Nic for Rtl8139 {
    fn name(&self) -> &str {
        &self.backend.name
    }

    fn model(&self) -> &'static str {
        TYPE_RTL8139
    }

    fn netdev_id(&self) -> &str {
        &self.backend.netdev_id
    }

    fn netdev(&self) -> &Arc<dyn Netdev> {
        &self.backend.netdev
    }

    fn mac(&self) -> [u8; 6] {
        self.state.lock().regs.phys
    }

    fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// QEMU's `rtl8139_set_link_status`: the PHY's link bit, and a link-change interrupt.
    fn set_link(&self, up: bool) {
        if self.link_up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        let mut st = self.state.lock();
        if up {
            st.regs.basic_mode_status |= 0x04;
        } else {
            st.regs.basic_mode_status &= !0x04;
        }
        self.raise(&mut st, bits::LINK_CHANGE);
        drop(st);
        self.wake();
    }

    /// The card cannot announce itself: qomvm sends the RARP frame for its MAC.
    fn announce(&self) {
        if self.link_up.load(Ordering::Acquire) {
            self.backend.announce(&self.mac());
        }
    }
}

/// QEMU's `RTL8139State` as a PCI function.
#[derive(qom::Object)]
#[qom(name = TYPE_RTL8139, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct Rtl8139Pci {
    #[parent]
    parent: PciDevice,
    #[property(desc = "ID of a netdev to use as a backend")]
    netdev: Prop<Option<String>>,
    #[property(desc = "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56")]
    mac: Prop<Option<String>>,
    /// Read by the board for the firmware's boot order (its iPXE ROM boots the card).
    #[property(default = -1, desc = "Boot order of the card (firmware)")]
    bootindex: Prop<i32>,
    card: OnceLock<Arc<Rtl8139>>,
}

type_init!(Rtl8139Pci);

/// Errors of `rtl8139`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
enum Rtl8139Error {
    #[error(transparent)]
    Backend(#[from] NicBackendError),
    #[error("Property 'rtl8139.mac' doesn't take value '{0}'")]
    Mac(String),
    #[error("cannot set up the card's event loop: {0}")]
    Host(io::Error),
}

impl DeviceImpl for Rtl8139Pci {
    const DESCRIPTION: Option<&'static str> = Some("RealTek RTL8139 Fast Ethernet");
    const CATEGORY: DeviceCategory = DeviceCategory::Network;

    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(card) = self.card.get() {
            let mut st = card.state.lock();
            card.reset(&mut st);
            st.bus_master = false;
        }
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some(card) = self.card.get() {
            let services = ctx.machine().ok();
            card.card_loop.stop(services.as_ref().map(|s| s.vm()));
            let _ = card.timer.cancel();
            let nic: &dyn Nic = card.as_ref();
            nic::unregister(nic);
            card.backend.release();
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        if let Some(card) = self.card.get() {
            let st = card.state.lock();
            // The timer as the time since it was cleared: the destination's clock has its
            // own origin.
            let mut regs = st.regs.clone();
            regs.tctr_base_ns = card.timer.now_ns().saturating_sub(regs.tctr_base_ns);
            s.put("regs", &regs);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let mut regs: Regs = state.get("regs")?;
        let bad = |reason: &str| VmStateError::BadField {
            field: "regs".into(),
            reason: reason.into(),
        };
        let tick_limit = match regs.eeprom.phase {
            EepromPhase::Idle => u8::MAX,
            EepromPhase::Command => 8,
            EepromPhase::Reading | EepromPhase::Writing { .. } => 16,
        };
        if regs.eeprom.contents.len() != 64 || regs.eeprom.address >= 64 || regs.eeprom.tick >= tick_limit {
            return Err(bad("EEPROM is not a 93C46's"));
        }
        if regs.cplus_tx.len() > CP_TX_BUFFER || ![8192, 16384, 32768, 65536].contains(&regs.rx_buffer_size) {
            return Err(bad("buffer sizes are not the card's"));
        }
        if regs.rx_buf_ptr >= regs.rx_buffer_size || regs.rx_buf_addr >= regs.rx_buffer_size + 0x2000 {
            return Err(bad("receive buffer pointers out of range"));
        }
        if regs.curr_cplus_rx_desc >= CP_RING_MAX || regs.curr_cplus_tx_desc >= CP_RING_MAX {
            return Err(bad("descriptor index out of range"));
        }
        self.parent.load_pci_state(state)?;
        self.update_bus_master();
        if let Some(card) = self.card.get() {
            let running = card.services.vm().is_running();
            let mut st = card.state.lock();
            let link = regs.basic_mode_status & 0x04 != 0;
            regs.tctr_base_ns = card.timer.now_ns().saturating_sub(regs.tctr_base_ns);
            st.regs = regs;
            st.regs.rx_buf_addr %= st.regs.rx_buffer_size;
            st.paused = !running;
            st.held.clear();
            st.rx_pending = None;
            card.link_up.store(link, Ordering::Release);
            card.set_next_tctr_time(&st);
            card.update_irq(&st);
            drop(st);
            card.wake();
        }
        Ok(())
    }
}

impl Rtl8139Pci {
    fn update_bus_master(&self) {
        let command = self.parent.read_config(config::COMMAND, 2) as u16;
        if let Some(card) = self.card.get() {
            card.state.lock().bus_master = command & config::COMMAND_MASTER != 0;
            card.wake();
        }
    }

    fn realize_card(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let err = RealizeError::device;
        let context = services.try_main_context().map_err(|e| err(Rtl8139Error::Host(e)))?;
        let mac = match self.mac.get() {
            Some(text) => parse_mac(&text).ok_or_else(|| err(Rtl8139Error::Mac(text)))?,
            None => nic::default_mac(),
        };
        let backend = NicBackend::attach(TYPE_RTL8139, self.parent.id(), self.netdev.get())
            .map_err(|e| err(Rtl8139Error::Backend(e)))?;
        let card_loop = CardLoop::new(TYPE_RTL8139, context).map_err(|e| err(Rtl8139Error::Host(e)))?;
        let timer = VirtualTimer::new(services.vm().clock().clone())
            .map_err(|e| err(Rtl8139Error::Host(e)))?;
        let card = Arc::new(Rtl8139 {
            state: Mutex::new(State {
                regs: Regs {
                    eeprom: Eeprom::new(&mac),
                    ..Regs::default()
                },
                paused: !services.vm().is_running(),
                bus_master: false,
                held: HeldFrames::default(),
                interest: Interest::READ,
                pass_frames: 0,
                rx_pending: None,
            }),
            backend,
            services: services.clone(),
            intx: self.parent.intx(),
            card_loop,
            link_up: AtomicBool::new(true),
            conf_mac: mac,
            timer,
            log: RateLimitedLog::default(),
        });
        {
            let mut st = card.state.lock();
            card.reset(&mut st);
        }
        // From here on the card's regions hold it: a failure lets the backend go itself.
        let io = MemoryRegion::new_io("rtl8139", REGS_SIZE, Arc::new(Registers(card.clone())));
        let mmio = MemoryRegion::new_io("rtl8139", REGS_SIZE, Arc::new(Registers(card.clone())));
        if let Err(e) = self
            .register_bar(0, BarKind::Io, io)
            .and_then(|()| self.register_bar(1, BarKind::Mem32, mmio))
        {
            card.backend.release();
            return Err(e);
        }
        if let Err(e) = card.card_loop.start(
            &card,
            card.backend.queue.rx_fd(),
            card.timer.as_raw_fd(),
            services.vm(),
        ) {
            card.backend.release();
            return Err(RealizeError::device(Rtl8139Error::Host(e)));
        }
        let weak: Weak<Rtl8139> = Arc::downgrade(&card);
        let nic_ref: Weak<dyn Nic> = weak;
        nic::register(nic_ref);
        let _ = self.card.set(card);
        self.update_bus_master();
        Ok(())
    }
}

impl PciDeviceImpl for Rtl8139Pci {
    const VENDOR_ID: u16 = 0x10ec;
    const DEVICE_ID: u16 = 0x8139;
    const REVISION: u8 = PCI_REVISION;
    /// Network controller, Ethernet.
    const CLASS_ID: u16 = 0x0200;
    const INTERRUPT_PIN: u8 = 1;
    /// iPXE's boot ROM for the card, as QEMU's (Debian package ipxe-qemu).
    const ROMFILE: Option<&'static str> = Some("efi-rtl8139.rom");

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.realize_card(ctx)
    }

    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
        self.update_bus_master();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clocks `bits` (most significant first) into the EEPROM the way Linux's drivers do,
    /// then reads 16 bits back.
    fn read_word(e: &mut Eeprom, location: u16, addr_len: u32) -> u16 {
        let cmd = u32::from(location) | (6 << addr_len);
        e.set_pins(false, false, false);
        e.set_pins(true, false, false);
        for i in (0..=4 + addr_len).rev() {
            let di = cmd & (1 << i) != 0;
            e.set_pins(true, false, di);
            e.set_pins(true, true, di);
        }
        e.set_pins(true, false, false);
        let mut v = 0u16;
        for _ in 0..16 {
            e.set_pins(true, true, false);
            v = (v << 1) | u16::from(e.dout);
            e.set_pins(true, false, false);
        }
        e.set_pins(false, false, false);
        v
    }

    #[test]
    fn the_eeprom_answers_as_a_93c46_to_linux_8139cp() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let mut e = Eeprom::new(&mac);
        // The 8-bit probe misses 0x8129, so the driver takes 6-bit addresses.
        assert_ne!(read_word(&mut e, 0, 8), 0x8129);
        assert_eq!(read_word(&mut e, 0, 6), 0x8129);
        let words: Vec<u16> = (7..10).map(|i| read_word(&mut e, i, 6)).collect();
        assert_eq!(words, [0x5452, 0x1200, 0x5634]);
    }

    #[test]
    fn large_sends_are_cut_at_the_mss_with_their_own_headers() {
        let payload = 3000;
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[23] = 6;
        f[34 + 4..34 + 8].copy_from_slice(&1000u32.to_be_bytes());
        f[34 + 12] = 0x50;
        f[34 + 13] = 0x18; // ACK, PSH
        let w0 = bits::TX_LGSEN | (1400 << 16);
        let segs = offload(f, w0);
        assert_eq!(segs.len(), 3);
        for (i, s) in segs.iter().enumerate() {
            let len = if i < 2 { 1400 } else { 200 };
            assert_eq!(s.len(), 54 + len);
            assert_eq!(u16::from_be_bytes([s[16], s[17]]) as usize, 40 + len);
            assert_eq!(u32::from_be_bytes([s[38], s[39], s[40], s[41]]), 1000 + 1400 * i as u32);
            assert_eq!(s[47] & 0x08 != 0, i == 2, "PSH only on the last");
            assert_eq!(fold_checksum(checksum_add(&s[14..34])), 0, "IP header sums to zero");
        }
    }

    #[test]
    fn a_large_send_of_udp_keeps_its_transport_checksum() {
        // MSS 3 sets the TCPCS and UDPCS bit positions; under LGSEN they are not offloads.
        let mut f = vec![0u8; 14 + 20 + 8 + 16];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&(20u16 + 8 + 16).to_be_bytes());
        f[23] = 17;
        f[34 + 4..34 + 6].copy_from_slice(&24u16.to_be_bytes());
        f[34 + 6..34 + 8].copy_from_slice(&[0xab, 0xcd]);
        let w0 = bits::TX_LGSEN | bits::TX_IPCS | (3 << 16);
        let segs = offload(f, w0);
        assert_eq!(segs.len(), 1);
        assert_eq!(segs[0][40..42], [0xab, 0xcd], "UDP checksum untouched");
        assert_eq!(fold_checksum(checksum_add(&segs[0][14..34])), 0, "IPCS still done");
    }

    #[test]
    fn wide_registers_cover_their_bytes() {
        assert_eq!(wide_register(0x3d), Some((0x3c, 2)));
        assert_eq!(wide_register(0x43), Some((0x40, 4)));
        assert_eq!(wide_register(0x37), None);
        assert_eq!(wide_register(0x5e), None);
    }
}
