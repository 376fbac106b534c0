//! `nixmox ps` live health benchmark (a plain `harness = false` binary, no criterion).
//!
//! Goal (issue 6): live health for 50 services completes within one check timeout, because the
//! checks run in parallel. A project of 50 services is written to a temporary directory, each
//! with two liveness checks against servers on 127.0.0.1 started here:
//!
//! - an `http` check of a small HTTP server (status 200, body `ok`) and a `tcp` check of it;
//! - every fifth service's `http` check goes to a server that accepts and never answers, so it
//!   runs into the timeout (the worst case: the whole `ps` must still take about one timeout);
//! - every tenth service's second check is a `command` check run through
//!   `tests/fixtures/bin/ssh-test` (a process per check, as SSH would be).
//!
//! It measures `nixmox::health::status::live` (median and best of 7 runs), the same with every
//! check answering, and the release binary `nixmox ps --format json` (process start, loading
//! the project, the checks; median and best of 5), with a check timeout of 1 s.
//!
//! Run: `cargo bench -p nixmox --bench ps`. Without `--bench` (as under
//! `cargo test --all-targets`) it runs 10 services once as a smoke check.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmox::health::status::{live, Health};
use nixmox::health::{Context, Ssh};
use nixmox_core::Project;

const SERVICES: usize = 50;
const TIMEOUT: Duration = Duration::from_secs(1);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// An HTTP server answering `200 ok` to everything, or (`hang`) accepting and never answering.
fn server(hang: bool, stop: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in l.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut c) = conn else { continue };
            if hang {
                held.push(c);
                continue;
            }
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

fn write_project(dir: &Path, n: usize, ok: u16, hang: u16) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("nixmox.yaml"),
        "project: bench\ndomain: bench.lan\nnetwork: { cidr: 127.0.0.0/16, gateway: 127.0.0.1 }\n\
         infra: { backend: none }\npools: { vmid: 1000-9999, ip: 127.0.2.1-127.0.9.254 }\n",
    )
    .unwrap();
    for i in 0..n {
        let name = format!("svc{i:03}");
        let port = if i % 5 == 4 { hang } else { ok };
        let second = if i % 10 == 9 {
            "{ command: [\"true\"] }".to_string()
        } else {
            format!("{{ tcp: \"127.0.0.1:{ok}\" }}")
        };
        let m = format!(
            "name: {name}\nhost: {{ ip: 127.0.{}.{}, vmid: {} }}\ninterface:\n  health:\n    \
             liveness:\n      - {{ http: \"http://127.0.0.1:{port}/health\", status: 200, body: ok }}\n      \
             - {second}\n    timeout: 5s\n",
            2 + i / 200,
            1 + i % 200,
            1000 + i
        );
        let d = dir.join("services").join(&name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("manifest.yaml"), m).unwrap();
    }
}

fn load(dir: &Path) -> Project {
    let read = nixmox::project_fs::read_project(dir).unwrap();
    let exists = nixmox::project_fs::exists_in(dir);
    let loaded = nixmox_core::load(&read.sources, &exists);
    loaded.project.unwrap_or_else(|| {
        panic!(
            "the bench project is invalid: {}",
            nixmox_core::diag::render_all(&loaded.diagnostics)
        )
    })
}

fn median_best(mut xs: Vec<Duration>) -> (Duration, Duration) {
    xs.sort();
    (xs[xs.len() / 2], xs[0])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n = if benching { SERVICES } else { 10 };
    let stop = Arc::new(AtomicBool::new(false));
    let ok = server(false, stop.clone());
    let hang = server(true, stop.clone());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("project");
    write_project(&dir, n, ok, hang);
    let project = load(&dir);
    let ssh_test = repo().join("tests/fixtures/bin/ssh-test");
    let ctx = Context::new(
        &project,
        Ssh {
            program: ssh_test.display().to_string(),
            options: Vec::new(),
            user: nixmox_core::ids::SshUser::new("root").expect("a valid login name"),
        },
        Vec::new(),
        BTreeMap::new(),
        "/run/secrets".into(),
    )
    .unwrap();

    let run = || {
        let t = Instant::now();
        let r = live(&ctx, &project, &[], TIMEOUT);
        (t.elapsed(), r)
    };
    let (_, first) = run();
    let unhealthy = first
        .iter()
        .filter(|s| s.health == Health::Unhealthy)
        .count();
    let checks: usize = first.iter().map(|s| s.checks.len()).sum();
    assert_eq!(first.len(), n);
    assert_eq!(checks, 2 * n);
    assert_eq!(unhealthy, n / 5, "every fifth service hangs");
    for s in &first {
        for c in &s.checks {
            if !c.ok {
                assert!(c.detail.contains("no answer in time"), "{}", c.detail);
            }
        }
    }
    if !benching {
        let (t, _) = run();
        assert!(t < TIMEOUT * 3, "{t:?}");
        println!(
            "bench ps: smoke check passed (run `cargo bench -p nixmox --bench ps` to measure)"
        );
        stop.store(true, Ordering::SeqCst);
        return;
    }

    let mut lib = Vec::new();
    for _ in 0..7 {
        lib.push(run().0);
    }
    let (lib_median, lib_best) = median_best(lib);

    // The same services when every check answers: what parallel checks cost by themselves.
    let dir_ok = tmp.path().join("project-ok");
    write_project(&dir_ok, n, ok, ok);
    let project_ok = load(&dir_ok);
    let mut fast = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let r = live(&ctx, &project_ok, &[], TIMEOUT);
        fast.push(t.elapsed());
        assert!(r.iter().all(|s| s.health == Health::Healthy));
    }
    let (fast_median, fast_best) = median_best(fast);

    // The binary, as a user runs it (release build when benchmarking).
    let exe = repo().join("target/release/nixmox");
    let mut bin = Vec::new();
    if exe.is_file() {
        for _ in 0..5 {
            let t = Instant::now();
            let out = Command::new(&exe)
                .arg("-C")
                .arg(&dir)
                .args(["ps", "--format", "json", "--timeout", "1s"])
                .env("NIXMOX_SSH", &ssh_test)
                .output()
                .unwrap();
            bin.push(t.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!(
        "ps live health: {n} services, {checks} checks ({} time out), check timeout {} ms",
        n / 5,
        ms(TIMEOUT)
    );
    println!(
        "machine: {} logical CPUs",
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    println!();
    println!("| what | median (ms) | best (ms) | within one timeout |");
    println!("|---|---:|---:|---|");
    println!(
        "| `health::status::live` | {:.1} | {:.1} | {} |",
        ms(lib_median),
        ms(lib_best),
        if lib_median < TIMEOUT + TIMEOUT / 5 {
            "yes"
        } else {
            "NO"
        }
    );
    println!(
        "| `health::status::live`, every check answering | {:.1} | {:.1} | yes |",
        ms(fast_median),
        ms(fast_best)
    );
    if !bin.is_empty() {
        let (m, b) = median_best(bin);
        println!(
            "| `nixmox ps --format json` (release binary) | {:.1} | {:.1} | {} |",
            ms(m),
            ms(b),
            if m < TIMEOUT + TIMEOUT / 5 {
                "yes"
            } else {
                "NO"
            }
        );
    } else {
        println!("(build the release binary to time `nixmox ps` too: cargo build --release)");
    }
    stop.store(true, Ordering::SeqCst);
}
