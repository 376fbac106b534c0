//! Engine benchmarks (a plain `harness = false` binary, no criterion).
//!
//! Scheduling: a seeded random DAG of 200 tasks (each depends on 0-3 earlier ones) with known
//! durations of 5-50 ms, executed by `nixmox::engine::scheduler::execute` with a synthetic
//! deployer that sleeps for each task's duration. Reports the makespan with unlimited
//! parallelism (parallel = 200) against the critical path, and the speed-up over sequential
//! execution (parallel 1) for parallel 1, 4 and 16.
//!
//! No-op `up`: copies `examples/homelab` to a temporary directory, plans it and records every
//! step as succeeded with its current hash in the project's state store (so every step is
//! unchanged), then times the real binary `target/release/nixmox -C DIR up` (build it first:
//! `cargo build --release -p nixmox`) and counts the child processes it starts (under
//! `strace -f`, when strace is installed). In the same run, the reference: `terraform plan` on
//! an already-applied workspace (the null-provider workspace of `tests/fixtures/tf-project`,
//! with the Terraform of `.tools/bin` and `.tools/terraformrc` from `scripts/install-tools`),
//! multiplied by the number of Terraform workspaces the example renders: what a no-op would
//! cost with a plan per workspace.
//!
//! Run: `cargo bench -p nixmox --bench engine` (`NIXMOX_BENCH_ONLY=scheduling` or `=noop` for
//! one half; `NIXMOX_BENCH_KEEP=1` keeps the prepared example in the temporary directory). Without `--bench` (as under `cargo test --all-targets`) it only schedules a
//! small DAG once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmox::engine::plan_with_state;
use nixmox::engine::scheduler::{self, execute, Options, Outcome, Runner, Task};
use nixmox::root::Paths;
use nixmox::state::{RowStatus, RunResult, StepFinish, StepStatus, Store};
use nixmox_core::plan::{Change, Selection};
use nixmox_core::render::{render, Outputs};

const TASKS: usize = 200;
const SEED: u64 = 0x6E69_786D_6F78_2024;
/// Goals from the issue.
const GOAL_MAKESPAN: f64 = 0.05;
const GOAL_NOOP: Duration = Duration::from_millis(100);

// ------------------------------------------------------------------------------- helpers

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    best: Duration,
}

