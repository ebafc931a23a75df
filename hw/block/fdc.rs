//! The floppy disk controller (QEMU's `hw/block/fdc.c`: an Intel 82078 in AT mode) and
//! its drives: the controller's registers and command phases, the `floppy-bus` it
//! carries, and the `floppy` drives on it. `isa-fdc` (`fdc_isa.rs`) puts a controller on
//! the ISA bus, as every pc has one at 0x3f0.
//!
//! The guest writes a command and its parameters into the FIFO; the controller executes
//! it and leaves result bytes to read, raising its IRQ where the command says. Sector
//! data moves through ISA DMA (the controller asks its channel for service and copies
//! when the DMA controller calls it back) or, with DMA off, byte by byte through the FIFO.
//! Images are 512-byte sectors whose geometry (heads, tracks, sectors a track) is picked
//! from the image's size out of QEMU's table of floppy formats; the drive's type (1.44 MB,
//! 2.88 MB, 1.2 MB) from the first medium, or the controller's fallback without one.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use block::{BlockBackend, BlockError};
use parking_lot::Mutex;
use qom::{type_init, Prop, Size};
use serde::{Deserialize, Serialize};

use crate::core::bus::BusState;
use crate::core::io_worker::IoWorker;
use crate::core::irq::IrqLine;
use crate::core::log_limit::RateLimitedLog;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::core::removable_media::{claim_medium, release_medium, RemovableMedia};
use crate::core::timer::VirtualTimer;
use crate::isa::isa_bus::{IsaDma, IsaDmaClient};

/// QEMU's `TYPE_FLOPPY_BUS`.
pub const TYPE_FLOPPY_BUS: &str = "floppy-bus";
/// QEMU's `TYPE_FLOPPY_DRIVE`.
pub const TYPE_FLOPPY_DRIVE: &str = "floppy";
/// Drives a controller has (QEMU's `MAX_FD` on x86).
pub const MAX_FD: usize = 2;

const SECTOR_LEN: usize = 512;
/// Sector size code of 512-byte sectors.
const SECTOR_SIZE_CODE: u8 = 2;
/// SENSE INTERRUPT STATUS answers after a reset, one per drive the controller polls.
const RESET_SENSEI_COUNT: i32 = 4;
/// READ ID's result comes after the drive has turned (QEMU's 1/50 s of VM time).
const READ_ID_DELAY: Duration = Duration::from_millis(20);

fn read_id_delay_ns() -> u64 {
    READ_ID_DELAY.as_nanos() as u64
}

qom::qom_enum! {
    /// QAPI's `FloppyDriveType`.
    pub enum FloppyDriveType("FdcDriveType") {
        /// 3.5" 1.44 MB.
        Type144 = "144",
        /// 3.5" 2.88 MB.
        Type288 = "288",
        /// 5.25" 1.2 MB.
        Type120 = "120",
        /// No drive.
        None = "none",
        /// From the medium.
        Auto = "auto",
    }
}

impl FloppyDriveType {
    /// QEMU's `cmos_get_fd_drive_type`: the CMOS nibble of the drive type.
    pub fn cmos(self) -> u8 {
        match self {
            FloppyDriveType::Type144 => 4,
            FloppyDriveType::Type288 => 5,
            FloppyDriveType::Type120 => 2,
            _ => 0,
        }
    }

    /// The drive's physical size (QEMU's `drive_size`): 5.25" or 3.5".
    fn physical_size(self) -> Option<bool> {
        match self {
            FloppyDriveType::Type120 => Some(true),
            FloppyDriveType::Type144 | FloppyDriveType::Type288 => Some(false),
            _ => None,
        }
    }

    /// The largest cylinder, head and sector numbers of any format of the drive type
    /// (QEMU's `isa_fdc_get_drive_max_chs`), as ACPI's `_FDI` describes the drive.
    pub fn max_chs(self) -> (u8, u8, u8) {
        let (mut c, mut h, mut s) = (0u8, 0u8, 0u8);
        for f in FD_FORMATS.iter().filter(|f| f.drive == self) {
            c = c.max(f.max_track);
            h = h.max(f.max_head);
            s = s.max(f.last_sect);
        }
        (c.saturating_sub(1), h, s)
    }
}

/// Data rates (the DSR/CCR's two low bits).
const RATE_500K: u8 = 0;
const RATE_300K: u8 = 1;
const RATE_250K: u8 = 2;
const RATE_1M: u8 = 3;

/// A floppy format (QEMU's `FDFormat`).
struct FdFormat {
    drive: FloppyDriveType,
    last_sect: u8,
    max_track: u8,
    max_head: u8,
    rate: u8,
}

const fn fmt(drive: FloppyDriveType, last_sect: u8, max_track: u8, max_head: u8, rate: u8) -> FdFormat {
    FdFormat { drive, last_sect, max_track, max_head, rate }
}

/// QEMU's `fd_formats`, in its order of preference.
const FD_FORMATS: &[FdFormat] = {
    use FloppyDriveType::{Type120 as T120, Type144 as T144, Type288 as T288};
    &[
        // 1.44 MB 3.5"
        fmt(T144, 18, 80, 1, RATE_500K),
        fmt(T144, 20, 80, 1, RATE_500K),
        fmt(T144, 21, 80, 1, RATE_500K),
        fmt(T144, 21, 82, 1, RATE_500K),
        fmt(T144, 21, 83, 1, RATE_500K),
        fmt(T144, 22, 80, 1, RATE_500K),
        fmt(T144, 23, 80, 1, RATE_500K),
        fmt(T144, 24, 80, 1, RATE_500K),
        // 2.88 MB 3.5"
        fmt(T288, 36, 80, 1, RATE_1M),
        fmt(T288, 39, 80, 1, RATE_1M),
        fmt(T288, 40, 80, 1, RATE_1M),
        fmt(T288, 44, 80, 1, RATE_1M),
        fmt(T288, 48, 80, 1, RATE_1M),
        // 720 kB 3.5"
        fmt(T144, 9, 80, 1, RATE_250K),
        fmt(T144, 10, 80, 1, RATE_250K),
        fmt(T144, 10, 82, 1, RATE_250K),
        fmt(T144, 10, 83, 1, RATE_250K),
        fmt(T144, 13, 80, 1, RATE_250K),
        fmt(T144, 14, 80, 1, RATE_250K),
        // 1.2 MB 5.25"
        fmt(T120, 15, 80, 1, RATE_500K),
        fmt(T120, 18, 80, 1, RATE_500K),
        fmt(T120, 18, 82, 1, RATE_500K),
        fmt(T120, 18, 83, 1, RATE_500K),
        fmt(T120, 20, 80, 1, RATE_500K),
        // 720 kB 5.25"
        fmt(T120, 9, 80, 1, RATE_250K),
        fmt(T120, 11, 80, 1, RATE_250K),
        // 360 kB 5.25"
        fmt(T120, 9, 40, 1, RATE_300K),
        fmt(T120, 9, 40, 0, RATE_300K),
        fmt(T120, 10, 41, 1, RATE_300K),
        fmt(T120, 10, 42, 1, RATE_300K),
        // 320 kB 5.25"
        fmt(T120, 8, 40, 1, RATE_250K),
        fmt(T120, 8, 40, 0, RATE_250K),
        // 360 kB must match 5.25" better than 3.5"
        fmt(T144, 9, 80, 0, RATE_250K),
    ]
};

// Registers (offsets from the controller's base).
const REG_SRA: u64 = 0;
const REG_SRB: u64 = 1;
const REG_DOR: u64 = 2;
const REG_TDR: u64 = 3;
/// MSR when read, DSR when written.
const REG_MSR: u64 = 4;
const REG_FIFO: u64 = 5;
/// DIR when read, CCR when written.
const REG_DIR: u64 = 7;

// Commands.
const CMD_READ_TRACK: u8 = 0x02;
const CMD_SPECIFY: u8 = 0x03;
const CMD_SENSE_DRIVE_STATUS: u8 = 0x04;
const CMD_WRITE: u8 = 0x05;
const CMD_READ: u8 = 0x06;
const CMD_RECALIBRATE: u8 = 0x07;
const CMD_SENSE_INTERRUPT_STATUS: u8 = 0x08;
const CMD_WRITE_DELETED: u8 = 0x09;
const CMD_READ_ID: u8 = 0x0a;
const CMD_READ_DELETED: u8 = 0x0c;
const CMD_FORMAT_TRACK: u8 = 0x0d;
const CMD_DUMPREG: u8 = 0x0e;
const CMD_SEEK: u8 = 0x0f;
const CMD_VERSION: u8 = 0x10;
const CMD_SCAN_EQUAL: u8 = 0x11;
const CMD_PERPENDICULAR_MODE: u8 = 0x12;
const CMD_CONFIGURE: u8 = 0x13;
const CMD_LOCK: u8 = 0x14;
const CMD_VERIFY: u8 = 0x16;
const CMD_POWERDOWN_MODE: u8 = 0x17;
const CMD_PART_ID: u8 = 0x18;
const CMD_SCAN_LOW_OR_EQUAL: u8 = 0x19;
const CMD_SCAN_HIGH_OR_EQUAL: u8 = 0x1d;
const CMD_SAVE: u8 = 0x2e;
const CMD_OPTION: u8 = 0x33;
const CMD_RESTORE: u8 = 0x4e;
const CMD_DRIVE_SPECIFICATION: u8 = 0x8e;
const CMD_RELATIVE_SEEK_OUT: u8 = 0x8f;
const CMD_FORMAT_AND_WRITE: u8 = 0xcd;
const CMD_RELATIVE_SEEK_IN: u8 = 0xcf;

const CONFIG_EIS: u8 = 0x40;
const CONFIG_EFIFO: u8 = 0x20;

