//! Loading a project: files in, validated [`Project`] (or every problem found) out.
//!
//! The shell reads the files and answers "does this path exist"; everything else, including
//! allocation from the pools against `nixmox.lock`, happens here without touching the disk.

use core::net::Ipv4Addr;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use crate::config::{self, ProjectConfig};
use crate::decode::Cx;
use crate::diag::{did_you_mean, Diagnostic, Severity};
use crate::ids::{Hostname, VmId};
use crate::lock::{self, Lock, LockEntry};
use crate::manifest::{self, ServiceSpec, Sp};
use crate::model::{
    Capability, Edge, EdgeKind, Health, HealthTiming, Host, Origin, Project, Resources, Service,
};
use crate::par::map_mut as par_map_mut;
use crate::syntax::{self, Format, Span};

pub const PROJECT_FILE: &str = "nixmox.yaml";

/// One file as read by the shell: its path relative to the project root and its bytes.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: String,
    pub bytes: Vec<u8>,
}

/// Everything a project consists of, as read from disk.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `nixmox.yaml`; `None` when there is none.
    pub config: Option<SourceFile>,
    /// Every `services/<name>/manifest.{yaml,yml,json}`, in any order.
    pub manifests: Vec<SourceFile>,
    pub lock: Option<SourceFile>,
}

/// The result of loading: the project when there were no errors, and every diagnostic.
#[derive(Debug)]
pub struct Loaded {
    pub project: Option<Project>,
    pub diagnostics: Vec<Diagnostic>,
    /// The lock as it should be after this load's allocations.
    pub lock: Lock,
    /// True when `lock` differs from the lock file on disk (or there is none and it is needed).
    pub lock_changed: bool,
}

impl Loaded {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }
}

/// What the shell found at a project-relative path a manifest references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    /// A regular file (a symbolic link to one inside the project counts).
    File,
    /// A directory whose every entry is a regular file, a directory or a symbolic link that
    /// stays inside the project.
    Dir,
    /// It exists; the caller did not look at what it is (see [`load`]).
    Exists,
    /// Not a regular file or a directory (a FIFO, a socket, a device), at `at` (the path
    /// itself, or an entry inside the referenced directory). `what` names the kind.
    Special {
        at: String,
        what: &'static str,
    },
    /// A symbolic link, at `at` (the path, a directory on the way to it, or an entry inside
    /// the referenced directory), that leads outside the project.
    Escapes {
        at: String,
    },
}

/// Loads and validates a project. `exists` answers whether a project-relative path exists;
/// what kind of file it is goes unchecked (tests and benchmarks that only know that). The
/// shell uses [`load_probed`].
pub fn load(sources: &Sources, exists: &dyn Fn(&str) -> bool) -> Loaded {
    load_probed(sources, &|rel: &str| {
        if exists(rel) {
            PathKind::Exists
        } else {
            PathKind::Missing
        }
    })
}

/// Loads and validates a project. `probe` says what is at a project-relative path a manifest
/// references, so that each reference is checked for what it must be (a migration a file, a
/// Terraform module a directory, nothing a FIFO, nothing leading out of the project).
pub fn load_probed(sources: &Sources, probe: &dyn Fn(&str) -> PathKind) -> Loaded {
    load_in(sources, probe, &Cluster::default())
}

/// What the shell learnt of the Proxmox cluster, for placement. Without it (validate, plan,
/// no API access) placement uses `proxmox.nodes` as all online, or `proxmox.node` alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// The nodes the PVE API reports (`GET /nodes`); `None` when it was not asked.
    pub nodes: Option<Vec<ClusterNode>>,
    /// Place every service afresh, ignoring the nodes in `nixmox.lock` (`nixmox rebalance`).
    pub fresh: bool,
}

/// One node as the PVE API reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub online: bool,
    /// `maxmem`, in MiB.
    pub memory: Option<u64>,
    /// `maxcpu`.
    pub cores: Option<u32>,
}

/// [`load_probed`] with what the shell knows of the cluster.
pub fn load_in(sources: &Sources, probe: &dyn Fn(&str) -> PathKind, cluster: &Cluster) -> Loaded {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let texts = Texts::decode(sources, &mut diags);
    let mut cxs: Vec<Cx> = texts.texts.iter().map(|(p, t)| Cx::new(p, t)).collect();

    let cfg = load_config(sources, &texts, &mut cxs, &mut diags);
    let specs = decode_manifests(sources, &texts, &mut cxs, &mut diags);
    check_paths(&mut cxs, &specs, probe);
    let old_lock = match texts.lock {
        Some(i) => parse_file(&mut cxs[i], &texts.texts[i].1, &texts.texts[i].0)
            .map(|root| lock::decode(&mut cxs[i], &root))
            .unwrap_or_default(),
        None => Lock::default(),
    };
    let specs = check_unique_names(&mut cxs, specs);
    let (edges, placement) = check_and_place(&mut cxs, &specs, cfg.as_ref(), &old_lock, cluster);
    let (project, new_lock) = match (cfg, placement) {
        (Some(cfg), Some(placement)) => {
            let lock = placement.allocated.lock;
            let services = build_services(
                specs,
                placement.allocated.hosts,
                placement.placed,
                placement.resolved,
            );
            let any_error = !diags.is_empty() || cxs.iter().any(|c| c.errors() > 0);
            ((!any_error).then(|| project(cfg, services, edges)), lock)
        }
        _ => (None, Lock::default()),
    };
    for cx in cxs {
        diags.extend(cx.diags);
    }
    diags.sort_by(|a, b| (a.severity, &a.file, a.span).cmp(&(b.severity, &b.file, b.span)));
    diags.dedup();
    let lock_changed =
        new_lock != old_lock && (sources.lock.is_some() || !new_lock.services.is_empty());
    Loaded {
        project,
        diagnostics: diags,
        lock: new_lock,
        lock_changed,
    }
}

/// The texts of the project's files that are valid UTF-8 (byte order mark dropped, line
/// breaks normalised), each with its path, and where each source file's text is.
struct Texts<'a> {
    texts: Vec<(String, Cow<'a, str>)>,
    config: Option<usize>,
    /// Per manifest of `Sources::manifests`.
    manifests: Vec<Option<usize>>,
    lock: Option<usize>,
}

impl<'a> Texts<'a> {
    /// Reports every file that is not valid UTF-8.
    fn decode(sources: &'a Sources, diags: &mut Vec<Diagnostic>) -> Self {
        let mut texts = Vec::with_capacity(sources.manifests.len() + 2);
        let config = sources
            .config
            .as_ref()
            .and_then(|f| decode_text(f, &mut texts, diags));
        let manifests = sources
            .manifests
            .iter()
            .map(|f| decode_text(f, &mut texts, diags))
            .collect();
        let lock = sources
            .lock
            .as_ref()
            .and_then(|f| decode_text(f, &mut texts, diags));
        Texts {
            texts,
            config,
            manifests,
            lock,
        }
    }
}

