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

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::bus::{qbus_new, BusState};
use crate::core::qdev::{qdev_new, qdev_realize, DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::runstate::ChangeHandlerId;
use crate::core::thread_pool::{InFlight, Job, ThreadPool};
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
    /// Taking the command's data from the host: `received` of `expected` bytes.
    DataOut { expected: usize, received: usize },
    /// The command runs on the device's worker: the host's tokens are NAKed meanwhile
    /// (QEMU's asynchronous SCSI requests).
    Running { data_in: bool },
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
    /// The command; empty for one refused at its CBW (its data is counted, not kept).
    cdb: Vec<u8>,
    /// The data: the host's (data-out) or the reply (data-in).
    #[serde(skip)]
    data: Vec<u8>,
    /// The residue and status the CSW reports.
    residue: u32,
    status: u8,
    /// Sense of the last failed command, for REQUEST SENSE (key, ASC, ASCQ).
    sense: Option<(u8, u8, u8)>,
    /// Counts resets: a command's result that comes back after one is dropped.
    #[serde(skip)]
    generation: u64,
}

/// What a command came back with.
struct Completion {
    status: u8,
    residue: u32,
    reply: Vec<u8>,
    sense: Option<Sense>,
}

/// Runs `cdb` on the unit with `out` (or a data-in buffer of `data_len` bytes).
fn run_command(luns: &ScsiLuns, cdb: &[u8], out: &[u8], data_in: bool, data_len: usize) -> Completion {
    let mut reply = Vec::new();
    let mut reader: &[u8] = out;
    let mut data = ScsiData {
        data_out: &mut reader,
        data_out_len: out.len(),
        data_in: &mut reply,
        data_in_len: if data_in { data_len } else { 0 },
        guest_out: None,
        guest_in: None,
    };
    let outcome = match luns.execute(UNIT, cdb, &mut data) {
        Dispatch::Done(outcome) => outcome,
        Dispatch::NoTarget => ScsiOutcome::Check(Sense::LUN_NOT_SUPPORTED),
    };
    reply.truncate(data_len);
    match outcome {
        ScsiOutcome::Good { transferred } => Completion {
            status: 0,
            residue: (data_len - transferred.min(data_len)) as u32,
            reply,
            sense: None,
        },
        ScsiOutcome::Check(sense) => Completion {
            status: CSW_FAILED,
            residue: data_len as u32,
            reply: Vec::new(),
            sense: Some(sense),
        },
        ScsiOutcome::Overrun => Completion {
            status: CSW_PHASE_ERROR,
            residue: data_len as u32,
            reply: Vec::new(),
            sense: None,
        },
    }
}

/// The device's model: the transport, the unit table of its bus, the worker its commands
/// run on.
struct MassStorage {
    descriptors: Descriptors,
    transport: Mutex<Transport>,
    luns: Arc<ScsiLuns>,
    pool: ThreadPool,
    in_flight: Arc<InFlight>,
    /// A command started under the transport's lock, submitted after it.
    outbox: Mutex<Option<Job>>,
    this: Weak<MassStorage>,
}

