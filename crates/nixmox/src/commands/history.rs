//! `nixmox history`, `nixmox logs STEP`, `nixmox unlock`: reading and repairing the state.

use super::load_project;
use crate::cli::PlanFormat;
use crate::error::{Error, Result};
use crate::output;
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::state::Store;

fn store(root: &ProjectRoot) -> Result<Store> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let paths = Paths::new(root, project);
    Ok(Store::open(&paths.state_db)?)
}

pub fn history(root: &ProjectRoot, limit: usize, format: PlanFormat) -> Result<()> {
    let store = store(root)?;
    let runs = store.runs(limit)?;
    if format == PlanFormat::Json {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| serde_json::json!({"id": r.id, "started_at": r.started_at, "finished_at": r.finished_at, "user": r.user, "hostname": r.hostname, "args": r.args, "result": r.result, "summary": r.summary}))
            .collect();
        let mut text =
            serde_json::to_string_pretty(&serde_json::json!({"version": 1, "runs": rows}))
                .unwrap_or_default();
        text.push('\n');
        return output::data(&text);
    }
    if runs.is_empty() {
        output::note("no runs recorded yet");
        return Ok(());
    }
    let mut text = format!(
        "{:<5}  {:<25}  {:<12}  {:<14}  {}\n",
        "RUN", "STARTED", "RESULT", "USER", "SUMMARY"
    );
    for r in &runs {
        text.push_str(&format!(
            "{:<5}  {:<25}  {:<12}  {:<14}  {}\n",
            r.id,
            r.started_at,
            r.result,
            format!("{}@{}", r.user, r.hostname),
            r.summary
        ));
    }
    output::data(&text)
}

pub fn logs(root: &ProjectRoot, step: &str) -> Result<()> {
    let store = store(root)?;
    match store.last_log(step)? {
        Some((run, path)) => {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
            output::note(&format!("log of {step} from run {run} ({})", path.display()));
            output::data(&text)
        }
        None => Err(Error::Usage(format!("no log recorded for step `{step}`; step ids look like `tf:infra` or `nix:service-config:app` (see `nixmox plan`)"))),
    }
}

pub fn unlock(root: &ProjectRoot) -> Result<()> {
    let mut store = store(root)?;
    match store.force_unlock()? {
        Some(h) => output::note(&format!(
            "removed the lock of pid {} on {} (since {}, `{}`)",
            h.pid, h.hostname, h.started_at, h.command
        )),
        None => output::note("no lock was held"),
    }
    Ok(())
}
