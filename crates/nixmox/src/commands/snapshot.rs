//! `nixmox snapshot list|create|rollback`: the containers' snapshots through the PVE API
//! (docs/proxmox.md, "Snapshots"). NixMox's own are those it recorded in the state store and
//! named as it names them; others are listed as foreign and never deleted.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nixmox_core::model::{InfraBackend, Service};
use nixmox_core::providers::Dump;
use nixmox_core::snapshot::{self, Kind};
use nixmox_core::Project;
use serde_json::json;

use super::config::select;
use crate::cli::{PlanFormat, SnapshotAction};
use crate::error::{BackupError, Error, Result};
use crate::proxmox::snapshot as pve_snapshot;
use crate::proxmox::{self, Client, ClientOptions, Settings};
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::state::{SnapshotRow, Store};
use crate::{confirm, output};

/// How long one snapshot task (and a lock held by a backup) is waited for.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `nixmox snapshot list|create|rollback`.
pub fn run(root: &ProjectRoot, action: SnapshotAction) -> Result<()> {
    match action {
        SnapshotAction::List { services, format } => list(root, &services, format),
        SnapshotAction::Create { service } => create(root, &service),
        SnapshotAction::Rollback { service, name, yes } => {
            rollback(root, &service, name.as_deref(), yes)
        }
    }
}

fn open(root: &ProjectRoot) -> Result<(Project, Client)> {
    let loaded = super::load_project(root)?;
    let project = loaded.project;
    if project.infra == InfraBackend::None {
        return Err(Error::Usage(
            "snapshots need NixMox's containers: infra.backend is `none` (the hosts are not containers NixMox manages)".into(),
        ));
    }
    let settings = Settings::from_project(&project, root)?;
    if let Some(w) = settings.tls.warning() {
        output::note(&format!("warning: {w}"));
    }
    let client = proxmox::connect(
        &settings,
        ClientOptions {
            task_timeout: TIMEOUT,
            ..ClientOptions::default()
        },
    )?;
    Ok((project, client))
}

/// The names the store records as NixMox's for a container.
fn recorded(root: &ProjectRoot, project: &Project, vmid: u32) -> Result<Vec<SnapshotRow>> {
    let paths = Paths::new(root, project);
    if !paths.state_db.exists() {
        return Ok(Vec::new());
    }
    Ok(Store::open(&paths.state_db)?.snapshots(Some(vmid))?)
}

fn service<'p>(project: &'p Project, name: &str) -> Result<&'p Service> {
    select(project, &[name.to_string()])?;
    project
        .service(name)
        .ok_or_else(|| Error::Usage(format!("no service `{name}`")))
}

/// `nixmox snapshot list [SERVICE...]`.
pub fn list(root: &ProjectRoot, services: &[String], format: PlanFormat) -> Result<()> {
    let (project, client) = open(root)?;
    select(&project, services)?;
    let chosen: Vec<&Service> = project
        .services
        .iter()
        .filter(|s| services.is_empty() || services.iter().any(|n| n == s.name.as_str()))
        .collect();
    let mut rows = Vec::new();
    for s in chosen {
        let vmid = s.host.vmid.get();
        let ours = recorded(root, &project, vmid)?;
        let names: BTreeSet<&str> = ours.iter().map(|r| r.name.as_str()).collect();
        for p in pve_snapshot::list(&client, &s.host.node, vmid)? {
            let row = ours.iter().find(|r| r.name == p.name);
            let nixmox = names.contains(p.name.as_str()) && snapshot::parse(&p.name).is_some();
            rows.push(json!({
                "service": s.name.as_str(),
                "vmid": vmid,
                "node": s.host.node,
                "name": p.name,
                "snaptime": p.snaptime,
                "taken_by": if nixmox { "nixmox" } else { "foreign" },
                "step": row.and_then(|r| r.step_id.clone()),
                "run": row.and_then(|r| r.run),
                "rolled_back_to": row.and_then(|r| r.rolled_back.as_ref().map(|(at, _)| at.clone())),
                "description": p.description,
            }));
        }
    }
    let text = match format {
        PlanFormat::Json => {
            let mut t = serde_json::to_string_pretty(&json!({"version": 1, "snapshots": rows}))
                .unwrap_or_default();
            t.push('\n');
            t
        }
        PlanFormat::Text => {
            let mut t = String::from("SERVICE\tVMID\tNAME\tTAKEN BY\tNOTE\n");
            for r in &rows {
                let note = match (&r["step"], &r["rolled_back_to"]) {
                    (_, serde_json::Value::String(at)) => format!("rolled back to at {at}"),
                    (serde_json::Value::String(step), _) => format!("before {step}"),
                    _ => r["description"].as_str().unwrap_or_default().to_string(),
                };
                t.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    r["service"].as_str().unwrap_or_default(),
                    r["vmid"],
                    r["name"].as_str().unwrap_or_default(),
                    r["taken_by"].as_str().unwrap_or_default(),
                    nixmox_core::diag::visible(&note)
                ));
            }
            t
        }
    };
    output::data(&text)
}

