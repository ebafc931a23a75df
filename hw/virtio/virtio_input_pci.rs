//! `virtio-keyboard-pci`, `virtio-mouse-pci` and `virtio-tablet-pci` (QEMU's
//! `hw/virtio/virtio-input-hid-pci.c`): the virtio input devices (`virtio_input.rs`) on the
//! virtio-pci transport, virtio 1.0 only (device 1af4:1052, revision 1, whatever the bus),
//! with QEMU's properties: `serial`, and `wheel-axis` on the pointers. libvirt writes them
//! for `<input type='keyboard'|'mouse'|'tablet' bus='virtio'/>`.

use std::sync::{Arc, OnceLock};

use qom::{type_init, Prop};

use crate::core::qdev::{DeviceCategory, DeviceContext, DeviceImpl, RealizeError};
use crate::core::vmstate::{VmStateError, VmStateSection};
use crate::pci::pci::PciDeviceImpl;
use crate::virtio::virtio::VirtioDevice;
use crate::virtio::virtio_input::{HidKind, VirtioInput, VirtioInputConf, VIRTIO_ID_INPUT};
use crate::virtio::virtio_pci::{VirtioPciImpl, VirtioPciProxy, PCI_VENDOR_ID_REDHAT_QUMRANET};

/// QEMU's `PCI_CLASS_INPUT_KEYBOARD`.
const PCI_CLASS_INPUT_KEYBOARD: u16 = 0x0900;
/// QEMU's `PCI_CLASS_INPUT_MOUSE` (the tablet's too).
const PCI_CLASS_INPUT_MOUSE: u16 = 0x0902;
/// QEMU's default subsystem of its PCI devices (`PCI_SUBDEVICE_ID_QEMU`), which a
/// virtio 1.0-only device keeps.
const PCI_SUBDEVICE_ID_QEMU: u16 = 0x1100;

/// The part the three types share: their device, once realized.
#[derive(Default)]
struct InputPci {
    device: OnceLock<Arc<VirtioInput>>,
}

impl InputPci {
    /// QEMU's `virtio_input_device_realize` (with the HID type's instance_init).
    fn create(
        &self,
        ctx: &DeviceContext,
        kind: HidKind,
        wheel_axis: bool,
        serial: Option<String>,
    ) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
        let services = ctx.machine()?;
        let context = services.try_main_context().map_err(RealizeError::device)?;
        let device = VirtioInput::new(VirtioInputConf {
            kind,
            wheel_axis,
            serial,
            machine: Arc::downgrade(services),
            context,
        });
        device.register();
        let _ = self.device.set(device.clone());
        Ok(device)
    }

    /// The device goes: it stops taking input.
    fn unplug(&self) {
        if let Some(device) = self.device.get() {
            device.unplug();
        }
    }

    fn leds(&self) -> u8 {
        self.device.get().map_or(0, |d| d.leds())
    }
}

/// Defines one of QEMU's `virtio-*-pci` input types: its own properties (`fields`) and
/// how its `wheel-axis` reads.
macro_rules! virtio_input_pci {
    (
        $(#[$doc:meta])* $ty:ident, $name:literal, $kind:expr, $class:expr, $desc:literal,
        { $($fields:tt)* }, wheel_axis: |$dev:ident| $wheel:expr
    ) => {
        $(#[$doc])*
        #[derive(qom::Object)]
        #[qom(name = $name)]
        pub struct $ty {
            #[parent]
            parent: VirtioPciProxy,
            #[property(desc = "Serial number the driver reads (ID_SERIAL)")]
            serial: Prop<Option<String>>,
            $($fields)*
            input: InputPci,
        }

        type_init!($ty);

        impl $ty {
            /// The LEDs the guest set (bit 0 Num Lock, 1 Caps Lock, 2 Scroll Lock).
            pub fn leds(&self) -> u8 {
                self.input.leds()
            }
        }

        impl DeviceImpl for $ty {
            const CATEGORY: DeviceCategory = DeviceCategory::Input;
            const DESCRIPTION: Option<&'static str> = Some($desc);

            fn save_state(&self) -> Result<VmStateSection, VmStateError> {
                self.parent.save_virtio_state()
            }

            fn load_state(&self, state: &VmStateSection) -> Result<(), VmStateError> {
                self.parent.load_virtio_state(state)
            }

            fn unrealize(&self, ctx: &DeviceContext) {
                DeviceImpl::unrealize(&self.parent, ctx);
                self.input.unplug();
            }
        }

        impl PciDeviceImpl for $ty {
            const VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
            /// The virtio 1.0 device ID (the transport sets it, as for any modern device).
            const DEVICE_ID: u16 = 0x1040 + VIRTIO_ID_INPUT;
            const CLASS_ID: u16 = $class;
            const SUBSYSTEM_VENDOR_ID: u16 = PCI_VENDOR_ID_REDHAT_QUMRANET;
            const SUBSYSTEM_ID: u16 = PCI_SUBDEVICE_ID_QEMU;
            const INTERRUPT_PIN: u8 = 1;
        }

        impl VirtioPciImpl for $ty {
            const FORCE_VIRTIO_1: bool = true;

            fn create_virtio_device(&self, ctx: &DeviceContext) -> Result<Arc<dyn VirtioDevice>, RealizeError> {
                let $dev = self;
                self.input.create(ctx, $kind, $wheel, self.serial.get())
            }

            /// QEMU's `virtio-input-pci` has two vectors unless `vectors` says otherwise.
            fn default_vectors(&self, _device: &dyn VirtioDevice) -> u32 {
                2
            }
        }
    };
}

virtio_input_pci!(
    /// QEMU's `virtio-keyboard-pci`.
    VirtioKeyboardPci, "virtio-keyboard-pci", HidKind::Keyboard, PCI_CLASS_INPUT_KEYBOARD,
    "Virtio keyboard (PCI)", {}, wheel_axis: |_dev| false
);

virtio_input_pci!(
    /// QEMU's `virtio-mouse-pci`.
    VirtioMousePci, "virtio-mouse-pci", HidKind::Mouse, PCI_CLASS_INPUT_MOUSE,
    "Virtio mouse (PCI)",
    {
        #[property(name = "wheel-axis", default = true, desc = "The wheel as an axis (REL_WHEEL), not as buttons")]
        wheel_axis: Prop<bool>,
    },
    wheel_axis: |dev| dev.wheel_axis.get()
);

virtio_input_pci!(
    /// QEMU's `virtio-tablet-pci`.
    VirtioTabletPci, "virtio-tablet-pci", HidKind::Tablet, PCI_CLASS_INPUT_MOUSE,
    "Virtio tablet (PCI)",
    {
        #[property(name = "wheel-axis", default = true, desc = "The wheel as an axis (REL_WHEEL), not as buttons")]
        wheel_axis: Prop<bool>,
    },
    wheel_axis: |dev| dev.wheel_axis.get()
);
