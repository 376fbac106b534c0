//! Diagnostics: a located problem in a user's file, and how it is printed.

use std::fmt::Write as _;

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

    /// Renders the diagnostic the way rustc and miette do, readable without colour. Every
    /// part that can hold a user's text goes through [`visible`].
    pub fn render(&self) -> String {
        let mut out = String::new();
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(out, "{label}: {}", visible(&self.message));
        let file = visible(&self.file);
        let field = self.field.as_deref().map(visible);
        match self.span {
            Some(span) => {
                let _ = writeln!(out, "  --> {file}:{}:{}", span.line, span.col);
                if let Some(snippet) = &self.snippet {
                    let num = span.line.to_string();
                    let pad = " ".repeat(num.len());
                    let _ = writeln!(out, " {pad} |");
                    let snippet = snippet.replace('\t', " ");
                    let _ = writeln!(out, " {num} | {}", visible(&snippet));
                    // The caret lines up under the escaped text.
                    let before: String = snippet
                        .chars()
                        .take(span.col.saturating_sub(1) as usize)
                        .collect();
                    let lead: String = visible(&before).chars().map(|_| ' ').collect();
                    let carets = "^".repeat(self.width.max(1) as usize);
                    match &field {
                        Some(field) => {
                            let _ = writeln!(out, " {pad} | {lead}{carets} {field}");
                        }
                        None => {
                            let _ = writeln!(out, " {pad} | {lead}{carets}");
                        }
                    }
                } else if let Some(field) = &field {
                    let _ = writeln!(out, "  = field: {field}");
                }
            }
            None => {
                let _ = writeln!(out, "  --> {file}");
                if let Some(field) = &field {
                    let _ = writeln!(out, "  = field: {field}");
                }
            }
        }
        if let Some(help) = &self.help {
            let help = visible_lines(help);
            let pad = " ".repeat(self.span.map(|s| s.line.to_string().len()).unwrap_or(1));
            for (i, line) in help.lines().enumerate() {
                if i == 0 {
                    let _ = writeln!(out, " {pad} = help: {line}");
                } else {
                    let _ = writeln!(out, " {pad}         {line}");
                }
            }
        }
        out
    }
}

/// Renders a list of diagnostics separated by blank lines, errors first in file order.
pub fn render_all(diags: &[Diagnostic]) -> String {
    let mut sorted: Vec<&Diagnostic> = diags.iter().collect();
    sorted.sort_by(|a, b| (a.severity, &a.file, a.span).cmp(&(b.severity, &b.file, b.span)));
    sorted
        .iter()
        .map(|d| d.render())
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
        assert!(r.contains("\n           second line \\u{7}\n"), "{r}");
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
            "error: unknown field `cidrr`\n  --> nixmox.yaml:4:3\n   |\n 4 |   cidrr: 10.0.0.0/24\n   |   ^^^^^ network.cidrr\n   = help: did you mean `cidr`?\n"
        );
    }
}