/// Adds the text of `f` to `texts` and returns its index, or reports it not UTF-8.
fn decode_text<'a>(
    f: &'a SourceFile,
    texts: &mut Vec<(String, Cow<'a, str>)>,
    diags: &mut Vec<Diagnostic>,
) -> Option<usize> {
    match std::str::from_utf8(&f.bytes) {
        Ok(s) => {
            texts.push((
                f.path.clone(),
                normalize_breaks(s.strip_prefix('\u{feff}').unwrap_or(s)),
            ));
            Some(texts.len() - 1)
        }
        Err(e) => {
            let good = &f.bytes[..e.valid_up_to()];
            let good = normalize_breaks(std::str::from_utf8(good).unwrap_or(""));
            let line = good.matches('\n').count() + 1;
            let col = good
                .rsplit('\n')
                .next()
                .map(|l| l.chars().count())
                .unwrap_or(0)
                + 1;
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: f.path.clone(),
                span: Some(Span::new(line as u32, col as u32)),
                field: None,
                message: format!(
                    "the file is not valid UTF-8 (invalid byte at offset {})",
                    e.valid_up_to()
                ),
                snippet: None,
                width: 1,
                help: Some("save the file as UTF-8".into()),
            });
            None
        }
    }
}

/// The project file, decoded; a missing one is reported.
fn load_config(
    sources: &Sources,
    texts: &Texts,
    cxs: &mut [Cx],
    diags: &mut Vec<Diagnostic>,
) -> Option<ProjectConfig> {
    match (&sources.config, texts.config) {
        (None, _) => {
            diags.push(Diagnostic {
                severity: Severity::Error,
                file: PROJECT_FILE.into(),
                span: None,
                field: None,
                message: format!("no `{PROJECT_FILE}` in the project directory"),
                snippet: None,
                width: 1,
                help: Some(
                    "run `nixmox init` to create a project, or pass its directory with `-C DIR`"
                        .into(),
                ),
            });
            None
        }
        (Some(_), None) => None,
        (Some(_), Some(i)) => {
            let root = parse_file(&mut cxs[i], &texts.texts[i].1, &texts.texts[i].0)?;
            config::decode(&mut cxs[i], &root)
        }
    }
}

/// The manifests' specs, sorted by name (then manifest path). Parsed and decoded in
/// parallel, each file with its own context; the diagnostics are sorted at the end, so the
/// output does not depend on how the files were shared out.
fn decode_manifests(
    sources: &Sources,
    texts: &Texts,
    cxs: &mut [Cx],
    diags: &mut Vec<Diagnostic>,
) -> Vec<ServiceSpec> {
    let mut owner: Vec<Option<usize>> = vec![None; cxs.len()];
    for (m, idx) in texts.manifests.iter().enumerate() {
        if let Some(i) = *idx {
            owner[i] = Some(m);
        }
    }
    let mut work: Vec<(usize, &mut Cx, &SourceFile)> = cxs
        .iter_mut()
        .enumerate()
        .filter_map(|(i, cx)| owner[i].map(|m| (i, cx, &sources.manifests[m])))
        .collect();
    let mut specs: Vec<ServiceSpec> = par_map_mut(&mut work, |(i, cx, f)| {
        let dir = f.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let text = &texts.texts[*i].1;
        let root = parse_file(cx, text, &f.path)?;
        manifest::decode(cx, &root, *i, &f.path, dir)
    })
    .into_iter()
    .flatten()
    .collect();
    if sources.manifests.is_empty() && sources.config.is_some() {
        diags.push(Diagnostic {
            severity: Severity::Error,
            file: PROJECT_FILE.to_string(),
            span: None,
            field: None,
            message: "the project has no services".into(),
            snippet: None,
            width: 1,
            help: Some("add one manifest per service at services/<name>/manifest.yaml".into()),
        });
    }
    specs.sort_by(|a, b| {
        a.name
            .value
            .cmp(&b.name.value)
            .then(a.manifest.cmp(&b.manifest))
    });
    specs
}

/// The paths the manifests reference: inside the project, and what each use needs.
fn check_paths(cxs: &mut [Cx], specs: &[ServiceSpec], probe: &dyn Fn(&str) -> PathKind) {
    for s in specs {
        for (path, span, field, use_) in &s.paths {
            if let Some((message, help)) = path_problem(path, &s.dir, *use_, probe) {
                cxs[s.file].error(*span, field, message, Some(help));
            }
        }
    }
}

/// The project-wide checks, the dependency edges, and (when the project file loads) the
/// allocation and placement of every service. All of it only reads the specs, so it runs on two
/// threads, each writing into its own copies of the files' contexts, merged back in the order
/// one thread would have written them: the diagnostics are the same on any number of cores.
fn check_and_place(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    cfg: Option<&ProjectConfig>,
    old_lock: &Lock,
    cluster: &Cluster,
) -> (Vec<Edge>, Option<Placement>) {
    let mut second: Vec<Cx> = cxs.iter().map(Cx::sibling).collect();
    let mut third: Vec<Cx> = cxs.iter().map(Cx::sibling).collect();
    let (edges, placement) = crate::par::join(
        || {
            check_dns_names(&mut second, specs, cfg);
            check_databases(&mut second, specs);
            check_roles(&mut second, specs);
            check_redirects(&mut second, specs);
            // Dependency problems are worth reporting even when the project file is broken.
            let edges = build_edges(&mut second, specs, cfg.map(|c| &c.domain));
            check_cycles(&mut second, specs, &edges);
            edges
        },
        || {
            check_providers(cxs, specs);
            check_routes_served(cxs, specs);
            check_duplicates(cxs, specs, cfg);
            check_proxy_routes(cxs, specs);
            cfg.map(|cfg| place(&mut third, specs, cfg, old_lock, cluster))
        },
    );
    for ((cx, two), three) in cxs.iter_mut().zip(second).zip(third) {
        cx.diags.extend(two.diags);
        cx.diags.extend(three.diags);
    }
    (edges, placement)
}

/// Where each service goes: its allocated addresses, its resolved resources and timing, its
/// node; and the lock as it should be.
struct Placement {
    allocated: Allocated,
    resolved: Vec<(Resources, HealthTiming)>,
    placed: Vec<Option<Placed>>,
}

/// Allocates and places the services, recording placements in the lock.
fn place(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    cfg: &ProjectConfig,
    old_lock: &Lock,
    cluster: &Cluster,
) -> Placement {
    let mut allocated = allocate(cxs, specs, cfg, old_lock);
    let resolved = resolve(specs, &cfg.defaults);
    let placed = place_services(cxs, specs, &resolved, cfg, old_lock, cluster);
    // In a cluster every placement is recorded. A single-node project records only a node
    // other than `proxmox.node`: an entry without a node means `proxmox.node` (as every
    // lock written before placement existed does), so its lock does not change.
    let cluster_mode =
        !cfg.proxmox.nodes.is_empty() || (cluster.nodes.is_some() && !cfg.proxmox.node_given);
    for (s, p) in specs.iter().zip(&placed) {
        if let Some(p) = p.as_ref().filter(|p| p.origin != Origin::Manifest) {
            if cluster_mode || p.node != cfg.proxmox.node {
                allocated
                    .lock
                    .services
                    .entry(s.name.value.to_string())
                    .or_default()
                    .node = Some(p.node.clone());
            }
        }
    }
    Placement {
        allocated,
        resolved,
        placed,
    }
}

