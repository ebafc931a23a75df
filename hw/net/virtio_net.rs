//! The virtio network device (QEMU's `hw/net/virtio-net.c`): frames between the driver's
//! receive/transmit queue pairs and a network backend (`net::Netdev`: a tap, user-mode
//! networking), plus the control queue (receive filter, MAC, VLANs, announcements, queue
//! pairs, guest offloads). Transports (`virtio-net-pci`) build it from their properties.
//!
//! Each queue pair is served on an I/O thread ([`AioContext`]), never on a vCPU thread:
//! the driver's kicks are eventfds and the backend's descriptor is watched on the same
//! loop. Frames move between guest buffers and the backend with one `readv`/`writev`: a
//! backend with a vnet header (a tap) reads and writes the virtio-net header itself, so
//! the guest's checksum and segmentation offloads reach the host kernel unchanged.
//!
//! Receive buffers are taken from the ring ahead of frames ("pending"), enough for the
//! largest frame; with mergeable buffers one frame fills as many as it needs and the
//! header says how many (`num_buffers`), the rest wait for the next frame.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use net::{NetQueue, Netdev, Offloads};
use parking_lot::Mutex;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

use crate::core::accel_ops::EventFd;
use crate::core::dirty_log::DirtyTracker;
use crate::core::iothread::{AioContext, AioHandlerId, Interest};
use crate::core::qapi_event::{self, json, Value};
use crate::core::timer::DeviceTimer;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::net::nic::{self, format_mac, rarp_frame, Nic};
use crate::net::vhost_net::{vhost_net_get_features, VhostNet};
use crate::virtio::virtio::{
    bit, device_id, drain_kick, feature, mark_chain_written, read_config_bytes, ActivateError, Activation,
    QueuePosition, RateLimitedLog, RingError, UsedGroups, VirtioDevice, VirtioTransport,
};

/// Feature bits (virtio 1.2, 5.1.3).
pub mod net_feature {
    /// The device takes frames with partial checksums.
    pub const CSUM: u32 = 0;
    /// The driver takes frames with partial checksums.
    pub const GUEST_CSUM: u32 = 1;
    /// The driver may switch its receive offloads on the control queue.
    pub const CTRL_GUEST_OFFLOADS: u32 = 2;
    /// `mtu` in the configuration.
    pub const MTU: u32 = 3;
    /// `mac` in the configuration.
    pub const MAC: u32 = 5;
    /// The driver takes TCPv4 segments larger than the MTU.
    pub const GUEST_TSO4: u32 = 7;
    /// ... TCPv6.
    pub const GUEST_TSO6: u32 = 8;
    /// ... with ECN.
    pub const GUEST_ECN: u32 = 9;
    /// ... UDP fragments.
    pub const GUEST_UFO: u32 = 10;
    /// The device takes TCPv4 segments larger than the MTU.
    pub const HOST_TSO4: u32 = 11;
    /// ... TCPv6.
    pub const HOST_TSO6: u32 = 12;
    /// ... with ECN.
    pub const HOST_ECN: u32 = 13;
    /// ... UDP fragments.
    pub const HOST_UFO: u32 = 14;
    /// A received frame may span several buffers.
    pub const MRG_RXBUF: u32 = 15;
    /// `status` (link state) in the configuration.
    pub const STATUS: u32 = 16;
    /// The control queue.
    pub const CTRL_VQ: u32 = 17;
    /// Receive-mode control (promiscuous, all-multicast).
    pub const CTRL_RX: u32 = 18;
    /// VLAN filtering.
    pub const CTRL_VLAN: u32 = 19;
    /// Extra receive modes (no-broadcast, all-unicast...).
    pub const CTRL_RX_EXTRA: u32 = 20;
    /// The driver sends gratuitous packets when asked.
    pub const GUEST_ANNOUNCE: u32 = 21;
    /// Several queue pairs.
    pub const MQ: u32 = 22;
    /// The MAC address can be set on the control queue.
    pub const CTRL_MAC_ADDR: u32 = 23;
}
use net_feature as nf;

/// Configuration `status` bits.
const S_LINK_UP: u16 = 1;
const S_ANNOUNCE: u16 = 2;

/// Control queue classes and commands (virtio 1.2, 5.1.6.5).
mod ctrl {
    pub const RX: u8 = 0;
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const RX_ALLUNI: u8 = 2;
    pub const RX_NOMULTI: u8 = 3;
    pub const RX_NOUNI: u8 = 4;
    pub const RX_NOBCAST: u8 = 5;
    pub const MAC: u8 = 1;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const VLAN: u8 = 2;
    pub const VLAN_ADD: u8 = 0;
    pub const VLAN_DEL: u8 = 1;
    pub const ANNOUNCE: u8 = 3;
    pub const ANNOUNCE_ACK: u8 = 0;
    pub const MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
    pub const GUEST_OFFLOADS: u8 = 5;
    pub const GUEST_OFFLOADS_SET: u8 = 0;
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
}

/// QEMU's `MAC_TABLE_ENTRIES`: addresses the filter holds before it overflows.
const MAC_TABLE_ENTRIES: usize = 64;
/// QEMU's `MAX_VLAN`.
const MAX_VLAN: usize = 1 << 12;
/// `struct virtio_net_config` up to `mtu`.
const CONFIG_SIZE: usize = 12;
/// The legacy header without `num_buffers`.
const HDR_LEN_LEGACY: usize = 10;
/// The header with `num_buffers` (virtio 1.x, or mergeable buffers).
const HDR_LEN_MRG: usize = 12;
/// An Ethernet frame without segmentation offloads: 1514 bytes and a VLAN tag.
const MAX_PLAIN_FRAME: usize = 1518;
/// The largest segmentation-offloaded frame (QEMU's `VIRTIO_NET_MAX_BUFSIZE`).
const MAX_GSO_FRAME: usize = 65550;
/// Frames moved per wake-up before the loop serves other handlers.
const BURST: usize = 256;
/// QEMU's `TX_TIMER_INTERVAL`: `x-txtimer`'s default, in nanoseconds.
pub const TX_TIMER_INTERVAL_NS: u32 = 150_000;
/// How long a transmit kick may wait while frames stream in (see [`TxMode::Bh`]).
const STREAM_TX_DELAY: Duration = Duration::from_micros(500);
/// The receive rate window, and the bytes per window above which frames "stream in"
/// (32 KiB per millisecond: 256 Mbit/s).
const STREAM_WINDOW: Duration = Duration::from_millis(5);
const STREAM_BYTES: usize = 160 << 10;
/// Received frames smaller than this (ACKs, requests) count for no stream.
const STREAM_FRAME_MIN: usize = 1024;
/// After a hold ran out with data held (not only ACKs: the peer may have been waiting
/// for it, as in request/response traffic), kicks go at once for this long.
const STREAM_BACKOFF: Duration = Duration::from_millis(20);

/// Guest errors of every virtio-net device share one log budget.
static GUEST_ERRORS: LazyLock<RateLimitedLog> = LazyLock::new(RateLimitedLog::default);

/// How the transport configured the device (its properties, resolved).
pub struct VirtioNetConf {
    /// The backend (`netdev=`), claimed by this NIC.
    pub netdev: Arc<dyn Netdev>,
    /// Its id.
    pub netdev_id: String,
    /// The NIC's name in the monitor (`id=`, or `virtio-net-pci.N`).
    pub name: String,
    /// The QOM path events name.
    pub path: String,
    /// `mac=`.
    pub mac: [u8; 6],
    /// Features the properties switch on (ring features included).
    pub host_features: u64,
    /// Queue pairs offered (`mq=on`: the backend's queues).
    pub queue_pairs: u16,
    /// `rx_queue_size`.
    pub rx_queue_size: u16,
    /// `tx_queue_size`.
    pub tx_queue_size: u16,
    /// `host_mtu` (0: none offered).
    pub mtu: u16,
    /// Where the queues are served.
    pub context: Arc<AioContext>,
    /// The kernel's vhost-net workers serving the queue pairs (`vhost=on`), one per
    /// pair, with the features they support; `None` serves them here.
    pub vhost: Option<(Vec<Arc<File>>, u64)>,
    /// When a transmit kick is served (`tx=`, `x-txtimer`).
    pub tx_mode: TxMode,
}

/// When the frames a transmit kick announces go out (QEMU's `tx=` property).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxMode {
    /// `tx=bh`, the default: at once, as QEMU's bottom half runs at once on an idle
    /// loop. While frames stream in, QEMU's loop is busy copying them and the bottom
    /// half waits, so the guest's ACKs pile up and go out in one kick; qomvm's receive
    /// path leaves its loop idle, so it waits on purpose, [`STREAM_TX_DELAY`] (see
    /// [`StreamHold`]: request/response traffic does not wait).
    Bh,
    /// `tx=timer`: a kick arms a timer of `x-txtimer` and turns kicks off; the frames go
    /// out when it fires, or at once on a further kick (QEMU's `virtio_net_handle_tx_timer`).
    Timer(Duration),
}

