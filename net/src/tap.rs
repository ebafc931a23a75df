//! `-netdev tap` (QEMU's `net/tap.c`, `net/tap-linux.c`): a Linux tap interface, opened
//! from `/dev/net/tun` by name (`ifname=`, with the `script=`/`downscript=` hooks) or
//! inherited from the caller (`fd=`, `fds=`, as libvirt and OpenStack pass them), and
//! optionally served by the kernel's vhost-net (`vhost=on`, `vhostfd=`, `vhostfds=`).
//!
//! Each queue pair is one tap file ([`TapQueue`]); a multiqueue tap (`queues=N`, `fds=`)
//! has one per pair, all attached to the same interface (`IFF_MULTI_QUEUE`). Frames move
//! with one `readv`/`writev` straight between the tap and guest memory.
//!
//! The virtio-net header: a tap opened with `IFF_VNET_HDR` leads every frame with one
//! (10 bytes, or 12 after `TUNSETVNETHDRSZ`), which carries the checksum and segmentation
//! offloads. A NIC that speaks the header ([`Netdev::set_vnet_hdr_len`] with 10 or 12)
//! gets it as is; for one that does not (`0`), the tap strips it from received frames and
//! prepends an empty one to sent frames, as QEMU's `tap_send`/`tap_receive_raw` do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use crate::{
    iovecs, parse_bool, strerror, NetError, NetQueue, Netdev, NetdevInfo, NetdevKind, Offloads,
};

/// The tun/tap clone device.
pub const PATH_NET_TUN: &str = "/dev/net/tun";
/// The kernel's vhost-net device.
pub const PATH_VHOST_NET: &str = "/dev/vhost-net";
/// QEMU's `DEFAULT_NETWORK_SCRIPT`: run with the interface name after the tap is opened.
pub const DEFAULT_NETWORK_SCRIPT: &str = "/etc/qemu-ifup";
/// QEMU's `DEFAULT_NETWORK_DOWN_SCRIPT`: run with the interface name at cleanup.
pub const DEFAULT_NETWORK_DOWN_SCRIPT: &str = "/etc/qemu-ifdown";
/// QEMU's `MAX_TAP_QUEUES`: `fds=` and `vhostfds=` take at most this many descriptors.
pub const MAX_TAP_QUEUES: usize = 1024;

/// `sizeof(struct virtio_net_hdr)`: the header length a tap starts with.
pub const VIRTIO_NET_HDR_LEN: usize = 10;
/// `sizeof(struct virtio_net_hdr_mrg_rxbuf)`: the header of virtio 1.x and `MRG_RXBUF`.
pub const VIRTIO_NET_HDR_MRG_RXBUF_LEN: usize = 12;
/// `sizeof(struct virtio_net_hdr_v1_hash)`: with `VIRTIO_NET_F_HASH_REPORT`.
pub const VIRTIO_NET_HDR_V1_HASH_LEN: usize = 20;

/// The largest frame a tap hands over, without the vnet header: a 64 KiB GSO packet (an
/// IP total length fits 16 bits; the tap's default `gso_max_size` is 65536) behind an
/// Ethernet header with one VLAN tag (14 + 4). QEMU reads into `NET_BUFSIZE` (4096 +
/// 65536) for the same packet, with slack.
pub const TAP_MAX_FRAME: usize = 65536 + 18;

// <linux/if_tun.h>
ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
ioctl_ior_nr!(TUNGETFEATURES, b'T' as u32, 207, libc::c_uint);
ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
ioctl_ior_nr!(TUNGETIFF, b'T' as u32, 210, libc::c_uint);
ioctl_iow_nr!(TUNSETSNDBUF, b'T' as u32, 212, libc::c_int);
ioctl_ior_nr!(TUNGETVNETHDRSZ, b'T' as u32, 215, libc::c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);
// <linux/vhost.h>
ioctl_ior_nr!(VHOST_GET_FEATURES, 0xaf, 0x00, u64);

/// `ifr_flags` of a tun device.
pub mod flags {
    /// A layer-3 tun device.
    pub const IFF_TUN: i16 = 0x0001;
    /// A layer-2 tap device.
    pub const IFF_TAP: i16 = 0x0002;
    /// One of several queues of the interface.
    pub const IFF_MULTI_QUEUE: i16 = 0x0100;
    /// No packet information before frames.
    pub const IFF_NO_PI: i16 = 0x1000;
    /// Obsolete single-queue flag (kept for old kernels, as QEMU sets it).
    pub const IFF_ONE_QUEUE: i16 = 0x2000;
    /// Frames carry a virtio-net header.
    pub const IFF_VNET_HDR: i16 = 0x4000;
    /// `TUNSETQUEUE`: attach the queue.
    pub const IFF_ATTACH_QUEUE: i16 = 0x0200;
    /// `TUNSETQUEUE`: detach the queue.
    pub const IFF_DETACH_QUEUE: i16 = 0x0400;
}

