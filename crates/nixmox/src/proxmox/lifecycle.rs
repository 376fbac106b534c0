//! Containers for `infra.backend: proxmox-api`: what each host should be (from the model),
//! what it is (from PVE), and the smallest set of writes that makes the one the other.
//!
//! - Only containers tagged with both `nixmox` and the project's name are NixMox's. Any other
//!   guest is never written to; one sitting on a vmid the project wants is an error.
//! - Missing containers are created (several at once, bounded), existing ones get a PUT of
//!   only the keys that differ, those that should run are started. A second run with nothing
//!   changed sends no write at all.
//! - Containers of the project that the manifests no longer mention are reported, never
//!   destroyed here: `remove_orphans` and `down` do that when asked.
//! - A change only re-creating a container could make (storage, `unprivileged`) fails that
//!   container, naming it and the key: converging never destroys one, whatever the flags.
//!   What a container takes only at creation (template, SSH keys) is never compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nixmox_core::plan::startup_order;
use nixmox_core::Project;
use serde_json::{Map, Value};

use super::client::{split_tags, Client, Guest};
use super::error::{CtError, PveError};

/// The role tags; one of them is NixMox's to change.
const ROLE_TAGS: [&str; 2] = ["core", "service"];

/// What one host's container should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub service: String,
    pub vmid: u32,
    pub node: String,
    pub hostname: String,
    /// Whether the container should be running.
    pub start: bool,
    pub ostemplate: String,
    pub cores: u32,
    /// MiB.
    pub memory: u32,
    /// MiB.
    pub swap: u32,
    pub storage: String,
    pub disk_gb: u32,
    pub unprivileged: bool,
    pub nesting: bool,
    pub onboot: bool,
    pub startup_order: u32,
    pub bridge: String,
    /// `address/prefix`.
    pub ip: String,
    pub gateway: String,
    pub vlan: Option<u16>,
    /// `nixmox`, the project, `core` or `service`: lowercase and sorted, as PVE stores them.
    pub tags: Vec<String>,
    pub ssh_keys: Vec<String>,
}

impl Desired {
    pub fn net0(&self) -> String {
        let mut s = format!(
            "name=eth0,bridge={},ip={},gw={}",
            self.bridge, self.ip, self.gateway
        );
        if let Some(tag) = self.vlan {
            s.push_str(&format!(",tag={tag}"));
        }
        s
    }

    /// The parameters of the create request (the vmid goes separately).
    pub fn create_params(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = vec![
            ("hostname".into(), self.hostname.clone()),
            ("ostemplate".into(), self.ostemplate.clone()),
            ("ostype".into(), "nixos".into()),
            ("net0".into(), self.net0()),
            (
                "rootfs".into(),
                format!("{}:{}", self.storage, self.disk_gb),
            ),
            ("cores".into(), self.cores.to_string()),
            ("memory".into(), self.memory.to_string()),
            ("swap".into(), self.swap.to_string()),
            ("unprivileged".into(), bit(self.unprivileged).into()),
            ("onboot".into(), bit(self.onboot).into()),
            ("startup".into(), format!("order={}", self.startup_order)),
            ("tags".into(), self.tags.join(";")),
        ];
        if self.nesting {
            p.push(("features".into(), "nesting=1".into()));
        }
        if !self.ssh_keys.is_empty() {
            p.push(("ssh-public-keys".into(), self.ssh_keys.join("\n")));
        }
        p
    }
}

fn bit(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// The tags that make a container the project's: `nixmox` and the project's name.
pub fn project_tags(project: &Project) -> [String; 2] {
    ["nixmox".into(), project.name.as_str().to_lowercase()]
}

/// Whether a guest's tags say it belongs to this project.
pub fn is_projects(tags: &[String], project: &Project) -> bool {
    project_tags(project).iter().all(|t| tags.contains(t))
}

/// Every host's desired container, in the project's service order.
pub fn desired(project: &Project) -> Vec<Desired> {
    let order = startup_order(project);
    let prefix = project.network.cidr.prefix();
    project
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let h = &s.host;
            let role = if s.is_core() { "core" } else { "service" };
            let mut tags: Vec<String> = project_tags(project).to_vec();
            tags.push(role.into());
            tags.sort();
            tags.dedup();
            Desired {
                service: s.name.to_string(),
                vmid: h.vmid.get(),
                node: h.node.clone(),
                hostname: h.hostname.to_string(),
                start: h.start,
                ostemplate: h.template.clone(),
                cores: h.resources.cores,
                memory: h.resources.memory,
                swap: h.resources.swap,
                storage: h.storage.clone(),
                disk_gb: h.resources.disk_gb,
                unprivileged: h.unprivileged,
                nesting: h.nesting,
                onboot: h.onboot,
                startup_order: order[i],
                bridge: project.network.bridge.clone(),
                ip: format!("{}/{prefix}", h.ip),
                gateway: project.network.gateway.to_string(),
                vlan: project.network.vlan,
                tags,
                ssh_keys: project.ssh.authorized_keys.clone(),
            }
        })
        .collect()
}

