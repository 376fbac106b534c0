//! Typed reading of a syntax tree that records every problem instead of stopping at the first.
//!
//! Each reader returns `None` after recording a diagnostic, so callers keep going and the user
//! sees all their mistakes at once.

use crate::diag::{did_you_mean, Diagnostic, Severity};
use crate::syntax::{Entry, Kind, Node, Span};

/// The decoding context of one file.
pub struct Cx<'s> {
    pub file: String,
    text: &'s str,
    /// The lines of `text`, split when the first diagnostic needs a snippet: most files have
    /// none, and splitting every file of a large project was a few percent of loading it.
    lines: std::sync::OnceLock<Vec<&'s str>>,
    pub diags: Vec<Diagnostic>,
}

/// Joins a field path: `join("network", "cidr") == "network.cidr"`.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        return key.to_string();
    }
    // Built by hand: decoding joins a path for nearly every field it reads, and `format!`
    // costs several times as much as two copies.
    let mut out = String::with_capacity(path.len() + 1 + key.len());
    out.push_str(path);
    out.push('.');
    out.push_str(key);
    out
}

/// Parts of key names that mark a value as a secret, or as one that may hold one: Proxmox's
/// token, and what Terraform backends call their credentials (`password`, `access_key`,
/// `secret_key`, `sas_token`, `client_secret`, `credentials`, `conn_str`, `http_auth`, ...).
/// Matched case-insensitively anywhere in the key.
pub const SECRET_KEY_PARTS: &[&str] = &[
    "token",
    "password",
    "passwd",
    "secret",
    "credential",
    "access_key",
    "private_key",
    "encryption_key",
    "api_key",
    "apikey",
    "conn_str",
    "http_auth",
];

/// The replacement of a secret value in a snippet.
pub const REDACTED: &str = "<redacted>";

/// True when a key name looks like it holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|p| key.contains(p))
}

/// True when the last key of a field path (`proxmox.token`, `terraform.backend.config.password`,
/// `x.tokens[2]`) looks like it holds a secret.
pub fn is_secret_field(path: &str) -> bool {
    path.split('.')
        .next_back()
        .map(|k| k.split('[').next().unwrap_or(k))
        .is_some_and(is_secret_key)
}

/// The line with the scalar value of every secret-named key (`token: abc`, `"password": "x"`,
/// `{token: abc, ...}`) replaced by `<redacted>`; `None` when the line has none. A value that
/// opens a mapping or a list (`token: { env: X }`) is left alone: its own keys are checked.
pub fn redact_line(line: &str) -> Option<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut changed = false;
    let mut flow = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        out.push(c);
        i += 1;
        match c {
            '{' | '[' => flow += 1,
            '}' | ']' => flow = flow.saturating_sub(1),
            ':' if chars.get(i).is_none_or(|n| n.is_whitespace())
                || (i >= 2 && matches!(chars[i - 2], '"' | '\'')) =>
            {
                // The key is the word before the colon, without its quotes.
                let before: String = out[..out.len() - 1]
                    .trim_end()
                    .trim_end_matches(['"', '\''])
                    .chars()
                    .rev()
                    .take_while(|k| k.is_alphanumeric() || matches!(k, '_' | '-' | '.'))
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                if !is_secret_key(&before) {
                    continue;
                }
                while chars.get(i).is_some_and(|n| n.is_whitespace()) {
                    out.push(chars[i]);
                    i += 1;
                }
                let Some(&first) = chars.get(i) else { continue };
                if matches!(first, '{' | '[' | '#' | '&' | '*' | '|' | '>') {
                    continue;
                }
                // The value runs to its closing quote, or (plain) to the end of the line, a
                // comment, or in a flow collection the next `,`, `}` or `]`.
                let mut j = i;
                if first == '"' || first == '\'' {
                    j += 1;
                    while j < chars.len() && chars[j] != first {
                        if first == '"' && chars[j] == '\\' {
                            j += 1;
                        }
                        j += 1;
                    }
                    j = (j + 1).min(chars.len());
                } else {
                    while j < chars.len()
                        && !(flow > 0 && matches!(chars[j], ',' | '}' | ']'))
                        && !(chars[j] == '#' && chars[j - 1].is_whitespace())
                    {
                        j += 1;
                    }
                }
                out.push_str(REDACTED);
                i = j;
                changed = true;
            }
            _ => {}
        }
    }
    changed.then_some(out)
}

