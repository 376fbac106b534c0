//! Rendering benchmark (a plain `harness = false` binary, no criterion).
//!
//! For synthetic projects of 100, 1,000 and 5,000 services (see `common/mod.rs`; built in
//! memory and loaded once per size, not timed) it measures:
//!
//! - "rendered": `nixmox_core::render::render(&project, &Outputs::default())` in memory (the
//!   NixOS flake, every host's configuration, every Terraform workspace);
//! - "written" (1,000 services by default): rendering and then writing every rendered file into
//!   a fresh build directory and copying the project files the build references (each service's
//!   directory with its NixOS module), as `nixmox render` does, with `std::fs`. Measured in the
//!   system temporary directory (a disk, normally the one projects live on) and, when it exists,
//!   in `/dev/shm` (RAM-backed), which separates the file system's cost from NixMox's.
//!
//! Median and best of several runs; µs per service from the median.
//!
//! Run: `cargo bench -p nixmox-core --bench render` (`NIXMOX_BENCH_SIZES=...` for other
//! in-memory sizes, `NIXMOX_BENCH_WRITE_SIZES=...` for the written ones, `NIXMOX_BENCH_TMP=DIR`
//! to write into DIR only). Without `--bench` (as under `cargo test --all-targets`) it only
//! renders a small project once.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{benching, machine, ms, project, sizes, stats, us_per, Generated, Stats};
use nixmox_core::render::{render, Outputs, Rendered};
use nixmox_core::Project;

const SIZES: [usize; 3] = [100, 1_000, 5_000];
const WRITE_SIZES: [usize; 1] = [1_000];
/// Goals from the issue, for 1,000 services.
const GOAL_SIZE: usize = 1_000;
const GOAL_RENDER: Duration = Duration::from_millis(500);
const GOAL_WRITE: Duration = Duration::from_secs(1);

fn time_render(p: &Project, runs: usize) -> Stats {
    let outputs = Outputs::default();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = render(p, &outputs);
        times.push(t.elapsed());
        std::hint::black_box(&r);
    }
    stats(times)
}

/// Writes the generated project (manifests and the modules they reference) into `dir`.
fn write_project(dir: &Path, g: &Generated) {
    for (path, text) in &g.files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("a file has a parent"))
            .expect("creating a service directory");
        std::fs::write(&file, text).expect("writing a manifest");
    }
    for path in &g.existing {
        std::fs::write(dir.join(path), "{ ... }: { }\n").expect("writing a module");
    }
}

/// Copies a file or directory tree; returns how many files it copied (none when `from` does
/// not exist: optional inputs such as secrets files are skipped, as `nixmox render` does).
fn copy_recursive(from: &Path, to: &Path) -> usize {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("creating a copied directory");
        let mut n = 0;
        for e in std::fs::read_dir(from).expect("reading a copied directory") {
            let e = e.expect("a directory entry");
            n += copy_recursive(&e.path(), &to.join(e.file_name()));
        }
        n
    } else if from.exists() {
        std::fs::copy(from, to).expect("copying a project file");
        1
    } else {
        0
    }
}

/// Writes a rendered tree into `out` (which must not exist): every file, then the copies.
/// Returns how many files it wrote or copied.
fn write_rendered(root: &Path, out: &Path, r: &Rendered) -> usize {
    let mut copied = 0;
    for f in &r.files {
        let path = out.join(&f.path);
        std::fs::create_dir_all(path.parent().expect("a file has a parent"))
            .expect("creating a build directory");
        std::fs::write(&path, f.contents.as_bytes()).expect("writing a rendered file");
    }
    for c in &r.copies {
        let to = out.join(&c.to);
        std::fs::create_dir_all(to.parent().expect("a copy has a parent"))
            .expect("creating a build directory");
        copied += copy_recursive(&root.join(&c.from), &to);
    }
    r.files.len() + copied
}

struct Written {
    /// Files written or copied per run.
    files: usize,
    /// Render and write, end to end.
    total: Stats,
    /// The writing (and copying) alone.
    write: Stats,
}

fn time_written(tmp: &Path, g: &Generated, p: &Project, runs: usize) -> Written {
    let root = tmp.join("project");
    write_project(&root, g);
    let outputs = Outputs::default();
    let mut totals = Vec::with_capacity(runs);
    let mut writes = Vec::with_capacity(runs);
    let mut files = 0;
    // One warm-up run, then the measured ones; each into a fresh directory.
    for run in 0..=runs {
        let out: PathBuf = tmp.join(format!("build-{run}"));
        let t = Instant::now();
        let r = render(p, &outputs);
        let w = Instant::now();
        files = write_rendered(&root, &out, &r);
        let (total, write) = (t.elapsed(), w.elapsed());
        if run > 0 {
            totals.push(total);
            writes.push(write);
        }
        // Removing the previous tree is not part of the measurement.
        std::fs::remove_dir_all(&out).expect("removing a build directory");
    }
    Written {
        files,
        total: stats(totals),
        write: stats(writes),
    }
}