/// `TUNSETOFFLOAD` bits.
pub mod offload {
    /// The peer handles partial checksums.
    pub const TUN_F_CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TUN_F_TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TUN_F_TSO6: u32 = 0x04;
    /// TSO with ECN bits.
    pub const TUN_F_TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload.
    pub const TUN_F_UFO: u32 = 0x10;
}

use flags::*;
use offload::*;

/// `struct ifreq` with the flags member (40 bytes on 64-bit Linux).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // pstrcpy into IFNAMSIZ: at most 15 bytes and the NUL.
        let bytes = name.as_bytes();
        let n = bytes.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&bytes[..n]);
        req
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Prints a warning as QEMU's `warn_report` does.
fn warn_report(text: &str) {
    qom::error_report!("warning: {text}");
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// `TUNGETIFF`: the interface name and flags behind a tun file.
pub fn tap_get_ifreq(fd: &impl AsRawFd) -> io::Result<(String, i16)> {
    let mut req = IfReq::new("", 0);
    // SAFETY: TUNGETIFF writes a struct ifreq, which `req` is, and nothing else.
    let ret = unsafe { ioctl_with_mut_ref(fd, TUNGETIFF(), &mut req) };
    if ret < 0 {
        return Err(last_err());
    }
    Ok((req.name(), req.flags))
}

/// QEMU's `tap_probe_vnet_hdr`: whether an inherited tap has `IFF_VNET_HDR`; the error
/// says it is no tap at all.
fn tap_probe_vnet_hdr(fd: RawFd) -> Result<(bool, i16), NetError> {
    // SAFETY: the caller checked that `fd` is open; it is borrowed for the call only.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let (_, flags) = tap_get_ifreq(&borrowed).map_err(|source| NetError::Io {
        what: format!("Unable to query TUNGETIFF on FD {fd}"),
        source,
    })?;
    Ok((flags & IFF_VNET_HDR != 0, flags))
}

/// QEMU's `tap_probe_has_ufo`: whether the kernel takes `TUN_F_UFO`.
fn tap_probe_has_ufo(file: &File) -> bool {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    unsafe { ioctl_with_val(file, TUNSETOFFLOAD(), u64::from(TUN_F_CSUM | TUN_F_UFO)) >= 0 }
}

