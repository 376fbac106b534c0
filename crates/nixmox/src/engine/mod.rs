//! The orchestrator: renders, plans against the recorded state, executes the plan's steps
//! (Terraform workspaces, NixOS deploys) in parallel where the graph allows, and records every
//! result in the state store so the next run only does what changed.

pub mod events;
mod recorder;
pub mod runner;
pub mod scheduler;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmox_core::plan::{self, Action, Change, Plan, PlanInput, Selection};
use nixmox_core::record::Record;
use nixmox_core::render;
use nixmox_core::step_id::StepId;
use nixmox_core::Project;

use self::events::{Event, Reporter};
use self::recorder::Recorder;
use self::runner::StepExec;
use self::scheduler::{Final, Skip, StepStatus, Task};
use crate::error::{Error, Result};
use crate::project_fs;
use crate::root::{Paths, ProjectRoot};
use crate::state::{self, RunResult, Store};

/// How `up` runs: the engine's options. `nixmox up`'s arguments are lowered into them once, by
/// `commands::up::options`; `down` and the commands that redeploy build them too.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The services to bring up (all when empty), with their dependencies or not.
    pub selection: Selection,
    /// How many steps may run at once; `None`: `deploy.parallel`.
    pub parallel: Option<usize>,
    pub force: bool,
    /// Steps run even when unchanged (`--force-step`).
    pub force_steps: Vec<StepId>,
    pub fail_fast: bool,
    pub timeout: Duration,
    pub args: Vec<String>,
    /// Roll back a service whose health gate fails after its deploy (`--no-rollback` off).
    pub rollback: bool,
    /// Roll back to the snapshot taken before the deploy when there is one (`--rollback
    /// snapshot`, the default); off: the previous generation (`--rollback generation`).
    pub snapshot_rollback: bool,
    /// Also roll back core hosts (`--rollback-core`).
    pub rollback_core: bool,
    /// `tf:infra` with `proxmox-api` destroys these of the project's containers no longer in
    /// it (vmids the operator confirmed, `up --remove-orphans`); other orphans are reported.
    pub remove_orphans: Vec<u32>,
    /// The destroy guard lets every delete and replacement through (`--allow-destroy`).
    pub allow_destroy: bool,
    /// The guard lets `tf:infra` delete containers whose services left the project (`up
    /// --remove-orphans`, `down`); replacements still need `allow_destroy`.
    pub delete_orphans: bool,
}

/// What `up` ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpResult {
    Success,
    Failed { failed: usize },
    Interrupted,
}

/// Plans against what the store recorded. Opens the store read-only in spirit: nothing is
/// written besides creating the database when it does not exist yet.
pub fn plan_with_state(
    root: &ProjectRoot,
    project: &Project,
    sel: &Selection,
    paths: &Paths,
) -> Result<(Plan, render::Outputs)> {
    // Planning never creates the state database: no database means nothing recorded yet.
    let (record, outputs) = match recorded_store(paths)? {
        Some(store) => (
            store.record().map_err(Error::State)?,
            store.outputs().map_err(Error::State)?,
        ),
        None => Default::default(),
    };
    let files = project_fs::digests(root, project);
    let flake_lock = crate::flake::read(root)?;
    let mut plan = plan::plan(
        project,
        sel,
        &PlanInput {
            record: Some(&record),
            files: Some(&files),
            flake_lock: flake_lock.as_ref(),
        },
    );
    crate::secrets::augment_plan(root, project, &mut plan, Some(&record));
    Ok((plan, outputs))
}

/// The Terraform outputs the store recorded, which later steps' workspaces are rendered
/// with: what `up` renders with, for `nixmox render` to write the same tree. Nothing when no
/// run has recorded any (no state database, which is not created).
pub fn recorded_outputs(paths: &Paths) -> Result<render::Outputs> {
    match recorded_store(paths)? {
        Some(store) => store.outputs().map_err(Error::State),
        None => Ok(render::Outputs::default()),
    }
}