// ------------------------------------------------------------------------ diff

/// What must change in one container's config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Keys to set, with the full new value (merged with what PVE has, for property strings).
    pub set: Vec<(String, String)>,
    pub delete: Vec<String>,
    /// Grow the root volume to this size (`8G`).
    pub resize: Option<String>,
    /// Differences NixMox leaves alone, worded for the operator.
    pub notes: Vec<String>,
    /// Differences only re-creating the container would remove: the key and what differs.
    /// Converging refuses the container when there is any.
    pub recreate: Vec<(String, String)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.delete.is_empty()
            && self.resize.is_none()
            && self.recreate.is_empty()
    }
    /// The keys this diff changes.
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.set.iter().map(|(k, _)| k.clone()).collect();
        k.extend(self.delete.iter().cloned());
        if self.resize.is_some() {
            k.push("rootfs".into());
        }
        k.extend(self.recreate.iter().map(|(key, _)| key.clone()));
        k.sort();
        k.dedup();
        k
    }
}

/// A config value as text: numbers as digits, booleans as PVE's `1`/`0`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => bit(*b).into(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn truthy(s: &str) -> bool {
    matches!(s.trim(), "1" | "true" | "yes" | "on")
}

/// `a=1,b=2` (with an optional leading value without `=`, like a volume) as ordered pairs.
fn props(s: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut first = None;
    let mut out = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        match part.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None if i == 0 => first = Some(part.to_string()),
            None => out.push((part.to_string(), String::new())),
        }
    }
    (first, out)
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

/// `p` with `k` set to `v` (or removed for `None`), keeping the order of the others.
fn put(p: &mut Vec<(String, String)>, k: &str, v: Option<&str>) {
    match (p.iter().position(|(key, _)| key == k), v) {
        (Some(i), Some(v)) => p[i].1 = v.to_string(),
        (Some(i), None) => {
            p.remove(i);
        }
        (None, Some(v)) => p.push((k.to_string(), v.to_string())),
        (None, None) => {}
    }
}

fn join(first: Option<&str>, p: &[(String, String)]) -> String {
    let mut parts: Vec<String> = first.map(|f| vec![f.to_string()]).unwrap_or_default();
    parts.extend(p.iter().map(|(k, v)| format!("{k}={v}")));
    parts.join(",")
}

/// A size like `8G`, `512M` or `1T` in bytes (a bare number is bytes).
fn size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        'B' => 1u64,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

/// The writes that make `cfg` (as PVE shows it) what `d` wants.
pub fn diff(d: &Desired, cfg: &Map<String, Value>) -> Diff {
    let mut out = Diff::default();
    let cur = |k: &str| cfg.get(k).map(text);
    let scalar = |out: &mut Diff, k: &str, want: String| {
        if cur(k).as_deref() != Some(want.as_str()) {
            out.set.push((k.to_string(), want));
        }
    };
    scalar(&mut out, "hostname", d.hostname.clone());
    scalar(&mut out, "ostype", "nixos".into());
    scalar(&mut out, "cores", d.cores.to_string());
    scalar(&mut out, "memory", d.memory.to_string());
    scalar(&mut out, "swap", d.swap.to_string());
    if cur("onboot").is_some_and(|v| truthy(&v)) != d.onboot {
        out.set.push(("onboot".into(), bit(d.onboot).into()));
    }
    diff_properties(&mut out, d, &cur);
    diff_tags(&mut out, d, &cur("tags").unwrap_or_default());
    if cur("unprivileged").is_some_and(|v| truthy(&v)) != d.unprivileged {
        out.recreate.push((
            "unprivileged".into(),
            format!(
                "it is {}privileged, the project wants it {}privileged",
                if d.unprivileged { "" } else { "un" },
                if d.unprivileged { "un" } else { "" },
            ),
        ));
    }
    diff_rootfs(&mut out, d, &cur("rootfs").unwrap_or_default());
    out
}

