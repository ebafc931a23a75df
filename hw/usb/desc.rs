//! USB descriptors (QEMU's `hw/usb/desc.c`): what a device tells the host about itself
//! through `GET_DESCRIPTOR`, built from a device's identity and its one configuration,
//! and the standard requests they answer.

/// Descriptor types (USB 2.0, table 9-5).
pub mod desc_type {
    /// The device descriptor.
    pub const DEVICE: u8 = 1;
    /// A configuration with its interfaces and endpoints.
    pub const CONFIG: u8 = 2;
    /// A string.
    pub const STRING: u8 = 3;
    /// An interface.
    pub const INTERFACE: u8 = 4;
    /// An endpoint.
    pub const ENDPOINT: u8 = 5;
}

/// Configuration attributes (`bmAttributes`).
pub mod config_attr {
    /// Always set (USB 1.0's bus-powered bit).
    pub const ONE: u8 = 0x80;
    /// The device powers itself.
    pub const SELF_POWERED: u8 = 0x40;
    /// The device can wake the host.
    pub const REMOTE_WAKEUP: u8 = 0x20;
}

/// Endpoint transfer types (`bmAttributes` of an endpoint).
pub mod ep_type {
    /// Bulk.
    pub const BULK: u8 = 2;
    /// Interrupt.
    pub const INTERRUPT: u8 = 3;
}

/// Who the device says it is (QEMU's `USBDescID`).
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    /// `idVendor`.
    pub vendor: u16,
    /// `idProduct`.
    pub product: u16,
    /// `bcdDevice`.
    pub bcd_device: u16,
    /// `bcdUSB`: 0x0100 or 0x0200.
    pub bcd_usb: u16,
    /// Manufacturer, product and serial number strings (string descriptors 1, 2, 3).
    pub strings: [String; 3],
}

/// An endpoint of an interface.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    /// `bEndpointAddress`: the number, with 0x80 for IN.
    pub address: u8,
    /// Transfer type ([`ep_type`]).
    pub kind: u8,
    /// `wMaxPacketSize`.
    pub max_packet: u16,
    /// `bInterval`: frames between polls.
    pub interval: u8,
}

/// An interface of the configuration.
#[derive(Clone, Debug)]
pub struct Interface {
    /// `bInterfaceClass`, `bInterfaceSubClass`, `bInterfaceProtocol`.
    pub class: (u8, u8, u8),
    /// Class descriptors that follow the interface descriptor (the HID descriptor).
    pub class_descriptors: Vec<u8>,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
}

/// A device's descriptors: the device, its one configuration, its strings.
#[derive(Clone, Debug)]
pub struct Descriptors {
    /// The device descriptor.
    pub device: [u8; 18],
    /// The configuration descriptor with everything under it.
    pub config: Vec<u8>,
    /// `bmAttributes` of the configuration.
    pub config_attributes: u8,
    /// The strings, descriptor 1 first.
    pub strings: Vec<String>,
}

/// The value of the one configuration.
pub const CONFIG_VALUE: u8 = 1;

impl Descriptors {
    /// A full-speed device with one configuration of `interfaces` (`max_power_ma` milliamps
    /// drawn from the bus).
    pub fn new(id: DeviceIdentity, attributes: u8, max_power_ma: u16, interfaces: &[Interface]) -> Self {
        let [vl, vh] = id.vendor.to_le_bytes();
        let [pl, ph] = id.product.to_le_bytes();
        let [dl, dh] = id.bcd_device.to_le_bytes();
        let [ul, uh] = id.bcd_usb.to_le_bytes();
        let device = [
            18,
            desc_type::DEVICE,
            ul,
            uh,
            0, // class per interface
            0,
            0,
            8, // bMaxPacketSize0
            vl,
            vh,
            pl,
            ph,
            dl,
            dh,
            1, // iManufacturer
            2, // iProduct
            3, // iSerialNumber
            1, // one configuration
        ];
        let mut config = vec![9, desc_type::CONFIG, 0, 0, interfaces.len() as u8, CONFIG_VALUE, 0];
        config.push(attributes | config_attr::ONE);
        config.push((max_power_ma / 2).min(255) as u8);
        for (number, iface) in interfaces.iter().enumerate() {
            let (class, subclass, protocol) = iface.class;
            config.extend_from_slice(&[
                9,
                desc_type::INTERFACE,
                number as u8,
                0,
                iface.endpoints.len() as u8,
                class,
                subclass,
                protocol,
                0,
            ]);
            config.extend_from_slice(&iface.class_descriptors);
            for ep in &iface.endpoints {
                let [ml, mh] = ep.max_packet.to_le_bytes();
                config.extend_from_slice(&[7, desc_type::ENDPOINT, ep.address, ep.kind, ml, mh, ep.interval]);
            }
        }
        let total = (config.len() as u16).to_le_bytes();
        config[2..4].copy_from_slice(&total);
        Descriptors {
            device,
            config,
            config_attributes: attributes | config_attr::ONE,
            strings: id.strings.to_vec(),
        }
    }

