//! The SCSI bus (QEMU's `hw/scsi/scsi-bus.c`): where a host adapter's logical units plug
//! in (`-device scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0`), their addressing, the
//! commands a target answers for a LUN it does not have (INQUIRY, REPORT LUNS), and the
//! sense data every unit reports errors with.
//!
//! A host adapter (virtio-scsi) hands a command to [`ScsiLuns::execute`] with the data
//! buffers of its request; a logical unit ([`ScsiLogicalUnit`]) runs it to the end on the
//! adapter's I/O thread and returns its status.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use vm_memory::VolatileSlice;
use qom::{type_init, Prop};

use crate::core::bus::BusState;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};

/// QEMU's `TYPE_SCSI_BUS`.
pub const TYPE_SCSI_BUS: &str = "SCSI";
/// QEMU's `TYPE_SCSI_DEVICE`, the abstract logical unit.
pub const TYPE_SCSI_DEVICE: &str = "scsi-device";

/// SCSI status bytes (SAM-5).
pub mod status {
    /// The command completed.
    pub const GOOD: u8 = 0x00;
    /// The command failed: the sense data says why.
    pub const CHECK_CONDITION: u8 = 0x02;
}

/// Sense data: key, additional sense code and qualifier (QEMU's `SCSISense`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// No error.
    pub const NO_SENSE: Sense = Sense::new(0x00, 0x00, 0x00);
    /// Illegal request, invalid command operation code.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// Illegal request, LBA out of range.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// Illegal request, invalid field in CDB.
    pub const INVALID_FIELD: Sense = Sense::new(0x05, 0x24, 0x00);
    /// Illegal request, logical unit not supported.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// Illegal request, invalid field in parameter list.
    pub const INVALID_PARAM: Sense = Sense::new(0x05, 0x26, 0x00);
    /// Illegal request, parameter list length error.
    pub const INVALID_PARAM_LEN: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// Data protect, write protected.
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    /// Data protect, space allocation failed (the host's disk is full).
    pub const SPACE_ALLOC_FAILED: Sense = Sense::new(0x07, 0x27, 0x07);
    /// Aborted command, I/O process terminated (QEMU's `IO_ERROR`).
    pub const IO_ERROR: Sense = Sense::new(0x0b, 0x00, 0x06);
    /// Hardware error, internal target failure.
    pub const TARGET_FAILURE: Sense = Sense::new(0x04, 0x44, 0x00);
    /// Unit attention, power on, reset or bus device reset occurred.
    pub const RESET: Sense = Sense::new(0x06, 0x29, 0x00);
    /// Unit attention, capacity data has changed (QEMU's `CAPACITY_CHANGED`).
    pub const CAPACITY_CHANGED: Sense = Sense::new(0x06, 0x2a, 0x09);

    /// A sense of `key`, `asc`, `ascq`.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScsiOutcome {
    /// GOOD, with this many bytes moved: sent to the initiator (data-in) or taken from
    /// it (data-out).
    Good {
        /// Bytes transferred.
        transferred: usize,
    },
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// The command needs more data buffer than the request brought, or data the other
    /// way: it did not run (virtio-scsi's `OVERRUN`).
    Overrun,
}

/// The data buffers of one command: what the initiator sends (`data_out`) and where the
/// unit's reply goes (`data_in`), each with its size, and the same as slices of guest
/// memory where the adapter has them (a disk moves its data there with no copy).
pub struct ScsiData<'a> {
    /// The data-out buffer.
    pub data_out: &'a mut dyn Read,
    /// Its bytes.
    pub data_out_len: usize,
    /// The data-in buffer.
    pub data_in: &'a mut dyn Write,
    /// Its bytes.
    pub data_in_len: usize,
    /// `data_out` as guest memory, unread.
    pub guest_out: Option<Vec<VolatileSlice<'a>>>,
    /// `data_in` as guest memory, unwritten.
    pub guest_in: Option<Vec<VolatileSlice<'a>>>,
}

