//! vhost-net (QEMU's `hw/net/vhost_net.c`, with the kernel half of `hw/virtio/vhost.c`):
//! the host kernel's vhost-net worker moves a virtio-net queue pair's frames between the
//! guest's rings and a tap, with no exit to qomvm on the data path.
//!
//! The NIC hands a [`VhostNet`] the queue pair's vhost-net file (`Netdev::vhost_files`),
//! its tap file (`NetQueue::tap_file`), guest memory and the two rings (receive, then
//! transmit). The driver's notifications reach the worker directly: a ring's `kick`
//! (the ioeventfd the transport registered) is the vring kick. The worker's "used"
//! signals go, like QEMU's with irqfd, straight to KVM: while the ring's MSI-X vector is
//! unmasked the worker writes the vector's irqfd eventfd (the transport hands it over,
//! `VirtioTransport::set_queue_irqfd_sink`); otherwise (masked, INTx, no irqfd) they arrive
//! on an eventfd of ours, which an [`AioContext`] handler turns into the transport's
//! interrupt (pending while masked).
//!
//! The tap, opened with `IFF_VNET_HDR`, carries the virtio-net header itself: the header
//! length the features imply (12 bytes with `VERSION_1` or `MRG_RXBUF`, else 10) is set
//! on the tap (`TUNSETVNETHDRSZ`) and vhost gets `VHOST_NET_F_VIRTIO_NET_HDR` cleared, as
//! QEMU's `vhost_net_ack_features` does; for a tap without the header, vhost adds and
//! strips it (the bit is set).
//!
//! During a migration's pre-copy the worker logs what it writes (QEMU's `vhost_log_*`,
//! `vhost_dev_set_log`): a bitmap of one bit per 4 KiB guest page (`VHOST_SET_LOG_BASE`),
//! `VHOST_F_LOG_ALL` acked, each ring's used ring logged (`VHOST_VRING_F_LOG`); the
//! migration reads and clears it at each dirty-page sync ([`DirtySource`]). At a stop
//! (the VM's, a migration's last) the rings' positions are read back
//! (`VHOST_GET_VRING_BASE`) and the log synced one last time; the next start, here or on
//! a destination, sets them (`VHOST_SET_VRING_BASE`).
//!
//! Built on the rust-vmm `vhost` crate (`vhost-kern`), whose blanket `VhostBackend`
//! implementation serves any [`VhostKernBackend`]: ours wraps the file we are given
//! rather than opening `/dev/vhost-net`, so inherited `vhostfd=` descriptors work.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use vhost::vhost_kern::vhost_binding::{
    vhost_vring_file, VHOST_F_LOG_ALL, VHOST_GET_FEATURES, VHOST_NET_SET_BACKEND,
    VHOST_VRING_F_LOG,
};
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::core::accel_ops::EventFd;
use crate::core::dirty_log::{DirtySource, DirtySourceError, DirtyTracker, PAGE_SIZE};
use crate::core::iothread::{AioContext, AioHandlerId};
use crate::core::log_limit::RateLimitedLog;
use crate::virtio::virtio::{bit, feature, ActiveQueue, VirtioTransport};

/// `VHOST_NET_F_VIRTIO_NET_HDR`: vhost adds and strips the virtio-net header itself.
pub const VHOST_NET_F_VIRTIO_NET_HDR: u32 = 27;
/// `VIRTIO_NET_F_MTU`.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// `VIRTIO_F_ACCESS_PLATFORM` (QEMU's `VIRTIO_F_IOMMU_PLATFORM`).
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// `VIRTIO_F_RING_PACKED`.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// `VIRTIO_F_RING_RESET`.
pub const VIRTIO_F_RING_RESET: u32 = 40;
/// `VIRTIO_NET_F_HASH_REPORT`.
pub const VIRTIO_NET_F_HASH_REPORT: u32 = 57;

/// QEMU's `kernel_feature_bits`: the features the vhost-net kernel worker implements (or
/// not). A NIC offers one of these only when the worker has it; every other feature
/// (checksum and segmentation offloads, control queue, MAC) is the tap's or the NIC's.
pub const KERNEL_FEATURE_BITS: [u32; 10] = [
    feature::NOTIFY_ON_EMPTY,
    feature::RING_INDIRECT_DESC,
    feature::RING_EVENT_IDX,
    VIRTIO_NET_F_MRG_RXBUF,
    feature::VERSION_1,
    VIRTIO_NET_F_MTU,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET,
    VIRTIO_NET_F_HASH_REPORT,
];

