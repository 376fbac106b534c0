//! `nixmox down [SERVICE...]`: removes services, consumers before providers. For each: destroy
//! its Terraform workspaces (from the rendered inputs of their last apply), then redeploy what
//! is left (the project without the removed services, through the engine's `up`, so only the
//! steps whose inputs changed run: the provider hosts' configurations and, with
//! `infra.backend: terraform`, the infrastructure, which removes the containers), then destroy
//! the containers (`proxmox-api`), then forget the removed services' recorded steps.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nixmox_core::model::{Capability, Deployer, InfraBackend};
use nixmox_core::Project;

use super::config::select;
use super::drift::{recorded_workspace, scratch_build, step_service, temp_dir, terraform_for};
use super::load_project;
use crate::engine::events::Plain;
use crate::engine::runner::proxmox_token;
use crate::engine::{self, Paths, UpOptions, UpResult};
use crate::error::{Error, Result};
use crate::state::{LockOutcome, Store};
use crate::terraform::StepOpts;
use crate::{output, project_fs};

pub struct Args {
    pub services: Vec<String>,
    pub keep_host: bool,
    pub purge_data: bool,
}

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

pub fn run(root: &Path, args: Args) -> Result<()> {
    let loaded = load_project(root)?;
    let project = loaded
        .project
        .as_ref()
        .expect("load_project returns a project");
    let remove: BTreeSet<usize> = if args.services.is_empty() {
        (0..project.services.len()).collect()
    } else {
        select(project, &args.services)?.into_iter().collect()
    };
    let name = |i: usize| project.services[i].name.as_str().to_string();

    // Refuse to pull a provider out from under a service that stays deployed (one whose steps
    // are recorded: a dependent already removed by an earlier `down` does not count).
    let paths = Paths::new(root, project);
    let deployed: BTreeSet<String> = if paths.state_db.exists() {
        let store = Store::open(&paths.state_db).map_err(Error::State)?;
        let record = store.record().map_err(Error::State)?;
        record
            .steps
            .keys()
            .filter_map(|id| step_service(id).map(str::to_string))
            .collect()
    } else {
        BTreeSet::new()
    };
    let mut refused = Vec::new();
    for &i in &remove {
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
    if !refused.is_empty() {
        return Err(Error::Usage(format!(
            "refusing to remove a service others depend on: {}",
            refused.join("; ")
        )));
    }
    let everything = remove.len() == project.services.len();
    if args.keep_host && project.infra == InfraBackend::Terraform && !everything {
        return Err(Error::Usage(
            "--keep-host is not supported with infra.backend: terraform: re-applying the \
             infrastructure without the removed services destroys their containers"
                .into(),
        ));
    }
    let order = removal_order(project, &remove);
    let removed: Vec<String> = order.iter().map(|&i| name(i)).collect();
    if !paths.state_db.exists() {
        output::note("nothing recorded yet: nothing to remove");
        return Ok(());
    }
    let timeout = Duration::from_secs(30 * 60);

    // What stays: neither removed now nor already gone (never deployed, or removed by an
    // earlier `down`: `down` deploys nothing new). Loaded before anything is destroyed.
    let reduced = if everything {
        None
    } else {
        let dropped: Vec<String> = project
            .services
            .iter()
            .map(|s| s.name.as_str().to_string())
            .filter(|n| removed.contains(n) || !deployed.contains(n))
            .collect();
        if dropped.len() == project.services.len() {
            None
        } else {
            Some(reduced_project(root, &dropped)?)
        }
    };

    // Nothing stays deployed: the project-wide workspaces go too.
    let everything = everything || reduced.is_none();

    // 1. Terraform: each service's workspaces, consumers first, config before infra.
    {
        let mut store = Store::open(&paths.state_db).map_err(Error::State)?;
        match store.acquire_lock("down").map_err(Error::State)? {
            LockOutcome::Acquired => {}
            LockOutcome::TakenOver { previous } => output::note(&format!(
                "took over a stale lock of pid {} on {}",
                previous.pid, previous.hostname
            )),
        }
        let result = destroy_workspaces(
            root, project, &paths, &mut store, &removed, everything, &args, timeout,
        );
        let released = store.release_lock().map_err(Error::State);
        result?;
        released?;
    }

    // 2. What is left, redeployed without them (providers' configurations, infrastructure).
    if let Some(reduced) = &reduced {
        let opts = UpOptions {
            services: Vec::new(),
            with_deps: true,
            parallel: project.deploy.parallel as usize,
            force: false,
            force_steps: Vec::new(),
            fail_fast: false,
            timeout,
            args: std::env::args().skip(1).collect(),
            rollback: true,
            rollback_core: false,
            remove_orphans: false,
        };
        output::note(&format!(
            "redeploying the project without {}",
            removed.join(", ")
        ));
        let cancel = Arc::new(AtomicBool::new(false));
        match engine::up(root, reduced, &opts, &mut Plain, cancel)? {
            UpResult::Success => {}
            UpResult::Interrupted => return Err(Error::Interrupted),
            UpResult::Failed { failed } => {
                return Err(Error::RunFailed(format!(
                    "redeploying without {} failed ({failed} step(s)); their Terraform resources \
                     are destroyed, their records kept: fix it and run `nixmox down` again",
                    removed.join(", ")
                )))
            }
        }
        // 3. The containers.
        if !args.keep_host && project.infra == InfraBackend::ProxmoxApi {
            destroy_containers(project, root, Some(reduced))?;
        }
    } else if !args.keep_host && project.infra == InfraBackend::ProxmoxApi {
        destroy_containers(project, root, None)?;
    }

    // 4. Forget them.
    let mut store = Store::open(&paths.state_db).map_err(Error::State)?;
    let record = store.record().map_err(Error::State)?;
    for id in record.steps.keys() {
        let mine = match step_service(id) {
            Some(s) => removed.iter().any(|r| r == s),
            None => everything && !(args.keep_host && id == "tf:infra"),
        };
        if mine {
            store.forget_step(id).map_err(Error::State)?;
        }
    }
    if args.purge_data {
        purge_data(root, project, &paths, &order, timeout)?;
    } else if order.iter().any(|&i| !project.services[i].dbs.is_empty()) {
        output::note(
            "databases are kept: the database host's configuration no longer declares them, \
             but NixOS never drops a database (`nixmox down --purge-data` drops them)",
        );
    }
    output::data(&format!("removed {}\n", removed.join(", ")))
}

#[allow(clippy::too_many_arguments)]
fn destroy_workspaces(
    root: &Path,
    project: &Project,
    paths: &Paths,
    store: &mut Store,
    removed: &[String],
    everything: bool,
    args: &Args,
    timeout: Duration,
) -> Result<()> {
    let record = store.record().map_err(Error::State)?;
    let tmp = temp_dir(paths, "down")?;
    let build = scratch_build(root, project, store, tmp.path())?;
    let mut steps: Vec<String> = Vec::new();
    for s in removed {
        for phase in ["tf:service-config:", "tf:service-infra:"] {
            let id = format!("{phase}{s}");
            if record.steps.contains_key(&id) {
                steps.push(id);
            }
        }
    }
    if everything {
        steps.push("tf:auth-core".into());
        if !args.keep_host {
            steps.push("tf:infra".into());
        }
        steps.retain(|id| record.steps.contains_key(id));
    }
    for id in steps {
        // No rendered inputs: no workspace was ever applied for it, nothing to destroy.
        let Some(ws) = recorded_workspace(store, paths, &id, &build)? else {
            store.forget_step(&id).map_err(Error::State)?;
            continue;
        };
        output::note(&format!("destroying the resources of {id}"));
        let opts = StepOpts {
            timeout: Some(timeout),
            log: paths
                .logs
                .join("down")
                .join(format!("{}.log", id.replace(':', "_"))),
            redact: proxmox_token(project).into_iter().collect(),
            ..StepOpts::default()
        };
        terraform_for(project, &id)
            .destroy(&ws, &opts)
            .map_err(|e| Error::RunFailed(format!("{id}: {e}")))?;
        store.forget_step(&id).map_err(Error::State)?;
    }
    Ok(())
}

/// The project as if the removed services' manifests were not there.
fn reduced_project(root: &Path, removed: &[String]) -> Result<Project> {
    let mut read = project_fs::read_project(root)?;
    read.sources.manifests.retain(|m| {
        !removed
            .iter()
            .any(|s| m.path.starts_with(&format!("services/{s}/")))
    });
    let probe = project_fs::probe_in(root);
    let mut loaded = nixmox_core::load_probed(&read.sources, &probe);
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

/// `proxmox-api`: the project's containers the reduced project no longer has (all of them when
/// there is none).
fn destroy_containers(project: &Project, root: &Path, reduced: Option<&Project>) -> Result<()> {
    use crate::proxmox::{connect, lifecycle, ClientOptions, Settings};
    let fail = |e: String| Error::RunFailed(format!("destroying the containers: {e}"));
    let settings = Settings::from_project(project, root).map_err(|e| fail(e.to_string()))?;
    let client = connect(&settings, ClientOptions::default()).map_err(|e| fail(e.to_string()))?;
    let parallel = project.deploy.parallel as usize;
    let report = match reduced {
        Some(r) => lifecycle::remove_orphans(&client, r, parallel),
        None => lifecycle::down(&client, project, parallel),
    }
    .map_err(|e| fail(e.to_string()))?;
    output::note(&report.summary());
    Ok(())
}

/// `DROP DATABASE` and `DROP ROLE` for a database of a removed service (names are validated SQL
/// identifiers, quoted all the same).
fn drop_statements(database: &str, role: &str) -> [String; 2] {
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    [
        format!("DROP DATABASE IF EXISTS {}", quote(database)),
        format!("DROP ROLE IF EXISTS {}", quote(role)),
    ]
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
    let dbs: Vec<(&str, &str)> = order
        .iter()
        .flat_map(|&i| project.services[i].dbs.iter())
        .map(|d| (d.database.as_str(), d.role.as_str()))
        .collect();
    if dbs.is_empty() {
        return Ok(());
    }
    let Some(pg) = project.provider(Capability::Database) else {
        output::note("--purge-data: the project has no database provider: nothing to drop");
        return Ok(());
    };
    if matches!(project.nix.deployer, Deployer::Command { .. }) {
        let mut text = format!(
            "--purge-data: with a custom deployer NixMox does not drop databases itself; run \
             on the database host {} ({}) as postgres:\n",
            pg.host.hostname, pg.host.ip
        );
        for (db, role) in &dbs {
            for st in drop_statements(db, role) {
                text.push_str(&format!("  {st};\n"));
            }
        }
        output::note(text.trim_end());
        return Ok(());
    }
    let ctx = crate::health::Context::for_project(
        project,
        &paths.ssh,
        &paths.known_hosts,
        &root.join(".nixmox/ca.pem"),
    )
    .map_err(Error::Usage)?;
    let to = ctx.route(pg.host.ip, 22);
    let mut options = ctx.ssh.options.clone();
    if to.port() != 22 {
        options.push("-p".into());
        options.push(to.port().to_string());
    }
    for (db, role) in &dbs {
        let mut remote: Vec<String> = ["sudo", "-u", "postgres", "psql", "-v", "ON_ERROR_STOP=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for st in drop_statements(db, role) {
            remote.push("-c".into());
            remote.push(st);
        }
        let mut argv =
            nixmox_core::deploy::ssh_argv(&options, &ctx.ssh.user, &to.ip().to_string(), &remote);
        argv[0] = ctx.ssh.program.clone();
        output::note(&format!(
            "dropping database `{db}` and role `{role}` on {}",
            pg.host.hostname
        ));
        let opts = crate::exec::RunOpts {
            timeout: Some(timeout),
            log: Some(paths.logs.join("down").join("purge-data.log")),
            ..Default::default()
        };
        let fin = crate::exec::run(&crate::exec::Cmd::new(&argv[0]).args(&argv[1..]), &opts)
            .map_err(|e| Error::RunFailed(format!("--purge-data: {e}")))?;
        if !fin.success() {
            return Err(Error::RunFailed(format!(
                "--purge-data: dropping `{db}` on {} failed (exit {:?}): {}",
                pg.host.hostname,
                fin.code,
                fin.stderr.trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::drop_statements;

    #[test]
    fn drop_statements_quote_the_names() {
        assert_eq!(
            drop_statements("wiki", "wi\"ki"),
            [
                "DROP DATABASE IF EXISTS \"wiki\"".to_string(),
                "DROP ROLE IF EXISTS \"wi\"\"ki\"".to_string()
            ]
        );
    }
}
