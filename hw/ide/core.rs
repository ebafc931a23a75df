//! The IDE channel (QEMU's `hw/ide/core.c` and the bus-master DMA of `hw/ide/pci.c`): one
//! ATA bus with its master and slave, the task file registers a driver programs through
//! the command block (8 ports) and the control block (1 port), PIO data transfers through
//! the data port, and bus-master DMA through a table of physical region descriptors.
//! ATAPI's packet commands are in `ide::atapi`, which a CD drive hands the channel as its
//! [`PacketDevice`].
//!
//! The registers live under one lock. Commands that touch the disk set BSY and go to the
//! channel's worker thread, which does the I/O without the lock and then completes the
//! command (status, data window, interrupt): a vCPU never waits on the disk, and vCPU
//! threads are not allowed block I/O by the sandbox anyway. A reset or a snapshot waits
//! for the worker; completions of commands issued before a reset are dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use block::BlockBackend;
use parking_lot::{Condvar, Mutex};
use qom::type_init;
use serde::{Deserialize, Serialize};

use crate::core::bus::BusState;
use crate::core::irq::IrqLine;
use crate::core::log_limit::RateLimitedLog;
use crate::core::memory::MemoryRegionOps;
use crate::core::services::MachineServices;
use crate::core::vmstate::{VmStateError, VmStateSection};

/// QEMU's `TYPE_IDE_BUS`.
pub const TYPE_IDE_BUS: &str = "IDE";

/// Drives per channel: master and slave.
pub const UNITS: usize = 2;

/// Status register bits.
pub(crate) mod status {
    pub const ERR: u8 = 0x01;
    pub const DRQ: u8 = 0x08;
    /// Seek complete (DSC).
    pub const DSC: u8 = 0x10;
    pub const DRDY: u8 = 0x40;
    pub const BSY: u8 = 0x80;
}

/// Error register: command aborted.
pub(crate) const ABRT: u8 = 0x04;

/// Device control register bits.
const CTRL_NIEN: u8 = 0x02;
const CTRL_SRST: u8 = 0x04;
const CTRL_HOB: u8 = 0x80;

/// Device (select) register bits.
const DEV_HS: u8 = 0x0f;
const DEV_SELECT: u8 = 0x10;
const DEV_LBA: u8 = 0x40;
const DEV_ALWAYS_ON: u8 = 0xa0;

/// Bus-master command and status bits.
const BM_CMD_START: u8 = 0x01;
/// Direction: the device writes memory (a disk read).
const BM_CMD_TO_MEMORY: u8 = 0x08;
const BM_STATUS_ACTIVE: u8 = 0x01;
const BM_STATUS_ERROR: u8 = 0x02;
const BM_STATUS_INT: u8 = 0x04;
/// The two "drive is DMA capable" bits the driver keeps.
const BM_STATUS_CAPABLE: u8 = 0x60;

/// ATA's sector.
pub(crate) const SECTOR_SIZE: u64 = 512;
/// The transfer mode IDENTIFY shows selected at power-on: Ultra DMA 5 (QEMU's).
const DEFAULT_XFER_MODE: u8 = 0x45;
/// Sectors per DRQ block of READ/WRITE MULTIPLE (QEMU's `MAX_MULT_SECTORS`).
const MAX_MULT_SECTORS: u8 = 16;
/// Descriptors read from one PRD table at most (a 4 KiB page of them, as QEMU).
const MAX_PRD_ENTRIES: usize = 512;
/// Bytes moved between the disk and guest memory at a time: a huge transfer costs time,
/// never memory.
const DMA_CHUNK: usize = 256 * 1024;

/// What kind of drive sits at a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriveKind {
    /// `ide-hd`: an ATA disk.
    Hd,
    /// `ide-cd`: an ATAPI CD/DVD-ROM.
    Cd,
}

/// Bytes of an ATAPI command packet.
pub(crate) const PACKET_SIZE: usize = 12;

/// What an ATAPI drive does with packets (`ide::atapi`): the channel runs the ATA side
/// (the PACKET command, the data port, DMA) and hands the packets over.
pub(crate) trait PacketDevice: Send + Sync {
    /// IDENTIFY PACKET DEVICE's 512 bytes.
    fn identify_packet(&self, st: &ChannelState, unit: usize) -> Vec<u8>;
    /// Runs the 12-byte `packet` that arrived.
    fn packet_command(
        &self,
        ch: &IdeChannel,
        st: &mut ChannelState,
        unit: usize,
        packet: &[u8],
    ) -> Option<Job>;
    /// The guest moved a piece of the reply: the next one, or the end.
    fn reply_next(&self, st: &mut ChannelState, unit: usize) -> Option<Job>;
    /// A DMA transfer of the reply ended, well (the caller raises the interrupt) or not.
    fn dma_done(&self, st: &mut ChannelState, unit: usize, ok: bool);
}

/// The packet side of the ATAPI drive at `unit`.
fn packet_device(st: &ChannelState, unit: usize) -> Option<&'static dyn PacketDevice> {
    st.info[unit].as_ref().and_then(|i| i.packet)
}

/// A drive as its device configured it (QEMU's `IDEState` fields set by `ide_init_drive`).
#[derive(Clone)]
pub struct DriveInfo {
    /// Disk or CD.
    pub kind: DriveKind,
    /// A CD's packet commands.
    pub(crate) packet: Option<&'static dyn PacketDevice>,
    /// The image; `None` for a CD drive without a medium.
    pub backend: Option<Arc<BlockBackend>>,
    /// The backend's name, for `DEVICE_TRAY_MOVED`.
    pub blk_name: String,
    /// The device's id (or QOM path), for `DEVICE_TRAY_MOVED`.
    pub qdev_id: String,
    /// IDENTIFY's serial number (20 characters).
    pub serial: String,
    /// IDENTIFY's model (40 characters).
    pub model: String,
    /// IDENTIFY's firmware revision (8 characters).
    pub version: String,
    /// World wide name (0: none).
    pub wwn: u64,
    /// Cylinders, heads, sectors per track (disks).
    pub chs: (u32, u32, u32),
    /// Physical block size in bytes.
    pub physical_block_size: u32,
    /// Nominal media rotation rate (IDENTIFY word 217).
    pub rotation_rate: u16,
    /// The write cache is on at power-on.
    pub write_cache: bool,
}

impl DriveInfo {
    /// Sectors of 512 bytes the medium holds.
    pub(crate) fn sectors(&self) -> u64 {
        self.backend.as_ref().map_or(0, |b| b.size() / SECTOR_SIZE)
    }
}

/// What happens when the guest has moved the whole data window (QEMU's
/// `end_transfer_func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) enum EndTransfer {
    /// Nothing more: DRQ goes.
    #[default]
    Stop,
    /// A PIO read: the next block, or the end of the command.
    ReadNext,
    /// A PIO write: the block goes to the disk.
    WriteBlock,
    /// ATAPI: the 12-byte packet arrived.
    Packet,
    /// ATAPI: the next piece of the reply.
    AtapiNext,
}

/// The task file (QEMU keeps it per drive; writes go to both drives of the channel).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Taskfile {
    pub feature: u8,
    pub error: u8,
    pub nsector: u8,
    pub sector: u8,
    pub lcyl: u8,
    pub hcyl: u8,
    pub hob_feature: u8,
    pub hob_nsector: u8,
    pub hob_sector: u8,
    pub hob_lcyl: u8,
    pub hob_hcyl: u8,
    pub select: u8,
    pub status: u8,
}

/// One drive's state (QEMU's `IDEState`), all of it guest-visible or migrated.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct DriveState {
    pub tf: Taskfile,
    /// Sectors per block of READ/WRITE MULTIPLE (0: disabled).
    pub mult_sectors: u8,
    /// The current command uses the LBA48 registers.
    pub lba48: bool,
    /// The PIO data buffer; `pos..end` is the window the guest reads or writes.
    #[serde(skip)]
    pub buffer: Vec<u8>,
    pub pos: usize,
    pub end: usize,
    pub end_op: EndTransfer,
    /// The current sector command: next LBA, sectors left, sectors per DRQ block.
    pub lba: u64,
    pub remaining: u64,
    pub block: u64,
    /// SET FEATURES' transfer mode (IDENTIFY words 62, 63, 88).
    pub xfer_mode: u8,
    /// The write cache is on (SET FEATURES 0x02/0x82).
    pub write_cache: bool,
    /// ATAPI: sense of the last command.
    pub sense_key: u8,
    pub asc: u8,
    /// ATAPI: the packet command transfers by DMA.
    pub atapi_dma: bool,
    /// ATAPI: reply bytes not yet handed to a DRQ window, and for reads the next CD
    /// block to load.
    pub packet_left: u64,
    pub cd_lba: u64,
    /// ATAPI: the reply's bytes come from the disk (a read) rather than the buffer.
    pub cd_reading: bool,
    /// ATAPI: PREVENT MEDIUM REMOVAL, and the tray's state.
    pub tray_locked: bool,
    pub tray_open: bool,
    /// ATAPI: the medium changed (QEMU's `cdrom_changed`): the next command that needs
    /// one fails with "medium not present" (1), then "medium may have changed" (2).
    #[serde(default)]
    pub cdrom_changed: u8,
    /// ATAPI: GET EVENT STATUS NOTIFICATION's media events not yet reported.
    #[serde(default)]
    pub new_media: bool,
    #[serde(default)]
    pub eject_request: bool,
}

