//! MSI-X (QEMU's `hw/pci/msix.c`): the capability in a PCI device's configuration space, the
//! vector table and the pending bit array (PBA) in a memory BAR, and delivery of a vector's
//! message to the interrupt controller.
//!
//! A device (its owner) keeps the [`Msix`] that [`Msix::init_exclusive_bar`] returns,
//! forwards every configuration write to [`Msix::config_write`], calls [`Msix::reset`] from
//! its reset and [`Msix::notify`] to raise a vector, from any thread.
//!
//! Delivery: a vector that is enabled and unmasked gets an MSI route in the accelerator
//! and an irqfd on an eventfd this `Msix` owns, so `notify` only writes that eventfd (no
//! lock is taken but the vector's own read lock). Rewriting the table updates the route;
//! masking leaves it unused, disabling MSI-X and reset release it. A masked vector's
//! notification sets its pending bit, delivered when the vector is unmasked. Where the
//! accelerator has no routes or irqfds, vectors go through `send_msi`; where it cannot
//! inject MSIs at all (qtest) they are dropped, logged at most a few times a second.
//!
//! An owner that lets a kernel worker raise vectors itself (virtio-pci for vhost) sets a
//! [`VectorListener`]: it hears of each vector's irqfd eventfd as it comes and goes.
//!
//! Lock order: `Msix::state`, then a vector's gate (`Msix::gates`), then whatever the
//! listener locks; the device's configuration space is never locked while `state` is held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};
use qom::WeakObjectRef;

use crate::core::log_limit::RateLimitedLog;
use crate::core::accel_ops::{AccelIrqError, AccelOps, AccelOpsRef, EventFd, MsiMessage};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::RealizeError;
use crate::core::services::MachineServices;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::{BarKind, PciDevice, PCI_NUM_BARS};

/// Capability ID of MSI-X (`PCI_CAP_ID_MSIX`).
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Size of the capability (QEMU's `MSIX_CAP_LENGTH`).
pub const MSIX_CAP_LENGTH: usize = 12;
/// Message control, 16 bits, in the capability.
pub const PCI_MSIX_FLAGS: usize = 2;
/// Table offset and BAR indicator (BIR), 32 bits, in the capability.
pub const PCI_MSIX_TABLE: usize = 4;
/// PBA offset and BIR, 32 bits, in the capability.
pub const PCI_MSIX_PBA: usize = 8;
/// Message control: table size minus one.
pub const PCI_MSIX_FLAGS_QSIZE: u16 = 0x07ff;
/// Message control: function mask.
pub const PCI_MSIX_FLAGS_MASKALL: u16 = 0x4000;
/// Message control: MSI-X enable.
pub const PCI_MSIX_FLAGS_ENABLE: u16 = 0x8000;
/// Bytes per table entry: address low, address high, data, vector control.
pub const PCI_MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control: the vector is masked.
pub const PCI_MSIX_ENTRY_CTRL_MASKBIT: u32 = 1;

/// The message control byte the guest writes (QEMU's `MSIX_CONTROL_OFFSET`) and its bits.
const MSIX_CONTROL_OFFSET: usize = PCI_MSIX_FLAGS + 1;
const MSIX_ENABLE_MASK: u8 = (PCI_MSIX_FLAGS_ENABLE >> 8) as u8;
const MSIX_MASKALL_MASK: u8 = (PCI_MSIX_FLAGS_MASKALL >> 8) as u8;
/// Dword index of the vector control word in an entry.
const ENTRY_VECTOR_CTRL: usize = 3;

/// Why MSI-X cannot be set up, in QEMU's words where it has them.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// No vectors, or more than the capability can describe.
    #[error("The number of MSI-X vectors is invalid: {0} (1 to 2048)")]
    VectorCount(u16),
    /// A BAR a type 0 header does not have.
    #[error("MSI-X: there is no BAR {0} (a PCI device has BARs 0 to 5)")]
    Bar(u8),
    /// A table and PBA that overlap, come in the wrong order, or are not 8-byte aligned.
    #[error("MSI-X: table at {table_offset:#x} and PBA at {pba_offset:#x} do not fit")]
    Layout {
        /// The table's offset in its BAR.
        table_offset: u64,
        /// The PBA's.
        pba_offset: u64,
    },
}

/// Told, with the MSI-X lock held, each time a vector's direct path changes (QEMU's
/// vector use/release notifiers, `msix_set_vector_notifiers`): `Some(fd)` once a write of
/// `fd` raises the vector (enabled, unmasked, routed: the irqfd eventfd `notify` writes),
/// `None` once it does not (masked, disabled, reset, refused: notifications must go
/// through [`Msix::notify`], which keeps them pending while masked).
pub type VectorListener = Box<dyn Fn(u16, Option<&Arc<EventFd>>) + Send + Sync>;

/// A vector's MSI route and the irqfd that raises it.
struct Route {
    gsi: u32,
    msg: MsiMessage,
    fd: Arc<EventFd>,
}

/// The guest-visible state and the routes, behind `Msix::state`.
struct MsixState {
    /// Message control: MSI-X enable.
    enabled: bool,
    /// Message control: function mask.
    mask_all: bool,
    /// Address low, address high, data, vector control of each vector.
    table: Vec<[u32; 4]>,
    /// Pending bits, 64 vectors a word (the PBA's layout, little-endian).
    pba: Vec<u64>,
    routes: Vec<Option<Route>>,
    /// The accelerator has no MSI routes or irqfds: vectors use `send_msi`.
    no_routes: bool,
}

impl MsixState {
    fn new(nvectors: u16) -> MsixState {
        let n = usize::from(nvectors);
        let mut st = MsixState {
            enabled: false,
            mask_all: false,
            table: vec![[0; 4]; n],
            pba: vec![0; n.div_ceil(64)],
            routes: (0..n).map(|_| None).collect(),
            no_routes: false,
        };
        st.clear();
        st
    }

    /// QEMU's `msix_reset` of the state: control, table (every vector masked) and PBA.
    fn clear(&mut self) {
        self.enabled = false;
        self.mask_all = false;
        for entry in &mut self.table {
            *entry = [0, 0, 0, PCI_MSIX_ENTRY_CTRL_MASKBIT];
        }
        self.pba.fill(0);
    }

