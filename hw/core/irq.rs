//! Interrupt lines (QEMU's `qemu_irq`, `hw/core/irq.c`): a device raises and lowers a line
//! without knowing where it goes; the board connects lines to the interrupt controller
//! (with KVM, the in-kernel PIC and IOAPIC through `KVM_IRQ_LINE`).

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::core::accel_ops::AccelOpsRef;
use crate::core::services::MachineServices;

/// Where a line's level changes go: an interrupt controller's input pins.
pub trait IrqHandler: Send + Sync {
    /// Sets input `n` to `level`.
    fn set_irq(&self, n: u32, level: bool);
}

/// One interrupt line: input `n` of a handler, or nothing.
#[derive(Clone, Default)]
pub struct IrqLine {
    target: Option<(Arc<dyn IrqHandler>, u32)>,
}

impl IrqLine {
    /// Input `n` of `handler`.
    pub fn new(handler: Arc<dyn IrqHandler>, n: u32) -> Self {
        IrqLine {
            target: Some((handler, n)),
        }
    }

    /// A line connected to nothing (QEMU's NULL `qemu_irq`): changes are dropped.
    pub fn disconnected() -> Self {
        IrqLine { target: None }
    }

    /// Whether the line goes anywhere.
    pub fn is_connected(&self) -> bool {
        self.target.is_some()
    }

    /// Sets the level (QEMU's `qemu_set_irq`).
    #[inline]
    pub fn set(&self, level: bool) {
        if let Some((handler, n)) = &self.target {
            handler.set_irq(*n, level);
        }
    }

    /// Raises the line.
    pub fn raise(&self) {
        self.set(true);
    }

    /// Lowers the line.
    pub fn lower(&self) {
        self.set(false);
    }

    /// Raises then lowers the line (an edge).
    pub fn pulse(&self) {
        self.set(true);
        self.set(false);
    }
}

impl fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some((_, n)) => write!(f, "IrqLine({n})"),
            None => f.write_str("IrqLine(disconnected)"),
        }
    }
}

/// Routes lines to the accelerator's interrupt controller (GSI `n`), as a board's
/// `gsi_state` does; a machine without an accelerator drops them. The accelerator is read
/// without a lock on every level change, and without keeping the machine alive.
pub struct GsiRouter {
    accel: Arc<OnceLock<AccelOpsRef>>,
}

impl GsiRouter {
    /// A router for the accelerator of the machine `services` belong to.
    pub fn new(services: &MachineServices) -> Arc<Self> {
        Arc::new(GsiRouter {
            accel: services.vm().accel_slot(),
        })
    }
}

impl IrqHandler for GsiRouter {
    #[inline]
    fn set_irq(&self, n: u32, level: bool) {
        if let Some(ops) = self.accel.get() {
            ops.set_irq(n, level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Pins(Mutex<Vec<(u32, bool)>>);

    impl IrqHandler for Pins {
        fn set_irq(&self, n: u32, level: bool) {
            self.0.lock().push((n, level));
        }
    }

    #[test]
    fn lines_reach_their_pin_and_disconnected_ones_drop() {
        let pins = Arc::new(Pins::default());
        let line = IrqLine::new(pins.clone(), 4);
        line.pulse();
        line.raise();
        IrqLine::disconnected().raise();
        assert_eq!(*pins.0.lock(), [(4, true), (4, false), (4, true)]);
    }
}