/// A DMA command waiting for (or running on) the bus master.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct DmaOp {
    pub unit: usize,
    pub dir: DmaDir,
    /// Byte offset on the medium and length of the transfer.
    pub offset: u64,
    pub len: u64,
    /// ATAPI completes as a packet command, ATA as a sector command.
    pub atapi: bool,
}

/// Which way a DMA transfer goes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum DmaDir {
    /// Medium to memory.
    Read,
    /// Memory to medium.
    Write,
    /// A reply the device built (ATAPI) to memory.
    Reply(Vec<u8>),
}

/// The bus master's registers for this channel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Bmdma {
    pub cmd: u8,
    pub status: u8,
    pub prd: u32,
}

/// The channel's registers and the drives' states.
pub(crate) struct ChannelState {
    pub drives: [DriveState; UNITS],
    pub info: [Option<Arc<DriveInfo>>; UNITS],
    /// The selected drive.
    pub unit: usize,
    /// The device control register.
    pub ctrl: u8,
    pub bm: Bmdma,
    /// A DMA command issued before the bus master was started.
    pub dma_pending: Option<DmaOp>,
    /// The interrupt as the channel wants it, and as it was last driven.
    pub irq: bool,
    irq_driven: bool,
    /// Per drive, bumped by its resets: completions of commands issued before are dropped.
    generation: [u64; UNITS],
    /// Trays the guest moved (unit, open), announced once the lock is released.
    pub tray_moves: Vec<(usize, bool)>,
}

/// The channel's part of the machine's state, as saved.
#[derive(Serialize, Deserialize)]
struct SavedChannel {
    drives: [DriveState; UNITS],
    unit: usize,
    ctrl: u8,
    bm: Bmdma,
    dma_pending: Option<DmaOp>,
    irq: bool,
}

impl ChannelState {
    /// QEMU's `ide_set_irq`: unless the driver masked it (nIEN), the interrupt rises and
    /// the bus master notes it.
    pub fn set_irq(&mut self) {
        if self.ctrl & CTRL_NIEN == 0 {
            self.bm.status |= BM_STATUS_INT;
            self.irq = true;
        }
    }

    /// Whether reads of the selected drive's registers see nothing (QEMU: no drive on
    /// the channel, or the slave is selected and absent).
    fn selected_absent(&self) -> bool {
        (self.info[0].is_none() && self.info[1].is_none())
            || (self.unit == 1 && self.info[1].is_none())
    }

    /// Hands the guest `data` through the data port, ending with `end_op` (QEMU's
    /// `ide_transfer_start`).
    pub fn transfer_start(&mut self, unit: usize, data: Vec<u8>, end_op: EndTransfer) {
        let d = &mut self.drives[unit];
        d.end = data.len();
        d.buffer = data;
        d.pos = 0;
        d.end_op = end_op;
        if d.tf.status & status::ERR == 0 {
            d.tf.status |= status::DRQ;
        }
    }

    /// A window of `len` bytes the guest writes (QEMU's `ide_transfer_start` on an
    /// output buffer).
    fn receive_start(&mut self, unit: usize, len: usize, end_op: EndTransfer) {
        self.transfer_start(unit, vec![0; len], end_op);
    }

    /// QEMU's `ide_transfer_stop`.
    pub fn transfer_stop(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.end_op = EndTransfer::Stop;
        d.pos = 0;
        d.end = 0;
        d.tf.status &= !status::DRQ;
    }

    /// QEMU's `ide_abort_command`.
    pub fn abort(&mut self, unit: usize) {
        self.transfer_stop(unit);
        let d = &mut self.drives[unit];
        d.tf.status = status::DRDY | status::ERR;
        d.tf.error = ABRT;
    }

    fn unit_kind(&self, unit: usize) -> Option<DriveKind> {
        self.info[unit].as_ref().map(|i| i.kind)
    }
}

/// Work for the worker thread: the I/O, which returns how to complete the command.
type Completion = Box<dyn FnOnce(&mut ChannelState) -> Option<Job> + Send>;

/// The I/O of a job: given the machine (for DMA), returns how to complete the command.
type JobIo = Box<dyn FnOnce(&Weak<MachineServices>) -> Completion + Send>;

/// One command's I/O, run without the channel's lock, for the drive at `unit`.
pub(crate) struct Job {
    unit: usize,
    run: JobIo,
}

impl Job {
    pub fn new(
        unit: usize,
        run: impl FnOnce(&Weak<MachineServices>) -> Completion + Send + 'static,
    ) -> Self {
        Job {
            unit,
            run: Box::new(run),
        }
    }
}

#[derive(Default)]
struct WorkQueue {
    jobs: VecDeque<(u64, Job)>,
    /// A job is running.
    running: bool,
    stopping: bool,
}

/// QEMU's `IDEBus` as the controller sees it: registers, drives, the worker.
pub struct IdeChannel {
    state: Mutex<ChannelState>,
    /// The controller's PCI command register allows bus mastering: without it DMA
    /// reaches no memory.
    bus_master: AtomicBool,
    irq_line: Mutex<IrqLine>,
    machine: Mutex<Weak<MachineServices>>,
    queue: Mutex<WorkQueue>,
    /// Signals new work to the worker and its end to those who wait.
    work: Condvar,
    idle: Condvar,
    log: RateLimitedLog,
}

impl Default for IdeChannel {
    fn default() -> Self {
        IdeChannel {
            bus_master: AtomicBool::new(false),
            state: Mutex::new(ChannelState {
                drives: Default::default(),
                info: Default::default(),
                unit: 0,
                ctrl: 0,
                bm: Bmdma::default(),
                dma_pending: None,
                irq: false,
                irq_driven: false,
                generation: [0; UNITS],
                tray_moves: Vec::new(),
            }),
            irq_line: Mutex::new(IrqLine::default()),
            machine: Mutex::new(Weak::new()),
            queue: Mutex::new(WorkQueue::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            log: RateLimitedLog::default(),
        }
    }
}

impl IdeChannel {
    /// Connects the channel to its interrupt and the machine's memory (for DMA), and
    /// starts its worker thread (from the thread that builds the machine, whose sandbox
    /// allows block I/O).
    pub fn connect(
        self: &Arc<Self>,
        irq: IrqLine,
        machine: &Arc<MachineServices>,
        name: &str,
    ) -> std::io::Result<()> {
        *self.irq_line.lock() = irq;
        *self.machine.lock() = Arc::downgrade(machine);
        let weak = Arc::downgrade(self);
        crate::core::thread::builder(name).spawn(move || worker(weak))?;
        Ok(())
    }

    /// Whether the controller may master the bus (its PCI command register's bit 2).
    pub fn set_bus_master(&self, on: bool) {
        self.bus_master.store(on, Ordering::Release);
    }

    /// Ends the worker once its queue is empty.
    pub fn stop(&self) {
        self.queue.lock().stopping = true;
        self.work.notify_all();
    }

    /// Puts the drive `info` at `unit` (QEMU's `ide_init_drive`); fails if taken.
    pub fn attach(&self, unit: usize, info: Arc<DriveInfo>) -> Result<(), Arc<DriveInfo>> {
        let mut st = self.state.lock();
        if unit >= UNITS || st.info[unit].is_some() {
            return Err(info);
        }
        let kind = info.kind;
        let write_cache = info.write_cache;
        st.info[unit] = Some(info);
        drive_reset(&mut st, unit);
        st.drives[unit].write_cache = write_cache;
        st.drives[unit].xfer_mode = DEFAULT_XFER_MODE;
        if kind == DriveKind::Hd {
            st.drives[unit].tf.status = status::DRDY | status::DSC;
        }
        Ok(())
    }

    /// Removes the drive at `unit`.
    pub fn detach(&self, unit: usize) {
        if unit < UNITS {
            self.drain_lifting(None);
            self.state.lock().info[unit] = None;
        }
    }

    /// A CD drive's tray: (locked by the guest, open).
    pub fn tray(&self, unit: usize) -> (bool, bool) {
        let st = self.state.lock();
        st.drives
            .get(unit)
            .map_or((false, false), |d| (d.tray_locked, d.tray_open))
    }

    /// Puts `medium` into the drive at `unit`, or takes its medium out (`None`); returns
    /// once the commands in flight are done (QEMU drains the backend around
    /// `blk_insert_bs` and `blk_remove_bs`).
    pub fn set_medium(&self, unit: usize, medium: Option<Arc<BlockBackend>>) {
        let old = {
            let mut st = self.state.lock();
            st.info.get_mut(unit).and_then(Option::as_mut).and_then(|info| {
                let mut changed = DriveInfo::clone(info);
                let old = std::mem::replace(&mut changed.backend, medium);
                *info = Arc::new(changed);
                old
            })
        };
        // Commands queued before the swap finish on the old medium before it goes.
        self.drain_lifting(old);
    }

