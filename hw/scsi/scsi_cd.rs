//! The SCSI CD/DVD-ROM (QEMU's `scsi-cd` of `hw/scsi/scsi-disk.c`): a removable,
//! read-only logical unit of 2048-byte blocks with a tray, answering the MMC commands
//! Linux's `sr` and SeaBIOS use (READ, READ CAPACITY, READ TOC, GET CONFIGURATION, GET
//! EVENT STATUS NOTIFICATION, MODE SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL).
//! Its medium changes through the monitor as an `ide-cd`'s does (`eject`,
//! `blockdev-change-medium`, ...); the guest sees "no medium", then "medium may have
//! changed", as QEMU shows it. libvirt writes it as
//! `-device scsi-cd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=libvirt-1-format,id=scsi0-0-0-0`.

use std::sync::{Arc, OnceLock};

use block::{BlockBackend, BlockError, IoType};
use parking_lot::Mutex;
use qom::type_init;

use crate::block::cdrom::{self, media_event, CD_BLOCK};
use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::removable_media::{claim_medium, release_medium, tray_moved, RemovableMedia};
use crate::scsi::scsi_bus::{
    first_bytes, mode_sense_reply, runs_under_unit_attention, with_bounce, ScsiData, ScsiLogicalUnit, ScsiOutcome, Sense,
    UnitIdentity,
};
use crate::scsi::scsi_disk::ScsiDiskBase;

/// QEMU's `TYPE_SCSI_CD`.
pub const TYPE_SCSI_CD: &str = "scsi-cd";

/// Peripheral device type of a CD/DVD drive.
const TYPE_ROM: u8 = 0x05;

/// Operation codes (MMC-6, SPC-4, SBC-4).
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP: u8 = 0x1b;
    pub const ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const SEEK_10: u8 = 0x2b;
    pub const SYNCHRONIZE_CACHE: u8 = 0x35;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const READ_12: u8 = 0xa8;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// Senses of a CD drive.
const NO_MEDIUM: Sense = Sense::new(0x02, 0x3a, 0x00);
const UNIT_ATTENTION_NO_MEDIUM: Sense = Sense::new(0x06, 0x3a, 0x00);
const MEDIUM_CHANGED: Sense = Sense::new(0x06, 0x28, 0x00);
const ILLEGAL_REQ_REMOVAL_PREVENTED: Sense = Sense::new(0x05, 0x53, 0x02);
const NOT_READY_REMOVAL_PREVENTED: Sense = Sense::new(0x02, 0x53, 0x02);
const SAVING_PARAMS_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);

/// The drive's state: medium, tray, and what the guest is yet to be told.
#[derive(Default)]
struct CdState {
    medium: Option<Arc<BlockBackend>>,
    tray_open: bool,
    tray_locked: bool,
    /// A unit attention for the next command (QEMU's `SCSIDevice::unit_attention`).
    unit_attention: Option<Sense>,
    /// The medium changed: "medium may have changed" follows the "no medium" attention.
    media_changed: bool,
    /// GET EVENT STATUS NOTIFICATION's new-media event is pending.
    media_event: bool,
    /// The host asked for the medium.
    eject_request: bool,
}

