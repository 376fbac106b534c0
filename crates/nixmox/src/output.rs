//! Writing to stdout (data only) and stderr (diagnostics, hints, summaries).
//!
//! Colour goes through `anstream`: styles are written as ANSI and stripped on the way out
//! unless stderr is a terminal that takes colour (`NO_COLOR` unset, `TERM` not `dumb`;
//! `CLICOLOR_FORCE` forces it), the same rules clap applies to its own messages.

use std::io::Write;

use anstyle::{AnsiColor, Style};

use crate::error::{Error, Result};

/// The style of `error` and failures.
pub const ERROR: Style = AnsiColor::Red.on_default().bold();
/// The style of `warning`.
pub const WARNING: Style = AnsiColor::Yellow.on_default().bold();

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

/// Whether stderr takes colour: a terminal, `NO_COLOR` unset (anstream's rules).
pub fn colour() -> bool {
    anstream::AutoStream::choice(&std::io::stderr()) != anstream::ColorChoice::Never
}

/// stderr, with styles kept or stripped as [`colour`] says.
pub fn stderr() -> anstream::Stderr {
    anstream::stderr()
}

/// A line of human-facing text on stderr. Text from a user's files or from a tool's output may
/// hold control characters; they are shown as visible escapes, line breaks kept (issue 13).
pub fn note(text: &str) {
    let text = nixmox_core::diag::visible_lines(text);
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub fn error_line(text: &str) {
    // The text is made visible before any style is added, so only NixMox's own escape
    // sequences reach the terminal.
    let text = nixmox_core::diag::visible_lines(text);
    let _ = writeln!(stderr().lock(), "{ERROR}error{ERROR:#}: {text}");
}

/// Prints diagnostics to stderr, errors first.
pub fn diagnostics(diags: &[nixmox_core::Diagnostic]) {
    if diags.is_empty() {
        return;
    }
    let text = nixmox_core::diag::render_all_styled(diags);
    let _ = stderr().lock().write_all(text.as_bytes());
}
