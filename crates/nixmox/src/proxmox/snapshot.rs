//! Container snapshots through the PVE API: take one (waiting for the container's lock, held
//! by a backup or another task, within a deadline), list, roll back and delete. Names and
//! retention are decided in `nixmox_core::snapshot`; this module only talks to PVE.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::api::{encode_segment, Method};
use super::client::Client;
use super::error::PveError;

/// A snapshot as PVE lists it (`current` excluded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PveSnapshot {
    pub name: String,
    pub snaptime: u64,
    pub description: String,
}

/// Why a snapshot operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// The container stayed locked (a backup, a migration, another snapshot) until the deadline.
    #[error("CT {vmid} stayed locked ({lock}) for {waited}s, until the step's timeout; try again when the {lock} task has finished")]
    Locked {
        vmid: u32,
        lock: String,
        waited: u64,
    },
    /// PVE cannot snapshot this container (its storage has no snapshots): PVE's reason.
    #[error("PVE cannot snapshot CT {vmid}: {reason}")]
    Unsupported { vmid: u32, reason: String },
    #[error("CT {vmid}: {source}")]
    Pve {
        vmid: u32,
        #[source]
        source: PveError,
    },
}

impl SnapError {
    /// The storage cannot snapshot (as opposed to a transient or lock problem).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, SnapError::Unsupported { .. })
    }
}

fn base(node: &str, vmid: u32) -> String {
    format!("/nodes/{}/lxc/{vmid}/snapshot", encode_segment(node))
}

/// The container's snapshots, oldest first.
pub fn list(client: &Client, node: &str, vmid: u32) -> Result<Vec<PveSnapshot>, SnapError> {
    let data = client
        .get(&base(node, vmid), &[])
        .map_err(|source| SnapError::Pve { vmid, source })?;
    let mut out: Vec<PveSnapshot> = data
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    let name = i.get("name")?.as_str()?.to_string();
                    (name != "current").then(|| PveSnapshot {
                        name,
                        snaptime: i
                            .get("snaptime")
                            .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
                            .unwrap_or(0),
                        description: i
                            .get("description")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| (a.snaptime, &a.name).cmp(&(b.snaptime, &b.name)));
    Ok(out)
}

/// Waits until the container's config carries no `lock` (a backup, a migration, …), polling
/// until `deadline`. Returns the lock it waited for, if any.
fn wait_unlocked(
    client: &Client,
    node: &str,
    vmid: u32,
    deadline: Instant,
) -> Result<Option<String>, SnapError> {
    let started = Instant::now();
    let mut pause = client.options().poll;
    let mut noted: Option<String> = None;
    loop {
        let cfg = client
            .ct_config(node, vmid)
            .map_err(|source| SnapError::Pve { vmid, source })?;
        let lock = cfg
            .as_ref()
            .and_then(|c| c.get("lock"))
            .and_then(Value::as_str)
            .filter(|l| !l.is_empty())
            .map(str::to_string);
        let Some(lock) = lock else { return Ok(noted) };
        if noted.is_none() {
            client.log(format!("CT {vmid} is locked ({lock}): waiting"));
            noted = Some(lock.clone());
        }
        if Instant::now() >= deadline {
            return Err(SnapError::Locked {
                vmid,
                lock,
                waited: started.elapsed().as_secs(),
            });
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 3 / 2).min(client.options().poll_max);
    }
}

/// True when the error says the container is locked by another task.
fn is_locked(e: &PveError) -> Option<String> {
    let m = e.pve_message()?;
    if let Some(rest) = m.split("CT is locked (").nth(1) {
        return Some(rest.split(')').next().unwrap_or("lock").to_string());
    }
    e.is_lock_timeout().then(|| "config".to_string())
}

/// What a snapshot write waited for before it went through: the lock (`backup`) and how long.
pub type Waited = Option<(String, Duration)>;

/// Runs one snapshot write, waiting for the container's lock first and again whenever PVE
/// says it is locked, until `deadline`.
fn locked_write(
    client: &Client,
    node: &str,
    vmid: u32,
    deadline: Instant,
    what: &str,
    f: impl Fn() -> Result<Value, PveError>,
) -> Result<Waited, SnapError> {
    let started = Instant::now();
    let mut waited: Option<String> = None;
    loop {
        let lock = wait_unlocked(client, node, vmid, deadline).map_err(|e| match e {
            SnapError::Locked { vmid, lock, .. } => SnapError::Locked {
                vmid,
                lock,
                waited: started.elapsed().as_secs(),
            },
            e => e,
        })?;
        if lock.is_some() {
            waited = lock;
        }
        match f() {
            Ok(_) => return Ok(waited.map(|l| (l, started.elapsed()))),
            Err(e) => {
                if let Some(lock) = is_locked(&e) {
                    waited = Some(lock.clone());
                    if Instant::now() >= deadline {
                        return Err(SnapError::Locked {
                            vmid,
                            lock,
                            waited: started.elapsed().as_secs(),
                        });
                    }
                    client.log(format!(
                        "{what} CT {vmid}: locked ({lock}); waiting to try again"
                    ));
                    std::thread::sleep(client.options().poll.max(Duration::from_millis(50)));
                    continue;
                }
                let msg = e.pve_message().unwrap_or_default();
                if msg.contains("snapshot feature is not available") {
                    return Err(SnapError::Unsupported {
                        vmid,
                        reason: msg.to_string(),
                    });
                }
                return Err(SnapError::Pve { vmid, source: e });
            }
        }
    }
}

/// Takes a snapshot and waits for its task.
pub fn take(
    client: &Client,
    node: &str,
    vmid: u32,
    name: &str,
    description: &str,
    deadline: Instant,
) -> Result<Waited, SnapError> {
    let path = base(node, vmid);
    let params = [
        ("snapname".to_string(), name.to_string()),
        ("description".to_string(), description.to_string()),
    ];
    locked_write(client, node, vmid, deadline, "snapshot", || {
        client.write(Method::Post, &path, &params)
    })
}

/// Rolls the container back to a snapshot and, with `start`, starts it again; waits for the
/// task. PVE stops a running container first.
pub fn rollback(
    client: &Client,
    node: &str,
    vmid: u32,
    name: &str,
    start: bool,
    deadline: Instant,
) -> Result<Waited, SnapError> {
    let path = format!("{}/{}/rollback", base(node, vmid), encode_segment(name));
    let params: Vec<(String, String)> = if start {
        vec![("start".to_string(), "1".to_string())]
    } else {
        Vec::new()
    };
    locked_write(client, node, vmid, deadline, "rollback", || {
        client.write(Method::Post, &path, &params)
    })
}

/// Deletes a snapshot and waits for its task.
pub fn delete(
    client: &Client,
    node: &str,
    vmid: u32,
    name: &str,
    deadline: Instant,
) -> Result<Waited, SnapError> {
    let path = format!("{}/{}", base(node, vmid), encode_segment(name));
    locked_write(client, node, vmid, deadline, "delete snapshot", || {
        client.write(Method::Delete, &path, &[])
    })
}
