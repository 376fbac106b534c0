//! Runs one Terraform (or OpenTofu) workspace for a `tf:*` step.
//!
//! # Where the state lives
//!
//! The rendered configuration directory is wiped by every render, so nothing Terraform keeps may
//! live there. Everything persistent is under the step's data directory
//! (`.nixmox/terraform/<slug>/`):
//!
//! - `.terraform/`: `TF_DATA_DIR` (installed providers and modules, backend settings), set on
//!   every command;
//! - `.terraform.lock.hcl`: the provider lock file, copied into the config directory before every
//!   command and copied back after `init`;
//! - `terraform.tfstate` (and its `.backup`): the state, through `-state=<abs path>` on `plan`,
//!   `apply`, `output` and `destroy`;
//! - `init.sha256`: what the last successful `init` saw (see below);
//! - plan files, only while a step runs (they hold secrets in clear, so they are deleted).
//!
//! `-state` was chosen over writing a backend override file into the config directory after
//! checking Terraform 1.0.3 here: `plan -out`, `apply PLANFILE`, targeted `apply`, `output -json`,
//! `plan -refresh-only` and `destroy` all read and write the state at the given path, nothing is
//! written to the config directory but the lock file, and a wiped and re-rendered config
//! directory plans "No changes". It needs no file of ours in the configuration and cannot clash
//! with a backend block the configuration declares. `-state` only means something for the local
//! backend: when the configuration declares another backend (or a local one with its own
//! `path`), no `-state` is passed and the state is wherever that backend keeps it.
//!
//! # When `init` runs
//!
//! Only when the providers, modules or lock file may have changed: `init.sha256` holds a SHA-256
//! over the binary's path, the `terraform` and `module` keys of every `*.tf.json` of the config
//! directory, the full text of every `*.tf` and the lock file. Equal hash and an existing
//! `TF_DATA_DIR` skip `init`. What the hash cannot see (a local module that gains a provider) makes
//! Terraform ask for `terraform init`; the runner then runs `init` and retries the command once.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixmox_core::render::terraform::Protection;
use sha2::{Digest, Sha256};

use crate::exec::{self, Cmd, ExecError, Finished, RunOpts};

const LOCK_FILE: &str = ".terraform.lock.hcl";
const STATE_FILE: &str = "terraform.tfstate";
const INIT_MARKER: &str = "init.sha256";
const PLAN_FILE: &str = "plan.tfplan";
const DRIFT_PLAN_FILE: &str = "drift.tfplan";
/// At most this many diagnostics go into an error message.
const MAX_DIAGNOSTICS: usize = 3;
/// At most this many detail lines per diagnostic.
const MAX_DETAIL_LINES: usize = 12;

/// A Terraform-compatible binary and the environment every command gets.
#[derive(Debug, Clone)]
pub struct Terraform {
    pub binary: PathBuf,
    /// E.g. `TF_CLI_CONFIG_FILE`, provider credentials.
    pub env: Vec<(OsString, OsString)>,
}

/// One step's Terraform workspace.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The rendered configuration, wiped by every render.
    pub config_dir: PathBuf,
    /// Persistent: `.nixmox/terraform/<slug>/` (see the module documentation).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct StepOpts {
    /// Resource addresses applied one by one (`apply -target`) before the full apply.
    pub apply_order: Vec<String>,
    /// For the whole step, all commands together.
    pub timeout: Option<Duration>,
    /// Every command's argv and output are appended here (redacted).
    pub log: PathBuf,
    pub cancel: Option<Arc<AtomicBool>>,
    /// Secret values kept out of the log and of error messages.
    pub redact: Vec<String>,
    /// The destroy guard; `None` applies whatever Terraform plans (rollback re-applies and the
    /// runner's own tests).
    pub guard: Option<Guard>,
}

/// The destroy guard of one step (docs/engine.md, "Destroy guard"): a saved plan that deletes
/// or replaces a protected resource is not applied unless the run allows it.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub protection: Protection,
    /// `up --allow-destroy`: every planned change is applied.
    pub allow_destroy: bool,
    /// Plain deletes (the resource left the configuration) are applied, replacements are not:
    /// `tf:infra` under `up --remove-orphans` and `down`'s redeploy.
    pub allow_deletes: bool,
}

/// A planned change the guard stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedChange {
    pub address: String,
    /// `delete` or `replace`.
    pub action: String,
    /// The attributes that force a replacement (`replace_paths`), when Terraform says.
    pub because: Vec<String>,
}

impl fmt::Display for GuardedChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.address, self.action)?;
        if !self.because.is_empty() {
            write!(f, ", forced by {}", self.because.join(", "))?;
        }
        write!(f, ")")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Whether anything was applied (a targeted apply that changed something, or a full plan
    /// that had changes, outputs included).
    pub changed: bool,
    /// Sorted by name.
    pub outputs: Vec<TfOutput>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TfOutput {
    pub name: String,
    pub value: serde_json::Value,
    pub sensitive: bool,
}

/// A resource whose real object no longer matches the state (from `resource_drift`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftedResource {
    pub address: String,
    /// Terraform's actions for the drift: `["update"]`, `["delete"]`, ...
    pub actions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TfError {
    #[error("`{binary}` not found; install it or set terraform.binary")]
    NotFound { binary: String },
    #[error("`{command}` failed{}: {message}", resource.as_ref().map(|r| format!(" at {r}")).unwrap_or_default())]
    Failed {
        /// `terraform plan`, `tofu apply`, ...
        command: String,
        /// The resource address of the first diagnostic's `with <address>,` line.
        resource: Option<String>,
        /// Terraform's own diagnostics (summary and detail), without source snippets; the full
        /// output is in the log.
        message: String,
        /// Worth retrying: state lock contention, network trouble.
        transient: bool,
    },
    #[error(
        "the plan would {} protected resource(s), so nothing was applied: {}; run `nixmox up --allow-destroy` to apply it (data in them is lost)",
        verbs(changes),
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; ")
    )]
    DestroyRefused { changes: Vec<GuardedChange> },
    #[error("`{command}` printed output NixMox cannot read: {message}")]
    BadOutput { command: String, message: String },
    #[error("the rendered Terraform configuration `{}` does not exist (render first)", .0.display())]
    NotRendered(PathBuf),
    #[error("{context} `{}`: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Exec(ExecError),
}

/// "delete", "replace" or "delete or replace", as the changes need.
fn verbs(changes: &[GuardedChange]) -> &'static str {
    let delete = changes.iter().any(|c| c.action == "delete");
    let replace = changes.iter().any(|c| c.action == "replace");
    match (delete, replace) {
        (true, true) => "delete or replace",
        (true, false) => "delete",
        _ => "replace",
    }
}

impl TfError {
    /// Whether retrying the step may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TfError::Failed {
                transient: true,
                ..
            }
        )
    }
}

/// A container that PVE moved to another node, for the workspace's state to follow.
///
/// bpg/proxmox (`~> 0.82.0`) reads a container at `/nodes/<node_name>/lxc/<vm_id>` of its
/// state, and `node_name` is `ForceNew`: a changed node plans a replacement, and ignoring the
/// change (`lifecycle.ignore_changes`) would leave the state pointing at the old node, where
/// the next refresh finds nothing, forgets the container and plans creating it again. So after
/// the migration the state entry is replaced by an import from the new node (its importer's ID
/// is `<node>/<vmid>`); what the import cannot read back (the template and SSH keys) is in the
/// container's `ignore_changes` already (`render::terraform::CONTAINER_CREATE_ONLY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMove {
    /// `proxmox_virtual_environment_container.<name>`.
    pub address: String,
    pub vmid: u32,
    /// The node it runs on now.
    pub node: String,
}

