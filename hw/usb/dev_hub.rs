//! `usb-hub` (QEMU's `hw/usb/dev-hub.c`): a USB 1.1 hub with up to 8 downstream ports, so a
//! two-port UHCI takes more devices, as libvirt adds one (`<hub type='usb'/>`:
//! `-device usb-hub,bus=usb.0,port=1`, its devices at ports "1.1", "1.2", ...).
//!
//! The host sees a hub device: port status and change bits through the hub class
//! requests, a status-change bitmap on its interrupt endpoint. Devices behind it are on
//! the same bus and answer at their own addresses once their port is enabled (a token
//! for them passes the hub unchanged, as on a full-speed bus).

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::usb::desc::{config_attr, ep_type, Descriptors, DeviceIdentity, Endpoint, Interface};
use crate::usb::usb_bus::{
    pid, AttachedDevice, ControlRequest, Stall, TokenResult, UsbBus, UsbDevice, UsbFunction, UsbHostController, UsbPorts,
};

/// QEMU's `MAX_PORTS`.
const MAX_PORTS: u32 = 8;
/// Hubs in a chain at most (QEMU's `hubcount`).
const MAX_HUB_CHAIN: usize = 5;
/// The hub class's descriptor type.
const HUB_DESCRIPTOR: u8 = 0x29;

/// Port status bits (`wPortStatus`; the change bits in `wPortChange` are the low five).
mod status {
    pub const CONNECTION: u16 = 0x0001;
    pub const ENABLE: u16 = 0x0002;
    pub const SUSPEND: u16 = 0x0004;
    pub const RESET: u16 = 0x0010;
    pub const POWER: u16 = 0x0100;
}

/// Port features (USB 2.0, table 11-17).
mod feature {
    pub const PORT_ENABLE: u16 = 1;
    pub const PORT_SUSPEND: u16 = 2;
    pub const PORT_RESET: u16 = 4;
    pub const PORT_POWER: u16 = 8;
    pub const C_PORT_CONNECTION: u16 = 16;
    pub const C_PORT_RESET: u16 = 20;
}

/// One downstream port's status and change bits.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct PortState {
    status: u16,
    change: u16,
}

/// The hub's model: its ports' states and the devices on them.
struct Hub {
    descriptors: Descriptors,
    hub_descriptor: Vec<u8>,
    ports: Mutex<Vec<PortState>>,
    downstream: OnceLock<Arc<UsbPorts>>,
    attached: OnceLock<Weak<AttachedDevice>>,
    /// `port_power=on`: ports start unpowered and the host switches them.
    port_power: bool,
}

impl Hub {
    fn new(count: usize, port_power: bool, serial: Option<String>) -> Hub {
        let bitmap_bytes = (count + 1).div_ceil(8);
        let descriptors = Descriptors::new(
            DeviceIdentity {
                vendor: 0x0409,
                product: 0x55aa,
                bcd_device: 0x0101,
                bcd_usb: 0x0110,
                strings: ["QEMU".into(), "QEMU USB Hub".into(), serial.unwrap_or_else(|| "314159".into())],
            },
            config_attr::SELF_POWERED | config_attr::REMOTE_WAKEUP,
            0,
            &[Interface {
                class: (9, 0, 0),
                class_descriptors: Vec::new(),
                endpoints: vec![Endpoint {
                    address: 0x81,
                    kind: ep_type::INTERRUPT,
                    max_packet: bitmap_bytes as u16,
                    interval: 0xff,
                }],
            }],
        )
        .with_device_class((9, 0, 0));
        // Per-port overcurrent, and per-port power switching with port-power (else none);
        // 2 ms power-on to good; no removable devices; then the USB 1.0 port power
        // control mask.
        let characteristics = if port_power { 0x09 } else { 0x0a };
        let mut hub_descriptor = vec![0, HUB_DESCRIPTOR, count as u8, characteristics, 0x00, 0x01, 0x00];
        hub_descriptor.extend(std::iter::repeat_n(0x00, bitmap_bytes));
        hub_descriptor.extend(std::iter::repeat_n(0xff, bitmap_bytes));
        hub_descriptor[0] = hub_descriptor.len() as u8;
        Hub {
            descriptors,
            hub_descriptor,
            ports: Mutex::new(vec![PortState::default(); count]),
            downstream: OnceLock::new(),
            attached: OnceLock::new(),
            port_power,
        }
    }

