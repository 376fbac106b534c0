//! Reads one service manifest (`services/<name>/manifest.yaml`) into a [`ServiceSpec`]: the
//! service as written, with positions kept for the project-wide checks in `validate`.
//!
//! Both the canonical `interface:` form and the vision document's `requirements:` form are read
//! here and normalised to the same types.

use core::net::Ipv4Addr;
use std::collections::BTreeMap;

use crate::config::{choice, domain, ip, resources, timing, HEALTH_TIMING_FIELDS};
use crate::decode::{field, index, join, Cx};
use crate::ids::{Hostname, ServiceName, UnixName, VmId};
use crate::model::{
    Auth, Capability, Check, ClientType, Db, DbMode, HealthTiming, Oidc, Protect, Provided, Proxy,
    Resources, SecretAccess, TerraformUse, TfPhase, Upstream,
};
use crate::syntax::{Entry, Kind, Node, Span};

pub const MANIFEST_FIELDS: &[&str] = &[
    "name",
    "description",
    "depends_on",
    "provides",
    "host",
    "nixos",
    "interface",
    "requirements",
];
pub const PROVIDES_FIELDS: &[&str] = &["dns", "database", "reverse_proxy", "identity"];
pub const PROVIDE_FIELDS: &[&str] = &["type"];
pub const HOST_FIELDS: &[&str] = &[
    "hostname",
    "ip",
    "vmid",
    "node",
    "spread",
    "resources",
    "onboot",
    "start",
    "unprivileged",
    "features",
    "ssh_host_key",
    "backup",
];
pub const HOST_BACKUP_FIELDS: &[&str] = &["storage", "mode", "schedule", "keep"];
pub const FEATURES_FIELDS: &[&str] = &["nesting"];
pub const NIXOS_FIELDS: &[&str] = &["modules"];
pub const INTERFACE_FIELDS: &[&str] = &["db", "proxy", "auth", "health", "terraform"];
pub const DB_FIELDS: &[&str] = &[
    "type",
    "database",
    "role",
    "mode",
    "migrations",
    "share_role_with",
    "sops",
];
/// `interface.db.sops` and `interface.auth.oidc.sops`: how sops-nix installs the secret file.
pub const SOPS_ACCESS_FIELDS: &[&str] = &["owner", "group", "mode"];
pub const PROXY_FIELDS: &[&str] = &["domain", "path", "upstream", "tls", "authz", "headers"];
pub const AUTH_FIELDS: &[&str] = &["provider", "name", "oidc"];
pub const OIDC_FIELDS: &[&str] = &[
    "client_id",
    "client_type",
    "redirect_uris",
    "scopes",
    "username_claim",
    "groups_claim",
    "sops",
];
pub const HEALTH_FIELDS: &[&str] = &[
    "startup",
    "liveness",
    "readiness",
    "interval",
    "timeout",
    "retries",
    "start_period",
];
pub const CHECK_FIELDS: &[&str] = &["command", "http", "status", "body", "tcp", "dns", "expect"];
pub const TERRAFORM_USE_FIELDS: &[&str] = &[
    "phase",
    "modules",
    "variables",
    "targets",
    "apply_order",
    "protect",
];
pub const REQUIREMENTS_FIELDS: &[&str] = &["database", "reverse_proxy", "oidc"];
pub const REQ_DATABASE_FIELDS: &[&str] = &["type", "name", "user", "host"];
pub const REQ_PROXY_FIELDS: &[&str] = &["type", "domain", "backend", "auth"];
pub const REQ_OIDC_FIELDS: &[&str] = &["type", "provider_name", "client_id", "redirect_uri"];

/// A value with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Sp<T> {
    pub value: T,
    pub span: Span,
}

/// A manifest as written, before project-wide checks and allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceSpec {
    /// Index of the manifest's file in the loader's file list.
    pub file: usize,
    pub manifest: String,
    pub dir: String,
    pub root_span: Span,
    pub name: Sp<ServiceName>,
    pub description: Option<String>,
    pub depends_on: Vec<Sp<String>>,
    pub provides: Vec<Sp<Provided>>,
    pub hostname: Option<Sp<Hostname>>,
    pub ip: Option<Sp<Ipv4Addr>>,
    pub vmid: Option<Sp<VmId>>,
    /// `host.node`: the service is pinned to this node.
    pub node: Option<Sp<String>>,
    /// `host.spread`: the anti-affinity group.
    pub spread: Option<Sp<String>>,
    /// Partial resources; `None` fields take the project defaults.
    pub resources: Option<Node>,
    pub onboot: bool,
    pub start: bool,
    pub unprivileged: bool,
    pub nesting: bool,
    pub ssh_host_key: Option<String>,
    pub backup: Option<crate::model::HostBackup>,
    pub nixos_modules: Vec<Sp<String>>,
    pub dbs: Vec<Sp<Db>>,
    /// The vision form's `requirements.database.host`: a provider's FQDN.
    pub db_host: Option<Sp<String>>,
    pub proxies: Vec<Sp<Proxy>>,
    pub auth: Option<Sp<Auth>>,
    pub health: HealthSpec,
    pub terraform: Vec<Sp<TerraformUse>>,
    /// Paths the manifest references that must exist: (project-relative path, span, field,
    /// what it is used as).
    pub paths: Vec<(String, Span, String, PathUse)>,
    /// Every redirect URI with where it was written: (uri, span, field).
    pub redirects: Vec<(String, Span, String)>,
    /// Per `interface.db` entry: the role, where it is written, and the services it agrees to
    /// share that role with (`share_role_with`).
    pub role_sharing: Vec<RoleUse>,
}

