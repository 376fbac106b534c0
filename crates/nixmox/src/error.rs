//! The one top-level error, and the exit codes it maps to (documented in README.md).
//!
//! A variant that wraps a module's error keeps it as its `source()`, typed, up to `main`. Each
//! message already includes its source's (as `Read` shows `{source}`), so `main` prints the
//! top-level message alone and the user reads the whole chain once.

use std::path::PathBuf;

use crate::proxmox::{snapshot::SnapError, PveError};
use crate::secrets::SecretsError;

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
    /// `up` ran and steps failed; what failed was reported step by step.
    #[error("{failed} step(s) failed; see `nixmox logs STEP` and `nixmox history`")]
    StepsFailed { failed: usize },
    /// The hosts' SOPS files or the secrets they hold (`secrets`).
    #[error("secrets: {0}")]
    Secrets(#[from] SecretsError),
    /// A Proxmox API request, or getting to the API. (Boxed, as are the other large errors, so
    /// that every `Result` stays small.)
    #[error(transparent)]
    Pve(Box<PveError>),
    /// A Proxmox API request failed while doing something the message names.
    #[error("{doing}: {source}")]
    PveDuring {
        /// What NixMox was doing, like `listing the orphaned containers`.
        doing: String,
        #[source]
        source: Box<PveError>,
    },
    /// A container snapshot that was not taken, listed or rolled back to.
    #[error(transparent)]
    Snapshot(Box<SnapError>),
    /// A tool that could not be run at all (not found, timed out) while doing something.
    #[error("{doing}: {source}")]
    Exec {
        doing: String,
        #[source]
        source: crate::exec::ExecError,
    },
    /// A failure with no error value under it: a tool that ran and said no (its message is
    /// already extracted), or an outcome that is wrong in itself. Everything with a typed
    /// cause has a variant above that keeps it.
    #[error("{0}")]
    RunFailed(String),
    /// `nixmox drift` could not check some things (what it could check was printed): each
    /// one on a line of its own.
    #[error("{}", lines(.unchecked))]
    DriftIncomplete { unchecked: Vec<Unchecked> },
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
            // A Proxmox settings problem is the project's: `proxmox.endpoint` unset and the like.
            Error::Pve(e) if matches!(**e, PveError::Config(_)) => EXIT_INVALID,
            Error::Read { .. }
            | Error::Write { .. }
            | Error::State(_)
            | Error::StepsFailed { .. }
            | Error::Secrets(_)
            | Error::Pve(_)
            | Error::PveDuring { .. }
            | Error::Snapshot(_)
            | Error::Exec { .. }
            | Error::RunFailed(_)
            | Error::DriftIncomplete { .. } => EXIT_RUNTIME,
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

/// Something a command could not check, and why: `what` names it (a step id, a host, the
/// containers), `error` is the message of what went wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {error}")]
pub struct Unchecked {
    pub what: String,
    pub error: String,
}

fn lines(unchecked: &[Unchecked]) -> String {
    unchecked
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    /// A Proxmox API error met while `doing` something.
    pub fn pve_during(doing: impl Into<String>) -> impl FnOnce(PveError) -> Error {
        let doing = doing.into();
        move |source| Error::PveDuring {
            doing,
            source: Box::new(source),
        }
    }
}

impl From<PveError> for Error {
    fn from(e: PveError) -> Error {
        Error::Pve(Box::new(e))
    }
}

impl From<SnapError> for Error {
    fn from(e: SnapError) -> Error {
        Error::Snapshot(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
