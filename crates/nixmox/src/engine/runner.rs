//! Runs one step for real: a Terraform workspace for `tf:*` steps, the NixOS deployer for
//! `nix:*` steps, the service's checks for `verify:*`. Everything a step produced (outputs,
//! the rendered inputs it used) is kept for the main thread to record.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nixmox_core::deploy;
use nixmox_core::model::{Deployer, InfraBackend};
use nixmox_core::plan::{Phase, Plan};
use nixmox_core::record::StepRecord;
use nixmox_core::Project;

use super::scheduler::{Outcome, Runner};
use crate::exec::scrub;
use crate::exec::{self, Cmd, RunOpts};
use crate::root::Paths;
use crate::state::OutputValue;
use crate::terraform::{self, StepOpts, Terraform, TfError, Workspace};

/// What a step leaves behind for the state store.
#[derive(Default)]
pub struct Artifacts {
    pub outputs: Vec<OutputValue>,
    pub rendered: Option<BTreeMap<String, Vec<u8>>>,
    /// The destroy guard refused the step: what it would have deleted or replaced.
    pub refused: Option<Vec<String>>,
}

pub struct StepExec<'a> {
    project: &'a Project,
    plan: &'a Plan,
    paths: &'a Paths,
    logs: PathBuf,
    timeout: Duration,
    artifacts: Mutex<Vec<Option<Artifacts>>>,
    /// Secret values to scrub from logs and messages.
    redact: Mutex<Vec<String>>,
    /// How health checks reach the hosts, made on first use.
    health: std::sync::OnceLock<Result<crate::health::Context, String>>,
    /// The secrets files (src/secrets), when the run manages them.
    secrets: Option<SecretsHook>,
    /// When and to what a failed health gate is rolled back.
    rollback: Option<Rollback>,
    /// Steps whose Terraform apply succeeded in this run.
    tf_ran: Mutex<std::collections::BTreeSet<usize>>,
    /// What each rolled-back step restored, for the main thread to record.
    rolled_back: Mutex<BTreeMap<usize, RolledBack>>,
    /// `tf:infra` with `proxmox-api`: containers handled at once (`up --parallel`), and
    /// the orphans confirmed for destruction (`up --remove-orphans`).
    infra: (Option<usize>, Vec<u32>),
    /// The destroy guard's allowances: `--allow-destroy`, and deletes of orphaned containers
    /// in `tf:infra`.
    allow: (bool, bool),
    /// Snapshots before deploys (issue 14), when the project has them on.
    snapshots: Option<SnapshotHook>,
    /// Per step: the snapshots it took, and warnings for the main thread to report.
    taken: Mutex<BTreeMap<usize, Vec<Taken>>>,
    warnings: Mutex<BTreeMap<usize, Vec<String>>>,
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
    pub previous: BTreeMap<String, (StepRecord, BTreeMap<String, Vec<u8>>)>,
}

/// What a rollback did.
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

pub struct Restored {
    pub step_id: String,
    pub record: StepRecord,
    pub rendered: BTreeMap<String, Vec<u8>>,
    pub outputs: Vec<OutputValue>,
}

/// The vault shared by the step threads, and the secrets-file hash each deploy used.
struct SecretsHook {
    vault: Mutex<crate::secrets::Vault>,
    used: Mutex<BTreeMap<usize, Option<String>>>,
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
            artifacts: Mutex::new((0..plan.steps.len()).map(|_| None).collect()),
            redact: Mutex::new(redact),
            health: std::sync::OnceLock::new(),
            secrets: None,
            rollback: None,
            tf_ran: Mutex::new(Default::default()),
            rolled_back: Mutex::new(BTreeMap::new()),
            infra: (None, Vec::new()),
            allow: (false, false),
            snapshots: None,
            taken: Mutex::new(BTreeMap::new()),
            warnings: Mutex::new(BTreeMap::new()),
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

    /// The snapshots a step took.
    pub fn take_snapshots(&self, index: usize) -> Vec<Taken> {
        self.taken
            .lock()
            .ok()
            .and_then(|mut t| t.remove(&index))
            .unwrap_or_default()
    }

    /// Warnings a step left for the run's output.
    pub fn take_warnings(&self, index: usize) -> Vec<String> {
        self.warnings
            .lock()
            .ok()
            .and_then(|mut t| t.remove(&index))
            .unwrap_or_default()
    }

    fn warn(&self, index: usize, message: String) {
        if let Ok(mut w) = self.warnings.lock() {
            w.entry(index).or_default().push(message);
        }
    }

    /// What the destroy guard lets through: everything (`allow_destroy`), or in `tf:infra`
    /// the deletes of containers no longer in the project (`delete_orphans`).
    pub fn with_guard(mut self, allow_destroy: bool, delete_orphans: bool) -> Self {
        self.allow = (allow_destroy, delete_orphans);
        self
    }

    /// The destroy guard of a Terraform step.
    fn guard(&self, phase: Phase, service: Option<&str>) -> terraform::Guard {
        use nixmox_core::model::TfPhase;
        let tf_phase = match phase {
            Phase::TfServiceInfra => Some(TfPhase::ServiceInfra),
            Phase::TfServiceConfig => Some(TfPhase::ServiceConfig),
            _ => None,
        };
        let service = service.and_then(|s| self.project.service(s));
        terraform::Guard {
            protection: nixmox_core::render::terraform::protection(service.zip(tf_phase)),
            allow_destroy: self.allow.0,
            allow_deletes: phase == Phase::TfInfra && self.allow.1,
        }
    }

    /// How `tf:infra` runs with `proxmox-api`: `parallel` containers at once (the run's
    /// `--parallel`), destroying the orphans the operator confirmed (their vmids).
    pub fn with_infra(mut self, parallel: usize, remove_orphans: Vec<u32>) -> Self {
        self.infra = (Some(parallel), remove_orphans);
        self
    }

    /// Rolls back deploys whose health gate fails (see [`Rollback`]).
    pub fn with_rollback(mut self, rollback: Rollback) -> Self {
        self.rollback = Some(rollback);
        self
    }

