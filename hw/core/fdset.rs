//! File descriptor sets (QEMU's `monitor/fds.c`, `qemu_open`'s `/dev/fdset/N`): `-add-fd
//! fd=N,set=M` hands qomvm descriptors its parent opened (libvirt opens a domain's serial
//! log or disk itself), and opening `/dev/fdset/M` then uses a duplicate of a descriptor
//! of set M whose access mode matches, instead of a path.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use parking_lot::Mutex;

/// The prefix of paths that name a set.
const FDSET_PREFIX: &str = "/dev/fdset/";

/// Errors of adding and using descriptor sets, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum FdsetError {
    /// `fd=` not a number, a standard stream, or not open.
    #[error("fd is not valid or already in use")]
    BadFd,
    /// The same descriptor twice.
    #[error("fd {0} is already in fdset {1}")]
    Duplicate(RawFd, i64),
    /// `set=` missing or not a number.
    #[error("parameter 'set' is missing or not a number")]
    BadSet,
    /// `/dev/fdset/N` with no such set, or no descriptor of the access mode asked.
    #[error("No fd of set {0} matches the access mode {1}")]
    NoMatch(i64, &'static str),
    /// `/dev/fdset/X` where X is not a number.
    #[error("'{0}' does not name a descriptor set")]
    BadPath(String),
    /// `dup` failed.
    #[error("cannot duplicate a descriptor of set {0}: {1}")]
    Dup(i64, io::Error),
}

struct FdsetEntry {
    set: i64,
    fd: OwnedFd,
    opaque: Option<String>,
}

static FDSETS: Mutex<Vec<FdsetEntry>> = Mutex::new(Vec::new());

/// QEMU's `monitor_fdset_add_fd` for `-add-fd`: takes ownership of descriptor `fd` (an open
/// descriptor above stderr that the process inherited) as a member of `set`.
pub fn fdset_add_fd(set: i64, fd: RawFd, opaque: Option<String>) -> Result<(), FdsetError> {
    // SAFETY: F_GETFD only reads the descriptor table.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(FdsetError::BadFd);
    }
    let mut sets = FDSETS.lock();
    if let Some(e) = sets.iter().find(|e| e.fd.as_raw_fd() == fd) {
        return Err(FdsetError::Duplicate(fd, e.set));
    }
    // QEMU's fds are not passed on to children (tap scripts).
    // SAFETY: setting FD_CLOEXEC on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    sets.push(FdsetEntry {
        set,
        // SAFETY: `fd` is open (checked above), was inherited for this set and is owned by
        // no one else in this process (not yet in the table, checked above).
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        opaque,
    });
    Ok(())
}

/// QEMU's `monitor_fdset_add_fd` for QMP `add-fd`: `fd` (received over the monitor's
/// socket) joins set `set`, or the lowest free set; returns the set and the descriptor's
/// number.
pub fn fdset_add_received(
    set: Option<i64>,
    fd: OwnedFd,
    opaque: Option<String>,
) -> (i64, RawFd) {
    let mut sets = FDSETS.lock();
    let id = set.unwrap_or_else(|| (0..).find(|id| !sets.iter().any(|e| e.set == *id)).unwrap_or(0));
    // SAFETY: setting FD_CLOEXEC on an open descriptor this process owns.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let raw = fd.as_raw_fd();
    sets.push(FdsetEntry { set: id, fd, opaque });
    (id, raw)
}

/// QEMU's `qmp_remove_fd`: closes member `fd` of `set`, or every member; false if there
/// was none such.
pub fn fdset_remove(set: i64, fd: Option<RawFd>) -> bool {
    let mut sets = FDSETS.lock();
    let before = sets.len();
    sets.retain(|e| !(e.set == set && fd.is_none_or(|fd| e.fd.as_raw_fd() == fd)));
    sets.len() != before
}

/// A member of a set, as `query-fdsets` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdsetMember {
    /// The descriptor.
    pub fd: RawFd,
    /// `opaque=`, the parent's note.
    pub opaque: Option<String>,
}

/// A set and its members, in the order they were added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdsetInfo {
    /// `set=`.
    pub id: i64,
    /// Its descriptors.
    pub fds: Vec<FdsetMember>,
}

