//! NixMox against the anchor, side by side in one run (a plain `harness = false` binary).
//!
//! The anchor is what a user would compare NixMox with: every service in one Nix attribute set,
//! evaluated by `nix-instantiate --eval --strict --json` (no validation at all). For 1,000, 5,000
//! and 20,000 services of the load benchmark's shape (`nixmox-core/benches/common`), this
//! binary writes the project to a temporary directory and, from the same parsed manifests, the
//! anchor's Nix file (`anchor.nix`: the project file and every manifest as Nix values). Then, in
//! rounds, it runs one after the other each of
//!
//! - the anchor, `nix-instantiate --eval --strict --json anchor.nix`;
//! - `nixmox -C DIR validate`, `nixmox -C DIR plan --format json` and
//!   `nixmox -C DIR config --format json` (the release binary, stdout to /dev/null);
//!
//! so that every command sees the same load, and reports medians, the ratio of each to the
//! anchor, the cost per service, and the peak RSS and CPU time (user + system) of each (one more
//! run under `/usr/bin/time -f '%M %U %S'`). Then the re-render: a project of 1,000 services
//! rendered once into `.nixmox/build`, then per run one manifest edited (its description) and
//! `nixmox -C DIR render` timed, plus a render with nothing changed.
//!
//! Run: `cargo build --release -p nixmox && cargo bench -p nixmox --bench anchor`
//! (`NIXMOX_BENCH_SIZES=5000` for other sizes, `NIXMOX_BENCH_RUNS=N` rounds,
//! `NIXMOX_BENCH_RENDER_SIZE=N` the re-rendered project, `0` to skip it,
//! `NIXMOX_BENCH_TMP=DIR` where the projects are written, `NIXMOX_BENCH_KEEP=1` keeps them).
//! Without `--bench` (as under `cargo test --all-targets`) it only evaluates the anchor of a
//! 100-service project and checks that it holds every service.

#[path = "../../nixmox-core/benches/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{benching, generate, machine, ms, sizes, stats, us_per, Generated};
use nixmox_core::syntax::{self, Format, Kind, Node};

const SIZES: [usize; 3] = [1_000, 5_000, 20_000];
/// Goals from issue 17.
const GOAL_RATIO: f64 = 0.5;
const GOAL_PLAN: Duration = Duration::from_millis(300);
const GOAL_CONFIG: Duration = Duration::from_millis(300);
const GOAL_CONFIG_RSS_MIB: f64 = 100.0;
const GOAL_RERENDER: Duration = Duration::from_millis(500);

fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/nixmox")
}

// ------------------------------------------------------------------------- the anchor's file

/// A Nix string literal, written by the renderers' one printer (`nixexpr::quote`).
fn nix_string(s: &str, out: &mut String) {
    out.push_str(&nixmox_core::nixexpr::quote(s));
}

/// A YAML value as the same Nix value (maps as attribute sets with quoted names).
fn nix_value(n: &Node, out: &mut String) {
    match &n.kind {
        Kind::Null => out.push_str("null"),
        Kind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Kind::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Kind::Float(f) => {
            let _ = write!(out, "{f:?}");
        }
        Kind::Str(s) => nix_string(s, out),
        Kind::Seq(items) => {
            out.push('[');
            for i in items {
                out.push(' ');
                // A list element that is not a plain value needs parentheses in Nix only when
                // it is a function application; none of these are, but keep it safe.
                out.push('(');
                nix_value(i, out);
                out.push(')');
            }
            out.push_str(" ]");
        }
        Kind::Map(entries) => {
            out.push('{');
            for e in entries {
                out.push(' ');
                nix_string(&e.key, out);
                out.push_str(" = ");
                nix_value(&e.value, out);
                out.push(';');
            }
            out.push_str(" }");
        }
    }
}

/// The anchor: `{ project = <nixmox.yaml>; services = { NAME = <manifest>; ... }; }`, built from
/// the same parsed files NixMox reads.
fn anchor_nix(p: &Generated) -> String {
    let mut out = String::with_capacity(p.files.iter().map(|(_, t)| t.len()).sum::<usize>() * 2);
    out.push_str("{\n  project = ");
    let mut services = String::new();
    for (path, text) in &p.files {
        let node = syntax::parse(text, Format::from_path(path))
            .expect("the generated files parse")
            .expect("the generated files are not empty");
        if path == "nixmox.yaml" {
            nix_value(&node, &mut out);
            out.push_str(";\n");
        } else {
            let name = node
                .get("name")
                .and_then(Node::as_str)
                .expect("every manifest has a name");
            services.push_str("    ");
            nix_string(name, &mut services);
            services.push_str(" = ");
            nix_value(&node, &mut services);
            services.push_str(";\n");
        }
    }
    out.push_str("  services = {\n");
    out.push_str(&services);
    out.push_str("  };\n}\n");
    out
}

