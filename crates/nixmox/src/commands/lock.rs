//! `nixmox lock`: writes the pool allocations to nixmox.lock.


use nixmox_core::lock::LOCK_FILE;

use super::load_project;
use crate::error::Result;
use crate::{output, project_fs};
use crate::root::ProjectRoot;

pub fn run(root: &ProjectRoot) -> Result<()> {
    let loaded = load_project(root)?;
    if !loaded.lock_changed {
        output::note(&format!("{LOCK_FILE} is up to date"));
        return Ok(());
    }
    project_fs::write_atomic(&root.join(LOCK_FILE), loaded.lock.render().as_bytes())?;
    output::note(&format!(
        "wrote {LOCK_FILE} ({} service(s) with pool allocations)",
        loaded.lock.services.len()
    ));
    Ok(())
}