/// One `interface.db` entry's role, for the project-wide "a role belongs to one service" check.
#[derive(Clone, Debug, PartialEq)]
pub struct RoleUse {
    pub role: String,
    pub span: Span,
    pub field: String,
    pub share_role_with: Vec<Sp<ServiceName>>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct HealthSpec {
    pub startup: Vec<Sp<Check>>,
    pub liveness: Vec<Sp<Check>>,
    pub readiness: Vec<Sp<Check>>,
    /// The `health` mapping itself, for timing fields that take project defaults.
    pub timing_node: Option<Node>,
}

impl HealthSpec {
    pub fn timing(&self, cx: &mut Cx, base: HealthTiming) -> HealthTiming {
        match &self.timing_node {
            Some(n) => timing(cx, n, "interface.health", base).unwrap_or(base),
            None => base,
        }
    }
}

/// Decodes one manifest. `dir` is the manifest's directory relative to the project root.
pub fn decode(
    cx: &mut Cx,
    root: &Node,
    file: usize,
    manifest: &str,
    dir: &str,
) -> Option<ServiceSpec> {
    cx.map(root, "", MANIFEST_FIELDS)?;
    let name = decode_name(cx, root);
    let description = field(root, "description").and_then(|n| cx.string(n, "description"));
    let depends_on = decode_depends_on(cx, root);
    let provides = decode_provides(cx, root);
    let mut spec = ServiceSpec {
        file,
        manifest: manifest.to_string(),
        dir: dir.to_string(),
        root_span: root.span,
        name: name.clone().unwrap_or(Sp {
            value: ServiceName::new("invalid").expect("literal is a valid name"),
            span: root.span,
        }),
        description,
        depends_on,
        provides,
        ..ServiceSpec::empty()
    };
    if let Some(h) = field(root, "host") {
        decode_host(cx, h, &mut spec);
    }
    if let Some(n) = field(root, "nixos") {
        if cx.map(n, "nixos", NIXOS_FIELDS).is_some() {
            decode_nixos(cx, n, dir, &mut spec);
        }
    }
    if let Some(i) = field(root, "interface") {
        if cx.map(i, "interface", INTERFACE_FIELDS).is_some() {
            decode_interface(cx, i, &mut spec);
        }
    }
    if let Some(r) = field(root, "requirements") {
        if cx.map(r, "requirements", REQUIREMENTS_FIELDS).is_some() {
            decode_requirements(cx, r, &mut spec);
        }
    }
    name.map(|_| spec)
}

impl ServiceSpec {
    /// A spec with nothing decoded yet: every field at its default.
    fn empty() -> Self {
        ServiceSpec {
            file: 0,
            manifest: String::new(),
            dir: String::new(),
            root_span: Span::default(),
            name: Sp {
                value: ServiceName::new("invalid").expect("literal is a valid name"),
                span: Span::default(),
            },
            description: None,
            depends_on: Vec::new(),
            provides: Vec::new(),
            hostname: None,
            ip: None,
            vmid: None,
            node: None,
            spread: None,
            resources: None,
            onboot: true,
            start: true,
            unprivileged: true,
            nesting: true,
            ssh_host_key: None,
            backup: None,
            nixos_modules: Vec::new(),
            dbs: Vec::new(),
            db_host: None,
            proxies: Vec::new(),
            auth: None,
            health: HealthSpec::default(),
            terraform: Vec::new(),
            paths: Vec::new(),
            redirects: Vec::new(),
            role_sharing: Vec::new(),
        }
    }
}

/// `name`: required, and a valid service name.
fn decode_name(cx: &mut Cx, root: &Node) -> Option<Sp<ServiceName>> {
    let n = cx.required(root, "", "name")?;
    let s = cx.string(n, "name")?;
    match ServiceName::new(&s) {
        Ok(v) => Some(Sp {
            value: v,
            span: n.span,
        }),
        Err(why) => {
            cx.error(n.span, "name", format!("invalid service name `{s}`: {why}"), Some("a service name is used as its host name: lowercase letters, digits and `-`, starting with a letter, at most 63 characters".into()));
            None
        }
    }
}

/// `depends_on`: a list of service names, or Docker Compose's long form.
fn decode_depends_on(cx: &mut Cx, root: &Node) -> Vec<Sp<String>> {
    match field(root, "depends_on") {
        // Docker Compose's long form, `depends_on: { db: { condition: … } }`: the keys name the
        // services; NixMox always waits for a dependency to be verified.
        Some(Node {
            kind: Kind::Map(entries),
            ..
        }) => entries
            .iter()
            .map(|e| Sp {
                value: e.key.clone(),
                span: e.key_span,
            })
            .collect(),
        Some(n) => cx
            .strings(n, "depends_on")
            .into_iter()
            .map(|(value, span)| Sp { value, span })
            .collect(),
        None => Vec::new(),
    }
}

/// `provides`: the capabilities, each by one of the implementations registered for it
/// (`crate::providers`); no `type` means the capability's default implementation.
fn decode_provides(cx: &mut Cx, root: &Node) -> Vec<Sp<Provided>> {
    let mut provides = Vec::new();
    let Some(entries) =
        field(root, "provides").and_then(|p| cx.map(p, "provides", PROVIDES_FIELDS))
    else {
        return provides;
    };
    for e in entries {
        let Some(cap) = Capability::from_key(&e.key) else {
            continue;
        };
        let path = join("provides", &e.key);
        let default = crate::providers::default_for(cap).implementation();
        let ty = match &e.value.kind {
            Kind::Null => Some(default.to_string()),
            Kind::Str(s) => Some(s.clone()),
            _ => cx.map(&e.value, &path, PROVIDE_FIELDS).and_then(|_| {
                match field(&e.value, "type") {
                    Some(t) => cx.string(t, &join(&path, "type")),
                    None => Some(default.to_string()),
                }
            }),
        };
        let Some(t) = ty else { continue };
        match crate::providers::find(cap, &t) {
            Some(provider) => provides.push(Sp {
                value: Provided {
                    capability: cap,
                    provider,
                },
                span: e.key_span,
            }),
            None => cx.error(
                e.value.get("type").map(|n| n.span).unwrap_or(e.value.span),
                &join(&path, "type"),
                format!("`{}` cannot be provided by `{t}`", cap.key()),
                Some(format!(
                    "NixMox configures {} as its {} provider",
                    crate::providers::names(cap),
                    cap.key()
                )),
            ),
        }
    }
    provides
}

/// `nixos.modules`: paths relative to the manifest's directory.
fn decode_nixos(cx: &mut Cx, n: &Node, dir: &str, spec: &mut ServiceSpec) {
    let Some(m) = field(n, "modules") else {
        return;
    };
    for (i, (p, span)) in cx.strings(m, "nixos.modules").into_iter().enumerate() {
        let path = resolve_path(dir, &p);
        spec.paths.push((
            path.clone(),
            span,
            index("nixos.modules", i),
            PathUse::NixModule,
        ));
        spec.nixos_modules.push(Sp { value: path, span });
    }
}

/// What a referenced path is used as, which decides what it must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathUse {
    /// A NixOS module: a `.nix` file, or a directory holding `default.nix`.
    NixModule,
    /// A SQL migration: a file.
    Migration,
    /// A Terraform module: a directory.
    TerraformModule,
}

/// Joins a manifest-relative path onto the manifest's directory, resolving `.` and `..`.
pub fn resolve_path(dir: &str, p: &str) -> String {
    let mut parts: Vec<&str> = if p.starts_with('/') {
        Vec::new()
    } else {
        dir.split('/').filter(|s| !s.is_empty()).collect()
    };
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            // `..` cancels a name, never another `..`: `../../x` climbs two levels.
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ => parts.push(".."),
            },
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    if p.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod resolve_path_tests {
    use super::resolve_path;

    #[test]
    fn parent_segments_accumulate() {
        assert_eq!(resolve_path("", "../../etc"), "../../etc");
        assert_eq!(resolve_path("services/a", "../../../x"), "../x");
        assert_eq!(resolve_path("services/a", "./m.nix"), "services/a/m.nix");
        assert_eq!(resolve_path("services/a", "../b/m.nix"), "services/b/m.nix");
        assert_eq!(resolve_path("", "/abs/../x"), "/x");
    }
}

