//! `rtl8139` (QEMU's Realtek RTL8139C+, PCI 10ec:8139 revision 0x20) on the pc board under
//! the qtest accelerator, driven the way Linux drives it: 8139too's classic mode (four
//! transmit status/address pairs, a receive ring buffer read through CAPR) over the I/O
//! BAR, 8139cp's C+ mode (16-byte descriptor rings, checksum and segmentation offload,
//! VLAN tags, the tally counters) over the memory BAR, and the 93C46 EEPROM bit-banged
//! through Cfg9346 exactly as both drivers do. The backend is a datagram socket pair whose
//! far end is the test, so every frame the card sends or takes is visible. Frames move on
//! the main loop, so every wait polls against a deadline. Expected values come from QEMU's
//! hw/net/rtl8139.c (its reset values, its receive header, its 93C46 model).

use std::cell::Cell;
use std::ops::Deref;
use std::time::Duration;

use hw::core::machine::machine_state;
use hw::core::runstate;
use qom::ObjectRef;
use test_support::nic_card::{
    assert_each_refused, device, ether, migrate, pc_with_nic, sum16, wait_until, FramePeer, PciNic,
    DEVFN,
};
use test_support::qtest::with_deadline;

/// The `mac` property.
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x02];
/// An address the driver programs over the property's.
const NEW_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x99];
/// The far end's address.
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
/// Some other host's.
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];
const BCAST: [u8; 6] = [0xff; 6];
const RAM_SIZE: u64 = 128 << 20;

// Guest RAM layout.
/// The classic receive ring buffer (up to 64 KiB, then 8139too's 16 + 2048 bytes of pad).
const RX_RING: u64 = 0x10_0000;
/// The classic transmit buffers, 8 KiB apart.
const TX_BUFS: u64 = 0x14_0000;
/// C+ receive and transmit descriptor rings, the tally counter block.
const CP_RX_RING: u64 = 0x18_0000;
const CP_TX_RING: u64 = 0x18_1000;
const TALLY: u64 = 0x18_2000;
/// C+ receive buffers (8 KiB apart) and transmit buffers (16 KiB apart).
const CP_RX_BUFS: u64 = 0x20_0000;
const CP_TX_BUFS: u64 = 0x30_0000;

// Registers (the same offsets in BAR 0's ports and BAR 1's memory).
const MAC0: u64 = 0x00;
const MAR0: u64 = 0x08;
/// TxStatus0-3; DTCCR (the tally dump address) in C+ mode.
const TX_STATUS0: u64 = 0x10;
/// TxAddr0-3; the C+ transmit ring's address in TxAddr0/1.
const TX_ADDR0: u64 = 0x20;
const RX_BUF: u64 = 0x30;
const CHIP_CMD: u64 = 0x37;
const CAPR: u64 = 0x38;
const CBR: u64 = 0x3a;
const INTR_MASK: u64 = 0x3c;
const INTR_STATUS: u64 = 0x3e;
const TX_CONFIG: u64 = 0x40;
const RX_CONFIG: u64 = 0x44;
const RX_MISSED: u64 = 0x4c;
const CFG9346: u64 = 0x50;
const CONFIG1: u64 = 0x52;
const MEDIA_STATUS: u64 = 0x58;
const TX_SUMMARY: u64 = 0x60;
const BMCR: u64 = 0x62;
const NWAY_ADVERT: u64 = 0x66;
const BMSR: u64 = 0x64;
const TX_POLL: u64 = 0xd9;
const CP_CMD: u64 = 0xe0;
const RX_RING_LO: u64 = 0xe4;
const RX_RING_HI: u64 = 0xe8;

// ChipCmd.
const CMD_RESET: u32 = 0x10;
const CMD_RX_ENB: u32 = 0x08;
const CMD_TX_ENB: u32 = 0x04;
const RX_BUF_EMPTY: u32 = 0x01;

// IntrStatus / IntrMask.
const INT_RX_OK: u32 = 0x01;
const INT_TX_OK: u32 = 0x04;
const INT_RX_OVERFLOW: u32 = 0x10;
const INT_LINK_CHG: u32 = 0x20;
/// 8139too's RxAckBits: RxFIFOOver | RxOverflow | RxOK.
const RX_ACK_BITS: u32 = 0x51;
/// 8139too's rtl8139_intr_mask.
const TOO_INTR_MASK: u32 = 0xc07f;
/// 8139cp's cp_intr_mask.
const CP_INTR_MASK: u32 = 0x80ff;

// TxStatus.
const TX_HOST_OWNS: u32 = 0x2000;
const TX_STAT_OK: u32 = 0x8000;
/// 8139too's tx_flag: an early-transmit threshold of 256 bytes.
const TOO_TX_FLAG: u32 = 0x0008_0000;

// The receive header's status word.
const RX_STATUS_OK: u16 = 0x0001;
const RX_BROADCAST: u16 = 0x2000;
const RX_PHYSICAL: u16 = 0x4000;
const RX_MULTICAST: u16 = 0x8000;

// RxConfig.
const ACCEPT_ALL_PHYS: u32 = 0x01;
const ACCEPT_MY_PHYS: u32 = 0x02;
const ACCEPT_MULTICAST: u32 = 0x04;
const ACCEPT_BROADCAST: u32 = 0x08;
/// 8139too's RxNoWrap (bit 7): a frame crossing the end goes on past it.
const RX_NO_WRAP: u32 = 0x80;
const RCV_16K: u32 = 1 << 11;
/// 8139too's FIFO threshold and DMA burst fields.
const TOO_RX_BITS: u32 = (7 << 13) | (7 << 8);
/// 8139cp's cp_rx_config.
const CP_RX_BITS: u32 = (5 << 13) | (4 << 8);

// TxConfig.
/// 8139too's rtl8139_tx_config: TxIFG96, a 1024-byte DMA burst, 8 retries.
const TOO_TX_CONFIG: u32 = 0x0300_0680;
/// 8139cp's: IFG, a 1024-byte DMA burst.
const CP_TX_CONFIG: u32 = 0x0300_0600;
const TX_LOOPBACK: u32 = 0x0006_0000;
/// QEMU's reset value: the RTL-8139C+ revision bits.
const TX_CONFIG_RESET: u32 = 0x7480_0000;

// C+ mode.
/// 8139cp's cpcmd: PCIMulRW | RxChkSum | RxVlanOn | CpRxOn | CpTxOn.
const CP_CMD_LINUX: u32 = 0x6b;
const CP_RX_VLAN: u32 = 0x40;
const OWN: u32 = 1 << 31;
const EOR: u32 = 1 << 30;
const FS: u32 = 1 << 29;
const LS: u32 = 1 << 28;
const LARGE_SEND: u32 = 1 << 27;
const IPCS: u32 = 1 << 18;
const UDPCS: u32 = 1 << 17;
const TCPCS: u32 = 1 << 16;
const TX_TAGC: u32 = 1 << 17;
const RX_TAVA: u32 = 1 << 16;
const RX_MAR: u32 = 1 << 26;
const RX_PAM: u32 = 1 << 25;
const RX_BAR: u32 = 1 << 24;
/// The buffer size 8139cp gives each receive descriptor.
const PKT_BUF_SZ: u32 = 1536;

/// A pc machine on qtest with `rtl8139,netdev=ID,mac=MAC` at 04.0 over a datagram
/// backend; the VM runs. Returns the machine and the backend's far end.
fn pc_with_rtl8139(id: &str) -> (ObjectRef, FramePeer) {
    pc_with_rtl8139_and(id, &[])
}

/// [`pc_with_rtl8139`] with more properties.
fn pc_with_rtl8139_and(id: &str, props: &[(&str, &str)]) -> (ObjectRef, FramePeer) {
    pc_with_nic("rtl8139", id, MAC, false, RAM_SIZE, props)
}