const SR0_SEEK: u8 = 0x20;
const SR0_ABNTERM: u8 = 0x40;
const SR0_INVCMD: u8 = 0x80;
const SR0_RDYCHG: u8 = 0xc0;
const SR0_HEAD: u8 = 0x04;
const SR0_DS_MASK: u8 = 0x03;

const SR1_MA: u8 = 0x01;
const SR1_NW: u8 = 0x02;
const SR1_EC: u8 = 0x80;

const SR2_SNS: u8 = 0x04;
const SR2_SEH: u8 = 0x08;

const SRA_NDRV2: u8 = 0x40;
const SRA_INTPEND: u8 = 0x80;

const SRB_MTR0: u8 = 0x01;
const SRB_MTR1: u8 = 0x02;
const SRB_DR0: u8 = 0x20;

const DOR_SELMASK: u8 = 0x01;
const DOR_NRESET: u8 = 0x04;
const DOR_DMAEN: u8 = 0x08;
const DOR_MOTEN0: u8 = 0x10;
const DOR_MOTEN1: u8 = 0x20;

const TDR_BOOTSEL: u8 = 0x04;

const DSR_DRATEMASK: u8 = 0x03;
const DSR_PWRDOWN: u8 = 0x40;
const DSR_SWRESET: u8 = 0x80;

const MSR_CMDBUSY: u8 = 0x10;
const MSR_NONDMA: u8 = 0x20;
const MSR_DIO: u8 = 0x40;
const MSR_RQM: u8 = 0x80;

const DIR_DSKCHG: u8 = 0x80;

const STATE_MULTI: u8 = 0x01;

/// Where a transfer's data goes (QEMU's `FD_DIR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
enum DataDir {
    #[default]
    Write,
    Read,
    ScanEqual,
    ScanLow,
    ScanHigh,
    Verify,
}

/// The controller's phase (QEMU's `FD_PHASE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
enum Phase {
    #[default]
    Command,
    Execution,
    Result,
}

/// What a command does once its parameters are in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Handler {
    Transfer(DataDir),
    TransferDeleted,
    Seek,
    SenseInterruptStatus,
    Recalibrate,
    FormatTrack,
    Restore,
    Save,
    ReadId,
    Specify,
    SenseDriveStatus,
    PerpendicularMode,
    Configure,
    PowerdownMode,
    Option,
    DriveSpecification,
    RelativeSeekOut,
    RelativeSeekIn,
    Lock,
    Dumpreg,
    Version,
    PartId,
    Unimplemented,
}

/// A command: its byte under a mask, its name, its parameter count and handler (QEMU's
/// `handlers[]`; the first match wins).
struct Command {
    value: u8,
    mask: u8,
    name: &'static str,
    parameters: u32,
    handler: Handler,
}

const fn cmd(value: u8, mask: u8, name: &'static str, parameters: u32, handler: Handler) -> Command {
    Command { value, mask, name, parameters, handler }
}

const COMMANDS: &[Command] = &[
    cmd(CMD_READ, 0x1f, "READ", 8, Handler::Transfer(DataDir::Read)),
    cmd(CMD_WRITE, 0x3f, "WRITE", 8, Handler::Transfer(DataDir::Write)),
    cmd(CMD_SEEK, 0xff, "SEEK", 2, Handler::Seek),
    cmd(CMD_SENSE_INTERRUPT_STATUS, 0xff, "SENSE INTERRUPT STATUS", 0, Handler::SenseInterruptStatus),
    cmd(CMD_RECALIBRATE, 0xff, "RECALIBRATE", 1, Handler::Recalibrate),
    cmd(CMD_FORMAT_TRACK, 0xbf, "FORMAT TRACK", 5, Handler::FormatTrack),
    cmd(CMD_READ_TRACK, 0xbf, "READ TRACK", 8, Handler::Transfer(DataDir::Read)),
    cmd(CMD_RESTORE, 0xff, "RESTORE", 17, Handler::Restore),
    cmd(CMD_SAVE, 0xff, "SAVE", 0, Handler::Save),
    cmd(CMD_READ_DELETED, 0x1f, "READ DELETED DATA", 8, Handler::TransferDeleted),
    cmd(CMD_SCAN_EQUAL, 0x1f, "SCAN EQUAL", 8, Handler::Transfer(DataDir::ScanEqual)),
    cmd(CMD_VERIFY, 0x1f, "VERIFY", 8, Handler::Transfer(DataDir::Verify)),
    cmd(CMD_SCAN_LOW_OR_EQUAL, 0x1f, "SCAN LOW OR EQUAL", 8, Handler::Transfer(DataDir::ScanLow)),
    cmd(CMD_SCAN_HIGH_OR_EQUAL, 0x1f, "SCAN HIGH OR EQUAL", 8, Handler::Transfer(DataDir::ScanHigh)),
    cmd(CMD_WRITE_DELETED, 0x3f, "WRITE DELETED DATA", 8, Handler::TransferDeleted),
    cmd(CMD_READ_ID, 0xbf, "READ ID", 1, Handler::ReadId),
    cmd(CMD_SPECIFY, 0xff, "SPECIFY", 2, Handler::Specify),
    cmd(CMD_SENSE_DRIVE_STATUS, 0xff, "SENSE DRIVE STATUS", 1, Handler::SenseDriveStatus),
    cmd(CMD_PERPENDICULAR_MODE, 0xff, "PERPENDICULAR MODE", 1, Handler::PerpendicularMode),
    cmd(CMD_CONFIGURE, 0xff, "CONFIGURE", 3, Handler::Configure),
    cmd(CMD_POWERDOWN_MODE, 0xff, "POWERDOWN MODE", 2, Handler::PowerdownMode),
    cmd(CMD_OPTION, 0xff, "OPTION", 1, Handler::Option),
    cmd(CMD_DRIVE_SPECIFICATION, 0xff, "DRIVE SPECIFICATION COMMAND", 5, Handler::DriveSpecification),
    cmd(CMD_RELATIVE_SEEK_OUT, 0xff, "RELATIVE SEEK OUT", 2, Handler::RelativeSeekOut),
    cmd(CMD_FORMAT_AND_WRITE, 0xff, "FORMAT AND WRITE", 10, Handler::Unimplemented),
    cmd(CMD_RELATIVE_SEEK_IN, 0xff, "RELATIVE SEEK IN", 2, Handler::RelativeSeekIn),
    cmd(CMD_LOCK, 0x7f, "LOCK", 0, Handler::Lock),
    cmd(CMD_DUMPREG, 0xff, "DUMPREG", 0, Handler::Dumpreg),
    cmd(CMD_VERSION, 0xff, "VERSION", 0, Handler::Version),
    cmd(CMD_PART_ID, 0xff, "PART ID", 0, Handler::PartId),
    // Not in the specification: BeOS 4.5 writes this way.
    cmd(CMD_WRITE, 0x1f, "WRITE (BeOS)", 8, Handler::Transfer(DataDir::Write)),
];

/// The unknown command's entry.
const UNKNOWN: Command = cmd(0, 0, "unknown", 0, Handler::Unimplemented);

fn command(byte: u8) -> &'static Command {
    COMMANDS
        .iter()
        .find(|c| byte & c.mask == c.value)
        .unwrap_or(&UNKNOWN)
}

/// QEMU's `fd_sector_calc`: the image sector of a cylinder, head and sector (1-based).
fn sector_index(head: u8, track: u8, sect: u8, last_sect: u8, sides: u8) -> i64 {
    ((i64::from(track) * i64::from(sides)) + i64::from(head)) * i64::from(last_sect) + i64::from(sect) - 1
}

/// How a seek went (QEMU's `fd_seek` results).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SeekResult {
    SameTrack,
    TrackChanged,
    /// The track (or head) is past the medium, or there is no medium.
    BadTrack,
    /// The sector is past the track.
    BadSector,
}

/// One drive (QEMU's `FDrive`).
#[derive(Clone)]
struct FDrive {
    /// A `floppy` device is plugged (QEMU's `blk != NULL`).
    attached: bool,
    medium: Option<Arc<BlockBackend>>,
    /// The drive's type; `Auto` until a drive is plugged.
    drive: FloppyDriveType,
    /// The medium's type.
    disk: FloppyDriveType,
    perpendicular: u8,
    head: u8,
    track: u8,
    sect: u8,
    double_sided: bool,
    last_sect: u8,
    max_track: u8,
    ro: bool,
    media_changed: bool,
    media_rate: u8,
    media_validated: bool,
}

impl Default for FDrive {
    fn default() -> Self {
        let mut d = FDrive {
            attached: false,
            medium: None,
            drive: FloppyDriveType::Auto,
            disk: FloppyDriveType::None,
            perpendicular: 0,
            head: 0,
            track: 0,
            sect: 0,
            double_sided: false,
            last_sect: 0,
            max_track: 0,
            ro: true,
            media_changed: true,
            media_rate: 0,
            media_validated: false,
        };
        d.init();
        d
    }
}

impl FDrive {
    /// QEMU's `fd_init`.
    fn init(&mut self) {
        self.perpendicular = 0;
        self.disk = FloppyDriveType::None;
        self.last_sect = 0;
        self.max_track = 0;
        self.ro = true;
        self.media_changed = true;
    }

    fn inserted(&self) -> bool {
        self.medium.is_some()
    }

    fn sides(&self) -> u8 {
        if self.double_sided {
            2
        } else {
            1
        }
    }

    /// QEMU's `fd_sector`.
    fn sector(&self) -> i64 {
        sector_index(self.head, self.track, self.sect, self.last_sect, self.sides())
    }

