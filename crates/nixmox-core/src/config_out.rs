//! The canonical resolved project that `nixmox config` prints (like `docker compose config`):
//! defaults applied, the `requirements:` form normalised to `interface:`, implicit dependency
//! edges explicit and allocations shown. Its shape is documented in docs/manifest.md.

use serde_json::{json, Map, Value};

use crate::decode::format_duration_ms;
use crate::model::{
    Auth, Check, Deployer, Health, HealthTiming, Origin, Project, Proxy, Resources, SecretRef,
    Service, Upstream,
};

/// Version of the `config` output format.
pub const VERSION: u32 = 1;

/// The resolved project; `only` limits the services shown (all when empty).
pub fn resolved(p: &Project, only: &[usize]) -> Value {
    let mut services = Map::new();
    for (i, s) in selected(p, only) {
        services.insert(s.name.to_string(), service(p, i, s));
    }
    let mut head = head(p);
    head.insert("services".into(), Value::Object(services));
    Value::Object(head)
}

/// [`resolved`] as pretty JSON (the same text as `serde_json::to_writer_pretty` of it),
/// written as it is built: one service's value at a time, so a large project never holds the
/// whole tree or the whole text in memory.
pub fn write_json(p: &Project, only: &[usize], w: &mut dyn std::io::Write) -> std::io::Result<()> {
    use serde::ser::{Serialize, SerializeMap, Serializer};
    struct Services<'a>(&'a Project, &'a [usize]);
    impl Serialize for Services<'_> {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            let mut m = ser.serialize_map(None)?;
            for (i, s) in selected(self.0, self.1) {
                m.serialize_entry(s.name.as_str(), &service(self.0, i, s))?;
            }
            m.end()
        }
    }
    struct Resolved<'a>(Map<String, Value>, Services<'a>);
    impl Serialize for Resolved<'_> {
        fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
            let mut m = ser.serialize_map(None)?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.serialize_entry("services", &self.1)?;
            m.end()
        }
    }
    serde_json::to_writer_pretty(&mut *w, &Resolved(head(p), Services(p, only)))
        .map_err(std::io::Error::from)?;
    w.write_all(b"\n")
}

/// The services `only` selects (all when empty), in the project's order.
fn selected<'a>(p: &'a Project, only: &'a [usize]) -> impl Iterator<Item = (usize, &'a Service)> {
    p.services
        .iter()
        .enumerate()
        .filter(move |(i, _)| only.is_empty() || only.contains(i))
}

