//! One module per command; `run` dispatches.

mod completion;
mod config;
mod down;
mod drift;
mod graph;
mod history;
mod init;
mod lock;
mod plan;
mod ps;
mod rebalance;
mod render;
mod schema;
mod secrets;
mod snapshot;
mod template;
mod up;
mod validate;

use std::path::Path;

use nixmox_core::{Loaded, Project};

use crate::cli::{Cli, Command};
use crate::error::{Error, Result};
use crate::root::ProjectRoot;
use crate::{output, project_fs};

pub fn run(cli: Cli) -> Result<()> {
    // Commands that need no existing project come first; every other command resolves the
    // project directory once, to an absolute path, before anything else (see `root`).
    match cli.command {
        Command::Schema { kind, out } => schema::run(kind, out.as_deref()),
        Command::Completion {
            shell,
            static_script,
        } => completion::run(shell, static_script),
        Command::Man { out } => completion::man(out.as_deref()),
        Command::Init { dir, name, domain } => init::run(
            dir.as_deref().unwrap_or(cli.project.as_path()),
            name.as_deref(),
            &domain,
        ),
        command => in_project(&ProjectRoot::discover(&cli.project)?, command),
    }
}

/// The commands that work on an existing project. A flat dispatch: one arm per command, each
/// handing its arguments to its module.
fn in_project(root: &ProjectRoot, command: Command) -> Result<()> {
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
        Command::Up(args) => up::run(root, &args),
        Command::History { limit, format } => history::history(root, limit, format),
        Command::Ps {
            services,
            format,
            timeout,
        } => ps::run(root, &services, format, &timeout),
        Command::Drift { format } => drift::run(root, format),
        Command::Rebalance { yes } => rebalance::run(root, yes),
        Command::Down(args) => down::run(root, args),
        Command::Logs { step } => history::logs(root, &step),
        Command::Unlock => history::unlock(root),
        Command::Template { action } => template::run(root, action),
        Command::Secrets { action } => secrets::run(root, action),
        Command::Backup {
            service,
            storage,
            mode,
        } => snapshot::backup(root, &service, storage.as_deref(), mode.as_deref()),
        Command::Restore { service, from, yes } => snapshot::restore(root, &service, &from, yes),
        Command::Snapshot { action } => snapshot::run(root, action),
        Command::Schema { .. }
        | Command::Init { .. }
        | Command::Completion { .. }
        | Command::Man { .. } => unreachable!("`run` handles the commands that need no project"),
    }
}

/// A project that loaded without errors: what every command but `init`, `schema` and the
/// completions works on. Its warnings were printed while loading.
pub struct Valid {
    pub project: Project,
    /// The lock as it should be after this load's allocations.
    pub lock: nixmox_core::lock::Lock,
    /// True when `lock` differs from the lock file on disk (or there is none and it is needed).
    pub lock_changed: bool,
    /// How many warnings were printed.
    pub warnings: usize,
}

impl Valid {
    /// The project out of a load that found no error; `None` when there is none.
    fn of(loaded: Loaded) -> Option<Valid> {
        let warnings = loaded.warnings().count();
        Some(Valid {
            project: loaded.project?,
            lock: loaded.lock,
            lock_changed: loaded.lock_changed,
            warnings,
        })
    }
}

/// Reads and validates the project, printing every diagnostic. Errors end the command with
/// exit code 2 (`Error::Reported`); warnings are printed and the project is returned.
pub fn load_project(root: &Path) -> Result<Valid> {
    load_project_in(root, Ask::No)
}

/// Whether loading asks the Proxmox API about the cluster's nodes, for placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Placement from `proxmox.nodes` (all online) or `proxmox.node`, and `nixmox.lock`.
    No,
    /// The nodes and which are offline from the API when it can be reached (`up`).
    Nodes,
    /// As `Nodes`, and every service placed afresh (`rebalance`).
    Fresh,
}

/// [`load_project`], with placement told what the Proxmox API reports of the cluster's nodes
/// (when the project has an endpoint and a token; otherwise, or when the API cannot be
/// reached, it says so on stderr and places without).
pub fn load_project_in(root: &Path, ask: Ask) -> Result<Valid> {
    load_project_placed(root, ask).map(|placed| placed.valid)
}

/// A loaded project with what its placement was given, so that a command can place it again
/// (`rebalance`) without reading the files, asking the API or printing the warnings twice.
pub struct Placed {
    pub valid: Valid,
    pub read: project_fs::Read,
    pub cluster: nixmox_core::Cluster,
}