/// The property strings (`net0`, `startup`, `features`): only the properties NixMox sets are
/// compared, and a changed string keeps every other property as PVE has it.
fn diff_properties(out: &mut Diff, d: &Desired, cur: &dyn Fn(&str) -> Option<String>) {
    // net0: compare what NixMox sets; keep the MAC address and the rest.
    let (_, mut net) = props(&cur("net0").unwrap_or_default());
    let vlan = d.vlan.map(|v| v.to_string());
    let want_net = [
        ("name", Some("eth0".to_string())),
        ("bridge", Some(d.bridge.clone())),
        ("ip", Some(d.ip.clone())),
        ("gw", Some(d.gateway.clone())),
        ("tag", vlan),
    ];
    if want_net.iter().any(|(k, v)| get(&net, k) != v.as_deref()) {
        for (k, v) in &want_net {
            put(&mut net, k, v.as_deref());
        }
        // `name` first, as PVE writes it.
        net.sort_by_key(|(k, _)| k != "name");
        out.set.push(("net0".into(), join(None, &net)));
    }

    // startup: the order is NixMox's; up/down delays are left as they are.
    let (_, mut startup) = props(&cur("startup").unwrap_or_default());
    let order = d.startup_order.to_string();
    if get(&startup, "order") != Some(order.as_str()) {
        put(&mut startup, "order", Some(&order));
        out.set.push(("startup".into(), join(None, &startup)));
    }

    // features: only `nesting` is NixMox's.
    let (_, mut features) = props(&cur("features").unwrap_or_default());
    if get(&features, "nesting").is_some_and(truthy) != d.nesting {
        put(&mut features, "nesting", d.nesting.then_some("1"));
        if features.is_empty() {
            out.delete.push("features".into());
        } else {
            out.set.push(("features".into(), join(None, &features)));
        }
    }
}

/// tags: NixMox's own tags (the role may change); anyone else's stay.
fn diff_tags(out: &mut Diff, d: &Desired, current: &str) {
    let have: BTreeSet<String> = split_tags(current).into_iter().collect();
    let mut want: BTreeSet<String> = have
        .iter()
        .filter(|t| !ROLE_TAGS.contains(&t.as_str()))
        .cloned()
        .collect();
    want.extend(d.tags.iter().cloned());
    if want != have {
        out.set.push((
            "tags".into(),
            want.into_iter().collect::<Vec<_>>().join(";"),
        ));
    }
}

/// rootfs: another storage only re-creating could change; a smaller volume is grown, a larger
/// one left (volumes are never shrunk) with a note.
fn diff_rootfs(out: &mut Diff, d: &Desired, current: &str) {
    let (volume, rootfs) = props(current);
    let Some(volume) = volume else { return };
    let storage = volume.split(':').next().unwrap_or_default();
    if storage != d.storage {
        out.recreate.push((
            "rootfs".into(),
            format!(
                "its root volume is on storage `{storage}`, the project says `{}` (NixMox does not move volumes; `pct move-volume` does)",
                d.storage
            ),
        ));
    }
    let want = u64::from(d.disk_gb) << 30;
    match get(&rootfs, "size").and_then(size_bytes) {
        Some(have) if have < want => out.resize = Some(format!("{}G", d.disk_gb)),
        Some(have) if have > want => out.notes.push(format!(
            "CT {} (`{}`) has a larger root volume ({}) than the project's {} GiB: volumes are never shrunk",
            d.vmid,
            d.hostname,
            get(&rootfs, "size").unwrap_or_default(),
            d.disk_gb
        )),
        _ => {}
    }
}

