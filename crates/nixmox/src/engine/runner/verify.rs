//! Health: the gate after a deploy (the service's startup, then readiness checks) and
//! `verify:*` steps (its checks and the end-to-end probes of what it is wired to), both
//! through `crate::health`.

use nixmox_core::plan::Phase;
use nixmox_core::step_id::StepId;

use super::StepExec;
use crate::engine::scheduler::Outcome;
use crate::exec::scrub;

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

    pub(super) fn health_gate(
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

    pub(super) fn verify(
        &self,
        index: usize,
        service: &str,
        started: std::time::Instant,
    ) -> Outcome {
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
            let data_dir = StepId::of_service(Phase::TfServiceInfra, &s.name)
                .ok()
                .and_then(|id| id.terraform_data_dir())
                .unwrap_or_default();
            let state_file = self
                .paths
                .terraform
                .join(data_dir)
                .join("terraform.tfstate");
            let state = std::fs::read_to_string(&state_file).ok();
            match crate::health::verify::redirects_registered(state.as_deref(), s)
                .map_err(|e| e.to_string())?
            {
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
