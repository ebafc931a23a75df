//! The SCSI disk (QEMU's `hw/scsi/scsi-disk.c`, `scsi-hd`): a direct-access logical unit
//! over a block backend, with the SBC and SPC commands Linux's `sd` and SeaBIOS use -
//! INQUIRY with its vital product data pages, READ CAPACITY, READ and WRITE of every
//! size, MODE SENSE and MODE SELECT of the caching page (the write cache), SYNCHRONIZE
//! CACHE, UNMAP and WRITE SAME. libvirt writes it as
//! `-device scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=libvirt-1-format,id=scsi0-0-0-0`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use block::{BlockBackend, BlockError, IoType};
use qom::{type_init, Prop, Size};

use crate::core::qdev::{DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::core::qdev_properties::OnOffAuto;
use crate::scsi::scsi_bus::{
    block_descriptor, first_bytes, mode_sense_reply, runs_under_unit_attention, with_bounce, ScsiData, ScsiDevice,
    ScsiLogicalUnit, ScsiOutcome, Sense, UnitIdentity,
};


/// QEMU's `TYPE_SCSI_HD`.
pub const TYPE_SCSI_HD: &str = "scsi-hd";

/// QEMU's `DEFAULT_DISCARD_GRANULARITY`.
const DEFAULT_DISCARD_GRANULARITY: u64 = 4096;
/// QEMU's `SCSI_WRITE_SAME_MAX`: the most bytes one WRITE SAME writes.
const WRITE_SAME_MAX: u64 = 512 * 1024;
/// Peripheral device type of a disk.
const TYPE_DISK: u8 = 0x00;

/// Operation codes (SBC-4, SPC-4).
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REZERO_UNIT: u8 = 0x01;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const SEEK_6: u8 = 0x0b;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP: u8 = 0x1b;
    pub const ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SEEK_10: u8 = 0x2b;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}

/// SERVICE ACTION IN(16)'s READ CAPACITY(16).
const SAI_READ_CAPACITY_16: u8 = 0x10;

/// Mode pages.
const MODE_PAGE_R_W_ERROR: u8 = 0x01;
const MODE_PAGE_HD_GEOMETRY: u8 = 0x04;
const MODE_PAGE_CACHING: u8 = 0x08;
const MODE_PAGE_ALL: u8 = 0x3f;

/// How the device was configured (its properties, resolved).
pub struct ScsiDiskConf {
    /// The drive.
    pub backend: Arc<BlockBackend>,
    /// INQUIRY's answers.
    pub identity: UnitIdentity,
    /// Logical block size.
    pub block_size: u32,
    /// Physical block size.
    pub physical_block_size: u32,
    /// Unmap granularity in bytes, 0: no discard.
    pub discard_granularity: u64,
    /// Write cache at power-on.
    pub write_cache: bool,
    /// Medium rotation rate (VPD page 0xb1; 1 for a solid-state disk).
    pub rotation_rate: u16,
    /// DPO and FUA are supported (MODE SENSE's device-specific parameter).
    pub dpofua: bool,
}

/// QEMU's `SCSIDiskState`: the logical unit itself.
pub struct ScsiDisk {
    conf: ScsiDiskConf,
    /// The caching page's WCE bit: off means every write is flushed.
    write_cache: AtomicBool,
    /// A unit attention for the next command (QEMU's `SCSIDevice::unit_attention`): a
    /// resize's CAPACITY DATA HAS CHANGED.
    unit_attention: parking_lot::Mutex<Option<Sense>>,
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The sense QEMU reports for a host error (`scsi_sense_from_errno`).
fn sense_of(e: &BlockError) -> Sense {
    let errno = match e {
        BlockError::Io(io) => io.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::ENOSPC) => Sense::SPACE_ALLOC_FAILED,
        Some(libc::EIO) | None => Sense::IO_ERROR,
        Some(_) => Sense::TARGET_FAILURE,
    }
}

/// The CDB's logical block address and transfer length in blocks, for the READ, WRITE,
/// VERIFY and WRITE SAME families (`None`: a CDB too short for its opcode).
fn lba_and_blocks(cdb: &[u8]) -> Option<(u64, u64)> {
    let need = match cdb.first()? >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => return None,
    };
    if cdb.len() < need {
        return None;
    }
    Some(match need {
        // READ(6)/WRITE(6): 21-bit LBA; a length of 0 means 256 blocks.
        6 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(cdb, 2);
            let n = u64::from(cdb[4]);
            (lba, if n == 0 { 256 } else { n })
        }
        10 => (be32(cdb, 2), be16(cdb, 7)),
        12 => (be32(cdb, 2), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    })
}

impl ScsiDisk {
    /// A disk over `conf`.
    pub fn new(conf: ScsiDiskConf) -> Self {
        let write_cache = AtomicBool::new(conf.write_cache);
        ScsiDisk {
            conf,
            write_cache,
            unit_attention: parking_lot::Mutex::new(None),
        }
    }

