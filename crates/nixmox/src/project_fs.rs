//! Reads a project directory into [`nixmox_core::Sources`], says what is at the paths the
//! manifests reference, and writes the build tree.
//!
//! A project may come from someone else, so nothing here follows a symbolic link out of the
//! project or opens anything but a regular file or a directory (a FIFO would block forever,
//! a device would be read without end): every path is checked with `symlink_metadata` and
//! `canonicalize` before it is opened.

use std::fs;
use std::path::{Path, PathBuf};

use nixmox_core::load::PROJECT_FILE;
use nixmox_core::lock::LOCK_FILE;
use nixmox_core::{Diagnostic, PathKind, Severity, SourceFile, Sources};

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

/// What is at a project-relative path, for files NixMox reads itself (the project file, the
/// lock, manifests): `Ok(None)` when nothing is there, `Err(why)` when it must not be read.
fn regular_file(root: &Path, rel: &str) -> Result<Option<()>, String> {
    match probe(root, rel, false) {
        PathKind::Missing => Ok(None),
        PathKind::File | PathKind::Exists => Ok(Some(())),
        PathKind::Dir => Err("is a directory, not a file".into()),
        PathKind::Special { what, .. } => Err(format!(
            "is {what}, not a regular file; NixMox never opens one"
        )),
        PathKind::Escapes { at } => Err(format!(
            "leads outside the project directory (`{at}` is a symbolic link out of it)"
        )),
    }
}

