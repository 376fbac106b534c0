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

/// A PVE backup job NixMox keeps for one container (`host.backup.schedule`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    /// The fields NixMox sets, as PVE stores them.
    pub fields: Vec<(String, String)>,
}

/// What keeping the jobs in step with the manifests does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobChange {
    Create(Job),
    /// The job and the keys that differ.
    Update(Job, Vec<String>),
    Remove(String),
}

/// The id of a service's job: `nixmox_<project>_<service>` (PVE's `pve-configid`: letters,
/// digits and `_`).
pub fn job_id(project: &str, service: &str) -> String {
    format!("nixmox_{project}_{service}").replace('-', "_")
}

const COMMENT: &str = "managed by NixMox";

/// The jobs the project wants.
pub fn desired_jobs(project: &nixmox_core::Project) -> Vec<Job> {
    project
        .services
        .iter()
        .filter_map(|s| {
            let b = s.host.backup.as_ref()?;
            let schedule = b.schedule.as_ref()?;
            Some(Job {
                id: job_id(project.name.as_str(), s.name.as_str()),
                fields: vec![
                    ("schedule".into(), schedule.clone()),
                    ("storage".into(), b.storage.clone()),
                    ("vmid".into(), s.host.vmid.get().to_string()),
                    ("mode".into(), b.mode.clone()),
                    (
                        "prune-backups".into(),
                        match b.keep {
                            Some(n) => format!("keep-last={n}"),
                            None => "keep-all=1".into(),
                        },
                    ),
                    ("enabled".into(), "1".into()),
                    (
                        "comment".into(),
                        format!("{COMMENT}: project {}, service {}", project.name, s.name),
                    ),
                ],
            })
        })
        .collect()
}

