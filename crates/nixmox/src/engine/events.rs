//! The engine's events, and the reporters that render them: plain timestamped lines, JSON
//! lines, or a live view of running steps on a terminal. Drivers never print; the engine
//! emits, a reporter writes to stderr (JSON lines go to stdout: they are data).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anstyle::{AnsiColor, Style};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nixmox_core::step_id::StepId;
use serde::Serialize;

use crate::step_status::StepStatus;

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
        step: StepId,
        reason: String,
    },
    StepStarted {
        step: StepId,
        attempt: u32,
        /// How long the step's last successful run took, when it is recorded: the live view's
        /// estimate of time left.
        #[serde(skip_serializing_if = "Option::is_none")]
        expected_ms: Option<u64>,
    },
    StepRetrying {
        step: StepId,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    StepFinished {
        step: StepId,
        /// `changed`, `unchanged` or `failed` in JSON.
        #[serde(serialize_with = "crate::step_status::serialize_finished")]
        status: StepStatus,
        changed: bool,
        duration_ms: u64,
        detail: String,
        error: Option<String>,
    },
    /// A failed health gate was undone: the host back on its previous generation, the
    /// service's Terraform steps re-applied from their last successful inputs.
    RolledBack {
        step: StepId,
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
    pub step: StepId,
    /// The summary's word in JSON (`changed`, `skipped (no-op)`, `FAILED`, …).
    #[serde(serialize_with = "crate::step_status::serialize_summary")]
    pub result: StepStatus,
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
        Event::StepStarted { step, attempt, .. } if *attempt > 1 => format!("start  {step} (attempt {attempt})"),
        Event::StepStarted { step, .. } => format!("start  {step}"),
        Event::StepRetrying { step, attempt, delay_ms, error } => {
            format!("retry  {step} after attempt {attempt} in {:.1}s: {error}", *delay_ms as f64 / 1000.0)
        }
        Event::StepFinished { step, status, duration_ms, detail, error, .. } => {
            let secs = *duration_ms as f64 / 1000.0;
            match error {
                Some(err) => format!("FAILED {step} after {secs:.1}s: {err}"),
                None if detail.is_empty() => {
                    format!("done   {step} {} in {secs:.1}s", status.finished())
                }
                None => format!("done   {step} {} in {secs:.1}s: {detail}", status.finished()),
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
            r.result.summary()
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

/// On a terminal: finished steps scroll by, and below them indicatif draws one line per
/// running step: a spinner, its elapsed time, and when the step's last run was recorded a bar
/// and the time left by that duration.
pub struct Live {
    multi: MultiProgress,
    running: BTreeMap<String, Running>,
    colour: bool,
}

struct Running {
    bar: ProgressBar,
    started: Instant,
    expected: Option<Duration>,
}

impl Live {
    pub fn new(colour: bool) -> Self {
        Live::with_target(colour, ProgressDrawTarget::stderr())
    }

    /// A live view drawn elsewhere than stderr (tests draw into memory).
    pub fn with_target(colour: bool, target: ProgressDrawTarget) -> Self {
        Live {
            multi: MultiProgress::with_draw_target(target),
            running: BTreeMap::new(),
            colour,
        }
    }

    fn start(&mut self, step: &str, expected: Option<Duration>) {
        if let Some(old) = self.running.remove(step) {
            old.bar.finish_and_clear();
            self.multi.remove(&old.bar);
        }
        let (bar, template) = match expected {
            Some(d) => (
                ProgressBar::new(ms(d).max(1)),
                "{spinner} {prefix} [{bar:20}] {elapsed} of ~{msg}",
            ),
            None => (ProgressBar::new_spinner(), "{spinner} {prefix} {elapsed}"),
        };
        let style = ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> ");
        let bar = bar
            .with_style(style)
            .with_prefix(nixmox_core::diag::visible(step).into_owned())
            .with_message(
                expected
                    .map(crate::exec::human_duration)
                    .unwrap_or_default(),
            );
        let bar = self.multi.add(bar);
        bar.tick();
        self.running.insert(
            step.to_string(),
            Running {
                bar,
                started: Instant::now(),
                expected,
            },
        );
    }

    fn update(&self) {
        for r in self.running.values() {
            if let Some(expected) = r.expected {
                let elapsed = r.started.elapsed();
                // Past the recorded duration the bar stays full; the elapsed time still runs.
                r.bar.set_position(ms(elapsed.min(expected)));
            }
            r.bar.tick();
        }
    }

    fn line(&self, text: String) {
        let text = if self.colour {
            let style = if text.starts_with("FAILED") || text.starts_with("ROLLED BACK") {
                AnsiColor::Red.on_default()
            } else if text.starts_with("done") {
                AnsiColor::Green.on_default()
            } else if text.starts_with("skip") {
                Style::new().dimmed()
            } else {
                Style::new()
            };
            format!("{style}{text}{style:#}")
        } else {
            text
        };
        if self.multi.is_hidden() {
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }
}

impl Reporter for Live {
    fn event(&mut self, e: &Event) {
        match e {
            Event::StepStarted {
                step, expected_ms, ..
            } => {
                self.start(step, expected_ms.map(Duration::from_millis));
            }
            Event::StepFinished { step, .. } => {
                if let Some(r) = self.running.remove(step.as_str()) {
                    r.bar.finish_and_clear();
                    self.multi.remove(&r.bar);
                }
            }
            _ => {}
        }
        self.line(describe(e));
    }
    fn tick(&mut self) {
        self.update();
    }
    fn summary(&mut self, rows: &[SummaryRow]) {
        for (_, r) in std::mem::take(&mut self.running) {
            r.bar.finish_and_clear();
            self.multi.remove(&r.bar);
        }
        let _ = self.multi.clear();
        let _ = write!(std::io::stderr().lock(), "\n{}", table(rows));
    }
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal that keeps what is written to it (indicatif's own trait for draw targets).
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Issue 16: a line per running step, with a bar and the recorded duration when there is
    /// one; finished steps scroll by as the plain reporter words them.
    #[test]
    fn live_view_draws_a_line_per_running_step() {
        let screen = Screen::default();
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(screen.clone()), 200);
        let mut live = Live::with_target(false, target);
        live.event(&Event::StepStarted {
            step: "tf:infra".parse().unwrap(),
            attempt: 1,
            expected_ms: Some(90_000),
        });
        live.event(&Event::StepStarted {
            step: "nix:core:dns\u{1b}[2J".parse().unwrap(),
            attempt: 1,
            expected_ms: None,
        });
        std::thread::sleep(Duration::from_millis(20));
        live.tick();
        assert_eq!(live.running.len(), 2);
        live.event(&Event::StepFinished {
            step: "tf:infra".parse().unwrap(),
            status: StepStatus::Changed,
            changed: true,
            duration_ms: 1200,
            detail: String::new(),
            error: None,
        });
        assert_eq!(live.running.len(), 1);
        let shown = screen.0.lock().unwrap().clone();
        assert!(
            shown.contains("tf:infra [") && shown.contains("of ~1m 30s"),
            "{shown}"
        );
        assert!(shown.contains("nix:core:dns\\u{1b}[2J"), "{shown}");
        assert!(
            !shown.contains('\u{1b}'),
            "no colour asked, no escapes: {shown:?}"
        );
        assert!(shown.contains("done   tf:infra changed in 1.2s"), "{shown}");
    }
}