/// The receive filter the driver programs on the control queue (QEMU's `VirtIONet`
/// `promisc`, `allmulti`, ..., `mac_table`, `vlans`).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct RxFilter {
    promisc: bool,
    allmulti: bool,
    alluni: bool,
    nomulti: bool,
    nouni: bool,
    nobcast: bool,
    uni: Vec<[u8; 6]>,
    multi: Vec<[u8; 6]>,
    uni_overflow: bool,
    multi_overflow: bool,
    vlans: Vec<u32>,
}

impl RxFilter {
    /// QEMU's reset state: promiscuous until the driver says otherwise, no VLAN allowed.
    fn reset() -> Self {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            uni: Vec::new(),
            multi: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
            vlans: vec![0; MAX_VLAN / 32],
        }
    }
}

/// What the device, its queue pairs and the monitor share.
struct Shared {
    name: String,
    path: String,
    netdev_id: String,
    netdev: Arc<dyn Netdev>,
    mac: Mutex<[u8; 6]>,
    /// Configuration `status`.
    status: AtomicU16,
    link_up: AtomicBool,
    filter: Mutex<RxFilter>,
    /// `NIC_RX_FILTER_CHANGED` is sent once, then again after `query-rx-filter`.
    rxfilter_notify: AtomicBool,
    /// The features the driver accepted, while running.
    features: Mutex<u64>,
    /// The VLAN filter is on (CTRL_VLAN negotiated).
    vlan_filter: AtomicBool,
    /// Header bytes the backend's first queue expects before a frame we send ourselves
    /// (the vnet header length last set on a tap; 0 while it hides it).
    backend_hdr: AtomicUsize,
    /// The receive offloads the driver chose with CTRL_GUEST_OFFLOADS_SET (QEMU's
    /// `curr_guest_offloads`); `None`: those its features imply.
    guest_offloads: Mutex<Option<u64>>,
    /// The vhost-served queue pairs the driver uses (pair 0, or VQ_PAIRS_SET's count).
    vhost_pairs: std::sync::atomic::AtomicU16,
}

impl Shared {
    /// QEMU's `receive_filter`: whether a frame to `dest` (and `vlan`, if tagged) is for
    /// the guest.
    fn accepts(&self, frame: &[u8]) -> bool {
        let filter = self.filter.lock();
        if filter.promisc {
            return true;
        }
        if frame.len() < 14 {
            return false;
        }
        if self.vlan_filter.load(Ordering::Relaxed) && frame[12..14] == [0x81, 0x00] {
            if frame.len() < 16 {
                return false;
            }
            let vid = usize::from(u16::from_be_bytes([frame[14], frame[15]]) & 0xfff);
            if filter.vlans[vid >> 5] & (1 << (vid & 0x1f)) == 0 {
                return false;
            }
        }
        let dest: [u8; 6] = frame[0..6].try_into().unwrap_or_default();
        if dest[0] & 1 != 0 {
            if dest == [0xff; 6] {
                return !filter.nobcast;
            }
            if filter.nomulti {
                return false;
            }
            filter.allmulti || filter.multi_overflow || filter.multi.contains(&dest)
        } else {
            if filter.nouni {
                return false;
            }
            filter.alluni
                || filter.uni_overflow
                || dest == *self.mac.lock()
                || filter.uni.contains(&dest)
        }
    }

    fn filter_changed(&self) {
        if self.rxfilter_notify.swap(false, Ordering::AcqRel) {
            let mut data = serde_json::Map::new();
            data.insert("name".into(), self.name.clone().into());
            data.insert("path".into(), self.path.clone().into());
            qapi_event::emit("NIC_RX_FILTER_CHANGED", Some(Value::Object(data)));
        }
    }
}

/// QEMU's `VirtIONet`.
pub struct VirtioNet {
    shared: Arc<Shared>,
    conf_queue_pairs: u16,
    rx_queue_size: u16,
    tx_queue_size: u16,
    mtu: u16,
    features: u64,
    context: Arc<AioContext>,
    vhost: Vec<Arc<File>>,
    running: Mutex<Option<Running>>,
    tx_mode: TxMode,
    /// The queue pairs the driver used when the device stopped with the VM (QEMU's
    /// `curr_queue_pairs`): the next activation enables as many.
    resume_pairs: Mutex<Option<u16>>,
}

/// A running device: its queue pairs, its handlers, and its transport.
struct Running {
    pairs: Vec<Arc<QueuePair>>,
    ctrl: Option<Arc<CtrlQueue>>,
    /// Queue pairs the kernel serves (`vhost=on`); stopped when dropped.
    vhost: Vec<VhostNet>,
    handlers: Vec<AioHandlerId>,
    transport: Arc<dyn VirtioTransport>,
}

/// The header length the driver's features call for.
fn header_len(features: u64) -> usize {
    if features & (bit(feature::VERSION_1) | bit(nf::MRG_RXBUF)) != 0 {
        HDR_LEN_MRG
    } else {
        HDR_LEN_LEGACY
    }
}

/// The receive offloads in `features`.
fn offloads(features: u64) -> Offloads {
    let has = |f: u32| features & bit(f) != 0;
    Offloads {
        csum: has(nf::GUEST_CSUM),
        tso4: has(nf::GUEST_TSO4),
        tso6: has(nf::GUEST_TSO6),
        ecn: has(nf::GUEST_ECN),
        ufo: has(nf::GUEST_UFO),
    }
}

impl VirtioNet {
    /// A device over `conf`: offers what the properties ask and the backend can do (no
    /// offloads without a vnet header, as QEMU's `virtio_net_get_features`).
    pub fn new(conf: VirtioNetConf) -> Arc<Self> {
        let mut features = conf.host_features
            | bit(nf::MAC)
            | bit(feature::VERSION_1)
            | bit(feature::NOTIFY_ON_EMPTY)
            | bit(feature::ANY_LAYOUT);
        if !conf.netdev.has_vnet_hdr() {
            for f in [
                nf::CSUM,
                nf::HOST_TSO4,
                nf::HOST_TSO6,
                nf::HOST_ECN,
                nf::HOST_UFO,
                nf::GUEST_CSUM,
                nf::GUEST_TSO4,
                nf::GUEST_TSO6,
                nf::GUEST_ECN,
                nf::GUEST_UFO,
                nf::CTRL_GUEST_OFFLOADS,
            ] {
                features &= !bit(f);
            }
        }
        if !conf.netdev.has_ufo() {
            features &= !(bit(nf::GUEST_UFO) | bit(nf::HOST_UFO));
        }
        if conf.queue_pairs > 1 {
            features |= bit(nf::MQ) | bit(nf::CTRL_VQ);
        }
        if conf.mtu != 0 {
            features |= bit(nf::MTU);
        }
        // QEMU's vhost_net_get_features: what the kernel's worker cannot do is not offered.
        let vhost = match conf.vhost {
            Some((files, vhost_features)) => {
                features = vhost_net_get_features(vhost_features, features);
                files
            }
            None => Vec::new(),
        };
        if features & bit(nf::CTRL_VQ) == 0 {
            features &= !(bit(nf::CTRL_RX)
                | bit(nf::CTRL_VLAN)
                | bit(nf::CTRL_RX_EXTRA)
                | bit(nf::CTRL_MAC_ADDR)
                | bit(nf::GUEST_ANNOUNCE)
                | bit(nf::MQ)
                | bit(nf::CTRL_GUEST_OFFLOADS));
        }
        let shared = Arc::new(Shared {
            name: conf.name,
            path: conf.path,
            netdev_id: conf.netdev_id,
            netdev: conf.netdev,
            mac: Mutex::new(conf.mac),
            status: AtomicU16::new(S_LINK_UP),
            link_up: AtomicBool::new(true),
            filter: Mutex::new(RxFilter::reset()),
            rxfilter_notify: AtomicBool::new(true),
            features: Mutex::new(0),
            vlan_filter: AtomicBool::new(false),
            backend_hdr: AtomicUsize::new(0),
            guest_offloads: Mutex::new(None),
            vhost_pairs: std::sync::atomic::AtomicU16::new(1),
        });
        let dev = Arc::new(VirtioNet {
            shared,
            conf_queue_pairs: conf.queue_pairs,
            rx_queue_size: conf.rx_queue_size,
            tx_queue_size: conf.tx_queue_size,
            mtu: conf.mtu,
            features,
            context: conf.context,
            vhost,
            running: Mutex::new(None),
            tx_mode: conf.tx_mode,
            resume_pairs: Mutex::new(None),
        });
        let weak: Weak<VirtioNet> = Arc::downgrade(&dev);
        nic::register(weak);
        dev
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..6].copy_from_slice(&self.mac());
        b[6..8].copy_from_slice(&self.shared.status.load(Ordering::Acquire).to_le_bytes());
        b[8..10].copy_from_slice(&self.conf_queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    fn has_ctrl(&self) -> bool {
        self.features & bit(nf::CTRL_VQ) != 0
    }
}

/// The monitor's view of the card.
impl Nic for VirtioNet {
    fn model(&self) -> &'static str {
        "virtio-net-pci"
    }

