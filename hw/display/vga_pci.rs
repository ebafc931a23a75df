//! `VGA` (QEMU's `hw/display/vga-pci.c`, docs/specs/standard-vga.rst): the standard VGA
//! on PCI, 1234:1111, class 0300. It claims the legacy VGA ports (0x3b0-0x3df), the Bochs
//! VBE ports (0x1ce-0x1d0) and the 0xa0000-0xbffff window (`vga.rs`), and has
//!
//! - BAR 0: video memory (`vgamem_mb`, 16 MiB by default), 32-bit prefetchable memory,
//!   mapped straight into the guest where the accelerator can (the linear framebuffer);
//! - BAR 2 (`mmio=on`): 4 KiB of registers: the VGA ports 0x3c0-0x3df at 0x400 (16-bit
//!   writes set an index and its data at once), the VBE registers at 0x500 (register `n`
//!   at `0x500 + 2n`), and with `qemu-extended-regs=on` QEMU's extended registers at 0x600
//!   (size, and framebuffer byte order at 0x604; the revision is then 2), and with
//!   `edid=on` (the default) the EDID of a monitor preferring `xres` x `yres` at 0x000
//!   (256 bytes: the base block, no extension), which Linux's bochs-drm reads;
//! - the expansion ROM BAR: `romfile`, by default SeaBIOS's `vgabios-stdvga.bin`.
//!
//! One graphic console shows it (QMP/HMP `screendump`, the VNC server), redrawing only
//! the lines whose video memory the accelerator's dirty log or the VMM says were written
//! (`vga_draw::refresh`). It migrates as QEMU's `vga`
//! section with `vga.vram` does: its PCI configuration, the VGA's registers and video
//! memory (`VgaCommon::save_state`), in one versioned section.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Prop};

use crate::core::console::{GraphicHwOps, QemuConsole, Surface};
use crate::core::memory::{MemoryRegion, MemoryRegionOps, RamBacking};
use crate::core::services::MachineServices;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::display::vga::{
    LegacyVgaResources, VbePorts, VgaCommon, VgaIoPorts, VgaLowMem, Vram, VramOps, VBE_DISPI_IOPORT_INDEX,
    VBE_IO_SIZE, VGA_IO_BASE, VGA_IO_SIZE, VGA_LOWMEM_BASE, VGA_LOWMEM_SIZE,
};
use crate::pci::pci::{BarKind, PciDevice, PciDeviceImpl};

/// QEMU's `TYPE_VGA` name of the std VGA.
pub const TYPE_PCI_VGA: &str = "VGA";

/// QEMU's `PCI_VENDOR_ID_QEMU`.
pub const PCI_VENDOR_ID_QEMU: u16 = 0x1234;
/// QEMU's `PCI_DEVICE_ID_QEMU_VGA`.
pub const PCI_DEVICE_ID_QEMU_VGA: u16 = 0x1111;
/// QEMU's `PCI_CLASS_DISPLAY_VGA`.
pub const PCI_CLASS_DISPLAY_VGA: u16 = 0x0300;

/// The MMIO BAR's size and layout (QEMU's `PCI_VGA_*`).
const PCI_VGA_MMIO_SIZE: u64 = 0x1000;
const PCI_VGA_EDID_SIZE: u64 = 0x100;
const PCI_VGA_IOPORT_OFFSET: u64 = 0x400;
const PCI_VGA_IOPORT_SIZE: u64 = 0x20;
const PCI_VGA_BOCHS_OFFSET: u64 = 0x500;
const PCI_VGA_BOCHS_SIZE: u64 = 0x0b * 2;
const PCI_VGA_QEXT_OFFSET: u64 = 0x600;
const PCI_VGA_QEXT_SIZE: u64 = 8;
const PCI_VGA_QEXT_LITTLE_ENDIAN: u32 = 0x1e1e_1e1e;
const PCI_VGA_QEXT_BIG_ENDIAN: u32 = 0xbebe_bebe;