/// QEMU's `SCSIDiskState` as a CD drive: the logical unit.
pub struct ScsiCdUnit {
    identity: UnitIdentity,
    /// The backend's name and the device's id, for `DEVICE_TRAY_MOVED`.
    blk_name: String,
    qdev_id: String,
    state: Mutex<CdState>,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Commands that run with no medium in (QEMU's list in `scsi_disk_emulate_command`).
fn runs_without_medium(opcode: u8) -> bool {
    matches!(
        opcode,
        op::INQUIRY
            | op::MODE_SENSE_6
            | op::MODE_SENSE_10
            | op::START_STOP
            | op::ALLOW_MEDIUM_REMOVAL
            | op::GET_CONFIGURATION
            | op::GET_EVENT_STATUS_NOTIFICATION
            | op::MECHANISM_STATUS
            | op::REQUEST_SENSE
    )
}

impl ScsiCdUnit {
    fn new(identity: UnitIdentity, blk_name: String, qdev_id: String, medium: Option<Arc<BlockBackend>>) -> Self {
        ScsiCdUnit {
            identity,
            blk_name,
            qdev_id,
            state: Mutex::new(CdState {
                medium,
                ..CdState::default()
            }),
        }
    }

    /// The medium's blocks, while one is in and the tray closed.
    fn blocks(st: &CdState) -> Option<u64> {
        st.medium
            .as_ref()
            .filter(|_| !st.tray_open)
            .map(|m| m.size() / CD_BLOCK)
    }

    /// A pending unit attention, reported once (QEMU's `scsi_unit_attention` and
    /// `scsi_disk_unit_attention_reported`).
    fn take_unit_attention(st: &mut CdState) -> Option<Sense> {
        let sense = st.unit_attention.take()?;
        if std::mem::take(&mut st.media_changed) {
            st.unit_attention = Some(MEDIUM_CHANGED);
        }
        Some(sense)
    }

    fn read(&self, cdb: &[u8], medium: &BlockBackend, total: u64, data: &mut ScsiData<'_>) -> ScsiOutcome {
        let (lba, blocks) = match cdb[0] {
            op::READ_6 => {
                let n = u64::from(cdb[4]);
                ((u64::from(cdb[1] & 0x1f) << 16) | be16(cdb, 2) as u64, if n == 0 { 256 } else { n })
            }
            op::READ_10 if cdb.len() >= 10 => (u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]])), be16(cdb, 7) as u64),
            op::READ_12 if cdb.len() >= 12 => (
                u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]])),
                u64::from(u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]])),
            ),
            op::READ_16 if cdb.len() >= 16 => (
                u64::from_be_bytes(cdb[2..10].try_into().unwrap_or_default()),
                u64::from(u32::from_be_bytes([cdb[10], cdb[11], cdb[12], cdb[13]])),
            ),
            _ => return ScsiOutcome::Check(Sense::INVALID_FIELD),
        };
        if lba.checked_add(blocks).is_none_or(|end| end > total) {
            medium.account_invalid(IoType::Read);
            return ScsiOutcome::Check(Sense::LBA_OUT_OF_RANGE);
        }
        let (offset, len) = (lba * CD_BLOCK, blocks * CD_BLOCK);
        if len > data.data_in_len as u64 || data.data_out_len > 0 {
            return ScsiOutcome::Overrun;
        }
        let result = match data.guest_in.as_deref().and_then(|sg| first_bytes(sg, len as usize)) {
            Some(sg) => medium.readv_guest(&sg, offset),
            None => with_bounce(len as usize, |buf| {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    medium.read_at(&mut buf[..n], offset + done)?;
                    data.data_in.write_all(&buf[..n]).map_err(BlockError::Io)?;
                    done += n as u64;
                }
                Ok(())
            }),
        };
        match result {
            Ok(()) => ScsiOutcome::Good { transferred: len as usize },
            Err(e) => {
                log::debug!("scsi-cd: read at {offset}: {e}");
                ScsiOutcome::Check(Sense::IO_ERROR)
            }
        }
    }

    fn mode_sense(&self, cdb: &[u8], st: &CdState, data: &mut ScsiData<'_>) -> ScsiOutcome {
        let ten = cdb[0] == op::MODE_SENSE_10;
        if cdb.len() < if ten { 10 } else { 6 } {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let (pc, page) = (cdb[2] >> 6, cdb[2] & 0x3f);
        if pc == 3 {
            return ScsiOutcome::Check(SAVING_PARAMS_NOT_SUPPORTED);
        }
        let allocation = if ten { be16(cdb, 7) } else { usize::from(cdb[4]) };
        // Nothing is changeable: page control 1 reports the pages zeroed.
        let page_of = |code: u8| -> Option<Vec<u8>> {
            let mut p = match code {
                0x01 => cdrom::error_recovery_page(),
                0x2a => cdrom::capabilities_page(st.tray_locked),
                _ => return None,
            };
            if pc == 1 {
                p[2..].fill(0);
            }
            Some(p)
        };
        let pages: Vec<u8> = match page {
            0x3f => [0x01, 0x2a].into_iter().filter_map(page_of).flatten().collect(),
            code => match page_of(code) {
                Some(p) => p,
                None => return ScsiOutcome::Check(Sense::INVALID_FIELD),
            },
        };
        // MMC drives have no block descriptors (QEMU sets DBD for them).
        data.reply(&mode_sense_reply(ten, 0, &[], &pages), allocation)
    }

    /// START STOP UNIT with LOEJ: the guest opens or closes the tray, unless it locked it.
    fn start_stop(&self, cdb: &[u8], st: &mut CdState) -> ScsiOutcome {
        let (start, loej, power) = (cdb[4] & 1 != 0, cdb[4] & 2 != 0, cdb[4] & 0xf0);
        if power != 0 || !loej {
            return ScsiOutcome::Good { transferred: 0 };
        }
        if !start && !st.tray_open && st.tray_locked {
            return ScsiOutcome::Check(match st.medium {
                Some(_) => ILLEGAL_REQ_REMOVAL_PREVENTED,
                None => NOT_READY_REMOVAL_PREVENTED,
            });
        }
        if st.tray_open == start {
            st.tray_open = !start;
            tray_moved(&self.blk_name, &self.qdev_id, !start);
        }
        ScsiOutcome::Good { transferred: 0 }
    }
}

