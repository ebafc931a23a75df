//! `e1000` (QEMU's `hw/net/e1000.c`): the Intel 82540EM gigabit Ethernet controller, QEMU's
//! default network card on `pc`, and the one guests without virtio drivers (Windows
//! installers, old images) have a driver for. libvirt writes it for `<model type='e1000'/>`.
//!
//! The card is its register file (BAR 0, 128 KiB of 32-bit registers; BAR 1 reaches them
//! through an address/data pair), a Microwire EEPROM holding the MAC address, an M88 PHY
//! behind MDIC, and two descriptor rings in guest memory. Frames move on an event loop (the
//! main loop, or `iothread=`), never on a vCPU thread: a write of the transmit tail or the
//! receive tail only kicks the loop, which walks the rings under the card's one lock.
//! Transmit segmentation (TSO) and checksum insertion are done here, in software, as QEMU's
//! card does them, so any backend carries the frames.
//!
//! A guest that programs nonsense (rings outside RAM, tails past the ring, lengths that
//! wrap) gets its frames dropped and a rate-limited log line, never a panic or a stuck
//! loop: each pass over a ring stops when it comes back to where it started.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use net::Netdev;
use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::core::iothread::{iothread_context, Interest};
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::timer::DeviceTimer;
use crate::core::services::MachineServices;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::net::nic::{CardLoop, LoopCard, self, checksum_add, format_mac, parse_mac, HeldFrames, Nic, NicBackend, NicBackendError};
use crate::pci::pci::{config, BarKind, IntxPin, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE};

/// QEMU's `TYPE_E1000` (the 82540EM).
pub const TYPE_E1000: &str = "e1000";
/// QEMU's `TYPE_E1000_BASE`, the family's abstract type.
pub const TYPE_E1000_BASE: &str = "e1000-base";

/// The 82540EM's PCI device id.
const DEVICE_ID_82540EM: u16 = 0x100e;
/// The family's boot ROM (QEMU's for all three; the PCI ids in its header are patched to
/// the card's as it loads).
const E1000_ROMFILE: &str = "efi-e1000.rom";
/// Its PHY's second identifier register (an M88E1011); the 82545EM's is the same.
const PHY_ID2_82540EM: u16 = 0x0c20;
/// The 82544GC's (an M88E1000).
const PHY_ID2_82544GC: u16 = 0x0c30;
/// The interrupt mitigation window is at least 500 units of 256 ns (the card's
/// guaranteed ceiling of 7813 interrupts a second).
const MIT_MIN_DELAY: u32 = 500;
/// BAR 0: the register file.
const MMIO_SIZE: u64 = 0x20000;
/// BAR 1: IOADDR and IODATA.
const IO_SIZE: u64 = 0x40;
/// Registers in the file (32 bits each).
const NREGS: usize = (MMIO_SIZE / 4) as usize;
/// The largest frame the card assembles (QEMU's `tx.data`).
const TX_BUF: usize = 0x10000;
/// Bytes of frames a blocked backend may hold back before more are dropped: a TSO
/// descriptor makes up to 64 KiB / MSS frames at once, each with its headers.
const TX_HELD_MAX_BYTES: usize = 4 << 20;
/// Frames taken from the backend in one pass of the loop, so a flood cannot hold it.
const RX_BURST: usize = 256;
/// Receive descriptors one pass may walk (a ring of buffer-less descriptors costs a walk
/// per frame): then the loop serves others and comes back.
const RX_PASS_DESCS: usize = 4096;
/// Transmit descriptors and frames one pass may handle (a TSO context with a tiny MSS
/// turns each descriptor into thousands of frames).
const TX_PASS_DESCS: usize = 1024;
const TX_PASS_FRAMES: usize = 4096;
/// The largest frame a backend hands over (64 KiB TSO frame plus its header).
const RX_BUF: usize = 65550 + 64;
/// Ethernet's minimum frame without FCS.
const MIN_FRAME: usize = 60;
/// The largest frame without long-packet mode (no FCS): a VLAN-tagged 1500-byte payload.
const MAX_FRAME_VLAN: usize = 1518;
/// The largest frame in long-packet mode (QEMU's `E1000_MAXIMUM_ETHERNET_LPE_SIZE`).
const MAX_FRAME_LPE: usize = 16380;

/// Register byte offsets (Intel's names, as `e1000_regs.h`).
mod reg {
    pub const CTRL: usize = 0x0000;
    pub const STATUS: usize = 0x0008;
    pub const EECD: usize = 0x0010;
    pub const EERD: usize = 0x0014;
    pub const CTRL_EXT: usize = 0x0018;
    pub const FLA: usize = 0x001c;
    pub const MDIC: usize = 0x0020;
    pub const FCAL: usize = 0x0028;
    pub const FCAH: usize = 0x002c;
    pub const FCT: usize = 0x0030;
    pub const VET: usize = 0x0038;
    pub const ICR: usize = 0x00c0;
    pub const ITR: usize = 0x00c4;
    pub const ICS: usize = 0x00c8;
    pub const IMS: usize = 0x00d0;
    pub const IMC: usize = 0x00d8;
    pub const RCTL: usize = 0x0100;
    pub const FCTTV: usize = 0x0170;
    pub const TXCW: usize = 0x0178;
    pub const RXCW: usize = 0x0180;
    pub const TCTL: usize = 0x0400;
    pub const TIPG: usize = 0x0410;
    pub const AIT: usize = 0x0458;
    pub const LEDCTL: usize = 0x0e00;
    pub const PBA: usize = 0x1000;
    pub const FCRTL: usize = 0x2160;
    pub const FCRTH: usize = 0x2168;
    pub const RDBAL: usize = 0x2800;
    pub const RDBAH: usize = 0x2804;
    pub const RDLEN: usize = 0x2808;
    pub const RDH: usize = 0x2810;
    pub const RDT: usize = 0x2818;
    pub const RDTR: usize = 0x2820;
    pub const RXDCTL: usize = 0x2828;
    pub const RADV: usize = 0x282c;
    pub const RSRPD: usize = 0x2c00;
    pub const TDBAL: usize = 0x3800;
    pub const TDBAH: usize = 0x3804;
    pub const TDLEN: usize = 0x3808;
    pub const TDH: usize = 0x3810;
    pub const TDT: usize = 0x3818;
    pub const TIDV: usize = 0x3820;
    pub const TXDCTL: usize = 0x3828;
    pub const TADV: usize = 0x382c;
    pub const TSPMT: usize = 0x3830;
    /// The statistics counters, 0x4000 to 0x4124: cleared when read.
    pub const STATS_FIRST: usize = 0x4000;
    pub const STATS_LAST: usize = 0x4124;
    pub const MPC: usize = 0x4010;
    pub const ROC: usize = 0x40ac;
    pub const PRC64: usize = 0x405c;
    pub const GPRC: usize = 0x4074;
    pub const BPRC: usize = 0x4078;
    pub const MPRC: usize = 0x407c;
    pub const GPTC: usize = 0x4080;
    pub const GORCL: usize = 0x4088;
    pub const GORCH: usize = 0x408c;
    pub const GOTCL: usize = 0x4090;
    pub const GOTCH: usize = 0x4094;
    pub const RNBC: usize = 0x40a0;
    pub const TORL: usize = 0x40c0;
    pub const TORH: usize = 0x40c4;
    pub const TOTL: usize = 0x40c8;
    pub const TOTH: usize = 0x40cc;
    pub const TPR: usize = 0x40d0;
    pub const TPT: usize = 0x40d4;
    pub const PTC64: usize = 0x40d8;
    pub const MPTC: usize = 0x40f0;
    pub const BPTC: usize = 0x40f4;
    pub const TSCTC: usize = 0x40f8;
    pub const RXCSUM: usize = 0x5000;
    pub const RFCTL: usize = 0x5008;
    pub const MTA: usize = 0x5200;
    pub const MTA_END: usize = 0x5400;
    pub const RA: usize = 0x5400;
    pub const RA_END: usize = 0x5480;
    pub const VFTA: usize = 0x5600;
    pub const VFTA_END: usize = 0x5800;
    pub const WUC: usize = 0x5800;
    pub const WUFC: usize = 0x5808;
    pub const WUS: usize = 0x5810;
    pub const MANC: usize = 0x5820;
    pub const IPAV: usize = 0x5838;
    pub const IP4AT: usize = 0x5840;
    pub const IP4AT_END: usize = 0x5858;
    pub const FFLT: usize = 0x5f00;
    pub const FFLT_END: usize = 0x5f20;
    pub const WUPM: usize = 0x5a00;
    pub const WUPM_END: usize = 0x5a80;
    pub const SWSM: usize = 0x5b50;
    pub const FWSM: usize = 0x5b54;
}

/// Register bits.
mod bits {
    pub const CTRL_SLU: u32 = 1 << 6;
    pub const CTRL_SPD_1000: u32 = 1 << 9;
    pub const CTRL_SWDPIN0: u32 = 1 << 18;
    pub const CTRL_SWDPIN2: u32 = 1 << 20;
    pub const CTRL_RST: u32 = 1 << 26;
    pub const CTRL_VME: u32 = 1 << 30;

    pub const STATUS_FD: u32 = 1 << 0;
    pub const STATUS_LU: u32 = 1 << 1;
    pub const STATUS_SPEED_1000: u32 = 1 << 7;
    pub const STATUS_ASDV: u32 = 3 << 8;
    pub const STATUS_MTXCKOK: u32 = 1 << 10;
    pub const STATUS_GIO_MASTER_ENABLE: u32 = 1 << 19;

    pub const EECD_SK: u32 = 1 << 0;
    pub const EECD_CS: u32 = 1 << 1;
    pub const EECD_DI: u32 = 1 << 2;
    pub const EECD_DO: u32 = 1 << 3;
    pub const EECD_FWE_MASK: u32 = 3 << 4;
    pub const EECD_REQ: u32 = 1 << 6;
    pub const EECD_GNT: u32 = 1 << 7;
    pub const EECD_PRES: u32 = 1 << 8;

