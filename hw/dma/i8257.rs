//! `i8257`, the PC's ISA DMA controller (QEMU's `hw/dma/i8257.c`; the 8237A's registers):
//! the pc has two, one for the 8-bit channels 0-3 (ports 0x00-0x0f, page registers
//! 0x81-0x87) and one for the 16-bit channels 4-7 (0xc0-0xdf, 0x89-0x8f), as QEMU's
//! `i8257_dma_init` makes them. The floppy controller moves its sectors through channel 2.
//!
//! A device raises its channel's request ([`IsaDma::hold_dreq`]); an unmasked channel with
//! a request is served at once, on the thread that raised it or unmasked it, as QEMU's
//! `i8257_dma_run` does: the controller calls the device's [`IsaDmaClient::dma_transfer`] with the block's position
//! and length, and the device copies through [`IsaDma::read_memory`] and
//! [`IsaDma::write_memory`] at the address the guest programmed. A block that completes
//! sets the channel's terminal count in the status register. Single, demand and block
//! modes are served alike (the whole block at once, as QEMU does); memory-to-memory
//! transfers and the other command register features QEMU lacks are refused with a log
//! line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::{MemoryRegion, MemoryRegionOps};
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::core::services::MachineServices;
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::isa::isa_bus::{IsaBus, IsaDevice, IsaDma, IsaDmaClient};

/// QEMU's `TYPE_I8257`.
pub const TYPE_I8257: &str = "i8257";

const ADDR: usize = 0;
const COUNT: usize = 1;

/// Mode register: the address counts down.
const MODE_DECREMENT: u8 = 0x20;

/// Command register bits QEMU (and so qomvm) does not implement; only "controller
/// disable" (0x04) may be set besides zero.
const CMD_NOT_SUPPORTED: u8 = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40 | 0x80;

/// A page register port's channel (ports base+1..+3 and +7; -1: not a channel's).
const PAGE_CHANNEL: [Option<usize>; 8] = [None, Some(2), Some(3), Some(1), None, None, None, Some(0)];

/// One channel's registers (QEMU's `I8257Regs`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct ChannelRegs {
    /// The current address (the base shifted to bytes) and the bytes moved so far.
    now: [i32; 2],
    /// The programmed base address and count (in words on the 16-bit controller).
    base: [u16; 2],
    mode: u8,
    page: u8,
    pageh: u8,
}

/// The controller's registers (QEMU's `I8257State` fields), under one lock.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Registers {
    /// Terminal counts (low nibble) and requests (high nibble).
    status: u8,
    command: u8,
    mask: u8,
    flip_flop: bool,
    channels: [ChannelRegs; 4],
}

impl Default for Registers {
    /// Power-on: as after a master clear, every channel masked.
    fn default() -> Self {
        Registers {
            status: 0,
            command: 0,
            mask: 0xff,
            flip_flop: false,
            channels: [ChannelRegs::default(); 4],
        }
    }
}

impl Registers {
    /// QEMU's `i8257_init_chan`: a new base restarts the channel's block.
    fn init_channel(&mut self, ichan: usize, dshift: u32) {
        let r = &mut self.channels[ichan];
        r.now[ADDR] = i32::from(r.base[ADDR]) << dshift;
        r.now[COUNT] = 0;
    }

    fn toggle_flip_flop(&mut self) -> bool {
        let ff = self.flip_flop;
        self.flip_flop = !ff;
        ff
    }

    /// The master clear (QEMU's `i8257_reset`): the programmed addresses, counts and
    /// modes stay.
    fn master_clear(&mut self) {
        self.flip_flop = false;
        self.mask = 0xff;
        self.status = 0;
        self.command = 0;
    }
}

