//! Runs one step for real: a Terraform workspace for `tf:*` steps, the NixOS deployer for
//! `nix:*` steps, the service's checks for `verify:*`. Everything a step produced (outputs,
//! the rendered inputs it used) is kept for the main thread to record.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nixmox_core::deploy;
use nixmox_core::model::{Deployer, InfraBackend, SecretRef};
use nixmox_core::plan::{Phase, Plan};
use nixmox_core::Project;

use super::scheduler::{Outcome, Runner};
use super::Paths;
use crate::exec::{self, Cmd, RunOpts};
use crate::state::OutputValue;
use crate::terraform::{self, StepOpts, Terraform, TfError, Workspace};

/// What a step leaves behind for the state store.
#[derive(Default)]
pub struct Artifacts {
    pub outputs: Vec<OutputValue>,
    pub rendered: Option<BTreeMap<String, Vec<u8>>>,
}

pub struct StepExec<'a> {
    project: &'a Project,
    plan: &'a Plan,
    paths: &'a Paths,
    logs: PathBuf,
    timeout: Duration,
    artifacts: Mutex<Vec<Option<Artifacts>>>,
    /// Secret values to scrub from logs and messages.
    redact: Mutex<Vec<String>>,
}

impl<'a> StepExec<'a> {
    pub fn new(
        project: &'a Project,
        plan: &'a Plan,
        paths: &'a Paths,
        logs: &Path,
        timeout: Duration,
    ) -> Self {
        let mut redact = Vec::new();
        if let Some(token) = proxmox_token(project) {
            redact.push(token);
        }
        StepExec {
            project,
            plan,
            paths,
            logs: logs.to_path_buf(),
            timeout,
            artifacts: Mutex::new((0..plan.steps.len()).map(|_| None).collect()),
            redact: Mutex::new(redact),
        }
    }

    pub fn log_path(&self, index: usize) -> PathBuf {
        self.logs.join(format!(
            "{}.log",
            self.plan.steps[index].id.replace(':', "_")
        ))
    }

    pub fn take_artifacts(&self, index: usize) -> Artifacts {
        self.artifacts
            .lock()
            .map(|mut a| a[index].take())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn keep(&self, index: usize, a: Artifacts) {
        if let Ok(mut all) = self.artifacts.lock() {
            all[index] = Some(a);
        }
    }

    fn redactions(&self) -> Vec<String> {
        self.redact.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn terraform(&self, index: usize, phase: Phase, service: Option<&str>) -> Outcome {
        let step = &self.plan.steps[index];
        let config_dir = match (phase, service) {
            (Phase::TfInfra, _) => self.paths.build.join("terraform/infra"),
            (Phase::TfAuthCore, _) => self.paths.build.join("terraform/auth-core"),
            (Phase::TfServiceInfra, Some(s)) => self
                .paths
                .build
                .join(format!("terraform/services/{s}/infra")),
            (Phase::TfServiceConfig, Some(s)) => self
                .paths
                .build
                .join(format!("terraform/services/{s}/config")),
            _ => {
                return Outcome::Failed {
                    error: format!("{}: not a Terraform step", step.id),
                    transient: false,
                }
            }
        };
        if phase == Phase::TfInfra && self.project.infra != InfraBackend::Terraform {
            return Outcome::Failed {
                error: format!(
                    "tf:infra: infra.backend `{}` is not handled by the Terraform runner",
                    self.project.infra.as_str()
                ),
                transient: false,
            };
        }
        if !config_dir.is_dir() {
            return Outcome::Done {
                changed: false,
                detail: "no Terraform workspace rendered".into(),
            };
        }
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        if phase == Phase::TfInfra {
            if let Some(token) = proxmox_token(self.project) {
                env.push(("PROXMOX_VE_API_TOKEN".into(), token.into()));
            }
        }
        let tf = Terraform {
            binary: PathBuf::from(&self.project.terraform.binary),
            env,
        };
        let ws = Workspace {
            config_dir: config_dir.clone(),
            data_dir: self
                .paths
                .terraform
                .join(terraform::workspace_slug(&step.id)),
        };
        let apply_order: Vec<String> = service
            .and_then(|s| self.project.service(s))
            .map(|s| {
                let want = if phase == Phase::TfServiceInfra {
                    nixmox_core::model::TfPhase::ServiceInfra
                } else {
                    nixmox_core::model::TfPhase::ServiceConfig
                };
                s.terraform
                    .iter()
                    .filter(|t| t.phase == want)
                    .flat_map(|t| t.apply_order.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let opts = StepOpts {
            apply_order,
            timeout: Some(self.timeout),
            log: self.log_path(index),
            // Ctrl-C lets a running Terraform finish (it holds a state lock).
            cancel: None,
            redact: self.redactions(),
        };
        match tf.apply_step(&ws, &opts) {
            Ok(applied) => {
                let mut sensitive = Vec::new();
                let outputs: Vec<OutputValue> = applied
                    .outputs
                    .into_iter()
                    .map(|o| {
                        if o.sensitive {
                            collect_strings(&o.value, &mut sensitive);
                        }
                        OutputValue {
                            name: o.name,
                            value: o.value,
                            sensitive: o.sensitive,
                        }
                    })
                    .collect();
                if let Ok(mut r) = self.redact.lock() {
                    r.extend(sensitive);
                }
                self.keep(
                    index,
                    Artifacts {
                        outputs,
                        rendered: Some(super::read_inputs(&config_dir)),
                    },
                );
                let detail = if applied.changed {
                    "applied"
                } else {
                    "no changes"
                };
                Outcome::Done {
                    changed: applied.changed,
                    detail: detail.into(),
                }
            }
            Err(e) => {
                let transient = matches!(
                    &e,
                    TfError::Failed {
                        transient: true,
                        ..
                    }
                );
                Outcome::Failed {
                    error: format!("{}: {}", step.id, scrub(&e.to_string(), &self.redactions())),
                    transient,
                }
            }
        }
    }

    fn deploy(&self, index: usize, service: &str) -> Outcome {
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Outcome::Failed {
                error: format!("{}: no service `{service}`", step.id),
                transient: false,
            };
        };
        let flake = self.paths.build.join("nix");
        let target = deploy::Target {
            host: s.host.hostname.to_string(),
            ip: s.host.ip.to_string(),
            user: self.project.ssh.user.clone(),
            flake: flake.to_string_lossy().into_owned(),
        };
        let argv = deploy::switch_argv(&self.project.nix.deployer, &target);
        let mut cmd = Cmd::new(&argv[0]).args(&argv[1..]).cwd(&flake);
        let builtin = !matches!(self.project.nix.deployer, Deployer::Command { .. });
        if builtin {
            cmd.env
                .push(("NIX_SSHOPTS".into(), self.ssh_options().join(" ").into()));
        }
        // Ctrl-C lets running steps finish: no cancel flag reaches the process.
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: Some(self.log_path(index)),
            redact: self.redactions(),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => {
                let host_file = flake.join(format!("hosts/{}.nix", s.host.hostname));
                let mut rendered = BTreeMap::new();
                if let Ok(bytes) = std::fs::read(&host_file) {
                    rendered.insert(format!("hosts/{}.nix", s.host.hostname), bytes);
                }
                // The generation it switched to, for rollback. A custom deployer has its own way
                // back, and NixMox does not assume it can reach the host over SSH.
                let mut outputs = Vec::new();
                let mut detail = format!("{} switched", s.host.hostname);
                if builtin {
                    match self.current_generation(&s.host.ip.to_string(), index) {
                        Some(generation) => {
                            detail = format!("{} switched to {generation}", s.host.hostname);
                            outputs.push(OutputValue {
                                name: "generation".into(),
                                value: serde_json::Value::String(generation),
                                sensitive: false,
                            });
                        }
                        None => detail
                            .push_str(" (the system generation could not be read back over SSH)"),
                    }
                }
                self.keep(
                    index,
                    Artifacts {
                        outputs,
                        rendered: Some(rendered),
                    },
                );
                Outcome::Done {
                    changed: true,
                    detail,
                }
            }
            Ok(fin) => {
                let tail: String = fin
                    .stderr
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" | ");
                let code = fin
                    .code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "a signal".into());
                // OpenSSH exits 255 when it cannot connect: worth another try.
                Outcome::Failed {
                    error: format!(
                        "{}: deploying {} ({}) with `{}` exited with {code}: {}",
                        step.id,
                        s.host.hostname,
                        s.host.ip,
                        argv[0],
                        if tail.is_empty() {
                            "no output".into()
                        } else {
                            tail
                        }
                    ),
                    transient: fin.code == Some(255),
                }
            }
            Err(e) => Outcome::Failed {
                error: format!(
                    "{}: deploying {} ({}): {e}",
                    step.id, s.host.hostname, s.host.ip
                ),
                transient: false,
            },
        }
    }
}

impl StepExec<'_> {
    fn ssh_options(&self) -> Vec<String> {
        let _ = std::fs::create_dir_all(&self.paths.ssh);
        deploy::ssh_options(
            &self.paths.ssh.to_string_lossy(),
            &self.paths.known_hosts.to_string_lossy(),
            self.project.ssh.host_key_checking.as_str(),
        )
    }

