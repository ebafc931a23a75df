//! Network namespaces a test makes for itself (only loopback and these namespaces are
//! ever touched), and taps opened in them the way a management stack opens one before
//! handing it to the VMM. Std and libc only: `net/tests` includes this file by path (the
//! `net` crate cannot depend on test-support, which depends on it through `hw`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

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

    /// `ip netns exec NAME ip ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .output()
            .expect("run ip");
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
