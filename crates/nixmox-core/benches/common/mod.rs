//! The synthetic project shared by the `plan` and `render` benchmarks: the four core services
//! (dns, postgresql, caddy, authentik) plus apps, each with a database, one or two proxy routes
//! (some behind forward-auth), OIDC for a quarter of them, health checks of every kind and
//! `depends_on` on up to three earlier apps. Most apps take their ip and vmid from the wide
//! pools (10.0.0.0/8; vmid 1000-999999, ip 10.1.0.0-10.255.255.254), so allocation runs too.
//! Deterministic: the same size always gives the same project.

// Each benchmark uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use nixmox_core::{load, Diagnostic, Project, SourceFile, Sources};

pub const DOMAIN: &str = "bench.lan";

/// A small deterministic generator (SplitMix64), so every run benchmarks the same project.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A generated project: its files (project-relative path, text) and the paths that exist.
pub struct Generated {
    pub files: Vec<(String, String)>,
    pub existing: HashSet<String>,
}

fn config() -> String {
    format!(
        "project: bench
domain: {DOMAIN}
network:
  cidr: 10.0.0.0/8
  gateway: 10.0.0.1
  vlan: 10
  bridge: vmbr0
  nameservers: [10.0.0.10]
pools:
  vmid: 1000-999999
  ip: 10.1.0.0-10.255.255.254
proxmox:
  endpoint: https://pve.{DOMAIN}:8006
  node: pve
  storage: local-lvm
  template: local:vztmpl/nixos-26.05-x86_64-linux.tar.xz
  token: {{ env: PROXMOX_API_TOKEN }}
infra:
  backend: terraform
ssh:
  user: root
  authorized_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICuQjspG5gjBSzsjaKipmtipCl8QImE9el0sat+5iYHX admin@bench
nix:
  nixpkgs: github:NixOS/nixpkgs/nixos-26.05
  deployer: nixos-rebuild
defaults:
  resources: {{ cores: 1, memory: 1024, swap: 512, disk_gb: 8 }}
  health: {{ interval: 10s, timeout: 5s, retries: 3 }}
state:
  backend: sqlite
deploy:
  parallel: 4
"
    )
}

