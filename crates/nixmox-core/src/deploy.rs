//! Command lines of the NixOS deployers and of SSH, as data. The shell runs them with one
//! executor and never through a shell, so no manifest value can change what runs.
//!
//! Every value from the project that reaches an argv here has a validated type (`Hostname`,
//! `Ipv4Addr`, `SshUser`) whose grammar cannot start with `-`, and is placed where the tool
//! cannot read it as an option anyway (`ssh -l USER -- IP`): two independent guards.

use core::net::Ipv4Addr;

use crate::ids::{Hostname, SshUser};
use crate::model::Deployer;

/// Where one host goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The host's name in the flake (`nixosConfigurations.<host>`).
    pub host: Hostname,
    pub ip: Ipv4Addr,
    pub user: SshUser,
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
                // nixos-rebuild hands this to `ssh` and `nix copy` as one word; `SshUser` and
                // `Ipv4Addr` make it `name@a.b.c.d`, which neither can read as an option.
                "--target-host".into(),
                format!("{}@{}", t.user, t.ip),
            ];
            if t.user.as_str() != "root" {
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
            t.host.to_string(),
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

/// Replaces `{host}`, `{ip}`, `{flake}`, `{flake_dir}` and `{user}` inside each argument.
/// Substitution is textual within one argument and done in one pass, so a value can never
/// become two arguments, and a substituted value is never searched for placeholders again.
pub fn substitute(template: &[String], t: &Target) -> Vec<String> {
    let ip = t.ip.to_string();
    template
        .iter()
        .map(|a| {
            let mut out = String::with_capacity(a.len());
            let mut rest = a.as_str();
            while let Some(i) = rest.find('{') {
                out.push_str(&rest[..i]);
                rest = &rest[i..];
                let value = [
                    ("{host}", t.host.as_str()),
                    ("{ip}", ip.as_str()),
                    ("{flake}", t.flake.as_str()),
                    ("{flake_dir}", t.flake_dir.as_str()),
                    ("{user}", t.user.as_str()),
                ]
                .into_iter()
                .find(|(k, _)| rest.starts_with(k));
                match value {
                    Some((k, v)) => {
                        out.push_str(v);
                        rest = &rest[k.len()..];
                    }
                    None => {
                        out.push('{');
                        rest = &rest[1..];
                    }
                }
            }
            out.push_str(rest);
            out
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

/// `ssh <options> -l user -- ip <remote argv>`: the login name is the argument of `-l` and the
/// destination comes after `--`, so neither can be read as an option whatever it holds; the
/// remote command's words are quoted for the remote shell one by one (OpenSSH joins them with
/// spaces and hands them to a shell).
pub fn ssh_argv(
    options: &[String],
    user: &SshUser,
    ip: Ipv4Addr,
    remote: &[String],
) -> Vec<String> {
    let mut argv = vec!["ssh".to_string()];
    argv.extend(options.iter().cloned());
    argv.push("-l".into());
    argv.push(user.to_string());
    argv.push("--".into());
    argv.push(ip.to_string());
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
            host: Hostname::new("web").unwrap(),
            ip: Ipv4Addr::new(10, 0, 0, 5),
            user: SshUser::new("root").unwrap(),
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
        t.user = SshUser::new("ops").unwrap();
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
        t.flake = "/p/{user} dir; rm -rf /".into();
        let argv = switch_argv(&d, &t);
        // One argument per template word, and a substituted value is not substituted again.
        assert_eq!(
            argv,
            [
                "deploy",
                "web",
                "--to=root@10.0.0.5",
                "/p/{user} dir; rm -rf /",
                "/p/.nixmox/build/nix"
            ]
        );
        assert_eq!(rollback_argv(&d, &t), None);
    }

    #[test]
    fn ssh_words_are_quoted_for_the_remote_shell() {
        let argv = ssh_argv(
            &[],
            &SshUser::new("root").unwrap(),
            Ipv4Addr::new(10, 0, 0, 5),
            &["systemctl".into(), "is-active".into(), "a b'c".into()],
        );
        assert_eq!(
            argv,
            [
                "ssh",
                "-l",
                "root",
                "--",
                "10.0.0.5",
                "systemctl",
                "is-active",
                "'a b'\\''c'"
            ]
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }

    /// Issue 13: no project value is ever in a position where a tool reads options. The
    /// types refuse a leading `-`; the argv puts the user after `-l` and the host after `--`.
    #[test]
    fn no_project_value_can_be_an_option() {
        assert!(SshUser::new("-oProxyCommand=touch /tmp/x").is_err());
        assert!(Hostname::new("-web").is_err());
        let argv = ssh_argv(
            &[],
            &SshUser::new("ops").unwrap(),
            Ipv4Addr::new(10, 0, 0, 5),
            &[],
        );
        let dash = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(argv[dash - 2], "-l");
        assert_eq!(argv[dash + 1], "10.0.0.5");
        for d in [Deployer::NixosRebuild, Deployer::Colmena] {
            for a in switch_argv(&d, &target()).iter().skip(1) {
                assert!(
                    a.starts_with("--") && a.len() > 2 || !a.starts_with('-'),
                    "{a} could be read as an option"
                );
            }
        }
    }
}
