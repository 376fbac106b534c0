//! Runs one step for real: a Terraform workspace for `tf:*` steps (`terraform`), the
//! containers through the PVE API for `tf:infra` with `infra.backend: proxmox-api`
//! (`proxmox_infra`), the NixOS deployer for `nix:*` steps (`nixos`) behind a snapshot
//! (`snapshots`) and a health gate, rolled back when the gate fails (`rollback`), and the
//! service's checks for `verify:*` (`verify`). Each run returns a [`StepReport`]: how it ended
//! and everything it produced (outputs, the rendered inputs it used, a destroy-guard refusal,
//! what a rollback restored, the secrets file a deploy shipped, snapshots taken, warnings),
//! for the main thread to record.

mod nixos;
mod proxmox_infra;
mod rollback;
mod secrets;
mod snapshots;
mod terraform;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nixmox_core::model::InfraBackend;
use nixmox_core::plan::{Phase, Plan, Step};
use nixmox_core::record::StepRecord;
use nixmox_core::step_id::StepId;
use nixmox_core::Project;

use super::scheduler::{Outcome, Report, Runner};
use crate::exec::scrub;
use crate::root::Paths;
use crate::state::OutputValue;

/// What one run of a step did: how it ended, and what it leaves for the state store and the
/// run's output. The runner's only way of handing results back.
#[derive(Debug)]
pub struct StepReport {
    /// How it ended: changed or not, with a detail; or its error, and whether another attempt
    /// may succeed.
    pub outcome: Outcome,
    /// The step's outputs (Terraform's, a deploy's generation). Recorded on success.
    pub outputs: Vec<OutputValue>,
    /// The rendered files it used, for rollback and `down`; `None` keeps what was recorded.
    pub rendered: Option<BTreeMap<String, Vec<u8>>>,
    /// The destroy guard refused the step: what it would have deleted or replaced.
    pub refused: Option<Vec<String>>,
    /// Its health gate failed and it was rolled back: what that did.
    pub rollback: Option<RolledBack>,
    /// A deploy that ran with the secrets files: the secrets file it shipped.
    pub secrets: Option<ShippedSecrets>,
    /// Snapshots it took before changing its container(s), on every attempt.
    pub snapshots: Vec<Taken>,
    /// Warnings for the run's output, from every attempt.
    pub warnings: Vec<String>,
}

/// The secrets file a deploy shipped to its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShippedSecrets {
    /// Its SHA-256; `None` when the host has no secrets file.
    pub file_hash: Option<String>,
}

impl StepReport {
    /// The report a run starts from: empty, or carrying over from the attempt before a retry
    /// what that attempt did that stays done (snapshots, warnings, the secrets file written).
    /// Its outcome is replaced by the step's own before it is returned.
    pub(crate) fn start(earlier: Option<StepReport>) -> StepReport {
        let mut report = StepReport {
            outcome: Outcome::Done {
                changed: false,
                detail: String::new(),
            },
            outputs: Vec::new(),
            rendered: None,
            refused: None,
            rollback: None,
            secrets: None,
            snapshots: Vec::new(),
            warnings: Vec::new(),
        };
        if let Some(e) = earlier {
            report.secrets = e.secrets;
            report.snapshots = e.snapshots;
            report.warnings = e.warnings;
        }
        report
    }

    /// Whether the step changed something.
    pub fn changed(&self) -> bool {
        matches!(self.outcome, Outcome::Done { changed: true, .. })
    }
}

impl Report for StepReport {
    fn outcome(&self) -> &Outcome {
        &self.outcome
    }
}

