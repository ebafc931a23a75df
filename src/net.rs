//! `-netdev` and `-nic` (QEMU's `net/net.c` option handling): option strings (or libvirt's
//! JSON) to the key-value pairs `::net::netdev_add` takes, and `-nic`'s backend plus card.

use serde_json::{Map, Value};

use crate::options::{split_opts, Located, OptionError};

/// NIC models `-nic model=` accepts, the default first (QEMU's on pc: e1000).
const NIC_MODELS: &[&str] = &["e1000", "virtio-net-pci"];

/// One JSON member as a QemuOpts value (`true` -> `on`, numbers as written).
fn json_value(v: &Value) -> Option<String> {
    match v {
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A JSON object's members as key-value pairs (`hostfwd` lists become repeated keys).
pub fn pairs_from_json(map: &Map<String, Value>) -> Result<Vec<(String, Option<String>)>, String> {
    let mut pairs = Vec::new();
    for (k, v) in map {
        match v {
            Value::Array(items) => {
                for item in items {
                    // QAPI's `String` wrapper: {"str": "tcp::2222-:22"}.
                    let text = item
                        .get("str")
                        .and_then(json_value)
                        .or_else(|| json_value(item))
                        .ok_or_else(|| {
                            format!("Invalid parameter type for '{k}', expected: string")
                        })?;
                    pairs.push((k.clone(), Some(text)));
                }
            }
            other => {
                let text = json_value(other)
                    .ok_or_else(|| format!("Invalid parameter type for '{k}', expected: string"))?;
                pairs.push((k.clone(), Some(text)));
            }
        }
    }
    Ok(pairs)
}

/// The pairs of one `-netdev` (QemuOpts with `type` implied, or JSON).
fn netdev_pairs(located: &Located) -> Result<Vec<(String, Option<String>)>, OptionError> {
    let text = located.value.trim_start();
    if text.starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|e| located.error(e.to_string()))?;
        let map = value
            .as_object()
            .ok_or_else(|| located.error("Invalid parameter type, expected: object"))?;
        return pairs_from_json(map).map_err(|e| located.error(e));
    }
    Ok(split_opts(&located.value, Some("type")))
}

/// QEMU's `net_client_init` for one `-netdev`; `-netdev help` lists the types.
pub fn netdev_option(located: &Located) -> Result<Option<String>, OptionError> {
    let pairs = netdev_pairs(located)?;
    if matches!(pairs.first(), Some((k, Some(v))) if k == "type" && (v == "help" || v == "?")) {
        return Ok(Some(
            "Available netdev backend types:\ntap\nuser\n".to_string(),
        ));
    }
    ::net::netdev_add(&pairs).map_err(|e| located.error(e.to_string()))?;
    Ok(None)
}

/// QEMU's `net_param_nic` for one `-nic` (`index` counts them): the backend
/// `__org.qemu.nicN` and the card that uses it, as a `-device` to create with the others.
/// `-nic none` makes neither.
pub fn nic_option(located: &Located, index: usize) -> Result<NicOption, OptionError> {
    let items = split_opts(&located.value, Some("type"));
    let kind = items
        .first()
        .and_then(|(k, v)| (k == "type").then(|| v.clone()).flatten())
        .ok_or_else(|| located.error("Parameter 'type' is missing"))?;
    if kind == "none" {
        return Ok(NicOption::None);
    }
    if kind == "help" || kind == "?" {
        return Ok(NicOption::Help(
            "Available netdev backend types:\ntap\nuser\n".into(),
        ));
    }
    let mut model = NIC_MODELS[0].to_string();
    let mut mac = None;
    let id = format!("__org.qemu.nic{index}");
    let mut backend = vec![
        ("type".to_string(), Some(kind)),
        ("id".to_string(), Some(id.clone())),
    ];
    for (k, v) in items.into_iter().skip(1) {
        match k.as_str() {
            "model" => model = v.unwrap_or_default(),
            "mac" => mac = v,
            "id" => return Err(located.error("Invalid parameter 'id'")),
            _ => backend.push((k, v)),
        }
    }
    if model == "help" || model == "?" {
        return Ok(NicOption::Help(format!(
            "Available NIC models:\n{}\n",
            NIC_MODELS.join("\n")
        )));
    }
    // QEMU's short name for the virtio card (`-nic user,model=virtio`).
    if model == "virtio" {
        model = "virtio-net-pci".into();
    }
    if !NIC_MODELS.contains(&model.as_str()) {
        return Err(located.error(format!("Unsupported NIC model: {model}")));
    }
    ::net::netdev_add(&backend).map_err(|e| located.error(e.to_string()))?;
    let mut device = format!("{model},netdev={id}");
    if let Some(mac) = mac {
        device.push_str(&format!(",mac={mac}"));
    }
    Ok(NicOption::Device(Located {
        option: located.option,
        value: device,
    }))
}

