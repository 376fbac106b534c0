//! The planner: the validated project and what was recorded of earlier runs in; the step graph
//! the engine executes out.
//!
//! Phase order (the seed contract): `tf:infra` → `nix:core:<svc>` (in their own dependency
//! order) → `tf:auth-core` → `nix:core-auth:<svc>` → per non-core service, in dependency order:
//! `tf:service-infra:S` → `nix:service-config:S` → `tf:service-config:S` → `verify:S`.
//! Services without a path between them share no edge, so the engine may run them at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config_out;
use crate::flake_lock::FlakeLock;
use crate::model::{Capability, EdgeKind, InfraBackend, Project, Service, TfPhase, Upstream};
use crate::record::Record;
use crate::step_id::StepId;

/// The phases, in the order the seed contract fixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    TfInfra,
    NixCore,
    TfAuthCore,
    NixCoreAuth,
    TfServiceInfra,
    NixServiceConfig,
    TfServiceConfig,
    Verify,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::TfInfra,
        Phase::NixCore,
        Phase::TfAuthCore,
        Phase::NixCoreAuth,
        Phase::TfServiceInfra,
        Phase::NixServiceConfig,
        Phase::TfServiceConfig,
        Phase::Verify,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::TfInfra => "tf:infra",
            Phase::NixCore => "nix:core",
            Phase::TfAuthCore => "tf:auth-core",
            Phase::NixCoreAuth => "nix:core-auth",
            Phase::TfServiceInfra => "tf:service-infra",
            Phase::NixServiceConfig => "nix:service-config",
            Phase::TfServiceConfig => "tf:service-config",
            Phase::Verify => "verify",
        }
    }
    /// Whether the phase is one step for the whole project (`tf:infra`, `tf:auth-core`)
    /// rather than one per service.
    pub fn is_project_wide(self) -> bool {
        matches!(self, Phase::TfInfra | Phase::TfAuthCore)
    }
    pub fn is_terraform(self) -> bool {
        matches!(
            self,
            Phase::TfInfra | Phase::TfAuthCore | Phase::TfServiceInfra | Phase::TfServiceConfig
        )
    }
}

/// Whether the engine has work to do in the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Run,
    /// Planned so the order is visible; skipped instantly.
    Noop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Run => "run",
            Action::Noop => "noop",
        }
    }
}

/// How the step's input compares with the last successful run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    Create,
    Update,
    Unchanged,
    /// Recorded, but its service is gone from the project (an orphan, as Compose says).
    Delete,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Create => "create",
            Change::Update => "update",
            Change::Unchanged => "unchanged",
            Change::Delete => "delete",
        }
    }
    pub fn symbol(self) -> char {
        match self {
            Change::Create => '+',
            Change::Update => '~',
            Change::Unchanged => '=',
            Change::Delete => '-',
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The step's phase and, unless it is project-wide, its service.
    pub id: StepId,
    /// Indexes of the direct prerequisites in `Plan::steps`, ascending.
    pub after: Vec<usize>,
    pub action: Action,
    pub change: Change,
    /// What the step will do, in a few words.
    pub description: String,
    /// Why the step changed: which parts of its input were added, changed or removed.
    pub reasons: Vec<String>,
    pub hash: String,
    pub parts: BTreeMap<String, String>,
    /// Weight for the critical path: the recorded duration in ms, else 1000 for a step that
    /// runs and 0 for a no-op.
    pub weight: u64,
    /// Known to need `up --allow-destroy`: the destroy guard refused this step's plan last
    /// time, which would have deleted or replaced these resources.
    pub needs_allow_destroy: Vec<String>,
    /// Failed its health gate and was rolled back with this same input: not run again unless
    /// forced or its input changes. The note says when and why.
    pub held: Option<String>,
}

impl Step {
    pub fn phase(&self) -> Phase {
        self.id.phase()
    }
    /// The service the step belongs to; `None` for a project-wide step.
    pub fn service(&self) -> Option<&str> {
        self.id.service()
    }
}

/// The plan's note on a held step.
pub fn held_note(h: &crate::record::Held) -> String {
    format!(
        "failed in run {} and was rolled back ({}); not retried with the same input: change it, or run `nixmox up --force`",
        h.run, h.reason
    )
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub project: String,
    /// In a topological order: every step comes after all of its prerequisites.
    pub steps: Vec<Step>,
    /// Indexes into `steps`, first to last.
    pub critical_path: Vec<usize>,
    /// The services the plan was limited to, if any, after adding dependencies.
    pub selection: Option<Vec<String>>,
}

impl Plan {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }
    pub fn has_changes(&self) -> bool {
        self.steps.iter().any(|s| s.change != Change::Unchanged)
    }
    pub fn count(&self, change: Change) -> usize {
        self.steps.iter().filter(|s| s.change == change).count()
    }
}