impl ScsiLogicalUnit for ScsiCdUnit {
    fn execute(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let Some(&opcode) = cdb.first() else {
            return ScsiOutcome::Check(Sense::INVALID_OPCODE);
        };
        if cdb.len() < 6 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let mut st = self.state.lock();
        if !runs_under_unit_attention(opcode) {
            if let Some(sense) = Self::take_unit_attention(&mut st) {
                return match opcode {
                    op::REQUEST_SENSE => data.reply(&sense.fixed(), usize::from(cdb[4])),
                    _ => ScsiOutcome::Check(sense),
                };
            }
        }
        let blocks = Self::blocks(&st);
        if blocks.is_none() && !runs_without_medium(opcode) {
            return ScsiOutcome::Check(NO_MEDIUM);
        }
        let total = blocks.unwrap_or(0);
        let allocation = || be16(cdb, 7);
        match opcode {
            op::TEST_UNIT_READY | op::SET_CD_SPEED | op::SYNCHRONIZE_CACHE => ScsiOutcome::Good { transferred: 0 },
            op::SEEK_10 if cdb.len() >= 10 => {
                if u64::from(u32::from_be_bytes([cdb[2], cdb[3], cdb[4], cdb[5]])) >= total {
                    ScsiOutcome::Check(Sense::LBA_OUT_OF_RANGE)
                } else {
                    ScsiOutcome::Good { transferred: 0 }
                }
            }
            op::REQUEST_SENSE => {
                let sense = if blocks.is_none() { NO_MEDIUM } else { Sense::NO_SENSE };
                data.reply(&sense.fixed(), usize::from(cdb[4]))
            }
            op::INQUIRY => self.identity.inquiry(cdb, data, &[], |_| None),
            op::READ_CAPACITY_10 => {
                let mut reply = [0u8; 8];
                reply[0..4].copy_from_slice(&(total.saturating_sub(1).min(u64::from(u32::MAX)) as u32).to_be_bytes());
                reply[4..8].copy_from_slice(&(CD_BLOCK as u32).to_be_bytes());
                data.reply(&reply, 8)
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
                let Some(medium) = st.medium.clone() else {
                    return ScsiOutcome::Check(NO_MEDIUM);
                };
                drop(st);
                self.read(cdb, &medium, total, data)
            }
            op::READ_TOC if cdb.len() >= 10 => {
                // SCSI's format field (byte 2); ATAPI's older one is in byte 9.
                let format = if cdb[2] & 0xf != 0 { cdb[2] & 0xf } else { cdb[9] >> 6 };
                match cdrom::read_toc(total, format, cdb[1] & 2 != 0, cdb[6]) {
                    Some(toc) => data.reply(&toc, allocation()),
                    None => ScsiOutcome::Check(Sense::INVALID_FIELD),
                }
            }
            op::GET_CONFIGURATION if cdb.len() >= 10 => {
                let reply = cdrom::configuration(blocks, cdrom::Interface::Scsi, cdb[1] & 3, be16(cdb, 2) as u16);
                data.reply(&reply, allocation())
            }
            op::GET_EVENT_STATUS_NOTIFICATION if cdb.len() >= 10 => {
                if cdb[1] & 1 == 0 {
                    // Asynchronous notification is not supported.
                    return ScsiOutcome::Check(Sense::INVALID_FIELD);
                }
                let mut event = media_event::NO_CHANGE;
                if cdb[4] & 0x10 != 0 && !st.tray_open {
                    if std::mem::take(&mut st.media_event) {
                        event = media_event::NEW_MEDIA;
                    } else if std::mem::take(&mut st.eject_request) {
                        event = media_event::EJECT_REQUESTED;
                    }
                }
                let reply = cdrom::event_status(cdb[4], event, st.tray_open, st.medium.is_some());
                data.reply(&reply, allocation())
            }
            op::READ_DISC_INFORMATION if cdb.len() >= 10 => {
                if cdb[1] & 7 != 0 {
                    return ScsiOutcome::Check(Sense::INVALID_FIELD);
                }
                data.reply(&cdrom::disc_information(), allocation())
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb, &st, data),
            op::START_STOP => self.start_stop(cdb, &mut st),
            op::ALLOW_MEDIUM_REMOVAL => {
                st.tray_locked = cdb[4] & 1 != 0;
                ScsiOutcome::Good { transferred: 0 }
            }
            op::MECHANISM_STATUS if cdb.len() >= 10 => {
                data.reply(&[0, 0, 0, 0, 0, 1, 0, 0], be16(cdb, 8))
            }
            _ => ScsiOutcome::Check(Sense::INVALID_OPCODE),
        }
    }