    /// QEMU's `ide_cd_change_cb`: the tray closes on the medium (`load`) or opens; the
    /// guest learns of it from its next commands and from GET EVENT STATUS NOTIFICATION.
    pub fn change_media(&self, unit: usize, load: bool) {
        let mut st = self.state.lock();
        let Some(d) = st.drives.get_mut(unit) else {
            return;
        };
        d.tray_open = !load;
        d.cdrom_changed = 1;
        d.new_media = true;
        d.eject_request = false;
        st.set_irq();
        self.sync_irq(&mut st);
    }

    /// QEMU's `ide_cd_eject_request_cb`: the guest is asked to let the medium go; `force`
    /// unlocks the tray.
    pub fn eject_request(&self, unit: usize, force: bool) {
        let mut st = self.state.lock();
        let Some(d) = st.drives.get_mut(unit) else {
            return;
        };
        d.eject_request = true;
        if force {
            d.tray_locked = false;
        }
        st.set_irq();
        self.sync_irq(&mut st);
    }

    /// The units that have a drive.
    pub fn units_taken(&self) -> [bool; UNITS] {
        let st = self.state.lock();
        [st.info[0].is_some(), st.info[1].is_some()]
    }

    /// Queues `job`, tagged with its drive's current reset generation.
    fn submit(&self, st: &ChannelState, job: Job) {
        let generation = st.generation[job.unit];
        self.queue.lock().jobs.push_back((generation, job));
        self.work.notify_one();
    }

    /// [`IdeChannel::drain`] with the drives' I/O limits lifted meanwhile (QEMU's drain
    /// disables them), and `also`'s (a medium just taken out): a stop, a reset or a
    /// medium change from the host, or the guest stopping the DMA engine (QEMU's
    /// `blk_drain`), never waits them out. A DEVICE RESET or SRST keeps the limits and
    /// waits on the guest's vCPU (QEMU's `blk_aio_cancel` waits too).
    pub fn drain_lifting(&self, also: Option<Arc<BlockBackend>>) {
        let drives: Vec<Arc<BlockBackend>> = {
            let st = self.state.lock();
            st.info.iter().flatten().filter_map(|i| i.backend.clone()).chain(also).collect()
        };
        let _lifted: Vec<_> = drives.iter().map(|d| d.lift_limits()).collect();
        self.drain();
    }

    /// Waits until the worker has nothing queued or running (QEMU's `blk_drain`).
    pub fn drain(&self) {
        let mut q = self.queue.lock();
        while q.running || !q.jobs.is_empty() {
            if q.stopping && !q.running {
                // No worker is left to run them: they are dropped with the channel.
                q.jobs.clear();
                break;
            }
            self.idle.wait(&mut q);
        }
    }

    /// Drives the interrupt line to the state the registers want.
    fn sync_irq(&self, st: &mut ChannelState) {
        if st.irq != st.irq_driven {
            st.irq_driven = st.irq;
            self.irq_line.lock().set(st.irq);
        }
    }

    /// Runs `f` on the registers, submits the job it returns, and updates the interrupt.
    fn with_state<R>(&self, f: impl FnOnce(&mut ChannelState) -> (R, Option<Job>)) -> R {
        let mut st = self.state.lock();
        let (r, job) = f(&mut st);
        if let Some(job) = job {
            self.submit(&st, job);
        }
        self.sync_irq(&mut st);
        announce_tray_moves(st);
        r
    }

    // ----- the command block (base + 0..7) -----

    /// A read of command block register `reg`.
    pub fn ioport_read(&self, reg: u64) -> u8 {
        self.with_state(|st| {
            let hob = st.ctrl & CTRL_HOB != 0;
            let absent = st.selected_absent();
            let d = &st.drives[st.unit];
            let tf = &d.tf;
            let value = match reg {
                0 => 0xff,
                _ if absent => 0,
                1 if hob => tf.hob_feature,
                1 => tf.error,
                2 if hob => tf.hob_nsector,
                2 => tf.nsector,
                3 if hob => tf.hob_sector,
                3 => tf.sector,
                4 if hob => tf.hob_lcyl,
                4 => tf.lcyl,
                5 if hob => tf.hob_hcyl,
                5 => tf.hcyl,
                6 => tf.select,
                _ => tf.status,
            };
            // Reading the status register acknowledges the interrupt.
            if reg == 7 {
                st.irq = false;
            }
            (value, None)
        })
    }

    /// A write of command block register `reg`.
    pub fn ioport_write(&self, reg: u64, value: u8) {
        if reg == 7 && value == 0x08 && self.device_reset() {
            return;
        }
        self.with_state(|st| {
            match reg {
                1..=5 => {
                    st.ctrl &= !CTRL_HOB;
                    for d in &mut st.drives {
                        let tf = &mut d.tf;
                        // The previous value moves to the "high order byte" (LBA48).
                        let (reg, hob) = match reg {
                            1 => (&mut tf.feature, &mut tf.hob_feature),
                            2 => (&mut tf.nsector, &mut tf.hob_nsector),
                            3 => (&mut tf.sector, &mut tf.hob_sector),
                            4 => (&mut tf.lcyl, &mut tf.hob_lcyl),
                            _ => (&mut tf.hcyl, &mut tf.hob_hcyl),
                        };
                        *hob = *reg;
                        *reg = value;
                    }
                    ((), None)
                }
                6 => {
                    st.ctrl &= !CTRL_HOB;
                    for d in &mut st.drives {
                        d.tf.select = value | DEV_ALWAYS_ON;
                    }
                    st.unit = usize::from(value & DEV_SELECT != 0);
                    ((), None)
                }
                7 => {
                    st.ctrl &= !CTRL_HOB;
                    st.irq = false;
                    ((), self.exec_cmd(st, value))
                }
                _ => ((), None),
            }
        })
    }

    /// A read of the data port (`size` 2 or 4 bytes).
    pub fn data_read(&self, size: u32) -> u64 {
        self.with_state(|st| {
            let unit = st.unit;
            let d = &mut st.drives[unit];
            let size = size as usize;
            // Data moves only while DRQ is set and the device is not busy, out of a window
            // the device filled, and never past its end (QEMU's ide_data_readw/readl).
            if d.tf.status & (status::DRQ | status::BSY) != status::DRQ
                || matches!(d.end_op, EndTransfer::WriteBlock | EndTransfer::Packet)
                || d.pos + size > d.end
            {
                return (0, None);
            }
            let mut value = 0u64;
            for i in 0..size {
                if let Some(b) = d.buffer.get(d.pos + i) {
                    value |= u64::from(*b) << (8 * i);
                }
            }
            d.pos += size;
            let job = if d.pos >= d.end {
                self.end_transfer(st, unit)
            } else {
                None
            };
            (value, job)
        })
    }

    /// A write of the data port.
    pub fn data_write(&self, value: u64, size: u32) {
        self.with_state(|st| {
            let unit = st.unit;
            let d = &mut st.drives[unit];
            if d.tf.status & (status::DRQ | status::BSY) != status::DRQ
                || !matches!(d.end_op, EndTransfer::WriteBlock | EndTransfer::Packet)
                || d.pos + size as usize > d.end
            {
                return ((), None);
            }
            for i in 0..size as usize {
                if let Some(b) = d.buffer.get_mut(d.pos + i) {
                    *b = (value >> (8 * i)) as u8;
                }
            }
            d.pos += size as usize;
            let job = if d.pos >= d.end {
                self.end_transfer(st, unit)
            } else {
                None
            };
            ((), job)
        })
    }

    /// The window is done: what comes next (QEMU's `end_transfer_func`).
    fn end_transfer(&self, st: &mut ChannelState, unit: usize) -> Option<Job> {
        match st.drives[unit].end_op {
            EndTransfer::Stop => {
                st.transfer_stop(unit);
                None
            }
            EndTransfer::ReadNext => {
                st.transfer_stop(unit);
                if st.drives[unit].remaining > 0 {
                    sector_read(st, unit)
                } else {
                    st.drives[unit].tf.status = status::DRDY | status::DSC;
                    None
                }
            }
            EndTransfer::WriteBlock => {
                let d = &mut st.drives[unit];
                let data = std::mem::take(&mut d.buffer);
                d.pos = 0;
                d.end = 0;
                d.end_op = EndTransfer::Stop;
                d.tf.status = status::DRDY | status::DSC | status::BSY;
                Some(sector_write(st, unit, data))
            }
            EndTransfer::Packet => {
                let d = &mut st.drives[unit];
                let packet = std::mem::take(&mut d.buffer);
                st.transfer_stop(unit);
                match packet_device(st, unit) {
                    Some(dev) => dev.packet_command(self, st, unit, &packet),
                    None => None,
                }
            }
            EndTransfer::AtapiNext => {
                // The reply goes on from where this piece ended.
                let d = &mut st.drives[unit];
                d.tf.status &= !status::DRQ;
                d.end_op = EndTransfer::Stop;
                packet_device(st, unit).and_then(|dev| dev.reply_next(st, unit))
            }
        }
    }

