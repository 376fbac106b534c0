//! `nixmox graph`: the service graph or the step graph as a picture.

use nixmox_core::graph;
use nixmox_core::plan::{self, PlanInput, Selection};

use super::load_project;
use crate::cli::GraphFormat;
use crate::error::{Error, Result};
use crate::output;
use crate::root::ProjectRoot;

pub fn run(root: &ProjectRoot, steps: bool, format: GraphFormat) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let picture = if steps {
        let plan = plan::plan(project, &Selection::default(), &PlanInput::default());
        graph::steps(&plan)
    } else {
        graph::services(project)
    };
    // Checked before any layout is computed: both the work and the output are bounded.
    picture.check_size().map_err(|why| {
        Error::Usage(format!(
            "{why}; `nixmox plan` and `nixmox config SERVICE` show large projects in text"
        ))
    })?;
    let text = match format {
        GraphFormat::Dot => graph::to_dot(&picture),
        GraphFormat::Mermaid => graph::to_mermaid(&picture),
        GraphFormat::Svg => graph::to_svg(&picture),
    };
    output::data(&text)
}