/// QEMU's `PCIVGAState` with the std VGA's properties.
#[derive(qom::Object)]
#[qom(name = TYPE_PCI_VGA)]
pub struct PciVga {
    #[parent]
    parent: PciDevice,
    /// Clamped to 1-512 and rounded up to a power of two, as QEMU's `vga_common_init`.
    #[property(name = "vgamem_mb", default = 16, desc = "Video memory in MiB")]
    vgamem_mb: Prop<u32>,
    #[property(default = true, desc = "on/off")]
    mmio: Prop<bool>,
    #[property(name = "qemu-extended-regs", default = true, desc = "on/off")]
    qemu_extended_regs: Prop<bool>,
    #[property(default = true, desc = "on/off: the EDID at the start of the MMIO BAR")]
    edid: Prop<bool>,
    #[property(default = 0u32, desc = "Width of the EDID's preferred mode (0: 1280)")]
    xres: Prop<u32>,
    #[property(default = 0u32, desc = "Height of the EDID's preferred mode (0: 800)")]
    yres: Prop<u32>,
    vga: OnceLock<Arc<VgaCommon>>,
    console: Mutex<Option<Arc<QemuConsole>>>,
    /// The legacy regions this device claimed, to give back at unrealize.
    legacy: crate::display::vga::LegacyVgaResources,
}

type_init!(PciVga);

impl DeviceImpl for PciVga {
    const CATEGORY: DeviceCategory = DeviceCategory::Display;
    const HOTPLUGGABLE: bool = false;

    fn unrealize(&self, ctx: &DeviceContext) {
        self.legacy.release();
        if let (Some(console), Ok(services)) = (self.console.lock().take(), ctx.machine()) {
            services.consoles().remove(&console);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    /// QEMU's `vga_reset`: the registers back to their power-on values.
    fn reset(&self) {
        if let Some(vga) = self.vga.get() {
            vga.reset();
        }
        DeviceImpl::reset(&self.parent);
    }

    /// QEMU's `vmstate_vga_pci` (the PCI device and `vmstate_vga_common`) with video
    /// memory, plus the BAR layout the properties chose, which the destination must share.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let vga = self.realized_vga()?;
        let mut s = VmStateSection::new(VGA_STATE_VERSION);
        self.parent.save_pci_state(&mut s);
        s.put("mmio", self.mmio.get());
        s.put("qemu_extended_regs", self.qemu_extended_regs.get());
        vga.save_state(&mut s);
        Ok(s)
    }

    /// Loads [`PciVga`]'s section on a destination (before its vCPUs first run): the
    /// VGA's state and video memory, then the configuration space, which maps BAR 0 (and
    /// with it the framebuffer's accelerator slot over the loaded memory) where the
    /// source had it.
    fn load_state(&self, s: &VmStateSection) -> Result<(), VmStateError> {
        s.check_version(VGA_STATE_VERSION, VGA_STATE_VERSION)?;
        let vga = self.realized_vga()?;
        for (field, ours) in [
            ("mmio", self.mmio.get()),
            ("qemu_extended_regs", self.qemu_extended_regs.get()),
        ] {
            let theirs: bool = s.get(field)?;
            if theirs != ours {
                let onoff = |b: bool| if b { "on" } else { "off" };
                let property = field.replace('_', "-");
                return Err(VmStateError::Mismatch(format!(
                    "VGA: {property}={} in the stream, {property}={} here",
                    onoff(theirs),
                    onoff(ours)
                )));
            }
        }
        vga.load_state(s)?;
        self.parent.load_pci_state(s)
    }
}

/// The layout of [`PciVga`]'s section.
const VGA_STATE_VERSION: u32 = 1;

impl PciDeviceImpl for PciVga {
    const VENDOR_ID: u16 = PCI_VENDOR_ID_QEMU;
    const DEVICE_ID: u16 = PCI_DEVICE_ID_QEMU_VGA;
    const CLASS_ID: u16 = PCI_CLASS_DISPLAY_VGA;
    /// QEMU's default subsystem IDs (`pci_set_default_subsystem_id`).
    const SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
    const SUBSYSTEM_ID: u16 = 0x1100;
    const ROMFILE: Option<&'static str> = Some("vgabios-stdvga.bin");

