//! Parses YAML and JSON text into a tree whose every node knows its line and column.
//!
//! Validation reports every problem with a location, so it works on this tree instead of on
//! serde's output, which forgets positions once a value is deserialized.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Span {
    pub line: u32,
    pub col: u32,
}

impl Span {
    pub fn new(line: u32, col: u32) -> Self {
        Span { line, col }
    }
    fn from_marker(m: Marker) -> Self {
        Span {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX).max(1),
            col: u32::try_from(m.col() + 1).unwrap_or(u32::MAX),
        }
    }
}

/// One value of the document, with where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub span: Span,
}

/// A map entry: the key's text and position, then its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

impl Kind {
    /// The word used in "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "nothing (null)",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|e| e.key == key).map(|e| &e.value),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A syntax error with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub span: Span,
    pub message: String,
}

/// The input format, chosen by the file's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    pub fn from_path(path: &str) -> Format {
        if path.ends_with(".json") {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// At most this many aliases (`*name`) are expanded in one file.
pub const MAX_ALIASES: usize = 10_000;
/// At most this much is copied by alias expansion in one file, counted as nodes plus bytes of
/// scalar text: a megabyte or so, far beyond any real project file and far below what a nested
/// "billion laughs" alias bomb asks for.
pub const MAX_ALIAS_WEIGHT: usize = 1 << 20;
/// At most this many nested lists and mappings. Deeper trees are never a real manifest, and
/// later stages walk the tree recursively.
pub const MAX_DEPTH: usize = 128;

/// A parsed file: its one document (if the text holds one) and every problem found. A problem
/// in `errors` does not stop the reading (a duplicate key, a second document, a NUL byte, an
/// alias beyond the bounds), so the rest of the file is still checked; only a fatal syntax
/// error leaves `root` empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    pub root: Option<Node>,
    pub errors: Vec<SyntaxError>,
    /// Some string or key of the tree holds a NUL character (from an escape such as `"\0"`;
    /// a raw NUL byte is an error in `errors`). Noted while the tree is built, so that callers
    /// need not walk it to find one.
    pub has_nul: bool,
}

/// Parses one document. An empty document (only whitespace and comments) is `Ok(None)`. The
/// first problem of any kind is the error; [`parse_all`] reports them all.
pub fn parse(text: &str, format: Format) -> Result<Option<Node>, SyntaxError> {
    let mut parsed = parse_all(text, format);
    if parsed.errors.is_empty() {
        Ok(parsed.root)
    } else {
        Err(parsed.errors.swap_remove(0))
    }
}

/// Parses a file holding one document and reports every problem with its position.
pub fn parse_all(text: &str, format: Format) -> Parsed {
    let mut errors = Vec::new();
    if format == Format::Json {
        // serde_json words JSON errors the way JSON users expect; the tree itself is built by
        // the YAML parser below because JSON is YAML's flow syntax and that keeps positions.
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            if !text.trim().is_empty() {
                let msg = e.to_string();
                let msg = match msg.find(" at line ") {
                    Some(i) => msg[..i].to_string(),
                    None => msg,
                };
                errors.push(SyntaxError {
                    span: Span::new(
                        u32::try_from(e.line()).unwrap_or(1).max(1),
                        u32::try_from(e.column()).unwrap_or(1).max(1),
                    ),
                    message: format!("invalid JSON: {msg}"),
                });
                return Parsed {
                    root: None,
                    errors,
                    has_nul: false,
                };
            }
        }
    }
    // The YAML scanner takes a NUL for the end of the input, so everything after one would go
    // unread. Report each, then read on with a space in its place (same length, so every
    // position after it stays right).
    let owned_nul;
    let text = if text.contains('\0') {
        for (i, line) in lines(text).enumerate() {
            if let Some(byte) = line.find('\0') {
                errors.push(SyntaxError {
                    span: Span::new(
                        u32::try_from(i + 1).unwrap_or(u32::MAX),
                        u32::try_from(line[..byte].chars().count() + 1).unwrap_or(u32::MAX),
                    ),
                    message: "the file contains a NUL byte".into(),
                });
            }
        }
        owned_nul = text.replace('\0', " ");
        owned_nul.as_str()
    } else {
        text
    };
    // Tabs are legal whitespace in JSON but not YAML indentation; JSON strings cannot hold raw
    // tabs, so replacing them keeps every character position and the meaning.
    let owned;
    let text = if format == Format::Json && text.contains('\t') {
        owned = text.replace('\t', " ");
        owned.as_str()
    } else {
        text
    };
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    // Read every document, so that a second one is reported rather than silently ignored.
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        let mut info = e.info().to_string();
        if let Some(i) = info.find(" at byte ") {
            info.truncate(i);
        }
        errors.extend(builder.errors);
        errors.push(SyntaxError {
            span: Span::from_marker(*m),
            message: format!("invalid YAML: {info}"),
        });
        return Parsed {
            root: None,
            errors,
            has_nul: false,
        };
    }
    errors.extend(builder.errors);
    errors.sort_by_key(|e| e.span);
    Parsed {
        root: builder.root,
        errors,
        has_nul: builder.has_nul,
    }
}