    /// DEVICE RESET, if the selected drive is a CD (QEMU's `cmd_device_reset`): its
    /// transfer is cancelled (waited for) and it starts over, BSY or not.
    fn device_reset(&self) -> bool {
        let unit = {
            let mut st = self.state.lock();
            let unit = st.unit;
            if st.unit_kind(unit) != Some(DriveKind::Cd) {
                return false;
            }
            st.ctrl &= !CTRL_HOB;
            st.irq = false;
            st.generation[unit] += 1;
            if st.dma_pending.as_ref().is_some_and(|op| op.unit == unit) {
                st.dma_pending = None;
            }
            st.transfer_stop(unit);
            st.drives[unit].tf.status |= status::BSY;
            unit
        };
        self.drain();
        let mut st = self.state.lock();
        // A cancelled DMA leaves the engine idle (QEMU's ide_set_inactive).
        if st.dma_pending.is_none() {
            st.bm.status &= !BM_STATUS_ACTIVE;
        }
        drive_reset(&mut st, unit);
        st.drives[unit].tf.status = 0;
        st.drives[unit].tf.error = 0x01;
        self.sync_irq(&mut st);
        true
    }

    // ----- the control block (base2) -----

    /// Alternate status: the status without acknowledging the interrupt.
    pub fn altstatus_read(&self) -> u8 {
        let st = self.state.lock();
        if st.selected_absent() {
            0
        } else {
            st.drives[st.unit].tf.status
        }
    }

    /// Device control: nIEN, SRST (a soft reset of both drives on its rising edge).
    pub fn ctrl_write(&self, value: u8) {
        let reset = {
            let mut st = self.state.lock();
            let reset = st.ctrl & CTRL_SRST == 0 && value & CTRL_SRST != 0;
            st.ctrl = value;
            if reset {
                // From here on nothing moves: no data window, no DMA to start, BSY.
                st.dma_pending = None;
                for unit in 0..UNITS {
                    st.generation[unit] += 1;
                    st.transfer_stop(unit);
                    st.drives[unit].tf.status |= status::BSY;
                }
            }
            reset
        };
        if reset {
            // Commands in flight finish first (QEMU's ide_cancel_dma_sync).
            self.drain();
            let mut st = self.state.lock();
            st.dma_pending = None;
            st.bm.status &= !BM_STATUS_ACTIVE;
            for unit in 0..UNITS {
                drive_reset(&mut st, unit);
                // QEMU's ide_perform_srst: the diagnostic's result; a disk interrupts.
                let cd = st.unit_kind(unit) == Some(DriveKind::Cd);
                let tf = &mut st.drives[unit].tf;
                tf.status = if cd { 0 } else { status::DRDY | status::DSC };
                tf.error = 0x01;
                if st.unit_kind(unit) == Some(DriveKind::Hd) {
                    st.set_irq();
                }
            }
            self.sync_irq(&mut st);
        }
    }

    // ----- the bus master (BAR 4, 8 bytes per channel) -----

    /// A read of bus-master register `offset` (0: command, 2: status, 4-7: table).
    pub fn bm_read(&self, offset: u64) -> u8 {
        let st = self.state.lock();
        match offset {
            0 => st.bm.cmd,
            2 => st.bm.status,
            4..=7 => (st.bm.prd >> (8 * (offset - 4))) as u8,
            _ => 0xff,
        }
    }

    /// A write of bus-master register `offset`.
    pub fn bm_write(&self, offset: u64, value: u8) {
        match offset {
            0 => self.bm_cmd_write(value),
            2 => self.with_state(|st| {
                let s = st.bm.status;
                st.bm.status = (value & BM_STATUS_CAPABLE)
                    | (s & BM_STATUS_ACTIVE)
                    | (s & !value & (BM_STATUS_ERROR | BM_STATUS_INT));
                ((), None)
            }),
            4..=7 => self.with_state(|st| {
                let shift = 8 * (offset - 4);
                let prd = (st.bm.prd & !(0xff << shift)) | (u32::from(value) << shift);
                st.bm.prd = prd & !3;
                ((), None)
            }),
            _ => {}
        }
    }

    fn bm_cmd_write(&self, value: u8) {
        let stopping = {
            let st = self.state.lock();
            st.bm.cmd & BM_CMD_START != 0 && value & BM_CMD_START == 0
        };
        if stopping {
            // Stopping the engine waits for a transfer that runs (QEMU cancels it
            // synchronously too, with `blk_drain`, which lets throttled requests go).
            self.drain_lifting(None);
        }
        self.with_state(|st| {
            let starting = st.bm.cmd & BM_CMD_START == 0 && value & BM_CMD_START != 0;
            st.bm.cmd = value & (BM_CMD_START | BM_CMD_TO_MEMORY);
            if value & BM_CMD_START == 0 {
                st.bm.status &= !BM_STATUS_ACTIVE;
                return ((), None);
            }
            if !starting {
                return ((), None);
            }
            st.bm.status |= BM_STATUS_ACTIVE;
            let job = st.dma_pending.take().map(|op| self.dma_job(st, op));
            ((), job)
        })
    }

    /// Issues `op`: at once if the bus master runs, else when the driver starts it.
    pub(crate) fn start_dma(&self, st: &mut ChannelState, op: DmaOp) -> Option<Job> {
        st.drives[op.unit].tf.status = status::DRDY | status::DSC | status::BSY;
        if st.bm.cmd & BM_CMD_START != 0 {
            st.bm.status |= BM_STATUS_ACTIVE;
            Some(self.dma_job(st, op))
        } else {
            st.dma_pending = Some(op);
            None
        }
    }

    /// The transfer of `op` through the PRD table, on the worker.
    fn dma_job(&self, st: &ChannelState, op: DmaOp) -> Job {
        let prd = st.bm.prd;
        let backend = st.info[op.unit].as_ref().and_then(|i| i.backend.clone());
        let bus_master = self.bus_master.load(Ordering::Acquire);
        Job::new(op.unit, move |machine| {
            let machine = machine.upgrade().filter(|_| bus_master);
            let result = match (machine, backend) {
                (Some(machine), Some(backend)) => dma_transfer(&machine, &backend, prd, &op),
                (Some(machine), None) if matches!(op.dir, DmaDir::Reply(_)) => {
                    dma_transfer(&machine, &Arc::new(NoMedium), prd, &op)
                }
                _ => Err(DmaError::Io),
            };
            Box::new(move |st: &mut ChannelState| {
                dma_complete(st, &op, result);
                None
            })
        })
    }

    // ----- machine reset and migration -----

    /// Back to the power-on state (the machine resets).
    pub fn reset(&self) {
        {
            let mut st = self.state.lock();
            st.dma_pending = None;
            for unit in 0..UNITS {
                st.generation[unit] += 1;
                st.transfer_stop(unit);
            }
        }
        self.drain_lifting(None);
        let mut st = self.state.lock();
        st.ctrl = 0;
        st.unit = 0;
        st.bm = Bmdma::default();
        st.dma_pending = None;
        st.irq = false;
        for unit in 0..UNITS {
            drive_reset(&mut st, unit);
            st.drives[unit].write_cache = st.info[unit].as_ref().is_some_and(|i| i.write_cache);
            st.drives[unit].xfer_mode = DEFAULT_XFER_MODE;
        }
        self.sync_irq(&mut st);
    }

    /// The channel's state for a snapshot (commands in flight finish first).
    pub fn save(&self, section: &mut VmStateSection, prefix: &str) {
        self.drain_lifting(None);
        let st = self.state.lock();
        let saved = SavedChannel {
            drives: st.drives.clone(),
            unit: st.unit,
            ctrl: st.ctrl,
            bm: st.bm.clone(),
            dma_pending: st.dma_pending.clone(),
            irq: st.irq,
        };
        section.put(prefix, saved);
        for (i, d) in st.drives.iter().enumerate() {
            section.put_bytes(&format!("{prefix}.buffer{i}"), &d.buffer);
        }
    }

    /// Puts back what [`IdeChannel::save`] saved, checked: a stream cannot point the
    /// data window outside its buffer or select a unit that does not exist.
    pub fn load(&self, section: &VmStateSection, prefix: &str) -> Result<(), VmStateError> {
        self.drain_lifting(None);
        let mut saved: SavedChannel = section.get(prefix)?;
        let bad = |reason: &str| VmStateError::BadField {
            field: prefix.to_string(),
            reason: reason.to_string(),
        };
        let st = self.state.lock();
        for (i, d) in saved.drives.iter_mut().enumerate() {
            d.buffer = section.get_bytes(&format!("{prefix}.buffer{i}"))?;
            if d.pos > d.end || d.end > d.buffer.len() {
                return Err(bad("data window outside the buffer"));
            }
            // A sector command in progress stays within the medium, in whole blocks.
            let sectors = st.info[i].as_ref().map_or(0, |info| info.sectors());
            let in_medium = d.lba.checked_add(d.remaining).is_some_and(|end| end <= sectors);
            let block_ok = (1..=u64::from(MAX_MULT_SECTORS)).contains(&d.block);
            if d.remaining > 0 && !(in_medium && block_ok) {
                return Err(bad("a sector command outside the medium"));
            }
            let cd_blocks = sectors / 4;
            let cd_end = d.cd_lba.checked_add(d.packet_left.div_ceil(2048));
            if d.cd_reading && cd_end.is_none_or(|end| end > cd_blocks) {
                return Err(bad("a CD read outside the medium"));
            }
        }
        drop(st);
        if saved.unit >= UNITS || saved.dma_pending.as_ref().is_some_and(|op| op.unit >= UNITS) {
            return Err(bad("no such unit"));
        }
        let reply_len_differs = |op: &DmaOp| match &op.dir {
            DmaDir::Reply(data) => data.len() as u64 != op.len,
            _ => false,
        };
        if saved.dma_pending.as_ref().is_some_and(reply_len_differs) {
            return Err(bad("a DMA reply of the wrong length"));
        }
        let mut st = self.state.lock();
        for generation in &mut st.generation {
            *generation += 1;
        }
        st.drives = saved.drives;
        st.unit = saved.unit;
        st.ctrl = saved.ctrl;
        st.bm = saved.bm;
        st.dma_pending = saved.dma_pending;
        st.irq = saved.irq;
        st.irq_driven = !st.irq;
        self.sync_irq(&mut st);
        Ok(())
    }

