//! What the planner knows of earlier runs: per step, the input hash of its last successful
//! run, the hashes of the parts of that input, and how long it took.
//!
//! The engine persists this in its state store; the planner only reads it, so planning stays
//! pure and can be tested with records built in memory.

use std::collections::BTreeMap;

/// The last successful run of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepRecord {
    /// Hash over all of `parts`.
    pub hash: String,
    /// Hash of each named part of the step's input (`host:web`, `db:guacamole`, ...), so a
    /// change can be explained, not only detected.
    pub parts: BTreeMap<String, String>,
    /// Wall-clock duration, used as the step's weight for the critical path.
    pub duration_ms: Option<u64>,
}

/// Everything recorded, by step id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub steps: BTreeMap<String, StepRecord>,
    /// Steps the destroy guard refused since their last success, with what their plan would
    /// have deleted or replaced (`module.x.null_resource.keep (replace)`).
    pub refused: BTreeMap<String, Vec<String>>,
    /// Steps whose health gate failed and that were rolled back, until they next succeed: the
    /// next `up` does not run them again with the same input (issue 14).
    pub held: BTreeMap<String, Held>,
}

/// A step that failed its health gate and was rolled back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The run it failed in.
    pub run: i64,
    /// The input it failed with.
    pub hash: String,
    /// Why it failed (the gate's error).
    pub reason: String,
}

impl Record {
    pub fn get(&self, id: &str) -> Option<&StepRecord> {
        self.steps.get(id)
    }
}
