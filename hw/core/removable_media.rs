//! Devices with removable media (QEMU's `BlockDevOps` of a CD drive, and the medium slot
//! of its `BlockBackend`): what the monitor's `eject`, `blockdev-open-tray`,
//! `blockdev-close-tray`, `blockdev-remove-medium`, `blockdev-insert-medium` and
//! `blockdev-change-medium` drive, as a QOM interface (`ide-cd` implements it; a
//! `scsi-cd` or floppy would too). The device keeps its backend's name for its whole life;
//! only the medium behind it changes.

use std::sync::Arc;

use block::{BlockBackend, BlockError};
use qom::Interface;

use crate::core::qapi_event::{self, json};

/// The interface's QOM name.
pub const TYPE_REMOVABLE_MEDIA: &str = "removable-media";

/// A device whose medium can change while the guest runs.
pub trait RemovableMedia: Send + Sync {
    /// The name of the device's backend (`-drive id=`, `ide1-cd0`); empty for QEMU's
    /// anonymous backend (`-device ide-cd,drive=NODE`, or no `drive=`).
    fn blk_name(&self) -> String;
    /// The device's id, else its QOM path (QEMU's `blk_get_attached_dev_id`).
    fn qdev_id(&self) -> String;
    /// Whether the drive has a tray (QEMU's `is_tray_open` callback exists); without one,
    /// taking out or putting in the medium moves it at once.
    fn has_tray(&self) -> bool;
    /// The tray is open.
    fn is_tray_open(&self) -> bool;
    /// The guest locked the medium in (PREVENT ALLOW MEDIUM REMOVAL).
    fn is_medium_locked(&self) -> bool;
    /// QEMU's `eject_request_cb`: asks the guest to let the medium go; `force` unlocks it.
    fn eject_request(&self, force: bool);
    /// QEMU's `change_media_cb`: the tray closes on the medium (`load`) or opens. The
    /// caller sends `DEVICE_TRAY_MOVED` ([`change_media`]).
    fn change_media_cb(&self, load: bool);
    /// The medium, if one is in.
    fn medium(&self) -> Option<Arc<BlockBackend>>;
    /// Takes the medium out (QEMU's `blk_remove_bs`), with the device no longer using it.
    fn remove_medium(&self) -> Option<Arc<BlockBackend>>;
    /// Puts `medium` in (QEMU's `blk_insert_bs`); the device uses it from now on.
    fn insert_medium(&self, medium: Arc<BlockBackend>) -> Result<(), BlockError>;
}

impl Interface for dyn RemovableMedia {
    const TYPE_NAME: &'static str = TYPE_REMOVABLE_MEDIA;
}

qom::interface_type!(dyn RemovableMedia);

/// QEMU's `blk_dev_change_media_cb`: loads or unloads the medium and tells the monitor's
/// clients if the tray moved.
pub fn change_media(dev: &dyn RemovableMedia, load: bool) {
    let was_open = dev.is_tray_open();
    dev.change_media_cb(load);
    let is_open = dev.is_tray_open();
    if was_open != is_open {
        tray_moved(&dev.blk_name(), &dev.qdev_id(), is_open);
    }
}

/// Sends `DEVICE_TRAY_MOVED` for the drive whose backend is `blk_name` and device `qdev`.
pub fn tray_moved(blk_name: &str, qdev: &str, open: bool) {
    qapi_event::emit(
        "DEVICE_TRAY_MOVED",
        Some(json!({"device": blk_name, "id": qdev, "tray-open": open})),
    );
}

/// The block layer's side of taking `old` out of the drive named `blk_name` of device
/// `qdev` (QEMU's `blk_remove_bs`): the device lets go of it; a medium the drive owned
/// closes, a `-blockdev` node goes back to the monitor, nameless; the drive's name stays
/// the drive's, as an empty drive.
pub fn release_medium(old: &Arc<BlockBackend>, blk_name: &str, qdev: &str) {
    old.detach_dev();
    if old.is_blk_owned() {
        block::remove_backend(old);
    }
    old.set_id("");
    if !blk_name.is_empty() {
        if let Err(e) = block::add_empty_drive(blk_name, Some(qdev)) {
            log::warn!("{qdev}: drive '{blk_name}' lost its name: {e}");
        }
    }
}

/// The block layer's side of putting `new` into the drive named `blk_name` of device
/// `qdev` (QEMU's `blk_insert_bs`): the device uses it, and it takes the drive's name.
pub fn claim_medium(new: &Arc<BlockBackend>, blk_name: &str, qdev: &str) -> Result<(), BlockError> {
    new.attach_dev(qdev)?;
    if !blk_name.is_empty() {
        block::remove_empty_drive(blk_name);
        new.set_id(blk_name);
    }
    Ok(())
}