    /// The same with a device class (`bDeviceClass`, `bDeviceSubClass`,
    /// `bDeviceProtocol`): a hub says so for the whole device.
    pub fn with_device_class(mut self, (class, subclass, protocol): (u8, u8, u8)) -> Self {
        self.device[4..7].copy_from_slice(&[class, subclass, protocol]);
        self
    }

    /// The standard `GET_DESCRIPTOR` of `kind` and `index`; `None` stalls.
    pub fn get(&self, kind: u8, index: u8) -> Option<Vec<u8>> {
        match (kind, index) {
            (desc_type::DEVICE, _) => Some(self.device.to_vec()),
            (desc_type::CONFIG, 0) => Some(self.config.clone()),
            // Language IDs: US English only.
            (desc_type::STRING, 0) => Some(vec![4, desc_type::STRING, 0x09, 0x04]),
            (desc_type::STRING, i) => {
                let text = self.strings.get(usize::from(i) - 1)?;
                Some(string_descriptor(text))
            }
            // A full-speed-only device has no device qualifier (it stalls, as USB 2.0
            // section 9.6.2 asks).
            _ => None,
        }
    }
}

/// A string descriptor: UTF-16LE, at most 126 characters.
fn string_descriptor(text: &str) -> Vec<u8> {
    let units: Vec<u16> = text.encode_utf16().take(126).collect();
    let mut out = vec![(2 + 2 * units.len()) as u8, desc_type::STRING];
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptors {
        Descriptors::new(
            DeviceIdentity {
                vendor: 0x0627,
                product: 0x0001,
                bcd_device: 0,
                bcd_usb: 0x0100,
                strings: ["QEMU".into(), "Tablet".into(), "42".into()],
            },
            config_attr::REMOTE_WAKEUP,
            100,
            &[Interface {
                class: (3, 0, 0),
                class_descriptors: vec![9, 0x21, 1, 0, 0, 1, 0x22, 74, 0],
                endpoints: vec![Endpoint {
                    address: 0x81,
                    kind: ep_type::INTERRUPT,
                    max_packet: 8,
                    interval: 10,
                }],
            }],
        )
    }

    #[test]
    fn the_configuration_counts_its_own_length() {
        let d = sample();
        assert_eq!(d.config.len(), 9 + 9 + 9 + 7);
        assert_eq!(u16::from_le_bytes([d.config[2], d.config[3]]) as usize, d.config.len());
        assert_eq!(d.config[7], 0xa0);
        assert_eq!(d.config[8], 50);
        assert_eq!(&d.device[8..12], &[0x27, 0x06, 0x01, 0x00]);
    }

    #[test]
    fn strings_are_utf16_and_absent_ones_stall() {
        let d = sample();
        assert_eq!(d.get(desc_type::STRING, 1).unwrap(), vec![10, 3, b'Q', 0, b'E', 0, b'M', 0, b'U', 0]);
        assert_eq!(d.get(desc_type::STRING, 0).unwrap(), vec![4, 3, 0x09, 0x04]);
        assert!(d.get(desc_type::STRING, 4).is_none());
        assert!(d.get(6, 0).is_none());
    }
}