/// The commands that make a workspace's state follow one moved container: forget the entry
/// that names the old node, then import it from the new one.
pub fn follow_argv(state_args: &[String], m: &NodeMove) -> [Vec<String>; 2] {
    let mut rm = vec!["state".to_string(), "rm".into()];
    rm.extend(state_args.iter().cloned());
    rm.push(m.address.clone());
    let mut import = vec![
        "import".to_string(),
        "-no-color".into(),
        "-input=false".into(),
    ];
    import.extend(state_args.iter().cloned());
    import.push(m.address.clone());
    import.push(format!("{}/{}", m.node, m.vmid));
    [rm, import]
}

/// The node and vmid of every bpg/proxmox container in a Terraform state (JSON, format 4),
/// keyed by address (only root-module resources without `count`/`for_each`, as NixMox renders
/// them).
pub fn container_nodes(state_json: &str) -> Result<Vec<(String, String, u32)>, String> {
    let doc: serde_json::Value =
        serde_json::from_str(state_json).map_err(|e| format!("not a Terraform state: {e}"))?;
    let mut out = Vec::new();
    for r in doc["resources"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if r["mode"] != "managed"
            || r["type"] != "proxmox_virtual_environment_container"
            || r.get("module").is_some()
        {
            continue;
        }
        let (Some(name), Some(inst)) = (r["name"].as_str(), r["instances"].get(0)) else {
            continue;
        };
        let attrs = &inst["attributes"];
        let (Some(node), Some(vmid)) = (attrs["node_name"].as_str(), attrs["vm_id"].as_u64())
        else {
            continue;
        };
        out.push((
            format!("proxmox_virtual_environment_container.{name}"),
            node.to_string(),
            u32::try_from(vmid).map_err(|_| format!("vm_id {vmid} of {name} is out of range"))?,
        ));
    }
    Ok(out)
}

impl Terraform {
    pub fn new(binary: impl Into<PathBuf>) -> Terraform {
        Terraform {
            binary: binary.into(),
            env: Vec::new(),
        }
    }

    /// Brings the workspace to its configuration: `init` if needed, the `apply_order` targets one
    /// by one, then `plan -detailed-exitcode -out` and `apply` of that plan when it has changes,
    /// then `output -json`.
    pub fn apply_step(&self, ws: &Workspace, opts: &StepOpts) -> Result<Applied, TfError> {
        let mut run = Runner::new(self, ws, opts)?;
        run.ensure_init(false)?;
        let state = run.state_args();
        let mut changed = false;
        let plan_file = ws.data_dir.join(PLAN_FILE);

        // Targeted applies are not saved plans: check the whole plan first, which includes
        // everything they would do.
        if opts.guard.is_some() && !opts.apply_order.is_empty() {
            let mut args = vec![
                "plan".to_string(),
                "-no-color".into(),
                "-input=false".into(),
                "-detailed-exitcode".into(),
                format!("-out={}", plan_file.display()),
            ];
            args.extend(state.iter().cloned());
            let checked = run.tf(&args, &[0, 2], false).and_then(|f| match f.code {
                Some(2) => run.guard(&plan_file),
                _ => Ok(()),
            });
            let _ = fs::remove_file(&plan_file);
            checked?;
        }

        for target in &opts.apply_order {
            let mut args = vec![
                "apply".to_string(),
                "-no-color".into(),
                "-input=false".into(),
                "-auto-approve".into(),
                format!("-target={target}"),
            ];
            args.extend(state.iter().cloned());
            let f = run.tf(&args, &[0], false)?;
            changed |= apply_changed(&f.stdout);
        }

        let mut args = vec![
            "plan".to_string(),
            "-no-color".into(),
            "-input=false".into(),
            "-detailed-exitcode".into(),
            format!("-out={}", plan_file.display()),
        ];
        args.extend(state.iter().cloned());
        let planned = run.tf(&args, &[0, 2], false);
        let result = planned.and_then(|f| {
            if f.code == Some(2) {
                run.guard(&plan_file)?;
                let mut args = vec![
                    "apply".to_string(),
                    "-no-color".into(),
                    "-input=false".into(),
                ];
                args.extend(state.iter().cloned());
                args.push(plan_file.display().to_string());
                run.tf(&args, &[0], false)?;
                changed = true;
            }
            Ok(())
        });
        // The plan file holds every value in clear, secrets included.
        let _ = fs::remove_file(&plan_file);
        result?;

        let outputs = run.outputs()?;
        Ok(Applied { changed, outputs })
    }

    /// What changed outside Terraform since the last apply: `plan -refresh-only -out`, then
    /// `resource_drift` of `show -json` of that plan (the refresh-only plan's exit code reports
    /// changes right after an apply even when nothing drifted).
    pub fn drift(&self, ws: &Workspace, opts: &StepOpts) -> Result<Vec<DriftedResource>, TfError> {
        let mut run = Runner::new(self, ws, opts)?;
        run.ensure_init(false)?;
        let plan_file = ws.data_dir.join(DRIFT_PLAN_FILE);
        let mut args = vec![
            "plan".to_string(),
            "-no-color".into(),
            "-input=false".into(),
            "-refresh-only".into(),
            format!("-out={}", plan_file.display()),
        ];
        args.extend(run.state_args());
        let result = run.tf(&args, &[0], false).and_then(|_| {
            let drift = run.show_plan(&plan_file, parse_drift)?;
            let mut summary = format!("# {} drifted resource(s)", drift.len());
            for d in &drift {
                summary.push_str(&format!("\n#   {} ({})", d.address, d.actions.join(", ")));
            }
            run.note(&summary)?;
            Ok(drift)
        });
        let _ = fs::remove_file(&plan_file);
        result
    }

