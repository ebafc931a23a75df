//! `-netdev tap` against real tap interfaces, each in a network namespace the test makes
//! (`qomvm-tap-<pid>-<n>`: only its loopback and the tap; removed even when a test
//! fails). Frames cross between `NetQueue::send`/`receive` and an `AF_PACKET` socket bound
//! to the tap inside the namespace. Skipped, and the skip reported
//! (`test-support/src/skip.rs`), when not root or without `/dev/net/tun` or `ip`.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use net::tap::{self, flags};
use net::{NetQueue, Netdev, Offloads};
use vm_memory::VolatileSlice;

#[path = "../../test-support/src/netns.rs"]
#[allow(dead_code)]
mod netns;
use netns::{is_test_frame, open_tap, skip_reason, test_frame, Netns, PacketSocket};
#[path = "../../test-support/src/skip.rs"]
#[allow(dead_code)]
mod skip;

macro_rules! skip_unless_possible {
    () => {
        if let Some(why) = skip_reason() {
            skip::skip(why);
            return;
        }
    };
}

/// `ip ARGS` (in the calling thread's namespace).
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opts(text: &str) -> Vec<(String, Option<String>)> {
    net::parse_opts(text)
}

fn wait_readable(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "the tap never became readable");
}

/// Receives frames from the queue until a test frame arrives; returns it whole (with the
/// header when the NIC uses one) .
fn receive_test_frame(q: &dyn NetQueue, hdr_len: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        wait_readable(q.rx_fd());
        // Scattered over two buffers, as a guest's descriptors would be.
        let mut a = vec![0u8; 7];
        let mut b = vec![0u8; 70000];
        let n = {
            let bufs = [
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ];
            match q.receive(&bufs) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("receive: {e}"),
            }
        };
        a.extend_from_slice(&b);
        a.truncate(n);
        if is_test_frame(&a[hdr_len.min(a.len())..]) {
            return a;
        }
    }
    panic!("no test frame came out of the tap");
}

fn send(q: &dyn NetQueue, data: &[u8]) -> usize {
    let mut copy = data.to_vec();
    let (x, y) = copy.split_at_mut(5);
    let bufs = [VolatileSlice::from(x), VolatileSlice::from(y)];
    q.send(&bufs).expect("send")
}

/// Both directions through queue `q` of a tap on interface `ifname`.
fn exchange(q: &dyn NetQueue, ifname: &str, hdr_len: usize) {
    let sock = PacketSocket::bind(ifname);
    // Guest -> host.
    let out = test_frame(1, 200);
    let mut wire = vec![0u8; hdr_len];
    wire.extend_from_slice(&out);
    assert_eq!(send(q, &wire), wire.len());
    assert_eq!(sock.recv_test_frame(), out);
    // Host -> guest.
    let inb = test_frame(2, 300);
    sock.send(&inb);
    let got = receive_test_frame(q, hdr_len);
    assert_eq!(got.len(), hdr_len + inb.len());
    assert_eq!(&got[hdr_len..], &inb[..]);
    if hdr_len > 0 {
        // virtio_net_hdr: flags, gso_type none (a plain frame).
        assert_eq!(got[0], 0, "flags");
        assert_eq!(got[1], 0, "gso_type");
    }
}

#[test]
fn tap_by_ifname_with_and_without_the_vnet_header() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        let t = tap::tap_init("t0", &opts("ifname=qt0,script=no,downscript=no")).unwrap();
        assert_eq!(t.info().info_str, "ifname=qt0,script=no,downscript=no");
        assert_eq!(t.ifname(), "qt0");
        assert!(t.has_vnet_hdr(), "the kernel offers IFF_VNET_HDR");
        assert_eq!(t.queues().len(), 1);
        assert!(t.vhost_files().is_empty());
        ip(&["link", "set", "qt0", "up"]);
        let q = t.queues().remove(0);
        assert_eq!(q.tx_fd(), Some(q.rx_fd()));
        assert!(q.tap_file().is_some());
        // The NIC does not take the header yet: the tap hides it.
        assert_eq!(t.max_frame_len(), tap::TAP_MAX_FRAME);
        exchange(&*q, "qt0", 0);
        // virtio 1.x's 12-byte header.
        t.set_vnet_hdr_len(12).unwrap();
        assert_eq!(
            tap::tap_fd_get_vnet_hdr_len(q.tap_file().unwrap()).unwrap(),
            12
        );
        assert_eq!(t.max_frame_len(), tap::TAP_MAX_FRAME + 12);
        exchange(&*q, "qt0", 12);
        t.set_vnet_hdr_len(10).unwrap();
        exchange(&*q, "qt0", 10);
        // Offloads as a guest accepts them (the kernel takes csum + TSO at least).
        t.set_offload(Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: false,
            ufo: false,
        })
        .unwrap();
        t.set_offload(Offloads::default()).unwrap();
        assert!(t.set_vnet_hdr_len(11).is_err());
        // Back to no header for the NIC.
        t.set_vnet_hdr_len(0).unwrap();
        exchange(&*q, "qt0", 0);
    });
}