impl ScsiData<'_> {
    /// Sends a reply limited to `allocation` bytes (the CDB's allocation length): an
    /// allocation beyond the data-in buffer is an overrun, as QEMU's transfer check has it.
    pub fn reply(&mut self, reply: &[u8], allocation: usize) -> ScsiOutcome {
        if allocation > self.data_in_len || (allocation > 0 && self.data_out_len > 0) {
            return ScsiOutcome::Overrun;
        }
        let n = reply.len().min(allocation);
        match self.data_in.write_all(&reply[..n]) {
            Ok(()) => ScsiOutcome::Good { transferred: n },
            Err(_) => ScsiOutcome::Check(Sense::TARGET_FAILURE),
        }
    }

    /// Reads the `len`-byte parameter list of a command (MODE SELECT, UNMAP).
    pub fn parameters(&mut self, len: usize) -> Result<Vec<u8>, ScsiOutcome> {
        if len > self.data_out_len || (len > 0 && self.data_in_len > 0) {
            return Err(ScsiOutcome::Overrun);
        }
        let mut buf = vec![0u8; len];
        self.data_out
            .read_exact(&mut buf)
            .map_err(|_| ScsiOutcome::Check(Sense::TARGET_FAILURE))?;
        Ok(buf)
    }
}

/// The first `len` bytes of `slices`, or `None` if they hold fewer.
pub fn first_bytes<'m>(slices: &[VolatileSlice<'m>], mut len: usize) -> Option<Vec<VolatileSlice<'m>>> {
    let mut out = Vec::new();
    for s in slices {
        if len == 0 {
            break;
        }
        let n = s.len().min(len);
        out.push(s.subslice(0, n).ok()?);
        len -= n;
    }
    (len == 0).then_some(out)
}

/// Bytes moved between the request's buffers and the image at a time.
const BOUNCE_BYTES: usize = 256 * 1024;

thread_local! {
    /// Each thread's buffer between a request and the image, kept for the next request
    /// (no allocation and trim of a large block per command).
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's bounce buffer, at least `len` bytes (at most
/// [`BOUNCE_BYTES`]).
pub fn with_bounce<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BOUNCE.with_borrow_mut(|bounce| {
        let len = len.min(BOUNCE_BYTES);
        if bounce.len() < len {
            bounce.resize(BOUNCE_BYTES, 0);
        }
        f(&mut bounce[..len])
    })
}
/// What a unit says about itself: INQUIRY's standard data and its identification pages
/// (QEMU's `scsi_disk_emulate_inquiry` and VPD pages 0x80 and 0x83).
#[derive(Clone, Debug)]
pub struct UnitIdentity {
    /// Peripheral device type (0 disk, 5 CD/DVD).
    pub device_type: u8,
    /// Removable medium bit.
    pub removable: bool,
    /// Vendor, product and revision.
    pub vendor: String,
    /// Product.
    pub product: String,
    /// Revision.
    pub version: String,
    /// Unit serial number (VPD page 0x80), if any.
    pub serial: Option<String>,
    /// Device identification (VPD page 0x83), empty for none.
    pub device_id: String,
    /// NAA world wide name, 0 for none.
    pub wwn: u64,
}