/// Everything of [`resolved`] but the services.
fn head(p: &Project) -> Map<String, Value> {
    let Value::Object(head) = json!({
        "version": VERSION,
        "project": p.name.as_str(),
        "domain": p.domain.as_str(),
        "network": {
            "cidr": p.network.cidr.to_string(),
            "gateway": p.network.gateway.to_string(),
            "vlan": p.network.vlan,
            "bridge": p.network.bridge,
            "nameservers": effective_nameservers(p),
        },
        "pools": {
            "vmid": format!("{}-{}", p.pools.vmid.start, p.pools.vmid.end),
            "ip": format!("{}-{}", p.pools.ip.start, p.pools.ip.end),
        },
        "proxmox": {
            "endpoint": p.proxmox.endpoint,
            "node": p.proxmox.node,
            "nodes": p.proxmox.nodes.iter().map(|n| json!({
                "name": n.name, "storage": n.storage, "template": n.template,
                "memory": n.memory, "cores": n.cores, "weight": n.weight,
            })).collect::<Vec<_>>(),
            "storage": p.proxmox.storage,
            "template": p.proxmox.template,
            "token": match &p.proxmox.token {
                SecretRef::Env(e) => json!({"env": e}),
                SecretRef::File(f) => json!({"file": f}),
            },
            "tls": {
                "ca_file": p.proxmox.tls.ca_file,
                "fingerprint": p.proxmox.tls.fingerprint,
                "insecure": p.proxmox.tls.insecure,
            },
            "snapshots": {
                "mode": p.proxmox.snapshots.mode.as_str(),
                "keep": p.proxmox.snapshots.keep,
            },
        },
        "infra": { "backend": p.infra.as_str() },
        "ssh": { "user": p.ssh.user.as_str(), "authorized_keys": p.ssh.authorized_keys, "host_key_checking": p.ssh.host_key_checking.as_str() },
        "nix": {
            "inputs": {
                "nixpkgs": p.nix.nixpkgs,
                "sops-nix": p.nix.sops_nix,
                "authentik-nix": p.nix.authentik_nix,
            },
            "deployer": match &p.nix.deployer {
                Deployer::NixosRebuild => json!("nixos-rebuild"),
                Deployer::Colmena => json!("colmena"),
                Deployer::Command { command, rollback } => json!({"command": command, "rollback": rollback}),
            },
        },
        "terraform": {
            "binary": p.terraform.binary,
            "backend": match &p.terraform.backend {
                None => json!({"type": "local"}),
                Some(b) => json!({"type": b.kind, "config": b.config}),
            },
        },
        "defaults": {
            "resources": resources(&p.defaults.resources),
            "health": timing(&p.defaults.health),
        },
        "state": { "backend": "sqlite", "path": p.state.path },
        "secrets": { "backend": "sops", "age_recipients": p.secrets.age_recipients },
        "deploy": { "parallel": p.deploy.parallel },
    }) else {
        unreachable!("json! of an object is an object")
    };
    head
}

/// The nameservers hosts use: the configured ones, else the DNS provider's address.
pub fn effective_nameservers(p: &Project) -> Vec<String> {
    if !p.network.nameservers.is_empty() {
        return p
            .network
            .nameservers
            .iter()
            .map(|n| n.to_string())
            .collect();
    }
    p.provider(crate::model::Capability::Dns)
        .map(|d| vec![d.host.ip.to_string()])
        .unwrap_or_default()
}

fn origin(o: Origin) -> &'static str {
    match o {
        Origin::Manifest => "manifest",
        Origin::Lock => "lock",
        Origin::Allocated => "allocated",
    }
}

fn resources(r: &Resources) -> Value {
    json!({"cores": r.cores, "memory": r.memory, "swap": r.swap, "disk_gb": r.disk_gb})
}

fn timing(t: &HealthTiming) -> Value {
    json!({
        "interval": format_duration_ms(t.interval_ms),
        "timeout": format_duration_ms(t.timeout_ms),
        "retries": t.retries,
        "start_period": format_duration_ms(t.start_period_ms),
    })
}

pub fn check(c: &Check) -> Value {
    match c {
        Check::Command(argv) => json!({"command": argv}),
        Check::Http { url, status, body } => {
            let mut m = Map::new();
            m.insert("http".into(), json!(url));
            if let Some(s) = status {
                m.insert("status".into(), json!(s));
            }
            if let Some(b) = body {
                m.insert("body".into(), json!(b));
            }
            Value::Object(m)
        }
        Check::Tcp { host, port } => json!({"tcp": format!("{host}:{port}")}),
        Check::Dns { name, expect } => match expect {
            Some(e) => json!({"dns": name, "expect": e.to_string()}),
            None => json!({"dns": name}),
        },
    }
}

fn service(p: &Project, i: usize, s: &Service) -> Value {
    let mut deps: Map<String, Value> = Map::new();
    for e in p.deps_of(i) {
        let entry = deps
            .entry(p.services[e.to].name.to_string())
            .or_insert_with(|| json!([]));
        if let Value::Array(a) = entry {
            a.push(json!(e.kind.as_str()));
        }
    }
    let mut provides = Map::new();
    for c in &s.provides {
        provides.insert(
            c.capability.key().into(),
            json!({"type": c.implementation()}),
        );
    }
    json!({
        "description": s.description,
        "manifest": s.manifest,
        "core": s.is_core(),
        "provides": provides,
        "depends_on": deps,
        "host": host(p, s),
        "nixos": { "modules": s.nixos_modules },
        "interface": interface(p, s),
    })
}

