//! The drives on an IDE bus (QEMU's `hw/ide/ide-dev.c`): the abstract `ide-device` with
//! the properties every drive takes (`drive`, `unit`, `serial`, `model`, `bootindex`, ...),
//! `ide-hd` (an ATA disk, with its geometry) and `ide-cd` (an ATAPI CD/DVD-ROM, possibly
//! without a medium). libvirt writes them as
//! `-device ide-cd,bus=ide.0,unit=0,drive=libvirt-1-format,id=ide0-0-0,bootindex=1`.

use std::sync::{Arc, OnceLock};

use block::{BlockBackend, BlockError};
use parking_lot::Mutex;
use qom::{type_init, Prop, Size};

use crate::core::qdev_properties::OnOffAuto;

use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::core::removable_media::RemovableMedia;
use crate::ide::core::{DriveInfo, DriveKind, IdeBus, IdeChannel, TYPE_IDE_BUS, UNITS};

/// QEMU's `TYPE_IDE_DEVICE`.
pub const TYPE_IDE_DEVICE: &str = "ide-device";
/// QEMU's `TYPE_IDE_HD`.
pub const TYPE_IDE_HD: &str = "ide-hd";
/// QEMU's `TYPE_IDE_CD`.
pub const TYPE_IDE_CD: &str = "ide-cd";

/// QEMU's `IDEDevice`: what every IDE drive is configured with.
#[derive(qom::Object)]
#[qom(name = TYPE_IDE_DEVICE, abstract)]
pub struct IdeDevice {
    #[parent]
    parent: DeviceState,
    #[property(desc = "Node name or ID of a block device to use as a backend")]
    drive: Prop<Option<String>>,
    #[property(default = u32::MAX, desc = "Master (0) or slave (1) (default: the first free)")]
    unit: Prop<u32>,
    #[property(desc = "Serial number IDENTIFY reports (default: QM0000n)")]
    serial: Prop<Option<String>>,
    #[property(desc = "Model IDENTIFY reports")]
    model: Prop<Option<String>>,
    #[property(desc = "Firmware revision IDENTIFY reports")]
    ver: Prop<Option<String>>,
    #[property(default = 0u64, desc = "World wide name")]
    wwn: Prop<u64>,
    #[property(default = -1, desc = "Boot order of the drive (firmware)")]
    bootindex: Prop<i32>,
    #[property(name = "logical_block_size", default = Size(512), desc = "Logical block size (512 only)")]
    logical_block_size: Prop<Size>,
    #[property(name = "physical_block_size", default = Size(512), desc = "Physical block size")]
    physical_block_size: Prop<Size>,
    #[property(name = "write-cache", default = OnOffAuto::Auto, desc = "Write cache on at power-on (auto: the drive's cache mode)")]
    write_cache: Prop<OnOffAuto>,
    #[property(name = "share-rw", default = false, desc = "Let other users write the image")]
    share_rw: Prop<bool>,
    /// Where the drive was plugged, once realized.
    placed: OnceLock<(Arc<IdeChannel>, usize, u32)>,
    /// The medium (a CD drive's changes; `None`: none in).
    medium: Mutex<Option<Arc<BlockBackend>>>,
    /// The backend's name (QEMU's `blk_name`: the `-drive` id; empty for a `-blockdev`
    /// node or no drive) and the device's id or QOM path, fixed at realize.
    blk_name: OnceLock<String>,
    qdev_id: OnceLock<String>,
    /// The drive is an `ide-cd`.
    is_cd: OnceLock<bool>,
}

type_init!(IdeDevice);

