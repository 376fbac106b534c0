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

/// Services in dependency order (providers first), ties broken by name, for `indexes` (each
/// at most once).
fn topo(p: &Project, indexes: &[usize]) -> Vec<usize> {
    // Vectors indexed by service, not maps: this runs three times per plan over every edge.
    let n = p.services.len();
    let mut inset = vec![false; n];
    for &i in indexes {
        inset[i] = true;
    }
    let mut indeg = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for e in &p.edges {
        if inset[e.from] && inset[e.to] && orders(p, e) {
            indeg[e.from] += 1;
            dependents[e.to].push(e.from);
        }
    }
    let mut heap: BinaryHeap<Reverse<usize>> = indexes
        .iter()
        .filter(|&&i| indeg[i] == 0)
        .map(|&i| Reverse(i))
        .collect();
    let mut out = Vec::with_capacity(indexes.len());
    while let Some(Reverse(i)) = heap.pop() {
        out.push(i);
        for &d in &dependents[i] {
            indeg[d] -= 1;
            if indeg[d] == 0 {
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
    /// Its part of a provider's `nix:core` step (`db:`, `routes:`, `records:`), when the
    /// project has that provider and the service needs it.
    db: Option<String>,
    routes: Option<String>,
    records: Option<String>,
    /// Its forward-auth domains, part of `tf:auth-core`, when it has any.
    outpost: Option<String>,
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

impl<'a> Ctx<'a> {
    fn new(p: &'a Project, input: &PlanInput<'a>) -> Self {
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
        ctx
    }

    /// The hashes of service `i`'s costly parts (see [`ServiceHashes`]).
    fn service_hashes(&self, i: usize) -> ServiceHashes {
        let p = self.p;
        let s = &p.services[i];
        let own = self.own(s);
        let h = &s.health;
        let provided = |cap: Capability| p.provider(cap).is_some();
        let db = (provided(Capability::Database) && !s.dbs.is_empty()).then(|| {
            hash_value(&json!({"ip": s.host.ip.to_string(), "dbs": s.dbs.iter().map(|d| json!([d.database, d.role, d.mode.as_str(), d.migrations.iter().map(|m| self.digest(m)).collect::<Vec<_>>()])).collect::<Vec<_>>()}))
        });
        let routes = (provided(Capability::ReverseProxy) && !s.proxies.is_empty()).then(|| {
            hash_value(&json!(s
                .proxies
                .iter()
                .map(|x| self.proxy(s, x))
                .collect::<Vec<_>>()))
        });
        let records = provided(Capability::Dns).then(|| {
            hash_value(&json!([
                p.fqdn(s),
                s.host.ip.to_string(),
                s.proxies
                    .iter()
                    .map(|x| x.domain.as_str())
                    .collect::<Vec<_>>()
            ]))
        });
        let authz: Vec<&str> = s
            .proxies
            .iter()
            .filter(|x| x.authz)
            .map(|x| x.domain.as_str())
            .collect();
        ServiceHashes {
            host: hash_value(&self.host(i)),
            own: hash_value(&own),
            auth: hash_value(&own["auth"]),
            health: hash_value(&json!({
                "startup": h.startup.iter().map(config_out::check).collect::<Vec<_>>(),
                "liveness": h.liveness.iter().map(config_out::check).collect::<Vec<_>>(),
                "readiness": h.readiness.iter().map(config_out::check).collect::<Vec<_>>(),
                "timing": [h.timing.interval_ms, h.timing.timeout_ms, h.timing.retries, h.timing.start_period_ms],
            })),
            db,
            routes,
            records,
            outpost: (!authz.is_empty()).then(|| hash_value(&json!(authz))),
        }
    }

    /// The parts every `nix:*` step of a service has: the project's base, its own
    /// configuration, the providers' facts and the flake inputs it builds from.
    fn nix_parts(&self, s: &Service, hashed: &ServiceHashes) -> Parts {
        let mut parts = Parts::new();
        parts.add_hash("base", &self.base_hash);
        parts.add_hash("self", &hashed.own);
        parts.add_hash("providers", &self.facts_hash);
        self.add_inputs(&mut parts, s);
        parts
    }

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

/// Plans a deployment: the steps of every phase in the seed contract's order, then each
/// compared with what was recorded of its last run.
pub fn plan(p: &Project, sel: &Selection, input: &PlanInput) -> Plan {
    let ctx = Ctx::new(p, input);
    let chosen = select(p, sel);
    let (core, apps): (Vec<usize>, Vec<usize>) =
        chosen.iter().partition(|&&i| p.services[i].is_core());
    let core = topo(p, &core);
    let apps = topo(p, &apps);

    // The costly, independent parts of every service's steps (building a value and hashing
    // it), computed on several threads before the steps are put together in order.
    let all: Vec<usize> = (0..p.services.len()).collect();
    let hashed: Vec<ServiceHashes> = crate::par::map(&all, |&i| ctx.service_hashes(i));

    let mut steps: Vec<Step> = Vec::new();
    let infra = push(&mut steps, infra_step(&ctx, &hashed), Vec::new());
    let core_step = push_core_steps(&mut steps, &ctx, &hashed, &core, infra);
    // Behind every core deploy, which are behind `tf:infra`; with no core service, behind
    // `tf:infra` itself, so no service is deployed (or snapshotted) before its container
    // exists (found by issue 14's tests).
    let auth_after: Vec<usize> = if core_step.is_empty() {
        vec![infra]
    } else {
        core_step.values().copied().collect()
    };
    let auth_core = push(&mut steps, auth_core_step(&ctx, &hashed), auth_after);
    let core_auth_step =
        push_core_auth_steps(&mut steps, &ctx, &hashed, &core, &core_step, auth_core);
    push_app_steps(&mut steps, &ctx, &hashed, &apps, &core_auth_step, auth_core);

    compare_with_record(&mut steps, input.record);
    if sel.services.is_empty() {
        if let Some(r) = input.record {
            steps.extend(orphan_steps(p, r));
        }
    }
    let critical_path = critical_path(
        &steps
            .iter()
            .map(|s| (s.weight, s.after.clone()))
            .collect::<Vec<_>>(),
    );
    let selection = (!sel.services.is_empty()).then(|| {
        chosen
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

/// A step of `phase` (for `service`, or the project's global step) whose input is `parts`;
/// its prerequisites are set when it is pushed, its change when it is compared with the record.
fn new_step(
    phase: Phase,
    service: Option<&Service>,
    action: Action,
    description: String,
    parts: Parts,
) -> Step {
    Step {
        id: StepId::new(phase, service.map(|s| &s.name))
            .expect("the planner gives a service to exactly the per-service phases"),
        after: Vec::new(),
        action,
        change: Change::Create,
        description,
        reasons: Vec::new(),
        hash: parts.hash(),
        parts: parts.0,
        weight: 0,
        needs_allow_destroy: Vec::new(),
        held: None,
    }
}

/// Appends `step` behind `after` (direct prerequisites, in any order); returns its index.
fn push(steps: &mut Vec<Step>, mut step: Step, mut after: Vec<usize>) -> usize {
    after.sort_unstable();
    after.dedup();
    step.after = after;
    steps.push(step);
    steps.len() - 1
}

/// `tf:infra`: every host of the project, whatever the selection (one Terraform workspace).
fn infra_step(ctx: &Ctx, hashed: &[ServiceHashes]) -> Step {
    let p = ctx.p;
    let mut parts = Parts::new();
    parts.add("project", &json!({"base": ctx.base(), "backend": p.infra.as_str(), "bridge": p.network.bridge, "vlan": p.network.vlan, "proxmox": [p.proxmox.endpoint, p.proxmox.node, p.proxmox.storage, p.proxmox.template]}));
    for (s, h) in p.services.iter().zip(hashed) {
        parts.add_hash(format!("host:{}", s.name), &h.host);
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
    new_step(Phase::TfInfra, None, action, description, parts)
}

/// `nix:core:<svc>`, ordered among themselves; the first wait on `tf:infra` directly, the
/// rest through them. Returns the step of each core service.
fn push_core_steps(
    steps: &mut Vec<Step>,
    ctx: &Ctx,
    hashed: &[ServiceHashes],
    core: &[usize],
    infra: usize,
) -> BTreeMap<usize, usize> {
    let p = ctx.p;
    let mut core_step: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in core {
        let mut after: Vec<usize> = p
            .deps_of(i)
            .filter(|e| orders(p, e))
            .filter_map(|e| core_step.get(&e.to).copied())
            .collect();
        if after.is_empty() {
            after.push(infra);
        }
        let k = push(steps, core_step_of(ctx, hashed, i), after);
        core_step.insert(i, k);
    }
    core_step
}

/// The `nix:core` step of core service `i`: its own configuration, and what it provides to
/// every consumer (their databases, routes, records).
fn core_step_of(ctx: &Ctx, hashed: &[ServiceHashes], i: usize) -> Step {
    let p = ctx.p;
    let s = &p.services[i];
    let mut parts = ctx.nix_parts(s, &hashed[i]);
    // A moved container is deployed and health-checked again on its new node.
    parts.add("node", &json!(s.host.node));
    ctx.add_implementations(&mut parts, core_uses(s));
    let mut what: Vec<String> = Vec::new();
    for cap in s.provides.iter().map(|x| x.capability) {
        let mut consumers = 0usize;
        for (j, (c, h)) in p.services.iter().zip(hashed).enumerate() {
            // The hashes of each consumer's part were computed with the service's others.
            let (kind, part) = match cap {
                Capability::Database if j != i => ("db", h.db.as_ref()),
                Capability::ReverseProxy if j != i => ("routes", h.routes.as_ref()),
                Capability::Dns => ("records", h.records.as_ref()),
                _ => continue,
            };
            if let Some(hash) = part {
                consumers += 1;
                parts.add_hash(format!("{kind}:{}", c.name), hash);
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
    let description = format!(
        "deploy {} ({}): {}",
        s.host.hostname,
        s.host.ip,
        what.join(", ")
    );
    new_step(Phase::NixCore, Some(s), Action::Run, description, parts)
}

/// `tf:auth-core`: the identity provider's flows, the core services' OIDC applications and the
/// outpost of every forward-auth service.
fn auth_core_step(ctx: &Ctx, hashed: &[ServiceHashes]) -> Step {
    let p = ctx.p;
    let mut parts = Parts::new();
    parts.add_hash("identity", &ctx.facts_hash);
    ctx.add_implementations(&mut parts, [Capability::Identity]);
    let mut oidc_core = 0;
    let mut forward = 0;
    for (s, hashed) in p.services.iter().zip(hashed) {
        if s.is_core() && s.auth.is_some() {
            oidc_core += 1;
            parts.add_hash(format!("oidc:{}", s.name), &hashed.auth);
        }
        if let Some(outpost) = &hashed.outpost {
            forward += 1;
            parts.add_hash(format!("outpost:{}", s.name), outpost);
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
    new_step(Phase::TfAuthCore, None, action, description, parts)
}

/// `nix:core-auth:<svc>`: core services that use auth get their client secret. Returns the
/// step of each.
fn push_core_auth_steps(
    steps: &mut Vec<Step>,
    ctx: &Ctx,
    hashed: &[ServiceHashes],
    core: &[usize],
    core_step: &BTreeMap<usize, usize>,
    auth_core: usize,
) -> BTreeMap<usize, usize> {
    let mut core_auth_step: BTreeMap<usize, usize> = BTreeMap::new();
    for &i in core {
        let s = &ctx.p.services[i];
        if s.auth.is_none() {
            continue;
        }
        let mut parts = ctx.nix_parts(s, &hashed[i]);
        // A moved container is deployed and health-checked again on its new node.
        parts.add("node", &json!(s.host.node));
        ctx.add_implementations(&mut parts, core_uses(s));
        let description = format!("redeploy {} with its OIDC client secret", s.host.hostname);
        let step = new_step(Phase::NixCoreAuth, Some(s), Action::Run, description, parts);
        let k = push(steps, step, vec![auth_core, core_step[&i]]);
        core_auth_step.insert(i, k);
    }
    core_auth_step
}

/// Per non-core service, in dependency order: `tf:service-infra` → `nix:service-config` →
/// `tf:service-config` → `verify`. The steps are built on several threads (they depend on
/// nothing but the service), then put in order.
fn push_app_steps(
    steps: &mut Vec<Step>,
    ctx: &Ctx,
    hashed: &[ServiceHashes],
    apps: &[usize],
    core_auth_step: &BTreeMap<usize, usize>,
    auth_core: usize,
) {
    let p = ctx.p;
    let built: Vec<[Step; 4]> = crate::par::map(apps, |&i| app_steps(ctx, &hashed[i], i));
    let mut verify_step: BTreeMap<usize, usize> = BTreeMap::new();
    for (&i, [infra, nix, config, verify]) in apps.iter().zip(built) {
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
        let a = push(steps, infra, after);
        let b = push(steps, nix, vec![a]);
        let c = push(steps, config, vec![b]);
        let d = push(steps, verify, vec![c]);
        verify_step.insert(i, d);
    }
}

/// The four steps of non-core service `i`, without their prerequisites.
fn app_steps(ctx: &Ctx, hashed: &ServiceHashes, i: usize) -> [Step; 4] {
    let s = &ctx.p.services[i];
    [
        service_infra_step(ctx, hashed, s),
        new_step(
            Phase::NixServiceConfig,
            Some(s),
            Action::Run,
            format!("deploy {} ({})", s.host.hostname, s.host.ip),
            {
                let mut parts = ctx.nix_parts(s, hashed);
                ctx.add_implementations(&mut parts, uses(s));
                parts
            },
        ),
        service_config_step(ctx, s),
        verify_step(ctx, hashed, s),
    ]
}

/// `tf:service-infra`: the service's OIDC application, Terraform-managed databases and its own
/// service-infra modules. Forward-auth providers live in `tf:auth-core`, next to the outpost
/// that serves them.
fn service_infra_step(ctx: &Ctx, hashed: &ServiceHashes, s: &Service) -> Step {
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
    let mut parts = Parts::new();
    parts.add("terraform", &tf_json(ctx, &infra_tf));
    parts.add_hash("auth", &hashed.auth);
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
    new_step(Phase::TfServiceInfra, Some(s), action, description, parts)
}

/// `tf:service-config`: the service's modules that need it running.
fn service_config_step(ctx: &Ctx, s: &Service) -> Step {
    let config_tf: Vec<_> = s
        .terraform
        .iter()
        .filter(|t| t.phase == TfPhase::ServiceConfig)
        .collect();
    let mut parts = Parts::new();
    parts.add("terraform", &tf_json(ctx, &config_tf));
    let modules: usize = config_tf.iter().map(|t| t.modules.len()).sum();
    let (action, description) = if modules == 0 {
        (Action::Noop, "no service-config Terraform".to_string())
    } else {
        (
            Action::Run,
            format!("apply {modules} module(s) that need the running service"),
        )
    };
    new_step(Phase::TfServiceConfig, Some(s), action, description, parts)
}

/// `verify`: the service's health checks and its end-to-end wiring.
fn verify_step(ctx: &Ctx, hashed: &ServiceHashes, s: &Service) -> Step {
    let mut parts = Parts::new();
    let h = &s.health;
    parts.add_hash("health", &hashed.health);
    parts.add_hash("wiring", &hashed.own);
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
    if s.auth.as_ref().and_then(|a| a.oidc.as_ref()).is_some() {
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
    new_step(Phase::Verify, Some(s), action, description, parts)
}

/// Compares every step with its record: its change and why, its weight for the critical path,
/// and whether a refusal or a rolled-back failure still holds it. On several threads: each
/// step is independent of the others.
fn compare_with_record(steps: &mut [Step], record: Option<&Record>) {
    crate::par::map_mut(steps, |step| {
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
    });
}

/// Orphans: recorded steps of services no longer in the project.
fn orphan_steps(p: &Project, r: &Record) -> Vec<Step> {
    let mut out = Vec::new();
    for (id, _) in r.steps.iter() {
        let Ok(id) = id.parse::<StepId>() else {
            continue;
        };
        let Some(svc) = id.service() else {
            continue;
        };
        if p.service(svc).is_none() {
            let description = format!("`{svc}` was removed from the project; `nixmox down {svc}` or `up --remove-orphans` removes what it left");
            out.push(Step {
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
    out
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