impl UnitIdentity {
    /// INQUIRY: the standard data, or with EVPD the page `cdb[2]`: 0x00 lists this
    /// identity's pages and `more`, 0x80 and 0x83 come from here, the others from
    /// `page(code)` (the unit's own pages).
    pub fn inquiry(
        &self,
        cdb: &[u8],
        data: &mut ScsiData<'_>,
        more: &[u8],
        page: impl Fn(u8) -> Option<Vec<u8>>,
    ) -> ScsiOutcome {
        if cdb.len() < 6 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let allocation = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
        if cdb[1] & 1 != 0 {
            let code = cdb[2];
            let body = match code {
                0x00 => {
                    let mut pages = vec![0x00];
                    if self.serial.is_some() {
                        pages.push(0x80);
                    }
                    pages.push(0x83);
                    pages.extend_from_slice(more);
                    Some(pages)
                }
                0x80 => self.serial.as_ref().map(|s| s.as_bytes()[..s.len().min(36)].to_vec()),
                0x83 => Some(self.device_identification()),
                _ if more.contains(&code) => page(code),
                _ => None,
            };
            let Some(body) = body else {
                return ScsiOutcome::Check(Sense::INVALID_FIELD);
            };
            let mut reply = vec![self.device_type, code];
            reply.extend_from_slice(&(body.len() as u16).to_be_bytes());
            reply.extend_from_slice(&body);
            return data.reply(&reply, allocation);
        }
        if cdb[2] != 0 {
            // A page code without EVPD.
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let mut reply = [b' '; 36];
        reply[..8].fill(0);
        reply[0] = self.device_type;
        reply[1] = if self.removable { 0x80 } else { 0 };
        // SPC-3, response data format 2 with HiSup, command queueing.
        reply[2] = 5;
        reply[3] = 0x02 | 0x10;
        reply[4] = 36 - 5;
        reply[7] = 0x10 | 0x02;
        let put = |dst: &mut [u8], s: &str| {
            let n = s.len().min(dst.len());
            dst[..n].copy_from_slice(&s.as_bytes()[..n]);
        };
        put(&mut reply[8..16], &self.vendor);
        put(&mut reply[16..32], &self.product);
        put(&mut reply[32..36], &self.version);
        data.reply(&reply, allocation)
    }

    /// VPD page 0x83's designators.
    fn device_identification(&self) -> Vec<u8> {
        let mut ids = Vec::new();
        let id = &self.device_id.as_bytes()[..self.device_id.len().min(255 - 8)];
        if !id.is_empty() {
            // ASCII, vendor specific, associated with the LUN.
            ids.extend_from_slice(&[0x02, 0x00, 0x00, id.len() as u8]);
            ids.extend_from_slice(id);
        }
        if self.wwn != 0 {
            // Binary, NAA.
            ids.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
            ids.extend_from_slice(&self.wwn.to_be_bytes());
        }
        ids
    }
}

/// A MODE SENSE(6) or (10) reply: the header with the device-specific parameter, the
/// block descriptor (empty for none) and the pages.
pub fn mode_sense_reply(ten: bool, dev_specific: u8, descriptor: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut reply = if ten {
        vec![0, 0, 0, dev_specific, 0, 0, 0, descriptor.len() as u8]
    } else {
        vec![0, 0, dev_specific, descriptor.len() as u8]
    };
    reply.extend_from_slice(descriptor);
    reply.extend_from_slice(pages);
    if ten {
        let len = (reply.len() - 2) as u16;
        reply[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        reply[0] = (reply.len() - 1).min(255) as u8;
    }
    reply
}

/// A mode parameter block descriptor for `blocks` blocks of `block_size` bytes (0
/// blocks where the count does not fit).
pub fn block_descriptor(blocks: u64, block_size: u32) -> [u8; 8] {
    let n = if blocks > 0xff_ffff { 0 } else { blocks as u32 };
    let mut d = [0u8; 8];
    d[0..4].copy_from_slice(&n.to_be_bytes());
    d[4..8].copy_from_slice(&block_size.to_be_bytes());
    d
}

/// A logical unit (QEMU's `SCSIDeviceClass`): runs commands addressed to it.
pub trait ScsiLogicalUnit: Send + Sync {
    /// Runs the command `cdb` to its end.
    fn execute(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome;
    /// A LUN, target or bus reset.
    fn reset(&self) {}
    /// Makes `sense` the unit attention its next command reports (QEMU's
    /// `scsi_device_set_ua`); a unit without unit attentions ignores it.
    fn set_unit_attention(&self, _sense: Sense) {}
    /// Whether its commands may wait for I/O limits (its drive is throttled).
    fn throttled(&self) -> bool {
        false
    }
    /// The drive its commands use now, if any (to lift its I/O limits during a drain).
    fn drive(&self) -> Option<Arc<block::BlockBackend>> {
        None
    }
}

/// Commands a pending unit attention does not stop (QEMU's `scsi_req_new`).
pub fn runs_under_unit_attention(opcode: u8) -> bool {
    matches!(opcode, INQUIRY | REPORT_LUNS | GET_CONFIGURATION | GET_EVENT_STATUS_NOTIFICATION)
}

const GET_CONFIGURATION: u8 = 0x46;
const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;

/// How an adapter hears that a unit's parameters changed (QEMU's `SCSIBusInfo.change`).
pub type ChangeHandler = Box<dyn Fn(ScsiAddress, Sense) + Send + Sync>;

/// An address on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScsiAddress {
    /// Channel.
    pub channel: u32,
    /// Target (`scsi-id`).
    pub target: u32,
    /// Logical unit number.
    pub lun: u32,
}

/// What a host adapter can address (QEMU's `SCSIBusInfo`).
#[derive(Clone, Copy, Debug)]
pub struct ScsiBusInfo {
    /// Highest channel.
    pub max_channel: u32,
    /// Highest target.
    pub max_target: u32,
    /// Highest LUN.
    pub max_lun: u32,
}

/// The logical units of one bus, shared by the bus (which plugs them) and its adapter
/// (which addresses them).
#[derive(Default)]
pub struct ScsiLuns {
    /// By address.
    units: RwLock<Vec<PluggedUnit>>,
    /// Waits until no command of the adapter runs (its event loop's pass ends).
    drain: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Tells the adapter of a unit's changed parameters, where it has a way to.
    change: OnceLock<ChangeHandler>,
}

/// A unit on the bus: its address, its device's id (or type), the unit.
struct PluggedUnit {
    addr: ScsiAddress,
    owner: String,
    unit: Arc<dyn ScsiLogicalUnit>,
}

/// How an adapter's command was dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// No unit answers at that target (virtio-scsi's `BAD_TARGET`).
    NoTarget,
    /// The target (a unit of it, or its own emulation for an absent LUN) ran it.
    Done(ScsiOutcome),
}

/// REPORT LUNS (SPC-4 6.33).
const REPORT_LUNS: u8 = 0xa0;
const INQUIRY: u8 = 0x12;
const REQUEST_SENSE: u8 = 0x03;
/// Peripheral qualifier 3, type 0x1f: no unit at this LUN.
const TYPE_NO_LUN: u8 = 0x7f;

impl ScsiLuns {
    /// The unit at `addr`.
    pub fn find(&self, addr: ScsiAddress) -> Option<Arc<dyn ScsiLogicalUnit>> {
        self.units
            .read()
            .iter()
            .find(|p| p.addr == addr)
            .map(|p| p.unit.clone())
    }

