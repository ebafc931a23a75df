//! `usb-storage` (QEMU's `hw/usb/dev-storage.c`, `dev-storage-classic.c`): a USB mass
//! storage device speaking the Bulk-Only Transport, with a SCSI disk behind it, as libvirt
//! writes `<disk ... ><target dev='sda' bus='usb'/></disk>` (`-device usb-storage,
//! drive=...`) and people attach installer images as USB sticks.
//!
//! As QEMU's, the device has a SCSI bus of its own (`<id>.0`) with one `scsi-hd` made from
//! its drive, so the disk is the SCSI stack's (`hw/scsi/scsi_disk.rs`). A command block
//! wrapper on the bulk-out endpoint runs its command at once (on the controller's frame
//! walk); data follows on the bulk endpoints, then the status wrapper on bulk-in. Sense
//! data of a failed command is kept for the host's REQUEST SENSE, as a unit without
//! autosense reports it.

use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::bus::{qbus_new, BusState};
use crate::core::qdev::{qdev_new, qdev_realize, DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::scsi::scsi_bus::{
    scsi_bus_name, Dispatch, ScsiAddress, ScsiBus, ScsiBusInfo, ScsiData, ScsiLuns, ScsiOutcome, Sense, TYPE_SCSI_BUS,
};
use crate::usb::desc::{config_attr, ep_type, Descriptors, DeviceIdentity, Endpoint, Interface};
use crate::usb::usb_bus::{pid, ControlRequest, Stall, TokenResult, UsbDevice, UsbFunction};

/// The command block wrapper's signature, "USBC".
const CBW_SIGNATURE: u32 = 0x4342_5355;
/// The command status wrapper's, "USBS".
const CSW_SIGNATURE: u32 = 0x5342_5355;
const CBW_LEN: usize = 31;
/// CSW status: the command failed (sense data waits for REQUEST SENSE).
const CSW_FAILED: u8 = 1;
/// CSW status: the host and the device disagree on the transfer.
const CSW_PHASE_ERROR: u8 = 2;
/// The largest transfer one command may move (Linux asks at most 120 KiB by default,
/// Windows 64 KiB): a guest's larger request is a phase error, not an allocation of its
/// size.
const MAX_TRANSFER: usize = 4 << 20;
/// Endpoint numbers: bulk-in 1, bulk-out 2.
const EP_IN: u8 = 1;
const EP_OUT: u8 = 2;
const REQUEST_SENSE: u8 = 0x03;
/// The one unit's address on the device's bus.
const UNIT: ScsiAddress = ScsiAddress { channel: 0, target: 0, lun: 0 };
/// What the device's bus addresses: one LUN (QEMU's `usb_msd_scsi_info_storage`).
const BUS_INFO: ScsiBusInfo = ScsiBusInfo {
    max_channel: 0,
    max_target: 0,
    max_lun: 0,
};

/// Bulk-Only class requests.
const BULK_ONLY_RESET: (u8, u8) = (0x21, 0xff);
const GET_MAX_LUN: (u8, u8) = (0xa1, 0xfe);

/// The transport's phase (QEMU's `USB_MSDM_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    /// Waiting for a command block wrapper.
    #[default]
    Command,
    /// Taking the command's data from the host, `expected` bytes.
    DataOut { expected: usize },
    /// Giving the command's reply; `sent` bytes of it so far.
    DataIn { sent: usize, short_sent: bool },
    /// The status wrapper is due.
    Status,
}

/// The transport's state: the phase, the command in hand, its data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Transport {
    phase: Phase,
    tag: u32,
    /// The CBW's data transfer length.
    data_len: u32,
    cdb: Vec<u8>,
    /// The data: the host's (data-out) or the reply (data-in).
    #[serde(skip)]
    data: Vec<u8>,
    /// The residue and status the CSW reports.
    residue: u32,
    status: u8,
    /// Sense of the last failed command, for REQUEST SENSE (key, ASC, ASCQ).
    sense: Option<(u8, u8, u8)>,
}

