//! `e1000` (the Intel 82540EM, QEMU's default card on pc) on the pc board under the qtest
//! accelerator, driven the way Linux's e1000 driver drives it: the EEPROM bit-banged
//! through EECD, the PHY through MDIC, transmit and receive descriptor rings in guest RAM.
//! The backend is a datagram socket pair whose far end is the test, so every frame the card
//! sends or takes is visible. A Linux guest on the card is in `tests/net_guest.rs`.

use std::ops::Deref;
use std::time::{Duration, Instant};

use hw::core::machine::machine_state;
use hw::core::runstate;
use qom::ObjectRef;
use test_support::nic_card::{
    assert_each_refused, device, ether, migrate, pc_with_nic, sum16, wait_until, FramePeer, PciNic,
    DEVFN,
};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];

const TX_RING: u64 = 0x10_0000;
const RX_RING: u64 = 0x11_0000;
const TX_BUFS: u64 = 0x20_0000;
const RX_BUFS: u64 = 0x30_0000;
const RING: u32 = 8;

// Registers.
const CTRL: u64 = 0x0;
const STATUS: u64 = 0x8;
const EECD: u64 = 0x10;
const EERD: u64 = 0x14;
const MDIC: u64 = 0x20;
const ICR: u64 = 0xc0;
const IMS: u64 = 0xd0;
const RCTL: u64 = 0x100;
const TCTL: u64 = 0x400;
const RDBAL: u64 = 0x2800;
const RDLEN: u64 = 0x2808;
const RDH: u64 = 0x2810;
const RDT: u64 = 0x2818;
const TDBAL: u64 = 0x3800;
const TDBAH: u64 = 0x3804;
const TDLEN: u64 = 0x3808;
const TDH: u64 = 0x3810;
const TDT: u64 = 0x3818;
const TPT: u64 = 0x40d4;
const MTA: u64 = 0x5200;
const RA: u64 = 0x5400;

const ICR_TXDW: u32 = 1;
const ICR_TXQE: u32 = 2;
const ICR_LSC: u32 = 4;
const ICR_RXT0: u32 = 0x80;
const RCTL_EN: u32 = 2;
const RCTL_UPE: u32 = 8;
const RCTL_BAM: u32 = 1 << 15;
const TXD_EOP: u32 = 1 << 24;
const TXD_RS: u32 = 1 << 27;
const TXD_DEXT: u32 = 1 << 29;
const TXD_DTYP_D: u32 = 1 << 20;
const TXD_TSE: u32 = 1 << 26;
const TXD_IP: u32 = 1 << 25;
const TXD_TCP: u32 = 1 << 24;

/// A pc machine on qtest with `e1000,netdev=ID,mac=MAC` at 04.0 over a datagram backend;
/// the VM runs. Returns the machine and the backend's far end.
fn pc_with_e1000(id: &str) -> (ObjectRef, FramePeer) {
    pc_with_card("e1000", id, &[])
}

/// [`pc_with_e1000`] with another card of the family and more properties.
fn pc_with_card(driver: &str, id: &str, props: &[(&str, &str)]) -> (ObjectRef, FramePeer) {
    pc_with_nic(driver, id, MAC, true, 128 << 20, props)
}

