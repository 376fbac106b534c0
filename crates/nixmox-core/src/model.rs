//! The validated project: what every later stage (planner, renderers, engine) works on.
//!
//! Nothing here is optional that the rest of the program needs: defaults are applied, aliases
//! (the vision document's `requirements:` form) are normalised, allocations are made and the
//! implicit dependency edges are explicit. The model is deliberately not `Serialize`; output
//! formats have their own types (see `config_out`).

use core::net::Ipv4Addr;
use std::collections::BTreeMap;

use crate::ids::{
    Cidr, DomainName, Hostname, ProjectName, Range, ServiceName, SshUser, UnixName, VmId,
};
use crate::providers::Provider;

#[derive(Clone, Debug, PartialEq)]
pub struct Project {
    pub name: ProjectName,
    pub domain: DomainName,
    pub network: Network,
    pub pools: Pools,
    pub proxmox: Proxmox,
    pub infra: InfraBackend,
    pub ssh: Ssh,
    pub nix: Nix,
    pub terraform: Terraform,
    pub defaults: Defaults,
    pub state: StateConfig,
    pub secrets: Secrets,
    pub deploy: Deploy,
    /// Sorted by name.
    pub services: Vec<Service>,
    /// Dependency edges, consumer → provider, sorted and without duplicates.
    pub edges: Vec<Edge>,
    /// The provider of each capability (index into `services`), in `Capability::ALL` order;
    /// looked up often while planning and rendering, so found once.
    pub providers: [Option<usize>; 4],
}

impl Project {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.services[i])
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.services
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
    }
    /// The service providing a capability, if any.
    pub fn provider(&self, cap: Capability) -> Option<&Service> {
        self.provider_index(cap).map(|i| &self.services[i])
    }
    pub fn provider_index(&self, cap: Capability) -> Option<usize> {
        self.providers[cap as usize]
    }
    /// The implementation of a capability the project runs, if any service provides it.
    pub fn implementation(&self, cap: Capability) -> Option<&'static dyn Provider> {
        self.provider(cap).and_then(|s| s.implementation(cap))
    }
    /// The FQDN of a service's host.
    pub fn fqdn(&self, s: &Service) -> String {
        format!("{}.{}", s.host.hostname, self.domain)
    }
    /// Edges leaving service `i` (what it depends on).
    pub fn deps_of(&self, i: usize) -> impl Iterator<Item = &Edge> {
        // Edges are sorted by `from` first, so this is a range, not a scan.
        let start = self.edges.partition_point(|e| e.from < i);
        let end = self.edges.partition_point(|e| e.from <= i);
        self.edges[start..end].iter()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    pub cidr: Cidr,
    pub gateway: Ipv4Addr,
    pub vlan: Option<u16>,
    pub bridge: String,
    /// Empty means "the project's DNS provider".
    pub nameservers: Vec<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pools {
    pub vmid: Range<u32>,
    pub ip: Range<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Proxmox {
    pub endpoint: Option<String>,
    /// The one node of a single-node project, and the default of `nodes`.
    pub node: String,
    /// `proxmox.node` is written in nixmox.yaml: without `nodes`, the project is that one
    /// node, and the API is not asked for others.
    pub node_given: bool,
    /// `proxmox.nodes` as written: the nodes NixMox may place containers on. Empty when the
    /// project leaves it out (then the cluster is what the API reports, or `node` alone).
    pub nodes: Vec<PveNode>,
    pub storage: String,
    pub template: String,
    pub token: SecretRef,
    pub tls: Tls,
    /// Snapshots around changes (`proxmox.snapshots`).
    pub snapshots: Snapshots,
}

/// `proxmox.snapshots`: whether a container is snapshotted before a step changes its system,
/// and how many of NixMox's snapshots each container keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshots {
    pub mode: SnapshotMode,
    /// The newest NixMox snapshots kept per container after a successful run (at least 1).
    pub keep: u32,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            mode: SnapshotMode::BestEffort,
            keep: 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotMode {
    /// A snapshot that cannot be taken fails the step.
    Required,
    /// A snapshot that cannot be taken is a warning; the step goes on.
    BestEffort,
    /// No snapshots.
    Off,
}

impl SnapshotMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMode::Required => "required",
            SnapshotMode::BestEffort => "best-effort",
            SnapshotMode::Off => "off",
        }
    }
}

/// One node of `proxmox.nodes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PveNode {
    pub name: String,
    /// Root volumes of the containers placed here (default `proxmox.storage`).
    pub storage: String,
    /// The LXC template this node creates containers from (default `proxmox.template`).
    pub template: String,
    /// Memory NixMox may place here, in MiB; `None`: not limited (sized by `weight`).
    pub memory: Option<u64>,
    /// Cores of the node: no container placed here gets more.
    pub cores: Option<u32>,
    /// Relative size when `memory` is not given (default 1).
    pub weight: u32,
}