/// The device's model: the transport and the unit table of its bus.
struct MassStorage {
    descriptors: Descriptors,
    transport: Mutex<Transport>,
    luns: Arc<ScsiLuns>,
}

impl MassStorage {
    /// Runs the transport's command with `data_out` (or a data-in buffer of the CBW's
    /// length) and sets the CSW's status and residue.
    fn execute(&self, t: &mut Transport) {
        let data_len = t.data_len as usize;
        let is_in = matches!(t.phase, Phase::DataIn { .. });
        if t.cdb.first() == Some(&REQUEST_SENSE) {
            if let Some((key, asc, ascq)) = t.sense.take() {
                let allocation = usize::from(t.cdb.get(4).copied().unwrap_or(0));
                let mut reply = Sense::new(key, asc, ascq).fixed().to_vec();
                reply.truncate(allocation.min(data_len));
                t.residue = (data_len - reply.len()) as u32;
                t.status = 0;
                t.data = reply;
                return;
            }
        }
        let out = if is_in { Vec::new() } else { std::mem::take(&mut t.data) };
        let mut reply = Vec::new();
        let mut reader: &[u8] = &out;
        let mut data = ScsiData {
            data_out: &mut reader,
            data_out_len: out.len(),
            data_in: &mut reply,
            data_in_len: if is_in { data_len } else { 0 },
            guest_out: None,
            guest_in: None,
        };
        let outcome = match self.luns.execute(UNIT, &t.cdb, &mut data) {
            Dispatch::Done(outcome) => outcome,
            Dispatch::NoTarget => ScsiOutcome::Check(Sense::LUN_NOT_SUPPORTED),
        };
        reply.truncate(data_len);
        (t.status, t.residue) = match outcome {
            ScsiOutcome::Good { transferred } => {
                t.sense = None;
                (0, (data_len - transferred.min(data_len)) as u32)
            }
            ScsiOutcome::Check(sense) => {
                t.sense = Some((sense.key, sense.asc, sense.ascq));
                reply.clear();
                (CSW_FAILED, data_len as u32)
            }
            ScsiOutcome::Overrun => {
                reply.clear();
                (CSW_PHASE_ERROR, data_len as u32)
            }
        };
        t.data = reply;
    }

    /// A command block wrapper from the host.
    fn command(&self, t: &mut Transport, cbw: &[u8]) -> TokenResult {
        let le32 = |at: usize| u32::from_le_bytes([cbw[at], cbw[at + 1], cbw[at + 2], cbw[at + 3]]);
        if cbw.len() != CBW_LEN || le32(0) != CBW_SIGNATURE {
            // Not a valid CBW: the device stalls until the host's reset recovery.
            return TokenResult::Stall;
        }
        let (lun, cdb_len) = (cbw[13] & 0xf, usize::from(cbw[14] & 0x1f));
        t.tag = le32(4);
        t.data_len = le32(8);
        t.cdb = cbw[15..15 + cdb_len.clamp(1, 16)].to_vec();
        t.data.clear();
        let data_len = t.data_len as usize;
        if lun != 0 || cdb_len == 0 || cdb_len > 16 || data_len > MAX_TRANSFER {
            (t.status, t.residue) = (if lun != 0 { CSW_FAILED } else { CSW_PHASE_ERROR }, t.data_len);
            if lun != 0 {
                t.sense = Some((Sense::LUN_NOT_SUPPORTED.key, Sense::LUN_NOT_SUPPORTED.asc, Sense::LUN_NOT_SUPPORTED.ascq));
            }
            // The host still moves the data it announced: none is taken or given.
            t.phase = if data_len == 0 || data_len > MAX_TRANSFER {
                Phase::Status
            } else if cbw[12] & 0x80 != 0 {
                Phase::DataIn { sent: 0, short_sent: false }
            } else {
                Phase::DataOut { expected: data_len }
            };
            if let Phase::DataOut { .. } = t.phase {
                t.cdb.clear();
            }
            return TokenResult::Done(CBW_LEN);
        }
        if data_len == 0 {
            t.phase = Phase::DataOut { expected: 0 };
            self.execute(t);
            t.phase = Phase::Status;
        } else if cbw[12] & 0x80 != 0 {
            t.phase = Phase::DataIn { sent: 0, short_sent: false };
            self.execute(t);
        } else {
            t.phase = Phase::DataOut { expected: data_len };
        }
        TokenResult::Done(CBW_LEN)
    }

