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
    /// A project file NixMox refuses to open or copy: a symbolic link leading out of the
    /// project, a FIFO, socket or device. Validation reports these with their manifest line;
    /// this is the last line of defence when the tree changed in between.
    #[error("refusing `{}`: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("output closed")]
    BrokenPipe,
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A run failed; what failed was reported step by step.
    #[error("{0}")]
    RunFailed(String),
    /// Ctrl-C: running steps were allowed to finish and everything was recorded.
    #[error("interrupted; running steps finished and the state is recorded")]
    Interrupted,
    #[error(transparent)]
    Flake(#[from] crate::flake::FlakeError),
    /// `plan --detailed-exitcode` found changes: not a failure, exit code 2.
    #[error("the plan has changes")]
    Changes,
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Reported { .. } | Error::Usage(_) | Error::Unsafe { .. } => EXIT_INVALID,
            Error::Read { .. } | Error::Write { .. } | Error::State(_) | Error::RunFailed(_) => {
                EXIT_RUNTIME
            }
            Error::Flake(
                crate::flake::FlakeError::InvalidLock { .. }
                | crate::flake::FlakeError::UnknownInput(..),
            ) => EXIT_INVALID,
            Error::Flake(_) => EXIT_RUNTIME,
            Error::Interrupted => 130,
            Error::BrokenPipe => 0,
            Error::Changes => 2,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
