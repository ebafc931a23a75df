//! What every CD/DVD-ROM drive answers the same way, whatever carries its commands (QEMU's
//! `hw/block/cdrom.c` and the MMC replies `hw/ide/atapi.c` and `hw/scsi/scsi-disk.c` each
//! build): the TOC, the feature list of GET CONFIGURATION, the media event of GET EVENT
//! STATUS NOTIFICATION, READ DISC INFORMATION and the mode pages. `ide-cd` (ATAPI) and
//! `scsi-cd` build their replies here.

/// A CD block.
pub const CD_BLOCK: u64 = 2048;
/// Media larger than 80 minutes of CD are DVDs.
pub const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;

/// MMC profiles.
pub const PROFILE_CD_ROM: u16 = 0x08;
/// The DVD-ROM profile.
pub const PROFILE_DVD_ROM: u16 = 0x10;

/// GET EVENT STATUS NOTIFICATION's media event codes.
pub mod media_event {
    /// Nothing changed.
    pub const NO_CHANGE: u8 = 0;
    /// The user asked for the medium (the host's `eject`).
    pub const EJECT_REQUESTED: u8 = 1;
    /// A medium came in.
    pub const NEW_MEDIA: u8 = 2;
}

/// The core feature's physical interface standard (MMC-6 5.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// SCSI family.
    Scsi = 1,
    /// ATAPI.
    Atapi = 2,
}

/// A block address as minutes, seconds and frames (with the 2-second pregap).
pub fn lba_to_msf(lba: u64) -> [u8; 3] {
    let lba = lba + 150;
    [(lba / (60 * 75)) as u8, (lba / 75 % 60) as u8, (lba % 75) as u8]
}

/// The current profile of a drive holding `blocks` blocks (0: no medium).
pub fn current_profile(blocks: Option<u64>) -> u16 {
    match blocks {
        None => 0,
        Some(n) if n > CD_MAX_BLOCKS => PROFILE_DVD_ROM,
        Some(_) => PROFILE_CD_ROM,
    }
}

/// READ TOC/PMA/ATIP of a one-track data disc of `total` blocks (QEMU's
/// `cdrom_read_toc`): format 0 (formatted TOC from track `start`) or 1 (session info),
/// addresses as MSF or LBA. `None` for a format or start track it does not have.
pub fn read_toc(total: u64, format: u8, msf: bool, start: u8) -> Option<Vec<u8>> {
    let address = |lba: u64| -> [u8; 4] {
        if msf {
            let [m, s, f] = lba_to_msf(lba);
            [0, m, s, f]
        } else {
            (lba as u32).to_be_bytes()
        }
    };
    let mut b = vec![0u8, 0, 1, 1];
    match format {
        0 => {
            if start > 1 && start != 0xaa {
                return None;
            }
            if start <= 1 {
                b.extend_from_slice(&[0, 0x14, 1, 0]);
                b.extend_from_slice(&address(0));
            }
            // The lead-out (ADR 1, control 6).
            b.extend_from_slice(&[0, 0x16, 0xaa, 0]);
            b.extend_from_slice(&address(total));
        }
        1 => {
            b.extend_from_slice(&[0, 0x14, 1, 0]);
            b.extend_from_slice(&address(0));
        }
        _ => return None,
    }
    let len = (b.len() - 2) as u16;
    b[0..2].copy_from_slice(&len.to_be_bytes());
    Some(b)
}