    /// Lifts every unit's I/O limits while the guards live (the adapter waiting for its
    /// commands), so that commands waiting for them go at once.
    pub fn lift_limits(&self) -> Vec<block::LimitsLifted> {
        let drives: Vec<_> = self.units.read().iter().filter_map(|p| p.unit.drive()).collect();
        drives.iter().map(|d| d.lift_limits()).collect()
    }

    /// The drive of the unit at `addr`, if its commands may wait for I/O limits.
    pub fn throttled_drive(&self, addr: ScsiAddress) -> Option<Arc<block::BlockBackend>> {
        self.find(addr)?.drive().filter(|d| d.is_throttled())
    }

    /// Whether any unit's commands may wait for I/O limits.
    pub fn any_throttled(&self) -> bool {
        self.units.read().iter().any(|p| p.unit.throttled())
    }

    /// Whether any unit answers at `channel`:`target`.
    pub fn has_target(&self, channel: u32, target: u32) -> bool {
        self.units
            .read()
            .iter()
            .any(|p| p.addr.channel == channel && p.addr.target == target)
    }

    fn is_used(&self, addr: ScsiAddress) -> bool {
        self.owner(addr).is_some()
    }

    /// The id (or type) of the device at `addr`.
    fn owner(&self, addr: ScsiAddress) -> Option<String> {
        self.units
            .read()
            .iter()
            .find(|p| p.addr == addr)
            .map(|p| p.owner.clone())
    }