/// `TUNSETVNETHDRSZ`.
fn tap_fd_set_vnet_hdr_len(file: &File, len: usize) -> io::Result<()> {
    let len = libc::c_int::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which `len` is.
    if unsafe { ioctl_with_ref(file, TUNSETVNETHDRSZ(), &len) } < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// `TUNGETVNETHDRSZ`.
pub fn tap_fd_get_vnet_hdr_len(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int, which `len` is.
    if unsafe { ioctl_with_mut_ref(fd, TUNGETVNETHDRSZ(), &mut len) } < 0 {
        return Err(last_err());
    }
    usize::try_from(len).map_err(|_| io::ErrorKind::InvalidData.into())
}

/// QEMU's `tap_fd_set_offload`: the offloads the guest accepts, as `TUNSETOFFLOAD` bits
/// (segmentation only with checksums; ECN only with TSO), retried without UFO.
fn tap_fd_set_offload(file: &File, o: Offloads) -> io::Result<()> {
    // Does the kernel know TUNSETOFFLOAD at all?
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { ioctl_with_val(file, TUNSETOFFLOAD(), 0) } != 0
        && last_err().raw_os_error() == Some(libc::EINVAL)
    {
        return Ok(());
    }
    let bits = offload_bits(o);
    // SAFETY: as above.
    if unsafe { ioctl_with_val(file, TUNSETOFFLOAD(), u64::from(bits)) } != 0 {
        let bits = bits & !TUN_F_UFO;
        // SAFETY: as above.
        if unsafe { ioctl_with_val(file, TUNSETOFFLOAD(), u64::from(bits)) } != 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

/// The `TUNSETOFFLOAD` bits for `o`, as QEMU's `tap_fd_set_offload` computes them.
pub fn offload_bits(o: Offloads) -> u32 {
    let mut bits = 0;
    if o.csum {
        bits |= TUN_F_CSUM;
        if o.tso4 {
            bits |= TUN_F_TSO4;
        }
        if o.tso6 {
            bits |= TUN_F_TSO6;
        }
        if (o.tso4 || o.tso6) && o.ecn {
            bits |= TUN_F_TSO_ECN;
        }
        if o.ufo {
            bits |= TUN_F_UFO;
        }
    }
    bits
}

/// QEMU's `tap_open`: a new queue of interface `ifname` (`tap%d` when empty). Returns
/// the file, the name the kernel gave and whether frames carry the vnet header.
fn tap_open(
    ifname: &str,
    vnet_hdr: bool,
    vnet_hdr_required: bool,
    mq_required: bool,
) -> Result<(File, String, bool), NetError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(PATH_NET_TUN)
        .map_err(|source| NetError::Io {
            what: format!("could not open {PATH_NET_TUN}"),
            source,
        })?;
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int, which `features` is.
    if unsafe { ioctl_with_mut_ref(&file, TUNGETFEATURES(), &mut features) } < 0 {
        warn_report(&format!("TUNGETFEATURES failed: {}", strerror(&last_err())));
        features = 0;
    }
    let has = |flag: i16| features & (flag as u16 as libc::c_uint) != 0;
    let mut ifr_flags = IFF_TAP | IFF_NO_PI;
    if has(IFF_ONE_QUEUE) {
        ifr_flags |= IFF_ONE_QUEUE;
    }
    let mut with_hdr = false;
    if vnet_hdr {
        with_hdr = has(IFF_VNET_HDR);
        if with_hdr {
            ifr_flags |= IFF_VNET_HDR;
        }
        if vnet_hdr_required && !with_hdr {
            return Err(NetError::invalid(
                "vnet_hdr=1 requested, but no kernel support for IFF_VNET_HDR available",
            ));
        }
    }
    if mq_required {
        if !has(IFF_MULTI_QUEUE) {
            return Err(NetError::invalid(
                "multiqueue required, but no kernel support for IFF_MULTI_QUEUE available",
            ));
        }
        ifr_flags |= IFF_MULTI_QUEUE;
    }
    let mut req = IfReq::new(if ifname.is_empty() { "tap%d" } else { ifname }, ifr_flags);
    // SAFETY: TUNSETIFF reads and updates a struct ifreq, which `req` is.
    if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } != 0 {
        let source = last_err();
        let what = if ifname.is_empty() {
            format!("could not configure {PATH_NET_TUN}")
        } else {
            format!("could not configure {PATH_NET_TUN} ({})", req.name())
        };
        return Err(NetError::Io { what, source });
    }
    if with_hdr {
        // A persistent tap may keep another user's header length: start from the default
        // (errors ignored, as QEMU does: old kernels have the default anyway).
        let _ = tap_fd_set_vnet_hdr_len(&file, VIRTIO_NET_HDR_LEN);
    }
    set_nonblocking(file.as_raw_fd()).map_err(|source| NetError::Io {
        what: "Failed to set FD nonblocking".into(),
        source,
    })?;
    Ok((file, req.name(), with_hdr))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the descriptor's status flags.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

/// QEMU's `launch_script`: runs `script IFNAME` and waits; anything but exit status 0 is
/// an error with the raw wait status, as QEMU prints it (256 for exit 1; a script that
/// cannot be executed counts as exit 1, as QEMU's child `_exit(1)`s after `execv`).
/// Scripts run through [`crate::launcher`], outside qomvm's sandbox.
pub fn launch_script(script: &str, ifname: &str) -> Result<(), NetError> {
    let status = match crate::launcher::run(script, &[ifname]) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::PermissionDenied
            ) =>
        {
            return Err(NetError::Io {
                what: format!("could not launch network script {script}"),
                source: e,
            })
        }
        Err(_) => 1 << 8,
    };
    if status == 0 {
        Ok(())
    } else {
        Err(NetError::invalid(format!(
            "network script {script} failed with status {status}"
        )))
    }
}