    fn device(&self, port: usize) -> Option<Arc<AttachedDevice>> {
        self.downstream.get()?.device(port)
    }

    /// QEMU's `usb_hub_handle_reset`: every port powered (unless the host switches
    /// power), a connected device announced.
    fn reset_ports(&self) {
        let mut ports = self.ports.lock();
        for (i, p) in ports.iter_mut().enumerate() {
            *p = PortState {
                status: if self.port_power { 0 } else { status::POWER },
                change: 0,
            };
            // A device shows once its port has power.
            if p.status & status::POWER != 0 && self.device(i).is_some() {
                p.status |= status::CONNECTION;
                p.change |= status::CONNECTION;
            }
        }
    }

    /// Tells a suspended host the hub's state changed (remote wakeup through the hub's
    /// own port), with no lock of the hub held.
    fn wake_upstream(&self) {
        if let Some(dev) = self.attached.get().and_then(Weak::upgrade) {
            dev.wakeup();
        }
    }

    /// The 1-based port a class request addresses, if it exists.
    fn port_index(&self, req: &ControlRequest) -> Option<usize> {
        let n = usize::from(req.index & 0xff);
        (1..=self.ports.lock().len()).contains(&n).then(|| n - 1)
    }

    fn port_request(&self, req: &ControlRequest) -> Result<Vec<u8>, Stall> {
        let i = self.port_index(req).ok_or(Stall)?;
        let (is_set, value) = (req.request == 3, req.value);
        if is_set && value == feature::PORT_RESET {
            // The device first, with no lock of ours held (a reset reaches its model).
            if let Some(dev) = self.device(i) {
                dev.reset();
            }
        }
        let connected = self.device(i).is_some();
        let mut ports = self.ports.lock();
        let p = &mut ports[i];
        match (is_set, value) {
            (false, feature::PORT_ENABLE) => p.status &= !status::ENABLE,
            (false, feature::PORT_SUSPEND) => p.status &= !status::SUSPEND,
            (false, feature::PORT_POWER) if self.port_power => {
                p.status &= !(status::POWER | status::CONNECTION | status::ENABLE | status::SUSPEND);
            }
            (false, feature::PORT_POWER) => {}
            (false, v) if (feature::C_PORT_CONNECTION..=feature::C_PORT_RESET).contains(&v) => {
                p.change &= !(1 << (v - feature::C_PORT_CONNECTION));
            }
            (true, feature::PORT_SUSPEND) => p.status |= status::SUSPEND,
            (true, feature::PORT_RESET) => {
                // The reset completes at once: enabled, with the reset change to see.
                if p.status & status::CONNECTION != 0 {
                    p.change |= status::RESET;
                    p.status |= status::ENABLE;
                }
            }
            (true, feature::PORT_POWER) => {
                // Powering a port with a device on it connects it (QEMU announces it a
                // moment later; here at once).
                if p.status & status::POWER == 0 && connected {
                    p.status |= status::CONNECTION;
                    p.change |= status::CONNECTION;
                }
                p.status |= status::POWER;
            }
            _ => return Err(Stall),
        }
        Ok(Vec::new())
    }
}

impl UsbFunction for Hub {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control(&self, req: &ControlRequest, _data: &[u8]) -> Result<Vec<u8>, Stall> {
        match req.kind() {
            // Hub status: local power good, no overcurrent, nothing changed.
            (0xa0, 0x00) => Ok(vec![0, 0, 0, 0]),
            (0xa3, 0x00) => {
                let i = self.port_index(req).ok_or(Stall)?;
                let p = self.ports.lock()[i];
                let [sl, sh] = p.status.to_le_bytes();
                let [cl, ch] = p.change.to_le_bytes();
                Ok(vec![sl, sh, cl, ch])
            }
            // C_HUB_LOCAL_POWER, C_HUB_OVER_CURRENT: never set.
            (0x20, 0x01) if req.value <= 1 => Ok(Vec::new()),
            (0x23, 0x01 | 0x03) => self.port_request(req),
            (0xa0, 0x06) if (req.value >> 8) as u8 == HUB_DESCRIPTOR => Ok(self.hub_descriptor.clone()),
            _ => Err(Stall),
        }
    }