/// `nixmox snapshot create SERVICE`: prints the snapshot's name on stdout.
pub fn create(root: &ProjectRoot, name: &str) -> Result<()> {
    let (project, client) = open(root)?;
    let s = service(&project, name)?;
    let vmid = s.host.vmid.get();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let snap = snapshot::name(now, Kind::Manual, s.name.as_str());
    output::note(&format!(
        "snapshotting CT {vmid} (`{}`) on node {}…",
        s.host.hostname, s.host.node
    ));
    pve_snapshot::take(
        &client,
        &s.host.node,
        vmid,
        &snap,
        "taken by NixMox, `nixmox snapshot create`",
        Instant::now() + TIMEOUT,
    )?;
    let paths = Paths::new(root, &project);
    let mut store = Store::open(&paths.state_db)?;
    store.record_snapshot(&SnapshotRow {
        vmid,
        node: s.host.node.clone(),
        name: snap.clone(),
        service: s.name.to_string(),
        run: None,
        step_id: None,
        taken_at: crate::state::timestamp(),
        rolled_back: None,
    })?;
    output::data(&format!("{snap}\n"))
}

/// `nixmox snapshot rollback SERVICE [NAME]`: NAME defaults to the newest of NixMox's
/// snapshots of the container. Asks first; then the container is rolled back and started.
pub fn rollback(root: &ProjectRoot, name: &str, snap: Option<&str>, yes: bool) -> Result<()> {
    let (project, client) = open(root)?;
    let s = service(&project, name)?;
    let vmid = s.host.vmid.get();
    let present = pve_snapshot::list(&client, &s.host.node, vmid)?;
    let target = match snap {
        Some(n) => {
            if !snapshot::valid_name(n) {
                return Err(Error::Usage(format!(
                    "`{}` is not a snapshot name (a letter, then letters, digits, `-` and `_`, at most 40)",
                    nixmox_core::diag::visible(n)
                )));
            }
            if !present.iter().any(|p| p.name == n) {
                return Err(Error::Usage(format!(
                    "CT {vmid} (`{}`) has no snapshot `{n}`; `nixmox snapshot list {}` shows them",
                    s.host.hostname, s.name
                )));
            }
            n.to_string()
        }
        None => {
            let ours: BTreeSet<String> = recorded(root, &project, vmid)?
                .into_iter()
                .map(|r| r.name)
                .collect();
            present
                .iter()
                .filter(|p| ours.contains(&p.name))
                .max_by_key(|p| (snapshot::parse(&p.name).map(|n| n.run), p.snaptime))
                .map(|p| p.name.clone())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "CT {vmid} (`{}`) has no snapshot NixMox took; name one (`nixmox snapshot list {}`)",
                        s.host.hostname, s.name
                    ))
                })?
        }
    };
    confirm::ask(
        &format!(
            "CT {vmid} (`{}`) on node {} goes back to snapshot {target}: everything written since is lost, and the container restarts",
            s.host.hostname, s.host.node
        ),
        "roll back",
        yes,
    )?;
    pve_snapshot::rollback(
        &client,
        &s.host.node,
        vmid,
        &target,
        true,
        Instant::now() + TIMEOUT,
    )?;
    let paths = Paths::new(root, &project);
    if paths.state_db.exists() {
        Store::open(&paths.state_db)?.snapshot_rolled_back(vmid, &target, None)?;
    }
    output::note(&format!(
        "CT {vmid} (`{}`) rolled back to {target} and started; `nixmox ps {}` shows its health",
        s.host.hostname, s.name
    ));
    Ok(())
}