    /// The resource addresses the workspace's state holds (`terraform state list`), what
    /// `destroy` would destroy. Without a state file (local state) there are none and no command
    /// runs; `state list` on a local state needs neither `init` nor the providers.
    pub fn state_list(&self, ws: &Workspace, opts: &StepOpts) -> Result<Vec<String>, TfError> {
        let mut run = Runner::new(self, ws, opts)?;
        if run.local_state && !ws.data_dir.join(STATE_FILE).exists() {
            return Ok(Vec::new());
        }
        if !run.local_state {
            run.ensure_init(false)?;
        }
        let mut args = vec!["state".to_string(), "list".into()];
        args.extend(run.state_args());
        let f = run.tf(&args, &[0], true)?;
        Ok(f.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The containers the workspace's state records, with their node and vmid (nothing when
    /// there is no state yet): the local state file is read; another backend's state is read
    /// with `terraform state pull` (after `init` if needed).
    pub fn container_nodes(
        &self,
        ws: &Workspace,
        opts: &StepOpts,
    ) -> Result<Vec<(String, String, u32)>, TfError> {
        let mut run = Runner::new(self, ws, opts)?;
        let Some(text) = run.read_state()? else {
            return Ok(Vec::new());
        };
        container_nodes(&String::from_utf8_lossy(&text)).map_err(|message| TfError::BadOutput {
            command: run.command_name("state pull"),
            message,
        })
    }

    /// Makes the state follow containers PVE has moved ([`NodeMove`]): `state rm` then
    /// `import <node>/<vmid>` per container. All or nothing: the state is copied first and put
    /// back when any command fails (the local file rewritten; another backend's state with
    /// `state push -force`), so a failure leaves the state as it was, still naming the old
    /// node; the next run finds the container on the new one and only imports.
    pub fn follow_moves(
        &self,
        ws: &Workspace,
        opts: &StepOpts,
        moves: &[NodeMove],
    ) -> Result<(), TfError> {
        if moves.is_empty() {
            return Ok(());
        }
        let mut run = Runner::new(self, ws, opts)?;
        let before = run.read_state()?;
        run.ensure_init(false)?;
        let state_args = run.state_args();
        let result = moves.iter().try_for_each(|m| {
            run.note(&format!(
                "# CT {} moved to node {}: the state follows ({} re-imported as {}/{})",
                m.vmid, m.node, m.address, m.node, m.vmid
            ))?;
            for args in follow_argv(&state_args, m) {
                run.tf(&args, &[0], false).map_err(|e| match e {
                    TfError::Failed {
                        command,
                        message,
                        transient,
                        ..
                    } => TfError::Failed {
                        command,
                        resource: Some(m.address.clone()),
                        message: format!(
                            "CT {} is on node {} but its state could not follow: {message}; the state was put back as it was",
                            m.vmid, m.node
                        ),
                        transient,
                    },
                    other => other,
                })?;
            }
            Ok(())
        });
        if result.is_err() {
            run.put_state_back(before.as_deref())?;
            run.note("# the state was put back as it was before the moves")?;
        }
        result
    }

    /// Destroys everything the workspace's state holds. Without a state file (local state) there
    /// is nothing to destroy and no command runs. The data directory is kept.
    pub fn destroy(&self, ws: &Workspace, opts: &StepOpts) -> Result<(), TfError> {
        let mut run = Runner::new(self, ws, opts)?;
        if run.local_state && !ws.data_dir.join(STATE_FILE).exists() {
            run.note("# nothing to destroy: no state yet")?;
            return Ok(());
        }
        run.ensure_init(false)?;
        let mut args = vec![
            "destroy".to_string(),
            "-no-color".into(),
            "-input=false".into(),
            "-auto-approve".into(),
        ];
        args.extend(run.state_args());
        run.tf(&args, &[0], false)?;
        Ok(())
    }
}

/// One step's worth of commands against one workspace.
struct Runner<'a> {
    tf: &'a Terraform,
    ws: &'a Workspace,
    opts: &'a StepOpts,
    deadline: Option<Instant>,
    /// The state is local and ours: pass `-state`.
    local_state: bool,
    /// `init` ran during this step (no point retrying after another one).
    initialized: bool,
}

impl<'a> Runner<'a> {
    fn new(
        tf: &'a Terraform,
        ws: &'a Workspace,
        opts: &'a StepOpts,
    ) -> Result<Runner<'a>, TfError> {
        if !ws.config_dir.is_dir() {
            return Err(TfError::NotRendered(ws.config_dir.clone()));
        }
        fs::create_dir_all(&ws.data_dir).map_err(|source| TfError::Io {
            context: "cannot create the Terraform data directory",
            path: ws.data_dir.clone(),
            source,
        })?;
        let local_state = !declares_own_backend(&ws.config_dir);
        let runner = Runner {
            tf,
            ws,
            opts,
            deadline: opts.timeout.map(|t| Instant::now() + t),
            local_state,
            initialized: false,
        };
        runner.copy_lock_in()?;
        Ok(runner)
    }