// ------------------------------------------------------------------- converge

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub created: Vec<u32>,
    /// vmid → (from, to): containers migrated to the node the project places them on.
    pub migrated: BTreeMap<u32, (String, String)>,
    /// vmid → the keys changed.
    pub updated: BTreeMap<u32, Vec<String>>,
    pub started: Vec<u32>,
    /// vmid → changed keys that wait for the container's next restart.
    pub restart_needed: BTreeMap<u32, Vec<String>>,
    /// Differences left alone, and other things the operator should know.
    pub notes: Vec<String>,
    /// The project's containers that no host of the project is any more.
    pub orphans: Vec<Guest>,
    pub destroyed: Vec<u32>,
    /// Write requests sent, retries included.
    pub writes: usize,
}

impl Report {
    /// Adds what one host's run did.
    fn add(&mut self, d: &Desired, done: HostDone) {
        if done.created {
            self.created.push(d.vmid);
        }
        if let Some(from) = done.migrated {
            self.migrated.insert(d.vmid, (from, d.node.clone()));
        }
        if !done.updated.is_empty() {
            self.updated.insert(d.vmid, done.updated);
        }
        if done.started {
            self.started.push(d.vmid);
        }
        if !done.restart.is_empty() {
            self.restart_needed.insert(d.vmid, done.restart);
        }
        self.notes.extend(done.notes);
    }

    /// One line for the step's result.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "created {}, updated {}, started {}",
            self.created.len(),
            self.updated.len(),
            self.started.len()
        );
        if !self.migrated.is_empty() {
            let list: Vec<String> = self
                .migrated
                .iter()
                .map(|(vmid, (from, to))| format!("CT {vmid} {from} → {to}"))
                .collect();
            s.push_str(&format!(
                ", migrated {} ({})",
                self.migrated.len(),
                list.join(", ")
            ));
        }
        if !self.destroyed.is_empty() {
            s.push_str(&format!(", destroyed {}", self.destroyed.len()));
        }
        if !self.restart_needed.is_empty() {
            let list: Vec<String> = self
                .restart_needed
                .iter()
                .map(|(vmid, keys)| format!("CT {vmid} ({})", keys.join(", ")))
                .collect();
            s.push_str(&format!(
                "; changes waiting for a restart: {}",
                list.join("; ")
            ));
        }
        if !self.orphans.is_empty() {
            let list: Vec<String> = self
                .orphans
                .iter()
                .map(|g| format!("CT {} (`{}`)", g.vmid, g.name))
                .collect();
            s.push_str(&format!(
                "; {} no longer in the project, left alone: {} (remove with `nixmox down` or `up --remove-orphans`)",
                if self.orphans.len() == 1 { "1 container is" } else { "containers are" },
                list.join(", ")
            ));
        }
        s
    }
}

/// A run that did not reach the desired state: what failed, and what was done all the same.
#[derive(Debug)]
pub struct LifecycleError {
    /// What was done all the same (boxed: errors stay small).
    pub report: Box<Report>,
    pub failures: Vec<String>,
    /// Every failure was a connection problem (worth running the step again).
    pub transient: bool,
}

impl fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.failures.len() == 1 {
            write!(f, "{}", self.failures[0])?;
        } else {
            write!(
                f,
                "{} failures: {}",
                self.failures.len(),
                self.failures.join("; ")
            )?;
        }
        let r = &self.report;
        if !(r.created.is_empty()
            && r.migrated.is_empty()
            && r.updated.is_empty()
            && r.started.is_empty()
            && r.destroyed.is_empty())
        {
            write!(f, " (done before that: {})", r.summary())?;
        }
        Ok(())
    }
}

impl std::error::Error for LifecycleError {}

/// The failures' messages; containers that failed the same way on the same node (a lost
/// quorum fails every create) share one message.
fn grouped(errors: Vec<CtError>) -> Vec<String> {
    let mut groups: Vec<(String, String, String, Vec<CtError>)> = Vec::new();
    for e in errors {
        let key = (e.action.clone(), e.node.clone(), e.error.to_string());
        match groups
            .iter_mut()
            .find(|(a, n, m, _)| (a, n, m) == (&key.0, &key.1, &key.2))
        {
            Some(g) => g.3.push(e),
            None => groups.push((key.0, key.1, key.2, vec![e])),
        }
    }
    groups
        .into_iter()
        .map(|(action, node, message, mut cts)| {
            if cts.len() == 1 {
                return cts.remove(0).to_string();
            }
            cts.sort_by_key(|c| c.vmid);
            let list: Vec<String> = cts
                .iter()
                .map(|c| format!("CT {} `{}`", c.vmid, c.hostname))
                .collect();
            format!(
                "{action} failed for {} containers on node {node} ({}): {message}",
                cts.len(),
                list.join(", ")
            )
        })
        .collect()
}