/// Where a secret comes from; the secret itself is never in a project file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(String),
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tls {
    pub ca_file: Option<String>,
    pub fingerprint: Option<String>,
    pub insecure: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfraBackend {
    Terraform,
    ProxmoxApi,
    None,
}

impl InfraBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            InfraBackend::Terraform => "terraform",
            InfraBackend::ProxmoxApi => "proxmox-api",
            InfraBackend::None => "none",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ssh {
    pub user: SshUser,
    pub authorized_keys: Vec<String>,
    pub host_key_checking: HostKeyChecking,
}

/// OpenSSH's `StrictHostKeyChecking` for the project's hosts; keys are kept in
/// `.nixmox/known_hosts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKeyChecking {
    /// Trust a host's key on first contact, refuse a changed one (the default).
    AcceptNew,
    /// Only hosts already in the known_hosts file.
    Yes,
    /// Never check (for throwaway test hosts).
    No,
}

impl HostKeyChecking {
    pub fn as_str(self) -> &'static str {
        match self {
            HostKeyChecking::AcceptNew => "accept-new",
            HostKeyChecking::Yes => "yes",
            HostKeyChecking::No => "no",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Nix {
    /// The flake URLs of the rendered flake's inputs (defaults, or `nix.inputs` overrides).
    /// A relative `path:`/`git+file:` URL is relative to the project directory; the shell
    /// makes it absolute before rendering (the core knows no directories).
    pub nixpkgs: String,
    pub sops_nix: String,
    pub authentik_nix: String,
    pub deployer: Deployer,
}

impl Nix {
    /// The flake inputs by the names the rendered flake gives them.
    pub fn inputs(&self) -> [(&'static str, &str); 3] {
        [
            ("nixpkgs", self.nixpkgs.as_str()),
            ("sops-nix", self.sops_nix.as_str()),
            ("authentik-nix", self.authentik_nix.as_str()),
        ]
    }

    /// The input of that name, for overriding it.
    pub fn input_mut(&mut self, name: &str) -> Option<&mut String> {
        match name {
            "nixpkgs" => Some(&mut self.nixpkgs),
            "sops-nix" => Some(&mut self.sops_nix),
            "authentik-nix" => Some(&mut self.authentik_nix),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Deployer {
    NixosRebuild,
    Colmena,
    /// A user's own argv template with `{host}`, `{ip}`, `{flake}`, `{user}` placeholders.
    Command {
        command: Vec<String>,
        rollback: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Terraform {
    pub binary: String,
    /// `None`: the local backend, with state under `.nixmox/terraform/<workspace>/`.
    pub backend: Option<TfBackend>,
}

/// A Terraform backend rendered into every workspace; `{workspace}` in a string setting is
/// replaced by the workspace's name so each keeps its own state.
#[derive(Clone, Debug, PartialEq)]
pub struct TfBackend {
    pub kind: String,
    pub config: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    pub resources: Resources,
    pub health: HealthTiming,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    pub cores: u32,
    /// MiB.
    pub memory: u32,
    /// MiB.
    pub swap: u32,
    pub disk_gb: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthTiming {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StateConfig {
    pub path: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Secrets {
    pub age_recipients: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Deploy {
    pub parallel: u32,
}

/// A capability a core service offers to the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    Dns,
    Database,
    ReverseProxy,
    Identity,
}

impl Capability {
    pub const ALL: [Capability; 4] = [
        Capability::Dns,
        Capability::Database,
        Capability::ReverseProxy,
        Capability::Identity,
    ];
    pub fn key(self) -> &'static str {
        match self {
            Capability::Dns => "dns",
            Capability::Database => "database",
            Capability::ReverseProxy => "reverse_proxy",
            Capability::Identity => "identity",
        }
    }
    pub fn from_key(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.key() == s)
    }
}

/// A capability a service provides and the registered implementation that provides it
/// (`providers::registry`).
#[derive(Clone, Copy)]
pub struct Provided {
    pub capability: Capability,
    pub provider: &'static dyn Provider,
}

impl Provided {
    pub fn implementation(&self) -> &'static str {
        self.provider.implementation()
    }
}

impl PartialEq for Provided {
    fn eq(&self, other: &Self) -> bool {
        self.capability == other.capability && self.implementation() == other.implementation()
    }
}

impl std::fmt::Debug for Provided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.capability.key(), self.implementation())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: ServiceName,
    pub description: Option<String>,
    /// The manifest's path relative to the project root.
    pub manifest: String,
    /// The manifest's directory relative to the project root (`services/<name>`).
    pub dir: String,
    pub depends_on: Vec<ServiceName>,
    /// The capabilities it provides, each with its implementation; sorted by capability.
    pub provides: Vec<Provided>,
    pub host: Host,
    /// Module paths relative to the project root.
    pub nixos_modules: Vec<String>,
    pub dbs: Vec<Db>,
    pub proxies: Vec<Proxy>,
    pub auth: Option<Auth>,
    pub health: Health,
    pub terraform: Vec<TerraformUse>,
}

impl Service {
    pub fn provides(&self, cap: Capability) -> bool {
        self.provides.iter().any(|p| p.capability == cap)
    }
    /// The implementation of `cap` this service runs, when it provides it.
    pub fn implementation(&self, cap: Capability) -> Option<&'static dyn Provider> {
        self.provides
            .iter()
            .find(|p| p.capability == cap)
            .map(|p| p.provider)
    }
    /// A core service provides at least one capability; it deploys in the `nix:core` phase.
    pub fn is_core(&self) -> bool {
        !self.provides.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub hostname: Hostname,
    pub ip: Ipv4Addr,
    pub vmid: VmId,
    /// Where the ip and vmid came from.
    pub ip_origin: Origin,
    pub vmid_origin: Origin,
    pub node: String,
    /// `Manifest`: pinned by `host.node`; `Lock`: placed earlier and kept; `Allocated`: placed
    /// by this load.
    pub node_origin: Origin,
    /// `host.spread`: the anti-affinity group.
    pub spread: Option<String>,
    /// The root-volume storage and template of the host's node.
    pub storage: String,
    pub template: String,
    pub resources: Resources,
    pub onboot: bool,
    pub start: bool,
    pub unprivileged: bool,
    pub nesting: bool,
    /// The host's SSH ed25519 public key, when known in advance.
    pub ssh_host_key: Option<String>,
    /// `host.backup`: where and how its container is backed up (vzdump) by `nixmox backup` and
    /// before `down` destroys it.
    pub backup: Option<HostBackup>,
}

/// `host.backup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBackup {
    /// A PVE storage with `backup` content.
    pub storage: String,
    /// vzdump's mode: `snapshot`, `suspend` or `stop`.
    pub mode: String,
    /// A PVE calendar event (`daily`, `sun 02:30`): with it, a PVE backup job NixMox keeps.
    pub schedule: Option<String>,
    /// The job's retention: keep the newest N backups (`prune-backups: keep-last=N`).
    pub keep: Option<u32>,
}

/// Whether an address came from the manifest, from `nixmox.lock`, or is newly allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Manifest,
    Lock,
    Allocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbMode {
    NativeMigration,
    Terraform,
}

impl DbMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DbMode::NativeMigration => "native-migration",
            DbMode::Terraform => "terraform",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Db {
    pub database: String,
    pub role: String,
    pub mode: DbMode,
    /// Paths relative to the project root, in the order they apply.
    pub migrations: Vec<String>,
    /// Who may read the role's password file (`db/<role>`) on the service's host.
    pub access: SecretAccess,
}

/// How sops-nix installs one decrypted secret file on a host (`sops.secrets.<name>.owner`,
/// `group`, `mode`): who the services that read it run as.
#[derive(Clone, Debug, PartialEq)]
pub struct SecretAccess {
    /// `None`: root.
    pub owner: Option<UnixName>,
    /// `None`: the owner's primary group (sops-nix's default), or root without an owner.
    pub group: Option<UnixName>,
    /// Octal, four digits: `0400`, or `0440` when a group is given.
    pub mode: String,
}

impl Default for SecretAccess {
    fn default() -> Self {
        SecretAccess {
            owner: None,
            group: None,
            mode: "0400".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    pub domain: DomainName,
    pub path: String,
    pub upstream: Upstream,
    pub tls: bool,
    pub authz: bool,
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A port on the service's own host.
    Port(u16),
    HostPort(String, u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientType {
    Confidential,
    Public,
}

impl ClientType {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientType::Confidential => "confidential",
            ClientType::Public => "public",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Auth {
    pub provider: String,
    /// The display name of the application in the identity provider.
    pub display_name: String,
    pub oidc: Option<Oidc>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Oidc {
    pub client_id: String,
    pub client_type: ClientType,
    pub redirect_uris: Vec<String>,
    pub scopes: Vec<String>,
    pub username_claim: String,
    pub groups_claim: String,
    /// Who may read the client secret file (`oidc/<service>/client_secret`) on the host.
    pub access: SecretAccess,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub startup: Vec<Check>,
    pub liveness: Vec<Check>,
    pub readiness: Vec<Check>,
    pub timing: HealthTiming,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Check {
    /// Run on the service's host; exit 0 is healthy. A string is split like a shell would
    /// split words, but never run through a shell.
    Command(Vec<String>),
    Http {
        url: String,
        status: Option<u16>,
        body: Option<String>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Dns {
        name: String,
        expect: Option<Ipv4Addr>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TfPhase {
    ServiceInfra,
    ServiceConfig,
}

impl TfPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            TfPhase::ServiceInfra => "service-infra",
            TfPhase::ServiceConfig => "service-config",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TerraformUse {
    pub phase: TfPhase,
    /// Paths relative to the project root.
    pub modules: Vec<String>,
    pub variables: BTreeMap<String, serde_json::Value>,
    pub targets: Vec<String>,
    pub apply_order: Vec<String>,
    /// Resources of these modules that a saved plan may not delete or replace without
    /// `up --allow-destroy` (`interface.terraform.protect`).
    pub protect: Vec<Protect>,
}

/// One `interface.terraform.protect` entry, checked when the manifest is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protect {
    /// Every resource of this type (`null_resource`).
    Type(String),
    /// A resource address as written inside the module (`null_resource.keep`, `aws_s3_bucket.b[0]`,
    /// `module.inner.null_resource.keep`); without an index it covers every instance.
    Address(String),
}

impl Protect {
    /// Reads one entry: a resource type, or a managed resource's address (optionally inside
    /// nested modules, optionally with an instance key). The error says what is wrong.
    pub fn parse(s: &str) -> Result<Protect, String> {
        fn ident(w: &str) -> bool {
            w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
        /// `name` or `name[0]` or `name["key"]`.
        fn instance(w: &str) -> bool {
            match w.split_once('[') {
                None => ident(w),
                Some((name, key)) => {
                    let Some(key) = key.strip_suffix(']') else {
                        return false;
                    };
                    ident(name)
                        && (key.chars().all(|c| c.is_ascii_digit()) && !key.is_empty()
                            || key.len() >= 2
                                && key.starts_with('"')
                                && key.ends_with('"')
                                && !key[1..key.len() - 1].contains(['"', ']']))
                }
            }
        }
        if s.is_empty() {
            return Err("an empty entry".into());
        }
        if !s.contains('.') {
            return if ident(s) && !s.contains('-') {
                Ok(Protect::Type(s.to_string()))
            } else {
                Err(format!("`{s}` is not a resource type"))
            };
        }
        // Instance keys are numbers or simple strings here, so splitting on `.` is safe once
        // quoted keys containing dots are refused.
        let words: Vec<&str> = s.split('.').collect();
        if words.iter().any(|w| w.matches('"').count() % 2 == 1) {
            return Err(format!("`{s}`: an instance key may not contain `.`"));
        }
        let mut rest = &words[..];
        while rest.len() > 2 && rest[0] == "module" {
            if !instance(rest[1]) {
                return Err(format!("`{s}`: `{}` is not a module name", rest[1]));
            }
            rest = &rest[2..];
        }
        match rest {
            ["data", ..] => Err(format!(
                "`{s}` is a data source; data sources are never destroyed"
            )),
            [ty, name] if ident(ty) && !ty.contains('-') && instance(name) => {
                Ok(Protect::Address(s.to_string()))
            }
            _ => Err(format!("`{s}` is not a resource address")),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Protect::Type(s) | Protect::Address(s) => s,
        }
    }
}

/// Why one service depends on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EdgeKind {
    DependsOn,
    Db,
    Proxy,
    Auth,
    Dns,
}

impl EdgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::DependsOn => "depends_on",
            EdgeKind::Db => "db",
            EdgeKind::Proxy => "proxy",
            EdgeKind::Auth => "auth",
            EdgeKind::Dns => "dns",
        }
    }
}

/// `from` (the consumer) depends on `to` (the provider); indexes into `Project::services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub kind: EdgeKind,
}

/// The OIDC scopes authentik ships a scope mapping for (`goauthentik.io/providers/oauth2/scope-*`).
pub const OIDC_SCOPES: &[&str] = &[
    "openid",
    "email",
    "profile",
    "offline_access",
    "entitlements",
];

/// The managed name of the scope mapping authentik ships for `scope`, if any.
pub fn oidc_scope_mapping(scope: &str) -> Option<String> {
    OIDC_SCOPES
        .contains(&scope)
        .then(|| format!("goauthentik.io/providers/oauth2/scope-{scope}"))
}
