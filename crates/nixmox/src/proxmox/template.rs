//! LXC templates on a PVE storage: `nixmox template list` and `nixmox template upload FILE`.
//! Templates live on a storage with `vztmpl` content (usually `local`); the storage is the
//! one `proxmox.template` names (`local:vztmpl/nixos-….tar.xz` → `local`).

use std::path::Path;

use nixmox_core::Project;

use super::client::{Client, Volume};
use super::error::PveError;

/// The storage and file name `proxmox.template` names.
pub fn template_location(project: &Project) -> Result<(String, String), PveError> {
    let t = &project.proxmox.template;
    match t.split_once(':') {
        Some((storage, rest)) if !storage.is_empty() => {
            let name = rest.strip_prefix("vztmpl/").unwrap_or(rest);
            Ok((storage.to_string(), name.to_string()))
        }
        _ => Err(PveError::Config(format!(
            "proxmox.template `{t}` does not name a storage: write it as `STORAGE:vztmpl/FILE`, like `local:vztmpl/nixos-26.05-x86_64-linux.tar.xz`"
        ))),
    }
}

/// The templates on the storage.
pub fn list(client: &Client, node: &str, storage: &str) -> Result<Vec<Volume>, PveError> {
    client.storage_content(node, storage, "vztmpl")
}

/// What `upload` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// Sent, as this volume id.
    Sent(String),
    /// A file of that name and size is there already: nothing sent.
    AlreadyThere(String),
}

/// Uploads `file` as a container template, unless a file of the same name and size is there.
pub fn upload(
    client: &Client,
    node: &str,
    storage: &str,
    file: &Path,
    force: bool,
) -> Result<Uploaded, PveError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PveError::Config(format!("`{}` is not a file name", file.display())))?
        .to_string();
    if !(name.ends_with(".tar.xz")
        || name.ends_with(".tar.gz")
        || name.ends_with(".tar.zst")
        || name.ends_with(".tgz"))
    {
        return Err(PveError::Config(format!(
            "`{name}`: PVE takes container templates as .tar.xz, .tar.gz, .tar.zst or .tgz"
        )));
    }
    let size = std::fs::metadata(file)
        .map_err(|e| PveError::Config(format!("cannot read `{}`: {e}", file.display())))?
        .len();
    let volid = format!("{storage}:vztmpl/{name}");
    if !force {
        let there = list(client, node, storage)?;
        if there.iter().any(|v| v.volid == volid && v.size == size) {
            return Ok(Uploaded::AlreadyThere(volid));
        }
    }
    client.upload(node, storage, "vztmpl", file, &name)?;
    Ok(Uploaded::Sent(volid))
}
