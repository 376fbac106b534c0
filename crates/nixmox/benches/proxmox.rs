//! Container creation through the PVE API driver (a plain `harness = false` binary).
//!
//! Against fakepve (started through `tests/fixtures/fakepve/launch.py`) with 50 ms added to
//! every response and container tasks of 1 s in real time (`time_scale` 1, create 1 s), it
//! times `lifecycle::converge` creating and starting 20 containers from nothing, one at a time
//! and 8 at a time, each on a fresh fake. Goal (issue 7): at least 6x faster with 8.
//!
//! Issue 14: it also times what a snapshot adds to a deploy (`proxmox::snapshot::take`, task
//! awaited) and a snapshot rollback with the restart, for snapshot tasks of 0, 1 and 5 s.
//!
//! Run: `cargo bench -p nixmox --bench proxmox` (`NIXMOX_BENCH_RUNS=3` for more runs of each;
//! `NIXMOX_BENCH_ONLY=snapshots` for the snapshot figures alone).
//! Without `--bench` (as under `cargo test --all-targets`) it creates 2 containers once, with
//! no latency, as a smoke test. Needs `scripts/install-tools fakepve`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nixmox::proxmox::{self, lifecycle, ClientOptions, Settings};
use nixmox_core::ids::{Hostname, ServiceName, VmId};
use nixmox_core::model::{InfraBackend, SecretRef};
use nixmox_core::Project;
use serde_json::{json, Value};

const TOKEN: &str = "root@pam!nixmox=bench-secret-0000";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn fakepve_python() -> PathBuf {
    let mut places = Vec::new();
    if let Some(t) = std::env::var_os("NIXMOX_TOOLS") {
        places.push(PathBuf::from(t).join("bin/fakepve-python"));
    }
    places.push(repo().join(".tools/bin/fakepve-python"));
    places.into_iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!("this benchmark needs fakepve: run `scripts/install-tools fakepve`")
    })
}

struct Fake {
    child: Child,
    stdin: Option<ChildStdin>,
    url: String,
    ca: String,
    _dir: tempfile::TempDir,
}

impl Fake {
    fn start(host: &str, latency: f64, task_secs: f64) -> Fake {
        Fake::with(host, latency, json!({"create": task_secs}))
    }

