//! qomvm's network backends (QEMU's `net/`): what a NIC's `netdev=` names. A backend
//! ([`Netdev`]) has one or more queue pairs ([`NetQueue`]); a NIC moves whole Ethernet
//! frames through them, each optionally led by a virtio-net header when the backend
//! carries one (a tap opened with `IFF_VNET_HDR`), so a virtio NIC passes the guest's
//! checksum and segmentation offloads straight to the host kernel.
//!
//! It sits below the devices: it knows nothing of QOM, the machine or the command line's
//! syntax. `src/` splits `-netdev`/`-nic` into key-value pairs and calls [`netdev_add`];
//! devices find backends with [`find_netdev`] and claim them with [`Netdev::attach`].
//!
//! Data moves between guest memory and the backend as [`VolatileSlice`]s: a tap reads and
//! writes guest buffers with one `readv`/`writev`, no copy of ours.

pub mod launcher;
pub mod slirp;
pub mod tap;

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use vm_memory::VolatileSlice;

/// A netdev error, in QEMU's words (printed after `qomvm: -netdev ...: `).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad options: the message is QEMU's.
    #[error("{0}")]
    Invalid(String),
    /// A host call failed: what was attempted, and the error (as `strerror` words it,
    /// without Rust's ` (os error N)`, as QEMU's `error_setg_errno` prints it).
    #[error("{what}: {}", strerror(source))]
    Io {
        /// What qomvm was doing, in QEMU's words ("could not configure /dev/net/tun (tap0)").
        what: String,
        /// Why.
        source: io::Error,
    },
}

impl NetError {
    /// An [`NetError::Invalid`] from any text.
    pub fn invalid(text: impl Into<String>) -> Self {
        NetError::Invalid(text.into())
    }
}

/// strerror's text of an I/O error, without Rust's ` (os error N)`.
pub fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The checksum and segmentation offloads a guest accepted (QEMU's `NetOffloads`), which a
/// backend with a vnet header must apply to the frames it hands the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// The guest takes frames with partial checksums (`VIRTIO_NET_F_GUEST_CSUM`).
    pub csum: bool,
    /// TCPv4 segments larger than the MTU (`GUEST_TSO4`).
    pub tso4: bool,
    /// TCPv6 segments larger than the MTU (`GUEST_TSO6`).
    pub tso6: bool,
    /// TSO with ECN (`GUEST_ECN`).
    pub ecn: bool,
    /// UDP fragmentation offload (`GUEST_UFO`).
    pub ufo: bool,
}

/// The kind of a backend, as QMP's `NetClientDriver` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetdevKind {
    /// `-netdev tap`.
    Tap,
    /// `-netdev user` (libslirp).
    User,
}

impl NetdevKind {
    /// QMP's name (`tap`, `user`).
    pub fn name(self) -> &'static str {
        match self {
            NetdevKind::Tap => "tap",
            NetdevKind::User => "user",
        }
    }
}