    /// The NIC's name (`id=` or `virtio-net-pci.N`).
    fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its backend's id.
    fn netdev_id(&self) -> &str {
        &self.shared.netdev_id
    }

    /// Its backend.
    fn netdev(&self) -> &Arc<dyn Netdev> {
        &self.shared.netdev
    }

    /// The MAC address the guest uses now.
    fn mac(&self) -> [u8; 6] {
        *self.shared.mac.lock()
    }

    /// Whether the link is up.
    fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Acquire)
    }

    /// QMP `set_link` (QEMU's `virtio_net_set_link_status`): the configuration's status
    /// changes and the driver is told; while down, frames are neither received nor sent.
    fn set_link(&self, up: bool) {
        if self.shared.link_up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        if up {
            self.shared.status.fetch_or(S_LINK_UP, Ordering::AcqRel);
        } else {
            self.shared.status.fetch_and(!S_LINK_UP, Ordering::AcqRel);
        }
        let running = self.running.lock();
        if let Some(r) = running.as_ref() {
            if self.features & bit(nf::STATUS) != 0 {
                r.transport.signal_config();
            }
            for pair in &r.pairs {
                pair.wake();
            }
        }
    }

    /// One round of QMP `announce-self` (QEMU's `virtio_net_announce` and
    /// `qemu_announce_self_iter`): a driver that can announce (GUEST_ANNOUNCE) is asked
    /// to, through the configuration's status; otherwise qomvm sends the RARP frame that
    /// tells switches where the MAC address now is.
    fn announce(&self) {
        let features = *self.shared.features.lock();
        let running = self.running.lock();
        if let Some(r) = running.as_ref() {
            if features & bit(nf::GUEST_ANNOUNCE) != 0 && features & bit(nf::CTRL_VQ) != 0 {
                self.shared.status.fetch_or(S_ANNOUNCE, Ordering::AcqRel);
                r.transport.signal_config();
                return;
            }
        }
        drop(running);
        let Some(queue) = self.shared.netdev.queues().into_iter().next() else {
            return;
        };
        let hdr = self.shared.backend_hdr.load(Ordering::Acquire);
        let mut buf = vec![0u8; hdr];
        buf.extend_from_slice(&rarp_frame(&self.mac()));
        if let Err(e) = queue.send(&[VolatileSlice::from(&mut buf[..])]) {
            log::debug!("virtio-net: announcement not sent: {e}");
        }
    }

    /// QMP `query-rx-filter`'s entry for this NIC (QEMU's `RxFilterInfo`); re-arms
    /// `NIC_RX_FILTER_CHANGED`.
    fn rx_filter_info(&self) -> Option<Value> {
        let f = self.shared.filter.lock().clone();
        self.shared.rxfilter_notify.store(true, Ordering::Release);
        let mode = |all: bool, none: bool| {
            if all {
                "all"
            } else if none {
                "none"
            } else {
                "normal"
            }
        };
        let vlan_on = self.shared.vlan_filter.load(Ordering::Relaxed);
        let vlan_table: Vec<u32> = (0..MAX_VLAN as u32)
            .filter(|&v| f.vlans[(v >> 5) as usize] & (1 << (v & 0x1f)) != 0)
            .collect();
        Some(json!({
            "name": self.shared.name,
            "promiscuous": f.promisc,
            "multicast": mode(f.allmulti, f.nomulti),
            "unicast": mode(f.alluni, f.nouni),
            "vlan": if vlan_on { "normal" } else { "all" },
            "broadcast-allowed": !f.nobcast,
            "multicast-overflow": f.multi_overflow,
            "unicast-overflow": f.uni_overflow,
            "main-mac": format_mac(&self.mac()),
            "vlan-table": if vlan_on { vlan_table } else { Vec::new() },
            "unicast-table": f.uni.iter().map(format_mac).collect::<Vec<_>>(),
            "multicast-table": f.multi.iter().map(format_mac).collect::<Vec<_>>(),
        }))
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        net::detach(&self.shared.netdev_id);
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        device_id::NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = Vec::new();
        for _ in 0..self.conf_queue_pairs {
            sizes.push(self.rx_queue_size);
            sizes.push(self.tx_queue_size);
        }
        if self.has_ctrl() {
            sizes.push(64);
        }
        sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        // A legacy driver without CTRL_MAC_ADDR sets the MAC by writing the config.
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let running_features = *self.shared.features.lock();
        if running_features & (bit(feature::VERSION_1) | bit(nf::CTRL_MAC_ADDR)) != 0 {
            return;
        }
        let mut mac = self.shared.mac.lock();
        for (i, &byte) in data.iter().enumerate() {
            if let Some(slot) = mac.get_mut(offset + i) {
                *slot = byte;
            }
        }
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            transport,
            features,
            dirty,
        } = activation;
        let shared = &self.shared;
        *shared.features.lock() = features;
        shared
            .vlan_filter
            .store(features & bit(nf::CTRL_VLAN) != 0, Ordering::Relaxed);
        let hdr_len = header_len(features);
        let netdev = &shared.netdev;
        let vnet_hdr = netdev.has_vnet_hdr();
        if vnet_hdr {
            shared.backend_hdr.store(hdr_len, Ordering::Release);
            // A device resumed after a stop keeps the offloads its driver chose.
            let guest_offloads = shared.guest_offloads.lock().unwrap_or(features);
            netdev
                .set_vnet_hdr_len(hdr_len)
                .and_then(|()| netdev.set_offload(offloads(guest_offloads)))
                .map_err(|e| ActivateError::Io {
                    device: "virtio-net",
                    reason: format!("cannot configure the backend's vnet header: {e}"),
                })?;
        }
        let backend_queues = netdev.queues();
        let mrg = features & bit(nf::MRG_RXBUF) != 0;
        let gso = features
            & (bit(nf::GUEST_TSO4) | bit(nf::GUEST_TSO6) | bit(nf::GUEST_UFO))
            != 0;
        let frame_room = if gso { MAX_GSO_FRAME } else { MAX_PLAIN_FRAME };
        let rx_need = if vnet_hdr {
            hdr_len + frame_room
        } else {
            hdr_len + netdev.max_frame_len().min(frame_room)
        };
        let mut by_index: Vec<Option<crate::virtio::virtio::ActiveQueue>> =
            (0..self.queue_max_sizes().len()).map(|_| None).collect();
        for q in queues {
            if let Some(slot) = by_index.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let mut running = Running {
            pairs: Vec::new(),
            ctrl: None,
            vhost: Vec::new(),
            handlers: Vec::new(),
            transport: Arc::clone(&transport),
        };
        let fail = |running: Running, reason: String| {
            for id in running.handlers {
                self.context.remove_fd(id);
            }
            ActivateError::Io {
                device: "virtio-net",
                reason,
            }
        };
        for pair_index in 0..usize::from(self.conf_queue_pairs) {
            let rx = by_index[2 * pair_index].take();
            let tx = by_index[2 * pair_index + 1].take();
            let (Some(rx), Some(tx)) = (rx, tx) else {
                continue;
            };
            let Some(backend) = backend_queues.get(pair_index).cloned() else {
                continue;
            };
            if let Some(vhost_file) = self.vhost.get(pair_index) {
                let Some(tap) = backend.tap_file() else {
                    return Err(fail(running, "vhost needs a tap backend".into()));
                };
                match VhostNet::start(
                    Arc::clone(vhost_file),
                    tap,
                    Arc::clone(&mem),
                    vec![rx, tx],
                    features,
                    Arc::clone(&transport),
                    Arc::clone(&self.context),
                    Arc::clone(&dirty),
                ) {
                    Ok(v) => running.vhost.push(v),
                    Err(e) => return Err(fail(running, format!("vhost-net: {e}"))),
                }
                continue;
            }
            let tx_timer = match DeviceTimer::new() {
                Ok(t) => t,
                Err(e) => return Err(fail(running, format!("cannot create the transmit timer: {e}"))),
            };
            let pair = Arc::new(QueuePair {
                context: Arc::clone(&self.context),
                rx_kick: Arc::clone(&rx.kick),
                tx_kick: Arc::clone(&tx.kick),
                rx_index: rx.index,
                tx_index: tx.index,
                backend,
                mem: Arc::clone(&mem),
                dirty: Arc::clone(&dirty),
                transport: Arc::clone(&transport),
                shared: Arc::clone(shared),
                hdr_len,
                vnet_hdr,
                mrg,
                rx_need,
                tx_mode: self.tx_mode,
                tx_timer,
                broken: AtomicBool::new(false),
                inner: Mutex::new(PairInner {
                    rx_used: UsedGroups::new(&rx.queue),
                    rx: rx.queue,
                    tx: tx.queue,
                    pending: VecDeque::new(),
                    pending_bytes: 0,
                    rx_starved: false,
                    bounce: Vec::new(),
                    held: None,
                    tx_blocked: None,
                    backend_handler: None,
                    interest: Interest::READ,
                    enabled: false,
                    tx_waiting: false,
                    tx_hold_ran_out: false,
                    stream_hold: StreamHold::default(),
                }),
            });
            for (kick, which) in [(rx.kick, Kick::Rx), (tx.kick, Kick::Tx)] {
                let p = Arc::clone(&pair);
                let fd = kick.as_raw_fd();
                let handler = Box::new(move || {
                    drain_kick(&kick);
                    p.kicked(which);
                });
                match self.context.add_fd(fd, handler) {
                    Ok(id) => running.handlers.push(id),
                    Err(e) => return Err(fail(running, e.to_string())),
                }
            }
            let p = Arc::clone(&pair);
            let timer = Box::new(move || p.tx_timer_expired());
            match self.context.add_fd(pair.tx_timer.as_raw_fd(), timer) {
                Ok(id) => running.handlers.push(id),
                Err(e) => return Err(fail(running, e.to_string())),
            }
            running.pairs.push(pair);
        }
        if self.has_ctrl() {
            let index = self.queue_max_sizes().len() - 1;
            if let Some(q) = by_index[index].take() {
                let ctrl = Arc::new(CtrlQueue {
                    index: q.index,
                    queue: Mutex::new(q.queue),
                    mem: Arc::clone(&mem),
                    dirty: Arc::clone(&dirty),
                    transport: Arc::clone(&transport),
                    shared: Arc::clone(shared),
                    pairs: running.pairs.clone(),
                    vhost_queues: backend_queues
                        .iter()
                        .take(running.vhost.len())
                        .cloned()
                        .collect(),
                    broken: AtomicBool::new(false),
                });
                running.ctrl = Some(Arc::clone(&ctrl));
                let kick = q.kick;
                let fd = kick.as_raw_fd();
                let handler = Box::new(move || {
                    drain_kick(&kick);
                    ctrl.serve();
                });
                match self.context.add_fd(fd, handler) {
                    Ok(id) => running.handlers.push(id),
                    Err(e) => return Err(fail(running, e.to_string())),
                }
            }
        }
        // QEMU starts with one queue pair; the driver asks for more on the control queue
        // (VQ_PAIRS_SET), and a device resumed after a stop keeps what it had. Backend
        // queues no pair serves are detached too.
        let enabled_pairs = usize::from(self.resume_pairs.lock().take().unwrap_or(1));
        for (i, q) in backend_queues
            .iter()
            .enumerate()
            .skip(running.pairs.len() + running.vhost.len())
        {
            if let Err(e) = q.set_enabled(false) {
                log::warn!("virtio-net: cannot detach backend queue {i}: {e}");
            }
        }
        for (i, q) in backend_queues.iter().enumerate().take(running.vhost.len()) {
            if let Err(e) = q.set_enabled(i < enabled_pairs) {
                log::warn!("virtio-net: cannot set backend queue {i}: {e}");
            }
        }
        shared.vhost_pairs.store(
            enabled_pairs.min(running.vhost.len()).max(1) as u16,
            Ordering::Release,
        );
        for (i, pair) in running.pairs.iter().enumerate() {
            if let Err(e) = pair.set_enabled(i < enabled_pairs) {
                let reason = format!("cannot start backend queue {i}: {e}");
                for pair in &running.pairs {
                    pair.unwatch_backend();
                }
                return Err(fail(running, reason));
            }
        }
        *self.running.lock() = Some(running);
        Ok(())
    }

    fn reset(&self) {
        self.stop();
        // QEMU's virtio_net_reset.
        *self.shared.filter.lock() = RxFilter::reset();
        *self.shared.features.lock() = 0;
        *self.shared.guest_offloads.lock() = None;
        *self.resume_pairs.lock() = None;
        self.shared
            .status
            .fetch_and(!S_ANNOUNCE, Ordering::AcqRel);
    }

    /// The pairs stop serving (their handlers removed, the backend no longer watched;
    /// the tap stays attached, as in QEMU). Receive buffers taken but not filled and a
    /// frame the backend has not taken yet are the last ones popped: they are given
    /// back. Pairs the kernel serves (`vhost=on`) stop there (QEMU's
    /// `vhost_net_stop`): each ring's position comes back from `VHOST_GET_VRING_BASE`
    /// (the worker gives back nothing half-done) and its dirty log is synced a last time.
    fn park(&self) -> Option<Vec<QueuePosition>> {
        let mut running = self.stop()?;
        let mut positions = Vec::new();
        let mut enabled = 0u16;
        for vhost in &mut running.vhost {
            if let Err(e) = vhost.stop() {
                log::error!("virtio-net: stopping vhost-net: {e}");
            }
            for aq in vhost.queues() {
                positions.push(QueuePosition::of(aq.index, &aq.queue, 0));
            }
        }
        if !running.vhost.is_empty() {
            enabled = self.shared.vhost_pairs.load(Ordering::Acquire);
        }
        for pair in &running.pairs {
            let inner = pair.inner.lock();
            let pending = inner.pending.len() as u16;
            positions.push(QueuePosition::of(pair.rx_index, &inner.rx, pending));
            let blocked = u16::from(inner.tx_blocked.is_some());
            positions.push(QueuePosition::of(pair.tx_index, &inner.tx, blocked));
            enabled += u16::from(inner.enabled);
        }
        if let Some(ctrl) = &running.ctrl {
            positions.push(QueuePosition::of(ctrl.index, &ctrl.queue.lock(), 0));
        }
        *self.resume_pairs.lock() = Some(enabled.max(1));
        Some(positions)
    }

    /// QEMU's `vmstate_virtio_net_device`: the MAC, the status (link, announce), the
    /// receive filter, the pairs in use and the offloads the driver chose.
    fn save_device(&self, section: &mut VmStateSection) -> Result<(), VmStateError> {
        let shared = &self.shared;
        section.put("net.mac", self.mac());
        section.put("net.status", shared.status.load(Ordering::Acquire));
        section.put("net.link_up", self.link_up());
        section.put("net.filter", &*shared.filter.lock());
        section.put("net.queue_pairs", *self.resume_pairs.lock());
        section.put("net.guest_offloads", *shared.guest_offloads.lock());
        Ok(())
    }

    fn load_device(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let pairs: Option<u16> = section.get("net.queue_pairs")?;
        if pairs.is_some_and(|n| n > self.conf_queue_pairs) {
            return Err(VmStateError::Mismatch(format!(
                "virtio-net: {} queue pairs in use, this device has {}",
                pairs.unwrap_or_default(),
                self.conf_queue_pairs
            )));
        }
        let shared = &self.shared;
        *shared.mac.lock() = section.get("net.mac")?;
        shared.status.store(section.get("net.status")?, Ordering::Release);
        shared.link_up.store(section.get("net.link_up")?, Ordering::Release);
        *shared.filter.lock() = section.get("net.filter")?;
        *shared.guest_offloads.lock() = section.get("net.guest_offloads")?;
        *self.resume_pairs.lock() = pairs;
        Ok(())
    }
}

