//! `nixmox down [SERVICE...]`: removes services, consumers before providers. For each: destroy
//! its Terraform workspaces (from the rendered inputs of their last apply), then redeploy what
//! is left (the project without the removed services, through the engine's `up`, so only the
//! steps whose inputs changed run: the provider hosts' configurations and, with
//! `infra.backend: terraform`, the infrastructure, which removes the containers), then destroy
//! the containers (`proxmox-api`), then forget the removed services' recorded steps.
//!
//! Before any of it, what goes is listed (`nixmox_core::teardown`): the Terraform resources of
//! each workspace from its state, the containers (from the Proxmox API, or the `tf:infra`
//! state), the databases of `--purge-data`; then confirmed (`confirm`), and only what was listed
//! is destroyed. `--dry-run` stops after the list.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nixmox_core::ids::ServiceName;
use nixmox_core::model::{Capability, Deployer, InfraBackend};
use nixmox_core::plan::Phase;
use nixmox_core::step_id::StepId;
use nixmox_core::teardown::{
    self, backup_for, Backup, Container, Database, Teardown, Via, Workspace, WorkspaceAction,
};
use nixmox_core::Project;

use super::config::select;
use super::drift::{recorded_workspace, scratch_build, step_service, temp_dir, terraform_for};
use super::load_project;
use crate::cli::DownArgs as Args;
use crate::engine::events::Plain;
use crate::engine::runner::proxmox_token;
use crate::engine::{self, UpOptions, UpResult};
use crate::error::{BackupError, Error, Result, WorkspaceError};
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::state::{LockOutcome, Store};
use crate::terraform::StepOpts;
use crate::{confirm, output, project_fs};

/// Consumers before providers: the order in which `names` can be removed.
fn removal_order(project: &Project, remove: &BTreeSet<usize>) -> Vec<usize> {
    let mut left: BTreeSet<usize> = remove.clone();
    let mut order = Vec::new();
    while !left.is_empty() {
        // A service none of the remaining ones depends on.
        let next = left
            .iter()
            .copied()
            .find(|&i| {
                !project
                    .edges
                    .iter()
                    .any(|e| e.to == i && e.from != i && left.contains(&e.from))
            })
            .unwrap_or_else(|| *left.iter().next().expect("not empty"));
        left.remove(&next);
        order.push(next);
    }
    order
}

pub fn run(root: &ProjectRoot, args: Args) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let remove: BTreeSet<usize> = if args.services.is_empty() {
        (0..project.services.len()).collect()
    } else {
        select(project, &args.services)?.into_iter().collect()
    };
    let paths = Paths::new(root, project);
    let deployed = deployed_services(&paths)?;
    refuse_needed_providers(project, &remove, &deployed)?;
    let everything = remove.len() == project.services.len();
    // Confirmed with the project's name: every service named (or none).
    let all_named = everything;
    if args.keep_host && project.infra == InfraBackend::Terraform && !everything {
        return Err(Error::Usage(
            "--keep-host is not supported with infra.backend: terraform: re-applying the \
             infrastructure without the removed services destroys their containers"
                .into(),
        ));
    }
    let order = removal_order(project, &remove);
    let removed: Vec<&ServiceName> = order.iter().map(|&i| &project.services[i].name).collect();
    if !paths.state_db.exists() {
        output::note("nothing recorded yet: nothing to remove");
        return Ok(());
    }
    let timeout = Duration::from_secs(30 * 60);
    // What stays, loaded before anything is destroyed.
    let reduced = if everything {
        None
    } else {
        what_stays(root, project, &removed, &deployed)?
    };
    // Nothing stays deployed: the project-wide workspaces go too.
    let everything = everything || reduced.is_none();

    // 0. What goes, listed before anything does, and confirmed.
    let store = Store::open(&paths.state_db).map_err(Error::State)?;
    let tmp = temp_dir(&paths, "down")?;
    let build = scratch_build(root, project, &store, tmp.path())?;
    let steps = workspace_steps(&store, &removed, everything, args.keep_host)?;
    let list = Listing {
        root,
        project,
        reduced: reduced.as_ref(),
        paths: &paths,
        store: &store,
        build: &build,
        timeout,
    }
    .list(&steps, &order, all_named, &args)?;
    if args.dry_run {
        output::note(list.render().trim_end());
        output::note("dry run: nothing was destroyed or changed");
        return Ok(());
    }
    confirm::destroy(&list, args.yes)?;
    let mut store = store;
    take_backups(root, project, &mut store, &list)?;

    // 1. Terraform: each service's workspaces, consumers first, config before infra.
    let destroyed = destroy_workspaces_locked(project, &paths, store, &build, &steps, timeout);
    drop(tmp);
    destroyed?;
    // 2. What is left, redeployed without them (providers' configurations, infrastructure).
    if let Some(reduced) = &reduced {
        redeploy(root, reduced, &removed, timeout)?;
    }
    // 3. The containers: only those listed (and confirmed) go through the API.
    let containers: BTreeSet<u32> = list
        .containers
        .iter()
        .filter(|c| c.via == Via::ProxmoxApi)
        .map(|c| c.vmid)
        .collect();
    if !containers.is_empty() {
        destroy_containers(project, root, &containers)?;
    }
    // 4. Forget them.
    forget_steps(&paths, &removed, everything, args.keep_host)?;
    if args.purge_data {
        purge_data(root, project, &paths, &order, timeout)?;
    } else if order.iter().any(|&i| !project.services[i].dbs.is_empty()) {
        output::note(
            "databases are kept: the database host's configuration no longer declares them, \
             but NixOS never drops a database (`nixmox down --purge-data` drops them)",
        );
    }
    output::data(&format!("removed {}\n", names(&removed)))
}

