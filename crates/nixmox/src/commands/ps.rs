//! `nixmox ps`: one row per service: its host, node, vmid and address, the container's state (live
//! from the Proxmox API with `infra.backend: proxmox-api`, else last known), live health (every service's liveness and readiness checks at once, each bounded by
//! `--timeout`), and its last deploy from the state store.

use std::collections::BTreeMap;
use std::time::Duration;

use nixmox_core::decode::parse_duration_ms;
use nixmox_core::model::InfraBackend;
use nixmox_core::plan::Phase;
use nixmox_core::step_id::StepId;
use nixmox_core::Project;
use serde_json::json;

use super::config::select;
use super::load_project;
use crate::cli::PlanFormat;
use crate::error::{Error, Result};
use crate::health::status::{self, Health, ServiceHealth};
use crate::health::Context;
use crate::output;
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::state::{RowStatus, RunId, Store};
use crate::step_status::StepStatus;

/// How many past runs are searched for each service's last deploy.
const RUNS_SEARCHED: usize = 500;

/// A service's last deploy step (`nix:core:S`, `nix:core-auth:S` or `nix:service-config:S`)
/// that ran (succeeded or failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastDeploy {
    pub run: RunId,
    pub step: StepId,
    pub started_at: String,
    /// `succeeded`, `failed` or `rolled back`.
    pub result: String,
    pub error: Option<String>,
    /// What a failed health gate rolled the service back to (`snapshot nixmox-r3-svc-app`,
    /// `previous generation`).
    pub rolled_back_to: Option<String>,
}

/// What a step's error says it was rolled back to (docs/engine.md, "Rollback").
fn rolled_back_to(error: Option<&str>) -> Option<String> {
    let rb = error?.split("; rolled back: ").nth(1)?;
    if let Some(rest) = rb.split("rolled back to snapshot ").nth(1) {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        return Some(format!("snapshot {name}"));
    }
    rb.contains("switched back to its previous generation")
        .then(|| "previous generation".to_string())
}

pub fn run(
    root: &ProjectRoot,
    services: &[String],
    format: PlanFormat,
    timeout: &str,
) -> Result<()> {
    let timeout = parse_duration_ms(timeout)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid --timeout `{timeout}`: use a duration like 5s or 500ms"
            ))
        })?;
    let loaded = load_project(root)?;
    let project = &loaded.project;
    select(project, services)?;
    let paths = Paths::new(root, project);
    let ctx = Context::for_project(project, &paths.root, &paths.ssh, &paths.known_hosts)
        .map_err(Error::Usage)?;
    // `ps` never creates the state database: none means nothing deployed yet.
    let deploys = if paths.state_db.exists() {
        last_deploys(&Store::open(&paths.state_db)?)?
    } else {
        BTreeMap::new()
    };
    let live = live_states(project, root);
    if let Some(Err(e)) = &live {
        output::note(&format!(
            "the Proxmox API could not be reached ({e}): showing the last known state"
        ));
    }
    let live = live.and_then(|r| r.ok());
    let health = status::live(&ctx, project, services, timeout);
    let text = match format {
        PlanFormat::Json => json_text(project, &health, &deploys, live.as_ref()),
        PlanFormat::Text => table(project, &health, &deploys, live.as_ref()),
    };
    output::data(&text)
}

/// Each service's last deploy that ran, newest runs first.
pub fn last_deploys(store: &Store) -> Result<BTreeMap<String, LastDeploy>> {
    let mut out: BTreeMap<String, LastDeploy> = BTreeMap::new();
    for r in store.runs(RUNS_SEARCHED)? {
        for row in store.step_results(r.id)? {
            let (phase, Some(service)) = (row.step_id.phase(), row.step_id.service()) else {
                continue;
            };
            // A step that ran to an end; a skipped one reads back as `Unchanged`.
            let ran = matches!(row.status, RowStatus::Ended(s) if s.ran());
            if !matches!(
                phase,
                Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig
            ) || !ran
            {
                continue;
            }
            let newer = out
                .get(service)
                .is_none_or(|d| d.run < r.id || (d.run == r.id && d.started_at < row.started_at));
            if newer {
                out.insert(
                    service.to_string(),
                    LastDeploy {
                        run: r.id,
                        step: row.step_id.clone(),
                        started_at: row.started_at.clone(),
                        result: match (row.status, rolled_back_to(row.error.as_deref())) {
                            (RowStatus::Ended(StepStatus::Failed), Some(_)) => "rolled back".into(),
                            (RowStatus::Ended(StepStatus::Failed), None) => "failed".into(),
                            _ => "succeeded".into(),
                        },
                        error: row.error.clone(),
                        rolled_back_to: rolled_back_to(row.error.as_deref()),
                    },
                );
            }
        }
    }
    Ok(out)
}