    /// QEMU's `msix_function_masked`.
    fn function_masked(&self) -> bool {
        !self.enabled || self.mask_all
    }

    /// QEMU's `msix_is_masked`.
    fn is_masked(&self, v: usize) -> bool {
        self.function_masked() || self.table[v][ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT != 0
    }

    /// QEMU's `msix_get_message`.
    fn message(&self, v: usize) -> MsiMessage {
        let [lo, hi, data, _] = self.table[v];
        MsiMessage {
            address: u64::from(lo) | (u64::from(hi) << 32),
            data,
        }
    }

    fn pending(&self, v: usize) -> bool {
        self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, pending: bool) {
        if pending {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.pba[v / 64] &= !(1 << (v % 64));
        }
    }
}

/// A PCI device's MSI-X: QEMU's `msix_*` state of a `PCIDevice`.
pub struct Msix {
    nvectors: u16,
    /// Offset of the capability in the configuration space (QEMU's `msix_cap`).
    cap: usize,
    table_size: u64,
    pba_offset: u64,
    pba_size: u64,
    /// The device, to update its message control at reset and lower INTx at enable.
    device: WeakObjectRef,
    /// For log lines: the device's type.
    name: String,
    /// The machine's accelerator, once installed.
    accel: Arc<OnceLock<AccelOpsRef>>,
    /// `MsixState::enabled`, readable without the lock: owners check it on each interrupt
    /// to choose between MSI-X and INTx.
    enabled: AtomicBool,
    /// Per vector, the eventfd whose irqfd delivers it while it is enabled and unmasked:
    /// `notify`'s whole path. Written under `state`.
    gates: Box<[RwLock<Option<Arc<EventFd>>>]>,
    /// The owner's listener to gate changes, if it set one.
    listener: OnceLock<VectorListener>,
    state: Mutex<MsixState>,
    log: RateLimitedLog,
}

/// The MSI-X table's handlers: the table at 0, the PBA at `Msix::pba_offset`.
struct MsixBar(Arc<Msix>);

impl MemoryRegionOps for MsixBar {
    fn read(&self, offset: u64, size: u32) -> u64 {
        match (size, offset % u64::from(size.max(1))) {
            (4, 0) => u64::from(self.0.read32(offset)),
            // QEMU's `.impl.max_access_size = 4`: two dword accesses, low first.
            (8, 0) => u64::from(self.0.read32(offset)) | (u64::from(self.0.read32(offset + 4)) << 32),
            _ => {
                self.0.bad_access(offset, size, None);
                0
            }
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        match (size, offset % u64::from(size.max(1))) {
            (4, 0) => self.0.write32(offset, value as u32),
            (8, 0) => {
                self.0.write32(offset, value as u32);
                self.0.write32(offset + 4, (value >> 32) as u32);
            }
            _ => self.0.bad_access(offset, size, Some(value)),
        }
    }
}

impl Msix {
    /// QEMU's `msix_init_exclusive_bar`: the MSI-X capability (ID 0x11) in `dev`'s
    /// configuration space and BAR `bar_nr`, registered on `dev`, holding only the table
    /// (at 0) and the PBA (at 2 KiB, or right after a table larger than that). The BAR is
    /// 4 KiB, or the next power of two that holds both.
    pub fn init_exclusive_bar(
        dev: &PciDevice,
        nvectors: u16,
        bar_nr: u8,
        services: &MachineServices,
    ) -> Result<Arc<Msix>, RealizeError> {
        let table_size = u64::from(nvectors) * PCI_MSIX_ENTRY_SIZE;
        let pba_size = u64::from(nvectors).next_multiple_of(64) / 8;
        let pba_offset = table_size.max(2048);
        let bar_size = (pba_offset + pba_size).max(4096).next_power_of_two();
        let (msix, ops) = Msix::init(dev, nvectors, bar_nr, 0, pba_offset, services)?;
        let region = MemoryRegion::new_io(format!("{}-msix", msix.name), bar_size, ops);
        dev.register_bar(usize::from(bar_nr), BarKind::Mem32, region)?;
        Ok(msix)
    }

    /// QEMU's `msix_init`: the MSI-X capability (ID 0x11) in `dev`'s configuration space
    /// saying the table is at `table_offset` and the PBA at `pba_offset` of BAR `bar_nr`,
    /// which the caller registers: it sends the accesses from `table_offset` on to the
    /// returned handlers (the PBA then at `pba_offset - table_offset` of them).
    pub fn init(
        dev: &PciDevice,
        nvectors: u16,
        bar_nr: u8,
        table_offset: u64,
        pba_offset: u64,
        services: &MachineServices,
    ) -> Result<(Arc<Msix>, Arc<dyn MemoryRegionOps>), RealizeError> {
        if nvectors == 0 || nvectors > PCI_MSIX_FLAGS_QSIZE + 1 {
            return Err(RealizeError::device(MsixError::VectorCount(nvectors)));
        }
        if usize::from(bar_nr) >= PCI_NUM_BARS {
            return Err(RealizeError::device(MsixError::Bar(bar_nr)));
        }
        let table_size = u64::from(nvectors) * PCI_MSIX_ENTRY_SIZE;
        let pba_size = u64::from(nvectors).next_multiple_of(64) / 8;
        // The table first, the PBA after it, both 8-byte aligned (the low bits of the
        // capability's offsets hold the BAR).
        if !table_offset.is_multiple_of(8) || !pba_offset.is_multiple_of(8) || pba_offset < table_offset + table_size {
            return Err(RealizeError::device(MsixError::Layout { table_offset, pba_offset }));
        }
        let cap = dev.add_capability(PCI_CAP_ID_MSIX, MSIX_CAP_LENGTH)?;
        dev.config_set(cap + PCI_MSIX_FLAGS, &(nvectors - 1).to_le_bytes());
        dev.config_set(
            cap + PCI_MSIX_TABLE,
            &(table_offset as u32 | u32::from(bar_nr)).to_le_bytes(),
        );
        dev.config_set(
            cap + PCI_MSIX_PBA,
            &(pba_offset as u32 | u32::from(bar_nr)).to_le_bytes(),
        );
        dev.config_set_wmask(cap + MSIX_CONTROL_OFFSET, MSIX_ENABLE_MASK | MSIX_MASKALL_MASK);

        let name = dev
            .try_object()
            .map_or_else(|| "pci-device".to_string(), |o| o.type_name().to_string());
        let msix = Arc::new(Msix {
            nvectors,
            cap,
            table_size,
            pba_offset: pba_offset - table_offset,
            pba_size,
            device: dev.weak(),
            name,
            accel: services.vm().accel_slot(),
            enabled: AtomicBool::new(false),
            gates: (0..nvectors).map(|_| RwLock::new(None)).collect(),
            listener: OnceLock::new(),
            state: Mutex::new(MsixState::new(nvectors)),
            log: RateLimitedLog::default(),
        });
        let ops: Arc<dyn MemoryRegionOps> = Arc::new(MsixBar(msix.clone()));
        Ok((msix, ops))
    }