fn decode_host(cx: &mut Cx, h: &Node, spec: &mut ServiceSpec) {
    if cx.map(h, "host", HOST_FIELDS).is_none() {
        return;
    }
    if let Some(n) = field(h, "hostname") {
        if let Some(s) = cx.string(n, "host.hostname") {
            match Hostname::new(&s) {
                Ok(v) => spec.hostname = Some(Sp { value: v, span: n.span }),
                Err(why) => cx.error(n.span, "host.hostname", format!("invalid hostname `{s}`: {why}"), Some("a hostname is one DNS label: lowercase letters, digits and `-`, at most 63 characters; the FQDN is hostname.domain".into())),
            }
        }
    }
    if let Some(n) = field(h, "ip") {
        if let Some(v) = ip(cx, n, "host.ip") {
            spec.ip = Some(Sp {
                value: v,
                span: n.span,
            });
        }
    }
    if let Some(n) = field(h, "vmid") {
        spec.vmid = decode_vmid(cx, n);
    }
    spec.node = field(h, "node").and_then(|n| {
        crate::config::checked(
            cx,
            n,
            "host.node",
            "Proxmox node name",
            crate::ids::check_node,
        )
        .map(|value| Sp {
            value,
            span: n.span,
        })
    });
    spec.spread = field(h, "spread").and_then(|n| {
        crate::config::checked(cx, n, "host.spread", "spread group", crate::ids::check_node).map(
            |value| Sp {
                value,
                span: n.span,
            },
        )
    });
    if let Some(r) = field(h, "resources") {
        // Checked now for located errors; the project defaults are applied later.
        if resources(cx, r, "host.resources", crate::config::DEFAULT_RESOURCES).is_some() {
            spec.resources = Some(r.clone());
        }
    }
    for (key, slot) in [
        ("onboot", &mut spec.onboot),
        ("start", &mut spec.start),
        ("unprivileged", &mut spec.unprivileged),
    ] {
        if let Some(n) = field(h, key) {
            if let Some(b) = cx.boolean(n, &join("host", key)) {
                *slot = b;
            }
        }
    }
    if let Some(f) = field(h, "features") {
        if cx.map(f, "host.features", FEATURES_FIELDS).is_some() {
            if let Some(n) = field(f, "nesting") {
                if let Some(b) = cx.boolean(n, "host.features.nesting") {
                    spec.nesting = b;
                }
            }
        }
    }
    if let Some(k) = field(h, "ssh_host_key") {
        if let Some(s) = cx.string(k, "host.ssh_host_key") {
            if crate::ids::check_ssh_public_key(&s, &["ssh-ed25519"]).is_ok() {
                spec.ssh_host_key = Some(s);
            } else {
                cx.error(k.span, "host.ssh_host_key", "not an SSH ed25519 public key", Some("give the host's `/etc/ssh/ssh_host_ed25519_key.pub` line: `ssh-ed25519 AAAA...`".into()));
            }
        }
    }
    if let Some(b) = field(h, "backup") {
        if cx.map(b, "host.backup", HOST_BACKUP_FIELDS).is_some() {
            spec.backup = decode_backup(cx, b);
        }
    }
}

/// `host.vmid`: an integer that is a valid Proxmox guest id.
fn decode_vmid(cx: &mut Cx, n: &Node) -> Option<Sp<VmId>> {
    let v = match &n.kind {
        Kind::Int(i) => *i,
        _ => {
            cx.error(
                n.span,
                "host.vmid",
                format!("expected an integer, found {}", n.kind.describe()),
                None,
            );
            return None;
        }
    };
    match VmId::new(v) {
        Ok(id) => Some(Sp {
            value: id,
            span: n.span,
        }),
        Err(why) => {
            cx.error(
                n.span,
                "host.vmid",
                format!("invalid vmid: {why}"),
                Some(
                    "use an id inside `pools.vmid`, or leave `vmid` out to have one allocated"
                        .into(),
                ),
            );
            None
        }
    }
}

/// `host.backup` (the caller has checked the mapping's fields): a scheduled vzdump job.
fn decode_backup(cx: &mut Cx, b: &Node) -> Option<crate::model::HostBackup> {
    let storage = cx.required(b, "host.backup", "storage").and_then(|n| {
        crate::config::checked(
            cx,
            n,
            "host.backup.storage",
            "Proxmox storage id",
            crate::ids::check_storage_id,
        )
    });
    let mode = match field(b, "mode") {
        None => Some("snapshot".to_string()),
        Some(m) => crate::config::choice(
            cx,
            m,
            "host.backup.mode",
            &[
                ("snapshot", "snapshot".to_string()),
                ("suspend", "suspend".to_string()),
                ("stop", "stop".to_string()),
            ],
        ),
    };
    let mut ok = true;
    let schedule = field(b, "schedule").and_then(|n| {
        let s = cx.string(n, "host.backup.schedule")?;
        let fine = !s.trim().is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || " :,./*~-".contains(c));
        if !fine {
            cx.error(n.span, "host.backup.schedule", format!("`{}` is not a Proxmox calendar event", crate::diag::visible(&s)), Some("like `daily`, `sun 02:30` or `*-*-* 03:00` (see `man systemd.time`; PVE's `pve-calendar-event`)".into()));
            ok = false;
        }
        fine.then_some(s)
    });
    let keep = field(b, "keep").and_then(|n| {
        let v = cx.int(n, "host.backup.keep", 1, 1000, "");
        ok &= v.is_some();
        v.map(|v| v as u32)
    });
    match (storage, mode, ok) {
        (Some(storage), Some(mode), true) => Some(crate::model::HostBackup {
            storage,
            mode,
            schedule,
            keep,
        }),
        _ => None,
    }
}

/// Resolves the resources of a spec against the project defaults.
pub fn spec_resources(cx: &mut Cx, spec: &ServiceSpec, base: Resources) -> Resources {
    match &spec.resources {
        Some(n) => resources(cx, n, "host.resources", base).unwrap_or(base),
        None => base,
    }
}

fn decode_interface(cx: &mut Cx, i: &Node, spec: &mut ServiceSpec) {
    if let Some(n) = field(i, "db") {
        for (item, path) in cx.one_or_many(n, "interface.db") {
            if let Some(db) = decode_db(cx, item, &path, spec) {
                spec.dbs.push(Sp {
                    value: db,
                    span: item.span,
                });
            }
        }
    }
    if let Some(n) = field(i, "proxy") {
        for (item, path) in cx.one_or_many(n, "interface.proxy") {
            if let Some(p) = decode_proxy(cx, item, &path) {
                spec.proxies.push(Sp {
                    value: p,
                    span: item.span,
                });
            }
        }
    }
    if let Some(n) = field(i, "auth") {
        if let Some(a) = decode_auth(
            cx,
            n,
            "interface.auth",
            &spec.name.value,
            &mut spec.redirects,
        ) {
            spec.auth = Some(Sp {
                value: a,
                span: n.span,
            });
        }
    }
    if let Some(n) = field(i, "health") {
        decode_health(cx, n, spec);
    }
    if let Some(n) = field(i, "terraform") {
        for (item, path) in cx.one_or_many(n, "interface.terraform") {
            if let Some(t) = decode_terraform(cx, item, &path, spec) {
                spec.terraform.push(Sp {
                    value: t,
                    span: item.span,
                });
            }
        }
    }
}

fn non_empty_string(cx: &mut Cx, n: &Node, path: &str) -> Option<String> {
    let s = cx.string(n, path)?;
    if s.trim().is_empty() {
        cx.error(n.span, path, format!("`{path}` must not be empty"), None);
        return None;
    }
    Some(s)
}

/// Database and role names become SQL identifiers; keep them to what needs no quoting.
fn sql_ident(cx: &mut Cx, n: &Node, path: &str) -> Option<String> {
    let s = non_empty_string(cx, n, path)?;
    let ok = s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        cx.error(n.span, path, format!("invalid PostgreSQL name `{}`", s.escape_debug()), Some("use lowercase letters, digits, `_` and `-`, starting with a letter or `_`, at most 63 characters".into()));
        return None;
    }
    if let Err(why) = pg_reserved(&s) {
        cx.error(
            n.span,
            path,
            format!("`{s}` cannot be a service's database or role: {why}"),
            Some("pick a name of the service's own, like its name".into()),
        );
        return None;
    }
    Some(s)
}