/// `index("interface.proxy", 1) == "interface.proxy[1]"`.
pub fn index(path: &str, i: usize) -> String {
    let digits = i.to_string();
    let mut out = String::with_capacity(path.len() + 2 + digits.len());
    out.push_str(path);
    out.push('[');
    out.push_str(&digits);
    out.push(']');
    out
}

impl<'s> Cx<'s> {
    pub fn new(file: &str, text: &'s str) -> Self {
        Cx {
            file: file.to_string(),
            text,
            lines: std::sync::OnceLock::new(),
            diags: Vec::new(),
        }
    }

    /// A context for the same file with no diagnostics yet, for work on another thread whose
    /// diagnostics are merged back.
    pub fn sibling(&self) -> Self {
        Cx::new(&self.file, self.text)
    }

    pub fn errors(&self) -> usize {
        self.diags.iter().filter(|d| d.is_error()).count()
    }

    /// Builds a diagnostic pointing at `span` in this file.
    pub fn diag(
        &self,
        severity: Severity,
        span: Span,
        field: &str,
        message: String,
        help: Option<String>,
    ) -> Diagnostic {
        // Parsers report "unexpected end of input" one line past the last one; point at the
        // end of the last line instead, where the reader can see it.
        let lines = self
            .lines
            .get_or_init(|| crate::syntax::lines(self.text).collect());
        let span = match lines.last() {
            Some(last) if span.line as usize > lines.len() => Span::new(
                u32::try_from(lines.len()).unwrap_or(u32::MAX),
                u32::try_from(last.chars().count() + 1).unwrap_or(u32::MAX),
            ),
            _ => span,
        };
        let line = lines.get(span.line.saturating_sub(1) as usize);
        // Never echo a secret: a secret-named key's value is blanked in the snippet; when the
        // problem is in a secret field whose value is not on that key's line (a block scalar),
        // the snippet is left out.
        let snippet = line.and_then(|l| match redact_line(l) {
            Some(redacted) => Some(redacted),
            None if is_secret_field(field) => None,
            None => Some(l.to_string()),
        });
        let width = snippet
            .as_deref()
            .map(|l| token_width(l, span.col))
            .unwrap_or(1);
        Diagnostic {
            severity,
            file: self.file.clone(),
            span: Some(span),
            field: (!field.is_empty()).then(|| field.to_string()),
            message,
            snippet,
            width,
            help,
        }
    }

    pub fn error(
        &mut self,
        span: Span,
        field: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let d = self.diag(Severity::Error, span, field, message.into(), help);
        self.diags.push(d);
    }

    pub fn warning(
        &mut self,
        span: Span,
        field: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let d = self.diag(Severity::Warning, span, field, message.into(), help);
        self.diags.push(d);
    }

    fn type_error(&mut self, node: &Node, path: &str, expected: &str) {
        let found = match &node.kind {
            // A secret field's value is never repeated, whatever its type.
            other if is_secret_field(path) => other.describe().to_string(),
            Kind::Str(s) if s.chars().count() <= 40 => format!("the string `{s}`"),
            Kind::Int(i) => format!("the integer {i}"),
            Kind::Bool(b) => format!("the boolean {b}"),
            other => other.describe().to_string(),
        };
        let field = last(path);
        let subject = if field.is_empty() {
            "the document".to_string()
        } else {
            format!("`{field}`")
        };
        self.error(
            node.span,
            path,
            format!("{subject} must be {expected}, found {found}"),
            None,
        );
    }