/// The test's driver: BAR 0 (memory) and BAR 1 (I/O) as the board assigned them, and the
/// wire.
struct Card {
    nic: PciNic,
    peer: FramePeer,
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
        }
    }

    fn r(&self, reg: u64) -> u32 {
        self.mmio.read(self.bar0 + reg, 4) as u32
    }

    fn w(&self, reg: u64, value: u32) {
        self.mmio.write(self.bar0 + reg, u64::from(value), 4);
    }

    /// Linux's `e1000_read_eeprom` for the 82540: Microwire READ, address, 16 bits out.
    fn eeprom_word(&self, addr: u32) -> u16 {
        const SK: u32 = 1;
        const CS: u32 = 2;
        const DI: u32 = 4;
        const DO: u32 = 8;
        self.w(EECD, CS);
        let bits = (0b110 << 6) | (addr & 0x3f);
        for i in (0..9).rev() {
            let di = if bits >> i & 1 != 0 { DI } else { 0 };
            self.w(EECD, CS | di);
            self.w(EECD, CS | di | SK);
            self.w(EECD, CS | di);
        }
        let mut word = 0u16;
        for _ in 0..16 {
            self.w(EECD, CS | SK);
            word = (word << 1) | u16::from(self.r(EECD) & DO != 0);
            self.w(EECD, CS);
        }
        self.w(EECD, 0);
        word
    }

    /// An MDIC read of PHY `phy`'s register `reg`: its value, or `None` on ERROR.
    fn phy_read(&self, phy: u32, reg: u32) -> Option<u16> {
        self.w(MDIC, (phy << 21) | (reg << 16) | (1 << 27));
        let mdic = self.r(MDIC);
        assert!(mdic & (1 << 28) != 0, "MDIC ready at once");
        (mdic & (1 << 30) == 0).then_some(mdic as u16)
    }

    fn phy_write(&self, reg: u32, value: u16) -> bool {
        self.w(MDIC, (1 << 21) | (reg << 16) | (1 << 26) | u32::from(value));
        self.r(MDIC) & (1 << 30) == 0
    }

    fn tx_desc(&self, i: u32, addr: u64, lower: u32, upper: u32) {
        let at = TX_RING + 16 * u64::from(i);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&lower.to_le_bytes());
        d[12..16].copy_from_slice(&upper.to_le_bytes());
        self.put(at, &d);
    }

    fn tx_status(&self, i: u32) -> u8 {
        self.get(TX_RING + 16 * u64::from(i) + 12, 1)[0]
    }

    fn setup_tx(&self) {
        self.put(TX_RING, &[0u8; 16 * RING as usize]);
        self.w(TDBAL, TX_RING as u32);
        self.w(TDBAH, 0);
        self.w(TDLEN, 16 * RING);
        self.w(TDH, 0);
        self.w(TDT, 0);
        self.w(TCTL, 2);
    }

    /// The receive ring's `RING` descriptors in guest RAM, each with its buffer.
    fn rx_ring(&self) {
        for i in 0..u64::from(RING) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(RX_BUFS + i * 0x4000).to_le_bytes());
            self.put(RX_RING + 16 * i, &d);
        }
    }

    /// Receive ring of `RING` descriptors with buffers of `RCTL`'s size, all but one
    /// handed to the card (RDT = RING - 1).
    fn setup_rx(&self, rctl: u32) {
        self.rx_ring();
        self.w(RDBAL, RX_RING as u32);
        self.w(RDLEN, 16 * RING);
        self.w(RDH, 0);
        self.w(RDT, RING - 1);
        self.w(RCTL, rctl | RCTL_EN);
    }

    /// Receive descriptor `i`: (length, status, special) and its buffer's first `len` bytes.
    fn rx_desc(&self, i: u64, len: usize) -> (u16, u8, u16, Vec<u8>) {
        let d = self.get(RX_RING + 16 * i, 16);
        let data = self.get(RX_BUFS + i * 0x4000, len);
        (
            u16::from_le_bytes([d[8], d[9]]),
            d[12],
            u16::from_le_bytes([d[14], d[15]]),
            data,
        )
    }

    fn wait_for(&self, what: &str, cond: impl Fn(&Card) -> bool) {
        wait_until(what, || cond(self));
    }
}