#[test]
fn tap_with_vnet_hdr_off() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        let t = tap::tap_init(
            "t1",
            &opts("ifname=qt1,script=no,downscript=no,vnet_hdr=off,sndbuf=1M,poll-us=50"),
        )
        .unwrap();
        assert!(!t.has_vnet_hdr());
        assert_eq!(t.host_vnet_hdr_len(), 0);
        assert_eq!(
            t.set_vnet_hdr_len(12).unwrap_err().kind(),
            io::ErrorKind::Unsupported
        );
        let (_, f) = tap::tap_get_ifreq(t.tap_queues()[0].file()).unwrap();
        assert_eq!(f & flags::IFF_VNET_HDR, 0);
        ip(&["link", "set", "qt1", "up"]);
        exchange(&*t.queues()[0], "qt1", 0);
    });
}

#[test]
fn tap_from_an_inherited_fd() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        let fd = open_tap("qt2", flags::IFF_TAP | flags::IFF_VNET_HDR).into_raw_fd();
        let t = tap::tap_init("t2", &opts(&format!("fd={fd}"))).unwrap();
        assert_eq!(t.info().info_str, format!("fd={fd}"));
        assert_eq!(t.ifname(), "qt2");
        assert!(t.has_vnet_hdr());
        // Non-blocking now.
        // SAFETY: F_GETFL only reads the flags.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        ip(&["link", "set", "qt2", "up"]);
        let q = t.queues().remove(0);
        // Nothing waiting: WouldBlock, not a hang.
        let mut buf = [0u8; 64];
        let none = q.receive(&[VolatileSlice::from(&mut buf[..])]);
        if let Err(e) = none {
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        t.set_vnet_hdr_len(12).unwrap();
        exchange(&*q, "qt2", 12);
    });
}

#[test]
fn multiqueue_taps_by_ifname_and_by_fds() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        let t = tap::tap_init("t3", &opts("ifname=qt3,script=no,downscript=no,queues=2")).unwrap();
        assert_eq!(t.queues().len(), 2);
        assert_eq!(t.ifname(), "qt3");
        for q in t.tap_queues() {
            let (name, f) = tap::tap_get_ifreq(q.file()).unwrap();
            assert_eq!(name, "qt3");
            assert_ne!(f & flags::IFF_MULTI_QUEUE, 0);
        }
        let mq = flags::IFF_TAP | flags::IFF_VNET_HDR | flags::IFF_MULTI_QUEUE;
        let a = open_tap("qt4", mq).into_raw_fd();
        let b = open_tap("qt4", mq).into_raw_fd();
        let t = tap::tap_init("t4", &opts(&format!("fds={a}:{b}"))).unwrap();
        assert_eq!(t.queues().len(), 2);
        assert_eq!(t.info().info_str, format!("fd={a}"));
        ip(&["link", "set", "qt4", "up"]);
        // The kernel spreads flows over the queues; guest -> host works on each.
        let sock = PacketSocket::bind("qt4");
        for q in t.queues() {
            let f = test_frame(9, 100);
            send(&*q, &f);
            assert_eq!(sock.recv_test_frame(), f);
        }
        // vnet_hdr must agree across fds= (the flag is the interface's, so two interfaces
        // are needed to disagree).
        let c = open_tap("qt5", flags::IFF_TAP | flags::IFF_VNET_HDR).into_raw_fd();
        let d = open_tap("qt6", flags::IFF_TAP).into_raw_fd();
        let e = tap::tap_init("t5", &opts(&format!("fds={c}:{d}"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vnet_hdr not consistent across given tap fds"
        );
    });
}