    /// The state as it is now: the local file (`None` when there is none yet), or `state
    /// pull` of the configured backend (`None` when it is empty).
    fn read_state(&mut self) -> Result<Option<Vec<u8>>, TfError> {
        if self.local_state {
            let path = self.ws.data_dir.join(STATE_FILE);
            return match fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(TfError::Io {
                    context: "cannot read the Terraform state",
                    path,
                    source,
                }),
            };
        }
        self.ensure_init(false)?;
        let args = ["state", "pull"].map(String::from);
        let f = self.tf(&args, &[0], true)?;
        Ok((!f.stdout.trim().is_empty()).then(|| f.stdout.into_bytes()))
    }

    /// Puts back a state read by `read_state`: the local file is replaced atomically; another
    /// backend gets it through `state push -force` (its serial is behind by now).
    fn put_state_back(&mut self, before: Option<&[u8]>) -> Result<(), TfError> {
        let Some(before) = before else {
            // There was none: nothing of it can have been lost.
            return Ok(());
        };
        let tmp = self.ws.data_dir.join(format!("{STATE_FILE}.before-move"));
        let io_error = |source| TfError::Io {
            context: "cannot put back the Terraform state as it was before the moves",
            path: tmp.clone(),
            source,
        };
        fs::write(&tmp, before).map_err(io_error)?;
        if self.local_state {
            return fs::rename(&tmp, self.ws.data_dir.join(STATE_FILE)).map_err(io_error);
        }
        let args = vec![
            "state".to_string(),
            "push".into(),
            "-force".into(),
            tmp.display().to_string(),
        ];
        let pushed = self.tf(&args, &[0], false).map(|_| ());
        // The copy holds the state's secrets in clear.
        let _ = fs::remove_file(&tmp);
        pushed
    }

    fn state_args(&self) -> Vec<String> {
        if self.local_state {
            vec![format!(
                "-state={}",
                self.ws.data_dir.join(STATE_FILE).display()
            )]
        } else {
            Vec::new()
        }
    }

    /// `terraform plan`, `tofu apply`: the binary's file name and the subcommand.
    fn command_name(&self, sub: &str) -> String {
        let bin = self
            .tf
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "terraform".to_string());
        format!("{bin} {sub}")
    }

    fn cmd(&self, args: &[String]) -> Cmd {
        let mut cmd = Cmd::new(self.tf.binary.as_os_str()).args(args.iter().map(String::as_str));
        cmd.cwd = Some(self.ws.config_dir.clone());
        cmd.env = self.tf.env.clone();
        let data = self.ws.data_dir.join(".terraform");
        cmd.env(OsString::from("TF_DATA_DIR"), data.into_os_string())
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_INPUT", "0")
    }

    /// Appends a line of ours to the step log.
    fn note(&self, text: &str) -> Result<(), TfError> {
        exec::append_log(&self.opts.log, text, &self.opts.redact).map_err(|e| self.exec_error(e))
    }

    fn exec_error(&self, e: ExecError) -> TfError {
        match e {
            ExecError::NotFound { .. } => TfError::NotFound {
                binary: self.tf.binary.display().to_string(),
            },
            ExecError::TimedOut { program, .. } => TfError::Exec(ExecError::TimedOut {
                program,
                after: self.opts.timeout.unwrap_or_default(),
            }),
            other => TfError::Exec(other),
        }
    }

    /// Runs one command; an exit code outside `ok` is a [`TfError::Failed`] built from its
    /// diagnostics. A failure asking for `terraform init` runs `init` and retries once.
    fn tf(
        &mut self,
        args: &[String],
        ok: &[i32],
        stdout_is_data: bool,
    ) -> Result<Finished, TfError> {
        match self.tf_once(args, ok, stdout_is_data) {
            Err(TfError::Failed { message, .. })
                if !self.initialized && args[0] != "init" && message.contains("terraform init") =>
            {
                self.note("# Terraform asks for init: running it and retrying")?;
                self.ensure_init(true)?;
                self.tf_once(args, ok, stdout_is_data)
            }
            other => other,
        }
    }

    fn tf_once(
        &self,
        args: &[String],
        ok: &[i32],
        stdout_is_data: bool,
    ) -> Result<Finished, TfError> {
        let timeout = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.exec_error(ExecError::TimedOut {
                        program: self.command_name(&args[0]),
                        after: Duration::ZERO,
                    }));
                }
                Some(left)
            }
            None => None,
        };
        let run_opts = RunOpts {
            timeout,
            log: Some(self.opts.log.clone()),
            cancel: self.opts.cancel.clone(),
            redact: self.opts.redact.clone(),
            stdout_is_data,
            ..RunOpts::default()
        };
        let f = exec::run(&self.cmd(args), &run_opts).map_err(|e| self.exec_error(e))?;
        if f.code.is_some_and(|c| ok.contains(&c)) {
            return Ok(f);
        }
        Err(failure(self.command_name(&args[0]), &f))
    }

    fn copy_lock_in(&self) -> Result<(), TfError> {
        let saved = self.ws.data_dir.join(LOCK_FILE);
        if saved.is_file() {
            let dest = self.ws.config_dir.join(LOCK_FILE);
            fs::copy(&saved, &dest).map_err(|source| TfError::Io {
                context: "cannot copy the provider lock file to",
                path: dest,
                source,
            })?;
        }
        Ok(())
    }

    /// Runs `init` unless the marker says nothing it depends on changed (or `force`).
    fn ensure_init(&mut self, force: bool) -> Result<(), TfError> {
        let marker = self.ws.data_dir.join(INIT_MARKER);
        let tf_data = self.ws.data_dir.join(".terraform");
        if !force && tf_data.is_dir() {
            let hash = self.init_hash()?;
            if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == hash) {
                return self
                    .note("# terraform init skipped: providers, modules and lock file unchanged");
            }
        }
        let _ = fs::remove_file(&marker);
        let args = ["init", "-no-color", "-input=false"].map(String::from);
        self.tf_once(&args, &[0], false)?;
        self.initialized = true;
        // Keep the lock file Terraform wrote (or kept) for the next render.
        let produced = self.ws.config_dir.join(LOCK_FILE);
        if produced.is_file() {
            let saved = self.ws.data_dir.join(LOCK_FILE);
            fs::copy(&produced, &saved).map_err(|source| TfError::Io {
                context: "cannot save the provider lock file to",
                path: saved,
                source,
            })?;
        }
        let hash = self.init_hash()?;
        fs::write(&marker, format!("{hash}\n")).map_err(|source| TfError::Io {
            context: "cannot write",
            path: marker,
            source,
        })
    }

    fn init_hash(&self) -> Result<String, TfError> {
        let mut h = Sha256::new();
        h.update(self.tf.binary.as_os_str().as_encoded_bytes());
        h.update([0]);
        // Only what can change providers or modules counts: a new `*.tf.json` of resources and
        // outputs alone does not make `init` run again.
        for (name, text) in config_files(&self.ws.config_dir)? {
            let relevant = if name.ends_with(".tf.json") {
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(map)) => {
                        // Of a module block only where it comes from matters: its arguments
                        // (variables) change the plan, not what `init` installs.
                        let modules: serde_json::Map<String, serde_json::Value> = map
                            .get("module")
                            .and_then(|m| m.as_object())
                            .map(|m| {
                                m.iter()
                                    .map(|(name, block)| {
                                        let keep = serde_json::json!({
                                            "source": block.get("source"),
                                            "version": block.get("version"),
                                        });
                                        (name.clone(), keep)
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let terraform = map
                            .get("terraform")
                            .map(|v| v.to_string())
                            .unwrap_or_default();
                        if terraform.is_empty() && modules.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "terraform={terraform}\nmodule={}\n",
                                serde_json::Value::Object(modules)
                            )
                        }
                    }
                    _ => text,
                }
            } else {
                text
            };
            if !relevant.is_empty() {
                h.update(name.as_bytes());
                h.update([0]);
                h.update(relevant.as_bytes());
                h.update([0]);
            }
        }
        match fs::read(self.ws.data_dir.join(LOCK_FILE)) {
            Ok(lock) => h.update(&lock),
            Err(_) => h.update(b"no lock file"),
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// `terraform show -json PLAN`, read by `parse` (Terraform's JSON plan format).
    fn show_plan<T>(
        &mut self,
        plan_file: &Path,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, TfError> {
        let show = vec![
            "show".to_string(),
            "-no-color".into(),
            "-json".into(),
            plan_file.display().to_string(),
        ];
        let f = self.tf(&show, &[0], true)?;
        parse(&f.stdout).map_err(|message| TfError::BadOutput {
            command: self.command_name("show"),
            message,
        })
    }

    /// The destroy guard: reads the saved plan (`show -json`) and refuses it when it deletes
    /// or replaces a protected resource the run does not allow to go. No guard, no command.
    fn guard(&mut self, plan_file: &Path) -> Result<(), TfError> {
        let Some(guard) = &self.opts.guard else {
            return Ok(());
        };
        let planned = self.show_plan(plan_file, parse_destroys)?;
        let mut refused = Vec::new();
        let mut summary = format!(
            "# destroy guard: {} delete(s) or replacement(s) planned",
            planned.len()
        );
        for (change, rtype) in planned {
            let protected = guard.protection.covers(&change.address, &rtype);
            let allowed = !protected
                || guard.allow_destroy
                || (guard.allow_deletes && change.action == "delete");
            summary.push_str(&format!(
                "\n#   {change}: {}",
                match (protected, allowed) {
                    (false, _) => "not protected",
                    (true, true) => "protected, allowed by this run",
                    (true, false) => "protected, refused",
                }
            ));
            if !allowed {
                refused.push(change);
            }
        }
        self.note(&summary)?;
        if refused.is_empty() {
            Ok(())
        } else {
            Err(TfError::DestroyRefused { changes: refused })
        }
    }

    /// `output -json`, never logged in full: the log gets one line per output, sensitive values
    /// hidden.
    fn outputs(&mut self) -> Result<Vec<TfOutput>, TfError> {
        let mut args = vec!["output".to_string(), "-no-color".into(), "-json".into()];
        args.extend(self.state_args());
        let f = self.tf(&args, &[0], true)?;
        let outputs = parse_outputs(&f.stdout).map_err(|message| TfError::BadOutput {
            command: self.command_name("output"),
            message,
        })?;
        let mut summary = format!("# {} output(s)", outputs.len());
        for o in &outputs {
            let shown = if o.sensitive {
                "<sensitive>".to_string()
            } else {
                o.value.to_string()
            };
            summary.push_str(&format!("\n#   {} = {shown}", o.name));
        }
        self.note(&summary)?;
        Ok(outputs)
    }
}

/// The configuration's files Terraform reads, sorted by name.
fn config_files(dir: &Path) -> Result<Vec<(String, String)>, TfError> {
    let io_err = |source| TfError::Io {
        context: "cannot read the Terraform configuration",
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.ends_with(".tf") || name.ends_with(".tf.json")) || !entry.path().is_file() {
            continue;
        }
        let text = fs::read_to_string(entry.path()).map_err(|source| TfError::Io {
            context: "cannot read",
            path: entry.path(),
            source,
        })?;
        files.push((name, text));
    }
    files.sort();
    Ok(files)
}

/// Whether the configuration picks its own state location: a backend other than `local`, or a
/// `local` one with a `path`. Then `-state` is not passed.
fn declares_own_backend(dir: &Path) -> bool {
    let Ok(files) = config_files(dir) else {
        return false;
    };
    for (name, text) in files {
        if name.ends_with(".tf.json") {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            // `terraform` is an object, or a list of them.
            let blocks: Vec<&serde_json::Value> = match v.get("terraform") {
                Some(serde_json::Value::Array(a)) => a.iter().collect(),
                Some(t) => vec![t],
                None => vec![],
            };
            for t in blocks {
                let Some(backends) = t.get("backend").and_then(|b| b.as_object()) else {
                    continue;
                };
                for (kind, body) in backends {
                    if kind != "local" || body.get("path").is_some() {
                        return true;
                    }
                }
            }
        } else {
            // HCL: a good-enough look for `backend "<kind>"`.
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("backend") {
                    let kind = rest.trim().trim_start_matches('"');
                    if !kind.starts_with("local\"") {
                        return true;
                    }
                    if text.contains("path") {
                        return true;
                    }
                }
            }
        }
    }
    false
}

/// Whether an `apply`'s output reports changes ("Apply complete! Resources: 0 added, 0 changed,
/// 0 destroyed." is the only "no").
fn apply_changed(stdout: &str) -> bool {
    let Some(line) = stdout
        .lines()
        .find(|l| l.starts_with("Apply complete! Resources:"))
    else {
        return !stdout.contains("No changes.");
    };
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .any(|n| n != "0")
}

