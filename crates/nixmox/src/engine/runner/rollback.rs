//! Rollback of a deploy whose health gate failed (docs/engine.md, "Rollback"): the host back
//! to the snapshot taken before the deploy (else its previous generation), and the
//! service's Terraform steps that applied in this run re-applied from their previous inputs.
//! The step fails either way; its report says what was restored.

use std::collections::BTreeMap;
use std::path::Path;

use nixmox_core::deploy;
use nixmox_core::model::{Deployer, Service};
use nixmox_core::plan::Phase;

use super::{lock, write_under, Restored, RolledBack, StepExec, StepReport};
use crate::engine::scheduler::Outcome;
use crate::exec::{self, scrub, Cmd, RunOpts};
use crate::state::OutputValue;
use crate::terraform::{StepOpts, Terraform, Workspace};

/// What the parts of a rollback did: what was restored, what could not be.
#[derive(Default)]
struct Restoring {
    done: Vec<String>,
    problems: Vec<String>,
}

impl StepExec<'_> {
    pub(super) fn rolls_back(&self, phase: Phase) -> bool {
        match (&self.rollback, phase) {
            (Some(r), Phase::NixServiceConfig) => r.services,
            (Some(r), Phase::NixCore | Phase::NixCoreAuth) => r.core,
            _ => false,
        }
    }

    /// Restores the service's host and re-applies its Terraform steps that ran in this run
    /// from their previous inputs. The step fails either way; the error says what was
    /// restored, and the report keeps it for the store.
    pub(super) fn roll_back(
        &self,
        index: usize,
        service: &str,
        error: String,
        report: &mut StepReport,
    ) -> Outcome {
        let mut r = Restoring::default();
        let mut to_snapshots = Vec::new();
        if let Some(s) = self.project.service(service) {
            to_snapshots = self.restore_host(index, s, report, &mut r);
        }
        let restored = self.restore_terraform(index, service, &mut r);
        let any = !r.done.is_empty();
        let mut detail = if any {
            r.done.join("; ")
        } else {
            "nothing restored".to_string()
        };
        if !r.problems.is_empty() {
            detail = format!("{detail} (rollback incomplete: {})", r.problems.join("; "));
        }
        let detail = scrub(&detail, &self.redactions());
        report.rollback = Some(RolledBack {
            detail: detail.clone(),
            restored,
            any,
            snapshots: to_snapshots,
            reason: scrub(&error, &self.redactions()),
        });
        Outcome::Failed {
            error: format!("{error}; rolled back: {detail}"),
            transient: false,
        }
    }

    /// The host: the snapshot taken before the deploy, when there is one (the whole
    /// container, data included, through the PVE API: no network path to the host needed),
    /// else its previous generation. Returns the snapshots rolled back to.
    fn restore_host(
        &self,
        index: usize,
        s: &Service,
        report: &StepReport,
        r: &mut Restoring,
    ) -> Vec<(u32, String)> {
        match self.snapshot_back(index, s, &report.snapshots) {
            Some(Ok((what, snaps))) => {
                r.done.extend(what);
                return snaps;
            }
            Some(Err(e)) => r.problems.push(e),
            None => {}
        }
        match self.switch_back(index, s) {
            Ok(Some(what)) => r.done.push(what),
            Ok(None) => r.problems.push(format!(
                "{} not switched back: the deployer has no rollback command",
                s.host.hostname
            )),
            Err(e) => r.problems.push(e),
        }
        Vec::new()
    }

    /// The service's Terraform steps that applied in this run, re-applied from the inputs of
    /// their last successful run before it.
    fn restore_terraform(&self, index: usize, service: &str, r: &mut Restoring) -> Vec<Restored> {
        let mut restored = Vec::new();
        let ran: Vec<usize> = lock(&self.tf_ran).iter().copied().collect();
        for j in ran {
            let step = &self.plan.steps[j];
            if step.service() != Some(service)
                || !matches!(step.phase(), Phase::TfServiceInfra | Phase::TfServiceConfig)
            {
                continue;
            }
            let Some((record, files)) = self
                .rollback
                .as_ref()
                .and_then(|r| r.previous.get(&step.id))
            else {
                r.problems.push(format!(
                    "{} not restored: no earlier successful inputs recorded",
                    step.id
                ));
                continue;
            };
            match self.reapply(index, j, service, files) {
                Ok(outputs) => {
                    r.done
                        .push(format!("{} re-applied from its previous inputs", step.id));
                    restored.push(Restored {
                        step_id: step.id.clone(),
                        record: record.clone(),
                        rendered: files.clone(),
                        outputs,
                    });
                }
                Err(e) => r.problems.push(format!("{} not restored: {e}", step.id)),
            }
        }
        restored
    }

    /// The host back to its previous generation. `Ok(None)`: the deployer has no way back.
    fn switch_back(&self, index: usize, s: &Service) -> Result<Option<String>, String> {
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
        // `.nixmox/rollback/terraform/services/S/{infra,config}`.
        let rel = step
            .id
            .terraform_config_dir()
            .ok_or_else(|| format!("{} is not a Terraform step", step.id))?;
        let config_dir = dot.join("rollback").join(rel);
        let base = config_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dot.join("rollback"));
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
            for (rel, bytes) in crate::engine::read_inputs(&modules) {
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
                .join(step.id.terraform_data_dir().unwrap_or_default()),
        };
        let opts = StepOpts {
            apply_order: Vec::new(),
            timeout: Some(self.timeout),
            log: self.log_path(index),
            cancel: None,
            redact: self.redactions(),
            // Going back is held to the same rule as going forward.
            guard: Some(self.guard(step.phase(), Some(service))),
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
        self.store_outputs(tf_index, step.phase(), Some(service), &outputs)?;
        Ok(outputs)
    }
}