impl MassStorage {
    fn new(descriptors: Descriptors, luns: Arc<ScsiLuns>) -> Arc<MassStorage> {
        Arc::new_cyclic(|this| MassStorage {
            descriptors,
            transport: Mutex::new(Transport::default()),
            luns,
            pool: ThreadPool::new("usb-storage", 1),
            in_flight: Arc::new(InFlight::default()),
            outbox: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// Starts the transport's command on the worker; the phase moves on when it is done.
    /// REQUEST SENSE with sense kept from the last command is answered here.
    fn start(&self, t: &mut Transport, data_in: bool) {
        let data_len = t.data_len as usize;
        if data_in && t.cdb.first() == Some(&REQUEST_SENSE) {
            let allocation = usize::from(t.cdb.get(4).copied().unwrap_or(0));
            if let (Some((key, asc, ascq)), true) = (t.sense, allocation <= data_len) {
                let mut reply = Sense::new(key, asc, ascq).fixed().to_vec();
                reply.truncate(allocation);
                t.sense = None;
                t.phase = Phase::Running { data_in };
                self.complete(t, Completion {
                    status: 0,
                    residue: (data_len - reply.len()) as u32,
                    reply,
                    sense: None,
                });
                return;
            }
        }
        let Some(me) = self.this.upgrade() else {
            return;
        };
        let (cdb, out, generation) = (t.cdb.clone(), std::mem::take(&mut t.data), t.generation);
        t.phase = Phase::Running { data_in };
        self.in_flight.begin();
        let current = move |t: &Transport| t.generation == generation && t.phase == (Phase::Running { data_in });
        // Submitted once the caller let the transport go (a pool that cannot start a
        // thread runs the job right away, and the job takes the transport's lock).
        *self.outbox.lock() = Some(Box::new(move || {
            // A command a reset forgot does not run.
            if current(&me.transport.lock()) {
                let done = run_command(&me.luns, &cdb, &out, data_in, data_len);
                let mut t = me.transport.lock();
                if current(&t) {
                    me.complete(&mut t, done);
                }
            }
            me.in_flight.end();
        }));
    }

    /// Hands the command [`MassStorage::start`] made to the worker.
    fn submit_started(&self) {
        let job = self.outbox.lock().take();
        if let Some(job) = job {
            self.pool.submit(job);
        }
    }

    fn complete(&self, t: &mut Transport, done: Completion) {
        if let Some(sense) = done.sense {
            t.sense = Some((sense.key, sense.asc, sense.ascq));
        } else if done.status == 0 {
            t.sense = None;
        }
        (t.status, t.residue, t.data) = (done.status, done.residue, done.reply);
        t.phase = match t.phase {
            Phase::Running { data_in: true } => Phase::DataIn { sent: 0, short_sent: false },
            _ => Phase::Status,
        };
    }

    /// A command block wrapper from the host.
    fn command(&self, t: &mut Transport, cbw: &[u8]) -> TokenResult {
        let le32 = |at: usize| u32::from_le_bytes([cbw[at], cbw[at + 1], cbw[at + 2], cbw[at + 3]]);
        if cbw.len() != CBW_LEN || le32(0) != CBW_SIGNATURE {
            // Not a valid CBW: the device stalls until the host's reset recovery.
            return TokenResult::Stall;
        }
        let (lun, cdb_len, data_in) = (cbw[13] & 0xf, usize::from(cbw[14] & 0x1f), cbw[12] & 0x80 != 0);
        t.tag = le32(4);
        t.data_len = le32(8);
        t.data.clear();
        let data_len = t.data_len as usize;
        if lun != 0 || cdb_len == 0 || cdb_len > 16 || data_len > MAX_TRANSFER {
            // Refused: the data stage the host announced still happens, empty (data-in:
            // a zero-length packet) or dropped (data-out), then the status.
            t.cdb.clear();
            (t.status, t.residue) = (if lun != 0 { CSW_FAILED } else { CSW_PHASE_ERROR }, t.data_len);
            if lun != 0 {
                let s = Sense::LUN_NOT_SUPPORTED;
                t.sense = Some((s.key, s.asc, s.ascq));
            }
            t.phase = match (data_len, data_in) {
                (0, _) => Phase::Status,
                (_, true) => Phase::DataIn { sent: 0, short_sent: false },
                (_, false) => Phase::DataOut { expected: data_len, received: 0 },
            };
            return TokenResult::Done(CBW_LEN);
        }
        t.cdb = cbw[15..15 + cdb_len].to_vec();
        if data_len > 0 && !data_in {
            t.phase = Phase::DataOut { expected: data_len, received: 0 };
        } else {
            self.start(t, data_in && data_len > 0);
        }
        TokenResult::Done(CBW_LEN)
    }

    fn status_wrapper(t: &Transport) -> [u8; 13] {
        let mut csw = [0u8; 13];
        csw[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        csw[4..8].copy_from_slice(&t.tag.to_le_bytes());
        csw[8..12].copy_from_slice(&t.residue.to_le_bytes());
        csw[12] = t.status;
        csw
    }

    /// Back to waiting for a command; a command still running is forgotten (its result
    /// dropped).
    fn reset_transport(&self, keep_sense: bool) {
        let mut t = self.transport.lock();
        let sense = if keep_sense { t.sense } else { None };
        let generation = t.generation.wrapping_add(1);
        *t = Transport {
            sense,
            generation,
            ..Transport::default()
        };
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
                self.reset_transport(true);
                Ok(Vec::new())
            }
            GET_MAX_LUN => Ok(vec![0]),
            _ => Err(Stall),
        }
    }

    fn data(&self, pid_code: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        let result = self.transport_token(pid_code, ep, buf);
        self.submit_started();
        result
    }

    fn reset(&self) {
        self.reset_transport(false);
    }
}

impl MassStorage {
    fn transport_token(&self, pid_code: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        let mut t = self.transport.lock();
        match (pid_code, ep, t.phase) {
            // After a reset, a new command waits until the one it forgot has ended: at
            // most one job is ever queued.
            (pid::OUT, EP_OUT, Phase::Command) if !self.in_flight.is_idle() => TokenResult::Nak,
            (pid::OUT, EP_OUT, Phase::Command) => self.command(&mut t, buf),
            (pid::OUT, EP_OUT, Phase::DataOut { expected, received }) => {
                let n = buf.len().min(expected - received);
                // A command refused at its CBW has no CDB: its data is counted and dropped.
                if !t.cdb.is_empty() {
                    t.data.extend_from_slice(&buf[..n]);
                }
                let received = received + n;
                t.phase = Phase::DataOut { expected, received };
                if received == expected {
                    if t.cdb.is_empty() {
                        t.phase = Phase::Status;
                    } else {
                        self.start(&mut t, false);
                    }
                }
                TokenResult::Done(n)
            }
            (pid::IN | pid::OUT, _, Phase::Running { .. }) => TokenResult::Nak,
            (pid::IN, EP_IN, Phase::DataIn { sent, short_sent }) => {
                let data_len = t.data_len as usize;
                let n = t.data.len().saturating_sub(sent).min(buf.len());
                buf[..n].copy_from_slice(&t.data[sent..sent + n]);
                let sent = sent + n;
                // The data stage ends with the announced length, or with a short packet
                // once the reply is out (the host then reads the status).
                let short = n < buf.len();
                t.phase = if sent >= data_len || (sent >= t.data.len() && (short || short_sent)) {
                    Phase::Status
                } else {
                    Phase::DataIn { sent, short_sent: short }
                };
                TokenResult::Done(n)
            }
            (pid::IN, EP_IN, Phase::Status) => {
                let csw = MassStorage::status_wrapper(&t);
                let n = csw.len().min(buf.len());
                buf[..n].copy_from_slice(&csw[..n]);
                t.phase = Phase::Command;
                t.data = Vec::new();
                TokenResult::Done(n)
            }
            _ => TokenResult::Stall,
        }
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
    change_handler: OnceLock<ChangeHandlerId>,
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
        let model = MassStorage::new(
            Descriptors::new(
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
            luns.clone(),
        );
        // An unplug's unit removal, and a stop (a migration's last pass, the images'
        // hand-over), wait for the command on the worker.
        let in_flight = model.in_flight.clone();
        luns.set_drain(Box::new(move || in_flight.drain()));
        // Neither waits out the drive's I/O limits: they are lifted meanwhile (QEMU's
        // drain disables them), so a stop under a tiny limit comes back at once.
        let (in_flight, stopping) = (model.in_flight.clone(), luns.clone());
        let handler = services.vm().add_change_handler(
            CHANGE_HANDLER_PRIORITY,
            Arc::new(move |running, _| {
                if !running {
                    let _lifted = stopping.lift_limits();
                    in_flight.drain();
                }
            }),
        );
        let _ = self.change_handler.set(handler);
        self.parent.attach_function(ctx, model.clone(), "QEMU USB MSD")?;
        let _ = self.model.set(model);
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some(id), Ok(services)) = (self.change_handler.get(), ctx.machine()) {
            services.vm().remove_change_handler(*id);
        }
        if let Some(m) = self.model.get() {
            let _lifted = m.luns.lift_limits();
            m.in_flight.drain();
        }
        DeviceImpl::unrealize(&self.parent, ctx);
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
        check_loaded(&t).map_err(bad)?;
        // Checked before anything is loaded: a bad section changes nothing.
        self.parent.load_core(state)?;
        if let Some(m) = self.model.get() {
            let mut current = m.transport.lock();
            t.generation = current.generation.wrapping_add(1);
            *current = t;
        }
        Ok(())
    }
}

/// Whether a loaded transport state is one the device can go on from.
fn check_loaded(t: &Transport) -> Result<(), &'static str> {
    let data_len = t.data_len as usize;
    if t.data.len() > MAX_TRANSFER.min(data_len) || t.cdb.len() > 16 {
        return Err("data larger than the transfer or the device's");
    }
    let consistent = match t.phase {
        Phase::Command | Phase::Status => t.data.is_empty(),
        Phase::DataOut { expected, received } => {
            expected == data_len && received <= expected && (t.cdb.is_empty() || t.data.len() == received)
        }
        Phase::DataIn { sent, .. } => sent <= data_len && sent <= t.data.len(),
        // Commands end before a stop: none runs while the state is saved.
        Phase::Running { .. } => false,
    };
    if consistent {
        Ok(())
    } else {
        Err("phase inconsistent with the transfer")
    }
}

/// Where the device's run-state handler runs: above the block layer's flush (priority 0),
/// as the other disk controllers'.
const CHANGE_HANDLER_PRIORITY: i32 = 10;

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
    fn msd() -> Arc<MassStorage> {
        let id = DeviceIdentity {
            vendor: 0,
            product: 0,
            bcd_device: 0,
            bcd_usb: 0x0200,
            strings: ["".into(), "".into(), "".into()],
        };
        MassStorage::new(Descriptors::new(id, 0, 100, &[]), Arc::new(ScsiLuns::default()))
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
        m.in_flight.drain();
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
    fn loaded_states_must_fit_their_transfer() {
        let mut t = Transport {
            phase: Phase::DataIn { sent: 50, short_sent: false },
            data_len: 100,
            data: vec![0; 10],
            ..Transport::default()
        };
        assert!(check_loaded(&t).is_err(), "a position beyond the data");
        t.phase = Phase::DataIn { sent: 10, short_sent: false };
        assert!(check_loaded(&t).is_ok());
        t.phase = Phase::Running { data_in: true };
        assert!(check_loaded(&t).is_err(), "a command in flight");
        t.phase = Phase::DataOut { expected: 100, received: 10 };
        t.cdb = vec![0x2a; 10];
        assert!(check_loaded(&t).is_ok());
        t.phase = Phase::DataOut { expected: 200, received: 10 };
        assert!(check_loaded(&t).is_err(), "more than the CBW said");
        t.data = vec![0; 200];
        assert!(check_loaded(&t).is_err(), "data beyond the transfer");
    }

    #[test]
    fn tokens_wait_while_a_command_runs_and_a_new_command_waits_for_a_forgotten_one() {
        let m = msd();
        m.transport.lock().phase = Phase::Running { data_in: true };
        assert_eq!(m.data(pid::IN, EP_IN, &mut [0u8; 64]), TokenResult::Nak);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut [0u8; 31]), TokenResult::Nak);
        // A reset forgets it; while its job has not ended, a new command is NAKed.
        m.in_flight.begin();
        m.reset_transport(true);
        let mut c = cbw(20, 0, false, 0, &[0x00, 0, 0, 0, 0, 0]);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Nak);
        m.in_flight.end();
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Done(CBW_LEN));
        assert_eq!(csw(&m), (20, 0, CSW_FAILED));
    }

    #[test]
    fn bad_wrappers_stall_and_oversized_or_odd_commands_are_phase_errors() {
        let m = msd();
        let mut junk = [0u8; 31];
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut junk), TokenResult::Stall);
        assert_eq!(m.data(pid::IN, EP_IN, &mut [0u8; 13]), TokenResult::Stall, "no status before a command");
        // More than the device takes: the data stage is one zero-length packet, then a
        // phase error.
        let mut c = cbw(9, u32::MAX, true, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]);
        assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Done(CBW_LEN));
        assert_eq!(m.data(pid::IN, EP_IN, &mut [0u8; 64]), TokenResult::Done(0));
        assert_eq!(csw(&m), (9, u32::MAX, CSW_PHASE_ERROR));
        // No command bytes, or more than 16: phase errors too, nothing runs.
        for len in [0usize, 17] {
            let mut c = cbw(11, 0, false, 0, &[0x00; 16]);
            c[14] = len as u8;
            assert_eq!(m.data(pid::OUT, EP_OUT, &mut c), TokenResult::Done(CBW_LEN));
            assert_eq!(csw(&m), (11, 0, CSW_PHASE_ERROR), "cdb length {len}");
        }
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
