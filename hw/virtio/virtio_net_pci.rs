//! `virtio-net-pci` (QEMU's `hw/virtio/virtio-net-pci.c`): a virtio network card on the
//! virtio-pci transport, with QEMU's properties (`netdev`, `mac`, `mq`, the feature
//! switches, queue sizes). The seed's
//! `-device virtio-net-pci,netdev=hostnet0,id=net0,mac=fa:16:3e:d1:2d:99,bus=pci.0,addr=0x3`
//! is accepted as written.

use std::sync::Arc;
use std::time::Duration;

use qom::{type_init, Prop};

use crate::core::iothread::iothread_context;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::net::nic::{self, parse_mac};
use crate::net::vhost_net::vhost_features;
use crate::net::virtio_net::{net_feature as nf, TxMode, VirtioNet, VirtioNetConf, TX_TIMER_INTERVAL_NS};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::{bit, device_id, feature, VirtioDevice};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_NET_PCI`.
pub const TYPE_VIRTIO_NET_PCI: &str = "virtio-net-pci";

/// QEMU's `VIRTQUEUE_MAX_SIZE`.
const VIRTQUEUE_MAX_SIZE: u16 = 1024;
/// QEMU's `VIRTIO_NET_RX_QUEUE_MIN_SIZE` / `TX`.
const QUEUE_MIN_SIZE: u16 = 256;
/// QEMU's `VIRTIO_QUEUE_MAX / 2 - 1`: queue pairs one device can have.
const MAX_QUEUE_PAIRS: usize = 1024 / 2 - 1;

/// QEMU's `VirtIONetPCI` with the `virtio-net-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_NET_PCI)]
pub struct VirtioNetPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(desc = "ID of a netdev to use as a backend")]
    netdev: Prop<Option<String>>,
    #[property(desc = "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56")]
    mac: Prop<Option<String>>,
    #[property(default = false, desc = "Several queue pairs (as many as the backend's queues)")]
    mq: Prop<bool>,
    #[property(default = 256, desc = "Size of each receive queue")]
    rx_queue_size: Prop<u16>,
    #[property(default = 256, desc = "Size of each transmit queue")]
    tx_queue_size: Prop<u16>,
    #[property(default = 0, desc = "MTU the device advertises (0: none)")]
    host_mtu: Prop<u16>,
    #[property(default = true, desc = "Take frames with partial checksums")]
    csum: Prop<bool>,
    #[property(default = true, desc = "Hand the guest frames with partial checksums")]
    guest_csum: Prop<bool>,
    #[property(default = true, desc = "Segmentation offloads (both ways)")]
    gso: Prop<bool>,
    #[property(default = true, desc = "Guest takes TCPv4 segments")]
    guest_tso4: Prop<bool>,
    #[property(default = true, desc = "Guest takes TCPv6 segments")]
    guest_tso6: Prop<bool>,
    #[property(default = true, desc = "Guest takes TSO with ECN")]
    guest_ecn: Prop<bool>,
    #[property(default = false, desc = "Guest takes UFO fragments (off: hosts no longer do UFO)")]
    guest_ufo: Prop<bool>,
    #[property(default = true, desc = "Guest sends gratuitous packets when asked")]
    guest_announce: Prop<bool>,
    #[property(default = true, desc = "Device takes TCPv4 segments")]
    host_tso4: Prop<bool>,
    #[property(default = true, desc = "Device takes TCPv6 segments")]
    host_tso6: Prop<bool>,
    #[property(default = true, desc = "Device takes TSO with ECN")]
    host_ecn: Prop<bool>,
    #[property(default = false, desc = "Device takes UFO fragments")]
    host_ufo: Prop<bool>,
    #[property(default = true, desc = "Mergeable receive buffers")]
    mrg_rxbuf: Prop<bool>,
    #[property(default = true, desc = "Link status in the configuration")]
    status: Prop<bool>,
    #[property(default = true, desc = "Control queue")]
    ctrl_vq: Prop<bool>,
    #[property(default = true, desc = "Receive modes on the control queue")]
    ctrl_rx: Prop<bool>,
    #[property(default = true, desc = "VLAN filter on the control queue")]
    ctrl_vlan: Prop<bool>,
    #[property(default = true, desc = "Extra receive modes on the control queue")]
    ctrl_rx_extra: Prop<bool>,
    #[property(default = true, desc = "Set the MAC address on the control queue")]
    ctrl_mac_addr: Prop<bool>,
    #[property(default = true, desc = "Switch guest offloads on the control queue")]
    ctrl_guest_offloads: Prop<bool>,
    #[property(default = true, desc = "Indirect descriptors")]
    indirect_desc: Prop<bool>,
    #[property(default = true, desc = "Notification suppression by event index")]
    event_idx: Prop<bool>,
    #[property(desc = "ID of the iothread serving the queues (default: the main loop)")]
    iothread: Prop<Option<String>>,
    #[property(default = -1, desc = "Boot order of the card (firmware)")]
    bootindex: Prop<i32>,
    #[property(default = -1, desc = "Link speed in Mbit/s reported to the guest (-1: unknown)")]
    speed: Prop<i32>,
    #[property(desc = "Link duplex reported to the guest (half or full)")]
    duplex: Prop<Option<String>>,
    #[property(default = false, desc = "Failover primary/standby pairing")]
    failover: Prop<bool>,
    #[property(desc = "Transmit mechanism: bh (at once; held while frames stream in) or timer (x-txtimer after a kick)")]
    tx: Prop<Option<String>>,
    #[property(name = "x-txtimer", default = TX_TIMER_INTERVAL_NS, desc = "How long tx=timer holds a kick, in nanoseconds")]
    x_txtimer: Prop<u32>,
}