    /// The status change endpoint: bit N for port N with a change (bit 0, the hub's own,
    /// never set); NAK while nothing changed.
    fn data(&self, pid_code: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        if pid_code != pid::IN || ep != 1 {
            return TokenResult::Stall;
        }
        let ports = self.ports.lock();
        let mut bitmap = vec![0u8; (ports.len() + 1).div_ceil(8)];
        for (i, p) in ports.iter().enumerate() {
            if p.change != 0 {
                bitmap[(i + 1) / 8] |= 1 << ((i + 1) % 8);
            }
        }
        if bitmap.iter().all(|&b| b == 0) {
            return TokenResult::Nak;
        }
        let n = bitmap.len().min(buf.len());
        buf[..n].copy_from_slice(&bitmap[..n]);
        TokenResult::Done(n)
    }

    fn reset(&self) {
        self.reset_ports();
    }

    fn find_downstream(&self, address: u8) -> Option<Arc<AttachedDevice>> {
        let enabled: Vec<usize> = {
            let ports = self.ports.lock();
            (0..ports.len()).filter(|&i| ports[i].status & status::ENABLE != 0).collect()
        };
        enabled.into_iter().filter_map(|i| self.device(i)).find_map(|d| d.find(address))
    }
}

impl UsbHostController for Hub {
    fn attach(&self, i: usize) {
        if let Some(p) = self.ports.lock().get_mut(i) {
            if p.status & status::POWER != 0 {
                p.status |= status::CONNECTION;
                p.change |= status::CONNECTION;
            }
        }
        self.wake_upstream();
    }

    fn detach(&self, i: usize) {
        if let Some(p) = self.ports.lock().get_mut(i) {
            if p.status & status::ENABLE != 0 {
                p.change |= status::ENABLE;
            }
            p.status &= !(status::CONNECTION | status::ENABLE | status::SUSPEND);
            p.change |= status::CONNECTION;
        }
        self.wake_upstream();
    }

    fn wakeup(&self, i: usize) {
        if let Some(p) = self.ports.lock().get_mut(i) {
            if p.status & status::SUSPEND != 0 {
                p.status &= !status::SUSPEND;
                p.change |= status::SUSPEND;
            }
        }
        self.wake_upstream();
    }
}

/// QEMU's `usb-hub` (`USBHubState`).
#[derive(qom::Object)]
#[qom(name = "usb-hub")]
pub struct UsbHub {
    #[parent]
    parent: UsbDevice,
    #[property(default = 8u32, desc = "Downstream ports (1-8)")]
    ports: Prop<u32>,
    #[property(name = "port-power", default = false, desc = "Ports start unpowered; the host switches them")]
    port_power: Prop<bool>,
    hub: OnceLock<Arc<Hub>>,
}

type_init!(UsbHub);

impl DeviceImpl for UsbHub {
    const DESCRIPTION: Option<&'static str> = Some("QEMU USB Hub");
    const CATEGORY: DeviceCategory = DeviceCategory::Bridge;