/// The state store for reading what earlier runs recorded, when there is one.
fn recorded_store(paths: &Paths) -> Result<Option<Store>> {
    if !paths.state_db.exists() {
        return Ok(None);
    }
    Store::open(&paths.state_db).map(Some).map_err(Error::State)
}

fn skip_of(step: &plan::Step, opts: &UpOptions) -> Option<Skip> {
    let forced = opts.force || opts.force_steps.iter().any(|f| f == &step.id);
    if step.change == Change::Delete {
        return Some(Skip::Noop);
    }
    if step.change == Change::Unchanged && !forced {
        return Some(Skip::Unchanged);
    }
    // Failed its gate and rolled back with this same input: not again unless forced. Skipped
    // like an unchanged step, so nothing is recorded for it (issue 14).
    if step.held.is_some() && !forced {
        return Some(Skip::Unchanged);
    }
    if step.action == Action::Noop {
        return Some(Skip::Noop);
    }
    None
}

/// `--dry-run`: what would run, and why, without touching anything.
pub fn dry_run(plan: &Plan, opts: &UpOptions) -> String {
    let mut out = format!(
        "Dry run for project `{}`: nothing is executed.\n",
        plan.project
    );
    let width = plan.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
    let mut runs = 0;
    for s in &plan.steps {
        let (verdict, why) = match skip_of(s, opts) {
            Some(Skip::Unchanged) if s.held.is_some() => {
                ("held", s.held.clone().unwrap_or_default())
            }
            Some(Skip::Unchanged) => (
                "skip",
                "unchanged since the last successful run".to_string(),
            ),
            Some(Skip::Noop) if s.change == Change::Delete => ("orphan", s.description.clone()),
            Some(Skip::Noop) => ("skip", format!("nothing to do: {}", s.description)),
            None => {
                runs += 1;
                let reason = match s.change {
                    Change::Create => "never run before".to_string(),
                    Change::Update if !s.reasons.is_empty() => s.reasons.join("; "),
                    Change::Update => "its input changed".to_string(),
                    _ => "forced".to_string(),
                };
                ("run", format!("{} ({reason})", s.description))
            }
        };
        out.push_str(&format!("  {verdict:<6} {:<width$}  {why}\n", s.id));
        if let Some(note) = nixmox_core::plan_out::allow_destroy_note(&s.needs_allow_destroy) {
            if verdict == "run" && !opts.allow_destroy {
                out.push_str(&format!("         {:<width$}  {note}\n", ""));
            }
        }
    }
    out.push_str(&format!("{runs} step(s) would run.\n"));
    out
}

/// `nixmox up`.
pub fn up(
    root: &ProjectRoot,
    project: &Project,
    opts: &UpOptions,
    reporter: &mut dyn Reporter,
    cancel: Arc<AtomicBool>,
) -> Result<UpResult> {
    let paths = Paths::new(root, project);
    let mut store = Store::open(&paths.state_db).map_err(Error::State)?;
    match store
        .acquire_lock(&opts.args.join(" "))
        .map_err(Error::State)?
    {
        state::LockOutcome::Acquired => {}
        state::LockOutcome::TakenOver { previous } => reporter.event(&Event::Warning {
            message: format!(
                "took over a stale lock of pid {} on {} (its process is gone)",
                previous.pid, previous.hostname
            ),
        }),
    }
    let run = Run {
        root,
        project,
        opts,
        paths: &paths,
        parallel: opts.parallel.unwrap_or(project.deploy.parallel as usize),
    };
    let result = run.locked(&mut store, reporter, cancel);
    let released = store.release_lock().map_err(Error::State);
    let result = result?;
    released?;
    Ok(result)
}

/// What one `up` run works from, once it holds the lock.
struct Run<'a> {
    root: &'a ProjectRoot,
    project: &'a Project,
    opts: &'a UpOptions,
    paths: &'a Paths,
    /// `--parallel`, else `deploy.parallel`.
    parallel: usize,
}

