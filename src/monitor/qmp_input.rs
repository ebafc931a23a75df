//! QMP's input commands (QEMU's `ui/input.c` `qmp_input_send_event`, `ui/input-legacy.c`
//! `qmp_send_key`): keys and pointer events as if a user interface sent them, which is how
//! libvirt's `virsh send-key` and test harnesses type into a guest.

use std::time::Duration;

use hw::core::input::{button, qcode_to_qnum, InputHandlers, ABS_MAX};
use serde_json::{json, Map, Value};

use crate::monitor::qapi::{CommandCtx, QmpError};

/// `send-key`'s default `hold-time`, in milliseconds.
const DEFAULT_HOLD_MS: i64 = 100;
/// The longest `hold-time` qomvm waits (the command blocks its monitor meanwhile).
const MAX_HOLD_MS: i64 = 10_000;

fn bad(message: String) -> QmpError {
    QmpError::BadInput(message)
}

fn member<'a>(obj: &'a Value, name: &str, context: &str) -> Result<&'a Value, QmpError> {
    obj.get(name)
        .ok_or_else(|| QmpError::MissingParameter(format!("{context}{name}")))
}

fn bool_member(obj: &Value, name: &str, context: &str) -> Result<bool, QmpError> {
    member(obj, name, context)?
        .as_bool()
        .ok_or_else(|| QmpError::InvalidParameterType {
            name: format!("{context}{name}"),
            expected: "boolean",
        })
}

/// A `KeyValue`: `{"type": "number", "data": N}` or `{"type": "qcode", "data": NAME}`.
fn key_number(key: &Value, context: &str) -> Result<u16, QmpError> {
    let kind = member(key, "type", context)?.as_str().unwrap_or_default();
    let data = member(key, "data", context)?;
    match kind {
        "number" => data
            .as_i64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| QmpError::InvalidParameterType {
                name: format!("{context}data"),
                expected: "integer",
            }),
        "qcode" => {
            let name = data.as_str().unwrap_or_default();
            qcode_to_qnum(name).ok_or_else(|| {
                bad(format!(
                    "Parameter '{context}data' does not accept value '{name}'"
                ))
            })
        }
        other => Err(bad(format!(
            "Parameter '{context}type' does not accept value '{other}'"
        ))),
    }
}

/// Pointer events of one `input-send-event`, applied together at its end (QEMU's sync).
#[derive(Default)]
struct PointerBatch {
    rel: Option<(i32, i32)>,
    abs: (Option<u16>, Option<u16>),
    dz: i32,
    buttons: Option<u8>,
}

impl PointerBatch {
    fn send(self, input: &InputHandlers) {
        let (held, x, y) = input.pointer_state();
        let buttons = self.buttons.unwrap_or(held);
        let changed = self.buttons.is_some() || self.dz != 0;
        if let Some((dx, dy)) = self.rel {
            input.send_motion(dx, dy, self.dz, buttons);
        }
        if self.abs != (None, None) || (changed && input.is_absolute()) {
            input.send_position(
                self.abs.0.unwrap_or(x),
                self.abs.1.unwrap_or(y),
                self.dz,
                buttons,
            );
        } else if changed && self.rel.is_none() {
            input.send_motion(0, 0, self.dz, buttons);
        }
    }
}

/// QEMU's `qmp_input_send_event`: the events in order, keys at once, pointer events
/// together at the end. `device` and `head` pick a console; qomvm has one.
pub fn input_send_event(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    if let Some(id) = args.get("device").and_then(Value::as_str) {
        crate::monitor::qmp_device::find_device(&ctx.vm.machine, id)?;
    }
    if crate::monitor::qapi::int_arg(args, "head")?.is_some_and(|h| h != 0) {
        return Err(bad("Input is not available on this console head".into()));
    }
    let events = args
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| QmpError::InvalidParameterType {
            name: "events".into(),
            expected: "array",
        })?;
    // Check everything before anything is sent.
    let mut keys = Vec::new();
    let mut batch = PointerBatch::default();
    let (mut buttons, _, _) = ctx.vm.machine_state().services().input().pointer_state();
    for (i, ev) in events.iter().enumerate() {
        let at = format!("events[{i}].");
        let kind = member(ev, "type", &at)?.as_str().unwrap_or_default();
        let data = member(ev, "data", &at)?;
        let at = format!("{at}data.");
        match kind {
            "key" => keys.push((
                key_number(member(data, "key", &at)?, &format!("{at}key."))?,
                bool_member(data, "down", &at)?,
            )),
            "btn" => {
                let down = bool_member(data, "down", &at)?;
                let name = member(data, "button", &at)?.as_str().unwrap_or_default();
                let bit = match name {
                    "left" => button::LEFT,
                    "middle" => button::MIDDLE,
                    "right" => button::RIGHT,
                    "wheel-up" | "wheel-down" => {
                        if down {
                            batch.dz += if name == "wheel-up" { -1 } else { 1 };
                        }
                        continue;
                    }
                    _ => {
                        return Err(bad(format!(
                            "Parameter '{at}button' does not accept value '{name}'"
                        )))
                    }
                };
                if down {
                    buttons |= bit;
                } else {
                    buttons &= !bit;
                }
                batch.buttons = Some(buttons);
            }
            "rel" | "abs" => {
                let axis = member(data, "axis", &at)?.as_str().unwrap_or_default();
                let value = member(data, "value", &at)?.as_i64().ok_or_else(|| {
                    QmpError::InvalidParameterType {
                        name: format!("{at}value"),
                        expected: "integer",
                    }
                })?;
                if !matches!(axis, "x" | "y") {
                    return Err(bad(format!(
                        "Parameter '{at}axis' does not accept value '{axis}'"
                    )));
                }
                if kind == "rel" {
                    let v = value.clamp(i32::MIN.into(), i32::MAX.into()) as i32;
                    let (dx, dy) = batch.rel.get_or_insert((0, 0));
                    if axis == "x" {
                        *dx = dx.saturating_add(v);
                    } else {
                        *dy = dy.saturating_add(v);
                    }
                } else {
                    let v = value.clamp(0, ABS_MAX.into()) as u16;
                    if axis == "x" {
                        batch.abs.0 = Some(v);
                    } else {
                        batch.abs.1 = Some(v);
                    }
                }
            }
            other => {
                return Err(bad(format!(
                    "Parameter '{}type' does not accept value '{other}'",
                    &at[..at.len() - 5]
                )))
            }
        }
    }
    let input = ctx.vm.machine_state().services().input();
    for (qnum, down) in keys {
        input.send_key(qnum, down);
    }
    batch.send(input);
    Ok(json!({}))
}

/// QEMU's `qmp_send_key`: the keys pressed in order, held `hold-time` milliseconds, then
/// released in reverse order.
pub fn send_key(ctx: &CommandCtx, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let keys = args.get("keys").and_then(Value::as_array).ok_or_else(|| {
        QmpError::InvalidParameterType {
            name: "keys".into(),
            expected: "array",
        }
    })?;
    let qnums = keys
        .iter()
        .enumerate()
        .map(|(i, k)| key_number(k, &format!("keys[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let hold = crate::monitor::qapi::int_arg(args, "hold-time")?.unwrap_or(DEFAULT_HOLD_MS);
    let input = ctx.vm.machine_state().services().input();
    for &q in &qnums {
        input.send_key(q, true);
    }
    std::thread::sleep(Duration::from_millis(hold.clamp(0, MAX_HOLD_MS) as u64));
    for &q in qnums.iter().rev() {
        input.send_key(q, false);
    }
    Ok(json!({}))
}
