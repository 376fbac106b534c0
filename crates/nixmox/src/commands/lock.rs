//! `nixmox lock`: writes the pool allocations to nixmox.lock and the flake's locked inputs to
//! flake.lock; `nixmox update`: moves the flake's inputs on.

use nixmox_core::flake_lock::FLAKE_LOCK;
use nixmox_core::lock::LOCK_FILE;

use super::load_project;
use crate::error::Result;
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::{flake, output, project_fs};

pub fn run(root: &ProjectRoot, allocations_only: bool) -> Result<()> {
    let loaded = load_project(root)?;
    if !loaded.lock_changed {
        output::note(&format!("{LOCK_FILE} is up to date"));
    } else {
        project_fs::write_atomic(&root.join(LOCK_FILE), loaded.lock.render().as_bytes())?;
        output::note(&format!(
            "wrote {LOCK_FILE} ({} service(s) with pool allocations)",
            loaded.lock.services.len()
        ));
    }
    if allocations_only {
        return Ok(());
    }
    let project = &loaded.project;
    let ensured = flake::ensure_locked(root, &Paths::new(root, project), project)?;
    if ensured.changes.is_empty() {
        output::note(&format!("{FLAKE_LOCK} is up to date"));
    } else {
        output::note(&format!(
            "wrote {FLAKE_LOCK}: {}",
            ensured.changes.join(", ")
        ));
    }
    Ok(())
}

pub fn update(root: &ProjectRoot, inputs: &[String]) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let changes = flake::update(root, &Paths::new(root, project), project, inputs)?;
    if changes.is_empty() {
        output::note(&format!(
            "{FLAKE_LOCK}: every input is already at its newest revision"
        ));
    } else {
        // The changes are what the command produced: data, one per line.
        output::data(&changes.iter().map(|c| format!("{c}\n")).collect::<String>())?;
        output::note(&format!(
            "updated {FLAKE_LOCK}; `nixmox up` redeploys the hosts that build from it"
        ));
    }
    Ok(())
}