/// Per vmid, the status of the project's containers from the Proxmox API (`running`,
/// `stopped`; a host without one is `absent`), when `infra.backend` is `proxmox-api` and a
/// token is available. Bounded by short timeouts and a single try.
fn live_states(project: &Project, root: &ProjectRoot) -> Option<std::result::Result<Live, String>> {
    use crate::proxmox::{self, lifecycle};
    if project.infra != InfraBackend::ProxmoxApi || proxmox::token(project, root).is_none() {
        return None;
    }
    let read = || -> std::result::Result<Live, String> {
        let (client, scrub) = super::quick_client(project, root)?;
        let guests = client.guests().map_err(|e| scrub(e.to_string()))?;
        // A node that does not answer makes its containers unreachable, not absent.
        let offline: BTreeMap<String, bool> = client
            .nodes()
            .map(|ns| ns.into_iter().map(|n| (n.name, !n.online)).collect())
            .unwrap_or_default();
        Ok(guests
            .into_iter()
            .filter(|g| g.kind == "lxc" && lifecycle::is_projects(&g.tags, project))
            .map(|g| {
                let down = offline.get(&g.node).copied().unwrap_or(false) || g.status == "unknown";
                let status = if down {
                    format!("unreachable (node {} offline)", g.node)
                } else {
                    g.status
                };
                (g.vmid, (status, g.node))
            })
            .collect())
    };
    Some(read())
}

/// Per vmid, the container's live status and the node it is on.
type Live = BTreeMap<u32, (String, String)>;

/// The node a service's container is on: where the project places it, and where the API says
/// it is when that differs (a move not yet made).
fn node_of(live: Option<&Live>, s: &nixmox_core::model::Service) -> String {
    match live.and_then(|l| l.get(&s.host.vmid.get())) {
        Some((_, on)) if on != &s.host.node => format!("{on} (placed on {})", s.host.node),
        _ => s.host.node.clone(),
    }
}

/// The container's state: live from the API when there is one, else what its last deploy
/// says about it.
fn state_of(live: Option<&Live>, vmid: u32, d: Option<&LastDeploy>) -> String {
    match live {
        Some(l) => l
            .get(&vmid)
            .map(|(status, _)| status.clone())
            .unwrap_or_else(|| "absent".into()),
        None => state(d).to_string(),
    }
}

/// The container's last known state: what its last deploy says about it.
fn state(d: Option<&LastDeploy>) -> &'static str {
    match d.map(|d| d.result.as_str()) {
        Some("succeeded") => "running",
        Some("rolled back") => "rolled back",
        Some(_) => "deploy failed",
        None => "not deployed",
    }
}

fn health_text(h: &ServiceHealth) -> String {
    let ok = h.checks.iter().filter(|c| c.ok).count();
    match h.health {
        Health::NoChecks => "no checks".into(),
        other => format!("{} ({ok}/{})", other.as_str(), h.checks.len()),
    }
}

fn table(
    project: &Project,
    health: &[ServiceHealth],
    deploys: &BTreeMap<String, LastDeploy>,
    live: Option<&Live>,
) -> String {
    let headers = [
        "SERVICE",
        "HOST",
        "NODE",
        "VMID",
        "IP",
        if live.is_some() {
            "STATE (LIVE)"
        } else {
            "STATE (LAST KNOWN)"
        },
        "HEALTH",
        "LAST DEPLOY",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for h in health {
        let Some(s) = project.service(&h.service) else {
            continue;
        };
        let d = deploys.get(&h.service);
        rows.push([
            h.service.clone(),
            s.host.hostname.to_string(),
            node_of(live, s),
            s.host.vmid.to_string(),
            s.host.ip.to_string(),
            state_of(live, s.host.vmid.get(), d),
            health_text(h),
            d.map(|d| match &d.rolled_back_to {
                Some(to) => format!("{} {} to {to} (run {})", d.started_at, d.result, d.run),
                None => format!("{} {} (run {})", d.started_at, d.result, d.run),
            })
            .unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    let failures: Vec<String> = health
        .iter()
        .flat_map(|h| {
            h.checks
                .iter()
                .filter(|c| !c.ok)
                .map(move |c| format!("  {}: {}\n", h.service, c.detail))
        })
        .collect();
    if !failures.is_empty() {
        out.push_str("\nFailing checks:\n");
        out.extend(failures);
    }
    out
}

fn json_text(
    project: &Project,
    health: &[ServiceHealth],
    deploys: &BTreeMap<String, LastDeploy>,
    live: Option<&Live>,
) -> String {
    let services: Vec<serde_json::Value> = health
        .iter()
        .filter_map(|h| {
            let s = project.service(&h.service)?;
            let d = deploys.get(&h.service);
            Some(json!({
                "name": h.service,
                "host": s.host.hostname.as_str(),
                "node": s.host.node,
                "live_node": live.and_then(|l| l.get(&s.host.vmid.get())).map(|(_, n)| n),
                "vmid": s.host.vmid.get(),
                "ip": s.host.ip.to_string(),
                "state": state_of(live, s.host.vmid.get(), d),
                "state_source": if live.is_some() { "live" } else { "last known" },
                "health": h.health.as_str(),
                "checks": h.checks.iter().map(|c| json!({
                    "check": c.check,
                    "target": c.target,
                    "ok": c.ok,
                    "detail": c.detail,
                    "duration_ms": u64::try_from(c.duration.as_millis()).unwrap_or(u64::MAX),
                })).collect::<Vec<_>>(),
                "last_deploy": d.map(|d| json!({
                    "run": d.run,
                    "step": d.step,
                    "started_at": d.started_at,
                    "result": d.result,
                    "error": d.error,
                    "rolled_back_to": d.rolled_back_to,
                })),
            }))
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&json!({"version": 1, "services": services}))
        .unwrap_or_default();
    text.push('\n');
    text
}
