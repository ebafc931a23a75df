//! `piix3-ide` (QEMU's `hw/ide/piix.c`): the PIIX3's IDE function at 00:01.1 (8086:7010),
//! in legacy mode: the primary channel at ports 0x1f0-0x1f7 and 0x3f6 on ISA IRQ 14, the
//! secondary at 0x170-0x177 and 0x376 on IRQ 15, and the bus-master DMA registers of both
//! in BAR 4. Its buses `ide.0` and `ide.1` take `ide-hd` and `ide-cd`.

use std::sync::{Arc, OnceLock};

use qom::type_init;

use crate::core::bus::qbus_new;
use crate::core::irq::{GsiRouter, IrqLine};
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::ide::core::{CommandBlockPorts, ControlPort, IdeBus, IdeChannel, TYPE_IDE_BUS};
use crate::pci::pci::{
    config, BarKind, PciDevice, PciDeviceImpl, INTERFACE_CONVENTIONAL_PCI_DEVICE,
};

/// QEMU's `TYPE_PIIX3_IDE`.
pub const TYPE_PIIX3_IDE: &str = "piix3-ide";

/// The legacy channels: command block, control block, ISA IRQ.
const CHANNELS: [(u16, u16, u32); 2] = [(0x1f0, 0x3f6, 14), (0x170, 0x376, 15)];

/// Bytes of BAR 4: eight bus-master registers per channel.
const BMDMA_SIZE: u64 = 16;

/// Where the channels' run-state handler runs: above the block layer's flush (priority 0),
/// which must come after the disks' devices went quiet (as virtio-pci's).
const CHANGE_HANDLER_PRIORITY: i32 = 10;

/// The IDE timing registers a driver programs (IDETIM, SIDETIM): kept, not acted on.
const TIMING_REGS: std::ops::Range<usize> = 0x40..0x48;

/// QEMU's `PCIIDEState` for the PIIX3.
#[derive(qom::Object)]
#[qom(name = TYPE_PIIX3_IDE, interfaces = [INTERFACE_CONVENTIONAL_PCI_DEVICE])]
pub struct Piix3Ide {
    #[parent]
    parent: PciDevice,
    channels: OnceLock<[Arc<IdeChannel>; 2]>,
    /// Finishes the transfers when the VM stops (see `pci_realize`).
    change_handler: OnceLock<ChangeHandlerId>,
}

type_init!(Piix3Ide);

impl Piix3Ide {
    /// What firmware does to the function before an OS runs (SeaBIOS's `piix_ide_setup`):
    /// both channels' decoding on (IDETIM bit 15), without which Linux's ata_piix takes
    /// the ports for disabled. The board calls it when it boots a kernel directly.
    pub fn firmware_setup(&self) {
        for reg in [0x40, 0x42] {
            self.parent.write_config(reg, 0x8000, 2);
        }
    }

    /// The two channels, once realized.
    pub fn channels(&self) -> Option<&[Arc<IdeChannel>; 2]> {
        self.channels.get()
    }
}

/// BAR 4: each channel's command, status and descriptor table registers.
struct BmdmaPorts([Arc<IdeChannel>; 2]);

impl MemoryRegionOps for BmdmaPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        (0..u64::from(size.min(8)))
            .map(|i| {
                let at = offset + i;
                let ch = &self.0[usize::from(at >= 8)];
                u64::from(ch.bm_read(at % 8)) << (8 * i)
            })
            .sum()
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in 0..u64::from(size.min(8)) {
            let at = offset + i;
            if at < BMDMA_SIZE {
                self.0[usize::from(at >= 8)].bm_write(at % 8, (value >> (8 * i)) as u8);
            }
        }
    }
}

impl DeviceImpl for Piix3Ide {
    const DESCRIPTION: Option<&'static str> = Some("IDE controller of the PIIX3 (legacy ports)");
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;
    const USER_CREATABLE: bool = false;
    const HOTPLUGGABLE: bool = false;

