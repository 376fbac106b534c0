//! How a step of a run ended: the one status the scheduler settles, the state store records,
//! the events report and the summary prints. Each of those keeps the words it always used
//! (`succeeded` in `step_results.status`, `changed` in a `step_finished` event, `FAILED` in
//! the summary), spelled here and nowhere else.

use core::fmt;

/// Why a step needs no run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// Its input hash equals the last successful run's.
    Unchanged,
    /// It has nothing to do.
    Noop,
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepStatus {
    /// It ran and changed something.
    Changed,
    /// It ran and found nothing to change.
    Unchanged,
    /// It needed no run.
    Skipped(Skip),
    Failed,
    /// Not run because a prerequisite failed.
    DependencyFailed,
    /// Not run because the run was cancelled (Ctrl-C or fail-fast).
    Cancelled,
}

impl StepStatus {
    /// Whether the step ended well: it ran, or needed no run.
    pub fn ok(self) -> bool {
        matches!(
            self,
            StepStatus::Changed | StepStatus::Unchanged | StepStatus::Skipped(_)
        )
    }

    /// Whether the step's record, outputs and rendered inputs are updated in the store.
    pub fn is_success(self) -> bool {
        self.ok()
    }

    /// Whether the step ran to an end (success or failure), as opposed to not being run.
    pub fn ran(self) -> bool {
        matches!(
            self,
            StepStatus::Changed | StepStatus::Unchanged | StepStatus::Failed
        )
    }

    /// The value stored in `step_results.status` (and read back in `StepRow::status`). A
    /// no-op is recorded as `unchanged`; a step not run after a failure as `skipped`.
    pub fn stored(self) -> &'static str {
        match self {
            StepStatus::Changed => "succeeded",
            StepStatus::Unchanged | StepStatus::Skipped(_) => "unchanged",
            StepStatus::Failed => "failed",
            StepStatus::DependencyFailed => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// The status a word of `step_results.status` stands for, `None` for another word
    /// (`started`, of a step in flight). The store keeps one word for two statuses: a step
    /// skipped as unchanged or no-op reads back as `Unchanged`, so `stored` of what this
    /// returns is always `word`.
    pub fn from_stored(word: &str) -> Option<StepStatus> {
        match word {
            "succeeded" => Some(StepStatus::Changed),
            "unchanged" => Some(StepStatus::Unchanged),
            "failed" => Some(StepStatus::Failed),
            "skipped" => Some(StepStatus::DependencyFailed),
            "cancelled" => Some(StepStatus::Cancelled),
            _ => None,
        }
    }

    /// The word of a `step_finished` event (only steps that ran have one).
    pub fn finished(self) -> &'static str {
        match self {
            StepStatus::Changed => "changed",
            StepStatus::Unchanged => "unchanged",
            StepStatus::Skipped(_) => "skipped",
            StepStatus::Failed => "failed",
            StepStatus::DependencyFailed => "not run",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// The word of the run's summary table.
    pub fn summary(self) -> &'static str {
        match self {
            StepStatus::Changed => "changed",
            StepStatus::Unchanged => "unchanged",
            StepStatus::Skipped(Skip::Unchanged) => "skipped (unchanged)",
            StepStatus::Skipped(Skip::Noop) => "skipped (no-op)",
            StepStatus::Failed => "FAILED",
            StepStatus::DependencyFailed => "not run",
            StepStatus::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for StepStatus {
    /// The stored word.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stored())
    }
}

/// serde: a status as the word of a `step_finished` event.
pub fn serialize_finished<S: serde::Serializer>(
    status: &StepStatus,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(status.finished())
}

/// serde: a status as the word of the summary table.
pub fn serialize_summary<S: serde::Serializer>(
    status: &StepStatus,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(status.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words are the ones the state store, the events and the summary carried before
    /// there was one type (`state::StepStatus`, `Final`, and two strings).
    #[test]
    fn each_status_keeps_its_words() {
        let all = [
            (StepStatus::Changed, "succeeded", "changed", "changed"),
            (StepStatus::Unchanged, "unchanged", "unchanged", "unchanged"),
            (
                StepStatus::Skipped(Skip::Unchanged),
                "unchanged",
                "skipped",
                "skipped (unchanged)",
            ),
            (
                StepStatus::Skipped(Skip::Noop),
                "unchanged",
                "skipped",
                "skipped (no-op)",
            ),
            (StepStatus::Failed, "failed", "failed", "FAILED"),
            (
                StepStatus::DependencyFailed,
                "skipped",
                "not run",
                "not run",
            ),
            (StepStatus::Cancelled, "cancelled", "cancelled", "cancelled"),
        ];
        for (status, stored, finished, summary) in all {
            assert_eq!(status.stored(), stored);
            let read = StepStatus::from_stored(stored).unwrap();
            assert_eq!(read.stored(), stored);
            assert_eq!(
                read.ran(),
                status.ran() || matches!(status, StepStatus::Skipped(_))
            );
            assert_eq!(status.to_string(), stored);
            assert_eq!(status.finished(), finished);
            assert_eq!(status.summary(), summary);
            assert_eq!(
                status.is_success(),
                !matches!(
                    status,
                    StepStatus::Failed | StepStatus::DependencyFailed | StepStatus::Cancelled
                )
            );
        }
        assert_eq!(StepStatus::from_stored("started"), None);
    }
}
