//! `-object` and QMP's `object-add` (QEMU's `user_creatable_parse_str`,
//! `user_creatable_add_qapi` and the QAPI `ObjectOptions` checks): option text or JSON to a
//! user-creatable object at `/objects/<id>`, with QEMU's errors. The object model's part
//! (`qom::user_creatable_add_type`) creates, sets and completes the object.

use qom::object_interfaces::{is_user_creatable, user_creatable_types, ID_HINT};
use qom::{Object, ObjectRef, Property, PropertyKind, Value as QomValue};
use serde_json::{Map, Value};

use crate::options::{split_opts, Located, OptionError};

/// How the members came: QEMU words an unknown member differently for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `-object TYPE,id=ID,prop=value` (keyval: every value is text).
    Keyval,
    /// `-object '{...}'` or QMP's `object-add` (JSON values).
    Json,
}

/// A member's value as given.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberValue {
    /// keyval text.
    Text(String),
    /// A JSON value.
    Json(Value),
}

/// QAPI's `ObjectOptions`: the type, the id, the type's own members in order.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectOptions {
    /// `qom-type`.
    pub qom_type: String,
    /// `id`.
    pub id: String,
    /// The other members.
    pub members: Vec<(String, MemberValue)>,
    /// Where they came from.
    pub origin: Origin,
}

/// What `-object` asks for.
#[derive(Debug, PartialEq)]
pub enum ObjectRequest {
    /// A listing to print (`-object help`, `-object TYPE,help`).
    Help(String),
    /// An object to create.
    Add(ObjectOptions),
}

/// Member errors in QEMU's words (the visitors' messages).
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// keyval: a member the type does not have.
    #[error("Invalid parameter '{0}'")]
    Invalid(String),
    /// JSON: a member the type does not have.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// keyval: text that is not a number.
    #[error("Parameter '{name}' expects an int{bits} value")]
    NotInt {
        /// The member.
        name: String,
        /// Its width.
        bits: u8,
    },
    /// JSON: a value of the wrong type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    WrongType {
        /// The member.
        name: String,
        /// `integer`, `boolean`, `string`.
        expected: &'static str,
    },
}

/// QAPI's check of `qom-type`: only user-creatable types are values of `ObjectType`.
pub fn check_qom_type(qom_type: &str) -> Result<(), String> {
    if is_user_creatable(qom_type) {
        Ok(())
    } else {
        Err(format!(
            "Parameter 'qom-type' does not accept value '{qom_type}'"
        ))
    }
}

/// `-object help`: QEMU's `user_creatable_print_types`.
pub fn types_help() -> String {
    let mut out = String::from("List of user creatable objects:\n");
    for name in user_creatable_types() {
        out.push_str("  ");
        out.push_str(name);
        out.push('\n');
    }
    out
}

/// `-object TYPE,help`: the type's options, as `-device TYPE,help` prints them.
fn type_help(qom_type: &str) -> String {
    match qom::object_class_by_name(qom_type).filter(|_| is_user_creatable(qom_type)) {
        Some(class) => crate::help::device_properties(class),
        None => types_help(),
    }
}

/// The members of a JSON object as `ObjectOptions` (QMP's `object-add` arguments and
/// `-object '{...}'`).
pub fn options_from_json(map: &Map<String, Value>) -> Result<ObjectOptions, String> {
    let string = |key: &str| -> Result<String, String> {
        match map.get(key) {
            None => Err(format!("Parameter '{key}' is missing")),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!(
                "Invalid parameter type for '{key}', expected: string"
            )),
        }
    };
    let qom_type = string("qom-type")?;
    check_qom_type(&qom_type)?;
    let id = string("id")?;
    let members = map
        .iter()
        .filter(|(k, _)| *k != "qom-type" && *k != "id")
        .map(|(k, v)| (k.clone(), MemberValue::Json(v.clone())))
        .collect();
    Ok(ObjectOptions {
        qom_type,
        id,
        members,
        origin: Origin::Json,
    })
}

/// QEMU's `user_creatable_parse_str`: keyval text with `qom-type` implied, or JSON.
pub fn parse_str(text: &str) -> Result<ObjectRequest, String> {
    if text.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => options_from_json(&map).map(ObjectRequest::Add),
            Ok(_) => Err("Invalid parameter type, expected: object".to_string()),
            Err(e) => Err(format!("JSON parse error, {e}")),
        };
    }
    let mut qom_type = None;
    let mut id = None;
    let mut members = Vec::new();
    let mut help = false;
    for (key, value) in split_opts(text, Some("qom-type")) {
        match (key.as_str(), value) {
            ("help" | "?", None) => help = true,
            ("qom-type", Some(v)) if matches!(v.as_str(), "help" | "?") => help = true,
            ("qom-type", v) => qom_type = v,
            ("id", v) => id = v,
            (_, None) => return Err(format!("Expected '=' after parameter '{key}'")),
            (_, Some(v)) => {
                if members.iter().any(|(k, _)| *k == key) {
                    return Err(format!("Parameter '{key}' appears more than once"));
                }
                members.push((key, MemberValue::Text(v)))
            }
        }
    }
    if help {
        return Ok(ObjectRequest::Help(match &qom_type {
            Some(t) => type_help(t),
            None => types_help(),
        }));
    }
    let qom_type = qom_type.ok_or("Parameter 'qom-type' is missing")?;
    check_qom_type(&qom_type)?;
    let id = id.ok_or("Parameter 'id' is missing")?;
    Ok(ObjectRequest::Add(ObjectOptions {
        qom_type,
        id,
        members,
        origin: Origin::Keyval,
    }))
}

