//! `query-qmp-schema` (QEMU's `qapi/introspect.py` output, `SchemaInfo` in
//! `qapi/introspect.json`): the commands and events of qomvm's registry
//! ([`QmpCommand`] table, [`EVENTS`](super::qapi::EVENTS)) and every type their arguments
//! use, in QAPI's introspection form.
//!
//! Type names are not masked (QEMU numbers them unless built with `-u`): clients such as
//! libvirt follow `arg-type` references by name and never depend on the spelling. Each
//! command's and event's arguments are an implicit object type `q_obj_NAME-arg`, as QAPI
//! names them; none is `"0"`, the empty object. Return types are not declared in the
//! registry, so every command's `ret-type` is the builtin `any`, which QAPI allows for
//! any JSON value. Members a command checks itself ([`Arg::rest`], the branches of
//! `object-add`'s union) are not described: the schema shows what the registry checks.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::monitor::qapi::{Arg, ArgType, QapiEnum, QmpCommand, QmpEvent};

/// The empty object type, as QAPI names it.
const EMPTY_OBJECT: &str = "0";

/// Collects the schema's entries: each type once, by name.
#[derive(Default)]
struct Schema {
    entities: Vec<Value>,
    types: BTreeMap<String, Value>,
}

impl Schema {
    /// The name of `ty`, adding its definition (and its element's) if new.
    fn type_name(&mut self, ty: ArgType) -> String {
        match ty {
            ArgType::Str => self.builtin("str", "string"),
            ArgType::Bool => self.builtin("bool", "boolean"),
            ArgType::Int => self.builtin("int", "int"),
            ArgType::Any => self.builtin("any", "value"),
            ArgType::Enum(e) => self.enum_type(e),
            ArgType::EnumList(e) => {
                let element = self.enum_type(e);
                let name = format!("[{element}]");
                self.types.entry(name.clone()).or_insert_with(
                    || json!({"name": name, "meta-type": "array", "element-type": element}),
                );
                name
            }
        }
    }

    fn builtin(&mut self, name: &str, json_type: &str) -> String {
        self.types.entry(name.to_string()).or_insert_with(
            || json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
        );
        name.to_string()
    }

    fn enum_type(&mut self, e: &QapiEnum) -> String {
        self.types.entry(e.name.to_string()).or_insert_with(|| {
            let members: Vec<Value> = e.values.iter().map(|v| json!({"name": v})).collect();
            json!({"name": e.name, "meta-type": "enum", "values": e.values, "members": members})
        });
        e.name.to_string()
    }

    /// The implicit argument type of `owner` (a command or event), or the empty object.
    fn args_type(&mut self, owner: &str, args: &[Arg]) -> String {
        let members: Vec<Value> = args
            .iter()
            .filter(|a| !a.is_rest())
            .map(|a| {
                let ty = self.type_name(a.ty);
                if a.required {
                    json!({"name": a.name, "type": ty})
                } else {
                    json!({"name": a.name, "type": ty, "default": null})
                }
            })
            .collect();
        if members.is_empty() {
            self.types.entry(EMPTY_OBJECT.to_string()).or_insert_with(
                || json!({"name": EMPTY_OBJECT, "meta-type": "object", "members": []}),
            );
            return EMPTY_OBJECT.to_string();
        }
        let name = format!("q_obj_{owner}-arg");
        self.types.insert(
            name.clone(),
            json!({"name": name, "meta-type": "object", "members": members}),
        );
        name
    }
}

/// The schema of `commands` and `events`: commands, then events, then the types.
pub fn introspect(commands: &[QmpCommand], events: &[QmpEvent]) -> Value {
    let mut schema = Schema::default();
    let ret = schema.type_name(ArgType::Any);
    for c in commands {
        let arg_type = schema.args_type(c.name, c.args);
        schema.entities.push(json!({
            "name": c.name,
            "meta-type": "command",
            "arg-type": arg_type,
            "ret-type": ret,
        }));
    }
    for e in events {
        let arg_type = schema.args_type(e.name, e.data);
        schema
            .entities
            .push(json!({"name": e.name, "meta-type": "event", "arg-type": arg_type}));
    }
    let Schema {
        mut entities,
        types,
    } = schema;
    entities.extend(types.into_values());
    Value::Array(entities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::qapi::{QmpError, EVENTS};

    const COLOR: QapiEnum = QapiEnum {
        name: "Color",
        values: &["red", "blue"],
    };

    fn find<'a>(schema: &'a Value, name: &str) -> &'a Value {
        schema
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} is in the schema"))
    }

    #[test]
    fn commands_reference_their_argument_types_by_name() {
        const PAINT_ARGS: &[Arg] = &[
            Arg::required("color", ArgType::Enum(&COLOR)),
            Arg::optional("layers", ArgType::Int),
            Arg::rest(),
        ];
        let commands = [
            QmpCommand {
                name: "paint",
                args: PAINT_ARGS,
                run: |_, _| Err(QmpError::BadInput(String::new())),
            },
            QmpCommand {
                name: "wipe",
                args: &[],
                run: |_, _| Err(QmpError::BadInput(String::new())),
            },
        ];
        let schema = introspect(&commands, EVENTS);
        let paint = find(&schema, "paint");
        assert_eq!(paint["meta-type"], "command");
        let args = find(&schema, paint["arg-type"].as_str().unwrap());
        assert_eq!(
            args["members"],
            json!([
                {"name": "color", "type": "Color"},
                {"name": "layers", "type": "int", "default": null},
            ])
        );
        assert_eq!(find(&schema, "Color")["values"], json!(["red", "blue"]));
        assert_eq!(find(&schema, "int")["json-type"], "int");
        assert_eq!(find(&schema, "wipe")["arg-type"], EMPTY_OBJECT);
        assert_eq!(find(&schema, EMPTY_OBJECT)["members"], json!([]));
    }

    #[test]
    fn events_and_every_referenced_type_are_described() {
        let schema = introspect(&[], EVENTS);
        let shutdown = find(&schema, "SHUTDOWN");
        assert_eq!(shutdown["meta-type"], "event");
        let data = find(&schema, shutdown["arg-type"].as_str().unwrap());
        assert_eq!(data["members"][1]["type"], "ShutdownCause");
        // Every type name an entity references is defined exactly once.
        let entries = schema.as_array().unwrap();
        for e in entries {
            let mut refs = Vec::new();
            for key in ["arg-type", "ret-type", "element-type"] {
                refs.extend(e[key].as_str());
            }
            for m in e["members"].as_array().into_iter().flatten() {
                refs.extend(m["type"].as_str());
            }
            for r in refs {
                assert_eq!(entries.iter().filter(|x| x["name"] == r).count(), 1, "{r}");
            }
        }
    }
}