/// The validated project.
fn project(cfg: ProjectConfig, services: Vec<Service>, edges: Vec<Edge>) -> Project {
    let mut providers = [None; 4];
    for cap in Capability::ALL {
        providers[cap as usize] = services.iter().position(|s| s.provides(cap));
    }
    Project {
        name: cfg.name,
        domain: cfg.domain,
        network: cfg.network,
        pools: cfg.pools,
        proxmox: cfg.proxmox,
        infra: cfg.infra,
        ssh: cfg.ssh,
        nix: cfg.nix,
        terraform: cfg.terraform,
        defaults: cfg.defaults,
        state: cfg.state,
        secrets: cfg.secrets,
        deploy: cfg.deploy,
        services,
        edges,
        providers,
    }
}

/// What is wrong with a referenced path, if anything: (message, help).
fn path_problem(
    path: &str,
    service_dir: &str,
    use_: manifest::PathUse,
    probe: &dyn Fn(&str) -> PathKind,
) -> Option<(String, String)> {
    use manifest::PathUse;
    if path.starts_with("..") || path.starts_with('/') {
        // The build copies referenced files; anything outside the project would make it
        // depend on the machine it was rendered on, and would let a manifest read any file.
        return Some((
            format!("`{path}` is outside the project directory"),
            "keep modules, migrations and Terraform modules inside the project (a shared directory next to `services/` works)".into(),
        ));
    }
    if path.is_empty() || path == service_dir || service_dir.starts_with(&format!("{path}/")) {
        return Some((
            format!(
                "`{}` names the service's directory (or one above it), not a file in it",
                if path.is_empty() { "." } else { path }
            ),
            "name the file itself, like `./configuration.nix`; only referenced files are copied into the build".into(),
        ));
    }
    if path == ".nixmox" || path.starts_with(".nixmox/") {
        return Some((
            format!("`{path}` is inside `.nixmox/`, NixMox's own build and state directory"),
            "keep modules, migrations and Terraform modules in the service's directory".into(),
        ));
    }
    let want = match use_ {
        PathUse::NixModule => "a `.nix` file or a directory with `default.nix`",
        PathUse::Migration => "a SQL file",
        PathUse::TerraformModule => "a directory of Terraform files",
    };
    match probe(path) {
        PathKind::Missing => Some((
            format!("`{path}` does not exist"),
            "paths are relative to the manifest's directory".into(),
        )),
        PathKind::Exists => None,
        PathKind::File if use_ == PathUse::TerraformModule => Some((
            format!("`{path}` is a file; a Terraform module is a directory"),
            format!("name {want}"),
        )),
        PathKind::Dir if use_ == PathUse::Migration => Some((
            format!("`{path}` is a directory; a migration is a file"),
            "list each migration file".into(),
        )),
        PathKind::File | PathKind::Dir => None,
        PathKind::Special { at, what } => Some((
            format!("`{at}` is {what}"),
            format!("NixMox opens only regular files and directories; `{path}` must be {want}"),
        )),
        PathKind::Escapes { at } => Some((
            format!("`{at}` is a symbolic link that leads outside the project directory"),
            "a link may point elsewhere inside the project, never out of it: copy the file in instead".into(),
        )),
    }
}

/// A lone `\r` ends a line in YAML (and is whitespace in JSON) but not for serde_json's or a
/// reader's line count: make it a `\n`, which means the same and keeps every byte offset, so
/// every position reported agrees with the lines a reader sees.
fn normalize_breaks(text: &str) -> Cow<'_, str> {
    if !text.contains('\r') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        if c == '\r' && bytes.get(i + 1) != Some(&b'\n') {
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn parse_file(cx: &mut Cx, text: &str, path: &str) -> Option<syntax::Node> {
    let parsed = syntax::parse_all(text, Format::from_path(path));
    let fatal = !parsed.errors.is_empty() && parsed.root.is_none();
    for e in parsed.errors {
        cx.error(e.span, "", e.message, None);
    }
    match parsed.root {
        Some(node) => {
            // Reported, and decoding goes on so the file's other problems show too; any
            // error keeps the project from being built.
            if parsed.has_nul {
                check_nul(cx, &node, "");
            }
            Some(node)
        }
        None if fatal => None,
        None => {
            cx.diags.push(Diagnostic {
                severity: Severity::Error,
                file: path.to_string(),
                span: Some(Span::new(1, 1)),
                field: None,
                message: "the file is empty".into(),
                snippet: None,
                width: 1,
                help: Some(if path.ends_with("nixmox.lock") {
                    "delete it and run `nixmox lock` to write it again".into()
                } else if path.ends_with(PROJECT_FILE) {
                    "a project file needs at least `project`, `domain` and `network: { cidr, gateway }`".into()
                } else {
                    "a manifest needs at least `name:`".into()
                }),
            });
            None
        }
    }
}

/// No string or key may hold a NUL character (YAML's `"\0"` escape, JSON's `\u0000`): Nix
/// strings end at the first NUL, so `guac\0amole` would be `guac` on the host while
/// Terraform and PostgreSQL saw the whole name. Rejected everywhere, before decoding.
fn check_nul(cx: &mut Cx, n: &syntax::Node, path: &str) {
    use syntax::Kind;
    // Field paths are built only on the way to a NUL: almost no file has one, and formatting
    // a path for every node was a fifth of loading a large project.
    fn has_nul(n: &syntax::Node) -> bool {
        match &n.kind {
            Kind::Str(s) => s.contains('\0'),
            Kind::Seq(items) => items.iter().any(has_nul),
            Kind::Map(entries) => entries
                .iter()
                .any(|e| e.key.contains('\0') || has_nul(&e.value)),
            _ => false,
        }
    }
    if !has_nul(n) {
        return;
    }
    match &n.kind {
        Kind::Str(s) if s.contains('\0') => cx.error(
            n.span,
            path,
            "the string contains a NUL character (`\\0`)",
            Some("NUL cannot be part of any name or value NixMox passes on; remove it".into()),
        ),
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                check_nul(cx, item, &crate::decode::index(path, i));
            }
        }
        Kind::Map(entries) => {
            for e in entries {
                let p = crate::decode::join(path, &e.key.replace('\0', "\\0"));
                if e.key.contains('\0') {
                    cx.error(
                        e.key_span,
                        &p,
                        "the key contains a NUL character (`\\0`)",
                        None,
                    );
                }
                check_nul(cx, &e.value, &p);
            }
        }
        _ => {}
    }
}

/// "first defined at services/x/manifest.yaml:3:7"
fn at(cxs: &[Cx], file: usize, span: Span) -> String {
    format!("{}:{}:{}", cxs[file].file, span.line, span.col)
}

