//! The USB bus (QEMU's `hw/usb/bus.c` and `hw/usb/core.c`): a host controller's root
//! ports, where USB devices plug in (`-device usb-tablet,bus=usb.0,port=1`), and what
//! every device does the same way: its address, its configuration and the control pipe
//! (endpoint 0) with the standard requests, over which the host reads its descriptors.
//!
//! A host controller hands each token it finds in its schedule to the device at the
//! token's address with [`AttachedDevice::handle_token`]; the device model behind it
//! ([`UsbFunction`]) answers class requests and its own endpoints.

use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use qom::{type_init, Prop};
use serde::{Deserialize, Serialize};

use crate::core::bus::BusState;
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceMethods, DeviceState, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::usb::desc::{config_attr, desc_type, Descriptors, CONFIG_VALUE};

/// QEMU's `TYPE_USB_BUS`.
pub const TYPE_USB_BUS: &str = "usb-bus";
/// QEMU's `TYPE_USB_DEVICE`, the abstract USB device.
pub const TYPE_USB_DEVICE: &str = "usb-device";

/// Token packet IDs.
pub mod pid {
    /// A control transfer's setup stage.
    pub const SETUP: u8 = 0x2d;
    /// Data from the device.
    pub const IN: u8 = 0x69;
    /// Data to the device.
    pub const OUT: u8 = 0xe1;
}

/// Standard requests (USB 2.0, table 9-4).
mod request {
    pub const GET_STATUS: u8 = 0;
    pub const CLEAR_FEATURE: u8 = 1;
    pub const SET_FEATURE: u8 = 3;
    pub const SET_ADDRESS: u8 = 5;
    pub const GET_DESCRIPTOR: u8 = 6;
    pub const GET_CONFIGURATION: u8 = 8;
    pub const SET_CONFIGURATION: u8 = 9;
    pub const GET_INTERFACE: u8 = 10;
    pub const SET_INTERFACE: u8 = 11;
}

/// The device's remote wakeup feature selector.
const FEATURE_REMOTE_WAKEUP: u16 = 1;

/// How a device answered a token (QEMU's `USB_RET_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenResult {
    /// Acknowledged: so many bytes moved (taken from an OUT or SETUP, given for an IN).
    Done(usize),
    /// Nothing to send yet (an interrupt endpoint with no report): ask again later.
    Nak,
    /// The request or endpoint failed.
    Stall,
}

/// A request the device refuses: the host sees its control transfer stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stall;

/// A control transfer's setup packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlRequest {
    /// `bmRequestType`: direction (0x80 IN), type (standard, class, vendor), recipient.
    pub request_type: u8,
    /// `bRequest`.
    pub request: u8,
    /// `wValue`.
    pub value: u16,
    /// `wIndex`.
    pub index: u16,
    /// `wLength`: the most data the host moves.
    pub length: u16,
}