/// What a run prepared before its first step: the plan, the store's record it was made
/// against, the vault and the flake inputs locked for it.
struct Prepared {
    plan: Plan,
    record: Record,
    vault: crate::secrets::Vault,
    locked: crate::flake::Ensured,
}

impl<'a> Run<'a> {
    /// Prepares, executes the plan's steps and records the run.
    fn locked(
        &self,
        store: &mut Store,
        reporter: &mut dyn Reporter,
        cancel: Arc<AtomicBool>,
    ) -> Result<UpResult> {
        let Prepared {
            plan,
            record,
            vault,
            locked,
        } = self.prepare(store)?;
        let tasks: Vec<Task> = plan
            .steps
            .iter()
            .map(|s| Task {
                after: s.after.clone(),
                weight: s.weight,
                skip: skip_of(s, self.opts),
                group: s.service().map(str::to_string),
            })
            .collect();
        let run = store.start_run(&self.opts.args).map_err(Error::State)?;
        let started = Instant::now();
        reporter.event(&Event::RunStarted {
            run,
            project: self.project.name.to_string(),
            steps: tasks.len(),
            to_run: tasks.iter().filter(|t| t.skip.is_none()).count(),
            parallel: self.parallel,
        });
        if !locked.changes.is_empty() {
            reporter.event(&Event::InputsLocked {
                changes: locked.changes.clone(),
            });
        }
        let exec = self.step_exec(&plan, &record, store, vault, run)?;
        let sched = scheduler::Options {
            parallel: self.parallel.max(1),
            fail_fast: self.opts.fail_fast,
            retries: 2,
            backoff: Duration::from_millis(500),
            cancel: cancel.clone(),
        };
        let mut recorder = Recorder::new(store, reporter, &plan, &record, &exec, run);
        let finals = scheduler::execute(&tasks, &exec, &sched, &mut |p| recorder.progress(p));
        let tally = Tally::of(&finals, cancel.load(Ordering::SeqCst), recorder.rolled_back);
        // Retention, after a successful run only: the newest `keep` of NixMox's snapshots of
        // each container it snapshotted; snapshots NixMox did not make are never touched.
        let snapshotted = std::mem::take(&mut recorder.snapshotted);
        let (store, reporter) = recorder.parts();
        if tally.result == RunResult::Success && !snapshotted.is_empty() {
            if let Some(hook) = exec.snapshot_hook() {
                for message in prune_snapshots(hook, store, &snapshotted, self.opts.timeout) {
                    reporter.event(&Event::Warning { message });
                }
            }
        }
        let summary = format!(
            "{} succeeded, {} failed, {} skipped",
            tally.succeeded, tally.failed, tally.skipped
        );
        store
            .finish_run(run, tally.result, &summary)
            .map_err(Error::State)?;
        reporter.event(&Event::RunFinished {
            run,
            result: tally.word.into(),
            succeeded: tally.succeeded,
            failed: tally.failed,
            skipped: tally.skipped,
            duration_ms: events::ms(started.elapsed()),
        });
        if let Some(e) = recorder.finish(&recorder::summary_rows(&plan, &finals)) {
            return Err(e);
        }
        Ok(tally.outcome())
    }

    /// Everything before the first step: interrupted runs recovered, secrets generated, the
    /// flake's inputs locked, the build tree rendered and the plan made against the record.
    fn prepare(&self, store: &mut Store) -> Result<Prepared> {
        let (root, project, paths) = (self.root, self.project, self.paths);
        store.recover_interrupted().map_err(Error::State)?;
        let record = store.record().map_err(Error::State)?;
        let outputs = store.outputs().map_err(Error::State)?;
        // Secrets first (src/secrets): the generated ones of every host whose key is known, so
        // the render copies and the plan see the files as this run will deploy them.
        let mut vault = crate::secrets::for_run(root, project, paths)?;
        vault.prepare()?;
        // The flake's inputs are locked before rendering (the build flake gets the project's
        // lock) and before planning (their revisions are part of every `nix:*` step's input).
        let locked = crate::flake::ensure_locked(root, paths, project)?;
        let rendered = render::render(project, &outputs);
        project_fs::write_tree(root, &paths.build, &rendered)?;
        let files = project_fs::digests(root, project);
        let mut plan = plan::plan(
            project,
            &self.opts.selection,
            &PlanInput {
                record: Some(&record),
                files: Some(&files),
                flake_lock: Some(&locked.lock),
            },
        );
        crate::secrets::augment_plan(root, project, &mut plan, Some(&record));
        Ok(Prepared {
            plan,
            record,
            vault,
            locked,
        })
    }