    pub const EERD_START: u32 = 1 << 0;
    pub const EERD_DONE: u32 = 1 << 4;
    pub const EERD_ADDR_SHIFT: u32 = 8;
    pub const EERD_DATA_SHIFT: u32 = 16;

    pub const MDIC_DATA_MASK: u32 = 0xffff;
    pub const MDIC_REG_SHIFT: u32 = 16;
    pub const MDIC_PHY_SHIFT: u32 = 21;
    pub const MDIC_OP_WRITE: u32 = 1 << 26;
    pub const MDIC_OP_READ: u32 = 1 << 27;
    pub const MDIC_READY: u32 = 1 << 28;
    pub const MDIC_INT_EN: u32 = 1 << 29;
    pub const MDIC_ERROR: u32 = 1 << 30;

    pub const ICR_TXDW: u32 = 1 << 0;
    pub const ICR_TXQE: u32 = 1 << 1;
    pub const ICR_LSC: u32 = 1 << 2;
    pub const ICR_RXDMT0: u32 = 1 << 4;
    pub const ICR_RXO: u32 = 1 << 6;
    pub const ICR_RXT0: u32 = 1 << 7;
    pub const ICR_MDAC: u32 = 1 << 9;

    pub const RCTL_EN: u32 = 1 << 1;
    pub const RCTL_SBP: u32 = 1 << 2;
    pub const RCTL_UPE: u32 = 1 << 3;
    pub const RCTL_MPE: u32 = 1 << 4;
    pub const RCTL_LPE: u32 = 1 << 5;
    pub const RCTL_RDMTS_SHIFT: u32 = 8;
    pub const RCTL_MO_SHIFT: u32 = 12;
    pub const RCTL_BAM: u32 = 1 << 15;
    pub const RCTL_SZ_MASK: u32 = 3 << 16;
    pub const RCTL_VFE: u32 = 1 << 18;
    pub const RCTL_BSEX: u32 = 1 << 25;
    pub const RCTL_SECRC: u32 = 1 << 26;

    pub const TCTL_EN: u32 = 1 << 1;

    pub const RAH_AV: u32 = 1 << 31;

    pub const MANC_ARP_EN: u32 = 1 << 13;
    pub const MANC_0298_EN: u32 = 1 << 14;
    pub const MANC_RMCP_EN: u32 = 1 << 8;
    pub const MANC_RCV_TCO_EN: u32 = 1 << 17;
    pub const MANC_EN_MNG2HOST: u32 = 1 << 21;

    /// Transmit descriptor command bits (bits 24-31 of the second dword).
    pub const TXD_CMD_EOP: u32 = 1 << 24;
    pub const TXD_CMD_TCP: u32 = 1 << 24;
    pub const TXD_CMD_IP: u32 = 1 << 25;
    pub const TXD_CMD_TSE: u32 = 1 << 26;
    pub const TXD_CMD_RS: u32 = 1 << 27;
    pub const TXD_CMD_RPS: u32 = 1 << 28;
    pub const TXD_CMD_DEXT: u32 = 1 << 29;
    pub const TXD_CMD_VLE: u32 = 1 << 30;
    pub const TXD_CMD_IDE: u32 = 1 << 31;
    pub const TXD_DTYP_D: u32 = 1 << 20;
    pub const TXD_STAT_DD: u8 = 1 << 0;
    /// Data descriptor options (bits 8-15 of the last dword).
    pub const TXD_POPTS_IXSM: u8 = 1 << 0;
    pub const TXD_POPTS_TXSM: u8 = 1 << 1;

    pub const RXD_STAT_DD: u8 = 1 << 0;
    pub const RXD_STAT_EOP: u8 = 1 << 1;
    pub const RXD_STAT_IXSM: u8 = 1 << 2;
    pub const RXD_STAT_VP: u8 = 1 << 3;
}

/// PHY registers (MII and Marvell's) and their bits.
mod phy {
    pub const BMCR: usize = 0x00;
    pub const BMSR: usize = 0x01;
    pub const PHYID1: usize = 0x02;
    pub const PHYID2: usize = 0x03;
    pub const ANAR: usize = 0x04;
    pub const ANLPAR: usize = 0x05;
    pub const ANER: usize = 0x06;
    pub const CTRL1000: usize = 0x09;
    pub const STAT1000: usize = 0x0a;
    pub const M88_SPEC_CTRL: usize = 0x10;
    pub const M88_SPEC_STATUS: usize = 0x11;
    pub const M88_EXT_SPEC_CTRL: usize = 0x14;
    pub const M88_RX_ERR_CNTR: usize = 0x15;

    pub const BMCR_AUTOEN: u16 = 1 << 12;
    pub const BMCR_LOOPBACK: u16 = 1 << 14;
    pub const BMCR_ANRESTART: u16 = 1 << 9;
    pub const BMCR_RESET: u16 = 1 << 15;
    pub const BMSR_LINK_ST: u16 = 1 << 2;
    pub const BMSR_AN_COMP: u16 = 1 << 5;
    pub const ANLPAR_ACK: u16 = 1 << 14;

    /// Readable / writable through MDIC (QEMU's `phy_regcap`).
    pub const R: u8 = 1;
    pub const W: u8 = 2;

    pub fn cap(addr: usize) -> u8 {
        match addr {
            BMCR | ANAR | CTRL1000 | M88_SPEC_CTRL | M88_EXT_SPEC_CTRL => R | W,
            BMSR | PHYID1 | PHYID2 | ANLPAR | ANER | STAT1000 | M88_SPEC_STATUS
            | M88_RX_ERR_CNTR => R,
            _ => 0,
        }
    }

    /// The PHY after a reset (QEMU's `phy_reg_init`), without PHYID2.
    pub fn reset_values() -> [u16; 32] {
        let mut p = [0u16; 32];
        p[BMCR] = 0x1140; // 1000 Mbit/s, full duplex, autonegotiation
        p[BMSR] = 0x794d | BMSR_AN_COMP; // capabilities, link up, autonegotiation done
        p[PHYID1] = 0x0141;
        p[ANAR] = 0x0de1;
        p[ANLPAR] = 0x41e0;
        p[CTRL1000] = 0x0e00;
        p[STAT1000] = 0x3c00;
        p[M88_SPEC_CTRL] = 0x0360;
        p[M88_SPEC_STATUS] = 0xac00;
        p[M88_EXT_SPEC_CTRL] = 0x0d60;
        p
    }
}

/// The EEPROM's 64 words before the MAC, the ids and the checksum go in (QEMU's
/// `e1000_eeprom_template`).
const EEPROM_TEMPLATE: [u16; 64] = [
    0x0000, 0x0000, 0x0000, 0x0000, 0xffff, 0x0000, 0x0000, 0x0000, //
    0x3000, 0x1000, 0x6403, 0x0000, 0x8086, 0x0000, 0x8086, 0x3040, //
    0x0008, 0x2000, 0x7e14, 0x0048, 0x1000, 0x00d8, 0x0000, 0x2700, //
    0x6cc9, 0x3150, 0x0722, 0x040b, 0x0984, 0x0000, 0xc000, 0x0706, //
    0x1008, 0x0000, 0x0f04, 0x7fff, 0x4d01, 0xffff, 0xffff, 0xffff, //
    0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, //
    0x0100, 0x4000, 0x121c, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, //
    0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0x0000, //
];
/// The checksum word; the sum of all 64 words is this constant.
const EEPROM_CHECKSUM_REG: usize = 0x3f;
const EEPROM_SUM: u16 = 0xbaba;
/// Microwire's READ opcode.
const EEPROM_READ_OPCODE: u32 = 6;

/// The EEPROM's contents for `mac` on a card with PCI device id `device_id` (QEMU's
/// `e1000x_core_prepare_eeprom`).
fn eeprom_contents(mac: &[u8; 6], device_id: u16) -> [u16; 64] {
    let mut e = EEPROM_TEMPLATE;
    for i in 0..3 {
        e[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
    }
    e[11] = device_id;
    e[13] = device_id;
    let sum = e[..EEPROM_CHECKSUM_REG].iter().fold(0u16, |a, &w| a.wrapping_add(w));
    e[EEPROM_CHECKSUM_REG] = EEPROM_SUM.wrapping_sub(sum);
    e
}

/// Where a bit-banged Microwire read is (QEMU's `eecd_state`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct EecdState {
    old_eecd: u32,
    val_in: u32,
    bitnum_in: u32,
    bitnum_out: u32,
    reading: bool,
}

/// One context descriptor's offload parameters (QEMU's `e1000x_txd_props`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct TxProps {
    ipcss: u8,
    ipcso: u8,
    ipcse: u16,
    tucss: u8,
    tucso: u8,
    tucse: u16,
    paylen: u32,
    hdr_len: u8,
    mss: u16,
    ip: bool,
    tcp: bool,
    tse: bool,
}

impl TxProps {
    /// QEMU's `e1000x_read_tx_ctx_descr`.
    fn from_context(d: &[u8; 16]) -> Self {
        let op = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        TxProps {
            ipcss: d[0],
            ipcso: d[1],
            ipcse: u16::from_le_bytes([d[2], d[3]]),
            tucss: d[4],
            tucso: d[5],
            tucse: u16::from_le_bytes([d[6], d[7]]),
            paylen: op & 0xfffff,
            hdr_len: d[13],
            mss: u16::from_le_bytes([d[14], d[15]]),
            ip: op & bits::TXD_CMD_IP != 0,
            tcp: op & bits::TXD_CMD_TCP != 0,
            tse: op & bits::TXD_CMD_TSE != 0,
        }
    }
}