    /// QEMU's `fd_offset`: the byte offset of the current sector (a sector before the
    /// image's first, at sector 0 of a track, is an offset the image never has).
    fn offset(&self) -> Option<u64> {
        u64::try_from(self.sector()).ok().map(|s| s * SECTOR_LEN as u64)
    }

    /// QEMU's `fd_seek`.
    fn seek(&mut self, head: u8, track: u8, sect: u8) -> SeekResult {
        if track > self.max_track || (head != 0 && !self.double_sided) {
            return SeekResult::BadTrack;
        }
        if sect > self.last_sect {
            return SeekResult::BadSector;
        }
        let sector = sector_index(head, track, sect, self.last_sect, self.sides());
        let mut result = SeekResult::SameTrack;
        if sector != self.sector() {
            self.head = head;
            if self.track != track {
                if self.attached && self.inserted() {
                    self.media_changed = false;
                }
                result = SeekResult::TrackChanged;
            }
            self.track = track;
            self.sect = sect;
        }
        if !self.attached || !self.inserted() {
            result = SeekResult::BadTrack;
        }
        result
    }

    /// QEMU's `fd_recalibrate`.
    fn recalibrate(&mut self) {
        self.seek(0, 0, 1);
    }

    /// QEMU's `pick_geometry`: the medium's format, by its size and the drive's type.
    fn pick_geometry(&mut self, fallback: FloppyDriveType) -> bool {
        let Some(medium) = self.medium.as_ref().filter(|_| self.attached) else {
            return false;
        };
        if self.drive == FloppyDriveType::None {
            return false;
        }
        let magic = self.drive == FloppyDriveType::Auto;
        let sectors = medium.size() / SECTOR_LEN as u64;
        let (mut matched, mut size_match, mut type_match) = (None, None, None);
        let mut perfect = None;
        for (i, f) in FD_FORMATS.iter().enumerate() {
            let size = u64::from(f.max_head + 1) * u64::from(f.max_track) * u64::from(f.last_sect);
            if sectors == size {
                if magic || f.drive == self.drive {
                    perfect = Some(i);
                    break;
                } else if f.drive.physical_size() == self.drive.physical_size() {
                    matched = matched.or(Some(i));
                } else {
                    size_match = size_match.or(Some(i));
                }
            } else if type_match.is_none()
                && (f.drive == self.drive || (magic && f.drive == fallback))
            {
                type_match = Some(i);
            }
        }
        // No exact match: a size match of another drive size is suspicious (QEMU only
        // says so in a debug build); the type's first format is used.
        let _ = size_match;
        let Some(i) = perfect.or(matched).or(type_match) else {
            return false;
        };
        let f = &FD_FORMATS[i];
        self.double_sided = f.max_head != 0;
        self.max_track = f.max_track;
        self.last_sect = f.last_sect;
        self.disk = f.drive;
        self.media_rate = f.rate;
        true
    }

    /// QEMU's `pick_drive_type`: an automatic drive takes its medium's type, or the
    /// fallback.
    fn pick_drive_type(&mut self, fallback: FloppyDriveType) {
        if self.drive != FloppyDriveType::Auto {
            return;
        }
        self.drive = if self.pick_geometry(fallback) {
            self.disk
        } else {
            fallback
        };
    }

    /// QEMU's `fd_revalidate`, after a change of medium or a migration.
    fn revalidate(&mut self, fallback: FloppyDriveType) {
        if self.attached {
            self.ro = self.medium.as_ref().is_none_or(|m| m.is_read_only());
            if !self.inserted() {
                self.disk = FloppyDriveType::None;
                // QEMU's `fd_empty_seek_hack`: an empty drive can seek anywhere.
                self.last_sect = 0xff;
                self.max_track = 0xff;
            } else if !self.media_validated && self.pick_geometry(fallback) {
                self.media_validated = true;
            }
        } else {
            self.last_sect = 0;
            self.max_track = 0;
            self.double_sided = false;
            self.drive = FloppyDriveType::None;
            self.disk = FloppyDriveType::None;
        }
    }
}

/// A drive's state a migration carries (QEMU's `vmstate_fdrive` and its subsections).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DriveVmState {
    head: u8,
    track: u8,
    sect: u8,
    media_changed: bool,
    media_rate: u8,
    perpendicular: u8,
}

/// The controller's registers and FIFO (QEMU's `FDCtrl`), under one lock.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Registers {
    sra: u8,
    srb: u8,
    dor: u8,
    tdr: u8,
    dsr: u8,
    msr: u8,
    cur_drv: u8,
    status0: u8,
    status1: u8,
    status2: u8,
    fifo: Vec<u8>,
    data_pos: u32,
    data_len: u32,
    data_state: u8,
    data_dir: DataDir,
    eot: u8,
    timer0: u8,
    timer1: u8,
    precomp_trk: u8,
    config: u8,
    lock: u8,
    pwrd: u8,
    phase: Phase,
    reset_sensei: i32,
    /// READ ID's result is due.
    result_pending: bool,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            sra: 0,
            srb: 0xc0,
            dor: DOR_NRESET,
            tdr: 0,
            dsr: 0,
            msr: MSR_RQM,
            cur_drv: 0,
            status0: 0,
            status1: 0,
            status2: 0,
            fifo: vec![0; SECTOR_LEN],
            data_pos: 0,
            // The command phase waits for the command byte.
            data_len: 1,
            data_state: 0,
            data_dir: DataDir::Write,
            eot: 0,
            timer0: 0,
            timer1: 0,
            precomp_trk: 0,
            // Implied seeks, FIFO disabled.
            config: CONFIG_EIS | CONFIG_EFIFO,
            lock: 0,
            pwrd: 0,
            phase: Phase::Command,
            reset_sensei: 0,
            result_pending: false,
        }
    }
}

/// What a migration moves (QEMU's `vmstate_fdc`).
#[derive(Serialize, Deserialize)]
pub struct FdcVmState {
    regs: Registers,
    drives: Vec<DriveVmState>,
}

/// The controller's state.
struct FdcState {
    regs: Registers,
    drives: [FDrive; MAX_FD],
}

/// The controller's connections: its IRQ, its DMA channel and READ ID's timer.
struct FdcIo {
    irq: Mutex<IrqLine>,
    /// Makes the image reads and writes a vCPU thread may not make itself.
    worker: OnceLock<IoWorker>,
    dma: OnceLock<(Arc<dyn IsaDma>, usize)>,
    timer: OnceLock<VirtualTimer>,
    fallback: Mutex<FloppyDriveType>,
    log: RateLimitedLog,
}

impl FdcIo {
    /// Makes a block I/O call where this thread may (see [`IoWorker`]); without a worker
    /// (a controller outside a machine) here.
    fn block_io<T: Send + 'static>(&self, call: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        match self.worker.get() {
            Some(worker) => worker.run(call),
            None => Some(call()),
        }
    }

    fn set_irq(&self, level: bool) {
        self.irq.lock().set(level);
    }

    fn dma(&self) -> Option<&(Arc<dyn IsaDma>, usize)> {
        self.dma.get()
    }
}

/// A floppy disk controller: its state and connections.
pub struct Fdc {
    state: Mutex<FdcState>,
    io: FdcIo,
}

impl FdcState {
    /// QEMU's `drv0`/`drv1`: the drive unit `unit` selects, after the TDR's boot swap.
    fn drive_index(&self, unit: u8) -> usize {
        let swapped = self.regs.tdr & TDR_BOOTSEL != 0;
        (usize::from(unit & 1)) ^ usize::from(swapped)
    }

    fn cur(&self) -> usize {
        self.drive_index(self.regs.cur_drv)
    }

    fn cur_drv(&mut self) -> &mut FDrive {
        let i = self.cur();
        &mut self.drives[i]
    }

    /// QEMU's `fdctrl_reset_irq`.
    fn reset_irq(&mut self, io: &FdcIo) {
        self.regs.status0 = 0;
        if self.regs.sra & SRA_INTPEND == 0 {
            return;
        }
        io.set_irq(false);
        self.regs.sra &= !SRA_INTPEND;
    }

    /// QEMU's `fdctrl_raise_irq`.
    fn raise_irq(&mut self, io: &FdcIo) {
        if self.regs.sra & SRA_INTPEND == 0 {
            io.set_irq(true);
            self.regs.sra |= SRA_INTPEND;
        }
        self.regs.reset_sensei = 0;
    }

    /// QEMU's `fdctrl_reset`.
    fn reset(&mut self, io: &FdcIo, do_irq: bool) {
        self.reset_irq(io);
        let r = &mut self.regs;
        r.sra = 0;
        r.srb = 0xc0;
        if !self.drives[1].attached {
            r.sra |= SRA_NDRV2;
        }
        r.cur_drv = 0;
        r.dor = DOR_NRESET;
        if io.dma().is_some() {
            r.dor |= DOR_DMAEN;
        }
        r.msr = MSR_RQM;
        r.reset_sensei = 0;
        r.result_pending = false;
        if let Some(timer) = io.timer.get() {
            let _ = timer.cancel();
        }
        r.data_pos = 0;
        r.data_len = 0;
        r.data_state = 0;
        r.data_dir = DataDir::Write;
        for drive in &mut self.drives {
            drive.recalibrate();
        }
        self.enter_command_phase();
        if do_irq {
            self.regs.status0 |= SR0_RDYCHG;
            self.raise_irq(io);
            self.regs.reset_sensei = RESET_SENSEI_COUNT;
        }
    }