type_init!(VirtioNetPci);

/// Errors of `virtio-net-pci`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioNetError {
    /// `netdev=` names no backend.
    #[error("Property 'virtio-net-pci.netdev' can't find value '{0}'")]
    NetdevNotFound(String),
    /// `netdev=` has a NIC already.
    #[error("Property 'virtio-net-pci.netdev' can't take value '{0}', it's in use")]
    NetdevInUse(String),
    /// A MAC that does not parse.
    #[error("Property 'virtio-net-pci.mac' doesn't take value '{0}'")]
    Mac(String),
    /// A queue size out of range.
    #[error("Invalid {which}_queue_size (= {size}), must be a power of 2 between {QUEUE_MIN_SIZE} and {VIRTQUEUE_MAX_SIZE}.")]
    QueueSize {
        /// `rx` or `tx`.
        which: &'static str,
        /// Its value.
        size: u16,
    },
    /// Too many backend queues.
    #[error("Invalid number of queue pairs (= {0}). Must be a positive integer less than {MAX_QUEUE_PAIRS}.")]
    QueuePairs(usize),
    /// `iothread=` names no iothread.
    #[error("Property 'virtio-net-pci.iothread' can't find value '{0}'")]
    IothreadNotFound(String),
    /// The main loop could not start.
    #[error("cannot start the main event loop: {0}")]
    NoEventLoop(String),
    /// `duplex=` other than half/full.
    #[error("'duplex' must be 'half' or 'full'")]
    Duplex,
    /// `vhostforce` and a vhost-net worker that does not answer.
    #[error("vhost-net requested but could not be initialized: {0}")]
    Vhost(String),
    /// `tx=` other than bh/timer.
    #[error("Parameter 'tx' expects 'timer' or 'bh'")]
    Tx,
}

impl DeviceImpl for VirtioNetPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Network;
    const DESCRIPTION: Option<&'static str> = Some("Virtio network device (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }
}

impl PciDeviceImpl for VirtioNetPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio-net; a modern-only device presents 0x1041.
    const DEVICE_ID: u16 = 0x1000;
    /// Network controller, Ethernet (QEMU's `PCI_CLASS_NETWORK_ETHERNET`).
    const CLASS_ID: u16 = 0x0200;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::NET;
    const INTERRUPT_PIN: u8 = 1;
    /// iPXE's boot ROM for virtio-net, as QEMU's (Debian package ipxe-qemu).
    const ROMFILE: Option<&'static str> = Some("efi-virtio.rom");
}

impl VirtioPciImpl for VirtioNetPci {
    /// QEMU's `virtio_net_device_realize`: checks the properties, claims the backend.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let context = match self.iothread.get() {
            Some(id) => iothread_context(&id)
                .ok_or(VirtioNetError::IothreadNotFound(id))
                .map_err(RealizeError::device)?,
            None => services
                .try_main_context()
                .map_err(|e| RealizeError::device(VirtioNetError::NoEventLoop(e.to_string())))?,
        };
        let id = ctx.object().cast::<DeviceState>().and_then(DeviceState::id);
        let path = ctx.object().canonical_path().unwrap_or_default();
        let conf = self.conf(id, path, context).map_err(RealizeError::device)?;
        let device: Arc<dyn VirtioDevice> = VirtioNet::new(conf);
        Ok(device)
    }

    /// QEMU: two vectors per queue pair plus configuration and control with `mq=on`,
    /// otherwise 3 (the control queue shares).
    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32 {
        let queues = device.queue_max_sizes().len() as u32;
        if self.mq.get() {
            (queues & !1) + 2
        } else {
            3
        }
    }
}

