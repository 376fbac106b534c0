//! `nixmox drift`: what changed behind NixMox's back. Per recorded Terraform workspace a
//! refresh-only plan (from the rendered inputs of its last successful apply) and the
//! `resource_drift` it reports; per host deployed with a built-in deployer the running system
//! against the generation NixMox last switched to; with `infra.backend: proxmox-api` the
//! containers' config keys (read from the API) against the manifest.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixmox_core::deploy;
use nixmox_core::model::{Deployer, InfraBackend};
use nixmox_core::plan::Phase;
use nixmox_core::step_id::StepId;
use nixmox_core::Project;
use serde_json::json;

use super::load_project;
use crate::cli::PlanFormat;
use crate::engine::runner::proxmox_token;
use crate::error::{Error, Result, Unchecked};
use crate::exec::{self, Cmd, RunOpts};
use crate::output;
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::state::Store;
use crate::terraform::{self, StepOpts, Terraform, Workspace};

/// Renders the project into `<scratch>/build` (never touching `.nixmox/build`), so the
/// workspaces' local modules are there.
pub(crate) fn scratch_build(
    root: &ProjectRoot,
    project: &Project,
    store: &Store,
    scratch: &Path,
) -> Result<PathBuf> {
    let outputs = store.outputs().map_err(Error::State)?;
    let rendered = nixmox_core::render::render(project, &outputs);
    let build = scratch.join("build");
    crate::project_fs::write_tree(root, &build, &rendered)?;
    Ok(build)
}

/// A recorded Terraform step's workspace: its configuration as last applied (the recorded
/// rendered inputs) in the scratch build, next to the modules rendered there.
pub(crate) fn recorded_workspace(
    store: &Store,
    paths: &Paths,
    step_id: &str,
    build: &Path,
) -> Result<Option<Workspace>> {
    let Some(files) = store.rendered_inputs(step_id).map_err(Error::State)? else {
        return Ok(None);
    };
    let Ok(id) = step_id.parse::<StepId>() else {
        return Ok(None);
    };
    let (Some(rel), Some(data)) = (id.terraform_config_dir(), id.terraform_data_dir()) else {
        return Ok(None);
    };
    let config_dir = build.join(rel);
    let _ = std::fs::remove_dir_all(&config_dir);
    std::fs::create_dir_all(&config_dir).map_err(|source| Error::Write {
        path: config_dir.clone(),
        source,
    })?;
    for (rel, bytes) in &files {
        let path = config_dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, bytes).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(Some(Workspace {
        config_dir,
        data_dir: paths.terraform.join(data),
    }))
}

/// The Terraform binary with the environment the step gets (`SSL_CERT_FILE`, src/pki.rs; the
/// Proxmox token for `tf:infra`).
pub(crate) fn terraform_for(
    project: &Project,
    root: &Path,
    step_id: &str,
) -> Result<Terraform, String> {
    let mut env: Vec<(OsString, OsString)> = vec![crate::pki::terraform_env(root, project)?];
    if step_id
        .parse::<StepId>()
        .is_ok_and(|id| id.phase() == Phase::TfInfra)
    {
        if let Some(token) = proxmox_token(project, root) {
            env.push(("PROXMOX_VE_API_TOKEN".into(), token.into()));
        }
    }
    Ok(Terraform {
        binary: crate::root::program_path(root, &project.terraform.binary),
        env,
    })
}

/// A scratch directory under `.nixmox/tmp/`, removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn temp_dir(paths: &Paths, what: &str) -> Result<Scratch> {
    let base = paths.build.parent().unwrap_or(&paths.build).join("tmp");
    let dir = base.join(format!("{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Write {
        path: dir.clone(),
        source,
    })?;
    Ok(Scratch(dir))
}

pub fn run(root: &ProjectRoot, format: PlanFormat) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let paths = Paths::new(root, project);
    let mut errors = Vec::new();
    let containers = match container_drift(project, root) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            errors.push(Unchecked {
                what: "containers (Proxmox API)".into(),
                error: e,
            });
            Vec::new()
        }
        None => Vec::new(),
    };
    if !paths.state_db.exists() {
        if project.infra != InfraBackend::ProxmoxApi {
            output::note("nothing recorded yet: run `nixmox up` first");
        }
        return finish(format, &containers, &[], &[], &[], &errors);
    }
    let store = Store::open(&paths.state_db).map_err(Error::State)?;
    let record = store.record().map_err(Error::State)?;
    let outputs = store.outputs().map_err(Error::State)?;
    let tmp = temp_dir(&paths, "drift")?;
    let build = scratch_build(root, project, &store, tmp.path())?;
    let recorded: Vec<StepId> = record
        .steps
        .keys()
        .filter_map(|id| id.parse::<StepId>().ok())
        .collect();
    let workspaces = workspace_drift(project, &paths, &store, &recorded, &build, &mut errors)?;
    let (hosts, skipped) = host_drift(project, &paths, &recorded, &outputs, &mut errors);
    finish(format, &containers, &workspaces, &hosts, &skipped, &errors)
}