/// Reads a file NixMox reads itself, after checking it is a regular file inside the project.
fn read_checked(
    root: &Path,
    rel: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Result<Option<SourceFile>> {
    match regular_file(root, rel) {
        Ok(None) => Ok(None),
        Ok(Some(())) => read(root, rel).map(Some),
        Err(why) => {
            diagnostics.push(layout(
                rel.to_string(),
                format!("`{rel}` {why}"),
                "project files must be regular files inside the project directory",
                Severity::Error,
            ));
            Ok(None)
        }
    }
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
    let config = read_checked(root, PROJECT_FILE, &mut diagnostics)?;
    let lock = read_checked(root, LOCK_FILE, &mut diagnostics)?;
    let mut manifests = Vec::new();
    let services = root.join("services");
    match probe(root, "services", false) {
        PathKind::Dir | PathKind::Exists => {}
        PathKind::Missing | PathKind::File => {
            return Ok(Read {
                sources: Sources {
                    config,
                    manifests,
                    lock,
                },
                diagnostics,
            })
        }
        PathKind::Special { .. } | PathKind::Escapes { .. } => {
            diagnostics.push(layout(
                "services".into(),
                "`services` leads outside the project directory or is not a directory".into(),
                "`services/` must be a directory inside the project",
                Severity::Error,
            ));
            return Ok(Read {
                sources: Sources {
                    config,
                    manifests,
                    lock,
                },
                diagnostics,
            });
        }
    }
    let mut names: Vec<String> = fs::read_dir(&services)
        .map_err(|source| Error::Read {
            path: services.clone(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    for name in names {
        let dir_rel = format!("services/{name}");
        match probe(root, &dir_rel, false) {
            PathKind::Dir | PathKind::Exists => {}
            // Files next to the service directories are not services.
            PathKind::File | PathKind::Missing | PathKind::Special { .. } => continue,
            PathKind::Escapes { at } => {
                diagnostics.push(layout(
                    dir_rel.clone(),
                    format!("`{dir_rel}` leads outside the project directory (`{at}` is a symbolic link out of it)"),
                    "a service directory must be inside the project; copy it in instead of linking to it",
                    Severity::Error,
                ));
                continue;
            }
        }
        let mut found: Vec<&str> = Vec::new();
        for m in MANIFEST_NAMES {
            let rel = format!("{dir_rel}/{m}");
            match regular_file(root, &rel) {
                Ok(None) => {}
                Ok(Some(())) => found.push(m),
                Err(why) => diagnostics.push(layout(
                    rel.clone(),
                    format!("`{rel}` {why}"),
                    "a manifest must be a regular file inside the project directory",
                    Severity::Error,
                )),
            }
        }
        match found.as_slice() {
            [] => {
                if !diagnostics
                    .iter()
                    .any(|d| d.file.starts_with(&format!("{dir_rel}/")))
                {
                    diagnostics.push(layout(
                        dir_rel.clone(),
                        format!("`{dir_rel}` has no manifest; it is not part of the project"),
                        "a service directory holds manifest.yaml (or manifest.yml / manifest.json)",
                        Severity::Warning,
                    ));
                }
            }
            [one] => manifests.push(read(root, &format!("{dir_rel}/{one}"))?),
            many => diagnostics.push(layout(
                dir_rel.clone(),
                format!(
                    "`{dir_rel}` has more than one manifest: {}",
                    many.join(", ")
                ),
                "keep exactly one of manifest.yaml, manifest.yml or manifest.json",
                Severity::Error,
            )),
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

/// Problems with the places NixMox writes to inside the project: `.nixmox/` (build, state,
/// logs), `secrets/` and a relative `state.path` must not lead out of the project through a
/// symbolic link, or a project from someone else could make NixMox write anywhere.
pub fn check_written_paths(root: &Path, project: &nixmox_core::Project) -> Vec<Diagnostic> {
    let Ok(canonical) = root.canonicalize() else {
        return Vec::new();
    };
    let mut rels = vec![".nixmox".to_string(), "secrets".to_string()];
    if !Path::new(&project.state.path).is_absolute() {
        rels.push(project.state.path.clone());
    }
    let mut out = Vec::new();
    for rel in rels {
        if let Some(at) = first_escape(&canonical, Path::new(&rel)) {
            let (file, field) = if rel == project.state.path {
                (PROJECT_FILE.to_string(), Some("state.path".to_string()))
            } else {
                (at.clone(), None)
            };
            let mut d = layout(
                file,
                format!("`{at}` is a symbolic link that leads outside the project directory; NixMox writes there"),
                "remove the link: NixMox writes only inside the project (an absolute `state.path` is the way to keep the state elsewhere)",
                Severity::Error,
            );
            d.field = field;
            out.push(d);
        }
    }
    out
}

/// Answers the core's "does this project-relative path exist" (without saying what it is;
/// the commands use [`probe_in`]).
pub fn exists_in(root: &Path) -> impl Fn(&str) -> bool + '_ {
    move |rel: &str| root.join(rel).exists()
}

/// Answers the core's "what is at this project-relative path": a referenced directory is
/// walked, so a FIFO or an outward link anywhere inside it is found before anything is copied.
pub fn probe_in(root: &Path) -> impl Fn(&str) -> PathKind + '_ {
    move |rel: &str| probe(root, rel, true)
}

/// Names that a copy of a Terraform module leaves out (Terraform's own working files).
fn skipped(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n == ".terraform" || n.starts_with("terraform.tfstate"))
}

fn special_kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "neither a file nor a directory"
    }
}

/// What is at `rel` under `root`, without opening anything: links are resolved and must stay
/// inside the project; with `deep`, a directory's entries are checked too, recursively.
fn probe(root: &Path, rel: &str, deep: bool) -> PathKind {
    let Ok(root) = root.canonicalize() else {
        return PathKind::Missing;
    };
    let path = root.join(rel);
    if fs::symlink_metadata(&path).is_err() {
        // Nothing there, or a directory on the way is missing or a dangling link.
        return match first_escape(&root, Path::new(rel)) {
            Some(at) => PathKind::Escapes { at },
            None => PathKind::Missing,
        };
    }
    let real = match path.canonicalize() {
        Ok(real) => real,
        // A dangling link.
        Err(_) => return PathKind::Missing,
    };
    if !real.starts_with(&root) {
        return PathKind::Escapes {
            at: first_escape(&root, Path::new(rel)).unwrap_or_else(|| rel.to_string()),
        };
    }
    let Ok(meta) = fs::metadata(&real) else {
        return PathKind::Missing;
    };
    if meta.is_file() {
        PathKind::File
    } else if meta.is_dir() {
        if deep {
            let mut seen = Vec::new();
            if let Some(problem) = walk(&root, &real, Path::new(rel), &mut seen) {
                return problem;
            }
        }
        PathKind::Dir
    } else {
        PathKind::Special {
            at: rel.to_string(),
            what: special_kind(meta.file_type()),
        }
    }
}

/// The first component of `rel` that is a symbolic link resolving outside `root`.
fn first_escape(root: &Path, rel: &Path) -> Option<String> {
    let mut at = PathBuf::new();
    for c in rel.components() {
        at.push(c);
        let full = root.join(&at);
        let Ok(meta) = fs::symlink_metadata(&full) else {
            return None;
        };
        if meta.file_type().is_symlink() {
            let inside = full.canonicalize().is_ok_and(|r| r.starts_with(root));
            if !inside {
                // A dangling link is reported as an escape too when its target is absolute
                // or climbs out; either way it is not followed.
                let target = fs::read_link(&full).unwrap_or_default();
                if full.canonicalize().is_ok()
                    || target.is_absolute()
                    || target
                        .components()
                        .any(|c| c == std::path::Component::ParentDir)
                {
                    return Some(at.to_string_lossy().into_owned());
                }
            }
        }
    }
    None
}

/// Checks every entry under the directory `real` (shown as `rel`): regular files, directories
/// and links staying inside `root` only, and no link back to a directory on the way (copying
/// or hashing the tree would never end). `seen` holds the directories on the way.
fn walk(root: &Path, real: &Path, rel: &Path, seen: &mut Vec<PathBuf>) -> Option<PathKind> {
    if seen.iter().any(|s| s == real) {
        return Some(PathKind::Special {
            at: rel.to_string_lossy().into_owned(),
            what: "a symbolic link to a directory that contains it (a loop)",
        });
    }
    seen.push(real.to_path_buf());
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(real).ok()?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if skipped(&name) {
            continue;
        }
        let entry_rel = rel.join(&name);
        let shown = || entry_rel.to_string_lossy().into_owned();
        let Ok(target) = e.path().canonicalize() else {
            // A dangling link inside a module: copying it would fail; say so.
            return Some(PathKind::Escapes { at: shown() });
        };
        if !target.starts_with(root) {
            return Some(PathKind::Escapes { at: shown() });
        }
        let Ok(meta) = fs::metadata(&target) else {
            continue;
        };
        if meta.is_dir() {
            if let Some(p) = walk(root, &target, &entry_rel, seen) {
                return Some(p);
            }
        } else if !meta.is_file() {
            return Some(PathKind::Special {
                at: shown(),
                what: special_kind(meta.file_type()),
            });
        }
    }
    seen.pop();
    None
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
        // Only a regular file is opened: a FIFO would block. Validation has refused anything
        // else already; this guards against the tree changing in between.
        if fs::metadata(path).is_ok_and(|m| m.is_file()) {
            hasher.update(fs::read(path).unwrap_or_default());
        }
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
    // Validation checked every referenced path; check again what is about to be opened, in
    // case the tree changed since (and for copies validation does not see, like a host's
    // secrets file).
    for c in &rendered.copies {
        let why = match probe(root, &c.from, true) {
            PathKind::Escapes { at } => {
                format!("`{at}` is a symbolic link that leads outside the project directory")
            }
            PathKind::Special { at, what } => format!("`{at}` is {what}"),
            _ => continue,
        };
        return Err(Error::Unsafe {
            path: root.join(&c.from),
            why,
        });
    }
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
    // On every failure from here on, the new tree is removed and the old one put back: no
    // `.build.new-<pid>` is left behind.
    if out.exists() {
        if let Err(source) = fs::rename(out, &old) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::Write {
                path: out.to_path_buf(),
                source,
            });
        }
    }
    if let Err(source) = fs::rename(&tmp, out) {
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::rename(&old, out);
        return Err(Error::Write {
            path: out.to_path_buf(),
            source,
        });
    }
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
        if !from.is_file() {
            return Err(Error::Unsafe {
                path: from.to_path_buf(),
                why: "not a regular file".into(),
            });
        }
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
