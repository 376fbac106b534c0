//! Reads a project directory into [`nixmox_core::Sources`].

use std::fs;
use std::path::{Path, PathBuf};

use nixmox_core::load::PROJECT_FILE;
use nixmox_core::lock::LOCK_FILE;
use nixmox_core::{Diagnostic, Severity, SourceFile, Sources};

use crate::error::{Error, Result};

pub const MANIFEST_NAMES: [&str; 3] = ["manifest.yaml", "manifest.yml", "manifest.json"];

/// The files of a project, plus problems with its layout the core cannot see.
pub struct Read {
    pub sources: Sources,
    pub diagnostics: Vec<Diagnostic>,
}

fn read(root: &Path, rel: &str) -> Result<SourceFile> {
    let path = root.join(rel);
    let bytes = fs::read(&path).map_err(|source| Error::Read { path, source })?;
    Ok(SourceFile {
        path: rel.to_string(),
        bytes,
    })
}

fn layout(file: String, message: String, help: &str, severity: Severity) -> Diagnostic {
    Diagnostic {
        severity,
        file,
        span: None,
        field: None,
        message,
        snippet: None,
        width: 1,
        help: Some(help.to_string()),
    }
}

pub fn read_project(root: &Path) -> Result<Read> {
    if !root.is_dir() {
        return Err(Error::Usage(format!(
            "project directory `{}` does not exist",
            root.display()
        )));
    }
    let mut diagnostics = Vec::new();
    let config = if root.join(PROJECT_FILE).is_file() {
        Some(read(root, PROJECT_FILE)?)
    } else {
        None
    };
    let lock = if root.join(LOCK_FILE).is_file() {
        Some(read(root, LOCK_FILE)?)
    } else {
        None
    };
    let mut manifests = Vec::new();
    let services = root.join("services");
    if services.is_dir() {
        let mut dirs: Vec<PathBuf> = fs::read_dir(&services)
            .map_err(|source| Error::Read {
                path: services.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let found: Vec<&str> = MANIFEST_NAMES
                .iter()
                .copied()
                .filter(|m| dir.join(m).is_file())
                .collect();
            match found.as_slice() {
                [] => diagnostics.push(layout(
                    format!("services/{name}"),
                    format!("`services/{name}` has no manifest; it is not part of the project"),
                    "a service directory holds manifest.yaml (or manifest.yml / manifest.json)",
                    Severity::Warning,
                )),
                [one] => manifests.push(read(root, &format!("services/{name}/{one}"))?),
                many => diagnostics.push(layout(
                    format!("services/{name}"),
                    format!(
                        "`services/{name}` has more than one manifest: {}",
                        many.join(", ")
                    ),
                    "keep exactly one of manifest.yaml, manifest.yml or manifest.json",
                    Severity::Error,
                )),
            }
        }
    }
    Ok(Read {
        sources: Sources {
            config,
            manifests,
            lock,
        },
        diagnostics,
    })
}

/// Answers the core's "does this project-relative path exist".
pub fn exists_in(root: &Path) -> impl Fn(&str) -> bool + '_ {
    move |rel: &str| root.join(rel).exists()
}

/// Writes a file atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    fs::write(&tmp, contents)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = fs::remove_file(&tmp);
            Error::Write {
                path: path.to_path_buf(),
                source,
            }
        })
}

/// Content digests of every file the project references (NixOS modules, migrations, Terraform
/// module directories), so that editing one changes the steps that use it.
pub fn digests(
    root: &Path,
    project: &nixmox_core::Project,
) -> std::collections::BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    let mut paths: Vec<&str> = Vec::new();
    for s in &project.services {
        paths.extend(s.nixos_modules.iter().map(String::as_str));
        for d in &s.dbs {
            paths.extend(d.migrations.iter().map(String::as_str));
        }
        for t in &s.terraform {
            paths.extend(t.modules.iter().map(String::as_str));
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for rel in paths {
        let mut hasher = Sha256::new();
        hash_path(&root.join(rel), Path::new(""), &mut hasher);
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.insert(rel.to_string(), hex);
    }
    out
}

fn hash_path(path: &Path, rel: &Path, hasher: &mut sha2::Sha256) {
    use sha2::Digest;
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries {
            let name = e.file_name().map(PathBuf::from).unwrap_or_default();
            // Terraform's own working files are not part of the module's content.
            if name
                .to_str()
                .is_some_and(|n| n == ".terraform" || n.starts_with("terraform.tfstate"))
            {
                continue;
            }
            hash_path(&e, &rel.join(name), hasher);
        }
    } else {
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(fs::read(path).unwrap_or_default());
        hasher.update([0]);
    }
}

