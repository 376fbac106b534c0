//! `nixmox config`: the resolved project on stdout.

use nixmox_core::config_out;
use nixmox_core::diag::did_you_mean;

use super::load_project;
use crate::cli::ConfigFormat;
use crate::error::{Error, Result};
use crate::output;
use crate::root::ProjectRoot;

pub fn run(root: &ProjectRoot, format: ConfigFormat, services: &[String]) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let only = select(project, services)?;
    match format {
        ConfigFormat::Yaml => {
            let value = config_out::resolved(project, &only);
            output::data(&nixmox_core::yaml_out::to_yaml(&value))
        }
        // Streamed: one service's value at a time (5,000 services would otherwise hold the
        // whole tree and its text at once).
        ConfigFormat::Json => output::data_with(|w| config_out::write_json(project, &only, w)),
    }
}

/// Indexes of the named services; an unknown name is a usage error with a suggestion.
pub fn select(project: &nixmox_core::Project, names: &[String]) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for n in names {
        match project.index_of(n) {
            Some(i) => out.push(i),
            None => {
                let hint = did_you_mean(n, project.services.iter().map(|s| s.name.as_str()))
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                return Err(Error::Usage(format!(
                    "no service named `{n}` in this project{hint}"
                )));
            }
        }
    }
    Ok(out)
}
