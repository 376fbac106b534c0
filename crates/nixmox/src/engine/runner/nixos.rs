//! `nix:*` steps: the NixOS deployer switches the service's host to its rendered
//! configuration (after the host's secrets are generated and its file hashed), and the
//! generation it switched to is read back for rollback and `drift`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nixmox_core::deploy;
use nixmox_core::model::{Deployer, Service};

use super::{StepExec, StepReport};
use crate::engine::scheduler::Outcome;
use crate::exec::{self, Cmd, Finished, RunOpts};
use crate::state::OutputValue;

/// A deploy's command line, and what its end is read against.
struct DeployCommand {
    cmd: Cmd,
    /// The deployer as the operator knows it (`argv[0]` as configured).
    program: String,
    /// NixMox's own deployers (not `nix.deployer.command`): reached over SSH.
    builtin: bool,
    /// The build flake the host's configuration is in.
    flake: PathBuf,
}

impl StepExec<'_> {
    /// Switches the service's host to its configuration. The report gets the generation it
    /// switched to (an output) and the host file it used.
    pub(super) fn deploy(&self, index: usize, service: &str, report: &mut StepReport) -> Outcome {
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Outcome::Failed {
                error: format!("{}: no service `{service}`", step.id),
                transient: false,
            };
        };
        if let Err(e) = self.secrets_before_deploy(index, s.host.hostname.as_str(), report) {
            return self.failed(step, &e);
        }
        let d = self.deploy_command(s);
        // Ctrl-C lets running steps finish: no cancel flag reaches the process.
        let opts = RunOpts {
            timeout: Some(self.timeout),
            log: Some(self.log_path(index)),
            redact: self.redactions(),
            ..RunOpts::default()
        };
        match exec::run(&d.cmd, &opts) {
            Ok(fin) if fin.code == Some(0) => self.deployed(index, s, &d, report),
            Ok(fin) => Outcome::Failed {
                error: format!("{}: {}", step.id, deploy_failure(s, &d.program, &fin)),
                // OpenSSH exits 255 when it cannot connect: worth another try.
                transient: fin.code == Some(255),
            },
            Err(e) => Outcome::Failed {
                error: format!(
                    "{}: deploying {} ({}): {e}",
                    step.id, s.host.hostname, s.host.ip
                ),
                transient: false,
            },
        }
    }

    /// The deployer's command line for the service's host, run from the build flake.
    fn deploy_command(&self, s: &Service) -> DeployCommand {
        let flake = self.paths.build.join("nix");
        let target = deploy::Target {
            host: s.host.hostname.clone(),
            ip: s.host.ip,
            user: self.project.ssh.user.clone(),
            flake: crate::flake::reference(&flake),
            flake_dir: flake.to_string_lossy().into_owned(),
        };
        let argv = deploy::switch_argv(&self.project.nix.deployer, &target);
        let program = crate::root::program_path(&self.paths.root, &argv[0]);
        let mut cmd = Cmd::new(program).args(&argv[1..]).cwd(&flake);
        let builtin = !matches!(self.project.nix.deployer, Deployer::Command { .. });
        if builtin {
            cmd.env
                .push(("NIX_SSHOPTS".into(), self.ssh_options().join(" ").into()));
        }
        DeployCommand {
            cmd,
            program: argv[0].clone(),
            builtin,
            flake,
        }
    }

    /// After a deploy that succeeded: the host file it used and, with a built-in deployer,
    /// the generation it switched to (for rollback). A custom deployer has its own way back,
    /// and NixMox does not assume it can reach the host over SSH.
    fn deployed(
        &self,
        index: usize,
        s: &Service,
        d: &DeployCommand,
        report: &mut StepReport,
    ) -> Outcome {
        let host_rel = format!("hosts/{}.nix", s.host.hostname);
        let mut rendered = BTreeMap::new();
        if let Ok(bytes) = std::fs::read(d.flake.join(&host_rel)) {
            rendered.insert(host_rel, bytes);
        }
        let mut outputs = Vec::new();
        let mut detail = format!("{} switched", s.host.hostname);
        if d.builtin {
            match self.current_generation(s.host.ip, index) {
                Some(generation) => {
                    detail = format!("{} switched to {generation}", s.host.hostname);
                    outputs.push(OutputValue {
                        name: "generation".into(),
                        value: serde_json::Value::String(generation),
                        sensitive: false,
                    });
                }
                None => detail.push_str(" (the system generation could not be read back over SSH)"),
            }
        }
        report.outputs = outputs;
        report.rendered = Some(rendered);
        Outcome::Done {
            changed: true,
            detail,
        }
    }

    pub(super) fn ssh_options(&self) -> Vec<String> {
        let _ = std::fs::create_dir_all(&self.paths.ssh);
        deploy::ssh_options(
            &self.paths.ssh.to_string_lossy(),
            &self.paths.known_hosts.to_string_lossy(),
            self.project.ssh.host_key_checking.as_str(),
        )
    }

    /// `readlink /nix/var/nix/profiles/system` on the host: the generation now active.
    fn current_generation(&self, ip: core::net::Ipv4Addr, index: usize) -> Option<String> {
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

/// Why a deploy failed: the deployer's exit and the last lines it wrote.
fn deploy_failure(s: &Service, program: &str, fin: &Finished) -> String {
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
    format!(
        "deploying {} ({}) with `{program}` exited with {code}: {}",
        s.host.hostname,
        s.host.ip,
        if tail.is_empty() {
            "no output".into()
        } else {
            tail
        }
    )
}