    /// The number of vectors (QEMU's `msix_nr_vectors_allocated`).
    pub fn vector_count(&self) -> u16 {
        self.nvectors
    }

    /// Offset of the capability in the configuration space (QEMU's `msix_cap`).
    pub fn capability(&self) -> usize {
        self.cap
    }

    /// Whether the guest set MSI-X enable (QEMU's `msix_enabled`); while it is clear the
    /// device interrupts through INTx.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether every vector is masked as a whole: MSI-X disabled or the function mask set
    /// (QEMU's `msix_function_masked`).
    pub fn is_function_masked(&self) -> bool {
        self.state.lock().function_masked()
    }

    /// Whether `vector` is masked, by its own mask bit or the function's (QEMU's
    /// `msix_is_masked`). Vectors the device does not have are masked.
    pub fn is_masked(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v >= usize::from(self.nvectors) || self.state.lock().is_masked(v)
    }

    /// Whether `vector`'s pending bit is set (QEMU's `msix_is_pending`).
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < usize::from(self.nvectors) && self.state.lock().pending(v)
    }

    /// Sets the owner's [`VectorListener`]; there is one per `Msix`, so a second is
    /// refused (`false`). Vectors already delivered directly are not replayed: the owner
    /// reads them with [`Msix::with_vector_gates`].
    pub fn set_vector_listener(&self, listener: VectorListener) -> bool {
        self.listener.set(listener).is_ok()
    }

    /// Calls `f` with the MSI-X lock held and a lookup of each vector's direct path (what
    /// the listener was last told; `None` for vectors the device does not have), so an
    /// owner can bring something in line with a vector without a listener call
    /// interleaving.
    pub fn with_vector_gates<R>(&self, f: impl FnOnce(&dyn Fn(u16) -> Option<Arc<EventFd>>) -> R) -> R {
        let _st = self.state.lock();
        f(&|v| self.gates.get(usize::from(v)).and_then(|g| g.read().clone()))
    }

    /// QEMU's `msix_notify`: raises `vector`. A masked vector (by itself or the function)
    /// gets its pending bit set instead. Vectors the device does not have (such as
    /// virtio's `VIRTIO_MSI_NO_VECTOR`, 0xffff) are ignored. Callable from any thread.
    pub fn notify(&self, vector: u16) {
        let Some(gate) = self.gates.get(usize::from(vector)) else {
            return;
        };
        if let Some(fd) = &*gate.read() {
            self.signal(fd, vector);
            return;
        }
        let mut st = self.state.lock();
        let v = usize::from(vector);
        if st.is_masked(v) {
            st.set_pending(v, true);
            return;
        }
        self.deliver(&st, v);
    }

    /// The owner's `PciDeviceImpl::config_write` forwards every configuration write here
    /// (QEMU's `msix_write_config`): MSI-X enable and function mask changes.
    pub fn config_write(&self, addr: usize, val: u32, len: usize) {
        let pos = self.cap + MSIX_CONTROL_OFFSET;
        if addr > pos || pos - addr >= len.min(4) {
            return;
        }
        let device = self.device.upgrade();
        let dev = device.as_deref().and_then(|o| o.cast::<PciDevice>());
        let control = match dev {
            Some(dev) => dev.read_config(pos, 1) as u8,
            None => (val >> (8 * (pos - addr))) as u8,
        };
        {
            let mut st = self.state.lock();
            let was = (st.enabled, st.mask_all);
            st.enabled = control & MSIX_ENABLE_MASK != 0;
            st.mask_all = control & MSIX_MASKALL_MASK != 0;
            self.enabled.store(st.enabled, Ordering::Release);
            if (st.enabled, st.mask_all) != was {
                if st.enabled {
                    for v in 0..usize::from(self.nvectors) {
                        self.update_vector(&mut st, v);
                    }
                } else {
                    self.release_routes(&mut st);
                }
            }
            if !st.enabled {
                return;
            }
        }
        // QEMU's `pci_device_deassert_intx`: with MSI-X on, INTx is not used.
        if let Some(dev) = dev {
            dev.set_irq(false);
        }
    }

    /// QEMU's `msix_reset`: MSI-X disabled and unmasked as a function, every vector masked
    /// with a cleared entry, no pending bits, routes and irqfds released.
    pub fn reset(&self) {
        {
            let mut st = self.state.lock();
            self.release_routes(&mut st);
            st.clear();
            self.enabled.store(false, Ordering::Release);
        }
        let device = self.device.upgrade();
        if let Some(dev) = device.as_deref().and_then(|o| o.cast::<PciDevice>()) {
            let pos = self.cap + MSIX_CONTROL_OFFSET;
            let control = dev.read_config(pos, 1) as u8;
            dev.config_set(pos, &[control & !(MSIX_ENABLE_MASK | MSIX_MASKALL_MASK)]);
        }
    }

    /// QEMU's `msix_save`: the table and the pending bits (message control travels with
    /// the configuration space).
    pub fn save_state(&self, s: &mut VmStateSection) {
        let st = self.state.lock();
        let table: Vec<u32> = st.table.iter().flatten().copied().collect();
        s.put("msix_table", table);
        s.put("msix_pba", &st.pba);
    }