/// `nixmox backup SERVICE [--storage S] [--mode M]`: a vzdump of the service's container now,
/// awaited; prints the archive's volume id and records it.
pub fn backup(
    root: &ProjectRoot,
    name: &str,
    storage: Option<&str>,
    mode: Option<&str>,
) -> Result<()> {
    let (project, client) = open(root)?;
    let s = service(&project, name)?;
    let configured = s.host.backup.as_ref();
    let storage = storage
        .map(str::to_string)
        .or_else(|| configured.map(|b| b.storage.clone()))
        .ok_or_else(|| {
            Error::Usage(format!(
                "`{}` has no host.backup in its manifest: give the storage with --storage",
                s.name
            ))
        })?;
    if nixmox_core::ids::check_storage_id(&storage).is_err() {
        return Err(Error::Usage(format!(
            "`{}` is not a Proxmox storage id",
            nixmox_core::diag::visible(&storage)
        )));
    }
    let mode = mode
        .map(str::to_string)
        .or_else(|| configured.map(|b| b.mode.clone()))
        .unwrap_or_else(|| "snapshot".into());
    let vmid = s.host.vmid.get();
    output::note(&format!(
        "backing up CT {vmid} (`{}`) to `{storage}` (vzdump, mode {mode})…",
        s.host.hostname
    ));
    let volid = crate::proxmox::backup::vzdump(&client, &s.host.node, vmid, &storage, &mode)?
        .ok_or_else(|| Error::Backup {
            vmid,
            source: BackupError::NoArchive {
                storage: storage.clone(),
            },
        })?;
    let paths = Paths::new(root, &project);
    Store::open(&paths.state_db)?.record_backup(&crate::state::BackupRow {
        service: s.name.to_string(),
        vmid,
        node: s.host.node.clone(),
        volid: volid.clone(),
        kind: "vzdump".into(),
        reason: "`nixmox backup`".into(),
        taken_at: crate::state::timestamp(),
    })?;
    output::data(&format!("{volid}\n"))?;
    let dumps = dump_databases(root, &project, &paths, s, &volid)?;
    for d in &dumps {
        output::data(&format!("{d}\n"))?;
    }
    Ok(())
}

/// The logical dumps beside a backup: each database the service owns (`interface.db`) dumped
/// on the database host by its implementation's command (`Provider::dump`: `pg_dump
/// --format=custom` as postgres), over SSH with the built-in deployers, into
/// `proxmox::backup::dump_dir(service, volid)`; each is recorded in the state store
/// (`backups`, the dump's kind, the database host's vmid and node). Returns them as
/// `<database host>:<path>`. With a custom deployer NixMox does not reach the hosts itself:
/// the commands are printed for the operator and nothing is returned.
fn dump_databases(
    root: &ProjectRoot,
    project: &Project,
    paths: &Paths,
    s: &Service,
    volid: &str,
) -> Result<Vec<String>> {
    use crate::proxmox::backup::{dump_dir, dump_name_ok};
    use nixmox_core::model::{Capability, Deployer};
    if s.dbs.is_empty() {
        return Ok(Vec::new());
    }
    let (Some(pg), Some(imp)) = (
        project.provider(Capability::Database),
        project.implementation(Capability::Database),
    ) else {
        output::note("the project has no database provider: no logical dump");
        return Ok(Vec::new());
    };
    if let Some(bad) = s.dbs.iter().find(|d| !dump_name_ok(&d.database)) {
        return Err(Error::Usage(format!(
            "database `{}` of `{}` is not a plain PostgreSQL name: not dumped",
            nixmox_core::diag::visible(&bad.database),
            s.name
        )));
    }
    let dir = dump_dir(s.name.as_str(), volid);
    // What the database implementation runs to dump each one.
    let dumps: Vec<(&str, Dump)> = s
        .dbs
        .iter()
        .filter_map(|d| {
            imp.dump(&d.database, &dir)
                .map(|x| (d.database.as_str(), x))
        })
        .collect();
    if matches!(project.nix.deployer, Deployer::Command { .. }) {
        print_dump_commands(pg, volid, &dumps);
        return Ok(Vec::new());
    }
    let shell = crate::remote::HostShell::of(project, root, paths, pg)?;
    let mut store = Store::open(&paths.state_db)?;
    let mut out = Vec::new();
    for (database, dump) in &dumps {
        output::note(&format!(
            "dumping database `{database}` on {} ({}) to {}…",
            pg.host.hostname, dump.how, dump.file
        ));
        for remote in &dump.commands {
            let opts = crate::exec::RunOpts {
                timeout: Some(TIMEOUT),
                log: Some(paths.logs.join("backup").join(format!("{}.log", s.name))),
                ..Default::default()
            };
            shell.run(
                remote,
                &opts,
                &format!("the backup {volid} was taken, but dumping database `{database}`"),
            )?;
        }
        store.record_backup(&crate::state::BackupRow {
            service: s.name.to_string(),
            vmid: pg.host.vmid.get(),
            node: pg.host.node.clone(),
            volid: dump.file.clone(),
            kind: dump.kind.into(),
            reason: format!("`nixmox backup`, beside {volid}"),
            taken_at: crate::state::timestamp(),
        })?;
        out.push(format!("{}:{}", pg.host.hostname, dump.file));
    }
    Ok(out)
}