/// Names PostgreSQL gives a meaning of their own: pg_hba's keywords (a database or role named
/// so would become a wildcard there), the superuser and the bootstrap databases, and the
/// `pg_` prefix PostgreSQL reserves for its predefined roles.
pub fn pg_reserved(s: &str) -> Result<(), String> {
    match s {
        "all" | "sameuser" | "samerole" | "samegroup" | "replication" => {
            Err("it is a pg_hba.conf keyword".into())
        }
        "postgres" => Err("it is the superuser and the maintenance database".into()),
        "template0" | "template1" => Err("it is a template database".into()),
        "public" | "current_user" | "current_role" | "session_user" | "none" => {
            Err("it is a reserved role name".into())
        }
        _ if s.starts_with("pg_") => {
            Err("PostgreSQL reserves the `pg_` prefix for its predefined roles".into())
        }
        _ => Ok(()),
    }
}

/// The database name derived from the service's name, which must not be reserved either (a
/// service named `postgres` or `all`).
fn default_pg_name(cx: &mut Cx, name: &str, span: Span, path: &str) -> String {
    if let Err(why) = pg_reserved(name) {
        cx.error(span, &join(path, "database"), format!("the default database name `{name}` (from the service's name) cannot be used: {why}"), Some("give `database:` (and `role:`) explicitly".into()));
    }
    name.to_string()
}

fn decode_db(cx: &mut Cx, n: &Node, path: &str, spec: &mut ServiceSpec) -> Option<Db> {
    cx.map(n, path, DB_FIELDS)?;
    let before = cx.errors();
    if let Some(t) = field(n, "type") {
        choice(cx, t, &join(path, "type"), &[("postgresql", ())]);
    }
    let default_name = spec.name.value.as_str().replace('-', "_");
    let database = match field(n, "database") {
        Some(d) => sql_ident(cx, d, &join(path, "database")).unwrap_or_default(),
        None => default_pg_name(cx, &default_name, n.span, path),
    };
    let role = field(n, "role")
        .and_then(|d| sql_ident(cx, d, &join(path, "role")))
        .unwrap_or_else(|| database.clone());
    let mode = match field(n, "mode") {
        None => DbMode::NativeMigration,
        Some(m) => choice(
            cx,
            m,
            &join(path, "mode"),
            &[
                ("native-migration", DbMode::NativeMigration),
                ("terraform", DbMode::Terraform),
            ],
        )
        .unwrap_or(DbMode::NativeMigration),
    };
    if mode == DbMode::Terraform {
        // Issue 12, item 5: cyrilgdn/postgresql would connect from the operator's machine as
        // `postgres`, which the rendered pg_hba does not admit and which has no password. Until
        // NixMox renders an admin role and a way in for it, the mode is refused.
        if let Some(m) = field(n, "mode") {
            cx.error(
                m.span,
                &join(path, "mode"),
                "`mode: terraform` is not supported yet: the PostgreSQL provider could not reach the database host",
                Some("leave `mode` out (`native-migration`): the database host creates the database and its role and runs the migrations; see docs/secrets.md".into()),
            );
        }
    }
    let mut migrations = Vec::new();
    if let Some(m) = field(n, "migrations") {
        let mpath = join(path, "migrations");
        for (i, (p, span)) in cx.strings(m, &mpath).into_iter().enumerate() {
            let resolved = resolve_path(&spec.dir, &p);
            spec.paths
                .push((resolved.clone(), span, index(&mpath, i), PathUse::Migration));
            migrations.push(resolved);
        }
    }
    let access = decode_access(cx, field(n, "sops"), &join(path, "sops"));
    let mut share_role_with = Vec::new();
    if let Some(v) = field(n, "share_role_with") {
        let spath = join(path, "share_role_with");
        for (i, (name, span)) in cx.strings(v, &spath).into_iter().enumerate() {
            match ServiceName::new(&name) {
                Ok(s) => share_role_with.push(Sp { value: s, span }),
                Err(why) => cx.error(
                    span,
                    &index(&spath, i),
                    format!("invalid service name `{}`: {why}", name.escape_debug()),
                    None,
                ),
            }
        }
    }
    spec.role_sharing.push(RoleUse {
        role: role.clone(),
        span: field(n, "role").map(|r| r.span).unwrap_or(n.span),
        field: join(path, "role"),
        share_role_with,
    });
    (cx.errors() == before).then_some(Db {
        database,
        role,
        mode,
        migrations,
        access,
    })
}

/// `sops: { owner, group, mode }`: who may read a secret file on the service's host, as
/// sops-nix takes it. Without it the file is root's, mode 0400.
fn decode_access(cx: &mut Cx, n: Option<&Node>, path: &str) -> SecretAccess {
    let mut access = SecretAccess::default();
    let Some(n) = n else {
        return access;
    };
    if cx.map(n, path, SOPS_ACCESS_FIELDS).is_none() {
        return access;
    }
    let name = |cx: &mut Cx, key: &str, what: &str| -> Option<UnixName> {
        let v = field(n, key)?;
        let fpath = join(path, key);
        let s = cx.string(v, &fpath)?;
        match UnixName::new(&s) {
            Ok(u) => Some(u),
            Err(why) => {
                cx.error(
                    v.span,
                    &fpath,
                    format!("invalid {what} name `{}`: {why}", s.escape_debug()),
                    Some(format!(
                        "the {what} the reading service runs as on its host, like `nextcloud`"
                    )),
                );
                None
            }
        }
    };
    access.owner = name(cx, "owner", "user");
    access.group = name(cx, "group", "group");
    access.mode = match field(n, "mode") {
        None if access.group.is_some() => "0440".into(),
        None => "0400".into(),
        Some(m) => {
            let mpath = join(path, "mode");
            match &m.kind {
                Kind::Str(s) => match check_secret_mode(s) {
                    Ok(mode) => mode,
                    Err(why) => {
                        cx.error(
                            m.span,
                            &mpath,
                            format!("invalid file mode `{}`: {why}", s.escape_debug()),
                            Some("an octal mode like \"0440\" (owner and group read)".into()),
                        );
                        "0400".into()
                    }
                },
                _ => {
                    cx.error(
                        m.span,
                        &mpath,
                        "a file mode must be a quoted string",
                        Some("write it in quotes, like \"0440\": YAML reads 0440 as the decimal number 440".into()),
                    );
                    "0400".into()
                }
            }
        }
    };
    access
}

/// An octal mode for a secret file: three or four octal digits, no special bits, nothing for
/// others. Returns it as four digits.
pub fn check_secret_mode(s: &str) -> Result<String, String> {
    if !(3..=4).contains(&s.len()) || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err("it is not three or four octal digits".into());
    }
    let mode = format!("{s:0>4}");
    if !mode.starts_with('0') {
        return Err("setuid, setgid and sticky bits make no sense on a secret file".into());
    }
    if !mode.ends_with('0') {
        return Err("it lets every user on the host read the secret".into());
    }
    Ok(mode)
}