/// Compares the jobs PVE has (`GET /cluster/backup`) with the desired ones. Only jobs that are
/// NixMox's — the project's id prefix and NixMox's comment — are updated or removed; any other
/// job is left alone.
pub fn plan_jobs(project: &str, existing: &[serde_json::Value], desired: &[Job]) -> Vec<JobChange> {
    // The id alone is ambiguous (`-` becomes `_`); the comment names the project exactly.
    let prefix = job_id(project, "");
    let comment = format!("{COMMENT}: project {project}, ");
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Bool(b) => u8::from(*b).to_string(),
        other => other.to_string(),
    };
    let ours: Vec<&serde_json::Value> = existing
        .iter()
        .filter(|j| {
            j.get("id")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| id.starts_with(&prefix))
                && j.get("comment")
                    .and_then(serde_json::Value::as_str)
                    .is_some_and(|c| c.starts_with(&comment))
        })
        .collect();
    let mut out = Vec::new();
    for d in desired {
        match ours
            .iter()
            .find(|j| j.get("id").and_then(serde_json::Value::as_str) == Some(&d.id))
        {
            None => out.push(JobChange::Create(d.clone())),
            Some(j) => {
                let differ: Vec<String> = d
                    .fields
                    .iter()
                    .filter(|(k, v)| j.get(k).map(text).as_deref() != Some(v.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                if !differ.is_empty() {
                    out.push(JobChange::Update(d.clone(), differ));
                }
            }
        }
    }
    for j in ours {
        let id = j
            .get("id")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if !desired.iter().any(|d| d.id == id) {
            out.push(JobChange::Remove(id.to_string()));
        }
    }
    out
}

/// Keeps the project's backup jobs in step with the manifests; returns what changed, in words.
pub fn sync_jobs(client: &Client, project: &nixmox_core::Project) -> Result<Vec<String>, PveError> {
    let desired = desired_jobs(project);
    let existing = client.get("/cluster/backup", &[])?;
    let existing = existing.as_array().cloned().unwrap_or_default();
    let mut done = Vec::new();
    for change in plan_jobs(project.name.as_str(), &existing, &desired) {
        match change {
            JobChange::Create(j) => {
                let mut params = vec![("id".to_string(), j.id.clone())];
                params.extend(j.fields.iter().cloned());
                client.write(Method::Post, "/cluster/backup", &params)?;
                done.push(format!("backup job {} created", j.id));
            }
            JobChange::Update(j, keys) => {
                let params: Vec<(String, String)> = j
                    .fields
                    .iter()
                    .filter(|(k, _)| keys.contains(k))
                    .cloned()
                    .collect();
                client.write(
                    Method::Put,
                    &format!("/cluster/backup/{}", encode_segment(&j.id)),
                    &params,
                )?;
                done.push(format!("backup job {} updated ({})", j.id, keys.join(", ")));
            }
            JobChange::Remove(id) => {
                client.write(
                    Method::Delete,
                    &format!("/cluster/backup/{}", encode_segment(&id)),
                    &[],
                )?;
                done.push(format!("backup job {id} removed"));
            }
        }
    }
    Ok(done)
}

/// Where the logical dumps beside a backup live on the database host: `DUMP_ROOT/<service>/
/// <volume id with every character outside `[A-Za-z0-9._-]` as `_`>`.
pub const DUMP_ROOT: &str = "/var/lib/nixmox/dumps";

/// The directory of the dumps taken with backup `volid` of `service`.
pub fn dump_dir(service: &str, volid: &str) -> String {
    let clean = |s: &str| -> String {
        let out: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        // Never `.`, `..` or hidden: the name stays one plain component.
        if out.starts_with('.') {
            format!("_{out}")
        } else {
            out
        }
    };
    format!("{DUMP_ROOT}/{}/{}", clean(service), clean(volid))
}

/// A database name NixMox dumps: a plain PostgreSQL identifier (`[A-Za-z_][A-Za-z0-9_]*`, at
/// most 63 bytes), so it is one word that can be neither an option nor a connection string.
pub fn dump_name_ok(database: &str) -> bool {
    let mut chars = database.chars();
    database.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_go_beside_the_backup_under_a_fixed_directory() {
        assert_eq!(
            dump_dir(
                "wiki",
                "local:backup/vzdump-lxc-912-2026_11_29-21_00_00.tar.zst"
            ),
            "/var/lib/nixmox/dumps/wiki/local_backup_vzdump-lxc-912-2026_11_29-21_00_00.tar.zst"
        );
        assert_eq!(
            dump_dir("..", "../x y"),
            "/var/lib/nixmox/dumps/_../_.._x_y"
        );
        assert!(dump_name_ok("wiki_db") && dump_name_ok("_x1"));
        for bad in [
            "",
            "-h",
            "a=b",
            "host=x dbname=y",
            "1db",
            "wi ki",
            &"a".repeat(64),
        ] {
            assert!(!dump_name_ok(bad), "{bad}");
        }
    }
    use serde_json::json;

    fn job(id: &str, schedule: &str) -> Job {
        Job {
            id: id.into(),
            fields: vec![
                ("schedule".into(), schedule.into()),
                ("vmid".into(), "912".into()),
                ("enabled".into(), "1".into()),
                (
                    "comment".into(),
                    format!("{COMMENT}: project p, service solo"),
                ),
            ],
        }
    }

    #[test]
    fn jobs_are_created_updated_and_removed_and_foreign_ones_left_alone() {
        let existing = vec![
            // Ours, unchanged.
            json!({"id": "nixmox_p_a", "schedule": "daily", "vmid": "912", "enabled": 1,
                   "comment": "managed by NixMox: project p, service solo"}),
            // Ours, another schedule.
            json!({"id": "nixmox_p_b", "schedule": "daily", "vmid": "912", "enabled": 1,
                   "comment": "managed by NixMox: project p, service solo"}),
            // Ours, no longer wanted.
            json!({"id": "nixmox_p_gone", "comment": "managed by NixMox: project p, service gone"}),
            // An operator's job, even with a look-alike id but without NixMox's comment.
            json!({"id": "nixmox_p_mine", "schedule": "weekly", "comment": "by hand"}),
            json!({"id": "backup-1234", "schedule": "sun 01:00"}),
            // Other projects', one of them with a look-alike id.
            json!({"id": "nixmox_q_a", "comment": "managed by NixMox: project q, service a"}),
            json!({"id": "nixmox_p_q_a", "comment": "managed by NixMox: project p-q, service a"}),
        ];
        let desired = vec![
            job("nixmox_p_a", "daily"),
            job("nixmox_p_b", "sun 02:30"),
            job("nixmox_p_c", "daily"),
        ];
        let changes = plan_jobs("p", &existing, &desired);
        assert_eq!(
            changes,
            vec![
                JobChange::Update(job("nixmox_p_b", "sun 02:30"), vec!["schedule".into()]),
                JobChange::Create(job("nixmox_p_c", "daily")),
                JobChange::Remove("nixmox_p_gone".into()),
            ]
        );
        assert_eq!(
            job_id("home-lab", "media-server"),
            "nixmox_home_lab_media_server"
        );
    }
}