    fn status_wrapper(t: &mut Transport) -> [u8; 13] {
        let mut csw = [0u8; 13];
        csw[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        csw[4..8].copy_from_slice(&t.tag.to_le_bytes());
        csw[8..12].copy_from_slice(&t.residue.to_le_bytes());
        csw[12] = t.status;
        csw
    }
}

impl UsbFunction for MassStorage {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control(&self, req: &ControlRequest, _data: &[u8]) -> Result<Vec<u8>, Stall> {
        match req.kind() {
            BULK_ONLY_RESET => {
                // Reset recovery: the next thing is a command; the sense stays.
                let mut t = self.transport.lock();
                let sense = t.sense.take();
                *t = Transport { sense, ..Transport::default() };
                Ok(Vec::new())
            }
            GET_MAX_LUN => Ok(vec![0]),
            _ => Err(Stall),
        }
    }

    fn data(&self, pid_code: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        let mut t = self.transport.lock();
        match (pid_code, ep, t.phase) {
            (pid::OUT, EP_OUT, Phase::Command) => self.command(&mut t, buf),
            (pid::OUT, EP_OUT, Phase::DataOut { expected }) => {
                let n = buf.len().min(expected - t.data.len());
                // A command refused at its CBW has no CDB: its data is taken and dropped.
                if !t.cdb.is_empty() {
                    t.data.extend_from_slice(&buf[..n]);
                } else {
                    let len = t.data.len() + n;
                    t.data.resize(len, 0);
                }
                if t.data.len() == expected {
                    if t.cdb.is_empty() {
                        t.data.clear();
                    } else {
                        self.execute(&mut t);
                    }
                    t.phase = Phase::Status;
                }
                TokenResult::Done(n)
            }
            (pid::IN, EP_IN, Phase::DataIn { sent, short_sent }) => {
                let data_len = t.data_len as usize;
                let n = t.data.len().saturating_sub(sent).min(buf.len());
                buf[..n].copy_from_slice(&t.data[sent..sent + n]);
                let sent = sent + n;
                // The data stage ends with the announced length, or with a short packet
                // once the reply is out (the host then reads the status).
                let short = n < buf.len();
                t.phase = if sent == data_len || (sent == t.data.len() && (short || short_sent)) {
                    Phase::Status
                } else {
                    Phase::DataIn { sent, short_sent: short }
                };
                TokenResult::Done(n)
            }
            (pid::IN, EP_IN, Phase::Status) => {
                let csw = MassStorage::status_wrapper(&mut t);
                let n = csw.len().min(buf.len());
                buf[..n].copy_from_slice(&csw[..n]);
                t.phase = Phase::Command;
                t.data = Vec::new();
                TokenResult::Done(n)
            }
            _ => TokenResult::Stall,
        }
    }

    fn reset(&self) {
        *self.transport.lock() = Transport::default();
    }
}

/// QEMU's `usb-storage` (`MSDState`).
#[derive(qom::Object)]
#[qom(name = "usb-storage")]
pub struct UsbStorage {
    #[parent]
    parent: UsbDevice,
    #[property(desc = "Node name or ID of a block device to use as a backend")]
    drive: Prop<Option<String>>,
    #[property(default = false, desc = "Report a removable medium")]
    removable: Prop<bool>,
    #[property(default = -1, desc = "Boot order of the disk (firmware)")]
    bootindex: Prop<i32>,
    model: OnceLock<Arc<MassStorage>>,
}

type_init!(UsbStorage);

impl DeviceImpl for UsbStorage {
    const DESCRIPTION: Option<&'static str> = Some("QEMU USB MSD");
    const CATEGORY: DeviceCategory = DeviceCategory::Storage;

