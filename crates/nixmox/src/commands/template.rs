//! `nixmox template upload FILE` and `nixmox template list`: NixOS LXC templates on the
//! storage that `proxmox.template` names (`local:vztmpl/…` → `local`), on `proxmox.node`.

use std::path::Path;

use crate::cli::{PlanFormat, TemplateAction};
use crate::error::Result;
use crate::output;
use crate::proxmox::{self, template, Client, ClientOptions, Settings};
use crate::root::ProjectRoot;

/// `nixmox template upload|list`.
pub fn run(root: &ProjectRoot, action: TemplateAction) -> Result<()> {
    match action {
        TemplateAction::Upload {
            file,
            storage,
            force,
        } => upload(root, &file, storage.as_deref(), force),
        TemplateAction::List { storage, format } => list(root, storage.as_deref(), format),
    }
}

fn client(root: &ProjectRoot) -> Result<(nixmox_core::Project, Client)> {
    let loaded = super::load_project(root)?;
    let project = loaded.project;
    let settings = Settings::from_project(&project, root)?;
    if let Some(w) = settings.tls.warning() {
        output::note(&format!("warning: {w}"));
    }
    let client = proxmox::connect(&settings, ClientOptions::default())?;
    Ok((project, client))
}

/// Human-readable size.
fn size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MIB {
        format!("{:.1} GiB", bytes as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

pub fn upload(root: &ProjectRoot, file: &Path, storage: Option<&str>, force: bool) -> Result<()> {
    let (project, client) = client(root)?;
    let (default_storage, _) = template::template_location(&project)?;
    let storage = storage.map(str::to_string).unwrap_or(default_storage);
    let node = &project.proxmox.node;
    output::note(&format!(
        "uploading `{}` to storage `{storage}` on node {node}…",
        file.display()
    ));
    match template::upload(&client, node, &storage, file, force)? {
        template::Uploaded::Sent(volid) => {
            output::note(&format!("uploaded as {volid}"));
            if volid != project.proxmox.template {
                output::note(&format!(
                    "to use it, set proxmox.template: {volid} in nixmox.yaml"
                ));
            }
            output::data(&format!("{volid}\n"))
        }
        template::Uploaded::AlreadyThere(volid) => {
            output::note(&format!(
                "{volid} is there already with the same size: nothing sent (--force sends it again)"
            ));
            output::data(&format!("{volid}\n"))
        }
    }
}

pub fn list(root: &ProjectRoot, storage: Option<&str>, format: PlanFormat) -> Result<()> {
    let (project, client) = client(root)?;
    let (default_storage, _) = template::template_location(&project)?;
    let storage = storage.map(str::to_string).unwrap_or(default_storage);
    let node = &project.proxmox.node;
    let volumes = template::list(&client, node, &storage)?;
    let configured = &project.proxmox.template;
    if format == PlanFormat::Json {
        let items: Vec<serde_json::Value> = volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "volid": v.volid,
                    "size": v.size,
                    "ctime": v.ctime,
                    "format": v.format,
                    "configured": &v.volid == configured,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "version": 1,
            "node": node,
            "storage": storage,
            "templates": items,
        });
        return output::data(&format!("{doc:#}\n"));
    }
    let width = volumes
        .iter()
        .map(|v| v.volid.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!("  {:<width$}  {:>10}\n", "VOLID", "SIZE");
    for v in &volumes {
        let mark = if &v.volid == configured { "*" } else { " " };
        out.push_str(&format!(
            "{mark} {:<width$}  {:>10}\n",
            v.volid,
            size(v.size)
        ));
    }
    output::data(&out)?;
    if volumes.iter().any(|v| &v.volid == configured) {
        output::note("* is proxmox.template");
    } else {
        output::note(&format!(
            "proxmox.template `{configured}` is not on storage `{storage}` of node {node}: upload it with `nixmox template upload FILE`"
        ));
    }
    Ok(())
}