    /// What the rollback of a step did, if it was rolled back.
    pub fn take_rolled_back(&self, index: usize) -> Option<RolledBack> {
        self.rolled_back
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&index))
    }

    /// Lets the steps write the secrets files: Terraform's sensitive outputs after a `tf:*`
    /// step, generated secrets (and the host's key) before a deploy.
    pub fn with_secrets(mut self, vault: crate::secrets::Vault) -> Self {
        if let Ok(mut r) = self.redact.lock() {
            r.extend(vault.known_values());
            r.sort();
            r.dedup();
        }
        self.secrets = Some(SecretsHook {
            vault: Mutex::new(vault),
            used: Mutex::new(BTreeMap::new()),
        });
        self
    }

    /// For a deploy that ran: the SHA-256 of the host's secrets file it shipped (`Some(None)`:
    /// the host has none). `None` when it did not run with secrets.
    pub fn take_secrets_hash(&self, index: usize) -> Option<Option<String>> {
        self.secrets
            .as_ref()
            .and_then(|h| h.used.lock().ok().and_then(|mut u| u.remove(&index)))
    }

    pub fn log_path(&self, index: usize) -> PathBuf {
        self.logs.join(format!(
            "{}.log",
            self.plan.steps[index].id.replace(':', "_")
        ))
    }

    pub fn take_artifacts(&self, index: usize) -> Artifacts {
        self.artifacts
            .lock()
            .map(|mut a| a[index].take())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn keep(&self, index: usize, a: Artifacts) {
        if let Ok(mut all) = self.artifacts.lock() {
            all[index] = Some(a);
        }
    }

    fn redactions(&self) -> Vec<String> {
        self.redact.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The passwords of the service's `mode: terraform` roles, from the secrets files, as
    /// `TF_VAR_*` environment variables; each value joins the redactions.
    fn db_password_env(&self, service: Option<&str>) -> Result<Vec<(OsString, OsString)>, String> {
        let Some(s) = service.and_then(|s| self.project.service(s)) else {
            return Ok(Vec::new());
        };
        let vars = db_password_vars(s);
        if vars.is_empty() {
            return Ok(Vec::new());
        }
        let Some(hook) = &self.secrets else {
            return Err("the passwords of its `mode: terraform` roles are in the secrets files, which this run cannot read".into());
        };
        let mut out = Vec::new();
        for (env, secret) in vars {
            let value = hook
                .vault
                .lock()
                .map_err(|_| "the secrets vault is poisoned".to_string())?
                .generated(&secret)
                .map_err(|e| format!("cannot read `{secret}`: {e}"))?;
            if let Ok(mut r) = self.redact.lock() {
                r.push(value.clone());
            }
            out.push((OsString::from(env), OsString::from(value)));
        }
        Ok(out)
    }

    /// `SSL_CERT_FILE` for a Terraform process: the bundle of the project's trust set (the
    /// system's roots, the project CA, `proxmox.tls.ca_file`; src/pki.rs), rebuilt for each
    /// step because the project CA can appear during a run.
    fn trust_env(&self) -> Result<(OsString, OsString), String> {
        crate::pki::terraform_env(&self.paths.root, self.project)
    }

    fn terraform(&self, index: usize, phase: Phase, service: Option<&str>) -> Outcome {
        let step = &self.plan.steps[index];
        let config_dir = match (phase, service) {
            (Phase::TfInfra, _) => self.paths.build.join("terraform/infra"),
            (Phase::TfAuthCore, _) => self.paths.build.join("terraform/auth-core"),
            (Phase::TfServiceInfra, Some(s)) => self
                .paths
                .build
                .join(format!("terraform/services/{s}/infra")),
            (Phase::TfServiceConfig, Some(s)) => self
                .paths
                .build
                .join(format!("terraform/services/{s}/config")),
            _ => {
                return Outcome::Failed {
                    error: format!("{}: not a Terraform step", step.id),
                    transient: false,
                }
            }
        };
        if phase == Phase::TfInfra && self.project.infra != InfraBackend::Terraform {
            return Outcome::Failed {
                error: format!(
                    "tf:infra: infra.backend `{}` is not handled by the Terraform runner",
                    self.project.infra.as_str()
                ),
                transient: false,
            };
        }
        if !config_dir.is_dir() {
            return Outcome::Done {
                changed: false,
                detail: "no Terraform workspace rendered".into(),
            };
        }
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        match self.trust_env() {
            Ok(v) => env.push(v),
            Err(e) => {
                return Outcome::Failed {
                    error: format!("{}: {e}", step.id),
                    transient: false,
                }
            }
        }
        if phase == Phase::TfInfra {
            if let Some(token) = proxmox_token(self.project, &self.paths.root) {
                env.push(("PROXMOX_VE_API_TOKEN".into(), token.into()));
            }
        }
        if phase == Phase::TfServiceInfra {
            match self.db_password_env(service) {
                Ok(vars) => env.extend(vars),
                Err(e) => {
                    return Outcome::Failed {
                        error: format!("{}: {}", step.id, scrub(&e, &self.redactions())),
                        transient: false,
                    }
                }
            }
        }
        let tf = Terraform {
            binary: crate::root::program_path(&self.paths.root, &self.project.terraform.binary),
            env,
        };
        let ws = Workspace {
            config_dir: config_dir.clone(),
            data_dir: self
                .paths
                .terraform
                .join(terraform::workspace_slug(&step.id)),
        };
        let apply_order: Vec<String> = service
            .and_then(|s| self.project.service(s))
            .map(|s| {
                let want = if phase == Phase::TfServiceInfra {
                    nixmox_core::model::TfPhase::ServiceInfra
                } else {
                    nixmox_core::model::TfPhase::ServiceConfig
                };
                s.terraform
                    .iter()
                    .filter(|t| t.phase == want)
                    .flat_map(|t| t.apply_order.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let opts = StepOpts {
            apply_order,
            timeout: Some(self.timeout),
            log: self.log_path(index),
            // Ctrl-C lets a running Terraform finish (it holds a state lock).
            cancel: None,
            redact: self.redactions(),
            guard: Some(self.guard(phase, service)),
        };
        // With the Terraform backend a container whose node changed is migrated through the
        // API and the state follows, before Terraform plans (which would otherwise replace it).
        let moved = if phase == Phase::TfInfra {
            match self.migrate_for_terraform(&tf, &ws, &opts) {
                Ok(moved) => moved,
                Err(error) => {
                    return Outcome::Failed {
                        error: format!("{}: {}", step.id, scrub(&error, &self.redactions())),
                        transient: false,
                    }
                }
            }
        } else {
            Vec::new()
        };
        match tf.apply_step(&ws, &opts) {
            Ok(applied) => {
                let mut sensitive = Vec::new();
                let outputs: Vec<OutputValue> = applied
                    .outputs
                    .into_iter()
                    .map(|o| {
                        if o.sensitive {
                            collect_strings(&o.value, &mut sensitive);
                        }
                        OutputValue {
                            name: o.name,
                            value: o.value,
                            sensitive: o.sensitive,
                        }
                    })
                    .collect();
                if let Ok(mut r) = self.redact.lock() {
                    r.extend(sensitive);
                }
                let stored = match self.store_outputs(index, phase, service, &outputs) {
                    Ok(note) => note,
                    Err(e) => {
                        return Outcome::Failed {
                            error: format!("{}: {}", step.id, scrub(&e, &self.redactions())),
                            transient: false,
                        }
                    }
                };
                self.keep(
                    index,
                    Artifacts {
                        outputs,
                        rendered: Some(super::read_inputs(&config_dir)),
                        refused: None,
                    },
                );
                if let Ok(mut ran) = self.tf_ran.lock() {
                    ran.insert(index);
                }
                let detail = if applied.changed {
                    "applied"
                } else {
                    "no changes"
                };
                let migrated = if moved.is_empty() {
                    String::new()
                } else {
                    format!(", migrated {} ({})", moved.len(), moved.join(", "))
                };
                // Backup jobs (`host.backup.schedule`): the provider pinned (`~> 0.82`) has no
                // resource for `/cluster/backup`, so they are kept in step through the PVE API
                // exactly as with the `proxmox-api` backend, once the containers are there.
                let jobs = if phase == Phase::TfInfra {
                    match self.backup_jobs_for_terraform(&opts) {
                        Ok(jobs) => jobs,
                        Err(error) => {
                            return Outcome::Failed {
                                error: format!(
                                    "{}: backup jobs (/cluster/backup): {}",
                                    step.id,
                                    scrub(&error, &self.redactions())
                                ),
                                transient: false,
                            }
                        }
                    }
                } else {
                    Vec::new()
                };
                let jobs_note = if jobs.is_empty() {
                    String::new()
                } else {
                    format!(", {}", jobs.join(", "))
                };
                Outcome::Done {
                    changed: applied.changed || !moved.is_empty() || !jobs.is_empty(),
                    detail: format!("{detail}{migrated}{jobs_note}{stored}"),
                }
            }
            Err(e) => {
                if let TfError::DestroyRefused { changes } = &e {
                    self.keep(
                        index,
                        Artifacts {
                            refused: Some(changes.iter().map(|c| c.to_string()).collect()),
                            ..Artifacts::default()
                        },
                    );
                }
                let transient = matches!(
                    &e,
                    TfError::Failed {
                        transient: true,
                        ..
                    }
                );
                Outcome::Failed {
                    error: format!("{}: {}", step.id, scrub(&e.to_string(), &self.redactions())),
                    transient,
                }
            }
        }
    }

    /// `tf:infra` with the Terraform backend: NixMox's backup jobs (`/cluster/backup`) kept in
    /// step with `host.backup.schedule` through the PVE API (`proxmox::backup::sync_jobs`, as
    /// with the `proxmox-api` backend; jobs NixMox did not make are never changed). PVE is
    /// asked only when a manifest wants a job or a previous run kept one (recorded in
    /// `.nixmox/terraform/backup-jobs`), so a project without backup jobs needs no API access
    /// here. Returns what changed, in words.
    fn backup_jobs_for_terraform(&self, opts: &StepOpts) -> Result<Vec<String>, String> {
        use crate::proxmox::{self, ClientOptions};
        let record = self.paths.terraform.join("backup-jobs");
        let desired = proxmox::backup::desired_jobs(self.project);
        let kept = std::fs::read_to_string(&record).unwrap_or_default();
        if desired.is_empty() && kept.trim().is_empty() {
            return Ok(Vec::new());
        }
        let settings = proxmox::Settings::from_project(self.project, &self.paths.root)
            .map_err(|e| e.to_string())?;
        let secrets = settings.secrets();
        let client = proxmox::connect(
            &settings,
            ClientOptions {
                task_timeout: self.timeout,
                ..ClientOptions::default()
            },
        )
        .map_err(|e| scrub(&e.to_string(), &secrets))?;
        let done = proxmox::backup::sync_jobs(&client, self.project)
            .map_err(|e| scrub(&e.to_string(), &secrets))?;
        for line in &done {
            let _ = crate::exec::append_log(&opts.log, &format!("# {line}"), &opts.redact);
        }
        let ids: Vec<String> = desired.iter().map(|j| j.id.clone()).collect();
        let _ = std::fs::create_dir_all(&self.paths.terraform);
        std::fs::write(&record, ids.join("\n"))
            .map_err(|e| format!("cannot write {}: {e}", record.display()))?;
        Ok(done)
    }

    /// `tf:infra` with the Terraform backend: every container whose node in the workspace's
    /// state differs from its placement is migrated through the PVE API (restart mode when it
    /// runs; one found on its new node already, after an interrupted run, is not), then the
    /// state follows (`terraform::Terraform::follow_moves`), so the plan that comes next has
    /// no replacement. Returns the moves done (`CT 905 pve1 → pve2`). A refused migration
    /// fails the step naming the container, both nodes and PVE's reason; the moves that
    /// succeeded are still followed in the state, and nothing else is written.
    fn migrate_for_terraform(
        &self,
        tf: &Terraform,
        ws: &Workspace,
        opts: &StepOpts,
    ) -> Result<Vec<String>, String> {
        use crate::proxmox::{self, ClientOptions};
        let recorded = tf.container_nodes(ws, opts).map_err(|e| e.to_string())?;
        let wanted: Vec<(&nixmox_core::model::Service, String)> = self
            .project
            .services
            .iter()
            .filter_map(|s| {
                let address = format!(
                    "proxmox_virtual_environment_container.{}",
                    nixmox_core::render::terraform::tf_name(s.name.as_str())
                );
                recorded
                    .iter()
                    .find(|(a, node, vmid)| {
                        *a == address && *node != s.host.node && *vmid == s.host.vmid.get()
                    })
                    .map(|_| (s, address))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let log = |text: &str| {
            let _ = crate::exec::append_log(&opts.log, text, &opts.redact);
        };
        let settings = proxmox::Settings::from_project(self.project, &self.paths.root)
            .map_err(|e| format!("moving containers to their new nodes: {e}"))?;
        // PVE's messages never carry the credentials, but they are scrubbed all the same.
        let secrets = settings.secrets();
        let scrub = |text: String| scrub(&text, &secrets);
        let client = proxmox::connect(
            &settings,
            ClientOptions {
                task_timeout: self.timeout,
                ..ClientOptions::default()
            },
        )
        .map_err(|e| scrub(format!("moving containers to their new nodes: {e}")))?;
        let guests = client
            .guests()
            .map_err(|e| scrub(format!("moving containers to their new nodes: {e}")))?;
        let mut moves = Vec::new();
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (s, address) in wanted {
            let (vmid, to) = (s.host.vmid.get(), &s.host.node);
            let Some(g) = guests.iter().find(|g| g.vmid == vmid && g.kind == "lxc") else {
                // Gone: Terraform's refresh finds that out and plans it as it should.
                log(&format!(
                    "# CT {vmid} ({}) is not in the cluster: left to Terraform",
                    s.name
                ));
                continue;
            };
            if !(g.tags.iter().any(|t| t == "nixmox")
                && g.tags
                    .iter()
                    .any(|t| *t == self.project.name.as_str().to_lowercase()))
            {
                failures.push(format!(
                    "CT {vmid} ({}) on node {}: not moved to node {to}: it does not carry the tags `nixmox` and `{}`, so NixMox does not touch it",
                    s.name, g.node, self.project.name
                ));
                continue;
            }
            if g.node != *to {
                log(&format!(
                    "# CT {vmid} ({}): migrating {} → {to}{}",
                    s.name,
                    g.node,
                    if g.status == "running" {
                        " (restart mode)"
                    } else {
                        ""
                    }
                ));
                if let Err(e) = client.migrate_ct(&g.node, vmid, to, g.status == "running") {
                    failures.push(scrub(format!(
                        "CT {vmid} ({}) on node {}: migrate to node {to}: {e}; it stays on node {}",
                        s.name, g.node, g.node
                    )));
                    continue;
                }
            }
            let from = recorded
                .iter()
                .find(|(a, _, _)| *a == address)
                .map(|(_, n, _)| n.clone())
                .unwrap_or_default();
            done.push(format!("CT {vmid} {from} → {to}"));
            moves.push(terraform::NodeMove {
                address,
                vmid,
                node: to.clone(),
            });
        }
        let followed = tf.follow_moves(ws, opts, &moves).map_err(|e| e.to_string());
        match (followed, failures.is_empty()) {
            (Err(e), _) => Err(failures
                .into_iter()
                .chain([e])
                .collect::<Vec<_>>()
                .join("; ")),
            (Ok(()), false) => Err(failures.join("; ")),
            (Ok(()), true) => Ok(done),
        }
    }

    fn deploy(&self, index: usize, service: &str) -> Outcome {
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Outcome::Failed {
                error: format!("{}: no service `{service}`", step.id),
                transient: false,
            };
        };
        if let Err(e) = self.secrets_before_deploy(index, s.host.hostname.as_str()) {
            return Outcome::Failed {
                error: format!("{}: {}", step.id, scrub(&e, &self.redactions())),
                transient: false,
            };
        }
        let flake = self.paths.build.join("nix");
        let target = deploy::Target {
            host: s.host.hostname.clone(),
            ip: s.host.ip,
            user: self.project.ssh.user.clone(),
            flake: crate::flake::reference(&flake),
            flake_dir: flake.to_string_lossy().into_owned(),
        };
        let argv = deploy::switch_argv(&self.project.nix.deployer, &target);
        let program = crate::root::program_path(&self.paths.root, &argv[0]);
        let mut cmd = Cmd::new(program).args(&argv[1..]).cwd(&flake);
        let builtin = !matches!(self.project.nix.deployer, Deployer::Command { .. });
        if builtin {
            cmd.env
                .push(("NIX_SSHOPTS".into(), self.ssh_options().join(" ").into()));
        }
        // Ctrl-C lets running steps finish: no cancel flag reaches the process.
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: Some(self.log_path(index)),
            redact: self.redactions(),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => {
                let host_file = flake.join(format!("hosts/{}.nix", s.host.hostname));
                let mut rendered = BTreeMap::new();
                if let Ok(bytes) = std::fs::read(&host_file) {
                    rendered.insert(format!("hosts/{}.nix", s.host.hostname), bytes);
                }
                // The generation it switched to, for rollback. A custom deployer has its own way
                // back, and NixMox does not assume it can reach the host over SSH.
                let mut outputs = Vec::new();
                let mut detail = format!("{} switched", s.host.hostname);
                if builtin {
                    match self.current_generation(s.host.ip, index) {
                        Some(generation) => {
                            detail = format!("{} switched to {generation}", s.host.hostname);
                            outputs.push(OutputValue {
                                name: "generation".into(),
                                value: serde_json::Value::String(generation),
                                sensitive: false,
                            });
                        }
                        None => detail
                            .push_str(" (the system generation could not be read back over SSH)"),
                    }
                }
                self.keep(
                    index,
                    Artifacts {
                        outputs,
                        rendered: Some(rendered),
                        refused: None,
                    },
                );
                Outcome::Done {
                    changed: true,
                    detail,
                }
            }
            Ok(fin) => {
                let tail: String = fin
                    .stderr
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ");
                let code = fin
                    .code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "a signal".into());
                // OpenSSH exits 255 when it cannot connect: worth another try.
                Outcome::Failed {
                    error: format!(
                        "{}: deploying {} ({}) with `{}` exited with {code}: {}",
                        step.id,
                        s.host.hostname,
                        s.host.ip,
                        argv[0],
                        if tail.is_empty() {
                            "no output".into()
                        } else {
                            tail
                        }
                    ),
                    transient: fin.code == Some(255),
                }
            }
            Err(e) => Outcome::Failed {
                error: format!(
                    "{}: deploying {} ({}): {e}",
                    step.id, s.host.hostname, s.host.ip
                ),
                transient: false,
            },
        }
    }
}

impl StepExec<'_> {
    fn ssh_options(&self) -> Vec<String> {
        let _ = std::fs::create_dir_all(&self.paths.ssh);
        deploy::ssh_options(
            &self.paths.ssh.to_string_lossy(),
            &self.paths.known_hosts.to_string_lossy(),
            self.project.ssh.host_key_checking.as_str(),
        )
    }

    /// `readlink /nix/var/nix/profiles/system` on the host: the generation now active.
    fn current_generation(&self, ip: core::net::Ipv4Addr, index: usize) -> Option<String> {
        let remote = [
            "readlink".to_string(),
            "/nix/var/nix/profiles/system".to_string(),
        ];
        let argv = deploy::ssh_argv(&self.ssh_options(), &self.project.ssh.user, ip, &remote);
        let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        let opts = RunOpts {
            timeout: Some(Duration::from_secs(30)),
            log: Some(self.log_path(index)),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => {
                Some(fin.stdout.trim().to_string()).filter(|g| !g.is_empty())
            }
            _ => None,
        }
    }
}

/// Secrets (src/secrets): what the steps put into and take from the hosts' secrets files.
impl StepExec<'_> {
    /// After a Terraform step: its sensitive outputs into the secrets file of its host. Returns
    /// a note for the step's detail.
    fn store_outputs(
        &self,
        index: usize,
        phase: Phase,
        service: Option<&str>,
        outputs: &[OutputValue],
    ) -> Result<String, String> {
        let Some(hook) = &self.secrets else {
            return Ok(String::new());
        };
        if !outputs.iter().any(|o| o.sensitive) {
            return Ok(String::new());
        }
        let Some(host) = crate::secrets::output_host(self.project, phase, service) else {
            return Ok(String::new());
        };
        let mut vault = hook
            .vault
            .lock()
            .map_err(|_| "secrets: lock poisoned".to_string())?;
        vault.log = Some(self.log_path(index));
        let step_id = &self.plan.steps[index].id;
        // `tf:auth-core` also makes the OIDC clients of core services that use auth: each
        // `<service>_…` output belongs to that service's host (its `nix:core-auth` step ships
        // it), the rest to the identity provider's host.
        let mut outputs: Vec<OutputValue> = outputs.to_vec();
        let mut notes = Vec::new();
        if phase == Phase::TfAuthCore {
            for core in self
                .project
                .services
                .iter()
                .filter(|c| c.is_core() && c.auth.as_ref().is_some_and(|a| a.oidc.is_some()))
            {
                let prefix = format!(
                    "{}_",
                    nixmox_core::render::terraform::tf_name(core.name.as_str())
                );
                let (mine, rest): (Vec<OutputValue>, Vec<OutputValue>) = outputs
                    .into_iter()
                    .partition(|o| o.name.starts_with(&prefix));
                outputs = rest;
                let mine: Vec<OutputValue> = mine
                    .into_iter()
                    .map(|o| OutputValue {
                        name: o.name[prefix.len()..].to_string(),
                        value: o.value,
                        sensitive: o.sensitive,
                    })
                    .collect();
                if !mine.iter().any(|o| o.sensitive) {
                    continue;
                }
                let core_host = core.host.hostname.to_string();
                match vault.absorb_outputs(step_id, &core_host, Some(core.name.as_str()), &mine) {
                    Ok(Some(names)) if !names.is_empty() => notes.push(format!(
                        "; {} secret(s) in {}",
                        names.len(),
                        crate::secrets::file_rel(&core_host)
                    )),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(format!(
                            "storing its sensitive outputs in {}: {e}",
                            crate::secrets::file_rel(&core_host)
                        ))
                    }
                }
            }
        }
        let result = vault.absorb_outputs(step_id, &host, service, &outputs);
        if let Ok(mut r) = self.redact.lock() {
            r.extend(vault.known_values());
            r.sort();
            r.dedup();
        }
        let notes = notes.concat();
        match result {
            Ok(Some(names)) if names.is_empty() => Ok(notes),
            Ok(Some(names)) => Ok(format!(
                "{notes}; {} secret(s) in {}",
                names.len(),
                crate::secrets::file_rel(&host)
            )),
            Ok(None) => {
                Ok("; sensitive outputs not stored: secrets.age_recipients is empty".to_string())
            }
            Err(e) => Err(format!(
                "storing its sensitive outputs in {}: {e}",
                crate::secrets::file_rel(&host)
            )),
        }
    }

    /// Before a deploy: the host's generated secrets (reading its SSH host key first when
    /// NixMox deploys over SSH), and the hash of the file the deploy ships.
    fn secrets_before_deploy(&self, index: usize, host: &str) -> Result<(), String> {
        let Some(hook) = &self.secrets else {
            return Ok(());
        };
        let mut vault = hook
            .vault
            .lock()
            .map_err(|_| "secrets: lock poisoned".to_string())?;
        vault.log = Some(self.log_path(index));
        let result = vault.before_deploy(host);
        if let Ok(mut r) = self.redact.lock() {
            r.extend(vault.known_values());
            r.sort();
            r.dedup();
        }
        let hash = result.map_err(|e| format!("secrets of `{host}`: {e}"))?;
        if let Ok(mut used) = hook.used.lock() {
            used.insert(index, hash);
        }
        Ok(())
    }
}