    /// QEMU's `usb_msd_storage_realize`: the bus, the disk on it, then the port.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let drive = self.drive.get().ok_or_else(|| RealizeError::device(UsbStorageError::NoDrive))?;
        let services = ctx.machine()?;
        let luns = Arc::new(ScsiLuns::default());
        let bus = qbus_new(TYPE_SCSI_BUS, ctx.object(), &scsi_bus_name(self.parent.id()), services)?;
        if let Some(b) = bus.downcast::<ScsiBus>() {
            b.set_adapter(BUS_INFO, &luns);
        }
        if let Some(b) = bus.downcast::<BusState>() {
            // The disk is the device's own: it comes and goes with it.
            b.set_hotplug_handler(None);
        }
        let disk = qdev_new("scsi-hd")?;
        disk.property_parse("drive", &drive)?;
        disk.property_parse("removable", if self.removable.get() { "on" } else { "off" })?;
        if let Some(serial) = self.parent.serial() {
            disk.property_parse("serial", &serial)?;
        }
        // The boot order is the disk's: SeaBIOS finds it under the device's path.
        disk.property_parse("bootindex", &self.bootindex.get().to_string())?;
        // QEMU's `scsi_bus_legacy_add_drive` names it so; libvirt finds the disk's
        // statistics by that path (`<id>/<id>.0/legacy[0]`).
        bus.add_child("legacy[0]", &disk)?;
        qdev_realize(&disk, Some(&bus))?;
        let serial = self.parent.serial().unwrap_or_else(|| "1".into());
        let model = Arc::new(MassStorage {
            descriptors: Descriptors::new(
                DeviceIdentity {
                    vendor: 0x46f4,
                    product: 0x0001,
                    bcd_device: 0,
                    bcd_usb: 0x0200,
                    strings: ["QEMU".into(), "QEMU USB HARDDRIVE".into(), serial],
                },
                config_attr::SELF_POWERED,
                100,
                &[Interface {
                    // Mass storage, SCSI transparent command set, Bulk-Only.
                    class: (8, 6, 0x50),
                    class_descriptors: Vec::new(),
                    endpoints: vec![
                        Endpoint {
                            address: 0x80 | EP_IN,
                            kind: ep_type::BULK,
                            max_packet: 64,
                            interval: 0,
                        },
                        Endpoint {
                            address: EP_OUT,
                            kind: ep_type::BULK,
                            max_packet: 64,
                            interval: 0,
                        },
                    ],
                }],
            ),
            transport: Mutex::new(Transport::default()),
            luns,
        });
        self.parent.attach_function(ctx, model.clone(), "QEMU USB MSD")?;
        let _ = self.model.set(model);
        Ok(())
    }

    /// The core's and the transport's state; a data-in or data-out buffer as bytes. The
    /// disk saves its own.
    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_core(&mut s);
        if let Some(m) = self.model.get() {
            let t = m.transport.lock();
            s.put("transport", &*t);
            s.put_bytes("data", &t.data);
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let mut t: Transport = state.get("transport")?;
        t.data = state.get_bytes("data")?;
        let bad = |reason: &str| VmStateError::BadField {
            field: "transport".into(),
            reason: reason.into(),
        };
        if t.data.len() > MAX_TRANSFER || t.cdb.len() > 16 {
            return Err(bad("larger than the device's"));
        }
        match t.phase {
            Phase::DataOut { expected } if expected > MAX_TRANSFER || t.data.len() > expected => {
                return Err(bad("data beyond the transfer"));
            }
            Phase::DataIn { sent, .. } if sent > t.data.len() => return Err(bad("data position beyond the data")),
            _ => {}
        }
        // Checked before anything is loaded: a bad section changes nothing.
        self.parent.load_core(state)?;
        if let Some(m) = self.model.get() {
            *m.transport.lock() = t;
        }
        Ok(())
    }
}