fn core_services() -> Vec<(&'static str, String)> {
    let health = |name: &str, unit: &str, check: &str| {
        format!(
            "  health:
    startup: systemctl is-active --quiet {unit}
    liveness: {{ tcp: \"{name}.{DOMAIN}:{check}\" }}
    readiness: [ {{ tcp: \"{name}.{DOMAIN}:{check}\" }} ]
    interval: 15s
"
        )
    };
    vec![
        (
            "dns",
            format!(
                "name: dns
description: Resolver and authoritative zone
provides:
  dns: {{ type: unbound }}
host:
  ip: 10.0.0.10
  vmid: 1000
  resources: {{ cores: 1, memory: 512, swap: 256, disk_gb: 4 }}
  onboot: true
nixos: {{ modules: [./configuration.nix] }}
interface:
{}",
                health("dns", "unbound", "53")
            ),
        ),
        (
            "postgresql",
            format!(
                "name: postgresql
description: Shared PostgreSQL server
provides:
  database: {{ type: postgresql }}
host:
  ip: 10.0.0.11
  vmid: 1001
  resources: {{ cores: 8, memory: 32768, swap: 4096, disk_gb: 512 }}
  onboot: true
nixos: {{ modules: [./configuration.nix] }}
interface:
{}",
                health("postgresql", "postgresql", "5432")
            ),
        ),
        (
            "caddy",
            format!(
                "name: caddy
description: Reverse proxy
provides:
  reverse_proxy: {{ type: caddy }}
host:
  ip: 10.0.0.12
  vmid: 1002
  resources: {{ cores: 4, memory: 4096, swap: 1024, disk_gb: 16 }}
  onboot: true
nixos: {{ modules: [./configuration.nix] }}
interface:
{}",
                health("caddy", "caddy", "443")
            ),
        ),
        (
            "authentik",
            format!(
                "name: authentik
description: Identity provider
provides:
  identity: {{ type: authentik }}
host:
  ip: 10.0.0.13
  vmid: 1003
  resources: {{ cores: 2, memory: 3072, swap: 1024, disk_gb: 16 }}
  onboot: true
  features: {{ nesting: true }}
nixos: {{ modules: [./configuration.nix] }}
interface:
  db:
    type: postgresql
    database: authentik
    role: authentik
    mode: native-migration
  proxy:
    domain: auth.{DOMAIN}
    upstream: 9000
    tls: true
{}",
                health("authentik", "podman-authentik-server", "9000")
            ),
        ),
    ]
}

/// One app: a database, one or two proxies (some behind forward-auth), OIDC for a quarter of
/// them, health checks of every kind, and `depends_on` on up to three earlier apps.
pub fn app(i: usize, rng: &mut Rng) -> String {
    let name = format!("app{i:05}");
    let mut s = String::with_capacity(1600);
    let _ = writeln!(s, "name: {name}");
    let _ = writeln!(s, "description: Synthetic application number {i}");
    if i > 0 {
        let mut deps: Vec<usize> = (0..rng.below(4))
            .map(|_| rng.below(i as u64) as usize)
            .collect();
        deps.sort_unstable();
        deps.dedup();
        if !deps.is_empty() {
            let deps: Vec<String> = deps.iter().map(|d| format!("app{d:05}")).collect();
            let _ = writeln!(s, "depends_on: [{}]", deps.join(", "));
        }
    }
    s.push_str("host:\n");
    if i.is_multiple_of(20) {
        // A few pin their address and vmid; the rest are allocated from the pools.
        let _ = writeln!(s, "  ip: 10.0.{}.{}", 1 + i / 200, 10 + i % 200);
        let _ = writeln!(s, "  vmid: {}", 500_000 + i);
    }
    let cores = 1 + rng.below(4);
    let memory = 512 << rng.below(4);
    let _ = writeln!(
        s,
        "  resources: {{ cores: {cores}, memory: {memory}, swap: 512, disk_gb: {} }}",
        8 + rng.below(56)
    );
    s.push_str("  onboot: true\n");
    s.push_str("nixos: { modules: [./configuration.nix] }\n");
    s.push_str("interface:\n");
    let _ = write!(
        s,
        "  db:
    type: postgresql
    database: {name}
    role: {name}
    mode: native-migration
"
    );
    let authz = rng.below(3) == 0;
    if i.is_multiple_of(3) {
        let _ = write!(
            s,
            "  proxy:
    - {{ domain: {name}.{DOMAIN}, upstream: 8080, tls: true, authz: {authz} }}
    - {{ domain: api-{name}.{DOMAIN}, path: /api, upstream: 8081, tls: true, headers: {{ X-Frame-Options: DENY }} }}
"
        );
    } else {
        let _ = write!(
            s,
            "  proxy:
    domain: {name}.{DOMAIN}
    upstream: 8080
    tls: true
    authz: {authz}
"
        );
    }
    if i.is_multiple_of(4) {
        let _ = write!(
            s,
            "  auth:
    provider: authentik
    oidc:
      client_id: {name}-oidc
      client_type: confidential
      redirect_uris: [https://{name}.{DOMAIN}/oauth2/callback]
      scopes: [openid, email, profile]
      username_claim: preferred_username
      groups_claim: groups
"
        );
    }
    let _ = write!(
        s,
        "  health:
    startup: systemctl is-active --quiet {name}
    liveness: http://{name}.{DOMAIN}:8080/healthz
    readiness:
      - {{ tcp: \"{name}.{DOMAIN}:8080\" }}
      - {{ http: \"https://{name}.{DOMAIN}/ready\", status: 200 }}
    interval: 30s
    timeout: 5s
    retries: 3
    start_period: 1m
"
    );
    s
}

/// A project of `total` services: the four core services and `total - 4` apps.
pub fn generate(total: usize) -> Generated {
    let mut rng = Rng(0x6E69_786D_6F78 ^ total as u64);
    let mut files = vec![("nixmox.yaml".to_string(), config())];
    let mut existing = HashSet::new();
    for (name, text) in core_services() {
        files.push((format!("services/{name}/manifest.yaml"), text));
        existing.insert(format!("services/{name}/configuration.nix"));
    }
    for i in 0..total - 4 {
        files.push((
            format!("services/app{i:05}/manifest.yaml"),
            app(i, &mut rng),
        ));
        existing.insert(format!("services/app{i:05}/configuration.nix"));
    }
    Generated { files, existing }
}

pub fn sources(p: &Generated) -> Sources {
    let mut it = p.files.iter().map(|(path, text)| SourceFile {
        path: path.clone(),
        bytes: text.as_bytes().to_vec(),
    });
    let config = it.next();
    Sources {
        config,
        manifests: it.collect(),
        lock: None,
    }
}

/// Generates a project of `total` services (`total >= 4`) and loads it, failing loudly when it
/// does not validate: timing a project that stops at its first error would measure nothing.
pub fn project(total: usize) -> (Generated, Project) {
    assert!(
        total >= 4,
        "a project needs at least the four core services"
    );
    let g = generate(total);
    let exists = |rel: &str| g.existing.contains(rel);
    let loaded = load(&sources(&g), &exists);
    let errors: Vec<&Diagnostic> = loaded.errors().collect();
    if !errors.is_empty() || loaded.project.is_none() {
        let shown: Vec<String> = errors.iter().take(10).map(|d| d.render()).collect();
        panic!(
            "the synthetic project of {total} services has {} errors, e.g.:\n{}",
            errors.len(),
            shown.join("\n")
        );
    }
    let project = loaded.project.expect("checked above");
    assert_eq!(project.services.len(), total);
    (g, project)
}

/// The sizes to measure: `NIXMOX_BENCH_SIZES=5000,10000` (comma-separated) overrides `default`.
pub fn sizes(default: &[usize]) -> Vec<usize> {
    match std::env::var("NIXMOX_BENCH_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("NIXMOX_BENCH_SIZES: comma-separated numbers >= 4")
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// Whether cargo ran the binary as a benchmark (`cargo bench`); `cargo test --all-targets`
/// runs it without `--bench`, and then only a smoke check should run.
pub fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The median and the fastest of several runs; the fastest is the least disturbed by whatever
/// else the machine is doing.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: Duration,
    pub best: Duration,
}

pub fn stats(mut xs: Vec<Duration>) -> Stats {
    assert!(!xs.is_empty());
    xs.sort();
    Stats {
        median: xs[xs.len() / 2],
        best: xs[0],
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us_per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

/// The machine, for the record: logical CPUs and the CPU model.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cpus} logical CPUs, {model}")
}
