//! What `up` does with the scheduler's progress: each step's start, retries and end recorded
//! in the state store (with its outputs, rendered inputs, snapshots and rollback) and reported
//! as events. It runs on the scheduler's calling thread; it prints nothing itself.

use std::collections::BTreeSet;
use std::time::Duration;

use nixmox_core::plan::{Change, Plan, Step};
use nixmox_core::record::Record;

use super::events::{self, Event, Reporter, SummaryRow};
use super::runner::{RolledBack, StepExec};
use super::scheduler::{Final, Progress, Skip};
use crate::error::Error;
use crate::state::{self, RunId, StepFinish, StepStatus, Store};

/// Records and reports one run's progress. Store errors do not stop the run (its steps are
/// already running); the first is kept and returned when the run ends.
pub struct Recorder<'r, 'e> {
    store: &'r mut Store,
    reporter: &'r mut dyn Reporter,
    plan: &'r Plan,
    record: &'r Record,
    exec: &'r StepExec<'e>,
    run: RunId,
    /// How many steps were rolled back after a failed health gate.
    pub rolled_back: usize,
    /// The containers snapshotted in this run, for retention after it: (vmid, node).
    pub snapshotted: BTreeSet<(u32, String)>,
    store_error: Option<Error>,
}

/// How a step ended, as the store records it and the reporter shows it.
struct Ending {
    status: StepStatus,
    changed: bool,
    duration: Option<Duration>,
    detail: String,
    error: Option<String>,
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
            store,
            reporter,
            plan,
            record,
            exec,
            run,
            rolled_back: 0,
            snapshotted: BTreeSet::new(),
            store_error: None,
        }
    }

    /// The scheduler's progress callback.
    pub fn progress(&mut self, progress: Progress) {
        match progress {
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
            Progress::Ended { index, outcome } => self.ended(index, &outcome),
            Progress::Tick => self.reporter.tick(),
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

    fn keep(&mut self, result: Result<(), state::StateError>) {
        if let Err(e) = result {
            self.store_error.get_or_insert(Error::State(e));
        }
    }

    fn started(&mut self, index: usize, attempt: u32) {
        let step = &self.plan.steps[index];
        if attempt == 1 {
            let log = self.exec.log_path(index);
            let result = self
                .store
                .step_started(self.run, &step.id, &step.hash, Some(&log));
            self.keep(result);
        }
        self.reporter.event(&Event::StepStarted {
            step: step.id.clone(),
            attempt,
            expected_ms: self.record.get(&step.id).and_then(|r| r.duration_ms),
        });
    }

    fn ended(&mut self, index: usize, outcome: &Final) {
        let plan = self.plan;
        let step = &plan.steps[index];
        let Some(ending) = self.ending(step, outcome) else {
            return;
        };
        self.record_finish(index, step, &ending);
        if matches!(outcome, Final::Succeeded { .. } | Final::Failed { .. }) {
            self.reporter.event(&Event::StepFinished {
                step: step.id.clone(),
                status: match ending.status {
                    StepStatus::Succeeded => "changed",
                    StepStatus::Unchanged => "unchanged",
                    _ => "failed",
                }
                .into(),
                changed: ending.changed,
                duration_ms: ending.duration.map(events::ms).unwrap_or(0),
                detail: ending.detail,
                error: ending.error,
            });
        }
    }

    /// Reports a skipped step and says how the step ended; `None` when nothing is recorded
    /// for it (unchanged, held, or an orphan's no-op).
    fn ending(&mut self, step: &Step, outcome: &Final) -> Option<Ending> {
        let skipped = |reporter: &mut dyn Reporter, reason: String| {
            reporter.event(&Event::StepSkipped {
                step: step.id.clone(),
                reason,
            })
        };
        Some(match outcome {
            Final::Succeeded {
                changed,
                detail,
                duration,
            } => Ending {
                status: if *changed {
                    StepStatus::Succeeded
                } else {
                    StepStatus::Unchanged
                },
                changed: *changed,
                duration: Some(*duration),
                detail: detail.clone(),
                error: None,
            },
            Final::Skipped(Skip::Unchanged) => {
                match &step.held {
                    Some(note) if step.change != Change::Unchanged => {
                        skipped(self.reporter, format!("held: {note}"));
                        self.reporter.event(&Event::Warning {
                            message: format!("{} not run: {note}", step.id),
                        });
                    }
                    _ => skipped(self.reporter, "unchanged".into()),
                }
                return None;
            }
            Final::Skipped(Skip::Noop) => {
                skipped(self.reporter, "nothing to do".into());
                if step.change == Change::Delete {
                    return None;
                }
                Ending {
                    status: StepStatus::Unchanged,
                    changed: false,
                    duration: Some(Duration::ZERO),
                    detail: String::new(),
                    error: None,
                }
            }
            Final::Failed { error, duration } => Ending {
                status: StepStatus::Failed,
                changed: false,
                duration: Some(*duration),
                detail: String::new(),
                error: Some(error.clone()),
            },
            Final::DependencyFailed(dep) => {
                skipped(self.reporter, format!("{dep} failed"));
                Ending {
                    status: StepStatus::Skipped,
                    changed: false,
                    duration: None,
                    detail: String::new(),
                    error: Some(format!("not run: {dep} failed")),
                }
            }
            Final::Cancelled => {
                skipped(self.reporter, "cancelled".into());
                Ending {
                    status: StepStatus::Cancelled,
                    changed: false,
                    duration: None,
                    detail: String::new(),
                    error: Some("cancelled".into()),
                }
            }
        })
    }

    /// Records what the step left behind (outputs, rendered inputs, snapshots, the secrets
    /// file it shipped, its rollback) and reports its warnings and rollback.
    fn record_finish(&mut self, index: usize, step: &Step, ending: &Ending) {
        let exec = self.exec;
        let artifacts = exec.take_artifacts(index);
        for w in exec.take_warnings(index) {
            self.reporter.event(&Event::Warning { message: w });
        }
        let snapshots = self.snapshot_rows(index, step);
        let rb = exec.take_rolled_back(index);
        // A deploy records the secrets file it actually shipped (it may have been written
        // during this run).
        let (parts, input_hash) = match exec.take_secrets_hash(index) {
            Some(h) => crate::secrets::with_secrets_part(&step.parts, h.as_deref()),
            None => (step.parts.clone(), step.hash.clone()),
        };
        let fin = StepFinish {
            step_id: step.id.clone(),
            input_hash,
            parts,
            status: ending.status,
            duration_ms: ending.duration.map(events::ms).unwrap_or(0),
            error: ending.error.clone(),
            outputs: artifacts.outputs,
            rendered: artifacts.rendered,
            refused: artifacts.refused,
            // A rolled-back failure is held: the next `up` does not repeat it with the
            // same input (issue 14).
            held: rb.as_ref().filter(|r| r.any).map(|r| r.reason.clone()),
            snapshots,
        };
        let result = self.store.step_finished(self.run, &fin);
        self.keep(result);
        if let Some(rb) = rb {
            self.record_rollback(step, rb);
        }
    }

    /// The snapshots the step took, as store rows; their containers are remembered for
    /// retention.
    fn snapshot_rows(&mut self, index: usize, step: &Step) -> Vec<state::SnapshotRow> {
        let taken = self.exec.take_snapshots(index);
        let at = state::timestamp();
        let rows = taken
            .iter()
            .map(|t| state::SnapshotRow {
                vmid: t.vmid,
                node: t.node.clone(),
                name: t.name.clone(),
                service: t.service.clone(),
                run: Some(self.run),
                step_id: Some(step.id.clone()),
                taken_at: at.clone(),
                rolled_back: None,
            })
            .collect();
        self.snapshotted
            .extend(taken.into_iter().map(|t| (t.vmid, t.node)));
        rows
    }

    /// A step rolled back after its health gate failed: the snapshots it went back to, the
    /// Terraform steps re-applied at their previous inputs (and held at the new ones).
    fn record_rollback(&mut self, step: &Step, rb: RolledBack) {
        let run = self.run;
        for (vmid, name) in &rb.snapshots {
            let result = self.store.snapshot_rolled_back(*vmid, name, Some(run));
            self.keep(result);
        }
        // The re-applied Terraform steps are recorded as they now are: at their
        // previous inputs, so the next run applies the new ones again.
        for r in rb.restored {
            // The input it was rolled back from is held like the deploy itself.
            let new_hash = self
                .plan
                .steps
                .iter()
                .find(|s| s.id == r.step_id)
                .map(|s| s.hash.clone());
            let step_id = r.step_id.clone();
            let fin = StepFinish {
                step_id: r.step_id,
                input_hash: r.record.hash,
                parts: r.record.parts,
                status: StepStatus::Succeeded,
                duration_ms: r.record.duration_ms.unwrap_or(0),
                error: None,
                outputs: r.outputs,
                rendered: Some(r.rendered),
                refused: None,
                held: None,
                snapshots: Vec::new(),
            };
            let result = self.store.step_finished(run, &fin);
            self.keep(result);
            if let Some(hash) = new_hash {
                let reason = format!("{} after it applied: {}", step.id, rb.reason);
                let result = self.store.hold_step(&step_id, run, &hash, &reason);
                self.keep(result);
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
            result: match f {
                Final::Succeeded { changed: true, .. } => "changed".into(),
                Final::Succeeded { changed: false, .. } => "unchanged".into(),
                Final::Skipped(Skip::Unchanged) => "skipped (unchanged)".into(),
                Final::Skipped(Skip::Noop) => "skipped (no-op)".into(),
                Final::Failed { .. } => "FAILED".into(),
                Final::DependencyFailed(_) => "not run".into(),
                Final::Cancelled => "cancelled".into(),
            },
            duration_ms: match f {
                Final::Succeeded { duration, .. } | Final::Failed { duration, .. } => {
                    Some(events::ms(*duration))
                }
                _ => None,
            },
        })
        .collect()
}
