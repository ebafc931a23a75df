//! ATAPI (QEMU's `hw/ide/atapi.c`): the packet commands of an `ide-cd`, the MMC subset
//! firmware and Linux's `sr` driver use - INQUIRY, TEST UNIT READY, REQUEST SENSE, READ
//! CAPACITY, READ(10/12), READ CD, READ TOC, MODE SENSE(10), GET CONFIGURATION, GET EVENT
//! STATUS NOTIFICATION, READ DISC INFORMATION, medium locking and eject. Medium blocks
//! are 2048 bytes; replies go out by PIO in pieces the driver's byte count allows, or by
//! bus-master DMA.

use crate::block::cdrom::{self, media_event, CD_BLOCK};
use crate::ide::core::{
    put_string, status, words_to_bytes, xfer_selected, ChannelState, DmaDir, DmaOp, EndTransfer,
    IdeChannel, Job, PacketDevice, PACKET_SIZE,
};

/// The packet commands of `ide-cd`.
pub(crate) struct Atapi;

impl PacketDevice for Atapi {
    fn identify_packet(&self, st: &ChannelState, unit: usize) -> Vec<u8> {
        identify_packet(st, unit)
    }

    fn packet_command(
        &self,
        ch: &IdeChannel,
        st: &mut ChannelState,
        unit: usize,
        packet: &[u8],
    ) -> Option<Job> {
        packet_command(ch, st, unit, packet)
    }

    fn reply_next(&self, st: &mut ChannelState, unit: usize) -> Option<Job> {
        reply_next(st, unit)
    }

    fn dma_done(&self, st: &mut ChannelState, unit: usize, ok: bool) {
        if ok {
            command_ok(st, unit);
        } else {
            io_error(st, unit);
        }
    }
}
/// A CD block.
const BLOCK: u64 = CD_BLOCK;
/// Blocks loaded per piece of a PIO read.
const PIO_READ_BLOCKS: u64 = 16;

/// The error register's "media changed" bit.
const MC_ERR: u8 = 0x20;

/// Interrupt reason bits in the sector count register.
const REASON_CD: u8 = 0x01;
const REASON_IO: u8 = 0x02;

/// Sense keys.
mod sense {
    pub const NOT_READY: u8 = 0x02;
    pub const ILLEGAL_REQUEST: u8 = 0x05;
    pub const UNIT_ATTENTION: u8 = 0x06;
}

