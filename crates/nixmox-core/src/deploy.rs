//! Command lines of the NixOS deployers, as data. The shell runs them with one executor and
//! never through a shell, so no manifest value can change what runs.

use crate::model::Deployer;

/// Where one host goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host's name in the flake (`nixosConfigurations.<host>`).
    pub host: String,
    pub ip: String,
    pub user: String,
    /// The rendered flake as a flake reference: `path:<absolute .nixmox/build/nix>`. A bare
    /// path would be read as the enclosing git repository, where `.nixmox/` is ignored.
    pub flake: String,
    /// The rendered flake's directory, absolute (`{flake_dir}` for a custom deployer).
    pub flake_dir: String,
}

/// The argv that switches a host to its rendered configuration.
pub fn switch_argv(deployer: &Deployer, t: &Target) -> Vec<String> {
    match deployer {
        Deployer::NixosRebuild => {
            let mut argv = vec![
                "nixos-rebuild".to_string(),
                "switch".into(),
                "--flake".into(),
                format!("{}#{}", t.flake, t.host),
                "--target-host".into(),
                format!("{}@{}", t.user, t.ip),
            ];
            if t.user != "root" {
                argv.push("--use-remote-sudo".into());
            }
            argv
        }
        Deployer::Colmena => vec![
            "colmena".into(),
            "apply".into(),
            // Colmena takes a flake reference here as well as a path (anything with a `:`).
            "--config".into(),
            t.flake.clone(),
            "--on".into(),
            t.host.clone(),
        ],
        Deployer::Command { command, .. } => substitute(command, t),
    }
}

/// The argv that returns a host to its previous generation, when the deployer has one.
/// For the built-in deployers this is `nixos-rebuild switch --rollback` on the host itself
/// (over SSH, see the shell); a custom deployer names its own way back, or none.
pub fn rollback_argv(deployer: &Deployer, t: &Target) -> Option<Vec<String>> {
    match deployer {
        Deployer::NixosRebuild | Deployer::Colmena => Some(vec![
            "nixos-rebuild".into(),
            "switch".into(),
            "--rollback".into(),
        ]),
        Deployer::Command { rollback, .. } if !rollback.is_empty() => Some(substitute(rollback, t)),
        Deployer::Command { .. } => None,
    }
}

/// Replaces `{host}`, `{ip}`, `{flake}`, `{flake_dir}` and `{user}` inside each argument. Substitution is
/// textual within one argument: a value can never become two arguments.
pub fn substitute(template: &[String], t: &Target) -> Vec<String> {
    template
        .iter()
        .map(|a| {
            a.replace("{host}", &t.host)
                .replace("{ip}", &t.ip)
                .replace("{flake_dir}", &t.flake_dir)
                .replace("{flake}", &t.flake)
                .replace("{user}", &t.user)
        })
        .collect()
}

/// OpenSSH options every connection uses: no prompts, one shared connection per host, host
/// keys remembered in the project's own known_hosts (accept-new on first contact).
pub fn ssh_options(control_dir: &str, known_hosts: &str, strict: &str) -> Vec<String> {
    vec![
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ControlMaster=auto".into(),
        "-o".into(),
        format!("ControlPath={control_dir}/%C"),
        "-o".into(),
        "ControlPersist=60".into(),
        "-o".into(),
        format!("UserKnownHostsFile={known_hosts}"),
        "-o".into(),
        format!("StrictHostKeyChecking={strict}"),
        "-o".into(),
        "ConnectTimeout=10".into(),
    ]
}

/// `ssh <options> user@ip -- <remote argv>`: the remote command's words are quoted for the
/// remote shell one by one (OpenSSH joins them with spaces and hands them to a shell).
pub fn ssh_argv(options: &[String], user: &str, ip: &str, remote: &[String]) -> Vec<String> {
    let mut argv = vec!["ssh".to_string()];
    argv.extend(options.iter().cloned());
    argv.push(format!("{user}@{ip}"));
    argv.push("--".into());
    argv.extend(remote.iter().map(|w| shell_quote(w)));
    argv
}

/// Quotes one word for a POSIX shell: safe characters as they are, everything else in single
/// quotes with embedded quotes closed and reopened.
pub fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            host: "web".into(),
            ip: "10.0.0.5".into(),
            user: "root".into(),
            flake: "path:/p/.nixmox/build/nix".into(),
            flake_dir: "/p/.nixmox/build/nix".into(),
        }
    }

    #[test]
    fn builtin_deployers() {
        assert_eq!(
            switch_argv(&Deployer::NixosRebuild, &target()),
            [
                "nixos-rebuild",
                "switch",
                "--flake",
                "path:/p/.nixmox/build/nix#web",
                "--target-host",
                "root@10.0.0.5"
            ]
        );
        let mut t = target();
        t.user = "ops".into();
        assert!(switch_argv(&Deployer::NixosRebuild, &t).contains(&"--use-remote-sudo".to_string()));
        assert_eq!(
            switch_argv(&Deployer::Colmena, &target()),
            [
                "colmena",
                "apply",
                "--config",
                "path:/p/.nixmox/build/nix",
                "--on",
                "web"
            ]
        );
    }

    #[test]
    fn custom_templates_substitute_within_arguments() {
        let d = Deployer::Command {
            command: vec![
                "deploy".into(),
                "{host}".into(),
                "--to={user}@{ip}".into(),
                "{flake}".into(),
                "{flake_dir}".into(),
            ],
            rollback: vec![],
        };
        let mut t = target();
        t.host = "web; rm -rf /".into();
        let argv = switch_argv(&d, &t);
        assert_eq!(
            argv,
            [
                "deploy",
                "web; rm -rf /",
                "--to=root@10.0.0.5",
                "path:/p/.nixmox/build/nix",
                "/p/.nixmox/build/nix"
            ]
        );
        assert_eq!(rollback_argv(&d, &t), None);
    }

    #[test]
    fn ssh_words_are_quoted_for_the_remote_shell() {
        let argv = ssh_argv(
            &[],
            "root",
            "10.0.0.5",
            &["systemctl".into(), "is-active".into(), "a b'c".into()],
        );
        assert_eq!(
            argv,
            [
                "ssh",
                "root@10.0.0.5",
                "--",
                "systemctl",
                "is-active",
                "'a b'\\''c'"
            ]
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }
}