#[test]
fn inherited_descriptors_that_are_not_taps_are_refused() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        // A tun (layer 3) device.
        let tun = open_tap("qtun0", flags::IFF_TUN);
        let fd = tun.as_raw_fd();
        let e = tap::tap_init("n", &opts(&format!("fd={fd}"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("n: file descriptor {fd} is a tun device, not a tap")
        );
        // /dev/net/tun opened but never attached: QEMU's words for EBADFD.
        let raw = File::options()
            .read(true)
            .write(true)
            .open(tap::PATH_NET_TUN)
            .unwrap();
        let fd = raw.as_raw_fd();
        let e = tap::tap_init("n", &opts(&format!("fd={fd}"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Unable to query TUNGETIFF on FD {fd}: File descriptor in bad state")
        );
        // The same descriptor twice in fds=.
        let e = tap::tap_init("n", &opts(&format!("fds={fd}:{fd}"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("n: file descriptor {fd} is given more than once")
        );
    });
}

#[test]
fn scripts_run_with_the_interface_name() {
    skip_unless_possible!();
    let dir = std::env::temp_dir().join(format!("qomvm-tap-scripts-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let script = |name: &str, body: &str| {
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    };
    let up = script("up", &format!("echo \"up $1\" >> {}", log.display()));
    let down = script("down", &format!("echo \"down $1\" >> {}", log.display()));
    let ns = Netns::new("tap");
    ns.run(|| {
        let t = tap::tap_init(
            "s",
            &opts(&format!("ifname=qs0,script={up},downscript={down}")),
        )
        .unwrap();
        assert_eq!(
            t.info().info_str,
            format!("ifname=qs0,script={up},downscript={down}")
        );
        assert_eq!(fs::read_to_string(&log).unwrap(), "up qs0\n");
        t.cleanup();
        t.cleanup();
        assert_eq!(fs::read_to_string(&log).unwrap(), "up qs0\ndown qs0\n");
        // A failing script refuses the netdev, with the raw wait status as QEMU prints it.
        let e =
            tap::tap_init("s", &opts("ifname=qs1,script=/bin/false,downscript=no")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network script /bin/false failed with status 256"
        );
        let e = tap::tap_init(
            "s",
            &opts("ifname=qs2,script=/nonexistent/qemu-ifup,downscript=no"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "network script /nonexistent/qemu-ifup failed with status 256"
        );
    });
    let _ = fs::remove_dir_all(&dir);
}

// Every tap_init in a test names a tap of its own: a tap whose netdev failed is closed,
// but a child forked meanwhile by another test (its `ip` or a script) holds a copy of the
// descriptor until it execs, and the same name would then be busy (EBUSY).
#[test]
fn vhost_options() {
    skip_unless_possible!();
    let ns = Netns::new("tap");
    ns.run(|| {
        let e = tap::tap_init(
            "v",
            &opts("ifname=qv0,script=no,downscript=no,vhost=off,vhostfd=3"),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "vhostfd(s)= is not valid without vhost");
        // A vhostfd that is no vhost-net device.
        let null = File::open("/dev/null").unwrap().into_raw_fd();
        let e = tap::tap_init(
            "v",
            &opts(&format!(
                "ifname=qv3,script=no,downscript=no,vhostfd={null}"
            )),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "vhost-net requested but could not be initialized"
        );
        if Path::new(tap::PATH_VHOST_NET).exists() {
            let t =
                tap::tap_init("v", &opts("ifname=qv1,script=no,downscript=no,vhost=on")).unwrap();
            assert_eq!(t.vhost_files().len(), 1);
            assert!(!t.vhost_requested());
            let t = tap::tap_init(
                "v",
                &opts("ifname=qv2,script=no,downscript=no,queues=2,vhost=on,vhostforce=on"),
            )
            .unwrap();
            assert_eq!(t.vhost_files().len(), 2);
            assert!(t.vhost_requested());
        } else {
            println!("no {}: vhost=on refusals only", tap::PATH_VHOST_NET);
            let e = tap::tap_init("v", &opts("ifname=qv1,script=no,downscript=no,vhost=on"))
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "vhost-net requested but could not be initialized"
            );
            let e = tap::tap_init(
                "v",
                &opts("ifname=qv4,script=no,downscript=no,vhostforce=on"),
            )
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                "tap: open vhost char device failed: No such file or directory"
            );
        }
    });
}