/// Mismatches collected so that one run reports all of them.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.0
                .push(format!("{what}: got {got:#x?}, want {want:#x?}"));
        }
    }

    fn done(self) {
        assert!(
            self.0.is_empty(),
            "{} mismatch(es):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// The test's driver: BAR 0 (ports) and BAR 1 (memory) as the board assigned them, and the
/// wire.
struct Card {
    nic: PciNic,
    peer: FramePeer,
    /// Registers through BAR 1 (8139cp) rather than BAR 0 (8139too's port I/O).
    via_mmio: Cell<bool>,
}

impl Deref for Card {
    type Target = PciNic;
    fn deref(&self) -> &PciNic {
        &self.nic
    }
}

impl Card {
    fn new(machine: &ObjectRef, peer: FramePeer) -> Card {
        Card {
            nic: PciNic::new(machine, DEVFN),
            peer,
            via_mmio: Cell::new(false),
        }
    }

    fn use_mmio(&self, on: bool) {
        self.via_mmio.set(on);
    }

    fn r(&self, reg: u64, size: u32) -> u32 {
        if self.via_mmio.get() {
            self.mmio.read(self.bar1 + reg, size) as u32
        } else {
            self.io.read(self.bar0 + reg, size) as u32
        }
    }

    fn w(&self, reg: u64, value: u32, size: u32) {
        if self.via_mmio.get() {
            self.mmio.write(self.bar1 + reg, u64::from(value), size)
        } else {
            self.io.write(self.bar0 + reg, u64::from(value), size)
        }
    }

    fn r8(&self, reg: u64) -> u32 {
        self.r(reg, 1)
    }
    fn r16(&self, reg: u64) -> u32 {
        self.r(reg, 2)
    }
    fn r32(&self, reg: u64) -> u32 {
        self.r(reg, 4)
    }
    fn w8(&self, reg: u64, value: u32) {
        self.w(reg, value, 1)
    }
    fn w16(&self, reg: u64, value: u32) {
        self.w(reg, value, 2)
    }
    fn w32(&self, reg: u64, value: u32) {
        self.w(reg, value, 4)
    }

    fn wait_for(&self, what: &str, cond: impl Fn(&Card) -> bool) {
        wait_until(what, || cond(self));
    }

    /// 8139too's rtl8139_chip_reset / 8139cp's cp_reset_hw: CmdReset, then wait for the
    /// bit to clear itself.
    fn chip_reset(&self) {
        self.w8(CHIP_CMD, CMD_RESET);
        self.wait_for("CmdReset to clear itself", |c| {
            c.r8(CHIP_CMD) & CMD_RESET == 0
        });
    }

    /// The MAC as both drivers write it: config registers unlocked, two dword writes.
    fn set_mac(&self, mac: [u8; 6]) {
        self.w8(CFG9346, 0xc0);
        self.w32(MAC0, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        self.w32(MAC0 + 4, u32::from_le_bytes([mac[4], mac[5], 0, 0]));
        self.w8(CFG9346, 0);
    }

    fn mac_regs(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = self.r8(MAC0 + i as u64) as u8;
        }
        mac
    }

    /// Linux's read_eeprom (8139too and 8139cp alike): a Microwire READ of `location`
    /// with `addr_len` address bits, 16 data bits clocked out, each transition followed by
    /// the driver's eeprom_delay (a read of Cfg9346).
    fn eeprom_read(&self, location: u32, addr_len: u32) -> u16 {
        const EE_SHIFT_CLK: u32 = 0x04;
        const EE_CS: u32 = 0x08;
        const EE_DATA_WRITE: u32 = 0x02;
        const EE_DATA_READ: u32 = 0x01;
        const EE_ENB: u32 = 0x80 | EE_CS;
        let delay = || {
            self.r8(CFG9346);
        };
        let read_cmd = location | (6 << addr_len);
        // eeprom_cmd_start
        self.w8(CFG9346, EE_ENB & !EE_CS);
        self.w8(CFG9346, EE_ENB);
        delay();
        // eeprom_cmd
        for i in (0..3 + addr_len).rev() {
            let dataval = if read_cmd & (1 << i) != 0 {
                EE_DATA_WRITE
            } else {
                0
            };
            self.w8(CFG9346, EE_ENB | dataval);
            delay();
            self.w8(CFG9346, EE_ENB | dataval | EE_SHIFT_CLK);
            delay();
        }
        self.w8(CFG9346, EE_ENB);
        delay();
        let mut retval = 0u16;
        for _ in 0..16 {
            self.w8(CFG9346, EE_ENB | EE_SHIFT_CLK);
            delay();
            retval = (retval << 1) | u16::from(self.r8(CFG9346) & EE_DATA_READ != 0);
            self.w8(CFG9346, EE_ENB);
            delay();
        }
        // eeprom_cmd_end
        self.w8(CFG9346, 0);
        delay();
        retval
    }

    /// 8139too's rtl8139_hw_start with the ring buffer at [`RX_RING`] and the transmit
    /// buffers at [`TX_BUFS`].
    fn too_open(&self, rx_config: u32, intr_mask: u32) {
        self.chip_reset();
        self.w8(CFG9346, 0xc0);
        self.w32(MAC0, u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]));
        self.w32(MAC0 + 4, u32::from_le_bytes([MAC[4], MAC[5], 0, 0]));
        self.w32(RX_BUF, RX_RING as u32);
        self.w8(CHIP_CMD, CMD_RX_ENB | CMD_TX_ENB);
        self.w32(RX_CONFIG, rx_config);
        self.w32(TX_CONFIG, TOO_TX_CONFIG);
        self.w8(CFG9346, 0);
        for i in 0..4u64 {
            self.w32(TX_ADDR0 + 4 * i, (TX_BUFS + 0x2000 * i) as u32);
        }
        self.w32(RX_MISSED, 0);
        self.w32(MAR0, 0);
        self.w32(MAR0 + 4, 0);
        self.w16(INTR_MASK, intr_mask);
    }

    /// 8139too's rtl8139_start_xmit on descriptor `desc`.
    fn too_tx(&self, desc: u64, frame: &[u8]) {
        let mut buf = frame.to_vec();
        buf.resize(frame.len().max(60), 0);
        self.put(TX_BUFS + 0x2000 * desc, &buf);
        self.w32(TX_STATUS0 + 4 * desc, TOO_TX_FLAG | buf.len() as u32);
    }

    /// 8139too's completion test: TOK, TUN or TABT.
    fn wait_tx_done(&self, desc: u64) {
        self.wait_for("the descriptor to complete", |c| {
            c.r32(TX_STATUS0 + 4 * desc) & (TX_STAT_OK | 0x4000 | 0x4000_0000) != 0
        });
    }

    fn wait_tok(&self, desc: u64) -> u32 {
        self.wait_for("TxStatOK", |c| {
            c.r32(TX_STATUS0 + 4 * desc) & TX_STAT_OK != 0
        });
        self.r32(TX_STATUS0 + 4 * desc)
    }

    /// 8139cp's cp_stop_hw then cp_init_hw over BAR 1, with the rings at [`CP_RX_RING`] and
    /// [`CP_TX_RING`] (write their descriptors first) and the interrupt mask 8139cp's
    /// cp_open sets.
    fn cp_open(&self, rx_mode: u32, mar: [u32; 2]) {
        self.use_mmio(true);
        let status = self.r16(INTR_STATUS);
        self.w16(INTR_STATUS, !status & 0xffff);
        self.w16(INTR_MASK, 0);
        self.w8(CHIP_CMD, 0);
        self.w16(CP_CMD, 0);
        self.chip_reset();
        self.w8(CFG9346, 0xc0);
        self.w32(MAC0, u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]));
        self.w32(MAC0 + 4, u32::from_le_bytes([MAC[4], MAC[5], 0, 0]));
        self.w16(CP_CMD, CP_CMD_LINUX);
        self.w32(0x28, 0);
        self.w32(0x2c, 0);
        self.w32(RX_RING_LO, CP_RX_RING as u32);
        self.w32(RX_RING_HI, 0);
        self.w32(TX_ADDR0, CP_TX_RING as u32);
        self.w32(TX_ADDR0 + 4, 0);
        self.w8(CHIP_CMD, CMD_RX_ENB | CMD_TX_ENB);
        self.w8(0xec, 0x06);
        self.w32(RX_CONFIG, CP_RX_BITS | rx_mode);
        self.w32(MAR0, mar[0]);
        self.w32(MAR0 + 4, mar[1]);
        self.w32(TX_CONFIG, CP_TX_CONFIG);
        self.w16(0x5c, 0);
        self.w8(CFG9346, 0);
        self.w16(INTR_MASK, CP_INTR_MASK);
    }

    fn desc(&self, ring: u64, i: u32) -> (u32, u32, u64) {
        let d = self.get(ring + 16 * u64::from(i), 16);
        (
            u32::from_le_bytes(d[0..4].try_into().unwrap()),
            u32::from_le_bytes(d[4..8].try_into().unwrap()),
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
        )
    }

    fn set_desc(&self, ring: u64, i: u32, opts1: u32, opts2: u32, addr: u64) {
        let mut d = [0u8; 16];
        d[0..4].copy_from_slice(&opts1.to_le_bytes());
        d[4..8].copy_from_slice(&opts2.to_le_bytes());
        d[8..16].copy_from_slice(&addr.to_le_bytes());
        self.put(ring + 16 * u64::from(i), &d);
    }

    /// 8139cp's cp_refill_rx for a ring of `n` descriptors of `buf_sz` bytes each.
    fn cp_rx_ring(&self, n: u32, buf_sz: u32) {
        for i in 0..n {
            let eor = if i == n - 1 { EOR } else { 0 };
            self.put(CP_RX_BUFS + 0x2000 * u64::from(i), &[0xee; 0x800]);
            self.set_desc(
                CP_RX_RING,
                i,
                OWN | eor | buf_sz,
                0,
                CP_RX_BUFS + 0x2000 * u64::from(i),
            );
        }
    }

    /// Receive descriptor `i` handed back to the card, as cp_rx_poll's rx_next does.
    fn cp_rx_refill(&self, i: u32, ring_len: u32, buf_sz: u32) {
        let eor = if i == ring_len - 1 { EOR } else { 0 };
        self.set_desc(
            CP_RX_RING,
            i,
            OWN | eor | buf_sz,
            0,
            CP_RX_BUFS + 0x2000 * u64::from(i),
        );
    }

    fn cp_wait_rx(&self, i: u32) -> (u32, u32) {
        self.wait_for(&format!("receive descriptor {i}"), |c| {
            c.desc(CP_RX_RING, i).0 & OWN == 0
        });
        let (opts1, opts2, _) = self.desc(CP_RX_RING, i);
        (opts1, opts2)
    }

    fn cp_rx_data(&self, i: u32, len: usize) -> Vec<u8> {
        self.get(CP_RX_BUFS + 0x2000 * u64::from(i), len)
    }

    /// 8139cp's cp_start_xmit: one descriptor per fragment from `first` in a ring of
    /// `ring_len` (RingEnd on the last), `flags` (offloads) on every one, the first handed
    /// over last; then TxPoll. Returns the next free entry.
    fn cp_send(&self, first: u32, ring_len: u32, frags: &[&[u8]], flags: u32, opts2: u32) -> u32 {
        let mut entry = first;
        let mut descs = Vec::new();
        for (n, frag) in frags.iter().enumerate() {
            let addr = CP_TX_BUFS + 0x4000 * u64::from(entry);
            assert!(frag.len() <= 0x4000);
            self.put(addr, frag);
            let eor = if entry == ring_len - 1 { EOR } else { 0 };
            let mut opts1 = OWN | flags | eor | frag.len() as u32;
            if n == 0 {
                opts1 |= FS;
            }
            if n == frags.len() - 1 {
                opts1 |= LS;
            }
            descs.push((entry, opts1, addr));
            entry = (entry + 1) % ring_len;
        }
        for &(i, opts1, addr) in descs.iter().skip(1) {
            self.set_desc(CP_TX_RING, i, opts1, opts2, addr);
        }
        let (i, opts1, addr) = descs[0];
        self.set_desc(CP_TX_RING, i, opts1, opts2, addr);
        self.w8(TX_POLL, 0x40);
        entry
    }

    fn cp_tx_opts1(&self, i: u32) -> u32 {
        self.desc(CP_TX_RING, i).0
    }

    /// 8139cp's cp_get_ethtool_stats: DumpStats to [`TALLY`], wait for the bit to clear.
    fn tally(&self) -> Tally {
        self.put(TALLY, &[0xa5; 64]);
        self.w32(TX_STATUS0 + 4, 0);
        self.w32(TX_STATUS0, TALLY as u32 | 0x8);
        self.wait_for("the tally dump", |c| c.r32(TX_STATUS0) & 0x8 == 0);
        let t = self.get(TALLY, 64);
        self.w32(TX_STATUS0, 0);
        self.w32(TX_STATUS0 + 4, 0);
        let u64_at = |o: usize| u64::from_le_bytes(t[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(t[o..o + 4].try_into().unwrap());
        Tally {
            tx_ok: u64_at(0),
            rx_ok: u64_at(8),
            tx_err: u64_at(16),
            miss_pkt: u16::from_le_bytes([t[28], t[29]]),
            rx_ok_bcast: u64_at(48),
            rx_ok_mcast: u32_at(56),
        }
    }
}

#[derive(Debug, PartialEq)]
struct Tally {
    tx_ok: u64,
    rx_ok: u64,
    tx_err: u64,
    miss_pkt: u16,
    rx_ok_bcast: u64,
    rx_ok_mcast: u32,
}

/// One frame out of the classic ring: header status, where it started, the frame, the
/// CRC after it.
struct RxFrame {
    status: u16,
    offset: u32,
    data: Vec<u8>,
    crc: u32,
}

/// 8139too's side of the classic ring: cur_rx, the ring's length, and whether frames go on
/// past its end (RxNoWrap) or wrap to its start.
struct Ring {
    cur: u32,
    len: u32,
    linear: bool,
}

impl Ring {
    fn new(len: u32, linear: bool) -> Ring {
        Ring {
            cur: 0,
            len,
            linear,
        }
    }

    fn read(&self, card: &Card, off: u32, n: usize) -> Vec<u8> {
        if self.linear {
            card.get(RX_RING + u64::from(off), n)
        } else {
            (0..n as u32)
                .map(|i| card.get(RX_RING + u64::from((off + i) % self.len), 1)[0])
                .collect()
        }
    }

    /// rtl8139_rx's loop body: nothing while ChipCmd says RxBufEmpty; else the frame at
    /// cur_rx, then CAPR = cur_rx - 16.
    fn take(&mut self, card: &Card) -> Option<RxFrame> {
        if card.r8(CHIP_CMD) & RX_BUF_EMPTY != 0 {
            return None;
        }
        let off = self.cur % self.len;
        let hdr = u32::from_le_bytes(self.read(card, off, 4).try_into().unwrap());
        let size = (hdr >> 16) as usize;
        assert!(
            (4..=0x2000).contains(&size),
            "a sane header at {off:#x}: {hdr:#010x}"
        );
        let body = self.read(card, off + 4, size);
        self.cur = (self.cur + size as u32 + 4 + 3) & !3;
        card.w16(CAPR, self.cur.wrapping_sub(16) & 0xffff);
        Some(RxFrame {
            status: hdr as u16,
            offset: off,
            data: body[..size - 4].to_vec(),
            crc: u32::from_le_bytes(body[size - 4..].try_into().unwrap()),
        })
    }

    fn wait(&mut self, card: &Card, what: &str) -> RxFrame {
        let mut frame = None;
        wait_until(what, || {
            frame = self.take(card);
            frame.is_some()
        });
        frame.unwrap()
    }
}

/// An 802.1Q-tagged frame: `dest`, TCI `tci`, then `ethertype` and `payload_len` bytes.
fn tagged(dest: [u8; 6], tci: u16, ethertype: u16, payload_len: usize, seed: u8) -> Vec<u8> {
    let inner = ether(dest, ethertype, payload_len, seed);
    let mut f = inner[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&inner[12..]);
    f
}

/// A TCP/IPv4 frame from the card to the peer, both checksums deliberately wrong.
fn ipv4_tcp(
    payload: &[u8],
    id: u16,
    seq: u32,
    flags: u8,
    tcp_opts: &[u8],
    ip_opts: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let tcp_len = 20 + tcp_opts.len();
    let total = 20 + ip_opts.len() + tcp_len + payload.len();
    f.push(0x40 | ((20 + ip_opts.len()) / 4) as u8);
    f.push(0);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[0x40, 0, 64, 6, 0xde, 0xad]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(ip_opts);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&5001u16.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&0x5000_0001u32.to_be_bytes());
    f.push(((tcp_len / 4) as u8) << 4);
    f.push(flags);
    f.extend_from_slice(&0xffffu16.to_be_bytes());
    f.extend_from_slice(&[0xbe, 0xef, 0, 0]);
    f.extend_from_slice(tcp_opts);
    f.extend_from_slice(payload);
    f
}