    /// Logs a guest's odd access, rate-limited.
    pub(crate) fn guest_error(&self, message: impl FnOnce() -> String) {
        if self.log.allow() {
            log::warn!("ide: {}", message());
        }
    }

    // ----- ATA commands -----

    /// QEMU's `ide_exec_cmd`: the command register was written.
    fn exec_cmd(&self, st: &mut ChannelState, cmd: u8) -> Option<Job> {
        let unit = st.unit;
        let Some(kind) = st.unit_kind(unit) else {
            // An absent master beside a slave answers as QEMU's empty IDEState does: every
            // command aborts (a driver's IDENTIFY gets its answer at once, not a timeout);
            // commands to an absent slave go nowhere.
            if unit == 0 && st.info[1].is_some() {
                st.abort(unit);
                st.set_irq();
            }
            return None;
        };
        let tf = &st.drives[unit].tf;
        // Only DEVICE RESET is taken while busy, and only by ATAPI devices.
        if tf.status & (status::BSY | status::DRQ) != 0 && !(cmd == 0x08 && kind == DriveKind::Cd) {
            return None;
        }
        let hd = kind == DriveKind::Hd;
        st.drives[unit].tf.error = 0;
        match cmd {
            // DEVICE RESET of an ATAPI drive is [`IdeChannel::device_reset`]'s.
            0x08 if !hd => None,
            // RECALIBRATE, SEEK, and the power management commands: nothing to do.
            0x10..=0x1f | 0x70..=0x7f | 0xe0..=0xe3 if hd => self.complete(st, unit),
            // CHECK POWER MODE: active.
            0xe5 if hd => {
                st.drives[unit].tf.nsector = 0xff;
                self.complete(st, unit)
            }
            0x20 | 0x21 | 0x24 | 0xc4 | 0x29 if hd => {
                let lba48 = matches!(cmd, 0x24 | 0x29);
                let multiple = matches!(cmd, 0xc4 | 0x29);
                self.begin_sectors(st, unit, lba48, multiple).and_then(|()| sector_read(st, unit))
            }
            0x30 | 0x31 | 0x34 | 0xc5 | 0x39 if hd => {
                let lba48 = matches!(cmd, 0x34 | 0x39);
                let multiple = matches!(cmd, 0xc5 | 0x39);
                if self.begin_sectors(st, unit, lba48, multiple).is_some() {
                    let d = &mut st.drives[unit];
                    d.tf.status = status::DRDY | status::DSC;
                    let n = d.remaining.min(d.block) as usize;
                    st.receive_start(unit, n * SECTOR_SIZE as usize, EndTransfer::WriteBlock);
                }
                None
            }
            0xc8 | 0xc9 | 0x25 | 0xca | 0xcb | 0x35 if hd => {
                let lba48 = matches!(cmd, 0x25 | 0x35);
                self.begin_sectors(st, unit, lba48, false)?;
                let d = &st.drives[unit];
                let op = DmaOp {
                    unit,
                    dir: if matches!(cmd, 0xca | 0xcb | 0x35) {
                        DmaDir::Write
                    } else {
                        DmaDir::Read
                    },
                    offset: d.lba * SECTOR_SIZE,
                    len: d.remaining * SECTOR_SIZE,
                    atapi: false,
                };
                self.start_dma(st, op)
            }
            // READ VERIFY: the range is checked, nothing is read.
            0x40..=0x42 if hd => {
                self.begin_sectors(st, unit, cmd == 0x42, false)?;
                let d = &mut st.drives[unit];
                let end = d.lba + d.remaining;
                set_sector(d, end.saturating_sub(1));
                self.complete(st, unit)
            }
            // READ NATIVE MAX ADDRESS (EXT).
            0xf8 | 0x27 if hd => {
                let sectors = st.info[unit].as_ref().map_or(0, |i| i.sectors());
                let d = &mut st.drives[unit];
                d.lba48 = cmd == 0x27;
                set_sector(d, sectors.saturating_sub(1));
                self.complete(st, unit)
            }
            // SET MULTIPLE MODE.
            0xc6 if hd => {
                let n = st.drives[unit].tf.nsector;
                if n > MAX_MULT_SECTORS || (n != 0 && !n.is_power_of_two()) {
                    st.abort(unit);
                    st.set_irq();
                    return None;
                }
                st.drives[unit].mult_sectors = n;
                self.complete(st, unit)
            }
            // INITIALIZE DEVICE PARAMETERS: translation is the BIOS's business.
            0x91 if hd => self.complete(st, unit),
            // FLUSH CACHE on a CD: nothing to write back.
            0xe7 if !hd => self.complete(st, unit),
            // FLUSH CACHE (EXT).
            0xe7 | 0xea if hd => {
                st.drives[unit].tf.status = status::DRDY | status::DSC | status::BSY;
                let backend = st.info[unit].as_ref().and_then(|i| i.backend.clone());
                Some(Job::new(unit, move |_| {
                    let ok = backend.is_none_or(|b| b.flush().is_ok());
                    Box::new(move |st: &mut ChannelState| {
                        if ok {
                            st.drives[unit].tf.status = status::DRDY | status::DSC;
                        } else {
                            st.abort(unit);
                        }
                        st.set_irq();
                        None
                    })
                }))
            }
            0xec => {
                if !hd {
                    // An ATAPI device answers IDENTIFY DEVICE with its signature.
                    set_signature(st, unit);
                    st.abort(unit);
                    st.set_irq();
                    return None;
                }
                let data = identify(st, unit);
                let d = &mut st.drives[unit];
                d.tf.status = status::DRDY | status::DSC;
                st.transfer_start(unit, data, EndTransfer::Stop);
                st.set_irq();
                None
            }
            0xa1 if !hd => {
                let data = packet_device(st, unit)
                    .map_or_else(|| vec![0; 512], |dev| dev.identify_packet(st, unit));
                let d = &mut st.drives[unit];
                d.tf.status = status::DRDY | status::DSC;
                st.transfer_start(unit, data, EndTransfer::Stop);
                st.set_irq();
                None
            }
            0xa0 if !hd => {
                let d = &mut st.drives[unit];
                // Overlapped commands are not offered.
                if d.tf.feature & 0x02 != 0 {
                    st.abort(unit);
                    st.set_irq();
                    return None;
                }
                d.tf.status = status::DRDY | status::DSC;
                d.atapi_dma = d.tf.feature & 1 != 0;
                // Interrupt reason: the device wants a command packet.
                d.tf.nsector = 1;
                st.receive_start(unit, PACKET_SIZE, EndTransfer::Packet);
                None
            }
            // EXECUTE DEVICE DIAGNOSTIC (a CD does not interrupt: ATAPI devices never set
            // DRDY here).
            0x90 => {
                set_signature(st, unit);
                let d = &mut st.drives[unit];
                d.tf.status = if hd { status::DRDY | status::DSC } else { 0 };
                d.tf.error = 0x01;
                if hd {
                    st.set_irq();
                }
                None
            }
            // READ SECTORS to a CD: its signature, then the abort (ATA-4 asks for both).
            0x20 | 0x21 => {
                set_signature(st, unit);
                st.abort(unit);
                st.set_irq();
                None
            }
            0xef => self.set_features(st, unit),
            _ => {
                // Commands of the other kind of drive abort quietly: drivers probe with
                // them (IDENTIFY PACKET DEVICE to a disk tells it from a CD).
                if !is_known_command(cmd) {
                    let name = if hd { "ide-hd" } else { "ide-cd" };
                    self.guest_error(|| format!("{name}: unsupported command {cmd:#04x}"));
                }
                st.abort(unit);
                st.set_irq();
                None
            }
        }
    }

    /// Ends a command that moves no data (QEMU's `ide_cmd_done` and `ide_set_irq`).
    fn complete(&self, st: &mut ChannelState, unit: usize) -> Option<Job> {
        st.drives[unit].tf.status = status::DRDY | status::DSC;
        st.set_irq();
        None
    }