    /// A reset reports itself to the next command (QEMU's `scsi_disk_reset`: a unit
    /// attention), and unlocks and closes the tray.
fn throttled(&self) -> bool {
        self.state.lock().medium.as_ref().is_some_and(|m| m.is_throttled())
    }

    fn drive(&self) -> Option<Arc<BlockBackend>> {
        self.state.lock().medium.clone()
    }

        fn reset(&self) {
        let mut st = self.state.lock();
        st.tray_locked = false;
        st.tray_open = false;
        st.unit_attention = Some(Sense::RESET);
    }
}

/// QEMU's `scsi-cd`.
#[derive(qom::Object)]
#[qom(name = TYPE_SCSI_CD, implements = [dyn RemovableMedia])]
pub struct ScsiCd {
    #[parent]
    parent: ScsiDiskBase,
    unit: OnceLock<Arc<ScsiCdUnit>>,
}

type_init!(ScsiCd);

/// Errors of `scsi-cd`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum ScsiCdError {
    /// `drive=` names no block backend.
    #[error("Property 'scsi-cd.drive' can't find value '{0}'")]
    DriveNotFound(String),
    /// `drive=` is attached to another device (the block layer's words).
    #[error("{0}")]
    DriveInUse(String),
}

impl DeviceImpl for ScsiCd {
    const DESCRIPTION: Option<&'static str> = Some("virtual SCSI CD-ROM");

