//! `nixmox render`: writes the build tree (NixOS flake, hosts, Terraform workspaces).

use std::path::Path;

use nixmox_core::render::{self, Outputs};

use super::load_project;
use crate::error::Result;
use crate::root::ProjectRoot;
use crate::{output, project_fs};

pub fn run(root: &ProjectRoot, out: &Path) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    // Until the engine records Terraform outputs, later steps render without them.
    let rendered = render::render(project, &Outputs::default());
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