/// Why `usb-storage` could not be realized, in QEMU's words.
#[derive(Debug, thiserror::Error)]
enum UsbStorageError {
    #[error("drive property not set")]
    NoDrive,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport over a LUN table with no unit: every command fails with sense.
    fn msd() -> MassStorage {
        MassStorage {
            descriptors: Descriptors::new(
                DeviceIdentity {
                    vendor: 0,
                    product: 0,
                    bcd_device: 0,
                    bcd_usb: 0x0200,
                    strings: ["".into(), "".into(), "".into()],
                },
                0,
                100,
                &[],
            ),
            transport: Mutex::new(Transport::default()),
            luns: Arc::new(ScsiLuns::default()),
        }
    }

    fn cbw(tag: u32, data_len: u32, dir_in: bool, lun: u8, cdb: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; CBW_LEN];
        b[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&tag.to_le_bytes());
        b[8..12].copy_from_slice(&data_len.to_le_bytes());
        b[12] = if dir_in { 0x80 } else { 0 };
        b[13] = lun;
        b[14] = cdb.len() as u8;
        b[15..15 + cdb.len()].copy_from_slice(cdb);
        b
    }

    fn csw(m: &MassStorage) -> (u32, u32, u8) {
        let mut buf = [0u8; 64];
        assert_eq!(m.data(pid::IN, EP_IN, &mut buf), TokenResult::Done(13));
        let le = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        assert_eq!(le(0), CSW_SIGNATURE);
        (le(4), le(8), buf[12])
    }

    #[test]
    fn a_failed_command_keeps_its_sense_for_request_sense() {
        let m = msd();
        let mut c = cbw(7, 0, false, 0, &[0x00, 0, 0, 0, 0, 0]);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Done(CBW_LEN));
        assert_eq!(csw(&m), (7, 0, CSW_FAILED));
        let mut c = cbw(8, 18, true, 0, &[REQUEST_SENSE, 0, 0, 0, 18, 0]);
        m.data(pid::OUT, EP_OUT, &mut c);
        let mut buf = [0u8; 64];
        assert_eq!(m.data(pid::IN, EP_IN, &mut buf), TokenResult::Done(18));
        assert_eq!((buf[2] & 0xf, buf[12]), (Sense::LUN_NOT_SUPPORTED.key, Sense::LUN_NOT_SUPPORTED.asc));
        assert_eq!(csw(&m), (8, 0, 0));
    }

    #[test]
    fn bad_wrappers_stall_and_oversized_or_odd_commands_are_phase_errors() {
        let m = msd();
        let mut junk = [0u8; 31];
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut junk), TokenResult::Stall);
        assert_eq!(m.data(pid::IN, EP_IN, &mut [0u8; 13]), TokenResult::Stall, "no status before a command");
        let mut c = cbw(9, u32::MAX, true, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Done(CBW_LEN));
        assert_eq!(csw(&m), (9, u32::MAX, CSW_PHASE_ERROR));
        // Data-out of a refused LUN is taken and dropped, then the status.
        let mut c = cbw(10, 100, false, 3, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        m.data(pid::OUT, EP_OUT, &mut c);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut [1u8; 64]), TokenResult::Done(64));
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut [1u8; 64]), TokenResult::Done(36));
        assert_eq!(csw(&m), (10, 100, CSW_FAILED));
        assert!(m.transport.lock().data.is_empty());
        assert_eq!(m.control(&ControlRequest::parse(&[0xa1, 0xfe, 0, 0, 0, 0, 1, 0]), &[]), Ok(vec![0]));
    }
}
