//! The Terraform side: one workspace directory per Terraform step, in JSON configuration
//! syntax (`main.tf.json`). Argument names are listed, with the provider documentation they
//! come from, in docs/generated-options.md. The infrastructure's workspace and a service's own
//! modules are rendered here; what a provider implementation adds to a workspace (the identity
//! provider's applications, a database's roles) comes from it (`Provider::terraform`).

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::{base_name, safe_name, Copy, Outputs, Rendered, HEADER};
use crate::model::{Capability, DbMode, InfraBackend, Project, Protect, Service, TfPhase};
use crate::plan::{startup_order, Phase};
use crate::providers::{Provider, TfBlocks, TfWorkspace};
use crate::step_id::StepId;
use crate::RenderedFile;

/// Each provider is pinned to the releases the renderer was written and checked for (the
/// contracts in `tests/contracts/terraform/` were read at the newest tag of each range): a
/// newer minor release may change a schema (bpg/proxmox requires a non-empty
/// `initialization.dns.servers` from v0.86). docs/generated-options.md, "Pinned providers".
/// The implementations' providers are pinned next to them (`providers::authentik`,
/// `providers::postgresql`).
pub const PROXMOX_PROVIDER: (&str, &str) = ("bpg/proxmox", "~> 0.82.0");

/// The resource types of the infrastructure that hold data: a container's disk. With the
/// implementations' (`Provider::protected_types`: a database and the role that owns it), a
/// saved plan that deletes or replaces one is applied only with `up --allow-destroy`
/// (docs/engine.md, "Destroy guard").
pub const PROTECTED_TYPES: &[&str] = &["proxmox_virtual_environment_container"];

/// What a Terraform step's saved plan may not delete or replace without `--allow-destroy`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// Protected wherever they are in the workspace: [`PROTECTED_TYPES`], the implementations'
    /// and the types a manifest lists.
    pub types: BTreeSet<String>,
    /// Full addresses of the workspace (`module.keep_0_0.null_resource.keep`); one without an
    /// instance key covers every instance.
    pub addresses: Vec<String>,
}

impl Protection {
    /// Whether the resource at `address` (as Terraform's plan names it), of type `rtype`, is
    /// protected.
    pub fn covers(&self, address: &str, rtype: &str) -> bool {
        self.types.contains(rtype)
            || self.addresses.iter().any(|a| {
                address
                    .strip_prefix(a.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('['))
            })
    }
}