fn parse_outputs(json: &str) -> Result<Vec<TfOutput>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let map = v
        .as_object()
        .ok_or_else(|| "expected a JSON object of outputs".to_string())?;
    let mut outputs = Vec::with_capacity(map.len());
    for (name, o) in map {
        outputs.push(TfOutput {
            name: name.clone(),
            value: o.get("value").cloned().unwrap_or(serde_json::Value::Null),
            sensitive: o
                .get("sensitive")
                .and_then(|s| s.as_bool())
                .unwrap_or(false),
        });
    }
    outputs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(outputs)
}

/// The deletes and replacements of a saved plan's `show -json`, with each resource's type.
fn parse_destroys(json: &str) -> Result<Vec<(GuardedChange, String)>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let Some(items) = v.get("resource_changes").and_then(|d| d.as_array()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in items {
        if item.get("mode").and_then(|m| m.as_str()) == Some("data") {
            continue;
        }
        let actions: Vec<&str> = item
            .pointer("/change/actions")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let action = match actions.as_slice() {
            ["delete"] => "delete",
            ["delete", "create"] | ["create", "delete"] => "replace",
            _ => continue,
        };
        let address = item
            .get("address")
            .and_then(|a| a.as_str())
            .ok_or_else(|| "resource_changes entry without an address".to_string())?;
        let rtype = item
            .get("type")
            .and_then(|a| a.as_str())
            .unwrap_or_default();
        // `replace_paths`: lists of steps, `["disk", 0, "datastore_id"]` → `disk[0].datastore_id`.
        let because = item
            .pointer("/change/replace_paths")
            .and_then(|p| p.as_array())
            .map(|paths| {
                paths
                    .iter()
                    .filter_map(|p| p.as_array())
                    .map(|steps| {
                        let mut s = String::new();
                        for step in steps {
                            match step {
                                serde_json::Value::Number(n) => s.push_str(&format!("[{n}]")),
                                serde_json::Value::String(k) if !s.is_empty() => {
                                    s.push('.');
                                    s.push_str(k);
                                }
                                serde_json::Value::String(k) => s.push_str(k),
                                _ => {}
                            }
                        }
                        s
                    })
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            GuardedChange {
                address: address.to_string(),
                action: action.to_string(),
                because,
            },
            rtype.to_string(),
        ));
    }
    Ok(out)
}

fn parse_drift(json: &str) -> Result<Vec<DriftedResource>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let Some(items) = v.get("resource_drift").and_then(|d| d.as_array()) else {
        return Ok(Vec::new());
    };
    let mut drift = Vec::new();
    for item in items {
        let address = item
            .get("address")
            .and_then(|a| a.as_str())
            .ok_or_else(|| "resource_drift entry without an address".to_string())?;
        let actions = item
            .pointer("/change/actions")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        drift.push(DriftedResource {
            address: address.to_string(),
            actions,
        });
    }
    Ok(drift)
}

/// Builds [`TfError::Failed`] from a failed command's (already redacted) output.
fn failure(command: String, f: &Finished) -> TfError {
    let mut diags = parse_diagnostics(&f.stderr);
    if diags.is_empty() {
        diags = parse_diagnostics(&f.stdout);
    }
    let (message, resource) = if diags.is_empty() {
        // No diagnostics: the last few lines of whatever it printed.
        let source = if f.stderr.trim().is_empty() {
            &f.stdout
        } else {
            &f.stderr
        };
        let lines: Vec<&str> = source
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(MAX_DETAIL_LINES)..].join("\n");
        let code = match (f.code, f.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "unknown status".to_string(),
        };
        let message = if tail.is_empty() {
            format!("{code}, no output")
        } else {
            format!("{tail} ({code})")
        };
        (message, None)
    } else {
        let resource = diags.iter().find_map(|d| d.resource.clone());
        let mut parts: Vec<String> = diags
            .iter()
            .take(MAX_DIAGNOSTICS)
            .map(Diagnostic::render)
            .collect();
        if diags.len() > MAX_DIAGNOSTICS {
            parts.push(format!(
                "(and {} more error(s); see the log)",
                diags.len() - MAX_DIAGNOSTICS
            ));
        }
        (parts.join("\n"), resource)
    };
    let transient = is_transient(&message);
    TfError::Failed {
        command,
        resource,
        message,
        transient,
    }
}

fn is_transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "error acquiring the state lock",
        "connection refused",
        "connection reset",
        "timeout",
        "timed out",
        "tls handshake",
        "503",
        "502",
        "429",
    ]
    .iter()
    .any(|p| m.contains(p))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Diagnostic {
    summary: String,
    resource: Option<String>,
    location: Option<String>,
    /// Paragraphs, each one line (Terraform's wrapping undone); indented lines kept as they are.
    detail: Vec<String>,
}

impl Diagnostic {
    fn render(&self) -> String {
        let mut s = format!("Error: {}", self.summary);
        if let Some(loc) = &self.location {
            s.push_str(&format!(" ({loc})"));
        }
        for p in &self.detail {
            s.push('\n');
            s.push_str(p);
        }
        s
    }
}

/// Terraform's `Error:` diagnostics in plain (`-no-color`) output. Newer versions frame them with
/// `╷`, `│ ` and `╵`; the frame is stripped first.
fn parse_diagnostics(text: &str) -> Vec<Diagnostic> {
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let l = l.trim_end();
            let l = l
                .strip_prefix("│ ")
                .or_else(|| l.strip_prefix('│'))
                .unwrap_or(l);
            if l == "╷" || l == "╵" {
                String::new()
            } else {
                l.to_string()
            }
        })
        .collect();
    let mut diags = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(summary) = lines[i].strip_prefix("Error: ") else {
            i += 1;
            continue;
        };
        let mut body = Vec::new();
        i += 1;
        while i < lines.len()
            && !lines[i].starts_with("Error: ")
            && !lines[i].starts_with("Warning: ")
        {
            body.push(lines[i].as_str());
            i += 1;
        }
        diags.push(diagnostic(summary.trim(), &body));
    }
    diags
}

