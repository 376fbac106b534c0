//! The provider implementations: one module per implementation of a capability (`postgresql`
//! for `database`, `caddy` and `nginx` for `reverse_proxy`, `unbound` for `dns`, `authentik`
//! for `identity`), each behind the one [`Provider`] trait, and the [`REGISTRY`] that lists
//! them. An implementation owns what is particular to it: the ports its host opens, its part of
//! the host's NixOS configuration, the secrets NixMox generates for it, the end-to-end probes
//! of its consumers (as data: the shell runs them), its part of the Terraform workspaces, the
//! flake inputs its host builds from, the commands `down --purge-data` and `backup` run on its
//! host, and the checks of what it rendered. Everything else names the capability and asks the
//! registry.
//!
//! Adding an implementation is one new module here and one line in [`REGISTRY`]
//! (docs/providers.md).

pub mod authentik;
pub mod caddy;
pub mod nginx;
pub mod postgresql;
pub mod unbound;

use core::net::Ipv4Addr;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::model::{Capability, Project, Proxy, SecretAccess, Service};
use crate::nixexpr::Nix;

/// Every implementation NixMox knows. The first one of each capability is its default (what
/// `provides: { <capability>: }` without a `type` means).
pub static REGISTRY: &[&dyn Provider] = &[
    &unbound::Unbound,
    &postgresql::Postgresql,
    &caddy::Caddy,
    &nginx::Nginx,
    &authentik::Authentik,
];

/// One implementation of a capability.
pub trait Provider: Sync {
    /// The capability it implements.
    fn capability(&self) -> Capability;
    /// Its name in a manifest (`provides: { reverse_proxy: { type: caddy } }`).
    fn implementation(&self) -> &'static str;
    /// The ports its host's firewall opens for it.
    fn ports(&self) -> Ports;
    /// The port its consumers connect to (a database's, the identity provider's HTTP port).
    fn service_port(&self) -> Option<u16> {
        None
    }
    /// NixOS modules its host imports (before the service's own modules).
    fn imports(&self) -> Vec<Nix> {
        Vec::new()
    }
    /// The build flake's inputs (by their names in `nix.inputs`) that only its host needs: the
    /// flake declares one only when the project runs an implementation that names it, and only
    /// that implementation's host's steps depend on its locked revision.
    fn flake_inputs(&self) -> &'static [&'static str] {
        &[]
    }
    /// Its part of its host's NixOS configuration, derived from every consumer; `me` is the
    /// providing service's index.
    fn host_config(&self, p: &Project, me: usize, host: &mut HostConfig);
    /// The secrets NixMox generates for its host (names in the host's secrets file).
    fn secret_names(&self, p: &Project) -> Vec<String> {
        let _ = p;
        Vec::new()
    }
    /// The end-to-end probes of a consumer `s` of this capability.
    fn probes(&self, p: &Project, s: &Service) -> Vec<Probe> {
        let _ = (p, s);
        Vec::new()
    }
    /// What `down --purge-data` runs on its host to drop a removed service's database and,
    /// when given, its role. `None` for a capability without data.
    fn purge(&self, database: &str, role: Option<&str>) -> Option<Purge> {
        let _ = (database, role);
        None
    }
    /// What `nixmox backup` runs on its host to dump a consumer's database into `dir`, beside
    /// the container's backup. `None` for a capability without data.
    fn dump(&self, database: &str, dir: &str) -> Option<Dump> {
        let _ = (database, dir);
        None
    }
    /// Its part of a Terraform workspace: the identity provider's `tf:auth-core`, or a
    /// consumer's `tf:service-infra`. `None` when it adds nothing there.
    fn terraform(&self, p: &Project, ws: TfWorkspace<'_>) -> Option<TfBlocks> {
        let _ = (p, ws);
        None
    }
    /// The Terraform resource types it renders that hold data: a saved plan that deletes or
    /// replaces one is applied only with `up --allow-destroy`.
    fn protected_types(&self) -> &'static [&'static str] {
        &[]
    }
    /// Problems with what it rendered for its host (`me` is the providing service's index),
    /// found without running its tools: for the tests and the fuzz target
    /// (`render::verify::rendered`). Each problem names the file or site it is in.
    fn check(&self, p: &Project, me: usize) -> Vec<String> {
        let _ = (p, me);
        Vec::new()
    }
    /// Problems with a route this reverse proxy cannot serve (reported at the route).
    fn check_route(&self, x: &Proxy) -> Vec<String> {
        let _ = x;
        Vec::new()
    }
    /// Whether its sites are signed by the project CA (whose key NixMox then generates for
    /// its host and every host trusts).
    fn uses_project_ca(&self) -> bool {
        false
    }
    /// How a reverse proxy asks this identity provider whether a request may pass.
    fn forward_auth(&self, me: &Service) -> Option<ForwardAuth> {
        let _ = me;
        None
    }
}

/// The ports a provider's host opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub tcp: &'static [u16],
    pub udp: &'static [u16],
}

