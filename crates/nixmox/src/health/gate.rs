//! Docker Compose's health-check timing around probes.
//!
//! Each probe runs on its own until it is **healthy** (one attempt passes) or **unhealthy**
//! (`retries` consecutive counted failures). An attempt is bounded by `timeout`; the next one
//! starts `interval` after the previous one ended. A failure that ends within `start_period` of
//! `since` (the deploy that started the service) is not counted, as in Compose; a pass during
//! the start period counts at once. Unlike Docker, the first attempt runs at once rather than
//! one interval after the start: a gate should not sit idle when the service is already up.
//! `retries: 0` counts as 1.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nixmox_core::model::HealthTiming;

use super::probe::Probe;
use super::{Context, Failure};
use crate::exec::{self, human_duration};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

impl From<HealthTiming> for Timing {
    fn from(t: HealthTiming) -> Timing {
        Timing {
            interval: Duration::from_millis(t.interval_ms),
            timeout: Duration::from_millis(t.timeout_ms),
            retries: t.retries,
            start_period: Duration::from_millis(t.start_period_ms),
        }
    }
}

/// A probe that passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Healthy {
    pub attempts: u32,
    pub detail: String,
}

/// A probe that became unhealthy (or ran out of time, or was cancelled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unhealthy {
    /// The last attempt's failure.
    pub failure: Failure,
    pub attempts: u32,
    /// Consecutive failures counted (outside the start period).
    pub counted: u32,
    pub elapsed: Duration,
    /// Why it stopped before `retries` counted failures, if it did.
    pub stopped: Option<String>,
}

impl std::fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.failure)?;
        match &self.stopped {
            Some(why) => write!(
                f,
                " ({why}; {} attempt(s) in {})",
                self.attempts,
                human_duration(self.elapsed)
            ),
            None => write!(
                f,
                " (unhealthy after {} consecutive failure(s); {} attempt(s) in {})",
                self.counted,
                self.attempts,
                human_duration(self.elapsed)
            ),
        }
    }
}

/// Limits around a gate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits<'a> {
    /// No attempt starts after this; one running is cut to it.
    pub deadline: Option<Instant>,
    /// Checked between attempts.
    pub cancel: Option<&'a AtomicBool>,
    /// Each attempt's result is appended here.
    pub log: Option<&'a Path>,
}