/// The sets with their members (`query-fdsets`), in the order they were first added.
pub fn fdset_list() -> Vec<FdsetInfo> {
    let sets = FDSETS.lock();
    let mut out: Vec<FdsetInfo> = Vec::new();
    for e in sets.iter() {
        let member = FdsetMember {
            fd: e.fd.as_raw_fd(),
            opaque: e.opaque.clone(),
        };
        match out.iter_mut().find(|s| s.id == e.set) {
            Some(set) => set.fds.push(member),
            None => out.push(FdsetInfo {
                id: e.set,
                fds: vec![member],
            }),
        }
    }
    out
}

/// The set `path` names, if it is a `/dev/fdset/N` path.
pub fn fdset_id(path: &str) -> Option<Result<i64, FdsetError>> {
    let rest = path.strip_prefix(FDSET_PREFIX)?;
    Some(rest.parse().map_err(|_| FdsetError::BadPath(path.to_string())))
}

fn access_name(mode: libc::c_int) -> &'static str {
    match mode {
        libc::O_RDONLY => "read-only",
        libc::O_WRONLY => "write-only",
        _ => "read-write",
    }
}

/// QEMU's `monitor_fdset_dup_fd_add` via `qemu_open`: a duplicate of a member of `set`
/// whose access mode is `flags`' (`O_RDONLY`, `O_WRONLY`, `O_RDWR`), with `O_APPEND` and
/// `O_NONBLOCK` from `flags` set on it.
pub fn fdset_open(set: i64, flags: libc::c_int) -> Result<File, FdsetError> {
    let mode = flags & libc::O_ACCMODE;
    let sets = FDSETS.lock();
    let member = sets
        .iter()
        .filter(|e| e.set == set)
        // SAFETY: F_GETFL only reads the open file description's flags.
        .find(|e| unsafe { libc::fcntl(e.fd.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE == mode)
        .ok_or(FdsetError::NoMatch(set, access_name(mode)))?;
    // SAFETY: the member's descriptor stays open while the table's lock is held.
    let borrowed = unsafe { BorrowedFd::borrow_raw(member.fd.as_raw_fd()) };
    let dup = borrowed
        .try_clone_to_owned()
        .map_err(|e| FdsetError::Dup(set, e))?;
    let extra = flags & (libc::O_APPEND | libc::O_NONBLOCK);
    if extra != 0 {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let old = libc::fcntl(dup.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(dup.as_raw_fd(), libc::F_SETFL, old | extra);
        }
    }
    Ok(File::from(dup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::IntoRawFd;

    #[test]
    fn a_set_member_of_the_right_mode_is_duplicated_on_open() {
        let path = std::env::temp_dir().join(format!("qomvm-fdset-{}", std::process::id()));
        std::fs::write(&path, b"start\n").unwrap();
        let wr = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let fd = wr.into_raw_fd();
        fdset_add_fd(77, fd, Some("serial0-source".into())).unwrap();
        assert!(matches!(
            fdset_add_fd(78, fd, None),
            Err(FdsetError::Duplicate(_, 77))
        ));
        assert!(matches!(fdset_add_fd(78, 1, None), Err(FdsetError::BadFd)));
        assert!(matches!(
            fdset_open(77, libc::O_RDONLY),
            Err(FdsetError::NoMatch(77, "read-only"))
        ));
        let mut f = fdset_open(77, libc::O_WRONLY | libc::O_APPEND).unwrap();
        assert_ne!(f.as_raw_fd(), fd);
        f.write_all(b"appended\n").unwrap();
        let mut text = String::new();
        let mut r = File::open(&path).unwrap();
        r.rewind().unwrap();
        r.read_to_string(&mut text).unwrap();
        assert_eq!(text, "start\nappended\n");
        assert!(fdset_list()
            .iter()
            .any(|s| s.id == 77 && s.fds[0].opaque.as_deref() == Some("serial0-source")));
        assert_eq!(fdset_id("/dev/fdset/77").unwrap().unwrap(), 77);
        assert!(fdset_id("/tmp/x").is_none());
        let _ = std::fs::remove_file(path);
    }
}