fn check_unique_names(cxs: &mut [Cx], specs: Vec<ServiceSpec>) -> Vec<ServiceSpec> {
    let mut out: Vec<ServiceSpec> = Vec::with_capacity(specs.len());
    for s in specs {
        // `specs` is sorted by name: a duplicate is always next to the one kept before it.
        if let Some(first) = out.last().filter(|o| o.name.value == s.name.value) {
            let msg = format!("duplicate service name `{}`", s.name.value);
            let help = format!(
                "`{}` is already defined at {}",
                s.name.value,
                at(cxs, first.file, first.name.span)
            );
            cxs[s.file].error(s.name.span, "name", msg, Some(help));
        } else {
            out.push(s);
        }
    }
    out
}

fn hostname_of(s: &ServiceSpec) -> Hostname {
    s.hostname
        .as_ref()
        .map(|h| h.value.clone())
        .unwrap_or_else(|| {
            Hostname::new(s.name.value.as_str()).expect("service names are valid labels")
        })
}

/// Routes the project's reverse proxy implementation cannot serve (`nginx` and `tls: true`),
/// each reported at the route.
fn check_routes_served(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    let Some(proxy) = specs.iter().find_map(|s| {
        s.provides
            .iter()
            .find(|p| p.value.capability == Capability::ReverseProxy)
            .map(|p| p.value.provider)
    }) else {
        return;
    };
    for s in specs {
        for x in &s.proxies {
            for problem in proxy.check_route(&x.value) {
                cxs[s.file].error(
                    x.span,
                    "interface.proxy",
                    format!("`{}`: {problem}", s.name.value),
                    Some(format!(
                        "this project's reverse proxy is `{}`; NixMox configures {} as the reverse proxy",
                        proxy.implementation(),
                        crate::providers::names(Capability::ReverseProxy)
                    )),
                );
            }
        }
    }
}

fn check_providers(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    for cap in Capability::ALL {
        let providers: Vec<(&ServiceSpec, &Sp<crate::model::Provided>)> = specs
            .iter()
            .filter_map(|s| {
                s.provides
                    .iter()
                    .find(|p| p.value.capability == cap)
                    .map(|p| (s, p))
            })
            .collect();
        if let Some(((first, fp), rest)) = providers.split_first() {
            for (s, p) in rest {
                let msg = format!(
                    "two services provide `{}`: `{}` and `{}`",
                    cap.key(),
                    first.name.value,
                    s.name.value
                );
                let help = format!(
                    "a project has one {} provider; `{}` declares it at {}",
                    cap.key(),
                    first.name.value,
                    at(cxs, first.file, fp.span)
                );
                cxs[s.file].error(p.span, &format!("provides.{}", cap.key()), msg, Some(help));
            }
        }
    }
    let provided: std::collections::HashSet<Capability> = specs
        .iter()
        .flat_map(|s| s.provides.iter().map(|p| p.value.capability))
        .collect();
    let has = |cap: Capability| provided.contains(&cap);
    for s in specs {
        let needs: [(bool, Capability, &str, Option<Span>); 3] = [
            (
                !s.dbs.is_empty(),
                Capability::Database,
                "db",
                s.dbs.first().map(|d| d.span),
            ),
            (
                !s.proxies.is_empty(),
                Capability::ReverseProxy,
                "proxy",
                s.proxies.first().map(|p| p.span),
            ),
            (
                s.auth.is_some(),
                Capability::Identity,
                "auth",
                s.auth.as_ref().map(|a| a.span),
            ),
        ];
        for (uses, cap, what, span) in needs {
            if uses && !has(cap) {
                cxs[s.file].error(
                    span.unwrap_or(s.root_span),
                    &format!("interface.{what}"),
                    format!(
                        "`{}` needs {} {} provider, and no service provides `{}`",
                        s.name.value,
                        if cap == Capability::Identity {
                            "an"
                        } else {
                            "a"
                        },
                        cap.key(),
                        cap.key()
                    ),
                    Some(format!(
                        "add a core service with `provides: {{ {}: {{ type: {} }} }}`",
                        cap.key(),
                        crate::providers::default_for(cap).implementation()
                    )),
                );
            }
        }
    }
}

/// What makes `ip` unusable as a host's address in `net`, if anything.
fn ip_problem(net: &crate::model::Network, ip: Ipv4Addr) -> Option<String> {
    if !net.cidr.contains(ip) {
        Some(format!(
            "IP address {ip} is outside the network {}",
            net.cidr
        ))
    } else if ip == net.gateway {
        Some(format!("IP address {ip} is the network's gateway"))
    } else if ip == net.cidr.network() && net.cidr.is_reserved(ip) {
        Some(format!(
            "IP address {ip} is the network address of {}",
            net.cidr
        ))
    } else if net.cidr.is_reserved(ip) {
        Some(format!(
            "IP address {ip} is the broadcast address of {}",
            net.cidr
        ))
    } else {
        None
    }
}

fn check_duplicates(cxs: &mut [Cx], specs: &[ServiceSpec], cfg: Option<&ProjectConfig>) {
    let mut hostnames: HashMap<Hostname, &ServiceSpec> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, &ServiceSpec> = HashMap::new();
    let mut vmids: HashMap<VmId, &ServiceSpec> = HashMap::new();
    for s in specs {
        let h = hostname_of(s);
        let hspan = s.hostname.as_ref().map(|h| h.span).unwrap_or(s.name.span);
        if let Some(first) = hostnames.get(&h) {
            let fspan = first
                .hostname
                .as_ref()
                .map(|h| h.span)
                .unwrap_or(first.name.span);
            let help = format!(
                "`{}` already uses hostname `{h}` at {}",
                first.name.value,
                at(cxs, first.file, fspan)
            );
            cxs[s.file].error(
                hspan,
                "host.hostname",
                format!("duplicate hostname `{h}`"),
                Some(help),
            );
        } else {
            hostnames.insert(h, s);
        }
        if let Some(ip) = &s.ip {
            if let Some(first) = ips.get(&ip.value) {
                let fspan = first.ip.as_ref().map(|i| i.span).unwrap_or(first.root_span);
                let help = format!(
                    "`{}` already uses {} at {}",
                    first.name.value,
                    ip.value,
                    at(cxs, first.file, fspan)
                );
                cxs[s.file].error(
                    ip.span,
                    "host.ip",
                    format!("duplicate IP address {}", ip.value),
                    Some(help),
                );
            } else {
                ips.insert(ip.value, s);
            }
            if let Some(cfg) = cfg {
                let net = &cfg.network;
                if let Some(msg) = ip_problem(net, ip.value) {
                    let help = format!("use a host address in {} other than the gateway {}, or leave `ip` out to allocate one from `pools.ip`", net.cidr, net.gateway);
                    cxs[s.file].error(ip.span, "host.ip", msg, Some(help));
                }
            }
        }
        if let Some(vmid) = &s.vmid {
            if let Some(first) = vmids.get(&vmid.value) {
                let fspan = first
                    .vmid
                    .as_ref()
                    .map(|i| i.span)
                    .unwrap_or(first.root_span);
                let help = format!(
                    "`{}` already uses vmid {} at {}",
                    first.name.value,
                    vmid.value,
                    at(cxs, first.file, fspan)
                );
                cxs[s.file].error(
                    vmid.span,
                    "host.vmid",
                    format!("duplicate vmid {}", vmid.value),
                    Some(help),
                );
            } else {
                vmids.insert(vmid.value, s);
            }
            // An explicit vmid need not lie in `pools.vmid`: the pool only says where
            // omitted ids come from, and Proxmox users have numbering schemes of their own.
        }
    }
}