/// Runs the plan's steps (the scheduler's [`Runner`]). Shared by the step threads: what
/// steps learn that later steps need (secret values to redact, the vault, which Terraform
/// steps applied) sits behind the three mutexes; everything else a step produced is in its
/// [`StepReport`].
pub struct StepExec<'a> {
    project: &'a Project,
    plan: &'a Plan,
    paths: &'a Paths,
    logs: PathBuf,
    timeout: Duration,
    /// Secret values to scrub from logs and messages; grows as steps learn secrets.
    redact: Mutex<Vec<String>>,
    /// How health checks reach the hosts, made on first use.
    health: OnceLock<Result<crate::health::Context, String>>,
    /// The secrets files (src/secrets), when the run manages them.
    vault: Option<Mutex<crate::secrets::Vault>>,
    /// When and to what a failed health gate is rolled back.
    rollback: Option<Rollback>,
    /// Steps whose Terraform apply succeeded in this run (a rollback re-applies a service's).
    tf_ran: Mutex<BTreeSet<usize>>,
    infra: InfraSettings,
    allow: DestroyAllowance,
    /// Snapshots before deploys (issue 14), when the project has them on.
    snapshots: Option<SnapshotHook>,
}

/// `tf:infra` with `proxmox-api`.
#[derive(Default)]
struct InfraSettings {
    /// Containers handled at once (`up --parallel`); the project's `deploy.parallel` if unset.
    parallel: Option<usize>,
    /// The orphans confirmed for destruction (`up --remove-orphans`), by vmid.
    remove_orphans: Vec<u32>,
}

/// What the destroy guard lets through.
#[derive(Clone, Copy, Default)]
struct DestroyAllowance {
    /// Every delete and replacement (`--allow-destroy`).
    allow_destroy: bool,
    /// In `tf:infra`, deletes of containers no longer in the project.
    delete_orphans: bool,
}

/// What the run's snapshots need: the run (for names), the policy and a PVE client.
pub struct SnapshotHook {
    pub run: i64,
    pub policy: nixmox_core::model::Snapshots,
    /// The client, or why none could be made (missing endpoint, credentials).
    pub client: Result<crate::proxmox::Client, String>,
}

/// A snapshot a step took.
#[derive(Clone, Debug)]
pub struct Taken {
    pub service: String,
    pub hostname: String,
    pub vmid: u32,
    pub node: String,
    pub name: String,
    /// The step's own host (not the database host).
    pub own: bool,
}

/// Rollback settings of a run, with what the store recorded before it started.
#[derive(Default)]
pub struct Rollback {
    /// Roll back `nix:service-config:*` steps whose health gate fails.
    pub services: bool,
    /// Also `nix:core:*` / `nix:core-auth:*` steps.
    pub core: bool,
    /// Restore the snapshot taken before the deploy when there is one (else the generation).
    pub snapshot: bool,
    /// Per Terraform step id: its record and rendered inputs as of the last successful run
    /// before this one.
    pub previous: BTreeMap<StepId, (StepRecord, BTreeMap<String, Vec<u8>>)>,
}

/// What a rollback did.
#[derive(Debug)]
pub struct RolledBack {
    /// For the user: what was restored (and what could not be).
    pub detail: String,
    /// Terraform steps re-applied from their previous inputs: the record to restore and the
    /// outputs of the re-apply.
    pub restored: Vec<Restored>,
    /// Whether anything was actually restored.
    pub any: bool,
    /// Snapshots the containers were rolled back to: (vmid, name).
    pub snapshots: Vec<(u32, String)>,
    /// The health gate's error, without what the rollback did: why the step is held.
    pub reason: String,
}

#[derive(Debug)]
pub struct Restored {
    pub step_id: StepId,
    pub record: StepRecord,
    pub rendered: BTreeMap<String, Vec<u8>>,
    pub outputs: Vec<OutputValue>,
}

