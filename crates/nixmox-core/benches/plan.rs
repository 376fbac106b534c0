//! Planning benchmark (a plain `harness = false` binary, no criterion).
//!
//! For synthetic projects of 100, 1,000, 5,000 and 20,000 services (see `common/mod.rs`; built
//! in memory and loaded once per size, not timed) it measures `nixmox_core::plan::plan` with
//! every service selected and the record of an earlier identical plan, as a no-op `up` plans:
//! building every step, hashing every part of every step's input, comparing with the record and
//! finding the critical path. Median and best of several runs; µs per service from the median.
//! For comparison it also times the first plan (no record: every step is a create).
//!
//! Run: `cargo bench -p nixmox-core --bench plan` (`NIXMOX_BENCH_SIZES=5000` for other sizes,
//! e.g. under a profiler). Without `--bench` (as under `cargo test --all-targets`) it only
//! plans a small project once.

mod common;

use std::time::{Duration, Instant};

use common::{benching, machine, ms, project, sizes, stats, us_per, Stats};
use nixmox_core::plan::{plan, Change, Plan, PlanInput, Selection};
use nixmox_core::record::{Record, StepRecord};
use nixmox_core::Project;

const SIZES: [usize; 4] = [100, 1_000, 5_000, 20_000];
/// Goal from the issue: 5,000 services planned (including hashing) in under 0.3 s.
const GOAL_SIZE: usize = 5_000;
const GOAL: Duration = Duration::from_millis(300);

/// What the state store would hold after a successful run of `plan`.
fn record_of(plan: &Plan) -> Record {
    Record {
        steps: plan
            .steps
            .iter()
            .map(|s| {
                (
                    s.id.to_string(),
                    StepRecord {
                        hash: s.hash.clone(),
                        parts: s.parts.clone(),
                        duration_ms: Some(1_000 + s.id.len() as u64),
                    },
                )
            })
            .collect(),
        ..Record::default()
    }
}

fn time_plan(p: &Project, record: Option<&Record>, runs: usize) -> Stats {
    let sel = Selection::default();
    let input = PlanInput {
        record,
        files: None,
        flake_lock: None,
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = plan(p, &sel, &input);
        times.push(t.elapsed());
        std::hint::black_box(&out);
    }
    stats(times)
}

fn main() {
    if !benching() {
        let (_, p) = project(SIZES[0]);
        let first = plan(&p, &Selection::default(), &PlanInput::default());
        let record = record_of(&first);
        let again = plan(
            &p,
            &Selection::default(),
            &PlanInput {
                record: Some(&record),
                files: None,
                flake_lock: None,
            },
        );
        assert!(!again.has_changes(), "planning twice is a no-op");
        println!("bench plan: smoke check passed (run `cargo bench -p nixmox-core --bench plan` to measure)");
        return;
    }

    println!("plan (every service selected, against the record of an identical earlier plan)");
    println!("machine: {}", machine());
    println!("median and best of 5-11 runs after one warm-up; µs/service from the median");
    println!();
    println!("| services | steps   | parts   | plan (ms) | best (ms) | µs/service | first plan, no record (ms) |");
    println!("|---------:|--------:|--------:|----------:|----------:|-----------:|---------------------------:|");
    let mut per_service: Vec<(usize, f64)> = Vec::new();
    let mut goal_time: Option<Duration> = None;
    for n in sizes(&SIZES) {
        let (_, p) = project(n);
        let runs = match n {
            0..=1_000 => 11,
            1_001..=5_000 => 7,
            _ => 5,
        };
        // The record of a previous plan of the same project: every step comes out unchanged.
        let first = plan(&p, &Selection::default(), &PlanInput::default());
        let record = record_of(&first);
        let steps = first.steps.len();
        let parts: usize = first.steps.iter().map(|s| s.parts.len()).sum();
        drop(first);
        let check = plan(
            &p,
            &Selection::default(),
            &PlanInput {
                record: Some(&record),
                files: None,
                flake_lock: None,
            },
        );
        assert_eq!(check.count(Change::Unchanged), steps, "a no-op plan");
        drop(check);

        let noop = time_plan(&p, Some(&record), runs);
        let fresh = time_plan(&p, None, runs.min(5));
        if n == GOAL_SIZE {
            goal_time = Some(noop.median);
        }
        per_service.push((n, us_per(noop.median, n)));
        println!(
            "| {n:>8} | {steps:>7} | {parts:>7} | {:>9.1} | {:>9.1} | {:>10.1} | {:>26.1} |",
            ms(noop.median),
            ms(noop.best),
            us_per(noop.median, n),
            ms(fresh.median),
        );
    }
    println!();
    if let (Some(first), Some(last)) = (per_service.first(), per_service.last()) {
        println!(
            "growth: µs/service goes from {:.1} at {} to {:.1} at {} services ({:.2}x for {:.0}x the services)",
            first.1,
            first.0,
            last.1,
            last.0,
            last.1 / first.1,
            last.0 as f64 / first.0 as f64
        );
    }
    match goal_time {
        Some(t) => println!(
            "goal: {GOAL_SIZE} services under {} ms: {:.1} ms, {}",
            GOAL.as_millis(),
            ms(t),
            if t < GOAL { "met" } else { "NOT met" }
        ),
        None => println!("goal: {GOAL_SIZE} services were not measured in this run"),
    }
}
