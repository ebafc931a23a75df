//! Properties: QEMU's `ObjectProperty`, with the string parsing `-device drv,prop=val` and
//! `-global drv.prop=val` need.

use std::borrow::Cow;
use std::fmt;

use crate::object::{Object, ObjectRef};
use crate::Error;

/// A property's value.
#[derive(Clone)]
pub enum Value {
    /// `bool`.
    Bool(bool),
    /// Signed integers.
    Int(i64),
    /// Unsigned integers and sizes.
    Uint(u64),
    /// Strings, enums, and the path a `child<>` property reads as.
    Str(String),
    /// `link<>` targets.
    Link(Option<ObjectRef>),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "Bool({b})"),
            Value::Int(i) => write!(f, "Int({i})"),
            Value::Uint(u) => write!(f, "Uint({u})"),
            Value::Str(s) => write!(f, "Str({s:?})"),
            Value::Link(None) => f.write_str("Link(None)"),
            Value::Link(Some(o)) => write!(f, "Link({})", o.type_name()),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Uint(a), Value::Uint(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Link(a), Value::Link(b)) => match (a, b) {
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            },
            _ => false,
        }
    }
}

/// What a property holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropertyKind {
    /// `bool`, parsed from `on`/`off`.
    Bool,
    /// An unsigned integer of the given width (8, 16, 32, 64).
    Uint(u8),
    /// A signed integer of the given width.
    Int(u8),
    /// A size in bytes, parsed from `512M`, `2G`, `4096`.
    Size,
    /// A string.
    Str,
    /// One of a fixed list of names.
    Enum(&'static str, &'static [&'static str]),
    /// A reference to another object, by path, of (a subtype of) the given type.
    Link(&'static str),
    /// A child in the composition tree, of the given type.
    Child(&'static str),
    /// A structure of the given QAPI type (`struct tm`), which scalar values cannot carry:
    /// read-only, its value built by the monitor.
    Struct(&'static str),
}

impl PropertyKind {
    /// The type name QEMU shows for it (`uint16`, `size`, `link<isa-bus>`...).
    pub fn type_name(&self) -> Cow<'static, str> {
        match self {
            PropertyKind::Bool => "bool".into(),
            PropertyKind::Uint(bits) => format!("uint{bits}").into(),
            PropertyKind::Int(bits) => format!("int{bits}").into(),
            PropertyKind::Size => "size".into(),
            PropertyKind::Str => "str".into(),
            PropertyKind::Enum(name, _) => (*name).into(),
            PropertyKind::Link(t) => format!("link<{t}>").into(),
            PropertyKind::Child(t) => format!("child<{t}>").into(),
            PropertyKind::Struct(name) => (*name).into(),
        }
    }
}

/// A property's default, constant so that property lists can be `const`.
#[derive(Clone, Copy, Debug)]
pub enum PropertyDefault {
    /// No default (strings read as empty, links as unset).
    None,
    /// A boolean default.
    Bool(bool),
    /// A signed default.
    Int(i64),
    /// An unsigned or size default.
    Uint(u64),
    /// A string or enum default.
    Str(&'static str),
    /// The default of a property bound to a typed field (`#[property(default = ...)]`),
    /// `None` for an unset `Option`.
    Field(fn() -> Option<Value>),
}

impl PropertyDefault {
    fn value(&self, kind: PropertyKind) -> Value {
        match (*self, kind) {
            (PropertyDefault::Bool(b), _) => Value::Bool(b),
            (PropertyDefault::Int(i), _) => Value::Int(i),
            (PropertyDefault::Uint(u), _) => Value::Uint(u),
            (PropertyDefault::Str(s), _) => Value::Str(s.to_string()),
            (PropertyDefault::Field(default), kind) => {
                default().unwrap_or_else(|| PropertyDefault::None.value(kind))
            }
            (PropertyDefault::None, PropertyKind::Bool) => Value::Bool(false),
            (PropertyDefault::None, PropertyKind::Uint(_) | PropertyKind::Size) => Value::Uint(0),
            (PropertyDefault::None, PropertyKind::Int(_)) => Value::Int(0),
            (PropertyDefault::None, PropertyKind::Link(_)) => Value::Link(None),
            (PropertyDefault::None, _) => Value::Str(String::new()),
        }
    }
}

/// Reads a property with custom behaviour.
pub type Getter = fn(&Object, &Property) -> Result<Value, Error>;
/// Writes a property with custom behaviour.
pub type Setter = fn(&Object, &Property, Value) -> Result<(), Error>;

/// Runs before a write and may refuse it (qdev refuses writes after realize).
pub type SetCheck = fn(&Object, &Property) -> Result<(), Error>;

/// One property of a class or of an object (QEMU's `ObjectProperty` / qdev `Property`).
///
/// Without accessors the value is stored in the object, checked against `kind`; with them
/// the type's own code keeps it (the `realized` and `type` properties do).
#[derive(Clone, Debug)]
pub struct Property {
    /// The name (`iobase`, `device[0]`).
    pub name: Cow<'static, str>,
    /// What it holds.
    pub kind: PropertyKind,
    /// A one-line description for `-device DRIVER,help`.
    pub description: &'static str,
    /// The default value.
    pub default: PropertyDefault,
    /// Custom read; `None` with a setter present means write-only.
    pub getter: Option<Getter>,
    /// Custom write; `None` with a getter present means read-only.
    pub setter: Option<Setter>,
    /// Called before every write, e.g. to refuse writes after realize.
    pub check_set: Option<SetCheck>,
    /// Typed read and write on the owner's state (see [`StateAccessor`]); takes precedence
    /// over `getter` and `setter`.
    pub accessor: Option<&'static dyn PropertyAccessor>,
}

/// Reads and writes a property through the owner's typed state.
pub trait PropertyAccessor: Send + Sync {
    /// For `Debug` of properties.
    fn describe(&self) -> &'static str {
        std::any::type_name::<Self>()
    }
    /// The value.
    fn get(&self, obj: &Object, prop: &Property) -> Result<Value, Error>;
    /// Writes an already validated value; `None` if the property is read-only.
    fn set(&self, obj: &Object, prop: &Property, value: Value) -> Option<Result<(), Error>>;
    /// Whether [`PropertyAccessor::set`] writes.
    fn writable(&self) -> bool;
}

/// Writes a [`StateAccessor`] property into state `S`.
pub type StateSetter<S> = fn(&S, &Property, Value) -> Result<(), Error>;

/// A property computed from a typed state `S` rather than stored in one field: a family of
/// flags (CPU features), a read-only index. A `static` of it is what the property holds.
pub struct StateAccessor<S> {
    /// Reads the value from the state.
    pub get: fn(&S, &Property) -> Value,
    /// Writes the value into the state; `None` for a read-only property.
    pub set: Option<StateSetter<S>>,
}

impl<S: std::any::Any + Send + Sync> StateAccessor<S> {
    fn state<'a>(&self, obj: &'a Object, prop: &Property) -> Result<&'a S, Error> {
        obj.downcast::<S>().ok_or_else(|| Error::PropertyNotFound {
            type_name: obj.type_name().to_string(),
            name: prop.name.to_string(),
        })
    }
}

impl fmt::Debug for dyn PropertyAccessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl<S: std::any::Any + Send + Sync> PropertyAccessor for StateAccessor<S> {
    fn get(&self, obj: &Object, prop: &Property) -> Result<Value, Error> {
        Ok((self.get)(self.state(obj, prop)?, prop))
    }
    fn writable(&self) -> bool {
        self.set.is_some()
    }
    fn set(&self, obj: &Object, prop: &Property, value: Value) -> Option<Result<(), Error>> {
        let set = self.set?;
        Some(self.state(obj, prop).and_then(|s| set(s, prop, value)))
    }
}

/// A property's description for listings (`-device DRIVER,help`, `qom-list-properties`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropertyInfo {
    /// The name.
    pub name: String,
    /// The type name (`uint32`, `link<pci-bus>`).
    pub type_name: String,
    /// The description.
    pub description: String,
    /// The default, printed, if any.
    pub default: Option<String>,
}