/// Health gates and `verify:*` (src/health).
impl StepExec<'_> {
    fn health_context(&self) -> Result<&crate::health::Context, String> {
        self.health
            .get_or_init(|| {
                crate::health::Context::for_project(
                    self.project,
                    &self.paths.root,
                    &self.paths.ssh,
                    &self.paths.known_hosts,
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn health_gate(
        &self,
        index: usize,
        service: &str,
        started: std::time::Instant,
        changed: bool,
        detail: String,
    ) -> Outcome {
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Outcome::Done { changed, detail };
        };
        if s.health.startup.is_empty() && s.health.readiness.is_empty() {
            return Outcome::Done { changed, detail };
        }
        let log = self.log_path(index);
        let result = self.health_context().and_then(|ctx| {
            crate::health::steps::after_deploy(
                ctx,
                s,
                std::time::Instant::now(),
                Some(started + self.timeout),
                Some(&log),
            )
        });
        match result {
            Ok(Some(passed)) => Outcome::Done {
                changed,
                detail: format!("{detail}; {passed}"),
            },
            Ok(None) => Outcome::Done { changed, detail },
            Err(e) => Outcome::Failed {
                error: format!(
                    "{}: health gate failed: {}",
                    step.id,
                    scrub(&e, &self.redactions())
                ),
                transient: false,
            },
        }
    }

    fn verify(&self, index: usize, service: &str, started: std::time::Instant) -> Outcome {
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Outcome::Failed {
                error: format!("{}: no service `{service}`", step.id),
                transient: false,
            };
        };
        let log = self.log_path(index);
        let result = self.health_context().and_then(|ctx| {
            crate::health::steps::verify_service(
                ctx,
                self.project,
                s,
                started,
                Some(started + self.timeout),
                Some(&log),
            )
        });
        // Last, S's redirect URIs must be registered: read from the state of the workspace that
        // applied its OIDC client (local backend only; a remote state is not read here).
        let result = result.and_then(|detail| {
            let state_file = self
                .paths
                .terraform
                .join(terraform::workspace_slug(&format!(
                    "tf:service-infra:{service}"
                )))
                .join("terraform.tfstate");
            let state = std::fs::read_to_string(&state_file).ok();
            match crate::health::verify::redirects_registered(state.as_deref(), s)? {
                Some(note) => Ok(format!("{detail}; {note}")),
                None => Ok(detail),
            }
        });
        match result {
            Ok(detail) => Outcome::Done {
                changed: false,
                detail,
            },
            Err(e) => Outcome::Failed {
                error: format!("{}: {}", step.id, scrub(&e, &self.redactions())),
                transient: false,
            },
        }
    }
}

impl Runner for StepExec<'_> {
    fn run(&self, index: usize, _attempt: u32) -> Outcome {
        let started = std::time::Instant::now();
        let step = &self.plan.steps[index];
        if let Some(dir) = self.log_path(index).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match step.phase {
            Phase::TfInfra if self.project.infra == InfraBackend::ProxmoxApi => {
                // The containers through the PVE API (src/proxmox); the project root is the
                // directory holding `.nixmox/`.
                let root = self
                    .paths
                    .build
                    .parent()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("."));
                let settings = crate::proxmox::step::StepSettings {
                    parallel: self
                        .infra
                        .0
                        .unwrap_or(self.project.deploy.parallel as usize)
                        .max(1),
                    timeout: self.timeout,
                    remove_orphans: self.infra.1.clone(),
                };
                crate::proxmox::step::run_infra(
                    self.project,
                    root,
                    &self.log_path(index),
                    &settings,
                    &self.redactions(),
                )
            }
            Phase::TfInfra | Phase::TfAuthCore | Phase::TfServiceInfra | Phase::TfServiceConfig => {
                self.terraform(index, step.phase, step.service.as_deref())
            }
            Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig => {
                match step.service.as_deref() {
                    // A snapshot first (issue 14), then the deploy and the health gate: the
                    // service's startup, then readiness checks, before its dependents run.
                    Some(s) => match self
                        .snapshot_before(index, s, started)
                        .map(|()| self.deploy(index, s))
                        .unwrap_or_else(|failed| failed)
                    {
                        Outcome::Done { changed, detail } => {
                            match self.health_gate(index, s, started, changed, detail) {
                                Outcome::Failed { error, .. } if self.rolls_back(step.phase) => {
                                    self.roll_back(index, s, error)
                                }
                                other => other,
                            }
                        }
                        failed => failed,
                    },
                    None => Outcome::Failed {
                        error: format!("{}: no service", step.id),
                        transient: false,
                    },
                }
            }
            Phase::Verify => match step.service.as_deref() {
                Some(s) => self.verify(index, s, started),
                None => Outcome::Failed {
                    error: format!("{}: no service", step.id),
                    transient: false,
                },
            },
        }
    }
}

