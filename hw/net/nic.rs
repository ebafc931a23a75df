//! What every network card shares with the monitor (QEMU's `NICState` half of
//! `net/net.c`): the table of cards that `info network`, `set_link`, `query-rx-filter` and
//! `announce-self` walk, the names cards get without `id=`, and MAC addresses (the default
//! one, parsing and printing, the RARP frame that announces one); and what the emulated
//! cards share below that: their backend ([`NicBackend`]), their place on an event loop
//! ([`CardLoop`]), the frames a full backend holds back ([`HeldFrames`]), checksums and
//! the Ethernet CRC.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use net::{NetQueue, Netdev};
use parking_lot::Mutex;
use serde_json::Value;
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::runstate::{ChangeHandlerId, VmState};

/// A network card as the monitor sees it (QEMU's `NetClientState` of kind NIC with its
/// `NetClientInfo` hooks).
pub trait Nic: Send + Sync {
    /// `id=`, or `<type>.N` ([`default_name`]).
    fn name(&self) -> &str;
    /// The card's QOM type (`info network`'s `model=`).
    fn model(&self) -> &'static str;
    /// Its backend's id.
    fn netdev_id(&self) -> &str;
    /// Its backend.
    fn netdev(&self) -> &Arc<dyn Netdev>;
    /// The MAC address the guest uses now.
    fn mac(&self) -> [u8; 6];
    /// Whether the link is up.
    fn link_up(&self) -> bool;
    /// QMP `set_link`: the card tells its driver as the hardware would.
    fn set_link(&self, up: bool);
    /// One round of QMP `announce-self`.
    fn announce(&self);
    /// QMP `query-rx-filter`'s entry (QEMU's `query_rx_filter` hook); `None` for cards
    /// that do not report their filter.
    fn rx_filter_info(&self) -> Option<Value> {
        None
    }
}

/// Every card, in creation order (QEMU's `net_clients` of kind NIC).
static NICS: Mutex<Vec<Weak<dyn Nic>>> = Mutex::new(Vec::new());

/// Adds a card to the monitor's table; it leaves when its last reference goes.
pub fn register(nic: Weak<dyn Nic>) {
    NICS.lock().push(nic);
}

/// Takes a card out of the table (unplugged: its object may live on a while).
pub fn unregister(nic: &dyn Nic) {
    let target = nic as *const dyn Nic as *const ();
    NICS.lock()
        .retain(|w| w.strong_count() > 0 && w.as_ptr() as *const () != target);
}

/// Every card alive, in creation order.
pub fn nics() -> Vec<Arc<dyn Nic>> {
    let mut all = NICS.lock();
    all.retain(|w| w.strong_count() > 0);
    all.iter().filter_map(Weak::upgrade).collect()
}

/// The card called `name`, or the card whose backend is called `name` (QEMU's
/// `qemu_find_net_clients_except` as `set_link` uses it).
pub fn find_nic(name: &str) -> Option<Arc<dyn Nic>> {
    nics()
        .into_iter()
        .find(|n| n.name() == name || n.netdev_id() == name)
}

/// QEMU's `qemu_get_nic_name` default for a card without `id=`: `<type>.N`, the first N
/// no card of that type has.
pub fn default_name(type_name: &str) -> String {
    let taken: Vec<String> = nics().iter().map(|n| n.name().to_string()).collect();
    (0..)
        .map(|i| format!("{type_name}.{i}"))
        .find(|n| !taken.contains(n))
        .unwrap_or_default()
}

/// Cards given the default MAC so far (QEMU's `qemu_macaddr_default_if_unset` index).
static DEFAULT_MACS: AtomicU8 = AtomicU8::new(0);

/// The next default MAC, as QEMU hands them out: 52:54:00:12:34:56, then :57, ...
pub fn default_mac() -> [u8; 6] {
    let index = DEFAULT_MACS.fetch_add(1, Ordering::Relaxed);
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index)]
}

