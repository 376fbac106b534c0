//! `nixmox plan`: the step graph, what changes and why.

use nixmox_core::plan::Selection;
use nixmox_core::plan_out;

use super::config::select;
use super::load_project;
use crate::cli::PlanFormat;
use crate::engine;
use crate::error::{Error, Result};
use crate::output;
use crate::root::Paths;
use crate::root::ProjectRoot;

pub fn run(
    root: &ProjectRoot,
    services: &[String],
    with_deps: bool,
    format: PlanFormat,
    detailed: bool,
) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    select(project, services)?;
    let sel = Selection {
        services: services.to_vec(),
        with_deps,
    };
    let (plan, _) = engine::plan_with_state(root, project, &sel, &Paths::new(root, project))?;
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