/// One controller: its registers, the devices on its channels, and guest memory.
pub struct DmaController {
    /// 0 for the 8-bit controller, 1 for the 16-bit one (registers two ports apart,
    /// counts in words).
    dshift: u32,
    regs: Mutex<Registers>,
    clients: Mutex<[Option<Weak<dyn IsaDmaClient>>; 4]>,
    /// Serving channels now; a request meanwhile is served by the same pass.
    running: AtomicBool,
    rerun: AtomicBool,
    services: OnceLock<Arc<MachineServices>>,
    log: RateLimitedLog,
}

impl DmaController {
    fn new(dshift: u32) -> Self {
        DmaController {
            dshift,
            regs: Mutex::new(Registers::default()),
            clients: Mutex::new(Default::default()),
            running: AtomicBool::new(false),
            rerun: AtomicBool::new(false),
            services: OnceLock::new(),
            log: RateLimitedLog::default(),
        }
    }

    /// The channel number (0-3) on this controller of ISA channel `nchan`.
    fn ichan(nchan: usize) -> usize {
        nchan & 3
    }

    /// The register a channel port's offset selects (QEMU's `iport`).
    fn iport(&self, offset: u64) -> usize {
        ((offset >> self.dshift) & 0x0f) as usize
    }

    /// QEMU's `i8257_read_chan`: the current address or remaining count, a byte at a time
    /// by the flip-flop.
    fn read_channel(&self, offset: u64) -> u8 {
        let iport = self.iport(offset);
        let (ichan, nreg) = (iport >> 1, iport & 1);
        let mut regs = self.regs.lock();
        let ff = regs.toggle_flip_flop();
        let r = &regs.channels[ichan & 3];
        let value = if nreg == 1 {
            (i32::from(r.base[COUNT]) << self.dshift).wrapping_sub(r.now[COUNT])
        } else if r.mode & MODE_DECREMENT != 0 {
            r.now[ADDR].wrapping_sub(r.now[COUNT])
        } else {
            r.now[ADDR].wrapping_add(r.now[COUNT])
        };
        (value >> (self.dshift + if ff { 8 } else { 0 })) as u8
    }

    /// QEMU's `i8257_write_chan`: the base address or count, low byte then high byte; the
    /// high byte restarts the channel.
    fn write_channel(&self, offset: u64, value: u8) {
        let iport = self.iport(offset);
        let (ichan, nreg) = ((iport >> 1) & 3, iport & 1);
        let mut regs = self.regs.lock();
        let base = regs.channels[ichan].base[nreg];
        if regs.toggle_flip_flop() {
            regs.channels[ichan].base[nreg] = (base & 0x00ff) | (u16::from(value) << 8);
            regs.init_channel(ichan, self.dshift);
        } else {
            regs.channels[ichan].base[nreg] = (base & 0xff00) | u16::from(value);
        }
    }

    /// QEMU's `i8257_write_cont`: the command, request, mask and mode registers.
    fn write_control(&self, offset: u64, value: u8) {
        let iport = self.iport(offset);
        let mut regs = self.regs.lock();
        let run = match iport {
            0x00 => {
                if value != 0 && value & CMD_NOT_SUPPORTED != 0 {
                    drop(regs);
                    self.log
                        .warn(|| format!("i8257: command {value:#x} not supported"));
                    return;
                }
                regs.command = value;
                false
            }
            // The request register: a software DREQ.
            0x01 => {
                let ichan = value & 3;
                if value & 4 != 0 {
                    regs.status |= 1 << (ichan + 4);
                } else {
                    regs.status &= !(1 << (ichan + 4));
                }
                regs.status &= !(1 << ichan);
                true
            }
            0x02 => {
                if value & 4 != 0 {
                    regs.mask |= 1 << (value & 3);
                } else {
                    regs.mask &= !(1 << (value & 3));
                }
                true
            }
            0x03 => {
                regs.channels[usize::from(value & 3)].mode = value;
                false
            }
            0x04 => {
                regs.flip_flop = false;
                false
            }
            0x05 => {
                regs.master_clear();
                false
            }
            0x06 => {
                regs.mask = 0;
                true
            }
            0x07 => {
                regs.mask = value;
                true
            }
            _ => false,
        };
        drop(regs);
        if run {
            self.run();
        }
    }