    /// SET FEATURES.
    fn set_features(&self, st: &mut ChannelState, unit: usize) -> Option<Job> {
        let d = &mut st.drives[unit];
        match d.tf.feature {
            0x02 => d.write_cache = true,
            0x82 => d.write_cache = false,
            // Transfer mode: PIO (0, 1), multiword DMA (4) or Ultra DMA (8), mode in the
            // low three bits.
            0x03 => {
                let mode = d.tf.nsector;
                match mode >> 3 {
                    0 | 1 | 2 | 4 | 8 => d.xfer_mode = mode,
                    _ => {
                        st.abort(unit);
                        st.set_irq();
                        return None;
                    }
                }
            }
            // Features that change nothing here (look-ahead, reverting, APM, ...).
            0xcc | 0x66 | 0xaa | 0x55 | 0x05 | 0x85 | 0x69 | 0x67 | 0x96 | 0x9a | 0x42 | 0xc2 => {}
            other => {
                self.guest_error(|| format!("SET FEATURES: unsupported feature {other:#04x}"));
                st.abort(unit);
                st.set_irq();
                return None;
            }
        }
        self.complete(st, unit)
    }

    /// Reads the LBA and count of a sector command into the drive and checks them against
    /// the medium; aborts the command (with the interrupt) if they do not fit.
    fn begin_sectors(
        &self,
        st: &mut ChannelState,
        unit: usize,
        lba48: bool,
        multiple: bool,
    ) -> Option<()> {
        let sectors = st.info[unit].as_ref().map_or(0, |i| i.sectors());
        let chs = st.info[unit].as_ref().map_or((0, 0, 0), |i| i.chs);
        let d = &mut st.drives[unit];
        if multiple && d.mult_sectors == 0 {
            st.abort(unit);
            st.set_irq();
            return None;
        }
        d.lba48 = lba48;
        let tf = &d.tf;
        let count = if lba48 {
            match (u64::from(tf.hob_nsector) << 8) | u64::from(tf.nsector) {
                0 => 65536,
                n => n,
            }
        } else {
            match tf.nsector {
                0 => 256,
                n => u64::from(n),
            }
        };
        let lba = get_sector(d, chs);
        let Some(lba) = lba.filter(|&l| l.checked_add(count).is_some_and(|e| e <= sectors))
        else {
            st.abort(unit);
            st.set_irq();
            return None;
        };
        d.lba = lba;
        d.remaining = count;
        d.block = if multiple { u64::from(d.mult_sectors) } else { 1 };
        Some(())
    }
}

/// Whether `cmd` is a command some IDE drive here takes.
fn is_known_command(cmd: u8) -> bool {
    matches!(
        cmd,
        0x08 | 0x10..=0x1f
            | 0x20 | 0x21 | 0x24 | 0x25 | 0x27 | 0x29
            | 0x30 | 0x31 | 0x34 | 0x35 | 0x39
            | 0x40..=0x42
            | 0x70..=0x7f
            | 0x90 | 0x91 | 0xa0 | 0xa1
            | 0xc4..=0xc6 | 0xc8..=0xcb
            | 0xe0..=0xe3 | 0xe5 | 0xe7 | 0xea | 0xec | 0xef | 0xf8
    )
}

/// A CD drive without a medium, for replies that touch no disk.
struct NoMedium;

/// The medium side of a DMA transfer.
trait Medium: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> bool;
    fn write_at(&self, buf: &[u8], offset: u64) -> bool;
}

impl Medium for NoMedium {
    fn read_at(&self, _: &mut [u8], _: u64) -> bool {
        false
    }
    fn write_at(&self, _: &[u8], _: u64) -> bool {
        false
    }
}

impl Medium for BlockBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> bool {
        BlockBackend::read_at(self, buf, offset).is_ok()
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> bool {
        BlockBackend::write_at(self, buf, offset).is_ok()
    }
}

/// How a DMA transfer ended.
#[derive(Debug)]
enum DmaError {
    /// The PRD table describes less memory than the command moves.
    ShortTable,
    /// The medium failed.
    Io,
}

/// Reads the PRD table at `prd`: the guest memory ranges of a transfer of `len` bytes, and
/// whether the table describes more than that.
fn prd_ranges(machine: &MachineServices, prd: u32, len: u64) -> (Vec<(u64, u64)>, u64, bool) {
    let mut ranges = Vec::new();
    let mut total = 0u64;
    for i in 0..MAX_PRD_ENTRIES {
        let mut entry = [0u8; 8];
        machine.read_physical(u64::from(prd) + 8 * i as u64, &mut entry);
        let addr = u64::from(u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) & !1);
        let count = match u16::from_le_bytes([entry[4], entry[5]]) & 0xfffe {
            0 => 0x1_0000,
            n => u64::from(n),
        };
        let last = entry[7] & 0x80 != 0;
        let take = count.min(len - total);
        if take > 0 {
            ranges.push((addr, take));
            total += take;
        }
        if total == len {
            return (ranges, total, !last || take < count);
        }
        if last {
            break;
        }
    }
    (ranges, total, false)
}

/// Moves `op`'s bytes between the medium and the memory the PRD table names, a chunk at
/// a time. Returns whether the table had room to spare.
fn dma_transfer(
    machine: &MachineServices,
    medium: &Arc<impl Medium + ?Sized>,
    prd: u32,
    op: &DmaOp,
) -> Result<bool, DmaError> {
    let (ranges, total, more) = prd_ranges(machine, prd, op.len);
    if total < op.len {
        return Err(DmaError::ShortTable);
    }
    let tracker = machine.dirty_tracker();
    let mut chunk = Vec::new();
    let mut done = 0u64;
    let mut range = 0usize;
    let mut range_done = 0u64;
    while done < op.len {
        let n = (op.len - done).min(DMA_CHUNK as u64) as usize;
        chunk.resize(n, 0);
        match &op.dir {
            DmaDir::Read => {
                if !medium.read_at(&mut chunk, op.offset + done) {
                    return Err(DmaError::Io);
                }
            }
            DmaDir::Reply(data) => chunk.copy_from_slice(&data[done as usize..done as usize + n]),
            DmaDir::Write => {}
        }
        // Walk the ranges that cover this chunk.
        let mut at = 0usize;
        while at < n {
            let (addr, len) = ranges[range];
            let step = ((len - range_done) as usize).min(n - at);
            let guest = addr + range_done;
            if matches!(op.dir, DmaDir::Write) {
                machine.read_physical(guest, &mut chunk[at..at + step]);
            } else {
                machine.write_physical(guest, &chunk[at..at + step]);
                tracker.mark(guest, step as u64);
            }
            at += step;
            range_done += step as u64;
            if range_done == len {
                range += 1;
                range_done = 0;
            }
        }
        if matches!(op.dir, DmaDir::Write) && !medium.write_at(&chunk, op.offset + done) {
            return Err(DmaError::Io);
        }
        done += n as u64;
    }
    Ok(more)
}

/// Completes a DMA command with the transfer's `result`.
fn dma_complete(st: &mut ChannelState, op: &DmaOp, result: Result<bool, DmaError>) {
    let unit = op.unit;
    match result {
        Ok(more) => {
            if !more {
                st.bm.status &= !BM_STATUS_ACTIVE;
            }
            if op.atapi {
                if let Some(dev) = packet_device(st, unit) {
                    dev.dma_done(st, unit, true);
                }
            } else {
                let d = &mut st.drives[unit];
                let sectors = op.len / SECTOR_SIZE;
                let last = op.offset / SECTOR_SIZE + sectors;
                d.lba = last;
                d.remaining = 0;
                set_sector(d, last.saturating_sub(1));
                d.tf.status = status::DRDY | status::DSC;
            }
            st.set_irq();
        }
        // QEMU: the PRDs were too short; the engine stops without an interrupt.
        Err(DmaError::ShortTable) => {
            st.bm.status &= !BM_STATUS_ACTIVE;
            st.drives[unit].tf.status = status::DRDY | status::DSC;
        }
        Err(DmaError::Io) => {
            st.bm.status &= !BM_STATUS_ACTIVE;
            if op.atapi {
                if let Some(dev) = packet_device(st, unit) {
                    dev.dma_done(st, unit, false);
                }
            } else {
                st.abort(unit);
                st.set_irq();
            }
        }
    }
}

/// The worker thread: runs jobs, then completes them under the lock unless their drive was
/// reset in between. A job that panics (a bug) is logged and its command aborted, so that
/// nobody waits for it for ever.
fn worker(channel: Weak<IdeChannel>) {
    loop {
        let Some(ch) = channel.upgrade() else { return };
        let (generation, job) = {
            let mut q = ch.queue.lock();
            loop {
                if let Some(next) = q.jobs.pop_front() {
                    q.running = true;
                    break next;
                }
                if q.stopping {
                    ch.idle.notify_all();
                    return;
                }
                ch.work.wait(&mut q);
            }
        };
        let unit = job.unit;
        let machine = ch.machine.lock().clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let complete = (job.run)(&machine);
            let mut st = ch.state.lock();
            if st.generation[unit] == generation {
                if let Some(next) = complete(&mut st) {
                    ch.submit(&st, next);
                }
            }
            ch.sync_irq(&mut st);
            announce_tray_moves(st);
        }));
        if outcome.is_err() {
            log::error!("ide: a transfer failed unexpectedly; its command is aborted");
            let mut st = ch.state.lock();
            st.abort(unit);
            st.set_irq();
            ch.sync_irq(&mut st);
        }
        let mut q = ch.queue.lock();
        q.running = false;
        if q.jobs.is_empty() {
            ch.idle.notify_all();
        }
    }
}