/// A host's NixOS configuration while it is built: its options and its `sops.secrets`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostConfig {
    pub options: BTreeMap<String, Nix>,
    pub secrets: BTreeMap<String, Nix>,
}

/// An end-to-end check of a consumer, as data for the shell to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The DNS server answers `name` with `expect`.
    DnsRecord { name: String, expect: Ipv4Addr },
    /// A route answers through the reverse proxy at `via`: non-5xx, or, with `idp`, a redirect
    /// (followed on the route's own domain) to the identity provider's domain.
    Route {
        https: bool,
        domain: String,
        path: String,
        via: Ipv4Addr,
        idp: Option<String>,
    },
    /// The consumer's role logs in to its database from the consumer's host.
    Login(Login),
    /// The OIDC discovery document answers and names `issuer`.
    Oidc { issuer: String },
}

/// A database login check: `bash -c script` on the consumer's host, with the arguments
/// `secret path, server, port, role, database, timeout seconds`. The script's exit statuses:
/// 0 logged in (or, with [`Login::no_client`] on stdout, only the port was reachable because
/// the client is not installed), 3 the password file cannot be read, 5 no connection, other
/// statuses the client's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub server: Ipv4Addr,
    pub port: u16,
    pub database: String,
    pub role: String,
    /// The secret holding the role's password (its name in the host's secrets file).
    pub secret: String,
    /// The client program the script runs (`psql`), for messages.
    pub client: &'static str,
    pub script: &'static str,
    /// The line the script prints when the client is missing and only the port was checked.
    pub no_client: &'static str,
}

/// What `down --purge-data` runs on the database host over SSH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purge {
    /// The statements, shown to the operator when NixMox does not run them itself.
    pub statements: Vec<String>,
    /// The remote command line that runs them.
    pub argv: Vec<String>,
    /// The account they run as, for the operator's instructions.
    pub run_as: &'static str,
}

/// What `nixmox backup` runs on the database host over SSH to dump one database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    /// The remote command lines, in order (the directory made, then the dump).
    pub commands: Vec<Vec<String>>,
    /// Where the dump is written on the database host.
    pub file: String,
    /// The kind the state store records it as (`pg_dump`).
    pub kind: &'static str,
    /// How the operator is told it is made (`pg_dump --format=custom`).
    pub how: &'static str,
}

/// A Terraform workspace an implementation may add blocks to.
#[derive(Clone, Copy, Debug)]
pub enum TfWorkspace<'a> {
    /// `tf:auth-core`, the identity provider's project-wide workspace.
    AuthCore,
    /// `tf:service-infra:<service>`, a consumer's infrastructure workspace.
    ServiceInfra(&'a Service),
}

/// The top-level blocks an implementation adds to a Terraform workspace (JSON configuration
/// syntax), merged with the other parts of the workspace; the renderer sorts every object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TfBlocks {
    /// `terraform.required_providers`: the local name, its source and its version constraint.
    pub required: Vec<(&'static str, (&'static str, &'static str))>,
    /// `provider`: each provider's configuration, by its local name.
    pub provider: Map<String, Value>,
    pub variable: Map<String, Value>,
    pub data: Map<String, Value>,
    pub resource: Map<String, Value>,
    pub output: Map<String, Value>,
}

impl TfBlocks {
    /// Adds `other`'s blocks to these, object into object.
    pub fn merge(&mut self, other: TfBlocks) {
        self.required.extend(other.required);
        merge_json(&mut self.provider, other.provider);
        merge_json(&mut self.variable, other.variable);
        merge_json(&mut self.data, other.data);
        merge_json(&mut self.resource, other.resource);
        merge_json(&mut self.output, other.output);
    }
}

/// Merges `from` into `into`, recursing where both hold an object under the same key.
pub fn merge_json(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge_json(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// How a reverse proxy hands a request to the identity provider's outpost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardAuth {
    /// The outpost's base URL (`http://10.0.0.5:9000`).
    pub upstream: String,
    /// The path prefix the outpost serves on every protected domain.
    pub prefix: &'static str,
    /// The response headers copied to the upstream, space-separated.
    pub copy_headers: &'static str,
}

/// The implementation of `cap` named `name`, if registered.
pub fn find(cap: Capability, name: &str) -> Option<&'static dyn Provider> {
    REGISTRY
        .iter()
        .copied()
        .find(|p| p.capability() == cap && p.implementation() == name)
}

/// The default implementation of a capability: the first one registered.
pub fn default_for(cap: Capability) -> &'static dyn Provider {
    implementations(cap)
        .next()
        .expect("every capability has a registered implementation")
}

/// Every implementation of a capability, the default first.
pub fn implementations(cap: Capability) -> impl Iterator<Item = &'static dyn Provider> {
    REGISTRY
        .iter()
        .copied()
        .filter(move |p| p.capability() == cap)
}