/// The removed services' names, as messages list them.
fn names(removed: &[&ServiceName]) -> String {
    removed
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The services whose steps are recorded: those deployed (a service never deployed, or
/// removed by an earlier `down`, has none).
fn deployed_services(paths: &Paths) -> Result<BTreeSet<String>> {
    if !paths.state_db.exists() {
        return Ok(BTreeSet::new());
    }
    let store = Store::open(&paths.state_db).map_err(Error::State)?;
    let record = store.record().map_err(Error::State)?;
    Ok(record
        .steps
        .keys()
        .filter_map(|id| step_service(id).map(str::to_string))
        .collect())
}

/// Refuses to pull a provider out from under a service that stays deployed (one whose steps
/// are recorded: a dependent already removed by an earlier `down` does not count).
fn refuse_needed_providers(
    project: &Project,
    remove: &BTreeSet<usize>,
    deployed: &BTreeSet<String>,
) -> Result<()> {
    let name = |i: usize| project.services[i].name.as_str().to_string();
    let mut refused = Vec::new();
    for &i in remove {
        let mut dependents: Vec<String> = project
            .edges
            .iter()
            .filter(|e| e.to == i && !remove.contains(&e.from) && deployed.contains(&name(e.from)))
            .map(|e| name(e.from))
            .collect();
        dependents.sort();
        dependents.dedup();
        if !dependents.is_empty() {
            refused.push(format!(
                "`{}` is needed by {} (remove them too: `nixmox down {} {}`)",
                name(i),
                dependents
                    .iter()
                    .map(|d| format!("`{d}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                name(i),
                dependents.join(" ")
            ));
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "refusing to remove a service others depend on: {}",
        refused.join("; ")
    )))
}

/// The project that stays: without the removed services and those already gone (never
/// deployed, or removed by an earlier `down`: `down` deploys nothing new). `None` when nothing
/// stays.
fn what_stays(
    root: &ProjectRoot,
    project: &Project,
    removed: &[&ServiceName],
    deployed: &BTreeSet<String>,
) -> Result<Option<Project>> {
    let dropped: Vec<String> = project
        .services
        .iter()
        .map(|s| s.name.as_str().to_string())
        .filter(|n| removed.iter().any(|r| r.as_str() == n) || !deployed.contains(n))
        .collect();
    if dropped.len() == project.services.len() {
        return Ok(None);
    }
    reduced_project(root, &dropped).map(Some)
}

/// Destroys the workspaces under the state store's lock, released (and the store closed)
/// whatever happens.
fn destroy_workspaces_locked(
    project: &Project,
    paths: &Paths,
    mut store: Store,
    build: &Path,
    steps: &[StepId],
    timeout: Duration,
) -> Result<()> {
    match store.acquire_lock("down").map_err(Error::State)? {
        LockOutcome::Acquired => {}
        LockOutcome::TakenOver { previous } => output::note(&format!(
            "took over a stale lock of pid {} on {}",
            previous.pid, previous.hostname
        )),
    }
    let result = destroy_workspaces(project, paths, &mut store, build, steps, timeout);
    let released = store.release_lock().map_err(Error::State);
    drop(store);
    result?;
    released
}

/// Redeploys the project that stays, through the engine's `up`: only the steps whose inputs
/// changed run (the providers' configurations and, with `infra.backend: terraform`, the
/// infrastructure, which destroys the removed services' containers).
fn redeploy(
    root: &ProjectRoot,
    reduced: &Project,
    removed: &[&ServiceName],
    timeout: Duration,
) -> Result<()> {
    let opts = UpOptions {
        selection: nixmox_core::plan::Selection {
            services: Vec::new(),
            with_deps: true,
        },
        parallel: None,
        force: false,
        force_steps: Vec::new(),
        fail_fast: false,
        timeout,
        args: std::env::args().skip(1).collect(),
        rollback: true,
        snapshot_rollback: true,
        rollback_core: false,
        remove_orphans: Vec::new(),
        allow_destroy: false,
        // With infra.backend terraform, this redeploy is what destroys the removed
        // services' containers (step 3 of docs/engine.md, "Removing services").
        delete_orphans: true,
    };
    output::note(&format!(
        "redeploying the project without {}",
        names(removed)
    ));
    let cancel = Arc::new(AtomicBool::new(false));
    match engine::up(root, reduced, &opts, &mut Plain, cancel)? {
        UpResult::Success => Ok(()),
        UpResult::Interrupted => Err(Error::Interrupted),
        UpResult::Failed { failed } => Err(Error::RunFailed(format!(
            "redeploying without {} failed ({failed} step(s)); their Terraform resources \
             are destroyed, their records kept: fix it and run `nixmox down` again",
            names(removed)
        ))),
    }
}

/// Forgets the recorded steps of the removed services and, when nothing stays, the
/// project-wide ones (but `tf:infra` with `--keep-host`).
fn forget_steps(
    paths: &Paths,
    removed: &[&ServiceName],
    everything: bool,
    keep_host: bool,
) -> Result<()> {
    let mut store = Store::open(&paths.state_db).map_err(Error::State)?;
    let record = store.record().map_err(Error::State)?;
    let infra = project_wide(Phase::TfInfra);
    for id in record.steps.keys() {
        let mine = match step_service(id) {
            Some(s) => removed.iter().any(|r| r.as_str() == s),
            None => everything && !(keep_host && id.as_str() == infra.as_str()),
        };
        if mine {
            store.forget_step(id).map_err(Error::State)?;
        }
    }
    Ok(())
}

/// The step of a project-wide phase.
fn project_wide(phase: Phase) -> StepId {
    StepId::project_wide(phase).expect("tf:infra and tf:auth-core are project-wide")
}

/// The Terraform workspaces `down` destroys: each removed service's, consumers first, config
/// before infra; when nothing stays, also `tf:auth-core` and (unless `--keep-host`) `tf:infra`.
/// Only recorded steps.
fn workspace_steps(
    store: &Store,
    removed: &[&ServiceName],
    everything: bool,
    keep_host: bool,
) -> Result<Vec<StepId>> {
    let record = store.record().map_err(Error::State)?;
    let mut steps: Vec<StepId> = Vec::new();
    for s in removed {
        for phase in [Phase::TfServiceConfig, Phase::TfServiceInfra] {
            steps.push(StepId::of_service(phase, s).expect("a per-service Terraform phase"));
        }
    }
    if everything {
        steps.push(project_wide(Phase::TfAuthCore));
        if !keep_host {
            steps.push(project_wide(Phase::TfInfra));
        }
    }
    steps.retain(|id| record.steps.contains_key(id.as_str()));
    Ok(steps)
}

/// What `down` reads to list what it would destroy; nothing is written but the scratch build.
struct Listing<'a> {
    root: &'a Path,
    project: &'a Project,
    /// The project that stays (`None`: nothing does).
    reduced: Option<&'a Project>,
    paths: &'a Paths,
    store: &'a Store,
    build: &'a Path,
    timeout: Duration,
}

impl Listing<'_> {
    fn list(
        &self,
        steps: &[StepId],
        order: &[usize],
        all_named: bool,
        args: &Args,
    ) -> Result<Teardown> {
        let project = self.project;
        let mut list = Teardown::new(project, all_named);
        // Workspaces destroyed: everything in their state.
        for id in steps {
            if let Some(addresses) = self.state_list(id)? {
                list.workspaces.push(Workspace {
                    step: id.to_string(),
                    action: WorkspaceAction::Destroy,
                    addresses: teardown::managed_only(addresses),
                });
            }
        }
        // Project-wide workspaces the redeploy re-applies without the removed services: what
        // their state has and the reduced project's configuration no longer declares.
        if let Some(reduced) = self.reduced {
            let outputs = self.store.outputs().map_err(Error::State)?;
            let rendered = nixmox_core::render::render(reduced, &outputs);
            for id in [Phase::TfInfra, Phase::TfAuthCore].map(project_wide) {
                let Some(rel) = id.terraform_config_dir() else {
                    continue;
                };
                let Some(state) = self.state_list(&id)? else {
                    continue;
                };
                let config = teardown::resource_addresses(&rendered.files, &rel);
                let gone = teardown::gone_on_reapply(&state, &config);
                if !gone.is_empty() {
                    list.workspaces.push(Workspace {
                        step: id.to_string(),
                        action: WorkspaceAction::Reapply,
                        addresses: gone,
                    });
                }
            }
        }
        // Containers.
        match project.infra {
            InfraBackend::ProxmoxApi if !args.keep_host => {
                list.containers = self.api_containers(args.no_backup)?;
            }
            InfraBackend::Terraform => {
                let infra = project_wide(Phase::TfInfra);
                for w in list.workspaces.iter().filter(|w| w.step == infra.as_str()) {
                    list.containers.extend(teardown::terraform_containers(
                        project,
                        &w.step,
                        &w.addresses,
                        args.no_backup,
                    ));
                }
            }
            _ => {}
        }
        if args.keep_host && project.infra != InfraBackend::None {
            list.kept.push("the containers (--keep-host)".into());
        }
        // Databases.
        let dbs: Vec<&nixmox_core::model::Db> = order
            .iter()
            .flat_map(|&i| project.services[i].dbs.iter())
            .collect();
        match project.provider(Capability::Database) {
            Some(pg) if !dbs.is_empty() && args.purge_data => {
                if matches!(project.nix.deployer, Deployer::Command { .. }) {
                    list.kept.push(format!(
                        "the databases: with a custom deployer --purge-data prints the statements \
                         that drop them on {}, it does not run them",
                        pg.host.hostname
                    ));
                } else {
                    list.databases = dbs
                        .iter()
                        .map(|d| Database {
                            database: d.database.clone(),
                            role: d.role.clone(),
                            host: pg.host.hostname.as_str().to_string(),
                        })
                        .collect();
                }
            }
            Some(pg) if !dbs.is_empty() => list.kept.push(format!(
                "the databases {} on {} (--purge-data drops them)",
                dbs.iter()
                    .map(|d| format!("`{}`", d.database))
                    .collect::<Vec<_>>()
                    .join(", "),
                pg.host.hostname
            )),
            _ => {}
        }
        Ok(list)
    }

    /// A recorded workspace's resource addresses (`terraform state list`); `None` when no
    /// workspace was ever applied for the step.
    fn state_list(&self, id: &StepId) -> Result<Option<Vec<String>>> {
        let Some(ws) = recorded_workspace(self.store, self.paths, id.as_str(), self.build)? else {
            return Ok(None);
        };
        let log = id.log_file_name();
        let opts = StepOpts {
            timeout: Some(self.timeout),
            log: self.paths.logs.join("down").join(format!(
                "{}-list.log",
                log.strip_suffix(".log").unwrap_or(&log)
            )),
            redact: proxmox_token(self.project, &self.paths.root)
                .into_iter()
                .collect(),
            ..StepOpts::default()
        };
        terraform_for(self.project, &self.paths.root, id.as_str())
            .map_err(WorkspaceError::Environment)
            .and_then(|tf| Ok(tf.state_list(&ws, &opts)?))
            .map(Some)
            .map_err(|source| Error::Workspace {
                doing: format!("listing the resources of {id}"),
                source,
            })
    }

    /// `proxmox-api`: the project's containers the reduced project no longer has (all of them
    /// when nothing stays), as PVE lists them.
    fn api_containers(&self, no_backup: bool) -> Result<Vec<Container>> {
        use crate::proxmox::{connect, lifecycle, ClientOptions, Settings};
        let project = self.project;
        let fail = || Error::pve_during("listing the containers");
        let settings = Settings::from_project(project, self.root).map_err(fail())?;
        let client = connect(&settings, ClientOptions::default()).map_err(fail())?;
        let stays: BTreeSet<u32> = self
            .reduced
            .map(|r| lifecycle::desired(r).iter().map(|d| d.vmid).collect())
            .unwrap_or_default();
        let guests = client.guests().map_err(fail())?;
        Ok(guests
            .into_iter()
            .filter(|g| {
                g.kind == "lxc"
                    && lifecycle::is_projects(&g.tags, project)
                    && !stays.contains(&g.vmid)
            })
            .map(|g| Container {
                backup: project
                    .services
                    .iter()
                    .find(|s| s.host.vmid.get() == g.vmid)
                    .map_or(Backup::NotConfigured, |s| backup_for(&s.host, no_backup)),
                vmid: g.vmid,
                node: g.node,
                name: g.name,
                via: Via::ProxmoxApi,
            })
            .collect())
    }
}

/// Before anything is destroyed: a vzdump backup of each listed container whose host has
/// `host.backup` (unless `--no-backup`), its volume id printed and recorded in the state store
/// (`backups`). A backup that fails stops `down` with nothing destroyed. A snapshot would be no
/// way back: destroying a container deletes its snapshots.
fn take_backups(
    root: &ProjectRoot,
    project: &Project,
    store: &mut Store,
    list: &Teardown,
) -> Result<()> {
    let mut client = None;
    for c in &list.containers {
        match &c.backup {
            Backup::NotConfigured | Backup::Skipped => {}
            Backup::Vzdump { storage, mode } => {
                let fail = |source: BackupError| Error::BackupBeforeDestroy {
                    vmid: c.vmid,
                    name: c.name.clone(),
                    node: c.node.clone(),
                    source,
                };
                if client.is_none() {
                    use crate::proxmox::{connect, ClientOptions, Settings};
                    let settings =
                        Settings::from_project(project, root).map_err(|e| fail(e.into()))?;
                    client = Some(
                        connect(&settings, ClientOptions::default()).map_err(|e| fail(e.into()))?,
                    );
                }
                let Some(client) = client.as_ref() else {
                    continue;
                };
                output::note(&format!(
                    "backing up CT {} (`{}`) to `{storage}` (vzdump, mode {mode})…",
                    c.vmid, c.name
                ));
                let volid = crate::proxmox::backup::vzdump(client, &c.node, c.vmid, storage, mode)
                    .map_err(|e| fail(e.into()))?
                    .ok_or_else(|| {
                        fail(BackupError::NoArchive {
                            storage: storage.clone(),
                        })
                    })?;
                output::note(&format!("CT {} (`{}`) backed up: {volid}", c.vmid, c.name));
                store
                    .record_backup(&crate::state::BackupRow {
                        service: project
                            .services
                            .iter()
                            .find(|s| s.host.vmid.get() == c.vmid)
                            .map_or_else(|| c.name.clone(), |s| s.name.to_string()),
                        vmid: c.vmid,
                        node: c.node.clone(),
                        volid,
                        kind: "vzdump".into(),
                        reason: "before `down` destroyed it".into(),
                        taken_at: crate::state::timestamp(),
                    })
                    .map_err(Error::State)?;
            }
        }
    }
    Ok(())
}

fn destroy_workspaces(
    project: &Project,
    paths: &Paths,
    store: &mut Store,
    build: &Path,
    steps: &[StepId],
    timeout: Duration,
) -> Result<()> {
    for id in steps {
        // No rendered inputs: no workspace was ever applied for it, nothing to destroy.
        let Some(ws) = recorded_workspace(store, paths, id.as_str(), build)? else {
            store.forget_step(id.as_str()).map_err(Error::State)?;
            continue;
        };
        output::note(&format!("destroying the resources of {id}"));
        let opts = StepOpts {
            timeout: Some(timeout),
            log: paths.logs.join("down").join(id.log_file_name()),
            redact: proxmox_token(project, &paths.root).into_iter().collect(),
            ..StepOpts::default()
        };
        terraform_for(project, &paths.root, id.as_str())
            .map_err(WorkspaceError::Environment)
            .and_then(|tf| Ok(tf.destroy(&ws, &opts)?))
            .map_err(|source| Error::Workspace {
                doing: id.to_string(),
                source,
            })?;
        store.forget_step(id.as_str()).map_err(Error::State)?;
    }
    Ok(())
}

/// The project as if the removed services' manifests were not there.
fn reduced_project(root: &ProjectRoot, removed: &[String]) -> Result<Project> {
    let mut read = project_fs::read_project(root)?;
    read.sources.manifests.retain(|m| {
        !removed
            .iter()
            .any(|s| m.path.starts_with(&format!("services/{s}/")))
    });
    let mut loaded = super::load_sources(root, &read);
    loaded.diagnostics.extend(read.diagnostics);
    let errors: Vec<_> = loaded.errors().cloned().collect();
    if !errors.is_empty() || loaded.project.is_none() {
        output::diagnostics(&errors);
        return Err(Error::RunFailed(format!(
            "the project without {} does not load (see above)",
            removed.join(", ")
        )));
    }
    Ok(loaded.project.expect("checked"))
}

/// `proxmox-api`: destroys the listed (and confirmed) containers, only those, and only while
/// they carry the project's tags.
fn destroy_containers(project: &Project, root: &Path, vmids: &BTreeSet<u32>) -> Result<()> {
    use crate::proxmox::{connect, lifecycle, ClientOptions, Settings};
    let fail = || Error::pve_during("destroying the containers");
    let settings = Settings::from_project(project, root).map_err(fail())?;
    let client = connect(&settings, ClientOptions::default()).map_err(fail())?;
    let parallel = project.deploy.parallel as usize;
    let report = lifecycle::destroy_listed(&client, project, parallel, vmids).map_err(|e| {
        Error::DestroyContainers {
            source: Box::new(e),
        }
    })?;
    output::note(&report.summary());
    Ok(())
}

/// `--purge-data`: drops the removed services' databases and roles on the database host, over
/// SSH, with the built-in deployers; with a custom deployer (NixMox may not reach the hosts
/// itself) prints the statements for the operator.
fn purge_data(
    root: &Path,
    project: &Project,
    paths: &Paths,
    order: &[usize],
    timeout: Duration,
) -> Result<()> {
    // A role another, remaining service shares is kept (issue 13: roles are shared only on
    // purpose, and dropping one would lock the other service out).
    let kept: std::collections::HashSet<&str> = project
        .services
        .iter()
        .enumerate()
        .filter(|(i, _)| !order.contains(i))
        .flat_map(|(_, s)| s.dbs.iter().map(|d| d.role.as_str()))
        .collect();
    let dbs: Vec<(&str, Option<&str>)> = order
        .iter()
        .flat_map(|&i| project.services[i].dbs.iter())
        .map(|d| {
            let role = d.role.as_str();
            (d.database.as_str(), (!kept.contains(role)).then_some(role))
        })
        .collect();
    if dbs.is_empty() {
        return Ok(());
    }
    let (Some(pg), Some(imp)) = (
        project.provider(Capability::Database),
        project.implementation(Capability::Database),
    ) else {
        output::note("--purge-data: the project has no database provider: nothing to drop");
        return Ok(());
    };
    // What the database implementation runs to drop each one (`providers::Provider::purge`).
    let purges: Vec<(&str, Option<&str>, nixmox_core::providers::Purge)> = dbs
        .iter()
        .filter_map(|&(db, role)| imp.purge(db, role).map(|p| (db, role, p)))
        .collect();
    let Some((_, _, first)) = purges.first() else {
        return Ok(());
    };
    if matches!(project.nix.deployer, Deployer::Command { .. }) {
        let mut text = format!(
            "--purge-data: with a custom deployer NixMox does not drop databases itself; run \
             on the database host {} ({}) as {}:\n",
            pg.host.hostname, pg.host.ip, first.run_as
        );
        for (_, _, purge) in &purges {
            for st in &purge.statements {
                text.push_str(&format!("  {st};\n"));
            }
        }
        output::note(text.trim_end());
        return Ok(());
    }
    let shell = crate::remote::HostShell::of(project, root, paths, pg)?;
    for (db, role, purge) in &purges {
        let what = match role {
            Some(role) => format!("database `{db}` and role `{role}`"),
            None => format!("database `{db}` (its role is shared with a remaining service)"),
        };
        output::note(&format!("dropping {what} on {}", pg.host.hostname));
        let opts = crate::exec::RunOpts {
            timeout: Some(timeout),
            log: Some(paths.logs.join("down").join("purge-data.log")),
            ..Default::default()
        };
        shell.run(
            &purge.argv,
            &opts,
            &format!("--purge-data: dropping `{db}`"),
        )?;
    }
    Ok(())
}