impl ControlRequest {
    /// Decodes an 8-byte setup packet.
    pub fn parse(b: &[u8; 8]) -> Self {
        ControlRequest {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// Whether the data stage goes to the host.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }

    /// `(bmRequestType, bRequest)`, the pair device models match on.
    pub fn kind(&self) -> (u8, u8) {
        (self.request_type, self.request)
    }
}

/// A USB device model (QEMU's `USBDeviceClass` hooks): what is particular to it. The
/// address, the configuration and the standard requests are the core's.
pub trait UsbFunction: Send + Sync {
    /// Its descriptors.
    fn descriptors(&self) -> &Descriptors;
    /// A control request the core does not answer (class and vendor requests, descriptors
    /// of class types). `data` is an OUT request's data stage; the result an IN request's.
    fn control(&self, req: &ControlRequest, data: &[u8]) -> Result<Vec<u8>, Stall>;
    /// A token for endpoint `ep` (1-15): for `OUT`, `buf` holds the host's data; for `IN`,
    /// it is where the answer goes, as long as the host takes.
    fn data(&self, pid: u8, ep: u8, buf: &mut [u8]) -> TokenResult;
    /// A bus reset (or the machine's): back to the power-on state.
    fn reset(&self);
    /// A hub's: the device at `address` behind its enabled ports (QEMU's
    /// `USBDeviceClass::find_device`).
    fn find_downstream(&self, _address: u8) -> Option<Arc<AttachedDevice>> {
        None
    }
}

/// Where endpoint 0 stands in a control transfer (QEMU's `setup_state`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum ControlStage {
    /// No transfer.
    #[default]
    Idle,
    /// An IN request ran: its data, `pos` bytes of it read so far.
    DataIn { data: Vec<u8>, pos: usize },
    /// An OUT request's data arriving.
    DataOut { setup: [u8; 8], data: Vec<u8> },
    /// An OUT request's data is complete: it runs at the status stage (an IN token).
    StatusIn { setup: [u8; 8], data: Vec<u8> },
    /// The request failed: the transfer's next token stalls.
    Stalled,
}

/// The state every USB device has (QEMU's `vmstate_usb_device`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct CoreState {
    address: u8,
    configuration: u8,
    remote_wakeup: bool,
    control: ControlStage,
}

/// A device on a port: the core's state and the model behind it.
pub struct AttachedDevice {
    function: Arc<dyn UsbFunction>,
    state: Mutex<CoreState>,
    port: (Weak<UsbPorts>, usize),
    /// The product name and the `id=`, for `info usb`.
    product: String,
    id: Option<String>,
}

impl AttachedDevice {
    /// The address the host gave it (0 until `SET_ADDRESS`).
    pub fn address(&self) -> u8 {
        self.state.lock().address
    }

    /// Whether the host selected its configuration (it may move data).
    pub fn is_configured(&self) -> bool {
        self.state.lock().configuration != 0
    }

    /// QEMU's `usb_find_device`: this device if it has `address`, else the one behind
    /// it (a hub's).
    pub fn find(self: &Arc<Self>, address: u8) -> Option<Arc<AttachedDevice>> {
        if self.address() == address {
            return Some(Arc::clone(self));
        }
        self.function.find_downstream(address)
    }

    /// QEMU's `usb_device_reset`: address 0, unconfigured, the model reset.
    pub fn reset(&self) {
        *self.state.lock() = CoreState::default();
        self.function.reset();
    }

    /// QEMU's `usb_wakeup`: the device has something for a host that suspended it, and
    /// the host allowed it to say so.
    pub fn wakeup(&self) {
        if !self.state.lock().remote_wakeup {
            return;
        }
        let (ports, port) = &self.port;
        if let Some(hc) = ports.upgrade().and_then(|p| p.controller()) {
            hc.wakeup(*port);
        }
    }

    /// A token the controller found for this device's address: endpoint 0's control
    /// transfers here, other endpoints to the model.
    pub fn handle_token(&self, pid: u8, ep: u8, buf: &mut [u8]) -> TokenResult {
        if ep != 0 {
            if !self.is_configured() {
                return TokenResult::Stall;
            }
            return self.function.data(pid, ep, buf);
        }
        let mut st = self.state.lock();
        match pid {
            pid::SETUP => self.setup(&mut st, buf),
            pid::IN => self.control_in(&mut st, buf),
            pid::OUT => Self::control_out(&mut st, buf),
            _ => TokenResult::Stall,
        }
    }

    /// The setup stage: a device always takes it (a new one ends any transfer before).
    /// An IN request runs now; an OUT one once its data is in.
    fn setup(&self, st: &mut CoreState, buf: &[u8]) -> TokenResult {
        let Ok(setup) = <[u8; 8]>::try_from(buf) else {
            st.control = ControlStage::Stalled;
            return TokenResult::Stall;
        };
        let req = ControlRequest::parse(&setup);
        st.control = if req.is_in() {
            match self.request(st, &req, &[]) {
                Ok(mut data) => {
                    data.truncate(usize::from(req.length));
                    ControlStage::DataIn { data, pos: 0 }
                }
                Err(Stall) => ControlStage::Stalled,
            }
        } else if req.length == 0 {
            ControlStage::StatusIn { setup, data: Vec::new() }
        } else {
            ControlStage::DataOut { setup, data: Vec::new() }
        };
        TokenResult::Done(8)
    }