/// A UDP/IPv4 frame from the card to the peer, both checksums deliberately wrong.
fn ipv4_udp(payload: &[u8], id: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 8 + payload.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[0, 0, 64, 17, 0xde, 0xad]);
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&5353u16.to_be_bytes());
    f.extend_from_slice(&53u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0xbe, 0xef]);
    f.extend_from_slice(payload);
    f
}

/// Asserts two frames are equal, saying where they differ rather than printing them.
fn assert_frame(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {at:?} (got {:02x?}, want {:02x?})",
            got.len(),
            want.len(),
            &got[..got.len().min(20)],
            &want[..want.len().min(20)],
        );
    }
}

/// Whether the IPv4 header at `l3` carries a correct checksum.
fn ip_sum_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0xf) * 4;
    sum16(&frame[l3..l3 + ihl], 0) == 0xffff
}

/// Whether the TCP or UDP segment after the IPv4 header at `l3` (as long as the IP total
/// length says) carries a correct checksum over it and the pseudo-header.
fn l4_sum_ok(frame: &[u8], l3: usize) -> bool {
    let ihl = usize::from(frame[l3] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]));
    let l4 = &frame[l3 + ihl..l3 + total];
    let mut pseudo = frame[l3 + 12..l3 + 20].to_vec();
    pseudo.extend_from_slice(&[0, frame[l3 + 9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    sum16(l4, u32::from(sum16(&pseudo, 0))) == 0xffff
}

/// The Ethernet FCS (zlib's crc32), as the card appends it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Linux's ether_crc (bitrev32(crc32_le(~0, addr, 6))): its top six bits index the
/// 64-bit multicast filter.
fn mcast_index(addr: &[u8; 6]) -> u32 {
    let mut crc = !0u32;
    for &b in addr {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc.reverse_bits() >> 26
}

/// 8139too's mc_filter for `groups`.
fn mar_for(groups: &[[u8; 6]]) -> [u32; 2] {
    let mut mc = [0u32; 2];
    for g in groups {
        let bit = mcast_index(g);
        mc[(bit >> 5) as usize] |= 1 << (bit & 31);
    }
    mc
}

#[test]
fn identity_registers_and_the_eeprom_read_as_linux_reads_it() {
    with_deadline("rtl-id", || {
        let (m, peer) = pc_with_rtl8139_and("rtl-id", &[("bootindex", "3")]);
        let card = Card::new(&m, peer);
        let mut c = Checks::default();
        c.eq("vendor and device", card.cfg.read(0x00, 4), 0x8139_10ec);
        c.eq(
            "Ethernet controller, revision 0x20 (C+)",
            card.cfg.read(0x08, 4),
            0x0200_0020,
        );
        c.eq(
            "QEMU's default subsystem",
            card.cfg.read(0x2c, 4),
            0x1100_1af4,
        );
        c.eq("interrupt pin A", card.cfg.read(0x3d, 1), 1);
        c.eq("BAR 0 is I/O", card.cfg.read(0x10, 4) & 1, 1);
        c.eq(
            "BAR 1 is 32-bit memory, not prefetchable",
            card.cfg.read(0x14, 4) & 0xf,
            0,
        );
        // Both BARs are 256 bytes, sized with decoding off as Linux's __pci_read_base does.
        card.cfg.write(0x04, 0, 2);
        for (bar, want) in [(0x10u32, 0xffff_ff01u32), (0x14, 0xffff_ff00)] {
            let old = card.cfg.read(bar, 4);
            card.cfg.write(bar, 0xffff_ffff, 4);
            c.eq(
                &format!("BAR at {bar:#x} sizes to 256 bytes"),
                card.cfg.read(bar, 4),
                want,
            );
            card.cfg.write(bar, old, 4);
        }
        card.cfg.write(0x04, 0x7, 2);

        // QEMU's reset state, through the ports.
        c.eq(
            "TxConfig: RTL-8139C+ revision bits",
            card.r32(TX_CONFIG),
            TX_CONFIG_RESET,
        );
        c.eq(
            "TxConfig's top byte (8139cp's ChipVersion)",
            card.r8(0x43),
            0x74,
        );
        c.eq("PCIRevisionID register", card.r8(0x5e), 0x20);
        c.eq("BasicModeCtrl: autonegotiation", card.r16(BMCR), 0x1000);
        c.eq(
            "BasicModeStatus: link up, autonegotiation complete",
            card.r16(BMSR),
            0x782d,
        );
        c.eq("NWayAdvert", card.r16(0x66), 0x05e1);
        c.eq("NWayLPAR", card.r16(0x68), 0x05e1);
        c.eq("NWayExpansion", card.r16(0x6a), 0x0001);
        c.eq("CSCR", card.r16(0x74), 0x0340);
        c.eq("MediaStatus: link up", card.r8(MEDIA_STATUS), 0xd0);
        c.eq("Config1: I/O and memory mapped", card.r8(CONFIG1), 0x0c);
        c.eq(
            "TxSummary: the host owns all four",
            card.r16(TX_SUMMARY),
            0x000f,
        );
        c.eq("IntrMask", card.r16(INTR_MASK), 0);
        c.eq("IntrStatus", card.r16(INTR_STATUS), 0);
        c.eq("CpCmd", card.r16(CP_CMD), 0);
        c.eq(
            "ChipCmd's RxBufEmpty",
            card.r8(CHIP_CMD) & RX_BUF_EMPTY,
            RX_BUF_EMPTY,
        );
        c.eq("MAC0-5", card.mac_regs(), MAC);
        c.eq(
            "the reserved bytes after the MAC",
            [card.r8(6), card.r8(7)],
            [0, 0],
        );
        c.eq(
            "MAC0 read as a dword",
            card.r32(MAC0),
            u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]]),
        );

        // 8139cp's probe over BAR 1: read_eeprom(0, 8) first. A 93C46 has 6 address bits,
        // so the 8-bit command misreads word 0 and the driver falls back to 6 bits.
        card.use_mmio(true);
        let probe = card.eeprom_read(0, 8);
        assert_ne!(
            probe, 0x8129,
            "a 93C46 must not answer the 8-bit probe with 0x8129"
        );
        // Word 0 shifted by the two extra address bits; the last two bits are what the
        // chip drives after the word (QEMU's model: the last bit again, 0x04a7; a real
        // 93C46's sequential read: word 1's first bits, 0x04a4).
        c.eq("the 8-bit probe's answer", probe & !3, 0x04a4);
        let words: Vec<u16> = (0..64).map(|a| card.eeprom_read(a, 6)).collect();
        c.eq("word 0", words[0], 0x8129);
        c.eq("word 1: vendor", words[1], 0x10ec);
        c.eq("word 2: device", words[2], 0x8139);
        let mac: Vec<u8> = words[7..10].iter().flat_map(|w| w.to_le_bytes()).collect();
        c.eq("the MAC in words 7-9", mac, MAC.to_vec());
        let others: Vec<(usize, u16)> = words
            .iter()
            .copied()
            .enumerate()
            .filter(|&(i, w)| ![0, 1, 2, 7, 8, 9].contains(&i) && w != 0)
            .collect();
        c.eq("the words QEMU leaves blank", others, vec![]);
        c.eq("Cfg9346 after eeprom_cmd_end", card.r8(CFG9346), 0);
        // 8139too reads the same over the ports.
        card.use_mmio(false);
        c.eq("word 8 through BAR 0", card.eeprom_read(8, 6), words[8]);

        let nic = hw::net::nic::find_nic("rtl-id").expect("the card is in the monitor's table");
        c.eq("model", nic.model(), "rtl8139");
        c.eq("the monitor's MAC", nic.mac(), MAC);
        c.eq("link", nic.link_up(), true);
        // The driver's own address: registers and the monitor follow.
        card.set_mac(NEW_MAC);
        c.eq("MAC0-5 after the driver's write", card.mac_regs(), NEW_MAC);
        c.eq(
            "the monitor's MAC after the driver's write",
            nic.mac(),
            NEW_MAC,
        );

        // BAR 1 is the same register file.
        c.eq(
            "TxConfig through BAR 1",
            card.mmio.read(card.bar1 + TX_CONFIG, 4) as u32,
            card.r32(TX_CONFIG),
        );
        card.mmio.write(card.bar1 + INTR_MASK, 0x0005, 2);
        c.eq(
            "IntrMask written through BAR 1, read through BAR 0",
            card.r16(INTR_MASK),
            5,
        );
        c.done();
    });
}

#[test]
fn classic_transmit_goes_round_the_four_descriptors() {
    with_deadline("rtl-ctx", || {
        let (m, peer) = pc_with_rtl8139("rtl-ctx");
        let card = Card::new(&m, peer);
        card.too_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST | TOO_RX_BITS, 0);
        assert_eq!(
            card.r32(TX_CONFIG),
            0x7780_0680,
            "8139too's TxConfig over the read-only revision bits"
        );
        for (n, len) in [60usize, 1514, 100, 333, 61, 1000].into_iter().enumerate() {
            let d = (n % 4) as u64;
            let frame = ether(BCAST, 0x0800, len - 14, n as u8);
            card.too_tx(d, &frame);
            assert_eq!(
                card.peer.recv_frame(),
                frame,
                "frame {n} from descriptor {d}"
            );
            let st = card.wait_tok(d);
            assert_eq!(st & 0x1fff, len as u32, "TxStatus{d}'s size");
            assert_eq!(
                st & (TX_HOST_OWNS | TX_STAT_OK),
                TX_HOST_OWNS | TX_STAT_OK,
                "OWN and TOK in TxStatus{d}: {st:#x}"
            );
            assert_eq!(st & 0x003f_0000, TOO_TX_FLAG, "the early threshold stays");
            card.wait_for("TxOK", |c| c.r16(INTR_STATUS) & INT_TX_OK != 0);
            card.w16(INTR_STATUS, INT_TX_OK);
            assert_eq!(card.r16(INTR_STATUS) & INT_TX_OK, 0, "TxOK acknowledged");
        }
        assert_eq!(card.r16(TX_SUMMARY), 0xf00f, "TOK and OWN of all four");

        // With the transmitter off, nothing goes: descriptor 2 waits, neither OWN nor TOK.
        card.w8(CHIP_CMD, CMD_RX_ENB);
        let frame = ether(BCAST, 0x0806, 50, 9);
        card.too_tx(2, &frame);
        assert!(
            card.peer.no_frame_for(Duration::from_millis(300)),
            "a disabled transmitter sent a frame"
        );
        assert_eq!(card.r16(TX_SUMMARY), 0xb00b, "descriptor 2 pending");
        card.w8(CHIP_CMD, CMD_RX_ENB | CMD_TX_ENB);
        card.too_tx(2, &frame);
        assert_eq!(
            card.peer.recv_frame(),
            frame,
            "sent once the transmitter is on"
        );
        card.wait_tok(2);
        assert_eq!(card.r16(TX_SUMMARY), 0xf00f);
    });
}