/// Takes a lock shared by the step threads. A step thread that panicked while holding it
/// left data that is still whole (every critical section here is a push, an insert or a
/// read), so the poison is cleared rather than the run's secrets and records lost.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<'a> StepExec<'a> {
    pub fn new(
        project: &'a Project,
        plan: &'a Plan,
        paths: &'a Paths,
        logs: &Path,
        timeout: Duration,
    ) -> Self {
        let mut redact = Vec::new();
        if let Some(token) = proxmox_token(project, &paths.root) {
            redact.push(token);
        }
        StepExec {
            project,
            plan,
            paths,
            logs: logs.to_path_buf(),
            timeout,
            redact: Mutex::new(redact),
            health: OnceLock::new(),
            vault: None,
            rollback: None,
            tf_ran: Mutex::new(BTreeSet::new()),
            infra: InfraSettings::default(),
            allow: DestroyAllowance::default(),
            snapshots: None,
        }
    }

    /// The run's snapshot settings, if snapshots are on.
    pub fn snapshot_hook(&self) -> Option<&SnapshotHook> {
        self.snapshots.as_ref()
    }

    /// Snapshots containers before deploys and rolls back to them (docs/engine.md).
    pub fn with_snapshots(mut self, hook: SnapshotHook) -> Self {
        self.snapshots = Some(hook);
        self
    }

    /// What the destroy guard lets through: everything (`allow_destroy`), or in `tf:infra`
    /// the deletes of containers no longer in the project (`delete_orphans`).
    pub fn with_guard(mut self, allow_destroy: bool, delete_orphans: bool) -> Self {
        self.allow = DestroyAllowance {
            allow_destroy,
            delete_orphans,
        };
        self
    }

    /// How `tf:infra` runs with `proxmox-api`: `parallel` containers at once (the run's
    /// `--parallel`), destroying the orphans the operator confirmed (their vmids).
    pub fn with_infra(mut self, parallel: usize, remove_orphans: Vec<u32>) -> Self {
        self.infra = InfraSettings {
            parallel: Some(parallel),
            remove_orphans,
        };
        self
    }

    /// Rolls back deploys whose health gate fails (see [`Rollback`]).
    pub fn with_rollback(mut self, rollback: Rollback) -> Self {
        self.rollback = Some(rollback);
        self
    }

    /// Lets the steps write the secrets files: Terraform's sensitive outputs after a `tf:*`
    /// step, generated secrets (and the host's key) before a deploy.
    pub fn with_secrets(mut self, vault: crate::secrets::Vault) -> Self {
        self.learn(vault.known_values());
        self.vault = Some(Mutex::new(vault));
        self
    }

    /// Where step `index` writes its log in this run.
    pub fn log_path(&self, index: usize) -> PathBuf {
        self.logs.join(self.plan.steps[index].id.log_file_name())
    }

    /// Secret values to scrub, as they are known now.
    fn redactions(&self) -> Vec<String> {
        lock(&self.redact).clone()
    }

    /// Adds secret values to scrub from what follows.
    fn learn(&self, values: impl IntoIterator<Item = String>) {
        let mut r = lock(&self.redact);
        r.extend(values);
        r.sort();
        r.dedup();
    }

    /// The step's error, `step id: message`, with every known secret scrubbed.
    fn failed(&self, step: &Step, message: &str) -> Outcome {
        Outcome::Failed {
            error: format!("{}: {}", step.id, scrub(message, &self.redactions())),
            transient: false,
        }
    }

    /// Appends lines to the step's log, scrubbed.
    fn append_log(&self, index: usize, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        use std::io::Write;
        let text = scrub(&(lines.join("\n") + "\n"), &self.redactions());
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(index))
        {
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// A deploy step (`nix:*`): a snapshot first (issue 14), then the deploy and the health
    /// gate (the service's startup, then readiness checks, before its dependents run), rolled
    /// back when the gate fails and the run rolls this phase back.
    fn deploy_step(
        &self,
        index: usize,
        step: &Step,
        started: Instant,
        report: &mut StepReport,
    ) -> Outcome {
        let Some(s) = step.service() else {
            return self.failed(step, "no service");
        };
        if let Err(failed) = self.snapshot_before(index, s, started, report) {
            return failed;
        }
        match self.deploy(index, s, report) {
            Outcome::Done { changed, detail } => {
                match self.health_gate(index, s, started, changed, detail) {
                    Outcome::Failed { error, .. } if self.rolls_back(step.phase()) => {
                        self.roll_back(index, s, error, report)
                    }
                    other => other,
                }
            }
            failed => failed,
        }
    }
}

