//! Backups through the PVE API: a vzdump of one container to a storage, awaited, and the
//! archive it wrote. Used by `nixmox backup` and before `down` destroys a container with
//! `host.backup`.

use std::collections::BTreeSet;

use super::api::{encode_segment, Method};
use super::client::Client;
use super::error::PveError;

/// Backs CT `vmid` up to `storage` (vzdump, `mode` snapshot|suspend|stop, zstd) and waits for
/// the task. Returns the archive's volume id: the `vzdump-lxc-<vmid>-…` volume the storage
/// lists after the backup and did not before (the newest, should there be several); `None`
/// when the task ended well and no new archive is listed (the caller says so).
pub fn vzdump(
    client: &Client,
    node: &str,
    vmid: u32,
    storage: &str,
    mode: &str,
) -> Result<Option<String>, PveError> {
    let before: BTreeSet<String> = archives(client, node, vmid, storage)?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let path = format!("/nodes/{}/vzdump", encode_segment(node));
    let params = [
        ("vmid".to_string(), vmid.to_string()),
        ("storage".to_string(), storage.to_string()),
        ("mode".to_string(), mode.to_string()),
        ("compress".to_string(), "zstd".to_string()),
        (
            "notes-template".to_string(),
            "NixMox backup of {{guestname}}".to_string(),
        ),
    ];
    client.write(Method::Post, &path, &params)?;
    Ok(archives(client, node, vmid, storage)?
        .into_iter()
        .filter(|(_, v)| !before.contains(v))
        .max()
        .map(|(_, v)| v))
}

/// The container's vzdump archives on a storage: (ctime, volume id).
fn archives(
    client: &Client,
    node: &str,
    vmid: u32,
    storage: &str,
) -> Result<Vec<(u64, String)>, PveError> {
    let content = format!(
        "/nodes/{}/storage/{}/content",
        encode_segment(node),
        encode_segment(storage)
    );
    let data = client.get(
        &content,
        &[
            ("content".to_string(), "backup".to_string()),
            ("vmid".to_string(), vmid.to_string()),
        ],
    )?;
    let marker = format!("vzdump-lxc-{vmid}-");
    Ok(data
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let volid = v.get("volid")?.as_str()?;
            let ctime = v
                .get("ctime")
                .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
                .unwrap_or(0);
            volid.contains(&marker).then(|| (ctime, volid.to_string()))
        })
        .collect())
}