/// The frame being assembled from transmit descriptors (QEMU's `e1000_tx`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TxState {
    props: TxProps,
    tso_props: TxProps,
    /// The frame so far (a segment's worth with TSO).
    data: Vec<u8>,
    /// A TSO frame's headers, repeated before each segment.
    header: Vec<u8>,
    /// The first data descriptor's POPTS: which checksums to insert.
    sum_needed: u8,
    vlan_needed: bool,
    vlan_header: [u8; 4],
    /// The frame is TCP-segmented.
    cptse: bool,
    /// Segments sent of the current TSO frame.
    tso_frames: u32,
}

/// The card's state under its one lock.
struct State {
    regs: Box<[u32]>,
    phy: [u16; 32],
    eeprom: [u16; 64],
    eecd: EecdState,
    tx: TxState,
    /// BAR 1's IOADDR.
    ioaddr: u32,
    /// The VM is stopped: no frames move.
    paused: bool,
    /// The PCI command register lets the card master the bus.
    bus_master: bool,
    /// Frames sent while the backend was full.
    tx_held: HeldFrames,
    /// The backend descriptor's events the loop waits for now.
    interest: Interest,
    mit: Mitigation,
    /// Frames sent and receive descriptors walked in this pass of the loop.
    pass_frames: usize,
    pass_rx_descs: usize,
}

/// QEMU's interrupt mitigation state: after the line rises, further rises wait for a
/// window of ITR (or RADV/TADV, when the driver uses them), at least 128 us.
#[derive(Clone, Copy, Debug, Default)]
struct Mitigation {
    /// A window is open: a new cause waits for its end.
    timer_on: bool,
    /// The line as last set.
    irq_level: bool,
    /// A transmit descriptor asked for a delayed interrupt (IDE) since the last window.
    ide: bool,
}

impl State {
    /// A card out of reset with `eeprom`'s contents, its VM stopped or not, before the
    /// driver lets it master the bus.
    fn new(eeprom: [u16; 64], paused: bool) -> Self {
        State {
            regs: vec![0u32; NREGS].into_boxed_slice(),
            phy: [0; 32],
            eeprom,
            eecd: EecdState::default(),
            tx: TxState::default(),
            ioaddr: 0,
            paused,
            bus_master: false,
            tx_held: HeldFrames::default(),
            interest: Interest::READ,
            mit: Mitigation::default(),
            pass_frames: 0,
            pass_rx_descs: 0,
        }
    }

    fn reg(&self, offset: usize) -> u32 {
        self.regs[offset >> 2]
    }

    fn set(&mut self, offset: usize, value: u32) {
        self.regs[offset >> 2] = value;
    }

    /// QEMU's `e1000x_inc_reg_if_not_full`.
    fn count(&mut self, offset: usize) {
        let r = &mut self.regs[offset >> 2];
        *r = r.saturating_add(1);
    }

    /// QEMU's `e1000x_increase_size_stats`: the size bucket of six counters from `first`
    /// (64, 65-127, 128-255, 256-511, 512-1023, 1024 bytes and up, FCS included; shorter
    /// frames are counted in none).
    fn count_size(&mut self, first: usize, size: usize) {
        let bucket = match size {
            0..=63 => return,
            64 => 0,
            65..=127 => 1,
            128..=255 => 2,
            256..=511 => 3,
            512..=1023 => 4,
            _ => 5,
        };
        self.count(first + 4 * bucket);
    }

    /// QEMU's `e1000x_grow_8reg_if_not_full`: a 64-bit counter in a low/high pair.
    fn grow64(&mut self, low: usize, by: u64) {
        let value = (u64::from(self.reg(low + 4)) << 32) | u64::from(self.reg(low));
        let value = value.saturating_add(by);
        self.set(low, value as u32);
        self.set(low + 4, (value >> 32) as u32);
    }

    /// The receive buffer size RCTL selects (QEMU's `e1000x_rxbufsize`).
    fn rxbuf_size(&self) -> usize {
        let rctl = self.reg(reg::RCTL);
        let sz = (rctl & bits::RCTL_SZ_MASK) >> 16;
        match (rctl & bits::RCTL_BSEX != 0, sz) {
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            (false, 1) => 1024,
            (false, 2) => 512,
            (false, 3) => 256,
            _ => 2048,
        }
    }

    fn ring_len(&self, len_reg: usize) -> u32 {
        self.reg(len_reg) / 16
    }

    /// Whether the receive ring has room for `total` bytes (QEMU's `e1000_has_rxbufs`).
    fn has_rxbufs(&self, total: usize) -> bool {
        let (rdh, rdt) = (self.reg(reg::RDH), self.reg(reg::RDT));
        let size = self.rxbuf_size();
        if total <= size {
            return rdh != rdt;
        }
        let bufs = match rdh.cmp(&rdt) {
            std::cmp::Ordering::Less => rdt - rdh,
            std::cmp::Ordering::Greater => (self.ring_len(reg::RDLEN) + rdt).saturating_sub(rdh),
            std::cmp::Ordering::Equal => return false,
        };
        total <= bufs as usize * size
    }

    fn link_up(&self) -> bool {
        self.reg(reg::STATUS) & bits::STATUS_LU != 0
    }

    /// The card may take a frame now (QEMU's `e1000_can_receive`).
    fn can_receive(&self) -> bool {
        !self.paused
            && self.bus_master
            && self.link_up()
            && self.reg(reg::RCTL) & bits::RCTL_EN != 0
            && self.has_rxbufs(1)
    }

    /// QEMU's `receive_filter`: whether a frame is for this card.
    fn accepts(&self, frame: &[u8]) -> bool {
        let rctl = self.reg(reg::RCTL);
        if self.is_vlan(frame) && rctl & bits::RCTL_VFE != 0 {
            let vid = usize::from(u16::from_be_bytes([frame[14], frame[15]]) & 0xfff);
            if self.regs[(reg::VFTA >> 2) + (vid >> 5)] & (1 << (vid & 0x1f)) == 0 {
                return false;
            }
        }
        let dest = &frame[0..6];
        let bcast = dest == [0xff; 6];
        let mcast = dest[0] & 1 != 0;
        if !mcast && rctl & bits::RCTL_UPE != 0 {
            return true;
        }
        if mcast && rctl & bits::RCTL_MPE != 0 {
            return true;
        }
        if bcast && rctl & bits::RCTL_BAM != 0 {
            return true;
        }
        for pair in (reg::RA..reg::RA_END).step_by(8) {
            let (low, high) = (self.reg(pair), self.reg(pair + 4));
            if high & bits::RAH_AV == 0 {
                continue;
            }
            let mut ra = [0u8; 6];
            ra[..4].copy_from_slice(&low.to_le_bytes());
            ra[4..].copy_from_slice(&high.to_le_bytes()[..2]);
            if dest == ra {
                return true;
            }
        }
        const MTA_SHIFT: [u32; 4] = [4, 3, 2, 0];
        let shift = MTA_SHIFT[((rctl >> bits::RCTL_MO_SHIFT) & 3) as usize];
        let hash = ((u32::from(dest[5]) << 8 | u32::from(dest[4])) >> shift) & 0xfff;
        self.regs[(reg::MTA >> 2) + (hash >> 5) as usize] & (1 << (hash & 0x1f)) != 0
    }

    /// A frame tagged with the VLAN ethertype VET names (QEMU's `e1000x_is_vlan_packet`).
    fn is_vlan(&self, frame: &[u8]) -> bool {
        frame.len() >= 18 && u16::from_be_bytes([frame[12], frame[13]]) == self.reg(reg::VET) as u16
    }

    /// The MAC address in receive address 0 (what the driver programmed).
    fn mac(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac[..4].copy_from_slice(&self.reg(reg::RA).to_le_bytes());
        mac[4..].copy_from_slice(&self.reg(reg::RA + 4).to_le_bytes()[..2]);
        mac
    }
}

/// How a register responds (QEMU's `macreg_readops`/`macreg_writeops` for the 82540).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Stored as written, read back.
    Plain,
    /// Stored under a mask.
    Masked(u32),
    /// Read only; writes are ignored.
    ReadOnly,
    /// A counter: read and cleared.
    Statistic,
    /// Handled by [`E1000::write_reg`] / [`E1000::read_reg`] themselves.
    Special,
}

fn access(offset: usize) -> Option<Access> {
    use reg::*;
    Some(match offset {
        CTRL | EECD | EERD | MDIC | ICR | ICS | IMS | IMC | RCTL | TCTL | TDT | RDT => {
            Access::Special
        }
        // MANC is read-only on QEMU's card: its reset value tells drivers no
        // management firmware shares the port.
        STATUS | MANC | FWSM => Access::ReadOnly,
        PBA | SWSM => Access::Plain,
        RDH | TDH | RDTR | RADV | TADV | TIDV | ITR | AIT => Access::Masked(0xffff),
        RDLEN | TDLEN => Access::Masked(0xfff80),
        RDBAL | TDBAL => Access::Masked(0xffff_fff0),
        CTRL_EXT | FLA | FCAL | FCAH | FCT | VET | FCTTV | TXCW | RXCW | TIPG | LEDCTL
        | FCRTL | FCRTH | RDBAH | RXDCTL | RSRPD | TDBAH | TXDCTL | TSPMT | RXCSUM | RFCTL
        | WUC | WUFC | WUS | IPAV => Access::Plain,
        o if (STATS_FIRST..=STATS_LAST).contains(&o) => Access::Statistic,
        o if (MTA..MTA_END).contains(&o)
            || (RA..RA_END).contains(&o)
            || (VFTA..VFTA_END).contains(&o)
            || (IP4AT..IP4AT_END).contains(&o)
            || (FFLT..FFLT_END).contains(&o)
            || (WUPM..WUPM_END).contains(&o) =>
        {
            Access::Plain
        }
        _ => return None,
    })
}