impl VirtioNet {
    /// Removes the handlers (waiting for running ones) and stops watching the backends;
    /// returns what ran.
    fn stop(&self) -> Option<Running> {
        let running = self.running.lock().take()?;
        for id in &running.handlers {
            self.context.remove_fd(*id);
        }
        for pair in &running.pairs {
            pair.unwatch_backend();
        }
        Some(running)
    }
}

#[derive(Clone, Copy)]
enum Kick {
    Rx,
    Tx,
}

/// What [`QueuePair::receive_low`] found.
enum LowRoom {
    /// A frame of this many bytes (as the backend wrote it) that fits the buffers taken.
    Fits(usize),
    /// A frame the buffers taken cannot hold: it waits for the driver's next buffers.
    Held,
    /// The backend has no frame (or failed to read one).
    NoFrame,
}

/// A receive buffer taken from the ring: its head and its guest segments.
struct RxBuf {
    head: u16,
    segs: Vec<(GuestAddress, usize)>,
    len: usize,
}

/// A frame the backend could not take yet.
struct TxFrame {
    head: u16,
    segs: Vec<(GuestAddress, usize)>,
}

struct PairInner {
    rx: Queue,
    /// The receive ring's used side: a frame's buffers reach the driver together.
    rx_used: UsedGroups,
    tx: Queue,
    /// Receive buffers taken from the ring, in ring order.
    pending: VecDeque<RxBuf>,
    pending_bytes: usize,
    /// The ring ran out: wait for the driver's kick before reading the backend.
    rx_starved: bool,
    /// Where a frame is read when the ring holds less than a largest frame
    /// ([`QueuePair::receive_low`]); empty until first needed.
    bounce: Vec<u8>,
    /// The bytes of `bounce` that hold a frame the ring had no room for yet.
    held: Option<usize>,
    tx_blocked: Option<TxFrame>,
    backend_handler: Option<(AioHandlerId, Arc<AioContext>)>,
    interest: Interest,
    /// The driver uses this pair (pair 0, or one of VQ_PAIRS_SET's).
    enabled: bool,
    /// A transmit kick waits for the timer (or a further kick): the driver's kicks are
    /// off meanwhile (QEMU's `tx_waiting`).
    tx_waiting: bool,
    /// The next transmit pass flushes a `tx=bh` hold that ran out: it looks for data.
    tx_hold_ran_out: bool,
    /// Whether `tx=bh` holds a kick.
    stream_hold: StreamHold,
}