/// Additional sense codes.
mod asc {
    pub const ILLEGAL_OPCODE: u8 = 0x20;
    pub const LOGICAL_BLOCK_OOR: u8 = 0x21;
    pub const INV_FIELD_IN_CMD_PACKET: u8 = 0x24;
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: u8 = 0x39;
    pub const MEDIUM_MAY_HAVE_CHANGED: u8 = 0x28;
    pub const MEDIUM_NOT_PRESENT: u8 = 0x3a;
    pub const MEDIUM_REMOVAL_PREVENTED: u8 = 0x53;
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// QEMU's `ide_atapi_io_error`: a read failed, because the medium went (NOT READY) or
/// past its end (ILLEGAL REQUEST, as QEMU reports any other error).
fn io_error(st: &mut ChannelState, unit: usize) {
    let has_medium = st.info[unit].as_ref().is_some_and(|i| i.backend.is_some());
    if has_medium {
        command_error(st, unit, sense::ILLEGAL_REQUEST, asc::LOGICAL_BLOCK_OOR);
    } else {
        command_error(st, unit, sense::NOT_READY, asc::MEDIUM_NOT_PRESENT);
    }
}

/// QEMU's `ide_atapi_cmd_ok`: the command ended well (the caller raises the interrupt).
fn command_ok(st: &mut ChannelState, unit: usize) {
    let tf = &mut st.drives[unit].tf;
    tf.error = 0;
    tf.status = status::DRDY | status::DSC;
    tf.nsector = (tf.nsector & !7) | REASON_IO | REASON_CD;
}

/// QEMU's `ide_atapi_cmd_error`: CHECK CONDITION with `key`/`code` for REQUEST SENSE.
fn command_error(st: &mut ChannelState, unit: usize, key: u8, code: u8) {
    st.transfer_stop(unit);
    let d = &mut st.drives[unit];
    d.tf.error = key << 4;
    d.tf.status = status::DRDY | status::ERR;
    d.tf.nsector = (d.tf.nsector & !7) | REASON_IO | REASON_CD;
    d.sense_key = key;
    d.asc = code;
    st.set_irq();
}

/// IDENTIFY PACKET DEVICE (QEMU's `ide_atapi_identify`): a removable CD-ROM taking
/// 12-byte packets, with DMA.
fn identify_packet(st: &ChannelState, unit: usize) -> Vec<u8> {
    let mut w = [0u16; 256];
    let Some(info) = st.info[unit].as_ref() else {
        return words_to_bytes(&w);
    };
    // ATAPI, CD-ROM, removable, DRQ within 50 us, 12-byte packets.
    w[0] = 2 << 14 | 5 << 8 | 1 << 7 | 2 << 5;
    put_string(&mut w[10..20], &info.serial);
    w[20] = 3;
    w[21] = 512;
    w[22] = 4;
    put_string(&mut w[23..27], &info.version);
    put_string(&mut w[27..47], &info.model);
    w[48] = 1;
    w[49] = 1 << 9 | 1 << 8; // LBA, DMA
    w[53] = 7;
    let (mdma, udma) = xfer_selected(st.drives[unit].xfer_mode);
    w[62] = 7;
    w[63] = 7 | mdma;
    w[64] = 3;
    w[65] = 0xb4;
    w[66] = 0xb4;
    w[67] = 0x12c;
    w[68] = 0xb4;
    w[71] = 30;
    w[72] = 30;
    w[80] = 0x1e; // up to ATA/ATAPI-4
    w[88] = 0x3f | udma;
    words_to_bytes(&w)
}

/// Blocks of the medium, if one is in the closed tray.
fn medium_blocks(st: &ChannelState, unit: usize) -> Option<u64> {
    let info = st.info[unit].as_ref()?;
    let backend = info.backend.as_ref()?;
    if st.drives[unit].tray_open {
        return None;
    }
    Some(backend.size() / BLOCK)
}

/// A reply the device built: by DMA, or by PIO in pieces (QEMU's `ide_atapi_cmd_reply`).
fn reply(
    ch: &IdeChannel,
    st: &mut ChannelState,
    unit: usize,
    mut data: Vec<u8>,
    max_len: usize,
) -> Option<Job> {
    data.truncate(max_len);
    let d = &mut st.drives[unit];
    d.cd_reading = false;
    if data.is_empty() {
        command_ok(st, unit);
        st.set_irq();
        return None;
    }
    if d.atapi_dma {
        let len = data.len() as u64;
        let op = DmaOp {
            unit,
            dir: DmaDir::Reply(data),
            offset: 0,
            len,
            atapi: true,
        };
        return ch.start_dma(st, op);
    }
    d.packet_left = data.len() as u64;
    d.buffer = data;
    d.pos = 0;
    d.end = 0;
    reply_next(st, unit)
}

/// The next piece of a PIO reply, as large as the driver's byte count allows, loading
/// more of the medium first for a read (QEMU's `ide_atapi_cmd_reply_end`).
fn reply_next(st: &mut ChannelState, unit: usize) -> Option<Job> {
    let d = &mut st.drives[unit];
    if d.packet_left == 0 {
        command_ok(st, unit);
        st.set_irq();
        return None;
    }
    if d.pos >= d.buffer.len() {
        if d.cd_reading {
            return load_blocks(st, unit);
        }
        command_ok(st, unit);
        st.set_irq();
        return None;
    }
    let mut limit = usize::from(d.tf.hcyl) << 8 | usize::from(d.tf.lcyl);
    if limit == 0 || limit == 0xffff {
        limit = 0xfffe;
    }
    let size = (d.buffer.len() - d.pos)
        .min(d.packet_left as usize)
        .min(limit & !1)
        .max(1);
    d.tf.lcyl = size as u8;
    d.tf.hcyl = (size >> 8) as u8;
    d.tf.nsector = (d.tf.nsector & !7) | REASON_IO;
    d.end = d.pos + size;
    d.end_op = EndTransfer::AtapiNext;
    d.tf.status = status::DRDY | status::DSC | status::DRQ;
    d.packet_left -= size as u64;
    st.set_irq();
    None
}

/// Loads the next blocks of a PIO read on the worker, then hands out the first piece.
fn load_blocks(st: &mut ChannelState, unit: usize) -> Option<Job> {
    let backend = st.info[unit].as_ref().and_then(|i| i.backend.clone());
    let d = &mut st.drives[unit];
    let blocks = d.packet_left.div_ceil(BLOCK).min(PIO_READ_BLOCKS);
    let lba = d.cd_lba;
    d.tf.status = status::DRDY | status::DSC | status::BSY;
    Some(Job::new(unit, move |_| {
        let mut data = vec![0u8; (blocks * BLOCK) as usize];
        let ok = backend.is_some_and(|b| b.read_at(&mut data, lba * BLOCK).is_ok());
        Box::new(move |st: &mut ChannelState| {
            if !ok {
                io_error(st, unit);
                return None;
            }
            let d = &mut st.drives[unit];
            d.buffer = data;
            d.pos = 0;
            d.cd_lba += blocks;
            reply_next(st, unit)
        })
    }))
}

/// A read of `count` blocks from `lba`, checked against the medium.
fn read_blocks(
    ch: &IdeChannel,
    st: &mut ChannelState,
    unit: usize,
    lba: u64,
    count: u64,
    total: u64,
) -> Option<Job> {
    if count == 0 {
        command_ok(st, unit);
        st.set_irq();
        return None;
    }
    if lba.checked_add(count).is_none_or(|end| end > total) {
        command_error(st, unit, sense::ILLEGAL_REQUEST, asc::LOGICAL_BLOCK_OOR);
        return None;
    }
    let d = &mut st.drives[unit];
    if d.atapi_dma {
        let op = DmaOp {
            unit,
            dir: DmaDir::Read,
            offset: lba * BLOCK,
            len: count * BLOCK,
            atapi: true,
        };
        return ch.start_dma(st, op);
    }
    d.cd_reading = true;
    d.cd_lba = lba;
    d.packet_left = count * BLOCK;
    d.buffer = Vec::new();
    d.pos = 0;
    d.end = 0;
    load_blocks(st, unit)
}

/// Whether a command runs while a unit attention is pending (QEMU's `ALLOW_UA`):
/// REQUEST SENSE, INQUIRY, GET CONFIGURATION, GET EVENT STATUS NOTIFICATION.
fn allowed_under_unit_attention(cmd: u8) -> bool {
    matches!(cmd, 0x03 | 0x12 | 0x46 | 0x4a)
}

/// QEMU's `ide_atapi_cmd_check_status`: CHECK CONDITION for a pending unit attention.
fn check_status(st: &mut ChannelState, unit: usize) {
    st.transfer_stop(unit);
    let tf = &mut st.drives[unit].tf;
    tf.error = MC_ERR | sense::UNIT_ATTENTION << 4;
    tf.status = status::ERR;
    tf.nsector = 0;
    st.set_irq();
}

/// Whether a command needs a medium (QEMU's `CHECK_READY`).
fn needs_medium(cmd: u8) -> bool {
    matches!(cmd, 0x00 | 0x25 | 0x28 | 0xa8 | 0xbe | 0x2b | 0x43 | 0x51 | 0x42)
}

/// The 12-byte packet arrived: run it (QEMU's `ide_atapi_cmd`).
fn packet_command(
    ch: &IdeChannel,
    st: &mut ChannelState,
    unit: usize,
    packet: &[u8],
) -> Option<Job> {
    let mut p = [0u8; PACKET_SIZE];
    let n = packet.len().min(PACKET_SIZE);
    p[..n].copy_from_slice(&packet[..n]);
    let cmd = p[0];
    let blocks = medium_blocks(st, unit);
    if !allowed_under_unit_attention(cmd) {
        let d = &mut st.drives[unit];
        if d.sense_key == sense::UNIT_ATTENTION {
            check_status(st, unit);
            return None;
        }
        // A changed medium shows as gone, then as new, to guests that do not poll for
        // media events (QEMU's ide_atapi_cmd).
        if blocks.is_some() && d.cdrom_changed != 0 {
            let first = d.cdrom_changed == 1;
            d.cdrom_changed = if first { 2 } else { 0 };
            match first {
                true => command_error(st, unit, sense::NOT_READY, asc::MEDIUM_NOT_PRESENT),
                false => command_error(
                    st,
                    unit,
                    sense::UNIT_ATTENTION,
                    asc::MEDIUM_MAY_HAVE_CHANGED,
                ),
            }
            return None;
        }
    }
    if needs_medium(cmd) && blocks.is_none() {
        command_error(st, unit, sense::NOT_READY, asc::MEDIUM_NOT_PRESENT);
        return None;
    }
    let total = blocks.unwrap_or(0);
    let invalid_field = |st: &mut ChannelState| {
        command_error(st, unit, sense::ILLEGAL_REQUEST, asc::INV_FIELD_IN_CMD_PACKET);
        None
    };
    match cmd {
        // TEST UNIT READY, SET CD SPEED, SEEK(10) within the medium.
        0x00 | 0xbb => reply(ch, st, unit, Vec::new(), 0),
        0x2b => {
            if be32(&p[2..6]) >= total {
                command_error(st, unit, sense::ILLEGAL_REQUEST, asc::LOGICAL_BLOCK_OOR);
                return None;
            }
            reply(ch, st, unit, Vec::new(), 0)
        }
        // REQUEST SENSE: the last error; a unit attention is reported once.
        0x03 => {
            let d = &mut st.drives[unit];
            let mut b = vec![0u8; 18];
            b[0] = 0x70 | 0x80;
            b[2] = d.sense_key;
            b[7] = 10;
            b[12] = d.asc;
            if d.sense_key == sense::UNIT_ATTENTION {
                d.sense_key = 0;
            }
            reply(ch, st, unit, b, usize::from(p[4]))
        }
        // INQUIRY (standard data only).
        0x12 => {
            if p[1] & 1 != 0 {
                return invalid_field(st);
            }
            let mut b = vec![0u8; 36];
            b[0] = 0x05; // CD-ROM
            b[1] = 0x80; // removable
            b[3] = 0x21; // ATAPI, response format 1
            b[4] = 31;
            b[8..16].copy_from_slice(b"QEMU    ");
            b[16..32].copy_from_slice(b"QEMU DVD-ROM    ");
            let version = st.info[unit].as_ref().map_or("", |i| i.version.as_str());
            for (i, c) in b[32..36].iter_mut().enumerate() {
                *c = version.as_bytes().get(i).copied().unwrap_or(b' ');
            }
            reply(ch, st, unit, b, usize::from(p[4]))
        }
        // START STOP UNIT: eject or load.
        0x1b => {
            let (start, eject) = (p[4] & 1 != 0, p[4] & 2 != 0);
            // A power condition: no load or eject (QEMU's cmd_start_stop_unit).
            if eject && p[4] & 0xf0 == 0 {
                let inserted = st.info[unit].as_ref().is_some_and(|i| i.backend.is_some());
                let d = &mut st.drives[unit];
                if !start && !d.tray_open && d.tray_locked {
                    let key = if inserted {
                        sense::NOT_READY
                    } else {
                        sense::ILLEGAL_REQUEST
                    };
                    command_error(st, unit, key, asc::MEDIUM_REMOVAL_PREVENTED);
                    return None;
                }
                if d.tray_open == start {
                    d.tray_open = !start;
                    st.tray_moves.push((unit, !start));
                }
            }
            reply(ch, st, unit, Vec::new(), 0)
        }
        // PREVENT ALLOW MEDIUM REMOVAL.
        0x1e => {
            st.drives[unit].tray_locked = p[4] & 1 != 0;
            reply(ch, st, unit, Vec::new(), 0)
        }
        // READ CAPACITY.
        0x25 => {
            let mut b = Vec::with_capacity(8);
            b.extend_from_slice(&(total.saturating_sub(1) as u32).to_be_bytes());
            b.extend_from_slice(&(BLOCK as u32).to_be_bytes());
            reply(ch, st, unit, b, 8)
        }
        // READ(10), READ(12).
        0x28 => read_blocks(ch, st, unit, be32(&p[2..6]), be16(&p[7..9]) as u64, total),
        0xa8 => read_blocks(ch, st, unit, be32(&p[2..6]), be32(&p[6..10]), total),
        // READ CD: user data of data sectors only.
        0xbe => {
            let lba = be32(&p[2..6]);
            let count = u64::from(p[6]) << 16 | u64::from(p[7]) << 8 | u64::from(p[8]);
            let sector_type = (p[1] >> 2) & 7;
            if sector_type != 0 && sector_type != 2 {
                return invalid_field(st);
            }
            match p[9] & 0xf8 {
                0x00 => reply(ch, st, unit, Vec::new(), 0),
                0x10 => read_blocks(ch, st, unit, lba, count, total),
                _ => invalid_field(st),
            }
        }
        // READ TOC/PMA/ATIP: formatted TOC and session info.
        0x43 => match cdrom::read_toc(total, p[9] >> 6, p[1] & 2 != 0, p[6]) {
            Some(b) => reply(ch, st, unit, b, be16(&p[7..9])),
            None => invalid_field(st),
        },
        // GET CONFIGURATION: profile list, core, removable medium.
        0x46 => {
            let b = cdrom::configuration(blocks, cdrom::Interface::Atapi, p[1] & 3, be16(&p[2..4]) as u16);
            reply(ch, st, unit, b, be16(&p[7..9]))
        }
        // GET EVENT STATUS NOTIFICATION (polled): the media class.
        0x4a => {
            if p[1] & 1 == 0 {
                return invalid_field(st);
            }
            let inserted = st.info[unit].as_ref().is_some_and(|i| i.backend.is_some());
            let d = &mut st.drives[unit];
            // QEMU's event_status_media: a new medium, else an eject request, is reported
            // once, while the tray is closed.
            let mut event = media_event::NO_CHANGE;
            if p[4] & 0x10 != 0 && !d.tray_open {
                if d.new_media {
                    event = media_event::NEW_MEDIA;
                    d.new_media = false;
                } else if d.eject_request {
                    event = media_event::EJECT_REQUESTED;
                    d.eject_request = false;
                }
            }
            let b = cdrom::event_status(p[4], event, d.tray_open, inserted);
            reply(ch, st, unit, b, be16(&p[7..9]))
        }
        // READ DISC INFORMATION: one finalized session of one track.
        0x51 => {
            if p[1] & 7 != 0 {
                return invalid_field(st);
            }
            reply(ch, st, unit, cdrom::disc_information(), be16(&p[7..9]))
        }
        // MODE SENSE(10): error recovery and capabilities pages, current values only.
        0x5a => {
            let (action, page) = (p[2] >> 6, p[2] & 0x3f);
            if action == 3 {
                command_error(
                    st,
                    unit,
                    sense::ILLEGAL_REQUEST,
                    asc::SAVING_PARAMETERS_NOT_SUPPORTED,
                );
                return None;
            }
            if action != 0 {
                return invalid_field(st);
            }
            let mut b = vec![0u8; 8];
            b[2] = 0x70;
            match page {
                0x01 => b.extend_from_slice(&cdrom::error_recovery_page()),
                // Capabilities: 18 bytes after the page header, 28 with the mode header
                // (QEMU's cmd_mode_sense).
                0x2a => b.extend_from_slice(&cdrom::capabilities_page(st.drives[unit].tray_locked)),
                _ => return invalid_field(st),
            }
            let len = (b.len() - 2) as u16;
            b[0..2].copy_from_slice(&len.to_be_bytes());
            reply(ch, st, unit, b, be16(&p[7..9]))
        }
        // MECHANISM STATUS: no changer, one slot.
        0xbd => {
            let b = vec![0, 0, 0, 0, 0, 1, 0, 0];
            reply(ch, st, unit, b, be16(&p[8..10]))
        }
        _ => {
            log::debug!("ide-cd: unsupported packet command {cmd:#04x}");
            command_error(st, unit, sense::ILLEGAL_REQUEST, asc::ILLEGAL_OPCODE);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ide::core::tests::hd_info;
    use crate::ide::core::{DriveKind, IdeChannel};

    fn cd_channel() -> Arc<IdeChannel> {
        let mut info = hd_info(None);
        info.kind = DriveKind::Cd;
        info.packet = Some(&Atapi);
        info.model = "QEMU DVD-ROM".into();
        crate::ide::core::tests::channel_with(info)
    }

    /// Sends `packet` by PIO and reads the reply as the driver would.
    fn packet(ch: &IdeChannel, packet: [u8; 12]) -> (u8, Vec<u8>) {
        ch.ioport_write(1, 0);
        ch.ioport_write(4, 0x00);
        ch.ioport_write(5, 0x08);
        ch.ioport_write(7, 0xa0);
        for pair in packet.chunks(2) {
            ch.data_write(u64::from(u16::from_le_bytes([pair[0], pair[1]])), 2);
        }
        let mut reply = Vec::new();
        loop {
            let status = ch.ioport_read(7);
            if status & status::DRQ == 0 {
                return (status, reply);
            }
            let n = usize::from(ch.ioport_read(5)) << 8 | usize::from(ch.ioport_read(4));
            for _ in 0..n.div_ceil(2) {
                reply.extend_from_slice(&(ch.data_read(2) as u16).to_le_bytes());
            }
            reply.truncate(reply.len() - n % 2);
        }
    }

    #[test]
    fn a_cd_drive_shows_the_atapi_signature() {
        let ch = cd_channel();
        assert_eq!((ch.ioport_read(4), ch.ioport_read(5)), (0x14, 0xeb));
        ch.ioport_write(7, 0xec);
        assert_eq!(ch.ioport_read(7) & status::ERR, status::ERR, "IDENTIFY DEVICE aborts");
        ch.ioport_write(7, 0xa1);
        let w0 = ch.data_read(2) as u16;
        assert_eq!(w0 >> 14, 2, "ATAPI");
        assert_eq!((w0 >> 8) & 0x1f, 5, "CD-ROM");
    }

    #[test]
    fn inquiry_replies_and_an_empty_drive_is_not_ready() {
        let ch = cd_channel();
        let (status, data) = packet(&ch, [0x12, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(status & status::ERR, 0);
        assert_eq!(data.len(), 36);
        assert_eq!(&data[16..28], b"QEMU DVD-ROM");
        let (status, _) = packet(&ch, [0; 12]);
        assert_eq!(status & status::ERR, status::ERR);
        let (_, sense) = packet(&ch, [0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((sense[2], sense[12]), (sense::NOT_READY, asc::MEDIUM_NOT_PRESENT));
        let (status, _) = packet(&ch, [0xff; 12]);
        assert_eq!(ch.ioport_read(1) >> 4, sense::ILLEGAL_REQUEST);
        assert_eq!(status & status::ERR, status::ERR);
    }
}