    /// QEMU's `pci_std_vga_realize`.
    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        let (vga, fb) = pci_vga_core(TYPE_PCI_VGA, services, &self.legacy, self.vgamem_mb.get())?;
        let _ = self.vga.set(vga.clone());
        self.register_bar(0, BarKind::Mem32Prefetch, fb)?;
        if self.mmio.get() {
            let qext = self.qemu_extended_regs.get();
            if qext {
                self.config_set(crate::pci::pci::config::REVISION, &[2]);
            }
            let mut regs = VgaMmio::new(vga.clone(), qext);
            if self.edid.get() {
                regs.edid = Some(crate::display::edid::edid_block(self.xres.get(), self.yres.get()));
            }
            let mmio = MemoryRegion::new_io("vga.mmio", PCI_VGA_MMIO_SIZE, Arc::new(regs));
            self.register_bar(2, BarKind::Mem32, mmio)?;
        }
        let console = services
            .consoles()
            .add(ctx.object(), 0, Arc::new(VgaConsole::new(vga, services)));
        *self.console.lock() = Some(console);
        Ok(())
    }
}

/// The VGA of a PCI display device (QEMU's `vga_common_init` and `vga_init`, and the
/// video memory `pci_register_bar` maps): `vgamem_mb` MiB of video memory (clamped to
/// 1-512 and rounded up to a power of two), the legacy ports and window claimed in
/// `legacy` for `owner`, and the framebuffer region for BAR 0.
pub fn pci_vga_core(
    owner: &'static str,
    services: &Arc<MachineServices>,
    legacy: &LegacyVgaResources,
    vgamem_mb: u32,
) -> Result<(Arc<VgaCommon>, Arc<MemoryRegion>), RealizeError> {
    let mb = vgamem_mb.clamp(1, 512).next_power_of_two();
    let vram = Vram::new(u64::from(mb) << 20).map_err(RealizeError::device)?;
    let vga = VgaCommon::new(vram.clone());
    let regions = [
        (
            services.system_io().clone(),
            u64::from(VGA_IO_BASE),
            MemoryRegion::new_io("vga", VGA_IO_SIZE, Arc::new(VgaIoPorts(vga.clone()))),
        ),
        (
            services.system_io().clone(),
            u64::from(VBE_DISPI_IOPORT_INDEX),
            MemoryRegion::new_io("vbe", VBE_IO_SIZE, Arc::new(VbePorts(vga.clone()))),
        ),
        (
            services.system_memory().clone(),
            VGA_LOWMEM_BASE,
            // Its writes only store into video memory: buffered, as QEMU's are.
            MemoryRegion::new_io_coalesced(
                "vga-lowmem",
                VGA_LOWMEM_SIZE,
                Arc::new(VgaLowMem(vga.clone())),
                0..VGA_LOWMEM_SIZE,
            ),
        ),
    ];
    legacy.claim(owner, regions)?;
    let fb = MemoryRegion::new_ram_device(
        "vga.vram",
        vram.size(),
        Arc::new(VramOps(vram.clone())),
        RamBacking {
            host_addr: vram.host_addr(),
            owner: vram.clone(),
        },
    );
    Ok((vga, fb))
}

impl PciVga {
    /// The VGA's state, once realized.
    pub fn vga(&self) -> Option<&Arc<VgaCommon>> {
        self.vga.get()
    }

    fn realized_vga(&self) -> Result<&Arc<VgaCommon>, VmStateError> {
        self.vga
            .get()
            .ok_or_else(|| VmStateError::Host(format!("{TYPE_PCI_VGA} is not realized")))
    }
}

/// The console's view of a VGA.
pub struct VgaConsole {
    vga: Arc<VgaCommon>,
    /// For the accelerator's dirty log (weak: the machine owns its consoles).
    services: std::sync::Weak<MachineServices>,
    /// Whether the accelerator logs the vCPUs' writes to video memory; asked once.
    logged: std::sync::OnceLock<bool>,
    cache: Mutex<crate::display::vga_draw::RenderCache>,
}

