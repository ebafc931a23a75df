//! The ports of a `virtio-serial-pci` (QEMU's `hw/char/virtio-console.c` and the port base
//! of `hw/char/virtio-serial-bus.c`): `virtserialport`, a named channel to a chardev that
//! opens on the host side while the chardev has a peer (a guest agent's socket), and
//! `virtconsole`, a console (`hvc0` in a Linux guest) that is always open on the host side.

use std::sync::{Arc, OnceLock};

use qom::{type_init, Prop};

use crate::core::chardev::{chardev_claim, chardev_release, ChardevError};
use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, DeviceState, RealizeError};
use crate::virtio::virtio_serial::{PortError, SerialPort, VirtioSerial, VirtioSerialBus, TYPE_VIRTIO_SERIAL_BUS};

/// QEMU's `TYPE_VIRTIO_SERIAL_PORT`, the abstract port.
pub const TYPE_VIRTIO_SERIAL_PORT: &str = "virtio-serial-port";
/// QEMU's `TYPE_VIRTIO_CONSOLE_SERIAL_PORT`.
pub const TYPE_VIRTSERIALPORT: &str = "virtserialport";
/// QEMU's `TYPE_VIRTIO_CONSOLE`.
pub const TYPE_VIRTCONSOLE: &str = "virtconsole";

/// QEMU's `VirtIOSerialPort` with `VirtConsole`'s chardev.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTIO_SERIAL_PORT, abstract)]
pub struct VirtioSerialPort {
    #[parent]
    parent: DeviceState,
    #[property(default = u32::MAX, desc = "Port number (default: the first free one)")]
    nr: Prop<u32>,
    #[property(desc = "Name the guest sees the port by")]
    name: Prop<Option<String>>,
    #[property(desc = "ID of a chardev to use as a backend")]
    chardev: Prop<Option<String>>,
    /// The device and the port, once plugged.
    plugged: OnceLock<(Arc<VirtioSerial>, Arc<SerialPort>)>,
}

type_init!(VirtioSerialPort);

/// Errors of a port's properties, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub enum VirtioConsoleError {
    /// `chardev=` naming no chardev.
    #[error("Property '{0}.chardev' can't find value '{1}'")]
    ChardevNotFound(&'static str, String),
    /// `chardev=` naming a chardev another device has.
    #[error("Property '{0}.chardev' can't take value '{1}': Device '{1}' is in use")]
    ChardevInUse(&'static str, String),
    /// The bus's rules.
    #[error(transparent)]
    Port(#[from] PortError),
}

impl DeviceImpl for VirtioSerialPort {
    const BUS_TYPE: Option<&'static str> = Some(TYPE_VIRTIO_SERIAL_BUS);
    const CATEGORY: DeviceCategory = DeviceCategory::Input;

    fn unrealize(&self, ctx: &DeviceContext) {
        if let Some((serial, port)) = self.plugged.get() {
            serial.remove_port(port.id);
            if let (Some(id), Some(chardev)) = (self.chardev.get(), &port.chardev) {
                chardev_release(id.as_str(), chardev);
            }
        }
        DeviceImpl::unrealize(&self.parent, ctx);
    }
}

impl VirtioSerialPort {
    /// QEMU's `virtser_port_device_realize` and `virtconsole_realize`.
    fn realize_port(&self, ctx: &DeviceContext, is_console: bool) -> Result<(), RealizeError> {
        let err = |e: VirtioConsoleError| RealizeError::device(e);
        let bus: &VirtioSerialBus = ctx.bus_state()?;
        let serial = bus
            .serial()
            .ok_or(err(VirtioConsoleError::Port(PortError::NoDevice)))?;
        let name = self.name.get();
        let id = serial
            .assign_id(self.nr.get(), is_console, name.as_deref())
            .map_err(|e| err(VirtioConsoleError::Port(e)))?;
        let chardev = match self.chardev.get() {
            Some(c) => Some(chardev_claim(&c).map_err(|e| {
                err(match e {
                    ChardevError::InUse(_) => VirtioConsoleError::ChardevInUse(ctx.type_name(), c),
                    _ => VirtioConsoleError::ChardevNotFound(ctx.type_name(), c),
                })
            })?),
            None => None,
        };
        let port = SerialPort::new(id, name, is_console, self.parent.id(), chardev);
        serial.add_port(port.clone());
        self.nr.set(id);
        let _ = self.plugged.set((serial, port));
        Ok(())
    }

    /// Whether the guest opened the port.
    pub fn guest_connected(&self) -> bool {
        self.plugged.get().is_some_and(|(_, p)| p.guest_connected())
    }
}

/// QEMU's `virtserialport`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTSERIALPORT)]
pub struct VirtSerialPort {
    #[parent]
    parent: VirtioSerialPort,
}

type_init!(VirtSerialPort);

impl DeviceImpl for VirtSerialPort {
    const DESCRIPTION: Option<&'static str> = Some("virtio serial port");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.parent.realize_port(ctx, false)
    }
}

/// QEMU's `virtconsole`.
#[derive(qom::Object)]
#[qom(name = TYPE_VIRTCONSOLE)]
pub struct VirtConsole {
    #[parent]
    parent: VirtSerialPort,
}

type_init!(VirtConsole);

impl DeviceImpl for VirtConsole {
    const DESCRIPTION: Option<&'static str> = Some("virtio console port");

    fn realize(&self, ctx: &DeviceContext) -> Result<(), RealizeError> {
        self.parent.parent.realize_port(ctx, true)
    }
}