/// The mask of [`KERNEL_FEATURE_BITS`].
pub fn kernel_feature_mask() -> u64 {
    KERNEL_FEATURE_BITS.iter().fold(0, |m, &b| m | bit(b))
}

/// The tap's ioctls (<linux/if_tun.h>).
mod tun {
    #![allow(missing_docs)]
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};
    ioctl_ior_nr!(TUNGETIFF, b'T' as u32, 210, libc::c_uint);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);
}
use tun::{TUNGETIFF, TUNSETVNETHDRSZ};
const IFF_VNET_HDR: i16 = 0x4000;

/// `VHOST_GET_FEATURES`: what the vhost-net worker behind `file` supports (needs no
/// ownership, so a NIC may ask before it starts).
pub fn vhost_features(file: &File) -> io::Result<u64> {
    let mut features = 0u64;
    // SAFETY: VHOST_GET_FEATURES writes one u64, which `features` is.
    if unsafe { ioctl_with_mut_ref(file, VHOST_GET_FEATURES(), &mut features) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(features)
}

/// QEMU's `vhost_net_get_features`: `features` less the [`KERNEL_FEATURE_BITS`] the
/// worker (`vhost_features`, from [`vhost_features`]) lacks.
pub fn vhost_net_get_features(vhost_features: u64, features: u64) -> u64 {
    features & !(kernel_feature_mask() & !vhost_features)
}

/// The virtio-net header length the features imply (`virtio_net_hdr_mrg_rxbuf` with
/// virtio 1.x or mergeable buffers, else `virtio_net_hdr`).
pub fn vnet_hdr_len(features: u64) -> usize {
    if features & (bit(feature::VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        12
    } else {
        10
    }
}

/// A vhost failure, in QEMU's words where it has them.
#[derive(Debug, thiserror::Error)]
pub enum VhostNetError {
    /// A vhost request failed (QEMU: "vhost_set_owner failed: ...").
    #[error("{op} failed: {source}")]
    Vhost {
        /// QEMU's name of the request (`vhost_set_owner`, `vhost_set_vring_addr`...).
        op: &'static str,
        /// Why.
        source: vhost::Error,
    },
    /// A host call around vhost failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Not a queue pair: receive and transmit rings are needed, in that order.
    #[error("vhost-net serves one queue pair (2 rings), not {0}")]
    Rings(usize),
    /// A migration tracks dirty pages and the worker cannot log its writes.
    #[error("{0}")]
    Log(String),
}

fn vh<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, VhostNetError> {
    r.map_err(|source| VhostNetError::Vhost { op, source })
}

/// The vhost crate's kernel backend over a file we were handed.
#[derive(Clone)]
struct Handle {
    file: Arc<File>,
    mem: Arc<GuestMemoryMmap>,
}

impl AsRawFd for Handle {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl VhostKernBackend for Handle {
    type AS = Arc<GuestMemoryMmap>;

    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

impl Handle {
    /// `VHOST_NET_SET_BACKEND`: the tap this ring moves frames through (`None` detaches).
    fn set_backend(&self, index: usize, tap: Option<RawFd>) -> vhost::Result<()> {
        let vring_file = vhost_vring_file {
            index: index as u32,
            fd: tap.unwrap_or(-1),
        };
        // SAFETY: VHOST_NET_SET_BACKEND reads one vhost_vring_file, which `vring_file` is.
        let ret = unsafe { ioctl_with_ref(self, VHOST_NET_SET_BACKEND(), &vring_file) };
        if ret < 0 {
            return Err(vhost::Error::IoctlError(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Guest pages covered by one word of the log (QEMU's `VHOST_LOG_CHUNK` in pages).
const PAGES_PER_LOG_WORD: u64 = 64;

/// The worker's dirty log (QEMU's `struct vhost_log` and `vhost_dev_set_log`): a
/// [`DirtySource`] of the machine's tracker while the worker runs.
pub struct VhostLog {
    handle: Handle,
    dirty: Arc<DirtyTracker>,
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    /// The worker is programmed (between `start` and `stop`): the ioctls make sense.
    running: bool,
    /// The features acked at start, without `VHOST_F_LOG_ALL`.
    acked: u64,
    /// Each ring's addresses as programmed, without the log flag.
    rings: Vec<VringConfigData>,
    /// The bitmap the kernel writes (a bit per page from guest address 0), while logging.
    log: Option<Box<[AtomicU64]>>,
    /// Earlier bitmaps: the kernel may hold their address until its next `SET_LOG_BASE`
    /// or `RESET_OWNER`, so they live as long as the worker's file could use them.
    retired: Vec<Box<[AtomicU64]>>,
}

impl std::fmt::Debug for VhostLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("VhostLog")
            .field("running", &inner.running)
            .field("logging", &inner.log.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostLog {
    /// Whether the worker logs its writes now.
    pub fn is_logging(&self) -> bool {
        self.inner.lock().log.is_some()
    }

    /// The words the log needs: up to the end of guest RAM (QEMU's
    /// `vhost_get_log_size`; used rings lie in RAM).
    fn words(&self) -> usize {
        let end = self
            .handle
            .mem
            .iter()
            .map(|r| r.start_addr().raw_value() + r.len())
            .max()
            .unwrap_or(0);
        end.div_ceil(PAGE_SIZE * PAGES_PER_LOG_WORD) as usize
    }

    /// Turns logging on or off (QEMU's `vhost_dev_set_log`): the features with or without
    /// `VHOST_F_LOG_ALL`, then each ring's addresses with or without `VHOST_VRING_F_LOG`
    /// (the used ring's guest address as where its writes are logged).
    fn set_logging(&self, inner: &LogInner, on: bool) -> Result<(), VhostNetError> {
        let h = &self.handle;
        let features = if on {
            inner.acked | bit(VHOST_F_LOG_ALL)
        } else {
            inner.acked
        };
        vh("vhost_set_features", h.set_features(features))?;
        for (i, ring) in inner.rings.iter().enumerate() {
            let mut config = *ring;
            if on {
                config.flags |= 1 << VHOST_VRING_F_LOG;
                config.log_addr = Some(ring.used_ring_addr);
            }
            vh("vhost_set_vring_addr", h.set_vring_addr(i, &config))?;
        }
        Ok(())
    }

    /// Reads and clears every word, reporting each set bit's page.
    fn drain(log: &[AtomicU64], mark: &mut dyn FnMut(u64)) {
        for (i, word) in log.iter().enumerate() {
            // The kernel sets bits atomically: a swap loses none.
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                mark((i as u64 * PAGES_PER_LOG_WORD + b) * PAGE_SIZE);
                bits &= bits - 1;
            }
        }
    }

    /// The worker stops: the log's last bits go to the tracker, logging ends.
    fn worker_stopped(&self) {
        let mut inner = self.inner.lock();
        if let Some(log) = inner.log.take() {
            Self::drain(&log, &mut |page| self.dirty.mark(page, PAGE_SIZE));
            inner.retired.push(log);
        }
        inner.running = false;
    }
}

impl DirtySource for VhostLog {
    fn start(&self) -> Result<(), DirtySourceError> {
        let mut inner = self.inner.lock();
        if !inner.running || inner.log.is_some() {
            return Ok(());
        }
        let log: Box<[AtomicU64]> = (0..self.words()).map(|_| AtomicU64::new(0)).collect();
        let fail = |e: VhostNetError| DirtySourceError(format!("vhost-net: {e}"));
        vh(
            "vhost_set_log_base",
            self.handle.set_log_base(log.as_ptr() as u64, None),
        )
        .map_err(fail)?;
        if let Err(e) = self.set_logging(&inner, true) {
            let _ = self.set_logging(&inner, false);
            inner.retired.push(log);
            return Err(fail(e));
        }
        inner.log = Some(log);
        Ok(())
    }

    fn sync(&self, mark: &mut dyn FnMut(u64)) {
        let inner = self.inner.lock();
        if let Some(log) = &inner.log {
            Self::drain(log, mark);
        }
    }

    fn stop(&self) {
        let mut inner = self.inner.lock();
        let Some(log) = inner.log.take() else {
            return;
        };
        if inner.running {
            if let Err(e) = self.set_logging(&inner, false) {
                log::error!("vhost-net: stopping the dirty log: {e}");
            }
        }
        inner.retired.push(log);
    }
}

/// One queue pair served by the kernel's vhost-net (QEMU's `struct vhost_net` of a
/// started device). Stopped by [`VhostNet::stop`] or on drop.
pub struct VhostNet {
    handle: Handle,
    log: Arc<VhostLog>,
    queues: Vec<ActiveQueue>,
    /// The worker's used-buffer signals, one per ring; kept open while handlers run.
    calls: Vec<Arc<EventFd>>,
    handlers: Vec<AioHandlerId>,
    ctx: Arc<AioContext>,
    /// The transport, while it may call our rings' irqfd sinks.
    transport: Option<Arc<dyn VirtioTransport>>,
    running: bool,
}

impl std::fmt::Debug for VhostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNet")
            .field("vhost_fd", &self.handle.file.as_raw_fd())
            .field("rings", &self.queues.len())
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl VhostNet {
    /// QEMU's `vhost_net_init` + `vhost_net_start_one`: takes ownership of the worker
    /// (`SET_OWNER`), acks `features` (masked to the worker's kernel bits, with
    /// `VHOST_NET_F_VIRTIO_NET_HDR` only when the tap lacks the header), maps guest
    /// memory, programs both rings (`rx`, `tx` in `queues`, each from its `next_avail`)
    /// with their kicks and our call eventfds, then attaches the tap. Its dirty log joins
    /// `dirty`'s sources, logging at once if a migration tracks now. On an error
    /// everything done is undone.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        vhost: Arc<File>,
        tap: &File,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<ActiveQueue>,
        features: u64,
        transport: Arc<dyn VirtioTransport>,
        ctx: Arc<AioContext>,
        dirty: Arc<DirtyTracker>,
    ) -> Result<VhostNet, VhostNetError> {
        if queues.len() != 2 {
            return Err(VhostNetError::Rings(queues.len()));
        }
        let handle = Handle { file: vhost, mem };
        vh("vhost_set_owner", handle.set_owner())?;
        let log = Arc::new(VhostLog {
            handle: handle.clone(),
            dirty: Arc::clone(&dirty),
            inner: Mutex::new(LogInner::default()),
        });
        let mut this = VhostNet {
            handle,
            log,
            queues,
            calls: Vec::new(),
            handlers: Vec::new(),
            ctx,
            transport: None,
            running: false,
        };
        // From here on, Drop undoes what was done (reset_owner releases it all).
        this.program(tap, features, &transport)?;
        this.running = true;
        this.log.inner.lock().running = true;
        let source: Weak<dyn DirtySource> = Arc::downgrade(&this.log) as Weak<dyn DirtySource>;
        dirty
            .add_source(source)
            .map_err(|e| VhostNetError::Log(e.to_string()))?;
        Ok(this)
    }

    /// The worker's dirty log.
    pub fn log(&self) -> &Arc<VhostLog> {
        &self.log
    }

    fn program(
        &mut self,
        tap: &File,
        features: u64,
        transport: &Arc<dyn VirtioTransport>,
    ) -> Result<(), VhostNetError> {
        let h = &self.handle;
        let supported = vh("vhost_get_features", h.get_features())?;
        let tap_has_hdr = tap_has_vnet_hdr(tap).map_err(|source| VhostNetError::Io {
            what: "TUNGETIFF on the tap",
            source,
        })?;
        let mut acked = features & kernel_feature_mask() & supported;
        if tap_has_hdr {
            set_tap_vnet_hdr_len(tap, vnet_hdr_len(features)).map_err(|source| {
                VhostNetError::Io {
                    what: "TUNSETVNETHDRSZ",
                    source,
                }
            })?;
        } else {
            acked |= bit(VHOST_NET_F_VIRTIO_NET_HDR) & supported;
        }
        vh("vhost_set_features", h.set_features(acked))?;
        self.log.inner.lock().acked = acked;

        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .handle
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        vh("vhost_set_mem_table", h.set_mem_table(&regions))?;

        for (i, aq) in self.queues.iter().enumerate() {
            let q = &aq.queue;
            vh("vhost_set_vring_num", h.set_vring_num(i, q.size()))?;
            vh("vhost_set_vring_base", h.set_vring_base(i, q.next_avail()))?;
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            vh("vhost_set_vring_addr", h.set_vring_addr(i, &config))?;
            self.log.inner.lock().rings.push(config);
            vh("vhost_set_vring_kick", h.set_vring_kick(i, &aq.kick))?;
            let call = Arc::new(
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                    VhostNetError::Io {
                        what: "eventfd",
                        source,
                    }
                })?,
            );
            vh("vhost_set_vring_call", h.set_vring_call(i, &call))?;
            let fd = call.as_raw_fd();
            let signal = Arc::clone(&call);
            let transport = Arc::clone(transport);
            let index = aq.index;
            let id = self
                .ctx
                .add_fd(
                    fd,
                    Box::new(move || {
                        if signal.read().is_ok() {
                            transport.signal_used_queue(index);
                        }
                    }),
                )
                .map_err(|source| VhostNetError::Io {
                    what: "registering the vhost call eventfd",
                    source,
                })?;
            self.calls.push(call);
            self.handlers.push(id);
        }
        // From now on the transport may move each ring's signals to its vector's irqfd
        // and back (QEMU's vhost_virtqueue_mask).
        self.transport = Some(Arc::clone(transport));
        // The guest drives these switches (each MSI-X mask and unmask): a failing ioctl
        // is logged at most a few times a second.
        let errors = Arc::new(RateLimitedLog::default());
        for (i, (aq, own)) in self.queues.iter().zip(&self.calls).enumerate() {
            let (ring, own, errors) = (self.handle.clone(), Arc::clone(own), Arc::clone(&errors));
            transport.set_queue_irqfd_sink(
                aq.index,
                Some(Arc::new(move |irqfd: Option<&Arc<EventFd>>| {
                    if let Err(e) = ring.set_vring_call(i, irqfd.unwrap_or(&own)) {
                        errors.warn(|| format!("vhost-net: ring {i}: VHOST_SET_VRING_CALL: {e}"));
                    }
                })),
            );
        }
        for i in 0..self.queues.len() {
            vh("vhost_net_set_backend", h.set_backend(i, Some(tap.as_raw_fd())))?;
        }
        Ok(())
    }

    /// The rings, with their positions as of the last [`VhostNet::stop`].
    pub fn queues(&self) -> &[ActiveQueue] {
        &self.queues
    }

    /// Whether the worker is serving the rings.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// QEMU's `vhost_net_stop_one`: detaches the tap, reads each ring's position back
    /// (`GET_VRING_BASE`, so a later userspace or vhost start resumes there), hands the
    /// dirty log's last bits to the tracker (QEMU's `vhost_log_put` with sync), removes
    /// the call handlers and gives up ownership (`RESET_OWNER`), so the same vhost file
    /// can be started again. Idempotent.
    pub fn stop(&mut self) -> Result<(), VhostNetError> {
        if !self.running && self.handlers.is_empty() {
            return Ok(());
        }
        let mut first_err = None;
        let mut note = |r: Result<(), VhostNetError>| {
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        };
        // No more switches of the rings' call eventfds (this waits for one in progress).
        if let Some(transport) = self.transport.take() {
            for aq in &self.queues {
                transport.set_queue_irqfd_sink(aq.index, None);
            }
        }
        let h = &self.handle;
        for i in 0..self.queues.len() {
            note(vh("vhost_net_set_backend", h.set_backend(i, None)));
        }
        if self.running {
            for (i, aq) in self.queues.iter_mut().enumerate() {
                match vh("vhost_get_vring_base", h.get_vring_base(i)) {
                    Ok(base) => {
                        aq.queue.set_next_avail(base as u16);
                        let used = GuestAddress(aq.queue.used_ring()).checked_add(2);
                        if let Some(idx) = used.and_then(|a| h.mem.read_obj::<u16>(a).ok()) {
                            aq.queue.set_next_used(u16::from_le(idx));
                        }
                    }
                    Err(e) => note(Err(e)),
                }
            }
        }
        // The worker no longer writes: what it logged is complete.
        self.log.worker_stopped();
        for id in self.handlers.drain(..) {
            self.ctx.remove_fd(id);
        }
        self.calls.clear();
        note(vh("vhost_reset_owner", h.reset_owner()));
        self.running = false;
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for VhostNet {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("vhost-net: stopping: {e}");
        }
    }
}

/// Whether the tap frames carry the virtio-net header (`IFF_VNET_HDR`, from `TUNGETIFF`).
fn tap_has_vnet_hdr(tap: &File) -> io::Result<bool> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: i16,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes a struct ifreq, which `req` is laid out as.
    if unsafe { ioctl_with_mut_ref(tap, TUNGETIFF(), &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.flags & IFF_VNET_HDR != 0)
}

/// `TUNSETVNETHDRSZ` on the tap.
fn set_tap_vnet_hdr_len(tap: &File, len: usize) -> io::Result<()> {
    let len = len as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `len` is.
    if unsafe { ioctl_with_ref(tap, TUNSETVNETHDRSZ(), &len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_masked_as_qemu_does() {
        let offered = bit(feature::VERSION_1)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(feature::RING_EVENT_IDX)
            | bit(VIRTIO_F_RING_PACKED)
            | 1; // VIRTIO_NET_F_CSUM: the tap's, never masked
        let worker = bit(feature::VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF);
        assert_eq!(
            vhost_net_get_features(worker, offered),
            bit(feature::VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | 1
        );
        assert_eq!(vnet_hdr_len(bit(feature::VERSION_1)), 12);
        assert_eq!(vnet_hdr_len(bit(VIRTIO_NET_F_MRG_RXBUF)), 12);
        assert_eq!(vnet_hdr_len(0), 10);
    }
}