/// One queue pair of a backend: frames to and from one NIC queue pair.
///
/// Both directions are non-blocking. A NIC watches [`NetQueue::rx_fd`] on its I/O
/// thread, and when [`NetQueue::send`] would block, [`NetQueue::tx_fd`] for writability.
pub trait NetQueue: Send + Sync {
    /// Readable when [`NetQueue::receive`] may have a frame.
    fn rx_fd(&self) -> RawFd;
    /// Writable when a [`NetQueue::send`] that returned `WouldBlock` may succeed; `None`
    /// for backends whose `send` never blocks.
    fn tx_fd(&self) -> Option<RawFd>;
    /// Reads one frame into `bufs` (scattered), led by the vnet header when the backend
    /// uses one ([`Netdev::set_vnet_hdr_len`]). Returns its length; `WouldBlock` when none
    /// is waiting. The buffers must hold the largest frame the backend can deliver
    /// ([`Netdev::max_frame_len`]): a frame that does not fit is lost.
    fn receive(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Sends one frame gathered from `bufs`, led by the vnet header when the backend uses
    /// one. `WouldBlock` when the backend is full (try again when `tx_fd` is writable).
    fn send(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// The tap file a vhost-net worker serves this queue pair from (`None` for backends
    /// vhost cannot use).
    fn tap_file(&self) -> Option<&File> {
        None
    }
    /// Attaches or detaches the queue (a multiqueue tap's `TUNSETQUEUE`): the host
    /// steers frames only to attached queues, so a NIC detaches those the driver does not
    /// use. A NIC stops watching a detached queue's descriptor first.
    fn set_enabled(&self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
}

/// What `info network` prints about a backend.
#[derive(Debug, Clone)]
pub struct NetdevInfo {
    /// `id=`.
    pub id: String,
    /// Its kind.
    pub kind: NetdevKind,
    /// QEMU's `info_str` (`ifname=tap0,script=no,downscript=no`, `net=10.0.2.0,restrict=off`).
    pub info_str: String,
}

/// A network backend (QEMU's `NetClientState` of a `-netdev`).
pub trait Netdev: Send + Sync {
    /// Its id, kind and description.
    fn info(&self) -> NetdevInfo;
    /// Its queue pairs (`queues=`; 1 unless the tap was opened multiqueue).
    fn queues(&self) -> Vec<Arc<dyn NetQueue>>;
    /// Whether frames can carry a virtio-net header (a tap with `IFF_VNET_HDR`).
    fn has_vnet_hdr(&self) -> bool {
        false
    }
    /// Whether the host takes UDP fragmentation offload (QEMU's `peer_has_ufo`): a NIC
    /// offers `GUEST_UFO`/`HOST_UFO` only then.
    fn has_ufo(&self) -> bool {
        false
    }
    /// Switches the header on, with `len` bytes (10 or 12), or off (`0`). Only with
    /// [`Netdev::has_vnet_hdr`].
    fn set_vnet_hdr_len(&self, _len: usize) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Tells the host which offloads the guest accepted (`TUNSETOFFLOAD`).
    fn set_offload(&self, _offloads: Offloads) -> io::Result<()> {
        Ok(())
    }
    /// The largest frame [`NetQueue::receive`] can return, header included.
    fn max_frame_len(&self) -> usize;
    /// The vhost-net devices serving the queue pairs (`vhost=on`), one per queue pair,
    /// opened or inherited (`vhostfd=`/`vhostfds=`); empty without vhost.
    fn vhost_files(&self) -> Vec<Arc<File>> {
        Vec::new()
    }
    /// Whether `vhost=on` was asked for (and no fallback is allowed: `vhostforce`).
    fn vhost_requested(&self) -> bool {
        false
    }
    /// Releases host resources when the backend is removed (`netdev_del`, exit): a tap's
    /// `downscript`, slirp's thread.
    fn cleanup(&self) {}
}

/// A backend in the table, with the NIC that uses it.
struct Entry {
    netdev: Arc<dyn Netdev>,
    id: String,
    peer: Mutex<Option<String>>,
}

/// Every backend, in creation order (QEMU's `net_clients`).
static NETDEVS: Mutex<Vec<Arc<Entry>>> = Mutex::new(Vec::new());

/// Adds a created backend; a duplicate id is QEMU's error.
pub fn add_netdev(netdev: Arc<dyn Netdev>) -> Result<(), NetError> {
    let id = netdev.info().id;
    let mut all = NETDEVS.lock();
    if all.iter().any(|e| e.id == id) {
        return Err(NetError::invalid(format!("Duplicate ID '{id}' for netdev")));
    }
    all.push(Arc::new(Entry {
        netdev,
        id,
        peer: Mutex::new(None),
    }));
    Ok(())
}

/// The backend with that id (what a NIC's `netdev=` names).
pub fn find_netdev(id: &str) -> Option<Arc<dyn Netdev>> {
    NETDEVS
        .lock()
        .iter()
        .find(|e| e.id == id)
        .map(|e| Arc::clone(&e.netdev))
}

/// Every backend with the NIC using it (by QOM path or id), in creation order.
pub fn netdevs() -> Vec<(Arc<dyn Netdev>, Option<String>)> {
    NETDEVS
        .lock()
        .iter()
        .map(|e| (Arc::clone(&e.netdev), e.peer.lock().clone()))
        .collect()
}

/// Claims backend `id` for NIC `nic`; `Err(())` when another NIC has it or it does not
/// exist (the device words the error).
#[allow(clippy::result_unit_err)]
pub fn attach(id: &str, nic: &str) -> Result<Arc<dyn Netdev>, ()> {
    let all = NETDEVS.lock();
    let entry = all.iter().find(|e| e.id == id).ok_or(())?;
    let mut peer = entry.peer.lock();
    if peer.is_some() {
        return Err(());
    }
    *peer = Some(nic.to_string());
    Ok(Arc::clone(&entry.netdev))
}

/// Releases backend `id` (its NIC went away).
pub fn detach(id: &str) {
    if let Some(e) = NETDEVS.lock().iter().find(|e| e.id == id) {
        *e.peer.lock() = None;
    }
}

/// Removes backend `id` (QMP `netdev_del`); `false` when there is none.
pub fn remove_netdev(id: &str) -> bool {
    let mut all = NETDEVS.lock();
    let Some(pos) = all.iter().position(|e| e.id == id) else {
        return false;
    };
    let entry = all.remove(pos);
    entry.netdev.cleanup();
    true
}

/// Removes every backend (QEMU's `net_cleanup` at exit).
pub fn cleanup_all() {
    let all = std::mem::take(&mut *NETDEVS.lock());
    for entry in all {
        entry.netdev.cleanup();
    }
}

/// Options of one `-netdev`, split (`type` first as the implied key, `,,` unescaped).
pub type NetdevOpts = [(String, Option<String>)];

/// QEMU's `net_client_init` for one `-netdev`/`netdev_add`: checks `id`, dispatches on
/// `type`, adds the backend.
pub fn netdev_add(opts: &NetdevOpts) -> Result<(), NetError> {
    let kind = opts
        .iter()
        .find(|(k, _)| k == "type")
        .and_then(|(_, v)| v.clone())
        .ok_or_else(|| NetError::invalid("Parameter 'type' is missing"))?;
    let id = opts
        .iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v.clone())
        .ok_or_else(|| NetError::invalid("Parameter 'id' is missing"))?;
    check_id(&id)?;
    if find_netdev(&id).is_some() {
        return Err(NetError::invalid(format!("Duplicate ID '{id}' for netdev")));
    }
    let rest: Vec<(String, Option<String>)> = opts
        .iter()
        .filter(|(k, _)| k != "type" && k != "id")
        .cloned()
        .collect();
    let netdev: Arc<dyn Netdev> = match kind.as_str() {
        "tap" => tap::net_init_tap(&id, &rest)?,
        "user" => slirp::net_init_slirp(&id, &rest)?,
        other => {
            return Err(NetError::invalid(format!(
                "Parameter 'type' does not accept value '{other}'"
            )))
        }
    };
    add_netdev(netdev)
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn check_id(id: &str) -> Result<(), NetError> {
    // `-nic`'s backends take ids in QEMU's reserved `__org.qemu.` namespace.
    if id
        .strip_prefix("__org.qemu.")
        .is_some_and(|rest| !rest.is_empty())
    {
        return Ok(());
    }
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NetError::invalid("Parameter 'id' expects an identifier"))
    }
}

/// Splits `key=value,key,...` into pairs, `,,` standing for a literal comma (QemuOpts'
/// syntax without an implied first key): HMP arguments and tests use it.
pub fn parse_opts(text: &str) -> Vec<(String, Option<String>)> {
    fn push(items: &mut Vec<(String, Option<String>)>, current: &mut String) {
        if !current.is_empty() {
            items.push(match current.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (current.clone(), None),
            });
        }
        current.clear();
    }
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            push(&mut items, &mut current);
        }
    }
    push(&mut items, &mut current);
    items
}

/// QemuOpts' boolean: `on`/`off` (and `yes`/`no`, `true`/`false`).
pub fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, NetError> {
    match value.unwrap_or("on") {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(NetError::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

/// Libc iovecs over guest slices, for `readv`/`writev` straight into guest memory.
pub fn iovecs(bufs: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_with_escaped_commas() {
        let o = parse_opts("type=user,hostfwd=tcp::1-:2,,x,restrict");
        assert_eq!(
            o,
            vec![
                ("type".into(), Some("user".into())),
                ("hostfwd".into(), Some("tcp::1-:2,x".into())),
                ("restrict".into(), None),
            ]
        );
        assert!(parse_opts("").is_empty());
    }

    #[test]
    fn ids_are_checked_as_qemu_does() {
        assert!(check_id("hostnet0").is_ok());
        assert!(check_id("net-0.a_b").is_ok());
        assert!(check_id("0net").is_err());
        assert!(check_id("").is_err());
        assert!(check_id("a b").is_err());
    }
}