#[test]
fn classic_receive_fills_the_ring_and_capr_frees_it() {
    with_deadline("rtl-crx", || {
        let (m, peer) = pc_with_rtl8139("rtl-crx");
        let card = Card::new(&m, peer);
        card.put(RX_RING, &vec![0xee; 0x3000]);
        let cfg = ACCEPT_MY_PHYS | ACCEPT_BROADCAST | RX_NO_WRAP | TOO_RX_BITS;
        card.too_open(cfg, TOO_INTR_MASK);
        assert_eq!(card.r32(RX_CONFIG), cfg, "RxConfig reads back");
        assert_eq!(
            card.r8(CHIP_CMD),
            CMD_RX_ENB | CMD_TX_ENB | RX_BUF_EMPTY,
            "enabled, nothing received"
        );
        assert_eq!(card.r16(CBR), 0, "CBR at the start");
        assert_eq!(
            card.r16(CAPR),
            0xfff0,
            "CAPR reads the read pointer minus 16"
        );
        let mut ring = Ring::new(8192, true);

        let own = ether(MAC, 0x0800, 100, 1);
        card.peer.send(&own).unwrap();
        card.wait_for("a frame in the ring", |c| {
            c.r8(CHIP_CMD) & RX_BUF_EMPTY == 0
        });
        assert_eq!(card.r16(CBR), 124, "header, 114 bytes, CRC, rounded to 4");
        assert_ne!(card.r16(INTR_STATUS) & INT_RX_OK, 0, "RxOK");
        assert!(card.line(), "RxOK is unmasked: INTx is up");
        let p = ring.take(&card).unwrap();
        assert_eq!(p.offset, 0);
        assert_eq!(p.status, RX_STATUS_OK | RX_PHYSICAL, "ROK, PAM");
        assert_eq!(p.data, own);
        assert_eq!(p.crc, crc32(&own), "the FCS follows the frame");
        assert_eq!(card.r16(CAPR), 124 - 16, "CAPR as 8139too wrote it");
        assert_ne!(card.r8(CHIP_CMD) & RX_BUF_EMPTY, 0, "all read: empty again");
        card.w16(INTR_STATUS, RX_ACK_BITS);
        assert_eq!(card.r16(INTR_STATUS) & INT_RX_OK, 0);
        assert!(!card.line(), "acknowledged: INTx is down");

        // A short broadcast is padded to 60 bytes.
        let arp = ether(BCAST, 0x0806, 28, 2);
        card.peer.send(&arp).unwrap();
        let p = ring.wait(&card, "the ARP request");
        assert_eq!(p.offset, 124);
        assert_eq!(p.status, RX_STATUS_OK | RX_BROADCAST, "ROK, BAR");
        assert_eq!(p.data.len(), 60, "padded to 60, the header counts the CRC");
        assert_eq!(&p.data[..42], &arp[..]);
        assert!(p.data[42..].iter().all(|&b| b == 0), "zero padding");
        assert_eq!(p.crc, crc32(&p.data));
        assert_eq!(card.r16(CBR), 192);

        // Round the 8 KiB ring: with RxNoWrap the frame that crosses the end goes on past
        // it (8139too's 2 KiB of pad) and the write pointer wraps.
        let start = card.get(RX_RING, 64);
        let mut off = 192u32;
        for n in 0..9u8 {
            let f = ether(MAC, 0x0800, 986, 10 + n);
            card.peer.send(&f).unwrap();
            let p = ring.wait(&card, &format!("1000-byte frame {n}"));
            assert_eq!(p.offset, off, "frame {n}'s place");
            assert_eq!(p.status, RX_STATUS_OK | RX_PHYSICAL);
            assert_frame(&p.data, &f, &format!("frame {n}"));
            off = (off + 1008) % 8192;
            if n == 7 {
                assert_eq!(card.r16(CBR), 64, "CBR wrapped past the end");
                assert_eq!(card.get(RX_RING, 64), start, "nothing written at the start");
                assert_eq!(
                    card.r16(CAPR),
                    (ring.cur % 8192).wrapping_sub(16) & 0xffff,
                    "CAPR reads the wrapped read pointer minus 16"
                );
            }
        }
        assert_eq!(off, 64 + 1008);
    });
}

#[test]
fn without_rx_no_wrap_a_frame_wraps_to_the_start_of_a_16k_ring() {
    with_deadline("rtl-wrap", || {
        let (m, peer) = pc_with_rtl8139("rtl-wrap");
        let card = Card::new(&m, peer);
        card.put(RX_RING, &vec![0xee; 0x5000]);
        card.too_open(ACCEPT_MY_PHYS | RCV_16K | TOO_RX_BITS, 0);
        let mut ring = Ring::new(16384, false);
        for n in 0..12u32 {
            let f = ether(MAC, 0x0800, 1500, n as u8);
            card.peer.send(&f).unwrap();
            let p = ring.wait(&card, &format!("full-size frame {n}"));
            let want = if n <= 10 { n * 1524 } else { 380 };
            assert_eq!(p.offset, want, "frame {n}'s place in a 16 KiB ring");
            assert_frame(&p.data, &f, &format!("frame {n}"));
            assert_eq!(p.crc, crc32(&f), "frame {n}'s CRC");
            if n == 10 {
                // 1140 bytes at the end, 374 and the CRC at the start.
                assert_eq!(card.r16(CBR), 380, "CBR after the split frame");
                assert!(
                    card.get(RX_RING + 16384, 0x1000).iter().all(|&b| b == 0xee),
                    "nothing written past the end of the ring"
                );
            }
        }
    });
}

#[test]
fn a_full_ring_holds_frames_back_until_capr_frees_room() {
    with_deadline("rtl-full", || {
        let (m, peer) = pc_with_rtl8139("rtl-full");
        let card = Card::new(&m, peer);
        let cfg = ACCEPT_MY_PHYS | RX_NO_WRAP | TOO_RX_BITS;
        // Without RxOverflow in the mask the card takes a frame only into 1514 free bytes:
        // seven 1000-byte frames leave 1136, the eighth waits.
        card.too_open(cfg, TOO_INTR_MASK & !INT_RX_OVERFLOW);
        let mut ring = Ring::new(8192, true);
        let frames: Vec<Vec<u8>> = (0..8).map(|n| ether(MAC, 0x0800, 986, n)).collect();
        for f in &frames {
            card.peer.send(f).unwrap();
        }
        card.wait_for("seven frames", |c| c.r16(CBR) == 7 * 1008);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(card.r16(CBR), 7 * 1008, "the eighth waits for room");
        assert_eq!(card.r32(RX_MISSED), 0, "nothing missed");
        assert_eq!(card.r16(INTR_STATUS) & INT_RX_OVERFLOW, 0, "no RxOverflow");
        assert_frame(&ring.take(&card).unwrap().data, &frames[0], "frame 0");
        card.wait_for("the eighth frame once CAPR moved", |c| {
            c.r16(CBR) == 8 * 1008
        });
        for (n, f) in frames.iter().enumerate().skip(1) {
            assert_frame(&ring.take(&card).unwrap().data, f, &format!("frame {n}"));
        }
        assert!(ring.take(&card).is_none());

        // With RxOverflow unmasked (8139too's mask) a frame that does not fit raises it
        // and counts in RxMissed; QEMU keeps the frame for when CAPR frees room.
        card.w32(RX_CONFIG, cfg);
        ring = Ring::new(8192, true);
        assert_eq!(card.r16(CBR), 0, "RxConfig restarts the ring");
        card.w16(INTR_STATUS, 0xffff);
        card.w16(INTR_MASK, TOO_INTR_MASK);
        let frames: Vec<Vec<u8>> = (0..9).map(|n| ether(MAC, 0x0800, 986, 20 + n)).collect();
        let marker = ether(MAC, 0x88b5, 46, 0xaa);
        for f in frames.iter().chain([&marker]) {
            card.peer.send(f).unwrap();
        }
        card.wait_for("RxOverflow", |c| c.r16(INTR_STATUS) & INT_RX_OVERFLOW != 0);
        assert_eq!(
            card.r16(CBR),
            8 * 1008,
            "the ninth frame waits (QEMU queues it), so the marker behind it waits too"
        );
        assert!(card.r32(RX_MISSED) >= 1, "RxMissed counts it");
        assert!(card.line(), "RxOverflow is unmasked: INTx is up");
        for (n, f) in frames.iter().enumerate() {
            let p = ring.wait(&card, &format!("frame {n}"));
            assert_frame(&p.data, f, &format!("frame {n} (the ninth is not lost)"));
        }
        assert_eq!(ring.wait(&card, "the marker").data, marker);
    });
}

/// Sends `sent` then `marker`, reads the ring up to the marker and compares what came in
/// (by name) with `want`.
fn filter_round(
    card: &Card,
    ring: &mut Ring,
    what: &str,
    sent: &[(&str, Vec<u8>)],
    marker: (&str, Vec<u8>, u16),
    want: &[(&str, u16)],
) {
    for (_, f) in sent {
        card.peer.send(f).unwrap();
    }
    card.peer.send(&marker.1).unwrap();
    let mut got = Vec::new();
    loop {
        let p = ring.wait(card, &format!("{what}: the marker"));
        let name = if p.data == marker.1 {
            marker.0
        } else {
            sent.iter()
                .find(|(_, f)| *f == p.data)
                .map_or("an unknown frame", |(n, _)| *n)
        };
        got.push((name.to_string(), p.status));
        if name == marker.0 {
            break;
        }
        assert!(got.len() <= sent.len(), "{what}: more frames than sent");
    }
    let mut expect: Vec<(String, u16)> = want.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    expect.push((marker.0.to_string(), marker.2));
    assert_eq!(got, expect, "{what}");
}

#[test]
fn the_receive_filter_takes_its_own_broadcast_hashed_multicast_and_all_when_promiscuous() {
    with_deadline("rtl-filter", || {
        let (m, peer) = pc_with_rtl8139("rtl-filter");
        let card = Card::new(&m, peer);
        let g1 = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        let g2 = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];
        let g3 = [0x01, 0x00, 0x5e, 0x7f, 0xff, 0xfa];
        assert_eq!(
            [mcast_index(&g1), mcast_index(&g2), mcast_index(&g3)],
            [15, 62, 43],
            "the test's hash is Linux's ether_crc >> 26"
        );
        let ok = RX_STATUS_OK;
        let f = |dest: [u8; 6], seed: u8| ether(dest, 0x0800, 60, seed);
        let open = |cfg: u32, ring: &mut Ring| {
            card.w32(RX_CONFIG, cfg | RX_NO_WRAP | TOO_RX_BITS);
            *ring = Ring::new(8192, true);
        };
        card.too_open(ACCEPT_MY_PHYS | RX_NO_WRAP | TOO_RX_BITS, 0);
        let mut ring = Ring::new(8192, true);

        // AcceptMyPhys alone: its own unicast only, whatever the multicast filter holds.
        let mar = mar_for(&[g1]);
        card.w32(MAR0, mar[0]);
        card.w32(MAR0 + 4, mar[1]);
        filter_round(
            &card,
            &mut ring,
            "AcceptMyPhys",
            &[
                ("other unicast", f(OTHER_MAC, 1)),
                ("broadcast", f(BCAST, 2)),
                ("hashed multicast", f(g1, 3)),
                ("own", f(MAC, 4)),
            ],
            ("marker", f(MAC, 5), ok | RX_PHYSICAL),
            &[("own", ok | RX_PHYSICAL)],
        );

        // AcceptBroadcast alone: not even its own unicast.
        open(ACCEPT_BROADCAST, &mut ring);
        filter_round(
            &card,
            &mut ring,
            "AcceptBroadcast",
            &[
                ("own", f(MAC, 6)),
                ("other unicast", f(OTHER_MAC, 7)),
                ("broadcast", f(BCAST, 8)),
            ],
            ("marker", f(BCAST, 9), ok | RX_BROADCAST),
            &[("broadcast", ok | RX_BROADCAST)],
        );

        // AcceptMulticast: the groups whose hash bit is set.
        open(ACCEPT_MY_PHYS | ACCEPT_MULTICAST, &mut ring);
        filter_round(
            &card,
            &mut ring,
            "AcceptMulticast with one hash bit",
            &[
                ("G1", f(g1, 10)),
                ("G2", f(g2, 11)),
                ("G3", f(g3, 12)),
                ("broadcast", f(BCAST, 13)),
            ],
            ("marker", f(MAC, 14), ok | RX_PHYSICAL),
            &[("G1", ok | RX_MULTICAST)],
        );
        card.w32(MAR0, 0xffff_ffff);
        card.w32(MAR0 + 4, 0xffff_ffff);
        filter_round(
            &card,
            &mut ring,
            "AcceptMulticast with every hash bit (IFF_ALLMULTI)",
            &[("G2", f(g2, 15)), ("G3", f(g3, 16))],
            ("marker", f(MAC, 17), ok | RX_PHYSICAL),
            &[("G2", ok | RX_MULTICAST), ("G3", ok | RX_MULTICAST)],
        );

        // Promiscuous (8139too's IFF_PROMISC mode): anyone's unicast.
        open(
            ACCEPT_ALL_PHYS | ACCEPT_MY_PHYS | ACCEPT_BROADCAST | ACCEPT_MULTICAST,
            &mut ring,
        );
        filter_round(
            &card,
            &mut ring,
            "AcceptAllPhys",
            &[("other unicast", f(OTHER_MAC, 18))],
            ("marker", f([0x02, 0, 0, 0, 0, 0x78], 19), ok),
            &[("other unicast", ok)],
        );

        // A new address: frames to the old one are someone else's.
        open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, &mut ring);
        card.set_mac(NEW_MAC);
        filter_round(
            &card,
            &mut ring,
            "after a MAC change",
            &[("old MAC", f(MAC, 20)), ("new MAC", f(NEW_MAC, 21))],
            ("marker", f(BCAST, 22), ok | RX_BROADCAST),
            &[("new MAC", ok | RX_PHYSICAL)],
        );
    });
}