/// Each recorded Terraform workspace's refresh-only plan, from the inputs of its last
/// successful apply: the drift it reports, by step id. A workspace that cannot be read is an
/// entry in `errors`.
fn workspace_drift(
    project: &Project,
    paths: &Paths,
    store: &Store,
    recorded: &[StepId],
    build: &Path,
    errors: &mut Vec<Unchecked>,
) -> Result<Vec<(StepId, Vec<terraform::DriftedResource>)>> {
    let root = &paths.root;
    let logs = paths.logs.join("drift");
    let mut workspaces = Vec::new();
    for step_id in recorded.iter().filter(|id| id.is_terraform()) {
        let ws = match recorded_workspace(store, paths, step_id, build)? {
            Some(ws) => ws,
            // Never applied (no workspace was rendered for it): nothing to compare.
            None => continue,
        };
        let opts = StepOpts {
            timeout: Some(Duration::from_secs(600)),
            log: logs.join(step_id.log_file_name()),
            redact: proxmox_token(project, root).into_iter().collect(),
            ..StepOpts::default()
        };
        let drift = terraform_for(project, root, step_id)
            .and_then(|tf| tf.drift(&ws, &opts).map_err(|e| e.to_string()));
        match drift {
            Ok(drift) => workspaces.push((step_id.clone(), drift)),
            Err(error) => errors.push(Unchecked {
                what: step_id.to_string(),
                error,
            }),
        }
    }
    Ok(workspaces)
}

/// Hosts: the running system against the generation of the last deploy. Returns the hosts
/// that drifted (hostname, why) and those not checked (why).
fn host_drift(
    project: &Project,
    paths: &Paths,
    recorded: &[StepId],
    outputs: &nixmox_core::render::Outputs,
    errors: &mut Vec<Unchecked>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut hosts = Vec::new();
    let mut skipped = Vec::new();
    let builtin = !matches!(project.nix.deployer, Deployer::Command { .. });
    let is_deploy = |id: &StepId, name: &str| {
        matches!(
            id.phase(),
            Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig
        ) && id.service() == Some(name)
    };
    for s in &project.services {
        let name = s.name.as_str();
        let generation = outputs.iter().find_map(|(step, outs)| {
            step.parse::<StepId>()
                .is_ok_and(|id| is_deploy(&id, name))
                .then(|| outs.get("generation").and_then(|v| v.as_str()))
                .flatten()
                .map(str::to_string)
        });
        if !recorded.iter().any(|id| is_deploy(id, name)) {
            continue;
        }
        if !builtin {
            skipped.push(format!(
                "{}: deployed by a custom deployer; its running system is not checked",
                s.host.hostname
            ));
            continue;
        }
        let Some(generation) = generation else {
            skipped.push(format!(
                "{}: no generation recorded at its last deploy",
                s.host.hostname
            ));
            continue;
        };
        match running_system(project, paths, s.host.ip) {
            Ok((profile, current, profile_target)) => {
                let why = system_drift(&generation, &profile, &current, &profile_target);
                if !why.is_empty() {
                    hosts.push((s.host.hostname.to_string(), why.join("; ")));
                }
            }
            Err(error) => errors.push(Unchecked {
                what: s.host.hostname.to_string(),
                error,
            }),
        }
    }
    (hosts, skipped)
}

/// How a host's running system differs from the generation NixMox deployed.
fn system_drift(
    generation: &str,
    profile: &str,
    current: &str,
    profile_target: &str,
) -> Vec<String> {
    let mut why = Vec::new();
    if profile != generation {
        why.push(format!(
            "system profile is `{profile}`, NixMox deployed `{generation}`"
        ));
    }
    if current != profile_target {
        why.push(format!(
            "/run/current-system is `{current}`, not the profile's `{profile_target}`"
        ));
    }
    why
}

/// A container whose config differs from the manifest: `CT vmid (`hostname`)` and the keys.
type ContainerDrift = (String, Vec<String>);

/// With `infra.backend: proxmox-api`: the project's containers whose config keys differ from
/// what the model wants (the lifecycle's own diff; nothing is written), and hosts without a
/// container. `None` with another backend.
fn container_drift(
    project: &Project,
    root: &ProjectRoot,
) -> Option<std::result::Result<Vec<ContainerDrift>, String>> {
    use crate::proxmox::{self, lifecycle, ClientOptions, Retry};
    if project.infra != InfraBackend::ProxmoxApi {
        return None;
    }
    let read = || -> std::result::Result<Vec<ContainerDrift>, String> {
        let settings = proxmox::Settings::from_project(project, root).map_err(|e| e.to_string())?;
        let scrub = |m: String| crate::exec::scrub(&m, &settings.secrets());
        let opts = ClientOptions {
            retry: Retry {
                attempts: 2,
                ..Retry::default()
            },
            ..ClientOptions::default()
        };
        let client = proxmox::connect(&settings, opts).map_err(|e| scrub(e.to_string()))?;
        let guests = client.guests().map_err(|e| scrub(e.to_string()))?;
        let mut out = Vec::new();
        for d in lifecycle::desired(project) {
            let label = format!("CT {} (`{}`)", d.vmid, d.hostname);
            let Some(g) = guests.iter().find(|g| {
                g.vmid == d.vmid && g.kind == "lxc" && lifecycle::is_projects(&g.tags, project)
            }) else {
                out.push((label, vec!["absent".to_string()]));
                continue;
            };
            match client
                .ct_config(&g.node, d.vmid)
                .map_err(|e| scrub(e.to_string()))?
            {
                Some(cfg) => {
                    let keys = lifecycle::diff(&d, &cfg).keys();
                    if !keys.is_empty() {
                        out.push((label, keys));
                    }
                }
                None => out.push((label, vec!["absent".to_string()])),
            }
        }
        Ok(out)
    };
    Some(read())
}