/// A MAC property's value (`52:54:00:12:34:56` or with dashes), as QEMU's
/// `qdev_prop_set_macaddr` parses it.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// QEMU's `announce_self_create`: a broadcast RARP request for `mac`, padded to 60 bytes.
pub fn rarp_frame(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(mac);
    f[32..38].copy_from_slice(mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_as_qemu_parses_them() {
        assert_eq!(parse_mac("fa:16:3e:d1:2d:99"), Some([0xfa, 0x16, 0x3e, 0xd1, 0x2d, 0x99]));
        assert_eq!(parse_mac("52-54-00-12-34-56"), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:567"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn macs_print_as_qemu_prints_them() {
        assert_eq!(format_mac(&[0xfa, 0x16, 0x3e, 0xd1, 0x2d, 0x99]), "fa:16:3e:d1:2d:99");
    }

    #[test]
    fn the_announcement_is_a_rarp_request_for_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(&mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}

/// Errors of a card's `netdev` property, in QEMU's words (the card's type first).
#[derive(Debug, thiserror::Error)]
pub enum NicBackendError {
    /// No `netdev=`, or no backend of that id.
    #[error("Property '{0}.netdev' can't find value '{1}'")]
    NotFound(&'static str, String),
    /// Another card has the backend.
    #[error("Property '{0}.netdev' can't take value '{1}', it's in use")]
    InUse(&'static str, String),
    /// The backend has no queue pair.
    #[error("netdev '{0}' has no queue")]
    NoQueue(String),
}

/// An emulated card's backend (QEMU's `qemu_new_nic` for a card without virtio's
/// offloads): claimed by the card's name, its first queue pair used (the others of a
/// multiqueue tap detached, so nothing is steered to them), frames without a vnet header.
/// Let go once, at unplug or when the card goes, so a backend that later takes the same id
/// is not cut from its own card.
pub struct NicBackend {
    /// `id=`, or `<type>.N`.
    pub name: String,
    /// The backend's id.
    pub netdev_id: String,
    /// The backend.
    pub netdev: Arc<dyn Netdev>,
    /// Its first queue pair, the one the card uses.
    pub queue: Arc<dyn NetQueue>,
    released: AtomicBool,
}

impl NicBackend {
    /// Claims `netdev` for a card of `type_name` called `id` (or its default name).
    pub fn attach(
        type_name: &'static str,
        id: Option<String>,
        netdev: Option<String>,
    ) -> Result<NicBackend, NicBackendError> {
        let netdev_id = netdev.ok_or(NicBackendError::NotFound(type_name, String::new()))?;
        if net::find_netdev(&netdev_id).is_none() {
            return Err(NicBackendError::NotFound(type_name, netdev_id));
        }
        let name = id.unwrap_or_else(|| default_name(type_name));
        let netdev = net::attach(&netdev_id, &name)
            .map_err(|()| NicBackendError::InUse(type_name, netdev_id.clone()))?;
        let queues = netdev.queues();
        let Some(queue) = queues.first().cloned() else {
            net::detach(&netdev_id);
            return Err(NicBackendError::NoQueue(netdev_id));
        };
        // Whole frames: the card checksums and segments in software.
        if netdev.has_vnet_hdr() {
            let _ = netdev.set_vnet_hdr_len(0);
            let _ = netdev.set_offload(net::Offloads::default());
        }
        for extra in &queues[1..] {
            if let Err(e) = extra.set_enabled(false) {
                log::warn!("{type_name}: cannot detach tap queue: {e}");
            }
        }
        Ok(NicBackend {
            name,
            netdev_id,
            netdev,
            queue,
            released: AtomicBool::new(false),
        })
    }

    /// Lets the backend go (its other queues attached again), once.
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            for extra in self.netdev.queues().iter().skip(1) {
                let _ = extra.set_enabled(true);
            }
            net::detach(&self.netdev_id);
        }
    }

    /// A card that cannot announce itself: the RARP frame for `mac` (QMP `announce-self`).
    pub fn announce(&self, mac: &[u8; 6]) {
        let mut frame = rarp_frame(mac);
        if let Err(e) = self.queue.send(&[VolatileSlice::from(&mut frame[..])]) {
            log::debug!("{}: announcement not sent: {e}", self.name);
        }
    }

    /// Whether the backend sends on the descriptor it receives on (a tap): then a full
    /// backend is waited for as that descriptor's writability.
    pub fn tx_on_rx_fd(&self) -> bool {
        self.queue.tx_fd() == Some(self.queue.rx_fd())
    }
}

impl Drop for NicBackend {
    fn drop(&mut self) {
        self.release();
    }
}

/// What an emulated card does on its event loop; [`CardLoop`] calls it there, and at the
/// VM's run-state changes.
pub trait LoopCard: Send + Sync + 'static {
    /// One pass: held frames, transmissions, then frames from the backend (a kick or a
    /// ready backend).
    fn serve(&self);
    /// The card's timer fired.
    fn timer_expired(&self);
    /// The VM stopped (`false`) or is about to run (`true`): frames follow it, none move
    /// while it is stopped.
    fn run_state_changed(&self, running: bool);
}

/// An emulated card's place on its event loop (QEMU's fd handlers of a NIC and its
/// VM change-state handler): a kick that a vCPU thread's register write sends, the
/// backend's receive descriptor, the card's timer, and the VM's run state; all run the
/// card on the loop thread, never on a vCPU thread.
pub struct CardLoop {
    /// The card's type, for log lines.
    name: &'static str,
    context: Arc<AioContext>,
    kick: EventFd,
    backend_handler: OnceLock<AioHandlerId>,
    handlers: OnceLock<(Vec<AioHandlerId>, ChangeHandlerId)>,
}

impl CardLoop {
    /// A loop presence on `context`, not serving yet ([`CardLoop::start`]).
    pub fn new(name: &'static str, context: Arc<AioContext>) -> io::Result<CardLoop> {
        Ok(CardLoop {
            name,
            context,
            kick: EventFd::new(EFD_NONBLOCK)?,
            backend_handler: OnceLock::new(),
            handlers: OnceLock::new(),
        })
    }

    /// Has the loop run the card's pass soon.
    pub fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            log::error!("{}: cannot kick the event loop: {e}", self.name);
        }
    }

    /// A pass begins: the kicks so far are taken.
    pub fn take_kick(&self) {
        let _ = self.kick.read();
    }

    /// Which backend events run the next pass (readable while the card can take a frame;
    /// writable while a full tap holds frames back); changed only when they differ from
    /// `current`, which the card keeps under its own lock.
    pub fn watch_backend(&self, current: &mut Interest, wanted: Interest) {
        if wanted == *current {
            return;
        }
        if let Some(id) = self.backend_handler.get() {
            if let Err(e) = self.context.set_interest(*id, wanted) {
                log::error!("{}: cannot watch the backend: {e}", self.name);
            }
        }
        *current = wanted;
    }

    /// Serves `card` on the loop: its pass at a kick or a readable `backend_fd`, its timer
    /// at `timer_fd`, its run-state hook at the VM's changes. The handlers hold the card
    /// weakly. On an error nothing stays registered.
    pub fn start<C: LoopCard>(
        &self,
        card: &Arc<C>,
        backend_fd: RawFd,
        timer_fd: RawFd,
        vm: &VmState,
    ) -> io::Result<()> {
        let weak = Arc::downgrade(card);
        let serve = |w: Weak<C>| -> Box<dyn FnMut() + Send> {
            Box::new(move || {
                if let Some(c) = w.upgrade() {
                    c.serve();
                }
            })
        };
        let w = weak.clone();
        let timer: Box<dyn FnMut() + Send> = Box::new(move || {
            if let Some(c) = w.upgrade() {
                c.timer_expired();
            }
        });
        let mut ids = Vec::with_capacity(3);
        let registered = [
            (self.kick.as_raw_fd(), serve(weak.clone())),
            (backend_fd, serve(weak.clone())),
            (timer_fd, timer),
        ]
        .into_iter()
        .try_for_each(|(fd, handler)| {
            ids.push(self.context.add_fd(fd, handler)?);
            Ok::<(), io::Error>(())
        });
        if let Err(e) = registered {
            for id in ids {
                self.context.remove_fd(id);
            }
            return Err(e);
        }
        let _ = self.backend_handler.set(ids[1]);
        let w = weak;
        let change = vm.add_change_handler(
            0,
            Arc::new(move |running, _| {
                if let Some(c) = w.upgrade() {
                    c.run_state_changed(running);
                }
            }),
        );
        let _ = self.handlers.set((ids, change));
        Ok(())
    }

    /// Stops serving the card: when this returns none of its handlers runs again.
    pub fn stop(&self, vm: Option<&VmState>) {
        if let Some((ids, change)) = self.handlers.get() {
            for id in ids {
                self.context.remove_fd(*id);
            }
            if let Some(vm) = vm {
                vm.remove_change_handler(*change);
            }
        }
    }
}