    fn with(host: &str, latency: f64, ct_secs: Value) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({
            "host": host,
            "dir": dir.path(),
            "tokens": {"root@pam!nixmox": "bench-secret-0000"},
            "nodes": ["pve"],
            "templates": [{"name": "nixos-26.05-x86_64-linux.tar.xz"}],
            "time_scale": 1,
            "latency": latency,
            "ct_secs": ct_secs,
        });
        let mut child = Command::new(fakepve_python())
            .arg(repo().join("tests/fixtures/fakepve/launch.py"))
            .arg(cfg.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fakepve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let hello: Value = serde_json::from_str(&line).expect("fakepve started");
        Fake {
            stdin: child.stdin.take(),
            child,
            url: hello["url"].as_str().unwrap().into(),
            ca: hello["ca"].as_str().unwrap().into(),
            _dir: dir,
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example project with its services replaced by `n` independent apps.
fn project(n: usize) -> Project {
    let root = repo().join("examples/homelab");
    let read = nixmox::project_fs::read_project(&root).unwrap();
    let exists = nixmox::project_fs::exists_in(&root);
    let mut p = nixmox_core::load(&read.sources, &exists)
        .project
        .expect("the example loads");
    let template = p.service("vaultwarden").unwrap().clone();
    p.services = (0..n)
        .map(|i| {
            let mut s = template.clone();
            let name = format!("app{i:02}");
            s.name = ServiceName::new(&name).unwrap();
            s.host.hostname = Hostname::new(&name).unwrap();
            s.host.vmid = VmId::new(920 + i as i64).unwrap();
            s.host.ip = format!("192.168.99.{}", 150 + i).parse().unwrap();
            s.depends_on.clear();
            s
        })
        .collect();
    p.edges.clear();
    p.infra = InfraBackend::ProxmoxApi;
    p
}

/// Creates `n` containers on a fresh fake; the time of `converge` alone.
fn run(host: &str, n: usize, parallel: usize, latency: f64, task_secs: f64) -> Duration {
    let fake = Fake::start(host, latency, task_secs);
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("token"), TOKEN).unwrap();
    let mut p = project(n);
    p.proxmox.endpoint = Some(fake.url.clone());
    p.proxmox.token = SecretRef::File("token".into());
    p.proxmox.tls.ca_file = Some(fake.ca.clone());
    let settings = Settings::from_project(&p, root.path()).unwrap();
    let client = proxmox::connect(&settings, ClientOptions::default()).unwrap();
    let started = Instant::now();
    let report = lifecycle::converge(&client, &p, parallel).unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    assert_eq!(report.created.len(), n);
    assert_eq!(report.started.len(), n);
    took
}

/// One container on a fresh fake whose snapshot and rollback tasks take `secs` PVE seconds;
/// the time of taking a snapshot and of rolling back to it (with the restart), as the engine
/// does them (client defaults: polls every 0.2 s growing to 2 s).
fn snapshot_cost(host: &str, latency: f64, secs: f64) -> (Duration, Duration) {
    let fake = Fake::with(host, latency, json!({"snapshot": secs, "rollback": secs}));
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("token"), TOKEN).unwrap();
    let mut p = project(1);
    p.proxmox.endpoint = Some(fake.url.clone());
    p.proxmox.token = SecretRef::File("token".into());
    p.proxmox.tls.ca_file = Some(fake.ca.clone());
    let settings = Settings::from_project(&p, root.path()).unwrap();
    let client = proxmox::connect(&settings, ClientOptions::default()).unwrap();
    lifecycle::converge(&client, &p, 1).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = Instant::now();
    proxmox::snapshot::take(
        &client,
        "pve",
        920,
        "nixmox-r1-svc-app00",
        "bench",
        deadline,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let take = started.elapsed();
    let started = Instant::now();
    proxmox::snapshot::rollback(&client, "pve", 920, "nixmox-r1-svc-app00", true, deadline)
        .unwrap_or_else(|e| panic!("{e}"));
    (take, started.elapsed())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        let t = run("127.0.0.60", 2, 2, 0.0, 0.0);
        let (take, back) = snapshot_cost("127.0.0.59", 0.0, 0.0);
        println!(
            "proxmox smoke run: 2 containers in {:.2}s, a snapshot in {:.2}s, its rollback in {:.2}s (run with --bench for the benchmark)",
            t.as_secs_f64(),
            take.as_secs_f64(),
            back.as_secs_f64()
        );
        return;
    }
    let runs: usize = std::env::var("NIXMOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!("snapshot before a deploy (issue 14); 50 ms latency per request; {runs} run(s) each");
    println!("| snapshot task (PVE s) | take (s) | rollback + start (s) |");
    println!("|----------------------:|---------:|---------------------:|");
    for (k, secs) in [0.0, 1.0, 5.0].into_iter().enumerate() {
        let mut all: Vec<(Duration, Duration)> = (0..runs)
            .map(|r| snapshot_cost(&format!("127.0.0.{}", 100 + k * 10 + r), 0.05, secs))
            .collect();
        all.sort();
        let (take, back) = all[all.len() / 2];
        println!(
            "| {secs:>21.0} | {:>8.2} | {:>20.2} |",
            take.as_secs_f64(),
            back.as_secs_f64()
        );
    }
    if std::env::var("NIXMOX_BENCH_ONLY").as_deref() == Ok("snapshots") {
        return;
    }
    let n = 20;
    println!("creating {n} containers; 50 ms latency per request, create tasks of 1 s; {runs} run(s) each");
    println!("| parallel | time (s) | best (s) | speed-up |");
    println!("|---------:|---------:|---------:|---------:|");
    let mut base = None;
    for (k, parallel) in [1usize, 4, 8].into_iter().enumerate() {
        let mut times: Vec<Duration> = (0..runs)
            .map(|r| {
                run(
                    &format!("127.0.0.{}", 61 + k * 10 + r),
                    n,
                    parallel,
                    0.05,
                    1.0,
                )
            })
            .collect();
        times.sort();
        let median = times[times.len() / 2];
        let base = *base.get_or_insert(median);
        println!(
            "| {parallel:>8} | {:>8.2} | {:>8.2} | {:>7.2}x |",
            median.as_secs_f64(),
            times[0].as_secs_f64(),
            base.as_secs_f64() / median.as_secs_f64()
        );
    }
}