/// Rollback of a deploy whose health gate failed (docs/engine.md, "Rollback").
impl StepExec<'_> {
    fn rolls_back(&self, phase: Phase) -> bool {
        match (&self.rollback, phase) {
            (Some(r), Phase::NixServiceConfig) => r.services,
            (Some(r), Phase::NixCore | Phase::NixCoreAuth) => r.core,
            _ => false,
        }
    }

    /// Switches the service's host back to its previous generation and re-applies the
    /// service's Terraform steps that ran in this run from their previous inputs. The step
    /// fails either way; the error says what was restored.
    fn roll_back(&self, index: usize, service: &str, error: String) -> Outcome {
        let mut done: Vec<String> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        let mut restored = Vec::new();
        let mut to_snapshots = Vec::new();
        if let Some(s) = self.project.service(service) {
            // The snapshot taken before the deploy, when there is one: the whole container,
            // data included, through the PVE API (no network path to the host needed).
            let restored_snapshot = match self.snapshot_back(index, s) {
                Some(Ok((what, snaps))) => {
                    done.extend(what);
                    to_snapshots = snaps;
                    true
                }
                Some(Err(e)) => {
                    problems.push(e);
                    false
                }
                None => false,
            };
            if !restored_snapshot {
                match self.switch_back(index, s) {
                    Ok(Some(what)) => done.push(what),
                    Ok(None) => problems.push(format!(
                        "{} not switched back: the deployer has no rollback command",
                        s.host.hostname
                    )),
                    Err(e) => problems.push(e),
                }
            }
        }
        let ran: Vec<usize> = self
            .tf_ran
            .lock()
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        for j in ran {
            let step = &self.plan.steps[j];
            if step.service.as_deref() != Some(service)
                || !matches!(step.phase, Phase::TfServiceInfra | Phase::TfServiceConfig)
            {
                continue;
            }
            let Some((record, files)) = self
                .rollback
                .as_ref()
                .and_then(|r| r.previous.get(&step.id))
            else {
                problems.push(format!(
                    "{} not restored: no earlier successful inputs recorded",
                    step.id
                ));
                continue;
            };
            match self.reapply(index, j, service, files) {
                Ok(outputs) => {
                    done.push(format!("{} re-applied from its previous inputs", step.id));
                    restored.push(Restored {
                        step_id: step.id.clone(),
                        record: record.clone(),
                        rendered: files.clone(),
                        outputs,
                    });
                }
                Err(e) => problems.push(format!("{} not restored: {e}", step.id)),
            }
        }
        let any = !done.is_empty();
        let mut detail = if any {
            done.join("; ")
        } else {
            "nothing restored".to_string()
        };
        if !problems.is_empty() {
            detail = format!("{detail} (rollback incomplete: {})", problems.join("; "));
        }
        let detail = scrub(&detail, &self.redactions());
        if let Ok(mut r) = self.rolled_back.lock() {
            r.insert(
                index,
                RolledBack {
                    detail: detail.clone(),
                    restored,
                    any,
                    snapshots: to_snapshots,
                    reason: scrub(&error, &self.redactions()),
                },
            );
        }
        Outcome::Failed {
            error: format!("{error}; rolled back: {detail}"),
            transient: false,
        }
    }

    /// The host back to its previous generation. `Ok(None)`: the deployer has no way back.
    fn switch_back(
        &self,
        index: usize,
        s: &nixmox_core::model::Service,
    ) -> Result<Option<String>, String> {
        let flake = self.paths.build.join("nix");
        let target = deploy::Target {
            host: s.host.hostname.clone(),
            ip: s.host.ip,
            user: self.project.ssh.user.clone(),
            flake: crate::flake::reference(&flake),
            flake_dir: flake.to_string_lossy().into_owned(),
        };
        let Some(mut argv) = deploy::rollback_argv(&self.project.nix.deployer, &target) else {
            return Ok(None);
        };
        let custom = matches!(self.project.nix.deployer, Deployer::Command { .. });
        if !custom {
            // `nixos-rebuild switch --rollback` runs on the host itself.
            if target.user.as_str() != "root" {
                argv.insert(0, "sudo".into());
            }
            argv = deploy::ssh_argv(&self.ssh_options(), &target.user, target.ip, &argv);
        }
        let program = crate::root::program_path(&self.paths.root, &argv[0]);
        let mut cmd = Cmd::new(program).args(&argv[1..]);
        if flake.is_dir() {
            cmd = cmd.cwd(&flake);
        }
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: Some(self.log_path(index)),
            redact: self.redactions(),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => Ok(Some(format!(
                "{} switched back to its previous generation",
                s.host.hostname
            ))),
            Ok(fin) => Err(format!(
                "switching {} back with `{}` exited with {}: {}",
                s.host.hostname,
                argv[0],
                fin.code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "a signal".into()),
                fin.stderr.lines().last().unwrap_or("no output")
            )),
            Err(e) => Err(format!("switching {} back: {e}", s.host.hostname)),
        }
    }

    /// Writes a Terraform step's previous inputs to `.nixmox/rollback/` (laid out like the
    /// build tree, so `../modules` resolves to the service's rendered modules) and applies them
    /// with the step's own data dir.
    fn reapply(
        &self,
        index: usize,
        tf_index: usize,
        service: &str,
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Vec<OutputValue>, String> {
        let step = &self.plan.steps[tf_index];
        let dot = self.paths.build.parent().unwrap_or(Path::new(".nixmox"));
        let base = dot.join("rollback/terraform/services").join(service);
        let kind = if step.phase == Phase::TfServiceInfra {
            "infra"
        } else {
            "config"
        };
        let config_dir = base.join(kind);
        let io = |e: std::io::Error| format!("writing its previous inputs: {e}");
        if config_dir.exists() {
            std::fs::remove_dir_all(&config_dir).map_err(io)?;
        }
        std::fs::create_dir_all(&config_dir).map_err(io)?;
        let modules = self
            .paths
            .build
            .join(format!("terraform/services/{service}/modules"));
        if modules.is_dir() {
            let to = base.join("modules");
            if to.exists() {
                std::fs::remove_dir_all(&to).map_err(io)?;
            }
            for (rel, bytes) in super::read_inputs(&modules) {
                write_under(&to, &rel, &bytes).map_err(io)?;
            }
        }
        for (rel, bytes) in files {
            write_under(&config_dir, rel, bytes).map_err(io)?;
        }
        let tf = Terraform {
            binary: crate::root::program_path(&self.paths.root, &self.project.terraform.binary),
            env: vec![self.trust_env()?],
        };
        let ws = Workspace {
            config_dir,
            data_dir: self
                .paths
                .terraform
                .join(terraform::workspace_slug(&step.id)),
        };
        let opts = StepOpts {
            apply_order: Vec::new(),
            timeout: Some(self.timeout),
            log: self.log_path(index),
            cancel: None,
            redact: self.redactions(),
            // Going back is held to the same rule as going forward.
            guard: Some(self.guard(step.phase, Some(service))),
        };
        let applied = tf
            .apply_step(&ws, &opts)
            .map_err(|e| scrub(&e.to_string(), &self.redactions()))?;
        let outputs: Vec<OutputValue> = applied
            .outputs
            .into_iter()
            .map(|o| OutputValue {
                name: o.name,
                value: o.value,
                sensitive: o.sensitive,
            })
            .collect();
        self.store_outputs(tf_index, step.phase, Some(service), &outputs)?;
        Ok(outputs)
    }
}

