//! Reads a project directory into [`nixmox_core::Sources`], says what is at the paths the
//! manifests reference, and writes the build tree.
//!
//! A project may come from someone else, so nothing here follows a symbolic link out of the
//! project or opens anything but a regular file or a directory (a FIFO would block forever,
//! a device would be read without end): every path is checked with `symlink_metadata` and
//! `canonicalize` before it is opened.

use std::collections::HashMap;
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
    /// What reading saw in each service directory (one directory read each), so that the
    /// probes of the files manifests reference there need no further system call.
    listing: Listing,
}

impl Read {
    /// Answers the core's "what is at this project-relative path", like [`probe_in`], from
    /// what reading the project saw where it can: a regular file or a missing name directly
    /// in a service directory (the common case, `./configuration.nix`). Anything else (a
    /// directory, a link, a deeper path) is probed on the disk.
    pub fn probe<'a>(&'a self, root: &'a Path) -> impl Fn(&str) -> PathKind + 'a {
        move |rel: &str| match self.listing.lookup(rel) {
            Some(kind) => kind,
            None => probe(root, rel, true),
        }
    }
}

/// The entries of each service directory that is a real directory (not a link) inside the
/// project, by their type as the directory read gave it (no link followed).
#[derive(Default)]
struct Listing {
    dirs: HashMap<String, Vec<(String, Entry)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Entry {
    File,
    /// A directory, a link or a special file: probed on the disk when asked about.
    Other,
}

impl Listing {
    fn lookup(&self, rel: &str) -> Option<PathKind> {
        let (dir, name) = rel.rsplit_once('/')?;
        if name.is_empty() || name == "." || name == ".." {
            return None;
        }
        let entries = self.dirs.get(dir)?;
        match entries.iter().find(|(n, _)| n == name) {
            None => Some(PathKind::Missing),
            Some((_, Entry::File)) => Some(PathKind::File),
            Some((_, Entry::Other)) => None,
        }
    }
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
        Ok(Some(())) => read_regular(root, rel, false),
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

/// Opens a file for reading without blocking on a FIFO and, with `follow` false, without
/// following a link at the last component; `Ok(None)` when what is there is not a regular
/// file (checked on the open file, so nothing can be swapped in between).
fn open_regular(path: &Path, follow: bool) -> std::io::Result<Option<Regular>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => f,
        // O_NOFOLLOW on a link.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) && !follow => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    Ok(meta.is_file().then_some(Regular {
        file,
        len: meta.len(),
    }))
}

/// An open regular file and its size when it was checked.
struct Regular {
    file: fs::File,
    len: u64,
}