/// The lines of `text` as YAML counts them: `\n`, `\r\n` and a lone `\r` each end one.
pub fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.find(['\n', '\r']) {
            Some(i) => {
                let next = if s[i..].starts_with("\r\n") {
                    i + 2
                } else {
                    i + 1
                };
                rest = (next < s.len()).then(|| &s[next..]);
                Some(&s[..i])
            }
            None => {
                rest = None;
                (!s.is_empty()).then_some(s)
            }
        }
    })
}

enum Frame {
    Seq(Vec<Node>, Span, usize),
    Map(Vec<Entry>, Option<(String, Span)>, Span, usize, Vec<String>),
}

/// A collection being built, with the weight (nodes plus scalar bytes) of what it holds so far.
struct Open {
    frame: Frame,
    weight: usize,
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    /// Anchored nodes with their weight.
    anchors: HashMap<usize, (Node, usize)>,
    errors: Vec<SyntaxError>,
    /// Documents started so far.
    documents: usize,
    aliases: usize,
    alias_weight: usize,
    /// Set after a fatal problem (an alias bound, the depth bound): later events are skipped.
    stopped: bool,
    /// A scalar held a NUL character (see [`Parsed::has_nul`]).
    has_nul: bool,
}

impl Builder {
    fn error(&mut self, span: Span, message: String) {
        self.errors.push(SyntaxError { span, message });
    }