#[test]
fn loopback_brings_transmitted_frames_back_to_the_receiver() {
    with_deadline("rtl-loop", || {
        let (m, peer) = pc_with_rtl8139("rtl-loop");
        let card = Card::new(&m, peer);
        card.too_open(
            ACCEPT_MY_PHYS | ACCEPT_BROADCAST | RX_NO_WRAP | TOO_RX_BITS,
            0,
        );
        let mut ring = Ring::new(8192, true);
        card.w32(TX_CONFIG, TOO_TX_CONFIG | TX_LOOPBACK);
        assert_eq!(
            card.r32(TX_CONFIG) & TX_LOOPBACK,
            TX_LOOPBACK,
            "loopback set"
        );
        let f = ether(MAC, 0x0800, 200, 3);
        card.too_tx(0, &f);
        let p = ring.wait(&card, "the frame looped back");
        assert_eq!(p.data, f);
        assert_eq!(p.status, RX_STATUS_OK | RX_PHYSICAL);
        card.wait_tok(0);
        assert!(
            card.peer.no_frame_for(Duration::from_millis(200)),
            "nothing reached the wire"
        );
        assert_eq!(
            card.r16(INTR_STATUS) & (INT_TX_OK | INT_RX_OK),
            INT_TX_OK | INT_RX_OK
        );
        // Back to normal: the wire gets it, the receiver does not.
        card.w32(TX_CONFIG, TOO_TX_CONFIG);
        let g = ether(BCAST, 0x0800, 80, 4);
        card.too_tx(1, &g);
        assert_eq!(card.peer.recv_frame(), g);
        card.wait_tok(1);
        assert!(ring.take(&card).is_none(), "not looped back");
    });
}

#[test]
fn cplus_transmit_gathers_fragments_and_goes_round_the_ring() {
    with_deadline("rtl-cptx", || {
        let (m, peer) = pc_with_rtl8139("rtl-cptx");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 4]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        assert_eq!(card.r16(CP_CMD), CP_CMD_LINUX, "CpCmd reads back");
        // One frame over three descriptors, the first handed over last.
        let a = ether(PEER_MAC, 0x0800, 486, 1);
        let next = card.cp_send(0, 4, &[&a[..14], &a[14..114], &a[114..]], 0, 0);
        assert_eq!(next, 3);
        assert_eq!(card.peer.recv_frame(), a, "the fragments, gathered");
        card.wait_for("the three descriptors back", |c| {
            (0..3).all(|i| c.cp_tx_opts1(i) & OWN == 0)
        });
        assert_eq!(card.cp_tx_opts1(0), FS | 14, "descriptor 0 written back");
        assert_eq!(card.cp_tx_opts1(1), 100, "descriptor 1 written back");
        assert_eq!(card.cp_tx_opts1(2), LS | 386, "descriptor 2 written back");
        card.wait_for("TxOK", |c| c.r16(INTR_STATUS) & INT_TX_OK != 0);
        assert!(card.line(), "TxOK is in 8139cp's mask");
        card.w16(INTR_STATUS, 0xffff);
        assert!(!card.line());

        // Descriptor 3 ends the ring: the next frame is in descriptor 0.
        let b = ether(BCAST, 0x0800, 46, 2);
        let c = ether(BCAST, 0x88b5, 1500, 3);
        assert_eq!(card.cp_send(3, 4, &[&b], 0, 0), 0);
        assert_eq!(card.cp_send(0, 4, &[&c], 0, 0), 1);
        assert_eq!(card.peer.recv_frame(), b);
        assert_eq!(card.peer.recv_frame(), c, "after RingEnd, descriptor 0");
        card.wait_for("descriptors 3 and 0 back", |c| {
            c.cp_tx_opts1(3) & OWN == 0 && c.cp_tx_opts1(0) & OWN == 0
        });
        assert_eq!(card.cp_tx_opts1(3), EOR | FS | LS | 60);
        // Descriptor 1 is the host's: a poll sends nothing.
        card.w8(TX_POLL, 0x40);
        assert!(card.peer.no_frame_for(Duration::from_millis(200)));
        let t = card.tally();
        assert_eq!(t.tx_ok, 3, "three frames in the tally counters: {t:?}");
        assert_eq!(t.tx_err, 0);
    });
}

#[test]
fn cplus_checksum_offload_fills_ip_tcp_and_udp_checksums() {
    with_deadline("rtl-csum", || {
        let (m, peer) = pc_with_rtl8139("rtl-csum");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 8]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        let payload: Vec<u8> = (0..333u32).map(|i| (i * 7 + 1) as u8).collect();
        let unchanged_but = |got: &[u8], sent: &[u8], fields: &[usize]| {
            assert_eq!(got.len(), sent.len());
            for (i, (g, s)) in got.iter().zip(sent).enumerate() {
                if !fields.iter().any(|&f| i == f || i == f + 1) {
                    assert_eq!(g, s, "byte {i} changed");
                }
            }
        };

        // TCP, as 8139cp hands it over: IPCS | TCPCS on every fragment.
        let tcp = ipv4_tcp(&payload, 0x0101, 1000, 0x18, &[], &[]);
        let mut entry = card.cp_send(0, 8, &[&tcp[..54], &tcp[54..]], IPCS | TCPCS, 0);
        let got = card.peer.recv_frame();
        assert!(ip_sum_ok(&got, 14), "IP checksum");
        assert!(l4_sum_ok(&got, 14), "TCP checksum");
        unchanged_but(&got, &tcp, &[24, 50]);

        // UDP.
        let udp = ipv4_udp(&payload[..101], 0x0202);
        entry = card.cp_send(entry, 8, &[&udp], IPCS | UDPCS, 0);
        let got = card.peer.recv_frame();
        assert!(ip_sum_ok(&got, 14), "IP checksum");
        assert!(l4_sum_ok(&got, 14), "UDP checksum");
        unchanged_but(&got, &udp, &[24, 40]);

        // IPCS alone leaves the TCP checksum as it was.
        entry = card.cp_send(entry, 8, &[&tcp], IPCS, 0);
        let got = card.peer.recv_frame();
        assert!(ip_sum_ok(&got, 14));
        unchanged_but(&got, &tcp, &[24]);

        // IP options: a 24-byte IP header puts TCP at 38.
        let opts = ipv4_tcp(&payload[..64], 0x0303, 7, 0x10, &[], &[1, 1, 1, 1]);
        entry = card.cp_send(entry, 8, &[&opts], IPCS | TCPCS, 0);
        let got = card.peer.recv_frame();
        assert!(ip_sum_ok(&got, 14), "IP checksum over 24 bytes");
        assert!(l4_sum_ok(&got, 14), "TCP checksum after the options");
        unchanged_but(&got, &opts, &[24, 54]);

        // Bytes past the IP total length (padding) are not summed.
        let mut padded = ipv4_tcp(&payload[..2], 0x0404, 9, 0x10, &[], &[]);
        padded.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
        entry = card.cp_send(entry, 8, &[&padded], IPCS | TCPCS, 0);
        let got = card.peer.recv_frame();
        assert!(ip_sum_ok(&got, 14));
        assert!(l4_sum_ok(&got, 14), "TCP checksum over the IP length only");
        unchanged_but(&got, &padded, &[24, 50]);

        // Not IPv4: left alone.
        let v6 = ether(PEER_MAC, 0x86dd, 100, 5);
        card.cp_send(entry, 8, &[&v6], IPCS | TCPCS, 0);
        assert_eq!(card.peer.recv_frame(), v6);
    });
}

/// Checks TSO segment `n` of `sent` (IPv4 at 14 + `shift`, `hdr` bytes of headers in the
/// frame as sent): its lengths, IP id, sequence number, flags, checksums and payload.
fn check_segment(
    seg: &[u8],
    sent: &[u8],
    shift: usize,
    hdr: usize,
    n: usize,
    mss: usize,
    last: bool,
) {
    let l3 = 14 + shift;
    let ihl = usize::from(sent[14] & 0xf) * 4;
    let l4 = l3 + ihl;
    let total = usize::from(u16::from_be_bytes([sent[16], sent[17]]));
    let data_len = total - (hdr - 14);
    let chunk = if last { data_len - n * mss } else { mss };
    assert_eq!(seg.len(), hdr + shift + chunk, "segment {n}'s length");
    assert_eq!(&seg[..12], &sent[..12], "segment {n}'s addresses");
    let ip_len = u16::from_be_bytes([seg[l3 + 2], seg[l3 + 3]]);
    assert_eq!(
        usize::from(ip_len),
        hdr - 14 + chunk,
        "segment {n}'s IP length"
    );
    let id0 = u16::from_be_bytes([sent[18], sent[19]]);
    let id = u16::from_be_bytes([seg[l3 + 4], seg[l3 + 5]]);
    assert_eq!(id, id0.wrapping_add(n as u16), "segment {n}'s IP id");
    assert!(ip_sum_ok(seg, l3), "segment {n}'s IP checksum");
    let seq0 = u32::from_be_bytes(sent[14 + ihl + 4..14 + ihl + 8].try_into().unwrap());
    let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().unwrap());
    assert_eq!(
        seq,
        seq0.wrapping_add((n * mss) as u32),
        "segment {n}'s sequence"
    );
    let flags0 = sent[14 + ihl + 13];
    let want_flags = if last { flags0 } else { flags0 & !0x09 };
    assert_eq!(
        seg[l4 + 13],
        want_flags,
        "segment {n}'s flags: PSH and FIN on the last only"
    );
    assert!(l4_sum_ok(seg, l3), "segment {n}'s TCP checksum");
    assert_eq!(
        &seg[l4 + 20..hdr + shift],
        &sent[14 + ihl + 20..hdr],
        "segment {n}'s TCP options"
    );
    assert_eq!(
        &seg[hdr + shift..],
        &sent[hdr + n * mss..hdr + n * mss + chunk],
        "segment {n}'s payload"
    );
}

