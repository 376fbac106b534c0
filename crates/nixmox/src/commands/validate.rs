//! `nixmox validate`: every problem, or a one-line summary.

use nixmox_core::lock::LOCK_FILE;

use super::{load_project, plural};
use crate::error::{Error, Result};
use crate::output;
use crate::root::ProjectRoot;

pub fn run(root: &ProjectRoot, locked: bool) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    if locked && loaded.lock_changed {
        output::error_line(&format!(
            "`{LOCK_FILE}` is out of date and `--locked` forbids changing it"
        ));
        output::note("  = help: run `nixmox lock` and commit the result");
        return Err(Error::Reported { count: 1 });
    }
    let core = project.services.iter().filter(|s| s.is_core()).count();
    let warnings = loaded.warnings;
    let mut line = format!(
        "ok: project `{}` is valid: {} ({core} core), {}",
        project.name,
        plural(project.services.len(), "service"),
        plural(project.edges.len(), "dependency edge"),
    );
    if warnings > 0 {
        line.push_str(&format!(", {}", plural(warnings, "warning")));
    }
    if loaded.lock_changed {
        line.push_str(&format!(
            "; {} not yet in {LOCK_FILE} (run `nixmox lock`)",
            plural(
                project
                    .services
                    .iter()
                    .filter(
                        |s| s.host.ip_origin == nixmox_core::model::Origin::Allocated
                            || s.host.vmid_origin == nixmox_core::model::Origin::Allocated
                    )
                    .count(),
                "allocation"
            )
        ));
    }
    output::note(&line);
    Ok(())
}