    fn read(&mut self, io: &FdcIo, reg: u64) -> u8 {
        match reg & 7 {
            REG_SRA => self.regs.sra,
            REG_SRB => self.regs.srb,
            REG_DOR => self.regs.dor | self.regs.cur_drv,
            REG_TDR => self.regs.tdr,
            REG_MSR => {
                self.regs.dsr &= !DSR_PWRDOWN;
                self.regs.dor |= DOR_NRESET;
                self.regs.msr
            }
            REG_FIFO => self.read_data(io),
            REG_DIR => {
                if self.cur_drv().media_changed {
                    DIR_DSKCHG
                } else {
                    0
                }
            }
            _ => 0xff,
        }
    }

    /// Returns whether a DMA transfer now waits for its channel.
    fn write(&mut self, io: &FdcIo, reg: u64, value: u8) -> bool {
        match reg & 7 {
            REG_DOR => self.write_dor(io, value),
            REG_TDR if self.regs.dor & DOR_NRESET != 0 => self.regs.tdr = value & TDR_BOOTSEL,
            REG_MSR => self.write_rate(io, value),
            REG_FIFO => return self.write_data(io, value),
            // Only the rate bits matter in AT mode; they live in the DSR.
            REG_DIR if self.regs.dor & DOR_NRESET != 0 => {
                self.regs.dsr = (self.regs.dsr & !DSR_DRATEMASK) | (value & DSR_DRATEMASK);
            }
            _ => {}
        }
        false
    }

    /// QEMU's `fdctrl_write_dor`.
    fn write_dor(&mut self, io: &FdcIo, value: u8) {
        let r = &mut self.regs;
        for (moten, mtr) in [(DOR_MOTEN0, SRB_MTR0), (DOR_MOTEN1, SRB_MTR1)] {
            if value & moten != 0 {
                r.srb |= mtr;
            } else {
                r.srb &= !mtr;
            }
        }
        if value & 1 != 0 {
            r.srb |= SRB_DR0;
        } else {
            r.srb &= !SRB_DR0;
        }
        if value & DOR_NRESET != 0 && r.dor & DOR_NRESET == 0 {
            // Out of reset.
            self.reset(io, true);
            self.regs.dsr &= !DSR_PWRDOWN;
        }
        self.regs.cur_drv = value & DOR_SELMASK;
        self.regs.dor = value;
    }

    /// QEMU's `fdctrl_write_rate`.
    fn write_rate(&mut self, io: &FdcIo, value: u8) {
        if self.regs.dor & DOR_NRESET == 0 {
            return;
        }
        if value & DSR_SWRESET != 0 {
            self.regs.dor &= !DOR_NRESET;
            self.reset(io, true);
            self.regs.dor |= DOR_NRESET;
        }
        if value & DSR_PWRDOWN != 0 {
            self.reset(io, true);
        }
        self.regs.dsr = value;
    }

    /// QEMU's `fdctrl_enter_command_phase`.
    fn enter_command_phase(&mut self) {
        let r = &mut self.regs;
        r.phase = Phase::Command;
        r.data_dir = DataDir::Write;
        r.data_pos = 0;
        // The command byte; its parameters are counted once it is known.
        r.data_len = 1;
        r.msr &= !(MSR_CMDBUSY | MSR_DIO);
        r.msr |= MSR_RQM;
    }

    /// QEMU's `fdctrl_enter_result_phase`.
    fn enter_result_phase(&mut self, len: u32) {
        let r = &mut self.regs;
        r.phase = Phase::Result;
        r.data_dir = DataDir::Read;
        r.data_len = len;
        r.data_pos = 0;
        r.msr |= MSR_CMDBUSY | MSR_RQM | MSR_DIO;
    }

    /// QEMU's `fdctrl_unimplemented`.
    fn unimplemented(&mut self, io: &FdcIo) {
        let byte = self.regs.fifo[0];
        io.log
            .info(|| format!("fdc: unimplemented command 0x{byte:02x}"));
        self.regs.fifo[0] = SR0_INVCMD;
        self.enter_result_phase(1);
    }

    /// QEMU's `fdctrl_seek_to_next_sect`: false at the end of the track (or cylinder,
    /// multi-track).
    fn seek_to_next_sect(&mut self) -> bool {
        let (eot, multi) = (self.regs.eot, self.regs.data_state & STATE_MULTI != 0);
        let i = self.cur();
        let d = &self.drives[i];
        let (mut head, mut track, mut sect) = (d.head, d.track, d.sect);
        let mut more = true;
        if sect >= d.last_sect || sect == eot {
            sect = 1;
            if multi {
                if head == 0 && d.double_sided {
                    head = 1;
                } else {
                    head = 0;
                    track = track.wrapping_add(1);
                    self.regs.status0 |= SR0_SEEK;
                    if !d.double_sided {
                        more = false;
                    }
                }
            } else {
                self.regs.status0 |= SR0_SEEK;
                track = track.wrapping_add(1);
                more = false;
            }
        } else {
            sect += 1;
        }
        self.drives[i].seek(head, track, sect);
        more
    }

    /// QEMU's `fdctrl_stop_transfer`: the result bytes of a read/write command.
    fn stop_transfer(&mut self, io: &FdcIo, status0: u8, status1: u8, status2: u8) {
        let i = self.cur();
        let (track, head, sect) = (self.drives[i].track, self.drives[i].head, self.drives[i].sect);
        let r = &mut self.regs;
        r.status0 &= !(SR0_DS_MASK | SR0_HEAD);
        r.status0 |= r.cur_drv;
        if head != 0 {
            r.status0 |= SR0_HEAD;
        }
        r.status0 |= status0;
        r.fifo[..7].copy_from_slice(&[r.status0, status1, status2, track, head, sect, SECTOR_SIZE_CODE]);
        r.data_dir = DataDir::Read;
        if r.msr & MSR_NONDMA == 0 {
            if let Some((dma, chan)) = io.dma() {
                dma.release_dreq(*chan);
            }
        }
        r.msr |= MSR_RQM | MSR_DIO;
        r.msr &= !MSR_NONDMA;
        self.enter_result_phase(7);
        self.raise_irq(io);
    }

    /// `stop_transfer` with the result's C/H/R put back to what the command asked for
    /// (a seek error).
    fn stop_transfer_at(&mut self, io: &FdcIo, status0: u8, status1: u8, chs: (u8, u8, u8)) {
        self.stop_transfer(io, status0, status1, 0);
        self.regs.fifo[3] = chs.0;
        self.regs.fifo[4] = chs.1;
        self.regs.fifo[5] = chs.2;
    }

    /// QEMU's `fdctrl_start_transfer`. Returns whether a DMA transfer now waits for its
    /// channel.
    fn start_transfer(&mut self, io: &FdcIo, direction: DataDir) -> bool {
        self.regs.cur_drv = self.regs.fifo[1] & DOR_SELMASK;
        let (kt, kh, ks) = (self.regs.fifo[2], self.regs.fifo[3], self.regs.fifo[4]);
        match self.cur_drv().seek(kh, kt, ks) {
            SeekResult::BadTrack => {
                self.stop_transfer_at(io, SR0_ABNTERM, 0, (kt, kh, ks));
                return false;
            }
            SeekResult::BadSector => {
                self.stop_transfer_at(io, SR0_ABNTERM, SR1_EC, (kt, kh, ks));
                return false;
            }
            SeekResult::TrackChanged => self.regs.status0 |= SR0_SEEK,
            SeekResult::SameTrack => {}
        }
        // A data rate the medium was not written at reads nothing.
        if self.regs.dsr & DSR_DRATEMASK != self.cur_drv().media_rate {
            self.stop_transfer_at(io, SR0_ABNTERM, SR1_MA, (kt, kh, ks));
            return false;
        }
        let r = &mut self.regs;
        r.data_dir = direction;
        r.data_pos = 0;
        if r.fifo[0] & 0x80 != 0 {
            r.data_state |= STATE_MULTI;
        } else {
            r.data_state &= !STATE_MULTI;
        }
        if r.fifo[5] == 0 {
            r.data_len = u32::from(r.fifo[8]);
        } else {
            let mut sectors = i32::from(r.fifo[6]) - i32::from(ks) + 1;
            if sectors < 0 {
                // EOT before the first sector (QEMU's fix for CVE-2021-3507).
                self.stop_transfer_at(io, SR0_ABNTERM, SR1_MA, (kt, kh, ks));
                return false;
            }
            if r.fifo[0] & 0x80 != 0 {
                sectors += i32::from(r.fifo[6]);
            }
            r.data_len = (128u32 << r.fifo[5].min(7)) * sectors as u32;
        }
        r.eot = r.fifo[6];
        // A controller without a DMA channel (`dma=-1`) moves the data through its FIFO
        // even when SPECIFY asked for DMA: waiting for a channel that cannot come would
        // leave the command hanging (QEMU dereferences the missing channel).
        if r.dor & DOR_DMAEN != 0 && io.dma().is_some() {
            // No access until the DMA transfer has completed.
            r.msr &= !MSR_RQM;
            if direction != DataDir::Verify {
                return true;
            }
            // VERIFY reads the sectors without DMA.
            let (chan, len) = (io.dma().map_or(0, |(_, c)| *c), self.regs.data_len);
            self.transfer(io, chan, len);
            return false;
        }
        r.msr |= MSR_NONDMA | MSR_RQM;
        if direction != DataDir::Write {
            r.msr |= MSR_DIO;
        }
        self.raise_irq(io);
        if direction != DataDir::Write {
            // The first sector, ready before the guest's first read.
            self.read_sector(io);
        }
        false
    }

    /// Reads the current sector into the FIFO (zeros where the image ends or fails, as
    /// QEMU's "image size is too small").
    fn read_sector(&mut self, io: &FdcIo) {
        let i = self.cur();
        let d = &self.drives[i];
        let data = match (d.medium.clone(), d.offset()) {
            (Some(medium), Some(offset)) => io
                .block_io(move || {
                    let mut sector = vec![0u8; SECTOR_LEN];
                    medium.read_at(&mut sector, offset).ok().map(|_| sector)
                })
                .flatten(),
            _ => None,
        };
        match data {
            Some(sector) => self.regs.fifo[..SECTOR_LEN].copy_from_slice(&sector),
            None => self.regs.fifo[..SECTOR_LEN].fill(0),
        }
    }