#[test]
fn cplus_tso_cuts_a_large_frame_into_mss_segments() {
    with_deadline("rtl-tso", || {
        let (m, peer) = pc_with_rtl8139("rtl-tso");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 8]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        // 8139cp: LargeSend | mss << 16, no checksum bits; the IP length is the whole
        // frame's. FIN | PSH | ACK.
        let payload: Vec<u8> = (0..2600u32).map(|i| (i * 13 + 5) as u8).collect();
        let f = ipv4_tcp(&payload, 0x1234, 0x1000_0000, 0x19, &[], &[]);
        let entry = card.cp_send(0, 8, &[&f], LARGE_SEND | (1000 << 16), 0);
        for n in 0..3 {
            let seg = card.peer.recv_frame();
            check_segment(&seg, &f, 0, 54, n, 1000, n == 2);
        }
        assert!(
            card.peer.no_frame_for(Duration::from_millis(200)),
            "three segments, nothing after them"
        );
        card.wait_for("the descriptor back", |c| c.cp_tx_opts1(0) & OWN == 0);

        // TCP options (a 32-byte header), MSS 500, the frame in three fragments.
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let payload: Vec<u8> = (0..1200u32).map(|i| (i * 3 + 1) as u8).collect();
        let g = ipv4_tcp(&payload, 0xfffe, 0xffff_fe00, 0x18, &ts, &[]);
        card.cp_send(
            entry,
            8,
            &[&g[..66], &g[66..700], &g[700..]],
            LARGE_SEND | (500 << 16),
            0,
        );
        for n in 0..3 {
            let seg = card.peer.recv_frame();
            check_segment(&seg, &g, 0, 66, n, 500, n == 2);
        }
        assert!(card.peer.no_frame_for(Duration::from_millis(200)));
    });
}

#[test]
fn cplus_vlan_tags_go_in_on_transmit_and_come_off_on_receive() {
    with_deadline("rtl-vlan", || {
        let (m, peer) = pc_with_rtl8139("rtl-vlan");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 8]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        // 8139cp's cp_tx_vlan_tag: TxVlanTag | swab16(TCI).
        let tag = TX_TAGC | u32::from(0x2005u16.swap_bytes());
        let f = ether(PEER_MAC, 0x0800, 86, 4);
        card.cp_send(0, 8, &[&f], 0, tag);
        let mut want = f[..12].to_vec();
        want.extend_from_slice(&[0x81, 0x00, 0x20, 0x05]);
        want.extend_from_slice(&f[12..]);
        assert_eq!(card.peer.recv_frame(), want, "the tag after the addresses");

        // Every TSO segment carries the tag.
        let payload: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let t = ipv4_tcp(&payload, 0x0042, 77, 0x18, &[], &[]);
        card.cp_send(1, 8, &[&t], LARGE_SEND | (1000 << 16), tag);
        for n in 0..2 {
            let seg = card.peer.recv_frame();
            assert_eq!(&seg[12..16], &[0x81, 0x00, 0x20, 0x05], "segment {n}'s tag");
            check_segment(&seg, &t, 4, 54, n, 1000, n == 1);
        }

        // Receive with RxVlanOn (in 8139cp's cpcmd): the tag goes to opts2, byte-swapped
        // as 8139cp's swab16 expects, and out of the frame.
        let rx = tagged(MAC, 0x2005, 0x88b5, 80, 5);
        card.peer.send(&rx).unwrap();
        let (opts1, opts2) = card.cp_wait_rx(0);
        assert_eq!(opts2 & RX_TAVA, RX_TAVA, "TAVA: {opts2:#x}");
        assert_eq!(opts2 & 0xffff, 0x0520, "the TCI, byte-swapped");
        assert_eq!(opts1 & 0x1fff, 98, "untagged length and the CRC");
        let mut untagged = rx[..12].to_vec();
        untagged.extend_from_slice(&rx[16..]);
        assert_eq!(card.cp_rx_data(0, 94), untagged);
        // A short tagged frame is padded to 60 bytes once untagged.
        let short = tagged(MAC, 0x0007, 0x88b5, 28, 6);
        assert_eq!(short.len(), 46);
        card.peer.send(&short).unwrap();
        let (opts1, opts2) = card.cp_wait_rx(1);
        assert_eq!(opts2, RX_TAVA | 0x0700);
        assert_eq!(opts1 & 0x1fff, 64);
        let data = card.cp_rx_data(1, 60);
        assert_eq!(&data[..12], &short[..12]);
        assert_eq!(&data[12..42], &short[16..]);
        assert!(data[42..].iter().all(|&b| b == 0), "zero padding");
        // Without RxVlanOn the tag stays in the frame.
        card.w16(CP_CMD, CP_CMD_LINUX & !CP_RX_VLAN);
        card.peer.send(&rx).unwrap();
        let (opts1, opts2) = card.cp_wait_rx(2);
        assert_eq!(opts2 & RX_TAVA, 0, "no TAVA without RxVlanOn");
        assert_eq!(opts1 & 0x1fff, rx.len() as u32 + 4);
        assert_eq!(card.cp_rx_data(2, rx.len()), rx);
    });
}

#[test]
fn cplus_receive_fills_descriptors_and_a_missing_one_is_an_rx_overflow() {
    with_deadline("rtl-cprx", || {
        let (m, peer) = pc_with_rtl8139("rtl-cprx");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 4]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        // Descriptor 3 stays the host's for now.
        card.set_desc(CP_RX_RING, 3, EOR | PKT_BUF_SZ, 0, CP_RX_BUFS + 0x6000);
        card.cp_open(
            ACCEPT_MY_PHYS | ACCEPT_BROADCAST | ACCEPT_MULTICAST,
            [0xffff_ffff, 0xffff_ffff],
        );
        let own = ether(MAC, 0x88b5, 186, 1);
        card.peer.send(&own).unwrap();
        let (opts1, opts2) = card.cp_wait_rx(0);
        assert_eq!(opts1, FS | LS | RX_PAM | 204, "descriptor 0: {opts1:#x}");
        assert_eq!(opts2, 0);
        let data = card.cp_rx_data(0, 204);
        assert_eq!(&data[..200], &own[..]);
        assert_eq!(
            u32::from_le_bytes(data[200..].try_into().unwrap()),
            crc32(&own),
            "the CRC after the frame"
        );
        card.wait_for("RxOK", |c| c.r16(INTR_STATUS) & INT_RX_OK != 0);
        assert!(card.line());

        let bcast = ether(BCAST, 0x88b5, 46, 2);
        card.peer.send(&bcast).unwrap();
        let (opts1, _) = card.cp_wait_rx(1);
        assert_eq!(opts1, FS | LS | RX_BAR | 64, "descriptor 1: {opts1:#x}");
        assert_eq!(card.cp_rx_data(1, 60), bcast);
        let mcast = ether([0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb], 0x88b5, 28, 3);
        card.peer.send(&mcast).unwrap();
        let (opts1, _) = card.cp_wait_rx(2);
        assert_eq!(opts1, FS | LS | RX_MAR | 64, "descriptor 2: {opts1:#x}");
        let data = card.cp_rx_data(2, 60);
        assert_eq!(&data[..42], &mcast[..]);
        assert!(data[42..].iter().all(|&b| b == 0), "padded to 60");

        // No descriptor: the frame is dropped, RxOverflow (8139cp's RxEmpty) and RxMissed.
        card.w16(INTR_STATUS, 0xffff);
        let lost = ether(MAC, 0x88b5, 100, 4);
        card.peer.send(&lost).unwrap();
        card.wait_for("RxOverflow", |c| c.r16(INTR_STATUS) & INT_RX_OVERFLOW != 0);
        assert_eq!(card.r32(RX_MISSED), 1);
        assert!(card.line(), "RxEmpty is in 8139cp's mask");
        assert_eq!(
            card.desc(CP_RX_RING, 3).0,
            EOR | PKT_BUF_SZ,
            "the host's descriptor untouched"
        );
        // Descriptors 3 and 0 handed back: the next frames go there, the lost one is gone.
        card.w16(INTR_STATUS, 0xffff);
        card.cp_rx_refill(3, 4, PKT_BUF_SZ);
        card.cp_rx_refill(0, 4, PKT_BUF_SZ);
        let y = ether(MAC, 0x88b5, 120, 5);
        let z = ether(MAC, 0x88b5, 140, 6);
        card.peer.send(&y).unwrap();
        card.peer.send(&z).unwrap();
        let (opts1, _) = card.cp_wait_rx(3);
        assert_eq!(opts1, EOR | FS | LS | RX_PAM | (y.len() as u32 + 4));
        assert_eq!(card.cp_rx_data(3, y.len()), y, "the frame after the drop");
        let (opts1, _) = card.cp_wait_rx(0);
        assert_eq!(
            opts1,
            FS | LS | RX_PAM | (z.len() as u32 + 4),
            "round the ring"
        );
        assert_eq!(card.cp_rx_data(0, z.len()), z);

        // A buffer too small for the frame (and its CRC): dropped the same way, the
        // descriptor kept for a frame that fits.
        card.cp_rx_refill(1, 4, 64);
        card.peer.send(&ether(MAC, 0x88b5, 86, 7)).unwrap();
        card.wait_for("RxOverflow for the small buffer", |c| {
            c.r16(INTR_STATUS) & INT_RX_OVERFLOW != 0
        });
        assert_eq!(card.r32(RX_MISSED), 2);
        assert_eq!(card.desc(CP_RX_RING, 1).0, OWN | 64, "still the card's");
        let fits = ether(MAC, 0x88b5, 46, 8);
        card.peer.send(&fits).unwrap();
        let (opts1, _) = card.cp_wait_rx(1);
        assert_eq!(opts1, FS | LS | RX_PAM | 64);
        assert_eq!(card.cp_rx_data(1, 60), fits);

        let t = card.tally();
        assert_eq!(t.rx_ok, 6, "six frames in: {t:?}");
        assert_eq!(t.miss_pkt, 2, "two missed: {t:?}");
        assert_eq!(t.rx_ok_bcast, 1, "{t:?}");
        assert_eq!(t.rx_ok_mcast, 1, "{t:?}");
        assert_eq!(t.tx_ok, 0, "{t:?}");
        card.w32(RX_MISSED, 0);
        assert_eq!(card.r32(RX_MISSED), 0, "RxMissed clears when written");
    });
}

#[test]
fn interrupts_follow_status_and_mask_on_the_intx_line() {
    with_deadline("rtl-irq", || {
        let (m, peer) = pc_with_rtl8139("rtl-irq");
        let card = Card::new(&m, peer);
        card.too_open(ACCEPT_MY_PHYS | RX_NO_WRAP | TOO_RX_BITS, 0);
        let mut ring = Ring::new(8192, true);
        assert!(!card.line());
        card.too_tx(0, &ether(BCAST, 0x0800, 60, 1));
        card.peer.recv_frame();
        card.wait_for("TxOK", |c| c.r16(INTR_STATUS) & INT_TX_OK != 0);
        assert!(!card.line(), "masked: INTx stays down");
        card.w16(INTR_MASK, INT_TX_OK);
        assert!(card.line(), "unmasking raises INTx at once");
        card.w16(INTR_STATUS, 0);
        assert!(card.line(), "writing 0 clears nothing");
        card.w16(INTR_STATUS, INT_RX_OK);
        assert!(card.line(), "writing another bit leaves TxOK");
        assert_ne!(card.r16(INTR_STATUS) & INT_TX_OK, 0);
        card.w16(INTR_STATUS, INT_TX_OK);
        assert_eq!(card.r16(INTR_STATUS), 0);
        assert!(!card.line(), "acknowledged: INTx down");

        card.w16(INTR_MASK, 0xffff);
        assert_eq!(
            card.r16(INTR_MASK),
            0xe1ff,
            "bits 9-12 of IntrMask are read-only"
        );
        card.peer.send(&ether(MAC, 0x0800, 100, 2)).unwrap();
        card.wait_for("RxOK on the line", |c| c.line());
        assert_ne!(card.r16(INTR_STATUS) & INT_RX_OK, 0);
        ring.take(&card).unwrap();
        card.w16(INTR_MASK, 0);
        assert!(!card.line(), "masking lowers INTx");
        card.w16(INTR_MASK, INT_RX_OK);
        assert!(card.line(), "the cause is still pending");
        card.w16(INTR_STATUS, RX_ACK_BITS);
        assert!(!card.line());
        // Through BAR 1 just the same.
        card.use_mmio(true);
        card.peer.send(&ether(MAC, 0x0800, 100, 3)).unwrap();
        card.wait_for("RxOK again", |c| c.line());
        card.w16(INTR_STATUS, 0xffff);
        assert!(!card.line());
    });
}

