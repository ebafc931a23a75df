//! `virtio-gpu-pci` (QEMU's `hw/display/virtio-gpu-pci.c`): the virtio GPU in 2D
//! (`virtio_gpu.rs`) on the virtio-pci transport, virtio 1.0 only (1af4:1050, revision 1),
//! a display controller beside a VGA or alone, with QEMU's properties `max_outputs`,
//! `xres`, `yres`, `edid` and `max_hostmem`. Each output is a graphic console (VNC,
//! `screendump`).

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Prop, Size};

use crate::core::console::QemuConsole;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::display::virtio_gpu::{VirtioGpu, VirtioGpuConf, MAX_SCANOUTS, VIRTIO_ID_GPU};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::VirtioDevice;
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_GPU_PCI`.
pub const TYPE_VIRTIO_GPU_PCI: &str = "virtio-gpu-pci";
/// QEMU's `PCI_CLASS_DISPLAY_OTHER`.
const PCI_CLASS_DISPLAY_OTHER: u16 = 0x0380;
/// QEMU's default subsystem of its PCI devices, which a virtio 1.0-only device keeps.
const PCI_SUBDEVICE_ID_QEMU: u16 = 0x1100;

/// QEMU's `VirtIOGPUPCI` with the `virtio-gpu-device` properties it aliases.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_GPU_PCI)]
pub struct VirtioGpuPci {
    #[parent]
    parent: VirtioPciProxy,
    #[property(default = 1, desc = "Number of outputs (scanouts), at most 16")]
    max_outputs: Prop<u32>,
    #[property(default = 1280, desc = "Width of the mode the outputs offer")]
    xres: Prop<u32>,
    #[property(default = 800, desc = "Height of the mode the outputs offer")]
    yres: Prop<u32>,
    #[property(default = true, desc = "on/off: offer each output's EDID")]
    edid: Prop<bool>,
    #[property(default = Size(256 << 20), desc = "Most memory the guest's resources may take")]
    max_hostmem: Prop<Size>,
    gpu: GpuConsoles,
}

type_init!(VirtioGpuPci);

/// Errors of the GPU's properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioGpuError {
    /// `max_outputs` above 16.
    #[error("invalid max_outputs > {MAX_SCANOUTS}")]
    MaxOutputs,
    /// The machine has no main loop for the queues.
    #[error("{0}")]
    Host(std::io::Error),
}

/// The GPU and its consoles, shared with `virtio-vga`.
#[derive(Default)]
pub struct GpuConsoles {
    gpu: OnceLock<Arc<VirtioGpu>>,
    consoles: Mutex<Vec<Arc<QemuConsole>>>,
}

impl GpuConsoles {
    /// QEMU's `virtio_gpu_device_realize`: the device, and a console per output unless
    /// the caller shows output 0 itself (`virtio-vga`).
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        ctx: &DeviceContext,
        max_outputs: u32,
        xres: u32,
        yres: u32,
        edid: bool,
        max_hostmem: u64,
    ) -> Result<Arc<VirtioGpu>, RealizeError> {
        if max_outputs > MAX_SCANOUTS {
            return Err(RealizeError::device(VirtioGpuError::MaxOutputs));
        }
        let services = ctx.machine()?;
        let context = services
            .try_main_context()
            .map_err(|e| RealizeError::device(VirtioGpuError::Host(e)))?;
        let gpu = VirtioGpu::new(VirtioGpuConf {
            max_outputs,
            xres,
            yres,
            edid,
            max_hostmem,
            context,
        });
        let mut consoles = self.consoles.lock();
        for head in 0..max_outputs {
            consoles.push(services.consoles().add(ctx.object(), head, gpu.console_ops(head)));
        }
        let _ = self.gpu.set(gpu.clone());
        Ok(gpu)
    }

    /// The consoles go with the device.
    pub fn unplug(&self, ctx: &DeviceContext) {
        if let Ok(services) = ctx.machine() {
            for console in self.consoles.lock().drain(..) {
                services.consoles().remove(&console);
            }
        }
    }

    /// The GPU, once realized.
    pub fn gpu(&self) -> Option<&Arc<VirtioGpu>> {
        self.gpu.get()
    }
}

impl DeviceImpl for VirtioGpuPci {
    const CATEGORY: DeviceCategory = DeviceCategory::Display;
    const DESCRIPTION: Option<&'static str> = Some("Virtio GPU (PCI)");

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_virtio_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_virtio_state(state)
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(&self.parent, ctx);
        self.gpu.unplug(ctx);
    }
}

impl PciDeviceImpl for VirtioGpuPci {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// The virtio 1.0 device ID (the transport sets it, as for any modern device).
    const DEVICE_ID: u16 = 0x1040 + VIRTIO_ID_GPU;
    const CLASS_ID: u16 = PCI_CLASS_DISPLAY_OTHER;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = PCI_SUBDEVICE_ID_QEMU;
    const INTERRUPT_PIN: u8 = 1;
}

impl VirtioPciImpl for VirtioGpuPci {
    const FORCE_VIRTIO_1: bool = true;

    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let gpu = self.gpu.create(
            ctx,
            self.max_outputs.get(),
            self.xres.get(),
            self.yres.get(),
            self.edid.get(),
            self.max_hostmem.get().0,
        )?;
        Ok(gpu)
    }

    /// QEMU's `virtio-gpu-pci` has three vectors unless `vectors` says otherwise.
    fn default_vectors(&self, _device: &dyn VirtioDevice) -> u32 {
        3
    }
}
