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

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{benching, ms, project, sizes, sources, stats, us_per, Generated, Stats};
use nixmox_core::load;
use nixmox_core::syntax::{self, Format};

const SIZES: [usize; 3] = [100, 1_000, 5_000];

/// Wall time of `load` (including building `Sources`, as the shell does).
fn time_load(p: &Generated, runs: usize) -> Stats {
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
fn time_parse(p: &Generated, runs: usize) -> Stats {
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

fn write_project(dir: &Path, p: &Generated) {
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

fn main() {
    if !benching() {
        // `cargo test --all-targets` runs this binary too: only check the generator.
        // `project` fails loudly when the generated project does not validate.
        let _ = project(SIZES[0]);
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
    for n in sizes(&SIZES) {
        // Asserts n >= 4 and fails loudly unless the project validates; the loaded project
        // itself is not needed here.
        let (p, _) = project(n);
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
