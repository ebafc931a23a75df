//! `-netdev` and `-nic` (QEMU's `net/net.c` option handling): option strings (or libvirt's
//! JSON) to the key-value pairs `::net::netdev_add` takes, and `-nic`'s backend plus card.

use serde_json::{Map, Value};

use crate::options::{split_opts, Located, OptionError};

/// NIC models `-nic model=` accepts (QEMU's `pci_nic_models` that qomvm has); without
/// `model=` a card is the machine's `default_nic`.
const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82544gc",
    "e1000-82545em",
    "rtl8139",
    "virtio-net-pci",
];

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
/// `-nic none` makes neither. `default_model` is the machine's `default_nic`.
pub fn nic_option(
    located: &Located,
    index: usize,
    default_model: &str,
) -> Result<NicOption, OptionError> {
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
    let mut model = default_model.to_string();
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

/// What the `-net` options ask for together (QEMU's legacy "hub" networking): cards to
/// create as `-device`s, or `help` text.
pub enum NetOptions {
    /// `help` text to print.
    Help(String),
    /// The cards, their backends already added.
    Devices(Vec<Located>),
}

/// One `key[=value]` of an option string.
type OptPair = (String, Option<String>);

/// One `-net nic`: the card's `-device` text, and whether it names its own backend.
struct LegacyNic {
    located: Located,
    device: String,
    netdev: Option<String>,
}

/// QEMU's `net_client_init` for the `-net` options. `-net nic` makes a card (`model=`,
/// the machine's `default_nic` by default, `macaddr=`, `netdev=`, `name=`/`id=`, `addr=`, `vectors=`); `-net
/// user|tap,...` makes a backend; `-net none` nothing. QEMU joins the cards and backends
/// without `netdev=` through hub 0; qomvm has no hubs, so it connects one card to one
/// backend and refuses more (`-netdev` with `-device` or `-nic` give any number).
pub fn net_options(nets: &[Located], default_model: &str) -> Result<NetOptions, OptionError> {
    let mut cards: Vec<LegacyNic> = Vec::new();
    let mut backends: Vec<(Located, Vec<OptPair>)> = Vec::new();
    for located in nets {
        let items = split_opts(&located.value, Some("type"));
        let kind = items
            .first()
            .and_then(|(k, v)| (k == "type").then(|| v.clone()).flatten())
            .ok_or_else(|| located.error("Parameter 'type' is missing"))?;
        if items.iter().any(|(k, _)| k == "vlan") {
            // Gone from QEMU since 3.0: hubs are numbered by `-net` no more.
            return Err(located.error("Invalid parameter 'vlan'"));
        }
        match kind.as_str() {
            "none" => {}
            "help" | "?" => {
                return Ok(NetOptions::Help(
                    "Available netdev backend types:\nnic\ntap\nuser\n".into(),
                ))
            }
            "nic" => cards.push(legacy_nic(located, &items, default_model)?),
            "user" | "tap" => backends.push((located.clone(), items)),
            other => {
                return Err(located.error(format!(
                    "Parameter 'type' expects a net backend type (maybe it is not compiled into this binary): {other}"
                )))
            }
        }
    }
    let hub_cards: Vec<&LegacyNic> = cards.iter().filter(|c| c.netdev.is_none()).collect();
    let no_hubs = |l: &Located| {
        l.error("qomvm has no network hubs: -net connects one -net nic to one -net user or tap; use -netdev with -device or -nic for more")
    };
    if let Some(second) = backends.get(1) {
        return Err(no_hubs(&second.0));
    }
    if let Some(second) = hub_cards.get(1) {
        return Err(no_hubs(&second.located));
    }
    let mut devices = Vec::new();
    match (hub_cards.first(), backends.first()) {
        (Some(card), Some((located, items))) => {
            let kind = items[0].1.clone().unwrap_or_default();
            let id = format!("{kind}.0");
            let mut pairs = vec![
                ("type".to_string(), Some(kind)),
                ("id".to_string(), Some(id.clone())),
            ];
            for (k, v) in items.iter().skip(1) {
                if k == "id" || k == "name" {
                    continue;
                }
                pairs.push((k.clone(), v.clone()));
            }
            ::net::netdev_add(&pairs).map_err(|e| located.error(e.to_string()))?;
            devices.push(Located {
                option: card.located.option,
                value: format!("{},netdev={id}", card.device),
            });
        }
        (Some(card), None) => {
            return Err(card.located.error(
                "nothing to connect this card to: add -net user or -net tap (qomvm has no network hubs)",
            ))
        }
        (None, Some((located, _))) => {
            // QEMU warns and runs the backend alone; a backend no card uses is refused
            // here, where it can only be a mistake.
            return Err(located.error("no -net nic to connect this backend to"));
        }
        (None, None) => {}
    }
    for card in cards.iter().filter(|c| c.netdev.is_some()) {
        let netdev = card.netdev.as_deref().unwrap_or_default();
        devices.push(Located {
            option: card.located.option,
            value: format!("{},netdev={netdev}", card.device),
        });
    }
    Ok(NetOptions::Devices(devices))
}

/// One `-net nic`'s card, as `-device` text without its backend.
fn legacy_nic(
    located: &Located,
    items: &[(String, Option<String>)],
    default_model: &str,
) -> Result<LegacyNic, OptionError> {
    let mut model = default_model.to_string();
    let mut props = Vec::new();
    let mut netdev = None;
    for (k, v) in items.iter().skip(1) {
        let v = v.clone().unwrap_or_default();
        match k.as_str() {
            "model" => model = v,
            "macaddr" => props.push(format!("mac={v}")),
            "netdev" => netdev = Some(v),
            "name" | "id" => props.push(format!("id={v}")),
            "addr" | "vectors" => props.push(format!("{k}={v}")),
            _ => return Err(located.error(format!("Invalid parameter '{k}'"))),
        }
    }
    if model == "virtio" {
        model = "virtio-net-pci".into();
    }
    if !NIC_MODELS.contains(&model.as_str()) {
        return Err(located.error(format!("Unsupported NIC model: {model}")));
    }
    let mut device = model;
    for p in props {
        device.push(',');
        device.push_str(&p);
    }
    Ok(LegacyNic {
        located: located.clone(),
        device,
        netdev,
    })
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
