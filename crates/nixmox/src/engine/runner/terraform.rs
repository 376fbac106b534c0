//! `tf:*` steps: one Terraform workspace each (`crate::terraform` runs it), with the
//! environment the step needs (the trust bundle, the Proxmox token for `tf:infra`, database
//! passwords for `tf:service-infra`), the destroy guard, and for `tf:infra` the containers
//! PVE must migrate first and the backup jobs after.

use std::ffi::OsString;

use nixmox_core::model::{InfraBackend, Service, TfPhase};
use nixmox_core::plan::{Phase, Step};
use nixmox_core::Project;

use super::{collect_strings, db_password_vars, lock, proxmox_token, StepExec, StepReport};
use crate::engine::scheduler::Outcome;
use crate::exec::scrub;
use crate::state::OutputValue;
use crate::terraform::{self, Applied, StepOpts, Terraform, TfError, Workspace};

impl StepExec<'_> {
    /// Applies the step's workspace: migrations first for `tf:infra`, then plan, guard and
    /// apply, then outputs into the secrets files and, for `tf:infra`, the backup jobs.
    pub(super) fn terraform(&self, index: usize, report: &mut StepReport) -> Outcome {
        let step = &self.plan.steps[index];
        let phase = step.phase();
        let Some(rel) = step.id.terraform_config_dir() else {
            return Outcome::Failed {
                error: format!("{}: not a Terraform step", step.id),
                transient: false,
            };
        };
        let config_dir = self.paths.build.join(rel);
        if phase == Phase::TfInfra && self.project.infra != InfraBackend::Terraform {
            return Outcome::Failed {
                error: format!(
                    "{}: infra.backend `{}` is not handled by the Terraform runner",
                    step.id,
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
        let (tf, ws, opts) = match self.terraform_setup(index, step, config_dir) {
            Ok(setup) => setup,
            Err(failed) => return failed,
        };
        // With the Terraform backend a container whose node changed is migrated through the
        // API and the state follows, before Terraform plans (which would otherwise replace it).
        let moved = if phase == Phase::TfInfra {
            match self.migrate_for_terraform(&tf, &ws, &opts) {
                Ok(moved) => moved,
                Err(error) => return self.failed(step, &error),
            }
        } else {
            Vec::new()
        };
        match tf.apply_step(&ws, &opts) {
            Ok(applied) => self.terraform_applied(index, applied, &ws, &opts, &moved, report),
            Err(e) => self.terraform_failed(step, e, report),
        }
    }

    /// The Terraform binary with the step's environment, its workspace (rendered configuration
    /// and data directory) and how it runs.
    fn terraform_setup(
        &self,
        index: usize,
        step: &Step,
        config_dir: std::path::PathBuf,
    ) -> Result<(Terraform, Workspace, StepOpts), Outcome> {
        let (phase, service) = (step.phase(), step.service());
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        match self.trust_env() {
            Ok(v) => env.push(v),
            Err(e) => {
                return Err(Outcome::Failed {
                    error: format!("{}: {e}", step.id),
                    transient: false,
                })
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
                Err(e) => return Err(self.failed(step, &e)),
            }
        }
        let tf = Terraform {
            binary: crate::root::program_path(&self.paths.root, &self.project.terraform.binary),
            env,
        };
        let data_dir = step
            .id
            .terraform_data_dir()
            .expect("a step with a configuration directory is Terraform's");
        let ws = Workspace {
            config_dir,
            data_dir: self.paths.terraform.join(data_dir),
        };
        let apply_order: Vec<String> = service
            .and_then(|s| self.project.service(s))
            .map(|s| {
                let want = if phase == Phase::TfServiceInfra {
                    TfPhase::ServiceInfra
                } else {
                    TfPhase::ServiceConfig
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
        Ok((tf, ws, opts))
    }

    /// After a successful apply: the outputs (sensitive ones into the secrets files and the
    /// redactions), the rendered inputs it used, and for `tf:infra` the backup jobs.
    fn terraform_applied(
        &self,
        index: usize,
        applied: Applied,
        ws: &Workspace,
        opts: &StepOpts,
        moved: &[String],
        report: &mut StepReport,
    ) -> Outcome {
        let step = &self.plan.steps[index];
        let phase = step.phase();
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
        lock(&self.redact).extend(sensitive);
        let stored = match self.store_outputs(index, phase, step.service(), &outputs) {
            Ok(note) => note,
            Err(e) => return self.failed(step, &e),
        };
        report.outputs = outputs;
        report.rendered = Some(crate::engine::read_inputs(&ws.config_dir));
        lock(&self.tf_ran).insert(index);
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
            match self.backup_jobs_for_terraform(opts) {
                Ok(jobs) => jobs,
                Err(error) => {
                    return self.failed(step, &format!("backup jobs (/cluster/backup): {error}"))
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

    /// A failed apply: a destroy-guard refusal is kept for the store; a transient failure
    /// (a state lock, the network) may be retried.
    fn terraform_failed(&self, step: &Step, e: TfError, report: &mut StepReport) -> Outcome {
        if let TfError::DestroyRefused { changes } = &e {
            report.refused = Some(changes.iter().map(|c| c.to_string()).collect());
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

    /// The destroy guard of a Terraform step.
    pub(super) fn guard(&self, phase: Phase, service: Option<&str>) -> terraform::Guard {
        use nixmox_core::model::TfPhase;
        let tf_phase = match phase {
            Phase::TfServiceInfra => Some(TfPhase::ServiceInfra),
            Phase::TfServiceConfig => Some(TfPhase::ServiceConfig),
            _ => None,
        };
        let service = service.and_then(|s| self.project.service(s));
        terraform::Guard {
            protection: nixmox_core::render::terraform::protection(service.zip(tf_phase)),
            allow_destroy: self.allow.allow_destroy,
            allow_deletes: phase == Phase::TfInfra && self.allow.delete_orphans,
        }
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
        let Some(vault) = &self.vault else {
            return Err("the passwords of its `mode: terraform` roles are in the secrets files, which this run cannot read".into());
        };
        let mut out = Vec::new();
        for (env, secret) in vars {
            let value = lock(vault)
                .generated(&secret)
                .map_err(|e| format!("cannot read `{secret}`: {e}"))?;
            lock(&self.redact).push(value.clone());
            out.push((OsString::from(env), OsString::from(value)));
        }
        Ok(out)
    }

    /// `SSL_CERT_FILE` for a Terraform process: the bundle of the project's trust set (the
    /// system's roots, the project CA, `proxmox.tls.ca_file`; src/pki.rs), rebuilt for each
    /// step because the project CA can appear during a run.
    pub(super) fn trust_env(&self) -> Result<(OsString, OsString), String> {
        crate::pki::terraform_env(&self.paths.root, self.project)
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
        let wanted = moved_containers(self.project, &recorded);
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
            let Some(g) = guests
                .iter()
                .find(|g| g.vmid == s.host.vmid.get() && g.kind == "lxc")
            else {
                // Gone: Terraform's refresh finds that out and plans it as it should.
                log(&format!(
                    "# CT {} ({}) is not in the cluster: left to Terraform",
                    s.host.vmid.get(),
                    s.name
                ));
                continue;
            };
            match self.migrate_one(&client, s, g, &log) {
                Ok(()) => {
                    let from = recorded
                        .iter()
                        .find(|(a, _, _)| *a == address)
                        .map(|(_, n, _)| n.clone())
                        .unwrap_or_default();
                    let (vmid, to) = (s.host.vmid.get(), &s.host.node);
                    done.push(format!("CT {vmid} {from} → {to}"));
                    moves.push(terraform::NodeMove {
                        address,
                        vmid,
                        node: to.clone(),
                    });
                }
                Err(failure) => failures.push(scrub(failure)),
            }
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

    /// Moves one container to the node its placement names, unless it is there already (after
    /// an interrupted run). Refuses a container without the project's tags. `Err` says why it
    /// was not moved.
    fn migrate_one(
        &self,
        client: &crate::proxmox::Client,
        s: &Service,
        g: &crate::proxmox::Guest,
        log: &dyn Fn(&str),
    ) -> Result<(), String> {
        let (vmid, to) = (s.host.vmid.get(), &s.host.node);
        if !(g.tags.iter().any(|t| t == "nixmox")
            && g.tags
                .iter()
                .any(|t| *t == self.project.name.as_str().to_lowercase()))
        {
            return Err(format!(
                "CT {vmid} ({}) on node {}: not moved to node {to}: it does not carry the tags `nixmox` and `{}`, so NixMox does not touch it",
                s.name, g.node, self.project.name
            ));
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
                return Err(format!(
                    "CT {vmid} ({}) on node {}: migrate to node {to}: {e}; it stays on node {}",
                    s.name, g.node, g.node
                ));
            }
        }
        Ok(())
    }
}

/// The project's containers whose node in the Terraform state differs from their placement
/// (same vmid), with their resource address.
fn moved_containers<'p>(
    project: &'p Project,
    recorded: &[(String, String, u32)],
) -> Vec<(&'p Service, String)> {
    project
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
        .collect()
}
