//! `virtio-gpu-pci` (QEMU's `hw/display/virtio-gpu-pci.c`): the virtio GPU in 2D
//! (`virtio_gpu.rs`) on the virtio-pci transport, virtio 1.0 only (1af4:1050, revision 1),
//! a display controller beside a VGA or alone, with QEMU's properties `max_outputs`,
//! `xres`, `yres`, `edid` and `max_hostmem`. Each output is a graphic console (VNC,
//! `screendump`). The properties and the GPU live in the abstract
//! `virtio-gpu-pci-base`, which `virtio-vga` (`virtio_vga.rs`) shares.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Prop, Size};

use crate::core::console::{GraphicHwOps, QemuConsole};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::display::virtio_gpu::{VirtioGpu, VirtioGpuConf, MAX_SCANOUTS, VIRTIO_ID_GPU};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::VirtioDevice;
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_GPU_PCI`.
pub const TYPE_VIRTIO_GPU_PCI: &str = "virtio-gpu-pci";
/// QEMU's `PCI_CLASS_DISPLAY_OTHER`.
pub const PCI_CLASS_DISPLAY_OTHER: u16 = 0x0380;
/// QEMU's default subsystem of its PCI devices, which a virtio 1.0-only device keeps.
pub const PCI_SUBDEVICE_ID_QEMU: u16 = 0x1100;

/// The abstract parent of `virtio-gpu-pci` and `virtio-vga`: the `virtio-gpu-device`
/// properties QEMU aliases onto both, and the GPU with its consoles. (In QEMU the two
/// share only the aliased properties; here they share the type that carries them.)
pub const TYPE_VIRTIO_GPU_PCI_BASE: &str = "virtio-gpu-pci-base";

/// The GPU's properties and the device, for [`VirtioGpuPci`] and `virtio-vga`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_GPU_PCI_BASE, abstract)]
pub struct VirtioGpuPciBase {
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

type_init!(VirtioGpuPciBase);

impl VirtioGpuPciBase {
    /// QEMU's `virtio_gpu_device_realize` from the properties: the GPU, and a console per
    /// output, output 0's showing `head0` instead of the GPU where given (`virtio-vga`).
    pub fn create_gpu(
        &self,
        ctx: &DeviceContext,
        head0: Option<Head0Ops>,
    ) -> Result<Arc<VirtioGpu>, RealizeError> {
        let props = GpuProps {
            max_outputs: self.max_outputs.get(),
            xres: self.xres.get(),
            yres: self.yres.get(),
            edid: self.edid.get(),
            max_hostmem: self.max_hostmem.get().0,
        };
        self.gpu.create(ctx, props, head0)
    }

    /// The transport under the GPU.
    pub fn proxy(&self) -> &VirtioPciProxy {
        &self.parent
    }
}

impl DeviceImpl for VirtioGpuPciBase {
    const CATEGORY: DeviceCategory = DeviceCategory::Display;

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

impl PciDeviceImpl for VirtioGpuPciBase {}

impl VirtioPciImpl for VirtioGpuPciBase {
    const FORCE_VIRTIO_1: bool = true;

    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        Ok(self.create_gpu(ctx, None)?)
    }

    /// QEMU's GPUs have three vectors unless `vectors` says otherwise.
    fn default_vectors(&self, _device: &dyn VirtioDevice) -> u32 {
        3
    }
}

/// QEMU's `VirtIOGPUPCI`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_GPU_PCI)]
pub struct VirtioGpuPci {
    #[parent]
    parent: VirtioGpuPciBase,
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

/// The `virtio-gpu-device` properties.
struct GpuProps {
    max_outputs: u32,
    xres: u32,
    yres: u32,
    edid: bool,
    max_hostmem: u64,
}

/// The GPU and its consoles.
#[derive(Default)]
struct GpuConsoles {
    gpu: OnceLock<Arc<VirtioGpu>>,
    consoles: Mutex<Vec<Arc<QemuConsole>>>,
}

/// Builds output 0's console view from the GPU (`virtio-vga`'s, which shows its VGA
/// until the driver sets a scanout).
pub type Head0Ops<'a> = &'a dyn Fn(&Arc<VirtioGpu>) -> Arc<dyn GraphicHwOps>;

impl GpuConsoles {
    fn create(&self, ctx: &DeviceContext, props: GpuProps, head0: Option<Head0Ops>) -> Result<Arc<VirtioGpu>, RealizeError> {
        if props.max_outputs > MAX_SCANOUTS {
            return Err(RealizeError::device(VirtioGpuError::MaxOutputs));
        }
        let services = ctx.machine()?;
        let context = services
            .try_main_context()
            .map_err(|e| RealizeError::device(VirtioGpuError::Host(e)))?;
        let gpu = VirtioGpu::new(VirtioGpuConf {
            max_outputs: props.max_outputs,
            xres: props.xres,
            yres: props.yres,
            edid: props.edid,
            max_hostmem: props.max_hostmem,
            context,
        });
        let mut consoles = self.consoles.lock();
        // Output 0's view has a console even without outputs (virtio-vga's VGA).
        let heads = props.max_outputs.max(u32::from(head0.is_some()));
        for head in 0..heads {
            let ops = match head0 {
                Some(make) if head == 0 => make(&gpu),
                _ => gpu.console_ops(head),
            };
            consoles.push(services.consoles().add(ctx.object(), head, ops));
        }
        let _ = self.gpu.set(gpu.clone());
        Ok(gpu)
    }

    /// The consoles go with the device.
    fn unplug(&self, ctx: &DeviceContext) {
        if let Ok(services) = ctx.machine() {
            for console in self.consoles.lock().drain(..) {
                services.consoles().remove(&console);
            }
        }
    }
}

impl DeviceImpl for VirtioGpuPci {
    const DESCRIPTION: Option<&'static str> = Some("Virtio GPU (PCI)");

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        self.parent.save_state()
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        self.parent.load_state(state)
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
        VirtioPciImpl::create_virtio_device(&self.parent, ctx)
    }

    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32 {
        VirtioPciImpl::default_vectors(&self.parent, device)
    }
}
