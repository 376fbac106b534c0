//! What `up` does with each step's progress, on the main thread: the state store's rows
//! (a step's start, its end with what its [`StepReport`] produced, the snapshots it took and
//! what its rollback restored) and the reporter's events.

use std::collections::BTreeSet;

use nixmox_core::plan::{Change, Plan};
use nixmox_core::record::Record;

use super::events::{self, Event, Reporter, SummaryRow};
use super::runner::{RolledBack, StepExec, StepReport};
use super::scheduler::{Final, Outcome, Progress, Skip, StepStatus};
use crate::error::Error;
use crate::state::{self, RunId, StepFinish, Store};

/// The main thread's side of a run while the scheduler executes it. Store errors do not stop
/// the run (its steps are already running); the first is kept and returned when it ends.
pub(super) struct Recorder<'r, 'e> {
    plan: &'r Plan,
    record: &'r Record,
    exec: &'r StepExec<'e>,
    store: &'r mut Store,
    reporter: &'r mut dyn Reporter,
    run: RunId,
    /// Steps whose rollback restored something.
    pub rolled_back: usize,
    /// Containers snapshotted in this run (vmid, node), for retention.
    pub snapshotted: BTreeSet<(u32, String)>,
    /// The first error writing the store.
    store_error: Option<Error>,
}

impl<'r, 'e> Recorder<'r, 'e> {
    pub fn new(
        store: &'r mut Store,
        reporter: &'r mut dyn Reporter,
        plan: &'r Plan,
        record: &'r Record,
        exec: &'r StepExec<'e>,
        run: RunId,
    ) -> Self {
        Recorder {
            plan,
            record,
            exec,
            store,
            reporter,
            run,
            rolled_back: 0,
            snapshotted: BTreeSet::new(),
            store_error: None,
        }
    }

    /// The run's result has been recorded: the reporter's last word, and the first store
    /// error of the run, if any.
    pub fn finish(self, rows: &[SummaryRow]) -> Option<Error> {
        self.reporter.summary(rows);
        self.store_error
    }

    /// The store and the reporter again, for what follows the steps (retention, the run's
    /// end).
    pub fn parts(&mut self) -> (&mut Store, &mut dyn Reporter) {
        (self.store, self.reporter)
    }

    pub fn progress(&mut self, p: Progress<StepReport>) {
        match p {
            Progress::Started { index, attempt } => self.started(index, attempt),
            Progress::Retrying {
                index,
                attempt,
                delay,
                error,
            } => self.reporter.event(&Event::StepRetrying {
                step: self.plan.steps[index].id.clone(),
                attempt,
                delay_ms: events::ms(delay),
                error,
            }),
            Progress::Ended {
                index,
                ended,
                report,
            } => self.ended(index, &ended, report),
            Progress::Tick => self.reporter.tick(),
        }
    }

    fn store_result(&mut self, result: Result<(), state::StateError>) {
        if let Err(e) = result {
            self.store_error.get_or_insert(Error::State(e));
        }
    }

    fn started(&mut self, index: usize, attempt: u32) {
        let step = &self.plan.steps[index];
        if attempt == 1 {
            let log = self.exec.log_path(index);
            let r = self
                .store
                .step_started(self.run, &step.id, &step.hash, Some(&log));
            self.store_result(r);
        }
        self.reporter.event(&Event::StepStarted {
            step: step.id.clone(),
            attempt,
            expected_ms: self.record.get(&step.id).and_then(|r| r.duration_ms),
        });
    }

    /// Reports why a step did not run; `false` when nothing is recorded for it (an
    /// unchanged or held step, an orphan).
    fn not_run(&mut self, index: usize, ended: &Final) -> bool {
        let step = &self.plan.steps[index];
        let skipped = |reason: String| Event::StepSkipped {
            step: step.id.clone(),
            reason,
        };
        match ended.status {
            StepStatus::Skipped(Skip::Unchanged) => {
                match &step.held {
                    Some(note) if step.change != Change::Unchanged => {
                        self.reporter.event(&skipped(format!("held: {note}")));
                        self.reporter.event(&Event::Warning {
                            message: format!("{} not run: {note}", step.id),
                        });
                    }
                    _ => self.reporter.event(&skipped("unchanged".into())),
                }
                false
            }
            StepStatus::Skipped(Skip::Noop) => {
                self.reporter.event(&skipped("nothing to do".into()));
                step.change != Change::Delete
            }
            StepStatus::DependencyFailed => {
                let dep = self.dependency(ended);
                self.reporter.event(&skipped(format!("{dep} failed")));
                true
            }
            StepStatus::Cancelled => {
                self.reporter.event(&skipped("cancelled".into()));
                true
            }
            StepStatus::Changed | StepStatus::Unchanged | StepStatus::Failed => true,
        }
    }

    fn dependency(&self, ended: &Final) -> String {
        ended
            .failed_dependency
            .map(|d| self.plan.steps[d].id.to_string())
            .unwrap_or_default()
    }

