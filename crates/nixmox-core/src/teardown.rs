//! What `nixmox down` and `nixmox up --remove-orphans` would destroy, as the list the operator
//! sees and confirms before anything goes: its types, its text, which confirmation it needs, and
//! the pure parts of finding it (resource addresses in rendered configurations, containers behind
//! Terraform addresses). The shell gathers the live facts (Terraform state, Proxmox guests).

use std::collections::BTreeSet;

use crate::model::{Host, Project};
use crate::render::terraform::tf_name;
use crate::RenderedFile;

/// Everything one command would destroy, gathered before anything is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    pub project: String,
    /// Every service of the project goes (`down` with no names, or all of them): confirmed by
    /// typing the project name. Otherwise `y` confirms.
    pub everything: bool,
    pub workspaces: Vec<Workspace>,
    pub containers: Vec<Container>,
    pub databases: Vec<Database>,
    /// What stays although it might be expected to go (`--keep-host`, databases without
    /// `--purge-data`), one sentence each.
    pub kept: Vec<String>,
}

/// The resources of one Terraform workspace that go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workspace {
    /// The step id, like `tf:service-infra:app`.
    pub step: String,
    pub action: WorkspaceAction,
    /// Resource addresses as `terraform state list` prints them.
    pub addresses: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkspaceAction {
    /// `terraform destroy`: everything in its state.
    Destroy,
    /// Re-applied without the removed services: the resources only they had.
    Reapply,
}

/// A Proxmox container that goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    pub via: Via,
    pub backup: Backup,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// Destroyed through the Proxmox API (`infra.backend: proxmox-api`).
    ProxmoxApi,
    /// A resource of a Terraform workspace (`infra.backend: terraform`).
    Terraform { step: String, address: String },
}

/// What is done for a container's data before it is destroyed.
///
/// A host with `host.backup` gets a vzdump backup to that storage ([`Backup::Vzdump`]) unless
/// `--no-backup`; the shell's backup hook takes it before anything is destroyed, prints its
/// volume id and records it. A snapshot is no way back here: destroying a container deletes
/// its snapshots with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backup {
    /// Nothing configured: the container's data goes with it.
    NotConfigured,
    /// Configured, but `--no-backup` was given.
    Skipped,
    /// A vzdump backup first, to `storage` in `mode`.
    Vzdump { storage: String, mode: String },
}

/// A database (and its role) dropped by `--purge-data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Database {
    pub database: String,
    pub role: String,
    /// The database provider's hostname.
    pub host: String,
}

/// How the operator confirms a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// Nothing is destroyed: nothing to confirm.
    NotNeeded,
    /// Everything goes: type the project's name.
    ProjectName(String),
    /// Part of the project goes: `y`.
    Yes,
}

/// The backup taken before `host`'s container is destroyed (see [`Backup`]).
pub fn backup_for(host: &Host, no_backup: bool) -> Backup {
    match (&host.backup, no_backup) {
        (None, _) => Backup::NotConfigured,
        (Some(_), true) => Backup::Skipped,
        (Some(b), false) => Backup::Vzdump {
            storage: b.storage.clone(),
            mode: b.mode.clone(),
        },
    }
}

impl Teardown {
    pub fn new(project: &Project, everything: bool) -> Teardown {
        Teardown {
            project: project.name.as_str().to_string(),
            everything,
            ..Teardown::default()
        }
    }

    /// Nothing would be destroyed.
    pub fn is_empty(&self) -> bool {
        self.workspaces.iter().all(|w| w.addresses.is_empty())
            && self.containers.is_empty()
            && self.databases.is_empty()
    }

    pub fn confirmation(&self) -> Confirmation {
        if self.is_empty() {
            Confirmation::NotNeeded
        } else if self.everything {
            Confirmation::ProjectName(self.project.clone())
        } else {
            Confirmation::Yes
        }
    }