/// The card: registers, EEPROM, PHY, and the way to its backend and loop.
struct E1000 {
    state: Mutex<State>,
    backend: NicBackend,
    services: Arc<MachineServices>,
    intx: Arc<IntxPin>,
    /// Woken when the guest moves a tail, enables a ring or the link changes: the loop
    /// looks at the rings.
    card_loop: CardLoop,
    link_up: AtomicBool,
    /// The MAC of `mac=` (what a reset restores).
    conf_mac: [u8; 6],
    init_vet: bool,
    /// Which card: the QOM type, its PCI device id and its PHY's second id.
    model: Variant,
    /// `mitigation=on`: interrupts are paced by ITR/RADV/TADV.
    mitigation: bool,
    mit_timer: DeviceTimer,
    log: RateLimitedLog,
}

/// What sets the 82540EM, 82544GC and 82545EM apart to a driver.
#[derive(Clone, Copy, Debug)]
struct Variant {
    type_name: &'static str,
    device_id: u16,
    phy_id2: u16,
}

impl E1000 {
    /// QEMU's `e1000_reset`: registers, PHY and the transmit state to their reset values,
    /// the MAC back in receive address 0.
    fn reset(&self, st: &mut State) {
        st.regs.fill(0);
        st.phy = phy::reset_values();
        st.phy[phy::PHYID2] = self.model.phy_id2;
        st.set(reg::PBA, 0x0010_0030);
        st.set(reg::LEDCTL, 0x602);
        st.set(
            reg::CTRL,
            bits::CTRL_SWDPIN2 | bits::CTRL_SWDPIN0 | bits::CTRL_SPD_1000 | bits::CTRL_SLU,
        );
        st.set(
            reg::STATUS,
            0x8000_0000
                | bits::STATUS_GIO_MASTER_ENABLE
                | bits::STATUS_ASDV
                | bits::STATUS_MTXCKOK
                | bits::STATUS_SPEED_1000
                | bits::STATUS_FD
                | bits::STATUS_LU,
        );
        st.set(
            reg::MANC,
            bits::MANC_EN_MNG2HOST
                | bits::MANC_RCV_TCO_EN
                | bits::MANC_ARP_EN
                | bits::MANC_0298_EN
                | bits::MANC_RMCP_EN,
        );
        if self.init_vet {
            st.set(reg::VET, 0x8100);
        }
        st.eecd = EecdState::default();
        st.tx = TxState::default();
        st.tx_held.clear();
        st.ioaddr = 0;
        if !self.link_up.load(Ordering::Acquire) {
            link_down_regs(st);
        }
        let mac = self.conf_mac;
        st.set(reg::RA, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        st.set(reg::RA + 4, u32::from(u16::from_le_bytes([mac[4], mac[5]])) | bits::RAH_AV);
        self.update_irq(st);
    }

    /// The line from ICR and IMS, with no mitigation window open (after a reset or a
    /// migration).
    fn update_irq(&self, st: &mut State) {
        let _ = self.mit_timer.disarm();
        st.mit = Mitigation {
            irq_level: st.reg(reg::ICR) & st.reg(reg::IMS) != 0,
            ..Mitigation::default()
        };
        self.intx.set(st.mit.irq_level);
    }

    /// QEMU's `set_interrupt_cause`: ICR becomes `causes`. With mitigation a rising line
    /// opens a window (the smallest of TADV for delayed transmit interrupts, RADV when
    /// RDTR is set, ITR; 128 us at least) in which further rises wait.
    fn set_interrupt_cause(&self, st: &mut State, causes: u32) {
        st.set(reg::ICR, causes);
        st.set(reg::ICS, causes);
        let pending = st.reg(reg::IMS) & causes;
        if !st.mit.irq_level && pending != 0 {
            if st.mit.timer_on {
                return;
            }
            if self.mitigation {
                let mut delay = 0u32;
                let mut consider = |units: u32| {
                    if units != 0 && (delay == 0 || units < delay) {
                        delay = units;
                    }
                };
                if st.mit.ide && pending & (bits::ICR_TXQE | bits::ICR_TXDW) != 0 {
                    consider(st.reg(reg::TADV) * 4);
                }
                if st.reg(reg::RDTR) != 0 && pending & bits::ICR_RXT0 != 0 {
                    consider(st.reg(reg::RADV) * 4);
                }
                consider(st.reg(reg::ITR));
                let delay = delay.max(MIT_MIN_DELAY);
                st.mit.timer_on = true;
                st.mit.ide = false;
                if let Err(e) = self.mit_timer.arm(Duration::from_nanos(u64::from(delay) * 256)) {
                    log::error!("e1000: cannot arm the mitigation timer: {e}");
                    st.mit.timer_on = false;
                }
            }
        }
        st.mit.irq_level = pending != 0;
        self.intx.set(st.mit.irq_level);
    }

    /// The mitigation window ended: a cause that waited raises the line now.
    fn mit_timer_expired(&self) {
        if !self.mit_timer.take_expired() {
            return;
        }
        let mut st = self.state.lock();
        if st.paused {
            // The window ends when the VM runs again (QEMU's virtual clock stops).
            return;
        }
        st.mit.timer_on = false;
        let icr = st.reg(reg::ICR);
        self.set_interrupt_cause(&mut st, icr);
    }

    /// QEMU's `set_ics`: `causes` join ICR.
    fn raise(&self, st: &mut State, causes: u32) {
        let all = st.reg(reg::ICR) | causes;
        self.set_interrupt_cause(st, all);
    }

    fn wake(&self) {
        self.card_loop.wake();
    }

    fn read_reg(&self, st: &mut State, offset: usize) -> u32 {
        let Some(kind) = access(offset) else {
            self.log.warn(|| format!("e1000: read of unknown register {offset:#x}"));
            return 0;
        };
        match (kind, offset) {
            (Access::Special, reg::ICR) => {
                let icr = st.reg(reg::ICR);
                self.set_interrupt_cause(st, 0);
                icr
            }
            (Access::Special, reg::EECD) => {
                let e = st.eecd;
                let mut value = bits::EECD_PRES | bits::EECD_GNT | e.old_eecd;
                let word = st.eeprom[((e.bitnum_out >> 4) & 0x3f) as usize];
                if !e.reading || (word >> ((e.bitnum_out & 0xf) ^ 0xf)) & 1 != 0 {
                    value |= bits::EECD_DO;
                }
                value
            }
            (Access::Special, reg::EERD) => {
                let eerd = st.reg(reg::EERD);
                if eerd & bits::EERD_START == 0 {
                    return eerd;
                }
                let r = eerd & !bits::EERD_START;
                let index = (r >> bits::EERD_ADDR_SHIFT) as usize;
                if index > EEPROM_CHECKSUM_REG {
                    return bits::EERD_DONE | r;
                }
                (u32::from(st.eeprom[index]) << bits::EERD_DATA_SHIFT) | bits::EERD_DONE | r
            }
            (Access::Special, reg::IMC) => 0,
            (Access::Statistic, o) => {
                let value = st.reg(o);
                match o {
                    // The low halves of 64-bit counters read without clearing; the high
                    // half clears both (QEMU's `mac_read_clr8`).
                    reg::GORCL | reg::GOTCL | reg::TORL | reg::TOTL => {}
                    reg::GORCH | reg::GOTCH | reg::TORH | reg::TOTH => {
                        st.set(o, 0);
                        st.set(o - 4, 0);
                    }
                    _ => st.set(o, 0),
                }
                value
            }
            _ => st.reg(offset),
        }
    }

    fn write_reg(&self, st: &mut State, offset: usize, value: u32) {
        let Some(kind) = access(offset) else {
            self.log.warn(|| format!("e1000: write of {value:#x} to unknown register {offset:#x}"));
            return;
        };
        match kind {
            Access::Plain => {
                st.set(offset, value);
                if offset == reg::RA || offset == reg::RA + 4 {
                    log::debug!("e1000: {} uses MAC {}", self.backend.name, format_mac(&st.mac()));
                }
            }
            Access::Masked(mask) => st.set(offset, value & mask),
            Access::ReadOnly | Access::Statistic => {}
            Access::Special => match offset {
                // Software reset is not modelled beyond its bit clearing itself, as QEMU's
                // card does; drivers reprogram everything after it.
                reg::CTRL => st.set(reg::CTRL, value & !bits::CTRL_RST),
                reg::EECD => set_eecd(st, value),
                reg::EERD => st.set(reg::EERD, value),
                reg::MDIC => self.set_mdic(st, value),
                reg::ICR => {
                    let icr = st.reg(reg::ICR) & !value;
                    self.set_interrupt_cause(st, icr);
                }
                reg::ICS => self.raise(st, value),
                reg::IMS => {
                    st.set(reg::IMS, st.reg(reg::IMS) | value);
                    self.raise(st, 0);
                }
                reg::IMC => {
                    st.set(reg::IMS, st.reg(reg::IMS) & !value);
                    self.raise(st, 0);
                }
                reg::RCTL => {
                    st.set(reg::RCTL, value);
                    self.wake();
                }
                reg::RDT | reg::TDT => {
                    st.set(offset, value & 0xffff);
                    self.wake();
                }
                reg::TCTL => {
                    st.set(reg::TCTL, value);
                    self.wake();
                }
                _ => st.set(offset, value),
            },
        }
    }

    /// QEMU's `set_mdic`: one PHY register read or written, on PHY address 1 only.
    fn set_mdic(&self, st: &mut State, value: u32) {
        let data = value & bits::MDIC_DATA_MASK;
        let addr = ((value >> bits::MDIC_REG_SHIFT) & 0x1f) as usize;
        let mut result = value;
        if (value >> bits::MDIC_PHY_SHIFT) & 0x1f != 1 {
            result = st.reg(reg::MDIC) | bits::MDIC_ERROR;
        } else if value & bits::MDIC_OP_READ != 0 {
            if phy::cap(addr) & phy::R == 0 {
                result |= bits::MDIC_ERROR;
            } else {
                result = (value ^ data) | u32::from(st.phy[addr]);
            }
        } else if value & bits::MDIC_OP_WRITE != 0 {
            if phy::cap(addr) & phy::W == 0 {
                result |= bits::MDIC_ERROR;
            } else if addr == phy::BMCR {
                self.set_phy_ctrl(st, data as u16);
            } else {
                st.phy[addr] = data as u16;
            }
        }
        st.set(reg::MDIC, result | bits::MDIC_READY);
        if value & bits::MDIC_INT_EN != 0 {
            self.raise(st, bits::ICR_MDAC);
        }
    }

    /// QEMU's `set_phy_ctrl`: reset and restart bits clear themselves; a restarted
    /// autonegotiation completes at once (there is no cable to negotiate with) and the
    /// link comes back if the backend's link is up.
    fn set_phy_ctrl(&self, st: &mut State, value: u16) {
        st.phy[phy::BMCR] = value & !(0x3f | phy::BMCR_RESET | phy::BMCR_ANRESTART);
        if value & phy::BMCR_ANRESTART != 0 && value & phy::BMCR_AUTOEN != 0 {
            let before = st.reg(reg::STATUS);
            link_down_regs(st);
            if self.link_up.load(Ordering::Acquire) {
                link_up_regs(st);
            }
            if st.reg(reg::STATUS) != before {
                self.raise(st, bits::ICR_LSC);
            }
        }
    }

    /// The loop's pass: held frames, the transmit ring, then frames from the backend;
    /// then which backend events to wait for.
    fn pass(&self) {
        self.card_loop.take_kick();
        let mut st = self.state.lock();
        st.pass_frames = 0;
        st.pass_rx_descs = 0;
        if !st.paused && st.bus_master {
            let mem = self.services.ram();
            st.tx_held.flush(self.backend.queue.as_ref());
            if st.tx_held.is_empty() {
                self.start_xmit(&mut st, &mem);
            }
            self.receive(&mut st, &mem);
        }
        let wanted = Interest {
            read: st.can_receive(),
            write: self.backend.tx_on_rx_fd() && !st.tx_held.is_empty() && !st.paused && st.bus_master,
        };
        self.card_loop.watch_backend(&mut st.interest, wanted);
    }

    /// Hands one frame to the backend, or holds it while the backend is full; in PHY
    /// loopback it comes back to the card's own receive side (QEMU's `e1000_send_packet`).
    fn send(&self, st: &mut State, frame: Vec<u8>) {
        st.pass_frames += 1;
        if st.phy[phy::BMCR] & phy::BMCR_LOOPBACK != 0 {
            // Looped frames walk the receive ring too: within the pass's budget.
            if st.can_receive() && st.pass_rx_descs < RX_PASS_DESCS {
                let mem = self.services.ram();
                self.deliver(st, &mem, &frame);
            }
            return;
        }
        if self.link_up.load(Ordering::Acquire) {
            st.tx_held.send(self.backend.queue.as_ref(), frame, TX_HELD_MAX_BYTES);
        }
    }

    /// QEMU's `start_xmit`: descriptors from TDH to TDT, each written back when the
    /// driver asked; stops at a full backend, and after one lap of a ring whose tail the
    /// guest set beyond it.
    fn start_xmit(&self, st: &mut State, mem: &GuestMemoryMmap) {
        if st.reg(reg::TCTL) & bits::TCTL_EN == 0 {
            return;
        }
        let ndesc = st.ring_len(reg::TDLEN);
        let tdh_start = st.reg(reg::TDH);
        if st.reg(reg::TDH) == st.reg(reg::TDT) {
            return;
        }
        if st.reg(reg::TDT) >= ndesc {
            // The head could never reach it: QEMU goes round once and stops; a pass
            // budget would make that lap endless, so none is gone (the driver is broken).
            self.log.warn(|| format!("e1000: transmit tail {:#x} outside a ring of {ndesc} descriptors", st.reg(reg::TDT)));
            return;
        }
        let base = (u64::from(st.reg(reg::TDBAH)) << 32) | u64::from(st.reg(reg::TDBAL));
        let mut cause = bits::ICR_TXQE;
        let mut descs = 0usize;
        while st.reg(reg::TDH) != st.reg(reg::TDT) {
            if descs >= TX_PASS_DESCS || st.pass_frames >= TX_PASS_FRAMES {
                // The rest in the loop's next pass, after its other handlers.
                self.wake();
                break;
            }
            descs += 1;
            if ndesc == 0 || tdh_start >= ndesc {
                self.log.warn(|| format!("e1000: transmit head {tdh_start:#x} outside a ring of {ndesc} descriptors"));
                break;
            }
            let at = base.wrapping_add(16 * u64::from(st.reg(reg::TDH)));
            let mut desc = [0u8; 16];
            if mem.read_slice(&mut desc, GuestAddress(at)).is_err() {
                self.log.warn(|| format!("e1000: transmit descriptor at {at:#x} outside guest RAM"));
                break;
            }
            self.process_tx_desc(st, mem, &desc);
            let lower = u32::from_le_bytes([desc[8], desc[9], desc[10], desc[11]]);
            if lower & (bits::TXD_CMD_RS | bits::TXD_CMD_RPS) != 0 {
                // Done, and no excess-collision, late-collision or underrun error.
                let status = (desc[12] | bits::TXD_STAT_DD) & !0x0e;
                if mem.write_slice(&[status], GuestAddress(at + 12)).is_ok() {
                    self.services.dirty_tracker().mark(at + 12, 1);
                }
                cause |= bits::ICR_TXDW;
            }
            let next = st.reg(reg::TDH) + 1;
            st.set(reg::TDH, if next >= ndesc { 0 } else { next });
            if st.reg(reg::TDH) == tdh_start {
                self.log.warn(|| format!("e1000: transmit tail {:#x} outside a ring of {ndesc} descriptors", st.reg(reg::TDT)));
                break;
            }
            if !st.tx_held.is_empty() {
                break;
            }
        }
        self.raise(st, cause);
    }

    /// QEMU's `process_tx_desc`: a context descriptor sets the offloads; data and legacy
    /// descriptors add their buffer to the frame, which goes out at EOP (a TSO frame
    /// segment by segment as each fills).
    fn process_tx_desc(&self, st: &mut State, mem: &GuestMemoryMmap, desc: &[u8; 16]) {
        let lower = u32::from_le_bytes([desc[8], desc[9], desc[10], desc[11]]);
        let dtype = lower & (bits::TXD_CMD_DEXT | bits::TXD_DTYP_D);
        st.mit.ide |= lower & bits::TXD_CMD_IDE != 0;
        let mut split = (lower & 0xffff) as usize;
        let mut addr = u64::from_le_bytes(desc[0..8].try_into().unwrap_or_default());
        if dtype == bits::TXD_CMD_DEXT {
            let props = TxProps::from_context(desc);
            if props.tse {
                st.tx.tso_props = props;
                st.tx.tso_frames = 0;
            } else {
                st.tx.props = props;
            }
            return;
        } else if dtype == bits::TXD_CMD_DEXT | bits::TXD_DTYP_D {
            if st.tx.data.is_empty() {
                st.tx.sum_needed = desc[13];
            }
            st.tx.cptse = lower & bits::TXD_CMD_TSE != 0;
        } else {
            st.tx.cptse = false;
        }
        if st.reg(reg::CTRL) & bits::CTRL_VME != 0
            && lower & bits::TXD_CMD_VLE != 0
            && (st.tx.cptse || lower & bits::TXD_CMD_EOP != 0)
        {
            st.tx.vlan_needed = true;
            let vet = (st.reg(reg::VET) as u16).to_be_bytes();
            st.tx.vlan_header = [vet[0], vet[1], desc[15], desc[14]];
        }
        if st.tx.cptse {
            let hdr_len = usize::from(st.tx.tso_props.hdr_len);
            let msh = hdr_len + usize::from(st.tx.tso_props.mss);
            loop {
                let size = st.tx.data.len();
                if size >= msh {
                    break;
                }
                let bytes = split.min(msh - size).min(TX_BUF - size);
                if bytes == 0 {
                    break;
                }
                if !self.dma_append(st, mem, addr, bytes) {
                    break;
                }
                let sz = size + bytes;
                if sz >= hdr_len && size < hdr_len {
                    st.tx.header = st.tx.data[..hdr_len].to_vec();
                }
                addr = addr.wrapping_add(bytes as u64);
                split -= bytes;
                if sz == msh {
                    self.xmit_seg(st);
                    // The next segment starts with this frame's headers: the context's
                    // length of them, whatever an earlier frame left.
                    let mut header = st.tx.header.clone();
                    header.resize(hdr_len, 0);
                    st.tx.data = header;
                }
                if split == 0 {
                    break;
                }
            }
        } else {
            let bytes = split.min(TX_BUF - st.tx.data.len());
            self.dma_append(st, mem, addr, bytes);
        }
        if lower & bits::TXD_CMD_EOP == 0 {
            return;
        }
        // A TSO frame whose payload ended on a segment boundary has nothing left: QEMU
        // sends its bare headers as one more segment, a duplicate ACK for the peer.
        let hdr_len = usize::from(st.tx.tso_props.hdr_len);
        let rest = st.tx.data.len();
        let nothing_left = rest < hdr_len || (rest == hdr_len && st.tx.tso_frames > 0);
        if !(st.tx.cptse && nothing_left) {
            self.xmit_seg(st);
        }
        st.tx.tso_frames = 0;
        st.tx.sum_needed = 0;
        st.tx.vlan_needed = false;
        st.tx.data.clear();
        st.tx.cptse = false;
    }

    /// Appends `len` bytes of guest memory at `addr` to the frame; `false` (and nothing
    /// appended) if they are not all guest RAM.
    fn dma_append(&self, st: &mut State, mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
        let start = st.tx.data.len();
        st.tx.data.resize(start + len, 0);
        if mem.read_slice(&mut st.tx.data[start..], GuestAddress(addr)).is_err() {
            st.tx.data.truncate(start);
            self.log.warn(|| format!("e1000: transmit buffer at {addr:#x} (+{len}) outside guest RAM"));
            return false;
        }
        true
    }

    /// QEMU's `xmit_seg`: one frame (a TSO segment with its IP length, IP id and TCP
    /// sequence fixed up), checksums inserted, the VLAN tag put in; then sent and counted.
    fn xmit_seg(&self, st: &mut State) {
        let tx = &mut st.tx;
        let props = if tx.cptse { tx.tso_props } else { tx.props };
        let size = tx.data.len();
        let data = &mut tx.data;
        // The last segment of a TSO frame cut in several (QEMU's TSCTC count).
        let mut last_of_many = false;
        if tx.cptse {
            let css = usize::from(props.ipcss);
            if props.ip {
                put_be16(data, css + 2, size.saturating_sub(css) as u16);
                let id = get_be16(data, css + 4).wrapping_add(tx.tso_frames as u16);
                put_be16(data, css + 4, id);
            } else {
                put_be16(data, css + 4, size.saturating_sub(css) as u16);
            }
            let css = usize::from(props.tucss);
            let len = size.saturating_sub(css);
            if props.tcp {
                let sofar = tx.tso_frames.wrapping_mul(u32::from(props.mss));
                let seq = get_be32(data, css + 4).wrapping_add(sofar);
                put_be32(data, css + 4, seq);
                if props.paylen.wrapping_sub(sofar) > u32::from(props.mss) {
                    // PSH and FIN only on the last segment.
                    if let Some(flags) = data.get_mut(css + 13) {
                        *flags &= !9;
                    }
                } else {
                    last_of_many = tx.tso_frames > 0;
                }
            } else {
                put_be16(data, css + 4, len as u16);
            }
            if tx.sum_needed & bits::TXD_POPTS_TXSM != 0 {
                // The driver left the pseudo-header sum without the length: add it.
                let at = usize::from(props.tucso);
                let sum = u32::from(get_be16(data, at)) + len as u32;
                put_be16(data, at, ((sum >> 16) + (sum & 0xffff)) as u16);
            }
            tx.tso_frames = tx.tso_frames.wrapping_add(1);
        }
        if tx.sum_needed & bits::TXD_POPTS_TXSM != 0 {
            put_sum(data, props.tucso, props.tucss, props.tucse);
        }
        if tx.sum_needed & bits::TXD_POPTS_IXSM != 0 {
            put_sum(data, props.ipcso, props.ipcss, props.ipcse);
        }
        let frame = if tx.vlan_needed && size >= 12 {
            let mut f = Vec::with_capacity(size + 4);
            f.extend_from_slice(&data[..12]);
            f.extend_from_slice(&tx.vlan_header);
            f.extend_from_slice(&data[12..]);
            f
        } else {
            data.clone()
        };
        let (bcast, mcast) = match frame.get(0..6) {
            Some(d) => (d == [0xff; 6], d[0] & 1 != 0),
            None => (false, false),
        };
        st.count_size(reg::PTC64, frame.len() + 4);
        self.send(st, frame);
        st.count(reg::TPT);
        st.count(reg::GPTC);
        st.grow64(reg::TOTL, size as u64 + 4);
        st.grow64(reg::GOTCL, size as u64 + 4);
        if bcast {
            st.count(reg::BPTC);
        } else if mcast {
            st.count(reg::MPTC);
        }
        if last_of_many {
            st.count(reg::TSCTC);
        }
    }

    /// Frames from the backend while the card can take them.
    fn receive(&self, st: &mut State, mem: &GuestMemoryMmap) {
        let mut buf = vec![0u8; RX_BUF];
        for _ in 0..RX_BURST {
            if !st.can_receive() {
                return;
            }
            if st.pass_rx_descs >= RX_PASS_DESCS {
                self.wake();
                return;
            }
            let n = match self.backend.queue.receive(&[VolatileSlice::from(&mut buf[..])]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("e1000: backend receive failed: {e}");
                    return;
                }
            };
            self.deliver(st, mem, &buf[..n.min(RX_BUF)]);
        }
        // More may wait: the loop comes back (the descriptor stays readable).
    }