/// The file's bytes. The size from the one `fstat` sizes the buffer; `read_to_end` would ask
/// the kernel for the size and position again (two more system calls per file, 15,000 for a
/// project of 5,000 services; docs/performance.md).
fn read_to_vec(regular: Regular) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let Regular { mut file, len } = regular;
    // One byte more than the size, so a file read whole ends with a read of 0 bytes.
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0).saturating_add(1)];
    let mut filled = 0;
    loop {
        if filled == bytes.len() {
            // It grew since it was checked.
            bytes.resize(bytes.len() * 2, 0);
        }
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// How many threads the shell uses for reading and writing many files.
fn threads(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Below a few dozen files a thread costs more than it saves.
    cores.min(8).min(jobs / 32).max(1)
}

/// Runs `f` over `items` on up to [`threads`] threads; the results in the order of `items`.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let n = threads(items.len());
    if n == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(n);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// What one service directory gave: its listing and its manifest (or problems).
struct ServiceDir {
    listing: Option<Vec<(String, Entry)>>,
    manifest: Option<SourceFile>,
    diagnostics: Vec<Diagnostic>,
}

pub fn read_project(root: &Path) -> Result<Read> {
    if !root.is_dir() {
        return Err(Error::Usage(format!(
            "project directory `{}` does not exist",
            root.display()
        )));
    }
    let canonical = root.canonicalize().map_err(|source| Error::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let root = canonical.as_path();
    let mut diagnostics = Vec::new();
    let config = read_checked(root, PROJECT_FILE, &mut diagnostics)?;
    let lock = read_checked(root, LOCK_FILE, &mut diagnostics)?;
    let empty = |config, lock, diagnostics| {
        Ok(Read {
            sources: Sources {
                config,
                manifests: Vec::new(),
                lock,
            },
            diagnostics,
            listing: Listing::default(),
        })
    };
    let services = root.join("services");
    match probe(root, "services", false) {
        PathKind::Dir | PathKind::Exists => {}
        PathKind::Missing | PathKind::File => return empty(config, lock, diagnostics),
        PathKind::Special { .. } | PathKind::Escapes { .. } => {
            diagnostics.push(layout(
                "services".into(),
                "`services` leads outside the project directory or is not a directory".into(),
                "`services/` must be a directory inside the project",
                Severity::Error,
            ));
            return empty(config, lock, diagnostics);
        }
    }
    // One directory read of `services/`; the entries' types come with it (no link followed).
    let mut entries: Vec<(String, Option<fs::FileType>)> = fs::read_dir(&services)
        .map_err(|source| Error::Read {
            path: services.clone(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            Some((name, e.file_type().ok()))
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    // Each service directory is read once, in parallel; the results keep the sorted order.
    let dirs = par_map(&entries, |(name, file_type)| {
        read_service_dir(root, name, *file_type)
    });
    let mut manifests = Vec::with_capacity(dirs.len());
    let mut listing = Listing::default();
    for ((name, _), dir) in entries.iter().zip(dirs) {
        let dir = dir?;
        diagnostics.extend(dir.diagnostics);
        manifests.extend(dir.manifest);
        if let Some(l) = dir.listing {
            listing.dirs.insert(format!("services/{name}"), l);
        }
    }
    Ok(Read {
        sources: Sources {
            config,
            manifests,
            lock,
        },
        diagnostics,
        listing,
    })
}

/// Reads one entry of `services/`: a real directory is listed once and its one manifest read;
/// a link is checked as every other path is (it must stay inside the project).
fn read_service_dir(
    root: &Path,
    name: &str,
    file_type: Option<fs::FileType>,
) -> Result<ServiceDir> {
    let dir_rel = format!("services/{name}");
    let mut out = ServiceDir {
        listing: None,
        manifest: None,
        diagnostics: Vec::new(),
    };
    let real_dir = file_type.is_some_and(|t| t.is_dir());
    if !real_dir {
        match probe(root, &dir_rel, false) {
            PathKind::Dir | PathKind::Exists => {}
            // Files next to the service directories are not services.
            PathKind::File | PathKind::Missing | PathKind::Special { .. } => return Ok(out),
            PathKind::Escapes { at } => {
                out.diagnostics.push(layout(
                    dir_rel.clone(),
                    format!("`{dir_rel}` leads outside the project directory (`{at}` is a symbolic link out of it)"),
                    "a service directory must be inside the project; copy it in instead of linking to it",
                    Severity::Error,
                ));
                return Ok(out);
            }
        }
    }
    // A real directory inside the canonical root: its regular files are inside the project.
    // A linked one (inside, as checked above) goes through `regular_file` name by name.
    let mut found: Vec<&str> = Vec::new();
    if real_dir {
        let path = root.join(&dir_rel);
        let listed: Vec<(String, Entry)> = fs::read_dir(&path)
            .map_err(|source| Error::Read { path, source })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let kind = match e.file_type() {
                    Ok(t) if t.is_file() => Entry::File,
                    _ => Entry::Other,
                };
                Some((name, kind))
            })
            .collect();
        for m in MANIFEST_NAMES {
            match listed.iter().find(|(n, _)| n == m) {
                None => {}
                Some((_, Entry::File)) => found.push(m),
                Some((_, Entry::Other)) => {
                    check_manifest(root, &dir_rel, m, &mut found, &mut out.diagnostics)
                }
            }
        }
        out.listing = Some(listed);
    } else {
        for m in MANIFEST_NAMES {
            check_manifest(root, &dir_rel, m, &mut found, &mut out.diagnostics);
        }
    }
    match found.as_slice() {
        [] => {
            if out.diagnostics.is_empty() {
                out.diagnostics.push(layout(
                    dir_rel.clone(),
                    format!("`{dir_rel}` has no manifest; it is not part of the project"),
                    "a service directory holds manifest.yaml (or manifest.yml / manifest.json)",
                    Severity::Warning,
                ));
            }
        }
        [one] => {
            let rel = format!("{dir_rel}/{one}");
            match read_regular(root, &rel, real_dir)? {
                Some(f) => out.manifest = Some(f),
                None => out.diagnostics.push(layout(
                    rel.clone(),
                    format!("`{rel}` is not a regular file; NixMox never opens one"),
                    "a manifest must be a regular file inside the project directory",
                    Severity::Error,
                )),
            }
        }
        many => out.diagnostics.push(layout(
            dir_rel.clone(),
            format!(
                "`{dir_rel}` has more than one manifest: {}",
                many.join(", ")
            ),
            "keep exactly one of manifest.yaml, manifest.yml or manifest.json",
            Severity::Error,
        )),
    }
    Ok(out)
}

/// Checks a manifest name that is not plainly a regular file (a link, a directory, a FIFO).
fn check_manifest<'m>(
    root: &Path,
    dir_rel: &str,
    m: &'m str,
    found: &mut Vec<&'m str>,
    diagnostics: &mut Vec<Diagnostic>,
) {
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

/// Reads a project file that was checked to be a regular file (or a link to one inside the
/// project); `no_link` when the listing showed a regular file, so a link swapped in since is
/// not followed. `Ok(None)` when it is no longer a regular file.
fn read_regular(root: &Path, rel: &str, no_link: bool) -> Result<Option<SourceFile>> {
    let path = root.join(rel);
    let file = open_regular(&path, !no_link).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let Some(file) = file else { return Ok(None) };
    let bytes = read_to_vec(file).map_err(|source| Error::Read { path, source })?;
    Ok(Some(SourceFile {
        path: rel.to_string(),
        bytes,
    }))
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
    match root.canonicalize() {
        Ok(root) => probe_at(&root, rel, deep),
        Err(_) => PathKind::Missing,
    }
}

/// [`probe`] under a root that is already canonical.
fn probe_at(root: &Path, rel: &str, deep: bool) -> PathKind {
    let path = root.join(rel);
    if fs::symlink_metadata(&path).is_err() {
        // Nothing there, or a directory on the way is missing or a dangling link.
        return match first_escape(root, Path::new(rel)) {
            Some(at) => PathKind::Escapes { at },
            None => PathKind::Missing,
        };
    }
    let real = match path.canonicalize() {
        Ok(real) => real,
        // A dangling link.
        Err(_) => return PathKind::Missing,
    };
    if !real.starts_with(root) {
        return PathKind::Escapes {
            at: first_escape(root, Path::new(rel)).unwrap_or_else(|| rel.to_string()),
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
            if let Some(problem) = walk(root, &real, Path::new(rel), &mut seen) {
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

/// A file or directory [`write_file`] could not write, and why; worded as [`Error::Write`],
/// which it becomes.
#[derive(Debug, thiserror::Error)]
#[error("failed to write `{}`: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Error {
        Error::Write {
            path: e.path,
            source: e.source,
        }
    }
}

/// Writes a file atomically: a temporary file in the same directory, then a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    Ok(write_file(path, contents)?)
}

/// [`write_atomic`] with its own error, for modules with their own error type (`secrets`).
pub fn write_file(path: &Path, contents: &[u8]) -> std::result::Result<(), WriteError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|source| WriteError {
        path: dir.to_path_buf(),
        source,
    })?;
    replace_file(path, contents)
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
    // Read and hashed on several threads; a large project references thousands of files.
    let hashes = par_map(&paths, |rel| {
        let mut hasher = Sha256::new();
        hash_path(&root.join(rel), Path::new(""), &mut hasher);
        hex(&hasher.finalize())
    });
    paths
        .iter()
        .map(|rel| rel.to_string())
        .zip(hashes)
        .collect()
}

fn hex(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(digest.len() * 2);
    for &b in digest {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
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
        if let Ok(Some(file)) = open_regular(path, true) {
            hasher.update(read_to_vec(file).unwrap_or_default());
        }
        hasher.update([0]);
    }
}

/// Writes a rendered tree into `out` and returns how many project files it holds as copies.
///
/// The first time (no `out` yet), or when `out` holds anything but regular files and
/// directories in the way, the whole tree is written into a fresh sibling directory and swapped
/// into place, so a failure never leaves a half-written build. After that, a render changes
/// only what differs: each file is compared with what is on disk and, when it differs, replaced
/// atomically (a temporary file in the same directory, then a rename), so no file is ever seen
/// half-written; files and directories that are no longer rendered are removed. The trade-off:
/// while a re-render runs (or after one fails part-way) the tree can mix files of the old and
/// the new render. Nothing reads the build while NixMox writes it (the engine renders before
/// it runs any step, under the run lock), and the next render compares every file again, so a
/// failed one is repaired by the next. Reading and writing run on several threads.
pub fn write_tree(
    root: &Path,
    out: &Path,
    rendered: &nixmox_core::render::Rendered,
) -> Result<usize> {
    let root = root.canonicalize().map_err(|source| Error::Read {
        path: root.to_path_buf(),
        source,
    })?;
    let root = root.as_path();
    // Validation checked every referenced path; check again what is about to be opened, in
    // case the tree changed since (and for copies validation does not see, like a host's
    // secrets file).
    for c in &rendered.copies {
        let why = match probe_at(root, &c.from, true) {
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
    let mut wanted: Vec<(PathBuf, Want)> = rendered
        .files
        .iter()
        .map(|f| (PathBuf::from(&f.path), Want::Text(f.contents.as_bytes())))
        .collect();
    let mut copied = 0;
    for c in &rendered.copies {
        let from = root.join(&c.from);
        if !from.exists() {
            // Optional inputs (a host's secrets file before secrets exist) are skipped;
            // required ones were checked by validation.
            continue;
        }
        let mut files = Vec::new();
        list_files(&from, Path::new(""), &mut files);
        for rel in files {
            // A copied file lists itself as "": its source is `from`, its place `c.to`.
            let (source, to) = if rel.as_os_str().is_empty() {
                (from.clone(), PathBuf::from(&c.to))
            } else {
                (from.join(&rel), Path::new(&c.to).join(&rel))
            };
            wanted.push((to, Want::Copy(source)));
            copied += 1;
        }
    }
    // A copy wins over a rendered file of the same path (as when copies were written last):
    // reversed, the stable sort puts it first, and `dedup_by` keeps the first.
    wanted.reverse();
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    wanted.dedup_by(|a, b| a.0 == b.0);
    match scan(out) {
        Some(present) if !present.conflicts(&wanted) => update(out, &wanted, &present)?,
        _ => write_fresh(out, &wanted)?,
    }
    Ok(copied)
}

/// What a file of the build tree should hold.
enum Want<'a> {
    Text(&'a [u8]),
    /// The contents of this project file.
    Copy(PathBuf),
}

impl Want<'_> {
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Want::Text(b) => Ok(std::borrow::Cow::Borrowed(b)),
            Want::Copy(from) => {
                let read = |source| Error::Read {
                    path: from.clone(),
                    source,
                };
                // Only a regular file is opened, without blocking on a FIFO swapped in since.
                let file = open_regular(from, true).map_err(read)?;
                let Some(file) = file else {
                    return Err(Error::Unsafe {
                        path: from.clone(),
                        why: "not a regular file".into(),
                    });
                };
                Ok(std::borrow::Cow::Owned(read_to_vec(file).map_err(read)?))
            }
        }
    }
}

/// The regular files and directories under a build tree, relative to it.
struct Present {
    files: std::collections::HashSet<PathBuf>,
    dirs: std::collections::HashSet<PathBuf>,
}

impl Present {
    /// Whether a wanted file is a directory on disk, or a directory it needs is a file.
    fn conflicts(&self, wanted: &[(PathBuf, Want)]) -> bool {
        wanted.iter().any(|(path, _)| {
            self.dirs.contains(path) || path.ancestors().skip(1).any(|a| self.files.contains(a))
        })
    }
}

/// Lists `out` without following links: `None` when it does not exist, or when it holds
/// anything but regular files and directories (a link, a FIFO), which only a fresh tree
/// replaces safely.
fn scan(out: &Path) -> Option<Present> {
    let meta = fs::symlink_metadata(out).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let mut present = Present {
        files: Default::default(),
        dirs: Default::default(),
    };
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(out.join(&rel)).ok()? {
            let e = e.ok()?;
            let name = e.file_name();
            // Terraform's own working files are neither rendered nor removed.
            if skipped(&name) {
                continue;
            }
            let entry = rel.join(&name);
            let t = e.file_type().ok()?;
            if t.is_dir() {
                stack.push(entry.clone());
                present.dirs.insert(entry);
            } else if t.is_file() {
                present.files.insert(entry);
            } else {
                return None;
            }
        }
    }
    Some(present)
}