/// With a custom deployer: the dump commands, for the operator to run on the database host.
fn print_dump_commands(pg: &Service, volid: &str, dumps: &[(&str, Dump)]) {
    let mut text = format!(
        "with a custom deployer NixMox does not dump databases itself; to keep a logical \
         dump beside {volid}, run on the database host {} ({}):\n",
        pg.host.hostname, pg.host.ip
    );
    for (_, dump) in dumps {
        for c in &dump.commands {
            let words: Vec<String> = c
                .iter()
                .map(|w| nixmox_core::deploy::shell_quote(w))
                .collect();
            text.push_str(&format!("  {}\n", words.join(" ")));
        }
    }
    output::note(text.trim_end());
}

/// `nixmox restore SERVICE --from VOLID`: after confirmation, the container is replaced by the
/// backup (stopped first; `POST /nodes/{node}/lxc` with `restore=1`, `force=1`), started, and
/// the service's startup and readiness checks run.
pub fn restore(root: &ProjectRoot, name: &str, from: &str, yes: bool) -> Result<()> {
    let (project, client) = open(root)?;
    let s = service(&project, name)?;
    if nixmox_core::ids::check_volume_id(from).is_err() || !from.contains("vzdump-lxc-") {
        return Err(Error::Usage(format!(
            "`{}` is not a container backup's volume id (like `local:backup/vzdump-lxc-912-2026_11_29-21_00_00.tar.zst`)",
            nixmox_core::diag::visible(from)
        )));
    }
    let vmid = s.host.vmid.get();
    let node = s.host.node.as_str();
    confirm::ask(
        &format!(
            "CT {vmid} (`{}`) on node {node} is replaced by the backup {from}: everything written since that backup is lost",
            s.host.hostname
        ),
        "restore",
        yes,
    )?;
    let step = |what: &str| {
        Error::pve_during(format!(
            "restoring CT {vmid} (`{}`): {what}",
            s.host.hostname
        ))
    };
    client.stop_ct(node, vmid).map_err(step("stop"))?;
    let params = [
        ("vmid".to_string(), vmid.to_string()),
        ("ostemplate".to_string(), from.to_string()),
        ("restore".to_string(), "1".to_string()),
        ("force".to_string(), "1".to_string()),
        ("storage".to_string(), project.proxmox.storage.clone()),
    ];
    client
        .write(
            proxmox::Method::Post,
            &format!("/nodes/{}/lxc", proxmox::api::encode_segment(node)),
            &params,
        )
        .map_err(step("restore"))?;
    client.start_ct(node, vmid).map_err(step("start"))?;
    output::note(&format!(
        "CT {vmid} (`{}`) restored from {from} and started",
        s.host.hostname
    ));
    let paths = Paths::new(root, &project);
    let ctx = crate::health::Context::for_project(&project, root, &paths.ssh, &paths.known_hosts)
        .map_err(Error::Usage)?;
    let started = Instant::now();
    match crate::health::steps::after_deploy(&ctx, s, started, Some(started + TIMEOUT), None) {
        Ok(Some(passed)) => {
            output::note(&format!("health: {passed}"));
            Ok(())
        }
        Ok(None) => {
            output::note("health: the service has no startup or readiness checks");
            Ok(())
        }
        Err(e) => Err(Error::RestoredUnhealthy {
            vmid,
            hostname: s.host.hostname.to_string(),
            from: from.to_string(),
            source: crate::health::HealthFailure(e),
        }),
    }
}