    /// QEMU's `e1000_receive_iov`: one frame into as many receive descriptors as it
    /// needs, or dropped (filtered, oversized, no room).
    fn deliver(&self, st: &mut State, mem: &GuestMemoryMmap, frame: &[u8]) {
        let mut padded;
        let mut frame = frame;
        if frame.len() < MIN_FRAME {
            padded = frame.to_vec();
            padded.resize(MIN_FRAME, 0);
            frame = &padded;
        }
        let rctl = st.reg(reg::RCTL);
        let limit = if rctl & bits::RCTL_LPE != 0 { MAX_FRAME_LPE } else { MAX_FRAME_VLAN };
        if frame.len() > limit && rctl & bits::RCTL_SBP == 0 {
            st.count(reg::ROC);
            return;
        }
        if !st.accepts(frame) {
            return;
        }
        let mut special = 0u16;
        let mut vlan_status = 0u8;
        if st.reg(reg::CTRL) & bits::CTRL_VME != 0 && st.is_vlan(frame) {
            special = u16::from_be_bytes([frame[14], frame[15]]);
            let mut stripped = Vec::with_capacity(frame.len() - 4);
            stripped.extend_from_slice(&frame[..12]);
            stripped.extend_from_slice(&frame[16..]);
            padded = stripped;
            frame = &padded;
            vlan_status = bits::RXD_STAT_VP;
        }
        let size = frame.len();
        let fcs = if rctl & bits::RCTL_SECRC != 0 { 0 } else { 4 };
        let total = size + fcs;
        if !st.has_rxbufs(total) {
            // QEMU's `e1000_receiver_overrun`.
            st.count(reg::RNBC);
            st.count(reg::MPC);
            self.raise(st, bits::ICR_RXO);
            return;
        }
        let bufsize = st.rxbuf_size();
        let ndesc = st.ring_len(reg::RDLEN);
        let rdh_start = st.reg(reg::RDH);
        let base = (u64::from(st.reg(reg::RDBAH)) << 32) | u64::from(st.reg(reg::RDBAL));
        let mut offset = 0usize;
        while offset < total {
            if ndesc == 0 || rdh_start >= ndesc {
                self.log.warn(|| format!("e1000: receive head {rdh_start:#x} outside a ring of {ndesc} descriptors"));
                st.count(reg::MPC);
                self.raise(st, bits::ICR_RXO);
                return;
            }
            let desc_size = (total - offset).min(bufsize);
            let at = base.wrapping_add(16 * u64::from(st.reg(reg::RDH)));
            let mut desc = [0u8; 16];
            if mem.read_slice(&mut desc, GuestAddress(at)).is_err() {
                self.log.warn(|| format!("e1000: receive descriptor at {at:#x} outside guest RAM"));
                return;
            }
            let buffer = u64::from_le_bytes(desc[0..8].try_into().unwrap_or_default());
            let mut status = desc[12] & !bits::RXD_STAT_DD;
            if buffer != 0 {
                if offset < size {
                    let copy = (size - offset).min(bufsize);
                    if mem.write_slice(&frame[offset..offset + copy], GuestAddress(buffer)).is_ok() {
                        self.services.dirty_tracker().mark(buffer, copy as u64);
                    } else {
                        self.log.warn(|| format!("e1000: receive buffer at {buffer:#x} outside guest RAM"));
                    }
                }
                offset += desc_size;
                desc[8..10].copy_from_slice(&(desc_size as u16).to_le_bytes());
                if offset >= total {
                    status |= bits::RXD_STAT_EOP | bits::RXD_STAT_IXSM;
                } else {
                    status &= !bits::RXD_STAT_EOP;
                }
            }
            // A descriptor without a buffer is skipped, as the hardware does.
            desc[12] = status | vlan_status | bits::RXD_STAT_DD;
            desc[13] = 0;
            desc[14..16].copy_from_slice(&special.to_le_bytes());
            if mem.write_slice(&desc[8..16], GuestAddress(at + 8)).is_ok() {
                self.services.dirty_tracker().mark(at + 8, 8);
            }
            st.pass_rx_descs += 1;
            let next = st.reg(reg::RDH) + 1;
            st.set(reg::RDH, if next >= ndesc { 0 } else { next });
            if st.reg(reg::RDH) == rdh_start {
                self.log.warn(|| format!("e1000: receive tail {:#x} outside a ring of {ndesc} descriptors", st.reg(reg::RDT)));
                st.count(reg::MPC);
                self.raise(st, bits::ICR_RXO);
                return;
            }
        }
        st.count(reg::TPR);
        st.count(reg::GPRC);
        st.count_size(reg::PRC64, total);
        st.grow64(reg::TORL, size as u64 + 4);
        st.grow64(reg::GORCL, size as u64 + 4);
        if frame[0..6] == [0xff; 6] {
            st.count(reg::BPRC);
        } else if frame[0] & 1 != 0 {
            st.count(reg::MPRC);
        }
        let mut cause = bits::ICR_RXT0;
        let (rdh, mut rdt) = (st.reg(reg::RDH), st.reg(reg::RDT));
        if rdt < rdh {
            rdt += ndesc;
        }
        let min_shift = ((rctl >> bits::RCTL_RDMTS_SHIFT) & 3) + 1;
        if (rdt - rdh) * 16 <= st.reg(reg::RDLEN) >> min_shift {
            cause |= bits::ICR_RXDMT0;
        }
        self.raise(st, cause);
    }
}