    /// The list as the operator reads it (stderr), one thing per line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.is_empty() {
            out.push_str(&format!(
                "nothing is destroyed in project `{}`\n",
                self.project
            ));
        } else {
            out.push_str(&format!("this destroys, in project `{}`:\n", self.project));
        }
        if !self.containers.is_empty() {
            out.push_str("  containers:\n");
            for c in &self.containers {
                let via = match &c.via {
                    Via::ProxmoxApi => "through the Proxmox API".to_string(),
                    Via::Terraform { step, address } => format!("{address} in {step}"),
                };
                let backup = match &c.backup {
                    Backup::NotConfigured => "no backup configured".to_string(),
                    Backup::Skipped => "no backup (--no-backup)".to_string(),
                    Backup::Vzdump { storage, mode } => {
                        format!("backed up first (vzdump to `{storage}`, mode {mode})")
                    }
                };
                out.push_str(&format!(
                    "    CT {} (`{}`) on node {}: {via}; {backup}\n",
                    c.vmid, c.name, c.node
                ));
            }
        }
        for w in self.workspaces.iter().filter(|w| !w.addresses.is_empty()) {
            let how = match w.action {
                WorkspaceAction::Destroy => "terraform destroy",
                WorkspaceAction::Reapply => "re-applied without the removed services",
            };
            out.push_str(&format!("  Terraform resources of {} ({how}):\n", w.step));
            for a in &w.addresses {
                out.push_str(&format!("    {a}\n"));
            }
        }
        if !self.databases.is_empty() {
            out.push_str("  databases (--purge-data):\n");
            for d in &self.databases {
                out.push_str(&format!(
                    "    database `{}` and role `{}` on {}\n",
                    d.database, d.role, d.host
                ));
            }
        }
        for k in &self.kept {
            out.push_str(&format!("  kept: {k}\n"));
        }
        out
    }
}

/// Whether `answer` (a line typed on the terminal) confirms.
pub fn accepts(confirmation: &Confirmation, answer: &str) -> bool {
    let answer = answer.trim();
    match confirmation {
        Confirmation::NotNeeded => true,
        Confirmation::ProjectName(name) => answer == name,
        Confirmation::Yes => matches!(answer, "y" | "Y" | "yes" | "Yes" | "YES"),
    }
}

/// The prompt for a confirmation.
pub fn prompt(confirmation: &Confirmation) -> String {
    match confirmation {
        Confirmation::NotNeeded => String::new(),
        Confirmation::ProjectName(name) => {
            format!("type the project's name (`{name}`) to destroy all of the above: ")
        }
        Confirmation::Yes => "destroy the above? [y/N] ".to_string(),
    }
}

/// The managed resource addresses (`type.name`) a rendered workspace declares: the files under
/// `dir` (like `terraform/infra`) ending in `.tf.json`.
pub fn resource_addresses(files: &[RenderedFile], dir: &str) -> BTreeSet<String> {
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    let mut out = BTreeSet::new();
    for f in files
        .iter()
        .filter(|f| f.path.starts_with(&prefix) && f.path.ends_with(".tf.json"))
    {
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&f.contents) else {
            continue;
        };
        let Some(types) = doc.get("resource").and_then(|r| r.as_object()) else {
            continue;
        };
        for (ty, names) in types {
            if let Some(names) = names.as_object() {
                out.extend(names.keys().map(|n| format!("{ty}.{n}")));
            }
        }
    }
    out
}

/// The addresses of `state` that re-applying `config` destroys: managed resources (not data
/// sources) the configuration no longer declares. An instance key (`x.y["k"]`, `x.y[0]`) belongs
/// to its resource.
pub fn gone_on_reapply(state: &[String], config: &BTreeSet<String>) -> Vec<String> {
    state
        .iter()
        .filter(|a| !is_data_source(a))
        .filter(|a| {
            let base = a.split('[').next().unwrap_or(a);
            !config.contains(base)
        })
        .cloned()
        .collect()
}

/// Data sources are read, never destroyed: leave them out of a list of what goes.
pub fn managed_only(state: Vec<String>) -> Vec<String> {
    state.into_iter().filter(|a| !is_data_source(a)).collect()
}

fn is_data_source(address: &str) -> bool {
    // `data.x.y`, or `module.m.data.x.y`.
    address.starts_with("data.") || address.contains(".data.")
}

