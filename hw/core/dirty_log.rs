//! Guest RAM the VMM writes itself while a migration runs (QEMU's `memory_region_set_dirty`
//! for DMA): KVM's dirty log sees only the vCPUs' writes, so devices that write guest
//! memory from the VMM (fw_cfg DMA, the PAM's write-through) record the pages here, and
//! the migration sends them again.

/// The granule of dirty tracking (the host's and the stream's page).
pub const PAGE_SIZE: u64 = 4096;

use std::sync::{Arc, Weak};

/// Something else that writes guest memory behind KVM's back and keeps its own log of it
/// (QEMU's `MemoryListener` `log_global_start`/`log_sync`/`log_global_stop`, as vhost
/// uses them): the kernel's vhost-net worker.
pub trait DirtySource: Send + Sync {
    /// A migration starts tracking: log from now on.
    fn start(&self) -> Result<(), DirtySourceError>;
    /// Reports (`mark`, one guest page address each) and clears what was logged.
    fn sync(&self, mark: &mut dyn FnMut(u64));
    /// The migration ended: stop logging.
    fn stop(&self);
}

/// A dirty-page source that could not start logging.
#[derive(Debug, thiserror::Error)]
#[error("cannot log dirty pages: {0}")]
pub struct DirtySourceError(pub String);

/// Guest pages the VMM writes itself (device DMA) while a migration tracks them; KVM's
/// dirty log covers the vCPUs' writes only. [`DirtySource`]s add theirs at each
/// [`DirtyTracker::take`].
#[derive(Default)]
pub struct DirtyTracker {
    active: std::sync::atomic::AtomicBool,
    pages: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
    /// Lock order: `sources`, then a source's own lock, then `pages`.
    sources: parking_lot::Mutex<Vec<Weak<dyn DirtySource>>>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("active", &self.is_active())
            .field("sources", &self.sources.lock().len())
            .finish_non_exhaustive()
    }
}

impl DirtyTracker {
    /// Starts (clearing what was recorded) or stops recording, and the sources' logs
    /// with it. A source that cannot log fails the start (the others are stopped again):
    /// a migration without its pages would corrupt the guest.
    pub fn set_active(&self, on: bool) -> Result<(), DirtySourceError> {
        let mut sources = self.sources.lock();
        sources.retain(|s| s.strong_count() > 0);
        self.pages.lock().clear();
        self.active.store(on, std::sync::atomic::Ordering::SeqCst);
        let live: Vec<Arc<dyn DirtySource>> = sources.iter().filter_map(Weak::upgrade).collect();
        if !on {
            live.iter().for_each(|s| s.stop());
            return Ok(());
        }
        for (i, s) in live.iter().enumerate() {
            if let Err(e) = s.start() {
                live[..i].iter().for_each(|s| s.stop());
                self.active.store(false, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Adds a source (dropped sources leave by themselves); it starts logging at once if
    /// a migration tracks now (QEMU's `vhost_dev_start` with `log_enabled`).
    pub fn add_source(&self, source: Weak<dyn DirtySource>) -> Result<(), DirtySourceError> {
        let mut sources = self.sources.lock();
        sources.retain(|s| s.strong_count() > 0);
        if self.is_active() {
            if let Some(s) = source.upgrade() {
                s.start()?;
            }
        }
        sources.push(source);
        Ok(())
    }

    /// Whether a migration tracks writes now (devices skip the bookkeeping otherwise).
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records a write of `len` bytes at guest address `addr` (one atomic load when no
    /// migration runs).
    pub fn mark(&self, addr: u64, len: u64) {
        if !self.active.load(std::sync::atomic::Ordering::SeqCst) || len == 0 {
            return;
        }
        let first = addr & !(PAGE_SIZE - 1);
        let last = addr.saturating_add(len - 1) & !(PAGE_SIZE - 1);
        let mut pages = self.pages.lock();
        let mut page = first;
        while page <= last {
            pages.insert(page);
            page += PAGE_SIZE;
        }
    }

    /// The pages written since the last call, the sources' logs included.
    pub fn take(&self) -> Vec<u64> {
        let live: Vec<Arc<dyn DirtySource>> =
            self.sources.lock().iter().filter_map(Weak::upgrade).collect();
        let mut logged = Vec::new();
        for s in &live {
            s.sync(&mut |page| logged.push(page & !(PAGE_SIZE - 1)));
        }
        let mut pages = self.pages.lock();
        pages.extend(logged);
        std::mem::take(&mut *pages).into_iter().collect()
    }
}