fn is_connection(e: &PveError) -> bool {
    matches!(e.root(), PveError::Connect { .. })
}

/// Runs `f` over `items` on at most `parallel` threads; results in the items' order.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let workers = parallel.max(1).min(items.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .ok()
                .flatten()
                .expect("every item was handled by a worker")
        })
        .collect()
}

/// A failure's message, and whether it was a connection problem (worth running again).
type Failure = (String, bool);

enum Job {
    Create,
    Existing { node: String, status: String },
}

#[derive(Default)]
struct HostDone {
    created: bool,
    /// Migrated from this node.
    migrated: Option<String>,
    updated: Vec<String>,
    started: bool,
    restart: Vec<String>,
    notes: Vec<String>,
}

fn ct_error(d: &Desired, node: &str, action: &str, error: PveError) -> Box<CtError> {
    Box::new(CtError {
        vmid: d.vmid,
        hostname: d.hostname.clone(),
        node: node.to_string(),
        action: action.into(),
        error,
    })
}

/// Why a container is left as it is when only re-creating it would converge it.
fn recreate_refusal(d: &Desired, change: &Diff) -> PveError {
    let keys: Vec<&str> = change.recreate.iter().map(|(k, _)| k.as_str()).collect();
    let what: Vec<&str> = change.recreate.iter().map(|(_, w)| w.as_str()).collect();
    PveError::Config(format!(
        "changing {} needs the container re-created ({}), and NixMox never destroys a container \
         to converge, not even with --allow-destroy (through the API its data cannot be kept); \
         nothing was changed: put the manifest back, or re-create it yourself with \
         `nixmox down {svc}` then `nixmox up {svc}` (its data is lost)",
        keys.join(", "),
        what.join("; "),
        svc = d.service,
    ))
}

fn run_host(
    client: &Client,
    project: &Project,
    d: &Desired,
    job: &Job,
) -> Result<HostDone, Box<CtError>> {
    let mut done = HostDone::default();
    let (node, status) = match job {
        Job::Create => {
            let ours = |cfg: &Map<String, Value>| {
                is_projects(
                    &split_tags(&cfg.get("tags").map(text).unwrap_or_default()),
                    project,
                )
            };
            client
                .create_ct(&d.node, d.vmid, &d.create_params(), &ours)
                .map_err(|e| ct_error(d, &d.node, "create", e))?;
            done.created = true;
            (d.node.clone(), "stopped".to_string())
        }
        Job::Existing { node, status } => {
            // Placed elsewhere: migrated, never re-created (restart mode when it runs). A
            // refusal leaves it where it was, and the step fails naming both nodes.
            let node = &if node != &d.node {
                client
                    .migrate_ct(node, d.vmid, &d.node, status == "running")
                    .map_err(|e| ct_error(d, node, &format!("migrate to node {}", d.node), e))?;
                done.migrated = Some(node.clone());
                d.node.clone()
            } else {
                node.clone()
            };
            let cfg = client
                .ct_config(node, d.vmid)
                .map_err(|e| ct_error(d, node, "read config", e))?
                .ok_or_else(|| {
                    ct_error(
                        d,
                        node,
                        "read config",
                        PveError::Config(
                            "the container disappeared while NixMox was looking at it; run again"
                                .into(),
                        ),
                    )
                })?;
            let change = diff(d, &cfg);
            if !change.recreate.is_empty() {
                return Err(ct_error(d, node, "refused", recreate_refusal(d, &change)));
            }
            done.notes.extend(change.notes.iter().cloned());
            if !change.set.is_empty() || !change.delete.is_empty() {
                client
                    .update_ct(node, d.vmid, &change.set, &change.delete)
                    .map_err(|e| ct_error(d, node, "update config", e))?;
            }
            if let Some(size) = &change.resize {
                client
                    .resize_ct(node, d.vmid, "rootfs", size)
                    .map_err(|e| ct_error(d, node, "grow the root volume", e))?;
            }
            done.updated = change.keys();
            if !change.is_empty() && status == "running" {
                let pending = client
                    .ct_pending_keys(node, d.vmid)
                    .map_err(|e| ct_error(d, node, "read pending changes", e))?;
                done.restart = pending
                    .into_iter()
                    .filter(|k| done.updated.contains(k))
                    .collect();
            }
            (node.clone(), status.clone())
        }
    };
    if d.start && status != "running" {
        client
            .start_ct(&node, d.vmid)
            .map_err(|e| ct_error(d, &node, "start", e))?;
        done.started = true;
    }
    Ok(done)
}

