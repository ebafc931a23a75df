//! `virtio-vga` (QEMU's `hw/display/virtio-vga.c`): the virtio GPU (`virtio_gpu.rs`) and a
//! standard VGA in one PCI function, 1af4:1050 with the VGA class 0300: what `-vga
//! virtio` and libvirt's primary `<video><model type='virtio'/>` create. Firmware and boot
//! loaders drive the VGA (SeaBIOS's `vgabios-virtio.bin`, the legacy ports and window,
//! the Bochs VBE registers and linear framebuffer); a guest's virtio-gpu driver takes the
//! screen over when it first sets a scanout and gives it back at the device's reset
//! (QEMU's `enable`).
//!
//! - BAR 0: 8 MiB of video memory (QEMU's fixed size for this device), prefetchable;
//! - BAR 2: the std VGA's registers in its first 4 KiB (VGA ports at 0x400, VBE at 0x500,
//!   QEMU's extended registers at 0x600), the virtio 1.0 structures after them
//!   ([`ModernLayout::VGA`]);
//! - BAR 4: MSI-X;
//! - the expansion ROM: `vgabios-virtio.bin`.
//!
//! It migrates as one section: the transport's and the GPU's state with the VGA's
//! registers and video memory.

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::type_init;

use crate::core::console::{GraphicHwOps, Redraw, Surface};
use crate::core::memory::MemoryRegionOps;
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::display::vga::{LegacyVgaResources, VgaCommon};
use crate::display::vga_pci::{pci_vga_core, VgaConsole, VgaMmio, PCI_CLASS_DISPLAY_VGA};
use crate::display::virtio_gpu::{VirtioGpu, VIRTIO_ID_GPU};
use crate::display::virtio_gpu_pci::{VirtioGpuPciBase, PCI_SUBDEVICE_ID_QEMU};
use crate::pci::pci::{BarKind, PciDeviceImpl};
use crate::virtio::virtio::VirtioDevice;
use crate::virtio::virtio_pci::{ModernLayout, VirtioPciImpl, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `TYPE_VIRTIO_VGA`.
pub const TYPE_VIRTIO_VGA: &str = "virtio-vga";

/// QEMU's `virtio_vga_base_realize` sets the VGA's `vram_size_mb` to 8 (no property).
const VIRTIO_VGA_VRAM_MB: u32 = 8;

/// QEMU's `VirtIOVGA`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_VGA)]
pub struct VirtioVga {
    #[parent]
    parent: VirtioGpuPciBase,
    vga: OnceLock<Arc<VgaCommon>>,
    /// The legacy regions this device claimed, to give back at unrealize.
    legacy: LegacyVgaResources,
}

type_init!(VirtioVga);

impl VirtioVga {
    /// The VGA's state, once realized.
    pub fn vga(&self) -> Option<&Arc<VgaCommon>> {
        self.vga.get()
    }

    fn realized_vga(&self) -> Result<&Arc<VgaCommon>, VmStateError> {
        self.vga
            .get()
            .ok_or_else(|| VmStateError::Host(format!("{TYPE_VIRTIO_VGA} is not realized")))
    }
}

impl DeviceImpl for VirtioVga {
    const DESCRIPTION: Option<&'static str> = Some("Virtio VGA");
    const HOTPLUGGABLE: bool = false;

    /// QEMU's `virtio_vga_base_reset_hold`: the GPU (and with it `enable`), then the VGA.
    fn reset(&self) {
        DeviceImpl::reset(&self.parent);
        if let Some(vga) = self.vga.get() {
            vga.reset();
        }
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        self.legacy.release();
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    /// The transport's section with QEMU's `vmstate_virtio_vga_base` (the VGA's
    /// registers) and the VGA's video memory in it.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let vga = self.realized_vga()?;
        let mut s = self.parent.save_state()?;
        vga.save_state(&mut s);
        Ok(s)
    }

    /// The VGA first, then the transport, whose configuration space maps BAR 0 (the
    /// framebuffer's slot over the loaded memory) where the source had it.
    fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        self.realized_vga()?.load_state(s)?;
        self.parent.load_state(s)
    }
}

