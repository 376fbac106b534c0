//! The engine's events, and the reporters that render them: plain timestamped lines, JSON
//! lines, or a live view of running steps on a terminal. Drivers never print; the engine
//! emits, a reporter writes to stderr (JSON lines go to stdout: they are data).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Version of the JSON-lines event format.
pub const EVENTS_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: i64,
        project: String,
        steps: usize,
        to_run: usize,
        parallel: usize,
    },
    Warning {
        message: String,
    },
    /// `flake.lock` was created or followed a changed input URL: `input: old → new` each.
    InputsLocked {
        changes: Vec<String>,
    },
    StepSkipped {
        step: String,
        reason: String,
    },
    StepStarted {
        step: String,
        attempt: u32,
    },
    StepRetrying {
        step: String,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    StepFinished {
        step: String,
        status: String,
        changed: bool,
        duration_ms: u64,
        detail: String,
        error: Option<String>,
    },
    /// A failed health gate was undone: the host back on its previous generation, the
    /// service's Terraform steps re-applied from their last successful inputs.
    RolledBack {
        step: String,
        detail: String,
    },
    RunFinished {
        run: i64,
        result: String,
        succeeded: usize,
        failed: usize,
        skipped: usize,
        duration_ms: u64,
    },
}

pub trait Reporter {
    fn event(&mut self, e: &Event);
    /// Called regularly while steps run (for elapsed times); most reporters ignore it.
    fn tick(&mut self) {}
    /// The final table of steps.
    fn summary(&mut self, rows: &[SummaryRow]);
}

#[derive(Clone, Debug, Serialize)]
pub struct SummaryRow {
    pub step: String,
    pub result: String,
    pub duration_ms: Option<u64>,
}

fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}")
}

/// One event as one line. Step names, details and errors can carry text from manifests and
/// from tools' output: control characters (newlines included) are shown as visible escapes,
/// so an event is always exactly one line and cannot drive the terminal (issue 13).
fn describe(e: &Event) -> String {
    nixmox_core::diag::visible(&describe_raw(e)).into_owned()
}

fn describe_raw(e: &Event) -> String {
    match e {
        Event::RunStarted { run, project, steps, to_run, parallel } => {
            format!("run {run} of `{project}`: {steps} steps, {to_run} to run, up to {parallel} at once")
        }
        Event::Warning { message } => format!("warning: {message}"),
        Event::InputsLocked { changes } => format!("locked flake inputs into flake.lock (commit it): {}", changes.join(", ")),
        Event::StepSkipped { step, reason } => format!("skip   {step} ({reason})"),
        Event::StepStarted { step, attempt } if *attempt > 1 => format!("start  {step} (attempt {attempt})"),
        Event::StepStarted { step, .. } => format!("start  {step}"),
        Event::StepRetrying { step, attempt, delay_ms, error } => {
            format!("retry  {step} after attempt {attempt} in {:.1}s: {error}", *delay_ms as f64 / 1000.0)
        }
        Event::StepFinished { step, status, duration_ms, detail, error, .. } => {
            let secs = *duration_ms as f64 / 1000.0;
            match error {
                Some(err) => format!("FAILED {step} after {secs:.1}s: {err}"),
                None if detail.is_empty() => format!("done   {step} {status} in {secs:.1}s"),
                None => format!("done   {step} {status} in {secs:.1}s: {detail}"),
            }
        }
        Event::RolledBack { step, detail } => format!("ROLLED BACK {step}: {detail}"),
        Event::RunFinished { run, result, succeeded, failed, skipped, duration_ms } => format!(
            "run {run} {result} in {:.1}s: {succeeded} succeeded, {failed} failed, {skipped} skipped",
            *duration_ms as f64 / 1000.0
        ),
    }
}

fn table(rows: &[SummaryRow]) -> String {
    let w = rows.iter().map(|r| r.step.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:<w$}  {:<18}  {}\n", "STEP", "RESULT", "DURATION");
    for r in rows {
        let d = r
            .duration_ms
            .map(|d| format!("{:.1}s", d as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<w$}  {:<18}  {d}\n",
            nixmox_core::diag::visible(&r.step),
            nixmox_core::diag::visible(&r.result)
        ));
    }
    out
}

/// Timestamped lines on stderr: for logs, CI and pipes.
pub struct Plain;

impl Reporter for Plain {
    fn event(&mut self, e: &Event) {
        let _ = writeln!(std::io::stderr().lock(), "{} {}", timestamp(), describe(e));
    }
    fn summary(&mut self, rows: &[SummaryRow]) {
        let _ = write!(std::io::stderr().lock(), "\n{}", table(rows));
    }
}

/// One JSON object per line on stdout, each with the format's version.
pub struct JsonLines;

impl Reporter for JsonLines {
    fn event(&mut self, e: &Event) {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("version".into(), EVENTS_VERSION.into());
            m.insert(
                "time".into(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0)
                    .into(),
            );
        }
        let _ = writeln!(std::io::stdout().lock(), "{v}");
    }
    fn summary(&mut self, rows: &[SummaryRow]) {
        let v = serde_json::json!({"version": EVENTS_VERSION, "event": "summary", "steps": rows});
        let _ = writeln!(std::io::stdout().lock(), "{v}");
    }
}

/// On a terminal: finished steps scroll by, and one status line shows every running step with
/// its elapsed time, redrawn in place.
pub struct Live {
    running: BTreeMap<String, Instant>,
    colour: bool,
    drawn: bool,
}

impl Live {
    pub fn new(colour: bool) -> Self {
        Live {
            running: BTreeMap::new(),
            colour,
            drawn: false,
        }
    }
    fn clear(&mut self, err: &mut impl Write) {
        if self.drawn {
            let _ = write!(err, "\r\x1b[2K");
            self.drawn = false;
        }
    }
    fn draw(&mut self, err: &mut impl Write) {
        if self.running.is_empty() {
            return;
        }
        let now = Instant::now();
        let parts: Vec<String> = self
            .running
            .iter()
            .map(|(s, t)| {
                format!(
                    "{} {}s",
                    nixmox_core::diag::visible(s),
                    now.duration_since(*t).as_secs()
                )
            })
            .collect();
        let mut line = format!("running: {}", parts.join(" · "));
        let width = terminal_width();
        if line.chars().count() > width.saturating_sub(1) {
            line = line
                .chars()
                .take(width.saturating_sub(2))
                .collect::<String>()
                + "…";
        }
        let _ = write!(err, "{line}");
        self.drawn = true;
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

impl Reporter for Live {
    fn event(&mut self, e: &Event) {
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        match e {
            Event::StepStarted { step, .. } => {
                self.running
                    .entry(step.clone())
                    .or_insert_with(Instant::now);
            }
            Event::StepFinished { step, .. } => {
                self.running.remove(step);
            }
            _ => {}
        }
        let text = describe(e);
        let text = if self.colour {
            if text.starts_with("FAILED") || text.starts_with("ROLLED BACK") {
                format!("\x1b[31m{text}\x1b[0m")
            } else if text.starts_with("done") {
                format!("\x1b[32m{text}\x1b[0m")
            } else if text.starts_with("skip") {
                format!("\x1b[2m{text}\x1b[0m")
            } else {
                text
            }
        } else {
            text
        };
        let _ = writeln!(err, "{text}");
        self.draw(&mut err);
    }
    fn tick(&mut self) {
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        self.draw(&mut err);
    }
    fn summary(&mut self, rows: &[SummaryRow]) {
        let mut err = std::io::stderr().lock();
        self.clear(&mut err);
        let _ = write!(err, "\n{}", table(rows));
    }
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
