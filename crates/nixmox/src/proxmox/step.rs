//! `tf:infra` for `infra.backend: proxmox-api`: converge the project's containers through
//! the API, write what was done to the step's log, and tell the engine whether anything
//! changed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nixmox_core::plan::Phase;
use nixmox_core::step_id::StepId;
use nixmox_core::Project;

use super::client::{Client, ClientOptions};
use super::{connect, lifecycle, Settings};
use crate::engine::scheduler::Outcome;
use crate::exec::scrub;

/// The step this module runs (`tf:infra`).
pub fn step_id() -> StepId {
    StepId::project_wide(Phase::TfInfra).expect("tf:infra is project-wide")
}

/// How `tf:infra` runs the lifecycle.
#[derive(Clone, Debug)]
pub struct StepSettings {
    /// Containers created or changed at once.
    pub parallel: usize,
    /// The step's own timeout; no single task is waited for longer.
    pub timeout: Duration,
    /// The project's containers no longer in it that may be destroyed (vmids listed and
    /// confirmed by `up --remove-orphans`); the others are reported as a warning.
    pub remove_orphans: Vec<u32>,
}

/// Runs the step: settings from the project and the environment, then `converge`.
pub fn run_infra(
    project: &Project,
    root: &Path,
    log: &Path,
    step: &StepSettings,
    redact: &[String],
) -> Outcome {
    let settings = match Settings::from_project(project, root) {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Failed {
                error: format!("{}: {e}", step_id()),
                transient: false,
            }
        }
    };
    let mut secrets = redact.to_vec();
    secrets.extend(settings.secrets());
    let opts = ClientOptions {
        task_timeout: step.timeout,
        ..ClientOptions::default()
    };
    let client = match connect(&settings, opts) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Failed {
                error: format!("{}: {}", step_id(), scrub(&e.to_string(), &secrets)),
                transient: false,
            }
        }
    };
    let warning = settings.tls.warning();
    run_with(
        &client,
        project,
        log,
        step.parallel,
        &step.remove_orphans,
        warning.as_deref(),
        &secrets,
    )
}

/// The step with a client already made (tests give their own).
pub fn run_with(
    client: &Client,
    project: &Project,
    log: &Path,
    parallel: usize,
    remove_orphans: &[u32],
    warning: Option<&str>,
    secrets: &[String],
) -> Outcome {
    let mut lines = vec![format!(
        "{}: infra.backend proxmox-api at {}, {} container(s), up to {} at once",
        step_id(),
        client.endpoint(),
        project.services.len(),
        parallel.max(1)
    )];
    if let Some(w) = warning {
        lines.push(format!("warning: {w}"));
    }
    let mut result = lifecycle::converge(client, project, parallel);
    remove_confirmed_orphans(client, project, parallel, remove_orphans, &mut result);
    // Backup jobs (`host.backup.schedule`), once the containers are there.
    let mut jobs: Vec<String> = Vec::new();
    if let Ok(r) = &result {
        match super::backup::sync_jobs(client, project) {
            Ok(done) => jobs = done,
            Err(e) => {
                lines.push(format!("result: {}", r.summary()));
                lines.push(format!("failed: backup jobs: {e}"));
                let outcome = Outcome::Failed {
                    error: format!("{}: backup jobs (/cluster/backup): {e}", step_id()),
                    transient: e.is_transient(),
                };
                lines.push(String::new());
                lines.extend(client.journal());
                return write_log(log, &lines, outcome, secrets);
            }
        }
    }
    lines.push(String::new());
    lines.extend(client.journal());
    lines.push(String::new());
    let report = match &result {
        Ok(r) => r,
        Err(e) => &e.report,
    };
    for n in &report.notes {
        lines.push(format!("note: {n}"));
    }
    let outcome = match &result {
        Ok(r) => converged(&mut lines, r, &jobs, warning),
        Err(e) => {
            lines.push(format!("failed: {e}"));
            Outcome::Failed {
                error: format!("{}: {e}", step_id()),
                transient: e.transient,
            }
        }
    };
    write_log(log, &lines, outcome, secrets)
}

/// Orphans go only when asked (Compose's `--remove-orphans`), and only after the project's
/// own containers converged: the confirmed ones are destroyed and `result` says so.
fn remove_confirmed_orphans(
    client: &Client,
    project: &Project,
    parallel: usize,
    remove_orphans: &[u32],
    result: &mut Result<lifecycle::Report, lifecycle::LifecycleError>,
) {
    let Ok(r) = result else { return };
    let confirmed: BTreeSet<u32> = r
        .orphans
        .iter()
        .map(|g| g.vmid)
        .filter(|v| remove_orphans.contains(v))
        .collect();
    if confirmed.is_empty() {
        return;
    }
    match lifecycle::destroy_listed(client, project, parallel, &confirmed) {
        Ok(removed) => {
            r.destroyed = removed.destroyed;
            r.orphans.retain(|g| !confirmed.contains(&g.vmid));
            r.writes += removed.writes;
        }
        Err(mut e) => {
            let mut report = r.clone();
            report.destroyed = e.report.destroyed.clone();
            report.writes += e.report.writes;
            e.report = Box::new(report);
            *result = Err(e);
        }
    }
}

/// The log's last lines and the outcome of a run that converged: orphans left alone, the
/// result, the backup jobs synced, and the detail the summary shows.
fn converged(
    lines: &mut Vec<String>,
    r: &lifecycle::Report,
    jobs: &[String],
    warning: Option<&str>,
) -> Outcome {
    if !r.orphans.is_empty() {
        let list: Vec<String> = r
            .orphans
            .iter()
            .map(|g| format!("CT {} (`{}`)", g.vmid, g.name))
            .collect();
        lines.push(format!(
            "warning: no longer in the project, left alone: {} (destroy with `nixmox up --remove-orphans`)",
            list.join(", ")
        ));
    }
    lines.push(format!("result: {}", r.summary()));
    let mut detail = r.summary();
    if !jobs.is_empty() {
        lines.push(format!("backup jobs: {}", jobs.join("; ")));
        detail.push_str(&format!("; {}", jobs.join("; ")));
    }
    if !r.notes.is_empty() {
        detail.push_str(&format!("; {}", r.notes.join("; ")));
    }
    if let Some(w) = warning {
        detail.push_str(&format!("; warning: {w}"));
    }
    Outcome::Done {
        changed: r.writes > 0 || !jobs.is_empty(),
        detail,
    }
}

/// Writes the step's log (scrubbed; a log that cannot be written loses only the log) and
/// returns `outcome` with its text scrubbed too.
fn write_log(log: &Path, lines: &[String], outcome: Outcome, secrets: &[String]) -> Outcome {
    let text = scrub(&(lines.join("\n") + "\n"), secrets);
    if let Ok(mut f) = std::fs::File::create(log) {
        let _ = f.write_all(text.as_bytes());
    }
    match outcome {
        Outcome::Done { changed, detail } => Outcome::Done {
            changed,
            detail: scrub(&detail, secrets),
        },
        Outcome::Failed { error, transient } => Outcome::Failed {
            error: scrub(&error, secrets),
            transient,
        },
    }
}
