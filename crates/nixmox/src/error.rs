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
    /// A command NixMox ran on a host over SSH that exited non-zero (`remote::HostShell`).
    #[error("{doing} on {host} failed ({}): {stderr}", exit_words(*.code))]
    RemoteFailed {
        doing: String,
        host: String,
        /// `None` when a signal ended it.
        code: Option<i32>,
        stderr: String,
    },
    /// A container backup that was not taken (`nixmox backup`).
    #[error("backing up CT {vmid}: {source}")]
    Backup {
        vmid: u32,
        #[source]
        source: BackupError,
    },
    /// A container backup `down` takes before it destroys the container, not taken: nothing
    /// was destroyed.
    #[error("backing up CT {vmid} (`{name}`) on node {node} before destroying it: {source}; nothing was destroyed (`--no-backup` destroys without a backup)")]
    BackupBeforeDestroy {
        vmid: u32,
        name: String,
        node: String,
        #[source]
        source: BackupError,
    },
    /// A Terraform workspace that could not be listed or destroyed while doing something.
    #[error("{doing}: {source}")]
    Workspace {
        /// What NixMox was doing, like `listing the resources of tf:infra`.
        doing: String,
        #[source]
        source: WorkspaceError,
    },
    /// Containers `down` could not destroy.
    #[error("destroying the containers: {source}")]
    DestroyContainers {
        #[source]
        source: Box<crate::proxmox::lifecycle::LifecycleError>,
    },
    /// A container restored from a backup whose health checks then fail.
    #[error(
        "CT {vmid} (`{hostname}`) was restored from {from}, but its health checks fail: {source}"
    )]
    RestoredUnhealthy {
        vmid: u32,
        hostname: String,
        from: String,
        #[source]
        source: crate::health::HealthFailure,
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
            | Error::RemoteFailed { .. }
            | Error::Backup { .. }
            | Error::BackupBeforeDestroy { .. }
            | Error::Workspace { .. }
            | Error::DestroyContainers { .. }
            | Error::RestoredUnhealthy { .. }
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

fn exit_words(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit {c}"),
        None => "ended by a signal".to_string(),
    }
}

fn lines(unchecked: &[Unchecked]) -> String {
    unchecked
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why a container backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Pve(Box<PveError>),
    /// The task succeeded, yet the storage shows no archive it made.
    #[error("the vzdump task ended, but storage `{storage}` lists no new archive of it")]
    NoArchive { storage: String },
}

impl From<PveError> for BackupError {
    fn from(e: PveError) -> BackupError {
        BackupError::Pve(Box::new(e))
    }
}

/// Why a recorded Terraform workspace could not be read or destroyed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// Its environment could not be prepared (the project CA Terraform trusts).
    #[error("{0}")]
    Environment(String),
    #[error(transparent)]
    Terraform(#[from] crate::terraform::TfError),
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
