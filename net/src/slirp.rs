//! `-netdev user` (QEMU's `net/slirp.c`), through libslirp.

use std::sync::Arc;

use crate::{NetError, Netdev};

/// QEMU's `net_init_slirp`.
pub fn net_init_slirp(
    _id: &str,
    _opts: &[(String, Option<String>)],
) -> Result<Arc<dyn Netdev>, NetError> {
    Err(NetError::invalid("user networking is not built yet"))
}