fn main() {
    if !benching() {
        let (_, p) = project(SIZES[0]);
        let r = render(&p, &Outputs::default());
        assert!(!r.files.is_empty());
        println!("bench render: smoke check passed (run `cargo bench -p nixmox-core --bench render` to measure)");
        return;
    }

    println!("render, in memory");
    println!("machine: {}", machine());
    println!("median and best of 5-11 runs after one warm-up; µs/service from the median");
    println!();
    println!("| services | files  | size     | render (ms) | best (ms) | µs/service |");
    println!("|---------:|-------:|---------:|------------:|----------:|-----------:|");
    let mut goal_render: Option<Duration> = None;
    for n in sizes(&SIZES) {
        let (_, p) = project(n);
        let r = render(&p, &Outputs::default());
        let bytes: usize = r.files.iter().map(|f| f.contents.len()).sum();
        let files = r.files.len();
        drop(r);
        let runs = if n >= 5_000 { 5 } else { 11 };
        let t = time_render(&p, runs);
        if n == GOAL_SIZE {
            goal_render = Some(t.median);
        }
        println!(
            "| {n:>8} | {files:>6} | {:>5.1} MB | {:>11.1} | {:>9.1} | {:>10.1} |",
            bytes as f64 / 1e6,
            ms(t.median),
            ms(t.best),
            us_per(t.median, n)
        );
    }

    let write_sizes: Vec<usize> = match std::env::var("NIXMOX_BENCH_WRITE_SIZES") {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("NIXMOX_BENCH_WRITE_SIZES: comma-separated numbers >= 4")
            })
            .collect(),
        Err(_) => WRITE_SIZES.to_vec(),
    };
    // Where to write: the system temporary directory (normally the same disk a project's
    // `.nixmox/build` is on) and, when there is one, a RAM-backed tmpfs, to separate what the
    // file system costs from what NixMox does. NIXMOX_BENCH_TMP=DIR measures DIR instead.
    let mut places: Vec<(String, PathBuf)> = Vec::new();
    match std::env::var_os("NIXMOX_BENCH_TMP") {
        Some(dir) => places.push(("NIXMOX_BENCH_TMP".to_string(), PathBuf::from(dir))),
        None => {
            places.push(("temp dir".to_string(), std::env::temp_dir()));
            let shm = Path::new("/dev/shm");
            if shm.is_dir() {
                places.push(("tmpfs".to_string(), shm.to_path_buf()));
            }
        }
    }
    println!();
    println!(
        "render and write to disk (fresh build directory each run; {})",
        places
            .iter()
            .map(|(label, dir)| format!("{label} = {}", dir.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("| services | where    | rendered files | copies | files written | render + write (ms) | best (ms) | of which writing (ms) | µs/file written |");
    println!("|---------:|:---------|---------------:|-------:|--------------:|--------------------:|----------:|----------------------:|----------------:|");
    let mut goal_write: Vec<(String, Duration)> = Vec::new();
    for n in write_sizes {
        let (g, p) = project(n);
        let r = render(&p, &Outputs::default());
        let (files, copies) = (r.files.len(), r.copies.len());
        drop(r);
        for (label, base) in &places {
            let dir = base.join(format!("nixmox-bench-render-{}-{n}", std::process::id()));
            let w = time_written(&dir, &g, &p, if n >= 5_000 { 3 } else { 7 });
            let _ = std::fs::remove_dir_all(&dir);
            if n == GOAL_SIZE {
                goal_write.push((label.clone(), w.total.median));
            }
            println!(
                "| {n:>8} | {label:<8} | {files:>14} | {copies:>6} | {:>13} | {:>19.1} | {:>9.1} | {:>21.1} | {:>15.0} |",
                w.files,
                ms(w.total.median),
                ms(w.total.best),
                ms(w.write.median),
                w.write.median.as_secs_f64() * 1e6 / w.files.max(1) as f64
            );
        }
    }
    println!();
    let verdict = |t: Option<Duration>, goal: Duration, what: &str| match t {
        Some(t) => println!(
            "goal: {GOAL_SIZE} services {what} under {} ms: {:.1} ms, {}",
            goal.as_millis(),
            ms(t),
            if t < goal { "met" } else { "NOT met" }
        ),
        None => println!("goal: {GOAL_SIZE} services {what}: not measured in this run"),
    };
    verdict(goal_render, GOAL_RENDER, "rendered");
    if goal_write.is_empty() {
        verdict(None, GOAL_WRITE, "rendered and written");
    }
    for (label, t) in goal_write {
        verdict(
            Some(t),
            GOAL_WRITE,
            &format!("rendered and written ({label})"),
        );
    }
}
