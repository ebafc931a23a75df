//! QEMU's option-string syntax (`util/qemu-option.c`): items separated by `,`, where `,,`
//! stands for a literal comma. `-device`, `-machine`, `-chardev` and Multiboot's `-initrd`
//! list all use it.

/// Splits `text` at single commas, turning `,,` into `,` (QEMU's `get_opt_value`).
pub fn split_commas(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

/// QemuOpts' boolean: `on`/`yes`/`true` or `off`/`no`/`false`, a bare key (`None`)
/// meaning `on`; anything else is `None`.
pub fn parse_on_off(value: Option<&str>) -> Option<bool> {
    match value {
        None | Some("on" | "yes" | "true") => Some(true),
        Some("off" | "no" | "false") => Some(false),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_commas_are_literal() {
        assert_eq!(split_commas("a,b=c,,d,"), ["a", "b=c,d", ""]);
        assert_eq!(split_commas(""), [""]);
    }
}