    /// Writes the FIFO to the current sector.
    fn write_sector(&mut self, io: &FdcIo) -> Result<(), BlockError> {
        let i = self.cur();
        let d = &self.drives[i];
        let medium = d
            .medium
            .clone()
            .ok_or_else(|| BlockError::Invalid("no medium".to_string()))?;
        let offset = d
            .offset()
            .ok_or_else(|| BlockError::Invalid("sector before the image".to_string()))?;
        let sector = self.regs.fifo[..SECTOR_LEN].to_vec();
        io.block_io(move || medium.write_at(&sector, offset))
            .unwrap_or_else(|| Err(BlockError::Invalid("the I/O worker is gone".to_string())))
    }

    /// QEMU's `fdctrl_transfer_handler`: moves the command's sectors through DMA channel
    /// `chan`, up to `dma_len` bytes; returns the bytes moved.
    fn transfer(&mut self, io: &FdcIo, chan: usize, dma_len: u32) -> u32 {
        if self.regs.msr & MSR_RQM != 0 {
            // Not in a DMA transfer.
            return 0;
        }
        let dir = self.regs.data_dir;
        let mut status2 = 0;
        if matches!(dir, DataDir::ScanEqual | DataDir::ScanLow | DataDir::ScanHigh) {
            status2 = SR2_SNS;
        }
        let dma_len = dma_len.min(self.regs.data_len);
        if !self.cur_drv().attached {
            let status0 = if dir == DataDir::Write {
                SR0_ABNTERM | SR0_SEEK
            } else {
                SR0_ABNTERM
            };
            self.stop_transfer(io, status0, 0, 0);
            return 0;
        }
        let dma = io.dma().map(|(d, _)| d.clone());
        let start_pos = self.regs.data_pos;
        let mut rel_pos = (self.regs.data_pos as usize) % SECTOR_LEN;
        while self.regs.data_pos < dma_len {
            let mut len = (dma_len - self.regs.data_pos) as usize;
            if len + rel_pos > SECTOR_LEN {
                len = SECTOR_LEN - rel_pos;
            }
            if dir != DataDir::Write || len < SECTOR_LEN || rel_pos != 0 {
                // Reads and scans, and a write that does not cover a whole sector.
                self.read_sector(io);
            }
            let pos = self.regs.data_pos;
            match dir {
                DataDir::Read => {
                    if let Some(dma) = &dma {
                        dma.write_memory(chan, &self.regs.fifo[rel_pos..rel_pos + len], pos);
                    }
                }
                DataDir::Write => {
                    if self.cur_drv().ro {
                        // A real drive does not try a write-protected disk either.
                        self.stop_transfer(io, SR0_ABNTERM | SR0_SEEK, SR1_NW, 0);
                        return 0;
                    }
                    if let Some(dma) = &dma {
                        dma.read_memory(chan, &mut self.regs.fifo[rel_pos..rel_pos + len], pos);
                    }
                    if let Err(e) = self.write_sector(io) {
                        io.log.warn(|| format!("fdc: error writing a sector: {e}"));
                        self.stop_transfer(io, SR0_ABNTERM | SR0_SEEK, 0, 0);
                        return 0;
                    }
                }
                DataDir::Verify => {}
                DataDir::ScanEqual | DataDir::ScanLow | DataDir::ScanHigh => {
                    let mut memory = [0u8; SECTOR_LEN];
                    if let Some(dma) = &dma {
                        dma.read_memory(chan, &mut memory[..len], pos);
                    }
                    let order = memory[..len].cmp(&self.regs.fifo[rel_pos..rel_pos + len]);
                    if order.is_eq()
                        || (order.is_lt() && dir == DataDir::ScanLow)
                        || (order.is_gt() && dir == DataDir::ScanHigh)
                    {
                        break;
                    }
                }
            }
            self.regs.data_pos += len as u32;
            rel_pos = (self.regs.data_pos as usize) % SECTOR_LEN;
            if rel_pos == 0 && !self.seek_to_next_sect() {
                break;
            }
        }
        let len = self.regs.data_pos - start_pos;
        if matches!(dir, DataDir::ScanEqual | DataDir::ScanLow | DataDir::ScanHigh) {
            status2 = SR2_SEH;
        }
        self.regs.data_len = self.regs.data_len.wrapping_sub(len);
        self.stop_transfer(io, 0, 0, status2);
        len
    }

    /// QEMU's `fdctrl_read_data`.
    fn read_data(&mut self, io: &FdcIo) -> u8 {
        self.regs.dsr &= !DSR_PWRDOWN;
        if self.regs.msr & MSR_RQM == 0 || self.regs.msr & MSR_DIO == 0 {
            return 0;
        }
        // The position within the current sector of a transfer spanning several.
        let pos = (self.regs.data_pos as usize) % SECTOR_LEN;
        match self.regs.phase {
            Phase::Execution => {
                // The sector was loaded when the transfer started or the last one ended.
                let byte = self.regs.fifo[pos];
                self.regs.data_pos = self.regs.data_pos.wrapping_add(1);
                if self.regs.data_pos == self.regs.data_len {
                    self.regs.msr &= !MSR_RQM;
                    self.stop_transfer(io, 0, 0, 0);
                } else if pos == SECTOR_LEN - 1 {
                    if self.seek_to_next_sect() {
                        self.read_sector(io);
                    } else {
                        // The end of the track (or cylinder) ends the transfer, as a
                        // DMA one.
                        self.stop_transfer(io, 0, 0, 0);
                    }
                }
                return byte;
            }
            Phase::Result => {
                self.regs.data_pos = self.regs.data_pos.wrapping_add(1);
                if self.regs.data_pos == self.regs.data_len {
                    self.regs.msr &= !MSR_RQM;
                    self.enter_command_phase();
                    self.reset_irq(io);
                }
            }
            // DIO is never set in the command phase.
            Phase::Command => return 0,
        }
        self.regs.fifo[pos]
    }

    /// QEMU's `fdctrl_write_data`. Returns whether a DMA transfer now waits for its
    /// channel.
    fn write_data(&mut self, io: &FdcIo, value: u8) -> bool {
        if self.regs.dor & DOR_NRESET == 0 {
            return false;
        }
        if self.regs.msr & MSR_RQM == 0 || self.regs.msr & MSR_DIO != 0 {
            return false;
        }
        self.regs.dsr &= !DSR_PWRDOWN;
        let pos = (self.regs.data_pos as usize) % SECTOR_LEN;
        self.regs.data_pos = self.regs.data_pos.wrapping_add(1);
        self.regs.fifo[pos] = value;
        if self.regs.data_pos == self.regs.data_len {
            self.regs.msr &= !MSR_RQM;
        }
        match self.regs.phase {
            Phase::Execution => {
                // Only non-DMA transfers take data here (RQM is off during DMA ones).
                if pos == SECTOR_LEN - 1 || self.regs.data_pos == self.regs.data_len {
                    if let Err(e) = self.write_sector(io) {
                        // QEMU goes on with the transfer.
                        io.log.warn(|| format!("fdc: error writing a sector: {e}"));
                        return false;
                    }
                    if !self.seek_to_next_sect() {
                        // The end of the track ends the transfer.
                        self.stop_transfer(io, 0, 0, 0);
                        return false;
                    }
                }
                if self.regs.data_pos == self.regs.data_len {
                    self.stop_transfer(io, 0, 0, 0);
                }
                false
            }
            Phase::Command => {
                if pos == 0 {
                    let command = command(value);
                    self.regs.data_len = command.parameters + 1;
                    if command.parameters != 0 {
                        self.regs.msr |= MSR_RQM;
                    }
                    self.regs.msr |= MSR_CMDBUSY;
                }
                if self.regs.data_pos != self.regs.data_len {
                    return false;
                }
                self.regs.phase = Phase::Execution;
                let command = command(self.regs.fifo[0]);
                let len = (self.regs.data_len as usize).min(SECTOR_LEN);
                log::trace!("fdc: {} {:02x?}", command.name, &self.regs.fifo[..len]);
                self.execute(io, command.handler)
            }
            // DIO is set in the result phase: refused above.
            Phase::Result => false,
        }
    }

