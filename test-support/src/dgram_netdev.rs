//! A network backend over a Unix datagram socket pair, for tests that drive a NIC on the
//! qtest accelerator: one frame per datagram, the far end in the test, so every frame the
//! card sends or receives is visible and a slow reader makes sends block as a full tap does.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use net::{NetQueue, Netdev, NetdevInfo, NetdevKind};
use vm_memory::VolatileSlice;

/// How long the test's end waits for a frame.
const WAIT: Duration = Duration::from_secs(10);

/// A backend over a datagram socket: the device's end; the test holds the other.
struct DgramQueue {
    sock: UnixDatagram,
}

fn iov_call(
    fd: RawFd,
    bufs: &[VolatileSlice<'_>],
    f: unsafe extern "C" fn(i32, *const libc::iovec, i32) -> isize,
) -> io::Result<usize> {
    let iov = net::iovecs(bufs);
    // SAFETY: the iovecs point into guest memory slices that outlive the call.
    let n = unsafe { f(fd, iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

unsafe extern "C" fn readv_mut(fd: i32, iov: *const libc::iovec, n: i32) -> isize {
    // SAFETY: forwarded from `iov_call`'s contract.
    unsafe { libc::readv(fd, iov, n) }
}

unsafe extern "C" fn writev_(fd: i32, iov: *const libc::iovec, n: i32) -> isize {
    // SAFETY: forwarded from `iov_call`'s contract.
    unsafe { libc::writev(fd, iov, n) }
}

impl NetQueue for DgramQueue {
    fn rx_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn tx_fd(&self) -> Option<RawFd> {
        // A full socket (the peer reads slowly) blocks sends, as a full tap does.
        Some(self.sock.as_raw_fd())
    }
    fn receive(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        iov_call(self.sock.as_raw_fd(), bufs, readv_mut)
    }
    fn send(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        iov_call(self.sock.as_raw_fd(), bufs, writev_)
    }
    fn tap_file(&self) -> Option<&File> {
        None
    }
}

struct DgramNetdev {
    id: String,
    vnet_hdr: bool,
    queue: Arc<DgramQueue>,
}

impl Netdev for DgramNetdev {
    fn info(&self) -> NetdevInfo {
        NetdevInfo {
            id: self.id.clone(),
            kind: NetdevKind::Tap,
            info_str: "test socket pair".into(),
        }
    }
    fn queues(&self) -> Vec<Arc<dyn NetQueue>> {
        vec![self.queue.clone() as Arc<dyn NetQueue>]
    }
    fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }
    fn set_vnet_hdr_len(&self, _len: usize) -> io::Result<()> {
        Ok(())
    }
    fn max_frame_len(&self) -> usize {
        65536
    }
}

/// Adds a datagram backend `id` (claiming a vnet header when `vnet_hdr`); returns the
/// test's end, which waits up to 10 s for a frame.
pub fn add_backend(id: &str, vnet_hdr: bool) -> UnixDatagram {
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs.set_read_timeout(Some(WAIT)).unwrap();
    net::add_netdev(Arc::new(DgramNetdev {
        id: id.into(),
        vnet_hdr,
        queue: Arc::new(DgramQueue { sock: ours }),
    }))
    .unwrap();
    theirs
}
