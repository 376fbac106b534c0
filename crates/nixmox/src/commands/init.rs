//! `nixmox init`: scaffolds a project that validates as written.

use std::path::Path;

use nixmox_core::ids::ProjectName;
use nixmox_core::scaffold;

use crate::error::{Error, Result};
use crate::{output, project_fs};

pub fn run(dir: &Path, name: Option<&str>, domain: &str) -> Result<()> {
    if dir.join("nixmox.yaml").exists() {
        return Err(Error::Usage(format!(
            "`{}` already holds a nixmox.yaml; refusing to overwrite it",
            dir.display()
        )));
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
            scaffold::name_from_dir(
                abs.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("homelab"),
            )
        }
    };
    if let Err(why) = ProjectName::new(&name) {
        return Err(Error::Usage(format!(
            "invalid project name `{name}`: {why}"
        )));
    }
    if let Err(why) = nixmox_core::ids::DomainName::new(domain) {
        return Err(Error::Usage(format!("invalid domain `{domain}`: {why}")));
    }
    let files = scaffold::project(&name, domain);
    for f in &files {
        let path = dir.join(&f.path);
        if path.exists() && f.path != ".gitignore" {
            return Err(Error::Usage(format!(
                "`{}` already exists; refusing to overwrite it",
                path.display()
            )));
        }
    }
    for f in &files {
        let path = dir.join(&f.path);
        if f.path == ".gitignore" && path.exists() {
            append_gitignore(&path)?;
            continue;
        }
        project_fs::write_atomic(&path, f.contents.as_bytes())?;
    }
    output::note(&format!(
        "created project `{name}` in `{}`: {} files; next: `nixmox -C {} validate`",
        dir.display(),
        files.len(),
        dir.display()
    ));
    Ok(())
}

/// Adds `.nixmox/` to an existing .gitignore unless it is there already.
fn append_gitignore(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text
        .lines()
        .any(|l| l.trim() == ".nixmox/" || l.trim() == ".nixmox")
    {
        return Ok(());
    }
    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(".nixmox/\n");
    project_fs::write_atomic(path, new.as_bytes())
}