/// A database belongs to one service; two services declaring the same database (or one
/// database with two migrations of the same file name) cannot both be satisfied.
fn check_databases(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    let mut seen: HashMap<&str, (usize, Span, &str)> = HashMap::new();
    for s in specs {
        for d in &s.dbs {
            if let Some((file, span, owner)) = seen.get(d.value.database.as_str()) {
                let help = format!("`{owner}` already declares it at {}", at(cxs, *file, *span));
                cxs[s.file].error(
                    d.span,
                    "interface.db",
                    format!("duplicate database `{}`", d.value.database),
                    Some(help),
                );
            } else {
                seen.insert(
                    d.value.database.as_str(),
                    (s.file, d.span, s.name.value.as_str()),
                );
            }
            let mut names = HashSet::new();
            for m in &d.value.migrations {
                let base = crate::render::safe_name(crate::render::base_name(m));
                if !names.insert(base.clone()) {
                    cxs[s.file].error(
                        d.span,
                        "interface.db.migrations",
                        format!(
                            "two migrations of database `{}` are named `{base}`",
                            d.value.database
                        ),
                        Some(
                            "migrations are recorded by file name; give each a distinct name"
                                .into(),
                        ),
                    );
                }
            }
        }
    }
}

/// A role belongs to one service. Several services may share one only when each of them names
/// every other in `share_role_with`: otherwise a manifest could name another service's role
/// and receive its password.
fn check_roles(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    // role -> every use: (spec index, the use)
    let mut users: BTreeMap<&str, Vec<(usize, &manifest::RoleUse)>> = BTreeMap::new();
    for (i, s) in specs.iter().enumerate() {
        for u in &s.role_sharing {
            users.entry(u.role.as_str()).or_default().push((i, u));
        }
    }
    for (role, list) in users {
        for &(i, u) in &list {
            let s = &specs[i];
            // Every other service using this role, once each, with its first use.
            let mut others: Vec<(usize, &manifest::RoleUse)> = Vec::new();
            for &(j, v) in &list {
                if j != i && !others.iter().any(|(k, _)| *k == j) {
                    others.push((j, v));
                }
            }
            for (j, v) in others {
                let other = &specs[j];
                if u.share_role_with
                    .iter()
                    .any(|n| n.value == other.name.value)
                {
                    continue;
                }
                cxs[s.file].error(
                    u.span,
                    &u.field,
                    format!(
                        "role `{role}` is also used by `{}`; a role belongs to one service",
                        other.name.value
                    ),
                    Some(format!(
                        "`{}` uses it at {}; to share it on purpose, both services name each other in `share_role_with` (here: `share_role_with: [{}]`)",
                        other.name.value,
                        at(cxs, other.file, v.span),
                        other.name.value
                    )),
                );
            }
        }
    }
}

/// Every name the DNS provider serves: a proxy domain may not be another service's host name
/// (that host's A record would be replaced by the proxy's; a service may route its own), and it must be inside the project's domain
/// (otherwise the resolver would override a real name like `google.com` for every host).
fn check_dns_names(cxs: &mut [Cx], specs: &[ServiceSpec], cfg: Option<&ProjectConfig>) {
    let Some(cfg) = cfg else { return };
    let domain = cfg.domain.as_str();
    let hosts: HashMap<String, &ServiceSpec> = specs
        .iter()
        .map(|s| (format!("{}.{domain}", hostname_of(s)), s))
        .collect();
    for s in specs {
        for (k, p) in s.proxies.iter().enumerate() {
            let d = p.value.domain.as_str();
            let field = format!("interface.proxy[{k}].domain");
            if let Some(owner) = hosts.get(d).filter(|o| o.name.value != s.name.value) {
                cxs[s.file].error(
                    p.span,
                    &field,
                    format!("proxy domain `{d}` is the host name of `{}`", owner.name.value),
                    Some(format!("`{d}` resolves to `{}`'s own address; pick another name for the route, like `{}-web.{domain}`", owner.name.value, hostname_of(owner))),
                );
            } else if !(d == domain || d.ends_with(&format!(".{domain}"))) {
                cxs[s.file].error(
                    p.span,
                    &field,
                    format!("proxy domain `{d}` is outside the project's domain `{domain}`"),
                    Some(format!("the project's resolver answers for `{domain}` only; use a name ending in `.{domain}`")),
                );
            }
        }
    }
}

fn check_proxy_routes(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    let mut routes: HashMap<(String, String), (usize, Span, String)> = HashMap::new();
    for s in specs {
        for p in &s.proxies {
            let key = (
                p.value.domain.as_str().to_string(),
                p.value.path.trim_end_matches('/').to_string(),
            );
            if let Some((file, span, owner)) = routes.get(&key) {
                let help = format!("`{owner}` already routes it at {}", at(cxs, *file, *span));
                cxs[s.file].error(
                    p.span,
                    "interface.proxy",
                    format!("duplicate route {}{}", p.value.domain, p.value.path),
                    Some(help),
                );
            } else {
                routes.insert(key, (s.file, p.span, s.name.value.to_string()));
            }
        }
    }
}

/// Redirect URIs that cannot work are warnings, not errors: the identity provider accepts them.
fn check_redirects(cxs: &mut [Cx], specs: &[ServiceSpec]) {
    let proxied: HashSet<&str> = specs
        .iter()
        .flat_map(|s| s.proxies.iter().map(|p| p.value.domain.as_str()))
        .collect();
    for s in specs {
        for (uri, span, field) in &s.redirects {
            let Ok(u) = crate::url::check(uri) else {
                continue;
            };
            if u.scheme != "https" {
                cxs[s.file].warning(
                    *span,
                    field,
                    format!("redirect URI `{uri}` is not https"),
                    Some("identity providers send codes and tokens to this URI; use https".into()),
                );
            } else if !proxied.contains(u.host.as_str()) {
                cxs[s.file].warning(
                    *span,
                    field,
                    format!(
                        "redirect URI `{uri}` is on `{}`, which no service proxies",
                        u.host
                    ),
                    Some("add a `proxy` entry for that domain, or fix the URI".into()),
                );
            }
        }
    }
}

struct Allocated {
    /// Per spec (same order): ip, ip origin, vmid, vmid origin.
    hosts: Vec<Option<(Ipv4Addr, Origin, VmId, Origin)>>,
    lock: Lock,
}