/// Frames a full backend held back, in order, up to a number of bytes (a large send makes
/// many at once); beyond it frames are dropped, as a full wire drops them.
#[derive(Debug, Default)]
pub struct HeldFrames {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl HeldFrames {
    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops what is held (a reset, a migration's destination).
    pub fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
    }

    /// Sends the held frames in order, until the backend is full again.
    pub fn flush(&mut self, queue: &dyn NetQueue) {
        while let Some(mut frame) = self.frames.pop_front() {
            match queue.send(&[VolatileSlice::from(&mut frame[..])]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.frames.push_front(frame);
                    return;
                }
                Err(e) => log::debug!("backend refused a frame: {e}"),
                Ok(_) => {}
            }
            self.bytes -= frame.len();
        }
    }

    /// Sends `frame` if nothing is held and the backend takes it; holds it otherwise
    /// (while fewer than `limit` bytes are held).
    pub fn send(&mut self, queue: &dyn NetQueue, mut frame: Vec<u8>, limit: usize) {
        if self.frames.is_empty() {
            match queue.send(&[VolatileSlice::from(&mut frame[..])]) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::debug!("backend refused a frame: {e}");
                    return;
                }
            }
        }
        if self.bytes + frame.len() <= limit {
            self.bytes += frame.len();
            self.frames.push_back(frame);
        }
    }
}

