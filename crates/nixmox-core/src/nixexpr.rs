//! A small typed tree of Nix expressions and its one printer.
//!
//! Every manifest value reaches generated Nix through `Nix::Str` (or a validated identifier
//! type), and the printer escapes it; code fragments (`Nix::Code`) come only from NixMox's own
//! string literals, never from user input.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A Nix expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Nix {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    List(Vec<Nix>),
    /// An attribute set; keys are printed quoted when they are not plain identifiers.
    Attrs(BTreeMap<String, Nix>),
    /// A fragment of Nix code written by NixMox itself (`pkgs.postgresql_16`,
    /// `config.sops.secrets."x".path`). Never built from user input.
    Code(&'static str),
    /// Code assembled by NixMox from its own fragments and escaped values (see `Nix::select`).
    Expr(String),
    /// A relative path literal (`./hosts/web.nix`); built only through [`Nix::path`].
    Path(String),
    /// A double-quoted string mixing escaped text with interpolated expressions.
    Interp(Vec<Part>),
}

/// A piece of an interpolated string.
#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Lit(String),
    Expr(Nix),
}

impl Nix {
    pub fn str(s: impl Into<String>) -> Nix {
        Nix::Str(s.into())
    }
    pub fn list<I: IntoIterator<Item = Nix>>(items: I) -> Nix {
        Nix::List(items.into_iter().collect())
    }
    pub fn strs<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Nix {
        Nix::List(items.into_iter().map(|s| Nix::Str(s.into())).collect())
    }
    pub fn attrs<I: IntoIterator<Item = (K, Nix)>, K: Into<String>>(items: I) -> Nix {
        Nix::Attrs(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
    /// A relative path literal. Only NixMox's own sanitised names reach it: anything that is
    /// not `./` or `../` followed by `[A-Za-z0-9._/+-]` is refused by returning a string.
    pub fn path(p: &str) -> Nix {
        let ok = (p.starts_with("./") || p.starts_with("../"))
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '+' | '-'))
            && !p.ends_with('/')
            && !p.contains("//");
        if ok {
            Nix::Path(p.to_string())
        } else {
            Nix::Str(p.to_string())
        }
    }
    /// `base.path."segment"…` with every segment quoted as needed: safe for user strings.
    pub fn select(base: &'static str, path: &[&str]) -> Nix {
        let mut out = base.to_string();
        for seg in path {
            out.push('.');
            out.push_str(&attr_name(seg));
        }
        Nix::Expr(out)
    }
}

/// Builds nested attribute sets from dotted paths: `set(&mut m, "a.b.c", v)`.
pub fn set(map: &mut BTreeMap<String, Nix>, path: &[&str], value: Nix) {
    match path {
        [] => {}
        [last] => {
            map.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = map
                .entry((*first).to_string())
                .or_insert_with(|| Nix::Attrs(BTreeMap::new()));
            if !matches!(entry, Nix::Attrs(_)) {
                *entry = Nix::Attrs(BTreeMap::new());
            }
            if let Nix::Attrs(inner) = entry {
                set(inner, rest, value);
            }
        }
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '\'')
        && !matches!(
            s,
            "if" | "then" | "else" | "assert" | "with" | "let" | "in" | "rec" | "inherit" | "or"
        )
}

/// An attribute name, quoted and escaped unless it is a plain identifier.
pub fn attr_name(s: &str) -> String {
    if is_ident(s) {
        s.to_string()
    } else {
        quote(s)
    }
}

/// A double-quoted Nix string with `\`, `"`, `${` and control characters escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // `${` would start an interpolation; a `$` ending a literal part may be followed
            // by one (`$${` is not an interpolation in Nix, so it must not reach the text).
            '$' if matches!(chars.peek(), Some('{') | None) => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether a multi-line string can be printed as an indented `''` string that evaluates to
/// exactly the same text: Nix strips the smallest indentation of the lines, counts only
/// spaces, treats a trailing `'` next to the closing `''` as an escape, and drops a last line
/// made only of spaces.
fn fits_indented(s: &str) -> bool {
    let last_line = s.rsplit('\n').next().unwrap_or_default();
    let space_only_last_line = !last_line.is_empty() && last_line.bytes().all(|b| b == b' ');
    s.contains('\n')
        && !s.contains('\r')
        && !s.contains('\t')
        && !s.ends_with('\'')
        && !s.starts_with(' ')
        && !space_only_last_line
        && s.lines().any(|l| !l.is_empty() && !l.starts_with(' '))
}