#[test]
fn identity_eeprom_phy_and_the_io_window_are_an_82540ems() {
    let (m, peer) = pc_with_e1000("e1k-id");
    let card = Card::new(&m, peer);
    assert_eq!(card.cfg.read(0x00, 4), 0x100e_8086, "8086:100e");
    assert_eq!(
        card.cfg.read(0x08, 4),
        0x0200_0003,
        "Ethernet controller, revision 3"
    );
    assert_eq!(card.cfg.read(0x3d, 1), 1, "INTA");
    assert_eq!(
        card.r(STATUS),
        0x8008_0783,
        "link up at 1000 Mbit/s, full duplex"
    );
    let words: Vec<u16> = (0..64).map(|a| card.eeprom_word(a)).collect();
    let mac: Vec<u8> = words[..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(mac, MAC, "the MAC in words 0-2");
    assert_eq!(words[11], 0x100e);
    assert_eq!(
        words.iter().fold(0u16, |a, &w| a.wrapping_add(w)),
        0xbaba,
        "the checksum Linux validates"
    );
    card.w(EERD, (1 << 8) | 1);
    assert_eq!(
        card.r(EERD) >> 16,
        u32::from(words[1]),
        "EERD reads the same word"
    );
    assert_eq!(card.phy_read(1, 2), Some(0x0141), "M88 PHY id 1");
    assert_eq!(card.phy_read(1, 3), Some(0x0c20), "82540EM's PHY id 2");
    assert_eq!(card.phy_read(2, 2), None, "no PHY at address 2");
    assert!(!card.phy_write(2, 0x1234), "PHY id registers are read-only");
    assert_eq!(
        card.phy_read(1, 0x1d),
        None,
        "registers the PHY lacks are errors"
    );
    assert!(card.phy_write(0x10, 0x0368));
    assert_eq!(card.phy_read(1, 0x10), Some(0x0368));
    // Restarting autonegotiation completes at once: the link stays up.
    assert!(card.phy_write(0, 0x1340));
    assert_eq!(
        card.phy_read(1, 0),
        Some(0x1140),
        "restart and reset bits clear themselves"
    );
    assert!(
        card.phy_read(1, 1).unwrap() & 0x24 == 0x24,
        "link up, autonegotiation complete"
    );
    assert!(card.r(STATUS) & 2 != 0);
    // BAR 1: IOADDR selects STATUS, IODATA reads it.
    card.io.write(card.bar1, STATUS, 4);
    assert_eq!(card.io.read(card.bar1 + 4, 4) as u32, card.r(STATUS));
    card.io.write(card.bar1, RA, 4);
    card.io.write(card.bar1 + 4, 0x1200_5452, 4);
    assert_eq!(card.r(RA), 0x1200_5452, "IODATA writes the register");
    let nic = hw::net::nic::find_nic("e1k-id").expect("the card is in the monitor's table");
    assert_eq!(nic.model(), "e1000");
    assert_eq!(
        nic.mac(),
        [0x52, 0x54, 0x00, 0x12, 0xcd, 0x01],
        "the MAC the driver set"
    );
    assert!(
        nic.rx_filter_info().is_none(),
        "QEMU's e1000 reports no filter"
    );
}

#[test]
fn frames_go_out_whole_and_tso_cuts_them_into_correct_segments() {
    let (m, peer) = pc_with_e1000("e1k-tx");
    let card = Card::new(&m, peer);
    card.setup_tx();
    card.r(ICR);
    // A legacy descriptor: the frame as it is.
    let plain = ether([0xff; 6], 0x0800, 100, 1);
    card.put(TX_BUFS, &plain);
    card.tx_desc(0, TX_BUFS, plain.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 1);
    assert_eq!(card.peer.recv_frame(), plain);
    card.wait_for("the descriptor's write-back", |c| c.tx_status(0) & 1 != 0);
    card.wait_for("TDH to move", |c| c.r(TDH) == 1);
    assert_eq!(card.r(ICR) & (ICR_TXDW | ICR_TXQE), ICR_TXDW | ICR_TXQE);
    assert_eq!(card.r(ICR), 0, "ICR clears when read");

    // A TCP/IPv4 frame of 3000 payload bytes, MSS 1000, as Linux's e1000_tso hands it:
    // IP checksum 0, TCP checksum seeded with the pseudo-header sum without length.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13 + 5) as u8).collect();
    let mut f = ether(MAC, 0x0800, 0, 0);
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    let ip = [
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    let pseudo = sum16(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 6], 0);
    tcp[16..18].copy_from_slice(&pseudo.to_be_bytes());
    f.extend_from_slice(&tcp);
    let hdr_len = f.len();
    assert_eq!(hdr_len, 54);
    card.put(TX_BUFS, &f);
    card.put(TX_BUFS + 0x1000, &payload);
    // Context: ipcss 14, ipcso 24, ipcse 33; tucss 34, tucso 50; paylen, hdr_len, MSS.
    let ctx_addr = u64::from_le_bytes([14, 24, 33, 0, 34, 50, 0, 0]);
    card.tx_desc(
        1,
        ctx_addr,
        3000 | TXD_DEXT | TXD_TSE | TXD_IP | TXD_TCP,
        ((1000u32) << 16) | ((hdr_len as u32) << 8),
    );
    let data_cmd = TXD_DEXT | TXD_DTYP_D | TXD_TSE;
    // POPTS: IXSM and TXSM.
    card.tx_desc(2, TX_BUFS, hdr_len as u32 | data_cmd, 3 << 8);
    card.tx_desc(
        3,
        TX_BUFS + 0x1000,
        3000 | data_cmd | TXD_EOP | TXD_RS,
        3 << 8,
    );
    card.w(TDT, 4);
    for n in 0..3u32 {
        let seg = card.peer.recv_frame();
        assert_eq!(seg.len(), 54 + 1000, "segment {n}");
        let ip = &seg[14..34];
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]),
            1040,
            "IP length of segment {n}"
        );
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]),
            0x1234 + n as u16,
            "IP id"
        );
        assert_eq!(sum16(ip, 0), 0xffff, "IP header checksum of segment {n}");
        let tcp = &seg[34..];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        assert_eq!(seq, 0x1000_0000 + 1000 * n, "sequence of segment {n}");
        let psh = tcp[13] & 0x08 != 0;
        assert_eq!(psh, n == 2, "PSH on the last segment only");
        let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6];
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        let full = sum16(tcp, u32::from(sum16(&pseudo, 0)));
        assert_eq!(full, 0xffff, "TCP checksum of segment {n}");
        assert_eq!(
            &tcp[20..],
            &payload[1000 * n as usize..1000 * (n as usize + 1)]
        );
    }
    card.wait_for("TDH to reach TDT", |c| c.r(TDH) == 4);
    assert!(card.tx_status(3) & 1 != 0, "RS descriptor written back");
    assert_eq!(card.tx_status(2) & 1, 0, "a descriptor without RS is not");
    assert_eq!(card.r(TPT), 4, "four frames counted");
    assert_eq!(card.r(TPT), 0, "statistics clear when read");
}