/// The directories the wanted files need, parents before children.
fn needed_dirs(wanted: &[(PathBuf, Want)]) -> Vec<PathBuf> {
    let mut dirs: std::collections::BTreeSet<PathBuf> = Default::default();
    for (path, _) in wanted {
        for a in path.ancestors().skip(1) {
            if a.as_os_str().is_empty() || !dirs.insert(a.to_path_buf()) {
                break;
            }
        }
    }
    dirs.into_iter().collect()
}

fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::Write {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Re-renders in place: only files whose contents differ are replaced; what is no longer
/// rendered is removed.
fn update(out: &Path, wanted: &[(PathBuf, Want)], present: &Present) -> Result<()> {
    for dir in needed_dirs(wanted) {
        if !present.dirs.contains(&dir) {
            create_dir(&out.join(dir))?;
        }
    }
    let results = par_map(wanted, |(rel, want)| -> Result<()> {
        let path = out.join(rel);
        let bytes = want.bytes()?;
        if present.files.contains(rel) {
            // The file was listed as a regular file; it is opened without following a link
            // or blocking on a FIFO, in case it changed since.
            if let Ok(Some(file)) = open_regular(&path, false) {
                if read_to_vec(file).is_ok_and(|old| old == *bytes) {
                    return Ok(());
                }
            }
        }
        Ok(replace_file(&path, &bytes)?)
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let keep: std::collections::HashSet<&Path> = wanted.iter().map(|(p, _)| p.as_path()).collect();
    for stale in present.files.iter().filter(|f| !keep.contains(f.as_path())) {
        let path = out.join(stale);
        fs::remove_file(&path).map_err(|source| Error::Write { path, source })?;
    }
    let needed: std::collections::HashSet<PathBuf> = needed_dirs(wanted).into_iter().collect();
    let mut stale_dirs: Vec<&PathBuf> = present
        .dirs
        .iter()
        .filter(|d| !needed.contains(*d))
        .collect();
    // Children before parents; a directory holding Terraform's working files stays.
    stale_dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in stale_dirs {
        let _ = fs::remove_dir(out.join(d));
    }
    Ok(())
}

/// Replaces one file atomically: a temporary file next to it, then a rename over it.
fn replace_file(path: &Path, bytes: &[u8]) -> std::result::Result<(), WriteError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = fs::remove_file(&tmp);
            WriteError {
                path: path.to_path_buf(),
                source,
            }
        })
}

