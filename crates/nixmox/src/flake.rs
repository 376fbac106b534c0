//! The project's pinned flake inputs: `flake.lock` at the project root, committed, copied into
//! the build flake by the renderer, created by the first `up` (or `nixmox lock`) with `nix
//! flake lock` and moved on only by `nixmox update`.
//!
//! Every host of one run builds from the same locked revisions, and the lock's revisions are
//! part of each `nix:*` step's input (see `nixmox_core::plan`), so updating nixpkgs redeploys
//! exactly the hosts that build from it.
//!
//! Locking runs in `.nixmox/flake/`, which holds only the rendered `flake.nix` and the lock:
//! Nix copies a `path:` flake's whole directory into its store, and nothing else is needed to
//! lock. The result is copied back to the project root; the renderer copies it into the build
//! flake from there.
//!
//! Whether the lock still matches the configured input URLs is remembered in
//! `.nixmox/flake-inputs.json` (the URLs the lock was made from and the lock's digest), so a
//! no-op `up` starts no `nix` process. Without that record (a fresh clone) `nix flake lock`
//! runs once: it keeps every entry that still matches its URL and locks only what changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmox_core::flake_lock::{self, FlakeLock, FLAKE_LOCK};
use nixmox_core::model::Project;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::exec::{self, Cmd, RunOpts};
use crate::project_fs;
use crate::root::Paths;
use crate::root::ProjectRoot;

/// Where the flake is rendered inside the build directory.
pub const BUILD_FLAKE: &str = "nix";

/// The directory `nix flake lock` runs on: `.nixmox/flake/`.
fn lock_dir(paths: &Paths) -> PathBuf {
    dot_dir(paths).join("flake")
}

fn dot_dir(paths: &Paths) -> &Path {
    paths.build.parent().unwrap_or(&paths.build)
}

#[derive(Debug, thiserror::Error)]
pub enum FlakeError {
    /// The committed lock file cannot be read as one: the user's file, exit 2.
    #[error("{path}: {message}", path = path.display())]
    InvalidLock { path: PathBuf, message: String },
    /// `nix` failed or could not run.
    #[error("{what}: {message}")]
    Nix { what: String, message: String },
    #[error("unknown flake input `{0}`; the flake's inputs are {1}")]
    UnknownInput(String, String),
    #[error("{0}")]
    Io(String),
}

/// The flake reference the deployers get for the build flake: `path:` so that Nix reads the
/// directory as it is. A bare path inside a git repository is read as `git+file` of that
/// repository, which sees only tracked files, and `.nixmox/` is git-ignored.
pub fn reference(build_flake: &Path) -> String {
    format!("path:{}", build_flake.display())
}

/// The inputs the rendered flake declares, by name, with their URLs.
pub fn configured_inputs(project: &Project) -> BTreeMap<String, String> {
    project
        .nix
        .inputs()
        .into_iter()
        .filter(|(name, _)| nixmox_core::providers::project_needs_input(project, name))
        .map(|(n, u)| (n.to_string(), u.to_string()))
        .collect()
}

/// Makes relative `path:` and `git+file:` overrides absolute, taken from the project directory
/// (the build flake lives elsewhere, and Nix would resolve them from there).
pub fn absolutize_inputs(project: &mut Project, root: &Path) {
    let names = project.nix.inputs().map(|(name, _)| name);
    for name in names {
        let Some(url) = project.nix.input_mut(name) else {
            continue;
        };
        for scheme in ["path:", "git+file:"] {
            let Some(rest) = url.strip_prefix(scheme) else {
                continue;
            };
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.starts_with('/') {
                continue;
            }
            let (path, query) = match rest.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (rest, None),
            };
            let abs = root.join(path);
            let abs = abs.canonicalize().unwrap_or(abs);
            *url = match query {
                Some(q) => format!("{scheme}{}?{q}", abs.display()),
                None => format!("{scheme}{}", abs.display()),
            };
        }
    }
}

/// Reads the project's `flake.lock`, if it has one.
pub fn read(root: &ProjectRoot) -> Result<Option<FlakeLock>, FlakeError> {
    let path = root.join(FLAKE_LOCK);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(FlakeError::Io(format!(
                "cannot read `{}`: {e}",
                path.display()
            )))
        }
    };
    flake_lock::parse(&bytes)
        .map(Some)
        .map_err(|message| FlakeError::InvalidLock { path, message })
}

/// What `.nixmox/flake-inputs.json` remembers: the URLs the lock was made from, and the lock.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct Made {
    version: u32,
    inputs: BTreeMap<String, String>,
    lock_sha256: String,
}

fn made_path(paths: &Paths) -> PathBuf {
    dot_dir(paths).join("flake-inputs.json")
}

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The result of making sure the lock exists and matches the configured inputs.
pub struct Ensured {
    pub lock: FlakeLock,
    /// `nixpkgs: (new) → 1a2b3c4d5e6f` for each input that was locked or moved; empty when the
    /// lock was already current.
    pub changes: Vec<String>,
}

/// Makes sure `flake.lock` exists at the project root and locks exactly the configured inputs,
/// running `nix flake lock` only when it does not.
pub fn ensure_locked(
    root: &ProjectRoot,
    paths: &Paths,
    project: &Project,
) -> Result<Ensured, FlakeError> {
    let inputs = configured_inputs(project);
    let lock_path = root.join(FLAKE_LOCK);
    let current = std::fs::read(&lock_path).ok();
    let made: Option<Made> = std::fs::read(made_path(paths))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let (Some(bytes), Some(made)) = (&current, &made) {
        if made.inputs == inputs && made.lock_sha256 == digest(bytes) {
            let lock = flake_lock::parse(bytes).map_err(|message| FlakeError::InvalidLock {
                path: lock_path.clone(),
                message,
            })?;
            return Ok(Ensured {
                lock,
                changes: Vec::new(),
            });
        }
    }
    let before = read(root)?.unwrap_or_default();
    prepare(root, paths, project)?;
    run_nix(paths, &["flake", "lock"], "lock the flake's inputs")?;
    let lock = take_back(root, paths, &inputs)?;
    Ok(Ensured {
        changes: before.changes(&lock),
        lock,
    })
}

