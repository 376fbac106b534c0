//! The project directory, resolved once at startup to an absolute, canonical path.
//!
//! Every path NixMox hands to a child process (Terraform's `-state` and `TF_DATA_DIR`, sops'
//! files, ssh's control sockets and known_hosts, the deployer's flake) is derived from this
//! root. Children run in other working directories (Terraform in its workspace under
//! `.nixmox/build`), so a relative path would resolve somewhere else: with `cd homelab && nixmox
//! up` Terraform's state once landed inside the build directory and was wiped by the next
//! render. A [`ProjectRoot`] can only be built by resolving the directory, so holding one is
//! proof that paths joined onto it are absolute.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use nixmox_core::Project;

use crate::error::{Error, Result};

/// An absolute, canonical project directory that existed when it was resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectRoot(PathBuf);

impl ProjectRoot {
    /// Resolves `dir` (relative to the current directory, symlinks followed). A missing
    /// directory is a usage error naming what was given.
    pub fn resolve(dir: &Path) -> Result<ProjectRoot> {
        match dir.canonicalize() {
            Ok(p) if p.is_dir() => Ok(ProjectRoot(p)),
            Ok(_) => Err(Error::Usage(format!(
                "project directory `{}` is not a directory",
                dir.display()
            ))),
            Err(_) => Err(Error::Usage(format!(
                "project directory `{}` does not exist",
                dir.display()
            ))),
        }
    }

    /// The project a command given no `-C` works on, as Docker Compose finds its file: the
    /// current directory if it holds `nixmox.yaml`, else the nearest parent that does (so
    /// `nixmox plan` works from `services/web/`); with none, the current directory, whose
    /// missing `nixmox.yaml` the load then reports. `dir` is the `-C` given: anything other
    /// than `.` is taken as it is.
    pub fn discover(dir: &Path) -> Result<ProjectRoot> {
        let here = ProjectRoot::resolve(dir)?;
        if dir != Path::new(".") {
            return Ok(here);
        }
        let found = here
            .0
            .ancestors()
            .find(|d| d.join(nixmox_core::load::PROJECT_FILE).is_file())
            .map(Path::to_path_buf);
        Ok(found.map(ProjectRoot).unwrap_or(here))
    }

    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// A path the project names: relative ones are taken from the project directory,
    /// absolute ones as they are.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.0.join(p)
        }
    }
}

/// A program named in the project (`terraform.binary`, a custom deployer's first word): a
/// relative path with a `/` is taken from the project directory (children run in other
/// directories, where `./deploy.sh` would name something else); a bare name is looked up on
/// `PATH`.
pub fn program_path(root: &Path, program: &str) -> PathBuf {
    let p = Path::new(program);
    if p.is_relative() && program.contains('/') {
        root.join(p)
    } else {
        p.to_path_buf()
    }
}

impl Deref for ProjectRoot {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ProjectRoot {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_absolute_and_canonical() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("p")).unwrap();
        let dotted = real.join("p/../p/.");
        let root = ProjectRoot::resolve(&dotted).unwrap();
        assert_eq!(root.as_path(), real.join("p"));
        assert!(root.is_absolute());
        assert_eq!(root.resolve_path(Path::new("a/b")), real.join("p/a/b"));
        assert_eq!(root.resolve_path(Path::new("/x")), Path::new("/x"));
    }

    #[test]
    fn programs_with_a_relative_path_come_from_the_project() {
        let root = Path::new("/p");
        assert_eq!(
            program_path(root, "./deploy.sh"),
            Path::new("/p/./deploy.sh")
        );
        assert_eq!(program_path(root, "bin/tf"), Path::new("/p/bin/tf"));
        assert_eq!(program_path(root, "terraform"), Path::new("terraform"));
        assert_eq!(program_path(root, "/usr/bin/tf"), Path::new("/usr/bin/tf"));
    }

    #[test]
    fn root_missing_is_a_usage_error() {
        let err = ProjectRoot::resolve(Path::new("/no/such/project/dir")).unwrap_err();
        assert!(matches!(err, Error::Usage(_)));
        assert!(err.to_string().contains("/no/such/project/dir"));
    }
}

/// Where NixMox keeps its working files, all under the project's `.nixmox/`.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The project directory, absolute.
    pub root: PathBuf,
    pub state_db: PathBuf,
    pub build: PathBuf,
    pub logs: PathBuf,
    pub terraform: PathBuf,
    /// OpenSSH's shared-connection sockets.
    pub ssh: PathBuf,
    /// The hosts' SSH keys, as OpenSSH records them.
    pub known_hosts: PathBuf,
}

impl Paths {
    pub fn new(root: &ProjectRoot, project: &Project) -> Self {
        let dot = root.join(".nixmox");
        let state_db = {
            let p = Path::new(&project.state.path);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            }
        };
        Paths {
            root: root.to_path_buf(),
            state_db,
            build: dot.join("build"),
            logs: dot.join("logs"),
            terraform: dot.join("terraform"),
            ssh: dot.join("ssh"),
            known_hosts: dot.join("known_hosts"),
        }
    }
}
