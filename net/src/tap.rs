//! `-netdev tap` (QEMU's `net/tap.c`, `net/tap-linux.c`).

use std::sync::Arc;

use crate::{NetError, Netdev};

/// QEMU's `net_init_tap`.
pub fn net_init_tap(
    _id: &str,
    _opts: &[(String, Option<String>)],
) -> Result<Arc<dyn Netdev>, NetError> {
    Err(NetError::invalid("tap networking is not built yet"))
}