/// The containers behind `addresses` of the `tf:infra` workspace (`infra.backend: terraform`):
/// each service's `proxmox_virtual_environment_container.<name>`, with its host's vmid and node.
pub fn terraform_containers(
    project: &Project,
    step: &str,
    addresses: &[String],
    no_backup: bool,
) -> Vec<Container> {
    let mut out = Vec::new();
    for s in &project.services {
        let address = format!(
            "proxmox_virtual_environment_container.{}",
            tf_name(s.name.as_str())
        );
        if addresses.contains(&address) {
            out.push(Container {
                vmid: s.host.vmid.get(),
                node: s.host.node.clone(),
                name: s.host.hostname.as_str().to_string(),
                via: Via::Terraform {
                    step: step.to_string(),
                    address,
                },
                backup: backup_for(&s.host, no_backup),
            });
        }
    }
    out.sort_by_key(|c| c.vmid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Teardown {
        Teardown {
            project: "homelab".into(),
            everything: false,
            workspaces: vec![
                Workspace {
                    step: "tf:service-config:worker".into(),
                    action: WorkspaceAction::Destroy,
                    addresses: vec!["null_resource.hook".into()],
                },
                Workspace {
                    step: "tf:auth-core".into(),
                    action: WorkspaceAction::Reapply,
                    addresses: vec![],
                },
            ],
            containers: vec![Container {
                vmid: 911,
                node: "pve".into(),
                name: "worker".into(),
                via: Via::ProxmoxApi,
                backup: Backup::NotConfigured,
            }],
            databases: vec![Database {
                database: "wiki".into(),
                role: "wiki".into(),
                host: "postgresql".into(),
            }],
            kept: vec![],
        }
    }

    #[test]
    fn the_list_names_every_thing_and_says_there_is_no_backup() {
        assert_eq!(
            list().render(),
            "this destroys, in project `homelab`:\n  containers:\n    CT 911 (`worker`) on node \
             pve: through the Proxmox API; no backup configured\n  Terraform resources of \
             tf:service-config:worker (terraform destroy):\n    null_resource.hook\n  databases \
             (--purge-data):\n    database `wiki` and role `wiki` on postgresql\n"
        );
    }

    /// Issue 14: a host with `host.backup` is backed up first unless `--no-backup`, and the
    /// list says which.
    #[test]
    fn a_host_with_a_backup_is_listed_as_backed_up_first_unless_no_backup() {
        let mut t = list();
        t.containers[0].backup = Backup::Vzdump {
            storage: "local".into(),
            mode: "snapshot".into(),
        };
        assert!(t.render().contains(
            "CT 911 (`worker`) on node pve: through the Proxmox API; backed up first (vzdump to `local`, mode snapshot)"
        ));
        t.containers[0].backup = Backup::Skipped;
        assert!(t.render().contains("; no backup (--no-backup)"));
    }

    #[test]
    fn everything_needs_the_project_name_and_a_part_needs_y() {
        let mut t = list();
        assert_eq!(t.confirmation(), Confirmation::Yes);
        assert!(accepts(&Confirmation::Yes, "y\n"));
        assert!(accepts(&Confirmation::Yes, " yes "));
        assert!(!accepts(&Confirmation::Yes, ""));
        assert!(!accepts(&Confirmation::Yes, "n"));
        t.everything = true;
        let c = t.confirmation();
        assert_eq!(c, Confirmation::ProjectName("homelab".into()));
        assert!(accepts(&c, "homelab\n"));
        assert!(!accepts(&c, "y"));
        assert!(!accepts(&c, "homelab2"));
        let empty = Teardown {
            project: "homelab".into(),
            everything: true,
            ..Teardown::default()
        };
        assert_eq!(empty.confirmation(), Confirmation::NotNeeded);
        assert_eq!(
            empty.render(),
            "nothing is destroyed in project `homelab`\n"
        );
    }

    #[test]
    fn reapplying_destroys_what_the_configuration_no_longer_declares() {
        let files = vec![
            RenderedFile {
                path: "terraform/infra/main.tf.json".into(),
                contents:
                    r#"{"resource":{"proxmox_virtual_environment_container":{"dns":{},"app":{}}}}"#
                        .into(),
            },
            RenderedFile {
                path: "terraform/infrastructure/main.tf.json".into(),
                contents: r#"{"resource":{"null_resource":{"x":{}}}}"#.into(),
            },
        ];
        let config = resource_addresses(&files, "terraform/infra");
        assert_eq!(
            config.iter().cloned().collect::<Vec<_>>(),
            vec![
                "proxmox_virtual_environment_container.app".to_string(),
                "proxmox_virtual_environment_container.dns".to_string()
            ]
        );
        let state: Vec<String> = [
            "data.authentik_flow.authorization",
            "proxmox_virtual_environment_container.app",
            "proxmox_virtual_environment_container.wiki",
            "null_resource.x[\"k\"]",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            gone_on_reapply(&state, &config),
            vec![
                "proxmox_virtual_environment_container.wiki".to_string(),
                "null_resource.x[\"k\"]".to_string()
            ]
        );
        assert_eq!(
            managed_only(state),
            vec![
                "proxmox_virtual_environment_container.app".to_string(),
                "proxmox_virtual_environment_container.wiki".to_string(),
                "null_resource.x[\"k\"]".to_string()
            ]
        );
    }
}