/// `tx=bh`'s choice: hold a transmit kick while frames stream in, unless a recent hold
/// ran out with data in it: a stream's ACKs may wait (TCP delays its own ACKs far
/// longer), but data may be what the peer waits for before it sends more.
#[derive(Default)]
struct StreamHold {
    rate: ReceiveRate,
    off_until: Option<Instant>,
}

impl StreamHold {
    /// `bytes` of frames of [`STREAM_FRAME_MIN`] or more came in at `now`.
    fn received(&mut self, now: Instant, bytes: usize) {
        self.rate.add(now, bytes);
    }

    /// How long a kick at `now` is held (`None`: not at all).
    fn hold(&mut self, now: Instant) -> Option<Duration> {
        let backing_off = self.off_until.is_some_and(|until| now < until);
        (!backing_off && self.rate.streaming(now)).then_some(STREAM_TX_DELAY)
    }

    /// A hold ran out and held data.
    fn held_back_data(&mut self, now: Instant) {
        self.off_until = Some(now + STREAM_BACKOFF);
    }
}

/// Whether frames stream in: the bytes received per [`STREAM_WINDOW`], judged over the
/// window running and the one before it.
#[derive(Default)]
struct ReceiveRate {
    window_start: Option<Instant>,
    bytes: usize,
    /// The last full window reached [`STREAM_BYTES`].
    streaming: bool,
}

impl ReceiveRate {
    fn roll(&mut self, now: Instant) {
        let Some(start) = self.window_start else {
            self.window_start = Some(now);
            return;
        };
        let age = now.saturating_duration_since(start);
        if age < STREAM_WINDOW {
            return;
        }
        // A window ended: it decides, unless nothing came for a whole window since.
        self.streaming = age < 2 * STREAM_WINDOW && self.bytes >= STREAM_BYTES;
        self.window_start = Some(now);
        self.bytes = 0;
    }

    fn add(&mut self, now: Instant, bytes: usize) {
        self.roll(now);
        self.bytes += bytes;
    }

    fn streaming(&mut self, now: Instant) -> bool {
        self.roll(now);
        self.streaming || self.bytes >= STREAM_BYTES
    }
}

/// One receive/transmit queue pair and its backend queue.
struct QueuePair {
    /// The loop serving the pair (and watching the backend while the pair is enabled).
    context: Arc<AioContext>,
    /// The driver's receive kick; signalled to have the loop serve the pair.
    rx_kick: Arc<EventFd>,
    /// The driver's transmit kick; signalled when a burst leaves frames in the ring.
    tx_kick: Arc<EventFd>,
    rx_index: u16,
    tx_index: u16,
    backend: Arc<dyn NetQueue>,
    mem: Arc<GuestMemoryMmap>,
    /// The receive path's writes into guest buffers are recorded here.
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    shared: Arc<Shared>,
    hdr_len: usize,
    /// The backend reads and writes the header itself.
    vnet_hdr: bool,
    mrg: bool,
    /// Buffer bytes a frame may need.
    rx_need: usize,
    tx_mode: TxMode,
    /// Fires a transmit kick that waits (registered on `context`).
    tx_timer: DeviceTimer,
    broken: AtomicBool,
    inner: Mutex<PairInner>,
}

/// Guest slices over `segs`, skipping the first `skip` bytes.
fn slices<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &[(GuestAddress, usize)],
    mut skip: usize,
    out: &mut Vec<VolatileSlice<'m>>,
) -> Result<(), RingError> {
    for &(addr, len) in segs {
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = addr
            .checked_add(skip as u64)
            .ok_or_else(|| RingError::Chain(format!("buffer at {:#x} wraps", addr.0)))?;
        for s in mem.get_slices(start, len - skip) {
            out.push(s.map_err(|e| RingError::Chain(format!("buffer at {:#x}: {e}", addr.0)))?);
        }
        skip = 0;
    }
    Ok(())
}

impl QueuePair {
    /// Attaches or detaches the backend queue and starts or stops watching it (a
    /// detached tap queue polls as an error, so it must leave the loop first).
    fn set_enabled(self: &Arc<Self>, enabled: bool) -> io::Result<()> {
        if enabled {
            self.backend.set_enabled(true)?;
            let p = Arc::clone(self);
            let mut inner = self.inner.lock();
            inner.enabled = true;
            if inner.backend_handler.is_none() {
                let id = self.context.add_fd_with(
                    self.backend.rx_fd(),
                    Interest::READ,
                    Box::new(move || p.serve()),
                )?;
                inner.backend_handler = Some((id, Arc::clone(&self.context)));
                inner.interest = Interest::READ;
            }
            drop(inner);
            // Frames (and the driver's buffers) may be waiting already: a kick has the
            // loop look, without waiting for it here (the caller may hold the
            // transport's lock, which a running handler may need).
            self.wake();
            Ok(())
        } else {
            self.inner.lock().enabled = false;
            self.unwatch_backend();
            self.backend.set_enabled(false)
        }
    }

    /// Has the loop serve the pair soon (through the receive queue's kick).
    fn wake(&self) {
        if let Err(e) = self.rx_kick.write(1) {
            log::warn!("virtio-net: cannot wake queue pair {}: {e}", self.rx_index / 2);
        }
    }

    /// Stops watching the backend; waits for a running handler (so not under `inner`).
    fn unwatch_backend(&self) {
        let handler = self.inner.lock().backend_handler.take();
        if let Some((id, ctx)) = handler {
            ctx.remove_fd(id);
        }
    }

    fn kicked(&self, which: Kick) {
        match which {
            Kick::Rx => self.inner.lock().rx_starved = false,
            Kick::Tx => {
                let mut inner = self.inner.lock();
                if inner.tx_waiting {
                    // Kicks are off while frames wait, so this one is the driver's own
                    // hurry (or ours after a full burst): go now, as QEMU's timer mode.
                    inner.tx_waiting = false;
                    self.disarm_tx_timer();
                } else if let Some(delay) = self.tx_delay(&mut inner) {
                    if !inner.enabled || self.broken.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(e) = inner.tx.disable_notification(&*self.mem) {
                        drop(inner);
                        return self.fail(e.into());
                    }
                    match self.tx_timer.arm(delay) {
                        Ok(()) => {
                            inner.tx_waiting = true;
                            return;
                        }
                        Err(e) => log::warn!("virtio-net: cannot arm the transmit timer: {e}"),
                    }
                }
            }
        }
        self.serve();
    }

    /// How long a transmit kick waits (`None`: not at all).
    fn tx_delay(&self, inner: &mut PairInner) -> Option<Duration> {
        match self.tx_mode {
            TxMode::Timer(delay) => Some(delay),
            TxMode::Bh => inner.stream_hold.hold(Instant::now()),
        }
    }

    fn disarm_tx_timer(&self) {
        if let Err(e) = self.tx_timer.disarm() {
            log::warn!("virtio-net: cannot disarm the transmit timer: {e}");
        }
    }

    /// QEMU's `virtio_net_tx_timer`: the waiting frames go out (and kicks come back on).
    fn tx_timer_expired(&self) {
        if !self.tx_timer.take_expired() {
            return;
        }
        {
            let mut inner = self.inner.lock();
            if !inner.tx_waiting {
                return;
            }
            inner.tx_waiting = false;
            inner.tx_hold_ran_out = self.tx_mode == TxMode::Bh;
        }
        self.serve();
    }