    /// The step executor for this run, with its infrastructure, destroy guard, secrets,
    /// rollback and snapshot settings.
    fn step_exec<'p>(
        &self,
        plan: &'p Plan,
        record: &Record,
        store: &Store,
        vault: crate::secrets::Vault,
        run: state::RunId,
    ) -> Result<StepExec<'p>>
    where
        'a: 'p,
    {
        let opts = self.opts;
        let run_logs = self.paths.logs.join(run.to_string());
        let exec = StepExec::new(self.project, plan, self.paths, &run_logs, opts.timeout)
            .with_infra(self.parallel.max(1), opts.remove_orphans.clone())
            .with_guard(opts.allow_destroy, opts.delete_orphans)
            .with_secrets(vault)
            .with_rollback(rollback_settings(opts, plan, record, store)?);
        Ok(
            match snapshot_hook(self.root, self.project, run, opts.timeout) {
                Some(hook) => exec.with_snapshots(hook),
                None => exec,
            },
        )
    }
}

/// How the run's steps ended, counted.
struct Tally {
    succeeded: usize,
    failed: usize,
    skipped: usize,
    /// Ctrl-C was pressed.
    interrupted: bool,
    /// A step did not end well (failed, not run, cancelled).
    not_ok: bool,
    result: RunResult,
    word: &'static str,
}

impl Tally {
    fn of(finals: &[Final], interrupted: bool, rolled_back: usize) -> Tally {
        let failed = finals
            .iter()
            .filter(|f| f.status == StepStatus::Failed)
            .count();
        let succeeded = finals
            .iter()
            .filter(|f| matches!(f.status, StepStatus::Changed | StepStatus::Unchanged))
            .count();
        let not_ok = failed > 0 || finals.iter().any(|f| !f.ok());
        let (result, word) = if interrupted {
            (RunResult::Interrupted, "interrupted")
        } else if rolled_back > 0 {
            (RunResult::RolledBack, "rolled back")
        } else if not_ok {
            (RunResult::Failed, "failed")
        } else {
            (RunResult::Success, "succeeded")
        };
        Tally {
            succeeded,
            failed,
            skipped: finals.len() - succeeded - failed,
            interrupted,
            not_ok,
            result,
            word,
        }
    }

    fn outcome(&self) -> UpResult {
        if self.interrupted {
            UpResult::Interrupted
        } else if self.not_ok {
            UpResult::Failed {
                failed: self.failed.max(1),
            }
        } else {
            UpResult::Success
        }
    }
}

/// What a rollback may restore: the record and rendered inputs of each of the plan's
/// service Terraform steps as the store holds them before this run changes them.
fn rollback_settings(
    opts: &UpOptions,
    plan: &Plan,
    record: &nixmox_core::record::Record,
    store: &Store,
) -> Result<runner::Rollback> {
    let mut previous = BTreeMap::new();
    if opts.rollback || opts.rollback_core {
        for step in &plan.steps {
            if !matches!(
                step.phase(),
                plan::Phase::TfServiceInfra | plan::Phase::TfServiceConfig
            ) {
                continue;
            }
            let Some(rec) = record.get(&step.id) else {
                continue;
            };
            if let Some(files) = store.rendered_inputs(&step.id).map_err(Error::State)? {
                previous.insert(step.id.clone(), (rec.clone(), files));
            }
        }
    }
    Ok(runner::Rollback {
        services: opts.rollback,
        core: opts.rollback_core,
        snapshot: opts.snapshot_rollback,
        previous,
    })
}

