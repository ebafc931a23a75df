//! Image locks compatible with QEMU's file-posix driver (`raw_apply_lock_bytes`,
//! `raw_check_lock_bytes`): Linux open-file-description byte locks on the image itself.
//!
//! For each permission bit `b` (QEMU's `BLK_PERM_*`: consistent read = 0, write = 1,
//! write unchanged = 2, resize = 3) a user holds a shared lock on byte `100 + b` while it
//! has the permission, and on byte `200 + b` while it does not share it. Opening checks
//! that nobody holds `200 + b` for a permission it wants, nor `100 + b` for one it does not
//! share; so QEMU, `qemu-io`, `qemu-img` and qomvm all see each other's locks.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::BlockError;

/// `BLK_PERM_CONSISTENT_READ`.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// `BLK_PERM_WRITE`.
pub const PERM_WRITE: u32 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// `BLK_PERM_RESIZE`.
pub const PERM_RESIZE: u32 = 1 << 3;
/// `BLK_PERM_ALL`.
pub const PERM_ALL: u32 = 0xf;

/// QEMU's `LOCK_BASE_PERM`.
const LOCK_BASE_PERM: i64 = 100;
/// QEMU's `LOCK_BASE_SHARED`.
const LOCK_BASE_SHARED: i64 = 200;

/// QEMU's `bdrv_perm_names` for one bit.
fn perm_name(bit: u32) -> &'static str {
    match bit {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// The locks one open image holds: its own descriptor, so that the locks belong to this
/// open file description alone and go when it is dropped.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    /// `locking=off` (QEMU's file-posix option): the descriptor is kept, nothing is locked.
    enabled: bool,
}

/// `struct flock` for one byte.
fn flock_byte(kind: libc::c_short, offset: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset;
    fl.l_len = 1;
    fl
}

impl ImageLock {
    /// Takes the locks for `perm` and `shared` on `path` and checks nobody else's conflict,
    /// as QEMU's `raw_handle_perm_lock` does at open. The errors have QEMU's text.
    pub fn acquire(path: &Path, perm: u32, shared: u32) -> Result<ImageLock, BlockError> {
        Self::acquire_if(path, perm, shared, true)
    }

    /// [`ImageLock::acquire`], or with `locking` false (`locking=off`) the descriptor
    /// alone: no lock is taken or checked, now or at later updates.
    pub fn acquire_if(
        path: &Path,
        perm: u32,
        shared: u32,
        locking: bool,
    ) -> Result<ImageLock, BlockError> {
        let file = File::open(path).map_err(|e| BlockError::open(path, e))?;
        let lock = ImageLock {
            file,
            enabled: locking,
        };
        lock.update(path, perm, shared)?;
        Ok(lock)
    }

    /// Another handle on the same open file description: its locks are this one's (a
    /// node handing its file to the node above without a moment unlocked).
    pub fn try_clone(&self) -> std::io::Result<ImageLock> {
        Ok(ImageLock {
            file: self.file.try_clone()?,
            enabled: self.enabled,
        })
    }

    /// Changes the held permissions in place (QEMU's `raw_handle_perm_lock` on a
    /// permission change): bytes no longer needed are unlocked, new ones locked, then
    /// checked against everyone else. `path` is for the error text.
    pub fn update(&self, path: &Path, perm: u32, shared: u32) -> Result<(), BlockError> {
        if !self.enabled {
            return Ok(());
        }
        let kind = |held: bool| {
            if held {
                libc::F_RDLCK as libc::c_short
            } else {
                libc::F_UNLCK as libc::c_short
            }
        };
        for bit in 0..4 {
            self.set(kind(perm & (1 << bit) != 0), LOCK_BASE_PERM + bit as i64)?;
            self.set(
                kind(shared & (1 << bit) == 0),
                LOCK_BASE_SHARED + bit as i64,
            )?;
        }
        // QEMU's order: every permission wanted, then every permission not shared.
        for bit in 0..4 {
            if perm & (1 << bit) != 0 && self.held_by_other(LOCK_BASE_SHARED + bit as i64)? {
                return Err(BlockError::Locked {
                    what: format!("Failed to get \"{}\" lock", perm_name(bit)),
                    path: path.display().to_string(),
                });
            }
        }
        for bit in 0..4 {
            if shared & (1 << bit) == 0 && self.held_by_other(LOCK_BASE_PERM + bit as i64)? {
                return Err(BlockError::Locked {
                    what: format!("Failed to get shared \"{}\" lock", perm_name(bit)),
                    path: path.display().to_string(),
                });
            }
        }
        Ok(())
    }

    fn set(&self, kind: libc::c_short, offset: i64) -> Result<(), BlockError> {
        let fl = flock_byte(kind, offset);
        // SAFETY: F_OFD_SETLK reads the `flock` we pass, which lives across the call; the
        // descriptor is ours and open.
        let ret = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if ret < 0 {
            return Err(BlockError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// QEMU's `qemu_lock_fd_test` for an exclusive lock on one byte: whether another open
    /// file description holds a lock there.
    fn held_by_other(&self, offset: i64) -> Result<bool, BlockError> {
        let mut fl = flock_byte(libc::F_WRLCK as libc::c_short, offset);
        // SAFETY: F_OFD_GETLK reads and writes the `flock` we pass, a valid exclusive
        // borrow for the call; the descriptor is ours and open.
        let ret = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if ret < 0 {
            return Err(BlockError::Io(std::io::Error::last_os_error()));
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}