    fn control_in(&self, st: &mut CoreState, buf: &mut [u8]) -> TokenResult {
        match std::mem::take(&mut st.control) {
            ControlStage::DataIn { data, pos } => {
                let n = (data.len() - pos).min(buf.len());
                buf[..n].copy_from_slice(&data[pos..pos + n]);
                st.control = ControlStage::DataIn { data, pos: pos + n };
                TokenResult::Done(n)
            }
            // The status stage of an OUT request (its data may have ended short).
            ControlStage::StatusIn { setup, data } | ControlStage::DataOut { setup, data } => {
                let req = ControlRequest::parse(&setup);
                match self.request(st, &req, &data) {
                    Ok(_) => TokenResult::Done(0),
                    Err(Stall) => TokenResult::Stall,
                }
            }
            ControlStage::Idle | ControlStage::Stalled => TokenResult::Stall,
        }
    }

    fn control_out(st: &mut CoreState, buf: &[u8]) -> TokenResult {
        match std::mem::take(&mut st.control) {
            ControlStage::DataOut { setup, mut data } => {
                let want = usize::from(ControlRequest::parse(&setup).length);
                let n = buf.len().min(want - data.len());
                data.extend_from_slice(&buf[..n]);
                st.control = if data.len() == want {
                    ControlStage::StatusIn { setup, data }
                } else {
                    ControlStage::DataOut { setup, data }
                };
                TokenResult::Done(n)
            }
            // The status stage of an IN request.
            ControlStage::DataIn { .. } => TokenResult::Done(0),
            stage @ ControlStage::StatusIn { .. } => {
                st.control = stage;
                TokenResult::Stall
            }
            ControlStage::Idle | ControlStage::Stalled => TokenResult::Stall,
        }
    }

    /// QEMU's `usb_desc_handle_control` and then the model's `handle_control`.
    fn request(&self, st: &mut CoreState, req: &ControlRequest, data: &[u8]) -> Result<Vec<u8>, Stall> {
        let desc = self.function.descriptors();
        match req.kind() {
            (0x80, request::GET_STATUS) => {
                let self_powered = desc.config_attributes & config_attr::SELF_POWERED != 0;
                Ok(vec![u8::from(self_powered) | u8::from(st.remote_wakeup) << 1, 0])
            }
            (0x81 | 0x82, request::GET_STATUS) => Ok(vec![0, 0]),
            (0x00, request::CLEAR_FEATURE) if req.value == FEATURE_REMOTE_WAKEUP => {
                st.remote_wakeup = false;
                Ok(Vec::new())
            }
            (0x00, request::SET_FEATURE) if req.value == FEATURE_REMOTE_WAKEUP => {
                st.remote_wakeup = true;
                Ok(Vec::new())
            }
            // ENDPOINT_HALT: the models keep no halt state to clear or set.
            (0x02, request::CLEAR_FEATURE | request::SET_FEATURE) if req.value == 0 => Ok(Vec::new()),
            (0x00, request::SET_ADDRESS) if req.value < 128 => {
                st.address = req.value as u8;
                Ok(Vec::new())
            }
            (0x80, request::GET_DESCRIPTOR) => {
                let [index, kind] = req.value.to_le_bytes();
                match kind {
                    desc_type::DEVICE | desc_type::CONFIG | desc_type::STRING => desc.get(kind, index).ok_or(Stall),
                    _ => self.function.control(req, data),
                }
            }
            (0x80, request::GET_CONFIGURATION) => Ok(vec![st.configuration]),
            (0x00, request::SET_CONFIGURATION) if req.value == 0 || req.value == u16::from(CONFIG_VALUE) => {
                st.configuration = req.value as u8;
                Ok(Vec::new())
            }
            (0x81, request::GET_INTERFACE) => Ok(vec![0]),
            (0x01, request::SET_INTERFACE) if req.value == 0 => Ok(Vec::new()),
            _ => self.function.control(req, data),
        }
    }
}

