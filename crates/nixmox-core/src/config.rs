//! Reads `nixmox.yaml`, the project file, into the project-wide parts of the model.

use core::net::Ipv4Addr;
use std::collections::BTreeMap;

use crate::decode::{field, join, Cx};
use crate::ids::{self, parse_ip, Cidr, DomainName, ProjectName, Range, SshUser};
use crate::model::{
    Defaults, Deploy, Deployer, HealthTiming, HostKeyChecking, InfraBackend, Network, Nix, Pools,
    Proxmox, PveNode, Resources, SecretRef, Secrets, SnapshotMode, Snapshots, Ssh, StateConfig,
    Terraform, TfBackend, Tls,
};
use crate::syntax::{Kind, Node};

pub const TOP_FIELDS: &[&str] = &[
    "project",
    "domain",
    "network",
    "pools",
    "proxmox",
    "infra",
    "ssh",
    "nix",
    "terraform",
    "defaults",
    "state",
    "secrets",
    "deploy",
];
pub const NETWORK_FIELDS: &[&str] = &["cidr", "gateway", "vlan", "bridge", "nameservers"];
pub const POOLS_FIELDS: &[&str] = &["vmid", "ip"];
pub const PROXMOX_FIELDS: &[&str] = &[
    "endpoint",
    "node",
    "nodes",
    "storage",
    "template",
    "token",
    "tls",
    "snapshots",
];
pub const PVE_NODE_FIELDS: &[&str] = &["name", "storage", "template", "memory", "cores", "weight"];
pub const SNAPSHOTS_FIELDS: &[&str] = &["mode", "keep"];
pub const TOKEN_FIELDS: &[&str] = &["env", "file"];
pub const TLS_FIELDS: &[&str] = &["ca_file", "fingerprint", "insecure"];
pub const INFRA_FIELDS: &[&str] = &["backend"];
pub const SSH_FIELDS: &[&str] = &["user", "authorized_keys", "host_key_checking"];
pub const NIX_FIELDS: &[&str] = &["nixpkgs", "inputs", "deployer"];
/// The rendered flake's inputs, each overridable under `nix.inputs`.
pub const NIX_INPUTS: &[&str] = &["nixpkgs", "sops-nix", "authentik-nix"];
/// The flake URL schemes Nix understands (`nix flake --help`, "URL-like syntax").
const FLAKE_SCHEMES: &[&str] = &[
    "github",
    "gitlab",
    "sourcehut",
    "path",
    "git+file",
    "git+https",
    "git+http",
    "git+ssh",
    "git",
    "hg+https",
    "hg+http",
    "hg+file",
    "tarball+https",
    "tarball+http",
    "tarball+file",
    "file+https",
    "file+http",
    "file",
    "https",
    "http",
    "flake",
];
pub const DEPLOYER_FIELDS: &[&str] = &["command", "rollback"];
pub const TERRAFORM_FIELDS: &[&str] = &["binary", "backend"];
pub const TF_BACKEND_FIELDS: &[&str] = &["type", "config"];
pub const DEFAULTS_FIELDS: &[&str] = &["resources", "health"];
pub const RESOURCES_FIELDS: &[&str] = &["cores", "memory", "swap", "disk_gb"];
pub const HEALTH_TIMING_FIELDS: &[&str] = &["interval", "timeout", "retries", "start_period"];
pub const STATE_FIELDS: &[&str] = &["backend", "path"];
pub const SECRETS_FIELDS: &[&str] = &["backend", "age_recipients"];
pub const DEPLOY_FIELDS: &[&str] = &["parallel"];

/// Limits for container resources, from Proxmox's own parameter ranges where it has them.
pub const CORES: (i64, i64) = (1, 8192);
pub const MEMORY_MIB: (i64, i64) = (16, 4_194_304);
pub const SWAP_MIB: (i64, i64) = (0, 4_194_304);
pub const DISK_GB: (i64, i64) = (1, 131_072);

pub const DEFAULT_RESOURCES: Resources = Resources {
    cores: 1,
    memory: 1024,
    swap: 512,
    disk_gb: 8,
};
pub const DEFAULT_HEALTH: HealthTiming = HealthTiming {
    interval_ms: 10_000,
    timeout_ms: 5_000,
    retries: 3,
    start_period_ms: 0,
};
/// A supported stable release (25.05 reached its end of life on 2025-12-31).
pub const DEFAULT_NIXPKGS: &str = "github:NixOS/nixpkgs/nixos-26.05";
pub const DEFAULT_SOPS_NIX: &str = "github:Mic92/sops-nix";
pub const DEFAULT_AUTHENTIK_NIX: &str = "github:nix-community/authentik-nix";
pub const DEFAULT_TEMPLATE: &str = "local:vztmpl/nixos-26.05-x86_64-linux.tar.xz";
pub const DEFAULT_VMID_POOL: Range<u32> = Range {
    start: 900,
    end: 999,
};

/// The project-wide settings, everything in `nixmox.yaml`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProjectConfig {
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
}