/// QEMU's `set_eecd`: the driver bit-bangs a Microwire READ (opcode 6, a 6-bit word
/// address) and clocks the word out on DO.
fn set_eecd(st: &mut State, value: u32) {
    let old = st.eecd.old_eecd;
    let kept = bits::EECD_SK | bits::EECD_CS | bits::EECD_DI | bits::EECD_FWE_MASK | bits::EECD_REQ;
    st.eecd.old_eecd = value & kept;
    if value & bits::EECD_CS == 0 {
        return;
    }
    let e = &mut st.eecd;
    if (value ^ old) & bits::EECD_CS != 0 {
        // Chip select rises: a new command.
        e.val_in = 0;
        e.bitnum_in = 0;
        e.bitnum_out = 0;
        e.reading = false;
    }
    if (value ^ old) & bits::EECD_SK == 0 {
        return;
    }
    if value & bits::EECD_SK == 0 {
        // Falling clock: the next output bit.
        e.bitnum_out = e.bitnum_out.wrapping_add(1);
        return;
    }
    e.val_in = (e.val_in << 1) | u32::from(value & bits::EECD_DI != 0);
    e.bitnum_in = e.bitnum_in.wrapping_add(1);
    if e.bitnum_in == 9 && !e.reading {
        e.bitnum_out = ((e.val_in & 0x3f) << 4).wrapping_sub(1);
        e.reading = (e.val_in >> 6) & 7 == EEPROM_READ_OPCODE;
    }
}

