//! vhost-net (QEMU's `hw/net/vhost_net.c`, with the kernel half of `hw/virtio/vhost.c`):
//! the host kernel's vhost-net worker moves a virtio-net queue pair's frames between the
//! guest's rings and a tap, with no exit to qomvm on the data path.
//!
//! The NIC hands a [`VhostNet`] the queue pair's vhost-net file (`Netdev::vhost_files`),
//! its tap file (`NetQueue::tap_file`), guest memory and the two rings (receive, then
//! transmit). The driver's notifications reach the worker directly: a ring's `kick`
//! (the ioeventfd the transport registered) is the vring kick. The worker's "used"
//! signals arrive on an eventfd of ours, which an [`AioContext`] handler turns into the
//! transport's interrupt (no irqfd yet).
//!
//! The tap, opened with `IFF_VNET_HDR`, carries the virtio-net header itself: the header
//! length the features imply (12 bytes with `VERSION_1` or `MRG_RXBUF`, else 10) is set
//! on the tap (`TUNSETVNETHDRSZ`) and vhost gets `VHOST_NET_F_VIRTIO_NET_HDR` cleared, as
//! QEMU's `vhost_net_ack_features` does; for a tap without the header, vhost adds and
//! strips it (the bit is set).
//!
//! Built on the rust-vmm `vhost` crate (`vhost-kern`), whose blanket `VhostBackend`
//! implementation serves any [`VhostKernBackend`]: ours wraps the file we are given
//! rather than opening `/dev/vhost-net`, so inherited `vhostfd=` descriptors work.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vhost::vhost_kern::vhost_binding::{
    vhost_vring_file, VHOST_GET_FEATURES, VHOST_NET_SET_BACKEND,
};
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::core::accel_ops::EventFd;
use crate::core::iothread::{AioContext, AioHandlerId};
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
}

fn vh<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, VhostNetError> {
    r.map_err(|source| VhostNetError::Vhost { op, source })
}

/// The vhost crate's kernel backend over a file we were handed.
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

/// One queue pair served by the kernel's vhost-net (QEMU's `struct vhost_net` of a
/// started device). Stopped by [`VhostNet::stop`] or on drop.
pub struct VhostNet {
    handle: Handle,
    queues: Vec<ActiveQueue>,
    /// The worker's used-buffer signals, one per ring; kept open while handlers run.
    calls: Vec<Arc<EventFd>>,
    handlers: Vec<AioHandlerId>,
    ctx: Arc<AioContext>,
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
    /// memory, programs both rings (`rx`, `tx` in `queues`) with their kicks and our call
    /// eventfds, then attaches the tap. On an error everything done is undone.
    pub fn start(
        vhost: Arc<File>,
        tap: &File,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<ActiveQueue>,
        features: u64,
        transport: Arc<dyn VirtioTransport>,
        ctx: Arc<AioContext>,
    ) -> Result<VhostNet, VhostNetError> {
        if queues.len() != 2 {
            return Err(VhostNetError::Rings(queues.len()));
        }
        let handle = Handle { file: vhost, mem };
        vh("vhost_set_owner", handle.set_owner())?;
        let mut this = VhostNet {
            handle,
            queues,
            calls: Vec::new(),
            handlers: Vec::new(),
            ctx,
            running: false,
        };
        // From here on, Drop undoes what was done (reset_owner releases it all).
        this.program(tap, features, &transport)?;
        this.running = true;
        Ok(this)
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
    /// (`GET_VRING_BASE`, so a later userspace or vhost start resumes there), removes
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
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};
    use virtio_queue::Queue;

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

    /// Counts the interrupts the worker's call signals turn into.
    #[derive(Default)]
    struct Counting {
        used: [AtomicU32; 2],
    }

    impl VirtioTransport for Counting {
        fn signal_used_queue(&self, queue: u16) {
            self.used[usize::from(queue)].fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config(&self) {}
        fn mark_broken(&self) {}
    }