/// Decodes the project file. Returns `None` when a required part is missing or invalid (the
/// diagnostics say why).
pub fn decode(cx: &mut Cx, root: &Node) -> Option<ProjectConfig> {
    cx.map(root, "", TOP_FIELDS)?;
    let name = decode_project_name(cx, root);
    let domain = cx
        .required(root, "", "domain")
        .and_then(|n| domain(cx, n, "domain"));
    let network = cx
        .required(root, "", "network")
        .and_then(|n| decode_network(cx, n));
    let pools = network
        .as_ref()
        .and_then(|net| decode_pools(cx, field(root, "pools"), net));
    let proxmox = decode_proxmox(cx, field(root, "proxmox"));
    let infra = decode_infra(cx, root);
    let ssh = decode_ssh(cx, field(root, "ssh"));
    let nix = decode_nix(cx, field(root, "nix"));
    let terraform = decode_terraform(cx, field(root, "terraform"));
    let defaults = decode_defaults(cx, field(root, "defaults"));
    let state = decode_state(cx, field(root, "state"));
    let secrets = decode_secrets(cx, field(root, "secrets"));
    let deploy = decode_deploy(cx, field(root, "deploy"));
    Some(ProjectConfig {
        name: name?,
        domain: domain?,
        network: network?,
        pools: pools?,
        proxmox: proxmox?,
        infra: infra?,
        ssh: ssh?,
        nix: nix?,
        terraform: terraform?,
        defaults: defaults?,
        state: state?,
        secrets: secrets?,
        deploy: deploy?,
    })
}

/// `project`: required, and a valid project name.
fn decode_project_name(cx: &mut Cx, root: &Node) -> Option<ProjectName> {
    let n = cx.required(root, "", "project")?;
    let s = cx.string(n, "project")?;
    match ProjectName::new(&s) {
        Ok(v) => Some(v),
        Err(why) => {
            cx.error(n.span, "project", format!("invalid project name `{s}`: {why}"), Some("a project name looks like `homelab`: lowercase letters, digits and `-`, starting with a letter".into()));
            None
        }
    }
}

/// `infra.backend`, Terraform by default.
fn decode_infra(cx: &mut Cx, root: &Node) -> Option<InfraBackend> {
    let infra = match field(root, "infra") {
        None => Some(InfraBackend::Terraform),
        Some(n) => cx
            .map(n, "infra", INFRA_FIELDS)
            .and_then(|_| match field(n, "backend") {
                None => Some(InfraBackend::Terraform),
                Some(b) => choice(
                    cx,
                    b,
                    "infra.backend",
                    &[
                        ("terraform", InfraBackend::Terraform),
                        ("proxmox-api", InfraBackend::ProxmoxApi),
                        ("none", InfraBackend::None),
                    ],
                ),
            }),
    };
    // Issue 12, item 6: bpg/proxmox verifies the API's certificate against the roots Go
    // trusts, which NixMox sets (`SSL_CERT_FILE`: the system's roots, the project CA and
    // `proxmox.tls.ca_file`), or not at all with `insecure`; it has no way to pin a fingerprint.
    if infra == Some(InfraBackend::Terraform) {
        if let Some(f) = field(root, "proxmox")
            .and_then(|p| field(p, "tls"))
            .and_then(|t| field(t, "fingerprint"))
        {
            cx.warning(
                f.span,
                "proxmox.tls.fingerprint",
                "the Terraform backend cannot honour a fingerprint pin: only `infra.backend: proxmox-api` checks it",
                Some("Terraform checks the certificate against the system's roots plus `proxmox.tls.ca_file`: give the PVE CA there, or use `infra.backend: proxmox-api`".into()),
            );
        }
    }
    infra
}

/// `terraform`: the binary and the state backend.
fn decode_terraform(cx: &mut Cx, n: Option<&Node>) -> Option<Terraform> {
    let Some(n) = n else {
        return Some(Terraform {
            binary: "terraform".into(),
            backend: None,
        });
    };
    cx.map(n, "terraform", TERRAFORM_FIELDS)?;
    let binary = field(n, "binary")
        .and_then(|b| cx.string(b, "terraform.binary"))
        .unwrap_or_else(|| "terraform".into());
    let backend = match field(n, "backend") {
        None => None,
        Some(b) => Some(decode_tf_backend(cx, b)?),
    };
    Some(Terraform {
        binary,
        backend: backend.flatten(),
    })
}

/// `state`: where the state database is.
fn decode_state(cx: &mut Cx, n: Option<&Node>) -> Option<StateConfig> {
    let Some(n) = n else {
        return Some(StateConfig {
            path: ".nixmox/state.db".into(),
        });
    };
    cx.map(n, "state", STATE_FIELDS)?;
    if let Some(b) = field(n, "backend") {
        let _ = choice(cx, b, "state.backend", &[("sqlite", ())]);
    }
    Some(StateConfig {
        path: field(n, "path")
            .and_then(|p| project_path(cx, p, "state.path"))
            .unwrap_or_else(|| ".nixmox/state.db".into()),
    })
}