/// Gives every service without an explicit ip/vmid one from the pools, keeping what the lock
/// already holds; new allocations take the lowest free value, in service-name order.
fn allocate(cxs: &mut [Cx], specs: &[ServiceSpec], cfg: &ProjectConfig, old: &Lock) -> Allocated {
    let mut used_ips: HashSet<Ipv4Addr> = specs
        .iter()
        .filter_map(|s| s.ip.as_ref().map(|i| i.value))
        .collect();
    used_ips.insert(cfg.network.gateway);
    let mut used_vmids: HashSet<u32> = specs
        .iter()
        .filter_map(|s| s.vmid.as_ref().map(|v| v.value.get()))
        .collect();
    let mut ips: Vec<Option<(Ipv4Addr, Origin)>> = specs
        .iter()
        .map(|s| s.ip.as_ref().map(|i| (i.value, Origin::Manifest)))
        .collect();
    let mut vmids: Vec<Option<(u32, Origin)>> = specs
        .iter()
        .map(|s| s.vmid.as_ref().map(|v| (v.value.get(), Origin::Manifest)))
        .collect();
    // Keep locked values that are still valid and free.
    for (i, s) in specs.iter().enumerate() {
        let Some(entry) = old.services.get(s.name.value.as_str()) else {
            continue;
        };
        if ips[i].is_none() {
            if let Some(ip) = entry.ip {
                let net = &cfg.network;
                if net.cidr.contains(ip) && !net.cidr.is_reserved(ip) && used_ips.insert(ip) {
                    ips[i] = Some((ip, Origin::Lock));
                }
            }
        }
        if vmids[i].is_none() {
            if let Some(v) = entry.vmid {
                if v >= 100 && used_vmids.insert(v) {
                    vmids[i] = Some((v, Origin::Lock));
                }
            }
        }
    }
    let mut next_ip = u32::from(cfg.pools.ip.start);
    let mut next_vmid = cfg.pools.vmid.start;
    let mut lock = Lock::default();
    for (i, s) in specs.iter().enumerate() {
        if ips[i].is_none() {
            while next_ip <= u32::from(cfg.pools.ip.end)
                && used_ips.contains(&Ipv4Addr::from(next_ip))
            {
                next_ip += 1;
            }
            if next_ip <= u32::from(cfg.pools.ip.end) {
                let ip = Ipv4Addr::from(next_ip);
                used_ips.insert(ip);
                ips[i] = Some((ip, Origin::Allocated));
            } else {
                cxs[s.file].error(s.name.span, "host.ip", format!("no free address left in pools.ip for `{}`", s.name.value), Some(format!("widen `pools.ip` ({}-{}) in nixmox.yaml or give the service an explicit `host.ip`", cfg.pools.ip.start, cfg.pools.ip.end)));
            }
        }
        if vmids[i].is_none() {
            while next_vmid <= cfg.pools.vmid.end && used_vmids.contains(&next_vmid) {
                next_vmid += 1;
            }
            if next_vmid <= cfg.pools.vmid.end {
                used_vmids.insert(next_vmid);
                vmids[i] = Some((next_vmid, Origin::Allocated));
            } else {
                cxs[s.file].error(s.name.span, "host.vmid", format!("no free vmid left in pools.vmid for `{}`", s.name.value), Some(format!("widen `pools.vmid` ({}-{}) in nixmox.yaml or give the service an explicit `host.vmid`", cfg.pools.vmid.start, cfg.pools.vmid.end)));
            }
        }
        let entry = LockEntry {
            ip: ips[i]
                .filter(|(_, o)| *o != Origin::Manifest)
                .map(|(ip, _)| ip),
            vmid: vmids[i]
                .filter(|(_, o)| *o != Origin::Manifest)
                .map(|(v, _)| v),
            node: None,
        };
        if entry.ip.is_some() || entry.vmid.is_some() {
            lock.services.insert(s.name.value.to_string(), entry);
        }
    }
    let hosts = ips
        .into_iter()
        .zip(vmids)
        .map(|(ip, vmid)| {
            let (ip, io) = ip?;
            let (v, vo) = vmid?;
            Some((ip, io, VmId::new(i64::from(v)).ok()?, vo))
        })
        .collect();
    Allocated { hosts, lock }
}

/// Where one service's container goes.
struct Placed {
    node: String,
    origin: Origin,
    storage: String,
    template: String,
}

/// Each service's resources and health timing over the project's defaults, on several
/// threads. Their problems were reported when the manifest was decoded (by the same checks,
/// which do not depend on the defaults), so they are not reported again.
fn resolve(
    specs: &[ServiceSpec],
    defaults: &crate::model::Defaults,
) -> Vec<(Resources, HealthTiming)> {
    crate::par::map(specs, |s| {
        let mut scratch = Cx::new("", "");
        (
            manifest::spec_resources(&mut scratch, s, defaults.resources),
            s.health.timing(&mut scratch, defaults.health),
        )
    })
}

/// Places every service on a node (see `placement`), reporting pins to unknown nodes,
/// unsatisfiable spreads and a cluster without room at the service's manifest.
fn place_services(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    resolved: &[(Resources, HealthTiming)],
    cfg: &ProjectConfig,
    old: &Lock,
    cluster: &Cluster,
) -> Vec<Option<Placed>> {
    use crate::placement::{self, Want};
    let px = &cfg.proxmox;
    let (candidates, strict) = candidates(specs, px, old, cluster);
    let wants: Vec<Want> = specs
        .iter()
        .zip(resolved)
        .map(|(s, (r, _))| Want {
            name: s.name.value.as_str(),
            memory: u64::from(r.memory),
            cores: r.cores,
            pin: s.node.as_ref().map(|n| n.value.as_str()),
            locked: old
                .services
                .get(s.name.value.as_str())
                .map(|e| e.node.as_deref().unwrap_or(px.node.as_str())),
            spread: s.spread.as_ref().map(|g| g.value.as_str()),
        })
        .collect();
    let placement = placement::place(&candidates, &wants, strict, cluster.fresh);
    for problem in &placement.problems {
        report_placement(cxs, specs, px, &candidates, problem);
    }
    placement
        .nodes
        .iter()
        .map(|p| {
            let (n, origin) = (*p)?;
            let name = candidates[n].name.clone();
            let listed = px.nodes.iter().find(|k| k.name == name);
            Some(Placed {
                storage: listed.map_or_else(|| px.storage.clone(), |k| k.storage.clone()),
                template: listed.map_or_else(|| px.template.clone(), |k| k.template.clone()),
                node: name,
                origin,
            })
        })
        .collect()
}