/// The protection of one Terraform workspace: `None` for the project-wide ones (`tf:infra`,
/// `tf:auth-core`), else the service and phase. Addresses of `interface.terraform.protect` are
/// prefixed with the module they belong to, as the workspace names it.
pub fn protection(service: Option<(&Service, TfPhase)>) -> Protection {
    let mut out = Protection {
        types: PROTECTED_TYPES
            .iter()
            .copied()
            .chain(crate::providers::protected_types())
            .map(str::to_string)
            .collect(),
        addresses: Vec::new(),
    };
    if let Some((s, phase)) = service {
        for (k, t) in s.terraform.iter().filter(|t| t.phase == phase).enumerate() {
            let modules: Vec<String> = (0..t.modules.len())
                .map(|j| module_name(&t.modules[j], k, j))
                .collect();
            for p in &t.protect {
                match p {
                    Protect::Type(ty) => {
                        out.types.insert(ty.clone());
                    }
                    Protect::Address(a) => {
                        for m in &modules {
                            out.addresses.push(format!("module.{m}.{a}"));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The name a service's module gets in its workspace (`module.<name>`): the `j`th module of
/// the `k`th `interface.terraform` entry of the phase.
fn module_name(path: &str, k: usize, j: usize) -> String {
    tf_name(&format!(
        "{}_{k}_{j}",
        safe_name(base_name(path)).trim_end_matches(".tf")
    ))
}

/// What a container takes only when it is created: the SSH keys (NixOS manages
/// `authorized_keys` afterwards) and the template (NixOS manages the system). With bpg/proxmox
/// both force a replacement, so later edits are ignored rather than destroying the container.
pub const CONTAINER_CREATE_ONLY: &[&str] = &["initialization[0].user_account", "operating_system"];

/// The workspace variable that carries a `mode: terraform` role's password. The runner sets it
/// as `TF_VAR_<name>` from the secrets file (`db/<role>`), never on a command line or in a file.
pub fn db_password_variable(role: &str) -> String {
    format!("{}_password", tf_name(role))
}

/// A literal string for Terraform: `${` and `%{` would start an interpolation or a template
/// directive, so they are doubled.
pub fn lit(s: &str) -> Value {
    Value::String(escape(s))
}

/// The one escaping function for text in Terraform's JSON syntax, where every string and every
/// object key of an expression is read as a template.
pub fn escape(s: &str) -> String {
    s.replace("${", "$${").replace("%{", "%%{")
}

/// A user's value, escaped throughout: strings and object keys alike.
pub fn escape_value(v: &serde_json::Value) -> Value {
    match v {
        Value::String(s) => lit(s),
        Value::Array(a) => Value::Array(a.iter().map(escape_value).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (escape(k), escape_value(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Rebuilds objects with their keys sorted, so output does not depend on insertion order.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// The workspace's name, as the seed contract names them: `infra`, `auth-core`,
/// `<service>-infra`, `<service>-config`.
pub fn workspace_name(path: &str) -> String {
    let dir = path
        .trim_end_matches("/main.tf.json")
        .trim_start_matches("terraform/");
    match dir.strip_prefix("services/") {
        Some(rest) => rest.replace('/', "-"),
        None => dir.to_string(),
    }
}

fn with_workspace(v: &Value, name: &str) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("{workspace}", name)),
        Value::Array(a) => Value::Array(a.iter().map(|x| with_workspace(x, name)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), with_workspace(x, name)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn tf_file(p: &Project, path: String, mut body: Map<String, Value>) -> RenderedFile {
    if let Some(backend) = &p.terraform.backend {
        let name = workspace_name(&path);
        let config: Map<String, Value> = backend
            .config
            .iter()
            .map(|(k, v)| (escape(k), escape_value(&with_workspace(v, &name))))
            .collect();
        let tf = body.entry("terraform").or_insert_with(|| json!({}));
        if let Some(t) = tf.as_object_mut() {
            t.insert("backend".into(), json!({ backend.kind.clone(): config }));
        }
    }
    body.insert("//".into(), json!(HEADER));
    let mut text =
        serde_json::to_string_pretty(&sorted(Value::Object(body))).expect("JSON values serialize");
    text.push('\n');
    RenderedFile {
        path,
        contents: text,
    }
}

/// The `main.tf.json` of a Terraform step's workspace, in the directory its [`StepId`] names.
fn main_file(phase: Phase, service: Option<&crate::ids::ServiceName>) -> String {
    let id = StepId::new(phase, service).expect("the renderer names each workspace's service");
    let dir = id
        .terraform_config_dir()
        .expect("a Terraform phase has a configuration directory");
    format!("{dir}/main.tf.json")
}

/// A Terraform resource or data-source name: letters, digits, `_` and `-`, not starting with a
/// digit.
pub fn tf_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

pub fn render(p: &Project, outputs: &Outputs, out: &mut Rendered) {
    if p.infra == InfraBackend::Terraform {
        out.files.push(infra(p));
    }
    if let Some(identity) = p.implementation(Capability::Identity) {
        out.files.extend(auth_core(p, identity));
    }
    for s in p.services.iter().filter(|s| !s.is_core()) {
        for phase in [TfPhase::ServiceInfra, TfPhase::ServiceConfig] {
            if let Some(f) = service(p, s, phase, outputs, out) {
                out.files.push(f);
            }
        }
    }
}

/// Whether a service's phase has any Terraform (the planner marks the step `noop` otherwise).
pub fn has_service_terraform(s: &Service, phase: TfPhase) -> bool {
    s.terraform
        .iter()
        .any(|t| t.phase == phase && !t.modules.is_empty())
        || (phase == TfPhase::ServiceInfra
            && (s.auth.as_ref().is_some_and(|a| a.oidc.is_some())
                || s.dbs.iter().any(|d| d.mode == DbMode::Terraform)))
}

fn required(providers: &[(&str, (&str, &str))]) -> Value {
    let mut m = Map::new();
    for (name, (source, version)) in providers {
        m.insert(
            (*name).into(),
            json!({"source": source, "version": version}),
        );
    }
    json!({"required_providers": m})
}

fn infra(p: &Project) -> RenderedFile {
    let startup = startup_order(p);
    let mut containers = Map::new();
    for (i, s) in p.services.iter().enumerate() {
        let h = &s.host;
        let role = if s.is_core() { "core" } else { "service" };
        // Proxmox stores tags lowercase and sorted; anything else shows as a permanent diff.
        let mut tags = vec!["nixmox", p.name.as_str(), role];
        tags.sort_unstable();
        tags.dedup();
        let mut net = json!({"name": "eth0", "bridge": lit(&p.network.bridge)});
        if let Some(vlan) = p.network.vlan {
            net["vlan_id"] = json!(vlan);
        }
        let description = match &s.description {
            Some(d) => format!("{d}\nManaged by nixmox (project {}); do not edit.", p.name),
            None => format!("Managed by nixmox (project {}); do not edit.", p.name),
        };
        containers.insert(
            tf_name(s.name.as_str()),
            json!({
                "node_name": lit(&h.node),
                "vm_id": h.vmid.get(),
                "description": lit(&description),
                "tags": tags,
                "unprivileged": h.unprivileged,
                "started": h.start,
                "start_on_boot": h.onboot,
                "startup": {"order": startup[i]},
                "operating_system": {"template_file_id": lit(&h.template), "type": "nixos"},
                "initialization": {
                    "hostname": h.hostname.as_str(),
                    "ip_config": {"ipv4": {"address": format!("{}/{}", h.ip, p.network.cidr.prefix()), "gateway": p.network.gateway.to_string()}},
                    "dns": dns(p),
                    "user_account": {"keys": p.ssh.authorized_keys.iter().map(|k| lit(k)).collect::<Vec<_>>()},
                },
                "network_interface": net,
                "disk": {"datastore_id": lit(&h.storage), "size": h.resources.disk_gb},
                "cpu": {"cores": h.resources.cores},
                "memory": {"dedicated": h.resources.memory, "swap": h.resources.swap},
                "features": {"nesting": h.nesting},
                "lifecycle": {"ignore_changes": CONTAINER_CREATE_ONLY},
            }),
        );
    }
    let mut outputs = Map::new();
    for s in &p.services {
        outputs.insert(
            format!("{}_vmid", tf_name(s.name.as_str())),
            json!({"value": format!("${{proxmox_virtual_environment_container.{}.vm_id}}", tf_name(s.name.as_str()))}),
        );
    }
    let mut provider = Map::new();
    if let Some(e) = &p.proxmox.endpoint {
        provider.insert("endpoint".into(), lit(e));
    }
    provider.insert("insecure".into(), json!(p.proxmox.tls.insecure));
    let mut body = Map::new();
    body.insert(
        "terraform".into(),
        required(&[("proxmox", PROXMOX_PROVIDER)]),
    );
    // The API token comes from PROXMOX_VE_API_TOKEN in the environment, never from a file.
    body.insert("provider".into(), json!({"proxmox": provider}));
    body.insert(
        "resource".into(),
        json!({"proxmox_virtual_environment_container": containers}),
    );
    body.insert("output".into(), Value::Object(outputs));
    tf_file(p, main_file(Phase::TfInfra, None), body)
}

/// The container's DNS settings. An empty `servers` list is left out: bpg/proxmox requires at
/// least one item when the argument is given (issue 12).
fn dns(p: &Project) -> Value {
    let servers = crate::config_out::effective_nameservers(p);
    let mut dns = json!({"domain": p.domain.as_str()});
    if !servers.is_empty() {
        dns["servers"] = json!(servers);
    }
    dns
}

/// A workspace's `main.tf.json` body from its blocks: each one present only when it has
/// something.
fn body_of(blocks: TfBlocks) -> Map<String, Value> {
    let mut body = Map::new();
    if !blocks.required.is_empty() {
        body.insert("terraform".into(), required(&blocks.required));
    }
    for (key, block) in [
        ("provider", blocks.provider),
        ("variable", blocks.variable),
        ("data", blocks.data),
        ("resource", blocks.resource),
        ("output", blocks.output),
    ] {
        if !block.is_empty() {
            body.insert(key.into(), Value::Object(block));
        }
    }
    body
}

/// `tf:auth-core`: what the identity implementation puts in its project-wide workspace.
fn auth_core(p: &Project, identity: &dyn Provider) -> Option<RenderedFile> {
    let blocks = identity.terraform(p, TfWorkspace::AuthCore)?;
    Some(tf_file(
        p,
        main_file(Phase::TfAuthCore, None),
        body_of(blocks),
    ))
}

fn service(
    p: &Project,
    s: &Service,
    phase: TfPhase,
    recorded: &Outputs,
    out: &mut Rendered,
) -> Option<RenderedFile> {
    if !has_service_terraform(s, phase) {
        return None;
    }
    let mut blocks = TfBlocks::default();
    let step_phase = match phase {
        TfPhase::ServiceInfra => {
            // What the implementations the service uses make for it (its OAuth2 application,
            // its `mode: terraform` databases).
            for imp in Capability::ALL.iter().filter_map(|&c| p.implementation(c)) {
                if let Some(b) = imp.terraform(p, TfWorkspace::ServiceInfra(s)) {
                    blocks.merge(b);
                }
            }
            Phase::TfServiceInfra
        }
        TfPhase::ServiceConfig => Phase::TfServiceConfig,
    };
    let modules = service_modules(s, phase, &mut blocks.output, out);
    let mut body = body_of(blocks);
    if !modules.is_empty() {
        body.insert("module".into(), Value::Object(modules));
    }
    if phase == TfPhase::ServiceConfig {
        if let Some(locals) = recorded_locals(s, recorded) {
            body.insert("locals".into(), Value::Object(locals));
        }
    }
    Some(tf_file(p, main_file(step_phase, Some(&s.name)), body))
}

/// The service's own modules of a phase, copied next to the workspace, each with an output
/// holding all of its own.
fn service_modules(
    s: &Service,
    phase: TfPhase,
    outputs: &mut Map<String, Value>,
    out: &mut Rendered,
) -> Map<String, Value> {
    let mut modules = Map::new();
    for (k, t) in s.terraform.iter().filter(|t| t.phase == phase).enumerate() {
        for (j, m) in t.modules.iter().enumerate() {
            let name = module_name(m, k, j);
            let to = format!("terraform/services/{}/modules/{name}", s.name);
            out.copies.push(Copy {
                from: m.clone(),
                to,
            });
            let mut block = Map::new();
            block.insert("source".into(), json!(format!("../modules/{name}")));
            for (var, value) in &t.variables {
                block.insert(var.clone(), escape_value(value));
            }
            modules.insert(name.clone(), Value::Object(block));
            outputs.insert(
                name.clone(),
                json!({"value": format!("${{module.{name}}}"), "sensitive": true}),
            );
        }
    }
    modules
}

/// Facts the service's `tf:service-infra` recorded (ids, client ids), as `locals` of its
/// `tf:service-config`; `None` when there are none.
fn recorded_locals(s: &Service, recorded: &Outputs) -> Option<Map<String, Value>> {
    let step = StepId::of_service(Phase::TfServiceInfra, &s.name)
        .expect("tf:service-infra is a per-service phase");
    let locals: Map<String, Value> = recorded
        .get(step.as_str())?
        .iter()
        .map(|(k, v)| (tf_name(k), escape_value(v)))
        .collect();
    (!locals.is_empty()).then_some(locals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protect_entries_parse_and_protection_covers_instances() {
        assert_eq!(
            Protect::parse("null_resource"),
            Ok(Protect::Type("null_resource".into()))
        );
        for ok in [
            "null_resource.keep",
            "null_resource.keep[0]",
            "null_resource.keep[\"a\"]",
            "module.inner.null_resource.keep",
        ] {
            assert_eq!(Protect::parse(ok), Ok(Protect::Address(ok.into())), "{ok}");
        }
        for bad in [
            "",
            "data.x.y",
            "bad type",
            "a.b.c",
            "x.y[",
            "x.y[\"a.b\"]",
            "mod-x",
        ] {
            assert!(Protect::parse(bad).is_err(), "{bad}");
        }
        let p = Protection {
            types: BTreeSet::from(["postgresql_database".to_string()]),
            addresses: vec!["module.keep_0_0.null_resource.keep".into()],
        };
        assert!(p.covers("module.keep_0_0.null_resource.keep", "null_resource"));
        assert!(p.covers("module.keep_0_0.null_resource.keep[1]", "null_resource"));
        assert!(!p.covers("module.keep_0_0.null_resource.keeper", "null_resource"));
        assert!(!p.covers("module.other_0_1.null_resource.keep", "null_resource"));
        assert!(p.covers("postgresql_database.wiki", "postgresql_database"));
    }
}
