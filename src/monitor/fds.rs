//! Descriptors a QMP client passes over its Unix socket (SCM_RIGHTS) and `getfd` names
//! (QEMU's `monitor_get_fd`, `qmp_getfd`, `qmp_closefd`): libvirt hands qomvm the file of a
//! `virsh save` this way and then runs `migrate` with `fd:NAME`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use parking_lot::Mutex;

/// The descriptors a connection received and no `getfd` took yet, oldest first.
pub type FdQueue = Arc<Mutex<VecDeque<OwnedFd>>>;

/// At most this many descriptors wait per connection; more are closed at once.
const MAX_PENDING: usize = 16;

/// Named descriptors (`getfd`), shared by every monitor as the process has one fd table.
static NAMED: Mutex<BTreeMap<String, OwnedFd>> = Mutex::new(BTreeMap::new());

/// Reads a Unix socket with `recvmsg`, keeping the descriptors that come with the bytes.
pub struct ScmReader {
    stream: UnixStream,
    fds: FdQueue,
}

impl ScmReader {
    /// A reader of `stream` that queues what it receives in `fds`.
    pub fn new(stream: UnixStream, fds: FdQueue) -> Self {
        ScmReader { stream, fds }
    }
}

impl Read for ScmReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Room for a few descriptors per message (libvirt sends one).
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: the header points at `buf` and `control`, both alive and writable for
        // the call; the kernel writes at most their lengths.
        let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
        // msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                        let mut queue = self.fds.lock();
                        if queue.len() < MAX_PENDING {
                            queue.push_back(fd);
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(n as usize)
    }
}

/// QEMU's `qmp_getfd`: names the oldest descriptor the client sent.
pub fn getfd(queue: Option<&FdQueue>, name: &str) -> Result<(), String> {
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("Monitor names may not begin with a number".into());
    }
    let fd = queue
        .and_then(|q| q.lock().pop_front())
        .ok_or_else(|| "No file descriptor supplied via SCM_RIGHTS".to_string())?;
    // A name given again replaces (and closes) the old descriptor, as in QEMU.
    NAMED.lock().insert(name.to_string(), fd);
    Ok(())
}

/// The oldest descriptor the client sent and no command took yet (QEMU's
/// `qemu_chr_fe_get_msgfd`), for `add-fd`.
pub fn take_received(queue: Option<&FdQueue>) -> Option<OwnedFd> {
    queue.and_then(|q| q.lock().pop_front())
}

/// QEMU's `qmp_closefd`.
pub fn closefd(name: &str) -> Result<(), String> {
    NAMED
        .lock()
        .remove(name)
        .map(drop)
        .ok_or_else(|| format!("File descriptor named '{name}' not found"))
}

/// QEMU's `monitor_get_fd`: takes the descriptor named `name` (it is the caller's now).
pub fn take(name: &str) -> Option<OwnedFd> {
    NAMED.lock().remove(name)
}