impl Runner for StepExec<'_> {
    type Report = StepReport;

    fn run(&self, index: usize, _attempt: u32, earlier: Option<StepReport>) -> StepReport {
        let started = Instant::now();
        let step = &self.plan.steps[index];
        if let Some(dir) = self.log_path(index).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut report = StepReport::start(earlier);
        report.outcome = match step.phase() {
            Phase::TfInfra if self.project.infra == InfraBackend::ProxmoxApi => {
                self.proxmox_infra(index)
            }
            Phase::TfInfra | Phase::TfAuthCore | Phase::TfServiceInfra | Phase::TfServiceConfig => {
                self.terraform(index, &mut report)
            }
            Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig => {
                self.deploy_step(index, step, started, &mut report)
            }
            Phase::Verify => match step.service() {
                Some(s) => self.verify(index, s, started),
                None => self.failed(step, "no service"),
            },
        };
        report
    }
}

/// Writes `rel` (a relative path from the state store) under `dir`, refusing to leave it.
fn write_under(dir: &Path, rel: &str, bytes: &[u8]) -> std::io::Result<()> {
    let rel = Path::new(rel);
    if rel
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("unexpected path {}", rel.display()),
        ));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes)
}

/// The `TF_VAR_<role>_password` variables of a service's `mode: terraform` databases: the
/// environment variable's name and the secret (`db/<role>`) that holds its value (issue 12).
pub fn db_password_vars(s: &nixmox_core::model::Service) -> Vec<(String, String)> {
    s.dbs
        .iter()
        .filter(|d| d.mode == nixmox_core::model::DbMode::Terraform)
        .map(|d| {
            (
                format!(
                    "TF_VAR_{}",
                    nixmox_core::render::terraform::db_password_variable(&d.role)
                ),
                nixmox_core::render::nixos::db_secret(&d.role),
            )
        })
        .collect()
}

/// The Proxmox API token in clear, for Terraform's environment and for redaction. A relative
/// `proxmox.token.file` is taken from the project directory, never the current one.
pub fn proxmox_token(project: &Project, root: &Path) -> Option<String> {
    crate::proxmox::token(project, root).map(|(t, _)| t.expose().to_string())
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.len() >= 4 => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12, item 1: the variable the service workspace declares for a `mode: terraform`
    /// role is the one the runner sets in Terraform's environment, from `db/<role>`.
    #[test]
    fn db_password_variables_match_the_rendered_workspace() {
        let file = |path: &str, text: &str| nixmox_core::SourceFile {
            path: path.into(),
            bytes: text.as_bytes().to_vec(),
        };
        let sources = nixmox_core::Sources {
            config: Some(file(
                "nixmox.yaml",
                "project: p\ndomain: p.lan\nnetwork: { cidr: 10.1.0.0/24, gateway: 10.1.0.1 }\n",
            )),
            manifests: vec![
                file(
                    "services/pg/manifest.yaml",
                    "name: pg\nprovides: { database: { type: postgresql } }\n",
                ),
                file(
                    "services/app/manifest.yaml",
                    "name: app\ninterface:\n  db: { database: app, role: app-owner }\n",
                ),
            ],
            lock: None,
        };
        let mut p = nixmox_core::load(&sources, &|_: &str| true)
            .project
            .unwrap();
        // The manifest refuses `mode: terraform` for now (item 5); the runner's part is ready.
        let app = p.index_of("app").unwrap();
        p.services[app].dbs[0].mode = nixmox_core::model::DbMode::Terraform;
        let vars = db_password_vars(&p.services[app]);
        assert_eq!(
            vars,
            [(
                "TF_VAR_app-owner_password".to_string(),
                "db/app-owner".to_string()
            )]
        );
        let rendered = nixmox_core::render::render(&p, &Default::default());
        let ws = rendered
            .files
            .iter()
            .find(|f| f.path == "terraform/services/app/infra/main.tf.json")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&ws.contents).unwrap();
        assert_eq!(v["variable"]["app-owner_password"]["sensitive"], true);
        assert_eq!(
            v["resource"]["postgresql_role"]["app-owner"]["password"],
            "${var.app-owner_password}"
        );
        assert!(!ws.contents.contains("TF_VAR"));
    }
}