/// QEMU's `e1000x_update_regs_on_link_down`.
fn link_down_regs(st: &mut State) {
    st.set(reg::STATUS, st.reg(reg::STATUS) & !bits::STATUS_LU);
    st.phy[phy::BMSR] &= !(phy::BMSR_LINK_ST | phy::BMSR_AN_COMP);
    st.phy[phy::ANLPAR] &= !phy::ANLPAR_ACK;
}

/// QEMU's `e1000_link_up` with autonegotiation complete.
fn link_up_regs(st: &mut State) {
    st.set(reg::STATUS, st.reg(reg::STATUS) | bits::STATUS_LU);
    st.phy[phy::BMSR] |= phy::BMSR_LINK_ST | phy::BMSR_AN_COMP;
    st.phy[phy::ANLPAR] |= phy::ANLPAR_ACK;
}

fn get_be16(data: &[u8], at: usize) -> u16 {
    match data.get(at..at + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]),
        None => 0,
    }
}

fn put_be16(data: &mut [u8], at: usize, value: u16) {
    if let Some(b) = data.get_mut(at..at + 2) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

fn get_be32(data: &[u8], at: usize) -> u32 {
    match data.get(at..at + 4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

fn put_be32(data: &mut [u8], at: usize, value: u32) {
    if let Some(b) = data.get_mut(at..at + 4) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

/// QEMU's `putsum`: the checksum of `data[css..=cse]` (to the end when `cse` is 0) at
/// `sloc`, never 0 (UDP's "no checksum").
fn put_sum(data: &mut [u8], sloc: u8, css: u8, cse: u16) {
    let mut n = data.len();
    let (sloc, css, cse) = (usize::from(sloc), usize::from(css), usize::from(cse));
    if cse != 0 && cse < n {
        n = cse + 1;
    }
    if css >= n || sloc + 1 >= n {
        return;
    }
    let mut sum = checksum_add(&data[css..n]);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let folded = !(sum as u16);
    put_be16(data, sloc, if folded == 0 { 0xffff } else { folded });
}

impl LoopCard for E1000 {
    fn serve(&self) {
        self.pass();
    }

    fn timer_expired(&self) {
        self.mit_timer_expired();
    }

    /// Frames follow the VM: none move while it is stopped, so a migration's last pass
    /// sees guest memory the card no longer writes.
    fn run_state_changed(&self, running: bool) {
        let mut st = self.state.lock();
        st.paused = !running;
        if running && st.mit.timer_on && self.mit_timer.arm(Duration::from_micros(1)).is_err() {
            // No timer to end the window: end it now, or causes wait for good.
            st.mit.timer_on = false;
            let icr = st.reg(reg::ICR);
            self.set_interrupt_cause(&mut st, icr);
        }
        drop(st);
        if running {
            self.wake();
        }
    }
}

/// BAR 0: the register file, 32 bits wide; narrower accesses read or merge into the
/// register they fall in.
struct Mmio(Arc<E1000>);

impl MemoryRegionOps for Mmio {
    fn read(&self, offset: u64, size: u32) -> u64 {
        let at = (offset & !3) as usize;
        let value = {
            let mut st = self.0.state.lock();
            self.0.read_reg(&mut st, at)
        };
        let shift = 8 * (offset & 3);
        let mask = if size >= 4 { u64::from(u32::MAX) } else { (1u64 << (8 * size)) - 1 };
        (u64::from(value) >> shift) & mask
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        let at = (offset & !3) as usize;
        let mut st = self.0.state.lock();
        let value = if size >= 4 && offset & 3 == 0 {
            value as u32
        } else {
            let shift = 8 * (offset & 3);
            let mask = (((1u64 << (8 * size.min(4))) - 1) << shift) as u32;
            let lanes = ((value << shift) as u32) & mask;
            // Registers whose written ones act (clear, set or mask causes) take zeros in
            // the lanes not written; the others keep their bytes.
            if matches!(at, reg::ICR | reg::ICS | reg::IMS | reg::IMC) {
                lanes
            } else {
                (st.reg(at) & !mask) | lanes
            }
        };
        self.0.write_reg(&mut st, at, value);
    }
}

/// BAR 1: IOADDR (offset 0) selects a register, IODATA (offset 4) reads or writes it.
struct IoPorts(Arc<E1000>);

impl MemoryRegionOps for IoPorts {
    fn read(&self, offset: u64, _size: u32) -> u64 {
        let mut st = self.0.state.lock();
        match offset {
            0 => u64::from(st.ioaddr),
            4 => {
                let at = (st.ioaddr & 0x1fffc) as usize;
                u64::from(self.0.read_reg(&mut st, at))
            }
            _ => 0,
        }
    }

    fn write(&self, offset: u64, value: u64, _size: u32) {
        let mut st = self.0.state.lock();
        match offset {
            0 => st.ioaddr = value as u32,
            4 => {
                let at = (st.ioaddr & 0x1fffc) as usize;
                self.0.write_reg(&mut st, at, value as u32);
            }
            _ => {}
        }
    }
}

impl Nic for E1000 {
    fn name(&self) -> &str {
        &self.backend.name
    }

    fn model(&self) -> &'static str {
        self.model.type_name
    }

    fn netdev_id(&self) -> &str {
        &self.backend.netdev_id
    }

    fn netdev(&self) -> &Arc<dyn Netdev> {
        &self.backend.netdev
    }

    fn mac(&self) -> [u8; 6] {
        self.state.lock().mac()
    }

    fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// QEMU's `e1000_set_link_status`: STATUS and the PHY follow, LSC tells the driver.
    fn set_link(&self, up: bool) {
        if self.link_up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        let mut st = self.state.lock();
        let before = st.reg(reg::STATUS);
        if up {
            link_up_regs(&mut st);
        } else {
            link_down_regs(&mut st);
        }
        if st.reg(reg::STATUS) != before {
            self.raise(&mut st, bits::ICR_LSC);
        }
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

/// The migrated state: registers (only those not zero), PHY, EEPROM, the frame being
/// assembled.
#[derive(Serialize, Deserialize)]
struct Saved {
    regs: Vec<(u32, u32)>,
    phy: Vec<u16>,
    eeprom: Vec<u16>,
    eecd: EecdState,
    tx: TxState,
    ioaddr: u32,
}

/// QEMU's `E1000State` as a PCI function: the family's base (QEMU's `e1000-base`), whose
/// three cards are siblings, so `-global e1000.PROP` and the machines' compat properties
/// for `e1000` do not reach the other two.
#[derive(qom::Object)]
#[qom(name = TYPE_E1000_BASE, abstract, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct E1000Pci {
    #[parent]
    parent: PciDevice,
    #[property(desc = "ID of a netdev to use as a backend")]
    netdev: Prop<Option<String>>,
    #[property(desc = "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56")]
    mac: Prop<Option<String>>,
    #[property(name = "init-vet", default = true, desc = "Start with the VLAN ethertype 0x8100 in VET")]
    init_vet: Prop<bool>,
    #[property(default = true, desc = "Pace interrupts by ITR, RADV and TADV")]
    mitigation: Prop<bool>,
    #[property(desc = "ID of the iothread moving the frames (default: the main loop)")]
    iothread: Prop<Option<String>>,
    /// Read by the board for the firmware's boot order (its iPXE ROM boots the card).
    #[property(default = -1, desc = "Boot order of the card (firmware)")]
    bootindex: Prop<i32>,
    card: OnceLock<Arc<E1000>>,
}

type_init!(E1000Pci);

/// Errors of `e1000`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
enum E1000Error {
    #[error(transparent)]
    Backend(#[from] NicBackendError),
    /// The card's type, then the value.
    #[error("Property '{0}.mac' doesn't take value '{1}'")]
    Mac(&'static str, String),
    #[error("Property '{0}.iothread' can't find value '{1}'")]
    IothreadNotFound(&'static str, String),
    #[error("cannot set up the card's event loop: {0}")]
    Host(io::Error),
}

impl DeviceImpl for E1000Pci {
    const DESCRIPTION: Option<&'static str> = Some("Intel Gigabit Ethernet");
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
            // Gone from the monitor and from its backend now, although the card itself
            // lives on while its regions are referenced.
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
            let saved = Saved {
                regs: st
                    .regs
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0)
                    .map(|(i, v)| (i as u32, *v))
                    .collect(),
                phy: st.phy.to_vec(),
                eeprom: st.eeprom.to_vec(),
                eecd: st.eecd,
                tx: st.tx.clone(),
                ioaddr: st.ioaddr,
            };
            s.put("card", &saved);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.parent.load_pci_state(state)?;
        let saved: Saved = state.get("card")?;
        let bad = |reason: String| VmStateError::BadField {
            field: "card".into(),
            reason,
        };
        let phy: [u16; 32] = saved.phy.try_into().map_err(|_| bad("PHY is not 32 registers".into()))?;
        let eeprom: [u16; 64] =
            saved.eeprom.try_into().map_err(|_| bad("EEPROM is not 64 words".into()))?;
        if saved.tx.data.len() > TX_BUF || saved.tx.header.len() > 255 {
            return Err(bad("transmit frame larger than the card's buffer".into()));
        }
        let mut regs = vec![0u32; NREGS].into_boxed_slice();
        for (index, value) in saved.regs {
            let offset = (index as usize).saturating_mul(4);
            // Masked as the guest's own writes are, so ring arithmetic stays in range.
            let value = match access(offset) {
                Some(Access::Masked(mask)) => value & mask,
                Some(_) if offset == reg::RDT || offset == reg::TDT => value & 0xffff,
                Some(_) if index < NREGS as u32 => value,
                _ => return Err(bad(format!("register {offset:#x} is not the card's"))),
            };
            regs[index as usize] = value;
        }
        self.update_bus_master();
        if let Some(card) = self.card.get() {
            let running = card.services.vm().is_running();
            let mut st = card.state.lock();
            st.regs = regs;
            st.phy = phy;
            st.eeprom = eeprom;
            st.eecd = saved.eecd;
            st.tx = saved.tx;
            st.ioaddr = saved.ioaddr;
            st.paused = !running;
            st.tx_held.clear();
            // The link as the source had it (QEMU's post_load): a `set_link` there holds.
            let link = st.reg(reg::STATUS) & bits::STATUS_LU != 0;
            card.link_up.store(link, Ordering::Release);
            card.update_irq(&mut st);
            drop(st);
            card.wake();
        }
        Ok(())
    }
}

impl E1000Pci {
    fn update_bus_master(&self) {
        let command = self.parent.read_config(config::COMMAND, 2) as u16;
        if let Some(card) = self.card.get() {
            card.state.lock().bus_master = command & config::COMMAND_MASTER != 0;
            card.wake();
        }
    }

    fn realize_card(&self, ctx: &DeviceContext, model: Variant) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let err = RealizeError::device;
        let context = match self.iothread.get() {
            Some(id) => iothread_context(&id).ok_or(err(E1000Error::IothreadNotFound(model.type_name, id)))?,
            None => services.try_main_context().map_err(|e| err(E1000Error::Host(e)))?,
        };
        let mac = match self.mac.get() {
            Some(text) => parse_mac(&text).ok_or_else(|| err(E1000Error::Mac(model.type_name, text)))?,
            None => nic::default_mac(),
        };
        // One queue pair, whole frames: the card segments and checksums in software.
        let backend = NicBackend::attach(model.type_name, self.parent.id(), self.netdev.get())
            .map_err(|e| err(E1000Error::Backend(e)))?;
        let card_loop = CardLoop::new(model.type_name, context).map_err(|e| err(E1000Error::Host(e)))?;
        let mit_timer = DeviceTimer::new().map_err(|e| err(E1000Error::Host(e)))?;
        let card = Arc::new(E1000 {
            state: Mutex::new(State::new(
                eeprom_contents(&mac, model.device_id),
                !services.vm().is_running(),
            )),
            backend,
            services: services.clone(),
            intx: self.parent.intx(),
            card_loop,
            link_up: AtomicBool::new(true),
            conf_mac: mac,
            init_vet: self.init_vet.get(),
            model,
            mitigation: self.mitigation.get(),
            mit_timer,
            log: RateLimitedLog::default(),
        });
        {
            let mut st = card.state.lock();
            card.reset(&mut st);
        }
        // From here on the card's regions hold it: a failure lets the backend go itself.
        let mmio = MemoryRegion::new_io("e1000-mmio", MMIO_SIZE, Arc::new(Mmio(card.clone())));
        let io = MemoryRegion::new_io("e1000-io", IO_SIZE, Arc::new(IoPorts(card.clone())));
        if let Err(e) = self
            .register_bar(0, BarKind::Mem32, mmio)
            .and_then(|()| self.register_bar(1, BarKind::Io, io))
        {
            card.backend.release();
            return Err(e);
        }
        if let Err(e) = card.card_loop.start(
            &card,
            card.backend.queue.rx_fd(),
            card.mit_timer.as_raw_fd(),
            services.vm(),
        ) {
            card.backend.release();
            return Err(RealizeError::device(E1000Error::Host(e)));
        }
        let weak: Weak<E1000> = Arc::downgrade(&card);
        let nic_ref: Weak<dyn Nic> = weak;
        nic::register(nic_ref);
        let _ = self.card.set(card);
        self.update_bus_master();
        Ok(())
    }
}

impl PciDeviceImpl for E1000Pci {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = DEVICE_ID_82540EM;
    const REVISION: u8 = 0x03;
    /// Network controller, Ethernet.
    const CLASS_ID: u16 = 0x0200;
    const INTERRUPT_PIN: u8 = 1;
    /// iPXE's boot ROM for the card, as QEMU's (Debian package ipxe-qemu).
    const ROMFILE: Option<&'static str> = Some(E1000_ROMFILE);

    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
        self.update_bus_master();
    }
}

/// QEMU's three cards of the family: the same device under its PCI device id (the EEPROM
/// carries it too) and PHY (the 82544GC's is another).
macro_rules! e1000_variant {
    ($name:ident, $type_name:literal, $device_id:expr, $phy_id2:expr, $description:literal) => {
        #[doc = concat!("QEMU's `", $description, "` card.")]
        #[derive(qom::Object)]
        #[qom(name = $type_name, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
        pub struct $name {
            #[parent]
            parent: E1000Pci,
        }

        type_init!($name);

        impl DeviceImpl for $name {
            const DESCRIPTION: Option<&'static str> = Some($description);
            const CATEGORY: DeviceCategory = DeviceCategory::Network;

            fn save_state(&self) -> Result<VmStateSection, VmStateError> {
                self.parent.save_state()
            }

            fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
                self.parent.load_state(state)
            }
        }

        impl PciDeviceImpl for $name {
            const VENDOR_ID: u16 = 0x8086;
            const DEVICE_ID: u16 = $device_id;
            const REVISION: u8 = 0x03;
            const CLASS_ID: u16 = 0x0200;
            const INTERRUPT_PIN: u8 = 1;
            const ROMFILE: Option<&'static str> = Some(E1000_ROMFILE);

            fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
                let model = Variant {
                    type_name: $type_name,
                    device_id: $device_id,
                    phy_id2: $phy_id2,
                };
                self.parent.realize_card(ctx, model)
            }

            fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
                self.parent.update_bus_master();
            }
        }
    };
}