/// A service's `interface`: its databases, routes, identity settings, health checks and
/// Terraform, each only when it has some (health always).
fn interface(p: &Project, s: &Service) -> Map<String, Value> {
    let mut interface = Map::new();
    if !s.dbs.is_empty() {
        interface.insert(
            "db".into(),
            Value::Array(
                s.dbs
                    .iter()
                    .map(|d| json!({"type": "postgresql", "database": d.database, "role": d.role, "mode": d.mode.as_str(), "migrations": d.migrations}))
                    .collect(),
            ),
        );
    }
    if !s.proxies.is_empty() {
        interface.insert(
            "proxy".into(),
            Value::Array(s.proxies.iter().map(|x| proxy(p, s, x)).collect()),
        );
    }
    if let Some(a) = &s.auth {
        interface.insert("auth".into(), auth(a));
    }
    interface.insert("health".into(), health(&s.health));
    if !s.terraform.is_empty() {
        interface.insert(
            "terraform".into(),
            Value::Array(
                s.terraform
                    .iter()
                    .map(|t| json!({"phase": t.phase.as_str(), "modules": t.modules, "variables": t.variables, "targets": t.targets, "apply_order": t.apply_order, "protect": t.protect.iter().map(|p| p.as_str()).collect::<Vec<_>>()}))
                    .collect(),
            ),
        );
    }
    interface
}

/// One route, its upstream named by the service's FQDN for a bare port.
fn proxy(p: &Project, s: &Service, x: &Proxy) -> Value {
    json!({
        "domain": x.domain.as_str(),
        "path": x.path,
        "upstream": match &x.upstream {
            Upstream::Port(port) => format!("{}:{port}", p.fqdn(s)),
            Upstream::HostPort(h, port) => format!("{h}:{port}"),
        },
        "tls": x.tls,
        "authz": x.authz,
        "headers": x.headers,
    })
}

fn auth(a: &Auth) -> Value {
    let mut m = Map::new();
    m.insert("provider".into(), json!(a.provider));
    m.insert("name".into(), json!(a.display_name));
    if let Some(o) = &a.oidc {
        m.insert(
            "oidc".into(),
            json!({
                "client_id": o.client_id,
                "client_type": o.client_type.as_str(),
                "redirect_uris": o.redirect_uris,
                "scopes": o.scopes,
                "username_claim": o.username_claim,
                "groups_claim": o.groups_claim,
            }),
        );
    }
    Value::Object(m)
}

fn health(h: &Health) -> Value {
    let mut health = Map::new();
    for (phase, checks) in [
        ("startup", &h.startup),
        ("liveness", &h.liveness),
        ("readiness", &h.readiness),
    ] {
        health.insert(
            phase.into(),
            Value::Array(checks.iter().map(check).collect()),
        );
    }
    if let Value::Object(t) = timing(&h.timing) {
        health.extend(t);
    }
    Value::Object(health)
}

fn host(p: &Project, s: &Service) -> Value {
    let h = &s.host;
    json!({
        "hostname": h.hostname.as_str(),
        "fqdn": p.fqdn(s),
        "ip": h.ip.to_string(),
        "ip_source": origin(h.ip_origin),
        "vmid": h.vmid.get(),
        "vmid_source": origin(h.vmid_origin),
        "node": h.node,
        "node_source": origin(h.node_origin),
        "spread": h.spread,
        "resources": resources(&h.resources),
        "onboot": h.onboot,
        "start": h.start,
        "unprivileged": h.unprivileged,
        "features": {"nesting": h.nesting},
        "ssh_host_key": h.ssh_host_key,
        "backup": h.backup.as_ref().map(|b| json!({"storage": b.storage, "mode": b.mode, "schedule": b.schedule, "keep": b.keep})),
    })
}