/// `secrets`: the admins' age recipients.
fn decode_secrets(cx: &mut Cx, n: Option<&Node>) -> Option<Secrets> {
    let Some(n) = n else {
        return Some(Secrets {
            age_recipients: Vec::new(),
        });
    };
    cx.map(n, "secrets", SECRETS_FIELDS)?;
    if let Some(b) = field(n, "backend") {
        let _ = choice(cx, b, "secrets.backend", &[("sops", ())]);
    }
    let recipients = field(n, "age_recipients")
        .map(|r| cx.strings(r, "secrets.age_recipients"))
        .unwrap_or_default();
    for (r, span) in &recipients {
        if ids::check_age_recipient(r).is_err() {
            cx.error(*span, "secrets.age_recipients", format!("`{r}` is not an age public key"), Some("an age recipient looks like `age1` followed by 58 characters (see `age-keygen -y`)".into()));
        }
    }
    Some(Secrets {
        age_recipients: recipients.into_iter().map(|(r, _)| r).collect(),
    })
}

/// `deploy`: how many hosts deploy at once.
fn decode_deploy(cx: &mut Cx, n: Option<&Node>) -> Option<Deploy> {
    let Some(n) = n else {
        return Some(Deploy { parallel: 4 });
    };
    cx.map(n, "deploy", DEPLOY_FIELDS)?;
    Some(Deploy {
        parallel: field(n, "parallel")
            .and_then(|p| cx.int(p, "deploy.parallel", 1, 1024, ""))
            .map(|p| p as u32)
            .unwrap_or(4),
    })
}

pub fn domain(cx: &mut Cx, n: &Node, path: &str) -> Option<DomainName> {
    let s = cx.string(n, path)?;
    match DomainName::new(&s) {
        Ok(d) => Some(d),
        Err(why) => {
            cx.error(n.span, path, format!("invalid domain name `{s}`: {why}"), Some("a domain name is dot-separated labels of lowercase letters, digits and `-` (RFC 1123), like `nixmox.lan`".into()));
            None
        }
    }
}

/// One of a fixed set of words, with a "did you mean" on a miss.
pub fn choice<T: Clone>(cx: &mut Cx, n: &Node, path: &str, options: &[(&str, T)]) -> Option<T> {
    let s = cx.string(n, path)?;
    if let Some((_, v)) = options.iter().find(|(k, _)| *k == s) {
        return Some(v.clone());
    }
    let names: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
    let help = match crate::diag::did_you_mean(&s, names.iter().copied()) {
        Some(m) => format!("did you mean `{m}`? (one of: {})", names.join(", ")),
        None => format!("expected one of: {}", names.join(", ")),
    };
    cx.error(
        n.span,
        path,
        format!("unknown value `{s}` for `{path}`"),
        Some(help),
    );
    None
}

pub fn ip(cx: &mut Cx, n: &Node, path: &str) -> Option<Ipv4Addr> {
    let s = cx.string(n, path)?;
    match parse_ip(&s) {
        Ok(ip) => Some(ip),
        Err(why) => {
            cx.error(
                n.span,
                path,
                format!("invalid IP address: {why}"),
                Some("write a dotted IPv4 address like 192.168.99.20".into()),
            );
            None
        }
    }
}

fn decode_network(cx: &mut Cx, n: &Node) -> Option<Network> {
    cx.map(n, "network", NETWORK_FIELDS)?;
    let cidr = cx.required(n, "network", "cidr").and_then(|c| {
        let s = cx.string(c, "network.cidr")?;
        match Cidr::parse(&s) {
            Ok(v) => Some(v),
            Err(why) => {
                cx.error(
                    c.span,
                    "network.cidr",
                    format!("invalid network `{s}`: {why}"),
                    Some("write the network in CIDR notation, like 192.168.99.0/24".into()),
                );
                None
            }
        }
    });
    let gateway = cx
        .required(n, "network", "gateway")
        .and_then(|g| ip(cx, g, "network.gateway").map(|ip| (ip, g.span)));
    if let (Some(cidr), Some((gw, span))) = (cidr, gateway) {
        if !cidr.contains(gw) {
            cx.error(
                span,
                "network.gateway",
                format!("gateway {gw} is outside the network {cidr}"),
                Some(format!("the gateway must be an address in {cidr}")),
            );
            return None;
        }
        if cidr.is_reserved(gw) {
            cx.error(
                span,
                "network.gateway",
                format!("gateway {gw} is the network or broadcast address of {cidr}"),
                None,
            );
            return None;
        }
    }
    let vlan =
        field(n, "vlan").and_then(|v| cx.int(v, "network.vlan", 1, 4094, "").map(|v| v as u16));
    let bridge = match field(n, "bridge") {
        None => "vmbr0".to_string(),
        Some(b) => checked(cx, b, "network.bridge", "bridge", ids::check_bridge)?,
    };
    let nameservers = match field(n, "nameservers") {
        None => Vec::new(),
        Some(list) => {
            let mut out = Vec::new();
            if let Some(items) = cx.list(list, "network.nameservers") {
                for (i, item) in items.iter().enumerate() {
                    if let Some(ip) = ip(cx, item, &crate::decode::index("network.nameservers", i))
                    {
                        out.push(ip);
                    }
                }
            }
            out
        }
    };
    Some(Network {
        cidr: cidr?,
        gateway: gateway?.0,
        vlan,
        bridge,
        nameservers,
    })
}