    fn insert(&self, addr: ScsiAddress, owner: String, unit: Arc<dyn ScsiLogicalUnit>) {
        let mut units = self.units.write();
        units.push(PluggedUnit { addr, owner, unit });
        units.sort_by_key(|p| p.addr);
    }

    /// Takes the unit at `addr` off the bus; when this returns no command runs on it
    /// (its device may let its backend go).
    fn remove(&self, addr: ScsiAddress) {
        // Commands waiting for I/O limits go at once (QEMU's drain disables them): an
        // unplug must not wait out a queue at 1 IOPS, its unit's or (the adapter waits
        // for all its commands) another unit's.
        let _lifted = self.lift_limits();
        self.units.write().retain(|p| p.addr != addr);
        if let Some(drain) = self.drain.get() {
            drain();
        }
    }

    /// How the adapter tells its driver of a unit's changed parameters (set once).
    pub fn set_change(&self, change: ChangeHandler) {
        let _ = self.change.set(change);
    }

    /// QEMU's `scsi_device_report_change`: the unit at `addr` reports `sense` as a unit
    /// attention, and the adapter tells its driver if it can.
    pub fn report_change(&self, addr: ScsiAddress, sense: Sense) {
        let Some(unit) = self.find(addr) else { return };
        unit.set_unit_attention(sense);
        if let Some(change) = self.change.get() {
            change(addr, sense);
        }
    }

    /// How the adapter waits for the commands it runs (set once, at its realize).
    pub fn set_drain(&self, drain: Box<dyn Fn() + Send + Sync>) {
        let _ = self.drain.set(drain);
    }

    /// The units of one target (an I_T nexus reset).
    pub fn reset_target(&self, channel: u32, target: u32) {
        let units: Vec<_> = self
            .units
            .read()
            .iter()
            .filter(|p| p.addr.channel == channel && p.addr.target == target)
            .map(|p| p.unit.clone())
            .collect();
        for unit in units {
            unit.reset();
        }
    }

    /// Every unit, for a bus reset.
    pub fn reset_all(&self) {
        let units: Vec<_> = self.units.read().iter().map(|p| p.unit.clone()).collect();
        for unit in units {
            unit.reset();
        }
    }

    /// Runs `cdb` for `addr`: its unit if there is one; else the target's own answers
    /// for an absent LUN (QEMU's `scsi_target_emulate_*`) if the target has other units.
    pub fn execute(&self, addr: ScsiAddress, cdb: &[u8], data: &mut ScsiData<'_>) -> Dispatch {
        if let Some(unit) = self.find(addr) {
            if cdb.first() == Some(&REPORT_LUNS) {
                return Dispatch::Done(self.report_luns(addr, cdb, data));
            }
            return Dispatch::Done(unit.execute(cdb, data));
        }
        if !self.has_target(addr.channel, addr.target) {
            return Dispatch::NoTarget;
        }
        Dispatch::Done(match cdb.first() {
            Some(&REPORT_LUNS) => self.report_luns(addr, cdb, data),
            Some(&INQUIRY) => absent_lun_inquiry(cdb, data),
            Some(&REQUEST_SENSE) => {
                let allocation = cdb.get(4).copied().unwrap_or(0).into();
                data.reply(&Sense::LUN_NOT_SUPPORTED.fixed(), allocation)
            }
            _ => ScsiOutcome::Check(Sense::LUN_NOT_SUPPORTED),
        })
    }

    /// The LUNs of `addr`'s target (QEMU's `scsi_target_emulate_report_luns`): LUN 0 is
    /// always listed, as the well-known unit initiators start from.
    fn report_luns(&self, addr: ScsiAddress, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        if cdb.len() < 12 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let allocation = u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]) as usize;
        // SELECT REPORT 0-2 (all LUNs, well-known ones, both); at least the header fits.
        if cdb[2] > 2 || allocation < 16 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let mut luns: Vec<u32> = self
            .units
            .read()
            .iter()
            .filter(|p| p.addr.channel == addr.channel && p.addr.target == addr.target)
            .map(|p| p.addr.lun)
            .collect();
        if !luns.contains(&0) {
            luns.insert(0, 0);
        }
        let mut reply = Vec::with_capacity(8 + 8 * luns.len());
        reply.extend_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
        reply.extend_from_slice(&[0; 4]);
        for lun in luns {
            let mut entry = [0u8; 8];
            if lun < 256 {
                entry[1] = lun as u8;
            } else {
                // Flat space addressing.
                entry[0] = 0x40 | ((lun >> 8) & 0x3f) as u8;
                entry[1] = lun as u8;
            }
            reply.extend_from_slice(&entry);
        }
        data.reply(&reply, allocation)
    }
}