    /// QEMU's `i8257_read_cont`: the status register (reading clears the terminal
    /// counts) and the mask register.
    fn read_control(&self, offset: u64) -> u8 {
        let mut regs = self.regs.lock();
        match self.iport(offset) {
            0x00 => {
                let status = regs.status;
                regs.status &= 0xf0;
                status
            }
            0x01 => regs.mask,
            _ => 0,
        }
    }

    /// QEMU's `i8257_dma_run`: serves every unmasked channel with a request. A request
    /// raised while a pass runs (a device's handler releasing and raising again) is served
    /// by another pass of the same call, a bounded number of times.
    fn run(&self) {
        for _ in 0..8 {
            if self.running.swap(true, Ordering::SeqCst) {
                // The thread running the passes serves it: it checks `rerun` after it
                // lets go of `running`; if it let go before this, take over.
                self.rerun.store(true, Ordering::SeqCst);
                if self.running.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            self.rerun.store(false, Ordering::SeqCst);
            for ichan in 0..4 {
                self.run_channel(ichan);
            }
            self.running.store(false, Ordering::SeqCst);
            if !self.rerun.load(Ordering::SeqCst) {
                return;
            }
        }
        self.log
            .warn(|| "i8257: a channel asked again on every pass; left for the next request".to_string());
    }

    /// QEMU's `i8257_channel_run`, with no lock held while the device moves its bytes.
    fn run_channel(&self, ichan: usize) {
        let bit = 1u8 << ichan;
        let (pos, len) = {
            let regs = self.regs.lock();
            if regs.mask & bit != 0 || regs.status & (bit << 4) == 0 {
                return;
            }
            let r = &regs.channels[ichan];
            (r.now[COUNT], (u32::from(r.base[COUNT]) + 1) << self.dshift)
        };
        let nchan = ichan + ((self.dshift as usize) << 2);
        let client = self.clients.lock()[ichan].as_ref().and_then(Weak::upgrade);
        let pos = u32::try_from(pos).unwrap_or(0);
        let new_pos = match client {
            Some(client) => client.dma_transfer(nchan, pos, len),
            None => {
                self.log.warn(|| {
                    format!("i8257: unregistered DMA channel used nchan={nchan} dma_pos={pos} dma_len={len}")
                });
                pos
            }
        };
        let mut regs = self.regs.lock();
        regs.channels[ichan].now[COUNT] = new_pos as i32;
        if new_pos == len {
            regs.status |= bit;
        }
    }

    /// The guest-physical address of byte `pos` of channel `ichan`'s block, and whether
    /// the address counts down.
    fn block_address(&self, ichan: usize) -> (u64, bool) {
        let regs = self.regs.lock();
        let r = &regs.channels[ichan];
        let addr = (u64::from(r.pageh & 0x7f) << 24) | (u64::from(r.page) << 16);
        // `now[ADDR]` is the 16-bit base shifted to bytes: up to 17 bits.
        let addr = addr | u64::from(r.now[ADDR] as u32);
        (addr, r.mode & MODE_DECREMENT != 0)
    }

    /// Guest addresses of the `len` bytes from `pos` on: the lowest, and whether they
    /// come in reverse order (a block counting down from its address).
    fn span(&self, ichan: usize, pos: u32, len: usize) -> (u64, bool) {
        let (addr, down) = self.block_address(ichan);
        let at = if down {
            // Byte k of the block is at addr - k.
            let last = addr.wrapping_sub(u64::from(pos));
            last.wrapping_sub(len as u64).wrapping_add(1)
        } else {
            addr.wrapping_add(u64::from(pos))
        };
        // The ISA bus's 32 address bits (the page registers give at most 31).
        (at & 0xffff_ffff, down)
    }
}

impl IsaDma for DmaController {
    fn register_channel(&self, nchan: usize, client: Weak<dyn IsaDmaClient>) {
        self.clients.lock()[Self::ichan(nchan)] = Some(client);
    }