fn decode_pools(cx: &mut Cx, n: Option<&Node>, net: &Network) -> Option<Pools> {
    let default_ip = default_ip_pool(net);
    let Some(n) = n else {
        return Some(Pools {
            vmid: DEFAULT_VMID_POOL,
            ip: default_ip,
        });
    };
    cx.map(n, "pools", POOLS_FIELDS)?;
    let vmid = match field(n, "vmid") {
        None => Some(DEFAULT_VMID_POOL),
        Some(v) => {
            let s = cx.string(v, "pools.vmid")?;
            match parse_range(&s, |x| x.trim().parse::<u32>().ok()) {
                Some(r) if r.start >= 100 && r.end <= 999_999_999 => Some(r),
                Some(_) => {
                    cx.error(
                        v.span,
                        "pools.vmid",
                        format!("vmid pool `{s}` is outside 100-999999999"),
                        Some("Proxmox reserves ids below 100".into()),
                    );
                    None
                }
                None => {
                    cx.error(
                        v.span,
                        "pools.vmid",
                        format!("invalid vmid range `{s}`"),
                        Some("write `first-last` with first <= last, like 900-999".into()),
                    );
                    None
                }
            }
        }
    };
    let ip = match field(n, "ip") {
        None => Some(default_ip),
        Some(v) => {
            let s = cx.string(v, "pools.ip")?;
            match parse_range(&s, |x| x.trim().parse::<Ipv4Addr>().ok()) {
                Some(r) => {
                    let cidr = net.cidr;
                    if !cidr.contains(r.start) || !cidr.contains(r.end) {
                        cx.error(
                            v.span,
                            "pools.ip",
                            format!("IP pool `{s}` is not inside the network {cidr}"),
                            None,
                        );
                        None
                    } else if cidr.is_reserved(r.start) || cidr.is_reserved(r.end) {
                        cx.error(
                            v.span,
                            "pools.ip",
                            format!(
                                "IP pool `{s}` includes the network or broadcast address of {cidr}"
                            ),
                            None,
                        );
                        None
                    } else {
                        Some(r)
                    }
                }
                None => {
                    cx.error(v.span, "pools.ip", format!("invalid IP range `{s}`"), Some("write `first-last` with first <= last, like 192.168.99.100-192.168.99.199".into()));
                    None
                }
            }
        }
    };
    Some(Pools {
        vmid: vmid?,
        ip: ip?,
    })
}

/// The default address pool: host addresses 100 to 199 of the network when it is big enough,
/// else every host address. Documented in docs/manifest.md.
fn default_ip_pool(net: &Network) -> Range<Ipv4Addr> {
    let base = u32::from(net.cidr.network());
    let last = u32::from(net.cidr.broadcast()).saturating_sub(1);
    if last >= base + 199 {
        Range {
            start: Ipv4Addr::from(base + 100),
            end: Ipv4Addr::from(base + 199),
        }
    } else {
        Range {
            start: Ipv4Addr::from(base + 1),
            end: Ipv4Addr::from(last.max(base + 1)),
        }
    }
}