/// QEMU's `monitor_fd_param` without a monitor (`qemu_parse_fd`): a descriptor number.
fn parse_fd(text: &str) -> Result<RawFd, NetError> {
    let t = text.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    t.parse::<RawFd>()
        .ok()
        .filter(|fd| *fd >= 0 && !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
        .ok_or_else(|| NetError::invalid(format!("Invalid file descriptor number '{text}'")))
}

/// An inherited descriptor must be open and take `O_NONBLOCK` (QEMU's
/// `g_unix_set_fd_nonblocking`, whose failure reads "ID: Can't use file descriptor N").
fn check_inherited_fd(id: &str, fd: RawFd) -> Result<(), NetError> {
    // SAFETY: F_GETFD only queries the descriptor's flags.
    let ok = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    let res = if ok {
        set_nonblocking(fd)
    } else {
        Err(last_err())
    };
    res.map_err(|source| NetError::Io {
        what: format!("{id}: Can't use file descriptor {fd}"),
        source,
    })
}

/// QEMU's `get_fds`: `fds=3:4:5`, at most [`MAX_TAP_QUEUES`]; a trailing `:` adds nothing.
fn get_fds(text: &str) -> Vec<&str> {
    let mut v: Vec<&str> = text.split(':').collect();
    if v.last() == Some(&"") {
        v.pop();
    }
    v.truncate(MAX_TAP_QUEUES);
    v
}

/// QemuOpts' `size` values (`sndbuf=`), parsed as every other size is (`qom::parse_size`).
fn parse_size(key: &str, value: &str) -> Result<u64, NetError> {
    qom::parse_size(value.trim())
        .ok_or_else(|| NetError::invalid(format!("Parameter '{key}' expects a size value")))
}

/// QemuOpts' numbers as the options visitor reads a `uint32` (`queues=`, `poll-us=`).
fn parse_u32(key: &str, value: &str) -> Result<u32, NetError> {
    let v: u64 = value
        .parse()
        .map_err(|_| NetError::invalid(format!("Parameter '{key}' expects a uint64 value")))?;
    u32::try_from(v).map_err(|_| NetError::invalid(format!("Parameter '{key}' expects uint32_t")))
}

/// QAPI's `NetdevTapOptions`.
#[derive(Debug, Default, Clone)]
struct TapOptions {
    ifname: Option<String>,
    fd: Option<String>,
    fds: Option<String>,
    script: Option<String>,
    downscript: Option<String>,
    br: Option<String>,
    helper: Option<String>,
    sndbuf: Option<u64>,
    vnet_hdr: Option<bool>,
    vhost: Option<bool>,
    vhostfd: Option<String>,
    vhostfds: Option<String>,
    vhostforce: Option<bool>,
    queues: Option<u32>,
    poll_us: Option<u32>,
}

impl TapOptions {
    fn parse(opts: &[(String, Option<String>)]) -> Result<Self, NetError> {
        let mut o = TapOptions::default();
        for (key, value) in opts {
            // The short form `key` is `key=on`; the last of repeated keys wins.
            let text = value.clone().unwrap_or_else(|| "on".to_string());
            match key.as_str() {
                "ifname" => o.ifname = Some(text),
                "fd" => o.fd = Some(text),
                "fds" => o.fds = Some(text),
                "script" => o.script = Some(text),
                "downscript" => o.downscript = Some(text),
                "br" => o.br = Some(text),
                "helper" => o.helper = Some(text),
                "sndbuf" => o.sndbuf = Some(parse_size(key, &text)?),
                "vnet_hdr" => o.vnet_hdr = Some(parse_bool(key, Some(&text))?),
                "vhost" => o.vhost = Some(parse_bool(key, Some(&text))?),
                "vhostfd" => o.vhostfd = Some(text),
                "vhostfds" => o.vhostfds = Some(text),
                "vhostforce" => o.vhostforce = Some(parse_bool(key, Some(&text))?),
                "queues" => o.queues = Some(parse_u32(key, &text)?),
                "poll-us" => o.poll_us = Some(parse_u32(key, &text)?),
                _ => return Err(NetError::invalid(format!("Invalid parameter '{key}'"))),
            }
        }
        Ok(o)
    }

    /// QEMU's condition for vhost: `vhost=` when given, else implied by `vhostfd=` or
    /// `vhostforce=on`.
    fn wants_vhost(&self, vhostfdname: Option<&str>) -> bool {
        self.vhost
            .unwrap_or(vhostfdname.is_some() || self.vhostforce == Some(true))
    }
}

/// The header the kernel puts before frames, and whether the NIC takes it.
#[derive(Debug, Default)]
struct HdrState {
    /// QEMU's `host_vnet_hdr_len`: the kernel's header length (0 without `IFF_VNET_HDR`).
    host_len: AtomicUsize,
    /// QEMU's `using_vnet_hdr`: the NIC exchanges frames with the header.
    using: AtomicBool,
}

impl HdrState {
    /// The kernel header's length when the tap must strip/add it itself, else 0.
    fn hidden_len(&self) -> usize {
        if self.using.load(Ordering::Acquire) {
            0
        } else {
            self.host_len.load(Ordering::Acquire)
        }
    }
}

/// One queue pair of a tap: one tap file (non-blocking).
#[derive(Debug)]
pub struct TapQueue {
    file: File,
    hdr: Arc<HdrState>,
}

impl TapQueue {
    /// The tap file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn retry_eintr(mut f: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = f();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = last_err();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn iov_count(iov: &[libc::iovec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iov.len()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

impl NetQueue for TapQueue {
    fn rx_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn tx_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn receive(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let hidden = self.hdr.hidden_len();
        let mut scratch = [0u8; VIRTIO_NET_HDR_V1_HASH_LEN];
        let mut iov = Vec::with_capacity(bufs.len() + 1);
        if hidden > 0 {
            iov.push(libc::iovec {
                iov_base: scratch.as_mut_ptr().cast(),
                iov_len: hidden.min(scratch.len()),
            });
        }
        iov.extend(iovecs(bufs));
        let cnt = iov_count(&iov)?;
        // SAFETY: every iovec points at memory valid for writes of its length: the local
        // scratch header, or guest memory the caller's slices borrow for the call.
        let n = retry_eintr(|| unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), cnt) })?;
        Ok(n.saturating_sub(hidden))
    }

    fn send(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let hidden = self.hdr.hidden_len();
        let scratch = [0u8; VIRTIO_NET_HDR_V1_HASH_LEN];
        let mut iov = Vec::with_capacity(bufs.len() + 1);
        if hidden > 0 {
            iov.push(libc::iovec {
                iov_base: scratch.as_ptr().cast_mut().cast(),
                iov_len: hidden.min(scratch.len()),
            });
        }
        iov.extend(iovecs(bufs));
        let cnt = iov_count(&iov)?;
        // SAFETY: every iovec points at memory valid for reads of its length (writev does
        // not write through them): the local empty header, or the caller's guest slices.
        let n = retry_eintr(|| unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), cnt) })?;
        Ok(n.saturating_sub(hidden))
    }

    fn tap_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    /// QEMU's `tap_fd_enable`/`tap_fd_disable`; a single-queue tap refuses `TUNSETQUEUE`
    /// (EINVAL), which is fine: it is always attached.
    fn set_enabled(&self, enabled: bool) -> io::Result<()> {
        let flag = if enabled {
            flags::IFF_ATTACH_QUEUE
        } else {
            flags::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flag);
        // SAFETY: TUNSETQUEUE reads a struct ifreq, which `req` is.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) };
        if ret < 0 {
            let e = last_err();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// `TUNSETQUEUE` (`_IOW('T', 217, int)`).
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

/// A `-netdev tap` backend (QEMU's `TAPState`s of one netdev).
pub struct Tap {
    id: String,
    info_str: String,
    ifname: String,
    queues: Vec<Arc<TapQueue>>,
    hdr: Arc<HdrState>,
    vnet_hdr: bool,
    has_ufo: bool,
    vhost: Vec<Arc<File>>,
    vhostforce: bool,
    /// `downscript` and its argument, until cleanup runs it.
    down_script: Mutex<Option<(String, String)>>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("id", &self.id)
            .field("info", &self.info_str)
            .field("queues", &self.queues.len())
            .field("vnet_hdr", &self.vnet_hdr)
            .field("vhost", &self.vhost.len())
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// The interface name (from `TUNGETIFF` for inherited descriptors).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The queue pairs as tap queues.
    pub fn tap_queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }

    /// QEMU's `tap_has_ufo`: the kernel takes UDP fragmentation offload.
    pub fn has_ufo(&self) -> bool {
        self.has_ufo
    }

    /// The header length the kernel currently uses (0 without `IFF_VNET_HDR`).
    pub fn host_vnet_hdr_len(&self) -> usize {
        self.hdr.host_len.load(Ordering::Acquire)
    }

    /// Whether `vhostforce=on` was given.
    pub fn vhostforce(&self) -> bool {
        self.vhostforce
    }
}

impl Netdev for Tap {
    fn info(&self) -> NetdevInfo {
        NetdevInfo {
            id: self.id.clone(),
            kind: NetdevKind::Tap,
            info_str: self.info_str.clone(),
        }
    }

    fn queues(&self) -> Vec<Arc<dyn NetQueue>> {
        self.queues
            .iter()
            .map(|q| Arc::clone(q) as Arc<dyn NetQueue>)
            .collect()
    }

    fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn has_ufo(&self) -> bool {
        self.has_ufo
    }

    fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        match len {
            0 => {
                self.hdr.using.store(false, Ordering::Release);
                Ok(())
            }
            _ if !self.vnet_hdr => Err(io::ErrorKind::Unsupported.into()),
            VIRTIO_NET_HDR_LEN | VIRTIO_NET_HDR_MRG_RXBUF_LEN | VIRTIO_NET_HDR_V1_HASH_LEN => {
                for q in &self.queues {
                    tap_fd_set_vnet_hdr_len(&q.file, len)?;
                }
                self.hdr.host_len.store(len, Ordering::Release);
                self.hdr.using.store(true, Ordering::Release);
                Ok(())
            }
            _ => Err(io::ErrorKind::InvalidInput.into()),
        }
    }

    fn set_offload(&self, offloads: Offloads) -> io::Result<()> {
        for q in &self.queues {
            tap_fd_set_offload(&q.file, offloads)?;
        }
        Ok(())
    }

    fn max_frame_len(&self) -> usize {
        let hdr = if self.hdr.using.load(Ordering::Acquire) {
            self.hdr.host_len.load(Ordering::Acquire)
        } else {
            0
        };
        TAP_MAX_FRAME + hdr
    }

    fn vhost_files(&self) -> Vec<Arc<File>> {
        self.vhost.clone()
    }

    fn vhost_requested(&self) -> bool {
        self.vhostforce
    }

    fn cleanup(&self) {
        if let Some((script, ifname)) = self.down_script.lock().take() {
            if let Err(e) = launch_script(&script, &ifname) {
                qom::error_report!("{e}");
            }
        }
    }
}