/// GET CONFIGURATION (`rt` and the starting feature `start`): the profile list, the core
/// feature on `interface`, and the removable medium feature (tray, eject, lock).
pub fn configuration(blocks: Option<u64>, interface: Interface, rt: u8, start: u16) -> Vec<u8> {
    let current = current_profile(blocks);
    let mut b = vec![0u8; 8];
    b[6..8].copy_from_slice(&current.to_be_bytes());
    let mut profiles = Vec::new();
    for profile in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
        profiles.extend_from_slice(&profile.to_be_bytes());
        profiles.extend_from_slice(&[u8::from(profile == current), 0]);
    }
    let features: [(u16, Vec<u8>); 3] = [
        (0x0000, profiles),
        (0x0001, vec![0, 0, 0, interface as u8, 0, 0, 0, 0]),
        (0x0003, vec![0x29, 0, 0, 0]),
    ];
    for (code, data) in features {
        let wanted = match rt {
            2 => code == start,
            _ => code >= start,
        };
        if !wanted {
            continue;
        }
        b.extend_from_slice(&code.to_be_bytes());
        // Version (core: 1), persistent and current.
        let version = if code == 0x0001 { 1 << 2 } else { 0 };
        b.push(version | 0x03);
        b.push(data.len() as u8);
        b.extend_from_slice(&data);
    }
    let len = (b.len() - 4) as u32;
    b[0..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// GET EVENT STATUS NOTIFICATION (polled) for the notification classes `classes`: the
/// media class's `event` and the tray and medium state, or "no event available" when the
/// media class was not asked for.
pub fn event_status(classes: u8, event: u8, tray_open: bool, inserted: bool) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    // Supported classes: media.
    b[3] = 0x10;
    if classes & 0x10 != 0 {
        b[2] = 0x04;
        let media_status = match (tray_open, inserted) {
            (true, _) => 1,
            (false, true) => 2,
            (false, false) => 0,
        };
        b.extend_from_slice(&[event, media_status, 0, 0]);
    } else {
        b[2] = 0x80;
    }
    let len = (b.len() - 4) as u16;
    b[0..2].copy_from_slice(&len.to_be_bytes());
    b
}

/// READ DISC INFORMATION: one finalized session of one track.
pub fn disc_information() -> Vec<u8> {
    let mut b = vec![0u8; 34];
    b[1] = 32;
    b[2] = 0x0e;
    b[3] = 1;
    b[4] = 1;
    b[5] = 1;
    b[6] = 1;
    b[7] = 0x20;
    b
}

/// The read error recovery mode page (0x01).
pub fn error_recovery_page() -> Vec<u8> {
    vec![0x01, 0x06, 0, 5, 0, 0, 0, 0]
}

/// The capabilities and mechanical status page (0x2a), 20 bytes: reads CD-R/RW and
/// DVD-ROM, a tray that ejects and locks (`locked`: locked now), 4x speed.
pub fn capabilities_page(locked: bool) -> Vec<u8> {
    let mut b = vec![0x2a, 18, 0x3b, 0x00, 0x71, 3 << 5];
    b.push(1 | 1 << 3 | 1 << 5 | u8::from(locked) << 1);
    b.push(0);
    b.extend_from_slice(&704u16.to_be_bytes());
    b.extend_from_slice(&[0, 2]);
    b.extend_from_slice(&512u16.to_be_bytes());
    b.extend_from_slice(&704u16.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_toc_has_track_one_and_the_lead_out() {
        let toc = read_toc(1000, 0, false, 0).unwrap();
        assert_eq!(toc, [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x16, 0xaa, 0, 0, 0, 0x03, 0xe8]);
        let msf = read_toc(0, 1, true, 0).unwrap();
        assert_eq!(&msf[8..12], &[0, 0, 2, 0], "LBA 0 is 00:02:00");
        assert_eq!(read_toc(1000, 0, false, 2), None);
        assert_eq!(read_toc(1000, 3, false, 0), None);
    }

    #[test]
    fn configuration_reports_the_profile_of_the_medium() {
        let cd = configuration(Some(1000), Interface::Scsi, 0, 0);
        assert_eq!(u16::from_be_bytes([cd[6], cd[7]]), PROFILE_CD_ROM);
        assert_eq!(cd[8 + 4 + 8 + 4 + 3], Interface::Scsi as u8, "the core feature's interface");
        let none = configuration(None, Interface::Atapi, 2, 3);
        assert_eq!((none[6], none[7], none.len()), (0, 0, 16), "only feature 3, no profile");
    }
}
