//! `nixmox render`: writes the build tree (NixOS flake, hosts, Terraform workspaces), the
//! same tree `up` renders: with the Terraform outputs earlier runs recorded in the state
//! store (read, never created).

use std::path::Path;

use nixmox_core::render;

use super::load_project;
use crate::error::Result;
use crate::root::{Paths, ProjectRoot};
use crate::{output, project_fs};

pub fn run(root: &ProjectRoot, out: &Path) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    // Later steps' workspaces take what earlier steps output, as `up` renders them.
    let outputs = crate::engine::recorded_outputs(&Paths::new(root, project))?;
    let rendered = render::render(project, &outputs);
    // A relative --out is relative to the project, like every other path NixMox writes.
    let out = if out.is_absolute() {
        out.to_path_buf()
    } else {
        root.join(out)
    };
    let written = project_fs::write_tree(root, &out, &rendered)?;
    output::note(&format!(
        "rendered {} files ({} copied from the project) into `{}`",
        rendered.files.len(),
        written,
        out.display()
    ));
    Ok(())
}