    const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
    const SIZE: u16 = 16;

    /// A split ring at `base`: descriptors, then avail, then used (page aligned).
    fn ring(mem: &GuestMemoryMmap, index: u16, base: u64) -> ActiveQueue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(base)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(base + 0x1000))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(base + 0x2000))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(mem));
        ActiveQueue {
            index,
            queue: q,
            kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }

    /// Puts one buffer (descriptor `slot`) in the avail ring.
    fn post(mem: &GuestMemoryMmap, q: &ActiveQueue, slot: u16, addr: u64, len: u32, write: bool) {
        let d = GuestAddress(q.queue.desc_table() + 16 * u64::from(slot));
        mem.write_obj(addr.to_le(), d).unwrap();
        mem.write_obj(len.to_le(), d.unchecked_add(8)).unwrap();
        let flags: u16 = if write { 2 } else { 0 };
        mem.write_obj(flags.to_le(), d.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, d.unchecked_add(14)).unwrap();
        let avail = GuestAddress(q.queue.avail_ring());
        let idx: u16 = u16::from_le(mem.read_obj(avail.unchecked_add(2)).unwrap());
        mem.write_obj(
            slot.to_le(),
            avail.unchecked_add(4 + 2 * u64::from(idx % SIZE)),
        )
        .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(idx.wrapping_add(1).to_le(), avail.unchecked_add(2))
            .unwrap();
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &ActiveQueue) -> u16 {
        u16::from_le(
            mem.read_obj(GuestAddress(q.queue.used_ring()).unchecked_add(2))
                .unwrap(),
        )
    }

    /// Used element `n`: (descriptor id, length).
    fn used_elem(mem: &GuestMemoryMmap, q: &ActiveQueue, n: u16) -> (u32, u32) {
        let e = GuestAddress(q.queue.used_ring()).unchecked_add(4 + 8 * u64::from(n % SIZE));
        (
            u32::from_le(mem.read_obj(e).unwrap()),
            u32::from_le(mem.read_obj(e.unchecked_add(4)).unwrap()),
        )
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn sh(cmd: &[&str]) {
        let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A tap in a namespace of the test's own, a guest's two rings served by the
    /// kernel's vhost-net: a TX descriptor with a vnet header and a frame reaches an
    /// `AF_PACKET` socket on the tap; a frame sent there lands in a posted RX buffer.
    #[test]
    fn vhost_net_moves_frames_between_rings_and_a_tap() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: not root");
            return;
        }
        for dev in ["/dev/vhost-net", "/dev/net/tun"] {
            if !Path::new(dev).exists() {
                println!("SKIPPED: no {dev} (run it in scripts/nested-kvm.sh)");
                return;
            }
        }
        let ns = format!("qomvm-vhost-{}", std::process::id());
        sh(&["ip", "netns", "add", &ns]);
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let _del = Del(ns.clone());
        let path = format!("/var/run/netns/{ns}");
        std::thread::scope(|s| {
            s.spawn(|| in_namespace(&path))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
    }

    fn in_namespace(ns_path: &str) {
        let nsf = File::open(ns_path).unwrap();
        // SAFETY: setns on this thread only, with a namespace file we hold.
        assert_eq!(unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        // No IPv6 chatter in the RX buffers.
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        let tap = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap();
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: i16,
            pad: [u8; 22],
        }
        let mut r = IfReq {
            name: *b"qvh0\0\0\0\0\0\0\0\0\0\0\0\0",
            flags: 0x0002 | 0x1000 | IFF_VNET_HDR, // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
            pad: [0; 22],
        };
        // SAFETY: TUNSETIFF with a struct ifreq.
        assert_eq!(unsafe { libc::ioctl(tap.as_raw_fd(), 0x4004_54ca, &mut r) }, 0);
        sh(&["ip", "link", "set", "qvh0", "up"]);
        let sock = packet_socket("qvh0");

        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let rx = ring(&mem, 0, 0x1_0000);
        let tx = ring(&mem, 1, 0x2_0000);
        let rx_kick = Arc::clone(&rx.kick);
        let tx_kick = Arc::clone(&tx.kick);
        let transport = Arc::new(Counting::default());
        let ctx = AioContext::new("vhost-test").unwrap();
        let vhost = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open("/dev/vhost-net")
                .unwrap(),
        );
        let supported = vhost_features(&vhost).unwrap();
        let features = vhost_net_get_features(supported, bit(feature::VERSION_1));
        assert_ne!(features & bit(feature::VERSION_1), 0, "vhost-net has VERSION_1");
        let mut net = VhostNet::start(
            Arc::clone(&vhost),
            &tap,
            Arc::clone(&mem),
            vec![rx, tx],
            features,
            transport.clone(),
            Arc::clone(&ctx),
        )
        .unwrap();
        assert!(net.is_running());

        // TX: a 12-byte empty header, then the frame.
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&ETHERTYPE);
        frame.extend((0..100u8).map(|i| i ^ 0x5a));
        let mut wire = vec![0u8; 12];
        wire.extend_from_slice(&frame);
        mem.write_slice(&wire, GuestAddress(0x4_0000)).unwrap();
        let (rxq, txq) = (&net.queues()[0], &net.queues()[1]);
        post(&mem, txq, 0, 0x4_0000, wire.len() as u32, false);
        tx_kick.write(1).unwrap();
        assert_eq!(recv_ours(&sock), frame);
        wait_for("the TX buffer used", || used_idx(&mem, txq) == 1);
        wait_for("the TX interrupt", || transport.used[1].load(Ordering::SeqCst) > 0);

        // RX: buffers first, then a frame on the interface.
        for slot in 0..4u16 {
            post(&mem, rxq, slot, 0x5_0000 + 0x1000 * u64::from(slot), 2048, true);
        }
        rx_kick.write(1).unwrap();
        let mut inbound = frame.clone();
        inbound[11] = 2;
        send_frame(&sock, &inbound);
        wait_for("an RX buffer used", || used_idx(&mem, rxq) >= 1);
        let found = (0..used_idx(&mem, rxq)).any(|n| {
            let (id, len) = used_elem(&mem, rxq, n);
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(0x5_0000 + 0x1000 * u64::from(id)))
                .unwrap();
            len as usize == 12 + inbound.len() && got[12..] == inbound[..]
        });
        assert!(found, "the frame landed in an RX buffer, after a 12-byte header");
        wait_for("the RX interrupt", || transport.used[0].load(Ordering::SeqCst) > 0);

        let rx_used = used_idx(&mem, &net.queues()[0]);
        net.stop().unwrap();
        assert!(!net.is_running());
        assert_eq!(net.queues()[1].queue.next_avail(), 1);
        assert_eq!(net.queues()[1].queue.next_used(), 1);
        assert_eq!(net.queues()[0].queue.next_used(), rx_used);
        net.stop().unwrap();
        drop(net);
        // Ownership was given up: the same file starts again.
        let rx = ring(&mem, 0, 0x6_0000);
        let tx = ring(&mem, 1, 0x7_0000);
        let again = VhostNet::start(vhost, &tap, mem, vec![rx, tx], features, transport, ctx);
        assert!(again.is_ok(), "restart: {:?}", again.err());
    }

    fn packet_socket(ifname: &str) -> File {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by the File.
        let sock = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        sock
    }

    fn recv_ours(sock: &File) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE {
                return buf[..n as usize].to_vec();
            }
        }
        panic!("the transmitted frame never reached the tap");
    }

    fn send_frame(sock: &File, data: &[u8]) {
        // SAFETY: `data` is valid for reads of its length.
        let n = unsafe { libc::send(sock.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
        assert_eq!(n, data.len() as isize);
    }
}