    fn ended(&mut self, index: usize, ended: &Final, report: Option<StepReport>) {
        if !self.not_run(index, ended) {
            return;
        }
        let step = &self.plan.steps[index];
        let (detail, error) = match (ended.status, report.as_ref().map(|r| &r.outcome)) {
            (_, Some(Outcome::Done { detail, .. })) => (detail.clone(), None),
            (_, Some(Outcome::Failed { error, .. })) => (String::new(), Some(error.clone())),
            (StepStatus::DependencyFailed, None) => (
                String::new(),
                Some(format!("not run: {} failed", self.dependency(ended))),
            ),
            (StepStatus::Cancelled, None) => (String::new(), Some("cancelled".into())),
            (_, None) => (String::new(), None),
        };
        let duration_ms = ended.duration.map(events::ms).unwrap_or(0);
        let report = report.unwrap_or_else(|| StepReport::start(None));
        for w in &report.warnings {
            self.reporter.event(&Event::Warning { message: w.clone() });
        }
        let at = state::timestamp();
        let snapshots: Vec<state::SnapshotRow> = report
            .snapshots
            .iter()
            .map(|t| state::SnapshotRow {
                vmid: t.vmid,
                node: t.node.clone(),
                name: t.name.clone(),
                service: t.service.clone(),
                run: Some(self.run),
                step_id: Some(step.id.to_string()),
                taken_at: at.clone(),
                rolled_back: None,
            })
            .collect();
        self.snapshotted
            .extend(report.snapshots.iter().map(|t| (t.vmid, t.node.clone())));
        // A deploy records the secrets file it actually shipped (it may have been written
        // during this run).
        let (parts, input_hash) = match &report.secrets {
            Some(shipped) => {
                crate::secrets::with_secrets_part(&step.parts, shipped.file_hash.as_deref())
            }
            None => (step.parts.clone(), step.hash.clone()),
        };
        let fin = StepFinish {
            step_id: step.id.clone(),
            input_hash,
            parts,
            status: ended.status,
            duration_ms,
            error: error.clone(),
            outputs: report.outputs,
            rendered: report.rendered,
            refused: report.refused,
            // A rolled-back failure is held: the next `up` does not repeat it with the
            // same input (issue 14).
            held: report
                .rollback
                .as_ref()
                .filter(|r| r.any)
                .map(|r| r.reason.clone()),
            snapshots,
        };
        let r = self.store.step_finished(self.run, &fin);
        self.store_result(r);
        if let Some(rb) = report.rollback {
            self.rolled_back_step(index, rb);
        }
        if ended.status.ran() {
            self.reporter.event(&Event::StepFinished {
                step: step.id.clone(),
                status: ended.status,
                changed: ended.status == StepStatus::Changed,
                duration_ms,
                detail,
                error,
            });
        }
    }

    /// A rollback: the snapshots rolled back to, and the re-applied Terraform steps recorded
    /// as they now are: at their previous inputs, so the next run applies the new ones again.
    fn rolled_back_step(&mut self, index: usize, rb: RolledBack) {
        let step = &self.plan.steps[index];
        for (vmid, name) in &rb.snapshots {
            let r = self.store.snapshot_rolled_back(*vmid, name, Some(self.run));
            self.store_result(r);
        }
        for r in rb.restored {
            // The input it was rolled back from is held like the deploy itself.
            let new_hash = self
                .plan
                .steps
                .iter()
                .find(|s| s.id == r.step_id)
                .map(|s| s.hash.clone());
            let fin = StepFinish {
                step_id: r.step_id.clone(),
                input_hash: r.record.hash,
                parts: r.record.parts,
                status: StepStatus::Changed,
                duration_ms: r.record.duration_ms.unwrap_or(0),
                error: None,
                outputs: r.outputs,
                rendered: Some(r.rendered),
                refused: None,
                held: None,
                snapshots: Vec::new(),
            };
            let done = self.store.step_finished(self.run, &fin);
            self.store_result(done);
            if let Some(hash) = new_hash {
                let reason = format!("{} after it applied: {}", step.id, rb.reason);
                let held = self.store.hold_step(&r.step_id, self.run, &hash, &reason);
                self.store_result(held);
            }
        }
        if rb.any {
            self.rolled_back += 1;
            self.reporter.event(&Event::RolledBack {
                step: step.id.clone(),
                detail: rb.detail,
            });
        } else {
            self.reporter.event(&Event::Warning {
                message: format!("{}: rollback restored nothing: {}", step.id, rb.detail),
            });
        }
    }
}

/// The summary's rows: each step of the plan with how it ended.
pub fn summary_rows(plan: &Plan, finals: &[Final]) -> Vec<SummaryRow> {
    plan.steps
        .iter()
        .zip(finals)
        .map(|(s, f)| SummaryRow {
            step: s.id.clone(),
            result: f.status,
            duration_ms: f.duration.filter(|_| f.status.ran()).map(events::ms),
        })
        .collect()
}