    /// QEMU's `msix_load`, after the configuration space is loaded: the table and pending
    /// bits, enable and function mask from the loaded message control, and a route and
    /// irqfd for every vector now unmasked.
    pub fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        let table: Vec<u32> = s.get("msix_table")?;
        let pba: Vec<u64> = s.get("msix_pba")?;
        let n = usize::from(self.nvectors);
        if table.len() != 4 * n || pba.len() != n.div_ceil(64) {
            return Err(VmStateError::Mismatch(format!(
                "{}: {} MSI-X vectors saved, the device has {n}",
                self.name,
                table.len() / 4
            )));
        }
        let device = self.device.upgrade();
        let control = device
            .as_deref()
            .and_then(|o| o.cast::<PciDevice>())
            .map_or(0, |dev| dev.read_config(self.cap + MSIX_CONTROL_OFFSET, 1) as u8);
        let mut st = self.state.lock();
        self.release_routes(&mut st);
        for (entry, saved) in st.table.iter_mut().zip(table.chunks_exact(4)) {
            entry.copy_from_slice(saved);
        }
        st.pba = pba;
        st.enabled = control & MSIX_ENABLE_MASK != 0;
        st.mask_all = control & MSIX_MASKALL_MASK != 0;
        self.enabled.store(st.enabled, Ordering::Release);
        if st.enabled {
            for v in 0..n {
                self.update_vector(&mut st, v);
            }
        }
        Ok(())
    }

    // ----- delivery -----

    fn accel(&self) -> Option<&dyn AccelOps> {
        self.accel.get().map(|a| a.as_ref())
    }

    fn signal(&self, fd: &EventFd, vector: u16) {
        if let Err(e) = fd.write(1) {
            if self.log.allow() {
                log::warn!("{}: MSI-X vector {vector}: eventfd write: {e}", self.name);
            }
        }
    }

    /// Sends `v`'s message now: through its irqfd if it has one, else `send_msi`.
    fn deliver(&self, st: &MsixState, v: usize) {
        if let Some(fd) = &*self.gates[v].read() {
            self.signal(fd, v as u16);
            return;
        }
        let msg = st.message(v);
        let result = match self.accel() {
            Some(accel) => accel.send_msi(msg),
            None => Err(AccelIrqError::Unsupported {
                accel: "no",
                what: "MSI",
            }),
        };
        if let Err(e) = result {
            if self.log.allow() {
                log::info!(
                    "{}: MSI-X vector {v} (address 0x{:x}, data 0x{:x}) dropped: {e}",
                    self.name,
                    msg.address,
                    msg.data
                );
            }
        }
    }

    /// Brings vector `v`'s delivery in line with its state after a change (QEMU's
    /// `msix_handle_mask_update` with virtio-pci's vector (un)mask notifiers): unmasked, it
    /// gets (or updates) its route and irqfd and its pending bit is delivered; masked, its
    /// irqfd goes unused.
    fn update_vector(&self, st: &mut MsixState, v: usize) {
        if st.is_masked(v) {
            self.set_gate(st, v, None);
            return;
        }
        let fd = self.route(st, v);
        self.set_gate(st, v, fd);
        if st.pending(v) {
            st.set_pending(v, false);
            self.deliver(st, v);
        }
    }

    /// Sets vector `v`'s gate (`st`: the caller holds the lock) and tells the listener
    /// when the eventfd changed.
    fn set_gate(&self, _st: &mut MsixState, v: usize, fd: Option<Arc<EventFd>>) {
        let changed = {
            let mut gate = self.gates[v].write();
            let changed = match (&*gate, &fd) {
                (Some(old), Some(new)) => !Arc::ptr_eq(old, new),
                (old, new) => old.is_some() != new.is_some(),
            };
            *gate = fd.clone();
            changed
        };
        if changed {
            if let Some(listener) = self.listener.get() {
                listener(v as u16, fd.as_ref());
            }
        }
    }