#[test]
fn frames_come_in_filtered_padded_untagged_and_split() {
    let (m, peer) = pc_with_e1000("e1k-rx");
    let card = Card::new(&m, peer);
    card.w(IMS, ICR_RXT0);
    card.setup_rx(RCTL_BAM);
    card.r(ICR);
    let mine = ether(MAC, 0x0800, 100, 3);
    card.peer
        .send(&ether([0x02, 0, 0, 0, 0, 0x77], 0x0800, 100, 9))
        .unwrap();
    card.peer.send(&mine).unwrap();
    card.wait_for("a frame in descriptor 0", |c| c.r(RDH) == 1);
    let (len, status, _, data) = card.rx_desc(0, mine.len());
    assert_eq!(len as usize, mine.len() + 4, "length counts the FCS");
    assert_eq!(status & 0x7, 0x7, "DD, EOP, IXSM");
    assert_eq!(data, mine, "the other host's unicast was filtered out");
    assert!(card.r(ICR) & ICR_RXT0 != 0);

    // Short frames are padded; broadcasts pass with BAM.
    card.peer.send(&ether([0xff; 6], 0x0806, 10, 1)).unwrap();
    card.wait_for("the broadcast", |c| c.r(RDH) == 2);
    let (len, _, _, data) = card.rx_desc(1, 60);
    assert_eq!(len, 64, "padded to 60 bytes, and the FCS");
    assert_eq!(&data[24..60], &[0u8; 36][..], "zero padding");

    // A multicast address in the MTA (filter type 0: bits 47:36).
    let group = [0x01, 0x00, 0x5e, 0x00, 0x12, 0x34];
    let hash = ((u32::from(group[5]) << 8 | u32::from(group[4])) >> 4) & 0xfff;
    card.w(MTA + 4 * u64::from(hash >> 5), 1 << (hash & 31));
    card.peer.send(&ether(group, 0x0800, 50, 2)).unwrap();
    card.wait_for("the multicast frame", |c| c.r(RDH) == 3);

    // VLAN stripping (CTRL.VME): the tag goes to `special`, VP is set.
    card.w(CTRL, card.r(CTRL) | (1 << 30));
    let mut tagged = ether(MAC, 0x8100, 0, 0);
    tagged.extend_from_slice(&[0x20, 0x05, 0x08, 0x00]);
    tagged.extend((0..80).map(|i| i as u8));
    card.peer.send(&tagged).unwrap();
    card.wait_for("the tagged frame", |c| c.r(RDH) == 4);
    let (len, status, special, data) = card.rx_desc(3, 14);
    assert_eq!(special, 0x2005, "the tag control information");
    assert!(status & 0x08 != 0, "VP");
    assert_eq!(len as usize, tagged.len() - 4 + 4);
    assert_eq!(&data[12..14], &[0x08, 0x00], "the tag is gone");

    // Promiscuous mode takes anyone's unicast.
    card.w(RCTL, card.r(RCTL) | RCTL_UPE);
    card.peer
        .send(&ether([0x02, 0, 0, 0, 0, 0x77], 0x0800, 40, 5))
        .unwrap();
    card.wait_for("the promiscuous frame", |c| c.r(RDH) == 5);

    // The ring is full once RDH reaches RDT: a frame waits in the backend, then comes in
    // when the driver hands more buffers over.
    card.peer.send(&ether(MAC, 0x0800, 60, 6)).unwrap();
    card.wait_for("descriptor 5", |c| c.r(RDH) == 6);
    card.peer.send(&ether(MAC, 0x0800, 60, 7)).unwrap();
    card.wait_for("descriptor 6", |c| c.r(RDH) == 7);
    let waiting = ether(MAC, 0x0800, 70, 8);
    card.peer.send(&waiting).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(card.r(RDH), 7, "no buffer, no delivery");
    card.w(RDT, 3);
    card.wait_for("the frame that waited", |c| c.r(RDH) == 0);
    assert_eq!(card.rx_desc(7, waiting.len()).3, waiting, "not lost");
}