#[test]
fn set_link_shows_in_bmsr_and_media_status_with_a_link_change_interrupt() {
    with_deadline("rtl-link", || {
        let (m, peer) = pc_with_rtl8139("rtl-link");
        let card = Card::new(&m, peer);
        let cfg = ACCEPT_MY_PHYS | ACCEPT_BROADCAST | RX_NO_WRAP | TOO_RX_BITS;
        card.too_open(cfg, INT_LINK_CHG);
        let nic = hw::net::nic::find_nic("rtl-link").unwrap();
        nic.set_link(false);
        assert!(!nic.link_up());
        assert_eq!(card.r16(BMSR) & 0x04, 0, "BMSR link status clear");
        assert_eq!(card.r8(MEDIA_STATUS) & 0x04, 0x04, "MediaStatus LinkFail");
        assert_ne!(card.r16(INTR_STATUS) & INT_LINK_CHG, 0, "LinkChg");
        assert!(card.line(), "LinkChg is unmasked");
        card.w16(INTR_STATUS, INT_LINK_CHG);
        assert!(!card.line());
        // Down: the descriptor completes, nothing reaches the wire; nothing comes in.
        card.too_tx(0, &ether(BCAST, 0x0800, 60, 1));
        card.wait_tok(0);
        assert!(
            card.peer.no_frame_for(Duration::from_millis(300)),
            "a frame went out while the link was down"
        );
        card.peer.send(&ether(MAC, 0x0800, 60, 2)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_ne!(
            card.r8(CHIP_CMD) & RX_BUF_EMPTY,
            0,
            "a frame came in while the link was down"
        );
        // A chip reset keeps the link as it is.
        card.chip_reset();
        assert_eq!(card.r16(BMSR), 0x7829, "reset: still down");
        card.too_open(cfg, INT_LINK_CHG);
        nic.set_link(true);
        assert!(nic.link_up());
        assert_eq!(card.r16(BMSR), 0x782d, "back up");
        assert_eq!(card.r8(MEDIA_STATUS) & 0x04, 0);
        assert_ne!(card.r16(INTR_STATUS) & INT_LINK_CHG, 0, "LinkChg again");
        assert!(card.line());
        card.w16(INTR_STATUS, INT_LINK_CHG);
        let f = ether(BCAST, 0x0800, 70, 3);
        card.too_tx(0, &f);
        assert_eq!(card.peer.recv_frame(), f, "up: frames go out");
        let mut ring = Ring::new(8192, true);
        let marker = ether(MAC, 0x0800, 80, 4);
        card.peer.send(&marker).unwrap();
        for _ in 0..2 {
            if ring.wait(&card, "the marker").data == marker {
                return;
            }
        }
        panic!("the marker never came in");
    });
}

#[test]
fn a_chip_reset_returns_the_card_to_its_reset_state() {
    with_deadline("rtl-reset", || {
        let (m, peer) = pc_with_rtl8139("rtl-reset");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 4]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        card.set_mac(NEW_MAC);
        card.w16(INTR_MASK, 0xffff);
        card.peer.send(&ether(NEW_MAC, 0x88b5, 100, 1)).unwrap();
        card.cp_wait_rx(0);
        card.cp_send(0, 4, &[&ether(BCAST, 0x0800, 60, 2)], 0, 0);
        card.peer.recv_frame();
        card.wait_for("RxOK and TxOK", |c| {
            c.r16(INTR_STATUS) & (INT_RX_OK | INT_TX_OK) == INT_RX_OK | INT_TX_OK
        });
        assert!(card.line());

        card.use_mmio(false);
        card.w8(CHIP_CMD, CMD_RESET);
        card.wait_for("CmdReset to clear itself", |c| {
            c.r8(CHIP_CMD) & CMD_RESET == 0
        });
        let nic = hw::net::nic::find_nic("rtl-reset").unwrap();
        let mut c = Checks::default();
        c.eq(
            "ChipCmd: disabled, buffer empty",
            card.r8(CHIP_CMD),
            RX_BUF_EMPTY,
        );
        c.eq("IntrMask", card.r16(INTR_MASK), 0);
        c.eq("IntrStatus", card.r16(INTR_STATUS), 0);
        c.eq("INTx", card.line(), false);
        c.eq("TxSummary", card.r16(TX_SUMMARY), 0x000f);
        for i in 0..4u64 {
            c.eq(
                &format!("TxStatus{i}: the host's"),
                card.r32(TX_STATUS0 + 4 * i),
                TX_HOST_OWNS,
            );
        }
        c.eq("TxConfig", card.r32(TX_CONFIG), TX_CONFIG_RESET);
        c.eq("CpCmd", card.r16(CP_CMD), 0);
        c.eq("RxRingAddrLO", card.r32(RX_RING_LO), 0);
        c.eq("RxRingAddrHI", card.r32(RX_RING_HI), 0);
        c.eq("RxBuf", card.r32(RX_BUF), 0);
        c.eq("CBR", card.r16(CBR), 0);
        c.eq("CAPR", card.r16(CAPR), 0xfff0);
        c.eq("BasicModeCtrl", card.r16(BMCR), 0x1000);
        c.eq("BasicModeStatus", card.r16(BMSR), 0x782d);
        c.eq("NWayAdvert", card.r16(NWAY_ADVERT), 0x05e1);
        c.eq("MAC0-5: the property's again", card.mac_regs(), MAC);
        c.eq("the monitor's MAC", nic.mac(), MAC);
        c.done();

        // BMCR's reset bit resets the PHY alone (QEMU's rtl8139_reset_phy): the
        // advertisement a driver narrowed is all modes again, the link as it was.
        card.w16(NWAY_ADVERT, 0x01e1);
        assert_eq!(card.r16(NWAY_ADVERT), 0x01e1);
        card.w16(BMCR, 0x8000 | 0x1000);
        assert_eq!(
            card.r16(NWAY_ADVERT),
            0x05e1,
            "the PHY reset restores NWayAdvert"
        );
        assert_eq!(card.r16(BMSR), 0x782d, "link up, autonegotiation complete");
        assert_eq!(card.r16(BMCR) & 0x8000, 0, "the reset bit clears itself");

        // C+ mode is off: TxStatus0 is a classic transmit status again, not DTCCR.
        card.w8(CHIP_CMD, CMD_RX_ENB | CMD_TX_ENB);
        card.w32(TX_ADDR0, TX_BUFS as u32);
        let f = ether(BCAST, 0x0800, 90, 3);
        card.too_tx(0, &f);
        assert_eq!(
            card.peer.recv_frame(),
            f,
            "a classic transmit after the reset"
        );
        card.wait_tok(0);

        // Cfg9346's auto-load mode resets the chip too.
        card.w16(INTR_MASK, INT_RX_OK);
        card.w8(CFG9346, 0x40);
        assert_eq!(card.r16(INTR_MASK), 0, "auto-load resets");
        assert_eq!(card.r8(CFG9346), 0, "and returns Cfg9346 to normal mode");
        assert_eq!(card.r16(TX_SUMMARY), 0x000f);
    });
}

#[test]
fn hostile_descriptors_rings_and_register_writes_neither_hang_nor_panic() {
    with_deadline("rtl-bad", || {
        let (m, peer) = pc_with_rtl8139("rtl-bad");
        let card = Card::new(&m, peer);
        let outside = [RAM_SIZE - 0x100, 0xe000_0000, card.bar1, 0xffff_f000];

        // Classic transmit from buffers outside RAM, straddling its end, of the largest
        // size, and from the card's own registers.
        card.too_open(ACCEPT_ALL_PHYS | RX_NO_WRAP | TOO_RX_BITS, TOO_INTR_MASK);
        for (n, &addr) in outside.iter().enumerate() {
            let d = n as u64 % 4;
            card.w32(TX_ADDR0 + 4 * d, addr as u32);
            card.w32(TX_STATUS0 + 4 * d, 0x1fff);
            card.wait_tx_done(d);
        }
        card.peer.drain(Duration::from_millis(200), 8);

        // Classic receive into rings outside RAM, across its end, over the card's own
        // registers, and with nonsense in CAPR; runts shorter than an address.
        for &addr in &outside {
            card.w32(RX_BUF, addr as u32);
            card.w32(RX_CONFIG, ACCEPT_ALL_PHYS | (3 << 11) | TOO_RX_BITS);
            for n in 0..4u8 {
                card.peer.send(&ether(MAC, 0x0800, 1500, n)).unwrap();
            }
        }
        card.w16(CAPR, 0xffff);
        card.w16(CAPR, 0x1233);
        for len in [0usize, 1, 5, 13, 14] {
            card.peer.send(&vec![0xffu8; len]).unwrap();
        }

        // C+ transmit: rings outside RAM and across its end.
        card.put(CP_TX_RING, &[0u8; 16 * 64]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_ALL_PHYS | ACCEPT_BROADCAST, [0, 0]);
        for (lo, hi) in [
            (0u32, 1u32),
            ((RAM_SIZE - 8) as u32, 0),
            (card.bar1 as u32, 0),
        ] {
            card.w32(TX_ADDR0, lo);
            card.w32(TX_ADDR0 + 4, hi);
            card.w8(TX_POLL, 0x40);
        }
        // A whole ring of 64 KiB fragments, a first one and never a last one, half of them
        // outside RAM; then a sane frame, which must still go out whole.
        card.w8(CHIP_CMD, CMD_RX_ENB | CMD_TX_ENB);
        card.w32(TX_ADDR0, CP_TX_RING as u32);
        card.w32(TX_ADDR0 + 4, 0);
        for i in 0..64u32 {
            let addr = if i % 2 == 0 {
                CP_TX_BUFS
            } else {
                0xdead_0000_0000
            };
            let eor = if i == 63 { EOR } else { 0 };
            let fs = if i == 0 { FS } else { 0 };
            card.set_desc(CP_TX_RING, i, OWN | fs | eor | 0xffff, 0, addr);
        }
        card.w8(TX_POLL, 0x40);
        card.wait_for("the fragments consumed", |c| {
            (0..64).all(|i| c.cp_tx_opts1(i) & OWN == 0)
        });
        card.peer.drain(Duration::from_millis(200), 64);
        let sane = ether(PEER_MAC, 0x0800, 100, 9);
        let mut entry = card.cp_send(0, 64, &[&sane], 0, 0);
        card.peer.recv_until(&sane, 4);
        // Offloads over nonsense: no MSS, an IP header longer than the frame, an IP length
        // past it, a TCP header of 0 and of 60 bytes, a frame shorter than an IP header,
        // a tag on five bytes, a frame that is not IP.
        let payload = [0x5au8; 300];
        let mut bad = Vec::new();
        bad.push((ipv4_tcp(&payload, 1, 1, 0x18, &[], &[]), LARGE_SEND));
        let mut f = ipv4_tcp(&payload, 2, 1, 0x18, &[], &[]);
        f[14] = 0x4f;
        bad.push((f.clone(), LARGE_SEND | (100 << 16)));
        bad.push((f, IPCS | TCPCS));
        let mut f = ipv4_tcp(&payload, 3, 1, 0x18, &[], &[]);
        f[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
        bad.push((f.clone(), LARGE_SEND | (100 << 16)));
        bad.push((f, IPCS | TCPCS));
        let mut f = ipv4_tcp(&payload, 4, 1, 0x18, &[], &[]);
        f[46] = 0;
        bad.push((f.clone(), LARGE_SEND | (100 << 16)));
        f[46] = 0xf0;
        bad.push((f, LARGE_SEND | (100 << 16)));
        bad.push((
            ipv4_tcp(&payload, 5, 1, 0x18, &[], &[])[..20].to_vec(),
            LARGE_SEND | (8 << 16),
        ));
        bad.push((ipv4_udp(&payload, 6)[..30].to_vec(), IPCS | UDPCS));
        bad.push((vec![1, 2, 3, 4, 5], 0));
        bad.push((ether(PEER_MAC, 0x0806, 40, 1), LARGE_SEND | (10 << 16)));
        for (n, (f, flags)) in bad.iter().enumerate() {
            let opts2 = if n == 9 { TX_TAGC | 0x0100 } else { 0 };
            entry = card.cp_send(entry, 64, &[f], *flags, opts2);
        }
        card.peer.drain(Duration::from_millis(300), 200);
        // MSS 1: one segment per payload byte.
        let tiny = ipv4_tcp(&[0x77; 150], 7, 1, 0x18, &[], &[]);
        card.cp_send(entry, 64, &[&tiny], LARGE_SEND | (1 << 16), 0);
        for n in 0..150 {
            let seg = card.peer.recv_frame();
            assert_eq!(seg.len(), 55, "MSS 1: segment {n}");
        }
        assert!(card.peer.no_frame_for(Duration::from_millis(200)));

        // C+ receive: a ring outside RAM, buffers outside RAM and across its end, larger
        // than the descriptor's size field allows.
        card.w32(RX_RING_LO, 0);
        card.w32(RX_RING_HI, 1);
        card.peer.send(&ether(MAC, 0x0800, 100, 1)).unwrap();
        card.w32(RX_RING_HI, 0);
        card.w32(RX_RING_LO, CP_RX_RING as u32);
        card.set_desc(CP_RX_RING, 0, OWN | 0x1fff, 0, 0xdead_0000_0000);
        card.set_desc(CP_RX_RING, 1, OWN | 0x1fff, 0, RAM_SIZE - 64);
        card.set_desc(CP_RX_RING, 2, OWN | 0x1fff, 0, card.bar1);
        card.set_desc(CP_RX_RING, 3, OWN | EOR | 0x1fff, 0, 0xffff_ffc0);
        for n in 0..8u8 {
            card.peer.send(&ether(MAC, 0x0800, 1500, n)).unwrap();
        }

        // Garbage in every register, every width, through both BARs.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..6000 {
            let r = next();
            let size = [1u32, 2, 4][(r % 3) as usize];
            let reg = (r >> 8) % (0x100 - u64::from(size) + 1);
            let value = (r >> 32) as u32;
            card.use_mmio((r >> 20) & 1 == 1);
            if (r >> 21) & 3 == 0 {
                card.r(reg, size);
            } else {
                card.w(reg, value, size);
            }
        }
        card.use_mmio(false);

        // The card still works once a driver programs it sanely.
        card.w8(0x5b, u32::from(b'R'));
        card.peer.drain(Duration::from_millis(300), 1000);
        card.put(RX_RING, &vec![0u8; 0x3000]);
        card.too_open(
            ACCEPT_MY_PHYS | ACCEPT_BROADCAST | RX_NO_WRAP | TOO_RX_BITS,
            0,
        );
        card.w16(INTR_STATUS, 0xffff);
        let f = ether(BCAST, 0x0800, 100, 0x42);
        card.too_tx(0, &f);
        card.peer.recv_until(&f, 1000);
        let mut ring = Ring::new(8192, true);
        let marker = ether(MAC, 0x0800, 100, 0x43);
        card.peer.send(&marker).unwrap();
        for _ in 0..64 {
            if ring.wait(&card, "the marker").data == marker {
                return;
            }
        }
        panic!("the marker never came in");
    });
}