/// Escapes text for an indented string. Nix's lexer takes the longest match, so each escape is
/// chosen to stay whole next to its neighbours: a pair of quotes is `'''`; a `$` before `{` (or
/// ending the text, where an interpolation may follow) is `''$`; and a lone `'` before such a
/// `''$` or ending the text (before the closing `''`) is `''\'`, since `'` + `''$` would read
/// as `'''` + `$`.
fn indented_escape(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    // Whether the `$` at `i` is written as the escape `''$`.
    let escaped_dollar = |i: usize| chars[i] == '$' && matches!(chars.get(i + 1), Some('{') | None);
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\'' => {
                let run = chars[i..].iter().take_while(|&&c| c == '\'').count();
                i += run;
                for _ in 0..run / 2 {
                    out.push_str("'''");
                }
                if run % 2 == 1 {
                    if i == chars.len() || escaped_dollar(i) {
                        out.push_str("''\\'");
                    } else {
                        out.push('\'');
                    }
                }
                continue;
            }
            '$' if escaped_dollar(i) => out.push_str("''$"),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn indented(s: &str, indent: usize) -> String {
    indented_body(&indented_escape(s), indent)
}

/// Lays out an already escaped body as an indented string.
fn indented_body(body: &str, indent: usize) -> String {
    let pad = " ".repeat(indent + 2);
    let mut out = String::from("''\n");
    let ends_with_newline = body.ends_with('\n');
    let lines: Vec<&str> = body.trim_end_matches('\n').split('\n').collect();
    let trailing = body.len() - body.trim_end_matches('\n').len();
    for (i, line) in lines.iter().enumerate() {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
        if i + 1 < lines.len() {
            out.push('\n');
        }
    }
    if ends_with_newline {
        for _ in 0..trailing {
            out.push('\n');
        }
        out.push_str(&" ".repeat(indent));
    }
    out.push_str("''");
    out
}

impl Nix {
    /// Prints the expression at an indentation level (in spaces).
    pub fn print(&self, indent: usize) -> String {
        let mut out = String::new();
        self.write(&mut out, indent);
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Nix::Null => out.push_str("null"),
            Nix::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Nix::Int(i) => {
                // Nix has no negative literals; `-1` parses as a unary minus, fine in any
                // position where we print it (list items and attribute values are wrapped).
                if *i < 0 {
                    let _ = write!(out, "({i})");
                } else {
                    let _ = write!(out, "{i}");
                }
            }
            Nix::Str(s) => {
                if fits_indented(s) {
                    out.push_str(&indented(s, indent));
                } else {
                    out.push_str(&quote(s));
                }
            }
            Nix::Code(c) => out.push_str(c),
            Nix::Expr(c) => out.push_str(c),
            Nix::Path(p) => out.push_str(p),
            Nix::Interp(parts) => write_interp(parts, out, indent),
            Nix::List(items) => write_list(items, out, indent),
            Nix::Attrs(map) => write_attrs(map, out, indent),
        }
    }
}

/// A string with interpolations: indented when the text would read back exactly (see
/// `fits_indented`), else quoted.
fn write_interp(parts: &[Part], out: &mut String, indent: usize) {
    // Indented form when the text would read back exactly (see `fits_indented`);
    // an interpolation stands in as `x` for that check.
    let probe: String = parts
        .iter()
        .map(|p| match p {
            Part::Lit(s) => s.as_str(),
            Part::Expr(_) => "x",
        })
        .collect();
    if fits_indented(&probe) {
        let body: String = parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => indented_escape(s),
                Part::Expr(e) => format!("${{{}}}", e.print(indent)),
            })
            .collect();
        out.push_str(&indented_body(&body, indent));
        return;
    }
    out.push('"');
    for part in parts {
        match part {
            Part::Lit(s) => {
                let q = quote(s);
                out.push_str(&q[1..q.len() - 1]);
            }
            Part::Expr(e) => {
                out.push_str("${");
                out.push_str(&e.print(indent));
                out.push('}');
            }
        }
    }
    out.push('"');
}

