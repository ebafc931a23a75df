//! `virtio-rng-pci` (QEMU's `hw/virtio/virtio-rng-pci.c`): the virtio entropy device on
//! the virtio-pci transport, with QEMU's properties `rng` (an `rng-backend`; without it an
//! implicit `rng-builtin`, the device's child `default-backend`), `max-bytes` and `period`.

use std::sync::Arc;

use qom::{type_init, Prop};

use crate::backends::rng::{EntropySource, RngBackend};
use crate::backends::rng_builtin::TYPE_RNG_BUILTIN;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::{device_id, VirtioDevice};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};
use crate::virtio::virtio_rng::{VirtioRng, VirtioRngConf};

/// QEMU's `TYPE_VIRTIO_RNG_PCI`.
pub const TYPE_VIRTIO_RNG_PCI: &str = "virtio-rng-pci";

/// QEMU's `VirtIORngPCI` with the `virtio-rng-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_RNG_PCI)]
pub struct VirtioRngPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(desc = "ID or path of the rng-backend (default: a built-in one)")]
    rng: Prop<Option<String>>,
    /// 2^63 - 1 bytes a period: no limit in practice (QEMU's default).
    #[property(name = "max-bytes", default = i64::MAX as u64, desc = "Most bytes served per period")]
    max_bytes: Prop<u64>,
    #[property(default = 1 << 16, desc = "Rate-limit period in milliseconds")]
    period: Prop<u32>,
}

type_init!(VirtioRngPci);

/// Errors of `virtio-rng-pci`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioRngError {
    /// `period=0`.
    #[error("'period' parameter expects a positive integer")]
    Period,
    /// `max-bytes` above `i64::MAX`.
    #[error("'max-bytes' parameter must be non-negative, and less than 2^63")]
    MaxBytes,
    /// `rng=` names nothing.
    #[error("Device '{0}' not found")]
    NotFound(String),
    /// `rng=` names an object that is not an rng backend.
    #[error("Invalid parameter type for 'rng', expected: rng-backend")]
    NotBackend,
    /// The backend named has not been opened.
    #[error("'rng' parameter expects a valid object")]
    NotOpened,
    /// The implicit backend or the device's timer could not be made.
    #[error("{0}")]
    Internal(String),
}

impl DeviceImpl for VirtioRngPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Misc;
    const DESCRIPTION: Option<&'static str> = Some("Virtio RNG (PCI)");

    /// The transport's and the device's state (see `VirtioPciProxy::save_virtio_state`).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }
}

impl PciDeviceImpl for VirtioRngPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// Transitional virtio-rng (QEMU's `PCI_DEVICE_ID_VIRTIO_RNG`).
    const DEVICE_ID: u16 = 0x1005;
    /// QEMU's `PCI_CLASS_OTHERS`.
    const CLASS_ID: u16 = 0x00ff;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = device_id::RNG;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioRngPci {
    /// QEMU's `virtio_rng_device_realize`.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        if self.period.get() == 0 {
            return Err(RealizeError::device(VirtioRngError::Period));
        }
        if i64::try_from(self.max_bytes.get()).is_err() {
            return Err(RealizeError::device(VirtioRngError::MaxBytes));
        }
        let source = self.backend(ctx.object()).map_err(RealizeError::device)?;
        let context = services
            .try_main_context()
            .map_err(|e| RealizeError::device(VirtioRngError::Internal(e.to_string())))?;
        let device = VirtioRng::new(VirtioRngConf {
            source,
            max_bytes: self.max_bytes.get(),
            period_ms: self.period.get(),
            context,
        })
        .map_err(|e| RealizeError::device(VirtioRngError::Internal(e.to_string())))?;
        Ok(Arc::new(device))
    }
}

impl VirtioRngPci {
    /// The source of `rng=`, or of a new `rng-builtin` child as QEMU makes one.
    fn backend(&self, obj: &qom::ObjectRef) -> Result<Arc<dyn EntropySource>, VirtioRngError> {
        let backend = match self.rng.get() {
            Some(name) => qom::resolve_path(&qom::object_get_root(), &name)
                .map_err(|_| VirtioRngError::NotFound(name.clone()))?,
            None => {
                let internal = |e: qom::Error| VirtioRngError::Internal(e.to_string());
                let backend = qom::object_new(TYPE_RNG_BUILTIN).map_err(internal)?;
                if let Some(uc) = backend.interface::<dyn qom::UserCreatable>() {
                    uc.complete().map_err(internal)?;
                }
                if obj.child("default-backend").is_none() {
                    obj.add_child("default-backend", &backend).map_err(internal)?;
                }
                backend
            }
        };
        let rng = backend
            .cast::<RngBackend>()
            .ok_or(VirtioRngError::NotBackend)?;
        rng.source().ok_or(VirtioRngError::NotOpened)
    }
}
