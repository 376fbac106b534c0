//! Executes a DAG of steps: at most `parallel` at once, ready steps in order of longest
//! remaining path first, a failure stopping only its dependents (or everything with
//! fail-fast), transient failures retried with backoff and jitter, and a cancel flag that
//! stops new starts while running steps finish.
//!
//! The scheduler knows nothing of Terraform or NixOS: it calls a [`Runner`] and reports what
//! happens through a callback, on the calling thread, in order.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One node of the DAG.
#[derive(Clone, Debug)]
pub struct Task {
    /// Indexes of prerequisites; all smaller than this task's own index.
    pub after: Vec<usize>,
    /// Expected duration (ms) for the longest-remaining-path priority.
    pub weight: u64,
    /// Why the task needs no run, if it doesn't.
    pub skip: Option<Skip>,
    /// Tasks of one group (one service's steps) form a chain whose later steps consume what
    /// earlier ones produce: when a task of the group actually changes something, its
    /// unchanged dependents in the same group run anyway.
    pub group: Option<String>,
}

pub use crate::step_status::{Skip, StepStatus};

/// How a run of one task went, as the scheduler needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done { changed: bool, detail: String },
    Failed { error: String, transient: bool },
}

/// What a runner returns for one attempt: its outcome, and whatever else the caller records
/// (the scheduler only reads the outcome and hands the rest back in [`Progress::Ended`]).
pub trait Report: Send {
    fn outcome(&self) -> &Outcome;
}

impl Report for Outcome {
    fn outcome(&self) -> &Outcome {
        self
    }
}

pub trait Runner: Sync {
    type Report: Report;
    /// Runs task `index`. `earlier` is the report of the attempt before this one, when this is
    /// a retry after a transient failure (so what that attempt did, like a snapshot it took,
    /// is not lost or done twice).
    fn run(&self, index: usize, attempt: u32, earlier: Option<Self::Report>) -> Self::Report;
}

#[derive(Clone, Debug)]
pub struct Options {
    pub parallel: usize,
    pub fail_fast: bool,
    /// Extra attempts for transient failures.
    pub retries: u32,
    pub backoff: Duration,
    pub cancel: Arc<AtomicBool>,
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    pub status: StepStatus,
    /// How long it ran, all attempts together; `None` when it did not run.
    pub duration: Option<Duration>,
    /// [`StepStatus::DependencyFailed`]: the index of the failed task it waited for.
    pub failed_dependency: Option<usize>,
}

impl Final {
    fn not_run(status: StepStatus) -> Final {
        Final {
            status,
            duration: None,
            failed_dependency: None,
        }
    }
    pub fn ok(&self) -> bool {
        self.status.ok()
    }
}

/// What the scheduler reports, in order, on the calling thread.
#[derive(Debug)]
pub enum Progress<R> {
    Started {
        index: usize,
        attempt: u32,
    },
    Retrying {
        index: usize,
        attempt: u32,
        delay: Duration,
        error: String,
    },
    Ended {
        index: usize,
        ended: Final,
        /// The runner's report of the last attempt; `None` for a task that did not run.
        report: Option<R>,
    },
    /// Called about five times a second while steps run, for elapsed-time displays.
    Tick,
}

enum Msg<R> {
    Retrying {
        index: usize,
        attempt: u32,
        delay: Duration,
        error: String,
    },
    Started {
        index: usize,
        attempt: u32,
    },
    Done {
        index: usize,
        report: R,
        duration: Duration,
    },
}

/// Longest path (by weight) from each task to the end of the DAG, itself included.
pub fn remaining(tasks: &[Task]) -> Vec<u64> {
    let mut best = vec![0u64; tasks.len()];
    // Dependents have larger indexes, so a reverse sweep sees each task after all of them.
    for i in (0..tasks.len()).rev() {
        best[i] += if tasks[i].skip.is_some() {
            0
        } else {
            tasks[i].weight
        };
        for &a in &tasks[i].after {
            best[a] = best[a].max(best[i]);
        }
    }
    best
}

fn jitter(max_ms: u64) -> u64 {
    if max_ms == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos) % max_ms
}