/// The nodes a service may go on, and whether that list is the whole cluster (`strict`): the
/// nodes of `proxmox.nodes`, else those the PVE API reports, else `proxmox.node` with whatever
/// other node a pin or the lock names.
fn candidates(
    specs: &[ServiceSpec],
    px: &crate::model::Proxmox,
    old: &Lock,
    cluster: &Cluster,
) -> (Vec<crate::placement::Candidate>, bool) {
    use crate::placement::Candidate;
    let reported = |name: &str| {
        cluster
            .nodes
            .as_ref()
            .map(|ns| ns.iter().find(|n| n.name == name))
    };
    if !px.nodes.is_empty() {
        let mut c: Vec<Candidate> = px
            .nodes
            .iter()
            .map(|n| {
                let seen = reported(&n.name);
                Candidate {
                    name: n.name.clone(),
                    // A listed node the API does not report is as good as offline.
                    online: seen.map(|r| r.is_some_and(|r| r.online)).unwrap_or(true),
                    placeable: true,
                    memory: n.memory.or(seen.flatten().and_then(|r| r.memory)),
                    cores: n.cores.or(seen.flatten().and_then(|r| r.cores)),
                    weight: n.weight,
                }
            })
            .collect();
        c.dedup_by(|a, b| a.name == b.name);
        (c, true)
    } else if let Some(nodes) = cluster.nodes.as_ref().filter(|_| !px.node_given) {
        let mut c: Vec<Candidate> = nodes
            .iter()
            .map(|n| Candidate {
                name: n.name.clone(),
                online: n.online,
                placeable: true,
                // PVE overcommits containers' memory, so a node's RAM ranks it but does not
                // limit it; its core count does limit one container.
                memory: None,
                cores: n.cores,
                weight: n
                    .memory
                    .map_or(1, |m| u32::try_from((m / 8192).max(1)).unwrap_or(u32::MAX)),
            })
            .collect();
        c.sort_by(|a, b| a.name.cmp(&b.name));
        c.dedup_by(|a, b| a.name == b.name);
        (c, true)
    } else {
        // The one-node case: `proxmox.node`, and whatever other node a pin or the lock names
        // (taken on trust: nothing here can check it).
        let mut c = vec![Candidate {
            name: px.node.clone(),
            online: true,
            placeable: true,
            memory: None,
            cores: None,
            weight: 1,
        }];
        let named = specs.iter().flat_map(|s| {
            let locked = old
                .services
                .get(s.name.value.as_str())
                .and_then(|e| e.node.clone());
            // (An entry without a node means `proxmox.node`, a candidate already.)
            s.node
                .as_ref()
                .map(|n| n.value.clone())
                .into_iter()
                .chain(locked)
        });
        for name in named {
            if !c.iter().any(|k| k.name == name) {
                c.push(Candidate {
                    name,
                    online: true,
                    placeable: false,
                    memory: None,
                    cores: None,
                    weight: 1,
                });
            }
        }
        (c, false)
    }
}

/// Reports one placement problem at the service's manifest.
fn report_placement(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    px: &crate::model::Proxmox,
    candidates: &[crate::placement::Candidate],
    problem: &crate::placement::Problem,
) {
    use crate::placement::Problem;
    let known = || {
        candidates
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let source = if !px.nodes.is_empty() {
        "proxmox.nodes"
    } else {
        "the nodes the Proxmox API reports"
    };
    match problem {
        Problem::UnknownNode { service } => {
            let s = &specs[*service];
            let pin = s.node.as_ref().expect("only pins are unknown");
            let help = match did_you_mean(&pin.value, candidates.iter().map(|c| c.name.as_str())) {
                Some(m) => format!(
                    "did you mean `{m}`? the cluster's nodes ({source}): {}",
                    known()
                ),
                None => format!("the cluster's nodes ({source}): {}", known()),
            };
            cxs[s.file].error(
                pin.span,
                "host.node",
                format!(
                    "`{}` is pinned to node `{}`, which is not in the cluster",
                    s.name.value, pin.value
                ),
                Some(help),
            );
        }
        Problem::PinWithoutRoom { service, why } => {
            let s = &specs[*service];
            let pin = s.node.as_ref().expect("only pins are pinned");
            cxs[s.file].error(
                pin.span,
                "host.node",
                format!("node `{}` has no room for `{}`: {why}", pin.value, s.name.value),
                Some("pin it to another node, lower its host.resources, or raise the node's memory in proxmox.nodes".into()),
            );
        }
        Problem::Spread {
            service,
            other,
            node,
        } => {
            let s = &specs[*service];
            let group = s.spread.as_ref().expect("only spread services collide");
            cxs[s.file].error(
                group.span,
                "host.spread",
                format!(
                    "spread group `{}` cannot be satisfied: `{}` and `{}` are both pinned to node `{node}` while other nodes have none of the group",
                    group.value, specs[*other].name.value, s.name.value
                ),
                Some("pin one of them to another node, or remove a pin and let NixMox place it".into()),
            );
        }
        Problem::NoRoom { service, why } => {
            let s = &specs[*service];
            cxs[s.file].error(
                s.name.span,
                "host.node",
                format!(
                    "no node of the cluster has room for `{}`: {why}",
                    s.name.value
                ),
                Some(format!(
                    "add a node or memory to {source}, or lower host.resources"
                )),
            );
        }
    }
}

/// The model's services, moved out of their specs (nothing is copied).
fn build_services(
    specs: Vec<ServiceSpec>,
    hosts: Vec<Option<(Ipv4Addr, Origin, VmId, Origin)>>,
    placed: Vec<Option<Placed>>,
    resolved: Vec<(Resources, HealthTiming)>,
) -> Vec<Service> {
    // On one thread: spread over several, the services' allocations and the specs' frees
    // land in per-thread heaps, which cost `config` 10 MiB of peak memory for 5 ms
    // (docs/performance.md).
    specs
        .into_iter()
        .zip(hosts)
        .zip(placed)
        .zip(resolved)
        .filter_map(|(((s, host), placed), (resources, timing))| {
            let (ip, ip_origin, vmid, vmid_origin) = host?;
            let placed = placed?;
            let hostname = hostname_of(&s);
            let mut provides: Vec<crate::model::Provided> =
                s.provides.iter().map(|p| p.value).collect();
            provides.sort_by_key(|p| p.capability);
            let mut depends_on: Vec<_> = s
                .depends_on
                .iter()
                .filter_map(|d| crate::ids::ServiceName::new(&d.value).ok())
                .collect();
            depends_on.sort();
            depends_on.dedup();
            Some(Service {
                name: s.name.value,
                description: s.description,
                manifest: s.manifest,
                dir: s.dir,
                depends_on,
                provides,
                host: Host {
                    hostname,
                    ip,
                    vmid,
                    ip_origin,
                    vmid_origin,
                    node: placed.node,
                    node_origin: placed.origin,
                    spread: s.spread.map(|g| g.value),
                    storage: placed.storage,
                    template: placed.template,
                    resources,
                    onboot: s.onboot,
                    start: s.start,
                    unprivileged: s.unprivileged,
                    nesting: s.nesting,
                    ssh_host_key: s.ssh_host_key,
                    backup: s.backup,
                },
                nixos_modules: s.nixos_modules.into_iter().map(|m| m.value).collect(),
                dbs: s.dbs.into_iter().map(|d| d.value).collect(),
                proxies: s.proxies.into_iter().map(|p| p.value).collect(),
                auth: s.auth.map(|a| a.value),
                health: Health {
                    startup: s.health.startup.into_iter().map(|c| c.value).collect(),
                    liveness: s.health.liveness.into_iter().map(|c| c.value).collect(),
                    readiness: s.health.readiness.into_iter().map(|c| c.value).collect(),
                    timing,
                },
                terraform: s.terraform.into_iter().map(|t| t.value).collect(),
            })
        })
        .collect()
}

/// Explicit `depends_on` edges plus those the interface implies. Indexes are into `specs`,
/// which is sorted by name exactly like `Project::services`.
fn build_edges(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    domain: Option<&crate::ids::DomainName>,
) -> Vec<Edge> {
    let by_name: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.value.as_str(), i))
        .collect();
    // The first provider of each capability, found once rather than per consumer.
    let mut providers: HashMap<Capability, usize> = HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        for p in &s.provides {
            providers.entry(p.value.capability).or_insert(i);
        }
    }
    let provider = |cap: Capability| providers.get(&cap).copied();
    let mut edges = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        depends_on_edges(cxs, specs, &by_name, i, &mut edges);
        let implied = [
            (!s.dbs.is_empty(), Capability::Database, EdgeKind::Db),
            (
                !s.proxies.is_empty(),
                Capability::ReverseProxy,
                EdgeKind::Proxy,
            ),
            (s.auth.is_some(), Capability::Identity, EdgeKind::Auth),
            (true, Capability::Dns, EdgeKind::Dns),
        ];
        for (uses, cap, kind) in implied {
            if let (true, Some(j)) = (uses, provider(cap)) {
                if j != i {
                    edges.push(Edge {
                        from: i,
                        to: j,
                        kind,
                    });
                }
            }
        }
        if let (Some(h), Some(domain)) = (&s.db_host, domain) {
            check_db_host(cxs, specs, s, h, domain, provider(Capability::Database));
        }
    }
    edges.sort();
    edges.dedup();
    edges
}