// ------------------------------------------------------------------------- running commands

fn write_project(dir: &Path, p: &Generated) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("removing an old benchmark project");
    }
    for (path, text) in &p.files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().expect("a file has a directory"))
            .expect("creating a service directory");
        std::fs::write(&file, text).expect("writing a manifest");
    }
    for path in &p.existing {
        std::fs::write(dir.join(path), "{ ... }: { }\n").expect("writing a module");
    }
}

/// Runs a command with stdout to /dev/null; its wall time, or why it failed.
fn run(cmd: &mut Command) -> Result<Duration, String> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} exited with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(took)
}

/// Peak resident set size (MiB) and CPU time (user + system, ms) of one run, read from GNU
/// time's `%M %U %S`.
fn peak_rss(program: &Path, args: &[&str]) -> Option<(f64, f64)> {
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M %U %S")
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fields: Vec<f64> = stderr
        .lines()
        .last()?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    match fields[..] {
        [kib, user, sys] => Some((kib / 1024.0, (user + sys) * 1e3)),
        _ => None,
    }
}

fn nixmox(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.arg("-C").arg(dir).args(args);
    c
}

fn anchor(file: &Path) -> Command {
    let mut c = Command::new("nix-instantiate");
    c.args(["--eval", "--strict", "--json"]).arg(file);
    c
}

fn tmp() -> PathBuf {
    std::env::var_os("NIXMOX_BENCH_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: a number"))
    })
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

// ------------------------------------------------------------------------- the two halves

const COMMANDS: [(&str, &[&str]); 3] = [
    ("validate", &["validate"]),
    ("plan --format json", &["plan", "--format", "json"]),
    ("config --format json", &["config", "--format", "json"]),
];