#[test]
fn a_frame_larger_than_a_buffer_spans_descriptors() {
    let (m, peer) = pc_with_e1000("e1k-split");
    let card = Card::new(&m, peer);
    // 256-byte buffers (BSIZE 3, BSEX 0).
    card.setup_rx(3 << 16);
    let big = ether(MAC, 0x0800, 586, 4);
    assert_eq!(big.len(), 600);
    card.peer.send(&big).unwrap();
    card.wait_for("three descriptors", |c| c.r(RDH) == 3);
    let mut got = Vec::new();
    for (i, want_len) in [(0u64, 256u16), (1, 256), (2, 92)] {
        let (len, status, _, data) = card.rx_desc(i, 256);
        assert_eq!(len, want_len, "descriptor {i}'s share, FCS in the last");
        assert_eq!(status & 2 != 0, i == 2, "EOP on the last only");
        got.extend_from_slice(&data[..usize::from(want_len).min(600 - got.len())]);
    }
    assert_eq!(got, big);
}

#[test]
fn set_link_shows_in_status_phy_and_an_interrupt() {
    let (m, peer) = pc_with_e1000("e1k-link");
    let card = Card::new(&m, peer);
    card.r(ICR);
    let nic = hw::net::nic::find_nic("e1k-link").unwrap();
    nic.set_link(false);
    assert_eq!(card.r(STATUS) & 2, 0, "STATUS.LU clear");
    assert_eq!(card.phy_read(1, 1).unwrap() & 4, 0, "PHY link down");
    assert_eq!(card.r(ICR) & ICR_LSC, ICR_LSC, "LSC");
    // While down, nothing goes out.
    card.setup_tx();
    let frame = ether([0xff; 6], 0x0800, 60, 1);
    card.put(TX_BUFS, &frame);
    card.tx_desc(0, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 1);
    assert!(card.peer.no_frame_for(Duration::from_millis(300)));
    nic.set_link(true);
    assert_eq!(card.r(STATUS) & 2, 2, "back up");
    assert_eq!(card.r(ICR) & ICR_LSC, ICR_LSC);
    card.tx_desc(1, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 2);
    assert_eq!(card.peer.recv_frame(), frame);
}