/// Makes the project's containers what the model says. Never touches a guest without the
/// project's tags; never destroys anything.
pub fn converge(
    client: &Client,
    project: &Project,
    parallel: usize,
) -> Result<Report, LifecycleError> {
    let writes_before = client.writes();
    let guests = client.guests().map_err(|e| LifecycleError {
        transient: is_connection(&e),
        failures: vec![e.to_string()],
        report: Box::default(),
    })?;
    let wanted = desired(project);
    let mut report = Report::default();
    let (jobs, mut failures) = jobs_for(&wanted, &guests, project);
    let (jobs, mut ct_failures) = cut_off_offline(client, jobs);
    let results = parallel_map(&jobs, parallel, |(d, job)| {
        run_host(client, project, d, job)
    });
    for ((d, _), r) in jobs.iter().zip(results) {
        match r {
            Ok(done) => report.add(d, done),
            Err(e) => ct_failures.push(*e),
        }
    }
    let all_connection = ct_failures.iter().all(|e| is_connection(&e.error));
    failures.extend(
        grouped(ct_failures)
            .into_iter()
            .map(|m| (m, all_connection)),
    );
    let wanted_ids: BTreeSet<u32> = wanted.iter().map(|d| d.vmid).collect();
    report.orphans = guests
        .into_iter()
        .filter(|g| {
            g.kind == "lxc" && is_projects(&g.tags, project) && !wanted_ids.contains(&g.vmid)
        })
        .collect();
    report.writes = client.writes() - writes_before;
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(LifecycleError {
            transient: failures.iter().all(|(_, t)| *t),
            failures: failures.into_iter().map(|(m, _)| m).collect(),
            report: Box::new(report),
        })
    }
}

/// Each desired container's job (create it, or converge the project's container on its
/// vmid), and the refusals (message, transient) of vmids another guest holds.
fn jobs_for(
    wanted: &[Desired],
    guests: &[Guest],
    project: &Project,
) -> (Vec<(Desired, Job)>, Vec<Failure>) {
    let mut failures: Vec<Failure> = Vec::new();
    let mut jobs: Vec<(Desired, Job)> = Vec::new();
    for d in wanted {
        match guests.iter().find(|g| g.vmid == d.vmid) {
            None => jobs.push((d.clone(), Job::Create)),
            Some(g) if g.kind != "lxc" => failures.push((
                format!(
                    "vmid {} of `{}` is taken by the VM `{}` on node {}: NixMox never touches guests it did not create; choose another host.vmid",
                    d.vmid, d.service, g.name, g.node
                ),
                false,
            )),
            Some(g) if !is_projects(&g.tags, project) => failures.push((
                format!(
                    "vmid {} of `{}` is taken by CT {} (`{}`) on node {}, which is not tagged `nixmox` and `{}`: NixMox never touches containers it did not create; free the vmid or choose another host.vmid",
                    d.vmid, d.service, g.vmid, g.name, g.node, project.name
                ),
                false,
            )),
            Some(g) => jobs.push((
                d.clone(),
                Job::Existing {
                    node: g.node.clone(),
                    status: g.status.clone(),
                },
            )),
        }
    }
    (jobs, failures)
}

