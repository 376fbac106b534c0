//! Writing to stdout (data only) and stderr (diagnostics, hints, summaries).

use std::io::{IsTerminal, Write};

use crate::error::{Error, Result};

/// Writes data to stdout; a closed pipe (`nixmox config | head`) ends the program quietly.
pub fn data(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Error::BrokenPipe),
        Err(e) => Err(Error::Write {
            path: "<stdout>".into(),
            source: e,
        }),
    }
}

/// Data on stdout written piece by piece through a buffer (a large output is never held
/// whole in memory); quiet on a broken pipe like [`data`].
pub fn data_with(write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Error::BrokenPipe),
        Err(e) => Err(Error::Write {
            path: "<stdout>".into(),
            source: e,
        }),
    }
}

/// Whether stderr may carry colour: a terminal, and `NO_COLOR` unset.
pub fn colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// A line of human-facing text on stderr. Text from a user's files or from a tool's output may
/// hold control characters; they are shown as visible escapes, line breaks kept (issue 13).
pub fn note(text: &str) {
    let text = nixmox_core::diag::visible_lines(text);
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub fn error_line(text: &str) {
    let text = nixmox_core::diag::visible_lines(text);
    let prefix = if colour() {
        "\x1b[1;31merror\x1b[0m"
    } else {
        "error"
    };
    let _ = writeln!(std::io::stderr().lock(), "{prefix}: {text}");
}

/// Prints diagnostics to stderr, errors first.
pub fn diagnostics(diags: &[nixmox_core::Diagnostic]) {
    if diags.is_empty() {
        return;
    }
    let text = nixmox_core::diag::render_all(diags);
    let text = if colour() {
        text.lines()
            .map(|l| {
                if let Some(rest) = l.strip_prefix("error:") {
                    format!("\x1b[1;31merror\x1b[0m:{rest}")
                } else if let Some(rest) = l.strip_prefix("warning:") {
                    format!("\x1b[1;33mwarning\x1b[0m:{rest}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        text
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