/// Writes the whole tree into a fresh sibling directory and swaps it into place.
fn write_fresh(out: &Path, wanted: &[(PathBuf, Want)]) -> Result<()> {
    let parent = out.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| Error::Write {
        path: parent.to_path_buf(),
        source,
    })?;
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("build");
    let tmp = parent.join(format!(".{name}.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        create_dir(&tmp)?;
        for dir in needed_dirs(wanted) {
            create_dir(&tmp.join(dir))?;
        }
        let results = par_map(wanted, |(rel, want)| -> Result<()> {
            let path = tmp.join(rel);
            let bytes = want.bytes()?;
            fs::write(&path, &*bytes).map_err(|source| Error::Write { path, source })
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    // On every failure from here on, the new tree is removed and the old one put back: no
    // `.build.new-<pid>` is left behind.
    if fs::symlink_metadata(out).is_ok() {
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use nixmox_core::render::{Copy, Rendered};
    use nixmox_core::RenderedFile;

    use super::*;

    fn rendered(files: &[(&str, &str)], copies: &[(&str, &str)]) -> Rendered {
        Rendered {
            files: files
                .iter()
                .map(|(path, contents)| RenderedFile {
                    path: path.to_string(),
                    contents: contents.to_string(),
                })
                .collect(),
            copies: copies
                .iter()
                .map(|(from, to)| Copy {
                    from: from.to_string(),
                    to: to.to_string(),
                })
                .collect(),
        }
    }

    fn inode(p: &Path) -> u64 {
        fs::metadata(p).unwrap().ino()
    }

    /// Issue 17: a re-render replaces only the files whose contents changed and removes what
    /// is no longer rendered; an unchanged file is not written again.
    #[test]
    fn re_render_writes_only_changed_files_and_removes_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        fs::create_dir_all(root.join("services/app")).unwrap();
        fs::write(root.join("services/app/configuration.nix"), "{ }\n").unwrap();
        let out = root.join(".nixmox/build");
        let first = rendered(
            &[
                ("hosts/app.nix", "app 1"),
                ("hosts/db.nix", "db 1"),
                ("old/gone.nix", "gone"),
            ],
            &[(
                "services/app/configuration.nix",
                "modules/app/configuration.nix",
            )],
        );
        assert_eq!(write_tree(&root, &out, &first).unwrap(), 1);
        let app = inode(&out.join("hosts/app.nix"));
        let copy = inode(&out.join("modules/app/configuration.nix"));
        let db = inode(&out.join("hosts/db.nix"));

        let second = rendered(
            &[
                ("hosts/app.nix", "app 1"),
                ("hosts/db.nix", "db 2"),
                ("hosts/new.nix", "new"),
            ],
            &[(
                "services/app/configuration.nix",
                "modules/app/configuration.nix",
            )],
        );
        assert_eq!(write_tree(&root, &out, &second).unwrap(), 1);
        assert_eq!(
            inode(&out.join("hosts/app.nix")),
            app,
            "unchanged: not rewritten"
        );
        assert_eq!(inode(&out.join("modules/app/configuration.nix")), copy);
        assert_ne!(inode(&out.join("hosts/db.nix")), db, "changed: replaced");
        assert_eq!(
            fs::read_to_string(out.join("hosts/db.nix")).unwrap(),
            "db 2"
        );
        assert_eq!(
            fs::read_to_string(out.join("hosts/new.nix")).unwrap(),
            "new"
        );
        assert!(
            !out.join("old").exists(),
            "a stale file and its directory are removed"
        );

        // A changed project file is copied again.
        fs::write(root.join("services/app/configuration.nix"), "{ x = 1; }\n").unwrap();
        write_tree(&root, &out, &second).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("modules/app/configuration.nix")).unwrap(),
            "{ x = 1; }\n"
        );
        // No temporary file or sibling tree is left behind.
        let siblings: Vec<_> = fs::read_dir(root.join(".nixmox")).unwrap().collect();
        assert_eq!(siblings.len(), 1);
        let mut listed = Vec::new();
        list_files(&out, Path::new(""), &mut listed);
        listed.sort();
        assert_eq!(
            listed,
            [
                "hosts/app.nix",
                "hosts/db.nix",
                "hosts/new.nix",
                "modules/app/configuration.nix"
            ]
            .map(PathBuf::from)
        );
    }

    /// A link or a FIFO in the build tree is never followed or opened: the tree is written
    /// afresh and swapped in, and what the link pointed at is left alone.
    #[test]
    fn a_link_in_the_build_tree_makes_a_fresh_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("project");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("app.nix"), "outside").unwrap();
        let out = root.join(".nixmox/build");
        fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(&outside, out.join("hosts")).unwrap();
        let r = rendered(&[("hosts/app.nix", "app")], &[]);
        write_tree(&root, &out, &r).unwrap();
        assert_eq!(
            fs::read_to_string(outside.join("app.nix")).unwrap(),
            "outside"
        );
        assert!(!fs::symlink_metadata(out.join("hosts"))
            .unwrap()
            .is_symlink());
        assert_eq!(
            fs::read_to_string(out.join("hosts/app.nix")).unwrap(),
            "app"
        );
    }
}