    /// Reads a mapping and reports keys outside `known` (keys starting with `x-` are user
    /// extensions, as in Docker Compose, and are ignored).
    pub fn map<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<&'n [Entry]> {
        match &node.kind {
            Kind::Map(entries) => {
                for e in entries {
                    // `$schema` lets JSON users point editors at the schema.
                    if known.contains(&e.key.as_str())
                        || e.key.starts_with("x-")
                        || (path.is_empty() && e.key == "$schema")
                    {
                        continue;
                    }
                    let help = match did_you_mean(&e.key, known.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("expected one of: {}", known.join(", ")),
                    };
                    let where_ = if path.is_empty() {
                        String::new()
                    } else {
                        format!(" in `{path}`")
                    };
                    self.error(
                        e.key_span,
                        &join(path, &e.key),
                        format!("unknown field `{}`{where_}", e.key),
                        Some(help),
                    );
                }
                Some(entries)
            }
            _ => {
                self.type_error(node, path, "a mapping");
                None
            }
        }
    }

    /// A required field: reports it missing at the mapping's position.
    pub fn required<'n>(&mut self, map: &'n Node, path: &str, key: &str) -> Option<&'n Node> {
        match field(map, key) {
            Some(n) => Some(n),
            None => {
                let where_ = if path.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in `{path}`")
                };
                self.error(
                    map.span,
                    &join(path, key),
                    format!("missing required field `{key}` {where_}"),
                    None,
                );
                None
            }
        }
    }

    /// A string; plain numbers are accepted as their text, like Docker Compose does.
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.kind {
            Kind::Str(s) => Some(s.clone()),
            Kind::Int(i) => Some(i.to_string()),
            Kind::Float(f) => Some(f.to_string()),
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    pub fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.kind {
            Kind::Bool(b) => Some(*b),
            _ => {
                self.type_error(node, path, "a boolean (true or false)");
                None
            }
        }
    }

    /// An integer within `min..=max`, with the range in the error.
    pub fn int(&mut self, node: &Node, path: &str, min: i64, max: i64, unit: &str) -> Option<i64> {
        let value = match &node.kind {
            Kind::Int(i) => *i,
            Kind::Str(s) if s.trim().parse::<i64>().is_ok() => s.trim().parse::<i64>().ok()?,
            _ => {
                self.type_error(node, path, "an integer");
                return None;
            }
        };
        if value < min || value > max {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            self.error(
                node.span,
                path,
                format!("`{}` is {value}{unit}, out of range", last(path)),
                Some(format!(
                    "`{}` must be between {min} and {max}{unit}",
                    last(path)
                )),
            );
            return None;
        }
        Some(value)
    }

    pub fn list<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.type_error(node, path, "a list");
                None
            }
        }
    }

    /// A list of strings; a single string is accepted as a list of one.
    pub fn strings(&mut self, node: &Node, path: &str) -> Vec<(String, Span)> {
        match &node.kind {
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, n)| self.string(n, &index(path, i)).map(|s| (s, n.span)))
                .collect(),
            Kind::Str(s) => vec![(s.clone(), node.span)],
            _ => {
                self.type_error(node, path, "a list of strings");
                Vec::new()
            }
        }
    }

    /// A duration: integer seconds or a string like `500ms`, `10s`, `5m`, `1h30m`.
    pub fn duration(&mut self, node: &Node, path: &str) -> Option<u64> {
        match &node.kind {
            Kind::Int(i) if *i >= 0 => Some(u64::try_from(*i).ok()?.saturating_mul(1000)),
            Kind::Str(s) => match parse_duration_ms(s) {
                Some(ms) => Some(ms),
                None => {
                    self.error(
                        node.span,
                        path,
                        format!("invalid duration `{s}`"),
                        Some("use whole seconds (30) or a number with a unit: 500ms, 10s, 5m, 1h, 1m30s".into()),
                    );
                    None
                }
            },
            _ => {
                self.type_error(node, path, "a duration (seconds or a string like `10s`)");
                None
            }
        }
    }

    /// One object or a list of them, as the manifest allows for `db`, `proxy` and `terraform`.
    pub fn one_or_many<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(&'n Node, String)> {
        match &node.kind {
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (n, index(path, i)))
                .collect(),
            _ => vec![(node, path.to_string())],
        }
    }
}