/// Which services to plan.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Empty means every service.
    pub services: Vec<String>,
    /// `docker compose up svc` semantics: include what the named services depend on.
    pub with_deps: bool,
}

/// Inputs the planner needs besides the model.
#[derive(Clone, Debug, Default)]
pub struct PlanInput<'a> {
    pub record: Option<&'a Record>,
    /// Content digests of files the project references (modules, migrations), by
    /// project-relative path, so editing a module changes its step.
    pub files: Option<&'a BTreeMap<String, String>>,
    /// The project's `flake.lock`, when there is one: the revision of each flake input is part
    /// of every `nix:*` step that builds from it.
    pub flake_lock: Option<&'a FlakeLock>,
}

/// The services a selection stands for: the named ones plus, unless `--no-deps`, everything
/// they depend on transitively. Returns service indexes, ascending.
pub fn select(p: &Project, sel: &Selection) -> Vec<usize> {
    if sel.services.is_empty() {
        return (0..p.services.len()).collect();
    }
    let mut chosen: BTreeSet<usize> = sel.services.iter().filter_map(|n| p.index_of(n)).collect();
    if sel.with_deps {
        let mut stack: Vec<usize> = chosen.iter().copied().collect();
        while let Some(i) = stack.pop() {
            for e in p.deps_of(i) {
                if chosen.insert(e.to) {
                    stack.push(e.to);
                }
            }
        }
    }
    chosen.into_iter().collect()
}

/// Does the edge order deployments? A core service's `auth` edge does not: its OIDC client is
/// made in `tf:auth-core` and its host redeployed in `nix:core-auth`.
fn orders(p: &Project, e: &crate::model::Edge) -> bool {
    !(p.services[e.from].is_core() && e.kind == EdgeKind::Auth)
}

/// Services in dependency order (providers first), ties broken by name, for `indexes`.
fn topo(p: &Project, indexes: &[usize]) -> Vec<usize> {
    let inset: BTreeSet<usize> = indexes.iter().copied().collect();
    let mut indeg: BTreeMap<usize, usize> = indexes.iter().map(|&i| (i, 0)).collect();
    let mut dependents: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for e in &p.edges {
        if inset.contains(&e.from) && inset.contains(&e.to) && orders(p, e) {
            *indeg.entry(e.from).or_default() += 1;
            dependents.entry(e.to).or_default().push(e.from);
        }
    }
    let mut heap: BinaryHeap<Reverse<usize>> = indeg
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(i, _)| Reverse(*i))
        .collect();
    let mut out = Vec::with_capacity(indexes.len());
    while let Some(Reverse(i)) = heap.pop() {
        out.push(i);
        for &d in dependents.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            let n = indeg.get_mut(&d).expect("dependent is in the set");
            *n -= 1;
            if *n == 0 {
                heap.push(Reverse(d));
            }
        }
    }
    out
}

/// Boot order for each service's container: providers start first (depth in the graph).
pub fn startup_order(p: &Project) -> Vec<u32> {
    let all: Vec<usize> = (0..p.services.len()).collect();
    let mut depth = vec![0u32; p.services.len()];
    for i in topo(p, &all) {
        for e in p.deps_of(i) {
            if orders(p, e) {
                depth[i] = depth[i].max(depth[e.to] + 1);
            }
        }
    }
    depth.into_iter().map(|d| d + 1).collect()
}