/// A host controller's bus (QEMU's `usb_bus_new`): named `<id>.0` after the controller's
/// `id`, else `usb-bus.N`; its ports `ports`; the controller (`ctx`'s object) its hotplug
/// handler. Returns the bus's groups of ports.
pub fn usb_host_bus_new(
    ctx: &DeviceContext,
    services: &Arc<crate::core::services::MachineServices>,
    bus_name: &str,
    ports: &Arc<UsbPorts>,
) -> Result<PortGroups, RealizeError> {
    let bus = crate::core::bus::qbus_new(TYPE_USB_BUS, ctx.object(), bus_name, services)?;
    if let Some(b) = bus.downcast::<BusState>() {
        b.set_hotplug_handler(Some(ctx.object()));
    }
    let b = bus.downcast::<UsbBus>().expect("qbus_new made a usb-bus");
    b.set_ports(ports);
    Ok(b.ports.clone())
}

/// The name of a host controller's bus: `<id>.0`, or QEMU's `usb-bus.N` for controllers
/// without an id.
pub fn usb_host_bus_name(id: Option<String>) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    match id {
        Some(id) => format!("{id}.0"),
        None => format!("usb-bus.{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
    }
}

/// A host controller's `unplug_request`: USB devices go at once, a hub with the devices
/// on its ports, deepest first (QEMU's `usb_unregister_port`).
pub fn usb_host_unplug(dev: &qom::Object) {
    if let (Some(usb), Some(bus)) = (dev.downcast::<UsbDevice>(), dev.parent_bus()) {
        if let Some(path) = usb.port_path() {
            let below = format!("{path}.");
            let mut behind: Vec<(String, qom::ObjectRef)> = crate::core::bus::bus_children(&bus)
                .into_iter()
                .filter_map(|d| {
                    let p = d.downcast::<UsbDevice>()?.port_path()?;
                    p.starts_with(&below).then_some((p, d))
                })
                .collect();
            behind.sort_by_key(|(p, _)| std::cmp::Reverse(p.matches('.').count()));
            for (_, d) in behind {
                crate::core::qdev::qdev_unplug_complete(&d);
            }
        }
    }
    crate::core::qdev::qdev_unplug_complete(dev);
}

/// The host controller's side of its ports (QEMU's `USBPortOps`).
pub trait UsbHostController: Send + Sync {
    /// A device was plugged into `port`.
    fn attach(&self, port: usize);
    /// The device of `port` was taken out.
    fn detach(&self, port: usize);
    /// The device of `port` asks the suspended host to resume.
    fn wakeup(&self, port: usize);
}

/// A controller's root ports, named "1", "2", ..., or a hub's, named after the hub's
/// own port ("1.1", "1.2", ...), as QEMU's port paths.
pub struct UsbPorts {
    slots: Vec<Mutex<Option<Arc<AttachedDevice>>>>,
    controller: OnceLock<Weak<dyn UsbHostController>>,
    bus_name: String,
    /// QEMU's `busnr`: buses numbered as they are made.
    number: u32,
    /// What the paths of these ports start with: nothing for root ports, the hub's path
    /// and a dot for a hub's.
    prefix: String,
}

impl UsbPorts {
    /// `count` empty root ports on the bus named `bus_name`.
    pub fn new(count: usize, bus_name: &str) -> Arc<UsbPorts> {
        static NEXT_BUS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        Self::with_prefix(count, bus_name, NEXT_BUS.fetch_add(1, std::sync::atomic::Ordering::Relaxed), "")
    }