/// The PIO read of the next block of the current command.
fn sector_read(st: &mut ChannelState, unit: usize) -> Option<Job> {
    let backend = st.info[unit].as_ref().and_then(|i| i.backend.clone())?;
    let d = &mut st.drives[unit];
    let n = d.remaining.min(d.block);
    let lba = d.lba;
    d.tf.status = status::DRDY | status::DSC | status::BSY;
    Some(Job::new(unit, move |_| {
        let mut data = vec![0u8; (n * SECTOR_SIZE) as usize];
        let ok = backend.read_at(&mut data, lba * SECTOR_SIZE).is_ok();
        Box::new(move |st: &mut ChannelState| {
            if !block_done(st, unit, n, ok) {
                return None;
            }
            st.drives[unit].tf.error = 0;
            st.transfer_start(unit, data, EndTransfer::ReadNext);
            st.set_irq();
            None
        })
    }))
}

/// Ends a block of a PIO sector command: if its I/O failed the command aborts (false);
/// else the task file moves past the block's `n` sectors.
fn block_done(st: &mut ChannelState, unit: usize, n: u64, ok: bool) -> bool {
    if !ok {
        st.abort(unit);
        st.set_irq();
        return false;
    }
    let d = &mut st.drives[unit];
    let (Some(remaining), Some(lba)) = (d.remaining.checked_sub(n), d.lba.checked_add(n)) else {
        st.abort(unit);
        st.set_irq();
        return false;
    };
    d.lba = lba;
    d.remaining = remaining;
    set_sector(d, lba.saturating_sub(1));
    d.tf.status = status::DRDY | status::DSC;
    true
}

/// The write of a block the guest filled; then the next block's window, or the end.
fn sector_write(st: &mut ChannelState, unit: usize, data: Vec<u8>) -> Job {
    let backend = st.info[unit].as_ref().and_then(|i| i.backend.clone());
    let d = &st.drives[unit];
    let lba = d.lba;
    let n = data.len() as u64 / SECTOR_SIZE;
    let write_through = !d.write_cache;
    Job::new(unit, move |_| {
        let ok = backend.is_some_and(|b| {
            b.write_at(&data, lba * SECTOR_SIZE).is_ok() && (!write_through || b.flush().is_ok())
        });
        Box::new(move |st: &mut ChannelState| {
            if !block_done(st, unit, n, ok) {
                return None;
            }
            let d = &st.drives[unit];
            if d.remaining > 0 {
                let next = d.remaining.min(d.block) as usize;
                st.receive_start(unit, next * SECTOR_SIZE as usize, EndTransfer::WriteBlock);
            }
            st.set_irq();
            None
        })
    })
}

/// The sector the task file addresses (QEMU's `ide_get_sector`): LBA28, LBA48 or CHS;
/// `None` for a CHS address outside the geometry.
fn get_sector(d: &DriveState, (_, heads, secs): (u32, u32, u32)) -> Option<u64> {
    let tf = &d.tf;
    if tf.select & DEV_LBA != 0 {
        let low = u64::from(tf.sector) | u64::from(tf.lcyl) << 8 | u64::from(tf.hcyl) << 16;
        if d.lba48 {
            Some(
                low | u64::from(tf.hob_sector) << 24
                    | u64::from(tf.hob_lcyl) << 32
                    | u64::from(tf.hob_hcyl) << 40,
            )
        } else {
            Some(low | u64::from(tf.select & DEV_HS) << 24)
        }
    } else {
        let cyl = u64::from(tf.hcyl) << 8 | u64::from(tf.lcyl);
        let head = u64::from(tf.select & DEV_HS);
        let sector = u64::from(tf.sector);
        if sector == 0 || sector > u64::from(secs) || head >= u64::from(heads) {
            return None;
        }
        Some((cyl * u64::from(heads) + head) * u64::from(secs) + sector - 1)
    }
}

/// Writes `lba` back into the task file in the command's addressing (QEMU's
/// `ide_set_sector`), so the driver sees where a command stopped.
fn set_sector(d: &mut DriveState, lba: u64) {
    let tf = &mut d.tf;
    if tf.select & DEV_LBA != 0 {
        tf.sector = lba as u8;
        tf.lcyl = (lba >> 8) as u8;
        tf.hcyl = (lba >> 16) as u8;
        if d.lba48 {
            tf.hob_sector = (lba >> 24) as u8;
            tf.hob_lcyl = (lba >> 32) as u8;
            tf.hob_hcyl = (lba >> 40) as u8;
        } else {
            tf.select = (tf.select & !DEV_HS) | ((lba >> 24) as u8 & DEV_HS);
        }
    }
    // CHS registers are left as the command set them: no guest of this board uses CHS
    // beyond the BIOS's first reads, which read them back only on errors.
}

/// QEMU's `ide_set_signature`: what a driver reads after a reset to tell ATA from ATAPI.
pub(crate) fn set_signature(st: &mut ChannelState, unit: usize) {
    let kind = st.unit_kind(unit);
    let tf = &mut st.drives[unit].tf;
    tf.select &= !DEV_HS;
    tf.nsector = 1;
    tf.sector = 1;
    (tf.lcyl, tf.hcyl) = match kind {
        Some(DriveKind::Cd) => (0x14, 0xeb),
        Some(DriveKind::Hd) => (0, 0),
        None => (0xff, 0xff),
    };
}

/// Sends `DEVICE_TRAY_MOVED` for the trays the guest moved, after the channel's lock is
/// released (the monitor's clients may be asking the channel at the same time).
fn announce_tray_moves(mut st: parking_lot::MutexGuard<'_, ChannelState>) {
    if st.tray_moves.is_empty() {
        return;
    }
    let moves: Vec<_> = std::mem::take(&mut st.tray_moves)
        .into_iter()
        .filter_map(|(unit, open)| {
            let info = st.info.get(unit)?.as_ref()?;
            Some((info.blk_name.clone(), info.qdev_id.clone(), open))
        })
        .collect();
    drop(st);
    for (blk_name, qdev, open) in moves {
        crate::core::removable_media::tray_moved(&blk_name, &qdev, open);
    }
}

/// QEMU's `ide_reset` of one drive.
fn drive_reset(st: &mut ChannelState, unit: usize) {
    let d = &mut st.drives[unit];
    // The write cache setting and transfer mode survive; the tray is closed and unlocked
    // (QEMU's ide_reset).
    let keep = (d.write_cache, d.xfer_mode, d.new_media, d.eject_request);
    *d = DriveState {
        mult_sectors: MAX_MULT_SECTORS,
        write_cache: keep.0,
        xfer_mode: keep.1,
        new_media: keep.2,
        eject_request: keep.3,
        ..DriveState::default()
    };
    d.tf.select = DEV_ALWAYS_ON;
    d.tf.status = status::DRDY | status::DSC;
    set_signature(st, unit);
}

/// Copies `text` into IDENTIFY's byte-swapped string words, space padded.
pub(crate) fn put_string(words: &mut [u16], text: &str) {
    let bytes = text.as_bytes();
    for (i, w) in words.iter_mut().enumerate() {
        let hi = bytes.get(2 * i).copied().unwrap_or(b' ');
        let lo = bytes.get(2 * i + 1).copied().unwrap_or(b' ');
        *w = u16::from(hi) << 8 | u16::from(lo);
    }
}

