//! `-audiodev` (QEMU 7.2's `audio/audio.c` and `qapi/audio.json`): audio backends.
//!
//! qomvm has no sound device, so the only backend it can create is `none` (QEMU's
//! `noaudio.c`), which plays nothing and records silence: with no card to feed it, it has
//! nothing to do but exist, so that what names it (`-vnc ...,audiodev=ID`, as libvirt
//! writes for every VNC display) finds it. The option is checked as QEMU's QAPI visitor
//! checks an `Audiodev` (members, types, `fixed-settings`/`mixing-engine` rules, with its
//! words); a driver QEMU knows but qomvm lacks is refused as QEMU refuses one that is not
//! built in.

use std::sync::Mutex;

use serde_json::{Map, Value};

/// Why an `-audiodev` (or a reference to one) is refused, in QEMU's words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AudioError {
    /// A required member is absent.
    #[error("Parameter '{0}' is missing")]
    Missing(&'static str),
    /// A member `Audiodev` does not have.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A JSON member of the wrong type.
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    Type {
        /// The member's full name (`out.frequency`).
        name: String,
        /// The QAPI type.
        expected: &'static str,
    },
    /// A value that does not parse as the member's type.
    #[error("Parameter '{name}' expects {what}")]
    Value {
        /// The member's name, as QEMU's visitor gives it for this check.
        name: String,
        /// What it takes.
        what: &'static str,
    },
    /// A value outside an enum.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    Enum {
        /// The member's own name (`format`).
        name: &'static str,
        /// The value given.
        value: String,
    },
    /// `key` without `=value` in the dotted-key form.
    #[error("Expected '=' after parameter '{0}'")]
    NoValue(String),
    /// Dotted keys that do not nest (`out=5,out.frequency=8000`).
    #[error("{0}")]
    Keyval(String),
    /// Text that is not JSON though it starts like it.
    #[error("JSON parse error, {0}")]
    Json(String),
    /// audio_validate_per_direction_opts: a fixed format without fixed settings.
    #[error("You can't use frequency, channels or format with fixed-settings=off")]
    FixedSettingsOff,
    /// audio_validate_per_direction_opts: fixed settings need the mixing engine.
    #[error("You can't use fixed-settings without mixeng")]
    FixedWithoutMixeng,
    /// A driver of QEMU's `AudiodevDriver` that qomvm does not have (QEMU's words for
    /// one that is not built in).
    #[error("Unknown audio driver `{0}'")]
    UnknownDriver(&'static str),
}

/// QEMU 7.2's `AudiodevDriver`, in its order.
const DRIVERS: &[&str] = &[
    "none",
    "alsa",
    "coreaudio",
    "dbus",
    "dsound",
    "jack",
    "oss",
    "pa",
    "sdl",
    "sndio",
    "spice",
    "wav",
];

/// The drivers qomvm has, as `-audiodev help` lists them.
const AVAILABLE_DRIVERS: &[&str] = &["none"];

/// QEMU's `AudioFormat`.
const FORMATS: &[&str] = &["u8", "s8", "u16", "s16", "u32", "s32", "f32"];

/// A checked `-audiodev` (QEMU's `Audiodev`), as `audio_define` records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Audiodev {
    /// The backend's id, which devices and displays name.
    pub id: String,
    /// One of [`DRIVERS`].
    pub driver: &'static str,
}

/// A created backend (QEMU's `AudioState`): only `none` backends exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudioState {
    /// Its `Audiodev`'s id.
    pub id: String,
}

/// The created backends, in command-line order (QEMU's `audio_states`).
static AUDIO_STATES: Mutex<Vec<AudioState>> = Mutex::new(Vec::new());

/// What `-audiodev help` prints (QEMU's `audio_help`).
pub fn audio_help() -> String {
    let mut text = String::from("Available audio drivers:\n");
    for d in AVAILABLE_DRIVERS {
        text.push_str(d);
        text.push('\n');
    }
    text
}

/// QEMU's `is_help_option`.
pub fn is_help_option(text: &str) -> bool {
    text == "help" || text == "?"
}