/// Opens or checks the vhost-net device of one queue pair (QEMU's half of
/// `net_init_tap_one` before `vhost_net_init`): `Ok(None)` without vhost.
fn init_vhost(
    id: &str,
    o: &TapOptions,
    vhostfdname: Option<&str>,
) -> Result<Option<Arc<File>>, NetError> {
    if !o.wants_vhost(vhostfdname) {
        if vhostfdname.is_some() {
            return Err(NetError::invalid("vhostfd(s)= is not valid without vhost"));
        }
        return Ok(None);
    }
    let forced = o.vhostforce == Some(true);
    let file = if let Some(name) = vhostfdname {
        let fd = parse_fd(name)?;
        check_inherited_fd(id, fd)?;
        // SAFETY: `fd` is open (checked) and was handed to us by the caller, who gives up
        // its ownership with `vhostfd=`, as with QEMU.
        unsafe { File::from_raw_fd(fd) }
    } else {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(PATH_VHOST_NET)
        {
            Ok(f) => f,
            Err(source) if forced => {
                return Err(NetError::Io {
                    what: "tap: open vhost char device failed".into(),
                    source,
                })
            }
            Err(e) => {
                // QEMU 7.2 warns, then fails an assertion; newer QEMUs refuse the netdev.
                warn_report(&format!(
                    "tap: open vhost char device failed: {}",
                    strerror(&e)
                ));
                return Err(NetError::invalid(
                    "vhost-net requested but could not be initialized",
                ));
            }
        }
    };
    // QEMU's vhost_net_init asks the device for its features (after SET_OWNER, which
    // the NIC's vhost start does here): a descriptor that is not vhost-net fails.
    if let Err(e) = vhost_get_features(&file) {
        warn_report(&format!("vhost_get_features failed: {}", strerror(&e)));
        return Err(NetError::invalid(
            "vhost-net requested but could not be initialized",
        ));
    }
    Ok(Some(Arc::new(file)))
}

