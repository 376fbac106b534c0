//! The one top-level error, and the exit codes it maps to (documented in README.md).

use std::path::PathBuf;

/// Exit codes: 0 ok, 1 runtime failure, 2 invalid input or usage.
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_INVALID: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Problems already printed as diagnostics; only the exit code is left to give.
    #[error("{count} problem(s) found")]
    Reported { count: usize },
    #[error("{0}")]
    Usage(String),
    #[error("failed to read `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write `{}`: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("output closed")]
    BrokenPipe,
    /// `plan --detailed-exitcode` found changes: not a failure, exit code 2.
    #[error("the plan has changes")]
    Changes,
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Reported { .. } | Error::Usage(_) => EXIT_INVALID,
            Error::Read { .. } | Error::Write { .. } => EXIT_RUNTIME,
            Error::BrokenPipe => 0,
            Error::Changes => 2,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