#[test]
fn hostile_rings_and_descriptors_never_hang_or_panic() {
    let (m, peer) = pc_with_e1000("e1k-bad");
    let card = Card::new(&m, peer);
    card.setup_tx();
    // A tail far past the ring: nothing moves (QEMU goes round once), here and with a
    // ring longer than one pass's budget.
    card.tx_desc(0, TX_BUFS, 60 | TXD_EOP, 0);
    card.w(TDT, 1000);
    card.w(TDLEN, 16 * 2048);
    card.w(TDT, 4000);
    assert!(
        card.peer.no_frame_for(Duration::from_millis(200)),
        "a tail past the ring sends nothing"
    );
    assert_eq!(card.r(TPT), 0);
    assert_eq!(card.r(TDH), 0);
    card.w(TDLEN, 16 * RING);
    // A ring outside guest RAM.
    card.w(TDBAL, 0xfff0_0000);
    card.w(TDBAH, 0xffff);
    card.w(TDT, 3);
    // Buffers outside RAM, huge lengths, TSO with no MSS and a header longer than the data,
    // checksum offsets past the frame.
    card.w(TDBAL, TX_RING as u32);
    card.w(TDBAH, 0);
    card.w(TDH, 0);
    card.tx_desc(0, 0xdead_0000_0000, 0xffff | TXD_EOP, 0);
    card.tx_desc(
        1,
        u64::from_le_bytes([200, 250, 0xff, 0xff, 240, 250, 0, 0]),
        TXD_DEXT | TXD_TSE | TXD_IP | TXD_TCP,
        255 << 8,
    );
    card.tx_desc(
        2,
        TX_BUFS,
        40 | TXD_DEXT | TXD_DTYP_D | TXD_TSE | TXD_EOP,
        3 << 8,
    );
    card.tx_desc(
        3,
        u64::from_le_bytes([0, 250, 0, 0, 0, 250, 0, 0]),
        TXD_DEXT,
        0,
    );
    card.tx_desc(4, TX_BUFS, 0xffff | TXD_DEXT | TXD_DTYP_D | TXD_EOP, 3 << 8);
    card.w(TDT, 5);
    card.wait_for("the hostile descriptors to be consumed", |c| c.r(TDH) == 5);
    // The hostile descriptors hold fewer than 100 frames.
    card.peer.drain(Duration::from_millis(200), 99);
    // Receive: a ring outside RAM, a head past the ring, a zero-length ring.
    card.w(RDBAL, 0xfff0_0000);
    card.w(RDLEN, 16 * RING);
    card.w(RDH, 100);
    card.w(RDT, 3);
    card.w(RCTL, RCTL_EN | RCTL_UPE);
    for _ in 0..50 {
        card.peer.send(&ether(MAC, 0x0800, 1400, 1)).unwrap();
    }
    card.w(RDLEN, 0);
    card.w(RDH, 0);
    card.w(RDT, 1);
    std::thread::sleep(Duration::from_millis(100));
    // The card still works once programmed sanely.
    card.setup_tx();
    let frame = ether([0xff; 6], 0x0800, 80, 2);
    card.put(TX_BUFS, &frame);
    card.tx_desc(0, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 1);
    assert_eq!(card.peer.recv_frame(), frame);
    card.setup_rx(RCTL_BAM);
    let good = ether(MAC, 0x0800, 100, 3);
    // Frames queued while the ring was broken may come first: wait for ours.
    card.peer.send(&good).unwrap();
    card.wait_for("a frame delivered", |c| c.r(RDH) >= 1);
}