/// Repeats `attempt` (given its timeout) with Compose's timing until healthy or unhealthy.
pub fn wait_one(
    mut attempt: impl FnMut(Duration) -> Result<String, Failure>,
    timing: Timing,
    since: Instant,
    limits: Limits<'_>,
    mut note: impl FnMut(&str),
) -> Result<Healthy, Box<Unhealthy>> {
    let started = Instant::now();
    let needed = timing.retries.max(1);
    let mut attempts = 0;
    let mut counted = 0;
    loop {
        let mut timeout = timing.timeout;
        if let Some(d) = limits.deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        attempts += 1;
        let result = attempt(timeout);
        let failure = match result {
            Ok(detail) => {
                note(&format!("attempt {attempts}: passed: {detail}"));
                return Ok(Healthy { attempts, detail });
            }
            Err(f) => f,
        };
        let in_start_period = since.elapsed() < timing.start_period;
        if in_start_period {
            note(&format!(
                "attempt {attempts}: failed (not counted: start period): {failure}"
            ));
        } else {
            counted += 1;
            note(&format!(
                "attempt {attempts}: failed ({counted}/{needed}): {failure}"
            ));
        }
        let stop = |why: Option<String>, failure: Failure, counted| {
            Box::new(Unhealthy {
                failure,
                attempts,
                counted,
                elapsed: started.elapsed(),
                stopped: why,
            })
        };
        if counted >= needed {
            return Err(stop(None, failure, counted));
        }
        let next = Instant::now() + timing.interval;
        if limits.deadline.is_some_and(|d| next >= d) {
            return Err(stop(
                Some("stopped at the step's time limit".into()),
                failure,
                counted,
            ));
        }
        // Sleep in small slices so a cancel is seen.
        while Instant::now() < next {
            if limits.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Err(stop(Some("cancelled".into()), failure, counted));
            }
            let left = next.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// Waits for every probe at once (one thread each); results in the probes' order.
pub fn wait_all(
    ctx: &Context,
    probes: &[Probe],
    timing: Timing,
    since: Instant,
    limits: Limits<'_>,
) -> Vec<Result<Healthy, Box<Unhealthy>>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                scope.spawn(move || {
                    let label = format!("{} check on {}", p.check_name(), p.target());
                    wait_one(
                        |t| p.run(ctx, t, limits.log),
                        timing,
                        since,
                        limits,
                        |line| {
                            if let Some(log) = limits.log {
                                let _ = exec::append_log(
                                    log,
                                    &format!("[health] {label}: {line}"),
                                    &[],
                                );
                            }
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(probes)
            .map(|(h, p)| {
                h.join().unwrap_or_else(|_| {
                    Err(Box::new(Unhealthy {
                        failure: Failure {
                            check: p.check_name(),
                            target: p.target(),
                            expected: "a result".into(),
                            got: "a crash of the check (a bug in nixmox)".into(),
                        },
                        attempts: 1,
                        counted: 1,
                        elapsed: Duration::ZERO,
                        stopped: None,
                    }))
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn failure(n: u32) -> Failure {
        Failure {
            check: "readiness tcp".into(),
            target: "x:1".into(),
            expected: "a TCP connection".into(),
            got: format!("refused #{n}"),
        }
    }

    fn timing(retries: u32, start_period: u64) -> Timing {
        Timing {
            interval: ms(20),
            timeout: ms(50),
            retries,
            start_period: ms(start_period),
        }
    }

    /// An attempt that fails `fails` times, then passes.
    fn flaky(fails: u32) -> impl FnMut(Duration) -> Result<String, Failure> {
        let mut n = 0;
        move |_| {
            n += 1;
            if n > fails {
                Ok(format!("passed on {n}"))
            } else {
                Err(failure(n))
            }
        }
    }

    #[test]
    fn healthy_at_the_first_pass() {
        let r = wait_one(
            flaky(0),
            timing(3, 0),
            Instant::now(),
            Limits::default(),
            |_| {},
        );
        assert_eq!(r.unwrap().attempts, 1);
        // Two failures are fewer than three retries.
        let r = wait_one(
            flaky(2),
            timing(3, 0),
            Instant::now(),
            Limits::default(),
            |_| {},
        );
        assert_eq!(r.unwrap().attempts, 3);
    }

    #[test]
    fn unhealthy_after_retries_consecutive_failures() {
        let start = Instant::now();
        let r = wait_one(flaky(99), timing(3, 0), start, Limits::default(), |_| {});
        let u = r.unwrap_err();
        assert_eq!((u.attempts, u.counted), (3, 3));
        assert_eq!(u.failure.got, "refused #3");
        assert!(u.stopped.is_none());
        // Two intervals between three attempts.
        assert!(start.elapsed() >= ms(40));
        assert!(u
            .to_string()
            .contains("unhealthy after 3 consecutive failure(s)"));
        // retries: 0 counts as one.
        let u = wait_one(flaky(99), timing(0, 0), start, Limits::default(), |_| {}).unwrap_err();
        assert_eq!(u.attempts, 1);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        // 20 ms between attempts, a 150 ms start period: about 7 uncounted failures, then 2
        // counted ones.
        let start = Instant::now();
        let mut notes = Vec::new();
        let u = wait_one(flaky(99), timing(2, 150), start, Limits::default(), |n| {
            notes.push(n.to_string())
        })
        .unwrap_err();
        assert_eq!(u.counted, 2);
        assert!(u.attempts >= 4, "{u:?}");
        assert!(start.elapsed() >= ms(150));
        assert!(notes[0].contains("not counted: start period"), "{notes:?}");
        assert!(notes.last().unwrap().contains("(2/2)"), "{notes:?}");
        // A pass during the start period is healthy at once.
        let r = wait_one(
            flaky(2),
            timing(1, 10_000),
            Instant::now(),
            Limits::default(),
            |_| {},
        );
        assert_eq!(r.unwrap().attempts, 3);
    }

    #[test]
    fn a_deadline_or_a_cancel_stops_waiting() {
        let deadline = Instant::now() + ms(60);
        let limits = Limits {
            deadline: Some(deadline),
            ..Limits::default()
        };
        let u = wait_one(flaky(99), timing(1000, 0), Instant::now(), limits, |_| {}).unwrap_err();
        assert_eq!(
            u.stopped.as_deref(),
            Some("stopped at the step's time limit")
        );
        assert!(Instant::now() < deadline + ms(100));

        let cancel = AtomicBool::new(true);
        let limits = Limits {
            cancel: Some(&cancel),
            ..Limits::default()
        };
        let u = wait_one(flaky(99), timing(1000, 0), Instant::now(), limits, |_| {}).unwrap_err();
        assert_eq!(u.stopped.as_deref(), Some("cancelled"));
        assert_eq!(u.attempts, 1);
    }
}