/// The jobs whose nodes PVE does not report offline, and a failure for each of the others:
/// their containers can be neither reached nor created there. (An unanswered `/nodes` is not
/// a verdict: the writes will say what is wrong.)
fn cut_off_offline(
    client: &Client,
    jobs: Vec<(Desired, Job)>,
) -> (Vec<(Desired, Job)>, Vec<CtError>) {
    let offline: BTreeSet<String> = client
        .nodes()
        .map(|ns| {
            ns.into_iter()
                .filter(|n| !n.online)
                .map(|n| n.name)
                .collect()
        })
        .unwrap_or_default();
    let (jobs, cut_off): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(d, job)| {
        let here = match job {
            Job::Create => &d.node,
            Job::Existing { node, .. } => node,
        };
        !offline.contains(here) && !offline.contains(&d.node)
    });
    let failures = cut_off
        .iter()
        .map(|(d, job)| {
            let node = match job {
                Job::Existing { node, .. } if offline.contains(node) => node,
                _ => &d.node,
            };
            *ct_error(
                d,
                node,
                "reach its node",
                PveError::Config(format!(
                    "node {node} is offline (PVE reports it so): `{}` waits until it is back, or pin it elsewhere with host.node",
                    d.service
                )),
            )
        })
        .collect();
    (jobs, failures)
}

fn destroy(
    client: &Client,
    project: &Project,
    parallel: usize,
    pick: impl Fn(&Guest) -> bool,
) -> Result<Report, LifecycleError> {
    let writes_before = client.writes();
    let guests = client.guests().map_err(|e| LifecycleError {
        transient: is_connection(&e),
        failures: vec![e.to_string()],
        report: Box::default(),
    })?;
    let doomed: Vec<Guest> = guests
        .into_iter()
        .filter(|g| g.kind == "lxc" && is_projects(&g.tags, project) && pick(g))
        .collect();
    let results = parallel_map(&doomed, parallel, |g| {
        client.destroy_ct(&g.node, g.vmid).map_err(|e| {
            Box::new(CtError {
                vmid: g.vmid,
                hostname: g.name.clone(),
                node: g.node.clone(),
                action: "destroy".into(),
                error: e,
            })
        })
    });
    let mut report = Report::default();
    let mut errors = Vec::new();
    for (g, r) in doomed.iter().zip(results) {
        match r {
            Ok(()) => report.destroyed.push(g.vmid),
            Err(e) => errors.push(*e),
        }
    }
    report.writes = client.writes() - writes_before;
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(LifecycleError {
            report: Box::new(report),
            transient: errors.iter().all(|e| is_connection(&e.error)),
            failures: grouped(errors),
        })
    }
}

/// Destroys the project's containers that no host of the project is any more
/// (`up --remove-orphans`).
pub fn remove_orphans(
    client: &Client,
    project: &Project,
    parallel: usize,
) -> Result<Report, LifecycleError> {
    let wanted: BTreeSet<u32> = desired(project).iter().map(|d| d.vmid).collect();
    destroy(client, project, parallel, |g| !wanted.contains(&g.vmid))
}

/// Destroys every container of the project (`down`), and only those.
pub fn down(client: &Client, project: &Project, parallel: usize) -> Result<Report, LifecycleError> {
    destroy(client, project, parallel, |_| true)
}

/// The project's containers `remove_orphans` would destroy, without destroying them: what
/// `up --remove-orphans` lists for confirmation.
pub fn orphans(client: &Client, project: &Project) -> Result<Vec<Guest>, PveError> {
    let wanted: BTreeSet<u32> = desired(project).iter().map(|d| d.vmid).collect();
    Ok(client
        .guests()?
        .into_iter()
        .filter(|g| g.kind == "lxc" && is_projects(&g.tags, project) && !wanted.contains(&g.vmid))
        .collect())
}