/// `VHOST_GET_FEATURES` on a vhost-net file (needs no ownership).
pub fn vhost_get_features(file: &File) -> io::Result<u64> {
    let mut features = 0u64;
    // SAFETY: VHOST_GET_FEATURES writes one u64, which `features` is.
    if unsafe { ioctl_with_mut_ref(file, VHOST_GET_FEATURES(), &mut features) } < 0 {
        return Err(last_err());
    }
    Ok(features)
}

/// `TUNSETSNDBUF` (QEMU's `tap_set_sndbuf`): 0 or absent is unlimited; failure matters
/// only when `sndbuf=` was given.
fn tap_set_sndbuf(file: &File, sndbuf: Option<u64>) -> Result<(), NetError> {
    let mut v = libc::c_int::try_from(sndbuf.unwrap_or(0)).unwrap_or(libc::c_int::MAX);
    if v == 0 {
        v = libc::c_int::MAX;
    }
    // SAFETY: TUNSETSNDBUF reads one int, which `v` is.
    if unsafe { ioctl_with_ref(file, TUNSETSNDBUF(), &v) } < 0 && sndbuf.is_some() {
        return Err(NetError::Io {
            what: "TUNSETSNDBUF ioctl failed".into(),
            source: last_err(),
        });
    }
    Ok(())
}

/// One queue pair, being assembled.
struct QueueSetup {
    file: File,
    vhost: Option<Arc<File>>,
}

/// QEMU's `net_tap_fd_init` + `net_init_tap_one` for one opened/inherited tap file:
/// offloads off, header length reset, `sndbuf`, then vhost.
fn init_tap_one(
    id: &str,
    o: &TapOptions,
    file: File,
    vnet_hdr: bool,
    vhostfdname: Option<&str>,
) -> Result<QueueSetup, NetError> {
    let _ = tap_fd_set_offload(&file, Offloads::default());
    if vnet_hdr {
        // Another user of a persistent tap may have changed the header length.
        let _ = tap_fd_set_vnet_hdr_len(&file, VIRTIO_NET_HDR_LEN);
    }
    tap_set_sndbuf(&file, o.sndbuf)?;
    let vhost = init_vhost(id, o, vhostfdname)?;
    Ok(QueueSetup { file, vhost })
}

/// Takes over the inherited tap `fd` after checking it as QEMU does (open, non-blocking,
/// `TUNGETIFF`), and refuses a tun (layer 3) device, which would garble every frame.
fn inherit_tap_fd(id: &str, text: &str) -> Result<(File, bool), NetError> {
    let fd = parse_fd(text)?;
    check_inherited_fd(id, fd)?;
    let (vnet_hdr, flags) = tap_probe_vnet_hdr(fd)?;
    if flags & IFF_TAP == 0 {
        return Err(NetError::invalid(format!(
            "{id}: file descriptor {fd} is a tun device, not a tap"
        )));
    }
    // SAFETY: `fd` is an open tap descriptor the caller handed over with `fd=`/`fds=`
    // (QEMU takes ownership as well, and closes it at cleanup).
    Ok((unsafe { File::from_raw_fd(fd) }, vnet_hdr))
}

/// QEMU's `net_init_tap`.
pub fn net_init_tap(
    id: &str,
    opts: &[(String, Option<String>)],
) -> Result<Arc<dyn Netdev>, NetError> {
    Ok(Arc::new(tap_init(id, opts)?))
}