    /// `count` empty ports of a hub at `hub_path` on the same bus as `upstream`.
    pub fn downstream(count: usize, upstream: &UsbPorts, hub_path: &str) -> Arc<UsbPorts> {
        Self::with_prefix(count, &upstream.bus_name, upstream.number, &format!("{hub_path}."))
    }

    fn with_prefix(count: usize, bus_name: &str, number: u32, prefix: &str) -> Arc<UsbPorts> {
        Arc::new(UsbPorts {
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
            controller: OnceLock::new(),
            bus_name: bus_name.to_string(),
            number,
            prefix: prefix.to_string(),
        })
    }

    /// Connects the ports to their controller or hub (once, at its realize).
    pub fn set_controller(&self, hc: Weak<dyn UsbHostController>) {
        let _ = self.controller.set(hc);
    }

    fn controller(&self) -> Option<Arc<dyn UsbHostController>> {
        self.controller.get()?.upgrade()
    }

    /// How many ports there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The device on `port`, if any.
    pub fn device(&self, port: usize) -> Option<Arc<AttachedDevice>> {
        self.slots.get(port)?.lock().clone()
    }

    /// The path of `port` ("1", "1.3").
    pub fn path(&self, port: usize) -> String {
        format!("{}{}", self.prefix, port + 1)
    }

    fn is_free(&self, port: usize) -> bool {
        self.slots[port].lock().is_none()
    }

    /// The free port whose path is `path`, if one of these is.
    fn free_port_at(&self, path: &str) -> Option<usize> {
        let n: usize = path.strip_prefix(&self.prefix)?.parse().ok()?;
        n.checked_sub(1).filter(|&i| i < self.slots.len() && self.is_free(i))
    }

    fn attach_at(self: &Arc<Self>, port: usize, function: Arc<dyn UsbFunction>, product: &str, id: Option<String>) -> Arc<AttachedDevice> {
        let dev = Arc::new(AttachedDevice {
            function,
            state: Mutex::new(CoreState::default()),
            port: (Arc::downgrade(self), port),
            product: product.to_string(),
            id,
        });
        *self.slots[port].lock() = Some(dev.clone());
        if let Some(hc) = self.controller() {
            hc.attach(port);
        }
        dev
    }

    fn detach(&self, port: usize) {
        if self.slots[port].lock().take().is_some() {
            if let Some(hc) = self.controller() {
                hc.detach(port);
            }
        }
    }
}

/// Errors of plugging a device in, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum UsbBusError {
    /// `port=` names no free port.
    #[error("usb port {0} (bus {1}) not found (in use?)")]
    PortNotFound(String, String),
    /// All ports are taken.
    #[error("tried to attach usb device {0} to a bus with no free ports")]
    NoFreePort(String),
    /// The bus has no controller behind it.
    #[error("USB bus without a host controller")]
    NoController,
}

/// QEMU's `USBBus`: a host controller's bus (`<id>.0`, or `usb-bus.N`).
#[derive(qom::Object)]
#[qom(name = TYPE_USB_BUS)]
pub struct UsbBus {
    #[parent]
    parent: BusState,
    /// The controller's root ports first, then each hub's, in the order they came (QEMU's
    /// list of the bus's free ports).
    ports: PortGroups,
}

/// A bus's groups of ports (root ports, then each hub's), shared with a controller that
/// reaches devices by port path.
pub type PortGroups = Arc<Mutex<Vec<Arc<UsbPorts>>>>;

/// The device at port `path` ("1", "1.3") of the bus whose ports are `groups`.
pub fn device_at(groups: &PortGroups, path: &str) -> Option<Arc<AttachedDevice>> {
    groups
        .lock()
        .iter()
        .find_map(|ports| (0..ports.len()).find(|&i| ports.path(i) == path).and_then(|i| ports.device(i)))
}

type_init!(UsbBus);

impl UsbBus {
    /// Connects the bus to its controller's ports (at the controller's realize).
    pub fn set_ports(&self, ports: &Arc<UsbPorts>) {
        self.ports.lock().insert(0, ports.clone());
    }