impl VirtioNetPci {
    fn host_features(&self) -> u64 {
        let switches: [(&Prop<bool>, u32); 22] = [
            (&self.csum, nf::CSUM),
            (&self.guest_csum, nf::GUEST_CSUM),
            (&self.guest_tso4, nf::GUEST_TSO4),
            (&self.guest_tso6, nf::GUEST_TSO6),
            (&self.guest_ecn, nf::GUEST_ECN),
            (&self.guest_ufo, nf::GUEST_UFO),
            (&self.guest_announce, nf::GUEST_ANNOUNCE),
            (&self.host_tso4, nf::HOST_TSO4),
            (&self.host_tso6, nf::HOST_TSO6),
            (&self.host_ecn, nf::HOST_ECN),
            (&self.host_ufo, nf::HOST_UFO),
            (&self.mrg_rxbuf, nf::MRG_RXBUF),
            (&self.status, nf::STATUS),
            (&self.ctrl_vq, nf::CTRL_VQ),
            (&self.ctrl_rx, nf::CTRL_RX),
            (&self.ctrl_vlan, nf::CTRL_VLAN),
            (&self.ctrl_rx_extra, nf::CTRL_RX_EXTRA),
            (&self.ctrl_mac_addr, nf::CTRL_MAC_ADDR),
            (&self.ctrl_guest_offloads, nf::CTRL_GUEST_OFFLOADS),
            (&self.indirect_desc, feature::RING_INDIRECT_DESC),
            (&self.event_idx, feature::RING_EVENT_IDX),
            (&self.mq, nf::MQ),
        ];
        let mut features = switches
            .iter()
            .filter(|(p, _)| p.get())
            .fold(0u64, |f, (_, b)| f | bit(*b));
        if !self.gso.get() {
            // QEMU's `gso=off` turns every segmentation offload off.
            for b in [
                nf::GUEST_TSO4,
                nf::GUEST_TSO6,
                nf::GUEST_ECN,
                nf::GUEST_UFO,
                nf::HOST_TSO4,
                nf::HOST_TSO6,
                nf::HOST_ECN,
                nf::HOST_UFO,
            ] {
                features &= !bit(b);
            }
        }
        if !self.csum.get() {
            features &= !(bit(nf::HOST_TSO4) | bit(nf::HOST_TSO6) | bit(nf::HOST_ECN) | bit(nf::HOST_UFO));
        }
        if !self.guest_csum.get() {
            features &=
                !(bit(nf::GUEST_TSO4) | bit(nf::GUEST_TSO6) | bit(nf::GUEST_ECN) | bit(nf::GUEST_UFO));
        }
        features
    }

    fn conf(
        &self,
        id: Option<String>,
        path: String,
        context: Arc<crate::core::iothread::AioContext>,
    ) -> Result<VirtioNetConf, VirtioNetError> {
        for (which, size) in [("rx", self.rx_queue_size.get()), ("tx", self.tx_queue_size.get())] {
            if !(QUEUE_MIN_SIZE..=VIRTQUEUE_MAX_SIZE).contains(&size) || !size.is_power_of_two() {
                return Err(VirtioNetError::QueueSize { which, size });
            }
        }
        if let Some(d) = self.duplex.get() {
            if d != "half" && d != "full" {
                return Err(VirtioNetError::Duplex);
            }
        }
        let tx_mode = match self.tx.get().as_deref() {
            None | Some("bh") => TxMode::Bh,
            Some("timer") => TxMode::Timer(Duration::from_nanos(self.x_txtimer.get().into())),
            Some(_) => return Err(VirtioNetError::Tx),
        };
        let mac = match self.mac.get() {
            Some(text) => parse_mac(&text).ok_or(VirtioNetError::Mac(text))?,
            None => nic::default_mac(),
        };
        let name = id.unwrap_or_else(|| nic::default_name(TYPE_VIRTIO_NET_PCI));
        // QEMU realizes a NIC without a backend (it drops what the guest sends); qomvm
        // asks for one, as every real use has one.
        let netdev_id = self.netdev.get().ok_or_else(|| {
            VirtioNetError::NetdevNotFound(String::new())
        })?;
        if net::find_netdev(&netdev_id).is_none() {
            return Err(VirtioNetError::NetdevNotFound(netdev_id));
        }
        let netdev = net::attach(&netdev_id, &name)
            .map_err(|()| VirtioNetError::NetdevInUse(netdev_id.clone()))?;
        let backend_queues = netdev.queues().len();
        let queue_pairs = if self.mq.get() { backend_queues } else { 1 };
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            net::detach(&netdev_id);
            return Err(VirtioNetError::QueuePairs(queue_pairs));
        }
        let vhost_files = netdev.vhost_files();
        let vhost = match vhost_files.first() {
            None => None,
            Some(first) => match vhost_features(first) {
                Ok(f) => Some((vhost_files.clone(), f)),
                Err(e) if netdev.vhost_requested() => {
                    net::detach(&netdev_id);
                    return Err(VirtioNetError::Vhost(e.to_string()));
                }
                Err(e) => {
                    qom::error_report!("warning: vhost-net support is not available: {e}; falling back to userspace virtio");
                    None
                }
            },
        };
        Ok(VirtioNetConf {
            vhost,
            netdev,
            netdev_id,
            name,
            path: format!("{path}/virtio-backend"),
            mac,
            host_features: self.host_features(),
            queue_pairs: queue_pairs as u16,
            rx_queue_size: self.rx_queue_size.get(),
            tx_queue_size: self.tx_queue_size.get(),
            mtu: self.host_mtu.get(),
            context,
            tx_mode,
        })
    }
}
