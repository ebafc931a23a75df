//! KVM interrupt routing, irqfd and ioeventfd: the KVM side of the accelerator's MSI and
//! eventfd hooks (QEMU's `kvm_irqchip_add_msi_route`, `kvm_irqchip_update_msi_route`,
//! `kvm_irqchip_release_virq`, `kvm_irqchip_commit_routes`, `kvm_pc_setup_irq_routing`,
//! `kvm_send_msi`, `kvm_irqchip_add_irqfd_notifier_gsi` and `kvm_set_ioeventfd_pio/mmio` in
//! `accel/kvm/kvm-all.c` and `target/i386/kvm/kvm.c`).
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, KVM's default routes included, so the
//! table always holds the PIC and I/O APIC pins as QEMU's `kvm_pc_setup_irq_routing` sets
//! them (GSI 0 is the PIT's IRQ 0 on I/O APIC pin 2, as the MADT's interrupt source
//! override says), and MSI routes on the GSIs above the I/O APIC's pins. One lock covers
//! the table and its commit, so concurrent changes reach KVM in order.

use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;

use hw::core::accel_ops::{AccelIrqError, EventFd, IoEventAddr, IoEventSpace, MsiMessage};
use kvm_bindings::{
    kvm_ioeventfd, kvm_ioeventfd_flag_nr_datamatch, kvm_ioeventfd_flag_nr_deassign,
    kvm_ioeventfd_flag_nr_pio, kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::{Cap, VmFd};
use parking_lot::Mutex;

use crate::kvm::kvm_all::errno_text;

/// Pins of the in-kernel I/O APIC: GSIs below this are the irqchip's, MSI routes go above.
pub(crate) const IOAPIC_NUM_PINS: u32 = 24;

/// `KVM_IOEVENTFD` = `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`. kvm-ioctls' wrapper derives
/// the length from the datamatch's type, so it cannot express a length without a
/// datamatch; the ioctl is issued directly.
const KVM_IOEVENTFD: libc::c_ulong = (1 << 30)
    | ((std::mem::size_of::<kvm_ioeventfd>() as libc::c_ulong) << 16)
    | (0xae << 8)
    | 0x79;

/// `KVM_CAP_IOEVENTFD_ANY_LENGTH`, which kvm-ioctls' `Cap` does not list.
const KVM_CAP_IOEVENTFD_ANY_LENGTH: libc::c_ulong = 122;

/// What the kernel offers for interrupts and eventfds, probed once at `kvm_init`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IrqCaps {
    /// GSIs the routing table may use (`KVM_CAP_IRQ_ROUTING`); 0 without routing.
    pub gsi_count: u32,
    /// `KVM_CAP_IRQFD`.
    pub irqfd: bool,
    /// `KVM_CAP_SIGNAL_MSI`.
    pub signal_msi: bool,
    /// `KVM_CAP_IOEVENTFD`.
    pub ioeventfd: bool,
    /// `KVM_CAP_IOEVENTFD_ANY_LENGTH`: length 0 matches writes of any width.
    pub ioeventfd_any_length: bool,
}

