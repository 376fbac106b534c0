//! The secrets files (src/secrets) around steps: a Terraform step's sensitive outputs go into
//! its host's file; a deploy first generates its host's secrets and records the file it
//! ships. Every value learnt joins the run's redactions.

use nixmox_core::plan::Phase;

use super::{lock, ShippedSecrets, StepExec, StepReport};
use crate::state::OutputValue;

impl StepExec<'_> {
    /// After a Terraform step: its sensitive outputs into the secrets file of its host. Returns
    /// a note for the step's detail.
    pub(super) fn store_outputs(
        &self,
        index: usize,
        phase: Phase,
        service: Option<&str>,
        outputs: &[OutputValue],
    ) -> Result<String, String> {
        let Some(vault) = &self.vault else {
            return Ok(String::new());
        };
        if !outputs.iter().any(|o| o.sensitive) {
            return Ok(String::new());
        }
        let Some(host) = crate::secrets::output_host(self.project, phase, service) else {
            return Ok(String::new());
        };
        let mut vault = lock(vault);
        vault.log = Some(self.log_path(index));
        let step_id = &self.plan.steps[index].id;
        // `tf:auth-core` also makes the OIDC clients of core services that use auth: each
        // `<service>_…` output belongs to that service's host (its `nix:core-auth` step ships
        // it), the rest to the identity provider's host.
        let mut outputs: Vec<OutputValue> = outputs.to_vec();
        let mut notes = Vec::new();
        if phase == Phase::TfAuthCore {
            let (rest, core_notes) = self.store_core_clients(&mut vault, step_id, outputs)?;
            outputs = rest;
            notes = core_notes;
        }
        let result = vault.absorb_outputs(step_id, &host, service, &outputs);
        self.learn(vault.known_values());
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
    pub(super) fn secrets_before_deploy(
        &self,
        index: usize,
        host: &str,
        report: &mut StepReport,
    ) -> Result<(), String> {
        let Some(vault) = &self.vault else {
            return Ok(());
        };
        let mut vault = lock(vault);
        vault.log = Some(self.log_path(index));
        let result = vault.before_deploy(host);
        self.learn(vault.known_values());
        let file_hash = result.map_err(|e| format!("secrets of `{host}`: {e}"))?;
        report.secrets = Some(ShippedSecrets { file_hash });
        Ok(())
    }

    /// `tf:auth-core` also makes the OIDC clients of core services that use auth: each
    /// `<service>_…` output belongs to that service's host (its `nix:core-auth` step ships
    /// it). Stores those; returns the outputs left for the identity provider's host, and
    /// notes for the step's detail.
    fn store_core_clients(
        &self,
        vault: &mut crate::secrets::Vault,
        step_id: &str,
        mut outputs: Vec<OutputValue>,
    ) -> Result<(Vec<OutputValue>, Vec<String>), String> {
        let mut notes = Vec::new();
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
        Ok((outputs, notes))
    }
}
