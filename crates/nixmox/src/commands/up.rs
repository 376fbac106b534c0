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
use crate::engine::events::{JsonLines, Live, Plain, Reporter};
use crate::engine::{self, UpOptions, UpResult};
use crate::error::{Error, Result};
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::{confirm, output, project_fs};

pub struct Args {
    pub services: Vec<String>,
    pub with_deps: bool,
    pub parallel: Option<usize>,
    pub dry_run: bool,
    pub force: bool,
    pub force_steps: Vec<String>,
    pub fail_fast: bool,
    pub timeout: String,
    pub json: bool,
    pub no_rollback: bool,
    /// `--rollback generation`: never restore a snapshot.
    pub generation_rollback: bool,
    pub rollback_core: bool,
    /// Destroy the project's containers no longer in it (`proxmox-api`), once listed and
    /// confirmed.
    pub remove_orphans: bool,
    /// Let the destroy guard pass deletes and replacements of protected resources.
    pub allow_destroy: bool,
    /// Confirmed without asking (`--yes`).
    pub yes: bool,
}

impl Args {
    /// A plain `nixmox up SERVICE...` with every flag at its default and no dependencies
    /// added: what another command runs after changing what those services deploy.
    pub fn redeploy(services: Vec<String>) -> Args {
        Args {
            services,
            with_deps: false,
            parallel: None,
            dry_run: false,
            force: false,
            force_steps: Vec::new(),
            fail_fast: false,
            timeout: "30m".into(),
            json: false,
            no_rollback: false,
            generation_rollback: false,
            rollback_core: false,
            remove_orphans: false,
            allow_destroy: false,
            yes: false,
        }
    }
}

pub fn run(root: &ProjectRoot, args: Args) -> Result<()> {
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
    let loaded = load_project_in(root, Ask::Nodes)?;
    let project = loaded
        .project
        .as_ref()
        .expect("load_project returns a project");
    select(project, &args.services)?;
    // Placements (and allocations) are recorded before anything is created, so that the next
    // run, and the next service added, finds every container where it was put.
    if loaded.lock_changed && !args.dry_run {
        project_fs::write_atomic(&root.join(LOCK_FILE), loaded.lock.render().as_bytes())?;
        output::note(&format!(
            "recorded the allocations and node placements in {LOCK_FILE} (commit it)"
        ));
    }
    let mut opts = UpOptions {
        services: args.services.clone(),
        with_deps: args.with_deps,
        parallel: args.parallel.unwrap_or(project.deploy.parallel as usize),
        force: args.force,
        force_steps: {
            let mut f = args.force_steps.clone();
            // Orphans are looked for by `tf:infra`: it runs even when nothing else changed.
            if args.remove_orphans && project.infra == InfraBackend::ProxmoxApi {
                f.push("tf:infra".into());
            }
            f
        },
        fail_fast: args.fail_fast,
        timeout,
        args: std::env::args().skip(1).collect(),
        rollback: !args.no_rollback,
        snapshot_rollback: !args.generation_rollback,
        rollback_core: args.rollback_core && !args.no_rollback,
        remove_orphans: Vec::new(),
        allow_destroy: args.allow_destroy,
        delete_orphans: args.remove_orphans,
    };
    // The orphans are listed, and confirmed, before anything runs; only those may go.
    if args.remove_orphans && project.infra == InfraBackend::ProxmoxApi {
        let list = orphans(root, project)?;
        if args.dry_run {
            output::note(list.render().trim_end());
        } else {
            confirm::destroy(&list, args.yes)?;
            opts.remove_orphans = list.containers.iter().map(|c| c.vmid).collect();
        }
    }
    let paths = Paths::new(root, project);
    if args.dry_run {
        let sel = Selection {
            services: args.services,
            with_deps: args.with_deps,
        };
        let (plan, _) = engine::plan_with_state(root, project, &sel, &paths)?;
        return output::data(&engine::dry_run(&plan, &opts));
    }
    // Ctrl-C stops new steps from starting; running ones finish (or time out) and are recorded.
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                output::note("interrupt again to stop waiting is not supported: running steps end at their timeout");
            } else {
                output::note("interrupted: no new steps start; waiting for running ones to finish");
            }
        });
    }
    let mut reporter: Box<dyn Reporter> = if args.json {
        Box::new(JsonLines)
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(Live::new(output::colour()))
    } else {
        Box::new(Plain)
    };
    match engine::up(root, project, &opts, reporter.as_mut(), cancel)? {
        UpResult::Success => Ok(()),
        UpResult::Interrupted => Err(Error::Interrupted),
        UpResult::Failed { failed } => Err(Error::RunFailed(format!(
            "{failed} step(s) failed; see `nixmox logs STEP` and `nixmox history`"
        ))),
    }
}

/// The project's containers no longer in it (`proxmox-api`), as the list `--remove-orphans`
/// confirms: read from the Proxmox API, nothing written.
fn orphans(root: &std::path::Path, project: &nixmox_core::Project) -> Result<Teardown> {
    use crate::proxmox::{connect, lifecycle, ClientOptions, Settings};
    let fail = |e: String| Error::RunFailed(format!("listing the orphaned containers: {e}"));
    let settings = Settings::from_project(project, root).map_err(|e| fail(e.to_string()))?;
    let client = connect(&settings, ClientOptions::default()).map_err(|e| fail(e.to_string()))?;
    let found = lifecycle::orphans(&client, project).map_err(|e| fail(e.to_string()))?;
    let mut list = Teardown::new(project, false);
    list.containers = found
        .into_iter()
        .map(|g| Container {
            vmid: g.vmid,
            node: g.node,
            name: g.name,
            via: Via::ProxmoxApi,
            // An orphan has no host in the project any more, so nothing can configure its
            // backup (issue 14 will say what applies to orphans).
            backup: Backup::NotConfigured,
        })
        .collect();
    Ok(list)
}