    /// The command's handler, once its parameters are in. Returns whether a DMA transfer
    /// now waits for its channel.
    fn execute(&mut self, io: &FdcIo, handler: Handler) -> bool {
        let fifo = |s: &Self, i: usize| s.regs.fifo[i];
        match handler {
            Handler::Transfer(dir) => return self.start_transfer(io, dir),
            Handler::TransferDeleted => {
                // Deleted data is not kept: nothing is found.
                io.log
                    .info(|| "fdc: READ/WRITE DELETED DATA unimplemented".to_string());
                self.stop_transfer(io, SR0_ABNTERM | SR0_SEEK, 0, 0);
            }
            Handler::Seek => {
                self.regs.cur_drv = fifo(self, 1) & DOR_SELMASK;
                self.enter_command_phase();
                // Step pulses, whether or not a medium is in.
                let track = fifo(self, 2);
                let d = self.cur_drv();
                let (head, sect) = (d.head, d.sect);
                d.seek(head, track, sect);
                self.regs.status0 |= SR0_SEEK;
                self.raise_irq(io);
            }
            Handler::SenseInterruptStatus => {
                let i = self.cur();
                if self.regs.reset_sensei > 0 {
                    self.regs.fifo[0] = (i32::from(SR0_RDYCHG) + RESET_SENSEI_COUNT - self.regs.reset_sensei) as u8;
                    self.regs.reset_sensei -= 1;
                } else if self.regs.sra & SRA_INTPEND == 0 {
                    self.regs.fifo[0] = SR0_INVCMD;
                    self.enter_result_phase(1);
                    return false;
                } else {
                    self.regs.fifo[0] = (self.regs.status0 & !(SR0_HEAD | SR0_DS_MASK)) | self.regs.cur_drv;
                }
                self.regs.fifo[1] = self.drives[i].track;
                self.enter_result_phase(2);
                self.reset_irq(io);
                self.regs.status0 = SR0_RDYCHG;
            }
            Handler::Recalibrate => {
                self.regs.cur_drv = fifo(self, 1) & DOR_SELMASK;
                self.cur_drv().recalibrate();
                self.enter_command_phase();
                self.regs.status0 |= SR0_SEEK;
                self.raise_irq(io);
            }
            Handler::FormatTrack => {
                self.regs.cur_drv = fifo(self, 1) & DOR_SELMASK;
                if fifo(self, 0) & 0x80 != 0 {
                    self.regs.data_state |= STATE_MULTI;
                } else {
                    self.regs.data_state &= !STATE_MULTI;
                }
                // QEMU takes the sectors a track from the command and formats nothing
                // (its TODO: the sector IDs through DMA).
                let sectors = fifo(self, 3);
                self.cur_drv().last_sect = sectors;
                self.stop_transfer(io, 0, 0, 0);
            }
            Handler::Restore => {
                let (d0, d1) = (self.drive_index(0), self.drive_index(1));
                self.drives[d0].track = fifo(self, 3);
                self.drives[d1].track = fifo(self, 4);
                self.regs.timer0 = fifo(self, 7);
                self.regs.timer1 = fifo(self, 8);
                let last_sect = fifo(self, 9);
                let f10 = fifo(self, 10);
                self.cur_drv().last_sect = last_sect;
                self.regs.lock = f10 >> 7;
                self.cur_drv().perpendicular = (f10 >> 2) & 0xf;
                self.regs.config = fifo(self, 11);
                self.regs.precomp_trk = fifo(self, 12);
                self.regs.pwrd = fifo(self, 13);
                self.enter_command_phase();
            }
            Handler::Save => {
                let (d0, d1, cur) = (self.drive_index(0), self.drive_index(1), self.cur());
                let r = &self.regs;
                let bytes = [
                    0,
                    0,
                    self.drives[d0].track,
                    self.drives[d1].track,
                    0,
                    0,
                    r.timer0,
                    r.timer1,
                    self.drives[cur].last_sect,
                    (r.lock << 7) | (self.drives[cur].perpendicular << 2),
                    r.config,
                    r.precomp_trk,
                    r.pwrd,
                    0,
                    0,
                ];
                self.regs.fifo[..15].copy_from_slice(&bytes);
                self.enter_result_phase(15);
            }
            Handler::ReadId => {
                let head = (fifo(self, 1) >> 2) & 1;
                self.cur_drv().head = head;
                self.regs.result_pending = true;
                if let Some(timer) = io.timer.get() {
                    let _ = timer.arm_after(read_id_delay_ns());
                }
            }
            Handler::Specify => {
                self.regs.timer0 = (fifo(self, 1) >> 4) & 0xf;
                self.regs.timer1 = fifo(self, 2) >> 1;
                if fifo(self, 2) & 1 != 0 {
                    self.regs.dor &= !DOR_DMAEN;
                } else {
                    self.regs.dor |= DOR_DMAEN;
                }
                self.enter_command_phase();
            }
            Handler::SenseDriveStatus => {
                self.regs.cur_drv = fifo(self, 1) & DOR_SELMASK;
                let head = (fifo(self, 1) >> 2) & 1;
                let cur_drv = self.regs.cur_drv;
                let d = self.cur_drv();
                d.head = head;
                let status = (u8::from(d.ro) << 6)
                    | if d.track == 0 { 0x10 } else { 0 }
                    | (d.head << 2)
                    | cur_drv
                    | 0x28;
                self.regs.fifo[0] = status;
                self.enter_result_phase(1);
            }
            Handler::PerpendicularMode => {
                let value = fifo(self, 1);
                if value & 0x80 != 0 {
                    self.cur_drv().perpendicular = value & 0x7;
                }
                self.enter_command_phase();
            }
            Handler::Configure => {
                self.regs.config = fifo(self, 2);
                self.regs.precomp_trk = fifo(self, 3);
                self.enter_command_phase();
            }
            Handler::PowerdownMode => {
                self.regs.pwrd = fifo(self, 1);
                self.regs.fifo[0] = fifo(self, 1);
                self.enter_result_phase(1);
            }
            Handler::Option => self.enter_command_phase(),
            Handler::DriveSpecification => {
                let pos = (self.regs.data_pos.wrapping_sub(1) as usize) % SECTOR_LEN;
                let last = fifo(self, pos);
                if last & 0x80 != 0 {
                    if last & 0x40 != 0 {
                        self.regs.fifo[0] = fifo(self, 1);
                        self.regs.fifo[2] = 0;
                        self.regs.fifo[3] = 0;
                        self.enter_result_phase(4);
                    } else {
                        self.enter_command_phase();
                    }
                } else if self.regs.data_len > 7 {
                    let status = 0x80 | (self.cur_drv().head << 2) | self.regs.cur_drv;
                    self.regs.fifo[0] = status;
                    self.enter_result_phase(1);
                }
            }
            Handler::RelativeSeekOut | Handler::RelativeSeekIn => {
                self.regs.cur_drv = fifo(self, 1) & DOR_SELMASK;
                let steps = fifo(self, 2);
                let d = self.cur_drv();
                let (head, sect) = (d.head, d.sect);
                let track = if handler == Handler::RelativeSeekIn {
                    if u16::from(steps) + u16::from(d.track) >= u16::from(d.max_track) {
                        d.max_track.wrapping_sub(1)
                    } else {
                        d.track + steps
                    }
                } else {
                    d.track.saturating_sub(steps)
                };
                d.seek(head, track, sect);
                self.enter_command_phase();
                self.regs.status0 |= SR0_SEEK;
                self.raise_irq(io);
            }
            Handler::Lock => {
                self.regs.lock = u8::from(fifo(self, 0) & 0x80 != 0);
                self.regs.fifo[0] = self.regs.lock << 4;
                self.enter_result_phase(1);
            }
            Handler::Dumpreg => {
                let (d0, d1, cur) = (self.drive_index(0), self.drive_index(1), self.cur());
                let r = &self.regs;
                let bytes = [
                    self.drives[d0].track,
                    self.drives[d1].track,
                    0,
                    0,
                    r.timer0,
                    (r.timer1 << 1) | u8::from(r.dor & DOR_DMAEN != 0),
                    self.drives[cur].last_sect,
                    (r.lock << 7) | (self.drives[cur].perpendicular << 2),
                    r.config,
                    r.precomp_trk,
                ];
                self.regs.fifo[..10].copy_from_slice(&bytes);
                self.enter_result_phase(10);
            }
            Handler::Version => {
                // Intel 82078.
                self.regs.fifo[0] = 0x90;
                self.enter_result_phase(1);
            }
            Handler::PartId => {
                // Stepping 1.
                self.regs.fifo[0] = 0x41;
                self.enter_result_phase(1);
            }
            Handler::Unimplemented => self.unimplemented(io),
        }
        false
    }

    /// QEMU's `fdctrl_result_timer`: READ ID's answer, the drive having turned a sector.
    fn result_timer(&mut self, io: &FdcIo) {
        if !std::mem::take(&mut self.regs.result_pending) {
            return;
        }
        let rate = self.regs.dsr & DSR_DRATEMASK;
        let d = self.cur_drv();
        if d.last_sect != 0 {
            d.sect = (d.sect % d.last_sect) + 1;
        }
        if rate != d.media_rate {
            self.stop_transfer(io, SR0_ABNTERM, SR1_MA, 0);
        } else {
            self.stop_transfer(io, 0, 0, 0);
        }
    }
}

impl Fdc {
    fn new() -> Self {
        let mut state = FdcState {
            regs: Registers::default(),
            drives: Default::default(),
        };
        for drive in &mut state.drives {
            drive.init();
            drive.revalidate(FloppyDriveType::Type288);
        }
        Fdc {
            state: Mutex::new(state),
            io: FdcIo {
                irq: Mutex::new(IrqLine::default()),
                worker: OnceLock::new(),
                dma: OnceLock::new(),
                timer: OnceLock::new(),
                fallback: Mutex::new(FloppyDriveType::Type288),
                log: RateLimitedLog::default(),
            },
        }
    }

    /// A controller whose READ ID answers come from `timer` (the caller runs
    /// [`Fdc::timer_expired`] when its descriptor turns readable) and whose image reads
    /// and writes from vCPU threads go through `worker`.
    pub fn create(timer: VirtualTimer, worker: IoWorker) -> Arc<Fdc> {
        let fdc = Fdc::new();
        let _ = fdc.io.timer.set(timer);
        let _ = fdc.io.worker.set(worker);
        Arc::new(fdc)
    }