/// `nixmox update [INPUT...]`: moves the named inputs (all when none is named) to their
/// newest revisions, as `nix flake update` does, and returns `input: old → new` lines.
pub fn update(
    root: &ProjectRoot,
    paths: &Paths,
    project: &Project,
    names: &[String],
) -> Result<Vec<String>, FlakeError> {
    let inputs = configured_inputs(project);
    for n in names {
        if !inputs.contains_key(n) {
            let known: Vec<&str> = inputs.keys().map(String::as_str).collect();
            return Err(FlakeError::UnknownInput(n.clone(), known.join(", ")));
        }
    }
    let before = read(root)?.unwrap_or_default();
    prepare(root, paths, project)?;
    // Nix 2.8 spells "update these inputs" as `flake lock --update-input NAME...`; newer
    // versions also take `flake update NAME...`. Both forms are in 2.8 and later.
    let mut args: Vec<&str> = vec!["flake"];
    if names.is_empty() {
        args.push("update");
    } else {
        args.push("lock");
        for n in names {
            args.push("--update-input");
            args.push(n);
        }
    }
    run_nix(paths, &args, "update the flake's inputs")?;
    let lock = take_back(root, paths, &inputs)?;
    Ok(before.changes(&lock))
}

/// Fills the lock directory with the rendered `flake.nix` and the project's current lock.
fn prepare(root: &ProjectRoot, paths: &Paths, project: &Project) -> Result<(), FlakeError> {
    let dir = lock_dir(paths);
    let io = |e: crate::error::Error| FlakeError::Io(e.to_string());
    project_fs::write_atomic(
        &dir.join("flake.nix"),
        nixmox_core::render::nixos::flake(project).as_bytes(),
    )
    .map_err(io)?;
    let lock = dir.join(FLAKE_LOCK);
    match std::fs::read(root.join(FLAKE_LOCK)) {
        Ok(bytes) => project_fs::write_atomic(&lock, &bytes).map_err(io)?,
        Err(_) => {
            let _ = std::fs::remove_file(&lock);
        }
    }
    Ok(())
}

/// Copies the lock directory's lock back to the project root and remembers what it was made from.
fn take_back(
    root: &ProjectRoot,
    paths: &Paths,
    inputs: &BTreeMap<String, String>,
) -> Result<FlakeLock, FlakeError> {
    let built = lock_dir(paths).join(FLAKE_LOCK);
    let bytes = std::fs::read(&built).map_err(|e| FlakeError::Nix {
        what: "lock the flake's inputs".into(),
        message: format!("nix wrote no `{}`: {e}", built.display()),
    })?;
    let lock = flake_lock::parse(&bytes).map_err(|message| FlakeError::Nix {
        what: "lock the flake's inputs".into(),
        message,
    })?;
    let io = |e: crate::error::Error| FlakeError::Io(e.to_string());
    let target = root.join(FLAKE_LOCK);
    if std::fs::read(&target).ok().as_deref() != Some(bytes.as_slice()) {
        project_fs::write_atomic(&target, &bytes).map_err(io)?;
    }
    let made = Made {
        version: 1,
        inputs: inputs.clone(),
        lock_sha256: digest(&bytes),
    };
    let json = serde_json::to_vec_pretty(&made).expect("a plain struct serializes");
    project_fs::write_atomic(&made_path(paths), &json).map_err(io)?;
    Ok(lock)
}

/// Runs `nix <args> path:<lock dir>` with flakes enabled, bounded by ten minutes (a first
/// lock of nixpkgs downloads it).
fn run_nix(paths: &Paths, args: &[&str], what: &str) -> Result<(), FlakeError> {
    let flake = lock_dir(paths);
    let cmd = Cmd::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args.iter().copied())
        .arg(reference(&flake))
        .cwd(&flake);
    let opts = RunOpts {
        timeout: Some(Duration::from_secs(600)),
        log: Some(flake.join("nix.log")),
        ..RunOpts::default()
    };
    let fin = exec::run(&cmd, &opts).map_err(|e| FlakeError::Nix {
        what: what.into(),
        message: e.to_string(),
    })?;
    if fin.success() {
        return Ok(());
    }
    let message = nix_error(&fin.stderr);
    Err(FlakeError::Nix {
        what: what.into(),
        message: if message.is_empty() {
            format!("`nix` exited with {:?}", fin.code)
        } else {
            message
        },
    })
}

/// What went wrong, from Nix's stderr. Nix prints retries as `warning: error: …` before its
/// final `error: …`: only the final lines say it.
fn nix_error(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_errors_leave_out_the_retries() {
        let stderr = "warning: error: unable to download 'x': timeout; retrying in 325 ms\n\
                      warning: error: unable to download 'x': timeout; retrying in 700 ms\n\
                      error: unable to download 'x': timeout\n";
        assert_eq!(nix_error(stderr), "unable to download 'x': timeout");
        assert_eq!(nix_error("warning: only a warning\n"), "");
    }

    #[test]
    fn flake_reference_is_a_path_reference() {
        assert_eq!(
            reference(Path::new("/p/.nixmox/build/nix")),
            "path:/p/.nixmox/build/nix"
        );
    }
}
