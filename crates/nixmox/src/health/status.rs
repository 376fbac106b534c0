//! Live health for `nixmox ps`: every service's liveness and readiness checks (its startup
//! checks when it has neither), each run once, all at the same time, each bounded by the
//! shorter of its own timeout and the caller's. No retries: `ps` reports the present.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nixmox_core::Project;

use super::probe::{Probe, Role};
use super::verify;
use super::Context;

/// At most this many checks run at once.
pub const MAX_PARALLEL: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy,
    /// The service has no checks.
    NoChecks,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::NoChecks => "no checks",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// Like `readiness tcp`.
    pub check: String,
    pub target: String,
    pub ok: bool,
    /// What was seen when it passed; the whole failure message when it did not.
    pub detail: String,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub service: String,
    pub health: Health,
    pub checks: Vec<CheckResult>,
}

/// The probes `ps` runs for a service.
pub fn live_probes(s: &nixmox_core::model::Service) -> Vec<Probe> {
    let probes = verify::checks(s, &[Role::Liveness, Role::Readiness]);
    if probes.is_empty() {
        verify::checks(s, &[Role::Startup])
    } else {
        probes
    }
}

/// Runs the live checks of the services named (all when `only` is empty), in parallel.
pub fn live(
    ctx: &Context,
    project: &Project,
    only: &[String],
    timeout: Duration,
) -> Vec<ServiceHealth> {
    let services: Vec<&nixmox_core::model::Service> = project
        .services
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.name.as_str()))
        .collect();
    // (service index, probe, its timeout)
    let mut jobs: Vec<(usize, Probe, Duration)> = Vec::new();
    for (i, s) in services.iter().enumerate() {
        let own = Duration::from_millis(s.health.timing.timeout_ms);
        for p in live_probes(s) {
            jobs.push((i, p, own.min(timeout)));
        }
    }
    let results: Mutex<Vec<Option<CheckResult>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let workers = jobs.len().min(MAX_PARALLEL);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some((_, probe, t)) = jobs.get(k) else {
                    return;
                };
                let start = Instant::now();
                let r = probe.run(ctx, *t, None);
                let res = CheckResult {
                    check: probe.check_name(),
                    target: probe.target(),
                    ok: r.is_ok(),
                    detail: match r {
                        Ok(d) => d,
                        Err(f) => f.to_string(),
                    },
                    duration: start.elapsed(),
                };
                if let Ok(mut all) = results.lock() {
                    all[k] = Some(res);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let mut out: Vec<ServiceHealth> = services
        .iter()
        .map(|s| ServiceHealth {
            service: s.name.to_string(),
            health: Health::NoChecks,
            checks: Vec::new(),
        })
        .collect();
    for ((i, _, _), r) in jobs.iter().zip(results) {
        if let Some(r) = r {
            out[*i].checks.push(r);
        }
    }
    for sh in &mut out {
        sh.health = if sh.checks.is_empty() {
            Health::NoChecks
        } else if sh.checks.iter().all(|c| c.ok) {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
    }
    out
}
