//! The `none` machine (QEMU's `hw/core/null-machine.c`): no devices, no RAM unless `-m` asks
//! for it, at most one CPU. Useful to inspect types and accelerators without a board.

use qom::type_init;

use crate::core::cpu::machine_create_cpus;
use crate::core::machine::{MachineError, MachineImpl, MachineState};

/// The `none` machine.
#[derive(qom::Object)]
#[qom(name = "none-machine")]
pub struct NullMachine {
    #[parent]
    parent: MachineState,
}

type_init!(NullMachine);

impl MachineImpl for NullMachine {
    const DESC: &'static str = "empty machine";
    const DEFAULT_RAM_SIZE: u64 = 0;

    /// QEMU's `machine_none_init`: RAM at address 0 if `-m` asks for it, one CPU if `-cpu`
    /// names one.
    fn init(&self) -> Result<(), MachineError> {
        if self.ram_size() > 0 {
            self.add_ram(0, self.ram_size())?;
        }
        if self.cpu_type().is_some() {
            machine_create_cpus(self).map_err(MachineError::board)?;
        }
        Ok(())
    }
}