/// The run's snapshot settings: none when `proxmox.snapshots.mode` is off or the hosts are not
/// NixMox's containers (`infra.backend: none`). Both other backends reach the PVE API with the
/// project's token. A client that cannot be made is kept as the reason (a `required` step
/// fails with it; `best-effort` warns).
fn snapshot_hook(
    root: &ProjectRoot,
    project: &Project,
    run: state::RunId,
    timeout: Duration,
) -> Option<runner::SnapshotHook> {
    use nixmox_core::model::{InfraBackend, SnapshotMode};
    let policy = project.proxmox.snapshots;
    if policy.mode == SnapshotMode::Off || project.infra == InfraBackend::None {
        return None;
    }
    let client = crate::proxmox::Settings::from_project(project, root)
        .and_then(|settings| {
            crate::proxmox::connect(
                &settings,
                crate::proxmox::ClientOptions {
                    task_timeout: timeout,
                    ..Default::default()
                },
            )
        })
        .map_err(|e| e.to_string());
    let client = match client {
        Ok(c) => Ok(c),
        Err(e) => Err(crate::exec::scrub(
            &e,
            &runner::proxmox_token(project, root)
                .into_iter()
                .collect::<Vec<_>>(),
        )),
    };
    Some(runner::SnapshotHook {
        run,
        policy,
        client,
    })
}

/// Deletes the older of NixMox's snapshots of these containers, keeping the newest
/// `proxmox.snapshots.keep`. Only snapshots recorded in the store as NixMox's and named as
/// NixMox names them are candidates. Returns warnings.
fn prune_snapshots(
    hook: &runner::SnapshotHook,
    store: &mut Store,
    containers: &std::collections::BTreeSet<(u32, String)>,
    timeout: Duration,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let Ok(client) = &hook.client else {
        return warnings;
    };
    for (vmid, node) in containers {
        let recorded: std::collections::BTreeSet<String> = match store.snapshots(Some(*vmid)) {
            Ok(rows) => rows.into_iter().map(|r| r.name).collect(),
            Err(e) => {
                warnings.push(format!("snapshot retention of CT {vmid}: {e}"));
                continue;
            }
        };
        let present = match crate::proxmox::snapshot::list(client, node, *vmid) {
            Ok(p) => p,
            Err(e) => {
                warnings.push(format!("snapshot retention of CT {vmid}: {e}"));
                continue;
            }
        };
        // What the store remembers and PVE no longer has is gone.
        for name in &recorded {
            if !present.iter().any(|p| &p.name == name) {
                let _ = store.snapshot_deleted(*vmid, name);
            }
        }
        let ours: Vec<(String, u64)> = present
            .iter()
            .filter(|p| recorded.contains(&p.name))
            .map(|p| (p.name.clone(), p.snaptime))
            .collect();
        let deadline = Instant::now() + timeout;
        for name in nixmox_core::snapshot::to_prune(&ours, hook.policy.keep) {
            match crate::proxmox::snapshot::delete(client, node, *vmid, &name, deadline) {
                Ok(_) => {
                    if let Err(e) = store.snapshot_deleted(*vmid, &name) {
                        warnings.push(format!("snapshot retention of CT {vmid}: {e}"));
                    }
                }
                Err(e) => warnings.push(format!(
                    "snapshot retention: deleting {name} of CT {vmid}: {e}"
                )),
            }
        }
    }
    warnings
}

/// Reads the rendered files a step used, for rollback and `down`.
pub fn read_inputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(".terraform") || name.starts_with("terraform.tfstate") {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, out);
            } else if let (Ok(rel), Ok(bytes)) = (p.strip_prefix(base), std::fs::read(&p)) {
                out.insert(rel.to_string_lossy().into_owned(), bytes);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}