/// INQUIRY of a LUN the target lacks: standard data saying nothing is there.
fn absent_lun_inquiry(cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
    if cdb.len() < 6 {
        return ScsiOutcome::Check(Sense::INVALID_FIELD);
    }
    let allocation = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
    if cdb[1] & 1 != 0 {
        // Vital product data of a LUN that is not there.
        return ScsiOutcome::Check(Sense::INVALID_FIELD);
    }
    let mut reply = [0u8; 36];
    reply[0] = TYPE_NO_LUN;
    reply[2] = 5;
    reply[3] = 2 | 0x10;
    reply[4] = 36 - 5;
    reply[8..16].copy_from_slice(b"QEMU    ");
    reply[16..32].copy_from_slice(b"QEMU TARGET     ");
    data.reply(&reply, allocation)
}

/// The name of an adapter's bus: `<id>.0`, or `scsi.N` for adapters without an id (QEMU
/// numbers those per bus type).
pub fn scsi_bus_name(adapter_id: Option<String>) -> String {
    static AUTOMATIC_BUS_IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    match adapter_id {
        Some(id) => format!("{id}.0"),
        None => format!("scsi.{}", AUTOMATIC_BUS_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
    }
}

/// QEMU's `SCSIBus`: a host adapter's bus (`<id>.0`), with its units.
#[derive(qom::Object)]
#[qom(name = TYPE_SCSI_BUS)]
pub struct ScsiBus {
    #[parent]
    parent: BusState,
    adapter: OnceLock<(ScsiBusInfo, Arc<ScsiLuns>)>,
}

type_init!(ScsiBus);

impl ScsiBus {
    /// Connects the bus to its adapter's limits and unit table (at the adapter's realize).
    pub fn set_adapter(&self, info: ScsiBusInfo, luns: &Arc<ScsiLuns>) {
        let _ = self.adapter.set((info, luns.clone()));
    }
}

/// Errors of a unit's address, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum ScsiBusError {
    /// `channel=` beyond the adapter's.
    #[error("bad scsi channel id: {0}")]
    BadChannel(u32),
    /// `scsi-id=` beyond the adapter's.
    #[error("bad scsi device id: {0}")]
    BadTarget(i32),
    /// `lun=` beyond the adapter's.
    #[error("bad scsi device lun: {0}")]
    BadLun(i32),
    /// No `scsi-id=` and every target has that LUN.
    #[error("no free target")]
    NoFreeTarget,
    /// No `lun=` and the target's LUNs are all used.
    #[error("no free lun")]
    NoFreeLun,
    /// The address is taken.
    #[error("lun already used by '{0}'")]
    LunInUse(String),
    /// The bus has no adapter behind it.
    #[error("SCSI bus without an adapter")]
    NoAdapter,
}

/// QEMU's `SCSIDevice`: a logical unit's address on its bus. Its subclasses make the unit
/// and plug it with [`ScsiDevice::plug_unit`].
#[derive(qom::Object)]
#[qom(name = TYPE_SCSI_DEVICE, abstract)]
pub struct ScsiDevice {
    #[parent]
    parent: DeviceState,
    #[property(default = 0u32, desc = "Channel of the unit")]
    channel: Prop<u32>,
    #[property(name = "scsi-id", default = -1, desc = "Target of the unit (default: the first free one)")]
    scsi_id: Prop<i32>,
    #[property(default = -1, desc = "Logical unit number (default: the first free one)")]
    lun: Prop<i32>,
    plugged: OnceLock<(Arc<ScsiLuns>, ScsiAddress)>,
}