impl DeviceImpl for IdeDevice {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_IDE_BUS);
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((channel, unit, _)) = self.placed.get() {
            channel.detach(*unit);
        }
        if let Some(backend) = self.medium.lock().take() {
            backend.detach_dev();
        }
        if let Some(name) = self.blk_name.get().filter(|n| !n.is_empty()) {
            block::remove_empty_drive(name);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

/// Errors of IDE drives' properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum IdeDeviceError {
    /// `unit=` beyond the bus.
    #[error("Can't create IDE unit {0}, bus supports only {UNITS} units")]
    UnitTooBig(u32),
    /// The unit has a drive.
    #[error("IDE unit {0} is in use")]
    UnitInUse(u32),
    /// An `ide-hd` without `drive=`.
    #[error("No drive specified")]
    NoDrive,
    /// `drive=` names no block backend.
    #[error("Property '{0}.drive' can't find value '{1}'")]
    DriveNotFound(&'static str, String),
    /// A disk on a drive without a medium.
    #[error("Device needs media, but drive is empty")]
    NoMedium,
    /// `drive=` is attached to another device (the block layer's words).
    #[error("{0}")]
    DriveInUse(String),
    /// A disk on a read-only image.
    #[error("Can't use a read-only drive")]
    ReadOnly,
    /// A logical block size other than 512.
    #[error("logical_block_size must be 512 for IDE")]
    LogicalBlockSize,
    /// A physical block size that is not a power of two in 512..=2 MiB.
    #[error("Property {0}.physical_block_size doesn't take value {1} (must be a power of 2 between 512 and 2097152)")]
    PhysicalBlockSize(&'static str, u64),
    /// A geometry value out of range.
    #[error("{0} must be between 1 and {1}")]
    Geometry(&'static str, u32),
    /// The bus has no controller behind it.
    #[error("IDE bus has no controller")]
    NoController,
}

impl IdeDevice {
    /// QEMU's `ide_dev_initfn`: checks the properties, claims the drive and puts it on the
    /// bus's channel.
    fn realize_drive(
        &self,
        ctx: &DeviceContext,
        kind: DriveKind,
        chs: Option<(u32, u32, u32)>,
        rotation_rate: u16,
    ) -> Result<(), RealizeError> {
        let err = RealizeError::device;
        let bus: &IdeBus = ctx.bus_state()?;
        let channel = bus.channel().ok_or(err(IdeDeviceError::NoController))?;
        let taken = channel.units_taken();
        let unit = match self.unit.get() {
            u32::MAX => u32::from(taken[0]),
            unit => unit,
        };
        if unit as usize >= UNITS {
            return Err(err(IdeDeviceError::UnitTooBig(unit)));
        }
        if taken[unit as usize] {
            return Err(err(IdeDeviceError::UnitInUse(unit)));
        }
        let type_name = ctx.type_name();
        let drive = self.drive.get();
        let backend = match &drive {
            Some(name) => match block::find_backend(name) {
                Some(backend) => Some(backend),
                // An empty CD drive's backend (`-drive if=none,media=cdrom`).
                None if kind == DriveKind::Cd && block::is_empty_drive(name) => None,
                None if block::is_empty_drive(name) => return Err(err(IdeDeviceError::NoMedium)),
                None => {
                    return Err(err(IdeDeviceError::DriveNotFound(
                        type_name,
                        name.clone(),
                    )))
                }
            },
            None if kind == DriveKind::Hd => return Err(err(IdeDeviceError::NoDrive)),
            None => None,
        };
        if self.logical_block_size.get().0 != 512 {
            return Err(err(IdeDeviceError::LogicalBlockSize));
        }
        let physical = self.physical_block_size.get().0;
        if !physical.is_power_of_two() || !(512..=2 * 1024 * 1024).contains(&physical) {
            return Err(err(IdeDeviceError::PhysicalBlockSize(type_name, physical)));
        }
        if kind == DriveKind::Hd && backend.as_ref().is_some_and(|b| b.is_read_only()) {
            return Err(err(IdeDeviceError::ReadOnly));
        }
        let sectors = backend.as_ref().map_or(0, |b| b.size() / 512);
        let chs = chs.unwrap_or_else(|| guess_geometry(sectors));
        // QEMU's blk_get_attached_dev_id: the device's id, else its QOM path.
        let qdev = self
            .parent
            .id()
            .or_else(|| ctx.object().canonical_path())
            .unwrap_or_default();
        let blk_name = match (&backend, &drive) {
            (Some(backend), _) => {
                if let Err(e) = backend.attach_dev(&qdev) {
                    return Err(err(IdeDeviceError::DriveInUse(e.to_string())));
                }
                if kind == DriveKind::Hd {
                    // A disk may be resized (QEMU's `ide_resize_cb`): IDENTIFY reads the
                    // size when asked; the geometry stays, as QEMU's.
                    backend.set_resize_handler(Some(Arc::new(|| {})));
                }
                *self.medium.lock() = Some(backend.clone());
                backend.id()
            }
            (None, Some(name)) => {
                match block::attach_empty_drive(name, &qdev) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => return Err(err(IdeDeviceError::DriveInUse(e.to_string()))),
                    // A node name, not a drive's (no backend without a medium).
                    None => {
                        return Err(err(IdeDeviceError::DriveNotFound(
                            type_name,
                            name.clone(),
                        )))
                    }
                }
                name.clone()
            }
            (None, None) => String::new(),
        };
        let bus_id = bus.bus_id();
        let write_cache = match self.write_cache.get() {
            OnOffAuto::On => true,
            OnOffAuto::Off => false,
            OnOffAuto::Auto => backend.as_ref().is_none_or(|b| b.options().cache.writeback()),
        };
        let default_model = match kind {
            DriveKind::Hd => "QEMU HARDDISK",
            DriveKind::Cd => "QEMU DVD-ROM",
        };
        let info = DriveInfo {
            kind,
            packet: match kind {
                DriveKind::Cd => Some(&crate::ide::atapi::Atapi),
                DriveKind::Hd => None,
            },
            backend,
            blk_name: blk_name.clone(),
            qdev_id: qdev.clone(),
            // QEMU numbers the controller's four drive slots QM00001..QM00004.
            serial: self
                .serial
                .get()
                .unwrap_or_else(|| format!("QM{:05}", bus_id as usize * UNITS + unit as usize + 1)),
            model: self.model.get().unwrap_or_else(|| default_model.to_string()),
            version: self.ver.get().unwrap_or_else(|| "2.5+".to_string()),
            wwn: self.wwn.get(),
            chs,
            physical_block_size: physical as u32,
            rotation_rate,
            write_cache,
        };
        if channel.attach(unit as usize, Arc::new(info)).is_err() {
            return Err(err(IdeDeviceError::UnitInUse(unit)));
        }
        self.unit.set(unit);
        let _ = self.blk_name.set(blk_name);
        let _ = self.qdev_id.set(qdev);
        let _ = self.is_cd.set(kind == DriveKind::Cd);
        let _ = self.placed.set((channel, unit as usize, bus_id));
        Ok(())
    }

    /// A CD drive's tray as query-block reports it: (locked, open); `None` for a disk.
    pub fn tray(&self) -> Option<(bool, bool)> {
        let (channel, unit, _) = self.placed.get()?;
        self.is_cd.get().copied().filter(|&cd| cd)?;
        Some(channel.tray(*unit))
    }

    /// The backend's name (`-drive id=`; empty for QEMU's anonymous backend).
    pub fn blk_name(&self) -> String {
        self.blk_name.get().cloned().unwrap_or_default()
    }

    /// QEMU's firmware path of the drive below its controller: `drive@BUS/disk@UNIT`,
    /// once realized.
    pub fn fw_dev_path(&self) -> Option<String> {
        let (_, unit, bus_id) = self.placed.get()?;
        Some(format!("drive@{bus_id:x}/disk@{unit:x}"))
    }
}

/// QEMU's `guess_chs_for_size`: 16 heads, 63 sectors a track, cylinders from the size
/// (2 to 16383).
fn guess_geometry(sectors: u64) -> (u32, u32, u32) {
    let cylinders = (sectors / (16 * 63)).clamp(2, 16383) as u32;
    (cylinders, 16, 63)
}

/// QEMU's `IDEDrive` as `ide-hd`.
#[derive(qom::Object)]
#[qom(name = TYPE_IDE_HD)]
pub struct IdeHd {
    #[parent]
    parent: IdeDevice,
    #[property(default = 0u32, desc = "Cylinders (default: from the size)")]
    cyls: Prop<u32>,
    #[property(default = 0u32, desc = "Heads (default: 16)")]
    heads: Prop<u32>,
    #[property(default = 0u32, desc = "Sectors per track (default: 63)")]
    secs: Prop<u32>,
    #[property(default = 0u16, desc = "Nominal media rotation rate (1: solid state)")]
    rotation_rate: Prop<u16>,
}

type_init!(IdeHd);

impl DeviceImpl for IdeHd {
    const DESCRIPTION: Option<&'static str> = Some("virtual IDE disk");
    // The drive's registers are the controller's, saved with it.
    const STATELESS: bool = true;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let (c, h, s) = (self.cyls.get(), self.heads.get(), self.secs.get());
        // QEMU's blkconf_geometry: a geometry given is given whole, and in range.
        let chs = if c != 0 || h != 0 || s != 0 {
            for (name, value, max) in [("cyls", c, 65535), ("heads", h, 16), ("secs", s, 255)] {
                if !(1..=max).contains(&value) {
                    return Err(RealizeError::device(IdeDeviceError::Geometry(name, max)));
                }
            }
            Some((c, h, s))
        } else {
            None
        };
        self.parent
            .realize_drive(ctx, DriveKind::Hd, chs, self.rotation_rate.get())
    }
}

/// QEMU's `IDEDrive` as `ide-cd`: its medium changes (QEMU's `ide_cd_block_ops`).
#[derive(qom::Object)]
#[qom(name = TYPE_IDE_CD, implements = [dyn RemovableMedia])]
pub struct IdeCd {
    #[parent]
    parent: IdeDevice,
}

type_init!(IdeCd);

impl DeviceImpl for IdeCd {
    const DESCRIPTION: Option<&'static str> = Some("virtual IDE CD-ROM");
    const STATELESS: bool = true;

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.parent.realize_drive(ctx, DriveKind::Cd, None, 0)
    }
}