    fn hold_dreq(&self, nchan: usize) {
        self.regs.lock().status |= 1 << (Self::ichan(nchan) + 4);
        self.run();
    }

    fn release_dreq(&self, nchan: usize) {
        self.regs.lock().status &= !(1 << (Self::ichan(nchan) + 4));
    }

    fn read_memory(&self, nchan: usize, buf: &mut [u8], pos: u32) -> usize {
        let Some(services) = self.services.get() else {
            return 0;
        };
        let (at, reversed) = self.span(Self::ichan(nchan), pos, buf.len());
        services.read_physical(at, buf);
        if reversed {
            buf.reverse();
        }
        buf.len()
    }

    fn write_memory(&self, nchan: usize, buf: &[u8], pos: u32) -> usize {
        let Some(services) = self.services.get() else {
            return 0;
        };
        let (at, reversed) = self.span(Self::ichan(nchan), pos, buf.len());
        if reversed {
            let bytes: Vec<u8> = buf.iter().rev().copied().collect();
            services.write_physical(at, &bytes);
        } else {
            services.write_physical(at, buf);
        }
        services.dirty_tracker().mark(at, buf.len() as u64);
        buf.len()
    }
}

/// What a group of ports of the controller is.
#[derive(Clone, Copy)]
enum PortKind {
    Channel,
    Control,
    Page,
    PageHigh,
}

/// One group of ports, byte-wide (QEMU splits wider accesses).
struct DmaPorts {
    dma: Arc<DmaController>,
    kind: PortKind,
    /// The group's first port's offset from its base (page registers: 1 or 7).
    first: u64,
}

impl DmaPorts {
    fn read_byte(&self, offset: u64) -> u8 {
        let offset = offset + self.first;
        match self.kind {
            PortKind::Channel => self.dma.read_channel(offset),
            PortKind::Control => self.dma.read_control(offset),
            PortKind::Page | PortKind::PageHigh => {
                let Some(ichan) = PAGE_CHANNEL[(offset & 7) as usize] else {
                    return 0;
                };
                let regs = self.dma.regs.lock();
                match self.kind {
                    PortKind::Page => regs.channels[ichan].page,
                    _ => regs.channels[ichan].pageh,
                }
            }
        }
    }

    fn write_byte(&self, offset: u64, value: u8) {
        let offset = offset + self.first;
        match self.kind {
            PortKind::Channel => self.dma.write_channel(offset, value),
            PortKind::Control => self.dma.write_control(offset, value),
            PortKind::Page | PortKind::PageHigh => {
                let Some(ichan) = PAGE_CHANNEL[(offset & 7) as usize] else {
                    return;
                };
                let mut regs = self.dma.regs.lock();
                match self.kind {
                    PortKind::Page => regs.channels[ichan].page = value,
                    _ => regs.channels[ichan].pageh = value,
                }
            }
        }
    }
}

impl MemoryRegionOps for DmaPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        (0..u64::from(size.min(8))).fold(0, |value, i| {
            value | u64::from(self.read_byte(offset + i)) << (8 * i)
        })
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        for i in 0..u64::from(size.min(8)) {
            self.write_byte(offset + i, (value >> (8 * i)) as u8);
        }
    }
}

