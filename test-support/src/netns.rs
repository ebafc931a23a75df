//! Network namespaces a test makes for itself (only loopback and these namespaces are
//! ever touched), and taps opened in them the way a management stack opens one before
//! handing it to the VMM, and `AF_PACKET` sockets that see what crosses such a tap. Std and
//! libc only: `net/tests` includes this file by path (the `net` crate cannot depend on
//! test-support, which depends on it through `hw`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why network-namespace tests cannot run here (not root, no `ip`, no /dev/net/tun).
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces and taps need root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("iproute2's `ip` is missing".into()),
    }
}

/// A network namespace of the test's own; deleted on drop.
pub struct Netns {
    /// Its name (`ip netns exec NAME ...`).
    pub name: String,
}

impl Netns {
    /// Makes `qomvm-PREFIX-PID-N`.
    pub fn new(prefix: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "qomvm-{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace (sockets and taps it makes live there;
    /// commands it spawns inherit it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open the namespace");
                // SAFETY: setns on this thread only, with a namespace file we hold.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// `ip netns exec NAME COMMAND...`, whatever its exit status (`ip netns exec` also
    /// mounts the namespace's own /sys for it).
    pub fn exec(&self, command: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {command:?}: {e}", self.name))
    }

    /// `ip netns exec NAME ip ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let out = self.exec(&[&["ip"], args].concat());
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `IFF_TAP`.
pub const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`, always added.
pub const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`.
pub const IFF_VNET_HDR: i16 = 0x4000;

/// Opens tun/tap `name` (in the calling thread's namespace) with `TUNSETIFF` and
/// `flags | IFF_NO_PI` (`IFF_TAP`, `IFF_TUN`, `IFF_VNET_HDR`, `IFF_MULTI_QUEUE`...), the
/// way a management stack opens one before handing it over.
pub fn open_tap(name: &str, flags: i16) -> File {
    try_open_tap(name, flags).unwrap_or_else(|e| panic!("TUNSETIFF {name}: {e}"))
}

/// [`open_tap`] that returns the error.
pub fn try_open_tap(name: &str, flags: i16) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: i16,
        pad: [u8; 22],
    }
    let mut r = IfReq {
        name: [0; 16],
        flags: IFF_NO_PI | flags,
        pad: [0; 22],
    };
    let len = name.len().min(15);
    r.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: TUNSETIFF takes a struct ifreq, which IfReq lays out.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), 0x4004_54ca, &mut r) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// An experimental ethertype (IEEE 802 local): test frames carry it, so they are told
/// apart from the kernel's own chatter (IPv6 neighbour discovery...).
pub const ETHERTYPE_TEST: u16 = 0x88b5;

/// A broadcast frame of `len` bytes (at least 14) from `02:00:00:00:00:TAG`, of
/// [`ETHERTYPE_TEST`], with a payload that depends on `tag`.
pub fn test_frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, tag]);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

/// Whether `frame` is an Ethernet frame of [`ETHERTYPE_TEST`].
pub fn is_test_frame(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == ETHERTYPE_TEST.to_be_bytes()
}

/// An `AF_PACKET` socket bound to one interface (of the calling thread's namespace): it
/// sends frames out of the interface (into a tap: to its reader) and sees every frame
/// the interface carries.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Binds to interface `ifname`, with a short receive timeout (see
    /// [`PacketSocket::recv_test_frame`]).
    pub fn bind(ifname: &str) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        PacketSocket { fd }
    }

    /// Sends `frame` out of the interface, whole.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// The next frame of [`ETHERTYPE_TEST`] the interface carries; panics after 20 s
    /// without one.
    pub fn recv_test_frame(&self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = vec![0u8; 70000];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && is_test_frame(&buf[..n as usize]) {
                return buf[..n as usize].to_vec();
            }
        }
        panic!("no test frame reached the packet socket");
    }
}