/// QEMU's `audio_parse_option` without the help (see [`is_help_option`]): the option as
/// JSON or dotted keys (`none,id=a,out.frequency=8000`, `driver` implied), checked.
pub fn audio_parse_option(text: &str) -> Result<Audiodev, AudioError> {
    let (map, keyval) = if text.trim_start().starts_with('{') {
        let value: Value =
            serde_json::from_str(text).map_err(|e| AudioError::Json(e.to_string()))?;
        (value.as_object().cloned().unwrap_or_default(), false)
    } else {
        (keyval_parse(text)?, true)
    };
    let v = Visitor { keyval };
    let id = v.str(&map, "", "id")?.ok_or(AudioError::Missing("id"))?;
    let driver = v
        .enumeration(&map, "", "driver", DRIVERS)?
        .ok_or(AudioError::Missing("driver"))?;
    v.uint32(&map, "", "timer-period")?;
    // The other drivers' members are their own; qomvm refuses those drivers anyway
    // (audio_init_audiodevs), so it checks only `none`'s: AudiodevGenericOptions.
    if driver == "none" {
        for dir in ["in", "out"] {
            match map.get(dir) {
                None => {}
                Some(Value::Object(pdo)) => v.per_direction(pdo, dir)?,
                Some(_) => {
                    return Err(AudioError::Type {
                        name: dir.to_string(),
                        expected: "object",
                    })
                }
            }
        }
        unexpected(&map, "", &["id", "driver", "timer-period", "in", "out"])?;
    }
    Ok(Audiodev {
        id: id.to_string(),
        driver,
    })
}

/// QEMU's `audio_init_audiodevs`: creates the backends defined, in order; the first one
/// qomvm cannot create stops start-up (its index and why).
pub fn audio_init_audiodevs(devs: &[Audiodev]) -> Result<(), (usize, AudioError)> {
    let mut states = AUDIO_STATES.lock().unwrap_or_else(|e| e.into_inner());
    for (i, dev) in devs.iter().enumerate() {
        if dev.driver != "none" {
            return Err((i, AudioError::UnknownDriver(dev.driver)));
        }
        // QEMU 7.2 does not refuse a second backend with the same id; lookups find the
        // first.
        states.push(AudioState { id: dev.id.clone() });
    }
    Ok(())
}

/// QEMU's `audio_state_by_name`.
pub fn audio_state_by_name(name: &str) -> Option<AudioState> {
    let states = AUDIO_STATES.lock().unwrap_or_else(|e| e.into_inner());
    states.iter().find(|s| s.id == name).cloned()
}

/// QEMU's `keyval_parse` for `-audiodev`: `driver` implied for a first bare word, dotted
/// keys nested, values strings; a repeated key keeps the last value.
fn keyval_parse(text: &str) -> Result<Map<String, Value>, AudioError> {
    let mut pairs = Vec::new();
    for (i, item) in hw::core::qemu_opts::split_commas(text)
        .into_iter()
        .enumerate()
    {
        pairs.push(match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => ("driver".to_string(), item),
            None => return Err(AudioError::NoValue(item)),
        });
    }
    crate::options::keyval_nest(pairs, crate::options::RepeatedKey::LastWins)
        .map_err(AudioError::Keyval)
}

/// The first member of `map` outside `known`.
fn unexpected(map: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<(), AudioError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(AudioError::Unexpected(format!("{prefix}{k}"))),
        None => Ok(()),
    }
}

/// QEMU's QObject input visitor, in its keyval (dotted keys: every value a string) or
/// JSON (typed values) mode, with its messages.
struct Visitor {
    keyval: bool,
}