/// Errors of `i8257`'s properties.
#[derive(Debug, thiserror::Error)]
pub enum I8257Error {
    /// A base or page port whose registers do not fit in the I/O space.
    #[error("i8257: {0} 0x{1:x} is out of the I/O space")]
    BadPort(&'static str, i32),
    /// `dshift` other than 0 (8-bit) or 1 (16-bit).
    #[error("i8257: dshift must be 0 or 1, not {0}")]
    BadShift(i32),

}

/// QEMU's `I8257State` as a device.
#[derive(qom::Object)]
#[qom(name = TYPE_I8257)]
pub struct I8257 {
    #[parent]
    parent: IsaDevice,
    #[property(default = 0, desc = "First port of the channel registers")]
    base: Prop<i32>,
    #[property(name = "page-base", default = 0x80, desc = "Page registers' base port")]
    page_base: Prop<i32>,
    #[property(name = "pageh-base", default = 0x480, desc = "High page registers' base port (-1: none)")]
    pageh_base: Prop<i32>,
    #[property(default = 0, desc = "0: 8-bit channels, 1: 16-bit channels")]
    dshift: Prop<i32>,
    controller: OnceLock<Arc<DmaController>>,
}

type_init!(I8257);

impl I8257 {
    /// The controller, once realized.
    pub fn controller(&self) -> Option<Arc<DmaController>> {
        self.controller.get().cloned()
    }
}

fn port(name: &'static str, value: i32, len: u64) -> Result<u16, RealizeError> {
    u16::try_from(value)
        .ok()
        .filter(|&p| u64::from(p) + len <= 0x1_0000)
        .ok_or(RealizeError::device(I8257Error::BadPort(name, value)))
}

impl DeviceImpl for I8257 {
    const DESCRIPTION: Option<&'static str> = Some("ISA DMA controller (8237A)");
    // Boards make it; QEMU's is not user-creatable either.
    const USER_CREATABLE: bool = false;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let dshift = match self.dshift.get() {
            d @ (0 | 1) => d as u32,
            d => return Err(RealizeError::device(I8257Error::BadShift(d))),
        };
        let span = 8u64 << dshift;
        let base = port("base", self.base.get(), 2 * span)?;
        let page_base = port("page-base", self.page_base.get(), 8)?;
        let pageh_base = match self.pageh_base.get() {
            p if p < 0 => None,
            p => Some(port("pageh-base", p, 8)?),
        };
        let dma = Arc::new(DmaController::new(dshift));
        let services = ctx.machine()?.clone();
        let _ = dma.services.set(services.clone());
        let group = |kind, first, len, name| {
            let ops = Arc::new(DmaPorts { dma: dma.clone(), kind, first });
            MemoryRegion::new_io(name, len, ops)
        };
        self.register_ioport(ctx, group(PortKind::Channel, 0, span, "dma-chan"), base)?;
        self.register_ioport(ctx, group(PortKind::Control, 0, span, "dma-cont"), base + span as u16)?;
        self.register_ioport(ctx, group(PortKind::Page, 1, 3, "dma-page"), page_base + 1)?;
        self.register_ioport(ctx, group(PortKind::Page, 7, 1, "dma-page"), page_base + 7)?;
        if let Some(pageh) = pageh_base {
            self.register_ioport(ctx, group(PortKind::PageHigh, 1, 3, "dma-pageh"), pageh + 1)?;
            self.register_ioport(ctx, group(PortKind::PageHigh, 7, 1, "dma-pageh"), pageh + 7)?;
        }
        // A request the source VM left pending (its device waiting on a masked channel,
        // or one served only in part) is served when the VM runs again, with every
        // device's state in: QEMU's post_load re-arms a bottom half for it.
        let weak = Arc::downgrade(&dma);
        services.vm().add_change_handler(
            0,
            Arc::new(move |running, _| {
                if let Some(dma) = weak.upgrade().filter(|_| running) {
                    dma.run();
                }
            }),
        );
        let _ = self.controller.set(dma);
        Ok(())
    }

    fn reset(&self) {
        if let Some(dma) = self.controller.get() {
            dma.regs.lock().master_clear();
        }
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let regs = self.controller.get().map(|d| *d.regs.lock()).unwrap_or_default();
        Ok(VmStateSection::new(1).with("registers", regs))
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let regs: Registers = state.get("registers")?;
        if let Some(dma) = self.controller.get() {
            // Served when the VM runs (realize's change handler): the devices' own
            // states may not be in yet.
            *dma.regs.lock() = regs;
        }
        Ok(())
    }
}