/// IDENTIFY words as the 512 bytes the data port returns.
pub(crate) fn words_to_bytes(words: &[u16; 256]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// IDENTIFY DEVICE (QEMU's `ide_identify`): an ATA-6 disk with LBA48, DMA and a write
/// cache.
fn identify(st: &ChannelState, unit: usize) -> Vec<u8> {
    let Some(info) = st.info[unit].as_ref() else {
        return vec![0; 512];
    };
    let d = &st.drives[unit];
    let (cyls, heads, secs) = info.chs;
    let sectors = info.sectors();
    let mut w = [0u16; 256];
    w[0] = 0x0040; // fixed, not removable
    w[1] = cyls as u16;
    w[3] = heads as u16;
    w[4] = (512 * secs) as u16;
    w[5] = 512;
    w[6] = secs as u16;
    put_string(&mut w[10..20], &info.serial);
    w[20] = 3;
    w[21] = 512;
    w[22] = 4;
    put_string(&mut w[23..27], &info.version);
    put_string(&mut w[27..47], &info.model);
    w[47] = 0x8000 | u16::from(MAX_MULT_SECTORS);
    w[48] = 1; // dword I/O
    w[49] = 1 << 11 | 1 << 9 | 1 << 8; // IORDY, LBA, DMA
    w[51] = 0x200;
    w[52] = 0x200;
    w[53] = 1 | 1 << 1 | 1 << 2; // words 54-58, 64-70 and 88 are valid
    w[54] = cyls as u16;
    w[55] = heads as u16;
    w[56] = secs as u16;
    let chs_sectors = cyls * heads * secs;
    w[57] = chs_sectors as u16;
    w[58] = (chs_sectors >> 16) as u16;
    if d.mult_sectors != 0 {
        w[59] = 0x100 | u16::from(d.mult_sectors);
    }
    let lba28 = sectors.min((1 << 28) - 1);
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    // Single and multiword DMA 0-2 supported, the selected mode in the high byte.
    let (mdma, udma) = xfer_selected(d.xfer_mode);
    w[62] = 0x07;
    w[63] = 0x07 | mdma;
    w[64] = 0x03; // PIO 3 and 4
    w[65] = 120;
    w[66] = 120;
    w[67] = 120;
    w[68] = 120;
    w[80] = 0xf0; // ATA-4 to ATA-7
    w[81] = 0x16;
    w[82] = 1 << 14 | 1 << 5; // NOP, write cache
    w[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10; // FLUSH CACHE (EXT), LBA48
    w[84] = 1 << 14 | if info.wwn != 0 { 1 << 8 } else { 0 };
    w[85] = 1 << 14 | if d.write_cache { 1 << 5 } else { 0 };
    w[86] = 1 << 13 | 1 << 12 | 1 << 10;
    w[87] = w[84];
    w[88] = 0x3f | udma; // UDMA 0-5
    w[93] = 1 | 1 << 14 | 0x2000;
    for (i, word) in w[100..104].iter_mut().enumerate() {
        *word = (sectors >> (16 * i)) as u16;
    }
    let exp = (info.physical_block_size / SECTOR_SIZE as u32).max(1).trailing_zeros() as u16;
    w[106] = 0x6000 | exp;
    if info.wwn != 0 {
        for (i, word) in w[108..112].iter_mut().enumerate() {
            *word = (info.wwn >> (48 - 16 * i)) as u16;
        }
    }
    w[217] = info.rotation_rate;
    words_to_bytes(&w)
}

/// The IDENTIFY bits of the transfer mode SET FEATURES chose: (multiword DMA, Ultra DMA).
pub(crate) fn xfer_selected(mode: u8) -> (u16, u16) {
    let n = mode & 7;
    match mode >> 3 {
        4 => (1 << (n + 8), 0),
        8 => (0, 1 << (n + 8)),
        _ => (0, 0),
    }
}

/// QEMU's `IDEBus`: the qdev bus `ide-hd` and `ide-cd` plug into (`ide.0`, `ide.1`),
/// holding the channel its controller drives.
#[derive(qom::Object)]
#[qom(name = TYPE_IDE_BUS)]
pub struct IdeBus {
    #[parent]
    parent: BusState,
    channel: Mutex<Option<Arc<IdeChannel>>>,
    /// The channel's number on its controller (firmware paths name it).
    bus_id: Mutex<u32>,
}

type_init!(IdeBus);

impl IdeBus {
    /// Gives the bus the channel and its number (the controller does, at realize).
    pub fn set_channel(&self, channel: Arc<IdeChannel>, bus_id: u32) {
        *self.channel.lock() = Some(channel);
        *self.bus_id.lock() = bus_id;
    }

    /// The channel behind the bus.
    pub fn channel(&self) -> Option<Arc<IdeChannel>> {
        self.channel.lock().clone()
    }

    /// The channel's number on its controller.
    pub fn bus_id(&self) -> u32 {
        *self.bus_id.lock()
    }
}

/// The command block's ports as a region: the data port (16 or 32 bits) at 0, byte
/// registers at 1-7.
pub struct CommandBlockPorts(pub Arc<IdeChannel>);

impl MemoryRegionOps for CommandBlockPorts {
    fn read(&self, offset: u64, size: u32) -> u64 {
        if offset == 0 && size >= 2 {
            return self.0.data_read(size.min(4));
        }
        // Wider accesses elsewhere read successive byte registers.
        (0..u64::from(size.min(8)))
            .map(|i| u64::from(self.0.ioport_read(offset + i)) << (8 * i))
            .sum()
    }

    fn write(&self, offset: u64, value: u64, size: u32) {
        if offset == 0 && size >= 2 {
            return self.0.data_write(value, size.min(4));
        }
        for i in 0..u64::from(size.min(8)) {
            if offset + i < 8 {
                self.0.ioport_write(offset + i, (value >> (8 * i)) as u8);
            }
        }
    }
}

/// The control block's port: alternate status, device control.
pub struct ControlPort(pub Arc<IdeChannel>);

impl MemoryRegionOps for ControlPort {
    fn read(&self, _offset: u64, _size: u32) -> u64 {
        u64::from(self.0.altstatus_read())
    }

    fn write(&self, _offset: u64, value: u64, _size: u32) {
        self.0.ctrl_write(value as u8);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A channel with `info` at unit 0 and no interrupt or memory behind it.
    pub(crate) fn channel_with(info: DriveInfo) -> Arc<IdeChannel> {
        let ch = Arc::new(IdeChannel::default());
        assert!(ch.attach(0, Arc::new(info)).is_ok());
        ch
    }

    pub(crate) fn hd_info(backend: Option<Arc<BlockBackend>>) -> DriveInfo {
        DriveInfo {
            kind: DriveKind::Hd,
            packet: None,
            backend,
            blk_name: String::new(),
            qdev_id: "/machine/unattached/device[0]".into(),
            serial: "QM00001".into(),
            model: "QEMU HARDDISK".into(),
            version: "2.5+".into(),
            wwn: 0,
            chs: (16, 16, 63),
            physical_block_size: 512,
            rotation_rate: 0,
            write_cache: true,
        }
    }

    #[test]
    fn a_disk_shows_the_ata_signature_and_absent_units_read_zero() {
        let ch = channel_with(hd_info(None));
        assert_eq!(ch.ioport_read(2), 1);
        assert_eq!(ch.ioport_read(3), 1);
        assert_eq!((ch.ioport_read(4), ch.ioport_read(5)), (0, 0));
        assert_eq!(ch.ioport_read(7), status::DRDY | status::DSC);
        // The slave is absent: its registers read 0.
        ch.ioport_write(6, DEV_SELECT);
        assert_eq!(ch.ioport_read(7), 0);
        assert_eq!(ch.altstatus_read(), 0);
        assert_eq!(ch.ioport_read(6), 0);
    }

    #[test]
    fn lba48_registers_keep_their_high_order_bytes() {
        let ch = channel_with(hd_info(None));
        ch.ioport_write(3, 0x44);
        ch.ioport_write(3, 0x11);
        ch.ioport_write(6, DEV_LBA);
        assert_eq!(ch.ioport_read(3), 0x11);
        ch.ctrl_write(CTRL_HOB);
        assert_eq!(ch.ioport_read(3), 0x44);
        let mut st = ch.state.lock();
        st.drives[0].lba48 = true;
        assert_eq!(get_sector(&st.drives[0], (16, 16, 63)), Some(0x4400_0011));
    }

    #[test]
    fn identify_describes_the_disk_and_a_chs_outside_it_aborts() {
        let ch = channel_with(hd_info(None));
        ch.ioport_write(7, 0xec);
        assert_eq!(ch.ioport_read(7) & status::DRQ, status::DRQ);
        let words: Vec<u16> = (0..256).map(|_| ch.data_read(2) as u16).collect();
        assert_eq!(ch.ioport_read(7), status::DRDY | status::DSC, "DRQ ends with the data");
        assert_eq!(words[0], 0x0040);
        assert_eq!(words[27], u16::from_be_bytes(*b"QE"));
        assert_eq!(words[83] & 1 << 10, 1 << 10, "LBA48");
        // Sector 0 of CHS does not exist.
        ch.ioport_write(3, 0);
        ch.ioport_write(2, 1);
        ch.ioport_write(6, 0);
        ch.ioport_write(7, 0x20);
        assert_eq!(ch.ioport_read(7), status::DRDY | status::ERR);
        assert_eq!(ch.ioport_read(1), ABRT);
    }

    #[test]
    fn software_reset_restores_the_signature_and_unknown_commands_abort() {
        let ch = channel_with(hd_info(None));
        ch.ioport_write(7, 0xb0);
        assert_eq!(ch.ioport_read(7), status::DRDY | status::ERR);
        ch.ioport_write(4, 0x55);
        ch.ctrl_write(CTRL_SRST);
        ch.ctrl_write(0);
        assert_eq!(ch.ioport_read(4), 0);
        assert_eq!(ch.ioport_read(1), 0x01, "diagnostic passed");
        assert_eq!(ch.ioport_read(7), status::DRDY | status::DSC);
    }

    #[test]
    fn a_saved_channel_loads_and_a_bad_window_is_refused() {
        let ch = channel_with(hd_info(None));
        ch.ioport_write(7, 0xec);
        for _ in 0..10 {
            ch.data_read(2);
        }
        let mut section = VmStateSection::new(1);
        ch.save(&mut section, "ide0");
        let other = channel_with(hd_info(None));
        other.load(&section, "ide0").unwrap();
        assert_eq!(other.data_read(2), ch.data_read(2));
        let mut bad = section.clone();
        bad.put_bytes("ide0.buffer0", &[0; 4]);
        assert!(other.load(&bad, "ide0").is_err());
    }
}