#[test]
fn the_classic_ring_moves_with_a_migration() {
    with_deadline("rtl-mig", || {
        let (m, peer) = pc_with_rtl8139("rtl-mig");
        let card = Card::new(&m, peer);
        let cfg = ACCEPT_MY_PHYS | ACCEPT_BROADCAST | ACCEPT_MULTICAST | RX_NO_WRAP | TOO_RX_BITS;
        card.too_open(cfg, TOO_INTR_MASK);
        let mar = mar_for(&[[0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb]]);
        card.w32(MAR0, mar[0]);
        card.w32(MAR0 + 4, mar[1]);
        card.set_mac(NEW_MAC);
        let mut ring = Ring::new(8192, true);
        let first = ether(NEW_MAC, 0x0800, 100, 1);
        let second = ether(BCAST, 0x0800, 200, 2);
        card.peer.send(&first).unwrap();
        card.peer.send(&second).unwrap();
        card.wait_for("two frames", |c| c.r16(CBR) == 124 + 224);
        assert_eq!(ring.take(&card).unwrap().data, first);
        card.too_tx(0, &ether(BCAST, 0x0800, 60, 3));
        card.peer.recv_frame();
        card.wait_tok(0);
        let regs = |c: &Card| {
            [
                c.r16(CBR),
                c.r16(CAPR),
                c.r16(INTR_MASK),
                c.r16(INTR_STATUS),
                c.r32(RX_CONFIG),
                c.r32(TX_CONFIG),
                c.r32(RX_BUF),
                c.r32(MAR0),
                c.r32(MAR0 + 4),
                c.r16(TX_SUMMARY),
                c.r8(CHIP_CMD),
            ]
        };
        let before = regs(&card);
        let (saved, m2, peer2) = migrate(&m, "rtl-mig", "rtl-mig2", pc_with_rtl8139);
        let card2 = Card::new(&m2, peer2);
        // Guest RAM moves with a real migration: the ring's contents.
        card2.put(RX_RING, &card.get(RX_RING, 0x3000));
        assert_eq!(
            regs(&card2),
            before,
            "CBR, CAPR, IntrMask, IntrStatus, RxConfig, TxConfig, RxBuf, MAR, TSAD, ChipCmd"
        );
        assert_eq!(card2.mac_regs(), NEW_MAC, "the MAC the driver set");
        // Stopped: frames wait.
        let third = ether(NEW_MAC, 0x0800, 300, 4);
        card2.peer.send(&third).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            card2.r16(CBR),
            124 + 224,
            "nothing moves while the VM is stopped"
        );
        runstate::vm_start(machine_state(&m2).unwrap()).unwrap();
        card2.wait_for("the frame after the start", |c| {
            c.r16(CBR) == 124 + 224 + 324
        });
        // 8139too goes on where it was.
        assert_eq!(ring.take(&card2).unwrap().data, second);
        let p = ring.take(&card2).unwrap();
        assert_eq!(p.offset, 124 + 224);
        assert_eq!(p.data, third);
        // The next transmit descriptor is 1.
        let f = ether(BCAST, 0x0800, 70, 5);
        card2.too_tx(1, &f);
        assert_eq!(
            card2.peer.recv_frame(),
            f,
            "descriptor 1 after the migration"
        );

        // Each malformed part of a well-formed state is refused on its own.
        let regs_state: serde_json::Value = saved.get("regs").unwrap();
        let mut bad_cases = Vec::new();
        let mut v = regs_state.clone();
        v["eeprom"]["contents"].as_array_mut().unwrap().pop();
        bad_cases.push(("an EEPROM of 63 words", v));
        let mut v = regs_state.clone();
        v["rx_buffer_size"] = serde_json::json!(12345);
        bad_cases.push(("a ring buffer size RxConfig cannot give", v));
        let mut v = regs_state.clone();
        v["rx_buf_ptr"] = serde_json::json!(8192);
        bad_cases.push(("a read pointer past the ring", v));
        let mut v = regs_state.clone();
        v["curr_cplus_rx_desc"] = serde_json::json!(64);
        bad_cases.push(("a receive descriptor index past 64", v));
        let mut v = regs_state.clone();
        v["cplus_tx"] = serde_json::json!(vec![0u8; 65537]);
        bad_cases.push(("a C+ frame past the transmit buffer", v));
        assert_each_refused(&device(&m2, "rtl-mig2"), &saved, "regs", bad_cases);
    });
}

#[test]
fn cplus_ring_positions_tally_and_link_move_with_a_migration() {
    with_deadline("rtl-cpmig", || {
        let (m, peer) = pc_with_rtl8139("rtl-cpmig");
        let card = Card::new(&m, peer);
        card.put(CP_TX_RING, &[0u8; 16 * 4]);
        card.cp_rx_ring(4, PKT_BUF_SZ);
        card.cp_open(ACCEPT_MY_PHYS | ACCEPT_BROADCAST, [0, 0]);
        for n in 0..2u8 {
            card.peer.send(&ether(MAC, 0x88b5, 100, n)).unwrap();
            card.cp_wait_rx(u32::from(n));
        }
        card.cp_send(0, 4, &[&ether(BCAST, 0x0800, 60, 9)], 0, 0);
        card.peer.recv_frame();
        card.wait_for("descriptor 0 back", |c| c.cp_tx_opts1(0) & OWN == 0);
        hw::net::nic::find_nic("rtl-cpmig").unwrap().set_link(false);
        let (_, m2, peer2) = migrate(&m, "rtl-cpmig", "rtl-cpmig2", pc_with_rtl8139);
        let card2 = Card::new(&m2, peer2);
        card2.use_mmio(true);
        card2.put(CP_RX_RING, &card.get(CP_RX_RING, 16 * 4));
        card2.put(CP_TX_RING, &card.get(CP_TX_RING, 16 * 4));
        let nic2 = hw::net::nic::find_nic("rtl-cpmig2").unwrap();
        assert!(!nic2.link_up(), "the link stays down");
        assert_eq!(card2.r16(BMSR) & 0x04, 0);
        assert_eq!(card2.r16(CP_CMD), CP_CMD_LINUX);
        assert_eq!(card2.r32(RX_RING_LO), CP_RX_RING as u32);
        assert_eq!(card2.r32(TX_ADDR0), CP_TX_RING as u32);
        assert_eq!(card2.r16(INTR_MASK), CP_INTR_MASK);
        runstate::vm_start(machine_state(&m2).unwrap()).unwrap();
        let t = card2.tally();
        assert_eq!((t.tx_ok, t.rx_ok), (1, 2), "the tally counters: {t:?}");
        nic2.set_link(true);
        assert_eq!(card2.r16(BMSR), 0x782d);
        // The next receive descriptor is 2, the next transmit descriptor 1.
        let f = ether(MAC, 0x88b5, 120, 3);
        card2.peer.send(&f).unwrap();
        let (opts1, _) = card2.cp_wait_rx(2);
        assert_eq!(opts1, FS | LS | RX_PAM | (f.len() as u32 + 4));
        assert_eq!(card2.cp_rx_data(2, f.len()), f);
        let g = ether(BCAST, 0x0800, 80, 4);
        card2.cp_send(1, 4, &[&g], 0, 0);
        assert_eq!(
            card2.peer.recv_frame(),
            g,
            "descriptor 1 after the migration"
        );
    });
}

/// What drivers other than Linux's look at: iPXE (the card's boot ROM) writes the
/// RTL8169's RxMaxSize and takes the card for an RTL8169 when the value sticks; 8139cp's
/// `ethtool -S` on a downed interface dumps the tally counters with CpCmd 0 (C+ mode
/// stays on from the first CpCmd write until a reset); leaving the EEPROM's programming
/// mode deselects it; an 8-byte access is two 4-byte ones.
#[test]
fn rx_max_size_the_cplus_latch_eeprom_select_and_wide_accesses_are_the_hardwares() {
    with_deadline("rtl-quirks", || {
        let (m, peer) = pc_with_rtl8139("rtl-quirks");
        let card = Card::new(&m, peer);
        card.use_mmio(true);
        card.w16(0xda, 0x1ff8);
        assert_eq!(
            card.r16(0xda),
            0,
            "RxMaxSize is the RTL8169's: writes do not stick"
        );

        card.w16(CP_CMD, CP_CMD_LINUX);
        card.w16(CP_CMD, 0);
        let tally = card.tally();
        assert_eq!(tally.tx_ok, 0, "a dump with CpCmd 0 still happens");

        // Start a read of word 7, leave programming mode mid-word: the chip is deselected
        // and a later read starts from a fresh command.
        card.w8(CFG9346, 0x80 | 0x08);
        card.w8(CFG9346, 0);
        assert_eq!(card.r8(CFG9346) & 1, 0, "EEDO low outside programming mode");
        let word = card.eeprom_read(7, 6);
        assert_eq!(
            word,
            u16::from_le_bytes([0x52, 0x54]),
            "the MAC's first word"
        );

        // An 8-byte write over MAC0-7 sets the six address bytes, as two 4-byte writes.
        let addr = card.bar1;
        card.mmio.write(addr, 0x0000_6655_4433_2211, 8);
        assert_eq!(card.mac_regs(), [0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
        assert_eq!(card.mmio.read(addr, 8), 0x0000_6655_4433_2211);
    });
}