    /// Moves frames both ways as far as the rings, the backend and the link allow, then
    /// sets what the backend descriptor is watched for.
    fn serve(&self) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut inner = self.inner.lock();
        if !inner.enabled {
            return;
        }
        let result = if inner.tx_waiting {
            Ok(())
        } else {
            self.transmit(&mut inner)
        };
        let result = result.and_then(|()| self.receive(&mut inner));
        if let Err(e) = result {
            drop(inner);
            return self.fail(e);
        }
        let link_up = self.shared.link_up.load(Ordering::Acquire);
        // A backend whose sends block (a tap) is written through its receive descriptor.
        let tx_same_fd = self.backend.tx_fd() == Some(self.backend.rx_fd());
        let wanted = Interest {
            read: link_up && !inner.rx_starved,
            write: tx_same_fd && inner.tx_blocked.is_some(),
        };
        if wanted != inner.interest {
            if let Some((id, ctx)) = &inner.backend_handler {
                if let Err(e) = ctx.set_interest(*id, wanted) {
                    log::error!("virtio-net: cannot watch the backend: {e}");
                }
            }
            inner.interest = wanted;
        }
    }

    fn transmit(&self, inner: &mut PairInner) -> Result<(), RingError> {
        let mem = &*self.mem;
        let mut sent = 0usize;
        let mut look_for_data = std::mem::take(&mut inner.tx_hold_ran_out);
        if let Some(frame) = inner.tx_blocked.take() {
            match self.send(&frame) {
                Ok(()) => self.complete_tx(inner, frame.head)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    inner.tx_blocked = Some(frame);
                    return Ok(());
                }
                Err(e) => {
                    log::debug!("virtio-net: backend refused a frame: {e}");
                    self.complete_tx(inner, frame.head)?;
                }
            }
            sent += 1;
        }
        loop {
            inner.tx.disable_notification(mem)?;
            while sent < BURST {
                let Some(chain) = inner.tx.iter(Arc::clone(&self.mem))?.next() else {
                    break;
                };
                let head = chain.head_index();
                let mut segs = Vec::new();
                for desc in chain {
                    if desc.is_write_only() {
                        return Err(RingError::Chain(
                            "a transmit buffer is device-writable".into(),
                        ));
                    }
                    segs.push((desc.addr(), desc.len() as usize));
                }
                let total: usize = segs.iter().map(|s| s.1).sum();
                if total < self.hdr_len {
                    return Err(RingError::Chain(format!(
                        "virtio-net header incorrect: {total} bytes"
                    )));
                }
                if look_for_data && carries_data(mem, &segs, self.hdr_len) {
                    inner.stream_hold.held_back_data(Instant::now());
                    look_for_data = false;
                }
                let frame = TxFrame { head, segs };
                if !self.shared.link_up.load(Ordering::Acquire) {
                    // QEMU drops what a guest sends on a link that is down.
                    self.complete_tx(inner, head)?;
                    continue;
                }
                match self.send(&frame) {
                    Ok(()) => self.complete_tx(inner, head)?,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        inner.tx_blocked = Some(frame);
                        return Ok(());
                    }
                    Err(e) => {
                        GUEST_ERRORS.warn(|| format!("virtio-net: a frame was not sent: {e}"));
                        self.complete_tx(inner, head)?;
                    }
                }
                sent += 1;
            }
            if sent >= BURST {
                // More may wait: kick ourselves, so the loop serves its other handlers
                // first and then this queue again (the driver will not kick for frames
                // it already queued).
                if let Err(e) = self.tx_kick.write(1) {
                    log::warn!("virtio-net: cannot requeue transmit work: {e}");
                }
                return Ok(());
            }
            if !inner.tx.enable_notification(mem)? {
                return Ok(());
            }
        }
    }

    fn send(&self, frame: &TxFrame) -> io::Result<()> {
        let mut bufs = Vec::with_capacity(frame.segs.len() + 1);
        let skip = if self.vnet_hdr { 0 } else { self.hdr_len };
        slices(&self.mem, &frame.segs, skip, &mut bufs)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.backend.send(&bufs).map(|_| ())
    }

    fn complete_tx(&self, inner: &mut PairInner, head: u16) -> Result<(), RingError> {
        let mem = &*self.mem;
        inner.tx.add_used(mem, head, 0)?;
        if inner.tx.needs_notification(mem)? {
            self.transport.signal_used_queue(self.tx_index);
        }
        Ok(())
    }

    /// Takes receive buffers from the ring until a largest frame fits (one buffer
    /// without mergeable buffers). `false` when the ring has too few.
    fn refill(&self, inner: &mut PairInner) -> Result<bool, RingError> {
        let mem = &*self.mem;
        let enough = |inner: &PairInner| {
            if self.mrg {
                inner.pending_bytes >= self.rx_need
            } else {
                !inner.pending.is_empty()
            }
        };
        loop {
            inner.rx.disable_notification(mem)?;
            while !enough(inner) {
                let Some(chain) = inner.rx.iter(Arc::clone(&self.mem))?.next() else {
                    break;
                };
                let head = chain.head_index();
                let mut segs = Vec::new();
                let mut len = 0usize;
                for desc in chain {
                    if !desc.is_write_only() {
                        return Err(RingError::Chain(
                            "virtio-net receive queue contains no in buffers".into(),
                        ));
                    }
                    segs.push((desc.addr(), desc.len() as usize));
                    len += desc.len() as usize;
                }
                if len < self.hdr_len {
                    return Err(RingError::Chain(format!(
                        "virtio-net receive buffer of {len} bytes holds no header"
                    )));
                }
                inner.pending_bytes += len;
                inner.pending.push_back(RxBuf { head, segs, len });
            }
            if enough(inner) {
                return Ok(true);
            }
            if !inner.rx.enable_notification(mem)? {
                return Ok(false);
            }
        }
    }

    fn receive(&self, inner: &mut PairInner) -> Result<(), RingError> {
        if !self.shared.link_up.load(Ordering::Acquire) || inner.rx_starved {
            return Ok(());
        }
        let mem = &*self.mem;
        let mut delivered = 0usize;
        let mut stream_bytes = 0usize;
        let mut bufs = Vec::new();
        let mut room: Vec<(GuestAddress, usize)> = Vec::new();
        let skip = if self.vnet_hdr { 0 } else { self.hdr_len };
        for _ in 0..BURST {
            let room_for_any = self.refill(inner)?;
            if inner.pending.is_empty() {
                inner.rx_starved = true;
                break;
            }
            room.clear();
            if self.mrg {
                room.extend(inner.pending.iter().flat_map(|b| b.segs.iter().copied()));
            } else {
                room.extend_from_slice(&inner.pending[0].segs);
            }
            let n = if room_for_any && inner.held.is_none() {
                // Straight into the guest's buffers.
                bufs.clear();
                slices(mem, &room, skip, &mut bufs)?;
                match self.read_frame(&bufs) {
                    Some(n) => n,
                    None => break,
                }
            } else {
                // Mergeable buffers, fewer than a largest frame needs: as QEMU, read the
                // frame first and place it if it fits, so that the ring is used to its
                // end rather than left with room for most frames while the driver is
                // asked for more.
                match self.receive_low(inner, skip) {
                    LowRoom::Fits(n) => {
                        write_at(mem, &room, skip, &inner.bounce[..n])?;
                        n
                    }
                    LowRoom::Held => {
                        inner.rx_starved = true;
                        break;
                    }
                    LowRoom::NoFrame => break,
                }
            };
            let total = n + skip;
            // The frame (and the header `deliver` writes over its start) is in guest
            // memory now, even one the filter refuses.
            mark_segs(&self.dirty, &room, total);
            // The frame is in the guest's buffers; whether the guest gets it is the
            // filter's call (a refused frame leaves the buffers pending for the next).
            let mut head_bytes = [0u8; 16];
            let dest_len = read_at(mem, &room, self.hdr_len, &mut head_bytes);
            if !self.shared.accepts(&head_bytes[..dest_len]) {
                continue;
            }
            self.deliver(inner, total)?;
            delivered += 1;
            if total >= STREAM_FRAME_MIN {
                stream_bytes += total;
            }
        }
        if delivered > 0 {
            inner.stream_hold.received(Instant::now(), stream_bytes);
            if inner.rx_used.needs_notification(&inner.rx, mem)? {
                self.transport.signal_used_queue(self.rx_index);
            }
        }
        Ok(())
    }

    /// The backend's next frame into `bufs`: its length, or `None` if there is none (or
    /// the read failed, which is logged).
    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> Option<usize> {
        match self.backend.receive(bufs) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                GUEST_ERRORS.warn(|| format!("virtio-net: receive failed: {e}"));
                None
            }
        }
    }

    /// A frame for a ring with less room than a largest frame (mergeable buffers only):
    /// the held one or the backend's next, read into the bounce buffer, and whether it
    /// fits the buffers taken (if not, it is held until the driver adds more).
    fn receive_low(&self, inner: &mut PairInner, skip: usize) -> LowRoom {
        if !self.mrg {
            return LowRoom::Held;
        }
        let n = match inner.held.take() {
            Some(n) => n,
            None => {
                if inner.bounce.len() < self.rx_need {
                    inner.bounce.resize(self.rx_need, 0);
                }
                match self.read_frame(&[VolatileSlice::from(&mut inner.bounce[..])]) {
                    Some(n) => n,
                    None => return LowRoom::NoFrame,
                }
            }
        };
        if n + skip > inner.pending_bytes {
            inner.held = Some(n);
            return LowRoom::Held;
        }
        LowRoom::Fits(n)
    }

    /// Puts a received frame of `total` bytes (header included) in the used ring: the
    /// buffers it filled, with `num_buffers` (and for backends without a vnet header, the
    /// rest of the header) written.
    fn deliver(&self, inner: &mut PairInner, total: usize) -> Result<(), RingError> {
        let mem = &*self.mem;
        let mut left = total;
        // (head, bytes written) of each buffer the frame filled, and the first's segments.
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut first_segs = Vec::new();
        while left > 0 || used.is_empty() {
            let Some(buf) = inner.pending.pop_front() else {
                break;
            };
            inner.pending_bytes -= buf.len;
            let len = left.min(buf.len);
            left -= len;
            if used.is_empty() {
                first_segs = buf.segs;
            }
            used.push((buf.head, len as u32));
            if !self.mrg {
                break;
            }
        }
        if used.is_empty() {
            return Ok(());
        }
        let mut header = [0u8; HDR_LEN_MRG];
        let header_bytes = if self.vnet_hdr {
            // The backend wrote the first ten bytes; only `num_buffers` is ours.
            header[10..12].copy_from_slice(&(used.len() as u16).to_le_bytes());
            &header[10..self.hdr_len]
        } else {
            header[10..12].copy_from_slice(&(used.len() as u16).to_le_bytes());
            &header[..self.hdr_len]
        };
        let offset = if self.vnet_hdr { 10 } else { 0 };
        write_at(mem, &first_segs, offset, header_bytes)?;
        inner.rx_used.add(&mut inner.rx, mem, &used)?;
        Ok(())
    }

    fn fail(&self, e: RingError) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            let (rx, tx) = (self.rx_index, self.tx_index);
            GUEST_ERRORS.warn(|| format!("virtio-net: queues {rx}/{tx}: {e}: device needs reset"));
            self.transport.mark_broken();
            let inner = self.inner.lock();
            if let Some((id, ctx)) = &inner.backend_handler {
                let _ = ctx.set_interest(*id, Interest::NONE);
            }
        }
    }
}