fn decode_proxy(cx: &mut Cx, n: &Node, path: &str) -> Option<Proxy> {
    cx.map(n, path, PROXY_FIELDS)?;
    let before = cx.errors();
    let dom = cx
        .required(n, path, "domain")
        .and_then(|d| domain(cx, d, &join(path, "domain")));
    let route = match field(n, "path") {
        None => Some("/".to_string()),
        Some(p) => cx.string(p, &join(path, "path")).and_then(|s| {
            if let Err(why) = check_route_path(&s) {
                cx.error(p.span, &join(path, "path"), format!("invalid route path `{}`: {why}", s.escape_debug()), Some("a route path is a URL path like /guacamole: letters, digits and `-._~!$&'()*+,;=:@%/`".into()));
                None
            } else {
                Some(s)
            }
        }),
    };
    let upstream = cx
        .required(n, path, "upstream")
        .and_then(|u| upstream(cx, u, &join(path, "upstream")));
    let tls = field(n, "tls")
        .and_then(|v| cx.boolean(v, &join(path, "tls")))
        .unwrap_or(true);
    let authz = field(n, "authz")
        .and_then(|v| cx.boolean(v, &join(path, "authz")))
        .unwrap_or(false);
    let mut headers = BTreeMap::new();
    if let Some(h) = field(n, "headers") {
        let hpath = join(path, "headers");
        if let Kind::Map(entries) = &h.kind {
            for e in entries {
                let valid = !e.key.is_empty()
                    && e.key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid {
                    cx.error(
                        e.key_span,
                        &join(&hpath, &e.key),
                        format!("invalid header name `{}`", e.key),
                        Some("header names use letters, digits, `-` and `_`".into()),
                    );
                    continue;
                }
                if let Some(v) = cx.string(&e.value, &join(&hpath, &e.key)) {
                    if let Err(why) = check_header_value(&v) {
                        cx.error(e.value.span, &join(&hpath, &e.key), format!("invalid value of header `{}`: {why}", e.key), Some("HTTP header values are one line of text; Caddy placeholders (`{...}`) are not passed through".into()));
                        continue;
                    }
                    headers.insert(e.key.clone(), v);
                }
            }
        } else {
            cx.error(
                h.span,
                &hpath,
                format!("expected a mapping, found {}", h.kind.describe()),
                Some("write headers as `{ X-Frame-Options: SAMEORIGIN }`".into()),
            );
        }
    }
    if cx.errors() != before {
        return None;
    }
    Some(Proxy {
        domain: dom?,
        path: route?,
        upstream: upstream?,
        tls,
        authz,
        headers,
    })
}

/// A route path: an absolute URL path (RFC 3986 `pchar`s and `/`). Braces are left out because
/// Caddy reads `{...}` as a placeholder (`{env.X}`, `{file./etc/hostname}`, `{$HOME}`),
/// whitespace and quotes because they end a Caddyfile token, `#`/`?` because they are not path.
pub fn check_route_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err("it must start with `/`".into());
    }
    if s.len() > 1024 {
        return Err("it is longer than 1024 characters".into());
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@%/".contains(*c)))
    {
        Some(c) => Err(format!(
            "`{}` is not allowed in a route path",
            c.escape_default()
        )),
        None => Ok(()),
    }
}

/// A header value for the Caddyfile: one line of printable text without Caddy's placeholder
/// braces (both the run-time `{env.X}` and the parse-time `{$X}` forms, which Caddy expands
/// inside quotes too) and without a backtick, the quote NixMox prints it in (Caddy takes a
/// backtick-quoted token literally: no escapes, so backslashes reach the header as written).
pub fn check_header_value(v: &str) -> Result<(), String> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(format!(
            "it contains the control character `{}`",
            c.escape_default()
        ));
    }
    if v.contains(['{', '}']) {
        return Err("`{` and `}` would be read by Caddy as a placeholder".into());
    }
    if v.contains('`') {
        return Err("a backtick is not allowed".into());
    }
    if v.len() > 4096 {
        return Err("it is longer than 4096 characters".into());
    }
    Ok(())
}

fn upstream(cx: &mut Cx, n: &Node, path: &str) -> Option<Upstream> {
    let bad_port = |cx: &mut Cx, p: &str| {
        cx.error(
            n.span,
            path,
            format!("`{p}` is not a port (1-65535)"),
            Some("write a port on this service's host (8080) or host:port".into()),
        );
    };
    match &n.kind {
        Kind::Int(p) => match u16::try_from(*p) {
            Ok(p) if p > 0 => Some(Upstream::Port(p)),
            _ => {
                bad_port(cx, &p.to_string());
                None
            }
        },
        Kind::Str(s) => {
            let s = s.strip_prefix("http://").unwrap_or(s);
            match s.rsplit_once(':') {
                Some((h, p)) => {
                    let port = p.parse::<u16>().ok().filter(|p| *p > 0);
                    let host_ok = h.parse::<Ipv4Addr>().is_ok()
                        || crate::ids::DomainName::new(h).is_ok()
                        || crate::ids::Hostname::new(h).is_ok();
                    match (port, host_ok) {
                        (Some(port), true) => Some(Upstream::HostPort(h.to_string(), port)),
                        (None, _) => {
                            bad_port(cx, p);
                            None
                        }
                        (_, false) => {
                            cx.error(n.span, path, format!("invalid upstream host `{h}`"), Some("write a port (8080) or host:port with a valid host name or IPv4 address".into()));
                            None
                        }
                    }
                }
                None => match s.parse::<i64>() {
                    Ok(p) if (1..=65535).contains(&p) => Some(Upstream::Port(p as u16)),
                    _ => {
                        bad_port(cx, s);
                        None
                    }
                },
            }
        }
        _ => {
            cx.error(
                n.span,
                path,
                format!("expected a port or host:port, found {}", n.kind.describe()),
                None,
            );
            None
        }
    }
}

fn decode_auth(
    cx: &mut Cx,
    n: &Node,
    path: &str,
    service: &ServiceName,
    redirects: &mut Vec<(String, Span, String)>,
) -> Option<Auth> {
    cx.map(n, path, AUTH_FIELDS)?;
    let before = cx.errors();
    let provider = match field(n, "provider") {
        None => "authentik".to_string(),
        Some(p) => choice(
            cx,
            p,
            &join(path, "provider"),
            &[("authentik", "authentik".to_string())],
        )?,
    };
    let display_name = field(n, "name")
        .and_then(|v| non_empty_string(cx, v, &join(path, "name")))
        .unwrap_or_else(|| service.as_str().to_string());
    let oidc =
        field(n, "oidc").and_then(|o| decode_oidc(cx, o, &join(path, "oidc"), service, redirects));
    (cx.errors() == before).then_some(Auth {
        provider,
        display_name,
        oidc,
    })
}