impl Property {
    const fn new(
        name: &'static str,
        kind: PropertyKind,
        default: PropertyDefault,
        description: &'static str,
    ) -> Self {
        Property {
            name: Cow::Borrowed(name),
            kind,
            description,
            default,
            getter: None,
            setter: None,
            check_set: None,
            accessor: None,
        }
    }

    /// A stored `bool` property.
    pub const fn bool(name: &'static str, default: bool, description: &'static str) -> Self {
        Self::new(
            name,
            PropertyKind::Bool,
            PropertyDefault::Bool(default),
            description,
        )
    }

    /// A stored unsigned integer of `bits` bits (8, 16, 32 or 64).
    pub const fn uint(
        name: &'static str,
        bits: u8,
        default: u64,
        description: &'static str,
    ) -> Self {
        Self::new(
            name,
            PropertyKind::Uint(bits),
            PropertyDefault::Uint(default),
            description,
        )
    }

    /// A stored signed integer of `bits` bits.
    pub const fn int(
        name: &'static str,
        bits: u8,
        default: i64,
        description: &'static str,
    ) -> Self {
        Self::new(
            name,
            PropertyKind::Int(bits),
            PropertyDefault::Int(default),
            description,
        )
    }

    /// A stored size in bytes.
    pub const fn size(name: &'static str, default: u64, description: &'static str) -> Self {
        Self::new(
            name,
            PropertyKind::Size,
            PropertyDefault::Uint(default),
            description,
        )
    }

