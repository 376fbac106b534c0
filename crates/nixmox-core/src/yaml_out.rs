//! Prints a JSON value as block-style YAML, quoting every string that a YAML reader could
//! take for something else.

use serde_json::Value;

/// Renders `value` as a YAML document (with a trailing newline).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(m) if !m.is_empty() => write_map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => write_seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    for _ in 0..n {
        out.push(' ');
    }
}

fn write_map(out: &mut String, m: &serde_json::Map<String, Value>, level: usize) {
    for (k, v) in m {
        indent(out, level);
        out.push_str(&key(k));
        out.push(':');
        write_child(out, v, level);
    }
}

fn write_seq(out: &mut String, a: &[Value], level: usize) {
    for v in a {
        indent(out, level);
        out.push('-');
        match v {
            Value::Object(m) if !m.is_empty() => {
                // The first key shares the dash's line, the rest align under it.
                let mut first = true;
                for (k, val) in m {
                    if first {
                        out.push(' ');
                        first = false;
                    } else {
                        indent(out, level + 2);
                    }
                    out.push_str(&key(k));
                    out.push(':');
                    write_child(out, val, level + 2);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(out, inner, level + 2);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn write_child(out: &mut String, v: &Value, level: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_map(out, m, level + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_seq(out, a, level + 2);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn key(k: &str) -> String {
    if is_plain_safe(k) {
        k.to_string()
    } else {
        quote(k)
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            if is_plain_safe(s) {
                s.clone()
            } else {
                quote(s)
            }
        }
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A double-quoted scalar in which every character a YAML reader might take for something
/// else is escaped: control characters, the line breaks YAML 1.1 readers know besides `\n`
/// (U+0085, U+2028, U+2029), DEL and the C1 controls, the byte-order mark and any other
/// non-printable character. Everything else is written as itself.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            c if printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// YAML's printable set (`c-printable`) without the line breaks and the byte-order mark.
fn printable(c: char) -> bool {
    matches!(c as u32, 0x20..=0x7e | 0xa0..=0x2027 | 0x202a..=0xd7ff | 0xe000..=0xfefe | 0xff00..=0xfffd | 0x10000..=0x10ffff)
}

/// True when `s` reads back as the same string when written unquoted, in YAML 1.2 and 1.1
/// readers alike (PyYAML, libyaml, yaml-rust2, go-yaml, SnakeYAML). Deliberately narrow: a
/// plain scalar holds only ASCII letters, digits, single spaces and `-_./:@+=%,()`; `:` is
/// never followed by a space or last; it is not one of the words readers turn into booleans
/// or null; and it starts with a letter or `/`, or is one of a few shapes no reader takes for
/// a number or a date: an option (`-x`, `--quiet`), a dotted name (`.nixmox/x`), a dotted
/// quad or CIDR (`10.0.0.1/24`), a duration (`10s`, `1m30s`). Anything else is quoted.
fn is_plain_safe(s: &str) -> bool {
    let b = s.as_bytes();
    let Some(&first) = b.first() else {
        return false;
    };
    if s.ends_with(' ') || s.ends_with(':') || s.contains(": ") || s.contains("  ") {
        return false;
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                ' ' | '-' | '_' | '.' | '/' | ':' | '@' | '+' | '=' | '%' | ',' | '(' | ')'
            )
    };
    if !s.chars().all(allowed) {
        return false;
    }
    let alpha_at = |i: usize| b.get(i).is_some_and(u8::is_ascii_alphabetic);
    let starts_well = match first {
        b'/' => true,
        c if c.is_ascii_alphabetic() => true,
        b'-' => alpha_at(1) || (b.get(1) == Some(&b'-') && alpha_at(2)),
        b'.' => alpha_at(1) && !matches!(s.to_ascii_lowercase().as_str(), ".inf" | ".nan"),
        c if c.is_ascii_digit() => {
            (s.matches('.').count() >= 2
                && s.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '/')))
                || is_duration(s)
        }
        _ => false,
    };
    // YAML 1.1's booleans and null, in any case (readers differ on which cases count).
    starts_well
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
        )
}

/// `10s`, `500ms`, `1m30s`, `2h`: digits and unit letters, alternating.
fn is_duration(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ms", "s", "m", "h", "d"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prints_and_reads_back() {
        let v = json!({"a": 1, "b": ["x", {"c": "true", "d": "1.5"}], "e": {}, "f": "a: b", "g": "", "h": "/guacamole", "i": "-x"});
        let y = to_yaml(&v);
        assert_eq!(y, "a: 1\nb:\n  - x\n  - c: \"true\"\n    d: \"1.5\"\ne: {}\nf: \"a: b\"\ng: \"\"\nh: /guacamole\ni: -x\n");
        let back = crate::syntax::parse(&y, crate::syntax::Format::Yaml)
            .unwrap()
            .unwrap();
        assert_eq!(crate::manifest::to_json(&back), v);
    }
}