    /// QEMU's `scsi_cd_realize`: the drive's medium, if it has one, and the unit.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let err = RealizeError::device;
        let qdev = self
            .parent
            .id()
            .or_else(|| ctx.object().canonical_path())
            .unwrap_or_default();
        let drive = self.parent.drive();
        let (medium, blk_name) = match &drive {
            Some(name) => match block::find_backend(name) {
                Some(backend) => {
                    backend.attach_dev(&qdev).map_err(|e| err(ScsiCdError::DriveInUse(e.to_string())))?;
                    let id = backend.id();
                    (Some(backend), id)
                }
                None => match block::attach_empty_drive(name, &qdev) {
                    Some(Ok(())) => (None, name.clone()),
                    Some(Err(e)) => return Err(err(ScsiCdError::DriveInUse(e.to_string()))),
                    None => return Err(err(ScsiCdError::DriveNotFound(name.clone()))),
                },
            },
            None => (None, String::new()),
        };
        let identity = self.parent.identity(TYPE_ROM, true, "QEMU CD-ROM", &blk_name);
        let unit = Arc::new(ScsiCdUnit::new(identity, blk_name.clone(), qdev, medium.clone()));
        if let Err(e) = self.parent.plug_unit(ctx, unit.clone()) {
            match &medium {
                Some(m) => m.detach_dev(),
                None if !blk_name.is_empty() => block::detach_empty_drive(&blk_name),
                None => {}
            }
            return Err(e);
        }
        let _ = self.unit.set(unit);
        Ok(())
    }

    /// The tray, the lock and what the guest is yet to be told (QEMU's
    /// `vmstate_scsi_disk_state` with its tray subsection).
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut section = VmStateSection::new(1);
        if let Some(u) = self.unit.get() {
            let st = u.state.lock();
            section.put("tray_open", st.tray_open);
            section.put("tray_locked", st.tray_locked);
            section.put("media_changed", st.media_changed);
            section.put("media_event", st.media_event);
            section.put("eject_request", st.eject_request);
            section.put("unit_attention", st.unit_attention.map(|s| [s.key, s.asc, s.ascq]));
        }
        Ok(section)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let Some(u) = self.unit.get() else { return Ok(()) };
        let ua: Option<[u8; 3]> = state.get("unit_attention")?;
        let mut st = u.state.lock();
        st.tray_open = state.get("tray_open")?;
        st.tray_locked = state.get("tray_locked")?;
        st.media_changed = state.get("media_changed")?;
        st.media_event = state.get("media_event")?;
        st.eject_request = state.get("eject_request")?;
        st.unit_attention = ua.map(|[key, asc, ascq]| Sense::new(key, asc, ascq));
        Ok(())
    }

    /// The medium goes with the drive if the drive owned it; the drive's name too.
    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(&self.parent, ctx);
        let Some(unit) = self.unit.get() else { return };
        if let Some(medium) = unit.state.lock().medium.take() {
            medium.detach_dev();
            if medium.is_blk_owned() {
                block::remove_backend(&medium);
            } else if medium.id() == unit.blk_name {
                // A node the monitor put in took the drive's name: it goes back nameless.
                medium.set_id("");
            }
        }
        if !unit.blk_name.is_empty() {
            block::remove_empty_drive(&unit.blk_name);
        }
    }
}

/// QEMU's `scsi_cd_block_ops`.
impl RemovableMedia for ScsiCd {
    fn blk_name(&self) -> String {
        self.unit.get().map(|u| u.blk_name.clone()).unwrap_or_default()
    }

    fn qdev_id(&self) -> String {
        self.unit.get().map(|u| u.qdev_id.clone()).unwrap_or_default()
    }

    fn has_tray(&self) -> bool {
        true
    }

    fn is_tray_open(&self) -> bool {
        self.unit.get().is_some_and(|u| u.state.lock().tray_open)
    }

    fn is_medium_locked(&self) -> bool {
        self.unit.get().is_some_and(|u| u.state.lock().tray_locked)
    }

    /// QEMU's `scsi_cd_eject_request_cb`.
    fn eject_request(&self, force: bool) {
        if let Some(u) = self.unit.get() {
            let mut st = u.state.lock();
            st.eject_request = true;
            if force {
                st.tray_locked = false;
            }
        }
    }

    /// QEMU's `scsi_cd_change_media_cb`: the guest hears "no medium", then (once a medium
    /// is loaded) "medium may have changed", and a media event.
    fn change_media_cb(&self, load: bool) {
        if let Some(u) = self.unit.get() {
            let mut st = u.state.lock();
            st.media_changed = load;
            st.tray_open = !load;
            st.unit_attention = Some(UNIT_ATTENTION_NO_MEDIUM);
            st.media_event = true;
            st.eject_request = false;
        }
    }

    fn medium(&self) -> Option<Arc<BlockBackend>> {
        self.unit.get().and_then(|u| u.state.lock().medium.clone())
    }

    fn remove_medium(&self) -> Option<Arc<BlockBackend>> {
        let u = self.unit.get()?;
        let old = u.state.lock().medium.take()?;
        release_medium(&old, &u.blk_name, &u.qdev_id);
        Some(old)
    }

    fn insert_medium(&self, new: Arc<BlockBackend>) -> Result<(), BlockError> {
        let Some(u) = self.unit.get() else {
            return Err(BlockError::Invalid("The device is not realized".to_string()));
        };
        let mut st = u.state.lock();
        if st.medium.is_some() {
            return Err(BlockError::Invalid("There already is a medium in the device".to_string()));
        }
        claim_medium(&new, &u.blk_name, &u.qdev_id)?;
        st.medium = Some(new);
        Ok(())
    }
}