    /// QEMU's `usb_hub_realize`: on its upstream port first, then its own ports join the
    /// bus, named after that port.
    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        let count = self.ports.get();
        if !(1..=MAX_PORTS).contains(&count) {
            return Err(RealizeError::device(UsbHubError::Ports(count)));
        }
        let hub = Arc::new(Hub::new(count as usize, self.port_power.get(), self.parent.serial()));
        let attached = self.parent.attach_function(ctx, hub.clone(), "QEMU USB Hub")?;
        let _ = hub.attached.set(Arc::downgrade(&attached));
        let (upstream, port) = self
            .parent
            .attached_port()
            .ok_or_else(|| RealizeError::device(UsbHubError::NotAttached))?;
        // QEMU's limit: five hubs in a chain (USB allows no more tiers).
        if upstream.path(port).matches('.').count() >= MAX_HUB_CHAIN {
            self.parent.detach();
            return Err(RealizeError::device(UsbHubError::ChainTooDeep));
        }
        let downstream = UsbPorts::downstream(count as usize, &upstream, &upstream.path(port));
        downstream.set_controller(Arc::downgrade(&hub) as Weak<dyn UsbHostController>);
        let _ = hub.downstream.set(downstream.clone());
        hub.reset_ports();
        let bus: &UsbBus = ctx.bus_state()?;
        bus.add_ports(&downstream);
        let _ = self.hub.set(hub);
        Ok(())
    }

    fn unrealize(&self, ctx: &DeviceContext) {
        if let (Some(hub), Ok(bus)) = (self.hub.get(), ctx.bus_state::<UsbBus>()) {
            if let Some(downstream) = hub.downstream.get() {
                bus.remove_ports(downstream);
            }
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn save_state(&self) -> Result<VmStateSection, VmStateError> {
        let mut s = VmStateSection::new(1);
        self.parent.save_core(&mut s);
        if let Some(hub) = self.hub.get() {
            s.put("ports", &*hub.ports.lock());
        }
        Ok(s)
    }

    fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
        state.check_version(1, 1)?;
        let ports: Vec<PortState> = state.get("ports")?;
        if let Some(hub) = self.hub.get() {
            if ports.len() != hub.ports.lock().len() {
                return Err(VmStateError::Mismatch(format!(
                    "usb-hub: {} ports saved, {} here",
                    ports.len(),
                    hub.ports.lock().len()
                )));
            }
        }
        // Checked before anything is loaded: a bad section changes nothing.
        self.parent.load_core(state)?;
        if let Some(hub) = self.hub.get() {
            *hub.ports.lock() = ports;
        }
        Ok(())
    }
}

/// Why `usb-hub` could not be realized, in QEMU's words.
#[derive(Debug, thiserror::Error)]
enum UsbHubError {
    #[error("num_ports ({0}) out of range (1..8)")]
    Ports(u32),
    #[error("usb-hub: not attached to a port")]
    NotAttached,
    #[error("usb hub chain too deep")]
    ChainTooDeep,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(b: [u8; 8]) -> ControlRequest {
        ControlRequest::parse(&b)
    }

    #[test]
    fn ports_report_status_and_changes_and_reset_enables() {
        let hub = Hub::new(8, false, None);
        assert_eq!(hub.hub_descriptor, vec![11, 0x29, 8, 0x0a, 0, 1, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(hub.descriptors.device[4], 9, "a hub device");
        hub.reset_ports();
        assert_eq!(hub.control(&req([0xa3, 0, 0, 0, 3, 0, 4, 0]), &[]), Ok(vec![0, 1, 0, 0]), "powered, empty");
        assert_eq!(hub.data(pid::IN, 1, &mut [0u8; 2]), TokenResult::Nak);
        // A device plugged into port 3: connection and its change; bit 3 of the bitmap.
        hub.attach(2);
        assert_eq!(hub.control(&req([0xa3, 0, 0, 0, 3, 0, 4, 0]), &[]), Ok(vec![1, 1, 1, 0]));
        let mut bitmap = [0u8; 2];
        assert_eq!(hub.data(pid::IN, 1, &mut bitmap), TokenResult::Done(2));
        assert_eq!(bitmap, [0x08, 0]);
        // Clear C_PORT_CONNECTION, reset the port: enabled, with C_PORT_RESET.
        hub.control(&req([0x23, 1, 16, 0, 3, 0, 0, 0]), &[]).unwrap();
        hub.control(&req([0x23, 3, 4, 0, 3, 0, 0, 0]), &[]).unwrap();
        assert_eq!(hub.control(&req([0xa3, 0, 0, 0, 3, 0, 4, 0]), &[]), Ok(vec![3, 1, 0x10, 0]));
        // Unplugged: connection and enable changes.
        hub.detach(2);
        assert_eq!(hub.control(&req([0xa3, 0, 0, 0, 3, 0, 4, 0]), &[]), Ok(vec![0, 1, 0x13, 0]));
        // Port 9 does not exist; an unknown feature stalls.
        assert_eq!(hub.control(&req([0xa3, 0, 0, 0, 9, 0, 4, 0]), &[]), Err(Stall));
        assert_eq!(hub.control(&req([0x23, 3, 30, 0, 1, 0, 0, 0]), &[]), Err(Stall));
    }
}