fn hex(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for &b in digest {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

/// The SHA-256 of a value's compact JSON text (the same bytes as `value.to_string()`), without
/// building the text.
fn hash_value(value: &Value) -> String {
    struct W(Sha256);
    impl std::io::Write for W {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = W(Sha256::new());
    serde_json::to_writer(&mut w, value).expect("hashing never fails");
    hex(&w.0.finalize())
}

fn hash_str(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

/// Builds a step's named input parts and hashes them.
struct Parts(BTreeMap<String, String>);

impl Parts {
    fn new() -> Self {
        Parts(BTreeMap::new())
    }
    fn add(&mut self, key: impl Into<String>, value: &Value) {
        self.0.insert(key.into(), hash_value(value));
    }
    fn add_hash(&mut self, key: impl Into<String>, hash: &str) {
        self.0.insert(key.into(), hash.to_string());
    }
    fn hash(&self) -> String {
        let mut h = Sha256::new();
        for (k, v) in &self.0 {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        hex(&h.finalize())
    }
}

impl Ctx<'_> {
    /// The locked revision of every flake input the host builds from: nixpkgs and sops-nix
    /// everywhere, an input an implementation claims (`Provider::flake_inputs`) on its host
    /// only.
    fn add_inputs(&self, parts: &mut Parts, s: &Service) {
        for (name, _) in self.p.nix.inputs() {
            if !crate::providers::service_needs_input(s, name) {
                continue;
            }
            let id = self
                .flake_lock
                .and_then(|l| l.inputs.get(name))
                .map_or(UNLOCKED, |i| i.id.as_str());
            parts.add_hash(format!("{INPUT_PART}{name}"), id);
        }
    }
}

impl Ctx<'_> {
    /// The implementation of each capability a step depends on, by name: switching one (say
    /// `caddy` to `nginx`) changes exactly the steps whose output it shapes.
    fn add_implementations(&self, parts: &mut Parts, caps: impl IntoIterator<Item = Capability>) {
        for cap in caps {
            if let Some(imp) = self.p.implementation(cap) {
                parts.add_hash(format!("{IMPL_PART}{}", cap.key()), imp.implementation());
            }
        }
    }
}

/// The part naming the implementation of a capability a step depends on. Its value is the
/// implementation's name itself, not a hash, so a reason can name the old and the new one.
const IMPL_PART: &str = "implementation:";

/// The capabilities whose implementation shapes a service's own host or its checks: those of
/// the providers it uses.
fn uses(s: &Service) -> Vec<Capability> {
    let mut out = Vec::new();
    if !s.dbs.is_empty() {
        out.push(Capability::Database);
    }
    if !s.proxies.is_empty() {
        out.push(Capability::ReverseProxy);
    }
    if s.auth.is_some() {
        out.push(Capability::Identity);
    }
    out
}

/// What a core service's host depends on: the implementations it provides, the ones it uses,
/// and for the reverse proxy the identity provider's (its outpost).
fn core_uses(s: &Service) -> Vec<Capability> {
    let mut out: Vec<Capability> = s.provides.iter().map(|x| x.capability).collect();
    if s.provides(Capability::ReverseProxy) {
        out.push(Capability::Identity);
    }
    out.extend(uses(s));
    out.sort();
    out.dedup();
    out
}

/// Hashes of the parts of a service's steps that cost most to build.
struct ServiceHashes {
    host: String,
    own: String,
    auth: String,
    health: String,
}

struct Ctx<'a> {
    p: &'a Project,
    files: Option<&'a BTreeMap<String, String>>,
    flake_lock: Option<&'a FlakeLock>,
    startup: Vec<u32>,
    /// Hash of `provider_facts()`, computed once: it is part of most steps.
    facts_hash: String,
    /// Hash of `base()`, computed once for the same reason.
    base_hash: String,
    has_dns: bool,
}

impl Ctx<'_> {
    fn digest(&self, path: &str) -> Value {
        json!([path, self.files.and_then(|f| f.get(path))])
    }
    fn host(&self, i: usize) -> Value {
        let s = &self.p.services[i];
        let h = &s.host;
        let mut v = json!({
            "hostname": h.hostname.as_str(), "ip": h.ip.to_string(), "vmid": h.vmid.get(),
            "node": h.node, "storage": h.storage, "template": h.template, "cores": h.resources.cores, "memory": h.resources.memory,
            "swap": h.resources.swap, "disk_gb": h.resources.disk_gb, "onboot": h.onboot,
            "start": h.start, "unprivileged": h.unprivileged, "nesting": h.nesting,
            "core": s.is_core(), "description": s.description, "startup": self.startup[i],
            "ssh_host_key": h.ssh_host_key,
        });
        // Only when set, so hosts without one keep their recorded hash.
        if let Some(b) = &h.backup {
            v["backup"] = json!([b.storage, b.mode, b.schedule, b.keep]);
        }
        v
    }
    fn base(&self) -> Value {
        let p = self.p;
        json!({
            "project": p.name.as_str(), "domain": p.domain.as_str(),
            "cidr": p.network.cidr.to_string(), "gateway": p.network.gateway.to_string(),
            "nameservers": config_out::effective_nameservers(p),
            "ssh": [json!(p.ssh.user.as_str()), json!(p.ssh.authorized_keys)], "nixpkgs": p.nix.nixpkgs,
        })
    }
    /// A service's own NixOS-relevant configuration.
    fn own(&self, s: &Service) -> Value {
        json!({
            "host": [s.host.hostname.as_str(), s.host.ip.to_string()],
            "modules": s.nixos_modules.iter().map(|m| self.digest(m)).collect::<Vec<_>>(),
            "dbs": s.dbs.iter().map(|d| json!([d.database, d.role, d.mode.as_str(),
                d.migrations.iter().map(|m| self.digest(m)).collect::<Vec<_>>()])).collect::<Vec<_>>(),
            "proxies": s.proxies.iter().map(|x| self.proxy(s, x)).collect::<Vec<_>>(),
            "auth": s.auth.as_ref().map(|a| json!([a.provider, a.display_name, a.oidc.as_ref().map(|o| json!([o.client_id, o.client_type.as_str(), o.redirect_uris, o.scopes, o.username_claim, o.groups_claim]))])),
            "provides": s.provides.iter().map(|c| c.capability.key()).collect::<Vec<_>>(),
        })
    }
    fn proxy(&self, s: &Service, x: &crate::model::Proxy) -> Value {
        let upstream = match &x.upstream {
            Upstream::Port(port) => format!("{}:{port}", s.host.ip),
            Upstream::HostPort(h, port) => format!("{h}:{port}"),
        };
        json!([
            x.domain.as_str(),
            x.path,
            upstream,
            x.tls,
            x.authz,
            x.headers
        ])
    }
    fn provider_facts(&self) -> Value {
        let p = self.p;
        let f = |c: Capability| {
            p.provider(c)
                .map(|s| json!([s.host.hostname.as_str(), s.host.ip.to_string()]))
        };
        let idp_domain = p
            .provider(Capability::Identity)
            .and_then(|s| s.proxies.first().map(|x| x.domain.to_string()));
        json!({"database": f(Capability::Database), "identity": f(Capability::Identity), "identity_domain": idp_domain})
    }
}

/// Plans a deployment.
pub fn plan(p: &Project, sel: &Selection, input: &PlanInput) -> Plan {
    let mut ctx = Ctx {
        p,
        files: input.files,
        flake_lock: input.flake_lock,
        startup: startup_order(p),
        facts_hash: String::new(),
        base_hash: String::new(),
        has_dns: p.provider(Capability::Dns).is_some(),
    };
    ctx.facts_hash = hash_str(&ctx.provider_facts().to_string());
    ctx.base_hash = hash_str(&ctx.base().to_string());
    let ctx = ctx;
    let chosen = select(p, sel);
    let chosen_set: BTreeSet<usize> = chosen.iter().copied().collect();
    let core: Vec<usize> = topo(
        p,
        &chosen
            .iter()
            .copied()
            .filter(|&i| p.services[i].is_core())
            .collect::<Vec<_>>(),
    );
    let apps: Vec<usize> = topo(
        p,
        &chosen
            .iter()
            .copied()
            .filter(|&i| !p.services[i].is_core())
            .collect::<Vec<_>>(),
    );

    let mut steps: Vec<Step> = Vec::new();
    let push = |steps: &mut Vec<Step>,
                phase: Phase,
                service: Option<&Service>,
                after: Vec<usize>,
                action: Action,
                description: String,
                parts: Parts|
     -> usize {
        let mut after = after;
        after.sort_unstable();
        after.dedup();
        steps.push(Step {
            id: StepId::new(phase, service.map(|s| &s.name))
                .expect("the planner gives a service to exactly the per-service phases"),
            after,
            action,
            change: Change::Create,
            description,
            reasons: Vec::new(),
            hash: parts.hash(),
            parts: parts.0,
            weight: 0,
            needs_allow_destroy: Vec::new(),
            held: None,
        });
        steps.len() - 1
    };

    // The costly, independent parts of every service's steps (building a value and hashing
    // it), computed on several threads before the steps are put together in order.
    let all: Vec<usize> = (0..p.services.len()).collect();
    let hashed: Vec<ServiceHashes> = crate::par::map(&all, |&i| {
        let s = &p.services[i];
        let own = ctx.own(s);
        let h = &s.health;
        ServiceHashes {
            host: hash_value(&ctx.host(i)),
            own: hash_value(&own),
            auth: hash_value(&own["auth"]),
            health: hash_value(&json!({
                "startup": h.startup.iter().map(config_out::check).collect::<Vec<_>>(),
                "liveness": h.liveness.iter().map(config_out::check).collect::<Vec<_>>(),
                "readiness": h.readiness.iter().map(config_out::check).collect::<Vec<_>>(),
                "timing": [h.timing.interval_ms, h.timing.timeout_ms, h.timing.retries, h.timing.start_period_ms],
            })),
        }
    });

    // tf:infra: every host of the project, whatever the selection (one Terraform workspace).
    let mut parts = Parts::new();
    parts.add("project", &json!({"base": ctx.base(), "backend": p.infra.as_str(), "bridge": p.network.bridge, "vlan": p.network.vlan, "proxmox": [p.proxmox.endpoint, p.proxmox.node, p.proxmox.storage, p.proxmox.template]}));
    for (i, s) in p.services.iter().enumerate() {
        parts.add_hash(format!("host:{}", s.name), &hashed[i].host);
    }
    let (action, description) = match p.infra {
        InfraBackend::None => (
            Action::Noop,
            "hosts exist already (infra.backend: none)".to_string(),
        ),
        b => (
            Action::Run,
            format!(
                "provision {} containers ({} core, {} service) with {}",
                p.services.len(),
                p.services.iter().filter(|s| s.is_core()).count(),
                p.services.iter().filter(|s| !s.is_core()).count(),
                b.as_str()
            ),
        ),
    };
    let infra = push(
        &mut steps,
        Phase::TfInfra,
        None,
        Vec::new(),
        action,
        description,
        parts,
    );

    // nix:core:<svc>, ordered among themselves.
    let mut core_step: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in &core {
        let s = &p.services[i];
        let mut parts = Parts::new();
        parts.add_hash("base", &ctx.base_hash);
        parts.add_hash("self", &hashed[i].own);
        // A moved container is deployed and health-checked again on its new node.
        parts.add("node", &json!(s.host.node));
        parts.add_hash("providers", &ctx.facts_hash);
        ctx.add_inputs(&mut parts, s);
        ctx.add_implementations(&mut parts, core_uses(s));
        let mut what: Vec<String> = Vec::new();
        for cap in s.provides.iter().map(|x| x.capability) {
            let mut consumers = 0usize;
            for (j, c) in p.services.iter().enumerate() {
                let part = match cap {
                    Capability::Database if !c.dbs.is_empty() && j != i => Some(
                        json!({"ip": c.host.ip.to_string(), "dbs": c.dbs.iter().map(|d| json!([d.database, d.role, d.mode.as_str(), d.migrations.iter().map(|m| ctx.digest(m)).collect::<Vec<_>>()])).collect::<Vec<_>>()}),
                    ),
                    Capability::ReverseProxy if !c.proxies.is_empty() && j != i => Some(json!(c
                        .proxies
                        .iter()
                        .map(|x| ctx.proxy(c, x))
                        .collect::<Vec<_>>())),
                    Capability::Dns => Some(json!([
                        p.fqdn(c),
                        c.host.ip.to_string(),
                        c.proxies
                            .iter()
                            .map(|x| x.domain.as_str())
                            .collect::<Vec<_>>()
                    ])),
                    _ => None,
                };
                if let Some(v) = part {
                    consumers += 1;
                    let kind = match cap {
                        Capability::Database => "db",
                        Capability::ReverseProxy => "routes",
                        Capability::Dns => "records",
                        Capability::Identity => "identity",
                    };
                    parts.add(format!("{kind}:{}", c.name), &v);
                }
            }
            what.push(match cap {
                Capability::Database => format!("databases for {consumers} consumer(s)"),
                Capability::ReverseProxy => format!("routes for {consumers} service(s)"),
                Capability::Dns => format!("records for {consumers} host(s)"),
                Capability::Identity => "identity provider".to_string(),
            });
        }
        if s.provides(Capability::ReverseProxy) {
            parts.add(
                "outpost",
                &json!(p
                    .provider(Capability::Identity)
                    .map(|x| x.host.ip.to_string())),
            );
        }
        let mut after = Vec::new();
        for e in p.deps_of(i) {
            if orders(p, e) {
                if let Some(&k) = core_step.get(&e.to) {
                    after.push(k);
                }
            }
        }
        // Only the first core steps wait on `tf:infra` directly; the rest wait through them.
        if after.is_empty() {
            after.push(infra);
        }
        let description = format!(
            "deploy {} ({}): {}",
            s.host.hostname,
            s.host.ip,
            what.join(", ")
        );
        let k = push(
            &mut steps,
            Phase::NixCore,
            Some(s),
            after,
            Action::Run,
            description,
            parts,
        );
        core_step.insert(i, k);
    }

    // tf:auth-core: after every core step (and its health gate).
    let mut parts = Parts::new();
    parts.add_hash("identity", &ctx.facts_hash);
    ctx.add_implementations(&mut parts, [Capability::Identity]);
    let mut oidc_core = 0;
    let mut forward = 0;
    for (s, hashed) in p.services.iter().zip(&hashed) {
        if s.is_core() && s.auth.is_some() {
            oidc_core += 1;
            parts.add_hash(format!("oidc:{}", s.name), &hashed.auth);
        }
        let authz: Vec<&str> = s
            .proxies
            .iter()
            .filter(|x| x.authz)
            .map(|x| x.domain.as_str())
            .collect();
        if !authz.is_empty() {
            forward += 1;
            parts.add(format!("outpost:{}", s.name), &json!(authz));
        }
    }
    let has_idp = p.provider(Capability::Identity).is_some();
    let (action, description) = if has_idp
        && (oidc_core > 0 || forward > 0 || p.services.iter().any(|s| s.auth.is_some()))
    {
        (Action::Run, format!("configure the identity provider: flows, scope mappings, {oidc_core} core OIDC application(s), outpost for {forward} forward-auth service(s)"))
    } else if has_idp {
        (Action::Noop, "no service uses authentication".to_string())
    } else {
        (
            Action::Noop,
            "the project has no identity provider".to_string(),
        )
    };
    // Behind every core deploy, which are behind `tf:infra`; with no core service, behind
    // `tf:infra` itself, so no service is deployed (or snapshotted) before its container
    // exists (found by issue 14's tests).
    let auth_after: Vec<usize> = if core_step.is_empty() {
        vec![infra]
    } else {
        core_step.values().copied().collect()
    };
    let auth_core = push(
        &mut steps,
        Phase::TfAuthCore,
        None,
        auth_after,
        action,
        description,
        parts,
    );

    // nix:core-auth:<svc>: core services that use auth get their client secret.
    let mut core_auth_step: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in &core {
        let s = &p.services[i];
        if s.auth.is_none() {
            continue;
        }
        let mut parts = Parts::new();
        parts.add_hash("base", &ctx.base_hash);
        parts.add_hash("self", &hashed[i].own);
        // A moved container is deployed and health-checked again on its new node.
        parts.add("node", &json!(s.host.node));
        parts.add_hash("providers", &ctx.facts_hash);
        ctx.add_inputs(&mut parts, s);
        ctx.add_implementations(&mut parts, core_uses(s));
        let description = format!("redeploy {} with its OIDC client secret", s.host.hostname);
        let k = push(
            &mut steps,
            Phase::NixCoreAuth,
            Some(s),
            vec![auth_core, core_step[&i]],
            Action::Run,
            description,
            parts,
        );
        core_auth_step.insert(i, k);
    }

    // Per non-core service, in dependency order.
    let mut verify_step: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in &apps {
        let s = &p.services[i];
        let mut after = vec![auth_core];
        for e in p.deps_of(i) {
            if let Some(&k) = verify_step.get(&e.to) {
                after.push(k);
            } else if let Some(&k) = core_auth_step.get(&e.to) {
                after.push(k);
            }
            // A core dependency's `nix:core` step is already behind `tf:auth-core`; `after`
            // lists direct prerequisites only.
        }
        // tf:service-infra: the service's OIDC application, Terraform-managed databases and
        // its own service-infra modules. Forward-auth providers live in tf:auth-core, next to
        // the outpost that serves them.
        let infra_tf: Vec<_> = s
            .terraform
            .iter()
            .filter(|t| t.phase == TfPhase::ServiceInfra)
            .collect();
        let oidc = s.auth.as_ref().and_then(|a| a.oidc.as_ref());
        let tf_dbs: Vec<&str> = s
            .dbs
            .iter()
            .filter(|d| d.mode == crate::model::DbMode::Terraform)
            .map(|d| d.database.as_str())
            .collect();
        let own_hash = &hashed[i].own;
        let mut parts = Parts::new();
        parts.add("terraform", &tf_json(&ctx, &infra_tf));
        parts.add_hash("auth", &hashed[i].auth);
        parts.add("db-terraform", &json!(tf_dbs));
        parts.add_hash("providers", &ctx.facts_hash);
        let tf_uses = [
            (!tf_dbs.is_empty()).then_some(Capability::Database),
            oidc.is_some().then_some(Capability::Identity),
        ];
        ctx.add_implementations(&mut parts, tf_uses.into_iter().flatten());
        let mut what = Vec::new();
        if let Some(o) = oidc {
            what.push(format!("OIDC application `{}`", o.client_id));
        }
        if !tf_dbs.is_empty() {
            what.push(format!("database(s) {} by Terraform", tf_dbs.join(", ")));
        }
        let modules: usize = infra_tf.iter().map(|t| t.modules.len()).sum();
        if modules > 0 {
            what.push(format!("{modules} module(s)"));
        }
        let (action, description) = if what.is_empty() {
            (Action::Noop, "no service-infra Terraform".to_string())
        } else {
            (Action::Run, format!("apply {}", what.join(", ")))
        };
        let a = push(
            &mut steps,
            Phase::TfServiceInfra,
            Some(s),
            after,
            action,
            description,
            parts,
        );

        // nix:service-config
        let mut parts = Parts::new();
        parts.add_hash("base", &ctx.base_hash);
        parts.add_hash("self", own_hash);
        parts.add_hash("providers", &ctx.facts_hash);
        ctx.add_inputs(&mut parts, s);
        ctx.add_implementations(&mut parts, uses(s));
        let description = format!("deploy {} ({})", s.host.hostname, s.host.ip);
        let b = push(
            &mut steps,
            Phase::NixServiceConfig,
            Some(s),
            vec![a],
            Action::Run,
            description,
            parts,
        );

        // tf:service-config
        let config_tf: Vec<_> = s
            .terraform
            .iter()
            .filter(|t| t.phase == TfPhase::ServiceConfig)
            .collect();
        let mut parts = Parts::new();
        parts.add("terraform", &tf_json(&ctx, &config_tf));
        let modules: usize = config_tf.iter().map(|t| t.modules.len()).sum();
        let (action, description) = if modules == 0 {
            (Action::Noop, "no service-config Terraform".to_string())
        } else {
            (
                Action::Run,
                format!("apply {modules} module(s) that need the running service"),
            )
        };
        let c = push(
            &mut steps,
            Phase::TfServiceConfig,
            Some(s),
            vec![b],
            action,
            description,
            parts,
        );

        // verify
        let mut parts = Parts::new();
        let h = &s.health;
        parts.add_hash("health", &hashed[i].health);
        parts.add_hash("wiring", own_hash);
        parts.add_hash("providers", &ctx.facts_hash);
        // The end-to-end probes come from the implementations (docs/health.md).
        let probed = ctx.has_dns.then_some(Capability::Dns).into_iter();
        ctx.add_implementations(&mut parts, uses(s).into_iter().chain(probed));
        let checks = h.startup.len() + h.liveness.len() + h.readiness.len();
        let mut wiring = Vec::new();
        if !s.dbs.is_empty() {
            wiring.push("db");
        }
        if !s.proxies.is_empty() {
            wiring.push("proxy");
        }
        if ctx.has_dns {
            wiring.push("dns");
        }
        if oidc.is_some() {
            wiring.push("auth");
        }
        let (action, description) = if checks == 0 && wiring.is_empty() {
            (Action::Noop, "nothing to check".to_string())
        } else {
            (
                Action::Run,
                format!(
                    "{checks} health check(s); end-to-end: {}",
                    if wiring.is_empty() {
                        "none".to_string()
                    } else {
                        wiring.join(", ")
                    }
                ),
            )
        };
        let d = push(
            &mut steps,
            Phase::Verify,
            Some(s),
            vec![c],
            action,
            description,
            parts,
        );
        verify_step.insert(i, d);
    }

    // Compare with the record.
    let record = input.record;
    for step in &mut steps {
        let rec = record.and_then(|r| r.get(step.id.as_str()));
        step.weight = match (rec.and_then(|r| r.duration_ms), step.action) {
            (Some(d), _) => d,
            (None, Action::Run) => 1000,
            (None, Action::Noop) => 0,
        };
        match rec {
            None => step.change = Change::Create,
            Some(r) if r.hash == step.hash => step.change = Change::Unchanged,
            Some(r) => {
                step.change = Change::Update;
                step.reasons = explain(&r.parts, &step.parts);
            }
        }
        // A refusal matters while the step still has something to apply; an input back at
        // its last success has nothing to destroy.
        if let Some(refused) = record.and_then(|r| r.refused.get(step.id.as_str())) {
            if step.change != Change::Unchanged {
                step.needs_allow_destroy = refused.clone();
            }
        }
        // A rolled-back failure is not retried silently with the same input (a timer running
        // `up` would loop: deploy, fail, roll back).
        if let Some(h) = record.and_then(|r| r.held.get(step.id.as_str())) {
            if step.change != Change::Unchanged && h.hash == step.hash {
                step.held = Some(held_note(h));
            }
        }
    }
    // Orphans: recorded steps of services no longer in the project.
    if sel.services.is_empty() {
        if let Some(r) = record {
            for (id, _) in r.steps.iter() {
                let Some(id) = id.parse::<StepId>().ok() else {
                    continue;
                };
                let Some(svc) = id.service() else {
                    continue;
                };
                if p.service(svc).is_none() {
                    let description = format!("`{svc}` was removed from the project; `nixmox down {svc}` or `up --remove-orphans` removes what it left");
                    steps.push(Step {
                        id,
                        after: Vec::new(),
                        action: Action::Noop,
                        change: Change::Delete,
                        description,
                        reasons: Vec::new(),
                        hash: String::new(),
                        parts: BTreeMap::new(),
                        weight: 0,
                        needs_allow_destroy: Vec::new(),
                        held: None,
                    });
                }
            }
        }
    }
    let critical_path = critical_path(
        &steps
            .iter()
            .map(|s| (s.weight, s.after.clone()))
            .collect::<Vec<_>>(),
    );
    let selection = (!sel.services.is_empty()).then(|| {
        chosen_set
            .iter()
            .map(|&i| p.services[i].name.to_string())
            .collect()
    });
    Plan {
        project: p.name.to_string(),
        steps,
        critical_path,
        selection,
    }
}

fn tf_json(ctx: &Ctx, uses: &[&crate::model::TerraformUse]) -> Value {
    json!(uses
        .iter()
        .map(|t| json!({
            "modules": t.modules.iter().map(|m| ctx.digest(m)).collect::<Vec<_>>(),
            "variables": t.variables, "targets": t.targets, "apply_order": t.apply_order,
        }))
        .collect::<Vec<_>>())
}

/// Words for a changed part key: `db:guacamole` → "db of `guacamole`".
/// The part of a `nix:*` step that holds one flake input's locked revision (`input:nixpkgs`).
const INPUT_PART: &str = "input:";
/// The value of an input part while the project has no `flake.lock` yet.
const UNLOCKED: &str = "unlocked";

fn short_locked(id: &str) -> String {
    if id == UNLOCKED {
        return "(not locked)".into();
    }
    id.trim_start_matches("sha256-").chars().take(12).collect()
}

fn describe_part(key: &str) -> String {
    match key.split_once(':') {
        Some((kind, svc)) => {
            let kind = match kind {
                "db" => "database requirements",
                "routes" => "proxy routes",
                "records" => "DNS records",
                "host" => "container",
                "oidc" => "OIDC application",
                "outpost" => "forward-auth domains",
                "implementation" => "the implementation",
                k => k,
            };
            format!("{kind} of `{svc}`")
        }
        None => match key {
            "self" => "its own configuration".to_string(),
            "base" => "project-wide settings (domain, network, SSH keys, nixpkgs)".to_string(),
            "providers" => "the providers it uses".to_string(),
            "project" => "project-wide infrastructure settings".to_string(),
            "terraform" => "its Terraform modules or variables".to_string(),
            "health" => "its health checks".to_string(),
            "wiring" => "what it is wired to (db, routes, auth)".to_string(),
            k => k.to_string(),
        },
    }
}

/// Compares recorded and current part hashes.
pub fn explain(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in new {
        // An implementation's part is its name, so the reason can name both.
        if let (Some(cap), Some(o)) = (k.strip_prefix(IMPL_PART), old.get(k)) {
            if o != v {
                out.push(format!("{cap} implementation changed: {o} → {v}"));
            }
            continue;
        }
        // A flake input's part is its locked revision itself, so the reason can name both.
        if let (Some(name), Some(o)) = (k.strip_prefix(INPUT_PART), old.get(k)) {
            if o != v {
                out.push(format!(
                    "{name} updated {} → {}",
                    short_locked(o),
                    short_locked(v)
                ));
            }
            continue;
        }
        match old.get(k) {
            None => out.push(format!("added: {}", describe_part(k))),
            Some(o) if o != v => out.push(format!("changed: {}", describe_part(k))),
            _ => {}
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.push(format!("removed: {}", describe_part(k)));
        }
    }
    out
}

/// The longest chain by weight through a DAG given in topological order as (weight, after).
pub fn critical_path(nodes: &[(u64, Vec<usize>)]) -> Vec<usize> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut dist = vec![0u64; nodes.len()];
    let mut prev: Vec<Option<usize>> = vec![None; nodes.len()];
    for (i, (w, after)) in nodes.iter().enumerate() {
        let mut best: Option<(u64, usize)> = None;
        for &a in after {
            if a < i && best.is_none_or(|(d, _)| dist[a] > d) {
                best = Some((dist[a], a));
            }
        }
        dist[i] = w + best.map(|(d, _)| d).unwrap_or(0);
        prev[i] = best.map(|(_, a)| a);
    }
    let mut end = 0;
    for i in 0..nodes.len() {
        // On ties prefer the later step, so zero-weight tails (no-ops) stay on the path.
        if dist[i] >= dist[end] {
            end = i;
        }
    }
    let mut path = vec![end];
    while let Some(p) = prev[*path.last().expect("path is never empty")] {
        path.push(p);
    }
    path.reverse();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_path_takes_heaviest_chain() {
        // 0 → 1 → 3 and 0 → 2 → 3; branch 2 is heavier.
        let g = vec![(1, vec![]), (1, vec![0]), (5, vec![0]), (1, vec![1, 2])];
        assert_eq!(critical_path(&g), vec![0, 2, 3]);
        // Two disconnected chains: the heavier one wins.
        let g = vec![(1, vec![]), (1, vec![0]), (3, vec![]), (0, vec![2])];
        assert_eq!(critical_path(&g), vec![2, 3]);
        // Equal weights: the longest chain.
        let g = vec![(1, vec![]), (1, vec![0]), (1, vec![1]), (1, vec![])];
        assert_eq!(critical_path(&g), vec![0, 1, 2]);
        assert!(critical_path(&[]).is_empty());
    }

    #[test]
    fn explains_parts() {
        let old: BTreeMap<String, String> = [
            ("db:a".to_string(), "1".to_string()),
            ("self".to_string(), "1".to_string()),
        ]
        .into();
        let new: BTreeMap<String, String> = [
            ("db:b".to_string(), "1".to_string()),
            ("self".to_string(), "2".to_string()),
        ]
        .into();
        assert_eq!(
            explain(&old, &new),
            vec![
                "added: database requirements of `b`".to_string(),
                "changed: its own configuration".to_string(),
                "removed: database requirements of `a`".to_string(),
            ]
        );
    }
}