fn parse_range<T: PartialOrd + Copy>(
    s: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Option<Range<T>> {
    let (a, b) = s.split_once('-')?;
    let (start, end) = (parse(a)?, parse(b)?);
    (start <= end).then_some(Range { start, end })
}

fn decode_proxmox(cx: &mut Cx, n: Option<&Node>) -> Option<Proxmox> {
    let mut p = Proxmox {
        endpoint: None,
        node: "pve".into(),
        node_given: false,
        nodes: Vec::new(),
        storage: "local-lvm".into(),
        template: DEFAULT_TEMPLATE.into(),
        token: SecretRef::Env("PROXMOX_API_TOKEN".into()),
        tls: Tls::default(),
        snapshots: Snapshots::default(),
    };
    let Some(n) = n else { return Some(p) };
    cx.map(n, "proxmox", PROXMOX_FIELDS)?;
    let mut ok = true;
    if let Some(e) = field(n, "endpoint") {
        match cx.string(e, "proxmox.endpoint") {
            Some(url) => match crate::url::check(&url) {
                Ok(_) => p.endpoint = Some(url),
                Err(why) => {
                    cx.error(
                        e.span,
                        "proxmox.endpoint",
                        format!("invalid URL `{url}`: {why}"),
                        Some("like https://pve.example.lan:8006".into()),
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    let grammars: [(&str, &mut String, ids::Grammar); 3] = [
        ("node", &mut p.node, ids::check_node),
        ("storage", &mut p.storage, ids::check_storage_id),
        ("template", &mut p.template, ids::check_volume_id),
    ];
    for (key, slot, check) in grammars {
        if let Some(v) = field(n, key) {
            match checked(cx, v, &join("proxmox", key), key, check) {
                Some(s) => *slot = s,
                None => ok = false,
            }
        }
    }
    p.node_given = field(n, "node").is_some();
    if let Some(list) = field(n, "nodes") {
        match decode_nodes(cx, list, &p) {
            Some(nodes) => p.nodes = nodes,
            None => ok = false,
        }
    }
    if let Some(t) = field(n, "token") {
        match secret_ref(cx, t, "proxmox.token") {
            Some(r) => p.token = r,
            None => ok = false,
        }
    }
    if let Some(t) = field(n, "tls") {
        if cx.map(t, "proxmox.tls", TLS_FIELDS).is_some() {
            p.tls.ca_file =
                field(t, "ca_file").and_then(|v| project_path(cx, v, "proxmox.tls.ca_file"));
            if let Some(f) = field(t, "fingerprint") {
                if let Some(s) = cx.string(f, "proxmox.tls.fingerprint") {
                    let hex: String = s.chars().filter(|c| *c != ':').collect();
                    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        p.tls.fingerprint = Some(s);
                    } else {
                        cx.error(f.span, "proxmox.tls.fingerprint", "invalid certificate fingerprint", Some("give the SHA-256 fingerprint: 32 hex bytes, optionally separated by `:`".into()));
                        ok = false;
                    }
                }
            }
            p.tls.insecure = field(t, "insecure")
                .and_then(|v| cx.boolean(v, "proxmox.tls.insecure"))
                .unwrap_or(false);
        } else {
            ok = false;
        }
    }
    if let Some(sn) = field(n, "snapshots") {
        match decode_snapshots(cx, sn) {
            Some(v) => p.snapshots = v,
            None => ok = false,
        }
    }
    ok.then_some(p)
}

/// `proxmox.nodes`: each entry a node name, or a mapping with its storage, template and size.
/// Storage and template default to `proxmox.storage` and `proxmox.template`, so `p` must have
/// those decoded already.
fn decode_nodes(cx: &mut Cx, list: &Node, p: &Proxmox) -> Option<Vec<PveNode>> {
    let items = cx.list(list, "proxmox.nodes")?;
    let errors = cx.errors();
    let mut out: Vec<PveNode> = Vec::new();
    let mut seen: Vec<(String, crate::syntax::Span)> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("proxmox.nodes[{i}]");
        let mut node = PveNode {
            name: String::new(),
            storage: p.storage.clone(),
            template: p.template.clone(),
            memory: None,
            cores: None,
            weight: 1,
        };
        let name_node = match &item.kind {
            Kind::Map(_) => {
                if cx.map(item, &path, PVE_NODE_FIELDS).is_none() {
                    continue;
                }
                let Some(name) = cx.required(item, &path, "name") else {
                    continue;
                };
                for (key, slot, check) in [
                    (
                        "storage",
                        &mut node.storage,
                        ids::check_storage_id as ids::Grammar,
                    ),
                    ("template", &mut node.template, ids::check_volume_id),
                ] {
                    if let Some(v) = field(item, key) {
                        if let Some(s) = checked(cx, v, &join(&path, key), key, check) {
                            *slot = s;
                        }
                    }
                }
                node.memory = field(item, "memory")
                    .and_then(|v| cx.int(v, &join(&path, "memory"), 16, 1 << 40, "MiB"))
                    .map(|v| v as u64);
                node.cores = field(item, "cores")
                    .and_then(|v| cx.int(v, &join(&path, "cores"), 1, 8192, ""))
                    .map(|v| v as u32);
                if let Some(w) = field(item, "weight") {
                    node.weight =
                        cx.int(w, &join(&path, "weight"), 1, 1000, "").unwrap_or(1) as u32;
                }
                name
            }
            _ => item,
        };
        let Some(name) = checked(cx, name_node, &join(&path, "name"), "node", ids::check_node)
        else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
            cx.error(
                name_node.span,
                &join(&path, "name"),
                format!(
                    "node `{name}` is listed twice (first on line {})",
                    first.line
                ),
                Some("list each node once".into()),
            );
            continue;
        }
        seen.push((name.clone(), name_node.span));
        node.name = name;
        out.push(node);
    }
    if out.is_empty() && cx.errors() == errors {
        cx.error(
            list.span,
            "proxmox.nodes",
            "`proxmox.nodes` is empty",
            Some("list the nodes containers may be placed on, or leave `nodes` out to use the nodes the Proxmox API reports".into()),
        );
    }
    (cx.errors() == errors).then_some(out)
}

/// `proxmox.snapshots: { mode, keep }`; both optional (best-effort, 3).
fn decode_snapshots(cx: &mut Cx, n: &Node) -> Option<Snapshots> {
    cx.map(n, "proxmox.snapshots", SNAPSHOTS_FIELDS)?;
    let mut s = Snapshots::default();
    let mut ok = true;
    if let Some(m) = field(n, "mode") {
        match choice(
            cx,
            m,
            "proxmox.snapshots.mode",
            &[
                ("required", SnapshotMode::Required),
                ("best-effort", SnapshotMode::BestEffort),
                ("off", SnapshotMode::Off),
            ],
        ) {
            Some(v) => s.mode = v,
            None => ok = false,
        }
    }
    if let Some(k) = field(n, "keep") {
        match cx.int(k, "proxmox.snapshots.keep", 1, 100, "") {
            Some(v) => s.keep = v as u32,
            None => ok = false,
        }
    }
    ok.then_some(s)
}

/// A string that must match a grammar (an `ids::check_*` function); the error names it.
pub fn checked(
    cx: &mut Cx,
    n: &Node,
    path: &str,
    what: &str,
    check: ids::Grammar,
) -> Option<String> {
    let s = cx.string(n, path)?;
    match check(&s) {
        Ok(()) => Some(s),
        Err(why) => {
            cx.error(
                n.span,
                path,
                format!("invalid {what} `{}`: {why}", s.escape_debug()),
                None,
            );
            None
        }
    }
}

/// A path in `nixmox.yaml`: relative to the project root and staying inside it, or absolute.
/// An absolute path is the operator's explicit choice of a place outside the project (a token
/// in `~/.config`, a shared state database); a relative one may not climb out with `..`, so a
/// project from someone else cannot quietly read or write next to it.
pub fn project_path(cx: &mut Cx, n: &Node, path: &str) -> Option<String> {
    let s = cx.string(n, path)?;
    if s.trim().is_empty() {
        cx.error(
            n.span,
            path,
            format!("`{path}` is empty"),
            Some("give a path relative to the project directory".into()),
        );
        return None;
    }
    if !s.starts_with('/') && {
        let r = crate::manifest::resolve_path("", &s);
        r == ".." || r.starts_with("../")
    } {
        cx.error(n.span, path, format!("`{s}` climbs out of the project directory"), Some("a relative path stays inside the project; write an absolute path to choose a place outside it".into()));
        return None;
    }
    Some(s)
}

/// `{ env: NAME }` or `{ file: path }`. A bare string is refused: it is most likely the secret.
pub fn secret_ref(cx: &mut Cx, n: &Node, path: &str) -> Option<SecretRef> {
    if let Kind::Str(_) = n.kind {
        cx.error(n.span, path, format!("`{path}` must name where the secret is, not hold it"), Some("write `{ env: PROXMOX_API_TOKEN }` or `{ file: path/to/token }`; never put a secret in a project file".into()));
        return None;
    }
    cx.map(n, path, TOKEN_FIELDS)?;
    match (field(n, "env"), field(n, "file")) {
        (Some(e), None) => cx.string(e, &join(path, "env")).map(SecretRef::Env),
        (None, Some(f)) => project_path(cx, f, &join(path, "file")).map(SecretRef::File),
        _ => {
            cx.error(
                n.span,
                path,
                format!("`{path}` needs exactly one of `env` or `file`"),
                None,
            );
            None
        }
    }
}

fn decode_ssh(cx: &mut Cx, n: Option<&Node>) -> Option<Ssh> {
    let Some(n) = n else {
        return Some(Ssh {
            user: SshUser::new("root").expect("literal is a valid login name"),
            authorized_keys: Vec::new(),
            host_key_checking: HostKeyChecking::AcceptNew,
        });
    };
    cx.map(n, "ssh", SSH_FIELDS)?;
    let mut ok = true;
    let user = match field(n, "user") {
        None => SshUser::new("root").ok(),
        Some(u) => cx
            .string(u, "ssh.user")
            .and_then(|s| match SshUser::new(&s) {
                Ok(v) => Some(v),
                Err(why) => {
                    cx.error(
                        u.span,
                        "ssh.user",
                        format!("invalid login name `{}`: {why}", s.escape_debug()),
                        Some(
                            "the user NixMox logs in as on every host, like `root` or `ops`".into(),
                        ),
                    );
                    None
                }
            }),
    };
    let keys = field(n, "authorized_keys")
        .map(|k| cx.strings(k, "ssh.authorized_keys"))
        .unwrap_or_default();
    for (i, (k, span)) in keys.iter().enumerate() {
        if let Err(why) = ids::check_ssh_public_key(k, ids::SSH_KEY_TYPES) {
            cx.error(
                *span,
                &crate::decode::index("ssh.authorized_keys", i),
                format!("not an SSH public key: {why}"),
                Some(
                    "give the whole public key line, like `ssh-ed25519 AAAAC3Nz... you@laptop`"
                        .into(),
                ),
            );
            ok = false;
        }
    }
    let host_key_checking = match field(n, "host_key_checking") {
        None => HostKeyChecking::AcceptNew,
        Some(h) => choice(
            cx,
            h,
            "ssh.host_key_checking",
            &[
                ("accept-new", HostKeyChecking::AcceptNew),
                ("yes", HostKeyChecking::Yes),
                ("no", HostKeyChecking::No),
            ],
        )?,
    };
    let user = user?;
    ok.then(|| Ssh {
        user,
        authorized_keys: keys.into_iter().map(|(k, _)| k).collect(),
        host_key_checking,
    })
}

/// `terraform.backend: { type: s3, config: { bucket: …, key: "nixmox/{workspace}.tfstate" } }`.
/// `None` inside means the default (`local`, kept under `.nixmox/terraform/`).
fn decode_tf_backend(cx: &mut Cx, n: &Node) -> Option<Option<TfBackend>> {
    cx.map(n, "terraform.backend", TF_BACKEND_FIELDS)?;
    let kind = cx
        .required(n, "terraform.backend", "type")
        .and_then(|t| cx.string(t, "terraform.backend.type"))?;
    if kind.is_empty()
        || !kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        cx.error(
            n.span,
            "terraform.backend.type",
            format!("invalid backend type `{kind}`"),
            Some("a Terraform backend name like `local`, `s3`, `http` or `pg`".into()),
        );
        return None;
    }
    let mut config = BTreeMap::new();
    if let Some(c) = field(n, "config") {
        match &c.kind {
            Kind::Map(entries) => {
                for e in entries {
                    let path = join("terraform.backend.config", &e.key);
                    if let Some(v) = crate::manifest::tf_value(cx, &e.value, &path) {
                        config.insert(e.key.clone(), v);
                    }
                }
            }
            other => {
                cx.error(
                    c.span,
                    "terraform.backend.config",
                    format!("expected a mapping, found {}", other.describe()),
                    None,
                );
                return None;
            }
        }
    }
    if kind == "local" && config.is_empty() {
        return Some(None);
    }
    if !config
        .values()
        .any(|v| v.as_str().is_some_and(|s| s.contains("{workspace}")))
    {
        cx.warning(n.span, "terraform.backend.config", "no backend setting contains `{workspace}`", Some("every NixMox workspace (infra, auth-core, <service>-infra, <service>-config) needs its own state: put `{workspace}` in the key or path".into()));
    }
    Some(Some(TfBackend { kind, config }))
}

fn decode_nix(cx: &mut Cx, n: Option<&Node>) -> Option<Nix> {
    let mut nix = Nix {
        nixpkgs: DEFAULT_NIXPKGS.into(),
        sops_nix: DEFAULT_SOPS_NIX.into(),
        authentik_nix: DEFAULT_AUTHENTIK_NIX.into(),
        deployer: Deployer::NixosRebuild,
    };
    let Some(n) = n else { return Some(nix) };
    cx.map(n, "nix", NIX_FIELDS)?;
    if let Some(p) = field(n, "nixpkgs") {
        nix.nixpkgs = flake_url(cx, p, "nix.nixpkgs")?;
    }
    if let Some(inputs) = field(n, "inputs") {
        cx.map(inputs, "nix.inputs", NIX_INPUTS)?;
        for name in NIX_INPUTS {
            let Some(v) = field(inputs, name) else {
                continue;
            };
            let path = format!("nix.inputs.{name}");
            if *name == "nixpkgs" && field(n, "nixpkgs").is_some() {
                cx.error(
                    v.span,
                    &path,
                    "nixpkgs is given twice, as `nix.nixpkgs` and `nix.inputs.nixpkgs`",
                    Some("keep one: `nix.inputs.nixpkgs` is the newer spelling".into()),
                );
                continue;
            }
            if let (Some(url), Some(slot)) = (flake_url(cx, v, &path), nix.input_mut(name)) {
                *slot = url;
            }
        }
    }
    if let Some(d) = field(n, "deployer") {
        nix.deployer = match &d.kind {
            Kind::Map(_) => {
                cx.map(d, "nix.deployer", DEPLOYER_FIELDS)?;
                let command: Vec<String> = cx
                    .required(d, "nix.deployer", "command")
                    .map(|c| cx.strings(c, "nix.deployer.command"))?
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
                if command.is_empty() {
                    cx.error(
                        d.span,
                        "nix.deployer.command",
                        "the deployer command is empty",
                        Some("give an argv list, like [./deploy.sh, \"{host}\", \"{ip}\"]".into()),
                    );
                    return None;
                }
                let rollback = field(d, "rollback")
                    .map(|c| cx.strings(c, "nix.deployer.rollback"))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect();
                Deployer::Command { command, rollback }
            }
            _ => choice(
                cx,
                d,
                "nix.deployer",
                &[
                    ("nixos-rebuild", Deployer::NixosRebuild),
                    ("colmena", Deployer::Colmena),
                ],
            )?,
        };
    }
    Some(nix)
}

/// A flake URL as Nix reads it: a known scheme, then no whitespace, quotes or control
/// characters (it is written into `flake.nix` and handed to `nix`).
fn flake_url(cx: &mut Cx, n: &Node, path: &str) -> Option<String> {
    let url = cx.string(n, path)?;
    let scheme = url.split_once(':').map(|(s, _)| s);
    let bad_char = url
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | '`'));
    if let Some(c) = bad_char {
        cx.error(
            n.span,
            path,
            format!("a flake URL cannot contain {c:?}"),
            Some("write it as `nix flake` takes it, like github:NixOS/nixpkgs/nixos-26.05".into()),
        );
        return None;
    }
    match scheme {
        Some(s @ ("path" | "git+file")) => {
            // A local input, like every project path: relative ones stay inside the project
            // (a project from someone else cannot point Nix at `../../home/you`); an
            // absolute one is the operator's explicit choice.
            let rest = &url[s.len() + 1..];
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let local = rest.split('?').next().unwrap_or("");
            let resolved = crate::manifest::resolve_path("", local);
            if local.is_empty() {
                cx.error(
                    n.span,
                    path,
                    format!("`{url}` names no directory"),
                    Some("write path:./dir (relative to the project) or path:/abs/dir".into()),
                );
                None
            } else if !local.starts_with('/') && (resolved == ".." || resolved.starts_with("../")) {
                cx.error(n.span, path, format!("`{url}` climbs out of the project directory"), Some("a relative path stays inside the project; write an absolute path to choose a place outside it".into()));
                None
            } else {
                Some(url)
            }
        }
        Some(s) if FLAKE_SCHEMES.contains(&s) && url.len() > s.len() + 1 => Some(url),
        _ => {
            cx.error(
                n.span,
                path,
                format!("`{url}` is not a flake URL"),
                Some(format!(
                    "start it with one of {}: github:owner/repo/ref, path:./dir, git+file:///dir",
                    FLAKE_SCHEMES.join(", ")
                )),
            );
            None
        }
    }
}