/// `(readlink profile, readlink -f /run/current-system, readlink -f profile)` on the host.
fn running_system(
    project: &Project,
    paths: &Paths,
    ip: core::net::Ipv4Addr,
) -> std::result::Result<(String, String, String), String> {
    let _ = std::fs::create_dir_all(&paths.ssh);
    let options = deploy::ssh_options(
        &paths.ssh.to_string_lossy(),
        &paths.known_hosts.to_string_lossy(),
        project.ssh.host_key_checking.as_str(),
    );
    let ssh = |remote: &[&str]| -> std::result::Result<String, String> {
        let remote: Vec<String> = remote.iter().map(|s| s.to_string()).collect();
        let argv = deploy::ssh_argv(&options, &project.ssh.user, ip, &remote);
        let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        let opts = RunOpts {
            timeout: Some(Duration::from_secs(30)),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(f) if f.code == Some(0) => Ok(f.stdout),
            Ok(f) => Err(format!(
                "reading the running system over SSH failed: {}",
                f.stderr.trim()
            )),
            Err(e) => Err(format!("reading the running system over SSH: {e}")),
        }
    };
    let profile = ssh(&["readlink", "/nix/var/nix/profiles/system"])?;
    let both = ssh(&[
        "readlink",
        "-f",
        "/run/current-system",
        "/nix/var/nix/profiles/system",
    ])?;
    let mut lines = both.lines().map(str::trim);
    let current = lines.next().unwrap_or("").to_string();
    let target = lines.next().unwrap_or("").to_string();
    Ok((profile.trim().to_string(), current, target))
}

type Drifts = [(StepId, Vec<terraform::DriftedResource>)];

fn finish(
    format: PlanFormat,
    containers: &[ContainerDrift],
    workspaces: &Drifts,
    hosts: &[(String, String)],
    skipped: &[String],
    errors: &[Unchecked],
) -> Result<()> {
    let drifted = workspaces.iter().any(|(_, d)| !d.is_empty())
        || !hosts.is_empty()
        || !containers.is_empty();
    match format {
        PlanFormat::Json => {
            let ws: Vec<_> = workspaces
                .iter()
                .map(|(step, d)| {
                    json!({
                        "step": step,
                        "drifted": d.iter().map(|r| json!({
                            "address": r.address,
                            "actions": r.actions,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let hs: Vec<_> = hosts
                .iter()
                .map(|(h, why)| json!({"host": h, "detail": why}))
                .collect();
            let cs: Vec<_> = containers
                .iter()
                .map(|(c, keys)| json!({"container": c, "keys": keys}))
                .collect();
            let doc = json!({
                "drifted": drifted,
                "containers": cs,
                "workspaces": ws,
                "hosts": hs,
                "skipped": skipped,
                "errors": errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            output::data(&format!(
                "{}\n",
                serde_json::to_string_pretty(&doc).unwrap_or_default()
            ))?;
        }
        PlanFormat::Text => {
            let mut out = String::new();
            for (c, keys) in containers {
                out.push_str(&format!(
                    "container {c}: differs from the manifest: {}\n",
                    keys.join(", ")
                ));
            }
            for (step, d) in workspaces {
                if d.is_empty() {
                    out.push_str(&format!("{step}: no drift\n"));
                }
                for r in d {
                    out.push_str(&format!(
                        "{step}: {} drifted ({})\n",
                        r.address,
                        r.actions.join(", ")
                    ));
                }
            }
            for (h, why) in hosts {
                out.push_str(&format!("host {h}: {why}\n"));
            }
            for s in skipped {
                out.push_str(&format!("skipped {s}\n"));
            }
            out.push_str(if drifted {
                "drift found\n"
            } else {
                "no drift\n"
            });
            output::data(&out)?;
        }
    }
    if !errors.is_empty() {
        return Err(Error::DriftIncomplete {
            unchecked: errors.to_vec(),
        });
    }
    if drifted {
        return Err(Error::Changes);
    }
    Ok(())
}

/// The service a step belongs to (`tf:service-infra:app` → `app`); `None` for project-wide
/// steps like `tf:infra`.
/// A string that is no step id belongs to no service.
pub(crate) fn step_service(id: &str) -> Option<&str> {
    let parsed = id.parse::<StepId>().ok()?;
    let service = parsed.service()?;
    // The service is the end of the id's text.
    id.get(id.len() - service.len()..)
}
