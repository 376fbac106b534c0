//! Checks of rendered text in the grammar of each generated language, for the tests and the
//! fuzz target (issue 13): whatever a manifest holds, a value stays inside the string, token
//! or field it was put in. These read the output; they are not used to produce it.
//!
//! Nix is checked by `nix-instantiate --parse` (tests) and rnix (the fuzz target); Caddy by
//! `caddy adapt` and Unbound by `unbound-checkconf` (tests). What can be checked without a
//! tool is here: Terraform's JSON syntax and templates, pg_hba lines, and the Caddyfile
//! tokens NixMox writes.

use serde_json::Value;

use crate::model::{Capability, Project};
use crate::render::Rendered;

/// Every check that applies to a project's rendered output: its Terraform JSON files, and
/// what each provider implementation checks of its own (`Provider::check`: the database
/// host's pg_hba lines, the Caddy sites). Empty when all is well.
pub fn rendered(p: &Project, r: &Rendered) -> Vec<String> {
    let mut out = Vec::new();
    for f in r.files.iter().filter(|f| f.path.ends_with(".tf.json")) {
        out.extend(
            terraform_json(&f.contents)
                .into_iter()
                .map(|e| format!("{}: {e}", f.path)),
        );
    }
    // Each implementation checks what it rendered (the database's pg_hba lines, the reverse
    // proxy's sites).
    for cap in Capability::ALL {
        if let (Some(me), Some(imp)) = (p.provider_index(cap), p.implementation(cap)) {
            out.extend(imp.check(p, me));
        }
    }
    out
}

/// Problems with one `*.tf.json` file: it must be JSON, and every `${`/`%{` left live (not
/// doubled) must be a whole string that is one of NixMox's own references
/// (`${data.x.y.id}`, `${var.x}`, `${module.x}`, `${<resource type>.x.y}`).
pub fn terraform_json(text: &str) -> Vec<String> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return vec![format!("not JSON: {e}")],
    };
    let mut out = Vec::new();
    walk_tf(&value, "", &mut out);
    out
}

fn walk_tf(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if let Some(why) = live_template(s) {
                out.push(format!("{path}: {why} in {s:?}"));
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                walk_tf(x, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                // Keys are templates too; NixMox's own keys never hold a reference.
                if live_sequences(k) != (false, false) {
                    out.push(format!("{path}: a live template in the key {k:?}"));
                }
                walk_tf(x, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Why a string has a live template that is not one of NixMox's references, if it has one.
fn live_template(s: &str) -> Option<&'static str> {
    let (interpolation, directive) = live_sequences(s);
    if directive {
        return Some("a live template directive");
    }
    if !interpolation {
        return None;
    }
    live_reference(s)
}

/// Whether `s` holds a live `${` and a live `%{`, scanned left to right as HCL's template
/// scanner does: `$${` and `%%{` are escapes (`$$${` is a literal `$` then the escape `$${`).
/// Deleting the escapes first would join what is left into new sequences (`$$${{` would
/// become `${`).
fn live_sequences(s: &str) -> (bool, bool) {
    let (mut interpolation, mut directive) = (false, false);
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("$${") || rest.starts_with("%%{") {
            rest = &rest[3..];
        } else if rest.starts_with("${") {
            interpolation = true;
            rest = &rest[2..];
        } else if rest.starts_with("%{") {
            directive = true;
            rest = &rest[2..];
        } else {
            rest = &rest[c.len_utf8()..];
        }
    }
    (interpolation, directive)
}

/// A string with a live `${`: allowed only when it is one of NixMox's own references.
fn live_reference(s: &str) -> Option<&'static str> {
    let reference = s
        .strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .is_some_and(|r| {
            let mut parts = r.split('.');
            let head = parts.next().unwrap_or("");
            let known = matches!(head, "data" | "var" | "module" | "local")
                || head.starts_with("authentik_")
                || head.starts_with("postgresql_")
                || head.starts_with("proxmox_");
            known
                && r.split('.').count() >= 2
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    (!reference).then_some("a live interpolation")
}

/// Problems with `pg_hba.conf` text (`services.postgresql.authentication`): each line is
/// `host DATABASE ROLE ADDRESS/32 scram-sha-256`, the names plain or double-quoted and never
/// one of pg_hba's keywords (which would widen the line to every database or role).
pub fn pg_hba(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ok = match fields.as_slice() {
            ["host", db, role, addr, "scram-sha-256"] => {
                hba_name(db) && hba_name(role) && hba_addr(addr)
            }
            _ => false,
        };
        if !ok {
            out.push(format!("line {}: {line:?}", n + 1));
        }
    }
    out
}

fn hba_name(s: &str) -> bool {
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        // Quoted: a literal name, keywords included; no quote inside.
        !inner.is_empty() && !inner.contains('"')
    } else {
        plain(s)
            && !matches!(
                s,
                "all" | "sameuser" | "samerole" | "samegroup" | "replication"
            )
            && !s.starts_with('+')
            && !s.starts_with('@')
    }
}

fn hba_addr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, len)| {
        ip.parse::<core::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32)
    })
}