    /// READ ID's timer's descriptor, for the caller's event loop.
    pub fn timer_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.io.timer.get().map(|t| t.as_raw_fd())
    }

    /// READ ID's timer's descriptor turned readable.
    pub fn timer_expired(&self) {
        if self.io.timer.get().is_some_and(|t| t.take_due().unwrap_or(false)) {
            self.state.lock().result_timer(&self.io);
        }
    }

    /// Connects the controller's IRQ.
    pub fn set_irq(&self, irq: IrqLine) {
        *self.io.irq.lock() = irq;
    }

    /// Connects DMA channel `chan` of `dma` (QEMU's `register_channel` at realize).
    pub fn set_dma(self: &Arc<Self>, dma: Arc<dyn IsaDma>, chan: usize) {
        let weak: Weak<dyn IsaDmaClient> = Arc::downgrade(&(self.clone() as Arc<dyn IsaDmaClient>));
        dma.register_channel(chan, weak);
        let _ = self.io.dma.set((dma, chan));
        self.state.lock().regs.dor |= DOR_DMAEN;
    }

    /// The drive type an automatic drive without a medium takes (`fallback`).
    pub fn set_fallback(&self, fallback: FloppyDriveType) {
        *self.io.fallback.lock() = fallback;
    }

    fn fallback(&self) -> FloppyDriveType {
        *self.io.fallback.lock()
    }

    /// A register read (`reg` 0-7 from the base).
    pub fn read(&self, reg: u64) -> u8 {
        self.state.lock().read(&self.io, reg)
    }

    /// A register write; a DMA transfer it starts asks its channel for service after the
    /// controller's lock is let go (the DMA controller calls back into it).
    pub fn write(&self, reg: u64, value: u8) {
        let start_dma = self.state.lock().write(&self.io, reg, value);
        if start_dma {
            if let Some((dma, chan)) = self.io.dma() {
                dma.hold_dreq(*chan);
            }
        }
    }

    /// The VM stopped or runs again: READ ID's timer holds or goes on.
    pub fn run_state_changed(&self, running: bool) {
        if let Some(timer) = self.io.timer.get() {
            let _ = timer.run_state_changed(running);
        }
    }

    /// QEMU's `fdctrl_reset` without an interrupt: the machine's reset.
    pub fn reset(&self) {
        self.state.lock().reset(&self.io, false);
    }

    /// The type of drive `unit` (QEMU's `isa_fdc_get_drive_type`): `None` without a drive.
    pub fn drive_type(&self, unit: usize) -> FloppyDriveType {
        self.state.lock().drives.get(unit).map_or(FloppyDriveType::None, |d| d.drive)
    }

    /// Whether drive `unit` has a `floppy` device.
    fn is_attached(&self, unit: usize) -> bool {
        self.state.lock().drives[unit].attached
    }

    /// Plugs a drive of type `drive_type` with `medium` (or none) as `unit`; returns the
    /// type it became (an automatic one takes its medium's or the fallback).
    fn attach(&self, unit: usize, medium: Option<Arc<BlockBackend>>, drive_type: FloppyDriveType) -> FloppyDriveType {
        let fallback = self.fallback();
        let mut st = self.state.lock();
        let d = &mut st.drives[unit];
        d.attached = true;
        d.medium = medium;
        d.init();
        d.drive = drive_type;
        d.pick_drive_type(fallback);
        d.revalidate(fallback);
        let drive = d.drive;
        if unit == 1 {
            st.regs.sra &= !SRA_NDRV2;
        }
        drive
    }

    fn detach(&self, unit: usize) {
        let fallback = self.fallback();
        let mut st = self.state.lock();
        let d = &mut st.drives[unit];
        *d = FDrive::default();
        d.revalidate(fallback);
        if unit == 1 {
            st.regs.sra |= SRA_NDRV2;
        }
    }

    fn medium(&self, unit: usize) -> Option<Arc<BlockBackend>> {
        self.state.lock().drives[unit].medium.clone()
    }

    /// Puts `medium` in drive `unit` (or takes it out) and revalidates the drive under
    /// the same lock, so that no access sees the new image with the old geometry.
    fn set_medium(&self, unit: usize, medium: Option<Arc<BlockBackend>>) {
        let fallback = self.fallback();
        let mut st = self.state.lock();
        let d = &mut st.drives[unit];
        d.medium = medium;
        d.media_changed = true;
        d.media_validated = false;
        d.revalidate(fallback);
    }

    /// QEMU's `fd_change_cb`: the medium changed (or went).
    fn change_media(&self, unit: usize) {
        let fallback = self.fallback();
        let mut st = self.state.lock();
        let d = &mut st.drives[unit];
        d.media_changed = true;
        d.media_validated = false;
        d.revalidate(fallback);
    }

    /// The state a migration moves.
    pub fn save(&self) -> FdcVmState {
        let st = self.state.lock();
        FdcVmState {
            regs: st.regs.clone(),
            drives: st
                .drives
                .iter()
                .map(|d| DriveVmState {
                    head: d.head,
                    track: d.track,
                    sect: d.sect,
                    media_changed: d.media_changed,
                    media_rate: d.media_rate,
                    perpendicular: d.perpendicular,
                })
                .collect(),
        }
    }

    /// Puts back what [`Fdc::save`] saved; refuses a FIFO or position past the sector.
    pub fn load(&self, state: FdcVmState) -> Result<(), String> {
        if state.regs.fifo.len() != SECTOR_LEN || state.drives.len() != MAX_FD {
            return Err("fdc: FIFO or drive count does not match".to_string());
        }
        let r = &state.regs;
        // Positions the phase can have (QEMU asserts them): a command of at most 17
        // parameters, at most 15 result bytes, a transfer of at most 255 sectors of 16 KiB.
        let consistent = match r.phase {
            Phase::Command => r.data_pos < r.data_len && r.data_len <= 18 && !r.result_pending,
            Phase::Result => r.data_pos < r.data_len && r.data_len <= 15 && !r.result_pending,
            Phase::Execution => r.data_len <= 255 * 2 * 16384,
        };
        if !consistent || !(0..=RESET_SENSEI_COUNT).contains(&r.reset_sensei) {
            return Err(format!(
                "fdc: inconsistent state (phase {:?}, position {} of {})",
                r.phase, r.data_pos, r.data_len
            ));
        }
        let fallback = self.fallback();
        let mut st = self.state.lock();
        for (d, saved) in st.drives.iter_mut().zip(&state.drives) {
            d.head = saved.head;
            d.track = saved.track;
            d.sect = saved.sect;
            d.media_changed = saved.media_changed;
            d.media_rate = saved.media_rate;
            d.perpendicular = saved.perpendicular;
            d.revalidate(fallback);
        }
        let pending = state.regs.result_pending;
        st.regs = state.regs;
        st.regs.cur_drv &= DOR_SELMASK;
        let level = st.regs.sra & SRA_INTPEND != 0;
        drop(st);
        self.io.set_irq(level);
        if pending {
            if let Some(timer) = self.io.timer.get() {
                let _ = timer.arm_after(read_id_delay_ns());
            }
        }
        Ok(())
    }
}

impl IsaDmaClient for Fdc {
    fn dma_transfer(&self, nchan: usize, _pos: u32, len: u32) -> u32 {
        self.state.lock().transfer(&self.io, nchan, len)
    }
}

/// QEMU's `FloppyBus`: the bus a controller's `floppy` drives plug into.
#[derive(qom::Object)]
#[qom(name = TYPE_FLOPPY_BUS)]
pub struct FloppyBus {
    #[parent]
    parent: BusState,
    fdc: Mutex<Option<Arc<Fdc>>>,
}

type_init!(FloppyBus);

impl FloppyBus {
    /// Gives the bus its controller (the controller does, at realize).
    pub fn set_fdc(&self, fdc: Arc<Fdc>) {
        *self.fdc.lock() = Some(fdc);
    }

    fn fdc(&self) -> Option<Arc<Fdc>> {
        self.fdc.lock().clone()
    }
}

/// Errors of `floppy`, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum FloppyError {
    /// `unit=` past the bus.
    #[error("Can't create floppy unit {0}, bus supports only {MAX_FD} units")]
    UnitTooBig(u32),
    /// The unit has a drive.
    #[error("Floppy unit {0} is in use")]
    UnitInUse(u32),
    /// Block sizes other than 512.
    #[error("Physical and logical block size must be 512 for floppy")]
    BlockSize,
    /// `drive=` names no block backend.
    #[error("Property 'floppy.drive' can't find value '{0}'")]
    DriveNotFound(String),
    /// `drive=` is another device's.
    #[error("{0}")]
    DriveInUse(String),
    /// The bus has no controller.
    #[error("floppy bus has no controller")]
    NoController,
}

/// QEMU's `FloppyDrive`: a drive on a controller's `floppy-bus`; its medium changes
/// (`eject`, `change`, `blockdev-change-medium`), without a tray.
#[derive(qom::Object)]
#[qom(name = TYPE_FLOPPY_DRIVE, implements = [dyn RemovableMedia])]
pub struct FloppyDrive {
    #[parent]
    parent: DeviceState,
    #[property(default = u32::MAX, desc = "Drive unit (0 or 1; default: the first free)")]
    unit: Prop<u32>,
    #[property(desc = "Node name or ID of a block device to use as a backend")]
    drive: Prop<Option<String>>,
    #[property(name = "drive-type", default = FloppyDriveType::Auto, desc = "FDC drive type, 144/288/120/none/auto")]
    drive_type: Prop<FloppyDriveType>,
    #[property(name = "logical_block_size", default = Size(512), desc = "Logical block size (512 only)")]
    logical_block_size: Prop<Size>,
    #[property(name = "physical_block_size", default = Size(512), desc = "Physical block size (512 only)")]
    physical_block_size: Prop<Size>,
    #[property(name = "share-rw", default = false, desc = "Let other users write the image")]
    share_rw: Prop<bool>,
    /// The controller and unit, once realized.
    placed: OnceLock<(Arc<Fdc>, usize)>,
    blk_name: OnceLock<String>,
    qdev_id: OnceLock<String>,
    /// Serializes medium changes.
    medium_lock: Mutex<()>,
}

