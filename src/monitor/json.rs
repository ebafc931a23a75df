//! JSON as QMP speaks it (QEMU's `qobject/json-streamer.c` and `qobject/qjson.c`): a
//! streaming splitter that cuts a byte stream into top-level JSON values without waiting
//! for newlines, with a size cap per message, and a serializer that writes QEMU's
//! spelling (`{"return": {}}`, `", "` and `": "` separators, non-ASCII as `\uXXXX`).

use serde_json::Value;

/// Largest message a client may send; QEMU's own limit is larger (64 MiB), but nothing a
/// client has to say to qomvm comes near 1 MiB.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What the splitter found.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// A complete top-level value's text, to be parsed.
    Text(Vec<u8>),
    /// A message grew past [`MAX_MESSAGE`]; the rest of it is skipped.
    TooLarge,
}

/// Cuts a byte stream into top-level JSON values by counting braces and brackets outside
/// strings, as QEMU's JSON streamer does. Scalars at the top level (`1`, `true`, `"x"`)
/// are messages of their own.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Inside a top-level scalar (number or keyword).
    in_scalar: bool,
    /// Skipping the rest of an oversized message.
    discarding: bool,
}

impl Splitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    fn finish(&mut self, out: &mut Vec<Message>) {
        if self.discarding {
            self.discarding = false;
        } else {
            out.push(Message::Text(std::mem::take(&mut self.buf)));
        }
        self.buf.clear();
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.in_scalar = false;
    }

    fn push(&mut self, b: u8, out: &mut Vec<Message>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE {
            self.buf = Vec::new();
            self.discarding = true;
            out.push(Message::TooLarge);
            return;
        }
        self.buf.push(b);
    }

    /// Feeds bytes; returns the messages they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        for &b in bytes {
            self.feed_byte(b, &mut out);
        }
        out
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Message>) {
        if self.in_string {
            self.push(b, out);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            return;
        }
        if self.in_scalar {
            if b.is_ascii_whitespace()
                || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
            {
                self.finish(out);
                // The delimiter starts the next message.
                self.feed_byte(b, out);
            } else {
                self.push(b, out);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.push(b, out);
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.push(b, out);
            }
            b'}' | b']' => {
                self.push(b, out);
                if self.depth <= 1 {
                    // The end of a message, or a stray closer (a message of its own, which
                    // fails to parse).
                    self.finish(out);
                } else {
                    self.depth -= 1;
                }
            }
            _ if b.is_ascii_whitespace() => {
                if self.depth > 0 {
                    self.push(b, out);
                }
            }
            _ => {
                if self.depth == 0 {
                    self.in_scalar = true;
                }
                self.push(b, out);
            }
        }
    }
}

/// Parses one message; the error is worded as QEMU words JSON errors.
pub fn parse(text: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(text).map_err(|e| format!("JSON parse error, {}", describe(&e)))
}

/// QEMU's wording for the common JSON mistakes; serde_json's otherwise (without the
/// position, which QEMU does not give either).
fn describe(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let text = match full.find(" at line ") {
        Some(i) => &full[..i],
        None => &full,
    };
    match text {
        "expected value" | "EOF while parsing a value" => "expecting value".into(),
        "key must be a string" => "key is not a string in object".into(),
        "expected `:`" => "missing : in object pair".into(),
        "expected `,` or `}`" | "EOF while parsing an object" => {
            "expected separator in dict".into()
        }
        "expected `,` or `]`" | "EOF while parsing a list" => "expected separator in list".into(),
        "invalid escape" => "invalid escape sequence in string".into(),
        "EOF while parsing a string" => "missing terminating quote".into(),
        "expected ident" => "invalid keyword".into(),
        other => other.to_string(),
    }
}

/// Serializes `v` as QEMU's `qobject_to_json` does.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write_value(v, &mut out);
    out
}

fn write_value(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

fn write_str(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn texts(msgs: Vec<Message>) -> Vec<String> {
        msgs.into_iter()
            .map(|m| match m {
                Message::Text(t) => String::from_utf8(t).unwrap(),
                Message::TooLarge => "<too large>".to_string(),
            })
            .collect()
    }

    #[test]
    fn messages_are_cut_at_the_closing_brace_not_at_newlines() {
        let mut s = Splitter::new();
        assert!(s.feed(b"{\"execute\":\n \"a\"").is_empty());
        assert_eq!(
            texts(s.feed(b"}{\"execute\": \"b}\\\"{\"}  [1, [2]] ")),
            vec![
                "{\"execute\":\n \"a\"}",
                "{\"execute\": \"b}\\\"{\"}",
                "[1, [2]]"
            ]
        );
    }

    #[test]
    fn top_level_scalars_and_stray_closers_are_messages() {
        let mut s = Splitter::new();
        assert_eq!(
            texts(s.feed(b"1 true{} \"x\"}")),
            vec!["1", "true", "{}", "\"x\"", "}"]
        );
    }

    #[test]
    fn an_oversized_message_is_reported_once_and_skipped() {
        let mut s = Splitter::new();
        let mut big = b"{\"execute\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'{', MAX_MESSAGE + 10));
        big.extend(b"\"}{\"execute\": \"ok\"}");
        assert_eq!(
            texts(s.feed(&big)),
            vec!["<too large>", "{\"execute\": \"ok\"}"]
        );
    }

    #[test]
    fn errors_use_qemus_words() {
        assert_eq!(
            parse(b"{\"execute\": }").unwrap_err(),
            "JSON parse error, expecting value"
        );
        assert_eq!(
            parse(b"{1: 2}").unwrap_err(),
            "JSON parse error, key is not a string in object"
        );
    }

    #[test]
    fn output_is_spelled_as_qemu_spells_it() {
        let v = json!({"return": {}, "id": ["a", 1, true, null, "é\n"]});
        assert_eq!(
            to_string(&v),
            r#"{"return": {}, "id": ["a", 1, true, null, "\u00E9\n"]}"#
        );
    }
}