/// What one `-nic` asks for.
pub enum NicOption {
    /// `-nic none`.
    None,
    /// `help` text to print.
    Help(String),
    /// The card to create.
    Device(Located),
}

/// QMP `netdev_add`: the arguments are `-netdev`'s JSON form.
pub fn qmp_netdev_add(args: &Map<String, Value>) -> Result<(), String> {
    let pairs = pairs_from_json(args)?;
    ::net::netdev_add(&pairs).map_err(|e| e.to_string())
}

/// What went wrong in a network monitor command.
#[derive(Debug)]
pub enum NetCommandError {
    /// No such net client (QMP class `DeviceNotFound`).
    NotFound(String),
    /// Anything else (QMP class `GenericError`).
    Other(String),
}

/// QMP `netdev_del`.
pub fn qmp_netdev_del(id: &str) -> Result<(), NetCommandError> {
    if ::net::remove_netdev(id) {
        Ok(())
    } else {
        Err(NetCommandError::NotFound(id.to_string()))
    }
}

/// QMP `set_link` (QEMU's `qmp_set_link`): `name` is a NIC or the backend of one.
pub fn qmp_set_link(name: &str, up: bool) -> Result<(), NetCommandError> {
    let nic =
        hw::net::nic::find_nic(name).ok_or_else(|| NetCommandError::NotFound(name.to_string()))?;
    nic.set_link(up);
    Ok(())
}

/// QMP `query-rx-filter` (QEMU's `qmp_query_rx_filter`): every NIC, or the one named.
pub fn qmp_query_rx_filter(name: Option<&str>) -> Result<Vec<Value>, NetCommandError> {
    let nics = hw::net::nic::nics();
    match name {
        // Cards that do not report their filter are left out of the whole list.
        None => Ok(nics.iter().filter_map(|n| n.rx_filter_info()).collect()),
        Some(name) => {
            if let Some(nic) = nics.iter().find(|n| n.name() == name) {
                return nic.rx_filter_info().map(|info| vec![info]).ok_or_else(|| {
                    NetCommandError::Other(format!(
                        "net client({name}) doesn't support rx-filter querying"
                    ))
                });
            }
            if ::net::find_netdev(name).is_some() {
                return Err(NetCommandError::Other(format!(
                    "net client({name}) isn't a NIC"
                )));
            }
            Err(NetCommandError::Other(format!(
                "invalid net client name: {name}"
            )))
        }
    }
}

/// HMP `info network` (QEMU's `hmp_info_network`): each NIC with its backend under it,
/// then backends no NIC uses.
pub fn info_network() -> String {
    let mut out = String::new();
    let backend_line = |d: &std::sync::Arc<dyn ::net::Netdev>| {
        let info = d.info();
        format!(
            "{}: index=0,type={},{}\n",
            info.id,
            info.kind.name(),
            info.info_str
        )
    };
    let nics = hw::net::nic::nics();
    for nic in &nics {
        out.push_str(&format!(
            "{}: index=0,type=nic,model={},macaddr={}{}\n",
            nic.name(),
            nic.model(),
            hw::net::nic::format_mac(&nic.mac()),
            if nic.link_up() { "" } else { ",link=down" }
        ));
        out.push_str(" \\ ");
        out.push_str(&backend_line(nic.netdev()));
    }
    for (d, peer) in ::net::netdevs() {
        if peer.is_none() {
            out.push_str(&backend_line(&d));
        }
    }
    out
}

/// QMP `announce-self` (QEMU's `qmp_announce_self`): `rounds` announcements by every NIC
/// (or those in `interfaces`), the first now, the next after `initial` ms, each gap `step`
/// ms longer up to `max`.
pub fn qmp_announce_self(
    initial: u64,
    max: u64,
    rounds: u64,
    step: u64,
    interfaces: Option<Vec<String>>,
) {
    let nics: Vec<_> = hw::net::nic::nics()
        .into_iter()
        .filter(|n| {
            interfaces
                .as_ref()
                .is_none_or(|names| names.iter().any(|i| i == n.name()))
        })
        .collect();
    if rounds == 0 || nics.is_empty() {
        return;
    }
    for nic in &nics {
        nic.announce();
    }
    let spawned = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let mut delay = initial;
            for _ in 1..rounds {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                for nic in &nics {
                    nic.announce();
                }
                delay = (delay + step).min(max);
            }
        });
    if let Err(e) = spawned {
        qom::error_report!("warning: announce-self: cannot start its timer thread: {e}");
    }
}