    fn blocks(&self) -> u64 {
        self.conf.backend.size() / u64::from(self.conf.block_size)
    }

    /// The byte range of `blocks` blocks at `lba`, if it lies on the disk.
    fn range(&self, kind: IoType, lba: u64, blocks: u64) -> Result<(u64, u64), ScsiOutcome> {
        let end = lba.checked_add(blocks);
        if end.is_none_or(|end| end > self.blocks()) {
            self.conf.backend.account_invalid(kind);
            return Err(ScsiOutcome::Check(Sense::LBA_OUT_OF_RANGE));
        }
        let bs = u64::from(self.conf.block_size);
        Ok((lba * bs, blocks * bs))
    }

    fn read(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let Some((lba, blocks)) = lba_and_blocks(cdb) else {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        };
        let (offset, len) = match self.range(IoType::Read, lba, blocks) {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        if len > data.data_in_len as u64 || data.data_out_len > 0 {
            return ScsiOutcome::Overrun;
        }
        // Straight into the initiator's buffers where they are guest memory.
        if let Some(sg) = data.guest_in.as_deref().and_then(|sg| first_bytes(sg, len as usize)) {
            return match self.conf.backend.readv_guest(&sg, offset) {
                Ok(()) => ScsiOutcome::Good { transferred: len as usize },
                Err(e) => {
                    log::debug!("scsi-hd: read at {offset}: {e}");
                    ScsiOutcome::Check(sense_of(&e))
                }
            };
        }
        with_bounce(len as usize, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                if let Err(e) = self.conf.backend.read_at(&mut buf[..n], offset + done) {
                    log::debug!("scsi-hd: read at {}: {e}", offset + done);
                    return ScsiOutcome::Check(sense_of(&e));
                }
                if data.data_in.write_all(&buf[..n]).is_err() {
                    return ScsiOutcome::Check(Sense::TARGET_FAILURE);
                }
                done += n as u64;
            }
            ScsiOutcome::Good { transferred: len as usize }
        })
    }

    fn write(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let Some((lba, blocks)) = lba_and_blocks(cdb) else {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        };
        let (offset, len) = match self.range(IoType::Write, lba, blocks) {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        if len > data.data_out_len as u64 || data.data_in_len > 0 {
            return ScsiOutcome::Overrun;
        }
        if self.conf.backend.is_read_only() {
            return ScsiOutcome::Check(Sense::WRITE_PROTECTED);
        }
        let written = match data.guest_out.as_deref().and_then(|sg| first_bytes(sg, len as usize)) {
            // Straight from the initiator's buffers where they are guest memory.
            Some(sg) => self.conf.backend.writev_guest(&sg, offset).map_err(|e| {
                log::debug!("scsi-hd: write at {offset}: {e}");
                ScsiOutcome::Check(sense_of(&e))
            }),
            None => self.write_bounced(offset, len, data),
        };
        if let Err(outcome) = written {
            return outcome;
        }
        // FUA (byte 1 bit 3 of the 10-, 12- and 16-byte forms) or no write cache.
        let fua = cdb[0] != op::WRITE_6 && cdb[1] & 0x08 != 0;
        if fua || !self.write_cache.load(Ordering::Relaxed) {
            return match self.flush() {
                ScsiOutcome::Good { .. } => ScsiOutcome::Good { transferred: len as usize },
                failed => failed,
            };
        }
        ScsiOutcome::Good { transferred: len as usize }
    }

    /// A write's data through the bounce buffer.
    fn write_bounced(&self, offset: u64, len: u64, data: &mut ScsiData<'_>) -> Result<(), ScsiOutcome> {
        with_bounce(len as usize, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                if data.data_out.read_exact(&mut buf[..n]).is_err() {
                    return Err(ScsiOutcome::Check(Sense::TARGET_FAILURE));
                }
                if let Err(e) = self.conf.backend.write_at(&buf[..n], offset + done) {
                    log::debug!("scsi-hd: write at {}: {e}", offset + done);
                    return Err(ScsiOutcome::Check(sense_of(&e)));
                }
                done += n as u64;
            }
            Ok(())
        })
    }

    fn verify(&self, cdb: &[u8]) -> ScsiOutcome {
        // BYTCHK: comparing the initiator's data is not offered (QEMU neither).
        if cdb[1] & 0x06 != 0 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let Some((lba, blocks)) = lba_and_blocks(cdb) else {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        };
        match self.range(IoType::Read, lba, blocks) {
            Ok(_) => ScsiOutcome::Good { transferred: 0 },
            Err(outcome) => outcome,
        }
    }

    fn flush(&self) -> ScsiOutcome {
        match self.conf.backend.flush() {
            Ok(()) => ScsiOutcome::Good { transferred: 0 },
            Err(e) => {
                log::debug!("scsi-hd: flush: {e}");
                ScsiOutcome::Check(sense_of(&e))
            }
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ScsiOutcome> {
        if self.conf.backend.is_read_only() {
            return Err(ScsiOutcome::Check(Sense::WRITE_PROTECTED));
        }
        self.conf.backend.discard(offset, len).map_err(|e| {
            log::debug!("scsi-hd: discard at {offset}: {e}");
            ScsiOutcome::Check(sense_of(&e))
        })
    }

    /// UNMAP: the parameter list's block descriptors, each discarded.
    fn unmap(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        if cdb.len() < 10 || cdb[1] & 1 != 0 {
            // ANCHOR is not supported.
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let len = be16(cdb, 7) as usize;
        if len == 0 {
            return ScsiOutcome::Good { transferred: 0 };
        }
        let list = match data.parameters(len) {
            Ok(list) => list,
            Err(outcome) => return outcome,
        };
        if list.len() < 8 || be16(&list, 0) as usize + 2 > list.len() {
            return ScsiOutcome::Check(Sense::INVALID_PARAM_LEN);
        }
        let descriptors = (be16(&list, 2) as usize).min(list.len() - 8);
        for d in list[8..8 + descriptors].chunks_exact(16) {
            let (lba, blocks) = (be64(d, 0), be32(d, 8));
            let (offset, len) = match self.range(IoType::Unmap, lba, blocks) {
                Ok(r) => r,
                Err(outcome) => return outcome,
            };
            if let Err(outcome) = self.discard(offset, len) {
                return outcome;
            }
        }
        ScsiOutcome::Good { transferred: list.len() }
    }

    /// WRITE SAME(10/16): unmaps with UNMAP, writes zeroes with NDOB or a zero block,
    /// else repeats the one block sent.
    fn write_same(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        // No blocks would mean "to the end of the disk", which VPD page 0xb0's WSNZ refuses.
        let Some((lba, blocks)) = lba_and_blocks(cdb).filter(|&(_, n)| n > 0) else {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        };
        let (offset, len) = match self.range(IoType::Write, lba, blocks) {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        if self.conf.backend.is_read_only() {
            return ScsiOutcome::Check(Sense::WRITE_PROTECTED);
        }
        let unmap = cdb[1] & 0x08 != 0;
        let ndob = cdb[0] == op::WRITE_SAME_16 && cdb[1] & 0x01 != 0;
        let taken = if ndob { 0 } else { self.conf.block_size as usize };
        let block = if ndob {
            vec![0u8; self.conf.block_size as usize]
        } else {
            match data.parameters(self.conf.block_size as usize) {
                Ok(b) => b,
                Err(outcome) => return outcome,
            }
        };
        if block.iter().all(|&b| b == 0) {
            let result = if unmap && self.conf.discard_granularity != 0 {
                self.conf
                    .backend
                    .discard(offset, len)
                    .and_then(|()| self.conf.backend.write_zeroes(offset, len))
            } else {
                self.conf.backend.write_zeroes(offset, len)
            };
            return match result {
                Ok(()) => ScsiOutcome::Good { transferred: taken },
                Err(e) => ScsiOutcome::Check(sense_of(&e)),
            };
        }
        if unmap || len > WRITE_SAME_MAX {
            // Unmapping to non-zero data, or more than QEMU repeats a block for.
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        // The block repeated over the bounce buffer (a whole number of blocks), written
        // piece by piece.
        let result = with_bounce(len as usize, |buf| {
            let usable = buf.len() - buf.len() % block.len();
            for piece in buf[..usable].chunks_exact_mut(block.len()) {
                piece.copy_from_slice(&block);
            }
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(usable as u64) as usize;
                self.conf.backend.write_at(&buf[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        });
        match result {
            Ok(()) => ScsiOutcome::Good { transferred: taken },
            Err(e) => ScsiOutcome::Check(sense_of(&e)),
        }
    }

    fn inquiry(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        self.conf
            .identity
            .inquiry(cdb, data, &[0xb0, 0xb1, 0xb2], |page| self.vpd_page(page))
    }

    /// The disk's own vital product data pages, their bodies (QEMU's
    /// `scsi_disk_emulate_vpd_page`).
    fn vpd_page(&self, page: u8) -> Option<Vec<u8>> {
        let c = &self.conf;
        let body: Vec<u8> = match page {
            0xb0 => {
                let mut b = vec![0u8; 0x3c];
                let bs = u64::from(c.block_size);
                let physical_blocks = (u64::from(c.physical_block_size) / bs) as u16;
                // Optimal transfer length granularity: the physical block.
                b[2..4].copy_from_slice(&physical_blocks.to_be_bytes());
                if c.discard_granularity != 0 {
                    let unmap_blocks = (c.discard_granularity / bs).max(1) as u32;
                    // Maximum unmap LBA count and block descriptors; granularity.
                    b[16..20].copy_from_slice(&(u32::MAX).to_be_bytes());
                    b[20..24].copy_from_slice(&(u32::MAX).to_be_bytes());
                    b[24..28].copy_from_slice(&unmap_blocks.to_be_bytes());
                }
                // WSNZ: a WRITE SAME of 0 blocks (to the end of the disk) is refused.
                b[0] = 0x01;
                // Maximum write same length.
                b[32..40].copy_from_slice(&(WRITE_SAME_MAX / bs).to_be_bytes());
                b
            }
            0xb1 => {
                let mut b = vec![0u8; 0x3c];
                b[0..2].copy_from_slice(&c.rotation_rate.to_be_bytes());
                b
            }
            0xb2 => {
                // LBPU, LBPWS, LBPWS10 with discard; thin or full provisioning.
                let lbp = if c.discard_granularity != 0 { 0xe0 } else { 0 };
                let provisioning = if c.discard_granularity != 0 { 2 } else { 1 };
                vec![0, lbp, provisioning, 0]
            }
            _ => return None,
        };
        Some(body)
    }

    fn read_capacity_10(&self, data: &mut ScsiData<'_>) -> ScsiOutcome {
        let last = self.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut reply = [0u8; 8];
        reply[0..4].copy_from_slice(&last.to_be_bytes());
        reply[4..8].copy_from_slice(&self.conf.block_size.to_be_bytes());
        data.reply(&reply, 8)
    }

    fn read_capacity_16(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        if cdb.len() < 16 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let allocation = be32(cdb, 10) as usize;
        let c = &self.conf;
        let mut reply = [0u8; 32];
        reply[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        reply[8..12].copy_from_slice(&c.block_size.to_be_bytes());
        // Logical blocks per physical block, as an exponent.
        reply[13] = (c.physical_block_size / c.block_size).trailing_zeros() as u8;
        if c.discard_granularity != 0 {
            // LBPME: thin provisioning (UNMAP). Not LBPRZ: with `discard=ignore` (the
            // default) unmapped blocks keep their data.
            reply[14] = 0x80;
        }
        data.reply(&reply, allocation)
    }

    /// One mode page as of page control `pc` (0 current, 1 changeable, 2 default).
    fn mode_page(&self, page: u8, pc: u8) -> Option<Vec<u8>> {
        let mut p = match page {
            MODE_PAGE_R_W_ERROR => {
                let mut p = vec![0u8; 12];
                // AWRE and ARRE; a retry count of 0.
                p[2] = 0x80 | 0x40;
                p
            }
            MODE_PAGE_HD_GEOMETRY => {
                let mut p = vec![0u8; 24];
                let cylinders = (self.blocks() / (16 * 63)).min(0xff_ffff) as u32;
                p[2..5].copy_from_slice(&cylinders.to_be_bytes()[1..]);
                p[5] = 16;
                // Rotation rate, as QEMU's 5400.
                p[20..22].copy_from_slice(&5400u16.to_be_bytes());
                p
            }
            MODE_PAGE_CACHING => {
                let mut p = vec![0u8; 20];
                let wce = match pc {
                    1 => true,
                    2 => self.conf.write_cache,
                    _ => self.write_cache.load(Ordering::Relaxed),
                };
                if wce {
                    p[2] = 0x04;
                }
                p
            }
            _ => return None,
        };
        if pc == 1 && page != MODE_PAGE_CACHING {
            p.fill(0);
        }
        p[0] = page;
        p[1] = (p.len() - 2) as u8;
        Some(p)
    }

    fn mode_sense(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let ten = cdb[0] == op::MODE_SENSE_10;
        if cdb.len() < if ten { 10 } else { 6 } {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let dbd = cdb[1] & 0x08 != 0;
        let (pc, page) = (cdb[2] >> 6, cdb[2] & 0x3f);
        if pc == 3 {
            // Saved values (QEMU's SAVING_PARAMS_NOT_SUPPORTED).
            return ScsiOutcome::Check(Sense::new(0x05, 0x39, 0x00));
        }
        if cdb[3] != 0 && !(page == MODE_PAGE_ALL && cdb[3] == 0xff) {
            // Subpages.
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let allocation = if ten { be16(cdb, 7) } else { u64::from(cdb[4]) } as usize;
        let pages: Vec<u8> = if page == MODE_PAGE_ALL {
            [MODE_PAGE_R_W_ERROR, MODE_PAGE_HD_GEOMETRY, MODE_PAGE_CACHING]
                .iter()
                .filter_map(|&p| self.mode_page(p, pc))
                .flatten()
                .collect()
        } else {
            match self.mode_page(page, pc) {
                Some(p) => p,
                None => return ScsiOutcome::Check(Sense::INVALID_FIELD),
            }
        };
        let mut dev_specific = 0u8;
        if self.conf.backend.is_read_only() {
            dev_specific |= 0x80;
        }
        if self.conf.dpofua {
            dev_specific |= 0x10;
        }
        let descriptor = block_descriptor(self.blocks(), self.conf.block_size);
        let descriptor: &[u8] = if dbd { &[] } else { &descriptor };
        data.reply(&mode_sense_reply(ten, dev_specific, descriptor, &pages), allocation)
    }

    /// MODE SELECT: takes the caching page's WCE; other pages must be as MODE SENSE
    /// reports them changeable (they are not), so their contents are ignored.
    fn mode_select(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let ten = cdb[0] == op::MODE_SELECT_10;
        if cdb.len() < if ten { 10 } else { 6 } {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let len = if ten { be16(cdb, 7) } else { u64::from(cdb[4]) } as usize;
        // PF must be set, SP (save pages) is not supported.
        if cdb[1] & 0x10 == 0 || cdb[1] & 0x01 != 0 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        let list = match data.parameters(len) {
            Ok(l) => l,
            Err(outcome) => return outcome,
        };
        let header = if ten { 8 } else { 4 };
        if list.len() < header {
            return if list.is_empty() {
                ScsiOutcome::Good { transferred: 0 }
            } else {
                ScsiOutcome::Check(Sense::INVALID_PARAM_LEN)
            };
        }
        let bd_len = if ten { be16(&list, 6) as usize } else { usize::from(list[3]) };
        let mut at = header + bd_len;
        let mut wce = None;
        while at + 2 <= list.len() {
            let (page, page_len) = (list[at] & 0x3f, usize::from(list[at + 1]));
            let Some(body) = list.get(at + 2..at + 2 + page_len) else {
                return ScsiOutcome::Check(Sense::INVALID_PARAM_LEN);
            };
            if page == MODE_PAGE_CACHING {
                let Some(&flags) = body.first() else {
                    return ScsiOutcome::Check(Sense::INVALID_PARAM);
                };
                wce = Some(flags & 0x04 != 0);
            }
            at += 2 + page_len;
        }
        if let Some(wce) = wce {
            // A cache switched off is flushed first (QEMU's scsi_disk_apply_mode_select).
            if !wce && self.write_cache.load(Ordering::Relaxed) {
                if let ScsiOutcome::Check(sense) = self.flush() {
                    return ScsiOutcome::Check(sense);
                }
            }
            self.write_cache.store(wce, Ordering::Relaxed);
        }
        ScsiOutcome::Good { transferred: list.len() }
    }
}

impl ScsiLogicalUnit for ScsiDisk {
    fn execute(&self, cdb: &[u8], data: &mut ScsiData<'_>) -> ScsiOutcome {
        let Some(&opcode) = cdb.first() else {
            return ScsiOutcome::Check(Sense::INVALID_OPCODE);
        };
        // Every command of this unit needs at least a 6-byte CDB.
        if cdb.len() < 6 {
            return ScsiOutcome::Check(Sense::INVALID_FIELD);
        }
        if !runs_under_unit_attention(opcode) {
            if let Some(sense) = self.unit_attention.lock().take() {
                // REQUEST SENSE reports it as its data, as the CD's does (QEMU's bus
                // handles both units' alike).
                return match opcode {
                    op::REQUEST_SENSE => data.reply(&sense.fixed(), usize::from(cdb[4])),
                    _ => ScsiOutcome::Check(sense),
                };
            }
        }
        match opcode {
            op::TEST_UNIT_READY | op::REZERO_UNIT | op::SEEK_6 | op::SEEK_10 | op::START_STOP
            | op::ALLOW_MEDIUM_REMOVAL => ScsiOutcome::Good { transferred: 0 },
            op::REQUEST_SENSE => data.reply(&Sense::NO_SENSE.fixed(), usize::from(cdb[4])),
            op::INQUIRY => self.inquiry(cdb, data),
            op::READ_CAPACITY_10 => self.read_capacity_10(data),
            op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == SAI_READ_CAPACITY_16 => {
                self.read_capacity_16(cdb, data)
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb, data),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 | op::WRITE_VERIFY_10
            | op::WRITE_VERIFY_12 | op::WRITE_VERIFY_16 => self.write(cdb, data),
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb),
            op::SYNCHRONIZE_CACHE | op::SYNCHRONIZE_CACHE_16 => self.flush(),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb, data),
            op::MODE_SELECT_6 | op::MODE_SELECT_10 => self.mode_select(cdb, data),
            op::UNMAP if self.conf.discard_granularity != 0 => self.unmap(cdb, data),
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, data),
            _ => ScsiOutcome::Check(Sense::INVALID_OPCODE),
        }
    }

    /// QEMU's `scsi_disk_reset` -> `scsi_device_purge_requests(SENSE_CODE(RESET))`: after a
    /// LUN, target or bus reset (the adapter's, as at every boot) the next command but
    /// INQUIRY, REPORT LUNS and REQUEST SENSE reports POWER ON, RESET, OR BUS DEVICE
    /// RESET OCCURRED, in place of any unit attention still pending.
    fn reset(&self) {
        *self.unit_attention.lock() = Some(Sense::RESET);
    }

    fn set_unit_attention(&self, sense: Sense) {
        *self.unit_attention.lock() = Some(sense);
    }

    fn throttled(&self) -> bool {
        self.conf.backend.is_throttled()
    }

    fn drive(&self) -> Option<Arc<BlockBackend>> {
        Some(self.conf.backend.clone())
    }
}

/// QEMU's `TYPE_SCSI_DISK_BASE`, the abstract parent of `scsi-hd` and `scsi-cd`.
pub const TYPE_SCSI_DISK_BASE: &str = "scsi-disk-base";

/// QEMU's `SCSIDiskState` properties every SCSI disk or CD takes
/// (`DEFINE_SCSI_DISK_PROPERTIES`).
#[derive(qom::Object)]
#[qom(name = TYPE_SCSI_DISK_BASE, abstract)]
pub struct ScsiDiskBase {
    #[parent]
    parent: ScsiDevice,
    #[property(desc = "Node name or ID of a block device to use as a backend")]
    drive: Prop<Option<String>>,
    #[property(default = -1, desc = "Boot order of the unit (firmware)")]
    bootindex: Prop<i32>,
    #[property(desc = "Unit serial number (VPD page 0x80)")]
    serial: Prop<Option<String>>,
    #[property(desc = "Vendor INQUIRY reports")]
    vendor: Prop<Option<String>>,
    #[property(desc = "Product INQUIRY reports")]
    product: Prop<Option<String>>,
    #[property(desc = "Revision INQUIRY reports")]
    ver: Prop<Option<String>>,
    #[property(desc = "Device identification (VPD page 0x83; default: the serial or the drive)")]
    device_id: Prop<Option<String>>,
    #[property(default = 0u64, desc = "World wide name (NAA)")]
    wwn: Prop<u64>,
}

type_init!(ScsiDiskBase);

impl DeviceImpl for ScsiDiskBase {}

impl ScsiDiskBase {
    /// `drive=`.
    pub fn drive(&self) -> Option<String> {
        self.drive.get()
    }

    /// What the unit answers INQUIRY with: the properties, else QEMU's defaults (vendor
    /// `QEMU`, `default_product`, revision `2.5+`; the device identification from the
    /// serial's first 20 bytes, else the drive's name `blk_name`).
    pub fn identity(&self, device_type: u8, removable: bool, default_product: &str, blk_name: &str) -> UnitIdentity {
        let serial = self.serial.get();
        let device_id = self
            .device_id
            .get()
            .or_else(|| serial.as_ref().map(|s| s.chars().take(20).collect()))
            .unwrap_or_else(|| blk_name.to_string());
        UnitIdentity {
            device_type,
            removable,
            vendor: self.vendor.get().unwrap_or_else(|| "QEMU".to_string()),
            product: self.product.get().unwrap_or_else(|| default_product.to_string()),
            version: self.ver.get().unwrap_or_else(|| "2.5+".to_string()),
            serial,
            device_id,
            wwn: self.wwn.get(),
        }
    }
}

/// QEMU's `scsi-hd`.
#[derive(qom::Object)]
#[qom(name = TYPE_SCSI_HD)]
pub struct ScsiHd {
    #[parent]
    parent: ScsiDiskBase,
    #[property(default = false, desc = "Report a removable medium")]
    removable: Prop<bool>,
    #[property(default = true, desc = "Support DPO and FUA")]
    dpofua: Prop<bool>,
    #[property(name = "logical_block_size", default = Size(512), desc = "Logical block size of the disk")]
    logical_block_size: Prop<Size>,
    #[property(name = "physical_block_size", default = Size(512), desc = "Physical block size of the disk")]
    physical_block_size: Prop<Size>,
    #[property(name = "discard_granularity", default = Size(u64::MAX), desc = "Unmap granularity (0: no discard; default: 4096)")]
    discard_granularity: Prop<Size>,
    #[property(name = "write-cache", default = OnOffAuto::Auto, desc = "Write cache at power-on (auto: the drive's cache mode)")]
    write_cache: Prop<OnOffAuto>,
    #[property(default = 0u16, desc = "Rotation rate (1: solid state)")]
    rotation_rate: Prop<u16>,
    #[property(name = "share-rw", default = false, desc = "Let other users write the image")]
    share_rw: Prop<bool>,
    backend: OnceLock<Arc<BlockBackend>>,
    unit: OnceLock<Arc<ScsiDisk>>,
}

type_init!(ScsiHd);

/// Errors of `scsi-hd`'s properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum ScsiDiskError {
    /// No `drive=`.
    #[error("drive property not set")]
    NoDrive,
    /// `drive=` names no block backend.
    #[error("Property 'scsi-hd.drive' can't find value '{0}'")]
    DriveNotFound(String),
    /// `drive=` names a drive without a medium.
    #[error("Device needs media, but drive is empty")]
    NoMedium,
    /// `drive=` is attached to another device (the block layer's words).
    #[error("{0}")]
    DriveInUse(String),
    /// A block size that is not a power of two in 512..=32 KiB.
    #[error("Property scsi-hd.{name} doesn't take value {value} (must be a power of 2 between 512 and 32768)")]
    BlockSize {
        /// The property.
        name: &'static str,
        /// Its value.
        value: u64,
    },
    /// The physical block is smaller than the logical one.
    #[error("physical_block_size ({physical}) must not be smaller than logical_block_size ({logical})")]
    PhysicalSmaller {
        /// `physical_block_size`.
        physical: u64,
        /// `logical_block_size`.
        logical: u64,
    },
    /// A discard granularity that is not a multiple of the logical block.
    #[error("discard_granularity must be a multiple of logical_block_size")]
    DiscardGranularity,
}

fn block_size(name: &'static str, value: u64) -> Result<u32, ScsiDiskError> {
    if value.is_power_of_two() && (512..=32768).contains(&value) {
        Ok(value as u32)
    } else {
        Err(ScsiDiskError::BlockSize { name, value })
    }
}

impl DeviceImpl for ScsiHd {
    const DESCRIPTION: Option<&'static str> = Some("virtual SCSI disk");

    /// QEMU's `scsi_hd_realize`: checks the properties, claims the drive, plugs the unit.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let conf = self.conf(ctx).map_err(RealizeError::device)?;
        let backend = conf.backend.clone();
        let qdev = self
            .parent
            .id()
            .or_else(|| ctx.object().canonical_path())
            .unwrap_or_default();
        backend
            .attach_dev(&qdev)
            .map_err(|e| RealizeError::device(ScsiDiskError::DriveInUse(e.to_string())))?;
        let unit = Arc::new(ScsiDisk::new(conf));
        if let Err(e) = self.parent.plug_unit(ctx, unit.clone()) {
            backend.detach_dev();
            return Err(e);
        }
        // QEMU's `scsi_disk_resize_cb`: a resized drive is a changed capacity, reported
        // as a unit attention and to the adapter's driver.
        if let Some(report) = self.parent.change_reporter() {
            backend.set_resize_handler(Some(Arc::new(move || report(Sense::CAPACITY_CHANGED))));
        }
        let _ = self.backend.set(backend);
        let _ = self.unit.set(unit);
        Ok(())
    }

    /// The guest's write cache choice (MODE SELECT), as QEMU keeps it in its backend.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        // The pending unit attention moves too (QEMU's `vmstate_scsi_device`), in a field
        // a stream of before it lacks.
        let mut section = VmStateSection::new(1);
        let wce = self.unit.get().is_none_or(|u| u.write_cache.load(Ordering::Relaxed));
        section.put("wce", wce);
        let ua = self
            .unit
            .get()
            .and_then(|u| *u.unit_attention.lock())
            .map(|s| [s.key, s.asc, s.ascq]);
        section.put("unit_attention", ua);
        Ok(section)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let wce: bool = state.get("wce")?;
        let ua: Option<[u8; 3]> = match state.get("unit_attention") {
            Err(VmStateError::MissingField(_)) => None,
            other => other?,
        };
        if let Some(u) = self.unit.get() {
            u.write_cache.store(wce, Ordering::Relaxed);
            *u.unit_attention.lock() = ua.map(|[key, asc, ascq]| Sense::new(key, asc, ascq));
        }
        Ok(())
    }

    /// A `-drive` goes with its disk; a `-blockdev` node stays for `blockdev-del`.
    fn unrealize(&self, ctx: &DeviceContext) {
        DeviceImpl::unrealize(&self.parent, ctx);
        if let Some(backend) = self.backend.get() {
            backend.detach_dev();
            if backend.is_blk_owned() {
                block::remove_backend(backend);
            }
        }
    }
}

impl ScsiHd {
    fn conf(&self, ctx: &DeviceContext) -> Result<ScsiDiskConf, ScsiDiskError> {
        let drive = self.parent.drive().ok_or(ScsiDiskError::NoDrive)?;
        let backend = block::find_backend(&drive).ok_or_else(|| match block::is_empty_drive(&drive) {
            true => ScsiDiskError::NoMedium,
            false => ScsiDiskError::DriveNotFound(drive.clone()),
        })?;
        let logical = block_size("logical_block_size", self.logical_block_size.get().0)?;
        let physical = block_size("physical_block_size", self.physical_block_size.get().0)?;
        if physical < logical {
            return Err(ScsiDiskError::PhysicalSmaller {
                physical: physical.into(),
                logical: logical.into(),
            });
        }
        let discard_granularity = match self.discard_granularity.get().0 {
            u64::MAX => DEFAULT_DISCARD_GRANULARITY.max(u64::from(logical)),
            g if g % u64::from(logical) != 0 => return Err(ScsiDiskError::DiscardGranularity),
            g => g,
        };
        let write_cache = match self.write_cache.get() {
            OnOffAuto::On => true,
            OnOffAuto::Off => false,
            OnOffAuto::Auto => backend.options().cache.writeback(),
        };
        let _ = ctx;
        let identity = self
            .parent
            .identity(TYPE_DISK, self.removable.get(), "QEMU HARDDISK", &backend.id());
        Ok(ScsiDiskConf {
            backend,
            identity,
            block_size: logical,
            physical_block_size: physical,
            discard_granularity,
            write_cache,
            rotation_rate: self.rotation_rate.get(),
            dpofua: self.dpofua.get(),
        })
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_fields_of_every_cdb_size() {
        assert_eq!(lba_and_blocks(&[op::READ_6, 0x1f, 0xff, 0xff, 0, 0]), Some((0x1f_ffff, 256)));
        let mut c10 = [0u8; 10];
        c10[0] = op::READ_10;
        c10[2..6].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        c10[7..9].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(lba_and_blocks(&c10), Some((0x0102_0304, 8)));
        let mut c16 = [0u8; 16];
        c16[0] = op::WRITE_16;
        c16[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
        c16[10..14].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(lba_and_blocks(&c16), Some((1 << 40, 3)));
        assert_eq!(lba_and_blocks(&c16[..10]), None, "a torn 16-byte CDB");
    }

    /// A disk on a fresh raw image, with its data moved through the bounce buffer (no
    /// guest memory, as when a request's buffer spans two memory regions).
    fn disk(name: &str, size: u64) -> ScsiDisk {
        let dir = std::env::temp_dir().join(format!("qomvm-scsi-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let mut opts = block::OpenOptions::new(&path);
        opts.format = Some(block::Format::Raw);
        let backend = Arc::new(BlockBackend::open(name, &block::auto_node_name(), opts, |_| {}).unwrap());
        ScsiDisk::new(ScsiDiskConf {
            backend,
            identity: UnitIdentity {
                device_type: TYPE_DISK,
                removable: false,
                vendor: "QEMU".into(),
                product: "QEMU HARDDISK".into(),
                version: "2.5+".into(),
                serial: None,
                device_id: String::new(),
                wwn: 0,
            },
            block_size: 512,
            physical_block_size: 512,
            discard_granularity: 4096,
            write_cache: true,
            rotation_rate: 0,
            dpofua: true,
        })
    }

    fn run(disk: &ScsiDisk, cdb: &[u8], out: &[u8], in_len: usize) -> (ScsiOutcome, Vec<u8>) {
        let mut reader = out;
        let mut written = Vec::new();
        let mut data = ScsiData {
            data_out: &mut reader,
            data_out_len: out.len(),
            data_in: &mut written,
            data_in_len: in_len,
            guest_out: None,
            guest_in: None,
        };
        (disk.execute(cdb, &mut data), written)
    }

    #[test]
    fn data_goes_through_the_bounce_buffer_in_pieces() {
        // 600 KiB: three pieces of the 256 KiB buffer.
        let d = disk("bounce.raw", 4 << 20);
        let data: Vec<u8> = (0..600 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let blocks = (data.len() / 512) as u16;
        let mut write = [op::WRITE_10, 0, 0, 0, 0, 8, 0, 0, 0, 0];
        write[7..9].copy_from_slice(&blocks.to_be_bytes());
        assert_eq!(run(&d, &write, &data, 0).0, ScsiOutcome::Good { transferred: data.len() });
        let mut read = write;
        read[0] = op::READ_10;
        let (outcome, back) = run(&d, &read, &[], data.len());
        assert_eq!(outcome, ScsiOutcome::Good { transferred: data.len() });
        assert!(back == data, "the data read back differs");
        // WRITE SAME(10) of one block over 1000 blocks (more than the buffer holds).
        let mut same = [op::WRITE_SAME_10, 0, 0, 0, 0, 8, 0, 0, 0, 0];
        same[7..9].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(run(&d, &same, &[0x5a; 512], 0).0, ScsiOutcome::Good { transferred: 512 });
        let mut read = [op::READ_10, 0, 0, 0, 0, 8, 0, 0, 0, 0];
        read[7..9].copy_from_slice(&1000u16.to_be_bytes());
        let (_, back) = run(&d, &read, &[], 1000 * 512);
        assert!(back.iter().all(|&b| b == 0x5a), "WRITE SAME repeated the block");
    }

    #[test]
    fn fixed_sense_carries_key_and_codes() {
        let s = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 0x05, 10, 0x21, 0x00));
    }
}