fn decode_oidc(
    cx: &mut Cx,
    n: &Node,
    path: &str,
    service: &ServiceName,
    redirects: &mut Vec<(String, Span, String)>,
) -> Option<Oidc> {
    cx.map(n, path, OIDC_FIELDS)?;
    let before = cx.errors();
    let client_id = field(n, "client_id")
        .and_then(|v| non_empty_string(cx, v, &join(path, "client_id")))
        .unwrap_or_else(|| service.as_str().to_string());
    let client_type = match field(n, "client_type") {
        None => ClientType::Confidential,
        Some(t) => choice(
            cx,
            t,
            &join(path, "client_type"),
            &[
                ("confidential", ClientType::Confidential),
                ("public", ClientType::Public),
            ],
        )
        .unwrap_or(ClientType::Confidential),
    };
    let mut redirect_uris = Vec::new();
    if let Some(r) = field(n, "redirect_uris") {
        let rpath = join(path, "redirect_uris");
        for (i, (u, span)) in cx.strings(r, &rpath).into_iter().enumerate() {
            check_url(cx, &u, span, &index(&rpath, i));
            redirects.push((u.clone(), span, index(&rpath, i)));
            redirect_uris.push(u);
        }
    }
    let scopes = match field(n, "scopes") {
        None => vec!["openid".into(), "email".into(), "profile".into()],
        Some(s) => {
            let spath = join(path, "scopes");
            let listed = cx.strings(s, &spath);
            // The identity provider gets a property mapping per scope; a scope that matches
            // none would be dropped without a word (issue 12).
            for (i, (scope, span)) in listed.iter().enumerate() {
                if crate::model::oidc_scope_mapping(scope).is_none() {
                    cx.warning(
                        *span,
                        &index(&spath, i),
                        format!("scope `{scope}` matches no scope mapping of the identity provider and is not granted"),
                        Some(format!(
                            "the mapped scopes are {}; other claims (such as groups) come with `profile`",
                            crate::model::OIDC_SCOPES.join(", ")
                        )),
                    );
                }
            }
            if !listed.iter().any(|(s, _)| s == "openid") && cx.errors() == before {
                cx.error(
                    s.span,
                    &spath,
                    "scopes must include `openid`",
                    Some(
                        "an OpenID Connect client without the `openid` scope gets no ID token"
                            .into(),
                    ),
                );
            }
            listed.into_iter().map(|(s, _)| s).collect()
        }
    };
    let username_claim = field(n, "username_claim")
        .and_then(|v| cx.string(v, &join(path, "username_claim")))
        .unwrap_or_else(|| "preferred_username".into());
    let groups_claim = field(n, "groups_claim")
        .and_then(|v| cx.string(v, &join(path, "groups_claim")))
        .unwrap_or_else(|| "groups".into());
    let access = decode_access(cx, field(n, "sops"), &join(path, "sops"));
    if client_type == ClientType::Public {
        if let Some(a) = field(n, "sops") {
            cx.warning(
                a.span,
                &join(path, "sops"),
                "a public client has no client secret, so `sops` has nothing to apply to",
                Some("remove it, or make the client `confidential`".into()),
            );
        }
    }
    (cx.errors() == before).then_some(Oidc {
        client_id,
        client_type,
        redirect_uris,
        scopes,
        username_claim,
        groups_claim,
        access,
    })
}

fn check_url(cx: &mut Cx, u: &str, span: Span, path: &str) -> bool {
    match crate::url::check(u) {
        Ok(_) => true,
        Err(why) => {
            cx.error(
                span,
                path,
                format!("invalid URL `{u}`: {why}"),
                Some("write a full URL, like https://app.nixmox.lan/callback".into()),
            );
            false
        }
    }
}

fn decode_health(cx: &mut Cx, n: &Node, spec: &mut ServiceSpec) {
    if cx.map(n, "interface.health", HEALTH_FIELDS).is_none() {
        return;
    }
    // Check timing fields now so their errors are located even if defaults change later.
    let _ = timing(cx, n, "interface.health", crate::config::DEFAULT_HEALTH);
    let _ = HEALTH_TIMING_FIELDS;
    spec.health.timing_node = Some(n.clone());
    for key in ["startup", "liveness", "readiness"] {
        let Some(c) = field(n, key) else { continue };
        let path = join("interface.health", key);
        let items: Vec<(&Node, String)> = match &c.kind {
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (n, index(&path, i)))
                .collect(),
            _ => vec![(c, path.clone())],
        };
        let mut checks = Vec::new();
        for (item, p) in items {
            if let Some(check) = decode_check(cx, item, &p) {
                checks.push(Sp {
                    value: check,
                    span: item.span,
                });
            }
        }
        match key {
            "startup" => spec.health.startup = checks,
            "liveness" => spec.health.liveness = checks,
            _ => spec.health.readiness = checks,
        }
    }
}

fn decode_check(cx: &mut Cx, n: &Node, path: &str) -> Option<Check> {
    match &n.kind {
        Kind::Str(s) if s.starts_with("http://") || s.starts_with("https://") => {
            check_url(cx, s, n.span, path).then(|| Check::Http {
                url: s.clone(),
                status: None,
                body: None,
            })
        }
        Kind::Str(s) => command_words(cx, s, n.span, path).map(Check::Command),
        Kind::Map(entries) => decode_check_map(cx, n, entries, path),
        _ => {
            cx.error(n.span, path, format!("expected a health check, found {}", n.kind.describe()), Some("a check is a command string, an http(s) URL, or one of {command}, {http, status, body}, {tcp}, {dns, expect}".into()));
            None
        }
    }
}

/// A check in its long form: exactly one of `command`, `http`, `tcp` or `dns`, with only the
/// fields that kind takes.
fn decode_check_map(cx: &mut Cx, n: &Node, entries: &[Entry], path: &str) -> Option<Check> {
    cx.map(n, path, CHECK_FIELDS)?;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e.key.as_str())
        .filter(|k| matches!(*k, "command" | "http" | "tcp" | "dns"))
        .collect();
    if kinds.len() != 1 {
        cx.error(
            n.span,
            path,
            "a health check needs exactly one of `command`, `http`, `tcp` or `dns`",
            Some(format!(
                "found: {}",
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                }
            )),
        );
        return None;
    }
    let allowed: &[&str] = match kinds[0] {
        "command" => &["command"],
        "http" => &["http", "status", "body"],
        "tcp" => &["tcp"],
        _ => &["dns", "expect"],
    };
    for e in entries {
        if CHECK_FIELDS.contains(&e.key.as_str()) && !allowed.contains(&e.key.as_str()) {
            cx.error(
                e.key_span,
                &join(path, &e.key),
                format!("`{}` does not apply to a `{}` check", e.key, kinds[0]),
                None,
            );
            return None;
        }
    }
    let vpath = join(path, kinds[0]);
    let Some(v) = field(n, kinds[0]) else {
        cx.error(
            n.span,
            &vpath,
            format!("`{}` is empty", kinds[0]),
            Some("give the check's target, like `{ tcp: \"host:5432\" }`".into()),
        );
        return None;
    };
    match kinds[0] {
        "command" => match &v.kind {
            Kind::Seq(_) => {
                let argv: Vec<String> = cx.strings(v, &vpath).into_iter().map(|(s, _)| s).collect();
                if argv.is_empty() {
                    cx.error(v.span, &vpath, "the command is empty", None);
                    return None;
                }
                Some(Check::Command(argv))
            }
            _ => {
                let s = cx.string(v, &vpath)?;
                command_words(cx, &s, v.span, &vpath).map(Check::Command)
            }
        },
        "http" => {
            let url = cx.string(v, &vpath)?;
            if !check_url(cx, &url, v.span, &vpath) {
                return None;
            }
            let status = match field(n, "status") {
                None => None,
                Some(s) => Some(cx.int(s, &join(path, "status"), 100, 599, "")? as u16),
            };
            let body = field(n, "body").and_then(|b| cx.string(b, &join(path, "body")));
            Some(Check::Http { url, status, body })
        }
        "tcp" => decode_tcp_check(cx, v, &vpath),
        _ => {
            let name = cx.string(v, &vpath)?;
            if crate::ids::DomainName::new(&name).is_err()
                && crate::ids::Hostname::new(&name).is_err()
            {
                cx.error(v.span, &vpath, format!("invalid DNS name `{name}`"), None);
                return None;
            }
            let expect = match field(n, "expect") {
                None => None,
                Some(e) => Some(ip(cx, e, &join(path, "expect"))?),
            };
            Some(Check::Dns { name, expect })
        }
    }
}

