//! What the engine's steps run: the health gate after a deploy (startup checks, then readiness
//! checks) and `verify:S` (liveness checks and the end-to-end checks, together). Each returns
//! a one-line summary, or the failures on one line (`; ` between them).

use std::path::Path;
use std::time::Instant;

use nixmox_core::model::{Project, Service};

use super::gate::{self, Limits, Timing};
use super::probe::{Probe, Role};
use super::{verify, Context};

/// After a deploy of `s` (which ended at `since`): its startup checks must pass, then its
/// readiness checks. `Ok` says how many passed (`None` when it has none).
pub fn after_deploy(
    ctx: &Context,
    s: &Service,
    since: Instant,
    deadline: Option<Instant>,
    log: Option<&Path>,
) -> Result<Option<String>, String> {
    let timing = Timing::from(s.health.timing);
    let limits = Limits {
        deadline,
        cancel: None,
        log,
    };
    let mut passed = 0;
    for role in [Role::Startup, Role::Readiness] {
        let probes = verify::checks(s, &[role]);
        if probes.is_empty() {
            continue;
        }
        passed += run(ctx, &probes, timing, since, limits)?;
    }
    Ok((passed > 0).then(|| format!("{passed} startup/readiness check(s) passed")))
}

/// `verify:S`: its liveness checks and the end-to-end checks derived from the manifests, with
/// the service's timing.
pub fn verify_service(
    ctx: &Context,
    project: &Project,
    s: &Service,
    since: Instant,
    deadline: Option<Instant>,
    log: Option<&Path>,
) -> Result<String, String> {
    let mut probes = verify::checks(s, &[Role::Liveness]);
    let liveness = probes.len();
    let e2e = verify::end_to_end(project, s);
    let mut kinds: Vec<&str> = e2e.iter().map(|p| p.kind_name()).collect();
    kinds.dedup();
    let e2e_count = e2e.len();
    probes.extend(e2e);
    if probes.is_empty() {
        return Ok("nothing to check".into());
    }
    let timing = Timing::from(s.health.timing);
    let limits = Limits {
        deadline,
        cancel: None,
        log,
    };
    run(ctx, &probes, timing, since, limits)?;
    Ok(format!(
        "{liveness} liveness check(s) and {e2e_count} end-to-end check(s){} passed",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    ))
}

/// Waits for all probes; the number that passed, or every failure.
fn run(
    ctx: &Context,
    probes: &[Probe],
    timing: Timing,
    since: Instant,
    limits: Limits<'_>,
) -> Result<usize, String> {
    let results = gate::wait_all(ctx, probes, timing, since, limits);
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|u| u.to_string()))
        .collect();
    if failures.is_empty() {
        Ok(results.len())
    } else {
        Err(failures.join("; "))
    }
}
