//! Parse + validate benchmark (a plain `harness = false` binary, no criterion).
//!
//! Generates synthetic projects of 100, 1,000 and 5,000 services (the four core services plus
//! apps with databases, proxies, OIDC, health checks and `depends_on` edges; most without an
//! explicit ip/vmid, so allocation runs too) and measures:
//!
//! - `nixmox_core::load` on the in-memory files (median of several runs), and how much of that
//!   is YAML parsing alone;
//! - `target/release/nixmox -C DIR validate` on the same project written to a temporary
//!   directory (build it first: `cargo build --release -p nixmox`).
//!
//! Run: `cargo bench -p nixmox-core --bench load` (`NIXMOX_BENCH_SIZES=5000,10000` for other
//! sizes; `NIXMOX_BENCH_KEEP=1` keeps the generated projects in the temporary directory, e.g. to
//! profile the binary on them). Without `--bench` (as under
//! `cargo test --all-targets`) it only checks that a small project loads cleanly.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nixmox_core::syntax::{self, Format};
use nixmox_core::{load, Diagnostic, SourceFile, Sources};

const SIZES: [usize; 3] = [100, 1_000, 5_000];
const DOMAIN: &str = "bench.lan";

/// A small deterministic generator (SplitMix64), so every run benchmarks the same project.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A generated project: its files (project-relative path, text) and the paths that exist.
struct Project {
    files: Vec<(String, String)>,
    existing: HashSet<String>,
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
  template: local:vztmpl/nixos-25.05-x86_64-linux.tar.xz
  token: {{ env: PROXMOX_API_TOKEN }}
infra:
  backend: terraform
ssh:
  user: root
  authorized_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICuQjspG5gjBSzsjaKipmtipCl8QImE9el0sat+5iYHX admin@bench
nix:
  nixpkgs: github:NixOS/nixpkgs/nixos-25.05
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
fn app(i: usize, rng: &mut Rng) -> String {
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
fn generate(total: usize) -> Project {
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
    Project { files, existing }
}

fn sources(p: &Project) -> Sources {
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

/// The median and the fastest of several runs; the fastest is the least disturbed by whatever
/// else the machine is doing.
#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    best: Duration,
}

fn stats(mut xs: Vec<Duration>) -> Stats {
    xs.sort();
    Stats {
        median: xs[xs.len() / 2],
        best: xs[0],
    }
}

/// Loads the project and fails loudly if it does not validate: timing a project that stops at
/// its first error would measure nothing useful.
fn check_clean(n: usize, p: &Project) {
    let exists = |rel: &str| p.existing.contains(rel);
    let loaded = load(&sources(p), &exists);
    let errors: Vec<&Diagnostic> = loaded.errors().collect();
    if !errors.is_empty() || loaded.project.is_none() {
        let shown: Vec<String> = errors.iter().take(10).map(|d| d.render()).collect();
        panic!(
            "the synthetic project of {n} services has {} errors, e.g.:\n{}",
            errors.len(),
            shown.join("\n")
        );
    }
    assert_eq!(loaded.project.as_ref().map(|p| p.services.len()), Some(n));
}

/// Wall time of `load` (including building `Sources`, as the shell does).
fn time_load(p: &Project, runs: usize) -> Stats {
    let exists = |rel: &str| p.existing.contains(rel);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let loaded = load(&sources(p), &exists);
        std::hint::black_box(&loaded);
        times.push(t.elapsed());
    }
    stats(times)
}

/// Wall time of parsing every file to a syntax tree, without any validation.
fn time_parse(p: &Project, runs: usize) -> Stats {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        for (path, text) in &p.files {
            let node = syntax::parse(text, Format::from_path(path));
            std::hint::black_box(&node);
        }
        times.push(t.elapsed());
    }
    stats(times)
}

fn write_project(dir: &Path, p: &Project) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("removing an old benchmark project");
    }
    for (path, text) in &p.files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).expect("creating a service directory");
        std::fs::write(&file, text).expect("writing a manifest");
    }
    for path in &p.existing {
        std::fs::write(dir.join(path), "{ ... }: { }\n").expect("writing a module");
    }
}

fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/nixmox")
}

/// Wall time of `nixmox -C DIR validate`; an error when it could not run or failed.
fn time_binary(dir: &Path, runs: usize) -> Result<Stats, String> {
    let bin = binary();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = Command::new(&bin)
            .arg("-C")
            .arg(dir)
            .arg("validate")
            .output()
            .map_err(|e| format!("running {}: {e}", bin.display()))?;
        times.push(t.elapsed());
        if !out.status.success() {
            return Err(format!(
                "`nixmox -C {} validate` exited with {}:\n{}{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(stats(times))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us_per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching {
        // `cargo test --all-targets` runs this binary too: only check the generator.
        let p = generate(SIZES[0]);
        check_clean(SIZES[0], &p);
        println!("bench load: smoke check passed (run `cargo bench -p nixmox-core --bench load` to measure)");
        return;
    }

    let bin = binary();
    let have_bin = bin.is_file();
    if !have_bin {
        eprintln!(
            "note: {} is missing, so the binary is not measured; build it first with `cargo build --release -p nixmox`",
            bin.display()
        );
    }

    println!("parse + validate: median and best of 7-11 runs; µs/service from the median");
    println!();
    println!(
        "| services | input    | load (ms) | best (ms) | µs/service | of which YAML parse (ms) | `nixmox validate` (ms) | best (ms) | µs/service |"
    );
    println!(
        "|---------:|---------:|----------:|----------:|-----------:|-------------------------:|-----------------------:|----------:|-----------:|"
    );
    // NIXMOX_BENCH_SIZES=5000 (comma-separated) measures other sizes, e.g. under a profiler.
    let sizes: Vec<usize> = match std::env::var("NIXMOX_BENCH_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("NIXMOX_BENCH_SIZES: comma-separated numbers >= 4")
            })
            .collect(),
        Err(_) => SIZES.to_vec(),
    };
    for n in sizes {
        assert!(n >= 4, "a project needs at least the four core services");
        let p = generate(n);
        check_clean(n, &p);
        let bytes: usize = p.files.iter().map(|(_, t)| t.len()).sum();
        let runs = if n >= 5_000 { 7 } else { 11 };
        // One warm-up run, then the measured ones.
        let _ = time_load(&p, 1);
        let load_t = time_load(&p, runs);
        let parse_t = time_parse(&p, runs);
        let bin_cell = if have_bin {
            let dir = std::env::temp_dir().join(format!("nixmox-bench-{n}"));
            write_project(&dir, &p);
            let r = time_binary(&dir, 1).and_then(|_| time_binary(&dir, runs.min(7)));
            if std::env::var_os("NIXMOX_BENCH_KEEP").is_some() {
                eprintln!("kept {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
            match r {
                Ok(t) => format!(
                    "{:>22.1} | {:>9.1} | {:>10.1}",
                    ms(t.median),
                    ms(t.best),
                    us_per(t.median, n)
                ),
                Err(e) => {
                    eprintln!("{e}");
                    format!("{:>22} | {:>9} | {:>10}", "failed", "-", "-")
                }
            }
        } else {
            format!("{:>22} | {:>9} | {:>10}", "not built", "-", "-")
        };
        println!(
            "| {n:>8} | {:>5.1} MB | {:>9.1} | {:>9.1} | {:>10.1} | {:>24.1} | {bin_cell} |",
            bytes as f64 / 1e6,
            ms(load_t.median),
            ms(load_t.best),
            us_per(load_t.median, n),
            ms(parse_t.median),
        );
    }
}