    /// A stored string.
    pub const fn string(
        name: &'static str,
        default: Option<&'static str>,
        description: &'static str,
    ) -> Self {
        let default = match default {
            Some(s) => PropertyDefault::Str(s),
            None => PropertyDefault::None,
        };
        Self::new(name, PropertyKind::Str, default, description)
    }

    /// A stored enum named `enum_name` with the given values.
    pub const fn enumeration(
        name: &'static str,
        enum_name: &'static str,
        values: &'static [&'static str],
        default: &'static str,
        description: &'static str,
    ) -> Self {
        Self::new(
            name,
            PropertyKind::Enum(enum_name, values),
            PropertyDefault::Str(default),
            description,
        )
    }

    /// A stored `link<target_type>`.
    pub const fn link(
        name: &'static str,
        target_type: &'static str,
        description: &'static str,
    ) -> Self {
        Self::new(
            name,
            PropertyKind::Link(target_type),
            PropertyDefault::None,
            description,
        )
    }

    /// A property of `kind` read and written by the type's own code.
    pub const fn custom(
        name: &'static str,
        kind: PropertyKind,
        getter: Option<Getter>,
        setter: Option<Setter>,
        description: &'static str,
    ) -> Self {
        let mut p = Self::new(name, kind, PropertyDefault::None, description);
        p.getter = getter;
        p.setter = setter;
        p
    }

    /// A property bound to a field of a typed state: what `#[derive(qom::Object)]` emits
    /// for each `#[property]` field.
    pub const fn field(
        name: &'static str,
        kind: PropertyKind,
        description: &'static str,
        getter: Getter,
        setter: Setter,
        default: fn() -> Option<Value>,
    ) -> Self {
        let mut p = Self::new(name, kind, PropertyDefault::Field(default), description);
        p.getter = Some(getter);
        p.setter = Some(setter);
        p
    }

    /// A property read (and written) through typed state `S` by a [`StateAccessor`].
    pub const fn state(
        name: &'static str,
        kind: PropertyKind,
        description: &'static str,
        accessor: &'static dyn PropertyAccessor,
    ) -> Self {
        let mut p = Self::new(name, kind, PropertyDefault::None, description);
        p.accessor = Some(accessor);
        p
    }

    /// The same property with a check run before every write.
    pub const fn with_check(mut self, check: SetCheck) -> Self {
        self.check_set = Some(check);
        self
    }

    /// Whether the value is kept in the object's property store.
    pub fn is_stored(&self) -> bool {
        self.getter.is_none()
            && self.setter.is_none()
            && self.accessor.is_none()
            && !matches!(self.kind, PropertyKind::Child(_))
    }

    /// Whether the property can be written (listings show only these as options).
    pub fn is_settable(&self) -> bool {
        self.setter.is_some() || self.is_stored() || self.accessor.is_some_and(|a| a.writable())
    }

    /// The default value as a `Value`.
    pub fn default_value(&self) -> Value {
        self.default.value(self.kind)
    }

    /// The listing entry of this property.
    pub fn info(&self) -> PropertyInfo {
        let default = match self.default {
            PropertyDefault::None => None,
            PropertyDefault::Field(default) => default().map(|v| format_value(&v)),
            _ if !self.is_stored() => None,
            _ => Some(format_value(&self.default_value())),
        };
        PropertyInfo {
            name: self.name.to_string(),
            type_name: self.kind.type_name().into_owned(),
            description: self.description.to_string(),
            default,
        }
    }

    fn invalid(&self, expected: impl Into<String>) -> Error {
        Error::InvalidParameterValue {
            name: self.name.to_string(),
            expected: expected.into(),
        }
    }

    /// Checks that `value` suits the property's kind (range, enum names, link type).
    pub fn validate(&self, value: &Value) -> Result<(), Error> {
        let wrong_type = || Error::InvalidParameterType {
            name: self.name.to_string(),
            expected: self.kind.type_name().into_owned(),
        };
        match (self.kind, value) {
            (PropertyKind::Bool, Value::Bool(_)) => Ok(()),
            (PropertyKind::Uint(bits), Value::Uint(v)) => {
                if bits < 64 && *v >= 1u64 << bits {
                    Err(self.invalid(uint_expectation(bits)))
                } else {
                    Ok(())
                }
            }
            (PropertyKind::Int(bits), Value::Int(v)) => {
                let (min, max) = int_range(bits);
                if *v < min || *v > max {
                    Err(self.invalid(format!("an integer between {min} and {max}")))
                } else {
                    Ok(())
                }
            }
            (PropertyKind::Size, Value::Uint(_)) => Ok(()),
            (PropertyKind::Str, Value::Str(_)) => Ok(()),
            (PropertyKind::Enum(_, values), Value::Str(s)) => {
                if values.contains(&s.as_str()) {
                    Ok(())
                } else {
                    Err(Error::InvalidEnumValue {
                        name: self.name.to_string(),
                        value: s.clone(),
                    })
                }
            }
            (PropertyKind::Link(t), Value::Link(target)) => match target {
                Some(obj) if !obj.class().is_a(t) => Err(wrong_type()),
                _ => Ok(()),
            },
            (PropertyKind::Child(_), Value::Str(_)) => Ok(()),
            _ => Err(wrong_type()),
        }
    }

    /// Parses a command-line string into a value of this property's kind. `resolve` turns a
    /// path into an object for links.
    pub fn parse(
        &self,
        text: &str,
        resolve: impl FnOnce(&str) -> Result<ObjectRef, Error>,
    ) -> Result<Value, Error> {
        let value = match self.kind {
            PropertyKind::Bool => Value::Bool(parse_bool(text).ok_or_else(|| self.invalid("'on' or 'off'"))?),
            PropertyKind::Uint(bits) => {
                Value::Uint(parse_uint(text).ok_or_else(|| self.invalid(uint_expectation(bits)))?)
            }
            PropertyKind::Int(bits) => {
                let (min, max) = int_range(bits);
                Value::Int(
                    parse_int(text)
                        .ok_or_else(|| self.invalid(format!("an integer between {min} and {max}")))?,
                )
            }
            PropertyKind::Size => Value::Uint(parse_size(text).ok_or_else(|| {
                self.invalid("a non-negative number below 2^64 optionally followed by 'k', 'M', 'G', 'T', 'P' or 'E'")
            })?),
            PropertyKind::Str | PropertyKind::Enum(..) => Value::Str(text.to_string()),
            PropertyKind::Link(_) => {
                if text.is_empty() {
                    Value::Link(None)
                } else {
                    Value::Link(Some(resolve(text)?))
                }
            }
            PropertyKind::Child(_) | PropertyKind::Struct(_) => Value::Str(text.to_string()),
        };
        self.validate(&value)?;
        Ok(value)
    }
}