/// The edges of service `i`'s `depends_on`, reporting itself and unknown services.
fn depends_on_edges(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    by_name: &HashMap<&str, usize>,
    i: usize,
    edges: &mut Vec<Edge>,
) {
    let s = &specs[i];
    for d in &s.depends_on {
        match by_name.get(d.value.as_str()) {
            Some(&j) if j == i => {
                cxs[s.file].error(
                    d.span,
                    "depends_on",
                    format!("`{}` depends on itself", s.name.value),
                    Some("remove it from its own `depends_on`".into()),
                );
            }
            Some(&j) => edges.push(Edge {
                from: i,
                to: j,
                kind: EdgeKind::DependsOn,
            }),
            None => {
                // Candidates in name order, not the map's (random) order, so that a tie
                // between equally close names is broken the same way on every run.
                let names = specs.iter().map(|s| s.name.value.as_str());
                let help = match did_you_mean(&d.value, names) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => "depends_on names other services of this project by their `name`"
                        .to_string(),
                };
                cxs[s.file].error(
                    d.span,
                    "depends_on",
                    format!(
                        "`{}` depends on `{}`, which is not a service of this project",
                        s.name.value, d.value
                    ),
                    Some(help),
                );
            }
        }
    }
}

/// The vision form names the database host by FQDN; it must be the provider's.
fn check_db_host(
    cxs: &mut [Cx],
    specs: &[ServiceSpec],
    s: &ServiceSpec,
    h: &Sp<String>,
    domain: &crate::ids::DomainName,
    provider: Option<usize>,
) {
    let matches = provider.is_some_and(|j| {
        format!("{}.{}", hostname_of(&specs[j]), domain) == h.value
            || hostname_of(&specs[j]).as_str() == h.value
    });
    if matches {
        return;
    }
    let help = match provider {
        Some(j) => format!(
            "the database provider is `{}` at {}.{}",
            specs[j].name.value,
            hostname_of(&specs[j]),
            domain
        ),
        None => "no service provides `database`".to_string(),
    };
    cxs[s.file].error(
        h.span,
        "requirements.database.host",
        format!("database host `{}` matches no database provider", h.value),
        Some(help),
    );
}

/// Cycles are judged on the step graph: a core service's `auth` edge is resolved by the phase
/// order (its OIDC client is created in `tf:auth-core` and its host redeployed after), so it is
/// left out; a core service that depends on a non-core one can never be ordered (all core
/// services deploy first) and is reported as such.
fn check_cycles(cxs: &mut [Cx], specs: &[ServiceSpec], edges: &[Edge]) {
    let is_core = |i: usize| !specs[i].provides.is_empty();
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); specs.len()];
    for e in edges {
        if is_core(e.from) && e.kind == EdgeKind::Auth {
            continue;
        }
        if is_core(e.from) && !is_core(e.to) {
            let s = &specs[e.from];
            let span = s
                .depends_on
                .iter()
                .find(|d| d.value == specs[e.to].name.value.as_str())
                .map(|d| d.span)
                .unwrap_or(s.name.span);
            cxs[s.file].error(span, "depends_on", format!("core service `{}` depends on `{}`, which is not a core service", s.name.value, specs[e.to].name.value), Some("core services (those with `provides`) deploy before all others; remove the dependency or make the other service depend on this one".into()));
            continue;
        }
        adj[e.from].push(e.to);
    }
    // Iterative DFS with colours; report each cycle once, from its smallest member.
    let mut colour = vec![0u8; specs.len()];
    let mut reported: HashSet<Vec<usize>> = HashSet::new();
    for start in 0..specs.len() {
        if colour[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        let mut path: Vec<usize> = vec![start];
        colour[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if *next < adj[node].len() {
                let to = adj[node][*next];
                *next += 1;
                match colour[to] {
                    0 => {
                        colour[to] = 1;
                        stack.push((to, 0));
                        path.push(to);
                    }
                    1 => {
                        let pos = path.iter().position(|&p| p == to).unwrap_or(0);
                        let mut cycle: Vec<usize> = path[pos..].to_vec();
                        let min = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, &v)| v)
                            .map(|(k, _)| k)
                            .unwrap_or(0);
                        cycle.rotate_left(min);
                        if reported.insert(cycle.clone()) {
                            report_cycle(cxs, specs, edges, &cycle);
                        }
                    }
                    _ => {}
                }
            } else {
                colour[node] = 2;
                stack.pop();
                path.pop();
            }
        }
    }
}

fn report_cycle(cxs: &mut [Cx], specs: &[ServiceSpec], edges: &[Edge], cycle: &[usize]) {
    let mut names: Vec<String> = Vec::new();
    for (k, &i) in cycle.iter().enumerate() {
        let next = cycle[(k + 1) % cycle.len()];
        let kind = edges
            .iter()
            .find(|e| e.from == i && e.to == next)
            .map(|e| e.kind.as_str())
            .unwrap_or("depends_on");
        names.push(format!("{} -({kind})->", specs[i].name.value));
    }
    names.push(specs[cycle[0]].name.value.to_string());
    let first = &specs[cycle[0]];
    let next = &specs[cycle[1 % cycle.len()]];
    let span = first
        .depends_on
        .iter()
        .find(|d| d.value == next.name.value.as_str())
        .map(|d| d.span)
        .unwrap_or(first.name.span);
    cxs[first.file].error(
        span,
        "depends_on",
        format!("dependency cycle: {}", names.join(" ")),
        Some("services deploy in dependency order, so a cycle can never start; remove one of these dependencies".into()),
    );
}

/// Groups diagnostics by file, for tests and reporters.
pub fn by_file(diags: &[Diagnostic]) -> BTreeMap<&str, Vec<&Diagnostic>> {
    let mut map: BTreeMap<&str, Vec<&Diagnostic>> = BTreeMap::new();
    for d in diags {
        map.entry(d.file.as_str()).or_default().push(d);
    }
    map
}