/// QEMU's `i8257_dma_init`: the two controllers on `isa_bus` (high page registers only
/// with `high_page_enable`), connected to the bus as its DMA.
pub fn i8257_dma_init(
    isa_bus: &qom::ObjectRef,
    high_page_enable: bool,
) -> Result<(), crate::core::qdev::QdevError> {
    let mut controllers = Vec::new();
    for (base, page_base, pageh_base, dshift) in [(0x00, 0x80, 0x480, 0), (0xc0, 0x88, 0x488, 1)] {
        let dev = crate::core::qdev::qdev_new_typed::<I8257>()?;
        dev.base.set(base);
        dev.page_base.set(page_base);
        dev.pageh_base.set(if high_page_enable { pageh_base } else { -1 });
        dev.dshift.set(dshift);
        crate::core::qdev::qdev_realize(dev.object(), Some(isa_bus))?;
        controllers.push(dev.controller());
    }
    if let (Some(Some(dma8)), Some(Some(dma16)), Some(bus)) = (
        controllers.first(),
        controllers.get(1),
        isa_bus.downcast::<IsaBus>(),
    ) {
        bus.set_dma(dma8.clone(), dma16.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Mutex<Vec<(usize, u32, u32)>>);

    impl IsaDmaClient for Recorder {
        fn dma_transfer(&self, nchan: usize, pos: u32, len: u32) -> u32 {
            self.0.lock().push((nchan, pos, len));
            len
        }
    }

    #[test]
    fn a_masked_request_waits_for_the_unmask_and_ends_in_terminal_count() {
        let dma = DmaController::new(0);
        let client = Arc::new(Recorder(Mutex::new(Vec::new())));
        let weak: Weak<dyn IsaDmaClient> = Arc::downgrade(&(client.clone() as Arc<dyn IsaDmaClient>));
        dma.register_channel(2, weak);
        // Address 0x1234, count 0x1ff (512 bytes), through the flip-flop (port 0x0c
        // clears it: control offset 4).
        dma.write_control(4, 0);
        dma.write_channel(4, 0x34);
        dma.write_channel(4, 0x12);
        dma.write_channel(5, 0xff);
        dma.write_channel(5, 0x01);
        dma.hold_dreq(2);
        assert!(client.0.lock().is_empty(), "channel 2 is masked after a reset");
        dma.write_control(2, 2);
        assert_eq!(&client.0.lock()[..], &[(2, 0, 512)]);
        dma.release_dreq(2);
        assert_eq!(dma.read_control(0) & 0x0f, 1 << 2, "terminal count");
        assert_eq!(dma.read_control(0) & 0x0f, 0, "reading cleared it");
        // The count reads 0xffff after terminal count; the address moved on by 512.
        dma.write_control(4, 0);
        assert_eq!((dma.read_channel(5), dma.read_channel(5)), (0xff, 0xff));
        assert_eq!((dma.read_channel(4), dma.read_channel(4)), (0x34, 0x14));
    }

    #[test]
    fn the_16_bit_controller_counts_words_and_spreads_its_ports() {
        let dma = DmaController::new(1);
        let client = Arc::new(Recorder(Mutex::new(Vec::new())));
        let weak: Weak<dyn IsaDmaClient> = Arc::downgrade(&(client.clone() as Arc<dyn IsaDmaClient>));
        dma.register_channel(5, weak);
        // Channel 5's count register is at offset (1 * 2 + 1) << 1.
        dma.write_channel(6, 0x0f);
        dma.write_channel(6, 0x00);
        // Clear all masks: port 0xdc, control offset 6 << 1.
        dma.write_control(12, 0);
        dma.hold_dreq(5);
        assert_eq!(&client.0.lock()[..], &[(5, 0, 32)]);
    }
}
