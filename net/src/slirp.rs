//! `-netdev user` (QEMU's `net/slirp.c`), through libslirp.

mod config;

use std::sync::Arc;

pub use config::{inet_aton, parse_hostfwd_remove, Hostfwd, UserConfig};

use crate::{NetError, Netdev};

/// QEMU's `net_init_slirp`.
pub fn net_init_slirp(
    _id: &str,
    opts: &[(String, Option<String>)],
) -> Result<Arc<dyn Netdev>, NetError> {
    UserConfig::parse(opts)?;
    Err(NetError::invalid("user networking is not built yet"))
}