/// Writes a rendered tree: into a fresh sibling directory first, then swapped into place, so a
/// failure never leaves a half-written build and files of removed services do not linger.
/// Returns how many project files were copied.
pub fn write_tree(
    root: &Path,
    out: &Path,
    rendered: &nixmox_core::render::Rendered,
) -> Result<usize> {
    // Reading is far cheaper than writing: when the tree on disk is already exactly what would
    // be written (a no-op `up`), leave it alone.
    if let Some(copied) = tree_matches(root, out, rendered) {
        return Ok(copied);
    }
    let parent = out.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| Error::Write {
        path: parent.to_path_buf(),
        source,
    })?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("build");
    let tmp = parent.join(format!(".{name}.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<usize> {
        for f in &rendered.files {
            let path = tmp.join(&f.path);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|source| Error::Write {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            fs::write(&path, f.contents.as_bytes()).map_err(|source| Error::Write {
                path: path.clone(),
                source,
            })?;
        }
        let mut copied = 0;
        for c in &rendered.copies {
            let from = root.join(&c.from);
            if !from.exists() {
                // Optional inputs (a host's secrets file before secrets exist) are skipped;
                // required ones were checked by validation.
                continue;
            }
            copied += copy_path(&from, &tmp.join(&c.to))?;
        }
        Ok(copied)
    })();
    let copied = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if out.exists() {
        fs::rename(out, &old).map_err(|source| Error::Write {
            path: out.to_path_buf(),
            source,
        })?;
    }
    fs::rename(&tmp, out).map_err(|source| Error::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let _ = fs::remove_dir_all(&old);
    Ok(copied)
}

fn copy_path(from: &Path, to: &Path) -> Result<usize> {
    if from.is_dir() {
        fs::create_dir_all(to).map_err(|source| Error::Write {
            path: to.to_path_buf(),
            source,
        })?;
        let mut n = 0;
        let mut entries: Vec<PathBuf> = fs::read_dir(from)
            .map_err(|source| Error::Read {
                path: from.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            let name = e.file_name().map(PathBuf::from).unwrap_or_default();
            if name
                .to_str()
                .is_some_and(|n| n == ".terraform" || n.starts_with("terraform.tfstate"))
            {
                continue;
            }
            n += copy_path(&e, &to.join(name))?;
        }
        Ok(n)
    } else {
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).map_err(|source| Error::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        fs::copy(from, to).map_err(|source| Error::Write {
            path: to.to_path_buf(),
            source,
        })?;
        Ok(1)
    }
}

/// `Some(number of copied files)` when `out` holds exactly the rendered files and copies, byte
/// for byte, and nothing else.
fn tree_matches(
    root: &Path,
    out: &Path,
    rendered: &nixmox_core::render::Rendered,
) -> Option<usize> {
    let mut expected: std::collections::BTreeMap<PathBuf, Vec<u8>> =
        std::collections::BTreeMap::new();
    for f in &rendered.files {
        expected.insert(PathBuf::from(&f.path), f.contents.as_bytes().to_vec());
    }
    let mut copied = 0;
    for c in &rendered.copies {
        let from = root.join(&c.from);
        if !from.exists() {
            continue;
        }
        let mut files = Vec::new();
        list_files(&from, Path::new(""), &mut files);
        for rel in files {
            // A copied file lists itself as "": read it, not "file/" (which is no directory).
            let source = if rel.as_os_str().is_empty() {
                from.clone()
            } else {
                from.join(&rel)
            };
            let bytes = fs::read(source).ok()?;
            let to = if rel.as_os_str().is_empty() {
                PathBuf::from(&c.to)
            } else {
                Path::new(&c.to).join(&rel)
            };
            expected.insert(to, bytes);
            copied += 1;
        }
    }
    let mut present = Vec::new();
    list_files(out, Path::new(""), &mut present);
    if present.len() != expected.len() {
        return None;
    }
    for rel in present {
        let want = expected.get(&rel)?;
        if fs::read(out.join(&rel)).ok()? != *want {
            return None;
        }
    }
    Some(copied)
}

/// Files under `path` (relative to it; `path` itself as "" when it is a file), skipping what
/// copies skip.
fn list_files(path: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let Ok(rd) = fs::read_dir(path) else { return };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name();
            if name
                .to_str()
                .is_some_and(|n| n == ".terraform" || n.starts_with("terraform.tfstate"))
            {
                continue;
            }
            list_files(&e.path(), &rel.join(&name), out);
        }
    } else if path.is_file() {
        out.push(rel.to_path_buf());
    }
}
