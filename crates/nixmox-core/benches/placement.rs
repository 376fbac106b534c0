//! Placement benchmark (a plain `harness = false` binary): 5,000 services on 50 nodes, every
//! one placed afresh (no lock), a tenth of them in spread groups of five and a twentieth
//! pinned, as `nixmox rebalance` places them; then the same with every service recorded in the
//! lock, as `up` places them. Median and best of several runs.
//!
//! Run: `cargo bench -p nixmox-core --bench placement`. Without `--bench` (as under
//! `cargo test --all-targets`) it places a small cluster once.

mod common;

use std::time::{Duration, Instant};

use common::{benching, machine, ms, stats};
use nixmox_core::placement::{place, Candidate, Want};

/// Goal from issue 15: 5,000 services on 50 nodes in under 50 ms.
const GOAL: Duration = Duration::from_millis(50);

fn main() {
    let (services, nodes) = if benching() { (5_000, 50) } else { (50, 5) };
    let candidates: Vec<Candidate> = (0..nodes)
        .map(|i| Candidate {
            name: format!("pve{i:02}"),
            online: i % 17 != 16,
            placeable: true,
            memory: Some(512 * 1024),
            cores: Some(64),
            weight: 1,
        })
        .collect();
    let names: Vec<String> = (0..services).map(|i| format!("svc{i:05}")).collect();
    let groups: Vec<String> = (0..services / 50).map(|g| format!("group{g}")).collect();
    let wants: Vec<Want> = names
        .iter()
        .enumerate()
        .map(|(i, name)| Want {
            name,
            memory: 256 << (i % 4),
            cores: 1 + (i % 4) as u32,
            pin: (i % 20 == 7).then(|| candidates[i % nodes].name.as_str()),
            locked: None,
            spread: (i % 10 == 3).then(|| groups[(i / 50) % groups.len()].as_str()),
        })
        .collect();
    let fresh = place(&candidates, &wants, true, true);
    assert!(fresh.problems.is_empty(), "{:?}", &fresh.problems[..1]);
    if !benching() {
        return;
    }
    let locked: Vec<Want> = wants
        .iter()
        .zip(&fresh.nodes)
        .map(|(w, p)| Want {
            locked: p.map(|(n, _)| candidates[n].name.as_str()),
            ..w.clone()
        })
        .collect();
    println!("machine: {}", machine());
    for (label, wants, fresh) in [("fresh", &wants, true), ("locked", &locked, false)] {
        let runs: Vec<Duration> = (0..15)
            .map(|_| {
                let t = Instant::now();
                let p = place(&candidates, wants, true, fresh);
                std::hint::black_box(&p);
                t.elapsed()
            })
            .collect();
        let s = stats(runs);
        println!(
            "placement {label}: {services} services on {nodes} nodes: median {:.2} ms, best {:.2} ms (goal {:.0} ms)",
            ms(s.median),
            ms(s.best),
            ms(GOAL)
        );
    }
}
