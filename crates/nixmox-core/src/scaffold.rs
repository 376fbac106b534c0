//! The files `nixmox init` writes: a project with the four core services and one example app,
//! which validates as written.

use crate::RenderedFile;

/// A project name from a directory's name: lowercased, other characters turned into `-`.
pub fn name_from_dir(dir: &str) -> String {
    let mut out = String::new();
    for c in dir.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    match out.chars().next() {
        Some(c) if c.is_ascii_lowercase() => out
            .chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches('-')
            .to_string(),
        Some(_) => format!("p-{}", out.chars().take(60).collect::<String>())
            .trim_end_matches('-')
            .to_string(),
        None => "homelab".to_string(),
    }
}

fn file(path: &str, contents: String) -> RenderedFile {
    RenderedFile {
        path: path.to_string(),
        contents,
    }
}

/// Every file of a new project, `name` and `domain` already validated by the caller.
pub fn project(name: &str, domain: &str) -> Vec<RenderedFile> {
    let mut files = vec![
        file(".gitignore", "# NixMox's local state, logs, build output and Terraform state (which holds secrets)\n.nixmox/\n".into()),
        file("nixmox.yaml", project_file(name, domain)),
    ];
    files.extend(manifests(domain));
    files.extend(modules());
    files
}

/// `nixmox.yaml`: the project file, every setting a new project needs.
fn project_file(name: &str, d: &str) -> String {
    format!(
        r#"# yaml-language-server: $schema=https://nixmox.dev/schema/nixmox.schema.json
# The NixMox project file. Every field but project, domain and network.cidr/gateway has a
# default; see docs/manifest.md.
project: {name}
domain: {d}
network:
  cidr: 192.168.99.0/24
  gateway: 192.168.99.1
  bridge: vmbr0
# Services without host.ip / host.vmid get the lowest free value (recorded in nixmox.lock).
pools:
  vmid: 900-999
  ip: 192.168.99.100-192.168.99.199
proxmox:
  endpoint: https://pve.{d}:8006
  node: pve
  storage: local-lvm
  template: local:vztmpl/nixos-26.05-x86_64-linux.tar.xz
  token: {{ env: PROXMOX_API_TOKEN }}   # never the secret itself
infra:
  backend: terraform                   # or proxmox-api, or none (hosts exist already)
ssh:
  user: root
  authorized_keys: []                  # add your public key here
deploy:
  parallel: 4
"#
    )
}

/// The four core services' manifests and the example app's, `hello`.
fn manifests(d: &str) -> Vec<RenderedFile> {
    vec![
        file(
            "services/dns/manifest.yaml",
            format!(
                r#"name: dns
description: Unbound resolver, authoritative for {d}
provides:
  dns: {{ type: unbound }}
host:
  ip: 192.168.99.10
  resources: {{ cores: 1, memory: 512 }}
nixos: {{ modules: [./configuration.nix] }}
interface:
  health:
    startup: systemctl is-active --quiet unbound
    readiness: [ {{ dns: dns.{d}, expect: 192.168.99.10 }} ]
"#
            ),
        ),
        file(
            "services/postgresql/manifest.yaml",
            r#"name: postgresql
description: PostgreSQL for every service that declares a db
provides:
  database: { type: postgresql }
host:
  ip: 192.168.99.11
  resources: { cores: 2, memory: 2048, disk_gb: 32 }
nixos: { modules: [./configuration.nix] }
interface:
  health:
    startup: systemctl is-active --quiet postgresql
    readiness: [ { tcp: "127.0.0.1:5432" } ]
"#
            .into(),
        ),
        file(
            "services/caddy/manifest.yaml",
            format!(
                r#"name: caddy
description: Caddy reverse proxy for every route the services declare
provides:
  reverse_proxy: {{ type: caddy }}
host:
  ip: 192.168.99.12
nixos: {{ modules: [./configuration.nix] }}
interface:
  health:
    startup: systemctl is-active --quiet caddy
    readiness: [ {{ tcp: "caddy.{d}:443" }} ]
"#
            ),
        ),
        file(
            "services/authentik/manifest.yaml",
            format!(
                r#"name: authentik
description: Authentik identity provider (OIDC and forward-auth)
provides:
  identity: {{ type: authentik }}
host:
  ip: 192.168.99.13
  resources: {{ cores: 2, memory: 4096, disk_gb: 16 }}
nixos: {{ modules: [./configuration.nix] }}
interface:
  db: {{ database: authentik, role: authentik }}
  proxy: {{ domain: auth.{d}, upstream: 9000 }}
  health:
    startup: systemctl is-active --quiet authentik
    readiness: https://auth.{d}/-/health/ready/
    start_period: 60s
"#
            ),
        ),
        file(
            "services/hello/manifest.yaml",
            format!(
                r#"# An example app: it asks for a database and a route; NixMox configures PostgreSQL, Caddy
# and DNS for it. Copy this directory to add your own service.
name: hello
description: Example web app
host:
  resources: {{ cores: 1, memory: 512 }}
nixos: {{ modules: [./configuration.nix] }}
interface:
  db: {{ database: hello, role: hello }}
  proxy: {{ domain: hello.{d}, upstream: 8080 }}
  health:
    liveness: http://hello.{d}:8080/
    interval: 10s
"#
            ),
        ),
    ]
}

/// Each service's NixOS module.
fn modules() -> Vec<RenderedFile> {
    vec![
        file(
            "services/dns/configuration.nix",
            nix_module("Unbound is configured by NixMox from every service's requirements."),
        ),
        file(
            "services/postgresql/configuration.nix",
            nix_module("Databases and roles come from every service's `db`."),
        ),
        file(
            "services/caddy/configuration.nix",
            nix_module("Routes come from every service's `proxy`."),
        ),
        file(
            "services/authentik/configuration.nix",
            nix_module("Authentik is configured by NixMox; add your own settings here."),
        ),
        file(
            "services/hello/configuration.nix",
            r#"# The example app's own NixOS module. Connection facts NixMox derives are under
# `config.nixmox` (e.g. config.nixmox.db.hello.host).
{ config, pkgs, lib, ... }:
{
  systemd.services.hello = {
    wantedBy = [ "multi-user.target" ];
    serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server 8080";
    serviceConfig.DynamicUser = true;
  };
}
"#
            .into(),
        ),
    ]
}

fn nix_module(comment: &str) -> String {
    format!("# {comment}\n{{ config, pkgs, lib, ... }}:\n{{\n}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_dirs() {
        assert_eq!(name_from_dir("My Lab"), "my-lab");
        assert_eq!(name_from_dir("2024"), "p-2024");
        assert_eq!(name_from_dir("___"), "homelab");
    }
}