/// [`net_init_tap`] returning the concrete [`Tap`] (for tests and tools).
pub fn tap_init(id: &str, opts: &[(String, Option<String>)]) -> Result<Tap, NetError> {
    let o = TapOptions::parse(opts)?;
    let mut setups: Vec<QueueSetup> = Vec::new();
    let vnet_hdr;
    let info_str;
    let ifname;
    let mut down_script = None;

    if let Some(fdname) = &o.fd {
        if o.ifname.is_some()
            || o.script.is_some()
            || o.downscript.is_some()
            || o.vnet_hdr.is_some()
            || o.helper.is_some()
            || o.queues.is_some()
            || o.fds.is_some()
            || o.vhostfds.is_some()
        {
            return Err(NetError::invalid(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and \
                 vhostfds= are invalid with fd=",
            ));
        }
        let (file, hdr) = inherit_tap_fd(id, fdname)?;
        info_str = format!("fd={}", file.as_raw_fd());
        ifname = tap_get_ifreq(&file).map(|(n, _)| n).unwrap_or_default();
        vnet_hdr = hdr;
        setups.push(init_tap_one(id, &o, file, hdr, o.vhostfd.as_deref())?);
    } else if let Some(fdsname) = &o.fds {
        if o.ifname.is_some()
            || o.script.is_some()
            || o.downscript.is_some()
            || o.vnet_hdr.is_some()
            || o.helper.is_some()
            || o.queues.is_some()
            || o.vhostfd.is_some()
        {
            return Err(NetError::invalid(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= \
                 are invalid with fds=",
            ));
        }
        let fds = get_fds(fdsname);
        let vhost_fds = o.vhostfds.as_deref().map(get_fds);
        if let Some(v) = &vhost_fds {
            if v.len() != fds.len() {
                return Err(NetError::invalid(
                    "The number of fds passed does not match the number of vhostfds passed",
                ));
            }
        }
        // One file per descriptor: the same number twice would be closed twice.
        let mut seen = std::collections::HashSet::new();
        for text in fds.iter().chain(vhost_fds.iter().flatten()) {
            if let Ok(fd) = parse_fd(text) {
                if !seen.insert(fd) {
                    return Err(NetError::invalid(format!(
                        "{id}: file descriptor {fd} is given more than once"
                    )));
                }
            }
        }
        let mut first_hdr = None;
        let mut first_fd = -1;
        for (i, text) in fds.iter().enumerate() {
            let (file, hdr) = match first_hdr {
                None => inherit_tap_fd(id, text)?,
                Some(want) => {
                    let (file, hdr) = inherit_tap_fd(id, text)?;
                    if hdr != want {
                        return Err(NetError::invalid(
                            "vnet_hdr not consistent across given tap fds",
                        ));
                    }
                    (file, hdr)
                }
            };
            if first_hdr.is_none() {
                first_hdr = Some(hdr);
                first_fd = file.as_raw_fd();
            }
            let vhostfd = vhost_fds.as_ref().map(|v| v[i]);
            setups.push(init_tap_one(id, &o, file, hdr, vhostfd)?);
        }
        if setups.is_empty() {
            return Err(NetError::invalid("fds= names no file descriptor"));
        }
        vnet_hdr = first_hdr.unwrap_or(false);
        info_str = format!("fd={first_fd}");
        ifname = tap_get_ifreq(&setups[0].file)
            .map(|(n, _)| n)
            .unwrap_or_default();
    } else if o.helper.is_some() {
        return Err(NetError::invalid(
            "helper= is not supported by qomvm (QEMU's qemu-bridge-helper): open the tap \
             with ifname= and a script=, or pass it with fd=",
        ));
    } else {
        if o.vhostfds.is_some() {
            return Err(NetError::invalid(
                "vhostfds= is invalid if fds= wasn't specified",
            ));
        }
        let queues = o.queues.unwrap_or(1);
        if queues == 0 || queues as usize > MAX_TAP_QUEUES {
            return Err(NetError::invalid(format!(
                "Parameter 'queues' expects a number of queues from 1 to {MAX_TAP_QUEUES}"
            )));
        }
        let script = o
            .script
            .clone()
            .unwrap_or_else(|| DEFAULT_NETWORK_SCRIPT.to_string());
        let downscript = o
            .downscript
            .clone()
            .unwrap_or_else(|| DEFAULT_NETWORK_DOWN_SCRIPT.to_string());
        let mut name = o.ifname.clone().unwrap_or_default();
        let (want_hdr, hdr_required) = match o.vnet_hdr {
            Some(v) => (v, v),
            None => (true, false),
        };
        let mut hdr_any = false;
        for i in 0..queues {
            let (file, got, hdr) = tap_open(&name, want_hdr, hdr_required, queues > 1)?;
            name = got;
            hdr_any = hdr;
            if i == 0 && !script.is_empty() && script != "no" {
                launch_script(&script, &name)?;
            }
            setups.push(init_tap_one(id, &o, file, hdr, o.vhostfd.as_deref())?);
        }
        vnet_hdr = hdr_any;
        info_str = format!("ifname={name},script={script},downscript={downscript}");
        if downscript != "no" {
            down_script = Some((downscript, name.clone()));
        }
        ifname = name;
    }

    let hdr = Arc::new(HdrState {
        host_len: AtomicUsize::new(if vnet_hdr { VIRTIO_NET_HDR_LEN } else { 0 }),
        using: AtomicBool::new(false),
    });
    let has_ufo = tap_probe_has_ufo(&setups[0].file);
    // The UFO probe left offloads on: all off until the guest says otherwise.
    let _ = tap_fd_set_offload(&setups[0].file, Offloads::default());
    let mut queues = Vec::with_capacity(setups.len());
    let mut vhost = Vec::new();
    for s in setups {
        vhost.extend(s.vhost);
        queues.push(Arc::new(TapQueue {
            file: s.file,
            hdr: Arc::clone(&hdr),
        }));
    }
    Ok(Tap {
        id: id.to_string(),
        info_str,
        ifname,
        queues,
        hdr,
        vnet_hdr,
        has_ufo,
        vhost,
        vhostforce: o.vhostforce == Some(true),
        down_script: Mutex::new(down_script),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(text: &str) -> Vec<(String, Option<String>)> {
        crate::parse_opts(text)
    }

    fn err(text: &str) -> String {
        match tap_init("n", &opts(text)) {
            Ok(t) => panic!("{text}: accepted ({t:?})"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn option_errors_are_qemus() {
        assert_eq!(err("foo=1"), "Invalid parameter 'foo'");
        assert_eq!(err("sndbuf=abc"), "Parameter 'sndbuf' expects a size value");
        assert_eq!(err("sndbuf=-1"), "Parameter 'sndbuf' expects a size value");
        assert_eq!(
            err("vnet_hdr=maybe"),
            "Parameter 'vnet_hdr' expects 'on' or 'off'"
        );
        assert_eq!(
            err("queues=abc"),
            "Parameter 'queues' expects a uint64 value"
        );
        assert_eq!(
            err("queues=-1"),
            "Parameter 'queues' expects a uint64 value"
        );
        assert_eq!(
            err("queues=5000000000"),
            "Parameter 'queues' expects uint32_t"
        );
        assert_eq!(
            err("poll-us=abc"),
            "Parameter 'poll-us' expects a uint64 value"
        );
        assert_eq!(err("fd=abc"), "Invalid file descriptor number 'abc'");
        assert_eq!(err("fd=-1"), "Invalid file descriptor number '-1'");
        assert_eq!(
            err("fd=3,ifname=x"),
            "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= \
             are invalid with fd="
        );
        assert_eq!(
            err("fd=3,queues=1"),
            "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= \
             are invalid with fd="
        );
        assert_eq!(
            err("fds=3:4,vhostfd=5"),
            "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= are \
             invalid with fds="
        );
        assert_eq!(
            err("fds=3:4,vhostfds=5"),
            "The number of fds passed does not match the number of vhostfds passed"
        );
        assert_eq!(
            err("vhostfds=3"),
            "vhostfds= is invalid if fds= wasn't specified"
        );
        assert!(err("helper=/usr/lib/qemu/qemu-bridge-helper").starts_with("helper= is not"));
    }

    #[test]
    fn bad_descriptors_are_refused_as_qemu_does() {
        // A descriptor number far above anything open.
        assert_eq!(
            err("fd=4000"),
            "n: Can't use file descriptor 4000: Bad file descriptor"
        );
        assert_eq!(
            err("fds=4000:4001"),
            "n: Can't use file descriptor 4000: Bad file descriptor"
        );
        // An open descriptor that is no tap (and is not closed by the refusal).
        let null = File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        assert_eq!(
            err(&format!("fd={fd}")),
            format!("Unable to query TUNGETIFF on FD {fd}: Inappropriate ioctl for device")
        );
        // SAFETY: F_GETFD only queries the descriptor.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    }

    #[test]
    fn fds_lists_split_as_qemu_does() {
        assert_eq!(get_fds("3:4:5"), ["3", "4", "5"]);
        assert_eq!(get_fds("3:"), ["3"]);
        assert_eq!(get_fds("3::4"), ["3", "", "4"]);
        assert_eq!(get_fds(&"7:".repeat(2000)).len(), MAX_TAP_QUEUES);
    }

    #[test]
    fn sizes_and_offloads() {
        assert_eq!(parse_size("sndbuf", "1k").unwrap(), 1024);
        assert_eq!(parse_size("sndbuf", "1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("sndbuf", "4096").unwrap(), 4096);
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        assert_eq!(offload_bits(all), 0x1f);
        assert_eq!(offload_bits(Offloads { csum: false, ..all }), 0);
        assert_eq!(
            offload_bits(Offloads {
                tso4: false,
                tso6: false,
                ..all
            }),
            TUN_F_CSUM | TUN_F_UFO
        );
    }

    #[test]
    fn ifreq_is_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNGETIFF(), 0x8004_54d2);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(VHOST_GET_FEATURES(), 0x8008_af00);
        let r = IfReq::new("averyveryverylongname", 0);
        assert_eq!(r.name(), "averyveryverylo");
    }
}