/// Destroys the project's containers whose vmid is in `vmids` (the ones an operator confirmed),
/// and only those: a listed vmid whose container is gone, or no longer the project's, is left.
pub fn destroy_listed(
    client: &Client,
    project: &Project,
    parallel: usize,
    vmids: &BTreeSet<u32>,
) -> Result<Report, LifecycleError> {
    destroy(client, project, parallel, |g| vmids.contains(&g.vmid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn want() -> Desired {
        Desired {
            service: "dns".into(),
            vmid: 901,
            node: "pve1".into(),
            hostname: "dns".into(),
            start: true,
            ostemplate: "local:vztmpl/nixos.tar.xz".into(),
            cores: 1,
            memory: 1024,
            swap: 512,
            storage: "local-lvm".into(),
            disk_gb: 8,
            unprivileged: true,
            nesting: true,
            onboot: true,
            startup_order: 1,
            bridge: "vmbr0".into(),
            ip: "192.168.99.10/24".into(),
            gateway: "192.168.99.1".into(),
            vlan: Some(99),
            tags: vec!["core".into(), "homelab".into(), "nixmox".into()],
            ssh_keys: vec!["ssh-ed25519 AAAA admin".into()],
        }
    }

    /// The config PVE shows after creating `want()`.
    fn as_created() -> Map<String, Value> {
        json!({
            "hostname": "dns", "ostype": "nixos", "arch": "amd64", "cores": 1, "memory": 1024,
            "swap": 512, "onboot": 1, "startup": "order=1", "unprivileged": 1,
            "features": "nesting=1", "tags": "core;homelab;nixmox",
            "net0": "name=eth0,bridge=vmbr0,gw=192.168.99.1,hwaddr=BC:24:11:AA:BB:CC,ip=192.168.99.10/24,tag=99,type=veth",
            "rootfs": "local-lvm:vm-901-disk-0,size=8G", "digest": "abc"
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn nothing_to_do_for_a_container_as_created() {
        assert_eq!(diff(&want(), &as_created()), Diff::default());
    }

    #[test]
    fn only_the_differing_key_is_written() {
        let mut d = want();
        d.memory = 2048;
        let change = diff(&d, &as_created());
        assert_eq!(change.set, vec![("memory".to_string(), "2048".to_string())]);
        assert!(change.delete.is_empty() && change.resize.is_none());
    }

    #[test]
    fn property_strings_keep_what_nixmox_does_not_own() {
        let mut cfg = as_created();
        cfg.insert("startup".into(), json!("order=3,up=30"));
        cfg.insert("features".into(), json!("keyctl=1,nesting=1"));
        cfg.insert("tags".into(), json!("backup;homelab;nixmox;service"));
        let mut d = want();
        d.vlan = None;
        d.nesting = false;
        let change = diff(&d, &cfg);
        let set: BTreeMap<String, String> = change.set.into_iter().collect();
        assert_eq!(
            set["net0"],
            "name=eth0,bridge=vmbr0,gw=192.168.99.1,hwaddr=BC:24:11:AA:BB:CC,ip=192.168.99.10/24,type=veth"
        );
        assert_eq!(set["startup"], "order=1,up=30");
        assert_eq!(set["features"], "keyctl=1");
        assert_eq!(set["tags"], "backup;core;homelab;nixmox");
    }

    #[test]
    fn fixed_things_need_re_creation_and_disks_only_grow() {
        let mut cfg = as_created();
        cfg.insert("unprivileged".into(), json!(0));
        cfg.insert(
            "rootfs".into(),
            json!("local-zfs:subvol-901-disk-0,size=4G"),
        );
        let change = diff(&want(), &cfg);
        assert_eq!(change.resize.as_deref(), Some("8G"));
        let keys: Vec<&str> = change.recreate.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["unprivileged", "rootfs"], "{:?}", change.recreate);
        assert!(change.notes.is_empty(), "{:?}", change.notes);
        cfg.insert("rootfs".into(), json!("local-lvm:vm-901-disk-0,size=16G"));
        let change = diff(&want(), &cfg);
        assert!(change.resize.is_none());
        assert!(change.notes.iter().any(|n| n.contains("never shrunk")));
    }

    #[test]
    fn create_parameters() {
        let p: BTreeMap<String, String> = want().create_params().into_iter().collect();
        assert_eq!(
            p["net0"],
            "name=eth0,bridge=vmbr0,ip=192.168.99.10/24,gw=192.168.99.1,tag=99"
        );
        assert_eq!(p["rootfs"], "local-lvm:8");
        assert_eq!(p["tags"], "core;homelab;nixmox");
        assert_eq!(p["features"], "nesting=1");
        assert_eq!(p["startup"], "order=1");
        assert_eq!(p["ostype"], "nixos");
    }

    #[test]
    fn sizes() {
        assert_eq!(size_bytes("8G"), Some(8 << 30));
        assert_eq!(size_bytes("512M"), Some(512 << 20));
        assert_eq!(size_bytes("1.5T"), Some(3 << 39));
        assert_eq!(size_bytes("100"), Some(100));
        assert_eq!(size_bytes("x"), None);
    }

    #[test]
    fn parallel_map_keeps_order_and_bounds_threads() {
        let live = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = parallel_map(&(0..20).collect::<Vec<u32>>(), 3, |i| {
            let now = live.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(2));
            live.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, (0..20).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }
}
