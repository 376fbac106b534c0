//! One module per command; `run` dispatches.

mod config;
mod down;
mod drift;
mod graph;
mod history;
mod init;
mod lock;
mod plan;
mod ps;
mod render;
mod schema;
mod secrets;
mod template;
mod up;
mod validate;

use std::path::Path;

use nixmox_core::Loaded;

use crate::cli::{Cli, Command};
use crate::error::{Error, Result};
use crate::root::ProjectRoot;
use crate::{output, project_fs};

pub fn run(cli: Cli) -> Result<()> {
    // Commands that need no existing project come first; every other command resolves the
    // project directory once, to an absolute path, before anything else (see `root`).
    let command = match cli.command {
        Command::Schema { kind, out } => return schema::run(kind, out.as_deref()),
        Command::Init { dir, name, domain } => {
            return init::run(
                dir.as_deref().unwrap_or(cli.project.as_path()),
                name.as_deref(),
                &domain,
            )
        }
        other => other,
    };
    let root = &ProjectRoot::resolve(&cli.project)?;
    match command {
        Command::Validate { locked } => validate::run(root, locked),
        Command::Config { format, services } => config::run(root, format, &services),
        Command::Lock { allocations_only } => lock::run(root, allocations_only),
        Command::Update { inputs } => lock::update(root, &inputs),
        Command::Plan {
            services,
            no_deps,
            format,
            detailed_exitcode,
        } => plan::run(root, &services, !no_deps, format, detailed_exitcode),
        Command::Graph { steps, format } => graph::run(root, steps, format),
        Command::Render { out } => render::run(root, &out),
        Command::Up {
            services,
            no_deps,
            parallel,
            dry_run,
            force,
            force_step,
            fail_fast,
            timeout,
            format,
            no_rollback,
            rollback_core,
            remove_orphans,
            allow_destroy,
            yes,
        } => up::run(
            root,
            up::Args {
                services,
                with_deps: !no_deps,
                parallel,
                dry_run,
                force,
                force_steps: force_step,
                fail_fast,
                timeout,
                json: format == crate::cli::PlanFormat::Json,
                no_rollback,
                rollback_core,
                remove_orphans,
                allow_destroy,
                yes,
            },
        ),
        Command::History { limit, format } => history::history(root, limit, format),
        Command::Ps {
            services,
            format,
            timeout,
        } => ps::run(root, &services, format, &timeout),
        Command::Drift { format } => drift::run(root, format),
        Command::Down {
            services,
            keep_host,
            purge_data,
            yes,
            dry_run,
            no_backup,
        } => down::run(
            root,
            down::Args {
                services,
                keep_host,
                purge_data,
                yes,
                dry_run,
                no_backup,
            },
        ),
        Command::Logs { step } => history::logs(root, &step),
        Command::Unlock => history::unlock(root),
        Command::Schema { .. } | Command::Init { .. } => unreachable!("handled above"),
        Command::Template { action } => match action {
            crate::cli::TemplateAction::Upload {
                file,
                storage,
                force,
            } => template::upload(root, &file, storage.as_deref(), force),
            crate::cli::TemplateAction::List { storage, format } => {
                template::list(root, storage.as_deref(), format)
            }
        },
        Command::Secrets { action } => secrets::run(root, action),
    }
}

/// Reads and validates the project, printing every diagnostic. Errors end the command with
/// exit code 2; warnings are printed and the project is returned.
pub fn load_project(root: &Path) -> Result<Loaded> {
    let read = project_fs::read_project(root)?;
    let mut loaded = load_sources(root, &read);
    loaded.diagnostics.extend(read.diagnostics);
    if let Some(project) = &loaded.project {
        let unsafe_paths = project_fs::check_written_paths(root, project);
        if !unsafe_paths.is_empty() {
            loaded.diagnostics.extend(unsafe_paths);
            loaded.project = None;
        }
    }
    output::diagnostics(&loaded.diagnostics);
    let errors = loaded.errors().count();
    if errors > 0 || loaded.project.is_none() {
        output::note(&format!(
            "{} in `{}`",
            plural(errors.max(1), "error"),
            root.display()
        ));
        return Err(Error::Reported { count: errors });
    }
    Ok(loaded)
}

/// The core's `load` over sources read from `root`, with what only the shell can settle:
/// relative flake input paths made absolute (they are relative to the project, and Nix runs
/// elsewhere). Every command loads through here.
pub fn load_sources(root: &Path, read: &project_fs::Read) -> Loaded {
    let probe = read.probe(root);
    let mut loaded = nixmox_core::load_probed(&read.sources, &probe);
    if let Some(p) = loaded.project.as_mut() {
        crate::flake::absolutize_inputs(p, root);
    }
    loaded
}

pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
