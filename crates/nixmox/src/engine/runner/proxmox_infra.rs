//! `tf:infra` with `infra.backend: proxmox-api`: the containers through the PVE API
//! (`crate::proxmox::step`), with the run's parallelism and the orphans it may destroy.

use std::path::Path;

use super::StepExec;
use crate::engine::scheduler::Outcome;

impl StepExec<'_> {
    pub(super) fn proxmox_infra(&self, index: usize) -> Outcome {
        // The project root is the directory holding `.nixmox/`.
        let root = self
            .paths
            .build
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let settings = crate::proxmox::step::StepSettings {
            parallel: self
                .infra
                .parallel
                .unwrap_or(self.project.deploy.parallel as usize)
                .max(1),
            timeout: self.timeout,
            remove_orphans: self.infra.remove_orphans.clone(),
        };
        crate::proxmox::step::run_infra(
            self.project,
            root,
            &self.log_path(index),
            &settings,
            &self.redactions(),
        )
    }
}