/// Prints a value the way `qom-get` and `-device DRIVER,help` show it.
pub fn format_value(value: &Value) -> String {
    match value {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Uint(u) => u.to_string(),
        Value::Str(s) => s.clone(),
        Value::Link(None) => String::new(),
        Value::Link(Some(o)) => o.canonical_path().unwrap_or_default(),
    }
}

fn uint_expectation(bits: u8) -> String {
    if bits >= 64 {
        "a non-negative integer below 2^64".to_string()
    } else {
        format!("a non-negative integer below {}", 1u64 << bits)
    }
}

fn int_range(bits: u8) -> (i64, i64) {
    if bits >= 64 {
        (i64::MIN, i64::MAX)
    } else {
        (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Parses an unsigned integer in C notation: decimal, `0x` hex or leading-zero octal.
fn parse_uint(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.starts_with('-') || t.starts_with('+') {
        return None;
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()
    } else {
        t.parse().ok()
    }
}

fn parse_int(text: &str) -> Option<i64> {
    let t = text.trim();
    match t.strip_prefix('-') {
        Some(rest) => {
            let v = parse_uint(rest)?;
            if v == 1u64 << 63 {
                Some(i64::MIN)
            } else {
                i64::try_from(v).ok().map(|v| -v)
            }
        }
        None => i64::try_from(parse_uint(t)?).ok(),
    }
}

/// Parses a size as QEMU's `qemu_strtosz` does: a number (decimal, fractions allowed, or
/// `0x` hex) with an optional binary suffix `B`, `k`/`K`, `M`, `G`, `T`, `P`, `E`.
/// Without a suffix the number is bytes. Returns `None` for malformed or overflowing input.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == 'x' || c == 'X'))
        .unwrap_or(t.len());
    let (mut number, mut suffix) = t.split_at(split);
    // A trailing 'B'/'E' is a hex digit: it is a suffix unless the number is hex.
    let is_hex = number.starts_with("0x") || number.starts_with("0X");
    if !is_hex && suffix.is_empty() {
        if let Some(last) = number.chars().last() {
            if matches!(last, 'b' | 'B' | 'e' | 'E') {
                number = &t[..t.len() - 1];
                suffix = &t[t.len() - 1..];
            }
        }
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if is_hex {
        let v = u64::from_str_radix(&number[2..], 16).ok()?;
        return v.checked_mul(1u64 << shift);
    }
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    if number.contains('.') {
        if shift == 0 {
            return None;
        }
        let v: f64 = number.parse().ok()?;
        let bytes = v * (1u64 << shift) as f64;
        // 2^64 as f64 is exact; anything at or above it overflows.
        if !(0.0..18_446_744_073_709_551_616.0).contains(&bytes) {
            return None;
        }
        return Some(bytes as u64);
    }
    let v: u64 = number.parse().ok()?;
    v.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("15E"), Some(15 << 60));
        assert_eq!(parse_size("0x1000"), Some(0x1000));
        assert_eq!(parse_size("12B"), Some(12));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("2X"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("1.5"), None);
    }

    #[test]
    fn integers_parse_in_c_notation() {
        assert_eq!(parse_uint("0x3f8"), Some(0x3f8));
        assert_eq!(parse_uint("010"), Some(8));
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("-1"), None);
        assert_eq!(parse_int("-32768"), Some(-32768));
        assert_eq!(parse_int("-9223372036854775808"), Some(i64::MIN));
    }

    #[test]
    fn out_of_range_values_are_refused_in_qemu_words() {
        let p = Property::uint("iobase", 16, 0x501, "");
        let err = p.parse("70000", |_| unreachable!()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'iobase' expects a non-negative integer below 65536"
        );
        let err = p.parse("-1", |_| unreachable!()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'iobase' expects a non-negative integer below 65536"
        );
        assert_eq!(
            p.parse("0xffff", |_| unreachable!()).unwrap(),
            Value::Uint(0xffff)
        );

        let p = Property::int("delta", 8, 0, "");
        let err = p.parse("200", |_| unreachable!()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'delta' expects an integer between -128 and 127"
        );

        let p = Property::bool("flag", false, "");
        let err = p.parse("maybe", |_| unreachable!()).unwrap_err();
        assert_eq!(err.to_string(), "Parameter 'flag' expects 'on' or 'off'");

        let p = Property::size("size", 0, "");
        assert!(p
            .parse("lots", |_| unreachable!())
            .unwrap_err()
            .to_string()
            .starts_with("Parameter 'size' expects a non-negative number below 2^64"));

        let p = Property::enumeration(
            "policy",
            "LostTickPolicy",
            &["discard", "delay"],
            "delay",
            "",
        );
        let err = p.parse("slew", |_| unreachable!()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'policy' does not accept value 'slew'"
        );
    }
}