    /// A hub's ports join the bus (QEMU's `usb_register_port` at the hub's realize).
    pub fn add_ports(&self, ports: &Arc<UsbPorts>) {
        self.ports.lock().push(ports.clone());
    }

    /// A hub's ports leave it.
    pub fn remove_ports(&self, ports: &Arc<UsbPorts>) {
        self.ports.lock().retain(|p| !Arc::ptr_eq(p, ports));
    }

    /// The bus's groups of ports, root ports first.
    fn groups(&self) -> Vec<Arc<UsbPorts>> {
        self.ports.lock().clone()
    }

    /// Plugs `function` into the port `path` names, or the first free one of any group.
    fn attach(
        &self,
        path: Option<&str>,
        function: Arc<dyn UsbFunction>,
        product: &str,
        id: Option<String>,
    ) -> Result<(Arc<UsbPorts>, usize, Arc<AttachedDevice>), UsbBusError> {
        attach_in(&self.groups(), path, function, product, id)
    }
}

/// QEMU's `usb_claim_port` and `usb_device_attach`: the port `path` names among `groups`
/// (root ports first), or the first free one, gets a device of `function`.
fn attach_in(
    groups: &[Arc<UsbPorts>],
    path: Option<&str>,
    function: Arc<dyn UsbFunction>,
    product: &str,
    id: Option<String>,
) -> Result<(Arc<UsbPorts>, usize, Arc<AttachedDevice>), UsbBusError> {
    let root = groups.first().ok_or(UsbBusError::NoController)?;
    let (group, port) = match path {
        Some(p) => groups
            .iter()
            .find_map(|g| Some((g, g.free_port_at(p)?)))
            .ok_or_else(|| UsbBusError::PortNotFound(p.to_string(), root.bus_name.clone()))?,
        None => groups
            .iter()
            .find_map(|g| Some((g, (0..g.len()).find(|&i| g.is_free(i))?)))
            .ok_or_else(|| UsbBusError::NoFreePort(product.to_string()))?,
    };
    let dev = group.attach_at(port, function, product, id);
    Ok((group.clone(), port, dev))
}

/// QEMU's `hmp_info_usb`: every device on every USB bus under `root`, with its USB address.
pub fn info_usb(root: &qom::ObjectRef) -> String {
    fn buses(obj: &qom::ObjectRef, out: &mut Vec<Arc<UsbPorts>>) {
        if let Some(bus) = obj.downcast::<UsbBus>() {
            out.extend(bus.groups());
        }
        for (_, child) in obj.children() {
            buses(&child, out);
        }
    }
    let mut found = Vec::new();
    buses(root, &mut found);
    if found.is_empty() {
        return "USB support not enabled\n".to_string();
    }
    found.sort_by_key(|p| p.number);
    let mut out = String::new();
    for ports in found {
        for port in 0..ports.len() {
            if let Some(dev) = ports.device(port) {
                let id = dev.id.as_ref().map(|id| format!(", ID: {id}")).unwrap_or_default();
                out.push_str(&format!(
                    "  Device {}.{}, Port {}, Speed 12 Mb/s, Product {}{id}\n",
                    ports.number,
                    dev.address(),
                    ports.path(port),
                    dev.product
                ));
            }
        }
    }
    out
}

/// QEMU's `USBDevice`: a device on a USB port. Its subclasses make the model and plug it
/// with [`UsbDevice::attach_function`].
#[derive(qom::Object)]
#[qom(name = TYPE_USB_DEVICE, abstract)]
pub struct UsbDevice {
    #[parent]
    parent: DeviceState,
    #[property(desc = "Port to plug into (\"1\", \"2\", ...; default: the first free one)")]
    port: Prop<Option<String>>,
    #[property(desc = "Serial number string the device reports")]
    serial: Prop<Option<String>>,
    attached: OnceLock<(Arc<UsbPorts>, usize, Arc<AttachedDevice>)>,
}