e1000_variant!(E1000Variant82540em, "e1000", DEVICE_ID_82540EM, PHY_ID2_82540EM, "Intel Gigabit Ethernet");
e1000_variant!(E1000Variant82544gc, "e1000-82544gc", 0x100c, PHY_ID2_82544GC, "Intel Gigabit Ethernet (82544GC)");
e1000_variant!(E1000Variant82545em, "e1000-82545em", 0x100f, PHY_ID2_82540EM, "Intel Gigabit Ethernet (82545EM)");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eeprom_holds_the_mac_and_sums_to_0xbaba() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let e = eeprom_contents(&mac, DEVICE_ID_82540EM);
        assert_eq!(&e[0..3], &[0x5452, 0x1200, 0x5634]);
        assert_eq!(e[11], 0x100e);
        assert_eq!(e.iter().fold(0u16, |a, &w| a.wrapping_add(w)), 0xbaba);
    }

    #[test]
    fn checksums_are_rfc_1071_and_never_zero() {
        // The IPv4 header of the common worked example (192.168.0.1 -> 192.168.0.199,
        // UDP, 115 bytes): its checksum is 0xb861.
        let mut ip = vec![
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        put_sum(&mut ip, 10, 0, 19);
        assert_eq!(&ip[10..12], &[0xb8, 0x61]);
        // A checksum field past the end is left alone.
        let mut short = vec![1u8, 2, 3];
        put_sum(&mut short, 4, 0, 0);
        assert_eq!(short, vec![1, 2, 3]);
    }

    #[test]
    fn receive_buffer_sizes_follow_rctl() {
        let mut st = State::new([0; 64], false);
        st.bus_master = true;
        assert_eq!(st.rxbuf_size(), 2048);
        st.set(reg::RCTL, 3 << 16);
        assert_eq!(st.rxbuf_size(), 256);
        st.set(reg::RCTL, bits::RCTL_BSEX | 1 << 16);
        assert_eq!(st.rxbuf_size(), 16384);
        // A ring of 8 descriptors with head 6 and tail 2 has 4 buffers.
        st.set(reg::RCTL, 0);
        st.set(reg::RDLEN, 8 * 16);
        st.set(reg::RDH, 6);
        st.set(reg::RDT, 2);
        assert!(st.has_rxbufs(4 * 2048));
        assert!(!st.has_rxbufs(4 * 2048 + 1));
    }

    #[test]
    fn microwire_reads_clock_out_the_addressed_word() {
        let mut st = State::new(eeprom_contents(&[0x52, 0x54, 0, 0x12, 0x34, 0x56], DEVICE_ID_82540EM), false);
        st.bus_master = true;
        let cs = bits::EECD_CS;
        set_eecd(&mut st, cs);
        // Opcode 110 (READ), then address 000010: 9 bits, MSB first.
        for bit in [1, 1, 0, 0, 0, 0, 0, 1, 0] {
            let di = if bit == 1 { bits::EECD_DI } else { 0 };
            set_eecd(&mut st, cs | di);
            set_eecd(&mut st, cs | di | bits::EECD_SK);
            set_eecd(&mut st, cs | di);
        }
        let mut word = 0u16;
        for _ in 0..16 {
            set_eecd(&mut st, cs | bits::EECD_SK);
            let e = st.eecd;
            let bit = (st.eeprom[((e.bitnum_out >> 4) & 0x3f) as usize] >> ((e.bitnum_out & 0xf) ^ 0xf)) & 1;
            word = (word << 1) | bit;
            set_eecd(&mut st, cs);
        }
        assert_eq!(word, 0x5634);
    }
}