    /// `readlink /nix/var/nix/profiles/system` on the host: the generation now active.
    fn current_generation(&self, ip: &str, index: usize) -> Option<String> {
        let remote = [
            "readlink".to_string(),
            "/nix/var/nix/profiles/system".to_string(),
        ];
        let argv = deploy::ssh_argv(&self.ssh_options(), &self.project.ssh.user, ip, &remote);
        let cmd = Cmd::new(&argv[0]).args(&argv[1..]);
        let opts = RunOpts {
            timeout: Some(Duration::from_secs(30)),
            log: Some(self.log_path(index)),
            ..RunOpts::default()
        };
        match exec::run(&cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => {
                Some(fin.stdout.trim().to_string()).filter(|g| !g.is_empty())
            }
            _ => None,
        }
    }
}

impl Runner for StepExec<'_> {
    fn run(&self, index: usize, _attempt: u32) -> Outcome {
        let step = &self.plan.steps[index];
        if let Some(dir) = self.log_path(index).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match step.phase {
            Phase::TfInfra | Phase::TfAuthCore | Phase::TfServiceInfra | Phase::TfServiceConfig => {
                self.terraform(index, step.phase, step.service.as_deref())
            }
            Phase::NixCore | Phase::NixCoreAuth | Phase::NixServiceConfig => match step.service.as_deref() {
                Some(s) => self.deploy(index, s),
                None => Outcome::Failed { error: format!("{}: no service", step.id), transient: false },
            },
            Phase::Verify => Outcome::Done {
                changed: false,
                detail: "deploy finished; health gates and end-to-end checks are not run by this version".into(),
            },
        }
    }
}

/// The Proxmox API token, read from where `proxmox.token` says, if it is there.
pub fn proxmox_token(project: &Project) -> Option<String> {
    match &project.proxmox.token {
        SecretRef::Env(var) => std::env::var(var).ok().filter(|v| !v.is_empty()),
        SecretRef::File(path) => std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|v| !v.is_empty()),
    }
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) if s.len() >= 4 => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// Replaces known secret values in a message.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}
