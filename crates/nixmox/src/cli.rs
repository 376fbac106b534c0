//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use clap_complete::engine::ArgValueCompleter;
use clap_complete::Shell;

use crate::complete as completion;

/// Docker Compose for Proxmox, with NixOS LXC containers.
#[derive(Debug, Parser)]
#[command(name = "nixmox", version, about, long_about = None)]
pub struct Cli {
    /// The project directory (holding nixmox.yaml); without it, the current directory or the
    /// nearest parent holding nixmox.yaml
    #[arg(
        short = 'C',
        long = "project",
        global = true,
        value_name = "DIR",
        default_value = "."
    )]
    pub project: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the project and every manifest; print a one-line summary
    Validate {
        /// Fail if nixmox.lock would have to change
        #[arg(long)]
        locked: bool,
    },
    /// Print the resolved project: defaults applied, edges explicit, allocations shown
    Config {
        /// Output format
        #[arg(long, value_enum, default_value_t = ConfigFormat::Yaml)]
        format: ConfigFormat,
        /// Only these services
        #[arg(add = ArgValueCompleter::new(completion::services))]
        services: Vec<String>,
    },
    /// Show the deployment plan: steps in phase order, what changes and why
    Plan {
        /// Only these services (with their dependencies unless --no-deps)
        #[arg(add = ArgValueCompleter::new(completion::services))]
        services: Vec<String>,
        /// Do not add the named services' dependencies
        #[arg(long)]
        no_deps: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Exit 0 when nothing changes, 2 when something does, 1 on error (as Terraform)
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Draw the service graph (or the step graph) as DOT, Mermaid or SVG
    Graph {
        /// Draw the plan's step graph instead of the service graph
        #[arg(long)]
        steps: bool,
        /// Output format
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Write the NixOS flake, host configurations and Terraform workspaces
    ///
    /// The tree `up` renders: workspaces that take an earlier step's Terraform outputs get the
    /// values the state store recorded (none before the first `up`; the store is read, never
    /// created).
    Render {
        /// Where to write them
        #[arg(long, value_name = "DIR", default_value = ".nixmox/build")]
        out: PathBuf,
    },
    /// Render, plan against the recorded state, and execute: only what changed
    Up(UpArgs),
    /// List past runs, newest first
    History {
        /// How many runs
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// One row per service: host, vmid, ip, state (live or last known), live health, last deploy
    Ps {
        /// Only these services
        #[arg(add = ArgValueCompleter::new(completion::services))]
        services: Vec<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
        /// Longest a single health check may take, like `5s` or `500ms`
        #[arg(long, value_name = "DURATION", default_value = "5s")]
        timeout: String,
    },
    /// Place every service afresh on the cluster's nodes and list the moves that would balance
    /// it; with `--yes`, record the new placement in nixmox.lock and migrate the moved
    /// containers (`up` of those services: migration, deploy, health checks)
    Rebalance {
        /// Apply the moves (without it, only list them)
        #[arg(long)]
        yes: bool,
    },
    /// Compare the Terraform state and the hosts' running systems with what NixMox last applied
    /// (exit 2 when anything drifted)
    Drift {
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Remove services (all if none named): their Terraform resources, their entries in the
    /// providers' configurations, their containers; lists them and asks first
    ///
    /// Before destroying anything, lists on stderr exactly what goes (containers with vmid and
    /// node, Terraform resources per workspace, databases with --purge-data), then asks on a
    /// terminal: the project's name when every service goes, `y` for some. Without a terminal
    /// it destroys nothing and exits 2 unless --yes.
    Down(DownArgs),
    /// Print a shell completion script (service names and step ids completed from the project)
    ///
    /// Load it from the shell's start-up file: bash `source <(nixmox completion bash)`, zsh
    /// `source <(nixmox completion zsh)`, fish `nixmox completion fish | source`, elvish `eval
    /// (nixmox completion elvish | slurp)`, PowerShell `nixmox completion powershell |
    /// Out-String | Invoke-Expression`. The script calls `nixmox` back for each completion.
    Completion {
        /// The shell
        #[arg(value_enum)]
        shell: Shell,
        /// A script that completes subcommands and options only, without calling nixmox back
        #[arg(long = "static")]
        static_script: bool,
    },
    /// Print the manual page, or write one page per command into a directory
    Man {
        /// Write `nixmox.1`, `nixmox-up.1`, … into this directory
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Print the last log of a step
    Logs {
        /// The step id, like `tf:service-infra:app`
        #[arg(add = ArgValueCompleter::new(completion::steps))]
        step: String,
    },
    /// Remove the run lock left by a process on another host or a crashed run
    Unlock,
    /// Write nixmox.lock (addresses and VM ids allocated from the pools) and flake.lock (the
    /// revisions of the flake's inputs, with `nix flake lock`); commit both
    Lock {
        /// Write only nixmox.lock; leave flake.lock as it is
        #[arg(long)]
        allocations_only: bool,
    },
    /// Move the flake's inputs (all, or the named ones) to their newest revisions in
    /// flake.lock, as `nix flake update` does, and print old → new
    Update {
        /// Inputs to update: nixpkgs, sops-nix, authentik-nix (default: all)
        inputs: Vec<String>,
    },
    /// Print the JSON Schema of nixmox.yaml or of a service manifest
    Schema {
        /// Which file's schema
        #[arg(value_enum, default_value_t = SchemaKind::Project)]
        kind: SchemaKind,
        /// Write both schemas into this directory instead of printing one
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Create a new project with the four core services and an example app
    Init {
        /// Where to create it (default: the project directory)
        dir: Option<PathBuf>,
        /// The project's name (default: from the directory's name)
        #[arg(long)]
        name: Option<String>,
        /// The project's domain
        #[arg(long, default_value = "nixmox.lan")]
        domain: String,
    },
    /// Upload or list NixOS LXC templates on the Proxmox storage
    Template {
        #[command(subcommand)]
        action: TemplateAction,
    },
    /// Set, rotate or list the secrets in the hosts' SOPS files (secrets/<host>.yaml)
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// Back a service's container up now (vzdump through the Proxmox API, awaited), and dump
    /// the databases it owns (pg_dump on the database host, beside the backup); prints the
    /// archive's volume id, then each dump as `host:path`
    Backup {
        /// The service
        service: String,
        /// The storage (default: the manifest's host.backup.storage)
        #[arg(long)]
        storage: Option<String>,
        /// vzdump's mode (default: host.backup.mode, else snapshot)
        #[arg(long, value_parser = ["snapshot", "suspend", "stop"])]
        mode: Option<String>,
    },
    /// Replace a service's container by a backup (asks first), start it and run its health
    /// checks
    Restore {
        /// The service
        service: String,
        /// The backup's volume id, like `local:backup/vzdump-lxc-912-….tar.zst`
        #[arg(long, value_name = "VOLID")]
        from: String,
        /// Restore without asking (needed without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// List, take or roll back to the containers' snapshots (through the Proxmox API)
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
}

/// `nixmox up`'s arguments, lowered once into the engine's options by
/// `commands::up::options`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Only these services (with their dependencies unless --no-deps)
    #[arg(add = ArgValueCompleter::new(completion::services))]
    pub services: Vec<String>,
    /// Do not add the named services' dependencies
    #[arg(long)]
    pub no_deps: bool,
    /// How many steps may run at once (default: deploy.parallel)
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Print what would run, and why, without executing anything
    #[arg(long)]
    pub dry_run: bool,
    /// Run every step, even unchanged ones
    #[arg(long)]
    pub force: bool,
    /// Run this step even if unchanged (repeatable)
    #[arg(long, value_name = "STEP")]
    #[arg(add = ArgValueCompleter::new(completion::steps))]
    pub force_step: Vec<String>,
    /// Stop everything at the first failure (default: only its dependents stop)
    #[arg(long)]
    pub fail_fast: bool,
    /// Longest a single step may run, like `30m` or `90s`
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_TIMEOUT)]
    pub timeout: String,
    /// Progress as text (live on a terminal) or JSON lines
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
    /// What a failed health gate rolls back to: the container's snapshot taken before the
    /// deploy (default, when one was taken; else the generation), the previous NixOS
    /// generation, or nothing (leave it as deployed, to debug it)
    #[arg(long, value_enum, value_name = "HOW")]
    pub rollback: Option<RollbackArg>,
    /// The same as `--rollback none`
    #[arg(long, conflicts_with = "rollback")]
    pub no_rollback: bool,
    /// Also roll back core hosts (`nix:core:*`) whose health gate fails
    #[arg(long, conflicts_with = "no_rollback")]
    pub rollback_core: bool,
    /// With infra.backend proxmox-api: destroy the project's containers that are no
    /// longer in the project (without it they are only reported). They are listed first
    /// and confirmed on a terminal (`y`); without a terminal, --yes is needed
    #[arg(long)]
    pub remove_orphans: bool,
    /// Apply Terraform plans that delete or replace protected resources (containers,
    /// databases, `interface.terraform.protect`); without it such a step fails and applies
    /// nothing
    #[arg(long)]
    pub allow_destroy: bool,
    /// Destroy the orphans --remove-orphans lists without asking (needed without a terminal)
    #[arg(long, requires = "remove_orphans")]
    pub yes: bool,
}

impl UpArgs {
    /// A plain `nixmox up SERVICE...` with every flag at its default and no dependencies
    /// added: what another command runs after changing what those services deploy.
    pub fn redeploy(services: Vec<String>) -> UpArgs {
        UpArgs {
            services,
            no_deps: true,
            parallel: None,
            dry_run: false,
            force: false,
            force_step: Vec::new(),
            fail_fast: false,
            timeout: DEFAULT_TIMEOUT.into(),
            format: PlanFormat::Text,
            rollback: None,
            no_rollback: false,
            rollback_core: false,
            remove_orphans: false,
            allow_destroy: false,
            yes: false,
        }
    }
}

/// `up --timeout`'s default.
pub const DEFAULT_TIMEOUT: &str = "30m";

/// `nixmox down`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DownArgs {
    /// The services to remove (consumers must be removed with their providers)
    #[arg(add = ArgValueCompleter::new(completion::services))]
    pub services: Vec<String>,
    /// Keep the containers
    #[arg(long)]
    pub keep_host: bool,
    /// Also drop the removed services' databases and roles (with the built-in deployers;
    /// with a custom one, print the statements: docs/engine.md)
    #[arg(long)]
    pub purge_data: bool,
    /// Destroy what is listed without asking (needed without a terminal)
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Only list what would be destroyed; change nothing
    #[arg(long, conflicts_with = "yes")]
    pub dry_run: bool,
    /// Destroy containers without the vzdump backup taken first of each host with
    /// `host.backup` (the list says which are backed up)
    #[arg(long)]
    pub no_backup: bool,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// The snapshots of the services' containers, NixMox's and others'
    List {
        /// Only these services
        services: Vec<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Snapshot a service's container now (prints the snapshot's name)
    Create {
        /// The service
        service: String,
    },
    /// Roll a service's container back to a snapshot and start it; asks first
    Rollback {
        /// The service
        service: String,
        /// The snapshot (default: the newest NixMox took)
        name: Option<String>,
        /// Roll back without asking (needed without a terminal)
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretsAction {
    /// Store a secret only a person knows, read from stdin (or a prompt on a terminal)
    Set {
        /// The service whose host gets it
        service: String,
        /// Its name, like `smtp/password` (sops-nix: `sops.secrets."smtp/password"`)
        name: String,
    },
    /// Make a new value for a generated secret, re-encrypt, and redeploy the hosts that use it
    Rotate {
        /// The service (its database role passwords, unless NAME says which)
        service: String,
        /// One secret, like `db/guacamole` (default: all the service's generated secrets)
        name: Option<String>,
        /// Only re-encrypt; the next `nixmox up` deploys the change
        #[arg(long)]
        no_deploy: bool,
    },
    /// List each host's secrets: names and where they came from, never values
    List {
        /// Only these services
        #[arg(add = ArgValueCompleter::new(completion::services))]
        services: Vec<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateAction {
    /// Upload a container template (.tar.xz) to the storage `proxmox.template` names
    Upload {
        /// The template file
        file: PathBuf,
        /// Another storage with `vztmpl` content (default: from proxmox.template, like `local`)
        #[arg(long)]
        storage: Option<String>,
        /// Send it even if a file of that name and size is there
        #[arg(long)]
        force: bool,
    },
    /// List the container templates on that storage (`*` marks proxmox.template)
    List {
        /// Another storage with `vztmpl` content (default: from proxmox.template)
        #[arg(long)]
        storage: Option<String>,
        /// Output format
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
}

/// `up --rollback`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RollbackArg {
    Snapshot,
    Generation,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ConfigFormat {
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SchemaKind {
    Project,
    Manifest,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum PlanFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Svg,
}