type_init!(ScsiDevice);

impl DeviceImpl for ScsiDevice {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_SCSI_BUS);
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((luns, addr)) = self.plugged.get() {
            luns.remove(*addr);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

impl ScsiDevice {
    /// QEMU's `scsi_qdev_realize`: resolves the address (the first free target, or LUN,
    /// where none was given) and plugs `unit` there.
    pub fn plug_unit(
        &self,
        ctx: &DeviceContext,
        unit: Arc<dyn ScsiLogicalUnit>,
    ) -> Result<ScsiAddress, RealizeError> {
        let err = RealizeError::device;
        let bus: &ScsiBus = ctx.bus_state()?;
        let (info, luns) = bus.adapter.get().ok_or_else(|| err(ScsiBusError::NoAdapter))?;
        let channel = self.channel.get();
        if channel > info.max_channel {
            return Err(err(ScsiBusError::BadChannel(channel)));
        }
        let (id, lun) = (self.scsi_id.get(), self.lun.get());
        if id != -1 && (id < 0 || id as u32 > info.max_target) {
            return Err(err(ScsiBusError::BadTarget(id)));
        }
        if lun != -1 && (lun < 0 || lun as u32 > info.max_lun) {
            return Err(err(ScsiBusError::BadLun(lun)));
        }
        let at = |target: u32, lun: u32| ScsiAddress { channel, target, lun };
        let addr = match (id, lun) {
            (-1, lun) => {
                let lun = lun.max(0) as u32;
                let target = (0..=info.max_target)
                    .find(|&t| !luns.is_used(at(t, lun)))
                    .ok_or_else(|| err(ScsiBusError::NoFreeTarget))?;
                at(target, lun)
            }
            (id, -1) => {
                let lun = (0..=info.max_lun)
                    .find(|&l| !luns.is_used(at(id as u32, l)))
                    .ok_or_else(|| err(ScsiBusError::NoFreeLun))?;
                at(id as u32, lun)
            }
            (id, lun) => at(id as u32, lun as u32),
        };
        if let Some(owner) = luns.owner(addr) {
            return Err(err(ScsiBusError::LunInUse(owner)));
        }
        let name = self.parent.id().unwrap_or_else(|| ctx.type_name().to_string());
        luns.insert(addr, name, unit);
        self.scsi_id.set(addr.target as i32);
        self.lun.set(addr.lun as i32);
        let _ = self.plugged.set((luns.clone(), addr));
        Ok(addr)
    }

    /// What reports a change of the unit's parameters (QEMU's
    /// `scsi_device_report_change`), once plugged; it holds the bus weakly.
    pub fn change_reporter(&self) -> Option<impl Fn(Sense) + Send + Sync + 'static> {
        let (luns, addr) = self.plugged.get()?;
        let luns = Arc::downgrade(luns);
        let addr = *addr;
        Some(move |sense| {
            if let Some(luns) = luns.upgrade() {
                luns.report_change(addr, sense);
            }
        })
    }

    /// The unit's address, once plugged.
    pub fn address(&self) -> Option<ScsiAddress> {
        self.plugged.get().map(|(_, a)| *a)
    }

    /// QEMU's `scsibus_get_fw_dev_path`: `channel@C/disk@T,L` under the adapter's path.
    pub fn fw_dev_path(&self, name: &str) -> Option<String> {
        let a = self.address()?;
        Some(format!("channel@{:x}/{name}@{:x},{:x}", a.channel, a.target, a.lun))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_cuts_inside_a_slice_and_refuses_too_few() {
        let mut a = [1u8; 10];
        let mut b = [2u8; 10];
        let slices = [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..])];
        let cut = first_bytes(&slices, 15).unwrap();
        let lens: Vec<usize> = cut.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [10, 5]);
        assert_eq!(first_bytes(&slices, 10).unwrap().len(), 1, "a whole first slice");
        assert!(first_bytes(&slices, 21).is_none());
        assert!(first_bytes(&slices, 0).unwrap().is_empty());
    }
}