type_init!(FloppyDrive);

impl FloppyDrive {
    /// The drive's unit, once realized.
    pub fn unit(&self) -> Option<usize> {
        self.placed.get().map(|(_, u)| *u)
    }
}

impl DeviceImpl for FloppyDrive {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_FLOPPY_BUS);
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;
    const DESCRIPTION: Option<&'static str> = Some("virtual floppy drive");
    // The drive's position and medium state are the controller's, saved with it.
    const STATELESS: bool = true;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let err = RealizeError::device;
        let bus: &FloppyBus = ctx.bus_state()?;
        let fdc = bus.fdc().ok_or(err(FloppyError::NoController))?;
        let unit = match self.unit.get() {
            u32::MAX => (0..MAX_FD as u32)
                .find(|&u| !fdc.is_attached(u as usize))
                .unwrap_or(MAX_FD as u32),
            u => u,
        };
        if unit as usize >= MAX_FD {
            return Err(err(FloppyError::UnitTooBig(unit)));
        }
        if fdc.is_attached(unit as usize) {
            return Err(err(FloppyError::UnitInUse(unit)));
        }
        if self.logical_block_size.get().0 != 512 || self.physical_block_size.get().0 != 512 {
            return Err(err(FloppyError::BlockSize));
        }
        let qdev = self
            .parent
            .id()
            .or_else(|| ctx.object().canonical_path())
            .unwrap_or_default();
        let (medium, blk_name) = match self.drive.get() {
            Some(name) => match block::find_backend(&name) {
                Some(backend) => {
                    backend
                        .attach_dev(&qdev)
                        .map_err(|e| err(FloppyError::DriveInUse(e.to_string())))?;
                    let id = backend.id();
                    (Some(backend), id)
                }
                None => match block::attach_empty_drive(&name, &qdev) {
                    Some(Ok(())) => (None, name),
                    Some(Err(e)) => return Err(err(FloppyError::DriveInUse(e.to_string()))),
                    None => return Err(err(FloppyError::DriveNotFound(name))),
                },
            },
            None => (None, String::new()),
        };
        let drive_type = fdc.attach(unit as usize, medium, self.drive_type.get());
        // QEMU keeps the property in step with the drive's type.
        self.drive_type.set(drive_type);
        self.unit.set(unit);
        let _ = self.blk_name.set(blk_name);
        let _ = self.qdev_id.set(qdev);
        let _ = self.placed.set((fdc, unit as usize));
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((fdc, unit)) = self.placed.get() {
            if let Some(medium) = fdc.medium(*unit) {
                medium.detach_dev();
            }
            fdc.detach(*unit);
        }
        if let Some(name) = self.blk_name.get().filter(|n| !n.is_empty()) {
            block::remove_empty_drive(name);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

impl RemovableMedia for FloppyDrive {
    fn blk_name(&self) -> String {
        self.blk_name.get().cloned().unwrap_or_default()
    }

    fn qdev_id(&self) -> String {
        self.qdev_id.get().cloned().unwrap_or_default()
    }

    fn has_tray(&self) -> bool {
        false
    }

    fn is_tray_open(&self) -> bool {
        false
    }

    fn is_medium_locked(&self) -> bool {
        false
    }

    fn eject_request(&self, _force: bool) {}

    fn change_media_cb(&self, _load: bool) {
        if let Some((fdc, unit)) = self.placed.get() {
            fdc.change_media(*unit);
        }
    }

    fn medium(&self) -> Option<Arc<BlockBackend>> {
        let (fdc, unit) = self.placed.get()?;
        fdc.medium(*unit)
    }

    fn remove_medium(&self) -> Option<Arc<BlockBackend>> {
        let _guard = self.medium_lock.lock();
        let (fdc, unit) = self.placed.get()?;
        let old = fdc.medium(*unit)?;
        fdc.set_medium(*unit, None);
        release_medium(&old, &self.blk_name(), &self.qdev_id());
        Some(old)
    }

    fn insert_medium(&self, new: Arc<BlockBackend>) -> Result<(), BlockError> {
        let _guard = self.medium_lock.lock();
        let Some((fdc, unit)) = self.placed.get() else {
            return Err(BlockError::Invalid("the drive is not realized".to_string()));
        };
        if fdc.medium(*unit).is_some() {
            return Err(BlockError::Invalid(
                "There already is a medium in the device".to_string(),
            ));
        }
        claim_medium(&new, &self.blk_name(), &self.qdev_id())?;
        fdc.set_medium(*unit, Some(new));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive_with(sectors: u64, drive: FloppyDriveType) -> FDrive {
        let mut d = FDrive {
            attached: true,
            drive,
            ..FDrive::default()
        };
        // pick_geometry reads only the medium's size: a table lookup of `sectors`.
        let size = sectors;
        let (mut perfect, mut first_type) = (None, None);
        for (i, f) in FD_FORMATS.iter().enumerate() {
            let s = u64::from(f.max_head + 1) * u64::from(f.max_track) * u64::from(f.last_sect);
            if s == size && (drive == FloppyDriveType::Auto || f.drive == drive) {
                perfect = perfect.or(Some(i));
            }
            if f.drive == drive {
                first_type = first_type.or(Some(i));
            }
        }
        let f = &FD_FORMATS[perfect.or(first_type).unwrap_or(0)];
        d.last_sect = f.last_sect;
        d.max_track = f.max_track;
        d.double_sided = f.max_head != 0;
        d
    }

    #[test]
    fn commands_decode_as_qemus_table() {
        assert_eq!(command(0xe6).name, "READ");
        assert_eq!(command(0xc5).name, "WRITE");
        assert_eq!(command(0x45).name, "WRITE");
        assert_eq!(command(0x25).name, "WRITE (BeOS)");
        assert_eq!(command(0x4a).name, "READ ID");
        assert_eq!(command(0x94).name, "LOCK");
        assert_eq!(command(0xff).name, "unknown");
        assert_eq!(command(CMD_RELATIVE_SEEK_IN).name, "RELATIVE SEEK IN");
    }

    #[test]
    fn sectors_count_through_heads_then_tracks() {
        let mut d = drive_with(2880, FloppyDriveType::Type144);
        d.medium = None;
        d.attached = true;
        assert_eq!(sector_index(0, 0, 1, 18, 2), 0);
        assert_eq!(sector_index(1, 0, 1, 18, 2), 18);
        assert_eq!(sector_index(0, 1, 1, 18, 2), 36);
        // No medium: every seek is a bad track, but the head still moves.
        assert_eq!(d.seek(1, 2, 3), SeekResult::BadTrack);
        assert_eq!((d.head, d.track, d.sect), (1, 2, 3));
        assert_eq!(d.seek(0, 80, 1), SeekResult::BadTrack);
        assert_eq!(d.seek(0, 1, 19), SeekResult::BadSector);
    }

    #[test]
    fn drive_types_have_qemus_cmos_nibbles_and_limits() {
        assert_eq!(FloppyDriveType::Type144.cmos(), 4);
        assert_eq!(FloppyDriveType::Type288.cmos(), 5);
        assert_eq!(FloppyDriveType::Type120.cmos(), 2);
        assert_eq!(FloppyDriveType::None.cmos(), 0);
        assert_eq!(FloppyDriveType::Type144.max_chs(), (82, 1, 24));
        assert_eq!(FloppyDriveType::Type288.max_chs(), (79, 1, 48));
        assert_eq!(FloppyDriveType::Type120.max_chs(), (82, 1, 20));
    }

    #[test]
    fn a_migration_stream_with_impossible_positions_is_refused() {
        let clock = Arc::new(crate::core::timer::VmClock::new(true));
        let fdc = Fdc::create(VirtualTimer::new(clock).unwrap(), IoWorker::spawn("fdc-test").unwrap());
        assert_eq!(fdc.load(fdc.save()), Ok(()));
        for bad in [
            |s: &mut FdcVmState| s.regs.data_len = 600,
            |s: &mut FdcVmState| s.regs.data_pos = s.regs.data_len,
            |s: &mut FdcVmState| s.regs.reset_sensei = 9,
            |s: &mut FdcVmState| s.regs.fifo.truncate(7),
            |s: &mut FdcVmState| {
                s.regs.phase = Phase::Result;
                s.regs.data_len = 16;
            },
        ] {
            let mut state = fdc.save();
            bad(&mut state);
            assert!(fdc.load(state).is_err());
        }
    }

    #[test]
    fn an_empty_controller_answers_version_and_sense_interrupt_after_reset() {
        let clock = Arc::new(crate::core::timer::VmClock::new(true));
        let timer = VirtualTimer::new(clock).unwrap();
        let fdc = Fdc::create(timer, IoWorker::spawn("fdc-test").unwrap());
        fdc.write(REG_DOR, 0);
        fdc.write(REG_DOR, DOR_NRESET | DOR_DMAEN);
        for i in 0..4 {
            fdc.write(REG_FIFO, CMD_SENSE_INTERRUPT_STATUS);
            assert_eq!(fdc.read(REG_MSR) & (MSR_RQM | MSR_DIO), MSR_RQM | MSR_DIO);
            assert_eq!(fdc.read(REG_FIFO), SR0_RDYCHG + i);
            assert_eq!(fdc.read(REG_FIFO), 0);
        }
        fdc.write(REG_FIFO, CMD_SENSE_INTERRUPT_STATUS);
        assert_eq!(fdc.read(REG_FIFO), SR0_INVCMD, "no interrupt pending");
        fdc.write(REG_FIFO, CMD_VERSION);
        assert_eq!(fdc.read(REG_FIFO), 0x90);
        assert_eq!(fdc.read(REG_MSR), MSR_RQM);
    }
}