type_init!(UsbDevice);

impl DeviceImpl for UsbDevice {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_USB_BUS);
    const CATEGORY: DeviceCategory = DeviceCategory::Usb;

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((ports, port, _)) = self.attached.get() {
            ports.detach(*port);
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }

    fn reset(&self) {
        if let Some((_, _, dev)) = self.attached.get() {
            dev.reset();
        }
        DeviceImpl::reset(&self.parent);
    }
}

impl UsbDevice {
    /// QEMU's `usb_qdev_realize`: plugs `function` (whose product name is `product`) into
    /// the port `port=` names, or the first free one.
    pub fn attach_function(
        &self,
        ctx: &DeviceContext,
        function: Arc<dyn UsbFunction>,
        product: &str,
    ) -> Result<Arc<AttachedDevice>, RealizeError> {
        let bus: &UsbBus = ctx.bus_state()?;
        let path = self.port.get();
        let (ports, port, dev) = bus
            .attach(path.as_deref(), function, product, self.parent.id())
            .map_err(RealizeError::device)?;
        self.port.set(Some(ports.path(port)));
        let _ = self.attached.set((ports, port, dev.clone()));
        Ok(dev)
    }

    /// `serial=`, if given.
    pub fn serial(&self) -> Option<String> {
        self.serial.get()
    }

    /// The port the device is plugged into ("1", "1.2", ...), once realized.
    pub fn port_path(&self) -> Option<String> {
        self.attached.get().map(|(ports, port, _)| ports.path(*port))
    }

    /// Takes the device off its port (a realize that fails after plugging it).
    pub fn detach(&self) {
        if let Some((ports, port, _)) = self.attached.get() {
            ports.detach(*port);
        }
    }

    /// The ports it is plugged into, and which: a hub makes its own next to them.
    pub fn attached_port(&self) -> Option<(Arc<UsbPorts>, usize)> {
        self.attached.get().map(|(ports, port, _)| (ports.clone(), *port))
    }

    /// Saves the core's state (address, configuration, a control transfer under way) into
    /// a subclass's section.
    pub fn save_core(&self, section: &mut VmStateSection) {
        if let Some((_, _, dev)) = self.attached.get() {
            section.put("usb_core", &*dev.state.lock());
        }
    }