/// Runs the DAG. Returns how every task ended, by index.
pub fn execute<R: Runner>(
    tasks: &[Task],
    runner: &R,
    opts: &Options,
    report: &mut dyn FnMut(Progress<R::Report>),
) -> Vec<Final> {
    let mut board = Board::new(tasks);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<Msg<R::Report>>();
    let mut running = 0usize;

    std::thread::scope(|scope| {
        loop {
            // Start what can start.
            while let Some(&(_, std::cmp::Reverse(i))) = board.ready.peek() {
                if board.finals[i].is_some() {
                    board.ready.pop();
                    continue;
                }
                let halted = stop.load(Ordering::SeqCst) || opts.cancel.load(Ordering::SeqCst);
                if let Some(skip) = board.skips[i] {
                    // Skips cost nothing and start no process, even when halted.
                    board.ready.pop();
                    let fin = Final::not_run(StepStatus::Skipped(skip));
                    board.settle(i, fin, None, tasks, report);
                    continue;
                }
                if halted {
                    board.ready.pop();
                    let fin = Final::not_run(StepStatus::Cancelled);
                    board.settle(i, fin, None, tasks, report);
                    continue;
                }
                if running >= opts.parallel.max(1) {
                    break;
                }
                board.ready.pop();
                running += 1;
                let tx = tx.clone();
                scope.spawn(move || attempts(runner, i, opts, &tx));
            }
            if running == 0 {
                // Anything never reached (its prerequisites were cancelled) is settled by now.
                break;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Msg::Started { index, attempt }) => report(Progress::Started { index, attempt }),
                Ok(Msg::Retrying {
                    index,
                    attempt,
                    delay,
                    error,
                }) => report(Progress::Retrying {
                    index,
                    attempt,
                    delay,
                    error,
                }),
                Ok(Msg::Done {
                    index,
                    report: done,
                    duration,
                }) => {
                    running -= 1;
                    let status = match done.outcome() {
                        Outcome::Done { changed: true, .. } => StepStatus::Changed,
                        Outcome::Done { changed: false, .. } => StepStatus::Unchanged,
                        Outcome::Failed { .. } => {
                            if opts.fail_fast {
                                stop.store(true, Ordering::SeqCst);
                            }
                            StepStatus::Failed
                        }
                    };
                    let fin = Final {
                        status,
                        duration: Some(duration),
                        failed_dependency: None,
                    };
                    board.settle(index, fin, Some(done), tasks, report);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => report(Progress::Tick),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    board
        .finals
        .into_iter()
        .map(|f| f.unwrap_or(Final::not_run(StepStatus::Cancelled)))
        .collect()
}

/// One task on its own thread: attempts until one does not fail transiently or the retries
/// run out, with exponential backoff and jitter between them.
fn attempts<R: Runner>(runner: &R, i: usize, opts: &Options, tx: &mpsc::Sender<Msg<R::Report>>) {
    let start = Instant::now();
    let mut attempt = 1;
    let mut earlier = None;
    loop {
        let _ = tx.send(Msg::Started { index: i, attempt });
        let report = runner.run(i, attempt, earlier.take());
        match report.outcome() {
            Outcome::Failed {
                error,
                transient: true,
            } if attempt <= opts.retries => {
                let base = opts.backoff.as_millis() as u64 * (1u64 << (attempt - 1).min(10));
                let delay = Duration::from_millis(base + jitter(base / 2 + 1));
                let _ = tx.send(Msg::Retrying {
                    index: i,
                    attempt,
                    delay,
                    error: error.clone(),
                });
                std::thread::sleep(delay);
                attempt += 1;
                earlier = Some(report);
            }
            _ => {
                let _ = tx.send(Msg::Done {
                    index: i,
                    report,
                    duration: start.elapsed(),
                });
                return;
            }
        }
    }
}

/// The scheduler's bookkeeping: how each task ended, what it still waits for, what is ready.
struct Board {
    finals: Vec<Option<Final>>,
    skips: Vec<Option<Skip>>,
    waiting: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    /// Ordered by (remaining path, then earliest index).
    ready: BinaryHeap<(u64, std::cmp::Reverse<usize>)>,
    priority: Vec<u64>,
}

impl Board {
    fn new(tasks: &[Task]) -> Self {
        let n = tasks.len();
        let priority = remaining(tasks);
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut waiting: Vec<usize> = vec![0; n];
        for (i, t) in tasks.iter().enumerate() {
            waiting[i] = t.after.len();
            for &a in &t.after {
                dependents[a].push(i);
            }
        }
        let mut ready = BinaryHeap::new();
        for i in 0..n {
            if waiting[i] == 0 {
                ready.push((priority[i], std::cmp::Reverse(i)));
            }
        }
        Board {
            finals: vec![None; n],
            skips: tasks.iter().map(|t| t.skip).collect(),
            waiting,
            dependents,
            ready,
            priority,
        }
    }

    /// Settles a task and releases (or, after a failure, settles) its dependents.
    fn settle<R>(
        &mut self,
        i: usize,
        ended: Final,
        runner_report: Option<R>,
        tasks: &[Task],
        report: &mut dyn FnMut(Progress<R>),
    ) {
        let failed = !ended.ok();
        let failed_index = ended.failed_dependency.unwrap_or(i);
        let cancelled = ended.status == StepStatus::Cancelled;
        let changed = ended.status == StepStatus::Changed;
        self.finals[i] = Some(ended.clone());
        report(Progress::Ended {
            index: i,
            ended,
            report: runner_report,
        });
        for k in 0..self.dependents[i].len() {
            let d = self.dependents[i][k];
            if self.finals[d].is_some() {
                continue;
            }
            if changed
                && tasks[d].group.is_some()
                && tasks[d].group == tasks[i].group
                && self.skips[d] == Some(Skip::Unchanged)
            {
                self.skips[d] = None;
            }
            if failed {
                let f = if cancelled {
                    Final::not_run(StepStatus::Cancelled)
                } else {
                    Final {
                        failed_dependency: Some(failed_index),
                        ..Final::not_run(StepStatus::DependencyFailed)
                    }
                };
                self.settle(d, f, None, tasks, report);
            } else {
                self.waiting[d] -= 1;
                if self.waiting[d] == 0 {
                    self.ready.push((self.priority[d], std::cmp::Reverse(d)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A runner with scripted outcomes and durations; the scheduler's logic needs no
    /// processes to be tested.
    struct Script {
        fail: Vec<usize>,
        transient_once: Vec<usize>,
        sleep_ms: u64,
        log: Mutex<Vec<(usize, u32)>>,
        in_flight: Mutex<(usize, usize)>,
    }

    impl Runner for Script {
        type Report = Outcome;
        fn run(&self, i: usize, attempt: u32, _earlier: Option<Outcome>) -> Outcome {
            {
                let mut f = self.in_flight.lock().unwrap();
                f.0 += 1;
                f.1 = f.1.max(f.0);
            }
            self.log.lock().unwrap().push((i, attempt));
            std::thread::sleep(Duration::from_millis(self.sleep_ms));
            self.in_flight.lock().unwrap().0 -= 1;
            if self.transient_once.contains(&i) && attempt == 1 {
                return Outcome::Failed {
                    error: "lock held".into(),
                    transient: true,
                };
            }
            if self.fail.contains(&i) {
                return Outcome::Failed {
                    error: "boom".into(),
                    transient: false,
                };
            }
            Outcome::Done {
                changed: true,
                detail: String::new(),
            }
        }
    }

    fn script(fail: Vec<usize>, transient_once: Vec<usize>, sleep_ms: u64) -> Script {
        Script {
            fail,
            transient_once,
            sleep_ms,
            log: Mutex::new(Vec::new()),
            in_flight: Mutex::new((0, 0)),
        }
    }

    fn task(_name: &str, after: &[usize]) -> Task {
        Task {
            after: after.to_vec(),
            weight: 1,
            skip: None,
            group: None,
        }
    }

    fn opts(parallel: usize) -> Options {
        Options {
            parallel,
            fail_fast: false,
            retries: 2,
            backoff: Duration::from_millis(1),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    #[test]
    fn order_parallelism_and_failure_isolation() {
        // 0 → 1 → 2 (fails) → 3 ; 0 → 4 → 5 (independent branch)
        let tasks = vec![
            task("a", &[]),
            task("b", &[0]),
            task("c", &[1]),
            task("d", &[2]),
            task("e", &[0]),
            task("f", &[4]),
        ];
        let r = script(vec![2], vec![], 20);
        let mut events = Vec::new();
        let finals = execute(&tasks, &r, &opts(2), &mut |p| events.push(p));
        assert_eq!(finals[2].status, StepStatus::Failed);
        assert_eq!(finals[3].status, StepStatus::DependencyFailed);
        assert_eq!(finals[3].failed_dependency, Some(2));
        assert!(finals[5].ok(), "the independent branch finishes");
        let log = r.log.lock().unwrap();
        let pos = |i| log.iter().position(|(j, _)| *j == i).unwrap();
        assert!(pos(0) < pos(1) && pos(1) < pos(2) && pos(0) < pos(4));
        assert!(
            !log.iter().any(|(j, _)| *j == 3),
            "a dependent of a failure never runs"
        );
        assert!(r.in_flight.lock().unwrap().1 <= 2);
        assert_eq!(
            r.in_flight.lock().unwrap().1,
            2,
            "independent steps ran concurrently"
        );
    }

    #[test]
    fn skips_start_nothing_and_fail_fast_cancels_the_rest() {
        let mut tasks = vec![
            task("a", &[]),
            task("b", &[0]),
            task("c", &[]),
            task("d", &[2]),
        ];
        tasks[0].skip = Some(Skip::Unchanged);
        tasks[1].skip = Some(Skip::Noop);
        let r = script(vec![2], vec![], 5);
        let mut o = opts(1);
        o.fail_fast = true;
        let finals = execute(&tasks, &r, &o, &mut |_| {});
        assert_eq!(finals[0].status, StepStatus::Skipped(Skip::Unchanged));
        assert_eq!(finals[1].status, StepStatus::Skipped(Skip::Noop));
        assert_eq!(finals[3].status, StepStatus::DependencyFailed);
        assert_eq!(finals[3].failed_dependency, Some(2));
        assert_eq!(
            r.log
                .lock()
                .unwrap()
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn transient_failures_retry_and_cancel_stops_new_starts() {
        let tasks = vec![task("a", &[]), task("b", &[0])];
        let r = script(vec![], vec![0], 1);
        let mut retried = false;
        let finals = execute(&tasks, &r, &opts(1), &mut |p| {
            if matches!(p, Progress::Retrying { .. }) {
                retried = true;
            }
        });
        assert!(retried);
        assert!(finals.iter().all(Final::ok));
        let cancel = Arc::new(AtomicBool::new(true));
        let mut o = opts(2);
        o.cancel = cancel;
        let r = script(vec![], vec![], 1);
        let finals = execute(&tasks, &r, &o, &mut |_| {});
        assert_eq!(
            finals,
            vec![
                Final::not_run(StepStatus::Cancelled),
                Final::not_run(StepStatus::Cancelled)
            ]
        );
        assert!(r.log.lock().unwrap().is_empty());
    }

    /// A report that, like a step's snapshots, carries what every attempt so far did.
    struct Attempts {
        outcome: Outcome,
        /// The attempts whose work this report holds, oldest first.
        did: Vec<u32>,
    }

    impl Report for Attempts {
        fn outcome(&self) -> &Outcome {
            &self.outcome
        }
    }

    /// Fails transiently until its third attempt; remembers the earlier report each attempt
    /// was handed.
    struct Flaky {
        handed: Mutex<Vec<(u32, Option<Vec<u32>>)>>,
    }

    impl Runner for Flaky {
        type Report = Attempts;
        fn run(&self, _i: usize, attempt: u32, earlier: Option<Attempts>) -> Attempts {
            self.handed
                .lock()
                .unwrap()
                .push((attempt, earlier.as_ref().map(|e| e.did.clone())));
            let mut did = earlier.map(|e| e.did).unwrap_or_default();
            did.push(attempt);
            let outcome = if attempt < 3 {
                Outcome::Failed {
                    error: "lock held".into(),
                    transient: true,
                }
            } else {
                Outcome::Done {
                    changed: true,
                    detail: String::new(),
                }
            };
            Attempts { outcome, did }
        }
    }

    #[test]
    fn a_retry_is_handed_the_earlier_attempts_report() {
        let tasks = vec![task("a", &[])];
        let r = Flaky {
            handed: Mutex::new(Vec::new()),
        };
        let mut ended = Vec::new();
        let finals = execute(&tasks, &r, &opts(1), &mut |p| {
            if let Progress::Ended { report, .. } = p {
                ended.push(report.map(|r| r.did));
            }
        });
        assert_eq!(finals[0].status, StepStatus::Changed);
        assert_eq!(
            *r.handed.lock().unwrap(),
            vec![(1, None), (2, Some(vec![1])), (3, Some(vec![1, 2]))],
            "the first attempt gets nothing; each retry the attempt before it"
        );
        assert_eq!(
            ended,
            vec![Some(vec![1, 2, 3])],
            "the last report comes back with everything"
        );
    }

    #[test]
    fn a_change_reruns_unchanged_dependents_of_its_own_group_only() {
        let mut tasks = vec![task("tf:a", &[]), task("nix:a", &[0]), task("nix:b", &[0])];
        tasks[0].group = Some("a".into());
        tasks[1].group = Some("a".into());
        tasks[1].skip = Some(Skip::Unchanged);
        tasks[2].group = Some("b".into());
        tasks[2].skip = Some(Skip::Unchanged);
        let r = script(vec![], vec![], 1);
        let finals = execute(&tasks, &r, &opts(1), &mut |_| {});
        assert_eq!(
            finals[1].status,
            StepStatus::Changed,
            "same service: runs again"
        );
        assert_eq!(
            finals[2].status,
            StepStatus::Skipped(Skip::Unchanged),
            "other service: stays skipped"
        );
    }

    #[test]
    fn longest_remaining_path_first() {
        // Two roots: 0 has a long tail, 2 none; with one worker 0 must start first.
        let mut tasks = vec![task("long", &[]), task("tail", &[0]), task("short", &[])];
        tasks[1].weight = 100;
        assert_eq!(remaining(&tasks), vec![101, 100, 1]);
        let r = script(vec![], vec![], 1);
        execute(&tasks, &r, &opts(1), &mut |_| {});
        assert_eq!(r.log.lock().unwrap()[0].0, 0);
    }
}