impl VgaConsole {
    /// A view of `vga`, whose guest writes `services`' accelerator logs.
    pub fn new(vga: Arc<VgaCommon>, services: &Arc<MachineServices>) -> Self {
        VgaConsole {
            vga,
            services: Arc::downgrade(services),
            logged: std::sync::OnceLock::new(),
            cache: Mutex::new(Default::default()),
        }
    }

    /// Forgets what the last refresh drew: the next one draws everything (after the
    /// console showed something else).
    pub fn invalidate(&self) {
        *self.cache.lock() = Default::default();
    }

    /// The video memory pages the vCPUs wrote since the last call, from the
    /// accelerator's dirty log; `None` when it has none (then all is redrawn).
    fn guest_writes(&self) -> Option<Vec<u64>> {
        let services = self.services.upgrade()?;
        services.flush_coalesced_io();
        let ops = services.accel_ops()?;
        let (host, size) = (self.vga.vram.host_addr(), self.vga.vram.size());
        let logged = *self.logged.get_or_init(|| match ops.log_display_memory(host, size) {
            Ok(()) => true,
            Err(e) => {
                log::info!("{TYPE_PCI_VGA}: whole-screen refreshes: {e}");
                false
            }
        });
        if !logged {
            return None;
        }
        match ops.display_dirty_pages(host, size) {
            Ok(pages) => Some(pages),
            Err(e) => {
                self.vga.guest_error(|| format!("{TYPE_PCI_VGA}: dirty log: {e}"));
                None
            }
        }
    }
}

impl GraphicHwOps for VgaConsole {
    fn set_bios_text_mode(&self, font: &[u8]) -> bool {
        self.vga.set_bios_text_mode(font);
        true
    }

    fn gfx_update(&self) -> Surface {
        if let Some(services) = self.services.upgrade() {
            services.flush_coalesced_io();
        }
        crate::display::vga_draw::render(&self.vga)
    }

    fn gfx_refresh(&self, surface: &mut Arc<Surface>) -> crate::core::console::Redraw {
        let mut cache = self.cache.lock();
        let writes = self.guest_writes();
        crate::display::vga_draw::refresh(&self.vga, &mut cache, writes.as_deref(), surface)
    }
}

/// BAR 2 (QEMU's `vga.mmio` with its subregions; virtio-vga has them at the start of
/// its virtio BAR).
pub struct VgaMmio {
    vga: Arc<VgaCommon>,
    qext: bool,
    /// QEMU's `edid` region at 0x000 (its 256 bytes: this block, then zeros).
    edid: Option<[u8; 128]>,
}

impl VgaMmio {
    /// The registers of `vga`, QEMU's extended ones with `qext`.
    pub fn new(vga: Arc<VgaCommon>, qext: bool) -> Self {
        VgaMmio { vga, qext, edid: None }
    }

    /// Reads the VBE register at byte `offset` of the bochs window.
    fn bochs_read(&self, offset: u64) -> u16 {
        self.vga.vbe_read((offset >> 1) as u16)
    }
}