    /// Loads [`UsbDevice::save_core`]'s state.
    pub fn load_core(&self, section: &VmStateSection) -> Result<(), VmStateError> {
        let state: CoreState = section.get("usb_core")?;
        let consistent = match &state.control {
            ControlStage::DataIn { data, pos } => *pos <= data.len(),
            ControlStage::DataOut { setup, data } | ControlStage::StatusIn { setup, data } => {
                data.len() <= usize::from(ControlRequest::parse(setup).length)
            }
            ControlStage::Idle | ControlStage::Stalled => true,
        };
        if !consistent || state.address >= 128 {
            return Err(VmStateError::BadField {
                field: "usb_core".into(),
                reason: "control transfer data beyond its length, or an address above 127".into(),
            });
        }
        if let Some((_, _, dev)) = self.attached.get() {
            *dev.state.lock() = state;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::desc::DeviceIdentity;

    struct Null(Descriptors);
    impl UsbFunction for Null {
        fn descriptors(&self) -> &Descriptors {
            &self.0
        }
        fn control(&self, req: &ControlRequest, data: &[u8]) -> Result<Vec<u8>, Stall> {
            match req.kind() {
                (0x21, 0x09) if data == [7] => Ok(Vec::new()),
                _ => Err(Stall),
            }
        }
        fn data(&self, _: u8, _: u8, _: &mut [u8]) -> TokenResult {
            TokenResult::Nak
        }
        fn reset(&self) {}
    }

    fn device() -> Arc<AttachedDevice> {
        let id = DeviceIdentity {
            vendor: 1,
            product: 2,
            bcd_device: 0,
            bcd_usb: 0x0100,
            strings: ["a".into(), "b".into(), "c".into()],
        };
        let ports = UsbPorts::new(2, "usb.0");
        let f = Arc::new(Null(Descriptors::new(id, 0, 100, &[])));
        attach_in(&[ports], None, f, "null", None).unwrap().2
    }

    fn setup(dev: &AttachedDevice, b: [u8; 8]) -> TokenResult {
        let mut b = b;
        dev.handle_token(pid::SETUP, 0, &mut b)
    }

    #[test]
    fn a_descriptor_is_read_in_pieces_and_set_address_waits_for_the_status_stage() {
        let dev = device();
        assert_eq!(setup(&dev, [0x80, 6, 0, 1, 0, 0, 64, 0]), TokenResult::Done(8));
        let mut buf = [0u8; 8];
        assert_eq!(dev.handle_token(pid::IN, 0, &mut buf), TokenResult::Done(8));
        assert_eq!(buf[..2], [18, 1]);
        let mut rest = [0u8; 64];
        assert_eq!(dev.handle_token(pid::IN, 0, &mut rest), TokenResult::Done(10));
        assert_eq!(dev.handle_token(pid::OUT, 0, &mut []), TokenResult::Done(0));
        setup(&dev, [0, 5, 9, 0, 0, 0, 0, 0]);
        assert_eq!(dev.address(), 0, "the address changes after the status stage");
        assert_eq!(dev.handle_token(pid::IN, 0, &mut []), TokenResult::Done(0));
        assert_eq!(dev.address(), 9);
    }

    #[test]
    fn unknown_requests_stall_their_data_stage_and_out_data_reaches_the_model() {
        let dev = device();
        setup(&dev, [0xc0, 0x77, 0, 0, 0, 0, 4, 0]);
        assert_eq!(dev.handle_token(pid::IN, 0, &mut [0u8; 8]), TokenResult::Stall);
        setup(&dev, [0x21, 0x09, 0, 2, 0, 0, 1, 0]);
        assert_eq!(dev.handle_token(pid::OUT, 0, &mut [7]), TokenResult::Done(1));
        assert_eq!(dev.handle_token(pid::IN, 0, &mut []), TokenResult::Done(0));
        setup(&dev, [0x21, 0x09, 0, 2, 0, 0, 1, 0]);
        assert_eq!(dev.handle_token(pid::OUT, 0, &mut [8]), TokenResult::Done(1));
        assert_eq!(dev.handle_token(pid::IN, 0, &mut []), TokenResult::Stall);
        assert_eq!(dev.handle_token(pid::SETUP, 0, &mut [0u8; 5]), TokenResult::Stall);
    }

    #[test]
    fn endpoints_stall_until_configured_and_ports_refuse_in_qemus_words() {
        let dev = device();
        assert_eq!(dev.handle_token(pid::IN, 1, &mut [0u8; 8]), TokenResult::Stall);
        setup(&dev, [0, 9, 1, 0, 0, 0, 0, 0]);
        dev.handle_token(pid::IN, 0, &mut []);
        assert_eq!(dev.handle_token(pid::IN, 1, &mut [0u8; 8]), TokenResult::Nak);
        let ports = UsbPorts::new(1, "usb.0");
        let f = || Arc::new(Null(dev.function.descriptors().clone())) as Arc<dyn UsbFunction>;
        assert_eq!(
            attach_in(std::slice::from_ref(&ports), Some("2"), f(), "x", None).err().unwrap().to_string(),
            "usb port 2 (bus usb.0) not found (in use?)"
        );
        attach_in(std::slice::from_ref(&ports), Some("1"), f(), "x", None).unwrap();
        assert_eq!(
            attach_in(std::slice::from_ref(&ports), None, f(), "QEMU USB Tablet", None).err().unwrap().to_string(),
            "tried to attach usb device QEMU USB Tablet to a bus with no free ports"
        );
    }
}