/// A `tcp` check's target: `host:port`.
fn decode_tcp_check(cx: &mut Cx, v: &Node, vpath: &str) -> Option<Check> {
    let s = cx.string(v, vpath)?;
    let parsed = s.rsplit_once(':').and_then(|(h, p)| {
        let port = p.parse::<u16>().ok().filter(|p| *p > 0)?;
        let host_ok = h.parse::<Ipv4Addr>().is_ok()
            || crate::ids::DomainName::new(h).is_ok()
            || crate::ids::Hostname::new(h).is_ok();
        host_ok.then(|| (h.to_string(), port))
    });
    match parsed {
        Some((host, port)) => Some(Check::Tcp { host, port }),
        None => {
            cx.error(
                v.span,
                vpath,
                format!("invalid tcp target `{s}`"),
                Some("write host:port, like guacamole.nixmox.lan:4822".into()),
            );
            None
        }
    }
}

/// Splits a command string into words the way a POSIX shell would for simple quoting, so the
/// command can run as an argv without a shell.
fn command_words(cx: &mut Cx, s: &str, span: Span, path: &str) -> Option<Vec<String>> {
    match split_words(s) {
        Some(w) if !w.is_empty() => Some(w),
        Some(_) => {
            cx.error(span, path, "the command is empty", None);
            None
        }
        None => {
            cx.error(
                span,
                path,
                "unbalanced quotes in command",
                Some("close every quote, or give the command as a list of words".into()),
            );
            None
        }
    }
}

pub fn split_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        x => cur.push(x),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => cur.push(chars.next()?),
                        x => cur.push(x),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

fn decode_terraform(
    cx: &mut Cx,
    n: &Node,
    path: &str,
    spec: &mut ServiceSpec,
) -> Option<TerraformUse> {
    cx.map(n, path, TERRAFORM_USE_FIELDS)?;
    let before = cx.errors();
    let phase = match field(n, "phase") {
        None => TfPhase::ServiceInfra,
        Some(p) => choice(
            cx,
            p,
            &join(path, "phase"),
            &[
                ("service-infra", TfPhase::ServiceInfra),
                ("service-config", TfPhase::ServiceConfig),
            ],
        )
        .unwrap_or(TfPhase::ServiceInfra),
    };
    let mut modules = Vec::new();
    if let Some(m) = field(n, "modules") {
        let mpath = join(path, "modules");
        for (i, (p, span)) in cx.strings(m, &mpath).into_iter().enumerate() {
            let resolved = resolve_path(&spec.dir, &p);
            spec.paths.push((
                resolved.clone(),
                span,
                index(&mpath, i),
                PathUse::TerraformModule,
            ));
            modules.push(resolved);
        }
    }
    let variables = match field(n, "variables") {
        Some(v) => decode_tf_variables(cx, v, &join(path, "variables")),
        None => BTreeMap::new(),
    };
    let list = |cx: &mut Cx, key: &str| -> Vec<String> {
        field(n, key)
            .map(|v| {
                cx.strings(v, &join(path, key))
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect()
            })
            .unwrap_or_default()
    };
    let targets = list(cx, "targets");
    let apply_order = list(cx, "apply_order");
    let mut protect = Vec::new();
    if let Some(v) = field(n, "protect") {
        let ppath = join(path, "protect");
        for (i, (entry, span)) in cx.strings(v, &ppath).into_iter().enumerate() {
            match Protect::parse(&entry) {
                Ok(p) => protect.push(p),
                Err(problem) => cx.error(
                    span,
                    &index(&ppath, i),
                    format!("invalid protected resource: {problem}"),
                    Some("write a resource address as it appears in the module (`null_resource.keep`) or a resource type (`null_resource`)".into()),
                ),
            }
        }
    }
    for key in ["targets", "apply_order"] {
        if let Some(v) = field(n, key) {
            check_tf_addresses(cx, v, &join(path, key));
        }
    }
    (cx.errors() == before).then_some(TerraformUse {
        phase,
        modules,
        variables,
        targets,
        apply_order,
        protect,
    })
}

/// A module's `variables`: a mapping of valid variable names (not meta-arguments) to values
/// Terraform can take.
fn decode_tf_variables(cx: &mut Cx, v: &Node, vpath: &str) -> BTreeMap<String, serde_json::Value> {
    let mut variables = BTreeMap::new();
    let Kind::Map(entries) = &v.kind else {
        cx.error(
            v.span,
            vpath,
            format!("expected a mapping, found {}", v.kind.describe()),
            None,
        );
        return variables;
    };
    for e in entries {
        let ident_ok = e
            .key
            .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && e.key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ident_ok {
            cx.error(e.key_span, &join(vpath, &e.key), format!("invalid Terraform variable name `{}`", e.key.escape_debug()), Some("variable names start with a letter or `_` and use letters, digits, `_` and `-`".into()));
            continue;
        }
        if TF_MODULE_META.contains(&e.key.as_str()) {
            cx.error(
                e.key_span,
                &join(vpath, &e.key),
                format!(
                    "`{}` is a Terraform meta-argument of a module block, not a variable",
                    e.key
                ),
                Some(format!(
                    "NixMox writes the module block; a variable cannot be named {}",
                    TF_MODULE_META.join(", ")
                )),
            );
            continue;
        }
        if let Some(v) = tf_value(cx, &e.value, &join(vpath, &e.key)) {
            variables.insert(e.key.clone(), v);
        }
    }
    variables
}

/// `targets` and `apply_order`: each entry a resource address Terraform takes as `-target`.
fn check_tf_addresses(cx: &mut Cx, v: &Node, kpath: &str) {
    if let Kind::Seq(items) = &v.kind {
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = item.as_str() {
                if let Err(why) = crate::ids::check_tf_address(s) {
                    cx.error(
                        item.span,
                        &index(kpath, i),
                        why,
                        Some("Terraform gets it as `-target=ADDRESS`".into()),
                    );
                }
            }
        }
    } else if let Some(s) = v.as_str() {
        if let Err(why) = crate::ids::check_tf_address(s) {
            cx.error(v.span, kpath, why, None);
        }
    }
}

/// The arguments Terraform gives a meaning of its own in a `module` block; a variable of that
/// name would replace NixMox's `source` or change how the module is instantiated.
pub const TF_MODULE_META: &[&str] = &[
    "source",
    "version",
    "count",
    "for_each",
    "providers",
    "provider",
    "depends_on",
    "lifecycle",
];

/// The largest integer every consumer (JSON readers using f64, Terraform, Nix) holds exactly.
pub const EXACT_INT: i64 = 1 << 53;

/// A value passed to Terraform as it is written, checked first: numbers must be exact (an
/// integer too large for YAML's 64 bits was read as a float and would be rounded), and
/// `.nan`/`.inf` have no JSON form. Keys and strings are escaped later, by the renderer.
pub fn tf_value(cx: &mut Cx, n: &Node, path: &str) -> Option<serde_json::Value> {
    let before = cx.errors();
    check_tf_numbers(cx, n, path);
    (cx.errors() == before).then(|| to_json(n))
}