/// Snapshots around deploys (issue 14, docs/engine.md "Rollback"): taken through the PVE API
/// before a step changes a container's system, restored when its health gate fails.
impl StepExec<'_> {
    /// Snapshots the step's container (and the database host of a service that owns a
    /// database) before its deploy. `Err` is the step's failure (`required` mode); under
    /// `best-effort` a snapshot that cannot be taken is a warning.
    fn snapshot_before(
        &self,
        index: usize,
        service: &str,
        started: std::time::Instant,
    ) -> Result<(), Outcome> {
        use nixmox_core::model::SnapshotMode;
        use nixmox_core::snapshot;
        let Some(hook) = &self.snapshots else {
            return Ok(());
        };
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Ok(());
        };
        let targets = snapshot::targets(self.project, step.phase, s);
        if hook.policy.mode == SnapshotMode::Off || targets.is_empty() {
            return Ok(());
        }
        let required = hook.policy.mode == SnapshotMode::Required;
        let fail = |msg: String| Outcome::Failed {
            error: format!(
                "{}: {} (proxmox.snapshots.mode is `required`, so nothing was deployed)",
                step.id,
                scrub(&msg, &self.redactions())
            ),
            transient: false,
        };
        let client = match &hook.client {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("no snapshot before the deploy: {e}");
                if required {
                    return Err(fail(msg));
                }
                self.warn(index, format!("{}: {msg}; deploying without one", step.id));
                return Ok(());
            }
        };
        let deadline = started + self.timeout;
        let mut lines = Vec::new();
        let mut result = Ok(());
        for (target, kind) in targets {
            let name = snapshot::name(hook.run, kind, s.name.as_str());
            let vmid = target.host.vmid.get();
            let node = target.host.node.as_str();
            // A retried step (a transient deploy failure) keeps the snapshot of its first try.
            let already = self.taken.lock().is_ok_and(|t| {
                t.get(&index)
                    .is_some_and(|v| v.iter().any(|x| x.vmid == vmid && x.name == name))
            });
            if already {
                continue;
            }
            let t0 = std::time::Instant::now();
            match crate::proxmox::snapshot::take(
                client,
                node,
                vmid,
                &name,
                &snapshot::description(hook.run, &step.id),
                deadline,
            ) {
                Ok(waited) => {
                    if let Some((lock, d)) = waited {
                        lines.push(format!(
                            "CT {vmid} was locked ({lock}): waited {:.1}s for it",
                            d.as_secs_f64()
                        ));
                    }
                    lines.push(format!(
                        "snapshot {name} of CT {vmid} (`{}`) on {node}: taken in {:.2}s",
                        target.host.hostname,
                        t0.elapsed().as_secs_f64()
                    ));
                    if let Ok(mut t) = self.taken.lock() {
                        t.entry(index).or_default().push(Taken {
                            service: target.name.to_string(),
                            hostname: target.host.hostname.to_string(),
                            vmid,
                            node: node.to_string(),
                            name,
                            own: kind != snapshot::Kind::Db,
                        });
                    }
                }
                Err(e) => {
                    let msg = format!(
                        "snapshot of CT {vmid} (`{}`) on node {node}: {e}",
                        target.host.hostname
                    );
                    lines.push(msg.clone());
                    if required {
                        result = Err(fail(msg));
                        break;
                    }
                    self.warn(
                        index,
                        format!(
                            "{}: {msg}; deploying without it (proxmox.snapshots.mode: best-effort)",
                            step.id
                        ),
                    );
                }
            }
        }
        self.append_log(index, &lines);
        result
    }

    /// Restores the snapshots the step took (its own host first), starts the containers and
    /// checks the service's health again. `None`: no snapshot to go back to (or `--rollback
    /// generation`); `Err`: the own host's snapshot could not be restored.
    #[allow(clippy::type_complexity)]
    fn snapshot_back(
        &self,
        index: usize,
        s: &nixmox_core::model::Service,
    ) -> Option<Result<(Vec<String>, Vec<(u32, String)>), String>> {
        let hook = self.snapshots.as_ref()?;
        if !self.rollback.as_ref().is_some_and(|r| r.snapshot) {
            return None;
        }
        let mut taken: Vec<Taken> = self
            .taken
            .lock()
            .ok()
            .and_then(|t| t.get(&index).cloned())
            .unwrap_or_default();
        if !taken.iter().any(|t| t.own) {
            return None;
        }
        taken.sort_by_key(|t| !t.own);
        let client = hook.client.as_ref().ok()?;
        let deadline = std::time::Instant::now() + self.timeout;
        let mut done = Vec::new();
        let mut snaps = Vec::new();
        let mut lines = Vec::new();
        for t in &taken {
            let t0 = std::time::Instant::now();
            match crate::proxmox::snapshot::rollback(
                client, &t.node, t.vmid, &t.name, true, deadline,
            ) {
                Ok(_) => {
                    let what = format!(
                        "CT {} (`{}`) rolled back to snapshot {} and started",
                        t.vmid, t.hostname, t.name
                    );
                    lines.push(format!("{what} in {:.2}s", t0.elapsed().as_secs_f64()));
                    done.push(what);
                    snaps.push((t.vmid, t.name.clone()));
                }
                Err(e) if t.own => {
                    lines.push(format!("rollback to {} failed: {e}", t.name));
                    self.append_log(index, &lines);
                    return Some(Err(format!(
                        "CT {} (`{}`) not rolled back to snapshot {}: {e}",
                        t.vmid, t.hostname, t.name
                    )));
                }
                Err(e) => {
                    lines.push(format!("rollback to {} failed: {e}", t.name));
                    done.push(format!(
                        "CT {} (`{}`) NOT rolled back to snapshot {}: {e}",
                        t.vmid, t.hostname, t.name
                    ));
                }
            }
        }
        self.append_log(index, &lines);
        // The same gate again, now against the restored container.
        match self.health_gate(
            index,
            s.name.as_str(),
            std::time::Instant::now(),
            true,
            String::new(),
        ) {
            Outcome::Done { detail, .. } => {
                let detail = detail.trim_start_matches("; ").trim();
                done.push(if detail.is_empty() {
                    "no health checks to run again".to_string()
                } else {
                    format!("health after the rollback: {detail}")
                });
            }
            Outcome::Failed { error, .. } => {
                done.push(format!("health after the rollback: still failing: {error}"))
            }
        }
        Some(Ok((done, snaps)))
    }

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

/// The Proxmox API token, read from where `proxmox.token` says, if it is there.
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