impl PciDeviceImpl for VirtioVga {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    /// The virtio 1.0 device ID (the transport sets it, as for any modern device).
    const DEVICE_ID: u16 = 0x1040 + VIRTIO_ID_GPU;
    const CLASS_ID: u16 = PCI_CLASS_DISPLAY_VGA;
    const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
    const SUBSYSTEM_ID: u16 = PCI_SUBDEVICE_ID_QEMU;
    const INTERRUPT_PIN: u8 = 1;
    const ROMFILE: Option<&'static str> = Some("vgabios-virtio.bin");
}

impl VirtioPciImpl for VirtioVga {
    const FORCE_VIRTIO_1: bool = true;
    const LAYOUT: ModernLayout = ModernLayout::VGA;

    /// QEMU's `virtio_vga_base_realize`: the VGA and its video memory in BAR 0, then the
    /// GPU, whose output 0 shows the VGA until the GPU is enabled.
    fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let (vga, fb) = pci_vga_core(TYPE_VIRTIO_VGA, services, &self.legacy, VIRTIO_VGA_VRAM_MB)?;
        let realized = self.register_bar(0, BarKind::Mem32Prefetch, fb).and_then(|()| {
            let head0 = |gpu: &Arc<VirtioGpu>| -> Arc<dyn GraphicHwOps> {
                Arc::new(VirtioVgaHead {
                    vga: VgaConsole::new(vga.clone(), services),
                    gpu: Arc::downgrade(gpu),
                    gpu_head: gpu.console_ops(0),
                    showing_gpu: Mutex::new(None),
                })
            };
            self.parent.create_gpu(ctx, Some(&head0))
        });
        match realized {
            Ok(gpu) => {
                let _ = self.vga.set(vga);
                Ok(gpu)
            }
            Err(e) => {
                self.legacy.release();
                Err(e)
            }
        }
    }

    fn default_vectors(&self, device: &dyn VirtioDevice) -> u32 {
        VirtioPciImpl::default_vectors(&self.parent, device)
    }

    /// The std VGA's registers with QEMU's extended ones (`pci_std_vga_mmio_region_init`
    /// with `qext`).
    fn modern_bar_front(&self) -> Option<Arc<dyn MemoryRegionOps>> {
        let vga = self.vga.get()?;
        Some(Arc::new(VgaMmio::new(vga.clone(), true)))
    }
}

/// Output 0: the VGA until the GPU is enabled, then the GPU's scanout (QEMU's
/// `virtio_vga_base_ops`).
struct VirtioVgaHead {
    vga: VgaConsole,
    gpu: Weak<VirtioGpu>,
    gpu_head: Arc<dyn GraphicHwOps>,
    /// Which of the two the last picture was (none yet).
    showing_gpu: Mutex<Option<bool>>,
}

impl VirtioVgaHead {
    fn gpu_enabled(&self) -> bool {
        self.gpu.upgrade().is_some_and(|gpu| gpu.enabled())
    }
}

impl GraphicHwOps for VirtioVgaHead {
    fn set_bios_text_mode(&self, font: &[u8]) -> bool {
        self.vga.set_bios_text_mode(font)
    }

    fn gfx_update(&self) -> Surface {
        if self.gpu_enabled() {
            self.gpu_head.gfx_update()
        } else {
            self.vga.gfx_update()
        }
    }

    /// A switch between the two redraws everything from the one shown now.
    fn gfx_refresh(&self, surface: &mut Arc<Surface>) -> Redraw {
        let gpu = self.gpu_enabled();
        let switched = self.showing_gpu.lock().replace(gpu) != Some(gpu);
        match (gpu, switched) {
            (true, true) => {
                *surface = Arc::new(self.gpu_head.gfx_update());
                Redraw::Full
            }
            (true, false) => self.gpu_head.gfx_refresh(surface),
            (false, _) => {
                if switched {
                    self.vga.invalidate();
                }
                self.vga.gfx_refresh(surface)
            }
        }
    }
}