    fn push_value(&mut self, node: Node, anchor: usize, weight: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, (node.clone(), weight));
        }
        if let Some(open) = self.stack.last_mut() {
            open.weight = open.weight.saturating_add(weight);
        }
        match self.stack.last_mut().map(|o| &mut o.frame) {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, pending, _, _, merged)) => {
                match pending.take() {
                    None => {
                        // The key node is not kept: its text moves into the entry.
                        let key = match node.kind {
                            Kind::Str(s) => s,
                            Kind::Int(i) => i.to_string(),
                            Kind::Bool(b) => b.to_string(),
                            Kind::Float(f) => f.to_string(),
                            Kind::Null => String::new(),
                            Kind::Seq(_) | Kind::Map(_) => {
                                self.errors.push(SyntaxError {
                                    span: node.span,
                                    message:
                                        "a mapping key must be a plain value, not a list or mapping"
                                            .into(),
                                });
                                String::new()
                            }
                        };
                        *pending = Some((key, node.span));
                    }
                    Some((key, key_span)) => {
                        if key == "<<" {
                            merge_into(entries, merged, node);
                        } else if let Some(pos) = merged.iter().position(|m| *m == key) {
                            // A key given explicitly overrides the one a merge brought in.
                            merged.swap_remove(pos);
                            if let Some(e) = entries.iter_mut().find(|e| e.key == key) {
                                e.value = node;
                                e.key_span = key_span;
                            }
                        } else if let Some(first) = entries.iter().find(|e| e.key == key) {
                            // Reported, and the first value kept, so the rest of the file is
                            // still checked.
                            self.errors.push(SyntaxError {
                                span: key_span,
                                message: format!(
                                    "duplicate key `{key}` (first defined on line {})",
                                    first.key_span.line
                                ),
                            });
                        } else {
                            entries.push(Entry {
                                key,
                                key_span,
                                value: node,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// YAML merge keys (`<<: *defaults`): keys already present win, as in the YAML 1.1 spec.
fn merge_into(entries: &mut Vec<Entry>, merged: &mut Vec<String>, node: Node) {
    let sources = match node.kind {
        Kind::Map(m) => vec![m],
        Kind::Seq(items) => items
            .into_iter()
            .filter_map(|n| match n.kind {
                Kind::Map(m) => Some(m),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    for source in sources {
        for e in source {
            if !entries.iter().any(|x| x.key == e.key) {
                merged.push(e.key.clone());
                entries.push(e);
            }
        }
    }
}

/// Types a scalar by the YAML 1.2 core schema: quoted scalars are strings; plain ones are null,
/// booleans, integers (decimal, `0o` octal, `0x` hexadecimal) and floats (including `.inf` and
/// `.nan`) by the schema's patterns, and strings otherwise.
fn scalar(value: String, style: TScalarStyle) -> Kind {
    if style != TScalarStyle::Plain {
        return Kind::Str(value);
    }
    match value.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Kind::Null,
        "true" | "True" | "TRUE" => return Kind::Bool(true),
        "false" | "False" | "FALSE" => return Kind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Kind::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Kind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Kind::Float(f64::NAN),
        _ => {}
    }
    let digits = value.strip_prefix(['-', '+']).unwrap_or(&value);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match value.parse::<i64>() {
            Ok(i) => Kind::Int(i),
            // Beyond 64 bits: still a number by the schema, read as the nearest float.
            Err(_) => value.parse::<f64>().map_or(Kind::Str(value), Kind::Float),
        };
    }
    for (prefix, radix) in [("0o", 8), ("0x", 16)] {
        if let Some(rest) = value.strip_prefix(prefix) {
            if !rest.is_empty() && rest.chars().all(|c| c.is_digit(radix)) {
                return match i64::from_str_radix(rest, radix) {
                    Ok(i) => Kind::Int(i),
                    Err(_) => u128::from_str_radix(rest, radix)
                        .map_or(Kind::Str(value.clone()), |i| Kind::Float(i as f64)),
                };
            }
        }
    }
    if is_core_float(&value) {
        if let Ok(f) = value.parse::<f64>() {
            return Kind::Float(f);
        }
    }
    Kind::Str(value)
}

/// The core schema's float pattern: `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`.
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let int_part = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        let frac = digits(&mut i);
        if int_part == 0 && frac == 0 {
            return false;
        }
    } else if int_part == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Nodes plus scalar bytes of a scalar: what copying it costs.
fn scalar_weight(kind: &Kind) -> usize {
    match kind {
        Kind::Str(s) => 1 + s.len(),
        _ => 1,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = Span::from_marker(mark);
        if self.stopped {
            return;
        }
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                self.has_nul |= value.contains('\0');
                let kind = scalar(value, style);
                let weight = scalar_weight(&kind);
                self.push_value(Node { kind, span }, anchor, weight);
            }
            Event::Alias(id) => {
                let weight = self.anchors.get(&id).map_or(1, |(_, w)| *w);
                self.aliases += 1;
                self.alias_weight = self.alias_weight.saturating_add(weight);
                if self.aliases > MAX_ALIASES || self.alias_weight > MAX_ALIAS_WEIGHT {
                    let why = if self.aliases > MAX_ALIASES {
                        format!("more than {MAX_ALIASES} aliases")
                    } else {
                        format!("aliases expanding to more than {MAX_ALIAS_WEIGHT} nodes and bytes")
                    };
                    self.error(
                        span,
                        format!("the file uses too many aliases: {why} (an alias bomb?)"),
                    );
                    self.stopped = true;
                    return;
                }
                let kind = self
                    .anchors
                    .get(&id)
                    .map_or(Kind::Null, |(n, _)| n.kind.clone());
                self.push_value(Node { kind, span }, 0, weight);
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if self.stack.len() >= MAX_DEPTH => {
                self.error(
                    span,
                    format!("lists and mappings are nested more than {MAX_DEPTH} deep"),
                );
                self.stopped = true;
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open {
                frame: Frame::Seq(Vec::new(), span, anchor),
                weight: 0,
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Open {
                frame: Frame::Map(Vec::new(), None, span, anchor, Vec::new()),
                weight: 0,
            }),
            Event::SequenceEnd => {
                if let Some(Open {
                    frame: Frame::Seq(items, start, anchor),
                    weight,
                }) = self.stack.pop()
                {
                    self.push_value(
                        Node {
                            kind: Kind::Seq(items),
                            span: start,
                        },
                        anchor,
                        weight.saturating_add(1),
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Open {
                    frame: Frame::Map(entries, _, start, anchor, _),
                    weight,
                }) = self.stack.pop()
                {
                    // A block mapping's start mark points past its first key; the first key is
                    // where a reader looks for the mapping.
                    let span = entries.first().map(|e| e.key_span).unwrap_or(start);
                    self.push_value(
                        Node {
                            kind: Kind::Map(entries),
                            span,
                        },
                        anchor,
                        weight.saturating_add(1),
                    );
                }
            }
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents == 2 {
                    self.error(
                        span,
                        "the file holds more than one YAML document (a second `---`)".into(),
                    );
                    self.stopped = true;
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  c: x\n", Format::Yaml).unwrap().unwrap();
        let b = n.get("b").unwrap();
        assert_eq!(b.span, Span::new(3, 3));
        assert_eq!(b.get("c").unwrap().span, Span::new(3, 6));
        assert_eq!(b.get("c").unwrap().kind, Kind::Str("x".into()));
    }

    #[test]
    fn scalars_are_typed_like_yaml_1_2() {
        let n = parse(
            "a: 1\nb: 'x'\nc: true\nd: ~\ne: 1.5\nf: 1.2.3\n",
            Format::Yaml,
        )
        .unwrap()
        .unwrap();
        assert_eq!(n.get("a").unwrap().kind, Kind::Int(1));
        assert_eq!(n.get("b").unwrap().kind, Kind::Str("x".into()));
        assert_eq!(n.get("c").unwrap().kind, Kind::Bool(true));
        assert_eq!(n.get("d").unwrap().kind, Kind::Null);
        assert_eq!(n.get("e").unwrap().kind, Kind::Float(1.5));
        assert_eq!(n.get("f").unwrap().kind, Kind::Str("1.2.3".into()));
    }

    #[test]
    fn merge_keys_and_anchors() {
        let n = parse(
            "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n",
            Format::Yaml,
        )
        .unwrap()
        .unwrap();
        let c = n.get("c").unwrap();
        assert_eq!(c.get("x").unwrap().kind, Kind::Int(1));
        assert_eq!(c.get("y").unwrap().kind, Kind::Int(3));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\na: 2\n", Format::Yaml).unwrap_err();
        assert_eq!(e.span.line, 2);
        assert!(e.message.contains("duplicate key `a`"));
    }

    #[test]
    fn json_with_tabs_and_errors() {
        let n = parse("{\n\t\"a\": 1\n}\n", Format::Json).unwrap().unwrap();
        assert_eq!(n.get("a").unwrap().span, Span::new(2, 7));
        let e = parse("{\n\t\"a\": 1,\n}\n", Format::Json).unwrap_err();
        assert_eq!(e.span.line, 3);
        assert!(e.message.starts_with("invalid JSON"), "{}", e.message);
    }

    #[test]
    fn empty_document_is_none() {
        assert_eq!(parse("# only a comment\n", Format::Yaml).unwrap(), None);
    }

    #[test]
    fn duplicate_keys_do_not_hide_the_rest_of_the_file() {
        let p = parse_all("a: 1\na: 2\nb: 3\n", Format::Yaml);
        assert_eq!(p.errors.len(), 1);
        let root = p.root.unwrap();
        assert_eq!(root.get("a").unwrap().kind, Kind::Int(1));
        assert_eq!(root.get("b").unwrap().kind, Kind::Int(3));
    }

    #[test]
    fn core_schema_numbers() {
        let n = parse(
            "a: 0o2000\nb: 0x2\nc: .inf\nd: -.Inf\ne: .nan\nf: 1e3\ng: 1_000\nh: 0o9\ni: .5\nj: 1.\nk: 2001-01-01\n",
            Format::Yaml,
        )
        .unwrap()
        .unwrap();
        assert_eq!(n.get("a").unwrap().kind, Kind::Int(0o2000));
        assert_eq!(n.get("b").unwrap().kind, Kind::Int(2));
        assert_eq!(n.get("c").unwrap().kind, Kind::Float(f64::INFINITY));
        assert_eq!(n.get("d").unwrap().kind, Kind::Float(f64::NEG_INFINITY));
        assert!(matches!(n.get("e").unwrap().kind, Kind::Float(f) if f.is_nan()));
        assert_eq!(n.get("f").unwrap().kind, Kind::Float(1000.0));
        assert_eq!(n.get("g").unwrap().kind, Kind::Str("1_000".into()));
        assert_eq!(n.get("h").unwrap().kind, Kind::Str("0o9".into()));
        assert_eq!(n.get("i").unwrap().kind, Kind::Float(0.5));
        assert_eq!(n.get("j").unwrap().kind, Kind::Float(1.0));
        assert_eq!(n.get("k").unwrap().kind, Kind::Str("2001-01-01".into()));
    }

    #[test]
    fn alias_bombs_are_bounded() {
        let mut text = String::from("x-a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            text.push_str(&format!("x-a{i}: &a{i} [{refs}]\n"));
        }
        let p = parse_all(&text, Format::Yaml);
        assert!(
            p.errors[0].message.contains("too many aliases"),
            "{:?}",
            p.errors
        );
        assert!(p.errors[0].span.line > 1);
        let many = "a: &a x\nb: [".to_string() + &vec!["*a"; MAX_ALIASES + 1].join(", ") + "]\n";
        let p = parse_all(&many, Format::Yaml);
        assert!(
            p.errors[0].message.contains("more than 10000 aliases"),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let text = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        let p = parse_all(&text, Format::Yaml);
        assert!(
            p.errors
                .iter()
                .any(|e| e.message.contains("nested more than")),
            "{:?}",
            p.errors
        );
    }

    #[test]
    fn nul_bytes_and_second_documents_are_errors() {
        let p = parse_all("a: 1\nb: x\0y\nc: [\n", Format::Yaml);
        assert_eq!(p.errors[0].span, Span::new(2, 5));
        assert!(p.errors[0].message.contains("NUL"));
        // The rest was read: the unclosed list on line 3 is found too.
        assert!(p.errors.len() >= 2, "{:?}", p.errors);
        let p = parse_all("a: 1\n---\nb: 2\n", Format::Yaml);
        assert_eq!(p.errors.len(), 1, "{:?}", p.errors);
        assert_eq!(p.errors[0].span.line, 2);
        assert!(p.errors[0].message.contains("more than one YAML document"));
        assert!(parse_all("---\na: 1\n...\n", Format::Yaml)
            .errors
            .is_empty());
    }

    #[test]
    fn lines_are_counted_as_yaml_counts_them() {
        let v: Vec<&str> = lines("a\rb\r\nc\n\nd").collect();
        assert_eq!(v, ["a", "b", "c", "", "d"]);
        let n = parse("a: 1\rb: x\r", Format::Yaml).unwrap().unwrap();
        assert_eq!(n.get("b").unwrap().span, Span::new(2, 4));
    }
}
