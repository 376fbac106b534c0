//! Diagnostics: a located problem in a user's file, and how it is printed.

use std::fmt::Write as _;

use annotate_snippets::{Level, Renderer, Snippet};

use crate::syntax::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem, located in a file, with the source line it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Path relative to the project root, `/`-separated.
    pub file: String,
    pub span: Option<Span>,
    /// Dotted path of the offending field (`network.cidr`, `interface.proxy[1].domain`).
    pub field: Option<String>,
    pub message: String,
    /// The source line the span points into, without its line break.
    pub snippet: Option<String>,
    /// How many characters to underline from the span's column.
    pub width: u32,
    pub help: Option<String>,
}

/// Text that came from a user's file, made safe for a terminal: every control character
/// (newline, carriage return, ESC, DEL, the C1 range, bidi overrides and other invisible
/// format characters) is shown as a visible escape like `\u{1b}`, so a name cannot forge
/// output lines or send terminal escape sequences.
pub fn visible(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Like [`visible`], but keeps line breaks: for multi-line text NixMox writes itself.
pub fn visible_lines(s: &str) -> String {
    s.split('\n')
        .map(|l| visible(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders the diagnostic as rustc does (annotate-snippets, rustc's own renderer), plain
    /// text. Every part that can hold a user's text goes through [`visible`].
    pub fn render(&self) -> String {
        self.render_with(&Renderer::plain())
    }

    /// Like [`render`](Self::render), with ANSI styles for a terminal that takes colour.
    pub fn render_styled(&self) -> String {
        self.render_with(&Renderer::styled())
    }

    fn render_with(&self, renderer: &Renderer) -> String {
        let level = match self.severity {
            Severity::Error => Level::Error,
            Severity::Warning => Level::Warning,
        };
        let message = visible(&self.message);
        let field = self.field.as_deref().map(visible);
        let help = self.help.as_deref().map(visible_lines);
        // Tabs would be drawn as four columns and the caret would drift: one space each.
        let raw = self.snippet.as_deref().map(|s| s.replace('\t', " "));
        let source = raw.as_deref().map(visible);
        let field_note = field.as_deref().map(|f| format!("field: {f}"));
        let mut msg = level.title(&message);
        if let (Some(span), Some(raw), Some(source)) = (self.span, &raw, &source) {
            // The underline covers the escaped text of the span's characters.
            let start =
                visible_prefix_len(raw, span.col.saturating_sub(1) as usize).min(source.len());
            let end = visible_prefix_len(
                raw,
                (span.col.saturating_sub(1) + self.width.max(1)) as usize,
            )
            .clamp(start, source.len());
            let mut annotation = level.span(start..end);
            if let Some(field) = &field {
                annotation = annotation.label(field);
            }
            msg = msg.snippet(
                Snippet::source(source)
                    .line_start(span.line as usize)
                    .annotation(annotation),
            );
        } else if let Some(note) = &field_note {
            msg = msg.footer(Level::Note.title(note));
        }
        if let Some(help) = &help {
            msg = msg.footer(Level::Help.title(help));
        }
        let rendered = renderer.render(msg).to_string();
        // The location line is the file's own `line:col` (annotate-snippets would count the
        // columns of the escaped snippet), in the gutter rustc gives it.
        let file = visible(&self.file);
        let location = match self.span {
            Some(span) => format!("{file}:{}:{}", span.line, span.col),
            None => file.into_owned(),
        };
        let gutter = match (self.span, &source) {
            (Some(span), Some(_)) => span.line.to_string().len(),
            _ => 1,
        };
        let (title, rest) = rendered.split_once('\n').unwrap_or((&rendered, ""));
        let mut out = format!("{title}\n{:gutter$}--> {location}\n", "");
        if !rest.is_empty() {
            out.push_str(rest);
            out.push('\n');
        }
        out
    }
}

/// The length in bytes of the first `chars` characters of `raw` once made [`visible`].
fn visible_prefix_len(raw: &str, chars: usize) -> usize {
    let prefix: String = raw.chars().take(chars).collect();
    let extra = chars.saturating_sub(raw.chars().count());
    visible(&prefix).len() + extra
}

/// Renders a list of diagnostics separated by blank lines, errors first in file order.
pub fn render_all(diags: &[Diagnostic]) -> String {
    render_sorted(diags, Diagnostic::render)
}

/// Like [`render_all`], with ANSI styles for a terminal that takes colour.
pub fn render_all_styled(diags: &[Diagnostic]) -> String {
    render_sorted(diags, Diagnostic::render_styled)
}

fn render_sorted(diags: &[Diagnostic], render: fn(&Diagnostic) -> String) -> String {
    let mut sorted: Vec<&Diagnostic> = diags.iter().collect();
    sorted.sort_by(|a, b| (a.severity, &a.file, a.span).cmp(&(b.severity, &b.file, b.span)));
    sorted
        .iter()
        .map(|d| render(d))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The closest candidate by edit distance, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        // Optimal string alignment: an adjacent transposition is one edit, so `dsn` is one
        // typo away from `dns`.
        let d = strsim::osa_distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase());
        let limit = (c.len().max(word.len()) / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("cidrr", ["cidr", "gateway"]), Some("cidr"));
        assert_eq!(
            did_you_mean("postgres", ["postgresql", "caddy"]),
            Some("postgresql")
        );
        assert_eq!(did_you_mean("zzz", ["cidr", "gateway"]), None);
        assert_eq!(did_you_mean("dsn", ["dns", "app"]), Some("dns"));
    }

    /// Issue 13: control characters from a user's file never reach the terminal raw.
    #[test]
    fn control_characters_are_shown_escaped() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: "services/a/manifest.yaml".into(),
            span: Some(Span::new(1, 10)),
            field: Some("depends_on[0]".into()),
            message: "`\u{1b}[2Jx\nerror: forged` is not a service".into(),
            snippet: Some("a: \"\u{1b}[2J\", b: c".into()),
            width: 1,
            help: Some("did you mean `b`?\nsecond line \u{7}".into()),
        };
        let r = d.render();
        assert!(!r.contains('\u{1b}') && !r.contains('\u{7}'), "{r}");
        assert!(r.contains("\\u{1b}[2Jx\\u{a}error: forged"), "{r}");
        assert!(r.contains("\n          second line \\u{7}\n"), "{r}");
        // Issue 16: the location is the file's column (10), not the column in the escaped
        // snippet that annotate-snippets would count (15); the caret sits under the escaped
        // text.
        assert!(r.contains(" --> services/a/manifest.yaml:1:10\n"), "{r}");
        assert!(
            r.contains("1 | a: \"\\u{1b}[2J\", b: c\n  |               ^ depends_on[0]\n"),
            "{r}"
        );
        assert_eq!(visible("plain"), "plain");
        assert_eq!(visible("a\u{202e}b"), "a\\u{202e}b");
    }

    #[test]
    fn renders_with_caret_under_the_column() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: "nixmox.yaml".into(),
            span: Some(Span::new(4, 3)),
            field: Some("network.cidrr".into()),
            message: "unknown field `cidrr`".into(),
            snippet: Some("  cidrr: 10.0.0.0/24".into()),
            width: 5,
            help: Some("did you mean `cidr`?".into()),
        };
        assert_eq!(
            d.render(),
            "error: unknown field `cidrr`\n --> nixmox.yaml:4:3\n  |\n4 |   cidrr: 10.0.0.0/24\n  |   ^^^^^ network.cidrr\n  |\n  = help: did you mean `cidr`?\n"
        );
    }

    /// Issue 16: a diagnostic without a snippet, or without a position, is still located.
    #[test]
    fn located_without_a_snippet_or_a_position() {
        let mut d = Diagnostic {
            severity: Severity::Warning,
            file: "services/app/manifest.yaml".into(),
            span: Some(Span::new(12, 5)),
            field: Some("interface.db".into()),
            message: "unused".into(),
            snippet: None,
            width: 1,
            help: None,
        };
        assert_eq!(
            d.render(),
            "warning: unused\n --> services/app/manifest.yaml:12:5\n = note: field: interface.db\n"
        );
        d.span = None;
        d.help = Some("remove it".into());
        assert_eq!(
            d.render(),
            "warning: unused\n --> services/app/manifest.yaml\n = note: field: interface.db\n = help: remove it\n"
        );
    }
}
