//! How a plan is shown: text for people, JSON for programs (documented in docs/plan-json.md).

use std::fmt::Write as _;

use serde::Serialize;

use crate::diag::visible;
use crate::plan::{Action, Change, Phase, Plan};

/// Version of the plan's JSON format.
pub const VERSION: u32 = 1;

#[derive(Serialize)]
struct JsonPlan<'a> {
    version: u32,
    project: &'a str,
    selection: Option<&'a [String]>,
    summary: JsonSummary,
    steps: Vec<JsonStep<'a>>,
    critical_path: Vec<&'a str>,
}

#[derive(Serialize)]
struct JsonSummary {
    steps: usize,
    run: usize,
    noop: usize,
    create: usize,
    update: usize,
    unchanged: usize,
    delete: usize,
}

#[derive(Serialize)]
struct JsonStep<'a> {
    id: &'a str,
    phase: &'static str,
    service: Option<&'a str>,
    after: Vec<&'a str>,
    action: &'static str,
    change: &'static str,
    description: &'a str,
    reasons: &'a [String],
    hash: &'a str,
    /// Only when known: the destroy guard refused the step's last plan.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    needs_allow_destroy: &'a [String],
    /// Only when held: it failed its gate and was rolled back with this input.
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<&'a str>,
}

fn summary(plan: &Plan) -> JsonSummary {
    JsonSummary {
        steps: plan.steps.len(),
        run: plan
            .steps
            .iter()
            .filter(|s| s.action == Action::Run)
            .count(),
        noop: plan
            .steps
            .iter()
            .filter(|s| s.action == Action::Noop)
            .count(),
        create: plan.count(Change::Create),
        update: plan.count(Change::Update),
        unchanged: plan.count(Change::Unchanged),
        delete: plan.count(Change::Delete),
    }
}

pub fn to_json(plan: &Plan) -> String {
    let out = JsonPlan {
        version: VERSION,
        project: &plan.project,
        selection: plan.selection.as_deref(),
        summary: summary(plan),
        steps: plan
            .steps
            .iter()
            .map(|s| JsonStep {
                id: &s.id,
                phase: s.phase().as_str(),
                service: s.service(),
                after: s.after.iter().map(|&a| plan.steps[a].id.as_str()).collect(),
                action: s.action.as_str(),
                change: s.change.as_str(),
                description: &s.description,
                reasons: &s.reasons,
                hash: &s.hash,
                needs_allow_destroy: &s.needs_allow_destroy,
                held: s.held.as_deref(),
            })
            .collect(),
        critical_path: plan
            .critical_path
            .iter()
            .map(|&i| plan.steps[i].id.as_str())
            .collect(),
    };
    let mut s = serde_json::to_string_pretty(&out).expect("plan JSON always serializes");
    s.push('\n');
    s
}

/// The line a step refused by the destroy guard gets in the text plan and the dry run.
pub fn allow_destroy_note(refused: &[String]) -> Option<String> {
    (!refused.is_empty()).then(|| {
        format!(
            "needs --allow-destroy: its last run was refused because the plan would delete or replace {}",
            refused.join(", ")
        )
    })
}

/// The plan as text: phases in order, each step with what it does and what it waits for.
pub fn to_text(plan: &Plan) -> String {
    let mut out = String::new();
    let sum = summary(plan);
    let _ = writeln!(
        out,
        "Plan for project `{}`: {} steps ({} run, {} no-op): {} to create, {} to update, {} unchanged{}",
        visible(&plan.project),
        sum.steps,
        sum.run,
        sum.noop,
        sum.create,
        sum.update,
        sum.unchanged,
        if sum.delete > 0 { format!(", {} orphaned", sum.delete) } else { String::new() }
    );
    // Names and reasons can come from recorded state as well as from validated manifests;
    // every one goes through `visible` so none can forge a line or drive the terminal.
    if let Some(sel) = &plan.selection {
        let _ = writeln!(
            out,
            "Selected services (with their dependencies): {}",
            visible(&sel.join(", "))
        );
    }
    let width = plan.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let mut last_phase: Option<&str> = None;
    let mut last_service: Option<&str> = None;
    for s in &plan.steps {
        let group = match s.phase() {
            Phase::TfServiceInfra
            | Phase::NixServiceConfig
            | Phase::TfServiceConfig
            | Phase::Verify
                if s.change != Change::Delete =>
            {
                "services, in dependency order"
            }
            _ if s.change == Change::Delete => "orphans (recorded, no longer in the project)",
            p => p.as_str(),
        };
        if last_phase != Some(group) {
            let _ = writeln!(out, "\n== {group}");
            last_phase = Some(group);
            last_service = None;
        }
        if group.starts_with("services") && last_service != s.service() {
            let _ = writeln!(out, "  [{}]", visible(s.service().unwrap_or("")));
            last_service = s.service();
        }
        let indent = if group.starts_with("services") {
            "    "
        } else {
            "  "
        };
        let _ = writeln!(
            out,
            "{indent}{} {:<width$}  {:<4}  {}",
            s.change.symbol(),
            visible(&s.id),
            s.action.as_str(),
            visible(&s.description),
        );
        if !s.after.is_empty() {
            let after: Vec<&str> = s.after.iter().map(|&a| plan.steps[a].id.as_str()).collect();
            let _ = writeln!(
                out,
                "{indent}  {:width$}  waits for: {}",
                "",
                visible(&after.join(", "))
            );
        }
        for r in &s.reasons {
            let _ = writeln!(out, "{indent}  {:width$}  because {}", "", visible(r));
        }
        if let Some(note) = allow_destroy_note(&s.needs_allow_destroy) {
            let _ = writeln!(out, "{indent}  {:width$}  {note}", "");
        }
        if let Some(note) = &s.held {
            let _ = writeln!(out, "{indent}  {:width$}  held: {}", "", visible(note));
        }
    }
    let path: Vec<&str> = plan
        .critical_path
        .iter()
        .map(|&i| plan.steps[i].id.as_str())
        .collect();
    let _ = writeln!(
        out,
        "\nCritical path ({} steps): {}",
        path.len(),
        visible(&path.join(" -> "))
    );
    let _ = writeln!(out, "Legend: + create, ~ update, = unchanged, - orphaned; `noop` steps have nothing to do and are skipped at once.");
    out
}