fn side_by_side(n: usize) {
    let p = generate(n);
    let dir = tmp().join(format!("nixmox-anchor-{n}"));
    write_project(&dir, &p);
    let nix_file = dir.join("anchor.nix");
    std::fs::write(&nix_file, anchor_nix(&p)).expect("writing the anchor");
    let rounds = env_usize("NIXMOX_BENCH_RUNS").unwrap_or(if n >= 20_000 { 5 } else { 9 });

    // One warm-up of each (page cache, the Nix store's database), then the rounds.
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 1 + COMMANDS.len()];
    for round in 0..=rounds {
        let mut took = vec![run(&mut anchor(&nix_file)).unwrap_or_else(|e| panic!("{e}"))];
        for (_, args) in COMMANDS {
            took.push(run(&mut nixmox(&dir, args)).unwrap_or_else(|e| panic!("{e}")));
        }
        if round > 0 {
            for (t, all) in took.into_iter().zip(&mut times) {
                all.push(t);
            }
        }
    }
    let stats: Vec<_> = times.into_iter().map(stats).collect();
    let nix_program = PathBuf::from("nix-instantiate");
    let nix_file_arg = nix_file.to_string_lossy().into_owned();
    let dir_arg = dir.to_string_lossy().into_owned();
    let mut rss = vec![peak_rss(
        &nix_program,
        &["--eval", "--strict", "--json", &nix_file_arg],
    )];
    for (_, args) in COMMANDS {
        let mut full = vec!["-C", &dir_arg];
        full.extend_from_slice(args);
        rss.push(peak_rss(&binary(), &full));
    }

    let anchor_t = stats[0].median;
    println!();
    println!(
        "{n} services ({:.1} MB of manifests, anchor.nix {:.1} MB), {rounds} rounds:",
        p.files.iter().map(|(_, t)| t.len()).sum::<usize>() as f64 / 1e6,
        std::fs::metadata(&nix_file).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    println!();
    println!("| command | median (ms) | best (ms) | µs/service | × anchor | peak RSS (MiB) | CPU, one run (ms) |");
    println!("|:--------|------------:|----------:|-----------:|---------:|---------------:|------------------:|");
    let names = std::iter::once("anchor: nix-instantiate --eval --strict --json")
        .chain(COMMANDS.iter().map(|(name, _)| *name));
    for ((name, s), r) in names.zip(&stats).zip(&rss) {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} |",
            ms(s.median),
            ms(s.best),
            us_per(s.median, n),
            s.median.as_secs_f64() / anchor_t.as_secs_f64(),
            r.map(|(rss, _)| format!("{rss:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.map(|(_, cpu)| format!("{cpu:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let ratio = stats[1].median.as_secs_f64() / anchor_t.as_secs_f64();
    if n == 5_000 {
        println!();
        println!(
            "goals at 5,000: validate ≤ {GOAL_RATIO}× anchor: {:.2}× ({}); plan < {} ms: {} ({}); config < {} ms: {} ({}), < {GOAL_CONFIG_RSS_MIB} MiB: {} ({})",
            ratio,
            mark(ratio <= GOAL_RATIO),
            GOAL_PLAN.as_millis(),
            format_args!("{:.1}", ms(stats[2].median)),
            mark(stats[2].median < GOAL_PLAN),
            GOAL_CONFIG.as_millis(),
            format_args!("{:.1}", ms(stats[3].median)),
            mark(stats[3].median < GOAL_CONFIG),
            rss[3]
                .map(|(r, _)| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into()),
            mark(rss[3].is_some_and(|(r, _)| r < GOAL_CONFIG_RSS_MIB)),
        );
    }
    finish(&dir);
}

fn rerender(n: usize) {
    let p = generate(n);
    let dir = tmp().join(format!("nixmox-rerender-{n}"));
    write_project(&dir, &p);
    let rounds = env_usize("NIXMOX_BENCH_RUNS").unwrap_or(9);
    // The first render writes everything (timed once, for the record).
    let first = run(&mut nixmox(&dir, &["render"])).unwrap_or_else(|e| panic!("{e}"));
    let (path, text) = p
        .files
        .iter()
        .find(|(path, _)| path.ends_with("app00001/manifest.yaml"))
        .expect("the generator makes app00001");
    let manifest = dir.join(path);
    let mut changed = Vec::new();
    let mut unchanged = Vec::new();
    for round in 0..=rounds {
        let edited = text.replacen(
            "description: Synthetic application number 1\n",
            &format!("description: Synthetic application number 1, edit {round}\n"),
            1,
        );
        assert_ne!(&edited, text, "the edit changes the manifest");
        std::fs::write(&manifest, edited).expect("editing a manifest");
        let t = run(&mut nixmox(&dir, &["render"])).unwrap_or_else(|e| panic!("{e}"));
        let same = run(&mut nixmox(&dir, &["render"])).unwrap_or_else(|e| panic!("{e}"));
        if round > 0 {
            changed.push(t);
            unchanged.push(same);
        }
    }
    let changed = stats(changed);
    let unchanged = stats(unchanged);
    println!();
    println!("re-render of {n} services into `.nixmox/build` ({rounds} rounds):");
    println!();
    println!("| render | median (ms) | best (ms) |");
    println!("|:-------|------------:|----------:|");
    println!(
        "| first (nothing on disk, one run) | {:.1} | - |",
        ms(first)
    );
    println!(
        "| one service's description changed | {:.1} | {:.1} |",
        ms(changed.median),
        ms(changed.best)
    );
    println!(
        "| nothing changed | {:.1} | {:.1} |",
        ms(unchanged.median),
        ms(unchanged.best)
    );
    println!();
    println!(
        "goal: re-render with one service changed < {} ms: {:.1} ({})",
        GOAL_RERENDER.as_millis(),
        ms(changed.median),
        mark(changed.median < GOAL_RERENDER)
    );
    finish(&dir);
}

fn finish(dir: &Path) {
    if std::env::var_os("NIXMOX_BENCH_KEEP").is_some() {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn main() {
    if !benching() {
        // `cargo test --all-targets` runs this binary too: evaluate a small anchor and check it
        // holds every service, so the benchmark's reference is known to be right.
        let p = generate(100);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("anchor.nix");
        std::fs::write(&file, anchor_nix(&p)).expect("writing the anchor");
        let out = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .arg(&file)
            .output()
            .expect("nix-instantiate is needed (scripts/install-tools nix)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["services"].as_object().map(|m| m.len()), Some(100));
        assert_eq!(v["services"]["app00003"]["name"], "app00003");
        println!("bench anchor: smoke check passed (run `cargo bench -p nixmox --bench anchor` to measure)");
        return;
    }
    assert!(
        binary().is_file(),
        "{} is missing: build it first with `cargo build --release -p nixmox`",
        binary().display()
    );
    println!("NixMox and the anchor side by side; {}", machine());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for n in sizes(&SIZES) {
        side_by_side(n);
    }
    let render_size = env_usize("NIXMOX_BENCH_RENDER_SIZE").unwrap_or(1_000);
    if render_size > 0 {
        rerender(render_size);
    }
}