impl RemovableMedia for IdeCd {
    fn blk_name(&self) -> String {
        self.parent.blk_name()
    }

    fn qdev_id(&self) -> String {
        self.parent.qdev_id.get().cloned().unwrap_or_default()
    }

    fn has_tray(&self) -> bool {
        true
    }

    fn is_tray_open(&self) -> bool {
        self.parent.tray().is_some_and(|(_, open)| open)
    }

    fn is_medium_locked(&self) -> bool {
        self.parent.tray().is_some_and(|(locked, _)| locked)
    }

    fn eject_request(&self, force: bool) {
        if let Some((channel, unit, _)) = self.parent.placed.get() {
            channel.eject_request(*unit, force);
        }
    }

    fn change_media_cb(&self, load: bool) {
        if let Some((channel, unit, _)) = self.parent.placed.get() {
            channel.change_media(*unit, load);
        }
    }

    fn medium(&self) -> Option<Arc<BlockBackend>> {
        self.parent.medium.lock().clone()
    }

    fn remove_medium(&self) -> Option<Arc<BlockBackend>> {
        let mut medium = self.parent.medium.lock();
        let old = medium.take()?;
        if let Some((channel, unit, _)) = self.parent.placed.get() {
            channel.set_medium(*unit, None);
        }
        crate::core::removable_media::release_medium(&old, &self.blk_name(), &self.qdev_id());
        Some(old)
    }

    fn insert_medium(&self, new: Arc<BlockBackend>) -> Result<(), BlockError> {
        let mut medium = self.parent.medium.lock();
        if medium.is_some() {
            return Err(BlockError::Invalid(
                "There already is a medium in the device".to_string(),
            ));
        }
        crate::core::removable_media::claim_medium(&new, &self.blk_name(), &self.qdev_id())?;
        if let Some((channel, unit, _)) = self.parent.placed.get() {
            channel.set_medium(*unit, Some(new.clone()));
        }
        *medium = Some(new);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_guess_follows_qemus_bounds() {
        assert_eq!(guess_geometry(0), (2, 16, 63));
        assert_eq!(guess_geometry(4 * 1024 * 1024 * 2), (8322, 16, 63));
        assert_eq!(guess_geometry(u64::MAX / 1024), (16383, 16, 63));
    }
}