/// [`load_project_in`], keeping the sources and the cluster it placed on.
pub fn load_project_placed(root: &Path, ask: Ask) -> Result<Placed> {
    let read = project_fs::read_project(root)?;
    let mut loaded = load_sources(root, &read);
    let mut used = nixmox_core::Cluster::default();
    if ask != Ask::No {
        if let Some(project) = &loaded.project {
            let mut cluster = nixmox_core::Cluster {
                nodes: None,
                fresh: ask == Ask::Fresh,
            };
            match cluster_nodes(project, root) {
                Some(Ok(nodes)) => cluster.nodes = Some(nodes),
                Some(Err(e)) => output::note(&format!(
                    "the Proxmox API could not be reached for the cluster's nodes ({e}): placing on {}",
                    if project.proxmox.nodes.is_empty() {
                        format!("proxmox.node ({})", project.proxmox.node)
                    } else {
                        "proxmox.nodes, all taken as online".into()
                    }
                )),
                None => {}
            }
            if cluster != nixmox_core::Cluster::default() {
                loaded = load_sources_in(root, &read, &cluster);
            }
            used = cluster;
        }
    }
    loaded.diagnostics.extend(read.diagnostics.iter().cloned());
    if let Some(project) = &loaded.project {
        let unsafe_paths = project_fs::check_written_paths(root, project);
        if !unsafe_paths.is_empty() {
            loaded.diagnostics.extend(unsafe_paths);
            loaded.project = None;
        }
    }
    output::diagnostics(&loaded.diagnostics);
    let errors = loaded.errors().count();
    match Valid::of(loaded) {
        Some(valid) if errors == 0 => Ok(Placed {
            valid,
            read,
            cluster: used,
        }),
        _ => {
            output::note(&format!(
                "{} in `{}`",
                plural(errors.max(1), "error"),
                root.display()
            ));
            Err(Error::Reported { count: errors })
        }
    }
}

/// The core's `load` over sources read from `root`, with what only the shell can settle:
/// relative flake input paths made absolute (they are relative to the project, and Nix runs
/// elsewhere). Every command loads through here.
pub fn load_sources(root: &Path, read: &project_fs::Read) -> Loaded {
    load_sources_in(root, read, &nixmox_core::Cluster::default())
}

/// [`load_sources`] with what the shell learnt of the cluster.
pub fn load_sources_in(
    root: &Path,
    read: &project_fs::Read,
    cluster: &nixmox_core::Cluster,
) -> Loaded {
    let probe = read.probe(root);
    let mut loaded = nixmox_core::load_in(&read.sources, &probe, cluster);
    if let Some(p) = loaded.project.as_mut() {
        crate::flake::absolutize_inputs(p, root);
    }
    loaded
}

/// The cluster's nodes from the Proxmox API, when the project reaches one (an endpoint and a
/// token); `None` when it does not. Short timeouts, one try.
pub fn cluster_nodes(
    project: &nixmox_core::Project,
    root: &Path,
) -> Option<std::result::Result<Vec<nixmox_core::ClusterNode>, String>> {
    // A project that names its one node (`proxmox.node`, no `nodes`) is that node.
    if project.infra == nixmox_core::model::InfraBackend::None
        || (project.proxmox.node_given && project.proxmox.nodes.is_empty())
        || project.proxmox.endpoint.is_none()
        || crate::proxmox::token(project, root).is_none()
    {
        return None;
    }
    Some(
        quick_client(project, root)
            .and_then(|(client, scrub)| client.nodes().map_err(|e| scrub(e.to_string()))),
    )
}

/// A client for a quick look (3 s to connect, 5 s to read, one try), and the function that
/// scrubs credentials from its messages.
#[allow(clippy::type_complexity)]
pub fn quick_client(
    project: &nixmox_core::Project,
    root: &Path,
) -> std::result::Result<(crate::proxmox::Client, Box<dyn Fn(String) -> String>), String> {
    use std::time::Duration;

    use crate::proxmox::{self, Client, ClientOptions, HttpApi, HttpOptions, Retry};
    let settings = proxmox::Settings::from_project(project, root).map_err(|e| e.to_string())?;
    let secrets = settings.secrets();
    let scrub = move |m: String| crate::exec::scrub(&m, &secrets);
    let http = HttpOptions {
        connect_timeout: Duration::from_secs(3),
        io_timeout: Duration::from_secs(5),
    };
    let api = HttpApi::new(
        &settings.endpoint,
        settings.credentials.clone(),
        &settings.tls,
        &http,
    )
    .map_err(|e| scrub(e.to_string()))?;
    let opts = ClientOptions {
        retry: Retry {
            attempts: 1,
            ..Retry::default()
        },
        ..ClientOptions::default()
    };
    Ok((Client::new(std::sync::Arc::new(api), opts), Box::new(scrub)))
}

pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