impl IrqCaps {
    pub(crate) fn probe(vm: &VmFd) -> IrqCaps {
        IrqCaps {
            gsi_count: u32::try_from(vm.check_extension_int(Cap::IrqRouting)).unwrap_or(0),
            irqfd: vm.check_extension(Cap::Irqfd),
            signal_msi: vm.check_extension(Cap::SignalMsi),
            ioeventfd: vm.check_extension(Cap::Ioeventfd),
            ioeventfd_any_length: vm.check_extension_raw(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0,
        }
    }
}

/// The GSI routing table as qomvm keeps it: the irqchip pins (fixed) and the MSI routes.
#[derive(Debug)]
pub(crate) struct RouteTable {
    /// GSIs below this limit (`KVM_CAP_IRQ_ROUTING`'s count, at most `KVM_MAX_IRQ_ROUTES`).
    gsi_count: u32,
    /// MSI routes by GSI.
    msi: BTreeMap<u32, MsiMessage>,
}

/// QEMU's `kvm_pc_setup_irq_routing(pci_enabled = true)`: (GSI, irqchip, pin).
pub(crate) fn pc_irqchip_routes() -> Vec<(u32, u32, u32)> {
    let mut routes = Vec::new();
    for i in 0..8 {
        if i != 2 {
            routes.push((i, KVM_IRQCHIP_PIC_MASTER, i));
        }
    }
    for i in 8..16 {
        routes.push((i, KVM_IRQCHIP_PIC_SLAVE, i - 8));
    }
    for i in 0..IOAPIC_NUM_PINS {
        match i {
            // The PIT's IRQ 0 reaches I/O APIC pin 2 (the MADT's override); pin 0 is unused.
            0 => routes.push((0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => routes.push((i, KVM_IRQCHIP_IOAPIC, i)),
        }
    }
    routes
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

impl RouteTable {
    pub(crate) fn new(gsi_count: u32) -> RouteTable {
        RouteTable {
            gsi_count: gsi_count.min(KVM_MAX_IRQ_ROUTES as u32),
            msi: BTreeMap::new(),
        }
    }

    /// The lowest free GSI above the I/O APIC's pins (QEMU's `kvm_irqchip_get_virq`), if
    /// one is left below the GSI count and the table has room for another entry.
    fn free_gsi(&self) -> Option<u32> {
        let entries = pc_irqchip_routes().len() + self.msi.len();
        if entries >= KVM_MAX_IRQ_ROUTES {
            return None;
        }
        let mut candidate = IOAPIC_NUM_PINS;
        for &gsi in self.msi.keys() {
            if gsi != candidate {
                break;
            }
            candidate += 1;
        }
        (candidate < self.gsi_count).then_some(candidate)
    }

    /// Every entry, irqchip pins first (what `KVM_SET_GSI_ROUTING` receives).
    pub(crate) fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        pc_irqchip_routes()
            .into_iter()
            .map(|(gsi, chip, pin)| irqchip_entry(gsi, chip, pin))
            .chain(self.msi.iter().map(|(&gsi, &msg)| msi_entry(gsi, msg)))
            .collect()
    }
}

/// The VM's interrupt routing: capabilities and the GSI table behind its lock.
pub(crate) struct KvmIrq {
    pub(crate) caps: IrqCaps,
    /// `None` when the kernel has no GSI routing or refused the pc table at start-up.
    table: Option<Mutex<RouteTable>>,
}

fn failed(what: &'static str, e: kvm_ioctls::Error) -> AccelIrqError {
    AccelIrqError::Failed {
        what,
        reason: errno_text(e.errno()),
    }
}

fn unsupported(what: &'static str) -> AccelIrqError {
    AccelIrqError::Unsupported { accel: "kvm", what }
}

/// `KVM_SET_GSI_ROUTING` with `table`'s entries (QEMU's `kvm_irqchip_commit_routes`).
fn commit(vm: &VmFd, table: &RouteTable) -> Result<(), AccelIrqError> {
    let routing =
        KvmIrqRouting::from_entries(&table.entries()).map_err(|e| AccelIrqError::Failed {
            what: "KVM_SET_GSI_ROUTING",
            reason: format!("{e:?}"),
        })?;
    vm.set_gsi_routing(&routing)
        .map_err(|e| failed("KVM_SET_GSI_ROUTING", e))
}

impl KvmIrq {
    /// Probes the capabilities and installs the pc routing table, right after
    /// `KVM_CREATE_IRQCHIP` (QEMU's `kvm_irqchip_create` -> `kvm_pc_setup_irq_routing`).
    /// Without routing, MSIs still go through `KVM_SIGNAL_MSI` and INTx keeps KVM's
    /// default table.
    pub(crate) fn new(vm: &VmFd) -> KvmIrq {
        let caps = IrqCaps::probe(vm);
        let table = (caps.gsi_count > IOAPIC_NUM_PINS)
            .then(|| RouteTable::new(caps.gsi_count))
            .and_then(|table| match commit(vm, &table) {
                Ok(()) => Some(Mutex::new(table)),
                Err(e) => {
                    log::warn!("kvm: no MSI routes, the pc GSI routing was refused: {e}");
                    None
                }
            });
        KvmIrq { caps, table }
    }

    fn table(&self) -> Result<&Mutex<RouteTable>, AccelIrqError> {
        self.table.as_ref().ok_or_else(|| unsupported("MSI routes"))
    }

    /// QEMU's `kvm_send_msi`.
    pub(crate) fn send_msi(&self, vm: &VmFd, msg: MsiMessage) -> Result<(), AccelIrqError> {
        if !self.caps.signal_msi {
            return Err(unsupported("MSI"));
        }
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        // 0 means the guest's interrupt controller refused the message (a disabled local
        // APIC): the guest's doing, not a failure of the VMM.
        vm.signal_msi(msi)
            .map(|_| ())
            .map_err(|e| failed("KVM_SIGNAL_MSI", e))
    }

    /// QEMU's `kvm_irqchip_add_msi_route` + `kvm_irqchip_commit_routes`.
    pub(crate) fn add_msi_route(&self, vm: &VmFd, msg: MsiMessage) -> Result<u32, AccelIrqError> {
        let mut table = self.table()?.lock();
        let gsi = table.free_gsi().ok_or(AccelIrqError::NoFreeGsi)?;
        table.msi.insert(gsi, msg);
        if let Err(e) = commit(vm, &table) {
            table.msi.remove(&gsi);
            return Err(e);
        }
        Ok(gsi)
    }

    /// QEMU's `kvm_irqchip_update_msi_route` + `kvm_irqchip_commit_routes`.
    pub(crate) fn update_msi_route(
        &self,
        vm: &VmFd,
        gsi: u32,
        msg: MsiMessage,
    ) -> Result<(), AccelIrqError> {
        let mut table = self.table()?.lock();
        let Some(&old) = table.msi.get(&gsi) else {
            return Err(AccelIrqError::Failed {
                what: "KVM_SET_GSI_ROUTING",
                reason: format!("GSI {gsi} is not an MSI route"),
            });
        };
        if old == msg {
            return Ok(());
        }
        table.msi.insert(gsi, msg);
        if let Err(e) = commit(vm, &table) {
            table.msi.insert(gsi, old);
            return Err(e);
        }
        Ok(())
    }

    /// QEMU's `kvm_irqchip_release_virq` + `kvm_irqchip_commit_routes`.
    pub(crate) fn release_msi_route(&self, vm: &VmFd, gsi: u32) {
        let Ok(table) = self.table() else { return };
        let mut table = table.lock();
        if table.msi.remove(&gsi).is_none() {
            log::warn!("kvm: GSI {gsi} released but it is not an MSI route");
            return;
        }
        if let Err(e) = commit(vm, &table) {
            log::warn!("kvm: releasing GSI {gsi}: {e}");
        }
    }

    /// `KVM_IRQFD`, assign or deassign (QEMU's `kvm_irqchip_assign_irqfd`).
    pub(crate) fn irqfd(
        &self,
        vm: &VmFd,
        fd: &EventFd,
        gsi: u32,
        assign: bool,
    ) -> Result<(), AccelIrqError> {
        if !self.caps.irqfd {
            return Err(unsupported("irqfd"));
        }
        if assign {
            vm.register_irqfd(fd, gsi)
        } else {
            vm.unregister_irqfd(fd, gsi)
        }
        .map_err(|e| failed("KVM_IRQFD", e))
    }

    /// `KVM_IOEVENTFD`, assign or deassign (QEMU's `kvm_set_ioeventfd_pio` and
    /// `kvm_set_ioeventfd_mmio`): `len` 0 (any width, without datamatch), 1, 2, 4 or 8.
    pub(crate) fn ioeventfd(
        &self,
        vm: &VmFd,
        at: IoEventAddr,
        fd: &EventFd,
        assign: bool,
    ) -> Result<(), AccelIrqError> {
        const WHAT: &str = "KVM_IOEVENTFD";
        if !self.caps.ioeventfd {
            return Err(unsupported("ioeventfd"));
        }
        match (at.len, at.datamatch) {
            (0, Some(_)) => {
                return Err(AccelIrqError::Failed {
                    what: WHAT,
                    reason: "a datamatch needs a length".into(),
                })
            }
            (0, None) if !self.caps.ioeventfd_any_length => {
                return Err(unsupported("ioeventfd of any length"))
            }
            (0 | 1 | 2 | 4 | 8, _) => {}
            (len, _) => {
                return Err(AccelIrqError::Failed {
                    what: WHAT,
                    reason: format!("length {len} is not 0, 1, 2, 4 or 8"),
                })
            }
        }
        let mut flags = 0;
        if at.datamatch.is_some() {
            flags |= 1 << kvm_ioeventfd_flag_nr_datamatch;
        }
        if at.space == IoEventSpace::Pio {
            flags |= 1 << kvm_ioeventfd_flag_nr_pio;
        }
        if !assign {
            flags |= 1 << kvm_ioeventfd_flag_nr_deassign;
        }
        let args = kvm_ioeventfd {
            datamatch: at.datamatch.unwrap_or(0),
            addr: at.addr,
            len: at.len,
            fd: fd.as_raw_fd(),
            flags,
            ..Default::default()
        };
        // SAFETY: the fd is this VM's, the argument points to a kvm_ioeventfd that lives
        // across the call, and the kernel only reads it; the eventfd stays open while
        // registered (deassigning matches it by fd).
        let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_IOEVENTFD, &args) };
        if ret < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(AccelIrqError::Failed {
                what: WHAT,
                reason: errno_text(errno),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(vector: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data: vector,
        }
    }

    #[test]
    fn the_pc_table_is_qemus() {
        let routes = pc_irqchip_routes();
        // 15 PIC pins (no cascade pin 2) and 23 I/O APIC pins (GSI 2 has none).
        assert_eq!(routes.len(), 15 + 23);
        let of = |gsi| -> Vec<(u32, u32)> {
            routes
                .iter()
                .filter(|r| r.0 == gsi)
                .map(|r| (r.1, r.2))
                .collect()
        };
        assert_eq!(
            of(0),
            [(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_IOAPIC, 2)]
        );
        assert_eq!(of(2), []);
        assert_eq!(
            of(4),
            [(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        assert_eq!(of(9), [(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]);
        assert_eq!(of(23), [(KVM_IRQCHIP_IOAPIC, 23)]);
        assert_eq!(of(24), []);
        let entries = RouteTable::new(4096).entries();
        assert_eq!(entries.len(), routes.len());
        assert!(entries.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    #[test]
    fn msi_routes_take_the_lowest_free_gsi_above_the_ioapic_up_to_the_limit() {
        let mut table = RouteTable::new(27);
        for expected in 24..27 {
            let gsi = table.free_gsi().unwrap();
            assert_eq!(gsi, expected);
            table.msi.insert(gsi, msg(gsi));
        }
        assert_eq!(table.free_gsi(), None, "GSIs 24..26 only");
        table.msi.remove(&25);
        assert_eq!(table.free_gsi(), Some(25), "a released GSI is reused");
        table.msi.insert(25, msg(0x41));
        let entries = table.entries();
        let e = entries.last().unwrap();
        assert_eq!((e.gsi, e.type_), (26, KVM_IRQ_ROUTING_MSI));
        let m = entries.iter().find(|e| e.gsi == 25).unwrap();
        // SAFETY: an MSI entry's union holds `msi`.
        let (lo, hi, data) = unsafe { (m.u.msi.address_lo, m.u.msi.address_hi, m.u.msi.data) };
        assert_eq!((lo, hi, data), (0xfee0_0000, 0, 0x41));
        // The table never exceeds what KVM_SET_GSI_ROUTING accepts.
        assert_eq!(
            RouteTable::new(100_000).gsi_count,
            KVM_MAX_IRQ_ROUTES as u32
        );
    }
}