/// One token of a Caddyfile line, as Caddy 2.6+ reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    pub text: String,
    /// Written in quotes or backticks (so `{` in it is not a block).
    pub quoted: bool,
}

/// Splits Caddyfile text into lines of tokens the way Caddy's lexer does: `"…"` with `\"` as
/// its only escape (other backslashes are kept), `` `…` `` with none, `#` starting a comment
/// at the start of a token. `Err` on an unterminated quote.
pub fn caddy_tokens(text: &str) -> Result<Vec<Vec<Token>>, String> {
    let mut lines = Vec::new();
    let mut line: Vec<Token> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut cur = String::new();
    let mut in_token = false;
    while let Some(c) = chars.next() {
        match c {
            '"' | '`' if !in_token => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated {c} quote")),
                        Some('\\') if c == '"' && chars.peek() == Some(&'"') => {
                            chars.next();
                            s.push('"');
                        }
                        Some(x) if x == c => break,
                        Some(x) => s.push(x),
                    }
                }
                line.push(Token {
                    text: s,
                    quoted: true,
                });
            }
            '#' if !in_token => {
                for x in chars.by_ref() {
                    if x == '\n' {
                        break;
                    }
                }
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
            }
            '\n' => {
                if in_token {
                    line.push(Token {
                        text: std::mem::take(&mut cur),
                        quoted: false,
                    });
                    in_token = false;
                }
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
            }
            c if c.is_whitespace() => {
                if in_token {
                    line.push(Token {
                        text: std::mem::take(&mut cur),
                        quoted: false,
                    });
                    in_token = false;
                }
            }
            c => {
                in_token = true;
                cur.push(c);
            }
        }
    }
    if in_token {
        line.push(Token {
            text: cur,
            quoted: false,
        });
    }
    if !line.is_empty() {
        lines.push(line);
    }
    Ok(lines)
}

/// Problems with a site's Caddyfile text (`extraConfig`): it must lex; braces open and close
/// blocks only as whole unquoted tokens and balance; no token holds a placeholder NixMox did
/// not write (`{env.…}`, `{$…}`, `{file.…}`: anything in braces inside a token).
pub fn caddyfile(text: &str) -> Vec<String> {
    let lines = match caddy_tokens(text) {
        Ok(l) => l,
        Err(e) => return vec![e],
    };
    let mut out = Vec::new();
    let mut depth = 0i32;
    for l in &lines {
        for t in l {
            if !t.quoted && t.text == "{" {
                depth += 1;
            } else if !t.quoted && t.text == "}" {
                depth -= 1;
                if depth < 0 {
                    out.push("a `}` closes no block".into());
                }
            } else if t.text.contains('{') || t.text.contains('}') {
                out.push(format!("a placeholder or brace in the token {:?}", t.text));
            }
        }
    }
    if depth != 0 {
        out.push(format!("{depth} block(s) left open"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_read_left_to_right_as_hcl_does() {
        assert_eq!(live_template("$$${{env.X}"), None);
        assert_eq!(live_template("$$${*/$$${{env.X}'"), None);
        assert_eq!(live_template("a $${b} %%{c}"), None);
        assert_eq!(live_template("$${x} ${y}"), Some("a live interpolation"));
        assert_eq!(
            live_template("%{ if x }"),
            Some("a live template directive")
        );
    }

    #[test]
    fn terraform_templates() {
        assert!(terraform_json(r#"{"a": "${data.x.y.id}", "b": "$${x}"}"#).is_empty());
        assert_eq!(
            terraform_json(r#"{"a": "x ${file(\"/etc/shadow\")}"}"#).len(),
            1
        );
        assert_eq!(terraform_json(r#"{"${x}": 1}"#).len(), 1);
        assert_eq!(terraform_json(r#"{"a": "%{ if true }"}"#).len(), 1);
        assert!(terraform_json("{").len() == 1);
    }

    #[test]
    fn hba_lines() {
        assert!(pg_hba("host  app  app  10.0.0.5/32 scram-sha-256\n").is_empty());
        assert!(pg_hba("host \"a-b\" app 127.0.0.1/32 scram-sha-256\n").is_empty());
        assert_eq!(pg_hba("host all app 10.0.0.5/32 scram-sha-256\n").len(), 1);
        assert_eq!(pg_hba("host app app 10.0.0.5/32 trust\n").len(), 1);
    }

    #[test]
    fn caddy_lexing() {
        let t = caddy_tokens("header X `a \\ \"b\"` \"c\\\"d\\e\"\n").unwrap();
        assert_eq!(t[0][2].text, "a \\ \"b\"");
        assert_eq!(t[0][3].text, "c\"d\\e");
        assert!(caddyfile("handle {\n  header X `a`\n}\n").is_empty());
        assert_eq!(caddyfile("header X `{env.X}`\n").len(), 1);
        assert_eq!(caddyfile("handle {\n").len(), 1);
        assert_eq!(caddyfile("header X \"a\n").len(), 1);
    }
}