/// Records that the first `len` bytes of `segs` were written, for a running migration.
fn mark_segs(dirty: &DirtyTracker, segs: &[(GuestAddress, usize)], mut len: usize) {
    if !dirty.is_active() {
        return;
    }
    for &(addr, seg_len) in segs {
        if len == 0 {
            break;
        }
        let n = seg_len.min(len);
        dirty.mark(addr.0, n as u64);
        len -= n;
    }
}

/// Reads up to `out.len()` bytes at offset `skip` of the segments; returns how many.
fn read_at(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, usize)],
    mut skip: usize,
    out: &mut [u8],
) -> usize {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == out.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        if mem
            .read_slice(&mut out[done..done + n], addr.unchecked_add(skip as u64))
            .is_err()
        {
            break;
        }
        done += n;
        skip = 0;
    }
    done
}

/// Whether a transmitted frame (vnet header of `hdr_len` first) is more than a TCP
/// segment without payload (an ACK); unreadable frames count as data.
fn carries_data(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], hdr_len: usize) -> bool {
    const TCP: u8 = 6;
    let mut head = [0u8; 14 + 4 + 60 + 60];
    let len = read_at(mem, segs, hdr_len, &mut head);
    let head = &head[..len];
    let be16 = |at: usize| head.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    let mut l3 = 14;
    let mut ethertype = be16(12);
    if ethertype == Some(0x8100) {
        l3 += 4;
        ethertype = be16(16);
    }
    // (IP header length, the IP packet's length, the protocol after the IP header)
    let ip = match ethertype {
        Some(0x0800) => head.get(l3).zip(be16(l3 + 2)).zip(head.get(l3 + 9)).map(
            |((&vihl, total), &proto)| (usize::from(vihl & 0xf) * 4, total, proto),
        ),
        Some(0x86dd) => be16(l3 + 4)
            .zip(head.get(l3 + 6))
            .map(|(payload, &next)| (40, 40 + payload, next)),
        _ => None,
    };
    let Some((ip_hdr, ip_len, TCP)) = ip else {
        return true;
    };
    match head.get(l3 + ip_hdr + 12) {
        Some(&doff) => ip_len != ip_hdr + usize::from(doff >> 4) * 4,
        None => true,
    }
}

/// Writes `data` at offset `skip` of the segments.
fn write_at(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, usize)],
    mut skip: usize,
    data: &[u8],
) -> Result<(), RingError> {
    let mut done = 0;
    for &(addr, len) in segs {
        if done == data.len() {
            break;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr.unchecked_add(skip as u64))
            .map_err(|e| RingError::Chain(format!("receive buffer: {e}")))?;
        done += n;
        skip = 0;
    }
    if done < data.len() {
        return Err(RingError::Chain("receive buffer shorter than the header".into()));
    }
    Ok(())
}

/// The control queue (QEMU's `virtio_net_handle_ctrl`).
struct CtrlQueue {
    index: u16,
    queue: Mutex<Queue>,
    mem: Arc<GuestMemoryMmap>,
    dirty: Arc<DirtyTracker>,
    transport: Arc<dyn VirtioTransport>,
    shared: Arc<Shared>,
    pairs: Vec<Arc<QueuePair>>,
    /// The backend queues of pairs the kernel serves (`vhost=on`).
    vhost_queues: Vec<Arc<dyn NetQueue>>,
    broken: AtomicBool,
}

