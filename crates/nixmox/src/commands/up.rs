//! `nixmox up`: render, plan against the recorded state, execute.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixmox_core::decode::parse_duration_ms;
use nixmox_core::model::InfraBackend;
use nixmox_core::plan::Selection;
use nixmox_core::teardown::{Backup, Container, Teardown, Via};

use super::config::select;
use nixmox_core::lock::LOCK_FILE;

use super::{load_project_in, Ask};
use crate::cli::{PlanFormat, RollbackArg, UpArgs};
use crate::engine::events::{JsonLines, Live, Plain, Reporter};
use crate::engine::{self, UpOptions, UpResult};
use crate::error::{Error, Result};
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::{confirm, output, project_fs};

/// `nixmox up`: the arguments lowered into the engine's options, the project loaded, the
/// orphans confirmed, then a dry run or the run itself.
pub fn run(root: &ProjectRoot, args: &UpArgs) -> Result<()> {
    let mut opts = options(args)?;
    let loaded = load_project_in(root, Ask::Nodes)?;
    let project = &loaded.project;
    select(project, &args.services)?;
    // Placements (and allocations) are recorded before anything is created, so that the next
    // run, and the next service added, finds every container where it was put.
    if loaded.lock_changed && !args.dry_run {
        project_fs::write_atomic(&root.join(LOCK_FILE), loaded.lock.render().as_bytes())?;
        output::note(&format!(
            "recorded the allocations and node placements in {LOCK_FILE} (commit it)"
        ));
    }
    // The orphans are listed, and confirmed, before anything runs; only those may go. They
    // are looked for by `tf:infra`: it runs even when nothing else changed.
    if args.remove_orphans && project.infra == InfraBackend::ProxmoxApi {
        opts.force_steps.push(crate::proxmox::step::step_id());
        let list = orphans(root, project)?;
        if args.dry_run {
            output::note(list.render().trim_end());
        } else {
            confirm::destroy(&list, args.yes)?;
            opts.remove_orphans = list.containers.iter().map(|c| c.vmid).collect();
        }
    }
    if args.dry_run {
        let paths = Paths::new(root, project);
        let (plan, _) = engine::plan_with_state(root, project, &opts.selection, &paths)?;
        return output::data(&engine::dry_run(&plan, &opts));
    }
    let mut reporter = reporter(args.format);
    match engine::up(root, project, &opts, reporter.as_mut(), cancel_on_ctrl_c())? {
        UpResult::Success => Ok(()),
        UpResult::Interrupted => Err(Error::Interrupted),
        UpResult::Failed { failed } => Err(Error::StepsFailed { failed }),
    }
}

/// Lowers `up`'s arguments into the engine's options, once: the flags' meaning settled here
/// (`--rollback none` is `--no-rollback`, `--rollback-core` needs rollback on), the values
/// checked. What the command itself acts on (`--dry-run`, `--yes`, `--format`) stays in the
/// arguments; the orphans confirmed are added once listed.
pub fn options(args: &UpArgs) -> Result<UpOptions> {
    let timeout = parse_duration_ms(&args.timeout)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Error::Usage(format!(
                "invalid --timeout `{}`: use a duration like 30m or 90s",
                args.timeout
            ))
        })?;
    if args.parallel == Some(0) {
        return Err(Error::Usage("--parallel must be at least 1".into()));
    }
    let no_rollback = args.no_rollback || args.rollback == Some(RollbackArg::None);
    Ok(UpOptions {
        selection: Selection {
            services: args.services.clone(),
            with_deps: !args.no_deps,
        },
        parallel: args.parallel,
        force: args.force,
        // A `--force-step` that is no step id forces nothing, as one no plan holds.
        force_steps: args
            .force_step
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        fail_fast: args.fail_fast,
        timeout,
        args: std::env::args().skip(1).collect(),
        rollback: !no_rollback,
        snapshot_rollback: args.rollback != Some(RollbackArg::Generation),
        rollback_core: args.rollback_core && !no_rollback,
        remove_orphans: Vec::new(),
        allow_destroy: args.allow_destroy,
        delete_orphans: args.remove_orphans,
    })
}

/// Ctrl-C stops new steps from starting; running ones finish (or time out) and are recorded.
fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            output::note("interrupt again to stop waiting is not supported: running steps end at their timeout");
        } else {
            output::note("interrupted: no new steps start; waiting for running ones to finish");
        }
    });
    cancel
}

/// JSON lines with `--format json`; else a live view on a terminal, plain lines without one.
fn reporter(format: PlanFormat) -> Box<dyn Reporter> {
    if format == PlanFormat::Json {
        Box::new(JsonLines)
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(Live::new(output::colour()))
    } else {
        Box::new(Plain)
    }
}

/// The project's containers no longer in it (`proxmox-api`), as the list `--remove-orphans`
/// confirms: read from the Proxmox API, nothing written.
fn orphans(root: &std::path::Path, project: &nixmox_core::Project) -> Result<Teardown> {
    use crate::proxmox::{connect, lifecycle, ClientOptions, Settings};
    let fail = || Error::pve_during("listing the orphaned containers");
    let settings = Settings::from_project(project, root).map_err(fail())?;
    let client = connect(&settings, ClientOptions::default()).map_err(fail())?;
    let found = lifecycle::orphans(&client, project).map_err(fail())?;
    let mut list = Teardown::new(project, false);
    list.containers = found
        .into_iter()
        .map(|g| Container {
            vmid: g.vmid,
            node: g.node,
            name: g.name,
            via: Via::ProxmoxApi,
            // An orphan has no host in the project any more, so nothing configures its
            // backup: it is listed, and destroyed, without one.
            backup: Backup::NotConfigured,
        })
        .collect();
    Ok(list)
}