fn check_tf_numbers(cx: &mut Cx, n: &Node, path: &str) {
    match &n.kind {
        Kind::Int(i) if i.unsigned_abs() > EXACT_INT as u64 => cx.error(
            n.span,
            path,
            format!("the integer {i} is too large to pass on exactly"),
            Some(format!(
                "integers up to ±{EXACT_INT} are exact everywhere; write larger values as a string"
            )),
        ),
        Kind::Float(f) if !f.is_finite() || (f.fract() == 0.0 && f.abs() > EXACT_INT as f64) => cx
            .error(
                n.span,
                path,
                "this number cannot be passed on exactly (too large, infinite or not a number)",
                Some(format!(
                "integers up to ±{EXACT_INT} are exact everywhere; write larger values as a string"
            )),
            ),
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                check_tf_numbers(cx, item, &index(path, i));
            }
        }
        Kind::Map(entries) => {
            for e in entries {
                check_tf_numbers(cx, &e.value, &join(path, &e.key));
            }
        }
        _ => {}
    }
}

/// Converts a syntax node to JSON, for values passed through untouched (Terraform variables).
pub fn to_json(n: &Node) -> serde_json::Value {
    use serde_json::Value;
    match &n.kind {
        Kind::Null => Value::Null,
        Kind::Bool(b) => Value::Bool(*b),
        Kind::Int(i) => Value::from(*i),
        Kind::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Kind::Str(s) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(items.iter().map(to_json).collect()),
        Kind::Map(entries) => Value::Object(
            entries
                .iter()
                .map(|e| (e.key.clone(), to_json(&e.value)))
                .collect(),
        ),
    }
}

/// The vision document's form: `requirements: { database, reverse_proxy, oidc }`.
fn decode_requirements(cx: &mut Cx, r: &Node, spec: &mut ServiceSpec) {
    if let Some(d) = field(r, "database") {
        if cx
            .map(d, "requirements.database", REQ_DATABASE_FIELDS)
            .is_some()
        {
            decode_req_database(cx, d, spec);
        }
    }
    if let Some(p) = field(r, "reverse_proxy") {
        if cx
            .map(p, "requirements.reverse_proxy", REQ_PROXY_FIELDS)
            .is_some()
        {
            decode_req_proxy(cx, p, spec);
        }
    }
    if let Some(o) = field(r, "oidc") {
        if cx.map(o, "requirements.oidc", REQ_OIDC_FIELDS).is_some() {
            decode_req_oidc(cx, o, spec);
        }
    }
}

/// `requirements.database` (the caller has checked the mapping's fields).
fn decode_req_database(cx: &mut Cx, d: &Node, spec: &mut ServiceSpec) {
    let path = "requirements.database";
    let before = cx.errors();
    if let Some(t) = field(d, "type") {
        choice(cx, t, &join(path, "type"), &[("postgresql", ())]);
    }
    let default_name = spec.name.value.as_str().replace('-', "_");
    let database = match field(d, "name") {
        Some(v) => sql_ident(cx, v, &join(path, "name")).unwrap_or_default(),
        None => default_pg_name(cx, &default_name, d.span, path),
    };
    let role = field(d, "user")
        .and_then(|v| sql_ident(cx, v, &join(path, "user")))
        .unwrap_or_else(|| database.clone());
    if let Some(h) = field(d, "host") {
        if let Some(s) = cx.string(h, &join(path, "host")) {
            spec.db_host = Some(Sp {
                value: s,
                span: h.span,
            });
        }
    }
    if cx.errors() == before {
        spec.dbs.push(Sp {
            value: Db {
                database,
                role,
                mode: DbMode::NativeMigration,
                migrations: Vec::new(),
                access: SecretAccess::default(),
            },
            span: d.span,
        });
    }
}

/// `requirements.reverse_proxy` (the caller has checked the mapping's fields).
fn decode_req_proxy(cx: &mut Cx, p: &Node, spec: &mut ServiceSpec) {
    let path = "requirements.reverse_proxy";
    let before = cx.errors();
    if let Some(t) = field(p, "type") {
        choice(cx, t, &join(path, "type"), &[("caddy", ())]);
    }
    let dom = cx
        .required(p, path, "domain")
        .and_then(|d| domain(cx, d, &join(path, "domain")));
    let up = cx
        .required(p, path, "backend")
        .and_then(|b| upstream(cx, b, &join(path, "backend")));
    let authz = field(p, "auth")
        .and_then(|a| cx.boolean(a, &join(path, "auth")))
        .unwrap_or(false);
    if let (Some(domain), Some(upstream), true) = (dom, up, cx.errors() == before) {
        spec.proxies.push(Sp {
            value: Proxy {
                domain,
                path: "/".into(),
                upstream,
                tls: true,
                authz,
                headers: BTreeMap::new(),
            },
            span: p.span,
        });
    }
}

/// `requirements.oidc` (the caller has checked the mapping's fields).
fn decode_req_oidc(cx: &mut Cx, o: &Node, spec: &mut ServiceSpec) {
    let path = "requirements.oidc";
    let before = cx.errors();
    let provider = match field(o, "type") {
        None => Some("authentik".to_string()),
        Some(t) => choice(
            cx,
            t,
            &join(path, "type"),
            &[("authentik", "authentik".to_string())],
        ),
    };
    let display_name = field(o, "provider_name")
        .and_then(|v| non_empty_string(cx, v, &join(path, "provider_name")))
        .unwrap_or_else(|| spec.name.value.as_str().to_string());
    let client_id = field(o, "client_id")
        .and_then(|v| non_empty_string(cx, v, &join(path, "client_id")))
        .unwrap_or_else(|| spec.name.value.as_str().to_string());
    let mut redirect_uris = Vec::new();
    if let Some(u) = field(o, "redirect_uri") {
        for (i, (s, span)) in cx
            .strings(u, &join(path, "redirect_uri"))
            .into_iter()
            .enumerate()
        {
            check_url(cx, &s, span, &index(&join(path, "redirect_uri"), i));
            spec.redirects
                .push((s.clone(), span, index(&join(path, "redirect_uri"), i)));
            redirect_uris.push(s);
        }
    }
    let (Some(provider), true) = (provider, cx.errors() == before) else {
        return;
    };
    if spec.auth.is_some() {
        cx.error(
            o.span,
            path,
            "authentication is declared twice",
            Some("keep either `interface.auth` or `requirements.oidc`".into()),
        );
        return;
    }
    spec.auth = Some(Sp {
        value: Auth {
            provider,
            display_name,
            oidc: Some(Oidc {
                client_id,
                client_type: ClientType::Confidential,
                redirect_uris,
                scopes: vec!["openid".into(), "email".into(), "profile".into()],
                username_claim: "preferred_username".into(),
                groups_claim: "groups".into(),
                access: SecretAccess::default(),
            }),
        },
        span: o.span,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(
            split_words("systemctl is-active --quiet tomcat").unwrap(),
            ["systemctl", "is-active", "--quiet", "tomcat"]
        );
        assert_eq!(
            split_words("sh -c 'a b' \"c\\\"d\"").unwrap(),
            ["sh", "-c", "a b", "c\"d"]
        );
        assert_eq!(split_words("echo 'oops"), None);
    }

    #[test]
    fn paths() {
        assert_eq!(
            resolve_path("services/app", "./configuration.nix"),
            "services/app/configuration.nix"
        );
        assert_eq!(
            resolve_path("services/app", "../shared/x.nix"),
            "services/shared/x.nix"
        );
        assert_eq!(
            resolve_path("services/app", "migrations/001.sql"),
            "services/app/migrations/001.sql"
        );
    }
}
