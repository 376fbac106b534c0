//! `nixmox secrets set|rotate|list`: the hosts' SOPS files (src/secrets, docs/secrets.md).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Read};

use nixmox_core::Project;

use super::load_project;
use super::up;
use crate::cli::{PlanFormat, SecretsAction};
use crate::error::{Error, Result};
use crate::output;
use crate::root::Paths;
use crate::root::ProjectRoot;
use crate::secrets::{self, tree, SecretsError, Vault};
use crate::state::Store;

pub fn run(root: &ProjectRoot, action: SecretsAction) -> Result<()> {
    match action {
        SecretsAction::Set { service, name } => set(root, &service, &name),
        SecretsAction::Rotate {
            service,
            name,
            no_deploy,
        } => rotate(root, &service, name.as_deref(), no_deploy),
        SecretsAction::List { services, format } => list(root, &services, format),
    }
}

fn host_of<'p>(project: &'p Project, service: &str) -> Result<&'p str> {
    project
        .service(service)
        .map(|s| s.host.hostname.as_str())
        .ok_or_else(|| {
            Error::Usage(format!(
                "no service `{service}` in this project (see `nixmox config`)"
            ))
        })
}

/// The store (created and migrated if needed), with the run lock held, and the vault.
fn open(root: &ProjectRoot, project: &Project, command: &str) -> Result<(Store, Vault)> {
    let paths = Paths::new(root, project);
    let mut store = Store::open(&paths.state_db)?;
    store.acquire_lock(command)?;
    let mut vault = match Vault::open(root, project, &paths.state_db, None) {
        Ok(v) => v,
        Err(e) => {
            let _ = store.release_lock();
            return Err(e.into());
        }
    };
    vault.log = Some(paths.logs.join("secrets.log"));
    Ok((store, vault))
}

/// Reads the value: all of stdin (one trailing newline removed), or a prompt on the terminal
/// with echo off.
fn read_value(name: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let mut value = if stdin.is_terminal() {
        prompt(&format!("value of `{name}` (not shown): "))?
    } else {
        let mut buf = Vec::new();
        stdin
            .lock()
            .read_to_end(&mut buf)
            .map_err(|source| Error::Read {
                path: "<stdin>".into(),
                source,
            })?;
        String::from_utf8(buf)
            .map_err(|_| Error::Usage("the value on stdin is not UTF-8 text".into()))?
    };
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(Error::Usage(format!("no value given for `{name}`")));
    }
    Ok(value)
}

fn prompt(label: &str) -> Result<String> {
    // On /dev/tty with echo off; the typed newline is not part of the value.
    rpassword::prompt_password(label).map_err(|source| Error::Read {
        path: "/dev/tty".into(),
        source,
    })
}

fn set(root: &ProjectRoot, service: &str, name: &str) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let host = host_of(project, service)?.to_string();
    tree::check_name(name).map_err(Error::Usage)?;
    if name.starts_with("db/")
        || name.starts_with("tf/")
        || name == nixmox_core::render::nixos::AUTHENTIK_SECRET_KEY
        || name == nixmox_core::render::nixos::CA_KEY_SECRET
    {
        return Err(Error::Usage(format!(
            "`{name}` is managed by NixMox (generated secrets are `db/...`, `authentik/secret_key` and `pki/ca_key`, Terraform outputs `tf/...`): use `nixmox secrets rotate` for a new password, or change the Terraform"
        )));
    }
    let value = read_value(name)?;
    let (mut store, mut vault) = open(root, project, &format!("secrets set {service} {name}"))?;
    let result = vault.set_user(&host, name, &value);
    let released = store.release_lock();
    let written = result?;
    released?;
    let file = secrets::file_rel(&host);
    if written {
        output::note(&format!(
            "{file}: `{name}` set; `nixmox up` deploys it to {host}"
        ));
    } else {
        output::note(&format!("{file}: `{name}` already has this value"));
    }
    Ok(())
}

fn rotate(root: &ProjectRoot, service: &str, name: Option<&str>, no_deploy: bool) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    let host = host_of(project, service)?.to_string();
    let needs = secrets::generated_needs(project);
    let mine = needs.get(&host).cloned().unwrap_or_default();
    let names = match name {
        Some(n) => vec![rotatable(service, n, &mine)?],
        None => own_generated(project, service, &mine)?,
    };
    let (mut store, mut vault) = open(
        root,
        project,
        &format!("secrets rotate {service} {}", names.join(" ")),
    )?;
    let result = rotate_each(&mut vault, &names);
    let released = store.release_lock();
    let mut written = result?;
    released?;
    written.sort();
    written.dedup();
    for h in &written {
        output::note(&format!(
            "{}: re-encrypted with a new {}",
            secrets::file_rel(h),
            names.join(", ")
        ));
    }
    let users = users_of(project, &needs, &names);
    if no_deploy {
        output::note(&format!(
            "not deployed (--no-deploy): `nixmox up` redeploys {}",
            users.join(", ")
        ));
        return Ok(());
    }
    output::note(&format!("redeploying {}", users.join(", ")));
    up::run(root, &crate::cli::UpArgs::redeploy(users))
}

