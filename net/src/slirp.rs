//! `-netdev user` (QEMU's `net/slirp.c`): user-mode networking through libslirp.
//!
//! The guest sees a virtual network (10.0.2.0/24 by default) with a gateway that is the
//! host (10.0.2.2), a DNS forwarder (10.0.2.3) and a DHCP server handing out 10.0.2.15
//! onwards; its connections become ordinary host sockets, and `hostfwd=` rules forward
//! host ports into the guest. Frames carry no vnet header.
//!
//! - [`net_init_slirp`]: the backend, from `-netdev user,...` options
//!   ([`UserConfig::parse`], QEMU's checks and words);
//! - [`hostfwd_add`], [`hostfwd_remove`]: HMP's `hostfwd_add`/`hostfwd_remove`;
//! - [`usernet_info`]: HMP's `info usernet`.
//!
//! Each stack runs on its own thread (`stack.rs`): libslirp is single-threaded, and QEMU
//! runs it from its main loop.

mod config;
mod stack;

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

pub use config::{inet_aton, Hostfwd, UserConfig};
pub use stack::{SlirpQueue, QUEUE_LEN};

use crate::{find_netdev, NetError, NetQueue, Netdev, NetdevInfo, NetdevKind};

/// The largest frame slirp hands the guest: libslirp's default MTU (`IF_MTU_DEFAULT`,
/// 1500, which qomvm does not change) plus the 14-byte Ethernet header; slirp sends no
/// VLAN tags and no frame check sequence.
pub const MAX_FRAME_LEN: usize = 1500 + 14;

/// A `-netdev user` backend (QEMU's `SlirpState`).
pub struct SlirpNetdev {
    id: String,
    config: UserConfig,
    stack: stack::Stack,
}

impl SlirpNetdev {
    /// Its options, checked.
    pub fn config(&self) -> &UserConfig {
        &self.config
    }

    /// Frames dropped so far because a side did not keep up: (towards the guest, from
    /// the guest).
    pub fn dropped(&self) -> (u64, u64) {
        self.stack.dropped()
    }

    /// The queue pair as its concrete type.
    pub fn queue(&self) -> Arc<SlirpQueue> {
        self.stack.queue()
    }

    /// `info usernet`'s table for this stack (`slirp_connection_info`).
    pub fn connection_info(&self) -> String {
        self.stack.connection_info()
    }
}

impl Netdev for SlirpNetdev {
    fn info(&self) -> NetdevInfo {
        NetdevInfo {
            id: self.id.clone(),
            kind: NetdevKind::User,
            info_str: self.config.info_str(),
        }
    }

    fn queues(&self) -> Vec<Arc<dyn NetQueue>> {
        vec![self.stack.queue() as Arc<dyn NetQueue>]
    }

    fn max_frame_len(&self) -> usize {
        MAX_FRAME_LEN
    }

    fn cleanup(&self) {
        self.stack.stop();
        STACKS
            .lock()
            .retain(|s| s.upgrade().is_some_and(|s| !std::ptr::eq(&*s, self)));
    }
}

/// Every user-mode stack, in creation order (QEMU's `slirp_stacks`).
static STACKS: Mutex<Vec<Weak<SlirpNetdev>>> = Mutex::new(Vec::new());

/// QEMU's `net_init_slirp`: checks the options (`type` and `id` taken out), starts the
/// stack and applies its `hostfwd=` rules.
pub fn net_init_slirp(
    id: &str,
    opts: &[(String, Option<String>)],
) -> Result<Arc<dyn Netdev>, NetError> {
    Ok(new_slirp(id, opts)?)
}

/// [`net_init_slirp`] with the concrete type.
pub fn new_slirp(
    id: &str,
    opts: &[(String, Option<String>)],
) -> Result<Arc<SlirpNetdev>, NetError> {
    let config = UserConfig::parse(opts)?;
    // Thread names are cut at 15 bytes; the id is what tells stacks apart.
    let stack = stack::Stack::start(&format!("slirp {id}"), config.clone())?;
    let netdev = Arc::new(SlirpNetdev {
        id: id.to_string(),
        config,
        stack,
    });
    let mut stacks = STACKS.lock();
    stacks.retain(|s| s.strong_count() > 0);
    stacks.push(Arc::downgrade(&netdev));
    Ok(netdev)
}

/// QEMU's `slirp_lookup`: the stack `id` names, or the first one; the monitor's line
/// when there is none.
fn slirp_lookup(id: Option<&str>) -> Result<Arc<SlirpNetdev>, String> {
    let stacks: Vec<Arc<SlirpNetdev>> = STACKS.lock().iter().filter_map(Weak::upgrade).collect();
    match id {
        Some(id) => match stacks.into_iter().find(|s| s.id == id) {
            Some(s) => Ok(s),
            None if find_netdev(id).is_some() => Err("invalid device specified".to_string()),
            None => Err(format!("unrecognized netdev id '{id}'")),
        },
        None => stacks
            .into_iter()
            .next()
            .ok_or_else(|| "user mode network stack not in use".to_string()),
    }
}

/// HMP `hostfwd_add [netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`:
/// `Err` holds the line the monitor prints.
pub fn hostfwd_add(netdev_id: Option<&str>, rule: &str) -> Result<(), String> {
    let s = slirp_lookup(netdev_id)?;
    let fwd = Hostfwd::parse(rule).map_err(|e| e.to_string())?;
    if s.stack.add_hostfwd(fwd) {
        Ok(())
    } else {
        Err(format!("Could not set up host forwarding rule '{rule}'"))
    }
}

/// HMP `hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport`: the line the monitor
/// prints (`host forwarding rule for RULE removed` or `... not found`); `Err` for an
/// unknown stack or QEMU's `invalid format`.
pub fn hostfwd_remove(netdev_id: Option<&str>, rule: &str) -> Result<String, String> {
    let s = slirp_lookup(netdev_id)?;
    let (udp, addr, port) =
        config::parse_hostfwd_remove(rule).ok_or_else(|| "invalid format".to_string())?;
    let found = s.stack.remove_hostfwd(udp, addr, port);
    Ok(format!(
        "host forwarding rule for {rule} {}",
        if found { "removed" } else { "not found" }
    ))
}

/// HMP `info usernet`: each stack's connections, as QEMU prints them (a `-netdev` is on
/// no hub: `Hub -1 (ID):`).
pub fn usernet_info() -> String {
    let stacks: Vec<Arc<SlirpNetdev>> = STACKS.lock().iter().filter_map(Weak::upgrade).collect();
    stacks
        .iter()
        .map(|s| format!("Hub -1 ({}):\n{}", s.id, s.connection_info()))
        .collect()
}