fn stats(mut xs: Vec<Duration>) -> Stats {
    assert!(!xs.is_empty());
    xs.sort();
    Stats {
        median: xs[xs.len() / 2],
        best: xs[0],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn machine() -> String {
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

/// A 64-bit linear congruential generator (Knuth's MMIX constants): enough for a reproducible
/// random DAG.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    /// Uniform enough in `0..n` for small `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------- scheduling

/// The synthetic deployer: every task sleeps for its known duration and changes something.
struct Sleeper {
    ms: Vec<u64>,
}

impl Runner for Sleeper {
    type Report = Outcome;
    fn run(&self, index: usize, _attempt: u32, _earlier: Option<Outcome>) -> Outcome {
        std::thread::sleep(Duration::from_millis(self.ms[index]));
        Outcome::Done {
            changed: true,
            detail: String::new(),
        }
    }
}

/// `n` tasks, each after 0-3 distinct earlier ones, lasting `min_ms..=max_ms`.
fn random_dag(n: usize, seed: u64, min_ms: u64, max_ms: u64) -> (Vec<Task>, Sleeper) {
    let mut rng = Lcg(seed);
    let mut tasks = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    for i in 0..n {
        let k = (rng.below(4) as usize).min(i);
        let mut after = BTreeSet::new();
        while after.len() < k {
            after.insert(rng.below(i as u64) as usize);
        }
        let d = min_ms + rng.below(max_ms - min_ms + 1);
        durations.push(d);
        tasks.push(Task {
            after: after.into_iter().collect(),
            weight: d,
            skip: None,
            group: None,
        });
    }
    (tasks, Sleeper { ms: durations })
}

/// The longest chain of durations (the lower bound of any schedule's makespan), in ms.
fn critical_path_ms(tasks: &[Task]) -> u64 {
    scheduler::remaining(tasks).into_iter().max().unwrap_or(0)
}

/// The length (in tasks) of the longest chain, by a forward sweep.
fn depth(tasks: &[Task]) -> usize {
    let mut d = vec![0usize; tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        d[i] = 1 + t.after.iter().map(|&a| d[a]).max().unwrap_or(0);
    }
    d.into_iter().max().unwrap_or(0)
}

fn makespan(tasks: &[Task], runner: &Sleeper, parallel: usize) -> Duration {
    let opts = Options {
        parallel,
        fail_fast: false,
        retries: 0,
        backoff: Duration::ZERO,
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let t = Instant::now();
    let finals = execute(tasks, runner, &opts, &mut |_| {});
    let took = t.elapsed();
    assert!(
        finals.iter().all(|f| f.status == StepStatus::Changed),
        "every task runs and succeeds"
    );
    took
}

fn scheduling() {
    let (tasks, runner) = random_dag(TASKS, SEED, 5, 50);
    let cp = critical_path_ms(&tasks);
    let sum: u64 = runner.ms.iter().sum();
    let edges: usize = tasks.iter().map(|t| t.after.len()).sum();
    println!("## Engine: scheduling");
    println!();
    println!(
        "random DAG: {TASKS} tasks, {edges} edges (0-3 per task, seed {SEED:#x}), durations 5-50 ms; \
         critical path {cp} ms over {} tasks; sum of durations {sum} ms",
        depth(&tasks)
    );
    println!("synthetic deployer: each task sleeps for its duration; median and best of the runs");
    println!();
    println!("| parallel | runs | makespan (ms) | best (ms) | lower bound max(critical path, sum/parallel) (ms) | over the bound | speed-up over parallel 1 |");
    println!("|---------:|-----:|--------------:|----------:|--------------------------------------------------:|---------------:|-------------------------:|");
    let mut sequential: Option<Duration> = None;
    let mut unlimited: Option<Duration> = None;
    for (parallel, runs) in [(1usize, 3usize), (4, 3), (16, 5), (TASKS, 5)] {
        // A short warm-up (thread creation, page faults) for the parallel runs only: one
        // sequential run already takes seconds.
        if parallel > 1 {
            let _ = makespan(&tasks, &runner, parallel);
        }
        let s = stats(
            (0..runs)
                .map(|_| makespan(&tasks, &runner, parallel))
                .collect(),
        );
        if parallel == 1 {
            sequential = Some(s.median);
        }
        if parallel == TASKS {
            unlimited = Some(s.median);
        }
        let bound = cp.max(sum.div_ceil(parallel as u64));
        let speedup = sequential
            .map(|q| format!("{:.2}x", q.as_secs_f64() / s.median.as_secs_f64()))
            .unwrap_or_else(|| "-".to_string());
        let label = if parallel == TASKS {
            format!("{parallel} (unlimited)")
        } else {
            parallel.to_string()
        };
        println!(
            "| {label:>8} | {runs:>4} | {:>13.1} | {:>9.1} | {bound:>49} | {:>13.1}% | {speedup:>24} |",
            ms(s.median),
            ms(s.best),
            (ms(s.median) / bound as f64 - 1.0) * 100.0,
        );
    }
    // What sleeping alone costs (the timer's overshoot), to tell it from the scheduler's own
    // overhead in the sequential row.
    let t = Instant::now();
    for &d in &runner.ms {
        std::thread::sleep(Duration::from_millis(d));
    }
    let alone = t.elapsed();
    println!();
    println!(
        "baseline: the {TASKS} sleeps back to back on one thread, without the scheduler: {:.1} ms ({:+.1}% over the sum of durations)",
        ms(alone),
        (ms(alone) / sum as f64 - 1.0) * 100.0
    );
    if let Some(u) = unlimited {
        let over = ms(u) / cp as f64 - 1.0;
        println!(
            "goal: makespan with unlimited parallelism within {:.0}% of the critical path: {:.1} ms vs {cp} ms ({:+.1}%), {}",
            GOAL_MAKESPAN * 100.0,
            ms(u),
            over * 100.0,
            if over <= GOAL_MAKESPAN { "met" } else { "NOT met" }
        );
    }
    println!();
}

// ---------------------------------------------------------------------------- no-op up

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for e in std::fs::read_dir(from).expect("reading a directory") {
        let e = e.expect("a directory entry");
        let name = e.file_name();
        // Whatever a local run of the example left behind is not part of it.
        if name == ".nixmox" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copying a file");
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} exited with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The example, with every step recorded as succeeded with its current input hash. Returns
/// how many steps the plan has and how many Terraform workspaces the example renders.
fn fabricate_state(bin: &Path, root: &Path) -> Result<(usize, usize), String> {
    copy_dir(&repo().join("examples/homelab"), root);
    // A real project has its pool allocations locked.
    run_ok(
        Command::new(bin)
            .arg("-C")
            .arg(root)
            .args(["lock", "--allocations-only"]),
        "nixmox lock",
    )?;
    let loaded =
        nixmox::commands::load_project(root).map_err(|e| format!("loading the example: {e}"))?;
    let project = &loaded.project;
    let root = &nixmox::root::ProjectRoot::resolve(root).map_err(|e| e.to_string())?;
    let paths = Paths::new(root, project);
    let (plan, _) = plan_with_state(root, project, &Selection::default(), &paths)
        .map_err(|e| format!("planning the example: {e}"))?;
    let mut store = Store::open(&paths.state_db).map_err(|e| e.to_string())?;
    let run = store
        .start_run(&["up".to_string()])
        .map_err(|e| e.to_string())?;
    for step in plan.steps.iter().filter(|s| s.change != Change::Delete) {
        store
            .step_finished(
                run,
                &StepFinish {
                    step_id: step.id.clone(),
                    input_hash: step.hash.clone(),
                    parts: step.parts.clone(),
                    status: StepStatus::Changed,
                    duration_ms: 1_000,
                    error: None,
                    outputs: Vec::new(),
                    rendered: None,
                    refused: None,
                    held: None,
                    snapshots: Vec::new(),
                },
            )
            .map_err(|e| e.to_string())?;
    }
    store
        .finish_run(run, RunResult::Success, "recorded by the engine benchmark")
        .map_err(|e| e.to_string())?;
    drop(store);
    let (again, _) = plan_with_state(root, project, &Selection::default(), &paths)
        .map_err(|e| format!("planning the example again: {e}"))?;
    if again.has_changes() {
        return Err("the fabricated state does not make every step unchanged".into());
    }
    // A workspace is a rendered directory with Terraform configuration in it.
    let rendered = render(project, &Outputs::default());
    let workspaces: BTreeSet<&str> = rendered
        .files
        .iter()
        .filter(|f| f.path.starts_with("terraform/") && f.path.ends_with(".tf.json"))
        .filter_map(|f| f.path.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    Ok((plan.steps.len(), workspaces.len()))
}

/// Checks that the last run recorded in the example's store ran nothing.
fn last_run_ran_nothing(root: &Path) -> Result<(), String> {
    let loaded = nixmox::commands::load_project(root).map_err(|e| e.to_string())?;
    let project = &loaded.project;
    let root = &nixmox::root::ProjectRoot::resolve(root).map_err(|e| e.to_string())?;
    let store = Store::open(&Paths::new(root, project).state_db).map_err(|e| e.to_string())?;
    let runs = store.runs(1).map_err(|e| e.to_string())?;
    let last = runs.first().ok_or("no run recorded")?;
    if last.result != "success" {
        return Err(format!("the last run ended `{}`", last.result));
    }
    let ran: Vec<String> = store
        .step_results(last.id)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|r| r.status != RowStatus::Ended(StepStatus::Unchanged))
        .map(|r| format!("{} ({})", r.step_id, r.status))
        .collect();
    if ran.is_empty() {
        Ok(())
    } else {
        Err(format!("the no-op up ran steps: {}", ran.join(", ")))
    }
}

fn time_up(bin: &Path, root: &Path, runs: usize) -> Result<Stats, String> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        run_ok(Command::new(bin).arg("-C").arg(root).arg("up"), "nixmox up")?;
        times.push(t.elapsed());
    }
    Ok(stats(times))
}

/// Child processes `nixmox up` starts, counted with `strace -f`: process creations (fork,
/// vfork, clone without CLONE_THREAD) and programs executed besides nixmox itself.
fn count_children(bin: &Path, root: &Path, tmp: &Path) -> Result<(usize, usize), String> {
    let trace = tmp.join("up.strace");
    let out = Command::new("strace")
        .arg("-f")
        .arg("-e")
        .arg("trace=execve,fork,vfork,clone,clone3")
        .arg("-o")
        .arg(&trace)
        .arg(bin)
        .arg("-C")
        .arg(root)
        .arg("up")
        .output()
        .map_err(|e| format!("strace is not available ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`strace -f nixmox up` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = std::fs::read_to_string(&trace).map_err(|e| format!("reading the trace: {e}"))?;
    let mut execs = 0usize;
    let mut spawned = 0usize;
    for line in text.lines() {
        if line.contains("resumed>") {
            continue;
        }
        if line.contains("execve(") {
            execs += 1;
        } else if line.contains("fork(")
            || ((line.contains("clone(") || line.contains("clone3("))
                && !line.contains("CLONE_THREAD"))
        {
            spawned += 1;
        }
    }
    // The first execve is strace starting nixmox.
    Ok((spawned, execs.saturating_sub(1)))
}

/// `terraform plan` on an applied null-provider workspace: the cost of asking Terraform
/// whether one workspace changed.
fn terraform_plan(bin: &Path, tmp: &Path, runs: usize) -> Result<(String, Stats), String> {
    let terraform = repo().join(".tools/bin/terraform");
    let rc = repo().join(".tools/terraformrc");
    if !terraform.is_file() || !rc.is_file() {
        return Err(format!(
            "{} or {} is missing: run `scripts/install-tools terraform`",
            terraform.display(),
            rc.display()
        ));
    }
    let project = tmp.join("tf-project");
    copy_dir(&repo().join("tests/fixtures/tf-project"), &project);
    let build = tmp.join("tf-build");
    run_ok(
        Command::new(bin)
            .arg("-C")
            .arg(&project)
            .arg("render")
            .arg("--out")
            .arg(&build),
        "nixmox render",
    )?;
    let dir = build.join("terraform/services/app/infra");
    let tf = |args: &[&str]| {
        let mut c = Command::new(&terraform);
        c.args(args)
            .current_dir(&dir)
            .env("TF_CLI_CONFIG_FILE", &rc)
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1");
        c
    };
    let version = run_ok(&mut tf(&["version"]), "terraform version")?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("Terraform")
        .to_string();
    run_ok(
        &mut tf(&["init", "-input=false", "-no-color"]),
        "terraform init",
    )?;
    run_ok(
        &mut tf(&["apply", "-auto-approve", "-input=false", "-no-color"]),
        "terraform apply",
    )?;
    // As the engine runs it; exit code 0 means no changes (2 would be changes).
    let plan = ["plan", "-no-color", "-input=false", "-detailed-exitcode"];
    run_ok(&mut tf(&plan), "terraform plan (warm-up)")?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        run_ok(&mut tf(&plan), "terraform plan")?;
        times.push(t.elapsed());
    }
    Ok((version, stats(times)))
}

fn noop_up() {
    println!("## Engine: no-op up");
    println!();
    let bin = repo().join("target/release/nixmox");
    if !bin.is_file() {
        println!(
            "{} is missing: build it first with `cargo build --release -p nixmox`; the no-op up is not measured",
            bin.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    // NIXMOX_BENCH_KEEP=1 keeps the prepared example (e.g. to profile `nixmox up` on it).
    let (tmp, _guard) = if std::env::var_os("NIXMOX_BENCH_KEEP").is_some() {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
        (kept, None)
    } else {
        (tmp.path().to_path_buf(), Some(tmp))
    };
    let root = tmp.join("homelab");
    let (steps, workspaces) = match fabricate_state(&bin, &root) {
        Ok(x) => x,
        Err(e) => {
            println!("could not prepare the example: {e}");
            return;
        }
    };
    println!(
        "examples/homelab copied to a temporary directory; all {steps} steps recorded as succeeded with their current hash"
    );
    let runs = 10;
    // One warm-up run (it also checks that the up succeeds), then the measured ones.
    let up = time_up(&bin, &root, 1).and_then(|_| time_up(&bin, &root, runs));
    let up = match up {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return;
        }
    };
    let nothing_ran = last_run_ran_nothing(&root);
    let children = count_children(&bin, &root, &tmp);
    let reference = terraform_plan(&bin, &tmp, 5);

    println!();
    println!("| what | runs | median (ms) | best (ms) |");
    println!("|:-----|-----:|------------:|----------:|");
    println!(
        "| `nixmox -C DIR up`, nothing to do ({steps} steps, all unchanged) | {runs} | {:.1} | {:.1} |",
        ms(up.median),
        ms(up.best)
    );
    match &reference {
        Ok((version, plan)) => {
            println!(
                "| `terraform plan` on one applied workspace (null provider, {version}) | 5 | {:.1} | {:.1} |",
                ms(plan.median),
                ms(plan.best)
            );
            println!(
                "| `terraform plan` × {workspaces} workspaces of the example, one after another | - | {:.1} | {:.1} |",
                ms(plan.median) * workspaces as f64,
                ms(plan.best) * workspaces as f64
            );
        }
        Err(e) => println!("| `terraform plan` reference | - | not measured: {e} | - |"),
    }
    println!();
    match &nothing_ran {
        Ok(()) => println!("steps run by the no-op up: 0 (checked in the state store)"),
        Err(e) => println!("CHECK FAILED: {e}"),
    }
    let zero_children = match &children {
        Ok((spawned, execs)) => {
            println!(
                "child processes: {} (strace -f: {spawned} process creations, {execs} programs executed besides nixmox)",
                spawned.max(execs)
            );
            Some(*spawned == 0 && *execs == 0)
        }
        Err(e) => {
            println!("child processes: not counted: {e} (install strace to count them)");
            None
        }
    };
    if let Ok((_, plan)) = &reference {
        println!(
            "a plan per workspace would cost {:.0}x the whole no-op up",
            ms(plan.median) * workspaces as f64 / ms(up.median)
        );
    }
    let fast = up.median < GOAL_NOOP;
    println!(
        "goal: no-op up under {} ms with zero child processes: {:.1} ms, {}",
        GOAL_NOOP.as_millis(),
        ms(up.median),
        match (fast && nothing_ran.is_ok(), zero_children) {
            (true, Some(true)) => "met",
            (true, None) => "time met; child processes not counted",
            _ => "NOT met",
        }
    );
    println!();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs this binary too: only a quick scheduling check.
        let (tasks, runner) = random_dag(30, SEED, 1, 2);
        let t = makespan(&tasks, &runner, 8);
        assert!(t < Duration::from_secs(5));
        println!("bench engine: smoke check passed (run `cargo bench -p nixmox --bench engine` to measure)");
        return;
    }
    println!("machine: {}", machine());
    println!();
    let only = std::env::var("NIXMOX_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "scheduling" {
        scheduling();
    }
    if only.is_empty() || only == "noop" {
        noop_up();
    }
}