    fn reset(&self) {
        if let Some(channels) = self.channels.get() {
            for ch in channels {
                ch.reset();
            }
        }
        DeviceImpl::reset(&self.parent);
        self.update_bus_master();
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some(id), Ok(services)) = (self.change_handler.get(), ctx.machine()) {
            services.vm().remove_change_handler(*id);
        }
        if let Some(channels) = self.channels.get() {
            for ch in channels {
                ch.stop();
            }
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    /// The configuration space and both channels (their drives' registers, transfers in
    /// progress and the bus master's).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_pci_state(&mut s);
        if let Some(channels) = self.channels.get() {
            for (i, ch) in channels.iter().enumerate() {
                ch.save(&mut s, &format!("bus{i}"));
            }
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        self.parent.load_pci_state(state)?;
        if let Some(channels) = self.channels.get() {
            for (i, ch) in channels.iter().enumerate() {
                ch.load(state, &format!("bus{i}"))?;
            }
        }
        self.update_bus_master();
        Ok(())
    }
}

impl Piix3Ide {
    /// Tells the channels whether the command register lets the function master the bus.
    fn update_bus_master(&self) {
        let command = self.parent.read_config(config::COMMAND, 2) as u16;
        if let Some(channels) = self.channels.get() {
            for ch in channels {
                ch.set_bus_master(command & config::COMMAND_MASTER != 0);
            }
        }
    }
}

impl PciDeviceImpl for Piix3Ide {
    const VENDOR_ID: u16 = 0x8086;
    const DEVICE_ID: u16 = 0x7010;
    const CLASS_ID: u16 = 0x0101;

    fn pci_realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let services = ctx.machine()?;
        // Programming interface: both channels in legacy (compatibility) mode, bus master.
        self.parent.config_set(config::PROG_IF, &[0x80]);
        for reg in TIMING_REGS {
            self.parent.config_set_wmask(reg, 0xff);
        }
        let router = GsiRouter::new(services);
        let channels = [Arc::new(IdeChannel::default()), Arc::new(IdeChannel::default())];
        for (i, (ch, (base, ctrl, irq))) in channels.iter().zip(CHANNELS).enumerate() {
            let bus = qbus_new(TYPE_IDE_BUS, ctx.object(), &format!("ide.{i}"), services)?;
            if let Some(bus) = bus.downcast::<IdeBus>() {
                bus.set_channel(ch.clone(), i as u32);
            }
            ch.connect(IrqLine::new(router.clone(), irq), services, "worker")
                .map_err(|e| RealizeError::device(IdeControllerError::Worker(e)))?;
            let io = services.system_io();
            io.map(
                base.into(),
                MemoryRegion::new_io("ide", 8, Arc::new(CommandBlockPorts(ch.clone()))),
            )?;
            io.map(
                ctrl.into(),
                MemoryRegion::new_io("ide", 1, Arc::new(ControlPort(ch.clone()))),
            )?;
        }
        let bmdma = MemoryRegion::new_io("piix-bmdma-container", BMDMA_SIZE, Arc::new(BmdmaPorts(channels.clone())));
        self.register_bar(4, BarKind::Io, bmdma)?;
        // QEMU's do_vm_stop drains all block I/O: a stopped VM's disks touch no guest
        // memory and no image, so a migration's last RAM pass and the images' hand-over
        // see every transfer done (the vCPUs, which start them, are stopped already).
        let stopping = channels.clone();
        let handler = services.vm().add_change_handler(
            CHANGE_HANDLER_PRIORITY,
            Arc::new(move |running, _| {
                if !running {
                    for ch in &stopping {
                        ch.drain_lifting(None);
                    }
                }
            }),
        );
        let _ = self.change_handler.set(handler);
        let _ = self.channels.set(channels);
        Ok(())
    }

    fn config_write(&self, _addr: usize, _val: u32, _len: usize) {
        self.update_bus_master();
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
enum IdeControllerError {
    #[error("cannot start the IDE worker thread: {0}")]
    Worker(std::io::Error),
}