fn decode_defaults(cx: &mut Cx, n: Option<&Node>) -> Option<Defaults> {
    let mut d = Defaults {
        resources: DEFAULT_RESOURCES,
        health: DEFAULT_HEALTH,
    };
    let Some(n) = n else { return Some(d) };
    cx.map(n, "defaults", DEFAULTS_FIELDS)?;
    if let Some(r) = field(n, "resources") {
        d.resources = resources(cx, r, "defaults.resources", DEFAULT_RESOURCES)?;
    }
    if let Some(h) = field(n, "health") {
        cx.map(h, "defaults.health", HEALTH_TIMING_FIELDS)?;
        d.health = timing(cx, h, "defaults.health", DEFAULT_HEALTH)?;
    }
    Some(d)
}

/// Resource settings over a base; each field optional.
pub fn resources(cx: &mut Cx, n: &Node, path: &str, base: Resources) -> Option<Resources> {
    cx.map(n, path, RESOURCES_FIELDS)?;
    let before = cx.errors();
    let mut r = base;
    let fields: [(&str, (i64, i64), &str, &mut u32); 4] = [
        ("cores", CORES, "", &mut r.cores),
        ("memory", MEMORY_MIB, "MiB", &mut r.memory),
        ("swap", SWAP_MIB, "MiB", &mut r.swap),
        ("disk_gb", DISK_GB, "GB", &mut r.disk_gb),
    ];
    for (key, (min, max), unit, slot) in fields {
        if let Some(v) = field(n, key) {
            if let Some(value) = cx.int(v, &join(path, key), min, max, unit) {
                *slot = value as u32;
            }
        }
    }
    (cx.errors() == before).then_some(r)
}

