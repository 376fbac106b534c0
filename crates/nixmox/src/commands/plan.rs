//! `nixmox plan`: the step graph, what changes and why.

use std::path::Path;

use nixmox_core::plan::{self, PlanInput, Selection};
use nixmox_core::plan_out;
use nixmox_core::record::Record;

use super::config::select;
use super::load_project;
use crate::cli::PlanFormat;
use crate::error::{Error, Result};
use crate::{output, project_fs};

pub fn run(
    root: &Path,
    services: &[String],
    with_deps: bool,
    format: PlanFormat,
    detailed: bool,
) -> Result<()> {
    let loaded = load_project(root)?;
    let project = loaded
        .project
        .as_ref()
        .expect("load_project returns a project");
    select(project, services)?;
    let files = project_fs::digests(root, project);
    // Until the engine records runs, every step is planned against an empty record.
    let record = Record::default();
    let plan = plan::plan(
        project,
        &Selection {
            services: services.to_vec(),
            with_deps,
        },
        &PlanInput {
            record: Some(&record),
            files: Some(&files),
        },
    );
    let text = match format {
        PlanFormat::Text => plan_out::to_text(&plan),
        PlanFormat::Json => plan_out::to_json(&plan),
    };
    output::data(&text)?;
    if detailed && plan.has_changes() {
        return Err(Error::Changes);
    }
    Ok(())
}