/// The names of a capability's implementations as a reader sees them: `` `caddy` or `nginx` ``.
pub fn names(cap: Capability) -> String {
    let all: Vec<String> = implementations(cap)
        .map(|p| format!("`{}`", p.implementation()))
        .collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => all.join(""),
    }
}

/// Whether the build flake declares the input `name`: an input no implementation claims
/// (`Provider::flake_inputs`) always, a claimed one when the project runs its implementation.
pub fn project_needs_input(p: &Project, name: &str) -> bool {
    !claimed(name) || p.services.iter().any(|s| runs_claimant(s, name))
}

/// Whether service `s`'s host builds from the input `name`: an unclaimed input on every host, a
/// claimed one on the hosts of the implementations that claim it.
pub fn service_needs_input(s: &Service, name: &str) -> bool {
    !claimed(name) || runs_claimant(s, name)
}

fn claimed(name: &str) -> bool {
    REGISTRY
        .iter()
        .any(|imp| imp.flake_inputs().contains(&name))
}

fn runs_claimant(s: &Service, name: &str) -> bool {
    s.provides
        .iter()
        .any(|c| c.provider.flake_inputs().contains(&name))
}

/// Every Terraform resource type a registered implementation protects
/// (`Provider::protected_types`).
pub fn protected_types() -> impl Iterator<Item = &'static str> {
    REGISTRY
        .iter()
        .flat_map(|imp| imp.protected_types().iter().copied())
}

/// The secret holding a database role's password, on the database host and the consumer's.
pub fn db_secret(role: &str) -> String {
    format!("db/{role}")
}

/// `config.sops.secrets."<name>".path`: where sops-nix puts a decrypted secret.
pub fn secret_path(name: &str) -> Nix {
    Nix::select("config.sops.secrets", &[name, "path"])
}

/// `config.sops.placeholder."<name>"`: what sops-nix replaces with the secret in a template.
pub fn placeholder(name: &str) -> Nix {
    Nix::select("config.sops.placeholder", &[name])
}

/// `sops.secrets.<name>` for a secret a service reads: its owner, group and mode as the
/// manifest says (root and 0400 by default). sops-nix gives an owner without a group the
/// owner's primary group.
pub fn secret_access(a: &SecretAccess) -> Nix {
    let mut m = BTreeMap::from([("mode".to_string(), Nix::str(&a.mode))]);
    if let Some(owner) = &a.owner {
        m.insert("owner".into(), Nix::str(owner.as_str()));
    }
    if let Some(group) = &a.group {
        m.insert("group".into(), Nix::str(group.as_str()));
    }
    Nix::Attrs(m)
}

/// A consumer's routes through the reverse proxy: the probes every reverse proxy
/// implementation has (the proxy is reached at `via`, with the route's domain).
pub fn route_probes(p: &Project, s: &Service, via: Ipv4Addr) -> Vec<Probe> {
    let idp = crate::render::idp_domain(p);
    s.proxies
        .iter()
        .map(|x| Probe::Route {
            https: x.tls,
            domain: x.domain.to_string(),
            path: x.path.clone(),
            via,
            idp: if x.authz { idp.clone() } else { None },
        })
        .collect()
}

/// The routes of every service, grouped by domain, most specific path first (`/` last, the
/// fallback) — the order every reverse proxy matches them in.
pub fn routes_by_site(
    p: &Project,
    site: impl Fn(&Proxy) -> String,
) -> BTreeMap<String, Vec<(&Service, &Proxy)>> {
    let mut sites: BTreeMap<String, Vec<(&Service, &Proxy)>> = BTreeMap::new();
    for s in &p.services {
        for x in &s.proxies {
            sites.entry(site(x)).or_default().push((s, x));
        }
    }
    for routes in sites.values_mut() {
        routes.sort_by(|a, b| {
            b.1.path
                .len()
                .cmp(&a.1.path.len())
                .then(a.1.path.cmp(&b.1.path))
        });
    }
    sites
}

/// The address a route's upstream is reached at: the service's own IP for a bare port.
pub fn upstream(s: &Service, x: &Proxy) -> String {
    match &x.upstream {
        crate::model::Upstream::Port(port) => format!("{}:{port}", s.host.ip),
        crate::model::Upstream::HostPort(h, port) => format!("{h}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_has_one_default_and_unique_names() {
        for cap in Capability::ALL {
            assert_eq!(default_for(cap).capability(), cap);
            let names: Vec<_> = implementations(cap).map(|p| p.implementation()).collect();
            let mut unique = names.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(names.len(), unique.len(), "{names:?}");
        }
        assert_eq!(
            default_for(Capability::ReverseProxy).implementation(),
            "caddy"
        );
        assert_eq!(names(Capability::ReverseProxy), "`caddy` or `nginx`");
        assert_eq!(names(Capability::Database), "`postgresql`");
        assert!(find(Capability::ReverseProxy, "nginx").is_some());
        assert!(find(Capability::Database, "nginx").is_none());
    }
}