fn diagnostic(summary: &str, body: &[&str]) -> Diagnostic {
    let mut resource = None;
    let mut location = None;
    let mut detail: Vec<String> = Vec::new();
    let mut detail_lines = 0;
    // Split into paragraphs at blank lines.
    for para in body.split(|l| l.trim().is_empty()) {
        if para.is_empty() {
            continue;
        }
        let first = para[0].trim_start();
        let is_source =
            para[0].starts_with("  ") && (first.starts_with("with ") || first.starts_with("on "));
        if is_source {
            // `  with <address>,` / `  on <file> line <n>, in <block>:` and the source snippet.
            for l in para {
                let t = l.trim();
                if let Some(addr) = t.strip_prefix("with ") {
                    resource.get_or_insert_with(|| addr.trim_end_matches(',').to_string());
                } else if let Some(on) = t.strip_prefix("on ") {
                    let on = on.trim_end_matches(':');
                    let short = on.split(", in ").next().unwrap_or(on);
                    location.get_or_insert_with(|| short.to_string());
                }
            }
            continue;
        }
        if detail_lines >= MAX_DETAIL_LINES {
            continue;
        }
        let mut current = String::new();
        for l in para {
            if detail_lines >= MAX_DETAIL_LINES {
                break;
            }
            if l.starts_with(' ') || l.starts_with('\t') {
                if !current.is_empty() {
                    detail.push(std::mem::take(&mut current));
                    detail_lines += 1;
                }
                detail.push(l.trim_end().to_string());
                detail_lines += 1;
            } else {
                if !current.is_empty() {
                    current.push(' ');
                }
                current.push_str(l.trim());
            }
        }
        if !current.is_empty() && detail_lines < MAX_DETAIL_LINES {
            detail.push(current);
            detail_lines += 1;
        }
    }
    Diagnostic {
        summary: summary.to_string(),
        resource,
        location,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn terraform_parses_diagnostics_without_snippets() {
        let stderr = "\nError: Reference to undeclared input variable\n\n  on bad.tf.json line 1, in output.bad:\n   1: {\"output\": {\"bad\": {\"value\": \"${var.nope}\"}}}\n\nAn input variable with the name \"nope\" has not been declared. This variable\ncan be declared with a variable \"nope\" {} block.\n\nError: local-exec provisioner error\n\n  with null_resource.fail,\n  on fail.tf.json line 1, in resource.null_resource.fail.provisioner[0].local-exec:\n   1: {\"resource\": {}}\n\nError running command 'exit 3': exit status 3. Output: boom\n\n";
        let d = parse_diagnostics(stderr);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].summary, "Reference to undeclared input variable");
        assert_eq!(d[0].location.as_deref(), Some("bad.tf.json line 1"));
        assert_eq!(d[0].resource, None);
        assert_eq!(
            d[0].detail,
            vec!["An input variable with the name \"nope\" has not been declared. This variable can be declared with a variable \"nope\" {} block."]
        );
        assert_eq!(d[1].resource.as_deref(), Some("null_resource.fail"));
        let f = Finished {
            code: Some(1),
            signal: None,
            stdout: String::new(),
            stderr: stderr.to_string(),
            duration: Duration::ZERO,
        };
        let err = failure("terraform apply".into(), &f);
        let TfError::Failed {
            ref resource,
            ref message,
            transient,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(resource.as_deref(), Some("null_resource.fail"));
        assert!(!transient);
        assert!(!message.contains("1: {"), "{message}");
        assert_eq!(
            err.to_string().lines().next().unwrap(),
            "`terraform apply` failed at null_resource.fail: Error: Reference to undeclared input variable (bad.tf.json line 1)"
        );
    }

    #[test]
    fn terraform_lock_error_is_transient_and_framed_output_parses() {
        let stderr = "╷\n│ Error: Error acquiring the state lock\n│ \n│ Error message: resource temporarily unavailable\n│ Lock Info:\n│   ID:        451a\n╵\n";
        let f = Finished {
            code: Some(1),
            signal: None,
            stdout: String::new(),
            stderr: stderr.into(),
            duration: Duration::ZERO,
        };
        let err = failure("terraform plan".into(), &f);
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("ID:        451a"), "{err}");
    }

    #[test]
    fn terraform_destroys_are_read_from_show_json() {
        let json = serde_json::json!({"resource_changes": [
            {"address": "a.x", "mode": "managed", "type": "a", "change": {"actions": ["update"]}},
            {"address": "a.y", "mode": "managed", "type": "a", "change": {"actions": ["delete"]}},
            {"address": "module.m.b.z[0]", "mode": "managed", "type": "b",
             "change": {"actions": ["delete", "create"], "replace_paths": [["disk", 0, "datastore_id"], ["unprivileged"]]}},
            {"address": "c.w", "mode": "managed", "type": "c", "change": {"actions": ["create", "delete"]}},
            {"address": "data.d.v", "mode": "data", "type": "d", "change": {"actions": ["delete"]}},
        ]})
        .to_string();
        let got: Vec<String> = parse_destroys(&json)
            .unwrap()
            .into_iter()
            .map(|(c, t)| format!("{t}: {c}"))
            .collect();
        assert_eq!(
            got,
            [
                "a: a.y (delete)",
                "b: module.m.b.z[0] (replace, forced by disk[0].datastore_id, unprivileged)",
                "c: c.w (replace)"
            ]
        );
        assert!(parse_destroys("{}").unwrap().is_empty());
    }

    #[test]
    fn terraform_apply_changed_counts() {
        assert!(!apply_changed(
            "x\nApply complete! Resources: 0 added, 0 changed, 0 destroyed.\n"
        ));
        assert!(apply_changed(
            "Apply complete! Resources: 1 added, 0 changed, 1 destroyed.\n"
        ));
        assert!(!apply_changed("No changes. Your infrastructure matches"));
    }

    #[test]
    fn terraform_backend_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("main.tf.json"), r#"{"resource": {}}"#).unwrap();
        assert!(!declares_own_backend(p));
        fs::write(
            p.join("b.tf.json"),
            r#"{"terraform": {"backend": {"local": {}}}}"#,
        )
        .unwrap();
        assert!(!declares_own_backend(p));
        fs::write(
            p.join("b.tf.json"),
            r#"{"terraform": {"backend": {"s3": {}}}}"#,
        )
        .unwrap();
        assert!(declares_own_backend(p));
        fs::remove_file(p.join("b.tf.json")).unwrap();
        fs::write(p.join("b.tf"), "terraform {\n  backend \"pg\" {}\n}\n").unwrap();
        assert!(declares_own_backend(p));
    }

    // ---- against the real Terraform 1.0.3 of scripts/install-tools ----

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .unwrap()
            .to_path_buf()
    }

    fn terraform() -> Terraform {
        let root = repo_root();
        let binary = root.join(".tools/bin/terraform");
        let rc = root.join(".tools/terraformrc");
        assert!(
            binary.is_file() && rc.is_file(),
            "Terraform 1.0.3 is missing from {}: run scripts/install-tools terraform",
            binary.display()
        );
        Terraform {
            binary,
            env: vec![("TF_CLI_CONFIG_FILE".into(), rc.into_os_string())],
        }
    }

    const SECRET: &str = "hunter2-sensitive-value";

    fn config(trigger: &str) -> String {
        serde_json::json!({
            "terraform": {"required_providers": {"null": {"source": "hashicorp/null", "version": "2.1.2"}}},
            "resource": {"null_resource": {
                "first": {"triggers": {"v": trigger}},
                "second": {"triggers": {"first": "${null_resource.first.id}"}}
            }},
            "output": {
                "trigger": {"value": trigger},
                "token": {"value": SECRET, "sensitive": true}
            }
        })
        .to_string()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ws: Workspace,
        logs: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let ws = Workspace {
                config_dir: dir.path().join("build/terraform/app"),
                data_dir: dir.path().join(".nixmox/terraform/app"),
            };
            let logs = dir.path().join(".nixmox/logs");
            Fixture {
                _dir: dir,
                ws,
                logs,
            }
        }

        /// Wipes and rewrites the config directory, as a render does.
        fn render(&self, files: &[(&str, String)]) {
            let _ = fs::remove_dir_all(&self.ws.config_dir);
            fs::create_dir_all(&self.ws.config_dir).unwrap();
            for (name, text) in files {
                fs::write(self.ws.config_dir.join(name), text).unwrap();
            }
        }

        fn opts(&self, log: &str) -> StepOpts {
            StepOpts {
                log: self.logs.join(format!("{log}.log")),
                timeout: Some(Duration::from_secs(120)),
                ..StepOpts::default()
            }
        }

        fn log(&self, log: &str) -> String {
            fs::read_to_string(self.logs.join(format!("{log}.log"))).unwrap_or_default()
        }
    }

    /// Lines of the log that start a command (`[time] $ terraform <sub> ...`).
    fn commands(log: &str) -> Vec<String> {
        log.lines()
            .filter_map(|l| l.split_once("] $ "))
            .map(|(_, cmd)| {
                let mut words = cmd.split_whitespace();
                let bin = words.next().unwrap_or_default();
                let bin = bin.rsplit('/').next().unwrap_or(bin);
                format!("{bin} {}", words.next().unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn terraform_follow_argv_forgets_then_imports_from_the_new_node() {
        let m = NodeMove {
            address: "proxmox_virtual_environment_container.web".into(),
            vmid: 905,
            node: "pve2".into(),
        };
        let state = vec!["-state=/p/.nixmox/terraform/infra/terraform.tfstate".to_string()];
        let [rm, import] = follow_argv(&state, &m);
        assert_eq!(
            rm,
            [
                "state",
                "rm",
                "-state=/p/.nixmox/terraform/infra/terraform.tfstate",
                "proxmox_virtual_environment_container.web"
            ]
        );
        // bpg/proxmox's importer: `<node>/<vmid>` (parseImportIDWithNodeName, v0.82).
        assert_eq!(
            import,
            [
                "import",
                "-no-color",
                "-input=false",
                "-state=/p/.nixmox/terraform/infra/terraform.tfstate",
                "proxmox_virtual_environment_container.web",
                "pve2/905"
            ]
        );
    }

    #[test]
    fn terraform_container_nodes_are_read_from_the_state() {
        let state = serde_json::json!({"version": 4, "serial": 3, "resources": [
            {"mode": "managed", "type": "proxmox_virtual_environment_container", "name": "web",
             "instances": [{"attributes": {"node_name": "pve1", "vm_id": 905}}]},
            {"mode": "data", "type": "proxmox_virtual_environment_container", "name": "d",
             "instances": [{"attributes": {"node_name": "pve1", "vm_id": 1}}]},
            {"module": "module.x", "mode": "managed", "type": "proxmox_virtual_environment_container",
             "name": "m", "instances": [{"attributes": {"node_name": "pve1", "vm_id": 2}}]},
            {"mode": "managed", "type": "null_resource", "name": "n", "instances": [{"attributes": {}}]}
        ]});
        assert_eq!(
            container_nodes(&state.to_string()).unwrap(),
            [(
                "proxmox_virtual_environment_container.web".to_string(),
                "pve1".to_string(),
                905
            )]
        );
        assert!(container_nodes("{")
            .unwrap_err()
            .starts_with("not a Terraform state"));
    }

    /// The all-or-nothing of `follow_moves`, with the real Terraform 1.0.3: `state rm` really
    /// removes the entry, then `import` really fails (the null provider's `null_resource`
    /// cannot be imported, standing in for an import bpg/proxmox refuses), and the state file is
    /// put back byte for byte.
    #[test]
    fn terraform_follow_moves_puts_the_state_back_when_the_import_fails() {
        let tf = terraform();
        let fx = Fixture::new();
        fx.render(&[("main.tf.json", config("one"))]);
        tf.apply_step(&fx.ws, &fx.opts("1")).unwrap();
        let state = fx.ws.data_dir.join(STATE_FILE);
        let before = fs::read(&state).unwrap();
        let m = NodeMove {
            address: "null_resource.first".into(),
            vmid: 905,
            node: "pve2".into(),
        };
        let e = tf
            .follow_moves(&fx.ws, &fx.opts("2"), &[m])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("`terraform import` failed at null_resource.first: CT 905 is on node pve2 but its state could not follow:")
                && e.ends_with("the state was put back as it was"),
            "{e}"
        );
        assert_eq!(
            commands(&fx.log("2")),
            ["terraform state", "terraform import"]
        );
        assert_eq!(fs::read(&state).unwrap(), before);
        assert!(fx.log("2").contains("# the state was put back"));
        // Nothing to follow: no command.
        tf.follow_moves(&fx.ws, &fx.opts("3"), &[]).unwrap();
        assert_eq!(fx.log("3"), "");
    }

    /// The same with a backend the configuration declares (here `local` with its own `path`,
    /// which NixMox does not pass `-state` for): the state is read with `state pull` and put
    /// back with `state push -force`.
    #[test]
    fn terraform_follow_moves_puts_a_backends_state_back_too() {
        let tf = terraform();
        let fx = Fixture::new();
        let backend_state = fx.ws.data_dir.join("elsewhere.tfstate");
        let mut cfg: serde_json::Value = serde_json::from_str(&config("one")).unwrap();
        cfg["terraform"]["backend"] =
            serde_json::json!({"local": {"path": backend_state.display().to_string()}});
        fx.render(&[("main.tf.json", cfg.to_string())]);
        tf.apply_step(&fx.ws, &fx.opts("1")).unwrap();
        let read = || -> serde_json::Value {
            serde_json::from_str(&fs::read_to_string(&backend_state).unwrap()).unwrap()
        };
        let before = read();
        assert_eq!(before["resources"].as_array().unwrap().len(), 2);
        let m = NodeMove {
            address: "null_resource.first".into(),
            vmid: 905,
            node: "pve2".into(),
        };
        let e = tf
            .follow_moves(&fx.ws, &fx.opts("2"), &[m])
            .unwrap_err()
            .to_string();
        assert!(e.contains("the state was put back as it was"), "{e}");
        assert_eq!(
            commands(&fx.log("2")),
            [
                "terraform state",
                "terraform state",
                "terraform import",
                "terraform state"
            ]
        );
        assert!(fx.log("2").contains("state push -force"), "{}", fx.log("2"));
        assert!(
            !fx.log("2").contains(SECRET),
            "the pulled state is not logged"
        );
        let after = read();
        assert_eq!(after["resources"], before["resources"]);
        assert_eq!(after["lineage"], before["lineage"]);
        assert!(!fx
            .ws
            .data_dir
            .join("terraform.tfstate.before-move")
            .exists());
        assert!(!fx.ws.data_dir.join("terraform.tfstate").exists());
    }

    #[test]
    fn terraform_apply_step_lifecycle() {
        let tf = terraform();
        let fx = Fixture::new();
        fx.render(&[("main.tf.json", config("one"))]);

        // First apply: init, plan with changes, apply, outputs.
        let a = tf.apply_step(&fx.ws, &fx.opts("1")).unwrap();
        assert!(a.changed);
        assert_eq!(
            a.outputs,
            vec![
                TfOutput {
                    name: "token".into(),
                    value: serde_json::json!(SECRET),
                    sensitive: true
                },
                TfOutput {
                    name: "trigger".into(),
                    value: serde_json::json!("one"),
                    sensitive: false
                },
            ]
        );
        assert_eq!(
            commands(&fx.log("1")),
            [
                "terraform init",
                "terraform plan",
                "terraform apply",
                "terraform output"
            ]
        );
        assert!(fx.ws.data_dir.join("terraform.tfstate").is_file());
        assert!(fx.ws.data_dir.join(".terraform.lock.hcl").is_file());
        assert!(fx.ws.data_dir.join("init.sha256").is_file());
        assert!(
            !fx.ws.data_dir.join("plan.tfplan").exists(),
            "plan files are removed"
        );
        assert!(!fx.ws.config_dir.join("terraform.tfstate").exists());

        // Second: init skipped, nothing to apply.
        let a = tf.apply_step(&fx.ws, &fx.opts("2")).unwrap();
        assert!(!a.changed);
        assert_eq!(a.outputs.len(), 2);
        let log2 = fx.log("2");
        assert_eq!(
            commands(&log2),
            ["terraform plan", "terraform output"],
            "{log2}"
        );
        assert!(log2.contains("# terraform init skipped"), "{log2}");

        // A re-render wipes the config directory: state and lock survive in the data dir.
        fx.render(&[("main.tf.json", config("one"))]);
        let a = tf.apply_step(&fx.ws, &fx.opts("3")).unwrap();
        assert!(!a.changed);
        assert_eq!(
            commands(&fx.log("3")),
            ["terraform plan", "terraform output"]
        );

        // A changed trigger re-applies; a new file of outputs only needs no `init`.
        let extra = serde_json::json!({"output": {"extra": {"value": "e"}}}).to_string();
        fx.render(&[("main.tf.json", config("two")), ("extra.tf.json", extra)]);
        let a = tf.apply_step(&fx.ws, &fx.opts("4")).unwrap();
        assert!(a.changed);
        assert_eq!(a.outputs.len(), 3);
        assert_eq!(a.outputs[2].value, serde_json::json!("two"));
        assert!(!commands(&fx.log("4")).contains(&"terraform init".to_string()));

        // A changed provider requirement does.
        let mut changed = serde_json::from_str::<serde_json::Value>(&config("two")).unwrap();
        changed["terraform"]["required_providers"]["null"]["version"] = "~> 2.1".into();
        fx.render(&[("main.tf.json", changed.to_string())]);
        assert!(tf.apply_step(&fx.ws, &fx.opts("4b")).unwrap().changed);
        assert_eq!(commands(&fx.log("4b"))[0], "terraform init");
        fx.render(&[("main.tf.json", config("two"))]);

        drift_logs_and_destroy(&tf, &fx);
        // And applying again recreates.
        assert!(tf.apply_step(&fx.ws, &fx.opts("5")).unwrap().changed);
    }

    /// The end of `terraform_apply_step_lifecycle`, after its applies: no drift, no secret in
    /// any log, and a destroy that empties the state.
    fn drift_logs_and_destroy(tf: &Terraform, fx: &Fixture) {
        // Nothing drifted right after an apply (the refresh-only exit code would say otherwise).
        let drift = tf.drift(&fx.ws, &fx.opts("drift")).unwrap();
        assert_eq!(drift, vec![]);
        assert!(!fx.ws.data_dir.join("drift.tfplan").exists());

        // The sensitive value never reached any log.
        for log in ["1", "2", "3", "4", "4b", "drift"] {
            let text = fx.log(log);
            assert!(!text.contains(SECRET), "log {log}:\n{text}");
        }
        assert!(fx.log("1").contains("token = <sensitive>"));

        // `state list` names what a destroy takes; destroy empties the state.
        let listed = tf.state_list(&fx.ws, &fx.opts("list")).unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(
            listed.iter().all(|a| a.starts_with("null_resource.")),
            "{listed:?}"
        );
        tf.destroy(&fx.ws, &fx.opts("destroy")).unwrap();
        assert_eq!(
            tf.state_list(&fx.ws, &fx.opts("list")).unwrap(),
            Vec::<String>::new()
        );
        let state = fs::read_to_string(fx.ws.data_dir.join("terraform.tfstate")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        assert_eq!(state["resources"], serde_json::json!([]), "{state}");
        let log = fx.log("destroy");
        assert!(
            log.contains("Destroy complete! Resources: 2 destroyed."),
            "{log}"
        );
    }

    #[test]
    fn terraform_apply_order_runs_targets_first() {
        let tf = terraform();
        let fx = Fixture::new();
        fx.render(&[("main.tf.json", config("one"))]);
        let mut opts = fx.opts("order");
        opts.apply_order = vec!["null_resource.first".into()];
        let a = tf.apply_step(&fx.ws, &opts).unwrap();
        assert!(a.changed);
        let log = fx.log("order");
        assert_eq!(
            commands(&log),
            [
                "terraform init",
                "terraform apply",
                "terraform plan",
                "terraform apply",
                "terraform output"
            ],
            "{log}"
        );
        assert!(log.contains("-target=null_resource.first"), "{log}");
        // The targeted apply created only `first`; the full apply then created `second`.
        let targeted = log.split("-target=").nth(1).unwrap();
        let targeted = targeted.split("] $ ").next().unwrap();
        assert!(
            targeted.contains("null_resource.first: Creation complete"),
            "{targeted}"
        );
        assert!(!targeted.contains("null_resource.second"), "{targeted}");

        // With everything applied, targets report no change and nothing else is applied.
        let a = tf.apply_step(&fx.ws, &fx.opts("order2")).unwrap();
        assert!(!a.changed);
        let mut opts = fx.opts("order3");
        opts.apply_order = vec!["null_resource.first".into()];
        let a = tf.apply_step(&fx.ws, &opts).unwrap();
        assert!(!a.changed, "{}", fx.log("order3"));
    }

    #[test]
    fn terraform_broken_config_reports_the_summary_only() {
        let tf = terraform();
        let fx = Fixture::new();
        let broken = serde_json::json!({
            "resource": {"null_resource": {"x": {"triggers": {"v": "${var.nope}"}}}}
        })
        .to_string();
        fx.render(&[("main.tf.json", config("one")), ("broken.tf.json", broken)]);
        let err = tf.apply_step(&fx.ws, &fx.opts("broken")).unwrap_err();
        let TfError::Failed {
            ref command,
            ref message,
            transient,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert!(
            command == "terraform plan" || command == "terraform validate",
            "{command}"
        );
        assert!(!transient);
        assert!(
            message.starts_with(
                "Error: Reference to undeclared input variable (broken.tf.json line 1)"
            ),
            "{message}"
        );
        assert!(
            message.contains("\"nope\" has not been declared"),
            "{message}"
        );
        assert!(message.lines().count() <= 3, "{message}");
        assert!(
            !message.contains("Refreshing") && !message.contains("\"resource\""),
            "{message}"
        );
        // The full output is in the log.
        assert!(fx
            .log("broken")
            .contains("Reference to undeclared input variable"));
    }

    #[test]
    fn terraform_failing_resource_is_named() {
        let tf = terraform();
        let fx = Fixture::new();
        let failing = serde_json::json!({
            "resource": {"null_resource": {"boom": {
                "provisioner": [{"local-exec": {"command": "echo token=hunter2-in-log >&2; exit 3"}}]
            }}}
        })
        .to_string();
        fx.render(&[("main.tf.json", config("one")), ("boom.tf.json", failing)]);
        let mut opts = fx.opts("boom");
        opts.redact = vec!["hunter2-in-log".into()];
        let err = tf.apply_step(&fx.ws, &opts).unwrap_err();
        let TfError::Failed {
            ref command,
            ref resource,
            ref message,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(command, "terraform apply");
        assert_eq!(resource.as_deref(), Some("null_resource.boom"));
        assert!(
            message.contains("local-exec provisioner error"),
            "{message}"
        );
        assert!(message.contains("exit status 3"), "{message}");
        assert!(!message.contains("hunter2-in-log"), "{message}");
        let log = fx.log("boom");
        assert!(!log.contains("hunter2-in-log"), "{log}");
        assert!(log.contains("token=<redacted>"), "{log}");
    }

    #[test]
    fn terraform_missing_binary_and_unrendered_dir() {
        let fx = Fixture::new();
        fx.render(&[("main.tf.json", config("one"))]);
        let tf = Terraform::new("/nonexistent/terraform");
        let err = tf.apply_step(&fx.ws, &fx.opts("nf")).unwrap_err();
        assert!(matches!(err, TfError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "`/nonexistent/terraform` not found; install it or set terraform.binary"
        );
        let ws = Workspace {
            config_dir: fx.ws.config_dir.join("missing"),
            data_dir: fx.ws.data_dir.clone(),
        };
        let err = terraform().apply_step(&ws, &fx.opts("nr")).unwrap_err();
        assert!(matches!(err, TfError::NotRendered(_)), "{err:?}");
    }

    #[test]
    fn terraform_destroy_without_state_runs_nothing_and_cancel_stops() {
        let tf = terraform();
        let fx = Fixture::new();
        fx.render(&[("main.tf.json", config("one"))]);
        tf.destroy(&fx.ws, &fx.opts("d")).unwrap();
        assert!(commands(&fx.log("d")).is_empty());

        let mut opts = fx.opts("c");
        let flag = Arc::new(AtomicBool::new(true));
        opts.cancel = Some(Arc::clone(&flag));
        let err = tf.apply_step(&fx.ws, &opts).unwrap_err();
        assert!(
            matches!(err, TfError::Exec(ExecError::Cancelled)),
            "{err:?}"
        );
        flag.store(false, Ordering::SeqCst);
    }
}