    /// Vector `v`'s irqfd, its route added or updated to its current message (QEMU's
    /// `kvm_irqchip_add_msi_route`/`update_msi_route` + `kvm_irqchip_add_irqfd_notifier`);
    /// `None` where the accelerator refuses, and the vector uses `send_msi`.
    fn route(&self, st: &mut MsixState, v: usize) -> Option<Arc<EventFd>> {
        if st.no_routes {
            return None;
        }
        let accel = self.accel()?;
        let msg = st.message(v);
        if let Some(route) = st.routes[v].as_mut() {
            if route.msg == msg {
                return Some(route.fd.clone());
            }
            match accel.update_msi_route(route.gsi, msg) {
                Ok(()) => {
                    route.msg = msg;
                    return Some(route.fd.clone());
                }
                Err(e) => {
                    self.refused(st, v, &e);
                    self.release_route(st, v);
                    return None;
                }
            }
        }
        let gsi = match accel.add_msi_route(msg) {
            Ok(gsi) => gsi,
            Err(e) => {
                self.refused(st, v, &e);
                return None;
            }
        };
        let fd = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                accel.release_msi_route(gsi);
                let e = AccelIrqError::Failed {
                    what: "eventfd",
                    reason: e.to_string(),
                };
                self.refused(st, v, &e);
                return None;
            }
        };
        if let Err(e) = accel.add_irqfd(&fd, gsi) {
            accel.release_msi_route(gsi);
            self.refused(st, v, &e);
            return None;
        }
        st.routes[v] = Some(Route {
            gsi,
            msg,
            fd: fd.clone(),
        });
        Some(fd)
    }

    /// The accelerator refused a route or an irqfd for `v`: without the mechanism at all,
    /// every vector uses `send_msi` from now on; otherwise this one does until it next
    /// changes.
    fn refused(&self, st: &mut MsixState, v: usize, e: &AccelIrqError) {
        if matches!(e, AccelIrqError::Unsupported { .. }) {
            st.no_routes = true;
            log::debug!("{}: MSI-X without irqfds: {e}", self.name);
        } else if self.log.allow() {
            log::warn!("{}: MSI-X vector {v} falls back to injection: {e}", self.name);
        }
    }

    /// Removes vector `v`'s irqfd and route (QEMU's `kvm_irqchip_remove_irqfd_notifier_gsi`
    /// + `kvm_irqchip_release_virq`).
    fn release_route(&self, st: &mut MsixState, v: usize) {
        // The listener hears first, so nothing writes the eventfd once its irqfd is gone.
        self.set_gate(st, v, None);
        let Some(route) = st.routes[v].take() else {
            return;
        };
        let Some(accel) = self.accel() else { return };
        if let Err(e) = accel.remove_irqfd(&route.fd, route.gsi) {
            log::warn!("{}: MSI-X vector {v}: {e}", self.name);
        }
        accel.release_msi_route(route.gsi);
    }

    fn release_routes(&self, st: &mut MsixState) {
        for v in 0..st.routes.len() {
            self.release_route(st, v);
        }
    }

    // ----- the BAR -----

    /// A dword of the table or the PBA (QEMU's `msix_table_mmio_read`,
    /// `msix_pba_mmio_read`); elsewhere in the BAR, 0.
    fn read32(&self, offset: u64) -> u32 {
        let st = self.state.lock();
        if offset < self.table_size {
            let v = (offset / PCI_MSIX_ENTRY_SIZE) as usize;
            return st.table[v][(offset % PCI_MSIX_ENTRY_SIZE / 4) as usize];
        }
        if let Some(pba) = offset.checked_sub(self.pba_offset).filter(|o| *o < self.pba_size) {
            return (st.pba[(pba / 8) as usize] >> (8 * (pba % 8))) as u32;
        }
        drop(st);
        self.bad_access(offset, 4, None);
        0
    }

    /// QEMU's `msix_table_mmio_write`: a table dword, then the vector's delivery follows
    /// its new mask and message. The PBA is read-only.
    fn write32(&self, offset: u64, value: u32) {
        if offset < self.table_size {
            let v = (offset / PCI_MSIX_ENTRY_SIZE) as usize;
            let mut st = self.state.lock();
            st.table[v][(offset % PCI_MSIX_ENTRY_SIZE / 4) as usize] = value;
            self.update_vector(&mut st, v);
        } else if offset
            .checked_sub(self.pba_offset)
            .is_some_and(|o| o < self.pba_size)
        {
            log::debug!("{}: MSI-X PBA write at 0x{offset:x} ignored", self.name);
        } else {
            self.bad_access(offset, 4, Some(u64::from(value)));
        }
    }

    #[cold]
    fn bad_access(&self, offset: u64, size: u32, value: Option<u64>) {
        if !self.log.allow() {
            return;
        }
        match value {
            Some(v) => log::warn!(
                "{}: MSI-X BAR write of 0x{v:x} ({size} bytes) at 0x{offset:x} ignored",
                self.name
            ),
            None => log::warn!(
                "{}: MSI-X BAR read ({size} bytes) at 0x{offset:x} reads 0",
                self.name
            ),
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        self.release_routes(&mut st);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use qom::ObjectRef;

    use super::*;
    use crate::core::accel_ops::RamBlock;
    use crate::core::bus::qbus_new;
    use crate::core::qdev::{qdev_new, qdev_realize};
    use crate::pci::pci::{config, pci_assign_bars, TYPE_PCI_BUS};

    /// An accelerator that records MSI routes, irqfds and injected MSIs; it can refuse
    /// routes (like KVM without `KVM_CAP_IRQ_ROUTING`) or MSIs too (like qtest).
    #[derive(Default)]
    pub(crate) struct RecordingOps {
        refuse_routes: bool,
        refuse_msi: bool,
        state: parking_lot::Mutex<Recorded>,
    }

    #[derive(Default)]
    struct Recorded {
        next_gsi: u32,
        routes: BTreeMap<u32, MsiMessage>,
        /// A clone of each registered irqfd, by GSI: what KVM would read.
        irqfds: BTreeMap<u32, EventFd>,
        sent: Vec<MsiMessage>,
        released: Vec<u32>,
        updates: u32,
    }

    impl AccelOps for RecordingOps {
        fn map_ram(&self, _: RamBlock) -> Result<(), qom::Error> {
            Ok(())
        }
        fn create_vcpu_thread(&self, _: &ObjectRef) -> Result<(), qom::Error> {
            Ok(())
        }
        fn set_irq(&self, _: u32, _: bool) {}
        fn create_in_kernel_pit(&self, _: bool) -> Result<(), qom::Error> {
            Ok(())
        }
        fn vm_start(&self) {}
        fn pause_all(&self) {}
        fn resume_all(&self) {}
        fn reset_vcpus(&self) {}
        fn shutdown(&self) {}
        fn send_msi(&self, msg: MsiMessage) -> Result<(), AccelIrqError> {
            if self.refuse_msi {
                return Err(self.irq_unsupported("MSI"));
            }
            self.state.lock().sent.push(msg);
            Ok(())
        }
        fn add_msi_route(&self, msg: MsiMessage) -> Result<u32, AccelIrqError> {
            if self.refuse_routes {
                return Err(self.irq_unsupported("MSI routes"));
            }
            let mut st = self.state.lock();
            let gsi = 24 + st.next_gsi;
            st.next_gsi += 1;
            st.routes.insert(gsi, msg);
            Ok(gsi)
        }
        fn update_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), AccelIrqError> {
            let mut st = self.state.lock();
            st.updates += 1;
            match st.routes.get_mut(&gsi) {
                Some(m) => {
                    *m = msg;
                    Ok(())
                }
                None => Err(AccelIrqError::Failed {
                    what: "update",
                    reason: format!("no GSI {gsi}"),
                }),
            }
        }
        fn release_msi_route(&self, gsi: u32) {
            let mut st = self.state.lock();
            assert!(
                !st.irqfds.contains_key(&gsi),
                "GSI {gsi} released with its irqfd"
            );
            assert!(st.routes.remove(&gsi).is_some(), "GSI {gsi} released twice");
            st.released.push(gsi);
        }
        fn add_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelIrqError> {
            let mut st = self.state.lock();
            assert!(st.routes.contains_key(&gsi), "irqfd on GSI {gsi} without a route");
            st.irqfds.insert(gsi, fd.try_clone().unwrap());
            Ok(())
        }
        fn remove_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<(), AccelIrqError> {
            self.state.lock().irqfds.remove(&gsi);
            Ok(())
        }
        fn name(&self) -> &'static str {
            "recording"
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    impl RecordingOps {
        /// The GSI routed to `msg`, if one is.
        pub(crate) fn gsi_of(&self, msg: MsiMessage) -> Option<u32> {
            let st = self.state.lock();
            st.routes.iter().find(|(_, m)| **m == msg).map(|(g, _)| *g)
        }
        /// How many times `gsi`'s irqfd was signalled since the last look.
        pub(crate) fn fired(&self, gsi: u32) -> u64 {
            let st = self.state.lock();
            st.irqfds.get(&gsi).map_or(0, |fd| fd.read().unwrap_or(0))
        }
        fn sent(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut self.state.lock().sent)
        }
    }

    /// A PCI device with MSI-X on BAR 2, on a bus of a machine whose accelerator is `ops`;
    /// BARs assigned and decoding, as firmware leaves them.
    struct Rig {
        services: Arc<MachineServices>,
        _parent: ObjectRef,
        dev: ObjectRef,
        msix: Arc<Msix>,
        bar: u64,
    }

    const MSIX_BAR: u8 = 2;

    fn rig(ops: Arc<RecordingOps>, nvectors: u16) -> Rig {
        let services = Arc::new(MachineServices::default());
        services.vm().set_accel_ops(ops).unwrap();
        let parent = qom::object_new(qom::TYPE_CONTAINER).unwrap();
        let bus = qbus_new(TYPE_PCI_BUS, &parent, "pci.0", &services).unwrap();
        // pci-testdev has BARs 0 and 1; MSI-X goes to BAR 2.
        let dev = qdev_new("pci-testdev").unwrap();
        qdev_realize(&dev, Some(&bus)).unwrap();
        let pci = dev.cast::<PciDevice>().unwrap();
        let msix = Msix::init_exclusive_bar(pci, nvectors, MSIX_BAR, &services).unwrap();
        pci_assign_bars(&bus);
        let bar = pci.bar_address(MSIX_BAR.into()).unwrap();
        assert_ne!(bar, 0);
        Rig {
            services,
            _parent: parent,
            dev,
            msix,
            bar,
        }
    }

    impl Rig {
        fn pci(&self) -> &PciDevice {
            self.dev.cast::<PciDevice>().unwrap()
        }
        /// A guest configuration write, forwarded as the owner's `config_write` does.
        fn config_write(&self, addr: usize, val: u32, len: usize) {
            self.pci().write_config(addr, val, len);
            self.msix.config_write(addr, val, len);
        }
        fn control(&self) -> u16 {
            self.pci().read_config(self.msix.capability() + PCI_MSIX_FLAGS, 2) as u16
        }
        fn set_control(&self, bits: u16) {
            let pos = self.msix.capability() + PCI_MSIX_FLAGS;
            self.config_write(pos, u32::from(bits), 2);
        }
        fn read(&self, offset: u64, size: u32) -> u64 {
            self.services.system_memory().read(self.bar + offset, size)
        }
        fn write(&self, offset: u64, value: u64, size: u32) {
            self.services
                .system_memory()
                .write(self.bar + offset, value, size);
        }
        fn entry(&self, vector: u64) -> [u32; 4] {
            let at = vector * PCI_MSIX_ENTRY_SIZE;
            [0, 4, 8, 12].map(|o| self.read(at + o, 4) as u32)
        }
        /// Programs vector `vector`'s message (it stays masked or unmasked as it was).
        fn program(&self, vector: u64, msg: MsiMessage) {
            let at = vector * PCI_MSIX_ENTRY_SIZE;
            self.write(at, msg.address, 8);
            self.write(at + 8, u64::from(msg.data), 4);
        }
        fn set_masked(&self, vector: u64, masked: bool) {
            let at = vector * PCI_MSIX_ENTRY_SIZE + 12;
            self.write(at, u64::from(masked), 4);
        }
        fn pba(&self) -> u64 {
            self.read(2048, 8)
        }
    }

    fn msg(vector: u8) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data: u32::from(vector),
        }
    }

    #[test]
    fn the_capability_and_the_exclusive_bar_are_qemus() {
        let r = rig(Arc::new(RecordingOps::default()), 3);
        let pci = r.pci();
        let cap = r.msix.capability();
        assert_eq!(pci.read_config(config::CAPABILITY_LIST, 1) as usize, cap);
        assert_ne!(pci.read_config(config::STATUS, 2) as u16 & config::STATUS_CAP_LIST, 0);
        assert_eq!(pci.read_config(cap, 1), u32::from(PCI_CAP_ID_MSIX));
        assert_eq!(r.control(), 2, "table size N - 1, disabled");
        assert_eq!(pci.read_config(cap + PCI_MSIX_TABLE, 4), 2, "table at 0 of BAR 2");
        assert_eq!(pci.read_config(cap + PCI_MSIX_PBA, 4), 2048 | 2, "PBA at 2 KiB");
        assert_eq!(r.msix.vector_count(), 3);
        // Only enable and function mask are writable.
        r.set_control(0xffff);
        assert_eq!(r.control(), 0xc002);
        r.set_control(0);
        assert_eq!(r.control(), 2);
        // A 4 KiB memory BAR (sized the way firmware sizes it).
        let bar_reg = config::BAR0 + 4 * 2;
        pci.write_config(bar_reg, 0xffff_ffff, 4);
        assert_eq!(pci.read_config(bar_reg, 4), 0xffff_f000);
        pci.write_config(bar_reg, r.bar as u32, 4);
        // Every vector starts masked, with a zero message.
        for v in 0..3 {
            assert_eq!(r.entry(v), [0, 0, 0, 1]);
            assert!(r.msix.is_masked(v as u16));
        }
        assert!(!r.msix.is_enabled());
        assert!(r.msix.is_function_masked());
    }

    #[test]
    fn large_tables_push_the_pba_and_grow_the_bar() {
        let r = rig(Arc::new(RecordingOps::default()), 2048);
        let cap = r.msix.capability();
        assert_eq!(r.control(), 0x7ff);
        // Table 32 KiB, PBA 256 bytes after it: a 64 KiB BAR.
        assert_eq!(r.pci().read_config(cap + PCI_MSIX_PBA, 4), 0x8000 | 2);
        let bar_reg = config::BAR0 + 4 * 2;
        r.pci().write_config(bar_reg, 0xffff_ffff, 4);
        assert_eq!(r.pci().read_config(bar_reg, 4), 0xffff_0000);

        let services = MachineServices::default();
        let dev = qdev_new("pci-testdev").unwrap();
        let pci = dev.cast::<PciDevice>().unwrap();
        for (n, bar) in [(0, 2), (2049, 2), (1, 6)] {
            let err = Msix::init_exclusive_bar(pci, n, bar, &services)
                .err()
                .unwrap()
                .to_string();
            let expected = if bar == 6 {
                "MSI-X: there is no BAR 6 (a PCI device has BARs 0 to 5)".to_string()
            } else {
                format!("The number of MSI-X vectors is invalid: {n} (1 to 2048)")
            };
            assert_eq!(err, expected);
        }
    }

    #[test]
    fn an_unmasked_vector_gets_a_route_and_an_irqfd_and_pending_bits_wait_for_it() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 4);
        r.program(1, msg(0x41));
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        assert!(r.msix.is_enabled() && !r.msix.is_function_masked());
        assert!(r.msix.is_masked(1), "vectors stay masked until unmasked");
        // Masked: the notification waits in the PBA.
        r.msix.notify(1);
        assert!(r.msix.is_pending(1));
        assert_eq!(r.pba(), 0b10);
        assert_eq!(ops.gsi_of(msg(0x41)), None, "no route while masked");
        // Unmasked: a route, an irqfd, and the pending bit delivered through it.
        r.set_masked(1, false);
        let gsi = ops.gsi_of(msg(0x41)).expect("a route for vector 1");
        assert_eq!(ops.fired(gsi), 1, "the pending notification");
        assert_eq!(r.pba(), 0);
        r.msix.notify(1);
        r.msix.notify(1);
        assert_eq!(ops.fired(gsi), 2);
        assert!(ops.sent().is_empty(), "no injection while the irqfd works");
        // Masked again: the route stays, notifications go to the PBA.
        r.set_masked(1, true);
        r.msix.notify(1);
        assert_eq!(ops.fired(gsi), 0);
        assert_eq!(r.pba(), 0b10);
        r.set_masked(1, false);
        assert_eq!(ops.fired(gsi), 1);
        assert_eq!(ops.gsi_of(msg(0x41)), Some(gsi), "the same route");
        // Other vectors are untouched.
        assert!(r.msix.is_masked(0) && !r.msix.is_pending(0));
    }

    #[test]
    fn the_function_mask_holds_every_vector() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 2);
        r.program(0, msg(0x40));
        r.set_masked(0, false);
        r.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
        assert!(r.msix.is_enabled() && r.msix.is_function_masked());
        assert!(r.msix.is_masked(0));
        r.msix.notify(0);
        assert_eq!(r.pba(), 1);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        let gsi = ops.gsi_of(msg(0x40)).unwrap();
        assert_eq!(ops.fired(gsi), 1);
        assert_eq!(r.pba(), 0);
        // A byte write of the control's high byte works as well.
        let pos = r.msix.capability() + PCI_MSIX_FLAGS + 1;
        r.config_write(pos, 0xc0, 1);
        r.msix.notify(0);
        assert_eq!((ops.fired(gsi), r.pba()), (0, 1));
        r.config_write(pos, 0x80, 1);
        assert_eq!((ops.fired(gsi), r.pba()), (1, 0));
        // Writes elsewhere in the configuration space change nothing.
        r.config_write(config::COMMAND, 0x6, 2);
        assert!(r.msix.is_enabled());
    }

    #[test]
    fn rewriting_an_entry_updates_its_route() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 2);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.program(0, msg(0x40));
        r.set_masked(0, false);
        let gsi = ops.gsi_of(msg(0x40)).unwrap();
        // Unmasked: the data write updates the route in place.
        r.write(8, 0x51, 4);
        assert_eq!(ops.gsi_of(msg(0x51)), Some(gsi));
        // Masked: the route follows when the vector is unmasked again.
        r.set_masked(0, true);
        let updates = ops.state.lock().updates;
        r.program(0, msg(0x52));
        r.write(0, 0xfee0_1000, 4);
        assert_eq!(ops.state.lock().updates, updates, "no update while masked");
        r.set_masked(0, false);
        let expected = MsiMessage {
            address: 0xfee0_1000,
            data: 0x52,
        };
        assert_eq!(ops.gsi_of(expected), Some(gsi));
        assert_eq!(r.entry(0), [0xfee0_1000, 0, 0x52, 0]);
        r.msix.notify(0);
        assert_eq!(ops.fired(gsi), 1);
    }

    #[test]
    fn disabling_releases_the_routes_and_notifications_wait() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 2);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.program(0, msg(0x40));
        r.set_masked(0, false);
        let gsi = ops.gsi_of(msg(0x40)).unwrap();
        r.set_control(0);
        assert!(!r.msix.is_enabled());
        assert_eq!(ops.state.lock().released, [gsi]);
        assert!(ops.state.lock().irqfds.is_empty());
        // QEMU's msix_notify: disabled counts as function-masked.
        r.msix.notify(0);
        assert!(r.msix.is_pending(0));
        assert!(ops.sent().is_empty());
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        let gsi = ops.gsi_of(msg(0x40)).expect("a new route");
        assert_eq!(ops.fired(gsi), 1);
    }

    #[test]
    fn reset_masks_clears_and_releases() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 2);
        r.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
        r.program(0, msg(0x40));
        r.program(1, msg(0x41));
        r.set_masked(0, false);
        r.set_masked(1, false);
        r.msix.notify(1);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.msix.notify(0);
        r.set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
        r.msix.notify(0);
        assert_eq!(r.pba(), 1);
        assert_eq!(ops.state.lock().routes.len(), 2);

        r.msix.reset();
        assert_eq!(r.control(), 1, "enable and function mask cleared");
        assert!(!r.msix.is_enabled());
        assert_eq!(r.pba(), 0);
        for v in 0..2 {
            assert_eq!(r.entry(v), [0, 0, 0, 1]);
        }
        let st = ops.state.lock();
        assert!(st.routes.is_empty() && st.irqfds.is_empty());
        assert_eq!(st.released.len(), 2);
    }

    #[test]
    fn bad_sizes_and_offsets_are_ignored_and_the_pba_is_read_only() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 2);
        r.program(0, msg(0x40));
        // 1- and 2-byte, unaligned, and out-of-table accesses: reads give 0, writes nothing.
        for (offset, size) in [(0, 1), (0, 2), (2, 4), (4, 8), (1, 8), (12, 2)] {
            assert_eq!(r.read(offset, size), 0, "{offset} {size}");
            r.write(offset, 0xffff_ffff, size);
        }
        for offset in [32, 0x400, 2048 + 8, 4092] {
            assert_eq!(r.read(offset, 4), 0, "0x{offset:x}");
            r.write(offset, 0xffff_ffff, 4);
        }
        assert_eq!(r.entry(0), [0xfee0_0000, 0, 0x40, 1]);
        assert_eq!(r.entry(1), [0, 0, 0, 1]);
        // 8-byte reads of an entry: address, then data and control.
        assert_eq!(r.read(0, 8), 0xfee0_0000);
        assert_eq!(r.read(8, 8), (1 << 32) | 0x40);
        // The PBA ignores writes.
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.msix.notify(0);
        r.write(2048, 0, 8);
        r.write(2048, 0, 4);
        assert_eq!(r.pba(), 1);
        r.write(2048, 2, 4);
        assert_eq!(r.pba(), 1);
        assert_eq!(r.read(2052, 4), 0);
        // Vectors the device does not have are ignored and count as masked.
        r.msix.notify(2);
        r.msix.notify(0xffff);
        assert!(r.msix.is_masked(0xffff) && !r.msix.is_pending(0xffff));
        assert_eq!(r.pba(), 1);
    }

    #[test]
    fn without_routes_vectors_are_injected_and_without_injection_dropped() {
        let ops = Arc::new(RecordingOps {
            refuse_routes: true,
            ..Default::default()
        });
        let r = rig(ops.clone(), 2);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.program(0, msg(0x40));
        r.msix.notify(0);
        r.set_masked(0, false);
        assert_eq!(ops.sent(), [msg(0x40)], "the pending bit, injected");
        r.msix.notify(0);
        assert_eq!(ops.sent(), [msg(0x40)]);
        assert!(ops.state.lock().routes.is_empty());

        let qtest_like = Arc::new(RecordingOps {
            refuse_routes: true,
            refuse_msi: true,
            ..Default::default()
        });
        let r = rig(qtest_like.clone(), 2);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        r.program(0, msg(0x40));
        r.set_masked(0, false);
        for _ in 0..100 {
            r.msix.notify(0);
        }
        assert!(!r.msix.is_pending(0), "delivered as far as the accelerator goes");
        assert!(qtest_like.sent().is_empty());
    }

    #[test]
    fn notify_from_many_threads_loses_nothing() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 4);
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        for v in 0..4 {
            r.program(v, msg(0x40 + v as u8));
            r.set_masked(v, false);
        }
        std::thread::scope(|s| {
            for v in 0..4u16 {
                let msix = &r.msix;
                s.spawn(move || {
                    for _ in 0..1000 {
                        msix.notify(v);
                    }
                });
            }
        });
        for v in 0..4 {
            let gsi = ops.gsi_of(msg(0x40 + v)).unwrap();
            assert_eq!(ops.fired(gsi), 1000);
        }
    }

    /// What a listener heard, in order: each vector and the eventfd it was told.
    type Heard = Arc<Mutex<Vec<(u16, Option<Arc<EventFd>>)>>>;

    fn listen(r: &Rig) -> Heard {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let log = heard.clone();
        assert!(r.msix.set_vector_listener(Box::new(move |v, fd| log.lock().push((v, fd.cloned())))));
        assert!(!r.msix.set_vector_listener(Box::new(|_, _| {})), "one listener per Msix");
        heard
    }

    #[test]
    fn the_listener_hears_each_vector_gain_and_lose_its_irqfd() {
        let ops = Arc::new(RecordingOps::default());
        let r = rig(ops.clone(), 4);
        let heard = listen(&r);
        r.program(2, msg(0x42));
        r.set_control(PCI_MSIX_FLAGS_ENABLE);
        assert!(heard.lock().is_empty(), "every vector still masked");
        r.set_masked(2, false);
        let gsi = ops.gsi_of(msg(0x42)).unwrap();
        let fd = {
            let mut h = heard.lock();
            assert_eq!(h.len(), 1);
            let (v, fd) = h.pop().unwrap();
            assert_eq!(v, 2);
            fd.expect("an eventfd for the unmasked vector")
        };
        // Writing it is what KVM reads as the vector's irqfd.
        fd.write(1).unwrap();
        assert_eq!(ops.fired(gsi), 1);
        assert_eq!(r.msix.with_vector_gates(|gate| gate(2)).map(|g| Arc::ptr_eq(&g, &fd)), Some(true));
        assert!(r.msix.with_vector_gates(|gate| gate(1).is_none() && gate(0xffff).is_none()));
        // A new message keeps the route's eventfd: nothing to hear.
        r.program(2, msg(0x52));
        assert!(heard.lock().is_empty());
        // Masked (by the vector, then the function), disabled: told at once, each time
        // it changes.
        let by_vector: [&dyn Fn(bool); 2] = [
            &|masked| r.set_masked(2, masked),
            &|masked| {
                let all = if masked { PCI_MSIX_FLAGS_MASKALL } else { 0 };
                r.set_control(PCI_MSIX_FLAGS_ENABLE | all)
            },
        ];
        for mask in by_vector {
            let (change, back) = (|| mask(true), || mask(false));
            change();
            assert!(matches!(heard.lock().as_slice(), [(2, None)]));
            heard.lock().clear();
            r.msix.notify(2);
            assert!(r.msix.is_pending(2), "what the worker signals meanwhile waits");
            back();
            let h = std::mem::take(&mut *heard.lock());
            assert!(matches!(h.as_slice(), [(2, Some(again))] if Arc::ptr_eq(again, &fd)));
            assert!(!r.msix.is_pending(2));
        }
        r.set_control(0);
        assert!(matches!(heard.lock().as_slice(), [(2, None)]));
        heard.lock().clear();
        // Reset and dropping the Msix release routes that are already unused: silence.
        r.msix.reset();
        assert!(heard.lock().is_empty());
    }
}
