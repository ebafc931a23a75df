//! Guest RAM the VMM writes itself while a migration runs (QEMU's `memory_region_set_dirty`
//! for DMA): KVM's dirty log sees only the vCPUs' writes, so devices that write guest
//! memory from the VMM (fw_cfg DMA, the PAM's write-through) record the pages here, and
//! the migration sends them again.

/// The granule of dirty tracking (the host's and the stream's page).
pub const PAGE_SIZE: u64 = 4096;

/// Guest pages the VMM writes itself (device DMA) while a migration tracks them; KVM's
/// dirty log covers the vCPUs' writes only.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    active: std::sync::atomic::AtomicBool,
    pages: parking_lot::Mutex<std::collections::BTreeSet<u64>>,
}

impl DirtyTracker {
    /// Starts (clearing what was recorded) or stops recording.
    pub fn set_active(&self, on: bool) {
        self.pages.lock().clear();
        self.active.store(on, std::sync::atomic::Ordering::SeqCst);
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

    /// The pages written since the last call.
    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.pages.lock()).into_iter().collect()
    }
}