/// A list: on one line when it is short and plain, else one item per line.
fn write_list(items: &[Nix], out: &mut String, indent: usize) {
    if items.is_empty() {
        out.push_str("[ ]");
    } else if items.iter().all(|i| {
        matches!(i, Nix::Str(s) if !s.contains('\n'))
            || matches!(i, Nix::Int(_) | Nix::Bool(_) | Nix::Code(_) | Nix::Expr(_))
    }) && items.len() <= 4
    {
        out.push_str("[ ");
        for i in items {
            let s = i.print(indent);
            if matches!(i, Nix::Code(_) | Nix::Expr(_)) && s.contains(' ') && !s.starts_with('(') {
                let _ = write!(out, "({s}) ");
            } else {
                out.push_str(&s);
                out.push(' ');
            }
        }
        out.push(']');
    } else {
        out.push_str("[\n");
        for i in items {
            out.push_str(&" ".repeat(indent + 2));
            let s = i.print(indent + 2);
            if matches!(i, Nix::Code(_) | Nix::Expr(_)) && s.contains(' ') && !s.starts_with('(') {
                let _ = write!(out, "({s})");
            } else {
                out.push_str(&s);
            }
            out.push('\n');
        }
        out.push_str(&" ".repeat(indent));
        out.push(']');
    }
}

/// An attribute set, one attribute per line, single-key chains collapsed into dotted paths.
fn write_attrs(map: &BTreeMap<String, Nix>, out: &mut String, indent: usize) {
    if map.is_empty() {
        out.push_str("{ }");
        return;
    }
    out.push_str("{\n");
    for (k, v) in map {
        out.push_str(&" ".repeat(indent + 2));
        // Collapse single-key chains into dotted paths: `a.b.c = 1;`.
        let mut key = attr_name(k);
        let mut value = v;
        while let Nix::Attrs(inner) = value {
            if inner.len() != 1 {
                break;
            }
            let (ik, iv) = inner.iter().next().expect("one entry");
            key.push('.');
            key.push_str(&attr_name(ik));
            value = iv;
        }
        let _ = write!(out, "{key} = ");
        value.write(out, indent + 2);
        out.push_str(";\n");
    }
    out.push_str(&" ".repeat(indent));
    out.push('}');
}

/// A whole `.nix` file: a header comment, then a module function or a plain expression.
pub fn file(header: &str, args: Option<&[&str]>, body: &Nix) -> String {
    let mut out = String::new();
    for line in header.lines() {
        // A comment ends at `\r` as well as `\n` in Nix's lexer: no control character may
        // reach one, or text after it would be read as code.
        let line: String = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = writeln!(out, "# {line}");
    }
    if let Some(args) = args {
        let _ = writeln!(out, "{{ {}, ... }}:", args.join(", "));
    }
    out.push_str(&body.print(0));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c${d}$e\n"), "\"a\\\"b\\\\c\\${d}$e\\n\"");
        assert_eq!(attr_name("services"), "services");
        assert_eq!(attr_name("guac.nixmox.lan"), "\"guac.nixmox.lan\"");
        assert_eq!(attr_name("if"), "\"if\"");
    }

    #[test]
    fn indented_strings_only_when_exact() {
        assert!(fits_indented("a\n  b\n"));
        assert!(!fits_indented("  a\n  b\n"));
        assert!(!fits_indented("a\n\tb\n"));
        assert!(!fits_indented("a'\nb'"));
        // Nix drops a last line of spaces: found by the hostile-strings property test.
        assert!(!fits_indented("\nhandle {\n respond pwned\n}\n "));
        assert!(fits_indented("\nhandle {\n respond pwned\n}\n"));
        assert_eq!(
            indented("a\n  b ${x} ''\n", 2),
            "''\n    a\n      b ''${x} '''\n  ''"
        );
    }

    #[test]
    fn nested_sets_collapse() {
        let mut m = BTreeMap::new();
        set(&mut m, &["services", "caddy", "enable"], Nix::Bool(true));
        set(&mut m, &["networking", "hostName"], Nix::str("web"));
        set(&mut m, &["networking", "domain"], Nix::str("lan"));
        assert_eq!(
            Nix::Attrs(m).print(0),
            "{\n  networking = {\n    domain = \"lan\";\n    hostName = \"web\";\n  };\n  services.caddy.enable = true;\n}"
        );
    }
}