#[test]
fn the_card_moves_with_a_migration() {
    let (m, peer) = pc_with_e1000("e1k-mig");
    let card = Card::new(&m, peer);
    card.w(IMS, ICR_RXT0 | ICR_TXDW);
    card.w(RA, 0x1200_5452);
    card.setup_rx(RCTL_BAM);
    card.peer.send(&ether([0xff; 6], 0x0800, 64, 1)).unwrap();
    card.wait_for("one frame in", |c| c.r(RDH) == 1);
    let (saved, m2, peer2) = migrate(&m, "e1k-mig", "e1k-mig2", pc_with_e1000);
    let card2 = Card::new(&m2, peer2);
    // Guest RAM moves with a real migration: the ring's descriptors.
    card2.rx_ring();
    assert_eq!(card2.r(RDH), 1, "the ring's head moved");
    assert_eq!(card2.r(RA), 0x1200_5452, "the MAC the driver set");
    assert_eq!(card2.r(IMS), ICR_RXT0 | ICR_TXDW);
    assert_eq!(card2.r(RCTL), RCTL_BAM | RCTL_EN);
    // Stopped: frames wait.
    card2.peer.send(&ether([0xff; 6], 0x0800, 64, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(card2.r(RDH), 1, "nothing moves while the VM is stopped");
    runstate::vm_start(machine_state(&m2).unwrap()).unwrap();
    card2.wait_for("the frame after the start", |c| c.r(RDH) == 2);
    // Each malformed part of a well-formed state is refused on its own.
    let card_state: serde_json::Value = saved.get("card").unwrap();
    let mut bad_cases = Vec::new();
    let mut short_phy = card_state.clone();
    short_phy["phy"].as_array_mut().unwrap().pop();
    bad_cases.push(("a PHY of 31 registers", short_phy));
    let mut far_reg = card_state.clone();
    far_reg["regs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!([0x8000, 1]));
    bad_cases.push(("a register past the file", far_reg));
    let mut unknown_reg = card_state.clone();
    unknown_reg["regs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!([1, 1]));
    bad_cases.push(("a register the card lacks (offset 4)", unknown_reg));
    let mut long_frame = card_state.clone();
    long_frame["tx"]["data"] = serde_json::json!(vec![0u8; 0x10001]);
    bad_cases.push(("a frame past the transmit buffer", long_frame));
    assert_each_refused(&device(&m2, "e1k-mig2"), &saved, "card", bad_cases);
}

#[test]
fn the_82544gc_and_82545em_are_the_same_card_with_their_own_ids() {
    for (driver, device_id, phy_id2) in [
        ("e1000-82544gc", 0x100cu16, 0x0c30u16),
        ("e1000-82545em", 0x100f, 0x0c20),
    ] {
        let (m, peer) = pc_with_card(driver, &format!("e1k-{device_id:x}"), &[]);
        let card = Card::new(&m, peer);
        assert_eq!(
            card.cfg.read(0x00, 4),
            u32::from(device_id) << 16 | 0x8086,
            "{driver}"
        );
        assert_eq!(card.eeprom_word(11), device_id, "{driver}'s EEPROM");
        assert_eq!(card.phy_read(1, 3), Some(phy_id2), "{driver}'s PHY");
        let nic = hw::net::nic::find_nic(&format!("e1k-{device_id:x}")).unwrap();
        assert_eq!(nic.model(), driver);
        // And it moves frames as the 82540EM does.
        card.setup_tx();
        let frame = ether([0xff; 6], 0x0800, 64, 3);
        card.put(TX_BUFS, &frame);
        card.tx_desc(0, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
        card.w(TDT, 1);
        assert_eq!(card.peer.recv_frame(), frame, "{driver}");
    }
}

/// With `mitigation=on` (QEMU's default) a rising interrupt opens a window of ITR (here
/// its largest, 16.8 ms) in which a new cause waits; with `mitigation=off` it raises the
/// line at once.
#[test]
fn interrupt_mitigation_holds_a_new_cause_for_the_itr_window() {
    for (mitigation, id) in [("on", "e1k-mit-on"), ("off", "e1k-mit-off")] {
        let (m, peer) = pc_with_card("e1000", id, &[("mitigation", mitigation)]);
        let card = Card::new(&m, peer);
        let line = || card.line();
        card.w(0xc4, 0xffff); // ITR
        card.w(IMS, 0x200); // MDAC only: nothing else raises it here
        let window_opened = Instant::now();
        card.w(0xc8, 0x200); // ICS
        assert!(
            line(),
            "{mitigation}: the first cause raises the line at once"
        );
        assert_eq!(card.r(ICR), 0x200);
        assert!(!line(), "{mitigation}: reading ICR lowers it");
        card.w(0xc8, 0x200);
        assert_eq!(card.r(0xc8), 0x200, "the cause is recorded");
        if mitigation == "on" {
            // 0xffff units of 256 ns: the line may be up only once that has passed (a
            // slow test thread may see it up already).
            let window = Duration::from_nanos(0xffff * 256);
            assert!(
                !line() || window_opened.elapsed() >= window,
                "inside the window the line waits"
            );
            card.wait_for("the window's end", |_| line());
            assert!(
                window_opened.elapsed() >= window,
                "not before the window's end"
            );
        } else {
            assert!(line(), "without mitigation the line rises at once");
        }
        assert_eq!(card.r(ICR), 0x200);
    }
}

#[test]
fn without_bus_mastering_no_frame_moves() {
    let (m, peer) = pc_with_e1000("e1k-bm");
    let card = Card::new(&m, peer);
    card.setup_tx();
    card.cfg.write(0x04, 0x3, 2); // I/O and memory, no bus master
    let frame = ether([0xff; 6], 0x0800, 64, 1);
    card.put(TX_BUFS, &frame);
    card.tx_desc(0, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 1);
    assert!(
        card.peer.no_frame_for(Duration::from_millis(200)),
        "no DMA without bus mastering"
    );
    assert_eq!(card.r(TDH), 0);
    assert_eq!(card.tx_status(0), 0, "no write-back either");
    card.cfg.write(0x04, 0x7, 2);
    assert_eq!(card.peer.recv_frame(), frame, "bus mastering on: it goes");
}

#[test]
fn byte_writes_to_icr_clear_only_their_own_bits() {
    let (m, peer) = pc_with_e1000("e1k-icr");
    let card = Card::new(&m, peer);
    card.w(0xc8, 0x0284); // ICS: LSC, RXT0, MDAC
    card.mmio.write(card.bar0 + ICR, 0x04, 1); // clear LSC only
    assert_eq!(card.r(0xc8), 0x0280, "RXT0 and MDAC stay");
    card.mmio.write(card.bar0 + ICR + 1, 0x02, 1); // clear MDAC only
    assert_eq!(card.r(ICR), 0x80);
}

#[test]
fn a_tiny_mss_makes_many_segments_and_the_loop_stays_responsive() {
    let (m, peer) = pc_with_e1000("e1k-mss");
    let card = Card::new(&m, peer);
    card.setup_tx();
    // 54 bytes of headers, then 6000 bytes of payload in segments of 1 byte.
    let mut f = ether([0x02, 0, 0, 0, 0, 9], 0x0800, 0, 0);
    f.extend_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f.extend_from_slice(&[0u8; 20]);
    f.extend((0..6000).map(|i| i as u8));
    card.put(TX_BUFS, &f);
    card.tx_desc(
        0,
        u64::from_le_bytes([14, 24, 33, 0, 34, 50, 0, 0]),
        6000 | TXD_DEXT | TXD_TSE | TXD_IP | TXD_TCP,
        (1 << 16) | (54 << 8),
    );
    let data_cmd = TXD_DEXT | TXD_DTYP_D | TXD_TSE | TXD_EOP | TXD_RS;
    card.tx_desc(1, TX_BUFS, f.len() as u32 | data_cmd, 0);
    card.w(TDT, 2);
    let mut last = Vec::new();
    for got in 1..=6000 {
        let seg = card.peer.recv_frame();
        assert_eq!(seg.len(), 55, "a header and one byte");
        last = seg;
        if got == 3000 {
            // The descriptor's segments are made under the card's lock (as QEMU makes
            // them on its vCPU thread): a register read waits for them, then answers.
            assert_eq!(card.r(STATUS) & 2, 2);
        }
    }
    assert_eq!(last[54], (5999 % 256) as u8);
    card.wait_for("the ring to be done", |c| c.r(TDH) == 2);
    assert!(
        card.peer.no_frame_for(Duration::from_millis(100)),
        "no empty segment after the last"
    );
}

#[test]
fn phy_loopback_brings_sent_frames_back_in() {
    let (m, peer) = pc_with_e1000("e1k-loop");
    let card = Card::new(&m, peer);
    card.setup_rx(RCTL_BAM);
    card.setup_tx();
    assert!(card.phy_write(0, 0x1140 | 0x4000), "BMCR loopback");
    let frame = ether(MAC, 0x0800, 90, 4);
    card.put(TX_BUFS, &frame);
    card.tx_desc(0, TX_BUFS, frame.len() as u32 | TXD_EOP | TXD_RS, 0);
    card.w(TDT, 1);
    card.wait_for("the frame to come back", |c| c.r(RDH) == 1);
    assert_eq!(card.rx_desc(0, frame.len()).3, frame);
    assert!(
        card.peer.no_frame_for(Duration::from_millis(100)),
        "nothing reached the backend"
    );
}

#[test]
fn a_link_taken_down_stays_down_across_a_migration() {
    let (m, peer) = pc_with_e1000("e1k-lmig");
    let _card = Card::new(&m, peer);
    hw::net::nic::find_nic("e1k-lmig").unwrap().set_link(false);
    let (_, m2, peer2) = migrate(&m, "e1k-lmig", "e1k-lmig2", pc_with_e1000);
    let card2 = Card::new(&m2, peer2);
    let nic2 = hw::net::nic::find_nic("e1k-lmig2").unwrap();
    assert!(!nic2.link_up(), "the monitor sees the link down");
    assert_eq!(card2.r(STATUS) & 2, 0);
    runstate::vm_start(machine_state(&m2).unwrap()).unwrap();
    nic2.set_link(true);
    assert_eq!(card2.r(STATUS) & 2, 2, "and set_link brings it back");
}