/// Health timing over a base (the caller has checked the mapping's fields).
pub fn timing(cx: &mut Cx, n: &Node, path: &str, base: HealthTiming) -> Option<HealthTiming> {
    let before = cx.errors();
    let mut t = base;
    if let Some(v) = field(n, "interval") {
        t.interval_ms = cx
            .duration(v, &join(path, "interval"))
            .unwrap_or(t.interval_ms);
    }
    if let Some(v) = field(n, "timeout") {
        t.timeout_ms = cx
            .duration(v, &join(path, "timeout"))
            .unwrap_or(t.timeout_ms);
    }
    if let Some(v) = field(n, "retries") {
        t.retries = cx.int(v, &join(path, "retries"), 0, 1000, "").unwrap_or(0) as u32;
    }
    if let Some(v) = field(n, "start_period") {
        t.start_period_ms = cx.duration(v, &join(path, "start_period")).unwrap_or(0);
    }
    for (key, ms) in [("interval", t.interval_ms), ("timeout", t.timeout_ms)] {
        if ms == 0 {
            if let Some(v) = field(n, key) {
                cx.error(
                    v.span,
                    &join(path, key),
                    format!("`{key}` must be longer than zero"),
                    None,
                );
            }
        }
    }
    (cx.errors() == before).then_some(t)
}