impl MemoryRegionOps for VgaMmio {
    fn read(&self, offset: u64, size: u32) -> u64 {
        if let Some(edid) = self.edid.as_ref().filter(|_| offset < PCI_VGA_EDID_SIZE) {
            // Bytes, as many as asked (QEMU's region splits wider reads into them).
            return (0..u64::from(size.min(8))).fold(0, |v, i| {
                let byte = edid.get((offset + i) as usize).copied().unwrap_or(0);
                v | (u64::from(byte) << (8 * i))
            });
        }
        if size > 4 {
            // Two 4-byte reads, low first (the registers are at most 4 bytes wide).
            return self.read(offset, 4) | (self.read(offset + 4, 4) << 32);
        }
        let ones = (1u64 << (8 * size)) - 1;
        if (PCI_VGA_IOPORT_OFFSET..PCI_VGA_IOPORT_OFFSET + PCI_VGA_IOPORT_SIZE).contains(&offset) {
            let mut regs = self.vga.regs.lock();
            (0..u64::from(size)).fold(0, |v, i| {
                let port = 0x3c0 + (offset - PCI_VGA_IOPORT_OFFSET + i);
                let byte = if port < 0x3e0 {
                    regs.ioport_read(port as u16)
                } else {
                    0xff
                };
                v | (u64::from(byte) << (8 * i))
            })
        } else if (PCI_VGA_BOCHS_OFFSET..PCI_VGA_BOCHS_OFFSET + PCI_VGA_BOCHS_SIZE).contains(&offset) {
            // 16-bit registers; narrower and wider reads take their bytes.
            let rel = offset - PCI_VGA_BOCHS_OFFSET;
            (0..u64::from(size)).fold(0, |v, i| {
                let at = rel + i;
                let byte = if at < PCI_VGA_BOCHS_SIZE {
                    (self.bochs_read(at & !1) >> (8 * (at & 1))) as u8
                } else {
                    0xff
                };
                v | (u64::from(byte) << (8 * i))
            })
        } else if self.qext
            && (PCI_VGA_QEXT_OFFSET..PCI_VGA_QEXT_OFFSET + PCI_VGA_QEXT_SIZE).contains(&offset)
        {
            if size != 4 {
                self.vga.guest_error(|| format!("VGA: {size}-byte read of extended register 0x{offset:x}"));
                return ones;
            }
            match offset - PCI_VGA_QEXT_OFFSET {
                0 => PCI_VGA_QEXT_SIZE,
                4 => u64::from(if self.vga.regs.lock().big_endian_fb {
                    PCI_VGA_QEXT_BIG_ENDIAN
                } else {
                    PCI_VGA_QEXT_LITTLE_ENDIAN
                }),
                _ => 0,
            }
        } else {
            ones
        }
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if size > 4 {
            self.write(offset, value & 0xffff_ffff, 4);
            self.write(offset + 4, value >> 32, 4);
            return;
        }
        if self.edid.is_some() && offset < PCI_VGA_EDID_SIZE {
            // Read-only.
            return;
        }
        if (PCI_VGA_IOPORT_OFFSET..PCI_VGA_IOPORT_OFFSET + PCI_VGA_IOPORT_SIZE).contains(&offset) {
            // Bytes in little-endian order: an index and its data in one write.
            let mut regs = self.vga.regs.lock();
            for i in 0..u64::from(size) {
                let port = 0x3c0 + (offset - PCI_VGA_IOPORT_OFFSET + i);
                if port < 0x3e0 {
                    regs.ioport_write(port as u16, (value >> (8 * i)) as u8);
                }
            }
        } else if (PCI_VGA_BOCHS_OFFSET..PCI_VGA_BOCHS_OFFSET + PCI_VGA_BOCHS_SIZE).contains(&offset) {
            let rel = offset - PCI_VGA_BOCHS_OFFSET;
            if size == 1 {
                // As QEMU widens a byte write to the 16-bit register.
                let shift = 8 * (rel & 1);
                self.vga.vbe_write((rel >> 1) as u16, ((value & 0xff) << shift) as u16);
                return;
            }
            for i in (0..u64::from(size)).step_by(2) {
                if rel + i < PCI_VGA_BOCHS_SIZE {
                    self.vga
                        .vbe_write(((rel + i) >> 1) as u16, (value >> (8 * i)) as u16);
                }
            }
        } else if self.qext && offset == PCI_VGA_QEXT_OFFSET + 4 && size == 4 {
            match value as u32 {
                PCI_VGA_QEXT_BIG_ENDIAN => self.vga.regs.lock().big_endian_fb = true,
                PCI_VGA_QEXT_LITTLE_ENDIAN => self.vga.regs.lock().big_endian_fb = false,
                _ => {}
            }
        } else {
            self.vga.guest_error(|| {
                format!("VGA: write of 0x{value:x} ({size} bytes) to MMIO BAR offset 0x{offset:x}, dropped")
            });
        }
    }
}
