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

/// Parses one document. An empty document (only whitespace and comments) is `Ok(None)`.
pub fn parse(text: &str, format: Format) -> Result<Option<Node>, SyntaxError> {
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
                return Err(SyntaxError {
                    span: Span::new(
                        u32::try_from(e.line()).unwrap_or(1).max(1),
                        u32::try_from(e.column()).unwrap_or(1).max(1),
                    ),
                    message: format!("invalid JSON: {msg}"),
                });
            }
        }
    }
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
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        let mut info = e.info().to_string();
        if let Some(i) = info.find(" at byte ") {
            info.truncate(i);
        }
        return Err(SyntaxError {
            span: Span::from_marker(*m),
            message: format!("invalid YAML: {info}"),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root)
}

enum Frame {
    Seq(Vec<Node>, Span, usize),
    Map(Vec<Entry>, Option<(String, Span)>, Span, usize, Vec<String>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, pending, _, _, merged)) => {
                match pending.take() {
                    None => {
                        let key = match &node.kind {
                            Kind::Str(s) => s.clone(),
                            Kind::Int(i) => i.to_string(),
                            Kind::Bool(b) => b.to_string(),
                            Kind::Float(f) => f.to_string(),
                            Kind::Null => String::new(),
                            Kind::Seq(_) | Kind::Map(_) => {
                                if self.error.is_none() {
                                    self.error = Some(SyntaxError {
                                    span: node.span,
                                    message: "a mapping key must be a plain value, not a list or mapping".into(),
                                });
                                }
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
                            if self.error.is_none() {
                                self.error = Some(SyntaxError {
                                    span: key_span,
                                    message: format!(
                                        "duplicate key `{key}` (first defined on line {})",
                                        first.key_span.line
                                    ),
                                });
                            }
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

fn scalar(value: String, style: TScalarStyle) -> Kind {
    if style != TScalarStyle::Plain {
        return Kind::Str(value);
    }
    match value.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Kind::Null,
        "true" | "True" | "TRUE" => return Kind::Bool(true),
        "false" | "False" | "FALSE" => return Kind::Bool(false),
        _ => {}
    }
    let digits = value.strip_prefix(['-', '+']).unwrap_or(&value);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = value.parse::<i64>() {
            return Kind::Int(i);
        }
    }
    if let Some(hex) = value.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Kind::Int(i);
        }
    }
    let looks_numeric = value
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && value.bytes().any(|b| b.is_ascii_digit())
        && value.matches('.').count() <= 1;
    if looks_numeric {
        if let Ok(f) = value.parse::<f64>() {
            return Kind::Float(f);
        }
    }
    Kind::Str(value)
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let span = Span::from_marker(mark);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let node = Node {
                    kind: scalar(value, style),
                    span,
                };
                self.push_value(node, anchor);
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some(n) => Node {
                        kind: n.kind.clone(),
                        span,
                    },
                    None => Node {
                        kind: Kind::Null,
                        span,
                    },
                };
                self.push_value(node, 0);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq(Vec::new(), span, anchor))
            }
            Event::MappingStart(anchor, _) => {
                self.stack
                    .push(Frame::Map(Vec::new(), None, span, anchor, Vec::new()))
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(items, start, anchor)) = self.stack.pop() {
                    self.push_value(
                        Node {
                            kind: Kind::Seq(items),
                            span: start,
                        },
                        anchor,
                    );
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(entries, _, start, anchor, _)) = self.stack.pop() {
                    // A block mapping's start mark points past its first key; the first key is
                    // where a reader looks for the mapping.
                    let span = entries.first().map(|e| e.key_span).unwrap_or(start);
                    self.push_value(
                        Node {
                            kind: Kind::Map(entries),
                            span,
                        },
                        anchor,
                    );
                }
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
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
}
