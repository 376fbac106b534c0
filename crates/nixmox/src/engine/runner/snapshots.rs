//! Snapshots around deploys (issue 14, docs/engine.md "Rollback"): taken through the PVE API
//! before a step changes a container's system, restored when its health gate fails.

use std::time::Instant;

use nixmox_core::model::{Service, SnapshotMode};
use nixmox_core::snapshot;

use super::{SnapshotHook, StepExec, StepReport, Taken};
use crate::engine::scheduler::Outcome;
use crate::exec::scrub;

impl StepExec<'_> {
    /// Snapshots the step's container (and the database host of a service that owns a
    /// database) before its deploy; the report keeps what was taken. `Err` is the step's
    /// failure (`required` mode); under `best-effort` a snapshot that cannot be taken is a
    /// warning.
    pub(super) fn snapshot_before(
        &self,
        index: usize,
        service: &str,
        started: Instant,
        report: &mut StepReport,
    ) -> Result<(), Outcome> {
        let Some(hook) = &self.snapshots else {
            return Ok(());
        };
        let step = &self.plan.steps[index];
        let Some(s) = self.project.service(service) else {
            return Ok(());
        };
        let targets = snapshot::targets(self.project, step.phase(), s);
        if hook.policy.mode == SnapshotMode::Off || targets.is_empty() {
            return Ok(());
        }
        let required = hook.policy.mode == SnapshotMode::Required;
        let fail = |msg: String| Outcome::Failed {
            error: format!(
                "{}: {} (proxmox.snapshots.mode is `required`, so nothing was deployed)",
                step.id,
                scrub(&msg, &self.redactions())
            ),
            transient: false,
        };
        let client = match &hook.client {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("no snapshot before the deploy: {e}");
                if required {
                    return Err(fail(msg));
                }
                report
                    .warnings
                    .push(format!("{}: {msg}; deploying without one", step.id));
                return Ok(());
            }
        };
        let deadline = started + self.timeout;
        let mut lines = Vec::new();
        let mut result = Ok(());
        for (target, kind) in targets {
            let name = snapshot::name(hook.run, kind, s.name.as_str());
            let vmid = target.host.vmid.get();
            // A retried step (a transient deploy failure) keeps the snapshot of its first try.
            if report
                .snapshots
                .iter()
                .any(|x| x.vmid == vmid && x.name == name)
            {
                continue;
            }
            let snap = Snap {
                hook,
                client,
                target,
                kind,
                name,
                deadline,
            };
            match self.take_one(index, &snap, &mut lines) {
                Ok(taken) => report.snapshots.push(taken),
                Err(msg) => {
                    if required {
                        result = Err(fail(msg));
                        break;
                    }
                    report.warnings.push(format!(
                        "{}: {msg}; deploying without it (proxmox.snapshots.mode: best-effort)",
                        step.id
                    ));
                }
            }
        }
        self.append_log(index, &lines);
        result
    }

    /// Takes one snapshot, adding what happened to the log's lines. `Err` says why it was not
    /// taken.
    fn take_one(
        &self,
        index: usize,
        snap: &Snap,
        lines: &mut Vec<String>,
    ) -> Result<Taken, String> {
        let step = &self.plan.steps[index];
        let (vmid, node) = (snap.target.host.vmid.get(), snap.target.host.node.as_str());
        let t0 = Instant::now();
        match crate::proxmox::snapshot::take(
            snap.client,
            node,
            vmid,
            &snap.name,
            &snapshot::description(snap.hook.run, &step.id),
            snap.deadline,
        ) {
            Ok(waited) => {
                if let Some((lock, d)) = waited {
                    lines.push(format!(
                        "CT {vmid} was locked ({lock}): waited {:.1}s for it",
                        d.as_secs_f64()
                    ));
                }
                lines.push(format!(
                    "snapshot {} of CT {vmid} (`{}`) on {node}: taken in {:.2}s",
                    snap.name,
                    snap.target.host.hostname,
                    t0.elapsed().as_secs_f64()
                ));
                Ok(Taken {
                    service: snap.target.name.to_string(),
                    hostname: snap.target.host.hostname.to_string(),
                    vmid,
                    node: node.to_string(),
                    name: snap.name.clone(),
                    own: snap.kind != snapshot::Kind::Db,
                })
            }
            Err(e) => {
                let msg = format!(
                    "snapshot of CT {vmid} (`{}`) on node {node}: {e}",
                    snap.target.host.hostname
                );
                lines.push(msg.clone());
                Err(msg)
            }
        }
    }

    /// Restores the snapshots the step took (its own host first), starts the containers and
    /// checks the service's health again. `None`: no snapshot to go back to (or `--rollback
    /// generation`); `Err`: the own host's snapshot could not be restored.
    #[allow(clippy::type_complexity)]
    pub(super) fn snapshot_back(
        &self,
        index: usize,
        s: &Service,
        taken: &[Taken],
    ) -> Option<Result<(Vec<String>, Vec<(u32, String)>), String>> {
        let hook = self.snapshots.as_ref()?;
        if !self.rollback.as_ref().is_some_and(|r| r.snapshot) {
            return None;
        }
        let mut taken: Vec<Taken> = taken.to_vec();
        if !taken.iter().any(|t| t.own) {
            return None;
        }
        taken.sort_by_key(|t| !t.own);
        let client = hook.client.as_ref().ok()?;
        let deadline = std::time::Instant::now() + self.timeout;
        let mut done = Vec::new();
        let mut snaps = Vec::new();
        let mut lines = Vec::new();
        for t in &taken {
            let t0 = std::time::Instant::now();
            match crate::proxmox::snapshot::rollback(
                client, &t.node, t.vmid, &t.name, true, deadline,
            ) {
                Ok(_) => {
                    let what = format!(
                        "CT {} (`{}`) rolled back to snapshot {} and started",
                        t.vmid, t.hostname, t.name
                    );
                    lines.push(format!("{what} in {:.2}s", t0.elapsed().as_secs_f64()));
                    done.push(what);
                    snaps.push((t.vmid, t.name.clone()));
                }
                Err(e) if t.own => {
                    lines.push(format!("rollback to {} failed: {e}", t.name));
                    self.append_log(index, &lines);
                    return Some(Err(format!(
                        "CT {} (`{}`) not rolled back to snapshot {}: {e}",
                        t.vmid, t.hostname, t.name
                    )));
                }
                Err(e) => {
                    lines.push(format!("rollback to {} failed: {e}", t.name));
                    done.push(format!(
                        "CT {} (`{}`) NOT rolled back to snapshot {}: {e}",
                        t.vmid, t.hostname, t.name
                    ));
                }
            }
        }
        self.append_log(index, &lines);
        // The same gate again, now against the restored container.
        match self.health_gate(
            index,
            s.name.as_str(),
            std::time::Instant::now(),
            true,
            String::new(),
        ) {
            Outcome::Done { detail, .. } => {
                let detail = detail.trim_start_matches("; ").trim();
                done.push(if detail.is_empty() {
                    "no health checks to run again".to_string()
                } else {
                    format!("health after the rollback: {detail}")
                });
            }
            Outcome::Failed { error, .. } => {
                done.push(format!("health after the rollback: still failing: {error}"))
            }
        }
        Some(Ok((done, snaps)))
    }
}

/// One snapshot to take before a deploy.
struct Snap<'a> {
    hook: &'a SnapshotHook,
    client: &'a crate::proxmox::Client,
    target: &'a Service,
    kind: snapshot::Kind,
    name: String,
    deadline: Instant,
}