/// A JSON member to a property value (QEMU's QObject input visitor).
fn json_value(prop: &Property, v: &Value) -> Result<QomValue, qom::Error> {
    let wrong = |expected| {
        qom::Error::other(MemberError::WrongType {
            name: prop.name.to_string(),
            expected,
        })
    };
    let value = match prop.kind {
        PropertyKind::Bool => QomValue::Bool(v.as_bool().ok_or_else(|| wrong("boolean"))?),
        PropertyKind::Int(_) => QomValue::Int(v.as_i64().ok_or_else(|| wrong("integer"))?),
        PropertyKind::Uint(_) | PropertyKind::Size => {
            QomValue::Uint(v.as_u64().ok_or_else(|| wrong("integer"))?)
        }
        PropertyKind::Str
        | PropertyKind::Enum(..)
        | PropertyKind::Child(_)
        | PropertyKind::Struct(_) => {
            QomValue::Str(v.as_str().ok_or_else(|| wrong("string"))?.to_string())
        }
        PropertyKind::Link(_) => {
            let path = v.as_str().ok_or_else(|| wrong("string"))?;
            if path.is_empty() {
                QomValue::Link(None)
            } else {
                QomValue::Link(Some(qom::resolve_path(&qom::object_get_root(), path)?))
            }
        }
    };
    prop.validate(&value)?;
    Ok(value)
}

/// Sets one member on the new object.
fn set_member(
    obj: &Object,
    name: &str,
    value: &MemberValue,
    origin: Origin,
) -> Result<(), qom::Error> {
    let prop = obj
        .find_property(name)
        .filter(|p| p.is_settable() && p.name != "type")
        .ok_or_else(|| {
            qom::Error::other(match origin {
                Origin::Keyval => MemberError::Invalid(name.to_string()),
                Origin::Json => MemberError::Unexpected(name.to_string()),
            })
        })?;
    match value {
        MemberValue::Text(text) => {
            if let PropertyKind::Int(bits) = prop.kind {
                if text.trim().parse::<i64>().is_err() {
                    return Err(qom::Error::other(MemberError::NotInt {
                        name: name.to_string(),
                        bits,
                    }));
                }
            }
            obj.property_parse(name, text)
        }
        MemberValue::Json(v) => obj.property_set(name, json_value(&prop, v)?),
    }
}

/// QEMU's `user_creatable_add_qapi`: creates, sets and completes the object at
/// `/objects/<id>`.
pub fn object_add(opts: &ObjectOptions) -> Result<ObjectRef, qom::Error> {
    qom::user_creatable_add_type(&opts.qom_type, &opts.id, |obj| {
        for (name, value) in &opts.members {
            set_member(obj, name, value, opts.origin)?;
        }
        Ok(())
    })
}

/// An error of `object_add` as the command line prints it (with QEMU's hint for ids).
fn cli_error(e: qom::Error) -> String {
    let text = e.to_string();
    if text == qom::object_interfaces::UserCreatableError::BadId.to_string() {
        format!("{text}\n{ID_HINT}")
    } else {
        text
    }
}

/// `-object`: creates the object; returns the listing to print for a help request.
pub fn object_option(located: &Located) -> Result<Option<String>, OptionError> {
    let opts = match parse_str(&located.value).map_err(|e| located.error(e))? {
        ObjectRequest::Help(text) => return Ok(Some(text)),
        ObjectRequest::Add(opts) => opts,
    };
    // The command line's objects are one QemuOpts list: ids are unique in it.
    if qom::object_get_objects_root().child(&opts.id).is_some() {
        return Err(located.error(format!("Duplicate ID '{}' for object", opts.id)));
    }
    object_add(&opts).map_err(|e| located.error(cli_error(e)))?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() {
        hw::init().unwrap();
    }

    #[test]
    fn keyval_and_json_give_the_same_options() {
        init();
        let ObjectRequest::Add(k) = parse_str("iothread,id=io0,poll-max-ns=100").unwrap() else {
            panic!("not an add")
        };
        assert_eq!(k.qom_type, "iothread");
        assert_eq!(k.id, "io0");
        assert_eq!(
            k.members,
            vec![(
                "poll-max-ns".to_string(),
                MemberValue::Text("100".to_string())
            )]
        );
        let ObjectRequest::Add(j) =
            parse_str(r#"{"qom-type":"iothread","id":"io0","poll-max-ns":100}"#).unwrap()
        else {
            panic!("not an add")
        };
        assert_eq!(j.origin, Origin::Json);
        assert_eq!(
            j.members,
            vec![("poll-max-ns".to_string(), MemberValue::Json(100.into()))]
        );
    }

    #[test]
    fn options_are_checked_in_qapi_order() {
        init();
        let err = |t: &str| parse_str(t).unwrap_err();
        assert_eq!(
            err("foo,id=x"),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert_eq!(
            err("container,id=x"),
            "Parameter 'qom-type' does not accept value 'container'"
        );
        assert_eq!(err("iothread"), "Parameter 'id' is missing");
        assert_eq!(err("id=x"), "Parameter 'qom-type' is missing");
        assert_eq!(
            err(r#"{"qom-type":"foo","id":"x"}"#),
            "Parameter 'qom-type' does not accept value 'foo'"
        );
        assert!(
            matches!(parse_str("help"), Ok(ObjectRequest::Help(t)) if t.contains("  iothread\n"))
        );
        assert!(
            matches!(parse_str("iothread,help"), Ok(ObjectRequest::Help(t)) if t.starts_with("iothread options:\n") && t.contains("poll-max-ns=<int64>"))
        );
    }
}