/// A field of a mapping; an explicit `null` counts as absent, as in Docker Compose.
pub fn field<'n>(map: &'n Node, key: &str) -> Option<&'n Node> {
    map.get(key).filter(|n| n.kind != Kind::Null)
}

fn last(path: &str) -> &str {
    let tail = path.rsplit('.').next().unwrap_or(path);
    tail.split('[').next().unwrap_or(tail)
}

/// How wide the token starting at `col` is, for underlining.
fn token_width(line: &str, col: u32) -> u32 {
    let rest: String = line.chars().skip(col.saturating_sub(1) as usize).collect();
    let mut width = 0u32;
    let mut quote: Option<char> = None;
    for (i, c) in rest.chars().enumerate() {
        match quote {
            Some(q) => {
                width += 1;
                if c == q && i > 0 {
                    break;
                }
            }
            None => {
                if i == 0 && (c == '"' || c == '\'') {
                    quote = Some(c);
                    width += 1;
                    continue;
                }
                let next = rest.chars().nth(i + 1);
                if matches!(c, ',' | '}' | ']')
                    || (c == '#' && i > 0)
                    || (c == ':' && i > 0 && next.is_none_or(|n| n == ' '))
                {
                    break;
                }
                width += 1;
            }
        }
    }
    let trimmed = rest
        .chars()
        .take(width as usize)
        .collect::<String>()
        .trim_end()
        .chars()
        .count();
    u32::try_from(trimmed).unwrap_or(1).max(1)
}

/// Parses `500ms`, `10s`, `5m`, `1h30m`, `2d` or a bare number of seconds into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<u64>() {
        return secs.checked_mul(1000);
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(factor)?)?;
    }
    Some(total)
}

/// Formats milliseconds back into the shortest duration string (`90000` → `1m30s`).
pub fn format_duration_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("10s"), Some(10_000));
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("30"), Some(30_000));
        assert_eq!(parse_duration_ms("10 parsecs"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(format_duration_ms(90_000), "1m30s");
        assert_eq!(format_duration_ms(500), "500ms");
        assert_eq!(format_duration_ms(3_600_000), "1h");
    }

    #[test]
    fn secrets_are_redacted_from_snippets() {
        let r = |l: &str| redact_line(l);
        assert_eq!(r("  token: abc123").as_deref(), Some("  token: <redacted>"));
        assert_eq!(
            r("proxmox: {token: 'a,b', node: pve1}").as_deref(),
            Some("proxmox: {token: <redacted>, node: pve1}")
        );
        assert_eq!(
            r(r#"{"password":"p\"w", "secret_key": "x"}"#).as_deref(),
            Some(r#"{"password":<redacted>, "secret_key": <redacted>}"#)
        );
        assert_eq!(r("  token: { env: PROXMOX_API_TOKEN }"), None);
        assert_eq!(
            r("  Access_Key: x # the key").as_deref(),
            Some("  Access_Key: <redacted># the key")
        );
        assert_eq!(r("  endpoint: https://pve:8006"), None);
        assert!(is_secret_field("proxmox.token"));
        assert!(is_secret_field("terraform.backend.config.sas_token"));
        assert!(!is_secret_field("ssh.authorized_keys[0]"));
    }

    #[test]
    fn widths() {
        assert_eq!(token_width("  cidrr: 10.0.0.0/24", 3), 5);
        assert_eq!(token_width("  cidr: 10.0.0.0/24 # x", 9), 11);
        assert_eq!(token_width("a: {x: \"a, b\"}", 8), 6);
        assert_eq!(token_width("  liveness: http://a.lan:80a/h", 13), 18);
    }
}