impl CtrlQueue {
    fn serve(&self) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = self.serve_all() {
            if !self.broken.swap(true, Ordering::AcqRel) {
                let index = self.index;
                GUEST_ERRORS.warn(|| {
                    format!("virtio-net: control queue {index}: {e}: device needs reset")
                });
                self.transport.mark_broken();
            }
        }
    }

    fn serve_all(&self) -> Result<(), RingError> {
        let mem = &*self.mem;
        let mut queue = self.queue.lock();
        let mut served = false;
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.iter(Arc::clone(&self.mem))?.next() {
                let head = chain.head_index();
                let written = chain.clone();
                let mut reader = chain
                    .clone()
                    .reader(mem)
                    .map_err(|e| RingError::Chain(e.to_string()))?;
                let mut writer = chain
                    .writer(mem)
                    .map_err(|e| RingError::Chain(e.to_string()))?;
                if writer.available_bytes() < 1 || reader.available_bytes() < 2 {
                    return Err(RingError::Chain("virtio-net ctrl missing headers".into()));
                }
                let mut command = vec![0u8; reader.available_bytes().min(64 * 1024)];
                reader
                    .read_exact(&mut command)
                    .map_err(|e| RingError::Chain(e.to_string()))?;
                let ack = self.command(command[0], command[1], &command[2..]);
                // The ack is the last device-writable byte.
                let skip = writer.available_bytes() - 1;
                let mut sink = vec![0u8; skip];
                writer
                    .write_all(&sink)
                    .and_then(|()| writer.write_all(&[ack]))
                    .map_err(|e| RingError::Chain(e.to_string()))?;
                sink.clear();
                mark_chain_written(&self.dirty, &written);
                queue.add_used(mem, head, (skip + 1) as u32)?;
                served = true;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if served && queue.needs_notification(mem)? {
            self.transport.signal_used_queue(self.index);
        }
        Ok(())
    }

    fn command(&self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let ok = match class {
            ctrl::RX => self.rx_mode(cmd, data),
            ctrl::MAC => self.mac(cmd, data),
            ctrl::VLAN => self.vlan(cmd, data),
            ctrl::ANNOUNCE if cmd == ctrl::ANNOUNCE_ACK => {
                self.shared.status.fetch_and(!S_ANNOUNCE, Ordering::AcqRel);
                true
            }
            ctrl::MQ if cmd == ctrl::MQ_VQ_PAIRS_SET => self.set_queue_pairs(data),
            ctrl::GUEST_OFFLOADS if cmd == ctrl::GUEST_OFFLOADS_SET => {
                self.guest_offloads(data)
            }
            _ => false,
        };
        if ok {
            ctrl::OK
        } else {
            ctrl::ERR
        }
    }

    /// QEMU's `virtio_net_handle_mq`: the driver uses the first `n` pairs.
    fn set_queue_pairs(&self, data: &[u8]) -> bool {
        let Some(n) = data.get(..2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))) else {
            return false;
        };
        if n < 1 || n > self.pairs.len() + self.vhost_queues.len() {
            return false;
        }
        for (i, q) in self.vhost_queues.iter().enumerate() {
            if let Err(e) = q.set_enabled(i < n) {
                GUEST_ERRORS.warn(|| format!("virtio-net: queue pair {i}: {e}"));
                return false;
            }
        }
        if !self.vhost_queues.is_empty() {
            let pairs = n.min(self.vhost_queues.len()) as u16;
            self.shared.vhost_pairs.store(pairs, Ordering::Release);
        }
        for (i, pair) in self.pairs.iter().enumerate() {
            if let Err(e) = pair.set_enabled(i < n) {
                GUEST_ERRORS.warn(|| format!("virtio-net: queue pair {i}: {e}"));
                return false;
            }
        }
        true
    }

    fn rx_mode(&self, cmd: u8, data: &[u8]) -> bool {
        let Some(&on) = data.first() else {
            return false;
        };
        let on = on != 0;
        {
            let mut f = self.shared.filter.lock();
            let slot = match cmd {
                ctrl::RX_PROMISC => &mut f.promisc,
                ctrl::RX_ALLMULTI => &mut f.allmulti,
                ctrl::RX_ALLUNI => &mut f.alluni,
                ctrl::RX_NOMULTI => &mut f.nomulti,
                ctrl::RX_NOUNI => &mut f.nouni,
                ctrl::RX_NOBCAST => &mut f.nobcast,
                _ => return false,
            };
            *slot = on;
        }
        self.shared.filter_changed();
        true
    }

    fn mac(&self, cmd: u8, data: &[u8]) -> bool {
        match cmd {
            ctrl::MAC_ADDR_SET => {
                let Ok(mac) = <[u8; 6]>::try_from(data.get(..6).unwrap_or_default()) else {
                    return false;
                };
                *self.shared.mac.lock() = mac;
            }
            ctrl::MAC_TABLE_SET => {
                let Some((uni, rest)) = mac_list(data) else {
                    return false;
                };
                let Some((multi, rest)) = mac_list(rest) else {
                    return false;
                };
                if !rest.is_empty() {
                    return false;
                }
                let mut f = self.shared.filter.lock();
                f.uni_overflow = uni.len() > MAC_TABLE_ENTRIES;
                f.multi_overflow = multi.len() > MAC_TABLE_ENTRIES;
                f.uni = if f.uni_overflow { Vec::new() } else { uni };
                f.multi = if f.multi_overflow { Vec::new() } else { multi };
            }
            _ => return false,
        }
        self.shared.filter_changed();
        true
    }

    fn vlan(&self, cmd: u8, data: &[u8]) -> bool {
        let Some(vid) = data.get(..2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]]))) else {
            return false;
        };
        if vid >= MAX_VLAN {
            return false;
        }
        {
            let mut f = self.shared.filter.lock();
            match cmd {
                ctrl::VLAN_ADD => f.vlans[vid >> 5] |= 1 << (vid & 0x1f),
                ctrl::VLAN_DEL => f.vlans[vid >> 5] &= !(1 << (vid & 0x1f)),
                _ => return false,
            }
        }
        self.shared.filter_changed();
        true
    }

    fn guest_offloads(&self, data: &[u8]) -> bool {
        let Some(bytes) = data.get(..8) else {
            return false;
        };
        let wanted = u64::from_le_bytes(bytes.try_into().unwrap_or_default());
        let negotiated = *self.shared.features.lock();
        let allowed = bit(nf::GUEST_CSUM)
            | bit(nf::GUEST_TSO4)
            | bit(nf::GUEST_TSO6)
            | bit(nf::GUEST_ECN)
            | bit(nf::GUEST_UFO);
        if negotiated & bit(nf::CTRL_GUEST_OFFLOADS) == 0 || wanted & !(negotiated & allowed) != 0 {
            return false;
        }
        let applied = self.shared.netdev.set_offload(offloads(wanted)).is_ok();
        if applied {
            *self.shared.guest_offloads.lock() = Some(wanted);
        }
        applied
    }
}

/// A `virtio_net_ctrl_mac` list: a 32-bit count and that many addresses.
fn mac_list(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let bytes = count.checked_mul(6)?;
    let list = data.get(4..4 + bytes)?;
    let macs = list
        .chunks_exact(6)
        .map(|c| <[u8; 6]>::try_from(c).unwrap_or_default())
        .collect();
    Some((macs, &data[4 + bytes..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_stream_is_a_rate_that_lasts_and_ends_when_frames_stop() {
        let t0 = Instant::now();
        // In windows.
        let win = |n: u64| t0 + STREAM_WINDOW * n as u32;
        let mut rate = ReceiveRate::default();
        assert!(!rate.streaming(t0), "nothing received");
        // Request/response: a few frames per window never stream.
        for i in 0..20 {
            rate.add(win(i), STREAM_BYTES / 4);
            assert!(!rate.streaming(win(i)), "window {i}");
        }
        // A window's worth of bytes streams at once, and for the next window too.
        rate.add(win(20), STREAM_BYTES / 2);
        assert!(!rate.streaming(win(20)));
        rate.add(win(20), STREAM_BYTES / 2);
        assert!(rate.streaming(win(20)));
        assert!(rate.streaming(win(21)), "the last full window decides");
        // A quiet window after it ends the stream; so does a long gap.
        assert!(!rate.streaming(win(22)));
        rate.add(win(30), STREAM_BYTES);
        assert!(rate.streaming(win(30)));
        assert!(!rate.streaming(win(33)), "nothing for two windows");
    }

    #[test]
    fn transmit_kicks_are_held_in_a_stream_and_not_for_a_waiting_peer() {
        let t0 = Instant::now();
        let us = |n: u64| t0 + Duration::from_micros(n);
        let mut hold = StreamHold::default();
        hold.received(t0, 1500);
        assert_eq!(hold.hold(t0), None, "a small frame is no stream");
        hold.received(us(100), STREAM_BYTES);
        assert_eq!(hold.hold(us(200)), Some(STREAM_TX_DELAY), "held in a stream");
        // A hold ran out with data in it: the peer may wait for the guest.
        hold.held_back_data(us(700));
        hold.received(us(800), STREAM_BYTES);
        assert_eq!(hold.hold(us(900)), None, "backing off");
        let later = 700 + STREAM_BACKOFF.as_micros() as u64;
        hold.received(us(later), STREAM_BYTES);
        assert_eq!(hold.hold(us(later + 10)), Some(STREAM_TX_DELAY), "held again");
    }

    #[test]
    fn only_tcp_segments_without_payload_are_no_data() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let frame = |vlan: bool, l3: &[u8]| {
            let mut f = vec![0u8; 12 + 12];
            if vlan {
                f.extend_from_slice(&[0x81, 0, 0, 5]);
            }
            f.extend_from_slice(l3);
            mem.write_slice(&f, GuestAddress(0)).unwrap();
            carries_data(&mem, &[(GuestAddress(0), f.len())], 12)
        };
        let tcp = |payload: usize| {
            let mut t = vec![0u8; 20 + payload];
            t[12] = 5 << 4;
            t
        };
        let v4 = |proto: u8, l4: &[u8]| {
            let mut p = vec![0x08, 0x00, 0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto];
            p.extend_from_slice(&[0; 10]);
            let total = (20 + l4.len()) as u16;
            p[4..6].copy_from_slice(&total.to_be_bytes());
            p.extend_from_slice(l4);
            p
        };
        let v6 = |l4: &[u8]| {
            let mut p = vec![0x86, 0xdd, 0x60, 0, 0, 0];
            p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            p.extend_from_slice(&[6, 64]);
            p.extend_from_slice(&[0; 32]);
            p.extend_from_slice(l4);
            p
        };
        assert!(!frame(false, &v4(6, &tcp(0))), "IPv4 ACK");
        assert!(!frame(true, &v4(6, &tcp(0))), "tagged IPv4 ACK");
        assert!(!frame(false, &v6(&tcp(0))), "IPv6 ACK");
        assert!(frame(false, &v4(6, &tcp(1))), "IPv4 TCP with a byte");
        assert!(frame(false, &v6(&tcp(100))), "IPv6 TCP with payload");
        assert!(frame(false, &v4(17, &[0; 8])), "UDP");
        assert!(frame(false, &[0x08, 0x06, 0, 1]), "ARP");
        assert!(frame(false, &[0x08]), "truncated");
    }

    #[test]
    fn header_length_follows_the_features() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(bit(nf::MRG_RXBUF)), 12);
        assert_eq!(header_len(bit(feature::VERSION_1)), 12);
    }

    #[test]
    fn mac_lists_parse_and_refuse_short_data() {
        let mut data = 2u32.to_le_bytes().to_vec();
        data.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        data.extend_from_slice(&0u32.to_le_bytes());
        let (uni, rest) = mac_list(&data).unwrap();
        assert_eq!(uni, vec![[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]);
        let (multi, rest) = mac_list(rest).unwrap();
        assert!(multi.is_empty() && rest.is_empty());
        assert!(mac_list(&u32::MAX.to_le_bytes()).is_none());
        assert!(mac_list(&[1, 0]).is_none());
    }
}