/// The Internet checksum of `data` (RFC 1071) before folding: 16-bit big-endian words
/// summed, an odd last byte as the high half of a word.
pub fn checksum_add(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// A [`checksum_add`] sum folded to 16 bits and complemented: the checksum to store.
pub fn fold_checksum(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Ethernet CRC-32 computed most significant bit first over the bits as they go on
/// the wire (Linux's `ether_crc`, QEMU's `net_crc32`): its top six bits index the
/// multicast hash filters of the RTL8139 and others.
pub fn ether_crc(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &byte in data {
        let mut b = byte;
        for _ in 0..8 {
            let carry = (crc >> 31) ^ u32::from(b & 1);
            crc <<= 1;
            b >>= 1;
            if carry != 0 {
                crc ^= 0x04c1_1db7;
            }
        }
    }
    crc
}

#[cfg(test)]
mod checksum_tests {
    use super::*;

    #[test]
    fn checksums_fold_and_complement_as_rfc_1071() {
        // RFC 1071's example words.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold_checksum(checksum_add(&data)), !0xddf2);
        assert_eq!(checksum_add(&[0x12]), 0x1200);
    }

    #[test]
    fn the_ethernet_crc_hashes_multicast_addresses_as_linux() {
        // 01:00:5e:00:00:01 (all hosts) is bit 31 of the RTL8139's 64-bit filter
        // (Linux's ether_crc >> 26); zlib's CRC-32 of the same bits is the reflected one.
        assert_eq!(ether_crc(&[0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]) >> 26, 31);
    }
}