impl Visitor {
    fn str<'m>(
        &self,
        map: &'m Map<String, Value>,
        prefix: &str,
        key: &str,
    ) -> Result<Option<&'m str>, AudioError> {
        match map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(AudioError::Type {
                name: format!("{prefix}{key}"),
                expected: "string",
            }),
        }
    }

    fn enumeration(
        &self,
        map: &Map<String, Value>,
        prefix: &str,
        key: &'static str,
        values: &[&'static str],
    ) -> Result<Option<&'static str>, AudioError> {
        let Some(s) = self.str(map, prefix, key)? else {
            return Ok(None);
        };
        values
            .iter()
            .find(|v| **v == s)
            .copied()
            .map(Some)
            .ok_or_else(|| AudioError::Enum {
                name: key,
                value: s.to_string(),
            })
    }

    fn boolean(
        &self,
        map: &Map<String, Value>,
        prefix: &str,
        key: &str,
    ) -> Result<Option<bool>, AudioError> {
        let name = || format!("{prefix}{key}");
        match map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) if !self.keyval => Ok(Some(*b)),
            // qapi_bool_parse.
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(AudioError::Value {
                    name: name(),
                    what: "'on' or 'off'",
                }),
            },
            Some(_) => Err(AudioError::Type {
                name: name(),
                expected: "boolean",
            }),
        }
    }

    /// A `uint32`: read as QEMU's visitor reads a uint64 (the full name in its errors),
    /// then range-checked (the member's own name in that error, as QEMU has it).
    fn uint32(
        &self,
        map: &Map<String, Value>,
        prefix: &str,
        key: &str,
    ) -> Result<Option<u32>, AudioError> {
        let wide = match map.get(key) {
            None => return Ok(None),
            Some(Value::String(s)) if self.keyval => {
                crate::options::strtou64(s).ok_or_else(|| AudioError::Value {
                    name: format!("{prefix}{key}"),
                    what: "integer",
                })?
            }
            // A negative JSON integer is taken as its two's complement, then fails the
            // range check; anything else that is not an integer is no uint64.
            Some(Value::Number(n)) if !self.keyval && (n.is_u64() || n.is_i64()) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .unwrap_or_default(),
            Some(_) => {
                return Err(AudioError::Value {
                    name: format!("{prefix}{key}"),
                    what: if self.keyval { "integer" } else { "uint64" },
                })
            }
        };
        u32::try_from(wide)
            .map(Some)
            .map_err(|_| AudioError::Value {
                name: key.to_string(),
                what: "uint32_t",
            })
    }

    /// `AudiodevPerDirectionOptions`, then audio_validate_per_direction_opts' rules.
    fn per_direction(&self, pdo: &Map<String, Value>, dir: &str) -> Result<(), AudioError> {
        let prefix = format!("{dir}.");
        let mixing_engine = self.boolean(pdo, &prefix, "mixing-engine")?.unwrap_or(true);
        let fixed_settings = self.boolean(pdo, &prefix, "fixed-settings")?;
        let frequency = self.uint32(pdo, &prefix, "frequency")?;
        let channels = self.uint32(pdo, &prefix, "channels")?;
        self.uint32(pdo, &prefix, "voices")?;
        let format = self.enumeration(pdo, &prefix, "format", FORMATS)?;
        self.uint32(pdo, &prefix, "buffer-length")?;
        unexpected(
            pdo,
            &prefix,
            &[
                "mixing-engine",
                "fixed-settings",
                "frequency",
                "channels",
                "voices",
                "format",
                "buffer-length",
            ],
        )?;
        let fixed_settings = fixed_settings.unwrap_or(mixing_engine);
        if !fixed_settings && (frequency.is_some() || channels.is_some() || format.is_some()) {
            return Err(AudioError::FixedSettingsOff);
        }
        if !mixing_engine && fixed_settings {
            return Err(AudioError::FixedWithoutMixeng);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        audio_parse_option(text).unwrap_err().to_string()
    }

    /// Each message is what Debian 12's qemu-system-x86_64 7.2 prints for the same text.
    #[test]
    fn options_and_errors_are_qemus() {
        let ok = |text: &str| audio_parse_option(text).unwrap();
        assert_eq!(
            ok(r#"{"id":"audio1","driver":"none"}"#),
            Audiodev {
                id: "audio1".into(),
                driver: "none"
            }
        );
        assert_eq!(ok("none,id=a").id, "a");
        assert_eq!(ok("driver=none,id=a").driver, "none");
        ok("none,id=a,out.mixing-engine=yes,in.voices=0x10,timer-period=10000");
        ok("none,id=a,in.buffer-length=5,out.voices=3,out.format=f32");
        ok("none,id=a,out.frequency=1,out.frequency=2");
        ok(r#"{"id":"a","driver":"none","out":{"frequency":8000,"mixing-engine":true}}"#);
        assert_eq!(ok("pa,id=a,server=x").driver, "pa");

        let cases = [
            ("foo,id=x", "Parameter 'driver' does not accept value 'foo'"),
            ("none", "Parameter 'id' is missing"),
            ("id=a", "Parameter 'driver' is missing"),
            ("timer-period=5", "Parameter 'id' is missing"),
            ("none,id=a,bogus=1", "Parameter 'bogus' is unexpected"),
            (
                "none,id=a,out.bogus=1",
                "Parameter 'out.bogus' is unexpected",
            ),
            (
                "none,id=a,out=5",
                "Invalid parameter type for 'out', expected: object",
            ),
            (
                "none,id=a,out=5,out.frequency=8000",
                "Parameters 'out.*' conflict with parameter 'out'",
            ),
            (
                "none,id=a,out.frequency=abc",
                "Parameter 'out.frequency' expects integer",
            ),
            (
                "none,id=a,out.frequency=",
                "Parameter 'out.frequency' expects integer",
            ),
            (
                "none,id=a,out.frequency=-5",
                "Parameter 'frequency' expects uint32_t",
            ),
            (
                "none,id=a,out.frequency=99999999999",
                "Parameter 'frequency' expects uint32_t",
            ),
            (
                "none,id=a,timer-period=1k",
                "Parameter 'timer-period' expects integer",
            ),
            (
                "none,id=a,timer-period=-1",
                "Parameter 'timer-period' expects uint32_t",
            ),
            (
                "none,id=a,out.mixing-engine=maybe",
                "Parameter 'out.mixing-engine' expects 'on' or 'off'",
            ),
            (
                "none,id=a,out.mixing-engine",
                "Expected '=' after parameter 'out.mixing-engine'",
            ),
            (
                "none,id=a,out.format=S16",
                "Parameter 'format' does not accept value 'S16'",
            ),
            (
                "none,id=a,out.fixed-settings=off,out.frequency=8000",
                "You can't use frequency, channels or format with fixed-settings=off",
            ),
            (
                "none,id=a,in.mixing-engine=off,in.fixed-settings=on",
                "You can't use fixed-settings without mixeng",
            ),
            (
                r#"{"id":"a","driver":"none","x":1}"#,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"id":1,"driver":"none"}"#,
                "Invalid parameter type for 'id', expected: string",
            ),
            (
                r#"{"id":"a","driver":5}"#,
                "Invalid parameter type for 'driver', expected: string",
            ),
            (
                r#"{"id":"a","driver":"none","out":5}"#,
                "Invalid parameter type for 'out', expected: object",
            ),
            (
                r#"{"id":"a","driver":"none","out":{"mixing-engine":"on"}}"#,
                "Invalid parameter type for 'out.mixing-engine', expected: boolean",
            ),
            (
                r#"{"id":"a","driver":"none","out":{"frequency":-5}}"#,
                "Parameter 'frequency' expects uint32_t",
            ),
            (
                r#"{"id":"a","driver":"none","out":{"frequency":1.5}}"#,
                "Parameter 'out.frequency' expects uint64",
            ),
            (
                r#"{"id":"a","driver":"none","timer-period":"5"}"#,
                "Parameter 'timer-period' expects uint64",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(err(text), message, "{text}");
        }
    }

    #[test]
    fn help_lists_the_drivers_qomvm_has() {
        assert!(is_help_option("help") && is_help_option("?"));
        assert_eq!(audio_help(), "Available audio drivers:\nnone\n");
    }

    #[test]
    fn only_none_backends_are_created_and_found_by_id() {
        let none = audio_parse_option("none,id=audio-test-none").unwrap();
        let pa = audio_parse_option("pa,id=audio-test-pa").unwrap();
        assert_eq!(
            audio_init_audiodevs(&[pa]).unwrap_err().1.to_string(),
            "Unknown audio driver `pa'"
        );
        assert_eq!(audio_state_by_name("audio-test-pa"), None);
        audio_init_audiodevs(&[none]).unwrap();
        assert_eq!(
            audio_state_by_name("audio-test-none"),
            Some(AudioState {
                id: "audio-test-none".into()
            })
        );
    }
}