/// The secret `n`, when `rotate` may make a new value for it on `service`'s host (whose
/// generated secrets are `mine`); otherwise why not.
fn rotatable(service: &str, n: &str, mine: &BTreeSet<String>) -> Result<String> {
    if n == nixmox_core::render::nixos::CA_KEY_SECRET {
        // A new root must reach every host's trust store before Caddy signs with it;
        // `rotate` redeploys only the holders of a secret.
        return Err(Error::Usage(format!(
            "cannot rotate `{n}`: a new project CA must be trusted by every host first, which `secrets rotate` does not do yet; remove `{}` and `{n}` and run `nixmox up` for all hosts instead",
            nixmox_core::render::nixos::PROJECT_CA_CERT
        )));
    }
    if !mine.contains(n) {
        let why = if n.starts_with("oidc/") || n.starts_with("tf/") {
            "it comes from a Terraform output: replace the resource in Terraform (for example `terraform apply -replace`) and run `nixmox up`".to_string()
        } else if n.starts_with("db/") {
            format!("`{service}` does not use it")
        } else {
            format!("NixMox does not generate it: give a new value with `nixmox secrets set {service} {n}`")
        };
        return Err(Error::Usage(format!("cannot rotate `{n}`: {why}")));
    }
    Ok(n.to_string())
}

/// The generated secrets `service` owns (its database roles' passwords, Authentik's secret
/// key), of those its host holds (`mine`); an error when there are none.
fn own_generated(project: &Project, service: &str, mine: &BTreeSet<String>) -> Result<Vec<String>> {
    let own: Vec<String> = project
        .service(service)
        .map(|s| {
            s.dbs
                .iter()
                .map(|d| nixmox_core::providers::db_secret(&d.role))
                // What the service's provider implementations generate (authentik's key).
                .chain(
                    s.provides
                        .iter()
                        .flat_map(|provided| provided.provider.secret_names(project)),
                )
                .filter(|n| mine.contains(n))
                .collect()
        })
        .unwrap_or_default();
    if own.is_empty() {
        return Err(Error::Usage(format!(
            "`{service}` has no generated secrets of its own to rotate; name one (`nixmox secrets rotate {service} db/ROLE`), set a person's secret with `nixmox secrets set`, or replace a Terraform resource"
        )));
    }
    Ok(own)
}

/// New values for each of `names`, stopping at the first failure: the hosts whose files were
/// written.
fn rotate_each(
    vault: &mut Vault,
    names: &[String],
) -> std::result::Result<Vec<String>, SecretsError> {
    let mut written = Vec::new();
    for n in names {
        written.extend(vault.rotate(n)?);
    }
    Ok(written)
}

/// The services whose hosts use any of the rotated secrets, whether their files were written
/// now or are at their next deploy: what `rotate` redeploys.
fn users_of(
    project: &Project,
    needs: &BTreeMap<String, BTreeSet<String>>,
    names: &[String],
) -> Vec<String> {
    let mut users: Vec<String> = needs
        .iter()
        .filter(|(_, n)| names.iter().any(|x| n.contains(x)))
        .filter_map(|(h, _)| {
            project
                .services
                .iter()
                .find(|s| s.host.hostname.as_str() == h)
                .map(|s| s.name.to_string())
        })
        .collect();
    users.sort();
    users.dedup();
    users
}

fn list(root: &ProjectRoot, services: &[String], format: PlanFormat) -> Result<()> {
    let loaded = load_project(root)?;
    let project = &loaded.project;
    for s in services {
        host_of(project, s)?;
    }
    let paths = Paths::new(root, project);
    let _store = Store::open(&paths.state_db)?;
    let mut vault = Vault::open(root, project, &paths.state_db, None)?;
    vault.log = Some(paths.logs.join("secrets.log"));
    let mut rows = Vec::new();
    for s in &project.services {
        if !services.is_empty() && !services.iter().any(|x| x == s.name.as_str()) {
            continue;
        }
        let host = s.host.hostname.as_str();
        let names = vault.list(host)?;
        let key = vault.host_key(host)?;
        rows.push((s.name.to_string(), host.to_string(), names, key.is_some()));
    }
    if format == PlanFormat::Json {
        let hosts: Vec<serde_json::Value> = rows
            .iter()
            .map(|(svc, host, names, key)| {
                serde_json::json!({
                    "service": svc,
                    "host": host,
                    "file": secrets::file_rel(host),
                    "host_key_known": key,
                    "secrets": names.iter().map(|(n, src)| serde_json::json!({"name": n, "source": src})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut text =
            serde_json::to_string_pretty(&serde_json::json!({"version": 1, "hosts": hosts}))
                .unwrap_or_default();
        text.push('\n');
        return output::data(&text);
    }
    let mut text = String::new();
    for (svc, host, names, key) in &rows {
        text.push_str(&format!(
            "{} ({svc}){}\n",
            secrets::file_rel(host),
            if *key {
                ""
            } else {
                "  [host key not known yet]"
            }
        ));
        if names.is_empty() {
            text.push_str("  (none)\n");
        }
        for (n, src) in names {
            text.push_str(&format!("  {n:<40} {src}\n"));
        }
    }
    output::data(&text)
}
